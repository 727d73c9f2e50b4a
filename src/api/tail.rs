//! The shared tail: one reader of the log per stream per replica, whose cost does not grow
//! with the number of subscribers.
//!
//! A [`Tail`] keeps the stream's recent items, encoded once ([`Frame`]), in a bounded
//! in-memory buffer that covers the positions `(start, head]` with no hole: every event of
//! that range is in it, in position order (or the compaction snapshot that replaced it).
//! It learns about new events in two ways:
//!
//! * on the replica that appends, the appender hands the appended events over
//!   ([`crate::pipeline::publish::Publisher::publish`]) — no read-back;
//! * otherwise (another replica appends, or handed batches were missed) it reads the log by
//!   position: when no batch of its stream came for `sync.tail_poll_ms`, and at once when
//!   the local appender only signalled an append ([`Publisher::appended`]).
//!
//! It never skips a position: a handed batch that does not start right after `head` makes it
//! read the gap from the log first, and whatever it reads from the log is merged with the
//! compaction snapshots as in `/v1/sync/missing`.
//!
//! Subscribers ([`super::live`]) wait for `head` to move and copy the new frames (reference
//! counted, no copy of the bytes) filtered by their documents in memory. A subscriber whose
//! position is older than the buffer's `start` reads the log by position itself until it
//! reaches the buffer, then rejoins. `/v1/sync/missing` answers from the buffer when it
//! covers the request. The tail runs while it has subscribers, and for a minute after the
//! last `/v1/sync/missing` that used it; then it stops and drops its buffer.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, watch};

use super::error::ApiError;
use super::frames::{count_read, event_frame, read_page, Frame};
use crate::mongo::events::EventRecord;
use crate::mongo::Store;
use crate::ops::metrics;
use crate::pipeline::publish::Publisher;

/// Items read from the log per query by the tail.
const PAGE: usize = 1000;
/// How long a tail without subscribers keeps running after `/v1/sync/missing` used it.
const KEEP_WARM: Duration = Duration::from_secs(60);

/// Settings of the tails.
#[derive(Debug, Clone)]
pub struct TailConfig {
    /// Poll interval when no batch is handed over.
    pub poll: Duration,
    /// Most items in a tail's buffer.
    pub max_items: usize,
    /// Most bytes in a tail's buffer.
    pub max_bytes: usize,
}

/// The tails of this replica, one per stream, started on first use.
pub struct Tails {
    store: Store,
    publisher: Publisher,
    config: TailConfig,
    shutdown: watch::Receiver<bool>,
    map: Mutex<HashMap<String, Arc<Tail>>>,
}

impl Tails {
    /// No tail runs until one is used.
    pub fn new(
        store: Store,
        publisher: Publisher,
        config: TailConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            store,
            publisher,
            config,
            shutdown,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The tail of `stream`, started if it does not run (and kept warm for a while).
    pub fn get(&self, stream: &str) -> Arc<Tail> {
        let tail = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(stream.to_owned())
                .or_insert_with(|| Arc::new(Tail::new(stream)))
                .clone()
        };
        tail.touch();
        if !tail.running.swap(true, Ordering::SeqCst) {
            tokio::spawn(run(
                tail.clone(),
                self.store.clone(),
                self.publisher.clone(),
                self.config.clone(),
                self.shutdown.clone(),
            ));
        }
        tail
    }

    /// Joins the tail of `stream` as a subscriber: it runs at least as long as the guard.
    pub fn subscribe(&self, stream: &str) -> TailGuard {
        let tail = self.get(stream);
        tail.users.fetch_add(1, Ordering::SeqCst);
        TailGuard { tail }
    }
}

/// A subscriber's hold on a tail.
pub struct TailGuard {
    /// The tail.
    pub tail: Arc<Tail>,
}

