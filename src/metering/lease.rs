//! Capacity leases: with several nodes, a tenant's monthly pool lives in a shared store and
//! each node draws sessions from a local lease of it, with the same lock-free CAS as one node.
//! No store call is on the steady-state path: a node asks for more when its lease runs low (in
//! the background), and only a node whose lease is empty waits for one round trip.
//!
//! The protocol is the [`LeaseStore`] trait; `store::redis_lease` implements it on Redis (the
//! key layout and scripts are documented there). Grants and renewals first reclaim the unused
//! units of nodes whose lease expired (a crashed node's lease comes back after the TTL), in the
//! same call.
//! A grant never exceeds what the month still has, and shrinks as the pool nears empty
//! (at most a quarter of what is left), so the last units are not stranded on an idle node.
//!
//! Leases are fenced. Expiry is judged by the store's own clock (Redis `TIME`), never a
//! caller's, and a node's local lease ends a tenth of the TTL before the store's (measured from
//! before the call), so no node draws on units another node may reclaim. A reclaimed lease
//! stays reclaimed: renewal re-arms only a lease the store still holds and tells the node when
//! it does not, and a grant tells the node whether its previous lease was still its own; either
//! way the node then drops what it had left. (A renewal's "not held" is asked again under the
//! pool's refill gate before anything is dropped: it may predate a grant made meanwhile.) An
//! expired lease is reclaimed only after a further TTL (so a node catching up after a store
//! outage replays its spool and renews first), and sessions recorded after their units were
//! reclaimed (a partitioned node's spool, replayed later) raise the node's holding and `granted`
//! by the excess, so later grants account for them.
//!
//! Leases stay fenced across a Redis failover. A promoted replica may lack the last grants and
//! renewals its primary acknowledged (replication is asynchronous), so the nodes may hold units
//! it would grant again. A tenant's leases carry an epoch: the replication id of the primary that
//! last made a lease call on them (or first changed the tenant). A lease call that finds another
//! epoch, on a primary that was promoted from a replica, drops every lease of the pool and
//! refuses grants for one TTL: by then every node has stopped drawing on a lease from before the
//! failover. A failover cannot bring an old epoch back, since each promotion starts a new
//! replication id. Nodes that wait for a replica before drawing on each grant
//! (`cluster.ledger_wait_replicas` above 0) lose none, and fence only when a node that does not
//! wait was active lately.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::clock::{Millis, SharedClock};
use crate::store::StoreError;

use super::pool::{MonthIndex, TenantPool};

/// Who asks, and when: every lease call carries them.
#[derive(Debug, Clone, Copy)]
pub struct LeaseCall<'a> {
    /// The node.
    pub node: &'a str,
    /// The caller's time in ms, or `None` to judge expiry by the store's own clock (every node
    /// on the wall clock; a caller's clock may be skewed).
    pub now: Option<Millis>,
    /// How long a lease stays valid without renewal, ms.
    pub ttl_ms: i64,
    /// How long a pool stays fenced after its data is found on a promoted replica (see
    /// `store::redis_lease`), ms; 0: never fenced (every grant was on a replica before use).
    pub fence_ms: i64,
}

/// What a grant gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Units added to the node's lease.
    pub units: u64,
    /// Whether the node's previous lease was still its own (not reclaimed or released): what
    /// it had left stays usable; otherwise the node must drop it.
    pub kept: bool,
}

/// What a renewal found for one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewal {
    /// Units used in the month across every node.
    pub used: u64,
    /// Whether the store still held this node's lease (and renewed it); `false` means it was
    /// reclaimed or never granted, and the node must drop what it has left.
    pub renewed: bool,
}

/// Where tenants' pools are kept and leased out (several nodes). Every call is atomic per pool
/// and first reclaims the unused units of other nodes whose lease expired.
pub trait LeaseStore: Send + Sync + 'static {
    /// Grants `call.node` up to `want` more units of `tenant`'s pool for `month` (capacity
    /// `capacity`), renewing its lease; the same `seq` again returns the same grant.
    fn grant(
        &self,
        tenant: &str,
        month: MonthIndex,
        call: LeaseCall<'_>,
        seq: u64,
        want: u64,
        capacity: u64,
    ) -> Result<Grant, StoreError>;

    /// Renews `call.node`'s lease of each of `tenants`' pools for `month`, in one round trip.
    fn renew(
        &self,
        tenants: &[&str],
        month: MonthIndex,
        call: LeaseCall<'_>,
    ) -> Result<Vec<Renewal>, StoreError>;

    /// Gives back `node`'s unused units of each tenant's pool for `month`, keeping the units of
    /// `pending` sessions it served that the store has not recorded yet; returns the units given
    /// back per tenant.
    fn release(&self, tenants: &[(&str, u64)], month: MonthIndex, node: &str)
    -> Result<Vec<i64>, StoreError>;
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
    /// Judge expiry by the store's clock (Redis `TIME`), as every node on the wall clock does;
    /// off, the caller's clock is passed instead (tests on a manual clock).
    pub store_time: bool,
    /// Fence a pool for a TTL when its data is found on a promoted replica, which may have lost
    /// grants (`cluster.ledger_wait_replicas = 0`); off when each grant reached a replica before
    /// it was drawn on.
    pub fence: bool,
}

