//! `botgate-load`: drives virtual users through whole Direct Line 3.0 conversations against a
//! running botgate, reports throughput, latency percentiles (HDR histogram), errors by status and
//! code, server CPU time per request and memory per conversation, then checks that the server's
//! billed-session counter moved by exactly what the load's own schedule implies.
//!
//! Layout:
//! - `main.rs`: the command line, the run's orchestration and the final report.
//! - `http.rs`: the HTTP client (hyper-util legacy client, keep-alive pool, TCP_NODELAY).
//! - `flow.rs`: one conversation: token, start, messages (polling or WebSocket), idle.
//! - `stats.rs`: counters, HDR histograms, errors by kind, the progress line.
//! - `probe.rs`: the server side: `/proc/<pid>` CPU time and RSS, `/metrics` scraping.

mod flow;
mod http;
mod probe;
mod stats;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use tokio::sync::Semaphore;

use flow::{Ctx, LaneClock};
use stats::Stats;

/// How the client reads the bot's replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// `GET .../activities?watermark=W` after each message until the reply is there.
    Polling,
    /// The conversation's `streamUrl` WebSocket (ActivitySet frames, empty keep-alive frames).
    Ws,
}

/// What `--rate` counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RateOf {
    /// Messages per second, spread over `--concurrency` lanes (wrk2's model: each lane sends on
    /// a fixed schedule; latency is measured from the scheduled send time).
    Messages,
    /// Conversations started per second, each an independent task (capped by `--max-in-flight`);
    /// setup latency is measured from the scheduled start.
    Conversations,
}

/// What the message text triggers in the built-in bot, which decides the expected billing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TopicKind {
    /// A user topic: the first message of a conversation (and every 101st) begins a billed session.
    User,
    /// A system topic (Fallback, Greeting...): never begins a billed session.
    System,
}

