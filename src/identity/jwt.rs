//! JWT verification for bot authors, with the `jsonwebtoken` crate.
//!
//! Several issuers may be accepted (`identity.issuer`, then `[[identity.issuers]]`), each with its
//! own audience, algorithms and [`Keys`]: the token's `iss` is read unverified only to choose one,
//! and the full check then uses that issuer's settings alone, so no issuer's key can vouch for
//! another's tokens. A `{tid}` issuer also requires the `tid` claim to equal its segment of `iss`.
//!
//! Accepted algorithms are configured explicitly; the key is chosen by the algorithm's family
//! (HS256: the development issuer's secret; RS256/ES256: the keys of [`Keys`], from the JWKS
//! file, URL or OpenID provider), so a token cannot pick its own key type (no algorithm
//! confusion), and `alg: none` does not parse. A token naming a key id that is not held is
//! [`JwtError::UnknownKey`]; [`Verifier::verify_fetching`] then fetches the remote keys again
//! (bounded, see [`super::jwks`]). `exp` and `nbf` are
//! checked against the server's [`Clock`](crate::clock::Clock) with a small leeway, so tests move
//! time instead of waiting. A verified token is cached until it expires, in a map keyed by the
//! token's text (hashed by the map with SipHash, then compared in full, so no collision can
//! reach another token's identity): repeat requests do one map lookup instead of a signature
//! check. A SHA-256 of the token as the key cost more than the rest of an authoring request's
//! checks together on this machine's CPUs, which lack the SHA extensions. An entry remembers the
//! key generation it was verified under: once a key is removed or replaced, every token is
//! checked again, so a removed key's tokens stop working at the refresh that drops it.

use std::sync::Arc;

use dashmap::DashMap;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::Identity;
use super::issuer::{IssuerMatch, IssuerPattern};
use super::jwks::Keys;
use crate::clock::SharedClock;
use crate::config::IdentityConfig;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// The signature, algorithm, issuer, audience, shape or `nbf` is wrong.
    #[error("{0}")]
    Invalid(&'static str),
    /// `exp` has passed.
    #[error("the token has expired")]
    Expired,
    /// An RS256/ES256 token names a key id (`kid`, or none while no single key is held) that no
    /// key held has; the remote sources may have it.
    #[error("no key matches the token")]
    UnknownKey(Option<String>),
}

#[derive(Deserialize)]
struct RawClaims {
    tid: Option<String>,
    oid: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    roles: Vec<String>,
    /// Where claims that did not fit live (`{"groups": "src1"}` for a groups overage).
    #[serde(default, rename = "_claim_names")]
    claim_names: Option<serde_json::Map<String, serde_json::Value>>,
    /// Set instead of `groups` when a user is in too many groups (implicit-flow tokens).
    #[serde(default)]
    hasgroups: Option<bool>,
    exp: i64,
    #[serde(default)]
    nbf: Option<i64>,
}

/// One accepted issuer: the `iss` it matches, its audience, algorithms and keys.
struct Accepted {
    pattern: IssuerPattern,
    audience: String,
    algorithms: Vec<Algorithm>,
    /// The development issuer's key: the top-level issuer only.
    hs_key: Option<DecodingKey>,
    keys: Keys,
}

/// The unverified payload fields read to choose the issuer.
#[derive(Deserialize)]
struct Unverified {
    iss: Option<String>,
}

/// Verifies authors' tokens; shared (`Arc`) by the layer.
pub struct Verifier {
    /// The top-level issuer first (always there), then `identity.issuers` in order.
    issuers: Vec<Accepted>,
    leeway: i64,
    capacity: usize,
    /// Verified tokens, the issuer (index) they were verified for, and its key generation then.
    cache: DashMap<Box<str>, (Arc<Identity>, usize, u64)>,
    clock: SharedClock,
}

/// Why a verifier could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    /// The JWKS file could not be read or parsed.
    #[error("{key} {path}: {message}")]
    Jwks {
        /// Its configuration key (`identity.jwks_file`, `identity.issuers[0].jwks_file`).
        key: String,
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The key fetch metrics could not be registered (a programming error).
    #[error("cannot register the key metrics: {0}")]
    Metrics(prometheus::Error),
}

fn algorithms(names: &[String]) -> Vec<Algorithm> {
    names
        .iter()
        .filter_map(|a| match a.as_str() {
            "HS256" => Some(Algorithm::HS256),
            "RS256" => Some(Algorithm::RS256),
            "ES256" => Some(Algorithm::ES256),
            _ => None,
        })
        .collect()
}

