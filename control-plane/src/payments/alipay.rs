//! Alipay open platform, RSA2: `alipay.trade.page.pay` (PC), `alipay.trade.wap.pay` (H5), and the
//! `query` / `close` / `refund` APIs; asynchronous notifications.
//!
//! Signing a request: every parameter but `sign`, empty values dropped, keys sorted, raw values
//! joined `k=v&…` (`sign_type` included), SHA256withRSA with the app's private key, base64.
//! Verifying a notification: the form decoded once, `sign` and `sign_type` dropped, the rest sorted
//! and joined the same way, verified with Alipay's public key. Verifying a sync response: the raw
//! bytes of the `<method>_response` value as they stand in the body — never re-serialised JSON.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::Value;
use serde_json::value::RawValue;

use super::{PayError, RsaSigner, RsaVerifier};

pub struct AlipayConfig {
    /// e.g. `https://openapi.alipay.com/gateway.do`.
    pub gateway_url: String,
    pub app_id: String,
    /// The merchant's Alipay user id (`2088…`), checked on notifications.
    pub seller_id: String,
    pub app_key: RsaSigner,
    pub alipay_key: RsaVerifier,
    pub notify_url: String,
    pub return_url: String,
}

pub struct Alipay {
    cfg: AlipayConfig,
    http: reqwest::Client,
}

