//! The lease holder's side of operator controls ([`crate::mongo::controls`]): the worker
//! polls [`Controls::poll`] about once a second (never per batch) and obeys the
//! [`Reaction`]; pausing is a state the worker reads with [`Controls::paused`].
//!
//! * pause / resume — the worker ends its run and holds the stream in
//!   [`hold_while_paused`]: no change stream is open (so the paused stream pins nothing on
//!   the server), the lease keeps being renewed, the status reported and controls carried
//!   out. On resume the run re-opens the stream from the checkpoint: no change is skipped.
//!   The state survives a takeover (the last carried-out pause/resume is read at start).
//! * re-read — the checkpoint is flagged `resync_pending` and the worker re-opens the
//!   stream: the collection is compared with the shadows and only differences become
//!   events (the same path as after history loss), then live reading continues from the
//!   checkpoint's resume token.
//! * start-at — the checkpoint's resume token is replaced by the requested one (or, for a
//!   cluster time, by the token of a change stream opened `startAtOperationTime` there) and
//!   the worker re-opens the stream from it. Changes before that point that the log lacks
//!   are not read (the operator's choice); replaying earlier ones is harmless (idempotent).
//!
//! Every control is recorded (the `controls` collection doubles as the stream's notice
//! history, shown to clients by `GET /v1/streams/{stream}`) and counted in
//! `eventsync_admin_actions_total`.

use std::time::Duration;

use bson::{DateTime, Document, RawDocumentBuf};
use mongodb::options::FullDocumentType;
use mongodb::Collection;
use tracing::{info, warn};

use crate::mongo::checkpoints::Checkpoint;
use crate::mongo::controls::{ControlAction, ControlRecord, StartPoint, StatusRecord};
use crate::mongo::{Store, StoreError};
use crate::ops::metrics;

/// How often the worker polls for controls.
pub const POLL: Duration = Duration::from_secs(1);

/// What the worker must do after a poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaction {
    /// Keep going (paused or not: see [`Controls::paused`]).
    Continue,
    /// The checkpoint was changed: end this run and re-open the stream (the supervisor
    /// restarts at once, as after a collection drop).
    Reopen(&'static str),
}

/// The oldest pending control of `stream`.
pub async fn pending(store: &Store, stream: &str) -> Result<Option<ControlRecord>, StoreError> {
    store.next_control(stream).await
}

/// Marks `rec` carried out (`ok`) or failed, and counts it.
pub async fn done(
    store: &Store,
    rec: &ControlRecord,
    holder: &str,
    epoch: i64,
    ok: bool,
    result: &str,
) -> Result<(), StoreError> {
    store
        .finish_control(rec.id, holder, epoch, ok, result)
        .await?;
    metrics()
        .admin_actions
        .with_label_values(&[
            rec.stream.as_str(),
            rec.action.name(),
            if ok { "done" } else { "failed" },
        ])
        .inc();
    info!(stream = %rec.stream, action = rec.action.name(), ok, %result, "operator control carried out");
    Ok(())
}

/// Records the error that ended a stream run (for `GET /v1/admin/streams/{stream}`);
/// failures to record are logged and counted, never raised.
pub async fn record_error(
    store: &Store,
    stream: &str,
    holder: &str,
    error: &(dyn std::fmt::Display + Sync),
) {
    let text = error.to_string();
    if let Err(e) = store.save_stream_error(stream, holder, &text).await {
        metrics().error("control", e.kind());
        warn!(%stream, error = %e, "cannot record the stream's last error");
    }
}

/// How [`hold_while_paused`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Not paused (any more): run the stream (re-reading the checkpoint).
    Run,
    /// Shutdown was requested.
    Shutdown,
}

/// `run_owned` hook: while an operator paused the stream, hold it without a change stream
/// — report the status and carry out controls (resume, re-read, start-at) once a second —
/// and return when it may run. The worker's renewer keeps the lease meanwhile and drops
/// the run if it is lost.
pub async fn hold_while_paused(
    store: &Store,
    stream: &str,
    holder: &str,
    epoch: i64,
    source: &Collection<Document>,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> Hold {
    let mut controls = Controls::start(store, stream, holder, epoch, source).await;
    if !controls.paused() {
        return Hold::Run;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return Hold::Shutdown;
        }
        let checkpoint = match store.load_checkpoint(stream).await {
            Ok(cp) => cp.unwrap_or(Checkpoint {
                token: None,
                seq: 0,
                resync_pending: false,
                updated_at: DateTime::now(),
            }),
            Err(e) => {
                metrics().error("control", e.kind());
                continue;
            }
        };
        let reaction = controls.poll(&checkpoint).await;
        if !controls.paused() {
            return Hold::Run;
        }
        if let Reaction::Reopen(why) = reaction {
            info!(%stream, why, "checkpoint changed while paused; still paused");
        }
    }
}

/// Controls state of one stream run on the lease holder.
pub struct Controls {
    store: Store,
    stream: String,
    holder: String,
    epoch: i64,
    source: Collection<Document>,
    paused: bool,
    /// The pause state and time of the last status report (reported every
    /// [`STATUS_EVERY`] and at every change of the pause state).
    reported: Option<(bool, std::time::Instant)>,
}

/// How often the holder reports a stream's status when nothing changes.
pub const STATUS_EVERY: Duration = Duration::from_secs(5);

