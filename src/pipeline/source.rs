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

/// Reads `stream` until the channel closes or the stream fails.
pub async fn run(
    stream_name: String,
    mut stream: RawChangeStream,
    tx: mpsc::Sender<Item>,
    idle_every: Duration,
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
        if tx.send(item).await.is_err() {
            return;
        }
    }
}
