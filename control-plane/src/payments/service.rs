//! Orders and what payments do to them: create (priced on the server), settle a verified payment
//! exactly once (the order's row lock plus the unique processed-notification key), reconcile
//! pending orders with the gateway, close expired ones, refund.

use std::sync::Arc;

use chrono::Utc;
use uuid::Uuid;

use deadpool_postgres::Pool;

use super::alipay::{Alipay, AlipayConfig};
use super::wechat::{SignedHeaders, Wechat, WechatConfig};
use super::{Channel, PayError, Payment, RsaSigner, RsaVerifier};
use crate::app::{Change, Failure, Reach, Tx};
use crate::config::Config;
use crate::db::orders::OrderRow;
use crate::db::{self, DbError};
use crate::domain::payments::{NotificationResult, OrderStatus, PayMethod};
use crate::metrics::Metrics;
use crate::sync::Syncer;

#[derive(Clone)]
pub struct Payments {
    pub alipay: Option<Arc<Alipay>>,
    pub wechat: Option<Arc<Wechat>>,
    db: Pool,
    sync: Syncer,
    pub metrics: Arc<Metrics>,
    pub order_ttl: chrono::Duration,
    /// Orders pending this long are asked about at the gateway.
    pub reconcile_after: chrono::Duration,
    /// Largest notification body read, in bytes.
    pub notify_body_limit: usize,
    /// How many rejected notifications are recorded per minute (the rest are only counted).
    pub rejections: Arc<RejectionBudget>,
}

/// Rejected (unverified) notifications recorded per minute and channel in this process; past
/// the budget they are only counted in the metrics and logged at debug level.
pub struct RejectionBudget {
    per_minute: u32,
    /// (the minute, recorded so far per channel, in `Channel::ALL` order)
    used: std::sync::Mutex<(i64, [u32; Channel::ALL.len()])>,
}

impl RejectionBudget {
    pub fn new(per_minute: u32) -> RejectionBudget {
        RejectionBudget {
            per_minute,
            used: std::sync::Mutex::new((0, [0; Channel::ALL.len()])),
        }
    }

    /// Takes one from this minute's budget of `channel`; false when it is spent.
    pub fn take(&self, channel: Channel) -> bool {
        let minute = Utc::now().timestamp() / 60;
        let slot = channel as usize;
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        if used.0 != minute {
            *used = (minute, [0; Channel::ALL.len()]);
        }
        if used.1[slot] >= self.per_minute {
            return false;
        }
        used.1[slot] += 1;
        true
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Pay(#[from] PayError),
    #[error("{0}")]
    NotFound(&'static str),
    #[error("{0}")]
    Invalid(String),
    /// The gateway refused a new order, which was closed: commit what was written.
    #[error(transparent)]
    Gateway(PayError),
}

impl Failure for ServiceError {
    fn keeps_writes(&self) -> bool {
        matches!(self, ServiceError::Gateway(_))
    }
}

/// What became of a verified payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// The order turned paid now and the subscription was activated or extended.
    Processed,
    /// Already paid: nothing changed.
    Duplicate,
}

impl Settled {
    /// What this makes of the notification that reported the payment.
    pub fn result(self) -> NotificationResult {
        match self {
            Settled::Processed => NotificationResult::Processed,
            Settled::Duplicate => NotificationResult::Duplicate,
        }
    }
}

fn read(path: &std::path::Path) -> Result<String, PayError> {
    std::fs::read_to_string(path).map_err(|e| PayError::Key(format!("{}: {e}", path.display())))
}

/// A new out_trade_no: `TG`, the UTC time to the second, and 16 random letters and digits —
/// 32 characters of `[A-Za-z0-9]` (WeChat Pay allows at most 32, Alipay 64), unique and not
/// guessable.
pub fn new_order_id() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    let tail: String = (0..16)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect();
    format!("TG{}{tail}", Utc::now().format("%Y%m%d%H%M%S"))
}

impl Payments {
    pub fn load(
        config: &Config,
        db: Pool,
        sync: Syncer,
        metrics: Arc<Metrics>,
    ) -> Result<Payments, PayError> {
        let http = reqwest::Client::builder()
            // WeChat Pay v3 refuses requests without a User-Agent.
            .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
            .timeout(std::time::Duration::from_secs(15))
            .build()
            .map_err(|e| PayError::Key(format!("http client: {e}")))?;
        let public = &config.public_url;
        let alipay = match &config.alipay {
            Some(a) => Some(Arc::new(Alipay::new(
                AlipayConfig {
                    gateway_url: a.gateway_url.clone(),
                    app_id: a.app_id.clone(),
                    seller_id: a.seller_id.clone(),
                    app_key: RsaSigner::from_pem(&read(&a.app_private_key_file)?)?,
                    alipay_key: RsaVerifier::from_pem(&read(&a.public_key_file)?)?,
                    notify_url: format!("{public}/v1/payments/alipay/notify"),
                    return_url: format!("{public}/checkout"),
                },
                http.clone(),
            ))),
            None => None,
        };
        let wechat = match &config.wechat {
            Some(w) => {
                let mut apiv3_key = [0u8; 32];
                let raw = w.apiv3_key.expose().as_bytes();
                if raw.len() != 32 {
                    return Err(PayError::Key("the APIv3 key must be 32 bytes".to_owned()));
                }
                apiv3_key.copy_from_slice(raw);
                let platform = RsaVerifier::from_pem(&read(&w.platform_public_key_file)?)?;
                Some(Arc::new(Wechat::new(
                    WechatConfig {
                        api_base: w.api_base.clone(),
                        mchid: w.mchid.clone(),
                        appid: w.appid.clone(),
                        merchant_serial: w.merchant_serial.clone(),
                        merchant_key: RsaSigner::from_pem(&read(&w.merchant_private_key_file)?)?,
                        platform_keys: [(w.platform_serial.clone(), platform)].into(),
                        apiv3_key,
                        notify_url: format!("{public}/v1/payments/wechat/notify"),
                    },
                    http,
                )))
            }
            None => None,
        };
        Ok(Payments {
            alipay,
            wechat,
            db,
            sync,
            metrics,
            order_ttl: chrono::Duration::milliseconds(config.order_ttl.0 as i64),
            reconcile_after: chrono::Duration::seconds(60),
            notify_body_limit: config.notify_body_limit,
            rejections: Arc::new(RejectionBudget::new(config.notify_rejected_per_minute)),
        })
    }

