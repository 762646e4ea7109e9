//! Drives the real server (in process, on a manual clock) through the steps of a sequence over
//! HTTP, and checks every answer, `/metrics` and the usage reports against the reference model.

use std::collections::BTreeMap;

use botgate::clock::{Clock, ManualClock};
use botgate::identity::dev_issuer::{self, TokenRequest};
use serde_json::{Value, json};

use super::common::{TestServer, metric};
use super::reference::{BOTS, Counts, Kind, Model, Op, Params, START, Say, TENANTS, label};

/// The server configuration for a sequence.
pub fn configure(p: Params) -> impl FnOnce(&mut botgate::config::Config) + Copy {
    move |c| {
        c.metering.tenant_license_sessions = p.per_license;
        c.metering.addon_sessions = p.per_addon;
        c.metering.session_idle_secs = p.session_idle as u64;
        c.metering.session_max_secs = p.session_max as u64;
        c.metering.session_max_turns = p.max_turns;
        c.channel.idle_timeout_secs = p.conversation_idle as u64;
        c.channel.token_ttl_secs = p.token_ttl as u64;
        c.metrics.max_bot_series = 1_000_000;
    }
}

/// A client's current Direct Line token and its conversation id.
struct Client {
    token: String,
    conversation: String,
}

/// The server under test and what the driver holds for it.
pub struct Sut {
    server: Option<TestServer>,
    params: Params,
    key: Vec<u8>,
    clients: Vec<Client>,
    http: reqwest::Client,
    /// The steps so far, for failure messages.
    log: Vec<Op>,
    /// The model before the current step.
    prev: Option<Model>,
}

/// The author (also the tenant admin) of a tenant.
fn author(tenant: usize) -> &'static str {
    if tenant == 0 { "alice" } else { "boss" }
}

fn bot_body(id: &str) -> Value {
    json!({
        "id": id,
        "name": "Orders",
        "kind": "builtin",
        "topics": [
            {"name": "Greeting", "kind": "system", "system": "greeting", "replies": ["Hi."]},
            {"name": "Fallback", "kind": "system", "system": "fallback", "replies": ["?"]},
            {"name": "Order", "kind": "user", "triggers": ["order"], "replies": ["On its way."]},
            {"name": "Goodbye", "kind": "system", "system": "end_of_conversation", "triggers": ["bye"], "replies": ["Bye."]},
        ],
    })
}

/// The text of a message of `what` to `bot`.
fn text(bot: usize, what: Say) -> &'static str {
    match (bot, what) {
        (0, Say::User) => "my vpn is broken",
        (_, Say::User) => "where is my order",
        (_, Say::Bye) => "bye",
        _ => "hello there",
    }
}

impl Sut {
    /// Starts the server for a sequence.
    pub async fn start(params: Params) -> Self {
        let server = TestServer::in_dir(
            tempfile::tempdir().expect("a temporary folder"),
            ManualClock::at(START),
            configure(params),
        )
        .await;
        let key = dev_issuer::load_or_create(&server.dir.path().join("data")).expect("the dev issuer key");
        Self {
            server: Some(server),
            params,
            key,
            clients: Vec::new(),
            http: reqwest::Client::new(),
            log: Vec::new(),
            prev: None,
        }
    }

    fn s(&self) -> &TestServer {
        self.server.as_ref().expect("a running server")
    }

