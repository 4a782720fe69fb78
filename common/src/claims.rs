//! The claims of a Tollgate access token (a JWT signed by the control plane, verified by the
//! control plane and every sidecar).

use base64::Engine;
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

/// The fixed PKCS#8 header of an Ed25519 private key (RFC 8410); the 32-byte seed follows it.
const ED25519_PKCS8_HEADER: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// A new Ed25519 signing key as PKCS#8 PEM: development keys of the local stack, and tests.
pub fn generate_ed25519_pem() -> String {
    let seed: [u8; 32] = rand::random();
    let mut der = ED25519_PKCS8_HEADER.to_vec();
    der.extend_from_slice(&seed);
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n")
}
