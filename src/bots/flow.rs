//! Topic flows: a built-in topic's HTTP action, run under the bot's own license.
//!
//! A flow sends a JSON body templated from the conversation to its URL, over the one outbound
//! client (its policy, no redirects, the answer cap), bounded by its timeout, and its JSON answer
//! fills the topic's replies through `{{name}}` placeholders (`{{order.status}}` reads a nested
//! field). The body template is a JSON value: values are substituted into its string leaves, so
//! a user's text is always one JSON string, whatever quotes or braces it holds. Any failure gives
//! the topic's `fallback_reply`. A flow never begins or counts a billed session: the turn that
//! triggered it was metered before it runs.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Uri, header};
use http_body_util::Full;
use serde_json::{Map, Value};

use crate::config::{FlowConfig, FlowMethod};
use crate::outbound::{CallError, OutboundClient};

/// The values every body template may use, besides the flow's `variables`.
pub const BUILTIN_VALUES: [&str; 4] = ["text", "conversation_id", "user_id", "bot_id"];

/// How a flow run ended; the `outcome` label of `botgate_flow_runs_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The answer filled the replies.
    Ok = 0,
    /// Connection error, non-2xx, non-JSON, too large, or a placeholder the answer lacks.
    Failed = 1,
    /// No answer within the flow's timeout.
    Timeout = 2,
    /// The outbound policy refused the address.
    Refused = 3,
}

impl Outcome {
    /// Every outcome, in the order of the exposition.
    pub const ALL: [Outcome; 4] = [Outcome::Ok, Outcome::Failed, Outcome::Timeout, Outcome::Refused];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failed => "failed",
            Self::Timeout => "timeout",
            Self::Refused => "refused",
        }
    }
}

/// A topic's flow, built once from its validated configuration.
#[derive(Debug, Clone)]
pub struct Flow {
    url: String,
    method: Method,
    timeout: Duration,
    /// `None` for a GET (no body).
    body: Option<Value>,
    variables: BTreeMap<String, String>,
}

/// What a run knows of the conversation.
#[derive(Debug, Clone, Default)]
pub struct Input {
    /// The user's message (empty for a greeting).
    pub text: String,
    /// The conversation id.
    pub conversation_id: String,
    /// The user's id (`from.id`).
    pub user_id: String,
    /// The bot id.
    pub bot_id: String,
}

/// The body sent when the configuration gives none: the four built-in values.
pub fn default_body() -> Value {
    let mut m = Map::new();
    for name in BUILTIN_VALUES {
        m.insert(name.into(), Value::String(format!("{{{{{name}}}}}")));
    }
    Value::Object(m)
}

impl Flow {
    /// The flow of a validated configuration.
    pub fn new(c: &FlowConfig) -> Self {
        let method = match c.method {
            FlowMethod::Post => Method::POST,
            FlowMethod::Put => Method::PUT,
            FlowMethod::Patch => Method::PATCH,
            FlowMethod::Get => Method::GET,
        };
        let body = (method != Method::GET).then(|| c.body.clone().unwrap_or_else(default_body));
        Self {
            url: c.url.clone(),
            method,
            timeout: Duration::from_millis(c.timeout_ms),
            body,
            variables: c.variables.clone(),
        }
    }

    /// The value of a body placeholder.
    fn value<'a>(&'a self, input: &'a Input, name: &str) -> Option<&'a str> {
        match name {
            "text" => Some(&input.text),
            "conversation_id" => Some(&input.conversation_id),
            "user_id" => Some(&input.user_id),
            "bot_id" => Some(&input.bot_id),
            _ => self.variables.get(name).map(String::as_str),
        }
    }

    /// The body of a run: the template with its string leaves filled.
    pub fn body(&self, input: &Input) -> Option<Value> {
        self.body.as_ref().map(|t| render_body(t, &|name| self.value(input, name)))
    }

