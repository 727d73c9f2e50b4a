//! Shadows: the latest state of every watched document as the log knows it.

use std::collections::HashMap;
use std::sync::Arc;

use bson::{doc, Bson, Document, RawBson, RawBsonRef, RawDocument, RawDocumentBuf};

use crate::diff::repr;
use crate::pipeline::version::{LogVersion, Stamp};
use futures_util::TryStreamExt;

use super::{Store, StoreError};

/// The log's view of one document.
#[derive(Debug, Clone, PartialEq)]
pub struct Shadow {
    /// The document's `_id`.
    pub doc_id: Bson,
    /// The log version of the latest event.
    pub version: LogVersion,
    /// The writer's stamp in that state (`None`: unstamped).
    pub stamp: Option<Stamp>,
    /// Log version minus stamp in the current incarnation (see
    /// [`crate::pipeline::version`]).
    pub offset: i64,
    /// The log version the current incarnation began from (the `from_version` of its
    /// first event): events after it belong to this incarnation.
    pub incarnation_from: LogVersion,
    /// The document state; `None` after a delete. Shared: the appender's cache, its
    /// unconfirmed batches and the batch being prepared hold the same state.
    pub doc: Option<Arc<Document>>,
}

impl Shadow {
    /// True when the document is deleted (or never existed).
    pub fn deleted(&self) -> bool {
        self.doc.is_none()
    }
}

/// The shadow `_id` of a document in a stream.
pub fn shadow_id(stream: &str, doc_key: &str) -> String {
    format!("{stream}\u{1f}{doc_key}")
}

/// Largest shadow record MongoDB stores (its document size limit). A document whose
/// record would be larger cannot be followed: its change becomes a dead letter.
pub const MAX_SHADOW_RECORD_BYTES: usize = 16 * 1024 * 1024;

/// The stored form of a shadow, ready to write (and to measure: the type-preserving JSON
/// text of a document can be several times its BSON size). `doc_text` is the document's
/// text when the caller has it already ([`repr::to_text`] of `s.doc`).
pub fn shadow_record(
    stream: &str,
    key: &str,
    s: &Shadow,
    doc_text: Option<String>,
) -> Result<RawDocumentBuf, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        what: "shadow",
        id: key.to_owned(),
        reason,
    };
    let mut d = RawDocumentBuf::new();
    d.append("_id", shadow_id(stream, key));
    d.append("stream", stream);
    d.append("doc_key", key);
    d.append(
        "doc_id",
        RawBson::try_from(s.doc_id.clone()).map_err(|e| corrupt(e.to_string()))?,
    );
    d.append("version", s.version.get());
    match s.stamp {
        Some(v) => d.append("stamp", v.0),
        None => d.append("stamp", RawBson::Null),
    }
    d.append("offset", s.offset);
    d.append("incarnation_from", s.incarnation_from.get());
    d.append("deleted", s.doc.is_none());
    if let Some(doc) = &s.doc {
        // The type-preserving JSON text: exact whatever the keys and types, and storable
        // by any server (no `$`-keys, no types a server might not keep).
        d.append("doc", doc_text.unwrap_or_else(|| repr::to_text(doc)));
    }
    Ok(d)
}

/// Reads a stored shadow record: its document key and the shadow.
pub fn decode_record(d: &Document) -> Result<(String, Shadow), StoreError> {
    let raw = RawDocumentBuf::from_document(d).map_err(|e| StoreError::Corrupt {
        what: "shadow",
        id: d.get_str("doc_key").unwrap_or_default().to_owned(),
        reason: e.to_string(),
    })?;
    decode_raw_record(&raw)
}

/// An integer field of a raw record (Int32, Int64, or a whole Double).
fn raw_int(d: &RawDocument, key: &str) -> Option<i64> {
    match d.get(key).ok()?? {
        RawBsonRef::Int64(v) => Some(v),
        RawBsonRef::Int32(v) => Some(i64::from(v)),
        RawBsonRef::Double(v) if v.fract() == 0.0 => Some(v as i64),
        _ => None,
    }
}

/// Reads a stored shadow record from its BSON bytes (as the store reads it: no
/// intermediate [`Document`] of the record).
pub fn decode_raw_record(d: &RawDocument) -> Result<(String, Shadow), StoreError> {
    let key = d.get_str("doc_key").unwrap_or_default().to_owned();
    let corrupt = |reason: String| StoreError::Corrupt {
        what: "shadow",
        id: key.clone(),
        reason,
    };
    let doc = match d.get("doc") {
        Ok(Some(RawBsonRef::String(text))) => Some(Arc::new(
            repr::from_text(text).map_err(|e| corrupt(e.to_string()))?,
        )),
        _ => None,
    };
    let doc_id = match d.get("doc_id") {
        Ok(Some(v)) => Bson::try_from(v.to_raw_bson()).map_err(|e| corrupt(e.to_string()))?,
        _ => return Err(corrupt("doc_id missing".into())),
    };
    Ok((
        key.clone(),
        Shadow {
            doc_id,
            version: LogVersion(
                raw_int(d, "version").ok_or_else(|| corrupt("version: not an integer".into()))?,
            ),
            stamp: raw_int(d, "stamp").map(Stamp),
            offset: raw_int(d, "offset").unwrap_or(0),
            incarnation_from: LogVersion(raw_int(d, "incarnation_from").unwrap_or(0)),
            doc,
        },
    ))
}

impl Store {
    /// Loads the shadows of some documents of a stream, by document key.
    pub async fn load_shadows(
        &self,
        stream: &str,
        keys: &[String],
    ) -> Result<HashMap<String, Shadow>, StoreError> {
        let mut out = HashMap::with_capacity(keys.len());
        for chunk in keys.chunks(500) {
            let ids: Vec<Bson> = chunk
                .iter()
                .map(|k| Bson::String(shadow_id(stream, k)))
                .collect();
            let cursor = self
                .shadows()
                .clone_with_type::<RawDocumentBuf>()
                .find(doc! { "_id": { "$in": ids } })
                .await?;
            let records: Vec<RawDocumentBuf> = cursor.try_collect().await?;
            for r in &records {
                let (k, s) = decode_raw_record(r)?;
                out.insert(k, s);
            }
        }
        Ok(out)
    }

    /// Loads one shadow.
    pub async fn load_shadow(&self, stream: &str, key: &str) -> Result<Option<Shadow>, StoreError> {
        let found = self
            .shadows()
            .find_one(doc! { "_id": shadow_id(stream, key) })
            .await?;
        found
            .as_ref()
            .map(decode_record)
            .transpose()
            .map(|o| o.map(|(_, s)| s))
    }
}
