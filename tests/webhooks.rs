//! Notifications against the real server: capacity thresholds on the manual clock, retries and
//! the delivery log, an endpoint disabled after the give-up window, an event surviving `kill -9`,
//! and three nodes on one Redis raising one event. Every delivery is received by a real HTTP
//! receiver that verifies its signature with the `standardwebhooks` package from PyPI
//! (`tests/python/webhook_receiver.py`), not with botgate's code.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use botgate::config::{Config, StoreBackend};
use common::receiver::Receiver;
use common::*;
use serde_json::{Value, json};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A server whose contoso pool holds 10 sessions a month, polling the outbox every 20 ms.
fn small_pool(c: &mut Config) {
    c.metering.tenant_license_sessions = 10;
    c.metering.rate_limit_per_minute = 1_000_000;
    c.notifications.poll_ms = 20;
}

/// Registers an endpoint for `events` at the receiver and gives the receiver its secret and
/// the server's clock. Returns the endpoint id.
async fn endpoint(s: &TestServer, r: &Receiver, events: &[&str]) -> String {
    let admin = s.token_of("contoso", "root", true);
    let res = s
        .http
        .post(s.url("/api/v1/admin/webhooks"))
        .bearer_auth(&admin)
        .json(&json!({"url": r.url, "events": events, "description": "ops"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let v: Value = res.json().await.unwrap();
    let secret = v["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"), "{v}");
    r.control(json!({"secret": secret, "now": botgate::clock::Clock::now_secs(&*s.clock)})).await;
    // The secret is shown once: never in a read.
    let list = s.get_json("/api/v1/admin/webhooks", &admin).await;
    assert!(!list.to_string().contains(&secret), "{list}");
    v["id"].as_str().unwrap().to_string()
}

/// The tenant's events, newest first, through the admin API.
/// Waits until the notifier has completed two passes more than it had: the second began after
/// this call, so whatever was due by then has been raised and delivered. (How a test checks that
/// nothing more happens, without a fixed sleep.)
async fn whole_pass(s: &TestServer) {
    let passes = &s.state().notifier().passes;
    let target = passes.get() + 2;
    let deadline = Instant::now() + Duration::from_secs(30);
    while passes.get() < target {
        assert!(Instant::now() < deadline, "the notifier stopped passing");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn events(s: &TestServer) -> Vec<Value> {
    let v = s.get_json("/api/v1/admin/webhooks/events", &s.token_of("contoso", "root", true)).await;
    v["events"].as_array().unwrap().clone()
}

async fn deliveries(s: &TestServer) -> Vec<Value> {
    let v = s.get_json("/api/v1/admin/webhooks/deliveries", &s.token_of("contoso", "root", true)).await;
    v["deliveries"].as_array().unwrap().clone()
}

/// `POST .../webhooks/{id}/test` as contoso's admin.
async fn send_test(s: &TestServer, id: &str) -> reqwest::Response {
    s.http
        .post(s.url(&format!("/api/v1/admin/webhooks/{id}/test")))
        .bearer_auth(s.token_of("contoso", "root", true))
        .send()
        .await
        .unwrap()
}

/// One new conversation with a billed session; the message's status.
async fn session(s: &TestServer) -> u16 {
    say_at(&s.http, &s.base).await.unwrap().as_u16()
}

fn types(events: &[Value]) -> Vec<String> {
    let mut t: Vec<String> = events
        .iter()
        .map(|e| format!("{}:{}", e["type"].as_str().unwrap(), e["data"]["threshold_percent"]))
        .collect();
    t.sort();
    t
}

/// 80% and 100% of a pool of 10 fire at the 8th and 10th session, once each, also across a
/// restart; each arrives signed, verified by `standardwebhooks`; overage starts its own event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_thresholds_fire_once_each_signed_and_survive_a_restart() {
    let r = Receiver::start();
    let s = TestServer::with(small_pool).await;
    endpoint(&s, &r, &["capacity.threshold", "capacity.overage_started"]).await;
    for _ in 0..7 {
        assert_eq!(session(&s).await, 200);
    }
    // The ledger raises events in the session's own transaction: none yet at 7 of 10.
    assert!(events(&s).await.is_empty());
    assert_eq!(session(&s).await, 200);
    assert_eq!(types(&events(&s).await), ["capacity.threshold:80"]);
    let got = r.wait_for(1).await;
    assert_eq!(got[0]["verified"], true, "{got:?}");
    assert_eq!(got[0]["body"]["type"], "capacity.threshold");
    assert_eq!(
        got[0]["body"]["data"],
        json!({"tenant": "contoso", "month": "2026-11", "threshold_percent": 80, "used": 8, "capacity": 10})
    );
    for _ in 0..2 {
        assert_eq!(session(&s).await, 200);
    }
    assert_eq!(session(&s).await, 429, "the pool is empty");
    assert_eq!(types(&events(&s).await), ["capacity.threshold:100", "capacity.threshold:80"]);
    let got = r.wait_for(2).await;
    assert_eq!(got[1]["verified"], true, "{got:?}");
    assert_eq!(got[1]["body"]["data"]["used"], 10);
    assert_ne!(got[0]["id"], got[1]["id"]);

    // A restart raises nothing again and delivers nothing again.
    let (dir, clock) = s.stop().await;
    let s = TestServer::in_dir(dir, clock, small_pool).await;
    assert_eq!(events(&s).await.len(), 2);
    // Allowing overage: the next session is served beyond capacity and raises its event.
    let admin = s.token_of("contoso", "root", true);
    let res = s
        .http
        .patch(s.url("/api/v1/admin/settings"))
        .bearer_auth(&admin)
        .json(&json!({"capacity_policy": "allow_overage"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(session(&s).await, 200);
    assert_eq!(session(&s).await, 200);
    let got = r.wait_for(3).await;
    assert_eq!(got[2]["body"]["type"], "capacity.overage_started");
    assert_eq!(got[2]["verified"], true);
    let all = events(&s).await;
    assert_eq!(all.len(), 3, "{all:?}");
    for e in &all {
        assert_eq!(e["deliveries"][0]["outcome"], "delivered", "{e}");
        assert_eq!(e["pending"], false);
    }
    // Exactly three deliveries: no repeats while the events stay settled.
    whole_pass(&s).await;
    assert_eq!(r.received().await.len(), 3);
}

/// A tenant's own thresholds replace the default; an empty list raises none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_sets_its_own_thresholds() {
    let s = TestServer::with(small_pool).await;
    let admin = s.token_of("contoso", "root", true);
    let patch = |v: Value| s.http.patch(s.url("/api/v1/admin/settings")).bearer_auth(&admin).json(&v).send();
    let res = patch(json!({"capacity_alerts": [150]})).await.unwrap();
    assert_error(res, 400, "BadRequest").await;
    let res = patch(json!({"capacity_alerts": [50, 20, 50]})).await.unwrap();
    assert_eq!(res.json::<Value>().await.unwrap()["capacity_alerts"], json!([20, 50]));
    for _ in 0..5 {
        assert_eq!(session(&s).await, 200);
    }
    let mut pct: Vec<u64> =
        events(&s).await.iter().map(|e| e["data"]["threshold_percent"].as_u64().unwrap()).collect();
    pct.sort();
    assert_eq!(pct, [20, 50]);
}

/// A receiver answering 500 three times, then 200: four attempts under one `webhook-id`, on the
/// documented backoff (moved by the manual clock), exactly one success, every attempt in the
/// delivery log with its status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_failures_then_success_is_delivered_once_with_the_attempts_logged() {
    let r = Receiver::start();
    let s = TestServer::with(small_pool).await;
    let id = endpoint(&s, &r, &[]).await;
    r.control(json!({"statuses": [500, 500, 500]})).await;
    let res = send_test(&s, &id).await;
    assert_eq!(res.status(), 202);
    let event_id = res.json::<Value>().await.unwrap()["event_id"].as_str().unwrap().to_string();
    r.wait_for(1).await;
    // Waits of 5, 10 and 20 s (each within 20% jitter): the clock moves past each.
    for (n, wait) in [(2, 6), (3, 12), (4, 24)] {
        // Not due before its wait (the first retry waits at least 4 s).
        if n == 2 {
            s.clock.advance_secs(3);
            whole_pass(&s).await;
            assert_eq!(r.received().await.len(), 1, "retried early");
            s.clock.advance_secs(wait - 3);
        } else {
            s.clock.advance_secs(wait);
        }
        r.control(json!({"now": botgate::clock::Clock::now_secs(&*s.clock)})).await;
        r.wait_for(n).await;
    }
    // Settled: time passing sends nothing more.
    s.clock.advance_secs(3600);
    whole_pass(&s).await;
    let got = r.received().await;
    assert_eq!(got.len(), 4, "{got:?}");
    assert!(got.iter().all(|g| g["id"] == event_id.as_str() && g["verified"] == true), "{got:?}");
    let statuses: Vec<u64> = got.iter().map(|g| g["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, [500, 500, 500, 200]);
    let log = wait_log(&s, 4).await;
    let rows: Vec<(u64, u64, &str)> = log
        .iter()
        .map(|d| {
            (d["attempt"].as_u64().unwrap(), d["status"].as_u64().unwrap(), d["outcome"].as_str().unwrap())
        })
        .collect();
    assert_eq!(rows, [(4, 200, "delivered"), (3, 500, "retry"), (2, 500, "retry"), (1, 500, "retry")]);
    let ev = events(&s).await;
    assert_eq!(
        ev[0]["deliveries"],
        json!([{"endpoint": id, "attempts": 4, "outcome": "delivered", "next_attempt_at": null}])
    );
    let m = s.metrics().await;
    assert_eq!(metric(&m, r#"botgate_webhook_attempts_total{outcome="retry"}"#), Some(3));
    assert_eq!(metric(&m, r#"botgate_webhook_attempts_total{outcome="delivered"}"#), Some(1));
}

/// The delivery log once it has `n` rows (settling follows the receiver's answer).
async fn wait_log(s: &TestServer, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = deliveries(s).await;
        if log.len() >= n {
            return log;
        }
        assert!(Instant::now() < deadline, "delivery log: {log:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An endpoint that fails for the whole give-up window is disabled, with an audit entry; an
/// admin turns it on again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_for_the_give_up_window_is_disabled_and_audited() {
    let r = Receiver::start();
    let s = TestServer::with(|c| {
        small_pool(c);
        c.notifications.give_up_after_secs = 60;
    })
    .await;
    let id = endpoint(&s, &r, &[]).await;
    r.control(json!({"default_status": 503})).await;
    let admin = s.token_of("contoso", "root", true);
    let url = s.url(&format!("/api/v1/admin/webhooks/{id}/test"));
    assert_eq!(s.http.post(&url).bearer_auth(&admin).send().await.unwrap().status(), 202);
    let mut seen = 1;
    r.wait_for(seen).await;
    // Retries until 60 s after the event: then `failed`, and the endpoint is off.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let e = s.get_json(&format!("/api/v1/admin/webhooks/{id}"), &admin).await;
        if e["enabled"] == false {
            assert!(e["disabled_reason"].as_str().unwrap().contains("failed"), "{e}");
            break;
        }
        assert!(Instant::now() < deadline, "{e}");
        s.clock.advance_secs(30);
        r.control(json!({"now": botgate::clock::Clock::now_secs(&*s.clock)})).await;
        if r.received().await.len() > seen {
            seen += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = wait_log(&s, 2).await;
    assert_eq!(log[0]["outcome"], "failed", "{log:?}");
    let audit = s.get_json("/api/v1/admin/audit?action=webhook.disable", &admin).await;
    let entries = audit["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{audit}");
    assert_eq!(entries[0]["actor"], "system:notifications");
    // Disabled: a new test event goes nowhere until an admin turns it on again.
    let res = s
        .http
        .patch(s.url(&format!("/api/v1/admin/webhooks/{id}")))
        .bearer_auth(&admin)
        .json(&json!({"enabled": true}))
        .send()
        .await
        .unwrap();
    let v: Value = res.json().await.unwrap();
    assert_eq!((v["enabled"].clone(), v["disabled_reason"].clone()), (json!(true), Value::Null));
}

/// The admin API refuses what it must: a URL the outbound policy denies, unknown event types,
/// more endpoints than allowed, unknown ids; rotation returns a new secret that signs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_are_checked_and_secrets_rotate() {
    let r = Receiver::start();
    let s = TestServer::with(|c| {
        small_pool(c);
        c.notifications.max_endpoints_per_tenant = 2;
    })
    .await;
    let admin = s.token_of("contoso", "root", true);
    let post = |v: Value| s.http.post(s.url("/api/v1/admin/webhooks")).bearer_auth(&admin).json(&v).send();
    assert_error(
        post(json!({"url": "http://169.254.169.254/latest"})).await.unwrap(),
        400,
        "EndpointNotAllowed",
    )
    .await;
    assert_error(post(json!({"url": "https://example.com/x"})).await.unwrap(), 400, "EndpointNotAllowed")
        .await;
    assert_error(post(json!({"url": r.url, "events": ["capacity.nope"]})).await.unwrap(), 400, "BadRequest")
        .await;
    let id = endpoint(&s, &r, &["test"]).await;
    assert_eq!(post(json!({"url": r.url})).await.unwrap().status(), 201);
    assert_error(post(json!({"url": r.url})).await.unwrap(), 409, "TooManyEndpoints").await;
    let res = s.http.get(s.url("/api/v1/admin/webhooks/ep_none")).bearer_auth(&admin).send().await.unwrap();
    assert_error(res, 404, "EndpointNotFound").await;
    // An author who is not an admin cannot see them.
    let res = s
        .http
        .get(s.url("/api/v1/admin/webhooks"))
        .bearer_auth(s.token_of("contoso", "alice", false))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);

    // Rotation: the new secret verifies; the old one still signs beside it for the overlap.
    let res = s
        .http
        .post(s.url(&format!("/api/v1/admin/webhooks/{id}/rotate")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let new_secret = res.json::<Value>().await.unwrap()["secret"].as_str().unwrap().to_string();
    r.control(json!({"secret": new_secret})).await;
    let url = s.url(&format!("/api/v1/admin/webhooks/{id}/test"));
    assert_eq!(s.http.post(&url).bearer_auth(&admin).send().await.unwrap().status(), 202);
    let got = r.wait_for(1).await;
    assert_eq!(got[0]["verified"], true, "{got:?}");
    assert_eq!(got[0]["signature"].as_str().unwrap().split(' ').count(), 2, "both secrets sign");
    // After the overlap only the new one signs.
    s.clock.advance_secs(86_401);
    r.control(json!({"now": botgate::clock::Clock::now_secs(&*s.clock)})).await;
    let admin = s.token_of("contoso", "root", true);
    assert_eq!(s.http.post(&url).bearer_auth(&admin).send().await.unwrap().status(), 202);
    let got = r.wait_for(2).await;
    assert_eq!(got[1]["verified"], true, "{got:?}");
    assert_eq!(got[1]["signature"].as_str().unwrap().split(' ').count(), 1);
    // Deleted: gone from the list.
    let res = s
        .http
        .delete(s.url(&format!("/api/v1/admin/webhooks/{id}")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let list = s.get_json("/api/v1/admin/webhooks", &admin).await;
    assert_eq!(list["endpoints"].as_array().unwrap().len(), 1);
}

/// `kill -9` while an event waits in the outbox for a retry: the restarted binary delivers it,
/// under the same `webhook-id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_in_the_outbox_survives_kill_9() {
    let r = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("botgate.toml");
    let text = std::fs::read_to_string(root().join("config/default.toml")).unwrap().replace(
        "[metrics]",
        "[notifications]\npoll_ms = 50\nretry_initial_secs = 1\nretry_max_interval_secs = 1\n\n[metrics]",
    );
    std::fs::write(&cfg, text).unwrap();
    let data = dir.path().join("data");
    let server = BinaryServer::spawn(&["--config", cfg.to_str().unwrap()], &data);
    let base = format!("http://{}", server.public);
    let key = botgate::identity::dev_issuer::load_or_create(&data).unwrap();
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let req = botgate::identity::dev_issuer::TokenRequest {
        tenant: "contoso".into(),
        user: "root".into(),
        admin: true,
        ttl_secs: 3600,
        ..Default::default()
    };
    let admin = botgate::identity::dev_issuer::sign(&key, "botgate-dev", "botgate", &req, now());
    let http = reqwest::Client::new();
    let v: Value = http
        .post(format!("{base}/api/v1/admin/webhooks"))
        .bearer_auth(&admin)
        .json(&json!({"url": r.url}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r.control(json!({"secret": v["secret"], "default_status": 500})).await;
    let id = v["id"].as_str().unwrap();
    let res = http
        .post(format!("{base}/api/v1/admin/webhooks/{id}/test"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let event_id = res.json::<Value>().await.unwrap()["event_id"].as_str().unwrap().to_string();
    // The first attempt failed and is settled (the event waits for its retry): kill -9.
    r.wait_for(1).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log: Value = http
            .get(format!("{base}/api/v1/admin/webhooks/deliveries"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if !log["deliveries"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.signal("-KILL");
    drop(server);
    r.control(json!({"default_status": 200})).await;
    let seen = r.received().await.len();
    let _server = BinaryServer::spawn(&["--config", cfg.to_str().unwrap()], &data);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = r.received().await;
        if let Some(ok) = got.iter().skip(seen).find(|g| g["status"] == 200) {
            assert_eq!(ok["id"], event_id.as_str());
            assert_eq!(ok["verified"], true);
            break;
        }
        assert!(Instant::now() < deadline, "{got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three nodes on one Redis, sessions spread over them concurrently across 80% and 100%: one
/// event per threshold, each delivered once (claims keep the nodes off each other's events).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_crossing_a_threshold_together_send_one_event() {
    let r = Receiver::start();
    let redis = RedisServer::start();
    let url = redis.url();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(Arc::new(
            TestServer::with(|c| {
                small_pool(c);
                c.metering.tenant_license_sessions = 30;
                c.store.backend = StoreBackend::Redis;
                c.store.redis_url = url.clone();
                c.cluster.lease_ttl_secs = 60;
            })
            .await,
        ));
    }
    let a = &nodes[0];
    let key = a.state().store().shared_key(botgate::identity::dev_issuer::KEY_NAME, &[0; 32]).unwrap();
    let req = botgate::identity::dev_issuer::TokenRequest {
        tenant: "contoso".into(),
        user: "root".into(),
        admin: true,
        ttl_secs: 3600,
        ..Default::default()
    };
    let admin = botgate::identity::dev_issuer::sign(
        &key,
        "botgate-dev",
        "botgate",
        &req,
        botgate::clock::Clock::now_secs(&*a.clock),
    );
    let v: Value = a
        .http
        .post(a.url("/api/v1/admin/webhooks"))
        .bearer_auth(&admin)
        .json(&json!({"url": r.url, "events": ["capacity.threshold"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r.control(json!({"secret": v["secret"], "now": botgate::clock::Clock::now_secs(&*a.clock)})).await;
    // Every node knows the endpoint before the sessions start.
    for n in &nodes {
        let deadline = Instant::now() + Duration::from_secs(30);
        while n.get_json("/api/v1/admin/webhooks", &admin).await["endpoints"].as_array().unwrap().is_empty() {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut tasks = Vec::new();
    for n in &nodes {
        let n = n.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            for _ in 0..12 {
                if session(&n).await == 200 {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    assert_eq!(ok, 30, "the pool of 30 across three nodes");
    let got = r.wait_for(2).await;
    for n in &nodes {
        whole_pass(n).await;
    }
    let got_after = r.received().await;
    assert_eq!(got_after.len(), 2, "one delivery per threshold: {got_after:?}");
    let mut pct: Vec<u64> =
        got.iter().map(|g| g["body"]["data"]["threshold_percent"].as_u64().unwrap()).collect();
    pct.sort();
    assert_eq!(pct, [80, 100]);
    assert!(got.iter().all(|g| g["verified"] == true), "{got:?}");
    for n in &nodes {
        assert_eq!(
            n.get_json("/api/v1/admin/webhooks/events", &admin).await["events"].as_array().unwrap().len(),
            2
        );
    }
}

/// The events of `tenant` of type `kind`, through its admin's API.
async fn events_of(s: &TestServer, tenant: &str, kind: &str) -> Vec<Value> {
    let v = s.get_json("/api/v1/admin/webhooks/events?limit=1000", &s.token_of(tenant, "root", true)).await;
    v["events"].as_array().unwrap().iter().filter(|e| e["type"] == kind).cloned().collect()
}

/// Waits until `tenant` has `n` events of `kind` (the sweep runs every 20 ms), then checks
/// that a whole pass more adds none.
async fn expect_events(s: &TestServer, tenant: &str, kind: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = events_of(s, tenant, kind).await;
        if got.len() >= n {
            whole_pass(s).await;
            let again = events_of(s, tenant, kind).await;
            assert_eq!(again.len(), n, "{kind} of {tenant}: {again:?}");
            return again;
        }
        assert!(Instant::now() < deadline, "{kind} of {tenant}: {got:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ms_of(t: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(t).unwrap().timestamp_millis()
}

/// The month's forecast on `/metrics` against a hand-computed schedule, and its event: 6
/// sessions at 10:00 on 2026-11-28, seen at 12:00, are 12 a day (6 over half a day since the
/// day began); the month's 2.5 days left add 30, so it ends at 36; the 4 sessions left of 10
/// last 8 hours: the pool runs out at 20:00, before the month ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forecast_is_on_metrics_and_raises_its_event_once() {
    let s = TestServer::with(small_pool).await;
    for _ in 0..6 {
        assert_eq!(session(&s).await, 200);
    }
    s.clock.set_ms(ms_of("2026-11-28T12:00:00Z"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let series = r#"botgate_tenant_projected_billed_sessions{tenant="contoso"}"#;
    loop {
        let m = s.metrics().await;
        if metric(&m, series) == Some(36) {
            let at = metric(&m, r#"botgate_tenant_projected_exhaustion_timestamp_seconds{tenant="contoso"}"#);
            assert_eq!(at, Some(ms_of("2026-11-28T20:00:00Z") as u64 / 1000), "{m}");
            break;
        }
        assert!(Instant::now() < deadline, "{:?}", metric(&m, series));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = expect_events(&s, "contoso", "capacity.forecast_exhaustion", 1).await;
    assert_eq!(e[0]["data"]["projected_exhaustion"], "2026-11-28T20:00:00.000Z");
    assert_eq!(e[0]["data"]["projected_billed_sessions"], 36);
    // Later in the month, at the same rate: no second event.
    s.clock.set_ms(ms_of("2026-11-28T14:00:00Z"));
    expect_events(&s, "contoso", "capacity.forecast_exhaustion", 1).await;
}

/// Thresholds are per month: the next month's 80% is an event of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thresholds_fire_again_in_the_next_month() {
    let s = TestServer::with(small_pool).await;
    for _ in 0..8 {
        assert_eq!(session(&s).await, 200);
    }
    s.clock.set_ms(ms_of("2026-12-01T09:00:00Z"));
    for _ in 0..7 {
        assert_eq!(session(&s).await, 200);
    }
    let months = |ev: &[Value]| -> Vec<String> {
        let mut m: Vec<String> =
            ev.iter().map(|e| e["data"]["month"].as_str().unwrap().to_string()).collect();
        m.sort();
        m
    };
    assert_eq!(months(&events_of(&s, "contoso", "capacity.threshold").await), ["2026-11"]);
    assert_eq!(session(&s).await, 200);
    assert_eq!(months(&events_of(&s, "contoso", "capacity.threshold").await), ["2026-11", "2026-12"]);
}

/// A trial's warning and expiry, its bots' grace ending, and seats full: each once, on the
/// manual clock, whatever the number of sweeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trials_grace_and_seats_raise_their_events_once() {
    let s = TestServer::with(small_pool).await;
    // fabrikam: no license; tess starts a trial and makes a bot.
    let res = s
        .http
        .post(s.url("/api/v1/operator/tenants"))
        .bearer_auth(OPERATOR_KEY)
        .json(&json!({"id": "fabrikam"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let tess = s.token_of("fabrikam", "tess", false);
    let res = s.http.post(s.url("/api/v1/trial")).bearer_auth(&tess).send().await.unwrap();
    assert_eq!(res.status(), 201);
    let bot = json!({"id": "tessbot", "name": "Tess", "kind": "builtin", "topics": [
        {"name": "Fallback", "kind": "system", "system": "fallback", "replies": ["?"]}]});
    let res = s.http.post(s.url("/api/v1/bots")).bearer_auth(&tess).json(&bot).send().await.unwrap();
    assert_eq!(res.status(), 201);
    // tailspin: one seat, then taken.
    operator_tenant(&s.http, &s.base, "tailspin", "2026-11-01", 1).await;
    assert!(events_of(&s, "tailspin", "seats.full").await.is_empty());
    let res = s
        .http
        .put(s.url("/api/v1/admin/licenses/users/u1"))
        .bearer_auth(s.token_of("tailspin", "root", true))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let e = expect_events(&s, "tailspin", "seats.full", 1).await;
    assert_eq!(e[0]["data"]["seats"], 1);

    let expires = s.state().licensing().tenant("fabrikam").unwrap().trials["tess"].expires_ms;
    const DAY: i64 = 86_400_000;
    assert!(events_of(&s, "fabrikam", "trial.expiring").await.is_empty());
    s.clock.set_ms(expires - 7 * DAY - 1000);
    whole_pass(&s).await;
    assert!(events_of(&s, "fabrikam", "trial.expiring").await.is_empty(), "not before 7 days");
    s.clock.set_ms(expires - 7 * DAY);
    let e = expect_events(&s, "fabrikam", "trial.expiring", 1).await;
    assert_eq!(e[0]["data"]["user"], "tess");
    s.clock.set_ms(expires - DAY);
    expect_events(&s, "fabrikam", "trial.expiring", 1).await;
    assert!(events_of(&s, "fabrikam", "trial.expired").await.is_empty());
    s.clock.set_ms(expires);
    expect_events(&s, "fabrikam", "trial.expired", 1).await;
    // The bots serve until the grace period (90 days) ends; 7 days before, one warning.
    let stop = expires + 90 * DAY;
    assert!(events_of(&s, "fabrikam", "bot.grace_ending").await.is_empty());
    s.clock.set_ms(stop - 7 * DAY);
    let e = expect_events(&s, "fabrikam", "bot.grace_ending", 1).await;
    assert_eq!(e[0]["data"]["bot"], "tessbot");
    s.clock.set_ms(stop - DAY);
    expect_events(&s, "fabrikam", "bot.grace_ending", 1).await;
    expect_events(&s, "fabrikam", "trial.expired", 1).await;
}

/// The operator's endpoints come from the configuration and receive every tenant's events,
/// signed with their configured secret; a bad endpoint entry is refused naming its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_configured_endpoints_receive_every_tenants_events() {
    let r = Receiver::start();
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let url = r.url.clone();
    let s = TestServer::with(move |c| {
        small_pool(c);
        c.notifications.endpoints = vec![botgate::config::OperatorEndpoint {
            id: "ops".into(),
            url,
            secret: secret.into(),
            events: vec!["capacity.threshold".into()],
        }];
    })
    .await;
    r.control(json!({"secret": secret, "now": botgate::clock::Clock::now_secs(&*s.clock)})).await;
    for _ in 0..8 {
        assert_eq!(session(&s).await, 200);
    }
    let got = r.wait_for(1).await;
    assert_eq!(
        (got[0]["verified"].clone(), got[0]["body"]["data"]["tenant"].clone()),
        (json!(true), json!("contoso"))
    );
    let log = wait_log(&s, 1).await;
    assert_eq!(log[0]["endpoint"], "op:ops");

    let base = std::fs::read_to_string(root().join("config/default.toml")).unwrap();
    for (entry, key) in [
        ("id = \"a\"\nurl = \"http://127.0.0.1:1/\"\nsecret = \"nope\"", "notifications.endpoints[0].secret"),
        (
            &format!("id = \"a\"\nurl = \"http://169.254.169.254/\"\nsecret = \"{secret}\""),
            "notifications.endpoints[0].url",
        ),
        (
            &format!("id = \"a\"\nurl = \"http://127.0.0.1:1/\"\nsecret = \"{secret}\"\nevents = [\"x\"]"),
            "notifications.endpoints[0].events",
        ),
    ] {
        let text = format!("{base}\n[[notifications.endpoints]]\n{entry}\n");
        let err = Config::from_str(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains(key), "{err}");
    }
}

/// `notifications.enabled = false`: nothing is raised, and a test event is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_notifications_raise_nothing() {
    let r = Receiver::start();
    let s = TestServer::with(|c| {
        small_pool(c);
        c.notifications.enabled = false;
    })
    .await;
    let id = endpoint(&s, &r, &[]).await;
    for _ in 0..10 {
        assert_eq!(session(&s).await, 200);
    }
    assert!(events(&s).await.is_empty());
    let res = send_test(&s, &id).await;
    assert_error(res, 409, "NotificationsDisabled").await;
}

/// A receiver that accepts and never answers: sessions are served meanwhile, the attempt ends at
/// `attempt_timeout_ms` with the cause logged, and the event waits for its retry (nothing lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_receiver_slows_nothing_and_loses_nothing() {
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", hung.local_addr().unwrap());
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = hung.accept().await {
            keep.lock().unwrap().push(sock);
        }
    });
    let s = TestServer::with(|c| {
        small_pool(c);
        c.notifications.attempt_timeout_ms = 300;
    })
    .await;
    let admin = s.token_of("contoso", "root", true);
    let res = s
        .http
        .post(s.url("/api/v1/admin/webhooks"))
        .bearer_auth(&admin)
        .json(&json!({"url": url}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    for _ in 0..10 {
        assert_eq!(session(&s).await, 200);
    }
    let log = wait_log(&s, 2).await;
    for d in &log {
        assert_eq!(d["outcome"], "retry", "{d}");
        assert!(d["error"].as_str().unwrap().contains("no answer within 300 ms"), "{d}");
        assert_eq!(d["status"], Value::Null);
    }
    let ev = events(&s).await;
    assert_eq!(ev.len(), 2);
    assert!(ev.iter().all(|e| e["pending"] == true && e["deliveries"][0]["outcome"].is_null()), "{ev:?}");
    assert!(!held.lock().unwrap().is_empty(), "the receiver was reached");
}
