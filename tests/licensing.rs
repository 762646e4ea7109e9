//! Licensing, author identity and the authoring API through the real server: every outcome
//! code, groups, seats, tenant isolation, forged tokens, trials on a moved clock, the audit log,
//! persistence across a restart, bots and secrets, the test chat, and reports equal to metrics.

mod common;

use base64::Engine;
use botgate::clock::Clock;
use botgate::identity::dev_issuer::{self, TokenRequest};
use common::*;
use serde_json::{Value, json};

const DAY: i64 = 86_400;

struct Api<'a> {
    s: &'a TestServer,
    key: Vec<u8>,
}

impl<'a> Api<'a> {
    fn new(s: &'a TestServer) -> Self {
        let key = dev_issuer::load_or_create(&s.dir.path().join("data")).unwrap();
        Self { s, key }
    }

    fn token_with(&self, tenant: &str, user: &str, issuer: &str, audience: &str, now: i64) -> String {
        self.sign(tenant, user, &[], false, issuer, audience, now)
    }

    fn token(&self, tenant: &str, user: &str, groups: &[&str], admin: bool) -> String {
        self.sign(tenant, user, groups, admin, "botgate-dev", "botgate", self.s.clock.now_secs())
    }

    #[allow(clippy::too_many_arguments)]
    fn sign(
        &self,
        tenant: &str,
        user: &str,
        groups: &[&str],
        admin: bool,
        issuer: &str,
        audience: &str,
        now: i64,
    ) -> String {
        let req = TokenRequest {
            tenant: tenant.into(),
            user: user.into(),
            name: None,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            admin,
            operator: false,
            ttl_secs: 3600,
        };
        dev_issuer::sign(&self.key, issuer, audience, &req, now)
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut rb = self.s.http.request(method, self.s.url(path));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        rb.send().await.unwrap()
    }

    async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.call(reqwest::Method::GET, path, Some(token), None).await
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> reqwest::Response {
        self.call(reqwest::Method::POST, path, Some(token), Some(body)).await
    }

    async fn ok(&self, res: reqwest::Response) -> Value {
        let status = res.status();
        let text = res.text().await.unwrap();
        assert!(status.is_success(), "{status}: {text}");
        if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() }
    }
}

fn builtin_bot(id: &str) -> Value {
    json!({
        "id": id,
        "name": "Test bot",
        "kind": "builtin",
        "topics": [
            {"name": "Fallback", "kind": "system", "system": "fallback", "replies": ["?"]},
            {"name": "Order", "kind": "user", "triggers": ["order"], "replies": ["Your order is on its way."]},
        ],
    })
}

#[tokio::test]
async fn authentication_outcomes() {
    let s = TestServer::start().await;
    let api = Api::new(&s);
    assert_error(api.call(reqwest::Method::GET, "/api/v1/bots", None, None).await, 401, "MissingToken").await;
    assert_error(api.get("/api/v1/bots", "not-a-jwt").await, 401, "InvalidToken").await;
    let basic =
        s.http.get(s.url("/api/v1/bots")).header("Authorization", "Basic YWxpY2U6eA==").send().await.unwrap();
    assert_error(basic, 401, "MalformedAuthorization").await;
    let now = s.clock.now_secs();
    let forged = {
        let good = api.token("contoso", "alice", &[], false);
        let (head, sig) = good.rsplit_once('.').unwrap();
        format!("{head}.{}", sig.chars().rev().collect::<String>())
    };
    assert_error(api.get("/api/v1/bots", &forged).await, 401, "InvalidToken").await;
    let other_key = dev_issuer::sign(
        b"some other key",
        "botgate-dev",
        "botgate",
        &TokenRequest { tenant: "contoso".into(), user: "alice".into(), ttl_secs: 60, ..Default::default() },
        now,
    );
    assert_error(api.get("/api/v1/bots", &other_key).await, 401, "InvalidToken").await;
    let wrong_iss = api.token_with("contoso", "alice", "https://evil.example", "botgate", now);
    assert_error(api.get("/api/v1/bots", &wrong_iss).await, 401, "InvalidToken").await;
    let wrong_aud = api.token_with("contoso", "alice", "botgate-dev", "other-app", now);
    assert_error(api.get("/api/v1/bots", &wrong_aud).await, 401, "InvalidToken").await;
    let not_yet = api.token_with("contoso", "alice", "botgate-dev", "botgate", now + 600);
    assert_error(api.get("/api/v1/bots", &not_yet).await, 401, "InvalidToken").await;
    let expired = api.token_with("contoso", "alice", "botgate-dev", "botgate", now - 2 * 3600);
    assert_error(api.get("/api/v1/bots", &expired).await, 401, "TokenExpired").await;
    // alg: none, with the right claims and no signature.
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(
            json!({"iss": "botgate-dev", "aud": "botgate", "tid": "contoso", "oid": "alice", "exp": now + 600})
        )
    );
    assert_error(api.get("/api/v1/bots", &none).await, 401, "InvalidToken").await;
    // HS512 is not an accepted algorithm even with the right key.
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &json!({"iss": "botgate-dev", "aud": "botgate", "tid": "contoso", "oid": "alice", "exp": now + 600}),
        &jsonwebtoken::EncodingKey::from_secret(&api.key),
    )
    .unwrap();
    assert_error(api.get("/api/v1/bots", &hs512).await, 401, "InvalidToken").await;
    // The same token, valid, works; and a cached token still expires on the clock.
    let alice = api.token("contoso", "alice", &[], false);
    api.ok(api.get("/api/v1/bots", &alice).await).await;
    s.clock.advance_secs(3600 + 31);
    assert_error(api.get("/api/v1/bots", &alice).await, 401, "TokenExpired").await;
}

