//! The packaging files against independent checkers and the binary: `systemd-analyze verify`
//! and `systemd-analyze security` on `packaging/botgate.service`, and the Dockerfile's user,
//! volume, health check and environment against what the binary reads.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The unit with its `ExecStart` pointed at the binary built for the tests (`verify` checks the
/// executable exists).
fn unit_here(dir: &std::path::Path) -> PathBuf {
    let text = std::fs::read_to_string(root().join("packaging/botgate.service")).unwrap();
    assert!(text.contains("ExecStart=/usr/local/bin/botgate "), "{text}");
    let path = dir.join("botgate.service");
    std::fs::write(&path, text.replace("/usr/local/bin/botgate", env!("CARGO_BIN_EXE_botgate"))).unwrap();
    path
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_here(dir.path());
    let out = Command::new("systemd-analyze").arg("verify").arg(&unit).output().expect("systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=20"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exposure above 2.0:\n{text}");
    // The flags the unit passes are the binary's.
    let help = Command::new(env!("CARGO_BIN_EXE_botgate")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in ["--config", "--data-dir", "--log-format"] {
        assert!(help.contains(flag), "{flag} in\n{help}");
    }
}

#[test]
fn the_dockerfile_runs_unprivileged_with_a_volume_a_health_check_and_known_settings() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();
    assert_eq!(lines.iter().filter(|l| l.starts_with("FROM ")).count(), 2, "multi-stage");
    assert!(lines.iter().any(|l| l.starts_with("USER ") && !l.contains("root")));
    assert!(lines.contains(&r#"VOLUME ["/var/lib/botgate"]"#));
    assert!(text.contains("http://127.0.0.1:9464/readyz"), "health check on /readyz of the admin listener");
    assert!(text.contains("cargo build --release --locked"));
    // Every BOTGATE_ variable it sets is one the binary reads.
    let main = std::fs::read_to_string(root().join("src/main.rs")).unwrap();
    let vars: Vec<&str> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("BOTGATE_"))
        .collect();
    assert!(vars.len() >= 4, "{vars:?}");
    for v in vars {
        assert!(main.contains(&format!("\"{v}\"")), "{v} is not read by src/main.rs");
    }
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l == "/target/"), "the build context leaves target/ out");
}
