//! Shadows: the latest state of every watched document as the log knows it.

use std::collections::HashMap;

use bson::{doc, Bson, Document, RawArrayBuf, RawBson, RawDocumentBuf};

use crate::diff::repr;
use futures_util::TryStreamExt;

use super::{Store, StoreError};

/// The log's view of one document.
#[derive(Debug, Clone, PartialEq)]
pub struct Shadow {
    /// The document's `_id`.
    pub doc_id: Bson,
    /// The log version of the latest event.
    pub version: i64,
    /// The writer's stamp version in that state (`None`: unstamped).
    pub stamp: Option<i64>,
    /// Log version minus stamp version (grows when the daemon assigns versions to
    /// unstamped writes, or when a deleted document is created again).
    pub offset: i64,
    /// The document state; `None` after a delete.
    pub doc: Option<Document>,
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
/// text of a document can be several times its BSON size).
pub fn shadow_record(stream: &str, key: &str, s: &Shadow) -> Result<RawDocumentBuf, StoreError> {
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
    d.append("version", s.version);
    match s.stamp {
        Some(v) => d.append("stamp", v),
        None => d.append("stamp", RawBson::Null),
    }
    d.append("offset", s.offset);
    d.append("deleted", s.doc.is_none());
    if let Some(doc) = &s.doc {
        // The type-preserving JSON text: exact whatever the keys and types, and storable
        // by any server (no `$`-keys, no types a server might not keep).
        d.append("doc", repr::to_text(doc));
    }
    Ok(d)
}

fn decode(d: &Document) -> Result<(String, Shadow), StoreError> {
    let key = d.get_str("doc_key").unwrap_or_default().to_owned();
    let corrupt = |reason: String| StoreError::Corrupt {
        what: "shadow",
        id: key.clone(),
        reason,
    };
    let doc = match d.get("doc") {
        Some(Bson::String(text)) => {
            Some(repr::from_text(text).map_err(|e| corrupt(e.to_string()))?)
        }
        _ => None,
    };
    Ok((
        key.clone(),
        Shadow {
            doc_id: d
                .get("doc_id")
                .cloned()
                .ok_or_else(|| corrupt("doc_id missing".into()))?,
            version: super::get_int(d, "version")
                .ok_or_else(|| corrupt("version: not an integer".into()))?,
            stamp: super::get_int(d, "stamp"),
            offset: super::get_int(d, "offset").unwrap_or(0),
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
            let cursor = self.shadows().find(doc! { "_id": { "$in": ids } }).await?;
            let docs: Vec<Document> = cursor.try_collect().await?;
            for d in &docs {
                let (k, s) = decode(d)?;
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
            .map(decode)
            .transpose()
            .map(|o| o.map(|(_, s)| s))
    }

    /// Stores shadows (idempotent upserts, concurrently).
    pub async fn save_shadows(
        &self,
        stream: &str,
        shadows: &[(String, Shadow)],
    ) -> Result<(), StoreError> {
        let records = shadows
            .iter()
            .map(|(key, s)| shadow_record(stream, key, s))
            .collect::<Result<Vec<_>, _>>()?;
        self.save_shadow_records(records).await
    }

    /// Stores shadow records made by [`shadow_record`]: idempotent upserts, sent as few
    /// multi-statement `update` commands (one round trip per ~8 MB of records) instead of
    /// one `replace_one` per document.
    pub async fn save_shadow_records(
        &self,
        records: Vec<RawDocumentBuf>,
    ) -> Result<(), StoreError> {
        const COMMAND_BYTES: usize = 8 * 1024 * 1024;
        let mut chunk: Vec<RawDocumentBuf> = Vec::new();
        let mut bytes = 0;
        for record in records {
            let len = record.as_bytes().len();
            if !chunk.is_empty() && bytes + len > COMMAND_BYTES {
                self.upsert_shadows(std::mem::take(&mut chunk)).await?;
                bytes = 0;
            }
            bytes += len;
            chunk.push(record);
        }
        if !chunk.is_empty() {
            self.upsert_shadows(chunk).await?;
        }
        Ok(())
    }

    async fn upsert_shadows(&self, records: Vec<RawDocumentBuf>) -> Result<(), StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            what: "shadow",
            id: String::new(),
            reason,
        };
        let mut updates = RawArrayBuf::new();
        for record in records {
            let id = record
                .get_str("_id")
                .map_err(|e| corrupt(e.to_string()))?
                .to_owned();
            let mut q = RawDocumentBuf::new();
            q.append("_id", id);
            let mut statement = RawDocumentBuf::new();
            statement.append("q", q);
            statement.append("u", record);
            statement.append("upsert", true);
            updates.push(statement);
        }
        let mut command = RawDocumentBuf::new();
        command.append("update", "shadows");
        command.append("updates", updates);
        command.append("ordered", true);
        let reply = self.db.run_raw_command(command).await?;
        // Write errors come back in an `ok: 1` reply.
        if let Ok(errors) = reply.get_array("writeErrors") {
            if let Some(first) = errors.iter().next() {
                return Err(corrupt(format!("shadow upsert failed: {first:?}")));
            }
        }
        Ok(())
    }

    /// Every shadow of a stream: `(doc_key, version stamp, deleted)`, without document bodies.
    pub async fn shadow_versions(
        &self,
        stream: &str,
    ) -> Result<HashMap<String, (Option<i64>, bool, Bson)>, StoreError> {
        let cursor = self
            .shadows()
            .find(doc! { "stream": stream })
            .projection(doc! { "doc_key": 1, "stamp": 1, "doc_id": 1, "deleted": 1 })
            .await?;
        let docs: Vec<Document> = cursor.try_collect().await?;
        let mut out = HashMap::with_capacity(docs.len());
        for d in docs {
            let key = d.get_str("doc_key").unwrap_or_default().to_owned();
            let deleted = super::get_flag(&d, "deleted").unwrap_or(false);
            out.insert(
                key,
                (
                    super::get_int(&d, "stamp"),
                    deleted,
                    d.get("doc_id").cloned().unwrap_or(Bson::Null),
                ),
            );
        }
        Ok(out)
    }
}
