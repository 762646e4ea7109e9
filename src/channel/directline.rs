//! The Direct Line 3.0 REST endpoints (the message path itself is in `turn`).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Channel;
use super::auth::{self, Credential, bearer, check_bot, check_conversation, check_origin};
use super::token::Claims;
use super::turn;
use crate::bots::Bot;
use crate::error::ApiError;
use crate::state::AppState;

/// The token answer.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TokenAnswer {
    conversation_id: String,
    token: String,
    #[serde(rename = "expires_in")]
    expires_in: i64,
}

/// The conversation answer.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConversationAnswer {
    conversation_id: String,
    token: String,
    #[serde(rename = "expires_in")]
    expires_in: i64,
    stream_url: String,
}

/// An optional `{"user":{"id":...}}` body.
/// What `tokens/generate` (or a start with a secret) may bind into the token: the user id,
/// which must start with `dl_` as the Direct Line service requires, and the trusted origins.
struct TokenBody {
    user: Option<String>,
    origins: Vec<String>,
}

/// At most this many trusted origins per token.
const MAX_TRUSTED_ORIGINS: usize = 8;

fn token_body(body: &[u8]) -> Result<TokenBody, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(TokenBody { user: None, origins: Vec::new() });
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("The body is not valid JSON: {e}.")))?;
    let user = match v.get("user").and_then(|u| u.get("id")) {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) if id.starts_with("dl_") && id.len() <= 256 => Some(id.clone()),
        Some(_) => {
            return Err(ApiError::bad_request(
                "`user.id` must be a string of at most 256 characters that starts with `dl_`.",
            ));
        }
    };
    let origins = match v.get("trustedOrigins") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) if list.len() <= MAX_TRUSTED_ORIGINS => list
            .iter()
            .map(|o| match o.as_str() {
                Some(o) if is_origin(o) => Ok(o.trim_end_matches('/').to_string()),
                _ => Err(ApiError::bad_request(
                    "Each of `trustedOrigins` is an origin such as `https://www.contoso.com` (scheme and host, no path).",
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::bad_request(format!(
                "`trustedOrigins` is a list of at most {MAX_TRUSTED_ORIGINS} origins."
            )));
        }
    };
    Ok(TokenBody { user, origins })
}

/// `scheme://host[:port]`: http or https, a host of letters, digits, dots and dashes.
fn is_origin(o: &str) -> bool {
    let o = o.trim_end_matches('/');
    let Some(rest) = o.strip_prefix("https://").or_else(|| o.strip_prefix("http://")) else { return false };
    let (host, port) = rest.split_once(':').unwrap_or((rest, ""));
    o.len() <= 256
        && !host.is_empty()
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && port.bytes().all(|b| b.is_ascii_digit())
}

/// A bot published by a trial user of an unlicensed tenant serves bot users until the grace
/// period after the trial ends; then new conversations are refused.
fn check_serving(app: &AppState, bot: &Bot) -> Result<(), ApiError> {
    let now = app.clock().now_ms();
    match app.licensing().serving_until(&bot.tenant, bot.owner.as_deref(), now) {
        Some(until) if now >= until => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "BotTrialEnded",
            "This bot was published during a trial that has ended; it no longer serves new conversations.",
        )),
        _ => Ok(()),
    }
}

/// A test-chat credential works only while the author who opened it holds a license (checked
/// on the licensing snapshot: no I/O).
pub fn check_test_chat(app: &AppState, bot: &Bot, claims: &Claims) -> Result<(), ApiError> {
    if !claims.test_chat {
        return Ok(());
    }
    let author = claims.user.as_deref().and_then(|u| u.strip_prefix(super::token::TEST_CHAT_USER_PREFIX));
    match author {
        Some(user) if app.licensing().still_licensed(&bot.tenant, user, app.clock().now_ms()) => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "AuthorNotLicensed",
            "The author who opened this test chat no longer holds a license; the test chat has ended.",
        )),
    }
}

fn credential(ch: &Channel, headers: &HeaderMap) -> Result<Credential, ApiError> {
    auth::check(ch, bearer(headers)?, ch.clock.now_secs())
}

