//! Collection lifecycle events end to end: a watched collection is dropped, re-created,
//! renamed away, and replaced by a rename onto its name (`dropTarget`), with a real daemon
//! against the real test server (whose launcher emits MongoDB's `drop`, `rename` and
//! `invalidate` events).
//!
//! What the daemon does today (`pipeline::worker`): a lifecycle event stores a checkpoint
//! without a token and with `resync_pending`, and re-opens the stream; the re-read then
//! compares the collection with the shadows and appends the differences — a delete for
//! every document that is gone. So after a drop or a rename away, the log replays to the
//! empty collection; after a re-creation or a rename onto the watched name, to the new
//! contents. Each step below waits (bounded) for exactly that.

mod common;

use std::time::Duration;

use bson::{doc, Document};
use common::*;
use eventsync::client::{ClientOptions, SyncCollection};

const CONVERGE: Duration = Duration::from_secs(60);

/// A stamped writer (the thin client) on `coll`.
fn writer(coll: &mongodb::Collection<Document>, id: &str) -> SyncCollection<Document> {
    SyncCollection::new(coll.clone(), ClientOptions::new(id).max_retries(50)).expect("client")
}

/// Upserts documents `ids` through the thin client, then edits every second one.
async fn write_docs(w: &SyncCollection<Document>, ids: &[i32], tag: &str) {
    for &id in ids {
        w.find_one_and_upsert(doc! {
            "_id": id, "tag": tag, "n": id, "big": 5_000_000_000_i64,
            "when": bson::DateTime::from_millis(1_700_000_000_000 + i64::from(id)),
        })
        .await
        .expect("upsert");
    }
    for &id in ids.iter().step_by(2) {
        w.find_one_and_update(id, |d| {
            d.insert("edited", true);
        })
        .await
        .expect("update");
    }
}

