//! The JSON shapes of the sync API and their conversions.
//!
//! Documents and document ids are written in the type-preserving representation of
//! [`crate::diff::repr`] (Int32 as a plain integer, every other non-JSON BSON type as its
//! canonical Extended JSON v2 wrapper, user keys beginning with `$` escaped as `$$`), and
//! patches are RFC 6902 JSON Patch arrays over that representation, so a client applies
//! them exactly.

use std::collections::BTreeMap;

use bson::Bson;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ApiError;
use crate::diff::repr;
use crate::mongo::clients::{ClientRecord, DocVersion, Notice, StateVector, StreamState};
use crate::mongo::events::EventRecord;
use crate::mongo::snapshots::{DocState, SnapshotRecord};

/// A state vector as sent by a client.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VectorBody {
    /// One entry per stream.
    #[serde(default)]
    pub streams: Vec<StreamEntry>,
}

/// What a client holds of one stream.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StreamEntry {
    /// The stream name `db.collection`.
    pub stream: String,
    /// Whole-stream following: every event up to this position is held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<i64>,
    /// Per-document following: the versions held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub documents: Option<Vec<DocEntry>>,
}

/// A document version held.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DocEntry {
    /// The `_id` in the type-preserving representation (give this or `key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    /// The document key: canonical Extended JSON text of `_id` (give this or `id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The log version held (0: none).
    pub version: i64,
}

/// Resolves a document given as a path segment or `key`: canonical Extended JSON text of
/// the `_id` (`"p1"` with quotes, `{"$numberInt":"1"}`, `{"$oid":"…"}`), or relaxed forms
/// (`1` is an Int32, `{"$numberLong":"1"}` an Int64); text that is not JSON is a string id.
pub fn parse_key(text: &str) -> Result<(Bson, String), ApiError> {
    if text.is_empty() {
        return Err(ApiError::bad("empty document key"));
    }
    let id = match serde_json::from_str::<Value>(text) {
        Ok(v) => repr::value_to_bson(&v)
            .or_else(|_| Bson::try_from(v))
            .map_err(|e| ApiError::bad(format!("document key {text:?}: {e}")))?,
        Err(_) => Bson::String(text.to_owned()),
    };
    let key = crate::mongo::doc_key(&id);
    Ok((id, key))
}

/// Resolves an `id` in the type-preserving representation.
pub fn parse_id(v: &Value) -> Result<(Bson, String), ApiError> {
    let id = repr::value_to_bson(v).map_err(|e| ApiError::bad(format!("document id: {e}")))?;
    let key = crate::mongo::doc_key(&id);
    Ok((id, key))
}

impl VectorBody {
    /// Validates against the configured streams and limits and converts.
    pub fn to_vector(
        &self,
        streams: &[String],
        max_entries: usize,
    ) -> Result<StateVector, ApiError> {
        let entries: usize = self
            .streams
            .iter()
            .map(|s| 1 + s.documents.as_ref().map_or(0, Vec::len))
            .sum();
        if entries > max_entries {
            return Err(ApiError::Limit(format!(
                "the state vector has {entries} entries; sync.max_vector_entries is {max_entries}"
            )));
        }
        let mut out = StateVector::default();
        for (i, e) in self.streams.iter().enumerate() {
            if !streams.contains(&e.stream) {
                // 404, as the OpenAPI document says for an unknown stream.
                return Err(ApiError::NotFound(format!(
                    "streams[{i}].stream: unknown stream {:?}; known: {}",
                    e.stream,
                    streams.join(", ")
                )));
            }
            if out.streams.contains_key(&e.stream) {
                return Err(ApiError::bad(format!(
                    "streams[{i}]: stream {:?} is listed twice",
                    e.stream
                )));
            }
            let mut st = StreamState::default();
            if let Some(p) = e.position {
                if p < 0 {
                    return Err(ApiError::bad(format!("streams[{i}].position must be >= 0")));
                }
                st.position = Some(p);
            }
            for (j, d) in e.documents.iter().flatten().enumerate() {
                if d.version < 0 {
                    return Err(ApiError::bad(format!(
                        "streams[{i}].documents[{j}].version must be >= 0"
                    )));
                }
                let (id, key) = match (&d.id, &d.key) {
                    (Some(v), None) => parse_id(v)?,
                    (None, Some(k)) => parse_key(k)?,
                    _ => {
                        return Err(ApiError::bad(format!(
                            "streams[{i}].documents[{j}]: give exactly one of `id` and `key`"
                        )))
                    }
                };
                let entry = st
                    .documents
                    .entry(key)
                    .or_insert(DocVersion { id, version: 0 });
                entry.version = entry.version.max(d.version);
            }
            out.streams.insert(e.stream.clone(), st);
        }
        Ok(out)
    }

