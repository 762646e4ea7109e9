//! The bots behind the channel: the registry of published bots, built-in bots (topics from
//! configuration, their flows) and upstream bots (Bot Framework messaging endpoints).

pub mod builtin;
pub mod flow;
pub mod secrets;
pub mod upstream;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use dashmap::DashMap;

use crate::config::{BotConfig, BotKind};
use secrets::SecretHash;

/// How a bot answers.
pub enum Engine {
    /// Topics answered by the gateway.
    Builtin(builtin::BuiltinBot),
    /// A Bot Framework messaging endpoint.
    Upstream(upstream::UpstreamBot),
}

/// The parts of a bot that change while conversations run (publishing, access, secrets): shared
/// by every conversation of the bot, so a change takes effect on their next request.
#[derive(Debug, Default)]
pub struct BotControl {
    // Relaxed on these flags: each is read alone and nothing else is published with it.
    published: AtomicBool,
    secured_access: AtomicBool,
    /// Generation of each secret slot; a token made from an older generation is refused.
    generations: [AtomicU32; 2],
    /// The hashes of the two secrets; read only to make tokens, so a std lock is fine.
    hashes: Mutex<[Option<SecretHash>; 2]>,
    /// Which bot of this id it is: random for a bot created through the authoring API, empty for
    /// a configured one. Tokens carry it, so a deleted bot's tokens never reach a later bot with
    /// the same id (in any tenant).
    instance: Box<str>,
    /// Bytes of activities its conversations hold (every version of the bot: the control
    /// block outlives edits), against `channel.max_retained_bytes_per_bot`.
    retained: AtomicUsize,
    /// Bytes of uploaded files its conversations hold, against
    /// `channel.max_upload_bytes_per_bot`.
    uploaded: AtomicUsize,
}

