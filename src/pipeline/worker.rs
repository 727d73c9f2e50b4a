//! One stream on this replica: stand by until the lease is ours, then recover, (re)sync if
//! needed, and run source → transform → append until shutdown, a lost lease or an error
//! (after which it starts again from the checkpoint).
//!
//! The lease is renewed from the moment it is taken — through recovery and re-reads, not
//! only live — by a task that runs beside the whole run; when it is lost, the run is
//! dropped at once (wherever it is: every point between two writes is safe, see
//! [`super::store`]) and the appender's [`LeaseGuard`] refuses further writes.
//!
//! Balance ([`super::balance`]): the lease is only tried while the [`Balancer`] gives this
//! replica a slot (under its fair share, or a stream left free past the grace), and
//! between two batches a run over the share hands its stream over: it returns once the
//! batch and its checkpoint are stored, and only then is the lease released.

use std::sync::Arc;
use std::time::Duration;

use bson::{DateTime, Document};
use mongodb::Collection;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, info_span, warn, Instrument};

use super::append::{Appender, BatchStats, Committer, LeaseGuard, Phase, Prepared};
use super::balance::{Balancer, Claim};
use super::publish::Publisher;
use super::recovery::recover;
use super::resync::resync;
use super::source::{self, Item, SourceError};
use super::store::{DeadLetter, LogStore};
use super::transform::{DocChange, Observed};
use super::{Partition, PipelineConfig};
use crate::client::StampFields;
use crate::mongo::change_stream::{self, is_history_lost, ChangeKind};
use crate::mongo::lease::LeaseConfig;
use crate::mongo::log_store::ScopedSource;
use crate::mongo::{doc_key, Store, StoreError};
use crate::ops::health::{Health, StreamRole};
use crate::ops::metrics;

/// Why a stream run ended.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The change stream failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Opening the change stream failed.
    #[error("cannot open change stream: {0}")]
    Open(mongodb::error::Error),
    /// The lease could not be renewed; another replica may consume now.
    #[error("lease lost")]
    LeaseLost,
    /// The collection was dropped, renamed or the stream invalidated; re-open and re-read.
    #[error("stream must be re-opened after {0}")]
    Reopen(String),
    /// The source task ended unexpectedly.
    #[error("change stream reader stopped")]
    ReaderStopped,
    /// The task writing a batch ended without a result.
    #[error("batch writer stopped")]
    CommitStopped,
}

impl WorkerError {
    fn kind(&self) -> &'static str {
        match self {
            WorkerError::Store(e) => e.kind(),
            WorkerError::Source(SourceError::HistoryLost(_)) => "history_lost",
            WorkerError::Source(SourceError::Mongo(_)) => "change_stream",
            WorkerError::Open(_) => "open",
            WorkerError::LeaseLost => "lease_lost",
            WorkerError::Reopen(_) => "reopen",
            WorkerError::ReaderStopped => "reader_stopped",
            WorkerError::CommitStopped => "commit_stopped",
        }
    }
}

/// Everything a stream needs.
#[derive(Clone)]
pub struct StreamWorker {
    /// `db.collection`, or `db.collection#p/P` for a partition.
    pub name: String,
    /// The partition of the collection this stream covers (`None`: all of it).
    pub partition: Option<Partition>,
    /// The watched collection.
    pub source: Collection<Document>,
    /// The daemon database.
    pub store: Store,
    /// Stamp field names.
    pub fields: StampFields,
    /// Pipeline bounds.
    pub pipeline: PipelineConfig,
    /// Lease timing.
    pub lease: LeaseConfig,
    /// This replica's id.
    pub holder: String,
    /// Wakes live readers.
    pub publisher: Publisher,
    /// Health state.
    pub health: Arc<Health>,
    /// This replica's share of the streams.
    pub balancer: Arc<Balancer>,
}

/// How a run that kept its lease ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunEnd {
    /// Shutdown was requested.
    Shutdown,
    /// This replica is over its fair share: the stream is handed over.
    HandOver,
}

async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = shutdown.changed() => {}
    }
}

impl StreamWorker {
    /// The change stream's `$match` of a partition: its documents' events only.
    fn events_filter(&self) -> Option<Document> {
        self.partition.map(|p| p.filter("$documentKey._id"))
    }

