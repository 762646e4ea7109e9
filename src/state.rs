//! The application state every handler reaches: a cheap `Clone` handle over `Arc<Inner>`
//! (cloning is shallow).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::authoring::Authoring;
use crate::channel::Channel;
use crate::channel::token::TokenSigner;
use crate::clock::SharedClock;
use crate::config::{Config, StoreBackend};
use crate::identity::jwt::Verifier;
use crate::licensing::Licensing;
use crate::metering::Metering;
use crate::metering::exposition::UsageCollector;
use crate::server::Draining;
use crate::store::redis::RedisStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{SharedStore, StoreError};
use crate::telemetry::registry::Metrics;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    /// A metric could not be registered (a programming error).
    #[error("cannot register metrics: {0}")]
    Metrics(prometheus::Error),
    /// The control plane (licensing, stored bots, identity keys) could not be loaded.
    #[error("cannot load the control plane: {0}")]
    Control(String),
    /// The usage counters could not be rebuilt from the store.
    #[error("cannot rebuild usage from the store: {0}")]
    Metering(String),
    /// The TLS certificate or key could not be loaded.
    #[error("cannot load the TLS certificate: {0}")]
    Tls(String),
}

/// The shared state of a running server; cloning is shallow.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    clock: SharedClock,
    store: SharedStore,
    metrics: Metrics,
    draining: Draining,
    public_addr: SocketAddr,
    channel: Channel,
    licensing: Arc<Licensing>,
    verifier: Arc<Verifier>,
    /// The development issuer's HS256 key, when `identity.algorithms` has HS256.
    dev_key: Option<Vec<u8>>,
    authoring: Authoring,
    redis: Option<Arc<RedisStore>>,
    node_id: String,
    cluster: Option<Arc<crate::cluster::Cluster>>,
    notifier: crate::notify::Notifier,
    forward_client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
}

/// The name of the channel token signing key (a file `channel-token.key` in the data folder, or
/// a field in Redis).
pub const CHANNEL_KEY: &str = "channel-token";

