//! Who may do what, through the real server: the platform operator's API and its credentials,
//! tenant admins who cannot buy for themselves or reach an unknown tenant, bot ownership and
//! sharing, and bots of the configuration file being read-only through the API.

mod common;

use botgate::clock::Clock;
use botgate::identity::dev_issuer::{self, TokenRequest};
use common::*;
use reqwest::Method;
use serde_json::{Value, json};

struct Api<'a> {
    s: &'a TestServer,
    key: Vec<u8>,
}

impl<'a> Api<'a> {
    fn new(s: &'a TestServer) -> Self {
        let key = dev_issuer::load_or_create(&s.dir.path().join("data")).unwrap();
        Self { s, key }
    }

    fn token(&self, tenant: &str, user: &str, groups: &[&str], admin: bool, operator: bool) -> String {
        let req = TokenRequest {
            tenant: tenant.into(),
            user: user.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            admin,
            operator,
            ttl_secs: 3600,
            ..TokenRequest::default()
        };
        dev_issuer::sign(&self.key, "botgate-dev", "botgate", &req, self.s.clock.now_secs())
    }

    async fn call(
        &self,
        method: Method,
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

    async fn ok(&self, method: Method, path: &str, token: &str, body: Option<Value>) -> Value {
        let res = self.call(method, path, Some(token), body).await;
        let status = res.status();
        let text = res.text().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {text}");
        if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() }
    }

    async fn err(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
        status: u16,
        code: &str,
    ) {
        assert_error(self.call(method, path, Some(token), body).await, status, code).await;
    }
}

fn bot(id: &str) -> Value {
    json!({"id": id, "name": id, "kind": "builtin", "topics": [
        {"name": "Fallback", "kind": "system", "system": "fallback", "replies": ["?"]},
        {"name": "Order", "kind": "user", "triggers": ["order"], "replies": ["On its way."]}]})
}

fn tenant<'a>(list: &'a Value, id: &str) -> Option<&'a Value> {
    list["tenants"].as_array().unwrap().iter().find(|t| t["id"] == id)
}

#[tokio::test]
async fn operator_credentials_are_checked_and_a_tenant_admin_is_not_the_operator() {
    let s = TestServer::start().await;
    let api = Api::new(&s);
    let path = "/api/v1/operator/tenants";
    assert_error(api.call(Method::GET, path, None, None).await, 401, "MissingToken").await;
    api.err(Method::GET, path, "bgop_wrong", None, 401, "InvalidOperatorKey").await;
    let admin = api.token("contoso", "root", &[], true, false);
    api.err(Method::GET, path, &admin, None, 403, "NotOperator").await;
    let res = api.call(Method::GET, path, None, None).await;
    assert_eq!(res.status(), 401);
    // The embedded default accepts the development issuer's PlatformOperator tokens ...
    let ops = api.token("platform", "ops", &[], false, true);
    assert!(tenant(&api.ok(Method::GET, path, &ops, None).await, "contoso").is_some());
    // ... and the key configured for the tests.
    let list = api.ok(Method::GET, path, OPERATOR_KEY, None).await;
    let contoso = tenant(&list, "contoso").unwrap();
    assert_eq!(contoso["capacity"], 2000);
    assert_eq!(contoso["tenant_licensed"], true);
    assert_eq!(contoso["seats"], json!({"bought": 10, "used": 1}));
    s.stop().await;

    // Without operator.jwt_role, the same JWT is refused; with no credentials at all the API is off.
    let s = TestServer::with(|c| c.operator.jwt_role = false).await;
    let api = Api::new(&s);
    let ops = api.token("platform", "ops", &[], false, true);
    api.err(Method::GET, path, &ops, None, 401, "InvalidOperatorKey").await;
    api.ok(Method::GET, path, OPERATOR_KEY, None).await;
    s.stop().await;
    let s = TestServer::with(|c| {
        c.operator.jwt_role = false;
        c.operator.api_key_sha256.clear();
    })
    .await;
    let api = Api::new(&s);
    api.err(Method::GET, path, OPERATOR_KEY, None, 403, "OperatorApiDisabled").await;
}

