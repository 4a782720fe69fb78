//! A user's orders: order a plan (priced on the server), list and read one's own, and an admin's
//! refund. Settling payments is `payments::service`'s, reached through `app::payments`.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use uuid::Uuid;

use super::{AppState, Tx, conn};
use crate::db::{self, orders::OrderRow};
use crate::http::error::AppError;
use crate::payments::service::ServiceError;

#[derive(Deserialize)]
pub struct NewOrder {
    pub plan_id: String,
    pub channel: String,
}

impl NewOrder {
    /// A plan id no plan can have is answered before any work.
    pub fn check(&self) -> Result<&NewOrder, AppError> {
        if self.plan_id.is_empty() || self.plan_id.len() > 63 {
            return Err(AppError::not_found("no such plan for sale"));
        }
        Ok(self)
    }

    /// Creates the pending order in `tx`, with its pay URL or QR code from the gateway.
    pub async fn place(
        &self,
        state: &AppState,
        tx: &mut Tx<'_>,
        user: Uuid,
    ) -> Result<OrderRow, ServiceError> {
        state
            .payments
            .create_order(tx, user, &self.plan_id, &self.channel)
            .await
    }
}

/// Anything that is not an order id cannot name an order: `404` without asking the database.
fn check_order_id(id: &str) -> Result<(), AppError> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(AppError::not_found("no such order"));
    }
    Ok(())
}

/// The caller's orders, newest first, before the cursor's `(created_at, id)`.
pub async fn list(
    state: &AppState,
    user: Uuid,
    before: Option<(DateTime<Utc>, String)>,
    limit: i64,
) -> Result<Vec<OrderRow>, AppError> {
    Ok(db::orders::list_for_user(&**conn(state).await?, user, before, limit).await?)
}

/// One of the caller's orders; another user's is indistinguishable from a missing one.
pub async fn own(state: &AppState, user: Uuid, id: &str) -> Result<OrderRow, AppError> {
    check_order_id(id)?;
    db::orders::get(&**conn(state).await?, id)
        .await?
        .filter(|o| o.user_id == user)
        .ok_or_else(|| AppError::not_found("no such order"))
}

/// An admin refunds a paid order in full.
pub async fn refund(state: &AppState, admin: Uuid, id: &str) -> Result<OrderRow, AppError> {
    check_order_id(id)?;
    Ok(state.payments.refund(id, admin).await?)
}
