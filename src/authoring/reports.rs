//! Usage reports: a bot's analytics for its authors, a tenant's month for its admins. Both read
//! the ledger (billed sessions, exact) and the flushed daily counters, flushing first, so they
//! agree with `/metrics`.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use chrono::NaiveDate;
use http::{HeaderMap, header};
use serde::{Deserialize, Serialize};
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
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Range {
    /// The first day, YYYY-MM-DD (inclusive).
    #[param(format = Date)]
    from: Option<String>,
    /// The last day, YYYY-MM-DD (inclusive).
    #[param(format = Date)]
    to: Option<String>,
}

fn parse_day(s: &Option<String>, what: &str) -> Result<Option<NaiveDate>, ApiError> {
    s.as_deref()
        .map(|d| {
            d.parse::<NaiveDate>()
                .map_err(|_| ApiError::bad_request(format!("`{what}` must be a date, YYYY-MM-DD.")))
        })
        .transpose()
}

/// `GET /api/v1/bots/{botId}/analytics?from=YYYY-MM-DD&to=YYYY-MM-DD`: billed sessions, overage,
/// turns and topic flow runs per day, and totals (both ends inclusive; default: everything).
#[utoipa::path(get, path = "/api/v1/bots/{bot_id}/analytics", tag = "usage", params(("bot_id" = String, Path, description = "The bot id"), Range), responses((status = 200, description = "Sessions, overage and turns per day with data, and totals", body = serde_json::Value)))]
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
    let mut flows = [0u64; 4];
    for u in rows.iter().filter(|u| u.tenant == bot.tenant && u.bot == bot.id) {
        let Ok(d) = u.day.parse::<NaiveDate>() else { continue };
        if from.is_some_and(|f| d < f) || to.is_some_and(|t| d > t) {
            continue;
        }
        sessions += u.sessions;
        overage += u.overage;
        turns += u.turns;
        for (f, n) in flows.iter_mut().zip(u.flows) {
            *f += n;
        }
        let flow_runs: u64 = u.flows.iter().sum();
        days.push(json!({"day": u.day, "billed_sessions": u.sessions, "overage_sessions": u.overage, "turns": u.turns, "flow_runs": flow_runs}));
    }
    Ok(Json(json!({
        "bot": bot.id,
        "from": r.from,
        "to": r.to,
        "days": days,
        "totals": {
            "billed_sessions": sessions,
            "overage_sessions": overage,
            "turns": turns,
            "flow_runs": flows.iter().sum::<u64>(),
            "flow_runs_by_outcome": {"ok": flows[0], "failed": flows[1], "timeout": flows[2], "refused": flows[3]},
        },
    }))
    .into_response())
}

/// The report month.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MonthQuery {
    /// The month, YYYY-MM (default: the current one).
    #[param(pattern = "^[1-9][0-9]{3}-(0[1-9]|1[0-2])$")]
    month: Option<String>,
}

