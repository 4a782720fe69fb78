//! Reconciliation and refunds against the gateway simulator (in process, real signatures): a
//! payment whose notification never arrived still ends in `paid`; an expired order is closed at
//! the gateway and locally; an admin refund ends the paid period.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;

use serde_json::{Value, json};
use support::{Api, Cred, TestDb, config_with, serve};
use tollgate_control_plane::payments::service::Payments;

const PW: &str = "correct horse battery";

/// Test keys made by the simulator's own script, and its ids.
fn keys() -> (std::path::PathBuf, BTreeMap<String, String>) {
    let dir = std::env::temp_dir().join(format!("tg-reconcile-keys-{}", std::process::id()));
    let status = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../paysim/gen-keys.sh"
        ))
        .arg(&dir)
        .output()
        .expect("gen-keys.sh");
    assert!(status.status.success(), "{status:?}");
    let ids = std::fs::read_to_string(dir.join("ids.env")).expect("ids");
    let ids = ids
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect();
    (dir, ids)
}

async fn start_simulator(dir: &std::path::Path) -> String {
    let env: BTreeMap<String, String> = [
        ("PAYSIM_KEYS_DIR".to_owned(), dir.display().to_string()),
        ("PAYSIM_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
    ]
    .into();
    let config = tollgate_paysim::config::Config::from_env(&env).expect("simulator config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(tollgate_paysim::run(
        config,
        listener,
        std::future::pending(),
    ));
    base
}

