//! Orders, the gateways' notifications, the QR code of a WeChat order, refunds and the checkout
//! page.

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::AppState;
use super::cursor;
use super::dto::Page;
use super::error::AppError;
use super::extract::{Json, Query};
use super::idempotency::Idempotent;
use crate::auth::AuthUser;
use crate::db::orders::OrderRow;
use crate::db::{self, DbError};
use crate::payments::PayError;
use crate::payments::service::ServiceError;
use crate::payments::wechat::SignedHeaders;

#[derive(Serialize)]
pub struct OrderDto {
    id: String,
    status: String,
    plan_id: String,
    channel: String,
    amount: serde_json::Value,
    created_at: chrono::DateTime<chrono::Utc>,
    paid_at: Option<chrono::DateTime<chrono::Utc>>,
    expires_at: chrono::DateTime<chrono::Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pay_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    qr_svg_url: Option<String>,
}

impl From<OrderRow> for OrderDto {
    fn from(o: OrderRow) -> OrderDto {
        let qr_svg_url = o
            .code_url
            .as_ref()
            .map(|_| format!("/v1/orders/{}/qr.svg", o.id));
        OrderDto {
            amount: json!({"amount": o.amount, "currency": o.currency}),
            id: o.id,
            status: o.status,
            plan_id: o.plan_id,
            channel: o.channel,
            created_at: o.created_at,
            paid_at: o.paid_at,
            expires_at: o.expires_at,
            pay_url: o.pay_url,
            code_url: o.code_url,
            qr_svg_url,
        }
    }
}

impl From<ServiceError> for AppError {
    fn from(e: ServiceError) -> AppError {
        match e {
            ServiceError::Db(e) => e.into(),
            ServiceError::NotFound(what) => AppError::not_found(what),
            ServiceError::Invalid(why) => AppError::invalid(why),
            ServiceError::Gateway(e) => ServiceError::Pay(e).into(),
            ServiceError::Pay(
                e @ (PayError::Unreachable(_)
                | PayError::Refused(_)
                | PayError::BadSignature
                | PayError::Invalid(_)),
            ) => {
                let mut err = AppError::new(
                    StatusCode::BAD_GATEWAY,
                    "payment_gateway_error",
                    "the payment gateway could not take the order; try again shortly",
                );
                err.internal = Some(e.to_string());
                err
            }
            ServiceError::Pay(e) => AppError::internal(e),
        }
    }
}

#[derive(Deserialize)]
pub struct CreateOrder {
    plan_id: String,
    channel: String,
}

pub async fn create(
    State(state): State<AppState>,
    auth: AuthUser,
    request: Idempotent<CreateOrder>,
) -> Result<Response, AppError> {
    let body = &request.body;
    if body.plan_id.is_empty() || body.plan_id.len() > 63 {
        return Err(AppError::not_found("no such plan for sale"));
    }
    let mut client = state.db.get().await.map_err(DbError::from)?;
    let tx = client
        .transaction()
        .await
        .map_err(DbError::op("begin order"))?;
    if let Some(replay) = request.begin(&tx, auth.id).await? {
        return Ok(replay);
    }
    let order = match state
        .payments
        .create_order(&tx, auth.id, &body.plan_id, &body.channel)
        .await
    {
        Ok(order) => order,
        Err(e) => {
            if e.keeps_writes() {
                // The order stays (closed), the key does not: a retry orders afresh.
                request.release(&tx, auth.id).await?;
                tx.commit().await.map_err(DbError::op("commit order"))?;
            }
            return Err(e.into());
        }
    };
    let response = request
        .finish(
            &tx,
            auth.id,
            StatusCode::CREATED,
            Some(&OrderDto::from(order)),
        )
        .await?;
    tx.commit().await.map_err(DbError::op("commit order"))?;
    state
        .payments
        .metrics
        .orders
        .with_label_values(&["pending"])
        .inc();
    Ok(response)
}

#[derive(Deserialize)]
pub struct ListParams {
    limit: Option<i64>,
    cursor: Option<String>,
}

/// `GET /v1/orders`: the caller's orders, newest first.
pub async fn list(
    State(state): State<AppState>,
    auth: AuthUser,
    Query(params): Query<ListParams>,
) -> Result<Json<Page<OrderDto>>, AppError> {
    let limit = cursor::limit(params.limit)?;
    let before = params
        .cursor
        .as_deref()
        .map(cursor::decode::<String>)
        .transpose()?;
    let client = state.db.get().await.map_err(DbError::from)?;
    let mut rows = db::orders::list_for_user(&**client, auth.id, before, limit + 1).await?;
    let next_cursor = if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(|o| cursor::encode(o.created_at, &o.id))
    } else {
        None
    };
    Ok(Json(Page {
        items: rows.into_iter().map(OrderDto::from).collect(),
        next_cursor,
    }))
}

