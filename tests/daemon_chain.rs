//! The chain invariant end to end: a real daemon process, a real server, a mixed load
//! from several writers (thin client and unstamped), and a log that replays exactly.

mod common;

use std::time::Duration;

use bson::{doc, oid::ObjectId, Bson, DateTime, Document};
use common::*;
use eventsync::client::{ClientOptions, SyncCollection};
use rand::{Rng, SeedableRng};

async fn mixed_load(coll: mongodb::Collection<Document>, writer: usize, ops: usize, docs: i32) {
    let client = SyncCollection::<Document>::new(
        coll.clone(),
        ClientOptions::new(format!("writer-{writer}")).max_retries(200),
    )
    .expect("client");
    let mut rng = rand::rngs::StdRng::seed_from_u64(writer as u64);
    for i in 0..ops {
        let id = rng.gen_range(0..docs);
        match rng.gen_range(0..10) {
            0..=1 => {
                let d = doc! {
                    "_id": id, "n": 0_i32, "big": 5_000_000_000_i64, "f": 1.5,
                    "when": DateTime::from_millis(1_700_000_000_000 + i as i64),
                    "ref": ObjectId::new(), "tags": ["a", "b"], "nested": { "k": "v", "a.b": 1 }
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
                        doc! { "raw_replace": true, "list": [1, 2, Bson::Null] },
                    )
                    .await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_load_yields_gap_free_chains_that_replay_exactly() {
    let client = client().await;
    let app_db = unique_db("chain_app");
    let event_db = unique_db("chain_log");
    let coll = client.database(&app_db).collection::<Document>("items");
    // Documents that exist before the daemon starts: the initial sync records them.
    for id in 100..110 {
        coll.insert_one(doc! { "_id": id, "pre": true, "version": 1_i64 })
            .await
            .unwrap();
    }
    let daemon = Daemon::start(&DaemonSpec::new(&event_db, &app_db, "items"));
    let stream = format!("{app_db}.items");
    wait_for("initial sync", Duration::from_secs(30), || {
        let client = client.clone();
        let (event_db, stream) = (event_db.clone(), stream.clone());
        async move { (read_log(&client, &event_db, &stream).await.len() >= 10).then_some(()) }
    })
    .await;

    let writers: Vec<_> = (0..4)
        .map(|w| tokio::spawn(mixed_load(coll.clone(), w, 150, 12)))
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let events = wait_converged(&client, &event_db, &coll, Duration::from_secs(60)).await;
    assert!(
        events.len() > 100,
        "expected a real load, got {} events",
        events.len()
    );
    assert!(
        events.iter().any(|e| !e.stamped && e.origin.is_none()),
        "unstamped writes must be marked"
    );
    assert!(events.iter().any(|e| e.stamped
        && e.origin
            .as_deref()
            .is_some_and(|o| o.starts_with("writer-"))));
    assert!(events
        .iter()
        .any(|e| e.op == eventsync::mongo::events::Operation::Delete));
    drop(daemon);
}
