//! Capacity leases: with several nodes, a tenant's monthly pool lives in Redis and each node
//! draws sessions from a local lease of it, with the same lock-free CAS as one node. No Redis
//! call is on the steady-state path: a node asks for more when its lease runs low (in the
//! background), and only a node whose lease is empty waits for one round trip.
//!
//! The pool of a tenant and month is one Redis hash, `bg:{tenant}:pool:YYYY-MM`:
//! `granted` (units handed out, used or not), and per node `held:N` (units leased to N),
//! `used:N` (sessions N recorded: the ledger script counts them), `exp:N` (lease expiry, ms),
//! `seq:N`/`last:N` (the last call, for idempotent retries). Every script first reclaims the
//! unused units of nodes whose lease expired (a crashed node's lease comes back after the TTL).
//! A grant never exceeds what the month still has, and shrinks as the pool nears empty
//! (at most a quarter of what is left), so the last units are not stranded on an idle node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::clock::{Millis, SharedClock};
use crate::store::redis::{RedisStore, key};

use super::pool::{MonthIndex, TenantPool, month_label};

const RECLAIM: &str = r#"
local h = KEYS[1]
local now = tonumber(ARGV[1])
local me = ARGV[2]
local f = redis.call('HGETALL', h)
local v = {}
for i = 1, #f, 2 do v[f[i]] = f[i + 1] end
local granted = tonumber(v['granted'] or '0')
for k, exp in pairs(v) do
  local n = string.match(k, '^exp:(.+)$')
  if n and n ~= me and tonumber(exp) <= now then
    local held = tonumber(v['held:' .. n] or '0')
    local used = tonumber(v['used:' .. n] or '0')
    if held > used then
      granted = granted - (held - used)
      redis.call('HSET', h, 'held:' .. n, used)
    end
    redis.call('HDEL', h, k)
  end
end
redis.call('HSET', h, 'granted', granted)
"#;

/// `KEYS[1]` pool; `ARGV` now, node, seq, want, capacity, ttl_ms. Returns the units granted.
const LEASE: &str = r#"
local h = KEYS[1]
local now, node, seq = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local want, cap, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if redis.call('HGET', h, 'seq:' .. node) == seq then
  return tonumber(redis.call('HGET', h, 'last:' .. node) or '0')
end
local granted = tonumber(redis.call('HGET', h, 'granted') or '0')
local avail = cap - granted
if avail < 0 then avail = 0 end
local grant = math.min(want, math.max(1, math.floor(avail / 4)), avail)
local held = tonumber(redis.call('HGET', h, 'held:' .. node) or '0')
redis.call('HSET', h, 'granted', granted + grant, 'held:' .. node, held + grant,
  'seq:' .. node, seq, 'last:' .. node, grant, 'exp:' .. node, now + ttl)
redis.call('PEXPIRE', h, 5356800000)
return grant
"#;

/// `KEYS[1]` pool; `ARGV` now, node, ttl_ms. Renews the node's lease if it holds one; returns
/// the month's use across every node.
const RENEW: &str = r#"
local h = KEYS[1]
local now, node, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
if redis.call('HEXISTS', h, 'held:' .. node) == 1 then
  redis.call('HSET', h, 'exp:' .. node, now + ttl)
end
local f = redis.call('HGETALL', h)
local used = 0
for i = 1, #f, 2 do
  if string.match(f[i], '^used:') then used = used + tonumber(f[i + 1]) end
end
return used
"#;

/// `KEYS[1]` pool; `ARGV` node. Gives back the node's unused units (graceful shutdown).
const RELEASE: &str = r#"
local h = KEYS[1]
local node = ARGV[1]
local held = tonumber(redis.call('HGET', h, 'held:' .. node) or '0')
local used = tonumber(redis.call('HGET', h, 'used:' .. node) or '0')
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
}

/// This node's lease client.
pub struct Leases {
    store: Arc<RedisStore>,
    node: String,
    clock: SharedClock,
    config: LeaseConfig,
    seq: AtomicU64,
    /// Per tenant: (time, units used) at the last grant, to size the next from the recent rate.
    last: Mutex<HashMap<String, (Millis, u64, u64)>>,
}

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
        Self { store, node, clock, config, seq, last: Mutex::new(HashMap::new()) }
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    fn want(&self, pool: &TenantPool, month: MonthIndex, now: Millis) -> u64 {
        let used = pool.used(month);
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let Some(&(at, used_then, grant)) = last.get(&pool.tenant) else { return 10 };
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
        let call = || {
            self.store.with_conn(|c| {
                let mut pipe = redis::pipe();
                pipe.add_command(eval(
                    RECLAIM,
                    std::slice::from_ref(&pk),
                    &[now.to_string(), self.node.clone()],
                ))
                .ignore();
                pipe.add_command(eval(
                    LEASE,
                    std::slice::from_ref(&pk),
                    &[
                        now.to_string(),
                        self.node.clone(),
                        seq.to_string(),
                        want.to_string(),
                        capacity.to_string(),
                        self.config.ttl_ms.to_string(),
                    ],
                ));
                let (grant,): (u64,) = pipe.query(c)?;
                Ok(grant)
            })
        };
        let grant = call().or_else(|_| call()).map_err(|e| e.to_string())?;
        pool.add_lease(month, grant, now + self.config.ttl_ms - self.config.ttl_ms / 10);
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pool.tenant.clone(), (now, pool.used(month), grant.max(1)));
        Ok(grant)
    }

    /// Whether the lease of `pool` is running low (a quarter of the last grant left).
    pub fn low(&self, pool: &TenantPool, month: MonthIndex) -> bool {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner()).get(&pool.tenant).map_or(1, |l| l.2);
        pool.lease_remaining(month) <= last / 4
    }

    /// Renews this node's leases of `pools` and reads each month's use across nodes
    /// (the heartbeat, every third of the TTL).
    pub fn renew_blocking(&self, pools: &[Arc<TenantPool>], month: MonthIndex) -> Result<(), String> {
        let now = self.clock.now_ms();
        let keys: Vec<String> = pools.iter().map(|p| pool_key(&p.tenant, month)).collect();
        let used: Vec<u64> = self
            .store
            .with_conn(|c| {
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.add_command(eval(
                        RECLAIM,
                        std::slice::from_ref(k),
                        &[now.to_string(), self.node.clone()],
                    ))
                    .ignore();
                    pipe.add_command(eval(
                        RENEW,
                        std::slice::from_ref(k),
                        &[now.to_string(), self.node.clone(), self.config.ttl_ms.to_string()],
                    ));
                }
                pipe.query(c)
            })
            .map_err(|e| e.to_string())?;
        for (p, u) in pools.iter().zip(used) {
            p.renew_lease(now + self.config.ttl_ms - self.config.ttl_ms / 10);
            p.set_global_used(month, u);
        }
        Ok(())
    }

    /// Gives back the unused units of `pools` (graceful shutdown).
    pub fn release_blocking(&self, pools: &[Arc<TenantPool>], month: MonthIndex) -> Result<u64, String> {
        let keys: Vec<String> = pools.iter().map(|p| pool_key(&p.tenant, month)).collect();
        let back: Vec<i64> = self
            .store
            .with_conn(|c| {
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.add_command(eval(
                        RELEASE,
                        std::slice::from_ref(k),
                        std::slice::from_ref(&self.node),
                    ));
                }
                pipe.query(c)
            })
            .map_err(|e| e.to_string())?;
        Ok(back.into_iter().map(|b| b.max(0) as u64).sum())
    }
}
