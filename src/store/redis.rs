//! The shared store for several nodes: Redis (or a compatible server such as Valkey).
//!
//! Every key of a tenant carries the `{tenant}` hash tag, so a tenant's keys share one Redis
//! Cluster slot and a change to one tenant is one `MULTI`/`EXEC`. After a control-plane change
//! the store publishes the tenant on [`CHANGES_CHANNEL`]; nodes reload on that message.
//!
//! Billed sessions are recorded a ledger batch at a time: one script stores the batch's
//! sessions (each with its unique id) under the batch id and counts them only if the batch id was
//! new, so a retried batch (after a timeout, or replayed whole from a node's spool after an
//! outage) is never counted twice, and the Redis work per batch does not grow with its size.
//!
//! Connections are a small pool of std `Mutex<Option<Connection>>`: callers are blocking
//! threads (the ledger's writer, the lease calls, `spawn_blocking`), each takes a free
//! connection, so one slow call (a report, an owner lookup) never queues the ledger behind it;
//! a failed call drops its connection and the next call on it reconnects.

use std::sync::Mutex;
use std::time::Duration;

use redis::{Connection, RedisResult};

use super::control::{
    AuditEntry, BotRecord, ControlData, EndpointRecord, Mutation, Principal, SeatRecord, SubscriptionRecord,
    TenantRecord, TrialRecord,
};
use super::outbox::{Attempt, CapacityWatch, Claimed, EventState, OutboxEvent, Target};
use super::{DailyUsage, SessionRecord, Store, StoreError, UsageDelta};
use crate::store::sqlite::day_of;

/// The pub/sub channel carrying the id of each tenant whose control plane changed.
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

