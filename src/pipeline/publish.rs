//! Publishing: hands appended events to the live readers of this replica.
//!
//! Two signals, both cheap and without I/O:
//! * [`Publisher::publish`] hands the appended events themselves to the shared tails of
//!   the sync port ([`crate::api::tail`]), which fan them out to every subscriber of the
//!   stream without reading them back from MongoDB;
//! * [`Publisher::appended`] only says "something was appended" (readers then read the log).
//!
//! Readers on other replicas find the events by tailing the log.

use std::sync::Arc;

use tokio::sync::{broadcast, watch};

use crate::mongo::events::EventRecord;

/// Batches kept for tails that fall behind the appender; a tail further behind than this
/// reads the missing positions from the log instead.
const BATCHES: usize = 1024;

/// Signals appends; readers wait on [`Publisher::subscribe`] or [`Publisher::batches`].
#[derive(Clone, Debug)]
pub struct Publisher {
    tx: watch::Sender<u64>,
    batches: broadcast::Sender<Arc<[EventRecord]>>,
}

impl Default for Publisher {
    fn default() -> Self {
        Self::new()
    }
}

impl Publisher {
    /// A new publisher.
    pub fn new() -> Self {
        Self {
            tx: watch::channel(0).0,
            batches: broadcast::channel(BATCHES).0,
        }
    }

    /// Announces that events were appended (readers read them from the log).
    pub fn appended(&self) {
        self.tx.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Hands events that are now durable in the log (in position order, one stream per
    /// call) to this replica's live readers, then announces them like [`Self::appended`].
    /// Call it once per appended batch, after the events were written. Readers never trust
    /// it for completeness: a batch that does not start right after what a reader holds
    /// makes it read the gap from the log, so a lost or reordered call costs a read, never
    /// an event.
    pub fn publish(&self, events: Arc<[EventRecord]>) {
        if !events.is_empty() {
            // No receiver (no tail running on this replica) is not an error.
            let _ = self.batches.send(events);
        }
        self.appended();
    }

    /// Like [`Self::publish`], but builds the batch only when a live tail listens on this
    /// replica (no copy of the events otherwise).
    pub fn publish_with(&self, events: impl FnOnce() -> Arc<[EventRecord]>) {
        if self.batches.receiver_count() > 0 {
            self.publish(events());
        } else {
            self.appended();
        }
    }

    /// A receiver that changes after every append.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    /// The batches handed to [`Self::publish`] from now on.
    pub fn batches(&self) -> broadcast::Receiver<Arc<[EventRecord]>> {
        self.batches.subscribe()
    }
}
