//! The reference model of licensing capacity and billed sessions, written from the billing
//! rules alone: what a tenant may use each month, when a billed
//! session begins, continues and ends, what counts as a turn, and what each answer must be. It
//! knows nothing of the server's code; it is a plain state machine over explicit time.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Duration, NaiveDate};

/// The tenants a sequence works with: `contoso` is configured (tenant license, ten seats, the
/// licensed author `alice`, the published bot `helpdesk`); the others are created through the API.
pub const TENANTS: [&str; 3] = ["contoso", "t1", "t2"];
/// The bots: `helpdesk` (index 0) is configured in `contoso`; the others are authored.
pub const BOTS: [&str; 3] = ["helpdesk", "x", "y"];
/// The instant every sequence starts at (the test clock's `T0`).
pub const START: &str = "2026-11-28T10:00:00Z";

/// What a subscription buys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Capacity per month, and the right to author.
    TenantLicense,
    /// More capacity per month.
    CapacityAddon,
    /// User-license seats.
    UserLicenses,
}

impl Kind {
    /// The API's name.
    pub fn api(self) -> &'static str {
        match self {
            Kind::TenantLicense => "tenant_license",
            Kind::CapacityAddon => "capacity_addon",
            Kind::UserLicenses => "user_licenses",
        }
    }
}

/// What a bot user sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Say {
    /// A message that triggers a user topic.
    User,
    /// A message answered by a system topic (the fallback).
    System,
    /// A message answered by the system topic that ends the conversation.
    Bye,
    /// A `typing` activity.
    Typing,
    /// An `event` activity.
    Event,
    /// An `endOfConversation` activity.
    End,
}

/// One step of a sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// The operator records a purchase (creating the tenant if it has no record yet); `start`
    /// is days from today, `days` the length (the end is inclusive) or open-ended.
    Buy { tenant: usize, kind: Kind, quantity: u32, start: i64, days: Option<i64> },
    /// A tenant admin buys a tenant license and one seat from today on and assigns the author.
    Onboard { tenant: usize },
    /// A tenant admin assigns the tenant's author a user license.
    Assign { tenant: usize },
    /// The tenant's author creates built-in bot `bot` (unpublished).
    Create { tenant: usize, bot: usize },
    /// The tenant's author publishes (or unpublishes) `bot`.
    Publish { tenant: usize, bot: usize, on: bool },
    /// The tenant's author deletes `bot`.
    Delete { tenant: usize, bot: usize },
    /// A bot user gets an open website-channel token for `bot`: a new client, `client` its name
    /// (a later client of the same name hides it). Names, not positions, so that removing a
    /// step while shrinking leaves the references of the others as they were.
    Token { bot: usize, client: u8 },
    /// The client starts (or restarts) its conversation with its token.
    Start { client: u8 },
    /// The client sends an activity.
    Say { client: u8, what: Say },
    /// The client refreshes its token.
    Refresh { client: u8 },
    /// The clock moves on.
    Advance { secs: i64 },
    /// The clock moves to `before` seconds before the next month begins.
    ToMonthEnd { before: i64 },
    /// The clock moves to the instant a rule fires for the client (or one second before).
    Deadline { client: u8, rule: Rule, early: bool },
    /// The server stops gracefully and starts again on the same data folder and clock.
    Restart,
}

/// A rule with a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The open session's idle time.
    SessionIdle,
    /// The open session's longest duration.
    SessionMax,
    /// The held conversation's idle time.
    ConversationIdle,
    /// The client's token expiry.
    TokenExpiry,
}

/// The configuration a sequence runs under (the values given to the server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Sessions per tenant license per month.
    pub per_license: u64,
    /// Sessions per capacity add-on per month.
    pub per_addon: u64,
    /// A session ends after this long without a user message (seconds).
    pub session_idle: i64,
    /// A session ends this long after it began (seconds).
    pub session_max: i64,
    /// A session ends after this many turns.
    pub max_turns: u32,
    /// A conversation is closed after this long without a user message (seconds).
    pub conversation_idle: i64,
    /// Direct Line token lifetime (seconds).
    pub token_ttl: i64,
}

