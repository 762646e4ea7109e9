//! The admin API of webhooks (`TenantAdmin`): endpoints of the caller's tenant, their secrets
//! (shown when made and when rotated, never again), test events, the events raised and the
//! delivery log.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use crate::config::notifications::{check_event_types, check_thresholds};
use crate::error::{ApiError, JsonBody};
use crate::licensing::layer::Admin;
use crate::state::AppState;
use crate::store::control::{EndpointRecord, Mutation};
use crate::store::outbox::{EventState, OutboxEvent};

/// An endpoint as the API shows it: everything but its secrets.
fn public(e: &EndpointRecord) -> serde_json::Value {
    json!({
        "id": e.id,
        "url": e.url,
        "description": e.description,
        "events": e.events,
        "enabled": e.enabled,
        "disabled_reason": e.disabled_reason,
        "created_at": crate::clock::rfc3339_ms(e.created_ms),
    })
}

/// [`public`] as JSON text, for the audit log.
pub fn public_json(e: &EndpointRecord) -> String {
    public(e).to_string()
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "EndpointNotFound",
        format!("The tenant has no webhook endpoint `{id}`."),
    )
}

fn bad(e: crate::config::Invalid) -> ApiError {
    ApiError::bad_request(format!("`{}`: {}.", e.key, e.problem))
}

fn check_url(app: &AppState, url: &str) -> Result<(), ApiError> {
    if url.len() > 2048 {
        return Err(ApiError::bad_request("`url` must be at most 2048 bytes."));
    }
    app.notifier().client.policy().check_url(url).map_err(|why| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "EndpointNotAllowed",
            format!("The gateway cannot call `{url}`: {why}."),
        )
    })
}

fn check_description(d: &str) -> Result<(), ApiError> {
    if d.len() > 256 {
        return Err(ApiError::bad_request("`description` must be at most 256 bytes."));
    }
    Ok(())
}

/// `GET /api/v1/admin/webhooks`.
#[utoipa::path(get, path = "/api/v1/admin/webhooks", tag = "webhooks", responses((status = 200, description = "The tenant's webhook endpoints (without secrets)", body = serde_json::Value)))]
pub async fn list(State(app): State<AppState>, Admin(p): Admin) -> Result<Response, ApiError> {
    let t = app
        .licensing()
        .tenant(&p.identity.tenant)
        .ok_or_else(|| crate::licensing::unknown_tenant(&p.identity.tenant))?;
    let endpoints: Vec<_> = t.endpoints.values().map(public).collect();
    Ok(Json(json!({ "endpoints": endpoints })).into_response())
}

/// A new endpoint.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEndpoint {
    /// The `http://` URL events are posted to.
    url: String,
    /// A note for admins.
    #[serde(default)]
    description: String,
    /// The event types it receives; empty or absent: every type.
    #[serde(default)]
    events: Vec<String>,
}

/// `POST /api/v1/admin/webhooks`: the endpoint with its secret, shown this once.
#[utoipa::path(post, path = "/api/v1/admin/webhooks", tag = "webhooks", request_body = NewEndpoint, responses((status = 201, description = "The endpoint, with its signing secret (shown once)", body = serde_json::Value)))]
pub async fn create(
    State(app): State<AppState>,
    Admin(p): Admin,
    JsonBody(body): JsonBody<NewEndpoint>,
) -> Result<Response, ApiError> {
    check_url(&app, &body.url)?;
    check_description(&body.description)?;
    check_event_types("events", &body.events).map_err(bad)?;
    let max = app.config().notifications.max_endpoints_per_tenant;
    let record = EndpointRecord {
        id: format!("ep_{:016x}", rand::random::<u64>()),
        tenant: p.identity.tenant.clone(),
        url: body.url,
        description: body.description,
        events: body.events,
        secret: super::sign::new_secret(),
        previous_secret: None,
        previous_until_ms: 0,
        enabled: true,
        disabled_reason: None,
        created_ms: app.clock().now_ms(),
    };
    let made = record.clone();
    app.licensing()
        .commit(&p.identity.tenant, &p.identity.user, move |t| {
            if t.endpoints.len() >= max {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "TooManyEndpoints",
                    format!("A tenant has at most {max} webhook endpoints; delete one first."),
                ));
            }
            t.endpoints.insert(record.id.clone(), record.clone());
            Ok((
                vec![Mutation::PutEndpoint(record.clone())],
                vec![("webhook.create", record.id.clone(), None, Some(public_json(&record)))],
            ))
        })
        .await?;
    let mut out = public(&made);
    out["secret"] = json!(made.secret);
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

