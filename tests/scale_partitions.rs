//! A partitioned stream end to end: one collection declared with `partitions = 4`,
//! consumed by two `eventsyncd` processes under a write load. Each partition is a stream
//! of its own (`db.coll#p/4`): two each, four on the survivor after a `kill -9`, two each
//! again after the restart; every partition's log is dense and its chains
//! gap-free; the partitions hold disjoint documents whose union replays to exactly the
//! collection; and reading every partition from a mid position vector onwards gives each
//! remaining event exactly once.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bson::{doc, Document};
use common::*;

const P: u32 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_partitions_over_two_replicas_replay_exactly() {
    let client = client().await;
    let event_db = unique_db("part_ev");
    let db = unique_db("part_src");
    let coll = client.database(&db).collection::<Document>("hot");
    coll.insert_one(doc! { "_id": -1, "seed": true })
        .await
        .expect("seed");

    let spec = |holder: &str| {
        let mut s = DaemonSpec::new(&event_db, &db, "hot");
        s.streams = vec![];
        s.extra =
            format!("[[streams]]\ndatabase = \"{db}\"\ncollection = \"hot\"\npartitions = {P}\n");
        s.lease_ttl_ms = 4_000;
        s.lease_renew_ms = 500;
        s.holder = holder.to_owned();
        s
    };
    let a = Daemon::start(&spec("part-a"));
    let mut b = Daemon::start(&spec("part-b"));

    // A write load throughout: balance, kill -9 of one replica, its return.
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..3)
        .map(|w| {
            let (coll, stop) = (coll.clone(), stop.clone());
            tokio::spawn(async move {
                let mut round = 0;
                while !stop.load(Ordering::Relaxed) {
                    mixed_load(coll.clone(), w * 1000 + round, 10, 40).await;
                    round += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        })
        .collect();
    let spread = |pairs: &[(&str, usize)]| -> BTreeMap<String, usize> {
        pairs.iter().map(|(h, n)| (h.to_string(), *n)).collect()
    };
    let wait_spread = |want: BTreeMap<String, usize>, timeout: Duration| {
        let (client, event_db) = (client.clone(), event_db.clone());
        async move {
            wait_for(&format!("leases spread as {want:?}"), timeout, || {
                let (client, event_db, want) = (client.clone(), event_db.clone(), want.clone());
                async move { (live_leases_by_holder(&client, &event_db).await == want).then_some(()) }
            })
            .await
        }
    };
    wait_spread(
        spread(&[("part-a", 2), ("part-b", 2)]),
        Duration::from_secs(60),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.kill9();
    wait_spread(
        spread(&[("part-a", 4)]),
        Duration::from_millis(4_000 + 5_000),
    )
    .await;
    b = Daemon::start(&spec("part-b"));
    wait_spread(
        spread(&[("part-a", 2), ("part-b", 2)]),
        Duration::from_secs(60),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.expect("load");
    }

    let streams: Vec<String> = (0..P).map(|p| format!("{db}.hot#{p}/{P}")).collect();
    let actual = read_collection(&coll).await;
    let mut logs: Vec<Vec<eventsync::mongo::events::EventRecord>> = Vec::new();
    let start = std::time::Instant::now();
    loop {
        logs.clear();
        let mut union: BTreeMap<String, Document> = BTreeMap::new();
        let mut overlap = Vec::new();
        for s in &streams {
            let events = read_log(&client, &event_db, s).await;
            // Dense positions from 1 and gap-free chains, per partition.
            for (k, d) in replay(&events) {
                if union.insert(k.clone(), d).is_some() {
                    overlap.push(k);
                }
            }
            logs.push(events);
        }
        assert!(
            overlap.is_empty(),
            "documents in two partitions: {overlap:?}"
        );
        let same = union.len() == actual.len()
            && actual
                .iter()
                .all(|(k, d)| union.get(k).is_some_and(|r| bytes(r) == bytes(d)));
        if same {
            break;
        }
        if start.elapsed() > Duration::from_secs(90) {
            assert_replay_matches(&union, &actual);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let counts: Vec<usize> = logs.iter().map(Vec::len).collect();
    eprintln!("events per partition: {counts:?}");
    assert!(
        counts.iter().filter(|c| **c > 0).count() >= 3,
        "documents spread over the partitions: {counts:?}"
    );
    // A document's events all live in one partition.
    let mut home: BTreeMap<&str, usize> = BTreeMap::new();
    for (p, events) in logs.iter().enumerate() {
        for e in events {
            assert_eq!(*home.entry(e.doc_key.as_str()).or_insert(p), p, "{e:?}");
        }
    }

    // The merged position is the vector of partition positions: resuming every partition
    // after a mid vector gives each remaining event once, none missing.
    let mid: Vec<i64> = logs.iter().map(|l| (l.len() / 2) as i64).collect();
    for (p, s) in streams.iter().enumerate() {
        let store = eventsync::mongo::Store::new(client.clone(), &event_db);
        let rest = eventsync::pipeline::store::LogStore::events_after(&store, s, mid[p], 100_000)
            .await
            .expect("events after");
        let seqs: Vec<i64> = rest.iter().map(|e| e.seq).collect();
        let want: Vec<i64> = ((mid[p] + 1)..=(logs[p].len() as i64)).collect();
        assert_eq!(seqs, want, "partition {p} resumes after {}", mid[p]);
    }

    // The same through the sync API: the partitions are listed, and one state vector
    // holding the mid positions of all four gets exactly the rest, page by page, and the
    // final position vector is every partition's head.
    let http = reqwest::Client::new();
    let listed: serde_json::Value = http
        .get(format!("{}/v1/streams", a.sync_url()))
        .send()
        .await
        .expect("list streams")
        .json()
        .await
        .expect("stream list");
    for s in &streams {
        assert!(
            listed.to_string().contains(s.as_str()),
            "{s} listed: {listed}"
        );
    }
    let vector: Vec<serde_json::Value> = streams
        .iter()
        .zip(&mid)
        .map(|(s, m)| serde_json::json!({ "stream": s, "position": m }))
        .collect();
    let mut got: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut cursor: Option<String> = None;
    let positions = loop {
        let page: serde_json::Value = http
            .post(format!("{}/v1/sync/missing", b.sync_url()))
            .json(&serde_json::json!({ "vector": { "streams": vector }, "cursor": cursor, "limit": 50 }))
            .send()
            .await
            .expect("missing")
            .json()
            .await
            .expect("missing page");
        for item in page["items"].as_array().expect("items") {
            assert_eq!(item["kind"], "event", "no compaction here: {item}");
            let stream = item["stream"].as_str().expect("stream").to_owned();
            got.entry(stream)
                .or_default()
                .push(item["seq"].as_i64().expect("seq"));
        }
        if page["has_more"] == false {
            break page["positions"].clone();
        }
        cursor = page["next_cursor"].as_str().map(str::to_owned);
        assert!(cursor.is_some(), "has_more without a cursor: {page}");
    };
    for (p, s) in streams.iter().enumerate() {
        let want: Vec<i64> = ((mid[p] + 1)..=(logs[p].len() as i64)).collect();
        assert_eq!(
            got.get(s).cloned().unwrap_or_default(),
            want,
            "partition {s} through the sync API"
        );
        assert_eq!(positions[s.as_str()], logs[p].len() as i64, "{positions}");
    }
    drop((a, b));
}
