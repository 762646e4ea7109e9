//! The scalar sections of the configuration: server, store, upstream, metering, metrics (the
//! channel's is in `channel`).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::{Invalid, invalid};

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}
fn default_request_timeout_secs() -> u64 {
    30
}
fn default_shutdown_grace_secs() -> u64 {
    10
}
fn default_max_body_bytes() -> usize {
    256 * 1024
}
fn default_max_connections() -> usize {
    10_000
}
fn default_header_read_timeout_ms() -> u64 {
    10_000
}
fn default_keepalive_idle_ms() -> u64 {
    75_000
}
fn default_max_header_bytes() -> usize {
    32 * 1024
}

/// `[server]`: listeners, timeouts and limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the public listener (Direct Line channel, authoring and admin APIs,
    /// bot callbacks). Default `127.0.0.1:8080`; port 0 picks a free port.
    /// Overridden by `--listen` / `BOTGATE_LISTEN`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Address of the operations listener (`/metrics`, `/healthz`, `/readyz`).
    /// Default `127.0.0.1:9464`. Overridden by `--admin-listen` / `BOTGATE_ADMIN_LISTEN`.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// The base URL bots and clients reach the public listener at, e.g.
    /// `https://chat.example.com`; used for the bot callback `serviceUrl`. Default: empty,
    /// meaning `http://<bound public address>`. WebSocket `streamUrl`s follow the request's Host.
    #[serde(default)]
    pub public_url: String,
    /// A PEM certificate chain: with `tls_key`, both listeners serve TLS (HTTP/2 or HTTP/1.1 by
    /// ALPN); SIGHUP reloads both files. Default: none (plain HTTP).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of `tls_cert` (PKCS#8, PKCS#1 or SEC1). Default: none.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Longest time one HTTP request may take before it is answered 504, in seconds. Default 30.
    /// WebSocket streams are not limited by it.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
    /// On SIGTERM or Ctrl-C, how long in-flight requests may take to finish, in seconds,
    /// before the server closes them. Default 10.
    #[serde(default = "default_shutdown_grace_secs")]
    pub shutdown_grace_secs: u64,
    /// Largest request body accepted, in bytes; larger is 413 `PayloadTooLarge`.
    /// Default 262144 (256 KiB, the Direct Line activity limit).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Open connections the public listener holds at most, WebSockets included; one more is
    /// answered 503 `TooManyConnections` and closed. Default 10000. Keep the process's open-files
    /// limit above it (start-up warns when it is not).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time a client has to send a whole request head (request line and headers), in
    /// milliseconds, counted from the connection's opening or from the first byte after an idle
    /// spell; a slower client is disconnected. Default 10000.
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// Time a keep-alive connection may wait for its next request, in milliseconds, before it
    /// is closed. Default 75000: longer than the common load balancers' 60 s, so the balancer,
    /// not the gateway, closes a pooled connection first.
    #[serde(default = "default_keepalive_idle_ms")]
    pub keepalive_idle_ms: u64,
    /// Largest request head accepted, in bytes; larger is 431. Default 32768.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Report requests (bot analytics, tenant usage, the audit log) one caller may make per
    /// minute; beyond it 429 `RateLimited`. Each reads a whole table. Default 60.
    #[serde(default = "default_report_requests_per_minute")]
    pub report_requests_per_minute: u32,
    /// Proxies (CIDRs) whose `X-Forwarded-For` names the client, for the per-client token rate;
    /// from any other peer the header is ignored. Default none.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

fn default_report_requests_per_minute() -> u32 {
    60
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            admin_listen: default_admin_listen(),
            public_url: String::new(),
            tls_cert: None,
            tls_key: None,
            request_timeout_secs: default_request_timeout_secs(),
            shutdown_grace_secs: default_shutdown_grace_secs(),
            max_body_bytes: default_max_body_bytes(),
            max_connections: default_max_connections(),
            header_read_timeout_ms: default_header_read_timeout_ms(),
            keepalive_idle_ms: default_keepalive_idle_ms(),
            max_header_bytes: default_max_header_bytes(),
            report_requests_per_minute: default_report_requests_per_minute(),
            trusted_proxies: Vec::new(),
        }
    }
}