    /// Stops the server (keeping nothing).
    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
    }

    fn author_token(&self, tenant: usize) -> String {
        let req = TokenRequest {
            tenant: TENANTS[tenant].into(),
            user: author(tenant).into(),
            name: None,
            groups: vec![],
            admin: true,
            operator: false,
            ttl_secs: 3600,
        };
        dev_issuer::sign(&self.key, "botgate-dev", "botgate", &req, self.s().clock.now_secs())
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> (u16, Value) {
        let res = rb.send().await.expect("the server answers");
        let status = res.status().as_u16();
        let text = res.text().await.expect("a body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn authored(
        &self,
        tenant: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut rb = self.http.request(method, self.s().url(path)).bearer_auth(self.author_token(tenant));
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        self.send(rb).await
    }

    async fn buy(
        &self,
        tenant: usize,
        kind: Kind,
        quantity: u32,
        start: String,
        end: Option<String>,
    ) -> (u16, Value) {
        let mut body = json!({"kind": kind.api(), "quantity": quantity, "start": start});
        if let Some(e) = end {
            body["end"] = json!(e);
        }
        // The operator records purchases, creating the tenant at its first one.
        let operator = |path: String, body: Value| {
            self.http.post(self.s().url(&path)).bearer_auth(super::common::OPERATOR_KEY).json(&body)
        };
        let (status, answer) =
            self.send(operator("/api/v1/operator/tenants".into(), json!({"id": TENANTS[tenant]}))).await;
        assert!(status == 201 || status == 409, "creating {}: {status} {answer}", TENANTS[tenant]);
        self.send(operator(format!("/api/v1/operator/tenants/{}/subscriptions", TENANTS[tenant]), body)).await
    }

    fn today(&self, plus: i64) -> String {
        let now = self.s().clock.now_secs();
        (super::reference::day_of(now) + chrono::Duration::days(plus)).to_string()
    }

    /// Takes one step: the request(s), then the answer and every counter against `m` (the model
    /// after the step).
    ///
    /// The usage reports flush the turn counters to the store, so they are read only where that
    /// cannot hide a missing flush: not after a message (the restart that may follow must flush
    /// at shutdown), and before the clock moves (turns are written under the day of the flush).
    pub async fn step(&mut self, op: &Op, m: &Model) {
        self.log.push(op.clone());
        let clock_moves = matches!(op, Op::Advance { .. } | Op::ToMonthEnd { .. } | Op::Deadline { .. });
        if clock_moves && let Some(prev) = &self.prev {
            self.check_reports(prev).await;
        }
        let got = self.act(op, m).await;
        let want = m.expect;
        if want.status != 0 {
            let (status, body) = &got;
            let code = body["error"]["code"].as_str();
            assert!(
                *status == want.status && want.code.is_none_or(|c| Some(c) == code),
                "{op:?}: expected {want:?}, got {status} {body}\n{}",
                self.trail()
            );
        }
        self.check(m).await;
        if !matches!(op, Op::Say { .. }) {
            self.check_reports(m).await;
        }
        self.prev = Some(m.clone());
    }

    /// Checks the start state.
    pub async fn begin(&mut self, m: &Model) {
        self.check(m).await;
        self.check_reports(m).await;
        self.prev = Some(m.clone());
    }

    fn trail(&self) -> String {
        format!("steps: {:#?}\nparams: {:?}", self.log, self.params)
    }

    async fn act(&mut self, op: &Op, m: &Model) -> (u16, Value) {
        use reqwest::Method;
        match *op {
            Op::Buy { tenant, kind, quantity, start, days } => {
                let end = days.map(|d| self.today(start + d));
                self.buy(tenant, kind, quantity, self.today(start), end).await
            }
            Op::Onboard { tenant } => {
                for kind in [Kind::TenantLicense, Kind::UserLicenses] {
                    let (status, body) = self.buy(tenant, kind, 1, self.today(0), None).await;
                    assert_eq!(status, 201, "{op:?}: {body}\n{}", self.trail());
                }
                let path = format!("/api/v1/admin/licenses/users/{}", author(tenant));
                self.authored(tenant, Method::PUT, &path, None).await
            }
            Op::Assign { tenant } => {
                let path = format!("/api/v1/admin/licenses/users/{}", author(tenant));
                self.authored(tenant, Method::PUT, &path, None).await
            }
            Op::Create { tenant, bot } => {
                self.authored(tenant, Method::POST, "/api/v1/bots", Some(bot_body(BOTS[bot]))).await
            }
            Op::Publish { tenant, bot, on } => {
                let verb = if on { "publish" } else { "unpublish" };
                let path = format!("/api/v1/bots/{}/{verb}", BOTS[bot]);
                self.authored(tenant, Method::POST, &path, Some(json!({}))).await
            }
            Op::Delete { tenant, bot } => {
                self.authored(tenant, Method::DELETE, &format!("/api/v1/bots/{}", BOTS[bot]), None).await
            }
            Op::Token { bot, .. } => {
                let url = self.s().url(&format!("/api/v1/bots/{}/directline/token", BOTS[bot]));
                let (status, body) = self.send(self.http.get(url)).await;
                if status == 200 {
                    self.clients.push(Client {
                        token: body["token"].as_str().expect("a token").into(),
                        conversation: body["conversationId"].as_str().expect("a conversation id").into(),
                    });
                }
                (status, body)
            }
            Op::Start { client } => {
                let c = &self.clients[m.client(client)];
                let rb = self.http.post(self.s().url("/v3/directline/conversations")).bearer_auth(&c.token);
                let (status, body) = self.send(rb).await;
                if status < 300 {
                    assert_eq!(body["conversationId"], c.conversation.as_str(), "{op:?}\n{}", self.trail());
                }
                (status, body)
            }
            Op::Say { client, what } => {
                let client = m.client(client);
                let c = &self.clients[client];
                let activity = match what {
                    Say::User | Say::System | Say::Bye => {
                        json!({"type": "message", "from": {"id": "u"}, "text": text(m.clients[client].bot, what)})
                    }
                    Say::Typing => json!({"type": "typing", "from": {"id": "u"}}),
                    Say::Event => json!({"type": "event", "name": "ping", "from": {"id": "u"}}),
                    Say::End => json!({"type": "endOfConversation", "from": {"id": "u"}}),
                };
                let url =
                    self.s().url(&format!("/v3/directline/conversations/{}/activities", c.conversation));
                self.send(self.http.post(url).bearer_auth(&c.token).json(&activity)).await
            }
            Op::Refresh { client } => {
                let client = m.client(client);
                let c = &self.clients[client];
                let rb = self.http.post(self.s().url("/v3/directline/tokens/refresh")).bearer_auth(&c.token);
                let (status, body) = self.send(rb).await;
                if status == 200 {
                    let token = body["token"].as_str().expect("a token").to_string();
                    assert_eq!(body["conversationId"], self.clients[client].conversation.as_str());
                    self.clients[client].token = token;
                }
                (status, body)
            }
            Op::Advance { .. } | Op::ToMonthEnd { .. } | Op::Deadline { .. } => {
                let s = self.s();
                s.clock.advance_secs(m.now - s.clock.now_secs());
                (0, Value::Null)
            }
            Op::Restart => {
                let server = self.server.take().expect("a running server");
                let (dir, clock) = server.stop().await;
                self.server = Some(TestServer::in_dir(dir, clock, configure(self.params)).await);
                (0, Value::Null)
            }
        }
    }

    /// The per-bot series and tenant gauges against the model.
    pub async fn check(&self, m: &Model) {
        assert_eq!(self.s().clock.now_secs(), m.now, "the clocks agree");
        let text = self.s().metrics().await;
        let series = |family: &str, t: usize, b: usize| {
            metric(&text, &format!("{family}{{tenant=\"{}\",bot=\"{}\"}}", TENANTS[t], BOTS[b]))
        };
        for (&(t, b), want) in &m.totals {
            for (family, want) in
                [("botgate_billed_sessions_total", want.billed), ("botgate_turns_total", want.turns)]
            {
                match series(family, t, b) {
                    Some(got) => {
                        assert_eq!(got, want, "{family} of {}/{}\n{}", TENANTS[t], BOTS[b], self.trail())
                    }
                    // A deleted bot's series may be gone after a restart; a bot that exists has its.
                    None => assert!(
                        !m.is_live(t, b),
                        "no {family} series for {}/{}, which exists\n{}",
                        TENANTS[t],
                        BOTS[b],
                        self.trail()
                    ),
                }
            }
        }
        // No series for a (tenant, bot) that was never created.
        for line in text.lines().filter(|l| l.starts_with("botgate_billed_sessions_total{")) {
            let known = m.totals.keys().any(|&(t, b)| {
                line.starts_with(&format!(
                    "botgate_billed_sessions_total{{tenant=\"{}\",bot=\"{}\"}} ",
                    TENANTS[t], BOTS[b]
                ))
            });
            assert!(known, "a series for a bot never created there: {line}\n{}", self.trail());
        }
        let month = m.month();
        for &t in m.tenants.keys() {
            let gauge = |name: &str| metric(&text, &format!("{name}{{tenant=\"{}\"}}", TENANTS[t]));
            let (cap, used) = (m.capacity(t, month), m.used(t, month));
            let got = (
                gauge("botgate_tenant_capacity_sessions"),
                gauge("botgate_tenant_used_sessions"),
                gauge("botgate_tenant_remaining_sessions"),
            );
            assert_eq!(
                got,
                (Some(cap), Some(used), Some(cap.saturating_sub(used))),
                "capacity, used, remaining of {} in {}\n{}",
                TENANTS[t],
                label(month),
                self.trail()
            );
        }
    }

    /// Each tenant's usage report for every month it has usage in, against the model.
    pub async fn check_reports(&self, m: &Model) {
        let text = self.s().metrics().await;
        for &t in m.tenants.keys() {
            let used = metric(&text, &format!("botgate_tenant_used_sessions{{tenant=\"{}\"}}", TENANTS[t]));
            for mm in m.months(t) {
                self.check_report(m, t, mm, used).await;
            }
        }
    }

    async fn check_report(
        &self,
        m: &Model,
        t: usize,
        month: super::reference::Month,
        used_gauge: Option<u64>,
    ) {
        let path = format!("/api/v1/admin/usage?month={}", label(month));
        let (status, u) = self.authored(t, reqwest::Method::GET, &path, None).await;
        assert_eq!(status, 200, "usage report of {} for {}: {u}\n{}", TENANTS[t], label(month), self.trail());
        let bots: BTreeMap<String, Counts> = u["bots"]
            .as_array()
            .expect("bots")
            .iter()
            .map(|b| {
                let n = |k: &str| b[k].as_u64().expect("a count");
                assert_eq!(n("overage_sessions"), 0, "no overage under reject: {u}");
                (
                    b["bot"].as_str().expect("a bot").to_string(),
                    Counts { billed: n("billed_sessions"), turns: n("turns") },
                )
            })
            .filter(|(_, c)| *c != Counts::default())
            .collect();
        let want_bots: BTreeMap<String, Counts> =
            m.month_bots(t, month).into_iter().map(|(b, c)| (b.to_string(), c)).collect();
        let (cap, used) = (m.capacity(t, month), m.used(t, month));
        let want = json!({
            "capacity": cap, "used": used, "remaining": cap.saturating_sub(used), "overage": 0, "billed_sessions": used,
        });
        let got = json!({
            "capacity": u["capacity"], "used": u["used"], "remaining": u["remaining"], "overage": u["overage"],
            "billed_sessions": u["billed_sessions"],
        });
        let ctx = format!("usage report of {} for {}\n{}", TENANTS[t], label(month), self.trail());
        assert_eq!(got, want, "{ctx}");
        assert_eq!(bots, want_bots, "per-bot rows of the {ctx}");
        // The per-bot billed sessions of this month add up to the tenant's used gauge.
        if month == m.month() {
            let sum: u64 = bots.values().map(|c| c.billed).sum();
            assert_eq!(Some(sum), used_gauge, "per-bot sessions against the used gauge, {ctx}");
        }
    }
}
