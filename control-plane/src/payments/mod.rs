//! Payments: Alipay (PC site and mobile H5, RSA2) and WeChat Pay API v3 (Native), as the merchant.
//! The same code talks to the real gateways and to the local simulator; only base URLs and keys
//! are configuration.

pub mod alipay;
pub mod service;
pub mod wechat;

use rsa::pkcs1v15::{Signature, SigningKey, VerifyingKey};
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::signature::{SignatureEncoding, Signer, Verifier};
use rsa::{RsaPrivateKey, RsaPublicKey};
use sha2::Sha256;

pub use crate::domain::payments::Channel;

#[derive(Debug, thiserror::Error)]
pub enum PayError {
    #[error("payment key: {0}")]
    Key(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("{0}")]
    Invalid(String),
    #[error("gateway unreachable: {0}")]
    Unreachable(String),
    #[error("gateway refused: {0}")]
    Refused(String),
}

/// A payment as a gateway reports it (a verified notification or a query's answer), in one
/// shape whatever the gateway.
#[derive(Debug, Clone)]
pub struct Payment {
    pub out_trade_no: String,
    /// What the delivery was: `TRADE_SUCCESS`, `TRANSACTION.SUCCESS`, `query`, …
    pub event: String,
    /// The gateway's own number for the trade.
    pub trade_no: String,
    pub total_fen: i64,
    /// Whether the money arrived; anything else is only recorded.
    pub paid: bool,
}

/// An RSA private key that signs SHA256withRSA (PKCS#1 v1.5), as both gateways require.
#[derive(Clone)]
pub struct RsaSigner(SigningKey<Sha256>);

/// An RSA public key that verifies SHA256withRSA.
#[derive(Clone)]
pub struct RsaVerifier(VerifyingKey<Sha256>);

impl RsaSigner {
    /// From PKCS#8 (`BEGIN PRIVATE KEY`) or PKCS#1 (`BEGIN RSA PRIVATE KEY`) PEM.
    pub fn from_pem(pem: &str) -> Result<RsaSigner, PayError> {
        let key = RsaPrivateKey::from_pkcs8_pem(pem)
            .or_else(|_| {
                use rsa::pkcs1::DecodeRsaPrivateKey;
                RsaPrivateKey::from_pkcs1_pem(pem)
            })
            .map_err(|e| PayError::Key(format!("not an RSA private key: {e}")))?;
        Ok(RsaSigner(SigningKey::new(key)))
    }

    /// Base64 of the SHA256withRSA signature of `message`.
    pub fn sign(&self, message: &[u8]) -> String {
        use base64::Engine;
        let signature: Signature = self.0.sign(message);
        base64::engine::general_purpose::STANDARD.encode(signature.to_bytes())
    }
}

impl RsaVerifier {
    /// From SPKI (`BEGIN PUBLIC KEY`) or PKCS#1 (`BEGIN RSA PUBLIC KEY`) PEM, or the bare base64
    /// body that Alipay's console shows.
    pub fn from_pem(pem: &str) -> Result<RsaVerifier, PayError> {
        let trimmed = pem.trim();
        let wrapped;
        let pem = if trimmed.starts_with("-----") {
            trimmed
        } else {
            // The console shows the key as one base64 line; PEM wants 64-character lines.
            let body: String = trimmed.chars().filter(|c| !c.is_whitespace()).collect();
            let lines: Vec<&str> = body
                .as_bytes()
                .chunks(64)
                .filter_map(|c| std::str::from_utf8(c).ok())
                .collect();
            wrapped = format!(
                "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
                lines.join("\n")
            );
            &wrapped
        };
        let key = RsaPublicKey::from_public_key_pem(pem)
            .or_else(|_| {
                use rsa::pkcs1::DecodeRsaPublicKey;
                RsaPublicKey::from_pkcs1_pem(pem)
            })
            .map_err(|e| PayError::Key(format!("not an RSA public key: {e}")))?;
        Ok(RsaVerifier(VerifyingKey::new(key)))
    }

    /// Checks a base64 SHA256withRSA signature of `message`.
    pub fn verify(&self, message: &[u8], signature_b64: &str) -> Result<(), PayError> {
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(signature_b64.trim())
            .map_err(|_| PayError::BadSignature)?;
        let signature = Signature::try_from(raw.as_slice()).map_err(|_| PayError::BadSignature)?;
        self.0
            .verify(message, &signature)
            .map_err(|_| PayError::BadSignature)
    }
}

/// Minor units (fen) to the yuan string both gateways' order APIs use: `9900` → `"99.00"`.
pub fn fen_to_yuan(fen: i64) -> String {
    format!("{}.{:02}", fen / 100, fen % 100)
}

/// A yuan amount as the gateways send it (`"99"`, `"99.5"`, `"99.00"`) to fen, exactly: never
/// through floating point. `None` for anything else.
pub fn yuan_to_fen(yuan: &str) -> Option<i64> {
    let (whole, frac) = match yuan.split_once('.') {
        Some((w, f)) => (w, f),
        None => (yuan, ""),
    };
    if whole.is_empty()
        || whole.len() > 12
        || frac.len() > 2
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let whole: i64 = whole.parse().ok()?;
    let frac: i64 = match frac.len() {
        0 => 0,
        1 => frac.parse::<i64>().ok()? * 10,
        _ => frac.parse().ok()?,
    };
    whole.checked_mul(100)?.checked_add(frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_conversions_are_exact() {
        assert_eq!(fen_to_yuan(9900), "99.00");
        assert_eq!(fen_to_yuan(1), "0.01");
        assert_eq!(fen_to_yuan(123456), "1234.56");
        let check = |s: &str, want: Option<i64>| assert_eq!(yuan_to_fen(s), want, "{s}");
        check("99.00", Some(9900));
        check("99", Some(9900));
        check("99.5", Some(9950));
        check("0.01", Some(1));
        check("99.001", None);
        check("-1.00", None);
        check("1e3", None);
        check("", None);
        check(".5", None);
        check("99.00 ", None);
    }
}
