//! The OpenAPI document (`GET /api/v1/openapi.json`) against the real server: every `/api/v1`
//! route of the route table is in it with exactly the methods the router serves; the document is
//! valid OpenAPI 3.1 by `openapi-spec-validator`; and `schemathesis` (both from PyPI, installed
//! by `tests/python/install.sh`) runs a bounded number of generated requests against the server
//! with `--checks all`: no 5xx, every status, content type and body as documented, schema-valid
//! input accepted and invalid input refused.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use botgate::identity::dev_issuer::TokenRequest;
use common::*;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python_tools() -> PathBuf {
    let status = std::process::Command::new("bash")
        .arg(root().join("tests/python/install.sh"))
        .status()
        .expect("bash");
    assert!(status.success(), "tests/python/install.sh failed");
    root().join("tests/python/.venv/bin")
}

/// A token for every API: a licensed author of contoso, its tenant admin, and the operator.
fn everyone(s: &TestServer) -> String {
    s.dev_token(TokenRequest {
        tenant: "contoso".into(),
        user: "root".into(),
        groups: vec!["helpdesk-authors".into()],
        admin: true,
        operator: true,
        ..TokenRequest::default()
    })
}

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

#[tokio::test]
async fn every_api_route_is_documented_with_the_methods_it_serves() {
    let s = TestServer::start().await;
    let doc: Value = s.http.get(s.url("/api/v1/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let documented: BTreeMap<String, BTreeSet<String>> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(p, item)| {
            (p.clone(), METHODS.iter().filter(|m| item.get(**m).is_some()).map(|m| m.to_string()).collect())
        })
        .collect();
    let (_, templates) = botgate::routes::public(s.state());
    let api: BTreeSet<String> =
        templates.iter().filter(|t| t.starts_with("/api/v1/")).map(|t| t.to_string()).collect();
    let paths: BTreeSet<String> = documented.keys().cloned().collect();
    assert_eq!(api, paths, "the route table's /api/v1 routes and the document's paths");

    // Each method the router answers (anything but 405) is documented, and only those.
    let token = everyone(&s);
    for (path, methods) in &documented {
        let concrete = path.replace("{slot}", "1").replace(['{', '}'], "");
        for m in METHODS {
            let res = s
                .http
                .request(m.to_uppercase().parse().unwrap(), s.url(&concrete))
                .bearer_auth(&token)
                .header("Content-Type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            let served = res.status() != 405;
            assert_eq!(served, methods.contains(m), "{} {path}: {}", m.to_uppercase(), res.status());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_is_valid_and_the_server_conforms_to_it() {
    let bin = python_tools();
    let s = TestServer::start().await;
    let doc = s.http.get(s.url("/api/v1/openapi.json")).send().await.unwrap().text().await.unwrap();
    let file = s.dir.path().join("openapi.json");
    std::fs::write(&file, &doc).unwrap();
    let out =
        tokio::process::Command::new(bin.join("openapi-spec-validator")).arg(&file).output().await.unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let token = everyone(&s);
    let out = tokio::process::Command::new(bin.join("st"))
        // Its cache folder goes to the test's folder, not the checkout.
        .current_dir(s.dir.path())
        .arg("--config-file")
        .arg(root().join("tests/schemathesis.toml"))
        .args(["run", &s.url("/api/v1/openapi.json"), "--checks", "all", "--max-examples", "25"])
        .args(["--seed", &std::env::var("BOTGATE_SCHEMATHESIS_SEED").unwrap_or_else(|_| "1".into())])
        .args(["--workers", "1", "--no-color", "--generation-database", "none"])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Tested: 48"), "every operation was tested:\n{text}");
}
