//! The bots of the caller's tenant: create, read, edit, delete, publish, secrets.
//! Another tenant's bot answers 404: its existence is never revealed.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::store::hint;
use super::{BotChange, bot_exists};
use crate::bots::{Bot, BotControl, secrets};
use crate::config::{BotConfig, BotKind, TopicConfig};
use crate::error::{ApiError, JsonBody};
use crate::licensing::layer::{Author, Principal};
use crate::state::AppState;
use crate::store::control::AuditEntry;

fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "BotNotFound", "Your tenant has no bot with this id.")
}

/// The caller's tenant's bot `id`.
pub fn own_bot(app: &AppState, tenant: &str, id: &str) -> Result<Arc<Bot>, ApiError> {
    app.channel().bots.get(id).filter(|b| b.tenant == tenant).ok_or_else(not_found)
}

/// What a caller wants to do with a bot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read it, its secrets' slots and analytics; open a test chat.
    Read,
    /// Change, publish, delete it, or rotate its secrets.
    Change,
    /// Share it with another author (its owner and tenant admins only).
    Share,
}

/// Whether the caller may see the bot at all: its owner, an author it is shared with, or a
/// tenant admin.
pub fn may_read(p: &Principal, bot: &Bot) -> bool {
    p.identity.is_admin() || bot.is_editor(&p.identity.user)
}

/// The caller's tenant's bot `id`, if the caller may do `access` with it: 404 `BotNotFound`
/// for no such bot (or another tenant's), 403 `NotBotEditor` for a bot that is neither theirs
/// nor shared with them, 409 `ManagedByConfig` for a change to a bot of the configuration file.
pub fn bot_for(app: &AppState, p: &Principal, id: &str, access: Access) -> Result<Arc<Bot>, ApiError> {
    let bot = own_bot(app, &p.identity.tenant, id)?;
    let allowed = match access {
        Access::Read | Access::Change => may_read(p, &bot),
        Access::Share => p.identity.is_admin() || bot.owner.as_deref() == Some(p.identity.user.as_str()),
    };
    if !allowed {
        let owner = bot.owner.as_deref().map_or_else(|| "no author".to_string(), |o| format!("`{o}`"));
        let message = if access == Access::Share {
            format!("Only the bot's owner ({owner}) or a tenant admin can share it.")
        } else {
            format!(
                "This bot belongs to {owner} and is not shared with you. Its owner or a tenant admin can share it (PUT /api/v1/bots/{id}/editors/{{you}})."
            )
        };
        return Err(ApiError::new(StatusCode::FORBIDDEN, "NotBotEditor", message));
    }
    if access != Access::Read && bot.configured {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "ManagedByConfig",
            "This bot is defined in the gateway's configuration file, which manages it (sharing included): change it there and restart.",
        ));
    }
    Ok(bot)
}

/// The JSON view of a bot.
pub fn view(bot: &Bot) -> Value {
    let mut v = serde_json::to_value(&bot.definition).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("published".into(), Value::Bool(bot.control.published()));
        m.insert("secured_access".into(), Value::Bool(bot.control.secured_access()));
        m.insert("owner".into(), json!(bot.owner));
        m.insert("editors".into(), json!(bot.editors));
        m.insert("managed_by_config".into(), Value::Bool(bot.configured));
    }
    v
}

fn audit(
    app: &AppState,
    tenant: &str,
    actor: &str,
    action: &str,
    target: &str,
    before: Option<Value>,
    after: Option<Value>,
) -> AuditEntry {
    AuditEntry {
        seq: 0,
        tenant: tenant.into(),
        at_ms: app.clock().now_ms(),
        actor: actor.into(),
        action: action.into(),
        target: target.into(),
        before: before.map(|v| v.to_string()),
        after: after.map(|v| v.to_string()),
    }
}

