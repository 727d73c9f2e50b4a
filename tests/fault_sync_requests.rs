//! Malformed and hostile requests on the sync port: bad JSON, negative and absurd
//! numbers, huge vectors and bodies, odd paths, and live subscribers that never read.
//! Each gets a 4xx (or is dropped), memory stays bounded, the daemon stays up, and a
//! well-behaved subscriber still receives every event.

mod common;

use std::time::{Duration, Instant};

use bson::{doc, Document};
use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

const TOKEN: &str = "fault-token-0123456789abcdef";

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_requests_get_4xx_and_slow_subscribers_are_dropped() {
    let started = Instant::now();
    // Small live buffers and a short send timeout (environment overrides of the config).
    std::env::set_var("EVENTSYNC__SYNC__LIVE_SEND_TIMEOUT_MS", "1500");
    std::env::set_var("EVENTSYNC__SYNC__LIVE_BUFFER", "16");
    let client = client().await;
    let (app_db, event_db) = (unique_db("hostile_app"), unique_db("hostile_log"));
    let coll = client.database(&app_db).collection::<Document>("items");
    let stream = format!("{app_db}.items");
    let mut spec = DaemonSpec::new(&event_db, &app_db, "items");
    spec.tokens = vec![TOKEN.into()];
    let mut daemon = Daemon::start(&spec);
    let pid = daemon.child.id();
    let base = daemon.sync_url();
    let http = reqwest::Client::new();
    // The stream is served once the daemon is up.
    wait_for("the sync port", Duration::from_secs(30), || {
        let (http, url) = (http.clone(), format!("{base}/v1/streams/{stream}"));
        async move {
            let r = http.get(url).bearer_auth(TOKEN).send().await.ok()?;
            r.status().is_success().then_some(())
        }
    })
    .await;
    let docs: Vec<Document> = (0..200)
        .map(|i| doc! { "_id": i, "p": "x".repeat(2000), "version": 1_i64 })
        .collect();
    coll.insert_many(docs).await.expect("insert");

    // Malformed bodies.
    let missing = format!("{base}/v1/sync/missing");
    let post_raw = |body: Vec<u8>, ctype: &'static str| {
        let (http, url) = (http.clone(), missing.clone());
        async move {
            http.post(url)
                .bearer_auth(TOKEN)
                .header("content-type", ctype)
                .body(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let vector = |docs: Value| json!({ "vector": { "streams": [ { "stream": stream, "documents": docs } ] } });
    let cases: Vec<(&str, Vec<u8>, &'static str)> = vec![
        ("not json", b"{not json".to_vec(), "application/json"),
        ("empty body", Vec::new(), "application/json"),
        (
            "invalid UTF-8",
            b"{\"client_id\": \"\xff\xfe\"}".to_vec(),
            "application/json",
        ),
        ("deeply nested", deep.into_bytes(), "application/json"),
        ("wrong content type", b"{}".to_vec(), "text/plain"),
        ("array", b"[]".to_vec(), "application/json"),
        (
            "unknown field",
            br#"{"evil": 1}"#.to_vec(),
            "application/json",
        ),
        (
            "negative version",
            vector(json!([{ "key": "1", "version": -5 }]))
                .to_string()
                .into_bytes(),
            "application/json",
        ),
        (
            "huge version",
            vector(json!([{ "key": "1", "version": 1e30 }]))
                .to_string()
                .into_bytes(),
            "application/json",
        ),
        (
            "fractional version",
            vector(json!([{ "key": "1", "version": 1.5 }]))
                .to_string()
                .into_bytes(),
            "application/json",
        ),
        (
            "negative position",
            json!({ "vector": { "streams": [ { "stream": stream, "position": -1 } ] } })
                .to_string()
                .into_bytes(),
            "application/json",
        ),
        (
            "negative limit",
            json!({ "vector": { "streams": [ { "stream": stream } ] }, "limit": -1 })
                .to_string()
                .into_bytes(),
            "application/json",
        ),
        (
            "zero limit",
            json!({ "vector": { "streams": [ { "stream": stream } ] }, "limit": 0 })
                .to_string()
                .into_bytes(),
            "application/json",
        ),
        (
            "id and key",
            vector(json!([{ "key": "1", "id": 1, "version": 1 }]))
                .to_string()
                .into_bytes(),
            "application/json",
        ),
        (
            "unknown stream",
            json!({ "vector": { "streams": [ { "stream": "../../etc/passwd" } ] } })
                .to_string()
                .into_bytes(),
            "application/json",
        ),
        (
            "bad cursor",
            json!({ "vector": { "streams": [ { "stream": stream } ] }, "cursor": "\u{0}\u{1}" })
                .to_string()
                .into_bytes(),
            "application/json",
        ),
    ];
    for (name, body, ctype) in cases {
        let status = post_raw(body, ctype).await;
        assert!((400..500).contains(&status), "{name}: status {status}");
        assert!(
            daemon.running(),
            "daemon died on {name}\n{}",
            daemon.log_text()
        );
    }

    // A huge vector: 300,000 entries (~10 MB) is refused by size, not parsed into memory.
    let rss_before = rss_kib(pid);
    let huge: Vec<Value> = (0..300_000)
        .map(|i| json!({ "key": i.to_string(), "version": i }))
        .collect();
    let status = post_raw(
        vector(Value::Array(huge)).to_string().into_bytes(),
        "application/json",
    )
    .await;
    // 413 — or, when the server refuses by Content-Length before the upload ends, the
    // connection closes under the sender (status 0): refused either way, never parsed.
    assert!(
        status == 0 || (400..500).contains(&status),
        "huge vector: status {status}"
    );
    assert!(daemon.running(), "daemon died on the huge vector");
    // The same as an endless chunked body (no Content-Length): cut off at the limit.
    let chunks = futures_util::stream::iter(
        (0..2000).map(|_| Ok::<_, std::io::Error>(vec![b' '; 64 * 1024])),
    );
    let r = http
        .post(&missing)
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await;
    if let Ok(r) = r {
        assert!(r.status().is_client_error(), "endless body: {}", r.status());
    }
    // Odd paths and parameters.
    for path in [
        format!("/v1/streams/{stream}/live?after=-1"),
        format!("/v1/streams/{stream}/live?after=abc"),
        format!("/v1/streams/{stream}/live?after=99999999999999999999999"),
        format!("/v1/streams/{stream}/documents/{}/state", "9".repeat(5000)),
        "/v1/streams/no.such/live".into(),
        format!("/v1/streams/{}", "a".repeat(60_000)),
    ] {
        let status = http
            .get(format!("{base}{path}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        assert!((400..500).contains(&status), "{path}: status {status}");
    }
    assert!(daemon.running(), "daemon died\n{}", daemon.log_text());

    // Live subscribers that never read: small receive buffers, request sent, then silence.
    let live = format!("/v1/streams/{stream}/live?after=0");
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.set_recv_buffer_size(4096).expect("rcvbuf");
        let mut s = sock
            .connect(format!("127.0.0.1:{}", daemon.sync_port).parse().unwrap())
            .await
            .expect("connect");
        s.write_all(
            format!("GET {live} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("request");
        stalled.push(s);
    }
    // A subscriber that reads.
    let resp = http
        .get(format!("{base}{live}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("live");
    assert_eq!(resp.status().as_u16(), 200);
    let (seen_tx, mut seen_rx) = tokio::sync::watch::channel(0i64);
    let reader = tokio::spawn(async move {
        let mut body = resp.bytes_stream();
        let mut buf = String::new();
        while let Some(Ok(chunk)) = body.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(i) = buf.find('\n') {
                let line: String = buf.drain(..=i).collect();
                if let Some(id) = line.strip_prefix("id:").and_then(|v| v.trim().parse().ok()) {
                    let _ = seen_tx.send(id);
                }
            }
        }
    });
    // A load of ~12 MB of events: far more than the stalled sockets can buffer.
    for round in 0..6 {
        for i in 0..200 {
            coll.update_one(
                doc! { "_id": i },
                doc! { "$set": { "p": format!("{round}{}", "y".repeat(10_000)) }, "$inc": { "version": 1_i64 } },
            )
            .await
            .expect("update");
        }
    }
    let events = wait_converged(&client, &event_db, &coll, Duration::from_secs(60)).await;
    let head = events.len() as i64;
    let t = Instant::now();
    while *seen_rx.borrow_and_update() < head {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the reading subscriber got {} of {head} events while others stalled",
            *seen_rx.borrow()
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), seen_rx.changed()).await;
    }
    // Stalled subscribers are dropped after sync.live_send_timeout_ms: their producers stop.
    let n_stalled = stalled.len();
    wait_for(
        "stalled subscribers dropped",
        Duration::from_secs(20),
        || {
            let n = daemon
                .log_text()
                .matches("dropping a live subscriber that does not read")
                .count();
            async move { (n >= n_stalled).then_some(()) }
        },
    )
    .await;
    // Their slots are freed with their producers, even though the stalled connections
    // linger (hyper cannot finish a response the client does not read): only the reading
    // subscriber still counts.
    wait_for(
        "stalled subscribers' slots freed",
        Duration::from_secs(20),
        || {
            let d = &daemon;
            async move { (metric_sum(d, "eventsync_live_subscribers").await <= 1.0).then_some(()) }
        },
    )
    .await;
    let held = metric_sum(&daemon, "eventsync_live_subscribers").await;
    drop(stalled);
    wait_for("subscriber slots freed", Duration::from_secs(20), || {
        let d = &daemon;
        async move { (metric_sum(d, "eventsync_live_subscribers").await <= 1.0).then_some(()) }
    })
    .await;
    let rss_after = rss_kib(pid);
    assert!(
        rss_after < rss_before + 64 * 1024,
        "memory grew from {rss_before} KiB to {rss_after} KiB"
    );
    let health = reqwest::get(format!("{}/healthz", daemon.ops_url()))
        .await
        .expect("healthz");
    assert!(health.status().is_success());
    assert!(daemon.running());
    println!(
        "hostile requests: {head} events, RSS {rss_before} -> {rss_after} KiB, \
         {held} subscriber slot(s) held after the stalled clients were dropped, {:?}",
        started.elapsed()
    );
    reader.abort();
    daemon.kill9();
}
