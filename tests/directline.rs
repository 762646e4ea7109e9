//! The Direct Line 3.0 channel through the real server (port 0) with a real HTTP client and a
//! real WebSocket client: every endpoint and every error status.

mod common;

use std::time::Duration;

use botgate::config::BotConfig;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn bot(toml_text: &str) -> BotConfig {
    toml::from_str(toml_text).unwrap()
}

const SECRET: &str = "secret-one-0123456789";
const SECRET2: &str = "secret-two-0123456789";

fn secured_bot() -> BotConfig {
    bot(&format!(
        r#"
id = "secured"
tenant = "contoso"
name = "Secured"
secured_access = true
allowed_origins = ["https://www.contoso.example"]
channel_secrets = ["{SECRET}", "{SECRET2}"]
kind = "builtin"
topics = [
  {{ name = "Fallback", kind = "system", system = "fallback", replies = ["?"] }},
  {{ name = "Hi", kind = "user", triggers = ["hi"], replies = ["hello"] }},
]
"#
    ))
}

#[tokio::test]
async fn start_send_and_poll_with_watermarks_in_order() {
    let s = TestServer::start().await;
    let (token, conv, start) = s.conversation("helpdesk").await;
    assert_eq!(start["expires_in"], 1800);
    assert!(start["streamUrl"].as_str().unwrap().starts_with(&format!("ws://{}/", s.addr())));

    let first = s.poll(&token, &conv, None).await;
    assert_eq!(first["watermark"], "1");
    assert_eq!(first["activities"][0]["from"]["role"], "bot", "the greeting");

    let res = s
        .http
        .post(s.url(&format!("/v3/directline/conversations/{conv}/activities")))
        .bearer_auth(&token)
        .json(&json!({"type":"message","from":{"id":"dl_user"},"text":"I forgot my password",
                      "channelData":{"clientActivityID":"abc"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/json");
    let id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();

    let next = s.poll(&token, &conv, Some("1")).await;
    assert_eq!(next["watermark"], "4");
    let acts = next["activities"].as_array().unwrap();
    assert_eq!(acts.len(), 3);
    assert_eq!(acts[0]["id"], id.as_str());
    assert_eq!(acts[0]["channelData"]["clientActivityID"], "abc", "the echo keeps client fields");
    assert_eq!(acts[0]["channelId"], "directline");
    assert_eq!(acts[0]["conversation"]["id"], conv.as_str());
    for reply in &acts[1..] {
        assert_eq!(reply["replyToId"], id.as_str());
        assert_eq!(reply["from"]["id"], "helpdesk");
    }
    let ts: Vec<&str> = acts.iter().map(|a| a["timestamp"].as_str().unwrap()).collect();
    assert!(ts.windows(2).all(|w| w[0] < w[1]), "timestamps increase: {ts:?}");

    let all = s.poll(&token, &conv, None).await;
    assert_eq!(all["activities"].as_array().unwrap().len(), 4);
    let none = s.poll(&token, &conv, Some("4")).await;
    assert_eq!(none, json!({"activities": [], "watermark": "4"}));
    let res = s
        .http
        .get(s.url(&format!("/v3/directline/conversations/{conv}/activities?watermark=x")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_error(res, 400, "BadRequest").await;
}

#[tokio::test]
async fn starting_twice_answers_200_and_resume_gives_a_fresh_stream_url() {
    let s = TestServer::start().await;
    let (token, conv, _) = s.conversation("helpdesk").await;
    let res = s.http.post(s.url("/v3/directline/conversations")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["conversationId"], conv.as_str());
    let res = s
        .http
        .get(s.url(&format!("/v3/directline/conversations/{conv}?watermark=1")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["conversationId"], conv.as_str());
    assert!(v["streamUrl"].as_str().unwrap().ends_with("&watermark=1"), "{v}");
    assert_eq!(v["token"], token.as_str());
    // The greeting is sent once, even if the client also sends the start event.
    let res = s
        .http
        .post(s.url(&format!("/v3/directline/conversations/{conv}/activities")))
        .bearer_auth(&token)
        .json(&json!({"type":"event","name":"startConversation","from":{"id":"u"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let all = s.poll(&token, &conv, None).await;
    assert_eq!(all["activities"].as_array().unwrap().len(), 2, "greeting + the echoed event");
}

/// Waits (at most 5 s) for the server to close the socket.
async fn assert_closes(
    ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) {
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server did not close the socket");
}

async fn next_set(
    ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
        if let Message::Text(t) = msg {
            if t.is_empty() {
                continue;
            }
            return serde_json::from_str(&t).unwrap();
        }
    }
}

#[tokio::test]
async fn websocket_replays_streams_keeps_alive_and_a_second_socket_closes_the_first() {
    let s = TestServer::start().await;
    let (token, conv, start) = s.conversation("helpdesk").await;
    // The client posts before its socket is open: the socket replays from the start.
    s.say_ok(&token, &conv, "vpn").await;
    let url = start["streamUrl"].as_str().unwrap();
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let set = next_set(&mut ws).await;
    assert_eq!(set["watermark"], "3");
    assert_eq!(set["activities"].as_array().unwrap().len(), 3);

    ws.send(Message::Text("".into())).await.unwrap();
    let id = s.say_ok(&token, &conv, "opening hours?").await;
    let set = next_set(&mut ws).await;
    let acts = set["activities"].as_array().unwrap();
    assert_eq!(acts[0]["id"], id.as_str(), "the user's own message is echoed");
    let replies: Vec<&Value> = acts.iter().skip(1).collect();
    let more = if replies.is_empty() {
        next_set(&mut ws).await["activities"].as_array().unwrap().clone()
    } else {
        vec![]
    };
    let reply = replies.first().copied().or(more.first()).unwrap();
    assert_eq!(reply["replyToId"], id.as_str());

    // A resumed stream starts at its watermark.
    let (mut ws2, _) = tokio_tungstenite::connect_async(format!("{url}&watermark=5")).await.unwrap();
    let id2 = s.say_ok(&token, &conv, "password").await;
    let set = next_set(&mut ws2).await;
    assert_eq!(set["activities"][0]["id"], id2.as_str());
    // The first socket was closed by the second.
    assert_closes(&mut ws).await;

    // A bad token cannot open a stream.
    let bad = url.replace("?t=dl1.", "?t=dl1.x");
    assert!(tokio_tungstenite::connect_async(bad).await.is_err());
}

#[tokio::test]
async fn a_client_frame_up_to_the_limit_is_read_and_a_larger_one_closes_the_socket() {
    // The socket starts with a small read buffer: a frame of 16 KiB must still be read whole
    // (the buffer grows), and the stream go on; one byte more is refused.
    let s = TestServer::start().await;
    let (token, conv, start) = s.conversation("helpdesk").await;
    let url = start["streamUrl"].as_str().unwrap();
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(next_set(&mut ws).await["watermark"], "1", "the greeting");
    let limit = botgate::channel::stream::MAX_CLIENT_MESSAGE;
    ws.send(Message::Text("x".repeat(limit).into())).await.unwrap();
    let id = s.say_ok(&token, &conv, "vpn").await;
    let set = next_set(&mut ws).await;
    assert_eq!(set["activities"][0]["id"], id.as_str(), "the stream goes on after a 16 KiB frame");
    ws.send(Message::Text("x".repeat(limit + 1).into())).await.unwrap();
    assert_closes(&mut ws).await;
}

#[tokio::test]
async fn tokens_expire_on_the_clock_and_refresh_before_that() {
    let s = TestServer::with(|c| c.channel.idle_timeout_secs = 7200).await;
    let (token, conv, _) = s.conversation("helpdesk").await;
    s.clock.advance_secs(1000);
    let res = s.http.post(s.url("/v3/directline/tokens/refresh")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["expires_in"], 1800);
    assert_eq!(v["conversationId"], conv.as_str());
    let fresh = v["token"].as_str().unwrap().to_string();

    s.clock.advance_secs(801);
    assert_error(s.say(&token, &conv, "vpn").await, 403, "TokenExpired").await;
    let res = s.http.post(s.url("/v3/directline/tokens/refresh")).bearer_auth(&token).send().await.unwrap();
    assert_error(res, 403, "TokenExpired").await;
    s.say_ok(&fresh, &conv, "vpn").await;
    let res = s.http.post(s.url("/v3/directline/tokens/refresh")).bearer_auth(SECRET).send().await.unwrap();
    assert_error(res, 403, "InvalidSecret").await;
}

#[tokio::test]
async fn credentials_are_checked_for_bot_and_conversation() {
    let s = TestServer::with(|c| c.bots.push(secured_bot())).await;
    let (token_a, conv_a, _) = s.conversation("helpdesk").await;
    let (token_b, conv_b, _) = s.conversation("helpdesk").await;
    assert_error(s.say(&token_a, &conv_b, "vpn").await, 403, "WrongConversation").await;
    assert_error(s.say(&token_b, &conv_a, "vpn").await, 403, "WrongConversation").await;

    let url = s.url(&format!("/v3/directline/conversations/{conv_a}/activities"));
    assert_error(s.http.post(&url).send().await.unwrap(), 401, "MissingAuthorization").await;
    assert_error(
        s.http.post(&url).header("authorization", "Basic x").send().await.unwrap(),
        401,
        "MalformedAuthorization",
    )
    .await;
    assert_error(s.http.post(&url).bearer_auth("dl1.nope.nope").send().await.unwrap(), 403, "InvalidToken")
        .await;

    // Another bot's secret cannot act on this bot's conversation.
    let res = s
        .http
        .get(s.url(&format!("/v3/directline/conversations/{conv_a}/activities")))
        .bearer_auth(SECRET)
        .send()
        .await
        .unwrap();
    assert_error(res, 403, "WrongConversation").await;
    // A token whose conversation never started.
    let (unstarted, conv_u) = s.open_token("helpdesk").await;
    assert_error(s.say(&unstarted, &conv_u, "vpn").await, 404, "ConversationNotFound").await;
    // Unknown bot.
    let res = s.http.get(s.url("/api/v1/bots/nobody/directline/token")).send().await.unwrap();
    assert_error(res, 404, "BotNotFound").await;
    // A value shaped like a token (not a secret) that this gateway did not make.
    let res = s
        .http
        .post(s.url("/v3/directline/conversations"))
        .bearer_auth("eyJhbGciOiJIUzI1NiJ9.eyJib3QiOiJ4In0.c2lnbmF0dXJl")
        .send()
        .await
        .unwrap();
    let v = assert_error(res, 403, "InvalidToken").await;
    assert!(v["error"]["message"].as_str().unwrap().contains("token"), "{v}");
}

#[tokio::test]
async fn secured_bots_need_a_secret_and_check_the_origin() {
    let s = TestServer::with(|c| c.bots.push(secured_bot())).await;
    let res = s.http.get(s.url("/api/v1/bots/secured/directline/token")).send().await.unwrap();
    assert_error(res, 403, "SecuredAccessRequired").await;

    let res = s
        .http
        .post(s.url("/v3/directline/tokens/generate"))
        .bearer_auth(SECRET2)
        .json(&json!({"user": {"id": "dl_alice"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    let (token, conv) =
        (v["token"].as_str().unwrap().to_string(), v["conversationId"].as_str().unwrap().to_string());
    let res = s.http.post(s.url("/v3/directline/conversations")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(res.status(), 201);
    s.say_ok(&token, &conv, "hi").await;
    let acts = s.poll(&token, &conv, None).await;
    assert_eq!(acts["activities"][0]["from"]["id"], "dl_alice", "the token's user overrides from.id");

    let res = s
        .http
        .post(s.url("/v3/directline/tokens/generate"))
        .bearer_auth("wrong-secret-000000")
        .send()
        .await
        .unwrap();
    assert_error(res, 403, "InvalidSecret").await;

    // A conversation started with the secret itself.
    let res = s.http.post(s.url("/v3/directline/conversations")).bearer_auth(SECRET).send().await.unwrap();
    assert_eq!(res.status(), 201);
    let conv2 = res.json::<Value>().await.unwrap()["conversationId"].as_str().unwrap().to_string();
    s.say_ok(SECRET, &conv2, "hi").await;

    // Browsers: the allowed origin passes, another is refused.
    let send = |origin: &'static str| {
        s.http
            .post(s.url(&format!("/v3/directline/conversations/{conv}/activities")))
            .bearer_auth(&token)
            .header("origin", origin)
            .json(&json!({"type":"message","from":{"id":"x"},"text":"hi"}))
            .send()
    };
    let ok = send("https://www.contoso.example").await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["access-control-allow-origin"], "https://www.contoso.example");
    assert_error(send("https://evil.example").await.unwrap(), 403, "OriginNotAllowed").await;
}

#[tokio::test]
async fn cors_preflights_need_no_authorization() {
    let s = TestServer::start().await;
    let res = s
        .http
        .request(reqwest::Method::OPTIONS, s.url("/v3/directline/conversations/abc/activities"))
        .header("origin", "https://shop.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization,content-type,x-ms-bot-agent")
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    assert_eq!(res.headers()["access-control-allow-origin"], "https://shop.example");
    let allowed = res.headers()["access-control-allow-headers"].to_str().unwrap().to_ascii_lowercase();
    for h in ["authorization", "content-type", "x-ms-bot-agent", "x-requested-with"] {
        assert!(allowed.contains(h), "{allowed}");
    }
    let res = s
        .http
        .get(s.url("/api/v1/bots/helpdesk/directline/token"))
        .header("origin", "https://shop.example")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["access-control-allow-origin"], "https://shop.example");
}

#[tokio::test]
async fn unpublished_bots_are_refused() {
    let s = TestServer::with(|c| {
        let mut b = secured_bot();
        b.id = "draft".into();
        b.published = false;
        b.secured_access = false;
        c.bots.push(b);
    })
    .await;
    let res = s.http.get(s.url("/api/v1/bots/draft/directline/token")).send().await.unwrap();
    assert_error(res, 403, "BotNotPublished").await;
    let res = s.http.post(s.url("/v3/directline/tokens/generate")).bearer_auth(SECRET).send().await.unwrap();
    assert_error(res, 403, "BotNotPublished").await;
}

#[tokio::test]
async fn malformed_activities_upload_and_the_end_of_a_conversation() {
    let s = TestServer::start().await;
    let (token, conv, _) = s.conversation("helpdesk").await;
    let url = s.url(&format!("/v3/directline/conversations/{conv}/activities"));
    let post = |body: Value| s.http.post(&url).bearer_auth(&token).json(&body).send();
    assert_error(post(json!({"text":"no type"})).await.unwrap(), 400, "BadRequest").await;
    assert_error(post(json!({"type":"message","text":"no from"})).await.unwrap(), 400, "BadRequest").await;
    assert_error(post(json!([1, 2])).await.unwrap(), 400, "BadRequest").await;
    let res = s
        .http
        .post(s.url(&format!("/v3/directline/conversations/{conv}/upload")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_error(res, 400, "BadRequest").await;

    let id = s.say_ok(&token, &conv, "ok bye").await;
    let acts = s.poll(&token, &conv, Some("1")).await;
    let acts = acts["activities"].as_array().unwrap();
    assert_eq!(acts.last().unwrap()["type"], "endOfConversation");
    assert_eq!(acts.last().unwrap()["replyToId"], id.as_str());
    assert_error(s.say(&token, &conv, "vpn").await, 404, "ConversationEnded").await;
    // Files, too, are refused once the conversation ended.
    let res = s
        .http
        .post(s.url(&format!("/v3/directline/conversations/{conv}/upload?userId=dl_user")))
        .bearer_auth(&token)
        .header("content-type", "text/plain")
        .body("late")
        .send()
        .await
        .unwrap();
    assert_error(res, 404, "ConversationEnded").await;
}

#[tokio::test]
async fn the_conversation_cap_answers_503_and_idle_conversations_expire() {
    let s = TestServer::with(|c| {
        c.channel.max_conversations = 2;
        c.channel.idle_timeout_secs = 600;
    })
    .await;
    let (token, conv, _) = s.conversation("helpdesk").await;
    s.conversation("helpdesk").await;
    let (third, _) = s.open_token("helpdesk").await;
    let res = s.http.post(s.url("/v3/directline/conversations")).bearer_auth(&third).send().await.unwrap();
    assert_eq!(res.headers()["retry-after"], "30");
    assert_error(res, 503, "Overloaded").await;

    s.clock.advance_secs(599);
    s.say_ok(&token, &conv, "vpn").await;
    s.clock.advance_secs(600);
    let res = s
        .http
        .get(s.url(&format!("/v3/directline/conversations/{conv}/activities")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_error(res, 404, "ConversationNotFound").await;
    assert_eq!(s.state().sweep(), 2);
    let res = s.http.post(s.url("/v3/directline/conversations")).bearer_auth(&third).send().await.unwrap();
    assert_eq!(res.status(), 201, "room again after the sweep");
}

#[tokio::test]
async fn upstream_bots_that_time_out_or_are_unreachable() {
    let (slow, _) = slow_bot(3000).await;
    let s = TestServer::with(|c| {
        c.upstream.timeout_secs = 1;
        let toml = upstream_config_toml(&format!("http://{slow}/api/messages"), "");
        let extra: botgate::config::Config = botgate::config::Config::from_str(&toml, "t").unwrap();
        c.bots.extend(extra.bots);
        let mut dead = c.bots.last().unwrap().clone();
        dead.id = "dead".into();
        dead.endpoint = "http://127.0.0.1:9/api/messages".into();
        c.bots.push(dead);
    })
    .await;
    let (token, conv) = s.open_token("up").await;
    let res = s.http.post(s.url("/v3/directline/conversations")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(res.status(), 201, "a bot that does not take the start does not stop it");
    assert_error(s.say(&token, &conv, "hi").await, 504, "BotTimeout").await;

    let (token, conv) = s.open_token("dead").await;
    s.http.post(s.url("/v3/directline/conversations")).bearer_auth(&token).send().await.unwrap();
    assert_error(s.say(&token, &conv, "hi").await, 502, "BotError").await;

    let res = s
        .http
        .post(s.url(&format!("/connector/not-a-key/v3/conversations/{conv}/activities")))
        .json(&json!({"type":"message","text":"x"}))
        .send()
        .await
        .unwrap();
    assert_error(res, 404, "NotFound").await;
}

/// Memory per idle conversation, measured on the real conversation map (resident set before and
/// after holding N conversations), printed for the README.
#[tokio::test]
async fn memory_per_idle_conversation() {
    let s = TestServer::start().await;
    let ch = s.state().channel();
    let bot = ch.bot("helpdesk").unwrap();
    const N: usize = 50_000;
    let mut claims = Vec::with_capacity(N);
    for _ in 0..N {
        claims.push(ch.new_claims(&bot, None, 0, false));
    }
    let before = rss_bytes();
    for c in &claims {
        ch.start(&bot, c).unwrap();
    }
    let after = rss_bytes();
    let per = (after.saturating_sub(before)) / N as u64;
    println!("memory per idle conversation (no activities retained): {per} bytes over {N} conversations");
    assert_eq!(ch.conversations.len(), N);
    assert!(per < 2048, "{per} bytes per idle conversation");
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test]
async fn a_request_over_the_timeout_is_a_json_504() {
    let (slow, _) = slow_bot(3000).await;
    let s = TestServer::with(|c| {
        c.server.request_timeout_secs = 1;
        let toml = upstream_config_toml(&format!("http://{slow}/api/messages"), "");
        c.bots.extend(botgate::config::Config::from_str(&toml, "t").unwrap().bots);
        c.upstream.timeout_secs = 10;
    })
    .await;
    let (token, _) = s.open_token("up").await;
    let res = s.http.post(s.url("/v3/directline/conversations")).bearer_auth(&token).send().await.unwrap();
    assert_error(res, 504, "Timeout").await;
}

/// A bot answering inline (`{"activities":[...]}`) and a bot that is slow: the slow one does not
/// hold up the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_replies_and_a_slow_bot_does_not_slow_another() {
    let inline = axum::Router::new().route(
        "/api/messages",
        axum::routing::post(|axum::Json(a): axum::Json<Value>| async move {
            if a["type"] != "message" {
                return axum::Json(json!({}));
            }
            axum::Json(json!({"activities": [{"type": "message", "text": format!("inline: {}", a["text"].as_str().unwrap_or(""))}]}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let inline_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, inline).await.unwrap() });
    let (slow, _) = slow_bot(2000).await;
    let s = TestServer::with(|c| {
        let toml = upstream_config_toml(&format!("http://{slow}/api/messages"), "");
        let mut bots = botgate::config::Config::from_str(&toml, "t").unwrap().bots;
        let mut fast = bots[0].clone();
        fast.id = "inline".into();
        fast.endpoint = format!("http://{inline_addr}/api/messages");
        bots.push(fast);
        c.bots.extend(bots);
        c.upstream.timeout_secs = 10;
    })
    .await;
    let s = std::sync::Arc::new(s);
    let (slow_token, slow_conv) = s.open_token("up").await;
    let started = {
        let s = s.clone();
        tokio::spawn(async move {
            let res = s
                .http
                .post(s.url("/v3/directline/conversations"))
                .bearer_auth(&slow_token)
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 201);
            s.say_ok(&slow_token, &slow_conv, "slow").await;
        })
    };
    let (token, conv, _) = s.conversation("inline").await;
    let id = s.say_ok(&token, &conv, "hello").await;
    let acts = s.poll(&token, &conv, None).await;
    let acts = acts["activities"].as_array().unwrap();
    let reply = acts.iter().find(|a| a["text"] == "inline: hello").expect("the inline reply");
    assert_eq!(reply["replyToId"], id.as_str());
    assert_eq!(reply["from"]["id"], "inline");
    assert!(!started.is_finished(), "the fast bot answered while the slow bot was still busy");
    started.await.unwrap();
}

#[tokio::test]
async fn a_stream_closes_when_its_conversation_expires() {
    let s = TestServer::with(|c| c.channel.idle_timeout_secs = 600).await;
    let (_, _, start) = s.conversation("helpdesk").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(start["streamUrl"].as_str().unwrap()).await.unwrap();
    next_set(&mut ws).await;
    s.clock.advance_secs(601);
    assert_eq!(s.state().sweep(), 1);
    assert_closes(&mut ws).await;
}

/// A typing flood: every indicator is acknowledged, one a second is kept, and none counts
/// against the bot's message rate limit.
#[tokio::test]
async fn typing_beyond_one_a_second_is_acknowledged_and_dropped() {
    let s = TestServer::with(|c| c.metering.rate_limit_per_minute = 3).await;
    let (t, c, _) = s.conversation("helpdesk").await;
    let url = s.url(&format!("/v3/directline/conversations/{c}/activities"));
    let typing = json!({"type": "typing", "from": {"id": "dl_user"}});
    for _ in 0..50 {
        let res = s.http.post(&url).bearer_auth(&t).json(&typing).send().await.unwrap();
        assert_eq!(res.status(), 200);
        let v: Value = res.json().await.unwrap();
        assert!(v["id"].as_str().is_some_and(|id| !id.is_empty()));
    }
    s.clock.advance_ms(1000);
    let res = s.http.post(&url).bearer_auth(&t).json(&typing).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let kept =
        |v: &Value| v["activities"].as_array().unwrap().iter().filter(|a| a["type"] == "typing").count();
    assert_eq!(kept(&s.poll(&t, &c, None).await), 2, "one a second is kept");
    for _ in 0..3 {
        s.say_ok(&t, &c, "vpn").await;
    }
    assert_error(s.say(&t, &c, "vpn").await, 429, "RateLimited").await;
}

/// A body over the limit is 413 however it is framed: here chunked, with no `Content-Length`.
#[tokio::test]
async fn a_chunked_body_over_the_limit_is_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestServer::start().await;
    let (t, c, _) = s.conversation("helpdesk").await;
    let mut tcp = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    let head = format!(
        "POST /v3/directline/conversations/{c}/activities HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b' '; 64 * 1024];
    for _ in 0..32 {
        // The server may answer and stop reading before the whole 2 MiB is sent.
        if tcp.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await.is_err()
            || tcp.write_all(&chunk).await.is_err()
            || tcp.write_all(b"\r\n").await.is_err()
        {
            break;
        }
    }
    let _ = tcp.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("PayloadTooLarge"), "{answer}");
}

/// An activity whose fields have the wrong types is refused with 400 naming the field.
#[tokio::test]
async fn an_activity_with_a_wrongly_typed_field_is_400() {
    let s = TestServer::start().await;
    let (t, c, _) = s.conversation("helpdesk").await;
    let url = s.url(&format!("/v3/directline/conversations/{c}/activities"));
    for (body, field) in [
        (json!({"type": "message", "from": {"id": "u"}, "text": 42}), "`text`"),
        (json!({"type": "message", "from": {"id": "u"}, "text": ["a", "b"]}), "`text`"),
        (json!({"type": "message", "from": {"id": "u"}, "text": "hi", "attachments": "x"}), "`attachments`"),
    ] {
        let res = s.http.post(&url).bearer_auth(&t).json(&body).send().await.unwrap();
        let v = assert_error(res, 400, "BadRequest").await;
        assert!(v["error"]["message"].as_str().unwrap().contains(field), "{v}");
    }
    let acts = s.poll(&t, &c, None).await;
    assert!(
        acts["activities"].as_array().unwrap().iter().all(|a| a["from"]["role"] != "user"),
        "nothing refused was stored: {acts}"
    );
}

/// The close handshake: a client's close frame is answered with a close frame (the client sees
/// its own code, not 1006), and a socket replaced by a newer one is closed with 4001 and a reason.
#[tokio::test]
async fn websocket_close_is_a_handshake_and_a_replaced_socket_hears_why() {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let s = TestServer::start().await;
    let (_, _, start) = s.conversation("helpdesk").await;
    let url = start["streamUrl"].as_str().unwrap();
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    next_set(&mut ws).await;
    ws.send(Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "bye".into() })))
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return Ok(frame),
                Some(Ok(_)) => {}
                other => return Err(format!("{other:?}")),
            }
        }
    })
    .await
    .expect("an answer within 5 s");
    let frame = answer.expect("a close frame, not a dropped connection");
    assert_eq!(frame.map(|f| f.code), Some(CloseCode::Normal));

    let (mut first, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    next_set(&mut first).await;
    let (_second, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match first.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => {}
                other => panic!("no close frame: {other:?}"),
            }
        }
    })
    .await
    .unwrap()
    .expect("a close frame with a code");
    assert_eq!(u16::from(closed.code), 4001);
    assert!(closed.reason.contains("newer"), "{}", closed.reason);
}

/// `tokens/generate` as the service takes it: the bound user id must start with `dl_`, and a
/// token made with `trustedOrigins` works only from those origins, on every use and refresh.
#[tokio::test]
async fn generated_tokens_bind_a_dl_user_and_their_trusted_origins() {
    // The bot allows any origin: only the token's trusted origins restrict it.
    let mut open = secured_bot();
    open.allowed_origins = vec!["*".into()];
    let s = TestServer::with(|c| c.bots.push(open)).await;
    let generate = |body: Value| {
        s.http.post(s.url("/v3/directline/tokens/generate")).bearer_auth(SECRET).json(&body).send()
    };
    let v = assert_error(generate(json!({"user": {"id": "alice"}})).await.unwrap(), 400, "BadRequest").await;
    assert!(v["error"]["message"].as_str().unwrap().contains("dl_"), "{v}");
    let bad = json!({"user": {"id": "dl_a"}, "trustedOrigins": ["not an origin"]});
    assert_error(generate(bad).await.unwrap(), 400, "BadRequest").await;

    let shop = "https://shop.example";
    let res = generate(json!({"user": {"id": "dl_alice"}, "trustedOrigins": [shop]})).await.unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    let (token, conv) =
        (v["token"].as_str().unwrap().to_string(), v["conversationId"].as_str().unwrap().to_string());
    let start = |origin: Option<&str>| {
        let mut rb = s.http.post(s.url("/v3/directline/conversations")).bearer_auth(&token);
        if let Some(o) = origin {
            rb = rb.header("Origin", o);
        }
        rb.send()
    };
    assert_error(start(Some("https://evil.example")).await.unwrap(), 403, "OriginNotAllowed").await;
    assert_error(start(None).await.unwrap(), 403, "OriginNotAllowed").await;
    assert_eq!(start(Some(shop)).await.unwrap().status(), 201);
    let say = |origin: &str, token: &str| {
        s.http
            .post(s.url(&format!("/v3/directline/conversations/{conv}/activities")))
            .bearer_auth(token)
            .header("Origin", origin)
            .json(&json!({"type": "message", "from": {"id": "mallory"}, "text": "vpn"}))
            .send()
    };
    assert_error(say("https://evil.example", &token).await.unwrap(), 403, "OriginNotAllowed").await;
    assert_eq!(say(shop, &token).await.unwrap().status(), 200);
    // A refreshed token keeps the binding.
    let res = s
        .http
        .post(s.url("/v3/directline/tokens/refresh"))
        .bearer_auth(&token)
        .header("Origin", shop)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let fresh = res.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_string();
    assert_error(say("https://evil.example", &fresh).await.unwrap(), 403, "OriginNotAllowed").await;
    // An upload is bound the same way: the origin is checked, the user id replaced.
    let upload = |origin: &str, user: &str| {
        s.http
            .post(s.url(&format!("/v3/directline/conversations/{conv}/upload?userId={user}")))
            .bearer_auth(&fresh)
            .header("Origin", origin)
            .header("content-type", "text/plain")
            .body("a file")
            .send()
    };
    assert_error(upload("https://evil.example", "dl_alice").await.unwrap(), 403, "OriginNotAllowed").await;
    assert_eq!(upload(shop, "mallory").await.unwrap().status(), 200);
    let acts: Value = s
        .http
        .get(s.url(&format!("/v3/directline/conversations/{conv}/activities")))
        .bearer_auth(&fresh)
        .header("Origin", shop)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let users: Vec<&Value> = acts["activities"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["from"]["role"] == "user")
        .map(|a| &a["from"]["id"])
        .collect();
    assert_eq!(users, [&json!("dl_alice"), &json!("dl_alice")], "the bound user replaces `mallory`");
}
