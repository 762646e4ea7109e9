//! `[[bots]]`: bots known at start-up, built in (topics) or upstream (a Bot Framework endpoint).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Invalid, invalid, validate_id};

/// Where a bot's answers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BotKind {
    /// Topics defined here, answered by the gateway itself.
    Builtin,
    /// A Bot Framework messaging endpoint.
    Upstream,
}

/// Whether a topic is the user's business (billed) or the system's (never begins a session).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TopicKind {
    /// Triggered by what the user asks; the first one begins a billed session.
    User,
    /// Greeting, fallback, escalation, end of conversation; never begins a billed session.
    System,
}

/// The role of a system topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SystemTopic {
    /// Sent when the conversation starts (`conversationUpdate` or the `startConversation` event).
    Greeting,
    /// Answers a message no trigger matched.
    Fallback,
    /// Hands the user to a human: triggered by its phrases.
    Escalate,
    /// Ends the conversation: triggered by its phrases.
    EndOfConversation,
}

/// One topic of a built-in bot.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    /// A display name. Required.
    pub name: String,
    /// `user` or `system`. Required.
    pub kind: TopicKind,
    /// For system topics: which one (`greeting`, `fallback`, `escalate`, `end_of_conversation`).
    #[serde(default)]
    pub system: Option<SystemTopic>,
    /// Phrases that trigger the topic: it matches when the message contains one, ignoring case
    /// and punctuation. Default none.
    #[serde(default)]
    pub triggers: Vec<String>,
    /// The bot's answers, sent in order. At least one. With a `flow`, `{{name}}` placeholders
    /// are filled from the flow's JSON answer (`{{order.status}}` reads a nested field).
    pub replies: Vec<String>,
    /// An HTTP action whose answer fills the replies. Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<FlowConfig>,
    /// The reply sent instead of `replies` when the flow fails (timeout, refused, non-2xx,
    /// non-JSON, too large, or a placeholder its answer lacks). Required with a `flow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_reply: Option<String>,
}

/// The HTTP method of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum FlowMethod {
    /// POST, the default.
    #[default]
    Post,
    /// PUT.
    Put,
    /// PATCH.
    Patch,
    /// GET: no body is sent.
    Get,
}

/// Flow timeouts: the default, and the most a flow may ask for (a hung endpoint slows only its
/// own reply, and by at most this).
pub const DEFAULT_FLOW_TIMEOUT_MS: u64 = 3000;
/// The longest flow timeout.
pub const MAX_FLOW_TIMEOUT_MS: u64 = 10_000;

fn default_flow_timeout_ms() -> u64 {
    DEFAULT_FLOW_TIMEOUT_MS
}

/// A topic's flow: an HTTP call through the gateway's outbound client and policy.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlowConfig {
    /// The `http://` URL called; the outbound policy must allow it. Required.
    pub url: String,
    /// `POST`, `PUT`, `PATCH` or `GET`. Default `POST`.
    #[serde(default)]
    pub method: FlowMethod,
    /// The whole call's time limit, ms, 1 to 10000. Default 3000.
    #[serde(default = "default_flow_timeout_ms")]
    pub timeout_ms: u64,
    /// The JSON body; `{{text}}`, `{{conversation_id}}`, `{{user_id}}`, `{{bot_id}}` and
    /// `{{variable}}` in its strings are filled (always as JSON strings). Default: an object of
    /// the four built-in values. Not allowed with `GET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub body: Option<serde_json::Value>,
    /// Constant values the body may use, by name (letters, digits, `_`). Default none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub variables: BTreeMap<String, String>,
}