impl ServerConfig {
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => return Err(invalid("server.tls_key", "is required with server.tls_cert")),
            (None, Some(_)) => return Err(invalid("server.tls_cert", "is required with server.tls_key")),
            _ => {}
        }
        if self.listen == self.admin_listen && self.listen.port() != 0 {
            return Err(invalid(
                "server.admin_listen",
                format!("must differ from server.listen (both are {})", self.listen),
            ));
        }
        let url = &self.public_url;
        if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid("server.public_url", "must start with http:// or https://"));
        }
        if self.request_timeout_secs == 0 {
            return Err(invalid("server.request_timeout_secs", "must be at least 1"));
        }
        if self.max_body_bytes < 1024 {
            return Err(invalid("server.max_body_bytes", "must be at least 1024"));
        }
        if self.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        if self.header_read_timeout_ms == 0 {
            return Err(invalid("server.header_read_timeout_ms", "must be at least 1"));
        }
        if self.keepalive_idle_ms == 0 {
            return Err(invalid("server.keepalive_idle_ms", "must be at least 1"));
        }
        for (i, n) in self.trusted_proxies.iter().enumerate() {
            if crate::outbound::Network::parse(n).is_none() {
                return Err(invalid(
                    format!("server.trusted_proxies[{i}]"),
                    format!("`{n}` is not a network such as 10.0.0.0/8"),
                ));
            }
        }
        if self.report_requests_per_minute == 0 {
            return Err(invalid("server.report_requests_per_minute", "must be at least 1"));
        }
        if self.max_header_bytes < 1024 {
            return Err(invalid("server.max_header_bytes", "must be at least 1024"));
        }
        Ok(())
    }
}

/// Which engine keeps the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StoreBackend {
    /// An embedded SQLite file in `data_dir` (one node).
    #[default]
    Sqlite,
    /// A Redis (or Valkey) server at `redis_url`, shared by several nodes.
    Redis,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}

/// How the Redis of `backend = "redis"` is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RedisMode {
    /// One server at `redis_url`.
    #[default]
    Standalone,
    /// A primary that Redis Sentinel manages: `redis_master_name`, found through
    /// `redis_sentinels`; a failover is followed at the next reconnect.
    Sentinel,
    /// A Redis Cluster reached through `redis_cluster_nodes` (seeds; the rest is discovered).
    Cluster,
}

/// When a committed SQLite transaction is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SqliteSync {
    /// fsync at every commit (`synchronous=FULL`): an acknowledged billed session survives a
    /// crash of botgate, of the kernel, and a power loss.
    #[default]
    Full,
    /// No fsync at commit (`synchronous=NORMAL` in WAL mode): an acknowledged session survives a
    /// crash of botgate (`kill -9`), but a kernel crash or power loss can lose the transactions
    /// since the last WAL checkpoint. Session starts no longer wait for the disk.
    Normal,
}

/// `[store]`: where state is kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// The engine. Default `"sqlite"`.
    #[serde(default)]
    pub backend: StoreBackend,
    /// The data folder: the SQLite database and the generated signing keys live here.
    /// Created if missing. Default `./data`. Overridden by `--data-dir` / `BOTGATE_DATA_DIR`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// For `backend = "redis"`: the server, e.g. `redis://127.0.0.1:6379/`. Default empty.
    #[serde(default)]
    pub redis_url: String,
    /// For `backend = "redis"`: `standalone` (default, `redis_url`), `sentinel` or `cluster`.
    #[serde(default)]
    pub redis_mode: RedisMode,
    /// For `redis_mode = "sentinel"`: the sentinels, e.g. `["redis://10.0.0.21:26379/"]`.
    #[serde(default)]
    pub redis_sentinels: Vec<String>,
    /// For `redis_mode = "sentinel"`: the monitored primary's name (`sentinel monitor <name>`).
    #[serde(default)]
    pub redis_master_name: String,
    /// For `redis_mode = "cluster"`: seed nodes, e.g. `["redis://10.0.0.31:6379/"]`.
    #[serde(default)]
    pub redis_cluster_nodes: Vec<String>,
    /// With `rediss://` URLs (TLS): a PEM file of the certificate authorities that sign the
    /// servers' certificates, trusted instead of the system's roots. Default none.
    #[serde(default)]
    pub redis_tls_ca: PathBuf,
    /// SQLite commit durability: `full` (default, fsync per commit) or `normal` (survives a
    /// process crash, not a power loss).
    #[serde(default)]
    pub sqlite_sync: SqliteSync,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::default(),
            data_dir: default_data_dir(),
            redis_url: String::new(),
            redis_mode: RedisMode::default(),
            redis_sentinels: Vec::new(),
            redis_master_name: String::new(),
            redis_cluster_nodes: Vec::new(),
            redis_tls_ca: PathBuf::new(),
            sqlite_sync: SqliteSync::default(),
        }
    }
}

