//! Version arithmetic, in one place.
//!
//! Two numbers describe a document and they must never be mixed up:
//!
//! * a [`Stamp`] is the writer's version: the value of the version field the thin client
//!   (or any app following the stamp protocol) writes — `1` when created, `+1` per write,
//!   and back to `1` when the document is deleted and created again;
//! * a [`LogVersion`] is the log's version: event k of a document covers
//!   `(from_version, to_version]` and the next starts where it ended. It only ever grows,
//!   across unstamped writes, deletes and re-creations alike.
//!
//! Within one *incarnation* of a document (from its creation to its delete) the two are
//! related by an offset: `log = offset + stamp`. The offset starts at the log version the
//! incarnation began from and grows only when the daemon must number a write itself (an
//! unstamped writer changed the document without bumping its stamp). [`plan`] is the one
//! function that decides, for a new state of a document, which log version it gets.
//!
//! ```
//! use eventsync::pipeline::version::{plan, Basis, LogVersion, Stamp, Step};
//!
//! // A stamped document at stamp 3 (log version 3); the lookup already sees stamp 5:
//! let basis = Basis::Alive { version: LogVersion(3), stamp: Some(Stamp(3)), offset: 0 };
//! assert_eq!(
//!     plan(basis, Some(Stamp(5))),
//!     Step::Continue { to: LogVersion(5), offset: 0, stamped: true }
//! );
//! // The same document restored (or re-created) at stamp 1: a new incarnation.
//! assert_eq!(
//!     plan(basis, Some(Stamp(1))),
//!     Step::NewIncarnation { to: LogVersion(4), offset: 3, stamped: false }
//! );
//! ```

use std::fmt;

/// The writer's version of a document (the stamp protocol's version field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Stamp(pub i64);

/// The log's version of a document: the `to_version` of its latest event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LogVersion(pub i64);

impl LogVersion {
    /// Before the first event of a document.
    pub const NONE: LogVersion = LogVersion(0);

    /// The next version, for a step the daemon numbers itself.
    pub fn next(self) -> LogVersion {
        LogVersion(self.0 + 1)
    }

    /// The raw number (as stored and served).
    pub fn get(self) -> i64 {
        self.0
    }

    /// The offset that maps `stamp` onto this version within an incarnation.
    pub fn offset_for(self, stamp: Option<Stamp>) -> i64 {
        stamp.map_or(self.0, |s| self.0 - s.0)
    }

    /// The log version of `stamp` in an incarnation with `offset`.
    pub fn of_stamp(offset: i64, stamp: Stamp) -> LogVersion {
        LogVersion(offset + stamp.0)
    }
}

impl fmt::Display for LogVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What the log knows of a document before a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// The log has never seen the document.
    Unknown,
    /// The log's last event deleted it, at `version`.
    Deleted {
        /// The delete's log version.
        version: LogVersion,
    },
    /// The document exists in the log.
    Alive {
        /// Its log version.
        version: LogVersion,
        /// Its stamp in that state.
        stamp: Option<Stamp>,
        /// `log - stamp` in the current incarnation.
        offset: i64,
    },
}

impl Basis {
    /// The log version before the change.
    pub fn version(self) -> LogVersion {
        match self {
            Basis::Unknown => LogVersion::NONE,
            Basis::Deleted { version } | Basis::Alive { version, .. } => version,
        }
    }
}

/// The log version a new state of a document gets, decided by [`plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The document begins a new incarnation: created (or created again after a delete),
    /// or restored/re-created with a lower stamp while the log still holds the old state.
    /// The event replaces the old state whole.
    NewIncarnation {
        /// Its log version.
        to: LogVersion,
        /// The new incarnation's offset.
        offset: i64,
        /// The version comes from the writer's stamp (false: numbered by the daemon).
        stamped: bool,
    },
    /// The same incarnation moves on.
    Continue {
        /// Its log version.
        to: LogVersion,
        /// The offset after it (grows when the daemon numbered an unstamped write).
        offset: i64,
        /// The version comes from the writer's stamp.
        stamped: bool,
    },
}

impl Step {
    /// The target log version.
    pub fn to(self) -> LogVersion {
        match self {
            Step::NewIncarnation { to, .. } | Step::Continue { to, .. } => to,
        }
    }

    /// The offset after the step.
    pub fn offset(self) -> i64 {
        match self {
            Step::NewIncarnation { offset, .. } | Step::Continue { offset, .. } => offset,
        }
    }

    /// Whether the writer's stamp gave the version.
    pub fn stamped(self) -> bool {
        match self {
            Step::NewIncarnation { stamped, .. } | Step::Continue { stamped, .. } => stamped,
        }
    }
}

