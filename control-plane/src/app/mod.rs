//! The use cases of the control plane, one public function each: what a request, job or
//! reconciliation asks for, over `db/` (all SQL), `domain/` (pure rules), the syncer and the
//! gateways. HTTP handlers parse, call one of these and answer; nothing here knows about routes.
//!
//! Every write that the sidecars must see goes through one [`Tx`]: open the transaction, write,
//! [`announce`](Tx::announce) the change (its outbox row, in the same transaction), audit,
//! [`commit`](Tx::commit) — which then pushes what must reach Redis before the answer and wakes
//! the syncer for the rest.

pub mod accounts;
pub mod catalog;
pub mod keys;
pub mod metering;
pub mod orders;
pub mod payments;

use std::ops::Deref;
use std::sync::Arc;

use deadpool_postgres::Pool;
use uuid::Uuid;

use crate::auth::Hasher;
use crate::auth::jwt::Tokens;
use crate::auth::throttle::Throttle;
use crate::config::Config;
use crate::db::outbox::Topic;
use crate::db::{self, DbError};
use crate::http::error::AppError;
use crate::metrics::Metrics;
use crate::redis::RedisClient;
use crate::sync::Syncer;

/// Everything a use case may need; cheap to clone. The HTTP layer's state.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub db: Pool,
    pub redis: RedisClient,
    pub metrics: Arc<Metrics>,
    pub tokens: Tokens,
    pub hasher: Hasher,
    pub throttle: Throttle,
    pub sync: Syncer,
    pub payments: crate::payments::service::Payments,
}

/// A change the sidecars must see, as its outbox row names it.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    /// A user's status, role, token cut-off or limits.
    User(Uuid),
    /// One API key (created, revoked).
    ApiKey(Uuid),
    /// A plan, hence the limits of everyone on it.
    Plan(&'a str),
}

/// When the sidecars must see a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Through the outbox, within a moment: the syncer is woken at commit.
    Soon,
    /// Written into Redis after the commit and before the caller hears back, so that the answer
    /// means "in force everywhere"; should Redis fail then, the outbox row finishes the job.
    BeforeAnswer,
}

/// One transaction of a use case, owning the protocol that keeps Redis derived from
/// PostgreSQL: a change and its outbox row commit together, and the syncer is kicked after the
/// commit, never before.
pub struct Tx<'c> {
    tx: deadpool_postgres::Transaction<'c>,
    sync: &'c Syncer,
    /// Announced with `Reach::BeforeAnswer`: pushed into Redis right after the commit.
    push: Vec<(Topic, Uuid)>,
    announced: bool,
    after_commit: Vec<Box<dyn FnOnce() + Send + Sync>>,
}

impl<'c> Tx<'c> {
    pub async fn begin(client: &'c mut db::Client, sync: &'c Syncer) -> Result<Tx<'c>, DbError> {
        let tx = client
            .transaction()
            .await
            .map_err(DbError::op("begin transaction"))?;
        Ok(Tx {
            tx,
            sync,
            push: Vec::new(),
            announced: false,
            after_commit: Vec::new(),
        })
    }

    /// Enqueues the outbox row of `change` in this transaction.
    pub async fn announce(&mut self, change: Change<'_>, reach: Reach) -> Result<(), DbError> {
        let (topic, subject) = match change {
            Change::User(id) => (Topic::User, id.to_string()),
            Change::ApiKey(id) => (Topic::ApiKey, id.to_string()),
            Change::Plan(id) => (Topic::Plan, id.to_owned()),
        };
        db::outbox::enqueue(&*self.tx, topic, &subject).await?;
        self.announced = true;
        if reach == Reach::BeforeAnswer
            && let Change::User(id) | Change::ApiKey(id) = change
        {
            self.push.push((topic, id));
        }
        Ok(())
    }

    /// Records an administrative change in the audit log, in this transaction.
    pub async fn audit(
        &self,
        actor: Uuid,
        action: &str,
        target: (&str, &str),
        details: &serde_json::Value,
    ) -> Result<(), DbError> {
        db::audit::record(&*self.tx, actor, action, target.0, target.1, details).await
    }

    /// Runs `f` once the transaction has committed (a metric that must not count a rollback).
    pub fn after_commit(&mut self, f: impl FnOnce() + Send + Sync + 'static) {
        self.after_commit.push(Box::new(f));
    }

    /// Commits; then pushes the changes announced [`BeforeAnswer`](Reach::BeforeAnswer) and
    /// wakes the syncer if anything was announced.
    pub async fn commit(self) -> Result<(), DbError> {
        self.tx
            .commit()
            .await
            .map_err(DbError::op("commit transaction"))?;
        for f in self.after_commit {
            f();
        }
        for (topic, id) in self.push {
            let pushed = match topic {
                Topic::ApiKey => self.sync.api_key(id).await,
                _ => self.sync.user(id).await.map(drop),
            };
            if let Err(e) = pushed {
                tracing::warn!(error = %e, ?topic, "change not yet in redis; the outbox will retry");
            }
        }
        if self.announced {
            self.sync.kick();
        }
        Ok(())
    }
}

impl<'c> Deref for Tx<'c> {
    type Target = tokio_postgres::Transaction<'c>;

    fn deref(&self) -> &tokio_postgres::Transaction<'c> {
        &self.tx
    }
}

/// A use case's failure inside a transaction. Most undo everything; one that
/// [`keeps_writes`](Failure::keeps_writes) wants what it wrote committed all the same (an order
/// the gateway refused, closed so that it is never paid).
pub trait Failure: Into<AppError> {
    fn keeps_writes(&self) -> bool {
        false
    }
}

impl Failure for AppError {}

/// A pooled connection, with the pool's failure as a `DbError`.
pub async fn conn(state: &AppState) -> Result<db::Client, DbError> {
    Ok(state.db.get().await?)
}
