//! Direct Line upload against the real server: raw and multipart uploads reach the bot as
//! attachments whose `contentUrl` serves the same bytes; every limit holds and a refused upload
//! holds nothing; files leave with their conversation (and at restart); a message refused by
//! metering keeps no file and bills nothing.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn upload_url(s: &TestServer, conv: &str) -> String {
    s.url(&format!("/v3/directline/conversations/{conv}/upload?userId=dl_user"))
}

/// One file as the raw body.
async fn raw(
    s: &TestServer,
    token: &str,
    conv: &str,
    name: &str,
    ct: &str,
    bytes: Vec<u8>,
) -> reqwest::Response {
    s.http
        .post(upload_url(s, conv))
        .bearer_auth(token)
        .header("content-type", ct)
        .header("content-disposition", format!("attachment; filename=\"{name}\""))
        .body(bytes)
        .send()
        .await
        .unwrap()
}

/// A multipart form as DirectLineJS sends it: an activity part, then `file` parts.
async fn form(
    s: &TestServer,
    token: &str,
    conv: &str,
    activity: Option<Value>,
    files: &[(&str, &str, Vec<u8>)],
) -> reqwest::Response {
    let mut f = reqwest::multipart::Form::new();
    if let Some(a) = activity {
        let part = reqwest::multipart::Part::text(a.to_string())
            .mime_str("application/vnd.microsoft.activity")
            .unwrap();
        f = f.part("activity", part);
    }
    for (name, ct, bytes) in files {
        let part =
            reqwest::multipart::Part::bytes(bytes.clone()).file_name(name.to_string()).mime_str(ct).unwrap();
        f = f.part("file", part);
    }
    s.http.post(upload_url(s, conv)).bearer_auth(token).multipart(f).send().await.unwrap()
}

async fn ok_id(res: reqwest::Response) -> String {
    let status = res.status();
    let v: Value = res.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    v["id"].as_str().unwrap().to_string()
}

