//! Operations: metrics, health and readiness, logging.

pub mod health;
pub mod logging;
pub mod metrics;
pub mod oplog;

use std::net::SocketAddr;

use serde::Deserialize;

pub use health::Health;
pub use logging::LogConfig;
pub use metrics::{metrics, Metrics};

use crate::config::{in_range, ConfigError};

/// The operations port.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpsConfig {
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub listen: SocketAddr,
    /// Readiness fails while a stream this replica owns lags more than this, seconds.
    pub ready_max_lag_secs: f64,
    /// How often MongoDB is pinged for readiness, milliseconds.
    pub ping_interval_ms: u64,
    /// How often the oplog window, resume-token age and headroom are sampled, milliseconds.
    pub oplog_interval_ms: u64,
}

impl Default for OpsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            ready_max_lag_secs: 60.0,
            ping_interval_ms: 1000,
            oplog_interval_ms: 5000,
        }
    }
}

impl OpsConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        in_range(
            "ops.ready_max_lag_secs",
            self.ready_max_lag_secs,
            0.1,
            86_400.0,
        )?;
        in_range("ops.ping_interval_ms", self.ping_interval_ms, 50, 60_000)?;
        in_range(
            "ops.oplog_interval_ms",
            self.oplog_interval_ms,
            100,
            600_000,
        )?;
        Ok(())
    }
}
