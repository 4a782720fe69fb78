//! All SQL lives under this module. Handlers and jobs call functions here; nothing else builds
//! queries.

pub mod api_keys;
pub mod audit;
pub mod catalog;
pub mod idempotency;
pub mod limits;
pub mod migrate;
pub mod orders;
pub mod outbox;
pub mod refresh;
pub mod seed;
pub mod subscriptions;
pub mod tls;
pub mod usage;
pub mod users;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

pub use deadpool_postgres::{Client, Transaction};

/// Errors from the database layer, with the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database {op}: {source}")]
    Query {
        op: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("{0}")]
    Invalid(String),
}

impl DbError {
    /// Wraps a driver error with the name of the operation, for `map_err`.
    pub fn op(op: &'static str) -> impl FnOnce(tokio_postgres::Error) -> DbError {
        move |source| DbError::Query { op, source }
    }

    /// The name of the unique constraint this error violated, if it is a unique violation.
    /// The one place that turns duplicates into a 409 asks this.
    pub fn unique_violation(&self) -> Option<&str> {
        match self {
            DbError::Query { source, .. } => {
                let db = source.as_db_error()?;
                (db.code() == &SqlState::UNIQUE_VIOLATION)
                    .then(|| db.constraint())
                    .flatten()
            }
            _ => None,
        }
    }

    /// Whether PostgreSQL refused text it cannot hold (NUL, invalid encoding): bad input that got
    /// past the edge checks, to be answered as such rather than as an internal error.
    pub fn bad_text(&self) -> bool {
        match self {
            DbError::Query { source, .. } => source.as_db_error().is_some_and(|db| {
                matches!(
                    *db.code(),
                    SqlState::CHARACTER_NOT_IN_REPERTOIRE | SqlState::UNTRANSLATABLE_CHARACTER
                )
            }),
            _ => false,
        }
    }

    /// The name of the CHECK constraint this error violated, if any.
    pub fn check_violation(&self) -> Option<&str> {
        match self {
            DbError::Query { source, .. } => {
                let db = source.as_db_error()?;
                (db.code() == &SqlState::CHECK_VIOLATION)
                    .then(|| db.constraint())
                    .flatten()
            }
            _ => None,
        }
    }
}

/// Builds the connection pool. Connections are made lazily, so a database that is down at
/// start-up shows as "not ready" instead of stopping the process. TLS as `database_url`'s
/// `sslmode` says ([`tls::DbTarget`]); `ca_file` unless the URL names `sslrootcert`.
pub fn pool(
    database_url: &str,
    max_size: usize,
    ca_file: Option<&std::path::Path>,
) -> Result<Pool, DbError> {
    let target = tls::DbTarget::parse(database_url)
        .map_err(|e| DbError::Invalid(format!("database_url: {e}")))?;
    let connector = target
        .connector(ca_file)
        .map_err(|e| DbError::Invalid(format!("database tls: {e}")))?;
    let config = ManagerConfig {
        // Verified: a connection PostgreSQL closed (restart, pg_terminate_backend, failover) is
        // noticed when it is taken from the pool, not by the request that uses it (a 500).
        recycling_method: RecyclingMethod::Verified,
    };
    let manager = match connector {
        Some(tls) => Manager::from_config(target.config, tls, config),
        None => Manager::from_config(target.config, NoTls, config),
    };
    Pool::builder(manager)
        .max_size(max_size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(std::time::Duration::from_secs(5)))
        .create_timeout(Some(std::time::Duration::from_secs(5)))
        .build()
        .map_err(|e| DbError::Invalid(format!("database pool: {e}")))
}

/// The readiness check's round trip (`/readyz`): the driver's own error, which the check reports.
pub async fn ping(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    client.simple_query("SELECT 1").await.map(drop)
}

/// Opens one dedicated connection (not from the pool), for work that holds session state such
/// as the migration lock.
pub async fn connect(database_url: &str) -> Result<tokio_postgres::Client, DbError> {
    connect_with_ca(database_url, None).await
}

/// [`connect`], trusting the CAs of `ca_file` unless the URL names `sslrootcert`.
pub async fn connect_with_ca(
    database_url: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<tokio_postgres::Client, DbError> {
    let target = tls::DbTarget::parse(database_url)
        .map_err(|e| DbError::Invalid(format!("database_url: {e}")))?;
    let connector = target
        .connector(ca_file)
        .map_err(|e| DbError::Invalid(format!("database tls: {e}")))?;
    let client = match connector {
        Some(tls) => {
            let (client, connection) = target
                .config
                .connect(tls)
                .await
                .map_err(DbError::op("connect"))?;
            spawn_connection(connection);
            client
        }
        None => {
            let (client, connection) = target
                .config
                .connect(NoTls)
                .await
                .map_err(DbError::op("connect"))?;
            spawn_connection(connection);
            client
        }
    };
    Ok(client)
}

fn spawn_connection<F>(connection: F)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "database connection closed");
        }
    });
}
