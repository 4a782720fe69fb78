//! Plans, quota and usage (`/v1/plans`, `/v1/quota`, `/v1/usage`) and their administration:
//! grants, resets, per-user quota views, apps, quota types and plans.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use fred::interfaces::HashesInterface;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tollgate_common::ids;
use tollgate_common::keys::user_field;
use tollgate_common::quota::{QuotaAbout, QuotaStatus};
use tollgate_common::window::{self, Window};
use uuid::Uuid;

use super::AppState;
use super::accounts::path_id;
use super::cursor;
use super::dto::{Items, Page};
use super::error::AppError;
use super::extract::{Json, Query};
use super::idempotency::Idempotent;
use crate::auth::AuthUser;
use crate::db::outbox::Topic;
use crate::db::{self, DbError};

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
    let client = state.db.get().await.map_err(DbError::from)?;
    let plans = db::catalog::plans(&**client, false).await?;
    Ok(Json(Items {
        items: plans.into_iter().map(PlanDto::from).collect(),
    }))
}

#[derive(Deserialize)]
pub struct AppQuery {
    app: Option<String>,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The `/v1/quota` view of one user: definitions from PostgreSQL, live counters from Redis.
async fn quota_view(state: &AppState, user: Uuid, app: Option<&str>) -> Result<Value, AppError> {
    let app = app
        .filter(|a| !a.is_empty())
        .ok_or_else(|| AppError::invalid("the app query parameter is required"))?;
    let client = state.db.get().await.map_err(DbError::from)?;
    let time_zone = db::catalog::app_time_zone(&**client, app)
        .await?
        .ok_or_else(|| AppError::not_found("no such app"))?;
    let now = Utc::now();
    let types = db::catalog::quota_types_of(&**client, app).await?;
    let user_state = db::limits::user_state(&**client, user, now)
        .await?
        .ok_or_else(|| AppError::not_found("no such user"))?;
    let plan = db::subscriptions::current(&**client, user).await?;
    // A user whose hash Redis does not hold (Redis was lost and is being rebuilt) has no live
    // counters to show: rebuild this user now from the ledger rather than report 0 used.
    let present: Option<String> = state
        .redis
        .hget(state.sync.keys.user(user), user_field::STATUS)
        .await
        .map_err(AppError::unavailable)?;
    if present.is_none() {
        state.sync.user(user).await.map_err(AppError::unavailable)?;
    }
    let mut quotas = Vec::with_capacity(types.len());
    for qt in &types {
        let bounds = window::bounds(qt.window, now, qt.time_zone);
        let limit = user_state
            .limits
            .iter()
            .find(|l| l.app == qt.app && l.quota_type == qt.key)
            .map_or(0, |l| l.limit);
        let counter: Option<String> = state
            .redis
            .hget(
                state.sync.keys.user(user),
                user_field::counter(app, &qt.key),
            )
            .await
            .map_err(AppError::unavailable)?;
        // A counter of an earlier window means nothing is used in this one yet.
        let used = match counter.as_deref().and_then(user_field::parse_counter) {
            Some((used, start)) if start == bounds.start.timestamp_millis() => used,
            _ => 0,
        };
        quotas.push(
            QuotaStatus::new(&qt.key, limit, used, bounds.end).about(QuotaAbout {
                name: &qt.name,
                unit: &qt.unit,
                window: qt.window,
            }),
        );
    }
    Ok(json!({
        "app": app,
        // Usage periods (days, months) start at midnight here.
        "time_zone": time_zone,
        "plan": plan.map(|p| json!({
            "id": p.plan_id,
            "name": p.plan_name,
            "expires_at": p.period_end.map(rfc3339),
        })),
        "quotas": quotas,
    }))
}

pub async fn quota(
    State(state): State<AppState>,
    auth: AuthUser,
    Query(query): Query<AppQuery>,
) -> Result<Json<Value>, AppError> {
    Ok(Json(
        quota_view(&state, auth.id, query.app.as_deref()).await?,
    ))
}

pub async fn admin_user_quota(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
    Query(query): Query<AppQuery>,
) -> Result<Json<Value>, AppError> {
    auth.require_admin()?;
    let id = path_id(&id)?;
    Ok(Json(quota_view(&state, id, query.app.as_deref()).await?))
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
    auth: AuthUser,
    Path(id): Path<String>,
    Query(params): Query<UsageParams>,
) -> Result<Json<Page<UsageDto>>, AppError> {
    auth.require_admin()?;
    let id = path_id(&id)?;
    Ok(Json(usage_page(&state, id, params).await?))
}

async fn usage_page(
    state: &AppState,
    user: Uuid,
    params: UsageParams,
) -> Result<Page<UsageDto>, AppError> {
    let limit = cursor::limit(params.limit)?;
    let granularity = match params.granularity.as_deref() {
        None => db::usage::Granularity::Day,
        Some(g) => db::usage::Granularity::parse(g)
            .ok_or_else(|| AppError::invalid("granularity must be minute, hour, day or month"))?,
    };
    let before = params
        .cursor
        .as_deref()
        .map(cursor::decode::<UsageKey>)
        .transpose()?
        .map(|(period, UsageKey(app, quota_type, route))| (period, app, quota_type, route));
    if let (Some(from), Some(to)) = (params.from, params.to)
        && from > to
    {
        return Err(AppError::invalid("from must not be after to"));
    }
    let client = state.db.get().await.map_err(DbError::from)?;
    let mut rows = db::usage::page(
        &**client,
        &db::usage::UsageQuery {
            user,
            app: params.app.as_deref(),
            quota_type: params.quota_type.as_deref(),
            route: params.route.as_deref(),
            granularity,
            from: params.from,
            to: params.to,
            before,
            limit: limit + 1,
        },
    )
    .await?;
    let next_cursor = if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(|r| {
            cursor::encode(
                r.period_start,
                UsageKey(r.app.clone(), r.quota_type.clone(), r.route.clone()),
            )
        })
    } else {
        None
    };
    Ok(Page {
        items: rows
            .into_iter()
            .map(|r| UsageDto {
                app: r.app,
                quota_type: r.quota_type,
                route: r.route,
                period_start: rfc3339(r.period_start),
                granularity: granularity.as_str(),
                amount: r.amount,
                calls: r.calls,
            })
            .collect(),
        next_cursor,
    })
}

