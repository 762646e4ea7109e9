//! `[channel]`: the Direct Line channel, its bounds, and file uploads.

use serde::Deserialize;

use super::{Invalid, invalid};

fn default_token_ttl_secs() -> u64 {
    1800
}
fn default_max_conversations_per_tenant() -> usize {
    250_000
}
fn default_max_conversations_per_bot() -> usize {
    100_000
}
fn default_max_conversations() -> usize {
    1_000_000
}
fn default_max_retained_activities() -> usize {
    500
}
fn default_max_retained_bytes() -> usize {
    1024 * 1024
}
fn default_max_retained_bytes_per_bot() -> usize {
    512 * 1024 * 1024
}
fn default_max_page_activities() -> usize {
    100
}
fn default_max_page_bytes() -> usize {
    256 * 1024
}
fn default_stream_write_timeout_ms() -> u64 {
    10_000
}
fn default_test_chat_token_ttl_secs() -> u64 {
    3600
}
fn default_max_test_chats_per_author() -> usize {
    10
}
fn default_idle_timeout_secs() -> u64 {
    1800
}
fn default_sweep_interval_secs() -> u64 {
    30
}
fn default_max_upload_bytes() -> usize {
    4 * 1024 * 1024
}
fn default_max_concurrent_uploads() -> usize {
    32
}
fn default_max_upload_files() -> usize {
    10
}
fn default_max_upload_bytes_per_conversation() -> usize {
    16 * 1024 * 1024
}
fn default_max_upload_bytes_per_bot() -> usize {
    256 * 1024 * 1024
}
fn default_max_upload_bytes_stored() -> usize {
    1024 * 1024 * 1024
}
/// Images, PDF, plain text and CSV, and the office formats.
fn default_upload_content_types() -> Vec<String> {
    [
        "image/png",
        "image/jpeg",
        "image/gif",
        "image/webp",
        "application/pdf",
        "text/plain",
        "text/csv",
        "application/msword",
        "application/vnd.ms-excel",
        "application/vnd.ms-powerpoint",
        "application/vnd.openxmlformats-officedocument.*",
    ]
    .map(String::from)
    .to_vec()
}

/// Where uploaded files are kept until their conversation ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UploadStorage {
    /// Files in `<store.data_dir>/uploads`, emptied at start.
    #[default]
    Disk,
    /// Files in memory.
    Memory,
}

