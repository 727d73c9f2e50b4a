//! Sync clients: registrations and acknowledged state vectors (`UpdateVectorClock`).
//!
//! One record per client in the `clients` collection:
//!
//! ```text
//! { _id: <client id>, description, registered_at, updated_at, rev: <Int64>,
//!   vector: [ { stream, position?: <seq>, documents: [ { key, id, version } ] } ],
//!   notices: [ { stream, through_seq, reason, at } ] }
//! ```
//!
//! Times (`registered_at`, `updated_at`, `at`) are stored as Int64 Unix milliseconds, like
//! every time the daemon stores: a BSON datetime written through `$set` does not survive
//! every MongoDB-compatible server. Records written by older versions as BSON datetimes
//! are read too; a missing or unreadable time is a [`StoreError::Corrupt`], never "now".
//!
//! Every change is a read-modify-write guarded by `rev` (compare-and-swap), so concurrent
//! acknowledgements never lose each other and an older vector never moves an entry back:
//! the merge takes the maximum per entry. This needs no update operator beyond `$set`, so it
//! works on any MongoDB-compatible server.

use std::collections::BTreeMap;

use bson::{doc, Bson, DateTime, Document};
use futures_util::TryStreamExt;

use super::{get_int, Store, StoreError};

/// What a client holds of one stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamState {
    /// The client holds every event of the stream up to this position (whole-stream
    /// following); `None`: it follows only the documents below.
    pub position: Option<i64>,
    /// Per-document versions held, by document key (canonical Extended JSON of `_id`).
    pub documents: BTreeMap<String, DocVersion>,
}

/// A version of one document held by a client.
#[derive(Debug, Clone, PartialEq)]
pub struct DocVersion {
    /// The document's `_id`.
    pub id: Bson,
    /// The log version held.
    pub version: i64,
}

/// A state vector: what a client holds, per stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateVector {
    /// By stream name.
    pub streams: BTreeMap<String, StreamState>,
}

impl StateVector {
    /// Number of entries (streams plus documents), the unit of `sync.max_vector_entries`.
    pub fn entries(&self) -> usize {
        self.streams.values().map(|s| 1 + s.documents.len()).sum()
    }

    /// Merges `other` in, keeping the larger value of every entry. True when it changed.
    pub fn merge(&mut self, other: &StateVector) -> bool {
        let mut changed = false;
        for (name, theirs) in &other.streams {
            let ours = self.streams.entry(name.clone()).or_insert_with(|| {
                changed = true;
                StreamState::default()
            });
            if let Some(p) = theirs.position {
                if ours.position.is_none_or(|o| p > o) {
                    ours.position = Some(p);
                    changed = true;
                }
            }
            for (key, dv) in &theirs.documents {
                match ours.documents.get_mut(key) {
                    Some(o) if o.version >= dv.version => {}
                    Some(o) => {
                        o.version = dv.version;
                        changed = true;
                    }
                    None => {
                        ours.documents.insert(key.clone(), dv.clone());
                        changed = true;
                    }
                }
            }
        }
        changed
    }

    /// Whether the client has acknowledged the event of document `key` at stream position
    /// `seq` that produced `to_version`. A stream or document the client does not follow
    /// does not hold compaction back.
    pub fn acknowledges(&self, stream: &str, key: &str, seq: i64, to_version: i64) -> bool {
        let Some(s) = self.streams.get(stream) else {
            return true;
        };
        if let Some(d) = s.documents.get(key) {
            return d.version >= to_version;
        }
        match s.position {
            Some(p) => p >= seq,
            None => true,
        }
    }

    fn to_bson(&self) -> Bson {
        Bson::Array(
            self.streams
                .iter()
                .map(|(name, s)| {
                    let docs: Vec<Bson> = s
                        .documents
                        .iter()
                        .map(|(k, d)| {
                            Bson::Document(
                                doc! { "key": k, "id": d.id.clone(), "version": d.version },
                            )
                        })
                        .collect();
                    let mut e = doc! { "stream": name, "documents": docs };
                    if let Some(p) = s.position {
                        e.insert("position", p);
                    }
                    Bson::Document(e)
                })
                .collect(),
        )
    }

