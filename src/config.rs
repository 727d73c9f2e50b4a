//! Configuration of `eventsyncd`: `config.toml` plus `EVENTSYNC__SECTION__KEY` environment
//! overrides, validated at start-up with messages that name the key and what is allowed.
//!
//! Each stage's settings live next to the stage ([`crate::mongo::MongoConfig`],
//! [`crate::pipeline::PipelineConfig`], [`crate::mongo::lease::LeaseConfig`],
//! [`crate::api::SyncConfig`], [`crate::ops::OpsConfig`]); this module composes them.

use std::path::Path;

use serde::Deserialize;

use crate::api::SyncConfig;
use crate::client::StampFields;
use crate::mongo::lease::LeaseConfig;
use crate::mongo::MongoConfig;
use crate::ops::{LogConfig, OpsConfig};
use crate::pipeline::{PipelineConfig, StreamConfig};

/// The whole daemon configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// MongoDB connection and the daemon's own database.
    pub mongodb: MongoConfig,
    /// Names of the stamp fields written by the thin client.
    #[serde(default)]
    pub stamp: StampFields,
    /// The watched collections.
    pub streams: Vec<StreamConfig>,
    /// Batching and memory bounds of the pipeline.
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// The per-stream lease shared by replicas.
    #[serde(default)]
    pub lease: LeaseConfig,
    /// The sync query port.
    #[serde(default)]
    pub sync: SyncConfig,
    /// Per-client and admin credentials of the API.
    #[serde(default)]
    pub auth: crate::api::auth::AuthConfig,
    /// Snapshots and compaction of the log.
    #[serde(default)]
    pub compaction: crate::compaction::CompactionConfig,
    /// Metrics and health endpoints.
    #[serde(default)]
    pub ops: OpsConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
}

/// A configuration that cannot be used, with the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an override could not be read or parsed.
    #[error("cannot load configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// A value is out of range.
    #[error("invalid configuration: `{key}` {problem}")]
    Invalid {
        /// The dotted key.
        key: String,
        /// What is wrong and what is allowed.
        problem: String,
    },
}

impl ConfigError {
    /// Builds an [`ConfigError::Invalid`].
    pub fn invalid(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

impl Config {
    /// Loads `path` (TOML) and applies `EVENTSYNC__…` environment overrides, then validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let built = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("EVENTSYNC")
                    .prefix_separator("__")
                    .separator("__")
                    .list_separator(",")
                    .with_list_parse_key("sync.tokens")
                    .with_list_parse_key("auth.admin_tokens")
                    .try_parsing(true),
            )
            .build()?;
        let cfg: Config = built.try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses a TOML string (no environment), then validates. Used by tests and tools.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let built = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()?;
        let cfg: Config = built.try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every section.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.mongodb.validate()?;
        if self.stamp.version_field.is_empty() || self.stamp.version_field.contains('.') {
            return Err(ConfigError::invalid(
                "stamp.version_field",
                "must be a non-empty top-level field name (no '.')",
            ));
        }
        if self.stamp.origin_field.is_empty()
            || self.stamp.origin_field.contains('.')
            || self.stamp.origin_field == self.stamp.version_field
        {
            return Err(ConfigError::invalid(
                "stamp.origin_field",
                "must be a non-empty top-level field name, different from stamp.version_field",
            ));
        }
        if self.streams.is_empty() {
            return Err(ConfigError::invalid(
                "streams",
                "must list at least one collection to watch ([[streams]] database = \"…\", collection = \"…\")",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, s) in self.streams.iter().enumerate() {
            s.validate(i)?;
            if s.database == self.mongodb.event_database {
                return Err(ConfigError::invalid(
                    format!("streams[{i}].database"),
                    "must differ from mongodb.event_database (the daemon would watch its own log)",
                ));
            }
            if !names.insert(s.name()) {
                return Err(ConfigError::invalid(
                    format!("streams[{i}]"),
                    format!("watches {} twice", s.name()),
                ));
            }
        }
        self.pipeline.validate()?;
        self.lease.validate()?;
        self.sync.validate()?;
        crate::api::auth::Authenticator::new(&self.sync.tokens, &self.auth)?;
        for (i, c) in self.auth.clients.iter().enumerate() {
            if let Some(s) = c.streams.iter().find(|s| *s != "*" && !names.contains(*s)) {
                return Err(ConfigError::invalid(
                    format!("auth.clients[{i}].streams"),
                    format!("names {s:?}, which is not a configured stream"),
                ));
            }
        }
        self.compaction.validate()?;
        self.ops.validate()?;
        self.log.validate()?;
        Ok(())
    }
}

/// Checks that a number lies in `[min, max]`.
pub(crate) fn in_range<T: PartialOrd + std::fmt::Display>(
    key: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::invalid(
            key,
            format!("is {value}; allowed: {min} to {max}"),
        ));
    }
    Ok(())
}
