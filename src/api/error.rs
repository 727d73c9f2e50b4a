//! Errors of the sync API: one typed enum mapped to status codes and a JSON body
//! `{ "error": "<code>", "detail": "<what and which limit>" }`, plus extractors whose
//! rejections become such errors (never axum's plain-text ones).

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use crate::mongo::snapshots::StateError;
use crate::mongo::StoreError;

/// Everything the API can answer instead of a result.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No bearer token, or a signed token that fails validation (expired, bad signature).
    #[error("{0}")]
    Unauthorized(String),
    /// A token that is not configured, or one that may not do this (another client's id,
    /// an unlisted stream, an admin route with a client token).
    #[error("{0}")]
    Forbidden(String),
    /// Admission control: too many concurrent catch-ups on this replica; retry later.
    #[error("{0}")]
    Busy(String),
    /// Malformed or out-of-range input.
    #[error("{0}")]
    BadRequest(String),
    /// A configured limit was exceeded by the request (400).
    #[error("{0}")]
    Limit(String),
    /// The body is larger than `sync.max_request_bytes`.
    #[error("request body exceeds sync.max_request_bytes ({0} bytes)")]
    TooLarge(usize),
    /// Unknown stream, client, document version or route.
    #[error("{0}")]
    NotFound(String),
    /// The thing exists but not any more (compacted).
    #[error("{0}")]
    Gone(String),
    /// Conflicting request.
    #[error("{0}")]
    Conflict(String),
    /// Too many live subscriptions on this replica.
    #[error("{0}")]
    TooManySubscribers(String),
    /// Wrong method for the route.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Body with a content type other than JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// MongoDB failed or is unreachable.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A stored record is broken.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BadRequest(_) | ApiError::Limit(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooManySubscribers(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The short machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::Busy(_) => "busy",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Limit(_) => "limit_exceeded",
            ApiError::TooLarge(_) => "payload_too_large",
            ApiError::NotFound(_) => "not_found",
            ApiError::Gone(_) => "gone",
            ApiError::Conflict(_) => "conflict",
            ApiError::TooManySubscribers(_) => "too_many_subscribers",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    /// A bad request.
    pub fn bad(detail: impl Into<String>) -> Self {
        ApiError::BadRequest(detail.into())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Mongo(e) => ApiError::Unavailable(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::Store(s) => s.into(),
            e @ StateError::Compacted { .. } => ApiError::Gone(e.to_string()),
            e @ StateError::NoSuchVersion { .. } => ApiError::NotFound(e.to_string()),
            e @ StateError::Broken(_) => ApiError::Internal(e.to_string()),
        }
    }
}

/// A random id tying a 5xx answer to the log line that carries its cause.
pub fn request_id() -> String {
    use rand::Rng;
    format!("{:016x}", rand::thread_rng().gen::<u64>())
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let m = crate::ops::metrics();
        let overload = matches!(self, ApiError::TooManySubscribers(_) | ApiError::Busy(_));
        let body = if status.is_server_error() && !overload {
            // A daemon-side failure: counted as an error, its cause (driver text included)
            // logged under a request id, and only that id shown to the caller.
            m.error("api", self.code());
            let id = request_id();
            tracing::warn!(request_id = %id, error = %self, "sync API error");
            serde_json::json!({
                "error": self.code(),
                "detail": match self {
                    ApiError::Unavailable(_) => "storage unavailable; retry later",
                    _ => "internal error; the daemon log has the cause under this request id",
                },
                "request_id": id,
            })
        } else {
            // Caused by the caller (or overload): counted by status, not as a daemon error.
            m.http_client_errors
                .with_label_values(&[status.as_str(), self.code()])
                .inc();
            serde_json::json!({ "error": self.code(), "detail": self.to_string() })
        };
        let request_id = body
            .get("request_id")
            .and_then(|v| v.as_str())
            .and_then(|v| HeaderValue::from_str(v).ok());
        let mut resp = (status, axum::Json(body)).into_response();
        if let Some(id) = request_id {
            resp.headers_mut().insert("x-request-id", id);
        }
        match self {
            ApiError::TooManySubscribers(_) | ApiError::Unavailable(_) => {
                resp.headers_mut()
                    .insert("retry-after", HeaderValue::from_static("5"));
            }
            ApiError::Busy(_) => {
                resp.headers_mut()
                    .insert("retry-after", HeaderValue::from_static("1"));
            }
            ApiError::Unauthorized(_) => {
                resp.headers_mut()
                    .insert("www-authenticate", HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        resp
    }
}

fn json_rejection(r: JsonRejection, limit: usize) -> ApiError {
    match r {
        JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType(
            "expected a JSON body with Content-Type: application/json".into(),
        ),
        JsonRejection::BytesRejection(b) if b.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::TooLarge(limit)
        }
        other => ApiError::BadRequest(other.body_text()),
    }
}

/// The configured body limit, stored in request extensions by the router.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimit(pub usize);

/// `Json<T>` whose rejections are [`ApiError`]s.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req.extensions().get::<BodyLimit>().map_or(0, |l| l.0);
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(r) => Err(json_rejection(r, limit)),
        }
    }
}

/// `Query<T>` whose rejections are [`ApiError`]s.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(r) => Err(ApiError::BadRequest(match r {
                QueryRejection::FailedToDeserializeQueryString(e) => e.body_text(),
                other => other.body_text(),
            })),
        }
    }
}

/// `Path<T>` whose rejections are [`ApiError`]s.
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(r @ PathRejection::FailedToDeserializePathParams(_)) => {
                Err(ApiError::BadRequest(r.body_text()))
            }
            Err(r) => Err(ApiError::Internal(r.body_text())),
        }
    }
}
