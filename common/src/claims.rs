//! The claims of a Tollgate access token (a JWT signed by the control plane, verified by the
//! control plane and every sidecar).

use serde::{Deserialize, Serialize};

/// Algorithm of Tollgate's own access tokens.
pub const ALGORITHM: &str = "EdDSA";

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
