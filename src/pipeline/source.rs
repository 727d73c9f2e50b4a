//! The source stage: reads the change stream and feeds the bounded channel.

use std::time::{Duration, Instant};

use bson::Document;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::mongo::change_stream::{
    current_token, decode, is_history_lost, Change, RawChangeStream,
};
use crate::ops::metrics;

/// What the source hands to the transform stage, in stream order.
#[derive(Debug)]
pub enum Item {
    /// A decoded change.
    Change(Box<Change>),
    /// A raw event that could not be decoded at all.
    Undecodable {
        /// Why.
        reason: String,
        /// Token to move past it, if known.
        token: Option<Document>,
    },
    /// Nothing new; the stream is positioned at this post-batch resume token.
    Idle(Document),
    /// The stream failed.
    Failed(SourceError),
}

/// Why the source stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The resume point is gone from the oplog: a full re-read is needed.
    #[error("change stream history lost: {0}")]
    HistoryLost(mongodb::error::Error),
    /// Any other driver error (the stream is restarted from the checkpoint).
    #[error("change stream failed: {0}")]
    Mongo(mongodb::error::Error),
}

/// Bounds the bytes of changes read but not yet appended (besides the channel's bound in
/// changes): the reader takes a change's weight before handing it over, the worker gives
/// it back once the batch is prepared. Weights are KiB of the raw change event.
#[derive(Debug, Clone)]
pub struct ByteBudget {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    max_kib: u32,
}

impl ByteBudget {
    /// A budget of `bytes` (at least 1 KiB).
    pub fn new(bytes: usize) -> Self {
        let max_kib = u32::try_from((bytes / 1024).max(1)).unwrap_or(u32::MAX >> 4);
        Self {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(max_kib as usize)),
            max_kib,
        }
    }

    /// The weight of `item`: its raw size in KiB (at least 1, at most the whole budget, so
    /// one change larger than the budget still passes alone); 0 for what is not a change.
    pub fn weight(&self, item: &Item) -> u32 {
        match item {
            Item::Change(c) => u32::try_from(c.raw_len.div_ceil(1024))
                .unwrap_or(u32::MAX)
                .clamp(1, self.max_kib),
            _ => 0,
        }
    }

    /// Splits `items` (in order) into batches of at most `max_bytes` of changes each (a
    /// batch holds at least one item), with the weight of each batch.
    pub fn split(&self, items: Vec<Item>, max_bytes: usize) -> Vec<(Vec<Item>, u32)> {
        let max_kib = u64::try_from(max_bytes / 1024).unwrap_or(u64::MAX).max(1);
        let mut out: Vec<(Vec<Item>, u32)> = Vec::new();
        let mut current: Vec<Item> = Vec::new();
        let mut weight = 0u32;
        for item in items {
            let w = self.weight(&item);
            if !current.is_empty() && u64::from(weight) + u64::from(w) > max_kib {
                out.push((std::mem::take(&mut current), weight));
                weight = 0;
            }
            weight += w;
            current.push(item);
        }
        if !current.is_empty() {
            out.push((current, weight));
        }
        out
    }

    /// Waits until `kib` more fit.
    async fn take(&self, kib: u32) {
        if kib > 0 {
            if let Ok(p) = self.permits.acquire_many(kib).await {
                p.forget();
            }
        }
    }

    /// Gives back `kib` taken for items now handled.
    pub fn give_back(&self, kib: u32) {
        if kib > 0 {
            self.permits.add_permits(kib as usize);
        }
    }
}

/// Time behind source: now minus the change's wall time (or cluster time), seconds.
fn observe_behind_source(stream: &str, c: &Change) {
    let at_ms = match (c.wall_time, c.cluster_time) {
        (Some(w), _) => w.timestamp_millis() as f64,
        (None, Some(t)) => f64::from(t.time) * 1000.0,
        (None, None) => return,
    };
    let behind = (crate::ops::metrics::unix_now() * 1000.0 - at_ms).max(0.0) / 1000.0;
    metrics()
        .behind_source
        .with_label_values(&[stream])
        .observe(behind);
}