impl StoreConfig {
    /// Whether the Redis URLs of `redis_mode` ask for TLS (`rediss://`).
    pub fn redis_tls(&self) -> bool {
        match self.redis_mode {
            RedisMode::Standalone => self.redis_url.starts_with("rediss://"),
            RedisMode::Sentinel => self.redis_sentinels.iter().any(|u| u.starts_with("rediss://")),
            RedisMode::Cluster => self.redis_cluster_nodes.iter().any(|u| u.starts_with("rediss://")),
        }
    }

    pub(super) fn validate(&self) -> Result<(), Invalid> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("store.data_dir", "must not be empty"));
        }
        if self.backend != StoreBackend::Redis {
            return Ok(());
        }
        let urls = |key: &'static str, list: &[String]| {
            if list.is_empty() {
                return Err(invalid(key, "list at least one redis:// (or rediss://, TLS) URL"));
            }
            if list.iter().any(|u| !u.starts_with("redis://") && !u.starts_with("rediss://")) {
                return Err(invalid(key, "every entry must be a redis:// (or rediss://, TLS) URL"));
            }
            if list.iter().any(|u| u.starts_with("rediss://") != list[0].starts_with("rediss://")) {
                return Err(invalid(key, "use TLS (rediss://) for every entry or for none"));
            }
            Ok(())
        };
        if !self.redis_tls_ca.as_os_str().is_empty() && !self.redis_tls() {
            return Err(invalid("store.redis_tls_ca", "applies only to rediss:// (TLS) URLs"));
        }
        match self.redis_mode {
            RedisMode::Standalone
                if !self.redis_url.starts_with("redis://") && !self.redis_url.starts_with("rediss://") =>
            {
                Err(invalid("store.redis_url", "the redis backend needs a redis:// (or rediss://, TLS) URL"))
            }
            RedisMode::Standalone => Ok(()),
            RedisMode::Sentinel => {
                urls("store.redis_sentinels", &self.redis_sentinels)?;
                if self.redis_master_name.is_empty() {
                    return Err(invalid("store.redis_master_name", "name the primary the sentinels monitor"));
                }
                Ok(())
            }
            RedisMode::Cluster => urls("store.redis_cluster_nodes", &self.redis_cluster_nodes),
        }
    }
}

fn default_upstream_timeout_secs() -> u64 {
    15
}
fn default_max_concurrency_per_bot() -> usize {
    64
}
fn default_connect_timeout_ms() -> u64 {
    2000
}

/// `[upstream]`: calls to upstream Bot Framework bots.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// How long a bot may take to answer one activity, callbacks included, in seconds; then
    /// the user's message is answered 504 `BotTimeout`. Default 15.
    #[serde(default = "default_upstream_timeout_secs")]
    pub timeout_secs: u64,
    /// Most calls in flight to one bot; further calls wait (within the timeout), so a slow bot
    /// does not take every connection. Default 64.
    #[serde(default = "default_max_concurrency_per_bot")]
    pub max_concurrency_per_bot: usize,
    /// TCP connect timeout to a bot, in milliseconds. Default 2000.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            timeout_secs: default_upstream_timeout_secs(),
            max_concurrency_per_bot: default_max_concurrency_per_bot(),
            connect_timeout_ms: default_connect_timeout_ms(),
        }
    }
}

impl UpstreamConfig {
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        if self.timeout_secs == 0 {
            return Err(invalid("upstream.timeout_secs", "must be at least 1"));
        }
        if self.max_concurrency_per_bot == 0 {
            return Err(invalid("upstream.max_concurrency_per_bot", "must be at least 1"));
        }
        Ok(())
    }
}

fn default_max_response_bytes() -> usize {
    1024 * 1024
}

/// `[outbound]`: where the gateway's own calls (upstream bots) may go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// Allow calls to loopback addresses (127.0.0.0/8, ::1, `localhost`). Default false; the
    /// embedded default turns it on for its demo bots on this machine.
    #[serde(default)]
    pub allow_loopback: bool,
    /// Allow calls into private networks (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7).
    /// Default false.
    #[serde(default)]
    pub allow_private_networks: bool,
    /// Networks allowed whatever the two switches say, as CIDRs (`10.1.0.0/16`, `fd12::/16`).
    /// Link-local and metadata addresses are denied unless listed here. Default none.
    #[serde(default)]
    pub allowed_networks: Vec<String>,
    /// Most bytes read from an answer; a longer one fails the call. Default 1048576.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            allow_loopback: false,
            allow_private_networks: false,
            allowed_networks: Vec::new(),
            max_response_bytes: default_max_response_bytes(),
        }
    }
}

