//! The server side of the measurement: CPU time and resident memory from `/proc/<pid>`, and the
//! usage counters from the admin listener's `/metrics`.

use std::sync::OnceLock;

use http::{Method, StatusCode};

use crate::http::Http;

/// One reading of the server process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerSample {
    /// utime + stime, in microseconds (resolution: one clock tick, usually 10 ms).
    pub cpu_us: u64,
    /// VmRSS, in KiB.
    pub rss_kib: u64,
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 when that fails).
fn clk_tck() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

impl ServerSample {
    /// Reads `/proc/<pid>/stat` and `/proc/<pid>/status` (zeros when they cannot be read).
    pub fn take(pid: u32) -> Self {
        let cpu_us = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                // Fields after the command name, which is in parentheses and may hold spaces:
                // state is the 1st, utime the 12th, stime the 13th (fields 14 and 15 of proc(5)).
                let rest = &s[s.rfind(')')? + 1..];
                let f: Vec<&str> = rest.split_whitespace().collect();
                let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
                Some(ticks * 1_000_000 / clk_tck())
            })
            .unwrap_or(0);
        let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
                line.split_whitespace().nth(1)?.parse().ok()
            })
            .unwrap_or(0);
        Self { cpu_us, rss_kib }
    }
}

/// The bot's usage counters as `/metrics` shows them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Scraped {
    /// `botgate_billed_sessions_total`.
    pub billed: u64,
    /// `botgate_turns_total`.
    pub turns: u64,
    /// `botgate_sessions_rejected_total`, all reasons.
    pub rejected: u64,
}

/// Reads `admin/metrics` and sums the bot's series (of `tenant`, unless empty).
pub async fn scrape(http: &Http, admin: &str, tenant: &str, bot: &str) -> Result<Scraped, String> {
    let url = format!("{admin}/metrics");
    let a = http.send(Method::GET, &url, None, None).await.map_err(|f| f.key().to_string())?;
    if a.status != StatusCode::OK {
        return Err(format!("status {}", a.status));
    }
    let text = std::str::from_utf8(&a.body).map_err(|_| "the body is not UTF-8".to_string())?;
    let sum = |name: &str| sum_series(text, name, tenant, bot);
    let billed = sum("botgate_billed_sessions_total")
        .ok_or_else(|| format!("no botgate_billed_sessions_total series for bot {bot:?}"))?;
    Ok(Scraped {
        billed,
        turns: sum("botgate_turns_total").unwrap_or(0),
        rejected: sum("botgate_sessions_rejected_total").unwrap_or(0),
    })
}

/// Sums the values of `name{...}` lines whose `bot` label is `bot` (and `tenant` is `tenant`,
/// unless empty); `None` when no line matches.
fn sum_series(text: &str, name: &str, tenant: &str, bot: &str) -> Option<u64> {
    let mut total = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name).and_then(|r| r.strip_prefix('{')) else { continue };
        let Some((labels, value)) = rest.rsplit_once("} ") else { continue };
        // Label values here are ids (no commas or quotes), so a plain split is enough.
        let label = |k: &str| {
            labels.split(',').find_map(|kv| kv.strip_prefix(k)?.strip_prefix("=\"")?.strip_suffix('"'))
        };
        if label("bot") != Some(bot) || (!tenant.is_empty() && label("tenant") != Some(tenant)) {
            continue;
        }
        let v: f64 = value.trim().parse().ok()?;
        *total.get_or_insert(0) += v as u64;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_bots_series() {
        let text = "# HELP x\n\
            botgate_billed_sessions_total{tenant=\"contoso\",bot=\"helpdesk\"} 7\n\
            botgate_billed_sessions_total{tenant=\"contoso\",bot=\"other\"} 3\n\
            botgate_sessions_rejected_total{tenant=\"contoso\",bot=\"helpdesk\",reason=\"capacity\"} 2\n\
            botgate_sessions_rejected_total{tenant=\"contoso\",bot=\"helpdesk\",reason=\"rate_limit\"} 5\n";
        assert_eq!(sum_series(text, "botgate_billed_sessions_total", "contoso", "helpdesk"), Some(7));
        assert_eq!(sum_series(text, "botgate_billed_sessions_total", "", "other"), Some(3));
        assert_eq!(sum_series(text, "botgate_billed_sessions_total", "fabrikam", "helpdesk"), None);
        assert_eq!(sum_series(text, "botgate_sessions_rejected_total", "contoso", "helpdesk"), Some(7));
    }
}
