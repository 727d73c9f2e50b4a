//! Start-up validation of the configuration, and checkpoints that keep moving when no
//! event passes.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use bson::{doc, Document};
use common::*;
use eventsync::config::Config;

fn check(toml: &str) -> (i32, String) {
    let dir = TempDir::new("cfg");
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
    let dir = TempDir::new("cfgenv");
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

/// The harness: no port is handed out twice in one process (a daemon's `[sync]` and
/// `[ops]` ports once came out equal and it could not listen).
#[test]
fn the_harness_never_hands_out_a_port_twice() {
    let mut seen = std::collections::HashSet::new();
    for i in 0..3000 {
        let port = free_port();
        assert!(seen.insert(port), "port {port} handed out twice (call {i})");
    }
}

const SELFTEST_VAR: &str = "EVENTSYNC_HARNESS_SELFTEST";

/// Fails on purpose when `EVENTSYNC_HARNESS_SELFTEST` names a file (the test below, and
/// `scripts/ci/check_test_sh.sh`, run it that way); passes otherwise. The daemon it starts
/// refuses its configuration, so its log holds the reason.
#[test]
fn harness_selftest_fails_with_a_daemon_in_scope() {
    let Ok(report) = std::env::var(SELFTEST_VAR) else {
        return;
    };
    let mut spec = DaemonSpec::new("selftest_log", "selftest_app", "items");
    spec.pipeline = "batch_size = 0".into();
    let mut daemon = Daemon::start(&spec);
    let started = std::time::Instant::now();
    while daemon.running() && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(&report, daemon.dir.path().display().to_string()).expect("report file");
    panic!("deliberate failure with a daemon in scope");
}

/// A failing test shows the tail of its daemon's log, and the daemon's temporary
/// directory is removed all the same.
#[test]
fn a_failing_test_shows_its_daemons_log_and_cleans_up() {
    if std::env::var(SELFTEST_VAR).is_ok() {
        return; // we are the inner run
    }
    let scratch = TempDir::new("selftest");
    let report = scratch.join("daemon-dir.txt");
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "harness_selftest_fails_with_a_daemon_in_scope"])
        .env(SELFTEST_VAR, &report)
        .output()
        .expect("run the test binary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "the inner test must fail:\n{text}");
    assert!(
        text.contains("deliberate failure"),
        "not the inner test's failure:\n{text}"
    );
    assert!(
        text.contains("--- eventsyncd (pid") && text.contains("pipeline.batch_size"),
        "the failure must show the daemon's log (its refusal names pipeline.batch_size):\n{text}"
    );
    let dir = std::fs::read_to_string(&report).expect("the inner test names its daemon's dir");
    assert!(
        !std::path::Path::new(dir.trim()).exists(),
        "the daemon's temporary directory {dir} is left behind"
    );
}

/// The keys a section of the configuration accepts, from the daemon's own refusal of an
/// unknown key (every section denies unknown fields and lists the ones it knows).
fn section_keys(section: &str) -> Vec<String> {
    let probe = match section {
        "" => format!("__probe__ = 1\n{VALID}"),
        "streams" => {
            "[mongodb]\nuri = \"mongodb://127.0.0.1:27017\"\n[[streams]]\ndatabase = \"app\"\ncollection = \"players\"\n__probe__ = 1\n".to_owned()
        }
        "mongodb" => "[mongodb]\nuri = \"mongodb://127.0.0.1:27017\"\n__probe__ = 1\n[[streams]]\ndatabase = \"app\"\ncollection = \"players\"\n".to_owned(),
        s => format!("{VALID}\n[{s}]\n__probe__ = 1\n"),
    };
    let err = Config::from_toml(&probe)
        .err()
        .unwrap_or_else(|| panic!("[{section}] accepted an unknown key"))
        .to_string();
    let list = err
        .split_once("expected one of ")
        .or_else(|| err.split_once("expected "))
        .unwrap_or_else(|| panic!("no list of keys in: {err}"))
        .1;
    list.split(", ")
        .filter_map(|k| k.trim().split('`').nth(1))
        .map(str::to_owned)
        .collect()
}

/// `section.key` → the line's text after `=` (or `None` when only commented out), for every
/// `key = …` and `# key = …` line of a TOML file.
fn toml_keys(text: &str) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            section = t.trim_matches(|c| c == '[' || c == ']').to_owned();
            continue;
        }
        let (commented, body) = match t.strip_prefix('#') {
            Some(rest) => (true, rest.trim()),
            None => (false, t),
        };
        let Some((k, v)) = body.split_once('=') else {
            continue;
        };
        let k = k.trim();
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let key = format!("{section}.{k}");
        let value = (!commented).then(|| v.trim().to_owned());
        if value.is_some() || !out.contains_key(&key) {
            out.insert(key, value);
        }
    }
    out
}

/// Every key the daemon accepts is in the shipped `config.toml` (set or commented out) and
/// in the configuration reference of `docs/operations.md`, whose "shipped" column agrees
/// with `config.toml`.
#[test]
fn every_config_key_is_shipped_and_documented() {
    let root = env!("CARGO_MANIFEST_DIR");
    let shipped = std::fs::read_to_string(format!("{root}/config.toml")).unwrap();
    let docs = std::fs::read_to_string(format!("{root}/docs/operations.md")).unwrap();
    let in_file = toml_keys(&shipped);
    let sections = section_keys("");
    assert!(sections.contains(&"compaction".to_owned()), "{sections:?}");
    let mut all = Vec::new();
    for section in &sections {
        for key in section_keys(section) {
            all.push(format!("{section}.{key}"));
        }
    }
    assert!(all.len() > 30, "{all:?}");
    let missing_file: Vec<_> = all.iter().filter(|k| !in_file.contains_key(*k)).collect();
    assert!(
        missing_file.is_empty(),
        "keys missing from config.toml (add them, commented out if need be): {missing_file:?}"
    );
    let missing_docs: Vec<_> = all
        .iter()
        .filter(|k| !docs.contains(&format!("| `{k}` |")))
        .collect();
    assert!(
        missing_docs.is_empty(),
        "keys missing from the reference table of docs/operations.md: {missing_docs:?}"
    );
    // The table: | `section.key` | built-in default | shipped config.toml | meaning |
    for row in docs.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let key = cells[1].trim_matches('`');
        if !all.iter().any(|k| k == key) {
            continue;
        }
        let documented = cells[3].trim_matches('`');
        match &in_file[key] {
            Some(value) => assert_eq!(
                documented, value,
                "docs/operations.md says config.toml has {key} = {documented}; it has {value}"
            ),
            None => assert_eq!(
                documented, "(commented out)",
                "{key} is commented out in config.toml: {row}"
            ),
        }
    }
}
