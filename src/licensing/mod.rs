//! Licensing: tenants, purchases, user-license assignments and seats, trials, settings and the
//! audit log; the read-mostly snapshot the author layer consults; the admin API.
//!
//! Reads take no lock and do no I/O: the snapshot is an `ArcSwap`. A write takes the writer
//! lock (a tokio mutex: it is held across the store write), applies the change to a copy of the
//! tenant, writes it to the store with its audit entries in one transaction, and only then
//! publishes the new snapshot.
//!
//! Seats: a user assigned directly takes a seat at assignment; a member of a licensed group
//! takes one the first time they are seen; a user licensed both ways holds one seat. When no
//! seat is free the assignment (or the group member) gets 409 `NoSeatsLeft`.

pub mod admin;
pub mod layer;
pub mod model;
pub mod operator;

use std::sync::Arc;

use arc_swap::ArcSwap;
use chrono::NaiveDate;
use http::StatusCode;
use serde::Serialize;

use crate::clock::{Millis, SharedClock, rfc3339_ms};
use crate::config::{CapacityPolicy, Config, LicensingConfig, SubscriptionKind};
use crate::error::ApiError;
use crate::identity::Identity;
use crate::metering::Metering;
use crate::metering::pool::CapacityPlan;
use crate::store::control::{
    AuditEntry, Mutation, Principal, SeatRecord, SubscriptionRecord, TenantRecord, TrialRecord,
};
use crate::store::{SharedStore, StoreError};
use model::{Denial, Grant, Snapshot, TenantView};

const DAY_MS: i64 = 86_400_000;

/// The licensing engine; shared through `AppState`.
pub struct Licensing {
    snapshot: ArcSwap<Snapshot>,
    writer: tokio::sync::Mutex<()>,
    store: SharedStore,
    clock: SharedClock,
    config: LicensingConfig,
    metering: Metering,
}

/// Why licensing could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot load licensing state: {0}")]
pub struct LicensingError(String);

fn json<T: Serialize>(v: &T) -> Option<String> {
    serde_json::to_string(v).ok()
}

impl Licensing {
    /// Loads the control plane, seeds the configured tenants the store does not know yet, and
    /// hands every tenant's capacity plan to metering.
    pub fn open(
        config: &Config,
        store: SharedStore,
        clock: SharedClock,
        metering: Metering,
    ) -> Result<Self, LicensingError> {
        let err = |e: crate::store::StoreError| LicensingError(e.to_string());
        let data = store.load_control().map_err(err)?;
        let now = clock.now_ms();
        for t in &config.tenants {
            if data.tenants.iter().any(|r| r.id == t.id) {
                continue;
            }
            let mut mutations = Vec::new();
            let mut audit = Vec::new();
            let record = TenantRecord {
                id: t.id.clone(),
                name: if t.name.is_empty() { t.id.clone() } else { t.name.clone() },
                allow_ad_hoc_subscriptions: t.allow_ad_hoc_subscriptions,
                capacity_policy: t.capacity_policy,
                capacity_alerts: t.capacity_alerts.clone(),
            };
            let entry = |action: &str, target: &str, after: Option<String>| AuditEntry {
                seq: 0,
                tenant: t.id.clone(),
                at_ms: now,
                actor: "config".into(),
                action: action.into(),
                target: target.into(),
                before: None,
                after,
            };
            audit.push(entry("tenant.create", &t.id, json(&record)));
            mutations.push(Mutation::PutTenant(record));
            for (i, s) in t.subscriptions.iter().enumerate() {
                let rec = SubscriptionRecord {
                    id: format!("config-{}-{i}", t.id),
                    tenant: t.id.clone(),
                    kind: s.kind,
                    quantity: s.quantity,
                    start: s.start,
                    end: s.end,
                };
                audit.push(entry("subscription.add", &rec.id, json(&rec)));
                mutations.push(Mutation::PutSubscription(rec));
            }
            for u in &t.licensed_users {
                audit.push(entry("license.assign_user", u, None));
                mutations.push(Mutation::PutAssignment {
                    tenant: t.id.clone(),
                    kind: Principal::User,
                    id: u.clone(),
                });
                mutations.push(Mutation::PutSeat(SeatRecord {
                    tenant: t.id.clone(),
                    user: u.clone(),
                    via: "direct".into(),
                }));
            }
            for g in &t.licensed_groups {
                audit.push(entry("license.assign_group", g, None));
                mutations.push(Mutation::PutAssignment {
                    tenant: t.id.clone(),
                    kind: Principal::Group,
                    id: g.clone(),
                });
            }
            // Atomic per tenant: of several nodes starting at once, one seeds it.
            if !store.seed_tenant(&t.id, &mutations, &audit).map_err(err)? {
                tracing::debug!(tenant = %t.id, "Another node seeded this tenant first.");
            }
        }
        let data = store.load_control().map_err(err)?;
        let snapshot = Snapshot::from_data(&data);
        let licensing = Self {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            writer: tokio::sync::Mutex::new(()),
            store,
            clock,
            config: config.licensing.clone(),
            metering,
        };
        for t in snapshot.tenants.values() {
            licensing.publish_plan(t);
        }
        licensing.snapshot.store(Arc::new(snapshot));
        Ok(licensing)
    }

