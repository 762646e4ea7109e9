//! The usage metrics, written at scrape time straight from the atomics.
//!
//! The hot path keeps no second copy for Prometheus: a scrape reads each bot's counters and
//! writes the text format itself. Per-bot series are bounded by `metrics.max_bot_series`: beyond
//! it the bots with the fewest billed sessions fold into `bot="_other"` of their tenant, so tenant
//! totals stay exact. Writing the text directly (no label maps, no intermediate protobuf
//! families) is what keeps a scrape of 100,000 series cheap: see `benches/hot_path.rs`,
//! group `scrape`, which measures it against the prometheus crate's `IntCounterVec`.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::Metering;
use super::counters::CounterSnapshot;
use crate::bots::flow::Outcome;
use crate::telemetry::registry::ScrapeWriter;

/// The label value bots beyond the series cap fold into.
pub const OTHER_BOT: &str = "_other";

/// Writes the usage families for a [`Metering`], with a live count of conversations.
pub struct UsageCollector {
    metering: Metering,
    max_bot_series: usize,
    active_conversations: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl UsageCollector {
    /// A collector over `metering`, folding beyond `max_bot_series` bots.
    pub fn new(
        metering: Metering,
        max_bot_series: usize,
        active_conversations: Box<dyn Fn() -> u64 + Send + Sync>,
    ) -> Self {
        Self { metering, max_bot_series, active_conversations }
    }
}

struct Row<'a> {
    tenant: &'a str,
    bot: &'a str,
    s: CounterSnapshot,
}

/// A per-bot counter family: name, help, and its value in a snapshot.
type PerBotFamily = (&'static str, &'static str, fn(&CounterSnapshot) -> u64);

impl ScrapeWriter for UsageCollector {
    fn write(&self, out: &mut String) {
        let bots = self.metering.bots();
        let mut rows: Vec<Row<'_>> =
            bots.iter().map(|b| Row { tenant: &b.tenant, bot: &b.bot, s: b.snapshot() }).collect();
        if rows.len() > self.max_bot_series {
            rows = fold(rows, self.max_bot_series);
        }
        out.reserve(rows.len() * 5 * 80 + 1024);
        let per_bot: [PerBotFamily; 3] = [
            ("botgate_billed_sessions_total", "Billed sessions begun, per bot.", |s| s.billed),
            ("botgate_turns_total", "User turns, per bot.", |s| s.turns),
            ("botgate_overage_sessions_total", "Billed sessions served beyond capacity, per bot.", |s| {
                s.overage
            }),
        ];
        for (name, help, value) in per_bot {
            family(out, name, "counter", help);
            for r in &rows {
                line(out, name, r, None, value(&r.s));
            }
        }
        family(
            out,
            "botgate_sessions_rejected_total",
            "counter",
            "Messages refused before the bot saw them, per bot and reason.",
        );
        for r in &rows {
            line(
                out,
                "botgate_sessions_rejected_total",
                r,
                Some(("reason", "capacity")),
                r.s.rejected_capacity,
            );
            line(
                out,
                "botgate_sessions_rejected_total",
                r,
                Some(("reason", "rate_limit")),
                r.s.rejected_rate,
            );
        }
        family(
            out,
            "botgate_flow_runs_total",
            "counter",
            "Topic flow runs, per bot and outcome (billed to nobody); bots that never ran one have no series.",
        );
        for r in rows.iter().filter(|r| r.s.flow_runs() > 0) {
            for outcome in Outcome::ALL {
                let v = r.s.flows[outcome as usize];
                line(out, "botgate_flow_runs_total", r, Some(("outcome", outcome.label())), v);
            }
        }
        let month = self.metering.current_month();
        let mut pools = self.metering.pools();
        pools.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        let gauges = [
            ("botgate_tenant_capacity_sessions", "Billed sessions the tenant may use this month."),
            (
                "botgate_tenant_used_sessions",
                "Billed sessions the tenant used this month (overage excluded).",
            ),
            ("botgate_tenant_remaining_sessions", "Billed sessions left to the tenant this month."),
        ];
        for (i, (name, help)) in gauges.iter().enumerate() {
            family(out, name, "gauge", help);
            for p in &pools {
                let cap = p.capacity(month);
                let used = p.tenant_used(month);
                let v = match i {
                    0 => cap,
                    1 => used,
                    _ => cap.saturating_sub(used),
                };
                let _ = writeln!(out, "{name}{{tenant=\"{}\"}} {v}", Escaped(&p.tenant));
            }
        }
        let d = self.metering.degraded_counts();
        family(
            out,
            "botgate_metering_degraded_total",
            "counter",
            "Metering decisions taken while Redis was unreachable, by kind (several nodes).",
        );
        use std::sync::atomic::Ordering::Relaxed;
        for (reason, v) in [
            ("refused", d.refused.load(Relaxed)),
            ("safe_capacity", d.allowed.load(Relaxed)),
            ("spooled", d.spooled.load(Relaxed)),
        ] {
            let _ = writeln!(out, "botgate_metering_degraded_total{{reason=\"{reason}\"}} {v}");
        }
        if self.metering.leases().is_some() {
            family(
                out,
                "botgate_cluster_heartbeat_timestamp_seconds",
                "gauge",
                "When this node last renewed its leases and registration (Unix time; 0 before the first).",
            );
            let ok_ms = d.heartbeat_ok_ms.load(Relaxed);
            let _ = writeln!(
                out,
                "botgate_cluster_heartbeat_timestamp_seconds {}.{:03}",
                ok_ms / 1000,
                ok_ms % 1000
            );
            family(
                out,
                "botgate_cluster_heartbeat_failures_total",
                "counter",
                "Cluster heartbeats that failed.",
            );
            let _ = writeln!(
                out,
                "botgate_cluster_heartbeat_failures_total {}",
                d.heartbeat_failures.load(Relaxed)
            );
        }
        family(out, "botgate_active_conversations", "gauge", "Conversations held in memory.");
        let _ = writeln!(out, "botgate_active_conversations {}", (self.active_conversations)());
    }
}

