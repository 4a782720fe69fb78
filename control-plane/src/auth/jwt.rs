//! Issuing and verifying access tokens (EdDSA JWTs with `kid`).

use std::sync::Arc;

use jsonwebtoken::{Algorithm, Header, Validation};
use tollgate_common::claims::{AccessClaims, MAX_TOKEN_BYTES};
use uuid::Uuid;

use super::signing::KeyRing;

/// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
pub const LEEWAY_SECONDS: u64 = 30;

#[derive(Clone)]
pub struct Tokens {
    ring: Arc<KeyRing>,
    issuer: String,
    audience: String,
    ttl_seconds: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token too long")]
    TooLong,
    #[error("token header: {0}")]
    Header(jsonwebtoken::errors::Error),
    #[error("token algorithm {0:?} is not accepted")]
    Algorithm(Algorithm),
    #[error("unknown kid")]
    UnknownKid,
    #[error("token: {0}")]
    Invalid(jsonwebtoken::errors::Error),
    #[error("token issued in the future")]
    IssuedInFuture,
    #[error("signing: {0}")]
    Sign(jsonwebtoken::errors::Error),
}

impl Tokens {
    pub fn new(ring: Arc<KeyRing>, issuer: &str, audience: &str, ttl_seconds: i64) -> Tokens {
        Tokens {
            ring,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            ttl_seconds,
        }
    }

    pub fn ttl_seconds(&self) -> i64 {
        self.ttl_seconds
    }

    pub fn ring(&self) -> &KeyRing {
        &self.ring
    }

    /// Signs a new access token for `user` with the active key.
    pub fn issue(&self, user: Uuid, role: &str) -> Result<String, TokenError> {
        let now = chrono::Utc::now().timestamp();
        let claims = AccessClaims {
            sub: user.to_string(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat: now,
            nbf: now,
            exp: now + self.ttl_seconds,
            jti: Uuid::new_v4().to_string(),
            role: role.to_owned(),
        };
        let key = self.ring.active();
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, &claims, &key.encoding).map_err(TokenError::Sign)
    }

    /// Verifies signature (EdDSA only, key chosen by `kid`), `iss`, `aud`, `exp`, `nbf` and that
    /// `iat` is not in the future.
    pub fn verify(&self, token: &str) -> Result<AccessClaims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLong);
        }
        let header = jsonwebtoken::decode_header(token).map_err(TokenError::Header)?;
        // Only our algorithm: never `none`, never an HMAC "signed" with our public key.
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::Algorithm(header.alg));
        }
        let kid = header.kid.as_deref().ok_or(TokenError::UnknownKid)?;
        let key = self.ring.by_kid(kid).ok_or(TokenError::UnknownKid)?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECONDS;
        let claims = jsonwebtoken::decode::<AccessClaims>(token, &key.decoding, &validation)
            .map(|data| data.claims)
            .map_err(TokenError::Invalid)?;
        // A token "issued" in the future would outlive the user's cut-off (`tokens_valid_after`
        // is compared with `iat`): refused beyond the clock-skew leeway.
        if claims.iat > chrono::Utc::now().timestamp() + LEEWAY_SECONDS as i64 {
            return Err(TokenError::IssuedInFuture);
        }
        Ok(claims)
    }
}
