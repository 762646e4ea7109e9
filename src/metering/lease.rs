//! Capacity leases: with several nodes, a tenant's monthly pool lives in Redis and each node
//! draws sessions from a local lease of it, with the same lock-free CAS as one node. No Redis
//! call is on the steady-state path: a node asks for more when its lease runs low (in the
//! background), and only a node whose lease is empty waits for one round trip.
//!
//! The pool of a tenant and month is one Redis hash, `bg:{tenant}:pool:YYYY-MM`:
//! `granted` (units handed out, used or not), and per node `held:N` (units leased to N),
//! `used:N` (sessions N recorded: the ledger script counts them), `exp:N` (lease expiry, ms),
//! `seq:N`/`last:N` (the last call, for idempotent retries). The grant and renew scripts first
//! reclaim the unused units of nodes whose lease expired (a crashed node's lease comes back after
//! the TTL), in the same call.
//! A grant never exceeds what the month still has, and shrinks as the pool nears empty
//! (at most a quarter of what is left), so the last units are not stranded on an idle node.
//!
//! Leases are fenced. Expiry is judged by Redis's own clock (`TIME`), never a caller's, and a
//! node's local lease ends a tenth of the TTL before Redis's (measured from before the call), so
//! no node draws on units another node may reclaim. A reclaimed lease stays reclaimed: renewal
//! re-arms only a lease Redis still holds, and tells the node when it does not, so the node
//! drops what it had left; a node whose local lease ran out drops its remainder before it adds a
//! new grant. Sessions recorded after their units were reclaimed (a partitioned node's spool,
//! replayed later) raise the node's holding and `granted` by the excess, so what Redis grants
//! next accounts for them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::clock::{Millis, SharedClock};
use crate::store::StoreError;
use crate::store::redis::{RedisStore, key};

use super::pool::{MonthIndex, TenantPool, month_label};

/// Lua functions every lease script starts with. `clock` is Redis's time in ms, or the caller's
/// when one is passed (a test's manual clock). `reclaim` reads the pool hash once, reclaims the
/// unused units of other nodes whose lease expired, and returns the hash as a table (as
/// reclaimed).
const RECLAIM_FN: &str = r#"
local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function reclaim(h, now, me)
  local f = redis.call('HGETALL', h)
  local v = {}
  for i = 1, #f, 2 do v[f[i]] = f[i + 1] end
  local granted = tonumber(v['granted'] or '0')
  local changed = false
  for k, exp in pairs(v) do
    local n = string.match(k, '^exp:(.+)$')
    if n and n ~= me and tonumber(exp) <= now then
      local held = tonumber(v['held:' .. n] or '0')
      local used = tonumber(v['used:' .. n] or '0')
      if held > used then
        granted = granted - (held - used)
        v['held:' .. n] = tostring(used)
        redis.call('HSET', h, 'held:' .. n, used)
      end
      v[k] = nil
      redis.call('HDEL', h, k)
      changed = true
    end
  end
  if changed then redis.call('HSET', h, 'granted', granted) end
  v['granted'] = tostring(granted)
  return v
end
"#;

/// `KEYS[1]` pool; `ARGV` now (empty: Redis's clock), node, seq, want, capacity, ttl_ms. Returns
/// the units granted.
const LEASE: &str = r#"
local h = KEYS[1]
local now, node, seq = clock(ARGV[1]), ARGV[2], ARGV[3]
local want, cap, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local v = reclaim(h, now, node)
if v['seq:' .. node] == seq then
  return tonumber(v['last:' .. node] or '0')
end
local granted = tonumber(v['granted'])
local avail = cap - granted
if avail < 0 then avail = 0 end
local grant = math.min(want, math.max(1, math.floor(avail / 4)), avail)
local held = tonumber(v['held:' .. node] or '0')
redis.call('HSET', h, 'granted', granted + grant, 'held:' .. node, held + grant,
  'seq:' .. node, seq, 'last:' .. node, grant, 'exp:' .. node, now + ttl)
redis.call('PEXPIRE', h, 5356800000)
return grant
"#;

