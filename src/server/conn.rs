//! The accept loop both listeners share: a cap on open connections, deadlines for a request's
//! head and for an idle keep-alive connection, a bound on header bytes, and graceful shutdown.
//!
//! The deadlines are kept here rather than by hyper's `header_read_timeout`, because hyper starts
//! that timer as soon as a connection waits for its next request: it would close every idle
//! keep-alive connection after the header timeout, and a header timeout long enough for idle
//! keep-alive (load balancers keep theirs for a minute) gives a slowloris a minute per byte.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::{IntCounterVec, IntGauge};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::telemetry::registry::Metrics;

/// The limits one listener enforces on its connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Open connections at most (WebSockets included); one more is answered 503 and closed.
    pub max_connections: usize,
    /// Time a client has to send a request's whole head, from the connection's opening or from
    /// the first byte after an idle spell.
    pub header_read_timeout: Duration,
    /// Time a keep-alive connection may sit with no request before it is closed.
    pub keepalive_idle: Duration,
    /// Largest request head (request line and headers), in bytes; beyond it 431.
    pub max_header_bytes: usize,
}

impl ConnLimits {
    /// The public listener's limits, from `[server]`.
    pub fn public(server: &crate::config::ServerConfig) -> Self {
        Self {
            max_connections: server.max_connections,
            header_read_timeout: Duration::from_millis(server.header_read_timeout_ms),
            keepalive_idle: Duration::from_millis(server.keepalive_idle_ms),
            max_header_bytes: server.max_header_bytes,
        }
    }

    /// The operations listener's: the same deadlines, and a small cap of its own (scrapers and
    /// probes only), so a flood of the public listener never locks out `/metrics`.
    pub fn admin(server: &crate::config::ServerConfig) -> Self {
        Self { max_connections: ADMIN_MAX_CONNECTIONS, ..Self::public(server) }
    }
}

/// Connections the operations listener holds at most.
pub const ADMIN_MAX_CONNECTIONS: usize = 256;

/// Refusals being written at once at most; beyond it an over-cap connection is closed unanswered,
/// so a flood cannot make the refusals themselves a resource.
const MAX_REFUSALS_IN_FLIGHT: usize = 64;

/// Time a refusal's write may take.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

const BUSY_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
connection: close\r\nretry-after: 1\r\ncontent-length: 96\r\n\r\n\
{\"error\":{\"code\":\"TooManyConnections\",\"message\":\"The gateway holds all the connections it may.\"}}";

/// Connection counters for `/metrics`.
#[derive(Clone)]
pub struct ConnMetrics {
    open: IntGauge,
    closed: IntCounterVec,
}

impl ConnMetrics {
    /// Registers `botgate_http_connections_open{listener}` and
    /// `botgate_http_connections_closed_total{listener,reason}` for one listener.
    pub fn register(metrics: &Metrics, listener: &str) -> Result<Self, prometheus::Error> {
        let open = IntGauge::with_opts(
            prometheus::Opts::new(
                "botgate_http_connections_open",
                "Open HTTP connections, WebSockets included.",
            )
            .const_label("listener", listener),
        )?;
        let closed = IntCounterVec::new(
            prometheus::Opts::new(
                "botgate_http_connections_closed_total",
                "Connections the gateway closed: refused over the cap, or past a deadline.",
            )
            .const_label("listener", listener),
            &["reason"],
        )?;
        metrics.registry().register(Box::new(open.clone()))?;
        metrics.registry().register(Box::new(closed.clone()))?;
        for reason in ["over_cap", "header_timeout", "idle_timeout"] {
            closed.with_label_values(&[reason]);
        }
        Ok(Self { open, closed })
    }
}

/// Serves `app` on `listener` within `limits` until `stop` turns true, then closes idle
/// connections, lets in-flight requests finish, and returns when every HTTP connection has ended
/// (upgraded WebSockets are the stream's to close).
pub async fn serve<S>(
    listener: TcpListener,
    (app, hot): (S, Option<Arc<super::hot::HotPath>>),
    limits: ConnLimits,
    metrics: ConnMetrics,
    mut stop: watch::Receiver<bool>,
    tls: Option<Arc<super::tls::Tls>>,
) where
    S: tower::Service<axum::extract::Request, Response = Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(None).max_header_size(limits.max_header_bytes);
    let builder = Arc::new(builder);
    let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new()).max_header_list_size(limits.max_header_bytes as u32);
    let h2 = Arc::new(h2);
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            _ = stopped(&mut stop) => break,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors or a reset before accept: back off a little instead
                // of spinning on the error.
                tracing::warn!(error = %e, "Accepting a connection failed.");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics.closed.with_label_values(&["over_cap"]).inc();
            refuse(tcp, &refusals);
            continue;
        };
        // Replies are small and written whole; Nagle would only add latency.
        let _ = tcp.set_nodelay(true);
        metrics.open.inc();
        let watch = Arc::new(Watch::new(limits));
        let service = ConnService { app: app.clone(), hot: hot.clone(), watch: watch.clone(), peer };
        let (closed, stop) = (metrics.closed.clone(), stop.clone());
        let Some(tls) = &tls else {
            let io = WatchedIo {
                inner: Stream::Plain(tcp),
                watch: watch.clone(),
                _permit: permit,
                open: metrics.open.clone(),
            };
            let conn = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
            conns.spawn(drive(conn, watch, closed, stop));
            continue;
        };
        let (acceptor, open) = (tls.acceptor().clone(), metrics.open.clone());
        let (builder, h2) = (builder.clone(), h2.clone());
        conns.spawn(async move {
            // The handshake is part of the first request's head: it has the header timeout.
            let tls = match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    open.dec();
                    closed.with_label_values(&["tls_handshake"]).inc();
                    tracing::debug!(error = %e, "A TLS handshake failed.");
                    return;
                }
                Err(_) => {
                    open.dec();
                    closed.with_label_values(&[Expiry::HeaderTimeout.as_str()]).inc();
                    return;
                }
            };
            let is_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let io =
                WatchedIo { inner: Stream::Tls(Box::new(tls)), watch: watch.clone(), _permit: permit, open };
            if is_h2 {
                drive(h2.serve_connection(TokioIo::new(io), service), watch, closed, stop).await;
            } else {
                drive(
                    builder.serve_connection(TokioIo::new(io), service).with_upgrades(),
                    watch,
                    closed,
                    stop,
                )
                .await;
            }
        });
    }
    while conns.join_next().await.is_some() {}
}