/// Load generator for botgate: whole Direct Line conversations, closed or open loop, with an
/// exact billed-session check at the end.
///
/// Closed loop (default): `--concurrency` virtual users each run conversations back to back.
/// Open loop: `--rate R` schedules work at R per second whatever the server's speed, and measures
/// latency from the scheduled time (no coordinated omission). The run always ends by itself: at
/// `--duration` or after `--conversations`, whichever comes first; conversations in progress then
/// finish (closed loop, conversation rate) or stop at their next unscheduled message (message rate).
///
/// Report: throughput; latency percentiles (HDR histograms, microseconds) of `message` (from
/// when the message was due until its reply was read), `setup` (token + start, + WebSocket
/// connect) and, in open loop, `late` (the generator's own timer oversleep, which is excluded
/// from `message`); errors by step, status and error code; with --server-pid, the server's CPU
/// time per HTTP request and per message and its RSS before and after; the billed-session check.
/// The last line, `summary key=value ...`, is for scripts (benches/load.sh).
///
/// Exit status: 0 when the billed-session check passes (or is skipped with --no-check) and at
/// most `--max-error-share` of the HTTP requests failed; 1 when the check fails or more requests
/// failed; 2 on a usage or set-up error, or when nothing succeeded (target unreachable).
#[derive(Parser, Debug, Clone)]
#[command(version)]
pub struct Args {
    /// Public base URL of the botgate under test.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub target: String,
    /// Admin base URL (for `/metrics`), read before and after the run for the billing check.
    #[arg(long, default_value = "http://127.0.0.1:9464")]
    pub admin: String,
    /// The open bot to talk to (its website token endpoint is used, no secret needed).
    #[arg(long, default_value = "helpdesk")]
    pub bot: String,
    /// Tenant label to match in `/metrics` (empty: any tenant of the bot).
    #[arg(long, default_value = "contoso")]
    pub tenant: String,
    /// How replies are read.
    #[arg(long, value_enum, default_value_t = Transport::Polling)]
    pub transport: Transport,
    /// Messages each conversation sends (0: only get a token and start the conversation).
    #[arg(long, short = 'k', default_value_t = 5)]
    pub messages: u32,
    /// The text of every message.
    #[arg(long, default_value = "I forgot my password")]
    pub text: String,
    /// What `--text` triggers, for the expected billing: `user` bills ceil(K/100) sessions per
    /// conversation, `system` bills none.
    #[arg(long, value_enum, default_value_t = TopicKind::User)]
    pub topic: TopicKind,
    /// Closed loop: virtual users. Open loop with `--rate-of messages`: lanes (conversations in
    /// flight at once, each sending at rate/lanes).
    #[arg(long, short = 'c', default_value_t = 16)]
    pub concurrency: usize,
    /// Open loop: the target rate per second (of `--rate-of`). Absent: closed loop.
    #[arg(long, short = 'r')]
    pub rate: Option<f64>,
    /// What `--rate` counts.
    #[arg(long, value_enum, default_value_t = RateOf::Messages)]
    pub rate_of: RateOf,
    /// Open loop by conversations: most conversations in flight; a start beyond it waits (and the
    /// wait shows in the setup latency).
    #[arg(long, default_value_t = 10_000)]
    pub max_in_flight: usize,
    /// Stop starting conversations after this many seconds.
    #[arg(long, short = 'd', default_value_t = 10.0)]
    pub duration: f64,
    /// Stop after starting this many conversations (whichever of this and --duration comes first).
    #[arg(long, short = 'n')]
    pub conversations: Option<u64>,
    /// Pause between a reply and the next message of a conversation, in milliseconds (closed loop).
    #[arg(long, default_value_t = 0)]
    pub think_ms: u64,
    /// Hold each conversation this many seconds after its last message (WebSocket: the socket
    /// stays open, sending an empty keep-alive frame every --keepalive-secs).
    #[arg(long, default_value_t = 0.0)]
    pub idle: f64,
    /// WebSocket keep-alive period while idle, in seconds.
    #[arg(long, default_value_t = 15.0)]
    pub keepalive_secs: f64,
    /// Timeout of one HTTP request or WebSocket connect, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    /// How long to wait for the bot's reply to a message, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub reply_timeout: f64,
    /// Most HTTP requests in flight at once (bounds the client's connections; WebSockets are not
    /// counted).
    #[arg(long, default_value_t = 512)]
    pub max_connections: usize,
    /// Client runtime worker threads (default: the CPUs this process may run on).
    #[arg(long)]
    pub threads: Option<usize>,
    /// The server's process id: report its CPU time per request (utime+stime from
    /// /proc/PID/stat) and its resident memory before and after (VmRSS from /proc/PID/status).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Skip the billed-session check (e.g. against a server whose bot has other traffic).
    #[arg(long)]
    pub no_check: bool,
    /// No progress line.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// The share of HTTP requests that may fail (0 to 1) before the run fails (exit 1).
    #[arg(long, default_value_t = 0.01)]
    pub max_error_share: f64,
}

