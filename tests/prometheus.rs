//! What operators load into Prometheus and Grafana, against `promtool` and the real exposition:
//! `config/prometheus/botgate.rules.yml` passes `promtool check rules` and its unit tests (series
//! that fire each alert and series that must not), `scrape.yml` passes `promtool check config`,
//! and every query of the rules and of `config/grafana/botgate.json` is valid PromQL naming only
//! metrics a real server exports (one node on SQLite, and one on Redis for the cluster families).

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use botgate::config::StoreBackend;
use common::*;
use serde_json::Value;

fn config_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config")
}

fn promtool(args: &[&str], dir: &std::path::Path) -> String {
    let out = std::process::Command::new("promtool").args(args).current_dir(dir).output().expect("promtool");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// The metric names an exposition declares (`# TYPE`), with a histogram's series names.
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) = (w.next(), w.next(), w.next(), w.next()) {
            names.insert(name.to_string());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

/// The `botgate_...` names a query uses.
fn used(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("botgate_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(config_dir().join("grafana/botgate.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).unwrap();
    let mut exprs: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_string())
        })
        .collect();
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            // `label_values(metric, label)` is Grafana's; its metric is what Prometheus must have.
            let metric = q.trim_start_matches("label_values(").split(',').next().unwrap().trim();
            exprs.push(metric.to_string());
        }
    }
    exprs
}

fn rule_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(config_dir().join("prometheus/botgate.rules.yml")).unwrap();
    // The rules file's `expr:` values (block scalars), without a YAML parser: each block is the
    // lines indented deeper than its `expr:` key.
    let lines: Vec<&str> = text.lines().collect();
    let mut exprs = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let Some(pos) = l.find("expr:") else { continue };
        let inline = l[pos + 5..].trim();
        if inline != "|" {
            exprs.push(inline.to_string());
            continue;
        }
        let body: Vec<&str> = lines[i + 1..]
            .iter()
            .take_while(|b| b.len() > pos && b[..=pos].trim().is_empty())
            .copied()
            .collect();
        exprs.push(body.join("\n"));
    }
    assert!(exprs.len() >= 6, "{exprs:?}");
    exprs
}

#[test]
fn the_rules_pass_promtool_and_their_unit_tests_and_the_scrape_config_is_valid() {
    let dir = config_dir().join("prometheus");
    let checked = promtool(&["check", "rules", "botgate.rules.yml"], &dir);
    assert!(checked.contains("SUCCESS: 9 rules found"), "{checked}");
    promtool(&["test", "rules", "botgate.rules.test.yml"], &dir);
    promtool(&["check", "config", "scrape.yml"], &dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_and_dashboard_name_only_exported_metrics_in_valid_promql() {
    // One node on SQLite, after a conversation, so every per-bot family has a series.
    let s = TestServer::start().await;
    let (token, conv, _) = s.conversation("helpdesk").await;
    s.say_ok(&token, &conv, "my vpn is broken").await;
    let mut names = exported(&s.metrics().await);
    // One node on Redis: the cluster families.
    let redis = RedisServer::start();
    let url = redis.url();
    let node = TestServer::with(|c| {
        c.store.backend = StoreBackend::Redis;
        c.store.redis_url = url.clone();
    })
    .await;
    names.extend(exported(&node.metrics().await));
    assert!(names.contains("botgate_cluster_heartbeat_timestamp_seconds"), "{names:?}");

    let dashboard = dashboard_exprs();
    let rules = rule_exprs();
    for expr in dashboard.iter().chain(&rules) {
        let unknown: Vec<_> = used(expr).into_iter().filter(|n| !names.contains(n)).collect();
        assert!(unknown.is_empty(), "{expr}\nnames metrics botgate does not export: {unknown:?}");
    }
    // Every dashboard query parses as PromQL: promtool checks them as recording rules.
    let dir = tempfile::tempdir().unwrap();
    let mut file = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in dashboard.iter().enumerate() {
        file.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(expr).unwrap()
        ));
    }
    std::fs::write(dir.path().join("dashboard.rules.yml"), file).unwrap();
    promtool(&["check", "rules", "dashboard.rules.yml"], dir.path());
}
