//! Versioned schema migrations, applied in order at start; `PRAGMA user_version` holds the
//! version reached. A migration is never edited once released: add a new one.

/// The migrations; index `i` takes the schema from version `i` to `i + 1`.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: the billed-session ledger and the daily non-billing counters.
    r#"
    CREATE TABLE billed_sessions (
        id       TEXT PRIMARY KEY,
        tenant   TEXT NOT NULL,
        bot      TEXT NOT NULL,
        day      TEXT NOT NULL,     -- YYYY-MM-DD (UTC)
        began_ms INTEGER NOT NULL,
        overage  INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX billed_sessions_by_bot_day ON billed_sessions (tenant, bot, day);
    CREATE TABLE daily_usage (
        tenant            TEXT NOT NULL,
        bot               TEXT NOT NULL,
        day               TEXT NOT NULL,
        turns             INTEGER NOT NULL DEFAULT 0,
        rejected_capacity INTEGER NOT NULL DEFAULT 0,
        rejected_rate     INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant, bot, day)
    ) WITHOUT ROWID;
    "#,
    // 2: the control plane: tenants, purchases, assignments, seats, trials, bots, audit.
    r#"
    CREATE TABLE tenants (
        id                         TEXT PRIMARY KEY,
        name                       TEXT NOT NULL,
        allow_ad_hoc_subscriptions INTEGER NOT NULL,
        capacity_policy            TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE subscriptions (
        id       TEXT PRIMARY KEY,
        tenant   TEXT NOT NULL,
        kind     TEXT NOT NULL,
        quantity INTEGER NOT NULL,
        start    TEXT NOT NULL,
        end      TEXT
    ) WITHOUT ROWID;
    CREATE TABLE assignments (
        tenant TEXT NOT NULL,
        kind   TEXT NOT NULL,
        id     TEXT NOT NULL,
        PRIMARY KEY (tenant, kind, id)
    ) WITHOUT ROWID;
    CREATE TABLE seats (
        tenant TEXT NOT NULL,
        user   TEXT NOT NULL,
        via    TEXT NOT NULL,
        PRIMARY KEY (tenant, user)
    ) WITHOUT ROWID;
    CREATE TABLE trials (
        tenant     TEXT NOT NULL,
        user       TEXT NOT NULL,
        started_ms INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL,
        extended   INTEGER NOT NULL,
        PRIMARY KEY (tenant, user)
    ) WITHOUT ROWID;
    CREATE TABLE bots (
        id     TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        json   TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE audit (
        seq    INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant TEXT NOT NULL,
        at_ms  INTEGER NOT NULL,
        actor  TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        before TEXT,
        after  TEXT
    );
    CREATE INDEX audit_by_tenant ON audit (tenant, seq);
    "#,
    // 3: the node that began a session (several nodes spool sessions here during an outage).
    r#"
    ALTER TABLE billed_sessions ADD COLUMN node TEXT NOT NULL DEFAULT '';
    "#,
    // 4: the ledger batch that wrote a session; a spool replays whole batches under their ids.
    // Rows from before are each a batch of their own. No index: only a node's spool (sessions
    // written while Redis was unreachable, a small table) is read by batch, and an index would
    // cost every session a single node records.
    r#"
    ALTER TABLE billed_sessions ADD COLUMN batch TEXT NOT NULL DEFAULT '';
    UPDATE billed_sessions SET batch = 'row:' || id;
    "#,
    // 5: notifications: a tenant's capacity alert thresholds, each month's session count (the
    // thresholds are judged on it in the ledger's transaction; filled from the ledger), the
    // outbox with its dedupe keys, the delivery log, and webhook endpoints.
    r#"
    ALTER TABLE tenants ADD COLUMN capacity_alerts TEXT;
    CREATE TABLE month_sessions (
        tenant   TEXT NOT NULL,
        month    TEXT NOT NULL,     -- YYYY-MM (UTC)
        sessions INTEGER NOT NULL,
        overage  INTEGER NOT NULL,
        PRIMARY KEY (tenant, month)
    ) WITHOUT ROWID;
    INSERT INTO month_sessions (tenant, month, sessions, overage)
        SELECT tenant, substr(day, 1, 7), COUNT(*), SUM(overage) FROM billed_sessions
        GROUP BY tenant, substr(day, 1, 7);
    CREATE TABLE outbox (
        id         TEXT PRIMARY KEY,
        tenant     TEXT NOT NULL,
        kind       TEXT NOT NULL,
        dedupe     TEXT NOT NULL UNIQUE,
        payload    TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        due_ms     INTEGER,         -- NULL once every delivery has an outcome
        targets    TEXT             -- JSON; NULL before the first delivery pass
    ) WITHOUT ROWID;
    CREATE INDEX outbox_due ON outbox (due_ms) WHERE due_ms IS NOT NULL;
    CREATE INDEX outbox_by_tenant ON outbox (tenant, created_ms);
    CREATE TABLE webhook_attempts (
        seq    INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant TEXT NOT NULL,
        json   TEXT NOT NULL
    );
    CREATE INDEX webhook_attempts_by_tenant ON webhook_attempts (tenant, seq);
    CREATE TABLE webhook_endpoints (
        id     TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        json   TEXT NOT NULL
    ) WITHOUT ROWID;
    "#,
    // 6: topic flow runs per day, by outcome (billed to nobody; flushed with the turns).
    r#"
    ALTER TABLE daily_usage ADD COLUMN flow_ok INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE daily_usage ADD COLUMN flow_failed INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE daily_usage ADD COLUMN flow_timeout INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE daily_usage ADD COLUMN flow_refused INTEGER NOT NULL DEFAULT 0;
    "#,
    // 7: the last flush of non-billing counters applied per node, so that a flush sent again
    // after an unknown outcome is applied once.
    r#"
    CREATE TABLE usage_flushes (
        node        TEXT PRIMARY KEY,
        incarnation TEXT NOT NULL,
        seq         INTEGER NOT NULL
    ) WITHOUT ROWID;
    "#,
];
