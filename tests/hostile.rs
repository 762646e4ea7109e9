//! Hostile traffic: each resource a stranger can make the gateway hold has a bound, the bound is
//! exact, and a normal conversation is served meanwhile.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes (or `within` passes); returns what was read and whether it closed.
async fn read_to_close(tcp: &mut TcpStream, within: Duration) -> (String, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A normal conversation: started, a message accepted, the reply polled.
async fn converse(s: &TestServer) {
    let (token, conv, _) = s.conversation("helpdesk").await;
    s.say_ok(&token, &conv, "hello").await;
    let set = s.poll(&token, &conv, None).await;
    assert!(set["activities"].as_array().unwrap().len() >= 2, "{set}");
}

fn closed(metrics: &str, reason: &str) -> u64 {
    metric(
        metrics,
        &format!("botgate_http_connections_closed_total{{listener=\"public\",reason=\"{reason}\"}}"),
    )
    .unwrap()
}

/// With a cap of N connections, N are held (N-1 silent sockets and the client's keep-alive
/// connection), the next one is answered 503 `TooManyConnections` and closed, and the client's
/// conversation goes on over its connection; once a socket closes, a new one is accepted.
#[tokio::test]
async fn the_connection_past_the_cap_is_refused_with_503() {
    const CAP: usize = 40;
    let mut s = TestServer::with(|c| {
        c.server.max_connections = CAP;
        c.server.header_read_timeout_ms = 60_000;
    })
    .await;
    // One keep-alive connection for the normal conversation (reqwest pools it).
    s.http = reqwest::Client::builder().pool_max_idle_per_host(1).build().unwrap();
    converse(&s).await;
    let mut held = Vec::new();
    for _ in 0..CAP - 1 {
        held.push(TcpStream::connect(s.addr()).await.unwrap());
    }
    // Each held socket is accepted (the accept loop takes them in order); wait for the gauge.
    let open = "botgate_http_connections_open{listener=\"public\"}";
    for _ in 0..200 {
        if metric(&s.metrics().await, open) == Some(CAP as u64) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metric(&s.metrics().await, open), Some(CAP as u64));
    let mut over = TcpStream::connect(s.addr()).await.unwrap();
    let (answer, was_closed) = read_to_close(&mut over, Duration::from_secs(10)).await;
    assert!(was_closed, "the connection past the cap is closed");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("\"TooManyConnections\""), "{answer}");
    assert_eq!(closed(&s.metrics().await, "over_cap"), 1);
    converse(&s).await; // the client's own connection still serves
    // A held socket goes away: its place is free again.
    drop(held.pop());
    let mut again = None;
    for _ in 0..200 {
        let res = reqwest::Client::new().get(s.url("/v3/directline/conversations/x/activities")).send().await;
        if let Ok(res) = res
            && res.status() != 503
        {
            again = Some(res.status());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(again, Some(reqwest::StatusCode::UNAUTHORIZED), "a freed place takes a new connection");
    assert_eq!(closed(&s.metrics().await, "over_cap"), 1, "nothing else was refused");
}

/// A slowloris: a request head sent a byte at a time is cut at the header deadline, counted
/// from the connection's opening, while a normal conversation goes on.
#[tokio::test]
async fn a_slowloris_head_is_cut_at_the_header_deadline() {
    const HEADER_MS: u64 = 600;
    let s = TestServer::with(|c| c.server.header_read_timeout_ms = HEADER_MS).await;
    let opened = Instant::now();
    let mut slow = TcpStream::connect(s.addr()).await.unwrap();
    let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut cut_after = None;
    for b in head.iter().cycle().take(1000) {
        if slow.write_all(std::slice::from_ref(b)).await.is_err() {
            cut_after = Some(opened.elapsed());
            break;
        }
        // Check for the close without blocking: a read of 0 is the server's FIN.
        let mut one = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(50), slow.read(&mut one)).await
        {
            cut_after = Some(opened.elapsed());
            break;
        }
    }
    let cut_after = cut_after.expect("the slow head was never cut");
    assert!(cut_after >= Duration::from_millis(HEADER_MS), "cut before the deadline: {cut_after:?}");
    converse(&s).await;
    let m = s.metrics().await;
    assert_eq!(closed(&m, "header_timeout"), 1);
    assert_eq!(closed(&m, "idle_timeout"), 0, "the normal client's connection is still in use");
}

/// A connection that opens and sends nothing is closed at the header deadline; one that made a
/// request and then idles is closed at the keep-alive deadline, which is longer.
#[tokio::test]
async fn silent_and_idle_connections_are_closed_at_their_deadlines() {
    const HEADER_MS: u64 = 300;
    const IDLE_MS: u64 = 900;
    let s = TestServer::with(|c| {
        c.server.header_read_timeout_ms = HEADER_MS;
        c.server.keepalive_idle_ms = IDLE_MS;
    })
    .await;
    let opened = Instant::now();
    let mut silent = TcpStream::connect(s.addr()).await.unwrap();
    let mut idle = TcpStream::connect(s.addr()).await.unwrap();
    let asked = Instant::now();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let (_, silent_closed) = read_to_close(&mut silent, Duration::from_secs(10)).await;
    assert!(silent_closed);
    assert!(opened.elapsed() >= Duration::from_millis(HEADER_MS));
    let (answer, idle_closed) = read_to_close(&mut idle, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(idle_closed);
    assert!(asked.elapsed() >= Duration::from_millis(IDLE_MS), "{:?}", asked.elapsed());
    let m = s.metrics().await;
    assert_eq!(closed(&m, "header_timeout"), 1);
    assert_eq!(closed(&m, "idle_timeout"), 1);
}

/// A request head over `server.max_header_bytes` is answered 431 and closed.
#[tokio::test]
async fn an_oversized_head_is_431() {
    let s = TestServer::with(|c| c.server.max_header_bytes = 4096).await;
    let mut tcp = TcpStream::connect(s.addr()).await.unwrap();
    let big = "a".repeat(8000);
    let req = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let _ = tcp.write_all(req.as_bytes()).await;
    let (answer, was_closed) = read_to_close(&mut tcp, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(was_closed);
    // Just under the bound is served.
    let ok = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(3000)
    );
    let mut tcp = TcpStream::connect(s.addr()).await.unwrap();
    tcp.write_all(ok.as_bytes()).await.unwrap();
    let (answer, _) = read_to_close(&mut tcp, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    converse(&s).await;
}

async fn post(s: &TestServer, token: &str, conv: &str, activity: &serde_json::Value) -> reqwest::Response {
    s.http
        .post(s.url(&format!("/v3/directline/conversations/{conv}/activities")))
        .bearer_auth(token)
        .json(activity)
        .send()
        .await
        .unwrap()
}

/// A conversation keeps at most `max_retained_bytes` of activities: a flood of large events
/// leaves the newest that fit, contiguous up to the watermark, and every event was accepted.
#[tokio::test]
async fn a_conversation_keeps_a_bounded_number_of_bytes() {
    const BUDGET: usize = 64 * 1024;
    let s = TestServer::with(|c| c.channel.max_retained_bytes = BUDGET).await;
    let (token, conv, _) = s.conversation("helpdesk").await;
    let pad = "p".repeat(10_000);
    for i in 0..40 {
        let event = serde_json::json!({"type": "event", "name": "flood", "value": format!("{i}:{pad}"), "from": {"id": "u"}});
        assert_eq!(post(&s, &token, &conv, &event).await.status(), 200);
    }
    let set = s.poll(&token, &conv, None).await;
    let kept = set["activities"].as_array().unwrap();
    let bytes: usize = kept.iter().map(|a| a.to_string().len()).sum();
    assert!(bytes <= BUDGET, "{bytes} bytes kept");
    assert_eq!(kept.len(), 6, "six 10 KB events fit in 64 KiB, a seventh does not");
    assert_eq!(kept.last().unwrap()["value"].as_str().unwrap().split(':').next(), Some("39"));
    let watermark: u64 = set["watermark"].as_str().unwrap().parse().unwrap();
    for (i, a) in kept.iter().enumerate() {
        let seq: u64 = a["id"].as_str().unwrap().rsplit('|').next().unwrap().parse().unwrap();
        assert_eq!(seq, watermark - kept.len() as u64 + i as u64, "the newest, contiguous");
    }
    converse(&s).await;
}

/// `GET /activities` answers at most a page (by count and by bytes); following the watermark
/// reads everything once, in order.
#[tokio::test]
async fn polls_are_paged_and_the_watermark_continues() {
    let s = TestServer::with(|c| {
        c.channel.max_page_activities = 3;
        c.channel.max_page_bytes = 16 * 1024;
    })
    .await;
    let (token, conv, _) = s.conversation("helpdesk").await;
    for i in 0..4 {
        s.say_ok(&token, &conv, &format!("vpn {i}")).await; // a message and its reply each
    }
    let big = "b".repeat(9_000);
    for _ in 0..3 {
        let event = serde_json::json!({"type": "event", "name": "big", "value": big, "from": {"id": "u"}});
        assert_eq!(post(&s, &token, &conv, &event).await.status(), 200);
    }
    let total = s.state().channel().conversation(&conv).unwrap().watermark();
    assert_eq!(total, 1 + 8 + 3, "greeting, four messages and replies, three events");
    let mut seen = Vec::new();
    let mut watermark: Option<String> = None;
    let mut pages = Vec::new();
    loop {
        let set = s.poll(&token, &conv, watermark.as_deref()).await;
        let page = set["activities"].as_array().unwrap().clone();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 3);
        let bytes: usize = page.iter().map(|a| a.to_string().len()).sum();
        assert!(page.len() == 1 || bytes <= 16 * 1024, "{bytes} bytes in a page of {}", page.len());
        pages.push(page.len());
        seen.extend(page.iter().map(|a| a["id"].as_str().unwrap().to_string()));
        watermark = Some(set["watermark"].as_str().unwrap().to_string());
    }
    // 9 small activities in pages of 3, then the 9 KB events one per page (two exceed 16 KiB).
    assert_eq!(pages, vec![3, 3, 3, 1, 1, 1]);
    let expected: Vec<String> = (0..total).map(|n| format!("{conv}|{n:07}")).collect();
    assert_eq!(seen, expected);
}

/// A WebSocket reader that stops reading is disconnected at the write timeout instead of being
/// buffered for; the conversation goes on, and what the socket missed stays in the log for a poll.
#[tokio::test]
async fn a_stream_reader_that_stops_reading_is_disconnected() {
    use futures_util::StreamExt;
    let s = TestServer::with(|c| {
        c.channel.stream_write_timeout_ms = 300;
        c.metering.rate_limit_per_minute = 100_000;
    })
    .await;
    let (token, conv, started) = s.conversation("helpdesk").await;
    let url = started["streamUrl"].as_str().unwrap().to_string();
    // A client socket with a small receive window, which then never reads.
    let tcp = tokio::net::TcpSocket::new_v4().unwrap();
    tcp.set_recv_buffer_size(4096).unwrap();
    let tcp = tcp.connect(s.addr()).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(url.as_str(), tcp).await.unwrap();
    let pad = "w".repeat(200_000);
    let mut posted = 0;
    // Far more than the kernel buffers hold: the server's writes stall, and it gives up.
    while posted < 200 {
        let event = serde_json::json!({"type": "event", "name": "big", "value": pad, "from": {"id": "u"}});
        assert_eq!(post(&s, &token, &conv, &event).await.status(), 200);
        posted += 1;
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await; // past the write timeout
    // Now drain: the socket ends (the server closed it) instead of streaming on.
    let drained = tokio::time::timeout(Duration::from_secs(20), async {
        let mut frames = 0;
        while let Some(Ok(_)) = ws.next().await {
            frames += 1;
        }
        frames
    })
    .await;
    assert!(drained.is_ok(), "the stalled socket was never closed");
    converse(&s).await;
    let set = s.poll(&token, &conv, None).await;
    assert_eq!(set["activities"].as_array().unwrap().last().unwrap()["name"], "big");
}

/// An author's token for the demo tenant, signed by the embedded development issuer.
fn author_token(s: &TestServer) -> String {
    use botgate::clock::Clock;
    use botgate::identity::dev_issuer::{self, TokenRequest};
    let key = dev_issuer::load_or_create(&s.dir.path().join("data")).unwrap();
    let req = TokenRequest {
        tenant: "contoso".into(),
        user: "alice".into(),
        name: None,
        groups: vec![],
        admin: false,
        operator: false,
        ttl_secs: 3600,
    };
    dev_issuer::sign(&key, "botgate-dev", "botgate", &req, s.clock.now_secs())
}

fn upstream_bot(id: &str, endpoint: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "name": "Upstream", "kind": "upstream", "endpoint": endpoint})
}

/// The outbound policy: with loopback denied (the default outside the demo), an author cannot
/// point a bot at loopback, private or metadata addresses; and a bot created while loopback was
/// allowed is refused at call time once it is not, before any connection, so an internal
/// service sees nothing and open and closed ports answer alike.
#[tokio::test]
async fn upstream_endpoints_cannot_reach_internal_services() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = Arc::new(AtomicUsize::new(0));
    let internal = {
        let hits = hits.clone();
        axum::Router::new().fallback(move || {
            hits.fetch_add(1, Ordering::SeqCst);
            async {
                axum::Json(
                    serde_json::json!({"activities": [{"type": "message", "text": "INTERNAL-SECRET"}]}),
                )
            }
        })
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let open = format!("http://{}/api/messages", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, internal).await.unwrap() });
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/api/messages", l.local_addr().unwrap())
    };

    let s = TestServer::with(|c| c.outbound.allow_loopback = false).await;
    let author = author_token(&s);
    for endpoint in [
        open.as_str(),
        closed.as_str(),
        "http://localhost:3978/api/messages",
        "http://[::1]:3978/api/messages",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.7/api/messages",
        "http://[::ffff:127.0.0.1]:3978/",
    ] {
        let res = s
            .http
            .post(s.url("/api/v1/bots"))
            .bearer_auth(&author)
            .json(&upstream_bot("probe", endpoint))
            .send()
            .await
            .unwrap();
        common::assert_error(res, 400, "EndpointNotAllowed").await;
    }
    let (dir, clock) = s.stop().await;

    // Created while loopback was allowed, published.
    let s = TestServer::in_dir(dir, clock, |c| c.outbound.allow_loopback = true).await;
    let author = author_token(&s);
    for (id, endpoint) in [("open", &open), ("closed", &closed)] {
        for path in ["/api/v1/bots".to_string(), format!("/api/v1/bots/{id}/publish")] {
            let body =
                if path == "/api/v1/bots" { upstream_bot(id, endpoint) } else { serde_json::json!({}) };
            let res = s.http.post(s.url(&path)).bearer_auth(&author).json(&body).send().await.unwrap();
            assert!(res.status().is_success(), "{path}: {}", res.status());
        }
    }
    let (dir, clock) = s.stop().await;

    // Served after the policy was tightened: refused before connecting, alike for both ports.
    let s = TestServer::in_dir(dir, clock, |c| c.outbound.allow_loopback = false).await;
    for id in ["open", "closed"] {
        let (token, conv, _) = s.conversation(id).await;
        let res = s.say(&token, &conv, "hello").await;
        common::assert_error(res, 502, "BotError").await;
        let set = s.poll(&token, &conv, None).await;
        assert!(!set.to_string().contains("INTERNAL-SECRET"), "{set}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the internal service was never reached");
    converse(&s).await;
}

