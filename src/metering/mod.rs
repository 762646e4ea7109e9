//! Billed-session metering: the session tracker of each conversation, per-bot counters, tenant
//! pools by month, the per-bot rate limit, the durable ledger, and the usage exposition.
//!
//! The path of a user turn: rate limit (CAS) → session decision (per-conversation state) →
//! on a new session, `pool.try_draw()` (CAS, never below zero), `bot.billed += 1`, and the
//! ledger's group commit, awaited before the message is answered.

pub mod counters;
pub mod exposition;
pub mod forecast;
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
use crate::store::outbox::CapacityWatch;
use crate::store::{DailyUsage, SessionRecord, SharedStore, UsageDelta, UsageFlush};
use counters::{BotCounters, CounterSnapshot};
use ledger::{Ledger, LedgerOptions, Watch};
use pool::{CapacityPlan, Draw, MonthIndex, TenantPool, month_of, month_start_ms};
use session::{Decision, SessionRules, SessionState};

/// The billing handles of one conversation, resolved when it started; `None` counters mean the
/// conversation is not billed (the authoring test chat).
pub struct ConversationMeter {
    counters: Option<Arc<BotCounters>>,
    /// Shared with a session being recorded, so that a failed write closes it even when the
    /// request that began it is gone.
    session: Arc<SessionCell>,
    /// Names this incarnation of the conversation in its session ids: a conversation id started
    /// again by its token (after expiry or a restart) is a new incarnation whose sessions are
    /// new sessions. The start time and a random word, so no two incarnations share it.
    incarnation: Box<str>,
}

impl ConversationMeter {
    /// A meter that bills nothing (test chats).
    pub fn unmetered() -> Self {
        Self { counters: None, session: Arc::default(), incarnation: Box::from("") }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SessionState> {
        lock_state(&self.session.state)
    }

    /// Ends the open billed session (the conversation ended).
    pub fn end_session(&self) {
        self.state().end();
    }
}

/// A conversation's session state, and a signal for turns waiting on a pending session.
#[derive(Default)]
struct SessionCell {
    /// A std lock: held only to decide, never across an await.
    state: Mutex<SessionState>,
    /// Notified when a pending session is settled (recorded or undone).
    settled: tokio::sync::Notify,
}

impl SessionCell {
    /// Changes the state, then wakes the turns waiting on it.
    fn settle_with(&self, f: impl FnOnce(&mut SessionState)) {
        f(&mut lock_state(&self.state));
        self.settled.notify_waiters();
    }
}

fn lock_state(s: &Mutex<SessionState>) -> std::sync::MutexGuard<'_, SessionState> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// The fate of a session that began and is not recorded yet. Once the ledger holds it,
/// [`recorded`](Self::recorded) counts it (billed, and its first turn); dropped without that, it
/// undoes the session: its record failed, its request was dropped before the record was sent, or
/// its upstream bot never accepted the first turn. So no path (an error, a cancelled future, a
/// stopped ledger) can keep a unit drawn for a session the ledger does not hold, and the
/// counters never count one.
pub struct Refund {
    counters: Arc<BotCounters>,
    session: Arc<SessionCell>,
    ordinal: u32,
    month: MonthIndex,
    /// Whether the session took a unit from the pool (not overage, not allowed in an outage).
    drawn: bool,
    overage: bool,
    armed: bool,
}

impl Refund {
    /// The session is recorded: count it, and keep its unit.
    pub fn recorded(mut self) {
        self.counters.add_billed(self.overage);
        self.counters.add_turn();
        self.armed = false;
        let ordinal = self.ordinal;
        self.session.settle_with(|s| s.settle(ordinal));
    }
}

impl Drop for Refund {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let ordinal = self.ordinal;
        self.session.settle_with(|s| s.abort(ordinal));
        if self.drawn {
            self.counters.pool.refund(self.month);
        }
    }
}

