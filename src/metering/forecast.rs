//! The month's projection: how many billed sessions the month ends with, and when the pool runs
//! out, at the current rate.
//!
//! The rate is the trailing days' daily average: the billed sessions of the last
//! [`TRAILING_DAYS`] UTC days up to now (today's part included), divided by the time they span,
//! which starts at the first of those days that has sessions (so a tenant that began yesterday
//! is not averaged over a week it did not exist). The projected total is the month so far plus
//! that rate over the rest of the month; the pool runs out when the month's remaining capacity
//! is used at that rate, if that is before the month ends.

use chrono::NaiveDate;

use crate::clock::Millis;

/// Days the rate averages over.
pub const TRAILING_DAYS: i64 = 7;

const DAY_MS: f64 = 86_400_000.0;

/// A month's projection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Forecast {
    /// Billed sessions per day at the current rate.
    pub daily_rate: f64,
    /// Billed sessions the month ends with at that rate.
    pub projected_total: u64,
    /// When the capacity runs out at that rate, if before the month ends (now if it has).
    pub exhaustion_ms: Option<Millis>,
}

/// The first day the rate's window may start: `TRAILING_DAYS - 1` days before `today`.
pub fn window_start(today: NaiveDate) -> NaiveDate {
    today - chrono::Duration::days(TRAILING_DAYS - 1)
}

/// Projects the month ending at `month_end_ms` from `now_ms`. `billed` and `used` are the month's
/// billed sessions so far (overage included) and those drawn from `capacity`; `trailing` the
/// billed sessions of each day from [`window_start`] to today (days without any left out).
pub fn project(
    now_ms: Millis,
    month_end_ms: Millis,
    billed: u64,
    used: u64,
    capacity: u64,
    trailing: &[(NaiveDate, u64)],
) -> Forecast {
    let sessions: u64 = trailing.iter().map(|(_, n)| n).sum();
    let first = trailing.iter().filter(|(_, n)| *n > 0).map(|(d, _)| *d).min();
    let daily_rate = match first {
        Some(d) => {
            let start = d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc().timestamp_millis();
            let span = (now_ms - start).max(1) as f64 / DAY_MS;
            sessions as f64 / span
        }
        None => 0.0,
    };
    let left_days = (month_end_ms - now_ms).max(0) as f64 / DAY_MS;
    let projected_total = billed + (daily_rate * left_days).round() as u64;
    let exhaustion_ms = if capacity == 0 {
        None
    } else if used >= capacity {
        Some(now_ms)
    } else if daily_rate > 0.0 {
        let at = now_ms + ((capacity - used) as f64 / daily_rate * DAY_MS) as Millis;
        (at < month_end_ms).then_some(at)
    } else {
        None
    };
    Forecast { daily_rate, projected_total, exhaustion_ms }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(t: &str) -> Millis {
        chrono::DateTime::parse_from_rfc3339(t).unwrap().timestamp_millis()
    }

    fn day(d: &str) -> NaiveDate {
        d.parse().unwrap()
    }

    #[test]
    fn the_rate_spans_from_the_first_day_with_sessions() {
        // 26 sessions since 2026-11-28 00:00, now 2026-11-30 10:00: 58 hours.
        let trailing = [(day("2026-11-28"), 10), (day("2026-11-29"), 10), (day("2026-11-30"), 6)];
        let f = project(ms("2026-11-30T10:00:00Z"), ms("2026-12-01T00:00:00Z"), 26, 26, 100, &trailing);
        assert!((f.daily_rate - 26.0 * 24.0 / 58.0).abs() < 1e-9);
        // 14 hours left: 26 + 26 * 14 / 58 = 32.28.
        assert_eq!(f.projected_total, 32);
        assert_eq!(f.exhaustion_ms, None, "74 left lasts past the month");
        // A pool of 30: 4 left at 26 per 58 hours runs out 4 * 58 / 26 hours after now.
        let f = project(ms("2026-11-30T10:00:00Z"), ms("2026-12-01T00:00:00Z"), 26, 26, 30, &trailing);
        assert_eq!(f.exhaustion_ms, Some(ms("2026-11-30T10:00:00Z") + 4 * 58 * 3_600_000 / 26));
    }

    #[test]
    fn no_sessions_no_rate_and_an_empty_pool_has_run_out() {
        let f = project(ms("2026-11-30T10:00:00Z"), ms("2026-12-01T00:00:00Z"), 0, 0, 100, &[]);
        assert_eq!((f.daily_rate, f.projected_total, f.exhaustion_ms), (0.0, 0, None));
        let f = project(ms("2026-11-30T10:00:00Z"), ms("2026-12-01T00:00:00Z"), 5, 5, 5, &[]);
        assert_eq!(f.exhaustion_ms, Some(ms("2026-11-30T10:00:00Z")));
        let f = project(ms("2026-11-30T10:00:00Z"), ms("2026-12-01T00:00:00Z"), 5, 0, 0, &[]);
        assert_eq!(f.exhaustion_ms, None, "no capacity: nothing to run out of");
    }
}
