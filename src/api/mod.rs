//! The sync query port: HTTP/JSON API over the event log.

use std::net::SocketAddr;

use serde::Deserialize;

use crate::config::{in_range, ConfigError};

/// Settings of the sync query port.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Accepted bearer tokens (shared). Empty: the API is open (log warns at start-up).
    pub tokens: Vec<String>,
    /// Largest request body, bytes.
    pub max_request_bytes: usize,
    /// Largest page of events.
    pub max_page_size: usize,
    /// Most entries in one state vector.
    pub max_vector_entries: usize,
    /// Most concurrent live subscriptions.
    pub max_subscribers: usize,
    /// Origins allowed by CORS; empty: CORS closed.
    pub cors_origins: Vec<String>,
    /// How often live readers poll the log when not woken by a local append, milliseconds.
    pub tail_poll_ms: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            tokens: Vec::new(),
            max_request_bytes: 1024 * 1024,
            max_page_size: 1000,
            max_vector_entries: 10_000,
            max_subscribers: 1000,
            cors_origins: Vec::new(),
            tail_poll_ms: 200,
        }
    }
}

impl SyncConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        in_range(
            "sync.max_request_bytes",
            self.max_request_bytes,
            1024,
            64 * 1024 * 1024,
        )?;
        in_range("sync.max_page_size", self.max_page_size, 1, 100_000)?;
        in_range(
            "sync.max_vector_entries",
            self.max_vector_entries,
            1,
            10_000_000,
        )?;
        in_range("sync.max_subscribers", self.max_subscribers, 1, 1_000_000)?;
        in_range("sync.tail_poll_ms", self.tail_poll_ms, 10, 60_000)?;
        if let Some(i) = self.tokens.iter().position(|t| t.len() < 16) {
            return Err(ConfigError::invalid(
                format!("sync.tokens[{i}]"),
                "is shorter than 16 characters; use a long random token",
            ));
        }
        Ok(())
    }
}

/// Binds the sync port and serves until `shutdown` turns true.
pub async fn serve(
    config: &crate::config::Config,
    store: crate::mongo::Store,
    publisher: crate::pipeline::publish::Publisher,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(config.sync.listen).await?;
    tracing::info!(addr = %config.sync.listen, "sync port listening");
    let _ = (store, publisher);
    let router = axum::Router::new();
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|v| *v).await;
            })
            .await;
    }))
}
