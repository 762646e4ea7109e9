//! The admin API (`TenantAdmin` role; admins need no user license): licenses and seats,
//! settings, the audit log, the subscriptions (bought by the operator, or by the admin where
//! `licensing.tenant_self_purchase` allows it). Every answer is about the caller's own tenant.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use chrono::NaiveDate;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::layer::Admin;
use super::model::TenantView;
use crate::config::{CapacityPolicy, SubscriptionKind};
use crate::error::{ApiError, JsonBody};
use crate::state::AppState;
use crate::store::control::Principal as Assignee;

fn view(app: &AppState, tenant: &str) -> Result<std::sync::Arc<TenantView>, ApiError> {
    app.licensing().tenant(tenant).ok_or_else(|| super::unknown_tenant(tenant))
}

/// `GET /api/v1/admin/subscriptions`.
#[utoipa::path(get, path = "/api/v1/admin/subscriptions", tag = "admin", responses((status = 200, description = "The tenant's subscriptions", body = serde_json::Value)))]
pub async fn list_subscriptions(State(app): State<AppState>, Admin(p): Admin) -> Result<Response, ApiError> {
    let t = view(&app, &p.identity.tenant)?;
    let subs = super::model::subscriptions_json(&t, super::model::day(app.clock().now_ms()));
    Ok(Json(json!({ "subscriptions": subs })).into_response())
}

/// A purchase request.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSubscription {
    kind: SubscriptionKind,
    /// How many (licenses, add-ons or seats); default 1.
    #[serde(default = "one", deserialize_with = "crate::error::whole_number")]
    #[schema(minimum = 1, maximum = 1_000_000)]
    quantity: u32,
    start: Option<NaiveDate>,
    end: Option<NaiveDate>,
}

fn one() -> u32 {
    1
}

/// Records a purchase for `tenant` (which the caller has checked exists): 201 and the record.
pub async fn record_purchase(
    app: &AppState,
    actor: &str,
    tenant: &str,
    body: NewSubscription,
) -> Result<Response, ApiError> {
    if !(1..=1_000_000).contains(&body.quantity) {
        return Err(ApiError::bad_request("`quantity` is 1 to 1,000,000."));
    }
    let start = body.start.unwrap_or_else(|| super::model::day(app.clock().now_ms()));
    if body.end.is_some_and(|e| e < start) {
        return Err(ApiError::bad_request("`end` is before `start`."));
    }
    let rec =
        app.licensing().add_subscription(actor, tenant, body.kind, body.quantity, start, body.end).await?;
    Ok((StatusCode::CREATED, Json(rec)).into_response())
}

/// `POST /api/v1/admin/subscriptions`: only where the operator's configuration lets tenants
/// buy for themselves (`licensing.tenant_self_purchase`); otherwise 403 `SelfPurchaseDisabled`.
#[utoipa::path(post, path = "/api/v1/admin/subscriptions", tag = "admin", request_body = NewSubscription, responses((status = 201, description = "The purchase", body = crate::store::control::SubscriptionRecord)))]
pub async fn add_subscription(
    State(app): State<AppState>,
    Admin(p): Admin,
    JsonBody(body): JsonBody<NewSubscription>,
) -> Result<Response, ApiError> {
    if !app.config().licensing.tenant_self_purchase {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "SelfPurchaseDisabled",
            "Purchases are recorded by the platform operator. Ask your provider for more capacity or seats.",
        ));
    }
    record_purchase(&app, &p.identity.user, &p.identity.tenant, body).await
}

#[derive(Serialize)]
struct Seats {
    bought: u64,
    used: u64,
    free: u64,
}

/// `GET /api/v1/admin/licenses`: seats bought, used, free, and the assignments.
#[utoipa::path(get, path = "/api/v1/admin/licenses", tag = "admin", responses((status = 200, description = "Seats, assignments and seat holders", body = serde_json::Value)))]
pub async fn licenses(State(app): State<AppState>, Admin(p): Admin) -> Result<Response, ApiError> {
    let now = app.clock().now_ms();
    let Some(t) = app.licensing().tenant(&p.identity.tenant) else {
        return Ok(Json(json!({"seats": Seats { bought: 0, used: 0, free: 0 }, "users": [], "groups": [], "seat_holders": []}))
            .into_response());
    };
    let bought = t.seats_bought(now);
    let used = t.seats.len() as u64;
    let holders: Vec<_> = t.seats.iter().map(|(user, via)| json!({"user": user, "via": via})).collect();
    Ok(Json(json!({
        "seats": Seats { bought, used, free: bought.saturating_sub(used) },
        "users": t.users,
        "groups": t.groups,
        "seat_holders": holders,
    }))
    .into_response())
}

/// `PUT /api/v1/admin/licenses/users/{userId}`.
#[utoipa::path(put, path = "/api/v1/admin/licenses/users/{user_id}", tag = "admin", params(("user_id" = String, Path, description = "The user")), responses((status = 200, description = "The license is assigned")))]
pub async fn assign_user(
    State(app): State<AppState>,
    Admin(p): Admin,
    Path(user): Path<String>,
) -> Result<Response, ApiError> {
    change(&app, &p, Assignee::User, &user, true).await
}

