//! `eventsync-bench`: measures the daemon against a MongoDB server in one run.
//!
//! Phases (each on collections of its own, in a database dropped at the end):
//!
//! 1. **raw**: a bare driver loop opens a change stream (`fullDocument: updateLookup`), the
//!    write load runs (thin client: inserts, then compare-and-swap updates), and the loop
//!    reads the whole backlog as fast as it can — the physical read limit of this setup.
//! 2. **daemon**: the built `eventsyncd` (a child process) is stopped at its checkpoint,
//!    the same load is written, the daemon is started again and catches up; its rate in
//!    change events per second over the same backlog, against the raw rate, is the ratio.
//!    CPU (utime + stime) of the catch-up gives events per CPU-second.
//! 3. **latency**: a paced load (target `--rate` writes/s) while the daemon runs live;
//!    write → appended (the event's `appended_at`) and write → live subscriber (an SSE
//!    subscription on `/v1/streams/{stream}/live`, or tailing the events collection when the
//!    sync API has no live endpoint), p50/p99/max from the start of each write.
//! 4. **tracking**: `--track-docs` small documents exist before a fresh daemon starts; its
//!    initial sync takes them all, then live updates touch them; peak and final RSS.
//!
//! 5. **partitions** (`--partitions 1,2,4`): one collection declared with `partitions = P`,
//!    two daemon processes (replicas) sharing its partitions; both are stopped at their
//!    checkpoints, the same write load is written, both start again and catch up; events
//!    per second over the backlog, for each `P`.
//!
//! 6. **catchup** (`catchup.rs`): one backlog per load (small documents with every change
//!    its own event, small documents with four changes each, ~100 KB documents) read three
//!    ways in the same run — raw, a bare persisting loop (the floor of any design that keeps
//!    its log in the same server) and the daemon; CPU, server operations, bytes and server CPU
//!    per event.
//! 7. **streams** (`--streams 1,10,50`): the same small-document catch-up spread over S
//!    streams, each S with a daemon of its own: events per CPU-second and RSS against S.
//!
//! Prints a table and writes the figures as JSON (`--out`); `scripts/bench_compare.py`
//! compares two such files.

mod catchup;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bson::{doc, Bson, Document, RawDocumentBuf};
use clap::Parser;
use eventsync::client::{ClientOptions as SyncOptions, SyncCollection};
use futures_util::TryStreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Mutex;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

/// Benchmarks eventsyncd: raw change-stream rate vs daemon append rate, latencies, memory.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Args {
    /// MongoDB URI (a replica set, or the test server).
    #[arg(long, env = "EVENTSYNC_TEST_MONGODB_URI")]
    uri: String,
    /// Documents of the throughput load.
    #[arg(long, default_value_t = 2000)]
    docs: usize,
    /// Concurrent writers.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Updates per document after its insert.
    #[arg(long, default_value_t = 4)]
    updates: usize,
    /// Size of a small document's payload, bytes.
    #[arg(long, default_value_t = 256)]
    doc_size_small: usize,
    /// Fraction of documents that are large (~100 KB).
    #[arg(long, default_value_t = 0.02)]
    large_fraction: f64,
    /// Size of a large document's payload, bytes.
    #[arg(long, default_value_t = 100 * 1024)]
    doc_size_large: usize,
    /// Target rates of the paced latency load, writes/s (comma-separated: one run each).
    #[arg(long, value_delimiter = ',', default_values_t = vec![200, 25])]
    rate: Vec<u64>,
    /// Duration of the paced latency load, seconds.
    #[arg(long, default_value_t = 10)]
    latency_secs: u64,
    /// Documents the paced load cycles through.
    #[arg(long, default_value_t = 2000)]
    latency_docs: usize,
    /// Documents tracked in the memory phase (comma-separated: one run each, a fresh daemon
    /// per run; empty: skip the phase).
    #[arg(long, value_delimiter = ',', default_values_t = vec![100_000])]
    track_docs: Vec<usize>,
    /// Catch-up phase: small documents (each changed once, then four times a quarter of them).
    #[arg(long, default_value_t = 20_000)]
    catchup_docs: usize,
    /// Catch-up phase: ~100 KB documents (each changed once).
    #[arg(long, default_value_t = 1000)]
    catchup_large_docs: usize,
    /// Catch-up phase: the loads to run (comma-separated): small (every change its own
    /// event), coalesced (four changes per document), large (~100 KB documents).
    #[arg(long, value_delimiter = ',', default_values_t = ["small", "coalesced", "large"].map(String::from).to_vec())]
    catchup_loads: Vec<String>,
    /// Catch-up phase: record a CPU profile of the daemon while it catches up (`perf record
    /// -F 999 --call-graph dwarf` of the daemon's process) into `PATH.<load>` (read it with
    /// `perf report -i PATH.<load> --no-children`).
    #[arg(long)]
    perf_out: Option<PathBuf>,
    /// Stream counts of the scaling phase (comma-separated; one daemon each).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 10, 50])]
    streams: Vec<usize>,
    /// The `eventsyncd` binary (default: next to this one).
    #[arg(long)]
    daemon_bin: Option<PathBuf>,
    /// Extra `[pipeline]` keys for the daemon (TOML lines).
    #[arg(long, default_value = "")]
    pipeline: String,
    /// Extra TOML appended to the daemon's configuration (whole tables, e.g.
    /// `[compaction]` keys).
    #[arg(long, default_value = "")]
    extra_config: String,
    /// Phases to run (comma-separated): catchup, raw, daemon, latency, tracking, fanout,
    /// serve, streams.
    /// `daemon` needs `raw` (the ratio); the others run alone.
    #[arg(long, value_delimiter = ',', default_values_t = ["catchup", "raw", "daemon", "latency", "tracking", "fanout", "serve", "streams"].map(String::from).to_vec())]
    phases: Vec<String>,
    /// Live fan-out: numbers of SSE subscribers on one replica (one run each).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 100, 1000])]
    fanout: Vec<usize>,
    /// Live fan-out: paced write rate, writes/s.
    #[arg(long, default_value_t = 100)]
    fanout_rate: u64,
    /// Live fan-out: duration of the paced load per subscriber count, seconds.
    #[arg(long, default_value_t = 10)]
    fanout_secs: u64,
    /// Catch-up serving: events in the served log.
    #[arg(long, default_value_t = 30_000)]
    serve_events: usize,
    /// Catch-up serving: concurrent clients.
    #[arg(long, default_value_t = 50)]
    serve_clients: usize,
    /// Catch-up serving: duration of each concurrent run, seconds.
    #[arg(long, default_value_t = 10)]
    serve_secs: u64,
    /// Partition counts of the two-replica partition phase (comma-separated; empty: skip).
    #[arg(long, value_delimiter = ',')]
    partitions: Vec<u32>,
    /// Where to write the JSON results.
    #[arg(long, default_value = "results.json")]
    out: PathBuf,
    /// Keep the benchmark databases.
    #[arg(long)]
    keep: bool,
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A free loopback port, never one this process handed out before (a daemon started from
/// an earlier call may not have bound its port yet, and the OS can give it out again).
fn free_port() -> Result<u16> {
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    for _ in 0..10_000 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if HANDED_OUT
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(port)
        {
            return Ok(port);
        }
    }
    Err("no loopback port left that was not handed out already".into())
}

