//! `[notifications]`: signed webhooks to admins (capacity, trials, seats), their outbox and
//! retry schedule, and the operator's own endpoints.

use serde::Deserialize;

use super::{Invalid, invalid};

/// The event types a webhook endpoint can subscribe to.
pub const EVENT_TYPES: &[&str] = &[
    "capacity.threshold",
    "capacity.overage_started",
    "capacity.forecast_exhaustion",
    "trial.expiring",
    "trial.expired",
    "bot.grace_ending",
    "seats.full",
    "test",
];

/// `[notifications]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationsConfig {
    /// Whether events are raised and delivered at all. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Percentages of a tenant's month capacity at which `capacity.threshold` fires, each once
    /// per tenant and month (a tenant's `capacity_alerts` replaces them). Default [80, 100].
    #[serde(default = "default_thresholds")]
    pub capacity_thresholds: Vec<u8>,
    /// How often each node looks for due deliveries and time-driven events, in milliseconds.
    /// Default 1000.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// How long one delivery attempt may take (connect, send, answer), in milliseconds.
    /// Default 10000.
    #[serde(default = "default_attempt_timeout_ms")]
    pub attempt_timeout_ms: u64,
    /// The wait before the first retry, in seconds; each later wait doubles. Default 5.
    #[serde(default = "default_retry_initial_secs")]
    pub retry_initial_secs: u64,
    /// The longest wait between two attempts, in seconds. Default 21600 (6 hours).
    #[serde(default = "default_retry_max_interval_secs")]
    pub retry_max_interval_secs: u64,
    /// Each wait is moved at random by up to this share of itself, either way. Default 0.2.
    #[serde(default = "default_retry_jitter")]
    pub retry_jitter: f64,
    /// How long an event is retried after it was raised, in seconds; an endpoint that fails for
    /// that long is disabled (audited). Default 259200 (3 days).
    #[serde(default = "default_give_up_after_secs")]
    pub give_up_after_secs: u64,
    /// Most webhook endpoints a tenant may register. Default 10.
    #[serde(default = "default_max_endpoints")]
    pub max_endpoints_per_tenant: usize,
    /// Delivery attempts kept per tenant for the delivery log. Default 1000.
    #[serde(default = "default_log_entries")]
    pub log_entries_per_tenant: usize,
    /// Days before a trial's expiry that `trial.expiring` fires. Default 7.
    #[serde(default = "default_warning_days")]
    pub trial_warning_days: u32,
    /// Days before an expired trial's bots stop that `bot.grace_ending` fires. Default 7.
    #[serde(default = "default_warning_days")]
    pub grace_warning_days: u32,
    /// How long a rotated-out secret keeps signing beside the new one, in seconds. Default
    /// 86400.
    #[serde(default = "default_rotation_overlap_secs")]
    pub rotation_overlap_secs: u64,
    /// The platform operator's endpoints: they receive the events of every tenant.
    #[serde(default)]
    pub endpoints: Vec<OperatorEndpoint>,
}

/// `[[notifications.endpoints]]`: an endpoint of the platform operator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorEndpoint {
    /// A short id, unique among these endpoints (shown in the delivery log). Required.
    pub id: String,
    /// The `http://` URL events are posted to. Required.
    pub url: String,
    /// The signing secret, `whsec_` and base64 of at least 16 bytes (Standard Webhooks).
    /// Required.
    pub secret: String,
    /// The event types it receives. Default: every type.
    #[serde(default)]
    pub events: Vec<String>,
}

impl Default for NotificationsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            capacity_thresholds: default_thresholds(),
            poll_ms: default_poll_ms(),
            attempt_timeout_ms: default_attempt_timeout_ms(),
            retry_initial_secs: default_retry_initial_secs(),
            retry_max_interval_secs: default_retry_max_interval_secs(),
            retry_jitter: default_retry_jitter(),
            give_up_after_secs: default_give_up_after_secs(),
            max_endpoints_per_tenant: default_max_endpoints(),
            log_entries_per_tenant: default_log_entries(),
            trial_warning_days: default_warning_days(),
            grace_warning_days: default_warning_days(),
            rotation_overlap_secs: default_rotation_overlap_secs(),
            endpoints: Vec::new(),
        }
    }
}

