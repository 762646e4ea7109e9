//! Property-based fuzzing of what strangers and operators feed the gateway: the activity parser
//! and validator, the channel-token decoder, the JWT pre-checks and the config loader. Each
//! input either parses or is refused with a 4xx and a stable code; nothing panics. The last two
//! properties post generated activities and generated upload forms to the real server: never a
//! 5xx, and no uploaded byte held that the log does not point to.

mod common;

use botgate::channel::activity;
use botgate::channel::token::{Claims, TokenSigner};
use botgate::clock::{ManualClock, SharedClock};
use botgate::config::Config;
use botgate::identity::jwt::Verifier;
use proptest::prelude::*;
use serde_json::{Map, Value};

/// Any JSON value, a few levels deep, with the field names an activity uses mixed in.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        ".{0,24}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((field_name(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "type",
            "text",
            "from",
            "id",
            "name",
            "role",
            "locale",
            "attachments",
            "entities",
            "value",
            "channelData",
            "suggestedActions",
            "conversation",
            "recipient",
            "membersAdded",
            "replyToId",
            "textFormat",
            "speak",
            "timestamp",
        ])
        .prop_map(str::to_string),
        "[a-zA-Z]{1,8}",
    ]
}

/// An activity-shaped object: a type (often valid) and generated fields.
fn activity_value() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            prop::sample::select(vec!["message", "typing", "event", "invoke", "endOfConversation", ""])
                .prop_map(|t| Value::String(t.to_string())),
            json_value(),
        ],
        prop::collection::vec((field_name(), json_value()), 0..8),
    )
        .prop_map(|(t, fields)| {
            let mut m: Map<String, Value> = fields.into_iter().collect();
            m.insert("type".into(), t);
            Value::Object(m)
        })
}

