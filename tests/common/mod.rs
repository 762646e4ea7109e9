//! Shared helpers: start the real server on 127.0.0.1:0 (in process, with a manual clock, or as
//! the real binary), and talk HTTP to it.
#![allow(dead_code)]

pub mod node;
pub mod receiver;
pub mod redis_ha;
pub mod tls;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use botgate::clock::ManualClock;
use botgate::config::Config;
use botgate::server::{Running, start};
use serde_json::{Value, json};

/// A server started in this process.
pub struct TestServer {
    pub running: Option<Running>,
    pub base: String,
    pub admin: String,
    pub clock: Arc<ManualClock>,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

/// The platform operator's API key in test configurations.
pub const OPERATOR_KEY: &str = "bgop_test-operator-key";

/// The embedded default with both listeners on port 0, and [`OPERATOR_KEY`] accepted.
pub fn default_config() -> Config {
    let mut c = Config::embedded_default().unwrap();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.server.admin_listen = "127.0.0.1:0".parse().unwrap();
    c.operator.api_key_sha256 = vec![botgate::licensing::operator::key_hash(OPERATOR_KEY)];
    c
}

/// Creates tenant `id` through the operator API, with a tenant license and `seats` user
/// licenses from `start` (YYYY-MM-DD) on.
pub async fn operator_tenant(http: &reqwest::Client, base: &str, id: &str, start: &str, seats: u32) {
    let post = |path: String, body: Value| {
        http.post(format!("{base}{path}")).bearer_auth(OPERATOR_KEY).json(&body).send()
    };
    let res = post("/api/v1/operator/tenants".into(), json!({"id": id})).await.unwrap();
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
    let subs = format!("/api/v1/operator/tenants/{id}/subscriptions");
    let res = post(subs.clone(), json!({"kind": "tenant_license", "start": start})).await.unwrap();
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
    if seats > 0 {
        let body = json!({"kind": "user_licenses", "quantity": seats, "start": start});
        let res = post(subs, body).await.unwrap();
        assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
    }
}

/// The instant test clocks start at.
pub const T0: &str = "2026-11-28T10:00:00Z";

impl TestServer {
    pub async fn start() -> Self {
        Self::with(|_| {}).await
    }

    pub async fn with(edit: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::in_dir(dir, ManualClock::at(T0), edit).await
    }

    pub async fn in_dir(
        dir: tempfile::TempDir,
        clock: Arc<ManualClock>,
        edit: impl FnOnce(&mut Config),
    ) -> Self {
        let mut config = default_config();
        config.store.data_dir = dir.path().join("data");
        edit(&mut config);
        let running = start(config, clock.clone()).await.unwrap();
        let base = format!("http://{}", running.public_addr);
        let admin = format!("http://{}", running.admin_addr);
        Self { running: Some(running), base, admin, clock, dir, http: reqwest::Client::new() }
    }

    pub fn addr(&self) -> SocketAddr {
        self.running.as_ref().unwrap().public_addr
    }

    pub fn state(&self) -> &botgate::state::AppState {
        self.running.as_ref().unwrap().state()
    }

