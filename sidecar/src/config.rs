//! The sidecar's one `Config`, built as defaults < file (`--config`) < environment < flags and
//! validated as a whole. Every environment variable name is a constant here.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use tollgate_common::config::{ConfigError, Env, LogFormat, Millis, Problems, Secret};

pub const ENV_LISTEN: &str = "TOLLGATE_SIDECAR_LISTEN";
/// Where the app is when neither the configuration nor the routes file says.
pub const DEFAULT_UPSTREAM: &str = "http://127.0.0.1:4200";
pub const ENV_ADMIN_LISTEN: &str = "TOLLGATE_SIDECAR_ADMIN_LISTEN";
pub const ENV_UPSTREAM: &str = "TOLLGATE_SIDECAR_UPSTREAM";
pub const ENV_ROUTES: &str = "TOLLGATE_SIDECAR_ROUTES";
pub const ENV_CONTROL_PLANE_URL: &str = "TOLLGATE_SIDECAR_CONTROL_PLANE_URL";
pub const ENV_REDIS_URL: &str = "REDIS_URL";
pub const ENV_REDIS_CA_FILE: &str = "TOLLGATE_REDIS_CA_FILE";
pub const ENV_CONTROL_PLANE_INTERNAL_URL: &str = "TOLLGATE_SIDECAR_CONTROL_PLANE_INTERNAL_URL";
pub const ENV_REDIS_PREFIX: &str = "TOLLGATE_REDIS_PREFIX";
pub const ENV_REDIS_TIMEOUT: &str = "TOLLGATE_SIDECAR_REDIS_TIMEOUT";
pub const ENV_FAIL_MODE: &str = "TOLLGATE_SIDECAR_FAIL_MODE";
pub const ENV_JWT_ISSUER: &str = "TOLLGATE_JWT_ISSUER";
pub const ENV_JWT_AUDIENCE: &str = "TOLLGATE_JWT_AUDIENCE";
pub const ENV_TRUSTED_JWKS: &str = "TOLLGATE_SIDECAR_TRUSTED_JWKS";
pub const ENV_UPSTREAM_TIMEOUT: &str = "TOLLGATE_SIDECAR_UPSTREAM_TIMEOUT";
pub const ENV_CONNECT_TIMEOUT: &str = "TOLLGATE_SIDECAR_CONNECT_TIMEOUT";
pub const ENV_HEADER_TIMEOUT: &str = "TOLLGATE_SIDECAR_HEADER_READ_TIMEOUT";
pub const ENV_MAX_HEADER_BYTES: &str = "TOLLGATE_SIDECAR_MAX_HEADER_BYTES";
pub const ENV_MAX_CONNECTIONS: &str = "TOLLGATE_SIDECAR_MAX_CONNECTIONS";
pub const ENV_MAX_IN_FLIGHT: &str = "TOLLGATE_SIDECAR_MAX_IN_FLIGHT";
pub const ENV_IDLE_TIMEOUT: &str = "TOLLGATE_SIDECAR_IDLE_TIMEOUT";
pub const ENV_BODY_READ_TIMEOUT: &str = "TOLLGATE_SIDECAR_BODY_READ_TIMEOUT";
pub const ENV_LOG_FORMAT: &str = "TOLLGATE_LOG_FORMAT";
pub const ENV_LOG: &str = "TOLLGATE_LOG";
pub const ENV_SHUTDOWN_GRACE: &str = "TOLLGATE_SHUTDOWN_GRACE";
pub const ENV_SETTLE_WINDOW: &str = "TOLLGATE_SIDECAR_SETTLE_WINDOW";
pub const ENV_REFUSAL_CACHE_TTL: &str = "TOLLGATE_SIDECAR_REFUSAL_CACHE_TTL";
pub const ENV_REDIS_MAX_IN_FLIGHT: &str = "TOLLGATE_SIDECAR_REDIS_MAX_IN_FLIGHT";
pub const ENV_UPLOAD_RESERVE_STEP: &str = "TOLLGATE_SIDECAR_UPLOAD_RESERVE_STEP";

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
}

