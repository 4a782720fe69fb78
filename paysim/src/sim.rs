//! The simulator's own surface: paying as the buyer would (`/sim/pay`, the cashier's and the QR
//! page's Pay buttons), re-sending notifications, showing what the gateways know, and handing
//! out the test keys so that tests can play either side.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Utc;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::AppState;
use crate::alipay;
use crate::crypto;
use crate::error::Error;
use crate::notify;
use crate::pages;
use crate::store::{Channel, Order, Status, Trigger};
use crate::wechat;

/// The most deliveries one `/sim/notify-again` call makes.
const MAX_AGAIN: u32 = 100;

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /sim/keys`: the test key material, PEM, as paysim/README.md lists it.
pub async fn keys(State(state): State<Arc<AppState>>) -> Json<Value> {
    let keys = &state.config.keys;
    Json(json!({
        "alipay": {
            "app_id": keys.alipay.app_id,
            "seller_id": keys.alipay.seller_id,
            "app_public_key": keys.alipay.app_public_pem,
            "gateway_private_key": keys.alipay.gateway_private_pem,
            "gateway_public_key": keys.alipay.gateway_public_pem,
        },
        "wechat": {
            "mchid": keys.wechat.mchid,
            "appid": keys.wechat.appid,
            "merchant_serial": keys.wechat.merchant_serial,
            "merchant_public_key": keys.wechat.merchant_public_pem,
            "platform_serial": keys.wechat.platform_serial,
            "platform_private_key": keys.wechat.platform_private_pem,
            "platform_public_key": keys.wechat.platform_public_pem,
            "apiv3_key": keys.wechat.apiv3_key,
        },
    }))
}

fn parse_json<T: DeserializeOwned>(body: &[u8], shape: &str) -> Result<T, Error> {
    serde_json::from_slice(body)
        .map_err(|e| Error::invalid_request(format!("the body must be JSON like {shape}: {e}")))
}

fn unknown_order(out_trade_no: &str) -> Error {
    Error::sim(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "the simulator knows no order {out_trade_no:?}. An Alipay order becomes known when its pay URL \
             (alipay.trade.page.pay / alipay.trade.wap.pay) is opened at the gateway, exactly as with the real \
             Alipay; a WeChat order when POST /v3/pay/transactions/native creates it"
        ),
    )
}

/// Pays a pending order as its buyer would, then sends the notification in the background.
/// `channel` restricts which gateway's orders may be paid (the cashier pays only Alipay's).
pub fn pay(
    state: &Arc<AppState>,
    out_trade_no: &str,
    channel: Option<Channel>,
) -> Result<Order, Error> {
    let now = Utc::now();
    let paid = state
        .store
        .update(out_trade_no, |o| {
            if channel.is_some_and(|c| c != o.channel) {
                return Err(unknown_order(out_trade_no));
            }
            match o.status {
                Status::Pending => {
                    o.status = Status::Paid;
                    o.paid_at = Some(now);
                    match o.channel {
                        Channel::Alipay => o.buyer = Some(format!("2088{}", crypto::random_digits(12))),
                        Channel::Wechat => {
                            o.buyer = Some(wechat::new_openid());
                            o.trade_no = Some(wechat::new_transaction_id(now));
                        }
                    }
                    Ok(o.clone())
                }
                Status::Paid | Status::Refunded => Err(Error::sim(
                    StatusCode::CONFLICT,
                    "already_paid",
                    format!("order {out_trade_no} is already paid"),
                )),
                Status::Closed => Err(Error::sim(
                    StatusCode::CONFLICT,
                    "order_closed",
                    format!("order {out_trade_no} is closed (by the merchant, or because it expired) and cannot be paid"),
                )),
            }
        })
        .ok_or_else(|| unknown_order(out_trade_no))??;
    let keys = &state.config.keys;
    let notification = match paid.channel {
        Channel::Alipay => alipay::notification(&keys.alipay, &paid),
        Channel::Wechat => wechat::notification(&keys.wechat, &paid).map_err(|e| {
            Error::sim(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("cannot encrypt: {e}"),
            )
        })?,
    };
    state
        .store
        .update(out_trade_no, |o| o.notification = Some(notification));
    match &paid.notify_url {
        Some(_) => notify::spawn_delivery(state.clone(), out_trade_no.to_owned()),
        None => tracing::info!(
            out_trade_no,
            "paid; the order has no notify_url, so nothing is sent"
        ),
    }
    Ok(paid)
}

#[derive(Deserialize)]
struct PayRequest {
    out_trade_no: String,
}

/// `POST /sim/pay {"out_trade_no"}`.
pub async fn pay_handler(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Json<Value>, Error> {
    let request: PayRequest = parse_json(&body, r#"{"out_trade_no": "…"}"#)?;
    let order = pay(&state, &request.out_trade_no, None)?;
    Ok(Json(
        json!({"out_trade_no": order.out_trade_no, "channel": order.channel, "status": "paid"}),
    ))
}

#[derive(Deserialize)]
struct AgainRequest {
    out_trade_no: String,
    times: Option<u32>,
    /// All deliveries at once instead of one after the other.
    #[serde(default)]
    concurrent: bool,
}

/// `POST /sim/notify-again {"out_trade_no","times"?,"concurrent"?}`: delivers the same
/// notification again (no retries), and answers once every delivery has an answer.
pub async fn notify_again(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Json<Value>, Error> {
    let request: AgainRequest = parse_json(
        &body,
        r#"{"out_trade_no": "…", "times": 1, "concurrent": false}"#,
    )?;
    let times = request.times.unwrap_or(1);
    if !(1..=MAX_AGAIN).contains(&times) {
        return Err(Error::invalid_request(format!(
            "times must be from 1 to {MAX_AGAIN}"
        )));
    }
    let no = request.out_trade_no;
    let order = state.store.get(&no).ok_or_else(|| unknown_order(&no))?;
    if order.notification.is_none() {
        return Err(Error::sim(
            StatusCode::CONFLICT,
            "not_paid",
            format!("order {no} is not paid, so there is no notification to send again"),
        ));
    }
    if order.notify_url.is_none() {
        return Err(Error::sim(
            StatusCode::CONFLICT,
            "no_notify_url",
            format!("order {no} has no notify_url"),
        ));
    }
    let mut deliveries = Vec::with_capacity(times as usize);
    if request.concurrent {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..times {
            let state = state.clone();
            let no = no.clone();
            set.spawn(async move { notify::deliver(&state, &no, Trigger::Again).await });
        }
        while let Some(result) = set.join_next().await {
            if let Ok(attempt) = result {
                deliveries.push(attempt);
            }
        }
    } else {
        for _ in 0..times {
            deliveries.push(notify::deliver(&state, &no, Trigger::Again).await);
        }
    }
    let acknowledged = deliveries.iter().filter(|a| a.acknowledged).count();
    Ok(Json(json!({
        "out_trade_no": no,
        "channel": order.channel,
        "acknowledged": acknowledged,
        "deliveries": deliveries,
    })))
}

/// `GET /sim/orders/{out_trade_no}`: what the gateway knows, notification attempts included.
pub async fn order(
    State(state): State<Arc<AppState>>,
    Path(no): Path<String>,
) -> Result<Json<Value>, Error> {
    let o = state.store.get(&no).ok_or_else(|| unknown_order(&no))?;
    let mut view = json!({
        "out_trade_no": o.out_trade_no,
        "channel": o.channel,
        "status": o.status,
        "kind": o.kind,
        "subject": o.subject,
        "amount": o.amount,
        "refunded": o.refunded(),
        "refunds": o.refunds,
        "notify_url": o.notify_url,
        "created_at": o.created_at,
        "expires_at": o.expires_at,
        "paid_at": o.paid_at,
        "closed_at": o.closed_at,
        "notify": {
            "attempts": o.attempts.len(),
            "acknowledged": o.attempts.iter().any(|a| a.acknowledged),
            "last_answer": o.attempts.last(),
            "history": o.attempts,
        },
    });
    match o.channel {
        Channel::Alipay => {
            view["gateway_status"] = json!(alipay::trade_status(&o));
            view["trade_no"] = json!(o.trade_no);
            view["product_code"] = json!(o.product_code);
            view["return_url"] = json!(o.return_url);
        }
        Channel::Wechat => {
            view["gateway_status"] = json!(wechat::trade_state(&o).0);
            view["transaction_id"] = json!(o.trade_no);
            view["code_url"] = json!(wechat::code_url(&o));
            if let Some(pr) = &o.code_pr {
                view["qr_page_url"] = json!(format!("{}/sim/wechat/qr/{pr}", state.public_url));
            }
        }
    }
    Ok(Json(view))
}

fn page_refusal(error: Error, wechat: bool) -> Response {
    match error {
        Error::Sim {
            status, message, ..
        } => pages::message(status, wechat, "无法支付 Cannot pay", &message),
        other => other.into_response(),
    }
}

/// `POST /sim/alipay/pay` (the cashier's Pay button): pays, then sends the browser to the
/// merchant's `return_url` with the signed result, or shows the result when there is none.
pub async fn alipay_cashier_pay(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let no = form_urlencoded::parse(&body)
        .find(|(k, _)| k == "out_trade_no")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    match pay(&state, &no, Some(Channel::Alipay)) {
        Ok(order) => match alipay::return_redirect(&state.config.keys.alipay, &order) {
            Some(url) => Redirect::to(&url).into_response(),
            None => pages::paid(&order, false),
        },
        Err(e) => page_refusal(e, false),
    }
}

fn qr_order(state: &AppState, pr: &str) -> Result<Order, Error> {
    state
        .store
        .by_pr(pr)
        .and_then(|no| state.store.get(&no))
        .ok_or_else(|| {
            Error::sim(
                StatusCode::NOT_FOUND,
                "not_found",
                "二维码已失效: no order has this code_url",
            )
        })
}

/// `GET /sim/wechat/qr/{pr}`: the page a `weixin://wxpay/bizpayurl?pr=…` code stands for.
pub async fn wechat_qr(State(state): State<Arc<AppState>>, Path(pr): Path<String>) -> Response {
    let order = match qr_order(&state, &pr) {
        Ok(order) => order,
        Err(e) => return page_refusal(e, true),
    };
    match order.status {
        Status::Pending => pages::wechat_qr(&order, &pr, &wechat::code_url(&order)),
        Status::Paid | Status::Refunded => pages::message(
            StatusCode::CONFLICT,
            true,
            "已支付 Already paid",
            "This order is paid.",
        ),
        Status::Closed => pages::message(
            StatusCode::CONFLICT,
            true,
            "订单已关闭 Closed",
            "This order is closed.",
        ),
    }
}

/// `POST /sim/wechat/qr/{pr}/pay`: the QR page's Pay button.
pub async fn wechat_qr_pay(State(state): State<Arc<AppState>>, Path(pr): Path<String>) -> Response {
    let result = qr_order(&state, &pr)
        .and_then(|order| pay(&state, &order.out_trade_no, Some(Channel::Wechat)));
    match result {
        Ok(order) => pages::paid(&order, true),
        Err(e) => page_refusal(e, true),
    }
}

pub async fn not_found(uri: Uri) -> Error {
    Error::sim(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {}", uri.path()),
    )
}
