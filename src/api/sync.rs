//! Reading the log: missing events for a state vector, one document's events and state,
//! write checkpoints, streams.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bson::{doc, Bson};
use serde::{Deserialize, Serialize};

use super::auth::Caller;
use super::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use super::frames::{read_page, Frame};
use super::model::{
    parse_key, EventOut, Item, MissingRequest, MissingResponse, NoticeOut, SnapshotOut,
    SnapshotReason,
};
use super::AppState;
use crate::mongo::clients::StateVector;
use crate::mongo::Store;

/// An item of a `/v1/sync/missing` page: encoded once (stream mode, from the tail's buffer
/// or the log), or built for one document (document mode).
enum Out {
    Frame(Arc<Frame>),
    Item(Box<Item>),
}

impl Out {
    fn compacted(&self) -> bool {
        match self {
            Out::Frame(f) => f.snapshot,
            Out::Item(i) => {
                matches!(&**i, Item::Snapshot(s) if s.reason == SnapshotReason::Compacted)
            }
        }
    }
}

/// Staleness beyond which the tail's buffer is not used to answer `/v1/sync/missing`.
fn tail_staleness(app: &AppState) -> Duration {
    Duration::from_millis(app.config().tail_poll_ms.saturating_mul(10)).max(Duration::from_secs(5))
}

/// Items of a whole stream after `after`, at most `limit`: from the stream's shared tail
/// when its buffer covers the position, else from the log (events merged with compaction
/// snapshots by position).
/// A client that compaction passed (it has a notice for the stream) is always answered
/// from the log, which holds the snapshots it was told to expect.
async fn stream_page(
    app: &AppState,
    stream: &str,
    after: i64,
    limit: usize,
    passed: bool,
) -> Result<Vec<Out>, ApiError> {
    let tail = app.tails().get(stream);
    if !passed {
        if let Some(frames) = tail.serve(after, limit, tail_staleness(app)) {
            return Ok(frames.into_iter().map(Out::Frame).collect());
        }
    }
    let frames = read_page(app.store(), stream, after, None, limit, "missing").await?;
    Ok(frames
        .into_iter()
        .map(|f| Out::Frame(Arc::new(f)))
        .collect())
}

/// The response body: the items' JSON (pre-encoded where possible), then the other fields.
fn missing_body(items: &[Out], rest: &MissingResponse) -> Result<Response, ApiError> {
    let size: usize = items
        .iter()
        .map(|i| match i {
            Out::Frame(f) => f.json().len() + 1,
            Out::Item(_) => 512,
        })
        .sum();
    let mut b = Vec::with_capacity(size + 512);
    b.extend_from_slice(b"{\"items\":[");
    for (n, item) in items.iter().enumerate() {
        if n > 0 {
            b.push(b',');
        }
        match item {
            Out::Frame(f) => b.extend_from_slice(f.json()),
            Out::Item(i) => serde_json::to_writer(&mut b, i)
                .map_err(|e| ApiError::Internal(format!("cannot encode an item: {e}")))?,
        }
    }
    b.extend_from_slice(b"],");
    let tail = serde_json::to_vec(rest)
        .map_err(|e| ApiError::Internal(format!("cannot encode the response: {e}")))?;
    // `tail` is a JSON object: continue this one with its members.
    b.extend_from_slice(tail.get(1..).unwrap_or(b"}"));
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        b,
    )
        .into_response())
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Cursor {
    /// Heads of the streams when the first page was read.
    h: BTreeMap<String, i64>,
    /// The stream of the next unit of work.
    s: String,
    /// Document key of the next unit (document mode).
    #[serde(default)]
    k: Option<String>,
    /// Stream mode: position done; document mode: version done.
    #[serde(default)]
    q: i64,
    /// Document mode: the document was started (no "not held" snapshot again).
    #[serde(default)]
    r: bool,
}

fn encode_cursor(c: &Cursor) -> String {
    let json = serde_json::to_vec(c).unwrap_or_default();
    json.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_cursor(s: &str) -> Result<Cursor, ApiError> {
    let bad = || ApiError::bad("cursor is not one this API returned");
    if s.len() % 2 != 0 || s.len() > 64 * 1024 {
        return Err(bad());
    }
    let bytes: Result<Vec<u8>, _> = (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .ok_or(())
                .and_then(|h| u8::from_str_radix(h, 16).map_err(|_| ()))
        })
        .collect();
    let bytes = bytes.map_err(|_| bad())?;
    serde_json::from_slice(&bytes).map_err(|_| bad())
}

