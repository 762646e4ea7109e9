//! The embedded store: one SQLite file in the data folder, WAL mode, `synchronous=FULL`.
//!
//! One writing connection behind a std `Mutex`: SQLite serializes writers anyway, every call is
//! short and runs off the async runtime (a blocking thread or the ledger's writer thread), and a
//! std lock is never held across an `.await`. Reports (usage, the audit log) read through a
//! second, read-only connection: WAL lets it read while the ledger writes, so a report's
//! full-table aggregate never holds the lock the ledger's writer needs.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};

use super::control::{
    AuditEntry, BotRecord, ControlData, EndpointRecord, Mutation, SeatRecord, SubscriptionRecord,
    TenantRecord, TrialRecord,
};
use super::migrations::MIGRATIONS;
use super::outbox::{Attempt, CapacityWatch, Claimed, EventState, OutboxEvent, Target};
use super::{DailyUsage, SessionRecord, SpooledBatch, Store, StoreError, UsageDelta, UsageFlush};

pub use crate::config::SqliteSync as Sync;

/// The database file's name inside the data folder.
pub const DB_FILE: &str = "botgate.sqlite3";

/// The SQLite store. See the module docs.
pub struct SqliteStore {
    dir: PathBuf,
    path: String,
    conn: Mutex<Option<Connection>>,
    /// The read-only connection for reports.
    reader: Mutex<Option<Connection>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish()
    }
}

impl SqliteStore {
    /// Opens (creating the folder and the file if missing) and migrates the store in `data_dir`,
    /// with `synchronous=FULL`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(data_dir, Sync::Full)
    }

    /// Opens the store with the given commit durability.
    pub fn open_with(data_dir: &Path, sync: Sync) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|source| StoreError::DataDir { path: data_dir.display().to_string(), source })?;
        let file: PathBuf = data_dir.join(DB_FILE);
        let path = file.display().to_string();
        let sql_err = |source| StoreError::Sqlite { path: path.clone(), source };
        let mut conn = Connection::open(&file).map_err(sql_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(sql_err)?;
        // WAL: readers do not block the writer. FULL: a committed transaction survives power loss,
        // not only a process crash; group commit keeps its fsync cost per batch, not per session.
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(sql_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path, mode = %mode, "SQLite refused WAL mode; continuing.");
        }
        let pragma = match sync {
            Sync::Full => "PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;",
            Sync::Normal => "PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;",
        };
        conn.execute_batch(pragma).map_err(sql_err)?;
        migrate(&mut conn, &path)?;
        let reader = Connection::open_with_flags(
            &file,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql_err)?;
        reader.busy_timeout(std::time::Duration::from_secs(5)).map_err(sql_err)?;
        Ok(Self {
            dir: data_dir.to_path_buf(),
            path,
            conn: Mutex::new(Some(conn)),
            reader: Mutex::new(Some(reader)),
        })
    }

    /// The database file.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn with_conn<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let mut guard: MutexGuard<'_, Option<Connection>> =
            self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let conn = guard.as_mut().ok_or(StoreError::Closed)?;
        f(conn).map_err(|source| StoreError::Sqlite { path: self.path.clone(), source })
    }

    /// Runs a read on the read-only connection (never waits for the writer).
    fn with_reader<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut guard = self.reader.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let conn = guard.as_mut().ok_or(StoreError::Closed)?;
        f(conn).map_err(|source| StoreError::Sqlite { path: self.path.clone(), source })
    }
}

fn migrate(conn: &mut Connection, path: &str) -> Result<(), StoreError> {
    let sql_err = |source| StoreError::Sqlite { path: path.to_string(), source };
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sql_err)?;
    let supported = MIGRATIONS.len() as i64;
    if version > supported {
        return Err(StoreError::TooNew { path: path.to_string(), found: version, supported });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction().map_err(sql_err)?;
        tx.execute_batch(sql).map_err(sql_err)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64).map_err(sql_err)?;
        tx.commit().map_err(sql_err)?;
        tracing::info!(path, version = i + 1, "Applied schema migration.");
    }
    Ok(())
}

