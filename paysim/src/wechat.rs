//! WeChat Pay API v3 (`https://api.mch.weixin.qq.com`), served under `/wechat`: a merchant's base
//! URL is `http://<sim>/wechat`, and the URL it signs is the path and query after that prefix,
//! exactly what it would sign against the real host.
//!
//! Requests carry `Authorization: WECHATPAY2-SHA256-RSA2048 mchid="…",nonce_str="…",
//! signature="…",timestamp="…",serial_no="…"` over `METHOD\nURL\nTIMESTAMP\nNONCE\nBODY\n`.
//! Every answer (errors and empty 204s included) and every notification is signed with the
//! platform key over `TIMESTAMP\nNONCE\nBODY\n`, named by `Wechatpay-Serial`. Notifications
//! carry the transaction encrypted with AEAD_AES_256_GCM under the APIv3 key.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use crate::AppState;
use crate::crypto::{self, AeadError};
use crate::error::Error;
use crate::format::{MAX_AMOUNT, beijing_date, wechat_time};
use crate::keys::WechatKeys;
use crate::store::{Channel, Created, Notification, Order, Refund, Status};

/// Where the simulator mounts the API; not part of what merchants sign.
pub const PREFIX: &str = "/wechat";
pub const SCHEME: &str = "WECHATPAY2-SHA256-RSA2048";
/// How far a request's timestamp may be from the platform's clock.
const MAX_CLOCK_SKEW_SECONDS: i64 = 5 * 60;
/// The associated data of a transaction notification's resource.
pub const TRANSACTION_AAD: &str = "transaction";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub mchid: String,
    pub nonce_str: String,
    pub signature: String,
    pub timestamp: String,
    pub serial_no: String,
}

/// Parses the `Authorization` header: the scheme, then `key="value"` pairs in any order.
pub fn parse_authorization(value: &str) -> Result<Authorization, String> {
    let rest = value
        .strip_prefix(SCHEME)
        .filter(|rest| rest.starts_with(' '))
        .ok_or_else(|| format!("the scheme must be {SCHEME}"))?;
    let mut fields = BTreeMap::new();
    for part in rest.trim().split(',') {
        let (key, value) = part
            .trim()
            .split_once('=')
            .ok_or_else(|| format!("{:?} is not key=\"value\"", part.trim()))?;
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .ok_or_else(|| format!("the value of {key} must be in double quotes"))?;
        if fields.insert(key.trim(), value).is_some() {
            return Err(format!("{key} is given twice"));
        }
    }
    let mut take = |name: &str| {
        fields
            .remove(name)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| format!("{name} is missing"))
    };
    Ok(Authorization {
        mchid: take("mchid")?,
        nonce_str: take("nonce_str")?,
        signature: take("signature")?,
        timestamp: take("timestamp")?,
        serial_no: take("serial_no")?,
    })
}

/// What a merchant signs: `METHOD\nURL\nTIMESTAMP\nNONCE\nBODY\n` (BODY empty for a GET).
pub fn request_message(
    method: &str,
    url: &str,
    timestamp: &str,
    nonce: &str,
    body: &[u8],
) -> Vec<u8> {
    let mut message = format!("{method}\n{url}\n{timestamp}\n{nonce}\n").into_bytes();
    message.extend_from_slice(body);
    message.push(b'\n');
    message
}

/// What the platform signs on answers and notifications: `TIMESTAMP\nNONCE\nBODY\n`.
pub fn response_message(timestamp: &str, nonce: &str, body: &[u8]) -> Vec<u8> {
    let mut message = format!("{timestamp}\n{nonce}\n").into_bytes();
    message.extend_from_slice(body);
    message.push(b'\n');
    message
}