/// `GET /api/v1/admin/usage?month=YYYY-MM`: the tenant's capacity, used, remaining, overage,
/// and a per-bot breakdown (default: the current month).
#[utoipa::path(get, path = "/api/v1/admin/usage", tag = "usage", params(MonthQuery), responses((status = 200, description = "The month: capacity, used, remaining, overage, leased, policy, per bot", body = TenantMonth)))]
pub async fn tenant_usage(
    State(app): State<AppState>,
    Admin(p): Admin,
    Query(q): Query<MonthQuery>,
) -> Result<Response, ApiError> {
    let month = match q.month.as_deref() {
        None => app.metering().current_month(),
        Some(m) => parse_month(m).ok_or_else(|| ApiError::bad_request("`month` must be YYYY-MM."))?,
    };
    let label = month_label(month);
    let tenant = &p.identity.tenant;
    take_report(&app, &p.identity)?;
    let rows = usage(&app).await?;
    let mut bots: BTreeMap<&str, (u64, u64, u64, u64)> = BTreeMap::new();
    for u in rows.iter().filter(|u| &u.tenant == tenant && u.day.starts_with(&label)) {
        let e = bots.entry(&u.bot).or_default();
        e.0 += u.sessions;
        e.1 += u.overage;
        e.2 += u.turns;
        e.3 += u.flows.iter().sum::<u64>();
    }
    let sessions: u64 = bots.values().map(|b| b.0).sum();
    let overage: u64 = bots.values().map(|b| b.1).sum();
    let pool = app.metering().pool(tenant);
    let capacity = pool.capacity(month);
    let used = sessions - overage;
    let forecast = (month == app.metering().current_month()).then(|| {
        use crate::metering::forecast::{project, window_start};
        let now = app.clock().now_ms();
        let today = crate::licensing::model::day(now);
        let mut trailing: BTreeMap<NaiveDate, u64> = BTreeMap::new();
        for u in rows.iter().filter(|u| &u.tenant == tenant) {
            if let Ok(d) = u.day.parse::<NaiveDate>()
                && d >= window_start(today)
                && d <= today
            {
                *trailing.entry(d).or_default() += u.sessions;
            }
        }
        let trailing: Vec<(NaiveDate, u64)> = trailing.into_iter().collect();
        let f = project(
            now,
            crate::metering::pool::month_start_ms(month + 1),
            sessions,
            used,
            capacity,
            &trailing,
        );
        ForecastView {
            daily_rate: (f.daily_rate * 1000.0).round() / 1000.0,
            projected_billed_sessions: f.projected_total,
            projected_exhaustion: f.exhaustion_ms.map(crate::clock::rfc3339_ms),
        }
    });
    Ok(Json(TenantMonth {
        tenant: tenant.clone(),
        month: label,
        capacity,
        used,
        remaining: capacity.saturating_sub(used),
        overage,
        billed_sessions: sessions,
        leased: pool.lease_remaining(month),
        policy: pool.policy(),
        forecast,
        bots: bots
            .iter()
            .map(|(bot, (s, o, t, f))| BotMonth {
                bot: bot.to_string(),
                billed_sessions: *s,
                overage_sessions: *o,
                turns: *t,
                flow_runs: *f,
            })
            .collect(),
    })
    .into_response())
}

/// A tenant's month.
#[derive(Serialize, utoipa::ToSchema)]
pub struct TenantMonth {
    tenant: String,
    /// YYYY-MM.
    month: String,
    /// Sessions the month's licenses and add-ons (or the trial capacity) allow.
    capacity: u64,
    /// Billed sessions drawn from the capacity.
    used: u64,
    /// Capacity left.
    remaining: u64,
    /// Sessions served beyond the capacity under `allow_overage`.
    overage: u64,
    /// Every billed session of the month (used + overage).
    billed_sessions: u64,
    /// Units this node holds leased and not yet used (several nodes; 0 with one).
    leased: u64,
    /// What happens when the month runs out.
    policy: crate::config::CapacityPolicy,
    /// The current month's projection at the current rate (none for other months).
    forecast: Option<ForecastView>,
    /// Per bot.
    bots: Vec<BotMonth>,
}

/// The month's projection (see `metering::forecast` for the method).
#[derive(Serialize, utoipa::ToSchema)]
pub struct ForecastView {
    /// Billed sessions per day: the last 7 days' sessions over the time since the first of them
    /// that has any.
    daily_rate: f64,
    /// The month so far plus that rate over the rest of the month.
    projected_billed_sessions: u64,
    /// When the remaining capacity is used at that rate (RFC 3339), if before the month ends.
    projected_exhaustion: Option<String>,
}

/// One bot's month.
#[derive(Serialize, utoipa::ToSchema)]
pub struct BotMonth {
    bot: String,
    billed_sessions: u64,
    overage_sessions: u64,
    turns: u64,
    /// Topic flow runs, every outcome (billed to nobody).
    flow_runs: u64,
}

/// Daily series over a range: `days[i]` is the day of each series' `i`th value.
#[derive(Serialize, utoipa::ToSchema)]
pub struct DailySeries {
    tenant: String,
    /// The first day, YYYY-MM-DD.
    from: String,
    /// The last day, YYYY-MM-DD.
    to: String,
    /// Every day of the range, in order.
    days: Vec<String>,
    /// Per bot, one value per day.
    bots: Vec<BotSeries>,
    /// The tenant's total (or the one bot's), one value per day.
    total: Series,
}

/// One bot's daily values.
#[derive(Serialize, utoipa::ToSchema)]
pub struct BotSeries {
    bot: String,
    #[serde(flatten)]
    series: Series,
}

/// Billed sessions, overage sessions and turns, one value per day.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Series {
    billed_sessions: Vec<u64>,
    overage_sessions: Vec<u64>,
    turns: Vec<u64>,
}

impl Series {
    fn of(s: &[Vec<u64>; 3]) -> Self {
        Self { billed_sessions: s[0].clone(), overage_sessions: s[1].clone(), turns: s[2].clone() }
    }
}

