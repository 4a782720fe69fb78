//! The outbox of changes that must reach Redis. A change and its outbox row commit together;
//! `sync::Syncer` applies and deletes the rows, so a crash between PostgreSQL and Redis heals.

use super::DbError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// A user's status, role, token cut-off (and limits).
    User,
    /// One API key.
    ApiKey,
    /// Every subscriber of a plan (the plan was edited).
    Plan,
}

impl Topic {
    fn as_str(self) -> &'static str {
        match self {
            Topic::User => "user",
            Topic::ApiKey => "api_key",
            Topic::Plan => "plan",
        }
    }

    fn parse(s: &str) -> Option<Topic> {
        match s {
            "user" => Some(Topic::User),
            "api_key" => Some(Topic::ApiKey),
            "plan" => Some(Topic::Plan),
            _ => None,
        }
    }
}

pub async fn enqueue(
    client: &impl tokio_postgres::GenericClient,
    topic: Topic,
    subject: &str,
) -> Result<(), DbError> {
    client
        .execute(
            "INSERT INTO sync_outbox (topic, subject) VALUES ($1, $2)",
            &[&topic.as_str(), &subject],
        )
        .await
        .map_err(DbError::op("enqueue outbox"))?;
    Ok(())
}

/// Locks up to `limit` pending rows that no other replica holds.
pub async fn take(
    tx: &tokio_postgres::Transaction<'_>,
    limit: i64,
) -> Result<Vec<(i64, Topic, String)>, DbError> {
    let rows = tx
        .query(
            "SELECT id, topic, subject FROM sync_outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
            &[&limit],
        )
        .await
        .map_err(DbError::op("take outbox"))?;
    Ok(rows
        .iter()
        .filter_map(|r| Some((r.get(0), Topic::parse(r.get(1))?, r.get(2))))
        .collect())
}

pub async fn done(tx: &tokio_postgres::Transaction<'_>, ids: &[i64]) -> Result<(), DbError> {
    tx.execute("DELETE FROM sync_outbox WHERE id = ANY($1)", &[&ids])
        .await
        .map_err(DbError::op("delete outbox"))?;
    Ok(())
}
