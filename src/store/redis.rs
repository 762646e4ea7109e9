//! The shared store for several nodes: Redis (or a compatible server such as Valkey), standalone,
//! Sentinel-managed or a Redis Cluster (`store.redis_mode`, see [`super::redis_conn`]).
//!
//! Every key of a tenant carries the `{tenant}` hash tag, so a tenant's keys share one Redis
//! Cluster slot. Every script and pipeline touches one slot: a change to one tenant is one script
//! ([`APPLY`]) that checks its conditions (a seat free, the tenant new) and applies the change and
//! its audit entries atomically. The keys outside tenants (the tenant set, the bot index, node
//! registrations, the signing keys) are written by single commands that are safe to repeat. After
//! a control-plane change the store publishes the tenant on [`CHANGES_CHANNEL`] (sharded pub/sub
//! on a cluster); nodes reload on that message, and in full after any reconnect.
//!
//! Billed sessions are recorded a ledger batch at a time: one script stores the batch's
//! sessions (each with its unique id) under the batch id and counts them only if the batch id was
//! new, so a retried batch (after a timeout, or replayed whole from a node's spool after an
//! outage) is never counted twice, and the Redis work per batch does not grow with its size.
//! With `cluster.ledger_wait_replicas`, a batch counts as written only once that many replicas
//! have it (`WAIT`); otherwise the node spools it and writes it again later.
//!
//! Connections are a small pool of std `Mutex<Option<Conn>>`: callers are blocking
//! threads (the ledger's writer, the lease calls, `spawn_blocking`), each takes a free
//! connection, so one slow call (a report, an owner lookup) never queues the ledger behind it;
//! a failed call drops its connection and the next call on it reconnects (through the
//! sentinels, or re-reading the cluster's slots).

use std::sync::Mutex;

use redis::{Cmd, RedisResult};

use super::control::{
    AuditEntry, BotRecord, ControlData, EndpointRecord, Mutation, Principal, SeatRecord, SubscriptionRecord,
    TenantRecord, TrialRecord,
};
use super::outbox::{Attempt, CapacityWatch, Claimed, EventState, OutboxEvent, Target};
use super::redis_conn::{Conn, Topology};
use super::{DailyUsage, SessionRecord, Store, StoreError, UsageDelta, UsageFlush};
use crate::store::sqlite::day_of;

/// The pub/sub channel carrying the id of each tenant whose control plane changed (a shard
/// channel on a cluster: `SPUBLISH`/`SSUBSCRIBE` on the node serving its slot).
pub const CHANGES_CHANNEL: &str = "bg:changes";

const TENANTS: &str = "bg:tenants";

/// Connections per node: the ledger writer, the lease calls and the rest each find one free.
const POOL: usize = 4;
const BOT_INDEX: &str = "bg:botindex";

/// A key of tenant `t`: `bg:{t}:name`.
pub fn key(t: &str, name: &str) -> String {
    format!("bg:{{{t}}}:{name}")
}

/// Records one ledger batch of one tenant and month, only if the batch is new, and raises the
/// capacity events it reaches (see [`super::redis_outbox::RECORD`] for its keys and arguments).
/// Returns 1 if the batch was new, 0 if it was already recorded.
///
/// Its cost is fixed per batch, not per session: `HSETNX`, one `HINCRBY` per bot and day (two
/// with overage), one for the pool and one for the month's count, whatever the batch holds.
const RECORD: &str = super::redis_outbox::RECORD;

/// A flush of one tenant's non-billing counters (`KEYS[1]` the usage hash, `KEYS[2]` the last
/// flush applied per node): `ARGV` node, incarnation, seq, then field and increment pairs.
/// Applied unless it is that node's last flush applied (or an earlier one of the same
/// incarnation), so a flush sent again after a lost answer counts once. Flushes are rare (each
/// node's every 10 s), so the script text goes along each time.
const ADD_USAGE: &str = r#"
local prev = redis.call('HGET', KEYS[2], ARGV[1])
if prev then
  local inc, seq = string.match(prev, '^(%S+) (%d+)$')
  if inc == ARGV[2] and tonumber(seq) >= tonumber(ARGV[3]) then return 0 end
end
for i = 4, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
return 1
"#;

/// The Redis store.
pub struct RedisStore {
    topology: Topology,
    /// Where it is, for messages: the URL, or the sentinels' primary, or the cluster's seeds.
    url: String,
    conns: [Mutex<Option<Conn>>; POOL],
    /// Where a caller that found every connection busy waits next (round robin).
    next: std::sync::atomic::AtomicUsize,
    /// The ledger script, called by its hash (`EVALSHA`) and loaded when the server lacks it.
    record: redis::Script,
    /// Tenants this process has seen in the tenant set, so a batch does not re-add its tenant.
    registered: Mutex<std::collections::HashSet<String>>,
    /// `WAIT` after each ledger write and lease call: (replicas, timeout in ms); 0 replicas: none.
    wait: (u32, u64),
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("url", &self.url).finish()
    }
}