    /// Whether this replica takes payments through `channel`.
    pub fn accepts(&self, channel: Channel) -> bool {
        match channel {
            Channel::Alipay => self.alipay.is_some(),
            Channel::Wechat => self.wechat.is_some(),
        }
    }

    /// Verifies a notification over its raw bytes, each channel in its own format.
    pub fn verify_notification(
        &self,
        channel: Channel,
        headers: &http::HeaderMap,
        body: &[u8],
    ) -> Result<Payment, PayError> {
        let not_configured = || PayError::Invalid(format!("{channel} is not configured"));
        match channel {
            Channel::Alipay => {
                let alipay = self.alipay.as_ref().ok_or_else(not_configured)?;
                alipay.verify_notify(body).map(Payment::from)
            }
            Channel::Wechat => {
                let wechat = self.wechat.as_ref().ok_or_else(not_configured)?;
                let signed = SignedHeaders::of(headers);
                let (event, transaction) =
                    wechat.verify_notification(&signed, body, Utc::now().timestamp())?;
                Ok(transaction.payment(event))
            }
        }
    }

    /// Creates a pending order for a priced plan in `tx`, with what its channel needs (a signed
    /// pay URL, or the WeChat `code_url`, asked of the gateway while `tx` is open). If the
    /// gateway refuses, the order is closed in `tx` so that it is never paid, and the error
    /// [`keeps_writes`](Failure::keeps_writes): commit `tx` anyway.
    pub async fn create_order(
        &self,
        tx: &mut Tx<'_>,
        user: Uuid,
        plan_id: &str,
        method: &str,
    ) -> Result<OrderRow, ServiceError> {
        let plan = db::catalog::plan(&**tx, plan_id)
            .await?
            .filter(|p| p.public && p.price_amount > 0)
            .ok_or(ServiceError::NotFound("no such plan for sale"))?;
        let method: PayMethod = method.parse().map_err(|_| {
            ServiceError::Invalid(
                "channel must be alipay_page, alipay_wap or wechat_native".to_owned(),
            )
        })?;
        if !self.accepts(method.channel()) {
            return Err(ServiceError::Invalid(format!(
                "the {method} channel is not configured here"
            )));
        }
        let id = new_order_id();
        let expires_at = Utc::now() + self.order_ttl;
        db::orders::create(
            &**tx,
            &db::orders::NewOrder {
                id: &id,
                user,
                plan: &plan.id,
                channel: method,
                amount: plan.price_amount,
                currency: &plan.currency,
                expires_at,
            },
        )
        .await?;
        let subject = format!("Tollgate {}", plan.name);
        if let (Channel::Alipay, Some(alipay)) = (method.channel(), &self.alipay) {
            let wap = method == PayMethod::AlipayWap;
            let url = alipay.pay_url(&id, &subject, plan.price_amount, wap, expires_at);
            db::orders::set_payment_target(&**tx, &id, Some(&url), None).await?;
        } else if let (Channel::Wechat, Some(wechat)) = (method.channel(), &self.wechat) {
            match wechat
                .native(&id, &subject, plan.price_amount, expires_at)
                .await
            {
                Ok(code_url) => {
                    db::orders::set_payment_target(&**tx, &id, None, Some(&code_url)).await?
                }
                Err(e) => {
                    // The gateway has no usable order: close ours so it is never paid.
                    db::orders::set_status(tx, &id, OrderStatus::Closed, None).await?;
                    return Err(ServiceError::Gateway(e));
                }
            }
        }
        let order = db::orders::get(&**tx, &id)
            .await?
            .ok_or(ServiceError::NotFound("order vanished"))?;
        self.count_after_commit(tx, OrderStatus::Pending);
        Ok(order)
    }