#[tokio::test]
async fn license_outcomes_groups_and_seats() {
    let s = TestServer::with(|c| {
        c.tenants[0].subscriptions[1].quantity = 2; // two seats: alice holds one
        c.tenants.push(
            toml::from_str(
                "id = \"fabrikam\"\nsubscriptions = [{ kind = \"user_licenses\", quantity = 5 }]\n",
            )
            .unwrap(),
        );
    })
    .await;
    let api = Api::new(&s);
    let alice = api.token("contoso", "alice", &["helpdesk-authors"], false);
    let me = api.ok(api.get("/api/v1/me", &alice).await).await;
    assert_eq!(me["licensed"], true);
    assert_eq!(me["license"]["via"], "direct");

    let bob = api.token("contoso", "bob", &["nested-group"], false);
    assert_error(api.get("/api/v1/bots", &bob).await, 403, "NoUserLicense").await;
    let me = api.ok(api.get("/api/v1/me", &bob).await).await;
    assert_eq!(me["reason"]["code"], "NoUserLicense");

    let nobody = api.token("fabrikam", "erin", &[], false);
    assert_error(api.get("/api/v1/bots", &nobody).await, 403, "NoUserLicense").await;
    let admin_f = api.token("fabrikam", "frank", &[], true);
    api.ok(api.call(reqwest::Method::PUT, "/api/v1/admin/licenses/users/erin", Some(&admin_f), None).await)
        .await;
    assert_error(api.get("/api/v1/bots", &nobody).await, 403, "NoTenantLicense").await;

    // A member of a licensed group takes the second seat when first seen.
    let carol = api.token("contoso", "carol", &["helpdesk-authors"], false);
    let me = api.ok(api.get("/api/v1/me", &carol).await).await;
    assert_eq!(me["license"], json!({"via": "group", "group": "helpdesk-authors"}));
    // A third group member finds no seat.
    let dave = api.token("contoso", "dave", &["helpdesk-authors"], false);
    assert_error(api.get("/api/v1/bots", &dave).await, 409, "NoSeatsLeft").await;
    // Alice, licensed directly and through the group, holds one seat.
    let admin = api.token("contoso", "root", &[], true);
    let lic = api.ok(api.get("/api/v1/admin/licenses", &admin).await).await;
    assert_eq!(lic["seats"], json!({"bought": 2, "used": 2, "free": 0}));
    assert_error(
        api.call(reqwest::Method::PUT, "/api/v1/admin/licenses/users/bob", Some(&admin), None).await,
        409,
        "NoSeatsLeft",
    )
    .await;
    // Admins need no user license, but non-admins cannot use the admin API.
    assert_error(api.get("/api/v1/admin/licenses", &alice).await, 403, "NotTenantAdmin").await;
    // The operator sells a seat, which lets bob in.
    let res = api
        .post(
            "/api/v1/operator/tenants/contoso/subscriptions",
            OPERATOR_KEY,
            json!({"kind": "user_licenses", "quantity": 1}),
        )
        .await;
    assert_eq!(res.status(), 201);
    api.ok(api.call(reqwest::Method::PUT, "/api/v1/admin/licenses/users/bob", Some(&admin), None).await)
        .await;
    api.ok(api.get("/api/v1/bots", &bob).await).await;
}

