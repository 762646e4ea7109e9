//! The lease protocol of `metering::lease` on Redis.
//!
//! The pool of a tenant and month is one Redis hash, `bg:{tenant}:pool:YYYY-MM` (in the tenant's
//! Cluster slot): `granted` (units handed out, used or not), and per node `held:N` (units leased
//! to N), `used:N` (sessions N recorded: the ledger script counts them), `exp:N` (lease expiry,
//! ms by Redis's clock), `seq:N`/`last:N` (the last call, for idempotent retries). Each call is
//! one script, atomic per pool. The tenant's fence, `bg:{tenant}:fence` (same slot), holds the
//! epoch of its leases and the end of a fence after a failover (see [`FENCE_FN`]).

use crate::metering::lease::{Grant, LeaseCall, LeaseStore, Renewal};
use crate::metering::pool::{MonthIndex, month_label};
use crate::store::StoreError;

use super::redis::{RedisStore, key};

/// Lua functions every lease script starts with. `clock` is Redis's time in ms, or the caller's
/// when one is passed (a test's manual clock). `reclaim` reads the pool hash once, reclaims the
/// unused units of other nodes whose lease expired, and returns the hash as a table (as
/// reclaimed).
///
/// An expired lease is reclaimed only once Redis has seen it expired for another TTL
/// (`gone:N`, the first time a call saw it expired). A Redis outage longer than the TTL expires
/// every lease at once, and each node then holds sessions in its spool whose units Redis has
/// not seen used: the grace lets a live node replay its spool and renew (which keeps its lease)
/// before anyone may take those units. A node that is really gone loses its lease after twice
/// the TTL.
const RECLAIM_FN: &str = r#"
local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function reclaim(h, now, me, ttl)
  local f = redis.call('HGETALL', h)
  local v = {}
  for i = 1, #f, 2 do v[f[i]] = f[i + 1] end
  local granted = tonumber(v['granted'] or '0')
  local changed = false
  local seen = {}
  for k, exp in pairs(v) do
    local n = string.match(k, '^exp:(.+)$')
    local gone = n and v['gone:' .. n]
    if n and n ~= me and tonumber(exp) <= now and not gone then
      seen[#seen + 1] = n
    elseif n and n ~= me and tonumber(exp) <= now and now - tonumber(gone) >= ttl then
      v['gone:' .. n] = nil
      redis.call('HDEL', h, 'gone:' .. n)
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
  for _, n in ipairs(seen) do
    redis.call('HSET', h, 'gone:' .. n, now)
    v['gone:' .. n] = tostring(now)
  end
  if changed then redis.call('HSET', h, 'granted', granted) end
  v['granted'] = tostring(granted)
  return v
end
"#;

/// The fence (see `metering::lease`). `fenced(h, f, now, fence_ms, ttl)` compares the epoch in
/// the tenant's fence hash `f` (the replication id of the primary that last made a lease call)
/// with this primary's. On another epoch, it records this one; and if this primary was promoted
/// from a replica (it has a previous replication id) and a node that does not wait for replicas
/// may hold a lease, it drops every lease of pool `h` (each node keeps the units of the sessions
/// Redis has recorded for it, and a node's sessions recorded later raise its holding again, as
/// after a reclaim) and fences the tenant's grants for a TTL. Returns the end of the fence, or 0
/// when not fenced.
///
/// A caller that does not wait passes `fence_ms` above 0, and notes the time in `nowait` (at most
/// once a TTL). A caller that waits passes 0 and still fences when `nowait` is under three TTLs
/// old: a non-waiting node active then may hold a lease, at most a TTL past its last call, and the
/// replica's `nowait` lags the last one by at most a TTL and the replication lag. So the nodes of
/// one deployment may differ in `cluster.ledger_wait_replicas`.
const FENCE_FN: &str = r#"
local function fenced(h, f, now, fence_ms, ttl)
  local info = redis.call('INFO', 'replication')
  local id = string.match(info, 'master_replid:(%w+)')
  local promoted = string.match(info, 'master_replid2:(%w+)') ~= string.rep('0', 40)
  local e = redis.call('HMGET', f, 'epoch', 'until', 'nowait')
  local untl = tonumber(e[2] or '0')
  local nowait = tonumber(e[3] or '0')
  if e[1] ~= id then
    redis.call('HSET', f, 'epoch', id)
    local length = fence_ms
    if length == 0 and e[3] and now - nowait < 3 * ttl then length = ttl end
    if e[1] and promoted and length > 0 then
      untl = now + length
      redis.call('HSET', f, 'until', untl)
      local p = redis.call('HGETALL', h)
      local granted = 0
      for i = 1, #p, 2 do
        local n = string.match(p[i], '^exp:(.+)$') or string.match(p[i], '^gone:(.+)$')
        if n then redis.call('HDEL', h, p[i]) end
        n = string.match(p[i], '^used:(.+)$')
        if n then
          granted = granted + tonumber(p[i + 1])
          redis.call('HSET', h, 'held:' .. n, p[i + 1])
        end
        n = string.match(p[i], '^held:(.+)$')
        if n and redis.call('HEXISTS', h, 'used:' .. n) == 0 then redis.call('HSET', h, p[i], 0) end
      end
      if #p > 0 then redis.call('HSET', h, 'granted', granted) end
    end
  end
  if fence_ms > 0 and (not e[3] or now - nowait >= ttl) then redis.call('HSET', f, 'nowait', now) end
  if now < untl then return untl end
  return 0
end
"#;

/// `KEYS[1]` pool, `KEYS[2]` the tenant's fence; `ARGV` now (empty: Redis's clock), node, seq,
/// want, capacity, ttl_ms, fence_ms. Returns the units granted, and 1 if the node's previous
/// lease was still its own (not reclaimed, not released), else 0; a retried call returns the
/// first call's answer. While the pool is fenced, an error `FENCED` with the ms left.
const LEASE: &str = r#"
local h = KEYS[1]
local now, node, seq = clock(ARGV[1]), ARGV[2], ARGV[3]
local want, cap, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local untl = fenced(h, KEYS[2], now, tonumber(ARGV[7]), ttl)
if untl > 0 then
  return redis.error_reply('FENCED ' .. (untl - now) .. ' ms left after a failover')
end
local v = reclaim(h, now, node, ttl)
if v['seq:' .. node] == seq then
  return {tonumber(v['last:' .. node] or '0'), tonumber(v['kept:' .. node] or '0')}
end
local kept = 0
if v['exp:' .. node] then kept = 1 end
local granted = tonumber(v['granted'])
local avail = cap - granted
if avail < 0 then avail = 0 end
local grant = math.min(want, math.max(1, math.floor(avail / 4)), avail)
local held = tonumber(v['held:' .. node] or '0')
redis.call('HSET', h, 'granted', granted + grant, 'held:' .. node, held + grant,
  'seq:' .. node, seq, 'last:' .. node, grant, 'kept:' .. node, kept, 'exp:' .. node, now + ttl)
redis.call('HDEL', h, 'gone:' .. node)
redis.call('PEXPIRE', h, 5356800000)
return {grant, kept}
"#;

/// `KEYS[1]` pool, `KEYS[2]` the tenant's fence; `ARGV` now (empty: Redis's clock), node,
/// ttl_ms, fence_ms. Renews the node's lease if Redis still holds it (not reclaimed, not
/// released, not dropped by a fence); returns the month's use across every node and whether the
/// lease was renewed.
const RENEW: &str = r#"
local h = KEYS[1]
local now, node, ttl = clock(ARGV[1]), ARGV[2], tonumber(ARGV[3])
fenced(h, KEYS[2], now, tonumber(ARGV[4]), ttl)
local v = reclaim(h, now, node, ttl)
local renewed = 0
if v['exp:' .. node] then
  redis.call('HSET', h, 'exp:' .. node, now + ttl)
  redis.call('HDEL', h, 'gone:' .. node)
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
redis.call('HDEL', h, 'exp:' .. node, 'gone:' .. node)
return held - used
"#;

/// The Redis key of a tenant's pool for a month.
pub fn pool_key(tenant: &str, month: MonthIndex) -> String {
    key(tenant, &format!("pool:{}", month_label(month)))
}

/// The Redis key of a tenant's lease fence (`epoch`, `until`), kept across months so a pool a
/// new month begins is judged by it too.
pub fn fence_key(tenant: &str) -> String {
    key(tenant, "fence")
}

/// The grant and renew scripts, each after [`RECLAIM_FN`] and [`FENCE_FN`].
static LEASE_SCRIPT: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("{RECLAIM_FN}{FENCE_FN}{LEASE}"));
static RENEW_SCRIPT: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("{RECLAIM_FN}{FENCE_FN}{RENEW}"));

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

