//! Time, behind a trait, so every rule with a clock in it can be tested by moving time.
//!
//! Session limits, idle expiry, token expiry, trials and month rollover all read a [`Clock`]; the
//! server uses [`SystemClock`], tests hand it a [`ManualClock`] and move it.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// Milliseconds since the Unix epoch, UTC.
pub type Millis = i64;

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    /// Now, in milliseconds since the Unix epoch.
    fn now_ms(&self) -> Millis;

    /// Now, in whole seconds since the Unix epoch.
    fn now_secs(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }

    /// Whether this is the operating system's wall clock (then rules shared across machines,
    /// such as lease expiry in Redis, are judged by the shared server's own clock instead).
    fn is_wall_clock(&self) -> bool {
        false
    }
}

/// A shared clock handle; cloning is shallow.
pub type SharedClock = Arc<dyn Clock>;

/// The operating system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as Millis)
            .unwrap_or(0)
    }

    fn is_wall_clock(&self) -> bool {
        true
    }
}

/// A clock that moves only when told to; for tests.
#[derive(Debug)]
pub struct ManualClock {
    // Relaxed suffices: the value is a standalone timestamp, no other memory is published with it.
    now: AtomicI64,
}

impl ManualClock {
    /// A clock standing at `start_ms`.
    pub fn new(start_ms: Millis) -> Arc<Self> {
        Arc::new(Self { now: AtomicI64::new(start_ms) })
    }

    /// A clock standing at the given RFC 3339 instant; panics on a malformed literal (tests only).
    pub fn at(rfc3339: &str) -> Arc<Self> {
        let t = chrono::DateTime::parse_from_rfc3339(rfc3339).expect("RFC 3339 instant");
        Self::new(t.timestamp_millis())
    }

    /// Moves the clock forward by `ms` milliseconds.
    pub fn advance_ms(&self, ms: i64) {
        self.now.fetch_add(ms, Ordering::Relaxed);
    }

    /// Moves the clock forward by `secs` seconds.
    pub fn advance_secs(&self, secs: i64) {
        self.advance_ms(secs * 1000);
    }

    /// Sets the clock to `ms`.
    pub fn set_ms(&self, ms: Millis) {
        self.now.store(ms, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> Millis {
        self.now.load(Ordering::Relaxed)
    }
}

/// Formats milliseconds since the epoch as an RFC 3339 UTC timestamp with millisecond precision,
/// the form Direct Line clients expect (`2026-11-28T03:36:17.123Z`).
///
/// Written by hand (days to civil date, then fixed-width digits) because every activity carries
/// one: chrono's `format` parses its pattern on each call and was 2% of a message's CPU in the
/// msg_sys profile of `benches/load.sh`.
pub fn rfc3339_ms(ms: Millis) -> String {
    let mut out = String::with_capacity(24);
    push_rfc3339_ms(&mut out, ms);
    out
}

/// Appends [`rfc3339_ms`]'s form of `ms` to `out` (no allocation of its own).
pub fn push_rfc3339_ms(out: &mut String, ms: Millis) {
    let ms = ms.max(0);
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s, milli) = (rem / 3_600_000, rem / 60_000 % 60, rem / 1000 % 60, rem % 1000);
    let mut b = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: i64| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, y.clamp(0, 9999));
    put(5, 2, mo);
    put(8, 2, d);
    put(11, 2, h);
    put(14, 2, mi);
    put(17, 2, s);
    put(20, 3, milli);
    // ASCII digits and separators: the check passes, and one copy beats 24 char pushes.
    out.push_str(std::str::from_utf8(&b).unwrap_or("1970-01-01T00:00:00.000Z"));
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::at("2026-11-28T00:00:00Z");
        let t0 = c.now_ms();
        assert_eq!(c.now_ms(), t0);
        c.advance_secs(61);
        assert_eq!(c.now_ms(), t0 + 61_000);
        assert_eq!(c.now_secs(), t0 / 1000 + 61);
    }

    #[test]
    fn formats_rfc3339_with_millis() {
        assert_eq!(rfc3339_ms(1_764_300_977_123), "2025-11-28T03:36:17.123Z");
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        // Agrees with chrono across leap years and month ends.
        for ms in (0..200).map(|i| 951_782_400_000 + i * 7_654_321_987) {
            let want = chrono::DateTime::from_timestamp_millis(ms)
                .unwrap()
                .format("%Y-%m-%dT%H:%M:%S%.3fZ")
                .to_string();
            assert_eq!(rfc3339_ms(ms), want);
        }
    }
}