    fn count_after_commit(&self, tx: &mut Tx<'_>, status: OrderStatus) {
        let metrics = self.metrics.clone();
        tx.after_commit(move || metrics.orders.with_label_values(&[status.as_str()]).inc());
    }

    /// Applies a verified payment to its order once. `payment.event` names the delivery (e.g.
    /// `TRADE_SUCCESS`, `TRANSACTION.SUCCESS`, `query`); `notification` is the stored raw
    /// notification, marked processed or duplicate in the same transaction. New limits reach
    /// the sidecars before this returns (so before the gateway hears back).
    pub async fn settle_paid(
        &self,
        channel: Channel,
        payment: &Payment,
        notification: Option<i64>,
    ) -> Result<Settled, ServiceError> {
        let mut client = self.db.get().await.map_err(DbError::from)?;
        let mut tx = Tx::begin(&mut client, &self.sync).await?;
        let order = db::orders::lock(&tx, &payment.out_trade_no)
            .await?
            .ok_or(ServiceError::NotFound("unknown order"))?;
        if order.channel.channel() != channel {
            return Err(ServiceError::Invalid(format!(
                "order {} is not a {channel} order",
                order.id
            )));
        }
        if order.amount != payment.total_fen {
            return Err(ServiceError::Invalid(format!(
                "paid amount {} differs from the order's {}",
                payment.total_fen, order.amount
            )));
        }
        let settled = if order.status.is_settled() {
            Settled::Duplicate
        } else {
            if order.status == OrderStatus::Closed {
                // The buyer paid as we closed it: the money is real, so the order counts.
                tracing::warn!(order = %order.id, "payment arrived for a closed order; accepting it");
            }
            db::orders::set_status(&tx, &order.id, OrderStatus::Paid, Some(&payment.trade_no))
                .await?;
            db::subscriptions::activate(&tx, order.user_id, &order.plan_id, Some(&order.id))
                .await?;
            tx.announce(Change::User(order.user_id), Reach::BeforeAnswer)
                .await?;
            self.count_after_commit(&mut tx, OrderStatus::Paid);
            Settled::Processed
        };
        if let Some(id) = notification {
            db::orders::finish_notification(
                &*tx,
                id,
                true,
                Some(&payment.out_trade_no),
                Some(&payment.event),
                settled.result(),
                None,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(settled)
    }

    /// Asks the gateway about orders pending longer than a minute: a missed notification still
    /// ends in `paid`, and expired orders are closed at the gateway (then queried once more, so
    /// a payment that raced the close is not lost) and locally.
    pub async fn reconcile_once(&self) -> Result<usize, ServiceError> {
        let client = self.db.get().await.map_err(DbError::from)?;
        let pending =
            db::orders::pending_older_than(&**client, self.reconcile_after.num_seconds(), 100)
                .await?;
        drop(client);
        let mut changed = 0;
        for order in pending {
            match self.reconcile_order(&order).await {
                Ok(true) => changed += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(order = %order.id, error = %e, "reconciling an order failed")
                }
            }
        }
        Ok(changed)
    }

    /// What the gateway says of an order: its payment, if the money arrived.
    async fn paid_at_gateway(&self, order: &OrderRow) -> Result<Option<Payment>, ServiceError> {
        let payment = match order.channel.channel() {
            Channel::Alipay => {
                let Some(alipay) = &self.alipay else {
                    return Ok(None);
                };
                match alipay.query(&order.id).await? {
                    super::alipay::TradeState::Paid {
                        trade_no,
                        total_fen,
                    } => Some(Payment {
                        out_trade_no: order.id.clone(),
                        event: String::new(),
                        trade_no,
                        total_fen,
                        paid: true,
                    }),
                    _ => None,
                }
            }
            Channel::Wechat => {
                let Some(wechat) = &self.wechat else {
                    return Ok(None);
                };
                wechat
                    .query(&order.id)
                    .await?
                    .map(|t| t.payment(String::new()))
            }
        };
        Ok(payment.filter(|p| p.paid).map(|p| Payment {
            event: "query".to_owned(),
            ..p
        }))
    }

    async fn reconcile_order(&self, order: &OrderRow) -> Result<bool, ServiceError> {
        let channel = order.channel.channel();
        if let Some(payment) = self.paid_at_gateway(order).await? {
            let settled = self.settle_paid(channel, &payment, None).await?;
            if settled == Settled::Processed {
                self.metrics
                    .reconcile_paid_found
                    .with_label_values(&[channel.as_str()])
                    .inc();
                tracing::warn!(order = %order.id, "reconciliation found a paid order whose notification never arrived");
            }
            return Ok(settled == Settled::Processed);
        }
        if order.expires_at > Utc::now() {
            return Ok(false);
        }
        match (channel, &self.alipay, &self.wechat) {
            (Channel::Alipay, Some(alipay), _) => alipay.close(&order.id).await?,
            (Channel::Wechat, _, Some(wechat)) => wechat.close(&order.id).await?,
            _ => {}
        }
        // A payment may have landed just before the close.
        if let Some(payment) = self.paid_at_gateway(order).await? {
            self.settle_paid(channel, &payment, None).await?;
            return Ok(true);
        }
        let mut client = self.db.get().await.map_err(DbError::from)?;
        let mut tx = Tx::begin(&mut client, &self.sync).await?;
        let locked = db::orders::lock(&tx, &order.id).await?;
        if locked.is_some_and(|o| o.status == OrderStatus::Pending) {
            db::orders::set_status(&tx, &order.id, OrderStatus::Closed, None).await?;
            self.count_after_commit(&mut tx, OrderStatus::Closed);
            tx.commit().await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Refunds a paid order in full at the gateway and ends the paid period it bought; the user
    /// is back on free at every sidecar before this returns.
    pub async fn refund(&self, order_id: &str, actor: Uuid) -> Result<OrderRow, ServiceError> {
        let client = self.db.get().await.map_err(DbError::from)?;
        let order = db::orders::get(&**client, order_id)
            .await?
            .ok_or(ServiceError::NotFound("no such order"))?;
        drop(client);
        if order.status != OrderStatus::Paid {
            return Err(ServiceError::Invalid(format!(
                "only a paid order can be refunded; this one is {}",
                order.status
            )));
        }
        let request_no = format!("RF{}", &order.id[2..]);
        let channel = order.channel.channel();
        let not_configured = || ServiceError::Invalid(format!("{channel} is not configured"));
        match channel {
            Channel::Alipay => {
                let alipay = self.alipay.as_ref().ok_or_else(not_configured)?;
                alipay.refund(&order.id, order.amount, &request_no).await?;
            }
            Channel::Wechat => {
                let wechat = self.wechat.as_ref().ok_or_else(not_configured)?;
                wechat
                    .refund(&order.id, &request_no, order.amount, order.amount)
                    .await?;
            }
        }
        let mut client = self.db.get().await.map_err(DbError::from)?;
        let mut tx = Tx::begin(&mut client, &self.sync).await?;
        db::orders::lock(&tx, &order.id).await?;
        db::orders::set_status(&tx, &order.id, OrderStatus::Refunded, None).await?;
        // The period this order bought ends now; the user is back on free.
        db::subscriptions::end_refunded(&tx, &order.id, order.user_id).await?;
        tx.announce(Change::User(order.user_id), Reach::BeforeAnswer)
            .await?;
        tx.audit(
            actor,
            "order.refund",
            ("order", &order.id),
            &serde_json::json!({"amount": order.amount}),
        )
        .await?;
        self.count_after_commit(&mut tx, OrderStatus::Refunded);
        tx.commit().await?;
        let client = self.db.get().await.map_err(DbError::from)?;
        db::orders::get(&**client, &order.id)
            .await?
            .ok_or(ServiceError::NotFound("order vanished"))
    }

    pub async fn run_reconciler(self, every: std::time::Duration) {
        loop {
            if let Err(e) = self.reconcile_once().await {
                tracing::warn!(error = %e, "payment reconciliation failed; will retry");
            }
            tokio::time::sleep(every).await;
        }
    }
}
