//! Snapshots: the state of a document at the compaction horizon, written by compaction
//! before it deletes the events the snapshot replaces.
//!
//! One record per document (`_id` = stream, U+001F, document key):
//!
//! ```text
//! { _id, ns, doc_key, doc_id, version, seq, deleted, doc: <type-preserving JSON text>?, compacted_at }
//! ```
//!
//! `version` is the log version of the state and `seq` the stream position of the last
//! event it replaces, so readers can merge snapshots and events by position. A snapshot
//! only ever moves forward (compare-and-swap on `version`), which makes compaction safe to
//! run concurrently on several replicas.

use bson::{doc, Bson, DateTime, Document};
use futures_util::TryStreamExt;
use mongodb::options::IndexOptions;
use mongodb::IndexModel;

use super::shadows::shadow_id;
use super::{get_int, Store, StoreError};
use crate::diff::repr;

/// The state of one document at a version, kept when the events up to it were compacted.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRecord {
    /// The stream / namespace.
    pub ns: String,
    /// The canonical document key.
    pub doc_key: String,
    /// The document `_id`.
    pub doc_id: Bson,
    /// The log version of the state.
    pub version: i64,
    /// The stream position of the last event this snapshot replaces.
    pub seq: i64,
    /// The state; `None` when the document was deleted at that version.
    pub doc: Option<Document>,
    /// When compaction wrote it.
    pub compacted_at: DateTime,
}

impl SnapshotRecord {
    fn to_document(&self) -> Document {
        let mut d = doc! {
            "_id": shadow_id(&self.ns, &self.doc_key),
            "ns": &self.ns,
            "doc_key": &self.doc_key,
            "doc_id": self.doc_id.clone(),
            "version": self.version,
            "seq": self.seq,
            "deleted": self.doc.is_none(),
            "compacted_at": self.compacted_at,
        };
        if let Some(doc) = &self.doc {
            d.insert("doc", repr::to_text(doc));
        }
        d
    }

    fn from_document(d: &Document) -> Result<Self, StoreError> {
        let key = d.get_str("doc_key").unwrap_or_default().to_owned();
        let corrupt = |reason: String| StoreError::Corrupt {
            what: "snapshot",
            id: key.clone(),
            reason,
        };
        let doc = match d.get("doc") {
            Some(Bson::String(text)) => {
                Some(repr::from_text(text).map_err(|e| corrupt(e.to_string()))?)
            }
            _ => None,
        };
        Ok(Self {
            ns: d
                .get_str("ns")
                .map_err(|e| corrupt(e.to_string()))?
                .to_owned(),
            doc_key: key.clone(),
            doc_id: d.get("doc_id").cloned().unwrap_or(Bson::Null),
            version: get_int(d, "version").ok_or_else(|| corrupt("version".into()))?,
            seq: get_int(d, "seq").ok_or_else(|| corrupt("seq".into()))?,
            doc,
            compacted_at: d
                .get_datetime("compacted_at")
                .copied()
                .unwrap_or_else(|_| DateTime::now()),
        })
    }
}

