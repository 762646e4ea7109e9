//! One conversation, as a Direct Line client runs it: a token from the open bot's endpoint,
//! start, (WebSocket connect), K messages each awaited until the bot's reply is seen, idle.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::http::{Answer, Failure, Http};
use crate::stats::Stats;
use crate::{Args, TopicKind, Transport};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What every task of the run shares.
pub struct Ctx {
    /// The client.
    pub http: Http,
    /// Public base URL, without a trailing slash.
    pub target: String,
    /// The options.
    pub args: Arc<Args>,
    /// The measurements.
    pub stats: Arc<Stats>,
    /// No conversation starts after this.
    pub deadline: Instant,
    /// Conversations left to start (`--conversations`).
    pub budget: AtomicU64,
}

impl Ctx {
    /// Takes the right to start one more conversation: false after the deadline or the budget.
    pub fn claim(&self) -> bool {
        if Instant::now() >= self.deadline {
            return false;
        }
        // Relaxed: the budget is a standalone count; the CAS makes each unit taken once.
        self.budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1)).is_ok()
    }
}

/// The send schedule of one open-loop lane: slot `j` is due at `start + (lane + j*lanes)/rate`.
pub struct LaneClock {
    start: Instant,
    rate: f64,
    lanes: usize,
    lane: usize,
    next: u64,
    deadline: Instant,
    last_done: Instant,
}

impl LaneClock {
    /// The schedule of lane `lane` of `lanes` at `rate` per second overall.
    pub fn new(start: Instant, rate: f64, lanes: usize, lane: usize, deadline: Instant) -> Self {
        Self { start, rate, lanes, lane, next: 0, deadline, last_done: start }
    }

    fn slot(&self) -> Instant {
        let i = self.lane as f64 + self.next as f64 * self.lanes as f64;
        self.start + Duration::from_secs_f64(i / self.rate)
    }

    /// Whether the lane has no slot left before the deadline.
    pub fn finished(&self) -> bool {
        self.slot() >= self.deadline
    }

    /// Records that the lane's previous work (a reply, or a conversation's set-up) finished.
    pub fn done(&mut self, at: Instant) {
        self.last_done = at;
    }

    /// Waits for the next slot; `None` past the deadline. Returns the instant latency is
    /// measured from: the slot, plus only the generator's own oversleep.
    ///
    /// Latency counts from the slot (no coordinated omission): when the lane's previous reply
    /// came after this slot, the message goes out late and that wait is counted. What is not
    /// counted is the generator's timer oversleep past `max(slot, previous reply)`: tokio's
    /// timer has millisecond granularity, and on a busy generator core a wake-up can come later
    /// still; neither is the server's doing. The oversleep is reported as the `late` histogram.
    async fn next(&mut self, stats: &Stats) -> Option<Instant> {
        let due = self.slot();
        if due >= self.deadline {
            return None;
        }
        self.next += 1;
        tokio::time::sleep_until(due.into()).await;
        let oversleep = Instant::now().saturating_duration_since(due.max(self.last_done));
        stats.send_lateness(oversleep);
        Some(due + oversleep)
    }
}

#[derive(Deserialize)]
struct Started<'a> {
    #[serde(rename = "conversationId", borrow)]
    conversation_id: Cow<'a, str>,
    #[serde(borrow)]
    token: Cow<'a, str>,
    #[serde(rename = "streamUrl", borrow, default)]
    stream_url: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct TokenAnswer<'a> {
    #[serde(borrow)]
    token: Cow<'a, str>,
}

#[derive(Deserialize)]
struct IdAnswer<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
}

#[derive(Deserialize)]
struct ActivitySet<'a> {
    #[serde(borrow)]
    activities: Vec<Activity<'a>>,
    #[serde(borrow, default)]
    watermark: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Activity<'a> {
    #[serde(rename = "replyToId", borrow, default)]
    reply_to_id: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ErrorBody<'a> {
    #[serde(borrow)]
    error: ErrorCode<'a>,
}

#[derive(Deserialize)]
struct ErrorCode<'a> {
    #[serde(borrow)]
    code: Cow<'a, str>,
}

/// How a step failed; recorded once under its key.
struct Failed {
    key: String,
    /// The server may have acted on the request (a message whose fate is unknown).
    uncertain: bool,
}

impl Failed {
    fn status(step: &str, a: &Answer) -> Self {
        let code = serde_json::from_slice::<ErrorBody<'_>>(&a.body)
            .map(|e| e.error.code.into_owned())
            .unwrap_or_else(|_| "-".into());
        Self { key: format!("{step} {} {code}", a.status.as_u16()), uncertain: false }
    }
    fn transport(step: &str, f: Failure) -> Self {
        Self { key: format!("{step} {}", f.key()), uncertain: f != Failure::Connect }
    }
    fn other(step: &str, what: &str) -> Self {
        Self { key: format!("{step} {what}"), uncertain: false }
    }
}

