//! The Direct Line 3.0 channel that bot users reach anonymously: tokens, conversations,
//! activities, the WebSocket stream, the connector bots call back on, and CORS.

pub mod activity;
pub mod auth;
pub mod client_rate;
pub mod connector;
pub mod cors;
pub mod directline;
pub mod stream;
pub mod token;
pub mod turn;
pub mod upload;

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, StatusCode, header};

use crate::bots::upstream::UpstreamClient;
use crate::bots::{Bot, BotRegistry, secrets};
use crate::clock::SharedClock;
use crate::config::Config;
use crate::conversation::files::FileStore;
use crate::conversation::registry::{Caps, Conversations, CreateError};
use crate::conversation::{Conversation, Page, Retention};
use crate::error::ApiError;
use crate::metering::Metering;
use crate::outbound::OutboundClient;
use token::{Claims, TokenSigner};

/// The channel's state; shared through `AppState`.
pub struct Channel {
    /// Signs and checks Direct Line tokens.
    pub signer: TokenSigner,
    /// The bots.
    pub bots: BotRegistry,
    /// The conversations.
    pub conversations: Conversations,
    /// The files uploaded into them.
    pub files: Arc<FileStore>,
    /// The one client of every outbound call (upstream bots use it through `upstream`; topic
    /// flows call it directly).
    pub outbound: OutboundClient,
    /// Calls to upstream bots.
    pub upstream: UpstreamClient,
    /// Billed-session metering.
    pub metering: Metering,
    /// The clock.
    pub clock: SharedClock,
    /// Token lifetime, seconds.
    pub token_ttl_secs: i64,
    /// A test-chat token's whole life, refreshes included, seconds.
    pub test_chat_ttl_secs: i64,
    /// What each conversation keeps.
    pub retention: Retention,
    /// Bytes of activities one bot's conversations may hold.
    pub max_bot_bytes: usize,
    /// What one poll answer or WebSocket frame carries.
    pub page: Page,
    /// Time one WebSocket frame may take to be written.
    pub stream_write_timeout: Duration,
    /// The base of the callback `serviceUrl` (without the connector path).
    pub service_base: String,
    /// The configured public URL, if any (decides ws:// or wss:// stream URLs).
    pub public_url: String,
    /// Whether the listeners serve TLS (`wss://` stream URLs when no public URL is set).
    pub tls: bool,
    /// Open-bot tokens per client address, if configured.
    pub client_rate: Option<client_rate::ClientRate>,
    /// This node's id when several nodes share Redis: it prefixes the ids of the conversations
    /// this node owns (`node.random`), so any node can route a request to the owner.
    pub node: Option<String>,
}

impl Channel {
    /// Builds the channel: registers the configured bots.
    pub fn new(
        config: &Config,
        signer: TokenSigner,
        metering: Metering,
        clock: SharedClock,
        public_addr: std::net::SocketAddr,
        files: FileStore,
    ) -> Self {
        let bots = BotRegistry::default();
        for b in &config.bots {
            let bot = Bot::from_config(b, secrets::random_id(24), config.upstream.max_concurrency_per_bot);
            // Resolve the bot's counters now so they are exported from the start.
            let _ = metering.counters(&bot.tenant, &bot.id);
            bots.insert(Arc::new(bot));
        }
        let service_base = if config.server.public_url.is_empty() {
            let scheme = if config.server.tls_cert.is_some() { "https" } else { "http" };
            format!("{scheme}://{public_addr}")
        } else {
            config.server.public_url.trim_end_matches('/').to_string()
        };
        let outbound = OutboundClient::new(
            Duration::from_millis(config.upstream.connect_timeout_ms),
            crate::outbound::Policy::from_config(&config.outbound),
            config.outbound.max_response_bytes,
        );
        Self {
            signer,
            bots,
            conversations: Conversations::with_caps(
                Caps {
                    total: config.channel.max_conversations,
                    per_tenant: config.channel.max_conversations_per_tenant,
                    per_bot: config.channel.max_conversations_per_bot,
                    per_test_author: config.channel.max_test_chats_per_author,
                },
                config.channel.idle_timeout_secs as i64 * 1000,
            ),
            files: Arc::new(files),
            upstream: UpstreamClient::new(
                outbound.clone(),
                Duration::from_secs(config.upstream.timeout_secs),
            ),
            outbound,
            metering,
            clock,
            token_ttl_secs: config.channel.token_ttl_secs as i64,
            test_chat_ttl_secs: config.channel.test_chat_token_ttl_secs as i64,
            retention: Retention {
                activities: config.channel.max_retained_activities,
                bytes: config.channel.max_retained_bytes,
            },
            max_bot_bytes: config.channel.max_retained_bytes_per_bot,
            page: Page {
                activities: config.channel.max_page_activities,
                bytes: config.channel.max_page_bytes,
            },
            stream_write_timeout: Duration::from_millis(config.channel.stream_write_timeout_ms),
            service_base,
            public_url: config.server.public_url.clone(),
            tls: config.server.tls_cert.is_some(),
            client_rate: (config.channel.open_token_rate_per_minute > 0).then(|| {
                client_rate::ClientRate::new(
                    config.channel.open_token_rate_per_minute,
                    config
                        .server
                        .trusted_proxies
                        .iter()
                        .filter_map(|n| crate::outbound::Network::parse(n))
                        .collect(),
                )
            }),
            node: None,
        }
    }

