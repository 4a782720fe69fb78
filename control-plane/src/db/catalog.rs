//! Apps, quota types and plans: data, so a new app needs no code change or restart.

use chrono::{DateTime, Utc};
use tollgate_common::window::Window;
use uuid::Uuid;

use super::DbError;

#[derive(Debug, Clone)]
pub struct QuotaType {
    pub id: i64,
    pub app: String,
    pub key: String,
    pub name: String,
    pub unit: String,
    pub window: Window,
    pub time_zone: chrono_tz::Tz,
}

impl QuotaType {
    fn from_row(r: &tokio_postgres::Row) -> QuotaType {
        let window: String = r.get("window");
        let tz: String = r.get("time_zone");
        QuotaType {
            id: r.get("id"),
            app: r.get("app_id"),
            key: r.get("key"),
            name: r.get("name"),
            unit: r.get("unit"),
            window: Window::parse(&window).unwrap_or(Window::Lifetime),
            time_zone: tz.parse().unwrap_or(chrono_tz::UTC),
        }
    }
}

const QT_SELECT: &str =
    "SELECT qt.id, qt.app_id, qt.key, qt.name, qt.unit, qt.\"window\", a.time_zone
     FROM quota_types qt JOIN apps a ON a.id = qt.app_id";

pub async fn app_exists(
    client: &impl tokio_postgres::GenericClient,
    app: &str,
) -> Result<bool, DbError> {
    Ok(client
        .query_opt("SELECT 1 FROM apps WHERE id = $1", &[&app])
        .await
        .map_err(DbError::op("find app"))?
        .is_some())
}

/// An app's business time zone (IANA name), or `None` if there is no such app.
pub async fn app_time_zone(
    client: &impl tokio_postgres::GenericClient,
    app: &str,
) -> Result<Option<String>, DbError> {
    Ok(client
        .query_opt("SELECT time_zone FROM apps WHERE id = $1", &[&app])
        .await
        .map_err(DbError::op("find app"))?
        .map(|r| r.get(0)))
}

pub async fn quota_types_of(
    client: &impl tokio_postgres::GenericClient,
    app: &str,
) -> Result<Vec<QuotaType>, DbError> {
    let rows = client
        .query(
            &format!("{QT_SELECT} WHERE qt.app_id = $1 ORDER BY qt.key"),
            &[&app],
        )
        .await
        .map_err(DbError::op("list quota types"))?;
    Ok(rows.iter().map(QuotaType::from_row).collect())
}

pub async fn quota_type(
    client: &impl tokio_postgres::GenericClient,
    app: &str,
    key: &str,
) -> Result<Option<QuotaType>, DbError> {
    let row = client
        .query_opt(
            &format!("{QT_SELECT} WHERE qt.app_id = $1 AND qt.key = $2"),
            &[&app, &key],
        )
        .await
        .map_err(DbError::op("find quota type"))?;
    Ok(row.as_ref().map(QuotaType::from_row))
}

pub async fn create_app(
    client: &impl tokio_postgres::GenericClient,
    id: &str,
    name: &str,
    time_zone: &str,
) -> Result<DateTime<Utc>, DbError> {
    let row = client
        .query_one(
            "INSERT INTO apps (id, name, time_zone) VALUES ($1, $2, $3) RETURNING created_at",
            &[&id, &name, &time_zone],
        )
        .await
        .map_err(DbError::op("insert app"))?;
    Ok(row.get(0))
}

pub async fn create_quota_type(
    client: &impl tokio_postgres::GenericClient,
    app: &str,
    key: &str,
    name: &str,
    unit: &str,
    window: &str,
) -> Result<i64, DbError> {
    let row = client
        .query_one(
            "INSERT INTO quota_types (app_id, key, name, unit, \"window\") VALUES ($1, $2, $3, $4, $5)
             RETURNING id",
            &[&app, &key, &name, &unit, &window],
        )
        .await
        .map_err(DbError::op("insert quota type"))?;
    Ok(row.get(0))
}

#[derive(Debug, Clone)]
pub struct PlanQuota {
    pub app: String,
    pub quota_type: String,
    pub limit: i64,
    pub window: String,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub id: String,
    pub name: String,
    pub price_amount: i64,
    pub currency: String,
    pub period: String,
    pub public: bool,
    pub quotas: Vec<PlanQuota>,
}

