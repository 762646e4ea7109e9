//! The web console (`/console`) in a real browser (Debian's headless Chromium, driven by npm
//! `playwright-core`) against the real server: a tenant admin signs in with the development
//! issuer's one-click sign-in; the chart's data, read back from the page, equals the usage API,
//! which equals a schedule of sessions run on the manual clock; a seat assigned through the page
//! shows in the API; another tenant's admin sees none of the first tenant's data. The embedded
//! chart library is checked to be the npm package pinned in `console/package-lock.json`.

mod common;

use std::path::PathBuf;

use common::*;
use serde_json::{Value, json};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run_script(script: &str, args: &[&str]) {
    let status =
        std::process::Command::new("bash").arg(root().join(script)).args(args).status().expect("bash");
    assert!(status.success(), "{script} {args:?} failed");
}

/// `n` new conversations of `bot`, each beginning one billed session with `text`.
async fn sessions(s: &TestServer, bot: &str, text: &str, n: usize) {
    for _ in 0..n {
        let (token, conv, _) = s.conversation(bot).await;
        s.say_ok(&token, &conv, text).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_admin_reads_usage_and_assigns_a_seat_in_the_console() {
    run_script("tests/node/install.sh", &[]);
    run_script("console/vendor.sh", &["--check"]);
    let s = TestServer::with(|c| c.notifications.poll_ms = 50).await;
    let receiver = common::receiver::Receiver::start();
    let sign = |tenant: &str, user: &str, admin: bool| s.token_of(tenant, user, admin);
    let call = |method: reqwest::Method, path: &str, token: &str, body: Option<Value>| {
        let mut rb = s.http.request(method, s.url(path)).bearer_auth(token);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        rb.send()
    };
    let bot = |id: &str, trigger: &str| {
        json!({"id": id, "name": id, "kind": "builtin", "topics": [
            {"name": "Fallback", "kind": "system", "system": "fallback", "replies": ["?"]},
            {"name": "Ask", "kind": "user", "triggers": [trigger], "replies": ["Done."]}]})
    };
    // Contoso: the configured `helpdesk` and alice's `orders`; fabrikam, made by the operator,
    // with fay's `fab-bot`.
    let alice = sign("contoso", "alice", false);
    assert_eq!(
        call(reqwest::Method::POST, "/api/v1/bots", &alice, Some(bot("orders", "order")))
            .await
            .unwrap()
            .status(),
        201
    );
    assert_eq!(
        call(reqwest::Method::POST, "/api/v1/bots/orders/publish", &alice, None).await.unwrap().status(),
        200
    );
    operator_tenant(&s.http, &s.base, "fabrikam", "2026-11-01", 1).await;
    let res =
        call(reqwest::Method::PUT, "/api/v1/admin/licenses/users/fay", &sign("fabrikam", "root", true), None)
            .await;
    assert_eq!(res.unwrap().status(), 200);
    let fay = sign("fabrikam", "fay", false);
    assert_eq!(
        call(reqwest::Method::POST, "/api/v1/bots", &fay, Some(bot("fab-bot", "invoice")))
            .await
            .unwrap()
            .status(),
        201
    );
    assert_eq!(
        call(reqwest::Method::POST, "/api/v1/bots/fab-bot/publish", &fay, None).await.unwrap().status(),
        200
    );

    // The schedule, from 2026-11-28 (the test clock's first day): per day, helpdesk and orders.
    let schedule: [(&str, usize, usize); 5] = [
        ("2026-11-27", 0, 0),
        ("2026-11-28", 3, 1),
        ("2026-11-29", 2, 2),
        ("2026-11-30", 0, 0),
        ("2026-12-01", 1, 0),
    ];
    for (i, (_, help, orders)) in schedule.iter().enumerate().skip(1) {
        if i > 1 {
            s.clock.advance_secs(86_400);
        }
        sessions(&s, "helpdesk", "my vpn is down", *help).await;
        sessions(&s, "orders", "where is my order", *orders).await;
        if i == 1 {
            sessions(&s, "fab-bot", "my invoice", 2).await;
        }
        // Turns reach the daily rows at the housekeeping flush (every 10 s); before the clock
        // jumps a day, flush as that would have.
        s.state().metering().flush().unwrap();
    }
    let root_token = sign("contoso", "root", true);
    let api: Value = call(
        reqwest::Method::GET,
        "/api/v1/admin/usage/daily?from=2026-11-27&to=2026-12-01",
        &root_token,
        None,
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let series = |v: &Value, bot: &str| -> Vec<u64> {
        let b = v["bots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["bot"] == bot)
            .unwrap_or_else(|| panic!("{bot} in {v}"));
        b["billed_sessions"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect()
    };
    assert_eq!(api["days"], json!(schedule.iter().map(|d| d.0).collect::<Vec<_>>()));
    assert_eq!(series(&api, "helpdesk"), schedule.iter().map(|d| d.1 as u64).collect::<Vec<_>>());
    assert_eq!(series(&api, "orders"), schedule.iter().map(|d| d.2 as u64).collect::<Vec<_>>());
    // The CSV has the same numbers.
    let csv = s
        .http
        .get(s.url("/api/v1/admin/usage/daily?from=2026-11-27&to=2026-12-01"))
        .bearer_auth(&root_token)
        .header("Accept", "text/csv")
        .send()
        .await
        .unwrap();
    assert!(csv.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
    let csv = csv.text().await.unwrap();
    assert!(csv.starts_with("day,bot,billed_sessions,overage_sessions,turns\n"), "{csv}");
    assert!(
        csv.contains("\n2026-11-28,helpdesk,3,0,3\n") && csv.contains("\n2026-11-29,orders,2,0,2\n"),
        "{csv}"
    );

    receiver.control(json!({"now": botgate::clock::Clock::now_secs(&*s.clock)})).await;
    let shot = s.dir.path().join("console.png");
    let out = tokio::process::Command::new("node")
        .arg(root().join("tests/node/console.js"))
        .args(["--gateway", s.url("").trim_end_matches('/'), "--tenant", "contoso", "--user", "root"])
        .args([
            "--from",
            "2026-11-27",
            "--to",
            "2026-12-01",
            "--assign",
            "newbie",
            "--other-tenant",
            "fabrikam",
        ])
        .args(["--author", "alice", "--author-bot", "orders", "--new-tenant", "tailspin"])
        .args(["--webhook-url", &receiver.url])
        .arg("--screenshot")
        .arg(&shot)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|_| panic!("stdout {stdout:?} stderr {}", String::from_utf8_lossy(&out.stderr)));
    assert!(out.status.success() && v["ok"] == true, "{v}\nstderr: {}", String::from_utf8_lossy(&out.stderr));

    // What the page drew is the API's series: raw per bot, stacked in the drawn order.
    let chart = &v["first"]["chart"];
    assert_eq!(chart["days"], api["days"]);
    let drawn: Vec<String> =
        chart["bots"].as_array().unwrap().iter().map(|b| b.as_str().unwrap().into()).collect();
    let mut expected_bots: Vec<String> =
        api["bots"].as_array().unwrap().iter().map(|b| b["bot"].as_str().unwrap().into()).collect();
    expected_bots.reverse();
    assert_eq!(drawn, expected_bots);
    for (i, bot) in drawn.iter().enumerate() {
        let raw: Vec<u64> = chart["raw"][i].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect();
        assert_eq!(raw, series(&api, bot), "{bot}");
        let stacked: Vec<u64> =
            chart["plotted"][i + 1].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect();
        let sum: Vec<u64> =
            (0..raw.len()).map(|d| drawn[i..].iter().map(|b| series(&api, b)[d]).sum()).collect();
        assert_eq!(stacked, sum, "the bar top of {bot}");
    }
    assert_eq!(v["first"]["capacity"]["used"], 1, "December so far: one session");
    assert!(v["first"]["text"].as_str().unwrap().contains("2,000"));

    // The seat assigned through the page is in the API.
    let lic: Value = call(reqwest::Method::GET, "/api/v1/admin/licenses", &root_token, None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(lic["users"].as_array().unwrap().contains(&json!("newbie")), "{lic}");

    // The endpoint added through the page received the test event it sent, signed with the
    // secret it showed; the page's delivery log is the API's.
    let got = receiver.wait_for(1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0]["verified"].clone(), got[0]["body"]["type"].clone()),
        (json!(true), json!("test")),
        "{got:?}"
    );
    let log: Value =
        call(reqwest::Method::GET, "/api/v1/admin/webhooks/deliveries?limit=100", &root_token, None)
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(v["webhooks"]["deliveries"], log["deliveries"]);
    assert_eq!(log["deliveries"][0]["outcome"], "delivered");
    assert!(v["webhooks"]["text"].as_str().unwrap().contains("delivered"));

    // Fabrikam's admin sees fabrikam only.
    let other = &v["other"];
    assert_eq!(other["chart"]["tenant"], "fabrikam");
    assert_eq!(other["chart"]["bots"], json!(["fab-bot"]));
    assert_eq!(
        other["chart"]["raw"][0].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).sum::<u64>(),
        2
    );
    let text = other["text"].as_str().unwrap();
    for foreign in ["contoso", "helpdesk", "orders", "newbie", "alice"] {
        assert!(!text.contains(foreign), "fabrikam's page shows {foreign:?}: {text}");
    }

    // Alice, an author: the bots she may reach, and the page's chart of one is its usage API.
    let author = &v["author"];
    assert_eq!(author["adminShown"], false, "an author who is no admin sees no admin cards");
    let alice = sign("contoso", "alice", false);
    let bots: Value =
        call(reqwest::Method::GET, "/api/v1/bots", &alice, None).await.unwrap().json().await.unwrap();
    let ids: Vec<Value> = bots["bots"].as_array().unwrap().iter().map(|b| b["id"].clone()).collect();
    assert_eq!(author["bots"], json!(ids));
    assert_eq!(author["bots"], json!(["helpdesk", "orders"]));
    let daily: Value = call(reqwest::Method::GET, "/api/v1/bots/orders/usage/daily", &alice, None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(author["chart"]["days"], daily["days"]);
    assert_eq!(author["chart"]["plotted"][1], daily["bots"][0]["billed_sessions"]);
    assert_eq!(author["chart"]["plotted"][2], daily["bots"][0]["turns"]);
    let sessions: u64 =
        daily["bots"][0]["billed_sessions"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).sum();
    assert_eq!(sessions, 3, "orders: 1 + 2 sessions in the last 30 days");

    // The operator: every tenant, and the one created through the page.
    let tenants: Value = s
        .http
        .get(s.url("/api/v1/operator/tenants"))
        .bearer_auth(OPERATOR_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<Value> = tenants["tenants"].as_array().unwrap().iter().map(|t| t["id"].clone()).collect();
    assert_eq!(v["operator"]["tenants"], json!(ids));
    assert_eq!(ids, [json!("contoso"), json!("fabrikam"), json!("tailspin")]);

    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a screenshot was taken");
    if std::env::var_os("BOTGATE_UPDATE_SCREENSHOT").is_some() {
        std::fs::write(root().join("docs/console.png"), &png).unwrap();
    }
}

#[tokio::test]
async fn the_console_page_is_embedded_and_the_dev_sign_in_follows_the_issuer() {
    let s = TestServer::start().await;
    let page = s.http.get(s.url("/console")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-security-policy"].to_str().unwrap().contains("script-src 'self'"));
    assert!(page.text().await.unwrap().contains("/console/uPlot.iife.min.js"));
    let js = s.http.get(s.url("/console/uPlot.iife.min.js")).send().await.unwrap();
    assert_eq!(js.headers()["content-type"], "text/javascript; charset=utf-8");
    assert_error(s.http.get(s.url("/console/../Cargo.toml")).send().await.unwrap(), 404, "NotFound").await;
    assert_error(s.http.get(s.url("/console/nope.js")).send().await.unwrap(), 404, "NotFound").await;
    let cfg: Value = s.http.get(s.url("/console/config.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(cfg["dev_sign_in"], true);
    let res = s
        .http
        .post(s.url("/api/v1/dev/token"))
        .json(&json!({"tenant": "contoso", "user": "root", "admin": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let token = res.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_string();
    let me: Value =
        s.http.get(s.url("/api/v1/me")).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
    assert_eq!((me["tenant"].as_str(), me["tenant_admin"].as_bool()), (Some("contoso"), Some(true)));
    s.stop().await;

    // With an identity provider instead of the development issuer: no dev sign-in.
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, r#"{"keys":[]}"#).unwrap();
    let s = TestServer::with(|c| {
        c.identity.algorithms = vec!["RS256".into()];
        c.identity.jwks_file = Some(jwks.clone());
    })
    .await;
    let cfg: Value = s.http.get(s.url("/console/config.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(cfg["dev_sign_in"], false);
    let res = s
        .http
        .post(s.url("/api/v1/dev/token"))
        .json(&json!({"tenant": "t", "user": "u"}))
        .send()
        .await
        .unwrap();
    assert_error(res, 404, "NotFound").await;
}
