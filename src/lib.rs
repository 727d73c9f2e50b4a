//! eventsync: MongoDB collections made syncable.
//!
//! * [`client`] — the thin client applications write through (stamp protocol);
//! * [`diff`] — type-exact RFC 6902 diffs between BSON documents;
//! * the daemon `eventsyncd` (feature `daemon`, on by default): [`pipeline`] (change
//!   stream → decode → diff → append → publish), [`mongo`] (all MongoDB access), [`api`]
//!   (the sync query port), [`ops`] (metrics, health, logs), [`config`] and [`daemon`].
//!
//! An application that only writes uses `default-features = false, features = ["client"]`.
#![warn(missing_docs)]

pub mod client;
pub mod diff;

#[cfg(feature = "daemon")]
pub mod api;
#[cfg(feature = "daemon")]
pub mod compaction;
#[cfg(feature = "daemon")]
pub mod config;
#[cfg(feature = "daemon")]
pub mod daemon;
#[cfg(feature = "daemon")]
pub mod mongo;
#[cfg(feature = "daemon")]
pub mod ops;
#[cfg(feature = "daemon")]
pub mod pipeline;
