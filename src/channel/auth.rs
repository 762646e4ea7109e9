//! Channel credentials: a channel secret or a token, from `Authorization: Bearer` (or the
//! `t` query parameter of a stream URL), checked without I/O.

use std::sync::Arc;

use http::{HeaderMap, StatusCode, header};

use super::Channel;
use super::token::{Claims, TOKEN_PREFIX, TokenError};
use crate::bots::Bot;
use crate::conversation::Conversation;
use crate::error::ApiError;

/// A checked credential.
pub enum Credential {
    /// A token; its bot was checked to be published and its secret generation current.
    Token(Arc<Claims>),
    /// A channel secret of `bot` (slot 1 or 2).
    Secret {
        /// The bot.
        bot: Arc<Bot>,
        /// The slot.
        slot: u8,
    },
}

impl Credential {
    /// The bot id it is for.
    pub fn bot_id(&self) -> &str {
        match self {
            Credential::Token(c) => &c.bot,
            Credential::Secret { bot, .. } => &bot.id,
        }
    }
}

fn forbidden(code: &'static str, message: &'static str) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, code, message)
}

/// The bearer value of the Authorization header.
pub fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers.get(header::AUTHORIZATION).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "MissingAuthorization",
            "Send `Authorization: Bearer <channel secret or token>`.",
        )
    })?;
    crate::identity::bearer_value(value).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "MalformedAuthorization",
            "The Authorization header must be `Bearer <channel secret or token>`.",
        )
    })
}

/// Checks a bearer value: a token (signature, expiry) or a channel secret.
pub fn check(channel: &Channel, value: &str, now_secs: i64) -> Result<Credential, ApiError> {
    if value.starts_with(TOKEN_PREFIX) {
        let claims = channel.signer.verify(value, now_secs).map_err(|e| match e {
            TokenError::Expired => forbidden("TokenExpired", "The token has expired. Get a new token."),
            TokenError::Invalid => forbidden("InvalidToken", "The token is not valid for this gateway."),
        })?;
        return Ok(Credential::Token(Arc::new(claims)));
    }
    let (bot, slot) = channel.bots.by_secret(value).ok_or_else(|| {
        // Secrets are base64url without dots; a dotted value is someone's token (another
        // service's, or one of ours cut short).
        if value.contains('.') {
            forbidden(
                "InvalidToken",
                "The token is not a token of this gateway, or it is cut short. Get a new token.",
            )
        } else {
            forbidden("InvalidSecret", "The channel secret is not valid.")
        }
    })?;
    Ok(Credential::Secret { bot, slot })
}

/// Checks that the bot serves bot users, and that a token's secret was not regenerated since
/// and that an open-bot token is not used after secured access was switched on.
pub fn check_bot(bot: &Bot, cred: &Credential) -> Result<(), ApiError> {
    // The authoring test chat reaches unpublished bots: authors test before they publish.
    let test_chat = matches!(cred, Credential::Token(c) if c.test_chat);
    if !bot.control.published() && !test_chat {
        return Err(forbidden("BotNotPublished", "This bot is not published."));
    }
    if let Credential::Token(c) = cred {
        if c.instance != bot.control.instance() {
            // A token of a deleted bot whose id was taken again (in this or another tenant).
            return Err(forbidden("BotNotFound", "There is no bot with this id."));
        }
        if c.slot == 0 && bot.control.secured_access() && !c.test_chat {
            return Err(forbidden(
                "SecuredAccessRequired",
                "This bot requires a channel secret, or a token made from one.",
            ));
        }
        if c.slot != 0 && bot.control.generation(c.slot) != c.generation {
            return Err(forbidden(
                "InvalidToken",
                "The channel secret this token was made from has been regenerated. Get a new token.",
            ));
        }
    }
    Ok(())
}

/// Checks that a credential may act on `conv`: a token only on its own conversation, a secret
/// only on its bot's conversations.
pub fn check_conversation(cred: &Credential, conv: &Conversation) -> Result<(), ApiError> {
    let ok = match cred {
        Credential::Token(c) => c.conversation.as_str() == &*conv.id && c.bot == conv.bot.id,
        Credential::Secret { bot, .. } => bot.id == conv.bot.id,
    };
    if ok {
        Ok(())
    } else {
        Err(forbidden("WrongConversation", "This credential is not valid for this conversation."))
    }
}

/// A token made with trusted origins works only from them: a request must carry one of them as
/// its `Origin` (a request without one is refused too).
fn check_trusted(headers: &HeaderMap, cred: Option<&Credential>) -> Result<(), ApiError> {
    let Some(Credential::Token(c)) = cred else { return Ok(()) };
    if c.origins.is_empty() {
        return Ok(());
    }
    let origin = headers.get(header::ORIGIN).map(|o| o.as_bytes());
    if origin.is_some_and(|o| c.origins.iter().any(|t| t.as_bytes().eq_ignore_ascii_case(o))) {
        Ok(())
    } else {
        Err(forbidden(
            "OriginNotAllowed",
            "This token works only from the origins it was made for (`trustedOrigins`).",
        ))
    }
}

/// Checks a browser's `Origin` against the bot's allowed origins (requests without an Origin
/// are not from a browser page and pass).
///
/// With the credential in hand (`cred`), a token made with trusted origins is also held to them.
pub fn check_origin(headers: &HeaderMap, bot: &Bot, cred: Option<&Credential>) -> Result<(), ApiError> {
    match headers.get(header::ORIGIN) {
        Some(origin) if !bot.origin_allowed(origin.as_bytes()) => Err(forbidden(
            "OriginNotAllowed",
            "This website's origin is not allowed to use this bot. The bot's author can allow it.",
        )),
        _ => check_trusted(headers, cred),
    }
}