/// Reads `stream` until the channel closes or the stream fails; at most `budget` bytes of
/// changes wait in the channel.
pub async fn run(
    stream_name: String,
    mut stream: RawChangeStream,
    tx: mpsc::Sender<Item>,
    idle_every: Duration,
    budget: ByteBudget,
) {
    let changes = metrics().changes_read.with_label_values(&[&stream_name]);
    let mut last_idle = Instant::now();
    let mut last_idle_token: Option<Document> = None;
    loop {
        let item = match stream.next_if_any().await {
            Ok(Some(raw)) => {
                changes.inc();
                match decode(&raw) {
                    Ok(change) => {
                        observe_behind_source(&stream_name, &change);
                        Item::Change(Box::new(change))
                    }
                    Err(reason) => {
                        warn!(stream = %stream_name, %reason, "undecodable change event");
                        Item::Undecodable {
                            reason,
                            token: current_token(&stream),
                        }
                    }
                }
            }
            Ok(None) => {
                if !stream.is_alive() {
                    // The server closed the cursor (after an `invalidate`: the worker has
                    // the event and re-opens). Closing the channel ends the run otherwise.
                    debug!(stream = %stream_name, "change stream closed by the server");
                    return;
                }
                let token = current_token(&stream);
                let due = last_idle.elapsed() >= idle_every;
                match token {
                    Some(t) if due && last_idle_token.as_ref() != Some(&t) => {
                        last_idle = Instant::now();
                        last_idle_token = Some(t.clone());
                        Item::Idle(t)
                    }
                    _ => {
                        if tx.is_closed() {
                            return;
                        }
                        continue;
                    }
                }
            }
            Err(e) => {
                let err = if is_history_lost(&e) {
                    SourceError::HistoryLost(e)
                } else {
                    SourceError::Mongo(e)
                };
                debug!(stream = %stream_name, error = %err, "source stopping");
                let _ = tx.send(Item::Failed(err)).await;
                return;
            }
        };
        budget.take(budget.weight(&item)).await;
        if tx.send(item).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, RawDocumentBuf};

    fn change(payload_bytes: usize) -> Item {
        let raw = RawDocumentBuf::from_document(&doc! {
            "_id": { "_data": "t" }, "operationType": "update",
            "documentKey": { "_id": 1 },
            "fullDocument": { "_id": 1, "s": "x".repeat(payload_bytes) },
        })
        .expect("encodable");
        Item::Change(Box::new(decode(&raw).expect("decodable")))
    }

    #[tokio::test]
    async fn large_changes_make_smaller_batches_and_the_budget_comes_back() {
        let budget = ByteBudget::new(1024 * 1024);
        let items = vec![
            change(300 * 1024),
            change(300 * 1024),
            Item::Idle(doc! { "_data": "i" }),
            change(300 * 1024),
            change(10),
        ];
        let weights: Vec<u32> = items.iter().map(|i| budget.weight(i)).collect();
        assert_eq!(weights[2], 0, "an idle token weighs nothing");
        assert!(weights[0] > 300 && weights[4] == 1, "{weights:?}");
        let parts = budget.split(items, 700 * 1024);
        let sizes: Vec<usize> = parts.iter().map(|(p, _)| p.len()).collect();
        assert_eq!(sizes, vec![3, 2], "order kept, at most ~700 KiB per batch");
        let total: u32 = parts.iter().map(|(_, w)| *w).sum();
        assert_eq!(total, weights.iter().sum::<u32>());
        // A change heavier than the whole budget still passes alone.
        assert_eq!(budget.weight(&change(3 * 1024 * 1024)), 1024);
        budget.take(1024).await;
        budget.give_back(1024);
        budget.take(1024).await;
    }
}
