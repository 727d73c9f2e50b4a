//! Phase `catchup`: one backlog per load, read three ways in the same run.
//!
//! For each load the documents exist first (the daemon has their insert events), the
//! daemon's streams are paused (operator control: no change stream open), and the backlog
//! is written with `update_many` rounds — every document changed once per round, so a
//! load of one round has every change its own event (nothing `updateLookup` can coalesce).
//! Then, from the same resume token:
//!
//! * **raw** — a bare driver loop reads the backlog (`fullDocument: updateLookup`);
//! * **persisting baseline** — a bare driver loop reads it and persists each change as it
//!   came (its bytes, as one binary field) — one ordered `insert_many` per batch plus one
//!   checkpoint `update_one` (upsert): the floor of any design that keeps its log in the
//!   same server;
//! * **daemon** — the streams are resumed and the daemon catches up.
//!
//! Each reports changes/s, events/s, the client's CPU per event (the daemon's from
//! `/proc/PID/stat`, the baseline's from this process), and the server's operations, wire
//! bytes in/out and CPU per event (`serverStatus` `opcounters`, `network`, `extra_info`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bson::{doc, Bson, Document, RawDocumentBuf};
use futures_util::StreamExt;
use mongodb::options::FullDocumentType;
use serde_json::{json, Value};

use super::{http_get, http_post, payload, process_cpu_secs, round, wait_streaming, DaemonProc};
use super::{Result, BATCH};

/// One kind of backlog.
#[derive(Debug, Clone)]
pub struct Load {
    /// Its name (the collections are `cu_{name}_{i}`).
    pub name: String,
    /// Documents, over all streams.
    pub docs: usize,
    /// Payload bytes per document.
    pub size: usize,
    /// `update_many` rounds: changes per document.
    pub rounds: usize,
    /// Streams (collections) the documents are spread over.
    pub streams: usize,
}

impl Load {
    /// The collections of this load.
    pub fn collections(&self) -> Vec<String> {
        (0..self.streams)
            .map(|i| format!("cu_{}_{i}", self.name))
            .collect()
    }

    fn changes(&self) -> u64 {
        (self.docs / self.streams * self.streams * self.rounds) as u64
    }
}

/// What the server did between two `serverStatus` readings.
#[derive(Debug, Default, Clone, Copy)]
pub struct ServerCounters {
    /// Operations (`opcounters`, all kinds).
    pub ops: i64,
    /// Wire bytes received (`network.bytesIn`).
    pub bytes_in: i64,
    /// Wire bytes sent (`network.bytesOut`).
    pub bytes_out: i64,
    /// Server CPU, µs (`extra_info` user + system; 0 where not reported).
    pub cpu_us: i64,
}

fn int(d: &Document, path: &[&str]) -> i64 {
    let mut cur = d;
    for (i, key) in path.iter().enumerate() {
        match cur.get(*key) {
            Some(Bson::Document(inner)) if i + 1 < path.len() => cur = inner,
            Some(Bson::Int32(n)) => return i64::from(*n),
            Some(Bson::Int64(n)) => return *n,
            Some(Bson::Double(n)) => return *n as i64,
            _ => return 0,
        }
    }
    0
}

impl ServerCounters {
    /// The server's counters now (`None` when it has no `serverStatus`).
    pub async fn read(client: &mongodb::Client) -> Option<Self> {
        let s = client
            .database("admin")
            .run_command(doc! { "serverStatus": 1 })
            .await
            .ok()?;
        let ops = s
            .get_document("opcounters")
            .ok()?
            .keys()
            .map(|k| int(&s, &["opcounters", k]))
            .sum();
        Some(Self {
            ops,
            bytes_in: int(&s, &["network", "bytesIn"]),
            bytes_out: int(&s, &["network", "bytesOut"]),
            cpu_us: int(&s, &["extra_info", "user_time_us"])
                + int(&s, &["extra_info", "system_time_us"]),
        })
    }

