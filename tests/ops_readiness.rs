//! Readiness follows MongoDB: a daemon on a private test server turns not-ready within
//! seconds of the server stopping, stays alive (liveness), and turns ready again, and
//! consumes again, when the server comes back on the same port and data.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bson::{doc, Document};
use common::*;
use serde_json::Value;

/// One nx-27017 server started by `scripts/testenv/launch_server.sh` (which exec's into
/// the server, so the child is the server); killed when dropped.
struct Server {
    child: Child,
}

impl Server {
    fn start(port: u16, data: &Path, log: &Path) -> Server {
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/testenv/launch_server.sh");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("server log");
        let child = Command::new("bash")
            .arg(script)
            .arg(port.to_string())
            .arg(data)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start launch_server.sh");
        Server { child }
    }

    fn stop(&mut self) {
        // SIGTERM (a clean stop keeps the data files tidy), then SIGKILL after a while.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

async fn ping(uri: &str) -> Option<()> {
    let mut opts = mongodb::options::ClientOptions::parse(uri).await.ok()?;
    opts.server_selection_timeout = Some(Duration::from_millis(500));
    opts.connect_timeout = Some(Duration::from_millis(500));
    let c = mongodb::Client::with_options(opts).ok()?;
    c.database("admin")
        .run_command(doc! { "ping": 1 })
        .await
        .ok()
        .map(|_| ())
}

async fn wait_server(uri: &str, log: &Path) {
    let start = Instant::now();
    while ping(uri).await.is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            panic!(
                "test server {uri} did not answer within 60 s; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn readyz(d: &Daemon) -> Option<(u16, Value)> {
    let r = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap()
        .get(format!("{}/readyz", d.ops_url()))
        .send()
        .await
        .ok()?;
    let status = r.status().as_u16();
    Some((status, r.json().await.ok()?))
}

async fn healthz(d: &Daemon) -> Option<u16> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap()
        .get(format!("{}/healthz", d.ops_url()))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

async fn metrics_text(d: &Daemon) -> String {
    reqwest::get(format!("{}/metrics", d.ops_url()))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("scrape body")
}

async fn wait_readyz(d: &Daemon, want: u16, timeout: Duration) -> (Duration, Value) {
    let start = Instant::now();
    loop {
        if let Some((status, body)) = readyz(d).await {
            if status == want {
                return (start.elapsed(), body);
            }
        }
        if start.elapsed() > timeout {
            panic!(
                "/readyz did not turn {want} within {timeout:?}: {:?}\n--- daemon log ---\n{}",
                readyz(d).await,
                d.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_events(client: &mongodb::Client, event_db: &str, stream: &str, n: usize) {
    wait_for("events in the log", Duration::from_secs(60), || {
        let (client, event_db, stream) = (client.clone(), event_db.to_owned(), stream.to_owned());
        async move { (read_log(&client, &event_db, &stream).await.len() >= n).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_follows_mongodb_down_and_up() {
    let dir = TempDir::new("ready");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let server_log = dir.join("server.log");
    let port = free_port();
    let uri = format!("mongodb://127.0.0.1:{port}/?directConnection=true");
    let mut server = Server::start(port, &data, &server_log);
    wait_server(&uri, &server_log).await;

    let client = client_for(&uri).await;
    let app_db = unique_db("opsr_app");
    let event_db = unique_db("opsr_log");
    let coll = client.database(&app_db).collection::<Document>("items");
    let stream = format!("{app_db}.items");
    coll.insert_one(doc! { "_id": 1, "v": 1 }).await.unwrap();

    let mut spec = DaemonSpec::new(&event_db, &app_db, "items");
    spec.uri = uri.clone();
    let daemon = Daemon::start(&spec);
    let (_, body) = wait_readyz(&daemon, 200, Duration::from_secs(60)).await;
    assert_eq!(body["mongodb"], true, "{body}");
    coll.insert_one(doc! { "_id": 2, "v": 1 }).await.unwrap();
    wait_events(&client, &event_db, &stream, 2).await;

    // MongoDB goes away: not ready within a few seconds; still alive.
    server.stop();
    let (took, body) = wait_readyz(&daemon, 503, Duration::from_secs(10)).await;
    assert_eq!(body["ready"], false, "{body}");
    assert_eq!(body["mongodb"], false, "{body}");
    assert!(
        took < Duration::from_secs(5),
        "not-ready only after {took:?}"
    );
    assert_eq!(
        healthz(&daemon).await,
        Some(200),
        "liveness must not follow MongoDB"
    );
    // It stays not ready while the server is down, long enough for the change stream to
    // give up (server selection times out after 5 s) and the stream to restart.
    let down = Instant::now();
    let mut roles = std::collections::BTreeSet::new();
    while down.elapsed() < Duration::from_secs(8) {
        let (status, body) = readyz(&daemon).await.expect("/readyz answers");
        assert_eq!(status, 503, "ready while MongoDB is down: {body}");
        if let Some(role) = body["streams"][&stream]["role"].as_str() {
            roles.insert(role.to_owned());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("stream roles while MongoDB was down: {roles:?}");
    assert_eq!(healthz(&daemon).await, Some(200));
    let text = metrics_text(&daemon).await;
    for line in ["eventsync_ready 0", "eventsync_mongodb_reachable 0"] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
    }

    // MongoDB returns on the same port and data: ready again, and consuming again.
    let _server = Server::start(port, &data, &server_log);
    wait_server(&uri, &server_log).await;
    let (took, body) = wait_readyz(&daemon, 200, Duration::from_secs(60)).await;
    assert_eq!(body["mongodb"], true, "{body}");
    assert_eq!(body["streams"][&stream]["role"], "consuming", "{body}");
    eprintln!("ready again {took:?} after the server answered");
    let client = client_for(&uri).await;
    let coll = client.database(&app_db).collection::<Document>("items");
    coll.insert_one(doc! { "_id": 3, "v": 1 }).await.unwrap();
    wait_events(&client, &event_db, &stream, 3).await;
    let text = metrics_text(&daemon).await;
    for line in ["eventsync_ready 1", "eventsync_mongodb_reachable 1"] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
    }
    let events = read_log(&client, &event_db, &stream).await;
    let replayed = replay(&events);
    assert_eq!(replayed.len(), 3, "{events:?}");

    drop(daemon);
    drop(_server);
    drop(dir);
}

/// Once ready, the daemon says so in its log, with where the sync API, the OpenAPI
/// document, the metrics and `/readyz` are, and which streams it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_says_when_the_daemon_is_ready_and_where_everything_is() {
    let (app_db, event_db) = (unique_db("readylog_app"), unique_db("readylog_log"));
    let daemon = Daemon::start(&DaemonSpec::new(&event_db, &app_db, "items"));
    wait_readyz(&daemon, 200, Duration::from_secs(60)).await;
    let sync = daemon.sync_url();
    let ops = daemon.ops_url();
    let line = wait_for("the ready line", Duration::from_secs(10), || {
        let log = daemon.log_text();
        async move {
            log.lines()
                .find(|l| l.contains("eventsyncd ready"))
                .map(str::to_owned)
        }
    })
    .await;
    for want in [
        format!("{sync}/v1"),
        format!("{sync}/v1/openapi.json"),
        format!("{ops}/metrics"),
        format!("{ops}/readyz"),
        format!("{app_db}.items"),
    ] {
        assert!(
            line.contains(&want),
            "`{want}` missing from the ready line: {line}"
        );
    }
    assert_eq!(
        daemon.log_text().matches("eventsyncd ready").count(),
        1,
        "said once"
    );
    let client = client().await;
    client.database(&app_db).drop().await.unwrap();
    client.database(&event_db).drop().await.unwrap();
}