/// A session that began and is not recorded yet: [`commit`](Self::commit) records it (and
/// answers only once it is durable); dropping it instead gives its unit back.
pub struct PendingSession {
    ledger: Ledger,
    rec: SessionRecord,
    refund: Refund,
}

impl PendingSession {
    /// Records the session; returns once it is durable. On failure the session is undone (by
    /// the ledger, even if this future is dropped meanwhile) and the answer is 503.
    pub async fn commit(self) -> Result<TurnOutcome, ApiError> {
        let overage = self.refund.overage;
        let bot = self.refund.counters.bot.clone();
        if let Err(e) = self.ledger.record(self.rec, Some(self.refund)).await {
            tracing::error!(error = %e, bot = %bot, "A billed session could not be recorded; refusing the message.");
            return Err(ApiError::unavailable(
                "MeteringUnavailable",
                "The gateway cannot record usage right now, so it cannot start a new session. Try again shortly.",
            )
            .with_retry_after(5));
        }
        Ok(TurnOutcome::Began { overage })
    }
}

/// What the metering of a user turn decided, before any session it began is recorded.
pub enum Turn {
    /// Not billed (test chat) or no session involved.
    Unbilled,
    /// Part of the open session.
    Continued,
    /// Began a new billed session, to be committed (or dropped: not billed).
    Began(PendingSession),
}

