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
    /// The cap on one tenant's conversations is reached.
    #[error("the gateway holds its maximum number of conversations for this tenant")]
    TenantFull,
    /// The cap on one bot's conversations is reached.
    #[error("the gateway holds its maximum number of conversations for this bot")]
    BotFull,
    /// The author holds as many test chats as an author may.
    #[error("the author holds the maximum number of test chats")]
    TestAuthorFull,
}

/// The caps on conversations held at once.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// In all.
    pub total: usize,
    /// Of one tenant's bots.
    pub per_tenant: usize,
    /// Of one bot.
    pub per_bot: usize,
    /// Test chats of one author (in one tenant).
    pub per_test_author: usize,
}

/// The conversation map.
pub struct Conversations {
    map: DashMap<Arc<str>, Arc<Conversation>>,
    // Relaxed suffices: the count only bounds memory; reserving before inserting keeps it from
    // ever exceeding the cap, whatever the interleaving.
    count: AtomicUsize,
    max: usize,
    /// Conversations held per tenant and per (tenant, bot): entries only for bots that exist,
    /// so strangers cannot grow these maps. Changed only when a conversation comes or goes.
    per_tenant: DashMap<String, usize>,
    per_bot: DashMap<(String, String), usize>,
    /// Test chats per (tenant, author): entries only for licensed authors who opened one.
    per_test_author: DashMap<(String, String), usize>,
    caps: Caps,
    idle_ms: i64,
}

impl Conversations {
    /// An empty map holding at most `max` conversations, each ending after `idle_ms` without a
    /// user message.
    pub fn new(max: usize, idle_ms: i64) -> Self {
        Self::with_caps(Caps { total: max, per_tenant: max, per_bot: max, per_test_author: max }, idle_ms)
    }

    /// An empty map with caps in all, per tenant and per bot.
    pub fn with_caps(caps: Caps, idle_ms: i64) -> Self {
        Self {
            map: DashMap::new(),
            count: AtomicUsize::new(0),
            max: caps.total,
            per_tenant: DashMap::new(),
            per_bot: DashMap::new(),
            per_test_author: DashMap::new(),
            caps,
            idle_ms,
        }
    }

    /// Counts a conversation of `tenant`'s `bot` (a test chat of `author`, if given) against
    /// its caps, or refuses it.
    fn reserve(&self, tenant: &str, bot: &str, author: Option<&str>) -> Result<(), CreateError> {
        if let Some(author) = author {
            let mut n = self.per_test_author.entry((tenant.to_string(), author.to_string())).or_insert(0);
            if *n >= self.caps.per_test_author {
                return Err(CreateError::TestAuthorFull);
            }
            *n += 1;
        }
        {
            let mut n = self.per_tenant.entry(tenant.to_string()).or_insert(0);
            if *n >= self.caps.per_tenant {
                drop(n);
                self.unreserve(tenant, None, author);
                return Err(CreateError::TenantFull);
            }
            *n += 1;
        }
        let mut n = self.per_bot.entry((tenant.to_string(), bot.to_string())).or_insert(0);
        if *n >= self.caps.per_bot {
            drop(n);
            self.unreserve_tenant(tenant);
            self.unreserve(tenant, None, author);
            return Err(CreateError::BotFull);
        }
        *n += 1;
        Ok(())
    }

    fn unreserve_tenant(&self, tenant: &str) {
        if let Some(mut n) = self.per_tenant.get_mut(tenant) {
            *n = n.saturating_sub(1);
        }
    }

    /// Takes a conversation of `bot` and of `author` (each if given) off the counts; entries of
    /// authors without test chats are removed, so the map holds only current test chats.
    fn unreserve(&self, tenant: &str, bot: Option<&str>, author: Option<&str>) {
        if let Some(author) = author {
            let key = (tenant.to_string(), author.to_string());
            if let Some(mut n) = self.per_test_author.get_mut(&key) {
                *n = n.saturating_sub(1);
            }
            self.per_test_author.remove_if(&key, |_, n| *n == 0);
        }
        if let Some(bot) = bot
            && let Some(mut n) = self.per_bot.get_mut(&(tenant.to_string(), bot.to_string()))
        {
            *n = n.saturating_sub(1);
        }
    }

    /// A conversation leaves the map.
    fn release(&self, c: &Conversation) {
        self.unreserve_tenant(&c.bot.tenant);
        self.unreserve(&c.bot.tenant, Some(&c.bot.id), c.test_author.as_deref());
    }

    /// Inserts a conversation of `tenant`'s `bot` built by `make` under `id`, unless one exists:
    /// returns it and whether it is new.
    pub fn get_or_create(
        &self,
        id: &str,
        now: Millis,
        (tenant, bot, test_author): (&str, &str, Option<&str>),
        make: impl FnOnce() -> Conversation,
    ) -> Result<(Arc<Conversation>, bool), CreateError> {
        if let Some(c) = self.get(id, now) {
            return Ok((c, false));
        }
        // An expired conversation under this id (its token started it again) is replaced.
        if let Some((_, old)) = self.map.remove_if(id, |_, c| self.expired(c, now)) {
            self.count.fetch_sub(1, Ordering::Relaxed);
            self.release(&old);
        }
        if self.count.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.count.fetch_sub(1, Ordering::Relaxed);
            return Err(CreateError::Full);
        }
        if let Err(e) = self.reserve(tenant, bot, test_author) {
            self.count.fetch_sub(1, Ordering::Relaxed);
            return Err(e);
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
            self.unreserve_tenant(tenant);
            self.unreserve(tenant, Some(bot), test_author);
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
                self.release(&c);
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
