//! Micro-benchmarks of the per-request hot path and of a metrics scrape.
//!
//! Groups:
//! - `token`: `TokenSigner::verify` of a valid Direct Line token (every authenticated request).
//! - `activity`: parse a posted activity and stamp it (id, timestamp, channel, conversation).
//! - `conversation`: append to the log; `activities_since` for the last three (a poll).
//! - `metering`: `TenantPool::try_draw` on one thread and on two contending threads,
//!   `RateLimit::take`, `SessionState::decide` for a continuing turn.
//! - `scrape`: 100,000 bots' usage series written by botgate's `UsageCollector` vs the same
//!   series as prometheus-crate `IntCounterVec`s, gathered and text-encoded. Both in one run, so
//!   the ratio is measured on the same machine at the same time.
//!
//! `cargo bench --bench hot_path` (short measurement times: a few minutes on 2 cores).

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use botgate::bots::Bot;
use botgate::channel::activity;
use botgate::channel::token::{Claims, TokenSigner};
use botgate::clock::{SharedClock, SystemClock};
use botgate::config::{CapacityPolicy, Config, SubscriptionConfig, SubscriptionKind};
use botgate::conversation::{Conversation, Page, Retention};
use botgate::metering::counters::RateLimit;
use botgate::metering::exposition::UsageCollector;
use botgate::metering::pool::{CapacityPlan, TenantPool, month_of};
use botgate::metering::session::{SessionRules, SessionState};
use botgate::metering::{ConversationMeter, Metering};
use botgate::store::SharedStore;
use botgate::store::sqlite::SqliteStore;
use botgate::telemetry::registry::ScrapeWriter;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

/// A fixed "now" (2026-11-28T00:00:00Z), in milliseconds.
const NOW_MS: i64 = 1_795_824_000_000;

fn configure(g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    g.measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500)).sample_size(20);
}

fn token(c: &mut Criterion) {
    let signer = TokenSigner::new(&[7u8; 32]);
    let claims = Claims {
        bot: "helpdesk".into(),
        conversation: "Zc3mRk8xq1n0Vb5yP2wLtA".into(),
        user: Some("dl_u".into()),
        exp: NOW_MS / 1000 + 1800,
        slot: 0,
        generation: 0,
        instance: String::new(),
        test_chat: false,
        until: 0,
        origins: Vec::new(),
    };
    let t = signer.sign(&claims);
    let mut g = c.benchmark_group("token");
    configure(&mut g);
    g.throughput(Throughput::Elements(1));
    g.bench_with_input(BenchmarkId::new("verify", "valid"), &t, |b, t| {
        b.iter(|| signer.verify(black_box(t), NOW_MS / 1000))
    });
    g.finish();
}

fn activity_parse_stamp(c: &mut Criterion) {
    let small =
        br#"{"type":"message","from":{"id":"dl_u"},"text":"I forgot my password","locale":"en-US"}"#.to_vec();
    let padding = "x".repeat(1900);
    let large = serde_json::json!({
        "type": "message",
        "from": { "id": "dl_u", "name": "User" },
        "text": "I forgot my password",
        "locale": "en-US",
        "channelData": { "clientActivityID": "1700000000000abcdef", "note": padding },
    })
    .to_string()
    .into_bytes();
    let mut g = c.benchmark_group("activity");
    configure(&mut g);
    for (name, body) in [("small", &small), ("2KiB", &large)] {
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::new("parse_stamp", name), body, |b, body| {
            b.iter(|| {
                let a = activity::parse(black_box(body)).unwrap_or_default();
                activity::stamp(&a, "Zc3mRk8xq1n0Vb5yP2wLtA|0000001", NOW_MS, "Zc3mRk8xq1n0Vb5yP2wLtA")
            })
        });
    }
    g.finish();
}

fn conversation(c: &mut Criterion) {
    let config = Config::embedded_default().unwrap_or_else(|e| panic!("the default config: {e}"));
    let bot = Arc::new(Bot::from_config(&config.bots[0], "k".into(), 1));
    let retained = config.channel.max_retained_activities;
    let activity_json = serde_json::json!({
        "type": "message", "id": "Zc3mRk8xq1n0Vb5yP2wLtA|0000001", "timestamp": "2026-11-28T00:00:00.000Z",
        "channelId": "directline", "conversation": { "id": "Zc3mRk8xq1n0Vb5yP2wLtA" },
        "from": { "id": "helpdesk", "name": "Contoso Helpdesk", "role": "bot" },
        "text": "To reset your password, go to https://passwordreset.contoso.example and follow the steps.",
    })
    .to_string();
    let conv = Conversation::new(
        Arc::from("Zc3mRk8xq1n0Vb5yP2wLtA"),
        bot,
        ConversationMeter::unmetered(),
        NOW_MS,
        Retention { activities: retained, bytes: config.channel.max_retained_bytes },
    );
    // A full log, as in a long conversation: appends also evict.
    for _ in 0..retained {
        conv.append(NOW_MS, 0, |_, _| activity_json.clone());
    }
    let mut g = c.benchmark_group("conversation");
    configure(&mut g);
    g.throughput(Throughput::Elements(1));
    g.bench_function(BenchmarkId::new("append", format!("{retained}_retained")), |b| {
        b.iter(|| conv.append(NOW_MS, 0, |_, _| activity_json.clone()))
    });
    g.bench_function(BenchmarkId::new("activities_since", "last_3"), |b| {
        b.iter(|| conv.activities_since(black_box(conv.watermark() - 3), Page::ALL))
    });
    g.finish();
}

