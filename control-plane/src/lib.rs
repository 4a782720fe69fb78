//! Tollgate's control plane as a library: `main.rs` parses the command line and calls in here;
//! tests start the same [`run`] on `127.0.0.1:0`.

pub mod app;
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
    #[error("cannot listen on {addr} (internal_listen): {source}")]
    InternalListen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Keys(#[from] auth::signing::KeyError),
    #[error(transparent)]
    Password(#[from] domain::password::PasswordError),
    #[error(transparent)]
    Payments(#[from] payments::PayError),
}

/// Descriptors kept for Redis, the payment gateways' HTTP clients, key files and the like.
const OTHER_DESCRIPTORS: usize = 128;

/// The REST listener's limits, from the configuration.
pub fn api_limits(config: &Config) -> tollgate_serve::Limits {
    let l = &config.limits;
    tollgate_serve::Limits {
        max_connections: l.max_connections,
        max_in_flight: l.max_in_flight,
        idle_timeout: l.idle_timeout.duration(),
        header_read_timeout: l.header_read_timeout.duration(),
        body_read_timeout: l.body_read_timeout.duration(),
        max_header_bytes: 16 << 10,
        // Announced bodies above the limit are refused before a byte of them is read.
        max_body_bytes: Some(config.body_limit as u64),
        grace: config.shutdown_grace.duration(),
    }
}

/// Serves `router` on `listener` with `limits` (caps, timeouts, the graceful shutdown of
/// tollgate-serve) until `shutdown` completes and the requests already received are answered.
/// Handlers see the client's address as axum's `ConnectInfo<SocketAddr>`. One call per listener.
pub async fn serve_router(
    listener: TcpListener,
    name: &str,
    limits: tollgate_serve::Limits,
    metrics: tollgate_serve::ListenerMetrics,
    router: axum::Router,
    shutdown: impl Future<Output = ()>,
) -> tollgate_serve::Stopped {
    use tower::ServiceExt;
    let handler = move |mut request: axum::http::Request<tollgate_serve::RequestBody>,
                        peer: SocketAddr| {
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        let router = router.clone();
        async move {
            match router.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        }
    };
    tollgate_serve::serve(listener, name, limits, metrics, handler, shutdown).await
}

/// Serves the REST API on `listener` and the sidecars' `/internal/` calls on
/// `internal_listen` until `shutdown` completes, then lets in-flight requests finish for up to
/// `shutdown_grace`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let addr = config.internal_listen;
    let internal = TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::InternalListen { addr, source })?;
    run_with_internal(config, listener, internal, shutdown).await
}

/// [`run`] with the internal listener already bound (tests bind both on port 0).
pub async fn run_with_internal(
    config: Config,
    listener: TcpListener,
    internal: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let db = db::pool(
        config.database_url.expose(),
        config.db_pool_size,
        config.database_ca_file.as_deref(),
    )?;
    let redis = redis::client_with_ca(config.redis_url.expose(), config.redis_ca_file.as_deref())?;
    // Connects in the background and keeps reconnecting; readiness reports the state.
    let _connection = redis.connect();
    if tokio::time::timeout(std::time::Duration::from_secs(2), redis.wait_for_connect())
        .await
        .is_err()
    {
        tracing::warn!("redis is not reachable yet; serving anyway and retrying in the background");
    }
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
        tokio::spawn(jobs::run(
            db.clone(),
            sync.clone(),
            std::time::Duration::from_secs(5),
        )),
    ];
    let payments =
        payments::service::Payments::load(&config, db.clone(), sync.clone(), metrics.clone())?;
    let reconciler = tokio::spawn(
        payments
            .clone()
            .run_reconciler(std::time::Duration::from_secs(30)),
    );
    let state = AppState {
        hasher: auth::Hasher::new(config.hash_concurrency, config.hash_queue)?,
        throttle: auth::throttle::Throttle::new(keys, config.login.clone()),
        config: Arc::new(config),
        db,
        redis: redis.clone(),
        metrics,
        tokens,
        sync,
        payments,
    };
    let reserve = state.config.db_pool_size + OTHER_DESCRIPTORS;
    let mut limits = api_limits(&state.config);
    if let Some(nofile) = tollgate_serve::fds::raise_nofile_limit() {
        tollgate_serve::fds::fit_connections("api", &mut limits, reserve, nofile);
    }
    let metrics = state.metrics.serve.listener("api");
    let internal_metrics = state.metrics.serve.listener("internal");
    let internal_app = http::internal_router(state.clone());
    let app = http::router(state);
    tracing::info!(addr = %listener.local_addr()?, internal = %internal.local_addr()?, "control plane listening");
    // One shutdown for both listeners: the public one's signal stops the internal one too.
    let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
    let internal_limits = limits.clone();
    let internal_server = tokio::spawn(async move {
        serve_router(
            internal,
            "internal",
            internal_limits,
            internal_metrics,
            internal_app,
            async move {
                let _ = stopping_rx.wait_for(|stopping| *stopping).await;
            },
        )
        .await
    });
    let stopped = serve_router(listener, "api", limits, metrics, app, async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
    })
    .await;
    tracing::info!(cut = stopped.cut, "stopped");
    for worker in workers {
        worker.abort();
    }
    reconciler.abort();
    internal_server.abort();
    let _ = redis.quit().await;
    Ok(())
}
