//! The sync query port: HTTP/JSON API over the event log, described by the OpenAPI
//! document `docs/openapi.json` (served at `/v1/openapi.json`).
//!
//! * [`sync`] — missing events for a state vector, one document's events, state and
//!   write checkpoint, streams;
//! * [`clients`] — registration and acknowledged vectors (`UpdateVectorClock`);
//! * [`live`] — live subscriptions (SSE) resumable by position, fed by [`tail`] (one shared
//!   reader of the log per stream, handed appended events by this replica's appender);
//! * [`frames`] — items encoded once from raw BSON, shared by subscribers and catch-up;
//! * [`error`] — the typed [`ApiError`] and JSON error bodies;
//! * [`model`] — the JSON shapes (documents and patches in the type-preserving
//!   representation of [`crate::diff::repr`]).
//!
//! Auth ([`auth`]): `Authorization: Bearer <token>`; `sync.tokens` and `auth.admin_tokens`
//! give full access, `[[auth.clients]]` and signed JWTs act as one client id over listed
//! streams (401 without a token or with an invalid JWT, 403 with an unknown token or for
//! something the token may not do; no credentials configured leaves the API open). CORS
//! only for `sync.cors_origins` (closed by default). Admission control: at most
//! `sync.max_concurrent_catchups` catch-ups at once, beyond that `503` + `Retry-After`.
//! [`admin`] is the operator surface under `/v1/admin`.

pub mod admin;
pub mod auth;
pub mod cli;
pub mod clients;
pub mod error;
pub mod frames;
pub mod live;
pub mod model;
pub mod sync;
pub mod tail;

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
    /// Items buffered per live subscriber (also its read batch when it reads the log).
    pub live_buffer: usize,
    /// Most items in the shared tail's buffer of recent events, per stream; subscribers and
    /// `/v1/sync/missing` requests within it are served from memory.
    pub tail_buffer: usize,
    /// Most bytes in the shared tail's buffer, per stream.
    pub tail_buffer_bytes: usize,
    /// A live subscriber that takes no item for this long is dropped, milliseconds.
    pub live_send_timeout_ms: u64,
    /// Interval of SSE keep-alive comments on idle subscriptions, milliseconds.
    pub keep_alive_ms: u64,
    /// Most catch-ups (`POST /v1/sync/missing`) served at once by this replica; beyond,
    /// `503` with `Retry-After`.
    pub max_concurrent_catchups: usize,
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
            tail_buffer: 10_000,
            tail_buffer_bytes: 16 * 1024 * 1024,
            live_send_timeout_ms: 10_000,
            keep_alive_ms: 15_000,
            max_concurrent_catchups: 64,
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
        in_range("sync.tail_buffer", self.tail_buffer, 1, 10_000_000)?;
        in_range(
            "sync.tail_buffer_bytes",
            self.tail_buffer_bytes,
            64 * 1024,
            16 * 1024 * 1024 * 1024,
        )?;
        in_range(
            "sync.live_send_timeout_ms",
            self.live_send_timeout_ms,
            100,
            600_000,
        )?;
        in_range("sync.keep_alive_ms", self.keep_alive_ms, 100, 600_000)?;
        in_range(
            "sync.max_concurrent_catchups",
            self.max_concurrent_catchups,
            1,
            100_000,
        )?;
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

