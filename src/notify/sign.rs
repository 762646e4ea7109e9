//! Standard Webhooks signatures: `webhook-signature: v1,<base64 HMAC-SHA256>` over
//! `{webhook-id}.{webhook-timestamp}.{body}`, keyed by the bytes of a `whsec_<base64>` secret.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The prefix of a secret.
const PREFIX: &str = "whsec_";

/// The key bytes of a `whsec_` secret, if it is one (at least 16 bytes, at most 64).
pub fn secret_key(secret: &str) -> Option<Vec<u8>> {
    let key = STANDARD.decode(secret.strip_prefix(PREFIX)?).ok()?;
    (16..=64).contains(&key.len()).then_some(key)
}

/// A new secret: 32 random bytes.
pub fn new_secret() -> String {
    let key: [u8; 32] = rand::random();
    format!("{PREFIX}{}", STANDARD.encode(key))
}

/// The `v1,<signature>` of one secret for message `id` sent at `timestamp` (seconds).
pub fn signature(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Option<String> {
    let key = secret_key(secret)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).ok()?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Some(format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes())))
}

/// The `webhook-signature` header: one signature per secret, space-separated (during a
/// rotation the old secret signs beside the new one).
pub fn header(secrets: &[&str], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets.iter().filter_map(|s| signature(s, id, timestamp, body)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification (spec/standard-webhooks.md).
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signature(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body).unwrap(),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn secrets_are_checked() {
        assert!(secret_key(&new_secret()).is_some());
        assert!(secret_key("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_none(), "no prefix");
        assert!(secret_key("whsec_c2hvcnQ=").is_none(), "too short");
        assert!(secret_key("whsec_!!!").is_none(), "not base64");
        assert_ne!(new_secret(), new_secret());
    }

    #[test]
    fn a_rotation_signs_with_both() {
        let (a, b) = (new_secret(), new_secret());
        let h = header(&[&a, &b], "evt_1", 5, b"{}");
        let parts: Vec<&str> = h.split(' ').collect();
        assert_eq!(
            parts,
            [signature(&a, "evt_1", 5, b"{}").unwrap(), signature(&b, "evt_1", 5, b"{}").unwrap()]
        );
    }
}