/// Runs one connection to its end, closing it at a passed deadline or gracefully at shutdown.
async fn drive<C>(conn: C, watch: Arc<Watch>, closed: IntCounterVec, mut stop: watch::Receiver<bool>)
where
    C: Future<Output = hyper::Result<()>> + GracefulShutdown,
{
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        let deadline = watch.deadline();
        tokio::select! {
            result = &mut conn => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "A connection ended with an error.");
                }
                return;
            }
            // Deadlines hold during shutdown too: a slowloris cannot stretch the drain.
            _ = tokio::time::sleep_until(deadline) => {
                if let Some(reason) = watch.expired(Instant::now()) {
                    closed.with_label_values(&[reason.as_str()]).inc();
                    return; // dropping the connection closes the socket
                }
            }
            _ = watch.moved.notified() => {}
            _ = stopped(&mut stop), if !stopping => {
                stopping = true;
                conn.as_mut().shut_down();
            }
        }
    }
}

/// Completes when `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Hyper's graceful shutdown, for the connection types [`serve`] drives.
trait GracefulShutdown {
    fn shut_down(self: Pin<&mut Self>);
}

impl<S> GracefulShutdown
    for hyper::server::conn::http1::UpgradeableConnection<TokioIo<WatchedIo>, ConnService<S>>
where
    S: tower::Service<axum::extract::Request, Response = Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    fn shut_down(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<S> GracefulShutdown
    for hyper::server::conn::http2::Connection<TokioIo<WatchedIo>, ConnService<S>, TokioExecutor>
where
    S: tower::Service<axum::extract::Request, Response = Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    fn shut_down(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Answers an over-cap connection 503 and closes it, off the accept loop.
fn refuse(mut tcp: TcpStream, refusals: &Arc<Semaphore>) {
    let Ok(slot) = refusals.clone().try_acquire_owned() else {
        return; // too many refusals in flight: close unanswered
    };
    tokio::spawn(async move {
        let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
            tcp.write_all(BUSY_RESPONSE).await?;
            tcp.shutdown().await?;
            // Read what the client sent before closing: closing on unread bytes resets the
            // connection, and a reset can discard the answer before the client reads it.
            let mut sink = [0u8; 1024];
            while tcp.read(&mut sink).await? > 0 {}
            Ok::<(), io::Error>(())
        })
        .await;
        drop(slot);
    });
}

/// Why a connection was closed at a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// The request head did not arrive in time.
    HeaderTimeout,
    /// No request came on a keep-alive connection in time.
    IdleTimeout,
}

impl Expiry {
    fn as_str(self) -> &'static str {
        match self {
            Self::HeaderTimeout => "header_timeout",
            Self::IdleTimeout => "idle_timeout",
        }
    }
}

