//! The control-plane records the store keeps: tenants, subscriptions, license assignments,
//! seats, trials, bots, and the append-only audit log. Changes are applied as a list of
//! [`Mutation`]s together with their audit entry, in one transaction.

use serde::{Deserialize, Serialize};

/// A tenant and its settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    /// The tenant id (`tid`).
    pub id: String,
    /// Display name.
    pub name: String,
    /// Whether users may start trials.
    pub allow_ad_hoc_subscriptions: bool,
    /// `reject` or `allow_overage`.
    pub capacity_policy: crate::config::CapacityPolicy,
    /// Percentages of the month's capacity that raise `capacity.threshold`; `None`: the
    /// configured default.
    #[serde(default)]
    pub capacity_alerts: Option<Vec<u8>>,
}

/// A purchase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SubscriptionRecord {
    /// A unique id.
    pub id: String,
    /// The tenant.
    pub tenant: String,
    /// What was bought.
    pub kind: crate::config::SubscriptionKind,
    /// How many.
    pub quantity: u32,
    /// First active day (UTC).
    pub start: chrono::NaiveDate,
    /// Last active day (UTC), inclusive.
    pub end: Option<chrono::NaiveDate>,
}

/// Who a user license is assigned to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Principal {
    /// A user id (`oid`).
    User,
    /// A group id (in `groups`).
    Group,
}

/// A trial of one user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrialRecord {
    /// The tenant.
    pub tenant: String,
    /// The user.
    pub user: String,
    /// When it started (ms).
    pub started_ms: i64,
    /// When it expires (ms).
    pub expires_ms: i64,
    /// Whether it was extended (once only).
    pub extended: bool,
}

/// A seat taken by a user: directly, or as a member of a licensed group (`group:<id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeatRecord {
    /// The tenant.
    pub tenant: String,
    /// The user.
    pub user: String,
    /// `direct` or `group:<id>`.
    pub via: String,
}

/// A bot as the authoring API keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BotRecord {
    /// The bot id.
    pub id: String,
    /// The tenant.
    pub tenant: String,
    /// The whole bot definition as JSON (the authoring API's shape).
    pub json: String,
}

/// A tenant's webhook endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// Its id (`ep_` and random hex).
    pub id: String,
    /// The tenant.
    pub tenant: String,
    /// The `http://` URL events are posted to.
    pub url: String,
    /// What the admin wrote about it.
    #[serde(default)]
    pub description: String,
    /// The event types it receives; empty: every type.
    #[serde(default)]
    pub events: Vec<String>,
    /// The signing secret (`whsec_...`), shown once when made.
    pub secret: String,
    /// The secret it replaced, still signing beside it until `previous_until_ms`.
    #[serde(default)]
    pub previous_secret: Option<String>,
    /// When the previous secret stops signing (ms).
    #[serde(default)]
    pub previous_until_ms: i64,
    /// Whether events are delivered to it.
    pub enabled: bool,
    /// Why it was disabled, when delivery disabled it.
    #[serde(default)]
    pub disabled_reason: Option<String>,
    /// When it was made (ms).
    pub created_ms: i64,
}

/// One audit entry: who did what to what, when, and the state before and after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Sequence number (assigned by the store).
    pub seq: i64,
    /// The tenant.
    pub tenant: String,
    /// When (ms).
    pub at_ms: i64,
    /// Who (user id, or `config` for seeding).
    pub actor: String,
    /// What, e.g. `subscription.add`.
    pub action: String,
    /// The object, e.g. a user id.
    pub target: String,
    /// State before (JSON), if any.
    pub before: Option<String>,
    /// State after (JSON), if any.
    pub after: Option<String>,
}

/// One change to the control plane.
#[derive(Debug, Clone, PartialEq)]
pub enum Mutation {
    /// Insert or replace a tenant.
    PutTenant(TenantRecord),
    /// Insert a subscription.
    PutSubscription(SubscriptionRecord),
    /// Assign a user license to a user or group.
    PutAssignment {
        /// The tenant.
        tenant: String,
        /// User or group.
        kind: Principal,
        /// Its id.
        id: String,
    },
    /// Remove an assignment.
    DeleteAssignment {
        /// The tenant.
        tenant: String,
        /// User or group.
        kind: Principal,
        /// Its id.
        id: String,
    },
    /// A user takes a seat (seeding from configuration, which is validated against the seats).
    PutSeat(SeatRecord),
    /// A user takes a seat if one of the tenant's `seats` is free, or already holds one; the
    /// store checks this atomically with the write, so nodes acting on their own snapshots
    /// cannot together take more seats than were bought.
    ClaimSeat {
        /// The seat.
        seat: SeatRecord,
        /// The seats the tenant bought.
        seats: u64,
    },
    /// Seats released: of one user, or of every member seated through a group (`via`).
    DeleteSeats {
        /// The tenant.
        tenant: String,
        /// The user, when releasing one user's seat.
        user: Option<String>,
        /// The `via`, when releasing a group's seats.
        via: Option<String>,
    },
    /// Insert or replace a trial.
    PutTrial(TrialRecord),
    /// Insert or replace a bot.
    PutBot(BotRecord),
    /// A new bot: applied only if no bot has its id (the store checks atomically with the
    /// write), else the whole change fails with `StoreError::BotExists`.
    CreateBot(BotRecord),
    /// Delete a bot.
    DeleteBot {
        /// The bot id.
        id: String,
    },
    /// Insert or replace a webhook endpoint.
    PutEndpoint(EndpointRecord),
    /// Delete a webhook endpoint.
    DeleteEndpoint {
        /// The tenant.
        tenant: String,
        /// The endpoint id.
        id: String,
    },
}

/// Everything the control plane holds, as loaded at start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ControlData {
    /// Tenants.
    pub tenants: Vec<TenantRecord>,
    /// Subscriptions.
    pub subscriptions: Vec<SubscriptionRecord>,
    /// Assignments: (tenant, kind, id).
    pub assignments: Vec<(String, Principal, String)>,
    /// Seats.
    pub seats: Vec<SeatRecord>,
    /// Trials.
    pub trials: Vec<TrialRecord>,
    /// Bots.
    pub bots: Vec<BotRecord>,
    /// Webhook endpoints, by id.
    pub endpoints: Vec<EndpointRecord>,
}
