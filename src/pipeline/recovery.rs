//! Recovery after a crash: events may have been appended after the stored checkpoint
//! (the crash came before the shadows or the checkpoint were written). Replaying those
//! events onto the shadows and moving the checkpoint past them makes the log, the shadows
//! and the checkpoint agree again before the stream resumes.

use bson::DateTime;
use tracing::info;

use crate::client::StampFields;
use crate::diff;
use crate::mongo::checkpoints::Checkpoint;
use crate::mongo::events::Operation;
use crate::mongo::shadows::Shadow;
use crate::mongo::{Store, StoreError};

/// Brings shadows and checkpoint up to the end of the stream's log. Returns the checkpoint
/// to continue from.
pub async fn recover(
    store: &Store,
    stream: &str,
    epoch: i64,
    fields: &StampFields,
    checkpoint: Checkpoint,
) -> Result<Checkpoint, StoreError> {
    let mut cp = checkpoint;
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
                None => store.load_shadow(stream, &ev.doc_key).await?,
            };
            let base_version = current.as_ref().map_or(0, |s| s.version);
            if base_version >= ev.to_version {
                continue; // already applied
            }
            if base_version != ev.from_version {
                return Err(StoreError::Corrupt {
                    what: "shadow",
                    id: ev.doc_key.clone(),
                    reason: format!(
                        "at version {base_version} but the log continues from {} (seq {})",
                        ev.from_version, ev.seq
                    ),
                });
            }
            let next = if ev.op == Operation::Delete {
                Shadow {
                    doc_id: ev.doc_id.clone(),
                    version: ev.to_version,
                    stamp: None,
                    offset: ev.to_version,
                    doc: None,
                }
            } else {
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
                let stamp = fields.version_of(&doc);
                Shadow {
                    doc_id: ev.doc_id.clone(),
                    version: ev.to_version,
                    stamp,
                    offset: stamp.map_or(ev.to_version, |s| ev.to_version - s),
                    doc: Some(doc),
                }
            };
            match pos {
                Some(i) => shadows[i].1 = next,
                None => shadows.push((ev.doc_key.clone(), next)),
            }
        }
        store.save_shadows(stream, &shadows).await?;
        replayed += events.len();
        if let Some(last) = events.last() {
            cp.seq = last.seq;
            if last.token.is_some() {
                cp.token = last.token.clone();
            }
        }
        cp.updated_at = DateTime::now();
        store.save_checkpoint(stream, epoch, &cp).await?;
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