/// `KEYS[1]` pool; `ARGV` now (empty: Redis's clock), node, ttl_ms. Renews the node's lease if
/// Redis still holds it (not reclaimed, not released); returns the month's use across every node
/// and whether the lease was renewed.
const RENEW: &str = r#"
local h = KEYS[1]
local now, node, ttl = clock(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local v = reclaim(h, now, node)
local renewed = 0
if v['exp:' .. node] then
  redis.call('HSET', h, 'exp:' .. node, now + ttl)
  renewed = 1
end
local used = 0
for k, n in pairs(v) do
  if string.match(k, '^used:') then used = used + tonumber(n) end
end
return {used, renewed}
"#;

/// `KEYS[1]` pool; `ARGV` node, pending. Gives back the node's unused units (graceful
/// shutdown), keeping `pending` of them: sessions the node served that are not in Redis yet (its
/// spool replays them later, and they must find their units still held).
const RELEASE: &str = r#"
local h = KEYS[1]
local node, pending = ARGV[1], tonumber(ARGV[2])
local held = tonumber(redis.call('HGET', h, 'held:' .. node) or '0')
local used = tonumber(redis.call('HGET', h, 'used:' .. node) or '0') + pending
if held > used then
  redis.call('HINCRBY', h, 'granted', used - held)
  redis.call('HSET', h, 'held:' .. node, used)
end
redis.call('HDEL', h, 'exp:' .. node)
return held - used
"#;

/// The Redis key of a tenant's pool for a month.
pub fn pool_key(tenant: &str, month: MonthIndex) -> String {
    key(tenant, &format!("pool:{}", month_label(month)))
}

/// Lease settings.
#[derive(Debug, Clone, Copy)]
pub struct LeaseConfig {
    /// How long a lease stays valid without renewal, ms.
    pub ttl_ms: i64,
    /// How many seconds of recent use a grant aims to cover.
    pub target_secs: u64,
    /// The largest grant.
    pub max_grant: u64,
    /// Judge expiry by Redis's clock (`TIME`), as every node on the wall clock does; off, the
    /// caller's clock is passed instead (tests on a manual clock).
    pub redis_time: bool,
}

/// This node's lease client.
pub struct Leases {
    store: Arc<RedisStore>,
    node: String,
    clock: SharedClock,
    config: LeaseConfig,
    seq: AtomicU64,
}

/// The grant and renew scripts, each after [`RECLAIM_FN`].
static LEASE_SCRIPT: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("{RECLAIM_FN}{LEASE}"));
static RENEW_SCRIPT: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("{RECLAIM_FN}{RENEW}"));

/// One script call. (Lease calls are rare, a few per node per second at most, so the script
/// text goes along each time.)
fn eval(script: &str, keys: &[String], args: &[String]) -> redis::Cmd {
    let mut c = redis::cmd("EVAL");
    c.arg(script).arg(keys.len());
    for k in keys {
        c.arg(k);
    }
    for a in args {
        c.arg(a);
    }
    c
}

impl Leases {
    /// A client for node `node`.
    pub fn new(store: Arc<RedisStore>, node: String, clock: SharedClock, config: LeaseConfig) -> Self {
        let seq = AtomicU64::new(clock.now_ms() as u64 * 1000);
        Self { store, node, clock, config, seq }
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The `now` argument of a script: empty for Redis's own clock.
    fn now_arg(&self, now: Millis) -> String {
        if self.config.redis_time { String::new() } else { now.to_string() }
    }

    fn want(&self, pool: &TenantPool, month: MonthIndex, now: Millis) -> u64 {
        let used = pool.used(month);
        let Some((at, used_then, grant)) = pool.lease().and_then(|l| l.last_grant()) else { return 10 };
        let secs = ((now - at).max(1) as f64) / 1000.0;
        let rate = used.saturating_sub(used_then) as f64 / secs;
        let by_rate = (rate * self.config.target_secs as f64).ceil() as u64;
        // Grow at most fourfold per call, so a burst does not take the pool in one grant.
        by_rate.clamp(1, (grant * 4).max(10)).min(self.config.max_grant)
    }

    /// Asks Redis for more units of `pool` for `month` (blocking: call it off the runtime).
    /// Retries once with the same sequence number, so a lost answer is not a second grant.
    pub fn refill_blocking(&self, pool: &TenantPool, month: MonthIndex) -> Result<u64, String> {
        let now = self.clock.now_ms();
        let want = self.want(pool, month, now);
        let capacity = pool.capacity(month);
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let pk = pool_key(&pool.tenant, month);
        let call = || self.grant(&pk, now, seq, want, capacity);
        let grant = call().or_else(|_| call()).map_err(|e| e.to_string())?;
        if pool.lease_expired(now) {
            // Whatever this node had left may have been reclaimed by now: the new grant is all
            // it holds.
            pool.drop_lease(month);
        }
        pool.add_lease(month, grant, now + self.config.ttl_ms - self.config.ttl_ms / 10);
        if let Some(l) = pool.lease() {
            l.note_grant(now, pool.used(month), grant);
        }
        Ok(grant)
    }

    /// One call of the grant script: call `seq` of this node asks for `want` units of pool
    /// `pk` (capacity `capacity`); the same `seq` again returns the same grant.
    fn grant(&self, pk: &str, now: Millis, seq: u64, want: u64, capacity: u64) -> Result<u64, StoreError> {
        self.store.with_conn(|c| {
            eval(
                &LEASE_SCRIPT,
                &[pk.to_string()],
                &[
                    self.now_arg(now),
                    self.node.clone(),
                    seq.to_string(),
                    want.to_string(),
                    capacity.to_string(),
                    self.config.ttl_ms.to_string(),
                ],
            )
            .query::<u64>(c)
        })
    }

    /// Renews this node's leases of `pools` and reads each month's use across nodes
    /// (the heartbeat, every third of the TTL).
    pub fn renew_blocking(&self, pools: &[Arc<TenantPool>], month: MonthIndex) -> Result<(), String> {
        let now = self.clock.now_ms();
        let keys: Vec<String> = pools.iter().map(|p| pool_key(&p.tenant, month)).collect();
        let answers: Vec<(u64, u8)> = self
            .store
            .with_conn(|c| {
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.add_command(eval(
                        &RENEW_SCRIPT,
                        std::slice::from_ref(k),
                        &[self.now_arg(now), self.node.clone(), self.config.ttl_ms.to_string()],
                    ));
                }
                pipe.query(c)
            })
            .map_err(|e| e.to_string())?;
        for (p, (used, renewed)) in pools.iter().zip(answers) {
            if renewed == 1 {
                p.renew_lease(now + self.config.ttl_ms - self.config.ttl_ms / 10);
            } else {
                // Reclaimed by another node (or never granted): what is left locally is not
                // this node's any more.
                p.drop_lease(month);
            }
            p.set_global_used(month, used);
        }
        Ok(())
    }