/// `[[bots]]`: one bot.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BotConfig {
    /// The bot id, used in URLs. Required.
    pub id: String,
    /// The tenant that owns it. Required, must be in `[[tenants]]`.
    pub tenant: String,
    /// A display name; also the `from.name` of its replies. Required.
    pub name: String,
    /// Whether bot users can reach it. Default true.
    #[serde(default = "default_true")]
    pub published: bool,
    /// Whether a channel secret (or a token made from one) is required. Default false: anyone
    /// who knows the bot id can get a token from `GET /api/v1/bots/{id}/directline/token`.
    #[serde(default)]
    pub secured_access: bool,
    /// Browser origins allowed to call the channel for this bot, e.g. `https://www.contoso.com`;
    /// `*` allows any. Default `["*"]`.
    #[serde(default = "default_origins")]
    pub allowed_origins: Vec<String>,
    /// Up to two channel secrets (at least 16 characters each), kept hashed in memory. Default
    /// none: secrets are then made by the authoring API.
    #[serde(default, skip_serializing)]
    pub channel_secrets: Vec<String>,
    /// `builtin` or `upstream`. Required.
    pub kind: BotKind,
    /// For `upstream`: the bot's messaging endpoint, e.g. `http://127.0.0.1:3978/api/messages`.
    #[serde(default)]
    pub endpoint: String,
    /// For `builtin`: the topics.
    #[serde(default)]
    pub topics: Vec<TopicConfig>,
    /// For a bot in the configuration file: the author who reads its analytics and opens test
    /// chats with it (tenant admins always can). Default none. Ignored through the API, where
    /// the creator owns the bot.
    #[serde(default, skip_serializing)]
    pub owner: Option<String>,
    /// For `builtin`: the reply to a message that carries files, with `{{names}}` (the files'
    /// names, comma-separated) and `{{count}}` filled in. Default
    /// `Thank you, I received {{names}}.` (see [`DEFAULT_ATTACHMENT_REPLY`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment_reply: Option<String>,
}

/// A built-in bot's reply to files, unless it names its own.
pub const DEFAULT_ATTACHMENT_REPLY: &str = "Thank you, I received {{names}}.";

fn default_true() -> bool {
    true
}
fn default_origins() -> Vec<String> {
    vec!["*".to_string()]
}

impl BotConfig {
    pub(crate) fn validate(&self, key: &str) -> Result<(), Invalid> {
        validate_id(&format!("{key}.id"), &self.id)?;
        if self.name.trim().is_empty() {
            return Err(invalid(format!("{key}.name"), "must not be empty"));
        }
        if self.channel_secrets.len() > 2 {
            return Err(invalid(format!("{key}.channel_secrets"), "a bot has at most two secrets"));
        }
        for (i, s) in self.channel_secrets.iter().enumerate() {
            if s.len() < 16 {
                return Err(invalid(format!("{key}.channel_secrets[{i}]"), "must be at least 16 characters"));
            }
        }
        for (i, o) in self.allowed_origins.iter().enumerate() {
            if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                return Err(invalid(
                    format!("{key}.allowed_origins[{i}]"),
                    "must be `*` or an origin such as https://www.example.com",
                ));
            }
        }
        match self.kind {
            BotKind::Upstream => {
                if !self.endpoint.starts_with("http://") && !self.endpoint.starts_with("https://") {
                    return Err(invalid(
                        format!("{key}.endpoint"),
                        "an upstream bot needs an http:// or https:// endpoint",
                    ));
                }
                if !self.topics.is_empty() {
                    return Err(invalid(format!("{key}.topics"), "an upstream bot has no topics"));
                }
            }
            BotKind::Builtin => {
                if !self.endpoint.is_empty() {
                    return Err(invalid(format!("{key}.endpoint"), "a built-in bot has no endpoint"));
                }
                validate_topics(key, &self.topics)?;
            }
        }
        if let Some(r) = &self.attachment_reply {
            if self.kind == BotKind::Upstream {
                return Err(invalid(
                    format!("{key}.attachment_reply"),
                    "an upstream bot answers files itself",
                ));
            }
            if r.trim().is_empty() || r.len() > 2000 {
                return Err(invalid(format!("{key}.attachment_reply"), "must be 1 to 2000 characters"));
            }
        }
        Ok(())
    }
}

