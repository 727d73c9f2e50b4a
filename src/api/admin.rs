//! The admin surface (`/v1/admin/...`, admin tokens only): stream status, operator
//! controls (re-read, pause, resume, start-at) and dead letters.
//!
//! Controls are stored as requests in the daemon database ([`crate::mongo::controls`]), so
//! any replica accepts them and the stream's lease holder carries them out within about a
//! second ([`crate::pipeline::control`]); the answer is `202` with the request, whose
//! `state` turns `done` (or `failed`) — poll `GET /v1/admin/controls/{id}`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bson::oid::ObjectId;
use bson::{Bson, DateTime, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::auth::Caller;
use super::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use super::AppState;
use crate::mongo::controls::{ControlAction, ControlRecord, DeadLetter, StartPoint};
use crate::mongo::get_int;
use crate::ops::metrics;

fn now_ms() -> i64 {
    DateTime::now().timestamp_millis()
}

fn ext(b: Bson) -> Value {
    b.into_relaxed_extjson()
}

fn ms_to_rfc3339(ms: i64) -> String {
    DateTime::from_millis(ms)
        .try_to_rfc3339_string()
        .unwrap_or_default()
}

fn known(app: &AppState, stream: &str) -> Result<(), ApiError> {
    if app.streams().iter().any(|s| s == stream) {
        Ok(())
    } else {
        Err(ApiError::NotFound(format!(
            "unknown stream {stream:?}; known: {}",
            app.streams().join(", ")
        )))
    }
}

fn parse_oid(what: &str, s: &str) -> Result<ObjectId, ApiError> {
    ObjectId::parse_str(s).map_err(|_| ApiError::bad(format!("{what} must be a 24-digit hex id")))
}

/// A control request as shown to operators and clients.
#[derive(Debug, Clone, Serialize)]
pub struct ControlOut {
    /// Its id.
    pub id: String,
    /// The stream.
    pub stream: String,
    /// `resync`, `pause`, `resume`, `start_at`.
    pub action: String,
    /// Why, when given.
    pub reason: Option<String>,
    /// Who asked.
    pub requested_by: String,
    /// When (RFC 3339).
    pub requested_at: String,
    /// `pending`, `done` or `failed`.
    pub state: String,
    /// When carried out.
    pub done_at: Option<String>,
    /// By which replica.
    pub holder: Option<String>,
    /// What happened.
    pub result: Option<String>,
}

impl From<&ControlRecord> for ControlOut {
    fn from(r: &ControlRecord) -> Self {
        use crate::mongo::controls::ControlState;
        Self {
            id: r.id.to_hex(),
            stream: r.stream.clone(),
            action: r.action.name().to_owned(),
            reason: r.reason.clone(),
            requested_by: r.requested_by.clone(),
            requested_at: ms_to_rfc3339(r.requested_at_ms),
            state: match r.state {
                ControlState::Pending => "pending",
                ControlState::Done => "done",
                ControlState::Failed => "failed",
            }
            .to_owned(),
            done_at: r.done_at_ms.map(ms_to_rfc3339),
            holder: r.holder.clone(),
            result: r.result.clone(),
        }
    }
}

/// Checkpoint part of a stream status.
#[derive(Debug, Serialize)]
pub struct CheckpointOut {
    /// The log position it covers.
    pub seq: i64,
    /// Seconds since it was stored.
    pub age_seconds: f64,
    /// A re-read is in progress.
    pub resync_pending: bool,
    /// The resume token.
    pub token: Option<Value>,
}

/// Status of one stream.
#[derive(Debug, Serialize)]
pub struct StatusOut {
    stream: String,
    /// The replica holding the lease (unexpired), if any.
    holder: Option<String>,
    /// The lease epoch (grows with every change of holder).
    epoch: Option<i64>,
    /// Milliseconds until the lease expires without renewal.
    lease_expires_in_ms: Option<i64>,
    /// Position of the last event.
    head: i64,
    checkpoint: Option<CheckpointOut>,
    /// Seconds behind the source at the holder's last report.
    lag_seconds: Option<f64>,
    /// Paused by an operator (holder's last report).
    paused: bool,
    /// Seconds since the holder's last report.
    report_age_seconds: Option<f64>,
    /// The last error that stopped the stream, and when.
    last_error: Option<String>,
    last_error_at: Option<String>,
    /// Requests not yet carried out.
    pending_controls: usize,
}

async fn status_of(app: &AppState, stream: &str) -> Result<StatusOut, ApiError> {
    let store = app.store();
    let now = now_ms();
    let lease = store.lease_record(stream).await?;
    let expires = lease.as_ref().and_then(|d| get_int(d, "expires_at_ms"));
    let live = expires.is_some_and(|e| e > now);
    let cp = store.load_checkpoint(stream).await?;
    let status = store.load_status(stream).await?;
    let controls = store.list_controls(Some(stream), 100).await?;
    Ok(StatusOut {
        stream: stream.to_owned(),
        holder: lease
            .as_ref()
            .filter(|_| live)
            .and_then(|d| d.get_str("holder").ok().map(str::to_owned)),
        epoch: lease.as_ref().and_then(|d| get_int(d, "epoch")),
        lease_expires_in_ms: expires.filter(|_| live).map(|e| e - now),
        head: store.last_seq(stream).await?,
        checkpoint: cp.map(|c| CheckpointOut {
            seq: c.seq,
            age_seconds: ((now - c.updated_at.timestamp_millis()) as f64 / 1000.0).max(0.0),
            resync_pending: c.resync_pending,
            token: c.token.map(|t| ext(Bson::Document(t))),
        }),
        lag_seconds: status.lag_seconds,
        paused: status.paused,
        report_age_seconds: status
            .updated_at_ms
            .map(|t| ((now - t) as f64 / 1000.0).max(0.0)),
        last_error: status.last_error,
        last_error_at: status.last_error_at_ms.map(ms_to_rfc3339),
        pending_controls: controls
            .iter()
            .filter(|c| c.state == crate::mongo::controls::ControlState::Pending)
            .count(),
    })
}

/// Status of every stream.
#[derive(Debug, Serialize)]
pub struct StatusList {
    streams: Vec<StatusOut>,
}

/// `GET /v1/admin/streams`.
pub async fn streams(
    State(app): State<AppState>,
    Caller(who): Caller,
) -> Result<Json<StatusList>, ApiError> {
    who.require_admin()?;
    let mut out = Vec::new();
    for s in app.streams() {
        out.push(status_of(&app, s).await?);
    }
    Ok(Json(StatusList { streams: out }))
}

/// `GET /v1/admin/streams/{stream}`.
pub async fn stream(
    State(app): State<AppState>,
    Caller(who): Caller,
    ApiPath(stream): ApiPath<String>,
) -> Result<Json<StatusOut>, ApiError> {
    who.require_admin()?;
    known(&app, &stream)?;
    Ok(Json(status_of(&app, &stream).await?))
}

async fn request(
    app: &AppState,
    who: &super::auth::Principal,
    stream: &str,
    action: ControlAction,
    reason: Option<&str>,
) -> Result<Response, ApiError> {
    let rec = request_record(app, who, stream, action, reason).await?;
    Ok((StatusCode::ACCEPTED, Json(ControlOut::from(&rec))).into_response())
}

async fn request_record(
    app: &AppState,
    who: &super::auth::Principal,
    stream: &str,
    action: ControlAction,
    reason: Option<&str>,
) -> Result<ControlRecord, ApiError> {
    known(app, stream)?;
    let rec = app
        .store()
        .request_control(stream, &action, reason, &who.label())
        .await?;
    metrics()
        .admin_actions
        .with_label_values(&[stream, action.name(), "requested"])
        .inc();
    tracing::info!(%stream, action = action.name(), by = %who.label(), id = %rec.id, "operator control requested");
    Ok(rec)
}

/// `POST /v1/admin/streams/{stream}/resync`.
pub async fn resync(
    State(app): State<AppState>,
    Caller(who): Caller,
    ApiPath(stream): ApiPath<String>,
) -> Result<Response, ApiError> {
    who.require_admin()?;
    request(&app, &who, &stream, ControlAction::Resync, None).await
}

/// `POST /v1/admin/streams/{stream}/pause`.
pub async fn pause(
    State(app): State<AppState>,
    Caller(who): Caller,
    ApiPath(stream): ApiPath<String>,
) -> Result<Response, ApiError> {
    who.require_admin()?;
    request(&app, &who, &stream, ControlAction::Pause, None).await
}

/// `POST /v1/admin/streams/{stream}/resume`.
pub async fn resume(
    State(app): State<AppState>,
    Caller(who): Caller,
    ApiPath(stream): ApiPath<String>,
) -> Result<Response, ApiError> {
    who.require_admin()?;
    request(&app, &who, &stream, ControlAction::Resume, None).await
}

/// A cluster time as JSON.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimestampBody {
    /// Seconds since the Unix epoch.
    t: u32,
    /// Ordinal within the second.
    #[serde(default)]
    i: u32,
}

