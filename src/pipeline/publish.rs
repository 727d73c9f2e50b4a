//! Publishing: wakes live readers on this replica as soon as events are appended.
//! Readers on other replicas find the events by tailing the log.

use tokio::sync::watch;

/// Signals appends; readers wait on [`Publisher::subscribe`] and then read the log.
#[derive(Clone, Debug)]
pub struct Publisher {
    tx: watch::Sender<u64>,
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
        }
    }

    /// Announces that events were appended.
    pub fn appended(&self) {
        self.tx.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that changes after every append.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }
}
