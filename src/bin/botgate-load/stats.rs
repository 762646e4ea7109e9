//! What the run measured: counters (atomics), HDR histograms of latencies, errors by kind, the
//! per-conversation billing expectation, and the once-a-second progress line.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::TopicKind;

/// Largest latency recorded, in microseconds (larger values are clamped to it).
const MAX_US: u64 = 120_000_000;

/// The run's measurements; shared by every task.
///
/// Counters are Relaxed: each is a plain monotonic count read on its own by the progress line
/// and, after every task joined, by the report.
pub struct Stats {
    conversations_started: AtomicU64,
    conversations_completed: AtomicU64,
    conversations_failed: AtomicU64,
    messages_ok: AtomicU64,
    http_requests: AtomicU64,
    ws_open: AtomicU64,
    ws_open_peak: AtomicU64,
    ws_opened: AtomicU64,
    keepalives_received: AtomicU64,
    /// Billed sessions the completed work implies: (certain, possible).
    billed_lo: AtomicU64,
    billed_hi: AtomicU64,
    errors_total: AtomicU64,
    // std mutexes: held for one record, never across an await.
    message_us: Mutex<Histogram<u64>>,
    /// The messages that began a billed session (user topic, every 100th of a conversation),
    /// and the others: the first wait for the ledger's durable commit.
    begins_us: Mutex<Histogram<u64>>,
    continues_us: Mutex<Histogram<u64>>,
    setup_us: Mutex<Histogram<u64>>,
    lateness_us: Mutex<Histogram<u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
}

fn histogram() -> Histogram<u64> {
    // 3 significant digits from 1 us to MAX_US; the bounds are constants, so this cannot fail.
    Histogram::new_with_bounds(1, MAX_US, 3).unwrap_or_else(|_| unreachable!())
}

fn quantile(h: &Mutex<Histogram<u64>>, q: f64) -> u64 {
    let h = h.lock().unwrap_or_else(|p| p.into_inner());
    if q >= 1.0 { h.max() } else { h.value_at_quantile(q) }
}

fn record(h: &Mutex<Histogram<u64>>, d: Duration) {
    let us = (d.as_micros() as u64).clamp(1, MAX_US);
    let mut h = h.lock().unwrap_or_else(|p| p.into_inner());
    let _ = h.record(us);
}

impl Stats {
    /// Empty measurements.
    pub fn new() -> Self {
        Self {
            conversations_started: AtomicU64::new(0),
            conversations_completed: AtomicU64::new(0),
            conversations_failed: AtomicU64::new(0),
            messages_ok: AtomicU64::new(0),
            http_requests: AtomicU64::new(0),
            ws_open: AtomicU64::new(0),
            ws_open_peak: AtomicU64::new(0),
            ws_opened: AtomicU64::new(0),
            keepalives_received: AtomicU64::new(0),
            billed_lo: AtomicU64::new(0),
            billed_hi: AtomicU64::new(0),
            errors_total: AtomicU64::new(0),
            message_us: Mutex::new(histogram()),
            begins_us: Mutex::new(histogram()),
            continues_us: Mutex::new(histogram()),
            setup_us: Mutex::new(histogram()),
            lateness_us: Mutex::new(histogram()),
            errors: Mutex::new(BTreeMap::new()),
        }
    }

    /// A conversation was started (its token was asked for).
    pub fn conversation_started(&self) {
        self.conversations_started.fetch_add(1, Ordering::Relaxed);
    }

    /// A conversation ended: `ok` messages answered, `unknown` messages whose fate is unknown
    /// (timeout, broken connection), `failed` whether it stopped on an error.
    pub fn conversation_ended(&self, topic: TopicKind, ok: u64, unknown: u64, failed: bool) {
        if failed {
            self.conversations_failed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.conversations_completed.fetch_add(1, Ordering::Relaxed);
        }
        if topic == TopicKind::User {
            self.billed_lo.fetch_add(ok.div_ceil(100), Ordering::Relaxed);
            self.billed_hi.fetch_add((ok + unknown).div_ceil(100), Ordering::Relaxed);
        }
    }

