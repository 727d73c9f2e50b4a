//! The operations port of a real daemon process against the real test server: the
//! Prometheus exposition scraped during and after a write load and checked with a real
//! parser (Python `prometheus_client`), health endpoints, and logs free of secrets in
//! both formats.
//!
//! The parser is installed, pinned, into the test venv (`.venv-test`, made by
//! `scripts/testenv`) on first use, under the venv lock the other installers take.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bson::{doc, Document};
use common::*;
use eventsync::client::{ClientOptions, SyncCollection};
use serde_json::Value;

const PROMETHEUS_CLIENT: &str = "prometheus-client==0.26.0";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn venv_python() -> PathBuf {
    repo().join(".venv-test/bin/python")
}

/// Makes sure `.venv-test` exists and holds the pinned `prometheus_client`.
fn ensure_parser() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let want = PROMETHEUS_CLIENT.split("==").nth(1).unwrap();
        let ok = || {
            Command::new(venv_python())
                .args([
                    "-c",
                    "import sys, prometheus_client.parser\n\
                     from importlib.metadata import version\n\
                     sys.exit(0 if version('prometheus-client') == sys.argv[1] else 1)",
                    want,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if ok() {
            return;
        }
        // The venv (nx-27017, pymongo) comes from the test environment's installer; then
        // add the parser under the same lock every installer into this venv takes.
        let script = format!(
            ". scripts/testenv/lib.sh && ensure_venv && \
             flock -w 600 \"$STATE/venv.lock\" \"$VENV/bin/python\" -m pip install --quiet \
             --disable-pip-version-check '{PROMETHEUS_CLIENT}' >&2"
        );
        let status = Command::new("bash")
            .args(["-c", &script])
            .current_dir(repo())
            .status()
            .expect("run bash");
        assert!(status.success(), "cannot install {PROMETHEUS_CLIENT}");
        assert!(ok(), "{PROMETHEUS_CLIENT} does not import after install");
    });
}

/// Parses expositions with `prometheus_client.parser.text_string_to_metric_families`
/// (one Python process for all of them). Each becomes
/// `[{name, type, help, samples: [{name, labels, value}]}]`. Fails on anything the parser
/// rejects, and when the parser did not account for every sample line.
fn parse_expositions(texts: &[String]) -> Vec<Value> {
    ensure_parser();
    const SCRIPT: &str = r##"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for i, text in enumerate(json.load(sys.stdin)):
    families = []
    for f in text_string_to_metric_families(text):
        families.append({
            "name": f.name, "type": f.type, "help": f.documentation,
            "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples],
        })
    lines = [l for l in text.splitlines() if l.strip() and not l.startswith("#")]
    parsed = sum(len(f["samples"]) for f in families)
    if parsed != len(lines):
        sys.exit(f"exposition {i}: {len(lines)} sample lines but the parser returned {parsed}")
    out.append(families)
json.dump(out, sys.stdout)
"##;
    let mut child = Command::new(venv_python())
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python");
    let input = serde_json::to_vec(texts).unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().expect("python");
    assert!(
        out.status.success(),
        "prometheus_client rejects the exposition: {}\n--- first exposition ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        texts.first().map(String::as_str).unwrap_or("")
    );
    match serde_json::from_slice(&out.stdout).expect("parser output") {
        Value::Array(v) => v,
        other => panic!("unexpected parser output {other}"),
    }
}

/// Sum of the samples named `sample` whose labels include `labels`.
fn sum(families: &Value, sample: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for f in families.as_array().unwrap() {
        for s in f["samples"].as_array().unwrap() {
            if s["name"] == sample
                && labels
                    .iter()
                    .all(|(k, v)| s["labels"][*k].as_str() == Some(*v))
            {
                *total.get_or_insert(0.0) += s["value"].as_f64().unwrap_or(f64::NAN);
            }
        }
    }
    total
}

fn family<'a>(families: &'a Value, name: &str) -> Option<&'a Value> {
    families
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == name)
}

