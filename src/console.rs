//! The web console at `/console`: one page and its assets, embedded in the binary at build time
//! (no Node at run time). The page signs in with a bearer token kept in the tab's session
//! storage and reads the same JSON APIs scripts use; it holds no state of its own.
//!
//! With the development issuer on (`identity.algorithms` has HS256), `POST /api/v1/dev/token`
//! signs tokens for the page's one-click sign-in; without it the route is 404 and the page
//! shows only the token field.

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Deserialize;
use serde_json::json;

use crate::error::{ApiError, JsonBody};
use crate::identity::dev_issuer;
use crate::state::AppState;

/// The page's files: name, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("app.js", "text/javascript; charset=utf-8", include_bytes!("../console/app.js")),
    ("app.css", "text/css; charset=utf-8", include_bytes!("../console/app.css")),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../console/vendor/uPlot.iife.min.js"),
    ),
    ("uPlot.min.css", "text/css; charset=utf-8", include_bytes!("../console/vendor/uPlot.min.css")),
];

const INDEX: &[u8] = include_bytes!("../console/index.html");

/// Scripts and styles only from the gateway; no frames; the APIs on the same origin.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

fn file(content_type: &'static str, bytes: &'static [u8]) -> Response {
    let mut res = bytes.into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    res
}

/// `GET /console`: the page.
pub async fn index() -> Response {
    file("text/html; charset=utf-8", INDEX)
}

/// `GET /console/{file}`: an asset, or `config.json` (whether the development sign-in is on).
pub async fn asset(State(app): State<AppState>, Path(name): Path<String>) -> Response {
    if name == "config.json" {
        return Json(json!({ "dev_sign_in": app.dev_key().is_some() })).into_response();
    }
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, bytes)) => file(content_type, bytes),
        None => ApiError::not_found("No such console file.").into_response(),
    }
}

/// Who the development sign-in signs in as.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DevSignIn {
    /// The tenant id (`tid`).
    #[schema(pattern = "^[A-Za-z0-9_.-]{1,64}$")]
    tenant: String,
    /// The user id (`oid`).
    #[schema(pattern = "^[A-Za-z0-9_.-]{1,64}$")]
    user: String,
    /// Group ids (`groups`).
    #[serde(default)]
    #[schema(max_items = 16, value_type = Vec<DevGroup>)]
    groups: Vec<String>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    operator: bool,
}

/// A group id in a development token.
#[derive(utoipa::ToSchema)]
#[schema(pattern = "^[A-Za-z0-9_.-]{1,64}$")]
#[allow(dead_code)]
pub struct DevGroup(String);

/// `POST /api/v1/dev/token`: a development token for the console's one-click sign-in, valid
/// 8 hours; 404 unless the development issuer is on. Anyone who reaches the gateway can call
/// it, exactly as anyone who reads its data folder can run `botgate token`: the development
/// issuer is for a development machine, and a deployment configures its identity provider
/// (RS256/ES256), which turns this route off.
#[utoipa::path(post, path = "/api/v1/dev/token", tag = "console", request_body = DevSignIn, responses((status = 201, description = "A development token", body = serde_json::Value)))]
pub async fn dev_token(
    State(app): State<AppState>,
    JsonBody(body): JsonBody<DevSignIn>,
) -> Result<Response, ApiError> {
    let Some(key) = app.dev_key() else {
        return Err(ApiError::not_found(
            "The development issuer is off; sign in with your identity provider.",
        ));
    };
    let ok = |s: &str| crate::config::validate_id("", s).is_ok();
    if !ok(&body.tenant) || !ok(&body.user) || body.groups.len() > 16 || !body.groups.iter().all(|g| ok(g)) {
        return Err(ApiError::bad_request(
            "`tenant`, `user` and each of at most 16 `groups` are 1 to 64 of A-Z a-z 0-9 _ - .",
        ));
    }
    let req = dev_issuer::TokenRequest {
        tenant: body.tenant,
        user: body.user,
        name: None,
        groups: body.groups,
        admin: body.admin,
        operator: body.operator,
        ttl_secs: 8 * 3600,
    };
    let id = &app.config().identity;
    let token = dev_issuer::sign(key, &id.issuer, &id.audience, &req, app.clock().now_secs());
    Ok((StatusCode::CREATED, Json(json!({ "token": token, "expires_in": req.ttl_secs }))).into_response())
}
