//! The diff stage: from a document's shadow and a change to the next event and shadow.
//!
//! Which log version a new state gets is decided by [`super::version::plan`] (stamps,
//! unstamped writes, incarnations); this stage adds the patch, the operation and the size
//! checks. A looked-up document that is already several versions ahead yields one event
//! covering them all; the later change events it covered then find nothing new and are
//! skipped. A document whose stamp went down (deleted and created again, or restored) gets
//! an event that replaces the old state: never a skip.

use bson::{Bson, DateTime, Document, Timestamp};

use super::version::{delete_version, plan, Basis, LogVersion, Stamp, Step};
use crate::client::StampFields;
use crate::diff;
use crate::mongo::events::{EventRecord, Operation};
use crate::mongo::shadows::Shadow;

/// What the daemon observed of one document.
#[derive(Debug, Clone, PartialEq)]
pub enum Observed {
    /// An insert event: the document exactly as inserted.
    Inserted(Document),
    /// A replace event: the replacement document.
    Replaced(Document),
    /// An update event, with the document as the lookup found it — possibly already
    /// several writes ahead of the change, possibly a later incarnation.
    LookedUp(Document),
    /// An update event whose lookup found the document gone: its delete event follows.
    Gone,
    /// A delete event.
    Deleted,
    /// A re-read of the collection found the document like this (exactly MongoDB's state).
    Reread(Document),
}

impl Observed {
    /// The document state, when the change carries one.
    pub fn document(&self) -> Option<&Document> {
        match self {
            Observed::Inserted(d)
            | Observed::Replaced(d)
            | Observed::LookedUp(d)
            | Observed::Reread(d) => Some(d),
            Observed::Gone | Observed::Deleted => None,
        }
    }
}

