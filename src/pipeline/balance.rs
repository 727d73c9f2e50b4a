//! Balanced leases: how many streams this replica may hold, when it claims a stream and
//! when it hands one over. The decisions are pure functions of a [`View`] (who is live,
//! who holds what) and are counted in membership refreshes, never in wall time, so they
//! are unit-tested without clocks.
//!
//! - **Fair share**: `⌈streams / live replicas⌉` ([`fair_share`]).
//! - **Claim**: a replica tries a stream's lease only while it holds fewer than its share;
//!   a stream whose lease stayed free for [`Balancer`]'s grace (a number of refreshes
//!   covering the lease TTL) is claimed by anyone, so no stream is left unconsumed when
//!   the view is stale ([`claim_decision`]). Whether the claim succeeds is still decided by
//!   the lease compare-and-swap; the balance only decides whether to *try*.
//! - **Hand-over**: a replica holding more than its share, while another live replica
//!   holds less, yields one stream — at most one per refresh and only after a refresh
//!   that followed its previous yield ([`should_yield`], [`Balancer::should_yield`]). The
//!   stream's run finishes its batch (checkpoint stored), stops, and then the lease is
//!   released with its epoch: the run has stopped writing before anyone else can start.
//!   Holding exactly the share never yields and being at the share never claims, so a
//!   replica coming or going moves only the streams the new share requires (no flapping).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::store::LogStore;
use crate::mongo::lease::LeaseConfig;
use crate::mongo::membership::LeaseView;
use crate::mongo::StoreError;
use crate::ops::metrics;

/// The fair share of `streams` over `replicas` live replicas: `⌈streams / replicas⌉`
/// (all of them when no replica is known).
pub fn fair_share(streams: usize, replicas: usize) -> usize {
    streams.div_ceil(replicas.max(1))
}

/// What the cluster looks like from one replica, at one membership refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// This replica.
    pub me: String,
    /// Live replicas (this one included).
    pub live: BTreeSet<String>,
    /// Live leases per holder.
    pub held: BTreeMap<String, usize>,
    /// Streams whose lease is live, with their holder.
    pub leased: BTreeMap<String, String>,
    /// Streams to share out.
    pub streams: usize,
}

impl View {
    /// Builds a view from the stored heartbeats and leases. `me` always counts as live
    /// (its own heartbeat may not be visible yet); leases of streams not in `streams` are
    /// ignored.
    pub fn new(
        me: &str,
        streams: &BTreeSet<String>,
        live: &[String],
        leases: &[LeaseView],
    ) -> Self {
        let mut live: BTreeSet<String> = live.iter().cloned().collect();
        live.insert(me.to_owned());
        let mut held = BTreeMap::new();
        let mut leased = BTreeMap::new();
        for l in leases
            .iter()
            .filter(|l| l.live && streams.contains(&l.stream))
        {
            *held.entry(l.holder.clone()).or_insert(0) += 1;
            leased.insert(l.stream.clone(), l.holder.clone());
        }
        View {
            me: me.to_owned(),
            live,
            held,
            leased,
            streams: streams.len(),
        }
    }

    /// This replica's fair share.
    pub fn share(&self) -> usize {
        fair_share(self.streams, self.live.len())
    }
}

/// A stream's lease in the last view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseSeen {
    /// Expired, released or never taken.
    Free,
    /// Live under this replica's id (a previous life of it, or a run that just ended).
    Mine,
    /// Live under another replica.
    HeldByOther,
}

/// Whether to try a stream's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Under the fair share: try.
    UnderShare,
    /// At or over the share, but the stream's lease stayed free for the grace period: try,
    /// so that no stream is left unconsumed.
    Orphaned,
    /// Stand by.
    Wait,
}

/// Whether a replica holding `mine` streams (claims in progress included) tries a
/// stream's lease that has been free for `free_rounds` refreshes (0 when it is held).
/// A lease another replica holds is not tried at all: a claim that cannot succeed would
/// only occupy a place in the share that a free stream needs.
pub fn claim_decision(
    share: usize,
    mine: usize,
    lease: LeaseSeen,
    free_rounds: u64,
    grace_rounds: u64,
) -> Claim {
    if lease == LeaseSeen::HeldByOther {
        Claim::Wait
    } else if mine < share {
        Claim::UnderShare
    } else if free_rounds > grace_rounds {
        Claim::Orphaned
    } else {
        Claim::Wait
    }
}

