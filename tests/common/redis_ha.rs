//! Redis as operators run it beyond one server, on loopback: a Redis Cluster made by
//! `redis-cli --cluster create`, and a primary with a replica watched by three sentinels
//! (`redis-server --sentinel`). Every process has its own folder and is killed on drop.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One `redis-server` process (a cluster node, a primary, a replica or a sentinel).
pub struct RedisProcess {
    pub child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    args: Vec<String>,
}

impl RedisProcess {
    fn spawn(port: u16, dir: tempfile::TempDir, args: &[String]) -> Self {
        let mut p = Self { child: None, port, dir, args: args.to_vec() };
        p.restart();
        p
    }

    /// Starts the process again (after [`Self::kill`]) in its folder, on its port, with its
    /// arguments: a killed primary comes back as a replica of whoever took over.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(&self.args)
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server; scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start on port {}", self.port);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether this is a replica whose link to its primary is up.
    pub fn replica_in_sync(&self) -> bool {
        let info = self.cli(&["INFO", "replication"]);
        info.contains("role:slave") && info.contains("master_link_status:up")
    }

    /// A data node: append-only file fsynced at every write, no snapshots.
    fn data_node(port: u16, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut args: Vec<String> = [
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(port, dir, &args)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A command through `redis-cli`, its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli").args(["-p", &self.port.to_string()]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free loopback port whose cluster bus port (+10000) is free too, never handed out before in
/// this test binary (its tests run in parallel, and a port is free again between this check and
/// the server's start).
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mut given = GIVEN.lock().unwrap();
        if port < 55_000
            && !given.iter().any(|&g| g == port || g + 10_000 == port || g == port + 10_000)
            && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            given.push(port);
            return port;
        }
    }
}

/// A server's arguments to also listen for TLS on `port` with the certificate and key of `tls`
/// (the certificate is its own CA), replicating over TLS; clients need no certificate.
fn tls_args((cert, key): (&std::path::Path, &std::path::Path), port: u16) -> Vec<String> {
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    [
        "--tls-port",
        &port.to_string(),
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &cert,
        "--tls-auth-clients",
        "no",
        "--tls-replication",
        "yes",
    ]
    .map(String::from)
    .to_vec()
}

pub fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A Redis Cluster of `primaries` primaries with `replicas` replicas each.
pub struct RedisCluster {
    pub nodes: Vec<RedisProcess>,
    /// Each node's TLS port, if the cluster speaks TLS (`tls-cluster yes`; the plain ports stay
    /// open for the test's own `redis-cli`).
    pub tls_ports: Vec<u16>,
    /// The CA file that signs the nodes' certificate, if TLS.
    pub tls_ca: Option<std::path::PathBuf>,
}

impl RedisCluster {
    pub fn start(primaries: usize, replicas: usize) -> Self {
        Self::start_with(primaries, replicas, None)
    }

