//! Usage reports: a bot's analytics for its authors, a tenant's month for its admins. Both read
//! the ledger (billed sessions, exact) and the flushed daily counters, flushing first, so they
//! agree with `/metrics`.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use chrono::NaiveDate;
use serde::Deserialize;
use serde_json::json;

use super::bots::{Access, bot_for};
use crate::error::ApiError;
use crate::licensing::layer::{Admin, Author};
use crate::metering::pool::{month_label, parse_month};
use crate::state::AppState;
use crate::store::DailyUsage;

/// A per-caller rate on the report endpoints (analytics, tenant usage, the audit log): each
/// reads a whole table, so one caller cannot keep the store busy. Entries exist only for
/// authenticated callers, and are dropped wholesale past a bound (a caller loses at most the
/// rest of one minute's count).
pub struct ReportRate {
    per_minute: u32,
    callers: dashmap::DashMap<(String, String), crate::metering::counters::RateLimit>,
}

impl Default for ReportRate {
    fn default() -> Self {
        Self::new(60)
    }
}

/// Callers tracked at most before the map is cleared.
const MAX_TRACKED_CALLERS: usize = 10_000;

impl ReportRate {
    /// At most `per_minute` report requests per caller and calendar minute.
    pub fn new(per_minute: u32) -> Self {
        Self { per_minute, callers: dashmap::DashMap::new() }
    }

    /// Takes one report request of `user` in `tenant` at `now`, or answers 429 `RateLimited`.
    pub fn take(&self, tenant: &str, user: &str, now: crate::clock::Millis) -> Result<(), ApiError> {
        if self.callers.len() >= MAX_TRACKED_CALLERS {
            self.callers.clear();
        }
        let limit = self
            .callers
            .entry((tenant.to_string(), user.to_string()))
            .or_insert_with(|| crate::metering::counters::RateLimit::new(self.per_minute));
        limit.take(now).map_err(|retry| {
            ApiError::new(
                http::StatusCode::TOO_MANY_REQUESTS,
                "RateLimited",
                format!(
                    "Reports are limited to {} requests a minute. Try again in {retry} seconds.",
                    self.per_minute
                ),
            )
            .with_retry_after(retry)
        })
    }
}

/// Takes one report request for the caller.
pub fn take_report(app: &AppState, identity: &crate::identity::Identity) -> Result<(), ApiError> {
    app.authoring().reports.take(&identity.tenant, &identity.user, app.clock().now_ms())
}

async fn usage(app: &AppState) -> Result<Vec<DailyUsage>, ApiError> {
    let metering = app.metering().clone();
    tokio::task::spawn_blocking(move || metering.usage()).await.map_err(|_| ApiError::internal())?.map_err(
        |e| {
            tracing::error!(error = %e, "Reading usage failed.");
            ApiError::unavailable("StoreUnavailable", "Usage could not be read. Try again.")
        },
    )
}

/// The analytics range.
#[derive(Deserialize)]
pub struct Range {
    from: Option<String>,
    to: Option<String>,
}

fn parse_day(s: &Option<String>, what: &str) -> Result<Option<NaiveDate>, ApiError> {
    s.as_deref()
        .filter(|s| !s.is_empty())
        .map(|d| {
            d.parse::<NaiveDate>()
                .map_err(|_| ApiError::bad_request(format!("`{what}` must be a date, YYYY-MM-DD.")))
        })
        .transpose()
}

/// `GET /api/v1/bots/{botId}/analytics?from=YYYY-MM-DD&to=YYYY-MM-DD`: billed sessions, overage
/// and turns per day, and totals (both ends inclusive; default: everything).
pub async fn analytics(
    State(app): State<AppState>,
    Author(p, _): Author,
    Path(id): Path<String>,
    Query(r): Query<Range>,
) -> Result<Response, ApiError> {
    let bot = bot_for(&app, &p, &id, Access::Read)?;
    let (from, to) = (parse_day(&r.from, "from")?, parse_day(&r.to, "to")?);
    take_report(&app, &p.identity)?;
    let rows = usage(&app).await?;
    let mut days = Vec::new();
    let (mut sessions, mut overage, mut turns) = (0, 0, 0);
    for u in rows.iter().filter(|u| u.tenant == bot.tenant && u.bot == bot.id) {
        let Ok(d) = u.day.parse::<NaiveDate>() else { continue };
        if from.is_some_and(|f| d < f) || to.is_some_and(|t| d > t) {
            continue;
        }
        sessions += u.sessions;
        overage += u.overage;
        turns += u.turns;
        days.push(json!({"day": u.day, "billed_sessions": u.sessions, "overage_sessions": u.overage, "turns": u.turns}));
    }
    Ok(Json(json!({
        "bot": bot.id,
        "from": r.from,
        "to": r.to,
        "days": days,
        "totals": {"billed_sessions": sessions, "overage_sessions": overage, "turns": turns},
    }))
    .into_response())
}

/// The report month.
#[derive(Deserialize)]
pub struct MonthQuery {
    month: Option<String>,
}

/// `GET /api/v1/admin/usage?month=YYYY-MM`: the tenant's capacity, used, remaining, overage,
/// and a per-bot breakdown (default: the current month).
pub async fn tenant_usage(
    State(app): State<AppState>,
    Admin(p): Admin,
    Query(q): Query<MonthQuery>,
) -> Result<Response, ApiError> {
    let month = match q.month.as_deref() {
        None | Some("") => app.metering().current_month(),
        Some(m) => parse_month(m).ok_or_else(|| ApiError::bad_request("`month` must be YYYY-MM."))?,
    };
    let label = month_label(month);
    let tenant = &p.identity.tenant;
    take_report(&app, &p.identity)?;
    let rows = usage(&app).await?;
    let mut bots: BTreeMap<&str, (u64, u64, u64)> = BTreeMap::new();
    for u in rows.iter().filter(|u| &u.tenant == tenant && u.day.starts_with(&label)) {
        let e = bots.entry(&u.bot).or_default();
        e.0 += u.sessions;
        e.1 += u.overage;
        e.2 += u.turns;
    }
    let sessions: u64 = bots.values().map(|b| b.0).sum();
    let overage: u64 = bots.values().map(|b| b.1).sum();
    let capacity = app.metering().pool(tenant).capacity(month);
    let used = sessions - overage;
    Ok(Json(json!({
        "tenant": tenant,
        "month": label,
        "capacity": capacity,
        "used": used,
        "remaining": capacity.saturating_sub(used),
        "overage": overage,
        "billed_sessions": sessions,
        "bots": bots.iter().map(|(bot, (s, o, t))| json!({"bot": bot, "billed_sessions": s, "overage_sessions": o, "turns": t})).collect::<Vec<_>>(),
    }))
    .into_response())
}
