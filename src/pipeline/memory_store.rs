//! An in-memory [`LogStore`] (and [`SourceScan`]) for deterministic tests of the log path.
//!
//! It keeps the same records as MongoDB (events and shadows in their stored form, decoded
//! by the same functions) and enforces the same guards: the unique keys of the events with
//! the content check, monotonic shadows, epoch-fenced checkpoints, idempotent dead letters,
//! leases by compare-and-swap on a clock the test moves. On top, a test can
//!
//! * **crash** the pipeline at any write ([`MemoryStore::fail_at`]): the n-th write fails
//!   (optionally after part of it landed, as an interrupted `insertMany` would), and every
//!   later call fails until [`MemoryStore::heal`] — the process is dead;
//! * **pause** a writer at any write ([`MemoryStore::pause_at`]) and run another holder
//!   meanwhile, to interleave two holders step by step.
//!
//! Writes are numbered from 1 in the order they reach the store, over all holders.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bson::{Bson, Document};
use tokio::sync::Notify;

use super::store::{DeadLetter, LogStore, ShadowSummary, ShadowWrite, SourceScan};
use super::version::Stamp;
use crate::client::StampFields;
use crate::mongo::checkpoints::Checkpoint;
use crate::mongo::doc_key;
use crate::mongo::events::EventRecord;
use crate::mongo::lease::Held;
use crate::mongo::membership::LeaseView;
use crate::mongo::shadows::{decode_record, shadow_id, Shadow};
use crate::mongo::StoreError;

#[derive(Debug, Clone)]
struct Lease {
    holder: String,
    epoch: i64,
    expires_ms: i64,
}

#[derive(Debug, Default)]
struct State {
    /// Stored events by (stream, seq): the unique stream position.
    events: BTreeMap<(String, i64), Document>,
    /// The unique chain keys (ns, doc_key, to_version) and (ns, doc_key, from_version).
    chain_to: HashSet<(String, String, i64)>,
    chain_from: HashSet<(String, String, i64)>,
    /// Shadow records by `_id`.
    shadows: HashMap<String, Document>,
    /// Checkpoints with the epoch that stored them.
    checkpoints: HashMap<String, (i64, Checkpoint)>,
    dead_letters: Vec<(String, DeadLetter)>,
    dead_letter_keys: HashSet<(String, String)>,
    leases: HashMap<String, Lease>,
    /// Replica heartbeats: expiry on the store's clock, and the instance that wrote it.
    replicas: BTreeMap<String, (i64, String)>,
    clock_ms: i64,
    writes: u64,
    fault: Option<Fault>,
    crashed: bool,
}

#[derive(Debug, Clone, Copy)]
struct Fault {
    at_write: u64,
    landed: usize,
}

/// A writer stopped at a chosen write; see [`MemoryStore::pause_at`].
#[derive(Debug, Default)]
pub struct Pause {
    reached: Notify,
    release: Notify,
}

impl Pause {
    /// Waits until the writer has reached the write (it is then stopped before it).
    pub async fn reached(&self) {
        self.reached.notified().await;
    }

    /// Lets the writer go on.
    pub fn release(&self) {
        self.release.notify_one();
    }
}

/// The in-memory store. Clones share the same state.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    pauses: Arc<Mutex<HashMap<u64, Arc<Pause>>>>,
}

/// How much of a write lands: all of it, or (a planned crash) its first records only.
enum Landed {
    All,
    First(usize),
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread cannot leave the maps half-updated in a way later
        // assertions would misread: each write is applied under one lock.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the `n`-th write (counted from 1 over the store's life) fail, after `landed`
    /// of its records were stored (0: none; for a single-record write, any other number
    /// means the record landed and the reply was lost). Every later call fails too, until
    /// [`MemoryStore::heal`]: the writer crashed there.
    pub fn fail_at(&self, n: u64, landed: usize) {
        self.lock().fault = Some(Fault {
            at_write: n,
            landed,
        });
    }

    /// Ends a simulated crash: calls succeed again (a restarted process).
    pub fn heal(&self) {
        let mut st = self.lock();
        st.fault = None;
        st.crashed = false;
    }

    /// True once a planned fault fired.
    pub fn crashed(&self) -> bool {
        self.lock().crashed
    }

