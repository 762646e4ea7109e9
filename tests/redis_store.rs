//! The Redis store behind one node, through the real server and a real `redis-server`.

mod common;

use common::*;

const BILLED: &str = r#"botgate_billed_sessions_total{tenant="contoso",bot="helpdesk"}"#;

/// A one-node configuration on the Redis at `url`.
fn on_redis(c: &mut botgate::config::Config, url: &str) {
    c.store.backend = botgate::config::StoreBackend::Redis;
    c.store.redis_url = url.to_string();
}

#[tokio::test]
async fn sessions_licensing_and_restart_with_redis() {
    let redis = RedisServer::start();
    let url = redis.url();
    let s = TestServer::with(|c| on_redis(c, &url)).await;
    for _ in 0..3 {
        let (t, c, _) = s.conversation("helpdesk").await;
        s.say_ok(&t, &c, "vpn").await;
        s.say_ok(&t, &c, "hours").await;
    }
    assert_eq!(metric(&s.metrics().await, BILLED), Some(3));
    assert_eq!(redis.billed_sessions(), 3);
    assert!(redis.cli(&["GET", "bg:{contoso}:tenant"]).contains("\"contoso\""));

    let (dir, clock) = s.stop().await;
    let s = TestServer::in_dir(dir, clock, |c| on_redis(c, &url)).await;
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

/// A ledger batch retried or replayed under its id is kept and counted once; its cost in Redis
/// does not grow with its size.
#[test]
fn a_batch_recorded_twice_counts_once_at_a_fixed_cost() {
    use botgate::store::{SessionRecord, Store};
    let redis = RedisServer::start();
    let store = botgate::store::redis::RedisStore::open(&redis.url()).unwrap();
    let began_ms = 1_795_000_000_000; // 2026-11-18
    let rec = |id: &str, bot: &str, overage: bool| SessionRecord {
        id: id.into(),
        tenant: "contoso".into(),
        bot: bot.into(),
        began_ms,
        overage,
        node: "n1".into(),
    };
    let mut batch: Vec<SessionRecord> =
        (0..200).map(|i| rec(&format!("c{i}.1"), "helpdesk", false)).collect();
    batch.push(rec("c200.1", "helpdesk", true));
    batch.push(rec("c201.1", "sales", false));
    // A first, one-session batch: the server learns the script (the first call answers
    // NOSCRIPT, the store loads it and sends again) and the tenant is registered.
    store.record_sessions("n1.1.0", &[rec("c999.1", "helpdesk", false)]).unwrap();
    // The node holds a lease that covers the batch, as a node drawing from one does.
    redis.cli(&["HSET", "bg:{contoso}:pool:2026-11", "held:n1", "1000"]);
    redis.cli(&["CONFIG", "RESETSTAT"]);
    store.record_sessions("n1.1.1", &batch).unwrap();
    let stats = redis.cli(&["INFO", "commandstats"]);
    let calls: u64 = stats
        .lines()
        .filter(|l| !l.starts_with("cmdstat_config"))
        .filter_map(|l| l.split_once("calls=").and_then(|(_, r)| r.split(',').next()))
        .map(|n| n.parse::<u64>().unwrap())
        .sum();
    // EVALSHA, HSETNX, HEXISTS and HINCRBY of the month's count (thresholds are judged on it),
    // HINCRBY for helpdesk sessions, its overage, sales sessions and the node's pool use, and
    // HGET of what the node holds: 9, for 202 sessions.
    assert_eq!(calls, 9, "{stats}");
    store.record_sessions("n1.1.1", &batch).unwrap();
    assert_eq!(redis.billed_sessions(), 203);
    // A server that lost its scripts (a restart, SCRIPT FLUSH) gets the script again.
    redis.cli(&["SCRIPT", "FLUSH"]);
    store.record_sessions("n1.1.2", &[rec("c1000.1", "sales", false)]).unwrap();
    assert_eq!(redis.billed_sessions(), 204);
    let usage = store.load_usage().unwrap();
    let by_bot: Vec<(&str, u64, u64)> =
        usage.iter().map(|u| (u.bot.as_str(), u.sessions, u.overage)).collect();
    assert_eq!(by_bot, [("helpdesk", 202, 1), ("sales", 2, 0)]);
    assert_eq!(redis.cli(&["HGET", "bg:{contoso}:pool:2026-11", "used:n1"]), "203");
}

/// Many sessions finding the node's lease empty at once make one lease call at a time, not one
/// each: the others wait for it and take what it brought.
/// A Redis that speaks TLS (`rediss://`): the node verifies its certificate against
/// `store.redis_tls_ca` and records sessions through it; with the system's roots instead, the
/// same server's certificate is refused and nothing connects.
#[tokio::test]
async fn a_redis_over_tls_is_verified_against_the_configured_ca() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key, _) = tls::certificate(certs.path(), "redis");
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let port = tls_port.to_string();
    let extra: Vec<&std::ffi::OsStr> = vec![
        "--tls-port".as_ref(),
        port.as_ref(),
        "--tls-cert-file".as_ref(),
        cert.as_os_str(),
        "--tls-key-file".as_ref(),
        key.as_os_str(),
        "--tls-ca-cert-file".as_ref(),
        cert.as_os_str(),
        "--tls-auth-clients".as_ref(),
        "no".as_ref(),
    ];
    // The plain port stays open for the test's own `redis-cli`; the node uses the TLS port.
    let redis = RedisServer::start_with(tempfile::tempdir().unwrap(), 0, &extra);
    let url = format!("rediss://127.0.0.1:{tls_port}/");
    let (u, ca) = (url.clone(), cert.clone());
    let s = TestServer::with(move |c| {
        on_redis(c, &u);
        c.store.redis_tls_ca = ca.clone();
    })
    .await;
    for _ in 0..2 {
        let (t, c, _) = s.conversation("helpdesk").await;
        s.say_ok(&t, &c, "vpn").await;
    }
    assert_eq!(metric(&s.metrics().await, BILLED), Some(2));
    assert_eq!(redis.billed_sessions(), 2, "recorded over TLS");
    let clients = redis.cli(&["CLIENT", "LIST"]);
    assert!(clients.lines().any(|l| l.contains(&format!("laddr=127.0.0.1:{tls_port}"))), "{clients}");
    // Without the CA, the system's roots do not know the server's certificate.
    let config = botgate::config::StoreConfig {
        backend: botgate::config::StoreBackend::Redis,
        redis_url: url,
        ..Default::default()
    };
    let Err(refused) = botgate::store::redis::RedisStore::connect(&config, 0, 0) else {
        panic!("a certificate no root vouches for was accepted")
    };
    assert!(refused.to_string().to_lowercase().contains("certificate"), "{refused}");
}