/// This node's lease client.
pub struct Leases {
    store: Arc<dyn LeaseStore>,
    node: String,
    clock: SharedClock,
    config: LeaseConfig,
    seq: AtomicU64,
}

impl Leases {
    /// A client for node `node`.
    pub fn new(store: Arc<dyn LeaseStore>, node: String, clock: SharedClock, config: LeaseConfig) -> Self {
        let seq = AtomicU64::new(clock.now_ms() as u64 * 1000);
        Self { store, node, clock, config, seq }
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// A call of this node at `now`.
    fn call(&self, now: Millis) -> LeaseCall<'_> {
        LeaseCall {
            node: &self.node,
            now: (!self.config.store_time).then_some(now),
            ttl_ms: self.config.ttl_ms,
            fence_ms: if self.config.fence { self.config.ttl_ms } else { 0 },
        }
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
        let call = || self.store.grant(&pool.tenant, month, self.call(now), seq, want, capacity);
        let Grant { units: grant, kept } = call().or_else(|_| call()).map_err(|e| e.to_string())?;
        if !kept {
            // What this node had left was reclaimed (or released): the new grant is all it
            // holds.
            pool.drop_lease(month);
        }
        pool.add_lease(month, grant, now + self.config.ttl_ms - self.config.ttl_ms / 10);
        if let Some(l) = pool.lease() {
            l.note_grant(now, pool.used(month), grant);
        }
        Ok(grant)
    }

    /// Renews this node's leases of `pools` and reads each month's use across nodes
    /// (the heartbeat, every third of the TTL).
    pub fn renew_blocking(&self, pools: &[Arc<TenantPool>], month: MonthIndex) -> Result<(), String> {
        let mut gone = self.renew_once(pools, month)?;
        if gone.is_empty() {
            return Ok(());
        }
        // "Not held" may predate a grant made while the renewal was on its way (a node's first
        // grant racing the heartbeat): dropping on it would strand that grant. So ask again with
        // each such pool's refill gate held, no grant in flight; that answer decides. (Gates in
        // tenant order: the only place that holds more than one.)
        gone.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        let _gates: Vec<_> =
            gone.iter().filter_map(|p| p.lease().map(|l| l.refill.blocking_lock())).collect();
        for p in self.renew_once(&gone, month)? {
            // Reclaimed by another node, dropped by a fence, or never granted: what is left
            // locally is not this node's any more.
            p.drop_lease(month);
        }
        Ok(())
    }

    /// One renewal of `pools` in one round trip: extends each lease Redis still holds, notes
    /// each month's use, and returns the pools Redis does not hold a lease of while this node
    /// still has units of it.
    fn renew_once(
        &self,
        pools: &[Arc<TenantPool>],
        month: MonthIndex,
    ) -> Result<Vec<Arc<TenantPool>>, String> {
        let now = self.clock.now_ms();
        let tenants: Vec<&str> = pools.iter().map(|p| p.tenant.as_str()).collect();
        let answers = self.store.renew(&tenants, month, self.call(now)).map_err(|e| e.to_string())?;
        let mut gone = Vec::new();
        for (p, Renewal { used, renewed }) in pools.iter().zip(answers) {
            if renewed {
                p.renew_lease(now + self.config.ttl_ms - self.config.ttl_ms / 10);
            } else if p.lease_remaining(month) > 0 {
                gone.push(p.clone());
            }
            p.set_global_used(month, used);
        }
        Ok(gone)
    }

    /// Gives back the unused units of `pools` (graceful shutdown), keeping for each tenant the
    /// units of `pending(tenant)` sessions this node served that Redis has not recorded yet.
    pub fn release_blocking(
        &self,
        pools: &[Arc<TenantPool>],
        month: MonthIndex,
        pending: impl Fn(&str) -> u64,
    ) -> Result<u64, String> {
        let tenants: Vec<(&str, u64)> =
            pools.iter().map(|p| (p.tenant.as_str(), pending(&p.tenant))).collect();
        let back = self.store.release(&tenants, month, &self.node).map_err(|e| e.to_string())?;
        Ok(back.into_iter().map(|b| b.max(0) as u64).sum())
    }
}

/// The time left on a pool's fence, from a refused lease call's error (`FENCED <ms> ms left`,
/// written by `store::redis_lease`; the `redis` crate shows it as `"FENCED": <ms> ms left`), so
/// that a refused session's `Retry-After` says when grants resume rather than a guess.
pub(crate) fn fence_left_ms(cause: &str) -> Option<u64> {
    let rest = cause[cause.find("FENCED")? + "FENCED".len()..].trim_start_matches(['"', ':', ' ']);
    let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    rest[..digits].parse().ok()
}

#[cfg(test)]
mod fence_tests {
    use super::fence_left_ms;

    #[test]
    fn a_fence_error_gives_its_time_left() {
        // As the `redis` crate shows the script's error reply, and as the script writes it.
        assert_eq!(fence_left_ms(r#""FENCED": 2999 ms left after a failover"#), Some(2999));
        assert_eq!(fence_left_ms("lease call: FENCED 12 ms left after a failover"), Some(12));
        assert_eq!(fence_left_ms("connection refused"), None);
        assert_eq!(fence_left_ms("FENCED"), None);
    }
}
