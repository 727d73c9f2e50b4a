//! The log's exactness, proven deterministically on the in-memory store (no server): the
//! pipeline (transform → append, recovery, re-read) is driven over a simulated MongoDB —
//! stamped and unstamped writers, lookups that run ahead, deletes and re-creations with a
//! version reset, restores to a lower version — and
//!
//! * crashed at **every write** (and again at every write of the recovery that follows);
//! * with two holders **interleaved step by step**: a holder paused before any of its writes
//!   while another takes the lease over and works, then woken;
//! * over random change sequences with history loss and crashes at random points
//!   (a property test).
//!
//! After each: every document's events replay to the model's final state exactly, chains
//! have no gap, positions are dense, no two events share a version, and every shadow equals
//! the log's latest state. The same behaviour is confirmed end to end against the real
//! server by `tests/daemon_recovery.rs`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bson::{doc, Bson, DateTime, Document};
use eventsync::client::StampFields;
use eventsync::diff;
use eventsync::mongo::events::{EventRecord, Operation};
use eventsync::mongo::{doc_key, StoreError};
use eventsync::pipeline::append::{Appender, LeaseGuard, Phase, Prepared};
use eventsync::pipeline::memory_store::{MemorySource, MemoryStore};
use eventsync::pipeline::publish::Publisher;
use eventsync::pipeline::recovery::recover;
use eventsync::pipeline::resync::resync;
use eventsync::pipeline::store::LogStore;
use eventsync::pipeline::transform::{DocChange, Observed};
use eventsync::pipeline::{PipelineConfig, ResyncCompare};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

const STREAM: &str = "app.things";
const TTL: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// A simulated MongoDB: a sequence of writes, the collection's state after each, and the
// change events they produce.

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Insert,
    Update,
    Replace,
    Delete,
}

#[derive(Debug, Clone)]
struct SimChange {
    kind: Kind,
    id: Bson,
    /// The document as written, for inserts and replaces.
    exact: Option<Document>,
}

#[derive(Debug, Clone)]
struct World {
    /// `states[k]`: the collection after `k` writes.
    states: Vec<BTreeMap<String, Document>>,
    /// `changes[k]`: the change event of write `k + 1`.
    changes: Vec<SimChange>,
}