    /// A new token for `claims` with a fresh expiry (never past the claims' `until`); returns
    /// it and its lifetime in seconds.
    pub fn issue(&self, mut claims: Claims) -> (String, i64) {
        let now = self.clock.now_secs();
        claims.exp = now + self.token_ttl_secs;
        if claims.until > 0 {
            claims.exp = claims.exp.min(claims.until);
        }
        (self.signer.sign(&claims), claims.exp - now)
    }

    /// Claims for a new conversation of `bot`.
    pub fn new_claims(&self, bot: &Bot, user: Option<String>, slot: u8, test_chat: bool) -> Claims {
        Claims {
            bot: bot.id.clone(),
            conversation: match &self.node {
                Some(node) => format!("{node}.{}", new_conversation_id()),
                None => new_conversation_id(),
            },
            user,
            exp: 0,
            slot,
            generation: bot.control.generation(slot),
            instance: bot.control.instance().to_string(),
            test_chat,
            until: if test_chat { self.clock.now_secs() + self.test_chat_ttl_secs } else { 0 },
            origins: Vec::new(),
        }
    }

    /// The live bot of `id`, for a credential.
    pub fn bot(&self, id: &str) -> Result<Arc<Bot>, ApiError> {
        self.bots.get(id).ok_or_else(|| {
            ApiError::new(StatusCode::FORBIDDEN, "BotNotFound", "There is no bot with this id.")
        })
    }

    /// The live conversation `id`, or 404.
    pub fn conversation(&self, id: &str) -> Result<Arc<Conversation>, ApiError> {
        self.conversations.get(id, self.clock.now_ms()).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "ConversationNotFound",
                "There is no such conversation, or it ended. Start a new conversation.",
            )
        })
    }

    /// Starts (or finds) the conversation of `claims`; returns it and whether it is new.
    pub fn start(&self, bot: &Arc<Bot>, claims: &Claims) -> Result<(Arc<Conversation>, bool), ApiError> {
        let now = self.clock.now_ms();
        let test_author = claims.user.as_deref().filter(|_| claims.test_chat);
        self.conversations
            .get_or_create(&claims.conversation, now, (&bot.tenant, &bot.id, test_author), || {
                let meter = self.metering.meter_for(&bot.tenant, &bot.id, !claims.test_chat);
                Conversation::new(
                    Arc::from(claims.conversation.as_str()),
                    bot.clone(),
                    meter,
                    now,
                    self.retention,
                )
                .with_test_author(test_author)
            })
            .map_err(|e| {
                let message = match e {
                    CreateError::Full => {
                        tracing::warn!("The conversation cap is reached; refusing a new conversation.");
                        "The gateway is holding as many conversations as it can. Try again shortly."
                    }
                    CreateError::TenantFull => {
                        tracing::debug!(tenant = %bot.tenant, "A tenant's conversation cap is reached.");
                        "The gateway is holding as many conversations as it allows this bot's organization. \
                         Try again shortly."
                    }
                    CreateError::BotFull => {
                        tracing::debug!(bot = %bot.id, "A bot's conversation cap is reached.");
                        "The gateway is holding as many conversations as it allows this bot. Try again shortly."
                    }
                    CreateError::TestAuthorFull => {
                        return ApiError::new(
                            StatusCode::TOO_MANY_REQUESTS,
                            "TooManyTestChats",
                            "You have as many test conversations open as an author may; they end after \
                             `channel.idle_timeout_secs` without a message.",
                        );
                    }
                };
                ApiError::unavailable("Overloaded", message).with_retry_after(30)
            })
    }

    /// The WebSocket URL of a conversation, for a request that reached us with `headers`.
    pub fn stream_url(
        &self,
        headers: &HeaderMap,
        conversation: &str,
        token: &str,
        watermark: Option<u64>,
    ) -> String {
        let (scheme, host) = if self.public_url.is_empty() {
            let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
            (if self.tls { "wss" } else { "ws" }, host.to_string())
        } else if let Some(rest) = self.public_url.strip_prefix("https://") {
            ("wss", rest.trim_end_matches('/').to_string())
        } else {
            ("ws", self.public_url.trim_start_matches("http://").trim_end_matches('/').to_string())
        };
        let mut url =
            format!("{scheme}://{host}/v3/directline/conversations/{conversation}/stream?t={token}");
        if let Some(w) = watermark {
            url.push_str(&format!("&watermark={w}"));
        }
        url
    }
}

/// The node that owns a conversation (several nodes): the part of its id before the dot.
pub fn owner_of(conversation: &str) -> Option<&str> {
    conversation.split_once('.').map(|(node, _)| node)
}

/// A new conversation id: 128 random bits, url-safe.
pub fn new_conversation_id() -> String {
    secrets::random_id(16)
}
