//! The real clients and bots: a Bot Framework SDK echo bot (npm `botbuilder`) as an upstream,
//! driven through botgate by the official Direct Line JS client (npm `botframework-directlinejs`)
//! in polling and in WebSocket mode. The packages are pinned in `tests/node/package-lock.json`
//! and installed by `tests/node/install.sh` (`npm ci`), which this test runs itself.

mod common;

use common::node::{node_dir, start_echo_bot, start_echo_bot_with};
use common::*;
use serde_json::Value;

async fn drive(s: &TestServer, bot: &str, mode: &str) -> Value {
    let (token, _) = s.open_token(bot).await;
    run_client(&s.url("/v3/directline"), &token, mode, None, &[]).await
}

/// `directline-client.js` against `domain` with `token`; `ca`: a certificate file Node trusts;
/// `attach`: `FILE:TYPE` of files every message carries.
async fn run_client(
    domain: &str,
    token: &str,
    mode: &str,
    ca: Option<&std::path::Path>,
    attach: &[String],
) -> Value {
    let mut cmd = tokio::process::Command::new("node");
    if let Some(ca) = ca {
        cmd.env("NODE_EXTRA_CA_CERTS", ca);
    }
    cmd.arg(node_dir().join("directline-client.js"));
    for a in attach {
        cmd.args(["--attach", a]);
    }
    let out = cmd
        .args(["--domain", domain, "--token", token, "--mode", mode, "--messages", "3"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or("");
    let v: Value = serde_json::from_str(line)
        .unwrap_or_else(|_| panic!("stdout {stdout:?} stderr {}", String::from_utf8_lossy(&out.stderr)));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The client's trace, its last few KB, for a failure.
    let tail = &stderr[stderr.len().saturating_sub(6000)..];
    assert!(out.status.success(), "{v}\n{tail}");
    v
}

#[tokio::test]
async fn official_directline_client_and_sdk_bot_through_botgate() {
    let echo = start_echo_bot();
    let s = TestServer::with(|c| echo.add_to(c)).await;

    let polling = drive(&s, "up", "polling").await;
    assert_eq!(polling["ok"], true);
    assert_eq!(
        (polling["sent"].as_u64(), polling["echoed"].as_u64(), polling["replies"].as_u64()),
        (Some(3), Some(3), Some(3))
    );
    assert_eq!(polling["websockets"], 0);

    let ws = drive(&s, "up", "websocket").await;
    assert_eq!(ws["ok"], true);
    assert_eq!((ws["sent"].as_u64(), ws["replies"].as_u64()), (Some(3), Some(3)));
    assert!(ws["websockets"].as_u64().unwrap() >= 1, "{ws}");

    // Each conversation began one billed session (an upstream bot bills its first user message).
    let m = s.metrics().await;
    assert_eq!(metric(&m, r#"botgate_billed_sessions_total{tenant="contoso",bot="up"}"#), Some(2), "{m}");
    assert_eq!(metric(&m, r#"botgate_turns_total{tenant="contoso",bot="up"}"#), Some(6));
}

/// The same client over `https://` and `wss://`: the gateway on TLS with a certificate made in
/// the test, trusted by Node through `NODE_EXTRA_CA_CERTS`; the SDK bot calls back over HTTPS.
#[tokio::test]
async fn official_directline_client_over_https_and_wss() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = common::tls::certificate(dir.path(), "gateway");
    let echo = start_echo_bot_with(&[("NODE_EXTRA_CA_CERTS", &cert)]);
    let s = TestServer::with(|c| {
        echo.add_to(c);
        c.server.tls_cert = Some(cert.clone());
        c.server.tls_key = Some(key);
    })
    .await;
    let domain = format!("https://localhost:{}/v3/directline", s.addr().port());
    for mode in ["polling", "websocket"] {
        let (status, t) = common::tls::get_tls(s.addr(), &der, "/api/v1/bots/up/directline/token").await;
        assert_eq!(status, 200, "{t}");
        let v = run_client(&domain, t["token"].as_str().unwrap(), mode, Some(&cert), &[]).await;
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!((v["sent"].as_u64(), v["replies"].as_u64()), (Some(3), Some(3)), "{v}");
        if mode == "websocket" {
            assert!(v["websockets"].as_u64().unwrap() >= 1, "{v}");
        }
    }
}

/// DirectLineJS `postActivity` with attachments: the client uploads two files (multipart, as the
/// library builds it) with each message; the SDK bot fetches each attachment's `contentUrl` from
/// the gateway and its reply names the size and SHA-256 of what it got, which the client checks
/// against the files it sent.
#[tokio::test]
async fn official_directline_client_uploads_files_the_sdk_bot_fetches() {
    let echo = start_echo_bot();
    let s = TestServer::with(|c| echo.add_to(c)).await;
    let dir = tempfile::tempdir().unwrap();
    let png: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(dir.path().join("photo.png"), &png).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "line one\nline two\n").unwrap();
    let attach = [
        format!("{}:image/png", dir.path().join("photo.png").display()),
        format!("{}:text/plain", dir.path().join("notes.txt").display()),
    ];
    for mode in ["polling", "websocket"] {
        let (token, _) = s.open_token("up").await;
        let v = run_client(&s.url("/v3/directline"), &token, mode, None, &attach).await;
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(
            (v["sent"].as_u64(), v["replies"].as_u64(), v["files"].as_u64()),
            (Some(3), Some(3), Some(2))
        );
    }
    // Two conversations, three messages each: two billed sessions, six turns, and every file
    // still held by its conversation.
    let m = s.metrics().await;
    assert_eq!(metric(&m, r#"botgate_billed_sessions_total{tenant="contoso",bot="up"}"#), Some(2), "{m}");
    assert_eq!(metric(&m, r#"botgate_turns_total{tenant="contoso",bot="up"}"#), Some(6));
    assert_eq!(metric(&m, r#"botgate_uploads_total{outcome="stored"}"#), Some(6));
    assert_eq!(metric(&m, "botgate_upload_bytes_stored"), Some(6 * (png.len() as u64 + 18)));
}