impl Verifier {
    /// A verifier for `config` with the keys of the JWKS files only (the remote sources need
    /// [`with_keys`](Self::with_keys)); `dev_key` is the development issuer's HS256 secret.
    pub fn new(
        config: &IdentityConfig,
        dev_key: Option<&[u8]>,
        clock: SharedClock,
    ) -> Result<Self, VerifierError> {
        let top = Keys::new(config, clock.clone(), None)?;
        let issuers = (0..config.issuers.len())
            .map(|i| Keys::for_issuer(config, i, clock.clone(), None))
            .collect::<Result<_, _>>()?;
        Ok(Self::with_keys(config, dev_key, clock, top, issuers))
    }

    /// A verifier for `config` checking the top-level issuer's RS256/ES256 tokens with `top`,
    /// and those of `identity.issuers[i]` with `issuers[i]` (an entry without keys is left out).
    pub fn with_keys(
        config: &IdentityConfig,
        dev_key: Option<&[u8]>,
        clock: SharedClock,
        top: Keys,
        issuers: Vec<Keys>,
    ) -> Self {
        let algs = algorithms(&config.algorithms);
        let mut accepted = vec![Accepted {
            pattern: IssuerPattern::Exact(config.issuer.clone()),
            audience: config.audience.clone(),
            hs_key: dev_key.filter(|_| algs.contains(&Algorithm::HS256)).map(DecodingKey::from_secret),
            algorithms: algs,
            keys: top,
        }];
        for (entry, k) in config.issuers.iter().zip(issuers) {
            accepted.push(Accepted {
                pattern: IssuerPattern::parse(&entry.issuer),
                audience: entry.audience.clone(),
                // Validation refuses HS256 here; filtered again so no entry can reach the dev key.
                algorithms: algorithms(&entry.algorithms)
                    .into_iter()
                    .filter(|a| *a != Algorithm::HS256)
                    .collect(),
                hs_key: None,
                keys: k,
            });
        }
        Self {
            issuers: accepted,
            leeway: config.leeway_secs as i64,
            capacity: config.cache_capacity,
            cache: DashMap::new(),
            clock,
        }
    }

    /// The top-level issuer's RS256/ES256 keys and their sources.
    pub fn keys(&self) -> &Keys {
        &self.issuers[0].keys
    }

    /// Every issuer's RS256/ES256 keys and their sources, the top-level issuer's first.
    pub fn key_sets(&self) -> impl Iterator<Item = &Keys> {
        self.issuers.iter().map(|a| &a.keys)
    }

    /// Whether any issuer's keys come from the network.
    pub fn has_remote_keys(&self) -> bool {
        self.key_sets().any(Keys::has_remote)
    }