impl Turn {
    /// Records a session this turn began; the outcome.
    pub async fn commit(self) -> Result<TurnOutcome, ApiError> {
        match self {
            Turn::Unbilled => Ok(TurnOutcome::Unbilled),
            Turn::Continued => Ok(TurnOutcome::Continued),
            Turn::Began(p) => p.commit().await,
        }
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
enum Step<'a> {
    /// The open session is pending: wait for it (already registered), then decide again.
    Wait(std::pin::Pin<Box<tokio::sync::futures::Notified<'a>>>),
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
    /// When the last cluster heartbeat (lease renewal) succeeded, ms; 0 before the first.
    pub heartbeat_ok_ms: std::sync::atomic::AtomicI64,
    /// Cluster heartbeats that failed.
    pub heartbeat_failures: std::sync::atomic::AtomicU64,
}

/// The ledger lingers (`cluster.ledger_linger_ms`) only after a write of at least this many
/// sessions: a node that begins that many sessions within one Redis round trip is busy enough
/// for the wait to gather many more, while a quiet node's sessions never wait.
const LINGER_AFTER: usize = 16;

/// A bot's key in the counter maps: (tenant, bot id).
type BotKey = (String, String);

struct Inner {
    rules: SessionRules,
    cluster: Option<ClusterMetering>,
    degraded: Degraded,
    config: MeteringConfig,
    clock: SharedClock,
    store: SharedStore,
    ledger: Ledger,
    /// The ledger writer's histograms, for `/metrics`.
    ledger_stats: ledger::LedgerStats,
    /// Per (tenant, bot): a bot is its tenant and id together, so the same id in another tenant
    /// (after the first deleted it) is another bot with its own counters and pool.
    bots: DashMap<BotKey, Arc<BotCounters>>,
    /// Shared with the ledger's writer, which reads each batch's capacity thresholds from them.
    pools: Arc<DashMap<String, Arc<TenantPool>>>,
    /// The flushes of the non-billing counters to the store.
    flushed: Mutex<Flushes>,
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
            for (s, u) in s.flows.iter_mut().zip(u.flows) {
                *s += u;
            }
            if day_month(&u.day) == Some(month) {
                *used_this_month.entry(u.tenant.clone()).or_default() += u.sessions - u.overage;
            }
        }
        let m = &config.metering;
        let degraded = Degraded::default();
        // Batch ids never repeat: the node's id, this start's time and a random word prefix a
        // counter (two starts in one millisecond, even under one misconfigured node id, differ).
        // The same start names the flushes of the non-billing counters.
        let node = cluster.as_ref().map_or("local", |c| c.leases.node()).to_string();
        let incarnation = format!("{}.{:08x}", clock.now_ms(), rand::random::<u32>());
        let batch_prefix = format!("{node}.{incarnation}");
        let pools: Arc<DashMap<String, Arc<TenantPool>>> = Arc::default();
        let watch = config.notifications.enabled.then(|| {
            let pools = pools.clone();
            let defaults = config.notifications.capacity_thresholds.clone();
            Watch(Arc::new(move |tenant: &str, month| {
                let pool = pools.get(tenant)?.clone();
                Some(CapacityWatch {
                    tenant: tenant.to_string(),
                    month,
                    capacity: pool.capacity(month),
                    thresholds: pool.alerts().unwrap_or_else(|| defaults.clone()),
                })
            }))
        });
        let ledger_stats = ledger::LedgerStats::default();
        let inner = Inner {
            ledger_stats: ledger_stats.clone(),
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
                    watch,
                    stats: ledger_stats.clone(),
                },
            )?,
            store,
            cluster,
            degraded,
            bots: DashMap::new(),
            pools,
            flushed: Mutex::new(Flushes { node, incarnation, ..Flushes::default() }),
            rebuilt: Mutex::new(rebuilt.clone()),
        };
        // Every tenant's month is rebuilt from the ledger the same way, however the tenant was
        // created: configured tenants start with their configured plan, the others with an
        // empty one until licensing loads theirs from the store.
        let mut tenants: Vec<(&str, CapacityPlan)> =
            config.tenants.iter().map(|t| (t.id.as_str(), plan_of(t, m))).collect();
        for tenant in used_this_month.keys() {
            if !config.tenants.iter().any(|t| &t.id == tenant) {
                tenants.push((tenant.as_str(), CapacityPlan::default()));
            }
        }
        for (tenant, plan) in tenants {
            let used = used_this_month.get(tenant).copied().unwrap_or(0);
            let pool = if inner.cluster.is_some() {
                TenantPool::leased(tenant, plan, month)
            } else {
                TenantPool::new(tenant, plan, month, used)
            };
            inner.pools.insert(tenant.to_string(), pool);
        }
        inner.flushed.lock().unwrap_or_else(|p| p.into_inner()).snapshots = rebuilt.clone();
        let me = Self { inner: Arc::new(inner) };
        // Every bot the ledger knows is exported from the start, with its totals (the per-bot
        // series then add up to the tenant's, also for bots since deleted).
        for (tenant, bot) in rebuilt.keys() {
            let _ = me.counters(tenant, bot);
        }
        Ok(me)
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

    /// The ledger writer's histograms (commit time, batch size, a session's wait), registered on
    /// `/metrics` at start.
    pub fn ledger_stats(&self) -> &ledger::LedgerStats {
        &self.inner.ledger_stats
    }

    /// The counters of a bot, created (from the rebuilt totals) on first use.
    pub fn counters(&self, tenant: &str, bot: &str) -> Arc<BotCounters> {
        let key = (tenant.to_string(), bot.to_string());
        if let Some(c) = self.inner.bots.get(&key) {
            return c.clone();
        }
        let start = self
            .inner
            .rebuilt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .copied()
            .unwrap_or_default();
        let pool = self.pool(tenant);
        self.inner
            .bots
            .entry(key)
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
        let incarnation = format!("{:x}{:08x}", self.inner.clock.now_ms(), rand::random::<u32>());
        ConversationMeter {
            counters: Some(self.counters(tenant, bot)),
            session: Arc::default(),
            incarnation: incarnation.into_boxed_str(),
        }
    }

    /// Meters an event or invoke a user sent: it counts against the bot's message rate limit,
    /// as a message does, and begins no session and is no turn (a client's join event is a
    /// greeting).
    pub fn on_user_event(&self, meter: &ConversationMeter) -> Result<(), ApiError> {
        let Some(counters) = &meter.counters else { return Ok(()) };
        self.take_rate(counters)
    }

    /// Meters an activity of a test chat: never billed, but counted against the bot's rate
    /// limit like the bot users' messages.
    pub fn on_test_chat(&self, tenant: &str, bot: &str) -> Result<(), ApiError> {
        if !self.inner.config.enabled {
            return Ok(());
        }
        self.take_rate(&self.counters(tenant, bot))
    }

    fn take_rate(&self, counters: &BotCounters) -> Result<(), ApiError> {
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
        Ok(())
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
        self.begin_turn(conversation, meter, user_topic).await?.commit().await
    }

    /// Decides one user message as [`on_user_turn`](Self::on_user_turn) does, but leaves a
    /// session it began to the caller: committed once the bot accepted the turn, or dropped
    /// (and not billed) when the bot never did.
    pub async fn begin_turn(
        &self,
        conversation: &str,
        meter: &ConversationMeter,
        user_topic: bool,
    ) -> Result<Turn, ApiError> {
        let Some(counters) = &meter.counters else {
            return Ok(Turn::Unbilled);
        };
        let now = self.inner.clock.now_ms();
        self.take_rate(counters)?;
        // Refills this session asked for or waited on; a few, since a refill's units can go to
        // other sessions before this one draws again.
        let mut refills = 0u8;
        // `drawn`: the session took a unit from the pool (not overage, not allowed in an outage).
        let (ordinal, month, overage, drawn) = loop {
            // The session state's std lock is never held across the refill's await.
            let step = {
                let mut state = meter.state();
                match state.decide(&self.inner.rules, now, user_topic) {
                    Decision::Wait => {
                        // Registered before the lock is released, so the settling cannot slip
                        // between this decision and the wait.
                        let mut settled = Box::pin(meter.session.settled.notified());
                        settled.as_mut().enable();
                        Step::Wait(settled)
                    }
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
                Step::Wait(settled) => settled.await,
                Step::Done(outcome) => {
                    counters.add_turn();
                    return Ok(match outcome {
                        TurnOutcome::Continued => Turn::Continued,
                        _ => Turn::Unbilled,
                    });
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
                        match state.decide(&self.inner.rules, now, user_topic) {
                            Decision::Begin => break (state.begin(now), month, false, false),
                            // Another turn of this conversation began a session meanwhile.
                            Decision::Wait => continue,
                            _ => {
                                counters.add_turn();
                                return Ok(Turn::Continued);
                            }
                        }
                    }
                    // Decide again: another message of this conversation may have begun a
                    // session meanwhile.
                }
            }
        };
        // Armed from here: any way out of this turn that does not record the session undoes it;
        // the session and its turn are counted once it is recorded.
        let refund = Refund {
            counters: counters.clone(),
            session: meter.session.clone(),
            ordinal,
            month,
            drawn,
            overage,
            armed: true,
        };
        // A session that began just before a month rolled over is stamped in the month it drew.
        let began_ms = now.max(month_start_ms(month));
        let rec = SessionRecord {
            id: format!("{conversation}.{}.{ordinal}", meter.incarnation),
            tenant: counters.tenant.clone(),
            bot: counters.bot.clone(),
            began_ms,
            overage,
            node: self.inner.cluster.as_ref().map(|c| c.leases.node().to_string()).unwrap_or_default(),
        };
        Ok(Turn::Began(PendingSession { ledger: self.inner.ledger.clone(), rec, refund }))
    }

    /// Gets more of `pool` for a session that found this node's lease empty (several nodes);
    /// ends an outage episode on success. One Redis call at a time per pool: a session that
    /// waited for a refill in flight takes its outcome, and a pool Redis recently had nothing
    /// left for is not asked again for a moment.
    async fn refill(&self, pool: &Arc<TenantPool>, month: pool::MonthIndex) -> Result<(), String> {
        let (Some(cluster), Some(lease)) = (&self.inner.cluster, pool.lease()) else { return Ok(()) };
        let seen = lease.refills();
        let gate = lease.refill.clone().lock_owned().await;
        let now = self.inner.clock.now_ms();
        if let Some(left) = lease.fenced_for(now) {
            return Err(format!("FENCED {left} ms left after a failover, as the last lease call said"));
        }
        match lease.refilled_since(seen) {
            Some(true) => return Ok(()),
            Some(false) => return Err("the lease refill this session waited for failed".into()),
            None => {}
        }
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
        if lease.known_empty(month, now) || lease.fenced_for(now).is_some() {
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
        if let Some(left_ms) = lease::fence_left_ms(cause) {
            let secs = left_ms.div_ceil(1000).max(1);
            return Err(ApiError::unavailable(
                "MeteringUnavailable",
                format!(
                    "The gateway's metering store has just failed over, so new sessions are paused \
                     for about {secs} s more. Try again then."
                ),
            )
            .with_retry_after(secs));
        }
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

    /// Gives back this node's unused leases (graceful shutdown; several nodes), keeping the units
    /// of the sessions its spool still holds for Redis. Returns the units given back.
    pub fn release_leases(&self) -> Result<u64, String> {
        let (Some(cluster), month) = (&self.inner.cluster, self.current_month()) else { return Ok(0) };
        let mut pending: HashMap<String, u64> = HashMap::new();
        for batch in cluster.spool.spooled(usize::MAX).map_err(|e| e.to_string())? {
            for s in batch.sessions.iter().filter(|s| !s.overage && month_of(s.began_ms) == month) {
                *pending.entry(s.tenant.clone()).or_default() += 1;
            }
        }
        cluster.leases.release_blocking(&self.pools(), month, |t| pending.get(t).copied().unwrap_or(0))
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

    /// Writes the non-billing counters (turns, refusals, flow runs) accumulated since the last flush to the
    /// store, under today's date. Billed sessions are already in the ledger.
    ///
    /// A flush that failed may still have been applied (its answer lost): it is sent again,
    /// whole and under its own sequence number, before anything newer, and the store applies
    /// each flush once. The counters it carried are never sent in another flush.
    pub fn flush(&self) -> Result<(), crate::store::StoreError> {
        let day = crate::store::sqlite::day_of(self.inner.clock.now_ms());
        let mut guard = self.inner.flushed.lock().unwrap_or_else(|p| p.into_inner());
        let f = &mut *guard;
        if let Some((seq, deltas)) = &f.unsettled {
            let name = UsageFlush { node: &f.node, incarnation: &f.incarnation, seq: *seq };
            self.inner.store.add_usage(name, deltas)?;
            f.unsettled = None;
        }
        let mut deltas = Vec::new();
        for b in self.inner.bots.iter() {
            let now = b.snapshot();
            let before = f.snapshots.get(b.key()).copied().unwrap_or_default();
            // Saturating: the counters only grow (a session is counted once recorded, never
            // taken back), and a bot's counters start from the same rebuilt totals as its flushed
            // snapshot; never wrap if that ever fails to hold.
            let d = UsageDelta {
                turns: now.turns.saturating_sub(before.turns),
                rejected_capacity: now.rejected_capacity.saturating_sub(before.rejected_capacity),
                rejected_rate: now.rejected_rate.saturating_sub(before.rejected_rate),
                flows: std::array::from_fn(|i| now.flows[i].saturating_sub(before.flows[i])),
            };
            if d != UsageDelta::default() {
                deltas.push((b.tenant.clone(), b.bot.clone(), day.clone(), d));
                f.snapshots.insert(b.key().clone(), now);
            }
        }
        if deltas.is_empty() {
            return Ok(());
        }
        f.seq += 1;
        let name = UsageFlush { node: &f.node, incarnation: &f.incarnation, seq: f.seq };
        let result = self.inner.store.add_usage(name, &deltas);
        if result.is_err() {
            f.unsettled = Some((f.seq, deltas));
        }
        result
    }

    /// Flushes, then reads every day's usage from the store.
    pub fn usage(&self) -> Result<Vec<DailyUsage>, crate::store::StoreError> {
        self.flush()?;
        self.inner.store.load_usage()
    }
}

/// One flush's counters: (tenant, bot, day, increments).
type UsageRows = Vec<(String, String, String, UsageDelta)>;

/// This node's flushes of the non-billing counters.
#[derive(Default)]
struct Flushes {
    /// Names the flushes (see [`UsageFlush`]).
    node: String,
    incarnation: String,
    /// The last flush's number.
    seq: u64,
    /// Counters as of the last flush (sent, whatever its outcome).
    snapshots: HashMap<BotKey, CounterSnapshot>,
    /// A flush whose outcome is unknown: its number and counters, sent again first.
    unsettled: Option<(u64, UsageRows)>,
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
        alerts: t.capacity_alerts.clone(),
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

    /// A store whose session writes wait for `release`, then fail; and whose next
    /// `lost_answers` usage flushes are applied, then answered with an error (the answer lost).
    struct FailingWrites {
        inner: crate::store::sqlite::SqliteStore,
        entered: std::sync::mpsc::SyncSender<()>,
        release: Mutex<std::sync::mpsc::Receiver<()>>,
        lost_answers: std::sync::atomic::AtomicU32,
    }

    impl crate::store::Store for FailingWrites {
        fn ping(&self) -> Result<(), crate::store::StoreError> {
            self.inner.ping()
        }
        fn record_sessions(&self, _: &str, _: &[SessionRecord]) -> Result<(), crate::store::StoreError> {
            let _ = self.entered.send(());
            let _ = self.release.lock().unwrap().recv();
            Err(crate::store::StoreError::Closed)
        }
        fn add_usage(
            &self,
            f: UsageFlush<'_>,
            d: &[(String, String, String, UsageDelta)],
        ) -> Result<(), crate::store::StoreError> {
            self.inner.add_usage(f, d)?;
            let lost = self
                .lost_answers
                .fetch_update(
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                    |n| n.checked_sub(1),
                )
                .is_ok();
            if lost { Err(crate::store::StoreError::Closed) } else { Ok(()) }
        }
        fn load_usage(&self) -> Result<Vec<DailyUsage>, crate::store::StoreError> {
            self.inner.load_usage()
        }
        fn session_ids(&self) -> Result<Vec<String>, crate::store::StoreError> {
            self.inner.session_ids()
        }
        fn load_control(&self) -> Result<crate::store::control::ControlData, crate::store::StoreError> {
            self.inner.load_control()
        }
        fn apply(
            &self,
            m: &[crate::store::control::Mutation],
            a: &[crate::store::control::AuditEntry],
        ) -> Result<(), crate::store::StoreError> {
            self.inner.apply(m, a)
        }
        fn audit(
            &self,
            t: &str,
            after: i64,
            limit: usize,
        ) -> Result<Vec<crate::store::control::AuditEntry>, crate::store::StoreError> {
            self.inner.audit(t, after, limit)
        }
        fn shared_key(&self, name: &str, fresh: &[u8]) -> Result<Vec<u8>, crate::store::StoreError> {
            self.inner.shared_key(name, fresh)
        }
        fn raise(&self, e: &[crate::store::outbox::OutboxEvent]) -> Result<usize, crate::store::StoreError> {
            self.inner.raise(e)
        }
        fn claim_due(
            &self,
            now: i64,
            lease: i64,
            limit: usize,
        ) -> Result<Vec<crate::store::outbox::Claimed>, crate::store::StoreError> {
            self.inner.claim_due(now, lease, limit)
        }
        fn settle(
            &self,
            e: &crate::store::outbox::OutboxEvent,
            t: &[crate::store::outbox::Target],
            a: &[crate::store::outbox::Attempt],
            keep: usize,
        ) -> Result<(), crate::store::StoreError> {
            self.inner.settle(e, t, a, keep)
        }
        fn attempts(
            &self,
            t: &str,
            limit: usize,
        ) -> Result<Vec<crate::store::outbox::Attempt>, crate::store::StoreError> {
            self.inner.attempts(t, limit)
        }
        fn events(
            &self,
            t: &str,
            limit: usize,
        ) -> Result<Vec<crate::store::outbox::EventState>, crate::store::StoreError> {
            self.inner.events(t, limit)
        }
        fn close(&self) -> Result<(), crate::store::StoreError> {
            self.inner.close()
        }
    }

    #[tokio::test]
    async fn a_turn_dropped_while_its_session_is_recorded_is_undone_when_the_write_fails() {
        use crate::clock::{Clock, ManualClock};
        let dir = tempfile::tempdir().unwrap();
        let (entered_tx, entered) = std::sync::mpsc::sync_channel(1);
        let (release, release_rx) = std::sync::mpsc::channel();
        let store = Arc::new(FailingWrites {
            inner: crate::store::sqlite::SqliteStore::open(dir.path()).unwrap(),
            entered: entered_tx,
            release: Mutex::new(release_rx),
            lost_answers: Default::default(),
        });
        let clock = ManualClock::at("2026-11-28T10:00:00Z");
        let config = Config::embedded_default().unwrap();
        let metering = Metering::start(&config, clock.clone(), store, None).unwrap();
        let tenant = &config.bots[0].tenant;
        let meter = Arc::new(metering.meter_for(tenant, &config.bots[0].id, true));
        let (m, c) = (metering.clone(), meter.clone());
        let turn = tokio::spawn(async move { m.on_user_turn("conv", &c, true).await });
        // The session is drawn and its write is under way: the request goes away (a client
        // disconnect, a timeout).
        tokio::task::spawn_blocking(move || entered.recv().unwrap()).await.unwrap();
        let month = month_of(clock.now_ms());
        assert_eq!(metering.pool(tenant).used(month), 1);
        turn.abort();
        assert!(turn.await.unwrap_err().is_cancelled());
        // Then the write fails: the unit goes back to the pool and the session is not counted.
        release.send(()).unwrap();
        for _ in 0..1000 {
            if metering.pool(tenant).used(month) == 0 {
                break;
            }
            tokio::task::yield_now().await;
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(metering.pool(tenant).used(month), 0, "the unit is back in the pool");
        assert_eq!(metering.counters(tenant, &config.bots[0].id).snapshot().billed, 0);
        assert!(!meter.state().is_open(), "the session that was never recorded is closed");
    }

    #[test]
    fn a_flush_whose_answer_was_lost_counts_its_turns_once() {
        use crate::store::Store;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FailingWrites {
            inner: crate::store::sqlite::SqliteStore::open(dir.path()).unwrap(),
            entered: std::sync::mpsc::sync_channel(1).0,
            release: Mutex::new(std::sync::mpsc::channel().1),
            lost_answers: 2.into(),
        });
        let clock = crate::clock::ManualClock::at("2026-11-28T10:00:00Z");
        let config = Config::embedded_default().unwrap();
        let metering = Metering::start(&config, clock, store.clone(), None).unwrap();
        let counters = metering.counters(&config.bots[0].tenant, &config.bots[0].id);
        let turns = || store.inner.load_usage().unwrap().iter().map(|u| u.turns).sum::<u64>();
        // Three turns flushed, and the answer lost; then the same flush sent again, its answer
        // lost too; two more turns, and both flushes answered.
        (0..3).for_each(|_| counters.add_turn());
        assert!(metering.flush().is_err());
        assert!(metering.flush().is_err());
        (0..2).for_each(|_| counters.add_turn());
        metering.flush().unwrap();
        assert_eq!(turns(), 5, "each turn counted once");
        metering.flush().unwrap();
        assert_eq!(turns(), 5);
    }

    #[test]
    fn eighty_percent_mark() {
        // 80% of 2000 is 1600; of 7 it is 5.6, so the mark is the 6th session.
        assert_eq!((2000u64 * 4).div_ceil(5), 1600);
        assert_eq!((7u64 * 4).div_ceil(5), 6);
    }
}