/// Months, the current one last.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Months {
    tenant: String,
    months: Vec<MonthTotals>,
}

/// One month's totals.
#[derive(Serialize, utoipa::ToSchema)]
pub struct MonthTotals {
    /// YYYY-MM.
    month: String,
    capacity: u64,
    used: u64,
    remaining: u64,
    overage: u64,
    billed_sessions: u64,
    turns: u64,
}

/// The longest range of a daily series: three months.
pub const MAX_RANGE_DAYS: i64 = 92;

/// A daily series' range: `from` and `to` inclusive, default the 30 days up to today.
fn series_range(app: &AppState, r: &Range) -> Result<(NaiveDate, NaiveDate), ApiError> {
    let today = crate::licensing::model::day(app.clock().now_ms());
    let to = parse_day(&r.to, "to")?.unwrap_or(today);
    let from = parse_day(&r.from, "from")?.unwrap_or(to - chrono::Duration::days(29));
    if from > to {
        return Err(ApiError::bad_request("`from` is after `to`."));
    }
    if (to - from).num_days() + 1 > MAX_RANGE_DAYS {
        return Err(ApiError::bad_request(format!(
            "A daily series covers at most {MAX_RANGE_DAYS} days (three months)."
        )));
    }
    Ok((from, to))
}

/// Whether the caller asked for CSV (`Accept: text/csv`).
fn wants_csv(headers: &HeaderMap) -> bool {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("text/csv"))
}

fn csv(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], body).into_response()
}

/// Per-day counts of each bot over a range: `days[i]` is the day of every series' `i`th value.
struct Daily {
    days: Vec<NaiveDate>,
    /// Per bot: billed sessions, overage sessions, turns, one value per day.
    bots: BTreeMap<String, [Vec<u64>; 3]>,
}

impl Daily {
    /// The series of `tenant`'s bots (or of `only` that bot); `bots` start at zero.
    fn of(
        rows: &[DailyUsage],
        tenant: &str,
        only: Option<&str>,
        bots: &[String],
        from: NaiveDate,
        to: NaiveDate,
    ) -> Self {
        let days: Vec<NaiveDate> = from.iter_days().take_while(|d| *d <= to).collect();
        let zero = || [vec![0; days.len()], vec![0; days.len()], vec![0; days.len()]];
        let mut out: BTreeMap<String, [Vec<u64>; 3]> = bots.iter().map(|b| (b.clone(), zero())).collect();
        for u in rows.iter().filter(|u| u.tenant == tenant && only.is_none_or(|b| b == u.bot)) {
            let Ok(d) = u.day.parse::<NaiveDate>() else { continue };
            if d < from || d > to {
                continue;
            }
            let i = (d - from).num_days() as usize;
            let e = out.entry(u.bot.clone()).or_insert_with(zero);
            e[0][i] += u.sessions;
            e[1][i] += u.overage;
            e[2][i] += u.turns;
        }
        Self { days, bots: out }
    }

    fn json(&self, tenant: &str) -> DailySeries {
        let n = self.days.len();
        let mut total = [vec![0u64; n], vec![0u64; n], vec![0u64; n]];
        for series in self.bots.values() {
            for (t, s) in total.iter_mut().zip(series) {
                for (a, b) in t.iter_mut().zip(s) {
                    *a += b;
                }
            }
        }
        DailySeries {
            tenant: tenant.to_string(),
            from: self.days.first().map(|d| d.to_string()).unwrap_or_default(),
            to: self.days.last().map(|d| d.to_string()).unwrap_or_default(),
            days: self.days.iter().map(|d| d.to_string()).collect(),
            bots: self
                .bots
                .iter()
                .map(|(bot, s)| BotSeries { bot: bot.clone(), series: Series::of(s) })
                .collect(),
            total: Series::of(&total),
        }
    }

    fn csv(&self) -> String {
        let mut out = String::from("day,bot,billed_sessions,overage_sessions,turns\n");
        for (i, d) in self.days.iter().enumerate() {
            for (bot, s) in &self.bots {
                out.push_str(&format!("{d},{bot},{},{},{}\n", s[0][i], s[1][i], s[2][i]));
            }
        }
        out
    }
}

