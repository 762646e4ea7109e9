//! The durable billed-session ledger with group commit.
//!
//! One writer thread owns the writes: it takes every session waiting in its queue, records the
//! batch in one transaction (one fsync), then acknowledges each. While one batch is on disk the
//! next one gathers, so session starts never serialize on the disk.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::store::{SessionRecord, SharedStore, StoreError};

/// Most sessions recorded in one transaction.
const MAX_BATCH: usize = 4096;

type Ack = oneshot::Sender<Result<(), String>>;

/// A handle to the ledger's writer thread; cloning is shallow.
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::Sender<(SessionRecord, Ack)>,
}

impl Ledger {
    /// Starts the writer thread over `store`. With a `spool`, a batch the store refuses (Redis
    /// unreachable) is written there instead, acknowledged, and replayed to the store later
    /// (recording is idempotent by session id, so a replay never counts twice). The thread ends
    /// when every handle is dropped.
    pub fn start(
        store: SharedStore,
        spool: Option<SharedStore>,
        spooled: Arc<AtomicU64>,
    ) -> Result<Self, std::io::Error> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("botgate-ledger".into())
            .spawn(move || run(store, spool, spooled, rx))?;
        Ok(Self { tx })
    }

    /// Records a session; resolves once it is durable.
    pub async fn record(&self, rec: SessionRecord) -> Result<(), String> {
        let (ack, done) = oneshot::channel();
        self.tx.send((rec, ack)).map_err(|_| "the ledger is stopped".to_string())?;
        done.await.map_err(|_| "the ledger stopped before the session was recorded".to_string())?
    }
}

fn run(
    store: SharedStore,
    spool: Option<SharedStore>,
    spooled: Arc<AtomicU64>,
    rx: mpsc::Receiver<(SessionRecord, Ack)>,
) {
    let mut batch = Vec::with_capacity(64);
    let mut acks = Vec::with_capacity(64);
    loop {
        let (rec, ack) = match &spool {
            None => match rx.recv() {
                Ok(item) => item,
                Err(_) => return,
            },
            Some(spool) => {
                // With a spool, wake at least once a second to replay what it holds.
                let item = rx.recv_timeout(std::time::Duration::from_secs(1));
                replay(&*store, &**spool);
                match item {
                    Ok(item) => item,
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        };
        batch.push(rec);
        acks.push(ack);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok((rec, ack)) => {
                    batch.push(rec);
                    acks.push(ack);
                }
                Err(_) => break,
            }
        }
        let result = store.record_sessions(&batch).or_else(|e: StoreError| match &spool {
            Some(spool) => {
                tracing::warn!(error = %e, sessions = batch.len(), "The store refused billed sessions; spooling them locally.");
                spooled.fetch_add(batch.len() as u64, Ordering::Relaxed);
                spool.record_sessions(&batch).map_err(|e| e.to_string())
            }
            None => {
                tracing::error!(error = %e, sessions = batch.len(), "Recording billed sessions failed.");
                Err(e.to_string())
            }
        });
        for ack in acks.drain(..) {
            let _ = ack.send(result.clone());
        }
        batch.clear();
    }
}

/// Moves spooled sessions to the store, oldest first; stops at the first failure.
fn replay(store: &dyn crate::store::Store, spool: &dyn crate::store::Store) {
    let Ok(pending) = spool.spooled(512) else { return };
    if pending.is_empty() {
        return;
    }
    match store.record_sessions(&pending) {
        Ok(()) => {
            let ids: Vec<String> = pending.iter().map(|s| s.id.clone()).collect();
            if let Err(e) = spool.forget(&ids) {
                tracing::error!(error = %e, "Clearing replayed sessions from the spool failed; they will be replayed again (idempotently).");
            } else {
                tracing::info!(sessions = ids.len(), "Replayed spooled billed sessions to the store.");
            }
        }
        Err(e) => tracing::debug!(error = %e, "The store is still unreachable; the spool waits."),
    }
}
