//! API keys: `tgk_` + 32 base62 characters of randomness + a 6-character base62 CRC-32 checksum.
//!
//! The fixed prefix lets secret scanners recognise a leaked key; the checksum lets the sidecar and
//! the control plane refuse junk without a lookup. Keys are stored and looked up only as their
//! SHA-256 (a key carries 190 bits of randomness, so an unsalted hash is safe).

use sha2::{Digest, Sha256};

pub const PREFIX: &str = "tgk_";
const BODY_LEN: usize = 32;
const CHECKSUM_LEN: usize = 6;
/// Total length of a key.
pub const LEN: usize = PREFIX.len() + BODY_LEN + CHECKSUM_LEN;
/// How much of a key is shown in listings: the prefix and 8 characters.
pub const DISPLAY_LEN: usize = PREFIX.len() + 8;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn checksum(prefix_and_body: &str) -> String {
    let mut n = crc32fast::hash(prefix_and_body.as_bytes()) as u64;
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A new random key.
pub fn generate() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    let mut key = String::with_capacity(LEN);
    key.push_str(PREFIX);
    for _ in 0..BODY_LEN {
        key.push(BASE62[rng.random_range(0..62)] as char);
    }
    let sum = checksum(&key);
    key.push_str(&sum);
    key
}

/// True when `key` has the shape of a Tollgate key and its checksum matches. Costs no lookup.
pub fn is_well_formed(key: &str) -> bool {
    key.len() == LEN
        && key.starts_with(PREFIX)
        && key[PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric())
        && checksum(&key[..LEN - CHECKSUM_LEN]) == key[LEN - CHECKSUM_LEN..]
}

/// The stored and looked-up form of a key.
pub fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Lowercase hex of a hash, as used in Redis keys.
pub fn hex(hash: &[u8; 32]) -> String {
    ::hex::encode(hash)
}

/// The non-secret start of a key, shown in listings.
pub fn display_prefix(key: &str) -> &str {
    &key[..DISPLAY_LEN.min(key.len())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_well_formed_and_distinct() {
        let a = generate();
        assert_eq!(a.len(), LEN);
        assert!(a.starts_with(PREFIX));
        assert!(is_well_formed(&a), "{a}");
        assert_ne!(a, generate());
        assert_eq!(display_prefix(&a).len(), DISPLAY_LEN);
    }

    #[test]
    fn junk_is_refused_without_lookup() {
        let good = generate();
        let mut flipped = good.clone().into_bytes();
        flipped[10] = if flipped[10] == b'a' { b'b' } else { b'a' };
        let flipped = String::from_utf8(flipped).expect("ascii");
        for junk in [
            "",
            "tgk_",
            "not-a-key",
            &good[..LEN - 1],
            &format!("{good}x"),
            &good.replace(PREFIX, "xyz_"),
            &flipped,
            &format!("{}!{}", &good[..20], &good[21..]),
        ] {
            assert!(!is_well_formed(junk), "{junk}");
        }
    }

    #[test]
    fn hash_is_sha256() {
        assert_eq!(
            hex(&hash("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
