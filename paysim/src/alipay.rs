//! The Alipay open platform gateway (`https://openapi.alipay.com/gateway.do`), RSA2 only.
//!
//! Every call is one set of parameters — the query string and, for a POST, the form body, merged
//! as the real gateway does (the official SDKs put the common parameters in the URL and
//! `biz_content` in the body). The request signature covers every parameter but `sign`,
//! `sign_type` included, empty values dropped, sorted by name, joined raw as `k=v&…`, and is
//! checked with the APP's public key. Notifications and return redirects are signed by the
//! gateway over the same kind of string without `sign_type`; sync responses are signed over the
//! exact bytes of the `<method>_response` value, with `sign` last.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Duration, Utc};
use serde_json::{Map, Value};

use crate::AppState;
use crate::crypto;
use crate::error::Error;
use crate::format::{alipay_time, beijing_date, parse_alipay_time, parse_yuan, yuan};
use crate::keys::AlipayKeys;
use crate::pages;
use crate::store::{Channel, Created, Notification, Order, Refund, Status};

pub const PAGE_PAY: &str = "alipay.trade.page.pay";
pub const WAP_PAY: &str = "alipay.trade.wap.pay";
pub const QUERY: &str = "alipay.trade.query";
pub const CLOSE: &str = "alipay.trade.close";
pub const REFUND: &str = "alipay.trade.refund";

/// How far a request's `timestamp` may be from the gateway's clock.
const MAX_CLOCK_SKEW_SECONDS: i64 = 10 * 60;

pub type Params = Vec<(String, String)>;

/// The string a signature covers: every parameter not in `exclude`, empty values dropped,
/// sorted by name, `name=value` joined with `&`, values raw (not URL-encoded).
pub fn sign_content(params: &[(String, String)], exclude: &[&str]) -> String {
    let mut pairs: Vec<&(String, String)> = params
        .iter()
        .filter(|(k, v)| !k.is_empty() && !v.is_empty() && !exclude.contains(&k.as_str()))
        .collect();
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = String::new();
    for (i, (k, v)) in pairs.into_iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// What a merchant's request signature covers: all but `sign` (`sign_type` included).
pub fn request_sign_content(params: &[(String, String)]) -> String {
    sign_content(params, &["sign"])
}

/// What the gateway's notification (and return-redirect) signature covers: all but `sign` and
/// `sign_type` — Alipay's `rsaCheckV1`.
pub fn notify_sign_content(params: &[(String, String)]) -> String {
    sign_content(params, &["sign", "sign_type"])
}

/// The JSON text of an object with its members in the given order, with `/` escaped as `\/`
/// as the real gateway writes it — so a merchant that re-serialises the response instead of
/// verifying the bytes it received fails here as it would in production.
pub fn response_json(fields: &[(&str, Value)]) -> String {
    let members: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{}", Value::String((*k).to_owned()), v))
        .collect();
    format!("{{{}}}", members.join(",")).replace('/', "\\/")
}

/// `{"<key>":<value>,"sign":"…"}`: the value's bytes as written here are what is signed.
pub fn signed_response(keys: &AlipayKeys, key: &str, fields: &[(&str, Value)]) -> String {
    let inner = response_json(fields);
    let sign = crypto::sign(&keys.gateway, inner.as_bytes());
    format!(
        "{{{}:{inner},\"sign\":\"{sign}\"}}",
        Value::String(key.to_owned())
    )
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, v)| k == name && !v.is_empty())
        .map(|(_, v)| v.as_str())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// page.pay / wap.pay: the buyer's browser is at the gateway, answers are HTML.
    Page { wap: bool },
    /// A server-to-server call answered with the signed JSON envelope.
    Api(&'static str),
}

fn kind(method: &str) -> Option<Kind> {
    Some(match method {
        PAGE_PAY => Kind::Page { wap: false },
        WAP_PAY => Kind::Page { wap: true },
        QUERY => Kind::Api(QUERY),
        CLOSE => Kind::Api(CLOSE),
        REFUND => Kind::Api(REFUND),
        _ => return None,
    })
}

/// `GET|POST /alipay/gateway.do`.
pub async fn gateway(
    State(state): State<Arc<AppState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let keys = &state.config.keys.alipay;
    let params = match collect_params(&uri, &headers, &body) {
        Ok(params) => params,
        Err(e) => return render_error(keys, None, e),
    };
    let kind = param(&params, "method").and_then(kind);
    let result = match (param(&params, "method"), kind) {
        (None, _) => Err(Error::alipay_missing(
            "isv.missing-method",
            "缺少方法名参数 (method is required)",
        )),
        (Some(method), None) => Err(Error::alipay_invalid(
            "isv.invalid-method",
            format!(
                "不存在的方法名 (the simulator serves {PAGE_PAY}, {WAP_PAY}, {QUERY}, {CLOSE} and {REFUND}, not {method:?})"
            ),
        )),
        (Some(_), Some(kind)) => verify(keys, &params).and_then(|biz| match kind {
            Kind::Page { wap } => page_pay(&state, &params, &biz, wap),
            Kind::Api(method) => {
                let fields = match method {
                    QUERY => query(&state, &biz),
                    CLOSE => close(&state, &biz),
                    _ => refund(&state, &biz),
                }?;
                Ok(api_response(keys, method, &fields))
            }
        }),
    };
    result.unwrap_or_else(|e| render_error(keys, kind, e))
}

