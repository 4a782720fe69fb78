//! What a user may use and has used: the quota view (definitions from PostgreSQL, live counters
//! from Redis), usage from the ledger, and an admin's grants and resets.

use chrono::Utc;
use fred::interfaces::HashesInterface;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tollgate_common::keys::user_field;
pub use tollgate_common::quota::rfc3339;
use tollgate_common::quota::{QuotaAbout, QuotaStatus};
use tollgate_common::window::{self, Bounds};
use uuid::Uuid;

use super::{AppState, Change, Reach, Tx, conn};
use crate::db::{self, limits::Limit};
use crate::http::error::AppError;

#[derive(Serialize)]
pub struct QuotaView {
    app: String,
    /// Usage periods (days, months) start at midnight here.
    time_zone: String,
    plan: Option<PlanView>,
    /// `tollgate_common::quota::QuotaStatus` each, the shape a sidecar's 402 details share.
    quotas: Vec<serde_json::Value>,
}

#[derive(Serialize)]
struct PlanView {
    id: String,
    name: String,
    expires_at: Option<String>,
}

/// The `/v1/quota` view of one user for one app.
pub async fn quota_view(
    state: &AppState,
    user: Uuid,
    app: Option<&str>,
) -> Result<QuotaView, AppError> {
    let app = app
        .filter(|a| !a.is_empty())
        .ok_or_else(|| AppError::invalid("the app query parameter is required"))?;
    let client = conn(state).await?;
    let time_zone = db::catalog::app_time_zone(&**client, app)
        .await?
        .ok_or_else(|| AppError::not_found("no such app"))?;
    let now = Utc::now();
    let types = db::catalog::quota_types_of(&**client, app).await?;
    let user_state = db::limits::user_state(&**client, user, now)
        .await?
        .ok_or_else(|| AppError::not_found("no such user"))?;
    let plan = db::subscriptions::current(&**client, user).await?;
    drop(client);
    // The status and every counter come from one HMGET: one snapshot of the user's hash, so a
    // Redis lost and restarted empty between two reads cannot show a status of before and a
    // counter of after (0 used). A hash Redis does not hold (lost, being rebuilt) has no live
    // counters to show: this user is rebuilt now from the ledger and read again rather than
    // reported as 0 used.
    let hash = state.sync.keys.user(user);
    let mut fields = vec![user_field::STATUS.to_owned()];
    fields.extend(types.iter().map(|qt| user_field::counter(app, &qt.key)));
    let mut snapshot: Vec<Option<String>> = state
        .redis
        .hmget(&hash, fields.clone())
        .await
        .map_err(AppError::unavailable)?;
    if snapshot.first().is_none_or(Option::is_none) {
        state.sync.user(user).await.map_err(AppError::unavailable)?;
        snapshot = state
            .redis
            .hmget(&hash, fields)
            .await
            .map_err(AppError::unavailable)?;
        if snapshot.first().is_none_or(Option::is_none) {
            return Err(AppError::unavailable(
                "the user's live counters are being rebuilt; try again",
            ));
        }
    }
    let mut quotas = Vec::with_capacity(types.len());
    for (qt, counter) in types.into_iter().zip(snapshot.into_iter().skip(1)) {
        let bounds = window::bounds(qt.window, now, qt.time_zone);
        let limit = user_state
            .limits
            .iter()
            .find(|l| l.app == qt.app && l.quota_type == qt.key)
            .map_or(0, |l| l.limit);
        // A counter of an earlier window means nothing is used in this one yet.
        let used = match counter.as_deref().and_then(user_field::parse_counter) {
            Some((used, start)) if start == bounds.start.timestamp_millis() => used,
            _ => 0,
        };
        quotas.push(
            QuotaStatus::new(&qt.key, limit, used, bounds.end)
                .about(QuotaAbout {
                    name: &qt.name,
                    unit: &qt.unit,
                    window: qt.window,
                })
                .to_json(),
        );
    }
    Ok(QuotaView {
        app: app.to_owned(),
        time_zone,
        plan: plan.map(|p| PlanView {
            id: p.plan_id,
            name: p.plan_name,
            expires_at: p.period_end.map(rfc3339),
        }),
        quotas,
    })
}

