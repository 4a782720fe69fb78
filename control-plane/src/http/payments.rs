//! Orders, the gateways' notifications, the QR code of a WeChat order, refunds and the checkout
//! page.

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::AppState;
use super::cursor;
use super::dto::Page;
use super::error::AppError;
use super::extract::{Json, Query};
use super::idempotency::Idempotent;
use crate::app::payments::{Delivery, Notified, REJECTED_PREFIX};
use crate::app::{self, orders::NewOrder};
use crate::auth::AuthUser;
use crate::db::orders::OrderRow;
use crate::domain::payments::{Channel, OrderStatus, PayMethod};
use crate::payments::PayError;

#[derive(Serialize)]
pub struct OrderDto {
    id: String,
    status: OrderStatus,
    plan_id: String,
    channel: PayMethod,
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

pub async fn create(
    State(state): State<AppState>,
    auth: AuthUser,
    request: Idempotent<NewOrder>,
) -> Result<Response, AppError> {
    let order = request.body.check()?;
    request
        .run(&state, auth.id, StatusCode::CREATED, async |tx, _| {
            order.place(&state, tx, auth.id).await.map(OrderDto::from)
        })
        .await
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
    let before = cursor::decode_opt::<String>(params.cursor.as_deref())?;
    let rows = app::orders::list(&state, auth.id, before, limit + 1).await?;
    let page = cursor::page(rows, limit, |o| cursor::encode(o.created_at, &o.id));
    Ok(Json(page.map(OrderDto::from)))
}

pub async fn get(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
) -> Result<Json<OrderDto>, AppError> {
    Ok(Json(app::orders::own(&state, auth.id, &id).await?.into()))
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
    let order = app::orders::own(&state, auth.id, &id).await?;
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
    let order = app::orders::own(&state, auth.id, &id).await?;
    let png = png_of(&qr_of(&order)?)?;
    Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response())
}

/// A QR code as a greyscale PNG: 8 pixels a module, with the 4-module quiet zone.
fn png_of(code: &qrcode::QrCode) -> Result<Vec<u8>, AppError> {
    const SCALE: usize = 8;
    const QUIET: usize = 4;
    let (width, colors) = (code.width(), code.to_colors());
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
    let mut encoder = png::Encoder::new(&mut out, side as u32, side as u32);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(AppError::internal)?;
    writer
        .write_image_data(&pixels)
        .map_err(AppError::internal)?;
    writer.finish().map_err(AppError::internal)?;
    Ok(out)
}

/// Reads at most `limit` bytes of a body that declared `declared` bytes; never buffers more.
async fn read_body(body: Body, declared: Option<i64>, limit: usize) -> Delivery {
    use http_body_util::BodyExt;
    if declared.is_some_and(|n| n > limit as i64) {
        return Delivery::TooLarge {
            prefix: Default::default(),
            declared,
        };
    }
    let mut body = body;
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Delivery::Broken;
        };
        if let Some(data) = frame.data_ref() {
            if buf.len() + data.len() > limit {
                buf.extend_from_slice(&data[..(limit - buf.len()).min(data.len())]);
                buf.truncate(REJECTED_PREFIX);
                return Delivery::TooLarge {
                    prefix: buf.into(),
                    declared,
                };
            }
            buf.extend_from_slice(data);
        }
    }
    Delivery::Whole(buf.into())
}

/// Alipay's asynchronous notification (form, RSA2): `success` once handled (also for a
/// duplicate), `failure` for anything that does not verify or does not match the order.
pub async fn alipay_notify(State(state): State<AppState>, request: Request) -> Response {
    notify(&state, Channel::Alipay, request).await
}

/// WeChat Pay's notification (signed, AES-256-GCM resource): `204` once handled (also for a
/// duplicate); `401` for a bad signature, `400` for a stale timestamp, a resource that does not
/// decrypt or a mismatch.
pub async fn wechat_notify(State(state): State<AppState>, request: Request) -> Response {
    notify(&state, Channel::Wechat, request).await
}

/// One flow for every channel (`app::payments::notify`); nothing changes unless it verifies.
async fn notify(state: &AppState, channel: Channel, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok());
    let delivery = read_body(body, declared, state.payments.notify_body_limit);
    let notified = app::payments::notify(state, channel, &parts.headers, delivery).await;
    gateway_answer(channel, notified)
}

/// The answer a gateway's protocol asks for: the one place besides `AppError` that turns a
/// failure into a response, because gateways do not read the contract's error body. Alipay
/// wants the text `success` or `failure`; WeChat Pay `204`, or `{"code": "FAIL", "message"}`.
fn gateway_answer(channel: Channel, notified: Notified) -> Response {
    let (status, message) = match notified {
        Notified::Handled if channel == Channel::Alipay => return "success".into_response(),
        Notified::Handled => return StatusCode::NO_CONTENT.into_response(),
        Notified::NotConfigured => (
            StatusCode::NOT_FOUND,
            format!("{} pay is not configured", channel),
        ),
        Notified::Unreadable(why) => (StatusCode::PAYLOAD_TOO_LARGE, why),
        Notified::Unverified(e @ PayError::BadSignature) if channel == Channel::Wechat => {
            (StatusCode::UNAUTHORIZED, e.to_string())
        }
        Notified::Unverified(e) => (StatusCode::BAD_REQUEST, e.to_string()),
        Notified::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "try again".to_owned()),
        Notified::Refused(why) => (StatusCode::BAD_REQUEST, why),
    };
    match channel {
        Channel::Alipay => (status, "failure").into_response(),
        Channel::Wechat => (
            status,
            axum::Json(json!({"code": "FAIL", "message": message})),
        )
            .into_response(),
    }
}

pub async fn admin_refund(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
) -> Result<Json<OrderDto>, AppError> {
    Ok(Json(
        app::orders::refund(&state, auth.id, &id).await?.into(),
    ))
}

pub async fn checkout() -> Html<&'static str> {
    Html(include_str!("../../static/checkout.html"))
}
