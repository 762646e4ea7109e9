//! Activities: parsing what a client posts, stamping it, and building the bot's replies.

use serde_json::{Map, Value, json};

use crate::bots::Bot;
use crate::clock::{Millis, rfc3339_ms};
use crate::error::ApiError;

/// The `channelId` of every activity.
pub const CHANNEL_ID: &str = "directline";

/// Parses a posted activity: a JSON object with a string `type`.
pub fn parse(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("The body is not valid JSON: {e}.")))?;
    let Value::Object(map) = value else {
        return Err(ApiError::bad_request("An activity is a JSON object."));
    };
    match map.get("type") {
        Some(Value::String(t)) if !t.is_empty() => Ok(map),
        _ => Err(ApiError::bad_request("An activity needs a `type`, such as \"message\".")),
    }
}

/// The activity's `type`.
pub fn kind(a: &Map<String, Value>) -> &str {
    a.get("type").and_then(Value::as_str).unwrap_or("")
}

/// The activity's `text` (empty when absent).
pub fn text(a: &Map<String, Value>) -> &str {
    a.get("text").and_then(Value::as_str).unwrap_or("")
}

/// The activity's `name` (events).
pub fn name(a: &Map<String, Value>) -> &str {
    a.get("name").and_then(Value::as_str).unwrap_or("")
}

/// Sets the user identity: a token's user id overrides `from.id`; without one, `from.id` is
/// required. Keeps every other field the client sent.
pub fn set_user(a: &mut Map<String, Value>, token_user: Option<&str>) -> Result<(), ApiError> {
    let from = a.entry("from").or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(from) = from else {
        return Err(ApiError::bad_request("`from` must be an object with an `id`."));
    };
    match token_user {
        Some(user) => {
            from.insert("id".into(), Value::String(user.to_string()));
        }
        None => match from.get("id") {
            Some(Value::String(id)) if !id.is_empty() => {}
            _ => return Err(ApiError::bad_request("The activity needs `from.id` (the user's id).")),
        },
    }
    from.entry("role").or_insert_with(|| Value::String("user".into()));
    Ok(())
}

/// Stamps id, timestamp, channel and conversation on an activity, and serializes it.
pub fn stamp(a: &mut Map<String, Value>, id: &str, ts: Millis, conversation: &str) -> String {
    a.insert("id".into(), Value::String(id.to_string()));
    a.insert("timestamp".into(), Value::String(rfc3339_ms(ts)));
    a.insert("channelId".into(), Value::String(CHANNEL_ID.into()));
    a.insert("conversation".into(), json!({ "id": conversation }));
    serde_json::to_string(a).unwrap_or_default()
}

/// The JSON of a built-in bot's message.
pub fn bot_message(
    bot: &Bot,
    id: &str,
    ts: Millis,
    conversation: &str,
    text: &str,
    reply_to: Option<&str>,
) -> String {
    let mut v = json!({
        "type": "message",
        "id": id,
        "timestamp": rfc3339_ms(ts),
        "channelId": CHANNEL_ID,
        "conversation": { "id": conversation },
        "from": { "id": bot.id, "name": bot.name, "role": "bot" },
        "text": text,
    });
    if let (Some(r), Value::Object(m)) = (reply_to, &mut v) {
        m.insert("replyToId".into(), Value::String(r.to_string()));
    }
    v.to_string()
}

/// The JSON of the bot's `endOfConversation` activity.
pub fn end_of_conversation(bot: &Bot, id: &str, ts: Millis, conversation: &str, reply_to: &str) -> String {
    json!({
        "type": "endOfConversation",
        "id": id,
        "timestamp": rfc3339_ms(ts),
        "channelId": CHANNEL_ID,
        "conversation": { "id": conversation },
        "from": { "id": bot.id, "name": bot.name, "role": "bot" },
        "replyToId": reply_to,
        "code": "completedSuccessfully",
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_refuses_what_is_not_an_activity() {
        assert_eq!(parse(b"{").unwrap_err().code, "BadRequest");
        assert_eq!(parse(b"[]").unwrap_err().code, "BadRequest");
        assert_eq!(parse(br#"{"text":"x"}"#).unwrap_err().code, "BadRequest");
        assert!(parse(br#"{"type":"message"}"#).is_ok());
    }

    #[test]
    fn stamping_keeps_client_fields_and_token_user_wins() {
        let mut a =
            parse(br#"{"type":"message","from":{"id":"me"},"channelData":{"clientActivityID":"c1"}}"#)
                .unwrap();
        set_user(&mut a, Some("dl_tok")).unwrap();
        let json = stamp(&mut a, "conv|0000001", 0, "conv");
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["from"]["id"], "dl_tok");
        assert_eq!(v["channelData"]["clientActivityID"], "c1");
        assert_eq!(v["timestamp"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["conversation"]["id"], "conv");
        let mut no_from = parse(br#"{"type":"message"}"#).unwrap();
        assert!(set_user(&mut no_from, None).is_err());
    }
}
