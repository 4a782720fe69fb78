//! WeChat Pay API v3, Native (QR code) payments.
//!
//! Requests carry `Authorization: WECHATPAY2-SHA256-RSA2048 mchid="…",nonce_str="…",
//! timestamp="…",serial_no="…",signature="…"`, a SHA256withRSA signature with the merchant key over
//! `METHOD\nURL\nTIMESTAMP\nNONCE\nBODY\n`. Responses and notifications are verified over
//! `TIMESTAMP\nNONCE\nBODY\n` (the raw body) with the platform key named by `Wechatpay-Serial`,
//! and refused when the timestamp is more than five minutes off. A notification's resource is
//! AEAD_AES_256_GCM-encrypted with the APIv3 key.

use std::collections::HashMap;
use std::time::Duration;

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use serde_json::Value;

use super::{PayError, RsaSigner, RsaVerifier};

/// A signed message's timestamp may be this far from our clock.
pub const MAX_SKEW_SECONDS: i64 = 300;

pub struct WechatConfig {
    /// e.g. `https://api.mch.weixin.qq.com`; the signed URL is the path after it.
    pub api_base: String,
    pub mchid: String,
    pub appid: String,
    pub merchant_serial: String,
    pub merchant_key: RsaSigner,
    /// Platform keys (certificates' or the newer WeChat Pay public key) by serial.
    pub platform_keys: HashMap<String, RsaVerifier>,
    pub apiv3_key: [u8; 32],
    pub notify_url: String,
}

pub struct Wechat {
    cfg: WechatConfig,
    http: reqwest::Client,
}

/// The headers of a signed response or notification.
pub struct SignedHeaders<'a> {
    pub timestamp: &'a str,
    pub nonce: &'a str,
    pub signature: &'a str,
    pub serial: &'a str,
}

/// The decrypted transaction of a notification or a query.
#[derive(Debug, Clone, Deserialize)]
pub struct Transaction {
    pub appid: Option<String>,
    pub mchid: Option<String>,
    pub out_trade_no: String,
    pub transaction_id: Option<String>,
    pub trade_state: String,
    pub amount: Option<Amount>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Amount {
    pub total: i64,
}

impl Transaction {
    /// This transaction as a payment reported by `event`.
    pub fn payment(self, event: String) -> super::Payment {
        super::Payment {
            paid: self.trade_state == "SUCCESS",
            out_trade_no: self.out_trade_no,
            event,
            trade_no: self.transaction_id.unwrap_or_default(),
            total_fen: self.amount.map_or(-1, |a| a.total),
        }
    }
}

impl SignedHeaders<'_> {
    /// The `Wechatpay-*` headers of a notification (empty when absent: then it does not verify).
    pub fn of(headers: &http::HeaderMap) -> SignedHeaders<'_> {
        let h = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
        };
        SignedHeaders {
            timestamp: h("wechatpay-timestamp"),
            nonce: h("wechatpay-nonce"),
            signature: h("wechatpay-signature"),
            serial: h("wechatpay-serial"),
        }
    }
}

#[derive(Deserialize)]
struct Notification {
    event_type: String,
    resource: Resource,
}

#[derive(Deserialize)]
struct Resource {
    algorithm: String,
    ciphertext: String,
    #[serde(default)]
    associated_data: String,
    nonce: String,
}

fn nonce() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    (0..32)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

/// AEAD_AES_256_GCM as WeChat Pay uses it: base64 ciphertext with the 16-byte tag appended.
pub fn decrypt(
    key: &[u8; 32],
    nonce: &str,
    associated_data: &str,
    ciphertext_b64: &str,
) -> Result<Vec<u8>, PayError> {
    let ciphertext = STANDARD
        .decode(ciphertext_b64)
        .map_err(|_| PayError::Invalid("ciphertext is not base64".to_owned()))?;
    if nonce.len() != 12 {
        return Err(PayError::Invalid("nonce must be 12 bytes".to_owned()));
    }
    Aes256Gcm::new(key.into())
        .decrypt(
            Nonce::from_slice(nonce.as_bytes()),
            Payload {
                msg: &ciphertext,
                aad: associated_data.as_bytes(),
            },
        )
        .map_err(|_| PayError::Invalid("resource does not decrypt".to_owned()))
}

impl Wechat {
    pub fn new(cfg: WechatConfig, http: reqwest::Client) -> Wechat {
        Wechat { cfg, http }
    }

    /// The `Authorization` header of one request.
    pub fn authorization(
        &self,
        method: &str,
        url_path: &str,
        body: &str,
        timestamp: i64,
        nonce: &str,
    ) -> String {
        let message = format!("{method}\n{url_path}\n{timestamp}\n{nonce}\n{body}\n");
        let signature = self.cfg.merchant_key.sign(message.as_bytes());
        format!(
            "WECHATPAY2-SHA256-RSA2048 mchid=\"{}\",nonce_str=\"{nonce}\",timestamp=\"{timestamp}\",serial_no=\"{}\",signature=\"{signature}\"",
            self.cfg.mchid, self.cfg.merchant_serial
        )
    }