/// A unit enum as its serde name (`reject`, `tenant_license`, ...).
fn to_text<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

fn from_text<T: serde::de::DeserializeOwned>(s: &str) -> rusqlite::Result<T> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))
}

/// A JSON column that does not parse (or a value that does not serialize), as SQLite's error.
pub(super) fn json_err(e: serde_json::Error) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
}

fn date(s: &str) -> rusqlite::Result<chrono::NaiveDate> {
    s.parse()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))
}

/// The UTC day of a timestamp, `YYYY-MM-DD`.
pub(crate) fn day_of(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().format("%Y-%m-%d").to_string()
}

impl Store for SqliteStore {
    fn ping(&self) -> Result<(), StoreError> {
        self.with_conn(|c| c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0)).map(|_| ()))
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
        self.with_conn(|c| {
            let tx = c.transaction()?;
            super::sqlite_outbox::record(&tx, batch_id, batch, watches, now_ms)?;
            tx.commit()
        })
    }

    fn raise(&self, events: &[OutboxEvent]) -> Result<usize, StoreError> {
        if events.is_empty() {
            return Ok(0);
        }
        self.with_conn(|c| {
            let tx = c.transaction()?;
            let mut n = 0;
            for e in events {
                n += usize::from(super::sqlite_outbox::raise_one(&tx, e)?);
            }
            tx.commit()?;
            Ok(n)
        })
    }

    fn claim_due(&self, now_ms: i64, lease_ms: i64, limit: usize) -> Result<Vec<Claimed>, StoreError> {
        self.with_conn(|c| super::sqlite_outbox::claim(c, now_ms, lease_ms, limit))
    }

    fn settle(
        &self,
        event: &OutboxEvent,
        targets: &[Target],
        attempts: &[Attempt],
        keep: usize,
    ) -> Result<(), StoreError> {
        self.with_conn(|c| super::sqlite_outbox::settle(c, event, targets, attempts, keep))
    }

    fn attempts(&self, tenant: &str, limit: usize) -> Result<Vec<Attempt>, StoreError> {
        self.with_reader(|c| super::sqlite_outbox::attempts(c, tenant, limit))
    }

    fn events(&self, tenant: &str, limit: usize) -> Result<Vec<EventState>, StoreError> {
        self.with_reader(|c| super::sqlite_outbox::events(c, tenant, limit))
    }

    fn add_usage(
        &self,
        flush: UsageFlush<'_>,
        deltas: &[(String, String, String, UsageDelta)],
    ) -> Result<(), StoreError> {
        if deltas.is_empty() {
            return Ok(());
        }
        self.with_conn(|c| {
            let tx = c.transaction()?;
            let applied: Option<(String, i64)> = tx
                .query_row("SELECT incarnation, seq FROM usage_flushes WHERE node = ?1", [flush.node], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()?;
            if applied.is_some_and(|(inc, seq)| inc == flush.incarnation && seq >= flush.seq as i64) {
                return Ok(());
            }
            tx.execute(
                "INSERT INTO usage_flushes (node, incarnation, seq) VALUES (?1, ?2, ?3)
                 ON CONFLICT (node) DO UPDATE SET incarnation = excluded.incarnation, seq = excluded.seq",
                params![flush.node, flush.incarnation, flush.seq as i64],
            )?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO daily_usage (tenant, bot, day, turns, rejected_capacity, rejected_rate,
                                              flow_ok, flow_failed, flow_timeout, flow_refused)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                     ON CONFLICT (tenant, bot, day) DO UPDATE SET
                       turns = turns + excluded.turns,
                       rejected_capacity = rejected_capacity + excluded.rejected_capacity,
                       rejected_rate = rejected_rate + excluded.rejected_rate,
                       flow_ok = flow_ok + excluded.flow_ok,
                       flow_failed = flow_failed + excluded.flow_failed,
                       flow_timeout = flow_timeout + excluded.flow_timeout,
                       flow_refused = flow_refused + excluded.flow_refused",
                )?;
                for (tenant, bot, day, d) in deltas {
                    stmt.execute(params![
                        tenant,
                        bot,
                        day,
                        d.turns as i64,
                        d.rejected_capacity as i64,
                        d.rejected_rate as i64,
                        d.flows[0] as i64,
                        d.flows[1] as i64,
                        d.flows[2] as i64,
                        d.flows[3] as i64
                    ])?;
                }
            }
            tx.commit()
        })
    }

    fn load_usage(&self) -> Result<Vec<DailyUsage>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare(
                "SELECT tenant, bot, day, SUM(sessions), SUM(overage), SUM(turns), SUM(rc), SUM(rr),
                        SUM(fo), SUM(ff), SUM(ft), SUM(fr) FROM (
                   SELECT tenant, bot, day, COUNT(*) AS sessions, SUM(overage) AS overage,
                          0 AS turns, 0 AS rc, 0 AS rr, 0 AS fo, 0 AS ff, 0 AS ft, 0 AS fr
                     FROM billed_sessions GROUP BY tenant, bot, day
                   UNION ALL
                   SELECT tenant, bot, day, 0, 0, turns, rejected_capacity, rejected_rate,
                          flow_ok, flow_failed, flow_timeout, flow_refused FROM daily_usage
                 ) GROUP BY tenant, bot, day ORDER BY tenant, bot, day",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(DailyUsage {
                    tenant: r.get(0)?,
                    bot: r.get(1)?,
                    day: r.get(2)?,
                    sessions: r.get::<_, i64>(3)? as u64,
                    overage: r.get::<_, i64>(4)? as u64,
                    turns: r.get::<_, i64>(5)? as u64,
                    rejected_capacity: r.get::<_, i64>(6)? as u64,
                    rejected_rate: r.get::<_, i64>(7)? as u64,
                    flows: [
                        r.get::<_, i64>(8)? as u64,
                        r.get::<_, i64>(9)? as u64,
                        r.get::<_, i64>(10)? as u64,
                        r.get::<_, i64>(11)? as u64,
                    ],
                })
            })?;
            rows.collect()
        })
    }

    fn session_ids(&self) -> Result<Vec<String>, StoreError> {
        self.with_conn(|c| {
            let mut stmt = c.prepare("SELECT id FROM billed_sessions ORDER BY id")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect()
        })
    }

    fn load_control(&self) -> Result<ControlData, StoreError> {
        self.with_conn(|c| {
            let mut d = ControlData::default();
            let mut st = c.prepare(
                "SELECT id, name, allow_ad_hoc_subscriptions, capacity_policy, capacity_alerts FROM tenants ORDER BY id",
            )?;
            d.tenants = st
                .query_map([], |r| {
                    Ok(TenantRecord {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        allow_ad_hoc_subscriptions: r.get(2)?,
                        capacity_policy: from_text(&r.get::<_, String>(3)?)?,
                        capacity_alerts: r
                            .get::<_, Option<String>>(4)?
                            .map(|j| serde_json::from_str(&j).map_err(json_err))
                            .transpose()?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            let mut st = c.prepare(
                "SELECT id, tenant, kind, quantity, start, end FROM subscriptions ORDER BY start, id",
            )?;
            d.subscriptions = st
                .query_map([], |r| {
                    Ok(SubscriptionRecord {
                        id: r.get(0)?,
                        tenant: r.get(1)?,
                        kind: from_text(&r.get::<_, String>(2)?)?,
                        quantity: r.get(3)?,
                        start: date(&r.get::<_, String>(4)?)?,
                        end: r.get::<_, Option<String>>(5)?.map(|e| date(&e)).transpose()?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            let mut st = c.prepare("SELECT tenant, kind, id FROM assignments ORDER BY tenant, kind, id")?;
            d.assignments = st
                .query_map([], |r| Ok((r.get(0)?, from_text(&r.get::<_, String>(1)?)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            let mut st = c.prepare("SELECT tenant, user, via FROM seats ORDER BY tenant, user")?;
            d.seats = st
                .query_map([], |r| Ok(SeatRecord { tenant: r.get(0)?, user: r.get(1)?, via: r.get(2)? }))?
                .collect::<Result<_, _>>()?;
            let mut st = c.prepare("SELECT tenant, user, started_ms, expires_ms, extended FROM trials")?;
            d.trials = st
                .query_map([], |r| {
                    Ok(TrialRecord {
                        tenant: r.get(0)?,
                        user: r.get(1)?,
                        started_ms: r.get(2)?,
                        expires_ms: r.get(3)?,
                        extended: r.get(4)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            let mut st = c.prepare("SELECT id, tenant, json FROM bots ORDER BY id")?;
            d.bots = st
                .query_map([], |r| Ok(BotRecord { id: r.get(0)?, tenant: r.get(1)?, json: r.get(2)? }))?
                .collect::<Result<_, _>>()?;
            let mut st = c.prepare("SELECT json FROM webhook_endpoints ORDER BY id")?;
            d.endpoints = st
                .query_map([], |r| r.get::<_, String>(0))?
                .map(|j| serde_json::from_str::<EndpointRecord>(&j?).map_err(json_err))
                .collect::<Result<_, _>>()?;
            Ok(d)
        })
    }

    fn apply(&self, mutations: &[Mutation], audit: &[AuditEntry]) -> Result<(), StoreError> {
        self.with_conn(|c| {
            let tx = c.transaction()?;
            for m in mutations {
                match m {
                    Mutation::PutTenant(t) => tx.execute(
                        "INSERT OR REPLACE INTO tenants (id, name, allow_ad_hoc_subscriptions, capacity_policy, capacity_alerts)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![
                            t.id,
                            t.name,
                            t.allow_ad_hoc_subscriptions,
                            to_text(&t.capacity_policy),
                            t.capacity_alerts.as_ref().map(|a| serde_json::json!(a).to_string())
                        ],
                    )?,
                    Mutation::PutSubscription(s) => tx.execute(
                        "INSERT OR REPLACE INTO subscriptions (id, tenant, kind, quantity, start, end)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![
                            s.id,
                            s.tenant,
                            to_text(&s.kind),
                            s.quantity,
                            s.start.to_string(),
                            s.end.map(|e| e.to_string())
                        ],
                    )?,
                    Mutation::PutAssignment { tenant, kind, id } => tx.execute(
                        "INSERT OR IGNORE INTO assignments (tenant, kind, id) VALUES (?1, ?2, ?3)",
                        params![tenant, to_text(kind), id],
                    )?,
                    Mutation::DeleteAssignment { tenant, kind, id } => tx.execute(
                        "DELETE FROM assignments WHERE tenant = ?1 AND kind = ?2 AND id = ?3",
                        params![tenant, to_text(kind), id],
                    )?,
                    // One process owns the database and licensing writes one change at a time,
                    // so the caller's snapshot already decided that a seat is free.
                    Mutation::PutSeat(s) | Mutation::ClaimSeat { seat: s, .. } => tx.execute(
                        "INSERT OR REPLACE INTO seats (tenant, user, via) VALUES (?1, ?2, ?3)",
                        params![s.tenant, s.user, s.via],
                    )?,
                    Mutation::DeleteSeats { tenant, user, via } => tx.execute(
                        "DELETE FROM seats WHERE tenant = ?1 AND (?2 IS NULL OR user = ?2) AND (?3 IS NULL OR via = ?3)",
                        params![tenant, user, via],
                    )?,
                    Mutation::PutTrial(t) => tx.execute(
                        "INSERT OR REPLACE INTO trials (tenant, user, started_ms, expires_ms, extended)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![t.tenant, t.user, t.started_ms, t.expires_ms, t.extended],
                    )?,
                    // One process owns the database: the caller's registry and its reservation of
                    // the id already decided that it is free.
                    Mutation::PutBot(b) | Mutation::CreateBot(b) => tx.execute(
                        "INSERT OR REPLACE INTO bots (id, tenant, json) VALUES (?1, ?2, ?3)",
                        params![b.id, b.tenant, b.json],
                    )?,
                    Mutation::DeleteBot { id } => tx.execute("DELETE FROM bots WHERE id = ?1", params![id])?,
                    Mutation::PutEndpoint(e) => tx.execute(
                        "INSERT OR REPLACE INTO webhook_endpoints (id, tenant, json) VALUES (?1, ?2, ?3)",
                        params![e.id, e.tenant, serde_json::to_string(e).map_err(json_err)?],
                    )?,
                    Mutation::DeleteEndpoint { tenant, id } => tx.execute(
                        "DELETE FROM webhook_endpoints WHERE id = ?1 AND tenant = ?2",
                        params![id, tenant],
                    )?,
                };
            }
            for a in audit {
                tx.execute(
                    "INSERT INTO audit (tenant, at_ms, actor, action, target, before, after)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![a.tenant, a.at_ms, a.actor, a.action, a.target, a.before, a.after],
                )?;
            }
            tx.commit()
        })
    }

    fn audit(&self, tenant: &str, after_seq: i64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.with_reader(|c| {
            let mut st = c.prepare(
                "SELECT seq, tenant, at_ms, actor, action, target, before, after FROM audit
                 WHERE tenant = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?;
            let rows = st.query_map(params![tenant, after_seq, limit as i64], |r| {
                Ok(AuditEntry {
                    seq: r.get(0)?,
                    tenant: r.get(1)?,
                    at_ms: r.get(2)?,
                    actor: r.get(3)?,
                    action: r.get(4)?,
                    target: r.get(5)?,
                    before: r.get(6)?,
                    after: r.get(7)?,
                })
            })?;
            rows.collect()
        })
    }

    fn spooled(&self, limit: usize) -> Result<Vec<SpooledBatch>, StoreError> {
        self.with_conn(|c| {
            let mut st = c.prepare_cached(
                "SELECT batch, id, tenant, bot, began_ms, overage, node FROM billed_sessions
                 WHERE batch IN (SELECT batch FROM billed_sessions GROUP BY batch ORDER BY MIN(began_ms), batch LIMIT ?1)
                 ORDER BY batch, id",
            )?;
            let rows = st.query_map(params![limit as i64], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    SessionRecord {
                        id: r.get(1)?,
                        tenant: r.get(2)?,
                        bot: r.get(3)?,
                        began_ms: r.get(4)?,
                        overage: r.get(5)?,
                        node: r.get(6)?,
                    },
                ))
            })?;
            let mut batches: Vec<SpooledBatch> = Vec::new();
            for row in rows {
                let (batch, session) = row?;
                match batches.last_mut() {
                    Some(b) if b.id == batch => b.sessions.push(session),
                    _ => batches.push(SpooledBatch { id: batch, sessions: vec![session] }),
                }
            }
            Ok(batches)
        })
    }

    fn forget(&self, batch_ids: &[String]) -> Result<(), StoreError> {
        self.with_conn(|c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached("DELETE FROM billed_sessions WHERE batch = ?1")?;
                for id in batch_ids {
                    st.execute(params![id])?;
                }
            }
            tx.commit()
        })
    }

    fn shared_key(&self, name: &str, fresh: &[u8]) -> Result<Vec<u8>, StoreError> {
        // One node: the key is a file in the data folder (owner-only permissions).
        let file = self.dir.join(format!("{name}.key"));
        crate::channel::token::load_or_store_key(&file, fresh)
            .map_err(|source| StoreError::DataDir { path: file.display().to_string(), source })
    }

    fn close(&self) -> Result<(), StoreError> {
        drop(self.reader.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take());
        let mut guard = self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(conn) = guard.take() {
            // Fold the WAL into the main file so the data folder is one self-contained file.
            let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).optional();
            conn.close().map_err(|(_, source)| StoreError::Sqlite { path: self.path.clone(), source })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::control::Principal;

    fn rec(id: &str, bot: &str, ms: i64) -> SessionRecord {
        SessionRecord {
            id: id.into(),
            tenant: "t".into(),
            bot: bot.into(),
            began_ms: ms,
            overage: false,
            node: String::new(),
        }
    }

    #[test]
    fn migrates_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path()).unwrap();
        s.ping().unwrap();
        s.record_sessions("x.1", &[rec("a", "b1", 0), rec("b", "b1", 0)]).unwrap();
        s.close().unwrap();
        assert!(matches!(s.ping(), Err(StoreError::Closed)));
        let s = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(s.session_ids().unwrap(), vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn a_session_id_is_recorded_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path()).unwrap();
        s.record_sessions("x.1", &[rec("a", "b1", 0)]).unwrap();
        s.record_sessions("x.2", &[rec("a", "b1", 0), rec("c", "b2", 86_400_000)]).unwrap();
        let usage = s.load_usage().unwrap();
        assert_eq!(usage.len(), 2);
        assert_eq!(usage[0].sessions, 1);
        assert_eq!(usage[0].day, "1970-01-01");
        assert_eq!(usage[1].day, "1970-01-02");
    }

    /// A report reads while the writer is busy inside a transaction: it takes the read-only
    /// connection, never the writer's lock, and sees what was committed.
    #[test]
    fn reports_read_while_the_writer_is_busy() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(SqliteStore::open(dir.path()).unwrap());
        s.record_sessions("x.1", &[rec("a", "b1", 0)]).unwrap();
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
        let writer = {
            let s = s.clone();
            std::thread::spawn(move || {
                s.with_conn(|c| {
                    let tx = c.transaction()?;
                    tx.execute("DELETE FROM billed_sessions WHERE id = 'nothing'", [])?;
                    held_tx.send(()).unwrap();
                    let _ = hold_rx.recv();
                    tx.commit()
                })
                .unwrap();
            })
        };
        held_rx.recv().unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let reader = {
            let s = s.clone();
            std::thread::spawn(move || done_tx.send(s.load_usage().unwrap()).unwrap())
        };
        let usage = done_rx.recv_timeout(std::time::Duration::from_secs(10));
        hold_tx.send(()).unwrap();
        writer.join().unwrap();
        reader.join().unwrap();
        let usage = usage.expect("the report waited for the writer");
        assert_eq!(usage.len(), 1);
        assert_eq!(usage[0].sessions, 1);
    }

    #[test]
    fn the_spool_gives_back_whole_batches_under_their_ids() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path()).unwrap();
        s.record_sessions("n1.5.1", &[rec("a", "b1", 10), rec("b", "b1", 11)]).unwrap();
        s.record_sessions("n1.5.2", &[rec("c", "b1", 12)]).unwrap();
        s.record_sessions("n1.5.3", &[rec("d", "b1", 13), rec("e", "b2", 13), rec("f", "b1", 14)]).unwrap();
        let first = s.spooled(2).unwrap();
        let ids: Vec<(&str, usize)> = first.iter().map(|b| (b.id.as_str(), b.sessions.len())).collect();
        assert_eq!(ids, [("n1.5.1", 2), ("n1.5.2", 1)]);
        s.forget(&["n1.5.1".to_string(), "n1.5.2".to_string()]).unwrap();
        let rest = s.spooled(10).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].id, "n1.5.3");
        let mut ids: Vec<&str> = rest[0].sessions.iter().map(|r| r.id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["d", "e", "f"]);
        s.forget(&["n1.5.3".to_string()]).unwrap();
        assert!(s.spooled(10).unwrap().is_empty());
    }

    #[test]
    fn rows_from_before_batches_become_batches_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        {
            // A version-3 database, as an older botgate left it.
            let c = Connection::open(&path).unwrap();
            for m in &MIGRATIONS[..3] {
                c.execute_batch(m).unwrap();
            }
            c.execute_batch(
                "PRAGMA user_version = 3;
                 INSERT INTO billed_sessions (id, tenant, bot, day, began_ms, overage, node)
                 VALUES ('a', 't', 'b1', '1970-01-01', 1, 0, 'n1'), ('b', 't', 'b1', '1970-01-01', 2, 0, 'n1');",
            )
            .unwrap();
        }
        let s = SqliteStore::open(dir.path()).unwrap();
        let ids: Vec<String> = s.spooled(10).unwrap().into_iter().map(|b| b.id).collect();
        assert_eq!(ids, ["row:a", "row:b"]);
    }

    #[test]
    fn usage_adds_up() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path()).unwrap();
        let d = UsageDelta { turns: 3, rejected_capacity: 1, rejected_rate: 0, flows: [2, 1, 0, 1] };
        let key = ("t".to_string(), "b".to_string(), "2026-11-28".to_string());
        let flush = |seq| UsageFlush { node: "n1", incarnation: "1.a", seq };
        s.add_usage(flush(1), &[(key.0.clone(), key.1.clone(), key.2.clone(), d.clone())]).unwrap();
        s.add_usage(flush(2), &[(key.0.clone(), key.1.clone(), key.2.clone(), d.clone())]).unwrap();
        let u = s.load_usage().unwrap();
        assert_eq!((u[0].turns, u[0].rejected_capacity, u[0].sessions), (6, 2, 0));
        assert_eq!(u[0].flows, [4, 2, 0, 2], "flow runs add up per outcome");
        // A flush sent again (its answer lost) is applied once; a new start of the node counts
        // from its own first flush.
        s.add_usage(flush(2), &[(key.0.clone(), key.1.clone(), key.2.clone(), d.clone())]).unwrap();
        assert_eq!(s.load_usage().unwrap()[0].turns, 6);
        let again = UsageFlush { node: "n1", incarnation: "2.b", seq: 1 };
        s.add_usage(again, &[(key.0, key.1, key.2, d)]).unwrap();
        assert_eq!(s.load_usage().unwrap()[0].turns, 9);
    }

    #[test]
    fn control_changes_and_audit_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path()).unwrap();
        let t = TenantRecord {
            id: "t".into(),
            name: "T".into(),
            allow_ad_hoc_subscriptions: true,
            capacity_policy: crate::config::CapacityPolicy::AllowOverage,
            capacity_alerts: Some(vec![50, 90]),
        };
        let sub = SubscriptionRecord {
            id: "s1".into(),
            tenant: "t".into(),
            kind: crate::config::SubscriptionKind::UserLicenses,
            quantity: 3,
            start: "2026-01-01".parse().unwrap(),
            end: None,
        };
        let a = AuditEntry {
            seq: 0,
            tenant: "t".into(),
            at_ms: 5,
            actor: "alice".into(),
            action: "x".into(),
            target: "y".into(),
            before: None,
            after: Some("{}".into()),
        };
        s.apply(
            &[
                Mutation::PutTenant(t.clone()),
                Mutation::PutSubscription(sub.clone()),
                Mutation::PutAssignment { tenant: "t".into(), kind: Principal::Group, id: "g".into() },
                Mutation::PutSeat(SeatRecord { tenant: "t".into(), user: "u".into(), via: "group:g".into() }),
            ],
            std::slice::from_ref(&a),
        )
        .unwrap();
        s.apply(
            &[Mutation::DeleteSeats { tenant: "t".into(), user: None, via: Some("group:g".into()) }],
            &[],
        )
        .unwrap();
        let d = s.load_control().unwrap();
        assert_eq!(d.tenants, vec![t]);
        assert_eq!(d.subscriptions, vec![sub]);
        assert_eq!(d.assignments, vec![("t".to_string(), Principal::Group, "g".to_string())]);
        assert!(d.seats.is_empty());
        let log = s.audit("t", 0, 10).unwrap();
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].seq, 1);
        assert_eq!(log[0].actor, "alice");
        assert!(s.audit("other", 0, 10).unwrap().is_empty());
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
            c.pragma_update(None, "user_version", 999).unwrap();
        }
        assert!(matches!(SqliteStore::open(dir.path()), Err(StoreError::TooNew { .. })));
    }

    #[test]
    fn unwritable_data_dir_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let err = SqliteStore::open(&file.join("data")).unwrap_err().to_string();
        assert!(err.contains("cannot use the data folder"), "{err}");
    }
}