impl Store {
    /// Indexes of the snapshots collection beyond the unique `(ns, doc_key)` (idempotent).
    pub async fn ensure_snapshot_indexes(&self) -> Result<(), StoreError> {
        self.snapshots()
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "ns": 1, "seq": 1 })
                    .options(IndexOptions::builder().build())
                    .build(),
            )
            .await?;
        Ok(())
    }

    /// The snapshot of one document, if compaction wrote one.
    pub async fn load_snapshot(
        &self,
        ns: &str,
        doc_key: &str,
    ) -> Result<Option<SnapshotRecord>, StoreError> {
        self.snapshots()
            .find_one(doc! { "_id": shadow_id(ns, doc_key) })
            .await?
            .as_ref()
            .map(SnapshotRecord::from_document)
            .transpose()
    }

    /// Snapshots of a stream whose position is after `after_seq` (optionally only some
    /// documents), by position, at most `limit`.
    pub async fn snapshots_after(
        &self,
        ns: &str,
        after_seq: i64,
        keys: Option<&[String]>,
        limit: i64,
    ) -> Result<Vec<SnapshotRecord>, StoreError> {
        let mut filter = doc! { "ns": ns, "seq": { "$gt": after_seq } };
        if let Some(keys) = keys {
            filter.insert("doc_key", doc! { "$in": keys.to_vec() });
        }
        let docs: Vec<Document> = self
            .snapshots()
            .find(filter)
            .sort(doc! { "seq": 1 })
            .limit(limit)
            .await?
            .try_collect()
            .await?;
        docs.iter().map(SnapshotRecord::from_document).collect()
    }

    /// Stores a snapshot unless one at the same or a later version is already there.
    /// Returns the snapshot now stored (this one or the newer one).
    pub async fn save_snapshot(&self, snap: &SnapshotRecord) -> Result<SnapshotRecord, StoreError> {
        for _ in 0..20 {
            match self.load_snapshot(&snap.ns, &snap.doc_key).await? {
                Some(existing) if existing.version >= snap.version => return Ok(existing),
                Some(existing) => {
                    let r = self
                        .snapshots()
                        .replace_one(
                            doc! { "_id": shadow_id(&snap.ns, &snap.doc_key), "version": existing.version },
                            snap.to_document(),
                        )
                        .await?;
                    if r.matched_count == 1 {
                        return Ok(snap.clone());
                    }
                }
                None => match self.snapshots().insert_one(snap.to_document()).await {
                    Ok(_) => return Ok(snap.clone()),
                    Err(e) if crate::client::is_duplicate_key(&e) => {}
                    Err(e) => return Err(e.into()),
                },
            }
        }
        Err(StoreError::Corrupt {
            what: "snapshot",
            id: snap.doc_key.clone(),
            reason: "too many concurrent writers".into(),
        })
    }
}

/// The state of one document at one log version.
#[derive(Debug, Clone, PartialEq)]
pub struct DocState {
    /// The document `_id` (`Null` when the log never saw the document).
    pub doc_id: Bson,
    /// The log version (0: the log holds nothing of the document).
    pub version: i64,
    /// The stream position of the event (or snapshot) that produced this version; 0 if none.
    pub seq: i64,
    /// The state; `None` when deleted or never created.
    pub doc: Option<Document>,
}

/// Why a document state cannot be rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The version asked for is older than the compaction snapshot.
    #[error("version {asked} was compacted; the earliest version kept is {earliest}")]
    Compacted {
        /// Asked version.
        asked: i64,
        /// Oldest version still available (the snapshot's).
        earliest: i64,
    },
    /// The log has no state at exactly that version.
    #[error("version {asked} is not a version of this document in the log (latest: {latest})")]
    NoSuchVersion {
        /// Asked version.
        asked: i64,
        /// The latest version the log holds.
        latest: i64,
    },
    /// The chain does not fit (an event's patch does not apply).
    #[error("the log of this document cannot be replayed: {0}")]
    Broken(String),
}

/// Where a replay stopped.
enum Replay {
    Done(Box<DocState>),
    /// The chain moved under us (compaction ran concurrently): start again.
    Moved,
}

impl Store {
    /// Applies the events of a document with `base.version < to_version <= upto` to `base`.
    async fn replay_from(
        &self,
        ns: &str,
        doc_key: &str,
        mut state: DocState,
        upto: Option<i64>,
    ) -> Result<Replay, StateError> {
        loop {
            let mut range = doc! { "$gt": state.version };
            if let Some(u) = upto {
                range.insert("$lte", u);
            }
            let batch = self
                .find_events(
                    doc! { "ns": ns, "doc_key": doc_key, "to_version": range },
                    doc! { "to_version": 1 },
                    500,
                )
                .await?;
            let n = batch.len();
            for ev in batch {
                if ev.from_version != state.version {
                    return Ok(Replay::Moved);
                }
                state.doc = match ev.op {
                    super::events::Operation::Delete => None,
                    _ => {
                        let patch: crate::diff::Patch = serde_json::from_str(&ev.patch)
                            .map_err(|e| StateError::Broken(format!("event {}: {e}", ev.seq)))?;
                        let base = state.doc.take().unwrap_or_default();
                        Some(
                            crate::diff::apply(&base, &patch).map_err(|e| {
                                StateError::Broken(format!("event {}: {e}", ev.seq))
                            })?,
                        )
                    }
                };
                state.version = ev.to_version;
                state.seq = ev.seq;
                state.doc_id = ev.doc_id;
            }
            if n < 500 {
                return Ok(Replay::Done(Box::new(state)));
            }
        }
    }