impl AppState {
    /// Opens the store and builds the state.
    pub async fn open(
        config: Config,
        clock: SharedClock,
        public_addr: SocketAddr,
    ) -> Result<Self, StartError> {
        let mut redis: Option<Arc<RedisStore>> = None;
        let store: SharedStore = match config.store.backend {
            StoreBackend::Sqlite => {
                let dir = config.store.data_dir.clone();
                let sync = config.store.sqlite_sync;
                let store = tokio::task::spawn_blocking(move || SqliteStore::open_with(&dir, sync))
                    .await
                    .map_err(|e| StoreError::DataDir {
                    path: config.store.data_dir.display().to_string(),
                    source: std::io::Error::other(e.to_string()),
                })??;
                tracing::info!(path = store.path(), "Store opened.");
                Arc::new(store)
            }
            StoreBackend::Redis => {
                let (store_config, cluster) = (config.store.clone(), config.cluster.clone());
                let store = tokio::task::spawn_blocking(move || {
                    RedisStore::connect(
                        &store_config,
                        cluster.ledger_wait_replicas,
                        cluster.ledger_wait_timeout_ms,
                    )
                })
                .await
                .map_err(|e| StartError::Control(e.to_string()))??;
                tracing::info!(redis = %store.describe(), mode = ?config.store.redis_mode, "Store opened.");
                let store = Arc::new(store);
                redis = Some(store.clone());
                store
            }
        };
        let node_id = if config.cluster.node_id.is_empty() {
            crate::bots::secrets::random_id(6).replace(['-', '_'], "x")
        } else {
            config.cluster.node_id.clone()
        };
        let cluster = match &redis {
            None => None,
            Some(redis) => {
                // The node's own spool: billed sessions it could not write to Redis.
                let dir = config.store.data_dir.join("spool");
                let spool = tokio::task::spawn_blocking(move || SqliteStore::open(&dir))
                    .await
                    .map_err(|e| StartError::Control(e.to_string()))??;
                let c = &config.cluster;
                let leases = crate::metering::lease::Leases::new(
                    redis.clone(),
                    node_id.clone(),
                    clock.clone(),
                    crate::metering::lease::LeaseConfig {
                        ttl_ms: c.lease_ttl_secs as i64 * 1000,
                        target_secs: c.lease_target_secs,
                        max_grant: c.max_grant,
                        store_time: clock.is_wall_clock(),
                        fence: c.ledger_wait_replicas == 0,
                    },
                );
                tracing::info!(node = %node_id, "Joining the cluster: leases of capacity from Redis.");
                Some(crate::metering::ClusterMetering {
                    leases: Arc::new(leases),
                    spool: Arc::new(spool),
                    outage_policy: c.outage_policy,
                    safe_capacity: c.safe_capacity_per_node,
                })
            }
        };
        let shared_key = |name: &'static str| {
            let fresh: [u8; 32] = rand::random();
            store.shared_key(name, &fresh).map_err(StartError::Store)
        };
        let metrics = Metrics::new();
        let signer = TokenSigner::new(&shared_key(CHANNEL_KEY)?);
        let metering = {
            let (config, clock, store) = (config.clone(), clock.clone(), store.clone());
            tokio::task::spawn_blocking(move || Metering::start(&config, clock, store, cluster))
                .await
                .map_err(|e| StartError::Metering(e.to_string()))?
                .map_err(|e| StartError::Metering(e.to_string()))?
        };
        metering.ledger_stats().register(metrics.registry()).map_err(StartError::Metrics)?;
        let files = crate::conversation::files::FileStore::open(&config.channel, &config.store.data_dir)
            .map_err(|e| {
                StartError::Control(format!(
                    "cannot prepare the uploads folder in {}: {e}",
                    config.store.data_dir.display()
                ))
            })?;
        let mut channel = Channel::new(&config, signer, metering.clone(), clock.clone(), public_addr, files);
        if redis.is_some() {
            channel.node = Some(node_id.clone());
        }
        let authoring = Authoring::load(
            &store,
            &channel.bots,
            config.upstream.max_concurrency_per_bot,
            config.server.report_requests_per_minute,
        )
        .map_err(StartError::Control)?;
        // Every bot is exported from the start, stored ones as well as configured ones.
        for bot in channel.bots.all() {
            let _ = metering.counters(&bot.tenant, &bot.id);
        }
        let licensing = {
            let (config, clock, store, metering) =
                (config.clone(), clock.clone(), store.clone(), metering.clone());
            tokio::task::spawn_blocking(move || Licensing::open(&config, store, clock, metering))
                .await
                .map_err(|e| StartError::Control(e.to_string()))?
                .map_err(|e| StartError::Control(e.to_string()))?
        };
        let dev_key = if config.identity.algorithms.iter().any(|a| a == "HS256") {
            Some(shared_key(crate::identity::dev_issuer::KEY_NAME)?)
        } else {
            None
        };
        let remote = crate::identity::jwks::Remote::new(channel.outbound.clone(), &metrics)
            .map_err(|e| StartError::Control(e.to_string()))?;
        let top = crate::identity::jwks::Keys::new(&config.identity, clock.clone(), Some(remote.clone()))
            .map_err(|e| StartError::Control(e.to_string()))?;
        let mut issuers = Vec::new();
        for i in 0..config.identity.issuers.len() {
            issuers.push(
                crate::identity::jwks::Keys::for_issuer(
                    &config.identity,
                    i,
                    clock.clone(),
                    Some(remote.clone()),
                )
                .map_err(|e| StartError::Control(e.to_string()))?,
            );
        }
        // The first fetch of every issuer's remote sources, side by side, each bounded by the
        // fetch timeout. A node whose provider is down still starts: tokens it signs are refused
        // until a fetch succeeds (retried on schedule, and at once for an unknown key id).
        let failed: usize = futures_util::future::join_all(
            std::iter::once(&top)
                .chain(&issuers)
                .filter(|k| k.has_remote())
                .map(crate::identity::jwks::Keys::refresh_due),
        )
        .await
        .into_iter()
        .sum();
        if failed > 0 {
            tracing::error!(
                failed_sources = failed,
                "The identity provider's keys could not be fetched at start-up; its tokens are refused until a fetch succeeds."
            );
        }
        let verifier = Verifier::with_keys(&config.identity, dev_key.as_deref(), clock.clone(), top, issuers);
        let cluster = redis.as_ref().map(|r| {
            let url = if config.cluster.advertise_url.is_empty() {
                format!("http://{public_addr}")
            } else {
                config.cluster.advertise_url.trim_end_matches('/').to_string()
            };
            Arc::new(crate::cluster::Cluster::new(
                node_id.clone(),
                url,
                r.clone(),
                std::time::Duration::from_secs(config.cluster.lease_ttl_secs),
            ))
        });
        let notifier = crate::notify::Notifier::new(&metrics, &config, channel.outbound.clone())
            .map_err(StartError::Metrics)?;
        let state = Self {
            inner: Arc::new(Inner {
                notifier,
                config,
                clock,
                store,
                metrics,
                draining: Draining::default(),
                public_addr,
                channel,
                licensing: Arc::new(licensing),
                verifier: Arc::new(verifier),
                dev_key,
                authoring,
                cluster,
                forward_client: crate::cluster::forward::client(),
                redis,
                node_id,
            }),
        };
        let weak = Arc::downgrade(&state.inner);
        state.inner.metrics.add_writer(Box::new(UsageCollector::new(
            metering,
            state.inner.config.metrics.max_bot_series,
            Box::new(move || weak.upgrade().map_or(0, |i| i.channel.conversations.len() as u64)),
        )));
        state
            .inner
            .metrics
            .add_writer(Box::new(crate::conversation::files::FileMetrics(state.inner.channel.files.clone())));
        if let Some(c) = state.cluster().cloned() {
            tokio::task::spawn_blocking(move || c.register_blocking())
                .await
                .map_err(|e| StartError::Control(e.to_string()))?
                .map_err(StartError::Control)?;
            crate::cluster::sync::start(state.clone());
        }
        Ok(state)
    }

    /// The notification metrics and webhook client.
    pub fn notifier(&self) -> &crate::notify::Notifier {
        &self.inner.notifier
    }

    /// The configuration the server started with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The clock every time rule reads.
    pub fn clock(&self) -> &SharedClock {
        &self.inner.clock
    }

    /// The store.
    pub fn store(&self) -> &SharedStore {
        &self.inner.store
    }

    /// The Direct Line channel.
    pub fn channel(&self) -> &Channel {
        &self.inner.channel
    }

    /// Licensing.
    pub fn licensing(&self) -> &Arc<Licensing> {
        &self.inner.licensing
    }

    /// The development issuer's key, when it is on (`identity.algorithms` has HS256).
    pub fn dev_key(&self) -> Option<&[u8]> {
        self.inner.dev_key.as_deref()
    }

    /// The authors' token verifier.
    pub fn verifier(&self) -> &Arc<Verifier> {
        &self.inner.verifier
    }

    /// The Redis store, when several nodes share one.
    pub fn redis(&self) -> Option<&Arc<RedisStore>> {
        self.inner.redis.as_ref()
    }

    /// The cluster view (several nodes).
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.inner.cluster.as_ref()
    }

    /// The client requests are forwarded with.
    pub fn forward_client(
        &self,
    ) -> &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    > {
        &self.inner.forward_client
    }

    /// This node's id (several nodes).
    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// Authoring state.
    pub fn authoring(&self) -> &Authoring {
        &self.inner.authoring
    }

    /// Billed-session metering.
    pub fn metering(&self) -> &Metering {
        &self.inner.channel.metering
    }

    /// Removes expired conversations (the sweeper calls it on a timer; tests call it after
    /// moving the clock).
    pub fn sweep(&self) -> usize {
        self.inner.channel.conversations.sweep(self.inner.clock.now_ms())
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The bound public address.
    pub fn public_addr(&self) -> SocketAddr {
        self.inner.public_addr
    }

    /// The Prometheus exposition.
    pub fn encode_metrics(&self) -> String {
        self.inner.metrics.encode()
    }

    /// Checks the store off the runtime's worker threads.
    pub async fn check_store(&self) -> Result<(), StoreError> {
        let store = self.inner.store.clone();
        tokio::task::spawn_blocking(move || store.ping()).await.unwrap_or(Err(StoreError::Closed))
    }

    pub(crate) fn set_draining(&self) {
        self.inner.draining.set();
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.get()
    }

    /// Flushes the usage counters, then closes the store (at shutdown).
    pub(crate) async fn close(&self) {
        let store = self.inner.store.clone();
        let metering = self.metering().clone();
        let cluster = self.cluster().cloned();
        let closed = tokio::task::spawn_blocking(move || {
            if let Err(e) = metering.flush() {
                tracing::error!(error = %e, "Flushing usage counters failed.");
            }
            if let Some(c) = &cluster {
                c.deregister_blocking();
            }
            if metering.leases().is_some() {
                match metering.release_leases() {
                    Ok(n) => tracing::info!(units = n, "Returned unused capacity leases."),
                    Err(e) => {
                        tracing::warn!(error = %e, "Returning leases failed; they come back after the lease TTL.")
                    }
                }
            }
            store.close()
        });
        match closed.await {
            Ok(Ok(())) => tracing::info!("Store flushed and closed."),
            Ok(Err(e)) => tracing::error!(error = %e, "Closing the store failed."),
            Err(e) => tracing::error!(error = %e, "Closing the store panicked."),
        }
    }
}
