//! A tenant's pooled monthly capacity: a lock-free draw that never goes below zero.
//!
//! The month and the units used in it are packed into one `AtomicU64` (month index in the high
//! 24 bits, used units in the low 40), so the month rolls over in the same compare-and-swap that
//! draws: there is no separate reset that could race with a draw.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use chrono::{Datelike, NaiveDate};

use crate::clock::Millis;
use crate::config::{CapacityPolicy, SubscriptionConfig, SubscriptionKind};

const USED_BITS: u32 = 40;
const USED_MASK: u64 = (1 << USED_BITS) - 1;

/// Months since year 0: `year * 12 + month0`.
pub type MonthIndex = u32;

/// The month index of a timestamp (UTC).
pub fn month_of(ms: Millis) -> MonthIndex {
    let d = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().date_naive();
    (d.year().max(0) as u32) * 12 + d.month0()
}

/// `YYYY-MM` of a month index.
pub fn month_label(m: MonthIndex) -> String {
    format!("{:04}-{:02}", m / 12, m % 12 + 1)
}

/// The first instant of a month, in milliseconds.
pub fn month_start_ms(m: MonthIndex) -> Millis {
    NaiveDate::from_ymd_opt((m / 12) as i32, m % 12 + 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_millis())
        .unwrap_or(0)
}

/// Parses `YYYY-MM`.
pub fn parse_month(s: &str) -> Option<MonthIndex> {
    let (y, m) = s.split_once('-')?;
    let (y, m): (u32, u32) = (y.parse().ok()?, m.parse().ok()?);
    (y.to_string().len() == 4 && (1..=12).contains(&m) && s.len() == 7).then(|| y * 12 + m - 1)
}

/// What the tenant bought, as it decides the capacity of each month.
#[derive(Debug, Clone, Default)]
pub struct CapacityPlan {
    /// The subscriptions.
    pub subscriptions: Vec<SubscriptionConfig>,
    /// Sessions per tenant license per month.
    pub per_license: u64,
    /// Sessions per add-on per month.
    pub per_addon: u64,
    /// Capacity of a month with no tenant license but an active trial.
    pub trial_capacity: u64,
    /// The trials of the tenant's users, as (start, expiry) in milliseconds.
    pub trials: Vec<(Millis, Millis)>,
    /// What to do when the month's capacity is used up.
    pub policy: CapacityPolicy,
    /// Percentages of a month's capacity that raise `capacity.threshold`; `None`: the
    /// configured default.
    pub alerts: Option<Vec<u8>>,
}

impl CapacityPlan {
    /// The capacity of month `m`: the licenses and add-ons active on any day of it, or the trial
    /// capacity when no license is.
    pub fn capacity(&self, m: MonthIndex) -> u64 {
        let first = NaiveDate::from_ymd_opt((m / 12) as i32, m % 12 + 1, 1).unwrap_or_default();
        let next = m + 1;
        let last = NaiveDate::from_ymd_opt((next / 12) as i32, next % 12 + 1, 1)
            .and_then(|d| d.pred_opt())
            .unwrap_or(first);
        // A subscription ending before it starts was cancelled: it counts for no month.
        let active =
            |s: &&SubscriptionConfig| s.start <= last && s.end.is_none_or(|e| e >= first && e >= s.start);
        let count = |kind| -> u64 {
            self.subscriptions
                .iter()
                .filter(active)
                .filter(|s| s.kind == kind)
                .map(|s| u64::from(s.quantity))
                .sum()
        };
        let licenses = count(SubscriptionKind::TenantLicense);
        if licenses == 0 {
            let (from, to) = (month_start_ms(m), month_start_ms(m + 1));
            let trial = self.trials.iter().any(|&(start, end)| start < to && end > from);
            return if trial { self.trial_capacity } else { 0 };
        }
        licenses * self.per_license + count(SubscriptionKind::CapacityAddon) * self.per_addon
    }
}

/// The outcome of a draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Draw {
    /// One unit drawn in `month`; `used` is the month's count after it.
    Drawn {
        /// The month it counts in.
        month: MonthIndex,
        /// Units used in that month, this one included.
        used: u64,
        /// The month's capacity.
        capacity: u64,
    },
    /// The month's capacity is used up.
    Exhausted {
        /// The month.
        month: MonthIndex,
    },
}

