//! The appender's cache of shadows: least recently used first out, bounded both in entries
//! and in bytes (a few large documents must not hold hundreds of megabytes).
//!
//! ```
//! use eventsync::pipeline::shadow_cache::ShadowCache;
//! # use eventsync::mongo::shadows::Shadow;
//! # use eventsync::pipeline::version::LogVersion;
//! # let shadow = |v| Shadow { doc_id: bson::Bson::Int32(1), version: LogVersion(v), stamp: None,
//! #     offset: 0, incarnation_from: LogVersion(0), doc: None };
//! let mut cache = ShadowCache::new(1000, 100);
//! cache.put("a".into(), shadow(1), 60);
//! cache.put("b".into(), shadow(1), 60); // over 100 bytes: "a" goes
//! assert!(cache.get("a").is_none());
//! assert!(cache.get("b").is_some());
//! ```

use std::num::NonZeroUsize;

use lru::LruCache;

use crate::mongo::shadows::Shadow;

/// Shadows by document key, bounded in entries and in (approximate) bytes.
pub struct ShadowCache {
    entries: LruCache<String, (Shadow, usize)>,
    bytes: usize,
    max_bytes: usize,
}

impl ShadowCache {
    /// A cache of at most `max_entries` shadows and `max_bytes` bytes (as weighed by the
    /// caller on [`ShadowCache::put`]).
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            entries: LruCache::new(NonZeroUsize::new(max_entries).unwrap_or(NonZeroUsize::MIN)),
            bytes: 0,
            max_bytes,
        }
    }

    /// The shadow of `key`, marked as recently used.
    pub fn get(&mut self, key: &str) -> Option<&Shadow> {
        self.entries.get(key).map(|(s, _)| s)
    }

    /// Keeps `shadow` for `key`, weighing `bytes`; evicts the least recently used entries
    /// until both bounds hold (a shadow heavier than the whole budget is not kept).
    pub fn put(&mut self, key: String, shadow: Shadow, bytes: usize) {
        if let Some((_, old)) = self.entries.pop(&key) {
            self.bytes -= old;
        }
        if bytes > self.max_bytes {
            return;
        }
        while self.bytes + bytes > self.max_bytes {
            match self.entries.pop_lru() {
                Some((_, (_, weight))) => self.bytes -= weight,
                None => break,
            }
        }
        if let Some((_, (_, weight))) = self.entries.push(key, (shadow, bytes)) {
            // The entry bound evicted one.
            self.bytes -= weight;
        }
        self.bytes += bytes;
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held (as weighed on [`ShadowCache::put`]).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::version::LogVersion;

    fn shadow(version: i64) -> Shadow {
        Shadow {
            doc_id: bson::Bson::Int32(1),
            version: LogVersion(version),
            stamp: None,
            offset: 0,
            incarnation_from: LogVersion(0),
            doc: None,
        }
    }

    #[test]
    fn both_bounds_hold_and_the_least_recently_used_goes_first() {
        let mut c = ShadowCache::new(3, 1000);
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            c.put((*k).into(), shadow(i as i64), 100);
        }
        assert!(c.get("a").is_some()); // "b" is now the least recently used
        c.put("d".into(), shadow(9), 100); // the entry bound
        assert!(c.get("b").is_none());
        assert_eq!((c.len(), c.bytes()), (3, 300));
        c.put("e".into(), shadow(9), 800); // the byte bound: the oldest ("c") goes
        assert_eq!((c.len(), c.bytes()), (3, 1000));
        assert!(c.get("c").is_none());
        assert!(c.get("a").is_some() && c.get("d").is_some() && c.get("e").is_some());
        c.put("f".into(), shadow(9), 900); // all but the new one go
        assert_eq!((c.len(), c.bytes()), (1, 900));
    }

    #[test]
    fn replacing_an_entry_reweighs_it_and_an_oversized_one_is_not_kept() {
        let mut c = ShadowCache::new(10, 1000);
        c.put("a".into(), shadow(1), 600);
        c.put("a".into(), shadow(2), 300);
        assert_eq!(c.bytes(), 300);
        assert_eq!(c.get("a").map(|s| s.version), Some(LogVersion(2)));
        c.put("a".into(), shadow(3), 5000);
        assert!(c.get("a").is_none(), "a stale entry must not stay behind");
        assert_eq!((c.len(), c.bytes()), (0, 0));
        c.clear();
        assert!(c.is_empty());
    }
}
