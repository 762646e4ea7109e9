//! Billing on the paths a deployment walks every day, each once found wrong: a tenant created
//! through the API across restarts, a conversation restarted with its token, bots created
//! through the API after a restart, an upstream bot that is down, the same bot id in two
//! tenants, events against the rate limit. Exact numbers throughout.

mod common;

use botgate::clock::Clock;
use botgate::identity::dev_issuer::{self, TokenRequest};
use common::*;
use serde_json::{Value, json};

/// Author and admin tokens from the dev issuer of a test server's data folder.
struct Api<'a> {
    s: &'a TestServer,
    key: Vec<u8>,
}

impl<'a> Api<'a> {
    fn new(s: &'a TestServer) -> Self {
        let key = dev_issuer::load_or_create(&s.dir.path().join("data")).unwrap();
        Self { s, key }
    }

    fn token(&self, tenant: &str, user: &str, admin: bool) -> String {
        let req = TokenRequest {
            tenant: tenant.into(),
            user: user.into(),
            name: None,
            groups: vec![],
            admin,
            operator: false,
            ttl_secs: 3600,
        };
        dev_issuer::sign(&self.key, "botgate-dev", "botgate", &req, self.s.clock.now_secs())
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut rb = self.s.http.request(method, self.s.url(path)).bearer_auth(token);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        rb.send().await.unwrap()
    }

