//! TLS on both listeners: a certificate made in the test (`rcgen`), HTTP/1.1 and HTTP/2 by ALPN,
//! `wss://` stream URLs and a WebSocket over TLS, and a SIGHUP reload of the files by the real
//! binary that new handshakes see while an open connection keeps working.

mod common;

use bytes::Bytes;
use common::tls::*;
use common::*;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_listeners_serve_tls_with_http2_by_alpn_and_wss_streams() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = certificate(dir.path(), "a");
    let s = TestServer::with(|c| {
        c.server.tls_cert = Some(cert);
        c.server.tls_key = Some(key);
    })
    .await;
    let admin_addr = s.running.as_ref().unwrap().admin_addr;
    let alice = s.token_of("contoso", "alice", false);

    // HTTP/1.1 by ALPN, on the admin listener.
    let tls = connect(admin_addr, &der, &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    tx.ready().await.unwrap();
    let res = tx.send_request(request("GET", "/healthz", None)).await.unwrap();
    assert_eq!((res.status().as_u16(), res.version()), (200, http::Version::HTTP_11));

    // HTTP/2 by ALPN, to the authoring API: two requests on one connection.
    let tls = connect(s.addr(), &der, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    // A conversation started over HTTP/2 gets a wss:// stream URL of the authority it used.
    tx.ready().await.unwrap();
    let (status, t) =
        body(tx.send_request(request("GET", "/api/v1/bots/helpdesk/directline/token", None)).await.unwrap())
            .await;
    assert_eq!(status, 200);
    let mut start = request("POST", "/v3/directline/conversations", t["token"].as_str());
    start.headers_mut().remove(http::header::HOST);
    tx.ready().await.unwrap();
    let (status, started) = body(tx.send_request(start).await.unwrap()).await;
    assert_eq!(status, 201, "{started}");
    assert!(started["streamUrl"].as_str().unwrap().starts_with("wss://localhost/"), "{started}");
    for _ in 0..2 {
        tx.ready().await.unwrap();
        let res = tx.send_request(request("GET", "/api/v1/me", Some(&alice))).await.unwrap();
        assert_eq!(res.version(), http::Version::HTTP_2);
        let (status, me) = body(res).await;
        assert_eq!((status, me["user"].as_str()), (200, Some("alice")), "{me}");
    }

    // A conversation over HTTP/1.1: its stream URL is wss://, and the WebSocket works over TLS.
    let tls = connect(s.addr(), &der, &[b"http/1.1"]).await;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    tx.ready().await.unwrap();
    let (status, t) =
        body(tx.send_request(request("GET", "/api/v1/bots/helpdesk/directline/token", None)).await.unwrap())
            .await;
    assert_eq!(status, 200);
    let token = t["token"].as_str().unwrap().to_string();
    tx.ready().await.unwrap();
    let (status, started) =
        body(tx.send_request(request("POST", "/v3/directline/conversations", Some(&token))).await.unwrap())
            .await;
    assert_eq!(status, 201, "{started}");
    let stream_url = started["streamUrl"].as_str().unwrap();
    assert!(stream_url.starts_with("wss://localhost/v3/directline/conversations/"), "{stream_url}");
    let ws_tls = connect(s.addr(), &der, &[b"http/1.1"]).await;
    let url = stream_url.replacen("wss://localhost", &format!("wss://localhost:{}", s.addr().port()), 1);
    let (mut ws, _) = tokio_tungstenite::client_async(url, ws_tls).await.unwrap();
    let conv = started["conversationId"].as_str().unwrap();
    let mut say = request("POST", &format!("/v3/directline/conversations/{conv}/activities"), Some(&token));
    *say.body_mut() = Full::new(Bytes::from(r#"{"type":"message","from":{"id":"u"},"text":"vpn"}"#));
    say.headers_mut().insert(http::header::CONTENT_TYPE, "application/json".parse().unwrap());
    tx.ready().await.unwrap();
    let (status, _) = body(tx.send_request(say).await.unwrap()).await;
    assert_eq!(status, 200);
    use futures_util::StreamExt;
    // Frames until one carries the bot's answer (empty frames are keep-alives).
    loop {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Ok(text) = frame.to_text()
            && text.contains("VPN")
        {
            break;
        }
    }
}

/// The real binary on TLS: SIGHUP with new files makes new handshakes present the new
/// certificate, while a connection opened before keeps working; files that do not load leave
/// the current pair serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, first) = certificate(dir.path(), "live");
    let cfg = dir.path().join("botgate.toml");
    let text =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml"))
            .unwrap()
            .replace(
                "[store]",
                &format!(
                    "tls_cert = {:?}\ntls_key = {:?}\n\n[store]",
                    cert.display().to_string(),
                    key.display().to_string()
                ),
            );
    std::fs::write(&cfg, text).unwrap();
    let server = BinaryServer::spawn(&["--config", cfg.to_str().unwrap()], &dir.path().join("data"));
    let old = connect(server.admin, &first, &[b"http/1.1"]).await;
    assert_eq!(presented(&old), first);
    let (mut kept, conn) = hyper::client::conn::http1::handshake(TokioIo::new(old)).await.unwrap();
    tokio::spawn(conn);
    kept.ready().await.unwrap();
    assert_eq!(kept.send_request(request("GET", "/healthz", None)).await.unwrap().status(), 200);

    // A key file that is not a key: the reload fails, the first certificate keeps serving.
    std::fs::write(&key, "not a key").unwrap();
    server.signal("-HUP");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(presented(&connect(server.admin, &first, &[b"http/1.1"]).await), first);

    let (new_cert, new_key, second) = certificate(dir.path(), "next");
    std::fs::rename(&new_cert, &cert).unwrap();
    std::fs::rename(&new_key, &key).unwrap();
    server.signal("-HUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let tls = connect_trusting(server.admin, &[&first, &second], &[b"http/1.1"]).await;
        if presented(&tls) == second {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the new certificate was never presented");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    kept.ready().await.unwrap();
    assert_eq!(
        kept.send_request(request("GET", "/healthz", None)).await.unwrap().status(),
        200,
        "the old connection stays"
    );
}
