//! The foundation through the real server: health, readiness, the JSON error bodies, config
//! checks, start-up failures, request ids, HTTP metrics, and graceful shutdown.

mod common;

use std::process::Command;

use common::*;

#[tokio::test]
async fn health_and_readiness() {
    let s = TestServer::start().await;
    let res = s.http.get(format!("{}/healthz", s.admin)).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = s.http.get(format!("{}/readyz", s.admin)).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<serde_json::Value>().await.unwrap()["status"], "ready");
}

#[tokio::test]
async fn error_bodies_are_json_with_stable_codes() {
    let s = TestServer::start().await;
    assert_error(s.http.get(s.url("/no/such/route")).send().await.unwrap(), 404, "NotFound").await;
    let res = s.http.delete(s.url("/v3/directline/conversations")).send().await.unwrap();
    assert!(res.headers().contains_key("x-request-id"));
    assert_error(res, 405, "MethodNotAllowed").await;
    assert_error(s.http.post(format!("{}/metrics", s.admin)).send().await.unwrap(), 405, "MethodNotAllowed")
        .await;

    let (token, conv, _) = s.conversation("helpdesk").await;
    let url = s.url(&format!("/v3/directline/conversations/{conv}/activities"));
    let big = format!(r#"{{"type":"message","from":{{"id":"u"}},"text":"{}"}}"#, "x".repeat(300 * 1024));
    let res = s
        .http
        .post(&url)
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_error(res, 413, "PayloadTooLarge").await;
    let res = s
        .http
        .post(&url)
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_error(res, 400, "BadRequest").await;
}

#[tokio::test]
async fn every_response_has_a_request_id_and_routes_are_counted_by_template() {
    let s = TestServer::start().await;
    let (token, conv, _) = s.conversation("helpdesk").await;
    let res = s.say(&token, &conv, "vpn").await;
    let id = res.headers().get("x-request-id").unwrap().to_str().unwrap().to_string();
    let other = s.say(&token, &conv, "vpn").await;
    assert_ne!(other.headers()["x-request-id"].to_str().unwrap(), id, "ids are unique");
    let res = s.http.get(s.url("/nope")).header("x-request-id", "mine-1").send().await.unwrap();
    assert_eq!(res.headers()["x-request-id"], "mine-1");
    let m = s.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"botgate_http_requests_total{route="/v3/directline/conversations/{id}/activities",status="2xx"}"#
        ),
        Some(2),
        "{m}"
    );
    assert_eq!(metric(&m, r#"botgate_http_requests_total{route="unmatched",status="4xx"}"#), Some(1));
    assert!(!m.contains(&conv), "raw ids never become labels");
}

#[test]
fn check_config_accepts_the_default_and_names_the_broken_key() {
    let out = Command::new(binary()).args(["check-config", "config/default.toml"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[channel]\ntoken_ttl_secs = 0\n").unwrap();
    let out = Command::new(binary()).arg("check-config").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("channel.token_ttl_secs"), "{err}");

    std::fs::write(&bad, "[server]\nlisten = \"127.0.0.1:0\"\nlisten_port = 8\n").unwrap();
    let out = Command::new(binary()).arg("check-config").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen_port"));
}

#[test]
fn check_config_refuses_what_would_fail_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let refused = |text: &str, key: &str| {
        std::fs::write(&bad, text).unwrap();
        let out = Command::new(binary()).arg("check-config").arg(&bad).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "{text}: {err}");
        assert!(err.contains(key), "{text}: {err}");
    };
    refused(
        "[server]\nlisten = \"127.0.0.1:8080\"\nadmin_listen = \"127.0.0.1:8080\"\n",
        "server.admin_listen",
    );
    refused(
        "[identity]\nalgorithms = [\"RS256\"]\njwks_file = \"/nonexistent/keys.json\"\n",
        "identity.jwks_file",
    );
    std::fs::write(dir.path().join("keys.json"), "not json").unwrap();
    let jwks = dir.path().join("keys.json").display().to_string();
    refused(&format!("[identity]\nalgorithms = [\"RS256\"]\njwks_file = \"{jwks}\"\n"), "identity.jwks_file");
    refused(
        "[[tenants]]\nid = \"t\"\nsubscriptions = [{ kind = \"user_licenses\", quantity = 1 }]\nlicensed_users = [\"a\", \"b\"]\n",
        "tenants[0].licensed_users",
    );
}

#[test]
fn serve_refuses_a_broken_config_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[bots]]\nid = \"b\"\ntenant = \"nobody\"\nname = \"B\"\nkind = \"upstream\"\nendpoint = \"http://127.0.0.1:1/\"\n").unwrap();
    let out =
        Command::new(binary()).arg("--config").arg(&bad).args(["--listen", "127.0.0.1:0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bots[0].tenant"), "{err}");
    assert!(out.stdout.is_empty(), "no listening line on failure");
}

