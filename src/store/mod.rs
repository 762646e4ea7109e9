//! Durable state behind one trait, so callers do not know which engine keeps it.
//!
//! [`sqlite::SqliteStore`] is the embedded default (one node); [`redis::RedisStore`] is shared by
//! several nodes. The trait is synchronous: callers
//! on the async runtime reach it through `spawn_blocking` or a dedicated writer thread, never on
//! the per-message path.

pub mod control;
mod migrations;
pub mod outbox;
pub mod redis;
pub mod redis_conn;
pub mod redis_lease;
mod redis_outbox;
pub mod sqlite;
mod sqlite_outbox;

use control::{AuditEntry, ControlData, Mutation};
use outbox::{Attempt, CapacityWatch, Claimed, EventState, OutboxEvent, Target};

use std::sync::Arc;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data folder could not be created or written.
    #[error("cannot use the data folder {path}: {source}")]
    DataDir {
        /// The folder.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The database could not be opened, migrated or written.
    #[error("database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: String,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// The database was written by a newer botgate.
    #[error(
        "database {path} has schema version {found}, newer than this build's {supported}; upgrade botgate"
    )]
    TooNew {
        /// The database file.
        path: String,
        /// Its schema version.
        found: i64,
        /// The newest this build knows.
        supported: i64,
    },
    /// Redis could not be reached or refused a command.
    #[error("redis {url}: {message}")]
    Redis {
        /// The server.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The store was closed.
    #[error("the store is closed")]
    Closed,
    /// A bot was created with an id another bot has (created meanwhile, on another node).
    #[error("a bot with id {id} exists")]
    BotExists {
        /// The id.
        id: String,
    },
    /// A seat was claimed and every seat of the tenant is taken (another node took the last).
    #[error("every user license seat of tenant {tenant} is taken")]
    SeatsFull {
        /// The tenant.
        tenant: String,
    },
}

/// One billed session as the ledger records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// A unique id; recording the same id twice keeps one row.
    pub id: String,
    /// The tenant whose pool it drew from.
    pub tenant: String,
    /// The bot it was counted for.
    pub bot: String,
    /// When it began, milliseconds since the epoch (UTC); its month and day follow from this.
    pub began_ms: i64,
    /// Whether it was served beyond capacity (policy `allow_overage`).
    pub overage: bool,
    /// The node that began it (several nodes; empty with one).
    pub node: String,
}

/// A batch of sessions a node's spool holds, as it was first written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpooledBatch {
    /// The batch id the ledger gave it.
    pub id: String,
    /// Its sessions.
    pub sessions: Vec<SessionRecord>,
}

/// Sessions and turns of one bot on one day, as kept in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DailyUsage {
    /// The tenant.
    pub tenant: String,
    /// The bot.
    pub bot: String,
    /// The UTC day, `YYYY-MM-DD`.
    pub day: String,
    /// Billed sessions that began that day (overage included).
    pub sessions: u64,
    /// Of those, overage sessions.
    pub overage: u64,
    /// Turns that day.
    pub turns: u64,
    /// Messages refused that day for capacity.
    pub rejected_capacity: u64,
    /// Messages refused that day for the rate limit.
    pub rejected_rate: u64,
    /// Topic flow runs that day by outcome: ok, failed, timeout, refused.
    pub flows: [u64; 4],
}

/// Counter increments to add to the store's daily usage (not billing-critical: flushed on a
/// timer and at shutdown).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UsageDelta {
    /// Turns.
    pub turns: u64,
    /// Capacity refusals.
    pub rejected_capacity: u64,
    /// Rate-limit refusals.
    pub rejected_rate: u64,
    /// Topic flow runs by outcome: ok, failed, timeout, refused.
    pub flows: [u64; 4],
}

/// Names one flush of a node's non-billing counters. A flush whose outcome is unknown (an
/// error after the store may have applied it) is sent again, whole and under the same name,
/// before any later one; the store applies each once, keeping per node the last flush applied.
#[derive(Debug, Clone, Copy)]
pub struct UsageFlush<'a> {
    /// The node's id.
    pub node: &'a str,
    /// This start of the node (its start time and a random word): never repeats.
    pub incarnation: &'a str,
    /// Grows by one with each flush of this incarnation.
    pub seq: u64,
}

