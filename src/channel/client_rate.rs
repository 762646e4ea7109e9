//! An optional rate of open-bot tokens per client address: the website channel hands a token to
//! anyone, so without it one client can mint conversations as fast as it can ask.
//!
//! The client is the connection's peer, or, when the peer is a configured trusted proxy, the
//! rightmost `X-Forwarded-For` address that is not one (what a proxy appends cannot be forged
//! by the client; what the client wrote to the left of it can).

use std::net::IpAddr;

use dashmap::DashMap;
use http::{HeaderMap, StatusCode};

use crate::clock::Millis;
use crate::error::ApiError;
use crate::metering::counters::RateLimit;
use crate::outbound::Network;

/// Clients tracked at most before the map is cleared (a client loses at most the rest of one
/// minute's count; the map never grows with an address flood).
const MAX_TRACKED_CLIENTS: usize = 100_000;

/// Tokens per client address and minute.
pub struct ClientRate {
    per_minute: u32,
    trusted: Vec<Network>,
    clients: DashMap<IpAddr, RateLimit>,
}

impl ClientRate {
    /// `per_minute` tokens per client, trusting `X-Forwarded-For` from `trusted` peers only.
    pub fn new(per_minute: u32, trusted: Vec<Network>) -> Self {
        Self { per_minute, trusted, clients: DashMap::new() }
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(ip))
    }

    /// The client's address for a request from `peer` with `headers`.
    pub fn client_of(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusted(peer) {
            return peer;
        }
        let mut client = peer;
        for value in headers.get_all("x-forwarded-for").iter().rev() {
            let Ok(value) = value.to_str() else { return client };
            for hop in value.rsplit(',') {
                match hop.trim().parse::<IpAddr>() {
                    Ok(ip) if self.trusted(ip) => client = ip,
                    Ok(ip) => return ip,
                    Err(_) => return client,
                }
            }
        }
        client
    }

    /// Takes one token for the client of `peer`, or answers 429 `RateLimited`.
    pub fn take(&self, peer: IpAddr, headers: &HeaderMap, now: Millis) -> Result<(), ApiError> {
        let client = self.client_of(peer, headers);
        if self.clients.len() >= MAX_TRACKED_CLIENTS {
            self.clients.clear();
        }
        let limit = self.clients.entry(client).or_insert_with(|| RateLimit::new(self.per_minute));
        limit.take(now).map_err(|retry| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "RateLimited",
                format!("At most {} conversations a minute may start from one address. Try again in {retry} seconds.", self.per_minute),
            )
            .with_retry_after(retry)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_addresses_count_only_from_trusted_proxies() {
        let r = ClientRate::new(1, vec![Network::parse("10.0.0.0/8").unwrap()]);
        // An untrusted peer's header is ignored: it could say anything.
        assert_eq!(r.client_of(ip("203.0.113.9"), &headers(&["198.51.100.1"])), ip("203.0.113.9"));
        // Through a trusted proxy: the address it appended.
        assert_eq!(r.client_of(ip("10.0.0.2"), &headers(&["198.51.100.1"])), ip("198.51.100.1"));
        // A client-written prefix is skipped: the rightmost untrusted hop counts.
        assert_eq!(
            r.client_of(ip("10.0.0.2"), &headers(&["1.1.1.1, 198.51.100.1, 10.0.0.3"])),
            ip("198.51.100.1")
        );
        assert_eq!(r.client_of(ip("10.0.0.2"), &headers(&["1.1.1.1", "198.51.100.1"])), ip("198.51.100.1"));
        // Garbage stops the walk at the last trusted hop.
        assert_eq!(r.client_of(ip("10.0.0.2"), &headers(&["nonsense"])), ip("10.0.0.2"));
        assert_eq!(r.client_of(ip("10.0.0.2"), &headers(&[])), ip("10.0.0.2"));
    }

    #[test]
    fn each_client_has_its_own_count() {
        let r = ClientRate::new(2, vec![]);
        let h = HeaderMap::new();
        assert!(r.take(ip("192.0.2.1"), &h, 0).is_ok());
        assert!(r.take(ip("192.0.2.1"), &h, 0).is_ok());
        assert_eq!(r.take(ip("192.0.2.1"), &h, 0).unwrap_err().code, "RateLimited");
        assert!(r.take(ip("192.0.2.2"), &h, 0).is_ok());
        assert!(r.take(ip("192.0.2.1"), &h, 60_000).is_ok(), "the next minute");
    }
}
