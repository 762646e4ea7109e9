//! The outbox in Redis. Every key is the tenant's (`bg:{t}:ob:*`, one Cluster slot), so the
//! ledger script raises a batch's events atomically with the batch, and claiming is one script
//! per tenant. See [`super::outbox`].
//!
//! Keys of tenant `t`: `ob:ev` (hash: id → event JSON), `ob:dd` (hash: dedupe key → id, the
//! once-only check), `ob:due` (sorted set: id → when delivery looks at it next, removed once
//! settled), `ob:done` (sorted set: settled id → when it was raised, for pruning), `ob:tg`
//! (hash: id → deliveries JSON), `ob:log` (list of attempts, newest first),
//! `msess` (hash: month → billed sessions, every node's).

use redis::{Cmd, RedisResult};

use super::redis_conn::Conn;

use super::outbox::{Attempt, CapacityWatch, Claimed, EventState, OutboxEvent, Target, next_due};
use super::redis::key;

/// The ledger script. `KEYS`: 1 the sessions hash, 2 the usage hash, 3 the month's pool, 4 the
/// month counts, 5 `ob:ev`, 6 `ob:dd`, 7 `ob:due`. `ARGV`: 1 node, 2 the batch field, 3 its
/// sessions (a line each: `id|bot|began_ms|overage`), 4 how many drew from the pool (counted as
/// used by the node), 5 the month, 6 the batch's sessions, 7 of which overage, 8 now (ms), 9 the
/// number of candidate events, then six arguments per event (`t` for a threshold reached at
/// a count or `o` for overage; the count; dedupe key; id; the event JSON before and after the
/// month's count), then pairs of usage field and increment.
///
/// The month's count starts, the first time a month is seen (a store from before the count
/// existed), from the usage hash's session fields of that month.
pub(super) const RECORD: &str = r#"
if redis.call('HSETNX', KEYS[1], ARGV[2], ARGV[3]) == 0 then return 0 end
local month = ARGV[5]
if redis.call('HEXISTS', KEYS[4], month) == 0 then
  local pat = '|' .. string.gsub(month, '%-', '%%-') .. '%-%d%d|sessions$'
  local all = redis.call('HGETALL', KEYS[2])
  local before = 0
  for i = 1, #all, 2 do
    if string.find(all[i], pat) then before = before + tonumber(all[i + 1]) end
  end
  redis.call('HSET', KEYS[4], month, before)
end
local total = redis.call('HINCRBY', KEYS[4], month, ARGV[6])
local n = tonumber(ARGV[9])
for e = 0, n - 1 do
  local b = 10 + e * 6
  local hit
  if ARGV[b] == 'o' then hit = tonumber(ARGV[7]) > 0 else hit = total >= tonumber(ARGV[b + 1]) end
  if hit and redis.call('HSETNX', KEYS[6], ARGV[b + 2], ARGV[b + 3]) == 1 then
    redis.call('HSET', KEYS[5], ARGV[b + 3], ARGV[b + 4] .. total .. ARGV[b + 5])
    redis.call('ZADD', KEYS[7], ARGV[8], ARGV[b + 3])
  end
end
for i = 10 + n * 6, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
end
if ARGV[4] ~= '0' and ARGV[1] ~= '' then
  local used = redis.call('HINCRBY', KEYS[3], 'used:' .. ARGV[1], ARGV[4])
  local held = tonumber(redis.call('HGET', KEYS[3], 'held:' .. ARGV[1]) or '0')
  if used > held then
    -- Sessions whose units were reclaimed before they were recorded (a partitioned node's
    -- spool): the node held them after all, and what is granted next accounts for them.
    redis.call('HINCRBY', KEYS[3], 'granted', used - held)
    redis.call('HSET', KEYS[3], 'held:' .. ARGV[1], used)
  end
end
return 1
"#;

/// Raises events whose dedupe key is new: `KEYS` 1 `ob:dd`, 2 `ob:ev`, 3 `ob:due`; `ARGV` 1
/// dedupe, 2 id, 3 event JSON, 4 due. Returns 1 if new.
const RAISE: &str = r#"
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
return 1
"#;

