//! Position metrics sampled in the background: the server's oplog window, each consumed
//! stream's resume-token age and its headroom (how long until its resume point falls off
//! the oplog).
//!
//! The oplog bounds come from the first and last entries of `local.oplog.rs` (sorted by
//! `$natural`; `wall` when present, else `ts`). A server that exposes no oplog (no such
//! collection, not authorized, empty) leaves the window and headroom metrics **absent** —
//! never zero, which would page as "about to lose the resume point".
//!
//! The resume point's time is decoded from the checkpoint's resume token (MongoDB's
//! `_data` keystring starts with the cluster time); for a token that does not carry one,
//! it is estimated as the checkpoint's store time minus the stream's lag.

use std::time::Duration;

use bson::{doc, Bson, Document};
use mongodb::Client;
use tokio::sync::watch;
use tracing::debug;

use super::metrics::{metrics, unix_now};
use crate::mongo::Store;

fn entry_time(d: &Document) -> Option<f64> {
    if let Some(Bson::DateTime(t)) = d.get("wall") {
        return Some(t.timestamp_millis() as f64 / 1000.0);
    }
    match d.get("ts") {
        Some(Bson::Timestamp(t)) => Some(f64::from(t.time)),
        _ => None,
    }
}

/// Oldest and newest oplog entry times (Unix seconds), if the server exposes its oplog.
pub async fn oplog_bounds(client: &Client) -> Option<(f64, f64)> {
    let oplog = client.database("local").collection::<Document>("oplog.rs");
    let first = oplog
        .find_one(doc! {})
        .sort(doc! { "$natural": 1 })
        .projection(doc! { "ts": 1, "wall": 1 })
        .await;
    let last = oplog
        .find_one(doc! {})
        .sort(doc! { "$natural": -1 })
        .projection(doc! { "ts": 1, "wall": 1 })
        .await;
    match (first, last) {
        (Ok(Some(f)), Ok(Some(l))) => Some((entry_time(&f)?, entry_time(&l)?)),
        (Err(e), _) | (_, Err(e)) => {
            debug!(error = %e, "oplog not readable; oplog metrics absent");
            None
        }
        _ => None,
    }
}

/// The cluster time (Unix seconds) in a MongoDB resume token: `_data` is a hex keystring
/// whose first byte is the Timestamp type tag (130) followed by the 8-byte timestamp.
pub fn token_time(token: &Document) -> Option<f64> {
    let data = token.get_str("_data").ok()?;
    let bytes = data.get(..18)?;
    if !bytes.starts_with("82") {
        return None;
    }
    let secs = u32::from_str_radix(bytes.get(2..10)?, 16).ok()?;
    Some(f64::from(secs))
}

/// One sample: window, and per stream this replica consumes, token age and headroom.
pub async fn sample(store: &Store, streams: &[String]) {
    let m = metrics();
    let bounds = oplog_bounds(&store.client).await;
    match bounds {
        Some((oldest, newest)) => m
            .oplog_window
            .with_label_values::<&str>(&[])
            .set((newest - oldest).max(0.0)),
        None => {
            let _ = m.oplog_window.remove_label_values::<&str>(&[]);
        }
    }
    let now = unix_now();
    for s in streams {
        let held = m
            .lease_held
            .get_metric_with_label_values(&[s])
            .map(|g| g.get() == 1)
            .unwrap_or(false);
        let cp = if held {
            store.load_checkpoint(s).await.ok().flatten()
        } else {
            None
        };
        let Some(cp) = cp else {
            let _ = m.resume_token_age.remove_label_values(&[s]);
            let _ = m.oplog_headroom.remove_label_values(&[s]);
            continue;
        };
        let lag = m
            .change_stream_lag
            .get_metric_with_label_values(&[s])
            .map(|g| g.get())
            .unwrap_or(0.0);
        let at = cp
            .token
            .as_ref()
            .and_then(token_time)
            .unwrap_or(cp.updated_at.timestamp_millis() as f64 / 1000.0 - lag);
        m.resume_token_age
            .with_label_values(&[s])
            .set((now - at).max(0.0));
        match bounds {
            Some((oldest, _)) => m.oplog_headroom.with_label_values(&[s]).set(at - oldest),
            None => {
                let _ = m.oplog_headroom.remove_label_values(&[s]);
            }
        }
    }
}

/// Samples every `every` until shutdown.
pub fn spawn(
    store: Store,
    streams: Vec<String>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            sample(&store, &streams).await;
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.wait_for(|v| *v) => break,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_times_decode() {
        // A MongoDB 6 resume token: Timestamp(1700000000, 1) = 0x6553F100 00000001.
        let t = doc! { "_data": "826553F100000000012B022C0100296E5A1004" };
        assert_eq!(token_time(&t), Some(1_700_000_000.0));
        assert_eq!(token_time(&doc! { "_data": "nx:42" }), None);
        assert_eq!(token_time(&doc! {}), None);
    }
}