fn api_response(keys: &AlipayKeys, method: &str, fields: &[(&str, Value)]) -> Response {
    let key = format!("{}_response", method.replace('.', "_"));
    let body = signed_response(keys, &key, fields);
    (
        [(header::CONTENT_TYPE, "application/json;charset=utf-8")],
        body,
    )
        .into_response()
}

fn render_error(keys: &AlipayKeys, kind: Option<Kind>, error: Error) -> Response {
    let Error::Alipay {
        code,
        msg,
        sub_code,
        sub_msg,
    } = &error
    else {
        return error.into_response();
    };
    match kind {
        Some(Kind::Page { .. }) => pages::alipay_error(code, sub_code, sub_msg),
        Some(Kind::Api(method)) => api_response(
            keys,
            method,
            &[
                ("code", Value::from(*code)),
                ("msg", Value::from(*msg)),
                ("sub_code", Value::from(*sub_code)),
                ("sub_msg", Value::from(sub_msg.as_str())),
            ],
        ),
        // No method the gateway knows: Alipay answers under `error_response`.
        None => {
            let body = signed_response(
                keys,
                "error_response",
                &[
                    ("code", Value::from(*code)),
                    ("msg", Value::from(*msg)),
                    ("sub_code", Value::from(*sub_code)),
                    ("sub_msg", Value::from(sub_msg.as_str())),
                ],
            );
            (
                [(header::CONTENT_TYPE, "application/json;charset=utf-8")],
                body,
            )
                .into_response()
        }
    }
}

fn collect_params(uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Result<Params, Error> {
    let mut params: Params = uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    if !body.is_empty() {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if !(content_type.is_empty()
            || content_type.starts_with("application/x-www-form-urlencoded"))
        {
            return Err(Error::alipay_invalid(
                "isv.invalid-parameter",
                format!("the body must be application/x-www-form-urlencoded, not {content_type:?}"),
            ));
        }
        params.extend(form_urlencoded::parse(body).into_owned());
    }
    let mut seen = BTreeSet::new();
    for (k, _) in &params {
        if !seen.insert(k.as_str()) {
            return Err(Error::alipay_invalid(
                "isv.invalid-parameter",
                format!("parameter {k} is given more than once"),
            ));
        }
    }
    Ok(params)
}

/// The gateway's checks on the common parameters, in its order, then `biz_content`.
fn verify(keys: &AlipayKeys, params: &[(String, String)]) -> Result<Map<String, Value>, Error> {
    let app_id = param(params, "app_id")
        .ok_or_else(|| Error::alipay_missing("isv.missing-app-id", "缺少AppID参数"))?;
    if app_id != keys.app_id {
        return Err(Error::alipay_invalid(
            "isv.invalid-app-id",
            format!("无效的AppID参数 ({app_id})"),
        ));
    }
    let sign = param(params, "sign")
        .ok_or_else(|| Error::alipay_missing("isv.missing-signature", "缺少签名参数"))?;
    let sign_type = param(params, "sign_type")
        .ok_or_else(|| Error::alipay_missing("isv.missing-signature-type", "缺少签名类型参数"))?;
    if sign_type != "RSA2" {
        return Err(Error::alipay_invalid(
            "isv.invalid-signature-type",
            format!("无效的签名类型参数 ({sign_type}; this gateway accepts RSA2)"),
        ));
    }
    let charset = param(params, "charset")
        .ok_or_else(|| Error::alipay_missing("isv.missing-charset", "缺少字符集参数"))?;
    if !(charset.eq_ignore_ascii_case("utf-8") || charset.eq_ignore_ascii_case("utf8")) {
        return Err(Error::alipay_invalid(
            "isv.invalid-charset",
            format!("字符集错误 ({charset}; this gateway accepts utf-8)"),
        ));
    }
    let content = request_sign_content(params);
    if !crypto::verify(&keys.app_public, content.as_bytes(), sign) {
        return Err(Error::alipay_invalid(
            "isv.invalid-signature",
            format!(
                "验签出错，建议检查签名字符串或签名私钥与应用公钥是否匹配，网关生成的验签字符串为：{content}"
            ),
        ));
    }
    let timestamp = param(params, "timestamp")
        .ok_or_else(|| Error::alipay_missing("isv.missing-timestamp", "缺少时间戳参数"))?;
    let at = parse_alipay_time(timestamp).ok_or_else(|| {
        Error::alipay_invalid(
            "isv.invalid-timestamp",
            format!(
                "非法的时间戳参数 ({timestamp:?}; expected yyyy-MM-dd HH:mm:ss in Beijing time)"
            ),
        )
    })?;
    let now = Utc::now();
    if (now - at).num_seconds().abs() > MAX_CLOCK_SKEW_SECONDS {
        return Err(Error::alipay_invalid(
            "isv.invalid-timestamp",
            format!(
                "非法的时间戳参数: {timestamp} is more than 10 minutes from the gateway's clock ({} Beijing time)",
                alipay_time(now)
            ),
        ));
    }
    let version = param(params, "version")
        .ok_or_else(|| Error::alipay_missing("isv.missing-version", "缺少版本参数"))?;
    if version != "1.0" {
        return Err(Error::alipay_invalid(
            "isv.invalid-parameter",
            format!("version must be 1.0, not {version}"),
        ));
    }
    match param(params, "biz_content") {
        None => Ok(Map::new()),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => Ok(map),
            _ => Err(Error::alipay_invalid(
                "isv.invalid-parameter",
                "biz_content is not a JSON object",
            )),
        },
    }
}

