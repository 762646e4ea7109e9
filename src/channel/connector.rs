//! The connector upstream bots call back on:
//! `POST /connector/{key}/v3/conversations/{id}/activities[/{replyToId}]`.
//!
//! The key in the path names the bot and is the credential (SDK bots in local mode send no
//! Authorization on callbacks). Callbacks are served while the gateway's own POST to the bot is
//! still open: an SDK bot answers that POST only after its whole turn.

use axum::extract::{Path, State};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::activity;
use super::turn::id_answer;
use crate::conversation::Conversation;
use crate::error::ApiError;
use crate::state::AppState;

/// `POST /connector/{key}/v3/conversations/{id}/activities`.
pub async fn send(
    State(app): State<AppState>,
    Path((key, conversation)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    callback(&app, &key, &conversation, None, &body)
}

/// `POST /connector/{key}/v3/conversations/{id}/activities/{replyToId}`.
pub async fn reply(
    State(app): State<AppState>,
    Path((key, conversation, reply_to)): Path<(String, String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    callback(&app, &key, &conversation, Some(&reply_to), &body)
}

/// A callback's body, from either route: checked against the bot's connector key, parsed and
/// appended; answers `{"id"}`.
pub fn callback(
    app: &AppState,
    key: &str,
    conversation: &str,
    reply_to: Option<&str>,
    body: &[u8],
) -> Result<Response, ApiError> {
    let ch = app.channel();
    let not_found = || ApiError::not_found("There is no such conversation for this bot.");
    let bot = ch.bots.by_connector_key(key).ok_or_else(not_found)?;
    let conv = ch.conversation(conversation).map_err(|_| not_found())?;
    if conv.bot.id != bot.id {
        return Err(not_found());
    }
    let a = activity::parse(body)?;
    let id = append_bot_activity(app, &conv, a, reply_to);
    Ok(id_answer(&id))
}

/// Stamps and appends an activity from the bot: the gateway assigns id and timestamp (never
/// earlier than the activity it replies to), sets the channel and conversation, defaults `from`
/// to the bot and `replyToId` to the path's. An `endOfConversation` ends the conversation.
pub fn append_bot_activity(
    app: &AppState,
    conv: &Conversation,
    mut a: Map<String, Value>,
    reply_to: Option<&str>,
) -> String {
    if let Some(r) = reply_to {
        a.entry("replyToId").or_insert_with(|| Value::String(r.to_string()));
    }
    a.entry("from").or_insert_with(|| json!({ "id": conv.bot.id, "name": conv.bot.name, "role": "bot" }));
    // The connector address is the gateway's own business, not the client's.
    a.remove("serviceUrl");
    let ends = activity::kind(&a) == "endOfConversation";
    let conv_id = conv.id.clone();
    let appended = conv.append(app.clock().now_ms(), 0, |id, ts| activity::stamp(&a, id, ts, &conv_id));
    if ends {
        conv.meter.end_session();
        conv.end();
    }
    appended.id
}
