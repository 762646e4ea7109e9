//! The durable billed-session ledger with group commit.
//!
//! One writer thread owns the writes: it takes every session waiting in its queue, records the
//! batch in one transaction (one fsync), then acknowledges each. While one batch is on disk the
//! next one gathers, so session starts never serialize on the disk.

use tokio::sync::{mpsc, oneshot};

use crate::store::{SessionRecord, SharedStore, StoreError};

/// Most sessions recorded in one transaction.
const MAX_BATCH: usize = 4096;

type Ack = oneshot::Sender<Result<(), String>>;

/// A handle to the ledger's writer thread; cloning is shallow.
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::UnboundedSender<(SessionRecord, Ack)>,
}

impl Ledger {
    /// Starts the writer thread over `store`. The thread ends when every handle is dropped.
    pub fn start(store: SharedStore) -> Result<Self, std::io::Error> {
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new().name("botgate-ledger".into()).spawn(move || run(store, rx))?;
        Ok(Self { tx })
    }

    /// Records a session; resolves once it is durable.
    pub async fn record(&self, rec: SessionRecord) -> Result<(), String> {
        let (ack, done) = oneshot::channel();
        self.tx.send((rec, ack)).map_err(|_| "the ledger is stopped".to_string())?;
        done.await.map_err(|_| "the ledger stopped before the session was recorded".to_string())?
    }
}

fn run(store: SharedStore, mut rx: mpsc::UnboundedReceiver<(SessionRecord, Ack)>) {
    let mut batch = Vec::with_capacity(64);
    let mut acks = Vec::with_capacity(64);
    while let Some((rec, ack)) = rx.blocking_recv() {
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
        let result = store.record_sessions(&batch).map_err(|e: StoreError| {
            tracing::error!(error = %e, sessions = batch.len(), "Recording billed sessions failed.");
            e.to_string()
        });
        for ack in acks.drain(..) {
            let _ = ack.send(result.clone());
        }
        batch.clear();
    }
}
