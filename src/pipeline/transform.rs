//! The diff stage: from a document's shadow and a change to the next event and shadow.
//!
//! Versions: the log version of a stamped document is `offset + stamp`, where `offset`
//! starts at 0 and grows only when the daemon must number a write itself (an unstamped
//! writer changed the document without bumping its version) or when a deleted document
//! is created again (its versions restart at 1 in MongoDB but continue in the log). A
//! looked-up document that is already several versions ahead yields one event covering
//! them all; the later change events it covered then find nothing new and are skipped.

use bson::{Bson, DateTime, Document, Timestamp};

use crate::client::StampFields;
use crate::diff;
use crate::mongo::events::{EventRecord, Operation};
use crate::mongo::shadows::Shadow;

/// A change of one document, as the diff stage sees it.
#[derive(Debug, Clone)]
pub struct DocChange {
    /// The document `_id`.
    pub doc_id: Bson,
    /// The canonical key of the id.
    pub doc_key: String,
    /// `Some(doc)`: the document now looks like this (looked up); `None` with
    /// `delete == false`: the lookup found it gone — its delete event will follow.
    pub full_document: Option<Document>,
    /// True for a delete.
    pub delete: bool,
    /// The change stream reported a whole-document replace.
    pub replace: bool,
    /// The change's resume token (none for re-read changes).
    pub token: Option<Document>,
    /// Cluster time of the change.
    pub cluster_time: Option<Timestamp>,
    /// Wall time of the change.
    pub wall_time: Option<DateTime>,
}

