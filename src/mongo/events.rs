//! The event log: one record per document version step.

use bson::{doc, Bson, DateTime, Document, RawBson, RawDocumentBuf, Timestamp};
use futures_util::TryStreamExt;
use mongodb::options::FindOptions;
use serde::Serialize;

use super::{Store, StoreError};

/// What happened to the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// The document appeared.
    Insert,
    /// The document changed.
    Update,
    /// The document was replaced whole.
    Replace,
    /// The document was deleted (a tombstone: the patch is empty).
    Delete,
}

impl Operation {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Replace => "replace",
            Operation::Delete => "delete",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "insert" => Operation::Insert,
            "update" => Operation::Update,
            "replace" => Operation::Replace,
            "delete" => Operation::Delete,
            _ => return None,
        })
    }
}

/// One event of the log: the step of one document from `from_version` to `to_version`.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    /// The stream (watched namespace) that produced it.
    pub stream: String,
    /// Dense, increasing position in the stream, from 1.
    pub seq: i64,
    /// The namespace `db.collection`.
    pub ns: String,
    /// The document's `_id`.
    pub doc_id: Bson,
    /// The canonical key of `doc_id` (its canonical Extended JSON).
    pub doc_key: String,
    /// Version before the event (0 before the first insert).
    pub from_version: i64,
    /// Version after the event.
    pub to_version: i64,
    /// The operation.
    pub op: Operation,
    /// The RFC 6902 patch from the previous state, JSON text over the type-preserving
    /// representation (`[]` for a delete).
    pub patch: String,
    /// The writer's client id from the stamp; `None` for unstamped writers.
    pub origin: Option<String>,
    /// False when the daemon assigned the version because the writer did not stamp it.
    pub stamped: bool,
    /// The writer's stamp of the document after the event (`None`: a delete, or an
    /// unstamped document); write checkpoints look it up.
    pub stamp: Option<i64>,
    /// Cluster time of the change.
    pub cluster_time: Option<Timestamp>,
    /// Wall time of the change.
    pub wall_time: Option<DateTime>,
    /// When the daemon appended it.
    pub appended_at: DateTime,
    /// The resume token of the change that produced it.
    pub token: Option<Document>,
}

