//! Activities: parsing what a client posts, stamping it, and building the bot's replies.

use serde_json::{Map, Value};

use crate::bots::Bot;
use crate::clock::{Millis, push_rfc3339_ms, rfc3339_ms};
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
        Some(Value::String(t)) if !t.is_empty() => {}
        _ => return Err(ApiError::bad_request("An activity needs a `type`, such as \"message\".")),
    }
    check_schema(&map)?;
    Ok(map)
}

/// Fields of an activity that the Bot Framework schema defines as strings.
const STRING_FIELDS: &[&str] = &[
    "text",
    "locale",
    "textFormat",
    "name",
    "speak",
    "inputHint",
    "summary",
    "replyToId",
    "attachmentLayout",
    "localTimezone",
    "valueType",
];

/// Fields the schema defines as arrays of objects.
const OBJECT_ARRAY_FIELDS: &[&str] = &["attachments", "entities", "membersAdded", "membersRemoved"];

/// Checks the field types a posted activity may carry as the Bot Framework schema defines them
/// (bots and Web Chat rely on them): a client's mistake is a 400 that names the field, never
/// something stored for a bot to trip over.
///
/// One pass over the activity's fields (a message has a handful), not a lookup per schema field:
/// the lookups were 4% of a message's instructions (callgrind, `benches/instructions.sh`).
fn check_schema(a: &Map<String, Value>) -> Result<(), ApiError> {
    let wrong = |field: &str, what: &str| ApiError::bad_request(format!("`{field}` must be {what}."));
    for (k, v) in a {
        let k = k.as_str();
        if v.is_null() && k != "from" {
            continue;
        }
        if STRING_FIELDS.contains(&k) {
            if !v.is_string() {
                return Err(wrong(k, "a string"));
            }
        } else if OBJECT_ARRAY_FIELDS.contains(&k) {
            if !v.as_array().is_some_and(|items| items.iter().all(Value::is_object)) {
                return Err(wrong(k, "an array of objects"));
            }
        } else if matches!(k, "suggestedActions" | "conversation" | "recipient") {
            if !v.is_object() {
                return Err(wrong(k, "an object"));
            }
        } else if k == "from" {
            let Value::Object(from) = v else { return Err(wrong("from", "an object with an `id`")) };
            for f in ["id", "name", "role"] {
                if from.get(f).is_some_and(|v| !v.is_string()) {
                    return Err(wrong(&format!("from.{f}"), "a string"));
                }
            }
        }
    }
    Ok(())
}

/// Checks an activity a bot sent (an upstream bot's inline answer): a `type`, the schema's
/// field types, and no `from` claiming the user's role.
pub fn check_bot_activity(a: &Map<String, Value>) -> Result<(), ApiError> {
    match a.get("type") {
        Some(Value::String(t)) if !t.is_empty() => {}
        _ => return Err(ApiError::bad_request("An activity needs a `type`.")),
    }
    check_schema(a)?;
    if a.get("from").and_then(|f| f.get("role")).and_then(Value::as_str) == Some("user") {
        return Err(ApiError::bad_request("A bot's activity cannot come from the user."));
    }
    Ok(())
}

/// The activity's `type`.
pub fn kind(a: &Map<String, Value>) -> &str {
    a.get("type").and_then(Value::as_str).unwrap_or("")
}

/// The activity's `text` (empty when absent).
pub fn text(a: &Map<String, Value>) -> &str {
    a.get("text").and_then(Value::as_str).unwrap_or("")
}