    /// The JSON form of a stored vector.
    pub fn from_vector(v: &StateVector) -> Self {
        VectorBody {
            streams: v
                .streams
                .iter()
                .map(|(name, s)| StreamEntry {
                    stream: name.clone(),
                    position: s.position,
                    documents: if s.documents.is_empty() {
                        None
                    } else {
                        Some(
                            s.documents
                                .iter()
                                .map(|(k, d)| DocEntry {
                                    id: Some(repr::bson_to_value(&d.id)),
                                    key: Some(k.clone()),
                                    version: d.version,
                                })
                                .collect(),
                        )
                    },
                })
                .collect(),
        }
    }
}

fn rfc3339(t: bson::DateTime) -> String {
    t.try_to_rfc3339_string()
        .unwrap_or_else(|_| t.timestamp_millis().to_string())
}

/// One event of the log.
#[derive(Debug, Clone, Serialize)]
pub struct EventOut {
    /// The stream.
    pub stream: String,
    /// Position in the stream.
    pub seq: i64,
    /// `_id` (type-preserving representation).
    pub id: Value,
    /// Document key (canonical Extended JSON of `_id`).
    pub key: String,
    /// Version before.
    pub from_version: i64,
    /// Version after.
    pub to_version: i64,
    /// insert, update, replace or delete.
    pub op: &'static str,
    /// RFC 6902 patch over the type-preserving representation.
    pub patch: Value,
    /// Writer's client id.
    pub origin: Option<String>,
    /// Whether the writer stamped the version.
    pub stamped: bool,
    /// Wall time of the change (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wall_time: Option<String>,
    /// When the daemon appended it (RFC 3339).
    pub appended_at: String,
}

impl EventOut {
    /// Converts a stored event.
    pub fn from_record(e: &EventRecord) -> Result<Self, ApiError> {
        let patch: Value = serde_json::from_str(&e.patch)
            .map_err(|err| ApiError::Internal(format!("event {} patch: {err}", e.seq)))?;
        Ok(Self {
            stream: e.stream.clone(),
            seq: e.seq,
            id: repr::bson_to_value(&e.doc_id),
            key: e.doc_key.clone(),
            from_version: e.from_version,
            to_version: e.to_version,
            op: e.op.as_str(),
            patch,
            origin: e.origin.clone(),
            stamped: e.stamped,
            wall_time: e.wall_time.map(rfc3339),
            appended_at: rfc3339(e.appended_at),
        })
    }
}

/// Why a snapshot is sent.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotReason {
    /// The client held no version of the document.
    NotHeld,
    /// Compaction removed events the client needed.
    Compacted,
    /// The client's version is not a version of the document in the log.
    VersionNotInLog,
}

/// The full state of a document at a version.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotOut {
    /// The stream.
    pub stream: String,
    /// Position of the last event this state includes (0 if none).
    pub seq: i64,
    /// `_id` (type-preserving representation).
    pub id: Value,
    /// Document key.
    pub key: String,
    /// Log version of the state.
    pub version: i64,
    /// True when the document does not exist at that version.
    pub deleted: bool,
    /// The document (type-preserving representation), `null` when deleted.
    pub document: Option<Value>,
    /// Why it is sent.
    pub reason: SnapshotReason,
}

impl SnapshotOut {
    /// From a compaction snapshot.
    pub fn from_record(s: &SnapshotRecord, reason: SnapshotReason) -> Self {
        Self {
            stream: s.ns.clone(),
            seq: s.seq,
            id: repr::bson_to_value(&s.doc_id),
            key: s.doc_key.clone(),
            version: s.version,
            deleted: s.doc.is_none(),
            document: s.doc.as_ref().map(repr::to_value),
            reason,
        }
    }