/// One whole conversation; `due` is when it was scheduled to start.
pub async fn conversation(ctx: &Ctx, mut lane: Option<&mut LaneClock>, due: Instant) {
    let stats = &ctx.stats;
    let args = &ctx.args;
    stats.conversation_started();
    let mut due = due;
    if args.messages == 0
        && let Some(l) = lane.as_deref_mut()
    {
        // Conversations without messages take one slot each, for their start.
        match l.next(stats).await {
            Some(d) => due = d,
            None => return stats.conversation_ended(args.topic, 0, 0, false),
        }
    }
    let (mut ok, mut unknown) = (0u64, 0u64);
    let result = run(ctx, lane, due, &mut ok).await;
    let failed = match result {
        Ok(()) => false,
        Err(f) => {
            if f.uncertain {
                unknown += 1;
            }
            stats.error(f.key);
            true
        }
    };
    stats.conversation_ended(args.topic, ok, unknown, failed);
}

async fn run(ctx: &Ctx, mut lane: Option<&mut LaneClock>, due: Instant, ok: &mut u64) -> Result<(), Failed> {
    let args = &ctx.args;
    let stats = &ctx.stats;
    let http = &ctx.http;

    // Token, then start.
    let url = format!("{}/api/v1/bots/{}/directline/token", ctx.target, args.bot);
    stats.http_request();
    let a = http.send(Method::GET, &url, None, None).await.map_err(|f| Failed::transport("token", f))?;
    if a.status != StatusCode::OK {
        return Err(Failed::status("token", &a));
    }
    let t: TokenAnswer<'_> =
        serde_json::from_slice(&a.body).map_err(|_| Failed::other("token", "bad JSON"))?;
    let url = format!("{}/v3/directline/conversations", ctx.target);
    stats.http_request();
    let a = http
        .send(Method::POST, &url, Some(&t.token), None)
        .await
        .map_err(|f| Failed::transport("start", f))?;
    if a.status != StatusCode::CREATED {
        return Err(Failed::status("start", &a));
    }
    let s: Started<'_> = serde_json::from_slice(&a.body).map_err(|_| Failed::other("start", "bad JSON"))?;
    let conv_id = s.conversation_id.into_owned();
    let token = s.token.into_owned();
    let stream_url = s.stream_url.map(Cow::into_owned);

    let mut ws = match args.transport {
        Transport::Polling => None,
        Transport::Ws => {
            let url = stream_url.ok_or_else(|| Failed::other("start", "no streamUrl"))?;
            let connect = tokio_tungstenite::connect_async_with_config(url, None, true);
            let (socket, _) = tokio::time::timeout(Duration::from_secs_f64(args.timeout), connect)
                .await
                .map_err(|_| Failed::other("ws connect", "timeout"))?
                .map_err(|e| Failed::other("ws connect", &ws_error_kind(&e)))?;
            stats.ws_opened();
            Some(socket)
        }
    };
    stats.setup_ok(due.elapsed());
    if let Some(l) = lane.as_deref_mut() {
        l.done(Instant::now());
    }
    let result = messages(ctx, &mut lane, &conv_id, &token, ws.as_mut(), ok).await;
    let result = match result {
        Ok(()) if args.idle > 0.0 => idle(ctx, ws.as_mut()).await,
        r => r,
    };
    if let Some(mut socket) = ws {
        let _ = tokio::time::timeout(Duration::from_secs(1), socket.close(None)).await;
        stats.ws_closed();
    }
    result
}

fn ws_error_kind(e: &tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        E::Http(r) => format!("status {}", r.status().as_u16()),
        E::Io(io) => format!("io {:?}", io.kind()),
        E::ConnectionClosed | E::AlreadyClosed => "closed".into(),
        E::Protocol(_) => "protocol".into(),
        _ => "other".into(),
    }
}

