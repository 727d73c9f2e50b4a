//! The sync query port: HTTP/JSON API over the event log, described by the OpenAPI
//! document `docs/openapi.json` (served at `/v1/openapi.json`).
//!
//! * [`sync`] — missing events for a state vector, one document's events, state and
//!   write checkpoint, streams;
//! * [`clients`] — registration and acknowledged vectors (`UpdateVectorClock`);
//! * [`live`] — live subscriptions (SSE) resumable by position;
//! * [`error`] — the typed [`ApiError`] and JSON error bodies;
//! * [`model`] — the JSON shapes (documents and patches in the type-preserving
//!   representation of [`crate::diff::repr`]).
//!
//! Auth: `Authorization: Bearer <token>` with one of `sync.tokens` (401 without a token,
//! 403 with a wrong one; an empty list leaves the API open). CORS only for
//! `sync.cors_origins` (closed by default).

pub mod clients;
pub mod error;
pub mod live;
pub mod model;
pub mod sync;

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde::Deserialize;

pub use error::ApiError;

use crate::config::{in_range, ConfigError};
use crate::mongo::Store;
use crate::ops::metrics;
use crate::pipeline::publish::Publisher;

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
    /// Items buffered per live subscriber (also the read batch of its tail).
    pub live_buffer: usize,
    /// A live subscriber that takes no item for this long is dropped, milliseconds.
    pub live_send_timeout_ms: u64,
    /// Interval of SSE keep-alive comments on idle subscriptions, milliseconds.
    pub keep_alive_ms: u64,
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
            live_buffer: 64,
            live_send_timeout_ms: 10_000,
            keep_alive_ms: 15_000,
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
        in_range("sync.live_buffer", self.live_buffer, 1, 10_000)?;
        in_range(
            "sync.live_send_timeout_ms",
            self.live_send_timeout_ms,
            100,
            600_000,
        )?;
        in_range("sync.keep_alive_ms", self.keep_alive_ms, 100, 600_000)?;
        if let Some(i) = self
            .cors_origins
            .iter()
            .position(|o| o != "*" && axum::http::HeaderValue::from_str(o).is_err())
        {
            return Err(ConfigError::invalid(
                format!("sync.cors_origins[{i}]"),
                "is not a valid origin (e.g. \"https://app.example.com\", or \"*\")",
            ));
        }
        if let Some(i) = self.tokens.iter().position(|t| t.len() < 16) {
            return Err(ConfigError::invalid(
                format!("sync.tokens[{i}]"),
                "is shorter than 16 characters; use a long random token",
            ));
        }
        Ok(())
    }
}

/// The OpenAPI document of this API (the repository's `docs/openapi.json`).
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    publisher: Publisher,
    config: SyncConfig,
    streams: Vec<String>,
    subscribers: AtomicUsize,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl AppState {
    /// State for the handlers.
    pub fn new(
        config: SyncConfig,
        streams: Vec<String>,
        store: Store,
        publisher: Publisher,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                publisher,
                config,
                streams,
                subscribers: AtomicUsize::new(0),
                shutdown,
            }),
        }
    }
    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }
    /// The settings.
    pub fn config(&self) -> &SyncConfig {
        &self.inner.config
    }
    /// The configured stream names.
    pub fn streams(&self) -> &[String] {
        &self.inner.streams
    }
}

macro_rules! routes {
    ($( $method:ident $path:literal => $handler:path ),* $(,)?) => {
        /// Every route of the API as `(method, path)`, path in OpenAPI template syntax.
        pub const ROUTES: &[(&str, &str)] = &[ $( (stringify!($method), $path) ),* ];

        fn add_routes(r: Router<AppState>) -> Router<AppState> {
            r $( .route($path, axum::routing::$method($handler)) )*
        }
    };
}

routes! {
    get "/v1/openapi.json" => openapi,
    post "/v1/sync/missing" => sync::missing,
    get "/v1/streams" => sync::streams,
    get "/v1/streams/{stream}" => sync::stream,
    get "/v1/streams/{stream}/live" => live::live,
    get "/v1/streams/{stream}/documents/{key}/events" => sync::doc_events,
    get "/v1/streams/{stream}/documents/{key}/state" => sync::doc_state,
    get "/v1/streams/{stream}/documents/{key}/write-checkpoint" => sync::write_checkpoint,
    get "/v1/clients" => clients::list,
    get "/v1/clients/{client_id}" => clients::get,
    put "/v1/clients/{client_id}" => clients::register,
    delete "/v1/clients/{client_id}" => clients::unregister,
    post "/v1/clients/{client_id}/ack" => clients::ack,
}

async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        OPENAPI,
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route; see /v1/openapi.json".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Compares without an early exit on the first differing byte.
fn same_token(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let tokens = &app.config().tokens;
    if tokens.is_empty() || req.uri().path() == "/v1/openapi.json" {
        return next.run(req).await;
    }
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|h| h.as_bytes());
    let token = match header {
        None => return ApiError::Unauthorized.into_response(),
        Some(h) => match h.get(..7) {
            Some(p) if p.eq_ignore_ascii_case(b"bearer ") => h[7..].trim_ascii(),
            _ => return ApiError::Unauthorized.into_response(),
        },
    };
    if tokens.iter().any(|t| same_token(t.as_bytes(), token)) {
        next.run(req).await
    } else {
        ApiError::Forbidden.into_response()
    }
}

async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let method = req.method().as_str().to_owned();
    let started = Instant::now();
    let resp = next.run(req).await;
    let m = metrics();
    m.http_duration
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    m.http_requests
        .with_label_values(&[&route, &method, resp.status().as_str()])
        .inc();
    resp
}

fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::HeaderName::from_static("last-event-id"),
            ]),
    )
}

/// The API router.
pub fn router(app: AppState) -> Router {
    let limit = app.config().max_request_bytes;
    let cors = cors(&app.config().cors_origins);
    let r = add_routes(Router::new())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::Extension(error::BodyLimit(limit)))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(app.clone(), auth))
        .layer(axum::middleware::from_fn(track))
        .with_state(app);
    match cors {
        Some(c) => r.layer(c),
        None => r,
    }
}

/// Binds the sync port and serves until `shutdown` turns true.
pub async fn serve(
    config: &crate::config::Config,
    store: Store,
    publisher: Publisher,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(config.sync.listen).await?;
    tracing::info!(addr = %config.sync.listen, "sync port listening");
    if config.sync.tokens.is_empty() {
        tracing::warn!("sync.tokens is empty: the sync API is open to anyone who can reach it");
    }
    if let Err(e) = store.ensure_snapshot_indexes().await {
        tracing::warn!(error = %e, "cannot create the snapshot indexes");
    }
    let app = AppState::new(
        config.sync.clone(),
        config
            .streams
            .iter()
            .flat_map(|s| s.streams().into_iter().map(|(n, _)| n))
            .collect(),
        store,
        publisher,
        shutdown.clone(),
    );
    let router = router(app);
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|v| *v).await;
            })
            .await;
    }))
}