impl NotificationsConfig {
    pub(super) fn validate(&self, policy: &crate::outbound::Policy) -> Result<(), Invalid> {
        check_thresholds("notifications.capacity_thresholds", &self.capacity_thresholds)?;
        if !(10..=60_000).contains(&self.poll_ms) {
            return Err(invalid("notifications.poll_ms", "must be between 10 and 60000"));
        }
        if !(100..=120_000).contains(&self.attempt_timeout_ms) {
            return Err(invalid("notifications.attempt_timeout_ms", "must be between 100 and 120000"));
        }
        if self.retry_initial_secs == 0 {
            return Err(invalid("notifications.retry_initial_secs", "must be at least 1"));
        }
        if self.retry_max_interval_secs < self.retry_initial_secs {
            return Err(invalid(
                "notifications.retry_max_interval_secs",
                "must be at least `retry_initial_secs`",
            ));
        }
        if !(0.0..=0.5).contains(&self.retry_jitter) {
            return Err(invalid("notifications.retry_jitter", "must be between 0 and 0.5"));
        }
        if self.give_up_after_secs < self.retry_initial_secs {
            return Err(invalid("notifications.give_up_after_secs", "must be at least `retry_initial_secs`"));
        }
        if !(1..=1000).contains(&self.max_endpoints_per_tenant) {
            return Err(invalid("notifications.max_endpoints_per_tenant", "must be between 1 and 1000"));
        }
        if !(10..=100_000).contains(&self.log_entries_per_tenant) {
            return Err(invalid("notifications.log_entries_per_tenant", "must be between 10 and 100000"));
        }
        let mut ids = std::collections::HashSet::new();
        for (i, e) in self.endpoints.iter().enumerate() {
            let key = format!("notifications.endpoints[{i}]");
            super::validate_id(&format!("{key}.id"), &e.id)?;
            if !ids.insert(e.id.as_str()) {
                return Err(invalid(format!("{key}.id"), format!("`{}` is used by another endpoint", e.id)));
            }
            policy.check_url(&e.url).map_err(|why| invalid(format!("{key}.url"), why))?;
            if crate::notify::sign::secret_key(&e.secret).is_none() {
                return Err(invalid(
                    format!("{key}.secret"),
                    "must be `whsec_` followed by base64 of at least 16 bytes",
                ));
            }
            check_event_types(&format!("{key}.events"), &e.events)?;
        }
        Ok(())
    }
}

/// Checks a list of capacity percentages: 1 to 100, at most 10.
pub fn check_thresholds(key: &str, t: &[u8]) -> Result<(), Invalid> {
    if t.len() > 10 {
        return Err(invalid(key, "at most 10 thresholds"));
    }
    if let Some(bad) = t.iter().find(|&&p| !(1..=100).contains(&p)) {
        return Err(invalid(key, format!("{bad} is not a percentage from 1 to 100")));
    }
    Ok(())
}

/// Checks a list of event types against [`EVENT_TYPES`].
pub fn check_event_types(key: &str, events: &[String]) -> Result<(), Invalid> {
    match events.iter().find(|e| !EVENT_TYPES.contains(&e.as_str())) {
        Some(bad) => {
            Err(invalid(key, format!("`{bad}` is not an event type; known: {}", EVENT_TYPES.join(", "))))
        }
        None => Ok(()),
    }
}

fn default_true() -> bool {
    true
}
fn default_thresholds() -> Vec<u8> {
    vec![80, 100]
}
fn default_poll_ms() -> u64 {
    1000
}
fn default_attempt_timeout_ms() -> u64 {
    10_000
}
fn default_retry_initial_secs() -> u64 {
    5
}
fn default_retry_max_interval_secs() -> u64 {
    21_600
}
fn default_retry_jitter() -> f64 {
    0.2
}
fn default_give_up_after_secs() -> u64 {
    259_200
}
fn default_max_endpoints() -> usize {
    10
}
fn default_log_entries() -> usize {
    1000
}
fn default_warning_days() -> u32 {
    7
}
fn default_rotation_overlap_secs() -> u64 {
    86_400
}