/// `POST /v3/directline/tokens/generate`: a token for a new conversation, from a secret.
pub async fn generate_token(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let ch = app.channel();
    let Credential::Secret { bot, slot } = credential(ch, &headers)? else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "SecretRequired",
            "Generating a token needs the bot's channel secret; refresh a token with tokens/refresh.",
        ));
    };
    check_bot(&bot, &Credential::Secret { bot: bot.clone(), slot })?;
    check_origin(&headers, &bot, None)?;
    check_serving(&app, &bot)?;
    let bound = token_body(&body)?;
    let mut claims = ch.new_claims(&bot, bound.user, slot, false);
    claims.origins = bound.origins;
    Ok(token_answer(ch, claims).into_response())
}

fn token_answer(ch: &Channel, claims: Claims) -> Json<TokenAnswer> {
    let conversation_id = claims.conversation.clone();
    let (token, expires_in) = ch.issue(claims);
    Json(TokenAnswer { conversation_id, token, expires_in })
}

/// `POST /v3/directline/tokens/refresh`: the same grant with a new expiry.
pub async fn refresh_token(State(app): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let ch = app.channel();
    let cred = credential(ch, &headers)?;
    let Credential::Token(claims) = &cred else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "TokenRequired",
            "Refresh needs a token, not a secret.",
        ));
    };
    let bot = ch.bot(&claims.bot)?;
    check_bot(&bot, &cred)?;
    check_origin(&headers, &bot, Some(&cred))?;
    check_test_chat(&app, &bot, claims)?;
    Ok(token_answer(ch, (**claims).clone()).into_response())
}

/// `GET /api/v1/bots/{botId}/directline/token`: a token for an open bot's website channel,
/// without a secret.
#[utoipa::path(get, path = "/api/v1/bots/{bot_id}/directline/token", tag = "channel", params(("bot_id" = String, Path, description = "The bot id")), responses((status = 200, description = "A Direct Line token and conversation id for an open bot", body = serde_json::Value)))]
pub async fn open_bot_token(
    State(app): State<AppState>,
    Path(bot_id): Path<String>,
    peer: Option<axum::Extension<crate::server::conn::Peer>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let ch = app.channel();
    if let (Some(rate), Some(axum::Extension(peer))) = (&ch.client_rate, peer) {
        rate.take(peer.0.ip(), &headers, ch.clock.now_ms())?;
    }
    // A misspelled or unknown id is 404, as another tenant's bot is on the authoring API.
    let bot = ch.bot(&bot_id).map_err(|e| ApiError { status: StatusCode::NOT_FOUND, ..e })?;
    if !bot.control.published() {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "BotNotPublished", "This bot is not published."));
    }
    if bot.control.secured_access() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "SecuredAccessRequired",
            "This bot requires a channel secret; exchange it at /v3/directline/tokens/generate.",
        ));
    }
    check_origin(&headers, &bot, None)?;
    check_serving(&app, &bot)?;
    let claims = ch.new_claims(&bot, None, 0, false);
    Ok(token_answer(ch, claims).into_response())
}

/// `POST /v3/directline/conversations`: starts the conversation (201), or answers 200 when this
/// token's conversation already started.
pub async fn start_conversation(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let ch = app.channel();
    let cred = credential(ch, &headers)?;
    let bot = ch.bot(cred.bot_id())?;
    check_bot(&bot, &cred)?;
    check_origin(&headers, &bot, Some(&cred))?;
    check_serving(&app, &bot)?;
    let (claims, token, expires_in) = match cred {
        Credential::Token(claims) => {
            let token = bearer(&headers)?.to_string();
            let left = claims.exp - ch.clock.now_secs();
            (claims, token, left)
        }
        Credential::Secret { slot, .. } => {
            let bound = token_body(&body)?;
            let mut claims = ch.new_claims(&bot, bound.user, slot, false);
            claims.origins = bound.origins;
            let (token, ttl) = ch.issue(claims.clone());
            (Arc::new(claims), token, ttl)
        }
    };
    let (conv, created) = ch.start(&bot, &claims)?;
    if created {
        turn::on_start(&app, &conv, claims.user.as_deref()).await;
    }
    let stream_url = ch.stream_url(&headers, &conv.id, &token, None);
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    let answer = ConversationAnswer { conversation_id: conv.id.to_string(), token, expires_in, stream_url };
    Ok((status, Json(answer)).into_response())
}