/// One connection's deadline, moved by its reads and its requests.
///
/// A connection is in one of three phases: waiting for a request's first byte (idle; the
/// keep-alive deadline runs), receiving a head (the header deadline runs from its first byte),
/// or serving requests (no deadline: the request timeout bounds a request). A new connection
/// starts in the head phase: it has the header timeout to send its first request.
#[derive(Debug)]
pub struct Watch {
    born: Instant,
    limits: ConnLimits,
    in_flight: AtomicU32,
    /// Set while a head is arriving: the first byte after an idle spell set it.
    head: AtomicBool,
    /// Milliseconds after `born`; `u64::MAX` while requests are in flight.
    deadline_ms: AtomicU64,
    /// Woken when the deadline moves earlier, so the driver re-arms its timer.
    moved: Notify,
}

impl Watch {
    /// A new connection's watch: its head is due within the header timeout.
    pub fn new(limits: ConnLimits) -> Self {
        Self::starting_at(Instant::now(), limits)
    }

    /// A watch whose connection opened at `born`.
    pub fn starting_at(born: Instant, limits: ConnLimits) -> Self {
        Self {
            born,
            limits,
            in_flight: AtomicU32::new(0),
            head: AtomicBool::new(true),
            deadline_ms: AtomicU64::new(ms(limits.header_read_timeout)),
            moved: Notify::new(),
        }
    }

    fn since_born(&self, now: Instant) -> u64 {
        ms(now.saturating_duration_since(self.born))
    }

    /// Bytes arrived at `now`. The first byte after an idle spell starts the header deadline.
    pub fn on_read(&self, now: Instant) {
        // Relaxed throughout: one connection's reads and requests run on its one task; the
        // driver only compares the deadline against the clock, and a stale read of it costs
        // one extra timer turn, never a wrong close (`expired` re-reads every field).
        if self.in_flight.load(Ordering::Relaxed) == 0 && !self.head.swap(true, Ordering::Relaxed) {
            let at = self.since_born(now).saturating_add(ms(self.limits.header_read_timeout));
            self.deadline_ms.store(at, Ordering::Relaxed);
            self.moved.notify_one();
        }
    }

    /// A request's head was read: no deadline while it is served.
    pub fn on_request(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head.store(false, Ordering::Relaxed);
        self.deadline_ms.store(u64::MAX, Ordering::Relaxed);
    }

    /// A request was answered (or abandoned) at `now`; the last one starts the idle deadline.
    pub fn on_response(&self, now: Instant) {
        if self.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            let at = self.since_born(now).saturating_add(ms(self.limits.keepalive_idle));
            self.deadline_ms.store(at, Ordering::Relaxed);
            self.moved.notify_one();
        }
    }

    /// When the driver should look again.
    pub fn deadline(&self) -> Instant {
        match self.deadline_ms.load(Ordering::Relaxed) {
            u64::MAX => self.born + Duration::from_secs(86_400 * 365),
            at => self.born + Duration::from_millis(at),
        }
    }

    /// Whether the connection is past its deadline at `now`, and which.
    pub fn expired(&self, now: Instant) -> Option<Expiry> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let at = self.deadline_ms.load(Ordering::Relaxed);
        if at == u64::MAX || self.since_born(now) < at {
            return None;
        }
        Some(if self.head.load(Ordering::Relaxed) { Expiry::HeaderTimeout } else { Expiry::IdleTimeout })
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX - 1)
}

/// The socket, telling its watch of reads, holding its connection permit (an upgraded WebSocket
/// keeps it until the socket closes) and the open-connections gauge.
struct WatchedIo {
    inner: Stream,
    watch: Arc<Watch>,
    _permit: OwnedSemaphorePermit,
    open: IntGauge,
}

/// A connection's bytes: plain TCP, or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// `$body` with `$io` bound to the stream inside, whichever it is.
macro_rules! on_stream {
    ($stream:expr, $io:ident => $body:expr) => {
        match $stream {
            Stream::Plain($io) => $body,
            Stream::Tls($io) => $body,
        }
    };
}

impl Drop for WatchedIo {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = on_stream!(&mut self.inner, io => Pin::new(io).poll_read(cx, buf));
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.watch.on_read(Instant::now());
        }
        polled
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        on_stream!(&mut self.inner, io => Pin::new(io).poll_write(cx, buf))
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        on_stream!(&mut self.inner, io => Pin::new(io).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        on_stream!(&self.inner, io => io.is_write_vectored())
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_stream!(&mut self.inner, io => Pin::new(io).poll_flush(cx))
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_stream!(&mut self.inner, io => Pin::new(io).poll_shutdown(cx))
    }
}

