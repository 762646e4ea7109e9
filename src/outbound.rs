//! Every call the gateway makes out (upstream bots, topic flows): one HTTP client and one policy.
//!
//! The policy decides by address, at resolution time, so a name that resolves into a denied
//! network (or is re-pointed there later) is refused before any packet leaves: a bot's author
//! cannot use the gateway to reach its loopback services, the cloud metadata address or the
//! private network, nor tell closed, silent and open ports apart. Redirects are never followed
//! (a 3xx is a failed call), and answers are read up to a size cap.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioExecutor;

/// An IP network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    /// Parses `10.1.0.0/16`, `fd00::/8`, or a bare address (the whole prefix).
    pub fn parse(s: &str) -> Option<Self> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (s.parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Self { addr, prefix })
    }

    /// Whether `ip` is in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Where outbound calls may go.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Loopback addresses (127.0.0.0/8, ::1, `localhost`).
    pub allow_loopback: bool,
    /// Private networks: 10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7.
    pub allow_private: bool,
    /// Networks allowed whatever the rest says (a bot cluster's subnet, say).
    pub allowed: Vec<Network>,
}

/// Why an address is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// Loopback, and the policy does not allow it.
    Loopback,
    /// A private network, and the policy does not allow them.
    Private,
    /// Link-local (the cloud metadata address among them), unspecified, multicast, broadcast or
    /// reserved: never a bot.
    Special,
}

impl Denied {
    /// The sentence for an author.
    pub fn explain(self) -> &'static str {
        match self {
            Self::Loopback => {
                "it is a loopback address, which the gateway's outbound policy denies (outbound.allow_loopback)"
            }
            Self::Private => {
                "it is in a private network, which the gateway's outbound policy denies \
                 (outbound.allow_private_networks, outbound.allowed_networks)"
            }
            Self::Special => {
                "it is a link-local, metadata, multicast or reserved address, which the gateway never calls"
            }
        }
    }
}

impl Policy {
    /// The policy of `[outbound]`.
    pub fn from_config(c: &crate::config::OutboundConfig) -> Self {
        Self {
            allow_loopback: c.allow_loopback,
            allow_private: c.allow_private_networks,
            allowed: c.allowed_networks.iter().filter_map(|n| Network::parse(n)).collect(),
        }
    }

    /// Whether a call may go to `ip`.
    pub fn check(&self, ip: IpAddr) -> Result<(), Denied> {
        let ip = canonical(ip);
        if self.allowed.iter().any(|n| n.contains(ip)) {
            return Ok(());
        }
        match classify(ip) {
            Some(Denied::Loopback) if self.allow_loopback => Ok(()),
            Some(Denied::Private) if self.allow_private => Ok(()),
            Some(d) => Err(d),
            None => Ok(()),
        }
    }

    /// Checks what can be checked of a URL without resolving it: an `http://` URL whose host, if
    /// an address or `localhost`, is allowed. Names are checked again at every resolution.
    pub fn check_url(&self, url: &str) -> Result<(), String> {
        let uri: http::Uri = url.parse().map_err(|_| "it is not a valid URL".to_string())?;
        if uri.scheme_str() != Some("http") {
            return Err(
                "the gateway calls out over http:// only (reach https:// services through an egress proxy)"
                    .into(),
            );
        }
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err("it must not carry credentials".into());
        }
        let host = uri.host().ok_or_else(|| "it has no host".to_string())?;
        match literal_ip(host) {
            Some(ip) => self.check(ip).map_err(|d| d.explain().to_string()),
            None if is_localhost(host) => {
                self.check(Ipv4Addr::LOCALHOST.into()).map_err(|d| d.explain().into())
            }
            None => Ok(()),
        }
    }
}

/// The host of a URI as an address, if it is one (`[::1]` included).
pub fn literal_ip(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

fn is_localhost(host: &str) -> bool {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    h == "localhost" || h.ends_with(".localhost")
}

/// An IPv4 address mapped or translated into IPv6 is judged as the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            // 64:ff9b::/96, the NAT64 well-known prefix.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

fn classify(ip: IpAddr) -> Option<Denied> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<Denied> {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        Some(Denied::Loopback)
    } else if ip.is_private() || (a == 100 && (64..128).contains(&b)) {
        Some(Denied::Private)
    } else if ip.is_link_local()
        || ip.is_unspecified()
        || a == 0
        || ip.is_multicast()
        || ip.is_broadcast()
        || a >= 240
    {
        Some(Denied::Special)
    } else {
        None
    }
}

