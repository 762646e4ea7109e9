//! Authoring: bots created, edited, published and tested by licensed authors; who-am-I and
//! trials; the usage reports.
//!
//! Bots defined in the configuration are served from the start; once the authoring API changes
//! one, its stored version wins at later starts. A change is written to the store (with its
//! audit entry) before the channel serves it.

pub mod bots;
pub mod me;
pub mod reports;
pub mod store;

use std::sync::Arc;

use dashmap::DashMap;

use crate::bots::{Bot, BotRegistry, secrets};
use crate::error::ApiError;
use crate::store::SharedStore;
use crate::store::control::{AuditEntry, Mutation};
use store::BotDoc;

/// Authoring state: the secret hints of the bots (the hashes live in the bots themselves).
#[derive(Default)]
pub struct Authoring {
    hints: DashMap<String, [Option<String>; 2]>,
}

impl Authoring {
    /// Loads the stored bots into the registry (replacing configured bots of the same id).
    pub fn load(store: &SharedStore, registry: &BotRegistry, max_in_flight: usize) -> Result<Self, String> {
        let data = store.load_control().map_err(|e| e.to_string())?;
        let me = Self::default();
        for rec in data.bots {
            let doc: BotDoc =
                serde_json::from_str(&rec.json).map_err(|e| format!("stored bot {}: {e}", rec.id))?;
            me.hints.insert(rec.id.clone(), doc.hints());
            registry.insert(Arc::new(doc.build(secrets::random_id(24), max_in_flight)));
        }
        Ok(me)
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
        deleted: bool,
        audit: AuditEntry,
    ) -> Result<(), ApiError> {
        let m = if deleted {
            Mutation::DeleteBot { id: bot.id.clone() }
        } else {
            Mutation::PutBot(BotDoc::of(bot, &self.hints(&bot.id)).record())
        };
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.apply(&[m], &[audit]))
            .await
            .map_err(|_| ApiError::internal())?
            .map_err(|e| {
                tracing::error!(error = %e, "Saving a bot failed.");
                ApiError::unavailable("StoreUnavailable", "The change could not be saved. Try again.")
            })
    }
}
