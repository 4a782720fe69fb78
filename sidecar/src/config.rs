//! The sidecar's one `Config`, built as defaults < file (`--config`) < environment < flags and
//! validated as a whole. Every setting is declared once, in `settings!` below: its type, default,
//! environment variable, flag and help, from which `--help` and docs/configuration.md are made.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use tollgate_common::config::{ConfigError, Env, List, LogFormat, Millis, Problems, Secret, addr};

/// Where the app is when neither the configuration nor the routes file says.
pub const DEFAULT_UPSTREAM: &str = "http://127.0.0.1:4200";

tollgate_common::settings! {
    /// proxy listener
    listen: String = "0.0.0.0:8080", env ENV_LISTEN = "TOLLGATE_SIDECAR_LISTEN", flag "--listen";
    /// `/healthz`, `/readyz`, `/metrics`; must differ from `listen`
    admin_listen: String = "127.0.0.1:9090",
        env ENV_ADMIN_LISTEN = "TOLLGATE_SIDECAR_ADMIN_LISTEN", flag "--admin-listen";
    /// the app's base URL; `http://` only (the app runs beside the sidecar)
    upstream: String, unset "the routes file's `upstream`, else `http://127.0.0.1:4200`",
        env ENV_UPSTREAM = "TOLLGATE_SIDECAR_UPSTREAM", flag "--upstream";
    /// the routes file (YAML)
    routes: PathBuf, unset "required", env ENV_ROUTES = "TOLLGATE_SIDECAR_ROUTES", flag "--routes";
    /// the control plane's public listener: the JWKS
    control_plane_url: String = "http://127.0.0.1:9001",
        env ENV_CONTROL_PLANE_URL = "TOLLGATE_SIDECAR_CONTROL_PLANE_URL";
    /// the control plane's internal listener (`internal_listen`): the limits-refill call
    control_plane_internal_url: String = "http://127.0.0.1:9002",
        env ENV_CONTROL_PLANE_INTERNAL_URL = "TOLLGATE_SIDECAR_CONTROL_PLANE_INTERNAL_URL";
    /// Redis or Redis Cluster (`redis-cluster://host:port`); `rediss://` for TLS (secret)
    redis_url: Secret = "redis://127.0.0.1:6379",
        env ENV_REDIS_URL = "REDIS_URL", flag "--redis-url";
    /// PEM file of the CA(s) that sign Redis's certificate
    redis_ca_file: PathBuf, unset "public web roots",
        env ENV_REDIS_CA_FILE = "TOLLGATE_REDIS_CA_FILE";
    /// prefix of every Redis key; must match the control plane's
    redis_prefix: String = "tg", env ENV_REDIS_PREFIX = "TOLLGATE_REDIS_PREFIX";
    /// deadline of one Redis call on the request path, counted once the call is on its way (at
    /// most `redis_max_in_flight` are); a Redis that is down fails at once, so this only bounds a
    /// Redis that is up but not answering (paused, failing over); 1ms..10s
    redis_timeout: Millis = "250ms", env ENV_REDIS_TIMEOUT = "TOLLGATE_SIDECAR_REDIS_TIMEOUT";
    /// `closed`: 503 when Redis is down; `open`: forward uncounted
    fail_mode: FailMode = "closed", env ENV_FAIL_MODE = "TOLLGATE_SIDECAR_FAIL_MODE";
    /// expected `iss` of access tokens; the control plane's `jwt_issuer`
    jwt_issuer: String = "tollgate", env ENV_JWT_ISSUER = "TOLLGATE_JWT_ISSUER";
    /// expected `aud` of access tokens; the control plane's `jwt_audience`
    jwt_audience: String = "tollgate", env ENV_JWT_AUDIENCE = "TOLLGATE_JWT_AUDIENCE";
    /// other issuers' JWKS URLs (comma-separated in the environment, an array in the file)
    trusted_jwks: List, unset "none", env ENV_TRUSTED_JWKS = "TOLLGATE_SIDECAR_TRUSTED_JWKS";
    /// until the app's response head arrives (then `504 upstream_timeout`)
    upstream_timeout: Millis = "60s",
        env ENV_UPSTREAM_TIMEOUT = "TOLLGATE_SIDECAR_UPSTREAM_TIMEOUT";
    /// connecting to the app
    connect_timeout: Millis = "2s", env ENV_CONNECT_TIMEOUT = "TOLLGATE_SIDECAR_CONNECT_TIMEOUT";
    /// a request head must be complete this long after its first byte (HTTP/2: a request must
    /// start this long after a frame on a connection with no stream open), else the connection is
    /// cut
    header_read_timeout: Millis = "10s",
        env ENV_HEADER_TIMEOUT = "TOLLGATE_SIDECAR_HEADER_READ_TIMEOUT";
    /// largest request head (1024–1048576)
    max_header_bytes: usize = "16384",
        env ENV_MAX_HEADER_BYTES = "TOLLGATE_SIDECAR_MAX_HEADER_BYTES";
    /// open client connections on the proxy listener; at the cap the idlest is closed to make
    /// room, else `503 overloaded` with `Retry-After: 1`. Lowered at start if the open-files limit
    /// cannot hold it beside `max_in_flight` upstream connections and the admin listener
    max_connections: usize = "4096",
        env ENV_MAX_CONNECTIONS = "TOLLGATE_SIDECAR_MAX_CONNECTIONS";
    /// requests in progress on the proxy listener; past it `503 overloaded` with `Retry-After: 1`
    /// at once (nothing counted)
    max_in_flight: usize = "1024", env ENV_MAX_IN_FLIGHT = "TOLLGATE_SIDECAR_MAX_IN_FLIGHT";
    /// a connection with no request in progress is closed (HTTP/2: GOAWAY); longer than the usual
    /// 60 s upstream keep-alive of ingress controllers and load balancers, so they close first
    idle_timeout: Millis = "75s", env ENV_IDLE_TIMEOUT = "TOLLGATE_SIDECAR_IDLE_TIMEOUT";
    /// the longest a request body may stall between two pieces
    body_read_timeout: Millis = "30s",
        env ENV_BODY_READ_TIMEOUT = "TOLLGATE_SIDECAR_BODY_READ_TIMEOUT";
    /// `json` (one object per line) or `text`
    log_format: LogFormat = "json", env ENV_LOG_FORMAT = "TOLLGATE_LOG_FORMAT";
    /// a tracing filter, e.g. `info,tollgate_sidecar=debug`
    log: String = "info", env ENV_LOG = "TOLLGATE_LOG";
    /// after SIGTERM, how long the requests already received may take; then the process exits
    shutdown_grace: Millis = "20s", env ENV_SHUTDOWN_GRACE = "TOLLGATE_SHUTDOWN_GRACE";
    /// how long an admitted request's settle marker stays in Redis after the app answered (it is
    /// renewed while the app is still answering): the time a refund has to land. Redis holds one
    /// marker per metered request for about this long (plus the app's answer time), about 270
    /// bytes of Redis memory each with its key's entries (bench/RESULTS.md, scale run), so about
    /// requests/s × this × 270 bytes: 270 MB at 100,000 requests/s with 10s; 1s..5m
    settle_window: Millis = "10s", env ENV_SETTLE_WINDOW = "TOLLGATE_SIDECAR_SETTLE_WINDOW";
    /// the longest a refusal (quota exhausted, rate limited, disabled, unknown user) is answered
    /// from the sidecar's memory without Redis; entries end earlier when the window resets,
    /// `Retry-After` passes, or the control plane announces a change (grant, plan, reset, enable,
    /// reconcile) or a refund frees quota; `0s` turns the cache off; at most `1h`
    refusal_cache_ttl: Millis = "5m",
        env ENV_REFUSAL_CACHE_TTL = "TOLLGATE_SIDECAR_REFUSAL_CACHE_TTL";
    /// Redis script calls of the request path in flight at once; more wait their turn before
    /// their `redis_timeout` starts, so a burst does not turn into `503`s while Redis is healthy
    redis_max_in_flight: usize = "128",
        env ENV_REDIS_MAX_IN_FLIGHT = "TOLLGATE_SIDECAR_REDIS_MAX_IN_FLIGHT";
    /// bytes of quota an upload without `Content-Length` reserves at a time as it streams (so
    /// concurrent uploads of one user share what remains)
    upload_reserve_step: u64 = "1048576",
        env ENV_UPLOAD_RESERVE_STEP = "TOLLGATE_SIDECAR_UPLOAD_RESERVE_STEP";
    /// threads that serve requests, each a single-threaded runtime with its own Redis connection
    /// and app connection pool, the client connections dealt to them in turn: `0` one per core
    /// the process may use (its CPU limit counts); at most 256
    worker_threads: usize = "0", env ENV_WORKER_THREADS = "TOLLGATE_SIDECAR_WORKER_THREADS";
    /// the access log (docs/access-log.md) writes the line of one admitted call answered 2xx/3xx
    /// in this many; every other line (refused, failed, refunded, public) is always written; `1`
    /// (every call, the audit trail) unless the log store cannot take the volume; 1..1000000
    access_log_every: u64 = "1", env ENV_ACCESS_LOG_EVERY = "TOLLGATE_SIDECAR_ACCESS_LOG_EVERY";
}

