//! Who am I, trials, and the authoring test chat.

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::json;

use super::bots::{Access, bot_for};
use crate::clock::rfc3339_ms;
use crate::error::ApiError;
use crate::licensing::denial_error;
use crate::licensing::layer::{Author, Caller};
use crate::state::AppState;
use crate::store::control::TrialRecord;

/// `GET /api/v1/me`: identity, and whether and how the caller is licensed (or why not).
#[utoipa::path(get, path = "/api/v1/me", tag = "authoring", responses((status = 200, description = "Who the caller is and how they are licensed", body = serde_json::Value)))]
pub async fn me(Caller(p): Caller) -> Response {
    let id = &p.identity;
    let (licensed, license, reason) = match &p.license {
        Ok(g) => (true, json!(g), json!(null)),
        Err(d) => {
            let e = denial_error(*d);
            (false, json!(null), json!({"code": e.code, "message": e.message}))
        }
    };
    Json(json!({
        "tenant": id.tenant,
        "user": id.user,
        "name": id.name,
        "groups": id.groups,
        "roles": id.roles,
        "tenant_admin": id.is_admin(),
        "licensed": licensed,
        "license": license,
        "reason": reason,
    }))
    .into_response()
}

fn trial_json(t: &TrialRecord) -> serde_json::Value {
    json!({
        "started": rfc3339_ms(t.started_ms),
        "expires": rfc3339_ms(t.expires_ms),
        "extended": t.extended,
    })
}

/// `POST /api/v1/trial`.
#[utoipa::path(post, path = "/api/v1/trial", tag = "authoring", responses((status = 201, description = "The trial", body = serde_json::Value)))]
pub async fn start_trial(State(app): State<AppState>, Caller(p): Caller) -> Result<Response, ApiError> {
    let t = app.licensing().start_trial(&p.identity).await?;
    Ok((StatusCode::CREATED, Json(trial_json(&t))).into_response())
}

/// `POST /api/v1/trial/extend`.
#[utoipa::path(post, path = "/api/v1/trial/extend", tag = "authoring", responses((status = 200, description = "The extended trial", body = serde_json::Value)))]
pub async fn extend_trial(State(app): State<AppState>, Caller(p): Caller) -> Result<Response, ApiError> {
    let t = app.licensing().extend_trial(&p.identity).await?;
    Ok(Json(trial_json(&t)).into_response())
}

/// `POST /api/v1/bots/{botId}/testchat`: a Direct Line token for the author to test the bot
/// (published or not). Test-chat conversations are never billed; they follow the bot's rate
/// limit, an author holds at most `channel.max_test_chats_per_author` of them, and the token
/// lives `channel.test_chat_token_ttl_secs` at most and only while the author is licensed.
#[utoipa::path(post, path = "/api/v1/bots/{bot_id}/testchat", tag = "authoring", params(("bot_id" = String, Path, description = "The bot id")), responses((status = 200, description = "A Direct Line token for a test conversation", body = serde_json::Value)))]
pub async fn test_chat(
    State(app): State<AppState>,
    Author(p, _): Author,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let bot = bot_for(&app, &p, &id, Access::Read)?;
    let ch = app.channel();
    let user = format!("{}{}", crate::channel::token::TEST_CHAT_USER_PREFIX, p.identity.user);
    let claims = ch.new_claims(&bot, Some(user), 0, true);
    let conversation = claims.conversation.clone();
    let (token, expires_in) = ch.issue(claims);
    Ok(Json(json!({ "token": token, "conversationId": conversation, "expires_in": expires_in }))
        .into_response())
}