    /// Stops the server and keeps its data folder (for restart tests).
    pub async fn stop(mut self) -> (tempfile::TempDir, Arc<ManualClock>) {
        self.running.take().unwrap().shutdown().await;
        (self.dir, self.clock)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A token for an open bot, from the website channel endpoint.
    pub async fn open_token(&self, bot: &str) -> (String, String) {
        let res =
            self.http.get(self.url(&format!("/api/v1/bots/{bot}/directline/token"))).send().await.unwrap();
        assert_eq!(res.status(), 200, "token for {bot}");
        let v: Value = res.json().await.unwrap();
        (v["token"].as_str().unwrap().to_string(), v["conversationId"].as_str().unwrap().to_string())
    }

    /// A started conversation of `bot`: (token, conversation id, start answer).
    pub async fn conversation(&self, bot: &str) -> (String, String, Value) {
        let (token, conv) = self.open_token(bot).await;
        let res = self
            .http
            .post(self.url("/v3/directline/conversations"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["conversationId"], conv.as_str());
        (token, conv, v)
    }

    /// Posts a message; returns the response.
    pub async fn say(&self, token: &str, conv: &str, text: &str) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/v3/directline/conversations/{conv}/activities")))
            .bearer_auth(token)
            .json(&json!({"type": "message", "from": {"id": "dl_user"}, "text": text}))
            .send()
            .await
            .unwrap()
    }

    /// Posts a message that must be accepted; returns its id.
    pub async fn say_ok(&self, token: &str, conv: &str, text: &str) -> String {
        let res = self.say(token, conv, text).await;
        let status = res.status();
        let body: Value = res.json().await.unwrap();
        assert_eq!(status, 200, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    /// Polls activities from `watermark` (None sends `watermark=`).
    pub async fn poll(&self, token: &str, conv: &str, watermark: Option<&str>) -> Value {
        let res = self
            .http
            .get(self.url(&format!(
                "/v3/directline/conversations/{conv}/activities?watermark={}",
                watermark.unwrap_or("")
            )))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        res.json().await.unwrap()
    }

    /// A development-issuer token for `req` (its `ttl_secs` 0 means an hour), issued now on the
    /// server's clock.
    pub fn dev_token(&self, req: botgate::identity::dev_issuer::TokenRequest) -> String {
        use botgate::identity::dev_issuer;
        let key = dev_issuer::load_or_create(&self.dir.path().join("data")).unwrap();
        let req =
            dev_issuer::TokenRequest { ttl_secs: if req.ttl_secs == 0 { 3600 } else { req.ttl_secs }, ..req };
        dev_issuer::sign(&key, "botgate-dev", "botgate", &req, botgate::clock::Clock::now_secs(&*self.clock))
    }

    /// `user`'s token, a tenant admin of `tenant` when `admin`.
    pub fn token_of(&self, tenant: &str, user: &str, admin: bool) -> String {
        self.dev_token(botgate::identity::dev_issuer::TokenRequest {
            tenant: tenant.into(),
            user: user.into(),
            admin,
            ..Default::default()
        })
    }

    /// `GET path` with a bearer token: the JSON answer, whatever the status.
    pub async fn get_json(&self, path: &str, token: &str) -> Value {
        self.http.get(self.url(path)).bearer_auth(token).send().await.unwrap().json().await.unwrap()
    }

    /// The admin listener's /metrics text.
    pub async fn metrics(&self) -> String {
        self.http.get(format!("{}/metrics", self.admin)).send().await.unwrap().text().await.unwrap()
    }
}

/// The value of a sample line `name{labels} value` in a metrics text, or `None`.
pub fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Asserts an error answer: status and code.
pub async fn assert_error(res: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(res.status().as_u16(), status);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    v
}

/// The built binary.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_botgate")
}

/// The real binary, serving; its stdout's `botgate listening` line parsed.
pub struct BinaryServer {
    pub child: Child,
    pub public: SocketAddr,
    pub admin: SocketAddr,
}

impl BinaryServer {
    pub fn spawn(args: &[&str], data_dir: &Path) -> Self {
        let mut child = Command::new(binary())
            .args(args)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let parse = |key: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} in {line:?}"))
                .parse()
                .unwrap()
        };
        assert!(line.starts_with("botgate listening "), "{line}");
        let (public, admin) = (parse("public="), parse("admin="));
        Self { child, public, admin }
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }
}

impl Drop for BinaryServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A stand-in messaging endpoint that answers every POST 200 after `delay_ms`, counting calls
/// (for timeouts and shutdown; the real SDK bot is driven in `tests/node_clients.rs`).
pub async fn slow_bot(delay_ms: u64) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let app = axum::Router::new().route(
        "/api/messages",
        axum::routing::post(move || {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, calls)
}

/// A configuration file with the demo tenant and an upstream bot `up` at `endpoint` (the test's
/// own bot on loopback, which the outbound policy must allow).
pub fn upstream_config_toml(endpoint: &str, extra: &str) -> String {
    format!(
        r#"
[upstream]
timeout_secs = 2

[outbound]
allow_loopback = true

[[tenants]]
id = "contoso"
subscriptions = [{{ kind = "tenant_license", quantity = 1 }}]

[[bots]]
id = "up"
tenant = "contoso"
name = "Upstream"
kind = "upstream"
endpoint = "{endpoint}"
{extra}
"#
    )
}

/// A real `redis-server` on a free loopback port, `appendfsync always`, in its own folder;
/// stopped on drop.
pub struct RedisServer {
    pub child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, 0)
    }