#[derive(Deserialize)]
pub struct GrantBody {
    app: String,
    #[serde(rename = "type")]
    quota_type: String,
    amount: i64,
    reason: String,
}

/// Finds a user and one quota type of an app, or answers 404.
async fn user_and_type(
    client: &impl tokio_postgres::GenericClient,
    user: Uuid,
    app: &str,
    quota_type: &str,
) -> Result<db::catalog::QuotaType, AppError> {
    if db::users::get(client, user).await?.is_none() {
        return Err(AppError::not_found("no such user"));
    }
    db::catalog::quota_type(client, app, quota_type)
        .await?
        .ok_or_else(|| AppError::not_found("no such quota type for this app"))
}

pub async fn grant(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
    request: Idempotent<GrantBody>,
) -> Result<Response, AppError> {
    auth.require_admin()?;
    let user = path_id(&id)?;
    let body = &request.body;
    if !(1..=1_000_000_000_000_000).contains(&body.amount) {
        return Err(AppError::invalid("amount must be a positive integer"));
    }
    let reason = body.reason.trim();
    if reason.is_empty() || reason.chars().count() > 500 {
        return Err(AppError::invalid("reason must be 1 to 500 characters"));
    }
    let mut client = state.db.get().await.map_err(DbError::from)?;
    let tx = client
        .transaction()
        .await
        .map_err(DbError::op("begin grant"))?;
    if let Some(replay) = request.begin(&tx, auth.id).await? {
        return Ok(replay);
    }
    let qt = user_and_type(&*tx, user, &body.app, &body.quota_type).await?;
    let bounds = window::bounds(qt.window, Utc::now(), qt.time_zone);
    let (grant_id, created_at) = db::catalog::add_grant(
        &*tx,
        user,
        qt.id,
        body.amount,
        bounds.start,
        reason,
        auth.id,
    )
    .await?;
    db::outbox::enqueue(&*tx, Topic::User, &user.to_string()).await?;
    db::audit::record(
        &*tx,
        auth.id,
        "quota.grant",
        "user",
        &user.to_string(),
        &json!({"app": body.app, "type": body.quota_type, "amount": body.amount, "reason": reason}),
    )
    .await?;
    let answer = json!({
        "id": grant_id,
        "app": body.app,
        "type": body.quota_type,
        "amount": body.amount,
        "reason": reason,
        "window_start": rfc3339(bounds.start),
        "window_end": bounds.end.map(rfc3339),
        "created_at": created_at,
    });
    let response = request
        .finish(&tx, auth.id, StatusCode::CREATED, Some(&answer))
        .await?;
    tx.commit().await.map_err(DbError::op("commit grant"))?;
    if let Err(e) = state.sync.user(user).await {
        tracing::warn!(error = %e, "grant not yet in redis; the outbox will retry");
    }
    state.sync.kick();
    Ok(response)
}