/// `POST /v1/sync/missing`.
pub async fn missing(
    State(app): State<AppState>,
    Caller(who): Caller,
    ApiJson(req): ApiJson<MissingRequest>,
) -> Result<Response, ApiError> {
    // Admission control: a slot per catch-up, held until the answer is built.
    let _slot = app.catchup_slot()?;
    if let Some(id) = &req.client_id {
        who.check_client(id)?;
    } else if who.client.is_some() && req.vector.is_none() {
        return Err(ApiError::bad("send a `vector`, or your `client_id`"));
    }
    let cfg = app.config();
    let limit = match req.limit {
        None => cfg.max_page_size.min(100),
        Some(l) if l < 1 => return Err(ApiError::bad("limit must be at least 1")),
        Some(l) if l as u64 > cfg.max_page_size as u64 => {
            return Err(ApiError::Limit(format!(
                "limit {l} exceeds sync.max_page_size ({})",
                cfg.max_page_size
            )))
        }
        Some(l) => l as usize,
    };
    if let Some(id) = &req.client_id {
        super::model::check_client_id(id)?;
    }
    let cursor = req.cursor.as_deref().map(decode_cursor).transpose()?;
    let client = match &req.client_id {
        Some(id) => app.store().get_client(id).await?,
        None => None,
    };
    let vector: StateVector = match (&req.vector, &client, &req.client_id) {
        (Some(v), _, _) => v.to_vector(app.streams(), cfg.max_vector_entries)?,
        (None, Some(c), _) => c.vector.clone(),
        (None, None, Some(id)) => {
            return Err(ApiError::NotFound(format!(
                "client {id:?} is not registered and no vector was sent"
            )))
        }
        (None, None, None) => {
            return Err(ApiError::bad(
                "send a `vector`, or the `client_id` of a registered client",
            ))
        }
    };
    for s in vector.streams.keys() {
        who.check_stream(s)?;
    }
    let heads = match &cursor {
        Some(c) => c.h.clone(),
        None => {
            let mut h = BTreeMap::new();
            for s in vector.streams.keys() {
                // The head of a tail that is level with the log is never past the log's
                // (it holds only durable events), so it is a safe head to report.
                let tail = app.tails().get(s);
                let head = match tail.serve(i64::MAX, 1, tail_staleness(&app)) {
                    Some(_) => tail.head(),
                    None => app.store().last_seq(s).await?,
                };
                h.insert(s.clone(), head);
            }
            h
        }
    };

    let store = app.store();
    let mut items: Vec<Out> = Vec::new();
    let mut positions = BTreeMap::new();
    let mut next: Option<Cursor> = None;
    'streams: for (stream, st) in &vector.streams {
        let here = cursor.as_ref().filter(|c| &c.s == stream);
        if let Some(c) = &cursor {
            if stream < &c.s {
                positions.insert(stream.clone(), heads.get(stream).copied().unwrap_or(0));
                continue;
            }
        }
        if st.documents.is_empty() {
            // Stream mode.
            let mut after = st.position.unwrap_or(0);
            if let Some(c) = here {
                after = after.max(c.q);
            }
            let room = limit - items.len();
            if room == 0 {
                next = Some(Cursor {
                    h: heads.clone(),
                    s: stream.clone(),
                    k: None,
                    q: after,
                    r: false,
                });
                break 'streams;
            }
            let passed = client
                .as_ref()
                .is_some_and(|c| c.notices.iter().any(|n| &n.stream == stream));
            let page = stream_page(&app, stream, after, room, passed).await?;
            let last = page.last().map_or(after, |o| match o {
                Out::Frame(f) => f.seq,
                Out::Item(i) => i.seq(),
            });
            let full = page.len() == room;
            items.extend(page);
            positions.insert(stream.clone(), last);
            if full {
                next = Some(Cursor {
                    h: heads.clone(),
                    s: stream.clone(),
                    k: None,
                    q: last,
                    r: false,
                });
                break 'streams;
            }
        } else {
            // Document mode.
            for (key, dv) in &st.documents {
                let mut after = dv.version;
                let mut resumed = false;
                if let Some(c) = here {
                    match &c.k {
                        Some(k) if key < k => continue,
                        Some(k) if key == k => {
                            after = after.max(c.q);
                            resumed = c.r;
                        }
                        _ => {}
                    }
                }
                let room = limit - items.len();
                if room == 0 {
                    next = Some(Cursor {
                        h: heads.clone(),
                        s: stream.clone(),
                        k: Some(key.clone()),
                        q: after,
                        r: resumed,
                    });
                    break 'streams;
                }
                let (page, done_at, complete) =
                    doc_items(store, stream, &dv.id, key, after, resumed, room).await?;
                items.extend(page.into_iter().map(|i| Out::Item(Box::new(i))));
                if !complete {
                    next = Some(Cursor {
                        h: heads.clone(),
                        s: stream.clone(),
                        k: Some(key.clone()),
                        q: done_at,
                        r: true,
                    });
                    break 'streams;
                }
            }
            positions.insert(stream.clone(), heads.get(stream).copied().unwrap_or(0));
        }
    }
    // Streams not reached yet keep the position the client holds.
    for (stream, st) in &vector.streams {
        positions
            .entry(stream.clone())
            .or_insert_with(|| st.position.unwrap_or(0));
    }
    let compacted = items.iter().any(Out::compacted);
    let notices: Vec<NoticeOut> = client
        .as_ref()
        .map(|c| c.notices.iter().map(NoticeOut::from).collect())
        .unwrap_or_default();
    missing_body(
        &items,
        &MissingResponse {
            has_more: next.is_some(),
            next_cursor: next.as_ref().map(encode_cursor),
            positions,
            compacted,
            reset_required: !notices.is_empty(),
            notices,
        },
    )
}