impl Args {
    fn validate(&self) -> Result<(), String> {
        if self.concurrency == 0 {
            return Err("--concurrency must be at least 1".into());
        }
        if let Some(r) = self.rate
            && !(r.is_finite() && r > 0.0)
        {
            return Err("--rate must be a positive number".into());
        }
        if !(self.duration.is_finite() && self.duration > 0.0) {
            return Err("--duration must be a positive number of seconds".into());
        }
        for (name, v) in [
            ("--idle", self.idle),
            ("--timeout", self.timeout),
            ("--reply-timeout", self.reply_timeout),
            ("--keepalive-secs", self.keepalive_secs),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{name} must be a non-negative number of seconds"));
            }
        }
        if self.max_connections == 0 || self.max_in_flight == 0 {
            return Err("--max-connections and --max-in-flight must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.max_error_share) {
            return Err("--max-error-share must be between 0 and 1".into());
        }
        if self.conversations == Some(0) {
            return Err("--conversations must be at least 1".into());
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.validate() {
        eprintln!("botgate-load: {e}");
        return ExitCode::from(2);
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(t) = args.threads {
        rt.worker_threads(t.max(1));
    }
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("botgate-load: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    rt.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let args = Arc::new(args);
    let http = http::Http::new(args.max_connections, Duration::from_secs_f64(args.timeout));
    let admin = args.admin.trim_end_matches('/').to_string();
    let check = !args.no_check;
    let before = if check {
        match probe::scrape(&http, &admin, &args.tenant, &args.bot).await {
            Ok(m) => Some(m),
            Err(e) => {
                eprintln!("botgate-load: cannot read {admin}/metrics before the run: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let server = args.server_pid.map(probe::ServerSample::take);
    let stats = Arc::new(Stats::new());
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.duration);
    let ctx = Arc::new(Ctx {
        http: http.clone(),
        target: args.target.trim_end_matches('/').to_string(),
        args: args.clone(),
        stats: stats.clone(),
        deadline,
        budget: AtomicU64::new(args.conversations.unwrap_or(u64::MAX)),
    });

    let done = Arc::new(AtomicBool::new(false));
    let progress = (!args.quiet).then(|| {
        let (stats, done, pid) = (stats.clone(), done.clone(), args.server_pid);
        let tty = std::io::stderr().is_terminal();
        tokio::spawn(async move { stats::progress(stats, done, start, pid, tty).await })
    });

    match args.rate {
        None => closed_loop(&ctx).await,
        Some(rate) if args.rate_of == RateOf::Messages => open_loop_messages(&ctx, rate, start).await,
        Some(rate) => open_loop_conversations(&ctx, rate, start).await,
    }
    let elapsed = start.elapsed();
    done.store(true, Ordering::Relaxed);
    if let Some(p) = progress {
        let _ = p.await;
    }
    let server_after = args.server_pid.map(probe::ServerSample::take);

    let report = stats.report(elapsed);
    println!("{report}");
    let (msgs, reqs) = (stats.messages_ok(), stats.http_requests());
    let mut summary = format!(
        "summary transport={:?} mode={} elapsed_s={:.3} conversations={} messages_ok={} msgs_per_s={:.1} http_reqs={} reqs_per_s={:.1} errors={} p50_us={} p99_us={} p999_us={} max_us={} late_p99_us={} p99_begins_us={} p99_others_us={}",
        args.transport,
        match args.rate {
            None => "closed".to_string(),
            Some(r) => format!("open-{:?}-{r}", args.rate_of).to_lowercase(),
        },
        elapsed.as_secs_f64(),
        stats.conversations_started(),
        msgs,
        msgs as f64 / elapsed.as_secs_f64(),
        reqs,
        reqs as f64 / elapsed.as_secs_f64(),
        stats.errors_total(),
        stats.message_quantile(0.5),
        stats.message_quantile(0.99),
        stats.message_quantile(0.999),
        stats.message_quantile(1.0),
        stats.lateness_quantile(0.99),
        stats.begins_quantile(0.99),
        stats.continues_quantile(0.99),
    );
    if let (Some(a), Some(b)) = (server, server_after) {
        let cpu_us = b.cpu_us.saturating_sub(a.cpu_us);
        println!(
            "server   cpu {:.3} s over {:.3} s ({:.0}% of one core); per HTTP request {:.1} us; per message {:.1} us",
            cpu_us as f64 / 1e6,
            elapsed.as_secs_f64(),
            cpu_us as f64 / 1e4 / elapsed.as_secs_f64(),
            cpu_us as f64 / reqs.max(1) as f64,
            cpu_us as f64 / msgs.max(1) as f64,
        );
        let convs = stats.conversations_started().max(1);
        let rss_delta = b.rss_kib as i64 - a.rss_kib as i64;
        println!(
            "server   rss {} KiB -> {} KiB (delta {} KiB; {:.0} bytes per conversation started)",
            a.rss_kib,
            b.rss_kib,
            rss_delta,
            rss_delta as f64 * 1024.0 / convs as f64
        );
        summary.push_str(&format!(
            " server_cpu_us={cpu_us} cpu_us_per_req={:.2} cpu_us_per_msg={:.2} rss_before_kib={} rss_after_kib={} rss_bytes_per_conv={:.0}",
            cpu_us as f64 / reqs.max(1) as f64,
            cpu_us as f64 / msgs.max(1) as f64,
            a.rss_kib,
            b.rss_kib,
            rss_delta as f64 * 1024.0 / convs as f64
        ));
    }

    // What the schedule implies, for scripts that check several generators' sum against a
    // shared ledger (benches/cluster.sh); a range when some messages' fate is unknown.
    let (lo, hi) = stats.expected_billed(args.topic);
    summary.push_str(&format!(" billed_expected={lo} billed_expected_max={hi}"));
    let mut code = ExitCode::SUCCESS;
    if let Some(before) = before {
        match probe::scrape(&http, &admin, &args.tenant, &args.bot).await {
            Ok(after) => {
                let got = after.billed.saturating_sub(before.billed);
                println!(
                    "server   metrics delta: billed_sessions {} turns {} rejected {}",
                    got,
                    after.turns.saturating_sub(before.turns),
                    after.rejected.saturating_sub(before.rejected)
                );
                let pass = (lo..=hi).contains(&got);
                let expected = if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo}..={hi} (some messages' fate unknown)")
                };
                println!(
                    "billing  {}: botgate_billed_sessions_total{{bot=\"{}\"}} moved by {got}; the schedule implies {expected}",
                    if pass { "PASS" } else { "FAIL" },
                    args.bot
                );
                summary
                    .push_str(&format!(" billed_delta={got} billing={}", if pass { "PASS" } else { "FAIL" }));
                if !pass {
                    code = ExitCode::FAILURE;
                }
            }
            Err(e) => {
                println!("billing  FAIL: cannot read {admin}/metrics after the run: {e}");
                code = ExitCode::FAILURE;
            }
        }
    }
    let errors = stats.errors_total();
    // Nothing got through: every conversation failed and no message was answered.
    if errors > 0 && msgs == 0 && errors >= stats.conversations_started() {
        println!(
            "target   FAIL: every conversation failed against {}: {errors} errors (is it listening? see the errors above)",
            ctx.target
        );
        code = ExitCode::from(2);
    } else if errors as f64 > args.max_error_share * reqs.max(1) as f64 {
        println!(
            "errors   FAIL: {errors} errors in {reqs} HTTP requests, more than --max-error-share {}",
            args.max_error_share
        );
        if code == ExitCode::SUCCESS {
            code = ExitCode::FAILURE;
        }
    }
    println!("{summary}");
    code
}

/// Closed loop: each user runs whole conversations back to back until the bounds.
async fn closed_loop(ctx: &Arc<Ctx>) {
    let users: Vec<_> = (0..ctx.args.concurrency)
        .map(|_| {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                while ctx.claim() {
                    flow::conversation(&ctx, None, Instant::now()).await;
                }
            })
        })
        .collect();
    for u in users {
        let _ = u.await;
    }
}

/// Open loop by messages: `lanes` lanes, lane `l` sending the messages scheduled at
/// `start + (l + j * lanes) / rate`; a lane runs conversations back to back.
async fn open_loop_messages(ctx: &Arc<Ctx>, rate: f64, start: Instant) {
    let lanes = ctx.args.concurrency;
    let tasks: Vec<_> = (0..lanes)
        .map(|l| {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let mut clock = LaneClock::new(start, rate, lanes, l, ctx.deadline);
                while !clock.finished() && ctx.claim() {
                    flow::conversation(&ctx, Some(&mut clock), Instant::now()).await;
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

/// Open loop by conversations: conversation `i` is scheduled at `start + i / rate`, each its own
/// task, at most `--max-in-flight` at once.
async fn open_loop_conversations(ctx: &Arc<Ctx>, rate: f64, start: Instant) {
    let limit = Arc::new(Semaphore::new(ctx.args.max_in_flight));
    let mut tasks = tokio::task::JoinSet::new();
    let mut i: u64 = 0;
    loop {
        let scheduled = start + Duration::from_secs_f64(i as f64 / rate);
        if scheduled >= ctx.deadline {
            break;
        }
        tokio::time::sleep_until(scheduled.into()).await;
        if !ctx.claim() {
            break;
        }
        let Ok(permit) = limit.clone().acquire_owned().await else { break };
        let ctx = ctx.clone();
        tasks.spawn(async move {
            flow::conversation(&ctx, None, scheduled).await;
            drop(permit);
        });
        // Reap finished tasks as we go so the set does not grow with the whole run.
        while tasks.try_join_next().is_some() {}
        i += 1;
    }
    while tasks.join_next().await.is_some() {}
}
