//! The log's exactness end to end, against the real test server, in the shapes a user
//! runs: two replicas over a long initial sync, a holder paused past its lease under load,
//! a document re-created while history was lost, compaction over a log whose oldest
//! window has nothing to compact. (The same guarantees are proven step by step on the
//! in-memory store in `tests/log_exactness.rs`.)

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bson::{doc, Bson, Document};
use common::*;
use futures_util::StreamExt;

async fn lease_epoch(client: &mongodb::Client, event_db: &str, stream: &str) -> Option<i64> {
    client
        .database(event_db)
        .collection::<Document>("leases")
        .find_one(doc! { "_id": stream })
        .await
        .ok()
        .flatten()
        .and_then(|l| eventsync::mongo::get_int(&l, "epoch"))
}

async fn lease_holder(client: &mongodb::Client, event_db: &str, stream: &str) -> Option<String> {
    let now = bson::DateTime::now().timestamp_millis();
    client
        .database(event_db)
        .collection::<Document>("leases")
        .find_one(doc! { "_id": stream, "expires_at_ms": { "$gt": now } })
        .await
        .ok()
        .flatten()
        .and_then(|l| l.get_str("holder").ok().map(str::to_owned))
}

async fn get_json(url: &str) -> serde_json::Value {
    reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}

/// Every shadow is at its document's last log version: none went backwards.
async fn assert_shadows_at_log_end(
    client: &mongodb::Client,
    event_db: &str,
    stream: &str,
    events: &[eventsync::mongo::events::EventRecord],
) {
    let mut last: HashMap<&str, i64> = HashMap::new();
    for e in events {
        last.insert(e.doc_key.as_str(), e.to_version);
    }
    let mut cursor = client
        .database(event_db)
        .collection::<Document>("shadows")
        .find(doc! { "stream": stream })
        .await
        .expect("shadows");
    let mut n = 0;
    while let Some(s) = cursor.next().await {
        let s = s.expect("shadow");
        let key = s.get_str("doc_key").expect("doc_key");
        let version = eventsync::mongo::get_int(&s, "version").expect("version");
        assert_eq!(
            Some(&version),
            last.get(key),
            "shadow of {key} is not at the log's last version"
        );
        n += 1;
    }
    assert_eq!(n, last.len(), "one shadow per document of the log");
}

/// 30,000 documents, two replicas, a 2 s lease: the initial sync runs once, under one
/// lease epoch — the holder renews its lease while it re-reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_run_one_long_initial_sync_once() {
    let client = client().await;
    let (app_db, event_db) = (unique_db("long_app"), unique_db("long_log"));
    let coll = client.database(&app_db).collection::<Document>("items");
    let docs = 30_000;
    for chunk in 0..docs / 1000 {
        let batch: Vec<Document> = (0..1000)
            .map(|i| {
                let n = chunk * 1000 + i;
                doc! { "_id": n, "name": format!("item {n}"), "hp": n as i64, "version": 1_i64 }
            })
            .collect();
        coll.insert_many(batch).await.expect("insert");
    }
    let mut spec_a = DaemonSpec::new(&event_db, &app_db, "items");
    spec_a.lease_ttl_ms = 2000;
    spec_a.lease_renew_ms = 500;
    spec_a.holder = "replica-a".into();
    let mut spec_b = spec_a.clone();
    spec_b.holder = "replica-b".into();
    let a = Daemon::start(&spec_a);
    let b = Daemon::start(&spec_b);
    let stream = format!("{app_db}.items");
    let events = wait_converged(&client, &event_db, &coll, Duration::from_secs(240)).await;
    assert_eq!(events.len(), docs as usize, "one insert event per document");
    let resyncs = metric_sum(&a, "eventsync_resyncs_total").await
        + metric_sum(&b, "eventsync_resyncs_total").await;
    assert_eq!(
        resyncs,
        1.0,
        "the collection was re-read {resyncs} times\nA:\n{}\nB:\n{}",
        a.log_text(),
        b.log_text()
    );
    let epoch = lease_epoch(&client, &event_db, &stream).await;
    assert!(
        epoch.is_some_and(|e| e <= 2),
        "the lease changed hands during the sync: epoch {epoch:?}"
    );
}

