//! The pipeline, one per watched collection, data flowing one way:
//!
//! ```text
//! change stream ──▶ source (read, decode) ──bounded channel──▶ transform (shadow + diff)
//!               ──▶ append (events, shadows, checkpoint) ──▶ publish (wake live readers)
//! ```
//!
//! [`worker`] runs one stream while this replica holds its lease (and [`balance`] decides
//! which streams it tries); [`resync`] re-reads a collection for the initial sync, after
//! the resume point was lost and after a lifecycle event; [`recovery`] finishes a batch a
//! crash interrupted; [`control`] carries out operator controls. Every read and write of
//! the log path goes through [`store::LogStore`] (how each write is guarded is listed
//! there), implemented over MongoDB and in memory ([`memory_store`]); [`version`] holds all
//! version arithmetic.

pub mod append;
pub mod balance;
pub mod control;
pub mod memory_store;
pub mod publish;
pub mod recovery;
pub mod resync;
pub mod shadow_cache;
pub mod source;
pub mod store;
pub mod transform;
pub mod version;
pub mod worker;

use serde::Deserialize;

use crate::config::{in_range, ConfigError};
use crate::mongo::valid_db_name;

/// One watched collection.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// The database.
    pub database: String,
    /// The collection.
    pub collection: String,
    /// Partitions `P` (1 to 64, default 1): each partition is a stream of its own (lease,
    /// checkpoint, dense position) over the documents whose `_id` hashes to it, named
    /// `database.collection#p/P` (`p` from 0). With 1 the stream is `database.collection`.
    #[serde(default = "one_partition")]
    pub partitions: u32,
}

fn one_partition() -> u32 {
    1
}

/// One partition of a stream: the documents whose `_id` hash modulo `count` is `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    /// `p`, from 0.
    pub index: u32,
    /// `P`.
    pub count: u32,
}

impl Partition {
    /// The aggregation expression of a document's partition, from the `_id` at `id_path`
    /// (`"$documentKey._id"` in a change event, `"$_id"` in a collection):
    /// `((toHashedIndexKey(_id) mod P) + P) mod P` — MongoDB's hashed-index hash, so
    /// stable across servers and versions; `$mod` keeps the sign of the dividend, hence
    /// the `+ P`.
    pub fn of_id(id_path: &str, count: u32) -> bson::Bson {
        let p = i64::from(count);
        bson::bson!({ "$mod": [
            { "$add": [ { "$mod": [ { "$toHashedIndexKey": id_path }, p ] }, p ] },
            p
        ] })
    }

    /// A filter (`$expr`) selecting this partition's documents, the `_id` at `id_path`.
    pub fn filter(&self, id_path: &str) -> bson::Document {
        bson::doc! { "$expr": { "$eq": [ Self::of_id(id_path, self.count), i64::from(self.index) ] } }
    }
}

impl StreamConfig {
    /// The stream's name and namespace, `database.collection`.
    pub fn name(&self) -> String {
        format!("{}.{}", self.database, self.collection)
    }

    /// The streams this collection is consumed as: itself (`P = 1`), or one per
    /// partition, `database.collection#p/P`.
    pub fn streams(&self) -> Vec<(String, Option<Partition>)> {
        if self.partitions <= 1 {
            return vec![(self.name(), None)];
        }
        (0..self.partitions)
            .map(|index| {
                (
                    format!("{}#{index}/{}", self.name(), self.partitions),
                    Some(Partition {
                        index,
                        count: self.partitions,
                    }),
                )
            })
            .collect()
    }

    pub(crate) fn validate(&self, i: usize) -> Result<(), ConfigError> {
        valid_db_name(&format!("streams[{i}].database"), &self.database)?;
        in_range(&format!("streams[{i}].partitions"), self.partitions, 1, 64)?;
        if self.collection.is_empty()
            || self.collection.contains(['$', '\0'])
            || self.collection.starts_with("system.")
        {
            return Err(ConfigError::invalid(
                format!("streams[{i}].collection"),
                format!(
                    "is {:?}; a collection name is non-empty, has no '$' and is not a system collection",
                    self.collection
                ),
            ));
        }
        Ok(())
    }
}

