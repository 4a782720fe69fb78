//! Orders and payment notifications against real PostgreSQL and Redis. The test plays the
//! gateways' part with its own signing code and keys made by openssl: forged, altered, stale,
//! undecryptable and unknown notifications change nothing; duplicates — in a row and at once —
//! extend the subscription exactly once.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rsa::RsaPrivateKey;
use rsa::pkcs1v15::SigningKey;
use rsa::pkcs8::DecodePrivateKey;
use rsa::signature::{SignatureEncoding, Signer};
use serde_json::{Value, json};
use sha2::Sha256;
use support::{Api, Cred, TestDb, config_with, serve};

const PW: &str = "correct horse battery";
const APIV3: &str = "0123456789abcdef0123456789ABCDEF";

/// Four RSA keys made once per test run with openssl.
fn keys() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tg-pay-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        for name in [
            "alipay_app",
            "alipay_gateway",
            "wechat_merchant",
            "wechat_platform",
        ] {
            let private = dir.join(format!("{name}_private.pem"));
            let status = Command::new("openssl")
                .args([
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                    "-out",
                ])
                .arg(&private)
                .status()
                .expect("openssl");
            assert!(status.success());
            let status = Command::new("openssl")
                .args(["pkey", "-pubout", "-in"])
                .arg(&private)
                .arg("-out")
                .arg(dir.join(format!("{name}_public.pem")))
                .status()
                .expect("openssl");
            assert!(status.success());
        }
        dir
    })
}

fn path(name: &str) -> String {
    keys().join(name).display().to_string()
}

fn signer(file: &str) -> SigningKey<Sha256> {
    let pem = std::fs::read_to_string(keys().join(file)).expect("key");
    SigningKey::new(RsaPrivateKey::from_pkcs8_pem(&pem).expect("pkcs8"))
}

fn sign_b64(key: &SigningKey<Sha256>, message: &[u8]) -> String {
    STANDARD.encode(key.sign(message).to_bytes())
}

struct Harness {
    db: TestDb,
    api: Api,
    token: String,
    user: String,
    _server: support::Server,
}

async fn start() -> Harness {
    start_with(&[]).await
}

async fn start_with(extra: &[(&str, &str)]) -> Harness {
    let db = TestDb::migrated().await;
    let (a, b, c, d, e, f) = (
        path("alipay_app_private.pem"),
        path("alipay_gateway_public.pem"),
        path("wechat_merchant_private.pem"),
        path("wechat_platform_public.pem"),
        "2021000000000001".to_owned(),
        "2088000000000001".to_owned(),
    );
    let config = config_with(
        &db,
        &[
            // Nothing listens here: these tests never reach a gateway.
            (
                "TOLLGATE_ALIPAY_GATEWAY_URL",
                "http://127.0.0.1:1/gateway.do",
            ),
            ("TOLLGATE_ALIPAY_APP_ID", &e),
            ("TOLLGATE_ALIPAY_SELLER_ID", &f),
            ("TOLLGATE_ALIPAY_APP_PRIVATE_KEY_FILE", &a),
            ("TOLLGATE_ALIPAY_PUBLIC_KEY_FILE", &b),
            ("TOLLGATE_WECHAT_API_BASE", "http://127.0.0.1:1"),
            ("TOLLGATE_WECHAT_MCHID", "1900000001"),
            ("TOLLGATE_WECHAT_APPID", "wx0000000000000001"),
            ("TOLLGATE_WECHAT_MERCHANT_SERIAL", "MERCHANTSERIAL01"),
            ("TOLLGATE_WECHAT_MERCHANT_PRIVATE_KEY_FILE", &c),
            ("TOLLGATE_WECHAT_PLATFORM_SERIAL", "PUB_KEY_ID_0001"),
            ("TOLLGATE_WECHAT_PLATFORM_PUBLIC_KEY_FILE", &d),
            ("TOLLGATE_WECHAT_APIV3_KEY", APIV3),
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .collect::<Vec<_>>(),
    );
    let server = serve(config).await;
    let api = Api::new(&server.base);
    let (user, token, _) = api.register("buyer@example.com", PW).await;
    Harness {
        db,
        api,
        token,
        user,
        _server: server,
    }
}

/// Alipay's canonical string for a notification: sorted, empties, `sign` and `sign_type` out.
fn alipay_notify_body(params: &BTreeMap<&str, String>, key: &SigningKey<Sha256>) -> String {
    let content = params
        .iter()
        .filter(|(k, v)| !v.is_empty() && **k != "sign" && **k != "sign_type")
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut all: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    all.push(("sign".to_owned(), sign_b64(key, content.as_bytes())));
    serde_urlencoded::to_string(&all).expect("form")
}

fn alipay_params(out_trade_no: &str, amount: &str) -> BTreeMap<&'static str, String> {
    [
        ("notify_time", "2026-11-25 20:00:00"),
        ("notify_type", "trade_status_sync"),
        ("notify_id", "ac05099524730693a8b330c5ecf72da9786"),
        ("app_id", "2021000000000001"),
        ("charset", "utf-8"),
        ("version", "1.0"),
        ("sign_type", "RSA2"),
        ("trade_no", "2026112522001405000000000001"),
        ("out_trade_no", out_trade_no),
        ("total_amount", amount),
        ("receipt_amount", amount),
        ("seller_id", "2088000000000001"),
        ("trade_status", "TRADE_SUCCESS"),
        ("subject", "Tollgate Pro"),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_owned()))
    .collect()
}

