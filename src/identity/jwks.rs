//! The public keys RS256/ES256 tokens are checked with, from every configured source: a JWKS
//! file (read once at start), a JWKS URL (`identity.jwks_url`), and an OpenID provider's
//! discovery document (`identity.oidc_issuer`, whose `jwks_uri` is fetched). Keys of all sources
//! are accepted together.
//!
//! The request path reads a snapshot ([`ArcSwap`]) and never waits on the network for a key it
//! holds. Remote keys are fetched through the gateway's one [`OutboundClient`] (its policy, its
//! answer cap), each source's fetch (discovery and JWKS together) bounded by
//! `identity.jwks_fetch_timeout_ms`:
//!
//! - on schedule: a source again after its JWKS answer's `Cache-Control: max-age`, clamped to
//!   [`MIN_REFRESH_SECS`]..[`MAX_REFRESH_SECS`] ([`DEFAULT_REFRESH_SECS`] without one); a failed
//!   fetch is tried again after `identity.jwks_refetch_cooldown_secs`. The schedule reads the
//!   server's [`Clock`](crate::clock::Clock), so tests move time instead of waiting;
//! - at once, when a token names a key id that is not held: every source, at most one fetch in
//!   flight (each request that misses waits on the same one, for at most the fetch timeout), and
//!   at most one such fetch per cooldown; a miss within the cooldown is refused at once.
//!
//! A failed fetch keeps the keys held; it is logged and counted in `botgate_jwks_fetch_total`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::Full;
use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};
use serde::Deserialize;
use tokio::sync::watch;

use super::issuer::IssuerPattern;
use super::jwt::VerifierError;
use crate::clock::{Millis, SharedClock};
use crate::config::IdentityConfig;
use crate::outbound::OutboundClient;
use crate::telemetry::registry::Metrics;

/// Keys are fetched again this long after a JWKS answer without `Cache-Control: max-age`.
pub const DEFAULT_REFRESH_SECS: u64 = 3600;
/// The shortest refresh interval a `max-age` can ask for (a smaller one, `no-cache` or
/// `no-store` mean this).
pub const MIN_REFRESH_SECS: u64 = 300;
/// The longest refresh interval a `max-age` can ask for.
pub const MAX_REFRESH_SECS: u64 = 86_400;

/// When to fetch a JWKS again, in seconds, from its answer's `Cache-Control` header.
pub fn refresh_after_secs(cache_control: Option<&str>) -> u64 {
    let Some(value) = cache_control else { return DEFAULT_REFRESH_SECS };
    let mut max_age = None;
    for directive in value.split(',').map(str::trim) {
        match directive.split_once('=') {
            Some((k, v)) if k.trim().eq_ignore_ascii_case("max-age") => {
                max_age = v.trim().trim_matches('"').parse::<u64>().ok().or(max_age);
            }
            None if directive.eq_ignore_ascii_case("no-cache")
                || directive.eq_ignore_ascii_case("no-store") =>
            {
                return MIN_REFRESH_SECS;
            }
            _ => {}
        }
    }
    max_age.unwrap_or(DEFAULT_REFRESH_SECS).clamp(MIN_REFRESH_SECS, MAX_REFRESH_SECS)
}

/// A key as held: the decoding key and the JWK's text (to tell a changed key from the same one).
#[derive(Clone)]
struct Held {
    key: DecodingKey,
    text: String,
}

/// Every key held, by `kid`; replaced whole on each change.
#[derive(Default)]
pub struct KeySet {
    keys: HashMap<String, Held>,
}

impl KeySet {
    /// The key with this id.
    pub fn get(&self, kid: &str) -> Option<&DecodingKey> {
        self.keys.get(kid).map(|h| &h.key)
    }

    /// The only key, when exactly one is held (a token without `kid` may use it).
    pub fn single(&self) -> Option<&DecodingKey> {
        (self.keys.len() == 1).then(|| self.keys.values().next().map(|h| &h.key)).flatten()
    }

    /// How many keys are held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn holds(&self, kid: Option<&str>) -> bool {
        match kid {
            Some(kid) => self.keys.contains_key(kid),
            None => self.single().is_some(),
        }
    }
}