/// Plans with their quotas, in display order; only public ones unless `all`.
pub async fn plans(
    client: &impl tokio_postgres::GenericClient,
    all: bool,
) -> Result<Vec<Plan>, DbError> {
    let rows = client
        .query(
            "SELECT p.id, p.name, p.price_amount, p.currency, p.period, p.public,
                    qt.app_id, qt.key, pq.\"limit\", qt.\"window\"
             FROM plans p
             LEFT JOIN plan_quotas pq ON pq.plan_id = p.id
             LEFT JOIN quota_types qt ON qt.id = pq.quota_type_id
             WHERE p.public OR $1
             ORDER BY p.sort_order, p.id, qt.app_id, qt.key",
            &[&all],
        )
        .await
        .map_err(DbError::op("list plans"))?;
    let mut plans: Vec<Plan> = Vec::new();
    for r in &rows {
        let id: String = r.get(0);
        if plans.last().is_none_or(|p| p.id != id) {
            plans.push(Plan {
                id,
                name: r.get(1),
                price_amount: r.get(2),
                currency: r.get(3),
                period: r.get(4),
                public: r.get(5),
                quotas: Vec::new(),
            });
        }
        if let (Some(app), Some(key), Some(limit), Some(window)) = (
            r.get::<_, Option<String>>(6),
            r.get::<_, Option<String>>(7),
            r.get::<_, Option<i64>>(8),
            r.get::<_, Option<String>>(9),
        ) && let Some(plan) = plans.last_mut()
        {
            plan.quotas.push(PlanQuota {
                app,
                quota_type: key,
                limit,
                window,
            });
        }
    }
    Ok(plans)
}

pub async fn plan(
    client: &impl tokio_postgres::GenericClient,
    id: &str,
) -> Result<Option<Plan>, DbError> {
    Ok(plans(client, true).await?.into_iter().find(|p| p.id == id))
}

/// Creates or replaces a plan and its quotas. Quota types are `(quota_type_id, limit)`.
pub async fn upsert_plan(
    tx: &tokio_postgres::Transaction<'_>,
    plan: &Plan,
    quotas: &[(i64, i64)],
) -> Result<(), DbError> {
    tx.execute(
        "INSERT INTO plans (id, name, price_amount, currency, period, public)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (id) DO UPDATE SET name = $2, price_amount = $3, currency = $4, period = $5,
             public = $6, updated_at = now()",
        &[
            &plan.id,
            &plan.name,
            &plan.price_amount,
            &plan.currency,
            &plan.period,
            &plan.public,
        ],
    )
    .await
    .map_err(DbError::op("upsert plan"))?;
    tx.execute("DELETE FROM plan_quotas WHERE plan_id = $1", &[&plan.id])
        .await
        .map_err(DbError::op("clear plan quotas"))?;
    let (ids, limits): (Vec<i64>, Vec<i64>) = quotas.iter().copied().unzip();
    tx.execute(
        "INSERT INTO plan_quotas (plan_id, quota_type_id, \"limit\")
         SELECT $1, id, lim FROM unnest($2::bigint[], $3::bigint[]) AS q(id, lim)",
        &[&plan.id, &ids, &limits],
    )
    .await
    .map_err(DbError::op("insert plan quotas"))?;
    Ok(())
}

pub async fn add_grant(
    client: &impl tokio_postgres::GenericClient,
    user: Uuid,
    quota_type: i64,
    amount: i64,
    window_start: DateTime<Utc>,
    reason: &str,
    actor: Uuid,
) -> Result<(Uuid, DateTime<Utc>), DbError> {
    let row = client
        .query_one(
            "INSERT INTO quota_grants (user_id, quota_type_id, amount, window_start, reason, actor_id)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id, created_at",
            &[&user, &quota_type, &amount, &window_start, &reason, &actor],
        )
        .await
        .map_err(DbError::op("insert grant"))?;
    Ok((row.get(0), row.get(1)))
}

/// Records an admin reset of a window and what it cleared (the counter's value before it), so
/// that a counter rebuilt from the ledger honours it.
pub async fn add_reset(
    client: &impl tokio_postgres::GenericClient,
    user: Uuid,
    quota_type: i64,
    window_start: DateTime<Utc>,
    cleared: i64,
    actor: Uuid,
) -> Result<(), DbError> {
    client
        .execute(
            "INSERT INTO quota_resets (user_id, quota_type_id, window_start, cleared, actor_id)
             VALUES ($1, $2, $3, $4, $5)",
            &[&user, &quota_type, &window_start, &cleared.max(0), &actor],
        )
        .await
        .map_err(DbError::op("insert reset"))?;
    Ok(())
}