/// p50, p99, max (and count) of a sample, in milliseconds.
fn percentiles(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return json!({ "count": 0 });
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    json!({
        "count": v.len(),
        "p50_ms": round(at(0.50)),
        "p99_ms": round(at(0.99)),
        "max_ms": round(v[v.len() - 1]),
    })
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

// ---------------------------------------------------------------------------------------
// The daemon as a child process.

struct DaemonProc {
    child: Child,
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    ops_port: u16,
    sync_port: u16,
    token: String,
}

impl DaemonProc {
    fn write_config(
        dir: &Path,
        uri: &str,
        event_db: &str,
        streams: &[(String, String)],
        pipeline: &str,
        extra: &str,
    ) -> Result<(PathBuf, u16, u16, String)> {
        let ops_port = free_port()?;
        let sync_port = free_port()?;
        let token = "bench-token-0123456789abcdef".to_owned();
        let mut text = format!("[mongodb]\nuri = {uri:?}\nevent_database = {event_db:?}\n\n");
        for (db, coll) in streams {
            text += &format!("[[streams]]\ndatabase = {db:?}\ncollection = {coll:?}\n\n");
        }
        text += &format!("[pipeline]\n{pipeline}\n\n");
        text += &format!(
            "[lease]\nttl_ms = 3000\nrenew_ms = 1000\nholder_id = \"bench\"\n\n\
             [sync]\nlisten = \"127.0.0.1:{sync_port}\"\ntokens = [{token:?}]\ntail_poll_ms = 50\nmax_subscribers = 5000\n\n\
             [ops]\nlisten = \"127.0.0.1:{ops_port}\"\n\n[log]\nlevel = \"warn\"\n"
        );
        text += &format!("\n{extra}\n");
        let config = dir.join(format!("bench-{ops_port}.toml"));
        std::fs::write(&config, text)?;
        Ok((config, ops_port, sync_port, token))
    }

    fn start(
        bin: &Path,
        config: PathBuf,
        ops_port: u16,
        sync_port: u16,
        token: String,
    ) -> Result<Self> {
        let log = config.with_extension("log");
        let child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        Ok(Self {
            child,
            bin: bin.to_owned(),
            config,
            log,
            ops_port,
            sync_port,
            token,
        })
    }

    fn restart(&mut self) -> Result<()> {
        let next = Self::start(
            &self.bin,
            self.config.clone(),
            self.ops_port,
            self.sync_port,
            self.token.clone(),
        )?;
        *self = next;
        Ok(())
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM and wait (the daemon stores its checkpoint and releases the lease).
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// (VmHWM, VmRSS) in KiB.
    fn memory_kib(&self) -> (u64, u64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmHWM:"), field("VmRSS:"))
    }

    /// utime + stime, seconds.
    fn cpu_secs(&self) -> f64 {
        process_cpu_secs(self.pid())
    }

    async fn metrics(&self) -> String {
        http_get(self.ops_port, "/metrics", None)
            .await
            .unwrap_or_default()
    }

    /// Change events the daemon has finished with (appended, skipped, dead-lettered).
    async fn done_changes(&self, stream: &str) -> u64 {
        done_in(&self.metrics().await, stream)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// Change events of `stream` finished (appended, skipped, dead-lettered) in a `/metrics` text.
fn done_in(text: &str, stream: &str) -> u64 {
    let label = format!("stream=\"{stream}\"");
    text.lines()
        .filter(|l| {
            (l.starts_with("eventsync_events_appended_total{")
                || l.starts_with("eventsync_changes_skipped_total{")
                || l.starts_with("eventsync_dead_letters_total{"))
                && l.contains(&label)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// utime + stime of process `pid`, seconds.
fn process_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line; 12 and 13 after the name.
    (ticks(11) + ticks(12)) / clock_ticks()
}

/// The change-stream batch size of the bare driver loops (the daemon's default).
const BATCH: u32 = 256;

impl Drop for DaemonProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A minimal HTTP/1.0 GET (the body is delimited by the connection's end).
async fn http_get(port: u16, path: &str, token: Option<&str>) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}

/// A minimal HTTP/1.0 POST of a JSON body; returns the status and the body.
async fn http_post(port: u16, path: &str, token: &str, body: &[u8]) -> Result<(u16, Vec<u8>)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.set_nodelay(true)?;
    let head = format!(
        "POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut req = head.into_bytes();
    req.extend_from_slice(body);
    s.write_all(&req).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf)).await??;
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no HTTP header end")?;
    let status = std::str::from_utf8(&buf[..end])?
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, buf[end + 4..].to_vec()))
}

/// The sum of the samples of a metric (all label sets); `None` when the daemon does not
/// export it.
fn metric_total(text: &str, name: &str) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for l in text.lines() {
        if l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' ')) {
            found = true;
            sum += l
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
        }
    }
    found.then_some(sum)
}

/// The cumulative buckets `(le, count)` of a histogram for one label set.
fn histogram_buckets(text: &str, name: &str, label: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut out: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(label))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let n = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, n))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The bucket bound under which a fraction `q` of the requests between two scrapes fell
/// (seconds), from the daemon's own latency histogram.
fn histogram_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let b = before.iter().find(|(l, _)| l == le).map_or(0.0, |x| x.1);
            (*le, n - b)
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    delta
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map(|(le, _)| *le)
}

/// Operations the server has served (serverStatus `opcounters`), when it reports them.
async fn server_ops(client: &mongodb::Client) -> Option<i64> {
    catchup::ServerCounters::read(client).await.map(|c| c.ops)
}

