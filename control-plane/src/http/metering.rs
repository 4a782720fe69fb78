//! Plans, quota and usage (`/v1/plans`, `/v1/quota`, `/v1/usage`) and their administration:
//! grants, resets, per-user quota views, apps, quota types and plans.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::AppState;
use super::accounts::path_id;
use super::cursor;
use super::dto::{Items, Page};
use super::error::AppError;
use super::extract::{Json, Query};
use super::idempotency::Idempotent;
use crate::app::catalog::{self, NewApp, NewQuotaType, PlanBody, PlanEdit};
use crate::app::metering::{self, Grant, GrantBody, QuotaView, ResetBody, rfc3339};
use crate::auth::AuthUser;
use crate::db;

#[derive(Serialize)]
pub struct Money {
    amount: i64,
    currency: String,
}

#[derive(Serialize)]
pub struct PlanQuotaDto {
    app: String,
    #[serde(rename = "type")]
    quota_type: String,
    limit: i64,
    window: String,
}

#[derive(Serialize)]
pub struct PlanDto {
    id: String,
    name: String,
    price: Money,
    period: String,
    quotas: Vec<PlanQuotaDto>,
}

impl From<db::catalog::Plan> for PlanDto {
    fn from(p: db::catalog::Plan) -> PlanDto {
        PlanDto {
            id: p.id,
            name: p.name,
            price: Money {
                amount: p.price_amount,
                currency: p.currency,
            },
            period: p.period,
            quotas: p
                .quotas
                .into_iter()
                .map(|q| PlanQuotaDto {
                    app: q.app,
                    quota_type: q.quota_type,
                    limit: q.limit,
                    window: q.window,
                })
                .collect(),
        }
    }
}

pub async fn plans(State(state): State<AppState>) -> Result<Json<Items<PlanDto>>, AppError> {
    let plans = catalog::plans(&state).await?;
    Ok(Json(Items {
        items: plans.into_iter().map(PlanDto::from).collect(),
    }))
}

#[derive(Deserialize)]
pub struct AppQuery {
    app: Option<String>,
}

pub async fn quota(
    State(state): State<AppState>,
    auth: AuthUser,
    Query(query): Query<AppQuery>,
) -> Result<Json<QuotaView>, AppError> {
    let view = metering::quota_view(&state, auth.id, query.app.as_deref()).await?;
    Ok(Json(view))
}

pub async fn admin_user_quota(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<AppQuery>,
) -> Result<Json<QuotaView>, AppError> {
    let view = metering::quota_view(&state, path_id(&id)?, query.app.as_deref()).await?;
    Ok(Json(view))
}

#[derive(Deserialize)]
pub struct UsageParams {
    app: Option<String>,
    #[serde(rename = "type")]
    quota_type: Option<String>,
    route: Option<String>,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    granularity: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

#[derive(Serialize)]
pub struct UsageDto {
    app: String,
    #[serde(rename = "type")]
    quota_type: String,
    route: String,
    period_start: String,
    granularity: &'static str,
    amount: i64,
    calls: i64,
}

/// The app, quota type and route of a usage page's last item: with its period, the page's
/// cursor.
struct UsageKey(String, String, String);

impl std::fmt::Display for UsageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let json =
            serde_json::to_string(&(&self.0, &self.1, &self.2)).map_err(|_| std::fmt::Error)?;
        f.write_str(&json)
    }
}

impl std::str::FromStr for UsageKey {
    type Err = serde_json::Error;

    fn from_str(s: &str) -> Result<UsageKey, serde_json::Error> {
        let (app, quota_type, route) = serde_json::from_str(s)?;
        Ok(UsageKey(app, quota_type, route))
    }
}

/// `GET /v1/usage`: the caller's usage per period and route, from the ledger's aggregates.
pub async fn usage(
    State(state): State<AppState>,
    auth: AuthUser,
    Query(params): Query<UsageParams>,
) -> Result<Json<Page<UsageDto>>, AppError> {
    Ok(Json(usage_page(&state, auth.id, params).await?))
}

/// `GET /v1/admin/users/{id}/usage`: another user's `/v1/usage`.
pub async fn admin_user_usage(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(params): Query<UsageParams>,
) -> Result<Json<Page<UsageDto>>, AppError> {
    Ok(Json(usage_page(&state, path_id(&id)?, params).await?))
}

impl UsageParams {
    /// The ledger query these parameters ask for, one row more than a page.
    fn query(&self, user: Uuid, limit: i64) -> Result<db::usage::UsageQuery<'_>, AppError> {
        let granularity = match self.granularity.as_deref() {
            None => db::usage::Granularity::Day,
            Some(g) => db::usage::Granularity::parse(g).ok_or_else(|| {
                AppError::invalid("granularity must be minute, hour, day or month")
            })?,
        };
        let before = cursor::decode_opt::<UsageKey>(self.cursor.as_deref())?
            .map(|(period, UsageKey(app, quota_type, route))| (period, app, quota_type, route));
        Ok(db::usage::UsageQuery {
            user,
            app: self.app.as_deref(),
            quota_type: self.quota_type.as_deref(),
            route: self.route.as_deref(),
            granularity,
            from: self.from,
            to: self.to,
            before,
            limit: limit + 1,
        })
    }
}

/// Asks for one page of usage and answers it with its cursor.
async fn usage_page(
    state: &AppState,
    user: Uuid,
    params: UsageParams,
) -> Result<Page<UsageDto>, AppError> {
    let limit = cursor::limit(params.limit)?;
    let query = params.query(user, limit)?;
    let granularity = query.granularity;
    let rows = metering::usage(state, &query).await?;
    let page = cursor::page(rows, limit, |r| {
        let key = UsageKey(r.app.clone(), r.quota_type.clone(), r.route.clone());
        cursor::encode(r.period_start, key)
    });
    Ok(page.map(|r| UsageDto {
        app: r.app,
        quota_type: r.quota_type,
        route: r.route,
        period_start: rfc3339(r.period_start),
        granularity: granularity.as_str(),
        amount: r.amount,
        calls: r.calls,
    }))
}

pub async fn grant(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
    request: Idempotent<GrantBody>,
) -> Result<Response, AppError> {
    let grant = Grant::new(path_id(&id)?, &request.body)?;
    request
        .run(&state, auth.id, StatusCode::CREATED, async |tx, _| {
            grant.apply(tx, auth.id).await
        })
        .await
}

pub async fn reset(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
    request: Idempotent<ResetBody>,
) -> Result<Response, AppError> {
    let user = path_id(&id)?;
    request
        .run(&state, auth.id, StatusCode::NO_CONTENT, async |tx, body| {
            metering::reset(&state, tx, auth.id, user, body).await
        })
        .await
}

pub async fn create_app(
    State(state): State<AppState>,
    auth: AuthUser,
    Json(body): Json<NewApp>,
) -> Result<(StatusCode, Json<catalog::AppCreated>), AppError> {
    let created = catalog::create_app(&state, auth.id, body).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

pub async fn create_quota_type(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(app): Path<String>,
    Json(body): Json<NewQuotaType>,
) -> Result<(StatusCode, Json<NewQuotaType>), AppError> {
    let created = catalog::create_quota_type(&state, auth.id, app, body).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

pub async fn put_plan(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
    request: Idempotent<PlanBody>,
) -> Result<Response, AppError> {
    let edit = PlanEdit::new(&id, &request.body)?;
    request
        .run(&state, auth.id, StatusCode::OK, async |tx, _| {
            edit.save(tx, auth.id).await.map(PlanDto::from)
        })
        .await
}
