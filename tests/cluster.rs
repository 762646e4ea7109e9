//! Several botgate nodes on one real `redis-server`: one tenant pool, exactly.

mod common;

use std::sync::Arc;

use botgate::config::StoreBackend;
use common::*;

fn node(url: &str) -> impl FnOnce(&mut botgate::config::Config) + '_ {
    move |c| {
        c.store.backend = StoreBackend::Redis;
        c.store.redis_url = url.to_string();
        c.metering.tenant_license_sessions = 150;
        c.metering.rate_limit_per_minute = 1_000_000;
        c.cluster.lease_ttl_secs = 60;
    }
}

/// Three nodes, a pool of 150, 240 conversations each wanting a session, spread round-robin:
/// exactly 150 begin, the rest get 429, and the ledger holds 150.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_across_three_nodes_gives_exactly_n() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(Arc::new(TestServer::with(node(&url)).await));
    }
    let mut tasks = Vec::new();
    for n in &nodes {
        let n = n.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut refused) = (0u64, 0u64);
            for _ in 0..80 {
                let (t, c, _) = n.conversation("helpdesk").await;
                let res = n.say(&t, &c, "vpn").await;
                match res.status().as_u16() {
                    200 => ok += 1,
                    429 => {
                        assert_error(res, 429, "CapacityExhausted").await;
                        refused += 1;
                    }
                    s => panic!("unexpected {s}: {}", res.text().await.unwrap()),
                }
            }
            (ok, refused)
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let (o, r) = t.await.unwrap();
        ok += o;
        refused += r;
    }
    assert_eq!(ok, 150);
    assert_eq!(refused, 90);
    assert_eq!(redis.cli(&["HLEN", "bg:{contoso}:sessions"]), "150");
    // The admin report is the same from every node.
    for n in &nodes {
        let v = n.state().metering().usage().unwrap();
        let total: u64 = v.iter().filter(|u| u.tenant == "contoso").map(|u| u.sessions).sum();
        assert_eq!(total, 150);
    }
    // Redis calls per session stay small: leases are blocks.
    let stats = redis.cli(&["INFO", "commandstats"]);
    println!("{stats}");
}