    /// Runs the flow: its JSON answer, or how it failed. Bounded by the flow's timeout, connection
    /// included.
    pub async fn run(&self, client: &OutboundClient, input: &Input) -> Result<Value, (Outcome, String)> {
        let failed = |why: String| (Outcome::Failed, why);
        let call = async {
            let uri: Uri = self.url.parse().map_err(|_| failed("the URL is not valid".into()))?;
            let mut req = Request::builder().method(self.method.clone()).uri(uri);
            let body = match self.body(input) {
                Some(b) => {
                    req = req.header(header::CONTENT_TYPE, "application/json");
                    Bytes::from(serde_json::to_vec(&b).map_err(|e| failed(e.to_string()))?)
                }
                None => Bytes::new(),
            };
            let req = req
                .header(header::ACCEPT, "application/json")
                .body(Full::new(body))
                .map_err(|e| failed(e.to_string()))?;
            let (status, bytes) = client.send(req).await.map_err(|e| match e {
                CallError::Refused(why) => (Outcome::Refused, why),
                e => failed(e.to_string()),
            })?;
            // Redirects are not followed: a 3xx fails like any other non-success.
            if !status.is_success() {
                return Err(failed(format!("the flow answered {status}")));
            }
            serde_json::from_slice::<Value>(&bytes).map_err(|_| failed("the answer is not JSON".into()))
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r,
            Err(_) => Err((Outcome::Timeout, format!("no answer within {} ms", self.timeout.as_millis()))),
        }
    }
}

/// A topic's flow with the replies its answer fills.
#[derive(Debug)]
pub struct TopicFlow {
    /// The HTTP action.
    pub flow: Flow,
    /// The reply templates.
    pub replies: Vec<String>,
    /// Sent instead when the flow fails.
    pub fallback_reply: String,
}

impl TopicFlow {
    /// Runs the flow and returns how it went and the replies to send: the filled templates, or
    /// the fallback reply. The cause of a failure goes to the log.
    pub async fn answer(&self, client: &OutboundClient, input: &Input) -> (Outcome, Vec<String>) {
        let filled = match self.flow.run(client, input).await {
            Ok(answer) => fill_replies(&self.replies, &answer)
                .map_err(|name| (Outcome::Failed, format!("the answer has no `{name}` for the reply"))),
            Err(e) => Err(e),
        };
        match filled {
            Ok(replies) => (Outcome::Ok, replies),
            Err((outcome, cause)) => {
                tracing::warn!(
                    bot = %input.bot_id,
                    url = %self.flow.url,
                    outcome = outcome.label(),
                    cause,
                    "A topic flow failed; sending its fallback reply."
                );
                (outcome, vec![self.fallback_reply.clone()])
            }
        }
    }
}

/// The placeholders of a template string: the trimmed names between `{{` and `}}`, in order.
pub fn placeholders(s: &str) -> impl Iterator<Item = &str> {
    let mut rest = s;
    std::iter::from_fn(move || {
        let open = rest.find("{{")?;
        let after = &rest[open + 2..];
        let close = after.find("}}")?;
        rest = &after[close + 2..];
        Some(after[..close].trim())
    })
}

/// Fills every `{{name}}` of `template` with `value(name)`; `Err(name)` for the first it lacks.
/// A `{{` without its `}}` is kept as it is.
pub fn fill<F>(template: &str, value: F) -> Result<String, &str>
where
    F: Fn(&str) -> Option<String>,
{
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else { break };
        let name = after[..close].trim();
        out.push_str(&rest[..open]);
        out.push_str(&value(name).ok_or(name)?);
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The body template with its string leaves filled; keys, numbers and the rest stay. A
/// placeholder with no value becomes empty (validation refuses unknown names).
pub fn render_body<'v>(template: &Value, value: &dyn Fn(&str) -> Option<&'v str>) -> Value {
    match template {
        Value::String(s) => Value::String(
            fill(s, |name| Some(value(name).unwrap_or_default().to_string())).unwrap_or_default(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|v| render_body(v, value)).collect()),
        Value::Object(m) => {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), render_body(v, value))).collect())
        }
        other => other.clone(),
    }
}