#[test]
fn a_data_folder_that_cannot_be_written_fails_start_up_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let out = Command::new(binary())
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--data-dir"])
        .arg(file.join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot use the data folder"), "{err}");
}

#[test]
fn env_overrides_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary())
        .env("BOTGATE_LISTEN", "127.0.0.1:0")
        .env("BOTGATE_ADMIN_LISTEN", "127.0.0.1:0")
        .env("BOTGATE_DATA_DIR", dir.path().join("d"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut server = common::BinaryServer {
        child: out,
        public: "0.0.0.0:0".parse().unwrap(),
        admin: "0.0.0.0:0".parse().unwrap(),
    };
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(server.child.stdout.take().unwrap()), &mut line)
        .unwrap();
    assert!(line.starts_with("botgate listening public=127.0.0.1:"), "{line}");
    assert!(!line.contains(":8080"));
    assert!(dir.path().join("d").join("botgate.sqlite3").exists());
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_and_exits_zero() {
    let (bot, calls) = slow_bot(800).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, upstream_config_toml(&format!("http://{bot}/api/messages"), "")).unwrap();
    let mut server = BinaryServer::spawn(&["--config", cfg.to_str().unwrap()], &dir.path().join("data"));
    let base = format!("http://{}", server.public);
    let http = reqwest::Client::new();
    let v: serde_json::Value = http
        .get(format!("{base}/api/v1/bots/up/directline/token"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = v["token"].as_str().unwrap().to_string();
    let conv = v["conversationId"].as_str().unwrap().to_string();
    let res =
        http.post(format!("{base}/v3/directline/conversations")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(res.status(), 201);
    let send = {
        let http = http.clone();
        let url = format!("{base}/v3/directline/conversations/{conv}/activities");
        let token = token.clone();
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth(token)
                .json(&serde_json::json!({"type":"message","from":{"id":"u"},"text":"hi"}))
                .send()
                .await
        })
    };
    // The message is at the bot (in flight) when SIGTERM arrives.
    while calls.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    server.signal("-TERM");
    let res = send.await.unwrap().unwrap();
    assert_eq!(res.status(), 200, "the in-flight request completed");
    let status = tokio::task::spawn_blocking(move || server.child.wait().unwrap()).await.unwrap();
    assert_eq!(status.code(), Some(0));
}

/// `botgate-load` fails loudly: exit 2 when nothing got through (nothing listens on the
/// target), 1 when more than `--max-error-share` of its requests failed, even with a passing
/// billed-session check.
#[tokio::test]
async fn the_load_generator_fails_when_requests_fail() {
    let load = env!("CARGO_BIN_EXE_botgate-load");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let out = Command::new(load)
        .args(["--target", &dead, "--no-check", "--quiet", "--duration", "1", "--concurrency", "2"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("target   FAIL"), "{text}");

    // Every message past the first of each minute is 429: the check passes, the run fails.
    let s = TestServer::with(|c| c.metering.rate_limit_per_minute = 1).await;
    let out = tokio::process::Command::new(load)
        .args(["--target", &s.base, "--admin", &s.admin, "--bot", "helpdesk", "--quiet"])
        .args(["--duration", "1", "--conversations", "20", "--concurrency", "2", "--text", "vpn"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("billing  PASS"), "{text}");
    assert!(text.contains("errors   FAIL"), "{text}");
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(Command::new(load).arg("-h").output().unwrap().stdout.starts_with(b"Load generator for botgate"));
}

/// `botgate token` resolves the data folder as `botgate` does and says when it had to create
/// the development key; a server on that folder accepts its token.
#[tokio::test]
async fn botgate_token_says_when_it_creates_a_key_and_a_server_on_that_folder_accepts_it() {
    let dir = tempfile::tempdir().unwrap();
    let token = |expect_note: bool| {
        let out = Command::new(binary())
            .current_dir(dir.path())
            .env_remove("BOTGATE_DATA_DIR")
            .env_remove("BOTGATE_CONFIG")
            .args(["token", "--tenant", "contoso", "--user", "alice"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(err.contains("created a new development key at"), expect_note, "{err}");
        if expect_note {
            assert!(err.contains(&dir.path().display().to_string()), "names the folder: {err}");
        }
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let first = token(true);
    let second = token(false);
    assert!(!first.is_empty() && !second.is_empty());
    let server = BinaryServer::spawn(&[], &dir.path().join("data"));
    let res = reqwest::Client::new()
        .get(format!("http://{}/api/v1/me", server.public))
        .bearer_auth(&second)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    server.signal("-TERM");
}

/// Logs written to a file or a pipe carry no terminal colour codes.
#[test]
fn logs_off_a_terminal_are_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
    let mut child = Command::new(binary())
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line)
        .unwrap();
    assert!(line.starts_with("botgate listening "), "{line}");
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    child.wait().unwrap();
    let text = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap();
    assert!(text.contains("INFO"), "the log has lines: {text}");
    assert!(!text.contains('\u{1b}'), "no escape codes: {text:?}");
}
