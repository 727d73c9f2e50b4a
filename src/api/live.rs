//! Live subscriptions over Server-Sent Events.
//!
//! A subscriber reads one stream (optionally only some documents) from a position. Every
//! replica serves subscriptions from one shared tail per stream ([`super::tail`]): the tail
//! reads new events once (or is handed them by this replica's appender) and every
//! subscriber copies the encoded frames it wants from the tail's buffer, filtered by
//! document in memory — the log is not read per subscriber. A subscriber whose position is
//! older than the buffer (a resume from far back, or one that fell behind) reads the log by
//! position itself, merged with compaction snapshots like `/v1/sync/missing`, until it
//! reaches the buffer, and then rejoins it. Each SSE event carries `id: <seq>`, so a
//! reconnect with `Last-Event-ID` (or `?after=`) resumes exactly after the last event
//! received: no gap, no duplicate.
//!
//! Memory per subscriber is bounded: a producer task hands frames (shared bytes) to the
//! response through a channel of `sync.live_buffer` items; the response body is only
//! polled when the connection can take more bytes (backpressure). A producer that cannot
//! hand over an item within `sync.live_send_timeout_ms` drops the subscriber (the client
//! then reconnects with `Last-Event-ID`).

use std::collections::HashSet;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use std::future::Future as _;
use tokio::sync::mpsc;

use super::error::{ApiError, ApiPath};
use super::frames::read_page;
use super::model::parse_key;
use super::tail::{Behind, TailGuard};
use super::AppState;
use crate::ops::metrics;

/// Holds one subscriber slot; frees it when dropped (the response body is dropped when
/// the connection ends).
pub struct SubscriberSlot {
    app: AppState,
}

impl Drop for SubscriberSlot {
    fn drop(&mut self) {
        self.app.inner.subscribers.fetch_sub(1, Ordering::SeqCst);
        metrics().live_subscribers.dec();
    }
}

fn try_slot(app: &AppState) -> Result<SubscriberSlot, ApiError> {
    let max = app.config().max_subscribers;
    let prev = app.inner.subscribers.fetch_add(1, Ordering::SeqCst);
    if prev >= max {
        app.inner.subscribers.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiError::TooManySubscribers(format!(
            "sync.max_subscribers ({max}) live subscriptions are open on this replica; retry later or on another replica"
        )));
    }
    metrics().live_subscribers.inc();
    Ok(SubscriberSlot { app: app.clone() })
}

fn percent_decode(s: &str) -> Result<String, ApiError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| ApiError::bad("malformed percent-encoding in the query"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| ApiError::bad("query is not UTF-8"))
}

fn parse_position(what: &str, v: &str) -> Result<i64, ApiError> {
    match v.trim().parse::<i64>() {
        Ok(n) if n >= 0 => Ok(n),
        _ => Err(ApiError::bad(format!(
            "{what} must be a stream position (an integer >= 0), got {v:?}"
        ))),
    }
}

