//! botgate: a Direct Line 3.0 gateway in front of chat bots.
//!
//! Bot users chat anonymously with published bots over a Direct Line 3.0 compatible API (REST
//! polling and WebSocket); behind it a bot is built in (topics from configuration) or an
//! upstream Bot Framework bot. Bot authors are licensed; every billed session is metered exactly.
//!
//! # Layout
//! - [`config`]: the typed configuration, its defaults and validation.
//! - [`server`]: listeners, the middleware stack (built in one function), graceful shutdown.
//! - [`routes`]: the public route table.
//! - [`state`]: the shared application state handle.
//! - [`error`]: the one place where errors become HTTP responses.
//! - [`clock`]: the `Clock` trait, the system clock and a manual clock for tests.
//! - [`cluster`]: several nodes on one Redis: heartbeat, node registry and forwarding, reloads.
//! - [`telemetry`]: tracing set-up, the metrics registry, the HTTP metrics layer.
//! - [`store`]: the `Store` trait and its engines: SQLite (one node) and Redis (several nodes,
//!   with the lease protocol of `metering::lease`).
//! - [`channel`]: the Direct Line 3.0 channel: tokens, the message path, WebSocket, the bot
//!   connector, CORS.
//! - [`conversation`]: conversation state: activity log, watermark, expiry, the map.
//! - [`identity`]: authors' JWTs: verification, the verified-token cache, the signing keys
//!   (file, JWKS URL, OpenID discovery; refreshed and fetched again for unknown key ids), the dev
//!   issuer.
//! - [`licensing`]: tenants, purchases, seats, trials, settings, audit; the read-mostly snapshot;
//!   the author layer; the admin and operator APIs.
//! - [`console`]: the web console's page and assets, embedded at build time.
//! - [`openapi`]: the OpenAPI 3.1 document of the JSON APIs, generated from the handlers.
//! - [`authoring`]: the authoring API: bots, secrets, publishing, test chat, who-am-I, trials,
//!   usage reports.
//! - [`bots`]: the bot registry, built-in bots (topics and their flows) and upstream bots
//!   (Bot Framework).
//! - [`outbound`]: the one HTTP client of every outbound call (upstream bots, topic flows,
//!   webhooks) and the network policy it resolves through.
//! - [`notify`]: notification events, their outbox, signed webhook delivery, the admin API.
//! - [`metering`]: session tracker, per-bot counters, tenant pools by month, rate limit, the
//!   durable ledger, the usage exposition.

pub mod authoring;
pub mod bots;
pub mod channel;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod console;
pub mod conversation;
pub mod error;
pub mod identity;
pub mod licensing;
pub mod metering;
pub mod notify;
pub mod openapi;
pub mod outbound;
pub mod routes;
pub mod server;
pub mod state;
pub mod store;
pub mod telemetry;