/// The names of the files the activity carries (attachments with a `contentUrl`: a file's name,
/// else its content type), or `None` when it carries none. Cards are not files.
pub fn attachment_names(a: &Map<String, Value>) -> Option<Vec<&str>> {
    let names: Vec<&str> = a
        .get("attachments")?
        .as_array()?
        .iter()
        .filter(|x| x.get("contentUrl").is_some_and(Value::is_string))
        .map(|x| {
            x.get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .or_else(|| x.get("contentType").and_then(Value::as_str))
                .unwrap_or("a file")
        })
        .collect();
    (!names.is_empty()).then_some(names)
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

/// The stored JSON of an activity: the client's fields with the gateway's id, timestamp,
/// channel and conversation (those four from the client are replaced).
///
/// Written field by field instead of inserting the four into the map and serializing it: the
/// inserts and the map's serialization were a tenth of a message's instructions (callgrind,
/// `benches/instructions.sh`). The map is left as it was; [`mark`] adds the id and timestamp
/// where an upstream bot is to receive it.
pub fn stamp(a: &Map<String, Value>, id: &str, ts: Millis, conversation: &str) -> String {
    let mut out = String::with_capacity(256);
    out.push_str("{\"id\":");
    json_str(&mut out, id);
    out.push_str(",\"timestamp\":\"");
    push_rfc3339_ms(&mut out, ts);
    out.push_str("\",\"channelId\":\"");
    out.push_str(CHANNEL_ID);
    out.push_str("\",\"conversation\":{\"id\":");
    json_str(&mut out, conversation);
    out.push('}');
    for (k, v) in a {
        if matches!(k.as_str(), "id" | "timestamp" | "channelId" | "conversation") {
            continue;
        }
        out.push(',');
        json_str(&mut out, k);
        out.push(':');
        match v {
            Value::String(s) => json_str(&mut out, s),
            other => out.push_str(&serde_json::to_string(other).unwrap_or_else(|_| "null".into())),
        }
    }
    out.push('}');
    out
}

/// The JSON an upstream bot receives for a stamped activity (`stamped`, an object written by
/// [`stamp`] from a map with no `serviceUrl` or `recipient`): the same fields, then the
/// callback's `serviceUrl` and the bot as `recipient`.
pub fn for_bot(stamped: &str, service_url: &str, bot_id: &str, bot_name: &str) -> String {
    let head = stamped.strip_suffix('}').unwrap_or(stamped);
    let mut out =
        String::with_capacity(stamped.len() + service_url.len() + bot_id.len() + bot_name.len() + 64);
    out.push_str(head);
    out.push_str(",\"serviceUrl\":");
    json_str(&mut out, service_url);
    out.push_str(",\"recipient\":{\"id\":");
    json_str(&mut out, bot_id);
    out.push_str(",\"name\":");
    json_str(&mut out, bot_name);
    out.push_str(",\"role\":\"bot\"}}");
    out
}

/// Adds the gateway's id and timestamp to an activity an upstream bot is to receive.
pub fn mark(a: &mut Map<String, Value>, id: &str, ts: Millis) {
    a.insert("id".into(), Value::String(id.to_string()));
    a.insert("timestamp".into(), Value::String(rfc3339_ms(ts)));
}

/// The JSON of a built-in bot's message.
///
/// Written directly rather than through a `serde_json::Value` (which allocates a map and a
/// string per field): every built-in reply goes through here.
pub fn bot_message(
    bot: &Bot,
    id: &str,
    ts: Millis,
    conversation: &str,
    text: &str,
    reply_to: Option<&str>,
) -> String {
    let mut out = String::with_capacity(200 + text.len() + bot.name.len());
    bot_activity(&mut out, "message", bot, id, ts, conversation, reply_to);
    out.push_str(",\"text\":");
    json_str(&mut out, text);
    out.push('}');
    out
}

/// The JSON of the bot's `endOfConversation` activity.
pub fn end_of_conversation(bot: &Bot, id: &str, ts: Millis, conversation: &str, reply_to: &str) -> String {
    let mut out = String::with_capacity(240);
    bot_activity(&mut out, "endOfConversation", bot, id, ts, conversation, Some(reply_to));
    out.push_str(",\"code\":\"completedSuccessfully\"}");
    out
}

/// The fields every activity from a built-in bot has, as an unclosed JSON object.
fn bot_activity(
    out: &mut String,
    kind: &str,
    bot: &Bot,
    id: &str,
    ts: Millis,
    conversation: &str,
    reply_to: Option<&str>,
) {
    out.push_str("{\"type\":");
    json_str(out, kind);
    out.push_str(",\"id\":");
    json_str(out, id);
    out.push_str(",\"timestamp\":\"");
    push_rfc3339_ms(out, ts);
    out.push_str("\",\"channelId\":\"");
    out.push_str(CHANNEL_ID);
    out.push_str("\",\"conversation\":{\"id\":");
    json_str(out, conversation);
    out.push_str("},\"from\":{\"id\":");
    json_str(out, &bot.id);
    out.push_str(",\"name\":");
    json_str(out, &bot.name);
    out.push_str(",\"role\":\"bot\"}");
    if let Some(r) = reply_to {
        out.push_str(",\"replyToId\":");
        json_str(out, r);
    }
}

/// Appends `s` as a JSON string literal.
///
/// Scans bytes, not chars: every byte that needs escaping is ASCII, and bytes of multi-byte
/// characters never are, so slicing at an escaped byte always falls on a char boundary. (The
/// char-by-char loop this replaced decoded every character; the string writing was about 5% of
/// a message's instructions in a callgrind profile.)
pub fn json_str(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // Most strings need no escape: tell so 16 bytes at a time, with no branch per byte (the
    // loop below cost about 5 instructions a byte; this, under one, and then one copy).
    let clean = s
        .as_bytes()
        .chunks(16)
        .all(|c| !c.iter().fold(false, |acc, &b| acc | (b < 0x20) | (b == b'"') | (b == b'\\')));
    if clean {
        out.reserve(s.len() + 2);
        out.push('"');
        out.push_str(s);
        out.push('"');
        return;
    }
    out.push('"');
    let mut start = 0;
    for (i, &b) in s.as_bytes().iter().enumerate() {
        let esc = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => {
                out.push_str(&s[start..i]);
                out.push_str("\\u00");
                out.push(HEX[usize::from(b >> 4)] as char);
                out.push(HEX[usize::from(b & 0xf)] as char);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.push_str(&s[start..i]);
        out.push_str(esc);
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn field_types_follow_the_schema() {
        let refused = |body: &str| parse(body.as_bytes()).unwrap_err().message;
        assert_eq!(refused(r#"{"type":"message","text":42}"#), "`text` must be a string.");
        assert_eq!(refused(r#"{"type":"message","text":{"a":1}}"#), "`text` must be a string.");
        let many: Vec<String> = (0..10_000).map(|i| i.to_string()).collect();
        let body = serde_json::json!({"type": "message", "text": many}).to_string();
        assert_eq!(refused(&body), "`text` must be a string.");
        assert_eq!(refused(r#"{"type":"message","locale":1}"#), "`locale` must be a string.");
        assert_eq!(
            refused(r#"{"type":"message","attachments":{}}"#),
            "`attachments` must be an array of objects."
        );
        assert_eq!(
            refused(r#"{"type":"message","attachments":["x"]}"#),
            "`attachments` must be an array of objects."
        );
        assert_eq!(refused(r#"{"type":"message","from":"me"}"#), "`from` must be an object with an `id`.");
        assert_eq!(refused(r#"{"type":"message","from":{"id":7}}"#), "`from.id` must be a string.");
        let ok = r#"{"type":"message","text":"hi","locale":"en-US","from":{"id":"u","name":"U"},
            "attachments":[{"contentType":"image/png","contentUrl":"https://x/y.png"}],
            "channelData":{"any":[1,2]},"value":7}"#;
        assert!(parse(ok.as_bytes()).is_ok());
    }

    #[test]
    fn json_strings_round_trip_through_a_json_parser() {
        for s in ["", "plain", "q\"b\\n\nr\rt\t", "\u{1}\u{1f}\u{7f}", "héllo → 🌍 \"ok\"", "a\u{0}b"] {
            let mut out = String::new();
            json_str(&mut out, s);
            assert_eq!(serde_json::from_str::<String>(&out).unwrap(), s, "{out}");
        }
        let mut out = String::new();
        json_str(&mut out, "\u{1}");
        assert_eq!(out, "\"\\u0001\"");
    }

    #[test]
    fn parse_refuses_what_is_not_an_activity() {
        assert_eq!(parse(b"{").unwrap_err().code, "BadRequest");
        assert_eq!(parse(b"[]").unwrap_err().code, "BadRequest");
        assert_eq!(parse(br#"{"text":"x"}"#).unwrap_err().code, "BadRequest");
        assert!(parse(br#"{"type":"message"}"#).is_ok());
    }

    #[test]
    fn bot_activities_are_valid_json_with_every_field() {
        let c = crate::config::Config::embedded_default().unwrap();
        let bot = Bot::from_config(&c.bots[0], "k".into(), 1);
        let text = "quote \" backslash \\ newline \n tab \t bell \u{7} é 😀";
        let v: Value =
            serde_json::from_str(&bot_message(&bot, "c|0000001", 0, "c", text, Some("c|0000000"))).unwrap();
        assert_eq!(v["text"], text);
        assert_eq!(v["type"], "message");
        assert_eq!(v["replyToId"], "c|0000000");
        assert_eq!(v["from"], json!({"id": "helpdesk", "name": "Contoso Helpdesk", "role": "bot"}));
        assert_eq!(v["timestamp"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["conversation"]["id"], "c");
        let v: Value = serde_json::from_str(&bot_message(&bot, "i", 0, "c", "hi", None)).unwrap();
        assert!(v.get("replyToId").is_none());
        let e: Value = serde_json::from_str(&end_of_conversation(&bot, "i", 0, "c", "r")).unwrap();
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str(), e["replyToId"].as_str()),
            (Some("endOfConversation"), Some("completedSuccessfully"), Some("r"))
        );
    }

    #[test]
    fn stamping_keeps_client_fields_and_token_user_wins() {
        let mut a =
            parse(br#"{"type":"message","from":{"id":"me"},"channelData":{"clientActivityID":"c1"}}"#)
                .unwrap();
        set_user(&mut a, Some("dl_tok")).unwrap();
        let json = stamp(&a, "conv|0000001", 0, "conv");
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["from"]["id"], "dl_tok");
        assert_eq!(v["channelData"]["clientActivityID"], "c1");
        assert_eq!(v["timestamp"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["conversation"]["id"], "conv");
        assert_eq!(v["id"], "conv|0000001");
        assert_eq!(v["channelId"], "directline");
        // The client's own id, timestamp, channel and conversation are replaced, not repeated.
        let forged = parse(br#"{"type":"message","id":"x","timestamp":"y","channelId":"z","conversation":{"id":"w"},"text":"a\"b"}"#).unwrap();
        let json = stamp(&forged, "c|1", 0, "c");
        let v: serde_json::Map<String, Value> = serde_json::from_str(&json).unwrap();
        assert_eq!(json.matches("\"id\":").count(), 2, "{json}");
        assert_eq!(
            (v["id"].as_str(), v["channelId"].as_str(), v["text"].as_str()),
            (Some("c|1"), Some("directline"), Some("a\"b"))
        );
        assert_eq!(v["conversation"]["id"], "c");
        let mut no_from = parse(br#"{"type":"message"}"#).unwrap();
        assert!(set_user(&mut no_from, None).is_err());
    }
}
