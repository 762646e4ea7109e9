//! The development issuer of the embedded default: an HS256 key created in the data folder at
//! first start, and `botgate token` to print tokens signed with it.

use std::path::{Path, PathBuf};

use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;

use crate::channel::token::load_or_create_key;

/// The key's name in the store (the file `dev-issuer.key` in the data folder with SQLite).
pub const KEY_NAME: &str = "dev-issuer";

/// The key file's name in the data folder.
pub const KEY_FILE: &str = "dev-issuer.key";

/// The key file of a data folder.
pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join(KEY_FILE)
}

/// Loads the development key, creating it (and the folder) if missing.
pub fn load_or_create(data_dir: &Path) -> std::io::Result<Vec<u8>> {
    std::fs::create_dir_all(data_dir)?;
    load_or_create_key(&key_path(data_dir))
}

/// What goes into a development token.
#[derive(Debug, Clone, Default)]
pub struct TokenRequest {
    /// `tid`.
    pub tenant: String,
    /// `oid`.
    pub user: String,
    /// `name`.
    pub name: Option<String>,
    /// `groups`.
    pub groups: Vec<String>,
    /// Adds the `TenantAdmin` role.
    pub admin: bool,
    /// Adds the `PlatformOperator` role (accepted where `operator.jwt_role` is on).
    pub operator: bool,
    /// Lifetime in seconds.
    pub ttl_secs: i64,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    tid: &'a str,
    oid: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    groups: &'a [String],
    roles: Vec<&'a str>,
    iat: i64,
    nbf: i64,
    exp: i64,
}

/// Signs a development token (HS256) issued at `now_secs`.
pub fn sign(key: &[u8], issuer: &str, audience: &str, req: &TokenRequest, now_secs: i64) -> String {
    let claims = Claims {
        iss: issuer,
        aud: audience,
        tid: &req.tenant,
        oid: &req.user,
        name: req.name.as_deref(),
        groups: &req.groups,
        roles: [(req.admin, super::ADMIN_ROLE), (req.operator, crate::licensing::operator::OPERATOR_ROLE)]
            .into_iter()
            .filter_map(|(on, role)| on.then_some(role))
            .collect(),
        iat: now_secs,
        nbf: now_secs,
        exp: now_secs + req.ttl_secs,
    };
    // HS256 signing of a serializable struct cannot fail.
    jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(key)).unwrap_or_default()
}

/// Parses a lifetime such as `90s`, `30m`, `1h`, `2d` (a bare number is seconds).
pub fn parse_ttl(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num.parse().map_err(|_| format!("`{s}` is not a duration such as 90s, 30m, 1h or 2d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{s}`: the unit must be s, m, h or d")),
    };
    if n <= 0 {
        return Err("the lifetime must be positive".into());
    }
    Ok(n * mult)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::config::IdentityConfig;
    use crate::identity::jwt::{JwtError, Verifier};

    fn req() -> TokenRequest {
        TokenRequest {
            tenant: "contoso".into(),
            user: "alice".into(),
            groups: vec!["g".into()],
            admin: true,
            ttl_secs: 3600,
            ..Default::default()
        }
    }

    #[test]
    fn ttl_parses() {
        assert_eq!(parse_ttl("1h"), Ok(3600));
        assert_eq!(parse_ttl("90"), Ok(90));
        assert_eq!(parse_ttl("2d"), Ok(172_800));
        assert!(parse_ttl("1y").is_err());
        assert!(parse_ttl("0s").is_err());
    }

    #[test]
    fn dev_tokens_verify_and_are_cached_until_they_expire() {
        let clock = ManualClock::at("2026-11-28T00:00:00Z");
        let cfg = IdentityConfig::default();
        let v = Verifier::new(&cfg, Some(b"key"), clock.clone()).unwrap();
        let now = clock.now_ms() / 1000;
        let t = sign(b"key", &cfg.issuer, &cfg.audience, &req(), now);
        let id = v.verify(&t).unwrap();
        assert_eq!((id.tenant.as_str(), id.user.as_str(), id.is_admin()), ("contoso", "alice", true));
        assert!(std::sync::Arc::ptr_eq(&id, &v.verify(&t).unwrap()), "the second call is a cache hit");
        clock.advance_secs(3600 + 30);
        assert_eq!(v.verify(&t).unwrap_err(), JwtError::Expired);
    }

    #[test]
    fn wrong_key_issuer_audience_and_not_yet_valid_are_refused() {
        let clock = ManualClock::at("2026-11-28T00:00:00Z");
        let cfg = IdentityConfig::default();
        let v = Verifier::new(&cfg, Some(b"key"), clock.clone()).unwrap();
        let now = clock.now_ms() / 1000;
        assert!(matches!(
            v.verify(&sign(b"other", &cfg.issuer, &cfg.audience, &req(), now)),
            Err(JwtError::Invalid(_))
        ));
        assert!(matches!(
            v.verify(&sign(b"key", "evil", &cfg.audience, &req(), now)),
            Err(JwtError::Invalid(_))
        ));
        assert!(matches!(
            v.verify(&sign(b"key", &cfg.issuer, "other", &req(), now)),
            Err(JwtError::Invalid(_))
        ));
        assert!(matches!(
            v.verify(&sign(b"key", &cfg.issuer, &cfg.audience, &req(), now + 600)),
            Err(JwtError::Invalid(_))
        ));
    }

    use crate::clock::Clock;
}