#[derive(Deserialize)]
pub struct ResetBody {
    app: String,
    #[serde(rename = "type")]
    quota_type: String,
}

pub async fn reset(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
    request: Idempotent<ResetBody>,
) -> Result<Response, AppError> {
    auth.require_admin()?;
    let user = path_id(&id)?;
    let body = &request.body;
    let mut client = state.db.get().await.map_err(DbError::from)?;
    let tx = client
        .transaction()
        .await
        .map_err(DbError::op("begin reset"))?;
    if let Some(replay) = request.begin(&tx, auth.id).await? {
        return Ok(replay);
    }
    let qt = user_and_type(&*tx, user, &body.app, &body.quota_type).await?;
    let bounds = window::bounds(qt.window, Utc::now(), qt.time_zone);
    let limit = db::limits::Limit {
        app: qt.app,
        quota_type: qt.key,
        window: qt.window,
        limit: 0,
        window_start: bounds.start,
        window_end: bounds.end,
    };
    // Redis inside the transaction: if it fails, nothing is recorded; what it cleared is
    // recorded with the reset, so that a counter rebuilt from the ledger honours it.
    let cleared = state
        .sync
        .reset_counter(user, &limit)
        .await
        .map_err(AppError::unavailable)?;
    db::catalog::add_reset(&*tx, user, qt.id, bounds.start, cleared, auth.id).await?;
    db::audit::record(
        &*tx,
        auth.id,
        "quota.reset",
        "user",
        &user.to_string(),
        &json!({"app": body.app, "type": body.quota_type, "window_start": rfc3339(bounds.start), "cleared": cleared}),
    )
    .await?;
    let response = request
        .finish(&tx, auth.id, StatusCode::NO_CONTENT, None::<&Value>)
        .await?;
    tx.commit().await.map_err(DbError::op("commit reset"))?;
    Ok(response)
}

fn check_name(name: &str) -> Result<(), AppError> {
    if name.trim().is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(AppError::invalid("name must be 1 to 200 characters"));
    }
    Ok(())
}

#[derive(Deserialize)]
pub struct AppBody {
    id: String,
    name: String,
    time_zone: Option<String>,
}

pub async fn create_app(
    State(state): State<AppState>,
    auth: AuthUser,
    Json(body): Json<AppBody>,
) -> Result<Response, AppError> {
    auth.require_admin()?;
    if !ids::is_id(&body.id) {
        return Err(AppError::invalid(
            "id must be 1-63 lowercase letters, digits, '_' or '-'",
        ));
    }
    check_name(&body.name)?;
    let time_zone = body.time_zone.unwrap_or_else(|| "UTC".to_owned());
    if time_zone.parse::<chrono_tz::Tz>().is_err() {
        return Err(AppError::invalid(
            "time_zone must be an IANA time zone such as Asia/Shanghai",
        ));
    }
    let client = state.db.get().await.map_err(DbError::from)?;
    let created_at = db::catalog::create_app(&**client, &body.id, body.name.trim(), &time_zone)
        .await
        .map_err(|e| {
            AppError::from_db(
                e,
                &[("apps_pkey", "app_exists", "an app with this id exists")],
            )
        })?;
    db::audit::record(
        &**client,
        auth.id,
        "app.create",
        "app",
        &body.id,
        &json!({"name": body.name}),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": body.id, "name": body.name.trim(), "time_zone": time_zone, "created_at": created_at})),
    )
        .into_response())
}