impl Params {
    /// The values most sequences run with.
    pub fn standard() -> Self {
        Self {
            per_license: 3,
            per_addon: 2,
            session_idle: 1800,
            session_max: 3600,
            max_turns: 4,
            conversation_idle: 1800,
            token_ttl: 3600,
        }
    }
}

/// The answer a step must get: an HTTP status and, where the rules name one, an error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Expect {
    /// 0 for steps that are not a request.
    pub status: u16,
    /// The error code, where it is fixed by the rules.
    pub code: Option<&'static str>,
}

fn ok(status: u16) -> Expect {
    Expect { status, code: None }
}

fn err(status: u16, code: &'static str) -> Expect {
    Expect { status, code: Some(code) }
}

/// A purchase.
#[derive(Debug, Clone, Copy)]
pub struct Subscription {
    /// What it buys.
    pub kind: Kind,
    /// How many.
    pub quantity: u32,
    /// First day.
    pub start: NaiveDate,
    /// Last day (inclusive), if any.
    pub end: Option<NaiveDate>,
}

/// A tenant with a licensing record.
#[derive(Debug, Clone, Default)]
pub struct Tenant {
    /// Its purchases.
    pub subscriptions: Vec<Subscription>,
    /// Whether its author holds a user license.
    pub author_licensed: bool,
}

/// A bot that exists now. Each creation is a new incarnation.
#[derive(Debug, Clone, Copy)]
pub struct LiveBot {
    /// Its tenant.
    pub tenant: usize,
    /// Which creation of this id it is.
    pub incarnation: u64,
    /// Whether bot users can reach it.
    pub published: bool,
}

/// An open billed session.
#[derive(Debug, Clone, Copy)]
pub struct Session {
    began: i64,
    last_user: i64,
    turns: u32,
}

/// A conversation the server holds.
#[derive(Debug, Clone, Copy)]
pub struct Conversation {
    last_user: i64,
    ended: bool,
    session: Option<Session>,
}

/// A bot user's token (one conversation id) and the conversation the server holds for it.
#[derive(Debug, Clone, Copy)]
pub struct Client {
    /// Its name.
    pub name: u8,
    /// The bot (index into [`BOTS`]).
    pub bot: usize,
    /// The bot's tenant when the token was made.
    pub tenant: usize,
    /// The incarnation of the bot the token was made for.
    pub incarnation: u64,
    /// Expiry of the current token (seconds since the epoch; valid while now < expiry).
    pub token_expiry: i64,
    /// How many times its conversation was started (incarnations).
    pub starts: u32,
    conversation: Option<Conversation>,
}

/// Billed sessions and turns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Billed sessions.
    pub billed: u64,
    /// Turns.
    pub turns: u64,
}

/// Months since year 0.
pub type Month = i64;

/// The whole model.
#[derive(Debug, Clone)]
pub struct Model {
    /// The configuration.
    pub p: Params,
    /// The clock, seconds since the epoch.
    pub now: i64,
    /// Tenants with a licensing record, by index into [`TENANTS`].
    pub tenants: BTreeMap<usize, Tenant>,
    /// Bots that exist, by index into [`BOTS`].
    pub live: BTreeMap<usize, LiveBot>,
    incarnations: u64,
    /// The clients, in the order their tokens were made.
    pub clients: Vec<Client>,
    /// All-time counts per (tenant, bot) ever created.
    pub totals: BTreeMap<(usize, usize), Counts>,
    /// Counts per (tenant, month, bot).
    pub monthly: BTreeMap<(usize, Month, usize), Counts>,
    /// Units used per (tenant, month).
    pub used: BTreeMap<(usize, Month), u64>,
    /// What the last step must have answered.
    pub expect: Expect,
    /// How many graceful restarts happened.
    pub restarts: u32,
    /// The client the last step was about (the generator likes to go on with it).
    pub last_client: Option<u8>,
}

/// The month of an instant.
pub fn month_of(secs: i64) -> Month {
    let d = day_of(secs);
    i64::from(d.year()) * 12 + i64::from(d.month0())
}

