//! Refresh tokens: opaque, 256 bits of randomness, stored only as SHA-256.

use base64::Engine;
use sha2::{Digest, Sha256};

pub const REFRESH_PREFIX: &str = "tgr_";

/// A new refresh token and its hash.
pub fn new_refresh() -> (String, [u8; 32]) {
    let bytes: [u8; 32] = rand::random();
    let token = format!(
        "{REFRESH_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let hash = hash(&token);
    (token, hash)
}

pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hashed() {
        let (a, ha) = new_refresh();
        let (b, hb) = new_refresh();
        assert_ne!(a, b);
        assert_ne!(ha, hb);
        assert_eq!(hash(&a), ha);
        assert!(a.starts_with(REFRESH_PREFIX));
        assert_eq!(a.len(), REFRESH_PREFIX.len() + 43);
    }
}
