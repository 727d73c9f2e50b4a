//! All MongoDB access of the daemon: the watched collections' change streams and scans,
//! and the daemon's own database (events, shadows, checkpoints, leases, sync clients,
//! dead letters).

pub mod change_stream;
pub mod checkpoints;
pub mod clients;
pub mod compaction_state;
pub mod controls;
pub mod dead_letters;
pub mod events;
pub mod lease;
pub mod log_store;
pub mod membership;
pub mod shadows;
pub mod snapshots;

use std::time::Duration;

use bson::{doc, Bson};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Collection, Database, IndexModel};
use serde::Deserialize;

use crate::config::{in_range, ConfigError};
use crate::ops::logging::redact_uri;

/// How to reach MongoDB.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MongoConfig {
    /// Connection string (a secret: never logged with its password).
    pub uri: String,
    /// The daemon's own database: events, shadows, checkpoints, leases, clients.
    #[serde(default = "default_event_database")]
    pub event_database: String,
    /// Server selection and connect timeout, milliseconds.
    #[serde(default = "default_timeout")]
    pub connect_timeout_ms: u64,
}

fn default_event_database() -> String {
    "eventsync".into()
}
fn default_timeout() -> u64 {
    5000
}

impl MongoConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if !(self.uri.starts_with("mongodb://") || self.uri.starts_with("mongodb+srv://")) {
            return Err(ConfigError::invalid(
                "mongodb.uri",
                format!(
                    "is {:?}; it must start with mongodb:// or mongodb+srv://",
                    redact_uri(&self.uri)
                ),
            ));
        }
        valid_db_name("mongodb.event_database", &self.event_database)?;
        in_range(
            "mongodb.connect_timeout_ms",
            self.connect_timeout_ms,
            100,
            120_000,
        )?;
        Ok(())
    }

    /// Connects (lazily: the driver connects on first use) for a daemon that follows
    /// `streams` change streams (partitions counted).
    ///
    /// Unless the URI sets `maxPoolSize`, the pool is sized to the streams: each holds a
    /// connection in an awaiting `getMore` for up to `pipeline.max_await_ms`, and with the
    /// driver's default of 10 a daemon of 50 streams left no connection for its appends and
    /// lease renewals (nothing appended in 20 s; 0.2 s with a pool of 128).
    pub async fn connect(&self, streams: usize) -> Result<Client, mongodb::error::Error> {
        let mut options = ClientOptions::parse(&self.uri).await?;
        if options.max_pool_size.is_none() {
            options.max_pool_size = Some(pool_size_for(streams));
        }
        options.app_name = Some("eventsyncd".into());
        options.server_selection_timeout = Some(Duration::from_millis(self.connect_timeout_ms));
        options.connect_timeout = Some(Duration::from_millis(self.connect_timeout_ms));
        Client::with_options(options)
    }
}

/// The connection pool a daemon of `streams` change streams needs: one awaiting read and
/// one write per stream, plus the sync API, compaction, leases and controls.
pub fn pool_size_for(streams: usize) -> u32 {
    u32::try_from(streams.saturating_mul(2).saturating_add(16)).unwrap_or(u32::MAX)
}

pub(crate) fn valid_db_name(key: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.len() > 63 || name.contains(['/', '\\', '.', ' ', '"', '$', '\0']) {
        return Err(ConfigError::invalid(
            key,
            format!("is {name:?}; a database name is 1–63 characters without / \\ . space \" $"),
        ));
    }
    Ok(())
}

/// The daemon's own database.
#[derive(Clone, Debug)]
pub struct Store {
    /// The client.
    pub client: Client,
    /// The daemon database.
    pub db: Database,
}

/// Errors of the daemon's storage.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// MongoDB reported an error.
    #[error("mongodb: {0}")]
    Mongo(#[from] mongodb::error::Error),
    /// A stored record cannot be read.
    #[error("corrupt {what} record {id}: {reason}")]
    Corrupt {
        /// Which collection.
        what: &'static str,
        /// Its id.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// Another replica holds the lease now; this one must stop writing.
    #[error("lease on stream {0} lost: another replica took over")]
    Fenced(String),
    /// The store did not complete the call (the in-memory store simulating a crash or an
    /// outage at a chosen write); the caller retries from its checkpoint.
    #[error("store unavailable during {0}")]
    Unavailable(&'static str),
}

impl StoreError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Mongo(_) => "mongodb",
            StoreError::Corrupt { .. } => "corrupt_record",
            StoreError::Fenced(_) => "fenced",
            StoreError::Unavailable(_) => "unavailable",
        }
    }
}

