//! Operator controls, stored as documents in the daemon database so that any replica can
//! accept a request and the stream's lease holder acts on it.
//!
//! `controls` — one record per request (also the stream's notice history):
//!
//! ```text
//! { _id: ObjectId, stream, action: "resync"|"pause"|"resume"|"start_at",
//!   start_at?: { t?: <seconds>, i?: <increment>, token?: {...} }, reason?: <text>,
//!   requested_by, requested_at_ms: Int64,
//!   state: "pending"|"done"|"failed", done_at_ms?, holder?, epoch?, result? }
//! ```
//!
//! `stream_status` — one record per stream, written by the holder about once a second:
//! `{ _id: stream, holder, epoch, paused, lag_seconds, updated_at_ms, last_error?,
//! last_error_at_ms? }`.
//!
//! Times are Int64 Unix milliseconds; flags are read leniently (`get_flag`).

use bson::oid::ObjectId;
use bson::{doc, Bson, DateTime, Document, Timestamp};
use futures_util::TryStreamExt;
use mongodb::Collection;

use super::{get_flag, get_int, Store, StoreError};

/// What an operator asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlAction {
    /// Re-read the collection now, compare with the shadows, emit the differences.
    Resync,
    /// Stop appending (the lease stays held) until a resume.
    Pause,
    /// Continue after a pause.
    Resume,
    /// Restart the change stream at a cluster time or after a resume token.
    StartAt(StartPoint),
}

/// Where a stream restarts.
#[derive(Debug, Clone, PartialEq)]
pub enum StartPoint {
    /// `startAtOperationTime`.
    ClusterTime(Timestamp),
    /// `startAfter` / `resumeAfter` this token.
    Token(Document),
}

impl ControlAction {
    /// The stored name.
    pub fn name(&self) -> &'static str {
        match self {
            ControlAction::Resync => "resync",
            ControlAction::Pause => "pause",
            ControlAction::Resume => "resume",
            ControlAction::StartAt(_) => "start_at",
        }
    }
}

/// State of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlState {
    /// Waiting for the holder.
    Pending,
    /// Carried out.
    Done,
    /// Refused or failed (see `result`).
    Failed,
}

impl ControlState {
    fn name(self) -> &'static str {
        match self {
            ControlState::Pending => "pending",
            ControlState::Done => "done",
            ControlState::Failed => "failed",
        }
    }
}

/// One stored request.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlRecord {
    /// Its id.
    pub id: ObjectId,
    /// The stream.
    pub stream: String,
    /// What.
    pub action: ControlAction,
    /// Why (free text, e.g. "redrive of dead letter …").
    pub reason: Option<String>,
    /// Who asked (a principal label).
    pub requested_by: String,
    /// When, Unix ms.
    pub requested_at_ms: i64,
    /// Where it stands.
    pub state: ControlState,
    /// When carried out, Unix ms.
    pub done_at_ms: Option<i64>,
    /// The replica that carried it out.
    pub holder: Option<String>,
    /// What happened.
    pub result: Option<String>,
}

fn corrupt(id: &Document, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        what: "controls",
        id: id.get("_id").map(|v| v.to_string()).unwrap_or_default(),
        reason: reason.into(),
    }
}

impl ControlRecord {
    fn from_document(d: &Document) -> Result<Self, StoreError> {
        let id = d
            .get_object_id("_id")
            .map_err(|_| corrupt(d, "_id is not an ObjectId"))?;
        let action = match d.get_str("action").map_err(|_| corrupt(d, "no action"))? {
            "resync" => ControlAction::Resync,
            "pause" => ControlAction::Pause,
            "resume" => ControlAction::Resume,
            "start_at" => {
                let at = d
                    .get_document("start_at")
                    .map_err(|_| corrupt(d, "start_at without a point"))?;
                match (get_int(at, "t"), at.get_document("token")) {
                    (Some(t), _) => ControlAction::StartAt(StartPoint::ClusterTime(Timestamp {
                        time: u32::try_from(t)
                            .map_err(|_| corrupt(d, "start_at.t out of range"))?,
                        increment: u32::try_from(get_int(at, "i").unwrap_or(0))
                            .map_err(|_| corrupt(d, "start_at.i out of range"))?,
                    })),
                    (_, Ok(t)) => ControlAction::StartAt(StartPoint::Token(t.clone())),
                    _ => return Err(corrupt(d, "start_at without a point")),
                }
            }
            other => return Err(corrupt(d, format!("unknown action {other:?}"))),
        };
        let state = match d.get_str("state").unwrap_or("pending") {
            "done" => ControlState::Done,
            "failed" => ControlState::Failed,
            _ => ControlState::Pending,
        };
        Ok(Self {
            id,
            stream: d.get_str("stream").unwrap_or_default().to_owned(),
            action,
            reason: d.get_str("reason").ok().map(str::to_owned),
            requested_by: d.get_str("requested_by").unwrap_or_default().to_owned(),
            requested_at_ms: get_int(d, "requested_at_ms").unwrap_or(0),
            state,
            done_at_ms: get_int(d, "done_at_ms"),
            holder: d.get_str("holder").ok().map(str::to_owned),
            result: d.get_str("result").ok().map(str::to_owned),
        })
    }
}