    /// Starts (or restarts) in `dir` on `port` (0: a free one).
    pub fn start_in(dir: tempfile::TempDir, port: u16) -> Self {
        Self::start_with(dir, port, &[])
    }

    /// Starts in `dir` on `port` (0: a free one), with `extra` arguments (a TLS port, say).
    pub fn start_with(dir: tempfile::TempDir, port: u16, extra: &[&std::ffi::OsStr]) -> Self {
        let free = port == 0;
        let mut dir = Some(dir);
        for _ in 0..20 {
            let port = if free {
                std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
            } else {
                port
            };
            let child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port"])
                .arg(port.to_string())
                .args(["--save", "", "--appendonly", "yes", "--appendfsync", "always", "--dir"])
                .arg(dir.as_ref().unwrap().path())
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server (Debian package redis-server; scripts/test.sh installs it)");
            let mut server = Self { child, port, dir: dir.take().unwrap() };
            if server.answers_as_itself() {
                return server;
            }
            // Another test's server took the free port first: this one exited; try another.
            let _ = server.child.kill();
            let _ = server.child.wait();
            assert!(free, "redis-server did not start on port {port}");
            dir = Some(std::mem::replace(&mut server.dir, tempfile::tempdir().unwrap()));
        }
        panic!("redis-server did not start");
    }

    /// Whether the server on this port is this process (a free port can be taken by another
    /// test's server between the check and the start).
    fn answers_as_itself(&mut self) -> bool {
        let me = format!("process_id:{}", self.child.id());
        for _ in 0..200 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return false;
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return self.cli(&["INFO", "server"]).lines().any(|l| l.trim() == me);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Stops the server (SIGTERM: it finishes its append-only file) and returns its folder.
    pub fn stop(mut self) -> (tempfile::TempDir, u16) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        let port = self.port;
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (dir, port)
    }

    /// How many billed sessions the Redis ledger holds, read through the store; panics if a
    /// session id is recorded twice.
    pub fn billed_sessions(&self) -> usize {
        use botgate::store::Store;
        let ids = botgate::store::redis::RedisStore::open(&self.url()).unwrap().session_ids().unwrap();
        let mut unique = ids.clone();
        unique.dedup();
        assert_eq!(unique.len(), ids.len(), "a session recorded twice in Redis");
        ids.len()
    }

    /// A Redis command through `redis-cli`.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli").args(["-p", &self.port.to_string()]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Through the server at `base`: an open-bot token for `helpdesk`, and its conversation started.
pub async fn started_at(http: &reqwest::Client, base: &str) -> Option<(String, String)> {
    started_with(http, base, "helpdesk").await
}

/// Through the server at `base`: an open-bot token for `bot`, and its conversation started.
pub async fn started_with(http: &reqwest::Client, base: &str, bot: &str) -> Option<(String, String)> {
    let v: serde_json::Value = http
        .get(format!("{base}/api/v1/bots/{bot}/directline/token"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    let (t, c) = (v["token"].as_str()?.to_string(), v["conversationId"].as_str()?.to_string());
    http.post(format!("{base}/v3/directline/conversations")).bearer_auth(&t).send().await.ok()?;
    Some((t, c))
}

/// A new conversation with `helpdesk` at `base` that says "vpn" (a user topic); the status of
/// that message, or `None` when the server could not be reached.
pub async fn say_at(http: &reqwest::Client, base: &str) -> Option<reqwest::StatusCode> {
    let (t, c) = started_at(http, base).await?;
    let res = http
        .post(format!("{base}/v3/directline/conversations/{c}/activities"))
        .bearer_auth(&t)
        .json(&serde_json::json!({"type":"message","from":{"id":"u"},"text":"vpn"}))
        .send()
        .await
        .ok()?;
    Some(res.status())
}