#[tokio::test]
async fn missed_notifications_expired_orders_and_refunds() {
    let (dir, ids) = keys();
    let sim = start_simulator(&dir).await;
    let db = TestDb::migrated().await;
    let file = |name: &str| dir.join(name).display().to_string();
    let apiv3 = std::fs::read_to_string(dir.join("wechat_apiv3_key")).expect("apiv3");
    let settings: Vec<(String, String)> = vec![
        // The simulator's notifications go nowhere: every payment here is a missed one.
        ("TOLLGATE_PUBLIC_URL".into(), "http://127.0.0.1:1".into()),
        (
            "TOLLGATE_ALIPAY_GATEWAY_URL".into(),
            format!("{sim}/alipay/gateway.do"),
        ),
        (
            "TOLLGATE_ALIPAY_APP_ID".into(),
            ids["ALIPAY_APP_ID"].clone(),
        ),
        (
            "TOLLGATE_ALIPAY_SELLER_ID".into(),
            ids["ALIPAY_SELLER_ID"].clone(),
        ),
        (
            "TOLLGATE_ALIPAY_APP_PRIVATE_KEY_FILE".into(),
            file("alipay_app_private.pem"),
        ),
        (
            "TOLLGATE_ALIPAY_PUBLIC_KEY_FILE".into(),
            file("alipay_gateway_public.pem"),
        ),
        ("TOLLGATE_WECHAT_API_BASE".into(), format!("{sim}/wechat")),
        ("TOLLGATE_WECHAT_MCHID".into(), ids["WECHAT_MCHID"].clone()),
        ("TOLLGATE_WECHAT_APPID".into(), ids["WECHAT_APPID"].clone()),
        (
            "TOLLGATE_WECHAT_MERCHANT_SERIAL".into(),
            ids["WECHAT_MERCHANT_SERIAL"].clone(),
        ),
        (
            "TOLLGATE_WECHAT_MERCHANT_PRIVATE_KEY_FILE".into(),
            file("wechat_merchant_private.pem"),
        ),
        (
            "TOLLGATE_WECHAT_PLATFORM_SERIAL".into(),
            ids["WECHAT_PLATFORM_SERIAL"].clone(),
        ),
        (
            "TOLLGATE_WECHAT_PLATFORM_PUBLIC_KEY_FILE".into(),
            file("wechat_platform_public.pem"),
        ),
        ("TOLLGATE_WECHAT_APIV3_KEY".into(), apiv3.trim().to_owned()),
    ];
    let pairs: Vec<(&str, &str)> = settings
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let config = config_with(&db, &pairs);
    let server = serve(config.clone()).await;
    let api = Api::new(&server.base);
    let (user, token, _) = api.register("late@example.com", PW).await;
    api.register("ops@example.com", PW).await;
    let admin = support::make_admin(&db, &api, "ops@example.com", PW).await;
    let http = reqwest::Client::new();

    // The job's own parts, with "pending for a minute" shortened to now.
    let pool = tollgate_control_plane::db::pool(&db.url, 2, None).expect("pool");
    let redis = tollgate_control_plane::redis::client(&support::redis_url()).expect("redis");
    fred::interfaces::ClientLike::init(&redis)
        .await
        .expect("connect");
    let keys = tollgate_common::keys::Keys::new(config.redis_prefix.clone());
    let syncer = tollgate_control_plane::sync::Syncer::new(pool.clone(), redis, keys);
    let metrics = Arc::new(tollgate_control_plane::metrics::Metrics::new());
    let mut payments = Payments::load(&config, pool, syncer, metrics.clone()).expect("payments");
    payments.reconcile_after = chrono::Duration::zero();

    // A WeChat payment whose notification never arrives.
    let order = api
        .post(
            "/v1/orders",
            Cred::Bearer(&token),
            json!({"plan_id": "pro", "channel": "wechat_native"}),
        )
        .await;
    assert_eq!(order.status, 201, "{:?}", order.body);
    let order_id = order.body["id"].as_str().expect("id").to_owned();
    let paid = http
        .post(format!("{sim}/sim/pay"))
        .json(&json!({"out_trade_no": order_id}))
        .send()
        .await
        .expect("pay");
    assert_eq!(paid.status(), 200);
    let status = |id: String| {
        let api = &api;
        let token = &token;
        async move {
            api.get(&format!("/v1/orders/{id}"), Cred::Bearer(token))
                .await
                .body["status"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        }
    };
    assert_eq!(
        status(order_id.clone()).await,
        "pending",
        "no notification reached us"
    );
    payments.reconcile_once().await.expect("reconcile");
    assert_eq!(
        status(order_id.clone()).await,
        "paid",
        "reconciliation found the payment"
    );
    let found = metrics
        .reconcile_paid_found
        .with_label_values(&["wechat"])
        .get();
    assert_eq!(found, 1);
    let quota = api.get("/v1/quota?app=idoctor", Cred::Bearer(&token)).await;
    assert_eq!(quota.body["plan"]["id"], "pro");

    // An Alipay order the buyer opened but never paid, now expired: closed there and here.
    let order = api
        .post(
            "/v1/orders",
            Cred::Bearer(&token),
            json!({"plan_id": "enterprise", "channel": "alipay_page"}),
        )
        .await;
    let expired = order.body["id"].as_str().expect("id").to_owned();
    let page = http
        .get(order.body["pay_url"].as_str().expect("pay_url"))
        .send()
        .await
        .expect("cashier");
    assert_eq!(page.status(), 200);
    db.client()
        .await
        .execute(
            "UPDATE orders SET expires_at = now() - interval '1 minute' WHERE id = $1",
            &[&expired],
        )
        .await
        .expect("expire");
    payments.reconcile_once().await.expect("reconcile");
    assert_eq!(status(expired.clone()).await, "closed");
    let at_gateway: Value = http
        .get(format!("{sim}/sim/orders/{expired}"))
        .send()
        .await
        .expect("sim order")
        .json()
        .await
        .expect("json");
    assert!(
        at_gateway.to_string().to_lowercase().contains("closed"),
        "closed at the gateway too: {at_gateway}"
    );
    // A closed order can no longer be paid at the gateway.
    let late = http
        .post(format!("{sim}/sim/pay"))
        .json(&json!({"out_trade_no": expired}))
        .send()
        .await
        .expect("pay");
    assert_ne!(late.status(), 200);

    // An admin refunds the paid order in full: the paid period ends, the user is on free.
    let not_admin = api
        .post(
            &format!("/v1/admin/orders/{order_id}/refund"),
            Cred::Bearer(&token),
            json!({}),
        )
        .await;
    assert_eq!(not_admin.status, 403);
    let refunded = api
        .post(
            &format!("/v1/admin/orders/{order_id}/refund"),
            Cred::Bearer(&admin),
            json!({}),
        )
        .await;
    assert_eq!(refunded.status, 200, "{:?}", refunded.body);
    assert_eq!(refunded.body["status"], "refunded");
    let quota = api.get("/v1/quota?app=idoctor", Cred::Bearer(&token)).await;
    assert_eq!(quota.body["plan"]["id"], "free");
    let again = api
        .post(
            &format!("/v1/admin/orders/{order_id}/refund"),
            Cred::Bearer(&admin),
            json!({}),
        )
        .await;
    assert_eq!(again.status, 400, "refunding twice is refused");
    let _ = user;
    let _ = std::fs::remove_dir_all(&dir);
}
