//! Access-token signing keys: Ed25519 (EdDSA), loaded from a directory of PKCS#8 PEM files or one
//! inline PEM, or — in development only — generated into the data directory. Every loaded key is
//! published in the JWKS, so a new key can be added, made active, and the old one removed once the
//! tokens it signed have expired: rotation without a failed request.

use std::path::{Path, PathBuf};

use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};

use crate::config::JwtConfig;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("signing key {kid}: {message}")]
    Invalid { kid: String, message: String },
    #[error("signing keys: {0}")]
    Io(String),
    #[error(
        "no access-token signing key: set TOLLGATE_JWT_KEYS_DIR, or TOLLGATE_JWT_PRIVATE_KEY with TOLLGATE_JWT_KID, or TOLLGATE_DATA_DIR for generated development keys"
    )]
    Missing,
}

pub struct SigningKey {
    pub kid: String,
    pub encoding: EncodingKey,
    pub decoding: DecodingKey,
    pub jwk: Jwk,
}

/// The loaded keys; `active` signs, all verify.
pub struct KeyRing {
    pub keys: Vec<SigningKey>,
    pub active: usize,
}

fn kid_is_sane(kid: &str) -> bool {
    !kid.is_empty()
        && kid.len() <= 64
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn parse_key(kid: &str, pem: &[u8]) -> Result<SigningKey, KeyError> {
    let invalid = |message: String| KeyError::Invalid {
        kid: kid.to_owned(),
        message,
    };
    if !kid_is_sane(kid) {
        return Err(invalid(
            "a kid is 1-64 letters, digits, '-', '_' or '.'".to_owned(),
        ));
    }
    let encoding = EncodingKey::from_ed_pem(pem)
        .map_err(|e| invalid(format!("not an Ed25519 PKCS#8 PEM private key: {e}")))?;
    let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::EdDSA)
        .map_err(|e| invalid(format!("cannot derive the public key: {e}")))?;
    jwk.common.key_id = Some(kid.to_owned());
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    jwk.common.key_algorithm = Some(KeyAlgorithm::EdDSA);
    let decoding = DecodingKey::from_jwk(&jwk).map_err(|e| invalid(format!("public key: {e}")))?;
    Ok(SigningKey {
        kid: kid.to_owned(),
        encoding,
        decoding,
        jwk,
    })
}

pub use tollgate_common::claims::generate_ed25519_pem as generate_pem;

fn load_dir(dir: &Path, active_kid: Option<&str>) -> Result<KeyRing, KeyError> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| KeyError::Io(format!("{}: {e}", dir.display())))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "pem"))
        .collect();
    files.sort();
    let mut keys = Vec::new();
    for path in files {
        let kid = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        let pem =
            std::fs::read(&path).map_err(|e| KeyError::Io(format!("{}: {e}", path.display())))?;
        keys.push(parse_key(&kid, &pem)?);
    }
    if keys.is_empty() {
        return Err(KeyError::Missing);
    }
    let active = match active_kid {
        Some(kid) => keys
            .iter()
            .position(|k| k.kid == kid)
            .ok_or_else(|| KeyError::Invalid {
                kid: kid.to_owned(),
                message: format!("the active kid is not among the keys in {}", dir.display()),
            })?,
        None => keys.len() - 1,
    };
    Ok(KeyRing { keys, active })
}

impl KeyRing {
    /// Loads the configured keys; with none configured but a data directory, generates (once) a
    /// development key under `<data_dir>/jwt/`.
    pub fn load(jwt: &JwtConfig, data_dir: Option<&Path>) -> Result<KeyRing, KeyError> {
        if let (Some(pem), Some(kid)) = (&jwt.private_key, &jwt.kid) {
            let key = parse_key(kid, pem.expose().as_bytes())?;
            return Ok(KeyRing {
                keys: vec![key],
                active: 0,
            });
        }
        if let Some(dir) = &jwt.keys_dir {
            return load_dir(dir, jwt.active_kid.as_deref());
        }
        let Some(data_dir) = data_dir else {
            return Err(KeyError::Missing);
        };
        let dir = data_dir.join("jwt");
        std::fs::create_dir_all(&dir)
            .map_err(|e| KeyError::Io(format!("{}: {e}", dir.display())))?;
        let has_key = std::fs::read_dir(&dir)
            .map_err(|e| KeyError::Io(format!("{}: {e}", dir.display())))?
            .filter_map(Result::ok)
            .any(|e| e.path().extension().is_some_and(|x| x == "pem"));
        if !has_key {
            let kid = format!("dev-{}", chrono::Utc::now().format("%Y%m%d%H%M%S"));
            let path = dir.join(format!("{kid}.pem"));
            write_private(&path, generate_pem().as_bytes())
                .map_err(|e| KeyError::Io(format!("{}: {e}", path.display())))?;
            tracing::warn!(path = %path.display(), "generated a development signing key");
        }
        load_dir(&dir, jwt.active_kid.as_deref())
    }

    pub fn active(&self) -> &SigningKey {
        &self.keys[self.active]
    }

    pub fn by_kid(&self, kid: &str) -> Option<&SigningKey> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    /// The public JWK Set served at `/.well-known/jwks.json`.
    pub fn jwks(&self) -> JwkSet {
        JwkSet {
            keys: self.keys.iter().map(|k| k.jwk.clone()).collect(),
        }
    }
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}
