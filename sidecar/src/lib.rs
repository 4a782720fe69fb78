//! Tollgate's sidecar as a library: `main.rs` parses the command line and calls [`run`]; tests
//! start the same `run` on `127.0.0.1:0`.

pub mod admin;
pub mod auth;
pub mod config;
pub mod metrics;
pub mod proxy;
pub mod routes;
pub mod store;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use fred::prelude::*;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tollgate_common::keys::{CacheEvent, Keys};
use uuid::Uuid;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::routes::{Routes, RoutesError};
use crate::store::Store;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the sidecar sends or forwards.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;
pub type HttpClient = hyper_util::client::legacy::Client<HttpConnector, Body>;

pub fn full_body(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

pub fn empty_body() -> Body {
    Empty::new().map_err(|e| match e {}).boxed_unsync()
}

/// The routes and the upstream they apply to; swapped whole on reload.
pub struct Table {
    pub routes: Routes,
    /// The app's base URL, without a trailing slash.
    pub upstream: String,
}

/// Everything the request path shares.
pub struct Shared {
    pub config: Arc<Config>,
    pub table: ArcSwap<Table>,
    pub auth: Authenticator,
    pub store: Store,
    pub upstream: HttpClient,
    pub metrics: Arc<Metrics>,
    pub refill: Refill,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("routes file: {0}")]
    Routes(#[from] RoutesError),
    #[error("routes file {path}: {source}")]
    RoutesIo {
        path: String,
        source: std::io::Error,
    },
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads and validates the routes file; the configured upstream wins over the file's.
pub fn load_table(config: &Config) -> Result<Table, RunError> {
    let origin = config.routes.display().to_string();
    let text = std::fs::read_to_string(&config.routes).map_err(|source| RunError::RoutesIo {
        path: origin.clone(),
        source,
    })?;
    let routes = Routes::parse(&origin, &text)?;
    // The configured upstream wins, then the routes file's, then the contract's default.
    let upstream = config
        .upstream
        .clone()
        .or_else(|| routes.upstream.clone())
        .unwrap_or_else(|| config::DEFAULT_UPSTREAM.to_owned());
    Ok(Table {
        routes,
        upstream: upstream.trim_end_matches('/').to_owned(),
    })
}

/// Asks the control plane to write a user's limits into Redis, once for all the requests that
/// are waiting for the same user.
pub struct Refill {
    http: HttpClient,
    control_plane_url: String,
    inflight: std::sync::Mutex<HashMap<Uuid, Arc<tokio::sync::OnceCell<bool>>>>,
}

impl Refill {
    pub async fn ensure(&self, user: Uuid) -> bool {
        let cell = {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(user).or_default().clone()
        };
        let ok = *cell.get_or_init(|| self.call(user)).await;
        let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&user).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            map.remove(&user);
        }
        ok
    }

    async fn call(&self, user: Uuid) -> bool {
        let url = format!("{}/internal/users/{user}/sync", self.control_plane_url);
        let Ok(request) = http::Request::post(url).body(empty_body()) else {
            return false;
        };
        match tokio::time::timeout(proxy::REFILL_TIMEOUT, self.http.request(request)).await {
            Ok(Ok(response)) if response.status().is_success() => true,
            Ok(Ok(response)) => {
                tracing::warn!(%user, status = %response.status(), "control plane refused to write the user's limits");
                false
            }
            Ok(Err(e)) => {
                tracing::warn!(%user, error = %e, "control plane unreachable for the user's limits");
                false
            }
            Err(_) => {
                tracing::warn!(%user, "control plane timed out writing the user's limits");
                false
            }
        }
    }
}

fn redis_builder(config: &Config) -> Result<Builder, fred::error::Error> {
    tollgate_common::tls::install_provider();
    let mut redis_config = fred::types::config::Config::from_url(config.redis_url.expose())?;
    if redis_config.uses_tls() {
        // rediss://: the configured CAs (default: the public web roots), host name checked.
        let roots = match &config.redis_ca_file {
            Some(path) => Some(
                config::read_roots(path)
                    .map_err(|e| fred::error::Error::new(fred::error::ErrorKind::Tls, e))?,
            ),
            None => None,
        };
        let tls = tollgate_common::tls::client_config(roots, tollgate_common::tls::Verify::Full)
            .map_err(|e| fred::error::Error::new(fred::error::ErrorKind::Tls, e))?;
        redis_config.tls = Some(fred::types::config::TlsConnector::from(tls).into());
    }
    let timeout = config.redis_timeout.duration();
    let mut builder = Builder::from_config(redis_config);
    builder
        .with_config(|c| {
            // A command while disconnected fails at once (then fail-open/closed applies) instead
            // of queueing behind the reconnect.
            c.fail_fast = true;
        })
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(1);
            c.internal_command_timeout = Duration::from_secs(2);
            c.max_command_attempts = 1;
            c.tcp = TcpConfig {
                nodelay: Some(true),
                ..TcpConfig::default()
            };
        })
        .with_performance_config(|p| {
            p.default_command_timeout = timeout;
        })
        .set_policy(ReconnectPolicy::new_constant(0, 200));
    Ok(builder)
}