/// The UTC day of an instant.
pub fn day_of(secs: i64) -> NaiveDate {
    DateTime::from_timestamp(secs, 0).expect("a valid instant").date_naive()
}

/// The first day of a month.
pub fn first_day(m: Month) -> NaiveDate {
    NaiveDate::from_ymd_opt((m / 12) as i32, (m % 12) as u32 + 1, 1).expect("a valid month")
}

/// `YYYY-MM`.
pub fn label(m: Month) -> String {
    format!("{:04}-{:02}", m / 12, m % 12 + 1)
}

/// The first instant of a month.
pub fn month_start(m: Month) -> i64 {
    first_day(m).and_hms_opt(0, 0, 0).expect("midnight").and_utc().timestamp()
}

impl Subscription {
    fn active_on(&self, d: NaiveDate) -> bool {
        self.start <= d && self.end.is_none_or(|e| e >= d)
    }
    fn active_in(&self, m: Month) -> bool {
        let last = first_day(m + 1) - Duration::days(1);
        self.start <= last && self.end.is_none_or(|e| e >= first_day(m))
    }
}

impl Tenant {
    fn units(&self, kind: Kind, f: impl Fn(&Subscription) -> bool) -> u64 {
        self.subscriptions.iter().filter(|s| s.kind == kind && f(s)).map(|s| u64::from(s.quantity)).sum()
    }
}

impl Model {
    /// The state every sequence starts from: the configured tenant and bot.
    pub fn new(p: Params) -> Self {
        let now = DateTime::parse_from_rfc3339(START).expect("START").timestamp();
        let contoso = Tenant {
            subscriptions: vec![
                Subscription {
                    kind: Kind::TenantLicense,
                    quantity: 1,
                    start: NaiveDate::from_ymd_opt(2026, 1, 1).expect("day"),
                    end: None,
                },
                Subscription {
                    kind: Kind::UserLicenses,
                    quantity: 10,
                    start: NaiveDate::from_ymd_opt(2026, 1, 1).expect("day"),
                    end: None,
                },
            ],
            author_licensed: true,
        };
        Self {
            p,
            now,
            tenants: BTreeMap::from([(0, contoso)]),
            live: BTreeMap::from([(0, LiveBot { tenant: 0, incarnation: 0, published: true })]),
            incarnations: 0,
            clients: Vec::new(),
            totals: BTreeMap::from([((0, 0), Counts::default())]),
            monthly: BTreeMap::new(),
            used: BTreeMap::new(),
            expect: Expect::default(),
            restarts: 0,
            last_client: None,
        }
    }

    /// The current month.
    pub fn month(&self) -> Month {
        month_of(self.now)
    }

    /// Capacity of a tenant in month `m`: tenant licenses active on any day of it times the
    /// per-license sessions, plus add-ons active on any day of it times the per-add-on sessions.
    /// An add-on adds to a tenant license: a month without one has none (no trials here).
    pub fn capacity(&self, tenant: usize, m: Month) -> u64 {
        let Some(t) = self.tenants.get(&tenant) else { return 0 };
        let licenses = t.units(Kind::TenantLicense, |s| s.active_in(m));
        if licenses == 0 {
            return 0;
        }
        licenses * self.p.per_license + t.units(Kind::CapacityAddon, |s| s.active_in(m)) * self.p.per_addon
    }

    /// Units a tenant used in month `m`.
    pub fn used(&self, tenant: usize, m: Month) -> u64 {
        self.used.get(&(tenant, m)).copied().unwrap_or(0)
    }

    /// Whether the tenant's author may author today: a tenant license active today and a user
    /// license assigned.
    pub fn author_licensed(&self, tenant: usize) -> bool {
        let today = day_of(self.now);
        self.tenants
            .get(&tenant)
            .is_some_and(|t| t.author_licensed && t.units(Kind::TenantLicense, |s| s.active_on(today)) > 0)
    }

    /// Whether bot `bot` exists in `tenant`.
    pub fn is_live(&self, tenant: usize, bot: usize) -> bool {
        self.live.get(&bot).is_some_and(|b| b.tenant == tenant)
    }

