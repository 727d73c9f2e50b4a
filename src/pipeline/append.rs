//! The append stage: turns a batch of changes into events (through the diff stage), then
//! writes them in the order that makes a crash harmless — events, then shadows, then the
//! checkpoint — and wakes the publishers.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::time::Instant;

use bson::{DateTime, Document, RawDocumentBuf};
use lru::LruCache;
use tracing::{debug, warn};

use super::publish::Publisher;
use super::transform::{step, DocChange, Outcome};
use super::PipelineConfig;
use crate::client::StampFields;
use crate::mongo::checkpoints::Checkpoint;
use crate::mongo::events::EventRecord;
use crate::mongo::shadows::{shadow_record, Shadow, MAX_SHADOW_RECORD_BYTES};
use crate::mongo::{Store, StoreError};
use crate::ops::metrics;

/// Appends batches for one stream while this replica holds its lease.
pub struct Appender {
    store: Store,
    stream: String,
    epoch: i64,
    fields: StampFields,
    max_event_bytes: usize,
    cache: LruCache<String, Shadow>,
    publisher: Publisher,
    /// The checkpoint as last stored.
    pub checkpoint: Checkpoint,
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

impl Appender {
    /// An appender that continues after `checkpoint`.
    pub fn new(
        store: Store,
        stream: String,
        epoch: i64,
        fields: StampFields,
        config: &PipelineConfig,
        publisher: Publisher,
        checkpoint: Checkpoint,
    ) -> Self {
        Self {
            store,
            stream,
            epoch,
            fields,
            max_event_bytes: config.max_event_bytes,
            cache: LruCache::new(
                NonZeroUsize::new(config.shadow_cache_entries).unwrap_or(NonZeroUsize::MIN),
            ),
            publisher,
            checkpoint,
        }
    }

    /// The stream name.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The lease epoch the appender writes under.
    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Processes `changes` and stores the checkpoint at `token` (unchanged when `None`).
    pub async fn process(
        &mut self,
        changes: &[DocChange],
        token: Option<Document>,
        resync_pending: bool,
    ) -> Result<BatchStats, StoreError> {
        let m = metrics();
        let started = Instant::now();
        let stream = self.stream.clone();
        let mut stats = BatchStats::default();

        // Shadows of the batch: from the cache, the rest in one query.
        let mut working: HashMap<String, Option<Shadow>> = HashMap::new();
        let mut missing = Vec::new();
        for c in changes {
            if working.contains_key(&c.doc_key) {
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
        let mut records: HashMap<String, RawDocumentBuf> = HashMap::new();
        let mut seq = self.checkpoint.seq;
        let diff_timer = m.diff_duration.with_label_values(&[&stream]);
        for c in changes {
            let t = Instant::now();
            let current = working.get(&c.doc_key).and_then(Option::as_ref);
            let outcome = step(&stream, current, c, &self.fields, self.max_event_bytes);
            diff_timer.observe(t.elapsed().as_secs_f64());
            // The shadow must be storable too, or the stream could not go past this change.
            let outcome = match outcome {
                Outcome::Event(ev, shadow) => match shadow_record(&stream, &c.doc_key, &shadow) {
                    Ok(r) if r.as_bytes().len() <= MAX_SHADOW_RECORD_BYTES => {
                        records.insert(c.doc_key.clone(), r);
                        Outcome::Event(ev, shadow)
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
                Outcome::Event(mut ev, shadow) => {
                    seq += 1;
                    ev.seq = seq;
                    events.push(*ev);
                    if !dirty.contains(&c.doc_key) {
                        dirty.push(c.doc_key.clone());
                    }
                    working.insert(c.doc_key.clone(), Some(shadow));
                }
                Outcome::Skip(why) => {
                    stats.skipped += 1;
                    debug!(stream = %stream, doc = %c.doc_key, why, "change skipped");
                }
                Outcome::DeadLetter { reason, detail } => {
                    stats.dead += 1;
                    warn!(stream = %stream, doc = %c.doc_key, reason, %detail, "change dead-lettered");
                    dead.push((c.clone(), reason, detail));
                }
            }
        }

        let append_timer = Instant::now();
        // Dead letters first: a crash after the events would resume past their changes
        // (recovery moves the checkpoint to the last event), and they would be lost.
        for (c, reason, detail) in &dead {
            self.store
                .dead_letter(&stream, Some(&c.doc_id), c.token.as_ref(), reason, detail)
                .await?;
            m.dead_letters
                .with_label_values(&[stream.as_str(), reason])
                .inc();
        }
        if !events.is_empty() {
            self.store.append_events(&events).await?;
            let shadows: Vec<RawDocumentBuf> =
                dirty.iter().filter_map(|k| records.remove(k)).collect();
            self.store.save_shadow_records(shadows).await?;
        }
        let next = Checkpoint {
            token: token.or_else(|| self.checkpoint.token.clone()),
            seq,
            resync_pending,
            updated_at: DateTime::now(),
        };
        self.store
            .save_checkpoint(&stream, self.epoch, &next)
            .await?;
        self.checkpoint = next;
        m.checkpoint_timestamp
            .with_label_values(&[&stream])
            .set(crate::ops::metrics::unix_now());

        // Only now is the new state durable: remember it.
        for k in &dirty {
            if let Some(Some(s)) = working.remove(k) {
                self.cache.put(k.clone(), s);
            }
        }
        if !events.is_empty() {
            // livefanout: hand the durable events to this replica's live tails (no read-back;
            // copied only when a tail listens).
            self.publisher
                .publish_with(|| std::sync::Arc::from(events.as_slice()));
            for ev in &events {
                m.events_appended
                    .with_label_values(&[&stream, ev.op.as_str()])
                    .inc();
            }
            if let Some(wall) = events.last().and_then(|e| e.wall_time) {
                let lag =
                    (DateTime::now().timestamp_millis() - wall.timestamp_millis()) as f64 / 1000.0;
                m.replication_lag
                    .with_label_values(&[&stream])
                    .set(lag.max(0.0));
            }
        }
        m.changes_skipped
            .with_label_values(&[&stream])
            .inc_by(stats.skipped as u64);
        m.batch_size
            .with_label_values(&[&stream])
            .observe(changes.len() as f64);
        m.append_duration
            .with_label_values(&[&stream])
            .observe(append_timer.elapsed().as_secs_f64());
        stats.events = events.len();
        debug!(stream = %stream, changes = changes.len(), events = stats.events, took_ms = started.elapsed().as_millis() as u64, "batch appended");
        Ok(stats)
    }

    /// Forgets cached shadows (after a re-read that bypassed the cache).
    pub fn clear_cache(&mut self) {
        self.cache.clear();
    }
}