impl World {
    fn generate(seed: u64, writes: usize, docs: i32) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut state: BTreeMap<String, Document> = BTreeMap::new();
        let mut states = vec![state.clone()];
        let mut changes = Vec::new();
        let ids: Vec<Bson> = (0..docs)
            .map(|i| {
                if i % 3 == 2 {
                    Bson::String(format!("s{i}"))
                } else {
                    Bson::Int32(i)
                }
            })
            .collect();
        while changes.len() < writes {
            let id = ids[rng.gen_range(0..ids.len())].clone();
            let key = doc_key(&id);
            let current = state.get(&key).cloned();
            let value = rng.gen_range(0..1000_i64);
            let (kind, next) = match current {
                None => {
                    let mut d = doc! { "_id": id.clone(), "hp": value, "name": format!("n{value}"), "at": DateTime::from_millis(value) };
                    if rng.gen_bool(0.7) {
                        d.insert("version", 1_i64);
                        d.insert("_origin", "w1");
                    }
                    (Kind::Insert, Some(d))
                }
                Some(mut d) => {
                    let version = d.get_i64("version").ok();
                    match rng.gen_range(0..10) {
                        0 | 1 => (Kind::Delete, None),
                        // A stamped write (CAS, +1).
                        2..=5 if version.is_some() => {
                            d.insert("hp", value);
                            if rng.gen_bool(0.3) {
                                d.insert(
                                    "tags",
                                    vec![Bson::Int32(value as i32), Bson::Double(0.5)],
                                );
                            } else {
                                d.remove("tags");
                            }
                            d.insert("version", version.unwrap_or(0) + 1);
                            d.insert("_origin", if rng.gen_bool(0.5) { "w1" } else { "w2" });
                            (Kind::Update, Some(d))
                        }
                        // A stamped replace.
                        6 if version.is_some() => {
                            let d = doc! { "_id": id.clone(), "hp": value, "nested": { "k": value as i32 }, "version": version.unwrap_or(0) + 1, "_origin": "w2" };
                            (Kind::Replace, Some(d))
                        }
                        // Restored with a lower version (an unstamped tool): a new incarnation.
                        7 if version.is_some_and(|v| v > 2) => {
                            d.insert("version", 1_i64);
                            d.insert("hp", value);
                            (Kind::Update, Some(d))
                        }
                        // An unstamped writer (mongosh): the version, if any, stays.
                        _ => {
                            d.insert("name", format!("u{value}"));
                            (Kind::Update, Some(d))
                        }
                    }
                }
            };
            match &next {
                Some(d) => {
                    state.insert(key, d.clone());
                }
                None => {
                    state.remove(&key);
                }
            }
            changes.push(SimChange {
                kind,
                id,
                exact: next.filter(|_| matches!(kind, Kind::Insert | Kind::Replace)),
            });
            states.push(state.clone());
        }
        World { states, changes }
    }

    fn len(&self) -> usize {
        self.changes.len()
    }

    fn final_state(&self) -> &BTreeMap<String, Document> {
        self.states
            .last()
            .expect("states start with the empty collection")
    }

    /// Change `i` as the pipeline reads it when the collection has seen `now` writes.
    fn observe(&self, i: usize, now: usize) -> DocChange {
        let c = &self.changes[i];
        let key = doc_key(&c.id);
        let observed = match c.kind {
            Kind::Delete => Observed::Deleted,
            Kind::Insert => Observed::Inserted(c.exact.clone().unwrap_or_default()),
            Kind::Replace => Observed::Replaced(c.exact.clone().unwrap_or_default()),
            Kind::Update => match self.states[now].get(&key) {
                Some(d) => Observed::LookedUp(d.clone()),
                None => Observed::Gone,
            },
        };
        DocChange {
            doc_id: c.id.clone(),
            doc_key: key,
            observed,
            token: Some(token(i + 1)),
            cluster_time: None,
            wall_time: None,
        }
    }
}

fn token(position: usize) -> Document {
    doc! { "i": position as i64 }
}

fn position(token: &Document) -> usize {
    token.get_i64("i").map_or(0, |i| i as usize)
}

// ---------------------------------------------------------------------------------------
// A holder: what the worker does, over the memory store, driven step by step.

#[derive(Debug, Clone)]
struct Script {
    seed: u64,
    /// Writes made before the daemon first starts.
    before_start: usize,
    /// How far lookups may run ahead of the change, in writes.
    lookahead: usize,
    /// Restarts (counted from 0) at which the resume point is found lost.
    history_lost_at: Vec<usize>,
    /// Whether batch N is prepared before batch N−1 is written, as the worker does.
    mode: Mode,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Sequential,
    Pipelined,
}

struct Holder {
    name: &'static str,
    store: MemoryStore,
    source: MemorySource,
    lost: watch::Sender<bool>,
    epoch: i64,
    appender: Option<Appender<MemoryStore>>,
    /// Pipelined mode: the prepared batch not yet written.
    pending: Option<Prepared>,
    /// Next change to read.
    pos: usize,
    /// Writes the collection has seen (lookups read this state): one clock for every
    /// holder, as MongoDB's state only moves forward.
    clock: Arc<AtomicUsize>,
    restarts: usize,
    /// Re-reads of the collection this holder made.
    rereads: usize,
    rng: StdRng,
}

#[derive(Debug, PartialEq)]
enum Progress {
    More,
    Done,
}

fn config() -> PipelineConfig {
    PipelineConfig {
        shadow_cache_entries: 2,
        ..PipelineConfig::default()
    }
}

