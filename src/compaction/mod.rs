//! Snapshots and compaction: bounds the log by replacing old events with a snapshot.
//!
//! Retention policy (`[compaction]`): an event may be compacted once it is older than
//! `min_age_secs`, is not among the last `keep_per_document` events of its document, and
//! every registered sync client has acknowledged it (per its stored vector: a document
//! entry at or past the event's version, or a stream position at or past the event's
//! position; a client that does not follow the stream or document does not hold it back).
//! Past `hard_max_per_document` events per document, the oldest go regardless; a client
//! that had not acknowledged them gets a notice (`reset_required` in its record and in
//! `/v1/sync/missing`) and receives snapshots in place of the events.
//!
//! For each document, the job rebuilds the state at the horizon (the last event to go) from
//! the previous snapshot plus events, stores it in `snapshots` (only ever forward), and only
//! then deletes the events up to that version. Readers read events before snapshots, so a
//! concurrent reader sees either the events or the snapshot that replaces them.
//!
//! Only the replica holding a stream's lease compacts it. Even if two replicas ran at once
//! (a lease changing hands mid-run), the work is idempotent: snapshots move forward by
//! compare-and-swap on their version, and each replica deletes only events at or below a
//! snapshot already stored.

use std::collections::HashSet;
use std::time::Duration;

use bson::{doc, DateTime};
use futures_util::TryStreamExt;
use serde::Deserialize;

use crate::config::{in_range, ConfigError};
use crate::mongo::clients::{ClientRecord, Notice};
use crate::mongo::snapshots::SnapshotRecord;
use crate::mongo::{get_int, Store, StoreError};
use crate::ops::metrics;

/// The retention policy and the job's pace.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompactionConfig {
    /// Runs the job at all.
    pub enabled: bool,
    /// Pause between runs, milliseconds.
    pub interval_ms: u64,
    /// Events younger than this are kept, seconds.
    pub min_age_secs: u64,
    /// The newest events of every document that are always kept (at least 1).
    pub keep_per_document: usize,
    /// More events than this per document are compacted even if unacknowledged.
    pub hard_max_per_document: usize,
    /// Events examined per stream and run (bounds the job's memory); the next run goes on
    /// after them, and starts over at the end of the log.
    pub max_scan_events: usize,
}

impl Default for CompactionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_ms: 60_000,
            min_age_secs: 7 * 24 * 3600,
            keep_per_document: 10,
            hard_max_per_document: 10_000,
            max_scan_events: 20_000,
        }
    }
}

impl CompactionConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        in_range("compaction.interval_ms", self.interval_ms, 100, 86_400_000)?;
        in_range(
            "compaction.keep_per_document",
            self.keep_per_document,
            1,
            1_000_000,
        )?;
        in_range(
            "compaction.hard_max_per_document",
            self.hard_max_per_document,
            self.keep_per_document,
            100_000_000,
        )?;
        in_range(
            "compaction.max_scan_events",
            self.max_scan_events,
            100,
            100_000_000,
        )?;
        Ok(())
    }
}

/// What one run did to one stream.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RunStats {
    /// Documents that got a (new) snapshot.
    pub documents: usize,
    /// Events deleted.
    pub events: u64,
    /// Documents compacted past a client's acknowledgement (hard limit).
    pub forced: usize,
}

struct Ev {
    seq: i64,
    to_version: i64,
    appended_ms: i64,
}

