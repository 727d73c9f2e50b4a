//! Re-reading a collection: the initial sync, the recovery after the resume point fell
//! off the oplog, and the re-read after a lifecycle event (drop, rename, invalidate).
//!
//! Stamps are compared first (a scan of `_id` and the version field against the shadows'
//! stamps) and, with [`ResyncCompare::Version`], only documents whose stamp differs are read
//! whole; with [`ResyncCompare::Content`] (the default) every document is read and diffed,
//! which also finds unstamped writes. Differences become ordinary events through the same
//! append stage ([`Observed::Reread`]: exactly MongoDB's state, so a lower stamp is a new
//! incarnation, never a skip), and documents the log holds that MongoDB no longer has get
//! deletes — the log converges to MongoDB's state without resetting clients.
//!
//! The lease is renewed throughout by the worker; a re-read that loses it stops before its
//! next write ([`super::append::LeaseGuard`]).

use bson::{Bson, DateTime, Document};
use tracing::info;

use super::append::{Appender, BatchStats, Phase};
use super::store::{LogStore, SourceScan};
use super::transform::{DocChange, Observed};
use super::ResyncCompare;
use crate::mongo::{doc_key, StoreError};

/// Compares `source` with the shadows and appends the differences. `token` is the resume
/// token of the change stream opened before the scan (the point live reading continues
/// from).
pub async fn resync<S: LogStore, C: SourceScan>(
    appender: &mut Appender<S>,
    source: &C,
    token: Option<Document>,
    batch_size: usize,
    compare: ResyncCompare,
) -> Result<BatchStats, StoreError> {
    let stream = appender.stream().to_owned();
    let mut known = appender.store().shadow_summaries(&stream).await?;
    let stamps = source.stamps(appender.fields()).await?;
    let scanned = stamps.len();
    let mut to_read: Vec<Bson> = Vec::new();
    for (id, stamp) in stamps {
        let same = match known.remove(&doc_key(&id)) {
            Some(s) if !s.deleted => {
                compare == ResyncCompare::Version && stamp.is_some() && s.stamp == stamp
            }
            _ => false,
        };
        if !same {
            to_read.push(id);
        }
    }
    let mut total = BatchStats::default();
    let now = DateTime::now();
    let reread = |observed: Observed, id: Bson| DocChange {
        doc_key: doc_key(&id),
        doc_id: id,
        observed,
        token: None,
        cluster_time: None,
        wall_time: Some(now),
    };
    for chunk in to_read.chunks(batch_size.max(1)) {
        let docs = source.fetch(chunk).await?;
        let mut changes: Vec<DocChange> = docs
            .into_iter()
            .filter_map(|d| {
                let id = d.get("_id").cloned()?;
                Some(reread(Observed::Reread(d), id))
            })
            .collect();
        changes.sort_by(|a, b| a.doc_key.cmp(&b.doc_key));
        total.add(
            appender
                .process(&changes, token.clone(), Phase::Rereading)
                .await?,
        );
    }
    // Documents the log holds that MongoDB no longer has: deleted while we were away.
    let mut gone: Vec<DocChange> = known
        .into_values()
        .filter(|s| !s.deleted)
        .map(|s| reread(Observed::Deleted, s.doc_id))
        .collect();
    gone.sort_by(|a, b| a.doc_key.cmp(&b.doc_key));
    for chunk in gone.chunks(batch_size.max(1)) {
        total.add(
            appender
                .process(chunk, token.clone(), Phase::Rereading)
                .await?,
        );
    }
    // Done: live reading takes over from `token`.
    appender.process(&[], token, Phase::Live).await?;
    appender.clear_cache();
    info!(stream = %stream, scanned, reread = to_read.len(), events = total.events, "collection re-read");
    Ok(total)
}
