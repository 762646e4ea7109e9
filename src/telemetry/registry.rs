//! The Prometheus registry: handles registered at start-up, encoded on scrape.

use std::sync::Arc;

use prometheus::{Encoder, IntGauge, Registry, TextEncoder};

/// The process's metrics; cloning is shallow.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    extra: std::sync::RwLock<Vec<Box<dyn ScrapeWriter>>>,
}

/// Something that writes Prometheus text at scrape time (a collector over live atomics that
/// would be too costly to keep as prometheus-crate series).
pub trait ScrapeWriter: Send + Sync + 'static {
    /// Appends its families, in the text exposition format, to `out`.
    fn write(&self, out: &mut String);
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// An empty registry.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner { registry: Registry::new(), extra: std::sync::RwLock::new(Vec::new()) }),
        }
    }

    /// The prometheus registry, to register handles at start-up.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Registers an integer gauge; names are static so a failure is a programming error that
    /// start-up reports.
    pub fn gauge(&self, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
        let g = IntGauge::new(name, help)?;
        self.inner.registry.register(Box::new(g.clone()))?;
        Ok(g)
    }

    /// Adds a scrape-time writer. Called at start-up only; the lock is std because it is taken
    /// for writing once per writer and for reading once per scrape, never across an await.
    pub fn add_writer(&self, w: Box<dyn ScrapeWriter>) {
        self.inner.extra.write().unwrap_or_else(|p| p.into_inner()).push(w);
    }

    /// The whole exposition, text format 0.0.4.
    pub fn encode(&self) -> String {
        let mut buf = Vec::with_capacity(16 * 1024);
        let families = self.inner.registry.gather();
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
            tracing::error!(error = %e, "Encoding metrics failed.");
        }
        let mut out = String::from_utf8(buf).unwrap_or_default();
        for w in self.inner.extra.read().unwrap_or_else(|p| p.into_inner()).iter() {
            w.write(&mut out);
        }
        out
    }
}
