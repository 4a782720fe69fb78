//! The catalogue: apps, their quota types, and plans (what they cost, what they allow). A plan
//! edit reaches everyone on the plan through the outbox.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tollgate_common::ids;
use tollgate_common::window::Window;
use uuid::Uuid;

use super::{AppState, Change, Reach, Tx, conn};
use crate::db;
use crate::http::error::AppError;

/// The plans for sale.
pub async fn plans(state: &AppState) -> Result<Vec<db::catalog::Plan>, AppError> {
    Ok(db::catalog::plans(&**conn(state).await?, false).await?)
}

fn check_name(name: &str) -> Result<(), AppError> {
    if name.trim().is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(AppError::invalid("name must be 1 to 200 characters"));
    }
    Ok(())
}

#[derive(Deserialize)]
pub struct NewApp {
    pub id: String,
    pub name: String,
    pub time_zone: Option<String>,
}

#[derive(Serialize)]
pub struct AppCreated {
    id: String,
    name: String,
    time_zone: String,
    created_at: DateTime<Utc>,
}

/// Registers an app.
pub async fn create_app(
    state: &AppState,
    admin: Uuid,
    new: NewApp,
) -> Result<AppCreated, AppError> {
    if !ids::is_id(&new.id) {
        return Err(AppError::invalid(
            "id must be 1-63 lowercase letters, digits, '_' or '-'",
        ));
    }
    check_name(&new.name)?;
    let time_zone = new.time_zone.unwrap_or_else(|| "UTC".to_owned());
    if time_zone.parse::<chrono_tz::Tz>().is_err() {
        return Err(AppError::invalid(
            "time_zone must be an IANA time zone such as Asia/Shanghai",
        ));
    }
    let name = new.name.trim().to_owned();
    let mut client = conn(state).await?;
    let tx = Tx::begin(&mut client, &state.sync).await?;
    let created_at = db::catalog::create_app(&*tx, &new.id, &name, &time_zone)
        .await
        .map_err(|e| {
            AppError::from_db(
                e,
                &[("apps_pkey", "app_exists", "an app with this id exists")],
            )
        })?;
    tx.audit(
        admin,
        "app.create",
        ("app", &new.id),
        &json!({"name": new.name}),
    )
    .await?;
    tx.commit().await?;
    Ok(AppCreated {
        id: new.id,
        name,
        time_zone,
        created_at,
    })
}

#[derive(Deserialize, Serialize)]
pub struct NewQuotaType {
    #[serde(skip_deserializing)]
    app: String,
    key: String,
    name: String,
    unit: String,
    window: String,
}

/// Adds a quota type to an app; answered with what was stored.
pub async fn create_quota_type(
    state: &AppState,
    admin: Uuid,
    app: String,
    mut new: NewQuotaType,
) -> Result<NewQuotaType, AppError> {
    if !ids::is_quota_type_key(&new.key) {
        return Err(AppError::invalid(
            "key must be 1-63 lowercase letters, digits or '_'",
        ));
    }
    check_name(&new.name)?;
    if !matches!(new.unit.as_str(), "calls" | "bytes" | "items" | "tokens") {
        return Err(AppError::invalid(
            "unit must be calls, bytes, items or tokens",
        ));
    }
    if Window::parse(&new.window).is_none() {
        return Err(AppError::invalid(
            "window must be minute, hour, day, month, year or lifetime",
        ));
    }
    new.app = app;
    new.name = new.name.trim().to_owned();
    let mut client = conn(state).await?;
    let tx = Tx::begin(&mut client, &state.sync).await?;
    if !db::catalog::app_exists(&*tx, &new.app).await? {
        return Err(AppError::not_found("no such app"));
    }
    db::catalog::create_quota_type(&*tx, &new.app, &new.key, &new.name, &new.unit, &new.window)
        .await
        .map_err(|e| {
            AppError::from_db(
                e,
                &[(
                    "quota_types_app_id_key_key",
                    "quota_type_exists",
                    "this app already has a quota type with this key",
                )],
            )
        })?;
    tx.audit(
        admin,
        "quota_type.create",
        ("app", &new.app),
        &json!({"key": new.key}),
    )
    .await?;
    tx.commit().await?;
    Ok(new)
}

#[derive(Deserialize)]
pub struct PlanQuotaBody {
    app: String,
    #[serde(rename = "type")]
    quota_type: String,
    limit: i64,
}

#[derive(Deserialize)]
pub struct MoneyBody {
    amount: i64,
    currency: String,
}

#[derive(Deserialize)]
pub struct PlanBody {
    name: String,
    price: MoneyBody,
    period: String,
    #[serde(default = "yes")]
    public: bool,
    quotas: Vec<PlanQuotaBody>,
}

fn yes() -> bool {
    true
}

/// A plan edit whose fields are valid (the quota types it names are checked when it is saved).
pub struct PlanEdit<'a> {
    id: &'a str,
    body: &'a PlanBody,
}

impl<'a> PlanEdit<'a> {
    pub fn new(id: &'a str, body: &'a PlanBody) -> Result<PlanEdit<'a>, AppError> {
        if !ids::is_id(id) {
            return Err(AppError::invalid(
                "plan id must be 1-63 lowercase letters, digits, '_' or '-'",
            ));
        }
        check_name(&body.name)?;
        if body.price.amount < 0 {
            return Err(AppError::invalid("price.amount must not be negative"));
        }
        let currency = &body.price.currency;
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(AppError::invalid(
                "price.currency must be an ISO 4217 code such as CNY",
            ));
        }
        if !matches!(body.period.as_str(), "month" | "year") {
            return Err(AppError::invalid("period must be month or year"));
        }
        if id == "free" && body.price.amount != 0 {
            return Err(AppError::invalid("the free plan must cost 0"));
        }
        Ok(PlanEdit { id, body })
    }

    /// Creates or replaces the plan in `tx`; its subscribers' limits follow through the outbox.
    pub async fn save(&self, tx: &mut Tx<'_>, admin: Uuid) -> Result<db::catalog::Plan, AppError> {
        let (id, body) = (self.id, self.body);
        let mut quotas = Vec::with_capacity(body.quotas.len());
        for q in &body.quotas {
            if q.limit < 0 {
                return Err(AppError::invalid("a quota limit must not be negative"));
            }
            let qt = db::catalog::quota_type(&**tx, &q.app, &q.quota_type)
                .await?
                .ok_or_else(|| {
                    AppError::invalid(format!("unknown quota type {}/{}", q.app, q.quota_type))
                })?;
            if quotas.iter().any(|(existing, _)| *existing == qt.id) {
                return Err(AppError::invalid("a quota type is listed twice"));
            }
            quotas.push((qt.id, q.limit));
        }
        let plan = db::catalog::Plan {
            id: id.to_owned(),
            name: body.name.trim().to_owned(),
            price_amount: body.price.amount,
            currency: body.price.currency.clone(),
            period: body.period.clone(),
            public: body.public,
            quotas: Vec::new(),
        };
        db::catalog::upsert_plan(tx, &plan, &quotas).await?;
        tx.announce(Change::Plan(id), Reach::Soon).await?;
        tx.audit(
            admin,
            "plan.put",
            ("plan", id),
            &json!({"name": plan.name, "price": plan.price_amount}),
        )
        .await?;
        db::catalog::plan(&**tx, id)
            .await?
            .ok_or_else(|| AppError::internal("plan vanished after saving"))
    }
}