/// The tower service as hyper's, marking each request on the connection's watch.
#[derive(Clone)]
struct ConnService<S> {
    app: S,
    /// The message path's own service (public listener only).
    hot: Option<Arc<super::hot::HotPath>>,
    watch: Arc<Watch>,
    peer: std::net::SocketAddr,
}

/// The peer address of the connection a request came on, for the handlers that rate clients
/// by address (only those requests carry it: an extension costs an allocation per request).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub std::net::SocketAddr);

/// Whether a request's handler wants its [`Peer`].
fn wants_peer(path: &str) -> bool {
    path.ends_with("/directline/token")
}

/// Ends a request on the watch when its future completes or is dropped.
struct InFlight(Arc<Watch>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.on_response(Instant::now());
    }
}

impl<S> hyper::service::Service<http::Request<Incoming>> for ConnService<S>
where
    S: tower::Service<axum::extract::Request, Response = Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, mut req: http::Request<Incoming>) -> Self::Future {
        self.watch.on_request();
        // HTTP/2 carries the host as `:authority`; the handlers (stream URLs among them) read
        // `Host`.
        if req.version() == http::Version::HTTP_2
            && !req.headers().contains_key(http::header::HOST)
            && let Some(host) =
                req.uri().authority().and_then(|a| http::HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(http::header::HOST, host);
        }
        if wants_peer(req.uri().path()) {
            req.extensions_mut().insert(Peer(self.peer));
        }
        let guard = InFlight(self.watch.clone());
        if let Some(hot) = &self.hot
            && let Some(kind) = hot.takes(&req)
        {
            let hot = hot.clone();
            return Box::pin(async move {
                let res = hot.serve(req, kind).await;
                drop(guard);
                res
            });
        }
        let fut = tower::ServiceExt::oneshot(self.app.clone(), req.map(axum::body::Body::new));
        Box::pin(async move {
            let res = fut.await;
            drop(guard);
            res
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnLimits {
        ConnLimits {
            max_connections: 10,
            header_read_timeout: Duration::from_millis(10_000),
            keepalive_idle: Duration::from_millis(60_000),
            max_header_bytes: 16 * 1024,
        }
    }

    fn at(born: Instant, ms: u64) -> Instant {
        born + Duration::from_millis(ms)
    }

    #[test]
    fn a_new_connection_has_the_header_timeout_for_its_first_request() {
        let born = Instant::now();
        let w = Watch::starting_at(born, limits());
        w.on_read(at(born, 5_000)); // bytes of the head: the deadline stays at open + 10 s
        assert_eq!(w.expired(at(born, 9_999)), None);
        assert_eq!(w.expired(at(born, 10_000)), Some(Expiry::HeaderTimeout));
    }

    #[test]
    fn a_slow_head_after_an_idle_spell_gets_the_header_timeout_from_its_first_byte() {
        let born = Instant::now();
        let w = Watch::starting_at(born, limits());
        w.on_request();
        assert_eq!(w.expired(at(born, 1_000_000)), None, "no deadline while a request is served");
        w.on_response(at(born, 1_000));
        assert_eq!(w.deadline(), at(born, 61_000));
        assert_eq!(w.expired(at(born, 60_999)), None);
        w.on_read(at(born, 30_000)); // the next head starts: 10 s from here, not the idle 61 s
        w.on_read(at(born, 35_000)); // more bytes of the same head move nothing
        assert_eq!(w.deadline(), at(born, 40_000));
        assert_eq!(w.expired(at(born, 39_999)), None);
        assert_eq!(w.expired(at(born, 40_000)), Some(Expiry::HeaderTimeout));
    }

    #[test]
    fn an_idle_keepalive_connection_closes_after_the_idle_timeout() {
        let born = Instant::now();
        let w = Watch::starting_at(born, limits());
        w.on_request();
        w.on_response(at(born, 2_000));
        assert_eq!(w.expired(at(born, 61_999)), None);
        assert_eq!(w.expired(at(born, 62_000)), Some(Expiry::IdleTimeout));
    }

    #[test]
    fn pipelined_requests_keep_the_connection_busy_until_the_last_answer() {
        let born = Instant::now();
        let w = Watch::starting_at(born, limits());
        w.on_request();
        w.on_read(at(born, 10)); // a pipelined head arrives while the first is served
        w.on_request();
        w.on_response(at(born, 20));
        assert_eq!(w.expired(at(born, 1_000_000)), None);
        w.on_response(at(born, 30));
        assert_eq!(w.deadline(), at(born, 60_030));
        assert_eq!(w.expired(at(born, 60_030)), Some(Expiry::IdleTimeout));
    }
}