/// A flush of the non-billing counters sent again (its answer lost) is applied once, per node;
/// another node's flush, and the same node's next start, count on their own.
#[test]
fn a_usage_flush_sent_again_counts_once() {
    use botgate::store::{Store, UsageDelta, UsageFlush};
    let redis = RedisServer::start();
    let store = botgate::store::redis::RedisStore::open(&redis.url()).unwrap();
    let rows = |turns, rejected_rate| {
        let d = UsageDelta { turns, rejected_rate, ..UsageDelta::default() };
        vec![
            ("contoso".to_string(), "helpdesk".to_string(), "2026-11-28".to_string(), d.clone()),
            ("contoso".to_string(), "faq".to_string(), "2026-11-28".to_string(), d.clone()),
            ("fabrikam".to_string(), "helpdesk".to_string(), "2026-11-28".to_string(), d),
        ]
    };
    let flush = |node, incarnation, seq| UsageFlush { node, incarnation, seq };
    let totals = || {
        let u = store.load_usage().unwrap();
        (u.iter().map(|u| u.turns).sum::<u64>(), u.iter().map(|u| u.rejected_rate).sum::<u64>(), u.len())
    };
    store.add_usage(flush("n1", "1.a", 1), &rows(3, 1)).unwrap();
    store.add_usage(flush("n1", "1.a", 1), &rows(3, 1)).unwrap();
    assert_eq!(totals(), (9, 3, 3), "sent twice, counted once");
    store.add_usage(flush("n1", "1.a", 2), &rows(2, 0)).unwrap();
    store.add_usage(flush("n1", "1.a", 1), &rows(3, 1)).unwrap();
    assert_eq!(totals(), (15, 3, 3), "an older flush of the same start is not applied again");
    store.add_usage(flush("n2", "1.b", 1), &rows(1, 0)).unwrap();
    store.add_usage(flush("n1", "2.c", 1), &rows(1, 0)).unwrap();
    assert_eq!(totals(), (21, 3, 3), "another node and a new start count on their own");
    assert_eq!(redis.cli(&["HGET", "bg:{contoso}:usage:flushes", "n1"]), "2.c 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_herd_on_an_empty_lease_makes_few_lease_calls() {
    let redis = RedisServer::start();
    let url = redis.url();
    let s = TestServer::with(|c| on_redis(c, &url)).await;
    let mut convs = Vec::new();
    for _ in 0..60 {
        convs.push(s.conversation("helpdesk").await);
    }
    redis.cli(&["CONFIG", "RESETSTAT"]);
    let says = convs.iter().map(|(t, c, _)| s.say_ok(t, c, "vpn"));
    futures_util::future::join_all(says).await;
    assert_eq!(redis.billed_sessions(), 60);
    // The lease script is the only caller of PEXPIRE: one call per grant. Grants grow from 10
    // (at most fourfold each), so 60 sessions need at least 3 (10 + 40 + 160); without the
    // single flight, sessions that found the lease empty together would each ask.
    let stats = redis.cli(&["INFO", "commandstats"]);
    let grants: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_pexpire:calls="))
        .and_then(|r| r.split(',').next())
        .map_or(0, |n| n.parse().unwrap());
    assert!((3..=5).contains(&grants), "{grants} lease grants for 60 sessions");
}

/// Nodes starting at once on an empty Redis seed a configured tenant once: one of them applies
/// its records and audit entries, the others apply nothing.
#[test]
fn nodes_racing_to_seed_a_tenant_seed_it_once() {
    use botgate::store::Store;
    use botgate::store::control::{AuditEntry, Mutation, TenantRecord};
    let redis = RedisServer::start();
    let stores: Vec<_> = (0..6)
        .map(|_| std::sync::Arc::new(botgate::store::redis::RedisStore::open(&redis.url()).unwrap()))
        .collect();
    for round in 0..20 {
        let tenant = format!("t{round}");
        let record = TenantRecord {
            id: tenant.clone(),
            name: tenant.clone(),
            allow_ad_hoc_subscriptions: false,
            capacity_policy: botgate::config::CapacityPolicy::Reject,
            capacity_alerts: None,
        };
        let audit = AuditEntry {
            seq: 0,
            tenant: tenant.clone(),
            at_ms: 0,
            actor: "config".into(),
            action: "tenant.create".into(),
            target: tenant.clone(),
            before: None,
            after: None,
        };
        let start = std::sync::Arc::new(std::sync::Barrier::new(stores.len()));
        let seeded: usize = std::thread::scope(|s| {
            let handles: Vec<_> = stores
                .iter()
                .map(|store| {
                    let (start, record, audit) = (start.clone(), record.clone(), audit.clone());
                    s.spawn(move || {
                        start.wait();
                        store
                            .seed_tenant(&record.id, &[Mutation::PutTenant(record.clone())], &[audit])
                            .unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| usize::from(h.join().unwrap())).sum()
        });
        assert_eq!(seeded, 1, "round {round}");
        assert_eq!(redis.cli(&["LLEN", &format!("bg:{{{tenant}}}:audit")]), "1", "round {round}");
    }
}

/// The outbox on Redis: a store from before the month counts starts them from the usage hash
/// (7 sessions, so the 8th of 10 reaches 80%); a retried batch raises nothing; claims lapse;
/// settled events leave the due set and are pruned after 92 days, their dedupe keys with them.
#[test]
fn the_outbox_counts_claims_settles_and_prunes_on_redis() {
    use botgate::store::Store;
    use botgate::store::outbox::{CapacityWatch, OutboxEvent, Target};
    let redis = RedisServer::start();
    let store = botgate::store::redis::RedisStore::open(&redis.url()).unwrap();
    redis.cli(&["HSET", "bg:{t}:usage", "b|2026-11-05|sessions", "7", "b|2026-10-30|sessions", "50"]);
    let month = botgate::metering::pool::parse_month("2026-11").unwrap();
    let at = botgate::metering::pool::month_start_ms(month) + 5 * 86_400_000;
    let rec = |id: &str| botgate::store::SessionRecord {
        id: id.into(),
        tenant: "t".into(),
        bot: "b".into(),
        began_ms: at,
        overage: false,
        node: String::new(),
    };
    let w = CapacityWatch { tenant: "t".into(), month, capacity: 10, thresholds: vec![80, 100] };
    store.record_watched("b1", &[rec("s8")], std::slice::from_ref(&w), at).unwrap();
    let ev = store.events("t", 10).unwrap();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert!(ev[0].event.payload.contains("\"used\":8"), "{}", ev[0].event.payload);
    assert!(ev[0].event.payload.contains("\"threshold_percent\":80"));
    store.record_watched("b1", &[rec("s8")], std::slice::from_ref(&w), at).unwrap();
    store.record_watched("b2", &[rec("s9")], std::slice::from_ref(&w), at).unwrap();
    assert_eq!(store.events("t", 10).unwrap().len(), 1, "a retried batch and the 9th raise nothing");

    let c = store.claim_due(at, 500, 10).unwrap();
    assert_eq!(c.len(), 1);
    assert!(store.claim_due(at + 100, 500, 10).unwrap().is_empty(), "claimed");
    assert_eq!(store.claim_due(at + 500, 500, 10).unwrap().len(), 1, "the claim lapsed");
    let t =
        Target { endpoint: "ep".into(), attempts: 1, next_ms: at + 9_000, outcome: Some("delivered".into()) };
    store.settle(&c[0].event, &[t], &[], 10).unwrap();
    assert!(store.claim_due(at + 20_000, 500, 10).unwrap().is_empty());
    assert_eq!(store.events("t", 10).unwrap()[0].due_ms, None);
    assert!(store.claim_due(at + 93 * 86_400_000, 500, 10).unwrap().is_empty());
    assert!(store.events("t", 10).unwrap().is_empty(), "pruned");
    // Raising by the same key works again once pruned; before, it is refused.
    let e = OutboxEvent::new("t", "test", "test/x".into(), at, serde_json::json!({}));
    assert_eq!(store.raise(&[e.clone(), e]).unwrap(), 1);
}