    /// The index of the latest client named `name`.
    pub fn client(&self, name: u8) -> usize {
        self.clients.iter().rposition(|c| c.name == name).expect("a client of that name")
    }

    fn named(&self, name: u8) -> bool {
        self.clients.iter().any(|c| c.name == name)
    }

    /// Whether a step may be taken in this state (ids of live bots are unique across tenants, and
    /// steps name clients that exist).
    pub fn allows(&self, op: &Op) -> bool {
        match *op {
            Op::Create { tenant, bot } => bot != 0 && self.live.get(&bot).is_none_or(|b| b.tenant == tenant),
            Op::Publish { bot, .. } | Op::Delete { bot, .. } => bot != 0,
            Op::Start { client } | Op::Say { client, .. } | Op::Refresh { client } => self.named(client),
            Op::ToMonthEnd { before } => month_start(self.month() + 1) - before > self.now,
            Op::Advance { secs } => secs > 0,
            Op::Deadline { client, rule, early } => {
                self.named(client)
                    && self
                        .deadline(self.client(client), rule)
                        .is_some_and(|d| d - i64::from(early) > self.now)
            }
            _ => true,
        }
    }

    /// Applies a step and records the answer it must get.
    pub fn apply(&mut self, op: &Op) {
        if let Op::Token { client, .. }
        | Op::Start { client }
        | Op::Say { client, .. }
        | Op::Refresh { client }
        | Op::Deadline { client, .. } = *op
        {
            self.last_client = Some(client);
        }
        self.expect = match *op {
            Op::Buy { tenant, kind, quantity, start, days } => {
                let start = day_of(self.now) + Duration::days(start);
                let end = days.map(|d| start + Duration::days(d));
                self.buy(tenant, Subscription { kind, quantity, start, end })
            }
            Op::Onboard { tenant } => {
                let today = day_of(self.now);
                for kind in [Kind::TenantLicense, Kind::UserLicenses] {
                    self.buy(tenant, Subscription { kind, quantity: 1, start: today, end: None });
                }
                self.assign(tenant)
            }
            Op::Assign { tenant } => self.assign(tenant),
            Op::Create { tenant, bot } => self.create(tenant, bot),
            Op::Publish { tenant, bot, on } => self.authored(tenant, bot, |b| {
                b.published = on;
                false
            }),
            Op::Delete { tenant, bot } => self.authored(tenant, bot, |_| true),
            Op::Token { bot, client } => match self.live.get(&bot) {
                Some(b) if b.published => {
                    self.clients.push(Client {
                        name: client,
                        bot,
                        tenant: b.tenant,
                        incarnation: b.incarnation,
                        token_expiry: self.now + self.p.token_ttl,
                        starts: 0,
                        conversation: None,
                    });
                    ok(200)
                }
                Some(_) => ok(403),
                // No bot has this id (never created, or deleted): 404, as for a misspelled id.
                None => ok(404),
            },
            Op::Start { client } => self.start(self.client(client)),
            Op::Say { client, what } => self.say(self.client(client), what),
            Op::Refresh { client } => {
                let client = self.client(client);
                if !self.serves(client) {
                    ok(403)
                } else {
                    self.clients[client].token_expiry = self.now + self.p.token_ttl;
                    ok(200)
                }
            }
            Op::Advance { secs } => {
                self.now += secs;
                Expect::default()
            }
            Op::ToMonthEnd { before } => {
                self.now = month_start(self.month() + 1) - before;
                Expect::default()
            }
            Op::Deadline { client, rule, early } => {
                self.now = self.deadline(self.client(client), rule).expect("a deadline") - i64::from(early);
                Expect::default()
            }
            Op::Restart => {
                // Conversations live in the server's memory; tokens, bots and usage survive.
                for c in &mut self.clients {
                    c.conversation = None;
                }
                self.restarts += 1;
                Expect::default()
            }
        };
    }

    fn buy(&mut self, tenant: usize, s: Subscription) -> Expect {
        self.tenants.entry(tenant).or_default().subscriptions.push(s);
        ok(201)
    }