/// Parses one JWK: `Ok(None)` for a key that is not an RSA or EC signing key (`use: enc`, or a
/// symmetric or other key type, which no RS256/ES256 token may name).
fn parse_key(value: &serde_json::Value) -> Result<Option<(String, Held)>, String> {
    let jwk: Jwk = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    let asymmetric =
        matches!(jwk.algorithm, AlgorithmParameters::RSA(_) | AlgorithmParameters::EllipticCurve(_));
    if !asymmetric || matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Ok(None);
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
    let kid = jwk.common.key_id.clone().unwrap_or_default();
    Ok(Some((kid, Held { key, text: value.to_string() })))
}

#[derive(Deserialize)]
struct RawSet {
    keys: Vec<serde_json::Value>,
}

/// The keys of a JWKS a provider serves: keys that do not parse (another key type, another use)
/// are skipped, so one unusual key does not cost the others.
fn parse_remote(body: &[u8]) -> Result<(Vec<(String, Held)>, usize), String> {
    let set: RawSet = serde_json::from_slice(body).map_err(|e| format!("the JWKS is not valid: {e}"))?;
    let mut keys = Vec::new();
    let mut skipped = 0;
    for v in &set.keys {
        match parse_key(v) {
            Ok(Some(k)) => keys.push(k),
            Ok(None) => {}
            Err(_) => skipped += 1,
        }
    }
    Ok((keys, skipped))
}

/// The keys of the JWKS file: every key must parse (the operator wrote it).
fn read_file(path: &std::path::Path, key: &str) -> Result<Vec<(String, Held)>, VerifierError> {
    let err = |message: String| VerifierError::Jwks {
        key: key.to_string(),
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let set: RawSet = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let mut keys = Vec::new();
    for (i, v) in set.keys.iter().enumerate() {
        if let Some(k) = parse_key(v).map_err(|e| err(format!("key {i}: {e}")))? {
            keys.push(k);
        }
    }
    Ok(keys)
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

/// A remote key source.
enum SourceKind {
    /// `identity.jwks_url`.
    Url(String),
    /// `identity.oidc_issuer`: discovery, then its `jwks_uri`.
    Issuer(String),
}

impl SourceKind {
    fn kind(&self) -> &'static str {
        match self {
            Self::Url(_) => "url",
            Self::Issuer(_) => "issuer",
        }
    }

    fn url(&self) -> &str {
        match self {
            Self::Url(u) | Self::Issuer(u) => u,
        }
    }
}

struct Source {
    kind: SourceKind,
    /// Its metric label (`url`, `issuers[1].issuer`).
    label: String,
    ok: IntCounter,
    error: IntCounter,
    keys: IntGauge,
}

/// What the network side needs: the outbound client and the fetch metrics (registered once,
/// shared by every issuer's sources); cloning is shallow.
#[derive(Clone)]
pub struct Remote {
    client: OutboundClient,
    fetches: IntCounterVec,
    held: IntGaugeVec,
}

impl Remote {
    /// Registers the key fetch metrics in the app's registry.
    pub fn new(client: OutboundClient, metrics: &Metrics) -> Result<Self, VerifierError> {
        let fetches = IntCounterVec::new(
            Opts::new(
                "botgate_jwks_fetch_total",
                "Fetches of the identity provider's keys, by source (url, issuer; issuers[i].url, issuers[i].issuer for [[identity.issuers]]) and outcome (ok, error).",
            ),
            &["source", "outcome"],
        )
        .map_err(VerifierError::Metrics)?;
        let held = IntGaugeVec::new(
            Opts::new(
                "botgate_jwks_keys",
                "Signing keys held, by source (file, url, issuer; issuers[i].file, ... for [[identity.issuers]]).",
            ),
            &["source"],
        )
        .map_err(VerifierError::Metrics)?;
        let registry = metrics.registry();
        registry.register(Box::new(fetches.clone())).map_err(VerifierError::Metrics)?;
        registry.register(Box::new(held.clone())).map_err(VerifierError::Metrics)?;
        Ok(Self { client, fetches, held })
    }
}

/// One issuer's key sources, as configured.
struct SourceConfig<'a> {
    /// The configuration key of its JWKS file (for errors).
    file_key: String,
    /// Prefixed to the metric labels: empty for the top-level issuer, `issuers[i].` else.
    label: String,
    jwks_file: Option<&'a std::path::Path>,
    jwks_url: Option<&'a str>,
    oidc_issuer: Option<&'a str>,
    /// A `{tid}` issuer: a discovery document may name it, or an `iss` of its shape.
    template: Option<&'a str>,
}

