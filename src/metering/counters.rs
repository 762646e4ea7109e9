//! Per-bot counters and the per-bot message rate limit: plain atomics, resolved once per
//! conversation, so a turn costs a few atomic operations.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::bots::flow::Outcome;
use crate::clock::Millis;

use super::pool::TenantPool;

/// The usage counters of one bot, since the ledger began (rebuilt from the store at start).
///
/// Relaxed everywhere: each is a monotonic counter read on its own at scrape time; billing
/// exactness rests on the pool's CAS and the ledger, not on these.
#[derive(Debug)]
pub struct BotCounters {
    /// The tenant.
    pub tenant: String,
    /// The bot.
    pub bot: String,
    /// The tenant's pool.
    pub pool: Arc<TenantPool>,
    billed: AtomicU64,
    overage: AtomicU64,
    turns: AtomicU64,
    rejected_capacity: AtomicU64,
    rejected_rate: AtomicU64,
    /// Topic flow runs by outcome, indexed as [`Outcome::ALL`]; billed to nobody.
    flows: [AtomicU64; 4],
    rate: RateLimit,
}

/// A snapshot of a bot's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Billed sessions (overage included).
    pub billed: u64,
    /// Overage sessions.
    pub overage: u64,
    /// Turns.
    pub turns: u64,
    /// Messages refused because capacity was used up.
    pub rejected_capacity: u64,
    /// Messages refused by the rate limit.
    pub rejected_rate: u64,
    /// Topic flow runs by outcome, indexed as [`Outcome::ALL`].
    pub flows: [u64; 4],
}

impl CounterSnapshot {
    /// Topic flow runs, every outcome.
    pub fn flow_runs(&self) -> u64 {
        self.flows.iter().sum()
    }
}

impl BotCounters {
    /// Counters starting from `start`, with a rate limit of `per_minute`.
    pub fn new(
        tenant: &str,
        bot: &str,
        pool: Arc<TenantPool>,
        start: CounterSnapshot,
        per_minute: u32,
    ) -> Self {
        Self {
            tenant: tenant.to_string(),
            bot: bot.to_string(),
            pool,
            billed: AtomicU64::new(start.billed),
            overage: AtomicU64::new(start.overage),
            turns: AtomicU64::new(start.turns),
            rejected_capacity: AtomicU64::new(start.rejected_capacity),
            rejected_rate: AtomicU64::new(start.rejected_rate),
            flows: start.flows.map(AtomicU64::new),
            rate: RateLimit::new(per_minute),
        }
    }

    pub(super) fn add_billed(&self, overage: bool) {
        self.billed.fetch_add(1, Ordering::Relaxed);
        if overage {
            self.overage.fetch_add(1, Ordering::Relaxed);
        }
    }
    pub(super) fn add_turn(&self) {
        self.turns.fetch_add(1, Ordering::Relaxed);
    }
    pub(super) fn add_rejected_capacity(&self) {
        self.rejected_capacity.fetch_add(1, Ordering::Relaxed);
    }
    pub(super) fn add_rejected_rate(&self) {
        self.rejected_rate.fetch_add(1, Ordering::Relaxed);
    }
    /// Counts one topic flow run.
    pub fn add_flow_run(&self, outcome: Outcome) {
        self.flows[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }
    pub(super) fn rate(&self) -> &RateLimit {
        &self.rate
    }

    /// The current values.
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            billed: self.billed.load(Ordering::Relaxed),
            overage: self.overage.load(Ordering::Relaxed),
            turns: self.turns.load(Ordering::Relaxed),
            rejected_capacity: self.rejected_capacity.load(Ordering::Relaxed),
            rejected_rate: self.rejected_rate.load(Ordering::Relaxed),
            flows: std::array::from_fn(|i| self.flows[i].load(Ordering::Relaxed)),
        }
    }
}

/// A fixed one-minute window: the minute index and the count packed in one `AtomicU64`
/// (minute in the high 32 bits), so a new window starts in the same CAS that counts.
#[derive(Debug)]
pub struct RateLimit {
    per_minute: u32,
    state: AtomicU64,
}

impl RateLimit {
    /// A limit of `per_minute` messages per calendar minute.
    pub fn new(per_minute: u32) -> Self {
        Self { per_minute, state: AtomicU64::new(0) }
    }

    /// Takes one message at `now`; `Err(seconds)` until the window ends when over the limit.
    pub fn take(&self, now: Millis) -> Result<(), u64> {
        let minute = (now.max(0) / 60_000) as u64;
        // Relaxed: the CAS decides; the count protects no other memory.
        let mut cur = self.state.load(Ordering::Relaxed);
        loop {
            let (m, n) = (cur >> 32, cur & 0xffff_ffff);
            // A caller whose clock read is older than the window's minute counts in that window:
            // a stale minute must never reset the current one.
            let (window, n) = if m >= minute { (m, n) } else { (minute, 0) };
            if n >= u64::from(self.per_minute) {
                let until_next = 60 - (now.max(0) / 1000 % 60) as u64;
                return Err(until_next.max(1));
            }
            let next = (window << 32) | (n + 1);
            match self.state.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(actual) => cur = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_minute_and_resets() {
        let r = RateLimit::new(3);
        let t = 1_800_000_000_000 + 45_000; // 45 s into a minute (1.8e12 ms is a whole minute)
        assert!(r.take(t).is_ok());
        assert!(r.take(t).is_ok());
        assert!(r.take(t).is_ok());
        assert_eq!(r.take(t), Err(15));
        assert!(r.take(t + 15_000).is_ok(), "the next minute starts a new window");
    }

    #[test]
    fn a_stale_minute_does_not_reset_the_window() {
        let r = RateLimit::new(2);
        let t = 1_800_000_000_000 + 60_000;
        assert!(r.take(t).is_ok());
        assert!(r.take(t).is_ok());
        assert!(r.take(t).is_err());
        // A caller that read the clock just before the minute turned.
        assert!(r.take(t - 1).is_err(), "the current window is full, whatever minute the caller read");
        assert!(r.take(t).is_err());
    }
}