/// What the diff stage decided for one change.
#[derive(Debug)]
pub enum Outcome {
    /// Append this event (its `seq` still 0) and store this shadow.
    Event(Box<EventRecord>, Shadow),
    /// Nothing new: already covered, a no-op, or waiting for the delete.
    Skip(&'static str),
    /// Cannot become an event; record it and keep the shadow as it is.
    DeadLetter {
        /// Short reason (a metric label).
        reason: &'static str,
        /// Details for the operator.
        detail: String,
    },
}

/// Computes the outcome of `change` given the document's current shadow.
pub fn step(
    stream: &str,
    shadow: Option<&Shadow>,
    change: &DocChange,
    fields: &StampFields,
    max_event_bytes: usize,
) -> Outcome {
    let alive = shadow.filter(|s| !s.deleted());
    let event = |op, from, to, patch: String, origin: Option<String>, stamped| {
        Box::new(EventRecord {
            stream: stream.to_owned(),
            seq: 0,
            ns: stream.to_owned(),
            doc_id: change.doc_id.clone(),
            doc_key: change.doc_key.clone(),
            from_version: from,
            to_version: to,
            op,
            patch,
            origin,
            stamped,
            cluster_time: change.cluster_time,
            wall_time: change.wall_time,
            appended_at: DateTime::now(),
            token: change.token.clone(),
        })
    };

    if change.delete {
        return match alive {
            Some(s) => {
                let to = s.version + 1;
                Outcome::Event(
                    event(Operation::Delete, s.version, to, "[]".into(), None, true),
                    Shadow {
                        doc_id: change.doc_id.clone(),
                        version: to,
                        stamp: None,
                        offset: to,
                        doc: None,
                    },
                )
            }
            None => Outcome::Skip("delete of a document the log does not hold"),
        };
    }
    let Some(new_doc) = &change.full_document else {
        return Outcome::Skip("document gone at lookup; waiting for its delete");
    };
    let stamp = fields.version_of(new_doc);
    let empty = Document::new();
    let (prev_doc, prev_version) = match (alive, shadow) {
        (Some(s), _) => (s.doc.as_ref().unwrap_or(&empty), s.version),
        (None, Some(dead)) => (&empty, dead.version),
        (None, None) => (&empty, 0),
    };

    // Decide the target log version.
    let (to, offset, stamped, op) = match alive {
        None => {
            let op = Operation::Insert;
            match stamp {
                Some(n) if n >= 1 => (prev_version + n, prev_version, true, op),
                _ => (prev_version + 1, prev_version + 1, false, op),
            }
        }
        Some(s) => {
            let op = if change.replace {
                Operation::Replace
            } else {
                Operation::Update
            };
            match (stamp, s.stamp) {
                (Some(n), Some(p)) if n < p => {
                    return Outcome::Skip("lookup saw a newer incarnation; its delete comes first")
                }
                (Some(n), Some(p)) if n > p => (s.offset + n, s.offset, true, op),
                // Same stamp (or no stamp): only an unstamped write can have changed it.
                (n, _) => {
                    let to = s.version + 1;
                    (to, n.map_or(s.offset, |n| to - n), false, op)
                }
            }
        }
    };

    let patch = diff::diff(prev_doc, new_doc);
    if alive.is_some() && patch.is_empty() {
        return Outcome::Skip("no change since the last event");
    }
    let patch_json = match serde_json::to_string(&patch) {
        Ok(p) => p,
        Err(e) => {
            return Outcome::DeadLetter {
                reason: "unserialisable",
                detail: e.to_string(),
            }
        }
    };
    if patch_json.len() > max_event_bytes {
        return Outcome::DeadLetter {
            reason: "too_large",
            detail: format!(
                "patch of {} bytes exceeds pipeline.max_event_bytes ({max_event_bytes}); the next change of this document will carry it",
                patch_json.len()
            ),
        };
    }
    let origin = if stamped {
        fields.origin_of(new_doc)
    } else {
        None
    };
    Outcome::Event(
        event(op, prev_version, to, patch_json, origin, stamped),
        Shadow {
            doc_id: change.doc_id.clone(),
            version: to,
            stamp,
            offset,
            doc: Some(new_doc.clone()),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn change(doc: Option<Document>, delete: bool) -> DocChange {
        DocChange {
            doc_id: Bson::Int32(1),
            doc_key: "1".into(),
            full_document: doc,
            delete,
            replace: false,
            token: None,
            cluster_time: None,
            wall_time: None,
        }
    }

    fn apply(shadow: &mut Option<Shadow>, c: &DocChange) -> Option<(i64, i64)> {
        match step("db.c", shadow.as_ref(), c, &StampFields::default(), 1 << 20) {
            Outcome::Event(e, s) => {
                *shadow = Some(s);
                Some((e.from_version, e.to_version))
            }
            _ => None,
        }
    }

    #[test]
    fn lookup_ahead_covers_later_changes_once() {
        let mut s = None;
        let v = |n: i64| doc! { "_id": 1, "x": n, "version": n };
        assert_eq!(apply(&mut s, &change(Some(v(1)), false)), Some((0, 1)));
        // Updates 2 and 3 happened; both events look up version 3.
        assert_eq!(apply(&mut s, &change(Some(v(3)), false)), Some((1, 3)));
        assert_eq!(apply(&mut s, &change(Some(v(3)), false)), None);
        // Gone at lookup: wait for the delete.
        assert_eq!(apply(&mut s, &change(None, false)), None);
        assert_eq!(apply(&mut s, &change(None, true)), Some((3, 4)));
        // Created again at version 1: the log goes on.
        assert_eq!(apply(&mut s, &change(Some(v(1)), false)), Some((4, 5)));
        assert_eq!(apply(&mut s, &change(Some(v(2)), false)), Some((5, 6)));
    }

    #[test]
    fn unstamped_writes_get_daemon_versions() {
        let mut s = None;
        assert_eq!(
            apply(&mut s, &change(Some(doc! { "_id": 1, "a": 1 }), false)),
            Some((0, 1))
        );
        assert_eq!(
            apply(&mut s, &change(Some(doc! { "_id": 1, "a": 2 }), false)),
            Some((1, 2))
        );
        assert_eq!(
            apply(&mut s, &change(Some(doc! { "_id": 1, "a": 2 }), false)),
            None
        );
        // A stamped doc changed by mongosh without bumping the version, then by the client.
        let mut s = None;
        assert_eq!(
            apply(
                &mut s,
                &change(Some(doc! { "_id": 1, "a": 1, "version": 1_i64 }), false)
            ),
            Some((0, 1))
        );
        assert_eq!(
            apply(
                &mut s,
                &change(Some(doc! { "_id": 1, "a": 9, "version": 1_i64 }), false)
            ),
            Some((1, 2))
        );
        assert_eq!(
            apply(
                &mut s,
                &change(Some(doc! { "_id": 1, "a": 3, "version": 2_i64 }), false)
            ),
            Some((2, 3))
        );
    }

    #[test]
    fn oversized_patches_are_dead_letters() {
        let big = "x".repeat(4096);
        let c = change(Some(doc! { "_id": 1, "big": big, "version": 1_i64 }), false);
        assert!(matches!(
            step("db.c", None, &c, &StampFields::default(), 1024),
            Outcome::DeadLetter {
                reason: "too_large",
                ..
            }
        ));
    }
}