    fn assign(&mut self, tenant: usize) -> Expect {
        let today = day_of(self.now);
        let Some(t) = self.tenants.get_mut(&tenant) else { return err(403, "UnknownTenant") };
        if t.author_licensed {
            return ok(200);
        }
        // The author is the only seat holder of an API-created tenant.
        if t.units(Kind::UserLicenses, |s| s.active_on(today)) == 0 {
            return err(409, "NoSeatsLeft");
        }
        t.author_licensed = true;
        ok(200)
    }

    fn create(&mut self, tenant: usize, bot: usize) -> Expect {
        if !self.author_licensed(tenant) {
            return ok(403);
        }
        if self.is_live(tenant, bot) {
            return err(409, "BotExists");
        }
        self.incarnations += 1;
        self.live.insert(bot, LiveBot { tenant, incarnation: self.incarnations, published: false });
        self.totals.entry((tenant, bot)).or_default();
        ok(201)
    }

    /// An author's change to an own bot; `f` returns whether the bot is deleted.
    fn authored(&mut self, tenant: usize, bot: usize, f: impl FnOnce(&mut LiveBot) -> bool) -> Expect {
        if !self.author_licensed(tenant) {
            return ok(403);
        }
        match self.live.get_mut(&bot) {
            Some(b) if b.tenant == tenant => {
                if f(b) {
                    self.live.remove(&bot);
                    ok(204)
                } else {
                    ok(200)
                }
            }
            _ => err(404, "BotNotFound"),
        }
    }

    /// Whether the client's token is unexpired and its bot incarnation exists and is published
    /// (a deleted bot's tokens never work for a later bot with the same id).
    fn serves(&self, client: usize) -> bool {
        let c = &self.clients[client];
        c.token_expiry > self.now && self.bot_serves(c)
    }

    fn bot_serves(&self, c: &Client) -> bool {
        self.live.get(&c.bot).is_some_and(|b| b.incarnation == c.incarnation && b.published)
    }

    /// The client's conversation if the server still holds it (not closed by idleness).
    fn held(&self, client: usize) -> Option<Conversation> {
        let idle = self.p.conversation_idle;
        self.clients[client].conversation.filter(|c| self.now - c.last_user < idle)
    }

    /// Names of the clients a message would reach (conversation held and open, token valid,
    /// bot serving), and of those whose conversation could be started now.
    pub fn reachable(&self) -> (Vec<u8>, Vec<u8>) {
        let (held, idle) = self.clients_by_held();
        let ok = |n: &u8| self.serves(self.client(*n));
        let talk = held.into_iter().filter(|n| ok(n) && self.held(self.client(*n)).is_some_and(|c| !c.ended));
        (talk.collect(), idle.into_iter().filter(ok).collect())
    }

    /// The (client name, rule) pairs with a deadline more than a second ahead; a session's
    /// only while its conversation and token will still be there to send on.
    pub fn deadlines(&self) -> Vec<(u8, Rule)> {
        let (held, idle) = self.clients_by_held();
        let rules = [Rule::SessionIdle, Rule::SessionMax, Rule::ConversationIdle, Rule::TokenExpiry];
        let useful = |n: u8, r: Rule| {
            let c = self.client(n);
            let Some(d) = self.deadline(c, r) else { return false };
            let open_then = |until: Option<i64>| until.is_some_and(|u| d < u);
            d - 1 > self.now
                && (!matches!(r, Rule::SessionIdle | Rule::SessionMax)
                    || open_then(self.deadline(c, Rule::ConversationIdle))
                        && open_then(self.deadline(c, Rule::TokenExpiry)))
        };
        held.into_iter()
            .chain(idle)
            .flat_map(|n| rules.map(|r| (n, r)))
            .filter(|&(n, r)| useful(n, r))
            .collect()
    }

    /// When `rule` fires for a client, if it has what the rule is about.
    pub fn deadline(&self, client: usize, rule: Rule) -> Option<i64> {
        let c = &self.clients[client];
        let conv = self.held(client);
        let session = conv.and_then(|c| c.session);
        match rule {
            Rule::SessionIdle => session.map(|s| s.last_user + self.p.session_idle),
            Rule::SessionMax => session.map(|s| s.began + self.p.session_max),
            Rule::ConversationIdle => conv.map(|c| c.last_user + self.p.conversation_idle),
            Rule::TokenExpiry => Some(c.token_expiry),
        }
    }