/// The durable state of botgate.
pub trait Store: Send + Sync + 'static {
    /// Checks that the store answers (readiness).
    fn ping(&self) -> Result<(), StoreError>;

    /// Records a batch of billed sessions in one durable write (one fsync, or one Redis script
    /// per tenant). Recording is idempotent: SQLite keeps a session id once, Redis keeps a batch
    /// id once (a batch is retried or replayed whole, under its id, never regrouped). Returns only
    /// when the batch is durable.
    fn record_sessions(&self, batch_id: &str, sessions: &[SessionRecord]) -> Result<(), StoreError>;

    /// Records a batch as [`record_sessions`](Self::record_sessions) does and, in the same
    /// transaction or script, raises the capacity events it reaches: for each of `watches`, a
    /// `capacity.threshold` per percentage whose mark the month's count (every node's sessions)
    /// reached, and `capacity.overage_started` when an overage session is among them, each once
    /// per dedupe key. A replayed batch records and raises nothing.
    fn record_watched(
        &self,
        batch_id: &str,
        sessions: &[SessionRecord],
        watches: &[CapacityWatch],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let _ = (watches, now_ms);
        self.record_sessions(batch_id, sessions)
    }

    /// Raises the events whose dedupe keys are new, each due for delivery at once; returns how
    /// many were new.
    fn raise(&self, events: &[OutboxEvent]) -> Result<usize, StoreError>;

    /// Claims up to `limit` events due at `now_ms`, for `lease_ms`: until then no other call
    /// (on any node) claims them, and after it they are due again (a claimer that died leaves
    /// them to the next).
    fn claim_due(&self, now_ms: i64, lease_ms: i64, limit: usize) -> Result<Vec<Claimed>, StoreError>;

    /// Writes a claimed event's deliveries after a pass, and the attempts it made; it is due
    /// next at its earliest unsettled delivery. The tenant's log keeps its newest `keep`.
    fn settle(
        &self,
        event: &OutboxEvent,
        targets: &[Target],
        attempts: &[Attempt],
        keep: usize,
    ) -> Result<(), StoreError>;

    /// A tenant's delivery attempts, newest first, at most `limit`.
    fn attempts(&self, tenant: &str, limit: usize) -> Result<Vec<Attempt>, StoreError>;

    /// A tenant's events, newest first, at most `limit`, with their deliveries.
    fn events(&self, tenant: &str, limit: usize) -> Result<Vec<EventState>, StoreError>;

    /// Adds non-billing counters for (tenant, bot, day), unless `flush` was applied already
    /// (then nothing changes and the answer is `Ok`).
    fn add_usage(
        &self,
        flush: UsageFlush<'_>,
        deltas: &[(String, String, String, UsageDelta)],
    ) -> Result<(), StoreError>;

    /// Every day's usage of every bot, sessions counted from the ledger.
    fn load_usage(&self) -> Result<Vec<DailyUsage>, StoreError>;

    /// Ids of every recorded session (for exactness checks).
    fn session_ids(&self) -> Result<Vec<String>, StoreError>;

    /// Everything the control plane holds.
    fn load_control(&self) -> Result<ControlData, StoreError>;

    /// Applies control-plane changes and appends their audit entries, in one transaction.
    fn apply(&self, mutations: &[Mutation], audit: &[AuditEntry]) -> Result<(), StoreError>;

    /// Seeds tenant `tenant` from configuration: applies `mutations` and `audit` only if the store
    /// does not know the tenant yet, atomically, so several nodes starting at once on an empty
    /// store seed it once. Returns whether this call seeded it.
    fn seed_tenant(
        &self,
        tenant: &str,
        mutations: &[Mutation],
        audit: &[AuditEntry],
    ) -> Result<bool, StoreError> {
        // One process owns an embedded store: checking first is enough.
        if self.load_control()?.tenants.iter().any(|t| t.id == tenant) {
            return Ok(false);
        }
        self.apply(mutations, audit)?;
        Ok(true)
    }

    /// A tenant's audit log, oldest first, after sequence `after_seq`, at most `limit` entries.
    fn audit(&self, tenant: &str, after_seq: i64, limit: usize) -> Result<Vec<AuditEntry>, StoreError>;

    /// Batches held in this store as a node's local spool, whole, oldest first, at most `limit`
    /// batches.
    fn spooled(&self, limit: usize) -> Result<Vec<SpooledBatch>, StoreError> {
        let _ = limit;
        Ok(Vec::new())
    }

    /// Removes replayed batches from the spool.
    fn forget(&self, batch_ids: &[String]) -> Result<(), StoreError> {
        let _ = batch_ids;
        Ok(())
    }

    /// A secret key every node shares (token signing keys): the stored one, or `fresh` stored
    /// now if there is none yet (the first node to start wins).
    fn shared_key(&self, name: &str, fresh: &[u8]) -> Result<Vec<u8>, StoreError>;

    /// Flushes and closes; later calls fail with [`StoreError::Closed`].
    fn close(&self) -> Result<(), StoreError>;
}

/// A shared store handle; cloning is shallow.
pub type SharedStore = Arc<dyn Store>;
