//! Identity keys from an OpenID provider: discovery and JWKS served by a provider in the test (on
//! 127.0.0.1:0, keys generated here), rotated while the gateway runs; refreshes driven by the
//! server's manual clock; failures, a silent provider and a storm of unknown key ids.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use botgate::clock::Clock;
use botgate::config::Config;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A signing key made in the test: its private half and its public JWK.
#[derive(Clone)]
struct TestKey {
    kid: String,
    alg: Algorithm,
    private: EncodingKey,
    jwk: Value,
}

fn rsa_key(kid: &str) -> TestKey {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::traits::PublicKeyParts;
    let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).unwrap();
    let der = key.to_pkcs1_der().unwrap();
    let jwk = json!({
        "kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
        "n": b64(&key.n().to_bytes_be()), "e": b64(&key.e().to_bytes_be()),
    });
    TestKey {
        kid: kid.into(),
        alg: Algorithm::RS256,
        private: EncodingKey::from_rsa_der(der.as_bytes()),
        jwk,
    }
}

fn ec_key(kid: &str) -> TestKey {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    use p256::pkcs8::EncodePrivateKey;
    let key = p256::SecretKey::random(&mut rand_core::OsRng);
    let der = key.to_pkcs8_der().unwrap();
    let point = key.public_key().to_encoded_point(false);
    let jwk = json!({
        "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
        "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap()),
    });
    TestKey { kid: kid.into(), alg: Algorithm::ES256, private: EncodingKey::from_ec_der(der.as_bytes()), jwk }
}

/// RSA key generation is slow in a debug build: the keys are made once per test binary.
fn keys() -> &'static [TestKey; 4] {
    static KEYS: OnceLock<[TestKey; 4]> = OnceLock::new();
    KEYS.get_or_init(|| [rsa_key("rsa-a"), rsa_key("rsa-b"), ec_key("ec-a"), ec_key("ec-b")])
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Serve,
    Fail,
    Hang,
}

struct ProviderState {
    mode: Mode,
    keys: Vec<Value>,
    cache_control: Option<String>,
    /// The issuer the discovery document names (the provider's own by default).
    issuer: Option<String>,
    /// The jwks_uri the discovery document names (the provider's own by default).
    jwks_uri: Option<String>,
    delay: Duration,
}

/// An OpenID provider: discovery at `/.well-known/openid-configuration`, keys at `/jwks`, each
/// request counted.
#[derive(Clone)]
struct Provider {
    addr: SocketAddr,
    state: Arc<Mutex<ProviderState>>,
    discovery: Arc<AtomicUsize>,
    jwks: Arc<AtomicUsize>,
}

