//! Leases: exactly one replica consumes a stream; the others stand by and take over
//! when the holder stops renewing.

use std::time::Duration;

use bson::{doc, DateTime};
use serde::Deserialize;

use super::{Store, StoreError};
use crate::config::{in_range, ConfigError};

/// Lease timing.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeaseConfig {
    /// How long a lease lasts without renewal, milliseconds. A dead holder is replaced
    /// within this time.
    pub ttl_ms: u64,
    /// How often the holder renews and a stand-by replica tries to acquire, milliseconds.
    pub renew_ms: u64,
    /// This replica's id; default: host name and process id.
    pub holder_id: Option<String>,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            ttl_ms: 10_000,
            renew_ms: 2_000,
            holder_id: None,
        }
    }
}

impl LeaseConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        in_range("lease.ttl_ms", self.ttl_ms, 500, 600_000)?;
        in_range("lease.renew_ms", self.renew_ms, 50, 300_000)?;
        if self.renew_ms * 2 > self.ttl_ms {
            return Err(ConfigError::invalid(
                "lease.renew_ms",
                format!(
                    "is {}; it must be at most half of lease.ttl_ms ({}) so a healthy holder never lapses",
                    self.renew_ms, self.ttl_ms
                ),
            ));
        }
        Ok(())
    }

    /// The lease time.
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms)
    }

    /// The renewal period.
    pub fn renew(&self) -> Duration {
        Duration::from_millis(self.renew_ms)
    }

    /// This replica's holder id.
    pub fn holder(&self) -> String {
        self.holder_id.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "eventsyncd".into());
            format!("{host}-{}", std::process::id())
        })
    }
}

/// A lease held by this replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Grows with every change of holder; fences writes of an old holder.
    pub epoch: i64,
}

// Times are stored as Unix milliseconds (Int64): compared by the server in filters, and
// kept exactly by any server or tool.
pub(crate) fn now_ms() -> i64 {
    DateTime::now().timestamp_millis()
}

impl Store {
    /// The current holder of a stream's lease, if unexpired.
    pub async fn lease_holder(&self, stream: &str) -> Result<Option<String>, StoreError> {
        let now = now_ms();
        let d = self
            .leases()
            .find_one(doc! { "_id": stream, "expires_at_ms": { "$gt": now } })
            .await?;
        Ok(d.and_then(|d| d.get_str("holder").ok().map(str::to_owned)))
    }
}
