//! Typed configuration: every key, its meaning, unit and default, and its validation.
//!
//! Loading is `load(path) -> from_str -> validate()`; an invalid file fails with the file, the key
//! and what is wrong. `config/default.toml` is compiled into the binary as the embedded default.

mod bots;
mod channel;
pub mod notifications;
mod sections;
mod tenants;

use std::path::Path;

use serde::Deserialize;

pub use bots::{
    BotConfig, BotKind, DEFAULT_ATTACHMENT_REPLY, DEFAULT_FLOW_TIMEOUT_MS, FlowConfig, FlowMethod,
    MAX_FLOW_TIMEOUT_MS, SystemTopic, TopicConfig, TopicKind,
};
pub use channel::{ChannelConfig, UploadStorage};
pub use notifications::{NotificationsConfig, OperatorEndpoint};
pub use sections::{
    ClusterConfig, IdentityConfig, IssuerConfig, LicensingConfig, MeteringConfig, MetricsConfig,
    OperatorConfig, OutagePolicy, OutboundConfig, RedisMode, ServerConfig, SqliteSync, StoreBackend,
    StoreConfig, TENANT_PLACEHOLDER, UpstreamConfig,
};
pub use tenants::{CapacityPolicy, SubscriptionConfig, SubscriptionKind, TenantConfig};

/// The text of `config/default.toml`, compiled in so that the binary serves the demo from anywhere.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/default.toml");

/// Where the embedded default says it comes from in messages.
pub const EMBEDDED_NAME: &str = "config/default.toml (embedded)";

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners, timeouts and limits of the HTTP servers.
    #[serde(default)]
    pub server: ServerConfig,
    /// Where state is kept.
    #[serde(default)]
    pub store: StoreConfig,
    /// The Direct Line channel: tokens, conversation limits, expiry.
    #[serde(default)]
    pub channel: ChannelConfig,
    /// Calls to upstream (Bot Framework) bots.
    #[serde(default)]
    pub upstream: UpstreamConfig,
    /// Where the gateway's own calls may go.
    #[serde(default)]
    pub outbound: OutboundConfig,
    /// Billed-session rules and the usage ledger.
    #[serde(default)]
    pub metering: MeteringConfig,
    /// Prometheus exposition limits.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// How bot authors' JWTs are checked.
    #[serde(default)]
    pub identity: IdentityConfig,
    /// Trials and their grace period.
    #[serde(default)]
    pub licensing: LicensingConfig,
    /// Several nodes sharing Redis.
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// The platform operator's credentials.
    #[serde(default)]
    pub operator: OperatorConfig,
    /// Signed webhooks to admins and the operator.
    #[serde(default)]
    pub notifications: NotificationsConfig,
    /// Tenants known at start-up, seeded into the store once (the operator API creates more).
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    /// Bots managed by this file: served from the start and read-only through the authoring API
    /// (more can be created through it).
    #[serde(default)]
    pub bots: Vec<BotConfig>,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read the file: {source}")]
    Read {
        /// The file.
        file: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML did not parse or did not match the schema (unknown key, wrong type).
    #[error("{file}: {message}")]
    Parse {
        /// The file.
        file: String,
        /// The parser's explanation, naming the key and the line.
        message: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("{file}: key `{key}`: {problem}")]
    Invalid {
        /// The file.
        file: String,
        /// The dotted key, e.g. `bots[0].tenant`.
        key: String,
        /// What is wrong.
        problem: String,
    },
}

/// A validation failure before a file name is attached.
#[derive(Debug)]
pub struct Invalid {
    /// The dotted key.
    pub key: String,
    /// What is wrong.
    pub problem: String,
}