/// Batching and memory bounds.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// Most changes appended in one batch.
    pub batch_size: usize,
    /// Most bytes of changes (raw change events) in one batch: large documents make
    /// smaller batches, so a batch's memory (documents, patches, records) stays bounded.
    pub batch_bytes: usize,
    /// Capacity of the channel between reading and appending, in changes.
    pub channel_capacity: usize,
    /// Bytes of changes (raw change events) read but not yet prepared; with
    /// `channel_capacity`, what bounds the memory of a catch-up over large documents.
    pub channel_bytes: usize,
    /// Documents whose shadows are kept in memory (LRU); the rest are read from MongoDB.
    pub shadow_cache_entries: usize,
    /// Bytes of shadows kept in memory, as their stored records weigh (the in-memory
    /// form is larger); the LRU evicts until both bounds hold.
    pub shadow_cache_bytes: usize,
    /// A change whose event patch exceeds this many bytes goes to the dead letters.
    pub max_event_bytes: usize,
    /// `maxAwaitTimeMS` of the change stream: how long an idle read waits, milliseconds.
    pub max_await_ms: u64,
    /// How often an idle stream stores its post-batch resume token, milliseconds.
    pub idle_checkpoint_ms: u64,
    /// Delay before a failed stream is restarted, milliseconds (doubles up to 30 s).
    pub restart_backoff_ms: u64,
    /// How a re-read finds changed documents: `content` (default) reads every document
    /// and diffs it against its shadow, which also catches unstamped writes; `version`
    /// compares only `_id` and the version field (an index-only scan) and reads just the
    /// documents whose version differs — faster, but an unstamped write that left the
    /// version unchanged while history was lost is only seen at the document's next write.
    pub resync_compare: ResyncCompare,
}

/// See [`PipelineConfig::resync_compare`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResyncCompare {
    /// Read every document.
    Content,
    /// Read documents whose version differs.
    Version,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            batch_size: 256,
            batch_bytes: 16 * 1024 * 1024,
            channel_capacity: 1024,
            channel_bytes: 16 * 1024 * 1024,
            shadow_cache_entries: 10_000,
            shadow_cache_bytes: 16 * 1024 * 1024,
            max_event_bytes: 4 * 1024 * 1024,
            max_await_ms: 500,
            idle_checkpoint_ms: 1_000,
            restart_backoff_ms: 200,
            resync_compare: ResyncCompare::Content,
        }
    }
}

impl PipelineConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        in_range("pipeline.batch_size", self.batch_size, 1, 10_000)?;
        in_range(
            "pipeline.channel_capacity",
            self.channel_capacity,
            1,
            1_000_000,
        )?;
        in_range(
            "pipeline.shadow_cache_entries",
            self.shadow_cache_entries,
            1,
            100_000_000,
        )?;
        in_range("pipeline.batch_bytes", self.batch_bytes, 64 * 1024, 1 << 40)?;
        in_range(
            "pipeline.channel_bytes",
            self.channel_bytes,
            1024 * 1024,
            1 << 40,
        )?;
        in_range(
            "pipeline.shadow_cache_bytes",
            self.shadow_cache_bytes,
            1024 * 1024,
            1 << 40,
        )?;
        in_range(
            "pipeline.max_event_bytes",
            self.max_event_bytes,
            1024,
            15 * 1024 * 1024,
        )?;
        in_range("pipeline.max_await_ms", self.max_await_ms, 10, 60_000)?;
        in_range(
            "pipeline.idle_checkpoint_ms",
            self.idle_checkpoint_ms,
            10,
            60_000,
        )?;
        in_range(
            "pipeline.restart_backoff_ms",
            self.restart_backoff_ms,
            10,
            60_000,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partitioned_collection_is_one_stream_per_partition() {
        let mut s = StreamConfig {
            database: "app".into(),
            collection: "orders".into(),
            partitions: 1,
        };
        assert_eq!(s.streams(), vec![("app.orders".to_owned(), None)]);
        s.partitions = 3;
        let names: Vec<String> = s.streams().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            ["app.orders#0/3", "app.orders#1/3", "app.orders#2/3"]
        );
        assert_eq!(s.streams()[2].1, Some(Partition { index: 2, count: 3 }));
        let f = Partition { index: 2, count: 3 }.filter("$_id");
        assert_eq!(
            f,
            bson::doc! { "$expr": { "$eq": [
                { "$mod": [ { "$add": [ { "$mod": [ { "$toHashedIndexKey": "$_id" }, 3_i64 ] }, 3_i64 ] }, 3_i64 ] },
                2_i64
            ] } }
        );
    }
}
