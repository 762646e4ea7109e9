//! The platform operator's API (`/api/v1/operator/...`): tenants and their purchases.
//!
//! The operator is whoever runs the gateway and sells capacity. It authenticates with an API
//! key whose SHA-256 is in `operator.api_key_sha256`, or, where `operator.jwt_role` is on, with
//! a JWT of the configured identity issuer carrying the role `PlatformOperator`; never with a
//! tenant admin's token. Every change is written with an audit entry in the tenant's log, the
//! actor being `operator:<key id>` or `operator:<oid>`.

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::response::{IntoResponse, Response};
use chrono::NaiveDate;
use http::request::Parts;
use http::{StatusCode, header};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::admin::{NewSubscription, record_purchase};
use super::model::{TenantView, day, subscriptions_json};
use crate::config::CapacityPolicy;
use crate::error::{ApiError, JsonBody};
use crate::state::AppState;
use crate::store::control::TenantRecord;

/// The JWT role that makes a token the operator's.
pub const OPERATOR_ROLE: &str = "PlatformOperator";

/// The authenticated platform operator; `actor` names it in the audit log.
pub struct Operator {
    /// `operator:key-<first 8 hex digits of the key's hash>` or `operator:<oid>`.
    pub actor: String,
}

fn refused(
    status: StatusCode,
    code: &'static str,
    message: impl Into<std::borrow::Cow<'static, str>>,
) -> ApiError {
    ApiError::new(status, code, message)
}

/// The hex SHA-256 of an operator key, as `operator.api_key_sha256` lists it.
pub fn key_hash(key: &str) -> String {
    Sha256::digest(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, ApiError> {
        let cfg = &app.config().operator;
        if cfg.api_key_sha256.is_empty() && !cfg.jwt_role {
            return Err(refused(
                StatusCode::FORBIDDEN,
                "OperatorApiDisabled",
                "The operator API is off: the configuration lists no operator.api_key_sha256 and operator.jwt_role is false.",
            ));
        }
        let value = parts.headers.get(header::AUTHORIZATION).ok_or_else(|| {
            refused(
                StatusCode::UNAUTHORIZED,
                "MissingToken",
                "Send `Authorization: Bearer <operator key>` (or an operator's JWT).",
            )
        })?;
        let credential = crate::identity::bearer_value(value).ok_or_else(|| {
            refused(
                StatusCode::UNAUTHORIZED,
                "MalformedAuthorization",
                "The Authorization header must be `Bearer <credential>`.",
            )
        })?;
        if credential.bytes().filter(|&b| b == b'.').count() == 2 {
            let token = credential.to_string();
            return jwt_operator(app, &token).await;
        }
        let hash = key_hash(credential);
        let known = cfg.api_key_sha256.iter().fold(false, |found, h| {
            found | bool::from(h.to_ascii_lowercase().as_bytes().ct_eq(hash.as_bytes()))
        });
        if !known {
            return Err(refused(
                StatusCode::UNAUTHORIZED,
                "InvalidOperatorKey",
                "The operator key is not valid.",
            ));
        }
        Ok(Operator { actor: format!("operator:key-{}", &hash[..8]) })
    }
}

async fn jwt_operator(app: &AppState, token: &str) -> Result<Operator, ApiError> {
    if !app.config().operator.jwt_role {
        return Err(refused(
            StatusCode::UNAUTHORIZED,
            "InvalidOperatorKey",
            "Operator JWTs are not accepted here (operator.jwt_role is false); send an operator key.",
        ));
    }
    let identity = app.verifier().verify_fetching(token).await.map_err(super::layer::jwt_refused)?;
    if !identity.roles.iter().any(|r| r == OPERATOR_ROLE) {
        return Err(refused(
            StatusCode::FORBIDDEN,
            "NotOperator",
            format!("This needs the {OPERATOR_ROLE} role, or an operator key."),
        ));
    }
    Ok(Operator { actor: format!("operator:{}", identity.user) })
}

fn tenant_not_found(id: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "TenantNotFound", format!("There is no tenant `{id}`."))
}

fn known(app: &AppState, id: &str) -> Result<std::sync::Arc<TenantView>, ApiError> {
    app.licensing().tenant(id).ok_or_else(|| tenant_not_found(id))
}

/// A tenant's state as the operator sees it: settings, licensing now, this month's pool, and
/// (with `subscriptions`) every purchase with its state.
fn summary(app: &AppState, t: &TenantView, subscriptions: bool) -> Value {
    let now = app.clock().now_ms();
    let today = day(now);
    let metering = app.metering();
    let month = metering.current_month();
    let pool = metering.pool(&t.record.id);
    let (capacity, used) = (pool.capacity(month), pool.tenant_used(month));
    let mut v = json!({
        "id": t.record.id,
        "name": t.record.name,
        "allow_ad_hoc_subscriptions": t.record.allow_ad_hoc_subscriptions,
        "capacity_policy": t.record.capacity_policy,
        "tenant_licensed": t.licensed(now),
        "seats": {"bought": t.seats_bought(now), "used": t.seats.len()},
        "month": crate::metering::pool::month_label(month),
        "capacity": capacity,
        "used": used,
        "remaining": capacity.saturating_sub(used),
        "trials": t.trials.len(),
    });
    if subscriptions {
        v["subscriptions"] = json!(subscriptions_json(t, today));
    }
    v
}

