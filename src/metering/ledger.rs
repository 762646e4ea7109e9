//! The durable billed-session ledger with group commit.
//!
//! One writer thread owns the writes: it takes every session waiting in its queue, records the
//! batch in one transaction (one fsync), then acknowledges each. While one batch is on disk the
//! next one gathers, so session starts never serialize on the disk. While the ledger is busy, a
//! linger holds a batch open a little longer, so several nodes on one Redis write fewer, larger
//! batches; under light load nothing waits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use std::sync::mpsc;
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts};
use tokio::sync::oneshot;

use super::Refund;
use super::pool::{MonthIndex, month_of};
use crate::store::outbox::CapacityWatch;
use crate::store::{SessionRecord, SharedStore, Store, StoreError};

/// Most sessions recorded in one transaction.
const MAX_BATCH: usize = 4096;

/// Batches the spool replays per pass.
const REPLAY_BATCHES: usize = 64;

type Ack = oneshot::Sender<Result<(), String>>;

/// A session waiting to be recorded, with when it was queued (the linger counts from the first
/// of a batch), and its fate: the writer marks it recorded (counting it) once the batch is
/// durable, and drops it (undoing the session) otherwise, whether or not anyone still waits for
/// the answer.
type Pending = (SessionRecord, Instant, Ack, Option<Refund>);

/// The capacity thresholds of a tenant's month, as the writer hands them to the store with each
/// batch (see [`crate::store::Store::record_watched`]).
#[derive(Clone)]
pub struct Watch(pub Arc<WatchFn>);

/// What a [`Watch`] asks: the thresholds of a tenant's month, if the tenant is known.
pub type WatchFn = dyn Fn(&str, MonthIndex) -> Option<CapacityWatch> + Send + Sync;

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watch(..)")
    }
}

impl Watch {
    /// The watches of each tenant and month in `batch`.
    fn of(&self, batch: &[SessionRecord]) -> Vec<CapacityWatch> {
        let mut seen: Vec<(&str, MonthIndex)> = Vec::new();
        for s in batch {
            let k = (s.tenant.as_str(), month_of(s.began_ms));
            if !seen.contains(&k) {
                seen.push(k);
            }
        }
        seen.into_iter().filter_map(|(t, m)| (self.0)(t, m)).collect()
    }
}

/// Records `batch` in `store` with the capacity watches of `watch`; events raised carry the
/// latest start in the batch as their time.
fn record(
    store: &dyn Store,
    watch: Option<&Watch>,
    batch_id: &str,
    batch: &[SessionRecord],
) -> Result<(), StoreError> {
    let watches = watch.map(|w| w.of(batch)).unwrap_or_default();
    let now = batch.iter().map(|s| s.began_ms).max().unwrap_or(0);
    store.record_watched(batch_id, batch, &watches, now)
}

/// How the writer batches.
#[derive(Debug, Clone)]
pub struct LedgerOptions {
    /// Prefix of batch ids: this node's id, its start time and a random word, so ids never
    /// repeat across nodes or restarts.
    pub batch_prefix: String,
    /// How long the first session of a batch may wait for more before the batch is written,
    /// while the ledger is busy. Zero writes as soon as the previous batch is durable (plain
    /// group commit).
    pub linger: Duration,
    /// The ledger is busy, and lingers, after a write of at least this many sessions: under
    /// light load a session never waits for others that are not coming.
    pub linger_after: usize,
    /// The capacity thresholds the store judges each batch against; none: no capacity events.
    pub watch: Option<Watch>,
    /// Where the writer records its latencies.
    pub stats: LedgerStats,
}

/// What the writer measures, for `/metrics`: each batch's write, its size, and each session's
/// wait from queueing to its answer (what a message that begins a session waits in the ledger).
/// Observed on the writer thread, a few atomic adds per batch and one per session.
#[derive(Clone)]
pub struct LedgerStats {
    /// `botgate_ledger_commit_seconds`: one batch written to the store (or its spool).
    pub commit: Histogram,
    /// `botgate_ledger_batch_sessions`: sessions per batch.
    pub batch: Histogram,
    /// `botgate_ledger_session_wait_seconds`: a session's queueing to its batch's answer.
    pub wait: Histogram,
}

impl std::fmt::Debug for LedgerStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LedgerStats(..)")
    }
}

