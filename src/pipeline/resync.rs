//! Re-reading a collection: the initial sync (no checkpoint yet) and the recovery after
//! the resume point fell off the oplog. Versions are compared first (a scan of `_id` and
//! the version field against the shadows), and only documents that differ are read whole.
//! Differences become ordinary events through the same append stage, so the log converges
//! to MongoDB's state without resetting clients.

use bson::{doc, Bson, DateTime, Document};
use futures_util::TryStreamExt;
use mongodb::Collection;
use tracing::info;

use super::append::{Appender, BatchStats};
use super::transform::DocChange;
use super::ResyncCompare;
use crate::client::StampFields;
use crate::mongo::{doc_key, StoreError};

/// Compares `source` with the shadows and appends the differences. `token` is the resume
/// token of the change stream opened before the scan (the point live reading continues
/// from).
pub async fn resync(
    appender: &mut Appender,
    source: &Collection<Document>,
    fields: &StampFields,
    token: Option<Document>,
    batch_size: usize,
    compare: ResyncCompare,
) -> Result<BatchStats, StoreError> {
    let stream = appender.stream().to_owned();
    let mut known = appender.store().shadow_versions(&stream).await?;
    let mut to_read: Vec<Bson> = Vec::new();
    let mut scanned = 0usize;
    let mut cursor = source
        .find(doc! {})
        .projection(doc! { "_id": 1, fields.version_field.as_str(): 1 })
        .await?;
    while let Some(d) = cursor.try_next().await? {
        scanned += 1;
        let Some(id) = d.get("_id").cloned() else {
            continue;
        };
        let key = doc_key(&id);
        let version = fields.version_of(&d);
        let same = match known.remove(&key) {
            Some((stamp, false, _)) => {
                compare == ResyncCompare::Version && version.is_some() && stamp == version
            }
            _ => false,
        };
        if !same {
            to_read.push(id);
        }
    }
    let mut total = BatchStats::default();
    let now = DateTime::now();
    for chunk in to_read.chunks(batch_size.max(1)) {
        let docs: Vec<Document> = source
            .find(doc! { "_id": { "$in": chunk.to_vec() } })
            .await?
            .try_collect()
            .await?;
        let mut changes: Vec<DocChange> = docs
            .into_iter()
            .filter_map(|d| {
                let id = d.get("_id").cloned()?;
                Some(DocChange {
                    doc_key: doc_key(&id),
                    doc_id: id,
                    full_document: Some(d),
                    delete: false,
                    replace: false,
                    token: None,
                    cluster_time: None,
                    wall_time: Some(now),
                })
            })
            .collect();
        changes.sort_by(|a, b| a.doc_key.cmp(&b.doc_key));
        let s = appender.process(&changes, token.clone(), true).await?;
        total.events += s.events;
        total.skipped += s.skipped;
        total.dead += s.dead;
    }
    // Documents the log holds that MongoDB no longer has: deleted while we were away.
    let gone: Vec<DocChange> = known
        .into_iter()
        .filter(|(_, (_, deleted, _))| !deleted)
        .map(|(key, (_, _, id))| DocChange {
            doc_id: id,
            doc_key: key,
            full_document: None,
            delete: true,
            replace: false,
            token: None,
            cluster_time: None,
            wall_time: Some(now),
        })
        .collect();
    for chunk in gone.chunks(batch_size.max(1)) {
        let s = appender.process(chunk, token.clone(), true).await?;
        total.events += s.events;
    }
    // Done: live reading takes over from `token`.
    appender.process(&[], token, false).await?;
    appender.clear_cache();
    info!(stream = %stream, scanned, reread = to_read.len(), events = total.events, "collection re-read");
    Ok(total)
}
