//! Delivery: claims due events from the outbox, posts each to its endpoints, and settles the
//! outcome. At least once: an event stays due until every endpoint answered 2xx, was given up
//! on, or is gone; a node that dies mid-delivery leaves its claim to lapse, and the next pass
//! (on any node) delivers again under the same `webhook-id`.
//!
//! Retries wait `retry_initial_secs`, doubling up to `retry_max_interval_secs`, each moved at
//! random by up to `retry_jitter` of itself, until `give_up_after_secs` after the event was
//! raised; then the delivery is `failed` and the endpoint is disabled (audited).

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Uri, header};
use http_body_util::Full;

use crate::config::NotificationsConfig;
use crate::outbound::{CallError, OutboundClient, Policy};
use crate::state::AppState;
use crate::store::control::{EndpointRecord, Mutation};
use crate::store::outbox::{Attempt, Claimed, OutboxEvent, Target};

/// Events claimed per pass (per tenant with Redis).
const CLAIM_LIMIT: usize = 32;
/// Events delivered at once.
const CONCURRENT_EVENTS: usize = 16;

/// Webhook calls: the gateway's one outbound client (its policy, pool and answer cap), each
/// attempt bounded by `attempt_timeout_ms`; cloning is shallow.
#[derive(Clone)]
pub struct Client {
    outbound: OutboundClient,
    timeout: Duration,
}

impl Client {
    /// Calls through `outbound`, each attempt bounded by `timeout`.
    pub fn new(outbound: OutboundClient, timeout: Duration) -> Self {
        Self { outbound, timeout }
    }

    /// The policy it calls under.
    pub fn policy(&self) -> &Policy {
        self.outbound.policy()
    }

    /// Posts `body` to `url` with the Standard Webhooks headers; the status answered, or why
    /// there was none.
    pub async fn post(
        &self,
        url: &str,
        id: &str,
        timestamp: i64,
        signature: &str,
        body: Bytes,
    ) -> Result<u16, String> {
        let uri: Uri = url.parse().map_err(|_| "the URL is not valid".to_string())?;
        let req = Request::post(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, concat!("botgate/", env!("CARGO_PKG_VERSION")))
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(self.timeout, self.outbound.send(req)).await {
            Ok(Ok((status, _))) => Ok(status.as_u16()),
            // An answer over the cap still carried its status; the receiver's body is not ours.
            Ok(Err(CallError::TooLarge(_))) => {
                Err("the answer is longer than outbound.max_response_bytes".into())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
        }
    }
}

/// The wait before retry `n` (1 for the first retry), without jitter.
pub fn backoff(c: &NotificationsConfig, n: u32) -> Duration {
    let secs = c.retry_initial_secs.saturating_mul(1u64 << (n.saturating_sub(1)).min(40));
    Duration::from_secs(secs.min(c.retry_max_interval_secs))
}

/// [`backoff`] moved by up to `retry_jitter` of itself either way.
fn jittered(c: &NotificationsConfig, n: u32) -> i64 {
    let base = backoff(c, n).as_millis() as f64;
    let shift = (rand::random::<f64>() * 2.0 - 1.0) * c.retry_jitter;
    (base * (1.0 + shift)).max(1.0) as i64
}

/// An endpoint as delivery sees it: a tenant's or the operator's.
struct Dest {
    id: String,
    url: String,
    secrets: Vec<String>,
    events: Vec<String>,
    enabled: bool,
    tenant_endpoint: bool,
}

impl Dest {
    fn wants(&self, kind: &str) -> bool {
        self.events.is_empty() || self.events.iter().any(|e| e == kind)
    }
}

/// Every endpoint that may receive an event of `tenant` at `now`.
fn destinations(app: &AppState, tenant: &str, now: i64) -> Vec<Dest> {
    let mut out: Vec<Dest> = app
        .licensing()
        .tenant(tenant)
        .map(|t| t.endpoints.values().map(|e| tenant_dest(e, now)).collect())
        .unwrap_or_default();
    for e in &app.config().notifications.endpoints {
        out.push(Dest {
            id: format!("op:{}", e.id),
            url: e.url.clone(),
            secrets: vec![e.secret.clone()],
            events: e.events.clone(),
            enabled: true,
            tenant_endpoint: false,
        });
    }
    out
}

fn tenant_dest(e: &EndpointRecord, now: i64) -> Dest {
    let mut secrets = vec![e.secret.clone()];
    if let Some(p) = &e.previous_secret
        && e.previous_until_ms > now
    {
        secrets.push(p.clone());
    }
    Dest {
        id: e.id.clone(),
        url: e.url.clone(),
        secrets,
        events: e.events.clone(),
        enabled: e.enabled,
        tenant_endpoint: true,
    }
}

/// The endpoints a `test` event goes to: the one its data names.
fn test_endpoint(event: &OutboxEvent) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(&event.payload).ok()?;
    v["data"]["endpoint"].as_str().map(str::to_string)
}

/// One delivery pass: claims due events and delivers them.
pub async fn pass(app: &AppState) {
    let config = &app.config().notifications;
    let now = app.clock().now_ms();
    let lease = config.attempt_timeout_ms as i64 * 2 + 30_000;
    let store = app.store().clone();
    let claimed = match tokio::task::spawn_blocking(move || store.claim_due(now, lease, CLAIM_LIMIT)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "Reading the notification outbox failed; will retry.");
            return;
        }
        Err(_) => return,
    };
    futures_util::stream::iter(claimed)
        .for_each_concurrent(CONCURRENT_EVENTS, |c| deliver_event(app, c, now))
        .await;
}

