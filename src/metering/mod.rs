//! Billed-session metering: the session tracker of each conversation, per-bot counters, tenant
//! pools by month, the per-bot rate limit, the durable ledger, and the usage exposition.
//!
//! The path of a user turn: rate limit (CAS) → session decision (per-conversation state) →
//! on a new session, `pool.try_draw()` (CAS, never below zero), `bot.billed += 1`, and the
//! ledger's group commit, awaited before the message is answered.

pub mod counters;
pub mod exposition;
pub mod lease;
pub mod ledger;
pub mod pool;
pub mod session;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use http::StatusCode;

use crate::clock::SharedClock;
use crate::config::{CapacityPolicy, Config, MeteringConfig, TenantConfig};
use crate::error::ApiError;
use crate::store::{DailyUsage, SessionRecord, SharedStore, UsageDelta};
use counters::{BotCounters, CounterSnapshot};
use ledger::{Ledger, LedgerOptions};
use pool::{CapacityPlan, Draw, MonthIndex, TenantPool, month_of, month_start_ms};
use session::{Decision, SessionRules, SessionState};

/// The billing handles of one conversation, resolved when it started; `None` counters mean the
/// conversation is not billed (the authoring test chat).
pub struct ConversationMeter {
    counters: Option<Arc<BotCounters>>,
    session: Mutex<SessionState>,
}