/// The items one document needs after version `after`: a snapshot when the client holds
/// nothing (or compaction removed what it needs), then events. Returns the items, the
/// version reached and whether the document is complete.
async fn doc_items(
    store: &Store,
    stream: &str,
    id: &Bson,
    key: &str,
    after: i64,
    resumed: bool,
    room: usize,
) -> Result<(Vec<Item>, i64, bool), ApiError> {
    let latest = |reason| async move {
        let s = store.latest_doc_state(stream, key).await?;
        Ok::<_, ApiError>((
            vec![Item::Snapshot(SnapshotOut::from_state(
                stream, id, key, &s, reason,
            ))],
            s.version,
            true,
        ))
    };
    if after == 0 && !resumed {
        return latest(SnapshotReason::NotHeld).await;
    }
    let mut items = Vec::new();
    let mut from = after;
    if let Some(s) = store.load_snapshot(stream, key).await? {
        if s.version > after {
            items.push(Item::Snapshot(SnapshotOut::from_record(
                &s,
                SnapshotReason::Compacted,
            )));
            from = s.version;
        }
    }
    let budget = room - items.len();
    if budget == 0 {
        return Ok((items, from, false));
    }
    let events = store
        .find_events(
            doc! { "ns": stream, "doc_key": key, "to_version": { "$gt": from } },
            doc! { "to_version": 1 },
            budget as i64,
        )
        .await?;
    if let Some(first) = events.first() {
        if first.from_version != from {
            // The client holds a version the log never had (or compaction raced us).
            return latest(SnapshotReason::VersionNotInLog).await;
        }
    }
    let complete = events.len() < budget;
    let reached = events.last().map_or(from, |e| e.to_version);
    for e in &events {
        items.push(Item::Event(EventOut::from_record(e)?));
    }
    Ok((items, reached, complete))
}

fn known_stream(app: &AppState, stream: &str) -> Result<(), ApiError> {
    if app.streams().iter().any(|s| s == stream) {
        Ok(())
    } else {
        Err(ApiError::NotFound(format!(
            "unknown stream {stream:?}; known: {}",
            app.streams().join(", ")
        )))
    }
}

/// Query of the document events route.
#[derive(Debug, Deserialize)]
pub struct DocEventsQuery {
    /// Version held (0: none).
    #[serde(default)]
    after: Option<i64>,
    /// Page size.
    #[serde(default)]
    limit: Option<i64>,
}

/// Response of the document events route.
#[derive(Debug, Serialize)]
pub struct DocEventsResponse {
    stream: String,
    key: String,
    snapshot: Option<SnapshotOut>,
    events: Vec<EventOut>,
    /// Version reached by this page.
    version: i64,
    has_more: bool,
}