/// `DELETE /api/v1/admin/licenses/users/{userId}`.
#[utoipa::path(delete, path = "/api/v1/admin/licenses/users/{user_id}", tag = "admin", params(("user_id" = String, Path, description = "The user")), responses((status = 204, description = "The license is removed")))]
pub async fn remove_user(
    State(app): State<AppState>,
    Admin(p): Admin,
    Path(user): Path<String>,
) -> Result<Response, ApiError> {
    change(&app, &p, Assignee::User, &user, false).await
}

/// `PUT /api/v1/admin/licenses/groups/{groupId}`.
#[utoipa::path(put, path = "/api/v1/admin/licenses/groups/{group_id}", tag = "admin", params(("group_id" = String, Path, description = "The group")), responses((status = 200, description = "The license is assigned")))]
pub async fn assign_group(
    State(app): State<AppState>,
    Admin(p): Admin,
    Path(group): Path<String>,
) -> Result<Response, ApiError> {
    change(&app, &p, Assignee::Group, &group, true).await
}

/// `DELETE /api/v1/admin/licenses/groups/{groupId}`.
#[utoipa::path(delete, path = "/api/v1/admin/licenses/groups/{group_id}", tag = "admin", params(("group_id" = String, Path, description = "The group")), responses((status = 204, description = "The license is removed")))]
pub async fn remove_group(
    State(app): State<AppState>,
    Admin(p): Admin,
    Path(group): Path<String>,
) -> Result<Response, ApiError> {
    change(&app, &p, Assignee::Group, &group, false).await
}

async fn change(
    app: &AppState,
    p: &super::layer::Principal,
    kind: Assignee,
    id: &str,
    assign: bool,
) -> Result<Response, ApiError> {
    if id.is_empty() || id.len() > 256 {
        return Err(ApiError::bad_request("The id must be 1 to 256 characters."));
    }
    let l = app.licensing();
    if assign {
        l.assign(&p.identity.user, &p.identity.tenant, kind, id).await?;
    } else {
        l.unassign(&p.identity.user, &p.identity.tenant, kind, id).await?;
    }
    let status = if assign { StatusCode::OK } else { StatusCode::NO_CONTENT };
    Ok(status.into_response())
}

/// `GET /api/v1/admin/trials`: the tenant's trials, with their state now.
#[utoipa::path(get, path = "/api/v1/admin/trials", tag = "admin", responses((status = 200, description = "The tenant's trials", body = serde_json::Value)))]
pub async fn trials(State(app): State<AppState>, Admin(p): Admin) -> Result<Response, ApiError> {
    let now = app.clock().now_ms();
    let Some(t) = app.licensing().tenant(&p.identity.tenant) else {
        return Err(super::unknown_tenant(&p.identity.tenant));
    };
    let trials: Vec<_> = t
        .trials
        .values()
        .map(|tr| {
            json!({
                "user": tr.user,
                "started": crate::clock::rfc3339_ms(tr.started_ms),
                "expires": crate::clock::rfc3339_ms(tr.expires_ms),
                "extended": tr.extended,
                "active": tr.expires_ms > now,
            })
        })
        .collect();
    Ok(Json(json!({ "trials": trials })).into_response())
}

/// `GET /api/v1/admin/settings`.
#[utoipa::path(get, path = "/api/v1/admin/settings", tag = "admin", responses((status = 200, description = "The settings", body = serde_json::Value)))]
pub async fn settings(State(app): State<AppState>, Admin(p): Admin) -> Result<Response, ApiError> {
    let t = view(&app, &p.identity.tenant)?;
    Ok(Json(settings_json(&app, &t)).into_response())
}

fn settings_json(app: &AppState, t: &TenantView) -> serde_json::Value {
    json!({
        "allow_ad_hoc_subscriptions": t.record.allow_ad_hoc_subscriptions,
        "capacity_policy": t.record.capacity_policy,
        "capacity_alerts": t.record.capacity_alerts.as_ref().unwrap_or(&app.config().notifications.capacity_thresholds),
    })
}

/// A settings change.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettingsPatch {
    allow_ad_hoc_subscriptions: Option<bool>,
    capacity_policy: Option<CapacityPolicy>,
    /// Percentages of the month's capacity that raise a `capacity.threshold` webhook (1 to 100,
    /// at most 10); an empty list raises none.
    #[serde(default, deserialize_with = "crate::error::percentages")]
    #[schema(schema_with = alerts_schema)]
    capacity_alerts: Option<Vec<u8>>,
}

/// Percentages 1 to 100, at most 10 of them.
fn alerts_schema() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, SchemaType, Type};
    ArrayBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Array, Type::Null]))
        .items(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(1)).maximum(Some(100)))
        .max_items(Some(10))
        .build()
}