fn classify_v6(ip: Ipv6Addr) -> Option<Denied> {
    let first = ip.segments()[0];
    if ip.is_loopback() {
        Some(Denied::Loopback)
    } else if first & 0xfe00 == 0xfc00 {
        Some(Denied::Private) // unique local, fc00::/7 (fd00:ec2::254, a metadata address, is here)
    } else if ip.is_unspecified() || ip.is_multicast() || first & 0xffc0 == 0xfe80 {
        Some(Denied::Special) // link-local fe80::/10
    } else {
        None
    }
}

/// The resolver of the outbound client: the system's, keeping only the addresses the policy
/// allows. A name with none left fails as a connection error, before any connection is tried.
#[derive(Clone)]
pub struct PolicyResolver {
    policy: Arc<Policy>,
}

impl PolicyResolver {
    /// A resolver enforcing `policy`.
    pub fn new(policy: Arc<Policy>) -> Self {
        Self { policy }
    }
}

impl tower::Service<Name> for PolicyResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> = if is_localhost(&host) {
                vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))]
            } else {
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect()
            };
            let allowed: Vec<SocketAddr> =
                found.into_iter().filter(|a| policy.check(a.ip()).is_ok()).collect();
            if allowed.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("`{host}` resolves only to addresses the outbound policy denies"),
                ));
            }
            Ok(allowed.into_iter())
        })
    }
}

/// Why an outbound call failed (the caller bounds it in time and judges the status).
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The policy refused the address, in the URL or at resolution.
    #[error("the outbound policy refuses it: {0}")]
    Refused(String),
    /// The answer was longer than `outbound.max_response_bytes`.
    #[error("the answer is longer than {0} bytes")]
    TooLarge(usize),
    /// The request could not be made, connected or read.
    #[error("{0}")]
    Failed(String),
}

/// The pooled HTTP client of every outbound call, under the policy: no redirects followed, answers
/// read up to a cap. Cloning is shallow (the pool is shared).
#[derive(Clone)]
pub struct OutboundClient {
    client: Client<HttpConnector<PolicyResolver>, Full<Bytes>>,
    policy: Arc<Policy>,
    max_answer_bytes: usize,
}

impl OutboundClient {
    /// A client connecting within `connect_timeout`, only where `policy` allows, reading at most
    /// `max_answer_bytes` of an answer.
    pub fn new(connect_timeout: Duration, policy: Policy, max_answer_bytes: usize) -> Self {
        let policy = Arc::new(policy);
        let mut connector = HttpConnector::new_with_resolver(PolicyResolver::new(policy.clone()));
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build(connector);
        Self { client, policy, max_answer_bytes }
    }

    /// The policy this client calls under.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Sends `req` and reads the whole answer (up to the cap). Any status is returned: a 3xx is
    /// not followed, and the caller decides what a non-success means. Not bounded in time: the
    /// caller wraps it in its own timeout.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), CallError> {
        self.send_keeping_headers(req).await.map(|(status, _, body)| (status, body))
    }

    /// [`send`](Self::send), keeping the answer's headers (for callers that cache by them).
    pub async fn send_keeping_headers(
        &self,
        req: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), CallError> {
        // An address in the URL is not resolved, so it is judged here; names are judged by the
        // resolver, at every connection.
        if let Some(ip) = req.uri().host().and_then(literal_ip)
            && let Err(denied) = self.policy.check(ip)
        {
            return Err(CallError::Refused(denied.explain().to_string()));
        }
        let res = self.client.request(req).await.map_err(|e| {
            if has_source(&e, |io: &io::Error| io.kind() == io::ErrorKind::PermissionDenied) {
                CallError::Refused(error_chain(&e))
            } else {
                CallError::Failed(error_chain(&e))
            }
        })?;
        let (parts, body) = res.into_parts();
        let bytes = http_body_util::Limited::new(body, self.max_answer_bytes)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    CallError::TooLarge(self.max_answer_bytes)
                } else {
                    CallError::Failed(e.to_string())
                }
            })?
            .to_bytes();
        Ok((parts.status, parts.headers, bytes))
    }
}

