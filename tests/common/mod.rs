//! Shared test support: the MongoDB server address, unique databases, running
//! `eventsyncd` as a real process, and reading back and checking the log.
//!
//! Every integration test talks to the server named by `EVENTSYNC_TEST_MONGODB_URI`
//! (started by `scripts/testenv/start.sh`, or a real `mongod --replSet`).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bson::{doc, Bson, Document};
use eventsync::diff;
use eventsync::mongo::events::{EventRecord, Operation};
use futures_util::TryStreamExt;
use rand::Rng;

/// The environment variable naming the test server.
pub const URI_VAR: &str = "EVENTSYNC_TEST_MONGODB_URI";

/// The test server's URI.
pub fn mongo_uri() -> String {
    std::env::var(URI_VAR).unwrap_or_else(|_| {
        panic!(
            "{URI_VAR} is not set: run `scripts/test.sh`, or `eval \"$(scripts/testenv/start.sh)\"` \
             first, or point it at a real `mongod --replSet`"
        )
    })
}

/// A database name no other test uses.
pub fn unique_db(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}_{}_{}_{:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos & 0xffff
    )
}

/// A driver client for the test server.
pub async fn client() -> mongodb::Client {
    client_for(&mongo_uri()).await
}

/// A driver client for a given URI.
pub async fn client_for(uri: &str) -> mongodb::Client {
    let mut opts = mongodb::options::ClientOptions::parse(uri)
        .await
        .expect("valid URI");
    opts.server_selection_timeout = Some(Duration::from_secs(10));
    mongodb::Client::with_options(opts).expect("client")
}

/// A free loopback TCP port, never one this process handed out before: the OS may give
/// back a port that was free when asked but that a daemon started from an earlier call
/// has not bound yet (e.g. `[sync]` and `[ops]` of one daemon getting the same port).
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    for _ in 0..10_000 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if handed_out.insert(port) {
            return port;
        }
    }
    panic!("no loopback port left that this process has not handed out already")
}

