//! Billed-session metering through the real server, with exact numbers: each session rule,
//! capacity under concurrency, month rollover, overage, the rate limit, restarts, `kill -9`,
//! the series cap, and a `promtool`-valid exposition.

mod common;

use std::sync::Arc;

use botgate::clock::ManualClock;
use botgate::store::Store;
use botgate::store::sqlite::SqliteStore;
use common::*;
use serde_json::Value;

const BILLED: &str = r#"botgate_billed_sessions_total{tenant="contoso",bot="helpdesk"}"#;
const TURNS: &str = r#"botgate_turns_total{tenant="contoso",bot="helpdesk"}"#;
const USED: &str = r#"botgate_tenant_used_sessions{tenant="contoso"}"#;

async fn billed(s: &TestServer) -> u64 {
    metric(&s.metrics().await, BILLED).unwrap()
}

/// Long-lived tokens and conversations, so the session rules are what ends sessions.
fn patient(c: &mut botgate::config::Config) {
    c.channel.token_ttl_secs = 100_000;
    c.channel.idle_timeout_secs = 100_000;
}

#[tokio::test]
async fn system_topics_never_begin_a_session_and_the_first_user_topic_does() {
    let s = TestServer::start().await;
    let (token, conv, _) = s.conversation("helpdesk").await;
    s.say_ok(&token, &conv, "hello there").await; // Fallback
    s.say_ok(&token, &conv, "can I talk to a human").await; // Escalate
    assert_eq!(billed(&s).await, 0);
    s.say_ok(&token, &conv, "my vpn is broken").await;
    s.say_ok(&token, &conv, "and my password").await;
    let m = s.metrics().await;
    assert_eq!(metric(&m, BILLED), Some(1));
    assert_eq!(metric(&m, TURNS), Some(4));
    assert_eq!(metric(&m, USED), Some(1));
}

#[tokio::test]
async fn the_101st_turn_begins_a_new_session() {
    let s = TestServer::start().await;
    let (token, conv, _) = s.conversation("helpdesk").await;
    s.clock.advance_secs(0);
    for i in 0..100 {
        s.say_ok(&token, &conv, "vpn").await;
        if i % 50 == 0 {
            s.clock.advance_secs(1);
        }
    }
    assert_eq!(billed(&s).await, 1);
    s.say_ok(&token, &conv, "vpn").await;
    assert_eq!(billed(&s).await, 2);
}

#[tokio::test]
async fn the_61st_minute_begins_a_new_session() {
    let s = TestServer::with(patient).await;
    let (token, conv, _) = s.conversation("helpdesk").await;
    s.say_ok(&token, &conv, "vpn").await;
    for _ in 0..2 {
        s.clock.advance_secs(20 * 60);
        s.say_ok(&token, &conv, "vpn").await;
    }
    s.clock.advance_secs(19 * 60 + 59);
    s.say_ok(&token, &conv, "vpn").await;
    assert_eq!(billed(&s).await, 1, "59:59 is still the first session");
    s.clock.advance_secs(1);
    s.say_ok(&token, &conv, "vpn").await;
    assert_eq!(billed(&s).await, 2);
}

#[tokio::test]
async fn thirty_idle_minutes_end_the_session_and_the_conversation() {
    let s = TestServer::with(|c| c.channel.token_ttl_secs = 100_000).await;
    let (token, conv, _) = s.conversation("helpdesk").await;
    s.say_ok(&token, &conv, "vpn").await;
    s.clock.advance_secs(31 * 60);
    assert_error(s.say(&token, &conv, "vpn").await, 404, "ConversationNotFound").await;
    assert_eq!(billed(&s).await, 1);

    // Where the channel keeps idle conversations longer, the next message begins a new session.
    let s = TestServer::with(patient).await;
    let (token, conv, _) = s.conversation("helpdesk").await;
    s.say_ok(&token, &conv, "vpn").await;
    s.clock.advance_secs(29 * 60);
    s.say_ok(&token, &conv, "vpn").await;
    s.clock.advance_secs(30 * 60);
    s.say_ok(&token, &conv, "vpn").await;
    assert_eq!(billed(&s).await, 2);
}

#[tokio::test]
async fn ending_the_conversation_ends_the_session() {
    let s = TestServer::start().await;
    let (token, conv, _) = s.conversation("helpdesk").await;
    s.say_ok(&token, &conv, "vpn").await;
    s.say_ok(&token, &conv, "bye").await;
    assert_error(s.say(&token, &conv, "vpn").await, 404, "ConversationEnded").await;
    let (token, conv, _) = s.conversation("helpdesk").await;
    s.say_ok(&token, &conv, "vpn").await;
    assert_eq!(billed(&s).await, 2);
}

