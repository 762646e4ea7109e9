//! The official Web Chat (npm `botframework-webchat`) in a real browser (Debian's headless
//! Chromium, driven by npm `playwright-core`), against the real server: a page on another origin
//! fetches a token from the bot's open token endpoint, renders Web Chat, and a user types two
//! questions into its send box; the built-in bot's greeting and answers appear in Web Chat's
//! transcript, in polling and in WebSocket mode. A user attaches a file through Web Chat's file
//! input, and the SDK bot behind the gateway fetches it and answers with its SHA-256. `scripts/test.sh` installs Chromium and
//! `tests/node/install.sh` the npm packages (pinned in `tests/node/package-lock.json`); this test
//! runs the latter itself.

mod common;

use common::node::{node_dir, start_echo_bot};
use common::*;
use serde_json::Value;
use sha2::Digest;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

const GREETING: &str = "Contoso helpdesk bot";
const VPN: &str = "Install the Contoso VPN client";
const HOURS: &str = "Monday to Friday";

/// `webchat.js` against `s` with `args` (after the gateway's); its one JSON line, which must say
/// it succeeded.
async fn webchat(s: &TestServer, args: &[&str]) -> Value {
    let out = tokio::process::Command::new("node")
        .arg(node_dir().join("webchat.js"))
        .args(["--gateway", s.url("").trim_end_matches('/')])
        .args(args)
        .args(["--timeout-ms", "30000"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|_| panic!("stdout {stdout:?} stderr {}", String::from_utf8_lossy(&out.stderr)));
    assert!(out.status.success(), "{v}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
    v
}

async fn chat(s: &TestServer, page_port: u16, mode: &str) -> Value {
    let port = page_port.to_string();
    let v = webchat(
        s,
        &[
            "--bot",
            "helpdesk",
            "--page-port",
            &port,
            "--mode",
            mode,
            "--expect-greeting",
            GREETING,
            "--say",
            "How do I get VPN access?",
            "--expect",
            VPN,
            "--say",
            "And your opening hours?",
            "--expect",
            HOURS,
        ],
    )
    .await;
    // Web Chat rendered the greeting, then each question and its answer, in order.
    let t = v["transcript"].as_str().unwrap();
    let at = |text: &str| t.find(text).unwrap_or_else(|| panic!("{text:?} not in the transcript: {t}"));
    assert!(at(GREETING) < at("How do I get VPN access?"), "{t}");
    assert!(at("How do I get VPN access?") < at(VPN), "{t}");
    assert!(at(VPN) < at("And your opening hours?"), "{t}");
    assert!(at("And your opening hours?") < at(HOURS), "{t}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_chat_in_a_browser_talks_to_a_builtin_bot() {
    let status =
        std::process::Command::new("bash").arg(node_dir().join("install.sh")).status().expect("bash");
    assert!(status.success(), "tests/node/install.sh failed");
    let (polling_port, ws_port) = (free_port(), free_port());
    // Only the two pages' origins may call the channel for this bot (CORS, checked by Chromium).
    let s = TestServer::with(|c| {
        let bot = c.bots.iter_mut().find(|b| b.id == "helpdesk").unwrap();
        bot.allowed_origins =
            vec![format!("http://127.0.0.1:{polling_port}"), format!("http://127.0.0.1:{ws_port}")];
    })
    .await;

    let polling = chat(&s, polling_port, "polling").await;
    assert_eq!(polling["websockets"], 0, "{polling}");
    assert!(polling["polls"].as_u64().unwrap() >= 1, "{polling}");

    let ws = chat(&s, ws_port, "websocket").await;
    assert!(ws["websockets"].as_u64().unwrap() >= 1, "{ws}");

    // Two questions in one conversation begin one billed session; two conversations, two.
    let m = s.metrics().await;
    assert_eq!(
        metric(&m, r#"botgate_billed_sessions_total{tenant="contoso",bot="helpdesk"}"#),
        Some(2),
        "{m}"
    );
    assert_eq!(metric(&m, r#"botgate_turns_total{tenant="contoso",bot="helpdesk"}"#), Some(4), "{m}");
}

/// A page on an origin the bot does not allow cannot even get a token (403), and Web Chat never
/// renders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_chat_on_an_origin_the_bot_does_not_allow_gets_nothing() {
    let status =
        std::process::Command::new("bash").arg(node_dir().join("install.sh")).status().expect("bash");
    assert!(status.success(), "tests/node/install.sh failed");
    let s = TestServer::with(|c| {
        let bot = c.bots.iter_mut().find(|b| b.id == "helpdesk").unwrap();
        bot.allowed_origins = vec!["https://www.contoso.example".into()];
    })
    .await;
    let out = tokio::process::Command::new("node")
        .arg(node_dir().join("webchat.js"))
        .args(["--gateway", s.url("").trim_end_matches('/'), "--bot", "helpdesk"])
        .args(["--page-port", &free_port().to_string(), "--mode", "polling", "--expect-greeting", GREETING])
        .args(["--timeout-ms", "5000"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap();
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["title"], "token failed 403", "the token request was refused: {v}");
    let m = s.metrics().await;
    assert_eq!(metric(&m, r#"botgate_billed_sessions_total{tenant="contoso",bot="helpdesk"}"#), Some(0));
}

/// A file attached in Web Chat (its upload button's file input, `setInputFiles`) reaches an SDK
/// bot: Web Chat uploads it, the bot fetches the attachment's `contentUrl` from the gateway and
/// answers with its size and SHA-256, which Web Chat renders and which match the file's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_attached_in_web_chat_reaches_the_sdk_bot_intact() {
    let echo = start_echo_bot();
    let page_port = free_port();
    let s = TestServer::with(|c| {
        echo.add_to(c);
        c.bots.last_mut().unwrap().allowed_origins = vec![format!("http://127.0.0.1:{page_port}")];
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("invoice.pdf");
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_246_822_519) >> 11) as u8).collect();
    std::fs::write(&file, &bytes).unwrap();
    let sha = hex(&sha2::Sha256::digest(&bytes));
    let (port, expect) = (page_port.to_string(), format!("invoice.pdf 200000 {sha}"));
    let v = webchat(
        &s,
        &[
            "--bot",
            "up",
            "--page-port",
            &port,
            "--mode",
            "websocket",
            "--say",
            "hello",
            "--expect",
            "Echo: hello",
            "--upload",
            file.to_str().unwrap(),
            "--expect",
            &expect,
        ],
    )
    .await;
    assert_eq!((v["uploads"].as_u64(), v["uploadRequests"].as_u64()), (Some(1), Some(1)), "{v}");
    let m = s.metrics().await;
    assert_eq!(metric(&m, r#"botgate_uploads_total{outcome="stored"}"#), Some(1), "{m}");
    assert_eq!(metric(&m, "botgate_upload_bytes_stored"), Some(200_000));
    assert_eq!(metric(&m, r#"botgate_billed_sessions_total{tenant="contoso",bot="up"}"#), Some(1));
    assert_eq!(metric(&m, r#"botgate_turns_total{tenant="contoso",bot="up"}"#), Some(2));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