/// The daemon's count of lifecycle events of `kind` (`drop`, `rename`, `invalidate`).
async fn lifecycle_events(daemon: &Daemon, kind: &str) -> f64 {
    let Ok(resp) = reqwest::get(format!("{}/metrics", daemon.ops_url())).await else {
        return f64::NAN;
    };
    let body = resp.text().await.unwrap_or_default();
    body.lines()
        .filter(|l| {
            l.starts_with("eventsync_stream_lifecycle_total{")
                && l.contains(&format!("kind=\"{kind}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the daemon has counted at least `n` lifecycle events of `kind`.
async fn wait_lifecycle(daemon: &Daemon, kind: &str, n: f64) {
    wait_for(
        &format!("{n} {kind} event(s) counted by the daemon"),
        CONVERGE,
        || async move { (lifecycle_events(daemon, kind).await >= n).then_some(()) },
    )
    .await;
}

/// `renameCollection` of `db.from` to `db.to` (an admin command).
async fn rename(client: &mongodb::Client, db: &str, from: &str, to: &str, drop_target: bool) {
    client
        .database("admin")
        .run_command(doc! {
            "renameCollection": format!("{db}.{from}"),
            "to": format!("{db}.{to}"),
            "dropTarget": drop_target,
        })
        .await
        .expect("renameCollection");
}

/// Drop → the log converges to the empty collection; re-creation → it follows the new
/// documents, including ids the dropped collection had (new incarnations).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drop_converges_to_empty_and_a_recreated_collection_continues() {
    let client = client().await;
    let (app_db, event_db) = (unique_db("life_app"), unique_db("life_log"));
    let coll = client.database(&app_db).collection::<Document>("items");
    let stream = format!("{app_db}.items");
    let daemon = Daemon::start(&DaemonSpec::new(&event_db, &app_db, "items"));
    wait_streaming(&client, &event_db, &stream).await;

    let w = writer(&coll, "life-writer");
    write_docs(&w, &[1, 2, 3, 4, 5], "first").await;
    // An unstamped writer too (the daemon assigns versions).
    coll.insert_one(doc! { "_id": "raw", "by": "mongosh" })
        .await
        .expect("raw insert");
    let before = wait_converged(&client, &event_db, &coll, CONVERGE).await;
    assert_eq!(
        replay(&before).len(),
        6,
        "six live documents before the drop"
    );

    coll.drop().await.expect("drop");
    let after_drop = wait_converged(&client, &event_db, &coll, CONVERGE).await;
    assert!(
        replay(&after_drop).is_empty(),
        "the log replays to the dropped (empty) collection"
    );
    assert!(
        after_drop.len() >= before.len() + 6,
        "one delete per dropped document: {} events before, {} after",
        before.len(),
        after_drop.len()
    );
    wait_lifecycle(&daemon, "drop", 1.0).await;

    // Re-created: new ids, and ids the dropped collection had (their versions restart).
    write_docs(&w, &[4, 5, 6, 7], "second").await;
    coll.insert_one(doc! { "_id": "raw", "by": "mongosh again" })
        .await
        .expect("raw re-insert");
    let recreated = wait_converged(&client, &event_db, &coll, CONVERGE).await;
    assert_eq!(
        replay(&recreated).len(),
        5,
        "the re-created collection's documents"
    );

    // And it stays live: later writes keep arriving.
    w.find_one_and_update(6, |d| {
        d.insert("later", 1_i32);
    })
    .await
    .expect("update after re-creation");
    coll.delete_one(doc! { "_id": "raw" })
        .await
        .expect("delete");
    let live = wait_converged(&client, &event_db, &coll, CONVERGE).await;
    assert!(
        live.len() > recreated.len(),
        "events continue after re-creation"
    );
    drop(daemon);
}

/// Rename away → the log converges to the empty collection; a rename of another collection
/// onto the watched name (`dropTarget`) → it converges to the new contents; writes go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rename_away_and_rename_onto_the_watched_name_converge() {
    let client = client().await;
    let (app_db, event_db) = (unique_db("lren_app"), unique_db("lren_log"));
    let db = client.database(&app_db);
    let coll = db.collection::<Document>("items");
    let stream = format!("{app_db}.items");
    let daemon = Daemon::start(&DaemonSpec::new(&event_db, &app_db, "items"));
    wait_streaming(&client, &event_db, &stream).await;

    let w = writer(&coll, "ren-writer");
    write_docs(&w, &[1, 2, 3], "original").await;
    wait_converged(&client, &event_db, &coll, CONVERGE).await;

    // Renamed away: the watched name is empty now.
    rename(&client, &app_db, "items", "items_old", false).await;
    let away = wait_converged(&client, &event_db, &coll, CONVERGE).await;
    assert!(
        replay(&away).is_empty(),
        "renamed away: the log replays to nothing"
    );
    wait_lifecycle(&daemon, "rename", 1.0).await;
    let old = db.collection::<Document>("items_old");
    assert_eq!(
        read_collection(&old).await.len(),
        3,
        "the documents moved to items_old"
    );

    // The name is used again, then replaced by a rename onto it (dropTarget).
    write_docs(&w, &[10, 11], "interim").await;
    wait_converged(&client, &event_db, &coll, CONVERGE).await;
    let staging = db.collection::<Document>("staging");
    write_docs(&writer(&staging, "staging-writer"), &[20, 21, 22], "staged").await;
    let renames_before = lifecycle_events(&daemon, "rename").await;
    rename(&client, &app_db, "staging", "items", true).await;
    let onto = wait_converged(&client, &event_db, &coll, CONVERGE).await;
    let state = replay(&onto);
    let staged: Vec<String> = [20, 21, 22]
        .iter()
        .map(|&i| eventsync::mongo::doc_key(&bson::Bson::Int32(i)))
        .collect();
    assert_eq!(
        state.keys().cloned().collect::<Vec<_>>(),
        staged,
        "the log replays to the staged documents"
    );
    wait_lifecycle(&daemon, "rename", renames_before + 1.0).await;

    // Writes to the renamed-in collection keep arriving.
    w.find_one_and_update(21, |d| {
        d.insert("after_rename", true);
    })
    .await
    .expect("update after the rename");
    let live = wait_converged(&client, &event_db, &coll, CONVERGE).await;
    assert!(live.len() > onto.len(), "events continue after the rename");
    drop(daemon);
}

/// A checkpoint whose token is an `invalidate` event's (what a checkpoint taken from the
/// post-batch resume token of the invalidating batch holds): `resumeAfter` it fails with
/// InvalidResumeToken (260) for good, so the daemon must open a fresh stream and re-read
/// instead of retrying the same token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpoint_at_an_invalidate_token_does_not_wedge_the_stream() {
    let client = client().await;
    let (app_db, event_db) = (unique_db("linv_app"), unique_db("linv_log"));
    let coll = client.database(&app_db).collection::<Document>("items");
    let stream = format!("{app_db}.items");
    let spec = DaemonSpec::new(&event_db, &app_db, "items");
    let mut daemon = Daemon::start(&spec);
    wait_streaming(&client, &event_db, &stream).await;
    write_docs(&writer(&coll, "inv-writer"), &[1, 2, 3], "before").await;
    wait_converged(&client, &event_db, &coll, CONVERGE).await;
    daemon
        .terminate(Duration::from_secs(15))
        .expect("daemon stops on SIGTERM");

    // While it is down: the collection is dropped. Read the invalidate token the way the
    // daemon would, from its own checkpoint.
    let checkpoints = client
        .database(&event_db)
        .collection::<Document>("checkpoints");
    let cp = checkpoints
        .find_one(doc! { "_id": &stream })
        .await
        .expect("read checkpoint")
        .expect("checkpoint stored");
    let token = cp.get_document("token").expect("checkpoint token").clone();
    coll.drop().await.expect("drop");
    let mut cs = coll
        .watch()
        .resume_after(eventsync::mongo::change_stream::token_from_document(&token))
        .max_await_time(Duration::from_millis(100))
        .await
        .expect("resume from the checkpoint");
    let start = std::time::Instant::now();
    let invalidate = loop {
        assert!(
            start.elapsed() < CONVERGE,
            "no invalidate event after the drop"
        );
        if let Some(ev) = cs.next_if_any().await.expect("change stream") {
            if ev.operation_type == mongodb::change_stream::event::OperationType::Invalidate {
                break bson::to_document(&ev.id).expect("token");
            }
        }
    };
    drop(cs);
    checkpoints
        .update_one(
            doc! { "_id": &stream },
            doc! { "$set": { "token": invalidate } },
        )
        .await
        .expect("store the invalidate token");

    let _daemon = Daemon::start(&spec);
    let events = wait_converged(&client, &event_db, &coll, CONVERGE).await;
    assert!(
        replay(&events).is_empty(),
        "the log replays to the dropped collection"
    );
    coll.insert_one(doc! { "_id": "after", "n": 1_i32 })
        .await
        .expect("insert after the drop");
    wait_converged(&client, &event_db, &coll, CONVERGE).await;
}