/// `GET /api/v1/admin/webhooks/{endpoint_id}`.
#[utoipa::path(get, path = "/api/v1/admin/webhooks/{endpoint_id}", tag = "webhooks", params(("endpoint_id" = String, Path, description = "The endpoint id")), responses((status = 200, description = "The endpoint (without secrets)", body = serde_json::Value)))]
pub async fn get(
    State(app): State<AppState>,
    Admin(p): Admin,
    Path(endpoint_id): Path<String>,
) -> Result<Response, ApiError> {
    let t = app
        .licensing()
        .tenant(&p.identity.tenant)
        .ok_or_else(|| crate::licensing::unknown_tenant(&p.identity.tenant))?;
    let e = t.endpoints.get(&endpoint_id).ok_or_else(|| not_found(&endpoint_id))?;
    Ok(Json(public(e)).into_response())
}

/// A change to an endpoint.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointPatch {
    url: Option<String>,
    description: Option<String>,
    events: Option<Vec<String>>,
    /// Turns delivery on or off; turning it on again clears why delivery disabled it.
    enabled: Option<bool>,
}

/// `PATCH /api/v1/admin/webhooks/{endpoint_id}`.
#[utoipa::path(patch, path = "/api/v1/admin/webhooks/{endpoint_id}", tag = "webhooks", params(("endpoint_id" = String, Path, description = "The endpoint id")), request_body = EndpointPatch, responses((status = 200, description = "The endpoint (without secrets)", body = serde_json::Value)))]
pub async fn patch(
    State(app): State<AppState>,
    Admin(p): Admin,
    Path(endpoint_id): Path<String>,
    JsonBody(body): JsonBody<EndpointPatch>,
) -> Result<Response, ApiError> {
    if let Some(u) = &body.url {
        check_url(&app, u)?;
    }
    if let Some(d) = &body.description {
        check_description(d)?;
    }
    if let Some(e) = &body.events {
        check_event_types("events", e).map_err(bad)?;
    }
    let id = endpoint_id.clone();
    let t = app
        .licensing()
        .commit(&p.identity.tenant, &p.identity.user, move |t| {
            let e = t.endpoints.get_mut(&id).ok_or_else(|| not_found(&id))?;
            let before = e.clone();
            if let Some(u) = body.url {
                e.url = u;
            }
            if let Some(d) = body.description {
                e.description = d;
            }
            if let Some(ev) = body.events {
                e.events = ev;
            }
            if let Some(on) = body.enabled {
                e.enabled = on;
                if on {
                    e.disabled_reason = None;
                }
            }
            if *e == before {
                return Ok((vec![], vec![]));
            }
            Ok((
                vec![Mutation::PutEndpoint(e.clone())],
                vec![("webhook.update", id.clone(), Some(public_json(&before)), Some(public_json(e)))],
            ))
        })
        .await?;
    let e = t.endpoints.get(&endpoint_id).ok_or_else(|| not_found(&endpoint_id))?;
    Ok(Json(public(e)).into_response())
}

