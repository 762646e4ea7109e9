//! How an authored bot is kept in the store: its definition, its owner, and its secrets (hashed,
//! with a hint and a generation each).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bots::{Bot, BotControl, secrets};
use crate::config::BotConfig;
use crate::store::control::BotRecord;

/// One secret slot as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredSecret {
    /// SHA-256 of the secret, hex.
    pub hash: String,
    /// The last four characters, to tell secrets apart.
    pub hint: String,
    /// The slot's generation.
    pub generation: u32,
}

/// The stored document of a bot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BotDoc {
    /// The definition.
    pub definition: BotConfig,
    /// Who created it.
    pub owner: Option<String>,
    /// The two secret slots.
    pub secrets: [Option<StoredSecret>; 2],
    /// Which bot of this id it is (tokens carry it); empty for bots stored before it existed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instance: String,
    /// The authors it is shared with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub editors: Vec<String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<secrets::SecretHash> {
    let v: Option<Vec<u8>> =
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect();
    v?.try_into().ok()
}

impl BotDoc {
    /// The document of a live bot, with `hints` for the secret slots.
    pub fn of(bot: &Bot, hints: &[Option<String>; 2]) -> Self {
        let hashes = bot.control.hashes();
        let secrets = [0, 1].map(|i| {
            hashes[i].map(|h| StoredSecret {
                hash: hex(&h),
                hint: hints[i].clone().unwrap_or_default(),
                generation: bot.control.generation(i as u8 + 1),
            })
        });
        let mut definition = bot.definition.clone();
        definition.published = bot.control.published();
        definition.secured_access = bot.control.secured_access();
        Self {
            definition,
            owner: bot.owner.clone(),
            secrets,
            instance: bot.control.instance().to_string(),
            editors: bot.editors.clone(),
        }
    }

    /// The store record.
    pub fn record(&self) -> BotRecord {
        BotRecord {
            id: self.definition.id.clone(),
            tenant: self.definition.tenant.clone(),
            json: serde_json::to_string(self).unwrap_or_default(),
        }
    }

    /// The hints of both slots.
    pub fn hints(&self) -> [Option<String>; 2] {
        [0, 1].map(|i| self.secrets[i].as_ref().map(|s| s.hint.clone()))
    }

    /// Builds the live bot.
    pub fn build(&self, connector_key: String, max_in_flight: usize) -> Bot {
        let control = BotControl::with_instance(&self.instance);
        control.set_published(self.definition.published);
        control.set_secured_access(self.definition.secured_access);
        for (i, s) in self.secrets.iter().enumerate() {
            if let Some(s) = s
                && let Some(h) = unhex(&s.hash)
            {
                control.restore_secret(i as u8 + 1, h, s.generation);
            }
        }
        Bot::with_control(
            &self.definition,
            connector_key,
            max_in_flight,
            Arc::new(control),
            self.owner.clone(),
        )
        .with_editors(self.editors.clone())
    }
}

/// The hint of a secret: its last four characters.
pub fn hint(secret: &str) -> String {
    let tail: String = secret.chars().rev().take(4).collect::<Vec<_>>().into_iter().rev().collect();
    format!("...{tail}")
}