/// The activity with `id` in the conversation's log.
async fn activity(s: &TestServer, token: &str, conv: &str, id: &str) -> Value {
    let log = s.poll(token, conv, None).await;
    log["activities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("{id} not in {log}"))
}

/// The texts of the bot's replies to `id`.
async fn replies_to(s: &TestServer, token: &str, conv: &str, id: &str) -> Vec<String> {
    let log = s.poll(token, conv, None).await;
    log["activities"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["replyToId"] == id)
        .map(|a| a["text"].as_str().unwrap_or("").to_string())
        .collect()
}

fn stored(m: &str) -> u64 {
    metric(m, "botgate_upload_bytes_stored").unwrap()
}

fn files_on_disk(s: &TestServer) -> usize {
    std::fs::read_dir(s.dir.path().join("data").join("uploads")).map_or(0, |d| d.count())
}

/// Bytes that are not text, so nothing on the way may treat them as such.
fn binary_bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[tokio::test]
async fn a_raw_upload_reaches_a_builtin_bot_and_its_file_is_served() {
    let s = TestServer::start().await;
    let (token, conv, _) = s.conversation("helpdesk").await;
    let bytes = binary_bytes(70_000, 7);
    let id = ok_id(raw(&s, &token, &conv, "screen shot.png", "image/png", bytes.clone()).await).await;

    let a = activity(&s, &token, &conv, &id).await;
    assert_eq!(a["type"], "message");
    assert_eq!(a["from"]["id"], "dl_user");
    let att = &a["attachments"][0];
    assert_eq!(att["contentType"], "image/png");
    assert_eq!(att["name"], "screen shot.png");
    let url = att["contentUrl"].as_str().unwrap();
    assert!(url.starts_with(&s.url(&format!("/v3/directline/attachments/{conv}/"))), "{url}");
    assert_eq!(replies_to(&s, &token, &conv, &id).await, ["Thank you, I received screen shot.png."]);

    // The URL needs no credential (a bot or an <img> fetches it) and serves the same bytes.
    let res = reqwest::get(url).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "image/png");
    assert_eq!(
        res.headers()["content-disposition"],
        "attachment; filename=\"screen shot.png\"; filename*=UTF-8''screen%20shot.png"
    );
    assert_eq!(res.headers()["x-content-type-options"], "nosniff");
    assert_eq!(res.bytes().await.unwrap().as_ref(), &bytes[..]);

    // A file is a user turn: one billed session, one turn.
    let m = s.metrics().await;
    assert_eq!(metric(&m, r#"botgate_billed_sessions_total{tenant="contoso",bot="helpdesk"}"#), Some(1));
    assert_eq!(metric(&m, r#"botgate_turns_total{tenant="contoso",bot="helpdesk"}"#), Some(1));
    assert_eq!(stored(&m), 70_000);
    assert_eq!(metric(&m, r#"botgate_uploads_total{outcome="stored"}"#), Some(1));
    assert_eq!(files_on_disk(&s), 1);
}

#[tokio::test]
async fn a_multipart_upload_attaches_its_files_to_its_activity() {
    let s = TestServer::start().await;
    let (token, conv, _) = s.conversation("helpdesk").await;
    let (a_bytes, b_bytes) = (binary_bytes(1000, 1), b"name,qty\nvpn,1\n".to_vec());
    // As DirectLineJS sends it: the files listed without a URL (their places), and a card kept.
    let card = json!({"contentType": "application/vnd.microsoft.card.hero", "content": {"title": "t"}});
    let activity_part = json!({
        "type": "message", "from": {"id": "dl_user"}, "text": "vpn", "channelData": {"k": 1},
        "attachments": [{"contentType": "application/pdf", "name": "a.pdf"}, card, {"contentType": "text/csv", "name": "b.csv"}],
    });
    let files = [("a.pdf", "application/pdf", a_bytes.clone()), ("b.csv", "text/csv", b_bytes.clone())];
    let id = ok_id(form(&s, &token, &conv, Some(activity_part), &files).await).await;

    let a = activity(&s, &token, &conv, &id).await;
    assert_eq!(a["text"], "vpn");
    assert_eq!(a["channelData"]["k"], 1, "the activity part is kept whole: {a}");
    let atts = a["attachments"].as_array().unwrap();
    assert_eq!(atts.len(), 3, "{a}");
    assert_eq!(atts[0], card);
    for (att, (name, ct, bytes)) in atts[1..].iter().zip(&files) {
        assert_eq!(att["name"], *name);
        assert_eq!(att["contentType"], *ct);
        let got = reqwest::get(att["contentUrl"].as_str().unwrap()).await.unwrap().bytes().await.unwrap();
        assert_eq!(got.as_ref(), &bytes[..]);
    }
    // The files are acknowledged, then the words answered.
    let replies = replies_to(&s, &token, &conv, &id).await;
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_eq!(replies[0], "Thank you, I received a.pdf, b.csv.");
    assert!(replies[1].contains("Install the Contoso VPN client"), "{replies:?}");

    // Without an activity part, the files make a message of their own; the session continues.
    let id2 = ok_id(form(&s, &token, &conv, None, &[("c.txt", "text/plain", b"hello".to_vec())]).await).await;
    let a2 = activity(&s, &token, &conv, &id2).await;
    assert_eq!(a2["from"]["id"], "dl_user", "the query's userId: {a2}");
    // An activity part whose `from` has no id takes the query's too.
    let nameless = json!({"type": "message", "from": {"name": "Ann"}});
    let id3 =
        ok_id(form(&s, &token, &conv, Some(nameless), &[("d.txt", "text/plain", b"x".to_vec())]).await).await;
    let a3 = activity(&s, &token, &conv, &id3).await;
    assert_eq!(
        (a3["from"]["id"].as_str(), a3["from"]["name"].as_str()),
        (Some("dl_user"), Some("Ann")),
        "{a3}"
    );
    assert_eq!(a2["attachments"].as_array().unwrap().len(), 1);
    let m = s.metrics().await;
    assert_eq!(metric(&m, r#"botgate_billed_sessions_total{tenant="contoso",bot="helpdesk"}"#), Some(1));
    assert_eq!(metric(&m, r#"botgate_turns_total{tenant="contoso",bot="helpdesk"}"#), Some(3));
    assert_eq!(stored(&m), 1000 + b_bytes.len() as u64 + 5 + 1);
}

/// A chunked body over the limit, written by hand (no `Content-Length` to refuse it early).
async fn chunked_upload(s: &TestServer, token: &str, conv: &str, total: usize) -> String {
    let mut tcp = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    let head = format!(
        "POST /v3/directline/conversations/{conv}/upload?userId=dl_user HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {token}\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'a'; 8192];
    let mut sent = 0;
    while sent < total {
        let frame = [format!("{:x}\r\n", chunk.len()).into_bytes(), chunk.clone(), b"\r\n".to_vec()].concat();
        if tcp.write_all(&frame).await.is_err() {
            break;
        }
        sent += chunk.len();
    }
    let _ = tcp.write_all(b"0\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

#[tokio::test]
async fn every_upload_limit_holds_and_a_refused_upload_holds_nothing() {
    const MAX: usize = 64 * 1024;
    let s = TestServer::with(|c| {
        c.channel.max_upload_bytes = MAX;
        c.channel.max_upload_files = 2;
        c.channel.max_upload_bytes_per_conversation = 2 * MAX;
        c.channel.max_upload_bytes_per_bot = 3 * MAX;
        c.channel.max_upload_bytes_stored = 3 * MAX;
        c.channel.upload_content_types = vec!["image/*".into(), "text/plain".into()];
    })
    .await;
    let (token, conv, _) = s.conversation("helpdesk").await;
    let part = MAX / 2 + 1000;

    // Over the per-upload limit: 413, by Content-Length and chunked alike.
    assert_error(
        raw(&s, &token, &conv, "big.png", "image/png", vec![0; MAX + 1]).await,
        413,
        "PayloadTooLarge",
    )
    .await;
    let answer = chunked_upload(&s, &token, &conv, MAX + 16 * 1024).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // A content type off the allow-list: 415, matched without case or parameters otherwise.
    assert_error(
        raw(&s, &token, &conv, "x.pdf", "application/pdf", vec![1; 10]).await,
        415,
        "UnsupportedMediaType",
    )
    .await;
    assert_error(
        form(&s, &token, &conv, None, &[("x.exe", "application/x-msdownload", vec![1; 10])]).await,
        415,
        "UnsupportedMediaType",
    )
    .await;
    // Too many files; no file; no userId; no content type; a part that is neither.
    let three =
        [("a.png", "image/png", vec![1]), ("b.png", "image/png", vec![2]), ("c.png", "image/png", vec![3])];
    assert_error(form(&s, &token, &conv, None, &three).await, 400, "TooManyFiles").await;
    assert_error(
        form(&s, &token, &conv, Some(json!({"type": "message", "from": {"id": "dl_user"}})), &[]).await,
        400,
        "BadRequest",
    )
    .await;
    let res = s
        .http
        .post(s.url(&format!("/v3/directline/conversations/{conv}/upload")))
        .bearer_auth(&token)
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_error(res, 400, "BadRequest").await;
    let res = s.http.post(upload_url(&s, &conv)).bearer_auth(&token).body("x").send().await.unwrap();
    assert_error(res, 400, "BadRequest").await;
    let odd = reqwest::multipart::Form::new().text("other", "x");
    let res = s.http.post(upload_url(&s, &conv)).bearer_auth(&token).multipart(odd).send().await.unwrap();
    assert_error(res, 400, "BadRequest").await;
    // A malformed form and an activity part that is not a message.
    let res = s
        .http
        .post(upload_url(&s, &conv))
        .bearer_auth(&token)
        .header("content-type", "multipart/form-data; boundary=XYZ")
        .body("--XYZ\r\nbroken")
        .send()
        .await
        .unwrap();
    assert_error(res, 400, "BadRequest").await;
    let typing = json!({"type": "typing", "from": {"id": "dl_user"}});
    assert_error(
        form(&s, &token, &conv, Some(typing), &[("a.png", "image/png", vec![1])]).await,
        400,
        "BadRequest",
    )
    .await;
    let m = s.metrics().await;
    assert_eq!(stored(&m), 0, "nothing refused is held");
    assert_eq!(files_on_disk(&s), 0);
    assert_eq!(
        metric(&m, r#"botgate_turns_total{tenant="contoso",bot="helpdesk"}"#),
        Some(0),
        "no refused upload is a turn"
    );

    // The conversation's budget, 2 × MAX: it holds MAX + part, and one more MAX is refused whole.
    ok_id(raw(&s, &token, &conv, "p.png", "image/png", vec![1; part]).await).await;
    ok_id(raw(&s, &token, &conv, "q.png", "image/png", vec![2; MAX - part]).await).await;
    ok_id(raw(&s, &token, &conv, "r.png", "image/png", vec![3; part]).await).await;
    let in_conv = MAX + part;
    assert_error(
        raw(&s, &token, &conv, "s.png", "image/png", vec![4; MAX]).await,
        413,
        "UploadBudgetExceeded",
    )
    .await;
    assert_eq!(stored(&s.metrics().await), in_conv as u64);

    // The bot's budget (3 × MAX over all its conversations): a second conversation fills it to
    // 10 bytes short, then a two-file upload that does not fit keeps neither file: 503, with
    // Retry-After.
    let (token2, conv2, _) = s.conversation("helpdesk").await;
    let room = 3 * MAX - in_conv;
    ok_id(raw(&s, &token2, &conv2, "t.png", "image/png", vec![5; MAX]).await).await;
    ok_id(raw(&s, &token2, &conv2, "u.png", "image/png", vec![6; room - 10 - MAX]).await).await;
    let res = form(
        &s,
        &token2,
        &conv2,
        None,
        &[("v.png", "image/png", vec![7; 5]), ("w.png", "image/png", vec![8; 20])],
    )
    .await;
    assert!(res.headers().contains_key("retry-after"));
    assert_error(res, 503, "Overloaded").await;
    let m = s.metrics().await;
    assert_eq!(stored(&m), (3 * MAX - 10) as u64);
    assert_eq!(files_on_disk(&s), 5);
    assert_eq!(metric(&m, r#"botgate_uploads_total{outcome="stored"}"#), Some(5));
    // Refused in the handler: the chunked 413, two 415s, six malformed uploads, the two budgets
    // (the 413 by Content-Length is refused before it).
    assert_eq!(metric(&m, r#"botgate_uploads_total{outcome="refused"}"#), Some(12));
}

#[tokio::test]
async fn files_leave_with_their_conversation_and_at_restart() {
    // Idle shorter than a token's life, so the token can start the conversation again.
    let s = TestServer::with(|c| c.channel.idle_timeout_secs = 600).await;
    let (token, conv, _) = s.conversation("helpdesk").await;
    let id = ok_id(raw(&s, &token, &conv, "a.txt", "text/plain", b"one".to_vec()).await).await;
    let url =
        activity(&s, &token, &conv, &id).await["attachments"][0]["contentUrl"].as_str().unwrap().to_string();
    assert_eq!(reqwest::get(&url).await.unwrap().status(), 200);

    // A key made for another conversation, or changed by one character, finds nothing.
    let (_, other, _) = s.conversation("helpdesk").await;
    let key = url.rsplit('/').next().unwrap();
    let foreign = s.url(&format!("/v3/directline/attachments/{other}/{key}"));
    assert_error(reqwest::get(&foreign).await.unwrap(), 404, "NotFound").await;
    let mut changed = url.clone();
    let last = changed.pop().unwrap();
    changed.push(if last == 'A' { 'B' } else { 'A' });
    assert_error(reqwest::get(&changed).await.unwrap(), 404, "NotFound").await;

    // Idle past the conversation's timeout: the URL is gone at once, the bytes at the sweep.
    let idle = s.state().config().channel.idle_timeout_secs;
    s.clock.advance_ms((idle as i64 + 1) * 1000);
    assert_error(reqwest::get(&url).await.unwrap(), 404, "NotFound").await;
    s.state().sweep();
    assert_eq!(files_on_disk(&s), 0);
    assert_eq!(stored(&s.metrics().await), 0);
    // The same token starts the conversation again under the same id: the old file stays gone.
    let res = s.http.post(s.url("/v3/directline/conversations")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(res.status(), 201);
    assert_error(reqwest::get(&url).await.unwrap(), 404, "NotFound").await;

    // A file of a conversation that a restart ended is removed at the next start.
    let (token, conv, _) = s.conversation("helpdesk").await;
    ok_id(raw(&s, &token, &conv, "b.txt", "text/plain", b"two".to_vec()).await).await;
    assert_eq!(files_on_disk(&s), 1);
    let (dir, clock) = s.stop().await;
    let s = TestServer::in_dir(dir, clock, |_| {}).await;
    assert_eq!(files_on_disk(&s), 0);
    assert_eq!(stored(&s.metrics().await), 0);
}

#[tokio::test]
async fn memory_storage_keeps_files_off_the_disk() {
    let s = TestServer::with(|c| c.channel.upload_storage = botgate::config::UploadStorage::Memory).await;
    let (token, conv, _) = s.conversation("helpdesk").await;
    let bytes = binary_bytes(5000, 3);
    let id = ok_id(raw(&s, &token, &conv, "m.png", "image/png", bytes.clone()).await).await;
    let url =
        activity(&s, &token, &conv, &id).await["attachments"][0]["contentUrl"].as_str().unwrap().to_string();
    assert_eq!(reqwest::get(&url).await.unwrap().bytes().await.unwrap().as_ref(), &bytes[..]);
    assert!(!s.dir.path().join("data").join("uploads").exists());
    assert_eq!(stored(&s.metrics().await), 5000);
}

#[tokio::test]
async fn an_upload_refused_by_metering_keeps_no_file_and_bills_nothing() {
    let s = TestServer::with(|c| c.metering.tenant_license_sessions = 1).await;
    let (token, conv, _) = s.conversation("helpdesk").await;
    ok_id(raw(&s, &token, &conv, "a.txt", "text/plain", b"first".to_vec()).await).await;
    // The month's one session is taken: a second conversation's file is refused before the bot
    // sees it, and nothing of it is held.
    let (token2, conv2, _) = s.conversation("helpdesk").await;
    let res = raw(&s, &token2, &conv2, "b.txt", "text/plain", b"second".to_vec()).await;
    assert_error(res, 429, "CapacityExhausted").await;
    let m = s.metrics().await;
    assert_eq!(stored(&m), 5);
    assert_eq!(files_on_disk(&s), 1);
    assert_eq!(metric(&m, r#"botgate_billed_sessions_total{tenant="contoso",bot="helpdesk"}"#), Some(1));
    let log = s.poll(&token2, &conv2, None).await;
    assert!(log["activities"].as_array().unwrap().iter().all(|a| a["attachments"].is_null()), "{log}");
}

#[tokio::test]
async fn attachment_replies_are_configurable_through_the_authoring_api() {
    let s = TestServer::start().await;
    let alice = s.token_of("contoso", "alice", false);
    let bot = json!({
        "id": "files",
        "name": "Files",
        "kind": "builtin",
        "topics": [{"name": "Fallback", "kind": "system", "system": "fallback", "replies": ["Sorry?"]}],
        "attachment_reply": "Got {{count}} file(s): {{names}}",
    });
    let res = s.http.post(s.url("/api/v1/bots")).bearer_auth(&alice).json(&bot).send().await.unwrap();
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
    let res = s.http.post(s.url("/api/v1/bots/files/publish")).bearer_auth(&alice).send().await.unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    let (token, conv, _) = s.conversation("files").await;
    let files = [("a.png", "image/png", vec![1]), ("b.png", "image/png", vec![2])];
    let id = ok_id(form(&s, &token, &conv, None, &files).await).await;
    assert_eq!(replies_to(&s, &token, &conv, &id).await, ["Got 2 file(s): a.png, b.png"]);

    let patch =
        |body: Value| s.http.patch(s.url("/api/v1/bots/files")).bearer_auth(&alice).json(&body).send();
    assert_error(patch(json!({"attachment_reply": " "})).await.unwrap(), 400, "BadRequest").await;
    let res = patch(json!({"attachment_reply": "Files: {{names}}"})).await.unwrap();
    assert_eq!(res.status(), 200);
    // Conversations keep the bot they started with; a new one has the edit.
    let (token, conv, _) = s.conversation("files").await;
    let id = ok_id(raw(&s, &token, &conv, "c.png", "image/png", vec![3]).await).await;
    assert_eq!(replies_to(&s, &token, &conv, &id).await, ["Files: c.png"]);
}

/// Uploads read at once are capped (`channel.max_concurrent_uploads`): while one is being read,
/// the next is 503 before its body is read; once it is stored, the next is taken.
#[tokio::test]
async fn uploads_read_at_once_are_capped() {
    let s = TestServer::with(|c| c.channel.max_concurrent_uploads = 1).await;
    let (token, conv, _) = s.conversation("helpdesk").await;
    let mut slow = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    let head = format!(
        "POST /v3/directline/conversations/{conv}/upload?userId=dl_user HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {token}\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n"
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&[b'a'; 10]).await.unwrap();
    // The slow upload holds the one place as soon as its handler runs.
    let mut refused = false;
    for _ in 0..200 {
        let res = raw(&s, &token, &conv, "b.txt", "text/plain", b"fast".to_vec()).await;
        if res.status() == 503 {
            assert_eq!(res.headers()["retry-after"], "5");
            assert_error(res, 503, "Overloaded").await;
            refused = true;
            break;
        }
        // Taken before the slow one's handler ran: that is a stored file; try again.
        assert_eq!(res.status(), 200);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(refused, "a second upload was refused while the first was read");
    slow.write_all(&[b'a'; 990]).await.unwrap();
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut answer)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"));
    ok_id(raw(&s, &token, &conv, "c.txt", "text/plain", b"after".to_vec()).await).await;
}