/// A temporary directory `eventsync-test-…` under the system temp dir, removed on drop.
/// (`scripts/test.sh` also points `TMPDIR` at a private directory it removes at the end.)
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a new, empty directory named after `prefix`.
    pub fn new(prefix: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("eventsync-test-{}", unique_db(prefix)));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The last `lines` lines of a text file (empty when it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Polls `check` until it returns `Some` or `timeout` passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How to run one daemon process.
#[derive(Clone, Debug)]
pub struct DaemonSpec {
    /// MongoDB URI.
    pub uri: String,
    /// The daemon database.
    pub event_db: String,
    /// Watched `(database, collection)` pairs.
    pub streams: Vec<(String, String)>,
    /// Lease TTL and renewal, milliseconds.
    pub lease_ttl_ms: u64,
    /// Lease renewal, milliseconds.
    pub lease_renew_ms: u64,
    /// Holder id.
    pub holder: String,
    /// Bearer tokens for the sync port.
    pub tokens: Vec<String>,
    /// Extra TOML appended to the file (e.g. a `[pipeline]` table).
    pub extra: String,
    /// Extra `[pipeline]` keys.
    pub pipeline: String,
    /// `[log] format`: `text` or `json`.
    pub log_format: String,
    /// Extra `[sync]` keys.
    pub sync_extra: String,
}

impl DaemonSpec {
    /// A daemon watching `db.coll` with its log in `event_db`.
    pub fn new(event_db: &str, db: &str, coll: &str) -> Self {
        Self {
            uri: mongo_uri(),
            event_db: event_db.to_owned(),
            streams: vec![(db.to_owned(), coll.to_owned())],
            lease_ttl_ms: 3000,
            lease_renew_ms: 500,
            holder: "test-daemon".into(),
            tokens: vec![],
            extra: String::new(),
            pipeline: String::new(),
            log_format: "text".into(),
            sync_extra: String::new(),
        }
    }
}

/// A running `eventsyncd` process.
pub struct Daemon {
    /// The child process.
    pub child: Child,
    /// The sync port.
    pub sync_port: u16,
    /// The operations port.
    pub ops_port: u16,
    /// Its config file.
    pub config: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// Its temporary directory (config and log), removed on drop.
    pub dir: TempDir,
}

fn toml_str(s: &str) -> String {
    format!("{s:?}")
}

impl Daemon {
    /// Writes a config for `spec` and starts the daemon binary.
    pub fn start(spec: &DaemonSpec) -> Daemon {
        let sync_port = free_port();
        let ops_port = free_port();
        let dir = TempDir::new("d");
        let config = dir.join("config.toml");
        let log = dir.join("daemon.log");
        let mut text = format!(
            "[mongodb]\nuri = {}\nevent_database = {}\n\n",
            toml_str(&spec.uri),
            toml_str(&spec.event_db)
        );
        for (db, coll) in &spec.streams {
            text += &format!(
                "[[streams]]\ndatabase = {}\ncollection = {}\n\n",
                toml_str(db),
                toml_str(coll)
            );
        }
        text += &format!(
            "[pipeline]\nmax_await_ms = 100\nidle_checkpoint_ms = 200\nrestart_backoff_ms = 100\n{}\n\n",
            spec.pipeline
        );
        text += &format!(
            "[lease]\nttl_ms = {}\nrenew_ms = {}\nholder_id = {}\n\n",
            spec.lease_ttl_ms,
            spec.lease_renew_ms,
            toml_str(&spec.holder)
        );
        let tokens: Vec<String> = spec.tokens.iter().map(|t| toml_str(t)).collect();
        // 50 ms unless the test sets its own.
        let poll = if spec.sync_extra.contains("tail_poll_ms") {
            ""
        } else {
            "tail_poll_ms = 50\n"
        };
        text += &format!(
            "[sync]\nlisten = \"127.0.0.1:{sync_port}\"\ntokens = [{}]\n{poll}{}\n\n[ops]\nlisten = \"127.0.0.1:{ops_port}\"\nping_interval_ms = 200\n\n[log]\nlevel = \"info,eventsync=debug\"\nformat = {}\n\n",
            tokens.join(", "),
            spec.sync_extra,
            toml_str(&spec.log_format)
        );
        text += &spec.extra;
        std::fs::File::create(&config)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .expect("write config");
        let logfile = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_eventsyncd"))
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(logfile)
            .spawn()
            .expect("start eventsyncd");
        Daemon {
            child,
            sync_port,
            ops_port,
            config,
            log,
            dir,
        }
    }

    /// What a failing test shows about this daemon: where it listened and the tail of
    /// its log.
    pub fn failure_report(&self) -> String {
        format!(
            "--- eventsyncd (pid {}, sync port {}, ops port {}): last {DAEMON_LOG_TAIL} lines of {} ---\n{}\n--- end of eventsyncd log ---",
            self.child.id(),
            self.sync_port,
            self.ops_port,
            self.log.display(),
            tail(&self.log, DAEMON_LOG_TAIL)
        )
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Base URL of the sync port.
    pub fn sync_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.sync_port)
    }

    /// Base URL of the operations port.
    pub fn ops_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ops_port)
    }

    /// Sends a signal.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// `kill -9`, and reap.
    pub fn kill9(&mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `timeout` for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal("TERM");
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Lines of a daemon's log a failing test prints.
pub const DAEMON_LOG_TAIL: usize = 40;

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.running() {
            self.kill9();
        }
        // A test panicked with this daemon alive in its scope: show what the daemon said
        // (cargo test prints a failing test's captured output) before its directory goes.
        if std::thread::panicking() {
            eprintln!("{}", self.failure_report());
        }
    }
}

/// All events of a stream, by position.
pub async fn read_log(client: &mongodb::Client, event_db: &str, stream: &str) -> Vec<EventRecord> {
    let docs: Vec<Document> = client
        .database(event_db)
        .collection::<Document>("events")
        .find(doc! { "stream": stream })
        .sort(doc! { "seq": 1 })
        .await
        .expect("find events")
        .try_collect()
        .await
        .expect("read events");
    docs.iter()
        .map(|d| EventRecord::from_document(d).expect("event decodes"))
        .collect()
}