impl LeaseStore for RedisStore {
    fn grant(
        &self,
        tenant: &str,
        month: MonthIndex,
        call: LeaseCall<'_>,
        seq: u64,
        want: u64,
        capacity: u64,
    ) -> Result<Grant, StoreError> {
        let (units, kept): (u64, u8) = self.with_conn(|c| {
            let answer = eval(
                &LEASE_SCRIPT,
                &[pool_key(tenant, month), fence_key(tenant)],
                &[
                    now_arg(&call),
                    call.node.to_string(),
                    seq.to_string(),
                    want.to_string(),
                    capacity.to_string(),
                    call.ttl_ms.to_string(),
                    call.fence_ms.to_string(),
                ],
            )
            .query(c)?;
            // A grant counts once the replicas have it: a failover must not forget units this
            // node draws on (they could be granted again).
            self.wait_replicas(c, &pool_key(tenant, month))?;
            Ok(answer)
        })?;
        Ok(Grant { units, kept: kept == 1 })
    }

    fn renew(
        &self,
        tenants: &[&str],
        month: MonthIndex,
        call: LeaseCall<'_>,
    ) -> Result<Vec<Renewal>, StoreError> {
        let answers: Vec<(u64, u8)> = self.with_conn(|c| {
            let groups: Vec<Vec<redis::Cmd>> = tenants
                .iter()
                .map(|t| {
                    vec![eval(
                        &RENEW_SCRIPT,
                        &[pool_key(t, month), fence_key(t)],
                        &[
                            now_arg(&call),
                            call.node.to_string(),
                            call.ttl_ms.to_string(),
                            call.fence_ms.to_string(),
                        ],
                    )]
                })
                .collect();
            let values = c.query_groups(&groups)?;
            let keys: Vec<String> = tenants.iter().map(|t| pool_key(t, month)).collect();
            self.wait_all(c, &keys)?;
            values.into_iter().map(super::redis_conn::parse).collect()
        })?;
        Ok(answers.into_iter().map(|(used, renewed)| Renewal { used, renewed: renewed == 1 }).collect())
    }