/// Delivers one claimed event to each of its due endpoints, then settles it.
async fn deliver_event(app: &AppState, claimed: Claimed, now: i64) {
    let config = &app.config().notifications;
    let notifier = app.notifier();
    let Claimed { event, targets } = claimed;
    let dests = destinations(app, &event.tenant, now);
    let mut targets = targets.unwrap_or_else(|| {
        let only = (event.kind == "test").then(|| test_endpoint(&event)).flatten();
        dests
            .iter()
            .filter(|d| d.enabled && d.wants(&event.kind))
            .filter(|d| only.as_ref().is_none_or(|o| *o == d.id))
            .map(|d| Target { endpoint: d.id.clone(), attempts: 0, next_ms: now, outcome: None })
            .collect()
    });
    let body = Bytes::from(event.payload.clone());
    let timestamp = now.div_euclid(1000);
    let calls = targets.iter_mut().filter(|t| t.outcome.is_none() && t.next_ms <= now).map(|t| {
        let dest = dests.iter().find(|d| d.id == t.endpoint);
        let body = body.clone();
        let event = &event;
        async move {
            let Some(dest) = dest.filter(|d| d.enabled) else {
                t.outcome = Some("dropped".into());
                return (None, None);
            };
            let secrets: Vec<&str> = dest.secrets.iter().map(String::as_str).collect();
            let signature = super::sign::header(&secrets, &event.id, timestamp, &body);
            let started = Instant::now();
            let answer = notifier.client.post(&dest.url, &event.id, timestamp, &signature, body).await;
            let latency_ms = started.elapsed().as_millis() as u64;
            t.attempts += 1;
            let (status, error) = match answer {
                Ok(s) if (200..300).contains(&s) => (Some(s), None),
                Ok(s) => (Some(s), Some(format!("the endpoint answered {s}"))),
                Err(e) => (None, Some(e)),
            };
            let outcome = if error.is_none() {
                t.outcome = Some("delivered".into());
                "delivered"
            } else if now - event.created_ms >= config.give_up_after_secs as i64 * 1000 {
                t.outcome = Some("failed".into());
                "failed"
            } else {
                t.next_ms = now + jittered(config, t.attempts);
                "retry"
            };
            notifier.attempts.with_label_values(&[outcome]).inc();
            let attempt = Attempt {
                tenant: event.tenant.clone(),
                event_id: event.id.clone(),
                kind: event.kind.clone(),
                endpoint: t.endpoint.clone(),
                attempt: t.attempts,
                at_ms: now,
                status,
                latency_ms,
                error,
                outcome: outcome.into(),
            };
            let disable = (outcome == "failed" && dest.tenant_endpoint).then(|| dest.id.clone());
            (Some(attempt), disable)
        }
    });
    let results = futures_util::future::join_all(calls).await;
    let mut attempts = Vec::new();
    let mut disable = Vec::new();
    for (a, d) in results {
        attempts.extend(a);
        disable.extend(d);
    }
    let store = app.store().clone();
    let keep = config.log_entries_per_tenant;
    let (ev, tg) = (event.clone(), targets);
    match tokio::task::spawn_blocking(move || store.settle(&ev, &tg, &attempts, keep)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, event = %event.id, "Recording a webhook delivery failed; it will be delivered again.")
        }
        Err(_) => {}
    }
    for id in disable {
        disable_endpoint(app, &event.tenant, &id).await;
    }
}

/// Disables a tenant's endpoint that failed for `give_up_after_secs`, with an audit entry.
async fn disable_endpoint(app: &AppState, tenant: &str, id: &str) {
    let days = app.config().notifications.give_up_after_secs as f64 / 86_400.0;
    let done = app
        .licensing()
        .commit(tenant, "system:notifications", |t| {
            let Some(e) = t.endpoints.get_mut(id).filter(|e| e.enabled) else { return Ok((vec![], vec![])) };
            let before = super::api::public_json(e);
            e.enabled = false;
            e.disabled_reason = Some(format!("deliveries failed for {days:.1} days"));
            let after = super::api::public_json(e);
            Ok((
                vec![Mutation::PutEndpoint(e.clone())],
                vec![("webhook.disable", id.to_string(), Some(before), Some(after))],
            ))
        })
        .await;
    match done {
        Ok(_) => {
            tracing::warn!(tenant, endpoint = id, "A webhook endpoint failed for too long and was disabled.")
        }
        Err(e) => {
            tracing::warn!(error = ?e, tenant, endpoint = id, "Disabling a failing webhook endpoint failed.")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_up_to_its_cap() {
        let c = NotificationsConfig::default();
        let waits: Vec<u64> = (1..=14).map(|n| backoff(&c, n).as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 5120, 10240, 20480, 21600]);
        assert_eq!(backoff(&c, 1000).as_secs(), 21600, "no overflow");
        for n in 1..20 {
            let j = jittered(&c, n);
            let base = backoff(&c, n).as_millis() as f64;
            assert!((j as f64) >= base * 0.8 - 1.0 && (j as f64) <= base * 1.2 + 1.0, "{n}: {j}");
        }
    }
}