impl OutboundConfig {
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        for (i, n) in self.allowed_networks.iter().enumerate() {
            if crate::outbound::Network::parse(n).is_none() {
                return Err(invalid(
                    format!("outbound.allowed_networks[{i}]"),
                    format!("`{n}` is not a network such as 10.1.0.0/16"),
                ));
            }
        }
        if self.max_response_bytes < 1024 {
            return Err(invalid("outbound.max_response_bytes", "must be at least 1024"));
        }
        Ok(())
    }
}

fn default_true() -> bool {
    true
}
fn default_session_idle_secs() -> u64 {
    1800
}
fn default_session_max_secs() -> u64 {
    3600
}
fn default_session_max_turns() -> u32 {
    100
}
fn default_rate_limit_per_minute() -> u32 {
    800
}
fn default_trial_capacity() -> u64 {
    1000
}
fn default_tenant_license_sessions() -> u64 {
    2000
}
fn default_addon_sessions() -> u64 {
    1000
}

/// `[metering]`: the billed-session rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeteringConfig {
    /// Whether conversations are metered at all. Default true. `false` bills nothing and skips
    /// the rate limit: it exists to measure what metering costs (`benches/load.sh`), not for
    /// production.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// A billed session ends after this long without a user message, in seconds. Default 1800.
    #[serde(default = "default_session_idle_secs")]
    pub session_idle_secs: u64,
    /// A billed session ends this long after it began; the next message begins a new one,
    /// in seconds. Default 3600.
    #[serde(default = "default_session_max_secs")]
    pub session_max_secs: u64,
    /// A billed session ends after this many turns; the next turn begins a new one. Default 100.
    #[serde(default = "default_session_max_turns")]
    pub session_max_turns: u32,
    /// Most user messages one bot accepts per minute; beyond it 429 `RateLimited` with
    /// `Retry-After`. Default 800.
    #[serde(default = "default_rate_limit_per_minute")]
    pub rate_limit_per_minute: u32,
    /// Monthly sessions of a tenant with no tenant license but an active trial. Default 1000.
    #[serde(default = "default_trial_capacity")]
    pub trial_capacity: u64,
    /// Monthly sessions one tenant license brings. Default 2000.
    #[serde(default = "default_tenant_license_sessions")]
    pub tenant_license_sessions: u64,
    /// Monthly sessions one capacity add-on brings. Default 1000.
    #[serde(default = "default_addon_sessions")]
    pub addon_sessions: u64,
}

impl Default for MeteringConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            session_idle_secs: default_session_idle_secs(),
            session_max_secs: default_session_max_secs(),
            session_max_turns: default_session_max_turns(),
            rate_limit_per_minute: default_rate_limit_per_minute(),
            trial_capacity: default_trial_capacity(),
            tenant_license_sessions: default_tenant_license_sessions(),
            addon_sessions: default_addon_sessions(),
        }
    }
}

impl MeteringConfig {
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        if self.session_idle_secs == 0 {
            return Err(invalid("metering.session_idle_secs", "must be at least 1"));
        }
        if self.session_max_secs < self.session_idle_secs {
            return Err(invalid("metering.session_max_secs", "must be at least metering.session_idle_secs"));
        }
        if self.session_max_turns == 0 {
            return Err(invalid("metering.session_max_turns", "must be at least 1"));
        }
        if self.rate_limit_per_minute == 0 {
            return Err(invalid("metering.rate_limit_per_minute", "must be at least 1"));
        }
        Ok(())
    }
}

fn default_max_bot_series() -> usize {
    10_000
}

/// `[metrics]`: Prometheus exposition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Most per-bot series per metric; beyond it the smallest bots fold into `bot="_other"`
    /// (tenant totals stay exact). Default 10000.
    #[serde(default = "default_max_bot_series")]
    pub max_bot_series: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { max_bot_series: default_max_bot_series() }
    }
}