impl Holder {
    fn new(name: &'static str, store: &MemoryStore, seed: u64, clock: &Arc<AtomicUsize>) -> Holder {
        Holder {
            name,
            store: store.clone(),
            source: MemorySource::new(),
            lost: watch::channel(false).0,
            epoch: 0,
            appender: None,
            pending: None,
            pos: 0,
            clock: clock.clone(),
            restarts: 0,
            rereads: 0,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    async fn acquire(&mut self) -> bool {
        match self.store.acquire_lease(STREAM, self.name, TTL).await {
            Ok(Some(held)) => {
                self.epoch = held.epoch;
                true
            }
            _ => false,
        }
    }

    fn now(&self) -> usize {
        self.clock.load(Ordering::SeqCst)
    }

    /// Time passes: at least `at_least` writes have happened, maybe a few more.
    fn tick(&mut self, world: &World, at_least: usize, lookahead: usize) -> usize {
        let ahead = if lookahead == 0 {
            0
        } else {
            self.rng.gen_range(0..=lookahead)
        };
        self.clock
            .fetch_max((at_least + ahead).min(world.len()), Ordering::SeqCst);
        self.now()
    }

    /// A run's start: recover, then re-read when there is no resume point (or it is lost).
    async fn start(&mut self, world: &World, script: &Script) -> Result<(), StoreError> {
        let guard = LeaseGuard::new(self.epoch, self.lost.subscribe());
        let stored = self.store.load_checkpoint(STREAM).await?;
        let cp = recover(&self.store, STREAM, &guard, &StampFields::default(), stored).await?;
        let lost = script.history_lost_at.contains(&self.restarts);
        self.restarts += 1;
        let mut appender = Appender::new(
            self.store.clone(),
            STREAM.to_owned(),
            guard,
            StampFields::default(),
            &config(),
            Publisher::new(),
            cp.clone(),
        );
        let resume = cp.token.as_ref().map(position);
        let reread = match resume {
            Some(p) if !lost => {
                self.pos = p;
                cp.resync_pending
            }
            // No resume point, or lost: a new stream from now, then a re-read.
            _ => {
                self.pos = self.now();
                true
            }
        };
        if reread {
            self.rereads += 1;
            let start = token(self.pos);
            appender
                .process(&[], Some(start.clone()), Phase::Rereading)
                .await?;
            // Writes go on while the collection is scanned.
            let now = self.now();
            let scanned_at = self.tick(world, now, script.lookahead);
            self.source.set(world.states[scanned_at].values().cloned());
            resync(
                &mut appender,
                &self.source,
                Some(start),
                3,
                ResyncCompare::Content,
            )
            .await?;
        }
        self.appender = Some(appender);
        Ok(())
    }

    /// One batch of the change stream.
    async fn batch(&mut self, world: &World, script: &Script) -> Result<Progress, StoreError> {
        if self.pos >= world.len() {
            return Ok(Progress::Done);
        }
        let n = self.rng.gen_range(1..=4).min(world.len() - self.pos);
        let mut changes = Vec::new();
        for i in self.pos..self.pos + n {
            let now = self.tick(world, i + 1, script.lookahead);
            changes.push(world.observe(i, now));
        }
        let appender = self
            .appender
            .as_mut()
            .ok_or(StoreError::Unavailable("holder not started"))?;
        match script.mode {
            Mode::Sequential => {
                appender
                    .process(&changes, Some(token(self.pos + n)), Phase::Live)
                    .await?;
            }
            Mode::Pipelined => {
                // Batch N is prepared from the store before batch N−1 is written.
                let batch = appender
                    .prepare(&changes, Some(token(self.pos + n)), Phase::Live)
                    .await?;
                if let Some(previous) = self.pending.replace(batch) {
                    let number = previous.number();
                    appender.committer().commit(previous).await?;
                    appender.confirm(number);
                }
            }
        }
        self.pos += n;
        Ok(Progress::More)
    }

    /// Writes the batch still pending in pipelined mode.
    async fn flush(&mut self) -> Result<(), StoreError> {
        if let (Some(appender), Some(batch)) = (self.appender.as_mut(), self.pending.take()) {
            let number = batch.number();
            appender.committer().commit(batch).await?;
            appender.confirm(number);
        }
        Ok(())
    }

    /// Runs to the end of the world, restarting after crashes (the store heals: a new
    /// process) and after being fenced while still holding the lease (a new run).
    async fn run_to_end(&mut self, world: &World, script: &Script) -> Result<(), StoreError> {
        for _ in 0..200 {
            let step = async {
                if self.appender.is_none() {
                    self.start(world, script).await?;
                }
                while self.batch(world, script).await? == Progress::More {}
                self.flush().await
            };
            match step.await {
                Ok(()) => return Ok(()),
                Err(StoreError::Unavailable(_)) => {
                    self.store.heal();
                    self.appender = None;
                    self.pending = None;
                    assert!(
                        self.acquire().await,
                        "a restarted holder takes its lease back"
                    );
                }
                Err(StoreError::Fenced(_)) => {
                    self.appender = None;
                    self.pending = None;
                    if !self.acquire().await {
                        return Err(StoreError::Fenced(STREAM.into()));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        panic!("{} did not finish in 200 runs", self.name);
    }
}

// ---------------------------------------------------------------------------------------
// The checks.

fn replay(events: &[EventRecord]) -> Result<BTreeMap<String, Document>, String> {
    let mut docs: HashMap<String, (i64, Option<Document>)> = HashMap::new();
    let mut seen_versions = std::collections::HashSet::new();
    for (i, ev) in events.iter().enumerate() {
        if ev.seq != i as i64 + 1 {
            return Err(format!("positions not dense: event {i} has seq {}", ev.seq));
        }
        if !seen_versions.insert((ev.doc_key.clone(), ev.to_version)) {
            return Err(format!(
                "two events of {} at version {}",
                ev.doc_key, ev.to_version
            ));
        }
        let (version, state) = docs.entry(ev.doc_key.clone()).or_insert((0, None));
        if ev.from_version != *version {
            return Err(format!(
                "chain gap for {}: at {} but event seq {} starts at {}",
                ev.doc_key, version, ev.seq, ev.from_version
            ));
        }
        if ev.to_version <= ev.from_version {
            return Err(format!("event seq {} does not move forward", ev.seq));
        }
        *version = ev.to_version;
        *state = match ev.op {
            Operation::Delete => None,
            _ => {
                let patch: diff::Patch =
                    serde_json::from_str(&ev.patch).map_err(|e| e.to_string())?;
                let base = state.clone().unwrap_or_default();
                Some(diff::apply(&base, &patch).map_err(|e| e.to_string())?)
            }
        };
    }
    Ok(docs
        .into_iter()
        .filter_map(|(k, (_, d))| d.map(|d| (k, d)))
        .collect())
}

/// Replay equals the model, chains and positions are exact, every shadow is the log's end.
fn check(store: &MemoryStore, world: &World, context: &str) {
    let events = store.events(STREAM);
    let replayed = replay(&events).unwrap_or_else(|e| panic!("{context}: {e}"));
    let expected = world.final_state();
    assert_eq!(
        &replayed, expected,
        "{context}: replay of the log differs from MongoDB"
    );
    let mut last: HashMap<String, &EventRecord> = HashMap::new();
    for ev in &events {
        last.insert(ev.doc_key.clone(), ev);
    }
    let shadows = store.shadows(STREAM);
    for (key, ev) in &last {
        let shadow = shadows
            .get(key)
            .unwrap_or_else(|| panic!("{context}: no shadow for {key}"));
        assert_eq!(
            shadow.version.get(),
            ev.to_version,
            "{context}: shadow of {key} is not at the log's version"
        );
        assert_eq!(
            shadow.doc.as_deref(),
            replayed.get(key),
            "{context}: shadow of {key} differs from the log's state"
        );
    }
}

fn clock(start: usize) -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(start))
}

fn script(seed: u64) -> Script {
    Script {
        seed,
        before_start: 4,
        lookahead: 2,
        history_lost_at: vec![],
        mode: if seed % 2 == 0 {
            Mode::Sequential
        } else {
            Mode::Pipelined
        },
    }
}

async fn clean_run(world: &World, script: &Script) -> MemoryStore {
    let store = MemoryStore::new();
    let mut a = Holder::new("a", &store, script.seed, &clock(script.before_start));
    assert!(a.acquire().await);
    a.run_to_end(world, script).await.expect("clean run");
    store
}

// ---------------------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn a_clean_run_replays_to_mongodb() {
    for seed in 0..20 {
        let world = World::generate(seed, 60, 6);
        let store = clean_run(&world, &script(seed)).await;
        check(&store, &world, &format!("seed {seed}"));
    }
}

/// Crash at every write of a run — with part of a multi-record write landed or not — then
/// again at each of the first writes after the restart (recovery, re-read, first batch).
#[tokio::test]
async fn a_crash_at_any_write_and_again_during_recovery_loses_nothing() {
    for mode in [Mode::Sequential, Mode::Pipelined] {
        crash_at_every_write(mode).await;
    }
}

async fn crash_at_every_write(mode: Mode) {
    let world = World::generate(7, 40, 5);
    let base = Script { mode, ..script(7) };
    let total = clean_run(&world, &base).await.writes();
    assert!(total > 20, "the scenario makes enough writes ({total})");
    let mut runs = 0;
    for n in 1..=total {
        for landed in [0, 1] {
            for again in [None, Some(1), Some(2), Some(3)] {
                let store = MemoryStore::new();
                store.fail_at(n, landed);
                let mut a = Holder::new("a", &store, base.seed, &clock(base.before_start));
                assert!(a.acquire().await);
                // The first crash; then, armed after the restart, the second one.
                let first = a.run_to_end_until_crash(&world, &base).await;
                if first {
                    store.heal();
                    if let Some(k) = again {
                        store.fail_at(store.writes() + k, landed);
                    }
                    a.appender = None;
                    a.pending = None;
                    assert!(a.acquire().await);
                }
                a.run_to_end(&world, &base).await.unwrap_or_else(|e| {
                    panic!("crash at write {n} ({landed} landed), again {again:?}: {e}")
                });
                check(
                    &store,
                    &world,
                    &format!("crash at write {n} ({landed} landed), again {again:?}"),
                );
                runs += 1;
            }
        }
    }
    assert_eq!(runs, total as usize * 8);
}

impl Holder {
    /// Runs until the store's planned crash fires (true) or the end (false).
    async fn run_to_end_until_crash(&mut self, world: &World, script: &Script) -> bool {
        let result = async {
            if self.appender.is_none() {
                self.start(world, script).await?;
            }
            while self.batch(world, script).await? == Progress::More {}
            self.flush().await
        }
        .await;
        match result {
            Ok(()) => false,
            Err(StoreError::Unavailable(_)) => true,
            Err(e) => panic!("unexpected error before the crash: {e}"),
        }
    }
}

/// Holder A is paused just before its k-th write (a GC pause, a partition); its lease
/// expires and B takes over and works to the end; then A wakes and goes on writing as if
/// nothing happened. For every k: A can neither move a shadow backwards nor add an event
/// that conflicts with B's, and the log is exact.
#[tokio::test]
async fn a_holder_that_wakes_after_a_takeover_cannot_corrupt_the_log() {
    let world = World::generate(11, 40, 5);
    let base = script(11);
    let total = clean_run(&world, &base).await.writes();
    for k in 1..=total {
        let store = MemoryStore::new();
        let pause = store.pause_at(k);
        let time = clock(base.before_start);
        let mut a = Holder::new("a", &store, base.seed, &time);
        assert!(a.acquire().await);
        let world_a = world.clone();
        let script_a = base.clone();
        let task = tokio::spawn(async move {
            let r = a.run_to_end(&world_a, &script_a).await;
            (a, r)
        });
        pause.reached().await;
        // A is stopped before write k; its lease runs out.
        store.advance_clock(TTL + Duration::from_secs(1));
        let mut b = Holder::new("b", &store, base.seed + 1, &time);
        assert!(b.acquire().await, "an expired lease is taken over");
        b.run_to_end(&world, &base)
            .await
            .unwrap_or_else(|e| panic!("k={k}: B failed: {e}"));
        check(&store, &world, &format!("k={k}, after B"));
        let shadows_before = store.shadows(STREAM);
        let events_before = store.events(STREAM).len();
        pause.release();
        let (_a, result) = task.await.expect("A's task");
        // A, woken, was refused (fenced), or found nothing left to do.
        match result {
            Ok(()) | Err(StoreError::Fenced(_)) => {}
            Err(e) => panic!("k={k}: A failed otherwise: {e}"),
        }
        for (key, s) in store.shadows(STREAM) {
            let before = &shadows_before[&key];
            assert!(
                s.version >= before.version,
                "k={k}: A moved the shadow of {key} back from {} to {}",
                before.version,
                s.version
            );
        }
        assert_eq!(
            store.events(STREAM).len(),
            events_before,
            "k={k}: A appended after B finished"
        );
        check(&store, &world, &format!("k={k}, after A woke"));
    }
}

/// Both orders at once: A paused at its k-th write, B paused at its j-th; A woken and run
/// to its end (or refusal) while B is stopped; then B goes on (and, if A's valid events got
/// in first, is fenced, recovers them and continues). The log is exact for every (k, j).
#[tokio::test]
async fn two_holders_interleaved_at_every_pair_of_writes_keep_the_log_exact() {
    let world = World::generate(23, 24, 4);
    let base = script(23);
    let total = clean_run(&world, &base).await.writes();
    let mut pairs = 0;
    for k in 1..=total.min(30) {
        for j in 1..=8 {
            let store = MemoryStore::new();
            let pause_a = store.pause_at(k);
            let time = clock(base.before_start);
            let mut a = Holder::new("a", &store, base.seed, &time);
            assert!(a.acquire().await);
            let (world_a, script_a) = (world.clone(), base.clone());
            let task_a = tokio::spawn(async move { a.run_to_end(&world_a, &script_a).await });
            pause_a.reached().await;
            store.advance_clock(TTL + Duration::from_secs(1));
            let pause_b = store.pause_at(store.writes() + j);
            let mut b = Holder::new("b", &store, base.seed + 1, &time);
            assert!(b.acquire().await);
            let (world_b, script_b) = (world.clone(), base.clone());
            let task_b = tokio::spawn(async move { b.run_to_end(&world_b, &script_b).await });
            // B may finish before its j-th write; then there is nothing to interleave.
            let b_paused = tokio::select! {
                _ = pause_b.reached() => true,
                _ = tokio::time::sleep(Duration::from_millis(200)) => false,
            };
            if !b_paused {
                // Disarm it: A's later writes must not stop there.
                pause_b.release();
            }
            pause_a.release();
            let a_result = task_a.await.expect("A's task");
            pause_b.release();
            let b_result = task_b.await.expect("B's task");
            assert!(
                matches!(a_result, Ok(()) | Err(StoreError::Fenced(_))),
                "k={k} j={j}: A: {a_result:?}"
            );
            b_result.unwrap_or_else(|e| panic!("k={k} j={j}: B failed: {e}"));
            check(&store, &world, &format!("k={k} j={j}"));
            pairs += 1;
        }
    }
    assert!(pairs >= 8);
}

/// The scenario of a document deleted and created again (stamp back to 1) while the
/// daemon was away, then history lost: the re-read must replace the old incarnation.
#[tokio::test]
async fn a_recreated_document_after_history_loss_converges() {
    let store = MemoryStore::new();
    let id = Bson::String("p1".into());
    let v = |n: i64, who: &str| doc! { "_id": "p1", "who": who, "version": n, "_origin": "w" };
    // The log holds the old incarnation at version 5.
    let mut changes = vec![SimChange {
        kind: Kind::Insert,
        id: id.clone(),
        exact: Some(v(1, "old")),
    }];
    let mut states = vec![BTreeMap::new()];
    let key = doc_key(&id);
    states.push(BTreeMap::from([(key.clone(), v(1, "old"))]));
    for n in 2..=5 {
        changes.push(SimChange {
            kind: Kind::Update,
            id: id.clone(),
            exact: None,
        });
        states.push(BTreeMap::from([(key.clone(), v(n, "old"))]));
    }
    // Away: deleted, re-inserted at 1, updated to 2 — then history is lost.
    changes.push(SimChange {
        kind: Kind::Delete,
        id: id.clone(),
        exact: None,
    });
    states.push(BTreeMap::new());
    changes.push(SimChange {
        kind: Kind::Insert,
        id: id.clone(),
        exact: Some(v(1, "new")),
    });
    states.push(BTreeMap::from([(key.clone(), v(1, "new"))]));
    changes.push(SimChange {
        kind: Kind::Update,
        id: id.clone(),
        exact: None,
    });
    states.push(BTreeMap::from([(key.clone(), v(2, "new"))]));
    // After the restart, one more write takes it to 3.
    changes.push(SimChange {
        kind: Kind::Update,
        id: id.clone(),
        exact: None,
    });
    states.push(BTreeMap::from([(key.clone(), v(3, "new"))]));
    let world = World { states, changes };

    let script = Script {
        seed: 1,
        before_start: 0,
        lookahead: 0,
        history_lost_at: vec![1],
        mode: Mode::Sequential,
    };
    let time = clock(0);
    let mut a = Holder::new("a", &store, 1, &time);
    assert!(a.acquire().await);
    a.start(&world, &script).await.expect("start");
    // Consume the old incarnation up to version 5, then stop (the daemon is stopped).
    while a.pos < 5 {
        a.batch(&world, &script).await.expect("batch");
    }
    // Restart at write 8 with the history lost.
    time.store(8, Ordering::SeqCst);
    a.appender = None;
    a.start(&world, &script)
        .await
        .expect("restart with history lost");
    while a.batch(&world, &script).await.expect("batch") == Progress::More {}
    check(&store, &world, "re-created after history loss");
    let events = store.events(STREAM);
    let last = events.last().expect("events");
    assert_eq!(
        last.stamp,
        Some(3),
        "the last event carries the writer's stamp 3"
    );
    assert!(
        last.to_version > 5,
        "versions never go back: {}",
        last.to_version
    );
    let replaced = events
        .iter()
        .find(|e| e.op == Operation::Replace)
        .expect("an event replaced the old incarnation");
    assert_eq!(replaced.from_version, 5);
}

/// An operator deletes the checkpoint to force a re-read: the restart re-reads the
/// collection (it does not resume from the log's last token), and the log stays exact.
#[tokio::test]
async fn a_deleted_checkpoint_forces_a_reread() {
    let world = World::generate(5, 40, 5);
    let base = script(5);
    let store = MemoryStore::new();
    let time = clock(base.before_start);
    let mut a = Holder::new("a", &store, base.seed, &time);
    assert!(a.acquire().await);
    a.start(&world, &base).await.expect("start");
    for _ in 0..5 {
        a.batch(&world, &base).await.expect("batch");
    }
    a.flush().await.expect("flush");
    assert_eq!(a.rereads, 1, "the initial sync");
    store.delete_checkpoint(STREAM);
    a.appender = None;
    assert!(a.acquire().await);
    a.run_to_end(&world, &base).await.expect("run");
    assert_eq!(
        a.rereads, 2,
        "the restart without a checkpoint re-read the collection"
    );
    check(&store, &world, "checkpoint deleted");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// Random writers, lookups that run ahead, history loss and crashes at random points.
    #[test]
    fn random_histories_with_crashes_and_history_loss_replay_exactly(
        seed in any::<u64>(),
        writes in 10usize..70,
        docs in 2i32..8,
        lookahead in 0usize..4,
        crashes in proptest::collection::vec(1u64..400, 0..4),
        lost in proptest::collection::vec(0usize..6, 0..3),
        pipelined in any::<bool>(),
    ) {
        let world = World::generate(seed, writes, docs);
        let script = Script {
            seed,
            before_start: (seed % 5) as usize,
            lookahead,
            history_lost_at: lost,
            mode: if pipelined { Mode::Pipelined } else { Mode::Sequential },
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let store = MemoryStore::new();
            let mut a = Holder::new("a", &store, seed, &clock(script.before_start));
            assert!(a.acquire().await);
            let mut crashes = crashes;
            crashes.sort_unstable();
            for at in crashes {
                if at <= store.writes() {
                    continue;
                }
                store.fail_at(at, (at % 2) as usize);
                if !a.run_to_end_until_crash(&world, &script).await {
                    break;
                }
                store.heal();
                a.appender = None;
                a.pending = None;
                assert!(a.acquire().await);
            }
            a.run_to_end(&world, &script).await.expect("run");
            check(&store, &world, &format!("seed {seed}"));
        });
    }
}