    fn from_bson(v: Option<&Bson>) -> Self {
        let mut out = StateVector::default();
        let Some(Bson::Array(items)) = v else {
            return out;
        };
        for item in items {
            let Bson::Document(e) = item else { continue };
            let Ok(name) = e.get_str("stream") else {
                continue;
            };
            let mut s = StreamState {
                position: get_int(e, "position"),
                ..Default::default()
            };
            if let Ok(docs) = e.get_array("documents") {
                for d in docs {
                    let Bson::Document(d) = d else { continue };
                    if let (Ok(k), Some(v)) = (d.get_str("key"), get_int(d, "version")) {
                        s.documents.insert(
                            k.to_owned(),
                            DocVersion {
                                id: d.get("id").cloned().unwrap_or(Bson::Null),
                                version: v,
                            },
                        );
                    }
                }
            }
            out.streams.insert(name.to_owned(), s);
        }
        out
    }
}

/// A message kept for a client until it acknowledges past it: compaction removed events
/// it had not acknowledged (past the hard limit).
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    /// The stream.
    pub stream: String,
    /// Events up to this position may be gone; the client gets snapshots instead.
    pub through_seq: i64,
    /// Why.
    pub reason: String,
    /// When.
    pub at: DateTime,
}

/// A registered sync client.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientRecord {
    /// The client id.
    pub id: String,
    /// Free text.
    pub description: Option<String>,
    /// Registration time.
    pub registered_at: DateTime,
    /// Last change.
    pub updated_at: DateTime,
    /// Revision (compare-and-swap counter).
    pub rev: i64,
    /// The acknowledged state vector.
    pub vector: StateVector,
    /// Pending notices.
    pub notices: Vec<Notice>,
}

impl ClientRecord {
    fn to_document(&self) -> Document {
        let notices: Vec<Bson> = self
            .notices
            .iter()
            .map(|n| {
                Bson::Document(doc! {
                    "stream": &n.stream, "through_seq": n.through_seq, "reason": &n.reason,
                    "at": n.at.timestamp_millis()
                })
            })
            .collect();
        doc! {
            "_id": &self.id,
            "description": self.description.clone().map_or(Bson::Null, Bson::String),
            "registered_at": self.registered_at.timestamp_millis(),
            "updated_at": self.updated_at.timestamp_millis(),
            "rev": self.rev,
            "vector": self.vector.to_bson(),
            "notices": notices,
        }
    }

    fn from_document(d: &Document) -> Result<Self, StoreError> {
        let id = d
            .get_str("_id")
            .map_err(|e| StoreError::Corrupt {
                what: "client",
                id: format!("{:?}", d.get("_id")),
                reason: e.to_string(),
            })?
            .to_owned();
        let time = |d: &Document, key: &str| {
            get_time(d, key).ok_or_else(|| StoreError::Corrupt {
                what: "client",
                id: id.clone(),
                reason: format!(
                    "`{key}` is {:?}; expected Int64 Unix milliseconds",
                    d.get(key)
                ),
            })
        };
        let mut notices = Vec::new();
        for n in d
            .get_array("notices")
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let Bson::Document(n) = n else { continue };
            notices.push(Notice {
                stream: n.get_str("stream").unwrap_or_default().to_owned(),
                through_seq: get_int(n, "through_seq").unwrap_or(0),
                reason: n.get_str("reason").unwrap_or_default().to_owned(),
                at: time(n, "at")?,
            });
        }
        Ok(Self {
            description: d.get_str("description").ok().map(str::to_owned),
            registered_at: time(d, "registered_at")?,
            updated_at: time(d, "updated_at")?,
            rev: get_int(d, "rev").unwrap_or(0),
            vector: StateVector::from_bson(d.get("vector")),
            notices,
            id,
        })
    }
}