fn err(url: &str, e: redis::RedisError) -> StoreError {
    StoreError::Redis { url: url.to_string(), message: e.to_string() }
}

fn bad_data(url: &str, what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Redis { url: url.to_string(), message: format!("unreadable {what}: {e}") }
}

impl RedisStore {
    /// Connects to one server (and checks it answers).
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let config = crate::config::StoreConfig {
            backend: crate::config::StoreBackend::Redis,
            redis_url: url.to_string(),
            ..Default::default()
        };
        Self::connect(&config, 0, 0)
    }

    /// Connects as `config` says (`redis_mode`), and checks the server answers; every ledger write
    /// and lease call then waits for `wait_replicas` replicas, up to `wait_timeout_ms`.
    pub fn connect(
        config: &crate::config::StoreConfig,
        wait_replicas: u32,
        wait_timeout_ms: u64,
    ) -> Result<Self, StoreError> {
        use crate::config::RedisMode;
        let url = match config.redis_mode {
            RedisMode::Standalone => config.redis_url.clone(),
            RedisMode::Sentinel => {
                format!("sentinel {} via {}", config.redis_master_name, config.redis_sentinels.join(","))
            }
            RedisMode::Cluster => format!("cluster {}", config.redis_cluster_nodes.join(",")),
        };
        let topology = Topology::of(config).map_err(|e| err(&url, e))?;
        let store = Self {
            topology,
            url,
            conns: std::array::from_fn(|_| Mutex::new(None)),
            next: std::sync::atomic::AtomicUsize::new(0),
            record: redis::Script::new(RECORD),
            registered: Mutex::new(Default::default()),
            wait: (wait_replicas, wait_timeout_ms),
        };
        store.ping()?;
        Ok(store)
    }

    /// Where the store is: its URL, the sentinels' primary, or the cluster's seeds.
    pub fn describe(&self) -> &str {
        &self.url
    }

    /// Where the connections go (for the change subscription).
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Runs `f` on a free connection of the pool (waiting for one in turn when all are busy),
    /// reconnecting first if needed; a failure drops that connection.
    pub fn with_conn<T>(&self, f: impl FnOnce(&mut Conn) -> RedisResult<T>) -> Result<T, StoreError> {
        let free = self.conns.iter().find_map(|slot| match slot.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        });
        let mut guard = match free {
            Some(g) => g,
            None => {
                // Relaxed: only spreads the waiters; no other memory is published through it.
                let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % POOL;
                self.conns[i].lock().unwrap_or_else(|p| p.into_inner())
            }
        };
        if guard.is_none() {
            let c = self.topology.connect().map_err(|e| err(&self.url, e))?;
            // A new connection may be a restarted server: register tenants anew.
            self.registered.lock().unwrap_or_else(|p| p.into_inner()).clear();
            *guard = Some(c);
        }
        let conn = guard.as_mut().ok_or(StoreError::Closed)?;
        match f(conn) {
            Ok(v) => Ok(v),
            Err(e) => {
                *guard = None;
                Err(err(&self.url, e))
            }
        }
    }

    /// After a write on `c` to the slot of `key`: waits for the configured replicas; an error
    /// when fewer than that have it in time (the write itself stands; the caller writes it
    /// again later, idempotently).
    pub fn wait_replicas(&self, c: &mut Conn, key: &str) -> RedisResult<()> {
        let (replicas, timeout) = self.wait;
        if replicas == 0 {
            return Ok(());
        }
        let acked = c.wait_replicas(key, replicas, timeout)?;
        if acked < replicas {
            return Err((
                redis::ErrorKind::Io,
                "too few replicas",
                format!("{acked} of {replicas} replicas acknowledged within {timeout} ms"),
            )
                .into());
        }
        Ok(())
    }

    /// [`Self::wait_replicas`] for writes to the slots of `keys`: once on one server, once per
    /// slot on a cluster.
    pub fn wait_all(&self, c: &mut Conn, keys: &[String]) -> RedisResult<()> {
        if self.wait.0 == 0 || keys.is_empty() {
            return Ok(());
        }
        if !self.topology.sharded() {
            return self.wait_replicas(c, &keys[0]);
        }
        let mut slots: Vec<u16> = Vec::with_capacity(keys.len());
        for k in keys {
            let slot = super::redis_conn::slot(k);
            if !slots.contains(&slot) {
                slots.push(slot);
                self.wait_replicas(c, k)?;
            }
        }
        Ok(())
    }

    /// Publishes that `tenants` changed (sharded on a cluster).
    fn publish(&self, c: &mut Conn, tenants: &std::collections::BTreeSet<String>) -> RedisResult<()> {
        let command = if self.topology.sharded() { "SPUBLISH" } else { "PUBLISH" };
        for t in tenants {
            redis::cmd(command).arg(CHANGES_CHANNEL).arg(t).query::<i64>(c)?;
        }
        Ok(())
    }

    fn tenants(&self, c: &mut Conn) -> RedisResult<Vec<String>> {
        let mut t: Vec<String> = redis::cmd("SMEMBERS").arg(TENANTS).query(c)?;
        t.sort();
        Ok(t)
    }
}