impl Controls {
    /// Loads the pause state (a pause survives a takeover). A storage failure is logged
    /// and counted and leaves the stream running.
    pub async fn start(
        store: &Store,
        stream: &str,
        holder: &str,
        epoch: i64,
        source: &Collection<Document>,
    ) -> Self {
        let paused = match store.paused(stream).await {
            Ok(p) => p,
            Err(e) => {
                metrics().error("control", e.kind());
                warn!(%stream, error = %e, "cannot read the stream's pause state; running");
                false
            }
        };
        if paused {
            info!(%stream, "stream paused by an operator; waiting for a resume");
        }
        metrics()
            .stream_paused
            .with_label_values(&[stream])
            .set(i64::from(paused));
        Self {
            store: store.clone(),
            stream: stream.to_owned(),
            holder: holder.to_owned(),
            epoch,
            source: source.clone(),
            paused,
            reported: None,
        }
    }

    /// True while an operator paused the stream: take no changes.
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// Reports the stream's status and carries out the oldest pending control. Never fails:
    /// storage errors are logged and counted, and retried at the next poll.
    pub async fn poll(&mut self, checkpoint: &Checkpoint) -> Reaction {
        match self.poll_inner(checkpoint).await {
            Ok(r) => r,
            Err(e) => {
                metrics().error("control", e.kind());
                warn!(stream = %self.stream, error = %e, "operator controls unavailable; retrying");
                Reaction::Continue
            }
        }
    }

    async fn poll_inner(&mut self, checkpoint: &Checkpoint) -> Result<Reaction, StoreError> {
        let m = metrics();
        self.report().await?;
        let Some(rec) = pending(&self.store, &self.stream).await? else {
            return Ok(Reaction::Continue);
        };
        match &rec.action {
            ControlAction::Pause | ControlAction::Resume => {
                let pause = rec.action == ControlAction::Pause;
                let result = match (self.paused, pause) {
                    (true, true) => "already paused",
                    (false, false) => "was not paused",
                    (false, true) => "paused",
                    (true, false) => "resumed",
                };
                let newly_paused = pause && !self.paused;
                self.paused = pause;
                m.stream_paused
                    .with_label_values(&[&self.stream])
                    .set(i64::from(pause));
                done(&self.store, &rec, &self.holder, self.epoch, true, result).await?;
                self.report().await?;
                if newly_paused {
                    // End the run: hold_while_paused keeps the stream without a cursor.
                    return Ok(Reaction::Reopen("operator pause"));
                }
                Ok(Reaction::Continue)
            }
            ControlAction::Resync => {
                let cp = Checkpoint {
                    resync_pending: true,
                    updated_at: DateTime::now(),
                    ..checkpoint.clone()
                };
                self.store
                    .save_checkpoint(&self.stream, self.epoch, &cp)
                    .await?;
                m.resyncs
                    .with_label_values(&[&self.stream, "operator"])
                    .inc();
                done(
                    &self.store,
                    &rec,
                    &self.holder,
                    self.epoch,
                    true,
                    "re-read started",
                )
                .await?;
                Ok(Reaction::Reopen("operator re-read"))
            }
            ControlAction::StartAt(point) => {
                let token = match point {
                    StartPoint::Token(t) => Ok(t.clone()),
                    StartPoint::ClusterTime(ts) => self.token_at(*ts).await,
                };
                let token = match token {
                    Ok(t) => t,
                    Err(why) => {
                        done(&self.store, &rec, &self.holder, self.epoch, false, &why).await?;
                        return Ok(Reaction::Continue);
                    }
                };
                let cp = Checkpoint {
                    token: Some(token),
                    resync_pending: false,
                    updated_at: DateTime::now(),
                    ..checkpoint.clone()
                };
                self.store
                    .save_checkpoint(&self.stream, self.epoch, &cp)
                    .await?;
                done(
                    &self.store,
                    &rec,
                    &self.holder,
                    self.epoch,
                    true,
                    "stream restarted at the requested point",
                )
                .await?;
                Ok(Reaction::Reopen("operator start-at"))
            }
        }
    }

    /// Reports the status when the pause state changed or [`STATUS_EVERY`] passed.
    async fn report(&mut self) -> Result<(), StoreError> {
        let due = match self.reported {
            None => true,
            Some((paused, at)) => paused != self.paused || at.elapsed() >= STATUS_EVERY,
        };
        if !due {
            return Ok(());
        }
        let lag = metrics()
            .change_stream_lag
            .get_metric_with_label_values(&[&self.stream])
            .ok()
            .map(|g| g.get());
        self.store
            .save_status(
                &self.stream,
                &StatusRecord {
                    holder: Some(self.holder.clone()),
                    epoch: Some(self.epoch),
                    paused: self.paused,
                    lag_seconds: lag,
                    ..StatusRecord::default()
                },
            )
            .await?;
        self.reported = Some((self.paused, std::time::Instant::now()));
        Ok(())
    }

    /// The resume token of a change stream opened at cluster time `ts` (its
    /// post-batch resume token, before any event is read).
    async fn token_at(&self, ts: bson::Timestamp) -> Result<Document, String> {
        let stream = self
            .source
            .watch()
            .full_document(FullDocumentType::UpdateLookup)
            .start_at_operation_time(ts)
            .batch_size(0)
            .await
            .map_err(|e| {
                metrics().error("control", "start_at_open");
                warn!(stream = %self.stream, error = %e, "cannot open a change stream at the requested time");
                "cannot open a change stream at that time (see the daemon log)".to_owned()
            })?;
        let stream = stream.with_type::<RawDocumentBuf>();
        stream
            .resume_token()
            .as_ref()
            .and_then(crate::mongo::change_stream::token_to_document)
            .ok_or_else(|| "the server returned no resume token for that time".to_owned())
    }
}
