//! Channel secrets: made at random, kept only as SHA-256 hashes, compared in constant time.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The hash of a channel secret.
pub type SecretHash = [u8; 32];

/// Hashes a secret. Secrets are long random strings, so a plain SHA-256 (no stretching) is
/// enough: there is no dictionary to search.
pub fn hash(secret: &str) -> SecretHash {
    Sha256::digest(secret.as_bytes()).into()
}

/// Whether `secret` hashes to `expected`, in constant time.
pub fn matches(secret: &str, expected: &SecretHash) -> bool {
    hash(secret).ct_eq(expected).into()
}

/// A new random secret (256 bits, base64url).
pub fn generate() -> String {
    let bytes: [u8; 32] = rand::random();
    B64.encode(bytes)
}

/// A random url-safe id of `bytes` random bytes.
pub fn random_id(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::Rng::fill(&mut rand::rng(), buf.as_mut_slice());
    B64.encode(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_only_its_secret() {
        let s = generate();
        assert!(s.len() >= 40);
        let h = hash(&s);
        assert!(matches(&s, &h));
        assert!(!matches("other", &h));
        assert_ne!(generate(), s);
    }
}