/// Body of `start-at`: exactly one of the fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartAtBody {
    /// `startAtOperationTime`.
    #[serde(default)]
    cluster_time: Option<TimestampBody>,
    /// Unix milliseconds (the cluster time `{t: ms / 1000, i: 0}`).
    #[serde(default)]
    at_ms: Option<i64>,
    /// A resume token (Extended JSON), e.g. from a checkpoint or a change event.
    #[serde(default)]
    resume_token: Option<Value>,
}

/// `POST /v1/admin/streams/{stream}/start-at`.
pub async fn start_at(
    State(app): State<AppState>,
    Caller(who): Caller,
    ApiPath(stream): ApiPath<String>,
    ApiJson(body): ApiJson<StartAtBody>,
) -> Result<Response, ApiError> {
    who.require_admin()?;
    let point = match (body.cluster_time, body.at_ms, body.resume_token) {
        (Some(t), None, None) => StartPoint::ClusterTime(Timestamp {
            time: t.t,
            increment: t.i,
        }),
        (None, Some(ms), None) => {
            let secs = u32::try_from(ms / 1000)
                .map_err(|_| ApiError::bad("at_ms must be a Unix time in milliseconds"))?;
            StartPoint::ClusterTime(Timestamp {
                time: secs,
                increment: 0,
            })
        }
        (None, None, Some(tok)) => match Bson::try_from(tok) {
            Ok(Bson::Document(d)) if !d.is_empty() => StartPoint::Token(d),
            _ => return Err(ApiError::bad("resume_token must be a non-empty object")),
        },
        _ => {
            return Err(ApiError::bad(
                "send exactly one of cluster_time {t, i}, at_ms, resume_token",
            ))
        }
    };
    request(&app, &who, &stream, ControlAction::StartAt(point), None).await
}