/// The Redis store.
pub struct RedisStore {
    client: redis::Client,
    url: String,
    conns: [Mutex<Option<Connection>>; POOL],
    /// Where a caller that found every connection busy waits next (round robin).
    next: std::sync::atomic::AtomicUsize,
    /// The ledger script, called by its hash (`EVALSHA`) and loaded when the server lacks it.
    record: redis::Script,
    /// Tenants this process has seen in the tenant set, so a batch does not re-add its tenant.
    registered: Mutex<std::collections::HashSet<String>>,
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
    /// Connects (and checks the server answers).
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|e| err(url, e))?;
        let store = Self {
            client,
            url: url.to_string(),
            conns: std::array::from_fn(|_| Mutex::new(None)),
            next: std::sync::atomic::AtomicUsize::new(0),
            record: redis::Script::new(RECORD),
            registered: Mutex::new(Default::default()),
        };
        store.ping()?;
        Ok(store)
    }

    /// The client (for pub/sub and the lease scripts, which use their own connections).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// Runs `f` on a free connection of the pool (waiting for one in turn when all are busy),
    /// reconnecting first if needed; a failure drops that connection.
    pub fn with_conn<T>(&self, f: impl FnOnce(&mut Connection) -> RedisResult<T>) -> Result<T, StoreError> {
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
            let c = self
                .client
                .get_connection_with_timeout(Duration::from_secs(1))
                .map_err(|e| err(&self.url, e))?;
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = c.set_write_timeout(Some(Duration::from_secs(2)));
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

    fn tenants(&self, c: &mut Connection) -> RedisResult<Vec<String>> {
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
        let mut groups: std::collections::BTreeMap<
            (&str, crate::metering::pool::MonthIndex),
            Vec<&SessionRecord>,
        > = Default::default();
        for s in batch {
            groups.entry((&s.tenant, crate::metering::pool::month_of(s.began_ms))).or_default().push(s);
        }
        let node = batch[0].node.as_str();
        let mut pipe = redis::pipe();
        let mut new_tenants = Vec::new();
        {
            let registered = self.registered.lock().unwrap_or_else(|p| p.into_inner());
            for ((tenant, month), sessions) in &groups {
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
                pipe.add_command(c).ignore();
                if !registered.contains(*tenant) {
                    pipe.cmd("SADD").arg(TENANTS).arg(*tenant).ignore();
                    new_tenants.push(tenant.to_string());
                }
            }
        }
        self.with_conn(|c| match pipe.query::<()>(c) {
            // The server does not know the script yet (first write, a restart, `SCRIPT FLUSH`):
            // load it and send the pipeline once more (its `SADD`s are idempotent).
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.record.load(c)?;
                pipe.query::<()>(c)
            }
            other => other,
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

    fn add_usage(&self, deltas: &[(String, String, String, UsageDelta)]) -> Result<(), StoreError> {
        if deltas.is_empty() {
            return Ok(());
        }
        self.with_conn(|c| {
            let mut pipe = redis::pipe();
            for (tenant, bot, day, d) in deltas {
                let k = key(tenant, "usage");
                let counts = [
                    ("turns", d.turns),
                    ("rc", d.rejected_capacity),
                    ("rr", d.rejected_rate),
                    ("fok", d.flows[0]),
                    ("ffail", d.flows[1]),
                    ("ftime", d.flows[2]),
                    ("fref", d.flows[3]),
                ];
                for (name, v) in counts {
                    if v > 0 {
                        pipe.cmd("HINCRBY").arg(&k).arg(format!("{bot}|{day}|{name}")).arg(v).ignore();
                    }
                }
                pipe.cmd("SADD").arg(TENANTS).arg(tenant).ignore();
            }
            pipe.query::<()>(c)
        })
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
        // A seat claim watches the seats it counted, a bot's creation the bot index: when
        // another node changed them before the transaction ran, they are checked again.
        for _ in 0..8 {
            match self.with_conn(|c| apply_on(c, mutations, audit, None))? {
                Applied::Yes => return Ok(()),
                Applied::SeatsFull(tenant) => return Err(StoreError::SeatsFull { tenant }),
                Applied::BotExists(id) => return Err(StoreError::BotExists { id }),
                Applied::No => {}
            }
        }
        Err(StoreError::Redis {
            url: self.url.clone(),
            message: "the seats kept changing while a seat was claimed".into(),
        })
    }

    fn seed_tenant(
        &self,
        tenant: &str,
        mutations: &[Mutation],
        audit: &[AuditEntry],
    ) -> Result<bool, StoreError> {
        self.with_conn(|c| apply_on(c, mutations, audit, Some(tenant))).map(|a| a == Applied::Yes)
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

/// Whether [`apply_on`] applied its transaction.
#[derive(Debug, PartialEq, Eq)]
enum Applied {
    Yes,
    /// A watched key changed (or the tenant to seed exists): nothing was written.
    No,
    /// A seat claim found every seat of this tenant taken: nothing was written.
    SeatsFull(String),
    /// A bot created with an id another bot has: nothing was written.
    BotExists(String),
}

/// Applies control-plane changes and their audit entries in one `MULTI`/`EXEC`, then publishes
/// the touched tenants. With `only_new`, the transaction runs only if that tenant does not exist
/// (`WATCH` on its key: a node that loses the race to seed it applies nothing). A seat claim
/// counts the tenant's seats under `WATCH`, so it applies only if a seat was free when it ran.
fn apply_on(
    c: &mut Connection,
    mutations: &[Mutation],
    audit: &[AuditEntry],
    only_new: Option<&str>,
) -> RedisResult<Applied> {
    if let Some(t) = only_new {
        redis::cmd("WATCH").arg(key(t, "tenant")).query::<()>(c)?;
        if redis::cmd("EXISTS").arg(key(t, "tenant")).query::<bool>(c)? {
            redis::cmd("UNWATCH").query::<()>(c)?;
            return Ok(Applied::No);
        }
    }
    for m in mutations {
        if let Mutation::ClaimSeat { seat, seats } = m {
            let k = key(&seat.tenant, "seats");
            redis::cmd("WATCH").arg(&k).query::<()>(c)?;
            let held: bool = redis::cmd("HEXISTS").arg(&k).arg(&seat.user).query(c)?;
            let taken: u64 = redis::cmd("HLEN").arg(&k).query(c)?;
            if !held && taken >= *seats {
                redis::cmd("UNWATCH").query::<()>(c)?;
                return Ok(Applied::SeatsFull(seat.tenant.clone()));
            }
        }
        if let Mutation::CreateBot(b) = m {
            redis::cmd("WATCH").arg(BOT_INDEX).query::<()>(c)?;
            if redis::cmd("HEXISTS").arg(BOT_INDEX).arg(&b.id).query::<bool>(c)? {
                redis::cmd("UNWATCH").query::<()>(c)?;
                return Ok(Applied::BotExists(b.id.clone()));
            }
        }
    }

    // Tenants of deleted bots are found before the transaction.
    let mut bot_tenants = std::collections::HashMap::new();
    for m in mutations {
        if let Mutation::DeleteBot { id } = m {
            let t: Option<String> = redis::cmd("HGET").arg(BOT_INDEX).arg(id).query(c)?;
            bot_tenants.insert(id.clone(), t.unwrap_or_default());
        }
    }
    // Audit sequence numbers, reserved per tenant before the transaction (a failed
    // transaction leaves a gap, never a duplicate).
    let mut seqs: std::collections::HashMap<String, i64> = Default::default();
    for a in audit {
        *seqs.entry(a.tenant.clone()).or_default() += 1;
    }
    let mut next: std::collections::HashMap<String, i64> = Default::default();
    for (t, n) in &seqs {
        let last: i64 = redis::cmd("INCRBY").arg(key(t, "auditseq")).arg(*n).query(c)?;
        next.insert(t.clone(), last - n + 1);
    }
    let mut pipe = redis::pipe();
    pipe.atomic();
    let mut touched = std::collections::BTreeSet::new();
    for m in mutations {
        match m {
            Mutation::PutTenant(t) => {
                pipe.cmd("SET").arg(key(&t.id, "tenant")).arg(json(t)).ignore();
                pipe.cmd("SADD").arg(TENANTS).arg(&t.id).ignore();
                touched.insert(t.id.clone());
            }
            Mutation::PutSubscription(s) => {
                pipe.cmd("HSET").arg(key(&s.tenant, "subs")).arg(&s.id).arg(json(s)).ignore();
                touched.insert(s.tenant.clone());
            }
            Mutation::PutAssignment { tenant, kind, id } => {
                pipe.cmd("SADD").arg(key(tenant, "assign")).arg(format!("{}:{id}", kind_str(*kind))).ignore();
                touched.insert(tenant.clone());
            }
            Mutation::DeleteAssignment { tenant, kind, id } => {
                pipe.cmd("SREM").arg(key(tenant, "assign")).arg(format!("{}:{id}", kind_str(*kind))).ignore();
                touched.insert(tenant.clone());
            }
            Mutation::PutSeat(s) | Mutation::ClaimSeat { seat: s, .. } => {
                pipe.cmd("HSET").arg(key(&s.tenant, "seats")).arg(&s.user).arg(&s.via).ignore();
                touched.insert(s.tenant.clone());
            }
            Mutation::DeleteSeats { tenant, user, via } => {
                let seats: Vec<(String, String)> =
                    redis::cmd("HGETALL").arg(key(tenant, "seats")).query(c)?;
                for (u, v) in seats {
                    if user.as_ref().is_none_or(|x| *x == u) && via.as_ref().is_none_or(|x| *x == v) {
                        pipe.cmd("HDEL").arg(key(tenant, "seats")).arg(u).ignore();
                    }
                }
                touched.insert(tenant.clone());
            }
            Mutation::PutTrial(t) => {
                pipe.cmd("HSET").arg(key(&t.tenant, "trials")).arg(&t.user).arg(json(t)).ignore();
                touched.insert(t.tenant.clone());
            }
            Mutation::PutBot(b) | Mutation::CreateBot(b) => {
                pipe.cmd("HSET").arg(key(&b.tenant, "bots")).arg(&b.id).arg(json(b)).ignore();
                pipe.cmd("HSET").arg(BOT_INDEX).arg(&b.id).arg(&b.tenant).ignore();
                pipe.cmd("SADD").arg(TENANTS).arg(&b.tenant).ignore();
                touched.insert(b.tenant.clone());
            }
            Mutation::DeleteBot { id } => {
                let t = bot_tenants.get(id).cloned().unwrap_or_default();
                pipe.cmd("HDEL").arg(key(&t, "bots")).arg(id).ignore();
                pipe.cmd("HDEL").arg(BOT_INDEX).arg(id).ignore();
                touched.insert(t);
            }
            Mutation::PutEndpoint(e) => {
                pipe.cmd("HSET").arg(key(&e.tenant, "endpoints")).arg(&e.id).arg(json(e)).ignore();
                touched.insert(e.tenant.clone());
            }
            Mutation::DeleteEndpoint { tenant, id } => {
                pipe.cmd("HDEL").arg(key(tenant, "endpoints")).arg(id).ignore();
                touched.insert(tenant.clone());
            }
        }
    }
    for a in audit {
        let seq = next.get_mut(&a.tenant).map(|s| {
            *s += 1;
            *s - 1
        });
        let mut e = a.clone();
        e.seq = seq.unwrap_or(0);
        pipe.cmd("RPUSH").arg(key(&a.tenant, "audit")).arg(json(&e)).ignore();
        touched.insert(a.tenant.clone());
    }
    if pipe.query::<Option<()>>(c)?.is_none() {
        // A watched key changed meanwhile: another node seeded the tenant, or took a seat.
        return Ok(Applied::No);
    }
    for t in touched {
        redis::cmd("PUBLISH").arg(CHANGES_CHANNEL).arg(t).query::<i64>(c)?;
    }
    Ok(Applied::Yes)
}