/// All documents of a collection, by canonical id key.
pub async fn read_collection(coll: &mongodb::Collection<Document>) -> BTreeMap<String, Document> {
    let docs: Vec<Document> = coll
        .find(doc! {})
        .await
        .expect("find")
        .try_collect()
        .await
        .expect("read");
    docs.into_iter()
        .map(|d| {
            (
                eventsync::mongo::doc_key(d.get("_id").unwrap_or(&Bson::Null)),
                d,
            )
        })
        .collect()
}

/// Checks the log invariants and returns the replayed state of every live document:
/// dense positions from 1, per-document gap-free chains, patches that apply.
pub fn replay(events: &[EventRecord]) -> BTreeMap<String, Document> {
    let mut state: BTreeMap<String, (i64, Option<Document>)> = BTreeMap::new();
    for (i, ev) in events.iter().enumerate() {
        assert_eq!(
            ev.seq,
            i as i64 + 1,
            "positions must be dense from 1: {ev:?}"
        );
        let (version, doc) = state.entry(ev.doc_key.clone()).or_insert((0, None));
        assert_eq!(
            ev.from_version, *version,
            "gap or overlap in the chain of {}: at {} but event covers ({}, {}]",
            ev.doc_key, version, ev.from_version, ev.to_version
        );
        assert!(ev.to_version > ev.from_version, "empty step {ev:?}");
        *version = ev.to_version;
        if ev.op == Operation::Delete {
            assert!(doc.is_some(), "delete of a document not alive: {ev:?}");
            *doc = None;
        } else {
            let patch: diff::Patch = serde_json::from_str(&ev.patch).expect("patch JSON");
            let base = doc.take().unwrap_or_default();
            if ev.op == Operation::Insert {
                assert!(base.is_empty(), "insert over a live document: {ev:?}");
            }
            *doc = Some(diff::apply(&base, &patch).expect("patch applies"));
        }
    }
    state
        .into_iter()
        .filter_map(|(k, (_, d))| d.map(|d| (k, d)))
        .collect()
}

/// Bytes of a document, for exact (type- and order-preserving) comparison.
pub fn bytes(d: &Document) -> Vec<u8> {
    let mut v = Vec::new();
    d.to_writer(&mut v).expect("serialisable");
    v
}

/// Asserts the replayed log equals the collection exactly, BSON types and key order included.
pub fn assert_replay_matches(
    replayed: &BTreeMap<String, Document>,
    actual: &BTreeMap<String, Document>,
) {
    let missing: Vec<_> = actual
        .keys()
        .filter(|k| !replayed.contains_key(*k))
        .collect();
    let extra: Vec<_> = replayed
        .keys()
        .filter(|k| !actual.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "log lacks {missing:?}, log has deleted {extra:?}"
    );
    for (k, doc) in actual {
        let r = &replayed[k];
        assert_eq!(
            bytes(r),
            bytes(doc),
            "document {k} differs:\n log:   {r}\n mongo: {doc}"
        );
    }
}

