//! Billed-session metering: the session tracker of each conversation, per-bot counters, tenant
//! pools by month, the per-bot rate limit, the durable ledger, and the usage exposition.
//!
//! The path of a user turn: rate limit (CAS) → session decision (per-conversation state) →
//! on a new session, `pool.try_draw()` (CAS, never below zero), `bot.billed += 1`, and the
//! ledger's group commit, awaited before the message is answered.

pub mod counters;
pub mod exposition;
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
use ledger::Ledger;
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

    /// Whether this conversation is billed.
    pub fn is_billed(&self) -> bool {
        self.counters.is_some()
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

/// The metering engine; cloning is shallow.
#[derive(Clone)]
pub struct Metering {
    inner: Arc<Inner>,
}

struct Inner {
    rules: SessionRules,
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
    pub fn start(config: &Config, clock: SharedClock, store: SharedStore) -> Result<Self, std::io::Error> {
        let usage = store.load_usage().map_err(|e| std::io::Error::other(e.to_string()))?;
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
        let inner = Inner {
            rules: SessionRules {
                idle_ms: m.session_idle_secs as i64 * 1000,
                max_ms: m.session_max_secs as i64 * 1000,
                max_turns: m.session_max_turns,
            },
            config: m.clone(),
            clock,
            ledger: Ledger::start(store.clone())?,
            store,
            bots: DashMap::new(),
            pools: DashMap::new(),
            flushed: Mutex::new(HashMap::new()),
            rebuilt: Mutex::new(HashMap::new()),
        };
        for t in &config.tenants {
            let used = used_this_month.get(&t.id).copied().unwrap_or(0);
            inner.pools.insert(t.id.clone(), TenantPool::new(&t.id, plan_of(t, m), month, used));
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
            .or_insert_with(|| TenantPool::new(tenant, CapacityPlan::default(), month, 0))
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
        if !billed {
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
        let (ordinal, month, overage) = {
            let mut state = meter.state();
            match state.decide(&self.inner.rules, now, user_topic) {
                Decision::Continue => {
                    counters.add_turn();
                    return Ok(TurnOutcome::Continued);
                }
                Decision::Nothing => {
                    counters.add_turn();
                    return Ok(TurnOutcome::Unbilled);
                }
                Decision::Begin => {}
            }
            let pool = &counters.pool;
            let (month, overage) = match pool.try_draw(now) {
                Draw::Drawn { month, used, capacity } => {
                    signal_thresholds(&pool.tenant, used, capacity);
                    (month, false)
                }
                Draw::Exhausted { month } if pool.policy() == CapacityPolicy::AllowOverage => (month, true),
                Draw::Exhausted { month } => {
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
            };
            (state.begin(now), month, overage)
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
        };
        if let Err(e) = self.inner.ledger.record(rec).await {
            tracing::error!(error = %e, bot = %counters.bot, "A billed session could not be recorded; refusing the message.");
            meter.state().abort();
            counters.unbill(overage);
            if !overage {
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