/// What to do when Redis cannot be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Refuse every authenticated request with `503 quota_backend_unavailable` (the default).
    Closed,
    /// Forward them uncounted, and log and count each one.
    Open,
}

impl std::str::FromStr for FailMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "closed" => Ok(FailMode::Closed),
            "open" => Ok(FailMode::Open),
            other => Err(format!("expected closed or open, got {other:?}")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The proxy listener; clients reach the app through it.
    pub listen: SocketAddr,
    /// `/healthz`, `/readyz` and `/metrics`; never on the proxy listener.
    pub admin_listen: SocketAddr,
    /// The app, e.g. `http://127.0.0.1:4200`. Overrides the routes file's `upstream`.
    pub upstream: Option<String>,
    /// The routes file (YAML).
    pub routes: PathBuf,
    /// The control plane's public listener: the JWKS.
    pub control_plane_url: String,
    /// The control plane's internal listener: the limits-refill call.
    pub control_plane_internal_url: String,
    pub redis_url: Secret,
    /// PEM file of the CA(s) that sign Redis's certificate (`rediss://`); default: the public
    /// web roots.
    pub redis_ca_file: Option<PathBuf>,
    pub redis_prefix: String,
    /// Deadline for one Redis call on the request path.
    pub redis_timeout: Millis,
    pub fail_mode: FailMode,
    pub jwt_issuer: String,
    pub jwt_audience: String,
    /// JWKS URLs of other issuers whose tokens are accepted too.
    pub trusted_jwks: Vec<String>,
    pub upstream_timeout: Millis,
    pub connect_timeout: Millis,
    /// From a request head's first byte until it is complete.
    pub header_read_timeout: Millis,
    pub max_header_bytes: usize,
    /// Client connections on the proxy listener; at the cap the idlest is closed, else 503.
    pub max_connections: usize,
    /// Requests in progress on the proxy listener; past it `503 overloaded` at once.
    pub max_in_flight: usize,
    /// A connection with no request in progress is closed after this.
    pub idle_timeout: Millis,
    /// The longest a request body may stall between two pieces.
    pub body_read_timeout: Millis,
    pub log_format: LogFormat,
    pub log_filter: String,
    pub shutdown_grace: Millis,
    /// How long an admitted request's settle marker lives in Redis after the app has answered
    /// (renewed while it is answering): the time a refund has to land.
    pub settle_window: Millis,
    /// The longest a refusal is answered from the local cache (`refusals::Refusals`).
    pub refusal_cache_ttl: Millis,
    /// Redis calls of the request path in flight at once; more wait their turn before their
    /// `redis_timeout` starts, so the timeout measures Redis, not a queue in front of it.
    pub redis_max_in_flight: usize,
    /// Bytes of quota an upload of unknown length reserves at a time as it streams.
    pub upload_reserve_step: u64,
    /// Workers serving requests (a current-thread runtime each): 0 = one per core.
    pub worker_threads: usize,
    /// One access line per this many successful admitted calls (1: every call).
    pub access_log_every: u64,
}