impl ConversationMeter {
    /// A meter that bills nothing (test chats).
    pub fn unmetered() -> Self {
        Self { counters: None, session: Mutex::new(SessionState::default()) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SessionState> {
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the open billed session (the conversation ended).
    pub fn end_session(&self) {
        self.state().end();
    }
}

/// What a metered turn did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnOutcome {
    /// Not billed (test chat) or no session involved.
    Unbilled,
    /// Part of the open session.
    Continued,
    /// Began a new billed session.
    Began {
        /// Served beyond capacity.
        overage: bool,
    },
}

/// One pass of the decision for a user turn.
enum Step {
    Done(TurnOutcome),
    Began(u32, pool::MonthIndex, bool),
    Exhausted(pool::MonthIndex),
    Refill(pool::MonthIndex),
}

/// The metering engine; cloning is shallow.
#[derive(Clone)]
pub struct Metering {
    inner: Arc<Inner>,
}

/// The multi-node parts of metering: this node's leases and its local spool.
pub struct ClusterMetering {
    /// The lease client.
    pub leases: Arc<lease::Leases>,
    /// Where billed sessions go while Redis is unreachable (replayed when it is back).
    pub spool: SharedStore,
    /// What to do when no lease can be had.
    pub outage_policy: crate::config::OutagePolicy,
    /// Sessions allowed per outage under `safe_capacity`.
    pub safe_capacity: u64,
}

/// Counts of degraded decisions (several nodes, Redis unreachable).
#[derive(Debug, Default)]
pub struct Degraded {
    // Relaxed: plain counters and an advisory episode flag.
    /// New sessions refused (fail_closed).
    pub refused: std::sync::atomic::AtomicU64,
    /// New sessions allowed without a lease (safe_capacity).
    pub allowed: std::sync::atomic::AtomicU64,
    /// Allowed in the current outage.
    episode_allowed: std::sync::atomic::AtomicU64,
    /// Sessions written to the local spool.
    pub spooled: Arc<std::sync::atomic::AtomicU64>,
    /// Whether an outage episode is under way (logged once per episode).
    in_episode: std::sync::atomic::AtomicBool,
}

/// The ledger lingers (`cluster.ledger_linger_ms`) only after a write of at least this many
/// sessions: a node that begins that many sessions within one Redis round trip is busy enough
/// for the wait to gather many more, while a quiet node's sessions never wait.
const LINGER_AFTER: usize = 16;

struct Inner {
    rules: SessionRules,
    cluster: Option<ClusterMetering>,
    degraded: Degraded,
    config: MeteringConfig,
    clock: SharedClock,
    store: SharedStore,
    ledger: Ledger,
    bots: DashMap<String, Arc<BotCounters>>,
    pools: DashMap<String, Arc<TenantPool>>,
    /// Counters as of the last flush of the non-billing counters to the store.
    flushed: Mutex<HashMap<String, CounterSnapshot>>,
    /// Totals rebuilt from the store per bot (before any bot of that id registers).
    rebuilt: Mutex<HashMap<(String, String), CounterSnapshot>>,
}

impl Metering {
    /// Builds the engine: pools from the tenants of `config`, counters rebuilt from the store.
    ///
    /// With several nodes (`cluster`), pools draw from this node's leases, and the per-node
    /// counters start from zero (the store's reports hold the totals across nodes).
    pub fn start(
        config: &Config,
        clock: SharedClock,
        store: SharedStore,
        cluster: Option<ClusterMetering>,
    ) -> Result<Self, std::io::Error> {
        let usage = if cluster.is_some() {
            Vec::new()
        } else {
            store.load_usage().map_err(|e| std::io::Error::other(e.to_string()))?
        };
        let now = clock.now_ms();
        let month = month_of(now);
        let mut rebuilt: HashMap<(String, String), CounterSnapshot> = HashMap::new();
        let mut used_this_month: HashMap<String, u64> = HashMap::new();
        for u in &usage {
            let s = rebuilt.entry((u.tenant.clone(), u.bot.clone())).or_default();
            s.billed += u.sessions;
            s.overage += u.overage;
            s.turns += u.turns;
            s.rejected_capacity += u.rejected_capacity;
            s.rejected_rate += u.rejected_rate;
            if day_month(&u.day) == Some(month) {
                *used_this_month.entry(u.tenant.clone()).or_default() += u.sessions - u.overage;
            }
        }
        let m = &config.metering;
        let degraded = Degraded::default();
        // Batch ids never repeat: the node's id, this start's time and a random word prefix a
        // counter (two starts in one millisecond, even under one misconfigured node id, differ).
        let batch_prefix = format!(
            "{}.{}.{:08x}",
            cluster.as_ref().map(|c| c.leases.node()).unwrap_or("local"),
            clock.now_ms(),
            rand::random::<u32>()
        );
        let inner = Inner {
            rules: SessionRules {
                idle_ms: m.session_idle_secs as i64 * 1000,
                max_ms: m.session_max_secs as i64 * 1000,
                max_turns: m.session_max_turns,
            },
            config: m.clone(),
            clock,
            ledger: Ledger::start(
                store.clone(),
                cluster.as_ref().map(|c| c.spool.clone()),
                degraded.spooled.clone(),
                LedgerOptions {
                    batch_prefix,
                    linger: std::time::Duration::from_millis(match &cluster {
                        Some(_) => config.cluster.ledger_linger_ms,
                        None => 0,
                    }),
                    linger_after: LINGER_AFTER,
                },
            )?,
            store,
            cluster,
            degraded,
            bots: DashMap::new(),
            pools: DashMap::new(),
            flushed: Mutex::new(HashMap::new()),
            rebuilt: Mutex::new(HashMap::new()),
        };
        for t in &config.tenants {
            let used = used_this_month.get(&t.id).copied().unwrap_or(0);
            let pool = if inner.cluster.is_some() {
                TenantPool::leased(&t.id, plan_of(t, m), month)
            } else {
                TenantPool::new(&t.id, plan_of(t, m), month, used)
            };
            inner.pools.insert(t.id.clone(), pool);
        }
        {
            let mut flushed = inner.flushed.lock().unwrap_or_else(|p| p.into_inner());
            for ((_, bot), snap) in &rebuilt {
                flushed.insert(bot.clone(), *snap);
            }
        }
        *inner.rebuilt.lock().unwrap_or_else(|p| p.into_inner()) = rebuilt;
        Ok(Self { inner: Arc::new(inner) })
    }

    /// The pool of `tenant` (a tenant with no configuration gets an empty plan: capacity 0).
    pub fn pool(&self, tenant: &str) -> Arc<TenantPool> {
        let month = month_of(self.inner.clock.now_ms());
        self.inner
            .pools
            .entry(tenant.to_string())
            .or_insert_with(|| {
                if self.inner.cluster.is_some() {
                    TenantPool::leased(tenant, CapacityPlan::default(), month)
                } else {
                    TenantPool::new(tenant, CapacityPlan::default(), month, 0)
                }
            })
            .clone()
    }

    /// Replaces a tenant's capacity plan (a purchase, a setting or a trial changed).
    pub fn set_plan(&self, tenant: &str, plan: CapacityPlan) {
        self.pool(tenant).set_plan(plan);
    }

    /// The metering configuration.
    pub fn config(&self) -> &MeteringConfig {
        &self.inner.config
    }

    /// The counters of a bot, created (from the rebuilt totals) on first use.
    pub fn counters(&self, tenant: &str, bot: &str) -> Arc<BotCounters> {
        if let Some(c) = self.inner.bots.get(bot) {
            return c.clone();
        }
        let start = self
            .inner
            .rebuilt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(tenant.to_string(), bot.to_string()))
            .copied()
            .unwrap_or_default();
        let pool = self.pool(tenant);
        self.inner
            .bots
            .entry(bot.to_string())
            .or_insert_with(|| {
                Arc::new(BotCounters::new(tenant, bot, pool, start, self.inner.config.rate_limit_per_minute))
            })
            .clone()
    }

    /// The meter of a new conversation.
    pub fn meter_for(&self, tenant: &str, bot: &str, billed: bool) -> ConversationMeter {
        if !billed || !self.inner.config.enabled {
            return ConversationMeter::unmetered();
        }
        ConversationMeter {
            counters: Some(self.counters(tenant, bot)),
            session: Mutex::new(SessionState::default()),
        }
    }

    /// Meters one user message of a conversation. `user_topic`: whether it triggers a user topic
    /// (or is an upstream bot's user message turn). Returns only when a session it began is
    /// durable; refuses with 429 (rate limit, capacity) before the bot sees the message.
    pub async fn on_user_turn(
        &self,
        conversation: &str,
        meter: &ConversationMeter,
        user_topic: bool,
    ) -> Result<TurnOutcome, ApiError> {
        let Some(counters) = &meter.counters else {
            return Ok(TurnOutcome::Unbilled);
        };
        let now = self.inner.clock.now_ms();
        if let Err(retry) = counters.rate().take(now) {
            counters.add_rejected_rate();
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "RateLimited",
                format!(
                    "This bot accepts at most {} messages per minute. Try again in {retry} seconds.",
                    self.inner.config.rate_limit_per_minute
                ),
            )
            .with_retry_after(retry));
        }
        // Refills this session asked for or waited on; a few, since a refill's units can go to
        // other sessions before this one draws again.
        let mut refills = 0u8;
        // `drawn`: the session took a unit from the pool (not overage, not allowed in an outage).
        let (ordinal, month, overage, drawn) = loop {
            // The session state's std lock is never held across the refill's await.
            let step = {
                let mut state = meter.state();
                match state.decide(&self.inner.rules, now, user_topic) {
                    Decision::Continue => Step::Done(TurnOutcome::Continued),
                    Decision::Nothing => Step::Done(TurnOutcome::Unbilled),
                    Decision::Begin => {
                        let pool = &counters.pool;
                        match pool.try_draw(now) {
                            Draw::Drawn { month, used, capacity } => {
                                if pool.lease().is_none() {
                                    signal_thresholds(&pool.tenant, used, capacity);
                                } else {
                                    self.prefetch(pool, month);
                                }
                                Step::Began(state.begin(now), month, false)
                            }
                            // This node's lease is used up: one round trip to Redis for more.
                            Draw::Exhausted { month } if pool.lease().is_some() && refills < 4 => {
                                Step::Refill(month)
                            }
                            Draw::Exhausted { month } if pool.policy() == CapacityPolicy::AllowOverage => {
                                Step::Began(state.begin(now), month, true)
                            }
                            Draw::Exhausted { month } => Step::Exhausted(month),
                        }
                    }
                }
            };
            match step {
                Step::Done(outcome) => {
                    counters.add_turn();
                    return Ok(outcome);
                }
                Step::Began(ordinal, month, overage) => break (ordinal, month, overage, !overage),
                Step::Exhausted(month) => {
                    counters.add_rejected_capacity();
                    let retry = ((month_start_ms(month + 1) - now) / 1000).max(1) as u64;
                    return Err(ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "CapacityExhausted",
                        "The bot's organization has used up its billed sessions for this month. \
                         Conversations already in progress continue; new ones can start next month \
                         or when the organization adds capacity.",
                    )
                    .with_retry_after(retry));
                }
                Step::Refill(month) => {
                    refills += 1;
                    if let Err(e) = self.refill(&counters.pool, month).await {
                        self.degraded(&e)?;
                        // Allowed without a lease (safe_capacity): decide again, then begin.
                        let mut state = meter.state();
                        if state.decide(&self.inner.rules, now, user_topic) != Decision::Begin {
                            counters.add_turn();
                            return Ok(TurnOutcome::Continued);
                        }
                        break (state.begin(now), month, false, false);
                    }
                    // Decide again: another message of this conversation may have begun a
                    // session meanwhile.
                }
            }
        };
        counters.add_billed(overage);
        counters.add_turn();
        // A session that began just before a month rolled over is stamped in the month it drew.
        let began_ms = now.max(month_start_ms(month));
        let rec = SessionRecord {
            id: format!("{conversation}.{ordinal}"),
            tenant: counters.tenant.clone(),
            bot: counters.bot.clone(),
            began_ms,
            overage,
            node: self.inner.cluster.as_ref().map(|c| c.leases.node().to_string()).unwrap_or_default(),
        };
        if let Err(e) = self.inner.ledger.record(rec).await {
            tracing::error!(error = %e, bot = %counters.bot, "A billed session could not be recorded; refusing the message.");
            meter.state().abort();
            counters.unbill(overage);
            if drawn {
                counters.pool.refund(month);
            }
            return Err(ApiError::unavailable(
                "MeteringUnavailable",
                "The gateway cannot record usage right now, so it cannot start a new session. Try again shortly.",
            )
            .with_retry_after(5));
        }
        Ok(TurnOutcome::Began { overage })
    }

    /// Gets more of `pool` for a session that found this node's lease empty (several nodes);
    /// ends an outage episode on success. One Redis call at a time per pool: a session that
    /// waited for a refill in flight takes its outcome, and a pool Redis recently had nothing
    /// left for is not asked again for a moment.
    async fn refill(&self, pool: &Arc<TenantPool>, month: pool::MonthIndex) -> Result<(), String> {
        let (Some(cluster), Some(lease)) = (&self.inner.cluster, pool.lease()) else { return Ok(()) };
        let seen = lease.refills();
        let gate = lease.refill.clone().lock_owned().await;
        match lease.refilled_since(seen) {
            Some(true) => return Ok(()),
            Some(false) => return Err("the lease refill this session waited for failed".into()),
            None => {}
        }
        let now = self.inner.clock.now_ms();
        if pool.lease_available(month, now) > 0 || lease.known_empty(month, now) {
            return Ok(());
        }
        let (leases, pool2) = (cluster.leases.clone(), pool.clone());
        tokio::task::spawn_blocking(move || {
            let _gate = gate;
            let outcome = leases.refill_blocking(&pool2, month);
            if let Some(l) = pool2.lease() {
                l.refill_done(month, now, &outcome);
            }
            outcome
        })
        .await
        .map_err(|e| e.to_string())??;
        self.end_episode();
        Ok(())
    }

    /// Starts a background refill when the lease runs low (unless one is in flight).
    fn prefetch(&self, pool: &Arc<TenantPool>, month: pool::MonthIndex) {
        let (Some(cluster), Some(lease)) = (&self.inner.cluster, pool.lease()) else { return };
        if !lease.running_low(pool.lease_remaining(month)) {
            return;
        }
        let now = self.inner.clock.now_ms();
        if lease.known_empty(month, now) {
            return;
        }
        let Ok(gate) = lease.refill.clone().try_lock_owned() else { return };
        let (leases, pool) = (cluster.leases.clone(), pool.clone());
        tokio::task::spawn_blocking(move || {
            let _gate = gate;
            let outcome = leases.refill_blocking(&pool, month);
            if let Err(e) = &outcome {
                tracing::debug!(tenant = %pool.tenant, error = %e, "A background lease refill failed.");
            }
            if let Some(l) = pool.lease() {
                l.refill_done(month, now, &outcome);
            }
        });
    }

    /// Applies the outage policy when no lease can be had: `Ok` to allow the session.
    fn degraded(&self, cause: &str) -> Result<(), ApiError> {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(cluster) = &self.inner.cluster else { return Ok(()) };
        let d = &self.inner.degraded;
        if !d.in_episode.swap(true, Relaxed) {
            d.episode_allowed.store(0, Relaxed);
            tracing::warn!(cause, policy = ?cluster.outage_policy, "Redis cannot grant capacity leases; applying the outage policy.");
        }
        if cluster.outage_policy == crate::config::OutagePolicy::SafeCapacity
            && d.episode_allowed.fetch_add(1, Relaxed) < cluster.safe_capacity
        {
            d.allowed.fetch_add(1, Relaxed);
            return Ok(());
        }
        d.refused.fetch_add(1, Relaxed);
        Err(ApiError::unavailable(
            "MeteringUnavailable",
            "The gateway cannot reach its metering store, so it cannot start a new session now. Try again shortly.",
        )
        .with_retry_after(5))
    }

    fn end_episode(&self) {
        if self.inner.degraded.in_episode.swap(false, std::sync::atomic::Ordering::Relaxed) {
            tracing::info!("Redis grants capacity leases again; the outage episode is over.");
        }
    }

    /// Degraded-decision counts.
    pub fn degraded_counts(&self) -> &Degraded {
        &self.inner.degraded
    }

    /// The lease client (several nodes).
    pub fn leases(&self) -> Option<&Arc<lease::Leases>> {
        self.inner.cluster.as_ref().map(|c| &c.leases)
    }

    /// Every bot's counters.
    pub fn bots(&self) -> Vec<Arc<BotCounters>> {
        self.inner.bots.iter().map(|b| b.clone()).collect()
    }

    /// Every pool.
    pub fn pools(&self) -> Vec<Arc<TenantPool>> {
        self.inner.pools.iter().map(|p| p.clone()).collect()
    }

    /// The current month.
    pub fn current_month(&self) -> MonthIndex {
        month_of(self.inner.clock.now_ms())
    }

    /// Writes the non-billing counters (turns, refusals) accumulated since the last flush to the
    /// store, under today's date. Billed sessions are already in the ledger.
    pub fn flush(&self) -> Result<(), crate::store::StoreError> {
        let day = crate::store::sqlite::day_of(self.inner.clock.now_ms());
        let mut flushed = self.inner.flushed.lock().unwrap_or_else(|p| p.into_inner());
        let mut deltas = Vec::new();
        let mut next = Vec::new();
        for b in self.inner.bots.iter() {
            let now = b.snapshot();
            let before = flushed.get(&b.bot).copied().unwrap_or_default();
            let d = UsageDelta {
                turns: now.turns - before.turns,
                rejected_capacity: now.rejected_capacity - before.rejected_capacity,
                rejected_rate: now.rejected_rate - before.rejected_rate,
            };
            if d != UsageDelta::default() {
                deltas.push((b.tenant.clone(), b.bot.clone(), day.clone(), d));
                next.push((b.bot.clone(), now));
            }
        }
        self.inner.store.add_usage(&deltas)?;
        for (bot, snap) in next {
            flushed.insert(bot, snap);
        }
        Ok(())
    }

    /// Flushes, then reads every day's usage from the store.
    pub fn usage(&self) -> Result<Vec<DailyUsage>, crate::store::StoreError> {
        self.flush()?;
        self.inner.store.load_usage()
    }
}

