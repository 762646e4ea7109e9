//! The HTTP client: hyper-util's pooled client over plain TCP with TCP_NODELAY, every request
//! bounded by a timeout and by a semaphore on requests in flight (which bounds connections).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;

/// What a request ended with when it did not end with a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No answer within the timeout: the server may or may not have acted on it.
    Timeout,
    /// Connecting failed: the server did not see the request.
    Connect,
    /// The connection broke mid-request: the server may or may not have acted on it.
    Io,
}

impl Failure {
    /// The error key in the report.
    pub fn key(self) -> &'static str {
        match self {
            Failure::Timeout => "transport timeout",
            Failure::Connect => "transport connect",
            Failure::Io => "transport io",
        }
    }
}

/// A response: status and whole body.
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// The body.
    pub body: Bytes,
}

/// The client; cloning is shallow.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    in_flight: Arc<Semaphore>,
    timeout: Duration,
}

impl Http {
    /// A client with at most `max_in_flight` requests at once.
    pub fn new(max_in_flight: usize, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        // Small request/response pairs: Nagle would add up to 40 ms per request.
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(max_in_flight)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self { client, in_flight: Arc::new(Semaphore::new(max_in_flight)), timeout }
    }

    /// Sends one request and reads the whole answer.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        bearer: Option<&str>,
        body: Option<Bytes>,
    ) -> Result<Answer, Failure> {
        let mut req = Request::builder().method(method).uri(url);
        if let Some(t) = bearer {
            let v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| Failure::Connect)?;
            req = req.header(header::AUTHORIZATION, v);
        }
        let body = match body {
            Some(b) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Full::new(b)
            }
            None => Full::new(Bytes::new()),
        };
        let req = req.body(body).map_err(|_| Failure::Connect)?;
        // The permit is held until the body is read: the connection is busy until then.
        let _permit = self.in_flight.acquire().await.map_err(|_| Failure::Connect)?;
        let work = async {
            let res = self
                .client
                .request(req)
                .await
                .map_err(|e| if e.is_connect() { Failure::Connect } else { Failure::Io })?;
            let status = res.status();
            let body = res.into_body().collect().await.map_err(|_| Failure::Io)?.to_bytes();
            Ok(Answer { status, body })
        };
        tokio::time::timeout(self.timeout, work).await.map_err(|_| Failure::Timeout)?
    }
}