/// `GET /api/v1/bots`.
#[utoipa::path(get, path = "/api/v1/bots", tag = "authoring", responses((status = 200, description = "The bots the caller may reach", body = serde_json::Value)))]
pub async fn list(State(app): State<AppState>, Author(p, _): Author) -> Response {
    let mut bots: Vec<Arc<Bot>> = app
        .channel()
        .bots
        .all()
        .into_iter()
        .filter(|b| b.tenant == p.identity.tenant && may_read(&p, b))
        .collect();
    bots.sort_by(|a, b| a.id.cmp(&b.id));
    Json(json!({ "bots": bots.iter().map(|b| view(b)).collect::<Vec<_>>() })).into_response()
}

/// A new bot.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewBot {
    /// The bot id, used in URLs (default: a random `bot-...`).
    #[schema(pattern = "^[A-Za-z0-9_.-]{1,64}$")]
    id: Option<String>,
    /// A display name, also the `from.name` of its replies.
    #[schema(min_length = 1)]
    name: String,
    kind: BotKind,
    #[serde(default)]
    endpoint: String,
    #[serde(default)]
    topics: Vec<TopicConfig>,
    #[serde(default)]
    secured_access: bool,
    allowed_origins: Option<Vec<String>>,
    /// A built-in bot's reply to files (`{{names}}`, `{{count}}`).
    attachment_reply: Option<String>,
}

fn validate(app: &AppState, def: &BotConfig) -> Result<(), ApiError> {
    def.validate("bot").map_err(|e| {
        let key = e.key.trim_start_matches("bot.");
        let message = format!("`{key}`: {}.", e.problem);
        // A topic's flow (or its fallback reply) has a code of its own, for authoring tools.
        if key.contains(".flow") || key.ends_with(".fallback_reply") {
            ApiError::new(StatusCode::BAD_REQUEST, "InvalidFlow", message)
        } else {
            ApiError::bad_request(message)
        }
    })?;
    let policy = app.channel().outbound.policy();
    let not_allowed = |key: &str, why: String| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "EndpointNotAllowed",
            format!("`{key}`: the gateway cannot call it: {why}."),
        )
    };
    if def.kind == BotKind::Upstream
        && let Err(why) = policy.check_url(&def.endpoint)
    {
        return Err(not_allowed("endpoint", why));
    }
    for (key, url) in def.flow_urls("bot") {
        if let Err(why) = policy.check_url(url) {
            return Err(not_allowed(key.trim_start_matches("bot."), why));
        }
    }
    Ok(())
}

/// `POST /api/v1/bots`: creates an unpublished bot with two fresh channel secrets, shown once.
#[utoipa::path(post, path = "/api/v1/bots", tag = "authoring", request_body = NewBot, responses((status = 201, description = "The bot and its two secrets, shown once", body = serde_json::Value)))]
pub async fn create(
    State(app): State<AppState>,
    Author(p, _): Author,
    JsonBody(body): JsonBody<NewBot>,
) -> Result<Response, ApiError> {
    let id = body.id.unwrap_or_else(|| {
        format!("bot-{}", secrets::random_id(6).to_ascii_lowercase().replace(['-', '_'], "x"))
    });
    let def = BotConfig {
        id: id.clone(),
        tenant: p.identity.tenant.clone(),
        name: body.name,
        published: false,
        secured_access: body.secured_access,
        allowed_origins: body.allowed_origins.unwrap_or_else(|| vec!["*".into()]),
        channel_secrets: vec![],
        kind: body.kind,
        endpoint: body.endpoint,
        topics: body.topics,
        owner: None,
        attachment_reply: body.attachment_reply,
    };
    validate(&app, &def)?;
    // Held until the bot is in the registry: a concurrent create of the same id gets 409.
    let Some(_reservation) = app.authoring().reserve(&id) else { return Err(bot_exists()) };
    if app.channel().bots.get(&id).is_some() {
        return Err(bot_exists());
    }
    let max = app.config().upstream.max_concurrency_per_bot;
    let bot = Arc::new(Bot::with_control(
        &def,
        secrets::random_id(24),
        max,
        Arc::new(BotControl::with_instance(&secrets::random_id(12))),
        Some(p.identity.user.clone()),
    ));
    let fresh = [secrets::generate(), secrets::generate()];
    for (i, s) in fresh.iter().enumerate() {
        bot.control.set_secret(i as u8 + 1, secrets::hash(s));
        app.authoring().set_hint(&id, i as u8 + 1, hint(s));
    }
    let a = audit(&app, &p.identity.tenant, &p.identity.user, "bot.create", &id, None, Some(view(&bot)));
    app.authoring().save(app.store(), &bot, BotChange::Create, a).await?;
    app.channel().bots.insert(bot.clone());
    let _ = app.metering().counters(&bot.tenant, &bot.id);
    Ok((StatusCode::CREATED, Json(json!({ "bot": view(&bot), "secrets": fresh }))).into_response())
}