async fn own_order(state: &AppState, auth: &AuthUser, id: &str) -> Result<OrderRow, AppError> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(AppError::not_found("no such order"));
    }
    let client = state.db.get().await.map_err(DbError::from)?;
    db::orders::get(&**client, id)
        .await?
        .filter(|o| o.user_id == auth.id)
        .ok_or_else(|| AppError::not_found("no such order"))
}

pub async fn get(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
) -> Result<Json<OrderDto>, AppError> {
    Ok(Json(own_order(&state, &auth, &id).await?.into()))
}

fn qr_of(order: &OrderRow) -> Result<qrcode::QrCode, AppError> {
    let code_url = order
        .code_url
        .as_deref()
        .ok_or_else(|| AppError::not_found("this order has no QR code (not a WeChat order)"))?;
    qrcode::QrCode::new(code_url.as_bytes()).map_err(AppError::internal)
}

pub async fn qr_svg(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    let order = own_order(&state, &auth, &id).await?;
    let svg = qr_of(&order)?
        .render::<qrcode::render::svg::Color<'_>>()
        .min_dimensions(240, 240)
        .quiet_zone(true)
        .build();
    Ok(([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response())
}

pub async fn qr_png(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    let order = own_order(&state, &auth, &id).await?;
    let code = qr_of(&order)?;
    let (width, colors) = (code.width(), code.to_colors());
    const SCALE: usize = 8;
    const QUIET: usize = 4;
    let side = (width + 2 * QUIET) * SCALE;
    let mut pixels = vec![255u8; side * side];
    for (i, color) in colors.iter().enumerate() {
        if *color == qrcode::Color::Dark {
            let (x, y) = (i % width + QUIET, i / width + QUIET);
            for dy in 0..SCALE {
                let row = (y * SCALE + dy) * side;
                pixels[row + x * SCALE..row + (x + 1) * SCALE].fill(0);
            }
        }
    }
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, side as u32, side as u32);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(AppError::internal)?;
        writer
            .write_image_data(&pixels)
            .map_err(AppError::internal)?;
    }
    Ok(([(header::CONTENT_TYPE, "image/png")], out).into_response())
}

/// The headers kept with a notification; each value at most `max` characters.
fn header_json(headers: &HeaderMap, max: usize) -> serde_json::Value {
    let keep = [
        "content-type",
        "user-agent",
        "wechatpay-timestamp",
        "wechatpay-nonce",
        "wechatpay-signature",
        "wechatpay-serial",
        "request-id",
    ];
    serde_json::Value::Object(
        keep.iter()
            .filter_map(|k| {
                headers.get(*k).and_then(|v| v.to_str().ok()).map(|v| {
                    (
                        (*k).to_owned(),
                        json!(v.chars().take(max).collect::<String>()),
                    )
                })
            })
            .collect(),
    )
}

/// How much of a rejected delivery's body is kept.
const REJECTED_PREFIX: usize = 256;

/// A notification's body as far as it was read.
enum Delivery {
    Whole(Bytes),
    /// Over the limit: the first bytes, and the size it declared, if any.
    TooLarge {
        prefix: Bytes,
        declared: Option<i64>,
    },
    /// The connection failed while reading.
    Broken,
}

/// Reads at most `limit` bytes of the body; never buffers more than that.
async fn read_body(request: Request, limit: usize) -> (HeaderMap, Delivery) {
    use http_body_util::BodyExt;
    let (parts, mut body) = request.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok());
    if declared.is_some_and(|n| n > limit as i64) {
        return (
            parts.headers,
            Delivery::TooLarge {
                prefix: Bytes::new(),
                declared,
            },
        );
    }
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return (parts.headers, Delivery::Broken);
        };
        if let Some(data) = frame.data_ref() {
            if buf.len() + data.len() > limit {
                buf.extend_from_slice(&data[..(limit - buf.len()).min(data.len())]);
                buf.truncate(REJECTED_PREFIX);
                return (
                    parts.headers,
                    Delivery::TooLarge {
                        prefix: buf.into(),
                        declared,
                    },
                );
            }
            buf.extend_from_slice(data);
        }
    }
    (parts.headers, Delivery::Whole(buf.into()))
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