/// `[channel]`: the Direct Line channel.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    /// Lifetime of a Direct Line token, in seconds (`expires_in`). Default 1800.
    #[serde(default = "default_token_ttl_secs")]
    pub token_ttl_secs: u64,
    /// Most conversations held at once; a new one beyond it is 503 `Overloaded`. Default 1000000.
    #[serde(default = "default_max_conversations")]
    pub max_conversations: usize,
    /// Most conversations of one tenant's bots held at once, so one tenant's flood cannot take
    /// the gateway from the others; beyond it the tenant's new conversations are 503
    /// `Overloaded`. Default 250000.
    #[serde(default = "default_max_conversations_per_tenant")]
    pub max_conversations_per_tenant: usize,
    /// Most conversations of one bot held at once; beyond it its new conversations are 503
    /// `Overloaded`. Default 100000.
    #[serde(default = "default_max_conversations_per_bot")]
    pub max_conversations_per_bot: usize,
    /// Most activities a conversation keeps for polling; older ones are dropped (a client that
    /// polls with an older watermark gets what is left). Default 500.
    #[serde(default = "default_max_retained_activities")]
    pub max_retained_activities: usize,
    /// Most bytes of activities a conversation keeps (their JSON); the oldest are dropped
    /// beyond it, the newest is always kept. Default 1048576 (1 MiB).
    #[serde(default = "default_max_retained_bytes")]
    pub max_retained_bytes: usize,
    /// Most bytes of activities all conversations of one bot hold; beyond it the bot's users'
    /// activities are 503 `Overloaded` until conversations end or drop old activities, so a
    /// flood spread over many conversations stays bounded. Default 536870912 (512 MiB).
    #[serde(default = "default_max_retained_bytes_per_bot")]
    pub max_retained_bytes_per_bot: usize,
    /// Most activities one `GET .../activities` answer or one WebSocket frame carries; the
    /// answer's watermark continues after the last one, so the next poll gets the rest.
    /// Default 100.
    #[serde(default = "default_max_page_activities")]
    pub max_page_activities: usize,
    /// Most bytes of activities one answer or frame carries (at least one activity is always
    /// sent). Default 262144.
    #[serde(default = "default_max_page_bytes")]
    pub max_page_bytes: usize,
    /// Time one WebSocket frame may take to be written to the client, in milliseconds; a
    /// slower reader is disconnected rather than buffered for. Default 10000.
    #[serde(default = "default_stream_write_timeout_ms")]
    pub stream_write_timeout_ms: u64,
    /// A test-chat token's whole life in seconds, refreshes included: `tokens/refresh` never
    /// moves its expiry past this much after the author opened the test chat. Default 3600.
    #[serde(default = "default_test_chat_token_ttl_secs")]
    pub test_chat_token_ttl_secs: u64,
    /// Test conversations one author may hold at once; one more is 429 `TooManyTestChats`.
    /// Default 10.
    #[serde(default = "default_max_test_chats_per_author")]
    pub max_test_chats_per_author: usize,
    /// Open-bot tokens (`GET /api/v1/bots/{id}/directline/token`) one client address may get
    /// per minute; beyond it 429 `RateLimited`. 0 (the default) is no limit. Behind a proxy,
    /// list it in `server.trusted_proxies`, or every client counts as the proxy.
    #[serde(default)]
    pub open_token_rate_per_minute: u32,
    /// A conversation with no user message for this long ends (its id answers 404), in seconds.
    /// Default 1800, matching the billed-session idle rule.
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// How often ended conversations are swept from memory, in seconds. Default 30.
    #[serde(default = "default_sweep_interval_secs")]
    pub sweep_interval_secs: u64,
    /// Most bytes of one upload request (`POST .../upload`, all its files and parts); beyond it
    /// 413 `PayloadTooLarge`. Default 4194304 (4 MiB), the Direct Line service's limit.
    #[serde(default = "default_max_upload_bytes")]
    pub max_upload_bytes: usize,
    /// Uploads this node reads at once (each holds up to `max_upload_bytes` in memory while it
    /// is read); one more is 503 `Overloaded` before its body is read. Default 32.
    #[serde(default = "default_max_concurrent_uploads")]
    pub max_concurrent_uploads: usize,
    /// Most files in one upload; more is 400 `TooManyFiles`. Default 10.
    #[serde(default = "default_max_upload_files")]
    pub max_upload_files: usize,
    /// Most bytes of files one conversation holds; an upload beyond it is 413
    /// `UploadBudgetExceeded`. Default 16777216 (16 MiB).
    #[serde(default = "default_max_upload_bytes_per_conversation")]
    pub max_upload_bytes_per_conversation: usize,
    /// Most bytes of files all conversations of one bot hold; beyond it the bot's uploads are
    /// 503 `Overloaded` until conversations end. Default 268435456 (256 MiB).
    #[serde(default = "default_max_upload_bytes_per_bot")]
    pub max_upload_bytes_per_bot: usize,
    /// Most bytes of files this node holds, on disk or in memory; beyond it uploads are 503
    /// `Overloaded`. Default 1073741824 (1 GiB).
    #[serde(default = "default_max_upload_bytes_stored")]
    pub max_upload_bytes_stored: usize,
    /// Where files are kept until their conversation ends: `disk` (`<store.data_dir>/uploads`,
    /// emptied at start) or `memory`. Default `disk`.
    #[serde(default)]
    pub upload_storage: UploadStorage,
    /// Content types a file may have: `type/subtype`, or a prefix ending in `*`
    /// (`image/*`, `*` for any). Any other is 415 `UnsupportedMediaType`; an empty list turns
    /// uploads off. Default: PNG, JPEG, GIF and WebP images, PDF, plain text, CSV and the office
    /// formats.
    #[serde(default = "default_upload_content_types")]
    pub upload_content_types: Vec<String>,
}

impl ChannelConfig {
    /// Whether a file of `content_type` may be uploaded (the parameters after `;` are ignored,
    /// case is not significant).
    pub fn upload_allowed(&self, content_type: &str) -> bool {
        let ct = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        !ct.is_empty()
            && self.upload_content_types.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => ct.starts_with(&prefix.to_ascii_lowercase()),
                None => ct == p.to_ascii_lowercase(),
            })
    }
}