/// `PATCH /api/v1/admin/settings`.
#[utoipa::path(patch, path = "/api/v1/admin/settings", tag = "admin", request_body = SettingsPatch, responses((status = 200, description = "The settings", body = serde_json::Value)))]
pub async fn patch_settings(
    State(app): State<AppState>,
    Admin(p): Admin,
    JsonBody(body): JsonBody<SettingsPatch>,
) -> Result<Response, ApiError> {
    if let Some(a) = &body.capacity_alerts {
        crate::notify::api::check_alerts(a)?;
    }
    let t = app
        .licensing()
        .update_settings(
            &p.identity.user,
            &p.identity.tenant,
            body.allow_ad_hoc_subscriptions,
            body.capacity_policy,
            body.capacity_alerts,
        )
        .await?;
    Ok(Json(settings_json(&app, &t)).into_response())
}

/// Paging through and filtering the audit log.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Entries after this sequence number (the last one seen).
    #[param(minimum = 0)]
    after: Option<i64>,
    /// At most this many entries (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// Only this actor's entries.
    actor: Option<String>,
    /// Only this action's entries, e.g. `license.assign_user`.
    action: Option<String>,
    /// Entries at or after this time (RFC 3339; a date means its first moment).
    #[param(format = DateTime)]
    from: Option<String>,
    /// Entries at or before this time (RFC 3339; a date means its last moment).
    #[param(format = DateTime)]
    to: Option<String>,
}

/// An instant of a query: RFC 3339, or a date (its first millisecond, or with `end` its last).
fn instant(v: &Option<String>, what: &str, end: bool) -> Result<Option<i64>, ApiError> {
    let Some(v) = v.as_deref() else { return Ok(None) };
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(v) {
        return Ok(Some(t.timestamp_millis()));
    }
    if let Ok(d) = v.parse::<NaiveDate>() {
        let start = d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc().timestamp_millis();
        return Ok(Some(if end { start + 86_400_000 - 1 } else { start }));
    }
    Err(ApiError::bad_request(format!("`{what}` must be an RFC 3339 time or a date (YYYY-MM-DD).")))
}

/// A stored before/after document as JSON (a value that is not JSON stays a string).
fn document(v: &Option<String>) -> serde_json::Value {
    v.as_deref().map_or(serde_json::Value::Null, |s| {
        serde_json::from_str(s).unwrap_or_else(|_| serde_json::Value::String(s.to_string()))
    })
}

/// `GET /api/v1/admin/audit?after=SEQ&limit=N&actor=&action=&from=&to=`: the tenant's audit
/// log, oldest first: `seq`, `at` (RFC 3339), `actor`, `action`, `target`, and `before`/`after`
/// as JSON. Filters match exactly (actor, action) or by time (both ends inclusive); `after`
/// pages on (the last `seq` seen).
#[utoipa::path(get, path = "/api/v1/admin/audit", tag = "admin", params(AuditQuery), responses((status = 200, description = "Audit entries, oldest first", body = serde_json::Value)))]
pub async fn audit(
    State(app): State<AppState>,
    Admin(p): Admin,
    Query(q): Query<AuditQuery>,
) -> Result<Response, ApiError> {
    let from = instant(&q.from, "from", false)?;
    let to = instant(&q.to, "to", true)?;
    crate::authoring::reports::take_report(&app, &p.identity)?;
    let store = app.store().clone();
    let tenant = p.identity.tenant.clone();
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("`limit` is 1 to 1000."));
    }
    let mut after = q.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::bad_request("`after` is a sequence number, 0 or more."));
    }
    let keep = move |e: &crate::store::control::AuditEntry| {
        q.actor.as_ref().is_none_or(|a| *a == e.actor)
            && q.action.as_ref().is_none_or(|a| *a == e.action)
            && from.is_none_or(|f| e.at_ms >= f)
            && to.is_none_or(|t| e.at_ms <= t)
    };
    let entries = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        loop {
            let page = store.audit(&tenant, after, 1000)?;
            let full = page.len() == 1000;
            for e in page {
                after = e.seq;
                if keep(&e) {
                    out.push(e);
                    if out.len() == limit {
                        return Ok(out);
                    }
                }
            }
            if !full {
                return Ok(out);
            }
        }
    })
    .await
    .map_err(|_| ApiError::internal())?
    .map_err(|e: crate::store::StoreError| {
        tracing::error!(error = %e, "Reading the audit log failed.");
        ApiError::unavailable("StoreUnavailable", "The audit log could not be read. Try again.")
    })?;
    let entries: Vec<_> = entries
        .iter()
        .map(|e| {
            json!({
                "seq": e.seq,
                "tenant": e.tenant,
                "at": crate::clock::rfc3339_ms(e.at_ms),
                "actor": e.actor,
                "action": e.action,
                "target": e.target,
                "before": document(&e.before),
                "after": document(&e.after),
            })
        })
        .collect();
    Ok(Json(json!({ "entries": entries })).into_response())
}