/// `GET /api/v1/operator/tenants`: every tenant, with its licensing state and this month's pool.
#[utoipa::path(get, path = "/api/v1/operator/tenants", tag = "operator", responses((status = 200, description = "Every tenant", body = serde_json::Value)))]
pub async fn list_tenants(State(app): State<AppState>, _op: Operator) -> Response {
    let snapshot = app.licensing().snapshot();
    let mut tenants: Vec<_> = snapshot.tenants.values().collect();
    tenants.sort_by(|a, b| a.record.id.cmp(&b.record.id));
    Json(json!({ "tenants": tenants.iter().map(|t| summary(&app, t, false)).collect::<Vec<_>>() }))
        .into_response()
}

/// A new tenant.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTenant {
    /// The tenant id (the `tid` of its users' tokens).
    #[schema(pattern = "^[A-Za-z0-9_.-]{1,64}$")]
    id: String,
    /// A display name (default: the id).
    #[schema(max_length = 256)]
    name: Option<String>,
    #[serde(default = "yes")]
    allow_ad_hoc_subscriptions: bool,
    #[serde(default)]
    capacity_policy: CapacityPolicy,
}

fn yes() -> bool {
    true
}

/// `POST /api/v1/operator/tenants`: 201 and the tenant; 409 `TenantExists`.
#[utoipa::path(post, path = "/api/v1/operator/tenants", tag = "operator", request_body = NewTenant, responses((status = 201, description = "The tenant", body = serde_json::Value)))]
pub async fn create_tenant(
    State(app): State<AppState>,
    op: Operator,
    JsonBody(body): JsonBody<NewTenant>,
) -> Result<Response, ApiError> {
    crate::config::validate_id("id", &body.id)
        .map_err(|e| ApiError::bad_request(format!("`id`: {}.", e.problem)))?;
    let name = body.name.filter(|n| !n.trim().is_empty()).unwrap_or_else(|| body.id.clone());
    if name.len() > 256 {
        return Err(ApiError::bad_request("`name` must be at most 256 bytes."));
    }
    let record = TenantRecord {
        id: body.id,
        name,
        allow_ad_hoc_subscriptions: body.allow_ad_hoc_subscriptions,
        capacity_policy: body.capacity_policy,
        capacity_alerts: None,
    };
    let view = app.licensing().create_tenant(&op.actor, record).await?;
    Ok((StatusCode::CREATED, Json(summary(&app, &view, true))).into_response())
}

/// `GET /api/v1/operator/tenants/{tenantId}`: the tenant with its subscriptions.
#[utoipa::path(get, path = "/api/v1/operator/tenants/{tenant_id}", tag = "operator", params(("tenant_id" = String, Path, description = "The tenant")), responses((status = 200, description = "The tenant and its subscriptions", body = serde_json::Value)))]
pub async fn get_tenant(
    State(app): State<AppState>,
    _op: Operator,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let t = known(&app, &id)?;
    Ok(Json(summary(&app, &t, true)).into_response())
}

/// `POST /api/v1/operator/tenants/{tenantId}/subscriptions`: records a purchase.
#[utoipa::path(post, path = "/api/v1/operator/tenants/{tenant_id}/subscriptions", tag = "operator", params(("tenant_id" = String, Path, description = "The tenant")), request_body = NewSubscription, responses((status = 201, description = "The purchase", body = crate::store::control::SubscriptionRecord)))]
pub async fn add_subscription(
    State(app): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<NewSubscription>,
) -> Result<Response, ApiError> {
    known(&app, &id)?;
    record_purchase(&app, &op.actor, &id, body).await
}

/// When a subscription ends.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndSubscription {
    end: NaiveDate,
}

/// `POST /api/v1/operator/tenants/{tenantId}/subscriptions/{subscriptionId}/end`: the last
/// day it counts (today or later); the month of that day keeps its full capacity.
#[utoipa::path(post, path = "/api/v1/operator/tenants/{tenant_id}/subscriptions/{subscription_id}/end", tag = "operator", params(("tenant_id" = String, Path, description = "The tenant"), ("subscription_id" = String, Path, description = "The subscription")), request_body = EndSubscription, responses((status = 200, description = "The subscription", body = crate::store::control::SubscriptionRecord)))]
pub async fn end_subscription(
    State(app): State<AppState>,
    op: Operator,
    Path((id, sub)): Path<(String, String)>,
    JsonBody(body): JsonBody<EndSubscription>,
) -> Result<Response, ApiError> {
    known(&app, &id)?;
    let rec = app.licensing().end_subscription(&op.actor, &id, &sub, Some(body.end)).await?;
    Ok(Json(rec).into_response())
}

/// `POST /api/v1/operator/tenants/{tenantId}/subscriptions/{subscriptionId}/cancel`: voids
/// the subscription (a refund): it counts for no day and no month, this one included. Sessions
/// already counted stay counted.
#[utoipa::path(post, path = "/api/v1/operator/tenants/{tenant_id}/subscriptions/{subscription_id}/cancel", tag = "operator", params(("tenant_id" = String, Path, description = "The tenant"), ("subscription_id" = String, Path, description = "The subscription")), responses((status = 200, description = "The subscription", body = crate::store::control::SubscriptionRecord)))]
pub async fn cancel_subscription(
    State(app): State<AppState>,
    op: Operator,
    Path((id, sub)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    known(&app, &id)?;
    let rec = app.licensing().end_subscription(&op.actor, &id, &sub, None).await?;
    Ok(Json(rec).into_response())
}
