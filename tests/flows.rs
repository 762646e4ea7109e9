//! Topic flows end to end: the real server on 127.0.0.1:0 calls a real HTTP receiver on
//! 127.0.0.1:0 (the embedded default's outbound policy allows loopback), fills replies from its
//! answers, falls back on every kind of failure, meters runs per outcome, and never bills them.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use axum::routing::post;
use botgate::config::{BotConfig, Config};
use common::{TestServer, metric};
use serde_json::{Value, json};

/// What the receiver was sent: (path, JSON body).
type Seen = Arc<Mutex<Vec<(String, Value)>>>;

/// A flow endpoint: `/order` answers an order, `/fail` 500, `/slow` after 2 s, `/text` a
/// non-JSON 200, `/big` an answer past the cap, `/partial` JSON without the fields the replies
/// want.
async fn receiver() -> (SocketAddr, Seen) {
    let seen: Seen = Arc::default();
    async fn record(seen: &Seen, path: &str, body: &[u8]) {
        let v = serde_json::from_slice(body).unwrap_or(Value::Null);
        seen.lock().unwrap().push((path.to_string(), v));
    }
    let app = axum::Router::new()
        .route(
            "/order",
            post(|State(s): State<Seen>, body: axum::body::Bytes| async move {
                record(&s, "/order", &body).await;
                Json(json!({"status": "shipped", "order": {"eta": "Monday", "items": [{"name": "mug"}]}}))
            }),
        )
        .route(
            "/fail",
            post(|State(s): State<Seen>, body: axum::body::Bytes| async move {
                record(&s, "/fail", &body).await;
                (http::StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"status": "broken"})))
            }),
        )
        .route(
            "/slow",
            post(|State(s): State<Seen>, body: axum::body::Bytes| async move {
                record(&s, "/slow", &body).await;
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                Json(json!({"status": "late"}))
            }),
        )
        .route(
            "/text",
            post(|State(s): State<Seen>, body: axum::body::Bytes| async move {
                record(&s, "/text", &body).await;
                "shipped"
            }),
        )
        .route(
            "/big",
            post(|State(s): State<Seen>, body: axum::body::Bytes| async move {
                record(&s, "/big", &body).await;
                // Past `outbound.max_response_bytes` (1 MiB by default).
                Json(json!({"status": "x".repeat(1_100_000)}))
            }),
        )
        .route(
            "/partial",
            post(|State(s): State<Seen>, body: axum::body::Bytes| async move {
                record(&s, "/partial", &body).await;
                Json(json!({"other": 1}))
            }),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, seen)
}

/// A flow topic as TOML: `[[bots.topics]]` triggered by `trigger`, calling `path` on `addr`.
fn flow_topic(name: &str, trigger: &str, url: &str, extra: &str) -> String {
    format!(
        r#"
[[bots.topics]]
name = "{name}"
kind = "user"
triggers = ["{trigger}"]
replies = ["Your order {{{{status}}}}, due {{{{ order.eta }}}}", "First item: {{{{order.items.0.name}}}}"]
fallback_reply = "Sorry, I cannot look that up right now."
[bots.topics.flow]
url = "{url}"
{extra}
"#
    )
}