impl MetricsConfig {
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        if self.max_bot_series == 0 {
            return Err(invalid("metrics.max_bot_series", "must be at least 1"));
        }
        Ok(())
    }
}

fn default_issuer() -> String {
    "botgate-dev".to_string()
}
fn default_audience() -> String {
    "botgate".to_string()
}
fn default_algorithms() -> Vec<String> {
    vec!["HS256".to_string()]
}
fn default_leeway_secs() -> u64 {
    30
}
fn default_cache_capacity() -> usize {
    10_000
}
fn default_jwks_fetch_timeout_ms() -> u64 {
    5000
}
fn default_jwks_refetch_cooldown_secs() -> u64 {
    30
}
fn default_trial_days() -> u32 {
    60
}
fn default_trial_extension_days() -> u32 {
    30
}
fn default_grace_days() -> u32 {
    90
}

/// `[identity]`: how bot authors' JWTs are checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The required `iss` claim. Default `botgate-dev` (the embedded development issuer).
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// The required `aud` claim. Default `botgate`.
    #[serde(default = "default_audience")]
    pub audience: String,
    /// Accepted algorithms: `HS256` (only with the development issuer's key, created in the data
    /// folder at first start), `RS256`, `ES256` (keys from `jwks_file`). Default `["HS256"]`.
    /// Anything else, `none` included, is refused.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// A JWKS file (`{"keys":[...]}`) with the RS256/ES256 public keys. Default none.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// A JWKS URL (`http://` only: outbound calls speak no TLS; use an egress proxy) fetched through the outbound
    /// client and policy, and refreshed on its `Cache-Control: max-age`. Default none.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// An OpenID provider's issuer URL (`http://` only): its discovery document
    /// (`<issuer>/.well-known/openid-configuration`) names the JWKS to fetch; the document's
    /// `issuer` must be this value, and so must `issuer` above. Default none.
    #[serde(default)]
    pub oidc_issuer: Option<String>,
    /// One fetch of a remote key source (discovery and JWKS together), in milliseconds; also
    /// the longest a request with an unknown key id waits for keys. Default 5000.
    #[serde(default = "default_jwks_fetch_timeout_ms")]
    pub jwks_fetch_timeout_ms: u64,
    /// A token naming an unknown key id fetches the remote keys again at most once per this
    /// many seconds (a failed fetch is retried after it too). Default 30.
    #[serde(default = "default_jwks_refetch_cooldown_secs")]
    pub jwks_refetch_cooldown_secs: u64,
    /// Clock skew allowed on `exp` and `nbf`, in seconds. Default 30.
    #[serde(default = "default_leeway_secs")]
    pub leeway_secs: u64,
    /// Most verified tokens cached (keyed by the token, until they expire), so repeat requests
    /// skip the signature check. Default 10000.
    #[serde(default = "default_cache_capacity")]
    pub cache_capacity: usize,
    /// Further accepted issuers (`[[identity.issuers]]`), each with its own audience and key
    /// source; a token is checked against the one its `iss` names. The issuer above is the first
    /// and needs no entry. Default none.
    #[serde(default)]
    pub issuers: Vec<IssuerConfig>,
}

/// The placeholder of a multi-tenant issuer: one path segment of `[A-Za-z0-9-]`, which must
/// equal the token's `tid` claim.
pub const TENANT_PLACEHOLDER: &str = "{tid}";

/// `[[identity.issuers]]`: one more accepted issuer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The `iss` claim its tokens carry; `{tid}` (at most once) stands for one path segment of
    /// `[A-Za-z0-9-]` that must equal the token's `tid` claim
    /// (`https://login.microsoftonline.com/{tid}/v2.0`). Required.
    pub issuer: String,
    /// The required `aud` claim of its tokens. Required.
    pub audience: String,
    /// Accepted algorithms: `RS256`, `ES256`. Default both.
    #[serde(default = "default_issuer_algorithms")]
    pub algorithms: Vec<String>,
    /// A JWKS file with its public keys. Default none.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// A JWKS URL (`http://` only), as `identity.jwks_url`. Default none.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Its OpenID provider's issuer URL (`http://` only), as `identity.oidc_issuer`: equal to
    /// `issuer`, or for a `{tid}` issuer a concrete URL without `{tid}`. Default none.
    #[serde(default)]
    pub oidc_issuer: Option<String>,
}

fn default_issuer_algorithms() -> Vec<String> {
    vec!["RS256".into(), "ES256".into()]
}

