//! The Redis store behind one node, through the real server and a real `redis-server`.

mod common;

use common::*;

const BILLED: &str = r#"botgate_billed_sessions_total{tenant="contoso",bot="helpdesk"}"#;

#[tokio::test]
async fn sessions_licensing_and_restart_with_redis() {
    let redis = RedisServer::start();
    let url = redis.url();
    let s = TestServer::with(|c| {
        c.store.backend = botgate::config::StoreBackend::Redis;
        c.store.redis_url = url.clone();
    })
    .await;
    for _ in 0..3 {
        let (t, c, _) = s.conversation("helpdesk").await;
        s.say_ok(&t, &c, "vpn").await;
        s.say_ok(&t, &c, "hours").await;
    }
    assert_eq!(metric(&s.metrics().await, BILLED), Some(3));
    assert_eq!(redis.cli(&["HLEN", "bg:{contoso}:sessions"]), "3");
    assert!(redis.cli(&["GET", "bg:{contoso}:tenant"]).contains("\"contoso\""));

    let (dir, clock) = s.stop().await;
    let s = TestServer::in_dir(dir, clock, |c| {
        c.store.backend = botgate::config::StoreBackend::Redis;
        c.store.redis_url = url.clone();
    })
    .await;
    // With Redis, a node's own counters start from zero (Prometheus sums them across nodes);
    // the totals are in the store, and the tenant gauges read Redis at each heartbeat.
    botgate::cluster::heartbeat(s.state()).await;
    let m = s.metrics().await;
    assert_eq!(metric(&m, BILLED), Some(0));
    assert_eq!(metric(&m, r#"botgate_tenant_used_sessions{tenant="contoso"}"#), Some(3));
    let usage = s.state().metering().usage().unwrap();
    let (sessions, turns): (u64, u64) = usage.iter().fold((0, 0), |(a, b), u| (a + u.sessions, b + u.turns));
    assert_eq!((sessions, turns), (3, 6));
    let audit = redis.cli(&["LLEN", "bg:{contoso}:audit"]);
    assert_eq!(audit, "5", "the seeded tenant's audit entries, written once");
}