/// `DELETE /api/v1/admin/webhooks/{endpoint_id}`: events not delivered to it yet are dropped
/// for it.
#[utoipa::path(delete, path = "/api/v1/admin/webhooks/{endpoint_id}", tag = "webhooks", params(("endpoint_id" = String, Path, description = "The endpoint id")), responses((status = 204, description = "The endpoint is deleted")))]
pub async fn delete(
    State(app): State<AppState>,
    Admin(p): Admin,
    Path(endpoint_id): Path<String>,
) -> Result<Response, ApiError> {
    let tenant = p.identity.tenant.clone();
    app.licensing()
        .commit(&p.identity.tenant, &p.identity.user, move |t| {
            let e = t.endpoints.remove(&endpoint_id).ok_or_else(|| not_found(&endpoint_id))?;
            Ok((
                vec![Mutation::DeleteEndpoint { tenant, id: endpoint_id.clone() }],
                vec![("webhook.delete", endpoint_id.clone(), Some(public_json(&e)), None)],
            ))
        })
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /api/v1/admin/webhooks/{endpoint_id}/rotate`: a new secret, shown this once; the old
/// one keeps signing beside it for `notifications.rotation_overlap_secs`.
#[utoipa::path(post, path = "/api/v1/admin/webhooks/{endpoint_id}/rotate", tag = "webhooks", params(("endpoint_id" = String, Path, description = "The endpoint id")), responses((status = 200, description = "The new secret (shown once) and until when the old one still signs", body = serde_json::Value)))]
pub async fn rotate(
    State(app): State<AppState>,
    Admin(p): Admin,
    Path(endpoint_id): Path<String>,
) -> Result<Response, ApiError> {
    let secret = super::sign::new_secret();
    let until = app.clock().now_ms() + app.config().notifications.rotation_overlap_secs as i64 * 1000;
    let (id, s) = (endpoint_id.clone(), secret.clone());
    app.licensing()
        .commit(&p.identity.tenant, &p.identity.user, move |t| {
            let e = t.endpoints.get_mut(&id).ok_or_else(|| not_found(&id))?;
            e.previous_secret = Some(std::mem::replace(&mut e.secret, s));
            e.previous_until_ms = until;
            Ok((
                vec![Mutation::PutEndpoint(e.clone())],
                vec![("webhook.rotate_secret", id.clone(), None, None)],
            ))
        })
        .await?;
    Ok(Json(json!({
        "id": endpoint_id,
        "secret": secret,
        "previous_secret_signs_until": crate::clock::rfc3339_ms(until),
    }))
    .into_response())
}

/// `POST /api/v1/admin/webhooks/{endpoint_id}/test`: a `test` event for this endpoint alone,
/// delivered (and retried) like any other.
#[utoipa::path(post, path = "/api/v1/admin/webhooks/{endpoint_id}/test", tag = "webhooks", params(("endpoint_id" = String, Path, description = "The endpoint id")), responses((status = 202, description = "The test event's id; see the delivery log for its attempts", body = serde_json::Value)))]
pub async fn test(
    State(app): State<AppState>,
    Admin(p): Admin,
    Path(endpoint_id): Path<String>,
) -> Result<Response, ApiError> {
    let tenant = &p.identity.tenant;
    let t = app.licensing().tenant(tenant).ok_or_else(|| crate::licensing::unknown_tenant(tenant))?;
    if !t.endpoints.contains_key(&endpoint_id) {
        return Err(not_found(&endpoint_id));
    }
    if !app.config().notifications.enabled {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "NotificationsDisabled",
            "The gateway delivers no notifications (notifications.enabled is false); a test event would never be sent.",
        ));
    }
    crate::authoring::reports::take_report(&app, &p.identity)?;
    let now = app.clock().now_ms();
    let event = OutboxEvent::new(
        tenant,
        "test",
        format!("test/{tenant}/{endpoint_id}/{now}/{:016x}", rand::random::<u64>()),
        now,
        json!({ "tenant": tenant, "endpoint": endpoint_id }),
    );
    let id = event.id.clone();
    let store = app.store().clone();
    tokio::task::spawn_blocking(move || store.raise(&[event]))
        .await
        .map_err(|_| ApiError::internal())?
        .map_err(|e| {
            tracing::warn!(error = %e, "Raising a test event failed.");
            ApiError::unavailable("StoreUnavailable", "The test event could not be saved. Try again.")
        })?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "event_id": id }))).into_response())
}

/// How many entries a list returns.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LimitQuery {
    /// 1 to 1000; default 100.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

fn limit(q: &LimitQuery) -> Result<usize, ApiError> {
    match q.limit {
        None => Ok(100),
        Some(n) if (1..=1000).contains(&n) => Ok(n as usize),
        Some(_) => Err(ApiError::bad_request("`limit` must be from 1 to 1000.")),
    }
}

/// `GET /api/v1/admin/webhooks/deliveries`: the delivery log, newest first.
#[utoipa::path(get, path = "/api/v1/admin/webhooks/deliveries", tag = "webhooks", params(LimitQuery), responses((status = 200, description = "Delivery attempts, newest first: event, endpoint, attempt, status, latency, outcome", body = serde_json::Value)))]
pub async fn deliveries(
    State(app): State<AppState>,
    Admin(p): Admin,
    Query(q): Query<LimitQuery>,
) -> Result<Response, ApiError> {
    let rows = read_outbox(&app, &p.identity, &q, |store, tenant, n| store.attempts(tenant, n)).await?;
    let rows: Vec<_> = rows
        .iter()
        .map(|a| {
            json!({
                "event_id": a.event_id,
                "type": a.kind,
                "endpoint": a.endpoint,
                "attempt": a.attempt,
                "at": crate::clock::rfc3339_ms(a.at_ms),
                "status": a.status,
                "latency_ms": a.latency_ms,
                "error": a.error,
                "outcome": a.outcome,
            })
        })
        .collect();
    Ok(Json(json!({ "deliveries": rows })).into_response())
}

/// A report read of the caller's tenant from the outbox: the `limit`, the caller's report
/// rate, then `read` on a blocking thread.
async fn read_outbox<T: Send + 'static>(
    app: &AppState,
    identity: &crate::identity::Identity,
    q: &LimitQuery,
    read: impl FnOnce(&dyn crate::store::Store, &str, usize) -> Result<T, crate::store::StoreError>
    + Send
    + 'static,
) -> Result<T, ApiError> {
    let n = limit(q)?;
    crate::authoring::reports::take_report(app, identity)?;
    let (store, tenant) = (app.store().clone(), identity.tenant.clone());
    tokio::task::spawn_blocking(move || read(&*store, &tenant, n))
        .await
        .map_err(|_| ApiError::internal())?
        .map_err(unavailable)
}

fn unavailable(e: crate::store::StoreError) -> ApiError {
    tracing::warn!(error = %e, "Reading the notification outbox failed.");
    ApiError::unavailable("StoreUnavailable", "The outbox cannot be read right now. Try again.")
}

fn event_json(s: &EventState) -> serde_json::Value {
    let payload: serde_json::Value = serde_json::from_str(&s.event.payload).unwrap_or_default();
    json!({
        "id": s.event.id,
        "type": s.event.kind,
        "created_at": crate::clock::rfc3339_ms(s.event.created_ms),
        "data": payload["data"],
        "deliveries": s.targets.iter().map(|t| json!({
            "endpoint": t.endpoint,
            "attempts": t.attempts,
            "outcome": t.outcome,
            "next_attempt_at": t.outcome.is_none().then(|| crate::clock::rfc3339_ms(t.next_ms)),
        })).collect::<Vec<_>>(),
        "pending": s.due_ms.is_some(),
    })
}

/// `GET /api/v1/admin/webhooks/events`: events raised for the tenant, newest first, with their
/// deliveries.
#[utoipa::path(get, path = "/api/v1/admin/webhooks/events", tag = "webhooks", params(LimitQuery), responses((status = 200, description = "Events, newest first, with the state of each delivery", body = serde_json::Value)))]
pub async fn events(
    State(app): State<AppState>,
    Admin(p): Admin,
    Query(q): Query<LimitQuery>,
) -> Result<Response, ApiError> {
    let rows = read_outbox(&app, &p.identity, &q, |store, tenant, n| store.events(tenant, n)).await?;
    Ok(Json(json!({ "events": rows.iter().map(event_json).collect::<Vec<_>>() })).into_response())
}

/// Checks the thresholds of a settings change.
pub fn check_alerts(t: &[u8]) -> Result<(), ApiError> {
    check_thresholds("capacity_alerts", t).map_err(bad)
}
