//! Start-up validation of the configuration, and checkpoints that keep moving when no
//! event passes.

mod common;

use std::process::Command;
use std::time::Duration;

use bson::{doc, Document};
use common::*;
use eventsync::config::Config;

fn check(toml: &str) -> (i32, String) {
    let dir = std::env::temp_dir().join(unique_db("cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_eventsyncd"))
        .arg("--check")
        .arg("--config")
        .arg(&path)
        .env_remove("EVENTSYNC__MONGODB__URI")
        .output()
        .expect("run eventsyncd");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const VALID: &str = r#"
[mongodb]
uri = "mongodb://127.0.0.1:27017"
[[streams]]
database = "app"
collection = "players"
"#;

#[test]
fn the_shipped_config_is_valid() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml")).unwrap();
    let cfg = Config::from_toml(&text).expect("shipped config.toml validates");
    assert_eq!(cfg.streams.len(), 1);
    assert_eq!(check(&text).0, 0);
    assert_eq!(check(VALID).0, 0);
}

#[test]
fn invalid_values_stop_the_daemon_naming_the_key_and_what_is_allowed() {
    let cases = [
        (
            VALID.replace("mongodb://127.0.0.1:27017", "http://x"),
            "mongodb.uri",
            "mongodb://",
        ),
        (
            format!("{VALID}[pipeline]\nbatch_size = 0\n"),
            "pipeline.batch_size",
            "allowed: 1 to",
        ),
        (
            format!("{VALID}[lease]\nttl_ms = 1000\nrenew_ms = 900\n"),
            "lease.renew_ms",
            "half of lease.ttl_ms",
        ),
        (
            format!("{VALID}[log]\nformat = \"xml\"\n"),
            "log.format",
            "\"json\"",
        ),
        (
            format!("{VALID}[sync]\ntokens = [\"short\"]\n"),
            "sync.tokens[0]",
            "16 characters",
        ),
        (
            VALID.replace("database = \"app\"", "database = \"eventsync\""),
            "streams[0].database",
            "event_database",
        ),
        (
            format!("{VALID}[pipeline]\nbogus_key = 1\n"),
            "bogus_key",
            "",
        ),
        (
            format!("{VALID}[[streams]]\ndatabase = \"app\"\ncollection = \"players\"\n"),
            "streams[1]",
            "twice",
        ),
        (
            format!(
                "{VALID}[[streams]]\ndatabase = \"app\"\ncollection = \"hot\"\npartitions = 0\n"
            ),
            "streams[1].partitions",
            "allowed: 1 to 64",
        ),
        (
            format!(
                "{VALID}[[streams]]\ndatabase = \"app\"\ncollection = \"hot\"\npartitions = 65\n"
            ),
            "streams[1].partitions",
            "allowed: 1 to 64",
        ),
        (
            "[mongodb]\nuri = \"mongodb://h\"\nstreams = []\n".to_owned(),
            "streams",
            "",
        ),
    ];
    for (toml, key, allowed) in cases {
        let (code, err) = check(&toml);
        assert_eq!(code, 2, "config must be rejected:\n{toml}\nstderr: {err}");
        assert!(err.contains(key), "message must name `{key}`: {err}");
        assert!(
            err.contains(allowed),
            "message must say what is allowed ({allowed}): {err}"
        );
    }
}

#[test]
fn environment_overrides_the_file() {
    let dir = std::env::temp_dir().join(unique_db("cfgenv"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.toml");
    std::fs::write(&path, VALID).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_eventsyncd"))
        .args(["--check", "--config"])
        .arg(&path)
        .env("EVENTSYNC__PIPELINE__BATCH_SIZE", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pipeline.batch_size"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_advances_when_changes_produce_no_event() {
    let client = client().await;
    let (app_db, event_db) = (unique_db("idle_app"), unique_db("idle_log"));
    let coll = client.database(&app_db).collection::<Document>("items");
    coll.insert_one(doc! { "_id": 1, "x": 1, "version": 1_i64 })
        .await
        .unwrap();
    let _daemon = Daemon::start(&DaemonSpec::new(&event_db, &app_db, "items"));
    let stream = format!("{app_db}.items");
    let checkpoints = client
        .database(&event_db)
        .collection::<Document>("checkpoints");
    let token = |checkpoints: mongodb::Collection<Document>, stream: String| async move {
        checkpoints
            .find_one(doc! { "_id": stream })
            .await
            .ok()
            .flatten()
            .and_then(|d| d.get_document("token").ok().cloned())
    };
    wait_converged(&client, &event_db, &coll, Duration::from_secs(30)).await;
    let before = wait_for("a checkpoint", Duration::from_secs(10), || {
        token(checkpoints.clone(), stream.clone())
    })
    .await;
    let events_before = read_log(&client, &event_db, &stream).await.len();
    // Writes that change nothing: change events arrive, no event passes.
    for _ in 0..3 {
        coll.update_one(doc! { "_id": 1 }, doc! { "$set": { "x": 1 } })
            .await
            .unwrap();
    }
    wait_for(
        "the checkpoint to move past the no-op changes",
        Duration::from_secs(10),
        || {
            let (checkpoints, stream, before) =
                (checkpoints.clone(), stream.clone(), before.clone());
            async move { token(checkpoints, stream).await.filter(|t| *t != before) }
        },
    )
    .await;
    assert_eq!(
        read_log(&client, &event_db, &stream).await.len(),
        events_before,
        "no-op writes add no event"
    );
}