/// Keeps the `max` bots with the most billed sessions (ties by name, for a stable set) and sums
/// the rest per tenant into `_other`; `max` includes the `_other` rows.
fn fold(mut rows: Vec<Row<'_>>, max: usize) -> Vec<Row<'_>> {
    rows.sort_by(|a, b| b.s.billed.cmp(&a.s.billed).then_with(|| a.bot.cmp(b.bot)));
    let tenants_of_rest: std::collections::BTreeSet<&str> =
        rows.iter().skip(max.saturating_sub(1)).map(|r| r.tenant).collect();
    let keep = max.saturating_sub(tenants_of_rest.len().min(max)).max(1).min(rows.len());
    let rest = rows.split_off(keep);
    let mut other: BTreeMap<&str, CounterSnapshot> = BTreeMap::new();
    for r in rest {
        let o = other.entry(r.tenant).or_default();
        o.billed += r.s.billed;
        o.overage += r.s.overage;
        o.turns += r.s.turns;
        o.rejected_capacity += r.s.rejected_capacity;
        o.rejected_rate += r.s.rejected_rate;
        for (o, f) in o.flows.iter_mut().zip(r.s.flows) {
            *o += f;
        }
    }
    rows.extend(other.into_iter().map(|(tenant, s)| Row { tenant, bot: OTHER_BOT, s }));
    rows
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One series of a per-bot family, with an optional extra label (`reason`, `outcome`: fixed
/// words, not escaped).
fn line(out: &mut String, name: &str, r: &Row<'_>, label: Option<(&str, &str)>, v: u64) {
    out.push_str(name);
    out.push_str("{tenant=\"");
    let _ = write!(out, "{}", Escaped(r.tenant));
    out.push_str("\",bot=\"");
    let _ = write!(out, "{}", Escaped(r.bot));
    if let Some((label, value)) = label {
        out.push_str("\",");
        out.push_str(label);
        out.push_str("=\"");
        out.push_str(value);
    }
    out.push_str("\"} ");
    out.push_str(itoa::Buffer::new().format(v));
    out.push('\n');
}

/// A label value escaped for the text format (ids are validated, so this rarely does work).
struct Escaped<'a>(&'a str);

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                '\n' => f.write_str("\\n")?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row<'a>(tenant: &'a str, bot: &'a str, billed: u64) -> Row<'a> {
        Row {
            tenant,
            bot,
            s: CounterSnapshot { billed, turns: billed * 2, flows: [0, billed, 0, 0], ..Default::default() },
        }
    }

    #[test]
    fn folding_keeps_totals_and_the_cap() {
        let rows =
            vec![row("t", "a", 5), row("t", "b", 1), row("t", "c", 3), row("u", "d", 2), row("u", "e", 9)];
        let folded = fold(rows, 4);
        assert!(folded.len() <= 4, "{}", folded.len());
        let total: u64 = folded.iter().map(|r| r.s.billed).sum();
        assert_eq!(total, 20);
        let flows: u64 = folded.iter().map(|r| r.s.flows[1]).sum();
        assert_eq!(flows, 20, "flow runs fold into _other like the rest");
        assert_eq!(folded[0].bot, "e");
        let t_total: u64 = folded.iter().filter(|r| r.tenant == "t").map(|r| r.s.billed).sum();
        assert_eq!(t_total, 9);
    }
}
