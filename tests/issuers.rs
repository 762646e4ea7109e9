//! Several accepted issuers (`[[identity.issuers]]`): each with its own audience and keys, a
//! token checked against the issuer its `iss` names; a `{tid}` multi-tenant issuer held to the
//! token's `tid`; the top-level issuer working alongside; validation naming the keys.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use base64::Engine;
use botgate::config::{Config, IssuerConfig};
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// An ES256 key made in the test: its private half and its public JWK.
struct TestKey {
    kid: String,
    private: EncodingKey,
    jwk: Value,
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
    TestKey { kid: kid.into(), private: EncodingKey::from_ec_der(der.as_bytes()), jwk }
}

/// A provider: discovery naming `issuer` (its own URL when `None`), keys at `/jwks`.
#[derive(Clone)]
struct Provider {
    addr: SocketAddr,
    issuer: Arc<Mutex<Option<String>>>,
    keys: Arc<Vec<Value>>,
}

impl Provider {
    async fn start(keys: &[&TestKey], issuer: Option<&str>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let p = Self {
            addr: listener.local_addr().unwrap(),
            issuer: Arc::new(Mutex::new(issuer.map(str::to_string))),
            keys: Arc::new(keys.iter().map(|k| k.jwk.clone()).collect()),
        };
        let app = Router::new()
            .route(
                "/.well-known/openid-configuration",
                get(|State(p): State<Provider>| async move {
                    let own = p.url();
                    let iss = p.issuer.lock().unwrap().clone().unwrap_or_else(|| own.clone());
                    axum::Json(json!({"issuer": iss, "jwks_uri": format!("{own}/jwks")}))
                }),
            )
            .route(
                "/jwks",
                get(|State(p): State<Provider>| async move { axum::Json(json!({"keys": *p.keys})) }),
            )
            .with_state(p.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        p
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

const TENANTS: &str = "https://login.example.com/{tid}/v2.0";

fn token(key: &TestKey, iss: &str, aud: &str, tid: &str, now: i64) -> String {
    let claims = json!({"iss": iss, "aud": aud, "tid": tid, "oid": "alice", "exp": now + 3600});
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&h, &claims, &key.private).unwrap()
}

async fn me(s: &TestServer, token: &str) -> reqwest::Response {
    s.http.get(s.url("/api/v1/me")).bearer_auth(token).send().await.unwrap()
}

async fn tenant_of(s: &TestServer, token: &str) -> String {
    let res = me(s, token).await;
    let status = res.status();
    let v: Value = res.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    v["tenant"].as_str().unwrap().to_string()
}

async fn assert_refused(s: &TestServer, token: &str, why: &str) {
    let v = assert_error(me(s, token).await, 401, "InvalidToken").await;
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains(why), "{message}");
}

fn entry(issuer: &str, audience: &str) -> IssuerConfig {
    IssuerConfig {
        issuer: issuer.into(),
        audience: audience.into(),
        algorithms: vec!["RS256".into(), "ES256".into()],
        jwks_file: None,
        jwks_url: None,
        oidc_issuer: None,
    }
}

/// Issuer A by discovery, B by a JWKS URL (its `iss` a plain string), a `{tid}` issuer by
/// discovery on a concrete URL, and the development issuer at the top level.
#[tokio::test]
async fn each_issuer_is_held_to_its_own_audience_and_keys() {
    let (ka, kb, kt) = (ec_key("a"), ec_key("b"), ec_key("t"));
    let pa = Provider::start(&[&ka], None).await;
    let pb = Provider::start(&[&kb], None).await;
    let pt = Provider::start(&[&kt], Some(TENANTS)).await;
    let (iss_a, iss_b) = (pa.url(), "https://b.example/".to_string());
    let (a, b, t) = (iss_a.clone(), iss_b.clone(), pt.url());
    let jwks_b = format!("{}/jwks", pb.url());
    let s = TestServer::with(move |c| {
        c.outbound.allow_loopback = true;
        c.identity.jwks_fetch_timeout_ms = 500;
        let mut ea = entry(&a, "api-a");
        ea.oidc_issuer = Some(a.clone());
        let mut eb = entry(&b, "api-b");
        eb.jwks_url = Some(jwks_b);
        let mut et = entry(TENANTS, "api-t");
        et.oidc_issuer = Some(t);
        c.identity.issuers = vec![ea, eb, et];
    })
    .await;
    let now = botgate::clock::Clock::now_secs(&*s.clock);

    // One token of each issuer, and the top-level development issuer alongside.
    assert_eq!(tenant_of(&s, &token(&ka, &iss_a, "api-a", "contoso", now)).await, "contoso");
    assert_eq!(tenant_of(&s, &token(&kb, &iss_b, "api-b", "fabrikam", now)).await, "fabrikam");
    assert_eq!(tenant_of(&s, &s.token_of("northwind", "bob", false)).await, "northwind");

    // A's token with B's audience; A's key claiming B's issuer; B's audience under A's issuer.
    assert_refused(&s, &token(&ka, &iss_a, "api-b", "contoso", now), "audience is not accepted").await;
    assert_refused(&s, &token(&ka, &iss_b, "api-b", "contoso", now), "not among").await;
    assert_refused(&s, &token(&ka, &iss_a, "botgate", "contoso", now), "audience is not accepted").await;
    // An issuer nobody accepts.
    assert_refused(&s, &token(&ka, "https://c.example/", "api-a", "contoso", now), "issuer is not accepted")
        .await;

    // The multi-tenant issuer: two tenants, each iss segment equal to its tid.
    let t1 = TENANTS.replace("{tid}", "tenant-1");
    let t2 = TENANTS.replace("{tid}", "Tenant2");
    assert_eq!(tenant_of(&s, &token(&kt, &t1, "api-t", "tenant-1", now)).await, "tenant-1");
    assert_eq!(tenant_of(&s, &token(&kt, &t2, "api-t", "Tenant2", now)).await, "Tenant2");
    assert_refused(&s, &token(&kt, &t1, "api-t", "Tenant2", now), "tid claim is not the tenant").await;
    for bad in ["tenant_1", "a.b", "a/b", ""] {
        let iss = TENANTS.replace("{tid}", bad);
        assert_refused(&s, &token(&kt, &iss, "api-t", bad, now), "issuer is not accepted").await;
    }
    // The template's key does not serve A, nor A's the template.
    assert_refused(&s, &token(&kt, &iss_a, "api-a", "contoso", now), "not among").await;
    assert_refused(&s, &token(&ka, &t1, "api-t", "tenant-1", now), "not among").await;

    // Each source's fetches are counted under its own label.
    let text = s.metrics().await;
    for (label, keys) in [("issuers[0].issuer", 1), ("issuers[1].url", 1), ("issuers[2].issuer", 1)] {
        assert_eq!(metric(&text, &format!("botgate_jwks_keys{{source=\"{label}\"}}")), Some(keys), "{text}");
    }
}

/// Bad `[[identity.issuers]]` entries are refused at load, naming the key.
#[test]
fn issuer_entries_are_validated() {
    let refused = |extra: &str, key: &str, why: &str| {
        let toml = format!("[identity]\n{extra}");
        let e = Config::from_str(&toml, "t.toml").unwrap_err().to_string();
        assert!(e.contains(&format!("`{key}`")) && e.contains(why), "{toml}: {e}");
    };
    let a = "[[identity.issuers]]\nissuer = \"http://a.example\"\naudience = \"a\"\njwks_url = \"http://a.example/jwks\"\n";
    Config::from_str(&format!("[identity]\n{a}"), "t.toml").unwrap();
    // A missing required key is refused by the parser, which names it and its line.
    let missing = format!(
        "[identity]\n{a}[[identity.issuers]]\nissuer = \"http://b.example\"\njwks_url = \"http://b.example/k\"\n"
    );
    let e = Config::from_str(&missing, "t.toml").unwrap_err().to_string();
    assert!(e.contains("missing field `audience`") && e.contains("line 6"), "{e}");
    refused(
        &format!(
            "{a}[[identity.issuers]]\nissuer = \"http://b.example\"\naudience = \"\"\njwks_url = \"http://b.example/k\"\n"
        ),
        "identity.issuers[1].audience",
        "must not be empty",
    );
    refused(&format!("{a}{a}"), "identity.issuers[1].issuer", "another entry");
    refused(
        "[[identity.issuers]]\nissuer = \"botgate-dev\"\naudience = \"a\"\njwks_url = \"http://a.example/jwks\"\n",
        "identity.issuers[0].issuer",
        "another entry",
    );
    refused(
        "[[identity.issuers]]\nissuer = \"http://a.example\"\naudience = \"a\"\n",
        "identity.issuers[0].jwks_file",
        "key source",
    );
    refused(&format!("{a}algorithms = [\"HS256\"]\n"), "identity.issuers[0].algorithms[0]", "HS256");
    refused(
        &format!("{a}oidc_issuer = \"http://b.example\"\n"),
        "identity.issuers[0].oidc_issuer",
        "must equal",
    );
    refused(
        &format!("{a}oidc_issuer = \"https://a.example\"\n"),
        "identity.issuers[0].oidc_issuer",
        "http://",
    );
    let t = "[[identity.issuers]]\nissuer = \"https://login.example.com/{tid}/v2.0\"\naudience = \"t\"\n";
    Config::from_str(
        &format!("[identity]\n{t}oidc_issuer = \"http://login.example.com/common/v2.0\"\n"),
        "t.toml",
    )
    .unwrap();
    refused(
        &format!("{t}oidc_issuer = \"http://login.example.com/{{tid}}/v2.0\"\n"),
        "identity.issuers[0].oidc_issuer",
        "without {tid}",
    );
    refused(
        "[[identity.issuers]]\nissuer = \"https://x/{tid}/{tid}\"\naudience = \"t\"\njwks_url = \"http://x/k\"\n",
        "identity.issuers[0].issuer",
        "once",
    );

    // `check-config` reads an entry's JWKS file and names its key.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    let missing = dir.path().join("none.json");
    std::fs::write(
        &file,
        format!(
            "[identity]\n[[identity.issuers]]\nissuer = \"http://a.example\"\naudience = \"a\"\njwks_file = {:?}\n",
            missing.display().to_string()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(binary()).arg("check-config").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("key `identity.issuers[0].jwks_file`"), "{err}");
}