    /// Runs until `shutdown` turns true; then stores the checkpoint and releases the lease.
    pub async fn supervise(self, mut shutdown: watch::Receiver<bool>) {
        let span = info_span!("stream", stream = %self.name);
        async move {
            let m = metrics();
            let base = Duration::from_millis(self.pipeline.restart_backoff_ms);
            let mut backoff = base;
            self.health.set_role(&self.name, StreamRole::Starting);
            while !*shutdown.borrow() {
                // Counted in this replica's share from the attempt until the lease is
                // released (dropped at the end of the iteration).
                let Some(slot) = self.balancer.claim(&self.name) else {
                    self.health.set_role(&self.name, StreamRole::StandingBy);
                    sleep_or_shutdown(self.lease.renew(), &mut shutdown).await;
                    continue;
                };
                match self.store.acquire_lease(&self.name, &self.holder, self.lease.ttl()).await {
                    Ok(Some(held)) => {
                        info!(epoch = held.epoch, holder = %self.holder, claim = ?slot.claim, "lease acquired; consuming");
                        if slot.claim == Claim::Orphaned {
                            m.rebalances.with_label_values(&["orphan_taken"]).inc();
                        }
                        m.lease_held.with_label_values(&[&self.name]).set(1);
                        m.lease_acquired.with_label_values(&[&self.name]).inc();
                        self.health.set_role(&self.name, StreamRole::Consuming);
                        // Renewed from now on, whatever the run is doing.
                        let (lost_tx, mut lost_rx) = watch::channel(false);
                        let guard = LeaseGuard::new(held.epoch, lost_rx.clone());
                        let renewer = AbortOnDrop(tokio::spawn(renew_lease(
                            self.store.clone(),
                            self.name.clone(),
                            self.holder.clone(),
                            self.lease.clone(),
                            held.epoch,
                            lost_tx,
                        )));
                        let result = tokio::select! {
                            r = self.run_owned(guard, &mut shutdown) => r,
                            _ = lost_rx.wait_for(|lost| *lost) => Err(WorkerError::LeaseLost),
                        };
                        drop(renewer);
                        m.lease_held.with_label_values(&[&self.name]).set(0);
                        match result {
                            Ok(end) => {
                                // The run has stopped writing: only now is the lease let go.
                                if let Err(e) = self.store.release_lease(&self.name, &self.holder, held.epoch).await {
                                    m.error("lease", e.kind());
                                    warn!(error = %e, "could not release the lease; it expires on its own");
                                }
                                if end == RunEnd::Shutdown {
                                    break;
                                }
                                m.rebalances.with_label_values(&["handed_over"]).inc();
                                info!(epoch = held.epoch, held = self.balancer.held().saturating_sub(1), "over the fair share: stream handed over");
                                self.health.set_role(&self.name, StreamRole::StandingBy);
                                drop(slot);
                                sleep_or_shutdown(self.lease.renew(), &mut shutdown).await;
                                backoff = base;
                            }
                            Err(WorkerError::Reopen(why)) => {
                                warn!(%why, "re-opening the stream and re-reading the collection");
                                backoff = base;
                            }
                            Err(e) => {
                                // HOOK (operator controls): last error for the admin status.
                                super::control::record_error(&self.store, &self.name, &self.holder, &e).await;
                                m.error("stream", e.kind());
                                error!(error = %e, retry_in_ms = backoff.as_millis() as u64, "stream stopped; restarting from the checkpoint");
                                self.health.set_role(&self.name, StreamRole::Failed);
                                sleep_or_shutdown(backoff, &mut shutdown).await;
                                backoff = (backoff * 2).min(Duration::from_secs(30));
                            }
                        }
                    }
                    Ok(None) => {
                        self.health.set_role(&self.name, StreamRole::StandingBy);
                        sleep_or_shutdown(self.lease.renew(), &mut shutdown).await;
                    }
                    Err(e) => {
                        m.error("lease", e.kind());
                        warn!(error = %e, "cannot reach the lease");
                        self.health.set_role(&self.name, StreamRole::Failed);
                        sleep_or_shutdown(backoff, &mut shutdown).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
            info!("stream stopped");
        }
        .instrument(span)
        .await
    }

    /// One run while holding the lease `guard` stands for.
    async fn run_owned(
        &self,
        guard: LeaseGuard,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<RunEnd, WorkerError> {
        let m = metrics();
        // HOOK (operator controls): a paused stream is held here, without a change stream,
        // until resumed (src/pipeline/control.rs). The lease is renewed meanwhile by the
        // renewer beside the run.
        match super::control::hold_while_paused(
            &self.store,
            &self.name,
            &self.holder,
            guard.epoch(),
            &self.source,
            shutdown,
        )
        .await
        {
            super::control::Hold::Run => {}
            super::control::Hold::Shutdown => return Ok(RunEnd::Shutdown),
        }
        let stored = self.store.load_checkpoint(&self.name).await?;
        let cp = recover(&self.store, &self.name, &guard, &self.fields, stored).await?;
        let mut appender = Appender::new(
            self.store.clone(),
            self.name.clone(),
            guard,
            self.fields.clone(),
            &self.pipeline,
            self.publisher.clone(),
            cp.clone(),
        );
        let max_await = Duration::from_millis(self.pipeline.max_await_ms);
        let batch = self.pipeline.batch_size as u32;
        let (stream, reason) = match &cp.token {
            Some(token) => {
                match change_stream::open(
                    &self.source,
                    self.events_filter().as_ref(),
                    Some(token),
                    batch,
                    max_await,
                )
                .await
                {
                    Ok(s) => (s, cp.resync_pending.then_some("interrupted")),
                    Err(e) if is_history_lost(&e) => {
                        warn!(error = %e, "resume point no longer in the oplog; re-reading the collection");
                        let s = change_stream::open(
                            &self.source,
                            self.events_filter().as_ref(),
                            None,
                            batch,
                            max_await,
                        )
                        .await
                        .map_err(WorkerError::Open)?;
                        (s, Some("history_lost"))
                    }
                    Err(e) => return Err(WorkerError::Open(e)),
                }
            }
            None => {
                let s = change_stream::open(
                    &self.source,
                    self.events_filter().as_ref(),
                    None,
                    batch,
                    max_await,
                )
                .await
                .map_err(WorkerError::Open)?;
                (
                    s,
                    Some(if cp.resync_pending && cp.seq > 0 {
                        "reopened"
                    } else {
                        "initial"
                    }),
                )
            }
        };
        if let Some(reason) = reason {
            m.resyncs.with_label_values(&[&self.name, reason]).inc();
            let start = change_stream::current_token(&stream);
            info!(reason, "re-reading the collection before going live");
            appender
                .process(&[], start.clone(), Phase::Rereading)
                .await?;
            let scope = ScopedSource {
                coll: &self.source,
                filter: self.partition.map(|p| p.filter("$_id")),
            };
            resync(
                &mut appender,
                &scope,
                start,
                self.pipeline.batch_size,
                self.pipeline.resync_compare,
            )
            .await?;
        }

        let (tx, mut rx) = mpsc::channel(self.pipeline.channel_capacity);
        let budget = source::ByteBudget::new(self.pipeline.channel_bytes);
        let reader = tokio::spawn(source::run(
            self.name.clone(),
            stream,
            tx,
            Duration::from_millis(self.pipeline.idle_checkpoint_ms),
            budget.clone(),
        ));
        let _reader_guard = AbortOnDrop(reader);

        let mut pipeline = Pipeline {
            committer: appender.committer(),
            pending: None,
        };
        // HOOK (operator controls, src/pipeline/control.rs): polled once a second, not per
        // batch; a pause, re-read or start-at ends the run (Reopen), and the guard on the
        // receive below takes nothing once paused.
        let mut controls = super::control::Controls::start(
            &self.store,
            &self.name,
            &self.holder,
            appender.guard().epoch(),
            &self.source,
        )
        .await;
        let mut control_tick = tokio::time::interval(super::control::POLL);
        control_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let mut items = Vec::with_capacity(self.pipeline.batch_size);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        pipeline.finish(&mut appender).await?;
                        info!(seq = appender.checkpoint.seq, "shutting down: checkpoint stored");
                        return Ok(RunEnd::Shutdown);
                    }
                }
                // HOOK (operator controls): pause / re-read / start-at end the run and re-open.
                _ = control_tick.tick() => {
                    if let super::control::Reaction::Reopen(why) = controls.poll(&appender.checkpoint).await {
                        return Err(WorkerError::Reopen(why.into()));
                    }
                }
                n = rx.recv_many(&mut items, self.pipeline.batch_size), if !controls.paused() => {
                    if n == 0 {
                        return Err(WorkerError::ReaderStopped);
                    }
                    let drained: Vec<Item> = std::mem::take(&mut items);
                    // Large documents make smaller batches (pipeline.batch_bytes).
                    for (part, weight) in budget.split(drained, self.pipeline.batch_bytes) {
                        let batch = info_span!("batch", items = part.len(), seq = appender.checkpoint.seq);
                        self.handle(&mut appender, &mut pipeline, part).instrument(batch).await?;
                        budget.give_back(weight);
                    }
                    let age = (DateTime::now().timestamp_millis() - appender.checkpoint.updated_at.timestamp_millis()) as f64 / 1000.0;
                    m.checkpoint_age.with_label_values(&[&self.name]).set(age.max(0.0));
                    // Between two batches: once the last one and its checkpoint are stored.
                    if self.balancer.should_yield(&self.name) {
                        pipeline.finish(&mut appender).await?;
                        info!(seq = appender.checkpoint.seq, "handing the stream over: checkpoint stored");
                        return Ok(RunEnd::HandOver);
                    }
                }
            }
        }
    }

