//! The message path (`POST` and `GET .../activities`) is served beside the router, by its own
//! service: it answers exactly as the full stack does. Each property is checked on the hot
//! path and, where the request can be made to take the stack (a percent-encoded id, which the
//! router decodes), on the stack too.

mod common;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROUTE: &str = "/v3/directline/conversations/{id}/activities";

/// The conversation id with its first character percent-encoded: the same conversation, reached
/// through the router.
fn through_the_stack(conv: &str) -> String {
    let first = conv.as_bytes()[0];
    format!("%{first:02X}{}", &conv[1..])
}

fn counted(m: &str, class: &str) -> u64 {
    metric(m, &format!(r#"botgate_http_requests_total{{route="{ROUTE}",status="{class}"}}"#)).unwrap()
}

#[tokio::test]
async fn messages_and_polls_answer_as_the_full_stack_does() {
    let s = TestServer::start().await;
    let (token, conv, _) = s.conversation("helpdesk").await;
    for id in [conv.clone(), through_the_stack(&conv)] {
        let url = s.url(&format!("/v3/directline/conversations/{id}/activities"));
        // A browser's message: request id, CORS headers, the JSON answer.
        let res = s
            .http
            .post(&url)
            .bearer_auth(&token)
            .header("origin", "https://shop.example")
            .json(&json!({"type": "message", "from": {"id": "dl_user"}, "text": "vpn"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{id}");
        let h = res.headers().clone();
        assert!(h.contains_key("x-request-id"), "{id}: {h:?}");
        assert_eq!(h["access-control-allow-origin"], "https://shop.example");
        assert_eq!(h["access-control-expose-headers"], "x-request-id, retry-after");
        assert_eq!(h["vary"], "origin");
        assert_eq!(h["content-type"], "application/json");
        let v: Value = res.json().await.unwrap();
        assert!(v["id"].as_str().unwrap().starts_with(&conv));
        // A client's own request id is kept; no Origin, no CORS headers.
        let res = s
            .http
            .get(format!("{url}?watermark="))
            .bearer_auth(&token)
            .header("x-request-id", "mine-7")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-request-id"], "mine-7");
        assert!(!res.headers().contains_key("access-control-allow-origin"));
        // Bad input: the same codes.
        let res = s.http.get(format!("{url}?watermark=abc")).bearer_auth(&token).send().await.unwrap();
        assert_error(res, 400, "BadRequest").await;
        let res = s.http.post(&url).bearer_auth(&token).body("not json").send().await.unwrap();
        assert_error(res, 400, "BadRequest").await;
        let res = s.http.post(&url).send().await.unwrap();
        assert_error(res, 401, "MissingAuthorization").await;
        let big = vec![b' '; s.state().config().server.max_body_bytes + 1];
        let res = s.http.post(&url).bearer_auth(&token).body(big).send().await.unwrap();
        assert_error(res, 413, "PayloadTooLarge").await;
    }
    // Counted under the route's template, both ways: 2 × (message + poll) 2xx, and the refusals:
    // four on the hot path, three through the stack, whose body limit refuses an oversized
    // `Content-Length` before routing (so before its per-route count).
    let m = s.metrics().await;
    assert_eq!(counted(&m, "2xx"), 4, "{m}");
    assert_eq!(counted(&m, "4xx"), 7);
    assert_eq!(
        metric(&m, &format!(r#"botgate_http_request_duration_seconds_count{{route="{ROUTE}"}}"#)),
        Some(11)
    );
    // One conversation, one billed session, two turns.
    assert_eq!(metric(&m, r#"botgate_turns_total{tenant="contoso",bot="helpdesk"}"#), Some(2));
    assert_eq!(metric(&m, r#"botgate_billed_sessions_total{tenant="contoso",bot="helpdesk"}"#), Some(1));
    // The session was the ledger's one batch, and its wait was observed once.
    assert_eq!(metric(&m, "botgate_ledger_commit_seconds_count"), Some(1));
    assert_eq!(metric(&m, "botgate_ledger_batch_sessions_sum"), Some(1));
    assert_eq!(metric(&m, "botgate_ledger_session_wait_seconds_count"), Some(1));
}

/// A chunked body over the limit (no `Content-Length` to refuse early) is a 413 on the hot path.
#[tokio::test]
async fn a_chunked_message_over_the_limit_is_413() {
    let s = TestServer::start().await;
    let (token, conv, _) = s.conversation("helpdesk").await;
    let mut tcp = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    let head = format!(
        "POST /v3/directline/conversations/{conv}/activities HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {token}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b' '; 8192];
    for _ in 0..(s.state().config().server.max_body_bytes / chunk.len() + 2) {
        let frame = [format!("{:x}\r\n", chunk.len()).into_bytes(), chunk.clone(), b"\r\n".to_vec()].concat();
        if tcp.write_all(&frame).await.is_err() {
            break;
        }
    }
    let _ = tcp.write_all(b"0\r\n\r\n").await;
    let mut out = vec![0u8; 4096];
    let n =
        tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut out)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&out[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"PayloadTooLarge\""), "{answer}");
}

/// A message to a bot slower than the request timeout is the stack's JSON 504.
#[tokio::test]
async fn a_message_over_the_request_timeout_is_a_json_504() {
    let (slow, calls) = slow_bot(2500).await;
    let s = TestServer::with(|c| {
        c.server.request_timeout_secs = 1;
        let toml = upstream_config_toml(&format!("http://{slow}/api/messages"), "");
        c.bots.extend(botgate::config::Config::from_str(&toml, "t").unwrap().bots);
        c.upstream.timeout_secs = 10;
    })
    .await;
    // The conversation start's update waits for the slow bot too; the conversation exists.
    let (token, conv) = s.open_token("up").await;
    let _ = s.http.post(s.url("/v3/directline/conversations")).bearer_auth(&token).send().await.unwrap();
    let res = s.say(&token, &conv, "hello").await;
    assert!(res.headers().contains_key("x-request-id"));
    assert_error(res, 504, "Timeout").await;
    // The start's conversationUpdate and the message, each once (a timeout retries nothing).
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    let m = s.metrics().await;
    assert_eq!(counted(&m, "5xx"), 1, "{m}");
}

/// A bot that records what it receives and answers 200 at once.
async fn recording_bot() -> (std::net::SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/api/messages",
        axum::routing::post(move |axum::Json(a): axum::Json<Value>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(a);
                axum::Json(json!({}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, rx)
}

/// An upstream bot's callbacks, with and without a reply id (percent-encoded, as SDK bots send
/// it), take the message path's service too: appended, counted under their templates, and
/// refused with the same codes as through the stack.
#[tokio::test]
async fn a_bots_callbacks_answer_as_the_full_stack_does() {
    let (bot, mut received) = recording_bot().await;
    let s = TestServer::with(|c| {
        let toml = upstream_config_toml(&format!("http://{bot}/api/messages"), "");
        c.bots.extend(botgate::config::Config::from_str(&toml, "t").unwrap().bots);
    })
    .await;
    let (token, conv) = s.open_token("up").await;
    let res = s.http.post(s.url("/v3/directline/conversations")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(res.status(), 201);
    let id = s.say_ok(&token, &conv, "hello").await;
    let message = loop {
        let a = received.recv().await.unwrap();
        if a["type"] == "message" {
            break a;
        }
    };
    let service = message["serviceUrl"].as_str().unwrap().to_string();
    // What the bot got: the stored activity, its callback URL and itself as recipient.
    assert!(service.starts_with(&s.url("/connector/")), "{message}");
    assert_eq!(message["id"], id.as_str());
    assert_eq!(
        (message["channelId"].as_str(), message["conversation"]["id"].as_str()),
        (Some("directline"), Some(conv.as_str()))
    );
    assert_eq!(
        (message["recipient"]["id"].as_str(), message["recipient"]["role"].as_str()),
        (Some("up"), Some("bot"))
    );
    assert_eq!(
        (message["from"]["id"].as_str(), message["from"]["role"].as_str()),
        (Some("dl_user"), Some("user"))
    );
    assert!(message["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{message}");
    // A client's own `serviceUrl` and `recipient` never reach the bot.
    let forged = json!({"type": "message", "from": {"id": "dl_user"}, "text": "x",
        "serviceUrl": "http://evil.example", "recipient": {"id": "someone"}});
    let res = s
        .http
        .post(s.url(&format!("/v3/directline/conversations/{conv}/activities")))
        .bearer_auth(&token)
        .json(&forged)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let got = loop {
        let a = received.recv().await.unwrap();
        if a["type"] == "message" {
            break a;
        }
    };
    assert_eq!(got["serviceUrl"], service.as_str());
    assert_eq!(got["recipient"]["id"], "up");
    let encoded_id = id.replace('|', "%7C");
    for (conv_segment, reply) in
        [(conv.clone(), true), (conv.clone(), false), (through_the_stack(&conv), true)]
    {
        let url = if reply {
            format!("{service}/v3/conversations/{conv_segment}/activities/{encoded_id}")
        } else {
            format!("{service}/v3/conversations/{conv_segment}/activities")
        };
        let res =
            s.http.post(&url).json(&json!({"type": "message", "text": "from the bot"})).send().await.unwrap();
        assert_eq!(res.status(), 200, "{url}");
        assert!(res.headers().contains_key("x-request-id"));
        let v: Value = res.json().await.unwrap();
        assert!(v["id"].as_str().unwrap().starts_with(&conv), "{v}");
    }
    // The replies are in the conversation, the first two replying to the user's message.
    let log = s.poll(&token, &conv, None).await;
    let from_bot: Vec<&Value> =
        log["activities"].as_array().unwrap().iter().filter(|a| a["text"] == "from the bot").collect();
    assert_eq!(from_bot.len(), 3, "{log}");
    assert_eq!(from_bot[0]["replyToId"], id.as_str());
    assert_eq!(from_bot[0]["from"]["id"], "up");
    // A wrong key, a reply id that is not UTF-8 once decoded, a body that is not an activity.
    let wrong_key = service.rsplit_once('/').map(|(base, _)| format!("{base}/nokey")).unwrap();
    let res = s
        .http
        .post(format!("{wrong_key}/v3/conversations/{conv}/activities"))
        .json(&json!({"type": "message"}))
        .send()
        .await
        .unwrap();
    assert_error(res, 404, "NotFound").await;
    let res = s
        .http
        .post(format!("{service}/v3/conversations/{conv}/activities/%FF"))
        .json(&json!({"type": "message"}))
        .send()
        .await
        .unwrap();
    assert_error(res, 400, "BadRequest").await;
    let res =
        s.http.post(format!("{service}/v3/conversations/{conv}/activities")).body("[]").send().await.unwrap();
    assert_error(res, 400, "BadRequest").await;
    let m = s.metrics().await;
    let at = |route: &str, class: &str| {
        metric(&m, &format!(r#"botgate_http_requests_total{{route="{route}",status="{class}"}}"#)).unwrap()
    };
    let (send, reply) = (
        "/connector/{key}/v3/conversations/{id}/activities",
        "/connector/{key}/v3/conversations/{id}/activities/{reply_to}",
    );
    assert_eq!((at(send, "2xx"), at(reply, "2xx")), (1, 2), "{m}");
    assert_eq!((at(send, "4xx"), at(reply, "4xx")), (2, 1), "{m}");
}
