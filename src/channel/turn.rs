//! The path of one user message: `POST /v3/directline/conversations/{id}/activities`.
//!
//! Credential check (signature, no I/O) → conversation handle (sharded map) → parse → classify
//! → meter (429 before the bot sees anything) → append the user's activity (echoed on the
//! stream) → dispatch to the bot (or run the topic's flow) → append replies → answer `{"id"}`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{StatusCode, header};
use serde_json::{Map, Value, json};

use super::activity::{self, bot_message, end_of_conversation};
use super::auth::Credential;
use super::directline::open_conversation;
use crate::bots::Engine;
use crate::bots::builtin::Topic;
use crate::bots::flow;
use crate::config::TopicKind;
use crate::conversation::Conversation;
use crate::error::ApiError;
use crate::metering::Turn;
use crate::state::AppState;

/// `POST /v3/directline/conversations/{id}/activities`.
///
/// Takes the whole request rather than a `HeaderMap` extractor, which would copy every header.
pub async fn post_activity(
    State(app): State<AppState>,
    Path(id): Path<String>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let ch = app.channel();
    let (parts, body) = req.into_parts();
    let (cred, conv) = open_conversation(ch, &parts.headers, &id)?;
    let body = read_body(body).await?;
    check_accepting(ch, &conv)?;
    let a = activity::parse(&body)?;
    let id = take(&app, &cred, &conv, a).await?;
    Ok(id_answer(&id))
}

/// Whether the conversation takes activities: not ended, and its bot's conversations within
/// their byte budget.
pub fn check_accepting(ch: &crate::channel::Channel, conv: &Conversation) -> Result<(), ApiError> {
    if conv.ended() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "ConversationEnded",
            "This conversation has ended. Start a new conversation.",
        ));
    }
    if conv.bot.control.retained() >= ch.max_bot_bytes {
        tracing::debug!(bot = %conv.bot.id, "A bot's conversations hold their byte budget; refusing an activity.");
        return Err(ApiError::unavailable(
            "Overloaded",
            "This bot's conversations hold as much as the gateway keeps for a bot. Try again shortly.",
        )
        .with_retry_after(30));
    }
    Ok(())
}

/// A user's activity (posted, or made by an upload) through the turn path: the user's identity,
/// the test-chat and rate checks, then by type: metered and answered, echoed, or forwarded.
/// Returns the activity's id.
pub async fn take(
    app: &AppState,
    cred: &Credential,
    conv: &Arc<Conversation>,
    mut a: Map<String, Value>,
) -> Result<String, ApiError> {
    let token_user = match cred {
        Credential::Token(c) => c.user.as_deref(),
        Credential::Secret { .. } => None,
    };
    activity::set_user(&mut a, token_user)?;
    let kind = activity::kind(&a);
    if let Credential::Token(c) = cred
        && c.test_chat
    {
        // A test chat is never billed, but it is no free channel: its author must still hold a
        // license, and what it sends counts against the bot's rate limit.
        super::directline::check_test_chat(app, &conv.bot, c)?;
        if !matches!(kind, "typing" | "endOfConversation") {
            app.metering().on_test_chat(&conv.bot.tenant, &conv.bot.id)?;
        }
    } else if !matches!(kind, "message" | "typing" | "endOfConversation") {
        // Events, invokes and the rest count against the bot's message rate limit, as
        // messages do; they never begin a billed session.
        app.metering().on_user_event(&conv.meter)?;
    }
    let id = match kind {
        "message" => message(app, conv, a).await?,
        "event" if activity::name(&a) == "startConversation" => greet_event(app, conv, a).await?,
        "conversationUpdate" => greet_event(app, conv, a).await?,
        "endOfConversation" => {
            let id = append_user(app, conv, &mut a);
            conv.meter.end_session();
            conv.end();
            forward(app, conv, a).await?;
            id
        }
        // Typing and other activities are echoed; an upstream bot receives events and invokes.
        // Typing beyond one a second is acknowledged and dropped.
        "typing" if conv.take_typing(app.clock().now_ms()) => append_user(app, conv, &mut a),
        "typing" => format!("{}|typing", conv.id),
        _ => {
            let id = append_user(app, conv, &mut a);
            forward(app, conv, a).await?;
            id
        }
    };
    Ok(id)
}