/// Why a token's unknown key id could not be found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// No remote source is configured: the keys held are all there are.
    NoRemote,
    /// The keys were fetched (now or within the cooldown) and none has this id.
    Absent,
    /// The last fetch failed, so the provider's current keys are not known.
    FetchFailed,
    /// The fetch did not finish within the fetch timeout.
    TimedOut,
}

impl Miss {
    /// The sentence of the 401 answer.
    pub fn explain(self) -> &'static str {
        match self {
            Self::NoRemote => "no key matches the token",
            Self::Absent => "the token's key id is not among the identity provider's keys",
            Self::FetchFailed => {
                "the token's key id is not among the keys held, and the identity provider's keys could not be fetched"
            }
            Self::TimedOut => {
                "the token's key id is not among the keys held, and the identity provider did not send its keys in time"
            }
        }
    }
}

/// A fetch in flight: done once the value is true (or the sender is gone).
#[derive(Clone)]
struct Flight {
    done: watch::Receiver<bool>,
    /// Whether it fetches every source (an unknown key id's fetch, or a scheduled one of all).
    covers_all: bool,
}

impl Flight {
    async fn wait(mut self) {
        // An error means the fetch task ended without saying so: done all the same.
        let _ = self.done.wait_for(|d| *d).await;
    }
}

/// How a source's fetch failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// No whole answer within the fetch timeout.
    TimedOut,
    /// Refused, unreachable, a non-200 answer, or a document that is not valid.
    Error,
}

struct State {
    /// Per source: the keys of its last good fetch.
    held: Vec<Vec<(String, Held)>>,
    /// Per source: when its next scheduled fetch is due.
    due_ms: Vec<Millis>,
    /// Per source: how its last fetch failed, if it did.
    failed: Vec<Option<Failure>>,
    /// When the last fetch for an unknown key id began.
    last_kid_fetch_ms: Option<Millis>,
    flight: Option<Flight>,
}

/// The key sources and the keys held; cloning is shallow.
#[derive(Clone)]
pub struct Keys {
    inner: Arc<Inner>,
}

struct Inner {
    clock: SharedClock,
    file: Vec<(String, Held)>,
    sources: Vec<Source>,
    /// A `{tid}` issuer's pattern: its discovery document may name the template or an issuer of
    /// its shape instead of the concrete URL it is fetched from.
    template: Option<IssuerPattern>,
    client: Option<OutboundClient>,
    timeout: Duration,
    cooldown_ms: i64,
    set: ArcSwap<KeySet>,
    /// Bumped when a key is removed or replaced, so tokens verified with it leave the verified
    /// cache. Release on store, Acquire on load: a reader that sees the new number sees the new set.
    generation: AtomicU64,
    /// std, not tokio: held for a few assignments, never across an await.
    state: Mutex<State>,
}

impl Keys {
    /// The key sources of `config`'s top-level issuer: the file is read now; the remote ones
    /// (with `remote`) are fetched by [`refresh_due`](Self::refresh_due) and on unknown key ids.
    /// Without `remote` only the file is used (`botgate check-config`, unit tests).
    pub fn new(
        config: &IdentityConfig,
        clock: SharedClock,
        remote: Option<Remote>,
    ) -> Result<Self, VerifierError> {
        let sources = SourceConfig {
            file_key: "identity.jwks_file".into(),
            label: String::new(),
            jwks_file: config.jwks_file.as_deref(),
            jwks_url: config.jwks_url.as_deref(),
            oidc_issuer: config.oidc_issuer.as_deref(),
            template: None,
        };
        Self::build(config, sources, clock, remote)
    }

    /// The key sources of `config.issuers[i]`, fetched on the same schedule and cooldown as the
    /// top-level issuer's, each entry on its own.
    pub fn for_issuer(
        config: &IdentityConfig,
        i: usize,
        clock: SharedClock,
        remote: Option<Remote>,
    ) -> Result<Self, VerifierError> {
        let entry = &config.issuers[i];
        let sources = SourceConfig {
            file_key: format!("identity.issuers[{i}].jwks_file"),
            label: format!("issuers[{i}]."),
            jwks_file: entry.jwks_file.as_deref(),
            jwks_url: entry.jwks_url.as_deref(),
            oidc_issuer: entry.oidc_issuer.as_deref(),
            template: entry
                .issuer
                .contains(crate::config::TENANT_PLACEHOLDER)
                .then_some(entry.issuer.as_str()),
        };
        Self::build(config, sources, clock, remote)
    }