/// The `watermark` query parameter: empty or absent means from the start.
#[derive(Deserialize)]
pub struct WatermarkQuery {
    watermark: Option<String>,
}

impl WatermarkQuery {
    /// The parsed watermark.
    pub fn parse(&self) -> Result<u64, ApiError> {
        match self.watermark.as_deref().map(str::trim) {
            None | Some("") => Ok(0),
            Some(w) => w.parse().map_err(|_| ApiError::bad_request("`watermark` must be a number or empty.")),
        }
    }
}

/// Credential, conversation and bot checks shared by the per-conversation endpoints.
pub fn open_conversation(
    ch: &Channel,
    headers: &HeaderMap,
    id: &str,
) -> Result<(Credential, Arc<crate::conversation::Conversation>), ApiError> {
    open_conversation_with(ch, bearer(headers)?, headers, id)
}

/// [`open_conversation`] with the credential given apart from the headers (a stream URL's `t`).
pub fn open_conversation_with(
    ch: &Channel,
    credential: &str,
    headers: &HeaderMap,
    id: &str,
) -> Result<(Credential, Arc<crate::conversation::Conversation>), ApiError> {
    let now = ch.clock.now_secs();
    // A token this conversation already verified (byte for byte, not expired) skips the HMAC:
    // the signature check was 8% of a message's instructions (callgrind, benches/instructions.sh).
    if credential.starts_with(super::token::TOKEN_PREFIX)
        && let Some(conv) = ch.conversations.get(id, ch.clock.now_ms())
        && let Some(claims) = conv.verified_token(credential, now)
    {
        let cred = Credential::Token(claims);
        check_bot(&conv.bot, &cred)?;
        check_origin(headers, &conv.bot, Some(&cred))?;
        return Ok((cred, conv));
    }
    let cred = auth::check(ch, credential, now)?;
    // A token for another conversation is refused before revealing whether `id` exists.
    if let Credential::Token(c) = &cred
        && c.conversation != id
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "WrongConversation",
            "This credential is not valid for this conversation.",
        ));
    }
    let conv = ch.conversation(id)?;
    check_conversation(&cred, &conv)?;
    check_bot(&conv.bot, &cred)?;
    check_origin(headers, &conv.bot, Some(&cred))?;
    if let Credential::Token(claims) = &cred {
        conv.remember_token(credential, claims.clone());
    }
    Ok((cred, conv))
}

/// `GET /v3/directline/conversations/{id}?watermark=W`: reconnect; a fresh stream URL.
pub async fn resume_conversation(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<WatermarkQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let ch = app.channel();
    let watermark = q.parse()?;
    let (cred, conv) = open_conversation(ch, &headers, &id)?;
    let (token, expires_in) = match cred {
        Credential::Token(claims) => (bearer(&headers)?.to_string(), claims.exp - ch.clock.now_secs()),
        Credential::Secret { bot, slot } => {
            let mut claims = ch.new_claims(&bot, None, slot, false);
            claims.conversation = conv.id.to_string();
            ch.issue(claims)
        }
    };
    let stream_url = ch.stream_url(&headers, &conv.id, &token, Some(watermark));
    Ok(Json(ConversationAnswer { conversation_id: conv.id.to_string(), token, expires_in, stream_url })
        .into_response())
}

/// `GET /v3/directline/conversations/{id}/activities?watermark=W`: the activities since W.
pub async fn get_activities(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<WatermarkQuery>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let ch = app.channel();
    let watermark = q.parse()?;
    // The request's own headers, not a `HeaderMap` extractor's copy (polls are frequent).
    let (_, conv) = open_conversation(ch, req.headers(), &id)?;
    let (body, _) = conv.activities_since(watermark, ch.page);
    Ok(([(http::header::CONTENT_TYPE, "application/json")], body).into_response())
}