/// A quick look at one sample in raw exposition text (for polling; the parser checks).
fn raw_sum(text: &str, sample: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.split(['{', ' ']).next() == Some(sample) && (label.is_empty() || l.contains(label))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn get(url: &str) -> Option<(u16, String)> {
    let r = http().get(url).send().await.ok()?;
    let status = r.status().as_u16();
    Some((status, r.text().await.ok()?))
}

async fn scrape(d: &Daemon) -> String {
    let r = http()
        .get(format!("{}/metrics", d.ops_url()))
        .send()
        .await
        .expect("scrape /metrics");
    assert_eq!(r.status().as_u16(), 200);
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert!(
        ct.starts_with("text/plain") && ct.contains("version=0.0.4"),
        "content type {ct:?}"
    );
    r.text().await.unwrap()
}

async fn wait_ready(d: &Daemon, timeout: Duration) -> Value {
    let url = format!("{}/readyz", d.ops_url());
    wait_for("/readyz 200", timeout, || {
        let url = url.clone();
        async move {
            match get(&url).await {
                Some((200, body)) => serde_json::from_str(&body).ok(),
                _ => None,
            }
        }
    })
    .await
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Prometheus naming conventions of everything the daemon exports.
fn check_conventions(families: &Value) {
    for f in families.as_array().unwrap() {
        let name = f["name"].as_str().unwrap();
        let kind = f["type"].as_str().unwrap();
        assert!(
            name.starts_with("eventsync_"),
            "{name}: no eventsync_ prefix"
        );
        assert!(
            !f["help"].as_str().unwrap_or("").is_empty(),
            "{name}: no HELP"
        );
        assert_ne!(kind, "unknown", "{name}: no TYPE");
        match kind {
            "counter" => {
                for s in f["samples"].as_array().unwrap() {
                    assert!(
                        s["name"].as_str().unwrap().ends_with("_total"),
                        "counter sample {} must end in _total",
                        s["name"]
                    );
                }
            }
            "gauge" => assert!(!name.ends_with("_total"), "gauge {name} ends in _total"),
            "histogram" => {
                assert!(
                    name.ends_with("_seconds") || name.ends_with("_changes"),
                    "histogram {name} has no unit suffix"
                );
                assert!(
                    f["samples"].as_array().unwrap().iter().any(|s| s["name"]
                        .as_str()
                        .unwrap()
                        .ends_with("_bucket")
                        && s["labels"]["le"] == "+Inf")
                        || f["samples"].as_array().unwrap().is_empty(),
                    "histogram {name} without +Inf bucket"
                );
            }
            other => panic!("{name}: unexpected type {other}"),
        }
        for unit in ["_milliseconds", "_ms", "_minutes", "_kilobytes", "_percent"] {
            assert!(!name.contains(unit), "{name}: not a base unit");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_are_valid_and_move_with_the_load() {
    ensure_parser();
    let client = client().await;
    let app_db = unique_db("opsm_app");
    let event_db = unique_db("opsm_log");
    let coll = client.database(&app_db).collection::<Document>("items");
    let stream = format!("{app_db}.items");
    let daemon = Daemon::start(&DaemonSpec::new(&event_db, &app_db, "items"));

    // Liveness answers at once; readiness once the stream is consumed.
    let (status, body) = wait_for("/healthz", Duration::from_secs(30), || {
        let url = format!("{}/healthz", daemon.ops_url());
        async move { get(&url).await }
    })
    .await;
    assert_eq!(status, 200, "{body}");
    let ready = wait_ready(&daemon, Duration::from_secs(60)).await;
    assert_eq!(ready["ready"], true, "{ready}");
    assert_eq!(ready["mongodb"], true, "{ready}");
    assert_eq!(ready["streams"][&stream]["role"], "consuming", "{ready}");

    let before_text = scrape(&daemon).await;
    let st: &str = &stream;
    let before = &parse_expositions(std::slice::from_ref(&before_text))[0];
    check_conventions(before);
    assert_eq!(
        sum(
            before,
            "eventsync_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0),
        "build info:\n{before_text}"
    );
    assert_eq!(
        sum(before, "eventsync_lease_held", &[("stream", st)]),
        Some(1.0)
    );
    assert!(sum(before, "eventsync_process_start_time_seconds", &[]).unwrap() > 1.6e9);
    assert_eq!(sum(before, "eventsync_ready", &[]), Some(1.0));
    assert_eq!(sum(before, "eventsync_mongodb_reachable", &[]), Some(1.0));
    // A consumed stream's counters exist from the start, at zero if nothing happened.
    for op in ["insert", "update", "replace", "delete"] {
        assert!(
            sum(
                before,
                "eventsync_events_appended_total",
                &[("stream", st), ("operation", op)]
            )
            .is_some(),
            "no eventsync_events_appended_total{{operation={op:?}}} before the load"
        );
    }
    let appended_before =
        sum(before, "eventsync_events_appended_total", &[("stream", st)]).unwrap();
    let read_before = sum(before, "eventsync_changes_read_total", &[("stream", st)]).unwrap_or(0.0);

    // The load: thin-client inserts, edits and deletes, scraped while it runs.
    const INSERTS: i32 = 80;
    const UPDATES: i32 = 40;
    const DELETES: i32 = 20;
    let load_coll = coll.clone();
    let load = tokio::spawn(async move {
        let c = SyncCollection::<Document>::new(load_coll, ClientOptions::new("ops-load"))
            .expect("client");
        for id in 0..INSERTS {
            c.find_one_and_upsert(doc! { "_id": id, "n": 0, "name": format!("doc {id}") })
                .await
                .expect("upsert");
        }
        for id in 0..UPDATES {
            c.find_one_and_update(id, |d: &mut Document| {
                d.insert("n", 1);
            })
            .await
            .expect("update");
        }
        for id in 0..DELETES {
            assert!(c.delete_one(INSERTS - 1 - id, None).await.expect("delete"));
        }
    });
    let mut scrapes = vec![before_text.clone()];
    while !load.is_finished() {
        scrapes.push(scrape(&daemon).await);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    load.await.unwrap();
    let writes = (INSERTS + UPDATES + DELETES) as f64;

    // Until every write is counted (the counters only move once the events are stored).
    let want = appended_before + writes;
    let pattern = format!("stream=\"{stream}\"");
    wait_for(
        "eventsync_events_appended_total to count every write",
        Duration::from_secs(60),
        || {
            let daemon = &daemon;
            let pattern = pattern.clone();
            async move {
                let text = scrape(daemon).await;
                (raw_sum(&text, "eventsync_events_appended_total", &pattern) >= want).then_some(())
            }
        },
    )
    .await;
    let t0 = unix_now();
    let after_text = scrape(&daemon).await;
    let t1 = unix_now();
    scrapes.push(after_text.clone());
    assert!(scrapes.len() >= 3, "too few scrapes during the load");

    let parsed = parse_expositions(&scrapes);
    for p in &parsed {
        check_conventions(p);
    }
    // Counters never go down from one scrape to the next.
    for name in [
        "eventsync_events_appended_total",
        "eventsync_changes_read_total",
        "eventsync_batch_size_changes_count",
        "eventsync_append_duration_seconds_count",
    ] {
        let series: Vec<f64> = parsed
            .iter()
            .map(|p| sum(p, name, &[("stream", st)]).unwrap_or(0.0))
            .collect();
        assert!(
            series.windows(2).all(|w| w[0] <= w[1]),
            "{name} went down: {series:?}"
        );
    }
    let after = parsed.last().unwrap();
    let appended = sum(after, "eventsync_events_appended_total", &[("stream", st)]).unwrap();
    assert!(
        appended - appended_before >= writes,
        "appended {appended_before} -> {appended}, {writes} writes"
    );
    for (op, n) in [
        ("insert", INSERTS),
        ("update", UPDATES),
        ("delete", DELETES),
    ] {
        let v = sum(
            after,
            "eventsync_events_appended_total",
            &[("stream", st), ("operation", op)],
        )
        .unwrap();
        assert!(v >= n as f64, "{op}: {v} < {n}");
    }
    let read = sum(after, "eventsync_changes_read_total", &[("stream", st)]).unwrap();
    assert!(
        read - read_before >= writes,
        "changes read {read_before} -> {read}"
    );
    assert!(
        sum(
            after,
            "eventsync_batch_size_changes_count",
            &[("stream", st)]
        )
        .unwrap()
            >= 1.0
    );
    assert!(
        sum(after, "eventsync_batch_size_changes_sum", &[("stream", st)]).unwrap() >= writes,
        "batch sizes must add up to at least the changes"
    );
    assert!(
        sum(
            after,
            "eventsync_diff_duration_seconds_count",
            &[("stream", st)]
        )
        .unwrap()
            >= writes
    );
    assert!(
        sum(
            after,
            "eventsync_append_duration_seconds_count",
            &[("stream", st)]
        )
        .unwrap()
            >= 1.0
    );
    let hist = family(after, "eventsync_append_duration_seconds").expect("append histogram");
    assert_eq!(hist["type"], "histogram");
    for g in [
        "eventsync_change_stream_lag_seconds",
        "eventsync_replication_lag_seconds",
    ] {
        let v = sum(after, g, &[("stream", st)]).unwrap_or_else(|| panic!("no {g}"));
        assert!((0.0..60.0).contains(&v), "{g} = {v}");
    }
    assert_eq!(
        sum(after, "eventsync_lease_held", &[("stream", st)]),
        Some(1.0)
    );
    assert_eq!(
        sum(
            after,
            "eventsync_lease_acquisitions_total",
            &[("stream", st)]
        ),
        Some(1.0)
    );
    assert!(
        sum(
            after,
            "eventsync_resyncs_total",
            &[("stream", st), ("reason", "initial")]
        )
        .is_some(),
        "the initial sync is a resync"
    );
    // Checkpoint age is computed when scraped: now minus the last stored checkpoint.
    let stored = sum(
        after,
        "eventsync_checkpoint_timestamp_seconds",
        &[("stream", st)],
    )
    .expect("checkpoint timestamp");
    let age =
        sum(after, "eventsync_checkpoint_age_seconds", &[("stream", st)]).expect("checkpoint age");
    assert!(
        stored <= t1 + 0.5 && stored > t0 - 60.0,
        "stored at {stored}, now {t0}"
    );
    assert!(
        age >= t0 - stored - 0.5 && age <= t1 - stored + 0.5,
        "age {age} but the checkpoint was stored {}s before the scrape",
        t0 - stored
    );

    // Idle: the age still tells the truth (it moves with the clock between checkpoints).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let t0 = unix_now();
    let idle_text = scrape(&daemon).await;
    let t1 = unix_now();
    let stored = raw_sum(
        &idle_text,
        "eventsync_checkpoint_timestamp_seconds",
        &pattern,
    );
    let age = raw_sum(&idle_text, "eventsync_checkpoint_age_seconds", &pattern);
    assert!(
        age >= t0 - stored - 0.5 && age <= t1 - stored + 0.5,
        "idle: age {age}, stored {stored}, now {t0}"
    );

    // A second replica of the same stream stands by: ready, lease_held 0, no checkpoint age.
    let mut spec = DaemonSpec::new(&event_db, &app_db, "items");
    spec.holder = "test-standby".into();
    let standby = Daemon::start(&spec);
    let ready = wait_ready(&standby, Duration::from_secs(60)).await;
    // Ready means every stream started: this one waits for the lease.
    assert_eq!(ready["streams"][&stream]["role"], "standing_by", "{ready}");
    let text = scrape(&standby).await;
    let p = &parse_expositions(&[text])[0];
    check_conventions(p);
    assert_eq!(sum(p, "eventsync_lease_held", &[("stream", st)]), Some(0.0));
    assert_eq!(
        sum(p, "eventsync_lease_acquisitions_total", &[("stream", st)]),
        Some(0.0)
    );
    for g in [
        "eventsync_checkpoint_age_seconds",
        "eventsync_change_stream_lag_seconds",
        "eventsync_replication_lag_seconds",
    ] {
        assert_eq!(
            sum(p, g, &[("stream", st)]),
            None,
            "a standby exports no {g}"
        );
    }
    assert_eq!(
        sum(
            &parse_expositions(&[scrape(&daemon).await])[0],
            "eventsync_lease_held",
            &[("stream", st)]
        ),
        Some(1.0),
        "the first replica keeps the lease"
    );
    drop(standby);
    drop(daemon);
}

fn password_uri(password: &str) -> String {
    let uri = mongo_uri();
    let (scheme, rest) = uri.split_once("://").expect("URI with scheme");
    assert!(!rest.contains('@'), "test URI already has credentials");
    format!("{scheme}://eventsync:{password}@{rest}")
}

async fn send_with_token(d: &Daemon, token: &str) {
    let c = http();
    for path in ["/v1/streams", "/v1/clients", "/v1/no-such-route"] {
        let _ = c
            .get(format!("{}{path}", d.sync_url()))
            .bearer_auth(token)
            .send()
            .await;
        let _ = c
            .get(format!("{}{path}", d.sync_url()))
            .bearer_auth("not-the-token-but-long-enough")
            .send()
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_in_logs_even_when_authentication_fails() {
    const PASSWORD: &str = "s3cretpw-QX7";
    const TOKEN: &str = "tok-7f1c9e0b2a4d4e6f-SECRET";
    let app_db = unique_db("opss_app");
    let event_db = unique_db("opss_log");
    let mut spec = DaemonSpec::new(&event_db, &app_db, "items");
    spec.uri = password_uri(PASSWORD);
    spec.tokens = vec![TOKEN.into()];
    let mut daemon = Daemon::start(&spec);
    // The test server does not authenticate: the daemon logs its start (with the URI) and
    // then keeps failing to prepare its database, logging each error.
    wait_for(
        "start-up and a first outcome",
        Duration::from_secs(30),
        || {
            let log = daemon.log_text();
            async move {
                (log.contains("starting eventsyncd")
                    && (log.contains("cannot prepare the daemon database")
                        || log.contains("eventsyncd running")))
                .then_some(())
            }
        },
    )
    .await;
    send_with_token(&daemon, TOKEN).await;
    let (status, ready) = get(&format!("{}/readyz", daemon.ops_url()))
        .await
        .expect("/readyz answers");
    let metrics_text = scrape(&daemon).await;
    daemon.terminate(Duration::from_secs(15));
    let log = daemon.log_text();
    assert!(
        log.contains("eventsync:***@"),
        "the start-up line shows the redacted URI:\n{log}"
    );
    assert!(
        !log.contains('\x1b'),
        "no terminal colours in a log file:\n{log}"
    );
    for (what, text) in [
        ("log", &log),
        ("/readyz", &ready),
        ("/metrics", &metrics_text),
    ] {
        assert!(
            !text.contains(PASSWORD),
            "{what} leaks the password:\n{text}"
        );
        assert!(!text.contains(TOKEN), "{what} leaks the token:\n{text}");
    }
    if log.contains("cannot prepare the daemon database") {
        // MongoDB unusable (authentication refused): not ready.
        assert_eq!(status, 503, "{ready}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_logs_parse_and_carry_no_token() {
    const TOKEN: &str = "tok-0d9a7c3e5b1f4a2c-SECRET";
    let client = client().await;
    let app_db = unique_db("opsj_app");
    let event_db = unique_db("opsj_log");
    let coll = client.database(&app_db).collection::<Document>("items");
    let stream = format!("{app_db}.items");
    let mut spec = DaemonSpec::new(&event_db, &app_db, "items");
    spec.tokens = vec![TOKEN.into()];
    spec.log_format = "json".into();
    let mut daemon = Daemon::start(&spec);
    wait_ready(&daemon, Duration::from_secs(60)).await;
    coll.insert_one(doc! { "_id": 1, "a": 1 }).await.unwrap();
    wait_for("the event", Duration::from_secs(30), || {
        let (client, event_db, stream) = (client.clone(), event_db.clone(), stream.clone());
        async move { (!read_log(&client, &event_db, &stream).await.is_empty()).then_some(()) }
    })
    .await;
    send_with_token(&daemon, TOKEN).await;
    // The sync API's requests are counted by route template, method and status.
    let p = &parse_expositions(&[scrape(&daemon).await])[0];
    check_conventions(p);
    let ok = sum(
        p,
        "eventsync_http_requests_total",
        &[
            ("route", "/v1/streams"),
            ("method", "GET"),
            ("status", "200"),
        ],
    );
    assert!(ok.unwrap_or(0.0) >= 1.0, "no 200 on /v1/streams counted");
    let refused: f64 = p
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["name"] == "eventsync_http_requests")
        .flat_map(|f| f["samples"].as_array().unwrap().iter())
        .filter(|s| {
            s["labels"]["status"]
                .as_str()
                .is_some_and(|c| c.starts_with('4'))
        })
        .map(|s| s["value"].as_f64().unwrap())
        .sum();
    assert!(
        refused >= 3.0,
        "wrong tokens must be counted as 4xx, got {refused}"
    );
    assert!(
        sum(
            p,
            "eventsync_http_request_duration_seconds_count",
            &[("route", "/v1/streams")]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    let status = daemon.terminate(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "clean exit: {status:?}"
    );
    let log = daemon.log_text();
    assert!(!log.contains(TOKEN), "the log leaks the token:\n{log}");

    let mut lines: Vec<BTreeMap<String, Value>> = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: BTreeMap<String, Value> = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        for key in ["timestamp", "level", "target"] {
            assert!(v.contains_key(key), "no {key:?} in {line}");
        }
        lines.push(v);
    }
    assert!(lines.len() >= 3, "too few log lines:\n{log}");
    let start = lines
        .iter()
        .find(|l| l.get("message").and_then(Value::as_str) == Some("starting eventsyncd"))
        .expect("start-up line");
    assert_eq!(start["level"], "INFO");
    assert!(start.contains_key("uri"), "fields are flattened: {start:?}");
    // Lines of a stream carry its span.
    assert!(
        lines.iter().any(|l| {
            l.get("message").and_then(Value::as_str) == Some("lease acquired; consuming")
                && l.get("span")
                    .and_then(|s| s.get("stream"))
                    .and_then(Value::as_str)
                    == Some(stream.as_str())
        }),
        "no stream span on the lease line:\n{log}"
    );
    assert_eq!(
        lines
            .last()
            .and_then(|l| l.get("message"))
            .and_then(Value::as_str),
        Some("eventsyncd stopped")
    );
}

#[tokio::test]
async fn liveness_answers_while_mongodb_is_unreachable() {
    // A liveness probe must not restart a daemon that only waits for its database; the
    // readiness probe keeps it out of the Service meanwhile.
    let port = free_port();
    let app_db = unique_db("opsh_app");
    let mut spec = DaemonSpec::new(&unique_db("opsh_log"), &app_db, "items");
    spec.uri = format!("mongodb://127.0.0.1:{port}/?directConnection=true");
    let daemon = Daemon::start(&spec);
    let started = Instant::now();
    let (status, _) = wait_for("/healthz", Duration::from_secs(20), || {
        let url = format!("{}/healthz", daemon.ops_url());
        async move { get(&url).await }
    })
    .await;
    assert_eq!(status, 200);
    assert!(started.elapsed() < Duration::from_secs(10));
    let (status, body) = get(&format!("{}/readyz", daemon.ops_url())).await.unwrap();
    assert_eq!(status, 503, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], false);
    assert_eq!(v["mongodb"], false);
    assert!(
        v["problems"].to_string().contains("mongodb unreachable"),
        "{v}"
    );
    // The failed attempts are counted.
    wait_for("a startup error", Duration::from_secs(30), || {
        let daemon = &daemon;
        async move {
            let text = scrape(daemon).await;
            (raw_sum(&text, "eventsync_errors_total", "component=\"startup\"") >= 1.0).then_some(())
        }
    })
    .await;
    let p = &parse_expositions(&[scrape(&daemon).await])[0];
    check_conventions(p);
    assert!(sum(p, "eventsync_errors_total", &[("component", "startup")]).unwrap() >= 1.0);
    assert_eq!(sum(p, "eventsync_ready", &[]), Some(0.0));
    assert_eq!(sum(p, "eventsync_mongodb_reachable", &[]), Some(0.0));
    assert_eq!(
        get(&format!("{}/healthz", daemon.ops_url()))
            .await
            .unwrap()
            .0,
        200
    );
}
