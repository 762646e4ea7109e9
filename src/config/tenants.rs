//! `[[tenants]]`: organizations, what they bought, and who holds their user licenses.

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use super::{Invalid, invalid, validate_id};

/// What happens to a message that would begin a billed session when the month's pool is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CapacityPolicy {
    /// Refuse it with 429 `CapacityExhausted` (open sessions continue).
    #[default]
    Reject,
    /// Serve it and count it as overage.
    AllowOverage,
}

/// The kinds of subscription a tenant buys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionKind {
    /// The tenant license: 2,000 billed sessions a month each (pooled).
    TenantLicense,
    /// A capacity add-on: +1,000 billed sessions a month each.
    CapacityAddon,
    /// Per-user license seats.
    UserLicenses,
}

/// One purchase.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionConfig {
    /// What was bought.
    pub kind: SubscriptionKind,
    /// How many units. Default 1.
    #[serde(default = "one")]
    pub quantity: u32,
    /// First day it is active (UTC), `YYYY-MM-DD`. Default 2000-01-01.
    #[serde(default = "default_start")]
    pub start: NaiveDate,
    /// Last day it is active (UTC), inclusive; absent means no end.
    #[serde(default)]
    pub end: Option<NaiveDate>,
}

fn one() -> u32 {
    1
}
fn default_start() -> NaiveDate {
    NaiveDate::from_ymd_opt(2000, 1, 1).unwrap_or_default()
}
fn default_true() -> bool {
    true
}

/// `[[tenants]]`: one organization.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// The tenant id, as in the `tid` claim of author tokens. Required.
    pub id: String,
    /// A display name. Default: the id.
    #[serde(default)]
    pub name: String,
    /// Whether users without a license may start a trial. Default true.
    #[serde(default = "default_true")]
    pub allow_ad_hoc_subscriptions: bool,
    /// `reject` (default) or `allow_overage` when the month's capacity is used up.
    #[serde(default)]
    pub capacity_policy: CapacityPolicy,
    /// What the tenant bought. Default none.
    #[serde(default)]
    pub subscriptions: Vec<SubscriptionConfig>,
    /// User ids (`oid` claims) assigned a user license directly. Default none.
    #[serde(default)]
    pub licensed_users: Vec<String>,
    /// Group ids (in the `groups` claim) assigned a user license; first-level members are
    /// licensed. Default none.
    #[serde(default)]
    pub licensed_groups: Vec<String>,
    /// Percentages of the month's capacity at which `capacity.threshold` webhooks fire.
    /// Default: `notifications.capacity_thresholds`.
    #[serde(default)]
    pub capacity_alerts: Option<Vec<u8>>,
}

impl TenantConfig {
    pub(super) fn validate(&self, key: &str) -> Result<(), Invalid> {
        validate_id(&format!("{key}.id"), &self.id)?;
        if let Some(t) = &self.capacity_alerts {
            super::notifications::check_thresholds(&format!("{key}.capacity_alerts"), t)?;
        }
        for (i, s) in self.subscriptions.iter().enumerate() {
            if s.quantity == 0 {
                return Err(invalid(format!("{key}.subscriptions[{i}].quantity"), "must be at least 1"));
            }
            if s.end.is_some_and(|end| end < s.start) {
                return Err(invalid(format!("{key}.subscriptions[{i}].end"), "is before `start`"));
            }
        }
        for (i, u) in self.licensed_users.iter().enumerate() {
            if u.is_empty() {
                return Err(invalid(format!("{key}.licensed_users[{i}]"), "must not be empty"));
            }
        }
        // Each user assigned directly takes a seat: a file cannot assign more than it bought.
        let users: std::collections::HashSet<&str> = self.licensed_users.iter().map(String::as_str).collect();
        let seats: u64 = self
            .subscriptions
            .iter()
            .filter(|s| s.kind == SubscriptionKind::UserLicenses)
            .map(|s| u64::from(s.quantity))
            .sum();
        if users.len() as u64 > seats {
            return Err(invalid(
                format!("{key}.licensed_users"),
                format!(
                    "assigns {} users but the tenant bought {seats} user license seats; buy more \
                     (`kind = \"user_licenses\"`) or assign fewer",
                    users.len()
                ),
            ));
        }
        for (i, g) in self.licensed_groups.iter().enumerate() {
            if g.is_empty() {
                return Err(invalid(format!("{key}.licensed_groups[{i}]"), "must not be empty"));
            }
        }
        Ok(())
    }
}