    /// Replaces the snapshot with the store's state (another node changed it).
    pub async fn reload(&self, data: &crate::store::control::ControlData) {
        let _guard = self.writer.lock().await;
        let snapshot = Snapshot::from_data(data);
        for t in snapshot.tenants.values() {
            self.publish_plan(t);
        }
        self.snapshot.store(Arc::new(snapshot));
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// A tenant's view.
    pub fn tenant(&self, id: &str) -> Option<Arc<TenantView>> {
        self.snapshot.load().tenants.get(id).cloned()
    }

    fn publish_plan(&self, t: &TenantView) {
        let m = self.metering.config();
        self.metering.set_plan(
            &t.record.id,
            CapacityPlan {
                subscriptions: t
                    .subscriptions
                    .iter()
                    .map(|s| crate::config::SubscriptionConfig {
                        kind: s.kind,
                        quantity: s.quantity,
                        start: s.start,
                        end: s.end,
                    })
                    .collect(),
                per_license: m.tenant_license_sessions,
                per_addon: m.addon_sessions,
                trial_capacity: m.trial_capacity,
                trials: t.trials.values().map(|tr| (tr.started_ms, tr.expires_ms)).collect(),
                policy: t.record.capacity_policy,
                alerts: t.record.capacity_alerts.clone(),
            },
        );
    }

    /// How the author is licensed now, claiming a seat for a group member seen for the first time.
    pub async fn resolve(&self, id: &Identity) -> Result<Grant, Denial> {
        let now = self.clock.now_ms();
        let Some(t) = self.tenant(&id.tenant) else { return Err(Denial::NoTenantLicense) };
        let trial = t.trials.get(&id.user);
        let trial_active = trial.is_some_and(|tr| tr.expires_ms > now);
        let group = id.groups.iter().find(|g| t.groups.contains(*g));
        let has_license = t.users.contains(&id.user) || group.is_some();
        if has_license && t.licensed(now) {
            if t.users.contains(&id.user) {
                return Ok(Grant::Direct);
            }
            let group = group.cloned().unwrap_or_default();
            if t.seats.contains_key(&id.user) {
                return Ok(Grant::Group { group });
            }
            return match self.claim_seat(&id.tenant, &id.user, &group).await {
                Ok(()) => Ok(Grant::Group { group }),
                Err(d) => Err(d),
            };
        }
        if trial_active {
            return Ok(Grant::Trial { until: rfc3339_ms(trial.map_or(0, |t| t.expires_ms)) });
        }
        if has_license {
            return Err(Denial::NoTenantLicense);
        }
        if id.groups_overage && !t.groups.is_empty() {
            return Err(Denial::GroupsOverage);
        }
        if trial.is_some() {
            return Err(Denial::TrialExpired);
        }
        Err(Denial::NoUserLicense)
    }

    /// Whether `user` of `tenant` holds an author's license at `now` as far as the store knows,
    /// without a JWT: a direct assignment, or a seat claimed through a group that still holds a
    /// license, both under an active tenant license; or an active trial. For credentials minted
    /// from an author's license (test-chat tokens), checked again on each use.
    pub fn still_licensed(&self, tenant: &str, user: &str, now: Millis) -> bool {
        let Some(t) = self.tenant(tenant) else { return false };
        if t.trials.get(user).is_some_and(|tr| tr.expires_ms > now) {
            return true;
        }
        let via_group = t
            .seats
            .get(user)
            .and_then(|via| via.strip_prefix("group:"))
            .is_some_and(|g| t.groups.contains(g));
        t.licensed(now) && (t.users.contains(user) || via_group)
    }

    async fn claim_seat(&self, tenant: &str, user: &str, group: &str) -> Result<(), Denial> {
        let now = self.clock.now_ms();
        let result = self
            .commit(tenant, user, |t| {
                if t.seats.contains_key(user) {
                    return Ok((vec![], vec![]));
                }
                if t.seats.len() as u64 >= t.seats_bought(now) {
                    return Err(no_seats(t, now));
                }
                let via = format!("group:{group}");
                t.seats.insert(user.to_string(), via.clone());
                let seat = SeatRecord { tenant: tenant.into(), user: user.into(), via };
                Ok((
                    vec![Mutation::ClaimSeat { seat: seat.clone(), seats: t.seats_bought(now) }],
                    vec![("seat.take", user.to_string(), None, json(&seat))],
                ))
            })
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if e.code == "NoSeatsLeft" => Err(Denial::NoSeatsLeft),
            Err(e) => {
                tracing::error!(tenant, user, error = %e, "Claiming a seat failed.");
                Err(Denial::NoSeatsLeft)
            }
        }
    }