/// The field of `answer` at a dotted path (`order.status`, `items.0.name`), as reply text: a
/// string as it is, a number or a boolean written out; `None` for anything else or nothing.
pub fn lookup(answer: &Value, path: &str) -> Option<String> {
    let mut v = answer;
    for part in path.split('.') {
        v = match v {
            Value::Object(m) => m.get(part)?,
            Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The topic's replies filled from a flow's answer; `Err(name)` for a placeholder it lacks.
pub fn fill_replies<'a>(replies: &'a [String], answer: &Value) -> Result<Vec<String>, &'a str> {
    replies.iter().map(|r| fill(r, |name| lookup(answer, name))).collect()
}

/// Every placeholder of a body template's string leaves.
pub fn body_placeholders(template: &Value, out: &mut Vec<String>) {
    match template {
        Value::String(s) => out.extend(placeholders(s).map(str::to_string)),
        Value::Array(items) => items.iter().for_each(|v| body_placeholders(v, out)),
        Value::Object(m) => m.values().for_each(|v| body_placeholders(v, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn flow(body: Option<Value>) -> Flow {
        Flow::new(&FlowConfig {
            url: "http://flows.example/run".into(),
            method: FlowMethod::Post,
            timeout_ms: 1000,
            body,
            variables: BTreeMap::from([("shop".to_string(), "Contoso \"east\"".to_string())]),
        })
    }

    fn input(text: &str) -> Input {
        Input { text: text.into(), conversation_id: "c1".into(), user_id: "u1".into(), bot_id: "b1".into() }
    }

    #[test]
    fn the_body_takes_values_as_json_strings_whatever_they_hold() {
        let f = flow(Some(json!({
            "q": "{{text}}",
            "meta": {"conv": "{{ conversation_id }}", "who": ["{{user_id}}", "{{bot_id}}"], "n": 3},
            "line": "shop={{shop}}; said={{text}}",
        })));
        let hostile = r#"he said "hi", "x":1} {{bot_id}} \ é 🚀"#;
        let body = f.body(&input(hostile)).unwrap();
        assert_eq!(body["q"], hostile, "the text is one string, not parsed as JSON or template");
        assert_eq!(body["meta"]["conv"], "c1");
        assert_eq!(body["meta"]["who"], json!(["u1", "b1"]));
        assert_eq!(body["meta"]["n"], 3);
        assert_eq!(body["line"], format!("shop=Contoso \"east\"; said={hostile}"));
        // Serialized and read back, it is the same value: nothing was injected.
        let wire = serde_json::to_string(&body).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&wire).unwrap(), body);
        assert_eq!(body.as_object().unwrap().len(), 3);
    }

    #[test]
    fn the_default_body_has_the_builtin_values_and_get_has_none() {
        let body = flow(None).body(&input("hi")).unwrap();
        assert_eq!(body, json!({"text": "hi", "conversation_id": "c1", "user_id": "u1", "bot_id": "b1"}));
        let get = Flow::new(&FlowConfig { method: FlowMethod::Get, ..flow_config() });
        assert!(get.body(&input("hi")).is_none());
    }

    fn flow_config() -> FlowConfig {
        FlowConfig {
            url: "http://flows.example/run".into(),
            method: FlowMethod::Post,
            timeout_ms: 1000,
            body: None,
            variables: BTreeMap::new(),
        }
    }

    #[test]
    fn replies_are_filled_from_the_answer_nested_fields_included() {
        let answer =
            json!({"status": "shipped", "order": {"id": 42, "late": false, "items": [{"name": "mug"}]}});
        let replies = vec![
            "Your order {{status}}".to_string(),
            "#{{order.id}} late: {{ order.late }}, first item {{order.items.0.name}}".to_string(),
            "no placeholder, {{ unclosed".to_string(),
        ];
        assert_eq!(
            fill_replies(&replies, &answer).unwrap(),
            vec!["Your order shipped", "#42 late: false, first item mug", "no placeholder, {{ unclosed"]
        );
    }

    #[test]
    fn a_placeholder_the_answer_lacks_is_named() {
        let answer = json!({"status": "shipped", "order": {"lines": [1], "none": null}});
        for (reply, missing) in [
            ("{{eta}}", "eta"),
            ("{{status.code}}", "status.code"),
            ("{{order.lines}}", "order.lines"),
            ("{{order.none}}", "order.none"),
            ("{{order.lines.5}}", "order.lines.5"),
        ] {
            assert_eq!(fill_replies(&[reply.to_string()], &answer), Err(missing), "{reply}");
        }
    }

    #[test]
    fn placeholders_are_listed() {
        let names: Vec<&str> = placeholders("a {{x}} b {{ y.z }} {{}} {{ open").collect();
        assert_eq!(names, vec!["x", "y.z", ""]);
        let mut out = Vec::new();
        body_placeholders(&json!({"a": ["{{text}}", {"b": "{{v}}"}], "n": 1}), &mut out);
        assert_eq!(out, vec!["text", "v"]);
    }
}