async fn messages(
    ctx: &Ctx,
    lane: &mut Option<&mut LaneClock>,
    conv_id: &str,
    token: &str,
    mut ws: Option<&mut Socket>,
    ok: &mut u64,
) -> Result<(), Failed> {
    let args = &ctx.args;
    let stats = &ctx.stats;
    let body = Bytes::from(
        serde_json::json!({ "type": "message", "from": { "id": "dl_u" }, "text": args.text }).to_string(),
    );
    let post_url = format!("{}/v3/directline/conversations/{conv_id}/activities", ctx.target);
    let reply_timeout = Duration::from_secs_f64(args.reply_timeout);
    let mut watermark = String::new();
    let mut seen: HashSet<String> = HashSet::new();
    for m in 0..args.messages {
        let due = match lane.as_deref_mut() {
            Some(l) => match l.next(stats).await {
                Some(d) => d,
                None => return Ok(()),
            },
            None => {
                if m > 0 && args.think_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(args.think_ms)).await;
                }
                Instant::now()
            }
        };
        stats.http_request();
        let a = ctx
            .http
            .send(Method::POST, &post_url, Some(token), Some(body.clone()))
            .await
            .map_err(|f| Failed::transport("post", f))?;
        if a.status != StatusCode::OK {
            return Err(Failed::status("post", &a));
        }
        // The server processed (and metered) the message: it counts whatever happens next.
        *ok += 1;
        let id = serde_json::from_slice::<IdAnswer<'_>>(&a.body)
            .map_err(|_| Failed::other("post", "bad JSON"))?
            .id
            .into_owned();
        let until = Instant::now() + reply_timeout;
        match ws.as_deref_mut() {
            None => poll_reply(ctx, conv_id, token, &id, &mut watermark, until).await?,
            Some(socket) => ws_reply(ctx, socket, &id, &mut seen, until).await?,
        }
        // The oracle's rule: a user topic's conversation begins a session every 100 turns.
        stats.message_ok(due.elapsed(), args.topic == TopicKind::User && m % 100 == 0);
        if let Some(l) = lane.as_deref_mut() {
            l.done(Instant::now());
        }
    }
    Ok(())
}

/// GETs the activities from the watermark until one replies to `id`.
async fn poll_reply(
    ctx: &Ctx,
    conv_id: &str,
    token: &str,
    id: &str,
    watermark: &mut String,
    until: Instant,
) -> Result<(), Failed> {
    loop {
        let url =
            format!("{}/v3/directline/conversations/{conv_id}/activities?watermark={watermark}", ctx.target);
        ctx.stats.http_request();
        let a = ctx.http.send(Method::GET, &url, Some(token), None).await.map_err(|f| {
            // A GET changes nothing on the server: its failure leaves no doubt about billing.
            Failed { uncertain: false, ..Failed::transport("get", f) }
        })?;
        if a.status != StatusCode::OK {
            return Err(Failed::status("get", &a));
        }
        let set: ActivitySet<'_> =
            serde_json::from_slice(&a.body).map_err(|_| Failed::other("get", "bad JSON"))?;
        if let Some(w) = set.watermark {
            watermark.clear();
            watermark.push_str(&w);
        }
        if set.activities.iter().any(|a| a.reply_to_id.as_deref() == Some(id)) {
            return Ok(());
        }
        if Instant::now() >= until {
            return Err(Failed::other("get", "reply missing"));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Reads frames until one carries a reply to `id` (replies to earlier ids seen early are kept).
async fn ws_reply(
    ctx: &Ctx,
    socket: &mut Socket,
    id: &str,
    seen: &mut HashSet<String>,
    until: Instant,
) -> Result<(), Failed> {
    while !seen.remove(id) {
        let frame = tokio::time::timeout_at(until.into(), socket.next())
            .await
            .map_err(|_| Failed::other("ws", "reply missing"))?;
        match frame {
            Some(Ok(Message::Text(t))) if t.is_empty() => ctx.stats.keepalive_received(),
            Some(Ok(Message::Text(t))) => {
                let set: ActivitySet<'_> =
                    serde_json::from_str(t.as_str()).map_err(|_| Failed::other("ws", "bad JSON"))?;
                seen.extend(set.activities.into_iter().filter_map(|a| a.reply_to_id.map(Cow::into_owned)));
            }
            Some(Ok(Message::Close(_))) | None => return Err(Failed::other("ws", "closed by server")),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(Failed::other("ws", &ws_error_kind(&e))),
        }
    }
    Ok(())
}

/// Holds the conversation for `--idle` seconds; a WebSocket sends keep-alives and must stay open.
async fn idle(ctx: &Ctx, ws: Option<&mut Socket>) -> Result<(), Failed> {
    let end = Instant::now() + Duration::from_secs_f64(ctx.args.idle);
    let Some(socket) = ws else {
        tokio::time::sleep_until(end.into()).await;
        return Ok(());
    };
    let period = Duration::from_secs_f64(ctx.args.keepalive_secs.max(0.1));
    let mut keep_alive = tokio::time::interval_at((Instant::now() + period).into(), period);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(end.into()) => return Ok(()),
            _ = keep_alive.tick() => {
                socket.send(Message::text("")).await.map_err(|e| Failed::other("ws idle", &ws_error_kind(&e)))?;
            }
            frame = socket.next() => match frame {
                Some(Ok(Message::Text(t))) if t.is_empty() => ctx.stats.keepalive_received(),
                Some(Ok(Message::Close(_))) | None => return Err(Failed::other("ws idle", "closed by server")),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(Failed::other("ws idle", &ws_error_kind(&e))),
            },
        }
    }
}
