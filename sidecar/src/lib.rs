//! Tollgate's sidecar as a library: `main.rs` parses the command line and calls [`run`]; tests
//! start the same `run` on `127.0.0.1:0`.

pub mod admin;
pub mod auth;
pub mod config;
pub mod metrics;
pub mod proxy;
pub mod refunds;
pub mod refusals;
pub mod routes;
pub mod store;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use fred::prelude::*;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tollgate_common::keys::{CacheEvent, Keys};
use tollgate_serve::Limits;
use uuid::Uuid;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::routes::{Routes, RoutesError};
use crate::store::Store;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A client's request body: hyper's, failing once it stalls past `body_read_timeout`.
pub use tollgate_serve::RequestBody;
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
    /// The current quota windows in the app's time zone.
    pub windows: tollgate_common::window::BoundsCache,
}

/// Everything the request path uses. Each worker (a current-thread runtime, one per core by
/// default) has its own: its own Redis connection and pool of app connections; the rest is one
/// for all of them.
pub struct Shared {
    pub config: Arc<Config>,
    pub table: Arc<ArcSwap<Table>>,
    pub auth: Arc<Authenticator>,
    /// This worker's Redis connection.
    pub store: Store,
    /// This worker's connections to the app.
    pub upstream: HttpClient,
    pub metrics: Arc<Metrics>,
    pub refill: Arc<Refill>,
    /// Users just refused, answered without Redis until the refusal can have changed.
    pub refusals: Arc<refusals::Refusals>,
    /// Settles retried in the background after a Redis timeout.
    pub refunds: Arc<refunds::Refunds>,
    /// Work that must finish before the process exits: every request's task (proxy.rs) and
    /// anything else spawned here. Shutdown waits for it after the connections have closed.
    pub tasks: TaskTracker,
    /// Successful admitted calls this worker has answered: picks the access lines written
    /// when `access_log_every` is above 1.
    pub access_lines: std::sync::atomic::AtomicU64,
}