/// An upstream answer's `activities` are taken only as well-formed bot activities: one that
/// claims to come from the user, or has a `text` that is not a string, is dropped.
#[tokio::test]
async fn an_upstream_answer_cannot_plant_malformed_or_user_activities() {
    let bot = axum::Router::new().route(
        "/api/messages",
        axum::routing::post(|| async {
            axum::Json(serde_json::json!({"activities": [
                {"type": "message", "text": "fine"},
                {"type": "message", "text": "PLANTED-AS-USER", "from": {"id": "dl_user", "role": "user"}},
                {"type": "message", "text": ["PLANTED-ARRAY"]},
                {"text": "PLANTED-NO-TYPE"},
            ]}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/api/messages", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, bot).await.unwrap() });
    let s = TestServer::with(|c| {
        let toml = common::upstream_config_toml(&endpoint, "");
        c.bots.extend(botgate::config::Config::from_str(&toml, "t").unwrap().bots);
    })
    .await;
    let (token, conv, _) = s.conversation("up").await;
    s.say_ok(&token, &conv, "hello").await;
    let set = s.poll(&token, &conv, None).await;
    let texts: Vec<String> =
        set["activities"].as_array().unwrap().iter().map(|a| a["text"].to_string()).collect();
    assert!(texts.contains(&"\"fine\"".to_string()), "{texts:?}");
    assert!(!set.to_string().contains("PLANTED"), "{set}");
}

/// The optional per-client rate on open-bot tokens: a client address gets the limit's worth a
/// minute, then 429; `X-Forwarded-For` counts only from a trusted proxy, so a client cannot
/// spread itself over forged addresses, and clients behind the proxy have their own counts.
#[tokio::test]
async fn open_bot_tokens_are_rate_limited_per_client_address() {
    let token = |s: &TestServer, xff: Option<&str>| {
        let mut rb = s.http.get(s.url("/api/v1/bots/helpdesk/directline/token"));
        if let Some(x) = xff {
            rb = rb.header("x-forwarded-for", x);
        }
        rb.send()
    };
    let s = TestServer::with(|c| c.channel.open_token_rate_per_minute = 3).await;
    for i in 0..3 {
        // A forged header from an untrusted peer changes nothing.
        assert_eq!(token(&s, Some(&format!("198.51.100.{i}"))).await.unwrap().status(), 200);
    }
    let res = token(&s, Some("198.51.100.77")).await.unwrap();
    assert!(res.headers().get("retry-after").is_some());
    common::assert_error(res, 429, "RateLimited").await;
    s.clock.advance_secs(60);
    assert_eq!(token(&s, None).await.unwrap().status(), 200, "the next minute");

    let s = TestServer::with(|c| {
        c.channel.open_token_rate_per_minute = 3;
        c.server.trusted_proxies = vec!["127.0.0.1/32".into()];
    })
    .await;
    for _ in 0..3 {
        assert_eq!(token(&s, Some("198.51.100.1")).await.unwrap().status(), 200);
    }
    common::assert_error(token(&s, Some("198.51.100.1")).await.unwrap(), 429, "RateLimited").await;
    // The client cannot escape by writing another address to the left of the proxy's.
    common::assert_error(token(&s, Some("203.0.113.5, 198.51.100.1")).await.unwrap(), 429, "RateLimited")
        .await;
    assert_eq!(token(&s, Some("198.51.100.2")).await.unwrap().status(), 200, "another client");
    converse(&s).await;
}

/// A flood spread over many conversations of one bot is bounded by the bot's byte budget:
/// past it the bot's activities are 503 `Overloaded`, another bot is served meanwhile, and once
/// the flooded conversations end the budget is free again.
#[tokio::test]
async fn a_bots_conversations_hold_a_bounded_number_of_bytes() {
    const BUDGET: usize = 200 * 1024;
    let s = TestServer::with(|c| {
        c.channel.max_retained_bytes = 64 * 1024;
        c.channel.max_retained_bytes_per_bot = BUDGET;
        c.channel.idle_timeout_secs = 600;
        c.metering.rate_limit_per_minute = 1_000_000;
        let mut other = c.bots[0].clone();
        other.id = "other".into();
        c.bots.push(other);
    })
    .await;
    let pad = "f".repeat(20_000);
    let event = serde_json::json!({"type": "event", "name": "flood", "value": pad, "from": {"id": "u"}});
    let (mut accepted, mut refused) = (0usize, 0usize);
    for _ in 0..10 {
        let (token, conv) = {
            let (t, c, _) = s.conversation("other").await;
            (t, c)
        };
        for _ in 0..3 {
            let res = post(&s, &token, &conv, &event).await;
            match res.status().as_u16() {
                200 => accepted += 1,
                503 => {
                    common::assert_error(res, 503, "Overloaded").await;
                    refused += 1;
                }
                other => panic!("unexpected {other}"),
            }
        }
    }
    let bot = s.state().channel().bot("other").unwrap();
    let held = bot.control.retained();
    // The check is made before an activity is kept: at most one activity (and its greeting-sized
    // neighbours) beyond the budget.
    assert!(held < BUDGET + 21_000, "{held} bytes held");
    assert!(held >= BUDGET, "{held}: the budget was reached");
    assert_eq!(accepted + refused, 30);
    // Each accepted event holds a little over 20,000 bytes: the budget took 9 to 11 of them.
    assert!((BUDGET / 21_000..=BUDGET / 20_000 + 1).contains(&accepted), "{accepted} accepted");
    assert!(refused > 0);
    converse(&s).await; // helpdesk has its own budget
    // The flooded conversations end: their bytes are released and the bot serves again.
    s.clock.advance_secs(601);
    s.state().sweep();
    assert_eq!(bot.control.retained(), 0);
    let (token, conv, _) = s.conversation("other").await;
    assert_eq!(post(&s, &token, &conv, &event).await.status(), 200);
}