/// A change of one document, as the diff stage sees it.
#[derive(Debug, Clone)]
pub struct DocChange {
    /// The document `_id`.
    pub doc_id: Bson,
    /// The canonical key of the id.
    pub doc_key: String,
    /// What was observed.
    pub observed: Observed,
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
    /// Append this event (its `seq` still 0) and store this shadow; with the shadow's
    /// document as type-preserving JSON text when the diff already encoded it (`None`
    /// after a delete).
    Event(Box<EventRecord>, Box<Shadow>, Option<String>),
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

/// What the log knows of a document, from its shadow.
pub fn basis(shadow: Option<&Shadow>) -> Basis {
    match shadow {
        None => Basis::Unknown,
        Some(s) if s.deleted() => Basis::Deleted { version: s.version },
        Some(s) => Basis::Alive {
            version: s.version,
            stamp: s.stamp,
            offset: s.offset,
        },
    }
}

/// Computes the outcome of `change` given the document's current shadow.
pub fn step(
    stream: &str,
    shadow: Option<&Shadow>,
    change: &DocChange,
    fields: &StampFields,
    max_event_bytes: usize,
) -> Outcome {
    let basis = basis(shadow);
    let from = basis.version();
    let event = |op, to: LogVersion, patch: String, origin: Option<String>, stamped, stamp| {
        Box::new(EventRecord {
            stream: stream.to_owned(),
            seq: 0,
            ns: stream.to_owned(),
            doc_id: change.doc_id.clone(),
            doc_key: change.doc_key.clone(),
            from_version: from.get(),
            to_version: to.get(),
            op,
            patch,
            origin,
            stamped,
            stamp,
            cluster_time: change.cluster_time,
            wall_time: change.wall_time,
            appended_at: DateTime::now(),
            token: change.token.clone(),
        })
    };

    let new_doc = match &change.observed {
        Observed::Deleted => {
            return match (delete_version(basis), shadow) {
                (Some(to), Some(s)) => Outcome::Event(
                    // The daemon numbers a delete; it is `stamped` when the document it
                    // removes was under the stamp protocol.
                    event(
                        Operation::Delete,
                        to,
                        "[]".into(),
                        None,
                        s.stamp.is_some(),
                        None,
                    ),
                    Box::new(Shadow {
                        doc_id: change.doc_id.clone(),
                        version: to,
                        stamp: None,
                        offset: to.get(),
                        incarnation_from: to,
                        doc: None,
                    }),
                    None,
                ),
                _ => Outcome::Skip("delete of a document the log does not hold"),
            };
        }
        Observed::Gone => return Outcome::Skip("document gone at lookup; waiting for its delete"),
        other => match other.document() {
            Some(d) => d,
            None => return Outcome::Skip("no document state"),
        },
    };
    let stamp = fields.version_of(new_doc).map(Stamp);
    let step_taken = plan(basis, stamp);
    let empty = Document::new();
    let (prev_doc, op, incarnation_from) = match (step_taken, shadow) {
        (Step::Continue { .. }, Some(s)) => (
            s.doc.as_deref().unwrap_or(&empty),
            if matches!(change.observed, Observed::Replaced(_)) {
                Operation::Replace
            } else {
                Operation::Update
            },
            s.incarnation_from,
        ),
        // Created (again): the patch applies to `{}`.
        (Step::NewIncarnation { .. }, None) => (&empty, Operation::Insert, from),
        (Step::NewIncarnation { .. }, Some(s)) if s.deleted() => (&empty, Operation::Insert, from),
        // A new incarnation over a state the log still holds: one event replaces it.
        (Step::NewIncarnation { .. }, Some(s)) => {
            (s.doc.as_deref().unwrap_or(&empty), Operation::Replace, from)
        }
        (Step::Continue { .. }, None) => (&empty, Operation::Insert, from),
    };

    // The new state is encoded once: for the diff and for the stored shadow.
    let new_value = diff::repr::to_value(new_doc);
    let patch = diff::diff_values(&diff::repr::to_value(prev_doc), &new_value);
    if matches!(step_taken, Step::Continue { .. }) && patch.is_empty() {
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
    let stamped = step_taken.stamped();
    let origin = if stamped {
        fields.origin_of(new_doc)
    } else {
        None
    };
    let to = step_taken.to();
    Outcome::Event(
        event(op, to, patch_json, origin, stamped, stamp.map(|s| s.0)),
        Box::new(Shadow {
            doc_id: change.doc_id.clone(),
            version: to,
            stamp,
            offset: step_taken.offset(),
            incarnation_from,
            doc: Some(std::sync::Arc::new(new_doc.clone())),
        }),
        Some(new_value.to_string()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn change(doc: Option<Document>, delete: bool) -> DocChange {
        let observed = match (doc, delete) {
            (_, true) => Observed::Deleted,
            (Some(d), false) => Observed::LookedUp(d),
            (None, false) => Observed::Gone,
        };
        observed_change(observed)
    }

    fn observed_change(observed: Observed) -> DocChange {
        DocChange {
            doc_id: Bson::Int32(1),
            doc_key: "1".into(),
            observed,
            token: None,
            cluster_time: None,
            wall_time: None,
        }
    }

    fn apply(shadow: &mut Option<Shadow>, c: &DocChange) -> Option<(i64, i64)> {
        match step("db.c", shadow.as_ref(), c, &StampFields::default(), 1 << 20) {
            Outcome::Event(e, s, _) => {
                *shadow = Some(*s);
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
    fn a_lower_stamp_replaces_the_old_incarnation() {
        let mut s = None;
        let v = |n: i64, x: &str| doc! { "_id": 1, "x": x, "version": n };
        for n in 1..=5 {
            assert!(apply(&mut s, &change(Some(v(n, "old")), false)).is_some());
        }
        // Deleted and created again while the log was not looking (a re-read, an insert
        // or a replace — or a lookup that ran into the new incarnation): never skipped.
        for observed in [
            Observed::Reread(v(2, "new")),
            Observed::Inserted(v(1, "new")),
            Observed::Replaced(v(1, "new")),
            Observed::LookedUp(v(2, "new")),
        ] {
            let mut s2 = s.clone();
            let c = observed_change(observed);
            let Outcome::Event(ev, shadow, _) =
                step("db.c", s2.as_ref(), &c, &StampFields::default(), 1 << 20)
            else {
                panic!("a new incarnation must produce an event");
            };
            assert_eq!((ev.from_version, ev.to_version), (5, 6));
            assert_eq!(ev.op, Operation::Replace);
            assert_eq!(shadow.incarnation_from, LogVersion(5));
            assert_eq!(
                shadow.doc.as_ref().and_then(|d| d.get_str("x").ok()),
                Some("new")
            );
            s2 = Some(*shadow);
            // The incarnation's later stamps continue above every version already used.
            let next = match &c.observed {
                Observed::Inserted(_) | Observed::Replaced(_) => 2,
                _ => 3,
            };
            assert_eq!(
                apply(&mut s2, &change(Some(v(next, "new")), false)),
                Some((6, 7))
            );
        }
    }

    #[test]
    fn deletes_say_whether_the_document_was_stamped() {
        for (d, stamped) in [
            (doc! { "_id": 1, "a": 1 }, false),
            (doc! { "_id": 1, "a": 1, "version": 1_i64 }, true),
        ] {
            let mut s = None;
            apply(&mut s, &change(Some(d), false));
            let Outcome::Event(ev, _, _) = step(
                "db.c",
                s.as_ref(),
                &change(None, true),
                &StampFields::default(),
                1 << 20,
            ) else {
                panic!("delete of a live document is an event");
            };
            assert_eq!(ev.stamped, stamped);
        }
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