    /// From a rebuilt state.
    pub fn from_state(
        stream: &str,
        id: &Bson,
        key: &str,
        s: &DocState,
        reason: SnapshotReason,
    ) -> Self {
        Self {
            stream: stream.to_owned(),
            seq: s.seq,
            id: repr::bson_to_value(if s.doc_id == Bson::Null {
                id
            } else {
                &s.doc_id
            }),
            key: key.to_owned(),
            version: s.version,
            deleted: s.doc.is_none(),
            document: s.doc.as_ref().map(repr::to_value),
            reason,
        }
    }
}

/// An item of a missing-events page or live stream.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Item {
    /// An event.
    Event(EventOut),
    /// A snapshot.
    Snapshot(SnapshotOut),
}

impl Item {
    /// The stream position.
    pub fn seq(&self) -> i64 {
        match self {
            Item::Event(e) => e.seq,
            Item::Snapshot(s) => s.seq,
        }
    }
}

/// A notice for a client.
#[derive(Debug, Clone, Serialize)]
pub struct NoticeOut {
    /// The stream.
    pub stream: String,
    /// Events up to this position may have been compacted before the client acknowledged them.
    pub through_seq: i64,
    /// Why.
    pub reason: String,
    /// When (RFC 3339).
    pub at: String,
}

impl From<&Notice> for NoticeOut {
    fn from(n: &Notice) -> Self {
        Self {
            stream: n.stream.clone(),
            through_seq: n.through_seq,
            reason: n.reason.clone(),
            at: rfc3339(n.at),
        }
    }
}

/// A registered client.
#[derive(Debug, Clone, Serialize)]
pub struct ClientOut {
    /// Client id.
    pub client_id: String,
    /// Description.
    pub description: Option<String>,
    /// Registration time.
    pub registered_at: String,
    /// Last change.
    pub updated_at: String,
    /// The acknowledged vector.
    pub vector: VectorBody,
    /// True when compaction passed events this client had not acknowledged.
    pub reset_required: bool,
    /// Details of that.
    pub notices: Vec<NoticeOut>,
}

impl From<&ClientRecord> for ClientOut {
    fn from(c: &ClientRecord) -> Self {
        Self {
            client_id: c.id.clone(),
            description: c.description.clone(),
            registered_at: rfc3339(c.registered_at),
            updated_at: rfc3339(c.updated_at),
            vector: VectorBody::from_vector(&c.vector),
            reset_required: !c.notices.is_empty(),
            notices: c.notices.iter().map(NoticeOut::from).collect(),
        }
    }
}

/// Request of `POST /v1/sync/missing`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MissingRequest {
    /// The client; its stored vector is used when `vector` is absent.
    #[serde(default)]
    pub client_id: Option<String>,
    /// What the client holds.
    #[serde(default)]
    pub vector: Option<VectorBody>,
    /// From the previous page.
    #[serde(default)]
    pub cursor: Option<String>,
    /// Items per page.
    #[serde(default)]
    pub limit: Option<i64>,
}

/// Response of `POST /v1/sync/missing`, after its `items` (events and snapshots, per
/// stream in position order), which are written ahead of these fields as pre-encoded JSON.
#[derive(Debug, Clone, Serialize)]
pub struct MissingResponse {
    /// True when more pages follow.
    pub has_more: bool,
    /// Pass to the next request.
    pub next_cursor: Option<String>,
    /// Per stream, the position to subscribe live from after the last page.
    pub positions: BTreeMap<String, i64>,
    /// True when this page holds snapshots standing in for compacted events.
    pub compacted: bool,
    /// True when compaction removed events this client had not acknowledged.
    pub reset_required: bool,
    /// Details of that.
    pub notices: Vec<NoticeOut>,
}

/// Minimal string checks for client ids.
pub fn check_client_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 200 || id.chars().any(char::is_control) {
        return Err(ApiError::bad(
            "client id must be 1–200 characters without control characters",
        ));
    }
    Ok(())
}