    /// A cluster whose nodes, bus and replication speak TLS with the certificate `cert` (and
    /// its key `key`), which is also the CA clients verify it against.
    pub fn start_tls(
        primaries: usize,
        replicas: usize,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Self {
        Self::start_with(primaries, replicas, Some((cert, key)))
    }

    fn start_with(
        primaries: usize,
        replicas: usize,
        tls: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Self {
        let n = primaries * (1 + replicas);
        let mut tls_ports = Vec::new();
        let nodes: Vec<RedisProcess> = (0..n)
            .map(|_| {
                let mut extra: Vec<String> = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                ]
                .map(String::from)
                .to_vec();
                if let Some(tls) = tls {
                    // The bus port is the TLS port + 10000, which `free_port` keeps free too.
                    let port = free_port();
                    tls_ports.push(port);
                    extra.extend(tls_args(tls, port));
                    extra.extend(["--tls-cluster", "yes"].map(String::from));
                }
                let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
                RedisProcess::data_node(free_port(), &extra)
            })
            .collect();
        let mut create = Command::new("redis-cli");
        match tls {
            Some((cert, _)) => {
                create.arg("--tls").arg("--cacert").arg(cert).arg("--cluster").arg("create");
                create.args(tls_ports.iter().map(|p| format!("127.0.0.1:{p}")));
            }
            None => {
                create.arg("--cluster").arg("create");
                create.args(nodes.iter().map(|p| format!("127.0.0.1:{}", p.port)));
            }
        }
        let out =
            create.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]).output().unwrap();
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let cluster = Self { nodes, tls_ports, tls_ca: tls.map(|(cert, _)| cert.to_path_buf()) };
        cluster.wait_ok();
        let expected = primaries * replicas;
        wait_for("the replicas to sync", Duration::from_secs(30), || {
            cluster.nodes.iter().filter(|p| p.replica_in_sync()).count() == expected
        });
        cluster
    }

    /// Waits until every live node says the cluster is ok and sees every slot served.
    pub fn wait_ok(&self) {
        wait_for("the cluster to be ok", Duration::from_secs(30), || {
            self.nodes.iter().filter(|p| p.child.is_some()).all(|p| {
                let info = p.cli(&["CLUSTER", "INFO"]);
                info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
            })
        });
    }

    /// The live nodes' URLs (`rediss://` on their TLS ports, if TLS).
    pub fn seeds(&self) -> Vec<String> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].child.is_some())
            .map(|i| match self.tls_ports.get(i) {
                Some(port) => format!("rediss://127.0.0.1:{port}/"),
                None => self.nodes[i].url(),
            })
            .collect()
    }

    /// The live node that is the primary serving `key`'s slot.
    pub fn primary_of(&self, key: &str) -> usize {
        let slot: u16 = self.live().cli(&["CLUSTER", "KEYSLOT", key]).parse().unwrap();
        self.nodes
            .iter()
            .position(|p| p.child.is_some() && serves(p, slot))
            .expect("a primary serves the slot")
    }

    fn live(&self) -> &RedisProcess {
        self.nodes.iter().find(|p| p.child.is_some()).unwrap()
    }

    /// The node id of node `i`.
    pub fn id_of(&self, i: usize) -> String {
        self.nodes[i].cli(&["CLUSTER", "MYID"])
    }

    /// The store configuration of a botgate node on this cluster.
    pub fn store_config(&self) -> botgate::config::StoreConfig {
        botgate::config::StoreConfig {
            backend: botgate::config::StoreBackend::Redis,
            redis_mode: botgate::config::RedisMode::Cluster,
            redis_cluster_nodes: self.seeds(),
            redis_tls_ca: self.tls_ca.clone().unwrap_or_default(),
            ..Default::default()
        }
    }

    /// The billed sessions the ledger holds, read through the store; panics on a duplicate.
    pub fn billed_sessions(&self) -> usize {
        billed(&self.store_config())
    }
}

/// Whether node `p` serves `slot` as a primary (from its own `CLUSTER SLOTS` view).
fn serves(p: &RedisProcess, slot: u16) -> bool {
    let out = p.cli(&["CLUSTER", "SLOTS"]);
    let me = p.port.to_string();
    // redis-cli prints each range as lines: first, last, primary host, primary port, primary id...
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    let mut i = 0;
    while i + 3 < lines.len() {
        if let (Ok(lo), Ok(hi)) = (lines[i].parse::<u16>(), lines[i + 1].parse::<u16>())
            && lines[i + 2] == "127.0.0.1"
        {
            if (lo..=hi).contains(&slot) && lines[i + 3] == me {
                return true;
            }
            i += 4;
        } else {
            i += 1;
        }
    }
    false
}

/// The sessions in the ledger of the store `config` names; panics if one is recorded twice.
pub fn billed(config: &botgate::config::StoreConfig) -> usize {
    use botgate::store::Store;
    let store = botgate::store::redis::RedisStore::connect(config, 0, 0).unwrap();
    let ids = store.session_ids().unwrap();
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "a session recorded twice in Redis");
    ids.len()
}

/// A primary and a replica, watched by three sentinels (quorum 2) as `botgate`.
pub struct RedisSentinel {
    pub primary: RedisProcess,
    pub replica: RedisProcess,
    pub sentinels: Vec<RedisProcess>,
    /// If every process speaks TLS: the sentinels' TLS ports, the CA that signs them all, and
    /// the first primary's TLS port.
    pub tls: Option<(Vec<u16>, std::path::PathBuf, u16)>,
}