/// Whether an error or one of its sources is an `E` for which `f` holds.
fn has_source<E: std::error::Error + 'static>(
    e: &(dyn std::error::Error + 'static),
    f: impl Fn(&E) -> bool,
) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<E>().is_some_and(&f) {
            return true;
        }
        cause = c.source();
    }
    false
}

/// An error and its sources, for the log (the client's own message alone is often just
/// "client error (Connect)").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_default_policy_denies_loopback_private_and_special_networks() {
        let p = Policy::default();
        for (addr, denied) in [
            ("127.0.0.1", Denied::Loopback),
            ("127.8.9.10", Denied::Loopback),
            ("::1", Denied::Loopback),
            ("::ffff:127.0.0.1", Denied::Loopback),
            ("10.0.0.5", Denied::Private),
            ("172.16.0.1", Denied::Private),
            ("172.31.255.255", Denied::Private),
            ("192.168.1.1", Denied::Private),
            ("100.100.100.200", Denied::Private),
            ("fd00:ec2::254", Denied::Private),
            ("169.254.169.254", Denied::Special),
            ("::ffff:169.254.169.254", Denied::Special),
            ("64:ff9b::a9fe:a9fe", Denied::Special),
            ("fe80::1", Denied::Special),
            ("0.0.0.0", Denied::Special),
            ("::", Denied::Special),
            ("224.0.0.1", Denied::Special),
            ("255.255.255.255", Denied::Special),
            ("240.0.0.1", Denied::Special),
        ] {
            assert_eq!(p.check(ip(addr)), Err(denied), "{addr}");
        }
        for addr in ["8.8.8.8", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "192.0.2.10"] {
            assert_eq!(p.check(ip(addr)), Ok(()), "{addr}");
        }
    }

    #[test]
    fn allowances_open_only_what_they_name() {
        let p = Policy { allow_loopback: true, ..Policy::default() };
        assert_eq!(p.check(ip("127.0.0.1")), Ok(()));
        assert_eq!(p.check(ip("10.0.0.1")), Err(Denied::Private));
        assert_eq!(p.check(ip("169.254.169.254")), Err(Denied::Special));
        let p = Policy { allowed: vec![Network::parse("10.1.0.0/16").unwrap()], ..Policy::default() };
        assert_eq!(p.check(ip("10.1.200.3")), Ok(()));
        assert_eq!(p.check(ip("10.2.0.1")), Err(Denied::Private));
        assert_eq!(p.check(ip("127.0.0.1")), Err(Denied::Loopback));
    }

    #[test]
    fn networks_parse_and_match() {
        assert!(Network::parse("10.0.0.0/33").is_none());
        assert!(Network::parse("nope").is_none());
        let n = Network::parse("fd00::/8").unwrap();
        assert!(n.contains(ip("fd12::1")));
        assert!(!n.contains(ip("fe00::1")));
        assert!(!n.contains(ip("10.0.0.1")));
        assert!(Network::parse("0.0.0.0/0").unwrap().contains(ip("1.2.3.4")));
        assert!(Network::parse("192.0.2.7").unwrap().contains(ip("192.0.2.7")));
        assert!(!Network::parse("192.0.2.7").unwrap().contains(ip("192.0.2.8")));
    }

    #[test]
    fn urls_are_checked_before_any_resolution() {
        let p = Policy::default();
        assert!(p.check_url("http://127.0.0.1:3978/api/messages").unwrap_err().contains("loopback"));
        assert!(p.check_url("http://[::1]:3978/").unwrap_err().contains("loopback"));
        assert!(p.check_url("http://localhost:3978/").unwrap_err().contains("loopback"));
        assert!(p.check_url("http://169.254.169.254/latest/meta-data").unwrap_err().contains("metadata"));
        assert!(p.check_url("http://user:pw@bot.example/").unwrap_err().contains("credentials"));
        assert!(p.check_url("ftp://bot.example/").is_err());
        assert_eq!(p.check_url("http://bot.example:3978/api/messages"), Ok(()));
    }
}
