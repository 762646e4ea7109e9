//! JWT verification for bot authors, with the `jsonwebtoken` crate.
//!
//! Accepted algorithms are configured explicitly; the key is chosen by the algorithm's family
//! (HS256: the development issuer's secret; RS256/ES256: the JWKS file), so a token cannot pick
//! its own key type (no algorithm confusion), and `alg: none` does not parse. `exp` and `nbf` are
//! checked against the server's [`Clock`](crate::clock::Clock) with a small leeway, so tests move
//! time instead of waiting. A verified token is cached until it expires, in a map keyed by the
//! token's text (hashed by the map with SipHash, then compared in full, so no collision can
//! reach another token's identity): repeat requests do one map lookup instead of a signature
//! check. A SHA-256 of the token as the key cost more than the rest of an authoring request's
//! checks together on this machine's CPUs, which lack the SHA extensions.

use std::collections::HashMap;
use std::sync::Arc;

use dashmap::DashMap;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::Identity;
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

/// Verifies authors' tokens; shared (`Arc`) by the layer.
pub struct Verifier {
    issuer: String,
    audience: String,
    algorithms: Vec<Algorithm>,
    hs_key: Option<DecodingKey>,
    jwks: HashMap<String, DecodingKey>,
    leeway: i64,
    capacity: usize,
    cache: DashMap<Box<str>, Arc<Identity>>,
    clock: SharedClock,
}

/// Why a verifier could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    /// The JWKS file could not be read or parsed.
    #[error("identity.jwks_file {path}: {message}")]
    Jwks {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

impl Verifier {
    /// A verifier for `config`; `dev_key` is the development issuer's HS256 secret.
    pub fn new(
        config: &IdentityConfig,
        dev_key: Option<&[u8]>,
        clock: SharedClock,
    ) -> Result<Self, VerifierError> {
        let algorithms: Vec<Algorithm> = config
            .algorithms
            .iter()
            .filter_map(|a| match a.as_str() {
                "HS256" => Some(Algorithm::HS256),
                "RS256" => Some(Algorithm::RS256),
                "ES256" => Some(Algorithm::ES256),
                _ => None,
            })
            .collect();
        let mut jwks = HashMap::new();
        if let Some(path) = &config.jwks_file {
            let err = |message: String| VerifierError::Jwks { path: path.display().to_string(), message };
            let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
            let set: JwkSet = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
            for (i, jwk) in set.keys.iter().enumerate() {
                let key = DecodingKey::from_jwk(jwk).map_err(|e| err(format!("key {i}: {e}")))?;
                let kid = jwk.common.key_id.clone().unwrap_or_default();
                jwks.insert(kid, key);
            }
        }
        Ok(Self {
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            hs_key: dev_key.filter(|_| algorithms.contains(&Algorithm::HS256)).map(DecodingKey::from_secret),
            algorithms,
            jwks,
            leeway: config.leeway_secs as i64,
            capacity: config.cache_capacity,
            cache: DashMap::new(),
            clock,
        })
    }

    /// Verifies a token: from the cache when seen before (expiry still checked), else by
    /// signature and claims.
    pub fn verify(&self, token: &str) -> Result<Arc<Identity>, JwtError> {
        let now = self.clock.now_secs();
        if let Some(id) = self.cache.get(token) {
            if id.exp + self.leeway <= now {
                drop(id);
                self.cache.remove(token);
                return Err(JwtError::Expired);
            }
            return Ok(id.clone());
        }
        let identity = Arc::new(self.verify_uncached(token, now)?);
        if self.cache.len() >= self.capacity {
            // Bounded: dropping every entry costs one signature check per active author, and
            // keeps the map from growing with tokens that are never seen again.
            self.cache.clear();
        }
        self.cache.insert(token.into(), identity.clone());
        Ok(identity)
    }

    /// Verifies a token's signature and claims, without the cache.
    pub fn verify_uncached(&self, token: &str, now: i64) -> Result<Identity, JwtError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| JwtError::Invalid("the token is not a JWT"))?;
        if !self.algorithms.contains(&header.alg) {
            return Err(JwtError::Invalid("the token's algorithm is not accepted"));
        }
        let key = match header.alg {
            Algorithm::HS256 => self.hs_key.as_ref(),
            _ => match &header.kid {
                Some(kid) => self.jwks.get(kid),
                None if self.jwks.len() == 1 => self.jwks.values().next(),
                None => None,
            },
        }
        .ok_or(JwtError::Invalid("no key matches the token"))?;
        let mut v = Validation::new(header.alg);
        v.validate_exp = false;
        v.validate_nbf = false;
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.audience]);
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
        let (Some(tenant), Some(user)) = (c.tid.filter(|t| !t.is_empty()), c.oid.filter(|o| !o.is_empty()))
        else {
            return Err(JwtError::Invalid("the token lacks the tid or oid claim"));
        };
        let groups_overage =
            c.hasgroups == Some(true) || c.claim_names.as_ref().is_some_and(|m| m.contains_key("groups"));
        Ok(Identity {
            tenant,
            user,
            name: c.name,
            groups: c.groups,
            roles: c.roles,
            exp: c.exp,
            groups_overage,
        })
    }
}