pub(crate) fn invalid(key: impl Into<String>, problem: impl Into<String>) -> Invalid {
    Invalid { key: key.into(), problem: problem.into() }
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { file: file.clone(), source })?;
        Self::from_str(&text, &file)
    }

    /// The embedded default configuration, validated.
    pub fn embedded_default() -> Result<Self, ConfigError> {
        Self::from_str(EMBEDDED_DEFAULT, EMBEDDED_NAME)
    }

    /// Parses and validates TOML text; `file` names it in errors.
    pub fn from_str(text: &str, file: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.validate().map_err(|Invalid { key, problem }| ConfigError::Invalid {
            file: file.to_string(),
            key,
            problem,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), Invalid> {
        self.server.validate()?;
        self.store.validate()?;
        self.channel.validate()?;
        self.upstream.validate()?;
        self.outbound.validate()?;
        let policy = crate::outbound::Policy::from_config(&self.outbound);
        self.metering.validate()?;
        self.metrics.validate()?;
        self.identity.validate(&policy)?;
        self.licensing.validate()?;
        self.cluster.validate()?;
        self.operator.validate()?;
        self.notifications.validate(&policy)?;
        let mut tenant_ids = std::collections::HashSet::new();
        for (i, t) in self.tenants.iter().enumerate() {
            t.validate(&format!("tenants[{i}]"))?;
            if !tenant_ids.insert(t.id.as_str()) {
                return Err(invalid(
                    format!("tenants[{i}].id"),
                    format!("tenant `{}` is defined twice", t.id),
                ));
            }
        }
        let mut bot_ids = std::collections::HashSet::new();
        for (i, b) in self.bots.iter().enumerate() {
            let key = format!("bots[{i}]");
            b.validate(&key)?;
            if !bot_ids.insert(b.id.as_str()) {
                return Err(invalid(format!("{key}.id"), format!("bot `{}` is defined twice", b.id)));
            }
            if !tenant_ids.contains(b.tenant.as_str()) {
                return Err(invalid(
                    format!("{key}.tenant"),
                    format!("tenant `{}` is not defined in [[tenants]]", b.tenant),
                ));
            }
            if b.kind == BotKind::Upstream
                && let Err(why) = policy.check_url(&b.endpoint)
            {
                return Err(invalid(format!("{key}.endpoint"), format!("the gateway cannot call it: {why}")));
            }
            for (url_key, url) in b.flow_urls(&key) {
                if let Err(why) = policy.check_url(url) {
                    return Err(invalid(url_key, format!("the gateway cannot call it: {why}")));
                }
            }
        }
        Ok(())
    }
}

/// Checks an identifier used in URLs and keys: 1 to 64 of `A-Za-z0-9_.-`.
pub(crate) fn validate_id(key: &str, id: &str) -> Result<(), Invalid> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(invalid(key, format!("`{id}` is not a valid id (1 to 64 of A-Z a-z 0-9 _ - .)")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::embedded_default().unwrap();
        assert!(c.bots.iter().any(|b| b.id == "helpdesk" && b.published));
        assert!(c.tenants.iter().any(|t| t.id == "contoso"));
    }

    #[test]
    fn every_file_in_config_dir_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 1);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_str("[server]\nlisten_port = 1\n", "x.toml").unwrap_err().to_string();
        assert!(err.starts_with("x.toml:"), "{err}");
        assert!(err.contains("listen_port"), "{err}");
    }

    #[test]
    fn bad_value_names_the_key() {
        let err = Config::from_str("[channel]\ntoken_ttl_secs = 0\n", "x.toml").unwrap_err().to_string();
        assert!(err.contains("channel.token_ttl_secs"), "{err}");
    }

    #[test]
    fn each_redis_mode_needs_its_own_keys() {
        let err = |text: &str| Config::from_str(text, "x.toml").unwrap_err().to_string();
        let redis = "[store]\nbackend = \"redis\"\n";
        assert!(err(&format!("{redis}redis_mode = \"sentinel\"\n")).contains("store.redis_sentinels"));
        let sentinel =
            format!("{redis}redis_mode = \"sentinel\"\nredis_sentinels = [\"redis://127.0.0.1:26379/\"]\n");
        assert!(err(&sentinel).contains("store.redis_master_name"));
        let named =
            Config::from_str(&format!("{sentinel}redis_master_name = \"botgate\"\n"), "x.toml").unwrap();
        assert_eq!(named.store.redis_mode, RedisMode::Sentinel);
        assert!(err(&format!("{redis}redis_mode = \"cluster\"\n")).contains("store.redis_cluster_nodes"));
        assert!(
            err(&format!("{redis}redis_mode = \"cluster\"\nredis_cluster_nodes = [\"10.0.0.1:6379\"]\n"))
                .contains("store.redis_cluster_nodes")
        );
        assert!(err(&format!("{redis}redis_mode = \"ring\"\n")).contains("redis_mode"));
        let cluster =
            format!("{redis}redis_mode = \"cluster\"\nredis_cluster_nodes = [\"redis://127.0.0.1:7000/\"]\n");
        assert!(
            err(&format!("{cluster}[cluster]\nledger_wait_timeout_ms = 0\n"))
                .contains("cluster.ledger_wait_timeout_ms")
        );
        let waits =
            Config::from_str(&format!("{cluster}[cluster]\nledger_wait_replicas = 1\n"), "x.toml").unwrap();
        assert_eq!((waits.cluster.ledger_wait_replicas, waits.cluster.ledger_wait_timeout_ms), (1, 1000));
    }

    #[test]
    fn tls_urls_are_all_or_nothing_and_the_ca_needs_them() {
        let err = |text: &str| Config::from_str(text, "x.toml").unwrap_err().to_string();
        let redis = "[store]\nbackend = \"redis\"\n";
        let tls =
            Config::from_str(&format!("{redis}redis_url = \"rediss://cache:6380/\"\n"), "x.toml").unwrap();
        assert!(tls.store.redis_tls());
        let mixed = format!(
            "{redis}redis_mode = \"cluster\"\nredis_cluster_nodes = [\"rediss://a:6379/\", \"redis://b:6379/\"]\n"
        );
        assert!(err(&mixed).contains("every entry or for none"), "{}", err(&mixed));
        let ca = format!("{redis}redis_url = \"redis://cache:6379/\"\nredis_tls_ca = \"/etc/ca.pem\"\n");
        assert!(err(&ca).contains("store.redis_tls_ca"), "{}", err(&ca));
    }

    #[test]
    fn bot_of_unknown_tenant_is_refused() {
        let text = r#"
[[bots]]
id = "b"
tenant = "nobody"
name = "B"
kind = "upstream"
endpoint = "http://127.0.0.1:1/api/messages"
"#;
        let err = Config::from_str(text, "x.toml").unwrap_err().to_string();
        assert!(err.contains("bots[0].tenant"), "{err}");
    }

    #[test]
    fn more_licensed_users_than_seats_is_refused() {
        let tenant = |users: &str| {
            format!(
                "[[tenants]]\nid = \"t\"\nsubscriptions = [{{ kind = \"user_licenses\", quantity = 1 }}]\n\
                 licensed_users = [{users}]\n"
            )
        };
        let err = Config::from_str(&tenant(r#""a", "b", "c""#), "x.toml").unwrap_err().to_string();
        assert!(err.contains("tenants[0].licensed_users") && err.contains("3 users"), "{err}");
        assert!(
            Config::from_str(&tenant(r#""a", "a""#), "x.toml").is_ok(),
            "one user listed twice takes one seat"
        );
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::from_str("", "x.toml").unwrap();
        assert_eq!(c.server.listen.port(), 8080);
        assert_eq!(c.server.admin_listen.port(), 9464);
        assert_eq!(c.server.max_body_bytes, 256 * 1024);
        assert_eq!(c.channel.token_ttl_secs, 1800);
    }
}
