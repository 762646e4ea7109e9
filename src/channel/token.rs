//! Direct Line tokens: self-contained, signed by the server, checked without a lookup.
//!
//! A token is `dl1.<base64url(claims JSON)>.<base64url(HMAC-SHA256(key, claims))>`. The claims name
//! the bot, the conversation, an optional user id, the expiry, and which channel secret (slot and
//! generation) it was made from, so regenerating a secret disconnects the tokens made from it.
//! The key is created at first start in the data folder, so tokens survive a restart.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The prefix that tells a token from a channel secret.
pub const TOKEN_PREFIX: &str = "dl1.";

/// What a token grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The bot.
    #[serde(rename = "b")]
    pub bot: String,
    /// The conversation.
    #[serde(rename = "c")]
    pub conversation: String,
    /// The user id the token binds (`from.id` of the user's activities), if any.
    #[serde(rename = "u", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Expiry, seconds since the epoch.
    #[serde(rename = "e")]
    pub exp: i64,
    /// The channel secret it was made from: 0 for an open bot's token endpoint, 1 or 2.
    #[serde(rename = "s", default)]
    pub slot: u8,
    /// That secret's generation when the token was made.
    #[serde(rename = "g", default)]
    pub generation: u32,
    /// The bot instance it was made for (see `BotControl::instance`); empty for configured bots.
    #[serde(rename = "i", default, skip_serializing_if = "String::is_empty")]
    pub instance: String,
    /// Made through the authoring test chat: never billed.
    #[serde(rename = "t", default, skip_serializing_if = "std::ops::Not::not")]
    pub test_chat: bool,
    /// The latest expiry a refresh may give it, seconds since the epoch; 0 for none (test-chat
    /// tokens end for good at this time).
    #[serde(rename = "m", default, skip_serializing_if = "is_zero")]
    pub until: i64,
    /// The only browser origins the token works from (`trustedOrigins` of `tokens/generate`);
    /// empty for any the bot allows.
    #[serde(rename = "o", default, skip_serializing_if = "Vec::is_empty")]
    pub origins: Vec<String>,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// The `from.id` a test-chat token binds: this prefix and the author's user id.
pub const TEST_CHAT_USER_PREFIX: &str = "dl_test_";

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token of this server (bad shape or signature).
    #[error("the token is not valid")]
    Invalid,
    /// Its expiry has passed.
    #[error("the token has expired")]
    Expired,
}

/// Random bytes of a file key.
const FILE_NONCE: usize = 16;
/// HMAC bytes of a file key.
const FILE_TAG: usize = 12;

/// Signs and verifies tokens; cloning is cheap (the keyed MAC state is copied, not re-keyed).
#[derive(Clone)]
pub struct TokenSigner {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner")
    }
}

impl TokenSigner {
    /// A signer with the given key.
    pub fn new(key: &[u8]) -> Self {
        // HMAC accepts keys of any length; this cannot fail.
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
        Self { mac }
    }

    /// Loads the key from `file`, creating a random one (owner-only permissions) if missing.
    pub fn load_or_create(file: &Path) -> std::io::Result<Self> {
        Ok(Self::new(&load_or_create_key(file)?))
    }

    /// Makes a token.
    pub fn sign(&self, claims: &Claims) -> String {
        let payload = serde_json::to_vec(claims).unwrap_or_default();
        let mut mac = self.mac.clone();
        mac.update(&payload);
        let tag = mac.finalize().into_bytes();
        let mut out = String::with_capacity(TOKEN_PREFIX.len() + payload.len() * 4 / 3 + 48);
        out.push_str(TOKEN_PREFIX);
        B64.encode_string(&payload, &mut out);
        out.push('.');
        B64.encode_string(tag, &mut out);
        out
    }

    /// A file URL's key that proves this gateway made it for `conversation`: 16 random bytes,
    /// then 12 bytes of an HMAC over them and the conversation id, in base64url (38
    /// characters). Any node can tell a made-up key before it looks for the file.
    pub fn file_key(&self, conversation: &str) -> String {
        let nonce: [u8; FILE_NONCE] = rand::random();
        let mut raw = [0u8; FILE_NONCE + FILE_TAG];
        raw[..FILE_NONCE].copy_from_slice(&nonce);
        raw[FILE_NONCE..]
            .copy_from_slice(&self.file_mac(conversation, &nonce).finalize().into_bytes()[..FILE_TAG]);
        B64.encode(raw)
    }