impl Default for ChannelConfig {
    fn default() -> Self {
        Self {
            token_ttl_secs: default_token_ttl_secs(),
            max_conversations: default_max_conversations(),
            max_conversations_per_tenant: default_max_conversations_per_tenant(),
            max_conversations_per_bot: default_max_conversations_per_bot(),
            max_retained_activities: default_max_retained_activities(),
            max_retained_bytes: default_max_retained_bytes(),
            max_retained_bytes_per_bot: default_max_retained_bytes_per_bot(),
            max_page_activities: default_max_page_activities(),
            max_page_bytes: default_max_page_bytes(),
            stream_write_timeout_ms: default_stream_write_timeout_ms(),
            test_chat_token_ttl_secs: default_test_chat_token_ttl_secs(),
            max_test_chats_per_author: default_max_test_chats_per_author(),
            open_token_rate_per_minute: 0,
            idle_timeout_secs: default_idle_timeout_secs(),
            sweep_interval_secs: default_sweep_interval_secs(),
            max_upload_bytes: default_max_upload_bytes(),
            max_concurrent_uploads: default_max_concurrent_uploads(),
            max_upload_files: default_max_upload_files(),
            max_upload_bytes_per_conversation: default_max_upload_bytes_per_conversation(),
            max_upload_bytes_per_bot: default_max_upload_bytes_per_bot(),
            max_upload_bytes_stored: default_max_upload_bytes_stored(),
            upload_storage: UploadStorage::default(),
            upload_content_types: default_upload_content_types(),
        }
    }
}

impl ChannelConfig {
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        if self.token_ttl_secs == 0 {
            return Err(invalid("channel.token_ttl_secs", "must be at least 1"));
        }
        if self.max_conversations_per_tenant == 0 {
            return Err(invalid("channel.max_conversations_per_tenant", "must be at least 1"));
        }
        if self.max_conversations_per_bot == 0 {
            return Err(invalid("channel.max_conversations_per_bot", "must be at least 1"));
        }
        if self.max_conversations == 0 {
            return Err(invalid("channel.max_conversations", "must be at least 1"));
        }
        if self.max_retained_activities == 0 {
            return Err(invalid("channel.max_retained_activities", "must be at least 1"));
        }
        if self.max_retained_bytes < 1024 {
            return Err(invalid("channel.max_retained_bytes", "must be at least 1024"));
        }
        if self.max_retained_bytes_per_bot < self.max_retained_bytes {
            return Err(invalid(
                "channel.max_retained_bytes_per_bot",
                "must be at least channel.max_retained_bytes",
            ));
        }
        if self.max_page_activities == 0 {
            return Err(invalid("channel.max_page_activities", "must be at least 1"));
        }
        if self.max_page_bytes < 1024 {
            return Err(invalid("channel.max_page_bytes", "must be at least 1024"));
        }
        if self.test_chat_token_ttl_secs == 0 {
            return Err(invalid("channel.test_chat_token_ttl_secs", "must be at least 1"));
        }
        if self.max_test_chats_per_author == 0 {
            return Err(invalid("channel.max_test_chats_per_author", "must be at least 1"));
        }
        if self.stream_write_timeout_ms == 0 {
            return Err(invalid("channel.stream_write_timeout_ms", "must be at least 1"));
        }
        if self.idle_timeout_secs == 0 {
            return Err(invalid("channel.idle_timeout_secs", "must be at least 1"));
        }
        if self.sweep_interval_secs == 0 {
            return Err(invalid("channel.sweep_interval_secs", "must be at least 1"));
        }
        if self.max_upload_bytes < 1024 {
            return Err(invalid("channel.max_upload_bytes", "must be at least 1024"));
        }
        if self.max_concurrent_uploads == 0 {
            return Err(invalid("channel.max_concurrent_uploads", "must be at least 1"));
        }
        if self.max_upload_files == 0 {
            return Err(invalid("channel.max_upload_files", "must be at least 1"));
        }
        if self.max_upload_bytes_per_conversation < self.max_upload_bytes {
            return Err(invalid(
                "channel.max_upload_bytes_per_conversation",
                "must be at least channel.max_upload_bytes",
            ));
        }
        if self.max_upload_bytes_per_bot < self.max_upload_bytes_per_conversation {
            return Err(invalid(
                "channel.max_upload_bytes_per_bot",
                "must be at least channel.max_upload_bytes_per_conversation",
            ));
        }
        if self.max_upload_bytes_stored < self.max_upload_bytes_per_conversation {
            return Err(invalid(
                "channel.max_upload_bytes_stored",
                "must be at least channel.max_upload_bytes_per_conversation",
            ));
        }
        for t in &self.upload_content_types {
            let well_formed = t == "*"
                || t.split_once('/').is_some_and(|(a, b)| {
                    !a.is_empty()
                        && !b.is_empty()
                        && !a.contains('*')
                        && (b == "*" || b.ends_with('*') || !b.contains('*'))
                        && t.bytes().all(|c| c.is_ascii_alphanumeric() || b"/.+-_*".contains(&c))
                });
            if !well_formed {
                return Err(invalid(
                    "channel.upload_content_types",
                    "each is `type/subtype`, or a prefix ending in `*` such as `image/*`",
                ));
            }
        }
        Ok(())
    }
}