impl IssuerConfig {
    fn validate(
        &self,
        i: usize,
        top: &IdentityConfig,
        policy: &crate::outbound::Policy,
    ) -> Result<(), Invalid> {
        let key = |k: &str| format!("identity.issuers[{i}].{k}");
        if self.issuer.is_empty() {
            return Err(invalid(key("issuer"), "must not be empty"));
        }
        if self.issuer.matches(TENANT_PLACEHOLDER).count() > 1 {
            return Err(invalid(key("issuer"), "may hold {tid} once only"));
        }
        if self.issuer == top.issuer || top.issuers[..i].iter().any(|o| o.issuer == self.issuer) {
            return Err(invalid(
                key("issuer"),
                format!("`{}` is accepted by another entry already", self.issuer),
            ));
        }
        if self.audience.is_empty() {
            return Err(invalid(key("audience"), "must not be empty"));
        }
        if self.algorithms.is_empty() {
            return Err(invalid(key("algorithms"), "name at least one of RS256, ES256"));
        }
        for (j, a) in self.algorithms.iter().enumerate() {
            if !matches!(a.as_str(), "RS256" | "ES256") {
                return Err(invalid(
                    format!("identity.issuers[{i}].algorithms[{j}]"),
                    format!("`{a}` is not one of RS256, ES256 (HS256 is for identity.algorithms only)"),
                ));
            }
        }
        if self.jwks_file.is_none() && self.jwks_url.is_none() && self.oidc_issuer.is_none() {
            return Err(invalid(key("jwks_file"), "name a key source: jwks_file, jwks_url or oidc_issuer"));
        }
        for (k, url) in [("jwks_url", &self.jwks_url), ("oidc_issuer", &self.oidc_issuer)] {
            if let Some(url) = url
                && let Err(why) = policy.check_url(url)
            {
                return Err(invalid(key(k), format!("the gateway cannot fetch keys from it: {why}")));
            }
        }
        if let Some(oidc) = &self.oidc_issuer {
            if self.issuer.contains(TENANT_PLACEHOLDER) {
                if oidc.contains(TENANT_PLACEHOLDER) || oidc.contains(['{', '}']) {
                    return Err(invalid(
                        key("oidc_issuer"),
                        "must be a concrete URL without {tid}: discovery is done on it",
                    ));
                }
            } else if *oidc != self.issuer {
                return Err(invalid(
                    key("oidc_issuer"),
                    format!(
                        "must equal its issuer (`{}`): the provider's tokens carry it as `iss`",
                        self.issuer
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            issuer: default_issuer(),
            audience: default_audience(),
            algorithms: default_algorithms(),
            jwks_file: None,
            jwks_url: None,
            oidc_issuer: None,
            jwks_fetch_timeout_ms: default_jwks_fetch_timeout_ms(),
            jwks_refetch_cooldown_secs: default_jwks_refetch_cooldown_secs(),
            leeway_secs: default_leeway_secs(),
            cache_capacity: default_cache_capacity(),
            issuers: Vec::new(),
        }
    }
}

impl IdentityConfig {
    /// Whether the top-level issuer's keys come from the network (`jwks_url` or `oidc_issuer`).
    pub fn has_remote_keys(&self) -> bool {
        self.jwks_url.is_some() || self.oidc_issuer.is_some()
    }

    pub(super) fn validate(&self, policy: &crate::outbound::Policy) -> Result<(), Invalid> {
        if self.algorithms.is_empty() {
            return Err(invalid("identity.algorithms", "name at least one of HS256, RS256, ES256"));
        }
        for (i, a) in self.algorithms.iter().enumerate() {
            if !matches!(a.as_str(), "HS256" | "RS256" | "ES256") {
                return Err(invalid(
                    format!("identity.algorithms[{i}]"),
                    format!("`{a}` is not one of HS256, RS256, ES256"),
                ));
            }
        }
        if self.algorithms.iter().any(|a| a != "HS256") && self.jwks_file.is_none() && !self.has_remote_keys()
        {
            return Err(invalid(
                "identity.jwks_file",
                "RS256 and ES256 need a key source: jwks_file, jwks_url or oidc_issuer",
            ));
        }
        for (key, url) in [("identity.jwks_url", &self.jwks_url), ("identity.oidc_issuer", &self.oidc_issuer)]
        {
            if let Some(url) = url
                && let Err(why) = policy.check_url(url)
            {
                return Err(invalid(key, format!("the gateway cannot fetch keys from it: {why}")));
            }
        }
        if let Some(oidc) = &self.oidc_issuer
            && *oidc != self.issuer
        {
            return Err(invalid(
                "identity.oidc_issuer",
                format!(
                    "must equal identity.issuer (`{}`): the provider's tokens carry it as `iss`",
                    self.issuer
                ),
            ));
        }
        if !(100..=30_000).contains(&self.jwks_fetch_timeout_ms) {
            return Err(invalid("identity.jwks_fetch_timeout_ms", "must be from 100 to 30000"));
        }
        if self.jwks_refetch_cooldown_secs == 0 {
            return Err(invalid("identity.jwks_refetch_cooldown_secs", "must be at least 1"));
        }
        if self.issuer.is_empty() {
            return Err(invalid("identity.issuer", "must not be empty"));
        }
        if self.audience.is_empty() {
            return Err(invalid("identity.audience", "must not be empty"));
        }
        if self.cache_capacity == 0 {
            return Err(invalid("identity.cache_capacity", "must be at least 1"));
        }
        for (i, entry) in self.issuers.iter().enumerate() {
            entry.validate(i, self, policy)?;
        }
        Ok(())
    }
}

/// `[operator]`: the platform operator's credentials for `/api/v1/operator/...`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    /// SHA-256 (64 hex digits) of each accepted operator API key; `botgate operator-key` makes a
    /// key and prints its hash. Default none.
    #[serde(default)]
    pub api_key_sha256: Vec<String>,
    /// Whether a JWT from the configured identity issuer carrying the role `PlatformOperator`
    /// authenticates the operator. Default false.
    #[serde(default)]
    pub jwt_role: bool,
}

impl OperatorConfig {
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        for (i, h) in self.api_key_sha256.iter().enumerate() {
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(
                    format!("operator.api_key_sha256[{i}]"),
                    "must be the SHA-256 of a key as 64 hex digits (`botgate operator-key` prints one)",
                ));
            }
        }
        Ok(())
    }
}