    /// Turns source items into one appended batch (plus dead letters and lifecycle events).
    async fn handle(
        &self,
        appender: &mut Appender<Store>,
        pipeline: &mut Pipeline<Store>,
        items: Vec<Item>,
    ) -> Result<(), WorkerError> {
        let m = metrics();
        let mut changes: Vec<DocChange> = Vec::with_capacity(items.len());
        let mut token: Option<Document> = None;
        let mut lag = None;
        let mut failure = None;
        let mut reopen = None;
        for item in items {
            match item {
                Item::Change(c) => {
                    if let Some(ct) = c.cluster_time {
                        let now = DateTime::now().timestamp_millis() as f64 / 1000.0;
                        lag = Some((now - f64::from(ct.time)).max(0.0));
                    }
                    token = Some(c.token.clone());
                    match c.kind {
                        ChangeKind::Insert
                        | ChangeKind::Update
                        | ChangeKind::Replace
                        | ChangeKind::Delete => {
                            let Some(id) = c.doc_id.clone() else {
                                dead(
                                    appender,
                                    Some(&c.token),
                                    None,
                                    "no_document_key",
                                    "change without documentKey._id",
                                )
                                .await?;
                                continue;
                            };
                            let full = match c.full_document {
                                Ok(d) => d,
                                Err(reason) => {
                                    dead(
                                        appender,
                                        Some(&c.token),
                                        Some(&id),
                                        "undecodable",
                                        &reason,
                                    )
                                    .await?;
                                    continue;
                                }
                            };
                            let observed = match (&c.kind, full) {
                                (ChangeKind::Delete, _) => Observed::Deleted,
                                (ChangeKind::Insert, Some(d)) => Observed::Inserted(d),
                                (ChangeKind::Replace, Some(d)) => Observed::Replaced(d),
                                (_, Some(d)) => Observed::LookedUp(d),
                                (_, None) => Observed::Gone,
                            };
                            changes.push(DocChange {
                                doc_key: doc_key(&id),
                                doc_id: id,
                                observed,
                                token: Some(c.token),
                                cluster_time: c.cluster_time,
                                wall_time: c.wall_time,
                            });
                        }
                        ChangeKind::Drop
                        | ChangeKind::Rename
                        | ChangeKind::DropDatabase
                        | ChangeKind::Invalidate => {
                            let kind = format!("{:?}", c.kind).to_lowercase();
                            m.stream_events
                                .with_label_values(&[&self.name, &kind])
                                .inc();
                            warn!(event = %kind, "collection lifecycle event");
                            reopen = Some(kind);
                            break;
                        }
                        ChangeKind::Other(op) => {
                            m.stream_events
                                .with_label_values(&[&self.name, "other"])
                                .inc();
                            info!(operation = %op, "ignoring change event without document data");
                        }
                    }
                }
                Item::Undecodable { reason, token: t } => {
                    dead(appender, t.as_ref(), None, "undecodable_event", &reason).await?;
                    if t.is_some() {
                        token = t;
                    }
                }
                Item::Idle(t) => {
                    token = Some(t);
                    lag = Some(0.0);
                }
                Item::Failed(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if !changes.is_empty() || token.is_some() {
            let stale = token.is_some() && token == appender.checkpoint.token && changes.is_empty();
            if !stale {
                // Prepared while the previous batch is written; written after it.
                let batch = appender.prepare(&changes, token, Phase::Live).await?;
                pipeline.submit(appender, batch).await?;
            }
        }
        if let Some(lag) = lag {
            m.change_stream_lag
                .with_label_values(&[&self.name])
                .set(lag);
            self.health.progress(&self.name, lag);
        }
        if reopen.is_some() || failure.is_some() {
            pipeline.finish(appender).await?;
        }
        if let Some(kind) = reopen {
            // Re-read on the next run: the collection's documents may all be gone.
            appender.require_reread().await?;
            return Err(WorkerError::Reopen(kind));
        }
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

/// Records a change that never reached the diff stage.
async fn dead<S: LogStore>(
    appender: &Appender<S>,
    token: Option<&Document>,
    id: Option<&bson::Bson>,
    reason: &'static str,
    detail: &str,
) -> Result<(), StoreError> {
    warn!(reason, %detail, "change dead-lettered");
    appender
        .dead_letter(&DeadLetter {
            doc_id: id.cloned(),
            token: token.cloned(),
            reason: reason.to_owned(),
            detail: detail.to_owned(),
        })
        .await
}

/// The append stage's pipeline: at most one batch being written while the next one is
/// prepared. Dropping it (a lost lease, shutdown of the run) aborts the write under way —
/// a stop between two writes, which the log path is built to survive.
struct Pipeline<S: LogStore> {
    committer: Committer<S>,
    pending: Option<(u64, AbortOnDrop<Result<BatchStats, StoreError>>)>,
}

impl<S: LogStore> Pipeline<S> {
    /// Waits for the batch being written, if any.
    async fn finish(&mut self, appender: &mut Appender<S>) -> Result<(), WorkerError> {
        if let Some((number, mut task)) = self.pending.take() {
            match (&mut task.0).await {
                Ok(result) => {
                    result?;
                }
                Err(_) => return Err(WorkerError::CommitStopped),
            }
            appender.confirm(number);
        }
        Ok(())
    }

    /// Writes `batch` after the one before it.
    async fn submit(
        &mut self,
        appender: &mut Appender<S>,
        batch: Prepared,
    ) -> Result<(), WorkerError> {
        self.finish(appender).await?;
        let committer = self.committer.clone();
        let number = batch.number();
        let task = tokio::spawn(async move { committer.commit(batch).await });
        self.pending = Some((number, AbortOnDrop(task)));
        Ok(())
    }
}

struct AbortOnDrop<T = ()>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Renews the lease; reports loss when a renewal finds it taken or errors outlast the TTL.
async fn renew_lease<S: LogStore>(
    store: S,
    stream: String,
    holder: String,
    lease: LeaseConfig,
    epoch: i64,
    lost: watch::Sender<bool>,
) {
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(lease.renew()).await;
        match store
            .renew_lease(&stream, &holder, epoch, lease.ttl())
            .await
        {
            Ok(true) => last_ok = tokio::time::Instant::now(),
            Ok(false) => {
                warn!(%stream, epoch, "lease taken by another replica");
                let _ = lost.send(true);
                return;
            }
            Err(e) => {
                metrics().error("lease", e.kind());
                // Stop before the lease can lapse and another replica starts.
                if last_ok.elapsed() + lease.renew() >= lease.ttl() {
                    warn!(%stream, error = %e, "cannot renew the lease; stopping before it expires");
                    let _ = lost.send(true);
                    return;
                }
            }
        }
    }
}
