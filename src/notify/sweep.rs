//! The events that follow from time and control state, raised by a sweep on every node: the
//! store's dedupe key makes one event of any number of sweeps, nodes and restarts.
//!
//! - `trial.expiring`: `trial_warning_days` before a trial expires (per trial and expiry: an
//!   extended trial warns again before its new expiry);
//! - `trial.expired`: once it has, within a week of the expiry;
//! - `bot.grace_ending`: `grace_warning_days` before an expired trial's bots stop serving;
//! - `seats.full`: every seat bought is taken (once per tenant and month);
//! - `capacity.forecast_exhaustion`: at the current rate (see `metering::forecast`) the pool runs
//!   out before the month ends (once per tenant and month). The forecast is computed once a
//!   minute of the server's clock, from the ledger, and exported as gauges.

use std::collections::{BTreeMap, HashSet};

use chrono::NaiveDate;

use crate::clock::Millis;
use crate::metering::pool::{month_label, month_of, month_start_ms};
use crate::state::AppState;
use crate::store::outbox::OutboxEvent;

const DAY_MS: i64 = 86_400_000;
/// How often the forecast is computed, in the server's clock.
const FORECAST_EVERY_MS: i64 = 60_000;
/// Dedupe keys this node remembers as raised before it forgets them all (and asks the store,
/// which still refuses repeats).
const REMEMBERED: usize = 10_000;

/// The sweep's memory between passes.
#[derive(Default)]
pub struct Sweeper {
    /// Dedupe keys raised (or found raised) by this node: not sent to the store again.
    raised: HashSet<String>,
    last_forecast: Option<Millis>,
}

impl Sweeper {
    /// One pass: raises what is due.
    pub async fn run(&mut self, app: &AppState) {
        let now = app.clock().now_ms();
        let mut events = state_events(app, now);
        if self.last_forecast.is_none_or(|t| now - t >= FORECAST_EVERY_MS || now < t) {
            self.last_forecast = Some(now);
            events.extend(forecast_events(app, now).await);
        }
        events.retain(|e| !self.raised.contains(&e.dedupe));
        if events.is_empty() {
            return;
        }
        let store = app.store().clone();
        let batch = events.clone();
        match tokio::task::spawn_blocking(move || store.raise(&batch)).await {
            Ok(Ok(_)) => {
                if self.raised.len() + events.len() > REMEMBERED {
                    self.raised.clear();
                }
                self.raised.extend(events.into_iter().map(|e| e.dedupe));
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "Raising notification events failed; will retry."),
            Err(_) => {}
        }
    }
}

/// Trials, grace periods and seats.
fn state_events(app: &AppState, now: Millis) -> Vec<OutboxEvent> {
    let c = &app.config().notifications;
    let snapshot = app.licensing().snapshot();
    let mut out = Vec::new();
    let at = crate::clock::rfc3339_ms;
    for (tenant, t) in &snapshot.tenants {
        for tr in t.trials.values() {
            let warn = tr.expires_ms - i64::from(c.trial_warning_days) * DAY_MS;
            if warn <= now && now < tr.expires_ms {
                out.push(OutboxEvent::new(
                    tenant,
                    "trial.expiring",
                    format!("trial.expiring/{tenant}/{}/{}", tr.user, tr.expires_ms),
                    now,
                    serde_json::json!({ "tenant": tenant, "user": tr.user, "expires_at": at(tr.expires_ms) }),
                ));
            }
            if tr.expires_ms <= now && now < tr.expires_ms + 7 * DAY_MS {
                out.push(OutboxEvent::new(
                    tenant,
                    "trial.expired",
                    format!("trial.expired/{tenant}/{}/{}", tr.user, tr.expires_ms),
                    now,
                    serde_json::json!({ "tenant": tenant, "user": tr.user, "expired_at": at(tr.expires_ms) }),
                ));
            }
        }
        let bought = t.seats_bought(now);
        if bought > 0 && t.seats.len() as u64 >= bought {
            let month = month_label(month_of(now));
            out.push(OutboxEvent::new(
                tenant,
                "seats.full",
                format!("seats.full/{tenant}/{month}"),
                now,
                serde_json::json!({ "tenant": tenant, "month": month, "seats": bought, "taken": t.seats.len() }),
            ));
        }
    }
    for bot in app.channel().bots.all() {
        let Some(stop) = app.licensing().serving_until(&bot.tenant, bot.owner.as_deref(), now) else {
            continue;
        };
        let warn = stop - i64::from(c.grace_warning_days) * DAY_MS;
        if warn <= now && now < stop {
            out.push(OutboxEvent::new(
                &bot.tenant,
                "bot.grace_ending",
                format!("bot.grace_ending/{}/{}/{stop}", bot.tenant, bot.id),
                now,
                serde_json::json!({
                    "tenant": bot.tenant,
                    "bot": bot.id,
                    "owner": bot.owner,
                    "stops_at": at(stop),
                }),
            ));
        }
    }
    out
}