/// The holder's view of a stream, as last reported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatusRecord {
    /// The replica consuming it.
    pub holder: Option<String>,
    /// Its lease epoch.
    pub epoch: Option<i64>,
    /// Paused by an operator.
    pub paused: bool,
    /// Seconds behind the source at the last report.
    pub lag_seconds: Option<f64>,
    /// When reported, Unix ms.
    pub updated_at_ms: Option<i64>,
    /// The last error that stopped the stream.
    pub last_error: Option<String>,
    /// When, Unix ms.
    pub last_error_at_ms: Option<i64>,
}

/// A dead letter (a change that could not become an event).
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Its id.
    pub id: ObjectId,
    /// The record as stored.
    pub record: Document,
}

fn now_ms() -> i64 {
    DateTime::now().timestamp_millis()
}

impl Store {
    /// The controls collection.
    pub fn controls(&self) -> Collection<Document> {
        self.db.collection("controls")
    }
    /// The per-stream status collection.
    pub fn stream_status(&self) -> Collection<Document> {
        self.db.collection("stream_status")
    }

    /// Stores a request for the holder of `stream`.
    pub async fn request_control(
        &self,
        stream: &str,
        action: &ControlAction,
        reason: Option<&str>,
        requested_by: &str,
    ) -> Result<ControlRecord, StoreError> {
        let id = ObjectId::new();
        let mut d = doc! {
            "_id": id,
            "stream": stream,
            "action": action.name(),
            "requested_by": requested_by,
            "requested_at_ms": now_ms(),
            "state": ControlState::Pending.name(),
        };
        if let Some(r) = reason {
            d.insert("reason", r);
        }
        if let ControlAction::StartAt(p) = action {
            d.insert(
                "start_at",
                match p {
                    // Stored as two integers: not every server stores a Timestamp.
                    StartPoint::ClusterTime(t) => {
                        doc! { "t": i64::from(t.time), "i": i64::from(t.increment) }
                    }
                    StartPoint::Token(t) => doc! { "token": t.clone() },
                },
            );
        }
        self.controls().insert_one(d.clone()).await?;
        ControlRecord::from_document(&d)
    }

    /// The oldest pending request of `stream`.
    pub async fn next_control(&self, stream: &str) -> Result<Option<ControlRecord>, StoreError> {
        let d = self
            .controls()
            .find_one(doc! { "stream": stream, "state": "pending" })
            .sort(doc! { "requested_at_ms": 1 })
            .await?;
        d.as_ref().map(ControlRecord::from_document).transpose()
    }

    /// Marks a pending request carried out (or failed). False when it was no longer
    /// pending (another holder finished it).
    pub async fn finish_control(
        &self,
        id: ObjectId,
        holder: &str,
        epoch: i64,
        ok: bool,
        result: &str,
    ) -> Result<bool, StoreError> {
        let state = if ok {
            ControlState::Done
        } else {
            ControlState::Failed
        };
        let r = self
            .controls()
            .update_one(
                doc! { "_id": id, "state": "pending" },
                doc! { "$set": { "state": state.name(), "done_at_ms": now_ms(), "holder": holder, "epoch": epoch, "result": result } },
            )
            .await?;
        Ok(r.modified_count > 0)
    }

    /// Requests, newest first; of one stream when given.
    pub async fn list_controls(
        &self,
        stream: Option<&str>,
        limit: i64,
    ) -> Result<Vec<ControlRecord>, StoreError> {
        let filter = match stream {
            Some(s) => doc! { "stream": s },
            None => doc! {},
        };
        let docs: Vec<Document> = self
            .controls()
            .find(filter)
            .sort(doc! { "requested_at_ms": -1 })
            .limit(limit)
            .await?
            .try_collect()
            .await?;
        docs.iter().map(ControlRecord::from_document).collect()
    }