/// A stored time: Int64 (or Int32/Double, read leniently) Unix milliseconds, or a BSON
/// datetime written by an older version. `None` when missing or of another type.
fn get_time(d: &Document, key: &str) -> Option<DateTime> {
    match d.get(key)? {
        Bson::DateTime(t) => Some(*t),
        _ => get_int(d, key).map(DateTime::from_millis),
    }
}

const CAS_ATTEMPTS: usize = 50;

impl Store {
    /// Registers a client (idempotent). With a vector, merges it in as an acknowledgement.
    /// Returns the record and whether it was created.
    pub async fn register_client(
        &self,
        id: &str,
        description: Option<String>,
        vector: Option<&StateVector>,
    ) -> Result<(ClientRecord, bool), StoreError> {
        let now = DateTime::now();
        let mut rec = ClientRecord {
            id: id.to_owned(),
            description: description.clone(),
            registered_at: now,
            updated_at: now,
            rev: 1,
            vector: vector.cloned().unwrap_or_default(),
            notices: Vec::new(),
        };
        match self.clients().insert_one(rec.to_document()).await {
            Ok(_) => return Ok((rec, true)),
            Err(e) if crate::client::is_duplicate_key(&e) => {}
            Err(e) => return Err(e.into()),
        }
        rec = self
            .update_client(id, |c| {
                let mut changed = false;
                if description.is_some() && c.description != description {
                    c.description = description.clone();
                    changed = true;
                }
                if let Some(v) = vector {
                    changed |= c.vector.merge(v);
                }
                changed
            })
            .await?
            .ok_or_else(|| StoreError::Corrupt {
                what: "client",
                id: id.to_owned(),
                reason: "vanished while registering".into(),
            })?;
        Ok((rec, false))
    }

    /// One client.
    pub async fn get_client(&self, id: &str) -> Result<Option<ClientRecord>, StoreError> {
        self.clients()
            .find_one(doc! { "_id": id })
            .await?
            .as_ref()
            .map(ClientRecord::from_document)
            .transpose()
    }

    /// All clients, by id.
    pub async fn list_clients(&self) -> Result<Vec<ClientRecord>, StoreError> {
        let docs: Vec<Document> = self
            .clients()
            .find(doc! {})
            .sort(doc! { "_id": 1 })
            .await?
            .try_collect()
            .await?;
        docs.iter().map(ClientRecord::from_document).collect()
    }

