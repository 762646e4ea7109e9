//! Listeners, the one function that builds the middleware stack, and graceful shutdown.

pub mod body_limit;
pub mod conn;
pub mod hot;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderName, StatusCode, header};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultMakeSpan, DefaultOnFailure, DefaultOnResponse, TraceLayer};

use crate::clock::SharedClock;
use crate::config::Config;
use crate::error::{ApiError, json_error_bodies, not_found_fallback};
use crate::state::{AppState, StartError};
use crate::telemetry::http_metrics::HttpMetricsLayer;
use crate::telemetry::request_id::MakeRequestCounter;

pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A started server: its bound addresses, its state, and the handle that stops it.
pub struct Running {
    /// The bound public address.
    pub public_addr: SocketAddr,
    /// The bound admin (operations) address.
    pub admin_addr: SocketAddr,
    state: AppState,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// The server's state (tests read counters and move the clock through it).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Stops accepting, lets in-flight requests finish within the grace period, flushes and
    /// closes the store.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Opens the store, binds both listeners and starts serving. Returns once both are bound.
pub async fn start(config: Config, clock: SharedClock) -> Result<Running, StartError> {
    let public = TcpListener::bind(config.server.listen)
        .await
        .map_err(|source| StartError::Bind { addr: config.server.listen, source })?;
    let admin = TcpListener::bind(config.server.admin_listen)
        .await
        .map_err(|source| StartError::Bind { addr: config.server.admin_listen, source })?;
    let public_addr =
        public.local_addr().map_err(|source| StartError::Bind { addr: config.server.listen, source })?;
    let admin_addr =
        admin.local_addr().map_err(|source| StartError::Bind { addr: config.server.admin_listen, source })?;

    let tls = match (&config.server.tls_cert, &config.server.tls_key) {
        (Some(cert), Some(key)) => Some(Arc::new(tls::Tls::load(cert, key).map_err(StartError::Tls)?)),
        _ => None,
    };
    let state = AppState::open(config, clock, public_addr).await?;
    let (public_app, hot) = public_service(&state)?;
    let admin_app = admin_router(&state);

    let public_limits = conn::ConnLimits::public(&state.config().server);
    let admin_limits = conn::ConnLimits::admin(&state.config().server);
    let public_metrics =
        conn::ConnMetrics::register(state.metrics(), "public").map_err(StartError::Metrics)?;
    let admin_metrics = conn::ConnMetrics::register(state.metrics(), "admin").map_err(StartError::Metrics)?;
    warn_if_files_limit_below(public_limits.max_connections + admin_limits.max_connections);

    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(housekeeping(state.clone(), stop_rx.clone()));
    tokio::spawn(crate::notify::run(state.clone(), stop_rx.clone()));
    if let Some(tls) = &tls {
        // Registered before the listeners serve: a SIGHUP from then on reloads, never kills.
        #[cfg(unix)]
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(hup) => {
                tokio::spawn(reload_tls_on_sighup(tls.clone(), hup, stop_rx.clone()));
            }
            Err(e) => tracing::error!(error = %e, "Cannot listen for SIGHUP; TLS files are not reloaded."),
        }
    }
    let grace = Duration::from_secs(state.config().server.shutdown_grace_secs);
    let task_state = state.clone();
    let task = tokio::spawn(async move {
        let serve_public = conn::serve(
            public,
            (public_app, Some(Arc::new(hot))),
            public_limits,
            public_metrics,
            stop_rx.clone(),
            tls.clone(),
        );
        let serve_admin =
            conn::serve(admin, (admin_app, None), admin_limits, admin_metrics, stop_rx.clone(), tls.clone());
        let both = async { tokio::join!(serve_public, serve_admin) };
        tokio::pin!(both);
        let mut stop_rx = stop_rx;
        tokio::select! {
            _ = &mut both => {}
            _ = async { let _ = stop_rx.wait_for(|s| *s).await; } => {
                task_state.set_draining();
                if tokio::time::timeout(grace, &mut both).await.is_err() {
                    tracing::warn!(grace_secs = grace.as_secs(), "In-flight requests outlived the shutdown grace period; closing them.");
                }
            }
        }
        task_state.close().await;
    });
    Ok(Running { public_addr, admin_addr, state, stop, task })
}