    fn build(
        config: &IdentityConfig,
        cfg: SourceConfig<'_>,
        clock: SharedClock,
        remote: Option<Remote>,
    ) -> Result<Self, VerifierError> {
        let file = match cfg.jwks_file {
            Some(path) => read_file(path, &cfg.file_key)?,
            None => Vec::new(),
        };
        let mut sources = Vec::new();
        let mut client = None;
        if let Some(remote) = remote {
            if cfg.jwks_file.is_some() {
                remote
                    .held
                    .with_label_values(&[format!("{}file", cfg.label).as_str()])
                    .set(file.len() as i64);
            }
            let kinds = [
                cfg.jwks_url.map(|u| SourceKind::Url(u.to_string())),
                cfg.oidc_issuer.map(|u| SourceKind::Issuer(u.to_string())),
            ];
            for kind in kinds.into_iter().flatten() {
                let label = format!("{}{}", cfg.label, kind.kind());
                sources.push(Source {
                    ok: remote.fetches.with_label_values(&[label.as_str(), "ok"]),
                    error: remote.fetches.with_label_values(&[label.as_str(), "error"]),
                    keys: remote.held.with_label_values(&[label.as_str()]),
                    label,
                    kind,
                });
            }
            client = Some(remote.client);
        }
        let n = sources.len();
        let keys = Self {
            inner: Arc::new(Inner {
                clock,
                file,
                sources,
                template: cfg.template.map(IssuerPattern::parse),
                client,
                timeout: Duration::from_millis(config.jwks_fetch_timeout_ms),
                cooldown_ms: config.jwks_refetch_cooldown_secs as i64 * 1000,
                set: ArcSwap::from_pointee(KeySet::default()),
                generation: AtomicU64::new(0),
                state: Mutex::new(State {
                    held: vec![Vec::new(); n],
                    due_ms: vec![Millis::MIN; n],
                    failed: vec![None; n],
                    last_kid_fetch_ms: None,
                    flight: None,
                }),
            }),
        };
        keys.publish(&keys.lock());
        Ok(keys)
    }

    /// The keys held now.
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<KeySet>> {
        self.inner.set.load()
    }