/// Whether a replica holding `mine` streams should hand one over: it holds more than its
/// share and another live replica holds less (someone will take it).
pub fn should_yield(view: &View, mine: usize) -> bool {
    let share = view.share();
    mine > share
        && view
            .live
            .iter()
            .any(|r| *r != view.me && view.held.get(r).copied().unwrap_or(0) < share)
}

#[derive(Debug, Default)]
struct Inner {
    /// Another process wrote this replica's heartbeat since the last refresh.
    duplicate: bool,
    view: Option<View>,
    /// Membership refreshes so far.
    rounds: u64,
    /// Streams this replica holds or is claiming.
    mine: BTreeSet<String>,
    /// Consecutive refreshes in which a stream's lease was free.
    free_rounds: HashMap<String, u64>,
    /// The refresh of the last yield.
    yielded_at: Option<u64>,
}

/// One replica's balance state, shared by its stream workers and its membership task.
#[derive(Debug)]
pub struct Balancer {
    me: String,
    /// This process, among processes that might share the replica id by mistake.
    instance: String,
    streams: BTreeSet<String>,
    grace_rounds: u64,
    inner: Mutex<Inner>,
}

/// A stream this replica holds or is claiming; counted in its share until dropped.
#[derive(Debug)]
pub struct Slot {
    balancer: Arc<Balancer>,
    stream: String,
    /// Why it was claimed.
    pub claim: Claim,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.balancer.lock();
        inner.mine.remove(&self.stream);
        metrics().streams_held.set(inner.mine.len() as i64);
    }
}

impl Balancer {
    /// A balancer for replica `me` over `streams`; a free lease is claimed regardless of
    /// the share after `grace_rounds` refreshes.
    pub fn new(
        me: &str,
        streams: impl IntoIterator<Item = String>,
        grace_rounds: u64,
    ) -> Arc<Self> {
        // Unique per balancer (time, random and counter).
        let instance = bson::oid::ObjectId::new().to_hex();
        Arc::new(Self {
            me: me.to_owned(),
            instance,
            streams: streams.into_iter().collect(),
            grace_rounds,
            inner: Mutex::new(Inner::default()),
        })
    }

