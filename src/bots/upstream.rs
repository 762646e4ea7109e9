//! Upstream bots: Bot Framework messaging endpoints behind the gateway.
//!
//! The gateway POSTs each activity to the bot with `serviceUrl` set to its own connector address,
//! which carries the bot's unguessable callback key in its path (SDK bots in local mode send no
//! credentials on callbacks, so the path is the credential). The bot answers its turn by calling
//! back while the gateway's POST is still open; the handlers for those callbacks are in
//! `channel::connector`.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::Full;
use tokio::sync::Semaphore;

use crate::error::ApiError;
use crate::outbound::{OutboundClient, Policy};

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

/// Calls to upstream bots, over the one outbound client; cloning is shallow.
#[derive(Clone)]
pub struct UpstreamClient {
    outbound: OutboundClient,
    timeout: Duration,
}

impl UpstreamClient {
    /// Calls over `outbound`, each bounded by `timeout`.
    pub fn new(outbound: OutboundClient, timeout: Duration) -> Self {
        Self { outbound, timeout }
    }

    /// The policy this client calls under.
    pub fn policy(&self) -> &Policy {
        self.outbound.policy()
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
            let req = Request::post(uri)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(body))
                .map_err(|e| bot_error(bot_id, &e.to_string()))?;
            let (status, bytes) =
                self.outbound.send(req).await.map_err(|e| bot_error(bot_id, &e.to_string()))?;
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
