//! The append stage: turns a batch of changes into events (through the diff stage), then
//! writes them in the order that makes a crash harmless — dead letters, events, shadows,
//! then the checkpoint — and wakes the publishers. Every write goes through
//! [`LogStore`], whose guards (see [`super::store`]) keep a holder that lost its lease
//! from moving anything backwards or adding a conflicting event.

use std::collections::HashMap;
use std::time::Instant;

use bson::{DateTime, Document};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::publish::Publisher;
use super::shadow_cache::ShadowCache;
use super::store::{DeadLetter, LogStore, ShadowWrite};
use super::transform::{step, DocChange, Outcome};
use super::PipelineConfig;
use crate::client::StampFields;
use crate::mongo::checkpoints::Checkpoint;
use crate::mongo::events::EventRecord;
use crate::mongo::shadows::{shadow_record, Shadow, MAX_SHADOW_RECORD_BYTES};
use crate::mongo::StoreError;
use crate::ops::metrics;

/// The lease a writer holds: its epoch, and a signal that turns true once the lease is
/// lost (renewal failed or another replica took it). The appender stops before its next
/// write when it is lost; the store's own guards cover a write already under way.
#[derive(Debug, Clone)]
pub struct LeaseGuard {
    epoch: i64,
    lost: watch::Receiver<bool>,
}

impl LeaseGuard {
    /// A guard for the lease held with `epoch`, lost once `lost` turns true.
    pub fn new(epoch: i64, lost: watch::Receiver<bool>) -> Self {
        Self { epoch, lost }
    }

    /// The lease epoch.
    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// True once the lease is known to be lost.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// `Err(Fenced)` once the lease is known to be lost.
    pub fn check(&self, stream: &str) -> Result<(), StoreError> {
        if self.is_lost() {
            return Err(StoreError::Fenced(stream.to_owned()));
        }
        Ok(())
    }
}

/// Whether a batch belongs to a re-read of the collection (stored in the checkpoint so an
/// interrupted re-read starts again after a crash).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Following the change stream.
    Live,
    /// Re-reading the collection (initial sync, history lost, lifecycle event).
    Rereading,
}

/// Appends batches for one stream while this replica holds its lease.
///
/// A batch goes through two steps: [`Appender::prepare`] decides its events and shadows
/// (reads and CPU only), and a [`Committer`] writes them. [`Appender::process`] does both
/// in turn; the worker pipelines them — it prepares batch N while batch N−1 is written —
/// without weakening any invariant: writes still happen batch after batch in the same
/// order and under the same guards, and batch N is only prepared from states the log
/// holds or that batch N−1 (written before it) will hold.
pub struct Appender<S: LogStore> {
    store: S,
    stream: String,
    guard: LeaseGuard,
    fields: StampFields,
    max_event_bytes: usize,
    cache: ShadowCache,
    /// Shadows of prepared batches not yet confirmed written, by batch number: they take
    /// precedence over the cache (which may evict them) and over the store (which may not
    /// have them yet).
    unconfirmed: HashMap<String, (u64, Shadow)>,
    prepared_batches: u64,
    publisher: Publisher,
    /// The checkpoint as of the last prepared batch.
    pub checkpoint: Checkpoint,
}

/// A batch whose events are decided but not yet written.
#[derive(Debug)]
pub struct Prepared {
    number: u64,
    dead: Vec<DeadLetter>,
    events: Vec<EventRecord>,
    shadows: Vec<ShadowWrite>,
    checkpoint: Checkpoint,
    stats: BatchStats,
    changes: usize,
    started: Instant,
}

impl Prepared {
    /// The batch's number (see [`Appender::confirm`]).
    pub fn number(&self) -> u64 {
        self.number
    }
}

/// Writes prepared batches, in the order that makes a crash harmless: dead letters,
/// events, shadows, then the checkpoint; then wakes the publishers.
#[derive(Clone)]
pub struct Committer<S: LogStore> {
    store: S,
    stream: String,
    guard: LeaseGuard,
    publisher: Publisher,
}