fn assert_client_error(e: &botgate::error::ApiError) {
    assert!(e.status.is_client_error(), "{e:?}");
    assert!(!e.code.is_empty() && !e.message.is_empty(), "{e:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_activity_parser_takes_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Err(e) = activity::parse(&bytes) {
            assert_client_error(&e);
        }
    }

    #[test]
    fn the_activity_validator_takes_any_json(v in activity_value()) {
        let bytes = serde_json::to_vec(&v).unwrap();
        match activity::parse(&bytes) {
            Ok(mut a) => {
                // What parses has a string type, and string fields where the schema says so.
                prop_assert!(a.get("type").is_some_and(|t| t.as_str().is_some_and(|t| !t.is_empty())));
                prop_assert!(a.get("text").is_none_or(|t| t.is_string() || t.is_null()));
                // The stamped JSON, written by hand, is the map with the gateway's four fields,
                // as serde_json would write it.
                let stamped = activity::stamp(&a, "c|0000001", 1_000, "c");
                let mut expected = a.clone();
                expected.insert("id".into(), Value::from("c|0000001"));
                expected.insert("timestamp".into(), Value::from("1970-01-01T00:00:01.000Z"));
                expected.insert("channelId".into(), Value::from("directline"));
                expected.insert("conversation".into(), serde_json::json!({"id": "c"}));
                // (Both read back by the same parser: its float rounding is not the writer's.)
                let expected_json = serde_json::to_string(&expected).unwrap();
                prop_assert_eq!(
                    serde_json::from_str::<Value>(&stamped).unwrap(),
                    serde_json::from_str::<Value>(&expected_json).unwrap()
                );
                // What an upstream bot gets: the same with the callback URL and itself added.
                if !a.contains_key("serviceUrl") && !a.contains_key("recipient") {
                    let for_bot = activity::for_bot(&stamped, "http://gw/connector/k", "b\"1", "Bot");
                    let mut expected = expected;
                    expected.insert("serviceUrl".into(), Value::from("http://gw/connector/k"));
                    expected.insert("recipient".into(), serde_json::json!({"id": "b\"1", "name": "Bot", "role": "bot"}));
                    let expected = serde_json::to_string(&expected).unwrap();
                    prop_assert_eq!(
                        serde_json::from_str::<Value>(&for_bot).unwrap(),
                        serde_json::from_str::<Value>(&expected).unwrap()
                    );
                }
                if let Err(e) = activity::set_user(&mut a, Some("dl_user")) {
                    assert_client_error(&e);
                }
            }
            Err(e) => assert_client_error(&e),
        }
    }

    #[test]
    fn the_token_decoder_takes_any_string(s in "(dl1\\.)?[A-Za-z0-9_.=-]{0,200}") {
        let signer = TokenSigner::new(b"fuzz-key");
        prop_assert!(signer.verify(&s, 0).is_err());
    }

    #[test]
    fn a_token_changed_anywhere_is_refused(pos in any::<prop::sample::Index>(), byte in 0x21u8..0x7f) {
        let signer = TokenSigner::new(b"fuzz-key");
        let claims = Claims {
            bot: "helpdesk".into(),
            conversation: "abc".into(),
            user: Some("u".into()),
            exp: 100,
            slot: 0,
            generation: 0,
            instance: String::new(),
            test_chat: false,
            until: 0,
            origins: Vec::new(),
        };
        let token = signer.sign(&claims);
        let mut bytes = token.clone().into_bytes();
        let i = pos.index(bytes.len());
        bytes[i] = byte;
        let changed = String::from_utf8(bytes).unwrap();
        let verdict = signer.verify(&changed, 0);
        if changed == token {
            prop_assert_eq!(verdict.unwrap(), claims);
        } else {
            // base64 without padding may decode a changed last character to the same bytes;
            // then the claims are the same ones, never others.
            if let Ok(c) = verdict {
                prop_assert_eq!(c, claims);
            }
        }
    }

    #[test]
    fn the_jwt_checks_take_any_string(
        s in prop_oneof![
            ".{0,300}",
            "[A-Za-z0-9_-]{0,60}\\.[A-Za-z0-9_-]{0,120}\\.[A-Za-z0-9_-]{0,60}",
        ],
        header in json_value(),
        payload in json_value(),
    ) {
        let config = Config::embedded_default().unwrap();
        let clock: SharedClock = ManualClock::at(common::T0);
        let verifier = Verifier::new(&config.identity, Some(b"dev-key"), clock).unwrap();
        prop_assert!(verifier.verify_uncached(&s, 0).is_err());
        use base64::Engine;
        let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let shaped = format!("{}.{}.c2ln", b64(&header), b64(&payload));
        prop_assert!(verifier.verify_uncached(&shaped, 0).is_err());
    }

    #[test]
    fn the_config_loader_takes_any_edit_of_the_default(
        line in any::<prop::sample::Index>(),
        edit in prop_oneof![
            Just(None),
            ".{0,40}".prop_map(Some),
            prop::sample::select(vec!["= 0", "= -1", "= \"\"", "= []", "= 99999999999999999999", "= true"])
                .prop_map(|s| Some(s.to_string())),
        ],
    ) {
        let text = include_str!("../config/default.toml");
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        let i = line.index(lines.len());
        match edit {
            None => { lines.remove(i); }
            Some(e) if e.starts_with("= ") => {
                if let Some((key, _)) = lines[i].split_once('=') {
                    lines[i] = format!("{key}{e}");
                }
            }
            Some(e) => lines[i] = e,
        }
        // Either a valid configuration or an error naming what is wrong; never a panic.
        if let Err(e) = Config::from_str(&lines.join("\n"), "fuzz.toml") {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}

/// Generated activities posted to the real server: each answer is 200 or a 4xx with a code.
#[test]
fn generated_activities_through_the_server_never_get_a_5xx() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let s = rt.block_on(common::TestServer::with(|c| c.metering.rate_limit_per_minute = 1_000_000));
    let (token, conv, _) = rt.block_on(s.conversation("helpdesk"));
    let url = s.url(&format!("/v3/directline/conversations/{conv}/activities"));
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&activity_value(), |v| {
            let (status, body) = rt.block_on(async {
                let res = s.http.post(&url).bearer_auth(&token).json(&v).send().await.unwrap();
                (res.status(), res.text().await.unwrap())
            });
            prop_assert!(status == 200 || status.is_client_error(), "{status}: {body} for {v}");
            if status != 200 {
                let e: Value = serde_json::from_str(&body).unwrap();
                prop_assert!(e["error"]["code"].as_str().is_some_and(|c| !c.is_empty()), "{body}");
            }
            Ok(())
        })
        .unwrap();
}

/// One part of a generated upload form: its name, content type, file name and body.
type FormPart = (String, Option<String>, Option<String>, Vec<u8>);

