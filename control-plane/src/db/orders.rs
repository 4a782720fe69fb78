//! Orders (the id is the `out_trade_no` sent to the gateway) and payment notifications.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::DbError;
use crate::domain::payments::{Channel, NotificationResult, OrderStatus, PayMethod};

#[derive(Debug, Clone)]
pub struct OrderRow {
    pub id: String,
    pub user_id: Uuid,
    pub plan_id: String,
    pub plan_name: String,
    pub channel: PayMethod,
    pub amount: i64,
    pub currency: String,
    pub status: OrderStatus,
    pub pay_url: Option<String>,
    pub code_url: Option<String>,
    pub gateway_trade_no: Option<String>,
    pub created_at: DateTime<Utc>,
    pub paid_at: Option<DateTime<Utc>>,
    pub expires_at: DateTime<Utc>,
}

const SELECT: &str = "SELECT o.id, o.user_id, o.plan_id, p.name AS plan_name, o.channel, o.amount,
        o.currency, o.status, o.pay_url, o.code_url, o.gateway_trade_no, o.created_at, o.paid_at,
        o.expires_at
     FROM orders o JOIN plans p ON p.id = o.plan_id";

impl OrderRow {
    fn from_row(r: &tokio_postgres::Row) -> Result<OrderRow, DbError> {
        // The columns' CHECK constraints hold the same words as the enums.
        let word =
            |column: &str| DbError::Invalid(format!("orders.{column} holds an unknown word"));
        Ok(OrderRow {
            id: r.get("id"),
            user_id: r.get("user_id"),
            plan_id: r.get("plan_id"),
            plan_name: r.get("plan_name"),
            channel: r
                .get::<_, &str>("channel")
                .parse()
                .map_err(|_| word("channel"))?,
            amount: r.get("amount"),
            currency: r.get("currency"),
            status: r
                .get::<_, &str>("status")
                .parse()
                .map_err(|_| word("status"))?,
            pay_url: r.get("pay_url"),
            code_url: r.get("code_url"),
            gateway_trade_no: r.get("gateway_trade_no"),
            created_at: r.get("created_at"),
            paid_at: r.get("paid_at"),
            expires_at: r.get("expires_at"),
        })
    }
}

pub struct NewOrder<'a> {
    pub id: &'a str,
    pub user: Uuid,
    pub plan: &'a str,
    pub channel: PayMethod,
    pub amount: i64,
    pub currency: &'a str,
    pub expires_at: DateTime<Utc>,
}

pub async fn create(
    client: &impl tokio_postgres::GenericClient,
    o: &NewOrder<'_>,
) -> Result<(), DbError> {
    client
        .execute(
            "INSERT INTO orders (id, user_id, plan_id, channel, amount, currency, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &o.id,
                &o.user,
                &o.plan,
                &o.channel.as_str(),
                &o.amount,
                &o.currency,
                &o.expires_at,
            ],
        )
        .await
        .map_err(DbError::op("insert order"))?;
    Ok(())
}

pub async fn set_payment_target(
    client: &impl tokio_postgres::GenericClient,
    id: &str,
    pay_url: Option<&str>,
    code_url: Option<&str>,
) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE orders SET pay_url = $2, code_url = $3, updated_at = now() WHERE id = $1",
            &[&id, &pay_url, &code_url],
        )
        .await
        .map_err(DbError::op("update order target"))?;
    Ok(())
}

pub async fn get(
    client: &impl tokio_postgres::GenericClient,
    id: &str,
) -> Result<Option<OrderRow>, DbError> {
    let row = client
        .query_opt(&format!("{SELECT} WHERE o.id = $1"), &[&id])
        .await
        .map_err(DbError::op("get order"))?;
    row.as_ref().map(OrderRow::from_row).transpose()
}

/// A user's orders, newest first, after the `(created_at, id)` of the previous page's last one.
pub async fn list_for_user(
    client: &impl tokio_postgres::GenericClient,
    user: Uuid,
    before: Option<(DateTime<Utc>, String)>,
    limit: i64,
) -> Result<Vec<OrderRow>, DbError> {
    let (at, id) = before.unzip();
    let rows = client
        .query(
            &format!(
                "{SELECT} WHERE o.user_id = $1
                   AND ($2::timestamptz IS NULL OR (o.created_at, o.id) < ($2, $3))
                 ORDER BY o.created_at DESC, o.id DESC LIMIT $4"
            ),
            &[&user, &at, &id, &limit],
        )
        .await
        .map_err(DbError::op("list orders"))?;
    rows.iter().map(OrderRow::from_row).collect()
}