    /// Whether `key` is a file key this gateway made for `conversation` (constant time).
    pub fn check_file_key(&self, conversation: &str, key: &str) -> bool {
        let Ok(raw) = B64.decode(key) else { return false };
        raw.len() == FILE_NONCE + FILE_TAG
            && self
                .file_mac(conversation, &raw[..FILE_NONCE])
                .verify_truncated_left(&raw[FILE_NONCE..])
                .is_ok()
    }

    fn file_mac(&self, conversation: &str, nonce: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        // Domain-separated from token payloads, which are JSON objects.
        mac.update(b"upload\0");
        mac.update(conversation.as_bytes());
        mac.update(b"\0");
        mac.update(nonce);
        mac
    }

    /// Checks a token's signature and expiry against `now_secs`.
    pub fn verify(&self, token: &str, now_secs: i64) -> Result<Claims, TokenError> {
        let rest = token.strip_prefix(TOKEN_PREFIX).ok_or(TokenError::Invalid)?;
        let (payload_b64, tag_b64) = rest.split_once('.').ok_or(TokenError::Invalid)?;
        if payload_b64.len() > 4096 {
            return Err(TokenError::Invalid);
        }
        let payload = B64.decode(payload_b64).map_err(|_| TokenError::Invalid)?;
        let tag = B64.decode(tag_b64).map_err(|_| TokenError::Invalid)?;
        let mut mac = self.mac.clone();
        mac.update(&payload);
        // verify_slice compares in constant time.
        mac.verify_slice(&tag).map_err(|_| TokenError::Invalid)?;
        let claims: Claims = serde_json::from_slice(&payload).map_err(|_| TokenError::Invalid)?;
        if claims.exp <= now_secs {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

/// Reads a 32-byte key (hex) from `file`, or writes a new random one there.
pub fn load_or_create_key(file: &Path) -> std::io::Result<Vec<u8>> {
    load_or_store_key(file, &rand::random::<[u8; 32]>())
}

/// The key in `file`, or `fresh` (32 bytes or more) written there first if the file is missing.
pub fn load_or_store_key(file: &Path, fresh: &[u8]) -> std::io::Result<Vec<u8>> {
    match std::fs::read_to_string(file) {
        Ok(text) => decode_hex(text.trim())
            .filter(|k| k.len() >= 32)
            .ok_or_else(|| std::io::Error::other("the key file does not hold a hex key of 32 bytes or more")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if fresh.len() < 32 {
                return Err(std::io::Error::other("a new key must be 32 bytes or more"));
            }
            let hex: String = fresh.iter().map(|b| format!("{b:02x}")).collect();
            write_private(file, hex.as_bytes())?;
            Ok(fresh.to_vec())
        }
        Err(e) => Err(e),
    }
}

fn write_private(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(file)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> Claims {
        Claims {
            bot: "b".into(),
            conversation: "c".into(),
            user: Some("dl_u".into()),
            exp,
            slot: 1,
            generation: 0,
            instance: String::new(),
            test_chat: false,
            until: 0,
            origins: Vec::new(),
        }
    }

    #[test]
    fn round_trips_and_expires() {
        let s = TokenSigner::new(b"k");
        let t = s.sign(&claims(100));
        assert_eq!(s.verify(&t, 99).unwrap(), claims(100));
        assert_eq!(s.verify(&t, 100), Err(TokenError::Expired));
    }

    #[test]
    fn a_changed_byte_or_other_key_is_invalid() {
        let s = TokenSigner::new(b"k");
        let t = s.sign(&claims(100));
        let mut forged = t.clone().into_bytes();
        let i = TOKEN_PREFIX.len() + 3;
        forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
        assert_eq!(s.verify(std::str::from_utf8(&forged).unwrap(), 0), Err(TokenError::Invalid));
        assert_eq!(TokenSigner::new(b"other").verify(&t, 0), Err(TokenError::Invalid));
        assert_eq!(s.verify("not a token", 0), Err(TokenError::Invalid));
    }

    #[test]
    fn key_file_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        let a = load_or_create_key(&f).unwrap();
        let b = load_or_create_key(&f).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 32);
    }

    #[test]
    fn a_fresh_key_is_stored_only_when_there_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        assert!(load_or_store_key(&f, &[7; 16]).is_err(), "too short");
        assert_eq!(load_or_store_key(&f, &[7; 32]).unwrap(), vec![7; 32]);
        assert_eq!(load_or_store_key(&f, &[9; 32]).unwrap(), vec![7; 32], "the stored key wins");
    }
}
