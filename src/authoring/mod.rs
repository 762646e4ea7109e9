//! Authoring: bots created, edited, published and tested by licensed authors; who-am-I and
//! trials; the usage reports.
//!
//! Bots defined in the configuration file are managed by the file: served from the start and
//! read-only through the API (409 `ManagedByConfig`). Bots created through the API belong to
//! their creator and the authors they are shared with; tenant admins may change any bot of
//! their tenant. A change is written to the store (with its audit entry) before the channel
//! serves it.

pub mod bots;
pub mod me;
pub mod reports;
pub mod store;

use std::sync::Arc;

use dashmap::DashMap;

use crate::bots::{Bot, BotRegistry, secrets};
use crate::error::ApiError;
use crate::store::control::{AuditEntry, Mutation};
use crate::store::{SharedStore, StoreError};
use store::BotDoc;

/// Authoring state: the secret hints of the bots (the hashes live in the bots themselves).
#[derive(Default)]
pub struct Authoring {
    hints: DashMap<String, [Option<String>; 2]>,
    /// The stored document of each stored bot, to tell what another node changed.
    stored: DashMap<String, String>,
    /// Ids being created right now: a create holds its id across the store write, so two
    /// creates of one id cannot both pass the uniqueness check.
    creating: DashMap<String, ()>,
    /// The per-caller rate on report endpoints.
    pub reports: reports::ReportRate,
}

/// 409 `BotExists`.
pub fn bot_exists() -> ApiError {
    ApiError::new(http::StatusCode::CONFLICT, "BotExists", "A bot with this id exists. Choose another id.")
}

/// What [`Authoring::save`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BotChange {
    /// A new bot: refused with 409 `BotExists` if the store knows its id (another node may
    /// have created it).
    Create,
    /// A change to an existing bot.
    Update,
    /// The bot is deleted.
    Delete,
}

/// An id held by a create in progress; released on drop.
pub struct Reservation<'a> {
    creating: &'a DashMap<String, ()>,
    id: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.creating.remove(&self.id);
    }
}