/// Checks a built-in bot's topics: system topics name their role, user topics have triggers,
/// every topic has a reply, and there is exactly one fallback.
pub(crate) fn validate_topics(key: &str, topics: &[TopicConfig]) -> Result<(), Invalid> {
    let mut fallbacks = 0;
    for (i, t) in topics.iter().enumerate() {
        let tk = format!("{key}.topics[{i}]");
        if t.replies.is_empty() || t.replies.iter().any(|r| r.trim().is_empty()) {
            return Err(invalid(format!("{tk}.replies"), "needs at least one non-empty reply"));
        }
        match (t.kind, t.system) {
            (TopicKind::User, Some(_)) => {
                return Err(invalid(format!("{tk}.system"), "only system topics have a `system` role"));
            }
            (TopicKind::User, None) if t.triggers.is_empty() => {
                return Err(invalid(
                    format!("{tk}.triggers"),
                    "a user topic needs at least one trigger phrase",
                ));
            }
            (TopicKind::System, None) => {
                return Err(invalid(
                    format!("{tk}.system"),
                    "a system topic names its role: greeting, fallback, escalate or end_of_conversation",
                ));
            }
            (TopicKind::System, Some(SystemTopic::Fallback)) => fallbacks += 1,
            (TopicKind::System, Some(SystemTopic::Escalate | SystemTopic::EndOfConversation))
                if t.triggers.is_empty() =>
            {
                return Err(invalid(
                    format!("{tk}.triggers"),
                    "escalate and end_of_conversation need trigger phrases",
                ));
            }
            _ => {}
        }
        if t.triggers.iter().any(|p| p.trim().is_empty()) {
            return Err(invalid(format!("{tk}.triggers"), "trigger phrases must not be empty"));
        }
        match (&t.flow, &t.fallback_reply) {
            (Some(flow), fallback) => {
                if fallback.as_deref().is_none_or(|f| f.trim().is_empty()) {
                    return Err(invalid(
                        format!("{tk}.fallback_reply"),
                        "a topic with a flow needs a non-empty fallback_reply, sent when the flow fails",
                    ));
                }
                validate_flow(&format!("{tk}.flow"), flow)?;
            }
            (None, Some(_)) => {
                return Err(invalid(
                    format!("{tk}.fallback_reply"),
                    "only a topic with a flow has a fallback_reply",
                ));
            }
            (None, None) => {}
        }
    }
    if fallbacks != 1 {
        return Err(invalid(format!("{key}.topics"), "a built-in bot needs exactly one fallback topic"));
    }
    Ok(())
}

/// Checks a flow's shape (the outbound policy is checked by the caller, which has it).
fn validate_flow(key: &str, f: &FlowConfig) -> Result<(), Invalid> {
    let uri =
        f.url.parse::<http::Uri>().ok().filter(|u| u.scheme_str() == Some("http") && u.host().is_some());
    if uri.is_none() {
        return Err(invalid(format!("{key}.url"), "needs an http:// URL with a host"));
    }
    if f.timeout_ms == 0 || f.timeout_ms > MAX_FLOW_TIMEOUT_MS {
        return Err(invalid(format!("{key}.timeout_ms"), format!("must be 1 to {MAX_FLOW_TIMEOUT_MS} ms")));
    }
    for name in f.variables.keys() {
        let word = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !word {
            return Err(invalid(
                format!("{key}.variables"),
                format!("`{name}` is not a variable name (1 to 64 of A-Z a-z 0-9 _)"),
            ));
        }
        if crate::bots::flow::BUILTIN_VALUES.contains(&name.as_str()) {
            return Err(invalid(
                format!("{key}.variables"),
                format!("`{name}` is a built-in value; name the variable otherwise"),
            ));
        }
    }
    let Some(body) = &f.body else { return Ok(()) };
    if f.method == FlowMethod::Get {
        return Err(invalid(format!("{key}.body"), "a GET flow sends no body"));
    }
    let mut names = Vec::new();
    crate::bots::flow::body_placeholders(body, &mut names);
    for name in names {
        if !crate::bots::flow::BUILTIN_VALUES.contains(&name.as_str()) && !f.variables.contains_key(&name) {
            return Err(invalid(
                format!("{key}.body"),
                format!(
                    "`{{{{{name}}}}}` is neither a built-in value (text, conversation_id, user_id, bot_id) nor one of the flow's variables"
                ),
            ));
        }
    }
    Ok(())
}

impl BotConfig {
    /// The flow URLs of its topics, with their keys under `key` (`bots[0].topics[2].flow.url`).
    pub fn flow_urls<'a>(&'a self, key: &'a str) -> impl Iterator<Item = (String, &'a str)> + 'a {
        self.topics.iter().enumerate().filter_map(move |(i, t)| {
            t.flow.as_ref().map(|f| (format!("{key}.topics[{i}].flow.url"), f.url.as_str()))
        })
    }
}