/// One tenant's keys as read: tenant, subscriptions, assignments, seats, trials, bots, webhook
/// endpoints.
type TenantKeys =
    (Option<String>, Vec<String>, Vec<String>, Vec<(String, String)>, Vec<String>, Vec<String>, Vec<String>);

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn kind_str(k: Principal) -> &'static str {
    match k {
        Principal::User => "user",
        Principal::Group => "group",
    }
}

impl Store for RedisStore {
    fn ping(&self) -> Result<(), StoreError> {
        self.with_conn(|c| redis::cmd("PING").query::<String>(c).map(|_| ()))
    }

    fn record_sessions(&self, batch_id: &str, batch: &[SessionRecord]) -> Result<(), StoreError> {
        self.record_watched(batch_id, batch, &[], 0)
    }

    fn record_watched(
        &self,
        batch_id: &str,
        batch: &[SessionRecord],
        watches: &[CapacityWatch],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        // One script call per tenant and month (one Cluster slot each), whatever the batch size.
        // The grouping is a function of the batch, so a replayed batch yields the same fields.
        let mut groups_by_month: std::collections::BTreeMap<
            (&str, crate::metering::pool::MonthIndex),
            Vec<&SessionRecord>,
        > = Default::default();
        for s in batch {
            groups_by_month
                .entry((&s.tenant, crate::metering::pool::month_of(s.began_ms)))
                .or_default()
                .push(s);
        }
        let node = batch[0].node.as_str();
        // One group per tenant and month (one slot each), then the tenant set's additions.
        let mut groups: Vec<Vec<Cmd>> = Vec::with_capacity(groups_by_month.len() + 1);
        let mut wait_keys = Vec::with_capacity(groups_by_month.len());
        let mut register = Vec::new();
        let mut new_tenants = Vec::new();
        {
            let registered = self.registered.lock().unwrap_or_else(|p| p.into_inner());
            for ((tenant, month), sessions) in &groups_by_month {
                let mut packed = String::with_capacity(sessions.len() * 48);
                let mut usage: std::collections::BTreeMap<String, u64> = Default::default();
                let mut drawn = 0u64;
                let mut overage = 0u64;
                for s in sessions {
                    use std::fmt::Write;
                    let _ = writeln!(packed, "{}|{}|{}|{}", s.id, s.bot, s.began_ms, u8::from(s.overage));
                    let day = day_of(s.began_ms);
                    *usage.entry(format!("{}|{day}|sessions", s.bot)).or_default() += 1;
                    if s.overage {
                        *usage.entry(format!("{}|{day}|overage", s.bot)).or_default() += 1;
                        overage += 1;
                    } else {
                        drawn += 1;
                    }
                }
                let mut c = redis::cmd("EVALSHA");
                c.arg(self.record.get_hash())
                    .arg(7)
                    .arg(key(tenant, "sessions"))
                    .arg(key(tenant, "usage"))
                    .arg(super::redis_lease::pool_key(tenant, *month));
                super::redis_outbox::outbox_keys(&mut c, tenant);
                c.arg(node)
                    .arg(format!("{batch_id}/{}", crate::metering::pool::month_label(*month)))
                    .arg(packed)
                    .arg(drawn)
                    .arg(crate::metering::pool::month_label(*month))
                    .arg(sessions.len())
                    .arg(overage)
                    .arg(now_ms);
                let watch = watches.iter().find(|w| w.tenant == *tenant && w.month == *month);
                super::redis_outbox::watch_args(&mut c, watch, now_ms);
                for (field, n) in usage {
                    c.arg(field).arg(n);
                }
                groups.push(vec![c]);
                wait_keys.push(key(tenant, "sessions"));
                if !registered.contains(*tenant) && !new_tenants.iter().any(|t: &String| t == tenant) {
                    register.push(redis::cmd("SADD").arg(TENANTS).arg(*tenant).to_owned());
                    new_tenants.push(tenant.to_string());
                }
            }
        }
        if !register.is_empty() {
            groups.push(register);
        }
        self.with_conn(|c| {
            match c.query_groups(&groups) {
                // The server does not know the script yet (first write, a restart, a failover,
                // `SCRIPT FLUSH`): load it and send the groups once more (a group already
                // recorded answers 0; the `SADD`s are idempotent).
                Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                    self.record.load(c)?;
                    c.query_groups(&groups)?;
                }
                other => {
                    other?;
                }
            }
            self.wait_all(c, &wait_keys)
        })?;
        if !new_tenants.is_empty() {
            self.registered.lock().unwrap_or_else(|p| p.into_inner()).extend(new_tenants);
        }
        Ok(())
    }

    fn raise(&self, events: &[OutboxEvent]) -> Result<usize, StoreError> {
        if events.is_empty() {
            return Ok(0);
        }
        self.with_conn(|c| super::redis_outbox::raise(c, events))
    }

    fn claim_due(&self, now_ms: i64, lease_ms: i64, limit: usize) -> Result<Vec<Claimed>, StoreError> {
        let raw = self.with_conn(|c| {
            let tenants = self.tenants(c)?;
            super::redis_outbox::claim(c, &tenants, now_ms, lease_ms, limit)
        })?;
        super::redis_outbox::parse_claimed(raw).map_err(|e| bad_data(&self.url, "outbox event", e))
    }

    fn settle(
        &self,
        event: &OutboxEvent,
        targets: &[Target],
        attempts: &[Attempt],
        keep: usize,
    ) -> Result<(), StoreError> {
        self.with_conn(|c| super::redis_outbox::settle(c, event, targets, attempts, keep))
    }

    fn attempts(&self, tenant: &str, limit: usize) -> Result<Vec<Attempt>, StoreError> {
        let raw = self.with_conn(|c| super::redis_outbox::attempts(c, tenant, limit))?;
        raw.iter()
            .map(|j| serde_json::from_str(j).map_err(|e| bad_data(&self.url, "delivery attempt", e)))
            .collect()
    }

    fn events(&self, tenant: &str, limit: usize) -> Result<Vec<EventState>, StoreError> {
        let raw = self.with_conn(|c| super::redis_outbox::events(c, tenant))?;
        super::redis_outbox::parse_events(raw, limit).map_err(|e| bad_data(&self.url, "outbox event", e))
    }

    fn add_usage(
        &self,
        flush: UsageFlush<'_>,
        deltas: &[(String, String, String, UsageDelta)],
    ) -> Result<(), StoreError> {
        if deltas.is_empty() {
            return Ok(());
        }
        // One script per tenant (its slot), then the tenant set's additions.
        let mut by_tenant: std::collections::BTreeMap<&str, Vec<(String, u64)>> = Default::default();
        for (tenant, bot, day, d) in deltas {
            let counts = [
                ("turns", d.turns),
                ("rc", d.rejected_capacity),
                ("rr", d.rejected_rate),
                ("fok", d.flows[0]),
                ("ffail", d.flows[1]),
                ("ftime", d.flows[2]),
                ("fref", d.flows[3]),
            ];
            let fields = by_tenant.entry(tenant.as_str()).or_default();
            fields.extend(
                counts.iter().filter(|(_, v)| *v > 0).map(|(name, v)| (format!("{bot}|{day}|{name}"), *v)),
            );
        }
        let mut groups: Vec<Vec<Cmd>> = Vec::with_capacity(by_tenant.len() + 1);
        let mut register = Vec::with_capacity(by_tenant.len());
        for (tenant, fields) in &by_tenant {
            if !fields.is_empty() {
                let mut c = redis::cmd("EVAL");
                c.arg(ADD_USAGE).arg(2).arg(key(tenant, "usage")).arg(key(tenant, "usage:flushes"));
                c.arg(flush.node).arg(flush.incarnation).arg(flush.seq);
                for (field, v) in fields {
                    c.arg(field).arg(*v);
                }
                groups.push(vec![c]);
            }
            register.push(redis::cmd("SADD").arg(TENANTS).arg(*tenant).to_owned());
        }
        groups.push(register);
        self.with_conn(|c| c.query_groups(&groups).map(|_| ()))
    }

    fn load_usage(&self) -> Result<Vec<DailyUsage>, StoreError> {
        let rows = self.with_conn(|c| {
            let mut all = Vec::new();
            for t in self.tenants(c)? {
                let h: Vec<(String, u64)> = redis::cmd("HGETALL").arg(key(&t, "usage")).query(c)?;
                all.push((t, h));
            }
            Ok(all)
        })?;
        let mut map: std::collections::BTreeMap<(String, String, String), DailyUsage> = Default::default();
        for (tenant, fields) in rows {
            for (f, v) in fields {
                let mut parts = f.rsplitn(3, '|');
                let (Some(name), Some(day), Some(bot)) = (parts.next(), parts.next(), parts.next()) else {
                    continue;
                };
                let u = map.entry((tenant.clone(), bot.to_string(), day.to_string())).or_insert_with(|| {
                    DailyUsage {
                        tenant: tenant.clone(),
                        bot: bot.to_string(),
                        day: day.to_string(),
                        sessions: 0,
                        overage: 0,
                        turns: 0,
                        rejected_capacity: 0,
                        rejected_rate: 0,
                        flows: [0; 4],
                    }
                });
                match name {
                    "sessions" => u.sessions += v,
                    "overage" => u.overage += v,
                    "turns" => u.turns += v,
                    "rc" => u.rejected_capacity += v,
                    "rr" => u.rejected_rate += v,
                    "fok" => u.flows[0] += v,
                    "ffail" => u.flows[1] += v,
                    "ftime" => u.flows[2] += v,
                    "fref" => u.flows[3] += v,
                    _ => {}
                }
            }
        }
        Ok(map.into_values().collect())
    }

    fn session_ids(&self) -> Result<Vec<String>, StoreError> {
        self.with_conn(|c| {
            let mut ids = Vec::new();
            for t in self.tenants(c)? {
                let batches: Vec<String> = redis::cmd("HVALS").arg(key(&t, "sessions")).query(c)?;
                for b in &batches {
                    ids.extend(b.lines().filter_map(|l| l.split('|').next()).map(str::to_string));
                }
            }
            ids.sort();
            Ok(ids)
        })
    }

    fn load_control(&self) -> Result<ControlData, StoreError> {
        let raw: Vec<(String, TenantKeys)> = self.with_conn(|c| {
            let mut out = Vec::new();
            for t in self.tenants(c)? {
                let keys: TenantKeys = redis::pipe()
                    .cmd("GET")
                    .arg(key(&t, "tenant"))
                    .cmd("HVALS")
                    .arg(key(&t, "subs"))
                    .cmd("SMEMBERS")
                    .arg(key(&t, "assign"))
                    .cmd("HGETALL")
                    .arg(key(&t, "seats"))
                    .cmd("HVALS")
                    .arg(key(&t, "trials"))
                    .cmd("HVALS")
                    .arg(key(&t, "bots"))
                    .cmd("HVALS")
                    .arg(key(&t, "endpoints"))
                    .query(c)?;
                out.push((t, keys));
            }
            Ok(out)
        })?;
        let url = &self.url;
        let mut d = ControlData::default();
        for (t, (tenant, subs, assign, seats, trials, bots, endpoints)) in raw {
            if let Some(tj) = tenant {
                d.tenants
                    .push(serde_json::from_str::<TenantRecord>(&tj).map_err(|e| bad_data(url, "tenant", e))?);
            }
            for s in subs {
                d.subscriptions.push(
                    serde_json::from_str::<SubscriptionRecord>(&s)
                        .map_err(|e| bad_data(url, "subscription", e))?,
                );
            }
            for a in assign {
                let Some((k, id)) = a.split_once(':') else { continue };
                let kind = if k == "group" { Principal::Group } else { Principal::User };
                d.assignments.push((t.clone(), kind, id.to_string()));
            }
            for (user, via) in seats {
                d.seats.push(SeatRecord { tenant: t.clone(), user, via });
            }
            for tr in trials {
                d.trials
                    .push(serde_json::from_str::<TrialRecord>(&tr).map_err(|e| bad_data(url, "trial", e))?);
            }
            for b in bots {
                d.bots.push(serde_json::from_str::<BotRecord>(&b).map_err(|e| bad_data(url, "bot", e))?);
            }
            for e in endpoints {
                d.endpoints.push(
                    serde_json::from_str::<EndpointRecord>(&e)
                        .map_err(|e| bad_data(url, "webhook endpoint", e))?,
                );
            }
        }
        d.endpoints.sort_by(|a, b| a.id.cmp(&b.id));
        d.subscriptions.sort_by(|a, b| (a.start, &a.id).cmp(&(b.start, &b.id)));
        d.assignments.sort();
        d.bots.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(d)
    }

    fn apply(&self, mutations: &[Mutation], audit: &[AuditEntry]) -> Result<(), StoreError> {
        match self.with_conn(|c| self.apply_on(c, mutations, audit, None))? {
            Applied::Yes | Applied::No => Ok(()),
            Applied::SeatsFull(tenant) => Err(StoreError::SeatsFull { tenant }),
            Applied::BotExists(id) => Err(StoreError::BotExists { id }),
        }
    }

    fn seed_tenant(
        &self,
        tenant: &str,
        mutations: &[Mutation],
        audit: &[AuditEntry],
    ) -> Result<bool, StoreError> {
        self.with_conn(|c| self.apply_on(c, mutations, audit, Some(tenant))).map(|a| a == Applied::Yes)
    }

    fn audit(&self, tenant: &str, after_seq: i64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let all: Vec<String> =
            self.with_conn(|c| redis::cmd("LRANGE").arg(key(tenant, "audit")).arg(0).arg(-1).query(c))?;
        let mut out = Vec::new();
        for j in all {
            let e: AuditEntry =
                serde_json::from_str(&j).map_err(|e| bad_data(&self.url, "audit entry", e))?;
            if e.seq > after_seq {
                out.push(e);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn shared_key(&self, name: &str, fresh: &[u8]) -> Result<Vec<u8>, StoreError> {
        let hex: String = fresh.iter().map(|b| format!("{b:02x}")).collect();
        let stored: String = self.with_conn(|c| {
            redis::cmd("HSETNX").arg("bg:keys").arg(name).arg(&hex).query::<i64>(c)?;
            redis::cmd("HGET").arg("bg:keys").arg(name).query(c)
        })?;
        (0..stored.len())
            .step_by(2)
            .map(|i| stored.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| bad_data(&self.url, "key", name))
    }

    fn close(&self) -> Result<(), StoreError> {
        for slot in &self.conns {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        Ok(())
    }
}

/// Whether [`RedisStore::apply_on`] applied its change.
#[derive(Debug, PartialEq, Eq)]
enum Applied {
    Yes,
    /// The tenant to seed exists: nothing was written.
    No,
    /// A seat claim found every seat of this tenant taken: nothing was written.
    SeatsFull(String),
    /// A bot created with an id another bot has: nothing was written.
    BotExists(String),
}

/// One tenant's control-plane change, atomically. `KEYS`: 1 tenant, 2 subs, 3 assign, 4 seats,
/// 5 trials, 6 bots, 7 endpoints, 8 audit, 9 auditseq, 10 fence (all the tenant's, one slot).
/// The tenant's lease epoch (`store::redis_lease`) starts with its first change, so that even a
/// first grant lost in a failover finds the tenant fenced. `ARGV`:
/// `1` when the tenant must be new (a seed), else `0`; the number of seat claims, then a user and
/// the seat limit each; the number of audit entries, then each entry's JSON before and after its
/// sequence number; then the operations, four arguments each: name, key index, two arguments.
///
/// Returns 1 when applied, 0 when the tenant to seed exists, -1 when a claim found every seat
/// taken (nothing is written then). The conditions are checked before anything is written, and
/// a script runs alone, so two nodes claiming the last seat at once get one seat between them.
const APPLY: &str = r#"
local i = 1
if ARGV[1] == '1' and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
i = 2
local claims = tonumber(ARGV[i]); i = i + 1
local added = 0
for _ = 1, claims do
  local user, limit = ARGV[i], tonumber(ARGV[i + 1]); i = i + 2
  if redis.call('HEXISTS', KEYS[4], user) == 0 then
    if redis.call('HLEN', KEYS[4]) + added >= limit then return -1 end
    added = added + 1
  end
end
local audits = tonumber(ARGV[i]); i = i + 1
local first_audit = i
i = i + 2 * audits
while i <= #ARGV do
  local op, k, a, b = ARGV[i], KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2], ARGV[i + 3]
  i = i + 4
  if op == 'SET' then redis.call('SET', k, a)
  elseif op == 'HSET' then redis.call('HSET', k, a, b)
  elseif op == 'HDEL' then redis.call('HDEL', k, a)
  elseif op == 'SADD' then redis.call('SADD', k, a)
  elseif op == 'SREM' then redis.call('SREM', k, a)
  elseif op == 'DELSEATS' then
    local f = redis.call('HGETALL', k)
    for j = 1, #f, 2 do
      if (a == '' or a == '=' .. f[j]) and (b == '' or b == '=' .. f[j + 1]) then
        redis.call('HDEL', k, f[j])
      end
    end
  end
end
if audits > 0 then
  local seq = redis.call('INCRBY', KEYS[9], audits) - audits + 1
  for j = 0, audits - 1 do
    redis.call('RPUSH', KEYS[8], ARGV[first_audit + 2 * j] .. (seq + j) .. ARGV[first_audit + 2 * j + 1])
  end
end
local info = redis.call('INFO', 'replication')
redis.call('HSETNX', KEYS[10], 'epoch', string.match(info, 'master_replid:(%w+)'))
return 1
"#;

/// The keys of [`APPLY`], in order.
const APPLY_KEYS: [&str; 10] =
    ["tenant", "subs", "assign", "seats", "trials", "bots", "endpoints", "audit", "auditseq", "fence"];

fn apply_key(name: &str) -> usize {
    APPLY_KEYS.iter().position(|k| *k == name).map_or(0, |i| i + 1)
}

/// The sequence number an audit entry is serialized with, then replaced inside [`APPLY`].
const SEQ_MARK: i64 = i64::MAX;

/// Compares the bot index entry of `KEYS[1]`/`ARGV[1]` with `ARGV[2]` and, if equal, replaces it
/// with `ARGV[3]` (or deletes it when that is empty). Returns 1 if it did.
const INDEX_SWAP: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1]) else redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
return 1
"#;