    fn release(
        &self,
        tenants: &[(&str, u64)],
        month: MonthIndex,
        node: &str,
    ) -> Result<Vec<i64>, StoreError> {
        self.with_conn(|c| {
            let groups: Vec<Vec<redis::Cmd>> = tenants
                .iter()
                .map(|(t, pending)| {
                    vec![eval(RELEASE, &[pool_key(t, month)], &[node.to_string(), pending.to_string()])]
                })
                .collect();
            let values = c.query_groups(&groups)?;
            values.into_iter().map(super::redis_conn::parse).collect()
        })
    }
}

/// The `now` argument of a script: empty for Redis's own clock.
fn now_arg(call: &LeaseCall<'_>) -> String {
    call.now.map(|n| n.to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock, Millis};
    use crate::metering::lease::{LeaseConfig, Leases};
    use crate::metering::pool::TenantPool;
    use std::sync::Arc;

    /// A real `redis-server` on a Unix socket in its own folder (no port for a parallel test's
    /// server to take first), killed on drop.
    struct Redis(std::process::Child, tempfile::TempDir);

    impl Redis {
        fn start() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let socket = dir.path().join("redis.sock");
            let child = std::process::Command::new("redis-server")
                .args(["--port", "0", "--unixsocket"])
                .arg(&socket)
                .args(["--dir"])
                .arg(dir.path())
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server (scripts/test.sh installs it)");
            let redis = Self(child, dir);
            for _ in 0..200 {
                if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                    return redis;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            panic!("redis-server did not start");
        }

        fn url(&self) -> String {
            format!("redis+unix://{}", self.1.path().join("redis.sock").display())
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

    fn leases_on(redis: &Redis, node: &str, clock: &Arc<ManualClock>, store_time: bool) -> Leases {
        Leases::new(Arc::new(store(redis)), node.into(), clock.clone(), config(store_time))
    }

    fn store(redis: &Redis) -> RedisStore {
        RedisStore::open(&redis.url()).unwrap()
    }

    fn config(store_time: bool) -> LeaseConfig {
        LeaseConfig { ttl_ms: 10_000, target_secs: 5, max_grant: 1000, store_time, fence: true }
    }

    /// One grant call of `node` at `now`, straight to the store.
    fn grant(s: &RedisStore, node: &str, now: Millis, seq: u64, want: u64, cap: u64) -> u64 {
        let month = crate::metering::pool::month_of(now);
        s.grant(
            "p",
            month,
            LeaseCall { node, now: Some(now), ttl_ms: 10_000, fence_ms: 10_000 },
            seq,
            want,
            cap,
        )
        .unwrap()
        .units
    }

    /// A pool of `capacity` sessions a month drawing from a lease, as every node has one.
    fn leased_pool(capacity: u64, month: MonthIndex) -> Arc<TenantPool> {
        use crate::config::{SubscriptionConfig, SubscriptionKind};
        let plan = crate::metering::pool::CapacityPlan {
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
        while matches!(pool.try_draw(now), crate::metering::pool::Draw::Drawn { .. }) {
            n += 1;
        }
        n
    }

    #[test]
    fn a_reclaimed_lease_stays_reclaimed_and_its_old_holder_draws_only_new_grants() {
        let redis = Redis::start();
        let clock = ManualClock::at("2026-11-28T00:00:00Z");
        let month = crate::metering::pool::month_of(clock.now_ms());
        let (a, b) = (leases(&redis, "a", &clock), leases(&redis, "b", &clock));
        let (pa, pb) = (leased_pool(100, month), leased_pool(100, month));
        assert_eq!(a.refill_blocking(&pa, month).unwrap(), 10);
        // A is cut off past twice its TTL (paused, partitioned); B reclaims A's unused 10.
        for _ in 0..2 {
            clock.advance_ms(10_001);
            b.refill_blocking(&pb, month).unwrap();
        }
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
    fn a_reclaimed_remainder_is_dropped_at_the_next_grant() {
        let redis = Redis::start();
        let clock = ManualClock::at("2026-11-28T00:00:00Z");
        let month = crate::metering::pool::month_of(clock.now_ms());
        let (a, b) = (leases(&redis, "a", &clock), leases(&redis, "b", &clock));
        let (pa, pb) = (leased_pool(1000, month), leased_pool(1000, month));
        let first = a.refill_blocking(&pa, month).unwrap();
        for _ in 0..2 {
            clock.advance_ms(10_001);
            b.refill_blocking(&pb, month).unwrap();
        }
        // No renewal in between: A asks for more straight away.
        let second = a.refill_blocking(&pa, month).unwrap();
        assert!(first > 0 && second > 0);
        assert_eq!(draw_all(&pa, clock.now_ms()), second, "the old remainder was reclaimed");
    }

    #[test]
    fn a_lease_expired_by_an_outage_is_kept_by_a_node_that_renews_within_the_grace() {
        let redis = Redis::start();
        let clock = ManualClock::at("2026-11-28T00:00:00Z");
        let month = crate::metering::pool::month_of(clock.now_ms());
        let (a, b) = (leases(&redis, "a", &clock), leases(&redis, "b", &clock));
        let (pa, pb) = (leased_pool(1000, month), leased_pool(1000, month));
        let held = a.refill_blocking(&pa, month).unwrap();
        // Redis was away longer than the TTL; B is first back and sees A's lease expired.
        clock.advance_ms(10_001);
        b.refill_blocking(&pb, month).unwrap();
        // A is back within the grace: its renewal keeps the lease, and what it had left.
        a.renew_blocking(std::slice::from_ref(&pa), month).unwrap();
        assert_eq!(pa.lease_available(month, clock.now_ms()), held);
        clock.advance_ms(9_000);
        b.refill_blocking(&pb, month).unwrap();
        a.renew_blocking(std::slice::from_ref(&pa), month).unwrap();
        assert_eq!(pa.lease_available(month, clock.now_ms()), held, "never reclaimed while A renews");
    }

    #[test]
    fn expiry_is_judged_by_redis_time_not_a_callers_clock() {
        let redis = Redis::start();
        let now = ManualClock::new(crate::clock::SystemClock.now_ms());
        // B's clock runs an hour ahead of A's and of Redis's.
        let ahead = ManualClock::new(now.now_ms() + 3_600_000);
        let month = crate::metering::pool::month_of(now.now_ms());
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
        let month = crate::metering::pool::month_of(clock.now_ms());
        let a = leases(&redis, "a", &clock);
        let pa = leased_pool(100, month);
        let held = a.refill_blocking(&pa, month).unwrap();
        // Three sessions drawn and spooled (none in Redis yet): they keep their units.
        assert_eq!(a.release_blocking(std::slice::from_ref(&pa), month, |_| 3).unwrap(), held - 3);
        let granted: u64 = store(&redis)
            .with_conn(|c| redis::cmd("HGET").arg(pool_key("t", month)).arg("granted").query(c))
            .unwrap();
        assert_eq!(granted, 3);
    }

    #[test]
    fn a_retried_grant_is_not_a_second_grant_and_a_dead_nodes_lease_comes_back() {
        let redis = Redis::start();
        let (a, b) = (store(&redis), store(&redis));
        let now = ManualClock::at("2026-11-28T00:00:00Z").now_ms();
        // Capacity 100: a quarter of what is left at most per grant.
        assert_eq!(grant(&a, "a", now, 7, 50, 100), 25);
        assert_eq!(grant(&a, "a", now, 7, 50, 100), 25, "the same call again: the same grant");
        assert_eq!(grant(&a, "a", now, 8, 50, 100), 18, "a new call: a quarter of the 75 left");
        assert_eq!(grant(&b, "b", now, 1, 50, 100), 14);
        // A dies holding 43 units. After its TTL, B's next call sees the lease expired but
        // leaves it another TTL (A may only be catching up after an outage).
        assert_eq!(grant(&b, "b", now + 10_001, 2, 50, 100), (100 - 57) / 4);
        // After that, B's next call reclaims A's 43: 24 granted, a quarter of the 76 left.
        assert_eq!(grant(&b, "b", now + 20_002, 3, 50, 100), (100 - 24) / 4);
    }
}