/// `GET /api/v1/admin/usage/daily?from=YYYY-MM-DD&to=YYYY-MM-DD`: billed sessions, overage and
/// turns per day and bot of the caller's tenant, dense (a zero where nothing happened), with
/// the tenant's total per day; at most 92 days, default the last 30. `Accept: text/csv` for
/// CSV (`day,bot,billed_sessions,overage_sessions,turns`).
#[utoipa::path(get, path = "/api/v1/admin/usage/daily", tag = "usage", params(Range), responses((status = 200, description = "Dense daily series per bot and the tenant total", content((DailySeries = "application/json"), (String = "text/csv")))))]
pub async fn tenant_daily(
    State(app): State<AppState>,
    Admin(p): Admin,
    headers: HeaderMap,
    Query(r): Query<Range>,
) -> Result<Response, ApiError> {
    let (from, to) = series_range(&app, &r)?;
    take_report(&app, &p.identity)?;
    let tenant = &p.identity.tenant;
    let rows = usage(&app).await?;
    let bots: Vec<String> =
        app.channel().bots.all().iter().filter(|b| &b.tenant == tenant).map(|b| b.id.clone()).collect();
    let d = Daily::of(&rows, tenant, None, &bots, from, to);
    Ok(if wants_csv(&headers) { csv(d.csv()) } else { Json(d.json(tenant)).into_response() })
}

/// `GET /api/v1/bots/{botId}/usage/daily?from=&to=`: the same series for one bot, for those
/// who may read the bot.
#[utoipa::path(get, path = "/api/v1/bots/{bot_id}/usage/daily", tag = "usage", params(("bot_id" = String, Path, description = "The bot id"), Range), responses((status = 200, description = "Dense daily series of one bot", content((DailySeries = "application/json"), (String = "text/csv")))))]
pub async fn bot_daily(
    State(app): State<AppState>,
    Author(p, _): Author,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(r): Query<Range>,
) -> Result<Response, ApiError> {
    let bot = bot_for(&app, &p, &id, Access::Read)?;
    let (from, to) = series_range(&app, &r)?;
    take_report(&app, &p.identity)?;
    let rows = usage(&app).await?;
    let d = Daily::of(&rows, &bot.tenant, Some(&bot.id), std::slice::from_ref(&bot.id), from, to);
    Ok(if wants_csv(&headers) { csv(d.csv()) } else { Json(d.json(&bot.tenant)).into_response() })
}

/// How many months a monthly report covers.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MonthsQuery {
    /// How many months, the current one last (default 12).
    #[param(minimum = 1, maximum = 24)]
    months: Option<u32>,
}

/// `GET /api/v1/admin/usage/monthly?months=12`: capacity, used, overage, billed sessions and
/// turns of each month, the current one last (1 to 24 months). `Accept: text/csv` for CSV.
#[utoipa::path(get, path = "/api/v1/admin/usage/monthly", tag = "usage", params(MonthsQuery), responses((status = 200, description = "Totals per month, the current one last", content((Months = "application/json"), (String = "text/csv")))))]
pub async fn tenant_monthly(
    State(app): State<AppState>,
    Admin(p): Admin,
    headers: HeaderMap,
    Query(q): Query<MonthsQuery>,
) -> Result<Response, ApiError> {
    let n = q.months.unwrap_or(12);
    if !(1..=24).contains(&n) {
        return Err(ApiError::bad_request("`months` is 1 to 24."));
    }
    take_report(&app, &p.identity)?;
    let tenant = &p.identity.tenant;
    let rows = usage(&app).await?;
    let current = app.metering().current_month();
    let pool = app.metering().pool(tenant);
    let months: Vec<_> = (0..n)
        .rev()
        .map(|back| {
            let m = current - back;
            let label = month_label(m);
            let (mut sessions, mut overage, mut turns) = (0, 0, 0);
            for u in rows.iter().filter(|u| &u.tenant == tenant && u.day.starts_with(&label)) {
                sessions += u.sessions;
                overage += u.overage;
                turns += u.turns;
            }
            let capacity = pool.capacity(m);
            (label, capacity, sessions - overage, overage, sessions, turns)
        })
        .collect();
    if wants_csv(&headers) {
        let mut out = String::from("month,capacity,used,overage,billed_sessions,turns\n");
        for (label, c, u, o, s, t) in &months {
            out.push_str(&format!("{label},{c},{u},{o},{s},{t}\n"));
        }
        return Ok(csv(out));
    }
    Ok(Json(Months {
        tenant: tenant.clone(),
        months: months
            .into_iter()
            .map(|(month, capacity, used, overage, billed_sessions, turns)| MonthTotals {
                month,
                capacity,
                used,
                remaining: capacity.saturating_sub(used),
                overage,
                billed_sessions,
                turns,
            })
            .collect(),
    })
    .into_response())
}
