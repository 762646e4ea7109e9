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
    assert_eq!(redis.billed_sessions(), 150);
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

/// A client talking to any node (round-robin): its conversation works through every node, the
/// WebSocket stream included, and an admin change made on one node applies on the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_clients_and_changes_reach_every_node() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(TestServer::with(node(&url)).await);
    }
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let (token, conv) = a.open_token("helpdesk").await;
    let res = b.http.post(b.url("/v3/directline/conversations")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(res.status(), 201);
    let start: serde_json::Value = res.json().await.unwrap();
    let stream = start["streamUrl"].as_str().unwrap().to_string();
    assert!(
        stream.contains(&b.addr().to_string()),
        "the stream URL names the address the client used: {stream}"
    );
    let id1 = b.say_ok(&token, &conv, "vpn").await;
    let id2 = c.say_ok(&token, &conv, "opening hours").await;
    let acts = c.poll(&token, &conv, None).await;
    let ids: Vec<&str> =
        acts["activities"].as_array().unwrap().iter().map(|x| x["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&id1.as_str()) && ids.contains(&id2.as_str()));
    let (mut ws, _) = tokio_tungstenite::connect_async(&stream).await.unwrap();
    let first = loop {
        use futures_util::StreamExt;
        let m = tokio::time::timeout(std::time::Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m
            && !t.is_empty()
        {
            break serde_json::from_str::<serde_json::Value>(&t).unwrap();
        }
    };
    assert_eq!(
        first["activities"].as_array().unwrap().len(),
        ids.len(),
        "the stream replays through the forwarding node"
    );
    // Billed once, on the owner.
    let billed: u64 = {
        let mut sum = 0;
        for n in &nodes {
            sum += metric(
                &n.metrics().await,
                r#"botgate_billed_sessions_total{tenant="contoso",bot="helpdesk"}"#,
            )
            .unwrap();
        }
        sum
    };
    assert_eq!(billed, 1);

    // An admin change on A is seen by C.
    let store_key = a.state().store().shared_key(botgate::identity::dev_issuer::KEY_NAME, &[0; 32]).unwrap();
    let sign = |user: &str, admin: bool| {
        let req = botgate::identity::dev_issuer::TokenRequest {
            tenant: "contoso".into(),
            user: user.into(),
            admin,
            ttl_secs: 3600,
            ..Default::default()
        };
        botgate::identity::dev_issuer::sign(
            &store_key,
            "botgate-dev",
            "botgate",
            &req,
            botgate::clock::Clock::now_secs(&*a.clock),
        )
    };
    let bob = sign("bob", false);
    let res = c.http.get(c.url("/api/v1/bots")).bearer_auth(&bob).send().await.unwrap();
    assert_error(res, 403, "NoUserLicense").await;
    let res = a
        .http
        .put(a.url("/api/v1/admin/licenses/users/bob"))
        .bearer_auth(sign("root", true))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut seen = false;
    for _ in 0..100 {
        let res = c.http.get(c.url("/api/v1/bots")).bearer_auth(&bob).send().await.unwrap();
        if res.status() == 200 {
            seen = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(seen, "the change reached node C within one second");
}

fn node_config(dir: &std::path::Path, url: &str, extra: &str) -> std::path::PathBuf {
    let base =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml"))
            .unwrap();
    let text = base
        .replace("backend = \"sqlite\"", &format!("backend = \"redis\"\nredis_url = \"{url}\""))
        .replace("rate_limit_per_minute = 800", "rate_limit_per_minute = 1000000")
        .replace("[metrics]", &format!("{extra}\n[metrics]"));
    let file = dir.join("node.toml");
    std::fs::write(&file, text).unwrap();
    file
}

/// A node killed with SIGKILL loses no acknowledged session, its conversations end cleanly (404
/// through another node), and its unused lease comes back after the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_loses_nothing_and_its_lease_returns() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = node_config(dir.path(), &redis.url(), "[cluster]\nlease_ttl_secs = 1\n");
    let a = BinaryServer::spawn(&["--config", cfg.to_str().unwrap()], &dir.path().join("a"));
    let b = BinaryServer::spawn(&["--config", cfg.to_str().unwrap()], &dir.path().join("b"));
    let http = reqwest::Client::new();
    let (base_a, base_b) = (format!("http://{}", a.public), format!("http://{}", b.public));
    let mut acked = 0;
    for _ in 0..25 {
        if say_at(&http, &base_a).await == Some(reqwest::StatusCode::OK) {
            acked += 1;
        }
    }
    assert_eq!(acked, 25);
    // A conversation owned by A.
    let (t, c) = started_at(&http, &base_a).await.unwrap();
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let pool = format!("bg:{{contoso}}:pool:{month}");
    let granted_before: u64 = redis.cli(&["HGET", &pool, "granted"]).parse().unwrap();
    assert!(granted_before > 25, "A holds unused units: {granted_before}");
    a.signal("-KILL");
    drop(a);
    assert_eq!(redis.billed_sessions(), 25);
    // After the TTL, B's next heartbeat or lease call reclaims A's unused units.
    let mut reclaimed = false;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let granted: u64 = redis.cli(&["HGET", &pool, "granted"]).parse().unwrap();
        if granted < granted_before {
            reclaimed = true;
            break;
        }
    }
    assert!(reclaimed, "A's lease came back");
    let res = http
        .get(format!("{base_b}/v3/directline/conversations/{c}/activities"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_error(res, 404, "ConversationNotFound").await;
    assert_eq!(say_at(&http, &base_b).await, Some(reqwest::StatusCode::OK));
}

/// Redis stopped mid-load: nodes serve from their leases, then refuse new sessions with 503
/// (fail_closed) while spooling what they acknowledged; Redis back: the spool is replayed and
/// the ledger holds every acknowledged session once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_and_back_fails_closed_and_counts_nothing_twice() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = node_config(dir.path(), &redis.url(), "[cluster]\nlease_ttl_secs = 30\n");
    let a = BinaryServer::spawn(&["--config", cfg.to_str().unwrap()], &dir.path().join("a"));
    let http = reqwest::Client::new();
    let base = format!("http://{}", a.public);
    let mut acked = 0u64;
    for _ in 0..5 {
        assert_eq!(say_at(&http, &base).await, Some(reqwest::StatusCode::OK));
        acked += 1;
    }
    let (rdir, port) = redis.stop();
    let (mut ok, mut refused) = (0u64, 0u64);
    for _ in 0..60 {
        match say_at(&http, &base).await {
            Some(reqwest::StatusCode::OK) => ok += 1,
            Some(reqwest::StatusCode::SERVICE_UNAVAILABLE) => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    acked += ok;
    assert!(ok > 0, "the lease kept serving");
    assert!(refused > 0, "then fail_closed refused new sessions");
    let m = http.get(format!("http://{}/metrics", a.admin)).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric(&m, r#"botgate_metering_degraded_total{reason="refused"}"#), Some(refused));
    assert_eq!(metric(&m, r#"botgate_metering_degraded_total{reason="spooled"}"#), Some(ok));
    let redis = RedisServer::start_in(rdir, port);
    let mut count = 0;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        count = redis.billed_sessions() as u64;
        if count == acked {
            break;
        }
    }
    assert_eq!(count, acked, "every acknowledged session, once");
    assert_eq!(say_at(&http, &base).await, Some(reqwest::StatusCode::OK), "serving again");
}

/// `safe_capacity`: with Redis down, a node serves what is left of its lease, then exactly
/// `safe_capacity_per_node` more sessions, then refuses; all are recorded once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_with_safe_capacity_allows_exactly_the_configured_number() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = node_config(
        dir.path(),
        &redis.url(),
        "[cluster]\nlease_ttl_secs = 30\noutage_policy = \"safe_capacity\"\nsafe_capacity_per_node = 3\n",
    );
    let a = BinaryServer::spawn(&["--config", cfg.to_str().unwrap()], &dir.path().join("a"));
    let http = reqwest::Client::new();
    let base = format!("http://{}", a.public);
    for _ in 0..5 {
        assert_eq!(say_at(&http, &base).await, Some(reqwest::StatusCode::OK));
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let fields = redis.cli(&["HGETALL", &format!("bg:{{contoso}}:pool:{month}")]);
    let lines: Vec<&str> = fields.lines().collect();
    let sum = |prefix: &str| -> u64 {
        lines.chunks(2).filter(|kv| kv[0].starts_with(prefix)).map(|kv| kv[1].parse::<u64>().unwrap()).sum()
    };
    let left_in_lease = sum("held:") - sum("used:");
    let (rdir, port) = redis.stop();
    let (mut ok, mut refused) = (0u64, 0u64);
    for _ in 0..40 {
        match say_at(&http, &base).await {
            Some(reqwest::StatusCode::OK) => ok += 1,
            Some(reqwest::StatusCode::SERVICE_UNAVAILABLE) => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ok, left_in_lease + 3, "the lease's {left_in_lease} units, then exactly 3");
    assert_eq!(refused, 40 - ok);
    let m = http.get(format!("http://{}/metrics", a.admin)).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric(&m, r#"botgate_metering_degraded_total{reason="safe_capacity"}"#), Some(3));
    assert_eq!(metric(&m, r#"botgate_metering_degraded_total{reason="refused"}"#), Some(refused));
    let redis = RedisServer::start_in(rdir, port);
    let expected = 5 + ok;
    let mut count = 0;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        count = redis.billed_sessions() as u64;
        if count == expected {
            break;
        }
    }
    assert_eq!(count, expected);
}

/// An author token of `contoso` from the dev issuer whose key the nodes share in Redis.
fn contoso_token(node: &TestServer, user: &str, admin: bool) -> String {
    let key = node.state().store().shared_key(botgate::identity::dev_issuer::KEY_NAME, &[0; 32]).unwrap();
    let req = botgate::identity::dev_issuer::TokenRequest {
        tenant: "contoso".into(),
        user: user.into(),
        admin,
        ttl_secs: 3600,
        ..Default::default()
    };
    let now = botgate::clock::Clock::now_secs(&*node.clock);
    botgate::identity::dev_issuer::sign(&key, "botgate-dev", "botgate", &req, now)
}

/// Two nodes assigning seats at once, each from its own snapshot: exactly the seats bought are
/// taken (the store counts them atomically with each claim), the rest get 409 `NoSeatsLeft`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_assigning_at_once_never_oversell_seats() {
    let redis = RedisServer::start();
    let url = redis.url();
    let nodes = [Arc::new(TestServer::with(node(&url)).await), Arc::new(TestServer::with(node(&url)).await)];
    let admin = Arc::new(contoso_token(&nodes[0], "root", true));
    // The default tenant bought 10 seats and `alice` holds one: 9 are free.
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let (n, admin) = (nodes[i % 2].clone(), admin.clone());
            tokio::spawn(async move {
                let res = n
                    .http
                    .put(n.url(&format!("/api/v1/admin/licenses/users/u{i}")))
                    .bearer_auth(&*admin)
                    .send()
                    .await
                    .unwrap();
                match res.status().as_u16() {
                    200 => true,
                    409 => {
                        assert_error(res, 409, "NoSeatsLeft").await;
                        false
                    }
                    s => panic!("unexpected {s}: {}", res.text().await.unwrap()),
                }
            })
        })
        .collect();
    let mut assigned = 0;
    for t in tasks {
        assigned += u32::from(t.await.unwrap());
    }
    assert_eq!(assigned, 9);
    assert_eq!(redis.cli(&["HLEN", "bg:{contoso}:seats"]), "10");
}

/// Two nodes creating the same bot id at once: exactly one create succeeds, the rest get 409
/// `BotExists` (the store checks the id atomically with the write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_creating_one_bot_id_at_once_create_it_once() {
    let redis = RedisServer::start();
    let url = redis.url();
    let nodes = [Arc::new(TestServer::with(node(&url)).await), Arc::new(TestServer::with(node(&url)).await)];
    let alice = Arc::new(contoso_token(&nodes[0], "alice", false));
    let def = serde_json::json!({"id": "dup", "name": "Dup", "kind": "builtin", "topics": [
        {"name": "Fallback", "kind": "system", "system": "fallback", "replies": ["Sorry?"]}]});
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let (n, alice, def) = (nodes[i % 2].clone(), alice.clone(), def.clone());
            tokio::spawn(async move {
                let res =
                    n.http.post(n.url("/api/v1/bots")).bearer_auth(&*alice).json(&def).send().await.unwrap();
                match res.status().as_u16() {
                    201 => true,
                    409 => {
                        assert_error(res, 409, "BotExists").await;
                        false
                    }
                    s => panic!("unexpected {s}: {}", res.text().await.unwrap()),
                }
            })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        created += u32::from(t.await.unwrap());
    }
    assert_eq!(created, 1);
    assert_eq!(redis.cli(&["HLEN", "bg:{contoso}:bots"]), "1");
}

/// The operator creating one tenant on two nodes at once creates it once (the store decides),
/// and its purchase recorded on one node is the other node's capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_creating_one_tenant_at_once_create_it_once() {
    let redis = RedisServer::start();
    let url = redis.url();
    let nodes = [Arc::new(TestServer::with(node(&url)).await), Arc::new(TestServer::with(node(&url)).await)];
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let n = nodes[i % 2].clone();
            tokio::spawn(async move {
                let res = n
                    .http
                    .post(n.url("/api/v1/operator/tenants"))
                    .bearer_auth(OPERATOR_KEY)
                    .json(&serde_json::json!({"id": "tailspin"}))
                    .send()
                    .await
                    .unwrap();
                match res.status().as_u16() {
                    201 => true,
                    409 => {
                        assert_error(res, 409, "TenantExists").await;
                        false
                    }
                    s => panic!("unexpected {s}: {}", res.text().await.unwrap()),
                }
            })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        created += u32::from(t.await.unwrap());
    }
    assert_eq!(created, 1);
    let res = nodes[0]
        .http
        .post(nodes[0].url("/api/v1/operator/tenants/tailspin/subscriptions"))
        .bearer_auth(OPERATOR_KEY)
        .json(&serde_json::json!({"kind": "tenant_license"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let b = &nodes[1];
    let mut capacity = None;
    for _ in 0..100 {
        let res = b
            .http
            .get(b.url("/api/v1/operator/tenants/tailspin"))
            .bearer_auth(OPERATOR_KEY)
            .send()
            .await
            .unwrap();
        let v: serde_json::Value = res.json().await.unwrap();
        capacity = v["capacity"].as_u64();
        if capacity == Some(150) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(capacity, Some(150), "the purchase reached the other node within a second");
}

/// A bot deleted and created again under its id, seen by another node in one reload (both
/// changes at once), is the new bot there: that node serves the new bot's tokens and refuses
/// the old bot's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_recreated_elsewhere_is_the_new_bot_on_this_node() {
    use botgate::channel::token::{Claims, TokenSigner};
    use botgate::store::control::{BotRecord, Mutation};
    let redis = RedisServer::start();
    let url = redis.url();
    let (a, b) = (TestServer::with(node(&url)).await, TestServer::with(node(&url)).await);
    let alice = contoso_token(&a, "alice", false);
    let now = botgate::clock::Clock::now_secs(&*a.clock);
    let def = serde_json::json!({"id": "x", "name": "X", "kind": "builtin", "topics": [
        {"name": "Fallback", "kind": "system", "system": "fallback", "replies": ["Sorry?"]}]});
    let res = a.http.post(a.url("/api/v1/bots")).bearer_auth(&alice).json(&def).send().await.unwrap();
    assert_eq!(res.status(), 201);
    let res = a.http.post(a.url("/api/v1/bots/x/publish")).bearer_auth(&alice).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let (old, _) = a.open_token("x").await;
    let start_on_b = |token: String| {
        let b = &b;
        async move { b.http.post(b.url("/v3/directline/conversations")).bearer_auth(token).send().await.unwrap() }
    };
    // Generous waits: the reload is usually milliseconds, but CI machines are shared.
    let mut last = 0;
    for _ in 0..500 {
        last = start_on_b(old.clone()).await.status().as_u16();
        if last == 201 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(last, 201, "node B serves the bot");
    // `x` deleted and created again, in one write: another instance under the same id.
    let stored = redis.cli(&["HGET", "bg:{contoso}:bots", "x"]);
    let record: serde_json::Value = serde_json::from_str(&stored).unwrap();
    let mut doc: serde_json::Value = serde_json::from_str(record["json"].as_str().unwrap()).unwrap();
    doc["instance"] = "second".into();
    let rec = BotRecord { id: "x".into(), tenant: "contoso".into(), json: doc.to_string() };
    a.state().store().apply(&[Mutation::DeleteBot { id: "x".into() }, Mutation::PutBot(rec)], &[]).unwrap();
    // A token of the new instance, signed with the nodes' shared channel key.
    let channel_key = a.state().store().shared_key(botgate::state::CHANNEL_KEY, &[0; 32]).unwrap();
    let claims = Claims {
        bot: "x".into(),
        conversation: format!("{}.fresh", b.state().node_id()),
        user: None,
        exp: now + 600,
        slot: 0,
        generation: 0,
        instance: "second".into(),
        test_chat: false,
        until: 0,
        origins: Vec::new(),
    };
    let new = TokenSigner::new(&channel_key).sign(&claims);
    for _ in 0..500 {
        last = start_on_b(new.clone()).await.status().as_u16();
        if last == 201 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(last, 201, "node B serves the new bot's tokens");
    assert_error(start_on_b(old).await, 403, "BotNotFound").await;
}

/// Requests for made-up conversations of made-up nodes, without a credential for them, are
/// answered by the node they reached: no Redis lookup of the owner, no cache entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_asking_for_made_up_owners_cost_no_lookup_and_no_memory() {
    let redis = RedisServer::start();
    let url = redis.url();
    let a = TestServer::with(node(&url)).await;
    let (token, _) = a.open_token("helpdesk").await;
    let gets = |redis: &RedisServer| -> u64 {
        let stats = redis.cli(&["INFO", "commandstats"]);
        stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_get:calls="))
            .map_or(0, |r| r.split(',').next().unwrap().parse().unwrap())
    };
    // The node's own start-up reload (its seed's change message) reads the tenant key with a
    // GET too: count from once the node is quiet.
    let mut before = gets(&redis);
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let now = gets(&redis);
        if now == before {
            break;
        }
        before = now;
    }
    for i in 0..200 {
        let path = format!("/v3/directline/conversations/n{i}.abc/activities");
        let res = a.http.get(a.url(&path)).send().await.unwrap();
        assert_error(res, 401, "MissingAuthorization").await;
        // A valid token, but for another conversation.
        let res = a.http.get(a.url(&path)).bearer_auth(&token).send().await.unwrap();
        assert_eq!(res.status(), 403);
        // A file URL on a made-up owner with a made-up key.
        let file = format!("/v3/directline/attachments/n{i}.abc/{}", "B".repeat(38));
        assert_error(a.http.get(a.url(&file)).send().await.unwrap(), 404, "NotFound").await;
    }
    assert_eq!(gets(&redis), before, "no owner lookups");
    assert_eq!(a.state().cluster().unwrap().cached_owners(), 0);
}

/// A TCP proxy to Redis that can freeze the connections it already carries: they stay open and
/// forward nothing more, as a half-open socket does after a network fault. New connections flow.
struct FreezingProxy {
    addr: std::net::SocketAddr,
    opened: Arc<std::sync::atomic::AtomicU64>,
    frozen_up_to: Arc<std::sync::atomic::AtomicU64>,
}

impl FreezingProxy {
    async fn start(redis_port: u16) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let opened = Arc::new(AtomicU64::new(0));
        let frozen_up_to = Arc::new(AtomicU64::new(0));
        let (op, fz) = (opened.clone(), frozen_up_to.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let generation = op.fetch_add(1, Ordering::SeqCst) + 1;
                let fz = fz.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let pipe = |mut r: tokio::net::tcp::OwnedReadHalf,
                                mut w: tokio::net::tcp::OwnedWriteHalf| {
                        let fz = fz.clone();
                        async move {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let mut buf = [0u8; 16384];
                            loop {
                                let Ok(k) = r.read(&mut buf).await else { return };
                                if k == 0 {
                                    return;
                                }
                                if generation <= fz.load(Ordering::SeqCst) {
                                    // Frozen: hold both halves open, forward nothing, forever.
                                    let _hold = (r, w);
                                    std::future::pending::<()>().await;
                                    return;
                                }
                                if w.write_all(&buf[..k]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    };
                    tokio::join!(pipe(cr, sw), pipe(sr, cw));
                });
            }
        });
        Self { addr, opened, frozen_up_to }
    }

    /// Freezes every connection opened so far; later ones flow.
    fn freeze(&self) {
        use std::sync::atomic::Ordering;
        self.frozen_up_to.store(self.opened.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

/// A node whose change subscription goes half-open (the socket stays up, nothing arrives) still
/// sees a license removed on another node: the quiet subscription is probed, reconnected and
/// followed by a full reload, within the stated bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_change_subscription_is_probed_and_replaced() {
    let redis = RedisServer::start();
    let url = redis.url();
    let proxy = FreezingProxy::start(redis.port).await;
    let proxied = format!("redis://{}/", proxy.addr);
    let a = TestServer::with(node(&url)).await;
    let b = TestServer::with(|c| {
        node(&proxied)(c);
        c.cluster.change_probe_ms = 300;
    })
    .await;
    let alice = contoso_token(&b, "alice", false);
    let me = |n: &TestServer| n.http.get(n.url("/api/v1/bots")).bearer_auth(alice.clone()).send();
    assert_eq!(me(&b).await.unwrap().status(), 200);
    proxy.freeze();
    let res = a
        .http
        .delete(a.url("/api/v1/admin/licenses/users/alice"))
        .bearer_auth(contoso_token(&a, "root", true))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    assert_error(me(&a).await.unwrap(), 403, "NoUserLicense").await;
    // Bound: a probe (0.3 s quiet + 0.3 s for the PING), then reconnection and a reload, which
    // may first meet a frozen pooled connection (its 2 s read timeout) and retry.
    let started = std::time::Instant::now();
    let mut seen = None;
    while started.elapsed() < std::time::Duration::from_secs(15) {
        if me(&b).await.unwrap().status() == 403 {
            seen = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let seen = seen.expect("node B never saw the license removal over its half-open subscription");
    println!("node B saw the change after {seen:?}");
}

/// Files live on the conversation's owner: an upload through another node is forwarded to it,
/// and the file's URL, asked of a third node, is too; a made-up key is refused where it lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_and_file_urls_reach_the_conversations_owner() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(TestServer::with(node(&url)).await);
    }
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let (token, conv, _) = a.conversation("helpdesk").await;
    let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let res = b
        .http
        .post(b.url(&format!("/v3/directline/conversations/{conv}/upload?userId=dl_user")))
        .bearer_auth(&token)
        .header("content-type", "image/png")
        .header("content-disposition", "attachment; filename=\"p.png\"")
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    let acts = b.poll(&token, &conv, None).await;
    let file_url = acts["activities"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|x| x["attachments"][0]["contentUrl"].as_str())
        .unwrap()
        .to_string();
    // The owner stored it: its URL names the owner, and only the owner holds the bytes.
    assert!(file_url.starts_with(&a.url("/v3/directline/attachments/")), "{file_url}");
    let mut held = Vec::new();
    for n in &nodes {
        held.push(metric(&n.metrics().await, "botgate_upload_bytes_stored").unwrap());
    }
    assert_eq!(held, [100_000, 0, 0]);
    let path = file_url.strip_prefix(&a.base).unwrap();
    let got = c.http.get(c.url(path)).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.headers()["content-type"], "image/png");
    assert_eq!(got.bytes().await.unwrap().as_ref(), &bytes[..]);
    // A made-up key never leaves the node it reached.
    let made_up = format!("/v3/directline/attachments/{conv}/{}", "A".repeat(38));
    assert_error(c.http.get(c.url(&made_up)).send().await.unwrap(), 404, "NotFound").await;
    let billed = a.metrics().await;
    assert_eq!(metric(&billed, r#"botgate_billed_sessions_total{tenant="contoso",bot="helpdesk"}"#), Some(1));
}