/// A page of a user's usage from the ledger's aggregates (`limit + 1` rows ask whether there is
/// a next page).
pub async fn usage(
    state: &AppState,
    query: &db::usage::UsageQuery<'_>,
) -> Result<Vec<db::usage::UsageRow>, AppError> {
    if let (Some(from), Some(to)) = (query.from, query.to)
        && from > to
    {
        return Err(AppError::invalid("from must not be after to"));
    }
    Ok(db::usage::page(&**conn(state).await?, query).await?)
}

/// Finds a user and one quota type of an app, or answers 404; with the type's current window.
async fn user_and_type(
    tx: &Tx<'_>,
    user: Uuid,
    app: &str,
    quota_type: &str,
) -> Result<(db::catalog::QuotaType, Bounds), AppError> {
    if db::users::get(&**tx, user).await?.is_none() {
        return Err(AppError::not_found("no such user"));
    }
    let qt = db::catalog::quota_type(&**tx, app, quota_type)
        .await?
        .ok_or_else(|| AppError::not_found("no such quota type for this app"))?;
    let bounds = window::bounds(qt.window, Utc::now(), qt.time_zone);
    Ok((qt, bounds))
}

#[derive(Deserialize)]
pub struct GrantBody {
    app: String,
    #[serde(rename = "type")]
    quota_type: String,
    amount: i64,
    reason: String,
}

/// A grant whose amount and reason are valid.
pub struct Grant<'a> {
    user: Uuid,
    body: &'a GrantBody,
    reason: &'a str,
}

impl<'a> Grant<'a> {
    pub fn new(user: Uuid, body: &'a GrantBody) -> Result<Grant<'a>, AppError> {
        if !(1..=1_000_000_000_000_000).contains(&body.amount) {
            return Err(AppError::invalid("amount must be a positive integer"));
        }
        let reason = body.reason.trim();
        if reason.is_empty() || reason.chars().count() > 500 {
            return Err(AppError::invalid("reason must be 1 to 500 characters"));
        }
        Ok(Grant { user, body, reason })
    }

    /// Adds to the user's limit for the current window; in force before the answer.
    pub async fn apply(&self, tx: &mut Tx<'_>, admin: Uuid) -> Result<serde_json::Value, AppError> {
        let (user, body, reason) = (self.user, self.body, self.reason);
        let (qt, bounds) = user_and_type(tx, user, &body.app, &body.quota_type).await?;
        let (grant_id, created_at) =
            db::catalog::add_grant(&**tx, user, qt.id, body.amount, bounds.start, reason, admin)
                .await?;
        tx.announce(Change::User(user), Reach::BeforeAnswer).await?;
        tx.audit(
            admin,
            "quota.grant",
            ("user", &user.to_string()),
            &json!({"app": body.app, "type": body.quota_type, "amount": body.amount, "reason": reason}),
        )
        .await?;
        Ok(json!({
            "id": grant_id,
            "app": body.app,
            "type": body.quota_type,
            "amount": body.amount,
            "reason": reason,
            "window_start": rfc3339(bounds.start),
            "window_end": bounds.end.map(rfc3339),
            "created_at": created_at,
        }))
    }
}

#[derive(Deserialize)]
pub struct ResetBody {
    app: String,
    #[serde(rename = "type")]
    quota_type: String,
}

/// Sets the current window's used to 0. Redis is written inside the transaction: if it fails,
/// nothing is recorded; what it cleared is recorded with the reset, so that a counter rebuilt
/// from the ledger honours it.
pub async fn reset(
    state: &AppState,
    tx: &mut Tx<'_>,
    admin: Uuid,
    user: Uuid,
    body: &ResetBody,
) -> Result<(), AppError> {
    let (qt, bounds) = user_and_type(tx, user, &body.app, &body.quota_type).await?;
    let limit = Limit {
        app: qt.app,
        quota_type: qt.key,
        window: qt.window,
        limit: 0,
        window_start: bounds.start,
        window_end: bounds.end,
    };
    let cleared = state
        .sync
        .reset_counter(user, &limit)
        .await
        .map_err(AppError::unavailable)?;
    db::catalog::add_reset(&**tx, user, qt.id, bounds.start, cleared, admin).await?;
    tx.audit(
        admin,
        "quota.reset",
        ("user", &user.to_string()),
        &json!({"app": body.app, "type": body.quota_type, "window_start": rfc3339(bounds.start), "cleared": cleared}),
    )
    .await?;
    Ok(())
}