fn check_http_url(problems: &mut Problems, setting: &str, url: &str) {
    if !(url.starts_with("http://") || url.starts_with("https://"))
        || url.parse::<http::Uri>().is_err()
    {
        problems.push(
            setting,
            format_args!("{url:?} is not an http:// or https:// URL"),
        );
    }
}

/// Reads a PEM file of CA certificates.
pub fn read_roots(path: &std::path::Path) -> Result<rustls::RootCertStore, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    tollgate_common::tls::roots_from_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))
}

impl Config {
    pub fn load(
        file: Option<(&str, &str)>,
        env: &dyn Env,
        flags: Layer,
    ) -> Result<Config, ConfigError> {
        let mut problems = Problems::default();
        let settings = Layer::merge(file, env, flags, &mut problems);
        let config = Config::validate(settings, &mut problems);
        problems.finish(config)
    }

    fn validate(s: Settings, problems: &mut Problems) -> Config {
        let listen = addr(problems, "listen", &s.listen);
        let admin_listen = addr(problems, "admin_listen", &s.admin_listen);
        if listen.is_some() && listen == admin_listen {
            problems.push(
                "admin_listen",
                "must differ from listen: ops endpoints never share the proxy listener",
            );
        }
        if let Some(upstream) = &s.upstream {
            // The app listens next to the sidecar, on plain HTTP; there is no TLS client here.
            if !upstream.starts_with("http://") || upstream.parse::<http::Uri>().is_err() {
                problems.push(
                    "upstream",
                    format_args!(
                        "{upstream:?} must be an http:// URL (the app beside the sidecar)"
                    ),
                );
            }
        }
        let routes = s.routes.unwrap_or_else(|| {
            problems.push(
                "routes",
                format_args!("the routes file is required (--routes or {ENV_ROUTES})"),
            );
            PathBuf::new()
        });
        let control_plane_url = s.control_plane_url.trim_end_matches('/').to_owned();
        check_http_url(problems, "control_plane_url", &control_plane_url);
        let control_plane_internal_url = s
            .control_plane_internal_url
            .trim_end_matches('/')
            .to_owned();
        check_http_url(
            problems,
            "control_plane_internal_url",
            &control_plane_internal_url,
        );
        let trusted_jwks = s.trusted_jwks.unwrap_or_default().0;
        for url in &trusted_jwks {
            check_http_url(problems, "trusted_jwks", url);
        }
        if let Err(e) = fred::types::config::Config::from_url(s.redis_url.expose()) {
            problems.push(
                "redis_url",
                format_args!("not a Redis URL: {}", e.details()),
            );
        }
        if let Some(path) = &s.redis_ca_file
            && let Err(e) = read_roots(path)
        {
            problems.push("redis_ca_file", e);
        }
        let redis_prefix = tollgate_common::config::redis_prefix(problems, s.redis_prefix);
        if !(1..=10_000).contains(&s.redis_timeout.0) {
            problems.push(
                "redis_timeout",
                format_args!("{}ms is outside 1ms..=10s", s.redis_timeout.0),
            );
        }
        if !(1024..=1 << 20).contains(&s.max_header_bytes) {
            problems.push(
                "max_header_bytes",
                format_args!("{} is outside 1024..=1048576", s.max_header_bytes),
            );
        }
        let log_filter = tollgate_common::config::log_filter(problems, s.log);
        if s.refusal_cache_ttl.0 > 3_600_000 {
            problems.push(
                "refusal_cache_ttl",
                "must be at most 1h (0 turns the cache off)",
            );
        }
        if !(1..=100_000).contains(&s.redis_max_in_flight) {
            problems.push("redis_max_in_flight", "must be between 1 and 100000");
        }
        if !(1..=1_000_000).contains(&s.access_log_every) {
            problems.push(
                "access_log_every",
                "must be between 1 (every call) and 1000000",
            );
        }
        if s.worker_threads > 256 {
            problems.push("worker_threads", "must be between 0 (one per core) and 256");
        }
        if !(1..=1 << 40).contains(&s.upload_reserve_step) {
            problems.push("upload_reserve_step", "must be between 1 and 2^40 bytes");
        }
        if !(1_000..=300_000).contains(&s.settle_window.0) {
            problems.push(
                "settle_window",
                format_args!("{}ms is outside 1s..=5m", s.settle_window.0),
            );
        }
        for (setting, value) in [
            ("max_connections", s.max_connections),
            ("max_in_flight", s.max_in_flight),
        ] {
            if !(1..=1_000_000).contains(&value) {
                problems.push(setting, format_args!("{value} is outside 1..=1000000"));
            }
        }
        for (setting, value) in [
            ("upstream_timeout", s.upstream_timeout),
            ("connect_timeout", s.connect_timeout),
            ("header_read_timeout", s.header_read_timeout),
            ("idle_timeout", s.idle_timeout),
            ("body_read_timeout", s.body_read_timeout),
        ] {
            if value.0 == 0 {
                problems.push(setting, "must be greater than zero");
            }
        }
        // Stands in for an address that does not parse: a problem, so the `Config` is discarded.
        let unbound = SocketAddr::from(([0, 0, 0, 0], 0));
        Config {
            listen: listen.unwrap_or(unbound),
            admin_listen: admin_listen.unwrap_or(unbound),
            upstream: s.upstream,
            routes,
            control_plane_url,
            control_plane_internal_url,
            redis_url: s.redis_url,
            redis_ca_file: s.redis_ca_file,
            redis_prefix,
            redis_timeout: s.redis_timeout,
            fail_mode: s.fail_mode,
            jwt_issuer: s.jwt_issuer,
            jwt_audience: s.jwt_audience,
            trusted_jwks,
            upstream_timeout: s.upstream_timeout,
            connect_timeout: s.connect_timeout,
            header_read_timeout: s.header_read_timeout,
            max_header_bytes: s.max_header_bytes,
            max_connections: s.max_connections,
            max_in_flight: s.max_in_flight,
            idle_timeout: s.idle_timeout,
            body_read_timeout: s.body_read_timeout,
            log_format: s.log_format,
            log_filter,
            shutdown_grace: s.shutdown_grace,
            settle_window: s.settle_window,
            refusal_cache_ttl: s.refusal_cache_ttl,
            redis_max_in_flight: s.redis_max_in_flight,
            upload_reserve_step: s.upload_reserve_step,
            worker_threads: s.worker_threads,
            access_log_every: s.access_log_every,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        tollgate_common::config::env_of(pairs)
    }

    #[test]
    fn defaults_with_a_routes_file_are_valid() {
        let config = Config::load(None, &env(&[(ENV_ROUTES, "routes.yaml")]), Layer::default())
            .expect("valid");
        assert_eq!(config.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(config.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(config.fail_mode, FailMode::Closed);
        assert_eq!(config.redis_timeout, Millis(250));
    }

    #[test]
    fn every_problem_is_reported() {
        let err = Config::load(
            Some((
                "sidecar.toml",
                "fail_mode = \"sometimes\"\nlisten = \"127.0.0.1:9090\"\n",
            )),
            &env(&[
                (ENV_REDIS_TIMEOUT, "fast"),
                (ENV_UPSTREAM, "ftp://app"),
                (ENV_TRUSTED_JWKS, "https://idp.example.com/jwks.json, nope"),
            ]),
            Layer::default(),
        )
        .expect_err("invalid");
        let lines = err.0;
        for start in [
            "sidecar.toml: fail_mode:",
            "admin_listen:",
            "routes:",
            ENV_REDIS_TIMEOUT,
            "upstream:",
            "trusted_jwks:",
        ] {
            assert_eq!(
                lines.iter().filter(|l| l.starts_with(start)).count(),
                1,
                "{start}: {lines:?}"
            );
        }
        assert_eq!(lines.len(), 6, "{lines:?}");
    }

    #[test]
    fn internal_url_and_redis_ca_file() {
        let config =
            Config::load(None, &env(&[(ENV_ROUTES, "r.yaml")]), Layer::default()).expect("valid");
        assert_eq!(config.control_plane_internal_url, "http://127.0.0.1:9002");
        let err = Config::load(
            None,
            &env(&[
                (ENV_ROUTES, "r.yaml"),
                (ENV_CONTROL_PLANE_INTERNAL_URL, "nope"),
                (ENV_REDIS_CA_FILE, "/nonexistent/ca.pem"),
            ]),
            Layer::default(),
        )
        .expect_err("invalid");
        assert_eq!(err.0.len(), 2, "{:?}", err.0);
        assert!(
            err.0[0].starts_with("control_plane_internal_url:"),
            "{:?}",
            err.0
        );
        assert!(err.0[1].starts_with("redis_ca_file:"), "{:?}", err.0);
    }

    #[test]
    fn trusted_jwks_list_from_env() {
        let config = Config::load(
            None,
            &env(&[
                (ENV_ROUTES, "r.yaml"),
                (
                    ENV_TRUSTED_JWKS,
                    "https://a.example/jwks, https://b.example/jwks",
                ),
            ]),
            Layer::default(),
        )
        .expect("valid");
        assert_eq!(config.trusted_jwks.len(), 2);
    }

    #[test]
    fn settings_are_documented_as_declared() {
        tollgate_testkit::check_settings("tollgate-sidecar", SETTINGS);
    }

    #[test]
    fn flags_override_the_environment() {
        use clap::{Args, FromArgMatches};
        let command = Flags::augment_args(clap::Command::new("tollgate-sidecar"));
        let matches = command
            .try_get_matches_from(["tollgate-sidecar", "--listen", "127.0.0.1:7001"])
            .expect("flags parse");
        let flags = Flags::from_arg_matches(&matches).expect("flags");
        let config = Config::load(
            None,
            &env(&[(ENV_ROUTES, "r.yaml"), (ENV_LISTEN, "127.0.0.1:7000")]),
            flags.0,
        )
        .expect("valid");
        assert_eq!(config.listen.to_string(), "127.0.0.1:7001");
    }
}