#[tokio::test]
async fn tenant_isolation_both_ways() {
    let s = TestServer::with(|c| {
        let mut f = c.tenants[0].clone();
        f.id = "fabrikam".into();
        f.licensed_users = vec!["fiona".into()];
        f.licensed_groups = vec![];
        c.tenants.push(f);
    })
    .await;
    let api = Api::new(&s);
    let alice = api.token("contoso", "alice", &[], true);
    let fiona = api.token("fabrikam", "fiona", &[], true);
    let res = api.post("/api/v1/bots", &fiona, builtin_bot("fab-bot")).await;
    assert_eq!(res.status(), 201);
    for (token, other) in [(&alice, "fab-bot"), (&fiona, "helpdesk")] {
        for (method, path) in [
            ("GET", format!("/api/v1/bots/{other}")),
            ("PATCH", format!("/api/v1/bots/{other}")),
            ("DELETE", format!("/api/v1/bots/{other}")),
            ("POST", format!("/api/v1/bots/{other}/publish")),
            ("POST", format!("/api/v1/bots/{other}/unpublish")),
            ("GET", format!("/api/v1/bots/{other}/secrets")),
            ("POST", format!("/api/v1/bots/{other}/secrets/1/regenerate")),
            ("POST", format!("/api/v1/bots/{other}/testchat")),
            ("GET", format!("/api/v1/bots/{other}/analytics")),
        ] {
            let body = (method == "PATCH").then(|| json!({"name": "x"}));
            let res = api.call(method.parse().unwrap(), &path, Some(token), body).await;
            assert_error(res, 404, "BotNotFound").await;
        }
        let list = api.ok(api.get("/api/v1/bots", token).await).await;
        assert!(list["bots"].as_array().unwrap().iter().all(|b| b["id"] != other));
    }
    // Admin reports are per tenant.
    let usage = api.ok(api.get("/api/v1/admin/usage", &fiona).await).await;
    assert_eq!(usage["tenant"], "fabrikam");
    assert!(usage["bots"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn trials_start_extend_once_and_expire_on_the_clock_with_a_grace_for_published_bots() {
    let s = TestServer::start().await;
    let api = Api::new(&s);
    let bob = api.token("tailspin", "bob", &[], false);
    // A tenant the gateway does not know gets no trial: the operator creates tenants.
    assert_error(api.post("/api/v1/trial", &bob, json!({})).await, 403, "UnknownTenant").await;
    assert_error(api.get("/api/v1/bots", &bob).await, 403, "NoTenantLicense").await;
    api.ok(api.post("/api/v1/operator/tenants", OPERATOR_KEY, json!({"id": "tailspin"})).await).await;
    assert_error(api.get("/api/v1/bots", &bob).await, 403, "NoUserLicense").await;
    let res = api.post("/api/v1/trial", &bob, json!({})).await;
    assert_eq!(res.status(), 201);
    let trial: Value = res.json().await.unwrap();
    assert_eq!(trial["expires"], "2027-01-27T10:00:00.000Z", "60 days");
    let me = api.ok(api.get("/api/v1/me", &bob).await).await;
    assert_eq!(me["license"]["via"], "trial");
    assert_error(api.post("/api/v1/trial", &bob, json!({})).await, 409, "TrialExists").await;

    // The trial user's bot serves, drawing from the trial capacity.
    api.ok(api.post("/api/v1/bots", &bob, builtin_bot("trial-bot")).await).await;
    api.ok(api.post("/api/v1/bots/trial-bot/publish", &bob, json!({})).await).await;
    let (t, c, _) = s.conversation("trial-bot").await;
    s.say_ok(&t, &c, "where is my order").await;
    let m = s.metrics().await;
    assert_eq!(metric(&m, r#"botgate_tenant_capacity_sessions{tenant="tailspin"}"#), Some(1000));
    assert_eq!(metric(&m, r#"botgate_billed_sessions_total{tenant="tailspin",bot="trial-bot"}"#), Some(1));

    s.clock.advance_secs(60 * DAY);
    let bob = api.token("tailspin", "bob", &[], false);
    assert_error(api.get("/api/v1/bots", &bob).await, 403, "TrialExpired").await;
    assert_error(api.post("/api/v1/trial", &bob, json!({})).await, 409, "TrialExists").await;
    let ext = api.ok(api.post("/api/v1/trial/extend", &bob, json!({})).await).await;
    assert_eq!(ext["extended"], true);
    api.ok(api.get("/api/v1/bots", &bob).await).await;
    assert_error(api.post("/api/v1/trial/extend", &bob, json!({})).await, 409, "TrialAlreadyExtended").await;

    s.clock.advance_secs(30 * DAY);
    let bob = api.token("tailspin", "bob", &[], false);
    assert_error(api.get("/api/v1/bots", &bob).await, 403, "TrialExpired").await;
    // Published bots keep serving bot users for the grace period, then stop.
    s.open_token("trial-bot").await;
    s.clock.advance_secs(89 * DAY);
    s.open_token("trial-bot").await;
    s.clock.advance_secs(DAY);
    let res = s.http.get(s.url("/api/v1/bots/trial-bot/directline/token")).send().await.unwrap();
    assert_error(res, 403, "BotTrialEnded").await;
}

#[tokio::test]
async fn self_service_signup_can_be_switched_off() {
    let s = TestServer::start().await;
    let api = Api::new(&s);
    let admin = api.token("contoso", "root", &[], true);
    let v = api
        .ok(api
            .call(
                reqwest::Method::PATCH,
                "/api/v1/admin/settings",
                Some(&admin),
                Some(json!({"allow_ad_hoc_subscriptions": false})),
            )
            .await)
        .await;
    assert_eq!(v["allow_ad_hoc_subscriptions"], false);
    let bob = api.token("contoso", "bob", &[], false);
    assert_error(api.post("/api/v1/trial", &bob, json!({})).await, 403, "SelfServiceSignupDisabled").await;
    let res = api
        .call(reqwest::Method::PATCH, "/api/v1/admin/settings", Some(&admin), Some(json!({"bogus": 1})))
        .await;
    assert_error(res, 400, "BadRequest").await;
}

#[tokio::test]
async fn the_audit_log_holds_exactly_the_changes_and_they_survive_a_restart() {
    let s = TestServer::start().await;
    let api = Api::new(&s);
    let admin = api.token("contoso", "root", &[], true);
    let seeded = api.ok(api.get("/api/v1/admin/audit", &admin).await).await;
    let seeded = seeded["entries"].as_array().unwrap().clone();
    let actions: Vec<&str> = seeded.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        [
            "tenant.create",
            "subscription.add",
            "subscription.add",
            "license.assign_user",
            "license.assign_group"
        ]
    );
    assert!(seeded.iter().all(|e| e["actor"] == "config"));

    api.ok(api
        .post(
            "/api/v1/operator/tenants/contoso/subscriptions",
            OPERATOR_KEY,
            json!({"kind": "capacity_addon", "quantity": 2, "start": "2026-11-01"}),
        )
        .await)
        .await;
    api.ok(api.call(reqwest::Method::PUT, "/api/v1/admin/licenses/users/bob", Some(&admin), None).await)
        .await;
    api.ok(api.call(reqwest::Method::PUT, "/api/v1/admin/licenses/users/bob", Some(&admin), None).await)
        .await; // no change, no entry
    api.ok(api.call(reqwest::Method::PUT, "/api/v1/admin/licenses/groups/g2", Some(&admin), None).await)
        .await;
    let res = api.call(reqwest::Method::DELETE, "/api/v1/admin/licenses/groups/g2", Some(&admin), None).await;
    assert_eq!(res.status(), 204);
    assert_error(
        api.call(reqwest::Method::DELETE, "/api/v1/admin/licenses/groups/g2", Some(&admin), None).await,
        404,
        "NotFound",
    )
    .await;
    api.ok(api
        .call(
            reqwest::Method::PATCH,
            "/api/v1/admin/settings",
            Some(&admin),
            Some(json!({"capacity_policy": "allow_overage"})),
        )
        .await)
        .await;
    let log = api
        .ok(api.get(&format!("/api/v1/admin/audit?after={}", seeded.last().unwrap()["seq"]), &admin).await)
        .await;
    let log = log["entries"].as_array().unwrap();
    let actions: Vec<&str> = log.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        [
            "subscription.add",
            "license.assign_user",
            "license.assign_group",
            "license.remove_group",
            "settings.update"
        ]
    );
    let operator = format!("operator:key-{}", &botgate::licensing::operator::key_hash(OPERATOR_KEY)[..8]);
    assert_eq!(log[0]["actor"], operator.as_str(), "the operator recorded the purchase");
    assert!(log[1..].iter().all(|e| e["actor"] == "root"));
    assert!(log.iter().all(|e| e["tenant"] == "contoso"));
    assert!(
        log[4]["before"]["capacity_policy"] == "reject"
            && log[4]["after"]["capacity_policy"] == "allow_overage"
    );
    let m = s.metrics().await;
    assert_eq!(
        metric(&m, r#"botgate_tenant_capacity_sessions{tenant="contoso"}"#),
        Some(4000),
        "license + 2 add-ons"
    );

    let (dir, clock) = s.stop().await;
    let s = TestServer::in_dir(dir, clock, |_| {}).await;
    let api = Api::new(&s);
    let bob = api.token("contoso", "bob", &[], false);
    assert_eq!(api.ok(api.get("/api/v1/me", &bob).await).await["license"]["via"], "direct");
    let settings = api.ok(api.get("/api/v1/admin/settings", &admin).await).await;
    assert_eq!(settings["capacity_policy"], "allow_overage");
    let m = s.metrics().await;
    assert_eq!(metric(&m, r#"botgate_tenant_capacity_sessions{tenant="contoso"}"#), Some(4000));
}

#[tokio::test]
async fn authors_create_test_publish_and_rotate_secrets_and_reports_equal_metrics() {
    let s = TestServer::start().await;
    let api = Api::new(&s);
    let alice = api.token("contoso", "alice", &[], false);
    let bad = api
        .post("/api/v1/bots", &alice, json!({"id": "b", "name": "B", "kind": "builtin", "topics": []}))
        .await;
    assert_error(bad, 400, "BadRequest").await;
    let created = api.post("/api/v1/bots", &alice, builtin_bot("orders")).await;
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.unwrap();
    assert_eq!(created["bot"]["published"], false);
    let secrets: Vec<String> =
        created["secrets"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
    assert_error(api.post("/api/v1/bots", &alice, builtin_bot("orders")).await, 409, "BotExists").await;

    // Not published: bot users are refused, the author's test chat works and is never billed.
    let res = s.http.get(s.url("/api/v1/bots/orders/directline/token")).send().await.unwrap();
    assert_error(res, 403, "BotNotPublished").await;
    let tc = api.ok(api.post("/api/v1/bots/orders/testchat", &alice, json!({})).await).await;
    let (tt, tconv) = (tc["token"].as_str().unwrap(), tc["conversationId"].as_str().unwrap());
    let res = s.http.post(s.url("/v3/directline/conversations")).bearer_auth(tt).send().await.unwrap();
    assert_eq!(res.status(), 201);
    s.say_ok(tt, tconv, "my order").await;
    assert_eq!(
        metric(&s.metrics().await, r#"botgate_billed_sessions_total{tenant="contoso",bot="orders"}"#),
        Some(0)
    );

    api.ok(api.post("/api/v1/bots/orders/publish", &alice, json!({})).await).await;
    for _ in 0..3 {
        let (t, c, _) = s.conversation("orders").await;
        s.say_ok(&t, &c, "my order").await;
        s.say_ok(&t, &c, "hello").await;
    }
    // Secrets: regenerating slot 1 disconnects tokens made from it; slot 2 keeps serving.
    let gen1 = |secret: &str| {
        s.http.post(s.url("/v3/directline/tokens/generate")).bearer_auth(secret.to_string()).send()
    };
    let t1: Value = gen1(&secrets[0]).await.unwrap().json().await.unwrap();
    let new1 = api.ok(api.post("/api/v1/bots/orders/secrets/1/regenerate", &alice, json!({})).await).await;
    assert_error(gen1(&secrets[0]).await.unwrap(), 403, "InvalidSecret").await;
    let res = s
        .http
        .post(s.url("/v3/directline/conversations"))
        .bearer_auth(t1["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_error(res, 403, "InvalidToken").await;
    assert_eq!(gen1(&secrets[1]).await.unwrap().status(), 200);
    assert_eq!(gen1(new1["secret"].as_str().unwrap()).await.unwrap().status(), 200);
    let listed = api.ok(api.get("/api/v1/bots/orders/secrets", &alice).await).await;
    assert_eq!(listed["secrets"][0]["generation"], 2);
    assert!(!listed.to_string().contains(new1["secret"].as_str().unwrap()), "secrets are never listed");

    // Secured access through PATCH.
    let patched = api
        .ok(api
            .call(
                reqwest::Method::PATCH,
                "/api/v1/bots/orders",
                Some(&alice),
                Some(json!({"secured_access": true, "name": "Orders"})),
            )
            .await)
        .await;
    assert_eq!((patched["secured_access"].as_bool(), patched["name"].as_str()), (Some(true), Some("Orders")));
    let res = s.http.get(s.url("/api/v1/bots/orders/directline/token")).send().await.unwrap();
    assert_error(res, 403, "SecuredAccessRequired").await;

    // Reports equal the metrics.
    let m = s.metrics().await;
    let billed = metric(&m, r#"botgate_billed_sessions_total{tenant="contoso",bot="orders"}"#).unwrap();
    let turns = metric(&m, r#"botgate_turns_total{tenant="contoso",bot="orders"}"#).unwrap();
    assert_eq!((billed, turns), (3, 6));
    let a =
        api.ok(api.get("/api/v1/bots/orders/analytics?from=2026-11-01&to=2026-11-30", &alice).await).await;
    assert_eq!(
        a["totals"],
        json!({"billed_sessions": 3, "overage_sessions": 0, "turns": 6, "flow_runs": 0,
               "flow_runs_by_outcome": {"failed": 0, "ok": 0, "refused": 0, "timeout": 0}})
    );
    assert_eq!(a["days"][0]["day"], "2026-11-28");
    let empty = api.ok(api.get("/api/v1/bots/orders/analytics?from=2026-12-01", &alice).await).await;
    assert_eq!(empty["totals"]["billed_sessions"], 0);
    assert_error(api.get("/api/v1/bots/orders/analytics?from=yesterday", &alice).await, 400, "BadRequest")
        .await;
    let admin = api.token("contoso", "root", &[], true);
    let u = api.ok(api.get("/api/v1/admin/usage?month=2026-11", &admin).await).await;
    assert_eq!(u["used"].as_u64(), metric(&m, r#"botgate_tenant_used_sessions{tenant="contoso"}"#));
    assert_eq!(u["capacity"], 2000);
    assert_eq!(u["remaining"].as_u64(), metric(&m, r#"botgate_tenant_remaining_sessions{tenant="contoso"}"#));
    assert_eq!(
        u["bots"],
        json!([{"bot": "orders", "billed_sessions": 3, "overage_sessions": 0, "turns": 6, "flow_runs": 0}])
    );
    assert_error(api.get("/api/v1/admin/usage?month=2026-13", &admin).await, 400, "BadRequest").await;

    // Deleting stops serving at once.
    assert_eq!(
        api.call(reqwest::Method::DELETE, "/api/v1/bots/orders", Some(&alice), None).await.status(),
        204
    );
    let res = s
        .http
        .post(s.url("/v3/directline/tokens/generate"))
        .bearer_auth(secrets[1].clone())
        .send()
        .await
        .unwrap();
    assert_error(res, 403, "InvalidSecret").await;
}

#[test]
fn the_token_command_prints_a_token_the_server_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(binary())
        .args([
            "token",
            "--tenant",
            "contoso",
            "--user",
            "alice",
            "--group",
            "g1",
            "--admin",
            "--ttl",
            "2h",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let key = dev_issuer::load_or_create(dir.path()).unwrap();
    let clock = std::sync::Arc::new(botgate::clock::SystemClock);
    let v = botgate::identity::jwt::Verifier::new(&Default::default(), Some(&key), clock).unwrap();
    let id = v.verify(&token).unwrap();
    assert_eq!((id.tenant.as_str(), id.user.as_str(), id.is_admin()), ("contoso", "alice", true));
    assert_eq!(id.groups, ["g1"]);
    let out = std::process::Command::new(binary())
        .args(["token", "--tenant", "t", "--user", "u", "--ttl", "1y"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

/// RS256 and ES256 tokens verified with keys from a JWKS file; HS256 is then refused, so a token
/// cannot pick a symmetric algorithm and use a public key as its secret.
#[tokio::test]
async fn rs256_and_es256_with_a_jwks_file_and_no_algorithm_confusion() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let s = TestServer::with(|c| {
        c.identity.algorithms = vec!["RS256".into(), "ES256".into()];
        c.identity.jwks_file = Some(fixtures.join("jwks.json"));
        c.identity.issuer = "https://login.example/contoso".into();
    })
    .await;
    let now = s.clock.now_secs();
    let claims = json!({"iss": "https://login.example/contoso", "aud": "botgate", "tid": "contoso", "oid": "alice", "exp": now + 600});
    let sign = |alg, kid: &str, key: jsonwebtoken::EncodingKey| {
        let mut h = jsonwebtoken::Header::new(alg);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, &claims, &key).unwrap()
    };
    let rsa = jsonwebtoken::EncodingKey::from_rsa_der(&std::fs::read(fixtures.join("rsa1.der")).unwrap());
    let ec = jsonwebtoken::EncodingKey::from_ec_der(&std::fs::read(fixtures.join("ec1.der")).unwrap());
    let rs256 = sign(jsonwebtoken::Algorithm::RS256, "rsa1", rsa);
    let es256 = sign(jsonwebtoken::Algorithm::ES256, "ec1", ec);
    for t in [&rs256, &es256] {
        let res = s.http.get(s.url("/api/v1/me")).bearer_auth(t).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.json::<Value>().await.unwrap()["license"]["via"], "direct");
    }
    // The RSA public key's text used as an HMAC secret.
    let jwks = std::fs::read(fixtures.join("jwks.json")).unwrap();
    let confused =
        sign(jsonwebtoken::Algorithm::HS256, "rsa1", jsonwebtoken::EncodingKey::from_secret(&jwks));
    let res = s.http.get(s.url("/api/v1/me")).bearer_auth(&confused).send().await.unwrap();
    assert_error(res, 401, "InvalidToken").await;
    // A token signed by the EC key but claiming the RSA key id.
    let swapped = sign(
        jsonwebtoken::Algorithm::ES256,
        "rsa1",
        jsonwebtoken::EncodingKey::from_ec_der(&std::fs::read(fixtures.join("ec1.der")).unwrap()),
    );
    let res = s.http.get(s.url("/api/v1/me")).bearer_auth(&swapped).send().await.unwrap();
    assert_error(res, 401, "InvalidToken").await;
}

/// A test chat is no free channel: its token ends for good after `test_chat_token_ttl_secs`
/// (refreshes cannot move it), it stops refreshing and chatting once the author loses the
/// license, it follows the bot's rate limit, and an author holds a bounded number of them.
#[tokio::test]
async fn test_chats_are_bounded_in_time_license_rate_and_count() {
    let s = TestServer::with(|c| {
        c.channel.test_chat_token_ttl_secs = 3600;
        c.channel.token_ttl_secs = 1800;
        c.channel.max_test_chats_per_author = 3;
        c.metering.rate_limit_per_minute = 5;
    })
    .await;
    let api = Api::new(&s);
    // Fresh author tokens at each use: the test moves the clock past a JWT's hour.
    let alice = || api.token("contoso", "alice", &[], false);
    let admin = || api.token("contoso", "root", &[], true);
    let open = |tc: &Value| {
        let t = tc["token"].as_str().unwrap().to_string();
        let c = tc["conversationId"].as_str().unwrap().to_string();
        (t, c)
    };
    let refresh =
        |token: String| s.http.post(s.url("/v3/directline/tokens/refresh")).bearer_auth(token).send();
    let start = |token: String| s.http.post(s.url("/v3/directline/conversations")).bearer_auth(token).send();

    // Lifetime: refreshes move the expiry forward, never past an hour after the test chat opened.
    let tc = api.ok(api.post("/api/v1/bots/helpdesk/testchat", &alice(), json!({})).await).await;
    assert_eq!(tc["expires_in"], 1800);
    let (t1, c1) = open(&tc);
    assert_eq!(start(t1.clone()).await.unwrap().status(), 201);
    s.clock.advance_secs(1500);
    let r = api.ok(refresh(t1.clone()).await.unwrap()).await;
    assert_eq!(r["expires_in"], 1800);
    s.say_ok(r["token"].as_str().unwrap(), &c1, "still testing").await;
    s.clock.advance_secs(1500); // 3000 s after opening: 600 s left of the hour
    let r = api.ok(refresh(r["token"].as_str().unwrap().to_string()).await.unwrap()).await;
    assert_eq!(r["expires_in"], 600, "capped at the test chat's hour");
    let last = r["token"].as_str().unwrap().to_string();
    s.say_ok(&last, &c1, "hello").await;
    s.clock.advance_secs(600);
    assert_error(refresh(last.clone()).await.unwrap(), 403, "TokenExpired").await;
    assert_error(s.say(&last, &c1, "hello").await, 403, "TokenExpired").await;

    // Rate: test-chat messages draw on the bot's limit (5 a minute here), and bill nothing.
    let tc = api.ok(api.post("/api/v1/bots/helpdesk/testchat", &alice(), json!({})).await).await;
    let (t2, c2) = open(&tc);
    assert_eq!(start(t2.clone()).await.unwrap().status(), 201);
    for i in 0..5 {
        s.say_ok(&t2, &c2, &format!("m{i}")).await;
    }
    assert_error(s.say(&t2, &c2, "one too many").await, 429, "RateLimited").await;
    let (t, c, _) = s.conversation("helpdesk").await;
    assert_error(s.say(&t, &c, "a bot user shares the bot's limit").await, 429, "RateLimited").await;
    assert_eq!(
        metric(&s.metrics().await, r#"botgate_billed_sessions_total{tenant="contoso",bot="helpdesk"}"#),
        Some(0)
    );
    s.clock.advance_secs(60);

    // Count: c1 (its token expired, the conversation not yet idle) and c2 are held; a third
    // starts, the fourth is 429 `TooManyTestChats`.
    let tc = api.ok(api.post("/api/v1/bots/helpdesk/testchat", &alice(), json!({})).await).await;
    let (t3, _) = open(&tc);
    assert_eq!(start(t3).await.unwrap().status(), 201);
    let tc = api.ok(api.post("/api/v1/bots/helpdesk/testchat", &alice(), json!({})).await).await;
    let (t4, _) = open(&tc);
    assert_error(start(t4.clone()).await.unwrap(), 429, "TooManyTestChats").await;
    // Bot users are not affected by an author's cap.
    let (t, c, _) = s.conversation("helpdesk").await;
    s.say_ok(&t, &c, "hello").await;

    // License: once alice's direct license is removed, her test chat neither refreshes nor chats.
    api.ok(api
        .call(reqwest::Method::DELETE, "/api/v1/admin/licenses/users/alice", Some(&admin()), None)
        .await)
        .await;
    assert_error(refresh(t2.clone()).await.unwrap(), 403, "AuthorNotLicensed").await;
    assert_error(s.say(&t2, &c2, "still here?").await, 403, "AuthorNotLicensed").await;
}

/// Report endpoints take a per-caller rate: the limit's worth of requests in a minute are
/// answered, the next is 429 `RateLimited` with `Retry-After`; another caller is unaffected, and
/// the next minute serves again.
#[tokio::test]
async fn reports_are_rate_limited_per_caller() {
    let s = TestServer::with(|c| c.server.report_requests_per_minute = 3).await;
    let api = Api::new(&s);
    let alice = api.token("contoso", "alice", &[], false);
    let admin = api.token("contoso", "root", &[], true);
    for _ in 0..3 {
        api.ok(api.get("/api/v1/bots/helpdesk/analytics", &alice).await).await;
    }
    let res = api.get("/api/v1/bots/helpdesk/analytics", &alice).await;
    assert!(res.headers().get("retry-after").is_some());
    assert_error(res, 429, "RateLimited").await;
    for _ in 0..3 {
        api.ok(api.get("/api/v1/admin/audit", &admin).await).await;
    }
    assert_error(api.get("/api/v1/admin/usage", &admin).await, 429, "RateLimited").await;
    s.clock.advance_secs(60);
    api.ok(api.get("/api/v1/bots/helpdesk/analytics", &alice).await).await;
}

/// A token whose groups did not fit (`_claim_names.groups`, or `hasgroups`) has unknown groups,
/// not none: with only group licensing the author gets 403 `GroupsOverage`; a direct license
/// still works.
#[tokio::test]
async fn a_groups_overage_is_told_apart_from_no_license() {
    let s = TestServer::start().await;
    let api = Api::new(&s);
    let sign = |user: &str, extra: Value| {
        let now = s.clock.now_secs();
        let mut claims =
            json!({"iss": "botgate-dev", "aud": "botgate", "tid": "contoso", "oid": user, "exp": now + 600});
        for (k, v) in extra.as_object().unwrap() {
            claims[k] = v.clone();
        }
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(&api.key),
        )
        .unwrap()
    };
    let overage = json!({"_claim_names": {"groups": "src1"}, "_claim_sources": {"src1": {"endpoint": "https://graph.example/x"}}});
    let bob = sign("bob", overage.clone());
    assert_error(api.get("/api/v1/bots", &bob).await, 403, "GroupsOverage").await;
    assert_error(
        api.get("/api/v1/bots", &sign("bob", json!({"hasgroups": true}))).await,
        403,
        "GroupsOverage",
    )
    .await;
    // Without the overage marker an empty group list is simply no license.
    assert_error(api.get("/api/v1/bots", &sign("bob", json!({}))).await, 403, "NoUserLicense").await;
    // Alice is licensed directly: the overage does not matter.
    api.ok(api.get("/api/v1/bots", &sign("alice", overage.clone())).await).await;
    // Assigned directly, bob gets in with the same kind of token.
    let admin = api.token("contoso", "root", &[], true);
    api.ok(api.call(reqwest::Method::PUT, "/api/v1/admin/licenses/users/bob", Some(&admin), None).await)
        .await;
    api.ok(api.get("/api/v1/bots", &sign("bob", overage)).await).await;
}
