//! The embedded store: one SQLite file in the data folder, WAL mode, `synchronous=FULL`.
//!
//! One connection behind a std `Mutex`: SQLite serializes writers anyway, every call is short and
//! runs off the async runtime (a blocking thread or the ledger's writer thread), and a std lock
//! is never held across an `.await`.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};

use super::migrations::MIGRATIONS;
use super::{DailyUsage, SessionRecord, Store, StoreError, UsageDelta};

/// The database file's name inside the data folder.
pub const DB_FILE: &str = "botgate.sqlite3";

/// The SQLite store. See the module docs.
pub struct SqliteStore {
    path: String,
    conn: Mutex<Option<Connection>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish()
    }
}

impl SqliteStore {
    /// Opens (creating the folder and the file if missing) and migrates the store in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
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
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;").map_err(sql_err)?;
        migrate(&mut conn, &path)?;
        Ok(Self { path, conn: Mutex::new(Some(conn)) })
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

/// The UTC day of a timestamp, `YYYY-MM-DD`.
pub(crate) fn day_of(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().format("%Y-%m-%d").to_string()
}

impl Store for SqliteStore {
    fn ping(&self) -> Result<(), StoreError> {
        self.with_conn(|c| c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0)).map(|_| ()))
    }

    fn record_sessions(&self, batch: &[SessionRecord]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.with_conn(|c| {
            let tx = c.transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT OR IGNORE INTO billed_sessions (id, tenant, bot, day, began_ms, overage)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?;
                for s in batch {
                    stmt.execute(params![s.id, s.tenant, s.bot, day_of(s.began_ms), s.began_ms, s.overage])?;
                }
            }
            tx.commit()
        })
    }

    fn add_usage(&self, deltas: &[(String, String, String, UsageDelta)]) -> Result<(), StoreError> {
        if deltas.is_empty() {
            return Ok(());
        }
        self.with_conn(|c| {
            let tx = c.transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO daily_usage (tenant, bot, day, turns, rejected_capacity, rejected_rate)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (tenant, bot, day) DO UPDATE SET
                       turns = turns + excluded.turns,
                       rejected_capacity = rejected_capacity + excluded.rejected_capacity,
                       rejected_rate = rejected_rate + excluded.rejected_rate",
                )?;
                for (tenant, bot, day, d) in deltas {
                    stmt.execute(params![
                        tenant,
                        bot,
                        day,
                        d.turns as i64,
                        d.rejected_capacity as i64,
                        d.rejected_rate as i64
                    ])?;
                }
            }
            tx.commit()
        })
    }

    fn load_usage(&self) -> Result<Vec<DailyUsage>, StoreError> {
        self.with_conn(|c| {
            let mut stmt = c.prepare(
                "SELECT tenant, bot, day, SUM(sessions), SUM(overage), SUM(turns), SUM(rc), SUM(rr) FROM (
                   SELECT tenant, bot, day, COUNT(*) AS sessions, SUM(overage) AS overage,
                          0 AS turns, 0 AS rc, 0 AS rr
                     FROM billed_sessions GROUP BY tenant, bot, day
                   UNION ALL
                   SELECT tenant, bot, day, 0, 0, turns, rejected_capacity, rejected_rate FROM daily_usage
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

    fn close(&self) -> Result<(), StoreError> {
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

    fn rec(id: &str, bot: &str, ms: i64) -> SessionRecord {
        SessionRecord { id: id.into(), tenant: "t".into(), bot: bot.into(), began_ms: ms, overage: false }
    }

    #[test]
    fn migrates_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path()).unwrap();
        s.ping().unwrap();
        s.record_sessions(&[rec("a", "b1", 0), rec("b", "b1", 0)]).unwrap();
        s.close().unwrap();
        assert!(matches!(s.ping(), Err(StoreError::Closed)));
        let s = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(s.session_ids().unwrap(), vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn a_session_id_is_recorded_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path()).unwrap();
        s.record_sessions(&[rec("a", "b1", 0)]).unwrap();
        s.record_sessions(&[rec("a", "b1", 0), rec("c", "b2", 86_400_000)]).unwrap();
        let usage = s.load_usage().unwrap();
        assert_eq!(usage.len(), 2);
        assert_eq!(usage[0].sessions, 1);
        assert_eq!(usage[0].day, "1970-01-01");
        assert_eq!(usage[1].day, "1970-01-02");
    }

    #[test]
    fn usage_adds_up() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path()).unwrap();
        let d = UsageDelta { turns: 3, rejected_capacity: 1, rejected_rate: 0 };
        let key = ("t".to_string(), "b".to_string(), "2026-11-28".to_string());
        s.add_usage(&[(key.0.clone(), key.1.clone(), key.2.clone(), d.clone())]).unwrap();
        s.add_usage(&[(key.0, key.1, key.2, d)]).unwrap();
        let u = s.load_usage().unwrap();
        assert_eq!((u[0].turns, u[0].rejected_capacity, u[0].sessions), (6, 2, 0));
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
