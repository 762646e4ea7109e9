//! The WebSocket `streamUrl`: ActivitySet text frames, empty keep-alive frames both ways, one
//! socket per conversation (a new one closes the old).

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use http::HeaderMap;
use serde::Deserialize;

use super::auth;
use crate::error::ApiError;
use crate::state::AppState;

/// The close code of a socket replaced by a newer one of its conversation (application range).
pub const CLOSE_REPLACED: u16 = 4001;

/// The close code of a socket whose conversation ended.
pub const CLOSE_ENDED: u16 = 4002;

/// How often the gateway sends an empty keep-alive frame.
const KEEP_ALIVE: Duration = Duration::from_secs(20);

/// Largest frame or message a client may send on the stream (it sends only keep-alives).
pub const MAX_CLIENT_MESSAGE: usize = 16 * 1024;

/// The read buffer a socket starts with (the library's default is 128 KiB, reserved per socket
/// up front). Clients send only keep-alives; a larger frame grows the buffer up to
/// [`MAX_CLIENT_MESSAGE`]. 10,000 held conversations cost 5,168 bytes each in RSS with the
/// default and 4,130–4,991 with this (BENCHMARKS.md, "WebSocket footprint").
const READ_BUFFER: usize = 1024;

/// Sends one frame within the channel's write timeout. A reader too slow to take it (or gone)
/// ends the stream: what it has not read stays in the log for its next poll or socket, and
/// nothing is buffered for it.
async fn send(app: &AppState, socket: &mut WebSocket, message: Message) -> bool {
    matches!(tokio::time::timeout(app.channel().stream_write_timeout, socket.send(message)).await, Ok(Ok(())))
}

/// The stream URL's query: the token (browsers cannot set headers on a WebSocket) and the
/// watermark to resume from.
#[derive(Deserialize)]
pub struct StreamQuery {
    t: Option<String>,
    watermark: Option<String>,
}

/// `GET /v3/directline/conversations/{id}/stream?t=TOKEN[&watermark=W]` (WebSocket upgrade).
pub async fn stream(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<StreamQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let ch = app.channel();
    let token = match (&q.t, auth::bearer(&headers)) {
        (Some(t), _) => t.as_str(),
        (None, Ok(b)) => b,
        (None, Err(e)) => return Err(e),
    };
    let (_, conv) = super::directline::open_conversation_with(ch, token, &headers, &id)?;
    let watermark = match q.watermark.as_deref().map(str::trim) {
        None | Some("") => 0,
        Some(w) => w.parse().map_err(|_| ApiError::bad_request("`watermark` must be a number or empty."))?,
    };
    let generation = conv.new_socket();
    let app = app.clone();
    // The client sends only keep-alives: a frame beyond a small bound is refused, never
    // buffered; each frame the gateway writes is flushed within the write timeout (`send`).
    // Frames are written at once (no write buffer to fill first): `send` flushes each anyway.
    Ok(ws
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| run(app, socket, conv, generation, watermark)))
}

async fn run(
    app: AppState,
    mut socket: WebSocket,
    conv: std::sync::Arc<crate::conversation::Conversation>,
    generation: u64,
    mut sent: u64,
) {
    let mut keep_alive = tokio::time::interval(KEEP_ALIVE);
    keep_alive.tick().await;
    loop {
        // Register for the next append before reading, so an append in between is not missed.
        let changed = conv.changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        // A newer socket took over, or the conversation expired (the sweep wakes its sockets):
        // close, so an abandoned socket does not keep an ended conversation in memory.
        let expired = app.channel().conversations.get(&conv.id, app.clock().now_ms()).is_none();
        if !conv.socket_current(generation) || expired {
            let (code, reason) = if expired {
                (CLOSE_ENDED, "The conversation ended.")
            } else {
                (CLOSE_REPLACED, "A newer socket of this conversation took over.")
            };
            let frame = CloseFrame { code, reason: reason.into() };
            let _ = send(&app, &mut socket, Message::Close(Some(frame))).await;
            return;
        }
        // Replays everything from the watermark on connect (clients may post before the socket
        // is open), then whatever is new.
        // A page at a time; the loop comes back at once while more is waiting.
        if conv.watermark() > sent {
            let (set, watermark) = conv.activities_since(sent, app.channel().page);
            if !send(&app, &mut socket, Message::Text(set.into())).await {
                return;
            }
            sent = watermark;
            if conv.watermark() > sent {
                continue;
            }
        }
        tokio::select! {
            _ = &mut changed => {}
            _ = keep_alive.tick() => {
                if !send(&app, &mut socket, Message::Text("".into())).await {
                    return;
                }
            }
            incoming = socket.recv() => match incoming {
                // Empty text frames are the client's keep-alives; the channel takes activities
                // by POST only, so other text is ignored too.
                Some(Ok(Message::Text(_) | Message::Binary(_) | Message::Ping(_) | Message::Pong(_))) => {}
                // The close handshake: the library queued the answer to the client's close
                // frame (its own code) and writes it on the next read, which then ends; so the
                // client sees a clean close instead of a dropped connection (1006).
                Some(Ok(Message::Close(_))) => {
                    let _ = tokio::time::timeout(app.channel().stream_write_timeout, socket.recv()).await;
                    return;
                }
                Some(Err(_)) | None => return,
            },
        }
    }
}
