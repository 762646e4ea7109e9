//! The read-mostly licensing snapshot: per tenant, what it bought and who holds what.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use chrono::NaiveDate;
use serde::Serialize;

use crate::clock::Millis;
use crate::config::SubscriptionKind;
use crate::store::control::{ControlData, SubscriptionRecord, TenantRecord, TrialRecord};

/// One tenant's licensing state.
#[derive(Debug, Clone)]
pub struct TenantView {
    /// The tenant and its settings.
    pub record: TenantRecord,
    /// Purchases.
    pub subscriptions: Vec<SubscriptionRecord>,
    /// Users assigned a license directly.
    pub users: BTreeSet<String>,
    /// Groups assigned a license.
    pub groups: BTreeSet<String>,
    /// Seat holders: user → `direct` or `group:<id>`.
    pub seats: BTreeMap<String, String>,
    /// Trials by user.
    pub trials: HashMap<String, TrialRecord>,
    /// Webhook endpoints by id.
    pub endpoints: BTreeMap<String, crate::store::control::EndpointRecord>,
}

/// The whole snapshot, replaced as a unit (arc-swap) on every write; tenants are shared
/// between snapshots, so a write copies only the tenant it changes.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Tenants by id.
    pub tenants: HashMap<String, Arc<TenantView>>,
}

/// The UTC day of a timestamp.
pub fn day(ms: Millis) -> NaiveDate {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().date_naive()
}

/// Whether a subscription was cancelled (it then ends the day before it starts).
pub fn cancelled(s: &SubscriptionRecord) -> bool {
    s.end.is_some_and(|e| e < s.start)
}

/// The JSON of the tenant's subscriptions, each with its `state` on `today`.
pub fn subscriptions_json(t: &TenantView, today: NaiveDate) -> Vec<serde_json::Value> {
    t.subscriptions
        .iter()
        .map(|s| {
            let mut v = serde_json::to_value(s).unwrap_or_default();
            v["state"] = serde_json::Value::from(subscription_state(s, today));
            v
        })
        .collect()
}

/// A subscription's state on `today`: `scheduled`, `active`, `ended` or `cancelled`.
pub fn subscription_state(s: &SubscriptionRecord, today: NaiveDate) -> &'static str {
    if cancelled(s) {
        "cancelled"
    } else if s.start > today {
        "scheduled"
    } else if s.end.is_some_and(|e| e < today) {
        "ended"
    } else {
        "active"
    }
}

impl TenantView {
    /// An empty tenant.
    pub fn new(record: TenantRecord) -> Self {
        Self {
            record,
            subscriptions: Vec::new(),
            users: BTreeSet::new(),
            groups: BTreeSet::new(),
            seats: BTreeMap::new(),
            trials: HashMap::new(),
            endpoints: BTreeMap::new(),
        }
    }

    /// Units of `kind` active on the day of `now`.
    pub fn active(&self, kind: SubscriptionKind, now: Millis) -> u64 {
        let d = day(now);
        self.subscriptions
            .iter()
            .filter(|s| s.kind == kind && !cancelled(s) && s.start <= d && s.end.is_none_or(|e| e >= d))
            .map(|s| u64::from(s.quantity))
            .sum()
    }

    /// Whether a tenant license is active now.
    pub fn licensed(&self, now: Millis) -> bool {
        self.active(SubscriptionKind::TenantLicense, now) > 0
    }

    /// User-license seats bought (active now).
    pub fn seats_bought(&self, now: Millis) -> u64 {
        self.active(SubscriptionKind::UserLicenses, now)
    }
}

impl Snapshot {
    /// Builds the snapshot from the store's control data.
    pub fn from_data(d: &ControlData) -> Self {
        let mut tenants: HashMap<String, TenantView> =
            d.tenants.iter().map(|t| (t.id.clone(), TenantView::new(t.clone()))).collect();
        for s in &d.subscriptions {
            if let Some(t) = tenants.get_mut(&s.tenant) {
                t.subscriptions.push(s.clone());
            }
        }
        for (tenant, kind, id) in &d.assignments {
            if let Some(t) = tenants.get_mut(tenant) {
                match kind {
                    crate::store::control::Principal::User => t.users.insert(id.clone()),
                    crate::store::control::Principal::Group => t.groups.insert(id.clone()),
                };
            }
        }
        for s in &d.seats {
            if let Some(t) = tenants.get_mut(&s.tenant) {
                t.seats.insert(s.user.clone(), s.via.clone());
            }
        }
        for tr in &d.trials {
            if let Some(t) = tenants.get_mut(&tr.tenant) {
                t.trials.insert(tr.user.clone(), tr.clone());
            }
        }
        for e in &d.endpoints {
            if let Some(t) = tenants.get_mut(&e.tenant) {
                t.endpoints.insert(e.id.clone(), e.clone());
            }
        }
        Self { tenants: tenants.into_iter().map(|(k, v)| (k, Arc::new(v))).collect() }
    }
}

/// How an author is licensed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "via", rename_all = "snake_case")]
pub enum Grant {
    /// A user license assigned to the user.
    Direct,
    /// A user license assigned to a group the user is a first-level member of.
    Group {
        /// The group.
        group: String,
    },
    /// A trial.
    Trial {
        /// Its expiry (RFC 3339).
        until: String,
    },
}

/// Why an author is not licensed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Denial {
    /// The tenant holds no active tenant license.
    NoTenantLicense,
    /// The user holds no user license (directly or through a group) and no trial.
    NoUserLicense,
    /// The user's trial expired.
    TrialExpired,
    /// The user is licensed through a group but every seat is taken.
    NoSeatsLeft,
    /// The token's groups did not fit (groups overage), the user holds no direct license, and
    /// the tenant licenses groups: the group licenses cannot be checked.
    GroupsOverage,
}