fn page_limit(app: &AppState, limit: Option<i64>) -> Result<usize, ApiError> {
    let max = app.config().max_page_size;
    match limit {
        None => Ok(max.min(100)),
        Some(l) if l < 1 => Err(ApiError::bad("limit must be at least 1")),
        Some(l) if l as u64 > max as u64 => Err(ApiError::Limit(format!(
            "limit {l} exceeds sync.max_page_size ({max})"
        ))),
        Some(l) => Ok(l as usize),
    }
}

/// `GET /v1/streams/{stream}/documents/{key}/events`.
pub async fn doc_events(
    State(app): State<AppState>,
    Caller(who): Caller,
    ApiPath((stream, key_text)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<DocEventsQuery>,
) -> Result<Json<DocEventsResponse>, ApiError> {
    known_stream(&app, &stream)?;
    who.check_stream(&stream)?;
    let (_, key) = parse_key(&key_text)?;
    let limit = page_limit(&app, q.limit)?;
    let after = q.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::bad("after must be >= 0"));
    }
    let store = app.store();
    let mut snapshot = None;
    let mut from = after;
    if let Some(s) = store.load_snapshot(&stream, &key).await? {
        if s.version > after {
            from = s.version;
            snapshot = Some(SnapshotOut::from_record(&s, SnapshotReason::Compacted));
        }
    }
    let events = store
        .find_events(
            doc! { "ns": &stream, "doc_key": &key, "to_version": { "$gt": from } },
            doc! { "to_version": 1 },
            limit as i64 + 1,
        )
        .await?;
    let has_more = events.len() > limit;
    let events: Vec<EventOut> = events
        .iter()
        .take(limit)
        .map(EventOut::from_record)
        .collect::<Result<_, _>>()?;
    let version = events.last().map_or(from, |e| e.to_version);
    Ok(Json(DocEventsResponse {
        stream,
        key,
        snapshot,
        events,
        version,
        has_more,
    }))
}

/// Query of the document state route.
#[derive(Debug, Deserialize)]
pub struct StateQuery {
    /// The log version; absent: the latest.
    #[serde(default)]
    version: Option<i64>,
}

