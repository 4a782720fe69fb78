//! The claims of a Tollgate access token (a JWT signed by the control plane, verified by the
//! control plane and every sidecar).

use serde::{Deserialize, Serialize};

/// Algorithm of Tollgate's own access tokens.
pub const ALGORITHM: &str = "EdDSA";

/// Access tokens longer than this are refused before they are parsed, by both programs.
pub const MAX_TOKEN_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    /// The user id.
    pub sub: String,
    pub iss: String,
    pub aud: String,
    /// Issued at, seconds since the epoch.
    pub iat: i64,
    /// Not before, seconds since the epoch.
    pub nbf: i64,
    /// Expires at, seconds since the epoch.
    pub exp: i64,
    /// A unique token id.
    pub jti: String,
    /// `user` or `admin`.
    pub role: String,
}

/// A new Ed25519 signing key as PKCS#8 PEM: development keys of the local stack, and tests.
///
/// The version 1 form (RFC 8410, the seed alone, no public key): jsonwebtoken derives a JWK only
/// from that 48-byte document.
pub fn generate_ed25519_pem() -> String {
    use ed25519::pkcs8::{EncodePrivateKey, KeypairBytes, spki::der::pem::LineEnding};
    let key = KeypairBytes {
        secret_key: rand::random(),
        public_key: None,
    };
    key.to_pkcs8_pem(LineEnding::LF)
        .expect("a 32-byte seed always encodes")
        .to_string()
}

#[cfg(test)]
mod tests {
    use ed25519::pkcs8::{DecodePrivateKey, KeypairBytes};

    #[test]
    fn generated_keys_are_version_1_pkcs8_pem() {
        let pem = super::generate_ed25519_pem();
        let key = KeypairBytes::from_pkcs8_pem(&pem).expect("PKCS#8 PEM");
        assert!(key.public_key.is_none());
        assert_ne!(pem, super::generate_ed25519_pem());
        // The 48-byte document: one line of base64 between the labels.
        assert_eq!(pem.lines().count(), 3, "{pem}");
    }
}
