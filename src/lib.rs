//! eventsync: MongoDB collections made syncable.
//!
//! * [`client`] — the thin client applications write through (stamp protocol);
//! * [`diff`] — type-exact RFC 6902 diffs between BSON documents;
//! * the daemon `eventsyncd` (feature `daemon`): change stream → decode → diff → append →
//!   publish, the sync query port, and operations endpoints.
//!
//! An application that only writes uses `default-features = false, features = ["client"]`.
#![warn(missing_docs)]

pub mod client;
pub mod diff;