#[tokio::test]
async fn the_operator_creates_tenants_and_records_ends_and_cancels_purchases_audited_and_durable() {
    let s = TestServer::start().await;
    let api = Api::new(&s);
    let op = OPERATOR_KEY;
    let boss = api.token("tailspin", "boss", &[], true, false);
    // Unknown to the gateway: its admin is refused and no tenant appears.
    api.err(Method::GET, "/api/v1/admin/licenses", &boss, None, 403, "UnknownTenant").await;
    api.err(Method::GET, "/api/v1/operator/tenants/tailspin", op, None, 404, "TenantNotFound").await;
    let sub = json!({"kind": "tenant_license"});
    let subs = "/api/v1/operator/tenants/tailspin/subscriptions";
    api.err(Method::POST, subs, op, Some(sub.clone()), 404, "TenantNotFound").await;
    assert!(tenant(&api.ok(Method::GET, "/api/v1/operator/tenants", op, None).await, "tailspin").is_none());

    api.err(Method::POST, "/api/v1/operator/tenants", op, Some(json!({"id": "bad id"})), 400, "BadRequest")
        .await;
    let created = api
        .ok(Method::POST, "/api/v1/operator/tenants", op, Some(json!({"id": "tailspin", "name": "Tailspin"})))
        .await;
    assert_eq!((created["name"].as_str(), created["capacity"].as_u64()), (Some("Tailspin"), Some(0)));
    api.err(
        Method::POST,
        "/api/v1/operator/tenants",
        op,
        Some(json!({"id": "tailspin"})),
        409,
        "TenantExists",
    )
    .await;
    // Its admin now reaches the admin API, and still cannot buy.
    api.ok(Method::GET, "/api/v1/admin/licenses", &boss, None).await;
    api.err(
        Method::POST,
        "/api/v1/admin/subscriptions",
        &boss,
        Some(sub.clone()),
        403,
        "SelfPurchaseDisabled",
    )
    .await;

    // Today is 2026-11-28 on the test clock.
    let license =
        api.ok(Method::POST, subs, op, Some(json!({"kind": "tenant_license", "start": "2026-11-01"}))).await;
    let addon = api.ok(Method::POST, subs, op, Some(json!({"kind": "capacity_addon", "quantity": 3}))).await;
    let t = api.ok(Method::GET, "/api/v1/operator/tenants/tailspin", op, None).await;
    assert_eq!(t["capacity"], 5000);
    assert_eq!(t["subscriptions"][0]["state"], "active");
    let (lid, aid) = (license["id"].as_str().unwrap(), addon["id"].as_str().unwrap());

    let end = |id: &str| format!("{subs}/{id}/end");
    api.err(Method::POST, &end(lid), op, Some(json!({"end": "2026-11-27"})), 400, "BadRequest").await;
    api.err(Method::POST, &end("nope"), op, Some(json!({"end": "2026-12-31"})), 404, "SubscriptionNotFound")
        .await;
    let ended = api.ok(Method::POST, &end(lid), op, Some(json!({"end": "2026-11-30"}))).await;
    assert_eq!(ended["end"], "2026-11-30");
    // Cancelled: the add-on counts for no day and no month, this one included.
    let cancel = format!("{subs}/{aid}/cancel");
    api.ok(Method::POST, &cancel, op, None).await;
    api.err(Method::POST, &cancel, op, None, 409, "SubscriptionCancelled").await;
    let t = api.ok(Method::GET, "/api/v1/operator/tenants/tailspin", op, None).await;
    assert_eq!(t["capacity"], 2000);
    let states: Vec<&str> =
        t["subscriptions"].as_array().unwrap().iter().map(|s| s["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["active", "cancelled"]);
    let mine = api.ok(Method::GET, "/api/v1/admin/subscriptions", &boss, None).await;
    let states: Vec<&str> =
        mine["subscriptions"].as_array().unwrap().iter().map(|s| s["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["active", "cancelled"], "the tenant admin reads the same");
    let m = s.metrics().await;
    assert_eq!(metric(&m, r#"botgate_tenant_capacity_sessions{tenant="tailspin"}"#), Some(2000));

    // Every change is in the tenant's audit log, by the operator.
    let log = api.ok(Method::GET, "/api/v1/admin/audit", &boss, None).await;
    let rows: Vec<(&str, &str)> = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["actor"].as_str().unwrap()))
        .collect();
    let actor = format!("operator:key-{}", &botgate::licensing::operator::key_hash(OPERATOR_KEY)[..8]);
    let expected =
        ["tenant.create", "subscription.add", "subscription.add", "subscription.end", "subscription.cancel"];
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), expected);
    assert!(rows.iter().all(|r| r.1 == actor), "{rows:?}");

    // A restart keeps the tenant, the end date and the cancellation; the month crosses the end.
    let (dir, clock) = s.stop().await;
    let s = TestServer::in_dir(dir, clock.clone(), |_| {}).await;
    let api = Api::new(&s);
    let t = api.ok(Method::GET, "/api/v1/operator/tenants/tailspin", op, None).await;
    assert_eq!((t["name"].as_str(), t["capacity"].as_u64()), (Some("Tailspin"), Some(2000)));
    clock.advance_ms(3 * 86_400_000);
    let t = api.ok(Method::GET, "/api/v1/operator/tenants/tailspin", op, None).await;
    assert_eq!((t["month"].as_str(), t["capacity"].as_u64()), (Some("2026-12"), Some(0)));
    assert_eq!(t["tenant_licensed"], false);
    assert_eq!(t["subscriptions"][0]["state"], "ended");
    // An ended subscription stays ended: its past days are not rewritten.
    let later = Some(json!({"end": "2027-06-30"}));
    api.err(Method::POST, &end(lid), op, later, 409, "SubscriptionEnded").await;
    api.err(Method::POST, &format!("{subs}/{lid}/cancel"), op, None, 409, "SubscriptionEnded").await;
}

#[tokio::test]
async fn self_purchase_only_where_the_operator_allows_it() {
    let s = TestServer::with(|c| c.licensing.tenant_self_purchase = true).await;
    let api = Api::new(&s);
    let admin = api.token("contoso", "root", &[], true, false);
    let body = Some(json!({"kind": "capacity_addon"}));
    api.ok(Method::POST, "/api/v1/admin/subscriptions", &admin, body.clone()).await;
    let usage = api.ok(Method::GET, "/api/v1/admin/usage", &admin, None).await;
    assert_eq!(usage["capacity"], 3000);
    // Still never for an unknown tenant.
    let stranger = api.token("nowhere", "root", &[], true, false);
    api.err(Method::POST, "/api/v1/admin/subscriptions", &stranger, body, 403, "UnknownTenant").await;
    assert!(
        tenant(&api.ok(Method::GET, "/api/v1/operator/tenants", OPERATOR_KEY, None).await, "nowhere")
            .is_none()
    );
}

#[tokio::test]
async fn authors_reach_only_their_own_and_shared_bots_and_admins_reach_all() {
    let s = TestServer::start().await;
    let api = Api::new(&s);
    let alice = api.token("contoso", "alice", &[], false, false);
    // Bob and carol are licensed through the configured group.
    let bob = api.token("contoso", "bob", &["helpdesk-authors"], false, false);
    let carol = api.token("contoso", "carol", &["helpdesk-authors"], false, false);
    let root = api.token("contoso", "root", &["helpdesk-authors"], true, false);
    api.ok(Method::POST, "/api/v1/bots", &alice, Some(bot("orders"))).await;

    let denied = [
        (Method::GET, "/api/v1/bots/orders", None),
        (Method::PATCH, "/api/v1/bots/orders", Some(json!({"name": "Mine now"}))),
        (Method::POST, "/api/v1/bots/orders/publish", None),
        (Method::GET, "/api/v1/bots/orders/secrets", None),
        (Method::POST, "/api/v1/bots/orders/secrets/1/regenerate", None),
        (Method::POST, "/api/v1/bots/orders/testchat", None),
        (Method::GET, "/api/v1/bots/orders/analytics", None),
        (Method::PUT, "/api/v1/bots/orders/editors/bob", None),
        (Method::DELETE, "/api/v1/bots/orders", None),
    ];
    for (m, path, body) in denied.clone() {
        api.err(m, path, &bob, body, 403, "NotBotEditor").await;
    }
    let ids = |v: Value| -> Vec<String> {
        v["bots"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap().to_string()).collect()
    };
    assert!(!ids(api.ok(Method::GET, "/api/v1/bots", &bob, None).await).contains(&"orders".to_string()));

    // Shared with bob: he edits and publishes, but cannot share further.
    let v = api.ok(Method::PUT, "/api/v1/bots/orders/editors/bob", &alice, None).await;
    assert_eq!(v["editors"], json!(["bob"]));
    api.ok(Method::PUT, "/api/v1/bots/orders/editors/bob", &alice, None).await; // no change
    api.ok(Method::PATCH, "/api/v1/bots/orders", &bob, Some(json!({"name": "Orders"}))).await;
    api.ok(Method::POST, "/api/v1/bots/orders/publish", &bob, None).await;
    api.ok(Method::GET, "/api/v1/bots/orders/analytics", &bob, None).await;
    assert!(ids(api.ok(Method::GET, "/api/v1/bots", &bob, None).await).contains(&"orders".to_string()));
    api.err(Method::PUT, "/api/v1/bots/orders/editors/carol", &bob, None, 403, "NotBotEditor").await;
    for (m, path, body) in denied.clone() {
        api.err(m, path, &carol, body, 403, "NotBotEditor").await;
    }
    // A tenant admin reaches every bot of the tenant, sharing included.
    api.ok(Method::PATCH, "/api/v1/bots/orders", &root, Some(json!({"name": "Orders (admin)"}))).await;
    api.ok(Method::PUT, "/api/v1/bots/orders/editors/carol", &root, None).await;

    // Sharing survives a restart; unsharing takes effect at once.
    let (dir, clock) = s.stop().await;
    let s = TestServer::in_dir(dir, clock, |_| {}).await;
    let api = Api::new(&s);
    let v = api.ok(Method::GET, "/api/v1/bots/orders", &carol, None).await;
    assert_eq!((v["owner"].as_str(), v["editors"].clone()), (Some("alice"), json!(["bob", "carol"])));
    assert_eq!(v["name"], "Orders (admin)");
    let res = api.call(Method::DELETE, "/api/v1/bots/orders/editors/bob", Some(&alice), None).await;
    assert_eq!(res.status(), 204);
    api.err(Method::DELETE, "/api/v1/bots/orders/editors/bob", &alice, None, 404, "NotFound").await;
    api.err(Method::GET, "/api/v1/bots/orders", &bob, None, 403, "NotBotEditor").await;
    // The audit log names the sharing.
    let log = api.ok(Method::GET, "/api/v1/admin/audit", &root, None).await;
    let actions: Vec<&str> = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .filter(|a| a.contains("share"))
        .collect();
    assert_eq!(actions, ["bot.share", "bot.share", "bot.unshare"]);
    let res = api.call(Method::DELETE, "/api/v1/bots/orders", Some(&carol), None).await;
    assert_eq!(res.status(), 204);
}

#[tokio::test]
async fn a_bot_of_the_configuration_file_is_read_only_through_the_api() {
    let s = TestServer::start().await;
    let api = Api::new(&s);
    let alice = api.token("contoso", "alice", &[], false, false);
    let root = api.token("contoso", "root", &["helpdesk-authors"], true, false);
    let v = api.ok(Method::GET, "/api/v1/bots/helpdesk", &alice, None).await;
    assert_eq!((v["owner"].as_str(), v["managed_by_config"].as_bool()), (Some("alice"), Some(true)));
    api.ok(Method::GET, "/api/v1/bots/helpdesk/analytics", &alice, None).await;
    api.ok(Method::GET, "/api/v1/bots/helpdesk/secrets", &alice, None).await;
    for token in [&alice, &root] {
        for (m, path, body) in [
            (Method::PATCH, "/api/v1/bots/helpdesk", Some(json!({"name": "Renamed"}))),
            (Method::POST, "/api/v1/bots/helpdesk/unpublish", None),
            (Method::POST, "/api/v1/bots/helpdesk/secrets/1/regenerate", None),
            (Method::PUT, "/api/v1/bots/helpdesk/editors/bob", None),
            (Method::DELETE, "/api/v1/bots/helpdesk", None),
        ] {
            api.err(m, path, token, body, 409, "ManagedByConfig").await;
        }
    }
    // Nothing changed: the bot still serves under its configured name.
    let (token, conv, _) = s.conversation("helpdesk").await;
    let greeting = s.poll(&token, &conv, None).await;
    assert!(greeting.to_string().contains("the Contoso helpdesk bot"), "{greeting}");
    let bob = api.token("contoso", "bob", &["helpdesk-authors"], false, false);
    api.err(Method::GET, "/api/v1/bots/helpdesk", &bob, None, 403, "NotBotEditor").await;
}

#[tokio::test]
async fn the_audit_log_is_structured_with_rfc3339_times_and_filters() {
    let s = TestServer::start().await;
    let api = Api::new(&s);
    let root = api.token("contoso", "root", &[], true, false);
    // An id with quotes stays one string in `after`, not JSON of its own making.
    let odd = "eve%22%2C%22x%22%3A%22y";
    api.ok(Method::PUT, &format!("/api/v1/admin/licenses/users/{odd}"), &root, None).await;
    s.clock.advance_secs(60);
    let body = Some(json!({"capacity_policy": "allow_overage"}));
    api.ok(Method::PATCH, "/api/v1/admin/settings", &root, body).await;
    let all = api.ok(Method::GET, "/api/v1/admin/audit", &root, None).await;
    let entries = all["entries"].as_array().unwrap();
    let assign =
        entries.iter().find(|e| e["action"] == "license.assign_user" && e["actor"] == "root").unwrap();
    assert_eq!(assign["after"], json!({"assigned": "eve\",\"x\":\"y"}));
    assert_eq!(assign["at"], "2026-11-28T10:00:00.000Z");
    let settings = entries.iter().find(|e| e["action"] == "settings.update").unwrap();
    assert_eq!(settings["before"]["capacity_policy"], "reject");
    assert_eq!(settings["after"]["capacity_policy"], "allow_overage");
    assert_eq!(settings["at"], "2026-11-28T10:01:00.000Z");

    let filtered = |q: &'static str| {
        let root = root.clone();
        let api = &api;
        async move {
            let v = api.ok(Method::GET, &format!("/api/v1/admin/audit?{q}"), &root, None).await;
            v["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["action"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(filtered("actor=root").await, ["license.assign_user", "settings.update"]);
    assert_eq!(filtered("action=settings.update").await, ["settings.update"]);
    assert_eq!(filtered("actor=root&from=2026-11-28T10:00:30Z").await, ["settings.update"]);
    assert_eq!(filtered("actor=root&to=2026-11-28T10:00:30Z").await, ["license.assign_user"]);
    assert_eq!(filtered("actor=config&limit=1").await.len(), 1);
    api.err(Method::GET, "/api/v1/admin/audit?from=yesterday", &root, None, 400, "BadRequest").await;
}