    /// Verifies a response or notification over its raw body.
    pub fn verify(
        &self,
        headers: &SignedHeaders<'_>,
        body: &[u8],
        now: i64,
    ) -> Result<(), PayError> {
        let ts: i64 = headers
            .timestamp
            .parse()
            .map_err(|_| PayError::Invalid("bad Wechatpay-Timestamp".to_owned()))?;
        if (now - ts).abs() > MAX_SKEW_SECONDS {
            return Err(PayError::Invalid(
                "Wechatpay-Timestamp is too far from now".to_owned(),
            ));
        }
        let key = self
            .cfg
            .platform_keys
            .get(headers.serial)
            .ok_or_else(|| PayError::Invalid("unknown Wechatpay-Serial".to_owned()))?;
        let mut message = format!("{}\n{}\n", headers.timestamp, headers.nonce).into_bytes();
        message.extend_from_slice(body);
        message.push(b'\n');
        key.verify(&message, headers.signature)
    }

    /// Verifies and decrypts a payment notification; checks it is for this merchant.
    pub fn verify_notification(
        &self,
        headers: &SignedHeaders<'_>,
        body: &[u8],
        now: i64,
    ) -> Result<(String, Transaction), PayError> {
        self.verify(headers, body, now)?;
        let notification: Notification = serde_json::from_slice(body)
            .map_err(|_| PayError::Invalid("notification is not the expected JSON".to_owned()))?;
        if notification.resource.algorithm != "AEAD_AES_256_GCM" {
            return Err(PayError::Invalid(
                "unsupported resource algorithm".to_owned(),
            ));
        }
        let plain = decrypt(
            &self.cfg.apiv3_key,
            &notification.resource.nonce,
            &notification.resource.associated_data,
            &notification.resource.ciphertext,
        )?;
        let transaction: Transaction = serde_json::from_slice(&plain)
            .map_err(|_| PayError::Invalid("resource is not a transaction".to_owned()))?;
        self.check_merchant(&transaction)?;
        Ok((notification.event_type, transaction))
    }

    fn check_merchant(&self, t: &Transaction) -> Result<(), PayError> {
        if t.appid.as_deref() != Some(self.cfg.appid.as_str()) {
            return Err(PayError::Invalid(
                "transaction for another appid".to_owned(),
            ));
        }
        if t.mchid.as_deref() != Some(self.cfg.mchid.as_str()) {
            return Err(PayError::Invalid(
                "transaction for another mchid".to_owned(),
            ));
        }
        Ok(())
    }