/// `[licensing]`: trials and who records purchases.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LicensingConfig {
    /// Length of a trial, in days. Default 60.
    #[serde(default = "default_trial_days")]
    pub trial_days: u32,
    /// How much the one extension adds, in days. Default 30.
    #[serde(default = "default_trial_extension_days")]
    pub trial_extension_days: u32,
    /// How long a trial user's published bots keep serving after the trial expired, in days.
    /// Default 90.
    #[serde(default = "default_grace_days")]
    pub grace_days: u32,
    /// Whether tenant admins may record purchases themselves (`POST /api/v1/admin/subscriptions`).
    /// Default false: the platform operator records them (`/api/v1/operator/...`).
    #[serde(default)]
    pub tenant_self_purchase: bool,
}

impl Default for LicensingConfig {
    fn default() -> Self {
        Self {
            trial_days: default_trial_days(),
            trial_extension_days: default_trial_extension_days(),
            grace_days: default_grace_days(),
            tenant_self_purchase: false,
        }
    }
}

impl LicensingConfig {
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        if self.trial_days == 0 {
            return Err(invalid("licensing.trial_days", "must be at least 1"));
        }
        Ok(())
    }
}

fn default_lease_ttl_secs() -> u64 {
    10
}
fn default_lease_target_secs() -> u64 {
    5
}
fn default_max_grant() -> u64 {
    1000
}
fn default_safe_capacity() -> u64 {
    100
}

/// What a node does when Redis cannot grant a lease (it is down or slow) and its lease is used up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OutagePolicy {
    /// Refuse new billed sessions with 503 `MeteringUnavailable` (open sessions continue).
    #[default]
    FailClosed,
    /// Allow up to `cluster.safe_capacity_per_node` new sessions per outage on this node,
    /// recorded and counted once Redis is back (they may exceed the month's capacity).
    SafeCapacity,
}

