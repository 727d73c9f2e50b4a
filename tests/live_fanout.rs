//! Live fan-out end to end: one shared tail per stream feeds every subscriber of a replica.
//! Many subscribers get every event in order, document filters are applied in memory, a
//! subscriber behind the shared buffer still gets everything, and the log is not read per
//! subscriber (`eventsync_log_reads_total`, a count).
//!
//! Run with the test server: `eval "$(scripts/testenv/start.sh)"; cargo test --test live_fanout`.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use bson::{doc, Document};
use common::*;
use eventsync::client::{ClientOptions, SyncCollection};
use eventsync::mongo::events::EventRecord;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;

/// One SSE subscription: `(id, data)` of every item, as they arrive.
struct Sub {
    rx: mpsc::UnboundedReceiver<(i64, Value)>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Subscribes to `path`; with `gate`, the body is not read until the gate opens (a
/// subscriber that stops reading for a while).
async fn subscribe(
    http: &reqwest::Client,
    d: &Daemon,
    path: &str,
    gate: Option<tokio::sync::oneshot::Receiver<()>>,
) -> Sub {
    let resp = http
        .get(format!("{}{path}", d.sync_url()))
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("subscribe");
    assert_eq!(resp.status().as_u16(), 200, "subscribe {path}");
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        if let Some(g) = gate {
            let _ = g.await;
        }
        let mut body = resp.bytes_stream();
        let mut buf = String::new();
        while let Some(Ok(chunk)) = body.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let (mut id, mut data) = (None, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse::<i64>().ok();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
                if let Some(id) = id {
                    let v: Value = serde_json::from_str(&data).expect("SSE data is JSON");
                    if tx.send((id, v)).is_err() {
                        return;
                    }
                }
            }
        }
    });
    Sub { rx, task }
}

impl Sub {
    /// Receives items until one at position `upto` (or later) arrived.
    async fn until(&mut self, upto: i64, what: &str) -> Vec<(i64, Value)> {
        let mut got = Vec::new();
        loop {
            if got.last().is_some_and(|(id, _)| *id >= upto) {
                return got;
            }
            match tokio::time::timeout(Duration::from_secs(30), self.rx.recv()).await {
                Ok(Some(item)) => got.push(item),
                _ => panic!(
                    "{what}: stalled after {:?} (waiting for {upto})",
                    got.last().map(|g| g.0)
                ),
            }
        }
    }

    /// Nothing more arrives for a while.
    async fn quiet(&mut self, what: &str) {
        if let Ok(Some((id, v))) =
            tokio::time::timeout(Duration::from_millis(300), self.rx.recv()).await
        {
            panic!("{what}: unexpected item {id}: {v}");
        }
    }
}

struct Env {
    client: mongodb::Client,
    coll: mongodb::Collection<Document>,
    event_db: String,
    stream: String,
    daemon: Daemon,
    http: reqwest::Client,
}

async fn env(prefix: &str, sync_extra: &str) -> Env {
    let client = client().await;
    let app_db = unique_db(&format!("{prefix}_app"));
    let event_db = unique_db(&format!("{prefix}_log"));
    let coll = client.database(&app_db).collection::<Document>("items");
    let mut spec = DaemonSpec::new(&event_db, &app_db, "items");
    spec.sync_extra = sync_extra.to_owned();
    let daemon = Daemon::start(&spec);
    let stream = format!("{app_db}.items");
    wait_streaming(&client, &event_db, &stream).await;
    Env {
        client,
        coll,
        event_db,
        stream,
        daemon,
        http: reqwest::Client::new(),
    }
}

impl Env {
    fn writer(&self) -> SyncCollection<Document> {
        SyncCollection::new(self.coll.clone(), ClientOptions::new("fanout-test")).expect("client")
    }

    async fn log(&self) -> Vec<EventRecord> {
        read_log(&self.client, &self.event_db, &self.stream).await
    }

