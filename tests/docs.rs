//! The README against the code: the table of error codes lists exactly the codes the gateway
//! can answer, and the configuration reference names every key of the embedded default.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// CamelCase string literals in `src/` that are not error codes.
const NOT_CODES: &[&str] = &[
    "ErrorBody",
    "Fallback",
    "Metrics",
    "PlatformOperator",
    "RedisStore",
    "SqliteStore",
    "TenantAdmin",
    "TenantPool",
    "TokenSigner",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every string literal of the form `Word` or `WordWord...` (letters only) in the gateway's
/// sources, the binaries under `src/bin` left out.
fn code_literals() -> BTreeSet<String> {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let mut codes = BTreeSet::new();
    for f in files.iter().filter(|f| !f.components().any(|c| c.as_os_str() == "bin")) {
        let text = std::fs::read_to_string(f).unwrap();
        // Every piece between two quotes, escaped ones too (`\"Code\"` in a byte string): a
        // piece outside a literal holds spaces or punctuation, so it is never a bare word.
        for piece in text.split('"').map(|p| p.trim_end_matches('\\')) {
            let camel = piece.len() >= 4
                && piece.starts_with(|c: char| c.is_ascii_uppercase())
                && piece.chars().all(|c| c.is_ascii_alphabetic())
                && piece.chars().any(|c| c.is_ascii_lowercase());
            if camel && !NOT_CODES.contains(&piece) {
                codes.insert(piece.to_string());
            }
        }
    }
    codes
}

/// The codes in the README's table of error codes: rows `| `Code` | status | ... |`.
fn readme_codes() -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("README.md")).unwrap();
    let start = text.find("### Error codes").expect("README has an `### Error codes` section");
    let section = &text[start..];
    let end = section[4..].find("\n#").map_or(section.len(), |i| i + 4);
    section[..end]
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split('`').next().map(str::to_string))
        .collect()
}

#[test]
fn the_readme_lists_exactly_the_error_codes_of_the_code() {
    let code = code_literals();
    let readme = readme_codes();
    let undocumented: Vec<_> = code.difference(&readme).collect();
    let stale: Vec<_> = readme.difference(&code).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "README `### Error codes` is out of date.\nanswered but not listed: {undocumented:?}\nlisted but never answered: {stale:?}"
    );
}

#[test]
fn the_configuration_reference_names_every_section_of_the_default() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let default = std::fs::read_to_string(root().join("config/default.toml")).unwrap();
    for line in default.lines() {
        if line.starts_with("[[") {
            assert!(readme.contains(&format!("`{}`", line.trim())), "README does not document {line}");
        } else if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            assert!(readme.contains(&format!("`{section}.")), "README names no key of [{section}]");
        }
    }
}

/// The README's production configuration (the TOML block after `<!-- production-config -->`)
/// is one the gateway accepts.
#[test]
fn the_readme_production_configuration_is_valid() {
    let text = std::fs::read_to_string(root().join("README.md")).unwrap();
    let after = text.split("<!-- production-config -->").nth(1).expect("the production-config marker");
    let block = after.split("```toml\n").nth(1).and_then(|b| b.split("\n```").next()).expect("a toml block");
    let config = botgate::config::Config::from_str(block, "README.md production block")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(config.server.tls_cert.is_some() && config.identity.oidc_issuer.is_some());
    assert_eq!(config.store.backend, botgate::config::StoreBackend::Redis);
}