/// The bot `orders` of tenant `contoso` (owned by `alice`), parsed and validated as a
/// configuration file would be, with one flow topic per failure kind and an escalation flow.
fn orders_bot(addr: SocketAddr, closed: SocketAddr) -> BotConfig {
    let base = format!("http://{addr}");
    let text = format!(
        r#"
[outbound]
allow_loopback = true

[[tenants]]
id = "contoso"
subscriptions = [{{ kind = "tenant_license", quantity = 1 }}]

[[bots]]
id = "orders"
tenant = "contoso"
name = "Orders"
owner = "alice"
kind = "builtin"

[[bots.topics]]
name = "Fallback"
kind = "system"
system = "fallback"
replies = ["I did not get that."]

[[bots.topics]]
name = "Escalate"
kind = "system"
system = "escalate"
triggers = ["human"]
replies = ["Ticket {{{{ticket}}}} opened."]
fallback_reply = "No ticket for now."
[bots.topics.flow]
url = "{base}/order"
body = {{ ticket_for = "{{{{user_id}}}}" }}
{order}{fail}{slow}{text}{big}{closed}{partial}{refused}"#,
        order = flow_topic(
            "Order",
            "order status",
            &format!("{base}/order"),
            r#"method = "POST"
timeout_ms = 2000
variables = { shop = "Contoso \"East\"" }
body = { query = "{{text}}", ids = { conversation = "{{conversation_id}}", user = "{{user_id}}", bot = "{{bot_id}}" }, note = "shop {{shop}} asks: {{text}}", version = 2 }"#
        ),
        fail = flow_topic("Fail", "broken", &format!("{base}/fail"), ""),
        slow = flow_topic("Slow", "slow", &format!("{base}/slow"), "timeout_ms = 300"),
        text = flow_topic("Text", "garbage", &format!("{base}/text"), ""),
        big = flow_topic("Big", "huge", &format!("{base}/big"), ""),
        closed = flow_topic("Closed", "closed", &format!("http://{closed}/order"), ""),
        partial = flow_topic("Partial", "partial", &format!("{base}/partial"), ""),
        // The metadata address as one decimal number: a name to the URL check, which the
        // resolver reads as 169.254.169.254; the policy refuses it at resolution.
        refused = flow_topic("Refused", "blocked", &format!("http://2852039166:{}/order", addr.port()), ""),
    );
    let c = Config::from_str(&text, "flows.toml").unwrap_or_else(|e| panic!("{e}"));
    c.bots[0].clone()
}

/// A loopback address nothing listens on (connections to it are refused).
async fn closed_port() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

async fn server_with_orders(addr: SocketAddr) -> TestServer {
    let bot = orders_bot(addr, closed_port().await);
    TestServer::with(move |c| c.bots.push(bot)).await
}

/// The texts of the bot's replies to message `id`.
async fn replies_to(s: &TestServer, token: &str, conv: &str, id: &str) -> Vec<String> {
    let v = s.poll(token, conv, None).await;
    v["activities"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["replyToId"] == id && a["type"] == "message")
        .map(|a| a["text"].as_str().unwrap().to_string())
        .collect()
}

async fn ask(s: &TestServer, token: &str, conv: &str, text: &str) -> Vec<String> {
    let id = s.say_ok(token, conv, text).await;
    replies_to(s, token, conv, &id).await
}

/// `promtool check metrics` accepts the exposition (the flow family included).
fn promtool_accepts(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const FALLBACK: &str = "Sorry, I cannot look that up right now.";

#[tokio::test]
async fn a_flow_fills_the_reply_and_receives_the_conversation_as_json() {
    let (addr, seen) = receiver().await;
    let s = server_with_orders(addr).await;
    let (token, conv, _) = s.conversation("orders").await;
    let text = r#"Order status for "Zoë's" order ✓ 🚀 {"x":1} \ {{bot_id}}"#;
    assert_eq!(ask(&s, &token, &conv, text).await, vec!["Your order shipped, due Monday", "First item: mug"]);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, "/order");
    // The user's text arrives as one JSON string, quotes, unicode and braces intact, and a
    // placeholder inside it is not expanded.
    assert_eq!(
        seen[0].1,
        json!({
            "query": text,
            "ids": {"conversation": conv, "user": "dl_user", "bot": "orders"},
            "note": format!("shop Contoso \"East\" asks: {text}"),
            "version": 2,
        })
    );
    s.stop().await;
}

