//! Tollgate's control plane as a library: `main.rs` parses the command line and calls in here;
//! tests start the same [`run`] on `127.0.0.1:0`.

pub mod auth;
pub mod config;
pub mod db;
pub mod domain;
pub mod http;
pub mod jobs;
pub mod ledger;
pub mod metrics;
pub mod payments;
pub mod redis;
pub mod sync;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use fred::interfaces::ClientLike;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::http::AppState;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Keys(#[from] auth::signing::KeyError),
    #[error(transparent)]
    Password(#[from] domain::password::PasswordError),
    #[error(transparent)]
    Payments(#[from] payments::PayError),
}

/// Serves the REST API on `listener` until `shutdown` completes, then lets in-flight requests
/// finish for up to `shutdown_grace`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let db = db::pool(config.database_url.expose(), config.db_pool_size)?;
    let redis = redis::client(config.redis_url.expose())?;
    // Connects in the background and keeps reconnecting; readiness reports the state.
    let _connection = redis.connect();
    if tokio::time::timeout(std::time::Duration::from_secs(2), redis.wait_for_connect())
        .await
        .is_err()
    {
        tracing::warn!("redis is not reachable yet; serving anyway and retrying in the background");
    }
    let grace = config.shutdown_grace.duration();
    let ring = auth::signing::KeyRing::load(&config.jwt, config.data_dir.as_deref())?;
    let tokens = auth::jwt::Tokens::new(
        Arc::new(ring),
        &config.jwt.issuer,
        &config.jwt.audience,
        (config.jwt.access_ttl.0 / 1000) as i64,
    );
    let keys = tollgate_common::keys::Keys::new(config.redis_prefix.clone());
    let sync = sync::Syncer::new(db.clone(), redis.clone(), keys.clone());
    let metrics = Arc::new(metrics::Metrics::new());
    let workers = [
        tokio::spawn(sync.clone().run(std::time::Duration::from_secs(600))),
        tokio::spawn(
            ledger::Drainer::new(
                db.clone(),
                redis.clone(),
                keys.clone(),
                metrics.clone(),
                ledger::DrainSettings {
                    close_grace: config.usage_close_grace.duration(),
                    lookback: config.usage_lookback.duration(),
                    minute_retention: config.usage_minute_retention.duration(),
                    ..ledger::DrainSettings::default()
                },
            )
            .run(),
        ),
        tokio::spawn(jobs::run(sync.clone(), std::time::Duration::from_secs(5))),
    ];
    let payments = payments::service::Payments::load(&config, sync.clone(), metrics.clone())?;
    let reconciler = tokio::spawn(
        payments
            .clone()
            .run_reconciler(std::time::Duration::from_secs(30)),
    );
    let state = AppState {
        hasher: auth::Hasher::new(config.hash_concurrency)?,
        throttle: auth::throttle::Throttle::new(keys, config.login.clone()),
        config: Arc::new(config),
        db,
        redis: redis.clone(),
        metrics,
        tokens,
        sync,
        payments,
    };
    let app = http::router(state).into_make_service_with_connect_info::<SocketAddr>();
    tracing::info!(addr = %listener.local_addr()?, "control plane listening");

    let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
    });
    let deadline = async move {
        let _ = stopping_rx.wait_for(|stopping| *stopping).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        served = server => served?,
        () = deadline => tracing::warn!("shutdown grace expired with requests still in flight"),
    }
    for worker in workers {
        worker.abort();
    }
    reconciler.abort();
    let _ = redis.quit().await;
    Ok(())
}