    /// One HTTP request was sent.
    pub fn http_request(&self) {
        self.http_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// A message's reply arrived `latency` after the message was due; `began_session`: the
    /// message began a billed session.
    pub fn message_ok(&self, latency: Duration, began_session: bool) {
        self.messages_ok.fetch_add(1, Ordering::Relaxed);
        record(&self.message_us, latency);
        record(if began_session { &self.begins_us } else { &self.continues_us }, latency);
    }

    /// A conversation was started (token and start answered) `latency` after it was due.
    pub fn setup_ok(&self, latency: Duration) {
        record(&self.setup_us, latency);
    }

    /// An open-loop send left `late` after its slot (the generator's own precision).
    pub fn send_lateness(&self, late: Duration) {
        record(&self.lateness_us, late);
    }

    /// An error, by kind (`"429 RateLimited"`, `"transport timeout"`, ...).
    pub fn error(&self, key: String) {
        self.errors_total.fetch_add(1, Ordering::Relaxed);
        *self.errors.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_default() += 1;
    }

    /// A WebSocket opened.
    pub fn ws_opened(&self) {
        self.ws_opened.fetch_add(1, Ordering::Relaxed);
        let now = self.ws_open.fetch_add(1, Ordering::Relaxed) + 1;
        self.ws_open_peak.fetch_max(now, Ordering::Relaxed);
    }

    /// A WebSocket closed.
    pub fn ws_closed(&self) {
        self.ws_open.fetch_sub(1, Ordering::Relaxed);
    }

    /// An empty keep-alive frame came from the server.
    pub fn keepalive_received(&self) {
        self.keepalives_received.fetch_add(1, Ordering::Relaxed);
    }

    /// Conversations started.
    pub fn conversations_started(&self) -> u64 {
        self.conversations_started.load(Ordering::Relaxed)
    }
    /// Messages answered.
    pub fn messages_ok(&self) -> u64 {
        self.messages_ok.load(Ordering::Relaxed)
    }
    /// HTTP requests sent.
    pub fn http_requests(&self) -> u64 {
        self.http_requests.load(Ordering::Relaxed)
    }
    /// Errors.
    pub fn errors_total(&self) -> u64 {
        self.errors_total.load(Ordering::Relaxed)
    }

    /// The billed sessions the schedule implies: (certain, possible).
    pub fn expected_billed(&self, topic: TopicKind) -> (u64, u64) {
        if topic == TopicKind::System {
            return (0, 0);
        }
        (self.billed_lo.load(Ordering::Relaxed), self.billed_hi.load(Ordering::Relaxed))
    }

    /// A quantile of the message latency, in microseconds (1.0: the max).
    pub fn message_quantile(&self, q: f64) -> u64 {
        quantile(&self.message_us, q)
    }

    /// A quantile of the latency of the messages that began a billed session (0 when none did).
    pub fn begins_quantile(&self, q: f64) -> u64 {
        quantile(&self.begins_us, q)
    }

    /// A quantile of the latency of the messages that began no billed session.
    pub fn continues_quantile(&self, q: f64) -> u64 {
        quantile(&self.continues_us, q)
    }

    /// A quantile of the open-loop send lateness, in microseconds.
    pub fn lateness_quantile(&self, q: f64) -> u64 {
        self.lateness_us.lock().unwrap_or_else(|p| p.into_inner()).value_at_quantile(q)
    }

    /// The final report (several lines).
    pub fn report(&self, elapsed: Duration) -> String {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let mut out = String::new();
        let started = self.conversations_started();
        let _ = writeln!(
            out,
            "run      {:.3} s: {} conversations started, {} completed, {} stopped on an error",
            secs,
            started,
            self.conversations_completed.load(Ordering::Relaxed),
            self.conversations_failed.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "through  {:.1} messages/s ({} answered), {:.1} HTTP requests/s ({}), {:.1} conversations/s",
            self.messages_ok() as f64 / secs,
            self.messages_ok(),
            self.http_requests() as f64 / secs,
            self.http_requests(),
            started as f64 / secs,
        );
        for (name, h) in [
            ("message", &self.message_us),
            ("begins", &self.begins_us),
            ("others", &self.continues_us),
            ("setup", &self.setup_us),
            ("late", &self.lateness_us),
        ] {
            let h = h.lock().unwrap_or_else(|p| p.into_inner());
            if h.is_empty() {
                continue;
            }
            let _ = writeln!(
                out,
                "latency  {name:<7} n={} p50={} p90={} p99={} p99.9={} max={} (us)",
                h.len(),
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.9),
                h.value_at_quantile(0.99),
                h.value_at_quantile(0.999),
                h.max()
            );
        }
        let opened = self.ws_opened.load(Ordering::Relaxed);
        if opened > 0 {
            let _ = writeln!(
                out,
                "ws       {} opened, peak {} open at once, {} server keep-alives received",
                opened,
                self.ws_open_peak.load(Ordering::Relaxed),
                self.keepalives_received.load(Ordering::Relaxed)
            );
        }
        let errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if errors.is_empty() {
            let _ = write!(out, "errors   none");
        } else {
            let _ = write!(out, "errors   {}:", self.errors_total());
            for (k, n) in errors.iter() {
                let _ = write!(out, " [{k}]={n}");
            }
        }
        out
    }
}

/// Writes a progress line to stderr once a second until `done`.
pub async fn progress(stats: Arc<Stats>, done: Arc<AtomicBool>, start: Instant, pid: Option<u32>, tty: bool) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = (0u64, 0u64);
    let mut last_cpu = pid.map(crate::probe::ServerSample::take);
    while !done.load(Ordering::Relaxed) {
        tick.tick().await;
        if done.load(Ordering::Relaxed) {
            break;
        }
        let msgs = stats.messages_ok();
        let reqs = stats.http_requests();
        let mut line = format!(
            "[{:>6.1}s] conv {} msgs {} ({}/s) reqs/s {} errors {} ws open {}",
            start.elapsed().as_secs_f64(),
            stats.conversations_started(),
            msgs,
            msgs - last.0,
            reqs - last.1,
            stats.errors_total(),
            stats.ws_open.load(Ordering::Relaxed),
        );
        if let (Some(p), Some(prev)) = (pid, last_cpu) {
            let now = crate::probe::ServerSample::take(p);
            let _ = write!(
                line,
                " server cpu {:.0}% rss {} MiB",
                now.cpu_us.saturating_sub(prev.cpu_us) as f64 / 1e4,
                now.rss_kib / 1024
            );
            last_cpu = Some(now);
        }
        last = (msgs, reqs);
        let mut err = std::io::stderr().lock();
        let _ = if tty { write!(err, "\r{line}\x1b[K") } else { writeln!(err, "{line}") };
        let _ = err.flush();
    }
    if tty {
        let _ = writeln!(std::io::stderr());
    }
}