/// `GET /api/v1/bots/{botId}`.
#[utoipa::path(get, path = "/api/v1/bots/{bot_id}", tag = "authoring", params(("bot_id" = String, Path, description = "The bot id")), responses((status = 200, description = "The bot", body = serde_json::Value)))]
pub async fn get(
    State(app): State<AppState>,
    Author(p, _): Author,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let bot = bot_for(&app, &p, &id, Access::Read)?;
    Ok(Json(view(&bot)).into_response())
}

/// A change to a bot; absent fields stay.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BotPatch {
    name: Option<String>,
    endpoint: Option<String>,
    topics: Option<Vec<TopicConfig>>,
    secured_access: Option<bool>,
    allowed_origins: Option<Vec<String>>,
    /// A built-in bot's reply to files (`{{names}}`, `{{count}}`).
    attachment_reply: Option<String>,
}

/// `PATCH /api/v1/bots/{botId}`: edits the definition, secured access and origins.
#[utoipa::path(patch, path = "/api/v1/bots/{bot_id}", tag = "authoring", params(("bot_id" = String, Path, description = "The bot id")), request_body = BotPatch, responses((status = 200, description = "The changed bot", body = serde_json::Value)))]
pub async fn patch(
    State(app): State<AppState>,
    Author(p, _): Author,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<BotPatch>,
) -> Result<Response, ApiError> {
    let old = bot_for(&app, &p, &id, Access::Change)?;
    let mut def = old.definition.clone();
    if let Some(n) = body.name {
        def.name = n;
    }
    if let Some(e) = body.endpoint {
        def.endpoint = e;
    }
    if let Some(t) = body.topics {
        def.topics = t;
    }
    if let Some(o) = body.allowed_origins {
        def.allowed_origins = o;
    }
    if let Some(r) = body.attachment_reply {
        def.attachment_reply = Some(r);
    }
    validate(&app, &def)?;
    let key = old.connector_key().map_or_else(|| secrets::random_id(24), str::to_string);
    let max = app.config().upstream.max_concurrency_per_bot;
    let bot = Arc::new(
        Bot::with_control(&def, key, max, old.control.clone(), old.owner.clone())
            .with_editors(old.editors.clone()),
    );
    let before = view(&old);
    if let Some(s) = body.secured_access {
        bot.control.set_secured_access(s);
    }
    let a =
        audit(&app, &p.identity.tenant, &p.identity.user, "bot.update", &id, Some(before), Some(view(&bot)));
    if let Err(e) = app.authoring().save(app.store(), &bot, BotChange::Update, a).await {
        // The control block is shared: undo the access change that was not saved.
        old.control.set_secured_access(old.definition.secured_access);
        return Err(e);
    }
    app.channel().bots.insert(bot.clone());
    Ok(Json(view(&bot)).into_response())
}