/// A tenant's pool; shared by every conversation of the tenant (cloning the `Arc` is shallow).
pub struct TenantPool {
    /// The tenant id.
    pub tenant: String,
    state: AtomicU64,
    /// The month whose capacity `capacity` holds, packed like `state`.
    capacity_cache: AtomicU64,
    /// Bumped by every [`set_plan`](Self::set_plan): a capacity computed from a plan that was
    /// replaced meanwhile is not left in the cache.
    plan_version: AtomicU64,
    plan: ArcSwap<CapacityPlan>,
    /// With several nodes: the units this node was leased, packed like `state`; draws stop at
    /// it instead of at the month's capacity.
    lease: Option<Lease>,
}

/// A node's lease of a tenant's pool (several nodes share one pool in Redis).
#[derive(Debug)]
pub struct Lease {
    // Relaxed on these: each is read alone; the draw's CAS on `state` decides, and a stale lease
    // value only sends a draw to the refill path.
    leased: AtomicU64,
    /// The lease is usable until then (ms); renewed by every grant and heartbeat. A node that
    /// cannot renew stops using it, so a lease reclaimed by other nodes is never used twice.
    valid_until: std::sync::atomic::AtomicI64,
    /// Units used in the month across every node, as last read from Redis (for the gauges).
    global_used: AtomicU64,
    /// Held while a refill is in flight: one Redis call at a time per pool. A session that finds
    /// the lease empty waits here, then uses what the refill in flight brought instead of asking
    /// again (no thundering herd when a busy lease runs out).
    pub refill: Arc<tokio::sync::Mutex<()>>,
    /// The month and time (ms) until which Redis is known to have nothing left to grant
    /// (`month << 48 | until`), so a drained pool is not asked again on every new session.
    empty_until: AtomicU64,
    /// Refills finished, and whether the last one reached Redis: a session that waited for a
    /// refill in flight takes its outcome instead of asking again.
    refills: AtomicU64,
    last_refill_ok: std::sync::atomic::AtomicBool,
    /// Until when (ms, this node's clock) Redis refuses grants for a failover's fence, as the
    /// last refused call said (0: not fenced). Until then no lease call is made for a session:
    /// each would be refused.
    fenced_until: std::sync::atomic::AtomicI64,
    /// The last grant: when (ms), the units used then, and its size (0: none yet). Written
    /// under the refill gate, so the three are read together consistently by the next refill;
    /// the per-session low-lease check reads only the size.
    last_grant_at: std::sync::atomic::AtomicI64,
    last_grant_used: AtomicU64,
    last_grant: AtomicU64,
}

impl Lease {
    /// How long a grant of nothing is believed, ms. A purchase resets it at once; a lease given
    /// back or reclaimed elsewhere is seen within this long.
    const EMPTY_FOR_MS: i64 = 1000;

    /// Whether Redis recently had nothing to grant for `month`.
    pub fn known_empty(&self, month: MonthIndex, now: Millis) -> bool {
        let v = self.empty_until.load(Ordering::Relaxed);
        (v >> 48) as MonthIndex == month && now < (v & ((1 << 48) - 1)) as i64
    }

    /// How many refills have finished (read before waiting for the refill gate).
    pub fn refills(&self) -> u64 {
        self.refills.load(Ordering::Acquire)
    }

    /// If a refill finished since `seen` refills, whether it reached Redis.
    pub fn refilled_since(&self, seen: u64) -> Option<bool> {
        (self.refills.load(Ordering::Acquire) != seen).then(|| self.last_refill_ok.load(Ordering::Relaxed))
    }

    /// Notes a grant of `units` at `at`, when the pool had used `used` (to size the next one).
    pub fn note_grant(&self, at: Millis, used: u64, units: u64) {
        self.last_grant_at.store(at, Ordering::Relaxed);
        self.last_grant_used.store(used, Ordering::Relaxed);
        self.last_grant.store(units.max(1), Ordering::Relaxed);
    }

    /// The last grant as (when, used then, size), if there was one.
    pub fn last_grant(&self) -> Option<(Millis, u64, u64)> {
        let units = self.last_grant.load(Ordering::Relaxed);
        (units > 0).then(|| {
            (self.last_grant_at.load(Ordering::Relaxed), self.last_grant_used.load(Ordering::Relaxed), units)
        })
    }

    /// Whether `remaining` units are a quarter of the last grant or less (time to ask for more).
    pub fn running_low(&self, remaining: u64) -> bool {
        remaining <= self.last_grant.load(Ordering::Relaxed).max(1) / 4
    }