/// Decides the log version of a document's new state with stamp `stamp` (`None`: the
/// document carries no valid stamp), given what the log knows.
///
/// * Not alive in the log: a new incarnation. A stamped state at stamp `n` covers the
///   writes 1..=n of the incarnation (a lookup may run ahead of the insert), so it gets
///   `base + n`; an unstamped one gets `base + 1`.
/// * Alive with stamp `p`, new stamp `n > p`: the writer's versions continue:
///   `offset + n` (one event covers every write the lookup ran ahead over).
/// * Alive, same stamp or no stamp: only a writer that did not stamp can have changed
///   it; the daemon numbers the step `version + 1` and the offset grows.
/// * Alive with stamp `p`, new stamp `n < p`: the document was deleted and created again,
///   or restored with a lower version, while the log holds the old state. That is a new
///   incarnation, numbered `version + 1` — never skipped, never a version the log has
///   already used.
pub fn plan(basis: Basis, stamp: Option<Stamp>) -> Step {
    let stamp = stamp.filter(|s| s.0 >= 1);
    match basis {
        Basis::Unknown | Basis::Deleted { .. } => {
            let base = basis.version();
            match stamp {
                Some(n) => Step::NewIncarnation {
                    to: LogVersion::of_stamp(base.0, n),
                    offset: base.0,
                    stamped: true,
                },
                None => Step::NewIncarnation {
                    to: base.next(),
                    offset: base.next().0,
                    stamped: false,
                },
            }
        }
        Basis::Alive {
            version,
            stamp: previous,
            offset,
        } => match (stamp, previous) {
            (Some(n), Some(p)) if n > p => Step::Continue {
                to: LogVersion::of_stamp(offset, n),
                offset,
                stamped: true,
            },
            (Some(n), Some(p)) if n < p => {
                let to = version.next();
                Step::NewIncarnation {
                    to,
                    offset: to.offset_for(Some(n)),
                    stamped: false,
                }
            }
            // Same stamp, no stamp, or a first stamp on a document that had none: the
            // daemon numbers the step; the writer's later stamps continue from it.
            (n, _) => {
                let to = version.next();
                Step::Continue {
                    to,
                    offset: n.map_or(offset, |n| to.offset_for(Some(n))),
                    stamped: false,
                }
            }
        },
    }
}

/// The log version a delete gets.
pub fn delete_version(basis: Basis) -> Option<LogVersion> {
    match basis {
        Basis::Alive { version, .. } => Some(version.next()),
        Basis::Unknown | Basis::Deleted { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(version: i64, stamp: Option<i64>, offset: i64) -> Basis {
        Basis::Alive {
            version: LogVersion(version),
            stamp: stamp.map(Stamp),
            offset,
        }
    }

    #[test]
    fn created_documents_start_from_the_previous_incarnation() {
        assert_eq!(plan(Basis::Unknown, Some(Stamp(1))).to(), LogVersion(1));
        assert_eq!(plan(Basis::Unknown, Some(Stamp(3))).to(), LogVersion(3));
        assert_eq!(plan(Basis::Unknown, None).to(), LogVersion(1));
        let deleted = Basis::Deleted {
            version: LogVersion(6),
        };
        assert_eq!(
            plan(deleted, Some(Stamp(1))),
            Step::NewIncarnation {
                to: LogVersion(7),
                offset: 6,
                stamped: true
            }
        );
        // A stamp of 0 or less is not a stamp.
        assert_eq!(plan(deleted, Some(Stamp(0))).to(), LogVersion(7));
        assert!(!plan(deleted, Some(Stamp(0))).stamped());
    }

    #[test]
    fn stamps_continue_and_unstamped_writes_shift_the_offset() {
        assert_eq!(
            plan(alive(5, Some(5), 0), Some(Stamp(8))),
            Step::Continue {
                to: LogVersion(8),
                offset: 0,
                stamped: true
            }
        );
        // Same stamp, changed content: the daemon numbers it.
        let step = plan(alive(5, Some(5), 0), Some(Stamp(5)));
        assert_eq!(
            step,
            Step::Continue {
                to: LogVersion(6),
                offset: 1,
                stamped: false
            }
        );
        // The writer's next stamp then lands after it.
        assert_eq!(
            plan(alive(6, Some(5), 1), Some(Stamp(6))).to(),
            LogVersion(7)
        );
        assert_eq!(plan(alive(2, None, 2), None).to(), LogVersion(3));
    }

    #[test]
    fn a_lower_stamp_is_a_new_incarnation_never_a_skip() {
        let step = plan(alive(5, Some(5), 0), Some(Stamp(2)));
        assert_eq!(
            step,
            Step::NewIncarnation {
                to: LogVersion(6),
                offset: 4,
                stamped: false
            }
        );
        // Its later stamps continue from the new offset, above every used version.
        assert_eq!(
            plan(alive(6, Some(2), 4), Some(Stamp(3))).to(),
            LogVersion(7)
        );
    }

    #[test]
    fn deletes_follow_the_log() {
        assert_eq!(delete_version(alive(4, Some(4), 0)), Some(LogVersion(5)));
        assert_eq!(delete_version(Basis::Unknown), None);
    }
}
