//! Sync client registration and acknowledgements (`UpdateVectorClock`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::auth::Caller;
use super::error::{ApiError, ApiJson, ApiPath};
use super::model::{check_client_id, ClientOut, VectorBody};
use super::AppState;

/// Body of a registration.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    /// Free text.
    #[serde(default)]
    description: Option<String>,
    /// An initial vector: pins the events it does not cover against compaction (e.g.
    /// `position: 0` for a stream the client will read from the start).
    #[serde(default)]
    vector: Option<VectorBody>,
}

/// List of clients.
#[derive(Debug, Serialize)]
pub struct ClientsResponse {
    clients: Vec<ClientOut>,
}

/// `GET /v1/clients`.
pub async fn list(
    State(app): State<AppState>,
    Caller(who): Caller,
) -> Result<Json<ClientsResponse>, ApiError> {
    // A client token sees only its own record.
    let clients = match &who.client {
        Some(id) => app.store().get_client(id).await?.into_iter().collect(),
        None => app.store().list_clients().await?,
    };
    Ok(Json(ClientsResponse {
        clients: clients.iter().map(ClientOut::from).collect(),
    }))
}

/// `GET /v1/clients/{client_id}`.
pub async fn get(
    State(app): State<AppState>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ClientOut>, ApiError> {
    check_client_id(&id)?;
    who.check_client(&id)?;
    match app.store().get_client(&id).await? {
        Some(c) => Ok(Json(ClientOut::from(&c))),
        None => Err(ApiError::NotFound(format!(
            "client {id:?} is not registered"
        ))),
    }
}

/// `PUT /v1/clients/{client_id}`: 201 when created, 200 when it existed.
pub async fn register(
    State(app): State<AppState>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<String>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    check_client_id(&id)?;
    who.check_client(&id)?;
    let body = match body {
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Err(ApiError::TooLarge(app.config().max_request_bytes))
        }
        Err(r) => return Err(ApiError::bad(r.body_text())),
        Ok(b) if b.iter().all(u8::is_ascii_whitespace) => RegisterBody::default(),
        Ok(b) => serde_json::from_slice::<RegisterBody>(&b)
            .map_err(|e| ApiError::bad(format!("registration body: {e}")))?,
    };
    if body.description.as_ref().is_some_and(|d| d.len() > 1000) {
        return Err(ApiError::bad("description is longer than 1000 bytes"));
    }
    let vector = body
        .vector
        .as_ref()
        .map(|v| v.to_vector(app.streams(), app.config().max_vector_entries))
        .transpose()?;
    if let Some(v) = &vector {
        for s in v.streams.keys() {
            who.check_stream(s)?;
        }
    }
    let (rec, created) = app
        .store()
        .register_client(&id, body.description, vector.as_ref())
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(ClientOut::from(&rec))).into_response())
}

/// `DELETE /v1/clients/{client_id}`.
pub async fn unregister(
    State(app): State<AppState>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    check_client_id(&id)?;
    who.check_client(&id)?;
    if app.store().delete_client(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!(
            "client {id:?} is not registered"
        )))
    }
}

/// `POST /v1/clients/{client_id}/ack`: merges the vector (per entry maximum; an older
/// vector never moves an entry back) and returns the stored one.
pub async fn ack(
    State(app): State<AppState>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<VectorBody>,
) -> Result<Json<ClientOut>, ApiError> {
    check_client_id(&id)?;
    who.check_client(&id)?;
    let vector = body.to_vector(app.streams(), app.config().max_vector_entries)?;
    for s in vector.streams.keys() {
        who.check_stream(s)?;
    }
    let stored = app.store().get_client(&id).await?.ok_or_else(|| {
        ApiError::NotFound(format!(
            "client {id:?} is not registered (PUT /v1/clients/{{client_id}} first)"
        ))
    })?;
    let mut merged = stored.vector.clone();
    merged.merge(&vector);
    if merged.entries() > app.config().max_vector_entries {
        return Err(ApiError::Limit(format!(
            "the merged vector would have {} entries; sync.max_vector_entries is {}",
            merged.entries(),
            app.config().max_vector_entries
        )));
    }
    match app.store().ack_client(&id, &vector).await? {
        Some(c) => Ok(Json(ClientOut::from(&c))),
        None => Err(ApiError::NotFound(format!(
            "client {id:?} is not registered"
        ))),
    }
}