/// The `Wechatpay-*` headers for `body`, signed now with a fresh nonce.
pub fn signed_headers(keys: &WechatKeys, body: &[u8]) -> [(&'static str, String); 6] {
    let timestamp = Utc::now().timestamp().to_string();
    let nonce = crypto::random_alphanumeric(32);
    let signature = crypto::sign(&keys.platform, &response_message(&timestamp, &nonce, body));
    [
        ("Wechatpay-Timestamp", timestamp),
        ("Wechatpay-Nonce", nonce),
        ("Wechatpay-Signature", signature),
        ("Wechatpay-Serial", keys.platform_serial.clone()),
        ("Wechatpay-Signature-Type", SCHEME.to_owned()),
        (
            "Request-ID",
            uuid::Uuid::new_v4()
                .simple()
                .to_string()
                .to_ascii_uppercase(),
        ),
    ]
}

fn respond(keys: &WechatKeys, status: StatusCode, body: Option<Value>) -> Response {
    let bytes = body.map(|v| v.to_string().into_bytes()).unwrap_or_default();
    let mut builder = Response::builder().status(status);
    for (name, value) in signed_headers(keys, &bytes) {
        builder = builder.header(name, value);
    }
    if !bytes.is_empty() {
        builder = builder.header(header::CONTENT_TYPE, "application/json; charset=utf-8");
    }
    builder
        .body(Body::from(bytes))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn render_error(keys: &WechatKeys, error: Error) -> Response {
    match error {
        Error::Wechat {
            status,
            code,
            message,
            detail,
        } => {
            let mut body = json!({"code": code, "message": message});
            if let Some(detail) = detail {
                body["detail"] = detail;
            }
            respond(keys, status, Some(body))
        }
        other => other.into_response(),
    }
}

fn param_error(message: impl Into<String>) -> Error {
    Error::wechat(StatusCode::BAD_REQUEST, "PARAM_ERROR", message)
}

fn sign_error(message: impl Into<String>) -> Error {
    Error::wechat(StatusCode::UNAUTHORIZED, "SIGN_ERROR", message)
}

/// `/wechat/{*path}`, any method: authenticate, then route.
pub async fn api(
    State(state): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let keys = &state.config.keys.wechat;
    let result = authenticate(keys, &method, &uri, &headers, &body)
        .and_then(|()| route(&state, &method, &uri, &body));
    match result {
        Ok((status, body)) => respond(keys, status, body),
        Err(e) => render_error(keys, e),
    }
}

/// The URL as the merchant signed it: path and query after the mount prefix.
fn signed_url(uri: &Uri) -> &str {
    let full = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
    full.strip_prefix(PREFIX).unwrap_or(full)
}

fn authenticate(
    keys: &WechatKeys,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), Error> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| sign_error("the Authorization header is missing"))?
        .to_str()
        .map_err(|_| sign_error("the Authorization header is not ASCII"))?;
    let auth = parse_authorization(value).map_err(|e| sign_error(format!("Authorization: {e}")))?;
    if auth.mchid != keys.mchid {
        return Err(sign_error(format!(
            "mchid {} is not a merchant of this platform",
            auth.mchid
        )));
    }
    if !auth.serial_no.eq_ignore_ascii_case(&keys.merchant_serial) {
        return Err(sign_error(format!(
            "serial_no {} is not the serial of the merchant's API certificate",
            auth.serial_no
        )));
    }
    let timestamp: i64 = auth.timestamp.parse().map_err(|_| {
        sign_error(format!(
            "timestamp {:?} is not Unix seconds",
            auth.timestamp
        ))
    })?;
    if (Utc::now().timestamp() - timestamp).abs() > MAX_CLOCK_SKEW_SECONDS {
        return Err(sign_error(format!(
            "timestamp {timestamp} is more than 5 minutes from the platform's clock"
        )));
    }
    let url = signed_url(uri);
    let message = request_message(method.as_str(), url, &auth.timestamp, &auth.nonce_str, body);
    if crypto::verify(&keys.merchant_public, &message, &auth.signature) {
        return Ok(());
    }
    let shown = String::from_utf8_lossy(&message);
    Err(Error::Wechat {
        status: StatusCode::UNAUTHORIZED,
        code: "SIGN_ERROR",
        message:
            "签名错误，请检查后再试 (the signature does not verify with the merchant's public key)"
                .to_owned(),
        detail: Some(json!({
            "location": "authorization",
            "sign_information": {
                "method": method.as_str(),
                "url": url,
                "sign_message_length": message.len(),
                "truncated_sign_message": shown.chars().take(200).collect::<String>(),
            }
        })),
    })
}

type Answer = (StatusCode, Option<Value>);