/// Sweeps expired conversations from memory, flushes the non-billing usage counters and starts
/// due fetches of the identity provider's keys, on timers, until shutdown (which flushes once
/// more).
async fn housekeeping(state: AppState, mut stop: watch::Receiver<bool>) {
    let mut sweep = tokio::time::interval(Duration::from_secs(state.config().channel.sweep_interval_secs));
    let mut flush = tokio::time::interval(FLUSH_INTERVAL);
    let ttl = Duration::from_secs(state.config().cluster.lease_ttl_secs);
    let mut heartbeat = tokio::time::interval((ttl / 3).max(Duration::from_millis(100)));
    // Whether a key source is due is judged on the server's clock; this only looks often.
    let mut keys = tokio::time::interval(Duration::from_secs(1));
    let remote_keys = state.verifier().has_remote_keys();
    loop {
        tokio::select! {
            _ = keys.tick(), if remote_keys => {
                state.verifier().key_sets().filter(|k| k.has_remote()).for_each(|k| k.start_due_refresh());
            }
            _ = heartbeat.tick(), if state.metering().leases().is_some() => {
                crate::cluster::heartbeat(&state).await;
            }
            _ = sweep.tick() => {
                // A pass over every conversation: on a blocking thread, not a runtime worker.
                let s = state.clone();
                if let Ok(removed) = tokio::task::spawn_blocking(move || s.sweep()).await
                    && removed > 0
                {
                    tracing::debug!(removed, "Swept expired conversations.");
                }
            }
            _ = flush.tick() => {
                let metering = state.metering().clone();
                match tokio::task::spawn_blocking(move || metering.flush()).await {
                    Ok(Err(e)) => tracing::warn!(error = %e, "Flushing usage counters failed; will retry."),
                    Err(e) => tracing::warn!(error = %e, "Flushing usage counters panicked."),
                    Ok(Ok(())) => {}
                }
            }
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
    }
}

/// Reloads the certificate and key on every SIGHUP until shutdown; a pair that does not load
/// leaves the old one serving.
#[cfg(unix)]
async fn reload_tls_on_sighup(
    tls: Arc<tls::Tls>,
    mut hup: tokio::signal::unix::Signal,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            got = hup.recv() => {
                if got.is_none() {
                    return;
                }
                match tls.reload() {
                    Ok(()) => tracing::info!("Reloaded the TLS certificate and key."),
                    Err(e) => tracing::error!(error = %e, "Reloading the TLS certificate failed; the previous one keeps serving."),
                }
            }
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
    }
}

/// How often turns and refusals are written to the store (billed sessions are written before
/// they are acknowledged; these counters are not billing).
const FLUSH_INTERVAL: Duration = Duration::from_secs(10);

/// Warns at start-up when the process may open fewer files than its listeners may hold
/// connections (Linux: read from `/proc/self/limits`); accepts beyond the limit would fail.
fn warn_if_files_limit_below(connections: usize) {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else { return };
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok());
    // Headroom for the store, the data files and outbound connections.
    if let Some(soft) = soft
        && soft < connections + 256
    {
        tracing::warn!(
            open_files_limit = soft,
            max_connections = connections,
            "The open-files limit is below the connection caps; raise it (ulimit -n) or lower server.max_connections."
        );
    }
}

/// Serves until SIGTERM or Ctrl-C, then shuts down gracefully. Prints the one
/// `botgate listening public=... admin=...` line on stdout once both listeners are bound.
pub async fn run(config: Config, clock: SharedClock) -> Result<(), StartError> {
    let running = start(config, clock).await?;
    println!("botgate listening public={} admin={}", running.public_addr, running.admin_addr);
    tracing::info!(public = %running.public_addr, admin = %running.admin_addr, "botgate is serving.");
    shutdown_signal().await;
    tracing::info!("Shutting down: no new connections; finishing in-flight requests.");
    running.shutdown().await;
    tracing::info!("Stopped.");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "Cannot listen for SIGTERM.");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// The public service: the router and its middleware stack.
///
/// The standard layers wrap the router as one service (`ServiceBuilder`), not through
/// `Router::layer`, which wraps every route separately and boxes a future per layer per request:
/// with eight layers that boxing and copying was a tenth of a message's instructions
/// (callgrind, `benches/instructions.sh`). The stack is type-erased once, at the top.
pub type PublicService =
    tower::util::BoxCloneSyncService<axum::extract::Request, Response, std::convert::Infallible>;

