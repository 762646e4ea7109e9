//! The outbox in SQLite: events raised in the ledger's transaction or by the sweep, claimed and
//! settled by delivery, and the delivery log. See [`super::outbox`].

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::SessionRecord;
use super::outbox::{Attempt, CapacityWatch, Claimed, EventState, OutboxEvent, Target, next_due};
use super::sqlite::json_err;
use crate::metering::pool::{MonthIndex, month_label, month_of};

/// Events settled this long ago are pruned (with their dedupe keys: every key names its month
/// or instant, so none can come back after this long).
const KEEP_SETTLED_MS: i64 = 92 * 86_400_000;

/// Records a batch in `tx`, keeping each month's count, and raises the capacity events the
/// batch reached for the `watches` given. A session id already recorded counts nothing.
pub(super) fn record(
    tx: &Transaction<'_>,
    batch_id: &str,
    batch: &[SessionRecord],
    watches: &[CapacityWatch],
    now_ms: i64,
) -> rusqlite::Result<()> {
    // (tenant, month) -> (sessions, overage) newly recorded.
    let mut added: BTreeMap<(&str, MonthIndex), (u64, u64)> = BTreeMap::new();
    {
        let mut stmt = tx.prepare_cached(
            "INSERT OR IGNORE INTO billed_sessions (id, tenant, bot, day, began_ms, overage, node, batch)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        for s in batch {
            let n = stmt.execute(params![
                s.id,
                s.tenant,
                s.bot,
                super::sqlite::day_of(s.began_ms),
                s.began_ms,
                s.overage,
                s.node,
                batch_id
            ])?;
            if n > 0 {
                let e = added.entry((s.tenant.as_str(), month_of(s.began_ms))).or_default();
                e.0 += 1;
                e.1 += u64::from(s.overage);
            }
        }
    }
    let mut count = tx.prepare_cached(
        "INSERT INTO month_sessions (tenant, month, sessions, overage) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (tenant, month) DO UPDATE SET
           sessions = sessions + excluded.sessions, overage = overage + excluded.overage
         RETURNING sessions",
    )?;
    for (&(tenant, month), &(sessions, overage)) in &added {
        let total: u64 = count
            .query_row(params![tenant, month_label(month), sessions as i64, overage as i64], |r| {
                r.get::<_, i64>(0)
            })? as u64;
        let Some(w) = watches.iter().find(|w| w.tenant == tenant && w.month == month) else { continue };
        if w.capacity > 0 {
            for &pct in &w.thresholds {
                if total >= w.mark(pct) {
                    raise_one(tx, &w.threshold_event(pct, total, now_ms))?;
                }
            }
        }
        if overage > 0 {
            raise_one(tx, &w.overage_event(total, now_ms))?;
        }
    }
    Ok(())
}

/// Inserts an event unless its dedupe key is known; whether it was new.
pub(super) fn raise_one(c: &Connection, e: &OutboxEvent) -> rusqlite::Result<bool> {
    let n = c
        .prepare_cached(
            "INSERT OR IGNORE INTO outbox (id, tenant, kind, dedupe, payload, created_ms, due_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
        )?
        .execute(params![e.id, e.tenant, e.kind, e.dedupe, e.payload, e.created_ms])?;
    Ok(n > 0)
}

fn event_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<OutboxEvent> {
    Ok(OutboxEvent {
        id: r.get(0)?,
        tenant: r.get(1)?,
        kind: r.get(2)?,
        dedupe: r.get(3)?,
        payload: r.get(4)?,
        created_ms: r.get(5)?,
    })
}

fn targets_of(json: Option<String>) -> rusqlite::Result<Option<Vec<Target>>> {
    json.map(|j| serde_json::from_str(&j).map_err(json_err)).transpose()
}

