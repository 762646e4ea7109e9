//! Upstream bots: Bot Framework messaging endpoints behind the gateway.
//!
//! The gateway POSTs each activity to the bot with `serviceUrl` set to its own connector address,
//! which carries the bot's unguessable callback key in its path (SDK bots in local mode send no
//! credentials on callbacks, so the path is the credential). The bot answers its turn by calling
//! back while the gateway's POST is still open; the handlers for those callbacks are in
//! `channel::connector`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;

use crate::error::ApiError;
use crate::outbound::{Policy, PolicyResolver, literal_ip};

/// One upstream bot.
pub struct UpstreamBot {
    endpoint: String,
    connector_key: String,
    limiter: Semaphore,
}

impl UpstreamBot {
    /// A bot at `endpoint`, called back on `connector_key`, with at most `max_in_flight` calls.
    pub fn new(endpoint: &str, connector_key: String, max_in_flight: usize) -> Self {
        Self { endpoint: endpoint.to_string(), connector_key, limiter: Semaphore::new(max_in_flight) }
    }

    /// The messaging endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The path segment that authorizes callbacks.
    pub fn connector_key(&self) -> &str {
        &self.connector_key
    }
}

/// The pooled HTTP client for calls to bots, under the outbound policy; cloning is shallow.
#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<HttpConnector<PolicyResolver>, Full<Bytes>>,
    policy: Arc<Policy>,
    timeout: Duration,
    max_answer_bytes: usize,
}

impl UpstreamClient {
    /// A client with the given per-call timeout and connect timeout, calling only where
    /// `policy` allows and reading at most `max_answer_bytes` of an answer.
    pub fn new(
        timeout: Duration,
        connect_timeout: Duration,
        policy: Policy,
        max_answer_bytes: usize,
    ) -> Self {
        let policy = Arc::new(policy);
        let mut connector = HttpConnector::new_with_resolver(PolicyResolver::new(policy.clone()));
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build(connector);
        Self { client, policy, timeout, max_answer_bytes }
    }

    /// The policy this client calls under.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Delivers one activity (JSON) to the bot and waits for its answer, callbacks included.
    /// Returns the activities of an inline answer (`{"activities":[...]}`), if any.
    pub async fn deliver(
        &self,
        bot: &UpstreamBot,
        bot_id: &str,
        body: Bytes,
    ) -> Result<Vec<serde_json::Value>, ApiError> {
        let call = async {
            // Waiting for a slot counts against the timeout: a bot that is saturated times out
            // its own callers without holding anyone else's.
            let _permit =
                bot.limiter.acquire().await.map_err(|_| bot_error(bot_id, "the bot is shutting down"))?;
            let uri: Uri =
                bot.endpoint.parse().map_err(|_| bot_error(bot_id, "the endpoint is not a valid URL"))?;
            // An address in the URL is not resolved, so it is judged here; names are judged by
            // the resolver, at every connection.
            if let Some(ip) = uri.host().and_then(literal_ip)
                && let Err(denied) = self.policy.check(ip)
            {
                return Err(bot_error(bot_id, denied.explain()));
            }
            let req = Request::post(uri)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(body))
                .map_err(|e| bot_error(bot_id, &e.to_string()))?;
            let res = self.client.request(req).await.map_err(|e| bot_error(bot_id, &e.to_string()))?;
            let status = res.status();
            let bytes = http_body_util::Limited::new(res.into_body(), self.max_answer_bytes)
                .collect()
                .await
                .map_err(|e| bot_error(bot_id, &e.to_string()))?
                .to_bytes();
            // Redirects are not followed: a 3xx fails like any other non-success.
            if !status.is_success() {
                return Err(bot_error(bot_id, &format!("the bot answered {status}")));
            }
            Ok(inline_activities(bot_id, &bytes))
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(
                    bot = bot_id,
                    timeout_secs = self.timeout.as_secs(),
                    "An upstream bot timed out."
                );
                Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "BotTimeout",
                    format!("The bot did not answer within {} seconds.", self.timeout.as_secs()),
                ))
            }
        }
    }
}

fn bot_error(bot_id: &str, cause: &str) -> ApiError {
    tracing::warn!(bot = bot_id, cause, "An upstream bot call failed.");
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "BotError",
        "The bot could not be reached or answered with an error.",
    )
}

/// The activities of an `expectReplies` answer; an empty or other answer has none. Only
/// well-formed bot activities are taken (a `type`, the schema's field types, a `from` that
/// is not the user): an answer is not a way to plant anything in the transcript.
fn inline_activities(bot_id: &str, body: &[u8]) -> Vec<serde_json::Value> {
    if body.is_empty() {
        return Vec::new();
    }
    let items = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(mut m)) => match m.remove("activities") {
            Some(serde_json::Value::Array(a)) => a,
            _ => return Vec::new(),
        },
        _ => return Vec::new(),
    };
    let total = items.len();
    let kept: Vec<serde_json::Value> = items
        .into_iter()
        .filter(|a| match a {
            serde_json::Value::Object(m) => crate::channel::activity::check_bot_activity(m).is_ok(),
            _ => false,
        })
        .collect();
    if kept.len() < total {
        tracing::warn!(
            bot = bot_id,
            dropped = total - kept.len(),
            "A bot answered with malformed activities; dropped them."
        );
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_replies_are_read() {
        assert!(inline_activities("b", b"").is_empty());
        assert!(inline_activities("b", b"not json").is_empty());
        let a = inline_activities(
            "b",
            br#"{"activities":[{"type":"message","text":"hi"},3,{"text":"no type"},{"type":"message","text":[1]},
                {"type":"message","from":{"id":"u","role":"user"},"text":"planted"}]}"#,
        );
        assert_eq!(a.len(), 1);
        assert_eq!(a[0]["text"], "hi");
    }
}
