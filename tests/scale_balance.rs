//! Balanced leases end to end: three `eventsyncd` processes share twelve streams under a
//! write load — four each; one is killed (`kill -9`) and the two others take its streams
//! (six each) within the lease TTL + 5 s; it comes back and the streams are handed back
//! (four each). Throughout, every stream's log stays exact: dense unique positions,
//! gap-free chains, and a replay equal to MongoDB.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::{doc, Document};
use common::*;

const STREAMS: usize = 12;
const TTL_MS: u64 = 4_000;
const RENEW_MS: u64 = 500;

fn expect(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(h, n)| (h.to_string(), *n)).collect()
}

/// Waits (bounded) until the live leases are spread exactly as `want`.
async fn wait_spread(
    client: &mongodb::Client,
    event_db: &str,
    want: &BTreeMap<String, usize>,
    timeout: Duration,
    what: &str,
) -> Duration {
    let start = Instant::now();
    let mut last = BTreeMap::new();
    loop {
        let held = live_leases_by_holder(client, event_db).await;
        if &held == want {
            return start.elapsed();
        }
        if held != last {
            eprintln!("{:>6} ms  {what}: {held:?}", start.elapsed().as_millis());
            last = held;
        }
        assert!(
            start.elapsed() < timeout,
            "{what}: leases spread as {last:?} after {timeout:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spec(event_db: &str, db: &str, holder: &str) -> DaemonSpec {
    let mut s = DaemonSpec::new(event_db, db, "c00");
    s.streams = (0..STREAMS)
        .map(|i| (db.to_owned(), format!("c{i:02}")))
        .collect();
    s.lease_ttl_ms = TTL_MS;
    s.lease_renew_ms = RENEW_MS;
    s.holder = holder.to_owned();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_share_twelve_streams_and_rebalance() {
    let client = client().await;
    let event_db = unique_db("scale_ev");
    let db = unique_db("scale_src");
    let colls: Vec<mongodb::Collection<Document>> = (0..STREAMS)
        .map(|i| client.database(&db).collection(&format!("c{i:02}")))
        .collect();
    for c in &colls {
        c.insert_one(doc! { "_id": -1, "seed": true })
            .await
            .expect("seed");
    }

    // A write load over every collection, throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for w in 0..2usize {
        let colls = colls.clone();
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let mut round = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let c = colls[(round * 3 + w) % colls.len()].clone();
                mixed_load(c, w * 1000 + round, 6, 15).await;
                round += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            round
        }));
    }

    let names = ["bal-r0", "bal-r1", "bal-r2"];
    let mut daemons: Vec<Daemon> = names
        .iter()
        .map(|h| Daemon::start(&spec(&event_db, &db, h)))
        .collect();

    let took = wait_spread(
        &client,
        &event_db,
        &expect(&[("bal-r0", 4), ("bal-r1", 4), ("bal-r2", 4)]),
        Duration::from_secs(90),
        "three replicas",
    )
    .await;
    eprintln!("balanced 4/4/4 after {took:?}");
    // No flapping: the spread holds while nothing changes (a bounded observation).
    let handed = metric_sum(
        &daemons[0],
        "eventsync_rebalances_total{kind=\"handed_over\"}",
    )
    .await
        + metric_sum(
            &daemons[1],
            "eventsync_rebalances_total{kind=\"handed_over\"}",
        )
        .await
        + metric_sum(
            &daemons[2],
            "eventsync_rebalances_total{kind=\"handed_over\"}",
        )
        .await;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            live_leases_by_holder(&client, &event_db).await,
            expect(&[("bal-r0", 4), ("bal-r1", 4), ("bal-r2", 4)]),
            "the spread must hold while no replica comes or goes"
        );
    }
    let handed_after = metric_sum(
        &daemons[0],
        "eventsync_rebalances_total{kind=\"handed_over\"}",
    )
    .await
        + metric_sum(
            &daemons[1],
            "eventsync_rebalances_total{kind=\"handed_over\"}",
        )
        .await
        + metric_sum(
            &daemons[2],
            "eventsync_rebalances_total{kind=\"handed_over\"}",
        )
        .await;
    assert_eq!(handed, handed_after, "no hand-over while balanced");
    for d in &daemons {
        assert_eq!(metric_sum(d, "eventsync_streams_held ").await, 4.0);
    }

    // kill -9 one replica: the two others hold six each within TTL + 5 s.
    daemons[2].kill9();
    let took = wait_spread(
        &client,
        &event_db,
        &expect(&[("bal-r0", 6), ("bal-r1", 6)]),
        Duration::from_millis(TTL_MS + 5_000),
        "after kill -9",
    )
    .await;
    eprintln!("taken over 6/6 after {took:?} (TTL {TTL_MS} ms)");

    // It comes back (same holder id): back to four each.
    daemons[2] = Daemon::start(&spec(&event_db, &db, names[2]));
    let took = wait_spread(
        &client,
        &event_db,
        &expect(&[("bal-r0", 4), ("bal-r1", 4), ("bal-r2", 4)]),
        Duration::from_secs(60),
        "after restart",
    )
    .await;
    eprintln!("re-balanced 4/4/4 after {took:?}");

    stop.store(true, Ordering::Relaxed);
    let mut rounds = 0;
    for l in load {
        rounds += l.await.expect("load task");
    }
    eprintln!("load: {rounds} rounds of 6 writes");

    // Every stream's log: dense unique positions, gap-free chains, replay == MongoDB.
    let mut total = 0;
    for c in &colls {
        let events = wait_converged(&client, &event_db, c, Duration::from_secs(90)).await;
        let mut seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        seqs.dedup();
        assert_eq!(seqs.len(), events.len(), "a position served twice");
        total += events.len();
    }
    eprintln!("{total} events over {STREAMS} streams");
    for d in &daemons {
        let log = d.log_text();
        assert!(!log.contains("panicked"), "daemon panicked:\n{log}");
    }
    let handed = metric_sum(
        &daemons[0],
        "eventsync_rebalances_total{kind=\"handed_over\"}",
    )
    .await
        + metric_sum(
            &daemons[1],
            "eventsync_rebalances_total{kind=\"handed_over\"}",
        )
        .await;
    // Two each when nothing else happens; a survivor's stream whose run stopped on an
    // error during the re-balance may be claimed by the newcomer directly instead (the
    // spread above is the invariant; this checks hand-overs did take place).
    assert!(
        handed >= 2.0,
        "the survivors handed streams back gracefully: {handed}"
    );
}
