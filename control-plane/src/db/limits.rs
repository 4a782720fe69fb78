//! A user's effective limits: the current plan's quotas plus admin grants for the current window.

use chrono::{DateTime, Utc};
use tollgate_common::window::{self, Window};
use uuid::Uuid;

use super::DbError;

/// One quota type's effective limit for a user right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    pub app: String,
    pub quota_type: String,
    pub window: Window,
    pub limit: i64,
    pub window_start: DateTime<Utc>,
    pub window_end: Option<DateTime<Utc>>,
}

/// What the sidecars need of one user.
#[derive(Debug, Clone)]
pub struct UserState {
    pub id: Uuid,
    pub status: String,
    pub role: String,
    /// Seconds since the epoch; 0 for none.
    pub tokens_valid_after: i64,
    pub plan: Option<String>,
    pub limits: Vec<Limit>,
}

/// Reads a user's status, plan and effective limits as of `now`.
pub async fn user_state(
    client: &impl tokio_postgres::GenericClient,
    user: Uuid,
    now: DateTime<Utc>,
) -> Result<Option<UserState>, DbError> {
    let Some(head) = client
        .query_opt(
            "SELECT u.status, u.role, COALESCE(extract(epoch FROM u.tokens_valid_after)::bigint, 0),
                    (SELECT plan_id FROM subscriptions s WHERE s.user_id = u.id AND s.status = 'active')
             FROM users u WHERE u.id = $1",
            &[&user],
        )
        .await
        .map_err(DbError::op("read user state"))?
    else {
        return Ok(None);
    };
    let plan: Option<String> = head.get(3);
    let rows = client
        .query(
            "SELECT qt.id, qt.app_id, qt.key, qt.\"window\", a.time_zone, pq.\"limit\"
             FROM subscriptions s
             JOIN plan_quotas pq ON pq.plan_id = s.plan_id
             JOIN quota_types qt ON qt.id = pq.quota_type_id
             JOIN apps a ON a.id = qt.app_id
             WHERE s.user_id = $1 AND s.status = 'active'
             UNION ALL
             SELECT qt.id, qt.app_id, qt.key, qt.\"window\", a.time_zone, 0
             FROM quota_grants g
             JOIN quota_types qt ON qt.id = g.quota_type_id
             JOIN apps a ON a.id = qt.app_id
             WHERE g.user_id = $1
               AND NOT EXISTS (SELECT 1 FROM subscriptions s JOIN plan_quotas pq ON pq.plan_id = s.plan_id
                               WHERE s.user_id = $1 AND s.status = 'active' AND pq.quota_type_id = qt.id)",
            &[&user],
        )
        .await
        .map_err(DbError::op("read plan quotas"))?;
    let mut limits: Vec<Limit> = Vec::new();
    let mut ids = Vec::new();
    for row in &rows {
        let id: i64 = row.get(0);
        if ids.contains(&id) {
            continue;
        }
        let window_name: String = row.get(3);
        let tz: String = row.get(4);
        let window = Window::parse(&window_name).unwrap_or(Window::Lifetime);
        let tz = tz.parse().unwrap_or(chrono_tz::UTC);
        let bounds = window::bounds(window, now, tz);
        ids.push(id);
        limits.push(Limit {
            app: row.get(1),
            quota_type: row.get(2),
            window,
            limit: row.get(5),
            window_start: bounds.start,
            window_end: bounds.end,
        });
    }
    // Admin grants add to the limit of the window they were given for.
    if !ids.is_empty() {
        let starts: Vec<DateTime<Utc>> = limits.iter().map(|l| l.window_start).collect();
        let grants = client
            .query(
                "SELECT g.quota_type_id, sum(g.amount)::bigint
                 FROM quota_grants g
                 JOIN unnest($2::bigint[], $3::timestamptz[]) AS cur(id, start)
                   ON cur.id = g.quota_type_id AND cur.start = g.window_start
                 WHERE g.user_id = $1
                 GROUP BY g.quota_type_id",
                &[&user, &ids, &starts],
            )
            .await
            .map_err(DbError::op("read grants"))?;
        for row in grants {
            let id: i64 = row.get(0);
            let amount: i64 = row.get(1);
            if let Some(i) = ids.iter().position(|x| *x == id) {
                limits[i].limit += amount;
            }
        }
    }
    Ok(Some(UserState {
        id: user,
        status: head.get(0),
        role: head.get(1),
        tokens_valid_after: head.get(2),
        plan,
        limits,
    }))
}