impl EventRecord {
    /// The stored form, as written (built straight into BSON bytes: the append path
    /// writes these without an intermediate [`Document`]).
    pub fn to_raw(&self) -> Result<RawDocumentBuf, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            what: "event",
            id: format!("{} #{}", self.stream, self.seq),
            reason,
        };
        let mut d = RawDocumentBuf::new();
        d.append("stream", self.stream.as_str());
        d.append("seq", self.seq);
        d.append("ns", self.ns.as_str());
        d.append(
            "doc_id",
            RawBson::try_from(self.doc_id.clone()).map_err(|e| corrupt(format!("doc_id: {e}")))?,
        );
        d.append("doc_key", self.doc_key.as_str());
        d.append("from_version", self.from_version);
        d.append("to_version", self.to_version);
        d.append("op", self.op.as_str());
        d.append("patch", self.patch.as_str());
        match &self.origin {
            Some(o) => d.append("origin", o.as_str()),
            None => d.append("origin", RawBson::Null),
        }
        d.append("stamped", self.stamped);
        match self.stamp {
            Some(v) => d.append("stamp", v),
            None => d.append("stamp", RawBson::Null),
        }
        d.append("appended_at", self.appended_at);
        if let Some(t) = self.cluster_time {
            // As numbers: portable to servers and tools that cannot store Timestamps.
            let mut ct = RawDocumentBuf::new();
            ct.append("t", i64::from(t.time));
            ct.append("i", i64::from(t.increment));
            d.append("cluster_time", ct);
        }
        if let Some(t) = self.wall_time {
            d.append("wall_time", t);
        }
        if let Some(t) = &self.token {
            d.append(
                "token",
                RawDocumentBuf::from_document(t).map_err(|e| corrupt(format!("token: {e}")))?,
            );
        }
        Ok(d)
    }

    /// The stored form as a [`Document`] (the same fields as [`EventRecord::to_raw`]).
    pub fn to_document(&self) -> Result<Document, StoreError> {
        self.to_raw()?
            .to_document()
            .map_err(|e| StoreError::Corrupt {
                what: "event",
                id: format!("{} #{}", self.stream, self.seq),
                reason: e.to_string(),
            })
    }

    /// True when `other` is the same step of the same document at the same position: a
    /// replay of this event, not a conflicting one.
    pub fn same_content(&self, other: &EventRecord) -> bool {
        self.stream == other.stream
            && self.seq == other.seq
            && self.ns == other.ns
            && self.doc_key == other.doc_key
            && self.from_version == other.from_version
            && self.to_version == other.to_version
            && self.op == other.op
            && self.patch == other.patch
    }

    /// Reads the stored form.
    pub fn from_document(d: &Document) -> Result<Self, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            what: "event",
            id: format!("{:?}", d.get("_id")),
            reason,
        };
        let s = |k: &str| {
            d.get_str(k)
                .map(str::to_owned)
                .map_err(|e| corrupt(format!("{k}: {e}")))
        };
        let i =
            |k: &str| super::get_int(d, k).ok_or_else(|| corrupt(format!("{k}: not an integer")));
        Ok(Self {
            stream: s("stream")?,
            seq: i("seq")?,
            ns: s("ns")?,
            doc_id: d
                .get("doc_id")
                .cloned()
                .ok_or_else(|| corrupt("doc_id missing".into()))?,
            doc_key: s("doc_key")?,
            from_version: i("from_version")?,
            to_version: i("to_version")?,
            op: Operation::parse(&s("op")?).ok_or_else(|| corrupt("unknown op".into()))?,
            patch: s("patch")?,
            origin: d.get_str("origin").ok().map(str::to_owned),
            stamped: super::get_flag(d, "stamped").unwrap_or(true),
            stamp: super::get_int(d, "stamp"),
            cluster_time: match d.get("cluster_time") {
                Some(Bson::Timestamp(t)) => Some(*t),
                Some(Bson::Document(ct)) => {
                    match (super::get_int(ct, "t"), super::get_int(ct, "i")) {
                        (Some(t), Some(i)) => Some(Timestamp {
                            time: t as u32,
                            increment: i as u32,
                        }),
                        _ => None,
                    }
                }
                _ => None,
            },
            wall_time: d.get_datetime("wall_time").ok().copied(),
            appended_at: d
                .get_datetime("appended_at")
                .ok()
                .copied()
                .unwrap_or_else(DateTime::now),
            token: d.get_document("token").ok().cloned(),
        })
    }
}

impl Store {
    /// The highest position in a stream's log (0 when empty).
    pub async fn last_seq(&self, stream: &str) -> Result<i64, StoreError> {
        let last = self
            .events()
            .find_one(doc! { "stream": stream })
            .sort(doc! { "seq": -1 })
            .projection(doc! { "seq": 1 })
            .await?;
        Ok(last.and_then(|d| super::get_int(&d, "seq")).unwrap_or(0))
    }

    /// Events of a stream after a position, in order.
    pub async fn events_after(
        &self,
        stream: &str,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<EventRecord>, StoreError> {
        self.find_events(
            doc! { "stream": stream, "seq": { "$gt": after_seq } },
            doc! { "seq": 1 },
            limit,
        )
        .await
    }

    /// Events matching a filter, sorted, at most `limit`.
    pub async fn find_events(
        &self,
        filter: Document,
        sort: Document,
        limit: i64,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let cursor = self
            .events()
            .find(filter)
            .with_options(FindOptions::builder().sort(sort).limit(limit).build())
            .await?;
        let docs: Vec<Document> = cursor.try_collect().await?;
        docs.iter().map(EventRecord::from_document).collect()
    }
}
