//! What the simulated gateways know: orders by `out_trade_no`, in memory (a restart forgets them,
//! like a fresh sandbox). One mutex, never held across an await.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Alipay,
    Wechat,
}

/// The buyer-side life of an order; each gateway maps it to its own vocabulary
/// (`WAIT_BUYER_PAY`/`TRADE_SUCCESS`/`TRADE_CLOSED`, `NOTPAY`/`SUCCESS`/`CLOSED`/`REFUND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Paid,
    Closed,
    /// Refunded in full (a partial refund leaves it `Paid`).
    Refunded,
}

#[derive(Debug, Clone, Serialize)]
pub struct Refund {
    /// Alipay `out_request_no` or WeChat `out_refund_no`.
    pub out_refund_no: String,
    pub refund_id: String,
    pub amount: i64,
    pub at: DateTime<Utc>,
}

/// The notification as first signed, kept so that a re-delivery is the same message.
#[derive(Debug, Clone)]
pub enum Notification {
    /// The form body, signed once: every delivery carries the same `notify_id` and `sign`.
    Alipay { form: String },
    /// The JSON body; its `Wechatpay-*` headers are signed afresh for each delivery, since a
    /// merchant refuses a timestamp more than five minutes old.
    Wechat { body: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The first delivery, right after the payment.
    Payment,
    /// A retry after an answer that was not an acknowledgement.
    Retry,
    /// `POST /sim/notify-again`.
    Again,
}

#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    pub at: DateTime<Utc>,
    pub trigger: Trigger,
    /// The HTTP status, when an answer came back at all.
    pub status: Option<u16>,
    /// The start of the answer's body.
    pub answer: Option<String>,
    /// Why no answer came back (connection refused, timeout, …).
    pub error: Option<String>,
    /// Whether the gateway counts this as acknowledged (Alipay: `success`; WeChat: any 2xx).
    pub acknowledged: bool,
}

#[derive(Debug, Clone)]
pub struct Order {
    pub channel: Channel,
    pub out_trade_no: String,
    /// Alipay `subject` or WeChat `description`.
    pub subject: String,
    /// In fen.
    pub amount: i64,
    pub notify_url: Option<String>,
    pub return_url: Option<String>,
    /// `alipay.trade.page.pay`, `alipay.trade.wap.pay` or `native`.
    pub kind: String,
    /// The Alipay `product_code` as sent; empty for WeChat.
    pub product_code: String,
    /// Alipay `trade_no` (given when the order is created) or WeChat `transaction_id` (given
    /// when it is paid).
    pub trade_no: Option<String>,
    /// The `pr` of a WeChat `code_url`.
    pub code_pr: Option<String>,
    pub attach: Option<String>,
    pub status: Status,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub paid_at: Option<DateTime<Utc>>,
    pub closed_at: Option<DateTime<Utc>>,
    /// Alipay `buyer_id` or WeChat `openid`, set when paid.
    pub buyer: Option<String>,
    pub refunds: Vec<Refund>,
    pub notification: Option<Notification>,
    pub attempts: Vec<Attempt>,
}

impl Order {
    pub fn refunded(&self) -> i64 {
        self.refunds.iter().map(|r| r.amount).sum()
    }

    /// A pending order past its expiry can no longer be paid: the gateways close it.
    fn expire(&mut self, now: DateTime<Utc>) {
        if self.status == Status::Pending
            && let Some(at) = self.expires_at
            && at <= now
        {
            self.status = Status::Closed;
            self.closed_at = Some(at);
        }
    }
}

/// What happened to an order a merchant asked to create.
pub enum Created {
    New(Order),
    /// The same out_trade_no with the same content: the gateway answers as the first time.
    Same(Order),
    /// The same out_trade_no with other content, or in the other channel.
    Conflict(Order),
}

#[derive(Default)]
pub struct Store {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    orders: HashMap<String, Order>,
    by_pr: HashMap<String, String>,
}