impl<S: LogStore> Committer<S> {
    /// Records a change that could not become an event (fenced like every write).
    pub async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        self.guard.check(&self.stream)?;
        self.store
            .dead_letter(&self.stream, self.guard.epoch(), letter)
            .await?;
        metrics()
            .dead_letters
            .with_label_values(&[self.stream.as_str(), letter.reason.as_str()])
            .inc();
        Ok(())
    }

    /// Writes `batch`. Batches must be committed one at a time, in preparation order.
    pub async fn commit(&self, batch: Prepared) -> Result<BatchStats, StoreError> {
        let m = metrics();
        let stream = &self.stream;
        let append_timer = Instant::now();
        // Dead letters first: a crash after the events would resume past their changes
        // (recovery moves the checkpoint to the last event), and they would be lost.
        for letter in &batch.dead {
            self.dead_letter(letter).await?;
        }
        if !batch.events.is_empty() {
            self.guard.check(stream)?;
            self.store.append_events(&batch.events).await?;
            self.guard.check(stream)?;
            self.store.save_shadows(stream, batch.shadows).await?;
        }
        self.guard.check(stream)?;
        self.store
            .save_checkpoint(stream, self.guard.epoch(), &batch.checkpoint)
            .await?;
        m.checkpoint_timestamp
            .with_label_values(&[stream])
            .set(crate::ops::metrics::unix_now());
        if !batch.events.is_empty() {
            // Hand the durable events to this replica's live tails (no read-back; copied
            // only when a tail listens).
            self.publisher
                .publish_with(|| std::sync::Arc::from(batch.events.as_slice()));
            for ev in &batch.events {
                m.events_appended
                    .with_label_values(&[stream, ev.op.as_str()])
                    .inc();
            }
            if let Some(wall) = batch.events.last().and_then(|e| e.wall_time) {
                let lag =
                    (DateTime::now().timestamp_millis() - wall.timestamp_millis()) as f64 / 1000.0;
                m.replication_lag
                    .with_label_values(&[stream])
                    .set(lag.max(0.0));
            }
        }
        m.changes_skipped
            .with_label_values(&[stream])
            .inc_by(batch.stats.skipped as u64);
        m.batch_size
            .with_label_values(&[stream])
            .observe(batch.changes as f64);
        m.append_duration
            .with_label_values(&[stream])
            .observe(append_timer.elapsed().as_secs_f64());
        debug!(stream = %stream, changes = batch.changes, events = batch.stats.events, took_ms = batch.started.elapsed().as_millis() as u64, "batch appended");
        Ok(batch.stats)
    }
}

/// What one batch did.
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchStats {
    /// Events appended.
    pub events: usize,
    /// Changes skipped.
    pub skipped: usize,
    /// Changes dead-lettered.
    pub dead: usize,
}

impl BatchStats {
    /// Adds another batch's counts.
    pub fn add(&mut self, other: BatchStats) {
        self.events += other.events;
        self.skipped += other.skipped;
        self.dead += other.dead;
    }
}

impl<S: LogStore> Appender<S> {
    /// An appender that continues after `checkpoint`.
    pub fn new(
        store: S,
        stream: String,
        guard: LeaseGuard,
        fields: StampFields,
        config: &PipelineConfig,
        publisher: Publisher,
        checkpoint: Checkpoint,
    ) -> Self {
        Self {
            store,
            stream,
            guard,
            fields,
            max_event_bytes: config.max_event_bytes,
            cache: ShadowCache::new(config.shadow_cache_entries, config.shadow_cache_bytes),
            unconfirmed: HashMap::new(),
            prepared_batches: 0,
            publisher,
            checkpoint,
        }
    }

    /// The writer of this appender's batches (a handle that can run beside it).
    pub fn committer(&self) -> Committer<S> {
        Committer {
            store: self.store.clone(),
            stream: self.stream.clone(),
            guard: self.guard.clone(),
            publisher: self.publisher.clone(),
        }
    }

    /// Records that batch `number` (and every one before it) is written.
    pub fn confirm(&mut self, number: u64) {
        self.unconfirmed.retain(|_, (n, _)| *n > number);
    }