impl Provider {
    async fn start(keys: &[&TestKey]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let provider = Self {
            addr: listener.local_addr().unwrap(),
            state: Arc::new(Mutex::new(ProviderState {
                mode: Mode::Serve,
                keys: keys.iter().map(|k| k.jwk.clone()).collect(),
                cache_control: Some("public, max-age=600".into()),
                issuer: None,
                jwks_uri: None,
                delay: Duration::ZERO,
            })),
            discovery: Arc::default(),
            jwks: Arc::default(),
        };
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .with_state(provider.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        provider
    }

    fn issuer(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set(&self, edit: impl FnOnce(&mut ProviderState)) {
        edit(&mut self.state.lock().unwrap());
    }

    fn serve(&self, keys: &[&TestKey]) {
        self.set(|s| s.keys = keys.iter().map(|k| k.jwk.clone()).collect());
    }

    /// (discovery requests, JWKS requests) so far.
    fn counts(&self) -> (usize, usize) {
        (self.discovery.load(Ordering::SeqCst), self.jwks.load(Ordering::SeqCst))
    }
}

/// The answer for the current mode, after the configured delay.
async fn answer(p: &Provider, counter: &AtomicUsize, body: impl FnOnce(&ProviderState) -> Value) -> Response {
    counter.fetch_add(1, Ordering::SeqCst);
    let (mode, delay, value, cache_control) = {
        let s = p.state.lock().unwrap();
        (s.mode, s.delay, body(&s), s.cache_control.clone())
    };
    tokio::time::sleep(delay).await;
    match mode {
        Mode::Serve => {
            let mut res = axum::Json(value).into_response();
            if let Some(cc) = cache_control {
                res.headers_mut().insert(http::header::CACHE_CONTROL, cc.parse().unwrap());
            }
            res
        }
        Mode::Fail => (http::StatusCode::INTERNAL_SERVER_ERROR, "down").into_response(),
        Mode::Hang => std::future::pending().await,
    }
}

async fn discovery(State(p): State<Provider>) -> Response {
    let own = p.issuer();
    answer(&p, &p.discovery, |s| {
        json!({
            "issuer": s.issuer.clone().unwrap_or_else(|| own.clone()),
            "jwks_uri": s.jwks_uri.clone().unwrap_or_else(|| format!("{own}/jwks")),
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        })
    })
    .await
}

async fn jwks(State(p): State<Provider>) -> Response {
    answer(&p, &p.jwks, |s| json!({ "keys": s.keys })).await
}

/// A gateway whose keys come from `provider`'s discovery (and `edit`'s further sources).
async fn gateway(provider: &Provider, edit: impl FnOnce(&mut Config)) -> TestServer {
    let issuer = provider.issuer();
    TestServer::with(|c| {
        c.outbound.allow_loopback = true;
        c.identity.algorithms = vec!["RS256".into(), "ES256".into()];
        c.identity.issuer = issuer.clone();
        c.identity.oidc_issuer = Some(issuer);
        c.identity.jwks_fetch_timeout_ms = 500;
        edit(c);
    })
    .await
}

/// alice's token signed by `key` under `kid`, valid for two hours of the server's clock; `n`
/// makes tokens of the same key differ (the gateway caches verified tokens by their text).
fn token(s: &TestServer, key: &TestKey, kid: &str, n: u64) -> String {
    let now = s.clock.now_secs();
    let iss = s.state().config().identity.issuer.clone();
    let claims =
        json!({"iss": iss, "aud": "botgate", "tid": "contoso", "oid": "alice", "exp": now + 7200, "n": n});
    let mut h = Header::new(key.alg);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(&h, &claims, &key.private).unwrap()
}

async fn me(s: &TestServer, token: &str) -> reqwest::Response {
    s.http.get(s.url("/api/v1/me")).bearer_auth(token).send().await.unwrap()
}

async fn assert_ok(s: &TestServer, token: &str) {
    let res = me(s, token).await;
    let status = res.status();
    assert_eq!(status, 200, "{}", res.text().await.unwrap());
}

/// A 401 `InvalidToken` whose message says `why`.
async fn assert_refused(s: &TestServer, token: &str, why: &str) {
    let v = assert_error(me(s, token).await, 401, "InvalidToken").await;
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains(why), "{message}");
}

/// The value of the series of `name` whose labels include every one of `labels`.
fn series(text: &str, name: &str, labels: &[&str]) -> Option<u64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn fetches(s: &TestServer, source: &str, outcome: &str) -> u64 {
    let text = s.metrics().await;
    let (src, out) = (format!("source=\"{source}\""), format!("outcome=\"{outcome}\""));
    series(&text, "botgate_jwks_fetch_total", &[&src, &out]).unwrap_or_else(|| panic!("no series in {text}"))
}

async fn held(s: &TestServer, source: &str) -> u64 {
    let text = s.metrics().await;
    series(&text, "botgate_jwks_keys", &[&format!("source=\"{source}\"")]).unwrap_or_else(|| panic!("{text}"))
}

/// Keys rotate at the provider: a new key id works at once (one fetch), a removed key keeps
/// working until the refresh its max-age schedules on the server's clock, then is refused even
/// for a token verified (and cached) before.
#[tokio::test]
async fn rotated_keys_are_taken_without_a_restart() {
    let [rsa_a, rsa_b, ec_a, ec_b] = keys();
    let p = Provider::start(&[rsa_a, ec_a]).await;
    let s = gateway(&p, |_| {}).await;
    assert_eq!(p.counts(), (1, 1), "the start-up fetch: discovery, then its jwks_uri");
    let old = token(&s, rsa_a, "rsa-a", 0);
    assert_ok(&s, &old).await;
    assert_ok(&s, &token(&s, ec_a, "ec-a", 0)).await;
    assert_eq!(p.counts(), (1, 1), "known key ids need no fetch");
    assert_eq!(held(&s, "issuer").await, 2);

    // New keys appear: tokens naming them work at once.
    p.serve(&[rsa_a, rsa_b, ec_a]);
    assert_ok(&s, &token(&s, rsa_b, "rsa-b", 0)).await;
    assert_eq!(p.counts(), (2, 2));
    // A second new key within the cooldown: refused at once, no fetch.
    p.serve(&[rsa_a, rsa_b, ec_a, ec_b]);
    assert_refused(&s, &token(&s, ec_b, "ec-b", 0), "not among the identity provider's keys").await;
    assert_eq!(p.counts(), (2, 2));
    s.clock.advance_secs(30);
    assert_ok(&s, &token(&s, ec_b, "ec-b", 0)).await;
    assert_eq!(p.counts(), (3, 3));

    // rsa-a is removed; the held copy serves until the scheduled refresh (max-age=600 of the
    // last fetch, 30 s ago).
    p.serve(&[rsa_b, ec_a, ec_b]);
    assert_ok(&s, &old).await;
    assert_ok(&s, &token(&s, rsa_a, "rsa-a", 1)).await;
    s.clock.advance_secs(599);
    assert_eq!(s.state().verifier().keys().refresh_due().await, 0);
    assert_eq!(p.counts(), (3, 3), "not due before max-age");
    s.clock.advance_secs(1);
    assert_eq!(s.state().verifier().keys().refresh_due().await, 0);
    assert_eq!(p.counts(), (4, 4), "due at max-age");
    // The token verified before is checked again, and its key id (gone) fetches once more.
    assert_refused(&s, &old, "not among the identity provider's keys").await;
    assert_eq!(p.counts(), (5, 5));
    assert_ok(&s, &token(&s, rsa_b, "rsa-b", 1)).await;
    assert_ok(&s, &token(&s, ec_b, "ec-b", 1)).await;
    assert_eq!(held(&s, "issuer").await, 3);
    assert_eq!(fetches(&s, "issuer", "ok").await, 5);
    assert_eq!(fetches(&s, "issuer", "error").await, 0);

    // max-age is clamped: 10 s means 5 minutes, none means an hour.
    p.set(|st| st.cache_control = Some("max-age=10".into()));
    s.clock.advance_secs(600);
    s.state().verifier().keys().refresh_due().await;
    assert_eq!(p.counts(), (6, 6));
    p.set(|st| st.cache_control = None);
    s.clock.advance_secs(299);
    s.state().verifier().keys().refresh_due().await;
    assert_eq!(p.counts(), (6, 6));
    s.clock.advance_secs(1);
    s.state().verifier().keys().refresh_due().await;
    assert_eq!(p.counts(), (7, 7));
    s.clock.advance_secs(3599);
    s.state().verifier().keys().refresh_due().await;
    assert_eq!(p.counts(), (7, 7));
    s.clock.advance_secs(1);
    s.state().verifier().keys().refresh_due().await;
    assert_eq!(p.counts(), (8, 8));
}

/// A provider that stops answering or fails (500) leaves the keys held serving, without the
/// request path waiting on it; an unknown key id is then a 401 saying why, within the fetch
/// timeout; failures are counted; the provider's recovery is picked up on schedule.
#[tokio::test]
async fn a_failing_provider_leaves_the_held_keys_serving() {
    let [rsa_a, rsa_b, ec_a, _] = keys();
    let p = Provider::start(&[rsa_a, ec_a]).await;
    let s = gateway(&p, |_| {}).await;
    assert_ok(&s, &token(&s, rsa_a, "rsa-a", 0)).await;

    // Silent: an unknown key id waits at most the fetch timeout (500 ms), then 401.
    p.set(|st| st.mode = Mode::Hang);
    let started = Instant::now();
    assert_refused(&s, &token(&s, rsa_b, "rsa-b", 0), "did not send its keys in time").await;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(400) && waited < Duration::from_secs(3), "{waited:?}");
    // Known keys answer at once while that fetch still hangs.
    let started = Instant::now();
    assert_ok(&s, &token(&s, rsa_a, "rsa-a", 1)).await;
    assert!(started.elapsed() < Duration::from_millis(300), "{:?}", started.elapsed());
    assert_eq!(s.state().verifier().keys().refresh_due().await, 1, "the hanging fetch timed out");
    assert_eq!(p.counts(), (2, 1));
    assert_eq!(fetches(&s, "issuer", "error").await, 1);