fn small_pool(n: u64) -> impl FnOnce(&mut botgate::config::Config) {
    move |c| {
        c.metering.tenant_license_sessions = n;
        c.metering.rate_limit_per_minute = 1_000_000;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_n_begins_exactly_n_sessions_under_concurrency_then_429() {
    const N: u64 = 60;
    let s = Arc::new(TestServer::with(small_pool(N)).await);
    let mut convs = Vec::new();
    for _ in 0..90 {
        let (t, c, _) = s.conversation("helpdesk").await;
        convs.push((t, c));
    }
    let convs = Arc::new(convs);
    let mut tasks = Vec::new();
    for half in 0..2 {
        let (s, convs) = (s.clone(), convs.clone());
        tasks.push(tokio::spawn(async move {
            let mut ok = Vec::new();
            let mut refused = 0;
            for (t, c) in convs.iter().skip(half).step_by(2) {
                let res = s.say(t, c, "vpn").await;
                match res.status().as_u16() {
                    200 => ok.push((t.clone(), c.clone())),
                    429 => {
                        assert!(res.headers().contains_key("retry-after"));
                        assert_error(res, 429, "CapacityExhausted").await;
                        refused += 1;
                    }
                    other => panic!("unexpected {other}"),
                }
            }
            (ok, refused)
        }));
    }
    let mut ok = Vec::new();
    let mut refused = 0;
    for t in tasks {
        let (o, r) = t.await.unwrap();
        ok.extend(o);
        refused += r;
    }
    assert_eq!(ok.len() as u64, N);
    assert_eq!(refused, 30);
    // Open sessions keep working after the pool is empty.
    for (t, c) in ok.iter().take(5) {
        s.say_ok(t, c, "password").await;
    }
    let m = s.metrics().await;
    assert_eq!(metric(&m, BILLED), Some(N));
    assert_eq!(metric(&m, USED), Some(N));
    assert_eq!(metric(&m, r#"botgate_tenant_remaining_sessions{tenant="contoso"}"#), Some(0));
    assert_eq!(
        metric(&m, r#"botgate_sessions_rejected_total{tenant="contoso",bot="helpdesk",reason="capacity"}"#),
        Some(30)
    );
    let ids = s.state().store().session_ids().unwrap();
    assert_eq!(ids.len() as u64, N, "every session is in the ledger once");
}

#[tokio::test]
async fn the_month_rolls_over_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::at("2026-11-30T23:59:00Z");
    let s = TestServer::in_dir(dir, clock, small_pool(2)).await;
    for _ in 0..2 {
        let (t, c, _) = s.conversation("helpdesk").await;
        s.say_ok(&t, &c, "vpn").await;
    }
    let (t, c, _) = s.conversation("helpdesk").await;
    let res = s.say(&t, &c, "vpn").await;
    assert_eq!(res.headers()["retry-after"], "60", "seconds until the month ends");
    assert_error(res, 429, "CapacityExhausted").await;
    s.clock.advance_secs(60);
    s.say_ok(&t, &c, "vpn").await;
    let m = s.metrics().await;
    assert_eq!(metric(&m, USED), Some(1), "December starts from zero");
    assert_eq!(metric(&m, BILLED), Some(3));
}

#[tokio::test]
async fn overage_policy_serves_and_counts_overage() {
    let s = TestServer::with(|c| {
        small_pool(1)(c);
        c.tenants[0].capacity_policy = botgate::config::CapacityPolicy::AllowOverage;
    })
    .await;
    for _ in 0..3 {
        let (t, c, _) = s.conversation("helpdesk").await;
        s.say_ok(&t, &c, "vpn").await;
    }
    let m = s.metrics().await;
    assert_eq!(metric(&m, BILLED), Some(3));
    assert_eq!(metric(&m, r#"botgate_overage_sessions_total{tenant="contoso",bot="helpdesk"}"#), Some(2));
    assert_eq!(metric(&m, USED), Some(1));
}

#[tokio::test]
async fn the_rate_limit_answers_429_with_retry_after_and_polls_are_never_limited() {
    let s = TestServer::with(|c| c.metering.rate_limit_per_minute = 3).await;
    let (t, c, _) = s.conversation("helpdesk").await;
    for _ in 0..3 {
        s.say_ok(&t, &c, "vpn").await;
    }
    let res = s.say(&t, &c, "vpn").await;
    assert_eq!(res.headers()["retry-after"], "60", "the test clock stands at a whole minute");
    assert_error(res, 429, "RateLimited").await;
    for _ in 0..10 {
        s.poll(&t, &c, None).await;
    }
    s.clock.advance_secs(60);
    s.say_ok(&t, &c, "vpn").await;
    let m = s.metrics().await;
    assert_eq!(
        metric(&m, r#"botgate_sessions_rejected_total{tenant="contoso",bot="helpdesk",reason="rate_limit"}"#),
        Some(1)
    );
    assert_eq!(metric(&m, TURNS), Some(4));
}

#[tokio::test]
async fn counters_are_rebuilt_after_a_restart() {
    let s = TestServer::start().await;
    for _ in 0..3 {
        let (t, c, _) = s.conversation("helpdesk").await;
        s.say_ok(&t, &c, "vpn").await;
        s.say_ok(&t, &c, "hours").await;
    }
    let (dir, clock) = s.stop().await;
    let s = TestServer::in_dir(dir, clock, |_| {}).await;
    let m = s.metrics().await;
    assert_eq!(metric(&m, BILLED), Some(3));
    assert_eq!(metric(&m, TURNS), Some(6));
    assert_eq!(metric(&m, USED), Some(3));
    let (t, c, _) = s.conversation("helpdesk").await;
    s.say_ok(&t, &c, "vpn").await;
    assert_eq!(billed(&s).await, 4);
}

#[tokio::test]
async fn bot_series_are_capped_and_tenant_totals_stay_exact() {
    let s = TestServer::with(|c| {
        c.metrics.max_bot_series = 2;
        for id in ["b1", "b2", "b3"] {
            let mut b = c.bots[0].clone();
            b.id = id.into();
            c.bots.push(b);
        }
    })
    .await;
    for (bot, n) in [("helpdesk", 3), ("b1", 2), ("b2", 1), ("b3", 1)] {
        for _ in 0..n {
            let (t, c, _) = s.conversation(bot).await;
            s.say_ok(&t, &c, "vpn").await;
        }
    }
    let m = s.metrics().await;
    let series: Vec<&str> = m.lines().filter(|l| l.starts_with("botgate_billed_sessions_total{")).collect();
    assert_eq!(series.len(), 2, "{series:?}");
    assert_eq!(metric(&m, BILLED), Some(3));
    assert_eq!(metric(&m, r#"botgate_billed_sessions_total{tenant="contoso",bot="_other"}"#), Some(4));
    assert_eq!(metric(&m, USED), Some(7));
}

#[tokio::test]
async fn the_exposition_passes_promtool() {
    let s = TestServer::start().await;
    let (t, c, _) = s.conversation("helpdesk").await;
    s.say_ok(&t, &c, "vpn").await;
    let text = s.metrics().await;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package `prometheus`; scripts/test.sh installs it)");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{report}");
    for name in [
        "botgate_billed_sessions_total",
        "botgate_turns_total",
        "botgate_overage_sessions_total",
        "botgate_sessions_rejected_total",
        "botgate_tenant_capacity_sessions",
        "botgate_tenant_used_sessions",
        "botgate_tenant_remaining_sessions",
        "botgate_active_conversations",
    ] {
        assert!(text.contains(&format!("# TYPE {name} ")), "{name}");
    }
    assert_eq!(metric(&text, "botgate_active_conversations"), Some(1));
}

/// Many conversations begin at once; the server is killed with SIGKILL mid-way and restarted.
/// The ledger holds at least every session whose 200 the client received, at most every one it
/// attempted, and no session id twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_session() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = BinaryServer::spawn(&[], &data);
    let base = format!("http://{}", server.public);
    let http = reqwest::Client::new();
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let attempted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (http, base, acked, attempted) = (http.clone(), base.clone(), acked.clone(), attempted.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..1000 {
                let Ok(res) = http.get(format!("{base}/api/v1/bots/helpdesk/directline/token")).send().await
                else {
                    return;
                };
                let Ok(v) = res.json::<Value>().await else { return };
                let (t, c) = (
                    v["token"].as_str().unwrap().to_string(),
                    v["conversationId"].as_str().unwrap().to_string(),
                );
                if http
                    .post(format!("{base}/v3/directline/conversations"))
                    .bearer_auth(&t)
                    .send()
                    .await
                    .is_err()
                {
                    return;
                }
                attempted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let res = http
                    .post(format!("{base}/v3/directline/conversations/{c}/activities"))
                    .bearer_auth(&t)
                    .json(&serde_json::json!({"type":"message","from":{"id":"u"},"text":"vpn"}))
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status() == 200 => {
                        acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok(r) if r.status() == 429 => {}
                    _ => return,
                }
            }
        }));
    }
    while acked.load(std::sync::atomic::Ordering::SeqCst) < 300 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    server.signal("-KILL");
    for t in tasks {
        t.await.unwrap();
    }
    drop(server);
    let acked = acked.load(std::sync::atomic::Ordering::SeqCst);
    let attempted = attempted.load(std::sync::atomic::Ordering::SeqCst);
    // Restart: the server rebuilds its counters from what survived.
    let server = BinaryServer::spawn(&[], &data);
    let m = http.get(format!("http://{}/metrics", server.admin)).send().await.unwrap().text().await.unwrap();
    let counted = metric(&m, BILLED).unwrap();
    drop(server);
    let store = SqliteStore::open(&data).unwrap();
    let ids = store.session_ids().unwrap();
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "no session id twice");
    assert_eq!(ids.len() as u64, counted, "the rebuilt counter equals the ledger");
    assert!(counted >= acked, "stored {counted} < acknowledged {acked}");
    assert!(counted <= attempted, "stored {counted} > attempted {attempted}");
    println!("kill -9: acknowledged {acked}, stored {counted}, attempted {attempted}");
}

#[tokio::test]
async fn metering_can_be_switched_off_for_measurements() {
    let s = TestServer::with(|c| {
        c.metering.enabled = false;
        c.metering.rate_limit_per_minute = 1;
    })
    .await;
    let (t, c, _) = s.conversation("helpdesk").await;
    for _ in 0..3 {
        s.say_ok(&t, &c, "vpn").await;
    }
    let m = s.metrics().await;
    assert_eq!(metric(&m, BILLED), Some(0));
    assert_eq!(metric(&m, TURNS), Some(0));
}

/// `store.sqlite_sync = "normal"` keeps acknowledged sessions across a `kill -9` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_normal_sync_loses_no_acknowledged_session() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("normal.toml");
    let text =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml"))
            .unwrap()
            .replace("backend = \"sqlite\"", "backend = \"sqlite\"\nsqlite_sync = \"normal\"");
    std::fs::write(&cfg, text).unwrap();
    let data = dir.path().join("data");
    let server = BinaryServer::spawn(&["--config", cfg.to_str().unwrap()], &data);
    let base = format!("http://{}", server.public);
    let http = reqwest::Client::new();
    let mut acked = 0;
    for _ in 0..40 {
        assert_eq!(say_at(&http, &base).await, Some(reqwest::StatusCode::OK));
        acked += 1;
    }
    server.signal("-KILL");
    drop(server);
    let ids = SqliteStore::open(&data).unwrap().session_ids().unwrap();
    assert_eq!(ids.len(), acked);
}

/// The tenant's usage report projects the month at the trailing days' rate, on the manual clock:
/// 10, 10 and 6 sessions at 10:00 on 2026-11-28, -29 and -30 are 26 sessions over 58 hours.
#[tokio::test]
async fn the_usage_report_projects_the_month_at_the_trailing_rate() {
    let s = TestServer::with(|c| c.metering.tenant_license_sessions = 30).await;
    for (i, n) in [10, 10, 6].into_iter().enumerate() {
        if i > 0 {
            s.clock.advance_secs(86_400);
        }
        for _ in 0..n {
            let (token, conv, _) = s.conversation("helpdesk").await;
            s.say_ok(&token, &conv, "my vpn is down").await;
        }
    }
    let admin = s.token_of("contoso", "root", true);
    let v = s.get_json("/api/v1/admin/usage", &admin).await;
    assert_eq!((v["used"].as_u64(), v["capacity"].as_u64()), (Some(26), Some(30)), "{v}");
    let f = &v["forecast"];
    // 26 sessions in 58 hours: 10.759 a day; 14 hours left: 26 + 6.28 = 32.
    assert_eq!(f["daily_rate"], 10.759);
    assert_eq!(f["projected_billed_sessions"], 32);
    // 4 sessions left at 26 per 58 hours: 4 * 58 / 26 hours = 8 h 55 min 23.076 s after 10:00.
    assert_eq!(f["projected_exhaustion"], "2026-11-30T18:55:23.076Z");
    // A past month has no projection.
    let v = s.get_json("/api/v1/admin/usage?month=2026-10", &admin).await;
    assert!(v["forecast"].is_null(), "{v}");
}