    /// Gives back the unused units of `pools` (graceful shutdown), keeping for each tenant the
    /// units of `pending(tenant)` sessions this node served that Redis has not recorded yet.
    pub fn release_blocking(
        &self,
        pools: &[Arc<TenantPool>],
        month: MonthIndex,
        pending: impl Fn(&str) -> u64,
    ) -> Result<u64, String> {
        let keys: Vec<String> = pools.iter().map(|p| pool_key(&p.tenant, month)).collect();
        let back: Vec<i64> = self
            .store
            .with_conn(|c| {
                let mut pipe = redis::pipe();
                for (k, p) in keys.iter().zip(pools) {
                    pipe.add_command(eval(
                        RELEASE,
                        std::slice::from_ref(k),
                        &[self.node.clone(), pending(&p.tenant).to_string()],
                    ));
                }
                pipe.query(c)
            })
            .map_err(|e| e.to_string())?;
        Ok(back.into_iter().map(|b| b.max(0) as u64).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};

    /// A real `redis-server` on a free loopback port, killed on drop.
    struct Redis(std::process::Child, u16);

    impl Redis {
        fn start() -> Self {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let child = std::process::Command::new("redis-server")
                .args([
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    &port.to_string(),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server (scripts/test.sh installs it)");
            let redis = Self(child, port);
            for _ in 0..200 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return redis;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            panic!("redis-server did not start");
        }
    }

    impl Drop for Redis {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn leases(redis: &Redis, node: &str, clock: &Arc<ManualClock>) -> Leases {
        leases_on(redis, node, clock, false)
    }

    fn leases_on(redis: &Redis, node: &str, clock: &Arc<ManualClock>, redis_time: bool) -> Leases {
        let store = Arc::new(RedisStore::open(&format!("redis://127.0.0.1:{}/", redis.1)).unwrap());
        let config = LeaseConfig { ttl_ms: 10_000, target_secs: 5, max_grant: 1000, redis_time };
        Leases::new(store, node.into(), clock.clone(), config)
    }

    /// A pool of `capacity` sessions a month drawing from a lease, as every node has one.
    fn leased_pool(capacity: u64, month: MonthIndex) -> Arc<TenantPool> {
        use crate::config::{SubscriptionConfig, SubscriptionKind};
        let plan = super::super::pool::CapacityPlan {
            subscriptions: vec![SubscriptionConfig {
                kind: SubscriptionKind::TenantLicense,
                quantity: 1,
                start: chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
                end: None,
            }],
            per_license: capacity,
            ..Default::default()
        };
        TenantPool::leased("t", plan, month)
    }

    fn draw_all(pool: &TenantPool, now: Millis) -> u64 {
        let mut n = 0;
        while matches!(pool.try_draw(now), super::super::pool::Draw::Drawn { .. }) {
            n += 1;
        }
        n
    }

    #[test]
    fn a_reclaimed_lease_stays_reclaimed_and_its_old_holder_draws_only_new_grants() {
        let redis = Redis::start();
        let clock = ManualClock::at("2026-11-28T00:00:00Z");
        let month = super::super::pool::month_of(clock.now_ms());
        let (a, b) = (leases(&redis, "a", &clock), leases(&redis, "b", &clock));
        let (pa, pb) = (leased_pool(100, month), leased_pool(100, month));
        assert_eq!(a.refill_blocking(&pa, month).unwrap(), 10);
        // A is cut off past its TTL (paused, partitioned); B reclaims A's unused 10.
        clock.advance_ms(10_001);
        b.refill_blocking(&pb, month).unwrap();
        // A comes back: its renewal must not re-arm the reclaimed lease, and it drops the 10.
        a.renew_blocking(std::slice::from_ref(&pa), month).unwrap();
        assert_eq!(pa.lease_available(month, clock.now_ms()), 0, "the reclaimed remainder is gone");
        // Its next grant is all it may draw; everything drawn anywhere fits the pool.
        let granted = a.refill_blocking(&pa, month).unwrap();
        assert_eq!(draw_all(&pa, clock.now_ms()), granted);
        let drawn_b = draw_all(&pb, clock.now_ms());
        let mut total = granted + drawn_b;
        for _ in 0..100 {
            for (l, p) in [(&a, &pa), (&b, &pb)] {
                l.refill_blocking(p, month).unwrap();
                total += draw_all(p, clock.now_ms());
            }
        }
        assert_eq!(total, 100, "the pool is never oversold");
    }

    #[test]
    fn an_expired_local_lease_is_dropped_before_a_new_grant_is_added() {
        let redis = Redis::start();
        let clock = ManualClock::at("2026-11-28T00:00:00Z");
        let month = super::super::pool::month_of(clock.now_ms());
        let (a, b) = (leases(&redis, "a", &clock), leases(&redis, "b", &clock));
        let (pa, pb) = (leased_pool(1000, month), leased_pool(1000, month));
        let first = a.refill_blocking(&pa, month).unwrap();
        clock.advance_ms(10_001);
        b.refill_blocking(&pb, month).unwrap();
        // No renewal in between: A asks for more straight away.
        let second = a.refill_blocking(&pa, month).unwrap();
        assert!(first > 0 && second > 0);
        assert_eq!(draw_all(&pa, clock.now_ms()), second, "the old remainder was reclaimed");
    }

    #[test]
    fn expiry_is_judged_by_redis_time_not_a_callers_clock() {
        let redis = Redis::start();
        let now = ManualClock::new(crate::clock::SystemClock.now_ms());
        // B's clock runs an hour ahead of A's and of Redis's.
        let ahead = ManualClock::new(now.now_ms() + 3_600_000);
        let month = super::super::pool::month_of(now.now_ms());
        let (a, b) = (leases_on(&redis, "a", &now, true), leases_on(&redis, "b", &ahead, true));
        let (pa, pb) = (leased_pool(100, month), leased_pool(100, month));
        let held = a.refill_blocking(&pa, month).unwrap();
        b.refill_blocking(&pb, month).unwrap();
        b.refill_blocking(&pb, month).unwrap();
        a.renew_blocking(std::slice::from_ref(&pa), month).unwrap();
        assert_eq!(pa.lease_available(month, now.now_ms()), held, "A's lease was not reclaimed early");
    }

    #[test]
    fn a_release_keeps_the_units_of_sessions_not_recorded_yet() {
        let redis = Redis::start();
        let clock = ManualClock::at("2026-11-28T00:00:00Z");
        let month = super::super::pool::month_of(clock.now_ms());
        let a = leases(&redis, "a", &clock);
        let pa = leased_pool(100, month);
        let held = a.refill_blocking(&pa, month).unwrap();
        // Three sessions drawn and spooled (none in Redis yet): they keep their units.
        assert_eq!(a.release_blocking(std::slice::from_ref(&pa), month, |_| 3).unwrap(), held - 3);
        let granted: u64 = a
            .store
            .with_conn(|c| redis::cmd("HGET").arg(pool_key("t", month)).arg("granted").query(c))
            .unwrap();
        assert_eq!(granted, 3);
    }

    #[test]
    fn a_retried_grant_is_not_a_second_grant_and_a_dead_nodes_lease_comes_back() {
        let redis = Redis::start();
        let clock = ManualClock::at("2026-11-28T00:00:00Z");
        let (a, b) = (leases(&redis, "a", &clock), leases(&redis, "b", &clock));
        let now = clock.now_ms();
        // Capacity 100: a quarter of what is left at most per grant.
        assert_eq!(a.grant("p", now, 7, 50, 100).unwrap(), 25);
        assert_eq!(a.grant("p", now, 7, 50, 100).unwrap(), 25, "the same call again: the same grant");
        assert_eq!(a.grant("p", now, 8, 50, 100).unwrap(), 18, "a new call: a quarter of the 75 left");
        assert_eq!(b.grant("p", now, 1, 50, 100).unwrap(), 14);
        // A dies holding 43 units; after its TTL, B's next call reclaims them.
        clock.advance_ms(10_001);
        assert_eq!(b.grant("p", clock.now_ms(), 2, 50, 100).unwrap(), (100 - 14) / 4);
    }
}