    // Failing: a failed source is tried again after the cooldown (30 s).
    p.set(|st| st.mode = Mode::Fail);
    s.clock.advance_secs(29);
    s.state().verifier().keys().refresh_due().await;
    assert_eq!(p.counts(), (2, 1));
    s.clock.advance_secs(1);
    assert_eq!(s.state().verifier().keys().refresh_due().await, 1, "the retry failed");
    assert_eq!(p.counts(), (3, 1), "discovery failed, so no JWKS was asked for");
    assert_eq!(fetches(&s, "issuer", "error").await, 2);
    assert_eq!(held(&s, "issuer").await, 2, "the keys held are kept");
    assert_ok(&s, &token(&s, rsa_a, "rsa-a", 2)).await;
    assert_ok(&s, &token(&s, ec_a, "ec-a", 2)).await;
    assert_refused(&s, &token(&s, rsa_b, "rsa-b", 1), "could not be fetched").await;
    assert_eq!(p.counts(), (4, 1), "one fetch for the unknown key id");
    assert_eq!(fetches(&s, "issuer", "error").await, 3);

    // Back, with rsa-b.
    p.set(|st| st.mode = Mode::Serve);
    p.serve(&[rsa_a, rsa_b, ec_a]);
    s.clock.advance_secs(29);
    s.state().verifier().keys().refresh_due().await;
    assert_eq!(p.counts(), (4, 1));
    s.clock.advance_secs(1);
    assert_eq!(s.state().verifier().keys().refresh_due().await, 0);
    assert_eq!(p.counts(), (5, 2));
    assert_ok(&s, &token(&s, rsa_b, "rsa-b", 2)).await;
    assert_eq!(p.counts(), (5, 2));
    assert_eq!(fetches(&s, "issuer", "ok").await, 2);
    assert_eq!(held(&s, "issuer").await, 3);
}

