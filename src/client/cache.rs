//! The optional in-process read cache of the thin client.
//!
//! Bounded (LRU) with a time-to-live. It remembers, per document, the highest version this
//! process has written, and never answers with an older one: a read that would go back in
//! time goes to MongoDB instead.

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bson::Document;
use lru::LruCache;

/// Settings of the read cache.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// Most documents kept.
    pub capacity: NonZeroUsize,
    /// How long an entry may be served.
    pub ttl: Duration,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            capacity: NonZeroUsize::new(1024).unwrap_or(NonZeroUsize::MIN),
            ttl: Duration::from_secs(5),
        }
    }
}

struct Entry {
    doc: Document,
    version: i64,
    stored_at: Instant,
}

struct Inner {
    entries: LruCache<String, Entry>,
    /// Highest version written by this process, per document (bounded like `entries`).
    written: LruCache<String, i64>,
}

/// A bounded, TTL read cache that never goes back before this process's own writes.
pub(crate) struct ReadCache {
    ttl: Duration,
    inner: Mutex<Inner>,
}

impl ReadCache {
    pub(crate) fn new(options: &CacheOptions) -> Self {
        Self {
            ttl: options.ttl,
            inner: Mutex::new(Inner {
                entries: LruCache::new(options.capacity),
                written: LruCache::new(
                    options
                        .capacity
                        .saturating_mul(NonZeroUsize::new(4).unwrap_or(NonZeroUsize::MIN)),
                ),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned cache only holds copies: keep using it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A cached copy, when fresh and not older than this process's last write.
    pub(crate) fn get(&self, key: &str) -> Option<Document> {
        let mut inner = self.lock();
        let floor = inner.written.get(key).copied().unwrap_or(i64::MIN);
        match inner.entries.get(key) {
            Some(e) if e.stored_at.elapsed() <= self.ttl && e.version >= floor => {
                Some(e.doc.clone())
            }
            Some(_) => {
                inner.entries.pop(key);
                None
            }
            None => None,
        }
    }

    /// Remembers a document read from MongoDB, unless the cache already holds a newer one.
    pub(crate) fn observe(&self, key: &str, doc: &Document, version: i64) {
        let mut inner = self.lock();
        let floor = inner.written.get(key).copied().unwrap_or(i64::MIN);
        if version < floor {
            return;
        }
        if let Some(e) = inner.entries.peek(key) {
            if e.version > version {
                return;
            }
        }
        inner.entries.put(
            key.to_owned(),
            Entry {
                doc: doc.clone(),
                version,
                stored_at: Instant::now(),
            },
        );
    }

    /// Records a write by this process and caches its result.
    pub(crate) fn wrote(&self, key: &str, doc: &Document, version: i64) {
        {
            let mut inner = self.lock();
            let floor = inner.written.get(key).copied().unwrap_or(i64::MIN);
            inner.written.put(key.to_owned(), floor.max(version));
        }
        self.observe(key, doc, version);
    }

    /// The highest version this process wrote for the document, if remembered.
    pub(crate) fn written_floor(&self, key: &str) -> Option<i64> {
        self.lock().written.peek(key).copied()
    }

    /// Drops a document (after a conflict or a delete).
    pub(crate) fn invalidate(&self, key: &str) {
        self.lock().entries.pop(key);
    }
}