/// The month's forecast of every tenant, exported as gauges; an event for each whose pool runs
/// out before the month ends.
async fn forecast_events(app: &AppState, now: Millis) -> Vec<OutboxEvent> {
    use crate::metering::forecast::{project, window_start};
    let store = app.store().clone();
    let rows = match tokio::task::spawn_blocking(move || store.load_usage()).await {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "Reading usage for the forecast failed; will retry.");
            return Vec::new();
        }
        Err(_) => return Vec::new(),
    };
    let month = month_of(now);
    let label = month_label(month);
    let today = crate::licensing::model::day(now);
    // tenant -> (billed this month, overage this month, trailing days)
    let mut per: BTreeMap<&str, (u64, u64, BTreeMap<NaiveDate, u64>)> = BTreeMap::new();
    for u in &rows {
        let e = per.entry(u.tenant.as_str()).or_default();
        if u.day.starts_with(&label) {
            e.0 += u.sessions;
            e.1 += u.overage;
        }
        if let Ok(d) = u.day.parse::<NaiveDate>()
            && d >= window_start(today)
            && d <= today
        {
            *e.2.entry(d).or_default() += u.sessions;
        }
    }
    let notifier = app.notifier();
    let mut out = Vec::new();
    for tenant in app.licensing().snapshot().tenants.keys() {
        let (billed, overage, trailing) = per.remove(tenant.as_str()).unwrap_or_default();
        let capacity = app.metering().pool(tenant).capacity(month);
        let trailing: Vec<(NaiveDate, u64)> = trailing.into_iter().collect();
        let f = project(now, month_start_ms(month + 1), billed, billed - overage, capacity, &trailing);
        notifier.projected.with_label_values(&[tenant.as_str()]).set(f.projected_total as i64);
        match f.exhaustion_ms {
            Some(at) => notifier.exhaustion.with_label_values(&[tenant.as_str()]).set(at.div_euclid(1000)),
            None => {
                let _ = notifier.exhaustion.remove_label_values(&[tenant.as_str()]);
            }
        }
        // Only a pool that is not empty yet runs out "before the month ends"; an empty one has
        // had its 100% event.
        if let Some(at) = f.exhaustion_ms
            && capacity > billed - overage
            && at > now
        {
            out.push(OutboxEvent::new(
                tenant,
                "capacity.forecast_exhaustion",
                format!("capacity.forecast_exhaustion/{tenant}/{label}"),
                now,
                serde_json::json!({
                    "tenant": tenant,
                    "month": label,
                    "used": billed - overage,
                    "capacity": capacity,
                    "daily_rate": (f.daily_rate * 1000.0).round() / 1000.0,
                    "projected_billed_sessions": f.projected_total,
                    "projected_exhaustion": crate::clock::rfc3339_ms(at),
                }),
            ));
        }
    }
    out
}