async fn post_alipay(api: &Api, body: String) -> (u16, String) {
    let r = api
        .http
        .post(format!("{}/v1/payments/alipay/notify", api.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .expect("send");
    (r.status().as_u16(), r.text().await.expect("body"))
}

async fn order_status(h: &Harness, id: &str) -> String {
    let reply = h
        .api
        .get(&format!("/v1/orders/{id}"), Cred::Bearer(&h.token))
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    reply.body["status"].as_str().expect("status").to_owned()
}

async fn subscriptions_from(db: &TestDb, order: &str) -> i64 {
    db.client()
        .await
        .query_one(
            "SELECT count(*) FROM subscriptions WHERE source_order_id = $1",
            &[&order],
        )
        .await
        .expect("count")
        .get(0)
}

#[tokio::test]
async fn alipay_orders_and_notifications() {
    let h = start().await;
    let created = h
        .api
        .post(
            "/v1/orders",
            Cred::Bearer(&h.token),
            json!({"plan_id": "pro", "channel": "alipay_page", "amount": 1}),
        )
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let order = created.body["id"].as_str().expect("id").to_owned();
    assert!(
        order.len() <= 64
            && order
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    );
    assert_eq!(created.body["status"], "pending");
    assert_eq!(
        created.body["amount"],
        json!({"amount": 9900, "currency": "CNY"}),
        "priced on the server"
    );
    let pay_url = created.body["pay_url"].as_str().expect("pay_url");
    assert!(pay_url.starts_with("http://127.0.0.1:1/gateway.do?"));
    // The pay URL is a request signed with the app key: check it with the app's public key.
    let query = pay_url.split_once('?').expect("query").1;
    let params: BTreeMap<String, String> = serde_urlencoded::from_str(query).expect("form");
    assert_eq!(params["method"], "alipay.trade.page.pay");
    let biz: Value = serde_json::from_str(&params["biz_content"]).expect("biz");
    assert_eq!(biz["total_amount"], "99.00");
    assert_eq!(biz["product_code"], "FAST_INSTANT_TRADE_PAY");
    assert_eq!(biz["out_trade_no"], order.as_str());
    let content = params
        .iter()
        .filter(|(k, v)| !v.is_empty() && *k != "sign")
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let app_public = std::fs::read_to_string(keys().join("alipay_app_public.pem")).expect("pem");
    let verifier =
        tollgate_control_plane::payments::RsaVerifier::from_pem(&app_public).expect("key");
    verifier
        .verify(content.as_bytes(), &params["sign"])
        .expect("pay_url signature verifies");

    // An idempotent retry returns the same order.
    let first = h
        .api
        .http
        .post(format!("{}/v1/orders", h.api.base))
        .bearer_auth(&h.token)
        .header("idempotency-key", "checkout-42")
        .json(&json!({"plan_id": "pro", "channel": "alipay_wap"}))
        .send()
        .await
        .expect("send")
        .json::<Value>()
        .await
        .expect("json");
    let again = h
        .api
        .http
        .post(format!("{}/v1/orders", h.api.base))
        .bearer_auth(&h.token)
        .header("idempotency-key", "checkout-42")
        .json(&json!({"plan_id": "pro", "channel": "alipay_wap"}))
        .send()
        .await
        .expect("send")
        .json::<Value>()
        .await
        .expect("json");
    assert_eq!(first["id"], again["id"]);
    assert!(
        first["pay_url"]
            .as_str()
            .expect("url")
            .contains("alipay.trade.wap.pay")
    );

    for (body, status) in [
        (json!({"plan_id": "free", "channel": "alipay_page"}), 404),
        (json!({"plan_id": "nope", "channel": "alipay_page"}), 404),
        (json!({"plan_id": "pro", "channel": "paypal"}), 400),
        (json!({"plan_id": "pro"}), 400),
    ] {
        let r = h
            .api
            .post("/v1/orders", Cred::Bearer(&h.token), body.clone())
            .await;
        assert_eq!(r.status, status, "{body}: {:?}", r.body);
    }

    let gateway = signer("alipay_gateway_private.pem");
    let forger = signer("alipay_app_private.pem");
    // Forged signature, another amount (validly signed), another app id, another seller, an unknown
    // order: all refused with `failure`, nothing changes.
    let mut other_app = alipay_params(&order, "99.00");
    other_app.insert("app_id", "2021999999999999".to_owned());
    let mut other_seller = alipay_params(&order, "99.00");
    other_seller.insert("seller_id", "2088999999999999".to_owned());
    let cases = [
        (
            "forged",
            alipay_notify_body(&alipay_params(&order, "99.00"), &forger),
        ),
        (
            "other amount",
            alipay_notify_body(&alipay_params(&order, "0.01"), &gateway),
        ),
        ("other app", alipay_notify_body(&other_app, &gateway)),
        ("other seller", alipay_notify_body(&other_seller, &gateway)),
        (
            "unknown order",
            alipay_notify_body(&alipay_params("TGNOSUCHORDER", "99.00"), &gateway),
        ),
        (
            "tampered",
            alipay_notify_body(&alipay_params(&order, "99.00"), &gateway)
                .replace("total_amount=99.00", "total_amount=98.00"),
        ),
        ("garbage", "%%%".to_owned()),
    ];
    for (name, body) in cases {
        let (status, text) = post_alipay(&h.api, body).await;
        assert_eq!((status, text.as_str()), (400, "failure"), "{name}");
        assert_eq!(
            order_status(&h, &order).await,
            "pending",
            "{name} changed nothing"
        );
    }
    assert_eq!(subscriptions_from(&h.db, &order).await, 0);

    // The genuine notification, delivered 20 times: paid once, extended once.
    let genuine = alipay_notify_body(&alipay_params(&order, "99.00"), &gateway);
    for _ in 0..20 {
        let (status, text) = post_alipay(&h.api, genuine.clone()).await;
        assert_eq!((status, text.as_str()), (200, "success"));
    }
    assert_eq!(order_status(&h, &order).await, "paid");
    assert_eq!(subscriptions_from(&h.db, &order).await, 1);
    let quota = h
        .api
        .get("/v1/quota?app=idoctor", Cred::Bearer(&h.token))
        .await;
    assert_eq!(quota.body["plan"]["id"], "pro");
    let processed: i64 = h
        .db
        .client()
        .await
        .query_one(
            "SELECT count(*) FILTER (WHERE result = 'processed') FROM payment_notifications WHERE out_trade_no = $1",
            &[&order],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(processed, 1);
    let stored: i64 =
        h.db.client()
            .await
            .query_one(
                "SELECT count(*) FROM payment_notifications WHERE channel = 'alipay'",
                &[],
            )
            .await
            .expect("count")
            .get(0);
    assert_eq!(
        stored, 27,
        "every delivery is recorded: whole when verified, as a bounded record when not"
    );

    // Another user cannot see the order.
    let (_, other, _) = h.api.register("other@example.com", PW).await;
    assert_eq!(
        h.api
            .get(&format!("/v1/orders/{order}"), Cred::Bearer(&other))
            .await
            .status,
        404
    );
    let _ = &h.user;
}

#[tokio::test]
async fn twenty_concurrent_deliveries_extend_once() {
    let h = start().await;
    let created = h
        .api
        .post(
            "/v1/orders",
            Cred::Bearer(&h.token),
            json!({"plan_id": "pro", "channel": "alipay_page"}),
        )
        .await;
    let order = created.body["id"].as_str().expect("id").to_owned();
    let body = alipay_notify_body(
        &alipay_params(&order, "99.00"),
        &signer("alipay_gateway_private.pem"),
    );
    let deliveries = (0..20).map(|_| post_alipay(&h.api, body.clone()));
    let answers = futures_util::future::join_all(deliveries).await;
    assert!(
        answers.iter().all(|(s, t)| *s == 200 && t == "success"),
        "{answers:?}"
    );
    assert_eq!(subscriptions_from(&h.db, &order).await, 1);
    let end: chrono::DateTime<chrono::Utc> =
        h.db.client()
            .await
            .query_one(
                "SELECT period_end FROM subscriptions WHERE source_order_id = $1",
                &[&order],
            )
            .await
            .expect("row")
            .get(0);
    let days = (end - chrono::Utc::now()).num_days();
    assert!(
        (27..=31).contains(&days),
        "one month, not twenty: {days} days"
    );
}

/// A WeChat Pay v3 notification as the platform sends it.
fn wechat_notification(
    out_trade_no: &str,
    total: i64,
    mchid: &str,
    timestamp: i64,
    key: &[u8; 32],
) -> (String, String, String) {
    let transaction = json!({
        "appid": "wx0000000000000001", "mchid": mchid, "out_trade_no": out_trade_no,
        "transaction_id": "4200000000202611250000000001", "trade_type": "NATIVE",
        "trade_state": "SUCCESS", "success_time": "2026-11-25T20:00:00+08:00",
        "amount": {"total": total, "payer_total": total, "currency": "CNY", "payer_currency": "CNY"},
        "payer": {"openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"}
    });
    let nonce = "fdasflkja484";
    let ciphertext = Aes256Gcm::new(key.into())
        .encrypt(
            Nonce::from_slice(nonce.as_bytes()),
            Payload {
                msg: transaction.to_string().as_bytes(),
                aad: b"transaction",
            },
        )
        .expect("encrypt");
    let body = json!({
        "id": "EV-2018022511223320873", "create_time": "2026-11-25T20:00:00+08:00",
        "resource_type": "encrypt-resource", "event_type": "TRANSACTION.SUCCESS", "summary": "支付成功",
        "resource": {"original_type": "transaction", "algorithm": "AEAD_AES_256_GCM",
                     "ciphertext": STANDARD.encode(ciphertext), "associated_data": "transaction", "nonce": nonce}
    })
    .to_string();
    let sig_nonce = "5K8264ILTKCH16CQ2502SI8ZNMTM67VS";
    let signature = sign_b64(
        &signer("wechat_platform_private.pem"),
        format!("{timestamp}\n{sig_nonce}\n{body}\n").as_bytes(),
    );
    (body, sig_nonce.to_owned(), signature)
}

/// The same signature with its first character changed: always a different, well-formed one.
fn flip_first(signature: &str) -> String {
    let replacement = if signature.starts_with('A') { "B" } else { "A" };
    format!("{replacement}{}", &signature[1..])
}

async fn post_wechat(
    api: &Api,
    body: &str,
    timestamp: i64,
    nonce: &str,
    signature: &str,
    serial: &str,
) -> (u16, Value) {
    let r = api
        .http
        .post(format!("{}/v1/payments/wechat/notify", api.base))
        .header("content-type", "application/json")
        .header("Wechatpay-Timestamp", timestamp.to_string())
        .header("Wechatpay-Nonce", nonce)
        .header("Wechatpay-Signature", signature)
        .header("Wechatpay-Serial", serial)
        .body(body.to_owned())
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn wechat_notifications_verify_signature_time_and_ciphertext() {
    let h = start().await;
    // A WeChat order, written as order creation would after the gateway answered.
    let order = tollgate_control_plane::payments::service::new_order_id();
    {
        let client = h.db.client().await;
        let user: uuid::Uuid = h.user.parse().expect("uuid");
        tollgate_control_plane::db::orders::create(
            &client,
            &tollgate_control_plane::db::orders::NewOrder {
                id: &order,
                user,
                plan: "pro",
                channel: tollgate_control_plane::domain::payments::PayMethod::WechatNative,
                amount: 9900,
                currency: "CNY",
                expires_at: chrono::Utc::now() + chrono::Duration::minutes(30),
            },
        )
        .await
        .expect("order");
        tollgate_control_plane::db::orders::set_payment_target(
            &client,
            &order,
            None,
            Some("weixin://wxpay/bizpayurl?pr=abc"),
        )
        .await
        .expect("code url");
    }
    let key: [u8; 32] = APIV3.as_bytes().try_into().expect("32");
    let now = chrono::Utc::now().timestamp();
    let serial = "PUB_KEY_ID_0001";

    let (body, nonce, signature) = wechat_notification(&order, 9900, "1900000001", now, &key);
    let (stale_body, stale_nonce, stale_sig) =
        wechat_notification(&order, 9900, "1900000001", now - 600, &key);
    let (cheap_body, cheap_nonce, cheap_sig) =
        wechat_notification(&order, 1, "1900000001", now, &key);
    let (other_body, other_nonce, other_sig) =
        wechat_notification(&order, 9900, "1999999999", now, &key);
    let wrong_key = [7u8; 32];
    let (garbled_body, garbled_nonce, garbled_sig) =
        wechat_notification(&order, 9900, "1900000001", now, &wrong_key);
    let cases = [
        (
            "bad signature",
            body.clone(),
            now,
            nonce.clone(),
            flip_first(&signature),
            serial,
            401,
        ),
        (
            "tampered body",
            body.replace("TRANSACTION.SUCCESS", "TRANSACTION.SUCCESS "),
            now,
            nonce.clone(),
            signature.clone(),
            serial,
            401,
        ),
        (
            "stale timestamp",
            stale_body,
            now - 600,
            stale_nonce,
            stale_sig,
            serial,
            400,
        ),
        (
            "unknown serial",
            body.clone(),
            now,
            nonce.clone(),
            signature.clone(),
            "OTHER",
            400,
        ),
        (
            "does not decrypt",
            garbled_body,
            now,
            garbled_nonce,
            garbled_sig,
            serial,
            400,
        ),
        (
            "other amount",
            cheap_body,
            now,
            cheap_nonce,
            cheap_sig,
            serial,
            400,
        ),
        (
            "other merchant",
            other_body,
            now,
            other_nonce,
            other_sig,
            serial,
            400,
        ),
    ];
    for (name, body, ts, nonce, sig, serial, want) in cases {
        let (status, reply) = post_wechat(&h.api, &body, ts, &nonce, &sig, serial).await;
        assert_eq!(status, want, "{name}: {reply}");
        assert_eq!(reply["code"], "FAIL", "{name}");
        assert!(reply["message"].is_string(), "{name}");
        assert_eq!(
            order_status(&h, &order).await,
            "pending",
            "{name} changed nothing"
        );
    }
    for _ in 0..3 {
        let (status, _) = post_wechat(&h.api, &body, now, &nonce, &signature, serial).await;
        assert_eq!(status, 204);
    }
    assert_eq!(order_status(&h, &order).await, "paid");
    assert_eq!(subscriptions_from(&h.db, &order).await, 1);

    // The order's QR code, as SVG and PNG.
    let svg = h
        .api
        .http
        .get(format!("{}/v1/orders/{order}/qr.svg", h.api.base))
        .bearer_auth(&h.token)
        .send()
        .await
        .expect("svg");
    assert_eq!(svg.headers()["content-type"], "image/svg+xml");
    assert!(svg.text().await.expect("text").contains("<svg"));
    let png = h
        .api
        .http
        .get(format!("{}/v1/orders/{order}/qr.png", h.api.base))
        .bearer_auth(&h.token)
        .send()
        .await
        .expect("png");
    assert_eq!(png.headers()["content-type"], "image/png");
    assert_eq!(&png.bytes().await.expect("bytes")[..4], b"\x89PNG");

    // Another user sees neither the order nor its QR codes.
    let (_, other, _) = h.api.register("nosy@example.com", PW).await;
    for path in [
        format!("/v1/orders/{order}"),
        format!("/v1/orders/{order}/qr.svg"),
        format!("/v1/orders/{order}/qr.png"),
    ] {
        let r = h.api.get(&path, Cred::Bearer(&other)).await;
        assert_eq!(r.status, 404, "{path}: {:?}", r.body);
        assert_eq!(r.body["error"]["code"], "not_found", "{path}");
    }
}

#[test]
fn keys_exist() {
    assert!(Path::new(&path("alipay_app_private.pem")).exists());
}

async fn db_size(db: &TestDb) -> i64 {
    db.client()
        .await
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await
        .expect("size")
        .get(0)
}

#[tokio::test]
async fn unsigned_floods_store_little_and_genuine_notifications_stay_whole() {
    let h = start().await;
    let order = h
        .api
        .post(
            "/v1/orders",
            Cred::Bearer(&h.token),
            json!({"plan_id": "pro", "channel": "alipay_page"}),
        )
        .await
        .body["id"]
        .as_str()
        .expect("order")
        .to_owned();
    let before = db_size(&h.db).await;

    // 20 unsigned 1 MB deliveries to each endpoint: refused at the body limit, nothing stored
    // but a bounded record.
    let megabyte = "x=".to_owned() + &"y".repeat(1 << 20);
    // (Past the server's own body limit, 1 MiB, the server answers 413 before any handler, in
    // the contract's error shape; below it the endpoints answer in their gateway's format.)
    for _ in 0..20 {
        let (status, _) = post_alipay(&h.api, megabyte.clone()).await;
        assert_eq!(status, 413);
        let (status, _) = post_wechat(&h.api, &megabyte, 1, "n", "s", "PUB_KEY_ID_0001").await;
        assert_eq!(status, 413);
    }
    let half = "x=".to_owned() + &"y".repeat(1 << 19);
    let (status, text) = post_alipay(&h.api, half.clone()).await;
    assert_eq!((status, text.as_str()), (413, "failure"));
    let (status, body) = post_wechat(&h.api, &half, 1, "n", "s", "PUB_KEY_ID_0001").await;
    assert_eq!(status, 413);
    assert_eq!(body["code"], "FAIL");
    // And unsigned ones within the limit (16 KiB): verified first, so only a digest is kept.
    let forged = format!(
        "{}&pad={}",
        alipay_notify_body(
            &alipay_params(&order, "99.00"),
            &signer("alipay_app_private.pem"),
        ),
        "z".repeat(10_000)
    );
    for _ in 0..5 {
        let (status, text) = post_alipay(&h.api, forged.clone()).await;
        assert_eq!((status, text.as_str()), (400, "failure"));
    }
    let grown = db_size(&h.db).await - before;
    assert!(
        grown < 512 * 1024,
        "47 unsigned deliveries (41 MB) grew the database by {grown} bytes"
    );

    let client = h.db.client().await;
    let rows = client
        .query(
            "SELECT length(raw_body), body_bytes, body_sha256, body_truncated, verified, result, error
             FROM payment_notifications ORDER BY id",
            &[],
        )
        .await
        .expect("rows");
    // The 40 past the server's limit were refused before any handler: no record at all.
    assert_eq!(rows.len(), 7);
    for row in &rows {
        let kept: i32 = row.get(0);
        assert!(kept <= 256, "at most a 256-byte prefix is kept, not {kept}");
        assert!(!row.get::<_, bool>(4), "none verified");
        assert_eq!(row.get::<_, String>(5), "rejected");
        assert!(row.get::<_, bool>(3), "truncated");
        assert!(row.get::<_, Option<String>>(6).is_some(), "a reason");
    }
    // The oversized ones declared their size; the small forged ones have a digest of the whole.
    let digests = rows
        .iter()
        .filter(|r| r.get::<_, Option<String>>(2).is_some())
        .count();
    assert_eq!(digests, 5);
    assert!(
        rows.iter()
            .any(|r| r.get::<_, Option<i64>>(1) == Some(half.len() as i64))
    );

    // The genuine notification is still stored whole, and pays the order.
    let genuine = alipay_notify_body(
        &alipay_params(&order, "99.00"),
        &signer("alipay_gateway_private.pem"),
    );
    let (status, text) = post_alipay(&h.api, genuine.clone()).await;
    assert_eq!((status, text.as_str()), (200, "success"));
    assert_eq!(order_status(&h, &order).await, "paid");
    let whole: Vec<u8> = client
        .query_one(
            "SELECT raw_body FROM payment_notifications WHERE verified ORDER BY id LIMIT 1",
            &[],
        )
        .await
        .expect("genuine row")
        .get(0);
    assert_eq!(whole, genuine.as_bytes());
}

#[tokio::test]
async fn rejected_records_are_budgeted_per_minute() {
    let h = start_with(&[("TOLLGATE_NOTIFY_REJECTED_PER_MINUTE", "5")]).await;
    for i in 0..15 {
        let (status, text) = post_alipay(&h.api, format!("garbage={i}")).await;
        assert_eq!((status, text.as_str()), (400, "failure"));
    }
    let recorded: i64 =
        h.db.client()
            .await
            .query_one("SELECT count(*) FROM payment_notifications", &[])
            .await
            .expect("count")
            .get(0);
    // Five a minute; ten if the loop straddled a minute boundary.
    assert!((5..=10).contains(&recorded), "{recorded} recorded");
}

/// Orders share the admin writes' `Idempotency-Key` mechanism: one order per key and body,
/// however many retries and however concurrent; another body under the same key is 422.
#[tokio::test]
async fn idempotent_orders_one_per_key_and_422_for_another_body() {
    let h = start().await;
    let order = |key: &'static str, body: &'static str| {
        let (api, token) = (&h.api, h.token.clone());
        async move {
            let r = api
                .http
                .post(format!("{}/v1/orders", api.base))
                .bearer_auth(token)
                .header("idempotency-key", key)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("send");
            let replayed = r.headers().contains_key("idempotent-replayed");
            (
                r.status().as_u16(),
                replayed,
                r.json::<Value>().await.expect("json"),
            )
        }
    };
    let body = r#"{"plan_id":"pro","channel":"alipay_page"}"#;

    // Four retries at once: one order, every answer the same.
    let answers = futures_util::future::join_all((0..4).map(|_| order("buy-1", body))).await;
    for (status, _, answer) in &answers {
        assert_eq!(*status, 201, "{answer}");
        assert_eq!(answer, &answers[0].2, "the first answer, replayed");
    }
    assert_eq!(
        answers.iter().filter(|a| !a.1).count(),
        1,
        "one did the work"
    );
    assert_eq!(count_rows(&h.db, "SELECT count(*) FROM orders").await, 1);

    // Later, reordered keys: still the first answer, still one order.
    let (status, replayed, again) =
        order("buy-1", r#"{"channel": "alipay_page", "plan_id": "pro"}"#).await;
    assert_eq!((status, replayed), (201, true));
    assert_eq!(again["id"], answers[0].2["id"]);

    // Another body under the key: 422, whatever the order would have been.
    let (status, _, refused) = order("buy-1", r#"{"plan_id":"pro","channel":"alipay_wap"}"#).await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["error"]["code"], "idempotency_key_reused");
    assert_eq!(count_rows(&h.db, "SELECT count(*) FROM orders").await, 1);

    // A gateway that refuses leaves the order closed and the key free: a retry orders again.
    let wechat = r#"{"plan_id":"pro","channel":"wechat_native"}"#;
    for tries in 1..=2 {
        let (status, _, failed) = order("buy-2", wechat).await;
        assert_eq!(status, 502, "{failed}");
        let closed = count_rows(&h.db, "SELECT count(*) FROM orders WHERE status = 'closed'").await;
        assert_eq!(closed, tries);
    }

    // GET /v1/orders lists the caller's three orders, newest first, a page at a time.
    let first = h
        .api
        .get("/v1/orders?limit=2", Cred::Bearer(&h.token))
        .await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let cursor = first.body["next_cursor"].as_str().expect("a next page");
    let rest = h
        .api
        .get(
            &format!("/v1/orders?limit=2&cursor={cursor}"),
            Cred::Bearer(&h.token),
        )
        .await;
    assert!(rest.body["next_cursor"].is_null());
    let listed: Vec<Value> = [&first.body, &rest.body]
        .iter()
        .flat_map(|page| page["items"].as_array().expect("items").clone())
        .collect();
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[2]["id"], answers[0].2["id"], "the oldest last");
    assert!(listed.iter().take(2).all(|o| o["status"] == "closed"));
    let (_, stranger, _) = h.api.register("stranger@example.com", PW).await;
    let theirs = h.api.get("/v1/orders", Cred::Bearer(&stranger)).await;
    assert_eq!(theirs.body["items"], json!([]), "only one's own orders");
    let bad = h
        .api
        .get("/v1/orders?cursor=nope", Cred::Bearer(&h.token))
        .await;
    assert_eq!(bad.status, 400);
}

async fn count_rows(db: &TestDb, sql: &str) -> i64 {
    db.client()
        .await
        .query_one(sql, &[])
        .await
        .expect("count")
        .get(0)
}