/// Reads a request body (already bounded by the body-limit layer).
pub async fn read_body(body: axum::body::Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, usize::MAX).await.map_err(|e| {
        // The limit's error sits somewhere down the chain, however the body was framed
        // (`Content-Length` or chunked).
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        let mut too_large = false;
        while let Some(c) = cause {
            too_large |= c.is::<http_body_util::LengthLimitError>();
            cause = c.source();
        }
        if too_large {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "PayloadTooLarge",
                "The activity is larger than the gateway accepts.",
            )
        } else {
            ApiError::bad_request("The request body could not be read.")
        }
    })
}

/// `{"id": ...}` as JSON (clients retry on an empty body).
pub fn id_answer(id: &str) -> Response {
    let mut body = String::with_capacity(id.len() + 10);
    body.push_str("{\"id\":");
    activity::json_str(&mut body, id);
    body.push('}');
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn append_user(app: &AppState, conv: &Conversation, a: &mut Map<String, Value>) -> String {
    let now = app.clock().now_ms();
    let conv_id = conv.id.clone();
    let appended = conv.append(now, 0, |id, ts| activity::stamp(a, id, ts, &conv_id));
    if matches!(conv.bot.engine, Engine::Upstream(_)) {
        activity::mark(a, &appended.id, appended.ts);
    }
    appended.id
}

/// A user message: classified, metered, echoed, answered.
async fn message(
    app: &AppState,
    conv: &Arc<Conversation>,
    mut a: Map<String, Value>,
) -> Result<String, ApiError> {
    let ch = app.channel();
    let topic: Option<&Topic> = match &conv.bot.engine {
        Engine::Builtin(b) => Some(b.classify(activity::text(&a))),
        Engine::Upstream(_) => None,
    };
    // A built-in bot acknowledges files; a message with files is a user turn.
    let files = match &conv.bot.engine {
        Engine::Builtin(b) => activity::attachment_names(&a).map(|names| b.attachment_reply(&names)),
        Engine::Upstream(_) => None,
    };
    // Built-in bots begin a billed session on a user topic; upstream bots on any user message.
    let user_topic = files.is_some() || topic.is_none_or(|t| t.kind == TopicKind::User);
    let turn = ch.metering.begin_turn(&conv.id, &conv.meter, user_topic).await?;
    // A built-in bot always takes the turn: the session is recorded now. An upstream bot's is
    // recorded once the bot accepted the turn.
    let turn = match topic {
        Some(_) => {
            turn.commit().await?;
            None
        }
        None => Some(turn),
    };
    conv.touch(app.clock().now_ms());
    let appended = {
        let now = app.clock().now_ms();
        let conv_id = conv.id.clone();
        conv.append(now, 0, |id, ts| activity::stamp(&a, id, ts, &conv_id))
    };
    if let Some(reply) = files {
        append_replies(app, conv, std::slice::from_ref(&reply), Some(&appended.id), appended.ts);
        // Files without words need no topic.
        if activity::text(&a).trim().is_empty() {
            return Ok(appended.id);
        }
    }
    match topic {
        Some(t) => {
            // Only a topic with a flow needs the conversation's values.
            let input = t.flow.as_ref().map(|_| flow_input(conv, &a, activity::text(&a)));
            answer_topic(app, conv, t, input, Some(&appended.id), appended.ts).await?;
        }
        None => {
            // The bot gets the stored JSON with its `serviceUrl` and `recipient` added, not the
            // map serialized again (a tenth of an upstream message's instructions), unless the
            // client sent fields of those names, which the bot's must replace.
            let out = if a.contains_key("serviceUrl") || a.contains_key("recipient") {
                activity::mark(&mut a, &appended.id, appended.ts);
                Outgoing::Activity(a)
            } else {
                Outgoing::Stamped(appended.json.clone())
            };
            match turn {
                // A bot that never accepted the turn (refused, 5xx, timeout) bills nothing: the
                // error drops the pending session, which gives its unit back. The bot call and
                // the record run in a task of their own, so a client that hangs up after sending
                // cannot have the bot answer a session that is then not billed.
                Some(Turn::Began(pending)) => {
                    let (app, conv, reply_to) = (app.clone(), conv.clone(), appended.id.clone());
                    let ts = appended.ts;
                    tokio::spawn(async move {
                        deliver(&app, &conv, out, Some((&reply_to, ts))).await?;
                        pending.commit().await.map(drop)
                    })
                    .await
                    .map_err(|_| ApiError::internal())??;
                }
                _ => deliver(app, conv, out, Some((&appended.id, appended.ts))).await?,
            }
        }
    }
    Ok(appended.id)
}

/// The bot ends the conversation: its `endOfConversation`, and the billed session closes.
fn end_by_bot(app: &AppState, conv: &Conversation, reply_to: &str, not_before: i64) {
    let bot = conv.bot.clone();
    let conv_id = conv.id.clone();
    conv.append(app.clock().now_ms(), not_before, |id, ts| {
        end_of_conversation(&bot, id, ts, &conv_id, reply_to)
    });
    conv.meter.end_session();
    conv.end();
}

/// A client's `startConversation` event or `conversationUpdate`: echoed; a built-in bot greets
/// (once), an upstream bot receives it. Never billed.
async fn greet_event(
    app: &AppState,
    conv: &Arc<Conversation>,
    mut a: Map<String, Value>,
) -> Result<String, ApiError> {
    let id = append_user(app, conv, &mut a);
    match &conv.bot.engine {
        Engine::Builtin(b) => {
            if let Some(g) = b.greeting()
                && conv.mark_greeted()
            {
                let input = g.flow.as_ref().map(|_| flow_input(conv, &a, ""));
                answer_topic(app, conv, g, input, Some(&id), 0).await?;
            }
        }
        Engine::Upstream(_) => forward(app, conv, a).await?,
    }
    Ok(id)
}

/// The values a flow's body may use: the user's text, ids of the conversation, user and bot.
fn flow_input(conv: &Conversation, a: &Map<String, Value>, text: &str) -> flow::Input {
    let user = a.get("from").and_then(|f| f.get("id")).and_then(Value::as_str).unwrap_or("");
    flow::Input {
        text: text.to_string(),
        conversation_id: conv.id.to_string(),
        user_id: user.to_string(),
        bot_id: conv.bot.id.clone(),
    }
}

/// Answers with a topic: its replies, or, for a topic with a flow, the replies its answer fills
/// (its fallback reply when the flow fails); then ends the conversation if the topic does.
/// `input` is given for a topic with a flow.
async fn answer_topic(
    app: &AppState,
    conv: &Arc<Conversation>,
    topic: &Topic,
    input: Option<flow::Input>,
    reply_to: Option<&str>,
    not_before: i64,
) -> Result<(), ApiError> {
    let ends = topic.ends_conversation();
    let (Some(tf), Some(input)) = (&topic.flow, input) else {
        append_replies(app, conv, &topic.replies, reply_to, not_before);
        if ends && let Some(reply_to) = reply_to {
            end_by_bot(app, conv, reply_to, not_before);
        }
        return Ok(());
    };
    // The flow runs in a task of its own, holding no lock: a hung endpoint delays only this
    // reply (by at most the flow's timeout), and a client that hangs up after sending does not
    // lose the answer to a turn that was already metered.
    let (app, conv, tf) = (app.clone(), conv.clone(), tf.clone());
    let reply_to = reply_to.map(str::to_string);
    tokio::spawn(async move {
        let (outcome, replies) = tf.answer(&app.channel().outbound, &input).await;
        // Counted per bot and billed to nobody: the turn that triggered the flow was metered
        // before it ran. One map lookup for the counters is nothing beside the HTTP call.
        app.metering().counters(&conv.bot.tenant, &conv.bot.id).add_flow_run(outcome);
        append_replies(&app, &conv, &replies, reply_to.as_deref(), not_before);
        if ends && let Some(reply_to) = &reply_to {
            end_by_bot(&app, &conv, reply_to, not_before);
        }
    })
    .await
    .map_err(|e| {
        tracing::error!(error = %e, "A topic flow's task failed.");
        ApiError::internal()
    })
}

fn append_replies(
    app: &AppState,
    conv: &Conversation,
    replies: &[String],
    reply_to: Option<&str>,
    not_before: i64,
) {
    let bot = conv.bot.clone();
    let conv_id = conv.id.clone();
    for text in replies {
        conv.append(app.clock().now_ms(), not_before, |id, ts| {
            bot_message(&bot, id, ts, &conv_id, text, reply_to)
        });
    }
}

/// What happens when a conversation starts: a built-in bot greets; an upstream bot receives a
/// `conversationUpdate` with the members added (failures are logged: the bot may come back).
pub async fn on_start(app: &AppState, conv: &Arc<Conversation>, user: Option<&str>) {
    match &conv.bot.engine {
        Engine::Builtin(b) => {
            if let Some(g) = b.greeting()
                && conv.mark_greeted()
            {
                let input = g.flow.as_ref().map(|_| flow::Input {
                    conversation_id: conv.id.to_string(),
                    user_id: user.unwrap_or_default().to_string(),
                    bot_id: conv.bot.id.clone(),
                    ..flow::Input::default()
                });
                // Only a failed task errs, and it is logged.
                let _ = answer_topic(app, conv, g, input, None, 0).await;
            }
        }
        Engine::Upstream(_) => {
            let user_id = user.unwrap_or("user");
            let update = json!({
                "type": "conversationUpdate",
                "id": format!("{}|start", conv.id),
                "timestamp": crate::clock::rfc3339_ms(app.clock().now_ms()),
                "channelId": activity::CHANNEL_ID,
                "conversation": { "id": &*conv.id },
                "from": { "id": user_id, "role": "user" },
                "membersAdded": [ { "id": conv.bot.id, "name": conv.bot.name }, { "id": user_id } ],
            });
            let Value::Object(update) = update else { return };
            if let Err(e) = deliver(app, conv, Outgoing::Activity(update), None).await {
                tracing::debug!(conversation = %conv.id, error = %e, "The bot did not take the conversation start.");
            }
        }
    }
}

/// Sends a non-message activity to an upstream bot (built-in bots ignore it).
async fn forward(app: &AppState, conv: &Arc<Conversation>, a: Map<String, Value>) -> Result<(), ApiError> {
    if matches!(conv.bot.engine, Engine::Upstream(_)) {
        deliver(app, conv, Outgoing::Activity(a), None).await?;
    }
    Ok(())
}

/// What goes to an upstream bot: an activity to complete and serialize, or the JSON of one the
/// log holds (stamped already), to which the bot's fields are added.
enum Outgoing {
    Activity(Map<String, Value>),
    Stamped(Arc<str>),
}

/// Delivers an activity to the conversation's upstream bot and appends its inline replies.
async fn deliver(
    app: &AppState,
    conv: &Arc<Conversation>,
    out: Outgoing,
    reply_to: Option<(&str, i64)>,
) -> Result<(), ApiError> {
    let Engine::Upstream(up) = &conv.bot.engine else { return Ok(()) };
    let ch = app.channel();
    let service_url = format!("{}/connector/{}", ch.service_base, up.connector_key());
    let body = match out {
        Outgoing::Activity(mut a) => {
            a.insert("serviceUrl".into(), Value::String(service_url));
            a.insert("recipient".into(), json!({ "id": conv.bot.id, "name": conv.bot.name, "role": "bot" }));
            a.entry("channelId").or_insert_with(|| Value::String(activity::CHANNEL_ID.into()));
            a.entry("conversation").or_insert_with(|| json!({ "id": &*conv.id }));
            Bytes::from(serde_json::to_vec(&a).unwrap_or_default())
        }
        Outgoing::Stamped(json) => {
            Bytes::from(activity::for_bot(&json, &service_url, &conv.bot.id, &conv.bot.name))
        }
    };
    let inline = ch.upstream.deliver(up, &conv.bot.id, body).await?;
    for reply in inline {
        if let Value::Object(reply) = reply {
            super::connector::append_bot_activity(app, conv, reply, reply_to.map(|(id, _)| id));
        }
    }
    Ok(())
}
