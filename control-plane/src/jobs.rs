//! Scheduled work: paid periods that end put their users back on `free` (a job, not a lazy
//! check, so the sidecars' limits change when the period ends, not at the next API call), and
//! `Idempotency-Key` records past their 24 hours are deleted.

use std::time::Duration;

use crate::db::outbox::Topic;
use crate::db::{self, DbError};
use crate::sync::Syncer;

/// Lapses due subscriptions; returns how many users went back to `free`.
pub async fn lapse_once(sync: &Syncer) -> Result<usize, DbError> {
    let mut client = sync.db.get().await?;
    let tx = client
        .transaction()
        .await
        .map_err(DbError::op("begin lapse"))?;
    let users = db::subscriptions::lapse(&tx).await?;
    for user in &users {
        db::outbox::enqueue(&*tx, Topic::User, &user.to_string()).await?;
    }
    tx.commit().await.map_err(DbError::op("commit lapse"))?;
    if !users.is_empty() {
        tracing::info!(users = users.len(), "paid periods ended; back on free");
        sync.kick();
    }
    Ok(users.len())
}

/// Lapses subscriptions every `every`, and prunes expired idempotency keys once an hour.
pub async fn run(sync: Syncer, every: Duration) {
    let mut last_prune: Option<tokio::time::Instant> = None;
    loop {
        if let Err(e) = lapse_once(&sync).await {
            tracing::warn!(error = %e, "lapsing subscriptions failed; will retry");
        }
        if last_prune.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600)) {
            match prune_idempotency_keys(&sync).await {
                Ok(n) if n > 0 => tracing::info!(keys = n, "pruned expired idempotency keys"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "pruning idempotency keys failed; will retry"),
            }
            last_prune = Some(tokio::time::Instant::now());
        }
        tokio::time::sleep(every).await;
    }
}

/// Deletes `Idempotency-Key` records older than 24 hours; returns how many.
pub async fn prune_idempotency_keys(sync: &Syncer) -> Result<u64, DbError> {
    let client = sync.db.get().await?;
    db::idempotency::prune(&**client).await
}
