//! A gateway's notification, handled once for every channel: verified over the raw bytes, stored
//! whole once verified, then settled against its order exactly once. Only verifying (each
//! channel's format, `Payments::verify_notification`) and the answer (each gateway's protocol,
//! `http::payments`) differ by channel.

use axum::body::Bytes;
use axum::http::HeaderMap;
use serde_json::json;

use super::AppState;
use crate::db;
use crate::domain::payments::{Channel, NotificationResult};
use crate::payments::service::ServiceError;
use crate::payments::{PayError, Payment};

/// How much of a rejected delivery's body is kept.
pub const REJECTED_PREFIX: usize = 256;

/// A notification's body as far as it was read.
pub enum Delivery {
    Whole(Bytes),
    /// Over the limit: the first bytes, and the size it declared, if any.
    TooLarge {
        prefix: Bytes,
        declared: Option<i64>,
    },
    /// The connection failed while reading.
    Broken,
}

/// What became of a notification, for the gateway's answer.
#[derive(Debug)]
pub enum Notified {
    /// Processed, a duplicate, or verified and not a payment: the gateway may stop sending it.
    Handled,
    /// This replica does not take payments through the channel.
    NotConfigured,
    /// Too large, or the body could not be read.
    Unreadable(String),
    /// It did not verify.
    Unverified(PayError),
    /// The database is unavailable: the gateway should send it again.
    Unavailable,
    /// Verified, but it does not match its order (unknown order, other amount or channel).
    Refused(String),
}

/// Handles one delivery of `channel`: `delivery` reads its body within the body limit, and is
/// not awaited at all when this replica does not take the channel.
pub async fn notify(
    state: &AppState,
    channel: Channel,
    headers: &HeaderMap,
    delivery: impl Future<Output = Delivery>,
) -> Notified {
    let payments = &state.payments;
    if !payments.accepts(channel) {
        return Notified::NotConfigured;
    }
    let body = match delivery.await {
        Delivery::Whole(body) => body,
        Delivery::TooLarge { prefix, declared } => {
            let why = format!("body over {} bytes", payments.notify_body_limit);
            let unread = Unverified {
                body: &prefix,
                whole: false,
                declared,
            };
            reject_unverified(state, channel, headers, unread, &why).await;
            return Notified::Unreadable(why);
        }
        Delivery::Broken => return Notified::Unreadable("the body could not be read".to_owned()),
    };
    let payment = match payments.verify_notification(channel, headers, &body) {
        Ok(payment) => payment,
        Err(e) => {
            let read = Unverified {
                body: &body,
                whole: true,
                declared: None,
            };
            reject_unverified(state, channel, headers, read, &e.to_string()).await;
            return Notified::Unverified(e);
        }
    };
    let Some(id) = store_verified(state, channel, headers, &body).await else {
        return Notified::Unavailable;
    };
    if !payment.paid {
        finish(state, id, &payment, NotificationResult::Ignored, None).await;
        return Notified::Handled;
    }
    match payments.settle_paid(channel, &payment, Some(id)).await {
        Ok(settled) => {
            count(state, channel, settled.result());
            Notified::Handled
        }
        Err(ServiceError::Db(e)) => {
            tracing::error!(error = %e, "payment notification not recorded; the gateway will retry");
            Notified::Unavailable
        }
        Err(e) => {
            let why = e.to_string();
            count(state, channel, NotificationResult::Rejected);
            tracing::warn!(%channel, out_trade_no = %payment.out_trade_no, why, "payment notification rejected");
            finish(
                state,
                id,
                &payment,
                NotificationResult::Rejected,
                Some(&why),
            )
            .await;
            Notified::Refused(why)
        }
    }
}

fn count(state: &AppState, channel: Channel, result: NotificationResult) {
    state
        .metrics
        .payment_notifications
        .with_label_values(&[channel.as_str(), result.as_str()])
        .inc();
}

/// Marks a stored notification with what became of it (best effort: it is stored already).
async fn finish(
    state: &AppState,
    id: i64,
    payment: &Payment,
    result: NotificationResult,
    why: Option<&str>,
) {
    if let Ok(client) = state.db.get().await {
        let _ = db::orders::finish_notification(
            &**client,
            id,
            true,
            Some(&payment.out_trade_no),
            Some(&payment.event),
            result,
            why,
        )
        .await;
    }
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

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

/// What was read of a delivery that is not stored whole.
struct Unverified<'a> {
    body: &'a [u8],
    /// Whether `body` is all of it.
    whole: bool,
    /// The size it declared, for one refused unread.
    declared: Option<i64>,
}

/// A delivery that did not verify (or could not be read): counted, logged, and — within this
/// minute's budget — recorded as size, digest, reason and the first 256 bytes, never whole.
async fn reject_unverified(
    state: &AppState,
    channel: Channel,
    headers: &HeaderMap,
    read: Unverified<'_>,
    why: &str,
) {
    count(state, channel, NotificationResult::Rejected);
    if !state.payments.rejections.take(channel) {
        tracing::debug!(
            %channel,
            why,
            "payment notification rejected (not recorded: budget spent)"
        );
        return;
    }
    tracing::warn!(%channel, why, "payment notification rejected");
    let body = read.body;
    let digest = read.whole.then(|| sha256_hex(body));
    let size = if read.whole {
        Some(body.len() as i64)
    } else {
        read.declared
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

/// Stores a verified notification whole; `None` when the database is unavailable.
async fn store_verified(
    state: &AppState,
    channel: Channel,
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
