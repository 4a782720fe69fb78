//! The primitives both gateways are built from: SHA256withRSA (PKCS#1 v1.5) signatures in base64,
//! AEAD_AES_256_GCM as WeChat Pay uses it (ASCII nonce, ASCII associated data, tag appended to the
//! ciphertext), and the random identifiers gateways hand out.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes128Gcm, Aes256Gcm, KeyInit, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rand::Rng as _;
use rsa::pkcs1v15::{Signature, SigningKey, VerifyingKey};
use rsa::signature::{SignatureEncoding as _, Signer as _, Verifier as _};
use sha2::Sha256;

/// Signs `message` with SHA256withRSA and returns the signature in standard base64, which is
/// what both Alipay (`sign`) and WeChat Pay (`signature=`, `Wechatpay-Signature`) carry.
pub fn sign(key: &SigningKey<Sha256>, message: &[u8]) -> String {
    BASE64.encode(key.sign(message).to_bytes())
}

/// Whether `signature_b64` is a valid SHA256withRSA signature of `message`. Anything that does
/// not decode is simply not valid.
pub fn verify(key: &VerifyingKey<Sha256>, message: &[u8], signature_b64: &str) -> bool {
    let Ok(raw) = BASE64.decode(signature_b64.as_bytes()) else {
        return false;
    };
    let Ok(signature) = Signature::try_from(raw.as_slice()) else {
        return false;
    };
    key.verify(message, &signature).is_ok()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AeadError {
    #[error("the key must be 16 or 32 bytes, not {0}")]
    KeyLength(usize),
    #[error("the nonce must be 12 bytes, not {0}")]
    NonceLength(usize),
    #[error("the ciphertext does not decrypt with this key, nonce and associated data")]
    Decrypt,
    #[error("encryption failed")]
    Encrypt,
}

/// AES-GCM encryption with the tag appended, as WeChat Pay's `resource.ciphertext` (before
/// base64). The APIv3 key is 32 ASCII bytes (AES-256); a 16-byte key selects AES-128, exactly as
/// Go's `aes.NewCipher` in wechatpay-go does, which is what its published test vectors use.
pub fn aead_seal(
    key: &[u8],
    nonce: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, AeadError> {
    if nonce.len() != 12 {
        return Err(AeadError::NonceLength(nonce.len()));
    }
    let nonce = Nonce::from_slice(nonce);
    let payload = Payload {
        msg: plaintext,
        aad,
    };
    match key.len() {
        32 => Aes256Gcm::new_from_slice(key)
            .map_err(|_| AeadError::KeyLength(key.len()))?
            .encrypt(nonce, payload),
        16 => Aes128Gcm::new_from_slice(key)
            .map_err(|_| AeadError::KeyLength(key.len()))?
            .encrypt(nonce, payload),
        n => return Err(AeadError::KeyLength(n)),
    }
    .map_err(|_| AeadError::Encrypt)
}

/// The inverse of [`aead_seal`]: checks the tag and returns the plaintext.
pub fn aead_open(
    key: &[u8],
    nonce: &[u8],
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<Vec<u8>, AeadError> {
    if nonce.len() != 12 {
        return Err(AeadError::NonceLength(nonce.len()));
    }
    let nonce = Nonce::from_slice(nonce);
    let payload = Payload {
        msg: ciphertext,
        aad,
    };
    match key.len() {
        32 => Aes256Gcm::new_from_slice(key)
            .map_err(|_| AeadError::KeyLength(key.len()))?
            .decrypt(nonce, payload),
        16 => Aes128Gcm::new_from_slice(key)
            .map_err(|_| AeadError::KeyLength(key.len()))?
            .decrypt(nonce, payload),
        n => return Err(AeadError::KeyLength(n)),
    }
    .map_err(|_| AeadError::Decrypt)
}

pub fn base64_encode(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    BASE64.decode(text.as_bytes()).ok()
}

/// Letters and digits, as in WeChat Pay nonces and `pr=` tokens.
pub fn random_alphanumeric(len: usize) -> String {
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// Decimal digits, as in Alipay trade numbers and notify ids.
pub fn random_digits(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(b'0' + rng.random_range(0..10u8)))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use rsa::RsaPrivateKey;
    use rsa::pkcs8::DecodePrivateKey as _;

    use super::*;

    /// wechatpay-go's test key (`utils/sign_test.go`, `core/auth/signers/sha256withrsa_signer_test.go`,
    /// `core/notify/notify_test.go`), PKCS#8. The Go tests spell the PEM label "TESTING KEY" so
    /// secret scanners leave it alone; it is the same key.
    pub(crate) const WECHATPAY_GO_TEST_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDZUJN33V+dSfvd
fL0Mu+39XrZNXFFMQSy1V15FpncHeV47SmV0TzTqZc7hHB0ddqAdDi8Z5k3TKqb7
6sOwYr5TcAfuR6PIPaleyE0/0KrljBum2Isa2Nyq7Dgc3ElBQ6YN4l/a+DpvKaz1
FSKmKrhLNskqokWVSlu4g8OlKlbPXQ9ibII14MZRQrrkTmHYHzfi7GXXM0thAKuR
0HNvyhTHBh4/lrYM3GaMvmWwkwvsMavnOex6+eioZHBOb1/EIZ/LzC6zuHArPpyW
3daGaZ1rtQB1vVzTyERAVVFsXXgBHvfFud3w3ShsJYk8JvMwK2RpJ5/gV0QSARcm
LDRUAlPzAgMBAAECggEBAMc7rDeUaXiWv6bMGbZ3BTXpg1FhdddnWUnYE8HfX/km
OFI7XtBHXcgYFpcjYz4D5787pcsk7ezPidAj58zqenuclmjKnUmT3pfbI5eCA2v4
C9HnbYDrmUPK1ZcADtka4D6ScDccpNYNa1g2TFHzkIrEa6H+q7S3O2fqxY/DRVtN
0JIXalBb8daaqL5QVzSmM2BMVnHy+YITJWIkP2a3pKs9C0W65JGDsnG0wVrHinHF
+cnhFZIbaPEI//DAFMc9NkrWOKVRTEgcCUxCFaHOZVNxDWZD7A2ZfJB2rK6eg//y
gEiFDR2h6mTaDowMB4YF2n2dsIO4/dCG8vPHI20jn4ECgYEA/ZGu6lEMlO0XZnam
AZGtiNgLcCfM/C2ZERZE7QTRPZH1WdK92Al9ndldsswFw4baJrJLCmghjF/iG4zi
hhBvLnOLksnZUfjdumxoHDWXo2QBWbI5QsWIE7AuTiWgWj1I7X4fCXSQf6i+M/y2
6TogQ7d0ANpZFyOkTNMn/tiJvLECgYEA22XqlamG/yfAGWery5KNH2DGlTIyd6xJ
WtJ9j3jU99lZ0bCQ5xhiBbU9ImxCi3zgTsoqLWgA/p00HhNFNoUcTl9ofc0G3zwT
D1y0ZzcnVKxGJdZ6ohW52V0hJStAigtjYAsUgjm7//FH7PiQDBDP1Wa6xSRkDQU/
aSbQxvEE8+MCgYEA3bb8krW7opyM0XL9RHH0oqsFlVO30Oit5lrqebS0oHl3Zsr2
ZGgoBlWBsEzk3UqUhTFwm/DhJLTSJ/TQPRkxnhQ5/mewNhS9C7yua7wQkzVmWN+V
YeUGTvDGDF6qDz12/vJAgSwDDRym8x4NcXD5tTw7mmNRcwIfL22SkysThIECgYAV
BgccoEoXWS/HP2/u6fQr9ZIR6eV8Ij5FPbZacTG3LlS1Cz5XZra95UgebFFUHHtC
EY1JHJY7z8SWvTH8r3Su7eWNaIAoFBGffzqqSVazfm6aYZsOvRY6BfqPHT3p/H1h
Tq6AbBffxrcltgvXnCTORjHPglU0CjSxVs7awW3AEQKBgB5WtaC8VLROM7rkfVIq
+RXqE5vtJfa3e3N7W3RqxKp4zHFAPfr82FK5CX2bppEaxY7SEZVvVInKDc5gKdG/
jWNRBmvvftZhY59PILHO2X5vO4FXh7suEjy6VIh0gsnK36mmRboYIBGsNuDHjXLe
BDa+8mDLkWu5nHEhOxy2JJZl
-----END PRIVATE KEY-----";

    pub(crate) fn wechatpay_go_key() -> RsaPrivateKey {
        RsaPrivateKey::from_pkcs8_pem(WECHATPAY_GO_TEST_KEY).expect("the published test key parses")
    }

    /// wechatpay-go `utils/sign_test.go` TestSha256WithRsa (the same value in
    /// `core/auth/signers/sha256withrsa_signer_test.go`): SHA256withRSA("source").
    #[test]
    fn sha256_with_rsa_matches_wechatpay_go_vector() {
        let expected = "BKyAfU4iMCuvXMXS0Wzam3V/cnxZ+JaqigPM5OhljS2iOT95OO6Fsuml2JkFANJU9K6q9bLlDhPXuoV\
            z+pp4hAm6pHU4ld815U4jsKu1RkyaII+1CYBUYC8TK0XtJ8FwUXXz8vZHh58rrAVN1XwNyvD1vfpxrMT4SL536GLwvpUHlCqIMzoZUguLl\
            i/K8V29QiOhuH6IEqLNJn8e9b3nwNcQ7be3CzYGpDAKBfDGPCqCv8Rw5zndhlffk2FEA70G4hvMwe51qMN/RAJbknXG23bSlObuTCN7Ndj\
            1aJGH6/L+hdwfLpUtJm4QYVazzW7DFD27EpSQEqA8bX9+8m1rLg==";
        let key = wechatpay_go_key();
        let signing = SigningKey::<Sha256>::new(key.clone());
        assert_eq!(sign(&signing, b"source"), expected);
        let verifying = VerifyingKey::<Sha256>::new(key.to_public_key());
        assert!(verify(&verifying, b"source", expected));
        assert!(!verify(&verifying, b"sourcf", expected));
        assert!(!verify(&verifying, b"source", "not base64!"));
        assert!(!verify(&verifying, b"source", "c2hvcnQ="));
    }

    /// wechatpay-go `utils/aes_test.go` TestDecryptAes256Gcm: every case of its table.
    #[test]
    fn aead_matches_wechatpay_go_vectors() {
        struct Case {
            name: &'static str,
            key: &'static str,
            ciphertext: &'static str,
            plaintext: Option<&'static str>,
        }
        const KEY: &str = "testAPIv3Key0000";
        const CIPHERTEXT: &str = "FsdXzxryWfKwvLJKf8LG/ToRPTRh8RN9wROC";
        const NONCE: &str = "wCq51qZv4Yfg";
        const AAD: &str = "Dl56FrqWQJF1t9LtC3vEUsniZKvbqdR8";
        let cases = [
            Case {
                name: "decrypt success",
                key: KEY,
                ciphertext: CIPHERTEXT,
                plaintext: Some("Hello World"),
            },
            Case {
                name: "invalid base64",
                key: KEY,
                ciphertext: "invalid cipher",
                plaintext: None,
            },
            Case {
                name: "invalid ciphertext",
                key: KEY,
                ciphertext: "SGVsbG8gV29ybGQK",
                plaintext: None,
            },
            Case {
                name: "invalid aes key",
                key: "not a aes key",
                ciphertext: CIPHERTEXT,
                plaintext: None,
            },
            Case {
                name: "wrong aes key",
                key: "testAPIv3Key1111",
                ciphertext: CIPHERTEXT,
                plaintext: None,
            },
        ];
        for case in cases {
            let got = base64_decode(case.ciphertext).and_then(|bytes| {
                aead_open(
                    case.key.as_bytes(),
                    NONCE.as_bytes(),
                    AAD.as_bytes(),
                    &bytes,
                )
                .ok()
            });
            assert_eq!(
                got.as_deref(),
                case.plaintext.map(str::as_bytes),
                "case {:?}",
                case.name
            );
        }
        // And sealing reproduces the published ciphertext byte for byte.
        let sealed = aead_seal(
            KEY.as_bytes(),
            NONCE.as_bytes(),
            AAD.as_bytes(),
            b"Hello World",
        )
        .unwrap();
        assert_eq!(base64_encode(&sealed), CIPHERTEXT);
    }

    #[test]
    fn aes_256_round_trip_and_tamper() {
        let key = b"0123456789abcdef0123456789abcdef";
        let sealed = aead_seal(key, b"abcdefghijkl", b"transaction", b"{\"a\":1}").unwrap();
        assert_eq!(sealed.len(), 7 + 16, "the 16-byte tag is appended");
        assert_eq!(
            aead_open(key, b"abcdefghijkl", b"transaction", &sealed).unwrap(),
            b"{\"a\":1}"
        );
        assert_eq!(
            aead_open(key, b"abcdefghijkl", b"other", &sealed),
            Err(AeadError::Decrypt)
        );
        assert_eq!(
            aead_open(key, b"short", b"transaction", &sealed),
            Err(AeadError::NonceLength(5))
        );
    }

    #[test]
    fn random_identifiers_have_the_asked_shape() {
        let digits = random_digits(28);
        assert_eq!(digits.len(), 28);
        assert!(digits.bytes().all(|b| b.is_ascii_digit()));
        let nonce = random_alphanumeric(32);
        assert_eq!(nonce.len(), 32);
        assert!(nonce.bytes().all(|b| b.is_ascii_alphanumeric()));
    }
}