/// The month of a `YYYY-MM-DD` day.
fn day_month(day: &str) -> Option<MonthIndex> {
    pool::parse_month(day.get(..7)?)
}

/// The capacity plan of a configured tenant.
pub fn plan_of(t: &TenantConfig, m: &MeteringConfig) -> CapacityPlan {
    CapacityPlan {
        subscriptions: t.subscriptions.clone(),
        per_license: m.tenant_license_sessions,
        per_addon: m.addon_sessions,
        trial_capacity: m.trial_capacity,
        trials: Vec::new(),
        policy: t.capacity_policy,
    }
}

/// Logs the 80% and 100% marks of a month's capacity, once each: exactly one draw sees each
/// `used` value, so no flag is needed.
fn signal_thresholds(tenant: &str, used: u64, capacity: u64) {
    if capacity == 0 {
        return;
    }
    if used == (capacity * 4).div_ceil(5) && used < capacity {
        tracing::warn!(
            tenant,
            used,
            capacity,
            "A tenant has used 80% of this month's billed-session capacity."
        );
    }
    if used == capacity {
        tracing::warn!(
            tenant,
            used,
            capacity,
            "A tenant has used all of this month's billed-session capacity."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_month_parses() {
        assert_eq!(day_month("2026-11-28"), pool::parse_month("2026-11"));
        assert_eq!(day_month("bad"), None);
    }

    #[test]
    fn eighty_percent_mark() {
        // 80% of 2000 is 1600; of 7 it is 5.6, so the mark is the 6th session.
        assert_eq!((2000u64 * 4).div_ceil(5), 1600);
        assert_eq!((7u64 * 4).div_ceil(5), 6);
    }
}