/// Locks an order for a state change.
pub async fn lock(
    tx: &tokio_postgres::Transaction<'_>,
    id: &str,
) -> Result<Option<OrderRow>, DbError> {
    tx.execute("SELECT 1 FROM orders WHERE id = $1 FOR UPDATE", &[&id])
        .await
        .map_err(DbError::op("lock order"))?;
    get(tx, id).await
}

pub async fn set_status(
    tx: &tokio_postgres::Transaction<'_>,
    id: &str,
    status: OrderStatus,
    gateway_trade_no: Option<&str>,
) -> Result<(), DbError> {
    tx.execute(
        "UPDATE orders SET status = $2,
             gateway_trade_no = COALESCE($3, gateway_trade_no),
             paid_at = CASE WHEN $2 = 'paid' THEN now() ELSE paid_at END,
             closed_at = CASE WHEN $2 = 'closed' THEN now() ELSE closed_at END,
             refunded_at = CASE WHEN $2 = 'refunded' THEN now() ELSE refunded_at END,
             refunded_amount = CASE WHEN $2 = 'refunded' THEN amount ELSE refunded_amount END,
             updated_at = now()
         WHERE id = $1",
        &[&id, &status.as_str(), &gateway_trade_no],
    )
    .await
    .map_err(DbError::op("update order status"))?;
    Ok(())
}

/// Pending orders older than `age_seconds` (for reconciliation), oldest first.
pub async fn pending_older_than(
    client: &impl tokio_postgres::GenericClient,
    age_seconds: i64,
    limit: i64,
) -> Result<Vec<OrderRow>, DbError> {
    let rows = client
        .query(
            &format!(
                "{SELECT} WHERE o.status = 'pending' AND o.created_at < now() - $1::bigint * interval '1 second'
                 ORDER BY o.created_at LIMIT $2"
            ),
            &[&age_seconds, &limit],
        )
        .await
        .map_err(DbError::op("list pending orders"))?;
    rows.iter().map(OrderRow::from_row).collect()
}

/// Stores a notification whose signature verified, whole, before it is acted on (audit and
/// reconciliation).
pub async fn record_notification(
    client: &impl tokio_postgres::GenericClient,
    channel: Channel,
    headers: &serde_json::Value,
    raw_body: &[u8],
    sha256_hex: &str,
) -> Result<i64, DbError> {
    let size = raw_body.len() as i64;
    let row = client
        .query_one(
            "INSERT INTO payment_notifications
                 (channel, headers, raw_body, body_bytes, body_sha256, verified, result)
             VALUES ($1, $2, $3, $4, $5, true, 'received') RETURNING id",
            &[&channel.as_str(), headers, &raw_body, &size, &sha256_hex],
        )
        .await
        .map_err(DbError::op("store notification"))?;
    Ok(row.get(0))
}

/// What is kept of a delivery that did not verify: its size, digest and first bytes, never the
/// whole body, so that what anyone can make us store is small and fixed.
pub struct Rejected<'a> {
    pub channel: Channel,
    pub headers: &'a serde_json::Value,
    pub prefix: &'a [u8],
    /// The body's full size (or, for one refused unread, what it declared).
    pub size: Option<i64>,
    /// SHA-256 of the whole body, when it was read whole.
    pub sha256_hex: Option<&'a str>,
    pub reason: &'a str,
}

pub async fn record_rejected(
    client: &impl tokio_postgres::GenericClient,
    r: &Rejected<'_>,
) -> Result<(), DbError> {
    let truncated = r.size.is_none_or(|size| size > r.prefix.len() as i64);
    client
        .execute(
            "INSERT INTO payment_notifications
                 (channel, headers, raw_body, body_bytes, body_sha256, body_truncated, verified,
                  result, error)
             VALUES ($1, $2, $3, $4, $5, $6, false, 'rejected', $7)",
            &[
                &r.channel.as_str(),
                r.headers,
                &r.prefix,
                &r.size,
                &r.sha256_hex,
                &truncated,
                &r.reason,
            ],
        )
        .await
        .map_err(DbError::op("record rejected notification"))?;
    Ok(())
}

pub async fn finish_notification(
    client: &impl tokio_postgres::GenericClient,
    id: i64,
    verified: bool,
    out_trade_no: Option<&str>,
    event: Option<&str>,
    result: NotificationResult,
    error: Option<&str>,
) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE payment_notifications SET verified = $2, out_trade_no = $3, event = $4, result = $5, error = $6
             WHERE id = $1",
            &[&id, &verified, &out_trade_no, &event, &result.as_str(), &error],
        )
        .await
        .map_err(DbError::op("update notification"))?;
    Ok(())
}