/// Serves the proxy on `listener` and the ops endpoints on `admin` until `shutdown` completes,
/// then lets in-flight requests finish (and settle) for up to `shutdown_grace`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let table = load_table(&config)?;
    let keys = Keys::new(config.redis_prefix.clone());
    let builder = redis_builder(&config)?;
    let redis = builder.build()?;
    let _connection = redis.connect();
    if tokio::time::timeout(Duration::from_secs(2), redis.wait_for_connect())
        .await
        .is_err()
    {
        tracing::warn!("redis is not reachable yet; retrying in the background");
    }
    let store = Store::new(redis.clone(), keys.clone());
    if let Err(e) = store.load_scripts().await {
        tracing::warn!(error = %e, "could not preload the lua scripts; they load on first use");
    }
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(config.connect_timeout.duration()));
    connector.set_nodelay(true);
    let http: HttpClient = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(connector);
    let metrics = Arc::new(Metrics::new());
    metrics.register_routes(table.routes.labels());
    let auth = Authenticator::new(
        http.clone(),
        &config.control_plane_url,
        config.trusted_jwks.clone(),
        config.jwt_issuer.clone(),
        config.jwt_audience.clone(),
        store.clone(),
        metrics.clone(),
    );
    let shared = Arc::new(Shared {
        table: ArcSwap::from_pointee(table),
        auth,
        store,
        upstream: http.clone(),
        metrics,
        refill: Refill {
            http,
            control_plane_url: config.control_plane_internal_url.clone(),
            inflight: std::sync::Mutex::new(HashMap::new()),
        },
        config: Arc::new(config),
    });

    let tasks = [
        tokio::spawn(refresh_jwks(shared.clone())),
        tokio::spawn(listen_for_invalidations(shared.clone(), keys)),
        tokio::spawn(reload_on_sighup(shared.clone())),
    ];
    tracing::info!(
        proxy = %listener.local_addr()?,
        admin = %admin.local_addr()?,
        "sidecar listening"
    );

    let graceful = GracefulShutdown::new();
    let admin_task = tokio::spawn(admin::serve(shared.clone(), admin));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                serve_connection(&shared, &graceful, stream, peer);
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: no new connections; letting in-flight requests finish");
    let grace = shared.config.shutdown_grace.duration();
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace expired with requests still in flight");
    }
    admin_task.abort();
    for task in tasks {
        task.abort();
    }
    let _ = redis.quit().await;
    Ok(())
}

fn serve_connection(
    shared: &Arc<Shared>,
    graceful: &GracefulShutdown,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let config = &shared.config;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout.duration())
        .max_buf_size(config.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(config.max_header_bytes as u32);
    let shared = shared.clone();
    let service = service_fn(move |request| {
        let shared = shared.clone();
        async move { Ok::<_, std::convert::Infallible>(proxy::handle(shared, request, peer).await) }
    });
    let connection = builder
        .serve_connection(TokioIo::new(stream), service)
        .into_owned();
    let connection = graceful.watch(connection);
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, %peer, "connection ended with an error");
        }
    });
}

async fn refresh_jwks(shared: Arc<Shared>) {
    loop {
        let wait = match shared.auth.refresh_jwks().await {
            Ok(()) => Duration::from_secs(300),
            Err(e) => {
                tracing::warn!(error = %e, "jwks fetch failed");
                if shared.auth.jwks_loaded() {
                    Duration::from_secs(30)
                } else {
                    Duration::from_secs(1)
                }
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Drops revoked API keys from the caches the moment the control plane announces them.
async fn listen_for_invalidations(shared: Arc<Shared>, keys: Keys) {
    let subscriber = match redis_builder(&shared.config).and_then(|b| b.build_subscriber_client()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the redis subscriber");
            return;
        }
    };
    let _connection = subscriber.connect();
    let _resubscribe = subscriber.manage_subscriptions();
    let mut messages = subscriber.message_rx();
    let mut reconnects = subscriber.reconnect_rx();
    loop {
        match subscriber.subscribe(keys.events_channel()).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to cache invalidations yet");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    loop {
        tokio::select! {
            message = messages.recv() => {
                let Ok(message) = message else {
                    // Lagged: we may have missed invalidations.
                    shared.auth.forget_all_keys();
                    continue;
                };
                let Some(text) = message.value.as_str() else { continue };
                match CacheEvent::parse(&text) {
                    Some(CacheEvent::ApiKey(hex)) => shared.auth.forget_key(&hex),
                    Some(CacheEvent::User(_)) | None => {}
                }
            }
            reconnected = reconnects.recv() => {
                if reconnected.is_ok() {
                    // Invalidations sent while we were away are lost: start the key cache afresh.
                    shared.auth.forget_all_keys();
                }
            }
        }
    }
}

async fn reload_on_sighup(shared: Arc<Shared>) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        return;
    };
    while hangups.recv().await.is_some() {
        match load_table(&shared.config) {
            Ok(table) => {
                shared.metrics.register_routes(table.routes.labels());
                shared.table.store(Arc::new(table));
                tracing::info!("routes file reloaded");
            }
            Err(e) => {
                for line in e.to_string().lines() {
                    tracing::error!(
                        problem = line,
                        "routes file refused; keeping the previous routes"
                    );
                }
            }
        }
    }
}