/// A running catch-up; frees its slot when dropped.
pub struct CatchupSlot(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

impl Drop for CatchupSlot {
    fn drop(&mut self) {
        metrics().catchups_in_flight.dec();
    }
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    tails: tail::Tails,
    config: SyncConfig,
    streams: Vec<String>,
    subscribers: AtomicUsize,
    shutdown: tokio::sync::watch::Receiver<bool>,
    auth: auth::Authenticator,
    catchups: Arc<tokio::sync::Semaphore>,
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
        let open = auth::Authenticator::new(&config.tokens, &auth::AuthConfig::default())
            .unwrap_or_else(|_| auth::Authenticator::empty());
        Self::with_auth(config, streams, store, publisher, shutdown, open)
    }

    /// State for the handlers, with the credentials of `[auth]`.
    pub fn with_auth(
        config: SyncConfig,
        streams: Vec<String>,
        store: Store,
        publisher: Publisher,
        shutdown: tokio::sync::watch::Receiver<bool>,
        auth: auth::Authenticator,
    ) -> Self {
        let catchups = Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_catchups));
        Self {
            inner: Arc::new(Inner {
                tails: tail::Tails::new(
                    store.clone(),
                    publisher,
                    tail::TailConfig {
                        poll: std::time::Duration::from_millis(config.tail_poll_ms),
                        max_items: config.tail_buffer,
                        max_bytes: config.tail_buffer_bytes,
                    },
                    shutdown.clone(),
                ),
                store,
                config,
                streams,
                subscribers: AtomicUsize::new(0),
                shutdown,
                auth,
                catchups,
            }),
        }
    }

    /// A catch-up slot, or `503 busy` when `sync.max_concurrent_catchups` are running.
    pub fn catchup_slot(&self) -> Result<CatchupSlot, ApiError> {
        match self.inner.catchups.clone().try_acquire_owned() {
            Ok(p) => {
                metrics().catchups_in_flight.inc();
                Ok(CatchupSlot(p))
            }
            Err(_) => {
                metrics()
                    .catchups_rejected
                    .with_label_values(&["max_concurrent_catchups"])
                    .inc();
                Err(ApiError::Busy(format!(
                    "{} catch-ups are running (sync.max_concurrent_catchups); retry after the Retry-After delay",
                    self.inner.config.max_concurrent_catchups
                )))
            }
        }
    }
    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }
    /// The shared live tails.
    pub fn tails(&self) -> &tail::Tails {
        &self.inner.tails
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
    get "/v1/admin/streams" => admin::streams,
    get "/v1/admin/streams/{stream}" => admin::stream,
    post "/v1/admin/streams/{stream}/resync" => admin::resync,
    post "/v1/admin/streams/{stream}/pause" => admin::pause,
    post "/v1/admin/streams/{stream}/resume" => admin::resume,
    post "/v1/admin/streams/{stream}/start-at" => admin::start_at,
    get "/v1/admin/controls" => admin::controls,
    get "/v1/admin/controls/{id}" => admin::control,
    get "/v1/admin/dead-letters" => admin::dead_letters,
    get "/v1/admin/dead-letters/{id}" => admin::dead_letter,
    post "/v1/admin/dead-letters/{id}/redrive" => admin::redrive,
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

async fn authenticate(State(app): State<AppState>, mut req: Request, next: Next) -> Response {
    if req.uri().path() == "/v1/openapi.json" {
        return next.run(req).await;
    }
    let token = match req.headers().get(header::AUTHORIZATION) {
        None => None,
        Some(h) => {
            let h = h.as_bytes();
            match h.get(..7) {
                Some(p) if p.eq_ignore_ascii_case(b"bearer ") => {
                    match std::str::from_utf8(h[7..].trim_ascii()) {
                        Ok(t) => Some(t),
                        Err(_) => {
                            return ApiError::Forbidden("bearer token not accepted".into())
                                .into_response()
                        }
                    }
                }
                _ => {
                    return ApiError::Unauthorized(
                        "expected `Authorization: Bearer <token>`".into(),
                    )
                    .into_response()
                }
            }
        }
    };
    match app.inner.auth.resolve(token) {
        Ok(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Err(auth::Rejection::Unauthenticated(why)) => ApiError::Unauthorized(why).into_response(),
        Err(auth::Rejection::Unknown) => {
            ApiError::Forbidden("bearer token not accepted".into()).into_response()
        }
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
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            authenticate,
        ))
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
    let authenticator = auth::Authenticator::new(&config.sync.tokens, &config.auth)
        .map_err(std::io::Error::other)?;
    if authenticator.is_open() {
        tracing::warn!("no credentials configured (sync.tokens, [auth]): the sync and admin API is open to anyone who can reach it");
    }
    if let Err(e) = store.ensure_snapshot_indexes().await {
        tracing::warn!(error = %e, "cannot create the snapshot indexes");
    }
    let app = AppState::with_auth(
        config.sync.clone(),
        config
            .streams
            .iter()
            .flat_map(|s| s.streams().into_iter().map(|(n, _)| n))
            .collect(),
        store,
        publisher,
        shutdown.clone(),
        authenticator,
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