/// One source of settings; every field optional, later layers win.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub upstream: Option<String>,
    pub routes: Option<PathBuf>,
    pub control_plane_url: Option<String>,
    pub control_plane_internal_url: Option<String>,
    pub redis_url: Option<Secret>,
    pub redis_ca_file: Option<PathBuf>,
    pub redis_prefix: Option<String>,
    pub redis_timeout: Option<Millis>,
    pub fail_mode: Option<FailMode>,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    pub trusted_jwks: Option<Vec<String>>,
    pub upstream_timeout: Option<Millis>,
    pub connect_timeout: Option<Millis>,
    pub header_read_timeout: Option<Millis>,
    pub max_header_bytes: Option<usize>,
    pub max_connections: Option<usize>,
    pub max_in_flight: Option<usize>,
    pub idle_timeout: Option<Millis>,
    pub body_read_timeout: Option<Millis>,
    pub log_format: Option<LogFormat>,
    pub log: Option<String>,
    pub shutdown_grace: Option<Millis>,
    pub settle_window: Option<Millis>,
    pub refusal_cache_ttl: Option<Millis>,
    pub redis_max_in_flight: Option<usize>,
    pub upload_reserve_step: Option<u64>,
}

impl Layer {
    fn from_env(env: &dyn Env, problems: &mut Problems) -> Layer {
        Layer {
            listen: env.var(ENV_LISTEN),
            admin_listen: env.var(ENV_ADMIN_LISTEN),
            upstream: env.var(ENV_UPSTREAM),
            routes: env.var(ENV_ROUTES).map(PathBuf::from),
            control_plane_url: env.var(ENV_CONTROL_PLANE_URL),
            control_plane_internal_url: env.var(ENV_CONTROL_PLANE_INTERNAL_URL),
            redis_url: env.var(ENV_REDIS_URL).map(Secret::new),
            redis_ca_file: env.var(ENV_REDIS_CA_FILE).map(PathBuf::from),
            redis_prefix: env.var(ENV_REDIS_PREFIX),
            redis_timeout: problems.env(env, ENV_REDIS_TIMEOUT),
            fail_mode: problems.env(env, ENV_FAIL_MODE),
            jwt_issuer: env.var(ENV_JWT_ISSUER),
            jwt_audience: env.var(ENV_JWT_AUDIENCE),
            trusted_jwks: env.var(ENV_TRUSTED_JWKS).map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            }),
            upstream_timeout: problems.env(env, ENV_UPSTREAM_TIMEOUT),
            connect_timeout: problems.env(env, ENV_CONNECT_TIMEOUT),
            header_read_timeout: problems.env(env, ENV_HEADER_TIMEOUT),
            max_header_bytes: problems.env(env, ENV_MAX_HEADER_BYTES),
            max_connections: problems.env(env, ENV_MAX_CONNECTIONS),
            max_in_flight: problems.env(env, ENV_MAX_IN_FLIGHT),
            idle_timeout: problems.env(env, ENV_IDLE_TIMEOUT),
            body_read_timeout: problems.env(env, ENV_BODY_READ_TIMEOUT),
            log_format: problems.env(env, ENV_LOG_FORMAT),
            log: env.var(ENV_LOG),
            shutdown_grace: problems.env(env, ENV_SHUTDOWN_GRACE),
            settle_window: problems.env(env, ENV_SETTLE_WINDOW),
            refusal_cache_ttl: problems.env(env, ENV_REFUSAL_CACHE_TTL),
            redis_max_in_flight: problems.env(env, ENV_REDIS_MAX_IN_FLIGHT),
            upload_reserve_step: problems.env(env, ENV_UPLOAD_RESERVE_STEP),
        }
    }

    /// `other`'s settings win over `self`'s.
    fn overlay(self, other: Layer) -> Layer {
        Layer {
            listen: other.listen.or(self.listen),
            admin_listen: other.admin_listen.or(self.admin_listen),
            upstream: other.upstream.or(self.upstream),
            routes: other.routes.or(self.routes),
            control_plane_url: other.control_plane_url.or(self.control_plane_url),
            control_plane_internal_url: other
                .control_plane_internal_url
                .or(self.control_plane_internal_url),
            redis_url: other.redis_url.or(self.redis_url),
            redis_ca_file: other.redis_ca_file.or(self.redis_ca_file),
            redis_prefix: other.redis_prefix.or(self.redis_prefix),
            redis_timeout: other.redis_timeout.or(self.redis_timeout),
            fail_mode: other.fail_mode.or(self.fail_mode),
            jwt_issuer: other.jwt_issuer.or(self.jwt_issuer),
            jwt_audience: other.jwt_audience.or(self.jwt_audience),
            trusted_jwks: other.trusted_jwks.or(self.trusted_jwks),
            upstream_timeout: other.upstream_timeout.or(self.upstream_timeout),
            connect_timeout: other.connect_timeout.or(self.connect_timeout),
            header_read_timeout: other.header_read_timeout.or(self.header_read_timeout),
            max_header_bytes: other.max_header_bytes.or(self.max_header_bytes),
            max_connections: other.max_connections.or(self.max_connections),
            max_in_flight: other.max_in_flight.or(self.max_in_flight),
            idle_timeout: other.idle_timeout.or(self.idle_timeout),
            body_read_timeout: other.body_read_timeout.or(self.body_read_timeout),
            log_format: other.log_format.or(self.log_format),
            log: other.log.or(self.log),
            shutdown_grace: other.shutdown_grace.or(self.shutdown_grace),
            settle_window: other.settle_window.or(self.settle_window),
            refusal_cache_ttl: other.refusal_cache_ttl.or(self.refusal_cache_ttl),
            redis_max_in_flight: other.redis_max_in_flight.or(self.redis_max_in_flight),
            upload_reserve_step: other.upload_reserve_step.or(self.upload_reserve_step),
        }
    }
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