    async fn ok(&self, method: reqwest::Method, path: &str, token: &str, body: Option<Value>) -> Value {
        let res = self.send(method, path, token, body).await;
        let status = res.status();
        let text = res.text().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// A tenant the configuration does not know, created through the operator API: one tenant
    /// license, one seat for `author`.
    async fn new_tenant(&self, tenant: &str, author: &str) {
        let admin = self.token(tenant, "root", true);
        self.ok(reqwest::Method::POST, "/api/v1/operator/tenants", OPERATOR_KEY, Some(json!({"id": tenant})))
            .await;
        for kind in ["tenant_license", "user_licenses"] {
            let path = format!("/api/v1/operator/tenants/{tenant}/subscriptions");
            self.ok(reqwest::Method::POST, &path, OPERATOR_KEY, Some(json!({"kind": kind}))).await;
        }
        let path = format!("/api/v1/admin/licenses/users/{author}");
        self.ok(reqwest::Method::PUT, &path, &admin, None).await;
    }

    /// A published built-in bot `id` of `tenant`, created by `author`.
    async fn new_bot(&self, tenant: &str, author: &str, id: &str) {
        let t = self.token(tenant, author, false);
        let def = json!({"id": id, "name": id, "kind": "builtin", "topics": [
            {"name": "Fallback", "kind": "system", "system": "fallback", "replies": ["Sorry?"]},
            {"name": "Order", "kind": "user", "triggers": ["order"], "replies": ["On its way."]}]});
        self.ok(reqwest::Method::POST, "/api/v1/bots", &t, Some(def)).await;
        self.ok(reqwest::Method::POST, &format!("/api/v1/bots/{id}/publish"), &t, None).await;
    }

    async fn delete_bot(&self, tenant: &str, author: &str, id: &str) {
        let t = self.token(tenant, author, false);
        let res = self.send(reqwest::Method::DELETE, &format!("/api/v1/bots/{id}"), &t, None).await;
        assert_eq!(res.status(), 204);
    }
}

fn billed_series(tenant: &str, bot: &str) -> String {
    format!(r#"botgate_billed_sessions_total{{tenant="{tenant}",bot="{bot}"}}"#)
}

fn used_series(tenant: &str) -> String {
    format!(r#"botgate_tenant_used_sessions{{tenant="{tenant}"}}"#)
}

/// A new conversation of `bot` that says `text`: the status.
async fn session(s: &TestServer, bot: &str, text: &str) -> u16 {
    let (t, c, _) = s.conversation(bot).await;
    s.say(&t, &c, text).await.status().as_u16()
}

fn small_license(n: u64) -> impl FnOnce(&mut botgate::config::Config) {
    move |c| c.metering.tenant_license_sessions = n
}

#[tokio::test]
async fn a_tenant_created_through_the_api_keeps_its_month_across_restarts() {
    let s = TestServer::with(small_license(3)).await;
    let api = Api::new(&s);
    api.new_tenant("fabrikam", "fay").await;
    api.new_bot("fabrikam", "fay", "orders").await;
    for _ in 0..3 {
        assert_eq!(session(&s, "orders", "order").await, 200);
    }
    assert_eq!(session(&s, "orders", "order").await, 429);
    let (dir, clock) = s.stop().await;
    let s = TestServer::in_dir(dir, clock, small_license(3)).await;
    let m = s.metrics().await;
    assert_eq!(metric(&m, &used_series("fabrikam")), Some(3), "{m}");
    assert_eq!(metric(&m, &billed_series("fabrikam", "orders")), Some(3), "the bot's series after a restart");
    assert_eq!(session(&s, "orders", "order").await, 429, "the month's capacity stays used after a restart");
}

#[tokio::test]
async fn sessions_of_a_conversation_restarted_with_its_token_all_survive_a_restart() {
    let s = TestServer::with(|c| c.channel.token_ttl_secs = 100_000).await;
    let (token, conv, _) = s.conversation("helpdesk").await;
    s.say_ok(&token, &conv, "vpn").await;
    for _ in 0..2 {
        // Past the idle timeout: the conversation expires, its token starts it again.
        s.clock.advance_secs(31 * 60);
        let res =
            s.http.post(s.url("/v3/directline/conversations")).bearer_auth(&token).send().await.unwrap();
        assert_eq!(res.status(), 201, "a new incarnation");
        s.say_ok(&token, &conv, "vpn").await;
    }
    let before = metric(&s.metrics().await, &billed_series("contoso", "helpdesk"));
    assert_eq!(before, Some(3));
    let (dir, clock) = s.stop().await;
    let s = TestServer::in_dir(dir, clock, |c| c.channel.token_ttl_secs = 100_000).await;
    let m = s.metrics().await;
    assert_eq!(metric(&m, &billed_series("contoso", "helpdesk")), Some(3), "{m}");
    assert_eq!(metric(&m, &used_series("contoso")), Some(3));
    let ids = botgate::store::sqlite::SqliteStore::open(&s.dir.path().join("data")).unwrap();
    let ids = botgate::store::Store::session_ids(&ids).unwrap();
    assert_eq!(ids.len(), 3, "{ids:?}");
}

#[tokio::test]
async fn bots_created_through_the_api_keep_their_series_after_a_restart() {
    let s = TestServer::start().await;
    let api = Api::new(&s);
    api.new_bot("contoso", "alice", "orders").await;
    api.new_bot("contoso", "alice", "quiet").await;
    assert_eq!(session(&s, "orders", "order").await, 200);
    assert_eq!(session(&s, "helpdesk", "vpn").await, 200);
    let (dir, clock) = s.stop().await;
    let s = TestServer::in_dir(dir, clock, |_| {}).await;
    let m = s.metrics().await;
    assert_eq!(metric(&m, &billed_series("contoso", "orders")), Some(1), "{m}");
    assert_eq!(metric(&m, &billed_series("contoso", "quiet")), Some(0), "a bot with no sessions yet");
    assert_eq!(metric(&m, &billed_series("contoso", "helpdesk")), Some(1));
    assert_eq!(metric(&m, &used_series("contoso")), Some(2), "the bots add up to the tenant");
}

#[tokio::test]
async fn the_same_bot_id_in_another_tenant_draws_from_that_tenant_and_old_tokens_fail() {
    let s = TestServer::with(small_license(2)).await;
    let api = Api::new(&s);
    api.new_tenant("fabrikam", "fay").await;
    api.new_bot("contoso", "alice", "x").await;
    let (old_token, old_conv, _) = s.conversation("x").await;
    s.say_ok(&old_token, &old_conv, "order").await;
    let (stale, _) = s.open_token("x").await;
    api.delete_bot("contoso", "alice", "x").await;
    api.new_bot("fabrikam", "fay", "x").await;
    // contoso's tokens, made for its deleted `x`, do not reach fabrikam's `x`.
    let res = s.http.post(s.url("/v3/directline/conversations")).bearer_auth(&stale).send().await.unwrap();
    assert_error(res, 403, "BotNotFound").await;
    let res = s.say(&old_token, &old_conv, "order").await;
    assert!(res.status() == 403 || res.status() == 404, "{}", res.status());
    // fabrikam's `x` draws from fabrikam's pool of 2.
    assert_eq!(session(&s, "x", "order").await, 200);
    assert_eq!(session(&s, "x", "order").await, 200);
    assert_eq!(session(&s, "x", "order").await, 429);
    let m = s.metrics().await;
    assert_eq!(metric(&m, &billed_series("contoso", "x")), Some(1), "{m}");
    assert_eq!(metric(&m, &billed_series("fabrikam", "x")), Some(2));
    assert_eq!(metric(&m, &used_series("contoso")), Some(1));
    assert_eq!(metric(&m, &used_series("fabrikam")), Some(2));
    // And the same after a restart.
    let (dir, clock) = s.stop().await;
    let s = TestServer::in_dir(dir, clock, small_license(2)).await;
    let m = s.metrics().await;
    assert_eq!(metric(&m, &billed_series("contoso", "x")), Some(1), "{m}");
    assert_eq!(metric(&m, &billed_series("fabrikam", "x")), Some(2));
    assert_eq!(session(&s, "x", "order").await, 429);
}

#[tokio::test]
async fn a_bot_deleted_and_created_again_refuses_the_old_bots_tokens() {
    let s = TestServer::start().await;
    let api = Api::new(&s);
    api.new_bot("contoso", "alice", "x").await;
    let (stale, _) = s.open_token("x").await;
    api.delete_bot("contoso", "alice", "x").await;
    api.new_bot("contoso", "alice", "x").await;
    let res = s.http.post(s.url("/v3/directline/conversations")).bearer_auth(&stale).send().await.unwrap();
    assert_error(res, 403, "BotNotFound").await;
    let (fresh, _) = s.open_token("x").await;
    let res = s.http.post(s.url("/v3/directline/conversations")).bearer_auth(&fresh).send().await.unwrap();
    assert_eq!(res.status(), 201);
}

#[tokio::test]
async fn events_count_against_the_rate_limit_and_begin_no_session() {
    let s = TestServer::with(|c| c.metering.rate_limit_per_minute = 3).await;
    let (t, c, _) = s.conversation("helpdesk").await;
    let event = json!({"type": "event", "name": "ping", "from": {"id": "dl_user"}});
    let url = s.url(&format!("/v3/directline/conversations/{c}/activities"));
    for _ in 0..3 {
        let res = s.http.post(&url).bearer_auth(&t).json(&event).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
    let res = s.http.post(&url).bearer_auth(&t).json(&event).send().await.unwrap();
    assert_error(res, 429, "RateLimited").await;
    assert_error(s.say(&t, &c, "vpn").await, 429, "RateLimited").await;
    let m = s.metrics().await;
    assert_eq!(metric(&m, &billed_series("contoso", "helpdesk")), Some(0));
    assert_eq!(
        metric(&m, r#"botgate_turns_total{tenant="contoso",bot="helpdesk"}"#),
        Some(0),
        "events are not turns"
    );
}

#[tokio::test]
async fn an_upstream_bot_that_refuses_the_first_turn_is_not_billed() {
    // A port nothing listens on: the bot is down.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let endpoint = format!("http://127.0.0.1:{port}/api/messages");
    let s = TestServer::with(|c| {
        let extra: botgate::config::Config = toml::from_str(&upstream_config_toml(&endpoint, "")).unwrap();
        c.bots.extend(extra.bots);
        c.metering.tenant_license_sessions = 1;
    })
    .await;
    let (t, c, _) = s.conversation("up").await;
    for _ in 0..3 {
        assert_error(s.say(&t, &c, "hello").await, 502, "BotError").await;
    }
    let m = s.metrics().await;
    assert_eq!(metric(&m, &billed_series("contoso", "up")), Some(0), "{m}");
    assert_eq!(metric(&m, &used_series("contoso")), Some(0));
    // The unit went back to the pool: a working bot of the tenant can still begin one.
    assert_eq!(session(&s, "helpdesk", "vpn").await, 200);
    assert_eq!(metric(&s.metrics().await, &used_series("contoso")), Some(1));
}

#[tokio::test]
async fn a_client_that_hangs_up_after_sending_is_still_billed_for_the_session_the_bot_took() {
    let (addr, calls) = slow_bot(300).await;
    let endpoint = format!("http://{addr}/api/messages");
    let s = TestServer::with(|c| {
        let extra: botgate::config::Config = toml::from_str(&upstream_config_toml(&endpoint, "")).unwrap();
        c.bots.extend(extra.bots);
    })
    .await;
    let (t, c, _) = s.conversation("up").await;
    let impatient = reqwest::Client::builder().timeout(std::time::Duration::from_millis(50)).build().unwrap();
    let res = impatient
        .post(s.url(&format!("/v3/directline/conversations/{c}/activities")))
        .bearer_auth(&t)
        .json(&json!({"type": "message", "from": {"id": "dl_user"}, "text": "hello"}))
        .send()
        .await;
    assert!(res.is_err(), "the client gave up before the bot answered");
    // The bot takes the turn after the client left: the session is billed all the same.
    let mut billed = None;
    for _ in 0..100 {
        billed = metric(&s.metrics().await, &billed_series("contoso", "up"));
        if billed == Some(1) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(billed, Some(1));
    assert!(
        calls.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the start and the message reached the bot"
    );
    assert_eq!(metric(&s.metrics().await, &used_series("contoso")), Some(1));
}

/// A stand-in messaging endpoint whose first user message fails after `delay_ms` (500), while
/// every other activity is taken at once.
async fn bot_failing_its_first_message(delay_ms: u64) -> std::net::SocketAddr {
    use std::sync::atomic::{AtomicBool, Ordering};
    let failed = std::sync::Arc::new(AtomicBool::new(false));
    let app = axum::Router::new().route(
        "/api/messages",
        axum::routing::post(move |body: axum::Json<Value>| {
            let failed = failed.clone();
            async move {
                if body["type"] == "message" && !failed.swap(true, Ordering::SeqCst) {
                    tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
                    return http::StatusCode::INTERNAL_SERVER_ERROR;
                }
                http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_while_the_first_turn_is_pending_is_billed_when_that_turn_fails() {
    let addr = bot_failing_its_first_message(300).await;
    let endpoint = format!("http://{addr}/api/messages");
    let s = std::sync::Arc::new(
        TestServer::with(|c| {
            let extra: botgate::config::Config =
                toml::from_str(&upstream_config_toml(&endpoint, "")).unwrap();
            c.bots.extend(extra.bots);
        })
        .await,
    );
    let (t, c, _) = s.conversation("up").await;
    let (s1, t1, c1) = (s.clone(), t.clone(), c.clone());
    let first = tokio::spawn(async move { s1.say(&t1, &c1, "first").await.status().as_u16() });
    // The second message arrives while the bot still holds the first.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let second = s.say(&t, &c, "second").await.status().as_u16();
    assert_eq!(first.await.unwrap(), 502, "the bot refused the first message");
    assert_eq!(second, 200, "and took the second");
    // The session the bot refused is not billed; the second message began one of its own.
    let m = s.metrics().await;
    assert_eq!(metric(&m, &billed_series("contoso", "up")), Some(1), "{m}");
    assert_eq!(metric(&m, &used_series("contoso")), Some(1));
}

#[tokio::test]
async fn one_tenants_or_bots_flood_of_conversations_leaves_the_others_served() {
    let s = TestServer::with(|c| {
        c.channel.max_conversations_per_tenant = 3;
        c.channel.max_conversations_per_bot = 2;
    })
    .await;
    let api = Api::new(&s);
    api.new_tenant("fabrikam", "fay").await;
    api.new_bot("fabrikam", "fay", "orders").await;
    api.new_bot("contoso", "alice", "sales").await;
    let start = |bot: &'static str| {
        let s = &s;
        async move {
            let (t, _) = s.open_token(bot).await;
            s.http.post(s.url("/v3/directline/conversations")).bearer_auth(&t).send().await.unwrap()
        }
    };
    for _ in 0..2 {
        assert_eq!(start("helpdesk").await.status(), 201);
    }
    // The bot's cap: helpdesk is full, contoso's other bot is not.
    assert_error(start("helpdesk").await, 503, "Overloaded").await;
    assert_eq!(start("sales").await.status(), 201);
    // The tenant's cap: contoso holds 3, fabrikam is served.
    assert_error(start("sales").await, 503, "Overloaded").await;
    assert_eq!(start("orders").await.status(), 201);
    // Conversations that end give their places back.
    s.clock.advance_secs(31 * 60);
    assert_eq!(s.state().sweep(), 4);
    for _ in 0..2 {
        assert_eq!(start("helpdesk").await.status(), 201);
    }
    assert_eq!(start("sales").await.status(), 201);
    assert_error(start("sales").await, 503, "Overloaded").await;
}
