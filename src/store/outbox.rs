//! The notification outbox as the store keeps it: events raised once per dedupe key, their
//! delivery progress per endpoint, and the log of delivery attempts.
//!
//! An event is written in the same transaction (SQLite) or script (Redis) as the state change
//! that raised it: a capacity threshold with the ledger batch that crossed it. Events that
//! follow from time or from control state (a trial expiring, seats full) are raised by a sweep
//! that every node runs; their dedupe key, checked by the store atomically with the insert,
//! makes one event of any number of sweeps and nodes. Delivery then reads the outbox: at least
//! once, whatever node delivers and whenever it dies.

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::metering::pool::{MonthIndex, month_label};

/// An event in the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEvent {
    /// Its id, `evt_` and a digest of the dedupe key (the `webhook-id` of every attempt).
    pub id: String,
    /// The tenant it is about.
    pub tenant: String,
    /// Its type, e.g. `capacity.threshold`.
    pub kind: String,
    /// What makes it unique: a second event with this key is never raised.
    pub dedupe: String,
    /// The body posted to endpoints (JSON).
    pub payload: String,
    /// When it was raised (ms).
    pub created_ms: i64,
}

impl OutboxEvent {
    /// An event of `kind` about `tenant` with body `{"type", "timestamp", "data"}`, unique by
    /// `dedupe`.
    pub fn new(tenant: &str, kind: &str, dedupe: String, created_ms: i64, data: serde_json::Value) -> Self {
        let payload = serde_json::json!({
            "type": kind,
            "timestamp": crate::clock::rfc3339_ms(created_ms),
            "data": data,
        });
        Self {
            id: event_id(&dedupe),
            tenant: tenant.to_string(),
            kind: kind.to_string(),
            dedupe,
            payload: payload.to_string(),
            created_ms,
        }
    }
}

/// The id of the event with dedupe key `dedupe`: the same on every node, so a receiver can also
/// drop a repeat by its `webhook-id`.
pub fn event_id(dedupe: &str) -> String {
    let digest = sha2::Sha256::digest(dedupe.as_bytes());
    let hex: String = digest.iter().take(13).map(|b| format!("{b:02x}")).collect();
    format!("evt_{hex}")
}

/// The thresholds a ledger batch may cross: one tenant's month, its capacity and the
/// percentages that raise `capacity.threshold`, and whether it may run into overage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapacityWatch {
    /// The tenant.
    pub tenant: String,
    /// The month.
    pub month: MonthIndex,
    /// The month's capacity (0: no thresholds).
    pub capacity: u64,
    /// Percentages, 1 to 100.
    pub thresholds: Vec<u8>,
}

impl CapacityWatch {
    /// The sessions at which `pct` is reached: the least count that is at least `pct` percent.
    pub fn mark(&self, pct: u8) -> u64 {
        (self.capacity * u64::from(pct)).div_ceil(100).max(1)
    }

    /// The `capacity.threshold` event of `pct`, with the month's count `used` when raised.
    pub fn threshold_event(&self, pct: u8, used: u64, at_ms: i64) -> OutboxEvent {
        let month = month_label(self.month);
        OutboxEvent::new(
            &self.tenant,
            "capacity.threshold",
            format!("capacity.threshold/{}/{month}/{pct}", self.tenant),
            at_ms,
            serde_json::json!({
                "tenant": self.tenant,
                "month": month,
                "threshold_percent": pct,
                "used": used,
                "capacity": self.capacity,
            }),
        )
    }

    /// The `capacity.overage_started` event, with the month's count `used` when raised.
    pub fn overage_event(&self, used: u64, at_ms: i64) -> OutboxEvent {
        let month = month_label(self.month);
        OutboxEvent::new(
            &self.tenant,
            "capacity.overage_started",
            format!("capacity.overage_started/{}/{month}", self.tenant),
            at_ms,
            serde_json::json!({
                "tenant": self.tenant,
                "month": month,
                "used": used,
                "capacity": self.capacity,
            }),
        )
    }
}

/// The delivery of an event to one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Target {
    /// The endpoint id (`op:<id>` for the operator's endpoints).
    pub endpoint: String,
    /// Attempts made.
    pub attempts: u32,
    /// When the next attempt is due (ms), while `outcome` is unset.
    pub next_ms: i64,
    /// `delivered`, `failed` (retried for `give_up_after_secs`) or `dropped` (the endpoint
    /// was deleted or disabled); unset while it is being retried.
    pub outcome: Option<String>,
}

/// An event claimed for delivery: nobody else delivers it until the claim lapses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The event.
    pub event: OutboxEvent,
    /// Its deliveries; `None` the first time, before the endpoints are chosen.
    pub targets: Option<Vec<Target>>,
}

/// An event with its deliveries, as the admin API lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventState {
    /// The event.
    pub event: OutboxEvent,
    /// Its deliveries (empty before the first pass of delivery).
    pub targets: Vec<Target>,
    /// When delivery looks at it next (ms); `None` once every delivery has an outcome.
    pub due_ms: Option<i64>,
}

/// One delivery attempt, as the delivery log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Attempt {
    /// The tenant.
    pub tenant: String,
    /// The event id.
    pub event_id: String,
    /// The event type.
    pub kind: String,
    /// The endpoint id.
    pub endpoint: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// When it was made (ms).
    pub at_ms: i64,
    /// The HTTP status answered, if any.
    pub status: Option<u16>,
    /// How long it took, in milliseconds.
    pub latency_ms: u64,
    /// What went wrong, if it failed.
    pub error: Option<String>,
    /// `delivered`, `retry` (another attempt is scheduled) or `failed` (given up).
    pub outcome: String,
}

/// When an event must be looked at next: the earliest due delivery, or `None` when every
/// delivery has an outcome.
pub fn next_due(targets: &[Target]) -> Option<i64> {
    targets.iter().filter(|t| t.outcome.is_none()).map(|t| t.next_ms).min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_round_up_and_never_fire_at_zero() {
        let w = CapacityWatch { tenant: "t".into(), month: 0, capacity: 2000, thresholds: vec![80, 100] };
        assert_eq!(w.mark(80), 1600);
        assert_eq!(w.mark(100), 2000);
        let small = CapacityWatch { capacity: 3, ..w.clone() };
        assert_eq!(small.mark(80), 3, "80% of 3 is 2.4: reached at the third");
        assert_eq!(small.mark(1), 1);
        let one = CapacityWatch { capacity: 1, ..w };
        assert_eq!(one.mark(1), 1);
    }

    #[test]
    fn ids_follow_the_dedupe_key() {
        assert_eq!(event_id("a"), event_id("a"));
        assert_ne!(event_id("a"), event_id("b"));
        assert_eq!(event_id("a").len(), 4 + 26);
    }

    #[test]
    fn next_due_ignores_settled_deliveries() {
        let t = |next_ms, outcome: Option<&str>| Target {
            endpoint: "e".into(),
            attempts: 1,
            next_ms,
            outcome: outcome.map(str::to_string),
        };
        assert_eq!(next_due(&[t(5, Some("delivered")), t(9, None), t(7, None)]), Some(7));
        assert_eq!(next_due(&[t(5, Some("failed"))]), None);
        assert_eq!(next_due(&[]), None);
    }
}