impl Store {
    /// Opens the daemon database (no I/O).
    pub fn new(client: Client, database: &str) -> Self {
        let db = client.database(database);
        Self { client, db }
    }

    /// The events collection.
    pub fn events(&self) -> Collection<bson::Document> {
        self.db.collection("events")
    }
    /// The shadows collection.
    pub fn shadows(&self) -> Collection<bson::Document> {
        self.db.collection("shadows")
    }
    /// The checkpoints collection.
    pub fn checkpoints(&self) -> Collection<bson::Document> {
        self.db.collection("checkpoints")
    }
    /// The leases collection.
    pub fn leases(&self) -> Collection<bson::Document> {
        self.db.collection("leases")
    }
    /// The sync clients collection.
    pub fn clients(&self) -> Collection<bson::Document> {
        self.db.collection("clients")
    }
    /// The snapshots collection (document states kept by compaction).
    pub fn snapshots(&self) -> Collection<bson::Document> {
        self.db.collection("snapshots")
    }
    /// The dead letters collection.
    pub fn dead_letters(&self) -> Collection<bson::Document> {
        self.db.collection("dead_letters")
    }

    /// Pings the server.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.db.run_command(doc! { "ping": 1 }).await?;
        Ok(())
    }

    /// Creates the indexes the invariants rest on (idempotent).
    pub async fn ensure_indexes(&self) -> Result<(), StoreError> {
        let indexes = [
            // The chain: one event per (document, version) and one per version it starts
            // from, so a document's events can never branch (see `pipeline::store`).
            (
                self.events(),
                doc! { "ns": 1, "doc_key": 1, "to_version": 1 },
                true,
            ),
            (
                self.events(),
                doc! { "ns": 1, "doc_key": 1, "from_version": 1 },
                true,
            ),
            // The global order: one event per stream position.
            (self.events(), doc! { "stream": 1, "seq": 1 }, true),
            // Write checkpoints: has origin O's write reached the log?
            (self.events(), doc! { "origin": 1, "to_version": 1 }, false),
            (self.snapshots(), doc! { "ns": 1, "doc_key": 1 }, true),
            // A dead letter per change, however often it is replayed.
            (self.dead_letters(), doc! { "key": 1 }, true),
        ];
        for (coll, keys, unique) in indexes {
            let options = IndexOptions::builder().unique(unique).build();
            coll.create_index(IndexModel::builder().keys(keys).options(options).build())
                .await?;
        }
        self.ensure_membership_indexes().await?;
        Ok(())
    }
}

/// The canonical key of a document id: its canonical Extended JSON text.
pub fn doc_key(id: &Bson) -> String {
    id.clone().into_canonical_extjson().to_string()
}

/// Reads an integer field stored as Int64 (or Int32/Double by another tool or server).
pub fn get_int(d: &bson::Document, key: &str) -> Option<i64> {
    match d.get(key)? {
        Bson::Int64(v) => Some(*v),
        Bson::Int32(v) => Some(i64::from(*v)),
        Bson::Double(v) if v.fract() == 0.0 => Some(*v as i64),
        _ => None,
    }
}

/// Reads a flag stored as a Boolean (or as 0/1 by another tool or server).
pub fn get_flag(d: &bson::Document, key: &str) -> Option<bool> {
    match d.get(key)? {
        Bson::Boolean(b) => Some(*b),
        Bson::Int32(v) => Some(*v != 0),
        Bson::Int64(v) => Some(*v != 0),
        _ => None,
    }
}

#[cfg(test)]
mod pool_tests {
    use super::pool_size_for;

    #[test]
    fn the_pool_grows_with_the_streams_beyond_the_driver_default() {
        assert!(pool_size_for(0) > 10);
        for streams in [1, 12, 50, 400] {
            assert!(
                pool_size_for(streams) as usize >= 2 * streams + 10,
                "{streams}"
            );
        }
    }
}