/// `DELETE /api/v1/bots/{botId}`: the bot stops serving at once.
#[utoipa::path(delete, path = "/api/v1/bots/{bot_id}", tag = "authoring", params(("bot_id" = String, Path, description = "The bot id")), responses((status = 204, description = "The bot is deleted")))]
pub async fn delete(
    State(app): State<AppState>,
    Author(p, _): Author,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let bot = bot_for(&app, &p, &id, Access::Change)?;
    let a = audit(&app, &p.identity.tenant, &p.identity.user, "bot.delete", &id, Some(view(&bot)), None);
    app.authoring().save(app.store(), &bot, BotChange::Delete, a).await?;
    bot.control.set_published(false);
    app.channel().bots.remove(&id);
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn set_published(app: &AppState, p: &Principal, id: &str, on: bool) -> Result<Response, ApiError> {
    let bot = bot_for(app, p, id, Access::Change)?;
    let was = bot.control.published();
    bot.control.set_published(on);
    let action = if on { "bot.publish" } else { "bot.unpublish" };
    let a = audit(
        app,
        &p.identity.tenant,
        &p.identity.user,
        action,
        id,
        Some(json!({"published": was})),
        Some(json!({"published": on})),
    );
    if let Err(e) = app.authoring().save(app.store(), &bot, BotChange::Update, a).await {
        bot.control.set_published(was);
        return Err(e);
    }
    Ok(Json(view(&bot)).into_response())
}

/// `POST /api/v1/bots/{botId}/publish`.
#[utoipa::path(post, path = "/api/v1/bots/{bot_id}/publish", tag = "authoring", params(("bot_id" = String, Path, description = "The bot id")), responses((status = 200, description = "The bot", body = serde_json::Value)))]
pub async fn publish(
    State(app): State<AppState>,
    Author(p, _): Author,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    set_published(&app, &p, &id, true).await
}

/// `POST /api/v1/bots/{botId}/unpublish`.
#[utoipa::path(post, path = "/api/v1/bots/{bot_id}/unpublish", tag = "authoring", params(("bot_id" = String, Path, description = "The bot id")), responses((status = 200, description = "The bot", body = serde_json::Value)))]
pub async fn unpublish(
    State(app): State<AppState>,
    Author(p, _): Author,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    set_published(&app, &p, &id, false).await
}

/// `GET /api/v1/bots/{botId}/secrets`: which slots hold a secret (values are shown only when
/// made: they are kept hashed).
#[utoipa::path(get, path = "/api/v1/bots/{bot_id}/secrets", tag = "authoring", params(("bot_id" = String, Path, description = "The bot id")), responses((status = 200, description = "The two secret slots", body = serde_json::Value)))]
pub async fn list_secrets(
    State(app): State<AppState>,
    Author(p, _): Author,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let bot = bot_for(&app, &p, &id, Access::Read)?;
    let hashes = bot.control.hashes();
    let hints = app.authoring().hints(&id);
    let slots: Vec<Value> = (0..2)
        .map(|i| {
            json!({
                "slot": i + 1,
                "set": hashes[i].is_some(),
                "hint": hints[i],
                "generation": bot.control.generation(i as u8 + 1),
            })
        })
        .collect();
    Ok(Json(json!({ "secrets": slots })).into_response())
}

/// `POST /api/v1/bots/{botId}/secrets/{slot}/regenerate`: a new secret in slot 1 or 2; tokens
/// made from the old one stop working, the other slot keeps serving.
#[utoipa::path(post, path = "/api/v1/bots/{bot_id}/secrets/{slot}/regenerate", tag = "authoring", params(("bot_id" = String, Path, description = "The bot id"), ("slot" = SecretSlot, Path, description = "1 or 2")), responses((status = 200, description = "The new secret, shown once", body = serde_json::Value)))]
pub async fn regenerate(
    State(app): State<AppState>,
    Author(p, _): Author,
    Path((id, slot)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let slot: u8 = match slot.as_str() {
        "1" => 1,
        "2" => 2,
        _ => return Err(ApiError::bad_request("The secret slot is 1 or 2.")),
    };
    let bot = bot_for(&app, &p, &id, Access::Change)?;
    let secret = secrets::generate();
    let before = json!({"slot": slot, "generation": bot.control.generation(slot)});
    app.channel().bots.set_secret(&bot, slot, secrets::hash(&secret));
    app.authoring().set_hint(&id, slot, hint(&secret));
    let after = json!({"slot": slot, "generation": bot.control.generation(slot)});
    let a = audit(
        &app,
        &p.identity.tenant,
        &p.identity.user,
        "bot.secret_regenerate",
        &id,
        Some(before),
        Some(after),
    );
    app.authoring().save(app.store(), &bot, BotChange::Update, a).await?;
    Ok(Json(json!({ "slot": slot, "secret": secret, "generation": bot.control.generation(slot) }))
        .into_response())
}

/// A secret slot in a path: `1` or `2`.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code)]
pub enum SecretSlot {
    /// The first slot.
    #[serde(rename = "1")]
    One,
    /// The second slot.
    #[serde(rename = "2")]
    Two,
}

/// At most this many authors share one bot.
pub const MAX_EDITORS: usize = 64;

/// `PUT /api/v1/bots/{botId}/editors/{userId}`: shares the bot with another author of the
/// tenant (the owner and tenant admins only). Sharing with the owner or a current editor
/// changes nothing.
#[utoipa::path(put, path = "/api/v1/bots/{bot_id}/editors/{user_id}", tag = "authoring", params(("bot_id" = String, Path, description = "The bot id"), ("user_id" = String, Path, description = "The author to share with")), responses((status = 200, description = "The bot", body = serde_json::Value)))]
pub async fn add_editor(
    State(app): State<AppState>,
    Author(p, _): Author,
    Path((id, user)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    share(&app, &p, &id, &user, true).await
}

/// `DELETE /api/v1/bots/{botId}/editors/{userId}`: the author no longer reaches the bot.
#[utoipa::path(delete, path = "/api/v1/bots/{bot_id}/editors/{user_id}", tag = "authoring", params(("bot_id" = String, Path, description = "The bot id"), ("user_id" = String, Path, description = "The author")), responses((status = 204, description = "No longer shared")))]
pub async fn remove_editor(
    State(app): State<AppState>,
    Author(p, _): Author,
    Path((id, user)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    share(&app, &p, &id, &user, false).await
}

async fn share(app: &AppState, p: &Principal, id: &str, user: &str, add: bool) -> Result<Response, ApiError> {
    if user.is_empty() || user.len() > 256 {
        return Err(ApiError::bad_request("The user id must be 1 to 256 characters."));
    }
    let old = bot_for(app, p, id, Access::Share)?;
    let mut editors = old.editors.clone();
    let present = editors.iter().any(|e| e == user);
    if add {
        if present || old.owner.as_deref() == Some(user) {
            return Ok(Json(view(&old)).into_response());
        }
        if editors.len() >= MAX_EDITORS {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "TooManyEditors",
                format!("A bot can be shared with at most {MAX_EDITORS} authors. Remove one first."),
            ));
        }
        editors.push(user.to_string());
    } else {
        if !present {
            return Err(ApiError::not_found(format!("The bot is not shared with `{user}`.")));
        }
        editors.retain(|e| e != user);
    }
    let key = old.connector_key().map_or_else(|| secrets::random_id(24), str::to_string);
    let max = app.config().upstream.max_concurrency_per_bot;
    let bot = Arc::new(
        Bot::with_control(&old.definition, key, max, old.control.clone(), old.owner.clone())
            .with_editors(editors),
    );
    let (action, before, after) = if add {
        ("bot.share", None, Some(json!({"editor": user})))
    } else {
        ("bot.unshare", Some(json!({"editor": user})), None)
    };
    let a = audit(app, &p.identity.tenant, &p.identity.user, action, id, before, after);
    app.authoring().save(app.store(), &bot, BotChange::Update, a).await?;
    app.channel().bots.insert(bot.clone());
    if add { Ok(Json(view(&bot)).into_response()) } else { Ok(StatusCode::NO_CONTENT.into_response()) }
}