/// `[cluster]`: several nodes sharing one Redis (`store.backend = "redis"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id (letters and digits, up to 16); it prefixes the ids of the conversations
    /// it owns. Default: random at each start.
    #[serde(default)]
    pub node_id: String,
    /// The URL other nodes reach this node's public listener at, for forwarding requests of
    /// conversations it owns. Default `http://<bound public address>`.
    #[serde(default)]
    pub advertise_url: String,
    /// Seconds a lease stays valid without renewal: a node stops drawing on it before then, and
    /// the other nodes reclaim it after twice this (the grace lets a node catching up after a
    /// Redis outage replay its spool first). A node's registration expires after this. Default 10.
    #[serde(default = "default_lease_ttl_secs")]
    pub lease_ttl_secs: u64,
    /// A grant aims to cover this many seconds of the node's recent use. Default 5.
    #[serde(default = "default_lease_target_secs")]
    pub lease_target_secs: u64,
    /// The largest grant, in sessions. Default 1000.
    #[serde(default = "default_max_grant")]
    pub max_grant: u64,
    /// `fail_closed` (default) or `safe_capacity`, once Redis is unreachable and the lease is used up.
    #[serde(default)]
    pub outage_policy: OutagePolicy,
    /// New sessions a node may begin per outage under `safe_capacity`. Default 100.
    #[serde(default = "default_safe_capacity")]
    pub safe_capacity_per_node: u64,
    /// While the node is busy (its last ledger write held at least 16 sessions), how long a
    /// batch of billed sessions waits for more before it is written to Redis, in milliseconds
    /// (0 to 100). Up to that much latency on a session's first message, for fewer Redis
    /// commands per session; a quiet node never waits. Default 0 (off): in a closed loop whose
    /// clients all wait in one batch (a load test with few users), every batch waits the whole
    /// linger.
    #[serde(default)]
    pub ledger_linger_ms: u64,
    /// How long the change subscription may be quiet before the node PINGs Redis on it, and how
    /// long the PING may take before the node reconnects and reloads the control plane in full,
    /// in milliseconds. A change made on another node is seen here within twice this (plus a
    /// reload) even over a half-open socket. Default 5000.
    #[serde(default = "default_change_probe_ms")]
    pub change_probe_ms: u64,
    /// How many replicas must have each ledger write and lease call (Redis `WAIT`) before it
    /// counts: a billed session is acknowledged, and a grant drawn on, only then. 0 (default)
    /// does not wait: a primary that fails before its replicas have a write loses it, and a
    /// tenant's leases are fenced for a lease TTL after a failover so that no lost grant is
    /// granted again (see the README, "Redis Sentinel and Cluster").
    #[serde(default)]
    pub ledger_wait_replicas: u32,
    /// How long `WAIT` may take, in milliseconds; a write that does not reach enough replicas in
    /// time is spooled on the node and recorded again later (idempotently). Default 1000.
    #[serde(default = "default_ledger_wait_timeout_ms")]
    pub ledger_wait_timeout_ms: u64,
}

fn default_ledger_wait_timeout_ms() -> u64 {
    1000
}

fn default_change_probe_ms() -> u64 {
    5000
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            node_id: String::new(),
            advertise_url: String::new(),
            lease_ttl_secs: default_lease_ttl_secs(),
            lease_target_secs: default_lease_target_secs(),
            max_grant: default_max_grant(),
            outage_policy: OutagePolicy::default(),
            safe_capacity_per_node: default_safe_capacity(),
            ledger_linger_ms: 0,
            change_probe_ms: default_change_probe_ms(),
            ledger_wait_replicas: 0,
            ledger_wait_timeout_ms: default_ledger_wait_timeout_ms(),
        }
    }
}

impl ClusterConfig {
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        if !self.node_id.is_empty()
            && (self.node_id.len() > 16 || !self.node_id.bytes().all(|b| b.is_ascii_alphanumeric()))
        {
            return Err(invalid("cluster.node_id", "use 1 to 16 letters and digits"));
        }
        if !self.advertise_url.is_empty()
            && !self.advertise_url.starts_with("http://")
            && !self.advertise_url.starts_with("https://")
        {
            return Err(invalid("cluster.advertise_url", "must start with http:// or https://"));
        }
        if self.lease_ttl_secs == 0 {
            return Err(invalid("cluster.lease_ttl_secs", "must be at least 1"));
        }
        if self.max_grant == 0 {
            return Err(invalid("cluster.max_grant", "must be at least 1"));
        }
        if self.change_probe_ms < 10 {
            return Err(invalid("cluster.change_probe_ms", "must be at least 10"));
        }
        if !(1..=60_000).contains(&self.ledger_wait_timeout_ms) {
            return Err(invalid("cluster.ledger_wait_timeout_ms", "use 1 to 60000"));
        }
        if self.ledger_linger_ms > 100 {
            return Err(invalid("cluster.ledger_linger_ms", "must be at most 100"));
        }
        Ok(())
    }
}