/// Claims a tenant's due events: `KEYS` 1 `ob:due`, 2 `ob:ev`, 3 `ob:tg`, 4 `ob:done`, 5
/// `ob:dd`; `ARGV` 1 now, 2 the claim's length, 3 the most to claim, 4 the settled events
/// raised before this are pruned (with their dedupe keys). Returns event JSON and deliveries
/// JSON (or '') in pairs.
const CLAIM: &str = r#"
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
local until_ms = tonumber(ARGV[1]) + tonumber(ARGV[2])
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], string.format('%d', until_ms), id)
  out[#out + 1] = redis.call('HGET', KEYS[2], id) or ''
  out[#out + 1] = redis.call('HGET', KEYS[3], id) or ''
end
local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', '(' .. ARGV[4], 'LIMIT', 0, 100)
for _, id in ipairs(old) do
  local ev = redis.call('HGET', KEYS[2], id)
  if ev then redis.call('HDEL', KEYS[5], cjson.decode(ev).dedupe) end
  redis.call('HDEL', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
  redis.call('ZREM', KEYS[4], id)
end
return out
"#;

/// Settled events are pruned this long after they were raised (every dedupe key names its
/// month or instant, so none can come back after this long).
const KEEP_SETTLED_MS: i64 = 92 * 86_400_000;

/// The count in the payload of an event raised by the ledger script, replaced by the month's
/// count inside the script. No capacity or percentage can equal it.
const COUNT_MARK: u64 = u64::MAX;

/// Adds the outbox keys of `tenant` to the ledger script's `KEYS` (4 to 7).
pub(super) fn outbox_keys(c: &mut redis::Cmd, tenant: &str) {
    c.arg(key(tenant, "msess"))
        .arg(key(tenant, "ob:ev"))
        .arg(key(tenant, "ob:dd"))
        .arg(key(tenant, "ob:due"));
}

/// Adds the candidate events of `watch` (count of events, then six arguments each) to the
/// ledger script's arguments.
pub(super) fn watch_args(c: &mut redis::Cmd, watch: Option<&CapacityWatch>, now_ms: i64) {
    let Some(w) = watch else {
        c.arg(0);
        return;
    };
    let mut events: Vec<(&str, u64, OutboxEvent)> = Vec::new();
    if w.capacity > 0 {
        for &pct in &w.thresholds {
            events.push(("t", w.mark(pct), w.threshold_event(pct, COUNT_MARK, now_ms)));
        }
    }
    events.push(("o", 0, w.overage_event(COUNT_MARK, now_ms)));
    c.arg(events.len());
    for (cond, mark, e) in events {
        let json = serde_json::to_string(&e).unwrap_or_default();
        let (before, after) = json.split_once(&COUNT_MARK.to_string()).unwrap_or((&json, ""));
        c.arg(cond).arg(mark).arg(&e.dedupe).arg(&e.id).arg(before).arg(after);
    }
}

pub(super) fn raise(c: &mut Conn, events: &[OutboxEvent]) -> RedisResult<usize> {
    let script = redis::Script::new(RAISE);
    let mut n = 0;
    for e in events {
        let json = serde_json::to_string(e).unwrap_or_default();
        let new: i64 = script
            .key(key(&e.tenant, "ob:dd"))
            .key(key(&e.tenant, "ob:ev"))
            .key(key(&e.tenant, "ob:due"))
            .arg(&e.dedupe)
            .arg(&e.id)
            .arg(json)
            .arg(e.created_ms)
            .invoke(c)?;
        n += new as usize;
    }
    Ok(n)
}

/// Claims due events of every tenant in `tenants`, up to `limit` each: pairs of event JSON and
/// deliveries JSON. One pipeline of one script call per tenant (a round trip in all), loading
/// the script first when the server lacks it.
pub(super) fn claim(
    c: &mut Conn,
    tenants: &[String],
    now_ms: i64,
    lease_ms: i64,
    limit: usize,
) -> RedisResult<Vec<(String, String)>> {
    if tenants.is_empty() {
        return Ok(Vec::new());
    }
    let script = redis::Script::new(CLAIM);
    // One group per tenant: its slot's node on a cluster, one pipeline on one server.
    let groups: Vec<Vec<Cmd>> = tenants
        .iter()
        .map(|t| {
            vec![
                redis::cmd("EVALSHA")
                    .arg(script.get_hash())
                    .arg(5)
                    .arg(key(t, "ob:due"))
                    .arg(key(t, "ob:ev"))
                    .arg(key(t, "ob:tg"))
                    .arg(key(t, "ob:done"))
                    .arg(key(t, "ob:dd"))
                    .arg(now_ms)
                    .arg(lease_ms)
                    .arg(limit)
                    .arg(now_ms - KEEP_SETTLED_MS)
                    .to_owned(),
            ]
        })
        .collect();
    let values = match c.query_groups(&groups) {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.prepare_invoke().load(c)?;
            c.query_groups(&groups)?
        }
        other => other?,
    };
    let answers: Vec<Vec<String>> =
        values.into_iter().map(super::redis_conn::parse).collect::<RedisResult<_>>()?;
    let mut out = Vec::new();
    for flat in answers {
        let mut it = flat.into_iter();
        while let (Some(ev), Some(tg)) = (it.next(), it.next()) {
            out.push((ev, tg));
        }
    }
    Ok(out)
}

pub(super) fn parse_claimed(raw: Vec<(String, String)>) -> Result<Vec<Claimed>, serde_json::Error> {
    let mut out = Vec::new();
    for (ev, tg) in raw {
        if ev.is_empty() {
            continue;
        }
        let targets = if tg.is_empty() { None } else { Some(serde_json::from_str(&tg)?) };
        out.push(Claimed { event: serde_json::from_str(&ev)?, targets });
    }
    Ok(out)
}

pub(super) fn settle(
    c: &mut Conn,
    event: &OutboxEvent,
    targets: &[Target],
    attempts: &[Attempt],
    keep: usize,
) -> RedisResult<()> {
    let t = &event.tenant;
    let mut pipe = redis::pipe();
    pipe.atomic();
    pipe.cmd("HSET")
        .arg(key(t, "ob:tg"))
        .arg(&event.id)
        .arg(serde_json::to_string(targets).unwrap_or_default());
    match next_due(targets) {
        Some(due) => pipe.cmd("ZADD").arg(key(t, "ob:due")).arg(due).arg(&event.id),
        None => {
            pipe.cmd("ZADD").arg(key(t, "ob:done")).arg(event.created_ms).arg(&event.id);
            pipe.cmd("ZREM").arg(key(t, "ob:due")).arg(&event.id)
        }
    };
    for a in attempts {
        pipe.cmd("LPUSH").arg(key(t, "ob:log")).arg(serde_json::to_string(a).unwrap_or_default());
    }
    pipe.cmd("LTRIM").arg(key(t, "ob:log")).arg(0).arg(keep.saturating_sub(1));
    pipe.query::<()>(c)
}

pub(super) fn attempts(c: &mut Conn, tenant: &str, limit: usize) -> RedisResult<Vec<String>> {
    redis::cmd("LRANGE").arg(key(tenant, "ob:log")).arg(0).arg(limit.saturating_sub(1)).query(c)
}

/// A tenant's events, deliveries and due times, as stored.
type RawEvents = (Vec<String>, std::collections::HashMap<String, String>, Vec<(String, i64)>);

pub(super) fn events(c: &mut Conn, tenant: &str) -> RedisResult<RawEvents> {
    redis::pipe()
        .cmd("HVALS")
        .arg(key(tenant, "ob:ev"))
        .cmd("HGETALL")
        .arg(key(tenant, "ob:tg"))
        .cmd("ZRANGE")
        .arg(key(tenant, "ob:due"))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query(c)
}

pub(super) fn parse_events(raw: RawEvents, limit: usize) -> Result<Vec<EventState>, serde_json::Error> {
    let (evs, tgs, due) = raw;
    let due: std::collections::HashMap<String, i64> = due.into_iter().collect();
    let mut out = Vec::new();
    for j in evs {
        let event: OutboxEvent = serde_json::from_str(&j)?;
        let targets = match tgs.get(&event.id) {
            Some(t) => serde_json::from_str(t)?,
            None => Vec::new(),
        };
        let due_ms = due.get(&event.id).copied();
        out.push(EventState { event, targets, due_ms });
    }
    out.sort_by(|a, b| (b.event.created_ms, &a.event.id).cmp(&(a.event.created_ms, &b.event.id)));
    out.truncate(limit);
    Ok(out)
}
