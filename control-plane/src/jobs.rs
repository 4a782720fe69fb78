//! Scheduled work: paid periods that end put their users back on `free` (a job, not a lazy
//! check, so the sidecars' limits change when the period ends, not at the next API call), and
//! `Idempotency-Key` records past their 24 hours are deleted.

use std::time::Duration;

use deadpool_postgres::Pool;

use crate::app::{Change, Reach, Tx};
use crate::db::{self, DbError};
use crate::sync::Syncer;

/// Lapses due subscriptions; returns how many users went back to `free`.
pub async fn lapse_once(db: &Pool, sync: &Syncer) -> Result<usize, DbError> {
    let mut client = db.get().await?;
    let mut tx = Tx::begin(&mut client, sync).await?;
    let users = db::subscriptions::lapse(&tx).await?;
    for user in &users {
        tx.announce(Change::User(*user), Reach::Soon).await?;
    }
    tx.commit().await?;
    if !users.is_empty() {
        tracing::info!(users = users.len(), "paid periods ended; back on free");
    }
    Ok(users.len())
}

/// Lapses subscriptions every `every`, and prunes expired idempotency keys once an hour.
pub async fn run(db: Pool, sync: Syncer, every: Duration) {
    let mut last_prune: Option<tokio::time::Instant> = None;
    loop {
        if let Err(e) = lapse_once(&db, &sync).await {
            tracing::warn!(error = %e, "lapsing subscriptions failed; will retry");
        }
        if last_prune.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600)) {
            match prune_idempotency_keys(&db).await {
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
pub async fn prune_idempotency_keys(db: &Pool) -> Result<u64, DbError> {
    let client = db.get().await?;
    db::idempotency::prune(&**client).await
}