#[derive(Deserialize)]
pub struct QuotaTypeBody {
    key: String,
    name: String,
    unit: String,
    window: String,
}

pub async fn create_quota_type(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(app): Path<String>,
    Json(body): Json<QuotaTypeBody>,
) -> Result<Response, AppError> {
    auth.require_admin()?;
    if !ids::is_quota_type_key(&body.key) {
        return Err(AppError::invalid(
            "key must be 1-63 lowercase letters, digits or '_'",
        ));
    }
    check_name(&body.name)?;
    if !matches!(body.unit.as_str(), "calls" | "bytes" | "items" | "tokens") {
        return Err(AppError::invalid(
            "unit must be calls, bytes, items or tokens",
        ));
    }
    if Window::parse(&body.window).is_none() {
        return Err(AppError::invalid(
            "window must be minute, hour, day, month, year or lifetime",
        ));
    }
    let client = state.db.get().await.map_err(DbError::from)?;
    if !db::catalog::app_exists(&**client, &app).await? {
        return Err(AppError::not_found("no such app"));
    }
    db::catalog::create_quota_type(
        &**client,
        &app,
        &body.key,
        body.name.trim(),
        &body.unit,
        &body.window,
    )
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
    db::audit::record(
        &**client,
        auth.id,
        "quota_type.create",
        "app",
        &app,
        &json!({"key": body.key}),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"app": app, "key": body.key, "name": body.name.trim(), "unit": body.unit, "window": body.window})),
    )
        .into_response())
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

pub async fn put_plan(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<String>,
    request: Idempotent<PlanBody>,
) -> Result<Response, AppError> {
    auth.require_admin()?;
    let body = &request.body;
    if !ids::is_id(&id) {
        return Err(AppError::invalid(
            "plan id must be 1-63 lowercase letters, digits, '_' or '-'",
        ));
    }
    check_name(&body.name)?;
    if body.price.amount < 0 {
        return Err(AppError::invalid("price.amount must not be negative"));
    }
    if body.price.currency.len() != 3
        || !body.price.currency.bytes().all(|b| b.is_ascii_uppercase())
    {
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
    let mut client = state.db.get().await.map_err(DbError::from)?;
    let tx = client
        .transaction()
        .await
        .map_err(DbError::op("begin plan edit"))?;
    if let Some(replay) = request.begin(&tx, auth.id).await? {
        return Ok(replay);
    }
    let mut quotas = Vec::with_capacity(body.quotas.len());
    for q in &body.quotas {
        if q.limit < 0 {
            return Err(AppError::invalid("a quota limit must not be negative"));
        }
        let qt = db::catalog::quota_type(&*tx, &q.app, &q.quota_type)
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
        id: id.clone(),
        name: body.name.trim().to_owned(),
        price_amount: body.price.amount,
        currency: body.price.currency.clone(),
        period: body.period.clone(),
        public: body.public,
        quotas: Vec::new(),
    };
    db::catalog::upsert_plan(&tx, &plan, &quotas).await?;
    db::outbox::enqueue(&*tx, Topic::Plan, &id).await?;
    db::audit::record(
        &*tx,
        auth.id,
        "plan.put",
        "plan",
        &id,
        &json!({"name": plan.name, "price": plan.price_amount}),
    )
    .await?;
    let saved = db::catalog::plan(&*tx, &id)
        .await?
        .ok_or_else(|| AppError::internal("plan vanished after saving"))?;
    let response = request
        .finish(&tx, auth.id, StatusCode::OK, Some(&PlanDto::from(saved)))
        .await?;
    tx.commit().await.map_err(DbError::op("commit plan edit"))?;
    state.sync.kick();
    Ok(response)
}
