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
];