    fn start(&mut self, client: usize) -> Expect {
        if !self.serves(client) {
            return ok(403);
        }
        if self.held(client).is_some() {
            return ok(200);
        }
        // A new incarnation of the conversation: nothing of the old one carries over.
        self.clients[client].starts += 1;
        self.clients[client].conversation =
            Some(Conversation { last_user: self.now, ended: false, session: None });
        ok(201)
    }

    fn say(&mut self, client: usize, what: Say) -> Expect {
        let now = self.now;
        let p = self.p;
        let c = self.clients[client];
        if c.token_expiry <= now {
            return ok(403);
        }
        let Some(mut conv) = self.held(client) else { return err(404, "ConversationNotFound") };
        if !self.bot_serves(&c) {
            return ok(403);
        }
        if conv.ended {
            return err(404, "ConversationEnded");
        }
        match what {
            Say::Typing | Say::Event => return ok(200),
            Say::End => {
                conv.ended = true;
                conv.session = None;
                self.clients[client].conversation = Some(conv);
                return ok(200);
            }
            Say::User | Say::System | Say::Bye => {}
        }
        let month = month_of(now);
        if let Some(s) = conv.session
            && (now - s.last_user >= p.session_idle
                || now - s.began >= p.session_max
                || s.turns >= p.max_turns)
        {
            conv.session = None;
        }
        match conv.session.as_mut() {
            Some(s) => {
                s.turns += 1;
                s.last_user = now;
            }
            None if what == Say::User => {
                if self.used(c.tenant, month) >= self.capacity(c.tenant, month) {
                    return err(429, "CapacityExhausted");
                }
                *self.used.entry((c.tenant, month)).or_default() += 1;
                self.totals.entry((c.tenant, c.bot)).or_default().billed += 1;
                self.monthly.entry((c.tenant, month, c.bot)).or_default().billed += 1;
                conv.session = Some(Session { began: now, last_user: now, turns: 1 });
            }
            None => {}
        }
        self.totals.entry((c.tenant, c.bot)).or_default().turns += 1;
        self.monthly.entry((c.tenant, month, c.bot)).or_default().turns += 1;
        conv.last_user = now;
        if what == Say::Bye {
            conv.ended = true;
            conv.session = None;
        }
        self.clients[client].conversation = Some(conv);
        ok(200)
    }

    /// Tenants whose author may author now.
    pub fn authoring_tenants(&self) -> Vec<usize> {
        self.tenants.keys().copied().filter(|&t| self.author_licensed(t)).collect()
    }

    /// Authored bots that exist, with their tenant and whether they are published.
    pub fn authored_bots(&self) -> Vec<(usize, usize, bool)> {
        self.live.iter().filter(|(b, _)| **b != 0).map(|(b, l)| (l.tenant, *b, l.published)).collect()
    }

    /// Names of the clients whose conversation the server holds, and of those it does not.
    pub fn clients_by_held(&self) -> (Vec<u8>, Vec<u8>) {
        let mut names: Vec<u8> = self.clients.iter().map(|c| c.name).collect();
        names.sort_unstable();
        names.dedup();
        names.into_iter().partition(|&n| self.held(self.client(n)).is_some())
    }

    /// The months a tenant has usage in, and the current one.
    pub fn months(&self, tenant: usize) -> Vec<Month> {
        let mut ms: Vec<Month> =
            self.monthly.keys().filter(|(t, _, _)| *t == tenant).map(|(_, m, _)| *m).collect();
        ms.push(self.month());
        ms.sort_unstable();
        ms.dedup();
        ms
    }

    /// Per-bot counts of a tenant in a month (bots with nothing left out).
    pub fn month_bots(&self, tenant: usize, m: Month) -> BTreeMap<&'static str, Counts> {
        self.monthly
            .iter()
            .filter(|((t, mm, _), c)| *t == tenant && *mm == m && **c != Counts::default())
            .map(|((_, _, b), c)| (BOTS[*b], *c))
            .collect()
    }
}