    /// Changes when a key is removed or replaced.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// Whether keys come from the network.
    pub fn has_remote(&self) -> bool {
        !self.inner.sources.is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the snapshot with the file's keys and every source's last good keys (a later
    /// source's key wins a shared id). Called with the state locked, so publications are ordered.
    fn publish(&self, st: &State) {
        let mut keys = HashMap::new();
        for (kid, h) in self.inner.file.iter().chain(st.held.iter().flatten()) {
            keys.insert(kid.clone(), h.clone());
        }
        let old = self.inner.set.load();
        let dropped = old.keys.iter().any(|(kid, h)| keys.get(kid).is_none_or(|n: &Held| n.text != h.text));
        self.inner.set.store(Arc::new(KeySet { keys }));
        if dropped {
            self.inner.generation.fetch_add(1, Ordering::Release);
        }
    }

    /// Starts a fetch of `which` sources; the caller holds the state lock and saw no flight.
    fn start_flight(&self, st: &mut State, which: Vec<usize>) -> Flight {
        let (tx, rx) = watch::channel(false);
        let flight = Flight { done: rx, covers_all: which.len() == self.inner.sources.len() };
        st.flight = Some(flight.clone());
        let this = self.clone();
        // A task of its own: a request that stops waiting (its client left, its bound passed)
        // does not cancel the fetch the others wait on.
        tokio::spawn(async move {
            let clear = ClearFlight(this.clone());
            this.fetch(which).await;
            drop(clear);
            let _ = tx.send(true);
        });
        flight
    }

    /// Fetches the due sources now, or waits for the fetch in flight. Returns how many sources'
    /// last fetch failed (the start-up fetch logs them loudly).
    pub async fn refresh_due(&self) -> usize {
        let flight = {
            let mut st = self.lock();
            match st.flight.clone() {
                Some(f) => Some(f),
                None => self.start_due(&mut st),
            }
        };
        if let Some(f) = flight {
            f.wait().await;
        }
        self.lock().failed.iter().filter(|f| f.is_some()).count()
    }

    /// Starts a fetch of the due sources unless one is in flight; returns at once (the
    /// housekeeping timer calls it).
    pub fn start_due_refresh(&self) {
        let mut st = self.lock();
        if st.flight.is_none() {
            self.start_due(&mut st);
        }
    }

    fn start_due(&self, st: &mut State) -> Option<Flight> {
        let now = self.inner.clock.now_ms();
        let due: Vec<usize> = (0..self.inner.sources.len()).filter(|&i| st.due_ms[i] <= now).collect();
        (!due.is_empty()).then(|| self.start_flight(st, due))
    }

    /// For a token naming `kid` (or no kid) that no key held matches: fetches every remote source
    /// again, unless such a fetch began within the cooldown, waiting at most the fetch timeout.
    /// `Ok` when the key is held afterwards.
    pub async fn fetch_for(&self, kid: Option<&str>) -> Result<(), Miss> {
        if !self.has_remote() {
            return Err(Miss::NoRemote);
        }
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        loop {
            let flight = {
                let mut st = self.lock();
                if self.snapshot().holds(kid) {
                    return Ok(());
                }
                match st.flight.clone() {
                    Some(f) => f,
                    None => {
                        let now = self.inner.clock.now_ms();
                        if st.last_kid_fetch_ms.is_some_and(|t| now - t < self.inner.cooldown_ms) {
                            return Err(self.miss(&st));
                        }
                        st.last_kid_fetch_ms = Some(now);
                        let all = (0..self.inner.sources.len()).collect();
                        self.start_flight(&mut st, all)
                    }
                }
            };
            let covers_all = flight.covers_all;
            if tokio::time::timeout_at(deadline, flight.wait()).await.is_err() {
                return Err(Miss::TimedOut);
            }
            if self.snapshot().holds(kid) {
                return Ok(());
            }
            if covers_all {
                return Err(self.miss(&self.lock()));
            }
            // That was a scheduled fetch of some sources only: claim one of every source.
        }
    }

    fn miss(&self, st: &State) -> Miss {
        if st.failed.contains(&Some(Failure::TimedOut)) {
            Miss::TimedOut
        } else if st.failed.contains(&Some(Failure::Error)) {
            Miss::FetchFailed
        } else {
            Miss::Absent
        }
    }

    /// Fetches `which` sources side by side and records each outcome.
    async fn fetch(&self, which: Vec<usize>) {
        let results = futures_util::future::join_all(which.iter().map(|&i| self.fetch_source(i))).await;
        let now = self.inner.clock.now_ms();
        let mut st = self.lock();
        for (i, result) in which.into_iter().zip(results) {
            let source = &self.inner.sources[i];
            match result {
                Ok((keys, skipped, refresh_secs)) => {
                    source.ok.inc();
                    source.keys.set(keys.len() as i64);
                    tracing::info!(
                        source = %source.label,
                        url = source.kind.url(),
                        keys = keys.len(),
                        skipped,
                        refresh_secs,
                        "Fetched the identity provider's keys."
                    );
                    st.held[i] = keys;
                    st.due_ms[i] = now + refresh_secs as i64 * 1000;
                    st.failed[i] = None;
                }
                Err((failure, error)) => {
                    source.error.inc();
                    tracing::warn!(
                        source = %source.label,
                        url = source.kind.url(),
                        error = %error,
                        held = st.held[i].len(),
                        "Fetching the identity provider's keys failed; the keys held keep serving."
                    );
                    st.due_ms[i] = now + self.inner.cooldown_ms;
                    st.failed[i] = Some(failure);
                }
            }
        }
        self.publish(&st);
    }

    /// One source's keys, how many were skipped, and when to fetch them again (seconds).
    async fn fetch_source(&self, i: usize) -> Result<(Vec<(String, Held)>, usize, u64), (Failure, String)> {
        let client = self.inner.client.as_ref().ok_or((Failure::Error, "no outbound client".to_string()))?;
        let work = async {
            let jwks_url = match &self.inner.sources[i].kind {
                SourceKind::Url(url) => url.clone(),
                SourceKind::Issuer(issuer) => {
                    let url = format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'));
                    let (_, body) = get(client, &url).await?;
                    let doc: Discovery = serde_json::from_slice(&body)
                        .map_err(|e| format!("the discovery document at {url} is not valid: {e}"))?;
                    let template = self.inner.template.as_ref();
                    let named = doc.issuer == *issuer
                        || template.is_some_and(|t| {
                            t.matches(&doc.issuer).is_some() || *t == IssuerPattern::parse(&doc.issuer)
                        });
                    if !named {
                        return Err(format!(
                            "the discovery document names the issuer `{}`, not `{issuer}`",
                            doc.issuer
                        ));
                    }
                    client
                        .policy()
                        .check_url(&doc.jwks_uri)
                        .map_err(|why| format!("its jwks_uri `{}` cannot be fetched: {why}", doc.jwks_uri))?;
                    doc.jwks_uri
                }
            };
            let (headers, body) = get(client, &jwks_url).await?;
            let (keys, skipped) = parse_remote(&body).map_err(|e| format!("{jwks_url}: {e}"))?;
            let cache_control = headers.get(header::CACHE_CONTROL).and_then(|v| v.to_str().ok());
            Ok((keys, skipped, refresh_after_secs(cache_control)))
        };
        match tokio::time::timeout(self.inner.timeout, work).await {
            Ok(result) => result.map_err(|e| (Failure::Error, e)),
            Err(_) => {
                Err((Failure::TimedOut, format!("no answer within {} ms", self.inner.timeout.as_millis())))
            }
        }
    }
}

/// A GET through the outbound client: the headers and body of a 200, or why not.
async fn get(client: &OutboundClient, url: &str) -> Result<(http::HeaderMap, Bytes), String> {
    let req = Request::get(url)
        .header(header::ACCEPT, "application/json")
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("{url}: {e}"))?;
    let (status, headers, body) =
        client.send_keeping_headers(req).await.map_err(|e| format!("{url}: {e}"))?;
    if status != StatusCode::OK {
        return Err(format!("{url} answered {status}"));
    }
    Ok((headers, body))
}

/// Clears the flight when the fetch task ends, even by a panic, so fetches never stop.
struct ClearFlight(Keys);

impl Drop for ClearFlight {
    fn drop(&mut self) {
        self.0.lock().flight = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refresh_follows_max_age_within_bounds() {
        assert_eq!(refresh_after_secs(None), DEFAULT_REFRESH_SECS);
        assert_eq!(refresh_after_secs(Some("public, max-age=7200")), 7200);
        assert_eq!(refresh_after_secs(Some("Max-Age = 600, must-revalidate")), 600);
        assert_eq!(refresh_after_secs(Some("max-age=10")), MIN_REFRESH_SECS);
        assert_eq!(refresh_after_secs(Some("max-age=9999999")), MAX_REFRESH_SECS);
        assert_eq!(refresh_after_secs(Some("no-store")), MIN_REFRESH_SECS);
        assert_eq!(refresh_after_secs(Some("public")), DEFAULT_REFRESH_SECS);
        assert_eq!(refresh_after_secs(Some("max-age=abc")), DEFAULT_REFRESH_SECS);
    }

    #[test]
    fn remote_sets_skip_keys_they_cannot_use() {
        let body = br#"{"keys":[
            {"kty":"oct","k":"c2VjcmV0","kid":"sym"},
            {"kty":"EC","crv":"P-256","kid":"enc","use":"enc",
             "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty":"EC","crv":"P-256","kid":"sig",
             "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}
        ]}"#;
        let (keys, skipped) = parse_remote(body).unwrap();
        let kids: Vec<&str> = keys.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(kids, ["sig"], "symmetric and encryption keys are left out");
        assert_eq!(skipped, 0);
        let (keys, skipped) =
            parse_remote(br#"{"keys":[{"kty":"RSA","kid":"bad","n":"!","e":"AQAB"},{"kty":"XYZ"}]}"#)
                .unwrap();
        assert!(keys.is_empty());
        assert_eq!(skipped, 1, "the broken RSA key is skipped, the unknown key type left out");
        assert!(parse_remote(b"{}").is_err());
    }
}