    /// Applies a change to one known tenant (403 `UnknownTenant` otherwise): `change` edits a
    /// copy and returns the store mutations and audit entries (action, target, before, after);
    /// the store is written first, then the new snapshot is published.
    pub async fn commit<F>(&self, tenant: &str, actor: &str, change: F) -> Result<Arc<TenantView>, ApiError>
    where
        F: FnOnce(&mut TenantView) -> Result<(Vec<Mutation>, Vec<AuditRow>), ApiError>,
    {
        let _guard = self.writer.lock().await;
        let now = self.clock.now_ms();
        let current = self.snapshot.load_full();
        let Some(known) = current.tenants.get(tenant) else { return Err(unknown_tenant(tenant)) };
        let mut view = (**known).clone();
        let (mutations, audit) = change(&mut view)?;
        if mutations.is_empty() {
            return Ok(known.clone());
        }
        let entries: Vec<AuditEntry> = audit
            .into_iter()
            .map(|(action, target, before, after)| AuditEntry {
                seq: 0,
                tenant: tenant.to_string(),
                at_ms: now,
                actor: actor.to_string(),
                action: action.to_string(),
                target,
                before,
                after,
            })
            .collect();
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.apply(&mutations, &entries))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "A licensing write panicked.");
                ApiError::internal()
            })?
            .map_err(|e| match e {
                StoreError::SeatsFull { .. } => no_seats(&view, now),
                e => {
                    tracing::error!(error = %e, "A licensing write failed.");
                    ApiError::unavailable("StoreUnavailable", "The change could not be saved. Try again.")
                }
            })?;
        let view = Arc::new(view);
        let mut next = (*current).clone();
        next.tenants.insert(tenant.to_string(), view.clone());
        self.snapshot.store(Arc::new(next));
        self.publish_plan(&view);
        Ok(view)
    }

    /// Creates a tenant (the platform operator): 409 `TenantExists` when the store knows its id,
    /// also when another node created it a moment ago.
    pub async fn create_tenant(
        &self,
        actor: &str,
        record: TenantRecord,
    ) -> Result<Arc<TenantView>, ApiError> {
        let _guard = self.writer.lock().await;
        let exists = || {
            ApiError::new(
                StatusCode::CONFLICT,
                "TenantExists",
                format!("A tenant with the id `{}` exists.", record.id),
            )
        };
        let current = self.snapshot.load_full();
        if current.tenants.contains_key(&record.id) {
            return Err(exists());
        }
        let entry = AuditEntry {
            seq: 0,
            tenant: record.id.clone(),
            at_ms: self.clock.now_ms(),
            actor: actor.to_string(),
            action: "tenant.create".into(),
            target: record.id.clone(),
            before: None,
            after: json(&record),
        };
        let (store, id, m) =
            (self.store.clone(), record.id.clone(), vec![Mutation::PutTenant(record.clone())]);
        let created = tokio::task::spawn_blocking(move || store.seed_tenant(&id, &m, &[entry]))
            .await
            .map_err(|_| ApiError::internal())?
            .map_err(|e| {
                tracing::error!(error = %e, "Creating a tenant failed.");
                ApiError::unavailable("StoreUnavailable", "The change could not be saved. Try again.")
            })?;
        if !created {
            return Err(exists());
        }
        let view = Arc::new(TenantView::new(record.clone()));
        let mut next = (*current).clone();
        next.tenants.insert(record.id.clone(), view.clone());
        self.snapshot.store(Arc::new(next));
        self.publish_plan(&view);
        Ok(view)
    }

    /// Ends a subscription after `end` (inclusive; today or later), or with `end: None` cancels
    /// it: a cancelled subscription counts for no day and no month, as if never bought.
    pub async fn end_subscription(
        &self,
        actor: &str,
        tenant: &str,
        id: &str,
        end: Option<NaiveDate>,
    ) -> Result<SubscriptionRecord, ApiError> {
        let today = model::day(self.clock.now_ms());
        let view = self
            .commit(tenant, actor, |t| {
                let Some(s) = t.subscriptions.iter_mut().find(|s| s.id == id) else {
                    return Err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        "SubscriptionNotFound",
                        format!("Tenant `{tenant}` has no subscription `{id}`."),
                    ));
                };
                if model::cancelled(s) {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "SubscriptionCancelled",
                        "This subscription was cancelled; it cannot change any more.",
                    ));
                }
                if s.end.is_some_and(|e| e < today) {
                    // Moving the end of a past subscription would rewrite the days and months
                    // it no longer counted for.
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "SubscriptionEnded",
                        "This subscription has ended; record a new purchase instead.",
                    ));
                }
                let before = s.clone();
                let action = match end {
                    Some(e) => {
                        if e < s.start {
                            return Err(ApiError::bad_request("`end` is before the subscription's start."));
                        }
                        if e < today {
                            return Err(ApiError::bad_request(
                                "`end` is in the past; cancel the subscription to void it.",
                            ));
                        }
                        s.end = Some(e);
                        "subscription.end"
                    }
                    None => {
                        s.end = Some(s.start.pred_opt().unwrap_or(s.start));
                        "subscription.cancel"
                    }
                };
                if *s == before {
                    return Ok((vec![], vec![]));
                }
                let after = s.clone();
                Ok((
                    vec![Mutation::PutSubscription(after.clone())],
                    vec![(action, id.to_string(), json(&before), json(&after))],
                ))
            })
            .await?;
        view.subscriptions.iter().find(|s| s.id == id).cloned().ok_or_else(ApiError::internal)
    }

    /// Adds a subscription.
    #[allow(clippy::too_many_arguments)]
    pub async fn add_subscription(
        &self,
        actor: &str,
        tenant: &str,
        kind: SubscriptionKind,
        quantity: u32,
        start: NaiveDate,
        end: Option<NaiveDate>,
    ) -> Result<SubscriptionRecord, ApiError> {
        let rec = SubscriptionRecord {
            id: crate::bots::secrets::random_id(9),
            tenant: tenant.to_string(),
            kind,
            quantity,
            start,
            end,
        };
        let r = rec.clone();
        self.commit(tenant, actor, move |t| {
            t.subscriptions.push(r.clone());
            Ok((
                vec![Mutation::PutSubscription(r.clone())],
                vec![("subscription.add", r.id.clone(), None, json(&r))],
            ))
        })
        .await?;
        Ok(rec)
    }

    /// Assigns a user license to a user or a group.
    pub async fn assign(
        &self,
        actor: &str,
        tenant: &str,
        kind: Principal,
        id: &str,
    ) -> Result<Arc<TenantView>, ApiError> {
        let now = self.clock.now_ms();
        self.commit(tenant, actor, |t| {
            let (set, action) = match kind {
                Principal::User => (&mut t.users, "license.assign_user"),
                Principal::Group => (&mut t.groups, "license.assign_group"),
            };
            if set.contains(id) {
                return Ok((vec![], vec![]));
            }
            set.insert(id.to_string());
            let mut m = vec![Mutation::PutAssignment { tenant: tenant.into(), kind, id: id.into() }];
            if kind == Principal::User {
                let before = t.seats.get(id).cloned();
                if before.is_none() && t.seats.len() as u64 >= t.seats_bought(now) {
                    return Err(no_seats(t, now));
                }
                t.seats.insert(id.to_string(), "direct".into());
                m.push(Mutation::ClaimSeat {
                    seat: SeatRecord { tenant: tenant.into(), user: id.into(), via: "direct".into() },
                    seats: t.seats_bought(now),
                });
            }
            Ok((m, vec![(action, id.to_string(), None, json(&serde_json::json!({ "assigned": id })))]))
        })
        .await
    }

    /// Removes a user's or a group's license (and the seats it held).
    pub async fn unassign(
        &self,
        actor: &str,
        tenant: &str,
        kind: Principal,
        id: &str,
    ) -> Result<Arc<TenantView>, ApiError> {
        self.commit(tenant, actor, |t| {
            let removed = match kind {
                Principal::User => t.users.remove(id),
                Principal::Group => t.groups.remove(id),
            };
            if !removed {
                return Err(ApiError::not_found(format!("No license is assigned to `{id}`.")));
            }
            let mut m = vec![Mutation::DeleteAssignment { tenant: tenant.into(), kind, id: id.into() }];
            match kind {
                Principal::User => {
                    if t.seats.get(id).is_some_and(|v| v == "direct") {
                        t.seats.remove(id);
                        m.push(Mutation::DeleteSeats {
                            tenant: tenant.into(),
                            user: Some(id.into()),
                            via: None,
                        });
                    }
                }
                Principal::Group => {
                    let via = format!("group:{id}");
                    t.seats.retain(|_, v| *v != via);
                    m.push(Mutation::DeleteSeats { tenant: tenant.into(), user: None, via: Some(via) });
                }
            }
            let action = if kind == Principal::User { "license.remove_user" } else { "license.remove_group" };
            Ok((m, vec![(action, id.to_string(), json(&serde_json::json!({ "assigned": id })), None)]))
        })
        .await
    }

    /// Changes tenant settings.
    pub async fn update_settings(
        &self,
        actor: &str,
        tenant: &str,
        allow_ad_hoc: Option<bool>,
        policy: Option<CapacityPolicy>,
        alerts: Option<Vec<u8>>,
    ) -> Result<Arc<TenantView>, ApiError> {
        self.commit(tenant, actor, |t| {
            let before = t.record.clone();
            if let Some(a) = allow_ad_hoc {
                t.record.allow_ad_hoc_subscriptions = a;
            }
            if let Some(p) = policy {
                t.record.capacity_policy = p;
            }
            if let Some(mut a) = alerts {
                a.sort_unstable();
                a.dedup();
                t.record.capacity_alerts = Some(a);
            }
            if t.record == before {
                return Ok((vec![], vec![]));
            }
            let after = t.record.clone();
            Ok((
                vec![Mutation::PutTenant(after.clone())],
                vec![("settings.update", tenant.to_string(), json(&before), json(&after))],
            ))
        })
        .await
    }

    /// Starts a trial for an unlicensed user.
    pub async fn start_trial(&self, id: &Identity) -> Result<TrialRecord, ApiError> {
        if let Ok(grant) = self.resolve(id).await {
            if matches!(grant, Grant::Trial { .. }) {
                return Err(trial_exists());
            }
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "AlreadyLicensed",
                format!("You are already licensed ({}); no trial is needed.", describe(&grant)),
            ));
        }
        let now = self.clock.now_ms();
        let days = i64::from(self.config.trial_days);
        let view = self
            .commit(&id.tenant, &id.user, |t| {
                if !t.record.allow_ad_hoc_subscriptions {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "SelfServiceSignupDisabled",
                        "Your organization does not allow self-service trials. Ask a tenant admin to assign you a license.",
                    ));
                }
                if t.trials.contains_key(&id.user) {
                    return Err(trial_exists());
                }
                let tr = TrialRecord {
                    tenant: id.tenant.clone(),
                    user: id.user.clone(),
                    started_ms: now,
                    expires_ms: now + days * DAY_MS,
                    extended: false,
                };
                t.trials.insert(id.user.clone(), tr.clone());
                Ok((vec![Mutation::PutTrial(tr.clone())], vec![("trial.start", id.user.clone(), None, json(&tr))]))
            })
            .await?;
        Ok(view.trials[&id.user].clone())
    }

    /// Extends a user's trial once.
    pub async fn extend_trial(&self, id: &Identity) -> Result<TrialRecord, ApiError> {
        let days = i64::from(self.config.trial_extension_days);
        let view = self
            .commit(&id.tenant, &id.user, |t| {
                let Some(tr) = t.trials.get_mut(&id.user) else {
                    return Err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        "NoTrial",
                        "You have no trial to extend. Start one with POST /api/v1/trial.",
                    ));
                };
                if tr.extended {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "TrialAlreadyExtended",
                        "A trial can be extended only once. Ask a tenant admin for a license.",
                    ));
                }
                let before = tr.clone();
                tr.expires_ms += days * DAY_MS;
                tr.extended = true;
                let after = tr.clone();
                Ok((
                    vec![Mutation::PutTrial(after.clone())],
                    vec![("trial.extend", id.user.clone(), json(&before), json(&after))],
                ))
            })
            .await?;
        Ok(view.trials[&id.user].clone())
    }

    /// Until when a bot owned by `owner` serves bot users: forever, unless the owner is a trial
    /// user of a tenant without a tenant license, whose bots serve until the trial's expiry plus
    /// the grace period.
    pub fn serving_until(&self, tenant: &str, owner: Option<&str>, now: Millis) -> Option<Millis> {
        let t = self.tenant(tenant)?;
        let owner = owner?;
        if t.licensed(now) || t.users.contains(owner) || t.seats.contains_key(owner) {
            return None;
        }
        let trial = t.trials.get(owner)?;
        Some(trial.expires_ms + i64::from(self.config.grace_days) * DAY_MS)
    }
}