    /// Stops whichever writer makes the `n`-th write just before it, until released.
    pub fn pause_at(&self, n: u64) -> Arc<Pause> {
        let pause = Arc::new(Pause::default());
        self.pauses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(n, pause.clone());
        pause
    }

    /// Writes made so far.
    pub fn writes(&self) -> u64 {
        self.lock().writes
    }

    /// Moves the lease clock forward.
    pub fn advance_clock(&self, by: Duration) {
        self.lock().clock_ms += by.as_millis() as i64;
    }

    /// Every event of a stream, in position order.
    pub fn events(&self, stream: &str) -> Vec<EventRecord> {
        self.lock()
            .events
            .range((stream.to_owned(), i64::MIN)..=(stream.to_owned(), i64::MAX))
            .filter_map(|(_, d)| EventRecord::from_document(d).ok())
            .collect()
    }

    /// Every shadow of a stream, by document key.
    pub fn shadows(&self, stream: &str) -> HashMap<String, Shadow> {
        self.lock()
            .shadows
            .values()
            .filter(|d| d.get_str("stream").ok() == Some(stream))
            .filter_map(|d| decode_record(d).ok())
            .collect()
    }

    /// The stored checkpoint of a stream.
    pub fn checkpoint(&self, stream: &str) -> Option<Checkpoint> {
        self.lock().checkpoints.get(stream).map(|(_, c)| c.clone())
    }

    /// Deletes a stream's checkpoint (what an operator does to force a re-read).
    pub fn delete_checkpoint(&self, stream: &str) {
        self.lock().checkpoints.remove(stream);
    }

    /// Dead letters of a stream.
    pub fn dead_letters(&self, stream: &str) -> Vec<DeadLetter> {
        self.lock()
            .dead_letters
            .iter()
            .filter(|(s, _)| s == stream)
            .map(|(_, d)| d.clone())
            .collect()
    }

    /// Counts a write; pauses or fails it as planned. Returns how much of it may land.
    async fn begin_write(&self, what: &'static str) -> Result<Landed, StoreError> {
        let n = {
            let mut st = self.lock();
            if st.crashed {
                return Err(StoreError::Unavailable(what));
            }
            st.writes += 1;
            st.writes
        };
        let pause = self
            .pauses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&n);
        if let Some(p) = pause {
            p.reached.notify_one();
            p.release.notified().await;
        }
        let mut st = self.lock();
        if st.crashed {
            return Err(StoreError::Unavailable(what));
        }
        match st.fault {
            Some(f) if f.at_write == n => {
                st.crashed = true;
                Ok(Landed::First(f.landed))
            }
            _ => Ok(Landed::All),
        }
    }

    fn reads(&self, what: &'static str) -> Result<MutexGuard<'_, State>, StoreError> {
        let st = self.lock();
        if st.crashed {
            return Err(StoreError::Unavailable(what));
        }
        Ok(st)
    }
}

/// The error a partly landed write reports.
fn interrupted(landed: &Landed, what: &'static str) -> Result<(), StoreError> {
    match landed {
        Landed::All => Ok(()),
        Landed::First(_) => Err(StoreError::Unavailable(what)),
    }
}

fn limit_of(landed: &Landed, len: usize) -> usize {
    match landed {
        Landed::All => len,
        Landed::First(k) => (*k).min(len),
    }
}

impl LogStore for MemoryStore {
    async fn load_checkpoint(&self, stream: &str) -> Result<Option<Checkpoint>, StoreError> {
        Ok(self
            .reads("load_checkpoint")?
            .checkpoints
            .get(stream)
            .map(|(_, c)| c.clone()))
    }

    async fn save_checkpoint(
        &self,
        stream: &str,
        epoch: i64,
        checkpoint: &Checkpoint,
    ) -> Result<(), StoreError> {
        let landed = self.begin_write("save_checkpoint").await?;
        if limit_of(&landed, 1) == 1 {
            let mut st = self.lock();
            match st.checkpoints.get(stream) {
                Some((stored, cp)) if *stored > epoch || cp.seq > checkpoint.seq => {
                    return Err(StoreError::Fenced(stream.to_owned()))
                }
                _ => {
                    st.checkpoints
                        .insert(stream.to_owned(), (epoch, checkpoint.clone()));
                }
            }
        }
        interrupted(&landed, "save_checkpoint")
    }

