//! Subscriptions: every user has exactly one active one — `free` from registration, a paid plan
//! while its period runs, `free` again when it lapses.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::DbError;

#[derive(Debug, Clone)]
pub struct Current {
    pub plan_id: String,
    pub plan_name: String,
    pub period_end: Option<DateTime<Utc>>,
}

pub async fn current(
    client: &impl tokio_postgres::GenericClient,
    user: Uuid,
) -> Result<Option<Current>, DbError> {
    let row = client
        .query_opt(
            "SELECT s.plan_id, p.name, s.period_end FROM subscriptions s JOIN plans p ON p.id = s.plan_id
             WHERE s.user_id = $1 AND s.status = 'active'",
            &[&user],
        )
        .await
        .map_err(DbError::op("read subscription"))?;
    Ok(row.map(|r| Current {
        plan_id: r.get(0),
        plan_name: r.get(1),
        period_end: r.get(2),
    }))
}

/// Puts `user` on `plan` for one period: a purchase of the current paid plan extends it from its
/// end; any other plan starts now (counted usage is kept — counters are per quota type, not per
/// plan). The previous subscription is kept as `replaced`. Returns the new period's end.
pub async fn activate(
    tx: &tokio_postgres::Transaction<'_>,
    user: Uuid,
    plan: &str,
    source_order: Option<&str>,
) -> Result<DateTime<Utc>, DbError> {
    let current = tx
        .query_opt(
            "SELECT id, plan_id, period_start, period_end FROM subscriptions
             WHERE user_id = $1 AND status = 'active' FOR UPDATE",
            &[&user],
        )
        .await
        .map_err(DbError::op("lock subscription"))?;
    // Buying the plan one is on (a paid one, with an end) extends it; anything else starts now.
    let extend = current.as_ref().is_some_and(|row| {
        row.get::<_, String>(1) == plan && row.get::<_, Option<DateTime<Utc>>>(3).is_some()
    });
    if let Some(row) = &current {
        tx.execute(
            "UPDATE subscriptions SET status = 'replaced', updated_at = now() WHERE id = $1",
            &[&row.get::<_, Uuid>(0)],
        )
        .await
        .map_err(DbError::op("replace subscription"))?;
    }
    let (prev_start, prev_end): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = current
        .as_ref()
        .map_or((None, None), |r| (Some(r.get(2)), r.get(3)));
    let row = tx
        .query_one(
            "INSERT INTO subscriptions (user_id, plan_id, period_start, period_end, source_order_id)
             SELECT $1, p.id,
                    CASE WHEN $6 THEN $4::timestamptz ELSE now() END,
                    CASE WHEN $6 THEN GREATEST($5::timestamptz, now()) ELSE now() END
                      + CASE p.period WHEN 'year' THEN interval '1 year' ELSE interval '1 month' END,
                    $3
             FROM plans p WHERE p.id = $2
             RETURNING period_end",
            &[&user, &plan, &source_order, &prev_start, &prev_end, &extend],
        )
        .await
        .map_err(DbError::op("insert subscription"))?;
    Ok(row.get(0))
}

/// Ends the period a refunded order bought, if it is the user's active one, and puts the user
/// back on `free`. Returns whether a period ended.
pub async fn end_refunded(
    tx: &tokio_postgres::Transaction<'_>,
    order: &str,
    user: Uuid,
) -> Result<bool, DbError> {
    let ended = tx
        .execute(
            "UPDATE subscriptions SET status = 'refunded', updated_at = now()
             WHERE source_order_id = $1 AND status = 'active'",
            &[&order],
        )
        .await
        .map_err(DbError::op("end refunded subscription"))?;
    if ended > 0 {
        tx.execute(
            "INSERT INTO subscriptions (user_id, plan_id) VALUES ($1, 'free')",
            &[&user],
        )
        .await
        .map_err(DbError::op("back to free"))?;
    }
    Ok(ended > 0)
}

/// Ends paid periods that are over and puts those users back on `free`; returns them.
pub async fn lapse(tx: &tokio_postgres::Transaction<'_>) -> Result<Vec<Uuid>, DbError> {
    let rows = tx
        .query(
            "UPDATE subscriptions SET status = 'expired', updated_at = now()
             WHERE status = 'active' AND period_end IS NOT NULL AND period_end <= now()
             RETURNING user_id",
            &[],
        )
        .await
        .map_err(DbError::op("expire subscriptions"))?;
    let users: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
    if !users.is_empty() {
        tx.execute(
            "INSERT INTO subscriptions (user_id, plan_id) SELECT unnest($1::uuid[]), 'free'",
            &[&users],
        )
        .await
        .map_err(DbError::op("return lapsed users to free"))?;
    }
    Ok(users)
}

/// Users currently on a plan (a plan edit re-syncs them).
pub async fn subscribers(
    client: &impl tokio_postgres::GenericClient,
    plan: &str,
) -> Result<Vec<Uuid>, DbError> {
    let rows = client
        .query(
            "SELECT user_id FROM subscriptions WHERE plan_id = $1 AND status = 'active'",
            &[&plan],
        )
        .await
        .map_err(DbError::op("list subscribers"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