fn route(state: &AppState, method: &Method, uri: &Uri, body: &[u8]) -> Result<Answer, Error> {
    let path = uri.path().strip_prefix(PREFIX).unwrap_or(uri.path());
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        ("POST", ["v3", "pay", "transactions", "native"]) => native(state, body),
        ("GET", ["v3", "pay", "transactions", "out-trade-no", no]) => {
            query(state, uri, Lookup::OutTradeNo(no))
        }
        ("GET", ["v3", "pay", "transactions", "id", id]) => {
            query(state, uri, Lookup::TransactionId(id))
        }
        ("POST", ["v3", "pay", "transactions", "out-trade-no", no, "close"]) => {
            close(state, no, body)
        }
        ("POST", ["v3", "refund", "domestic", "refunds"]) => refund(state, body),
        ("GET", ["v3", "refund", "domestic", "refunds", no]) => refund_query(state, no),
        _ => Err(Error::wechat(
            StatusCode::NOT_FOUND,
            "RESOURCE_NOT_EXISTS",
            format!(
                "no such API: {} {path} (the simulator serves native orders, query, close and refunds)",
                method
            ),
        )),
    }
}

fn json_body(body: &[u8]) -> Result<Map<String, Value>, Error> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(param_error("the body must be a JSON object")),
    }
}

fn text<'a>(object: &'a Map<String, Value>, name: &str) -> Result<&'a str, Error> {
    match object.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(_) => Err(param_error(format!("{name} must be a non-empty string"))),
        None => Err(param_error(format!("{name} is required"))),
    }
}

fn optional_text<'a>(object: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, Error> {
    match object.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => text(object, name).map(Some),
    }
}

fn integer(object: &Map<String, Value>, name: &str, context: &str) -> Result<i64, Error> {
    object
        .get(name)
        .ok_or_else(|| param_error(format!("{context}{name} is required")))?
        .as_i64()
        .filter(|n| (1..=MAX_AMOUNT).contains(n))
        .ok_or_else(|| {
            param_error(format!(
                "{context}{name} must be a whole number of fen from 1 to {MAX_AMOUNT}"
            ))
        })
}

fn currency(amount: &Map<String, Value>) -> Result<(), Error> {
    match amount.get("currency") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(c)) if c == "CNY" => Ok(()),
        Some(other) => Err(param_error(format!(
            "amount.currency {other} is not supported (CNY)"
        ))),
    }
}

/// WeChat Pay's `out_trade_no`: 6 to 32 characters of `0-9a-zA-Z_-|*`.
pub fn valid_out_trade_no(no: &str) -> bool {
    (6..=32).contains(&no.len())
        && no
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-|*".contains(&b))
}

fn native(state: &AppState, body: &[u8]) -> Result<Answer, Error> {
    let keys = &state.config.keys.wechat;
    let request = json_body(body)?;
    let appid = text(&request, "appid")?;
    let mchid = text(&request, "mchid")?;
    let description = text(&request, "description")?;
    let out_trade_no = text(&request, "out_trade_no")?;
    let notify_url = text(&request, "notify_url")?;
    if mchid != keys.mchid {
        return Err(param_error(format!(
            "mchid {mchid} is not the merchant that signed the request"
        )));
    }
    if appid != keys.appid {
        return Err(Error::wechat(
            StatusCode::BAD_REQUEST,
            "APPID_MCHID_NOT_MATCH",
            format!("appid和mch_id不匹配 ({appid} is not bound to {mchid})"),
        ));
    }
    if description.chars().count() > 127 {
        return Err(param_error("description is longer than 127 characters"));
    }
    if !valid_out_trade_no(out_trade_no) {
        return Err(param_error(
            "out_trade_no must be 6 to 32 characters of 0-9, a-z, A-Z, _, -, | or *",
        ));
    }
    if !(notify_url.starts_with("https://") || notify_url.starts_with("http://"))
        || notify_url.contains('?')
    {
        return Err(param_error(
            "notify_url must be an absolute http(s) URL without a query string",
        ));
    }
    let amount = match request.get("amount") {
        Some(Value::Object(amount)) => amount,
        _ => return Err(param_error("amount is required and must be an object")),
    };
    let total = integer(amount, "total", "amount.")?;
    currency(amount)?;
    let expires_at = optional_text(&request, "time_expire")?
        .map(|at| {
            DateTime::parse_from_rfc3339(at)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| {
                    param_error(format!(
                        "time_expire {at:?} is not RFC 3339 (2018-06-08T10:34:56+08:00)"
                    ))
                })
        })
        .transpose()?;
    let attach = optional_text(&request, "attach")?;
    let pr = crypto::random_alphanumeric(9);
    let order = Order {
        channel: Channel::Wechat,
        out_trade_no: out_trade_no.to_owned(),
        subject: description.to_owned(),
        amount: total,
        notify_url: Some(notify_url.to_owned()),
        return_url: None,
        kind: "native".to_owned(),
        product_code: String::new(),
        trade_no: None,
        code_pr: Some(pr),
        attach: attach.map(str::to_owned),
        status: Status::Pending,
        created_at: Utc::now(),
        expires_at,
        paid_at: None,
        closed_at: None,
        buyer: None,
        refunds: Vec::new(),
        notification: None,
        attempts: Vec::new(),
    };
    let (order, same) = match state
        .store
        .create(order, |o| o.amount == total && o.subject == description)
    {
        Created::New(order) | Created::Same(order) => (order, true),
        Created::Conflict(order) => (order, false),
    };
    match order.status {
        Status::Paid | Status::Refunded => Err(Error::wechat(
            StatusCode::BAD_REQUEST,
            "ORDERPAID",
            "该订单已支付",
        )),
        Status::Closed => Err(Error::wechat(
            StatusCode::BAD_REQUEST,
            "ORDER_CLOSED",
            "订单已关闭",
        )),
        Status::Pending if !same => Err(Error::wechat(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "201 商户订单号重复 (this out_trade_no was used with another amount or description)",
        )),
        Status::Pending => Ok((StatusCode::OK, Some(json!({"code_url": code_url(&order)})))),
    }
}