/// A reservation of a bot id older than this, whose tenant does not hold the bot, was left by a
/// creation that never finished (a node stopped between the two steps), and may be taken.
const STALE_RESERVATION_MS: i64 = 60_000;

/// A bot index entry: `tenant|reserved_ms` (entries from before the time was kept: `tenant`).
fn index_entry(tenant: &str) -> String {
    format!("{tenant}|{}", crate::clock::Clock::now_ms(&crate::clock::SystemClock))
}

fn index_tenant(entry: &str) -> (&str, i64) {
    match entry.rsplit_once('|') {
        Some((t, ms)) => (t, ms.parse().unwrap_or(0)),
        None => (entry, 0),
    }
}

/// A tenant's part of a change: its script's arguments, and whether it carries any operation.
#[derive(Default)]
struct TenantChange {
    claims: Vec<(String, u64)>,
    audits: Vec<(String, String)>,
    ops: Vec<[String; 4]>,
}

impl TenantChange {
    fn op(&mut self, name: &str, key: &str, a: &str, b: &str) {
        self.ops.push([name.into(), apply_key(key).to_string(), a.into(), b.into()]);
    }
}

impl RedisStore {
    /// Applies control-plane changes and their audit entries: one [`APPLY`] script per tenant
    /// (a change spans one tenant in practice; across tenants each tenant's part is atomic), then
    /// publishes the touched tenants. With `only_new`, that tenant's part applies only if the
    /// tenant does not exist yet (a node that loses the race to seed it applies nothing).
    ///
    /// The keys outside tenants are written around the scripts by commands safe to repeat: the
    /// tenant set before (a listed tenant without keys reads as nothing), the bot index's
    /// reservation of a new bot id before (so two nodes creating one id create it once) and its
    /// release when the creation did not apply, its removal after a bot's deletion.
    fn apply_on(
        &self,
        c: &mut Conn,
        mutations: &[Mutation],
        audit: &[AuditEntry],
        only_new: Option<&str>,
    ) -> RedisResult<Applied> {
        // Tenants of deleted bots, from the index.
        let mut deleted: Vec<(String, String, String)> = Vec::new(); // (bot, tenant, entry)
        for m in mutations {
            if let Mutation::DeleteBot { id } = m {
                let entry: Option<String> = redis::cmd("HGET").arg(BOT_INDEX).arg(id).query(c)?;
                let entry = entry.unwrap_or_default();
                deleted.push((id.clone(), index_tenant(&entry).0.to_string(), entry));
            }
        }
        let mut changes: std::collections::BTreeMap<String, TenantChange> = Default::default();
        let mut listed = std::collections::BTreeSet::new();
        let mut reserve: Vec<(&str, &str)> = Vec::new();
        for m in mutations {
            match m {
                Mutation::PutTenant(t) => {
                    changes.entry(t.id.clone()).or_default().op("SET", "tenant", &json(t), "");
                    listed.insert(t.id.clone());
                }
                Mutation::PutSubscription(s) => {
                    changes.entry(s.tenant.clone()).or_default().op("HSET", "subs", &s.id, &json(s));
                }
                Mutation::PutAssignment { tenant, kind, id } => {
                    let member = format!("{}:{id}", kind_str(*kind));
                    changes.entry(tenant.clone()).or_default().op("SADD", "assign", &member, "");
                }
                Mutation::DeleteAssignment { tenant, kind, id } => {
                    let member = format!("{}:{id}", kind_str(*kind));
                    changes.entry(tenant.clone()).or_default().op("SREM", "assign", &member, "");
                }
                Mutation::PutSeat(s) => {
                    changes.entry(s.tenant.clone()).or_default().op("HSET", "seats", &s.user, &s.via);
                }
                Mutation::ClaimSeat { seat, seats } => {
                    let ch = changes.entry(seat.tenant.clone()).or_default();
                    ch.claims.push((seat.user.clone(), *seats));
                    ch.op("HSET", "seats", &seat.user, &seat.via);
                }
                Mutation::DeleteSeats { tenant, user, via } => {
                    let filter = |f: &Option<String>| f.as_ref().map(|v| format!("={v}")).unwrap_or_default();
                    changes.entry(tenant.clone()).or_default().op(
                        "DELSEATS",
                        "seats",
                        &filter(user),
                        &filter(via),
                    );
                }
                Mutation::PutTrial(t) => {
                    changes.entry(t.tenant.clone()).or_default().op("HSET", "trials", &t.user, &json(t));
                }
                Mutation::PutBot(b) | Mutation::CreateBot(b) => {
                    changes.entry(b.tenant.clone()).or_default().op("HSET", "bots", &b.id, &json(b));
                    listed.insert(b.tenant.clone());
                    if matches!(m, Mutation::CreateBot(_)) {
                        reserve.push((&b.id, &b.tenant));
                    }
                }
                Mutation::DeleteBot { id } => {
                    let tenant = deleted.iter().find(|d| d.0 == *id).map(|d| d.1.clone()).unwrap_or_default();
                    changes.entry(tenant).or_default().op("HDEL", "bots", id, "");
                }
                Mutation::PutEndpoint(e) => {
                    changes.entry(e.tenant.clone()).or_default().op("HSET", "endpoints", &e.id, &json(e));
                }
                Mutation::DeleteEndpoint { tenant, id } => {
                    changes.entry(tenant.clone()).or_default().op("HDEL", "endpoints", id, "");
                }
            }
        }
        for a in audit {
            let mut e = a.clone();
            e.seq = SEQ_MARK;
            let j = json(&e);
            let mark = format!("\"seq\":{SEQ_MARK}");
            let (before, after) = j.split_once(&mark).unwrap_or((&j, ""));
            changes
                .entry(a.tenant.clone())
                .or_default()
                .audits
                .push((format!("{before}\"seq\":"), after.to_string()));
        }
        if let Some(t) = only_new {
            changes.entry(t.to_string()).or_default();
        }

        // The bot index first: a new id is reserved, or the creation refused.
        let mut reserved: Vec<(&str, String)> = Vec::new();
        for (id, tenant) in &reserve {
            match self.reserve_bot(c, id, tenant)? {
                Some(entry) => reserved.push((id, entry)),
                None => {
                    self.release_bots(c, &reserved)?;
                    return Ok(Applied::BotExists(id.to_string()));
                }
            }
        }
        for t in &listed {
            redis::cmd("SADD").arg(TENANTS).arg(t).query::<i64>(c)?;
        }

        let mut touched = std::collections::BTreeSet::new();
        for (tenant, ch) in &changes {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(APPLY).arg(APPLY_KEYS.len());
            for k in APPLY_KEYS {
                cmd.arg(key(tenant, k));
            }
            cmd.arg(if only_new == Some(tenant.as_str()) { "1" } else { "0" });
            cmd.arg(ch.claims.len());
            for (user, limit) in &ch.claims {
                cmd.arg(user).arg(*limit);
            }
            cmd.arg(ch.audits.len());
            for (before, after) in &ch.audits {
                cmd.arg(before).arg(after);
            }
            for op in &ch.ops {
                cmd.arg(&op[..]);
            }
            match cmd.query::<i64>(c)? {
                1 => {
                    touched.insert(tenant.clone());
                }
                answer => {
                    self.release_bots(c, &reserved)?;
                    return Ok(if answer < 0 { Applied::SeatsFull(tenant.clone()) } else { Applied::No });
                }
            }
        }
        for (id, _, entry) in &deleted {
            redis::cmd("EVAL")
                .arg(INDEX_SWAP)
                .arg(1)
                .arg(BOT_INDEX)
                .arg(id)
                .arg(entry)
                .arg("")
                .query::<i64>(c)?;
        }
        if !touched.is_empty() {
            let keys: Vec<String> = touched.iter().map(|t| key(t, "tenant")).collect();
            self.wait_all(c, &keys)?;
        }
        self.publish(c, &touched)?;
        Ok(Applied::Yes)
    }

