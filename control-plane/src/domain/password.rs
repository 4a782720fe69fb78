//! Password rules and hashing: argon2id at OWASP's current parameters, as PHC strings.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

/// Bounds on a password's length, in characters (API.md).
pub const MIN_CHARS: usize = 8;
pub const MAX_CHARS: usize = 256;

/// OWASP Password Storage Cheat Sheet: argon2id, m = 19 MiB, t = 2, p = 1.
pub const MEMORY_KIB: u32 = 19 * 1024;
pub const ITERATIONS: u32 = 2;
pub const PARALLELISM: u32 = 1;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PasswordError {
    #[error("password must be at least {MIN_CHARS} characters")]
    TooShort,
    #[error("password must be at most {MAX_CHARS} characters")]
    TooLong,
    #[error("password hashing failed: {0}")]
    Hash(String),
}

/// Checks the length rules of the contract.
pub fn check_rules(password: &str) -> Result<(), PasswordError> {
    // Count at most MAX_CHARS + 1 characters so a huge input costs no more than a valid one.
    let chars = password.chars().take(MAX_CHARS + 1).count();
    if chars < MIN_CHARS {
        Err(PasswordError::TooShort)
    } else if chars > MAX_CHARS {
        Err(PasswordError::TooLong)
    } else {
        Ok(())
    }
}

fn argon2() -> Argon2<'static> {
    let params = Params::new(MEMORY_KIB, ITERATIONS, PARALLELISM, None)
        .expect("the OWASP parameters are valid argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes a password into a PHC string. CPU-heavy: call it off the async threads.
pub fn hash(password: &str) -> Result<String, PasswordError> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    argon2()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| PasswordError::Hash(e.to_string()))
}

/// Verifies a password against a stored PHC string. CPU-heavy: call it off the async threads.
pub fn verify(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => argon2()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_rules() {
        let check = |p: &str, want: Result<(), PasswordError>| assert_eq!(check_rules(p), want);
        check("short", Err(PasswordError::TooShort));
        check("12345678", Ok(()));
        check(&"é".repeat(MAX_CHARS), Ok(()));
        check(&"x".repeat(MAX_CHARS + 1), Err(PasswordError::TooLong));
        check(&"x".repeat(1 << 20), Err(PasswordError::TooLong));
    }

    #[test]
    fn hash_is_argon2id_with_owasp_parameters_and_verifies() {
        let phc = hash("correct horse battery").expect("hashes");
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(verify("correct horse battery", &phc));
        assert!(!verify("wrong horse battery", &phc));
        assert!(!verify("anything", "not a phc string"));
    }
}