/// The public router and its middleware stack, outermost layer first, and the hot path beside it
/// (sharing its metrics and request ids).
pub fn public_service(state: &AppState) -> Result<(PublicService, hot::HotPath), StartError> {
    let (routes, templates) = crate::routes::public(state);
    let http_metrics = HttpMetricsLayer::new(state.metrics(), &templates).map_err(StartError::Metrics)?;
    let request_ids = MakeRequestCounter::default();
    let route = |t: &str| http_metrics.route(t).ok_or_else(|| StartError::Control(format!("no route {t}")));
    let hot = hot::HotPath::new(
        state,
        [route(hot::TEMPLATE)?, route(hot::SEND_TEMPLATE)?, route(hot::REPLY_TEMPLATE)?],
        request_ids.clone(),
    );
    let server = &state.config().server;
    let mut router = routes
        // Innermost, per route and on the fallback: the route template is known here
        // (MatchedPath), so requests are counted and timed by template, never by raw URI.
        .fallback(not_found_fallback)
        .layer(http_metrics)
        .with_state(state.clone());
    if state.cluster().is_some() {
        // Forwarding (several nodes only): a request for another node's conversation goes to its
        // owner before routing; inside the body limit, so a forwarded body is bounded too.
        router = router
            .layer(axum::middleware::from_fn_with_state(state.clone(), crate::cluster::forward::forward));
    }
    let stack = tower::ServiceBuilder::new()
        // Outermost: every error answer, from any layer below, leaves as the JSON error body.
        .layer(tower::util::MapResponseLayer::new(json_error_bodies))
        // One body type for the layers' wrapped bodies.
        .map_response(|res: Response<_>| res.map(axum::body::Body::new))
        // Set a request id (keeps one the client sent) before the trace span is made.
        .layer(SetRequestIdLayer::new(REQUEST_ID, request_ids))
        // Propagate the request id to the response.
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        // Trace: one span per request with the request id, at DEBUG so the hot path logs
        // nothing by default.
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(tracing::Level::DEBUG))
                .on_response(DefaultOnResponse::new().level(tracing::Level::DEBUG))
                // A 5xx is logged, with its cause, where it is made (a 503 for a full cap is
                // no error of the gateway).
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
        // CORS: browsers (Web Chat) call from other origins; preflights are answered here
        // before authentication, and every real response carries the allow-origin header.
        .layer(crate::channel::cors::layer())
        // Catch panics: a bug answers 500 `InternalError` (cause logged) instead of dropping the
        // connection; outside the handlers and the timeout so it sees every panic.
        .layer(CatchPanicLayer::custom(panic_response))
        // Timeout: inside CORS so a 504 still carries CORS headers; WebSocket upgrades answer at
        // once and their streams are not limited by it.
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            Duration::from_secs(server.request_timeout_secs),
        ))
        // The timeout builds its 504 from an empty body of the inner type: make it axum's.
        .map_response(|res: Response<_>| res.map(axum::body::Body::new))
        // Body limit: refuses oversized bodies before any handler buffers them (413); uploads
        // have their own.
        .service(body_limit::BodyLimits::new(
            router,
            server.max_body_bytes,
            state.config().channel.max_upload_bytes,
        ));
    Ok((PublicService::new(stack), hot))
}

pub(crate) fn panic_response(cause: Box<dyn std::any::Any + Send + 'static>) -> Response<axum::body::Body> {
    let cause = cause
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| cause.downcast_ref::<&str>().copied())
        .unwrap_or("unknown");
    tracing::error!(cause, "A request handler panicked.");
    ApiError::internal().into_response()
}

/// The admin (operations) router: metrics, liveness, readiness.
pub fn admin_router(state: &AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found_fallback)
        .with_state(state.clone())
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestCounter::default()))
        .layer(tower::util::MapResponseLayer::new(json_error_bodies))
}

async fn metrics(State(state): State<AppState>) -> Response {
    let body = state.encode_metrics();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

async fn healthz() -> Response {
    (StatusCode::OK, axum::Json(serde_json::json!({"status": "alive"}))).into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.is_draining() {
        return ApiError::unavailable("ShuttingDown", "The gateway is shutting down.").into_response();
    }
    match state.check_store().await {
        Ok(()) => (StatusCode::OK, axum::Json(serde_json::json!({"status": "ready"}))).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "Readiness check: the store does not answer.");
            ApiError::unavailable("StoreUnavailable", "The store does not answer.").into_response()
        }
    }
}

/// A flag read by `/readyz`: set when shutdown begins so load balancers stop sending traffic.
#[derive(Debug, Default)]
pub(crate) struct Draining(AtomicBool);

impl Draining {
    pub(crate) fn set(&self) {
        // Relaxed: a standalone flag; readiness is advisory and nothing else is published with it.
        self.0.store(true, Ordering::Relaxed);
    }
    pub(crate) fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, ServiceExt};

    #[tokio::test]
    async fn a_panic_becomes_a_json_500() {
        let svc = CatchPanicLayer::custom(panic_response).layer(tower::service_fn(
            |_req: http::Request<axum::body::Body>| async move {
                if true {
                    panic!("boom");
                }
                Ok::<_, std::convert::Infallible>(Response::new(axum::body::Body::empty()))
            },
        ));
        let res = svc.oneshot(http::Request::new(axum::body::Body::empty())).await.unwrap();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = http_body_util::BodyExt::collect(res.into_body()).await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "InternalError");
        assert!(!String::from_utf8_lossy(&body).contains("boom"));
    }
}
