//! Network and server faults during a write load, each ending with a complete, gap-free
//! log that replays to MongoDB's state:
//!
//! * a TCP proxy between the daemon and the server cuts every connection, delays all
//!   traffic and refuses connections for a while (shorter and longer than the lease);
//! * the server itself is killed (`kill -9`) and restarted on the same port with the same
//!   (file-backed) data directory, then stopped and restarted gracefully.
//!
//! The writers talk to the server directly and ignore their own errors: the log only has
//! to match whatever MongoDB holds in the end.

mod common;
#[path = "common/proxy.rs"]
mod proxy;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::{doc, Document};
use common::*;
use proxy::{upstream_of, Proxy};
use rand::Rng;

/// A writer that never panics: thin-client upserts, edits, operator updates and deletes,
/// plus unstamped updates and replaces, on documents `0..docs`, until `stop` is set;
/// errors (the server is away) are skipped. Returns the writes that succeeded.
async fn tolerant_load(
    coll: mongodb::Collection<Document>,
    writer: usize,
    stop: Arc<AtomicBool>,
    docs: i32,
    pause: Duration,
) -> usize {
    let client = eventsync::client::SyncCollection::<Document>::new(
        coll.clone(),
        eventsync::client::ClientOptions::new(format!("writer-{writer}")).max_retries(50),
    )
    .expect("client");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(writer as u64);
    let mut ok = 0;
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let id = rng.gen_range(0..docs);
        let done = match rng.gen_range(0..10) {
            0..=1 => client
                .find_one_and_upsert(
                    doc! { "_id": id, "n": 0_i32, "w": writer as i64, "tags": ["a"] },
                )
                .await
                .is_ok(),
            2..=5 => client
                .find_one_and_update(id, |d| {
                    let n = d.get_i32("n").unwrap_or(0);
                    d.insert("n", n + 1);
                    d.insert("last", format!("writer-{writer}-{i}"));
                })
                .await
                .is_ok(),
            6 => client
                .update_one(
                    id,
                    doc! { "$inc": { "n": 10 }, "$push": { "tags": i as i64 } },
                )
                .await
                .is_ok(),
            7 => client.delete_one(id, None).await.is_ok(),
            8 => coll
                .update_one(doc! { "_id": id }, doc! { "$set": { "raw": i as i64 } })
                .await
                .is_ok(),
            _ => coll
                .replace_one(
                    doc! { "_id": id },
                    doc! { "replaced": true, "by": writer as i64 },
                )
                .await
                .is_ok(),
        };
        ok += usize::from(done);
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    ok
}

/// A client that gives up quickly while the server is away.
/// Stops the writers, adds a sentinel write after the last fault (it must reach the log
/// too: the stream did not stall), and waits until the log replays to the collection.
/// Returns the number of writes and the log.
async fn stop_load_and_converge(
    stop: Arc<AtomicBool>,
    writers: Vec<tokio::task::JoinHandle<usize>>,
    client: &mongodb::Client,
    event_db: &str,
    coll: &mongodb::Collection<Document>,
    sentinel: &str,
    timeout: Duration,
) -> (usize, Vec<eventsync::mongo::events::EventRecord>) {
    stop.store(true, Ordering::Relaxed);
    let mut writes = 0;
    for w in writers {
        writes += w.await.expect("writer");
    }
    coll.insert_one(doc! { "_id": sentinel, "version": 1_i64 })
        .await
        .expect("sentinel write");
    let events = wait_converged(client, event_db, coll, timeout).await;
    (writes, events)
}