/// Query of the control list.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default)]
    stream: Option<String>,
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    limit: Option<i64>,
}

fn list_limit(l: Option<i64>) -> Result<i64, ApiError> {
    match l {
        None => Ok(100),
        Some(l) if (1..=1000).contains(&l) => Ok(l),
        Some(_) => Err(ApiError::bad("limit must be 1 to 1000")),
    }
}

/// Control requests.
#[derive(Debug, Serialize)]
pub struct ControlList {
    controls: Vec<ControlOut>,
}

/// `GET /v1/admin/controls?stream=&limit=` (newest first).
pub async fn controls(
    State(app): State<AppState>,
    Caller(who): Caller,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<ControlList>, ApiError> {
    who.require_admin()?;
    if let Some(s) = &q.stream {
        known(&app, s)?;
    }
    let list = app
        .store()
        .list_controls(q.stream.as_deref(), list_limit(q.limit)?)
        .await?;
    Ok(Json(ControlList {
        controls: list.iter().map(ControlOut::from).collect(),
    }))
}

/// `GET /v1/admin/controls/{id}`.
pub async fn control(
    State(app): State<AppState>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ControlOut>, ApiError> {
    who.require_admin()?;
    let id = parse_oid("control id", &id)?;
    match app.store().get_control(id).await? {
        Some(r) => Ok(Json(ControlOut::from(&r))),
        None => Err(ApiError::NotFound("no such control request".into())),
    }
}

/// A dead letter.
#[derive(Debug, Serialize)]
pub struct DeadLetterOut {
    id: String,
    stream: Option<String>,
    reason: Option<String>,
    detail: Option<String>,
    at: Option<String>,
    /// The document `_id` (Extended JSON), when known.
    doc_id: Option<Value>,
    /// The change's resume token, when known.
    token: Option<Value>,
    /// The control request of the last re-drive, if any.
    redrive_control: Option<String>,
}

impl From<&DeadLetter> for DeadLetterOut {
    fn from(d: &DeadLetter) -> Self {
        let r = &d.record;
        Self {
            id: d.id.to_hex(),
            stream: r.get_str("stream").ok().map(str::to_owned),
            reason: r.get_str("reason").ok().map(str::to_owned),
            detail: r.get_str("detail").ok().map(str::to_owned),
            at: r
                .get_datetime("at")
                .ok()
                .and_then(|t| t.try_to_rfc3339_string().ok()),
            doc_id: r.get("doc_id").cloned().map(ext),
            token: r.get("token").cloned().map(ext),
            redrive_control: r.get_object_id("redrive_control").ok().map(|o| o.to_hex()),
        }
    }
}

/// Dead letters.
#[derive(Debug, Serialize)]
pub struct DeadLetterList {
    dead_letters: Vec<DeadLetterOut>,
    /// Pass as `after` for the next page (absent on the last page).
    next_after: Option<String>,
}

/// `GET /v1/admin/dead-letters?stream=&after=&limit=` (oldest first).
pub async fn dead_letters(
    State(app): State<AppState>,
    Caller(who): Caller,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<DeadLetterList>, ApiError> {
    who.require_admin()?;
    if let Some(s) = &q.stream {
        known(&app, s)?;
    }
    let after = q
        .after
        .as_deref()
        .map(|a| parse_oid("after", a))
        .transpose()?;
    let limit = list_limit(q.limit)?;
    let list = app
        .store()
        .list_dead_letters(q.stream.as_deref(), after, limit)
        .await?;
    let next_after = (list.len() as i64 == limit)
        .then(|| list.last().map(|d| d.id.to_hex()))
        .flatten();
    Ok(Json(DeadLetterList {
        dead_letters: list.iter().map(DeadLetterOut::from).collect(),
        next_after,
    }))
}

/// `GET /v1/admin/dead-letters/{id}`.
pub async fn dead_letter(
    State(app): State<AppState>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<DeadLetterOut>, ApiError> {
    who.require_admin()?;
    let id = parse_oid("dead letter id", &id)?;
    match app.store().get_dead_letter(id).await? {
        Some(d) => Ok(Json(DeadLetterOut::from(&d))),
        None => Err(ApiError::NotFound("no such dead letter".into())),
    }
}

/// `POST /v1/admin/dead-letters/{id}/redrive`: the stream is re-read (the document's
/// current state is compared with its shadow and the difference appended), recorded on
/// the dead letter.
pub async fn redrive(
    State(app): State<AppState>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    who.require_admin()?;
    let oid = parse_oid("dead letter id", &id)?;
    let Some(d) = app.store().get_dead_letter(oid).await? else {
        return Err(ApiError::NotFound("no such dead letter".into()));
    };
    let Some(stream) = d.record.get_str("stream").ok().map(str::to_owned) else {
        return Err(ApiError::Conflict("the dead letter names no stream".into()));
    };
    let reason = format!("redrive of dead letter {id}");
    let rec = request_record(&app, &who, &stream, ControlAction::Resync, Some(&reason)).await?;
    app.store().mark_redrive(oid, rec.id).await?;
    Ok((StatusCode::ACCEPTED, Json(ControlOut::from(&rec))).into_response())
}