    /// Waits until the log holds at least `n` events; returns them.
    async fn log_at_least(&self, n: usize) -> Vec<EventRecord> {
        let start = std::time::Instant::now();
        loop {
            let log = self.log().await;
            if log.len() >= n {
                return log;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "log has {} of {n} events:\n{}",
                log.len(),
                self.daemon.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn total_reads(&self) -> f64 {
        self.reads("tail").await + self.reads("subscriber").await + self.reads("missing").await
    }

    async fn reads(&self, reader: &str) -> f64 {
        metric_sum(
            &self.daemon,
            &format!("eventsync_log_reads_total{{reader=\"{reader}\"}}"),
        )
        .await
    }
}

/// The positions of a run of received items, checked dense from `from`.
fn assert_dense(got: &[(i64, Value)], from: i64, to: i64, what: &str) {
    let ids: Vec<i64> = got.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        ids,
        (from..=to).collect::<Vec<_>>(),
        "{what}: every position once, in order"
    );
    for (id, v) in got {
        assert_eq!(
            v["seq"].as_i64(),
            Some(*id),
            "{what}: SSE id is the item's seq"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_subscribers_get_every_event_in_order() {
    let e = env("fan_many", "").await;
    let w = e.writer();
    for i in 0..20 {
        w.find_one_and_upsert(doc! { "_id": i, "n": 0 })
            .await
            .unwrap();
    }
    let head0 = e.log_at_least(20).await.len() as i64;
    let path = format!("/v1/streams/{}/live?after={head0}", e.stream);
    let mut subs = Vec::new();
    for _ in 0..200 {
        subs.push(subscribe(&e.http, &e.daemon, &path, None).await);
    }
    // Some subscribers from further back (read from the log, then the shared buffer).
    let mut early = Vec::new();
    for after in [0, 7] {
        early.push((
            after,
            subscribe(
                &e.http,
                &e.daemon,
                &format!("/v1/streams/{}/live?after={after}", e.stream),
                None,
            )
            .await,
        ));
    }
    let subscriber_reads = e.reads("subscriber").await;
    // Writes while subscribed: updates, a delete, a re-insert.
    for round in 1..=5 {
        for i in 0..20 {
            w.update_one(i, doc! { "$set": { "n": round } })
                .await
                .unwrap();
        }
    }
    w.delete_one(3, None).await.unwrap();
    w.find_one_and_upsert(doc! { "_id": 3, "n": 99 })
        .await
        .unwrap();
    let coll = e.coll.clone();
    let log = wait_converged(&e.client, &e.event_db, &coll, Duration::from_secs(60)).await;
    let head = log.len() as i64;
    assert!(head > head0 + 20, "the writes made events");
    for (n, s) in subs.iter_mut().enumerate() {
        let got = s.until(head, &format!("subscriber {n}")).await;
        assert_dense(&got, head0 + 1, head, &format!("subscriber {n}"));
        // Exactly the log's events.
        for (id, v) in &got {
            let ev = &log[(*id - 1) as usize];
            assert_eq!(v["kind"], "event");
            assert_eq!(v["key"].as_str(), Some(ev.doc_key.as_str()));
            assert_eq!(v["to_version"].as_i64(), Some(ev.to_version));
        }
        s.quiet(&format!("subscriber {n}")).await;
    }
    for (after, s) in &mut early {
        let got = s.until(head, &format!("subscriber after {after}")).await;
        assert_dense(&got, *after + 1, head, &format!("subscriber after {after}"));
    }
    // The 200 subscribers at the head never read the log themselves.
    assert!(
        subscriber_reads <= 2.0,
        "subscribers at the head read the log: {subscriber_reads}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn document_filtered_subscribers_get_exactly_their_documents() {
    let e = env("fan_filter", "").await;
    let w = e.writer();
    for i in 0..10 {
        w.find_one_and_upsert(doc! { "_id": i, "n": 0 })
            .await
            .unwrap();
    }
    e.log_at_least(10).await;
    // Subscriber k follows documents k and k + 5 (integer ids: `{"$numberInt":"k"}` keys),
    // from position 0: the older events come from the log, the newer from the tail.
    let key = |i: i32| eventsync::mongo::doc_key(&bson::Bson::Int32(i));
    let enc = |s: &str| s.bytes().map(|b| format!("%{b:02X}")).collect::<String>();
    let mut subs = Vec::new();
    for k in 0..5 {
        let path = format!(
            "/v1/streams/{}/live?after=0&doc={}&doc={}",
            e.stream,
            enc(&key(k)),
            enc(&key(k + 5))
        );
        subs.push((k, subscribe(&e.http, &e.daemon, &path, None).await));
    }
    for round in 1..=4 {
        for i in 0..10 {
            w.update_one(i, doc! { "$set": { "n": round } })
                .await
                .unwrap();
        }
    }
    let coll = e.coll.clone();
    let log = wait_converged(&e.client, &e.event_db, &coll, Duration::from_secs(60)).await;
    for (k, s) in &mut subs {
        let mine: BTreeSet<String> = [key(*k), key(*k + 5)].into();
        let want: Vec<i64> = log
            .iter()
            .filter(|ev| mine.contains(&ev.doc_key))
            .map(|ev| ev.seq)
            .collect();
        let last = *want.last().expect("events of the documents");
        let got = s.until(last, &format!("filtered subscriber {k}")).await;
        let ids: Vec<i64> = got.iter().map(|(id, _)| *id).collect();
        assert_eq!(
            ids, want,
            "subscriber {k}: exactly its documents' events, in order"
        );
        for (_, v) in &got {
            assert!(mine.contains(v["key"].as_str().unwrap()), "{v}");
        }
        s.quiet(&format!("filtered subscriber {k}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscriber_behind_the_shared_buffer_still_gets_every_event() {
    // A buffer of 5 items, 4 items per subscriber channel.
    let e = env(
        "fan_behind",
        "tail_buffer = 5\nlive_buffer = 4\nlive_send_timeout_ms = 20000",
    )
    .await;
    let w = e.writer();
    for i in 0..30 {
        w.find_one_and_upsert(doc! { "_id": i, "n": 0 })
            .await
            .unwrap();
    }
    e.log_at_least(30).await;
    let path = format!("/v1/streams/{}/live?after=0", e.stream);
    // One reads along; one does not read its body until the buffer has moved far past it.
    let mut along = subscribe(&e.http, &e.daemon, &path, None).await;
    let (open, gate) = tokio::sync::oneshot::channel();
    let mut paused = subscribe(&e.http, &e.daemon, &path, Some(gate)).await;
    let reads0 = e.reads("subscriber").await;
    for round in 1..=3 {
        for i in 0..30 {
            w.update_one(i, doc! { "$set": { "n": round } })
                .await
                .unwrap();
        }
    }
    let coll = e.coll.clone();
    let log = wait_converged(&e.client, &e.event_db, &coll, Duration::from_secs(60)).await;
    let head = log.len() as i64;
    assert!(head >= 60);
    let got = along.until(head, "reading subscriber").await;
    assert_dense(&got, 1, head, "reading subscriber");
    let _ = open.send(());
    let got = paused.until(head, "paused subscriber").await;
    assert_dense(&got, 1, head, "paused subscriber");
    paused.quiet("paused subscriber").await;
    // It caught up by reading the log itself.
    assert!(
        e.reads("subscriber").await > reads0,
        "the paused subscriber must have read the log by position"
    );
    // A new subscriber from far back (behind the 5-item buffer) gets everything too.
    let mut late = subscribe(&e.http, &e.daemon, &path, None).await;
    let got = late.until(head, "late subscriber").await;
    assert_dense(&got, 1, head, "late subscriber");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn log_reads_do_not_grow_with_the_number_of_subscribers() {
    // No timed polls within the test: the only reads are those the writes cause.
    let e = env("fan_reads", "tail_poll_ms = 60000").await;
    let w = e.writer();
    for i in 0..10 {
        w.find_one_and_upsert(doc! { "_id": i, "n": 0 })
            .await
            .unwrap();
    }
    let mut head = e.log_at_least(10).await.len() as i64;
    let mut reads_per_run = Vec::new();
    for (run, n) in [(1, 1usize), (2, 50)] {
        let path = format!("/v1/streams/{}/live?after={head}", e.stream);
        let mut subs = Vec::new();
        for _ in 0..n {
            subs.push(subscribe(&e.http, &e.daemon, &path, None).await);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = e.total_reads().await;
        // The same writes each run, one at a time: each is delivered before the next.
        for i in 0..10 {
            w.update_one(i, doc! { "$set": { "run": run } })
                .await
                .unwrap();
            head += 1;
            for (k, s) in subs.iter_mut().enumerate() {
                let got = s.until(head, &format!("run {run} subscriber {k}")).await;
                assert_eq!(got.last().map(|g| g.0), Some(head));
            }
        }
        assert_eq!(e.log().await.len() as i64, head, "one event per write");
        let reads = e.total_reads().await - before;
        println!("run {run}: {n} subscribers, {reads} log reads for 10 events");
        reads_per_run.push(reads);
    }
    let (one, fifty) = (reads_per_run[0], reads_per_run[1]);
    assert!(
        fifty <= one + 3.0,
        "log reads for 10 events: {one} with 1 subscriber, {fifty} with 50 — they must not grow with subscribers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_pages_through_a_large_gap_from_the_log_and_the_tail() {
    // The tail's buffer holds the newest 1,500: the first pages come from the log.
    let e = env("fan_missing", "tail_buffer = 1500").await;
    let n = 3500usize;
    let docs: Vec<Document> = (0..n as i64)
        .map(|i| doc! { "_id": i, "n": 0, "version": 1_i64, "_origin": "bulk" })
        .collect();
    for chunk in docs.chunks(1000) {
        e.coll.insert_many(chunk.to_vec()).await.unwrap();
    }
    let log = e.log_at_least(n).await;
    for pass in 0..2 {
        let mut cursor: Option<String> = None;
        let mut ids = Vec::new();
        loop {
            let mut body = serde_json::json!({
                "vector": { "streams": [ { "stream": e.stream, "position": 0 } ] },
                "limit": 1000,
            });
            if let Some(c) = &cursor {
                body["cursor"] = serde_json::json!(c);
            }
            let resp = e
                .http
                .post(format!("{}/v1/sync/missing", e.daemon.sync_url()))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 200);
            let page: Value = resp.json().await.unwrap();
            for item in page["items"].as_array().unwrap() {
                let seq = item["seq"].as_i64().unwrap();
                let ev = &log[(seq - 1) as usize];
                assert_eq!(item["key"].as_str(), Some(ev.doc_key.as_str()));
                ids.push(seq);
            }
            if page["has_more"] != true {
                assert_eq!(page["positions"][&e.stream].as_i64(), Some(n as i64));
                break;
            }
            cursor = Some(page["next_cursor"].as_str().unwrap().to_owned());
        }
        assert_eq!(
            ids,
            (1..=n as i64).collect::<Vec<_>>(),
            "pass {pass}: every event once, in order"
        );
    }
}
