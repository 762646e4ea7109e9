//! The message path's own way in: `POST` and `GET /v3/directline/conversations/{id}/activities`
//! (a user's message and a poll) and an upstream bot's callbacks
//! (`POST /connector/{key}/v3/conversations/{id}/activities[/{replyToId}]`) are served without
//! the router and the tower stack, by the same handlers, with what the stack would add done here
//! in one place: the request id, the body limit, the timeout, CORS headers, panic capture and the
//! per-route metrics. Every other request, a preflight, and a conversation another node owns,
//! take the full stack.
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
use crate::channel::{connector, directline, owner_of, turn};
use crate::error::ApiError;
use crate::state::AppState;
use crate::telemetry::http_metrics::RouteMetrics;
use crate::telemetry::request_id::MakeRequestCounter;

/// The route template a message and a poll count under.
pub const TEMPLATE: &str = "/v3/directline/conversations/{id}/activities";
/// The templates of a bot's callbacks.
pub const SEND_TEMPLATE: &str = "/connector/{key}/v3/conversations/{id}/activities";
/// The templates of a bot's reply callbacks.
pub const REPLY_TEMPLATE: &str = "/connector/{key}/v3/conversations/{id}/activities/{reply_to}";

/// What the hot path needs, resolved at start-up.
pub struct HotPath {
    state: AppState,
    /// The handles of [`TEMPLATE`], [`SEND_TEMPLATE`] and [`REPLY_TEMPLATE`].
    metrics: [RouteMetrics; 3],
    request_ids: MakeRequestCounter,
    max_body: usize,
    timeout: Duration,
    /// This node's id when several nodes share Redis: only its own conversations are taken.
    node: Option<String>,
}

/// Which of the hot path's routes a request is (and the index of its metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A message or a poll.
    Activities = 0,
    /// A bot's callback without a reply id.
    Send = 1,
    /// A bot's callback replying to an activity.
    Reply = 2,
}

/// A request the hot path takes, with its path's segments as sent.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    /// `/v3/directline/conversations/{id}/activities`.
    Activities(&'a str),
    /// `/connector/{key}/v3/conversations/{id}/activities[/{reply_to}]`.
    Callback { key: &'a str, conversation: &'a str, reply_to: Option<&'a str> },
}

impl<'a> Route<'a> {
    /// The route of `path`, if the hot path takes it. A conversation id with a `%` is left to the
    /// router (it decodes it); a key or reply id is decoded here, as SDK bots encode `|`.
    /// Literal prefixes compared and `/` found byte by byte: `split_once` with a string pattern,
    /// then `split('/')`, cost 1,300 and 1,150 instructions a call.
    fn of(path: &'a str) -> Option<Self> {
        /// `s` up to its first `/`, and the rest from that `/` on.
        fn segment(s: &str) -> (&str, &str) {
            let end = s.bytes().position(|b| b == b'/').unwrap_or(s.len());
            s.split_at(end)
        }
        let plain = |s: &str| !s.is_empty() && !s.bytes().any(|b| b == b'%');
        if let Some(rest) = path.strip_prefix("/v3/directline/conversations/") {
            let (id, rest) = segment(rest);
            return (rest == "/activities" && plain(id)).then_some(Route::Activities(id));
        }
        let (key, rest) = segment(path.strip_prefix("/connector/")?);
        let (conversation, rest) = segment(rest.strip_prefix("/v3/conversations/")?);
        let reply_to = match rest.strip_prefix("/activities")? {
            "" => None,
            r => {
                let (reply, end) = segment(r.strip_prefix('/')?);
                if reply.is_empty() || !end.is_empty() {
                    return None;
                }
                Some(reply)
            }
        };
        (!key.is_empty() && plain(conversation)).then_some(Route::Callback { key, conversation, reply_to })
    }

    fn conversation(&self) -> &'a str {
        match self {
            Route::Activities(id) => id,
            Route::Callback { conversation, .. } => conversation,
        }
    }
}

/// A path segment, percent-decoded; a 400 when it is not UTF-8 once decoded.
fn decoded(segment: &str) -> Result<String, ApiError> {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| ApiError::bad_request("The path is not valid UTF-8 once decoded."))
}

