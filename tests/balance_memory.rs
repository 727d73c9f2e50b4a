//! Balanced leases, deterministically: three replicas (balancer + one simulated worker
//! per stream each) over twelve streams on the in-memory store, stepped one renewal
//! period at a time on the store's clock. A replica joins, dies and comes back; the
//! spread follows the fair share, never two holders of one stream, no flapping.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use eventsync::pipeline::balance::{refresh, Balancer, Slot};
use eventsync::pipeline::memory_store::MemoryStore;
use eventsync::pipeline::store::LogStore;

const TTL: Duration = Duration::from_millis(4_000);
const RENEW: Duration = Duration::from_millis(500);
const GRACE: u64 = 16;

struct Replica {
    id: String,
    balancer: Arc<Balancer>,
    /// Streams consumed: the slot and the lease epoch.
    held: BTreeMap<String, (Slot, i64)>,
    handed_over: usize,
}

impl Replica {
    fn new(id: &str, streams: &[String]) -> Self {
        Replica {
            id: id.into(),
            balancer: Balancer::new(id, streams.iter().cloned(), GRACE),
            held: BTreeMap::new(),
            handed_over: 0,
        }
    }

    /// One renewal period of this replica: membership refresh, then every stream's
    /// worker: renew (or notice the loss), hand over between batches, or try to claim.
    async fn step(&mut self, store: &MemoryStore, streams: &[String]) {
        refresh(store, &self.balancer, TTL).await.expect("refresh");
        for s in streams {
            if let Some((_, epoch)) = self.held.get(s) {
                let epoch = *epoch;
                if !store
                    .renew_lease(s, &self.id, epoch, TTL)
                    .await
                    .expect("renew")
                {
                    self.held.remove(s);
                } else if self.balancer.should_yield(s) {
                    // The run stopped after its batch; only then is the lease released.
                    store
                        .release_lease(s, &self.id, epoch)
                        .await
                        .expect("release");
                    self.held.remove(s);
                    self.handed_over += 1;
                }
            } else if let Some(slot) = self.balancer.claim(s) {
                if let Some(h) = store
                    .acquire_lease(s, &self.id, TTL)
                    .await
                    .expect("acquire")
                {
                    self.held.insert(s.clone(), (slot, h.epoch));
                }
            }
        }
    }
}

fn spread(replicas: &[&Replica]) -> Vec<usize> {
    replicas.iter().map(|r| r.held.len()).collect()
}

/// No stream consumed by two replicas, and every live replica holds what its balancer counts.
fn check_exclusive(replicas: &[&Replica]) {
    let mut owner: BTreeMap<&str, &str> = BTreeMap::new();
    for r in replicas {
        for s in r.held.keys() {
            if let Some(other) = owner.insert(s, &r.id) {
                panic!("{s} consumed by {other} and {}", r.id);
            }
        }
        assert_eq!(
            r.balancer.held(),
            r.held.len(),
            "{}: slots = streams held",
            r.id
        );
    }
}

#[tokio::test]
async fn replicas_join_die_and_return_on_the_fair_share() {
    let store = MemoryStore::new();
    let streams: Vec<String> = (0..12).map(|i| format!("db.c{i:02}")).collect();
    let mut a = Replica::new("a", &streams);
    let mut b = Replica::new("b", &streams);
    let mut c = Replica::new("c", &streams);

    // a alone: it takes everything.
    for _ in 0..4 {
        a.step(&store, &streams).await;
        store.advance_clock(RENEW);
    }
    assert_eq!(spread(&[&a]), vec![12]);

    // b and c join: one stream handed over per replica per period, down to four each.
    let mut rounds = 0;
    while spread(&[&a, &b, &c]) != vec![4, 4, 4] {
        a.step(&store, &streams).await;
        b.step(&store, &streams).await;
        c.step(&store, &streams).await;
        check_exclusive(&[&a, &b, &c]);
        store.advance_clock(RENEW);
        rounds += 1;
        assert!(
            rounds < 40,
            "not balanced after {rounds} periods: {:?}",
            spread(&[&a, &b, &c])
        );
    }
    assert_eq!(a.handed_over, 8, "a handed over exactly its surplus");

    // Stable: nothing moves while nobody comes or goes.
    for _ in 0..30 {
        a.step(&store, &streams).await;
        b.step(&store, &streams).await;
        c.step(&store, &streams).await;
        check_exclusive(&[&a, &b, &c]);
        assert_eq!(spread(&[&a, &b, &c]), vec![4, 4, 4], "flapping");
        store.advance_clock(RENEW);
    }
    assert_eq!(a.handed_over + b.handed_over + c.handed_over, 8);

    // c dies (no release, no leave): within TTL + a few periods a and b hold six each.
    drop(c);
    let ttl_rounds = (TTL.as_millis() / RENEW.as_millis()) as usize;
    let mut rounds = 0;
    while spread(&[&a, &b]) != vec![6, 6] {
        a.step(&store, &streams).await;
        b.step(&store, &streams).await;
        check_exclusive(&[&a, &b]);
        store.advance_clock(RENEW);
        rounds += 1;
        assert!(
            rounds <= ttl_rounds + 3,
            "not taken over after {rounds} periods: {:?}",
            spread(&[&a, &b])
        );
    }

    // c comes back under the same id: four each again, two hand-overs each.
    let mut c = Replica::new("c", &streams);
    let before = a.handed_over + b.handed_over;
    let mut rounds = 0;
    while spread(&[&a, &b, &c]) != vec![4, 4, 4] {
        a.step(&store, &streams).await;
        b.step(&store, &streams).await;
        c.step(&store, &streams).await;
        check_exclusive(&[&a, &b, &c]);
        store.advance_clock(RENEW);
        rounds += 1;
        assert!(
            rounds < 20,
            "not re-balanced after {rounds} periods: {:?}",
            spread(&[&a, &b, &c])
        );
    }
    assert_eq!(a.handed_over + b.handed_over - before, 4);
    let live = store.live_replicas().await.expect("live");
    assert_eq!(live, vec!["a", "b", "c"]);
}

#[tokio::test]
async fn two_processes_with_one_replica_id_are_reported() {
    let store = MemoryStore::new();
    let streams = ["db.c".to_owned()];
    let first = Balancer::new("same", streams.iter().cloned(), GRACE);
    let restarted = Balancer::new("same", streams.iter().cloned(), GRACE);
    // A restart under the same id finds its previous life's heartbeat: not a duplicate.
    refresh(&store, &first, TTL).await.expect("refresh");
    refresh(&store, &restarted, TTL).await.expect("refresh");
    assert!(!restarted.duplicate_seen(), "first refresh of a new life");
    // The previous life is gone: nobody else writes the heartbeat.
    store.advance_clock(RENEW);
    refresh(&store, &restarted, TTL).await.expect("refresh");
    assert!(!restarted.duplicate_seen());
    // But two live processes with one id overwrite each other's heartbeat.
    store.advance_clock(RENEW);
    refresh(&store, &first, TTL).await.expect("refresh");
    assert!(first.duplicate_seen(), "first sees the other process");
    refresh(&store, &restarted, TTL).await.expect("refresh");
    assert!(restarted.duplicate_seen(), "and the other sees it");
}
