//! Wiring of the daemon: connect, start one worker per stream, serve the sync and
//! operations ports, and shut down gracefully on SIGTERM/SIGINT.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::mongo::{Store, StoreError};
use crate::ops::logging::redact_uri;
use crate::ops::{health, metrics, Health};
use crate::pipeline::balance::{refresh, run_membership, Balancer};
use crate::pipeline::publish::Publisher;
use crate::pipeline::worker::StreamWorker;
use crate::pipeline::Partition;

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// MongoDB could not be reached or prepared.
    #[error("mongodb: {0}")]
    Mongo(#[from] mongodb::error::Error),
    /// The daemon database could not be prepared.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// Signal handling could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Runs the daemon until SIGTERM or SIGINT; returns once everything stopped.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let signals = signal_hook_tokio::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .map_err(DaemonError::Signals)?;
    let handle = signals.handle();
    let signal_task = tokio::spawn(async move {
        let mut signals = signals;
        if let Some(sig) = signals.next().await {
            info!(signal = sig, "shutdown requested");
            let _ = shutdown_tx.send(true);
        }
    });
    let result = run_until(config, shutdown_rx).await;
    handle.close();
    signal_task.abort();
    result
}

/// Runs the daemon until `shutdown` turns true.
pub async fn run_until(config: Config, shutdown: watch::Receiver<bool>) -> Result<(), DaemonError> {
    let m = metrics();
    info!(uri = %redact_uri(&config.mongodb.uri), streams = config.streams.len(), "starting eventsyncd");
    let stream_units: usize = config
        .streams
        .iter()
        .map(|s| s.partitions.max(1) as usize)
        .sum();
    let client = config.mongodb.connect(stream_units).await?;
    let store = Store::new(client.clone(), &config.mongodb.event_database);
    let health = Health::new(config.ops.ready_max_lag_secs);
    let publisher = Publisher::new();

    // Operations port first, so probes answer while MongoDB is still coming up.
    let ops_listener = tokio::net::TcpListener::bind(config.ops.listen)
        .await
        .map_err(|source| DaemonError::Bind {
            addr: config.ops.listen,
            source,
        })?;
    info!(addr = %config.ops.listen, "operations port listening");
    let ops_router = health::router(health.clone());
    let mut ops_shutdown = shutdown.clone();
    let ops_task = tokio::spawn(async move {
        let _ = axum::serve(ops_listener, ops_router)
            .with_graceful_shutdown(async move {
                let _ = ops_shutdown.wait_for(|v| *v).await;
            })
            .await;
    });

    // MongoDB pinger for readiness.
    let ping_store = store.clone();
    let ping_health = health.clone();
    let ping_every = Duration::from_millis(config.ops.ping_interval_ms);
    let mut ping_shutdown = shutdown.clone();
    let pinger = tokio::spawn(async move {
        loop {
            let ok = tokio::time::timeout(
                ping_every.max(Duration::from_millis(500)) * 2,
                ping_store.ping(),
            )
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false);
            ping_health.set_mongo(ok);
            tokio::select! {
                _ = tokio::time::sleep(ping_every) => {}
                _ = ping_shutdown.wait_for(|v| *v) => break,
            }
        }
    });

    // Indexes: retried until MongoDB answers (or shutdown).
    let mut idx_shutdown = shutdown.clone();
    loop {
        match store.ensure_indexes().await {
            Ok(()) => break,
            Err(e) => {
                m.error("startup", e.kind());
                warn!(error = %e, "cannot prepare the daemon database yet; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = idx_shutdown.wait_for(|v| *v) => {
                        ops_task.abort();
                        pinger.abort();
                        return Ok(());
                    }
                }
            }
        }
    }

    // Sync query port.
    let api_task = crate::api::serve(&config, store.clone(), publisher.clone(), shutdown.clone())
        .await
        .map_err(|source| DaemonError::Bind {
            addr: config.sync.listen,
            source,
        })?;
    let compaction_task = crate::compaction::spawn(&config, store.clone(), shutdown.clone());
    let oplog_task = crate::ops::oplog::spawn(
        store.clone(),
        config.streams.iter().map(|s| s.name()).collect(),
        Duration::from_millis(config.ops.oplog_interval_ms),
        shutdown.clone(),
    );

    let holder = config.lease.holder();
    // Every stream counts for readiness from the start, not only once its worker runs.
    let streams: Vec<(&crate::pipeline::StreamConfig, String, Option<Partition>)> = config
        .streams
        .iter()
        .flat_map(|s| s.streams().into_iter().map(move |(n, p)| (s, n, p)))
        .collect();
    for (_, name, _) in &streams {
        health.set_role(name, crate::ops::health::StreamRole::Starting);
    }
    let balancer = Balancer::new(
        &holder,
        streams.iter().map(|(_, n, _)| n.clone()),
        Balancer::grace_for(&config.lease),
    );
    // A first view before the streams start, so a lone replica consumes at once.
    if let Err(e) = refresh(&store, &balancer, config.lease.ttl()).await {
        m.error("membership", e.kind());
        warn!(error = %e, "cannot read the replica membership yet; streams wait for it");
    }
    let membership = tokio::spawn(run_membership(
        store.clone(),
        balancer.clone(),
        config.lease.clone(),
        shutdown.clone(),
    ));
    let mut workers = Vec::new();
    for (s, name, partition) in streams {
        let worker = StreamWorker {
            name,
            partition,
            source: client.database(&s.database).collection(&s.collection),
            store: store.clone(),
            fields: config.stamp.clone(),
            pipeline: config.pipeline.clone(),
            lease: config.lease.clone(),
            holder: holder.clone(),
            publisher: publisher.clone(),
            health: health.clone(),
            balancer: balancer.clone(),
        };
        workers.push(tokio::spawn(worker.supervise(shutdown.clone())));
    }
    info!(holder = %holder, "eventsyncd running");
    let ready_log = tokio::spawn(log_when_ready(
        health.clone(),
        config.clone(),
        shutdown.clone(),
    ));

    let mut wait = shutdown.clone();
    let _ = wait.wait_for(|v| *v).await;
    info!("stopping streams");
    let stop = async {
        for w in workers {
            if let Err(e) = w.await {
                error!(error = %e, "stream task failed");
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), stop)
        .await
        .is_err()
    {
        warn!("streams did not stop within 10 s");
    }
    // After the streams released their leases: the heartbeat goes last.
    if tokio::time::timeout(Duration::from_secs(2), membership)
        .await
        .is_err()
    {
        warn!("membership task did not stop within 2 s");
    }
    pinger.abort();
    ready_log.abort();
    compaction_task.abort();
    oplog_task.abort();
    let _ = tokio::time::timeout(Duration::from_secs(2), api_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), ops_task).await;
    let _ = Arc::strong_count(&health);
    info!("eventsyncd stopped");
    Ok(())
}

