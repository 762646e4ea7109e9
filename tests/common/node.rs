//! The Node helpers of `tests/node`: their folder, and the Bot Framework SDK echo bot.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// `tests/node`.
pub fn node_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("node")
}

/// The SDK echo bot (`echo-bot.js`), stopped on drop.
pub struct EchoBot {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl EchoBot {
    /// Adds the bot to `c` as the upstream bot `up` of the demo tenant (loopback allowed, the
    /// SDK's turn given 15 s).
    pub fn add_to(&self, c: &mut botgate::config::Config) {
        let endpoint = format!("http://127.0.0.1:{}/api/messages", self.port);
        let extra =
            botgate::config::Config::from_str(&super::upstream_config_toml(&endpoint, ""), "t").unwrap();
        c.bots.extend(extra.bots);
        c.outbound.allow_loopback = true;
        c.upstream.timeout_secs = 15;
    }
}

impl Drop for EchoBot {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

/// The echo bot, after `tests/node/install.sh`.
pub fn start_echo_bot() -> EchoBot {
    start_echo_bot_with(&[])
}

/// The echo bot with extra environment variables (a CA file for a gateway on TLS).
pub fn start_echo_bot_with(env: &[(&str, &std::path::Path)]) -> EchoBot {
    let status = Command::new("bash").arg(node_dir().join("install.sh")).status().expect("bash");
    assert!(status.success(), "tests/node/install.sh failed");
    let mut child = Command::new("node")
        .arg(node_dir().join("echo-bot.js"))
        .env("PORT", "0")
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("node");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port = line
        .trim()
        .strip_prefix("echo-bot listening port=")
        .unwrap_or_else(|| panic!("{line:?}"))
        .parse()
        .unwrap();
    EchoBot { child, port }
}
