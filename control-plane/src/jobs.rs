//! Scheduled work: paid periods that end put their users back on `free` (a job, not a lazy
//! check, so the sidecars' limits change when the period ends, not at the next API call).

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

pub async fn run_lapses(sync: Syncer, every: Duration) {
    loop {
        if let Err(e) = lapse_once(&sync).await {
            tracing::warn!(error = %e, "lapsing subscriptions failed; will retry");
        }
        tokio::time::sleep(every).await;
    }
}