/// A delivery that did not verify (or could not be read): counted, logged, and — within this
/// minute's budget — recorded as size, digest, reason and the first 256 bytes, never whole.
async fn reject_unverified(
    state: &AppState,
    channel: &str,
    headers: &HeaderMap,
    body: &[u8],
    whole: bool,
    declared: Option<i64>,
    why: &str,
) {
    state
        .metrics
        .payment_notifications
        .with_label_values(&[channel, "rejected"])
        .inc();
    if !state.payments.rejections.take(channel) {
        tracing::debug!(
            channel,
            why,
            "payment notification rejected (not recorded: budget spent)"
        );
        return;
    }
    tracing::warn!(channel, why, "payment notification rejected");
    let digest = whole.then(|| sha256_hex(body));
    let size = if whole {
        Some(body.len() as i64)
    } else {
        declared
    };
    let reason: String = why.chars().take(200).collect();
    if let Ok(client) = state.db.get().await {
        let _ = db::orders::record_rejected(
            &**client,
            &db::orders::Rejected {
                channel,
                headers: &header_json(headers, 128),
                prefix: &body[..body.len().min(REJECTED_PREFIX)],
                size,
                sha256_hex: digest.as_deref(),
                reason: &reason,
            },
        )
        .await;
    }
}

/// A verified notification refused for what it says (unknown order, other amount): its stored
/// row is marked rejected.
async fn reject(
    state: &AppState,
    channel: &str,
    id: i64,
    out_trade_no: Option<&str>,
    event: Option<&str>,
    why: &str,
) {
    state
        .metrics
        .payment_notifications
        .with_label_values(&[channel, "rejected"])
        .inc();
    tracing::warn!(channel, out_trade_no, why, "payment notification rejected");
    if let Ok(client) = state.db.get().await {
        let _ = db::orders::finish_notification(
            &**client,
            id,
            true,
            out_trade_no,
            event,
            "rejected",
            Some(why),
        )
        .await;
    }
}

/// Stores a verified notification whole; `None` when the database is unavailable.
async fn store_verified(
    state: &AppState,
    channel: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Option<i64> {
    let client = state.db.get().await.ok()?;
    db::orders::record_notification(
        &**client,
        channel,
        &header_json(headers, 1024),
        body,
        &sha256_hex(body),
    )
    .await
    .ok()
}

/// Reads a delivery within the notification body limit; an oversized or broken one is recorded
/// as a rejection and `Err` carries the reason.
async fn read_delivery(
    state: &AppState,
    channel: &str,
    request: Request,
) -> Result<(HeaderMap, Bytes), (HeaderMap, String)> {
    let limit = state.payments.notify_body_limit;
    match read_body(request, limit).await {
        (headers, Delivery::Whole(body)) => Ok((headers, body)),
        (headers, Delivery::TooLarge { prefix, declared }) => {
            let why = format!("body over {limit} bytes");
            reject_unverified(state, channel, &headers, &prefix, false, declared, &why).await;
            Err((headers, why))
        }
        (headers, Delivery::Broken) => Err((headers, "the body could not be read".to_owned())),
    }
}

/// Alipay's asynchronous notification: `success` once handled (also for a duplicate), `failure`
/// with 400 for anything that does not verify or does not match the order; nothing changes then.
/// The signature is checked before anything is stored.
pub async fn alipay_notify(State(state): State<AppState>, request: Request) -> Response {
    let failure = |status: StatusCode| (status, "failure").into_response();
    let Some(alipay) = state.payments.alipay.clone() else {
        return failure(StatusCode::NOT_FOUND);
    };
    let (headers, body) = match read_delivery(&state, "alipay", request).await {
        Ok(delivery) => delivery,
        Err(_) => return failure(StatusCode::PAYLOAD_TOO_LARGE),
    };
    let notify = match alipay.verify_notify(&body) {
        Ok(n) => n,
        Err(e) => {
            let why = e.to_string();
            reject_unverified(&state, "alipay", &headers, &body, true, None, &why).await;
            return failure(StatusCode::BAD_REQUEST);
        }
    };
    let Some(id) = store_verified(&state, "alipay", &headers, &body).await else {
        return failure(StatusCode::SERVICE_UNAVAILABLE);
    };
    if !notify.is_paid() {
        if let Ok(client) = state.db.get().await {
            let _ = db::orders::finish_notification(
                &**client,
                id,
                true,
                Some(&notify.out_trade_no),
                Some(&notify.trade_status),
                "ignored",
                None,
            )
            .await;
        }
        return "success".into_response();
    }
    match state
        .payments
        .settle_paid(
            "alipay",
            &notify.out_trade_no,
            &notify.trade_status,
            &notify.trade_no,
            notify.total_fen,
            Some(id),
        )
        .await
    {
        Ok(settled) => {
            let result = if settled == crate::payments::service::Settled::Processed {
                "processed"
            } else {
                "duplicate"
            };
            state
                .metrics
                .payment_notifications
                .with_label_values(&["alipay", result])
                .inc();
            "success".into_response()
        }
        Err(ServiceError::Db(e)) => {
            tracing::error!(error = %e, "payment notification not recorded; the gateway will retry");
            failure(StatusCode::SERVICE_UNAVAILABLE)
        }
        Err(e) => {
            reject(
                &state,
                "alipay",
                id,
                Some(&notify.out_trade_no),
                Some(&notify.trade_status),
                &e.to_string(),
            )
            .await;
            failure(StatusCode::BAD_REQUEST)
        }
    }
}

fn wechat_fail(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"code": "FAIL", "message": message})),
    )
        .into_response()
}

