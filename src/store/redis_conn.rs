//! Connections to Redis as operators run it (`store.redis_mode`): one server, a primary that
//! Sentinel manages (found through the sentinels at each connection, so a failover is followed
//! at the next reconnect), or a Redis Cluster (the `redis` crate's cluster connection: it maps
//! slots to nodes, follows `MOVED` and `ASK`, and refreshes its map after a failover or a slot
//! migration).
//!
//! The store's rule that makes all three work the same: every script, transaction and pipeline
//! touches keys of one slot (one tenant's `{tenant}` keys), and keys of other slots are written
//! by separate commands that are idempotent (see `redis.rs`).

use std::sync::Mutex;
use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterConnection};
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{Cmd, Connection, ConnectionLike, RedisResult, Value};

use crate::config::{RedisMode, StoreConfig};

/// How long a connection attempt and a command may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the store's connections go.
pub enum Topology {
    /// One server.
    Standalone(redis::Client),
    /// The current primary of a Sentinel-managed group (the client asks a sentinel each time).
    Sentinel(Mutex<SentinelClient>),
    /// A Redis Cluster, from its seed nodes; with how to reach one node of it directly (the
    /// sharded subscription).
    Cluster(ClusterClient, NodeLink),
}

/// How a connection to one node of a cluster is made: as the seeds' URLs say, plain or TLS
/// (verified against `store.redis_tls_ca` if set).
pub enum NodeLink {
    /// `redis://`.
    Plain,
    /// `rediss://`, with the CA of `store.redis_tls_ca` (none: the system's roots).
    Tls(Option<redis::TlsCertificates>),
}

impl NodeLink {
    fn client(&self, host: &str, port: u16) -> RedisResult<redis::Client> {
        match self {
            NodeLink::Plain => redis::Client::open(format!("redis://{host}:{port}/")),
            NodeLink::Tls(None) => redis::Client::open(format!("rediss://{host}:{port}/")),
            NodeLink::Tls(Some(certs)) => {
                redis::Client::build_with_tls(format!("rediss://{host}:{port}/"), certs.clone())
            }
        }
    }
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            // The names of `store.redis_mode`.
            Topology::Standalone(_) => "standalone",
            Topology::Sentinel(_) => "sentinel",
            Topology::Cluster(..) => "cluster",
        })
    }
}

/// One connection of the pool.
pub enum Conn {
    /// To one server (standalone, or the primary Sentinel named when it was made).
    Single(Connection),
    /// To a cluster (one socket per node inside).
    Cluster(Box<ClusterConnection>),
}