/// Claims the events due at `now_ms`, oldest due first: each is due again only after
/// `lease_ms`, so no other pass takes it meanwhile. Prunes long-settled events.
pub(super) fn claim(
    c: &mut Connection,
    now_ms: i64,
    lease_ms: i64,
    limit: usize,
) -> rusqlite::Result<Vec<Claimed>> {
    let tx = c.transaction()?;
    let claimed = {
        let mut st = tx.prepare_cached(
            "SELECT id, tenant, kind, dedupe, payload, created_ms, targets FROM outbox
             WHERE due_ms IS NOT NULL AND due_ms <= ?1 ORDER BY due_ms LIMIT ?2",
        )?;
        let rows = st.query_map(params![now_ms, limit as i64], |r| {
            Ok((event_of(r)?, r.get::<_, Option<String>>(6)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (event, targets) = row?;
            out.push(Claimed { event, targets: targets_of(targets)? });
        }
        let mut bump = tx.prepare_cached("UPDATE outbox SET due_ms = ?2 WHERE id = ?1")?;
        for c in &out {
            bump.execute(params![c.event.id, now_ms + lease_ms])?;
        }
        out
    };
    tx.execute(
        "DELETE FROM outbox WHERE due_ms IS NULL AND created_ms < ?1",
        params![now_ms - KEEP_SETTLED_MS],
    )?;
    tx.commit()?;
    Ok(claimed)
}

/// Writes an event's deliveries and the attempts a pass made; the tenant's log keeps its
/// newest `keep` attempts.
pub(super) fn settle(
    c: &mut Connection,
    event: &OutboxEvent,
    targets: &[Target],
    attempts: &[Attempt],
    keep: usize,
) -> rusqlite::Result<()> {
    let tx = c.transaction()?;
    let json = serde_json::to_string(targets).map_err(json_err)?;
    tx.execute(
        "UPDATE outbox SET targets = ?2, due_ms = ?3 WHERE id = ?1",
        params![event.id, json, next_due(targets)],
    )?;
    for a in attempts {
        let j = serde_json::to_string(a).map_err(json_err)?;
        tx.execute("INSERT INTO webhook_attempts (tenant, json) VALUES (?1, ?2)", params![a.tenant, j])?;
    }
    if !attempts.is_empty() {
        let cut: Option<i64> = tx
            .query_row(
                "SELECT seq FROM webhook_attempts WHERE tenant = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2",
                params![event.tenant, keep as i64],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(cut) = cut {
            tx.execute(
                "DELETE FROM webhook_attempts WHERE tenant = ?1 AND seq <= ?2",
                params![event.tenant, cut],
            )?;
        }
    }
    tx.commit()
}

/// A tenant's newest attempts first, at most `limit`.
pub(super) fn attempts(c: &Connection, tenant: &str, limit: usize) -> rusqlite::Result<Vec<Attempt>> {
    let mut st =
        c.prepare_cached("SELECT json FROM webhook_attempts WHERE tenant = ?1 ORDER BY seq DESC LIMIT ?2")?;
    let rows = st.query_map(params![tenant, limit as i64], |r| r.get::<_, String>(0))?;
    rows.map(|j| serde_json::from_str(&j?).map_err(json_err)).collect()
}

/// A tenant's newest events first, at most `limit`, with their deliveries.
pub(super) fn events(c: &Connection, tenant: &str, limit: usize) -> rusqlite::Result<Vec<EventState>> {
    let mut st = c.prepare_cached(
        "SELECT id, tenant, kind, dedupe, payload, created_ms, targets, due_ms FROM outbox
         WHERE tenant = ?1 ORDER BY created_ms DESC, id LIMIT ?2",
    )?;
    let rows = st.query_map(params![tenant, limit as i64], |r| {
        Ok((event_of(r)?, r.get::<_, Option<String>>(6)?, r.get::<_, Option<i64>>(7)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (event, targets, due_ms) = row?;
        out.push(EventState { event, targets: targets_of(targets)?.unwrap_or_default(), due_ms });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::store::sqlite::{DB_FILE, SqliteStore};

    fn rec(id: &str, began_ms: i64) -> SessionRecord {
        SessionRecord {
            id: id.into(),
            tenant: "t".into(),
            bot: "b".into(),
            began_ms,
            overage: false,
            node: String::new(),
        }
    }

    /// A store from before the month counts (schema 4) with 7 sessions this month: after the
    /// upgrade, the 8th session of 10 reaches 80%, not the 15th.
    #[test]
    fn the_month_count_starts_from_the_ledger_of_an_older_store() {
        let dir = tempfile::tempdir().unwrap();
        let nov =
            crate::metering::pool::month_start_ms(crate::metering::pool::parse_month("2026-11").unwrap());
        {
            let mut c = Connection::open(dir.path().join(DB_FILE)).unwrap();
            for (i, sql) in super::super::migrations::MIGRATIONS.iter().take(4).enumerate() {
                c.execute_batch(sql).unwrap();
                c.pragma_update(None, "user_version", (i + 1) as i64).unwrap();
            }
            let tx = c.transaction().unwrap();
            for i in 0..7 {
                tx.execute(
                    "INSERT INTO billed_sessions (id, tenant, bot, day, began_ms, overage, node, batch)
                     VALUES (?1, 't', 'b', '2026-11-05', ?2, 0, '', 'old')",
                    params![format!("old{i}"), nov + 4 * 86_400_000],
                )
                .unwrap();
            }
            tx.commit().unwrap();
        }
        let store = SqliteStore::open(dir.path()).unwrap();
        let w =
            CapacityWatch { tenant: "t".into(), month: month_of(nov), capacity: 10, thresholds: vec![80] };
        let at = nov + 5 * 86_400_000;
        store.record_watched("b1", &[rec("s8", at)], std::slice::from_ref(&w), at).unwrap();
        let ev = store.events("t", 10).unwrap();
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert!(ev[0].event.payload.contains("\"used\":8"), "{}", ev[0].event.payload);
        // The same batch again (a retry) counts and raises nothing.
        store.record_watched("b1", &[rec("s8", at)], std::slice::from_ref(&w), at).unwrap();
        store.record_watched("b2", &[rec("s9", at)], std::slice::from_ref(&w), at).unwrap();
        assert_eq!(store.events("t", 10).unwrap().len(), 1);
    }

    /// Claims keep an event from a second claimer until they lapse; settling with an outcome
    /// for every delivery takes it out of the due set.
    #[test]
    fn claims_lapse_and_settled_events_are_not_due() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let e = OutboxEvent::new("t", "test", "test/1".into(), 1_000, serde_json::json!({}));
        assert_eq!(store.raise(&[e.clone(), e.clone()]).unwrap(), 1, "one per dedupe key");
        assert_eq!(store.claim_due(1_000, 500, 10).unwrap().len(), 1);
        assert!(store.claim_due(1_200, 500, 10).unwrap().is_empty(), "claimed");
        let again = store.claim_due(1_500, 500, 10).unwrap();
        assert_eq!(again.len(), 1, "the claim lapsed");
        assert_eq!(again[0].targets, None);
        let t = Target { endpoint: "ep".into(), attempts: 1, next_ms: 9_000, outcome: None };
        store.settle(&e, std::slice::from_ref(&t), &[], 10).unwrap();
        assert!(store.claim_due(8_999, 500, 10).unwrap().is_empty(), "not due before its retry");
        let c = store.claim_due(9_000, 500, 10).unwrap();
        assert_eq!(c[0].targets.as_deref(), Some(std::slice::from_ref(&t)));
        let done = Target { outcome: Some("delivered".into()), ..t };
        store.settle(&e, &[done], &[], 10).unwrap();
        assert!(store.claim_due(20_000, 500, 10).unwrap().is_empty());
        assert_eq!(store.events("t", 10).unwrap()[0].due_ms, None);
        // Settled events are pruned after 92 days.
        assert!(store.claim_due(1_000 + 93 * 86_400_000, 500, 10).unwrap().is_empty());
        assert!(store.events("t", 10).unwrap().is_empty());
    }
}