impl Default for LedgerStats {
    fn default() -> Self {
        const SECONDS: [f64; 16] = [
            0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
            1.0, 2.5,
        ];
        let seconds = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(SECONDS.to_vec()))
                .expect("static histogram options")
        };
        Self {
            commit: seconds(
                "botgate_ledger_commit_seconds",
                "Time to write one batch of billed sessions durably (store or spool).",
            ),
            batch: Histogram::with_opts(
                HistogramOpts::new("botgate_ledger_batch_sessions", "Billed sessions per ledger batch.")
                    .buckets(prometheus::exponential_buckets(1.0, 2.0, 13).expect("static buckets")),
            )
            .expect("static histogram options"),
            wait: seconds(
                "botgate_ledger_session_wait_seconds",
                "Time from a billed session's queueing at the ledger to its batch's answer.",
            ),
        }
    }
}

impl LedgerStats {
    /// Registers the three histograms.
    pub fn register(&self, registry: &prometheus::Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.commit.clone()))?;
        registry.register(Box::new(self.batch.clone()))?;
        registry.register(Box::new(self.wait.clone()))
    }
}

/// A handle to the ledger's writer thread; cloning is shallow.
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::Sender<Pending>,
}

impl Ledger {
    /// Starts the writer thread over `store`. With a `spool`, a batch the store refuses (Redis
    /// unreachable) is written there instead, acknowledged, and replayed to the store later,
    /// whole and under its batch id (recording is idempotent by batch id, so a replay never
    /// counts twice). The thread ends when every handle is dropped.
    pub fn start(
        store: SharedStore,
        spool: Option<SharedStore>,
        spooled: Arc<AtomicU64>,
        options: LedgerOptions,
    ) -> Result<Self, std::io::Error> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("botgate-ledger".into())
            .spawn(move || run(store, spool, spooled, options, rx))?;
        Ok(Self { tx })
    }

    /// Records a session; resolves once it is durable. If it cannot be recorded, `refund` undoes
    /// it, also when this future is dropped before the answer.
    pub async fn record(&self, rec: SessionRecord, refund: Option<Refund>) -> Result<(), String> {
        let (ack, done) = oneshot::channel();
        // A send to a stopped writer hands the item back inside the error, whose drop refunds.
        self.tx.send((rec, Instant::now(), ack, refund)).map_err(|_| "the ledger is stopped".to_string())?;
        done.await.map_err(|_| "the ledger stopped before the session was recorded".to_string())?
    }
}