#[tokio::test]
async fn failing_flows_fall_back_are_counted_per_outcome_and_never_billed() {
    let (addr, seen) = receiver().await;
    let s = server_with_orders(addr).await;
    let (token, conv, _) = s.conversation("orders").await;
    // The schedule: 2 ok, 6 failed (500, non-JSON, too large, connection refused, a missing
    // field, 500), 1 timeout, 2 refused by the policy.
    let schedule = [
        ("order status please", true),
        ("broken", false),
        ("garbage", false),
        ("huge", false),
        ("closed", false),
        ("partial", false),
        ("slow", false),
        ("blocked", false),
        ("order status again", true),
        ("blocked", false),
        ("broken", false),
    ];
    for (text, ok) in schedule {
        let got = ask(&s, &token, &conv, text).await;
        if ok {
            assert_eq!(got, vec!["Your order shipped, due Monday", "First item: mug"], "{text}");
        } else {
            assert_eq!(got, vec![FALLBACK], "{text}");
        }
    }
    // A system topic with a flow, in a conversation of its own: never begins a session.
    let (token2, conv2, _) = s.conversation("orders").await;
    assert_eq!(ask(&s, &token2, &conv2, "a human please").await, vec!["No ticket for now."]);
    let m = s.metrics().await;
    let runs = |outcome: &str| {
        metric(
            &m,
            &format!(r#"botgate_flow_runs_total{{tenant="contoso",bot="orders",outcome="{outcome}"}}"#),
        )
    };
    // The escalation's answer has no `ticket`: a seventh failure.
    assert_eq!(
        (runs("ok"), runs("failed"), runs("timeout"), runs("refused")),
        (Some(2), Some(7), Some(1), Some(2))
    );
    promtool_accepts(&m);
    // One billed session: the first user turn began it, flows added none, the system topic none.
    assert_eq!(metric(&m, r#"botgate_billed_sessions_total{tenant="contoso",bot="orders"}"#), Some(1));
    assert_eq!(s.state().store().session_ids().unwrap().len(), 1);
    // The refused and closed flows never reached the receiver; every other one did.
    assert_eq!(seen.lock().unwrap().len(), 9);
    // The usage report counts them too.
    let alice = s.token_of("contoso", "alice", false);
    let report = s.get_json("/api/v1/bots/orders/analytics", &alice).await;
    assert_eq!(report["totals"]["flow_runs"], 12, "{report}");
    assert_eq!(
        report["totals"]["flow_runs_by_outcome"],
        json!({"ok": 2, "failed": 7, "timeout": 1, "refused": 2})
    );
    assert_eq!(report["totals"]["billed_sessions"], 1);
    assert_eq!(report["days"][0]["flow_runs"], 12);
    // Flushed per day, the counts survive a restart.
    let (dir, clock) = s.stop().await;
    let bot = orders_bot(addr, closed_port().await);
    let s = TestServer::in_dir(dir, clock, move |c| c.bots.push(bot)).await;
    let m = s.metrics().await;
    assert_eq!(
        metric(&m, r#"botgate_flow_runs_total{tenant="contoso",bot="orders",outcome="failed"}"#),
        Some(7),
        "{m}"
    );
    s.stop().await;
}

#[tokio::test]
async fn bots_with_flows_round_trip_through_the_authoring_api_and_bad_ones_are_refused() {
    let (addr, seen) = receiver().await;
    let s = TestServer::start().await;
    let alice = s.token_of("contoso", "alice", false);
    let topics = |flow: Value, fallback: Option<&str>| {
        let mut t = json!({
            "name": "Order", "kind": "user", "triggers": ["order status"],
            "replies": ["Your order {{status}}"], "flow": flow,
        });
        if let Some(f) = fallback {
            t["fallback_reply"] = json!(f);
        }
        json!([
            {"name": "Fallback", "kind": "system", "system": "fallback", "replies": ["Hm?"]},
            t,
        ])
    };
    let flow =
        json!({"url": format!("http://{addr}/order"), "body": {"q": "{{text}}", "who": "{{user_id}}"}});
    let def = json!({"id": "api-orders", "name": "API orders", "kind": "builtin", "topics": topics(flow.clone(), Some("Later."))});
    let res = s.http.post(s.url("/api/v1/bots")).bearer_auth(&alice).json(&def).send().await.unwrap();
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
    // The stored definition shows the flow with its defaults.
    let bot = s.get_json("/api/v1/bots/api-orders", &alice).await;
    let shown = &bot["topics"][1];
    assert_eq!(shown["fallback_reply"], "Later.");
    assert_eq!(shown["flow"]["url"], flow["url"]);
    assert_eq!(shown["flow"]["method"], "POST");
    assert_eq!(shown["flow"]["timeout_ms"], 3000);
    assert_eq!(shown["flow"]["body"], flow["body"]);
    assert!(bot["topics"][0].get("flow").is_none(), "a topic without a flow shows none: {bot}");
    let res = s.http.post(s.url("/api/v1/bots/api-orders/publish")).bearer_auth(&alice).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let (token, conv, _) = s.conversation("api-orders").await;
    assert_eq!(ask(&s, &token, &conv, "order status?").await, vec!["Your order shipped"]);
    assert_eq!(seen.lock().unwrap()[0].1, json!({"q": "order status?", "who": "dl_user"}));

    // Bad flows, on create and on update: 400 with a stable code naming the key.
    let patch = |topics: Value| {
        s.http
            .patch(s.url("/api/v1/bots/api-orders"))
            .bearer_auth(&alice)
            .json(&json!({"topics": topics}))
            .send()
    };
    let cases = [
        (topics(flow.clone(), None), "InvalidFlow", "topics[1].fallback_reply"),
        (
            topics(json!({"url": format!("http://{addr}/order"), "timeout_ms": 60000}), Some("x")),
            "InvalidFlow",
            "topics[1].flow.timeout_ms",
        ),
        (topics(json!({"url": "ftp://flows.example/"}), Some("x")), "InvalidFlow", "topics[1].flow.url"),
        (
            topics(json!({"url": format!("http://{addr}/order"), "body": {"q": "{{secret}}"}}), Some("x")),
            "InvalidFlow",
            "topics[1].flow.body",
        ),
        (
            topics(json!({"url": format!("http://{addr}/order"), "method": "GET", "body": {}}), Some("x")),
            "InvalidFlow",
            "topics[1].flow.body",
        ),
        (
            topics(json!({"url": format!("http://{addr}/order"), "variables": {"text": "x"}}), Some("x")),
            "InvalidFlow",
            "topics[1].flow.variables",
        ),
        (
            topics(json!({"url": "http://169.254.169.254/latest/meta-data"}), Some("x")),
            "EndpointNotAllowed",
            "topics[1].flow.url",
        ),
    ];
    for (bad, code, key) in cases {
        let body = common::assert_error(patch(bad.clone()).await.unwrap(), 400, code).await;
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(key), "{code}: {message}");
        let mut def = def.clone();
        def["id"] = json!("api-orders-2");
        def["topics"] = bad;
        let res = s.http.post(s.url("/api/v1/bots")).bearer_auth(&alice).json(&def).send().await.unwrap();
        common::assert_error(res, 400, code).await;
    }
    // The refused updates changed nothing.
    assert_eq!(s.get_json("/api/v1/bots/api-orders", &alice).await["topics"][1]["flow"]["url"], flow["url"]);
    s.stop().await;
}

#[test]
fn configuration_validation_names_the_flow_key() {
    let file = |topic: &str, outbound: &str| {
        format!(
            r#"
[outbound]
{outbound}

[[tenants]]
id = "t"

[[bots]]
id = "b"
tenant = "t"
name = "B"
kind = "builtin"

[[bots.topics]]
name = "Fallback"
kind = "system"
system = "fallback"
replies = ["?"]

[[bots.topics]]
name = "Flow"
kind = "user"
triggers = ["go"]
replies = ["{{{{x}}}}"]
{topic}
"#
        )
    };
    let err = |topic: &str, outbound: &str| {
        Config::from_str(&file(topic, outbound), "x.toml").map(drop).unwrap_err().to_string()
    };
    let e = err("[bots.topics.flow]\nurl = \"http://flows.example/\"", "");
    assert!(
        e.contains("bots[0].topics[1].fallback_reply") && e.contains("needs a non-empty fallback_reply"),
        "{e}"
    );
    let e = err("fallback_reply = \"no\"", "");
    assert!(e.contains("bots[0].topics[1].fallback_reply"), "{e}");
    let e = err("fallback_reply = \"no\"\n[bots.topics.flow]\nurl = \"http://127.0.0.1:9/\"", "");
    assert!(e.contains("bots[0].topics[1].flow.url") && e.contains("loopback"), "{e}");
    let e = err(
        "fallback_reply = \"no\"\n[bots.topics.flow]\nurl = \"http://flows.example/\"\ntimeout_ms = 0",
        "",
    );
    assert!(e.contains("bots[0].topics[1].flow.timeout_ms"), "{e}");
    let e = err(
        "fallback_reply = \"no\"\n[bots.topics.flow]\nurl = \"http://flows.example/\"\nbody = { a = \"{{nope}}\" }",
        "",
    );
    assert!(e.contains("bots[0].topics[1].flow.body") && e.contains("{{nope}}"), "{e}");
    let ok = file(
        "fallback_reply = \"no\"\n[bots.topics.flow]\nurl = \"http://127.0.0.1:9/\"",
        "allow_loopback = true",
    );
    let c = Config::from_str(&ok, "x.toml").unwrap();
    let flow = c.bots[0].topics[1].flow.as_ref().unwrap();
    assert_eq!((flow.timeout_ms, flow.method), (3000, botgate::config::FlowMethod::Post));
}
