//! Liveness and readiness, and the operations HTTP server.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::metrics::{metrics, unix_now};

/// What a stream is doing on this replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamRole {
    /// Starting up.
    Starting,
    /// Another replica holds the lease; this one waits to take over.
    StandingBy,
    /// This replica consumes the stream.
    Consuming,
    /// The stream stopped with an error and is being restarted.
    Failed,
}

#[derive(Debug, Clone, Serialize)]
struct StreamHealth {
    role: StreamRole,
    /// Unix seconds of the last progress (change read or idle token stored).
    last_progress: f64,
    lag_seconds: f64,
}

/// Shared health state, updated by the streams and the MongoDB pinger.
#[derive(Debug)]
pub struct Health {
    mongo_ok: AtomicBool,
    streams: Mutex<BTreeMap<String, StreamHealth>>,
    max_lag: f64,
}

impl Health {
    /// A health state with the readiness lag bound.
    pub fn new(max_lag: f64) -> Arc<Self> {
        Arc::new(Self {
            mongo_ok: AtomicBool::new(false),
            streams: Mutex::new(BTreeMap::new()),
            max_lag,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, StreamHealth>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records whether MongoDB answered the last ping.
    pub fn set_mongo(&self, ok: bool) {
        self.mongo_ok.store(ok, Ordering::Relaxed);
        metrics().mongodb_reachable.set(i64::from(ok));
    }

    /// Records a stream's role; also sets `eventsync_lease_held` (1 only while consuming),
    /// so a replica standing by reports 0 rather than nothing, and drops the stream's lag
    /// and checkpoint-age series while it does not consume it.
    pub fn set_role(&self, stream: &str, role: StreamRole) {
        let m = metrics();
        let mut s = self.lock();
        let e = s.entry(stream.to_owned()).or_insert_with(|| {
            m.init_stream(stream);
            StreamHealth {
                role,
                last_progress: unix_now(),
                lag_seconds: 0.0,
            }
        });
        e.role = role;
        e.last_progress = unix_now();
        if role != StreamRole::Consuming {
            e.lag_seconds = 0.0;
        }
        m.lease_held
            .with_label_values(&[stream])
            .set(i64::from(role == StreamRole::Consuming));
        if role != StreamRole::Consuming {
            // Lags describe consumption: a replica that does not consume the stream (any
            // more) must not report a stale value next to the consumer's.
            let _ = m.change_stream_lag.remove_label_values(&[stream]);
            let _ = m.replication_lag.remove_label_values(&[stream]);
            let _ = m.checkpoint_age.remove_label_values(&[stream]);
        }
    }

    /// Records progress of a consumed stream with its current lag.
    pub fn progress(&self, stream: &str, lag_seconds: f64) {
        if let Some(e) = self.lock().get_mut(stream) {
            e.last_progress = unix_now();
            e.lag_seconds = lag_seconds.max(0.0);
        }
    }

    /// Ready: MongoDB reachable, streams started, every stream consuming or standing by,
    /// lag under bound.
    pub fn readiness(&self) -> (bool, serde_json::Value) {
        let mongo = self.mongo_ok.load(Ordering::Relaxed);
        let streams = self.lock().clone();
        let mut problems = Vec::new();
        if !mongo {
            problems.push("mongodb unreachable".to_owned());
        }
        if streams.is_empty() {
            // A configuration always has a stream: none yet means they have not started.
            problems.push("streams not started yet".to_owned());
        }
        for (name, s) in &streams {
            match s.role {
                StreamRole::Consuming if s.lag_seconds > self.max_lag => problems.push(format!(
                    "stream {name} lags {:.1}s (bound {:.1}s)",
                    s.lag_seconds, self.max_lag
                )),
                StreamRole::Consuming | StreamRole::StandingBy => {}
                other => problems.push(format!("stream {name} is {other:?}")),
            }
        }
        let ready = problems.is_empty();
        (
            ready,
            serde_json::json!({ "ready": ready, "mongodb": mongo, "streams": streams, "problems": problems }),
        )
    }
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let (ready, body) = health.readiness();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

async fn render_metrics(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let m = metrics();
    m.ready.set(i64::from(health.readiness().0));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.render(),
    )
}

/// The router of the operations port.
pub fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(health)
}

/// Binds the operations port.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, name: &str, stream: &str) -> Option<f64> {
        let prefix = format!("{name}{{stream=\"{stream}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.parse().expect("a number"))
    }

    #[test]
    fn lease_held_follows_the_role_and_checkpoint_age_is_computed_when_scraped() {
        let m = metrics();
        let h = Health::new(60.0);
        let s = "unit_health.items";
        h.set_mongo(true);
        assert!(!h.readiness().0, "not ready before the streams start");

        h.set_role(s, StreamRole::StandingBy);
        let text = m.render();
        assert_eq!(sample(&text, "eventsync_lease_held", s), Some(0.0));
        assert_eq!(
            sample(&text, "eventsync_lease_acquisitions_total", s),
            Some(0.0)
        );
        assert!(h.readiness().0, "standing by is ready");

        h.set_role(s, StreamRole::Consuming);
        m.checkpoint_timestamp
            .with_label_values(&[s])
            .set(unix_now() - 42.0);
        m.change_stream_lag.with_label_values(&[s]).set(0.5);
        let text = m.render();
        assert_eq!(sample(&text, "eventsync_lease_held", s), Some(1.0));
        let age = sample(&text, "eventsync_checkpoint_age_seconds", s).expect("age");
        assert!((42.0..45.0).contains(&age), "age {age}");

        // Lost the lease: 0, and no consumer-only series left behind.
        h.set_role(s, StreamRole::Failed);
        let text = m.render();
        assert_eq!(sample(&text, "eventsync_lease_held", s), Some(0.0));
        assert_eq!(sample(&text, "eventsync_checkpoint_age_seconds", s), None);
        assert_eq!(
            sample(&text, "eventsync_change_stream_lag_seconds", s),
            None
        );
        assert!(!h.readiness().0, "a failed stream is not ready");

        h.set_mongo(false);
        assert!(m
            .render()
            .lines()
            .any(|l| l == "eventsync_mongodb_reachable 0"));
    }
}