    /// Unregisters a client. True when it existed.
    pub async fn delete_client(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .clients()
            .delete_one(doc! { "_id": id })
            .await?
            .deleted_count
            > 0)
    }

    /// Merges an acknowledged vector into the client's (monotonic per entry) and drops the
    /// notices it has acknowledged past. `None` when the client is not registered.
    pub async fn ack_client(
        &self,
        id: &str,
        vector: &StateVector,
    ) -> Result<Option<ClientRecord>, StoreError> {
        self.update_client(id, |c| {
            let mut changed = c.vector.merge(vector);
            let before = c.notices.len();
            // A notice is settled by acknowledging that stream again: a position at or past
            // it, or document versions (taken from the snapshots sent in place of events).
            c.notices.retain(|n| match vector.streams.get(&n.stream) {
                Some(s) => s.documents.is_empty() && s.position.is_none_or(|p| p < n.through_seq),
                None => true,
            });
            changed |= c.notices.len() != before;
            changed
        })
        .await
    }

    /// Adds a notice to a client (no-op when one for the stream at or past `through_seq`
    /// is already there).
    pub async fn add_notice(&self, id: &str, notice: Notice) -> Result<(), StoreError> {
        self.update_client(id, |c| {
            if c.notices
                .iter()
                .any(|n| n.stream == notice.stream && n.through_seq >= notice.through_seq)
            {
                return false;
            }
            c.notices.retain(|n| n.stream != notice.stream);
            c.notices.push(notice.clone());
            true
        })
        .await?;
        Ok(())
    }

    /// Read-modify-write of a client record with compare-and-swap on `rev`. `change`
    /// returns false when nothing changed (no write). `None` when the client is unknown.
    async fn update_client<F>(
        &self,
        id: &str,
        mut change: F,
    ) -> Result<Option<ClientRecord>, StoreError>
    where
        F: FnMut(&mut ClientRecord) -> bool,
    {
        for _ in 0..CAS_ATTEMPTS {
            let Some(mut rec) = self.get_client(id).await? else {
                return Ok(None);
            };
            let rev = rec.rev;
            if !change(&mut rec) {
                return Ok(Some(rec));
            }
            rec.rev = rev + 1;
            rec.updated_at = DateTime::now();
            let mut set = rec.to_document();
            set.remove("_id");
            let r = self
                .clients()
                .update_one(doc! { "_id": id, "rev": rev }, doc! { "$set": set })
                .await?;
            if r.matched_count == 1 {
                return Ok(Some(rec));
            }
            tokio::task::yield_now().await;
        }
        Err(StoreError::Corrupt {
            what: "client",
            id: id.to_owned(),
            reason: format!("{CAS_ATTEMPTS} concurrent updates in a row; giving up"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(stream: &str, pos: Option<i64>, docs: &[(&str, i64)]) -> StateVector {
        let mut s = StreamState {
            position: pos,
            ..Default::default()
        };
        for (k, ver) in docs {
            s.documents.insert(
                (*k).to_owned(),
                DocVersion {
                    id: Bson::String((*k).into()),
                    version: *ver,
                },
            );
        }
        let mut out = StateVector::default();
        out.streams.insert(stream.to_owned(), s);
        out
    }

    #[test]
    fn times_are_stored_as_milliseconds_and_read_back_exactly() {
        let t = DateTime::from_millis(1_700_000_000_123);
        let rec = ClientRecord {
            id: "c".into(),
            description: None,
            registered_at: t,
            updated_at: DateTime::from_millis(1_700_000_000_456),
            rev: 2,
            vector: StateVector::default(),
            notices: vec![Notice {
                stream: "s".into(),
                through_seq: 3,
                reason: "r".into(),
                at: t,
            }],
        };
        let d = rec.to_document();
        assert_eq!(
            d.get("registered_at"),
            Some(&Bson::Int64(1_700_000_000_123))
        );
        assert_eq!(ClientRecord::from_document(&d).unwrap(), rec);
        // Older records (BSON datetimes) and small values read back as Int32 still decode.
        let mut old = d.clone();
        old.insert("registered_at", t);
        old.insert("updated_at", Bson::Int32(5));
        let back = ClientRecord::from_document(&old).unwrap();
        assert_eq!(back.registered_at, t);
        assert_eq!(back.updated_at, DateTime::from_millis(5));
        // A time that is not one is an error, not "now".
        let mut bad = d.clone();
        bad.insert("updated_at", "2024-01-01T00:00:00Z");
        assert!(matches!(
            ClientRecord::from_document(&bad),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn merge_is_monotonic_per_entry() {
        let mut a = v("s", Some(10), &[("x", 5), ("y", 1)]);
        assert!(!a.merge(&v("s", Some(3), &[("x", 2)])));
        assert_eq!(a, v("s", Some(10), &[("x", 5), ("y", 1)]));
        assert!(a.merge(&v("s", Some(12), &[("y", 4), ("z", 1)])));
        assert_eq!(a, v("s", Some(12), &[("x", 5), ("y", 4), ("z", 1)]));
        assert_eq!(StateVector::from_bson(Some(&a.to_bson())), a);
    }

    #[test]
    fn acknowledgement_rules() {
        let a = v("s", Some(10), &[("x", 5)]);
        assert!(a.acknowledges("s", "x", 50, 5));
        assert!(!a.acknowledges("s", "x", 3, 6));
        assert!(a.acknowledges("s", "y", 10, 99));
        assert!(!a.acknowledges("s", "y", 11, 1));
        assert!(a.acknowledges("other", "y", 11, 1));
    }
}