/// The name the sentinels monitor the primary under.
pub const MASTER_NAME: &str = "botgate";

impl RedisSentinel {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Every process (primary, replica, sentinels) also listens for TLS with the certificate
    /// `cert` (key `key`, and `cert` as the CA), and replication and the sentinels' links use
    /// it: the sentinels name the primary by its TLS port. Plain ports stay open for the test's
    /// own `redis-cli`.
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> Self {
        Self::start_with(Some((cert, key)))
    }

    fn start_with(tls: Option<(&std::path::Path, &std::path::Path)>) -> Self {
        let tls_args = |port: u16| tls.map(|tls| tls_args(tls, port)).unwrap_or_default();
        let (primary_tls, replica_tls) = (free_port(), free_port());
        let primary_args = tls_args(primary_tls);
        let primary = RedisProcess::data_node(
            free_port(),
            &primary_args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        // Replication and the sentinels use the TLS ports when TLS is on.
        let primary_link = if tls.is_some() { primary_tls } else { primary.port };
        let mut replica_args =
            vec!["--replicaof".to_string(), "127.0.0.1".to_string(), primary_link.to_string()];
        replica_args.extend(tls_args(replica_tls));
        let replica = RedisProcess::data_node(
            free_port(),
            &replica_args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        wait_for("the replica to sync", Duration::from_secs(10), || replica.replica_in_sync());
        let mut sentinel_tls = Vec::new();
        let sentinels = (0..3)
            .map(|_| {
                let port = free_port();
                let dir = tempfile::tempdir().unwrap();
                let conf = dir.path().join("sentinel.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "bind 127.0.0.1\nport {port}\nsentinel monitor {MASTER_NAME} 127.0.0.1 {primary_link} 2\n\
                         sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                         sentinel failover-timeout {MASTER_NAME} 5000\n\
                         sentinel parallel-syncs {MASTER_NAME} 1\n",
                    ),
                )
                .unwrap();
                let mut args = vec![conf.display().to_string(), "--sentinel".to_string()];
                if tls.is_some() {
                    let t = free_port();
                    sentinel_tls.push(t);
                    args.extend(tls_args(t));
                }
                RedisProcess::spawn(port, dir, &args)
            })
            .collect();
        let replica_link = if tls.is_some() { replica_tls } else { replica.port };
        let s = Self {
            primary,
            replica,
            sentinels,
            tls: tls.map(|(cert, _)| (sentinel_tls, cert.to_path_buf(), primary_tls)),
        };
        wait_for("the sentinels to see the replica", Duration::from_secs(20), || {
            s.sentinels.iter().all(|x| {
                x.cli(&["SENTINEL", "REPLICAS", MASTER_NAME]).contains(&replica_link.to_string())
                    && x.cli(&["SENTINEL", "SENTINELS", MASTER_NAME]).matches("127.0.0.1").count() >= 2
            })
        });
        s
    }

    /// The port of the primary the sentinels name now.
    pub fn current_primary_port(&self) -> Option<u16> {
        let out = self.sentinels.iter().find(|x| x.child.is_some())?.cli(&[
            "SENTINEL",
            "GET-MASTER-ADDR-BY-NAME",
            MASTER_NAME,
        ]);
        out.lines().nth(1)?.trim().parse().ok()
    }

    pub fn store_config(&self) -> botgate::config::StoreConfig {
        botgate::config::StoreConfig {
            backend: botgate::config::StoreBackend::Redis,
            redis_mode: botgate::config::RedisMode::Sentinel,
            redis_sentinels: match &self.tls {
                Some((ports, ..)) => ports.iter().map(|p| format!("rediss://127.0.0.1:{p}/")).collect(),
                None => self.sentinels.iter().map(RedisProcess::url).collect(),
            },
            redis_master_name: MASTER_NAME.to_string(),
            redis_tls_ca: self.tls.as_ref().map(|(_, ca, _)| ca.clone()).unwrap_or_default(),
            ..Default::default()
        }
    }

    pub fn billed_sessions(&self) -> usize {
        billed(&self.store_config())
    }
}