/// The holder is stopped (SIGSTOP) past its lease under a write load; the stand-by takes
/// over; the old holder is woken (SIGCONT) and goes on where it was. The log stays exact
/// and no shadow moves backwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_holder_paused_past_its_lease_cannot_corrupt_the_log() {
    let client = client().await;
    let (app_db, event_db) = (unique_db("pause_app"), unique_db("pause_log"));
    let coll = client.database(&app_db).collection::<Document>("items");
    let stream = format!("{app_db}.items");
    let mut spec_a = DaemonSpec::new(&event_db, &app_db, "items");
    spec_a.lease_ttl_ms = 2000;
    spec_a.lease_renew_ms = 400;
    spec_a.holder = "replica-a".into();
    let mut spec_b = spec_a.clone();
    spec_b.holder = "replica-b".into();
    let a = Daemon::start(&spec_a);
    let first = wait_for("a holder", Duration::from_secs(30), || {
        let client = client.clone();
        let (event_db, stream) = (event_db.clone(), stream.clone());
        async move { lease_holder(&client, &event_db, &stream).await }
    })
    .await;
    assert_eq!(first, "replica-a");
    let b = Daemon::start(&spec_b);
    let load: Vec<_> = (0..3)
        .map(|w| tokio::spawn(mixed_load(coll.clone(), w + 40, 300, 12)))
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    a.signal("STOP");
    wait_for("the stand-by to take over", Duration::from_secs(20), || {
        let client = client.clone();
        let (event_db, stream) = (event_db.clone(), stream.clone());
        async move {
            (lease_holder(&client, &event_db, &stream).await.as_deref() == Some("replica-b"))
                .then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.signal("CONT");
    for l in load {
        l.await.expect("load");
    }
    let events = wait_converged(&client, &event_db, &coll, Duration::from_secs(90)).await;
    assert!(events.len() > 100, "load too small: {}", events.len());
    assert_shadows_at_log_end(&client, &event_db, &stream, &events).await;
    drop((a, b));
}

/// Issue 9, observation 2: a stamped document at version 5; the daemon stopped; the
/// document deleted, re-inserted at version 1 and updated to 2; history lost; the daemon
/// restarted; one more write to 3. The log must hold the new incarnation, the state route
/// must serve it, and the write checkpoint of version 3 must name the new event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_document_recreated_while_history_was_lost_converges() {
    let client = client().await;
    let (app_db, event_db) = (unique_db("reinc_app"), unique_db("reinc_log"));
    let coll = client.database(&app_db).collection::<Document>("items");
    let spec = DaemonSpec::new(&event_db, &app_db, "items");
    let mut daemon = Daemon::start(&spec);
    let v = |n: i64, who: &str| doc! { "_id": "p1", "who": who, "version": n, "_origin": "game-1" };
    coll.insert_one(v(1, "old")).await.expect("insert");
    for n in 2..=5 {
        coll.replace_one(doc! { "_id": "p1", "version": n - 1 }, v(n, "old"))
            .await
            .expect("write");
    }
    wait_converged(&client, &event_db, &coll, Duration::from_secs(60)).await;
    assert!(daemon.terminate(Duration::from_secs(15)).is_some());

    coll.delete_one(doc! { "_id": "p1" }).await.expect("delete");
    coll.insert_one(v(1, "new")).await.expect("re-insert");
    coll.replace_one(doc! { "_id": "p1", "version": 1_i64 }, v(2, "new"))
        .await
        .expect("update");
    // More changes than the server keeps, read by another stream so it prunes them.
    let filler = client.database(&app_db).collection::<Document>("items");
    let reader = coll.watch().await.expect("watch");
    let writes = 1300;
    for i in 0..writes {
        filler
            .update_one(doc! { "_id": i % 20 }, doc! { "$set": { "n": i } })
            .upsert(true)
            .await
            .expect("filler");
    }
    read_through(reader, writes as usize).await;

    let daemon = Daemon::start(&spec);
    wait_converged(&client, &event_db, &coll, Duration::from_secs(90)).await;
    coll.replace_one(doc! { "_id": "p1", "version": 2_i64 }, v(3, "new"))
        .await
        .expect("write 3");
    let events = wait_converged(&client, &event_db, &coll, Duration::from_secs(60)).await;
    let key = eventsync::mongo::doc_key(&Bson::String("p1".into()));
    let p1: Vec<_> = events.iter().filter(|e| e.doc_key == key).collect();
    let last = p1.last().expect("events of p1");
    assert!(last.to_version > 5, "versions never go back: {p1:?}");
    assert_eq!(last.stamp, Some(3));

    let base = format!(
        "{}/v1/streams/{app_db}.items/documents/p1",
        daemon.sync_url()
    );
    let state = get_json(&format!("{base}/state")).await;
    assert_eq!(
        state.pointer("/document/who").and_then(|w| w.as_str()),
        Some("new"),
        "the state route serves the new incarnation: {state}"
    );
    let cp = get_json(&format!("{base}/write-checkpoint?origin=game-1&version=3")).await;
    assert_eq!(cp["reached"], true, "{cp}");
    assert_eq!(cp["seq"], last.seq, "it names the new event: {cp}");
    let pending = get_json(&format!("{base}/write-checkpoint?origin=game-1&version=4")).await;
    assert_eq!(pending["status"], "pending", "{pending}");
}

/// The oldest `max_scan_events` events belong to documents with nothing to compact; the
/// hot document's events all come after. Compaction must still get to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compaction_progresses_past_a_window_with_nothing_to_compact() {
    let client = client().await;
    let (app_db, event_db) = (unique_db("cwin_app"), unique_db("cwin_log"));
    let coll = client.database(&app_db).collection::<Document>("items");
    let cold: Vec<Document> = (0..150)
        .map(|i| doc! { "_id": format!("cold-{i}"), "v": i })
        .collect();
    coll.insert_many(cold).await.expect("insert");
    coll.insert_one(doc! { "_id": "hot", "n": 0 })
        .await
        .expect("insert hot");
    let mut spec = DaemonSpec::new(&event_db, &app_db, "items");
    spec.extra = "[compaction]\ninterval_ms = 200\nmin_age_secs = 0\nkeep_per_document = 1\nhard_max_per_document = 100000\nmax_scan_events = 100\n".into();
    let daemon = Daemon::start(&spec);
    wait_converged(&client, &event_db, &coll, Duration::from_secs(60)).await;
    for n in 1..=200 {
        coll.update_one(doc! { "_id": "hot" }, doc! { "$set": { "n": n } })
            .await
            .expect("update");
    }
    let events = client.database(&event_db).collection::<Document>("events");
    let remaining = wait_for(
        "the hot document compacted",
        Duration::from_secs(60),
        || {
            let events = events.clone();
            async move {
                let n = events
                    .count_documents(doc! { "doc_key": "\"hot\"" })
                    .await
                    .ok()?;
                (n <= 1).then_some(n)
            }
        },
    )
    .await;
    assert!(remaining <= 1);
    let compacted = metric_sum(&daemon, "eventsync_events_compacted_total").await;
    assert!(
        compacted >= 150.0,
        "compacted {compacted}\n{}",
        daemon.log_text()
    );
    let snapshot = client
        .database(&event_db)
        .collection::<Document>("snapshots")
        .find_one(doc! { "doc_key": "\"hot\"" })
        .await
        .expect("snapshot")
        .expect("the hot document has a snapshot");
    let kept = events
        .find_one(doc! { "doc_key": "\"hot\"" })
        .await
        .expect("events")
        .expect("the newest event is kept");
    assert_eq!(
        eventsync::mongo::get_int(&snapshot, "version"),
        eventsync::mongo::get_int(&kept, "from_version"),
        "the snapshot is the state the kept event starts from"
    );
}