fn trial_exists() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "TrialExists",
        "You already have or had a trial. It can be extended once with POST /api/v1/trial/extend.",
    )
}

/// 403 `UnknownTenant`: a token or a request names a tenant the gateway does not know.
pub fn unknown_tenant(tenant: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "UnknownTenant",
        format!(
            "The gateway has no tenant `{tenant}`. The platform operator creates tenants (POST /api/v1/operator/tenants)."
        ),
    )
}

/// An audit row as a change returns it: action, target, before, after.
pub type AuditRow = (&'static str, String, Option<String>, Option<String>);

fn no_seats(t: &TenantView, now: Millis) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "NoSeatsLeft",
        format!(
            "All {} user-license seats of this tenant are taken. Remove an assignment, or get more seats from your provider.",
            t.seats_bought(now)
        ),
    )
}

/// A human description of a grant.
pub fn describe(g: &Grant) -> String {
    match g {
        Grant::Direct => "a user license assigned to you".into(),
        Grant::Group { group } => format!("a user license through group {group}"),
        Grant::Trial { until } => format!("a trial until {until}"),
    }
}

/// The 403/409 answer for a denial.
pub fn denial_error(d: Denial) -> ApiError {
    match d {
        Denial::NoTenantLicense => ApiError::new(
            StatusCode::FORBIDDEN,
            "NoTenantLicense",
            "Your organization has no active tenant license. Your tenant admin can get one from your provider.",
        ),
        Denial::NoUserLicense => ApiError::new(
            StatusCode::FORBIDDEN,
            "NoUserLicense",
            "You have no user license. Ask a tenant admin to assign you one (PUT /api/v1/admin/licenses/users/{you}), or start a trial (POST /api/v1/trial).",
        ),
        Denial::TrialExpired => ApiError::new(
            StatusCode::FORBIDDEN,
            "TrialExpired",
            "Your trial has expired. Extend it once (POST /api/v1/trial/extend) or ask a tenant admin for a user license.",
        ),
        Denial::GroupsOverage => ApiError::new(
            StatusCode::FORBIDDEN,
            "GroupsOverage",
            "Your token does not list your groups (you are in too many for it), so a license through a group cannot be checked. Ask a tenant admin to assign you a user license directly (PUT /api/v1/admin/licenses/users/{you}).",
        ),
        Denial::NoSeatsLeft => ApiError::new(
            StatusCode::CONFLICT,
            "NoSeatsLeft",
            "Your group is licensed, but every user-license seat is taken. Ask your tenant admin for a seat.",
        ),
    }
}