/// 200 concurrent requests with random key ids make exactly one fetch (discovery and JWKS once),
/// all answered 401; after the cooldown the next storm makes exactly one more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_unknown_key_ids_makes_one_fetch() {
    let [rsa_a, ..] = keys();
    let p = Provider::start(&[rsa_a]).await;
    let s = Arc::new(gateway(&p, |c| c.identity.jwks_fetch_timeout_ms = 10_000).await);
    // A slow provider, so that the storm's requests pile up on the one fetch in flight.
    p.set(|st| st.delay = Duration::from_millis(100));
    assert_eq!(p.counts(), (1, 1));
    for round in 1..=2 {
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move {
                    let kid = format!("kid-{:016x}", rand::random::<u64>());
                    let t = token(&s, rsa_a, &kid, 0);
                    let res = me(&s, &t).await;
                    let status = res.status().as_u16();
                    let v: Value = res.json().await.unwrap();
                    (status, v["error"]["code"].as_str().unwrap_or_default().to_string())
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), (401, "InvalidToken".to_string()));
        }
        assert_eq!(p.counts(), (1 + round, 1 + round), "round {round}");
        s.clock.advance_secs(30);
    }
    assert_ok(&s, &token(&s, rsa_a, "rsa-a", 0)).await;
}

/// A node whose provider is down at start-up starts all the same; keys come with the first
/// good fetch. The JWKS file's and a direct JWKS URL's keys are accepted beside each other.
#[tokio::test]
async fn the_server_starts_without_the_provider_and_sources_combine() {
    let [rsa_a, _, ec_a, _] = keys();
    let p = Provider::start(&[ec_a]).await;
    p.set(|st| st.mode = Mode::Fail);
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let url = format!("{}/jwks", p.issuer());
    let s = gateway(&p, |c| {
        c.identity.oidc_issuer = None;
        c.identity.jwks_url = Some(url);
        c.identity.jwks_file = Some(fixtures.join("jwks.json"));
    })
    .await;
    assert_eq!(p.counts(), (0, 1));
    assert_eq!(fetches(&s, "url", "error").await, 1);
    assert_eq!(held(&s, "file").await, 2);
    assert_eq!(held(&s, "url").await, 0);
    // The file's key works while the URL is down.
    let file_key = TestKey {
        kid: "rsa1".into(),
        alg: Algorithm::RS256,
        private: EncodingKey::from_rsa_der(&std::fs::read(fixtures.join("rsa1.der")).unwrap()),
        jwk: Value::Null,
    };
    assert_ok(&s, &token(&s, &file_key, &file_key.kid, 0)).await;
    assert_refused(&s, &token(&s, ec_a, "ec-a", 0), "could not be fetched").await;
    assert_eq!(p.counts(), (0, 2), "the unknown key id tried once more");

    p.set(|st| st.mode = Mode::Serve);
    s.clock.advance_secs(30);
    assert_ok(&s, &token(&s, ec_a, "ec-a", 1)).await;
    assert_ok(&s, &token(&s, &file_key, &file_key.kid, 1)).await;
    assert_eq!(p.counts(), (0, 3));
    assert_eq!(held(&s, "url").await, 1);
    // A key of no source.
    assert_refused(&s, &token(&s, rsa_a, "rsa-a", 0), "not among").await;
}