    /// Reserves bot id `id` for `tenant` in the bot index; its entry, or `None` when another
    /// bot holds the id.
    fn reserve_bot(&self, c: &mut Conn, id: &str, tenant: &str) -> RedisResult<Option<String>> {
        let entry = index_entry(tenant);
        if redis::cmd("HSETNX").arg(BOT_INDEX).arg(id).arg(&entry).query::<i64>(c)? == 1 {
            return Ok(Some(entry));
        }
        let Some(held) = redis::cmd("HGET").arg(BOT_INDEX).arg(id).query::<Option<String>>(c)? else {
            // Released in between: try once more.
            let taken = redis::cmd("HSETNX").arg(BOT_INDEX).arg(id).arg(&entry).query::<i64>(c)? == 1;
            return Ok(taken.then_some(entry));
        };
        let (holder, since) = index_tenant(&held);
        let exists: bool = redis::cmd("HEXISTS").arg(key(holder, "bots")).arg(id).query(c)?;
        let stale = !exists
            && crate::clock::Clock::now_ms(&crate::clock::SystemClock) - since >= STALE_RESERVATION_MS;
        if !stale {
            return Ok(None);
        }
        let swapped: i64 = redis::cmd("EVAL")
            .arg(INDEX_SWAP)
            .arg(1)
            .arg(BOT_INDEX)
            .arg(id)
            .arg(&held)
            .arg(&entry)
            .query(c)?;
        Ok((swapped == 1).then_some(entry))
    }

    /// Gives back reservations made by a creation that did not apply.
    fn release_bots(&self, c: &mut Conn, reserved: &[(&str, String)]) -> RedisResult<()> {
        for (id, entry) in reserved {
            redis::cmd("EVAL")
                .arg(INDEX_SWAP)
                .arg(1)
                .arg(BOT_INDEX)
                .arg(*id)
                .arg(entry)
                .arg("")
                .query::<i64>(c)?;
        }
        Ok(())
    }
}
