//! The conversations held in memory: a sharded concurrent map (no global lock), a cap, and
//! idle expiry read from the clock on every lookup so expiry needs no timer to be exact.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

use super::Conversation;
use crate::clock::Millis;

/// Why a conversation could not be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CreateError {
    /// The cap on conversations is reached.
    #[error("the gateway holds its maximum number of conversations")]
    Full,
}

/// The conversation map.
pub struct Conversations {
    map: DashMap<Arc<str>, Arc<Conversation>>,
    // Relaxed suffices: the count only bounds memory; reserving before inserting keeps it from
    // ever exceeding the cap, whatever the interleaving.
    count: AtomicUsize,
    max: usize,
    idle_ms: i64,
}

impl Conversations {
    /// An empty map holding at most `max` conversations, each ending after `idle_ms` without a
    /// user message.
    pub fn new(max: usize, idle_ms: i64) -> Self {
        Self { map: DashMap::new(), count: AtomicUsize::new(0), max, idle_ms }
    }

    /// Inserts a conversation built by `make` under `id`, unless one exists: returns it and
    /// whether it is new.
    pub fn get_or_create(
        &self,
        id: &str,
        now: Millis,
        make: impl FnOnce() -> Conversation,
    ) -> Result<(Arc<Conversation>, bool), CreateError> {
        if let Some(c) = self.get(id, now) {
            return Ok((c, false));
        }
        // An expired conversation under this id (its token started it again) is replaced.
        if self.map.remove_if(id, |_, c| self.expired(c, now)).is_some() {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        if self.count.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.count.fetch_sub(1, Ordering::Relaxed);
            return Err(CreateError::Full);
        }
        let mut created = false;
        let conv = self
            .map
            .entry(Arc::from(id))
            .or_insert_with(|| {
                created = true;
                Arc::new(make())
            })
            .clone();
        if !created {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        Ok((conv, created))
    }

    /// The live conversation with this id.
    pub fn get(&self, id: &str, now: Millis) -> Option<Arc<Conversation>> {
        let c = self.map.get(id)?.clone();
        (!self.expired(&c, now)).then_some(c)
    }

    fn expired(&self, c: &Conversation, now: Millis) -> bool {
        now - c.last_user_ms() >= self.idle_ms
    }

    /// Removes expired conversations; returns how many.
    ///
    /// No shard is write-locked for a whole scan: the expired are found under read locks (lookups
    /// in the shard being scanned go on), then each is removed alone, if it is still expired (a
    /// message may have come in between).
    pub fn sweep(&self, now: Millis) -> usize {
        let expired: Vec<Arc<str>> =
            self.map.iter().filter(|e| self.expired(e.value(), now)).map(|e| e.key().clone()).collect();
        let mut removed = 0;
        for id in expired {
            if let Some((_, c)) = self.map.remove_if(&id, |_, c| self.expired(c, now)) {
                c.wake();
                removed += 1;
            }
        }
        self.count.fetch_sub(removed, Ordering::Relaxed);
        removed
    }

    /// Conversations held.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