fn run(
    store: SharedStore,
    spool: Option<SharedStore>,
    spooled: Arc<AtomicU64>,
    options: LedgerOptions,
    rx: mpsc::Receiver<Pending>,
) {
    let stats = options.stats.clone();
    let mut batch = Vec::with_capacity(64);
    let mut acks: Vec<(Ack, Instant)> = Vec::with_capacity(64);
    let mut refunds: Vec<Option<Refund>> = Vec::with_capacity(64);
    let mut seq: u64 = 0;
    let mut replayed = Instant::now();
    let mut last_batch = 0usize;
    loop {
        let (rec, queued, ack, refund) = match &spool {
            None => match rx.recv() {
                Ok(item) => item,
                Err(_) => return,
            },
            Some(spool) => {
                // With a spool, replay what it holds about once a second.
                let item = rx.recv_timeout(Duration::from_secs(1));
                if replayed.elapsed() >= Duration::from_secs(1) {
                    replay(&*store, &**spool, options.watch.as_ref());
                    replayed = Instant::now();
                }
                match item {
                    Ok(item) => item,
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        };
        batch.push(rec);
        acks.push((ack, queued));
        refunds.push(refund);
        let busy = last_batch >= options.linger_after;
        let deadline = if busy { queued + options.linger } else { queued };
        while batch.len() < MAX_BATCH {
            let next = match rx.try_recv() {
                Ok(item) => Some(item),
                Err(mpsc::TryRecvError::Disconnected) => None,
                Err(mpsc::TryRecvError::Empty) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() { None } else { rx.recv_timeout(left).ok() }
                }
            };
            let Some((rec, queued, ack, refund)) = next else { break };
            batch.push(rec);
            acks.push((ack, queued));
            refunds.push(refund);
        }
        seq += 1;
        let batch_id = format!("{}.{seq}", options.batch_prefix);
        let writing = Instant::now();
        let result = record(&*store, options.watch.as_ref(), &batch_id, &batch).or_else(|e: StoreError| match &spool {
            Some(spool) => {
                tracing::warn!(error = %e, sessions = batch.len(), "The store refused billed sessions; spooling them locally.");
                spooled.fetch_add(batch.len() as u64, Ordering::Relaxed);
                spool.record_sessions(&batch_id, &batch).map_err(|e| e.to_string())
            }
            None => {
                tracing::error!(error = %e, sessions = batch.len(), "Recording billed sessions failed.");
                Err(e.to_string())
            }
        });
        // Count (or undo) every session before any waiter hears the answer: a recorded session is
        // in the metrics when its message is answered, a refused one's unit back in the pool
        // when its 503 is sent.
        if result.is_ok() {
            refunds.drain(..).flatten().for_each(Refund::recorded);
        } else {
            refunds.clear();
        }
        let answered = Instant::now();
        stats.commit.observe(answered.duration_since(writing).as_secs_f64());
        stats.batch.observe(batch.len() as f64);
        for (ack, queued) in acks.drain(..) {
            stats.wait.observe(answered.duration_since(queued).as_secs_f64());
            let _ = ack.send(result.clone());
        }
        last_batch = batch.len();
        batch.clear();
    }
}

/// Moves spooled batches to the store, oldest first, each whole under its own id; stops at the
/// first failure.
fn replay(store: &dyn Store, spool: &dyn Store, watch: Option<&Watch>) {
    let Ok(pending) = spool.spooled(REPLAY_BATCHES) else { return };
    let mut done = Vec::new();
    let mut sessions = 0;
    for b in &pending {
        match record(store, watch, &b.id, &b.sessions) {
            Ok(()) => {
                done.push(b.id.clone());
                sessions += b.sessions.len();
            }
            Err(e) => {
                tracing::debug!(error = %e, "The store is still unreachable; the spool waits.");
                break;
            }
        }
    }
    if done.is_empty() {
        return;
    }
    if let Err(e) = spool.forget(&done) {
        tracing::error!(error = %e, "Clearing replayed batches from the spool failed; they will be replayed again (idempotently).");
    } else {
        tracing::info!(batches = done.len(), sessions, "Replayed spooled billed sessions to the store.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;

    fn rec(id: &str) -> SessionRecord {
        SessionRecord {
            id: id.into(),
            tenant: "t".into(),
            bot: "b".into(),
            began_ms: 1,
            overage: false,
            node: "n1".into(),
        }
    }

    /// The batches the store holds, by id, with their sizes (the SQLite ledger keeps each
    /// session's batch id, and `spooled` reads them back grouped).
    fn batches(store: &SqliteStore) -> Vec<(String, usize)> {
        use crate::store::Store;
        store.spooled(1000).unwrap().into_iter().map(|b| (b.id, b.sessions.len())).collect()
    }

    #[tokio::test]
    async fn a_linger_gathers_sessions_that_arrive_within_it_into_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let options = LedgerOptions {
            batch_prefix: "n1.7".into(),
            linger: Duration::from_millis(500),
            linger_after: 0,
            watch: None,
            stats: LedgerStats::default(),
        };
        let ledger = Ledger::start(store.clone(), None, Arc::default(), options).unwrap();
        // Ten sessions queued one after another, each in its own task: with a 500 ms linger the
        // first waits for the other nine (queued within microseconds), and all ten are one batch.
        let tasks: Vec<_> = (0..10)
            .map(|i| {
                let ledger = ledger.clone();
                tokio::spawn(async move { ledger.record(rec(&format!("s{i}")), None).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(batches(&store), [("n1.7.1".to_string(), 10)]);
        // The next session is the next batch.
        ledger.record(rec("s10"), None).await.unwrap();
        assert_eq!(batches(&store), [("n1.7.1".to_string(), 10), ("n1.7.2".to_string(), 1)]);
    }

    #[tokio::test]
    async fn without_a_linger_a_lone_session_is_written_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let options = LedgerOptions {
            batch_prefix: "n1.7".into(),
            linger: Duration::ZERO,
            linger_after: 0,
            watch: None,
            stats: LedgerStats::default(),
        };
        let ledger = Ledger::start(store.clone(), None, Arc::default(), options).unwrap();
        for i in 0..3 {
            ledger.record(rec(&format!("s{i}")), None).await.unwrap();
        }
        let ids: Vec<String> = batches(&store).into_iter().map(|b| b.0).collect();
        assert_eq!(ids, ["n1.7.1", "n1.7.2", "n1.7.3"]);
    }

    #[tokio::test]
    async fn the_linger_waits_only_after_a_busy_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
        // A long linger that applies only after a write of at least 5 sessions.
        let options = LedgerOptions {
            batch_prefix: "n1.7".into(),
            linger: Duration::from_secs(600),
            linger_after: 5,
            watch: None,
            stats: LedgerStats::default(),
        };
        let ledger = Ledger::start(store.clone(), None, Arc::default(), options).unwrap();
        // Not busy: lone sessions are written at once, not after 600 s.
        let three = async {
            for i in 0..3 {
                ledger.record(rec(&format!("s{i}")), None).await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(30), three).await.expect("a quiet ledger does not linger");
        let sizes: Vec<usize> = batches(&store).into_iter().map(|b| b.1).collect();
        assert_eq!(sizes, [1, 1, 1]);
    }
}