/// The discovery document must name the configured issuer, and its jwks_uri is held to the
/// outbound policy; either failure keeps the provider's keys out.
#[tokio::test]
async fn discovery_is_checked() {
    let [rsa_a, ..] = keys();
    let p = Provider::start(&[rsa_a]).await;
    p.set(|st| st.issuer = Some("http://evil.example".into()));
    let s = gateway(&p, |_| {}).await;
    assert_eq!(p.counts(), (1, 0), "a wrong issuer: its jwks_uri is not fetched");
    assert_refused(&s, &token(&s, rsa_a, "rsa-a", 0), "could not be fetched").await;
    assert_eq!(p.counts(), (2, 0));
    p.set(|st| {
        st.issuer = None;
        st.jwks_uri = Some("http://169.254.169.254/jwks".into());
    });
    s.clock.advance_secs(30);
    assert_refused(&s, &token(&s, rsa_a, "rsa-a", 1), "could not be fetched").await;
    assert_eq!(p.counts(), (3, 0));
    assert_eq!(fetches(&s, "issuer", "error").await, 3);
    p.set(|st| st.jwks_uri = None);
    s.clock.advance_secs(30);
    assert_ok(&s, &token(&s, rsa_a, "rsa-a", 2)).await;
    assert_eq!(p.counts(), (4, 1));
}

/// Bad key-source settings are refused at load naming the key, and `check-config` says so.
#[test]
fn key_source_settings_are_validated() {
    let refused = |toml: &str, key: &str, why: &str| {
        let e = Config::from_str(toml, "t.toml").unwrap_err().to_string();
        assert!(e.contains(&format!("`{key}`")) && e.contains(why), "{toml}: {e}");
    };
    let rs = "[identity]\nalgorithms = [\"RS256\"]\n";
    refused(rs, "identity.jwks_file", "jwks_url or oidc_issuer");
    refused(&format!("{rs}jwks_url = \"https://login.example/keys\"\n"), "identity.jwks_url", "http://");
    refused(&format!("{rs}jwks_url = \"not a url\"\n"), "identity.jwks_url", "not a valid URL");
    refused(
        &format!("{rs}issuer = \"http://127.0.0.1:1\"\noidc_issuer = \"http://127.0.0.1:1\"\n"),
        "identity.oidc_issuer",
        "outbound.allow_loopback",
    );
    refused(
        &format!("{rs}issuer = \"http://a.example\"\noidc_issuer = \"http://b.example\"\n"),
        "identity.oidc_issuer",
        "must equal identity.issuer",
    );
    let ok = format!("{rs}issuer = \"http://a.example\"\noidc_issuer = \"http://a.example\"\n");
    let c = Config::from_str(&ok, "t.toml").unwrap();
    assert_eq!((c.identity.jwks_fetch_timeout_ms, c.identity.jwks_refetch_cooldown_secs), (5000, 30));
    refused(&format!("{ok}jwks_fetch_timeout_ms = 0\n"), "identity.jwks_fetch_timeout_ms", "100 to 30000");
    refused(
        &format!("{ok}jwks_refetch_cooldown_secs = 0\n"),
        "identity.jwks_refetch_cooldown_secs",
        "at least 1",
    );
    Config::from_str(&format!("{rs}jwks_url = \"http://keys.example/jwks\"\n"), "t.toml").unwrap();

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, format!("{rs}jwks_url = \"https://login.example/keys\"\n")).unwrap();
    let out = std::process::Command::new(binary()).arg("check-config").arg(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("identity.jwks_url") && err.contains("http://"), "{err}");
}
