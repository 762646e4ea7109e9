//! The message path's own way in: `POST` and `GET /v3/directline/conversations/{id}/activities`
//! (a user's message and a poll) are served without the router and the tower stack, by the same
//! handlers, with what the stack would add done here in one place: the request id, the body
//! limit, the timeout, CORS headers, panic capture and the per-route metrics. Every other
//! request, a preflight, and a conversation another node owns, take the full stack.
//!
//! Why: through the stack a 404 alone cost 2.6× a bare hyper answer (BENCHMARKS.md, issue 16):
//! routing, a boxed clone of the whole stack per request and eight layers' futures. The figures
//! before and after are in BENCHMARKS.md.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use http::{Method, header};
use hyper::body::Incoming;

use super::REQUEST_ID;
use crate::channel::{directline, owner_of, turn};
use crate::error::ApiError;
use crate::state::AppState;
use crate::telemetry::http_metrics::RouteMetrics;
use crate::telemetry::request_id::MakeRequestCounter;

/// The route template both requests count under.
pub const TEMPLATE: &str = "/v3/directline/conversations/{id}/activities";

/// What the hot path needs, resolved at start-up.
pub struct HotPath {
    state: AppState,
    metrics: RouteMetrics,
    request_ids: MakeRequestCounter,
    max_body: usize,
    timeout: Duration,
    /// This node's id when several nodes share Redis: only its own conversations are taken.
    node: Option<String>,
}

/// The conversation id of `/v3/directline/conversations/{id}/activities`. An id with a `%` is
/// left to the router, which decodes it.
fn conversation_of(path: &str) -> Option<&str> {
    let id = path.strip_prefix("/v3/directline/conversations/")?.strip_suffix("/activities")?;
    (!id.is_empty() && !id.contains(['/', '%'])).then_some(id)
}

impl HotPath {
    /// The hot path of `state`'s public listener, counted under `metrics` (the stack's handles
    /// for [`TEMPLATE`]).
    pub fn new(state: &AppState, metrics: RouteMetrics, request_ids: MakeRequestCounter) -> Self {
        let server = &state.config().server;
        Self {
            state: state.clone(),
            metrics,
            request_ids,
            max_body: server.max_body_bytes,
            timeout: Duration::from_secs(server.request_timeout_secs),
            node: state.cluster().map(|c| c.node.clone()),
        }
    }

    /// Whether the hot path takes `req`: a message or a poll of a conversation this node owns.
    pub fn takes<B>(&self, req: &http::Request<B>) -> bool {
        if req.method() != Method::POST && req.method() != Method::GET {
            return false;
        }
        let Some(id) = conversation_of(req.uri().path()) else { return false };
        match &self.node {
            None => true,
            // Another node's conversation goes through the forwarding layer.
            Some(node) => owner_of(id).is_none_or(|owner| owner == node),
        }
    }

    /// Serves a request [`takes`](Self::takes) accepted.
    pub async fn serve(&self, req: http::Request<Incoming>) -> Result<Response, Infallible> {
        let start = Instant::now();
        let origin = req.headers().get(header::ORIGIN).cloned();
        let request_id = match req.headers().get(&REQUEST_ID) {
            Some(id) => id.clone(),
            None => self.request_ids.next(),
        };
        let answer = std::panic::AssertUnwindSafe(tokio::time::timeout(self.timeout, self.answer(req)))
            .catch_unwind()
            .await;
        let mut res = match answer {
            Ok(Ok(res)) => res,
            Ok(Err(_elapsed)) => ApiError::new(
                http::StatusCode::GATEWAY_TIMEOUT,
                "Timeout",
                "The request took longer than the gateway's request timeout.",
            )
            .into_response(),
            Err(cause) => super::panic_response(cause),
        };
        let h = res.headers_mut();
        h.insert(REQUEST_ID, request_id);
        if let Some(origin) = origin {
            crate::channel::cors::allow(h, origin);
        }
        self.metrics.observe(res.status(), start);
        Ok(res)
    }

    async fn answer(&self, req: http::Request<Incoming>) -> Response {
        if let Some(len) = req.headers().get(header::CONTENT_LENGTH)
            && len.to_str().ok().and_then(|l| l.parse::<usize>().ok()).is_none_or(|l| l > self.max_body)
        {
            return ApiError::payload_too_large(self.max_body).into_response();
        }
        let post = req.method() == Method::POST;
        let Some(id) = conversation_of(req.uri().path()).map(str::to_string) else {
            return ApiError::not_found("No such route.").into_response();
        };
        let req = req.map(|b| axum::body::Body::new(http_body_util::Limited::new(b, self.max_body)));
        let state = State(self.state.clone());
        let result = if post {
            turn::post_activity(state, Path(id), req).await
        } else {
            match Query::<directline::WatermarkQuery>::try_from_uri(req.uri()) {
                Ok(q) => directline::get_activities(state, Path(id), q, req).await,
                Err(_) => Err(ApiError::bad_request("`watermark` must be a number or empty.")),
            }
        };
        result.unwrap_or_else(IntoResponse::into_response)
    }
}

#[cfg(test)]
mod tests {
    use super::conversation_of;

    #[test]
    fn only_the_activities_route_is_taken() {
        assert_eq!(conversation_of("/v3/directline/conversations/abc/activities"), Some("abc"));
        assert_eq!(conversation_of("/v3/directline/conversations/n1.abc/activities"), Some("n1.abc"));
        assert_eq!(conversation_of("/v3/directline/conversations//activities"), None);
        assert_eq!(conversation_of("/v3/directline/conversations/a/b/activities"), None);
        assert_eq!(conversation_of("/v3/directline/conversations/abc/upload"), None);
        assert_eq!(conversation_of("/v3/directline/conversations/abc/activities/x"), None);
        assert_eq!(conversation_of("/v3/directline/conversations/a%2Db/activities"), None);
    }
}