/// `GET /v1/streams/{stream}/documents/{key}/state`.
pub async fn doc_state(
    State(app): State<AppState>,
    Caller(who): Caller,
    ApiPath((stream, key_text)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<StateQuery>,
) -> Result<Json<SnapshotOut>, ApiError> {
    known_stream(&app, &stream)?;
    who.check_stream(&stream)?;
    let (id, key) = parse_key(&key_text)?;
    let state = match q.version {
        Some(v) if v < 0 => return Err(ApiError::bad("version must be >= 0")),
        Some(v) => app.store().doc_state_at(&stream, &key, v).await?,
        None => app.store().latest_doc_state(&stream, &key).await?,
    };
    if state.version == 0 && q.version.is_none() {
        return Err(ApiError::NotFound(format!(
            "the log holds no version of document {key} in {stream}"
        )));
    }
    Ok(Json(SnapshotOut::from_state(
        &stream,
        &id,
        &key,
        &state,
        SnapshotReason::NotHeld,
    )))
}

/// Query of the write checkpoint route.
#[derive(Debug, Deserialize)]
pub struct CheckpointQuery {
    /// The writer's client id (origin stamp).
    origin: String,
    /// The stamped version the writer wrote.
    version: i64,
}

/// Response of the write checkpoint route.
#[derive(Debug, Serialize)]
pub struct CheckpointResponse {
    /// True when the log holds the write (or a later state of the document that includes it).
    reached: bool,
    /// `reached`, `pending`, `deleted` (the document is deleted in the log; a write made
    /// before that delete has reached it) or `unknown_document`.
    status: &'static str,
    /// The log version of the first state that includes the write, when reached.
    log_version: Option<i64>,
    /// The position of the event that carries it, when still in the log.
    seq: Option<i64>,
    /// The origin recorded on that event (another writer's when a later write was
    /// looked up together with this one).
    event_origin: Option<String>,
    /// Whether that origin is the one asked about.
    #[serde(skip_serializing_if = "Option::is_none")]
    origin_matches: Option<bool>,
    /// The latest log version of the document.
    current_version: i64,
}

/// `GET /v1/streams/{stream}/documents/{key}/write-checkpoint`.
pub async fn write_checkpoint(
    State(app): State<AppState>,
    Caller(who): Caller,
    ApiPath((stream, key_text)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<CheckpointQuery>,
) -> Result<Json<CheckpointResponse>, ApiError> {
    known_stream(&app, &stream)?;
    who.check_stream(&stream)?;
    let (_, key) = parse_key(&key_text)?;
    if q.version < 1 {
        return Err(ApiError::bad(
            "version must be >= 1 (the stamped version written)",
        ));
    }
    let store = app.store();
    let shadow = store.load_shadow(&stream, &key).await?;
    let Some(shadow) = shadow else {
        return Ok(Json(CheckpointResponse {
            reached: false,
            status: "unknown_document",
            log_version: None,
            seq: None,
            event_origin: None,
            origin_matches: None,
            current_version: 0,
        }));
    };
    if shadow.deleted() {
        return Ok(Json(CheckpointResponse {
            reached: false,
            status: "deleted",
            log_version: None,
            seq: None,
            event_origin: None,
            origin_matches: None,
            current_version: shadow.version.get(),
        }));
    }
    match shadow.stamp {
        // The write is in the log when the current incarnation's stamp reached it; the
        // event that carries it is the incarnation's first whose stamp is at least the
        // version (one event can cover several writes when a lookup ran ahead).
        Some(stamp) if stamp.0 >= q.version => {
            let ev = store
                .find_events(
                    doc! {
                        "ns": &stream,
                        "doc_key": &key,
                        "to_version": { "$gt": shadow.incarnation_from.get() },
                        "stamp": { "$gte": q.version },
                    },
                    doc! { "to_version": 1 },
                    1,
                )
                .await?;
            let ev = ev.first();
            Ok(Json(CheckpointResponse {
                reached: true,
                status: "reached",
                // Compacted away: the shadow's state includes the write.
                log_version: Some(ev.map_or(shadow.version.get(), |e| e.to_version)),
                seq: ev.map(|e| e.seq),
                origin_matches: ev.map(|e| e.origin.as_deref() == Some(q.origin.as_str())),
                event_origin: ev.and_then(|e| e.origin.clone()),
                current_version: shadow.version.get(),
            }))
        }
        _ => Ok(Json(CheckpointResponse {
            reached: false,
            status: "pending",
            log_version: None,
            seq: None,
            event_origin: None,
            origin_matches: None,
            current_version: shadow.version.get(),
        })),
    }
}

/// A stream and its head.
#[derive(Debug, Serialize)]
pub struct StreamOut {
    stream: String,
    /// Position of the last event (0 when empty).
    head: i64,
    /// The replica consuming the change stream, if any holds the lease.
    lease_holder: Option<String>,
    /// Recent operator actions on the stream (newest first): re-reads, pauses, resumes,
    /// restarts — so clients can tell why the stream stalled or re-emitted.
    notices: Vec<super::admin::ControlOut>,
}

async fn stream_out(app: &AppState, s: &str) -> Result<StreamOut, ApiError> {
    Ok(StreamOut {
        stream: s.to_owned(),
        head: app.store().last_seq(s).await?,
        lease_holder: app.store().lease_holder(s).await?,
        notices: app
            .store()
            .list_controls(Some(s), 20)
            .await?
            .iter()
            .map(super::admin::ControlOut::from)
            .collect(),
    })
}

/// Response of the stream list.
#[derive(Debug, Serialize)]
pub struct StreamsResponse {
    streams: Vec<StreamOut>,
}

/// `GET /v1/streams`.
pub async fn streams(
    State(app): State<AppState>,
    Caller(who): Caller,
) -> Result<Json<StreamsResponse>, ApiError> {
    let mut out = Vec::new();
    for s in app.streams().iter().filter(|s| who.can_read(s)) {
        out.push(stream_out(&app, s).await?);
    }
    Ok(Json(StreamsResponse { streams: out }))
}

/// `GET /v1/streams/{stream}`.
pub async fn stream(
    State(app): State<AppState>,
    Caller(who): Caller,
    ApiPath(stream): ApiPath<String>,
) -> Result<Json<StreamOut>, ApiError> {
    known_stream(&app, &stream)?;
    who.check_stream(&stream)?;
    Ok(Json(stream_out(&app, &stream).await?))
}