    /// The grace in refreshes for a lease timing: the refreshes that cover two TTLs
    /// (long enough for a replica under its share, polling every renewal period, to take
    /// a free stream first, even on a slow server).
    pub fn grace_for(lease: &LeaseConfig) -> u64 {
        (2 * lease.ttl_ms).div_ceil(lease.renew_ms.max(1)).max(2)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This replica's id.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The streams shared out.
    pub fn streams(&self) -> &BTreeSet<String> {
        &self.streams
    }

    /// Takes in a membership refresh.
    pub fn update(&self, live: &[String], leases: &[LeaseView]) {
        let view = View::new(&self.me, &self.streams, live, leases);
        let m = metrics();
        m.live_replicas.set(view.live.len() as i64);
        m.fair_share.set(view.share() as i64);
        let mut inner = self.lock();
        for s in &self.streams {
            if view.leased.contains_key(s) {
                inner.free_rounds.remove(s);
            } else {
                *inner.free_rounds.entry(s.clone()).or_insert(0) += 1;
            }
        }
        inner.rounds += 1;
        inner.view = Some(view);
    }

    /// Counts `stream` in this replica's share if it should try its lease now; `None`
    /// means stand by. Nothing is claimed before the first refresh. (Replicas started
    /// together may each see only themselves at first and claim too much: the surplus
    /// is handed over at the next refreshes.)
    pub fn claim(self: &Arc<Self>, stream: &str) -> Option<Slot> {
        let mut inner = self.lock();
        let view = inner.view.as_ref()?;
        let share = view.share();
        let free = inner.free_rounds.get(stream).copied().unwrap_or(0);
        let seen = match view.leased.get(stream) {
            None => LeaseSeen::Free,
            Some(h) if *h == self.me => LeaseSeen::Mine,
            Some(_) => LeaseSeen::HeldByOther,
        };
        let claim = claim_decision(share, inner.mine.len(), seen, free, self.grace_rounds);
        if claim == Claim::Wait || !inner.mine.insert(stream.to_owned()) {
            return None;
        }
        // The stream is being taken: its free time starts again if it is let go.
        inner.free_rounds.remove(stream);
        metrics().streams_held.set(inner.mine.len() as i64);
        Some(Slot {
            balancer: self.clone(),
            stream: stream.to_owned(),
            claim,
        })
    }

    /// Whether `stream` (held by this replica, between two batches) should be handed
    /// over now. True for at most one stream per refresh.
    pub fn should_yield(&self, stream: &str) -> bool {
        let mut inner = self.lock();
        let Some(view) = inner.view.as_ref() else {
            return false;
        };
        if inner.yielded_at.is_some_and(|r| r >= inner.rounds) {
            return false;
        }
        if !should_yield(view, inner.mine.len()) {
            return false;
        }
        inner.yielded_at = Some(inner.rounds);
        // Free from now on: not to be taken back as an orphan before the grace.
        inner.free_rounds.remove(stream);
        true
    }

    /// How many streams this replica holds or claims.
    pub fn held(&self) -> usize {
        self.lock().mine.len()
    }

    /// Whether the last refresh found another process writing this replica's heartbeat.
    pub fn duplicate_seen(&self) -> bool {
        self.lock().duplicate
    }
}

/// One membership refresh: heartbeat, then read the live replicas and the leases.
///
/// A heartbeat that another process overwrote since this one's previous refresh means two
/// processes run with the same replica id (`lease.holder_id`): each would take the other's
/// leases as its own. That is logged as an error and counted
/// (`eventsync_errors_total{component="membership",kind="duplicate_holder_id"}`). The
/// first refresh does not count: the heartbeat may be this replica's previous life's.
pub async fn refresh<S: LogStore>(
    store: &S,
    balancer: &Balancer,
    ttl: Duration,
) -> Result<(), StoreError> {
    let before = store
        .heartbeat(balancer.me(), &balancer.instance, ttl)
        .await?;
    let first = balancer.lock().rounds == 0;
    let duplicate = !first && before.is_some_and(|i| i != balancer.instance);
    if duplicate {
        metrics().error("membership", "duplicate_holder_id");
        tracing::error!(replica = %balancer.me(), "another process runs with this replica id: give each replica a unique lease.holder_id");
    }
    balancer.lock().duplicate = duplicate;
    let live = store.live_replicas().await?;
    let leases = store.lease_views().await?;
    balancer.update(&live, &leases);
    Ok(())
}

/// Refreshes membership every renewal period until `shutdown`, then withdraws the
/// heartbeat so the other replicas take the streams over at once.
pub async fn run_membership<S: LogStore>(
    store: S,
    balancer: Arc<Balancer>,
    lease: LeaseConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failing = false;
    while !*shutdown.borrow() {
        match refresh(&store, &balancer, lease.ttl()).await {
            Ok(()) => {
                if failing {
                    info!("membership refreshed again");
                }
                failing = false;
            }
            Err(e) => {
                metrics().error("membership", e.kind());
                if !failing {
                    warn!(error = %e, replica = %balancer.me(), "cannot refresh membership; keeping the last view");
                }
                failing = true;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(lease.renew()) => {}
            _ = shutdown.changed() => {}
        }
    }
    if let Err(e) = store.leave(balancer.me()).await {
        metrics().error("membership", e.kind());
        warn!(error = %e, "cannot withdraw the heartbeat; it expires on its own");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(stream: &str, holder: &str) -> LeaseView {
        LeaseView {
            stream: stream.into(),
            holder: holder.into(),
            live: true,
        }
    }

    fn names(n: usize) -> BTreeSet<String> {
        (0..n).map(|i| format!("s{i}")).collect()
    }

    #[test]
    fn fair_share_rounds_up() {
        assert_eq!(fair_share(12, 3), 4);
        assert_eq!(fair_share(12, 2), 6);
        assert_eq!(fair_share(13, 3), 5);
        assert_eq!(fair_share(1, 3), 1);
        assert_eq!(fair_share(5, 0), 5);
    }

    #[test]
    fn claims_only_under_share_or_after_grace() {
        use LeaseSeen::*;
        assert_eq!(claim_decision(4, 3, Free, 0, 5), Claim::UnderShare);
        assert_eq!(claim_decision(4, 3, Mine, 0, 5), Claim::UnderShare);
        assert_eq!(claim_decision(4, 3, HeldByOther, 0, 5), Claim::Wait);
        assert_eq!(claim_decision(4, 4, Free, 0, 5), Claim::Wait);
        assert_eq!(claim_decision(4, 4, Free, 5, 5), Claim::Wait);
        assert_eq!(claim_decision(4, 4, Free, 6, 5), Claim::Orphaned);
        assert_eq!(claim_decision(4, 9, Free, 6, 5), Claim::Orphaned);
    }

    #[test]
    fn yields_only_over_share_with_someone_under() {
        let streams = names(12);
        let leases: Vec<LeaseView> = (0..12).map(|i| lease(&format!("s{i}"), "a")).collect();
        // b joined: a holds 12 > 6, b holds 0 < 6.
        let v = View::new("a", &streams, &["a".into(), "b".into()], &leases);
        assert_eq!(v.share(), 6);
        assert!(should_yield(&v, 12));
        assert!(should_yield(&v, 7));
        assert!(!should_yield(&v, 6), "at the share: keep");
        // Everyone at or over the share: nobody to take it, keep (no flapping).
        let mut leases: Vec<LeaseView> = (0..7).map(|i| lease(&format!("s{i}"), "a")).collect();
        leases.extend((7..12).map(|i| lease(&format!("s{i}"), "b")));
        let v = View::new("a", &streams, &["a".into(), "b".into()], &leases);
        assert!(should_yield(&v, 7), "b holds 5 < 6");
        let leases: Vec<LeaseView> = (0..6)
            .map(|i| lease(&format!("s{i}"), "a"))
            .chain((6..12).map(|i| lease(&format!("s{i}"), "b")))
            .collect();
        let v = View::new("a", &streams, &["a".into(), "b".into()], &leases);
        assert!(!should_yield(&v, 6));
        // A dead replica (no heartbeat) does not count, even with live leases.
        let v = View::new("a", &streams, &["a".into()], &leases);
        assert_eq!(v.share(), 12);
        assert!(!should_yield(&v, 6));
    }

    #[test]
    fn balancer_yields_once_per_refresh_and_waits_for_a_view() {
        let b = Balancer::new("a", names(4), 3);
        assert!(b.claim("s0").is_none(), "no view yet");
        b.update(&["a".into()], &[]);
        let slots: Vec<Slot> = (0..4).filter_map(|i| b.claim(&format!("s{i}"))).collect();
        assert_eq!(slots.len(), 4);
        assert!(b.claim("s0").is_none(), "already mine");
        let leases: Vec<LeaseView> = (0..4).map(|i| lease(&format!("s{i}"), "a")).collect();
        b.update(&["a".into(), "b".into()], &leases);
        assert!(b.should_yield("s3"));
        assert!(!b.should_yield("s3"), "one per refresh");
        let mut slots = slots;
        drop(slots.pop());
        b.update(&["a".into(), "b".into()], &leases[..3]);
        assert!(b.should_yield("s3"), "3 > 2 and b holds 0");
        drop(slots.pop());
        b.update(&["a".into(), "b".into()], &leases[..2]);
        assert!(!b.should_yield("s3"), "at the share");
        assert_eq!(b.held(), 2);
        // A free stream is not claimed at the share until the grace has passed.
        assert!(b.claim("s3").is_none());
        b.update(&["a".into(), "b".into()], &leases[..2]);
        b.update(&["a".into(), "b".into()], &leases[..2]);
        assert!(b.claim("s3").is_none(), "free for the grace, not more");
        b.update(&["a".into(), "b".into()], &leases[..2]);
        let orphan = b.claim("s3").expect("free for more than the grace");
        assert_eq!(orphan.claim, Claim::Orphaned);
    }
}