/// WeChat Pay's notification: `204` once handled (also for a duplicate); `401` for a bad
/// signature, `400` for a stale timestamp, a resource that does not decrypt or a mismatch. The
/// signature is checked before anything is stored.
pub async fn wechat_notify(State(state): State<AppState>, request: Request) -> Response {
    let Some(wechat) = state.payments.wechat.clone() else {
        return wechat_fail(StatusCode::NOT_FOUND, "wechat pay is not configured");
    };
    let (headers, body) = match read_delivery(&state, "wechat", request).await {
        Ok(delivery) => delivery,
        Err((_, why)) => return wechat_fail(StatusCode::PAYLOAD_TOO_LARGE, &why),
    };
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let signed = SignedHeaders {
        timestamp: h("wechatpay-timestamp"),
        nonce: h("wechatpay-nonce"),
        signature: h("wechatpay-signature"),
        serial: h("wechatpay-serial"),
    };
    let (event, transaction) =
        match wechat.verify_notification(&signed, &body, chrono::Utc::now().timestamp()) {
            Ok(v) => v,
            Err(e) => {
                let why = e.to_string();
                reject_unverified(&state, "wechat", &headers, &body, true, None, &why).await;
                let status = if matches!(e, PayError::BadSignature) {
                    StatusCode::UNAUTHORIZED
                } else {
                    StatusCode::BAD_REQUEST
                };
                return wechat_fail(status, &why);
            }
        };
    let Some(id) = store_verified(&state, "wechat", &headers, &body).await else {
        return wechat_fail(StatusCode::SERVICE_UNAVAILABLE, "try again");
    };
    if transaction.trade_state != "SUCCESS" {
        if let Ok(client) = state.db.get().await {
            let _ = db::orders::finish_notification(
                &**client,
                id,
                true,
                Some(&transaction.out_trade_no),
                Some(&event),
                "ignored",
                None,
            )
            .await;
        }
        return StatusCode::NO_CONTENT.into_response();
    }
    let total = transaction.amount.as_ref().map_or(-1, |a| a.total);
    match state
        .payments
        .settle_paid(
            "wechat",
            &transaction.out_trade_no,
            &event,
            transaction.transaction_id.as_deref().unwrap_or_default(),
            total,
            Some(id),
        )
        .await
    {
        Ok(settled) => {
            let result = if settled == crate::payments::service::Settled::Processed {
                "processed"
            } else {
                "duplicate"
            };
            state
                .metrics
                .payment_notifications
                .with_label_values(&["wechat", result])
                .inc();
            StatusCode::NO_CONTENT.into_response()
        }
        Err(ServiceError::Db(e)) => {
            tracing::error!(error = %e, "payment notification not recorded; the gateway will retry");
            wechat_fail(StatusCode::SERVICE_UNAVAILABLE, "try again")
        }
        Err(e) => {
            reject(
                &state,
                "wechat",
                id,
                Some(&transaction.out_trade_no),
                Some(&event),
                &e.to_string(),
            )
            .await;
            wechat_fail(StatusCode::BAD_REQUEST, &e.to_string())
        }
    }
}

pub async fn admin_refund(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
) -> Result<Json<OrderDto>, AppError> {
    auth.require_admin()?;
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(AppError::not_found("no such order"));
    }
    Ok(Json(state.payments.refund(&id, auth.id).await?.into()))
}

pub async fn checkout() -> Html<&'static str> {
    Html(include_str!("../../static/checkout.html"))
}