    /// The issuer a token's `iss` names (read without verification), with the tenant segment
    /// of a `{tid}` issuer. A token without a readable `iss` goes to the top-level issuer, whose
    /// full check then says what is wrong.
    fn select(&self, token: &str) -> Result<(usize, Option<String>), JwtError> {
        use base64::Engine;
        let payload = token
            .split('.')
            .nth(1)
            .and_then(|p| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p).ok())
            .and_then(|b| serde_json::from_slice::<Unverified>(&b).ok());
        let Some(iss) = payload.and_then(|p| p.iss) else { return Ok((0, None)) };
        // An exact issuer wins over a template of the same shape.
        let exact = self.issuers.iter().position(|a| a.pattern.matches(&iss) == Some(IssuerMatch::Exact));
        if let Some(i) = exact {
            return Ok((i, None));
        }
        for (i, a) in self.issuers.iter().enumerate() {
            if let Some(IssuerMatch::Tenant(segment)) = a.pattern.matches(&iss) {
                return Ok((i, Some(segment.to_string())));
            }
        }
        Err(JwtError::Invalid("the token's issuer is not accepted"))
    }

    /// [`verify`](Self::verify), and for a token naming a key id not held, one bounded fetch of
    /// its issuer's remote keys (see [`Keys::fetch_for`]) before a second try: never longer than
    /// `identity.jwks_fetch_timeout_ms`, and a token whose key stays unknown is
    /// [`JwtError::Invalid`] saying why.
    pub async fn verify_fetching(&self, token: &str) -> Result<Arc<Identity>, JwtError> {
        match self.verify(token) {
            Err(JwtError::UnknownKey(kid)) => {
                let (i, _) = self.select(token)?;
                match self.issuers[i].keys.fetch_for(kid.as_deref()).await {
                    Ok(()) => self.verify(token).map_err(|e| match e {
                        JwtError::UnknownKey(_) => JwtError::Invalid(super::jwks::Miss::Absent.explain()),
                        e => e,
                    }),
                    Err(miss) => Err(JwtError::Invalid(miss.explain())),
                }
            }
            r => r,
        }
    }

    /// Verifies a token: from the cache when seen before (expiry still checked), else by
    /// signature and claims.
    pub fn verify(&self, token: &str) -> Result<Arc<Identity>, JwtError> {
        let now = self.clock.now_secs();
        if let Some(entry) = self.cache.get(token) {
            let (id, issuer, verified_under) = &*entry;
            if id.exp + self.leeway <= now {
                drop(entry);
                self.cache.remove(token);
                return Err(JwtError::Expired);
            }
            if *verified_under == self.issuers[*issuer].keys.generation() {
                return Ok(id.clone());
            }
            // A key was removed or replaced since: check the signature again.
        }
        let (identity, issuer, generation) = self.check(token, now)?;
        let identity = Arc::new(identity);
        if self.cache.len() >= self.capacity {
            // Bounded: dropping every entry costs one signature check per active author, and
            // keeps the map from growing with tokens that are never seen again.
            self.cache.clear();
        }
        self.cache.insert(token.into(), (identity.clone(), issuer, generation));
        Ok(identity)
    }

    /// Verifies a token's signature and claims, without the cache.
    pub fn verify_uncached(&self, token: &str, now: i64) -> Result<Identity, JwtError> {
        self.check(token, now).map(|(identity, _, _)| identity)
    }

    /// The identity, the issuer (index) it was verified for and that issuer's key generation
    /// read before its keys were.
    fn check(&self, token: &str, now: i64) -> Result<(Identity, usize, u64), JwtError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| JwtError::Invalid("the token is not a JWT"))?;
        let (index, tenant_in_iss) = self.select(token)?;
        let issuer = &self.issuers[index];
        if !issuer.algorithms.contains(&header.alg) {
            return Err(JwtError::Invalid("the token's algorithm is not accepted"));
        }
        let generation = issuer.keys.generation();
        let keys = issuer.keys.snapshot();
        let key = match header.alg {
            Algorithm::HS256 => {
                issuer.hs_key.as_ref().ok_or(JwtError::Invalid("no key matches the token"))?
            }
            _ => match &header.kid {
                Some(kid) => keys.get(kid),
                None => keys.single(),
            }
            .ok_or_else(|| {
                if issuer.keys.has_remote() {
                    JwtError::UnknownKey(header.kid.clone())
                } else {
                    JwtError::Invalid("no key matches the token")
                }
            })?,
        };
        let mut v = Validation::new(header.alg);
        v.validate_exp = false;
        v.validate_nbf = false;
        match &issuer.pattern {
            IssuerPattern::Exact(iss) => v.set_issuer(&[iss]),
            // `select` matched the token's `iss` to the template; the check holds it to that.
            IssuerPattern::Tenant { prefix, suffix } => {
                let segment = tenant_in_iss.as_deref().unwrap_or_default();
                v.set_issuer(&[format!("{prefix}{segment}{suffix}")])
            }
        }
        v.set_audience(&[&issuer.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<RawClaims>(token, key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind::*;
            JwtError::Invalid(match e.kind() {
                InvalidIssuer => "the token's issuer is not accepted",
                InvalidAudience => "the token's audience is not accepted",
                InvalidSignature => "the token's signature is not valid",
                _ => "the token is not valid",
            })
        })?;
        let c = data.claims;
        if c.exp + self.leeway <= now {
            return Err(JwtError::Expired);
        }
        if c.nbf.is_some_and(|nbf| nbf - self.leeway > now) {
            return Err(JwtError::Invalid("the token is not valid yet (nbf)"));
        }
        if let Some(segment) = &tenant_in_iss
            && c.tid.as_deref() != Some(segment.as_str())
        {
            return Err(JwtError::Invalid("the token's tid claim is not the tenant its issuer names"));
        }
        let (Some(tenant), Some(user)) = (c.tid.filter(|t| !t.is_empty()), c.oid.filter(|o| !o.is_empty()))
        else {
            return Err(JwtError::Invalid("the token lacks the tid or oid claim"));
        };
        let groups_overage =
            c.hasgroups == Some(true) || c.claim_names.as_ref().is_some_and(|m| m.contains_key("groups"));
        let identity = Identity {
            tenant,
            user,
            name: c.name,
            groups: c.groups,
            roles: c.roles,
            exp: c.exp,
            groups_overage,
        };
        Ok((identity, index, generation))
    }
}
