//! The simulator from the merchant's side: keys from `paysim/gen-keys.sh`, the simulator on
//! 127.0.0.1:0, and this file playing the merchant with its OWN signing, verification and
//! decryption code (nothing from the crate's protocol modules), plus a small axum server that
//! receives the notifications.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rsa::pkcs1v15::{Signature, SigningKey, VerifyingKey};
use rsa::pkcs8::{DecodePrivateKey as _, DecodePublicKey as _};
use rsa::signature::{SignatureEncoding as _, Signer as _, Verifier as _};
use rsa::{RsaPrivateKey, RsaPublicKey};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::oneshot;

// ---------------------------------------------------------------------------------------------
// Keys and the simulator

/// One key folder for the whole test binary (and any concurrent one): gen-keys.sh only adds
/// what is missing and locks the folder, so this is safe to share.
fn key_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("paysim-test-keys");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("gen-keys.sh");
        let status = std::process::Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .status()
            .expect("run gen-keys.sh");
        assert!(status.success(), "gen-keys.sh failed");
        dir
    })
}

fn read(name: &str) -> String {
    std::fs::read_to_string(key_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn private_key(name: &str) -> SigningKey<Sha256> {
    SigningKey::new(RsaPrivateKey::from_pkcs8_pem(&read(name)).unwrap())
}

fn public_key(name: &str) -> VerifyingKey<Sha256> {
    VerifyingKey::new(RsaPublicKey::from_public_key_pem(&read(name)).unwrap())
}

/// The merchant: its own private keys, the gateways' public keys, the ids.
struct Merchant {
    alipay_app: SigningKey<Sha256>,
    alipay_gateway: VerifyingKey<Sha256>,
    wechat_merchant: SigningKey<Sha256>,
    wechat_platform: VerifyingKey<Sha256>,
    ids: BTreeMap<String, String>,
    apiv3_key: String,
}

impl Merchant {
    fn load() -> Merchant {
        let ids = read("ids.env")
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Merchant {
            alipay_app: private_key("alipay_app_private.pem"),
            alipay_gateway: public_key("alipay_gateway_public.pem"),
            wechat_merchant: private_key("wechat_merchant_private.pem"),
            wechat_platform: public_key("wechat_platform_public.pem"),
            ids,
            apiv3_key: read("wechat_apiv3_key"),
        }
    }

    fn id(&self, name: &str) -> &str {
        &self.ids[name]
    }
}

fn sign(key: &SigningKey<Sha256>, message: &[u8]) -> String {
    B64.encode(key.sign(message).to_bytes())
}

fn verifies(key: &VerifyingKey<Sha256>, message: &[u8], signature: &str) -> bool {
    let Ok(raw) = B64.decode(signature) else {
        return false;
    };
    let Ok(signature) = Signature::try_from(raw.as_slice()) else {
        return false;
    };
    key.verify(message, &signature).is_ok()
}

struct Sim {
    base: String,
    client: reqwest::Client,
    merchant: Merchant,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn start() -> Sim {
    let env: BTreeMap<String, String> = [
        (
            "PAYSIM_KEYS_DIR".to_owned(),
            key_dir().display().to_string(),
        ),
        ("PAYSIM_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
    ]
    .into();
    let config = tollgate_paysim::Config::from_env(&env).expect("config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        tollgate_paysim::run(config, listener, async {
            let _ = stopped.await;
        })
        .await
        .expect("run");
    });
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    Sim {
        base,
        client,
        merchant: Merchant::load(),
        stop: Some(stop),
    }
}

impl Sim {
    async fn sim_post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn order(&self, out_trade_no: &str) -> Value {
        self.client
            .get(format!("{}/sim/orders/{out_trade_no}", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// The merchant's notification endpoint

#[derive(Clone, Debug)]
struct Hit {
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Default)]
struct Inbox {
    alipay: Mutex<Vec<Hit>>,
    wechat: Mutex<Vec<Hit>>,
    /// How many of the next deliveries to refuse.
    refuse_alipay: AtomicUsize,
    refuse_wechat: AtomicUsize,
}

fn take_refusal(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

async fn alipay_notify(
    State(inbox): State<Arc<Inbox>>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    inbox.alipay.lock().unwrap().push(Hit { headers, body });
    if take_refusal(&inbox.refuse_alipay) {
        (StatusCode::BAD_REQUEST, "failure")
    } else {
        (StatusCode::OK, "success")
    }
}

async fn wechat_notify(
    State(inbox): State<Arc<Inbox>>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    inbox.wechat.lock().unwrap().push(Hit { headers, body });
    if take_refusal(&inbox.refuse_wechat) {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            r#"{"code":"FAIL","message":"busy"}"#,
        )
            .into_response()
    } else {
        StatusCode::NO_CONTENT.into_response()
    }
}

/// Starts the receiver; returns it and its base URL.
async fn inbox() -> (Arc<Inbox>, String) {
    let inbox = Arc::new(Inbox::default());
    let app = Router::new()
        .route("/alipay/notify", post(alipay_notify))
        .route("/wechat/notify", post(wechat_notify))
        .with_state(inbox.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (inbox, base)
}

async fn wait_for(what: &str, hits: &Mutex<Vec<Hit>>, count: usize) -> Vec<Hit> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = hits.lock().unwrap().clone();
        if now.len() >= count {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {} of {count} deliveries after 20 s",
            now.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..20]
    )
}

// ---------------------------------------------------------------------------------------------
// Alipay, merchant side

fn beijing_now(offset_seconds: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(offset_seconds))
        .with_timezone(&chrono_tz::Asia::Shanghai)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

/// Every parameter but the excluded ones, empty values dropped, sorted, raw `k=v&…`.
fn alipay_string(params: &[(String, String)], exclude: &[&str]) -> String {
    let mut pairs: Vec<_> = params
        .iter()
        .filter(|(k, v)| !v.is_empty() && !exclude.contains(&k.as_str()))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    pairs.sort();
    pairs.join("&")
}

type Params = Vec<(String, String)>;

impl Merchant {
    fn alipay_request(&self, method: &str, biz: Value, extra: &[(&str, &str)]) -> Params {
        let mut params: Params = vec![
            ("app_id".into(), self.id("ALIPAY_APP_ID").into()),
            ("method".into(), method.into()),
            ("format".into(), "JSON".into()),
            ("charset".into(), "utf-8".into()),
            ("sign_type".into(), "RSA2".into()),
            ("timestamp".into(), beijing_now(0)),
            ("version".into(), "1.0".into()),
            ("biz_content".into(), biz.to_string()),
        ];
        for (k, v) in extra {
            params.retain(|(name, _)| name != k);
            params.push(((*k).into(), (*v).into()));
        }
        let content = alipay_string(&params, &["sign"]);
        params.push(("sign".into(), sign(&self.alipay_app, content.as_bytes())));
        params
    }
}

fn form(params: &[(String, String)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish()
}

fn set(params: &mut Params, name: &str, value: &str) {
    for (k, v) in params.iter_mut() {
        if k == name {
            *v = value.to_owned();
        }
    }
}

impl Sim {
    /// An API call as a POST form; returns the `<method>_response` object after checking that
    /// `sign` (last) verifies over the raw bytes of that value.
    async fn alipay_api(&self, params: &Params) -> Value {
        let method = params
            .iter()
            .find(|(k, _)| k == "method")
            .map(|(_, v)| v.clone())
            .unwrap();
        let raw = self
            .client
            .post(format!("{}/alipay/gateway.do", self.base))
            .header(
                "Content-Type",
                "application/x-www-form-urlencoded;charset=utf-8",
            )
            .body(form(params))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let key = format!("{}_response", method.replace('.', "_"));
        let prefix = format!("{{\"{key}\":");
        let rest = raw
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{key} first: {raw}"));
        let end = rest
            .rfind(",\"sign\":\"")
            .unwrap_or_else(|| panic!("sign last: {raw}"));
        let value = &rest[..end];
        let parsed: Value = serde_json::from_str(&raw).unwrap();
        let signature = parsed["sign"].as_str().unwrap();
        assert!(
            verifies(&self.merchant.alipay_gateway, value.as_bytes(), signature),
            "response signature: {raw}"
        );
        assert!(raw.ends_with("\"}"), "sign is the last member: {raw}");
        parsed[key.as_str()].clone()
    }

    async fn alipay_page(&self, params: &Params) -> (StatusCode, String) {
        let response = self
            .client
            .get(format!("{}/alipay/gateway.do?{}", self.base, form(params)))
            .send()
            .await
            .unwrap();
        (response.status(), response.text().await.unwrap())
    }
}

fn page_pay_biz(out_trade_no: &str, amount: &str) -> Value {
    json!({
        "out_trade_no": out_trade_no,
        "total_amount": amount,
        "subject": "Tollgate Pro · 专业版",
        "product_code": "FAST_INSTANT_TRADE_PAY",
    })
}

/// Decodes a notification form once, checks its signature (without `sign` and `sign_type`).
fn verify_alipay_notification(merchant: &Merchant, hit: &Hit) -> BTreeMap<String, String> {
    assert!(
        hit.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/x-www-form-urlencoded"),
        "{:?}",
        hit.headers
    );
    let params: Params = form_urlencoded::parse(&hit.body).into_owned().collect();
    let signature = params
        .iter()
        .find(|(k, _)| k == "sign")
        .map(|(_, v)| v.clone())
        .unwrap();
    let content = alipay_string(&params, &["sign", "sign_type"]);
    assert!(
        verifies(&merchant.alipay_gateway, content.as_bytes(), &signature),
        "notification signature"
    );
    // The same string with sign_type kept (rsaCheckV2) must not verify: the gateway signs V1.
    assert!(!verifies(
        &merchant.alipay_gateway,
        alipay_string(&params, &["sign"]).as_bytes(),
        &signature
    ));
    params.into_iter().collect()
}

#[tokio::test]
async fn alipay_page_pay_notify_query_refund() {
    let sim = start().await;
    let (inbox, receiver) = inbox().await;
    let m = &sim.merchant;
    let no = unique("ali_");
    let notify_url = format!("{receiver}/alipay/notify");
    let return_url = "http://127.0.0.1:9/return";

    // Before the pay URL is opened the gateway knows nothing, as the real one.
    let (status, body) = sim.sim_post("/sim/pay", json!({"out_trade_no": no})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("pay URL"),
        "{body}"
    );

    let params = m.alipay_request(
        "alipay.trade.page.pay",
        page_pay_biz(&no, "99.00"),
        &[("notify_url", &notify_url), ("return_url", return_url)],
    );
    let (status, html) = sim.alipay_page(&params).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    assert!(
        html.contains(&no) && html.contains("99.00") && html.contains("专业版"),
        "{html}"
    );
    // Opening it again is the same request.
    assert_eq!(sim.alipay_page(&params).await.0, StatusCode::OK);

    let query = m.alipay_request("alipay.trade.query", json!({"out_trade_no": no}), &[]);
    let answer = sim.alipay_api(&query).await;
    assert_eq!(answer["code"], "10000");
    assert_eq!(answer["trade_status"], "WAIT_BUYER_PAY");
    assert_eq!(answer["total_amount"], "99.00");

    // The merchant refuses the first two deliveries; the gateway retries until `success`.
    inbox.refuse_alipay.store(2, Ordering::SeqCst);
    let (status, body) = sim.sim_post("/sim/pay", json!({"out_trade_no": no})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"out_trade_no": no, "channel": "alipay", "status": "paid"})
    );
    let hits = wait_for("alipay notify", &inbox.alipay, 3).await;
    for hit in &hits {
        assert_eq!(hit.body, hits[0].body, "a retry is the same notification");
    }
    let notification = verify_alipay_notification(m, &hits[0]);
    assert_eq!(notification["out_trade_no"], no);
    assert_eq!(notification["trade_status"], "TRADE_SUCCESS");
    assert_eq!(notification["total_amount"], "99.00");
    assert_eq!(notification["receipt_amount"], "99.00");
    assert_eq!(notification["app_id"], m.id("ALIPAY_APP_ID"));
    assert_eq!(notification["seller_id"], m.id("ALIPAY_SELLER_ID"));
    assert_eq!(notification["notify_type"], "trade_status_sync");
    assert_eq!(notification["charset"], "utf-8");
    assert_eq!(notification["sign_type"], "RSA2");
    assert_eq!(notification["subject"], "Tollgate Pro · 专业版");
    for time in ["notify_time", "gmt_create", "gmt_payment"] {
        assert!(
            chrono::NaiveDateTime::parse_from_str(&notification[time], "%Y-%m-%d %H:%M:%S").is_ok(),
            "{time}"
        );
    }
    // A forged amount does not verify.
    let mut forged: Params = form_urlencoded::parse(&hits[0].body).into_owned().collect();
    set(&mut forged, "total_amount", "0.01");
    let signature = forged.iter().find(|(k, _)| k == "sign").unwrap().1.clone();
    assert!(!verifies(
        &m.alipay_gateway,
        alipay_string(&forged, &["sign", "sign_type"]).as_bytes(),
        &signature
    ));

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        inbox.alipay.lock().unwrap().len(),
        3,
        "no delivery after `success`"
    );
    let seen = sim.order(&no).await;
    assert_eq!(seen["status"], "paid");
    assert_eq!(seen["notify"]["attempts"], 3);
    assert_eq!(seen["notify"]["acknowledged"], true);
    assert_eq!(seen["notify"]["history"][0]["status"], 400);
    assert_eq!(seen["notify"]["history"][0]["answer"], "failure");
    assert_eq!(seen["notify"]["last_answer"]["answer"], "success");

    // Paying twice is refused.
    assert_eq!(
        sim.sim_post("/sim/pay", json!({"out_trade_no": no}))
            .await
            .0,
        StatusCode::CONFLICT
    );

    let answer = sim
        .alipay_api(&m.alipay_request("alipay.trade.query", json!({"out_trade_no": no}), &[]))
        .await;
    assert_eq!(answer["trade_status"], "TRADE_SUCCESS");
    assert_eq!(answer["buyer_pay_amount"], "99.00");
    assert_eq!(answer["fund_bill_list"][0]["amount"], "99.00");
    let trade_no = answer["trade_no"].as_str().unwrap().to_owned();
    assert_eq!(trade_no, notification["trade_no"]);
    // By trade_no too.
    let answer = sim
        .alipay_api(&m.alipay_request("alipay.trade.query", json!({"trade_no": trade_no}), &[]))
        .await;
    assert_eq!(answer["out_trade_no"], no);

    // A paid trade cannot be closed.
    let answer = sim
        .alipay_api(&m.alipay_request("alipay.trade.close", json!({"out_trade_no": no}), &[]))
        .await;
    assert_eq!(answer["sub_code"], "ACQ.TRADE_STATUS_ERROR");

    // Refunds: a part, the same request again (no money moves), too much, the rest.
    let refund = |amount: &str, request_no: &str| {
        m.alipay_request(
            "alipay.trade.refund",
            json!({"out_trade_no": no, "refund_amount": amount, "out_request_no": request_no}),
            &[],
        )
    };
    let answer = sim.alipay_api(&refund("40.00", "r1")).await;
    assert_eq!(
        (answer["code"].as_str(), answer["fund_change"].as_str()),
        (Some("10000"), Some("Y"))
    );
    assert_eq!(answer["refund_fee"], "40.00");
    let answer = sim.alipay_api(&refund("40.00", "r1")).await;
    assert_eq!(
        (answer["code"].as_str(), answer["fund_change"].as_str()),
        (Some("10000"), Some("N"))
    );
    let answer = sim.alipay_api(&refund("60.00", "r2")).await;
    assert_eq!(answer["sub_code"], "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL");
    let answer = sim.alipay_api(&refund("59.00", "r2")).await;
    assert_eq!(answer["refund_fee"], "99.00");
    let answer = sim
        .alipay_api(&m.alipay_request("alipay.trade.query", json!({"out_trade_no": no}), &[]))
        .await;
    assert_eq!(answer["trade_status"], "TRADE_CLOSED", "fully refunded");

    // The same notification again, three times at once.
    let (status, body) = sim
        .sim_post(
            "/sim/notify-again",
            json!({"out_trade_no": no, "times": 3, "concurrent": true}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["acknowledged"], 3);
    let hits = wait_for("alipay notify again", &inbox.alipay, 6).await;
    assert!(hits.iter().all(|h| h.body == hits[0].body));
}

#[tokio::test]
async fn alipay_refuses_what_the_real_gateway_refuses() {
    let sim = start().await;
    let m = &sim.merchant;
    let no = unique("ali_");

    // Signed, then the amount changed: the page refuses with isv.invalid-signature.
    let mut params = m.alipay_request("alipay.trade.page.pay", page_pay_biz(&no, "99.00"), &[]);
    set(
        &mut params,
        "biz_content",
        &page_pay_biz(&no, "0.01").to_string(),
    );
    let (status, html) = sim.alipay_page(&params).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(html.contains("isv.invalid-signature"), "{html}");
    assert_eq!(
        sim.sim_post("/sim/pay", json!({"out_trade_no": no}))
            .await
            .0,
        StatusCode::NOT_FOUND
    );

    let check = async |params: Params, sub_code: &str| {
        let answer = sim.alipay_api(&params).await;
        assert_eq!(answer["sub_code"], sub_code, "{answer}");
        answer
    };
    let query = json!({"out_trade_no": no});
    // A signature by another key (the gateway's own public key cannot sign; use WeChat's).
    // (The error echoes the signed string, notify_url included: its slashes arrive as `\/`, and
    // the answer's signature still has to verify over the raw bytes.)
    let mut forged = m.alipay_request(
        "alipay.trade.query",
        query.clone(),
        &[("notify_url", "http://127.0.0.1:9/n")],
    );
    forged.pop();
    let content = alipay_string(&forged, &["sign"]);
    forged.push(("sign".into(), sign(&m.wechat_merchant, content.as_bytes())));
    let answer = check(forged, "isv.invalid-signature").await;
    assert_eq!(answer["code"], "40002");
    assert!(
        answer["sub_msg"]
            .as_str()
            .unwrap()
            .contains("notify_url=http://127.0.0.1:9/n"),
        "{answer}"
    );
    // RSA2 only.
    let mut params = m.alipay_request("alipay.trade.query", query.clone(), &[]);
    set(&mut params, "sign_type", "RSA");
    check(params, "isv.invalid-signature-type").await;
    check(
        m.alipay_request(
            "alipay.trade.query",
            query.clone(),
            &[("app_id", "2021000000009999")],
        ),
        "isv.invalid-app-id",
    )
    .await;
    check(
        m.alipay_request(
            "alipay.trade.query",
            query.clone(),
            &[("timestamp", &beijing_now(-11 * 60))],
        ),
        "isv.invalid-timestamp",
    )
    .await;
    check(
        m.alipay_request(
            "alipay.trade.query",
            query.clone(),
            &[("timestamp", "2024/01/01 00:00:00")],
        ),
        "isv.invalid-timestamp",
    )
    .await;
    let mut params = m.alipay_request("alipay.trade.query", query.clone(), &[]);
    params.retain(|(k, _)| k != "sign");
    check(params, "isv.missing-signature").await;
    let answer = check(
        m.alipay_request("alipay.trade.query", query.clone(), &[]),
        "ACQ.TRADE_NOT_EXIST",
    )
    .await;
    assert_eq!(answer["code"], "40004");

    // Registered, then the same out_trade_no with another amount.
    assert_eq!(
        sim.alipay_page(&m.alipay_request(
            "alipay.trade.page.pay",
            page_pay_biz(&no, "99.00"),
            &[]
        ))
        .await
        .0,
        StatusCode::OK
    );
    let (status, html) = sim
        .alipay_page(&m.alipay_request("alipay.trade.page.pay", page_pay_biz(&no, "1.00"), &[]))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(html.contains("ACQ.CONTEXT_INCONSISTENT"), "{html}");
    // wap.pay wants its own product code.
    let (status, html) = sim
        .alipay_page(&m.alipay_request(
            "alipay.trade.wap.pay",
            page_pay_biz(&unique("ali_"), "1.00"),
            &[],
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(html.contains("ACQ.INVALID_PARAMETER"), "{html}");
    let (status, html) = sim
        .alipay_page(&m.alipay_request(
            "alipay.trade.page.pay",
            page_pay_biz(&unique("ali_"), "1.001"),
            &[],
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(html.contains("total_amount"), "{html}");

    // Close an unpaid trade; it can no longer be paid.
    let answer = sim
        .alipay_api(&m.alipay_request("alipay.trade.close", query.clone(), &[]))
        .await;
    assert_eq!(answer["code"], "10000");
    let answer = sim
        .alipay_api(&m.alipay_request("alipay.trade.query", query.clone(), &[]))
        .await;
    assert_eq!(answer["trade_status"], "TRADE_CLOSED");
    let (status, body) = sim.sim_post("/sim/pay", json!({"out_trade_no": no})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "order_closed");
    // Refunding an unpaid trade is refused.
    let answer = sim
        .alipay_api(&m.alipay_request(
            "alipay.trade.refund",
            json!({"out_trade_no": no, "refund_amount": "1.00"}),
            &[],
        ))
        .await;
    assert_eq!(answer["sub_code"], "ACQ.TRADE_STATUS_ERROR");

    // An unknown method answers under error_response, signed.
    let params = m.alipay_request("alipay.trade.precreate", query, &[]);
    let raw = sim
        .client
        .post(format!("{}/alipay/gateway.do", sim.base))
        .body(form(&params))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let parsed: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(
        parsed["error_response"]["sub_code"], "isv.invalid-method",
        "{raw}"
    );
}

#[tokio::test]
async fn alipay_cashier_button_returns_to_the_merchant() {
    let sim = start().await;
    let (inbox, receiver) = inbox().await;
    let m = &sim.merchant;
    let no = unique("wap_");
    let biz = json!({"out_trade_no": no, "total_amount": 12.5, "subject": "H5", "product_code": "QUICK_WAP_WAY"});
    let notify_url = format!("{receiver}/alipay/notify");
    let params = m.alipay_request(
        "alipay.trade.wap.pay",
        biz,
        &[
            ("notify_url", &notify_url),
            ("return_url", "http://merchant.test/return?from=alipay"),
        ],
    );
    // wap.pay as a POSTed form (what the official SDKs' pageExecute submits).
    let response = sim
        .client
        .post(format!("{}/alipay/gateway.do", sim.base))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(form(&params))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let html = response.text().await.unwrap();
    assert!(
        html.contains("12.50") && html.contains("width=device-width"),
        "{html}"
    );

    let response = sim
        .client
        .post(format!("{}/sim/alipay/pay", sim.base))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!("out_trade_no={no}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let query = location
        .strip_prefix("http://merchant.test/return?from=alipay&")
        .expect(&location);
    let returned: Params = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let signature = returned
        .iter()
        .find(|(k, _)| k == "sign")
        .unwrap()
        .1
        .clone();
    assert!(verifies(
        &m.alipay_gateway,
        alipay_string(&returned, &["sign", "sign_type"]).as_bytes(),
        &signature
    ));
    let returned: BTreeMap<_, _> = returned.into_iter().collect();
    assert_eq!(returned["method"], "alipay.trade.wap.pay.return");
    assert_eq!(returned["total_amount"], "12.50");
    assert_eq!(returned["out_trade_no"], no);

    let hits = wait_for("alipay notify", &inbox.alipay, 1).await;
    assert_eq!(
        verify_alipay_notification(m, &hits[0])["total_amount"],
        "12.50"
    );
    // The button again: already paid.
    let response = sim
        .client
        .post(format!("{}/sim/alipay/pay", sim.base))
        .body(format!("out_trade_no={no}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
}

// ---------------------------------------------------------------------------------------------
// WeChat Pay, merchant side

struct Auth<'a> {
    mchid: &'a str,
    serial: &'a str,
    timestamp: i64,
    key: &'a SigningKey<Sha256>,
}

impl Merchant {
    fn auth(&self) -> Auth<'_> {
        Auth {
            mchid: self.id("WECHAT_MCHID"),
            serial: self.id("WECHAT_MERCHANT_SERIAL"),
            timestamp: chrono::Utc::now().timestamp(),
            key: &self.wechat_merchant,
        }
    }
}

fn authorization(auth: &Auth<'_>, method: &str, url: &str, body: &str) -> String {
    let nonce = uuid::Uuid::new_v4().simple().to_string().to_uppercase();
    let message = format!("{method}\n{url}\n{}\n{nonce}\n{body}\n", auth.timestamp);
    let signature = sign(auth.key, message.as_bytes());
    format!(
        r#"WECHATPAY2-SHA256-RSA2048 mchid="{}",nonce_str="{nonce}",signature="{signature}",timestamp="{}",serial_no="{}""#,
        auth.mchid, auth.timestamp, auth.serial
    )
}

struct Answer {
    status: StatusCode,
    body: Value,
}

impl Sim {
    /// One API call; checks the platform's signature on the answer, whatever its status.
    async fn wechat(&self, auth: &Auth<'_>, method: &str, url: &str, body: Option<&str>) -> Answer {
        self.wechat_signed_over(auth, method, url, body, body).await
    }

    /// Signs `signed_body` but sends `sent_body` (for tampering tests).
    async fn wechat_signed_over(
        &self,
        auth: &Auth<'_>,
        method: &str,
        url: &str,
        signed_body: Option<&str>,
        sent_body: Option<&str>,
    ) -> Answer {
        let header = authorization(auth, method, url, signed_body.unwrap_or(""));
        let mut request = self
            .client
            .request(
                method.parse().unwrap(),
                format!("{}/wechat{url}", self.base),
            )
            .header("Authorization", header)
            .header("Accept", "application/json");
        if let Some(body) = sent_body {
            request = request
                .header("Content-Type", "application/json")
                .body(body.to_owned());
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let get = |name: &str| {
            headers
                .get(name)
                .unwrap_or_else(|| panic!("{name} on {status}"))
                .to_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(
            get("Wechatpay-Serial"),
            self.merchant.id("WECHAT_PLATFORM_SERIAL")
        );
        let message = format!(
            "{}\n{}\n{text}\n",
            get("Wechatpay-Timestamp"),
            get("Wechatpay-Nonce")
        );
        assert!(
            verifies(
                &self.merchant.wechat_platform,
                message.as_bytes(),
                &get("Wechatpay-Signature")
            ),
            "answer signature ({status} {text})"
        );
        assert!(headers.contains_key("Request-ID"));
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        };
        Answer { status, body }
    }
}

fn native_body(m: &Merchant, no: &str, total: i64, notify_url: &str) -> String {
    json!({
        "appid": m.id("WECHAT_APPID"),
        "mchid": m.id("WECHAT_MCHID"),
        "description": "Tollgate Pro",
        "out_trade_no": no,
        "notify_url": notify_url,
        "amount": {"total": total, "currency": "CNY"},
    })
    .to_string()
}

/// Verifies the headers, then decrypts the resource.
fn verify_wechat_notification(m: &Merchant, hit: &Hit) -> (Value, Value) {
    let get = |name: &str| hit.headers[name].to_str().unwrap().to_owned();
    let body = std::str::from_utf8(&hit.body).unwrap();
    let message = format!(
        "{}\n{}\n{body}\n",
        get("wechatpay-timestamp"),
        get("wechatpay-nonce")
    );
    assert!(
        verifies(
            &m.wechat_platform,
            message.as_bytes(),
            &get("wechatpay-signature")
        ),
        "notification signature"
    );
    assert_eq!(get("wechatpay-serial"), m.id("WECHAT_PLATFORM_SERIAL"));
    assert_eq!(get("wechatpay-signature-type"), "WECHATPAY2-SHA256-RSA2048");
    let timestamp: i64 = get("wechatpay-timestamp").parse().unwrap();
    assert!((chrono::Utc::now().timestamp() - timestamp).abs() < 300);
    let event: Value = serde_json::from_str(body).unwrap();
    let resource = &event["resource"];
    assert_eq!(resource["algorithm"], "AEAD_AES_256_GCM");
    let cipher = Aes256Gcm::new_from_slice(m.apiv3_key.as_bytes()).unwrap();
    let nonce = resource["nonce"].as_str().unwrap().as_bytes();
    let ciphertext = B64
        .decode(resource["ciphertext"].as_str().unwrap())
        .unwrap();
    let plaintext = cipher
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: &ciphertext,
                aad: resource["associated_data"].as_str().unwrap().as_bytes(),
            },
        )
        .expect("the resource decrypts with the APIv3 key");
    // Another associated data does not decrypt.
    assert!(
        cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: &ciphertext,
                    aad: b"other"
                }
            )
            .is_err()
    );
    (event, serde_json::from_slice(&plaintext).unwrap())
}

#[tokio::test]
async fn wechat_native_order_notify_query_refund_close() {
    let sim = start().await;
    let (inbox, receiver) = inbox().await;
    let m = &sim.merchant;
    let notify_url = format!("{receiver}/wechat/notify");
    let no = unique("wx_");
    let body = native_body(m, &no, 9900, &notify_url);

    let created = sim
        .wechat(
            &m.auth(),
            "POST",
            "/v3/pay/transactions/native",
            Some(&body),
        )
        .await;
    assert_eq!(created.status, StatusCode::OK, "{}", created.body);
    let code_url = created.body["code_url"].as_str().unwrap().to_owned();
    assert!(
        code_url.starts_with("weixin://wxpay/bizpayurl?pr="),
        "{code_url}"
    );
    // The same request again answers the same; other content under the same number is refused.
    let again = sim
        .wechat(
            &m.auth(),
            "POST",
            "/v3/pay/transactions/native",
            Some(&body),
        )
        .await;
    assert_eq!(again.body["code_url"], code_url);
    let other = sim
        .wechat(
            &m.auth(),
            "POST",
            "/v3/pay/transactions/native",
            Some(&native_body(m, &no, 1, &notify_url)),
        )
        .await;
    assert_eq!(other.status, StatusCode::BAD_REQUEST);
    assert_eq!(other.body["code"], "INVALID_REQUEST");

    let mchid = m.id("WECHAT_MCHID");
    let query_url = format!("/v3/pay/transactions/out-trade-no/{no}?mchid={mchid}");
    let queried = sim.wechat(&m.auth(), "GET", &query_url, None).await;
    assert_eq!(queried.status, StatusCode::OK);
    assert_eq!(queried.body["trade_state"], "NOTPAY");
    assert_eq!(queried.body["amount"]["total"], 9900);

    // The QR page the code stands for.
    let pr = code_url.rsplit('=').next().unwrap();
    let page = sim
        .client
        .get(format!("{}/sim/wechat/qr/{pr}", sim.base))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.unwrap().contains("99.00"));

    // The merchant answers 500 twice; the platform retries until a 2xx.
    inbox.refuse_wechat.store(2, Ordering::SeqCst);
    let (status, paid) = sim.sim_post("/sim/pay", json!({"out_trade_no": no})).await;
    assert_eq!(status, StatusCode::OK, "{paid}");
    assert_eq!(paid["channel"], "wechat");
    let hits = wait_for("wechat notify", &inbox.wechat, 3).await;
    assert!(
        hits.iter().all(|h| h.body == hits[0].body),
        "a retry carries the same event"
    );
    let (event, transaction) = verify_wechat_notification(m, &hits[2]);
    assert_eq!(event["event_type"], "TRANSACTION.SUCCESS");
    assert_eq!(event["resource_type"], "encrypt-resource");
    assert_eq!(event["resource"]["original_type"], "transaction");
    assert_eq!(transaction["out_trade_no"], no);
    assert_eq!(transaction["trade_state"], "SUCCESS");
    assert_eq!(transaction["trade_type"], "NATIVE");
    assert_eq!(transaction["appid"], m.id("WECHAT_APPID"));
    assert_eq!(transaction["mchid"], mchid);
    assert_eq!(
        transaction["amount"],
        json!({"total": 9900, "payer_total": 9900, "currency": "CNY", "payer_currency": "CNY"})
    );
    assert!(transaction["payer"]["openid"].is_string());
    assert!(
        chrono::DateTime::parse_from_rfc3339(transaction["success_time"].as_str().unwrap()).is_ok()
    );
    let seen = sim.order(&no).await;
    assert_eq!(seen["notify"]["attempts"], 3);
    assert_eq!(seen["notify"]["history"][0]["status"], 500);
    assert_eq!(seen["notify"]["last_answer"]["status"], 204);
    assert_eq!(seen["gateway_status"], "SUCCESS");

    assert_eq!(
        sim.sim_post("/sim/pay", json!({"out_trade_no": no}))
            .await
            .0,
        StatusCode::CONFLICT
    );
    let queried = sim.wechat(&m.auth(), "GET", &query_url, None).await;
    assert_eq!(queried.body["trade_state"], "SUCCESS");
    assert_eq!(
        queried.body["transaction_id"],
        transaction["transaction_id"]
    );
    let by_id = format!(
        "/v3/pay/transactions/id/{}?mchid={mchid}",
        transaction["transaction_id"].as_str().unwrap()
    );
    assert_eq!(
        sim.wechat(&m.auth(), "GET", &by_id, None).await.body["out_trade_no"],
        no
    );

    // A paid order cannot be closed.
    let close_url = format!("/v3/pay/transactions/out-trade-no/{no}/close");
    let closed = sim
        .wechat(
            &m.auth(),
            "POST",
            &close_url,
            Some(&json!({"mchid": mchid}).to_string()),
        )
        .await;
    assert_eq!(
        (closed.status, closed.body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("ORDERPAID"))
    );

    let refund = |out_refund_no: &str, amount: i64, total: i64| {
        json!({"out_trade_no": no, "out_refund_no": out_refund_no, "amount": {"refund": amount, "total": total, "currency": "CNY"}})
            .to_string()
    };
    let refunded = sim
        .wechat(
            &m.auth(),
            "POST",
            "/v3/refund/domestic/refunds",
            Some(&refund("rf1", 900, 9900)),
        )
        .await;
    assert_eq!(refunded.status, StatusCode::OK, "{}", refunded.body);
    assert_eq!(refunded.body["status"], "SUCCESS");
    assert_eq!(refunded.body["amount"]["refund"], 900);
    let again = sim
        .wechat(
            &m.auth(),
            "POST",
            "/v3/refund/domestic/refunds",
            Some(&refund("rf1", 900, 9900)),
        )
        .await;
    assert_eq!(
        again.body["refund_id"], refunded.body["refund_id"],
        "the same out_refund_no is the same refund"
    );
    let too_much = sim
        .wechat(
            &m.auth(),
            "POST",
            "/v3/refund/domestic/refunds",
            Some(&refund("rf2", 9001, 9900)),
        )
        .await;
    assert_eq!(too_much.status, StatusCode::BAD_REQUEST);
    let wrong_total = sim
        .wechat(
            &m.auth(),
            "POST",
            "/v3/refund/domestic/refunds",
            Some(&refund("rf3", 1, 100)),
        )
        .await;
    assert_eq!(
        (wrong_total.status, wrong_total.body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("PARAM_ERROR"))
    );
    assert_eq!(
        sim.wechat(&m.auth(), "GET", "/v3/refund/domestic/refunds/rf1", None)
            .await
            .body["status"],
        "SUCCESS"
    );
    assert_eq!(
        sim.wechat(&m.auth(), "GET", &query_url, None).await.body["trade_state"],
        "REFUND"
    );

    // The same notification again, twice: same event id, freshly signed headers.
    let (status, body) = sim
        .sim_post("/sim/notify-again", json!({"out_trade_no": no, "times": 2}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let hits = wait_for("wechat notify again", &inbox.wechat, 5).await;
    let (event_again, _) = verify_wechat_notification(m, &hits[4]);
    assert_eq!(event_again["id"], event["id"]);

    // An unpaid order closes (204, signed over an empty body) and then cannot be paid.
    let other = unique("wx_");
    let created = sim
        .wechat(
            &m.auth(),
            "POST",
            "/v3/pay/transactions/native",
            Some(&native_body(m, &other, 100, &notify_url)),
        )
        .await;
    assert_eq!(created.status, StatusCode::OK);
    let close_url = format!("/v3/pay/transactions/out-trade-no/{other}/close");
    let closed = sim
        .wechat(
            &m.auth(),
            "POST",
            &close_url,
            Some(&json!({"mchid": mchid}).to_string()),
        )
        .await;
    assert_eq!(closed.status, StatusCode::NO_CONTENT);
    let url = format!("/v3/pay/transactions/out-trade-no/{other}?mchid={mchid}");
    assert_eq!(
        sim.wechat(&m.auth(), "GET", &url, None).await.body["trade_state"],
        "CLOSED"
    );
    assert_eq!(
        sim.sim_post("/sim/pay", json!({"out_trade_no": other}))
            .await
            .0,
        StatusCode::CONFLICT
    );
}

#[tokio::test]
async fn wechat_refuses_bad_signatures() {
    let sim = start().await;
    let m = &sim.merchant;
    let no = unique("wx_");
    let body = native_body(m, &no, 100, "http://127.0.0.1:9/notify");
    let url = "/v3/pay/transactions/native";
    let sign_error = async |answer: Answer, what: &str| {
        assert_eq!(
            answer.status,
            StatusCode::UNAUTHORIZED,
            "{what}: {}",
            answer.body
        );
        assert_eq!(answer.body["code"], "SIGN_ERROR", "{what}");
    };

    // Signed over one body, another sent (a changed amount).
    let tampered = native_body(m, &no, 1, "http://127.0.0.1:9/notify");
    sign_error(
        sim.wechat_signed_over(&m.auth(), "POST", url, Some(&body), Some(&tampered))
            .await,
        "tampered body",
    )
    .await;
    let stale = Auth {
        timestamp: chrono::Utc::now().timestamp() - 301,
        ..m.auth()
    };
    sign_error(
        sim.wechat(&stale, "POST", url, Some(&body)).await,
        "stale timestamp",
    )
    .await;
    let future = Auth {
        timestamp: chrono::Utc::now().timestamp() + 301,
        ..m.auth()
    };
    sign_error(
        sim.wechat(&future, "POST", url, Some(&body)).await,
        "future timestamp",
    )
    .await;
    let serial = Auth {
        serial: "0000000000000000000000000000000000000000",
        ..m.auth()
    };
    sign_error(
        sim.wechat(&serial, "POST", url, Some(&body)).await,
        "unknown serial",
    )
    .await;
    let mchid = Auth {
        mchid: "1900000999",
        ..m.auth()
    };
    sign_error(
        sim.wechat(&mchid, "POST", url, Some(&body)).await,
        "other merchant",
    )
    .await;
    let other_key = Auth {
        key: &m.alipay_app,
        ..m.auth()
    };
    sign_error(
        sim.wechat(&other_key, "POST", url, Some(&body)).await,
        "other key",
    )
    .await;
    // The URL is part of what is signed (the mount prefix is not).
    let header = authorization(
        &m.auth(),
        "POST",
        "/wechat/v3/pay/transactions/native",
        &body,
    );
    let response = sim
        .client
        .post(format!("{}/wechat{url}", sim.base))
        .header("Authorization", header)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = sim
        .client
        .post(format!("{}/wechat{url}", sim.base))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::UNAUTHORIZED,
        "no Authorization"
    );
    // Nothing above created the order.
    let query = format!(
        "/v3/pay/transactions/out-trade-no/{no}?mchid={}",
        m.id("WECHAT_MCHID")
    );
    let missing = sim.wechat(&m.auth(), "GET", &query, None).await;
    assert_eq!(
        (missing.status, missing.body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("ORDER_NOT_EXIST"))
    );
    // The query string is signed too.
    let header = authorization(&m.auth(), "GET", &query, "");
    let response = sim
        .client
        .get(format!(
            "{}/wechat{}",
            sim.base,
            query.replace("mchid=", "mchid=0")
        ))
        .header("Authorization", header)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    // Requests that are signed but wrong get the platform's parameter errors.
    let wrong_appid = body.replace(m.id("WECHAT_APPID"), "wx9999999999999999");
    let answer = sim.wechat(&m.auth(), "POST", url, Some(&wrong_appid)).await;
    assert_eq!(
        (answer.status, answer.body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("APPID_MCHID_NOT_MATCH"))
    );
    let answer = sim.wechat(&m.auth(), "POST", url, Some("{not json")).await;
    assert_eq!(
        (answer.status, answer.body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("PARAM_ERROR"))
    );
    let long_no = native_body(m, &"x".repeat(33), 100, "http://127.0.0.1:9/notify");
    let answer = sim.wechat(&m.auth(), "POST", url, Some(&long_no)).await;
    assert_eq!(
        answer.body["code"], "PARAM_ERROR",
        "out_trade_no is at most 32 characters"
    );
    let answer = sim
        .wechat(
            &m.auth(),
            "GET",
            "/v3/pay/transactions/out-trade-no/x",
            None,
        )
        .await;
    assert_eq!(answer.body["code"], "PARAM_ERROR", "mchid is required");
}

#[tokio::test]
async fn keys_and_health() {
    let sim = start().await;
    let keys: Value = sim
        .client
        .get(format!("{}/sim/keys", sim.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(keys["alipay"]["app_id"], sim.merchant.id("ALIPAY_APP_ID"));
    assert_eq!(
        keys["alipay"]["seller_id"],
        sim.merchant.id("ALIPAY_SELLER_ID")
    );
    assert_eq!(
        keys["alipay"]["app_public_key"],
        read("alipay_app_public.pem")
    );
    assert_eq!(
        keys["alipay"]["gateway_private_key"],
        read("alipay_gateway_private.pem")
    );
    assert_eq!(
        keys["alipay"]["gateway_public_key"],
        read("alipay_gateway_public.pem")
    );
    assert_eq!(keys["wechat"]["mchid"], sim.merchant.id("WECHAT_MCHID"));
    assert_eq!(keys["wechat"]["appid"], sim.merchant.id("WECHAT_APPID"));
    assert_eq!(
        keys["wechat"]["merchant_serial"],
        sim.merchant.id("WECHAT_MERCHANT_SERIAL")
    );
    assert_eq!(
        keys["wechat"]["merchant_public_key"],
        read("wechat_merchant_public.pem")
    );
    assert_eq!(
        keys["wechat"]["platform_serial"],
        sim.merchant.id("WECHAT_PLATFORM_SERIAL")
    );
    assert_eq!(
        keys["wechat"]["platform_private_key"],
        read("wechat_platform_private.pem")
    );
    assert_eq!(
        keys["wechat"]["platform_public_key"],
        read("wechat_platform_public.pem")
    );
    assert_eq!(keys["wechat"]["apiv3_key"], read("wechat_apiv3_key"));
    assert_eq!(keys["wechat"]["apiv3_key"].as_str().unwrap().len(), 32);
    assert!(
        keys["alipay"].get("app_private_key").is_none(),
        "the merchant's private keys are not the simulator's"
    );

    let health = sim
        .client
        .get(format!("{}/healthz", sim.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let (status, body) = sim.sim_post("/sim/pay", json!({"out": 1})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request"))
    );
    let missing = sim
        .client
        .get(format!("{}/nowhere", sim.base))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}