impl Topology {
    /// The topology `config` names (nothing is connected yet).
    ///
    /// With `rediss://` URLs every connection is TLS, verified against `store.redis_tls_ca`
    /// when it is set, else the system's roots. Under Sentinel, the primary is reached as the
    /// sentinels are: over TLS when their URLs are `rediss://`.
    pub fn of(config: &StoreConfig) -> RedisResult<Self> {
        let certs = tls_certificates(config)?;
        match config.redis_mode {
            RedisMode::Standalone => Ok(Topology::Standalone(match certs {
                Some(certs) => redis::Client::build_with_tls(config.redis_url.as_str(), certs)?,
                None => redis::Client::open(config.redis_url.as_str())?,
            })),
            RedisMode::Sentinel if config.redis_tls() => {
                let mut addrs = Vec::new();
                let mut auth = None;
                for url in &config.redis_sentinels {
                    let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())?;
                    auth = auth.or_else(|| {
                        let r = info.redis_settings();
                        r.password().map(|p| (r.username().map(str::to_string), p.to_string()))
                    });
                    addrs.push(info.addr().clone());
                }
                let mut builder = SentinelClientBuilder::new(
                    addrs,
                    config.redis_master_name.clone(),
                    SentinelServerType::Master,
                )?
                .set_client_to_redis_tls_mode(redis::TlsMode::Secure);
                if let Some((username, password)) = auth {
                    if let Some(u) = username {
                        builder = builder.set_client_to_sentinel_username(u);
                    }
                    builder = builder.set_client_to_sentinel_password(password);
                }
                if let Some(certs) = certs {
                    builder = builder
                        .set_client_to_sentinel_certificates(certs.clone())
                        .set_client_to_redis_certificates(certs);
                }
                Ok(Topology::Sentinel(Mutex::new(builder.build()?)))
            }
            RedisMode::Sentinel => {
                let client = SentinelClient::build(
                    config.redis_sentinels.clone(),
                    config.redis_master_name.clone(),
                    None,
                    SentinelServerType::Master,
                )?;
                Ok(Topology::Sentinel(Mutex::new(client)))
            }
            RedisMode::Cluster => {
                let mut builder = ClusterClient::builder(config.redis_cluster_nodes.clone())
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(COMMAND_TIMEOUT)
                    .retries(4);
                if let Some(certs) = certs.clone() {
                    builder = builder.certs(certs);
                }
                let link = if config.redis_tls() { NodeLink::Tls(certs) } else { NodeLink::Plain };
                Ok(Topology::Cluster(builder.build()?, link))
            }
        }
    }

    /// A new connection of the pool, with the store's timeouts.
    pub fn connect(&self) -> RedisResult<Conn> {
        match self {
            Topology::Standalone(client) => {
                let c = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
                single(c)
            }
            Topology::Sentinel(client) => {
                let c = client.lock().unwrap_or_else(|p| p.into_inner()).get_connection()?;
                single(c)
            }
            Topology::Cluster(client, _) => Ok(Conn::Cluster(Box::new(client.get_connection()?))),
        }
    }

    /// A plain connection for the change subscription: to the server, to the current primary,
    /// or (cluster) to the node that serves the slot of `channel` (sharded pub/sub).
    pub fn subscriber(&self, channel: &str, timeout: Duration) -> RedisResult<Connection> {
        let c = match self {
            Topology::Standalone(client) => client.get_connection_with_timeout(CONNECT_TIMEOUT)?,
            Topology::Sentinel(client) => {
                client.lock().unwrap_or_else(|p| p.into_inner()).get_connection()?
            }
            Topology::Cluster(client, link) => {
                // Ask the cluster which node serves the channel's slot, then connect there.
                let mut conn = client.get_connection()?;
                let (host, port) = slot_owner(&mut conn, slot(channel))?;
                link.client(&host, port)?.get_connection_with_timeout(CONNECT_TIMEOUT)?
            }
        };
        c.set_write_timeout(Some(timeout))?;
        Ok(c)
    }

    /// Whether change notices are sharded (`SPUBLISH`/`SSUBSCRIBE`, cluster) or not.
    pub fn sharded(&self) -> bool {
        matches!(self, Topology::Cluster(..))
    }
}

/// The CA file of `store.redis_tls_ca`, if set, as the `redis` crate takes it.
fn tls_certificates(config: &StoreConfig) -> RedisResult<Option<redis::TlsCertificates>> {
    if config.redis_tls_ca.as_os_str().is_empty() {
        return Ok(None);
    }
    let pem = std::fs::read(&config.redis_tls_ca).map_err(|e| {
        redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "cannot read store.redis_tls_ca",
            format!("{}: {e}", config.redis_tls_ca.display()),
        ))
    })?;
    Ok(Some(redis::TlsCertificates { client_tls: None, root_cert: Some(pem) }))
}

fn single(c: Connection) -> RedisResult<Conn> {
    c.set_read_timeout(Some(COMMAND_TIMEOUT))?;
    c.set_write_timeout(Some(COMMAND_TIMEOUT))?;
    Ok(Conn::Single(c))
}

