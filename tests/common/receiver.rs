//! A webhook receiver for tests: `tests/python/webhook_receiver.py`, which verifies every
//! delivery's signature with the `standardwebhooks` package from PyPI.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python receiver, listening on 127.0.0.1.
pub struct Receiver {
    child: Child,
    /// Where deliveries go: `http://127.0.0.1:PORT/hook`.
    pub url: String,
    http: reqwest::Client,
}

impl Receiver {
    pub fn start() -> Self {
        let status = Command::new("bash").arg(root().join("tests/python/install.sh")).status().unwrap();
        assert!(status.success(), "tests/python/install.sh failed");
        let mut child = Command::new(root().join("tests/python/.venv/bin/python"))
            .arg(root().join("tests/python/webhook_receiver.py"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port: u16 = line.trim().strip_prefix("PORT ").expect("PORT line").parse().unwrap();
        Self { child, url: format!("http://127.0.0.1:{port}/hook"), http: reqwest::Client::new() }
    }

    pub async fn control(&self, v: Value) {
        let url = self.url.replace("/hook", "/_control");
        let res = self.http.post(url).json(&v).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }

    pub async fn received(&self) -> Vec<Value> {
        let url = self.url.replace("/hook", "/_received");
        self.http.get(url).send().await.unwrap().json().await.unwrap()
    }

    /// Waits until `n` deliveries arrived (a deadline, not a measurement).
    pub async fn wait_for(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.received().await;
            if got.len() >= n {
                return got;
            }
            assert!(Instant::now() < deadline, "waited for {n} deliveries, have {}: {got:?}", got.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
