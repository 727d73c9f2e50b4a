//! Live subscriptions over Server-Sent Events.
//!
//! A subscriber reads one stream (optionally only some documents) from a position. Every
//! replica serves subscriptions by tailing the event log by position: woken at once by the
//! local [`crate::pipeline::publish::Publisher`] when this replica appended, otherwise by
//! polling every `sync.tail_poll_ms`. Each SSE event carries `id: <seq>`, so a reconnect with
//! `Last-Event-ID` (or `?after=`) resumes exactly after the last event received: no gap, no
//! duplicate. Compaction snapshots are merged in by position like in `/v1/sync/missing`.
//!
//! Memory per subscriber is bounded: a producer task reads at most `sync.live_buffer`
//! items at a time and hands them to the response through a channel of that capacity; the
//! response body is only polled when the connection can take more bytes (backpressure).
//! A producer that cannot hand over an item within `sync.live_send_timeout_ms` drops the
//! subscriber (the client then reconnects with `Last-Event-ID`).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use tokio::sync::mpsc;

use super::error::{ApiError, ApiPath};
use super::model::{parse_key, Item};
use super::sync::merged_page;
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
    let (tx, rx) = mpsc::channel::<Event>(capacity);
    let producer = Producer {
        app: app.clone(),
        stream,
        keys: if keys.is_empty() { None } else { Some(keys) },
        after,
        tx,
        batch: capacity,
        poll: Duration::from_millis(cfg.tail_poll_ms),
        send_timeout: Duration::from_millis(cfg.live_send_timeout_ms),
        _slot: slot,
    };
    tokio::spawn(producer.run());
    let body = SlotStream {
        rx,
        started: false,
        after,
    };
    Ok(Sse::new(body)
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_millis(cfg.keep_alive_ms))
                .text("keep-alive"),
        )
        .into_response())
}

struct SlotStream {
    rx: mpsc::Receiver<Event>,
    started: bool,
    after: i64,
}

impl Stream for SlotStream {
    type Item = Result<Event, Infallible>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if !self.started {
            self.started = true;
            let c = format!("subscribed after {}", self.after);
            return std::task::Poll::Ready(Some(Ok(Event::default().comment(c))));
        }
        self.rx.poll_recv(cx).map(|o| o.map(Ok))
    }
}

struct Producer {
    app: AppState,
    stream: String,
    keys: Option<Vec<String>>,
    after: i64,
    tx: mpsc::Sender<Event>,
    batch: usize,
    poll: Duration,
    send_timeout: Duration,
    /// The subscriber slot lives as long as the producer: a subscriber dropped for not
    /// reading frees its slot at once, even while its connection lingers.
    _slot: SubscriberSlot,
}

impl Producer {
    async fn run(mut self) {
        let mut wake = self.app.inner.publisher.subscribe();
        let mut shutdown = self.app.inner.shutdown.clone();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let _ = *wake.borrow_and_update();
            let page = merged_page(
                self.app.store(),
                &self.stream,
                self.after,
                self.keys.as_deref(),
                self.batch,
            )
            .await;
            let items = match page {
                Ok(items) => items,
                Err(e) => {
                    metrics().error("live", e.code());
                    tracing::warn!(stream = %self.stream, error = %e, "live tail read failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(self.poll.max(Duration::from_millis(500))) => continue,
                        _ = self.tx.closed() => return,
                    }
                }
            };
            let full = items.len() == self.batch;
            for item in items {
                let seq = item.seq();
                let kind = match &item {
                    Item::Event(_) => "event",
                    Item::Snapshot(_) => "snapshot",
                };
                let data = match serde_json::to_string(&item) {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot encode live item");
                        return;
                    }
                };
                let ev = Event::default().id(seq.to_string()).event(kind).data(data);
                match self.tx.send_timeout(ev, self.send_timeout).await {
                    Ok(()) => self.after = seq,
                    Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                        metrics().error("live", "slow_subscriber_dropped");
                        tracing::info!(stream = %self.stream, after = self.after, "dropping a live subscriber that does not read");
                        return;
                    }
                    Err(mpsc::error::SendTimeoutError::Closed(_)) => return,
                }
            }
            if full {
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