    /// `self − before`.
    pub fn since(self, before: Self) -> Self {
        Self {
            ops: self.ops - before.ops,
            bytes_in: self.bytes_in - before.bytes_in,
            bytes_out: self.bytes_out - before.bytes_out,
            cpu_us: self.cpu_us - before.cpu_us,
        }
    }

    /// The counters per event, as JSON.
    pub fn per_event(self, events: u64) -> Value {
        let n = events.max(1) as f64;
        json!({
            "server_ops": self.ops,
            "server_ops_per_event": round(self.ops as f64 / n),
            "bytes_in_per_event": round(self.bytes_in as f64 / n),
            "bytes_out_per_event": round(self.bytes_out as f64 / n),
            "server_cpu_us_per_event": round(self.cpu_us as f64 / n),
        })
    }
}

/// Reads the counters around `work`; `Null` where the server reports none.
async fn measured<T>(
    client: &mongodb::Client,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<(T, Option<ServerCounters>)> {
    let before = ServerCounters::read(client).await;
    let out = work.await?;
    let after = ServerCounters::read(client).await;
    Ok((out, before.zip(after).map(|(b, a)| a.since(b))))
}

fn merge(mut v: Value, server: Option<ServerCounters>, events: u64) -> Value {
    if let (Some(obj), Some(s)) = (v.as_object_mut(), server) {
        if let Some(extra) = s.per_event(events).as_object() {
            obj.extend(extra.clone());
        }
    }
    v
}

/// Inserts the load's documents into `coll` (stamped as the thin client would: version 1).
async fn seed(coll: &mongodb::Collection<Document>, load: &Load, docs: usize) -> Result<()> {
    let per_batch = (4 * 1024 * 1024 / load.size.max(64)).clamp(1, 1000);
    let mut batch = Vec::with_capacity(per_batch);
    for i in 0..docs {
        batch.push(doc! {
            "_id": i as i64, "kind": "bench", "n": 0_i32, "tags": ["a", "b"],
            "payload": payload(load.size, i), "version": 1_i64, "_origin": "bench-catchup",
        });
        if batch.len() == per_batch || i + 1 == docs {
            coll.insert_many(std::mem::take(&mut batch)).await?;
        }
    }
    Ok(())
}

/// The `seq` of a stream's checkpoint (0 when it has none).
async fn checkpoint_seq(client: &mongodb::Client, event_db: &str, stream: &str) -> Result<i64> {
    let cp = client
        .database(event_db)
        .collection::<Document>("checkpoints")
        .find_one(doc! { "_id": stream })
        .await?;
    Ok(cp.map_or(0, |d| int(&d, &["seq"])))
}

async fn wait_seq(
    client: &mongodb::Client,
    event_db: &str,
    stream: &str,
    target: i64,
    daemon: &DaemonProc,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while checkpoint_seq(client, event_db, stream).await? < target {
        if Instant::now() > deadline {
            return Err(format!(
                "{stream}: the daemon did not reach seq {target}:\n{}",
                daemon.log_tail()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Pauses or resumes `stream` and waits until its status says so.
async fn control(daemon: &DaemonProc, stream: &str, action: &str) -> Result<()> {
    let (status, body) = http_post(
        daemon.sync_port,
        &format!("/v1/admin/streams/{stream}/{action}"),
        &daemon.token,
        b"",
    )
    .await?;
    if !(200..300).contains(&status) {
        return Err(format!(
            "{action} {stream}: HTTP {status}: {}",
            String::from_utf8_lossy(&body)
        )
        .into());
    }
    let want = action == "pause";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = http_get(
            daemon.sync_port,
            &format!("/v1/admin/streams/{stream}"),
            Some(&daemon.token),
        )
        .await?;
        let paused = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["paused"].as_bool());
        if paused == Some(want) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{action} {stream}: status still {text}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

type Reader = mongodb::change_stream::ChangeStream<RawDocumentBuf>;

/// A change stream of `coll` (`updateLookup`, batches of [`BATCH`]), opened now: it reads
/// what is written after this call.
pub async fn open_reader(coll: &mongodb::Collection<Document>) -> Result<Reader> {
    let mut stream = coll
        .watch()
        .full_document(FullDocumentType::UpdateLookup)
        .batch_size(BATCH)
        .await?
        .with_type::<RawDocumentBuf>();
    // Established on the server before anything is written (the first getMore).
    let _ = stream.next_if_any().await?;
    Ok(stream)
}

/// The raw read: `changes` changes; (seconds, bytes).
pub async fn raw_read(mut stream: Reader, changes: u64) -> Result<(f64, u64)> {
    let start = Instant::now();
    let (mut read, mut bytes) = (0u64, 0u64);
    while read < changes {
        match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
            Ok(Some(ev)) => {
                bytes += ev?.as_bytes().len() as u64;
                read += 1;
            }
            _ => return Err(format!("raw read stopped after {read} of {changes}").into()),
        }
    }
    Ok((start.elapsed().as_secs_f64(), bytes))
}

/// The persisting baseline: reads `changes` changes from `token` and persists each batch
/// as it came (one ordered `insert_many` + one checkpoint upsert per batch); seconds.
async fn persisting_baseline(
    db: &mongodb::Database,
    coll: &mongodb::Collection<Document>,
    mut stream: Reader,
    changes: u64,
) -> Result<f64> {
    let log = db.collection::<Document>(&format!("{}_baseline", coll.name()));
    let checkpoints = db.collection::<Document>("baseline_checkpoints");
    let start = Instant::now();
    let mut read = 0u64;
    let mut batch = Vec::with_capacity(BATCH as usize);
    while read < changes {
        // A batch is what the server handed over in one reply (the driver's buffer).
        match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
            Ok(Some(ev)) => {
                // As it came: the change's bytes, untouched (nx-27017 cannot store the
                // change's BSON Timestamp field, and a copy is all a log needs).
                let ev = ev?;
                batch.push(doc! { "change": bson::Binary {
                    subtype: bson::spec::BinarySubtype::Generic,
                    bytes: ev.into_bytes(),
                } });
                read += 1;
            }
            _ => return Err(format!("baseline stopped after {read} of {changes}").into()),
        }
        if batch.len() == BATCH as usize || read == changes {
            log.insert_many(std::mem::take(&mut batch)).await?;
            let token = stream
                .resume_token()
                .ok_or("no resume token after a batch")?;
            checkpoints
                .update_one(
                    doc! { "_id": coll.name() },
                    doc! { "$set": { "token": bson::to_bson(&token)? } },
                )
                .upsert(true)
                .await?;
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

/// From the first event appended after `seq0` (per stream) to the last checkpoint write, by
/// the daemon's own clock, seconds (one batch's preparation before the first append is not
/// counted).
async fn busy_secs(
    client: &mongodb::Client,
    event_db: &str,
    streams: &[String],
    seq0: &[i64],
) -> Result<f64> {
    let db = client.database(event_db);
    let (mut first, mut last) = (i64::MAX, i64::MIN);
    for (stream, seq) in streams.iter().zip(seq0) {
        if let Some(ev) = db
            .collection::<Document>("events")
            .find_one(doc! { "stream": stream, "seq": seq + 1 })
            .await?
        {
            first = first.min(millis(ev.get("appended_at")).ok_or("event without appended_at")?);
        }
        if let Some(cp) = db
            .collection::<Document>("checkpoints")
            .find_one(doc! { "_id": stream })
            .await?
        {
            last = last.max(millis(cp.get("updated_at")).ok_or("checkpoint without updated_at")?);
        }
    }
    if first > last {
        return Err(format!("{streams:?}: no event appended after the pause").into());
    }
    Ok(((last - first) as f64 / 1000.0).max(1e-3))
}

/// A date's milliseconds; also from the text nx-27017 keeps of a date set by `$set`
/// (`2026-11-29 03:36:07.654000`, UTC).
fn millis(value: Option<&Bson>) -> Option<i64> {
    match value? {
        Bson::DateTime(d) => Some(d.timestamp_millis()),
        Bson::String(text) => {
            bson::DateTime::parse_rfc3339_str(format!("{}Z", text.replacen(' ', "T", 1)))
                .ok()
                .map(|d| d.timestamp_millis())
        }
        _ => None,
    }
}

/// Events of `streams` in the log.
async fn events_of(client: &mongodb::Client, event_db: &str, streams: &[String]) -> Result<u64> {
    Ok(client
        .database(event_db)
        .collection::<Document>("events")
        .count_documents(doc! { "stream": { "$in": streams } })
        .await?)
}

/// Runs one load against the running `daemon` (whose configuration lists the load's
/// collections).
pub async fn catchup_phase(
    client: &mongodb::Client,
    db: &mongodb::Database,
    event_db: &str,
    daemon: &DaemonProc,
    load: &Load,
    perf_out: Option<&Path>,
) -> Result<Value> {
    let names = load.collections();
    let streams: Vec<String> = names.iter().map(|c| format!("{}.{c}", db.name())).collect();
    let per_stream = load.docs / load.streams;
    for (name, stream) in names.iter().zip(&streams) {
        wait_streaming(client, event_db, stream, daemon).await?;
        seed(&db.collection(name), load, per_stream).await?;
    }
    for stream in &streams {
        wait_seq(client, event_db, stream, per_stream as i64, daemon).await?;
        control(daemon, stream, "pause").await?;
    }
    // The bare loops' streams, open before the backlog (only for one stream). A server
    // keeps history for open streams only (nx-27017 prunes it behind the slowest open
    // one, as a small oplog would): one idle stream per collection pins the backlog for
    // the daemon, whose streams are closed while paused, until it has read it.
    let mut pins = Vec::new();
    for name in &names {
        pins.push(open_reader(&db.collection(name)).await?);
    }
    let first = db.collection::<Document>(&names[0]);
    let readers = if load.streams == 1 {
        Some((open_reader(&first).await?, open_reader(&first).await?))
    } else {
        None
    };

    let changes = load.changes();
    let write_start = Instant::now();
    for round in 0..load.rounds {
        for name in &names {
            db.collection::<Document>(name)
                .update_many(
                    doc! {},
                    doc! { "$set": { "n": (round + 1) as i32, "note": format!("round {round}") },
                    "$inc": { "version": 1_i64 } },
                )
                .await?;
        }
    }
    let write_secs = write_start.elapsed().as_secs_f64();
    let mut out = json!({
        "load": load.name, "documents": load.docs, "doc_bytes": load.size,
        "changes_per_document": load.rounds, "streams": load.streams, "changes": changes,
        "backlog_write_secs": round(write_secs),
    });

    if let Some((raw_reader, base_reader)) = readers {
        let per_stream_changes = changes;
        let ((secs, bytes), server) =
            measured(client, raw_read(raw_reader, per_stream_changes)).await?;
        out["raw"] = merge(
            json!({
                "secs": round(secs),
                "changes_per_s": round(per_stream_changes as f64 / secs),
                "mib_per_s": round(bytes as f64 / secs / 1048576.0),
                "change_bytes": bytes / per_stream_changes.max(1),
            }),
            server,
            per_stream_changes,
        );
        let cpu0 = process_cpu_secs(std::process::id());
        let (secs, server) = measured(
            client,
            persisting_baseline(db, &first, base_reader, per_stream_changes),
        )
        .await?;
        let cpu = process_cpu_secs(std::process::id()) - cpu0;
        out["baseline"] = merge(
            json!({
                "secs": round(secs),
                "changes_per_s": round(per_stream_changes as f64 / secs),
                "mib_per_s": round(bytes as f64 / secs / 1048576.0),
                "client_cpu_secs": round(cpu),
                "changes_per_cpu_sec": round(per_stream_changes as f64 / cpu.max(1e-3)),
            }),
            server,
            per_stream_changes,
        );
    }

    // The daemon: resume every stream, wait until their checkpoints hold every change.
    let events0 = events_of(client, event_db, &streams).await?;
    let mut seq0 = Vec::new();
    for stream in &streams {
        seq0.push(checkpoint_seq(client, event_db, stream).await?);
    }
    let done0 = done_changes(daemon, &streams).await;
    let cpu0 = daemon.cpu_secs();
    let before = ServerCounters::read(client).await;
    let profiler = match perf_out {
        Some(path) => Some(Profiler::start(daemon.pid(), path)?),
        None => None,
    };
    let resumed = Instant::now();
    for stream in &streams {
        control(daemon, stream, "resume").await?;
    }
    // Polled slowly: rendering `/metrics` costs the daemon CPU (at 40 polls/s, a tenth of
    // what it spent catching up). The busy time comes from the daemon's own timestamps.
    loop {
        let done = done_changes(daemon, &streams).await - done0;
        if done >= changes {
            break;
        }
        if resumed.elapsed() > Duration::from_secs(900) {
            return Err(format!(
                "daemon finished {done} of {changes} changes:\n{}",
                daemon.log_tail()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let end = Instant::now();
    if let Some(p) = profiler {
        p.stop();
    }
    drop(pins);
    let cpu = daemon.cpu_secs() - cpu0;
    let after = ServerCounters::read(client).await;
    let busy = busy_secs(client, event_db, &streams, &seq0).await?;
    let events = events_of(client, event_db, &streams).await? - events0;
    let (hwm, rss) = daemon.memory_kib();
    out["daemon"] = merge(
        json!({
            "secs": round(busy),
            "secs_incl_resume": round(end.duration_since(resumed).as_secs_f64()),
            "changes_per_s": round(changes as f64 / busy),
            "events": events,
            "events_per_s": round(events as f64 / busy),
            "mib_per_s": out["raw"]["change_bytes"].as_u64().map(|b| round((b * changes) as f64 / busy / 1048576.0)),
            "cpu_secs": round(cpu),
            "events_per_cpu_sec": round(events as f64 / cpu.max(1e-3)),
            "changes_per_cpu_sec": round(changes as f64 / cpu.max(1e-3)),
            "rss_kib": rss,
            "hwm_kib": hwm,
        }),
        before.zip(after).map(|(b, a)| a.since(b)),
        events,
    );
    if load.streams == 1 {
        let rate = |k: &str| out[k]["changes_per_s"].as_f64().unwrap_or(0.0);
        let (d, raw, base) = (rate("daemon"), rate("raw"), rate("baseline"));
        out["ratio_daemon_to_raw"] = json!(round(d / raw.max(1e-9)));
        out["ratio_daemon_to_baseline"] = json!(round(d / base.max(1e-9)));
    }
    Ok(out)
}

/// Change events the daemon has finished with over `streams`.
async fn done_changes(daemon: &DaemonProc, streams: &[String]) -> u64 {
    let mut total = 0;
    let text = daemon.metrics().await;
    for s in streams {
        total += super::done_in(&text, s);
    }
    total
}

/// `perf record` of one process, until [`Profiler::stop`].
struct Profiler(Child);

impl Profiler {
    fn start(pid: u32, out: &Path) -> Result<Self> {
        let child = Command::new("perf")
            .args(["record", "-F", "999", "--call-graph", "dwarf,16384", "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run perf (install linux-perf): {e}"))?;
        // perf attaches before the work starts.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Self(child))
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(self.0.id().to_string())
            .status();
        let _ = self.0.wait();
    }
}
