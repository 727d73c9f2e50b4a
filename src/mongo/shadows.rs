//! Shadows: the latest state of every watched document as the log knows it.

use std::collections::HashMap;

use bson::{doc, Bson, Document};

use crate::diff::repr;
use futures_util::TryStreamExt;
use mongodb::options::ReplaceOptions;

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

fn encode(stream: &str, key: &str, s: &Shadow) -> Result<Document, StoreError> {
    let _ = key;
    let mut d = doc! {
        "_id": shadow_id(stream, key),
        "stream": stream,
        "doc_key": key,
        "doc_id": s.doc_id.clone(),
        "version": s.version,
        "stamp": s.stamp.map_or(Bson::Null, Bson::Int64),
        "offset": s.offset,
        "deleted": s.doc.is_none(),
    };
    if let Some(doc) = &s.doc {
        // The type-preserving JSON text: exact whatever the keys and types, and storable
        // by any server (no `$`-keys, no types a server might not keep).
        d.insert("doc", repr::to_value(doc).to_string());
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
            let value: serde_json::Value =
                serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))?;
            Some(repr::from_value(&value).map_err(|e| corrupt(e.to_string()))?)
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
        let coll = self.shadows();
        let opts = ReplaceOptions::builder().upsert(true).build();
        let mut futures = Vec::with_capacity(shadows.len());
        for (key, s) in shadows {
            let d = encode(stream, key, s)?;
            let coll = coll.clone();
            let opts = opts.clone();
            futures.push(async move {
                coll.replace_one(
                    doc! { "_id": d.get_str("_id").unwrap_or_default() },
                    d.clone(),
                )
                .with_options(opts)
                .await
            });
        }
        for r in futures_util::future::join_all(futures).await {
            r?;
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
            let deleted = d.get_bool("deleted").unwrap_or(false);
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