fn addr(problems: &mut Problems, setting: &str, value: Option<&str>, default: &str) -> SocketAddr {
    let value = value.unwrap_or(default);
    value.parse().unwrap_or_else(|e| {
        problems.push(setting, format_args!("{value:?} is not an address: {e}"));
        default.parse().expect("defaults are valid addresses")
    })
}

impl Config {
    pub fn load(
        file: Option<(&str, &str)>,
        env: &dyn Env,
        flags: Layer,
    ) -> Result<Config, ConfigError> {
        let mut problems = Problems::default();
        let file_layer = match file {
            Some((origin, text)) => problems.file::<Layer>(origin, text),
            None => Layer::default(),
        };
        let env_layer = Layer::from_env(env, &mut problems);
        let layer = file_layer.overlay(env_layer).overlay(flags);
        let config = Config::validate(layer, &mut problems);
        problems.finish(config)
    }

    fn validate(layer: Layer, problems: &mut Problems) -> Config {
        let listen = addr(problems, "listen", layer.listen.as_deref(), "0.0.0.0:8080");
        let admin_listen = addr(
            problems,
            "admin_listen",
            layer.admin_listen.as_deref(),
            "127.0.0.1:9090",
        );
        if listen == admin_listen {
            problems.push(
                "admin_listen",
                "must differ from listen: ops endpoints never share the proxy listener",
            );
        }
        if let Some(upstream) = &layer.upstream {
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
        let routes = layer.routes.unwrap_or_else(|| {
            problems.push(
                "routes",
                format_args!("the routes file is required (--routes or {ENV_ROUTES})"),
            );
            PathBuf::new()
        });
        let control_plane_url = layer
            .control_plane_url
            .unwrap_or_else(|| "http://127.0.0.1:9001".to_owned())
            .trim_end_matches('/')
            .to_owned();
        check_http_url(problems, "control_plane_url", &control_plane_url);
        let control_plane_internal_url = layer
            .control_plane_internal_url
            .unwrap_or_else(|| "http://127.0.0.1:9002".to_owned())
            .trim_end_matches('/')
            .to_owned();
        check_http_url(
            problems,
            "control_plane_internal_url",
            &control_plane_internal_url,
        );
        let trusted_jwks = layer.trusted_jwks.unwrap_or_default();
        for url in &trusted_jwks {
            check_http_url(problems, "trusted_jwks", url);
        }
        let redis_url = layer
            .redis_url
            .unwrap_or_else(|| Secret::new("redis://127.0.0.1:6379"));
        if let Err(e) = fred::types::config::Config::from_url(redis_url.expose()) {
            problems.push(
                "redis_url",
                format_args!("not a Redis URL: {}", e.details()),
            );
        }
        if let Some(path) = &layer.redis_ca_file
            && let Err(e) = read_roots(path)
        {
            problems.push("redis_ca_file", e);
        }
        let redis_prefix = tollgate_common::config::redis_prefix(problems, layer.redis_prefix);
        let redis_timeout = layer.redis_timeout.unwrap_or(Millis(250));
        if !(1..=10_000).contains(&redis_timeout.0) {
            problems.push(
                "redis_timeout",
                format_args!("{}ms is outside 1ms..=10s", redis_timeout.0),
            );
        }
        let max_header_bytes = layer.max_header_bytes.unwrap_or(16 << 10);
        if !(1024..=1 << 20).contains(&max_header_bytes) {
            problems.push(
                "max_header_bytes",
                format_args!("{max_header_bytes} is outside 1024..=1048576"),
            );
        }
        let log_filter = tollgate_common::config::log_filter(problems, layer.log);
        let refusal_cache_ttl = layer.refusal_cache_ttl.unwrap_or(Millis(300_000));
        if refusal_cache_ttl.0 > 3_600_000 {
            problems.push(
                "refusal_cache_ttl",
                "must be at most 1h (0 turns the cache off)",
            );
        }
        let redis_max_in_flight = layer.redis_max_in_flight.unwrap_or(128);
        if !(1..=100_000).contains(&redis_max_in_flight) {
            problems.push("redis_max_in_flight", "must be between 1 and 100000");
        }
        let upload_reserve_step = layer.upload_reserve_step.unwrap_or(1 << 20);
        if !(1..=1 << 40).contains(&upload_reserve_step) {
            problems.push("upload_reserve_step", "must be between 1 and 2^40 bytes");
        }
        let settle_window = layer.settle_window.unwrap_or(Millis(10_000));
        if !(1_000..=300_000).contains(&settle_window.0) {
            problems.push(
                "settle_window",
                format_args!("{}ms is outside 1s..=5m", settle_window.0),
            );
        }
        let max_connections = layer.max_connections.unwrap_or(4096);
        let max_in_flight = layer.max_in_flight.unwrap_or(1024);
        for (setting, value) in [
            ("max_connections", max_connections),
            ("max_in_flight", max_in_flight),
        ] {
            if !(1..=1_000_000).contains(&value) {
                problems.push(setting, format_args!("{value} is outside 1..=1000000"));
            }
        }
        for (setting, value) in [
            ("upstream_timeout", layer.upstream_timeout),
            ("connect_timeout", layer.connect_timeout),
            ("header_read_timeout", layer.header_read_timeout),
            ("idle_timeout", layer.idle_timeout),
            ("body_read_timeout", layer.body_read_timeout),
        ] {
            if value.is_some_and(|m| m.0 == 0) {
                problems.push(setting, "must be greater than zero");
            }
        }
        Config {
            listen,
            admin_listen,
            upstream: layer.upstream,
            routes,
            control_plane_url,
            control_plane_internal_url,
            redis_url,
            redis_ca_file: layer.redis_ca_file,
            redis_prefix,
            redis_timeout,
            fail_mode: layer.fail_mode.unwrap_or(FailMode::Closed),
            jwt_issuer: layer.jwt_issuer.unwrap_or_else(|| "tollgate".to_owned()),
            jwt_audience: layer.jwt_audience.unwrap_or_else(|| "tollgate".to_owned()),
            trusted_jwks,
            upstream_timeout: layer.upstream_timeout.unwrap_or(Millis(60_000)),
            connect_timeout: layer.connect_timeout.unwrap_or(Millis(2_000)),
            header_read_timeout: layer.header_read_timeout.unwrap_or(Millis(10_000)),
            max_header_bytes,
            max_connections,
            max_in_flight,
            idle_timeout: layer.idle_timeout.unwrap_or(Millis(75_000)),
            body_read_timeout: layer.body_read_timeout.unwrap_or(Millis(30_000)),
            log_format: layer.log_format.unwrap_or(LogFormat::Json),
            log_filter,
            shutdown_grace: layer.shutdown_grace.unwrap_or(Millis(20_000)),
            settle_window,
            refusal_cache_ttl,
            redis_max_in_flight,
            upload_reserve_step,
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
}
