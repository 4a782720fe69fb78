//! The usage ledger: aggregates per (user, app, quota type, route) and minute (`usage_minutes`)
//! and per month of the app's time zone (`usage_months`), drained from the sidecars' Redis
//! buckets. Each staged bucket — the stamp of the pass that staged it, its shard and minute — is
//! applied once (`usage_drains`), so a bucket read twice adds nothing; late additions to a drained
//! minute (refunds) are added to its row.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use tollgate_common::window::Window;
use uuid::Uuid;

use super::DbError;

/// One drained bucket entry: what one user's calls of one route took in one minute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub user_id: Uuid,
    pub minute: DateTime<Utc>,
    pub app: String,
    pub quota_type: String,
    pub route: String,
    pub amount: i64,
    pub calls: i64,
}

/// What [`record`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// Entries of stamps applied now.
    pub applied: usize,
    /// Entries of stamps already applied (a pass read twice).
    pub duplicate: usize,
    /// Entries of applied stamps dropped: unknown user, app or quota type.
    pub dropped: u64,
}

/// One staged bucket: the stamp of the pass that staged it, its shard and minute.
pub type StagedId = (Uuid, i16, DateTime<Utc>);

/// Records drained buckets in the caller's transaction: `staged` lists every bucket read, and
/// each entry names the bucket it came from. Buckets are claimed in sorted order, so concurrent
/// drainers never deadlock on them; entries of a bucket another drainer holds wait for its commit
/// and are then skipped, as are those of a bucket recorded before.
pub async fn record(
    tx: &tokio_postgres::Transaction<'_>,
    staged: &[StagedId],
    entries: &[(StagedId, Bucket)],
) -> Result<Recorded, DbError> {
    let mut claims: Vec<StagedId> = staged.to_vec();
    claims.sort_unstable();
    claims.dedup();
    if claims.is_empty() || entries.is_empty() {
        return Ok(Recorded::default());
    }
    let stamps: Vec<Uuid> = claims.iter().map(|c| c.0).collect();
    let shards: Vec<i16> = claims.iter().map(|c| c.1).collect();
    let minutes: Vec<DateTime<Utc>> = claims.iter().map(|c| c.2).collect();
    let fresh: HashSet<StagedId> = tx
        .query(
            "INSERT INTO usage_drains (stamp, shard, minute)
             SELECT s, h, m FROM unnest($1::uuid[], $2::int2[], $3::timestamptz[])
                  WITH ORDINALITY AS t(s, h, m, i) ORDER BY i
             ON CONFLICT DO NOTHING RETURNING stamp, shard, minute",
            &[&stamps, &shards, &minutes],
        )
        .await
        .map_err(DbError::op("claim staged buckets"))?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let apply: Vec<&Bucket> = entries
        .iter()
        .filter(|(id, _)| fresh.contains(id))
        .map(|(_, b)| b)
        .collect();
    let mut out = Recorded {
        applied: apply.len(),
        duplicate: entries.len() - apply.len(),
        dropped: 0,
    };
    if apply.is_empty() {
        return Ok(out);
    }
    let users: Vec<Uuid> = apply.iter().map(|b| b.user_id).collect();
    let minutes: Vec<DateTime<Utc>> = apply.iter().map(|b| b.minute).collect();
    let apps: Vec<&str> = apply.iter().map(|b| b.app.as_str()).collect();
    let types: Vec<&str> = apply.iter().map(|b| b.quota_type.as_str()).collect();
    let routes: Vec<&str> = apply.iter().map(|b| b.route.as_str()).collect();
    let amounts: Vec<i64> = apply.iter().map(|b| b.amount).collect();
    let calls: Vec<i64> = apply.iter().map(|b| b.calls).collect();
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] =
        [&users, &minutes, &apps, &types, &routes, &amounts, &calls];
    // Entries for a user, app or quota type that does not exist (deleted meanwhile, or a
    // misconfigured sidecar) are dropped, never allowed to block the drain.
    const KNOWN: &str = "
        FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::text[],
                    $6::int8[], $7::int8[])
             AS b(user_id, minute, app_id, quota_key, route, amount, calls)
        JOIN apps a ON a.id = b.app_id
        WHERE EXISTS (SELECT 1 FROM users u WHERE u.id = b.user_id)
          AND EXISTS (SELECT 1 FROM quota_types q WHERE q.app_id = b.app_id AND q.key = b.quota_key)
          AND length(b.route) BETWEEN 1 AND 600";
    let known: i64 = tx
        .query_one(&format!("SELECT count(*) {KNOWN}"), &params)
        .await
        .map_err(DbError::op("check usage entries"))?
        .get(0);
    out.dropped = (apply.len() as i64 - known).max(0) as u64;
    // Rows are written in key order, so two drainers never wait on each other in a cycle.
    tx.execute(
        &format!(
            "INSERT INTO usage_minutes (user_id, minute, app_id, quota_key, route, amount, calls)
             SELECT b.user_id, date_trunc('minute', b.minute), b.app_id, b.quota_key, b.route,
                    sum(b.amount), sum(b.calls)
             {KNOWN}
             GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
             ON CONFLICT (user_id, minute, app_id, quota_key, route) DO UPDATE
             SET amount = usage_minutes.amount + excluded.amount,
                 calls = usage_minutes.calls + excluded.calls"
        ),
        &params,
    )
    .await
    .map_err(DbError::op("record usage minutes"))?;
    tx.execute(
        &format!(
            "INSERT INTO usage_months (user_id, month, app_id, quota_key, route, amount, calls)
             SELECT b.user_id, date_trunc('month', b.minute, a.time_zone), b.app_id, b.quota_key,
                    b.route, sum(b.amount), sum(b.calls)
             {KNOWN}
             GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
             ON CONFLICT (user_id, month, app_id, quota_key, route) DO UPDATE
             SET amount = usage_months.amount + excluded.amount,
                 calls = usage_months.calls + excluded.calls"
        ),
        &params,
    )
    .await
    .map_err(DbError::op("record usage months"))?;
    Ok(out)
}