async fn impatient_client(uri: &str) -> mongodb::Client {
    let mut opts = mongodb::options::ClientOptions::parse(uri)
        .await
        .expect("URI");
    opts.server_selection_timeout = Some(Duration::from_secs(2));
    opts.connect_timeout = Some(Duration::from_secs(2));
    mongodb::Client::with_options(opts).expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_delayed_and_refused_connections_lose_nothing() {
    let started = Instant::now();
    let client = client().await;
    let (app_db, event_db) = (unique_db("net_app"), unique_db("net_log"));
    let coll = client.database(&app_db).collection::<Document>("items");
    let stream = format!("{app_db}.items");
    let proxy = Proxy::start(upstream_of(&mongo_uri())).await;
    let mut spec = DaemonSpec::new(&event_db, &app_db, "items");
    spec.uri = proxy.uri_for(&mongo_uri());
    let mut daemon = Daemon::start(&spec);
    wait_streaming(&client, &event_db, &stream).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            tokio::spawn(tolerant_load(
                coll.clone(),
                w,
                stop.clone(),
                15,
                Duration::from_millis(5),
            ))
        })
        .collect();

    // Faults while the load runs.
    let accepted_before = proxy.accepted();
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.cut_all();
    tokio::time::sleep(Duration::from_millis(600)).await;
    proxy.set_delay(Duration::from_millis(40));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    proxy.cut_all();
    tokio::time::sleep(Duration::from_millis(800)).await;
    proxy.set_delay(Duration::ZERO);
    // Unreachable for less than the lease TTL: the lease survives.
    proxy.set_refusing(true);
    proxy.cut_all();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    proxy.set_refusing(false);
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Unreachable for longer than the lease TTL: the daemon stops consuming before the
    // lease lapses and takes it again when the server is back.
    proxy.set_refusing(true);
    proxy.cut_all();
    tokio::time::sleep(Duration::from_millis(spec.lease_ttl_ms + 1000)).await;
    proxy.set_refusing(false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.cut_all();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (writes, events) = stop_load_and_converge(
        stop,
        writers,
        &client,
        &event_db,
        &coll,
        "after-faults",
        Duration::from_secs(60),
    )
    .await;
    assert!(
        daemon.running(),
        "the daemon must survive network faults\n{}",
        daemon.log_text()
    );
    assert!(
        proxy.accepted() > accepted_before,
        "the daemon reconnected through the proxy"
    );
    assert!(
        events.len() > 100,
        "load too small: {} events",
        events.len()
    );
    let errors = metric_sum(&daemon, "eventsync_errors_total").await;
    let log = daemon.log_text();
    println!(
        "network faults: {writes} writes, {} events, {} connections, {errors} errors counted, \
         {} stream restarts, {} lease acquisitions, {:?}",
        events.len(),
        proxy.accepted(),
        log.matches("restarting from the checkpoint").count(),
        log.matches("lease acquired").count(),
        started.elapsed()
    );
    daemon.kill9();
}

/// One nx-27017 server on `port` with its data in `dir`, through the test-env launcher.
fn launch_server(port: u16, dir: &std::path::Path) -> Child {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/testenv/launch_server.sh"
    );
    Command::new(script)
        .arg(port.to_string())
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("launch_server.sh")
}

async fn wait_ping(uri: &str) {
    let c = impatient_client(uri).await;
    wait_for("the restarted server", Duration::from_secs(60), || {
        let c = c.clone();
        async move {
            c.database("admin")
                .run_command(doc! { "ping": 1 })
                .await
                .ok()
                .map(|_| ())
        }
    })
    .await;
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_restarts_during_load_lose_nothing() {
    let started = Instant::now();
    let port = free_port();
    let dir = TempDir::new("fault");
    let mut server = Server(launch_server(port, dir.path()));
    let uri = format!("mongodb://127.0.0.1:{port}/?directConnection=true");
    wait_ping(&uri).await;

    let client = impatient_client(&uri).await;
    let (app_db, event_db) = (unique_db("restart_app"), unique_db("restart_log"));
    let coll = client.database(&app_db).collection::<Document>("items");
    let stream = format!("{app_db}.items");
    let mut spec = DaemonSpec::new(&event_db, &app_db, "items");
    spec.uri = uri.clone();
    let mut daemon = Daemon::start(&spec);
    wait_streaming(&client, &event_db, &stream).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            tokio::spawn(tolerant_load(
                coll.clone(),
                w,
                stop.clone(),
                12,
                Duration::from_millis(5),
            ))
        })
        .collect();
    let mut rng = rand::thread_rng();

    // kill -9 and restart at once on the same port and data.
    tokio::time::sleep(Duration::from_millis(rng.gen_range(600..1200))).await;
    let _ = server.0.kill();
    let _ = server.0.wait();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server = Server(launch_server(port, dir.path()));
    wait_ping(&uri).await;

    // Down for longer than the lease TTL, then a graceful stop and restart.
    tokio::time::sleep(Duration::from_millis(rng.gen_range(600..1200))).await;
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(server.0.id().to_string())
        .status();
    let _ = server.0.wait();
    tokio::time::sleep(Duration::from_millis(spec.lease_ttl_ms + 500)).await;
    server = Server(launch_server(port, dir.path()));
    wait_ping(&uri).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (writes, events) = stop_load_and_converge(
        stop,
        writers,
        &client,
        &event_db,
        &coll,
        "after-restarts",
        Duration::from_secs(90),
    )
    .await;
    assert!(
        daemon.running(),
        "the daemon must survive server restarts\n{}",
        daemon.log_text()
    );
    assert!(events.len() > 50, "load too small: {} events", events.len());
    let log = daemon.log_text();
    println!(
        "server restarts: {writes} writes, {} events, {} stream restarts, {} lease acquisitions, {:?}",
        events.len(),
        log.matches("restarting from the checkpoint").count(),
        log.matches("lease acquired").count(),
        started.elapsed()
    );
    daemon.kill9();
    drop(server);
    drop(dir);
}