/// Compacts one stream once: the documents of the next `max_scan_events` events after the
/// saved scan position, each judged on its whole history (a per-document scan). The
/// position moves past the window every run, and starts over at the end of the log, so
/// compaction makes progress over any log shape — a window where nothing qualifies (one
/// idle client, documents whose newest events sit at the start) is simply passed.
pub async fn compact_stream(
    store: &Store,
    stream: &str,
    cfg: &CompactionConfig,
) -> Result<RunStats, StoreError> {
    let clients: Vec<ClientRecord> = store.list_clients().await?;
    let cutoff =
        DateTime::now().timestamp_millis() - (cfg.min_age_secs as i64).saturating_mul(1000);
    let after = store.compaction_position(stream).await?;
    let mut cursor = store
        .events()
        .find(doc! { "stream": stream, "seq": { "$gt": after } })
        .sort(doc! { "seq": 1 })
        .projection(doc! { "doc_key": 1, "seq": 1 })
        .limit(cfg.max_scan_events as i64)
        .await?;
    // Streamed, not collected: memory holds the window's document keys only.
    let mut order: Vec<String> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let (mut scanned, mut last) = (0usize, after);
    while let Some(d) = cursor.try_next().await? {
        scanned += 1;
        if let Some(seq) = get_int(&d, "seq") {
            last = last.max(seq);
        }
        if let Ok(key) = d.get_str("doc_key") {
            if seen.insert(key.to_owned()) {
                order.push(key.to_owned());
            }
        }
    }
    drop(seen);
    let next_position = if scanned < cfg.max_scan_events {
        0
    } else {
        last
    };

    let mut stats = RunStats::default();
    for key in order {
        let evs = &document_events(store, stream, &key).await?;
        let n = evs.len();
        let mut soft = 0;
        for e in evs.iter().take(n.saturating_sub(cfg.keep_per_document)) {
            let acked = clients
                .iter()
                .all(|c| c.vector.acknowledges(stream, &key, e.seq, e.to_version));
            if e.appended_ms >= cutoff || !acked {
                break;
            }
            soft += 1;
        }
        let hard = n.saturating_sub(cfg.hard_max_per_document);
        let count = soft.max(hard);
        if count == 0 {
            continue;
        }
        let horizon = &evs[count - 1];
        let state = match store.doc_state_at(stream, &key, horizon.to_version).await {
            Ok(s) => s,
            Err(crate::mongo::snapshots::StateError::Store(e)) => return Err(e),
            Err(e) => {
                metrics().error("compaction", "replay");
                tracing::warn!(stream, doc = %key, error = %e, "cannot rebuild the state to compact; skipped");
                continue;
            }
        };
        let snap = SnapshotRecord {
            ns: stream.to_owned(),
            doc_key: key.clone(),
            doc_id: state.doc_id,
            version: horizon.to_version,
            seq: horizon.seq,
            doc: state.doc,
            compacted_at: DateTime::now(),
        };
        let stored = store.save_snapshot(&snap).await?;
        if stored.version < horizon.to_version {
            continue;
        }
        if hard > soft {
            stats.forced += 1;
            for c in &clients {
                let behind = evs[soft..hard]
                    .iter()
                    .any(|e| !c.vector.acknowledges(stream, &key, e.seq, e.to_version));
                if behind {
                    store
                        .add_notice(
                            &c.id,
                            Notice {
                                stream: stream.to_owned(),
                                through_seq: horizon.seq,
                                reason: format!(
                                    "events of document {key} up to version {} were compacted before this client acknowledged them (more than compaction.hard_max_per_document = {} events); use the snapshots sent in their place",
                                    horizon.to_version, cfg.hard_max_per_document
                                ),
                                at: DateTime::now(),
                            },
                        )
                        .await?;
                }
            }
        }
        let deleted = store
            .events()
            .delete_many(doc! { "stream": stream, "doc_key": &key, "to_version": { "$lte": horizon.to_version } })
            .await?
            .deleted_count;
        stats.documents += 1;
        stats.events += deleted;
        metrics()
            .compacted
            .with_label_values(&[stream])
            .inc_by(deleted);
    }
    store
        .save_compaction_position(stream, next_position)
        .await?;
    Ok(stats)
}

/// A document's events, oldest first, as small summaries.
async fn document_events(store: &Store, stream: &str, key: &str) -> Result<Vec<Ev>, StoreError> {
    let mut cursor = store
        .events()
        .find(doc! { "ns": stream, "doc_key": key })
        .sort(doc! { "to_version": 1 })
        .projection(doc! { "seq": 1, "to_version": 1, "appended_at": 1 })
        .await?;
    let mut out = Vec::new();
    while let Some(d) = cursor.try_next().await? {
        let (Some(seq), Some(to_version)) = (get_int(&d, "seq"), get_int(&d, "to_version")) else {
            continue;
        };
        out.push(Ev {
            seq,
            to_version,
            appended_ms: d
                .get_datetime("appended_at")
                .map_or(i64::MAX, |t| t.timestamp_millis()),
        });
    }
    Ok(out)
}

/// Starts the compaction job: every `interval_ms`, each stream whose lease this replica
/// holds is compacted. Ends when `shutdown` turns true.
pub fn spawn(
    config: &crate::config::Config,
    store: Store,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let cfg = config.compaction.clone();
    let holder = config.lease.holder();
    let streams: Vec<String> = config
        .streams
        .iter()
        .flat_map(|s| s.streams().into_iter().map(|(n, _)| n))
        .collect();
    tokio::spawn(async move {
        if !cfg.enabled {
            return;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(cfg.interval_ms)) => {}
                _ = async { let _ = shutdown.wait_for(|v| *v).await; } => return,
            }
            for stream in &streams {
                match store.lease_holder(stream).await {
                    Ok(Some(h)) if h == holder => {}
                    Ok(_) => continue,
                    Err(e) => {
                        metrics().error("compaction", e.kind());
                        continue;
                    }
                }
                match compact_stream(&store, stream, &cfg).await {
                    Ok(s) if s.events > 0 => {
                        tracing::info!(stream = %stream, documents = s.documents, events = s.events, forced = s.forced, "compacted");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        metrics().error("compaction", e.kind());
                        tracing::warn!(stream = %stream, error = %e, "compaction failed; retrying next run");
                    }
                }
            }
        }
    })
}