/// The Redis Cluster slot of `key` (CRC16/XMODEM of its hash tag, or of the whole key).
pub fn slot(key: &str) -> u16 {
    let b = key.as_bytes();
    let tagged = b.iter().position(|&c| c == b'{').and_then(|open| {
        let close = b[open + 1..].iter().position(|&c| c == b'}')?;
        (close > 0).then(|| &b[open + 1..open + 1 + close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(b)) % 16384
}

/// The primary serving `slot`, from `CLUSTER SLOTS`.
fn slot_owner(conn: &mut ClusterConnection, slot: u16) -> RedisResult<(String, u16)> {
    let ranges: Vec<(u16, u16, (String, u16))> = {
        let v = conn.route_command(
            &redis::cmd("CLUSTER").arg("SLOTS").to_owned(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
        )?;
        parse_slots(v)
    };
    ranges
        .into_iter()
        .find(|(lo, hi, _)| (*lo..=*hi).contains(&slot))
        .map(|(_, _, node)| node)
        .ok_or_else(|| (redis::ErrorKind::Client, "no node serves the change channel's slot").into())
}

/// `CLUSTER SLOTS` as (first, last, primary's host and port); unreadable entries are skipped.
fn parse_slots(v: Value) -> Vec<(u16, u16, (String, u16))> {
    let Value::Array(entries) = v else { return Vec::new() };
    entries
        .into_iter()
        .filter_map(|e| {
            let Value::Array(parts) = e else { return None };
            let int = |v: &Value| match v {
                Value::Int(i) => u16::try_from(*i).ok(),
                _ => None,
            };
            let (lo, hi) = (int(parts.first()?)?, int(parts.get(1)?)?);
            let Value::Array(node) = parts.get(2)? else { return None };
            let host = match node.first()? {
                Value::BulkString(h) => String::from_utf8_lossy(h).into_owned(),
                Value::SimpleString(h) => h.clone(),
                _ => return None,
            };
            Some((lo, hi, (host, int(node.get(1)?)?)))
        })
        .collect()
}

/// An answer as `T`.
pub fn parse<T: redis::FromRedisValue>(v: Value) -> RedisResult<T> {
    Ok(redis::from_redis_value(v)?)
}

impl Conn {
    /// Runs `groups`, each the commands of one slot, and returns every command's answer in
    /// order. On one server they go as one pipeline (one round trip); on a cluster each group is
    /// a pipeline to the node serving its slot.
    pub fn query_groups(&mut self, groups: &[Vec<Cmd>]) -> RedisResult<Vec<Value>> {
        let pipeline = |cmds: &mut dyn Iterator<Item = &Cmd>| {
            let mut p = redis::pipe();
            for c in cmds {
                p.add_command(c.clone());
            }
            p
        };
        if matches!(self, Conn::Single(_)) {
            if groups.iter().all(Vec::is_empty) {
                return Ok(Vec::new());
            }
            return pipeline(&mut groups.iter().flatten()).query(self);
        }
        // Through `Conn`, which pipelines on a cluster too: the cluster connection sends a
        // pipeline whole to the node of its first command's slot.
        let mut out = Vec::new();
        for g in groups.iter().filter(|g| !g.is_empty()) {
            out.extend(pipeline(&mut g.iter()).query::<Vec<Value>>(self)?);
        }
        Ok(out)
    }

    /// `WAIT replicas timeout` on the node holding `key`: how many replicas have every write this
    /// connection made there.
    pub fn wait_replicas(&mut self, key: &str, replicas: u32, timeout_ms: u64) -> RedisResult<u32> {
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(replicas).arg(timeout_ms);
        let v = match self {
            Conn::Single(c) => cmd.query::<Value>(c)?,
            Conn::Cluster(c) => c.route_command(
                &cmd,
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
                    slot(key),
                    SlotAddr::Master,
                ))),
            )?,
        };
        parse(v)
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands(&mut self, cmd: &[u8], offset: usize, count: usize) -> RedisResult<Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn req_command(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            Conn::Single(c) => c.req_command(cmd),
            Conn::Cluster(c) => c.req_command(cmd),
        }
    }

    /// Both pipeline: a cluster's pipeline goes whole to the node of its first command's slot,
    /// so the store sends only pipelines whose commands share one slot (see the module docs).
    fn supports_pipelining(&self) -> bool {
        true
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }

    fn check_connection(&mut self) -> bool {
        match self {
            Conn::Single(c) => c.check_connection(),
            Conn::Cluster(c) => c.check_connection(),
        }
    }

    fn is_open(&self) -> bool {
        match self {
            Conn::Single(c) => c.is_open(),
            Conn::Cluster(c) => c.is_open(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::slot;

    #[test]
    fn slots_follow_the_hash_tag() {
        // Values from the Redis Cluster specification's CRC16 test vector and `CLUSTER KEYSLOT`.
        assert_eq!(crc16::State::<crc16::XMODEM>::calculate(b"123456789"), 0x31C3);
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("bg:{contoso}:tenant"), slot("contoso"));
        assert_eq!(slot("bg:{contoso}:pool:2026-12"), slot("bg:{contoso}:usage"));
        assert_eq!(slot("a{}b"), slot("a{}b"));
        assert_ne!(slot("bg:{a}:x"), slot("bg:{b}:x"));
    }
}