/// Where the drain resumes after an outage: every minute before this was drained for good.
pub async fn drain_cursor(
    client: &impl tokio_postgres::GenericClient,
) -> Result<Option<DateTime<Utc>>, DbError> {
    Ok(client
        .query_opt("SELECT drained FROM usage_drain_cursor", &[])
        .await
        .map_err(DbError::op("read drain cursor"))?
        .map(|r| r.get(0)))
}

/// Moves the drain's catch-up point forward (never back).
pub async fn advance_drain_cursor(
    client: &impl tokio_postgres::GenericClient,
    to: DateTime<Utc>,
) -> Result<(), DbError> {
    client
        .execute(
            "INSERT INTO usage_drain_cursor (drained) VALUES ($1)
             ON CONFLICT (id) DO UPDATE SET drained = GREATEST(usage_drain_cursor.drained, excluded.drained)",
            &[&to],
        )
        .await
        .map_err(DbError::op("advance drain cursor"))?;
    Ok(())
}

/// Deletes minute rows older than `minutes_before` and drain claims older than `stamps_before`,
/// in slices so no statement holds its locks for long; returns how many rows of each.
pub async fn prune(
    client: &impl tokio_postgres::GenericClient,
    minutes_before: DateTime<Utc>,
    stamps_before: DateTime<Utc>,
) -> Result<(u64, u64), DbError> {
    let mut minutes = 0;
    loop {
        let n = client
            .execute(
                "DELETE FROM usage_minutes WHERE ctid IN (
                     SELECT ctid FROM usage_minutes WHERE minute < $1 LIMIT 10000)",
                &[&minutes_before],
            )
            .await
            .map_err(DbError::op("prune usage minutes"))?;
        minutes += n;
        if n < 10000 {
            break;
        }
    }
    let stamps = client
        .execute(
            "DELETE FROM usage_drains WHERE drained_at < $1",
            &[&stamps_before],
        )
        .await
        .map_err(DbError::op("prune drain stamps"))?;
    Ok((minutes, stamps))
}

/// How usage is summed per period in `GET /v1/usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Minute,
    Hour,
    Day,
    Month,
}

impl Granularity {
    pub fn parse(s: &str) -> Option<Granularity> {
        Some(match s {
            "minute" => Granularity::Minute,
            "hour" => Granularity::Hour,
            "day" => Granularity::Day,
            "month" => Granularity::Month,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
            Granularity::Month => "month",
        }
    }
}

/// One period of usage as `GET /v1/usage` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub app: String,
    pub quota_type: String,
    pub route: String,
    pub period_start: DateTime<Utc>,
    pub amount: i64,
    pub calls: i64,
}

/// Keyset position: rows strictly before this in the page order.
pub type UsageKey = (DateTime<Utc>, String, String, String);

pub struct UsageQuery<'a> {
    pub user: Uuid,
    pub app: Option<&'a str>,
    pub quota_type: Option<&'a str>,
    pub route: Option<&'a str>,
    pub granularity: Granularity,
    /// Counted minutes (months, for month granularity) start at or after `from` and before `to`.
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub before: Option<UsageKey>,
    pub limit: i64,
}