/// Waits until the daemon's first checkpoint of `stream` (the change stream is open).
async fn wait_streaming(
    client: &mongodb::Client,
    event_db: &str,
    stream: &str,
    daemon: &DaemonProc,
) -> Result<()> {
    let cps = client
        .database(event_db)
        .collection::<Document>("checkpoints");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if cps
            .find_one(doc! { "_id": stream, "resync_pending": false })
            .await?
            .is_some()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "daemon did not start streaming {stream}:\n{}",
                daemon.log_tail()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the daemon finished `target` change events of `stream`; returns the time
/// from the first progress to the end, and the CPU seconds the daemon spent meanwhile.
async fn wait_done(
    daemon: &DaemonProc,
    stream: &str,
    target: u64,
    timeout: Duration,
) -> Result<(f64, f64, f64)> {
    let start = Instant::now();
    let cpu0 = daemon.cpu_secs();
    let mut first: Option<Instant> = None;
    loop {
        let done = daemon.done_changes(stream).await;
        if done > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if done >= target {
            let end = Instant::now();
            let busy = end.duration_since(first.unwrap_or(start)).as_secs_f64();
            return Ok((
                busy,
                end.duration_since(start).as_secs_f64(),
                daemon.cpu_secs() - cpu0,
            ));
        }
        if start.elapsed() > timeout {
            return Err(format!(
                "daemon finished {done} of {target} changes of {stream} in {timeout:?}:\n{}",
                daemon.log_tail()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The write load.

fn payload(size: usize, seed: usize) -> String {
    let mut s = String::with_capacity(size);
    let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut x = seed as u64 * 2_654_435_761 + 1;
    while s.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push(alphabet[(x % alphabet.len() as u64) as usize] as char);
    }
    s
}

/// Inserts documents `0..docs` and updates each `updates` times, through the thin client,
/// with `writers` concurrent writers. Returns (successful writes, seconds).
async fn write_load(coll: &mongodb::Collection<Document>, a: &Args) -> Result<(u64, f64)> {
    let start = Instant::now();
    let large_every = if a.large_fraction > 0.0 {
        (1.0 / a.large_fraction).round().max(1.0) as usize
    } else {
        usize::MAX
    };
    let mut tasks = Vec::new();
    for w in 0..a.writers {
        let coll = coll.clone();
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let client =
                SyncCollection::<Document>::new(coll, SyncOptions::new(format!("bench-{w}")))?;
            let mut ok = 0u64;
            let mine: Vec<usize> = (0..a.docs).filter(|i| i % a.writers == w).collect();
            for &i in &mine {
                let size = if i % large_every == large_every - 1 {
                    a.doc_size_large
                } else {
                    a.doc_size_small
                };
                client
                    .find_one_and_upsert(doc! {
                        "_id": i as i64, "kind": "bench", "n": 0_i32, "at": bson::DateTime::now(),
                        "tags": ["a", "b"], "payload": payload(size, i),
                    })
                    .await?;
                ok += 1;
            }
            for u in 0..a.updates {
                for &i in &mine {
                    client
                        .update_one(
                            i as i64,
                            doc! { "$set": { "n": (u + 1) as i32, "note": format!("update {u}") } },
                        )
                        .await?;
                    ok += 1;
                }
            }
            Ok::<u64, BoxError>(ok)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok((total, start.elapsed().as_secs_f64()))
}

// ---------------------------------------------------------------------------------------
// Phases.

/// Phase 1: the bare change-stream read rate of the load's backlog.
async fn raw_phase(db: &mongodb::Database, a: &Args) -> Result<Value> {
    let coll = db.collection::<Document>("raw");
    // Established before writing; the same bare read as the catch-up phase's.
    let stream = catchup::open_reader(&coll).await?;
    let (writes, write_secs) = write_load(&coll, a).await?;
    let (secs, bytes) = catchup::raw_read(stream, writes).await?;
    Ok(json!({
        "writes": writes,
        "write_secs": round(write_secs),
        "write_rate_per_s": round(writes as f64 / write_secs),
        "changes_read": writes,
        "read_secs": round(secs),
        "read_rate_per_s": round(writes as f64 / secs),
        "read_mib_per_s": round(bytes as f64 / secs / 1048576.0),
    }))
}

/// Phase 2: the daemon catching up on the same backlog.
async fn daemon_phase(
    client: &mongodb::Client,
    db: &mongodb::Database,
    event_db: &str,
    daemon: &mut DaemonProc,
    a: &Args,
) -> Result<Value> {
    let stream = format!("{}.tput", db.name());
    let coll = db.collection::<Document>("tput");
    wait_streaming(client, event_db, &stream, daemon).await?;
    daemon.stop();
    let (writes, write_secs) = write_load(&coll, a).await?;
    daemon.restart()?;
    let (busy, total, cpu) = wait_done(daemon, &stream, writes, Duration::from_secs(600)).await?;
    let events = client
        .database(event_db)
        .collection::<Document>("events")
        .count_documents(doc! { "stream": &stream })
        .await?;
    let (hwm, rss) = daemon.memory_kib();
    Ok(json!({
        "writes": writes,
        "write_secs": round(write_secs),
        "changes_done": writes,
        "events_appended": events,
        "catch_up_secs": round(busy),
        "catch_up_secs_incl_start": round(total),
        "rate_changes_per_s": round(writes as f64 / busy),
        "rate_events_per_s": round(events as f64 / busy),
        "cpu_secs": round(cpu),
        "changes_per_cpu_sec": round(writes as f64 / cpu.max(0.01)),
        "events_per_cpu_sec": round(events as f64 / cpu.max(0.01)),
        "rss_kib": rss,
        "hwm_kib": hwm,
    }))
}

/// Two replicas catch up on one collection split into `p` partitions.
async fn partition_phase(
    client: &mongodb::Client,
    db: &mongodb::Database,
    event_db: &str,
    bin: &Path,
    dir: &Path,
    a: &Args,
    p: u32,
) -> Result<Value> {
    let name = format!("part{p}");
    let coll = db.collection::<Document>(&name);
    let table = format!(
        "[[streams]]\ndatabase = {:?}\ncollection = {name:?}\npartitions = {p}\n\n{}",
        db.name(),
        a.extra_config
    );
    let mut replicas = Vec::new();
    for holder in ["bench-a", "bench-b"] {
        let (config, ops, sync, token) =
            DaemonProc::write_config(dir, &a.uri, event_db, &[], &a.pipeline, &table)?;
        let text = std::fs::read_to_string(&config)?
            .replace("holder_id = \"bench\"", &format!("holder_id = {holder:?}"));
        std::fs::write(&config, text)?;
        replicas.push(DaemonProc::start(bin, config, ops, sync, token)?);
    }
    let streams: Vec<String> = if p <= 1 {
        vec![format!("{}.{name}", db.name())]
    } else {
        (0..p)
            .map(|i| format!("{}.{name}#{i}/{p}", db.name()))
            .collect()
    };
    for s in &streams {
        wait_streaming(client, event_db, s, &replicas[0]).await?;
    }
    for r in &mut replicas {
        r.stop();
    }
    let (writes, _) = write_load(&coll, a).await?;
    let start = Instant::now();
    for r in &mut replicas {
        r.restart()?;
    }
    let mut first: Option<Instant> = None;
    loop {
        let mut done = 0;
        for r in &replicas {
            for s in &streams {
                done += r.done_changes(s).await;
            }
        }
        if done > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if done >= writes {
            break;
        }
        if start.elapsed() > Duration::from_secs(600) {
            return Err(format!(
                "partitions {p}: {done} of {writes} changes in 600 s:\n{}",
                replicas[0].log_tail()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let busy = first.unwrap_or(start).elapsed().as_secs_f64();
    let total = start.elapsed().as_secs_f64();
    let mut events = 0;
    for s in &streams {
        events += client
            .database(event_db)
            .collection::<Document>("events")
            .count_documents(doc! { "stream": s })
            .await?;
    }
    for r in &mut replicas {
        r.stop();
    }
    Ok(json!({
        "partitions": p,
        "replicas": 2,
        "writes": writes,
        "events_appended": events,
        "catch_up_secs": round(busy),
        "catch_up_secs_incl_start": round(total),
        "rate_events_per_s": round(events as f64 / busy),
        "rate_changes_per_s": round(writes as f64 / busy),
    }))
}

/// The live subscriber: SSE when the daemon serves it, else tailing the events collection.
/// Records the wall-clock time (µs) each `(doc key, to_version)` was seen.
type Seen = Arc<Mutex<Vec<(String, i64, i64)>>>;

async fn subscribe_sse(daemon_port: u16, token: String, stream: String, seen: Seen) -> Result<()> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", daemon_port)).await?;
    s.set_nodelay(true)?;
    s.write_all(
        format!(
            "GET /v1/streams/{stream}/live?after=0 HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut lines = BufReader::new(s).lines();
    let status = lines.next_line().await?.unwrap_or_default();
    if !status.contains(" 200") {
        return Err(format!("live endpoint answered {status:?}").into());
    }
    while let Some(l) = lines.next_line().await? {
        if l.is_empty() {
            break; // end of headers
        }
    }
    while let Some(l) = lines.next_line().await? {
        if let Some(data) = l.strip_prefix("data:") {
            let at = now_micros();
            if let Ok(v) = serde_json::from_str::<Value>(data.trim()) {
                if let (Some(k), Some(t)) = (v["key"].as_str(), v["to_version"].as_i64()) {
                    seen.lock().await.push((k.to_owned(), t, at));
                }
            }
        }
    }
    Ok(())
}

async fn subscribe_tail(
    events: mongodb::Collection<Document>,
    stream: String,
    seen: Seen,
) -> Result<()> {
    let mut after = 0i64;
    loop {
        let docs: Vec<Document> = events
            .find(doc! { "stream": &stream, "seq": { "$gt": after } })
            .sort(doc! { "seq": 1 })
            .limit(1000)
            .projection(doc! { "seq": 1, "doc_key": 1, "to_version": 1 })
            .await?
            .try_collect()
            .await?;
        let at = now_micros();
        if docs.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let mut s = seen.lock().await;
        for d in docs {
            after = eventsync::mongo::get_int(&d, "seq").unwrap_or(after);
            if let (Ok(k), Some(t)) = (
                d.get_str("doc_key"),
                eventsync::mongo::get_int(&d, "to_version"),
            ) {
                s.push((k.to_owned(), t, at));
            }
        }
    }
}

/// Phase 3: paced writes while the daemon runs live.
async fn latency_phase(
    client: &mongodb::Client,
    db: &mongodb::Database,
    event_db: &str,
    daemon: &DaemonProc,
    a: &Args,
    rate: u64,
) -> Result<Value> {
    let stream = format!("{}.paced{rate}", db.name());
    let coll = db.collection::<Document>(&format!("paced{rate}"));
    wait_streaming(client, event_db, &stream, daemon).await?;
    // Documents exist first; the paced writes are compare-and-swap updates of them.
    let writer = SyncCollection::<Document>::new(coll.clone(), SyncOptions::new("bench-paced"))?;
    let docs: Vec<Document> = (0..a.latency_docs)
        .map(|i| doc! { "_id": format!("p{i}"), "n": 0_i32, "payload": payload(a.doc_size_small, i), "version": 1_i64, "_origin": "bench-paced" })
        .collect();
    for chunk in docs.chunks(1000) {
        coll.insert_many(chunk.to_vec()).await?;
    }
    wait_done(
        daemon,
        &stream,
        a.latency_docs as u64,
        Duration::from_secs(300),
    )
    .await?;

    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let probe = http_get(
        daemon.sync_port,
        &format!("/v1/streams/{stream}"),
        Some(&daemon.token),
    )
    .await;
    let use_sse = probe
        .as_deref()
        .map(|b| b.contains(&stream))
        .unwrap_or(false);
    let subscriber = if use_sse {
        tokio::spawn(subscribe_sse(
            daemon.sync_port,
            daemon.token.clone(),
            stream.clone(),
            seen.clone(),
        ))
    } else {
        tokio::spawn(subscribe_tail(
            client.database(event_db).collection("events"),
            stream.clone(),
            seen.clone(),
        ))
    };
    // Let the subscriber catch up with the inserts.
    let t0 = Instant::now();
    while seen.lock().await.len() < a.latency_docs && t0.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = seen.lock().await.len();
    let events_coll = client.database(event_db).collection::<Document>("events");
    let events0 = events_coll
        .count_documents(doc! { "stream": &stream })
        .await?;
    let cpu0 = daemon.cpu_secs();

    // Open-loop schedule: write k starts at k / rate (a late write starts at once).
    let total = rate * a.latency_secs;
    let concurrency = a.writers.max(1) * 4;
    let writes: Arc<Mutex<Vec<(String, i64, i64)>>> = Arc::new(Mutex::new(Vec::new()));
    let write_ms: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (writer, writes, write_ms, a) = (
            writer.clone_handle(),
            writes.clone(),
            write_ms.clone(),
            a.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut k = w as u64;
            while k < total {
                let due = start + Duration::from_secs_f64(k as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
                // Each writer owns the documents ≡ w (mod concurrency): no CAS conflicts.
                let id = format!("p{}", (k as usize) % a.latency_docs);
                let key = eventsync::mongo::doc_key(&Bson::String(id.clone()));
                let t_start = now_micros();
                let t = Instant::now();
                if let Ok(v) = writer
                    .update_one(id, doc! { "$set": { "n": k as i64 } })
                    .await
                {
                    write_ms
                        .lock()
                        .await
                        .push(t.elapsed().as_secs_f64() * 1000.0);
                    writes.lock().await.push((key, v, t_start));
                }
                k += concurrency as u64;
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let write_secs = start.elapsed().as_secs_f64();
    let writes = writes.lock().await.clone();
    // Wait for the subscriber to see the last write.
    let t1 = Instant::now();
    loop {
        let n = seen.lock().await.len() - before;
        if n >= writes.len() || t1.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    subscriber.abort();
    let live_cpu = daemon.cpu_secs() - cpu0;
    let live_events = events_coll
        .count_documents(doc! { "stream": &stream })
        .await?
        - events0;

    // Event appended_at of every (key, to_version) of the stream.
    let events: Vec<Document> = client
        .database(event_db)
        .collection::<Document>("events")
        .find(doc! { "stream": &stream })
        .projection(doc! { "doc_key": 1, "to_version": 1, "appended_at": 1 })
        .await?
        .try_collect()
        .await?;
    let mut appended: HashMap<String, Vec<(i64, i64)>> = HashMap::new();
    for e in &events {
        if let (Ok(k), Some(v), Ok(at)) = (
            e.get_str("doc_key"),
            eventsync::mongo::get_int(e, "to_version"),
            e.get_datetime("appended_at"),
        ) {
            appended
                .entry(k.to_owned())
                .or_default()
                .push((v, at.timestamp_millis() * 1000));
        }
    }
    let mut subscribed: HashMap<String, Vec<(i64, i64)>> = HashMap::new();
    for (k, v, at) in seen.lock().await.iter() {
        subscribed.entry(k.clone()).or_default().push((*v, *at));
    }
    for m in [&mut appended, &mut subscribed] {
        for list in m.values_mut() {
            list.sort();
        }
    }
    // A write of version v is covered by the first event with to_version ≥ v (a lookup
    // that ran ahead covers several writes with one event).
    let covered = |m: &HashMap<String, Vec<(i64, i64)>>, key: &str, v: i64| {
        m.get(key)
            .and_then(|l| l.iter().find(|(to, _)| *to >= v))
            .map(|(_, at)| *at)
    };
    let mut to_append = Vec::new();
    let mut to_subscriber = Vec::new();
    let mut missing = 0;
    for (key, v, t_start) in &writes {
        match covered(&appended, key, *v) {
            Some(at) => to_append.push((at - t_start) as f64 / 1000.0),
            None => missing += 1,
        }
        if let Some(at) = covered(&subscribed, key, *v) {
            to_subscriber.push((at - t_start) as f64 / 1000.0);
        }
    }
    Ok(json!({
        "target_rate_per_s": rate,
        "writes": writes.len(),
        "achieved_rate_per_s": round(writes.len() as f64 / write_secs),
        "write_ack": percentiles(write_ms.lock().await.clone()),
        "write_to_appended": percentiles(to_append),
        "write_to_subscriber": percentiles(to_subscriber),
        "subscriber": if use_sse { "sse /v1/streams/{stream}/live" } else { "tailing the events collection (5 ms poll)" },
        "writes_without_event": missing,
        "events": live_events,
        "daemon_cpu_secs": round(live_cpu),
        "events_per_cpu_sec": round(live_events as f64 / live_cpu.max(1e-3)),
    }))
}

/// The position of the last event of a stream (0 when empty).
async fn log_head(client: &mongodb::Client, event_db: &str, stream: &str) -> Result<i64> {
    let last = client
        .database(event_db)
        .collection::<Document>("events")
        .find_one(doc! { "stream": stream })
        .sort(doc! { "seq": -1 })
        .projection(doc! { "seq": 1 })
        .await?;
    Ok(last
        .and_then(|d| eventsync::mongo::get_int(&d, "seq"))
        .unwrap_or(0))
}

/// What one SSE subscriber of the fan-out phase saw: `(position, arrival µs)` per event.
#[derive(Default)]
struct Recorder {
    seen: std::sync::Mutex<Vec<(i64, i64)>>,
    last: std::sync::atomic::AtomicI64,
    out_of_order: std::sync::atomic::AtomicU64,
}

/// One SSE subscriber from `after`, recording the position and arrival of every event.
async fn sse_recorder(
    port: u16,
    token: String,
    stream: String,
    after: i64,
    connected: Arc<std::sync::atomic::AtomicUsize>,
    rec: Arc<Recorder>,
) -> Result<()> {
    use std::sync::atomic::Ordering::SeqCst;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.set_nodelay(true)?;
    s.write_all(
        format!(
            "GET /v1/streams/{stream}/live?after={after} HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).await?;
    if !line.contains(" 200") {
        return Err(format!("live endpoint answered {line:?}").into());
    }
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 || line.trim().is_empty() {
            break;
        }
    }
    connected.fetch_add(1, SeqCst);
    rec.last.store(after, SeqCst);
    let mut last = after;
    // Cheap parsing (the bench shares the machine): find "id: N" at line starts.
    let mut buf: Vec<u8> = r.buffer().to_vec();
    let mut s = r.into_inner();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let mut start = 0;
        while let Some(pos) = buf[start..].windows(4).position(|w| w == b"id: ") {
            let at_line_start = start + pos == 0 || buf[start + pos - 1] == b'\n';
            let from = start + pos + 4;
            let Some(nl) = buf[from..].iter().position(|b| *b == b'\n') else {
                start += pos;
                break;
            };
            if at_line_start {
                let seq: i64 = std::str::from_utf8(&buf[from..from + nl])?.trim().parse()?;
                if seq != last + 1 {
                    rec.out_of_order.fetch_add(1, SeqCst);
                }
                last = seq;
                if let Ok(mut seen) = rec.seen.lock() {
                    seen.push((seq, now_micros()));
                }
                rec.last.store(seq, SeqCst);
            }
            start = from + nl;
        }
        // Keep an unfinished line for the next read.
        let keep = buf[start..]
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(start, |p| start + p + 1);
        buf.drain(..keep);
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Live fan-out: `n` SSE subscribers on one replica while paced writes run; write →
/// subscriber latency over every (subscriber, write), and the log reads and server
/// operations per event.
async fn fanout_phase(
    client: &mongodb::Client,
    db: &mongodb::Database,
    event_db: &str,
    daemon: &DaemonProc,
    a: &Args,
    n: usize,
) -> Result<Value> {
    use std::sync::atomic::Ordering::SeqCst;
    let stream = format!("{}.fan", db.name());
    let coll = db.collection::<Document>("fan");
    wait_streaming(client, event_db, &stream, daemon).await?;
    let docs = 200usize;
    if coll.estimated_document_count().await? == 0 {
        let d: Vec<Document> = (0..docs)
            .map(|i| doc! { "_id": format!("f{i}"), "n": 0_i32, "payload": payload(a.doc_size_small, i), "version": 1_i64, "_origin": "bench-fan" })
            .collect();
        coll.insert_many(d).await?;
        wait_done(daemon, &stream, docs as u64, Duration::from_secs(300)).await?;
    }
    let head0 = log_head(client, event_db, &stream).await?;
    let connected = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let recs: Vec<Arc<Recorder>> = (0..n).map(|_| Arc::new(Recorder::default())).collect();
    let mut tasks = Vec::new();
    for rec in &recs {
        tasks.push(tokio::spawn(sse_recorder(
            daemon.sync_port,
            daemon.token.clone(),
            stream.clone(),
            head0,
            connected.clone(),
            rec.clone(),
        )));
        if tasks.len() % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let t0 = Instant::now();
    while connected.load(SeqCst) < n && t0.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let subscribed = connected.load(SeqCst);
    // Let every subscription settle before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m0 = daemon.metrics().await;
    let reads0 = metric_total(&m0, "eventsync_log_reads_total");
    let ops0 = server_ops(client).await;
    let cpu0 = daemon.cpu_secs();

    let writer = SyncCollection::<Document>::new(coll.clone(), SyncOptions::new("bench-fan"))?;
    let total = a.fanout_rate * a.fanout_secs;
    let concurrency = 16usize;
    let writes: Arc<Mutex<Vec<(String, i64, i64)>>> = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let mut wtasks = Vec::new();
    for w in 0..concurrency {
        let (writer, writes, rate) = (writer.clone_handle(), writes.clone(), a.fanout_rate);
        wtasks.push(tokio::spawn(async move {
            let mut k = w as u64;
            while k < total {
                let due = start + Duration::from_secs_f64(k as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
                let id = format!("f{}", (k as usize) % docs);
                let key = eventsync::mongo::doc_key(&Bson::String(id.clone()));
                let t_start = now_micros();
                if let Ok(v) = writer
                    .update_one(id, doc! { "$set": { "n": k as i64 } })
                    .await
                {
                    writes.lock().await.push((key, v, t_start));
                }
                k += concurrency as u64;
            }
        }));
    }
    for t in wtasks {
        t.await?;
    }
    let write_secs = start.elapsed().as_secs_f64();
    let writes = writes.lock().await.clone();
    // Wait until the log holds every write, then until every subscriber has it all.
    let t1 = Instant::now();
    let mut head1 = log_head(client, event_db, &stream).await?;
    loop {
        let evs: Vec<Document> = client
            .database(event_db)
            .collection::<Document>("events")
            .find(doc! { "stream": &stream, "seq": { "$gt": head0 } })
            .projection(doc! { "doc_key": 1, "to_version": 1 })
            .await?
            .try_collect()
            .await?;
        let mut top: HashMap<String, i64> = HashMap::new();
        for e in &evs {
            if let (Ok(k), Some(v)) = (
                e.get_str("doc_key"),
                eventsync::mongo::get_int(e, "to_version"),
            ) {
                let t = top.entry(k.to_owned()).or_default();
                *t = (*t).max(v);
            }
        }
        let all = writes
            .iter()
            .all(|(k, v, _)| top.get(k).is_some_and(|t| t >= v));
        head1 = head1.max(log_head(client, event_db, &stream).await?);
        if all || t1.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while recs.iter().any(|r| r.last.load(SeqCst) < head1) && t1.elapsed() < Duration::from_secs(90)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deliver_secs = start.elapsed().as_secs_f64();
    let cpu = daemon.cpu_secs() - cpu0;
    let m1 = daemon.metrics().await;
    let reads1 = metric_total(&m1, "eventsync_log_reads_total");
    let ops1 = server_ops(client).await;
    for t in &tasks {
        t.abort();
    }
    let events = (head1 - head0).max(0);
    // Which event carries each write: the first of its document with to_version ≥ v.
    let evs: Vec<Document> = client
        .database(event_db)
        .collection::<Document>("events")
        .find(doc! { "stream": &stream, "seq": { "$gt": head0 } })
        .projection(doc! { "seq": 1, "doc_key": 1, "to_version": 1 })
        .await?
        .try_collect()
        .await?;
    let mut by_key: HashMap<String, Vec<(i64, i64)>> = HashMap::new();
    for e in &evs {
        if let (Ok(k), Some(v), Some(seq)) = (
            e.get_str("doc_key"),
            eventsync::mongo::get_int(e, "to_version"),
            eventsync::mongo::get_int(e, "seq"),
        ) {
            by_key.entry(k.to_owned()).or_default().push((v, seq));
        }
    }
    for l in by_key.values_mut() {
        l.sort();
    }
    let carriers: Vec<(i64, i64)> = writes
        .iter()
        .filter_map(|(k, v, t)| {
            by_key
                .get(k)
                .and_then(|l| l.iter().find(|(to, _)| to >= v))
                .map(|(_, seq)| (*seq, *t))
        })
        .collect();
    let mut lat = Vec::with_capacity(carriers.len() * n);
    let mut complete = 0;
    let mut out_of_order = 0;
    for r in &recs {
        let seen = r.seen.lock().map(|s| s.clone()).unwrap_or_default();
        out_of_order += r.out_of_order.load(SeqCst);
        let got: Vec<i64> = seen.iter().map(|(s, _)| *s).collect();
        if got == ((head0 + 1)..=head1).collect::<Vec<_>>() {
            complete += 1;
        }
        for (seq, t) in &carriers {
            if let Ok(i) = seen.binary_search_by_key(seq, |(s, _)| *s) {
                lat.push((seen[i].1 - t) as f64 / 1000.0);
            }
        }
    }
    let per_event = |d: Option<f64>| {
        d.filter(|_| events > 0)
            .map(|d| round(d / events as f64 * 100.0) / 100.0)
    };
    Ok(json!({
        "subscribers": n,
        "subscribed": subscribed,
        "complete_in_order": complete,
        "out_of_order_or_gap": out_of_order,
        "target_rate_per_s": a.fanout_rate,
        "writes": writes.len(),
        "achieved_rate_per_s": round(writes.len() as f64 / write_secs),
        "events": events,
        "write_to_subscriber": percentiles(lat),
        "delivered_all_secs": round(deliver_secs),
        "log_reads": reads0.zip(reads1).map(|(a, b)| b - a),
        "log_reads_per_event": per_event(reads0.zip(reads1).map(|(a, b)| b - a)),
        "server_ops_per_event": per_event(ops0.zip(ops1).map(|(a, b)| (b - a) as f64)),
        "daemon_cpu_secs": round(cpu),
        "daemon_cpu_ms_per_event": if events > 0 { round(cpu * 1000.0 / events as f64) } else { 0.0 },
    }))
}

/// Catch-up serving: a large gap paged through by one client (twice: the first pass may
/// find nothing in memory), then 50 concurrent clients asking for ≤ 1,000 missing events,
/// near the head and anywhere in the log.
async fn serve_phase(
    client: &mongodb::Client,
    db: &mongodb::Database,
    event_db: &str,
    daemon: &DaemonProc,
    a: &Args,
) -> Result<Value> {
    let stream = format!("{}.serve", db.name());
    let coll = db.collection::<Document>("serve");
    wait_streaming(client, event_db, &stream, daemon).await?;
    let mut batch = Vec::with_capacity(1000);
    for i in 0..a.serve_events {
        batch.push(doc! { "_id": i as i64, "n": 0_i32, "payload": payload(a.doc_size_small, i), "version": 1_i64, "_origin": "bench-serve" });
        if batch.len() == 1000 || i + 1 == a.serve_events {
            coll.insert_many(std::mem::take(&mut batch)).await?;
        }
    }
    wait_done(
        daemon,
        &stream,
        a.serve_events as u64,
        Duration::from_secs(900),
    )
    .await?;
    // Every insert is its own event: wait until the log holds them all.
    let t0 = Instant::now();
    let mut head = log_head(client, event_db, &stream).await?;
    while head < a.serve_events as i64 && t0.elapsed() < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        head = log_head(client, event_db, &stream).await?;
    }
    // The bound: a bare driver loop reading the log by position, 1,000 per query, raw.
    let events_coll = client
        .database(event_db)
        .collection::<RawDocumentBuf>("events");
    let mut raw_reads = Vec::new();
    for projected in [false, true] {
        let t = Instant::now();
        let (mut after, mut n) = (0i64, 0usize);
        loop {
            let mut find = events_coll
                .find(doc! { "stream": &stream, "seq": { "$gt": after } })
                .sort(doc! { "seq": 1 })
                .limit(1000)
                .batch_size(1000);
            if projected {
                find = find.projection(doc! { "_id": 0, "token": 0, "cluster_time": 0, "ns": 0 });
            }
            let page: Vec<RawDocumentBuf> = find.await?.try_collect().await?;
            let Some(last) = page.last() else { break };
            after = last
                .get_i64("seq")
                .or_else(|_| last.get_i32("seq").map(i64::from))?;
            n += page.len();
        }
        let secs = t.elapsed().as_secs_f64();
        raw_reads.push(
            json!({ "projection": projected, "events": n, "events_per_s": round(n as f64 / secs) }),
        );
    }
    let port = daemon.sync_port;
    let token = daemon.token.clone();
    let body = |pos: i64, cursor: Option<&str>| {
        let mut b = json!({ "vector": { "streams": [ { "stream": &stream, "position": pos } ] }, "limit": 1000 });
        if let Some(c) = cursor {
            b["cursor"] = json!(c);
        }
        serde_json::to_vec(&b).unwrap_or_default()
    };
    let reads = |m: &str| metric_total(m, "eventsync_log_reads_total");
    // One client pages through the whole log.
    let mut passes = Vec::new();
    for pass in 0..2 {
        let r0 = reads(&daemon.metrics().await);
        let t = Instant::now();
        let mut n = 0usize;
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let (status, resp) = http_post(
                port,
                "/v1/sync/missing",
                &token,
                &body(0, cursor.as_deref()),
            )
            .await?;
            if status != 200 {
                return Err(format!(
                    "missing answered {status}: {}",
                    String::from_utf8_lossy(&resp)
                )
                .into());
            }
            let v: Value = serde_json::from_slice(&resp)?;
            n += v["items"].as_array().map_or(0, Vec::len);
            pages += 1;
            match v["next_cursor"].as_str() {
                Some(c) if v["has_more"] == true => cursor = Some(c.to_owned()),
                _ => break,
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let r1 = reads(&daemon.metrics().await);
        passes.push(json!({
            "pass": pass + 1, "items": n, "pages": pages, "secs": round(secs),
            "events_per_s": round(n as f64 / secs),
            "log_reads": r0.zip(r1).map(|(a, b)| b - a),
        }));
    }
    // Concurrent clients, each missing ≤ 1,000 events.
    let mut concurrent = Vec::new();
    for (name, recent) in [("near_head", true), ("anywhere", false)] {
        let m0 = daemon.metrics().await;
        let r0 = reads(&m0);
        let route = "route=\"/v1/sync/missing\"";
        let h0 = histogram_buckets(&m0, "eventsync_http_request_duration_seconds", route);
        let cpu0 = daemon.cpu_secs();
        let start = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..a.serve_clients {
            let (token, stream, secs) = (token.clone(), stream.clone(), a.serve_secs);
            tasks.push(tokio::spawn(async move {
                use rand::{Rng, SeedableRng};
                let mut rng = rand::rngs::StdRng::seed_from_u64(c as u64);
                let mut lat = Vec::new();
                let mut items = 0usize;
                let mut errors = 0usize;
                while start.elapsed() < Duration::from_secs(secs) {
                    let k = rng.gen_range(1..=1000.min(head.max(1)));
                    let pos = if recent { head - k } else { rng.gen_range(0..=(head - 1000).max(0)) };
                    let b = serde_json::to_vec(&json!({ "vector": { "streams": [ { "stream": &stream, "position": pos } ] }, "limit": 1000 })).unwrap_or_default();
                    let t = Instant::now();
                    match http_post(port, "/v1/sync/missing", &token, &b).await {
                        Ok((200, resp)) if !resp.is_empty() => {
                            lat.push(t.elapsed().as_secs_f64() * 1000.0);
                            // k events are missing (the log does not change meanwhile);
                            // the tests check the items themselves.
                            items += (head - pos).min(1000) as usize;
                        }
                        _ => errors += 1,
                    }
                }
                (lat, items, errors)
            }));
        }
        let mut lat = Vec::new();
        let (mut items, mut errors) = (0, 0);
        for t in tasks {
            let (l, i, e) = t.await?;
            lat.extend(l);
            items += i;
            errors += e;
        }
        let secs = start.elapsed().as_secs_f64();
        let m1 = daemon.metrics().await;
        let r1 = reads(&m1);
        let h1 = histogram_buckets(&m1, "eventsync_http_request_duration_seconds", route);
        let in_daemon = |q| histogram_quantile(&h0, &h1, q).map(|s| s * 1000.0);
        let requests = lat.len();
        concurrent.push(json!({
            "positions": name, "clients": a.serve_clients, "requests": requests, "errors": errors,
            "requests_per_s": round(requests as f64 / secs),
            "events_per_s": round(items as f64 / secs),
            "latency": percentiles(lat),
            "in_daemon_p50_ms_at_most": in_daemon(0.5),
            "in_daemon_p99_ms_at_most": in_daemon(0.99),
            "log_reads_per_request": r0.zip(r1).map(|(a, b)| round((b - a) / requests.max(1) as f64)),
            "daemon_cpu_secs": round(daemon.cpu_secs() - cpu0),
        }));
    }
    Ok(json!({
        "events_in_log": head,
        "raw_log_read": raw_reads,
        "large_gap": passes,
        "concurrent": concurrent,
    }))
}

/// Phase 4: RSS of a fresh daemon tracking `--track-docs` documents.
async fn tracking_phase(
    client: &mongodb::Client,
    db: &mongodb::Database,
    bin: &Path,
    dir: &Path,
    a: &Args,
    docs: usize,
) -> Result<Value> {
    let name = format!("track{docs}");
    let coll = db.collection::<Document>(&name);
    let start = Instant::now();
    let mut batch = Vec::with_capacity(1000);
    for i in 0..docs {
        batch.push(doc! { "_id": i as i64, "n": 0_i32, "s": payload(64, i), "version": 1_i64, "_origin": "bench-track" });
        if batch.len() == 1000 || i + 1 == docs {
            coll.insert_many(std::mem::take(&mut batch)).await?;
        }
    }
    let insert_secs = start.elapsed().as_secs_f64();
    let event_db = format!("{}_tlog", db.name());
    let stream = format!("{}.{name}", db.name());
    let (config, ops, sync, token) = DaemonProc::write_config(
        dir,
        &a.uri,
        &event_db,
        &[(db.name().to_owned(), name.clone())],
        &a.pipeline,
        &a.extra_config,
    )?;
    let daemon = DaemonProc::start(bin, config, ops, sync, token)?;
    let (busy, total, cpu) =
        wait_done(&daemon, &stream, docs as u64, Duration::from_secs(900)).await?;
    let (hwm_sync, rss_sync) = daemon.memory_kib();
    wait_streaming(client, &event_db, &stream, &daemon).await?;
    // Live updates spread over all documents (cache misses: shadows read back).
    let updates = 5000.min(docs);
    let step = (docs / updates.max(1)).max(1);
    for j in 0..updates {
        coll.update_one(
            doc! { "_id": (j * step) as i64 },
            doc! { "$set": { "n": 1 }, "$inc": { "version": 1_i64 } },
        )
        .await?;
    }
    wait_done(
        &daemon,
        &stream,
        (docs + updates) as u64,
        Duration::from_secs(300),
    )
    .await?;
    let (hwm, rss) = daemon.memory_kib();
    let cpu_all = daemon.cpu_secs();
    let _ = client
        .database(&event_db)
        .drop()
        .await
        .map_err(|e| eprintln!("drop {event_db}: {e}"));
    drop(daemon);
    Ok(json!({
        "documents": docs,
        "insert_secs": round(insert_secs),
        "initial_sync_secs": round(busy),
        "initial_sync_secs_incl_start": round(total),
        "initial_sync_docs_per_s": round(docs as f64 / busy),
        "initial_sync_cpu_secs": round(cpu),
        "live_updates": updates,
        "rss_after_initial_sync_kib": rss_sync,
        "hwm_after_initial_sync_kib": hwm_sync,
        "rss_after_updates_kib": rss,
        "hwm_kib": hwm,
        "cpu_secs_total": round(cpu_all),
    }))
}

trait CloneHandle {
    fn clone_handle(&self) -> Self;
}

impl CloneHandle for SyncCollection<Document> {
    fn clone_handle(&self) -> Self {
        SyncCollection::new(self.collection().clone(), self.options().clone())
            .expect("same options")
    }
}

fn mib(kib: &Value) -> String {
    kib.as_u64()
        .map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

fn table(r: &Value) {
    let g = |p: &str| r.pointer(p).cloned().unwrap_or(Value::Null);
    let lat = |p: &str| {
        let v = g(p);
        format!(
            "p50 {} / p99 {} / max {} ms (n={})",
            v["p50_ms"], v["p99_ms"], v["max_ms"], v["count"]
        )
    };
    let mut rows: Vec<(String, String)> = vec![
        (
            "machine".into(),
            format!(
                "{} cores, {}",
                g("/machine/cores"),
                g("/machine/memory").as_str().unwrap_or("?")
            ),
        ),
        (
            "load".into(),
            format!(
                "{} docs x (1 + {} updates), {} writers, {} B small / {} B large ({:.0}% large)",
                g("/args/docs"),
                g("/args/updates"),
                g("/args/writers"),
                g("/args/doc_size_small"),
                g("/args/doc_size_large"),
                g("/args/large_fraction").as_f64().unwrap_or(0.0) * 100.0
            ),
        ),
        (
            "write rate (thin client)".into(),
            format!("{} writes/s", g("/raw/write_rate_per_s")),
        ),
        (
            "raw change-stream read".into(),
            format!(
                "{} changes/s ({} MiB/s)",
                g("/raw/read_rate_per_s"),
                g("/raw/read_mib_per_s")
            ),
        ),
        (
            "daemon catch-up".into(),
            format!(
                "{} changes/s, {} events/s appended",
                g("/daemon/rate_changes_per_s"),
                g("/daemon/rate_events_per_s")
            ),
        ),
        (
            "ratio daemon / raw".into(),
            format!("{}", g("/ratio_daemon_to_raw")),
        ),
        (
            "daemon CPU".into(),
            format!(
                "{} changes per CPU-second ({} events)",
                g("/daemon/changes_per_cpu_sec"),
                g("/daemon/events_per_cpu_sec")
            ),
        ),
    ];
    if g("/raw").is_null() {
        // The raw and daemon phases did not run: keep the machine row only.
        rows.truncate(1);
    }
    for i in 0..g("/latency").as_array().map_or(0, Vec::len) {
        let p = |k: &str| format!("/latency/{i}/{k}");
        rows.push((
            "paced load".into(),
            format!(
                "target {} writes/s, achieved {}",
                g(&p("target_rate_per_s")),
                g(&p("achieved_rate_per_s"))
            ),
        ));
        rows.push(("  write ack".into(), lat(&p("write_ack"))));
        rows.push((
            "  daemon CPU (live, incl. one SSE subscriber)".into(),
            format!(
                "{} events per CPU-s ({} events, {} CPU-s)",
                g(&p("events_per_cpu_sec")),
                g(&p("events")),
                g(&p("daemon_cpu_secs"))
            ),
        ));
        rows.push(("  write -> appended".into(), lat(&p("write_to_appended"))));
        rows.push((
            "  write -> live subscriber".into(),
            lat(&p("write_to_subscriber")),
        ));
        rows.push((
            "  subscriber".into(),
            g(&p("subscriber")).as_str().unwrap_or("-").to_owned(),
        ));
    }
    for i in 0..g("/fanout").as_array().map_or(0, Vec::len) {
        let p = |k: &str| format!("/fanout/{i}/{k}");
        rows.push((
            format!("live fan-out, {} subscribers", g(&p("subscribers"))),
            format!(
                "{} writes/s: write -> subscriber {}; log reads/event {}, server ops/event {}, daemon CPU {} ms/event; {}/{} complete in order",
                g(&p("achieved_rate_per_s")),
                lat(&p("write_to_subscriber")),
                g(&p("log_reads_per_event")),
                g(&p("server_ops_per_event")),
                g(&p("daemon_cpu_ms_per_event")),
                g(&p("complete_in_order")),
                g(&p("subscribers")),
            ),
        ));
    }
    if !g("/serve").is_null() {
        for i in 0..g("/serve/raw_log_read").as_array().map_or(0, Vec::len) {
            let p = |k: &str| format!("/serve/raw_log_read/{i}/{k}");
            rows.push((
                format!(
                    "raw log read by position (bare driver{})",
                    if g(&p("projection")) == true {
                        ", projection"
                    } else {
                        ""
                    }
                ),
                format!("{} events/s", g(&p("events_per_s"))),
            ));
        }
        for i in 0..g("/serve/large_gap").as_array().map_or(0, Vec::len) {
            let p = |k: &str| format!("/serve/large_gap/{i}/{k}");
            rows.push((
                format!("catch-up serving, large gap (pass {})", g(&p("pass"))),
                format!(
                    "{} events/s ({} events, {} log reads)",
                    g(&p("events_per_s")),
                    g(&p("items")),
                    g(&p("log_reads"))
                ),
            ));
        }
        for i in 0..g("/serve/concurrent").as_array().map_or(0, Vec::len) {
            let p = |k: &str| format!("/serve/concurrent/{i}/{k}");
            rows.push((
                format!(
                    "catch-up serving, {} clients, <= 1000 missing, {}",
                    g(&p("clients")),
                    g(&p("positions")).as_str().unwrap_or("?")
                ),
                format!(
                    "{} (in the daemon: p50 <= {} / p99 <= {} ms); {} req/s, {} events/s, {} log reads/request",
                    lat(&p("latency")),
                    g(&p("in_daemon_p50_ms_at_most")),
                    g(&p("in_daemon_p99_ms_at_most")),
                    g(&p("requests_per_s")),
                    g(&p("events_per_s")),
                    g(&p("log_reads_per_request"))
                ),
            ));
        }
    }
    rows.extend([(
        "daemon peak RSS (phases 2-3)".into(),
        mib(&g("/daemon_peak_rss_kib")),
    )]);
    for i in 0..g("/tracking").as_array().map_or(0, Vec::len) {
        let p = |k: &str| g(&format!("/tracking/{i}/{k}"));
        rows.push((
            format!("tracking {} docs", p("documents")),
            format!(
                "initial sync {} docs/s ({} CPU-s); RSS after sync / after updates / peak {} / {} / {}",
                p("initial_sync_docs_per_s"),
                p("initial_sync_cpu_secs"),
                mib(&p("rss_after_initial_sync_kib")),
                mib(&p("rss_after_updates_kib")),
                mib(&p("hwm_kib"))
            ),
        ));
    }
    for (list, label) in [("catchup", "catch-up"), ("streams", "catch-up")] {
        for i in 0..g(&format!("/{list}")).as_array().map_or(0, Vec::len) {
            let p = |k: &str| g(&format!("/{list}/{i}/{k}"));
            rows.push((
                format!(
                    "{label} {}: {} x {} B, {} change(s) each, {} stream(s)",
                    p("load").as_str().unwrap_or("?"),
                    p("documents"),
                    p("doc_bytes"),
                    p("changes_per_document"),
                    p("streams")
                ),
                format!("{} changes", p("changes")),
            ));
            for side in ["raw", "baseline", "daemon"] {
                if p(side).is_null() {
                    continue;
                }
                let q = |k: &str| p(side)[k].clone();
                rows.push((
                    format!("  {side}"),
                    format!(
                        "{} changes/s, {} events/s, {} MiB/s; {} events per CPU-s; server: {} ops, {} B in, {} B out, {} us CPU per event{}",
                        q("changes_per_s"),
                        if side == "daemon" { q("events_per_s") } else { q("changes_per_s") },
                        q("mib_per_s"),
                        if side == "daemon" { q("events_per_cpu_sec") } else { q("changes_per_cpu_sec") },
                        q("server_ops_per_event"),
                        q("bytes_in_per_event"),
                        q("bytes_out_per_event"),
                        q("server_cpu_us_per_event"),
                        if side == "daemon" { format!("; RSS {}", mib(&q("rss_kib"))) } else { String::new() },
                    ),
                ));
            }
            if !p("ratio_daemon_to_baseline").is_null() {
                rows.push((
                    "  ratio daemon / baseline, daemon / raw".into(),
                    format!(
                        "{}, {}",
                        p("ratio_daemon_to_baseline"),
                        p("ratio_daemon_to_raw")
                    ),
                ));
            }
        }
    }
    for i in 0..g("/partitions").as_array().map_or(0, Vec::len) {
        let p = |k: &str| format!("/partitions/{i}/{k}");
        rows.push((
            format!("P = {} over 2 replicas", g(&p("partitions"))),
            format!(
                "{} events/s ({} changes/s) catching up",
                g(&p("rate_events_per_s")),
                g(&p("rate_changes_per_s"))
            ),
        ));
    }
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(10);
    println!();
    for (k, v) in rows {
        println!("{k:<w$}  {v}");
    }
}

fn machine() -> Value {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|k| k.parse::<f64>().ok())
        .map_or("?".into(), |k| format!("{:.1} GiB RAM", k / 1048576.0));
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    json!({ "cores": cores, "memory": mem, "cpu": cpu })
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let bin = a.daemon_bin.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("eventsyncd")))
            .unwrap_or_else(|| PathBuf::from("eventsyncd"))
    });
    if !bin.exists() {
        return Err(format!(
            "{} not found: build it (cargo build --release --bins) or pass --daemon-bin",
            bin.display()
        )
        .into());
    }
    let mut opts = mongodb::options::ClientOptions::parse(&a.uri).await?;
    opts.max_pool_size = Some(64);
    let client = mongodb::Client::with_options(opts)?;
    client
        .database("admin")
        .run_command(doc! { "ping": 1 })
        .await?;
    let tag = format!("{}_{:x}", std::process::id(), now_micros() & 0xffff);
    let app_db = format!("bench_{tag}");
    let event_db = format!("bench_{tag}_log");
    let db = client.database(&app_db);
    let dir = std::env::temp_dir().join(format!("eventsync-bench-{tag}"));
    std::fs::create_dir_all(&dir)?;
    let mut results = BTreeMap::<String, Value>::new();
    results.insert("machine".into(), machine());
    results.insert(
        "args".into(),
        json!({
            "docs": a.docs, "writers": a.writers, "updates": a.updates,
            "doc_size_small": a.doc_size_small, "doc_size_large": a.doc_size_large,
            "large_fraction": a.large_fraction, "rate": a.rate, "latency_secs": a.latency_secs,
            "track_docs": a.track_docs, "pipeline": a.pipeline,
            "catchup_docs": a.catchup_docs, "catchup_large_docs": a.catchup_large_docs,
            "streams": a.streams,
            "phases": a.phases, "fanout": a.fanout, "fanout_rate": a.fanout_rate,
            "fanout_secs": a.fanout_secs, "serve_events": a.serve_events,
            "serve_clients": a.serve_clients, "serve_secs": a.serve_secs,
            "partitions": a.partitions,
            "daemon_bin": bin.display().to_string(),
        }),
    );

    let run = |p: &str| a.phases.iter().any(|x| x == p);
    let small = |name: &str, docs: usize, rounds: usize| catchup::Load {
        name: name.to_owned(),
        docs,
        size: a.doc_size_small,
        rounds,
        streams: 1,
    };
    let catchup_loads: Vec<catchup::Load> = if run("catchup") {
        [
            small("small", a.catchup_docs, 1),
            small("coalesced", a.catchup_docs / 4, 4),
            catchup::Load {
                name: "large".into(),
                docs: a.catchup_large_docs,
                size: a.doc_size_large,
                rounds: 1,
                streams: 1,
            },
        ]
        .into_iter()
        .filter(|l| a.catchup_loads.contains(&l.name))
        .collect()
    } else {
        Vec::new()
    };
    let outcome: Result<()> = async {
        let (config, ops, sync, token) = DaemonProc::write_config(
            &dir,
            &a.uri,
            &event_db,
            &["tput", "fan", "serve"]
                .iter()
                .map(|c| (app_db.clone(), c.to_string()))
                .chain(a.rate.iter().map(|r| (app_db.clone(), format!("paced{r}"))))
                .collect::<Vec<_>>(),
            &a.pipeline,
            &a.extra_config,
        )?;
        // Each heavy phase writes to databases of its own (nx-27017 keeps one change log
        // per database: a long one slows every stream of that database) and, but for the
        // live phases, runs a daemon of its own.
        if run("catchup") {
            let cu_db = client.database(&format!("{app_db}_cu"));
            let (config, ops, sync, token) = DaemonProc::write_config(
                &dir,
                &a.uri,
                &event_db,
                &catchup_loads
                    .iter()
                    .flat_map(catchup::Load::collections)
                    .map(|c| (cu_db.name().to_owned(), c))
                    .collect::<Vec<_>>(),
                &a.pipeline,
                &a.extra_config,
            )?;
            let daemon = DaemonProc::start(&bin, config, ops, sync, token)?;
            let mut runs = Vec::new();
            for load in &catchup_loads {
                eprintln!(
                    "catch-up: {} ({} documents x {} changes)",
                    load.name, load.docs, load.rounds
                );
                let perf = a.perf_out.as_ref().map(|p| p.with_extension(&load.name));
                let r = catchup::catchup_phase(
                    &client,
                    &cu_db,
                    &event_db,
                    &daemon,
                    load,
                    perf.as_deref(),
                )
                .await?;
                eprintln!("  {r}");
                runs.push(r);
            }
            results.insert("catchup".into(), Value::Array(runs));
        }
        let mut daemon = DaemonProc::start(&bin, config, ops, sync, token)?;
        if run("raw") && run("daemon") {
            eprintln!("phase 1/4: raw change-stream read rate");
            let raw = raw_phase(&db, &a).await?;
            eprintln!("  {raw}");
            eprintln!("phase 2/4: daemon catch-up on the same load");
            let d = daemon_phase(&client, &db, &event_db, &mut daemon, &a).await?;
            eprintln!("  {d}");
            let ratio = d["rate_changes_per_s"].as_f64().unwrap_or(0.0)
                / raw["read_rate_per_s"].as_f64().unwrap_or(1.0);
            results.insert("ratio_daemon_to_raw".into(), json!(round(ratio)));
            results.insert("raw".into(), raw);
            results.insert("daemon".into(), d);
        }
        if run("latency") {
            let mut lat = Vec::new();
            for &rate in &a.rate {
                eprintln!("phase 3/4: paced latency at {rate} writes/s");
                let l = latency_phase(&client, &db, &event_db, &daemon, &a, rate).await?;
                eprintln!("  {l}");
                lat.push(l);
            }
            results.insert("latency".into(), Value::Array(lat));
        }
        if run("fanout") && !a.fanout.is_empty() {
            let mut fan = Vec::new();
            for &n in &a.fanout {
                eprintln!(
                    "live fan-out: {n} subscribers at {} writes/s",
                    a.fanout_rate
                );
                let f = fanout_phase(&client, &db, &event_db, &daemon, &a, n).await?;
                eprintln!("  {f}");
                fan.push(f);
            }
            results.insert("fanout".into(), Value::Array(fan));
        }
        if run("serve") && a.serve_events > 0 {
            eprintln!(
                "catch-up serving: {} events, {} clients",
                a.serve_events, a.serve_clients
            );
            let s = serve_phase(&client, &db, &event_db, &daemon, &a).await?;
            eprintln!("  {s}");
            results.insert("serve".into(), s);
        }
        results.insert("daemon_peak_rss_kib".into(), json!(daemon.memory_kib().0));
        daemon.stop();
        if run("tracking") {
            let mut runs = Vec::new();
            for &docs in a.track_docs.iter().filter(|&&n| n > 0) {
                eprintln!("tracking {docs} documents");
                let tr_db = client.database(&format!("{app_db}_tr"));
                let t = tracking_phase(&client, &tr_db, &bin, &dir, &a, docs).await?;
                eprintln!("  {t}");
                runs.push(t);
            }
            results.insert("tracking".into(), Value::Array(runs));
        }
        if run("streams") {
            let mut runs = Vec::new();
            for &n in a.streams.iter().filter(|&&n| n > 0) {
                eprintln!("catch-up over {n} stream(s), a daemon of its own");
                let load = catchup::Load {
                    name: format!("s{n}"),
                    docs: a.catchup_docs,
                    size: a.doc_size_small,
                    rounds: 1,
                    streams: n,
                };
                let st_db = client.database(&format!("{app_db}_st{n}"));
                let (config, ops, sync, token) = DaemonProc::write_config(
                    &dir,
                    &a.uri,
                    &event_db,
                    &load
                        .collections()
                        .into_iter()
                        .map(|c| (st_db.name().to_owned(), c))
                        .collect::<Vec<_>>(),
                    &a.pipeline,
                    &a.extra_config,
                )?;
                let d = DaemonProc::start(&bin, config, ops, sync, token)?;
                let r = catchup::catchup_phase(&client, &st_db, &event_db, &d, &load, None).await?;
                eprintln!("  {r}");
                runs.push(r);
            }
            results.insert("streams".into(), Value::Array(runs));
        }
        let mut parts = Vec::new();
        for &p in &a.partitions {
            eprintln!("phase 5/5: {p} partition(s) over two replicas");
            let r = partition_phase(&client, &db, &event_db, &bin, &dir, &a, p).await?;
            eprintln!("  {r}");
            parts.push(r);
        }
        results.insert("partitions".into(), Value::Array(parts));
        Ok(())
    }
    .await;
    if !a.keep {
        let mut names = vec![
            app_db.clone(),
            event_db.clone(),
            format!("{app_db}_cu"),
            format!("{app_db}_tr"),
        ];
        names.extend(a.streams.iter().map(|n| format!("{app_db}_st{n}")));
        for name in &names {
            if let Err(e) = client.database(name).drop().await {
                eprintln!("cannot drop {name}: {e}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    outcome?;
    let results = Value::Object(results.into_iter().collect());
    std::fs::write(&a.out, serde_json::to_string_pretty(&results)?)?;
    table(&results);
    println!("\nresults written to {}", a.out.display());
    Ok(())
}