    /// The state of a document at log version `version` (compaction snapshot, then the
    /// events after it replayed with [`crate::diff::apply`]).
    pub async fn doc_state_at(
        &self,
        ns: &str,
        doc_key: &str,
        version: i64,
    ) -> Result<DocState, StateError> {
        for _ in 0..5 {
            let snap = self.load_snapshot(ns, doc_key).await?;
            let base = match snap {
                Some(s) if version < s.version => {
                    return Err(StateError::Compacted {
                        asked: version,
                        earliest: s.version,
                    })
                }
                Some(s) => DocState {
                    doc_id: s.doc_id,
                    version: s.version,
                    seq: s.seq,
                    doc: s.doc,
                },
                None => DocState {
                    doc_id: Bson::Null,
                    version: 0,
                    seq: 0,
                    doc: None,
                },
            };
            match self.replay_from(ns, doc_key, base, Some(version)).await? {
                Replay::Moved => continue,
                Replay::Done(s) if s.version == version => return Ok(*s),
                Replay::Done(_) => {
                    let latest = self.latest_doc_state(ns, doc_key).await?.version;
                    return Err(StateError::NoSuchVersion {
                        asked: version,
                        latest,
                    });
                }
            }
        }
        Err(StateError::Broken(
            "the document's log kept changing under the replay".into(),
        ))
    }

    /// The latest state of a document the log holds: its shadow, plus any event appended
    /// after the shadow was stored (so never behind the log at the time of the call).
    pub async fn latest_doc_state(&self, ns: &str, doc_key: &str) -> Result<DocState, StateError> {
        for _ in 0..5 {
            let shadow = self.load_shadow(ns, doc_key).await?;
            let snap = self.load_snapshot(ns, doc_key).await?;
            let shadow_first = match (&shadow, &snap) {
                (Some(sh), Some(sn)) => sh.version.get() >= sn.version,
                (Some(_), None) => true,
                _ => false,
            };
            let base = match (shadow, snap) {
                (Some(s), _) if shadow_first => DocState {
                    doc_id: s.doc_id,
                    version: s.version.get(),
                    seq: 0,
                    doc: s.doc.map(std::sync::Arc::unwrap_or_clone),
                },
                (_, Some(s)) => DocState {
                    doc_id: s.doc_id,
                    version: s.version,
                    seq: s.seq,
                    doc: s.doc,
                },
                _ => DocState {
                    doc_id: Bson::Null,
                    version: 0,
                    seq: 0,
                    doc: None,
                },
            };
            let base_version = base.version;
            match self.replay_from(ns, doc_key, base, None).await? {
                Replay::Moved => continue,
                Replay::Done(s) => {
                    let mut s = *s;
                    if s.seq == 0 && s.version > 0 {
                        // Find the position of the event that produced the shadow's version.
                        let ev = self
                            .find_events(
                                doc! { "ns": ns, "doc_key": doc_key, "to_version": base_version },
                                doc! { "seq": 1 },
                                1,
                            )
                            .await?;
                        s.seq = match ev.first() {
                            Some(e) => e.seq,
                            None => self
                                .load_snapshot(ns, doc_key)
                                .await?
                                .filter(|x| x.version == base_version)
                                .map_or(0, |x| x.seq),
                        };
                    }
                    return Ok(s);
                }
            }
        }
        Err(StateError::Broken(
            "the document's log kept changing under the replay".into(),
        ))
    }
}
