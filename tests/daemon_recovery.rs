//! Exactly-once in effect, history loss, lease takeover and graceful shutdown, each with
//! real daemon processes against the real test server.

mod common;

use std::time::Duration;

use bson::{doc, Document};
use common::*;
use rand::Rng;

fn spawn_load(
    coll: &mongodb::Collection<Document>,
    writers: usize,
    ops: usize,
    docs: i32,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..writers)
        .map(|w| tokio::spawn(mixed_load(coll.clone(), w + 10 * ops, ops, docs)))
        .collect()
}

async fn finish(load: Vec<tokio::task::JoinHandle<()>>) {
    for l in load {
        l.await.expect("load task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_at_random_moments_loses_and_duplicates_nothing() {
    let client = client().await;
    let (app_db, event_db) = (unique_db("crash_app"), unique_db("crash_log"));
    let coll = client.database(&app_db).collection::<Document>("items");
    let spec = DaemonSpec::new(&event_db, &app_db, "items");
    let mut daemon = Daemon::start(&spec);
    let load = spawn_load(&coll, 3, 400, 15);
    let mut rng = rand::thread_rng();
    for round in 0..5 {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..900))).await;
        daemon.kill9();
        // Sometimes restart at once, sometimes after writes piled up.
        if round % 2 == 1 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        daemon = Daemon::start(&spec);
    }
    finish(load).await;
    // A lease held by a killed process lapses: the restarted daemon takes over.
    let events = wait_converged(&client, &event_db, &coll, Duration::from_secs(90)).await;
    assert!(
        events.len() > 100,
        "load too small: {} events",
        events.len()
    );
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_during_load_exits_cleanly_and_restart_continues_without_gap() {
    let client = client().await;
    let (app_db, event_db) = (unique_db("term_app"), unique_db("term_log"));
    let coll = client.database(&app_db).collection::<Document>("items");
    let spec = DaemonSpec::new(&event_db, &app_db, "items");
    let mut daemon = Daemon::start(&spec);
    let load = spawn_load(&coll, 2, 200, 10);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let status = daemon
        .terminate(Duration::from_secs(15))
        .expect("daemon exits within 15 s of SIGTERM");
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        daemon.log_text()
    );
    // The checkpoint covers exactly the log it left behind.
    let stream = format!("{app_db}.items");
    let events = read_log(&client, &event_db, &stream).await;
    let cp = client
        .database(&event_db)
        .collection::<Document>("checkpoints")
        .find_one(doc! { "_id": &stream })
        .await
        .unwrap()
        .expect("checkpoint stored");
    let cp_seq = eventsync::mongo::get_int(&cp, "seq").unwrap();
    assert_eq!(
        cp_seq,
        events.len() as i64,
        "checkpoint must cover the whole log at shutdown"
    );
    // The lease was released: a new daemon starts consuming at once.
    let lease = client
        .database(&event_db)
        .collection::<Document>("leases")
        .find_one(doc! { "_id": &stream })
        .await
        .unwrap()
        .unwrap();
    let expires = eventsync::mongo::get_int(&lease, "expires_at_ms")
        .unwrap_or_else(|| panic!("lease {lease}"));
    assert!(
        expires <= bson::DateTime::now().timestamp_millis(),
        "lease not released: {lease}"
    );
    let daemon = Daemon::start(&spec);
    finish(load).await;
    wait_converged(&client, &event_db, &coll, Duration::from_secs(60)).await;
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_history_is_recovered_by_rereading_the_collection() {
    let client = client().await;
    let (app_db, event_db) = (unique_db("lost_app"), unique_db("lost_log"));
    let coll = client.database(&app_db).collection::<Document>("items");
    let spec = DaemonSpec::new(&event_db, &app_db, "items");
    let mut daemon = Daemon::start(&spec);
    finish(spawn_load(&coll, 2, 60, 20)).await;
    coll.insert_one(doc! { "_id": 999, "doomed": true, "version": 1_i64 })
        .await
        .unwrap();
    wait_converged(&client, &event_db, &coll, Duration::from_secs(60)).await;
    let status = daemon.terminate(Duration::from_secs(15)).expect("stops");
    assert!(status.success());

    // While the daemon is down, more changes than the server keeps in its change history,
    // with another reader moving through them so the server discards the old ones.
    let reader = coll.watch().await.expect("watch");
    let writes = 1300;
    for i in 0..writes {
        let id = i % 30;
        coll.update_one(
            doc! { "_id": id },
            doc! { "$set": { "offline": i }, "$setOnInsert": { "version": 1_i64 } },
        )
        .upsert(true)
        .await
        .expect("write");
    }
    coll.delete_one(doc! { "_id": 999 }).await.unwrap();
    read_through(reader, writes as usize).await;

    let daemon = Daemon::start(&spec);
    let events = wait_converged(&client, &event_db, &coll, Duration::from_secs(90)).await;
    let resyncs = metric_sum(&daemon, "eventsync_resyncs_total{reason=\"history_lost\"").await;
    assert!(
        resyncs >= 1.0 || daemon.log_text().contains("no longer in the oplog"),
        "the daemon must notice the lost history\n{}",
        daemon.log_text()
    );
    // Clients are not reset: positions continue after the old ones.
    assert!(events
        .iter()
        .any(|e| e.op == eventsync::mongo::events::Operation::Delete
            && e.doc_key == eventsync::mongo::doc_key(&bson::Bson::Int32(999))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_replica_takes_over_when_the_holder_dies() {
    let client = client().await;
    let (app_db, event_db) = (unique_db("lease_app"), unique_db("lease_log"));
    let coll = client.database(&app_db).collection::<Document>("items");
    let stream = format!("{app_db}.items");
    let mut spec_a = DaemonSpec::new(&event_db, &app_db, "items");
    spec_a.holder = "replica-a".into();
    let mut spec_b = spec_a.clone();
    spec_b.holder = "replica-b".into();
    let mut a = Daemon::start(&spec_a);
    let mut b = Daemon::start(&spec_b);
    let leases = client.database(&event_db).collection::<Document>("leases");
    let holder = |leases: mongodb::Collection<Document>, stream: String| async move {
        leases
            .find_one(doc! { "_id": stream, "expires_at_ms": { "$gt": bson::DateTime::now().timestamp_millis() } })
            .await
            .ok()
            .flatten()
            .and_then(|d| d.get_str("holder").ok().map(str::to_owned))
    };
    let first = wait_for("a lease holder", Duration::from_secs(20), || {
        holder(leases.clone(), stream.clone())
    })
    .await;
    let load = spawn_load(&coll, 2, 200, 10);
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Exactly one consumes: the other stands by (its readiness says so).
    let (dead, survivor_holder) = if first == "replica-a" {
        (&mut a, "replica-b")
    } else {
        (&mut b, "replica-a")
    };
    dead.kill9();
    let killed_at = std::time::Instant::now();
    let next = wait_for("takeover", Duration::from_secs(20), || {
        let (leases, stream, first) = (leases.clone(), stream.clone(), first.clone());
        async move { holder(leases, stream).await.filter(|h| h != &first) }
    })
    .await;
    let took = killed_at.elapsed();
    assert_eq!(next, survivor_holder);
    assert!(
        took < Duration::from_millis(spec_a.lease_ttl_ms + 5000),
        "takeover took {took:?}"
    );
    finish(load).await;
    let events = wait_converged(&client, &event_db, &coll, Duration::from_secs(60)).await;
    assert!(events.len() > 50, "load too small: {}", events.len());
    println!("takeover after {took:?}; {} events", events.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn version_compare_rereads_only_documents_whose_version_changed() {
    let client = client().await;
    let (app_db, event_db) = (unique_db("vcmp_app"), unique_db("vcmp_log"));
    let coll = client.database(&app_db).collection::<Document>("items");
    let writer = eventsync::client::SyncCollection::<Document>::new(
        coll.clone(),
        eventsync::client::ClientOptions::new("vcmp"),
    )
    .unwrap();
    for id in 0..20 {
        writer
            .find_one_and_upsert(doc! { "_id": id, "n": 0 })
            .await
            .unwrap();
    }
    let mut spec = DaemonSpec::new(&event_db, &app_db, "items");
    spec.pipeline = "resync_compare = \"version\"".into();
    let mut daemon = Daemon::start(&spec);
    wait_converged(&client, &event_db, &coll, Duration::from_secs(30)).await;
    assert!(daemon
        .terminate(Duration::from_secs(15))
        .is_some_and(|s| s.success()));

    // Offline: 5 stamped updates, 2 new documents, 1 delete; then ask for a re-read.
    for id in 0..5 {
        writer
            .find_one_and_update(id, |d| {
                d.insert("n", 1);
            })
            .await
            .unwrap();
    }
    for id in 20..22 {
        writer
            .find_one_and_upsert(doc! { "_id": id, "n": 0 })
            .await
            .unwrap();
    }
    writer.delete_one(19, None).await.unwrap();
    let stream = format!("{app_db}.items");
    client
        .database(&event_db)
        .collection::<Document>("checkpoints")
        .update_one(
            doc! { "_id": &stream },
            doc! { "$set": { "resync_pending": true } },
        )
        .await
        .unwrap();

    let daemon2 = Daemon::start(&spec);
    wait_converged(&client, &event_db, &coll, Duration::from_secs(60)).await;
    let log = wait_for("the re-read summary", Duration::from_secs(20), || {
        let text = daemon2.log_text();
        async move {
            text.lines()
                .find(|l| l.contains("collection re-read"))
                .map(str::to_owned)
        }
    })
    .await;
    // 21 documents scanned; only the 5 updated and 2 new ones read whole.
    assert!(log.contains("scanned=21"), "{log}");
    assert!(log.contains("reread=7"), "{log}");
    drop(daemon);
}