impl Shared {
    /// Another worker's view: everything shared, its own Redis connection and app pool.
    fn for_worker(&self, store: Store, upstream: HttpClient) -> Shared {
        Shared {
            config: self.config.clone(),
            table: self.table.clone(),
            auth: self.auth.clone(),
            store,
            upstream,
            metrics: self.metrics.clone(),
            refill: self.refill.clone(),
            refusals: self.refusals.clone(),
            refunds: self.refunds.clone(),
            tasks: self.tasks.clone(),
            access_lines: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

/// The extra runtimes of the proxy, one current-thread runtime on a thread of its own each (the
/// first worker is the runtime [`run`] is called on).
struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: CancellationToken,
}

impl Workers {
    fn start(extra: usize) -> std::io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut workers = Workers {
            handles: Vec::with_capacity(extra),
            threads: Vec::with_capacity(extra),
            stop: stop.clone(),
        };
        for n in 1..=extra {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            workers.handles.push(runtime.handle().clone());
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("tollgate-worker-{n}"))
                .spawn(move || runtime.block_on(stop.cancelled_owned()))?;
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// Stops the runtimes (whatever still runs there is dropped) and waits for their threads.
    async fn stop(mut self) {
        self.stop.cancel();
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

impl Drop for Workers {
    /// `run` returning early (an error) does not leave the threads behind.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// How many workers serve the proxy: `worker_threads`, or one per core when it is 0.
pub fn worker_count(config: &Config) -> usize {
    match config.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    }
}

/// Idle upstream connections kept per app host by each worker (descriptors reserved for them too).
const UPSTREAM_IDLE_POOL: usize = 256;
/// Descriptors kept for Redis, the JWKS and control-plane calls, the routes file and the like.
const OTHER_DESCRIPTORS: usize = 128;

/// The proxy listener's limits, from the configuration.
pub fn proxy_limits(config: &Config) -> Limits {
    Limits {
        max_connections: config.max_connections,
        max_in_flight: config.max_in_flight,
        idle_timeout: config.idle_timeout.duration(),
        header_read_timeout: config.header_read_timeout.duration(),
        body_read_timeout: config.body_read_timeout.duration(),
        max_header_bytes: config.max_header_bytes,
        // Bodies are metered against the byte quota instead (proxy.rs).
        max_body_bytes: None,
        grace: config.shutdown_grace.duration(),
    }
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
        windows: tollgate_common::window::BoundsCache::new(routes.time_zone),
        routes,
        upstream: upstream.trim_end_matches('/').to_owned(),
    })
}

/// What asking the control plane for a user's limits came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refilled {
    Written,
    /// The control plane has no such user (a valid token of a deleted user).
    NoSuchUser,
    Failed,
}

/// Asks the control plane to write a user's limits into Redis, once for all the requests that
/// are waiting for the same user.
pub struct Refill {
    http: HttpClient,
    control_plane_url: String,
    inflight: std::sync::Mutex<HashMap<Uuid, Arc<tokio::sync::OnceCell<Refilled>>>>,
}

impl Refill {
    pub async fn ensure(&self, user: Uuid) -> Refilled {
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

    async fn call(&self, user: Uuid) -> Refilled {
        let url = format!("{}/internal/users/{user}/sync", self.control_plane_url);
        let Ok(request) = http::Request::post(url).body(empty_body()) else {
            return Refilled::Failed;
        };
        match tokio::time::timeout(proxy::REFILL_TIMEOUT, self.http.request(request)).await {
            Ok(Ok(response)) if response.status().is_success() => Refilled::Written,
            Ok(Ok(response)) if response.status() == http::StatusCode::NOT_FOUND => {
                tracing::info!(%user, "the control plane has no such user");
                Refilled::NoSuchUser
            }
            Ok(Ok(response)) => {
                tracing::warn!(%user, status = %response.status(), "control plane refused to write the user's limits");
                Refilled::Failed
            }
            Ok(Err(e)) => {
                tracing::warn!(%user, error = %e, "control plane unreachable for the user's limits");
                Refilled::Failed
            }
            Err(_) => {
                tracing::warn!(%user, "control plane timed out writing the user's limits");
                Refilled::Failed
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
            // fred 10 always pipelines: concurrent decisions share the connection and are written
            // back to back without waiting for each other's answers, flushed every
            // `max_feed_count` frames or when the queue runs dry (so a lone request at low load
            // is not held back).
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
    let workers = Workers::start(worker_count(&config) - 1)?;
    // One Redis connection per worker, its connection task on that worker's runtime, so that a
    // decision's write and answer never leave the thread that serves the request.
    let mut redis = vec![builder.build()?];
    for _ in &workers.handles {
        redis.push(builder.build()?);
    }
    for (client, runtime) in redis.iter().zip(
        std::iter::once(tokio::runtime::Handle::current()).chain(workers.handles.iter().cloned()),
    ) {
        let _inside = runtime.enter();
        let _connection = client.connect();
    }
    for client in &redis {
        if tokio::time::timeout(Duration::from_secs(2), client.wait_for_connect())
            .await
            .is_err()
        {
            tracing::warn!("redis is not reachable yet; retrying in the background");
            break;
        }
    }
    let store =
        Store::new(redis[0].clone(), keys.clone()).with_max_in_flight(config.redis_max_in_flight);
    if let Err(e) = store.load_scripts().await {
        tracing::warn!(error = %e, "could not preload the lua scripts; they load on first use");
    }
    let http = upstream_client(&config);
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
        table: Arc::new(ArcSwap::from_pointee(table)),
        auth: Arc::new(auth),
        refusals: Arc::new(refusals::Refusals::new(
            100_000,
            config.refusal_cache_ttl.duration(),
        )),
        refunds: Arc::new(refunds::Refunds::new(store.clone(), metrics.clone())),
        store: store.clone(),
        upstream: http.clone(),
        metrics,
        refill: Arc::new(Refill {
            http,
            control_plane_url: config.control_plane_internal_url.clone(),
            inflight: std::sync::Mutex::new(HashMap::new()),
        }),
        config: Arc::new(config),
        tasks: TaskTracker::new(),
        access_lines: std::sync::atomic::AtomicU64::new(0),
    });
    let mut views = vec![(None, shared.clone())];
    for (client, runtime) in redis.iter().skip(1).zip(&workers.handles) {
        let mine = shared.for_worker(
            store.with_client(client.clone()),
            upstream_client(&shared.config),
        );
        views.push((Some(runtime.clone()), Arc::new(mine)));
    }
    let proxy_workers: Vec<_> = views
        .into_iter()
        .map(|(runtime, shared)| tollgate_serve::Worker {
            runtime,
            handler: move |request, peer| proxy::handle(shared.clone(), request, peer),
        })
        .collect();

    let tasks = [
        tokio::spawn(refresh_jwks(shared.clone())),
        tokio::spawn(listen_for_invalidations(shared.clone(), keys)),
        tokio::spawn(reload_on_sighup(shared.clone())),
    ];
    tracing::info!(
        proxy = %listener.local_addr()?,
        admin = %admin.local_addr()?,
        workers = workers.handles.len() + 1,
        "sidecar listening"
    );

    let mut limits = proxy_limits(&shared.config);
    if let Some(nofile) = tollgate_serve::fds::raise_nofile_limit() {
        let reserve = admin::limits().descriptors()
            + shared.config.max_in_flight
            // Each worker keeps a pool of its own.
            + UPSTREAM_IDLE_POOL * (workers.handles.len() + 1)
            + OTHER_DESCRIPTORS;
        tollgate_serve::fds::fit_connections("proxy", &mut limits, reserve, nofile);
    }
    // The admin listener has limits and a task of its own, so probes and scrapes are answered
    // whatever the proxy port suffers; it closes last.
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(tollgate_serve::serve(
        admin,
        "admin",
        admin::limits(),
        shared.metrics.serve.listener("admin"),
        {
            let shared = shared.clone();
            move |request, _peer| admin::handle(shared.clone(), request)
        },
        admin_stop.clone().cancelled_owned(),
    ));

    let stopped_at = Arc::new(std::sync::OnceLock::new());
    let shutdown = {
        let stopped_at = stopped_at.clone();
        async move {
            shutdown.await;
            let _ = stopped_at.set(Instant::now());
            tracing::info!("shutting down: no new connections; answering what was received");
        }
    };
    let proxy = tollgate_serve::serve_on(
        listener,
        "proxy",
        limits,
        shared.metrics.serve.listener("proxy"),
        proxy_workers,
        shutdown,
    )
    .await;
    let grace = shared.config.shutdown_grace.duration();
    let deadline = *stopped_at.get_or_init(Instant::now) + grace;
    drain(&shared, deadline).await;
    tracing::info!(cut = proxy.cut, "stopped");
    admin_stop.cancel();
    let _ = admin_task.await;
    for task in tasks {
        task.abort();
    }
    for client in &redis {
        let _ = client.quit().await;
    }
    workers.stop().await;
    Ok(())
}

/// A pool of connections to the app (one per worker: hyper runs each connection on the runtime
/// that opened it).
fn upstream_client(config: &Config) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(config.connect_timeout.duration()));
    connector.set_nodelay(true);
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(UPSTREAM_IDLE_POOL)
        .build(connector)
}

/// The last step of shutdown, once every connection has closed: waits, until `deadline`, for
/// the work in [`Shared::tasks`] (requests whose client went away, settles and refunds).
async fn drain(shared: &Shared, deadline: Instant) {
    shared.tasks.close();
    if tokio::time::timeout_at(deadline, shared.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            unfinished = shared.tasks.len(),
            "shutdown grace expired with request work unfinished"
        );
    }
    // Refunds still retrying get what is left of the grace.
    let left = shared
        .refunds
        .flush(deadline.saturating_duration_since(Instant::now()))
        .await;
    if left > 0 {
        tracing::error!(
            pending = left,
            "exiting with refunds that did not land: those calls stay charged"
        );
    }
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
                    shared.refusals.forget_all();
                    continue;
                };
                let Some(text) = message.value.as_str() else { continue };
                match CacheEvent::parse(&text) {
                    Some(CacheEvent::ApiKey(hex)) => shared.auth.forget_key(&hex),
                    Some(CacheEvent::User(user)) => shared.refusals.forget(user),
                    Some(CacheEvent::All) => {
                        shared.auth.forget_all_keys();
                        shared.refusals.forget_all();
                    }
                    None => {}
                }
            }
            reconnected = reconnects.recv() => {
                if reconnected.is_ok() {
                    // Invalidations sent while we were away are lost: start the caches afresh.
                    shared.auth.forget_all_keys();
                    shared.refusals.forget_all();
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