fn big_plan() -> CapacityPlan {
    CapacityPlan {
        subscriptions: vec![SubscriptionConfig {
            kind: SubscriptionKind::TenantLicense,
            quantity: 1,
            start: chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap_or_default(),
            end: None,
        }],
        // The pool caps capacity at 2^40 - 1: more draws than any benchmark makes.
        per_license: 1 << 40,
        per_addon: 0,
        trial_capacity: 0,
        trials: Vec::new(),
        policy: CapacityPolicy::Reject,
        alerts: None,
    }
}

fn metering(c: &mut Criterion) {
    let mut g = c.benchmark_group("metering");
    configure(&mut g);
    let month = month_of(NOW_MS);

    g.throughput(Throughput::Elements(1));
    let pool = TenantPool::new("contoso", big_plan(), month, 0);
    g.bench_function(BenchmarkId::new("try_draw", "1_thread"), |b| {
        b.iter(|| pool.try_draw(black_box(NOW_MS)))
    });

    // One iteration = one draw on each of two threads at once (the CAS contends).
    g.throughput(Throughput::Elements(2));
    let pool = TenantPool::new("contoso", big_plan(), month, 0);
    g.bench_function(BenchmarkId::new("try_draw", "2_threads_contending"), |b| {
        b.iter_custom(|iters| {
            let barrier = Barrier::new(3);
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        barrier.wait();
                        for _ in 0..iters {
                            black_box(pool.try_draw(black_box(NOW_MS)));
                        }
                        barrier.wait();
                    });
                }
                barrier.wait();
                let start = Instant::now();
                barrier.wait();
                start.elapsed()
            })
        })
    });

    g.throughput(Throughput::Elements(1));
    let rate = RateLimit::new(u32::MAX);
    g.bench_function(BenchmarkId::new("rate_limit_take", "under_limit"), |b| {
        b.iter(|| rate.take(black_box(NOW_MS)))
    });

    let rules = SessionRules { idle_ms: 30 * 60_000, max_ms: 60 * 60_000, max_turns: 100 };
    let mut open = SessionState::default();
    open.begin(NOW_MS);
    g.bench_function(BenchmarkId::new("session_decide", "continuing_turn"), |b| {
        b.iter(|| {
            // SessionState is Copy: every iteration decides the same second turn.
            let mut s = black_box(open);
            s.decide(&rules, black_box(NOW_MS + 1000), true)
        })
    });
    g.finish();
}

const SCRAPE_BOTS: usize = 100_000;

fn scrape(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("a temporary folder: {e}"));
    let config = Config::embedded_default().unwrap_or_else(|e| panic!("the default config: {e}"));
    let store: SharedStore =
        Arc::new(SqliteStore::open(dir.path()).unwrap_or_else(|e| panic!("the store: {e}")));
    let clock: SharedClock = Arc::new(SystemClock);
    let metering = Metering::start(&config, clock, store, None).unwrap_or_else(|e| panic!("metering: {e}"));
    let bots: Vec<String> = (0..SCRAPE_BOTS).map(|i| format!("bot-{i:06}")).collect();
    for b in &bots {
        metering.counters("contoso", b);
    }
    // No cap below the bot count: the writer writes every series, like the registry does.
    let collector = UsageCollector::new(metering, usize::MAX, Box::new(|| 0));

    let registry = prometheus::Registry::new();
    let vec = |name: &str, help: &str, labels: &[&str]| {
        let v = prometheus::IntCounterVec::new(prometheus::Opts::new(name, help), labels)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        registry.register(Box::new(v.clone())).unwrap_or_else(|e| panic!("{name}: {e}"));
        v
    };
    let billed = vec("botgate_billed_sessions_total", "Billed sessions begun, per bot.", &["tenant", "bot"]);
    let turns = vec("botgate_turns_total", "User turns, per bot.", &["tenant", "bot"]);
    let overage = vec("botgate_overage_sessions_total", "Overage sessions, per bot.", &["tenant", "bot"]);
    let rejected = vec(
        "botgate_sessions_rejected_total",
        "Messages refused, per bot and reason.",
        &["tenant", "bot", "reason"],
    );
    for b in &bots {
        billed.with_label_values(&["contoso", b]);
        turns.with_label_values(&["contoso", b]);
        overage.with_label_values(&["contoso", b]);
        rejected.with_label_values(&["contoso", b, "capacity"]);
        rejected.with_label_values(&["contoso", b, "rate_limit"]);
    }
    let prometheus_encode = || {
        let mut buf = Vec::with_capacity(64 << 20);
        let families = registry.gather();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &families, &mut buf)
            .unwrap_or_else(|e| panic!("encode: {e}"));
        buf
    };
    let writer_encode = || {
        let mut out = String::new();
        collector.write(&mut out);
        out
    };
    // Same series on both sides: count the bot sample lines once, outside the timing.
    let series = |text: &str| text.lines().filter(|l| l.contains("bot=\"")).count();
    let (a, b) = (writer_encode(), prometheus_encode());
    let (sa, sb) = (series(&a), series(std::str::from_utf8(&b).unwrap_or_default()));
    assert_eq!(sa, sb, "both sides must expose the same series");
    eprintln!("scrape: {sa} series per side ({} bytes writer, {} bytes prometheus)", a.len(), b.len());

    let mut g = c.benchmark_group("scrape");
    g.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500)).sample_size(10);
    g.throughput(Throughput::Elements(SCRAPE_BOTS as u64));
    g.bench_function(BenchmarkId::new("usage_collector", SCRAPE_BOTS), |b| b.iter(writer_encode));
    g.bench_function(BenchmarkId::new("prometheus_intcountervec", SCRAPE_BOTS), |b| {
        b.iter(prometheus_encode)
    });
    g.finish();
}

criterion_group!(benches, token, activity_parse_stamp, conversation, metering, scrape);
criterion_main!(benches);