impl Drop for TailGuard {
    fn drop(&mut self) {
        self.tail.touch();
        self.tail.users.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The subscriber is older than the buffer (or the buffer is not ready): read the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behind {
    /// The position is before the buffer's start.
    Position,
    /// The tail has no buffer yet (starting, or its first read failed).
    NotReady,
}

#[derive(Default)]
struct Ring {
    frames: VecDeque<Arc<Frame>>,
    bytes: usize,
    /// The buffer covers the positions `(start, head]`.
    start: i64,
    head: i64,
    /// The compaction floor: the highest position a snapshot stands for. At or below it the
    /// log may hold snapshots in place of events, which `/v1/sync/missing` must send (see
    /// [`Tail::serve`]).
    floor: i64,
    /// False until the tail knows where the log is.
    ready: bool,
}

/// One stream's shared tail.
pub struct Tail {
    stream: String,
    ring: RwLock<Ring>,
    head_tx: watch::Sender<i64>,
    users: AtomicUsize,
    running: AtomicBool,
    base: Instant,
    /// Milliseconds since `base` of the last use (subscriber leaving, missing request).
    last_use: AtomicU64,
    /// Milliseconds since `base` when the tail was last known to be level with the log.
    level_at: AtomicU64,
}

impl Tail {
    fn new(stream: &str) -> Self {
        Self {
            stream: stream.to_owned(),
            ring: RwLock::new(Ring::default()),
            head_tx: watch::channel(0).0,
            users: AtomicUsize::new(0),
            running: AtomicBool::new(false),
            base: Instant::now(),
            last_use: AtomicU64::new(0),
            level_at: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last_use.store(self.now_ms(), Ordering::SeqCst);
    }

    /// The stream.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Changes whenever the buffer's head moves (or the buffer is reset).
    pub fn watch(&self) -> watch::Receiver<i64> {
        self.head_tx.subscribe()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Ring> {
        self.ring.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Ring> {
        self.ring.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The last position in the buffer (0 when not ready).
    pub fn head(&self) -> i64 {
        let r = self.read();
        if r.ready {
            r.head
        } else {
            0
        }
    }

    /// Up to `max` frames after position `after` (only the wanted documents), and the
    /// position scanned to: the next call continues from there.
    pub fn frames_after(
        &self,
        after: i64,
        keys: Option<&HashSet<String>>,
        max: usize,
    ) -> Result<(Vec<Arc<Frame>>, i64), Behind> {
        let r = self.read();
        if !r.ready {
            return Err(Behind::NotReady);
        }
        if after < r.start {
            return Err(Behind::Position);
        }
        let first = r.frames.partition_point(|f| f.seq <= after);
        let mut out = Vec::new();
        for f in r.frames.range(first..) {
            if f.wanted(keys) {
                out.push(f.clone());
                if out.len() == max.max(1) {
                    return Ok((out, f.seq));
                }
            }
        }
        Ok((out, r.head.max(after)))
    }

    /// For `/v1/sync/missing`: the frames after `after` (at most `max`) when the buffer
    /// covers that position and the tail is level with the log (it read or was handed
    /// everything up to a moment ago); `None` sends the request to the log.
    ///
    /// Positions at or below the compaction floor are left to the log, so that a client
    /// behind compaction gets the snapshots that stand for the removed events, as the log
    /// would give them (the buffer may still hold the events themselves).
    pub fn serve(&self, after: i64, max: usize, staleness: Duration) -> Option<Vec<Arc<Frame>>> {
        let level = self.level_at.load(Ordering::SeqCst);
        if level == 0 || self.now_ms().saturating_sub(level) > staleness.as_millis() as u64 {
            return None;
        }
        if after < self.read().floor {
            return None;
        }
        self.frames_after(after, None, max).ok().map(|(f, _)| f)
    }

    /// Reads the compaction floor (one query).
    async fn refresh_floor(&self, store: &Store) -> Result<(), ApiError> {
        count_read("tail");
        let top = store
            .snapshots()
            .find_one(bson::doc! { "ns": &self.stream })
            .sort(bson::doc! { "seq": -1 })
            .projection(bson::doc! { "seq": 1 })
            .await
            .map_err(crate::mongo::StoreError::from)?;
        let floor = top
            .and_then(|d| crate::mongo::get_int(&d, "seq"))
            .unwrap_or(0);
        let mut r = self.write();
        r.floor = r.floor.max(floor);
        Ok(())
    }

    /// Whether anyone needs the tail: subscribers, or a recent `/v1/sync/missing`.
    fn wanted(&self) -> bool {
        self.users.load(Ordering::SeqCst) > 0
            || self
                .now_ms()
                .saturating_sub(self.last_use.load(Ordering::SeqCst))
                <= KEEP_WARM.as_millis() as u64
    }

    fn level(&self) {
        self.level_at.store(self.now_ms().max(1), Ordering::SeqCst);
    }

    /// Starts over at `head` with an empty buffer.
    fn reset(&self, start: i64) {
        {
            let mut r = self.write();
            r.frames.clear();
            r.bytes = 0;
            r.start = start;
            r.head = start;
            r.ready = true;
        }
        self.head_tx.send_replace(start);
    }

    fn clear(&self) {
        let mut r = self.write();
        *r = Ring::default();
        self.level_at.store(0, Ordering::SeqCst);
    }

    /// Appends frames (in position order; those at or before the head are dropped) and
    /// moves the head to at least `covered` (positions up to it hold nothing more).
    fn push(&self, frames: Vec<Frame>, covered: i64, config: &TailConfig) {
        let head = {
            let mut r = self.write();
            for f in frames {
                if f.seq <= r.head && !(f.snapshot && f.seq == r.head) {
                    continue;
                }
                r.head = r.head.max(f.seq);
                r.bytes += f.size();
                r.frames.push_back(Arc::new(f));
            }
            r.head = r.head.max(covered);
            while r.frames.len() > config.max_items.max(1) || r.bytes > config.max_bytes {
                let Some(old) = r.frames.pop_front() else {
                    break;
                };
                r.bytes -= old.size();
                r.start = old.seq;
                // Never split one position between the buffer and the log.
                while r.frames.front().is_some_and(|f| f.seq == old.seq) {
                    if let Some(f) = r.frames.pop_front() {
                        r.bytes -= f.size();
                    }
                }
            }
            r.head
        };
        self.head_tx.send_if_modified(|h| {
            let moved = *h != head;
            *h = head;
            moved
        });
    }
}

/// What the tail does after a read or a handed batch.
enum Step {
    Fine,
    Failed(ApiError),
}

async fn run(
    tail: Arc<Tail>,
    store: Store,
    publisher: Publisher,
    config: TailConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    tracing::debug!(stream = %tail.stream, "live tail starts");
    // Subscribe before looking at the log: a batch appended meanwhile is either read or
    // received (and then dropped as already held).
    let mut batches = Some(publisher.batches());
    let mut appended = Some(publisher.subscribe());
    let quiet = config.poll.max(Duration::from_millis(500));
    let mut backoff = quiet;
    'start: loop {
        // Where the log ends; the buffer starts up to `max_items` back so that recent
        // positions are served from memory at once.
        let head = loop {
            if *shutdown.borrow() {
                tail.clear();
                tail.running.store(false, Ordering::SeqCst);
                return;
            }
            count_read("tail");
            let found = match store.last_seq(&tail.stream).await {
                Ok(h) => tail.refresh_floor(&store).await.map(|()| h),
                Err(e) => Err(e.into()),
            };
            match found {
                Ok(h) => break h,
                Err(e) => {
                    metrics().error("live", e.code());
                    tracing::warn!(stream = %tail.stream, error = %e, "live tail cannot find the log's head; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        r = shutdown.changed() => if r.is_err() { tail.running.store(false, Ordering::SeqCst); return; },
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        };
        let prefill = config.max_items.min(PAGE * 10) as i64;
        tail.reset((head - prefill).max(0));
        let mut fed = false;
        let mut next_poll = tokio::time::Instant::now();
        let floor_every = config.poll.max(Duration::from_secs(1));
        let mut next_floor = tokio::time::Instant::now() + floor_every;
        loop {
            let stopping = *shutdown.borrow();
            // Stop when nobody needs the tail any more.
            if stopping || !tail.wanted() {
                tail.clear();
                tail.running.store(false, Ordering::SeqCst);
                // Someone may have come back while it was stopping: then start over.
                if stopping || !tail.wanted() || tail.running.swap(true, Ordering::SeqCst) {
                    tracing::debug!(stream = %tail.stream, "live tail stops");
                    return;
                }
                continue 'start;
            }
            let step = tokio::select! {
                r = async {
                    match batches.as_mut() {
                        Some(b) => b.recv().await,
                        None => std::future::pending().await,
                    }
                }, if batches.is_some() => match r {
                    Ok(batch) => {
                        if batch.first().is_some_and(|e| e.stream == tail.stream) {
                            fed = true;
                            next_poll = tokio::time::Instant::now() + config.poll;
                            take_batch(&tail, &store, &config, &batch).await
                        } else {
                            Step::Fine
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Batches were lost to this tail: read the log.
                        next_poll = tokio::time::Instant::now() + config.poll;
                        catch_up(&tail, &store, &config, None).await
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        batches = None;
                        Step::Fine
                    }
                },
                r = async {
                    match appended.as_mut() {
                        Some(a) => a.changed().await,
                        None => std::future::pending().await,
                    }
                }, if appended.is_some() && !fed => {
                    if r.is_err() {
                        appended = None;
                        Step::Fine
                    } else {
                        // The appender only signalled (no batch handed over): read once,
                        // for every subscriber.
                        next_poll = tokio::time::Instant::now() + config.poll;
                        catch_up(&tail, &store, &config, None).await
                    }
                }
                _ = tokio::time::sleep_until(next_floor) => {
                    // Compaction may have moved: one query per stream, whoever subscribes.
                    next_floor = tokio::time::Instant::now() + floor_every;
                    match tail.refresh_floor(&store).await {
                        Ok(()) => Step::Fine,
                        Err(e) => Step::Failed(e),
                    }
                }
                _ = tokio::time::sleep_until(next_poll) => {
                    next_poll = tokio::time::Instant::now() + config.poll;
                    catch_up(&tail, &store, &config, None).await
                }
                r = shutdown.changed() => {
                    if r.is_err() {
                        tail.clear();
                        tail.running.store(false, Ordering::SeqCst);
                        return;
                    }
                    Step::Fine
                }
            };
            match step {
                Step::Fine => backoff = quiet,
                Step::Failed(e) => {
                    metrics().error("live", e.code());
                    tracing::warn!(stream = %tail.stream, error = %e, "live tail read failed; retrying");
                    next_poll = tokio::time::Instant::now() + backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

/// Reads the log after the head until level with it (or, with `upto`, until past it).
async fn catch_up(tail: &Tail, store: &Store, config: &TailConfig, upto: Option<i64>) -> Step {
    loop {
        let after = tail.head();
        let frames = match read_page(store, &tail.stream, after, None, PAGE, "tail").await {
            Ok(f) => f,
            Err(e) => return Step::Failed(e),
        };
        let full = frames.len() == PAGE;
        let last = frames.last().map_or(after, |f| f.seq);
        // A page that is not full holds everything the log had: every position up to
        // `upto` (durable before it was handed over) is covered.
        let covered = if full {
            last
        } else {
            last.max(upto.unwrap_or(0))
        };
        tail.push(frames, covered, config);
        if !full {
            tail.level();
            return Step::Fine;
        }
    }
}

/// Takes a batch the appender handed over: reads any gap before it from the log first.
async fn take_batch(
    tail: &Tail,
    store: &Store,
    config: &TailConfig,
    batch: &[EventRecord],
) -> Step {
    let mut i = 0;
    while i < batch.len() {
        let head = tail.head();
        let e = &batch[i];
        if e.seq <= head {
            i += 1;
            continue;
        }
        if e.seq > head + 1 {
            if let Step::Failed(err) = catch_up(tail, store, config, Some(e.seq - 1)).await {
                return Step::Failed(err);
            }
            continue;
        }
        // A dense run from here.
        let mut frames = Vec::new();
        let mut next = head + 1;
        while i < batch.len() && batch[i].seq == next {
            match event_frame(&batch[i]) {
                Ok(f) => frames.push(f),
                Err(err) => {
                    // Cannot happen for events this daemon wrote; read them instead.
                    tracing::warn!(stream = %tail.stream, error = %err, "cannot encode a handed event; reading the log");
                    tail.push(frames, 0, config);
                    return catch_up(tail, store, config, batch.last().map(|e| e.seq)).await;
                }
            }
            next += 1;
            i += 1;
        }
        tail.push(frames, 0, config);
    }
    tail.level();
    Step::Fine
}
