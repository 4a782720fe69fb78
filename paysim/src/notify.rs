//! Delivering notifications to the merchant's `notify_url`, and retrying until it acknowledges.
//! Every delivery is recorded on the order, so `/sim/orders/{no}` shows what the merchant said.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use crate::AppState;
use crate::alipay;
use crate::store::{Attempt, Channel, Notification, Trigger};
use crate::wechat;

/// The waits before each retry. The real gateways stretch theirs over a day (Alipay: 4m, 10m,
/// 10m, 1h, 2h, 6h, 15h); a development tool wants the same shape in seconds.
pub const RETRY_DELAYS: [Duration; 5] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(5),
    Duration::from_secs(10),
];

/// The most of an answer kept on the order.
const ANSWER_LIMIT: usize = 512;

/// Delivers the order's notification in the background: once now, then after each of
/// [`RETRY_DELAYS`] until acknowledged.
pub fn spawn_delivery(state: Arc<AppState>, out_trade_no: String) {
    tokio::spawn(async move {
        let mut trigger = Trigger::Payment;
        let mut delays = RETRY_DELAYS.iter();
        loop {
            if deliver(&state, &out_trade_no, trigger).await.acknowledged {
                return;
            }
            let Some(delay) = delays.next() else {
                tracing::warn!(
                    out_trade_no,
                    "the merchant never acknowledged the notification; giving up"
                );
                return;
            };
            tokio::time::sleep(*delay).await;
            trigger = Trigger::Retry;
        }
    });
}

/// One delivery of the order's notification, recorded on the order.
pub async fn deliver(state: &AppState, out_trade_no: &str, trigger: Trigger) -> Attempt {
    let found = state
        .store
        .get(out_trade_no)
        .and_then(|o| Some((o.channel, o.notify_url?, o.notification?)));
    let Some((channel, url, notification)) = found else {
        return Attempt {
            at: Utc::now(),
            trigger,
            status: None,
            answer: None,
            error: Some("the order has no notification or no notify_url".to_owned()),
            acknowledged: false,
        };
    };
    let request = match notification {
        Notification::Alipay { form } => state
            .http
            .post(&url)
            .header(
                "Content-Type",
                "application/x-www-form-urlencoded; charset=utf-8",
            )
            .body(form),
        Notification::Wechat { body } => {
            let mut request = state
                .http
                .post(&url)
                .header("Content-Type", "application/json");
            for (name, value) in wechat::signed_headers(&state.config.keys.wechat, body.as_bytes())
            {
                request = request.header(name, value);
            }
            request.body(body)
        }
    };
    let at = Utc::now();
    let attempt = match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let answer = response.text().await.unwrap_or_default();
            let acknowledged = match channel {
                Channel::Alipay => alipay::acknowledged(status, &answer),
                Channel::Wechat => wechat::acknowledged(status),
            };
            Attempt {
                at,
                trigger,
                status: Some(status),
                answer: Some(answer.chars().take(ANSWER_LIMIT).collect()),
                error: None,
                acknowledged,
            }
        }
        Err(e) => Attempt {
            at,
            trigger,
            status: None,
            answer: None,
            error: Some(error_chain(&e)),
            acknowledged: false,
        },
    };
    tracing::info!(
        out_trade_no,
        url,
        ?trigger,
        status = attempt.status,
        acknowledged = attempt.acknowledged,
        error = attempt.error.as_deref(),
        "notification delivered"
    );
    state
        .store
        .update(out_trade_no, |o| o.attempts.push(attempt.clone()));
    attempt
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