    async fn append_events(&self, events: &[EventRecord]) -> Result<(), StoreError> {
        let landed = self.begin_write("append_events").await?;
        let limit = limit_of(&landed, events.len());
        let mut st = self.lock();
        for ev in &events[..limit] {
            let pos = (ev.stream.clone(), ev.seq);
            let to = (ev.ns.clone(), ev.doc_key.clone(), ev.to_version);
            let from = (ev.ns.clone(), ev.doc_key.clone(), ev.from_version);
            if st.events.contains_key(&pos)
                || st.chain_to.contains(&to)
                || st.chain_from.contains(&from)
            {
                let same = match st.events.get(&pos) {
                    Some(x) => EventRecord::from_document(x)?.same_content(ev),
                    None => false,
                };
                if !same {
                    return Err(StoreError::Fenced(ev.stream.clone()));
                }
                continue;
            }
            st.events.insert(pos, ev.to_document()?);
            st.chain_to.insert(to);
            st.chain_from.insert(from);
        }
        interrupted(&landed, "append_events")
    }

    async fn events_after(
        &self,
        stream: &str,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let st = self.reads("events_after")?;
        st.events
            .range((stream.to_owned(), after_seq.saturating_add(1))..=(stream.to_owned(), i64::MAX))
            .take(usize::try_from(limit).unwrap_or(0))
            .map(|(_, d)| EventRecord::from_document(d))
            .collect()
    }

    async fn last_seq(&self, stream: &str) -> Result<i64, StoreError> {
        let st = self.reads("last_seq")?;
        Ok(st
            .events
            .range((stream.to_owned(), i64::MIN)..=(stream.to_owned(), i64::MAX))
            .next_back()
            .map_or(0, |((_, seq), _)| *seq))
    }

    async fn load_shadows(
        &self,
        stream: &str,
        keys: &[String],
    ) -> Result<HashMap<String, Shadow>, StoreError> {
        let st = self.reads("load_shadows")?;
        let mut out = HashMap::new();
        for k in keys {
            if let Some(d) = st.shadows.get(&shadow_id(stream, k)) {
                let (key, s) = decode_record(d)?;
                out.insert(key, s);
            }
        }
        Ok(out)
    }

    async fn save_shadows(
        &self,
        stream: &str,
        shadows: Vec<ShadowWrite>,
    ) -> Result<(), StoreError> {
        let landed = self.begin_write("save_shadows").await?;
        let limit = limit_of(&landed, shadows.len());
        let mut st = self.lock();
        for s in shadows.into_iter().take(limit) {
            let id = shadow_id(stream, &s.doc_key);
            let newer = match st.shadows.get(&id) {
                Some(d) => {
                    crate::mongo::get_int(d, "version").is_some_and(|v| v >= s.version.get())
                }
                None => false,
            };
            if newer {
                continue;
            }
            let record = s.record.to_document().map_err(|e| StoreError::Corrupt {
                what: "shadow",
                id: s.doc_key.clone(),
                reason: e.to_string(),
            })?;
            st.shadows.insert(id, record);
        }
        interrupted(&landed, "save_shadows")
    }

    async fn shadow_summaries(
        &self,
        stream: &str,
    ) -> Result<HashMap<String, ShadowSummary>, StoreError> {
        let st = self.reads("shadow_summaries")?;
        let mut out = HashMap::new();
        for d in st.shadows.values() {
            if d.get_str("stream").ok() != Some(stream) {
                continue;
            }
            let (key, s) = decode_record(d)?;
            out.insert(
                key,
                ShadowSummary {
                    doc_id: s.doc_id.clone(),
                    stamp: s.stamp,
                    deleted: s.deleted(),
                },
            );
        }
        Ok(out)
    }

    async fn dead_letter(
        &self,
        stream: &str,
        _epoch: i64,
        letter: &DeadLetter,
    ) -> Result<(), StoreError> {
        let landed = self.begin_write("dead_letter").await?;
        if limit_of(&landed, 1) == 1 {
            let mut st = self.lock();
            let fresh = match &letter.token {
                Some(t) => st
                    .dead_letter_keys
                    .insert((stream.to_owned(), t.to_string())),
                None => true,
            };
            if fresh {
                st.dead_letters.push((stream.to_owned(), letter.clone()));
            }
        }
        interrupted(&landed, "dead_letter")
    }