    /// One request.
    pub async fn get_control(&self, id: ObjectId) -> Result<Option<ControlRecord>, StoreError> {
        let d = self.controls().find_one(doc! { "_id": id }).await?;
        d.as_ref().map(ControlRecord::from_document).transpose()
    }

    /// Whether the last carried-out pause/resume of `stream` was a pause.
    pub async fn paused(&self, stream: &str) -> Result<bool, StoreError> {
        let d = self
            .controls()
            .find_one(doc! { "stream": stream, "state": "done", "action": { "$in": ["pause", "resume"] } })
            .sort(doc! { "done_at_ms": -1 })
            .await?;
        Ok(d.is_some_and(|d| d.get_str("action") == Ok("pause")))
    }

    /// The holder's report on `stream`.
    pub async fn save_status(&self, stream: &str, s: &StatusRecord) -> Result<(), StoreError> {
        let mut set = doc! { "paused": s.paused, "updated_at_ms": now_ms() };
        if let Some(h) = &s.holder {
            set.insert("holder", h);
        }
        if let Some(e) = s.epoch {
            set.insert("epoch", e);
        }
        if let Some(l) = s.lag_seconds {
            set.insert("lag_seconds", l);
        }
        self.stream_status()
            .update_one(doc! { "_id": stream }, doc! { "$set": set })
            .upsert(true)
            .await?;
        Ok(())
    }

    /// Records the error that stopped a stream run.
    pub async fn save_stream_error(
        &self,
        stream: &str,
        holder: &str,
        error: &str,
    ) -> Result<(), StoreError> {
        self.stream_status()
            .update_one(
                doc! { "_id": stream },
                doc! { "$set": { "last_error": error, "last_error_at_ms": now_ms(), "last_error_holder": holder } },
            )
            .upsert(true)
            .await?;
        Ok(())
    }

    /// The last report on `stream`.
    pub async fn load_status(&self, stream: &str) -> Result<StatusRecord, StoreError> {
        let Some(d) = self
            .stream_status()
            .find_one(doc! { "_id": stream })
            .await?
        else {
            return Ok(StatusRecord::default());
        };
        Ok(StatusRecord {
            holder: d.get_str("holder").ok().map(str::to_owned),
            epoch: get_int(&d, "epoch"),
            paused: get_flag(&d, "paused").unwrap_or(false),
            lag_seconds: match d.get("lag_seconds") {
                Some(Bson::Double(v)) => Some(*v),
                _ => get_int(&d, "lag_seconds").map(|v| v as f64),
            },
            updated_at_ms: get_int(&d, "updated_at_ms"),
            last_error: d.get_str("last_error").ok().map(str::to_owned),
            last_error_at_ms: get_int(&d, "last_error_at_ms"),
        })
    }

    /// The raw lease record of `stream` (holder, epoch, expiry), if any.
    pub async fn lease_record(&self, stream: &str) -> Result<Option<Document>, StoreError> {
        Ok(self.leases().find_one(doc! { "_id": stream }).await?)
    }

    /// Dead letters, oldest first, of one stream when given, after `after` (an id).
    pub async fn list_dead_letters(
        &self,
        stream: Option<&str>,
        after: Option<ObjectId>,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let mut filter = doc! {};
        if let Some(s) = stream {
            filter.insert("stream", s);
        }
        if let Some(a) = after {
            filter.insert("_id", doc! { "$gt": a });
        }
        let docs: Vec<Document> = self
            .dead_letters()
            .find(filter)
            .sort(doc! { "_id": 1 })
            .limit(limit)
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .into_iter()
            .filter_map(|d| {
                let id = d.get_object_id("_id").ok()?;
                Some(DeadLetter { id, record: d })
            })
            .collect())
    }

    /// One dead letter.
    pub async fn get_dead_letter(&self, id: ObjectId) -> Result<Option<DeadLetter>, StoreError> {
        let d = self.dead_letters().find_one(doc! { "_id": id }).await?;
        Ok(d.map(|record| DeadLetter { id, record }))
    }

    /// Notes on a dead letter that a re-drive was requested (by control `control`).
    pub async fn mark_redrive(&self, id: ObjectId, control: ObjectId) -> Result<(), StoreError> {
        self.dead_letters()
            .update_one(
                doc! { "_id": id },
                doc! { "$set": { "redrive_control": control, "redrive_requested_at_ms": now_ms() } },
            )
            .await?;
        Ok(())
    }
}