    /// Notes how a refill for `month` begun at `now` ended: granted units, or an error.
    pub fn refill_done(&self, month: MonthIndex, now: Millis, outcome: &Result<u64, String>) {
        if let Ok(0) = outcome {
            let until = (now + Self::EMPTY_FOR_MS).max(0) as u64 & ((1 << 48) - 1);
            self.empty_until.store((u64::from(month) << 48) | until, Ordering::Relaxed);
        }
        let fenced = match outcome {
            Ok(_) => 0,
            Err(e) => super::lease::fence_left_ms(e).map_or(0, |left| now.saturating_add(left as i64)),
        };
        self.fenced_until.store(fenced, Ordering::Relaxed);
        self.last_refill_ok.store(outcome.is_ok(), Ordering::Relaxed);
        self.refills.fetch_add(1, Ordering::Release);
    }

    /// The ms left on a failover's fence, as the last refused lease call said, if any.
    pub fn fenced_for(&self, now: Millis) -> Option<u64> {
        let until = self.fenced_until.load(Ordering::Relaxed);
        (until > now).then(|| (until - now) as u64)
    }
}

impl std::fmt::Debug for TenantPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantPool").field("tenant", &self.tenant).finish_non_exhaustive()
    }
}

fn pack(month: MonthIndex, n: u64) -> u64 {
    (u64::from(month) << USED_BITS) | (n & USED_MASK)
}
fn unpack(v: u64) -> (MonthIndex, u64) {
    ((v >> USED_BITS) as MonthIndex, v & USED_MASK)
}

impl TenantPool {
    /// A pool with `used` units already drawn in `month` (rebuilt from the ledger).
    pub fn new(tenant: &str, plan: CapacityPlan, month: MonthIndex, used: u64) -> Arc<Self> {
        Arc::new(Self {
            tenant: tenant.to_string(),
            state: AtomicU64::new(pack(month, used)),
            capacity_cache: AtomicU64::new(u64::MAX),
            plan_version: AtomicU64::new(0),
            plan: ArcSwap::from_pointee(plan),
            lease: None,
        })
    }

    /// A pool whose draws stop at the units leased to this node (several nodes).
    pub fn leased(tenant: &str, plan: CapacityPlan, month: MonthIndex) -> Arc<Self> {
        Arc::new(Self {
            tenant: tenant.to_string(),
            state: AtomicU64::new(pack(month, 0)),
            capacity_cache: AtomicU64::new(u64::MAX),
            plan_version: AtomicU64::new(0),
            plan: ArcSwap::from_pointee(plan),
            lease: Some(Lease {
                leased: AtomicU64::new(pack(month, 0)),
                valid_until: std::sync::atomic::AtomicI64::new(0),
                global_used: AtomicU64::new(pack(month, 0)),
                refill: Arc::new(tokio::sync::Mutex::new(())),
                empty_until: AtomicU64::new(0),
                refills: AtomicU64::new(0),
                last_refill_ok: std::sync::atomic::AtomicBool::new(true),
                fenced_until: std::sync::atomic::AtomicI64::new(0),
                last_grant_at: std::sync::atomic::AtomicI64::new(0),
                last_grant_used: AtomicU64::new(0),
                last_grant: AtomicU64::new(0),
            }),
        })
    }