pub fn code_url(order: &Order) -> String {
    format!(
        "weixin://wxpay/bizpayurl?pr={}",
        order.code_pr.as_deref().unwrap_or_default()
    )
}

enum Lookup<'a> {
    OutTradeNo(&'a str),
    TransactionId(&'a str),
}

fn check_mchid(keys: &WechatKeys, mchid: Option<&str>) -> Result<(), Error> {
    match mchid {
        None | Some("") => Err(param_error("mchid is required")),
        Some(m) if m != keys.mchid => Err(param_error(format!(
            "mchid {m} is not the merchant that signed the request"
        ))),
        Some(_) => Ok(()),
    }
}

fn order_not_exist() -> Error {
    Error::wechat(StatusCode::NOT_FOUND, "ORDER_NOT_EXIST", "订单不存在")
}

fn query(state: &AppState, uri: &Uri, lookup: Lookup<'_>) -> Result<Answer, Error> {
    let keys = &state.config.keys.wechat;
    let params: BTreeMap<String, String> =
        form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    check_mchid(keys, params.get("mchid").map(String::as_str))?;
    let order = match lookup {
        Lookup::OutTradeNo(no) => state.store.get(no).filter(|o| o.channel == Channel::Wechat),
        Lookup::TransactionId(id) => state
            .store
            .by_trade_no(Channel::Wechat, id)
            .and_then(|no| state.store.get(&no)),
    }
    .ok_or_else(order_not_exist)?;
    Ok((StatusCode::OK, Some(transaction(keys, &order))))
}

fn close(state: &AppState, no: &str, body: &[u8]) -> Result<Answer, Error> {
    let keys = &state.config.keys.wechat;
    let request = json_body(body)?;
    check_mchid(keys, request.get("mchid").and_then(Value::as_str))?;
    let now = Utc::now();
    let outcome = state
        .store
        .update(no, |o| {
            if o.channel != Channel::Wechat {
                return Err(order_not_exist());
            }
            match o.status {
                Status::Pending => {
                    o.status = Status::Closed;
                    o.closed_at = Some(now);
                    Ok(())
                }
                Status::Closed => Ok(()),
                Status::Paid | Status::Refunded => Err(Error::wechat(
                    StatusCode::BAD_REQUEST,
                    "ORDERPAID",
                    "订单已支付",
                )),
            }
        })
        .ok_or_else(order_not_exist)?;
    outcome.map(|()| (StatusCode::NO_CONTENT, None))
}

/// `trade_state` and `trade_state_desc` of an order.
pub fn trade_state(order: &Order) -> (&'static str, &'static str) {
    match order.status {
        Status::Pending => ("NOTPAY", "订单未支付"),
        Status::Paid if order.refunds.is_empty() => ("SUCCESS", "支付成功"),
        Status::Paid | Status::Refunded => ("REFUND", "转入退款"),
        Status::Closed => ("CLOSED", "已关闭"),
    }
}

/// The transaction as query answers and notifications describe it.
pub fn transaction(keys: &WechatKeys, order: &Order) -> Value {
    let (state, desc) = trade_state(order);
    let mut t = json!({
        "appid": keys.appid,
        "mchid": keys.mchid,
        "out_trade_no": order.out_trade_no,
        "trade_state": state,
        "trade_state_desc": desc,
        "attach": order.attach.clone().unwrap_or_default(),
        "amount": {"total": order.amount, "currency": "CNY", "payer_currency": "CNY"},
    });
    if let (Some(paid_at), Some(id)) = (order.paid_at, &order.trade_no) {
        t["transaction_id"] = json!(id);
        t["trade_type"] = json!("NATIVE");
        t["bank_type"] = json!("OTHERS");
        t["success_time"] = json!(wechat_time(paid_at));
        t["payer"] = json!({"openid": order.buyer.clone().unwrap_or_default()});
        t["amount"]["payer_total"] = json!(order.amount);
        t["promotion_detail"] = json!([]);
    }
    t
}

/// A transaction id in the platform's shape: `4200`, the date, 16 digits.
pub fn new_transaction_id(now: DateTime<Utc>) -> String {
    format!("4200{}{}", beijing_date(now), crypto::random_digits(16))
}

/// An openid-like identifier for the simulated buyer.
pub fn new_openid() -> String {
    format!("o{}", crypto::random_alphanumeric(27))
}

fn refund_json(order: &Order, refund: &Refund) -> Value {
    json!({
        "refund_id": refund.refund_id,
        "out_refund_no": refund.out_refund_no,
        "transaction_id": order.trade_no.clone().unwrap_or_default(),
        "out_trade_no": order.out_trade_no,
        "channel": "ORIGINAL",
        "user_received_account": "支付用户零钱",
        "success_time": wechat_time(refund.at),
        "create_time": wechat_time(refund.at),
        "status": "SUCCESS",
        "funds_account": "AVAILABLE",
        "amount": {
            "total": order.amount,
            "refund": refund.amount,
            "payer_total": order.amount,
            "payer_refund": refund.amount,
            "settlement_total": order.amount,
            "settlement_refund": refund.amount,
            "discount_refund": 0,
            "refund_fee": 0,
            "currency": "CNY",
        },
        "promotion_detail": [],
    })
}

fn refund(state: &AppState, body: &[u8]) -> Result<Answer, Error> {
    let request = json_body(body)?;
    let out_refund_no = text(&request, "out_refund_no")?.to_owned();
    if out_refund_no.len() > 64 {
        return Err(param_error("out_refund_no is longer than 64 characters"));
    }
    let not_found = || Error::wechat(StatusCode::NOT_FOUND, "RESOURCE_NOT_EXISTS", "订单不存在");
    let out_trade_no = match (
        optional_text(&request, "transaction_id")?,
        optional_text(&request, "out_trade_no")?,
    ) {
        (Some(id), _) => state
            .store
            .by_trade_no(Channel::Wechat, id)
            .ok_or_else(not_found)?,
        (None, Some(no)) => no.to_owned(),
        (None, None) => return Err(param_error("transaction_id or out_trade_no is required")),
    };
    let amount = match request.get("amount") {
        Some(Value::Object(amount)) => amount,
        _ => return Err(param_error("amount is required and must be an object")),
    };
    let refund_amount = integer(amount, "refund", "amount.")?;
    let total = integer(amount, "total", "amount.")?;
    currency(amount)?;
    let now = Utc::now();
    let outcome = state
        .store
        .update(&out_trade_no, |o| {
            if o.channel != Channel::Wechat {
                return Err(not_found());
            }
            if o.paid_at.is_none() {
                return Err(Error::wechat(
                    StatusCode::BAD_REQUEST,
                    "INVALID_REQUEST",
                    "订单未支付，不能退款",
                ));
            }
            if total != o.amount {
                return Err(param_error(format!(
                    "amount.total {total} is not the order's total {}",
                    o.amount
                )));
            }
            if let Some(previous) = o.refunds.iter().find(|r| r.out_refund_no == out_refund_no) {
                return if previous.amount == refund_amount {
                    Ok((o.clone(), previous.clone()))
                } else {
                    Err(Error::wechat(
                        StatusCode::BAD_REQUEST,
                        "INVALID_REQUEST",
                        "this out_refund_no was used with another amount",
                    ))
                };
            }
            if o.refunded() + refund_amount > o.amount {
                return Err(Error::wechat(
                    StatusCode::BAD_REQUEST,
                    "INVALID_REQUEST",
                    format!(
                        "申请退款金额超过订单可退金额 ({} of {} fen is refundable)",
                        o.amount - o.refunded(),
                        o.amount
                    ),
                ));
            }
            let refund = Refund {
                out_refund_no: out_refund_no.clone(),
                refund_id: format!("50{}", crypto::random_digits(27)),
                amount: refund_amount,
                at: now,
            };
            o.refunds.push(refund.clone());
            if o.refunded() == o.amount {
                o.status = Status::Refunded;
            }
            Ok((o.clone(), refund))
        })
        .ok_or_else(not_found)?;
    let (order, refund) = outcome?;
    Ok((StatusCode::OK, Some(refund_json(&order, &refund))))
}

fn refund_query(state: &AppState, out_refund_no: &str) -> Result<Answer, Error> {
    let order = state
        .store
        .find(|o| {
            o.channel == Channel::Wechat
                && o.refunds.iter().any(|r| r.out_refund_no == out_refund_no)
        })
        .ok_or_else(|| {
            Error::wechat(StatusCode::NOT_FOUND, "RESOURCE_NOT_EXISTS", "退款单不存在")
        })?;
    let refund = order
        .refunds
        .iter()
        .find(|r| r.out_refund_no == out_refund_no)
        .ok_or_else(|| {
            Error::wechat(StatusCode::NOT_FOUND, "RESOURCE_NOT_EXISTS", "退款单不存在")
        })?;
    Ok((StatusCode::OK, Some(refund_json(&order, refund))))
}

/// The `TRANSACTION.SUCCESS` notification for a paid order: the transaction encrypted under the
/// APIv3 key. Its headers are signed at each delivery ([`signed_headers`]).
pub fn notification(keys: &WechatKeys, order: &Order) -> Result<Notification, AeadError> {
    let plaintext = transaction(keys, order).to_string();
    let nonce = crypto::random_alphanumeric(12);
    let ciphertext = crypto::aead_seal(
        keys.apiv3_key.as_bytes(),
        nonce.as_bytes(),
        TRANSACTION_AAD.as_bytes(),
        plaintext.as_bytes(),
    )?;
    let body = json!({
        "id": uuid::Uuid::new_v4().to_string(),
        "create_time": wechat_time(Utc::now()),
        "resource_type": "encrypt-resource",
        "event_type": "TRANSACTION.SUCCESS",
        "summary": "支付成功",
        "resource": {
            "original_type": "transaction",
            "algorithm": "AEAD_AES_256_GCM",
            "ciphertext": crypto::base64_encode(&ciphertext),
            "associated_data": TRANSACTION_AAD,
            "nonce": nonce,
        },
    });
    Ok(Notification::Wechat {
        body: body.to_string(),
    })
}

/// WeChat Pay takes any 2xx as the merchant's acknowledgement.
pub fn acknowledged(status: u16) -> bool {
    (200..300).contains(&status)
}

#[cfg(test)]
mod tests {
    use rsa::pkcs1v15::VerifyingKey;
    use sha2::Sha256;

    use super::*;
    use crate::crypto::tests::wechatpay_go_key;
    use crate::keys::test_keys;

    #[test]
    fn authorization_headers() {
        // wechatpay-go's HeaderAuthorizationFormat order, and wechatpayv3's (signature before
        // timestamp): any order is accepted.
        for header in [
            r#"WECHATPAY2-SHA256-RSA2048 mchid="1900000001",nonce_str="abc",timestamp="1554208460",serial_no="1DDE55AD98ED71D6EDD4A4A16996DE7B47773A8C",signature="c2ln+/=""#,
            r#"WECHATPAY2-SHA256-RSA2048 mchid="1900000001",nonce_str="abc",signature="c2ln+/=",timestamp="1554208460",serial_no="1DDE55AD98ED71D6EDD4A4A16996DE7B47773A8C""#,
            r#"WECHATPAY2-SHA256-RSA2048 mchid="1900000001", nonce_str="abc", signature="c2ln+/=", timestamp="1554208460", serial_no="1DDE55AD98ED71D6EDD4A4A16996DE7B47773A8C""#,
        ] {
            let auth = parse_authorization(header).unwrap_or_else(|e| panic!("{header}: {e}"));
            assert_eq!(auth.mchid, "1900000001");
            assert_eq!(auth.nonce_str, "abc");
            assert_eq!(auth.signature, "c2ln+/=");
            assert_eq!(auth.timestamp, "1554208460");
            assert_eq!(auth.serial_no, "1DDE55AD98ED71D6EDD4A4A16996DE7B47773A8C");
        }
        let check_err = |header: &str, want: &str| {
            let err = parse_authorization(header).unwrap_err();
            assert!(err.contains(want), "{header}: {err}");
        };
        check_err(r#"WECHATPAY2-SHA256-RSA2048mchid="1""#, "scheme");
        check_err(r#"Bearer x"#, "scheme");
        check_err(
            r#"WECHATPAY2-SHA256-RSA2048 mchid=1,nonce_str="a",signature="s",timestamp="1",serial_no="x""#,
            "quotes",
        );
        check_err(
            r#"WECHATPAY2-SHA256-RSA2048 mchid="1",nonce_str="a",timestamp="1",serial_no="x""#,
            "signature is missing",
        );
        check_err(
            r#"WECHATPAY2-SHA256-RSA2048 mchid="1",mchid="2",nonce_str="a",signature="s",timestamp="1",serial_no="x""#,
            "twice",
        );
    }

    /// wechatpay-go `SignatureMessageFormat = "%s\n%s\n%d\n%s\n%s\n"` (method, canonical URL,
    /// timestamp, nonce, body) and the validators' `"%s\n%s\n%s\n"` (timestamp, nonce, body).
    #[test]
    fn message_formats() {
        assert_eq!(
            request_message("GET", "/v3/pay/transactions/out-trade-no/1217752501201407033233368018?mchid=1230000109", "1554208460", "593BEC0C930BF1AFEB40B4A08C8FB242", b""),
            b"GET\n/v3/pay/transactions/out-trade-no/1217752501201407033233368018?mchid=1230000109\n1554208460\n593BEC0C930BF1AFEB40B4A08C8FB242\n\n"
        );
        assert_eq!(
            request_message(
                "POST",
                "/v3/pay/transactions/native",
                "1",
                "n",
                br#"{"a":1}"#
            ),
            b"POST\n/v3/pay/transactions/native\n1\nn\n{\"a\":1}\n"
        );
        assert_eq!(response_message("1", "n", b""), b"1\nn\n\n");
    }

    /// wechatpay-go `core/notify/notify_test.go` TestHandler_ParseNotifyRequest: a signed,
    /// encrypted notification (headers, body, APIv3 key) and its expected plaintext. The
    /// platform certificate there holds the public half of the same published test key.
    #[test]
    fn wechatpay_go_notification_vector() {
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
        let platform = VerifyingKey::<Sha256>::new(wechatpay_go_key().to_public_key());
        let message = response_message(
            "1624523846",
            "EcZ9Cmy4Xyx1i6RlJQzLcCyEqDa26NBz",
            body.as_bytes(),
        );
        assert!(crypto::verify(&platform, &message, signature));
        let tampered = response_message(
            "1624523847",
            "EcZ9Cmy4Xyx1i6RlJQzLcCyEqDa26NBz",
            body.as_bytes(),
        );
        assert!(!crypto::verify(&platform, &tampered, signature));

        let resource = &serde_json::from_str::<Value>(body).unwrap()["resource"];
        let ciphertext = crypto::base64_decode(resource["ciphertext"].as_str().unwrap()).unwrap();
        let plaintext = crypto::aead_open(
            b"testMchAPIv3Key0",
            resource["nonce"].as_str().unwrap().as_bytes(),
            resource["associated_data"].as_str().unwrap().as_bytes(),
            &ciphertext,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(plaintext).unwrap(),
            concat!(
                "{",
                "\"mchid\":\"1234567890\",",
                "\"appid\":\"054aa7d7a2a54ab5898df65bd96f001c\",",
                "\"create_time\":\"2020-06-30T12:12:00+08:00\",",
                "\"out_contract_code\":\"21640bdbd08e473e828f3206a2741c6e\"",
                "}"
            )
        );
    }

    fn paid_order() -> Order {
        let now = Utc::now();
        Order {
            channel: Channel::Wechat,
            out_trade_no: "ord_123456".to_owned(),
            subject: "Pro plan".to_owned(),
            amount: 9900,
            notify_url: Some("http://127.0.0.1:1/notify".to_owned()),
            return_url: None,
            kind: "native".to_owned(),
            product_code: String::new(),
            trade_no: Some(new_transaction_id(now)),
            code_pr: Some("AbCdEfGhI".to_owned()),
            attach: None,
            status: Status::Paid,
            created_at: now,
            expires_at: None,
            paid_at: Some(now),
            closed_at: None,
            buyer: Some(new_openid()),
            refunds: Vec::new(),
            notification: None,
            attempts: Vec::new(),
        }
    }

    #[test]
    fn our_notifications_decrypt_with_the_apiv3_key() {
        let keys = test_keys();
        let order = paid_order();
        let Ok(Notification::Wechat { body }) = notification(&keys.wechat, &order) else {
            panic!("a WeChat notification");
        };
        let event: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(event["event_type"], "TRANSACTION.SUCCESS");
        assert_eq!(event["resource_type"], "encrypt-resource");
        let resource = &event["resource"];
        assert_eq!(resource["algorithm"], "AEAD_AES_256_GCM");
        assert_eq!(resource["associated_data"], "transaction");
        let nonce = resource["nonce"].as_str().unwrap();
        assert_eq!(nonce.len(), 12);
        let ciphertext = crypto::base64_decode(resource["ciphertext"].as_str().unwrap()).unwrap();
        let plaintext = crypto::aead_open(
            keys.wechat.apiv3_key.as_bytes(),
            nonce.as_bytes(),
            b"transaction",
            &ciphertext,
        )
        .unwrap();
        let transaction: Value = serde_json::from_slice(&plaintext).unwrap();
        assert_eq!(transaction["trade_state"], "SUCCESS");
        assert_eq!(transaction["trade_type"], "NATIVE");
        assert_eq!(transaction["mchid"], "1900000001");
        assert_eq!(transaction["appid"], "wx0000000000000001");
        assert_eq!(transaction["out_trade_no"], "ord_123456");
        assert_eq!(transaction["amount"]["total"], 9900);
        assert_eq!(transaction["amount"]["payer_total"], 9900);
        assert_eq!(transaction["transaction_id"], json!(order.trade_no));
        assert!(
            transaction["payer"]["openid"]
                .as_str()
                .is_some_and(|o| o.starts_with('o'))
        );

        let headers = signed_headers(&keys.wechat, body.as_bytes());
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        let platform = VerifyingKey::<Sha256>::new(keys.wechat.platform.as_ref().to_public_key());
        let message = response_message(
            &get("Wechatpay-Timestamp"),
            &get("Wechatpay-Nonce"),
            body.as_bytes(),
        );
        assert!(crypto::verify(
            &platform,
            &message,
            &get("Wechatpay-Signature")
        ));
        assert_eq!(get("Wechatpay-Serial"), keys.wechat.platform_serial);
        assert_eq!(get("Wechatpay-Signature-Type"), SCHEME);
    }

    #[test]
    fn trade_states() {
        let mut order = paid_order();
        assert_eq!(trade_state(&order).0, "SUCCESS");
        order.refunds.push(Refund {
            out_refund_no: "r1".into(),
            refund_id: "1".into(),
            amount: 1,
            at: Utc::now(),
        });
        assert_eq!(trade_state(&order).0, "REFUND");
        order.status = Status::Pending;
        order.refunds.clear();
        assert_eq!(trade_state(&order).0, "NOTPAY");
        order.status = Status::Closed;
        assert_eq!(trade_state(&order).0, "CLOSED");
    }

    #[test]
    fn out_trade_numbers() {
        assert!(valid_out_trade_no("ord_123456"));
        assert!(valid_out_trade_no("a-b|c*d_e1"));
        assert!(valid_out_trade_no(&"a".repeat(32)));
        assert!(!valid_out_trade_no(&"a".repeat(33)));
        assert!(!valid_out_trade_no("abcde"));
        assert!(!valid_out_trade_no("abc def"));
    }

    #[test]
    fn signed_url_strips_only_the_mount() {
        let uri: Uri = "/wechat/v3/pay/transactions/out-trade-no/x?mchid=1"
            .parse()
            .unwrap();
        assert_eq!(
            signed_url(&uri),
            "/v3/pay/transactions/out-trade-no/x?mchid=1"
        );
    }
}