/// The canonical string both sides sign: sorted, empty values dropped, `sign` (and, for
/// notifications, `sign_type`) left out.
pub fn sign_content(params: &BTreeMap<String, String>, include_sign_type: bool) -> String {
    params
        .iter()
        .filter(|(k, v)| !v.is_empty() && *k != "sign" && (include_sign_type || *k != "sign_type"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// A verified payment notification.
#[derive(Debug, Clone)]
pub struct Notify {
    pub out_trade_no: String,
    pub trade_no: String,
    pub trade_status: String,
    pub total_fen: i64,
    pub notify_id: String,
}

impl From<Notify> for super::Payment {
    fn from(n: Notify) -> super::Payment {
        // Only these two statuses mean the money arrived.
        let paid = matches!(n.trade_status.as_str(), "TRADE_SUCCESS" | "TRADE_FINISHED");
        super::Payment {
            out_trade_no: n.out_trade_no,
            event: n.trade_status,
            trade_no: n.trade_no,
            total_fen: n.total_fen,
            paid,
        }
    }
}

/// What `alipay.trade.query` says of an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TradeState {
    NotFound,
    WaitBuyerPay,
    Paid { trade_no: String, total_fen: i64 },
    Closed,
}

fn shanghai_now() -> String {
    chrono::Utc::now()
        .with_timezone(&chrono_tz::Asia::Shanghai)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

impl Alipay {
    pub fn new(cfg: AlipayConfig, http: reqwest::Client) -> Alipay {
        Alipay { cfg, http }
    }

    pub fn app_id(&self) -> &str {
        &self.cfg.app_id
    }

    /// The signed parameters of one call.
    pub fn signed_params(
        &self,
        method: &str,
        biz_content: &Value,
        with_urls: bool,
    ) -> BTreeMap<String, String> {
        let mut params: BTreeMap<String, String> = [
            ("app_id", self.cfg.app_id.clone()),
            ("method", method.to_owned()),
            ("format", "JSON".to_owned()),
            ("charset", "utf-8".to_owned()),
            ("sign_type", "RSA2".to_owned()),
            ("timestamp", shanghai_now()),
            ("version", "1.0".to_owned()),
            ("biz_content", biz_content.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        if with_urls {
            params.insert("notify_url".to_owned(), self.cfg.notify_url.clone());
            params.insert("return_url".to_owned(), self.cfg.return_url.clone());
        }
        let signature = self
            .cfg
            .app_key
            .sign(sign_content(&params, true).as_bytes());
        params.insert("sign".to_owned(), signature);
        params
    }

    /// The URL the buyer opens to pay: the gateway with the signed request.
    pub fn pay_url(
        &self,
        out_trade_no: &str,
        subject: &str,
        total_fen: i64,
        wap: bool,
        expires_at: chrono::DateTime<chrono::Utc>,
    ) -> String {
        let (method, product_code) = if wap {
            ("alipay.trade.wap.pay", "QUICK_WAP_WAY")
        } else {
            ("alipay.trade.page.pay", "FAST_INSTANT_TRADE_PAY")
        };
        let biz = serde_json::json!({
            "out_trade_no": out_trade_no,
            "total_amount": super::fen_to_yuan(total_fen),
            "subject": subject,
            "product_code": product_code,
            "time_expire": expires_at.with_timezone(&chrono_tz::Asia::Shanghai).format("%Y-%m-%d %H:%M:%S").to_string(),
        });
        let params = self.signed_params(method, &biz, true);
        let query = serde_urlencoded::to_string(&params).unwrap_or_default();
        format!("{}?{query}", self.cfg.gateway_url)
    }

    /// Verifies an asynchronous notification (the raw form body) and checks it is for this
    /// merchant. The amount and the order are the caller's to check.
    pub fn verify_notify(&self, body: &[u8]) -> Result<Notify, PayError> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
            .map_err(|_| PayError::Invalid("notification is not a form".to_owned()))?;
        let mut params = BTreeMap::new();
        for (k, v) in pairs {
            if params.insert(k.clone(), v).is_some() {
                return Err(PayError::Invalid(format!("parameter {k} appears twice")));
            }
        }
        let sign = params.get("sign").cloned().ok_or(PayError::BadSignature)?;
        if params.get("sign_type").is_some_and(|t| t != "RSA2") {
            return Err(PayError::Invalid("sign_type must be RSA2".to_owned()));
        }
        self.cfg
            .alipay_key
            .verify(sign_content(&params, false).as_bytes(), &sign)?;
        let get = |k: &str| params.get(k).cloned().unwrap_or_default();
        if get("app_id") != self.cfg.app_id {
            return Err(PayError::Invalid(
                "notification for another app_id".to_owned(),
            ));
        }
        if params.contains_key("seller_id") && get("seller_id") != self.cfg.seller_id {
            return Err(PayError::Invalid(
                "notification for another seller".to_owned(),
            ));
        }
        let total_fen = super::yuan_to_fen(&get("total_amount"))
            .ok_or_else(|| PayError::Invalid("total_amount is not an amount".to_owned()))?;
        Ok(Notify {
            out_trade_no: get("out_trade_no"),
            trade_no: get("trade_no"),
            trade_status: get("trade_status"),
            total_fen,
            notify_id: get("notify_id"),
        })
    }

    /// Verifies a sync response over the raw bytes of `<method>_response` and returns it parsed.
    pub fn verify_response(&self, method: &str, body: &str) -> Result<Value, PayError> {
        let top: HashMap<String, Box<RawValue>> = serde_json::from_str(body)
            .map_err(|_| PayError::Invalid("response is not a JSON object".to_owned()))?;
        let node = format!("{}_response", method.replace('.', "_"));
        let raw = top
            .get(&node)
            .ok_or_else(|| PayError::Invalid(format!("response has no {node}")))?;
        let sign: String = top
            .get("sign")
            .and_then(|s| serde_json::from_str(s.get()).ok())
            .ok_or(PayError::BadSignature)?;
        self.cfg.alipay_key.verify(raw.get().as_bytes(), &sign)?;
        serde_json::from_str(raw.get()).map_err(|_| PayError::Invalid("bad response".to_owned()))
    }

    async fn call(&self, method: &str, biz: Value) -> Result<Value, PayError> {
        let params = self.signed_params(method, &biz, false);
        let response = self
            .http
            .post(&self.cfg.gateway_url)
            .form(&params)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| PayError::Unreachable(e.to_string()))?;
        let body = response
            .text()
            .await
            .map_err(|e| PayError::Unreachable(e.to_string()))?;
        self.verify_response(method, &body)
    }

    pub async fn query(&self, out_trade_no: &str) -> Result<TradeState, PayError> {
        let r = self
            .call(
                "alipay.trade.query",
                serde_json::json!({"out_trade_no": out_trade_no}),
            )
            .await?;
        let text = |k: &str| {
            r.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        if text("code") != "10000" {
            if text("sub_code") == "ACQ.TRADE_NOT_EXIST" {
                return Ok(TradeState::NotFound);
            }
            return Err(PayError::Refused(format!(
                "{} {}",
                text("sub_code"),
                text("sub_msg")
            )));
        }
        Ok(match text("trade_status").as_str() {
            "TRADE_SUCCESS" | "TRADE_FINISHED" => TradeState::Paid {
                trade_no: text("trade_no"),
                total_fen: super::yuan_to_fen(&text("total_amount")).unwrap_or(-1),
            },
            "TRADE_CLOSED" => TradeState::Closed,
            _ => TradeState::WaitBuyerPay,
        })
    }

    pub async fn close(&self, out_trade_no: &str) -> Result<(), PayError> {
        let r = self
            .call(
                "alipay.trade.close",
                serde_json::json!({"out_trade_no": out_trade_no}),
            )
            .await?;
        let code = r.get("code").and_then(Value::as_str).unwrap_or_default();
        let sub = r
            .get("sub_code")
            .and_then(Value::as_str)
            .unwrap_or_default();
        // Never opened by the buyer: nothing to close at the gateway.
        if code == "10000" || sub == "ACQ.TRADE_NOT_EXIST" {
            Ok(())
        } else {
            Err(PayError::Refused(format!("close: {code} {sub}")))
        }
    }

    pub async fn refund(
        &self,
        out_trade_no: &str,
        fen: i64,
        request_no: &str,
    ) -> Result<(), PayError> {
        let r = self
            .call(
                "alipay.trade.refund",
                serde_json::json!({
                    "out_trade_no": out_trade_no,
                    "refund_amount": super::fen_to_yuan(fen),
                    "out_request_no": request_no,
                }),
            )
            .await?;
        match r.get("code").and_then(Value::as_str) {
            Some("10000") => Ok(()),
            other => Err(PayError::Refused(format!("refund: {other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(alipay_public_key: &str, app_id: &str, seller_id: &str) -> Alipay {
        use rsa::pkcs8::{EncodePrivateKey, LineEnding};
        let app_key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("key");
        let app_pem = app_key.to_pkcs8_pem(LineEnding::LF).expect("pem");
        Alipay::new(
            AlipayConfig {
                gateway_url: "https://openapi.alipay.com/gateway.do".to_owned(),
                app_id: app_id.to_owned(),
                seller_id: seller_id.to_owned(),
                app_key: RsaSigner::from_pem(&app_pem).expect("signer"),
                alipay_key: RsaVerifier::from_pem(alipay_public_key).expect("verifier"),
                notify_url: "https://example.com/notify".to_owned(),
                return_url: "https://example.com/return".to_owned(),
            },
            reqwest::Client::new(),
        )
    }

    /// A real `trade_status_sync` notification and the Alipay public key that signed it, from
    /// the official Node SDK's tests (alipay-sdk-nodejs-all `test/alipay.test.js`, "verify sign
    /// should delete sign_type"). The key is given as the one-line base64 Alipay's console shows.
    #[test]
    fn a_real_alipay_notification_verifies_and_a_changed_amount_does_not() {
        let alipay = client(
            "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAqObrdC7hrgAVM98tK0nv3hSQRGGKT4lBsQjHiGjeYZjOPIPHR5knm2jnnz/YGIXIofVHkA/tAlBAd5DrY7YpvI4tP5EONLtZKC2ghBMx7McI2wRD0xiqzxOQr1FuhZGJ8/AUokBzJrzY+aGX2xcOrxFYRlFilvVLTXg4LWjR1tdPkO6+i7wQZAIVMClPkwVRZEbaERRHlKqTzv2gGv5rDU8gRoe1LeaN+6BlbTqHWkQcNCUNrA8C6l17XAXGKDsm/9TFWwO8EPHHHCaQdjtV5/FdcWIt+L8SR1ss7EXTjYDFtxcKVv9rEoY1lX8T4mX+GbXfZHraG5NCF1+XioL5JwIDAQAB",
            "2019073166072302",
            "2088531891668739",
        );
        let params: Vec<(&str, &str)> = vec![
            ("gmt_create", "2019-08-15 15:37:55"),
            ("charset", "utf-8"),
            ("seller_email", "z97-yuquerevenue@service.aliyun.com"),
            ("subject", "语雀空间 500人规模"),
            (
                "sign",
                "QUxj7MQ0NQT++AyDbykzTw6iWflrgfY7EIssTaNfJaDkOHqZAFv3hbr97h+z/LCkmnqkBq+V81uHtb3q+i19W1B7FlMNfJB8XPSFD3xdHXEzvj9ccFTE9gxCEG+3oub4TeNe+rrOCt+3cfOFRh5jZzAiZbEZQem3ZMdhIHz/I6TVGNWuPOL4Wr56/Vjq57BLZUPKYpDo7DVfNEYeu0dZ76irMhE4a5FJ26c6qQu9gnG6NmKhtn+tSI6859RKF9bzptbM49klrliVnjBI4m6y7f329Ur9lecC/UlbIo3vKDFmcsLlADKu64FT5jjyRVaVQcP64khZdJwRdzrJ5QxxxQ==",
            ),
            ("buyer_id", "2088102534368455"),
            ("invoice_amount", "0.10"),
            ("notify_id", "2019081500222153759068450559621257"),
            // As delivered: JSON text (the Node test holds it as an object and stringifies it).
            (
                "fund_bill_list",
                r#"[{"amount":"0.10","fundChannel":"ALIPAYACCOUNT"}]"#,
            ),
            ("notify_type", "trade_status_sync"),
            ("trade_status", "TRADE_SUCCESS"),
            ("receipt_amount", "0.10"),
            ("buyer_pay_amount", "0.10"),
            ("app_id", "2019073166072302"),
            ("sign_type", "RSA2"),
            ("seller_id", "2088531891668739"),
            ("gmt_payment", "2019-08-15 15:37:58"),
            ("notify_time", "2019-08-15 15:37:59"),
            ("version", "1.0"),
            ("out_trade_no", "20190815153750722-564-55"),
            ("total_amount", "0.10"),
            ("trade_no", "2019081522001468450509133591"),
            ("auth_app_id", "2019073166072302"),
            ("buyer_logon_id", "xud***@126.com"),
            ("point_amount", "0.00"),
        ];
        let body = serde_urlencoded::to_string(&params).expect("form");
        let notify = alipay.verify_notify(body.as_bytes()).expect("verifies");
        assert_eq!(notify.out_trade_no, "20190815153750722-564-55");
        assert_eq!(notify.total_fen, 10);
        assert!(crate::payments::Payment::from(notify).paid);
        let forged = body.replace("total_amount=0.10", "total_amount=100.00");
        assert!(matches!(
            alipay.verify_notify(forged.as_bytes()),
            Err(PayError::BadSignature)
        ));
        // Right signature, but for another merchant's app.
        let other = client(
            "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAqObrdC7hrgAVM98tK0nv3hSQRGGKT4lBsQjHiGjeYZjOPIPHR5knm2jnnz/YGIXIofVHkA/tAlBAd5DrY7YpvI4tP5EONLtZKC2ghBMx7McI2wRD0xiqzxOQr1FuhZGJ8/AUokBzJrzY+aGX2xcOrxFYRlFilvVLTXg4LWjR1tdPkO6+i7wQZAIVMClPkwVRZEbaERRHlKqTzv2gGv5rDU8gRoe1LeaN+6BlbTqHWkQcNCUNrA8C6l17XAXGKDsm/9TFWwO8EPHHHCaQdjtV5/FdcWIt+L8SR1ss7EXTjYDFtxcKVv9rEoY1lX8T4mX+GbXfZHraG5NCF1+XioL5JwIDAQAB",
            "2021000000000001",
            "2088531891668739",
        );
        assert!(matches!(
            other.verify_notify(body.as_bytes()),
            Err(PayError::Invalid(_))
        ));
    }

    /// A real sync response from the Node SDK's tests (checkResponseSign "normal"): verified over
    /// the raw bytes of the `…_response` value, `\/` escapes included; re-serialised, it fails.
    #[test]
    fn sync_responses_verify_over_the_raw_bytes() {
        let alipay = client(
            "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA6kdjvWNCT+K3qQQgAyv+
8k0+lkrL6+dA+cb9OAX5sZgIxP2ycK51VYxwZgZgHCIWCkB/l/Zqqhye/E6x/nNM
SqRkW3FGpP4/hKWByG3Ah8DXRcUaAvd8aCWHcBpgZqjBp3ADPTcHViI10cGe0mn1
3wGaIZQl6G74CtnY6YQJ/1NkoE+C9Z0VD4xor4oJOZW1/rbc85InBmjU87BWtxmk
IQWWVw+Vwd0EL8oDU9GWNZ1Se9sZf4UHxs+goHh3/JhQly3iKqlt/hgFsip78kvd
eDwoL8gS6RCUi+Bp6j9Ee5Thd+CC61Ilk7iKiUQMMVn6+kdTGcV2XwUBezH2Go4d
lwIDAQAB
-----END PUBLIC KEY-----",
            "2019073166072302",
            "2088531891668739",
        );
        let raw = r#"{"alipay_offline_material_image_upload_response":{"code":"10000","msg":"Success","image_id":"akGwYYaFTai3r1uB0ww-1QAAACMAAQQD","image_url":"https:\/\/oalipay-dl-django.alicdn.com\/rest\/1.0\/image?fileIds=akGwYYaFTai3r1uB0ww-1QAAACMAAQQD&zoom=original"},"sign":"PAb3IueJzGe/pU/fRAPjwIs543Kc/A6D0rz03AMejwr8h8rDc6FhDJDnz3fGLDdQP7ctjtQwwJW3pmdZZcGmp4lb/5YYgtoK6McjnRr4ER/raJLYn1IbpzkowhGow2esA/XeDblIAYUbZjU6ts0IqNncrZrCknDWHpaZXwGuaU7CUBk74xBeMeja7rEEkFlm9MRtiQNYnum/cGVtcDv/aQ8KkPyAD58oJiAzoXv0R6jFhlZtAWv+M0SaOlhTpZh1K6wlP+1Umiqdvqbc1oWdfpv75a+lGTkGHMy8K7/bnAGm20IRsisSv1B5rpJyeGfrVf6tb4MZ7vG4w0rS0c2hfA=="}"#;
        let value = alipay
            .verify_response("alipay.offline.material.image.upload", raw)
            .expect("verifies");
        assert_eq!(value["code"], "10000");
        let reserialised: serde_json::Value = serde_json::from_str(raw).expect("json");
        assert!(matches!(
            alipay.verify_response(
                "alipay.offline.material.image.upload",
                &reserialised.to_string()
            ),
            Err(PayError::BadSignature)
        ));
    }

    #[test]
    fn the_signing_string_sorts_drops_empties_and_sign() {
        let params: BTreeMap<String, String> = [
            ("sign", "xxx"),
            ("sign_type", "RSA2"),
            ("app_id", "2014072300007148"),
            ("method", "alipay.trade.query"),
            ("biz_content", "{\"out_trade_no\":\"1\"}"),
            ("empty", ""),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(
            sign_content(&params, true),
            "app_id=2014072300007148&biz_content={\"out_trade_no\":\"1\"}&method=alipay.trade.query&sign_type=RSA2"
        );
        assert_eq!(
            sign_content(&params, false),
            "app_id=2014072300007148&biz_content={\"out_trade_no\":\"1\"}&method=alipay.trade.query"
        );
    }
}