/// `GET /v1/streams/{stream}/live?after=<seq>&doc=<key>&doc=<key>…`
pub async fn live(
    State(app): State<AppState>,
    super::auth::Caller(who): super::auth::Caller,
    ApiPath(stream): ApiPath<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !app.streams().iter().any(|s| s == &stream) {
        return Err(ApiError::NotFound(format!(
            "unknown stream {stream:?}; known: {}",
            app.streams().join(", ")
        )));
    }
    who.check_stream(&stream)?;
    let mut after = 0i64;
    let mut keys: Vec<String> = Vec::new();
    for pair in query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k)?;
        let v = percent_decode(v)?;
        match k.as_str() {
            "after" => after = parse_position("after", &v)?,
            "doc" => {
                let (_, key) = parse_key(&v)?;
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
            _ => {}
        }
    }
    if keys.len() > app.config().max_vector_entries {
        return Err(ApiError::Limit(format!(
            "{} documents in the filter; sync.max_vector_entries is {}",
            keys.len(),
            app.config().max_vector_entries
        )));
    }
    if let Some(h) = headers.get("last-event-id") {
        let text = h
            .to_str()
            .map_err(|_| ApiError::bad("Last-Event-ID is not text"))?;
        if !text.trim().is_empty() {
            after = parse_position("Last-Event-ID", text)?;
        }
    }
    let slot = try_slot(&app)?;
    let cfg = app.config();
    let capacity = cfg.live_buffer.max(1);
    let (tx, rx) = mpsc::channel::<Bytes>(capacity);
    let tail = app.tails().subscribe(&stream);
    let producer = Producer {
        app: app.clone(),
        stream,
        keys: if keys.is_empty() { None } else { Some(keys) },
        after,
        tx,
        batch: capacity,
        poll: Duration::from_millis(cfg.tail_poll_ms),
        send_timeout: Duration::from_millis(cfg.live_send_timeout_ms),
        tail,
        _slot: slot,
    };
    tokio::spawn(producer.run());
    let interval = Duration::from_millis(cfg.keep_alive_ms);
    let body = LiveBody {
        rx,
        first: Some(Bytes::from(format!(": subscribed after {after}\n\n"))),
        keep_alive: Box::pin(tokio::time::sleep(interval)),
        interval,
    };
    let mut resp = Body::from_stream(body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

/// The response body: the frames the producer hands over, a comment first, and a
/// keep-alive comment whenever nothing was sent for `sync.keep_alive_ms`.
struct LiveBody {
    rx: mpsc::Receiver<Bytes>,
    first: Option<Bytes>,
    keep_alive: Pin<Box<tokio::time::Sleep>>,
    interval: Duration,
}

impl Stream for LiveBody {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(b) = self.first.take() {
            return Poll::Ready(Some(Ok(b)));
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(b)) => {
                let next = tokio::time::Instant::now() + self.interval;
                self.keep_alive.as_mut().reset(next);
                Poll::Ready(Some(Ok(b)))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match self.keep_alive.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let next = tokio::time::Instant::now() + self.interval;
                    self.keep_alive.as_mut().reset(next);
                    Poll::Ready(Some(Ok(Bytes::from_static(b": keep-alive\n\n"))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

struct Producer {
    app: AppState,
    stream: String,
    keys: Option<Vec<String>>,
    /// Position read up to (the last item sent, or further when the filter let nothing
    /// through).
    after: i64,
    tx: mpsc::Sender<Bytes>,
    batch: usize,
    poll: Duration,
    send_timeout: Duration,
    tail: TailGuard,
    /// The subscriber slot lives as long as the producer: a subscriber dropped for not
    /// reading frees its slot at once, even while its connection lingers.
    _slot: SubscriberSlot,
}

/// Frames joined into chunks of at most 64 KiB (a single frame stays shared, uncopied),
/// each with the position of its last frame.
fn chunks(frames: &[std::sync::Arc<super::frames::Frame>]) -> Vec<(Bytes, i64)> {
    const CHUNK: usize = 64 * 1024;
    let mut out = Vec::new();
    let mut i = 0;
    while i < frames.len() {
        let mut j = i + 1;
        let mut size = frames[i].sse().len();
        while j < frames.len() && size + frames[j].sse().len() <= CHUNK {
            size += frames[j].sse().len();
            j += 1;
        }
        let last = frames[j - 1].seq;
        if j == i + 1 {
            out.push((frames[i].sse(), last));
        } else {
            let mut b = Vec::with_capacity(size);
            for f in &frames[i..j] {
                b.extend_from_slice(&f.sse());
            }
            out.push((Bytes::from(b), last));
        }
        i = j;
    }
    out
}

/// Why a producer stops.
enum Stop {
    Closed,
    Slow,
}

impl Producer {
    async fn send(&self, frame: Bytes) -> Result<(), Stop> {
        match self.tx.send_timeout(frame, self.send_timeout).await {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                metrics().error("live", "slow_subscriber_dropped");
                tracing::info!(stream = %self.stream, after = self.after, "dropping a live subscriber that does not read");
                Err(Stop::Slow)
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(Stop::Closed),
        }
    }

    async fn run(mut self) {
        let tail = self.tail.tail.clone();
        let mut wake = tail.watch();
        let mut shutdown = self.app.inner.shutdown.clone();
        let set: Option<HashSet<String>> = self.keys.as_ref().map(|k| k.iter().cloned().collect());
        loop {
            if *shutdown.borrow() {
                return;
            }
            let _ = *wake.borrow_and_update();
            let more = match tail.frames_after(self.after, set.as_ref(), self.batch) {
                Ok((frames, scanned)) => {
                    let full = frames.len() == self.batch;
                    // Several frames go out as one chunk (one write to the socket).
                    for group in chunks(&frames) {
                        if self.send(group.0).await.is_err() {
                            return;
                        }
                        self.after = group.1;
                    }
                    self.after = self.after.max(scanned);
                    full
                }
                Err(Behind::NotReady) => false,
                Err(Behind::Position) => {
                    // Older than the shared buffer: read the log by position, then rejoin.
                    let level = tail.head();
                    let page = read_page(
                        self.app.store(),
                        &self.stream,
                        self.after,
                        self.keys.as_deref(),
                        self.batch,
                        "subscriber",
                    )
                    .await;
                    let frames = match page {
                        Ok(f) => f,
                        Err(e) => {
                            metrics().error("live", e.code());
                            tracing::warn!(stream = %self.stream, error = %e, "live read failed; retrying");
                            tokio::select! {
                                _ = tokio::time::sleep(self.poll.max(Duration::from_millis(500))) => continue,
                                _ = self.tx.closed() => return,
                            }
                        }
                    };
                    let full = frames.len() == self.batch;
                    for f in frames {
                        let seq = f.seq;
                        if self.send(f.sse()).await.is_err() {
                            return;
                        }
                        self.after = seq;
                    }
                    if !full {
                        // The page held everything the log had, which includes everything
                        // the tail held before the read.
                        self.after = self.after.max(level);
                    }
                    true
                }
            };
            if more {
                continue;
            }
            tokio::select! {
                r = wake.changed() => { if r.is_err() { tokio::time::sleep(self.poll).await; } }
                _ = tokio::time::sleep(self.poll) => {}
                _ = self.tx.closed() => return,
                _ = async { let _ = shutdown.wait_for(|v| *v).await; } => return,
            }
        }
    }
}