    /// The lease, when this pool draws from one.
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    /// Adds `units` granted for `month`, usable until `valid_until` (ms).
    pub fn add_lease(&self, month: MonthIndex, units: u64, valid_until: Millis) {
        let Some(l) = &self.lease else { return };
        let _ = l.leased.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |v| {
            let (m, n) = unpack(v);
            Some(if m == month {
                pack(m, n + units)
            } else if month > m {
                pack(month, units)
            } else {
                v
            })
        });
        l.valid_until.fetch_max(valid_until, Ordering::Relaxed);
    }

    /// Drops what is left of this node's lease of `month`: the lease is reclaimed, or may be.
    /// Draws stop at what was already used until a new grant arrives.
    pub fn drop_lease(&self, month: MonthIndex) {
        let Some(l) = &self.lease else { return };
        // A lease is dropped only once Redis says it is gone, which happens only after it ran
        // out here (draws already stop at it): no draw races this.
        let used = self.used(month);
        let _ = l.leased.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            let (m, n) = unpack(v);
            (m == month).then(|| pack(month, n.min(used)))
        });
    }

    /// Extends the lease's validity (a heartbeat renewed it in Redis).
    pub fn renew_lease(&self, valid_until: Millis) {
        if let Some(l) = &self.lease {
            l.valid_until.fetch_max(valid_until, Ordering::Relaxed);
        }
    }

    /// Units of this node's lease a draw in `month` can take at `now` (0 once it expired).
    pub fn lease_available(&self, month: MonthIndex, now: Millis) -> u64 {
        self.limit(month, now).saturating_sub(self.used(month))
    }

    /// Units leased to this node in `month` and not used yet.
    pub fn lease_remaining(&self, month: MonthIndex) -> u64 {
        let Some(l) = &self.lease else { return 0 };
        let (m, n) = unpack(l.leased.load(Ordering::Relaxed));
        if m == month { n.saturating_sub(self.used(month)) } else { 0 }
    }

    /// Records the month's use across every node (read from Redis).
    pub fn set_global_used(&self, month: MonthIndex, used: u64) {
        if let Some(l) = &self.lease {
            l.global_used.store(pack(month, used), Ordering::Relaxed);
        }
    }

    /// Units used in `month` by the whole tenant: across nodes when leased (as last read),
    /// else this pool's own count.
    pub fn tenant_used(&self, m: MonthIndex) -> u64 {
        match &self.lease {
            Some(l) => {
                let (gm, g) = unpack(l.global_used.load(Ordering::Relaxed));
                if gm == m { g.max(self.used(m)) } else { self.used(m) }
            }
            None => self.used(m),
        }
    }

    /// What a draw in month `m` at `now` may reach: the capacity, or this node's valid lease.
    fn limit(&self, m: MonthIndex, now: Millis) -> u64 {
        match &self.lease {
            None => self.capacity(m),
            Some(l) => {
                if now >= l.valid_until.load(Ordering::Relaxed) {
                    return 0;
                }
                let (lm, n) = unpack(l.leased.load(Ordering::Relaxed));
                if lm == m { n } else { 0 }
            }
        }
    }

    /// Replaces the plan (a purchase or a trial changed the capacity).
    pub fn set_plan(&self, plan: CapacityPlan) {
        self.plan.store(Arc::new(plan));
        // More capacity may have been bought: ask Redis again at the next session.
        if let Some(l) = &self.lease {
            l.empty_until.store(0, Ordering::Relaxed);
        }
        // SeqCst on the version and the cache, here and in `capacity`: the version moves after
        // the new plan is in place and before the cache is cleared, so a reader that filled the
        // cache from the old plan either sees the new version (and clears its entry) or is
        // cleared by this store.
        self.plan_version.fetch_add(1, Ordering::SeqCst);
        self.capacity_cache.store(u64::MAX, Ordering::SeqCst);
    }

    /// The policy when exhausted.
    pub fn policy(&self) -> CapacityPolicy {
        self.plan.load().policy
    }

    /// The tenant's own capacity alert percentages, if it set them.
    pub fn alerts(&self) -> Option<Vec<u8>> {
        self.plan.load().alerts.clone()
    }

    /// The capacity of month `m`, cached for the current month so a draw does no date math.
    pub fn capacity(&self, m: MonthIndex) -> u64 {
        // Relaxed on the hit path: a cached entry is only ever a capacity of the current plan
        // (see `set_plan`), and a miss recomputes.
        let cached = self.capacity_cache.load(Ordering::Relaxed);
        if cached != u64::MAX {
            let (cm, cap) = unpack(cached);
            if cm == m {
                return cap;
            }
        }
        let version = self.plan_version.load(Ordering::SeqCst);
        let cap = self.plan.load().capacity(m).min(USED_MASK);
        self.capacity_cache.store(pack(m, cap), Ordering::SeqCst);
        if self.plan_version.load(Ordering::SeqCst) != version {
            // The plan changed while this one was computed: drop the entry, it may be stale.
            self.capacity_cache.store(u64::MAX, Ordering::SeqCst);
        }
        cap
    }

    /// Draws one unit for a session beginning at `now`; never exceeds the month's capacity.
    pub fn try_draw(&self, now: Millis) -> Draw {
        let mut want = month_of(now);
        // Relaxed load: the CAS below decides; a stale value only costs a retry.
        let mut cur = self.state.load(Ordering::Relaxed);
        loop {
            let (month, used) = unpack(cur);
            // A draw that computed its month just before another thread rolled the pool over
            // counts in the newer month: months only move forward.
            if month > want {
                want = month;
            }
            let used = if month == want { used } else { 0 };
            let capacity = self.limit(want, now);
            if used >= capacity {
                return Draw::Exhausted { month: want };
            }
            // AcqRel: the draw is the decision point for billing; pairs with other draws' CAS.
            match self.state.compare_exchange_weak(
                cur,
                pack(want, used + 1),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Draw::Drawn { month: want, used: used + 1, capacity },
                Err(actual) => cur = actual,
            }
        }
    }

    /// Gives back a unit drawn in `month` whose session could not be recorded.
    pub fn refund(&self, month: MonthIndex) {
        let _ = self.state.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |v| {
            let (m, used) = unpack(v);
            (m == month && used > 0).then(|| pack(m, used - 1))
        });
    }

    /// Units used in month `m` (0 for a month the pool is not in).
    pub fn used(&self, m: MonthIndex) -> u64 {
        let (month, used) = unpack(self.state.load(Ordering::Relaxed));
        if month == m { used } else { 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};

    fn plan(licenses: u32, addons: u32) -> CapacityPlan {
        let sub = |kind, q| SubscriptionConfig {
            kind,
            quantity: q,
            start: NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
            end: None,
        };
        let mut subscriptions = vec![sub(SubscriptionKind::TenantLicense, licenses)];
        if addons > 0 {
            subscriptions.push(sub(SubscriptionKind::CapacityAddon, addons));
        }
        CapacityPlan {
            subscriptions,
            per_license: 2000,
            per_addon: 1000,
            trial_capacity: 1000,
            trials: vec![(month_start_ms(parse_month("2025-12").unwrap()), i64::MAX)],
            policy: CapacityPolicy::Reject,
            alerts: None,
        }
    }

    #[test]
    fn capacity_counts_active_purchases() {
        let m = parse_month("2026-11").unwrap();
        assert_eq!(plan(1, 0).capacity(m), 2000);
        assert_eq!(plan(2, 3).capacity(m), 7000);
        assert_eq!(
            plan(1, 0).capacity(parse_month("2025-12").unwrap()),
            1000,
            "before the license: trial capacity"
        );
        assert_eq!(plan(1, 0).capacity(parse_month("2025-11").unwrap()), 0, "neither license nor trial");
        assert_eq!(month_label(m), "2026-11");
        assert_eq!(month_of(month_start_ms(m)), m);
        assert_eq!(month_of(month_start_ms(m) - 1), m - 1);
        assert!(parse_month("2026-13").is_none());
    }

    #[test]
    fn exactly_capacity_under_two_threads() {
        let clock = ManualClock::at("2026-11-28T00:00:00Z");
        let mut p = plan(1, 0);
        p.per_license = 10_000;
        let pool = TenantPool::new("t", p, month_of(clock.now_ms()), 0);
        let now = clock.now_ms();
        let drawn: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        (0..20_000).filter(|_| matches!(pool.try_draw(now), Draw::Drawn { .. })).count()
                            as u64
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(drawn, 10_000);
        assert_eq!(pool.used(month_of(now)), 10_000);
        assert_eq!(pool.try_draw(now), Draw::Exhausted { month: month_of(now) });
    }

    #[test]
    fn month_rolls_over_in_the_draw() {
        let clock = ManualClock::at("2026-11-30T23:59:59Z");
        let mut p = plan(1, 0);
        p.per_license = 2;
        let pool = TenantPool::new("t", p, month_of(clock.now_ms()), 0);
        assert!(matches!(pool.try_draw(clock.now_ms()), Draw::Drawn { used: 1, .. }));
        assert!(matches!(pool.try_draw(clock.now_ms()), Draw::Drawn { used: 2, .. }));
        assert!(matches!(pool.try_draw(clock.now_ms()), Draw::Exhausted { .. }));
        clock.advance_secs(1);
        let dec = parse_month("2026-12").unwrap();
        assert_eq!(pool.try_draw(clock.now_ms()), Draw::Drawn { month: dec, used: 1, capacity: 2 });
        // A late draw computed for November counts in December.
        assert_eq!(pool.try_draw(clock.now_ms() - 5_000), Draw::Drawn { month: dec, used: 2, capacity: 2 });
        pool.refund(dec);
        assert_eq!(pool.used(dec), 1);
    }
}
