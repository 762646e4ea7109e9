//! Forwarding a request for another node's conversation to its owner.

use axum::body::Body;
use axum::extract::ws::{Message as AxMessage, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use http::{HeaderName, HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio_tungstenite::tungstenite::Message as TMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::channel::auth;
use crate::channel::owner_of;
use crate::error::ApiError;
use crate::state::AppState;

/// Marks a forwarded request, so the owner handles it and never forwards it again.
pub const FORWARDED: HeaderName = HeaderName::from_static("x-botgate-forwarded");

/// The credential of a Direct Line request: the bearer header, or the stream URL's `t=`.
fn credential_of(req: &Request) -> Option<&str> {
    auth::bearer(req.headers())
        .ok()
        .or_else(|| req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix("t=")))
}

/// Whether a Direct Line request for `conversation` carries a credential for it: a token of this
/// gateway for that conversation, or a channel secret. Checked before the owner is looked up, so
/// a stranger's request for made-up conversation ids costs no Redis call and no cache entry.
fn may_reach(app: &AppState, req: &Request, conversation: &str) -> bool {
    let Some(value) = credential_of(req) else { return false };
    match auth::check(app.channel(), value, app.clock().now_secs()) {
        Ok(auth::Credential::Token(claims)) => claims.conversation == conversation,
        Ok(auth::Credential::Secret { .. }) => true,
        Err(_) => false,
    }
}

/// The conversation a request is about: from the path, or (starting a conversation) from the
/// token's claims. Direct Line requests for a conversation count only with a credential for it.
fn conversation_of(app: &AppState, req: &Request) -> Option<String> {
    let path = req.uri().path();
    let mut seg = path.split('/').skip(1);
    match (seg.next(), seg.next(), seg.next(), seg.next()) {
        (Some("v3"), Some("directline"), Some("conversations"), Some(id)) => {
            may_reach(app, req, id).then(|| id.to_string())
        }
        (Some("v3"), Some("directline"), Some("conversations"), None) => {
            let token = auth::bearer(req.headers()).ok()?;
            let claims = app.channel().signer.verify(token, app.clock().now_secs()).ok()?;
            Some(claims.conversation)
        }
        // A file's URL carries no credential: its key's HMAC proves the gateway made it.
        (Some("v3"), Some("directline"), Some("attachments"), Some(id)) => {
            let key = seg.next()?;
            app.channel().signer.check_file_key(id, key).then(|| id.to_string())
        }
        (Some("connector"), Some(_key), Some("v3"), Some("conversations")) => seg.next().map(str::to_string),
        _ => None,
    }
}

/// The forwarding middleware (several nodes only; with one node it passes every request on).
pub async fn forward(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let Some(cluster) = app.cluster() else { return next.run(req).await };
    if req.headers().contains_key(&FORWARDED) {
        return next.run(req).await;
    }
    let Some(conversation) = conversation_of(&app, &req) else { return next.run(req).await };
    let Some(owner) = owner_of(&conversation) else { return next.run(req).await };
    if owner == cluster.node {
        return next.run(req).await;
    }
    let url = match cluster.owner_url(owner).await {
        Ok(Some(url)) => url,
        Ok(None) => {
            return ApiError::new(
                StatusCode::NOT_FOUND,
                "ConversationNotFound",
                "The gateway node that held this conversation is gone. Start a new conversation.",
            )
            .into_response();
        }
        Err(e) => {
            tracing::warn!(error = %e, "Cannot look up a conversation's node.");
            return ApiError::unavailable(
                "StoreUnavailable",
                "The conversation's node cannot be found right now. Try again.",
            )
            .with_retry_after(1)
            .into_response();
        }
    };
    let is_ws =
        req.headers().get(header::UPGRADE).is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if is_ws { proxy_ws(req, &url).await } else { proxy_http(&app, req, &url).await }
}

fn bad_gateway(e: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "Forwarding to a conversation's node failed.");
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "NodeUnreachable",
        "The conversation's node could not be reached. Try again.",
    )
    .into_response()
}

async fn proxy_http(app: &AppState, req: Request, base: &str) -> Response {
    let (mut parts, body) = req.into_parts();
    let bytes = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return ApiError::bad_request("The request body could not be read.").into_response(),
    };
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = match format!("{}{pq}", base.trim_end_matches('/')).parse() {
        Ok(u) => u,
        Err(e) => return bad_gateway(e),
    };
    // The Host header stays: the owner builds stream URLs for the address the client used.
    parts.headers.insert(FORWARDED, HeaderValue::from_static("1"));
    let res = match app.forward_client().request(http::Request::from_parts(parts, Full::new(bytes))).await {
        Ok(r) => r,
        Err(e) => return bad_gateway(e),
    };
    let (parts, body) = res.into_parts();
    Response::from_parts(parts, Body::new(body))
}

async fn proxy_ws(req: Request, base: &str) -> Response {
    let (mut parts, _) = req.into_parts();
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let target = format!("{}{pq}", base.trim_end_matches('/').replacen("http", "ws", 1));
    let mut request = match target.into_client_request() {
        Ok(r) => r,
        Err(e) => return bad_gateway(e),
    };
    request.headers_mut().insert(FORWARDED, HeaderValue::from_static("1"));
    if let Some(origin) = parts.headers.get(header::ORIGIN) {
        request.headers_mut().insert(header::ORIGIN, origin.clone());
    }
    let (upstream, _) = match tokio_tungstenite::connect_async(request).await {
        Ok(s) => s,
        Err(e) => return bad_gateway(e),
    };
    upgrade.on_upgrade(move |client| async move {
        let (mut up_tx, mut up_rx) = upstream.split();
        let (mut cl_tx, mut cl_rx) = client.split();
        loop {
            tokio::select! {
                m = up_rx.next() => match m {
                    Some(Ok(TMessage::Text(t))) => { if cl_tx.send(AxMessage::Text(t.as_str().into())).await.is_err() { break } }
                    Some(Ok(TMessage::Binary(b))) => { if cl_tx.send(AxMessage::Binary(b)).await.is_err() { break } }
                    Some(Ok(TMessage::Ping(_) | TMessage::Pong(_) | TMessage::Frame(_))) => {}
                    Some(Ok(TMessage::Close(_))) | Some(Err(_)) | None => { let _ = cl_tx.send(AxMessage::Close(None)).await; break }
                },
                m = cl_rx.next() => match m {
                    Some(Ok(AxMessage::Text(t))) => { if up_tx.send(TMessage::Text(t.as_str().into())).await.is_err() { break } }
                    Some(Ok(AxMessage::Binary(b))) => { if up_tx.send(TMessage::Binary(b)).await.is_err() { break } }
                    Some(Ok(AxMessage::Ping(_) | AxMessage::Pong(_))) => {}
                    Some(Ok(AxMessage::Close(_))) | Some(Err(_)) | None => { let _ = up_tx.send(TMessage::Close(None)).await; break }
                },
            }
        }
    })
}

/// The HTTP client for forwarding (pooled connections to the other nodes).
pub fn client() -> Client<HttpConnector, Full<bytes::Bytes>> {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(64).build(c)
}