impl Authoring {
    /// Holds `id` for a create, or `None` when another create holds it.
    pub fn reserve(&self, id: &str) -> Option<Reservation<'_>> {
        match self.creating.entry(id.to_string()) {
            dashmap::Entry::Occupied(_) => None,
            dashmap::Entry::Vacant(v) => {
                v.insert(());
                Some(Reservation { creating: &self.creating, id: id.to_string() })
            }
        }
    }

    /// Loads the stored bots into the registry (replacing configured bots of the same id).
    pub fn load(
        store: &SharedStore,
        registry: &BotRegistry,
        max_in_flight: usize,
        reports_per_minute: u32,
    ) -> Result<Self, String> {
        let data = store.load_control().map_err(|e| e.to_string())?;
        let me = Self { reports: reports::ReportRate::new(reports_per_minute), ..Self::default() };
        for rec in data.bots {
            if registry.get(&rec.id).is_some_and(|b| b.configured) {
                // The file manages this id (a bot stored under it before the file defined it,
                // or by a version that let the API edit configured bots): the file wins.
                tracing::warn!(bot = %rec.id, "The configuration defines this bot; its stored version is not served.");
                continue;
            }
            let doc: BotDoc =
                serde_json::from_str(&rec.json).map_err(|e| format!("stored bot {}: {e}", rec.id))?;
            me.hints.insert(rec.id.clone(), doc.hints());
            registry.insert(Arc::new(doc.build(secrets::random_id(24), max_in_flight)));
            me.stored.insert(rec.id.clone(), rec.json);
        }
        Ok(me)
    }

    /// Applies the stored bots another node changed: edited bots are rebuilt around their
    /// existing control block (so running conversations see publishing and secret changes at
    /// once), new ones (also a new bot under a deleted bot's id) are built fresh, deleted ones
    /// stop serving.
    pub fn reload(
        &self,
        bots: &[crate::store::control::BotRecord],
        registry: &BotRegistry,
        max_in_flight: usize,
    ) {
        let mut seen = std::collections::HashSet::new();
        for rec in bots {
            seen.insert(rec.id.clone());
            if self.stored.get(&rec.id).is_some_and(|j| *j == rec.json)
                || registry.get(&rec.id).is_some_and(|b| b.configured)
            {
                continue;
            }
            let Ok(doc) = serde_json::from_str::<BotDoc>(&rec.json) else {
                tracing::warn!(bot = %rec.id, "A stored bot could not be read; keeping the current version.");
                continue;
            };
            let fresh = doc.build(secrets::random_id(24), max_in_flight);
            let bot = match registry.get(&rec.id) {
                // The same bot, edited: its running conversations see the change at once.
                Some(old)
                    if old.control.instance() == fresh.control.instance() && old.tenant == fresh.tenant =>
                {
                    let c = &old.control;
                    c.set_published(fresh.control.published());
                    c.set_secured_access(fresh.control.secured_access());
                    for (i, h) in fresh.control.hashes().iter().enumerate() {
                        if let Some(h) = h {
                            let slot = i as u8 + 1;
                            c.restore_secret(slot, *h, fresh.control.generation(slot));
                        }
                    }
                    let key = old.connector_key().map_or_else(|| secrets::random_id(24), str::to_string);
                    Bot::with_control(&fresh.definition, key, max_in_flight, c.clone(), fresh.owner.clone())
                        .with_editors(fresh.editors.clone())
                }
                // Another bot under this id (the old one was deleted, this one created since):
                // the old one stops serving, and its tokens do not reach the new one.
                Some(old) => {
                    old.control.set_published(false);
                    fresh
                }
                None => fresh,
            };
            registry.insert(Arc::new(bot));
            self.hints.insert(rec.id.clone(), doc.hints());
            self.stored.insert(rec.id.clone(), rec.json.clone());
        }
        let gone: Vec<String> =
            self.stored.iter().map(|e| e.key().clone()).filter(|id| !seen.contains(id)).collect();
        for id in gone {
            if let Some(bot) = registry.remove(&id) {
                bot.control.set_published(false);
            }
            self.stored.remove(&id);
            self.hints.remove(&id);
        }
    }

    /// The hints of a bot's secrets.
    pub fn hints(&self, bot: &str) -> [Option<String>; 2] {
        self.hints.get(bot).map(|h| h.clone()).unwrap_or_default()
    }

    /// Sets the hint of one slot.
    pub fn set_hint(&self, bot: &str, slot: u8, hint: String) {
        self.hints.entry(bot.to_string()).or_default()[usize::from(slot.clamp(1, 2) - 1)] = Some(hint);
    }

    /// Writes a bot's document (or its deletion) with an audit entry.
    pub async fn save(
        &self,
        store: &SharedStore,
        bot: &Bot,
        change: BotChange,
        audit: AuditEntry,
    ) -> Result<(), ApiError> {
        let record = (change != BotChange::Delete).then(|| BotDoc::of(bot, &self.hints(&bot.id)).record());
        let m = match (&record, change) {
            (None, _) => Mutation::DeleteBot { id: bot.id.clone() },
            (Some(r), BotChange::Create) => Mutation::CreateBot(r.clone()),
            (Some(r), _) => Mutation::PutBot(r.clone()),
        };
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.apply(&[m], &[audit]))
            .await
            .map_err(|_| ApiError::internal())?
            .map_err(|e| match e {
                StoreError::BotExists { .. } => bot_exists(),
                e => {
                    tracing::error!(error = %e, "Saving a bot failed.");
                    ApiError::unavailable("StoreUnavailable", "The change could not be saved. Try again.")
                }
            })?;
        match record {
            Some(r) => {
                self.stored.insert(r.id, r.json);
            }
            None => {
                self.stored.remove(&bot.id);
            }
        }
        Ok(())
    }
}
