//! Notifications: events about a tenant's capacity, trials and seats, delivered as signed
//! webhooks (Standard Webhooks) from the store's outbox.
//!
//! - Events are raised into the outbox once per dedupe key: capacity thresholds and overage by
//!   the ledger, in the transaction of the batch that reached them; time- and state-driven
//!   events by [`sweep`], on every node (the store's dedupe key makes them one event).
//! - [`deliver`] claims due events, posts them to every subscribed endpoint off the request
//!   path, and retries failures with exponential backoff and jitter until
//!   `notifications.give_up_after_secs`, then disables the endpoint (audited).
//! - [`api`] is the admin API: endpoints (secret shown once, rotation), test events, the event
//!   list and the delivery log.
//! - [`sign`] signs payloads.

pub mod api;
pub mod deliver;
pub mod sign;
pub mod sweep;

use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts};
use tokio::sync::watch;

use crate::state::AppState;
use crate::telemetry::registry::Metrics;

/// The notification metrics and the outbound client; built at start-up, kept in the state.
#[derive(Clone)]
pub struct Notifier {
    /// Delivery attempts by outcome (`delivered`, `retry`, `failed`).
    pub attempts: IntCounterVec,
    /// Sweep and delivery passes completed: a notifier that stalls stops counting (and a test
    /// knows a whole pass has run since a change).
    pub passes: IntCounter,
    /// The month's projected billed sessions per tenant at the current rate.
    pub projected: IntGaugeVec,
    /// When the pool runs out at the current rate, per tenant (seconds since the epoch; absent
    /// when it lasts the month).
    pub exhaustion: IntGaugeVec,
    /// Webhook calls, through the gateway's one outbound client.
    pub client: deliver::Client,
}

impl Notifier {
    /// Registers the metrics and builds the client.
    pub fn new(
        metrics: &Metrics,
        config: &crate::config::Config,
        outbound: crate::outbound::OutboundClient,
    ) -> Result<Self, prometheus::Error> {
        let attempts = IntCounterVec::new(
            Opts::new("botgate_webhook_attempts_total", "Webhook delivery attempts, by outcome."),
            &["outcome"],
        )?;
        let projected = IntGaugeVec::new(
            Opts::new(
                "botgate_tenant_projected_billed_sessions",
                "Billed sessions the month ends with at the current rate, per tenant.",
            ),
            &["tenant"],
        )?;
        let exhaustion = IntGaugeVec::new(
            Opts::new(
                "botgate_tenant_projected_exhaustion_timestamp_seconds",
                "When the month's capacity runs out at the current rate, per tenant (absent: it lasts the month).",
            ),
            &["tenant"],
        )?;
        let passes = IntCounter::new(
            "botgate_notification_passes_total",
            "Notification passes completed (each raises due events and delivers what is due).",
        )?;
        metrics.registry().register(Box::new(attempts.clone()))?;
        metrics.registry().register(Box::new(passes.clone()))?;
        for g in [&projected, &exhaustion] {
            metrics.registry().register(Box::new(g.clone()))?;
        }
        for o in ["delivered", "retry", "failed"] {
            attempts.with_label_values(&[o]);
        }
        let client =
            deliver::Client::new(outbound, Duration::from_millis(config.notifications.attempt_timeout_ms));
        Ok(Self { attempts, passes, projected, exhaustion, client })
    }
}

/// Runs the sweep and delivery passes every `notifications.poll_ms` until shutdown.
pub async fn run(state: AppState, mut stop: watch::Receiver<bool>) {
    let config = &state.config().notifications;
    if !config.enabled {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(config.poll_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweeper = sweep::Sweeper::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                sweeper.run(&state).await;
                deliver::pass(&state).await;
                state.notifier().passes.inc();
            }
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
    }
}