fn form_part() -> impl Strategy<Value = FormPart> {
    // Weighted toward well-formed file parts, so that both sides are reached in every run.
    let name = prop_oneof![
        6 => Just("file".to_string()),
        1 => Just("activity".to_string()),
        1 => prop::sample::select(vec!["other", "", "fi\"le"]).prop_map(String::from),
    ];
    let ct = prop_oneof![
        6 => prop::sample::select(vec!["text/plain", "image/png", "image/png; charset=x"]).prop_map(|c| Some(c.to_string())),
        1 => Just(Some("application/vnd.microsoft.activity".to_string())),
        1 => prop::sample::select(vec!["application/x-msdownload", ""]).prop_map(|c| Some(c.to_string())),
        1 => Just(None),
    ];
    let file_name = prop::option::of(prop_oneof!["[a-z]{1,8}\\.png", ".{0,12}", Just("../../x".to_string())]);
    let body = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        activity_value().prop_map(|v| v.to_string().into_bytes()),
    ];
    (name, ct, file_name, body)
}

/// A multipart body from parts, with `boundary`, then cut at `cut` bytes from the end.
fn multipart_body(boundary: &str, parts: &[FormPart], cut: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, ct, file_name, body) in parts {
        out.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"").as_bytes(),
        );
        if let Some(f) = file_name {
            out.extend_from_slice(format!("; filename=\"{f}\"").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        if let Some(ct) = ct {
            out.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let keep = out.len().saturating_sub(cut);
    out.truncate(keep);
    out
}

/// Generated upload forms (odd names, types, file names, bodies, cut short, a wrong boundary)
/// posted to the real server: each answer is 200 or a 4xx with a code, the node holds exactly
/// the bytes of the files its log points to, and nothing once the conversation is gone.
#[test]
fn generated_upload_forms_through_the_server_never_get_a_5xx_or_leak() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let s = rt.block_on(common::TestServer::with(|c| c.metering.rate_limit_per_minute = 1_000_000));
    let (token, conv, _) = rt.block_on(s.conversation("helpdesk"));
    let url = s.url(&format!("/v3/directline/conversations/{conv}/upload?userId=dl_user"));
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 160,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let strategy = (
        prop::collection::vec(form_part(), 0..4),
        prop_oneof![4 => Just(0usize), 1 => 0usize..40],
        prop::bool::weighted(0.2),
        "[A-Za-z0-9]{1,20}",
    );
    let (accepted, refused) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    runner
        .run(&strategy, |(parts, cut, wrong_boundary, boundary)| {
            let body = multipart_body(&boundary, &parts, cut);
            let header_boundary = if wrong_boundary { format!("{boundary}x") } else { boundary.clone() };
            let (status, text) = rt.block_on(async {
                let res = s
                    .http
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", format!("multipart/form-data; boundary={header_boundary}"))
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                (res.status(), res.text().await.unwrap())
            });
            prop_assert!(status == 200 || status.is_client_error(), "{status}: {text} for {parts:?}");
            if status == 200 {
                accepted.set(accepted.get() + 1);
            } else {
                refused.set(refused.get() + 1);
                let e: Value = serde_json::from_str(&text).unwrap();
                prop_assert!(e["error"]["code"].as_str().is_some_and(|c| !c.is_empty()), "{text}");
            }
            Ok(())
        })
        .unwrap();
    // The generator reaches both sides.
    eprintln!("upload forms: {} accepted, {} refused", accepted.get(), refused.get());
    assert!(
        accepted.get() > 0 && refused.get() > 0,
        "{} accepted, {} refused",
        accepted.get(),
        refused.get()
    );
    // The bytes held are exactly those of the files the conversation's log points to.
    let (held, pointed) = rt.block_on(async {
        let log = s.poll(&token, &conv, None).await;
        let mut pointed = 0usize;
        for a in log["activities"].as_array().unwrap() {
            for att in a["attachments"].as_array().into_iter().flatten() {
                if let Some(u) = att["contentUrl"].as_str() {
                    pointed += s.http.get(u).send().await.unwrap().bytes().await.unwrap().len();
                }
            }
        }
        (common::metric(&s.metrics().await, "botgate_upload_bytes_stored").unwrap(), pointed)
    });
    assert_eq!(held, pointed as u64);
    // Gone with the conversation.
    let idle = s.state().config().channel.idle_timeout_secs as i64;
    s.clock.advance_ms((idle + 1) * 1000);
    s.state().sweep();
    let held =
        rt.block_on(async { common::metric(&s.metrics().await, "botgate_upload_bytes_stored").unwrap() });
    assert_eq!(held, 0);
}
