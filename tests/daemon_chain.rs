//! The chain invariant end to end: a real daemon process, a real server, a mixed load
//! from several writers (thin client and unstamped), and a log that replays exactly.

mod common;

use std::time::Duration;

use bson::{doc, Document};
use common::*;

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