impl BotControl {
    /// Takes `size` bytes of the bot's upload budget of `max`; false (and nothing taken) when
    /// they do not fit.
    pub fn hold_upload(&self, size: usize, max: usize) -> bool {
        // Relaxed: a standalone counter compared against a budget.
        self.uploaded
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                (held + size <= max).then_some(held + size)
            })
            .is_ok()
    }

    /// Gives back `size` bytes of the upload budget.
    pub fn free_upload(&self, size: usize) {
        self.uploaded.fetch_sub(size, Ordering::Relaxed);
    }

    /// Bytes of uploaded files its conversations hold.
    pub fn uploaded(&self) -> usize {
        self.uploaded.load(Ordering::Relaxed)
    }

    /// Counts bytes its conversations took (`added`) and let go (`freed`).
    pub fn retain(&self, added: usize, freed: usize) {
        // Relaxed: a standalone gauge compared against a budget; nothing is published with it.
        if added > freed {
            self.retained.fetch_add(added - freed, Ordering::Relaxed);
        } else if freed > added {
            self.retained.fetch_sub(freed - added, Ordering::Relaxed);
        }
    }

    /// Bytes of activities its conversations hold.
    pub fn retained(&self) -> usize {
        self.retained.load(Ordering::Relaxed)
    }

    /// A control block for the bot instance `instance`.
    pub fn with_instance(instance: &str) -> Self {
        Self { instance: Box::from(instance), ..Self::default() }
    }
    /// Which bot of this id it is (see the field).
    pub fn instance(&self) -> &str {
        &self.instance
    }
    /// Whether bot users can reach the bot.
    pub fn published(&self) -> bool {
        self.published.load(Ordering::Relaxed)
    }
    /// Publishes or unpublishes.
    pub fn set_published(&self, on: bool) {
        self.published.store(on, Ordering::Relaxed);
    }
    /// Whether a secret (or a token made from one) is required.
    pub fn secured_access(&self) -> bool {
        self.secured_access.load(Ordering::Relaxed)
    }
    /// Turns secured access on or off.
    pub fn set_secured_access(&self, on: bool) {
        self.secured_access.store(on, Ordering::Relaxed);
    }
    /// The current generation of secret `slot` (1 or 2); 0 for slot 0 (open tokens).
    pub fn generation(&self, slot: u8) -> u32 {
        match slot {
            1 | 2 => self.generations[usize::from(slot - 1)].load(Ordering::Acquire),
            _ => 0,
        }
    }
    /// The slot (1 or 2) whose secret this is.
    pub fn slot_of(&self, secret: &str) -> Option<u8> {
        let hashes = self.hashes.lock().unwrap_or_else(|p| p.into_inner());
        hashes
            .iter()
            .position(|h| h.as_ref().is_some_and(|h| secrets::matches(secret, h)))
            .map(|i| i as u8 + 1)
    }
    /// Replaces secret `slot` (1 or 2) and bumps its generation, which disconnects the tokens
    /// made from the old secret.
    pub fn set_secret(&self, slot: u8, hash: SecretHash) {
        self.restore_secret(slot, hash, self.generation(slot.clamp(1, 2)) + 1);
    }

    /// Sets secret `slot` with a known generation (loading a stored bot).
    pub fn restore_secret(&self, slot: u8, hash: SecretHash, generation: u32) {
        let i = usize::from(slot.clamp(1, 2) - 1);
        self.hashes.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(hash);
        // Release pairs with the Acquire in `generation`: a request that sees the new generation
        // also sees the new hash.
        self.generations[i].store(generation, Ordering::Release);
    }
    /// The hashes of both slots.
    pub fn hashes(&self) -> [Option<SecretHash>; 2] {
        *self.hashes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A bot: identity, engine, and its shared control block.
pub struct Bot {
    /// The bot id.
    pub id: String,
    /// The tenant that owns it.
    pub tenant: String,
    /// Display name, also `from.name` of its replies.
    pub name: String,
    /// Browser origins allowed to call the channel for it (`*` for any).
    pub allowed_origins: Vec<String>,
    /// How it answers.
    pub engine: Engine,
    /// Publishing, access and secrets.
    pub control: Arc<BotControl>,
    /// The definition it was built from (what the authoring API shows and edits).
    pub definition: BotConfig,
    /// The author who created it through the authoring API, or the configured `owner`.
    pub owner: Option<String>,
    /// The authors it is shared with: they change, publish, delete and read it like its owner.
    pub editors: Vec<String>,
    /// Whether the configuration file defines it: then it is read-only through the API.
    pub configured: bool,
}

impl Bot {
    /// Builds a bot from its configuration; `connector_key` is the unguessable path segment
    /// upstream bots call back on.
    pub fn from_config(c: &BotConfig, connector_key: String, max_in_flight: usize) -> Self {
        let control = BotControl::default();
        control.set_published(c.published);
        control.set_secured_access(c.secured_access);
        for (i, s) in c.channel_secrets.iter().enumerate() {
            control.set_secret(i as u8 + 1, secrets::hash(s));
        }
        let mut bot = Self::with_control(c, connector_key, max_in_flight, Arc::new(control), c.owner.clone());
        bot.configured = true;
        bot
    }

    /// Builds a bot around an existing control block (an edited bot keeps its publishing state,
    /// secrets and the tokens made from them).
    pub fn with_control(
        c: &BotConfig,
        connector_key: String,
        max_in_flight: usize,
        control: Arc<BotControl>,
        owner: Option<String>,
    ) -> Self {
        let engine = match c.kind {
            BotKind::Builtin => Engine::Builtin(
                builtin::BuiltinBot::new(&c.topics).with_attachment_reply(c.attachment_reply.as_deref()),
            ),
            BotKind::Upstream => {
                Engine::Upstream(upstream::UpstreamBot::new(&c.endpoint, connector_key, max_in_flight))
            }
        };
        let mut definition = c.clone();
        definition.channel_secrets.clear();
        Self {
            id: c.id.clone(),
            tenant: c.tenant.clone(),
            name: c.name.clone(),
            allowed_origins: c.allowed_origins.clone(),
            engine,
            control,
            definition,
            owner,
            editors: Vec::new(),
            configured: false,
        }
    }

    /// The same bot shared with `editors`.
    pub fn with_editors(mut self, editors: Vec<String>) -> Self {
        self.editors = editors;
        self
    }

    /// Whether `user` owns the bot or it is shared with them.
    pub fn is_editor(&self, user: &str) -> bool {
        self.owner.as_deref() == Some(user) || self.editors.iter().any(|e| e == user)
    }

    /// The callback key of an upstream bot.
    pub fn connector_key(&self) -> Option<&str> {
        match &self.engine {
            Engine::Upstream(u) => Some(u.connector_key()),
            Engine::Builtin(_) => None,
        }
    }

    /// Whether a browser page at `origin` may call the channel for this bot.
    pub fn origin_allowed(&self, origin: &[u8]) -> bool {
        self.allowed_origins.iter().any(|o| o == "*" || o.as_bytes() == origin)
    }
}

/// The bots the channel serves, by id and by callback key. Read-mostly: `DashMap` shards, no
/// global lock.
#[derive(Default)]
pub struct BotRegistry {
    by_id: DashMap<String, Arc<Bot>>,
    by_connector_key: DashMap<String, Arc<Bot>>,
    /// Secret hash to (bot id, slot): making a token from a secret is one lookup.
    by_secret: DashMap<SecretHash, (String, u8)>,
}

impl BotRegistry {
    /// Adds or replaces a bot.
    pub fn insert(&self, bot: Arc<Bot>) {
        self.remove(&bot.id);
        if let Engine::Upstream(u) = &bot.engine {
            self.by_connector_key.insert(u.connector_key().to_string(), bot.clone());
        }
        for (i, h) in bot.control.hashes().iter().enumerate() {
            if let Some(h) = h {
                self.by_secret.insert(*h, (bot.id.clone(), i as u8 + 1));
            }
        }
        self.by_id.insert(bot.id.clone(), bot);
    }

    /// Replaces secret `slot` of a bot: the old secret and the tokens made from it stop working.
    pub fn set_secret(&self, bot: &Bot, slot: u8, hash: SecretHash) {
        if let Some(old) = bot.control.hashes()[usize::from(slot.clamp(1, 2) - 1)] {
            self.by_secret.remove(&old);
        }
        bot.control.set_secret(slot, hash);
        self.by_secret.insert(hash, (bot.id.clone(), slot));
    }

    /// Removes a bot.
    pub fn remove(&self, id: &str) -> Option<Arc<Bot>> {
        let (_, bot) = self.by_id.remove(id)?;
        if let Engine::Upstream(u) = &bot.engine {
            self.by_connector_key.remove(u.connector_key());
        }
        for h in bot.control.hashes().iter().flatten() {
            self.by_secret.remove(h);
        }
        Some(bot)
    }

    /// The bot with this id.
    pub fn get(&self, id: &str) -> Option<Arc<Bot>> {
        self.by_id.get(id).map(|b| b.clone())
    }

    /// The upstream bot with this callback key.
    pub fn by_connector_key(&self, key: &str) -> Option<Arc<Bot>> {
        self.by_connector_key.get(key).map(|b| b.clone())
    }

    /// The bot one of whose secrets this is, and the slot.
    pub fn by_secret(&self, secret: &str) -> Option<(Arc<Bot>, u8)> {
        let (id, slot) = self.by_secret.get(&secrets::hash(secret)).map(|e| e.clone())?;
        let bot = self.get(&id)?;
        // The map lookup found it by hash; confirm against the bot's own slot in constant time.
        (bot.control.slot_of(secret) == Some(slot)).then_some((bot, slot))
    }

    /// Every bot.
    pub fn all(&self) -> Vec<Arc<Bot>> {
        self.by_id.iter().map(|b| b.clone()).collect()
    }
}