/// Logs one line, the first time `/readyz` would answer 200, saying where everything is.
async fn log_when_ready(health: Arc<Health>, config: Config, mut shutdown: watch::Receiver<bool>) {
    loop {
        if health.readiness().0 {
            // A wildcard address is reachable on loopback: print one that can be pasted.
            let url = |mut addr: std::net::SocketAddr| {
                if addr.ip().is_unspecified() {
                    addr.set_ip(if addr.is_ipv4() {
                        std::net::Ipv4Addr::LOCALHOST.into()
                    } else {
                        std::net::Ipv6Addr::LOCALHOST.into()
                    });
                }
                format!("http://{addr}")
            };
            let (sync, ops) = (url(config.sync.listen), url(config.ops.listen));
            let streams: Vec<String> = config.streams.iter().map(|s| s.name()).collect();
            info!(
                sync_api = %format!("{sync}/v1"),
                openapi = %format!("{sync}/v1/openapi.json"),
                metrics = %format!("{ops}/metrics"),
                readyz = %format!("{ops}/readyz"),
                streams = %streams.join(","),
                "eventsyncd ready: serving {} stream(s) on {sync}/v1 (OpenAPI {sync}/v1/openapi.json); \
                 metrics {ops}/metrics, readiness {ops}/readyz",
                streams.len()
            );
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = shutdown.wait_for(|v| *v) => return,
        }
    }
}
