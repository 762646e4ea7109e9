//! Request ids: a random per-process prefix and a counter (`3f9a1c2e-1a2b`), unique across
//! processes and restarts for correlation, at the cost of one atomic add. UUIDs cost a call to
//! the kernel's random source on every request (`crng_make_state` in the msg_sys profile of
//! `benches/load.sh`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderValue, Request};
use tower_http::request_id::{MakeRequestId, RequestId};

/// Makes request ids; cloning is shallow.
#[derive(Clone)]
pub struct MakeRequestCounter {
    prefix: Arc<str>,
    // Relaxed: only uniqueness matters, and fetch_add gives it.
    next: Arc<AtomicU64>,
}

impl Default for MakeRequestCounter {
    fn default() -> Self {
        let p: u32 = rand::random();
        Self { prefix: Arc::from(format!("{p:08x}")), next: Arc::new(AtomicU64::new(1)) }
    }
}

impl MakeRequestCounter {
    /// The next id.
    pub fn next(&self) -> HeaderValue {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // `{prefix}-{n:x}`, written by hand on the stack (`format!` allocated twice).
        let mut buf = [0u8; 8 + 1 + 16];
        let p = self.prefix.len().min(8);
        buf[..p].copy_from_slice(&self.prefix.as_bytes()[..p]);
        buf[p] = b'-';
        let digits = (64 - n.leading_zeros()).div_ceil(4).max(1) as usize;
        for i in 0..digits {
            buf[p + digits - i] = HEX[((n >> (4 * i)) & 0xf) as usize];
        }
        // Hex digits and a dash: always a valid header value.
        HeaderValue::from_bytes(&buf[..p + 1 + digits]).unwrap_or(HeaderValue::from_static("0"))
    }
}

impl MakeRequestId for MakeRequestCounter {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        Some(RequestId::new(self.next()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_prefixed() {
        let mut m = MakeRequestCounter::default();
        let r = Request::new(());
        let a = m.make_request_id(&r).unwrap();
        let b = m.make_request_id(&r).unwrap();
        assert_ne!(a.header_value(), b.header_value());
        assert!(a.header_value().to_str().unwrap().ends_with("-1"));
        let m = MakeRequestCounter { prefix: Arc::from("0000abcd"), next: Arc::new(AtomicU64::new(0)) };
        assert_eq!(m.next(), "0000abcd-0");
        m.next.store(0x1f, Ordering::Relaxed);
        assert_eq!(m.next(), "0000abcd-1f");
        m.next.store(u64::MAX, Ordering::Relaxed);
        assert_eq!(m.next(), "0000abcd-ffffffffffffffff");
    }
}