impl Store {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves plain data behind; keep serving it.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Inserts `order` unless its out_trade_no is taken; `same` decides whether an existing one
    /// is the same request repeated.
    pub fn create(&self, mut order: Order, same: impl FnOnce(&Order) -> bool) -> Created {
        let now = Utc::now();
        // An expiry already past closes the order at once.
        order.expire(now);
        let mut inner = self.lock();
        if let Some(existing) = inner.orders.get_mut(&order.out_trade_no) {
            existing.expire(now);
            let existing = existing.clone();
            return if existing.channel == order.channel && same(&existing) {
                Created::Same(existing)
            } else {
                Created::Conflict(existing)
            };
        }
        if let Some(pr) = &order.code_pr {
            inner.by_pr.insert(pr.clone(), order.out_trade_no.clone());
        }
        inner
            .orders
            .insert(order.out_trade_no.clone(), order.clone());
        Created::New(order)
    }

    pub fn get(&self, out_trade_no: &str) -> Option<Order> {
        self.update(out_trade_no, |order| order.clone())
    }

    /// Runs `f` on the order under the lock, after applying its expiry.
    pub fn update<R>(&self, out_trade_no: &str, f: impl FnOnce(&mut Order) -> R) -> Option<R> {
        let now = Utc::now();
        let mut inner = self.lock();
        let order = inner.orders.get_mut(out_trade_no)?;
        order.expire(now);
        Some(f(order))
    }

    /// The out_trade_no of the order whose WeChat `code_url` carries `pr`.
    pub fn by_pr(&self, pr: &str) -> Option<String> {
        self.lock().by_pr.get(pr).cloned()
    }

    /// The out_trade_no of the order with this Alipay trade_no or WeChat transaction_id.
    pub fn by_trade_no(&self, channel: Channel, trade_no: &str) -> Option<String> {
        self.find(|o| o.channel == channel && o.trade_no.as_deref() == Some(trade_no))
            .map(|o| o.out_trade_no)
    }

    /// The first order matching `predicate` (a scan: the simulator holds a handful of orders).
    pub fn find(&self, predicate: impl Fn(&Order) -> bool) -> Option<Order> {
        self.lock().orders.values().find(|o| predicate(o)).cloned()
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;

    fn order(no: &str, expires_at: Option<DateTime<Utc>>) -> Order {
        Order {
            channel: Channel::Wechat,
            out_trade_no: no.to_owned(),
            subject: "s".to_owned(),
            amount: 100,
            notify_url: None,
            return_url: None,
            kind: "native".to_owned(),
            product_code: String::new(),
            trade_no: None,
            code_pr: Some(format!("pr{no}")),
            attach: None,
            status: Status::Pending,
            created_at: Utc::now(),
            expires_at,
            paid_at: None,
            closed_at: None,
            buyer: None,
            refunds: Vec::new(),
            notification: None,
            attempts: Vec::new(),
        }
    }

    #[test]
    fn create_get_and_expire() {
        let store = Store::default();
        assert!(matches!(
            store.create(order("a", None), |_| true),
            Created::New(_)
        ));
        assert!(matches!(
            store.create(order("a", None), |_| true),
            Created::Same(_)
        ));
        assert!(matches!(
            store.create(order("a", None), |_| false),
            Created::Conflict(_)
        ));
        let mut alipay = order("a", None);
        alipay.channel = Channel::Alipay;
        assert!(
            matches!(store.create(alipay, |_| true), Created::Conflict(_)),
            "the other channel"
        );
        assert_eq!(store.by_pr("pra").as_deref(), Some("a"));

        let past = Utc::now() - Duration::seconds(1);
        match store.create(order("b", Some(past)), |_| true) {
            Created::New(o) => assert_eq!(o.status, Status::Closed),
            _ => panic!("new"),
        }
        store.create(
            order("c", Some(Utc::now() + Duration::milliseconds(50))),
            |_| true,
        );
        assert_eq!(store.get("c").map(|o| o.status), Some(Status::Pending));
        std::thread::sleep(std::time::Duration::from_millis(60));
        let closed = store.get("c").unwrap();
        assert_eq!(closed.status, Status::Closed);
        assert_eq!(closed.closed_at, closed.expires_at);
        assert!(store.get("nope").is_none());
    }
}
