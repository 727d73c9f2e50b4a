//! The seam between the pipeline and its storage: everything the log path reads and
//! writes goes through [`LogStore`]. [`crate::mongo::Store`] implements it over MongoDB;
//! [`super::memory_store::MemoryStore`] implements it in memory, so unit tests can stop the
//! pipeline between any two writes and interleave two lease holders step by step.
//!
//! # How each write of the log path is guarded
//!
//! A holder that wakes after a takeover (a GC pause, a partition) must not be able to move
//! anything backwards nor add an event that conflicts in content with one already there.
//! Every write is guarded by its own mechanism, in the store itself — not by a check made
//! before it, which a pause could separate from the write:
//!
//! | write | guard |
//! |---|---|
//! | events ([`LogStore::append_events`]) | unique `(stream, seq)`, `(ns, doc_key, to_version)` and `(ns, doc_key, from_version)`: positions stay dense and a document's chain cannot branch; a clash is a replay only when the stored event at that position is the same in content, otherwise [`StoreError::Fenced`]. An event a stale holder gets in can therefore only continue the chain from its end, from a state the log holds — the next holder is fenced by it, recovers it and goes on |
//! | shadows ([`LogStore::save_shadows`]) | monotonic: stored only over a lower log version (`version < new`), so a shadow never moves backwards |
//! | checkpoint ([`LogStore::save_checkpoint`]) | epoch-conditional and monotonic: only by the lease epoch that stored it last or a newer one, and never to a lower position |
//! | dead letters ([`LogStore::dead_letter`]) | idempotent: keyed by stream and change (resume token), so a replay or a stale holder writes the same record once |
//! | leases ([`LogStore::acquire_lease`], [`LogStore::renew_lease`]) | compare-and-swap on holder, epoch and expiry |
//! | heartbeats ([`LogStore::heartbeat`]) | none needed: a replica writes only its own document, and the balance read from them only decides *whether to try* a lease — who consumes is still decided by the lease CAS above |
//!
//! Snapshots (compaction) move only forward by compare-and-swap on their version.
//! In addition, the appender stops before a write once its [`super::append::LeaseGuard`]
//! reports the lease lost — a fast path, not the guarantee.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use bson::{Bson, Document, RawDocumentBuf};

use super::version::{LogVersion, Stamp};
use crate::client::StampFields;
use crate::mongo::checkpoints::Checkpoint;
use crate::mongo::events::EventRecord;
use crate::mongo::lease::Held;
use crate::mongo::membership::LeaseView;
use crate::mongo::shadows::Shadow;
use crate::mongo::StoreError;

/// A shadow ready to store: its encoded record (made once, also to measure its size).
#[derive(Debug, Clone)]
pub struct ShadowWrite {
    /// The document key.
    pub doc_key: String,
    /// Its log version (the monotonic guard compares it).
    pub version: LogVersion,
    /// The stored form, from [`crate::mongo::shadows::shadow_record`].
    pub record: RawDocumentBuf,
}

/// What a re-read compares: a shadow without its document body.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowSummary {
    /// The document `_id`.
    pub doc_id: Bson,
    /// The stamp in the shadow's state.
    pub stamp: Option<Stamp>,
    /// The log's last event deleted the document.
    pub deleted: bool,
}

/// A change that could not become an event.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The document `_id`, when known.
    pub doc_id: Option<Bson>,
    /// The change's resume token, when it has one (the record's identity).
    pub token: Option<Document>,
    /// Short reason (a metric label).
    pub reason: String,
    /// Details for the operator.
    pub detail: String,
}

/// The storage the pipeline needs. All methods are safe to retry.
pub trait LogStore: Clone + Send + Sync + 'static {
    /// A stream's checkpoint.
    fn load_checkpoint(
        &self,
        stream: &str,
    ) -> impl Future<Output = Result<Option<Checkpoint>, StoreError>> + Send;

    /// Stores a checkpoint unless a newer lease epoch stored one or the stored one is at a
    /// later position: [`StoreError::Fenced`].
    fn save_checkpoint(
        &self,
        stream: &str,
        epoch: i64,
        checkpoint: &Checkpoint,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Appends events in order (see the table above for the guard).
    fn append_events(
        &self,
        events: &[EventRecord],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Events of a stream after a position, in order, at most `limit`.
    fn events_after(
        &self,
        stream: &str,
        after_seq: i64,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<EventRecord>, StoreError>> + Send;

    /// The highest position in a stream's log (0 when empty).
    fn last_seq(&self, stream: &str) -> impl Future<Output = Result<i64, StoreError>> + Send;

    /// Shadows of some documents, by key.
    fn load_shadows(
        &self,
        stream: &str,
        keys: &[String],
    ) -> impl Future<Output = Result<HashMap<String, Shadow>, StoreError>> + Send;

    /// Stores shadows, each only over a lower log version.
    fn save_shadows(
        &self,
        stream: &str,
        shadows: Vec<ShadowWrite>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every shadow of a stream, without bodies, by key.
    fn shadow_summaries(
        &self,
        stream: &str,
    ) -> impl Future<Output = Result<HashMap<String, ShadowSummary>, StoreError>> + Send;

    /// Records a dead letter (idempotent per change).
    fn dead_letter(
        &self,
        stream: &str,
        epoch: i64,
        letter: &DeadLetter,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Claims a stream's lease for `holder`: `Some` with a new epoch when taken. An
    /// expired lease is taken over; so is one still held under this holder id, which
    /// belonged to this replica's previous life (a crash-restart in the same pod) or to a
    /// run of it that ended — the new epoch fences whatever that one still had in flight.
    /// Holder ids must therefore be unique among live replicas.
    fn acquire_lease(
        &self,
        stream: &str,
        holder: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<Held>, StoreError>> + Send;

    /// Extends the lease held with `epoch`; false when it is no longer ours.
    fn renew_lease(
        &self,
        stream: &str,
        holder: &str,
        epoch: i64,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Gives the lease up at once (graceful shutdown), if still held with `epoch`.
    fn release_lease(
        &self,
        stream: &str,
        holder: &str,
        epoch: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Announces `replica` (this process: `instance`) as live until `ttl` from now (see
    /// [`crate::mongo::membership`]). Returns the instance that wrote the heartbeat
    /// before, if it was still live: another instance there means two processes share
    /// the replica id.
    fn heartbeat(
        &self,
        replica: &str,
        instance: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// Withdraws `replica`'s heartbeat (graceful shutdown).
    fn leave(&self, replica: &str) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The replicas whose heartbeat has not expired, sorted.
    fn live_replicas(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Every stream's lease: its holder and whether it is live.
    fn lease_views(&self) -> impl Future<Output = Result<Vec<LeaseView>, StoreError>> + Send;
}

/// What a re-read reads: the watched collection.
pub trait SourceScan: Send + Sync {
    /// Every document's `_id` and stamp (an index-only scan where the server can).
    fn stamps(
        &self,
        fields: &StampFields,
    ) -> impl Future<Output = Result<Vec<(Bson, Option<Stamp>)>, StoreError>> + Send;

    /// The documents with these ids (those that still exist).
    fn fetch(&self, ids: &[Bson])
        -> impl Future<Output = Result<Vec<Document>, StoreError>> + Send;
}