    /// One signed API call; the response's signature is verified before its body is trusted.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, String), PayError> {
        let body = body.map(Value::to_string).unwrap_or_default();
        let timestamp = chrono::Utc::now().timestamp();
        let nonce = nonce();
        let auth = self.authorization(method.as_str(), path, &body, timestamp, &nonce);
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.cfg.api_base))
            .header("Authorization", auth)
            .header("Accept", "application/json")
            .timeout(Duration::from_secs(10));
        if !body.is_empty() {
            request = request
                .header("Content-Type", "application/json")
                .body(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| PayError::Unreachable(e.to_string()))?;
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let (timestamp, nonce, signature, serial) = (
            header("Wechatpay-Timestamp"),
            header("Wechatpay-Nonce"),
            header("Wechatpay-Signature"),
            header("Wechatpay-Serial"),
        );
        let raw = response
            .bytes()
            .await
            .map_err(|e| PayError::Unreachable(e.to_string()))?;
        self.verify(
            &SignedHeaders {
                timestamp: &timestamp,
                nonce: &nonce,
                signature: &signature,
                serial: &serial,
            },
            &raw,
            chrono::Utc::now().timestamp(),
        )?;
        Ok((status, String::from_utf8_lossy(&raw).into_owned()))
    }

    /// Creates a Native order; returns the `code_url` the QR code encodes.
    pub async fn native(
        &self,
        out_trade_no: &str,
        description: &str,
        total_fen: i64,
        expires_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<String, PayError> {
        let body = serde_json::json!({
            "appid": self.cfg.appid,
            "mchid": self.cfg.mchid,
            "description": description,
            "out_trade_no": out_trade_no,
            "time_expire": expires_at.with_timezone(&chrono_tz::Asia::Shanghai).to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
            "notify_url": self.cfg.notify_url,
            "amount": {"total": total_fen, "currency": "CNY"},
        });
        let (status, text) = self
            .call(
                reqwest::Method::POST,
                "/v3/pay/transactions/native",
                Some(&body),
            )
            .await?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        match (status, v.get("code_url").and_then(Value::as_str)) {
            (200, Some(code_url)) => Ok(code_url.to_owned()),
            _ => Err(PayError::Refused(format!("native order: {status} {text}"))),
        }
    }

    /// The transaction as WeChat Pay knows it; `None` if it does not.
    pub async fn query(&self, out_trade_no: &str) -> Result<Option<Transaction>, PayError> {
        let path = format!(
            "/v3/pay/transactions/out-trade-no/{out_trade_no}?mchid={}",
            self.cfg.mchid
        );
        let (status, text) = self.call(reqwest::Method::GET, &path, None).await?;
        match status {
            200 => {
                let t: Transaction = serde_json::from_str(&text).map_err(|_| {
                    PayError::Invalid("query answer is not a transaction".to_owned())
                })?;
                self.check_merchant(&t)?;
                Ok(Some(t))
            }
            404 => Ok(None),
            _ => Err(PayError::Refused(format!("query: {status} {text}"))),
        }
    }

    pub async fn close(&self, out_trade_no: &str) -> Result<(), PayError> {
        let path = format!("/v3/pay/transactions/out-trade-no/{out_trade_no}/close");
        let body = serde_json::json!({"mchid": self.cfg.mchid});
        let (status, text) = self.call(reqwest::Method::POST, &path, Some(&body)).await?;
        match status {
            200 | 204 | 404 => Ok(()),
            _ => Err(PayError::Refused(format!("close: {status} {text}"))),
        }
    }

    pub async fn refund(
        &self,
        out_trade_no: &str,
        out_refund_no: &str,
        refund: i64,
        total: i64,
    ) -> Result<(), PayError> {
        let body = serde_json::json!({
            "out_trade_no": out_trade_no,
            "out_refund_no": out_refund_no,
            "amount": {"refund": refund, "total": total, "currency": "CNY"},
        });
        let (status, text) = self
            .call(
                reqwest::Method::POST,
                "/v3/refund/domestic/refunds",
                Some(&body),
            )
            .await?;
        if status == 200 {
            Ok(())
        } else {
            Err(PayError::Refused(format!("refund: {status} {text}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey, LineEnding};

    use super::*;

    /// wechatpay-go's published test key (`utils/sign_test.go`, `core/notify/notify_test.go`).
    const WECHATPAY_GO_TEST_KEY: &str = "-----BEGIN PRIVATE KEY-----
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

    fn wechat_with_go_key() -> Wechat {
        let private = rsa::RsaPrivateKey::from_pkcs8_pem(WECHATPAY_GO_TEST_KEY).expect("key");
        let public = private
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("pem");
        Wechat::new(
            WechatConfig {
                api_base: "https://api.mch.weixin.qq.com".to_owned(),
                mchid: "1234567890".to_owned(),
                appid: "wx0000000000000001".to_owned(),
                merchant_serial: "SERIAL".to_owned(),
                merchant_key: RsaSigner::from_pem(WECHATPAY_GO_TEST_KEY).expect("signer"),
                platform_keys: [(
                    "PLATFORM".to_owned(),
                    RsaVerifier::from_pem(&public).expect("verifier"),
                )]
                .into(),
                apiv3_key: *b"0123456789abcdef0123456789abcdef",
                notify_url: "https://example.com/notify".to_owned(),
            },
            reqwest::Client::new(),
        )
    }

    /// wechatpay-go `utils/sign_test.go` TestSha256WithRsa: SHA256withRSA("source").
    #[test]
    fn signing_matches_the_wechatpay_go_vector() {
        let expected = "BKyAfU4iMCuvXMXS0Wzam3V/cnxZ+JaqigPM5OhljS2iOT95OO6Fsuml2JkFANJU9K6q9bLlDhPXuoV\
            z+pp4hAm6pHU4ld815U4jsKu1RkyaII+1CYBUYC8TK0XtJ8FwUXXz8vZHh58rrAVN1XwNyvD1vfpxrMT4SL536GLwvpUHlCqIMzoZUguLl\
            i/K8V29QiOhuH6IEqLNJn8e9b3nwNcQ7be3CzYGpDAKBfDGPCqCv8Rw5zndhlffk2FEA70G4hvMwe51qMN/RAJbknXG23bSlObuTCN7Ndj\
            1aJGH6/L+hdwfLpUtJm4QYVazzW7DFD27EpSQEqA8bX9+8m1rLg==";
        let signer = RsaSigner::from_pem(WECHATPAY_GO_TEST_KEY).expect("signer");
        assert_eq!(signer.sign(b"source"), expected);
    }

    /// wechatpay-go `core/notify/notify_test.go`: a real signed notification verifies over
    /// `TIMESTAMP\nNONCE\nBODY\n`; another timestamp, a stale clock or a changed body does not.
    #[test]
    fn a_published_notification_verifies() {
        let wechat = wechat_with_go_key();
        let body = concat!(
            "{",
            "\"id\":\"3119dfba-e649-5eec-ab1e-3412bc4d2e17\",",
            "\"create_time\":\"2021-06-24T16:37:26+08:00\",",
            "\"resource_type\":\"encrypt-resource\",",
            "\"event_type\":\"PAYSCORE.USER_OPEN_SERVICE\",",
            "\"summary\":\"签约成功\",",
            "\"resource\":{",
            "\"original_type\":\"payscore\",",
            "\"algorithm\":\"AEAD_AES_256_GCM\",",
            "\"ciphertext\":\"YDS3lKPaC4Y52Gf3uhft5qUBlIa8b428AWTtTauHQfQrRw+X1WpiuHIDy0vo1Vd6VEq67aVyqPdDYMkRVSDaZL3iZt",
            "tevRMOoPKMifozg6XPWjIZumks/GpT48lI4NizyeaqLBokNebthah3o1H76qSlO9NkDjp9bzmKLEYYH9TEklFUpsvPqOTOcgSLgh21YJXYR",
            "7dEBXFgRLiNIKRgO5JdXh1hccRUAlyVWxE54PXpnQ==\",",
            "\"associated_data\":\"payscore\",",
            "\"nonce\":\"Kj7QIyUiYx1q\"}",
            "}"
        );
        let signature = concat!(
            "tJHIiIS9eB2hAYstmAmbbD3ZE5LiIm/Ug5tuL4fC0YOFRWIHV39UFIZXC0e9Wl6lBu6sKvkqDkzpqzBsVHyXF",
            "lbYZTOQrVdG4b6LfTnK4mikv9++ixJMd3vTf2yCqvBkh98zs3Ds5zsYQakzbcwhmw4fMJs4nPLws28H0UW9FjDR//rxELLwXvV1VEA1I",
            "BLX70xptjL8hrfUjEE8kkry6yNJTHZRU8CAc7qHli2Ng1V1qb9ARbK8A3ThmFmPQvRGrapI/jS2laKKgYUmfdEdkNO6B2Cke5e8VTxY4",
            "06ArAmQ90GAihDwIcb16TQMnzCMBoutnwZKNiKRACrFmtxw2Q=="
        );
        let headers = |timestamp| SignedHeaders {
            timestamp,
            nonce: "EcZ9Cmy4Xyx1i6RlJQzLcCyEqDa26NBz",
            signature,
            serial: "PLATFORM",
        };
        let at = 1_624_523_846;
        wechat
            .verify(&headers("1624523846"), body.as_bytes(), at)
            .expect("verifies");
        assert!(
            wechat
                .verify(&headers("1624523847"), body.as_bytes(), at)
                .is_err()
        );
        assert!(
            wechat
                .verify(
                    &headers("1624523846"),
                    body.replace("签约", "解约").as_bytes(),
                    at
                )
                .is_err()
        );
        assert!(
            wechat
                .verify(&headers("1624523846"), body.as_bytes(), at + 301)
                .is_err(),
            "more than five minutes off"
        );
    }

    #[test]
    fn the_authorization_header_signs_the_canonical_request() {
        let wechat = wechat_with_go_key();
        let header = wechat.authorization(
            "POST",
            "/v3/pay/transactions/native",
            "{\"a\":1}",
            1_700_000_000,
            "NONCE",
        );
        let signer = RsaSigner::from_pem(WECHATPAY_GO_TEST_KEY).expect("signer");
        let expected =
            signer.sign(b"POST\n/v3/pay/transactions/native\n1700000000\nNONCE\n{\"a\":1}\n");
        assert!(header.starts_with("WECHATPAY2-SHA256-RSA2048 mchid=\"1234567890\",nonce_str=\"NONCE\",timestamp=\"1700000000\",serial_no=\"SERIAL\",signature=\""));
        assert!(header.ends_with(&format!("signature=\"{expected}\"")));
    }

    #[test]
    fn aes_256_gcm_round_trips_and_refuses_tampering() {
        let key = *b"0123456789abcdef0123456789abcdef";
        let ciphertext = Aes256Gcm::new((&key).into())
            .encrypt(
                Nonce::from_slice(b"abcdefghijkl"),
                Payload {
                    msg: b"{\"a\":1}",
                    aad: b"transaction",
                },
            )
            .expect("encrypt");
        let b64 = STANDARD.encode(&ciphertext);
        assert_eq!(
            decrypt(&key, "abcdefghijkl", "transaction", &b64).expect("decrypts"),
            b"{\"a\":1}"
        );
        assert!(decrypt(&key, "abcdefghijkl", "other", &b64).is_err());
        assert!(decrypt(&key, "abcdefghijkm", "transaction", &b64).is_err());
        assert!(decrypt(&key, "short", "transaction", &b64).is_err());
    }
}