    /// The stream name.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The lease the appender writes under.
    pub fn guard(&self) -> &LeaseGuard {
        &self.guard
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The stamp field names.
    pub fn fields(&self) -> &StampFields {
        &self.fields
    }

    /// Processes `changes` and stores the checkpoint at `token` (unchanged when `None`):
    /// [`Appender::prepare`], then the commit, in turn.
    pub async fn process(
        &mut self,
        changes: &[DocChange],
        token: Option<Document>,
        phase: Phase,
    ) -> Result<BatchStats, StoreError> {
        let batch = self.prepare(changes, token, phase).await?;
        let number = batch.number();
        let stats = self.committer().commit(batch).await?;
        self.confirm(number);
        Ok(stats)
    }

    /// Decides the events, shadows and checkpoint of `changes` (checkpoint at `token`,
    /// unchanged when `None`) without writing them. Later batches are prepared on top of
    /// this one; it must be committed before them.
    pub async fn prepare(
        &mut self,
        changes: &[DocChange],
        token: Option<Document>,
        phase: Phase,
    ) -> Result<Prepared, StoreError> {
        let m = metrics();
        let started = Instant::now();
        let stream = self.stream.clone();
        let mut stats = BatchStats::default();
        self.prepared_batches += 1;
        let number = self.prepared_batches;

        // Shadows of the batch: unconfirmed ones, then the cache, the rest in one query.
        let mut working: HashMap<String, Option<Shadow>> = HashMap::new();
        let mut missing = Vec::new();
        for c in changes {
            if working.contains_key(&c.doc_key) {
                continue;
            }
            if let Some((_, s)) = self.unconfirmed.get(&c.doc_key) {
                working.insert(c.doc_key.clone(), Some(s.clone()));
                continue;
            }
            match self.cache.get(&c.doc_key) {
                Some(s) => {
                    working.insert(c.doc_key.clone(), Some(s.clone()));
                }
                None => {
                    working.insert(c.doc_key.clone(), None);
                    missing.push(c.doc_key.clone());
                }
            }
        }
        if !missing.is_empty() {
            for (k, s) in self.store.load_shadows(&stream, &missing).await? {
                working.insert(k, Some(s));
            }
        }
        let mut events: Vec<EventRecord> = Vec::new();
        let mut dirty: Vec<String> = Vec::new();
        let mut dead = Vec::new();
        // The stored form of each changed shadow (the latest one per document).
        let mut records: HashMap<String, ShadowWrite> = HashMap::new();
        let mut seq = self.checkpoint.seq;
        let diff_timer = m.diff_duration.with_label_values(&[&stream]);
        for c in changes {
            let t = Instant::now();
            let current = working.get(&c.doc_key).and_then(Option::as_ref);
            let outcome = step(&stream, current, c, &self.fields, self.max_event_bytes);
            diff_timer.observe(t.elapsed().as_secs_f64());
            // The shadow must be storable too, or the stream could not go past this change.
            let outcome = match outcome {
                Outcome::Event(ev, shadow, text) => match shadow_record(
                    &stream,
                    &c.doc_key,
                    &shadow,
                    text,
                ) {
                    Ok(r) if r.as_bytes().len() <= MAX_SHADOW_RECORD_BYTES => {
                        records.insert(
                            c.doc_key.clone(),
                            ShadowWrite {
                                doc_key: c.doc_key.clone(),
                                version: shadow.version,
                                record: r,
                            },
                        );
                        Outcome::Event(ev, shadow, None)
                    }
                    Ok(r) => Outcome::DeadLetter {
                        reason: "too_large",
                        detail: format!(
                            "the document's shadow would be {} bytes, more than MongoDB stores ({MAX_SHADOW_RECORD_BYTES}); the next change of this document that fits will carry it",
                            r.as_bytes().len()
                        ),
                    },
                    Err(e) => Outcome::DeadLetter {
                        reason: "unserialisable",
                        detail: e.to_string(),
                    },
                },
                other => other,
            };
            match outcome {
                Outcome::Event(mut ev, shadow, _) => {
                    seq += 1;
                    ev.seq = seq;
                    events.push(*ev);
                    if !dirty.contains(&c.doc_key) {
                        dirty.push(c.doc_key.clone());
                    }
                    working.insert(c.doc_key.clone(), Some(*shadow));
                }
                Outcome::Skip(why) => {
                    stats.skipped += 1;
                    debug!(stream = %stream, doc = %c.doc_key, why, "change skipped");
                }
                Outcome::DeadLetter { reason, detail } => {
                    stats.dead += 1;
                    warn!(stream = %stream, doc = %c.doc_key, reason, %detail, "change dead-lettered");
                    dead.push((c, reason, detail));
                }
            }
        }

        let dead = dead
            .into_iter()
            .map(|(c, reason, detail)| DeadLetter {
                doc_id: Some(c.doc_id.clone()),
                token: c.token.clone(),
                reason: reason.to_owned(),
                detail,
            })
            .collect();
        let shadows: Vec<ShadowWrite> = dirty.iter().filter_map(|k| records.remove(k)).collect();
        let next = Checkpoint {
            token: token.or_else(|| self.checkpoint.token.clone()),
            seq,
            resync_pending: phase == Phase::Rereading,
            updated_at: DateTime::now(),
        };
        self.checkpoint = next.clone();
        // Later batches build on these states (the log will hold them before theirs).
        let weights: HashMap<&str, usize> = shadows
            .iter()
            .map(|w| (w.doc_key.as_str(), w.record.as_bytes().len()))
            .collect();
        for k in &dirty {
            if let Some(Some(s)) = working.remove(k) {
                let weight = weights.get(k.as_str()).copied().unwrap_or(0);
                self.cache.put(k.clone(), s.clone(), weight);
                self.unconfirmed.insert(k.clone(), (number, s));
            }
        }
        stats.events = events.len();
        Ok(Prepared {
            number,
            dead,
            events,
            shadows,
            checkpoint: next,
            stats,
            changes: changes.len(),
            started,
        })
    }

    /// Stores a checkpoint without a resume token and with a re-read pending: the next run
    /// opens the change stream anew and re-reads the collection (after a drop, rename or
    /// invalidate, whose stream cannot be resumed).
    pub async fn require_reread(&mut self) -> Result<(), StoreError> {
        let next = Checkpoint {
            token: None,
            seq: self.checkpoint.seq,
            resync_pending: true,
            updated_at: DateTime::now(),
        };
        self.guard.check(&self.stream)?;
        self.store
            .save_checkpoint(&self.stream, self.guard.epoch(), &next)
            .await?;
        self.checkpoint = next;
        Ok(())
    }

    /// Records a change that never reached the diff stage (undecodable, no document key).
    pub async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        self.committer().dead_letter(letter).await
    }

    /// Forgets cached shadows (after a re-read that bypassed the cache).
    pub fn clear_cache(&mut self) {
        self.cache.clear();
    }
}
