//! Bot authors' identity: JWT verification with a verified-token cache, the accepted issuers
//! (exact or `{tid}` templates), the signing keys and their sources (file, JWKS URL, OpenID
//! discovery), and the development issuer of the embedded default.

pub mod dev_issuer;
pub mod issuer;
pub mod jwks;
pub mod jwt;

use serde::{Deserialize, Serialize};

/// The role claim that makes a user a tenant admin.
pub const ADMIN_ROLE: &str = "TenantAdmin";

/// Who a verified token says the caller is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The tenant (`tid`).
    pub tenant: String,
    /// The user (`oid`).
    pub user: String,
    /// Display name (`name`), if given.
    pub name: Option<String>,
    /// Group ids (`groups`).
    pub groups: Vec<String>,
    /// Roles (`roles`).
    pub roles: Vec<String>,
    /// Expiry, seconds since the epoch.
    pub exp: i64,
    /// The user's groups did not fit in the token (`_claim_names.groups` or `hasgroups`): they
    /// are unknown, not empty.
    #[serde(default)]
    pub groups_overage: bool,
}

impl Identity {
    /// Whether the token carries the `TenantAdmin` role.
    pub fn is_admin(&self) -> bool {
        self.roles.iter().any(|r| r == ADMIN_ROLE)
    }
}

/// The credential of an `Authorization: Bearer <value>` header (either case of `Bearer`,
/// surrounding spaces trimmed), or `None` for another or an empty value.
pub fn bearer_value(value: &http::HeaderValue) -> Option<&str> {
    let v = value.to_str().ok()?;
    v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).map(str::trim).filter(|t| !t.is_empty())
}
