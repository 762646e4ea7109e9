//! Several nodes sharing one Redis.
//!
//! - **Heartbeat**: every third of the lease TTL a node renews its capacity leases (reading each
//!   tenant's use across nodes for the gauges) and its registration `bg:node:{id}` (its URL, with
//!   the TTL as expiry). A node that stops renewing is gone for the others after the TTL.
//! - **Forwarding**: a conversation lives on the node that started it; its id is
//!   `{node}.{random}`. A node that receives a request for another node's conversation forwards
//!   it (HTTP, or the WebSocket stream) to the owner, so a plain round-robin load balancer works.
//!   A conversation whose owner is gone answers 404, so clients start a new one.
//! - **Reloads**: a control-plane change is published on `bg:changes`; every node reloads the
//!   licensing snapshot and the stored bots at once (within a few milliseconds; a node that
//!   lost its subscription reloads everything when it reconnects).

pub mod forward;
pub mod sync;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::state::AppState;
use crate::store::redis::RedisStore;

/// A node's view of the cluster; shared through `AppState`.
pub struct Cluster {
    /// This node's id.
    pub node: String,
    /// The URL other nodes reach this node at.
    pub url: String,
    redis: Arc<RedisStore>,
    ttl: Duration,
    /// Owners' URLs as last read (`None`: gone), with when they were read.
    owners: DashMap<String, (Option<String>, Instant)>,
}

/// How long an owner's address is trusted before it is read again.
const OWNER_CACHE: Duration = Duration::from_secs(1);

/// Most owners cached: nodes are few, and a node that is gone is not cached at all, so made-up
/// owner ids (bot callbacks are not authenticated before forwarding) cannot grow the map.
const MAX_OWNERS: usize = 256;

fn node_key(node: &str) -> String {
    format!("bg:node:{node}")
}

impl Cluster {
    /// The cluster view of node `node`, reachable at `url`.
    pub fn new(node: String, url: String, redis: Arc<RedisStore>, ttl: Duration) -> Self {
        Self { node, url, redis, ttl, owners: DashMap::new() }
    }

    /// Registers (or renews) this node.
    pub fn register_blocking(&self) -> Result<(), String> {
        let ms = self.ttl.as_millis() as u64;
        self.redis
            .with_conn(|c| {
                redis::cmd("SET").arg(node_key(&self.node)).arg(&self.url).arg("PX").arg(ms).query::<()>(c)
            })
            .map_err(|e| e.to_string())
    }

    /// Owners in the cache.
    pub fn cached_owners(&self) -> usize {
        self.owners.len()
    }

    /// Removes this node's registration (graceful shutdown).
    pub fn deregister_blocking(&self) {
        let _ = self.redis.with_conn(|c| redis::cmd("DEL").arg(node_key(&self.node)).query::<()>(c));
    }

    /// The URL of the node `node`, or `None` when it is not registered (gone).
    pub async fn owner_url(&self, node: &str) -> Result<Option<String>, String> {
        if let Some(e) = self.owners.get(node)
            && e.1.elapsed() < OWNER_CACHE
        {
            return Ok(e.0.clone());
        }
        let redis = self.redis.clone();
        let key = node_key(node);
        let url: Option<String> =
            tokio::task::spawn_blocking(move || redis.with_conn(|c| redis::cmd("GET").arg(&key).query(c)))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        if url.is_some() && (self.owners.len() < MAX_OWNERS || self.owners.contains_key(node)) {
            self.owners.insert(node.to_string(), (url.clone(), Instant::now()));
        }
        Ok(url)
    }
}

/// Renews this node's capacity leases and registration.
pub async fn heartbeat(state: &AppState) {
    let metering = state.metering().clone();
    let Some(leases) = metering.leases().cloned() else { return };
    let pools = metering.pools();
    let month = metering.current_month();
    let cluster = state.cluster().cloned();
    let result = tokio::task::spawn_blocking(move || {
        if let Some(c) = &cluster {
            c.register_blocking()?;
        }
        leases.renew_blocking(&pools, month)
    })
    .await;
    let d = state.metering().degraded_counts();
    use std::sync::atomic::Ordering::Relaxed;
    match result {
        Ok(Ok(())) => d.heartbeat_ok_ms.store(state.clock().now_ms(), Relaxed),
        Ok(Err(e)) => {
            d.heartbeat_failures.fetch_add(1, Relaxed);
            tracing::debug!(error = %e, "The cluster heartbeat failed; retrying at the next one.");
        }
        Err(e) => {
            d.heartbeat_failures.fetch_add(1, Relaxed);
            tracing::warn!(error = %e, "The cluster heartbeat panicked.");
        }
    }
}
