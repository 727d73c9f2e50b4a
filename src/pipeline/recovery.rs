//! Recovery after a crash: events may have been appended after the stored checkpoint
//! (the crash came before the shadows or the checkpoint were written). Replaying those
//! events onto the shadows and moving the checkpoint past them makes the log, the shadows
//! and the checkpoint agree again before the stream resumes.

//!
//! A stream whose checkpoint is missing while its log is not empty (an operator deleted it
//! to force a re-read, or it was lost) is not resumed from the log's last token: it
//! continues after the log's last position and re-reads the collection.

use bson::DateTime;
use tracing::{info, warn};

use super::append::LeaseGuard;
use super::store::{LogStore, ShadowWrite};
use super::transform::basis;
use super::version::{plan, LogVersion, Stamp, Step};
use crate::client::StampFields;
use crate::diff;
use crate::mongo::checkpoints::Checkpoint;
use crate::mongo::events::Operation;
use crate::mongo::shadows::{shadow_record, Shadow};
use crate::mongo::StoreError;

/// Brings shadows and checkpoint up to the end of the stream's log. `checkpoint` is the
/// stored one (`None`: none stored). Returns the checkpoint to continue from.
pub async fn recover<S: LogStore>(
    store: &S,
    stream: &str,
    guard: &LeaseGuard,
    fields: &StampFields,
    checkpoint: Option<Checkpoint>,
) -> Result<Checkpoint, StoreError> {
    let mut cp = match checkpoint {
        Some(cp) => cp,
        None => {
            let last = store.last_seq(stream).await?;
            if last > 0 {
                warn!(
                    stream,
                    seq = last,
                    "no checkpoint but the log has events: re-reading the collection"
                );
            }
            // No token: the stream is opened anew and the collection re-read; the shadows
            // are brought up to the log first, below.
            Checkpoint {
                token: None,
                seq: 0,
                resync_pending: true,
                updated_at: DateTime::now(),
            }
        }
    };
    let forget_token = cp.token.is_none();
    let mut replayed = 0usize;
    loop {
        let events = store.events_after(stream, cp.seq, 500).await?;
        if events.is_empty() {
            break;
        }
        let mut shadows: Vec<(String, Shadow)> = Vec::new();
        for ev in &events {
            let pos = shadows.iter().position(|(k, _)| *k == ev.doc_key);
            let current = match pos {
                Some(i) => Some(shadows[i].1.clone()),
                None => store
                    .load_shadows(stream, std::slice::from_ref(&ev.doc_key))
                    .await?
                    .remove(&ev.doc_key),
            };
            let base_version = current.as_ref().map_or(LogVersion::NONE, |s| s.version);
            if base_version.get() >= ev.to_version {
                continue; // already applied
            }
            if base_version.get() != ev.from_version {
                return Err(StoreError::Corrupt {
                    what: "shadow",
                    id: ev.doc_key.clone(),
                    reason: format!(
                        "at version {base_version} but the log continues from {} (seq {})",
                        ev.from_version, ev.seq
                    ),
                });
            }
            let to = LogVersion(ev.to_version);
            let next = if ev.op == Operation::Delete {
                Shadow {
                    doc_id: ev.doc_id.clone(),
                    version: to,
                    stamp: None,
                    offset: to.get(),
                    incarnation_from: to,
                    doc: None,
                }
            } else {
                // Whether this event began an incarnation is decided as the diff stage
                // decided it, from the shadow before and the document's stamp after.
                let incarnation_from =
                    match (plan(basis(current.as_ref()), ev.stamp.map(Stamp)), &current) {
                        (Step::Continue { .. }, Some(s)) => s.incarnation_from,
                        _ => LogVersion(ev.from_version),
                    };
                let base = current.and_then(|s| s.doc).unwrap_or_default();
                let patch: diff::Patch =
                    serde_json::from_str(&ev.patch).map_err(|e| StoreError::Corrupt {
                        what: "event",
                        id: format!("{stream}#{}", ev.seq),
                        reason: e.to_string(),
                    })?;
                let doc = diff::apply(&base, &patch).map_err(|e| StoreError::Corrupt {
                    what: "event",
                    id: format!("{stream}#{}", ev.seq),
                    reason: e.to_string(),
                })?;
                let stamp = fields.version_of(&doc).map(Stamp);
                Shadow {
                    doc_id: ev.doc_id.clone(),
                    version: to,
                    stamp,
                    offset: to.offset_for(stamp),
                    incarnation_from,
                    doc: Some(std::sync::Arc::new(doc)),
                }
            };
            match pos {
                Some(i) => shadows[i].1 = next,
                None => shadows.push((ev.doc_key.clone(), next)),
            }
        }
        let writes = shadows
            .iter()
            .map(|(key, s)| {
                Ok(ShadowWrite {
                    doc_key: key.clone(),
                    version: s.version,
                    record: shadow_record(stream, key, s, None)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        guard.check(stream)?;
        store.save_shadows(stream, writes).await?;
        replayed += events.len();
        if let Some(last) = events.last() {
            cp.seq = last.seq;
            if last.token.is_some() && !forget_token {
                cp.token = last.token.clone();
            }
        }
        cp.updated_at = DateTime::now();
        guard.check(stream)?;
        store.save_checkpoint(stream, guard.epoch(), &cp).await?;
    }
    if replayed > 0 {
        info!(
            stream,
            replayed,
            seq = cp.seq,
            "recovered events appended after the last checkpoint"
        );
    }
    Ok(cp)
}