/// Waits until the log replays to exactly the collection's state.
pub async fn wait_converged(
    client: &mongodb::Client,
    event_db: &str,
    coll: &mongodb::Collection<Document>,
    timeout: Duration,
) -> Vec<EventRecord> {
    let stream = format!("{}.{}", coll.namespace().db, coll.namespace().coll);
    let start = Instant::now();
    loop {
        let events = read_log(client, event_db, &stream).await;
        let actual = read_collection(coll).await;
        let replayed = replay(&events);
        let same = replayed.len() == actual.len()
            && actual
                .iter()
                .all(|(k, d)| replayed.get(k).is_some_and(|r| bytes(r) == bytes(d)));
        if same {
            return events;
        }
        if start.elapsed() > timeout {
            assert_replay_matches(&replayed, &actual);
            panic!("not converged");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A mixed write load on documents `0..docs` of `coll`: thin-client upserts, edits,
/// operator updates and deletes, plus unstamped updates and replaces from a raw writer.
pub async fn mixed_load(coll: mongodb::Collection<Document>, writer: usize, ops: usize, docs: i32) {
    let client = eventsync::client::SyncCollection::<Document>::new(
        coll.clone(),
        eventsync::client::ClientOptions::new(format!("writer-{writer}")).max_retries(200),
    )
    .expect("client");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(writer as u64);
    for i in 0..ops {
        let id = rng.gen_range(0..docs);
        match rng.gen_range(0..10) {
            0..=1 => {
                let d = doc! {
                    "_id": id, "n": 0_i32, "big": 5_000_000_000_i64, "f": 1.5,
                    "when": bson::DateTime::from_millis(1_700_000_000_000 + i as i64),
                    "ref": bson::oid::ObjectId::new(), "tags": ["a", "b"], "nested": { "k": "v", "a.b": 1 }
                };
                let _ = client.find_one_and_upsert(d).await;
            }
            2..=5 => {
                let r = client
                    .find_one_and_update(id, |d| {
                        let n = d.get_i32("n").unwrap_or(0);
                        d.insert("n", n + 1);
                        d.insert("w", format!("writer-{writer}-{i}"));
                        if n % 3 == 0 {
                            d.remove("f");
                        } else {
                            d.insert("f", n as f64 / 2.0);
                        }
                    })
                    .await;
                if let Err(e) = r {
                    assert!(
                        matches!(
                            e,
                            eventsync::client::ClientError::NotFound { .. }
                                | eventsync::client::ClientError::Unversioned { .. }
                        ),
                        "{e}"
                    );
                }
            }
            6 => {
                let _ = client
                    .update_one(id, doc! { "$inc": { "n": 10 }, "$set": { "op": "inc" } })
                    .await;
            }
            7 => {
                let _ = client.delete_one(id, None).await;
            }
            8 => {
                // An unstamped writer (another service): no version bump, no origin.
                let _ = coll
                    .update_one(doc! { "_id": id }, doc! { "$set": { "raw": i as i64 } })
                    .await;
            }
            _ => {
                // An unstamped replace.
                let _ = coll
                    .replace_one(
                        doc! { "_id": id },
                        doc! { "raw_replace": true, "list": [1, 2, bson::Bson::Null] },
                    )
                    .await;
            }
        }
    }
}

/// The sum of the samples of `/metrics` lines starting with `prefix` (NaN when the daemon
/// does not answer, so comparisons in waits stay false).
pub async fn metric_sum(daemon: &Daemon, prefix: &str) -> f64 {
    let Ok(resp) = reqwest::get(format!("{}/metrics", daemon.ops_url())).await else {
        return f64::NAN;
    };
    let body = resp.text().await.unwrap_or_default();
    body.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the daemon has stored a checkpoint for `stream` outside a re-read (its
/// change stream is open).
pub async fn wait_streaming(client: &mongodb::Client, event_db: &str, stream: &str) {
    let cps = client
        .database(event_db)
        .collection::<Document>("checkpoints");
    wait_for(
        "the daemon's first checkpoint",
        Duration::from_secs(30),
        || {
            let cps = cps.clone();
            async move {
                cps.find_one(doc! { "_id": stream, "resync_pending": false })
                    .await
                    .ok()
                    .flatten()
                    .map(|_| ())
            }
        },
    )
    .await;
}

/// Reads `writes` changes from `reader` (a change stream opened before they were made), so
/// the test server prunes the history behind them as MongoDB's oplog would roll past it.
pub async fn read_through(
    mut reader: mongodb::change_stream::ChangeStream<
        mongodb::change_stream::event::ChangeStreamEvent<Document>,
    >,
    writes: usize,
) {
    use futures_util::StreamExt;
    let mut seen = 0;
    while seen < writes {
        match tokio::time::timeout(Duration::from_secs(10), reader.next()).await {
            Ok(Some(Ok(_))) => seen += 1,
            other => panic!("reader stopped after {seen}: {other:?}"),
        }
    }
}

/// Unexpired leases per holder, read from the daemon database.
pub async fn live_leases_by_holder(
    client: &mongodb::Client,
    event_db: &str,
) -> BTreeMap<String, usize> {
    use futures_util::TryStreamExt;
    let now = bson::DateTime::now().timestamp_millis();
    let docs: Vec<Document> = client
        .database(event_db)
        .collection::<Document>("leases")
        .find(bson::doc! { "expires_at_ms": { "$gt": now } })
        .await
        .expect("find leases")
        .try_collect()
        .await
        .expect("read leases");
    let mut held = BTreeMap::new();
    for d in docs {
        let holder = d.get_str("holder").expect("holder").to_owned();
        *held.entry(holder).or_insert(0) += 1;
    }
    held
}