fn invalid(message: impl Into<String>) -> Error {
    Error::alipay_business("ACQ.INVALID_PARAMETER", message)
}

/// A string member of biz_content; numbers are taken as their JSON text (SDKs send amounts both
/// ways).
fn text(biz: &Map<String, Value>, name: &str) -> Option<String> {
    match biz.get(name)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn required(biz: &Map<String, Value>, name: &str) -> Result<String, Error> {
    text(biz, name).ok_or_else(|| invalid(format!("参数有误: biz_content.{name} is required")))
}

fn amount(biz: &Map<String, Value>, name: &str) -> Result<i64, Error> {
    let raw = required(biz, name)?;
    parse_yuan(&raw).ok_or_else(|| {
        invalid(format!(
            "参数有误: biz_content.{name} {raw:?} must be yuan with at most two decimals, between 0.01 and 100000000"
        ))
    })
}

/// Alipay's `out_trade_no`: at most 64 letters, digits and underscores.
pub fn valid_out_trade_no(no: &str) -> bool {
    (1..=64).contains(&no.len()) && no.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `timeout_express` such as `90m`, `2h`, `1d`; `1c` means the end of the day (Beijing time).
fn parse_timeout_express(text: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let (number, unit) = text.split_at(text.len().checked_sub(1)?);
    let n: i64 = number.parse().ok().filter(|n| *n > 0)?;
    match unit {
        "m" => Some(now + Duration::minutes(n)),
        "h" => Some(now + Duration::hours(n)),
        "d" => Some(now + Duration::days(n)),
        "c" if n == 1 => parse_alipay_time(&format!("{} 23:59:59", alipay_time(now).get(..10)?)),
        _ => None,
    }
}

/// A trade number in the gateway's shape: date, a fixed `2200`, 16 digits.
pub fn new_trade_no(now: DateTime<Utc>) -> String {
    format!("{}2200{}", beijing_date(now), crypto::random_digits(16))
}

/// `alipay.trade.page.pay` / `alipay.trade.wap.pay`: registers the order and shows the cashier.
fn page_pay(
    state: &AppState,
    params: &[(String, String)],
    biz: &Map<String, Value>,
    wap: bool,
) -> Result<Response, Error> {
    let method = if wap { WAP_PAY } else { PAGE_PAY };
    let product_code = required(biz, "product_code")?;
    // QUICK_WAP_WAY is the documented code; python-alipay-sdk sends QUICK_WAP_PAY.
    let allowed: &[&str] = if wap {
        &["QUICK_WAP_WAY", "QUICK_WAP_PAY"]
    } else {
        &["FAST_INSTANT_TRADE_PAY"]
    };
    if !allowed.contains(&product_code.as_str()) {
        return Err(invalid(format!(
            "product_code {product_code} does not go with {method} (use {})",
            allowed[0]
        )));
    }
    let out_trade_no = required(biz, "out_trade_no")?;
    if !valid_out_trade_no(&out_trade_no) {
        return Err(invalid(
            "参数有误: out_trade_no must be 1 to 64 letters, digits or underscores",
        ));
    }
    let subject = required(biz, "subject")?;
    if subject.chars().count() > 256 {
        return Err(invalid("参数有误: subject is longer than 256 characters"));
    }
    let total = amount(biz, "total_amount")?;
    let now = Utc::now();
    let expires_at = match (text(biz, "time_expire"), text(biz, "timeout_express")) {
        (Some(at), _) => Some(
            parse_alipay_time(&at)
                .ok_or_else(|| invalid(format!("time_expire {at:?} is not yyyy-MM-dd HH:mm:ss")))?,
        ),
        (None, Some(express)) => Some(parse_timeout_express(&express, now).ok_or_else(|| {
            invalid(format!(
                "timeout_express {express:?} is not like 90m, 2h, 1d or 1c"
            ))
        })?),
        (None, None) => None,
    };
    let order = Order {
        channel: Channel::Alipay,
        out_trade_no: out_trade_no.clone(),
        subject: subject.clone(),
        amount: total,
        notify_url: param(params, "notify_url").map(str::to_owned),
        return_url: param(params, "return_url").map(str::to_owned),
        kind: method.to_owned(),
        product_code,
        trade_no: Some(new_trade_no(now)),
        code_pr: None,
        attach: text(biz, "passback_params"),
        status: Status::Pending,
        created_at: now,
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
        .create(order, |o| o.amount == total && o.subject == subject)
    {
        Created::New(order) => (order, true),
        Created::Same(order) => (order, true),
        Created::Conflict(order) => (order, false),
    };
    match order.status {
        Status::Paid | Status::Refunded => Err(Error::alipay_business(
            "ACQ.TRADE_HAS_SUCCESS",
            "交易已被支付",
        )),
        Status::Closed => Err(Error::alipay_business(
            "ACQ.TRADE_HAS_CLOSE",
            "交易已经关闭",
        )),
        Status::Pending if !same => Err(Error::alipay_business(
            "ACQ.CONTEXT_INCONSISTENT",
            "交易信息被篡改: this out_trade_no was opened before with another amount or subject",
        )),
        Status::Pending => Ok(pages::alipay_cashier(&order, wap)),
    }
}

fn find(state: &AppState, biz: &Map<String, Value>) -> Result<Order, Error> {
    let not_found = || Error::alipay_business("ACQ.TRADE_NOT_EXIST", "交易不存在");
    let out_trade_no = match (text(biz, "out_trade_no"), text(biz, "trade_no")) {
        (Some(no), _) => no,
        (None, Some(trade_no)) => state
            .store
            .by_trade_no(Channel::Alipay, &trade_no)
            .ok_or_else(not_found)?,
        (None, None) => return Err(invalid("参数有误: out_trade_no or trade_no is required")),
    };
    state
        .store
        .get(&out_trade_no)
        .filter(|o| o.channel == Channel::Alipay)
        .ok_or_else(not_found)
}

pub fn trade_status(order: &Order) -> &'static str {
    match order.status {
        Status::Pending => "WAIT_BUYER_PAY",
        Status::Paid => "TRADE_SUCCESS",
        Status::Closed | Status::Refunded => "TRADE_CLOSED",
    }
}

fn success() -> Vec<(&'static str, Value)> {
    vec![
        ("code", Value::from("10000")),
        ("msg", Value::from("Success")),
    ]
}

/// `buyer_logon_id` as Alipay masks it.
const BUYER_LOGON_ID: &str = "buy***@sandbox.com";

fn query(state: &AppState, biz: &Map<String, Value>) -> Result<Vec<(&'static str, Value)>, Error> {
    let order = find(state, biz)?;
    let paid = order.paid_at.is_some();
    let total = yuan(order.amount);
    let paid_amount = if paid { total.clone() } else { yuan(0) };
    let mut fields = success();
    if paid {
        fields.push(("buyer_logon_id", Value::from(BUYER_LOGON_ID)));
    }
    fields.push(("buyer_pay_amount", Value::from(paid_amount.clone())));
    if let (true, Some(buyer)) = (paid, &order.buyer) {
        fields.push(("buyer_user_id", Value::from(buyer.as_str())));
    }
    if paid {
        fields.push((
            "fund_bill_list",
            serde_json::json!([{"amount": total, "fund_channel": "ALIPAYACCOUNT"}]),
        ));
    }
    fields.push(("invoice_amount", Value::from(paid_amount.clone())));
    fields.push(("out_trade_no", Value::from(order.out_trade_no.as_str())));
    fields.push(("point_amount", Value::from("0.00")));
    fields.push(("receipt_amount", Value::from(paid_amount)));
    if let Some(paid_at) = order.paid_at {
        fields.push(("send_pay_date", Value::from(alipay_time(paid_at))));
    }
    fields.push(("total_amount", Value::from(total)));
    fields.push((
        "trade_no",
        Value::from(order.trade_no.clone().unwrap_or_default()),
    ));
    fields.push(("trade_status", Value::from(trade_status(&order))));
    Ok(fields)
}

fn close(state: &AppState, biz: &Map<String, Value>) -> Result<Vec<(&'static str, Value)>, Error> {
    let order = find(state, biz)?;
    let now = Utc::now();
    let closed = state.store.update(&order.out_trade_no, |o| match o.status {
        Status::Pending => {
            o.status = Status::Closed;
            o.closed_at = Some(now);
            true
        }
        // Closing twice is harmless.
        Status::Closed => true,
        Status::Paid | Status::Refunded => false,
    });
    if closed != Some(true) {
        return Err(Error::alipay_business(
            "ACQ.TRADE_STATUS_ERROR",
            "交易状态不合法: the trade is paid",
        ));
    }
    let mut fields = success();
    fields.push(("out_trade_no", Value::from(order.out_trade_no.as_str())));
    fields.push(("trade_no", Value::from(order.trade_no.unwrap_or_default())));
    Ok(fields)
}

fn refund(state: &AppState, biz: &Map<String, Value>) -> Result<Vec<(&'static str, Value)>, Error> {
    let order = find(state, biz)?;
    let refund_amount = amount(biz, "refund_amount")?;
    // Without out_request_no a refund is the one full refund of the trade.
    let request_no = text(biz, "out_request_no").unwrap_or_else(|| order.out_trade_no.clone());
    let now = Utc::now();
    let outcome = state.store.update(&order.out_trade_no, |o| {
        if o.paid_at.is_none() {
            return Err(Error::alipay_business(
                "ACQ.TRADE_STATUS_ERROR",
                "交易状态不合法: the trade is not paid",
            ));
        }
        if let Some(previous) = o.refunds.iter().find(|r| r.out_refund_no == request_no) {
            return if previous.amount == refund_amount {
                Ok((false, o.refunded()))
            } else {
                Err(Error::alipay_business(
                    "ACQ.DISCORDANT_REPEAT_REQUEST",
                    "请求信息不一致: this out_request_no was used with another refund_amount",
                ))
            };
        }
        if o.status == Status::Closed {
            return Err(Error::alipay_business(
                "ACQ.TRADE_STATUS_ERROR",
                "交易状态不合法: the trade is closed",
            ));
        }
        if o.refunded() + refund_amount > o.amount {
            return Err(Error::alipay_business(
                "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL",
                format!(
                    "退款金额超限: {} of {} is refundable",
                    yuan(o.amount - o.refunded()),
                    yuan(o.amount)
                ),
            ));
        }
        o.refunds.push(Refund {
            out_refund_no: request_no.clone(),
            refund_id: new_trade_no(now),
            amount: refund_amount,
            at: now,
        });
        if o.refunded() == o.amount {
            o.status = Status::Refunded;
        }
        Ok((true, o.refunded()))
    });
    let (changed, refunded) =
        outcome.ok_or_else(|| Error::alipay_business("ACQ.TRADE_NOT_EXIST", "交易不存在"))??;
    let mut fields = success();
    fields.push(("buyer_logon_id", Value::from(BUYER_LOGON_ID)));
    if let Some(buyer) = &order.buyer {
        fields.push(("buyer_user_id", Value::from(buyer.as_str())));
    }
    fields.push(("fund_change", Value::from(if changed { "Y" } else { "N" })));
    fields.push(("gmt_refund_pay", Value::from(alipay_time(now))));
    fields.push(("out_trade_no", Value::from(order.out_trade_no.as_str())));
    fields.push(("refund_fee", Value::from(yuan(refunded))));
    fields.push(("send_back_fee", Value::from(yuan(refund_amount))));
    fields.push(("trade_no", Value::from(order.trade_no.unwrap_or_default())));
    Ok(fields)
}

/// Signs `params` the way the gateway signs what it sends (notify style) and appends `sign`.
fn sign_outgoing(keys: &AlipayKeys, params: &mut Params) {
    let content = notify_sign_content(params);
    params.push((
        "sign".to_owned(),
        crypto::sign(&keys.gateway, content.as_bytes()),
    ));
}

fn encode(params: &[(String, String)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish()
}

/// The asynchronous `trade_status_sync` notification for a paid order, signed once.
pub fn notification(keys: &AlipayKeys, order: &Order) -> Notification {
    let now = Utc::now();
    let total = yuan(order.amount);
    let pairs: [(&str, String); 23] = [
        ("gmt_create", alipay_time(order.created_at)),
        ("charset", "utf-8".into()),
        ("subject", order.subject.clone()),
        ("buyer_id", order.buyer.clone().unwrap_or_default()),
        ("invoice_amount", total.clone()),
        (
            "notify_id",
            format!("{}00222{}", beijing_date(now), crypto::random_digits(21)),
        ),
        (
            "fund_bill_list",
            format!(r#"[{{"amount":"{total}","fundChannel":"ALIPAYACCOUNT"}}]"#),
        ),
        ("notify_type", "trade_status_sync".into()),
        ("trade_status", "TRADE_SUCCESS".into()),
        ("receipt_amount", total.clone()),
        ("buyer_pay_amount", total.clone()),
        ("app_id", keys.app_id.clone()),
        ("sign_type", "RSA2".into()),
        ("seller_id", keys.seller_id.clone()),
        ("gmt_payment", alipay_time(order.paid_at.unwrap_or(now))),
        ("notify_time", alipay_time(now)),
        ("version", "1.0".into()),
        ("out_trade_no", order.out_trade_no.clone()),
        ("total_amount", total),
        ("trade_no", order.trade_no.clone().unwrap_or_default()),
        ("auth_app_id", keys.app_id.clone()),
        ("buyer_logon_id", BUYER_LOGON_ID.into()),
        ("point_amount", "0.00".into()),
    ];
    let mut params: Params = pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    if let Some(passback) = &order.attach {
        params.push(("passback_params".to_owned(), passback.clone()));
    }
    sign_outgoing(keys, &mut params);
    Notification::Alipay {
        form: encode(&params),
    }
}

/// Where the cashier sends the buyer's browser after paying: the merchant's `return_url` with
/// the signed synchronous result, as Alipay does.
pub fn return_redirect(keys: &AlipayKeys, order: &Order) -> Option<String> {
    let base = order.return_url.as_deref()?;
    let pairs: [(&str, String); 11] = [
        ("charset", "utf-8".into()),
        ("out_trade_no", order.out_trade_no.clone()),
        ("method", format!("{}.return", order.kind)),
        ("total_amount", yuan(order.amount)),
        ("trade_no", order.trade_no.clone().unwrap_or_default()),
        ("auth_app_id", keys.app_id.clone()),
        ("version", "1.0".into()),
        ("app_id", keys.app_id.clone()),
        ("sign_type", "RSA2".into()),
        ("seller_id", keys.seller_id.clone()),
        ("timestamp", alipay_time(Utc::now())),
    ];
    let mut params: Params = pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    sign_outgoing(keys, &mut params);
    let separator = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{separator}{}", encode(&params)))
}

/// Whether a merchant's answer to a notification acknowledges it: HTTP 200 and the body
/// `success` (surrounding whitespace tolerated, as `out.println("success")` in Alipay's own Java
/// demo adds a newline).
pub fn acknowledged(status: u16, body: &str) -> bool {
    status == StatusCode::OK.as_u16() && body.trim() == "success"
}

#[cfg(test)]
mod tests {
    use rsa::RsaPublicKey;
    use rsa::pkcs1v15::VerifyingKey;
    use rsa::pkcs8::DecodePublicKey as _;
    use sha2::Sha256;

    use super::*;
    use crate::keys::test_keys;

    fn params(pairs: &[(&str, &str)]) -> Params {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// The example of Alipay's open-platform guide "自行实现签名" (sign it yourself): the
    /// request parameters and the string to be signed it gives for them — `sign` left out,
    /// `sign_type` kept, sorted, raw values.
    #[test]
    fn request_sign_content_matches_alipay_docs_example() {
        let biz = r#"{"button":[{"actionParam":"ZFB_HFCZ","actionType":"out","name":"话费充值"},{"name":"查询","subButton":[{"actionParam":"ZFB_YECX","actionType":"out","name":"余额查询"},{"actionParam":"ZFB_LLCX","actionType":"out","name":"流量查询"},{"actionParam":"ZFB_HFCX","actionType":"out","name":"话费查询"}]},{"actionParam":"http://m.alipay.com","actionType":"link","name":"最新优惠"}]}"#;
        let request = params(&[
            ("app_id", "2014072300007148"),
            ("method", "alipay.mobile.public.menu.add"),
            ("charset", "GBK"),
            ("sign_type", "RSA2"),
            ("timestamp", "2014-07-24 03:07:50"),
            ("biz_content", biz),
            (
                "sign",
                "e9zEAe4TTQ4LPLQvETPoLGXTiURcxiAKfMVQ6Hrrsx2hmyIEGvSfAQzbLxHrhyZ48wOJXTsD4FPnt+YGdK57+fP1BCbf9rIVycfjhYCqlFhbTu9pFnZgT55W+xbAFb9y7vL0MyAxwXUXvZtQVqEwW7pURtKilbcBTEW7TAxzgro=",
            ),
            ("version", "1.0"),
        ]);
        let want = format!(
            "app_id=2014072300007148&biz_content={biz}&charset=GBK&method=alipay.mobile.public.menu.add&sign_type=RSA2&timestamp=2014-07-24 03:07:50&version=1.0"
        );
        assert_eq!(request_sign_content(&request), want);
    }

    #[test]
    fn empty_values_are_left_out() {
        let p = params(&[
            ("b", "2"),
            ("a", ""),
            ("c", "3"),
            ("sign", "x"),
            ("sign_type", "RSA2"),
        ]);
        assert_eq!(request_sign_content(&p), "b=2&c=3&sign_type=RSA2");
        assert_eq!(notify_sign_content(&p), "b=2&c=3");
    }

    /// A real `trade_status_sync` notification and the Alipay key that signed it, from the tests
    /// of Alipay's official Node SDK (alipay-sdk-nodejs-all `test/alipay.test.js`, "verify sign
    /// should delete sign_type"). It verifies over the string without `sign` and `sign_type`
    /// (rsaCheckV1) and not over the one that keeps `sign_type`.
    #[test]
    fn notify_sign_content_verifies_a_real_alipay_notification() {
        let key_der = crypto::base64_decode("MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAqObrdC7hrgAVM98tK0nv3hSQRGGKT4lBsQjHiGjeYZjOPIPHR5knm2jnnz/YGIXIofVHkA/tAlBAd5DrY7YpvI4tP5EONLtZKC2ghBMx7McI2wRD0xiqzxOQr1FuhZGJ8/AUokBzJrzY+aGX2xcOrxFYRlFilvVLTXg4LWjR1tdPkO6+i7wQZAIVMClPkwVRZEbaERRHlKqTzv2gGv5rDU8gRoe1LeaN+6BlbTqHWkQcNCUNrA8C6l17XAXGKDsm/9TFWwO8EPHHHCaQdjtV5/FdcWIt+L8SR1ss7EXTjYDFtxcKVv9rEoY1lX8T4mX+GbXfZHraG5NCF1+XioL5JwIDAQAB").unwrap();
        let key = VerifyingKey::<Sha256>::new(RsaPublicKey::from_public_key_der(&key_der).unwrap());
        let notify = params(&[
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
        ]);
        let sign = param(&notify, "sign").unwrap();
        assert!(crypto::verify(
            &key,
            notify_sign_content(&notify).as_bytes(),
            sign
        ));
        assert!(!crypto::verify(
            &key,
            request_sign_content(&notify).as_bytes(),
            sign
        ));
        // The amount an attacker would change.
        let mut forged = notify.clone();
        for (k, v) in &mut forged {
            if k == "total_amount" {
                *v = "100.00".to_owned();
            }
        }
        assert!(!crypto::verify(
            &key,
            notify_sign_content(&forged).as_bytes(),
            sign
        ));
    }

    /// A real sync response and the key that signed it, from alipay-sdk-nodejs-all
    /// (`test/alipay.test.js` checkResponseSign "normal", `test/fixtures/alipay-public-key.pem`):
    /// the signature covers the `…_response` value byte for byte, `\/` escapes included, and
    /// does not survive re-serialising the JSON.
    #[test]
    fn sync_responses_are_signed_over_raw_bytes() {
        let pem = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA6kdjvWNCT+K3qQQgAyv+
8k0+lkrL6+dA+cb9OAX5sZgIxP2ycK51VYxwZgZgHCIWCkB/l/Zqqhye/E6x/nNM
SqRkW3FGpP4/hKWByG3Ah8DXRcUaAvd8aCWHcBpgZqjBp3ADPTcHViI10cGe0mn1
3wGaIZQl6G74CtnY6YQJ/1NkoE+C9Z0VD4xor4oJOZW1/rbc85InBmjU87BWtxmk
IQWWVw+Vwd0EL8oDU9GWNZ1Se9sZf4UHxs+goHh3/JhQly3iKqlt/hgFsip78kvd
eDwoL8gS6RCUi+Bp6j9Ee5Thd+CC61Ilk7iKiUQMMVn6+kdTGcV2XwUBezH2Go4d
lwIDAQAB
-----END PUBLIC KEY-----";
        let key = VerifyingKey::<Sha256>::new(RsaPublicKey::from_public_key_pem(pem).unwrap());
        let raw = r#"{"alipay_offline_material_image_upload_response":{"code":"10000","msg":"Success","image_id":"akGwYYaFTai3r1uB0ww-1QAAACMAAQQD","image_url":"https:\/\/oalipay-dl-django.alicdn.com\/rest\/1.0\/image?fileIds=akGwYYaFTai3r1uB0ww-1QAAACMAAQQD&zoom=original"},"sign":"PAb3IueJzGe/pU/fRAPjwIs543Kc/A6D0rz03AMejwr8h8rDc6FhDJDnz3fGLDdQP7ctjtQwwJW3pmdZZcGmp4lb/5YYgtoK6McjnRr4ER/raJLYn1IbpzkowhGow2esA/XeDblIAYUbZjU6ts0IqNncrZrCknDWHpaZXwGuaU7CUBk74xBeMeja7rEEkFlm9MRtiQNYnum/cGVtcDv/aQ8KkPyAD58oJiAzoXv0R6jFhlZtAWv+M0SaOlhTpZh1K6wlP+1Umiqdvqbc1oWdfpv75a+lGTkGHMy8K7/bnAGm20IRsisSv1B5rpJyeGfrVf6tb4MZ7vG4w0rS0c2hfA=="}"#;
        let (value, sign) = split_signed(raw, "alipay_offline_material_image_upload_response");
        assert!(crypto::verify(&key, value.as_bytes(), &sign));
        let reserialised = serde_json::from_str::<Value>(value).unwrap().to_string();
        assert!(!crypto::verify(&key, reserialised.as_bytes(), &sign));
    }

    /// The merchant's side of a sync response, for the tests: the value's raw text and `sign`.
    fn split_signed<'a>(raw: &'a str, key: &str) -> (&'a str, String) {
        let prefix = format!("{{\"{key}\":");
        let rest = raw
            .strip_prefix(&prefix)
            .expect("the response key comes first");
        let end = rest.rfind(",\"sign\":").expect("sign is last");
        let sign = serde_json::from_str::<Value>(raw).unwrap()["sign"]
            .as_str()
            .unwrap()
            .to_owned();
        (&rest[..end], sign)
    }

    #[test]
    fn our_sync_responses_put_sign_last_over_the_raw_value() {
        let keys = test_keys();
        let body = signed_response(
            &keys.alipay,
            "alipay_trade_query_response",
            &[
                ("code", Value::from("10000")),
                ("msg", Value::from("Success")),
                ("subject", Value::from("a/b 中文")),
            ],
        );
        assert!(body.starts_with(r#"{"alipay_trade_query_response":{"code":"10000","msg":"Success","subject":"a\/b 中文"},"sign":""#), "{body}");
        let (value, sign) = split_signed(&body, "alipay_trade_query_response");
        let verifying = VerifyingKey::<Sha256>::new(keys.alipay.gateway.as_ref().to_public_key());
        assert!(crypto::verify(&verifying, value.as_bytes(), &sign));
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()["alipay_trade_query_response"]["subject"],
            "a/b 中文"
        );
    }

    fn paid_order() -> Order {
        let now = Utc::now();
        Order {
            channel: Channel::Alipay,
            out_trade_no: "ord_123".to_owned(),
            subject: "Pro plan & more".to_owned(),
            amount: 9900,
            notify_url: Some("http://127.0.0.1:1/notify".to_owned()),
            return_url: Some("http://127.0.0.1:1/return?x=1".to_owned()),
            kind: PAGE_PAY.to_owned(),
            product_code: "FAST_INSTANT_TRADE_PAY".to_owned(),
            trade_no: Some(new_trade_no(now)),
            code_pr: None,
            attach: None,
            status: Status::Paid,
            created_at: now,
            expires_at: None,
            paid_at: Some(now),
            closed_at: None,
            buyer: Some("2088000000000009".to_owned()),
            refunds: Vec::new(),
            notification: None,
            attempts: Vec::new(),
        }
    }

    #[test]
    fn notifications_verify_as_merchants_verify_them() {
        let keys = test_keys();
        let Notification::Alipay { form } = notification(&keys.alipay, &paid_order()) else {
            panic!("an Alipay notification");
        };
        let received: Params = form_urlencoded::parse(form.as_bytes())
            .into_owned()
            .collect();
        let get = |name: &str| param(&received, name).unwrap_or_default().to_owned();
        assert_eq!(get("total_amount"), "99.00");
        assert_eq!(get("trade_status"), "TRADE_SUCCESS");
        assert_eq!(get("subject"), "Pro plan & more");
        assert_eq!(get("app_id"), "2021000000000001");
        assert_eq!(get("seller_id"), "2088000000000001");
        assert_eq!(get("sign_type"), "RSA2");
        assert!(parse_alipay_time(&get("gmt_payment")).is_some());
        let verifying = VerifyingKey::<Sha256>::new(keys.alipay.gateway.as_ref().to_public_key());
        assert!(crypto::verify(
            &verifying,
            notify_sign_content(&received).as_bytes(),
            &get("sign")
        ));

        let url = return_redirect(&keys.alipay, &paid_order()).unwrap();
        let (base, query) = url.split_once("?x=1&").unwrap();
        assert_eq!(base, "http://127.0.0.1:1/return");
        let returned: Params = form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        assert_eq!(
            param(&returned, "method"),
            Some("alipay.trade.page.pay.return")
        );
        let sign = param(&returned, "sign").unwrap();
        assert!(crypto::verify(
            &verifying,
            notify_sign_content(&returned).as_bytes(),
            sign
        ));
    }

    #[test]
    fn acknowledgements() {
        assert!(acknowledged(200, "success"));
        assert!(acknowledged(200, "success\n"));
        assert!(!acknowledged(200, "SUCCESS"));
        assert!(!acknowledged(200, "fail"));
        assert!(!acknowledged(400, "success"));
    }

    #[test]
    fn timeout_express() {
        let now = Utc::now();
        assert_eq!(
            parse_timeout_express("90m", now),
            Some(now + Duration::minutes(90))
        );
        assert_eq!(
            parse_timeout_express("2h", now),
            Some(now + Duration::hours(2))
        );
        assert!(parse_timeout_express("1c", now).is_some());
        assert_eq!(parse_timeout_express("0m", now), None);
        assert_eq!(parse_timeout_express("m", now), None);
        assert_eq!(parse_timeout_express("", now), None);
    }

    #[test]
    fn out_trade_numbers() {
        assert!(valid_out_trade_no("ord_0123456789abcdef"));
        assert!(valid_out_trade_no(&"a".repeat(64)));
        assert!(!valid_out_trade_no(&"a".repeat(65)));
        assert!(!valid_out_trade_no("has-dash"));
        assert!(!valid_out_trade_no(""));
    }
}
