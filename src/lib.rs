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
//! - [`telemetry`]: tracing set-up, the metrics registry, the HTTP metrics layer.
//! - [`store`]: the `Store` trait and its SQLite engine.
//! - [`channel`]: the Direct Line 3.0 channel: tokens, conversations, WebSocket, CORS.

pub mod channel;
pub mod clock;
pub mod config;
pub mod error;
pub mod routes;
pub mod server;
pub mod state;
pub mod store;
pub mod telemetry;