impl HotPath {
    /// The hot path of `state`'s public listener, counted under `metrics` (the stack's handles
    /// for [`TEMPLATE`]).
    pub fn new(state: &AppState, metrics: [RouteMetrics; 3], request_ids: MakeRequestCounter) -> Self {
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

    /// Which of its routes `req` is, if the hot path takes it: a message, a poll or a bot's
    /// callback, for a conversation this node owns.
    pub fn takes<B>(&self, req: &http::Request<B>) -> Option<Kind> {
        let route = Route::of(req.uri().path())?;
        let kind = match route {
            Route::Activities(_) if req.method() == Method::POST || req.method() == Method::GET => {
                Kind::Activities
            }
            Route::Callback { reply_to: None, .. } if req.method() == Method::POST => Kind::Send,
            Route::Callback { reply_to: Some(_), .. } if req.method() == Method::POST => Kind::Reply,
            _ => return None,
        };
        let id = route.conversation();
        let ours = match &self.node {
            None => true,
            // Another node's conversation goes through the forwarding layer.
            Some(node) => owner_of(id).is_none_or(|owner| owner == node),
        };
        ours.then_some(kind)
    }

    /// Serves a request [`takes`](Self::takes) accepted as `kind`.
    pub async fn serve(&self, req: http::Request<Incoming>, kind: Kind) -> Result<Response, Infallible> {
        let start = Instant::now();
        let origin = req.headers().get(header::ORIGIN).cloned();
        let metrics = &self.metrics[kind as usize];
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
        metrics.observe(res.status(), start);
        Ok(res)
    }

    async fn answer(&self, req: http::Request<Incoming>) -> Response {
        if let Some(len) = req.headers().get(header::CONTENT_LENGTH)
            && len.to_str().ok().and_then(|l| l.parse::<usize>().ok()).is_none_or(|l| l > self.max_body)
        {
            return ApiError::payload_too_large(self.max_body).into_response();
        }
        /// The route's segments, owned and decoded.
        enum Target {
            Post(String),
            Poll(String),
            Callback { key: String, conversation: String, reply_to: Option<String> },
        }
        let target = match Route::of(req.uri().path()) {
            Some(Route::Activities(id)) if req.method() == Method::POST => Target::Post(id.to_string()),
            Some(Route::Activities(id)) => Target::Poll(id.to_string()),
            Some(Route::Callback { key, conversation, reply_to }) => {
                match (decoded(key), reply_to.map(decoded).transpose()) {
                    (Ok(key), Ok(reply_to)) => {
                        Target::Callback { key, conversation: conversation.to_string(), reply_to }
                    }
                    (Err(e), _) | (_, Err(e)) => return e.into_response(),
                }
            }
            None => return ApiError::not_found("No such route.").into_response(),
        };
        let req = req.map(|b| axum::body::Body::new(http_body_util::Limited::new(b, self.max_body)));
        let state = State(self.state.clone());
        let result = match target {
            Target::Post(id) => turn::post_activity(state, Path(id), req).await,
            Target::Poll(id) => match Query::<directline::WatermarkQuery>::try_from_uri(req.uri()) {
                Ok(q) => directline::get_activities(state, Path(id), q, req).await,
                Err(_) => Err(ApiError::bad_request("`watermark` must be a number or empty.")),
            },
            Target::Callback { key, conversation, reply_to } => {
                match turn::read_body(req.into_body()).await {
                    Ok(body) => {
                        connector::callback(&self.state, &key, &conversation, reply_to.as_deref(), &body)
                    }
                    Err(e) => Err(e),
                }
            }
        };
        result.unwrap_or_else(IntoResponse::into_response)
    }
}

#[cfg(test)]
mod tests {
    use super::Route;

    #[test]
    fn only_the_message_poll_and_callback_routes_are_taken() {
        let of = Route::of;
        assert_eq!(of("/v3/directline/conversations/abc/activities"), Some(Route::Activities("abc")));
        assert_eq!(of("/v3/directline/conversations/n1.abc/activities"), Some(Route::Activities("n1.abc")));
        assert_eq!(of("/v3/directline/conversations//activities"), None);
        assert_eq!(of("/v3/directline/conversations/a/b/activities"), None);
        assert_eq!(of("/v3/directline/conversations/abc/upload"), None);
        assert_eq!(of("/v3/directline/conversations/abc/activities/x"), None);
        assert_eq!(of("/v3/directline/conversations/a%2Db/activities"), None);
        assert_eq!(
            of("/connector/k1/v3/conversations/c1/activities"),
            Some(Route::Callback { key: "k1", conversation: "c1", reply_to: None })
        );
        assert_eq!(
            of("/connector/k1/v3/conversations/c1/activities/c1%7C0000001"),
            Some(Route::Callback { key: "k1", conversation: "c1", reply_to: Some("c1%7C0000001") })
        );
        assert_eq!(of("/connector/k1/v3/conversations/c1/activities/"), None);
        assert_eq!(of("/connector/k1/v3/conversations/c1/activities/a/b"), None);
        assert_eq!(of("/connector/k1/v3/conversations/c1/activitiesx"), None);
        assert_eq!(of("/connector/k1/v3/conversations/c%31/activities"), None);
        assert_eq!(of("/connector//v3/conversations/c1/activities"), None);
    }
}