/// A page of a user's usage, newest period first (then app, type and route, descending), with
/// periods in each app's time zone. Periods whose calls were all refunded are left out.
pub async fn page(
    client: &impl tokio_postgres::GenericClient,
    q: &UsageQuery<'_>,
) -> Result<Vec<UsageRow>, DbError> {
    let (table, time, period, slack) = match q.granularity {
        Granularity::Month => ("usage_months", "m.month", "m.month", "0 days"),
        g => (
            "usage_minutes",
            "m.minute",
            match g {
                Granularity::Minute => "m.minute",
                Granularity::Hour => "date_trunc('hour', m.minute, a.time_zone)",
                _ => "date_trunc('day', m.minute, a.time_zone)",
            },
            // A period starting before the cursor may hold minutes up to this much after it.
            match g {
                Granularity::Minute => "1 minute",
                Granularity::Hour => "1 hour",
                _ => "26 hours",
            },
        ),
    };
    let (b_period, b_app, b_type, b_route) = match &q.before {
        Some((p, a, t, r)) => (
            Some(*p),
            Some(a.as_str()),
            Some(t.as_str()),
            Some(r.as_str()),
        ),
        None => (None, None, None, None),
    };
    let sql = format!(
        "SELECT app_id, quota_key, route, period, amount, calls FROM (
             SELECT m.app_id, m.quota_key, m.route, {period} AS period,
                    sum(m.amount)::int8 AS amount, sum(m.calls)::int8 AS calls
             FROM {table} m JOIN apps a ON a.id = m.app_id
             WHERE m.user_id = $1
               AND ($2::text IS NULL OR m.app_id = $2)
               AND ($3::text IS NULL OR m.quota_key = $3)
               AND ($4::text IS NULL OR m.route = $4)
               AND ($5::timestamptz IS NULL OR {time} >= $5)
               AND ($6::timestamptz IS NULL OR {time} < $6)
               AND ($7::timestamptz IS NULL OR {time} < $7 + interval '{slack}')
             GROUP BY 1, 2, 3, 4
             HAVING sum(m.amount) <> 0 OR sum(m.calls) <> 0
         ) t
         WHERE ($7::timestamptz IS NULL OR (t.period, t.app_id, t.quota_key, t.route) < ($7, $8, $9, $10))
         ORDER BY t.period DESC, t.app_id DESC, t.quota_key DESC, t.route DESC
         LIMIT $11"
    );
    let rows = client
        .query(
            &sql,
            &[
                &q.user,
                &q.app,
                &q.quota_type,
                &q.route,
                &q.from,
                &q.to,
                &b_period,
                &b_app,
                &b_type,
                &b_route,
                &q.limit,
            ],
        )
        .await
        .map_err(DbError::op("read usage"))?;
    Ok(rows
        .iter()
        .map(|r| UsageRow {
            app: r.get(0),
            quota_type: r.get(1),
            route: r.get(2),
            period_start: r.get(3),
            amount: r.get(4),
            calls: r.get(5),
        })
        .collect())
}

/// What the ledger says a user used of one quota type in the window starting at `window_start`,
/// less what admin resets in that window cleared: the basis for rebuilding a lost counter.
/// Windows of a month or longer are summed from the month rows (kept for good), shorter ones
/// from the minute rows.
pub async fn used_in_window(
    client: &impl tokio_postgres::GenericClient,
    user: Uuid,
    app: &str,
    quota_type: &str,
    window: Window,
    window_start: DateTime<Utc>,
) -> Result<i64, DbError> {
    let (table, time) = match window {
        Window::Month | Window::Year | Window::Lifetime => ("usage_months", "month"),
        Window::Minute | Window::Hour | Window::Day => ("usage_minutes", "minute"),
    };
    let row = client
        .query_one(
            &format!(
                "SELECT ((SELECT COALESCE(sum(amount), 0) FROM {table}
                          WHERE user_id = $1 AND app_id = $2 AND quota_key = $3 AND {time} >= $4)
                       - (SELECT COALESCE(sum(r.cleared), 0) FROM quota_resets r
                          JOIN quota_types qt ON qt.id = r.quota_type_id
                          WHERE r.user_id = $1 AND qt.app_id = $2 AND qt.key = $3
                            AND r.window_start = $4))::int8"
            ),
            &[&user, &app, &quota_type, &window_start],
        )
        .await
        .map_err(DbError::op("sum usage"))?;
    Ok(row.get::<_, i64>(0).max(0))
}