    async fn acquire_lease(
        &self,
        stream: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Held>, StoreError> {
        let mut st = self.reads("acquire_lease")?;
        let now = st.clock_ms;
        let expires_ms = now + ttl.as_millis() as i64;
        let epoch = match st.leases.get(stream) {
            Some(l) if l.holder == holder || l.expires_ms <= now => l.epoch + 1,
            Some(_) => return Ok(None),
            None => 1,
        };
        st.leases.insert(
            stream.to_owned(),
            Lease {
                holder: holder.to_owned(),
                epoch,
                expires_ms,
            },
        );
        Ok(Some(Held { epoch }))
    }

    async fn renew_lease(
        &self,
        stream: &str,
        holder: &str,
        epoch: i64,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut st = self.reads("renew_lease")?;
        let expires_ms = st.clock_ms + ttl.as_millis() as i64;
        match st.leases.get_mut(stream) {
            Some(l) if l.holder == holder && l.epoch == epoch => {
                l.expires_ms = expires_ms;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release_lease(
        &self,
        stream: &str,
        holder: &str,
        epoch: i64,
    ) -> Result<(), StoreError> {
        let mut st = self.reads("release_lease")?;
        let now = st.clock_ms;
        if let Some(l) = st.leases.get_mut(stream) {
            if l.holder == holder && l.epoch == epoch {
                l.expires_ms = now - 1;
            }
        }
        Ok(())
    }

    async fn heartbeat(
        &self,
        replica: &str,
        instance: &str,
        ttl: Duration,
    ) -> Result<Option<String>, StoreError> {
        let mut st = self.reads("heartbeat")?;
        let now = st.clock_ms;
        let expires = now + ttl.as_millis() as i64;
        let before = st
            .replicas
            .insert(replica.to_owned(), (expires, instance.to_owned()));
        Ok(before.filter(|(e, _)| *e > now).map(|(_, i)| i))
    }

    async fn leave(&self, replica: &str) -> Result<(), StoreError> {
        let mut st = self.reads("leave")?;
        st.replicas.remove(replica);
        Ok(())
    }

    async fn live_replicas(&self) -> Result<Vec<String>, StoreError> {
        let st = self.reads("live_replicas")?;
        let now = st.clock_ms;
        Ok(st
            .replicas
            .iter()
            .filter(|(_, (e, _))| *e > now)
            .map(|(r, _)| r.clone())
            .collect())
    }

    async fn lease_views(&self) -> Result<Vec<LeaseView>, StoreError> {
        let st = self.reads("lease_views")?;
        let now = st.clock_ms;
        let mut v: Vec<LeaseView> = st
            .leases
            .iter()
            .map(|(stream, l)| LeaseView {
                stream: stream.clone(),
                holder: l.holder.clone(),
                live: l.expires_ms > now,
            })
            .collect();
        v.sort_by(|a, b| a.stream.cmp(&b.stream));
        Ok(v)
    }
}

/// An in-memory watched collection for re-reads.
#[derive(Debug, Clone, Default)]
pub struct MemorySource {
    docs: Arc<Mutex<BTreeMap<String, Document>>>,
}

impl MemorySource {
    /// An empty collection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the collection's contents.
    pub fn set(&self, docs: impl IntoIterator<Item = Document>) {
        let mut map = self.docs.lock().unwrap_or_else(|p| p.into_inner());
        map.clear();
        for d in docs {
            if let Some(id) = d.get("_id") {
                map.insert(doc_key(id), d.clone());
            }
        }
    }
}

impl SourceScan for MemorySource {
    async fn stamps(&self, fields: &StampFields) -> Result<Vec<(Bson, Option<Stamp>)>, StoreError> {
        let map = self.docs.lock().unwrap_or_else(|p| p.into_inner());
        Ok(map
            .values()
            .filter_map(|d| {
                let id = d.get("_id")?.clone();
                Some((id, fields.version_of(d).map(Stamp)))
            })
            .collect())
    }

    async fn fetch(&self, ids: &[Bson]) -> Result<Vec<Document>, StoreError> {
        let map = self.docs.lock().unwrap_or_else(|p| p.into_inner());
        Ok(ids
            .iter()
            .filter_map(|id| map.get(&doc_key(id)).cloned())
            .collect())
    }
}
