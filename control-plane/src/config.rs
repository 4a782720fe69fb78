//! The control plane's one `Config`, built as defaults < file (`--config`) < environment < flags
//! and validated as a whole. Every environment variable name is a constant here.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use tollgate_common::config::{ConfigError, Env, LogFormat, Millis, Problems, Secret};

pub const ENV_LISTEN: &str = "TOLLGATE_LISTEN";
pub const ENV_INTERNAL_LISTEN: &str = "TOLLGATE_INTERNAL_LISTEN";
pub const ENV_DATABASE_CA_FILE: &str = "TOLLGATE_DATABASE_CA_FILE";
pub const ENV_REDIS_CA_FILE: &str = "TOLLGATE_REDIS_CA_FILE";
pub const ENV_NOTIFY_BODY_LIMIT: &str = "TOLLGATE_NOTIFY_BODY_LIMIT_BYTES";
pub const ENV_NOTIFY_REJECTED_PER_MINUTE: &str = "TOLLGATE_NOTIFY_REJECTED_PER_MINUTE";
pub const ENV_HASH_QUEUE: &str = "TOLLGATE_HASH_QUEUE";
pub const ENV_LOGIN_BASE_DELAY: &str = "TOLLGATE_LOGIN_BASE_DELAY";
pub const ENV_LOGIN_MAX_DELAY: &str = "TOLLGATE_LOGIN_MAX_DELAY";
pub const ENV_LOGIN_WINDOW: &str = "TOLLGATE_LOGIN_WINDOW";
pub const ENV_DATABASE_URL: &str = "DATABASE_URL";
pub const ENV_REDIS_URL: &str = "REDIS_URL";
pub const ENV_REDIS_PREFIX: &str = "TOLLGATE_REDIS_PREFIX";
pub const ENV_PUBLIC_URL: &str = "TOLLGATE_PUBLIC_URL";
pub const ENV_DATA_DIR: &str = "TOLLGATE_DATA_DIR";
pub const ENV_BODY_LIMIT: &str = "TOLLGATE_BODY_LIMIT_BYTES";
pub const ENV_DB_POOL_SIZE: &str = "TOLLGATE_DB_POOL_SIZE";
pub const ENV_LOG_FORMAT: &str = "TOLLGATE_LOG_FORMAT";
pub const ENV_LOG: &str = "TOLLGATE_LOG";
pub const ENV_SHUTDOWN_GRACE: &str = "TOLLGATE_SHUTDOWN_GRACE";
pub const ENV_MAX_CONNECTIONS: &str = "TOLLGATE_MAX_CONNECTIONS";
pub const ENV_MAX_IN_FLIGHT: &str = "TOLLGATE_MAX_IN_FLIGHT";
pub const ENV_IDLE_TIMEOUT: &str = "TOLLGATE_IDLE_TIMEOUT";
pub const ENV_HEADER_READ_TIMEOUT: &str = "TOLLGATE_HEADER_READ_TIMEOUT";
pub const ENV_BODY_READ_TIMEOUT: &str = "TOLLGATE_BODY_READ_TIMEOUT";
pub const ENV_JWT_KEYS_DIR: &str = "TOLLGATE_JWT_KEYS_DIR";
pub const ENV_JWT_ACTIVE_KID: &str = "TOLLGATE_JWT_ACTIVE_KID";
pub const ENV_JWT_PRIVATE_KEY: &str = "TOLLGATE_JWT_PRIVATE_KEY";
pub const ENV_JWT_KID: &str = "TOLLGATE_JWT_KID";
pub const ENV_JWT_ISSUER: &str = "TOLLGATE_JWT_ISSUER";
pub const ENV_JWT_AUDIENCE: &str = "TOLLGATE_JWT_AUDIENCE";
pub const ENV_ACCESS_TTL: &str = "TOLLGATE_ACCESS_TOKEN_TTL";
pub const ENV_REFRESH_TTL: &str = "TOLLGATE_REFRESH_TOKEN_TTL";
pub const ENV_LOGIN_MAX_FAILURES_ACCOUNT: &str = "TOLLGATE_LOGIN_MAX_FAILURES_ACCOUNT";
pub const ENV_LOGIN_MAX_FAILURES_CLIENT: &str = "TOLLGATE_LOGIN_MAX_FAILURES_CLIENT";
pub const ENV_HASH_CONCURRENCY: &str = "TOLLGATE_HASH_CONCURRENCY";
pub const ENV_TRUST_FORWARDED_FOR: &str = "TOLLGATE_TRUST_FORWARDED_FOR";
pub const ENV_ALIPAY_GATEWAY_URL: &str = "TOLLGATE_ALIPAY_GATEWAY_URL";
pub const ENV_ALIPAY_APP_ID: &str = "TOLLGATE_ALIPAY_APP_ID";
pub const ENV_ALIPAY_SELLER_ID: &str = "TOLLGATE_ALIPAY_SELLER_ID";
pub const ENV_ALIPAY_APP_PRIVATE_KEY_FILE: &str = "TOLLGATE_ALIPAY_APP_PRIVATE_KEY_FILE";
pub const ENV_ALIPAY_PUBLIC_KEY_FILE: &str = "TOLLGATE_ALIPAY_PUBLIC_KEY_FILE";
pub const ENV_WECHAT_API_BASE: &str = "TOLLGATE_WECHAT_API_BASE";
pub const ENV_WECHAT_MCHID: &str = "TOLLGATE_WECHAT_MCHID";
pub const ENV_WECHAT_APPID: &str = "TOLLGATE_WECHAT_APPID";
pub const ENV_WECHAT_MERCHANT_SERIAL: &str = "TOLLGATE_WECHAT_MERCHANT_SERIAL";
pub const ENV_WECHAT_MERCHANT_PRIVATE_KEY_FILE: &str = "TOLLGATE_WECHAT_MERCHANT_PRIVATE_KEY_FILE";
pub const ENV_WECHAT_PLATFORM_SERIAL: &str = "TOLLGATE_WECHAT_PLATFORM_SERIAL";
pub const ENV_WECHAT_PLATFORM_PUBLIC_KEY_FILE: &str = "TOLLGATE_WECHAT_PLATFORM_PUBLIC_KEY_FILE";
pub const ENV_WECHAT_APIV3_KEY: &str = "TOLLGATE_WECHAT_APIV3_KEY";
pub const ENV_ORDER_TTL: &str = "TOLLGATE_ORDER_TTL";
pub const ENV_USAGE_CLOSE_GRACE: &str = "TOLLGATE_USAGE_CLOSE_GRACE";
pub const ENV_USAGE_LOOKBACK: &str = "TOLLGATE_USAGE_LOOKBACK";
pub const ENV_USAGE_MINUTE_RETENTION: &str = "TOLLGATE_USAGE_MINUTE_RETENTION";

#[derive(Debug, Clone)]
pub struct Config {
    /// Address of the REST listener.
    pub listen: SocketAddr,
    /// Address of the listener for the sidecars' calls (`/internal/`); never the public one.
    pub internal_listen: SocketAddr,
    pub database_url: Secret,
    pub redis_url: Secret,
    /// PEM file of the CA(s) that sign PostgreSQL's certificate (`sslmode=verify-ca|verify-full`);
    /// `sslrootcert` in the URL does the same.
    pub database_ca_file: Option<PathBuf>,
    /// PEM file of the CA(s) that sign Redis's certificate (`rediss://`); default: the public
    /// web roots.
    pub redis_ca_file: Option<PathBuf>,
    /// Prepended to every Redis key, so several deployments (or tests) can share one Redis.
    pub redis_prefix: String,
    /// The URL users and gateways reach this service at (links, notify URLs).
    pub public_url: String,
    /// Where development keys are generated when none are configured.
    pub data_dir: Option<PathBuf>,
    /// Largest request body accepted, in bytes.
    pub body_limit: usize,
    /// Largest payment notification accepted, in bytes (real ones are a few KB).
    pub notify_body_limit: usize,
    /// Rejected notifications recorded (as a bounded digest) per minute and channel, per replica;
    /// past it they are only counted and logged.
    pub notify_rejected_per_minute: u32,
    pub db_pool_size: usize,
    pub log_format: LogFormat,
    /// A tracing `EnvFilter` directive, e.g. `info,tollgate_control_plane=debug`.
    pub log_filter: String,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_grace: Millis,
    /// The REST listener's overload protection.
    pub limits: ListenerLimits,
    pub jwt: JwtConfig,
    pub login: LoginConfig,
    /// Password hashes computed at once; each takes 19 MiB and a core for tens of milliseconds.
    pub hash_concurrency: usize,
    /// Password checks that may wait for a hashing slot; past it `503 busy` with `Retry-After`.
    pub hash_queue: usize,
    /// Take the client address for login throttling from the last `X-Forwarded-For` hop (set
    /// this only behind a proxy that writes it).
    pub trust_forwarded_for: bool,
    /// Alipay, if configured (all of its settings or none).
    pub alipay: Option<AlipaySettings>,
    /// WeChat Pay, if configured (all of its settings or none).
    pub wechat: Option<WechatSettings>,
    /// How long a pending order may be paid.
    pub order_ttl: Millis,
    /// When and how far back usage buckets are drained (`ledger::DrainSettings`).
    pub usage_close_grace: Millis,
    pub usage_lookback: Millis,
    pub usage_minute_retention: Millis,
}

/// Caps and timeouts of a listener (tollgate-serve applies them).
#[derive(Debug, Clone)]
pub struct ListenerLimits {
    /// Client connections; at the cap the idlest is closed, else `503 overloaded`.
    pub max_connections: usize,
    /// Requests in progress; past it `503 overloaded` at once.
    pub max_in_flight: usize,
    /// A connection with no request in progress is closed after this.
    pub idle_timeout: Millis,
    /// From a request head's first byte until it is complete.
    pub header_read_timeout: Millis,
    /// The longest a request body may stall between two pieces.
    pub body_read_timeout: Millis,
}

#[derive(Debug, Clone)]
pub struct AlipaySettings {
    pub gateway_url: String,
    pub app_id: String,
    pub seller_id: String,
    pub app_private_key_file: PathBuf,
    pub public_key_file: PathBuf,
}

#[derive(Debug, Clone)]
pub struct WechatSettings {
    pub api_base: String,
    pub mchid: String,
    pub appid: String,
    pub merchant_serial: String,
    pub merchant_private_key_file: PathBuf,
    pub platform_serial: String,
    pub platform_public_key_file: PathBuf,
    pub apiv3_key: Secret,
}

#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// A directory of Ed25519 private keys in PKCS#8 PEM, one per file, named `<kid>.pem`.
    /// Every key is published in the JWKS; the active one signs.
    pub keys_dir: Option<PathBuf>,
    /// Which key of `keys_dir` signs; defaults to the last by name.
    pub active_kid: Option<String>,
    /// A single private key given inline (PEM), with its `kid`.
    pub private_key: Option<Secret>,
    pub kid: Option<String>,
    pub issuer: String,
    pub audience: String,
    pub access_ttl: Millis,
    pub refresh_ttl: Millis,
}

#[derive(Debug, Clone)]
pub struct LoginConfig {
    /// Failed logins for one account from one client before that pair has to wait.
    pub max_failures_account: u32,
    /// Failed logins from one client (any accounts) before that client has to wait.
    pub max_failures_client: u32,
    /// The first wait; it doubles with every further failure.
    pub base_delay: Millis,
    /// The longest wait.
    pub max_delay: Millis,
    /// Failures are forgotten this long after the last one.
    pub window: Millis,
}

/// One source of settings; every field optional, later layers win.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub listen: Option<String>,
    pub internal_listen: Option<String>,
    pub database_url: Option<Secret>,
    pub redis_url: Option<Secret>,
    pub database_ca_file: Option<PathBuf>,
    pub redis_ca_file: Option<PathBuf>,
    pub redis_prefix: Option<String>,
    pub public_url: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub body_limit_bytes: Option<usize>,
    pub notify_body_limit_bytes: Option<usize>,
    pub notify_rejected_per_minute: Option<u32>,
    pub db_pool_size: Option<usize>,
    pub log_format: Option<LogFormat>,
    pub log: Option<String>,
    pub shutdown_grace: Option<Millis>,
    pub max_connections: Option<usize>,
    pub max_in_flight: Option<usize>,
    pub idle_timeout: Option<Millis>,
    pub header_read_timeout: Option<Millis>,
    pub body_read_timeout: Option<Millis>,
    pub jwt_keys_dir: Option<PathBuf>,
    pub jwt_active_kid: Option<String>,
    pub jwt_private_key: Option<Secret>,
    pub jwt_kid: Option<String>,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    pub access_token_ttl: Option<Millis>,
    pub refresh_token_ttl: Option<Millis>,
    pub login_max_failures_account: Option<u32>,
    pub login_max_failures_client: Option<u32>,
    pub login_base_delay: Option<Millis>,
    pub login_max_delay: Option<Millis>,
    pub login_window: Option<Millis>,
    pub hash_concurrency: Option<usize>,
    pub hash_queue: Option<usize>,
    pub trust_forwarded_for: Option<bool>,
    pub alipay_gateway_url: Option<String>,
    pub alipay_app_id: Option<String>,
    pub alipay_seller_id: Option<String>,
    pub alipay_app_private_key_file: Option<PathBuf>,
    pub alipay_public_key_file: Option<PathBuf>,
    pub wechat_api_base: Option<String>,
    pub wechat_mchid: Option<String>,
    pub wechat_appid: Option<String>,
    pub wechat_merchant_serial: Option<String>,
    pub wechat_merchant_private_key_file: Option<PathBuf>,
    pub wechat_platform_serial: Option<String>,
    pub wechat_platform_public_key_file: Option<PathBuf>,
    pub wechat_apiv3_key: Option<Secret>,
    pub order_ttl: Option<Millis>,
    pub usage_close_grace: Option<Millis>,
    pub usage_lookback: Option<Millis>,
    pub usage_minute_retention: Option<Millis>,
}

impl Layer {
    fn from_env(env: &dyn Env, problems: &mut Problems) -> Layer {
        Layer {
            listen: env.var(ENV_LISTEN),
            internal_listen: env.var(ENV_INTERNAL_LISTEN),
            database_url: env.var(ENV_DATABASE_URL).map(Secret::new),
            redis_url: env.var(ENV_REDIS_URL).map(Secret::new),
            database_ca_file: env.var(ENV_DATABASE_CA_FILE).map(PathBuf::from),
            redis_ca_file: env.var(ENV_REDIS_CA_FILE).map(PathBuf::from),
            redis_prefix: env.var(ENV_REDIS_PREFIX),
            public_url: env.var(ENV_PUBLIC_URL),
            data_dir: env.var(ENV_DATA_DIR).map(PathBuf::from),
            body_limit_bytes: problems.env(env, ENV_BODY_LIMIT),
            notify_body_limit_bytes: problems.env(env, ENV_NOTIFY_BODY_LIMIT),
            notify_rejected_per_minute: problems.env(env, ENV_NOTIFY_REJECTED_PER_MINUTE),
            db_pool_size: problems.env(env, ENV_DB_POOL_SIZE),
            log_format: problems.env(env, ENV_LOG_FORMAT),
            log: env.var(ENV_LOG),
            shutdown_grace: problems.env(env, ENV_SHUTDOWN_GRACE),
            max_connections: problems.env(env, ENV_MAX_CONNECTIONS),
            max_in_flight: problems.env(env, ENV_MAX_IN_FLIGHT),
            idle_timeout: problems.env(env, ENV_IDLE_TIMEOUT),
            header_read_timeout: problems.env(env, ENV_HEADER_READ_TIMEOUT),
            body_read_timeout: problems.env(env, ENV_BODY_READ_TIMEOUT),
            jwt_keys_dir: env.var(ENV_JWT_KEYS_DIR).map(PathBuf::from),
            jwt_active_kid: env.var(ENV_JWT_ACTIVE_KID),
            jwt_private_key: env.var(ENV_JWT_PRIVATE_KEY).map(Secret::new),
            jwt_kid: env.var(ENV_JWT_KID),
            jwt_issuer: env.var(ENV_JWT_ISSUER),
            jwt_audience: env.var(ENV_JWT_AUDIENCE),
            access_token_ttl: problems.env(env, ENV_ACCESS_TTL),
            refresh_token_ttl: problems.env(env, ENV_REFRESH_TTL),
            login_max_failures_account: problems.env(env, ENV_LOGIN_MAX_FAILURES_ACCOUNT),
            login_max_failures_client: problems.env(env, ENV_LOGIN_MAX_FAILURES_CLIENT),
            login_base_delay: problems.env(env, ENV_LOGIN_BASE_DELAY),
            login_max_delay: problems.env(env, ENV_LOGIN_MAX_DELAY),
            login_window: problems.env(env, ENV_LOGIN_WINDOW),
            hash_concurrency: problems.env(env, ENV_HASH_CONCURRENCY),
            hash_queue: problems.env(env, ENV_HASH_QUEUE),
            trust_forwarded_for: problems.env(env, ENV_TRUST_FORWARDED_FOR),
            alipay_gateway_url: env.var(ENV_ALIPAY_GATEWAY_URL),
            alipay_app_id: env.var(ENV_ALIPAY_APP_ID),
            alipay_seller_id: env.var(ENV_ALIPAY_SELLER_ID),
            alipay_app_private_key_file: env
                .var(ENV_ALIPAY_APP_PRIVATE_KEY_FILE)
                .map(PathBuf::from),
            alipay_public_key_file: env.var(ENV_ALIPAY_PUBLIC_KEY_FILE).map(PathBuf::from),
            wechat_api_base: env.var(ENV_WECHAT_API_BASE),
            wechat_mchid: env.var(ENV_WECHAT_MCHID),
            wechat_appid: env.var(ENV_WECHAT_APPID),
            wechat_merchant_serial: env.var(ENV_WECHAT_MERCHANT_SERIAL),
            wechat_merchant_private_key_file: env
                .var(ENV_WECHAT_MERCHANT_PRIVATE_KEY_FILE)
                .map(PathBuf::from),
            wechat_platform_serial: env.var(ENV_WECHAT_PLATFORM_SERIAL),
            wechat_platform_public_key_file: env
                .var(ENV_WECHAT_PLATFORM_PUBLIC_KEY_FILE)
                .map(PathBuf::from),
            wechat_apiv3_key: env.var(ENV_WECHAT_APIV3_KEY).map(Secret::new),
            order_ttl: problems.env(env, ENV_ORDER_TTL),
            usage_close_grace: problems.env(env, ENV_USAGE_CLOSE_GRACE),
            usage_lookback: problems.env(env, ENV_USAGE_LOOKBACK),
            usage_minute_retention: problems.env(env, ENV_USAGE_MINUTE_RETENTION),
        }
    }

    /// `other`'s settings win over `self`'s.
    fn overlay(self, other: Layer) -> Layer {
        Layer {
            listen: other.listen.or(self.listen),
            internal_listen: other.internal_listen.or(self.internal_listen),
            database_url: other.database_url.or(self.database_url),
            redis_url: other.redis_url.or(self.redis_url),
            database_ca_file: other.database_ca_file.or(self.database_ca_file),
            redis_ca_file: other.redis_ca_file.or(self.redis_ca_file),
            redis_prefix: other.redis_prefix.or(self.redis_prefix),
            public_url: other.public_url.or(self.public_url),
            data_dir: other.data_dir.or(self.data_dir),
            body_limit_bytes: other.body_limit_bytes.or(self.body_limit_bytes),
            notify_body_limit_bytes: other
                .notify_body_limit_bytes
                .or(self.notify_body_limit_bytes),
            notify_rejected_per_minute: other
                .notify_rejected_per_minute
                .or(self.notify_rejected_per_minute),
            db_pool_size: other.db_pool_size.or(self.db_pool_size),
            log_format: other.log_format.or(self.log_format),
            log: other.log.or(self.log),
            shutdown_grace: other.shutdown_grace.or(self.shutdown_grace),
            max_connections: other.max_connections.or(self.max_connections),
            max_in_flight: other.max_in_flight.or(self.max_in_flight),
            idle_timeout: other.idle_timeout.or(self.idle_timeout),
            header_read_timeout: other.header_read_timeout.or(self.header_read_timeout),
            body_read_timeout: other.body_read_timeout.or(self.body_read_timeout),
            jwt_keys_dir: other.jwt_keys_dir.or(self.jwt_keys_dir),
            jwt_active_kid: other.jwt_active_kid.or(self.jwt_active_kid),
            jwt_private_key: other.jwt_private_key.or(self.jwt_private_key),
            jwt_kid: other.jwt_kid.or(self.jwt_kid),
            jwt_issuer: other.jwt_issuer.or(self.jwt_issuer),
            jwt_audience: other.jwt_audience.or(self.jwt_audience),
            access_token_ttl: other.access_token_ttl.or(self.access_token_ttl),
            refresh_token_ttl: other.refresh_token_ttl.or(self.refresh_token_ttl),
            login_max_failures_account: other
                .login_max_failures_account
                .or(self.login_max_failures_account),
            login_max_failures_client: other
                .login_max_failures_client
                .or(self.login_max_failures_client),
            login_base_delay: other.login_base_delay.or(self.login_base_delay),
            login_max_delay: other.login_max_delay.or(self.login_max_delay),
            login_window: other.login_window.or(self.login_window),
            hash_concurrency: other.hash_concurrency.or(self.hash_concurrency),
            hash_queue: other.hash_queue.or(self.hash_queue),
            trust_forwarded_for: other.trust_forwarded_for.or(self.trust_forwarded_for),
            alipay_gateway_url: other.alipay_gateway_url.or(self.alipay_gateway_url),
            alipay_app_id: other.alipay_app_id.or(self.alipay_app_id),
            alipay_seller_id: other.alipay_seller_id.or(self.alipay_seller_id),
            alipay_app_private_key_file: other
                .alipay_app_private_key_file
                .or(self.alipay_app_private_key_file),
            alipay_public_key_file: other.alipay_public_key_file.or(self.alipay_public_key_file),
            wechat_api_base: other.wechat_api_base.or(self.wechat_api_base),
            wechat_mchid: other.wechat_mchid.or(self.wechat_mchid),
            wechat_appid: other.wechat_appid.or(self.wechat_appid),
            wechat_merchant_serial: other.wechat_merchant_serial.or(self.wechat_merchant_serial),
            wechat_merchant_private_key_file: other
                .wechat_merchant_private_key_file
                .or(self.wechat_merchant_private_key_file),
            wechat_platform_serial: other.wechat_platform_serial.or(self.wechat_platform_serial),
            wechat_platform_public_key_file: other
                .wechat_platform_public_key_file
                .or(self.wechat_platform_public_key_file),
            wechat_apiv3_key: other.wechat_apiv3_key.or(self.wechat_apiv3_key),
            order_ttl: other.order_ttl.or(self.order_ttl),
            usage_close_grace: other.usage_close_grace.or(self.usage_close_grace),
            usage_lookback: other.usage_lookback.or(self.usage_lookback),
            usage_minute_retention: other.usage_minute_retention.or(self.usage_minute_retention),
        }
    }
}

impl Config {
    /// Merges the layers and validates the result. `file` is the config file's name and text,
    /// `flags` what the command line set.
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
        let listen = layer.listen.as_deref().unwrap_or("127.0.0.1:9001");
        let listen = listen.parse().unwrap_or_else(|e| {
            problems.push("listen", format_args!("{listen:?} is not an address: {e}"));
            SocketAddr::from(([127, 0, 0, 1], 9001))
        });
        let internal_listen = layer.internal_listen.as_deref().unwrap_or("127.0.0.1:9002");
        let internal_listen = internal_listen.parse().unwrap_or_else(|e| {
            problems.push(
                "internal_listen",
                format_args!("{internal_listen:?} is not an address: {e}"),
            );
            SocketAddr::from(([127, 0, 0, 1], 9002))
        });
        if internal_listen == listen && listen.port() != 0 {
            problems.push(
                "internal_listen",
                "must differ from listen: /internal/ is never on the public listener",
            );
        }
        let database_url = layer
            .database_url
            .unwrap_or_else(|| Secret::new("postgres://postgres@127.0.0.1:5432/tollgate"));
        if let Err(e) = crate::db::tls::DbTarget::parse(database_url.expose()) {
            // The parser's message never repeats the URL, so no password can leak here.
            problems.push("database_url", format_args!("not a PostgreSQL URL: {e}"));
        }
        for (setting, file) in [
            ("database_ca_file", &layer.database_ca_file),
            ("redis_ca_file", &layer.redis_ca_file),
        ] {
            if let Some(path) = file
                && let Err(e) = crate::db::tls::read_roots(path)
            {
                problems.push(setting, e);
            }
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
        let redis_prefix = tollgate_common::config::redis_prefix(problems, layer.redis_prefix);
        let public_url = layer
            .public_url
            .unwrap_or_else(|| format!("http://{listen}"))
            .trim_end_matches('/')
            .to_owned();
        if !(public_url.starts_with("http://") || public_url.starts_with("https://")) {
            problems.push(
                "public_url",
                format_args!("{public_url:?} must start with http:// or https://"),
            );
        }
        let body_limit = layer.body_limit_bytes.unwrap_or(1 << 20);
        if !(1024..=64 << 20).contains(&body_limit) {
            problems.push(
                "body_limit_bytes",
                format_args!("{body_limit} is outside 1024..=67108864"),
            );
        }
        let notify_body_limit = layer.notify_body_limit_bytes.unwrap_or(16 << 10);
        if !(1024..=1 << 20).contains(&notify_body_limit) {
            problems.push(
                "notify_body_limit_bytes",
                format_args!("{notify_body_limit} is outside 1024..=1048576"),
            );
        }
        let notify_rejected_per_minute = layer.notify_rejected_per_minute.unwrap_or(60);
        let db_pool_size = layer.db_pool_size.unwrap_or(16);
        if !(1..=512).contains(&db_pool_size) {
            problems.push(
                "db_pool_size",
                format_args!("{db_pool_size} is outside 1..=512"),
            );
        }
        let log_filter = tollgate_common::config::log_filter(problems, layer.log);
        if layer.jwt_private_key.is_some() != layer.jwt_kid.is_some() {
            problems.push(
                "jwt_kid",
                format_args!("{ENV_JWT_PRIVATE_KEY} and {ENV_JWT_KID} go together"),
            );
        }
        if layer.jwt_private_key.is_some() && layer.jwt_keys_dir.is_some() {
            problems.push(
                "jwt_keys_dir",
                format_args!("give either {ENV_JWT_KEYS_DIR} or {ENV_JWT_PRIVATE_KEY}, not both"),
            );
        }
        let access_ttl = layer.access_token_ttl.unwrap_or(Millis(15 * 60_000));
        if !(10_000..=24 * 3_600_000).contains(&access_ttl.0) {
            problems.push("access_token_ttl", "must be between 10s and 24h");
        }
        let refresh_ttl = layer
            .refresh_token_ttl
            .unwrap_or(Millis(30 * 24 * 3_600_000));
        if refresh_ttl.0 <= access_ttl.0 {
            problems.push(
                "refresh_token_ttl",
                "must be longer than the access token lifetime",
            );
        }
        let login = LoginConfig {
            max_failures_account: layer.login_max_failures_account.unwrap_or(5),
            max_failures_client: layer.login_max_failures_client.unwrap_or(20),
            base_delay: layer.login_base_delay.unwrap_or(Millis(1_000)),
            max_delay: layer.login_max_delay.unwrap_or(Millis(5 * 60_000)),
            window: layer.login_window.unwrap_or(Millis(15 * 60_000)),
        };
        if login.max_failures_account == 0 || login.max_failures_client == 0 {
            problems.push("login_max_failures", "must be at least 1");
        }
        if login.base_delay.0 < 100 || login.base_delay.0 > login.max_delay.0 {
            problems.push(
                "login_base_delay",
                "must be at least 100ms and at most login_max_delay",
            );
        }
        if login.max_delay.0 > 3_600_000 {
            problems.push("login_max_delay", "must be at most 1h");
        }
        if login.window.0 < 1_000 {
            problems.push("login_window", "must be at least 1s");
        }
        // Fixed, not the number of cores: memory is 19 MiB per hash in flight, and a pod's
        // memory limit does not grow with the node's cores.
        let hash_concurrency = layer.hash_concurrency.unwrap_or(2);
        if !(1..=64).contains(&hash_concurrency) {
            problems.push(
                "hash_concurrency",
                format_args!("{hash_concurrency} is outside 1..=64"),
            );
        }
        let limits = ListenerLimits {
            max_connections: layer.max_connections.unwrap_or(1024),
            max_in_flight: layer.max_in_flight.unwrap_or(256),
            idle_timeout: layer.idle_timeout.unwrap_or(Millis(75_000)),
            header_read_timeout: layer.header_read_timeout.unwrap_or(Millis(10_000)),
            body_read_timeout: layer.body_read_timeout.unwrap_or(Millis(30_000)),
        };
        for (setting, value) in [
            ("max_connections", limits.max_connections),
            ("max_in_flight", limits.max_in_flight),
        ] {
            if !(1..=1_000_000).contains(&value) {
                problems.push(setting, format_args!("{value} is outside 1..=1000000"));
            }
        }
        for (setting, value) in [
            ("idle_timeout", limits.idle_timeout),
            ("header_read_timeout", limits.header_read_timeout),
            ("body_read_timeout", limits.body_read_timeout),
        ] {
            if value.0 == 0 {
                problems.push(setting, "must be greater than zero");
            }
        }
        let hash_queue = layer.hash_queue.unwrap_or(64);
        if hash_queue > 10_000 {
            problems.push("hash_queue", format_args!("{hash_queue} is above 10000"));
        }
        let jwt = JwtConfig {
            keys_dir: layer.jwt_keys_dir,
            active_kid: layer.jwt_active_kid,
            private_key: layer.jwt_private_key,
            kid: layer.jwt_kid,
            issuer: layer.jwt_issuer.unwrap_or_else(|| "tollgate".to_owned()),
            audience: layer.jwt_audience.unwrap_or_else(|| "tollgate".to_owned()),
            access_ttl,
            refresh_ttl,
        };
        let alipay = match (
            layer.alipay_app_id,
            layer.alipay_seller_id,
            layer.alipay_app_private_key_file,
            layer.alipay_public_key_file,
        ) {
            (None, None, None, None) => None,
            (Some(app_id), Some(seller_id), Some(app_private_key_file), Some(public_key_file)) => {
                Some(AlipaySettings {
                    gateway_url: layer
                        .alipay_gateway_url
                        .unwrap_or_else(|| "https://openapi.alipay.com/gateway.do".to_owned()),
                    app_id,
                    seller_id,
                    app_private_key_file,
                    public_key_file,
                })
            }
            _ => {
                problems.push(
                    "alipay",
                    "set all of TOLLGATE_ALIPAY_APP_ID, _SELLER_ID, _APP_PRIVATE_KEY_FILE and _PUBLIC_KEY_FILE, or none",
                );
                None
            }
        };
        let wechat = match (
            layer.wechat_mchid,
            layer.wechat_appid,
            layer.wechat_merchant_serial,
            layer.wechat_merchant_private_key_file,
            layer.wechat_platform_serial,
            layer.wechat_platform_public_key_file,
            layer.wechat_apiv3_key,
        ) {
            (None, None, None, None, None, None, None) => None,
            (
                Some(mchid),
                Some(appid),
                Some(merchant_serial),
                Some(merchant_private_key_file),
                Some(platform_serial),
                Some(platform_public_key_file),
                Some(apiv3_key),
            ) => {
                if apiv3_key.expose().len() != 32 {
                    problems.push("wechat_apiv3_key", "must be exactly 32 characters");
                }
                Some(WechatSettings {
                    api_base: layer
                        .wechat_api_base
                        .unwrap_or_else(|| "https://api.mch.weixin.qq.com".to_owned())
                        .trim_end_matches('/')
                        .to_owned(),
                    mchid,
                    appid,
                    merchant_serial,
                    merchant_private_key_file,
                    platform_serial,
                    platform_public_key_file,
                    apiv3_key,
                })
            }
            _ => {
                problems.push(
                    "wechat",
                    "set all of TOLLGATE_WECHAT_MCHID, _APPID, _MERCHANT_SERIAL, _MERCHANT_PRIVATE_KEY_FILE, _PLATFORM_SERIAL, _PLATFORM_PUBLIC_KEY_FILE and _APIV3_KEY, or none",
                );
                None
            }
        };
        let usage_close_grace = layer.usage_close_grace.unwrap_or(Millis(10_000));
        if usage_close_grace.0 > 600_000 {
            problems.push("usage_close_grace", "must be at most 10m");
        }
        let usage_lookback = layer.usage_lookback.unwrap_or(Millis(15 * 60_000));
        if !(5 * 60_000..=7 * 86_400_000).contains(&usage_lookback.0) {
            problems.push("usage_lookback", "must be between 5m and 7d");
        }
        let usage_minute_retention = layer
            .usage_minute_retention
            .unwrap_or(Millis(35 * 86_400_000));
        if usage_minute_retention.0 < 86_400_000 {
            problems.push("usage_minute_retention", "must be at least 1d");
        }
        let order_ttl = layer.order_ttl.unwrap_or(Millis(30 * 60_000));
        if order_ttl.0 < 60_000 {
            problems.push("order_ttl", "must be at least 1m");
        }
        Config {
            alipay,
            wechat,
            order_ttl,
            usage_close_grace,
            usage_lookback,
            usage_minute_retention,
            jwt,
            login,
            hash_concurrency,
            hash_queue,
            trust_forwarded_for: layer.trust_forwarded_for.unwrap_or(false),
            listen,
            internal_listen,
            database_url,
            redis_url,
            database_ca_file: layer.database_ca_file,
            redis_ca_file: layer.redis_ca_file,
            redis_prefix,
            public_url,
            data_dir: layer.data_dir,
            body_limit,
            notify_body_limit,
            notify_rejected_per_minute,
            db_pool_size,
            log_format: layer.log_format.unwrap_or(LogFormat::Json),
            log_filter,
            shutdown_grace: layer.shutdown_grace.unwrap_or(Millis(20_000)),
            limits,
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
    fn defaults_are_valid() {
        let config = Config::load(None, &env(&[]), Layer::default()).expect("valid");
        assert_eq!(config.listen.to_string(), "127.0.0.1:9001");
        assert_eq!(config.public_url, "http://127.0.0.1:9001");
        assert_eq!(config.redis_prefix, "tg");
    }

    #[test]
    fn later_layers_win() {
        let file = "listen = \"127.0.0.1:1000\"\ndb_pool_size = 3\nredis_prefix = \"file\"\n";
        let config = Config::load(
            Some(("cp.toml", file)),
            &env(&[(ENV_LISTEN, "127.0.0.1:2000"), (ENV_REDIS_PREFIX, "env")]),
            Layer {
                listen: Some("127.0.0.1:3000".to_owned()),
                ..Layer::default()
            },
        )
        .expect("valid");
        assert_eq!(config.listen.to_string(), "127.0.0.1:3000");
        assert_eq!(config.redis_prefix, "env");
        assert_eq!(config.db_pool_size, 3);
    }

    #[test]
    fn every_problem_is_reported_once_and_named() {
        let err = Config::load(
            Some(("cp.toml", "db_pool_size = 0\nnonsense = true\n")),
            &env(&[
                (ENV_LISTEN, "nowhere"),
                (ENV_BODY_LIMIT, "lots"),
                (ENV_DATABASE_URL, "postgres://u:hunter2@h:notaport/db"),
                (ENV_LOG_FORMAT, "xml"),
            ]),
            Layer::default(),
        )
        .expect_err("invalid");
        let lines = err.0;
        for name in [
            "listen",
            ENV_BODY_LIMIT,
            "database_url",
            ENV_LOG_FORMAT,
            "db_pool_size",
            "cp.toml: nonsense",
        ] {
            assert_eq!(
                lines.iter().filter(|l| l.starts_with(name)).count(),
                1,
                "{name} in {lines:?}"
            );
        }
        assert!(!lines.iter().any(|l| l.contains("hunter2")), "{lines:?}");
    }

    #[test]
    fn internal_listener_tls_and_limits_are_checked() {
        let config = Config::load(None, &env(&[]), Layer::default()).expect("valid");
        assert_eq!(config.internal_listen.to_string(), "127.0.0.1:9002");
        assert_eq!(config.hash_concurrency, 2, "fixed, not the number of cores");
        assert_eq!(config.notify_body_limit, 16 << 10);
        let err = Config::load(
            None,
            &env(&[
                (ENV_LISTEN, "127.0.0.1:7000"),
                (ENV_INTERNAL_LISTEN, "127.0.0.1:7000"),
                (ENV_REDIS_CA_FILE, "/nonexistent/ca.pem"),
                (
                    ENV_DATABASE_URL,
                    "postgres://u:hunter2@h/db?sslmode=sometimes",
                ),
                (ENV_NOTIFY_BODY_LIMIT, "10"),
                (ENV_HASH_CONCURRENCY, "0"),
            ]),
            Layer::default(),
        )
        .expect_err("invalid");
        for name in [
            "internal_listen",
            "redis_ca_file",
            "database_url",
            "notify_body_limit_bytes",
            "hash_concurrency",
        ] {
            assert_eq!(
                err.0.iter().filter(|l| l.starts_with(name)).count(),
                1,
                "{name} in {:?}",
                err.0
            );
        }
        assert!(!err.0.iter().any(|l| l.contains("hunter2")), "{:?}", err.0);
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let config = Config::load(
            None,
            &env(&[(ENV_DATABASE_URL, "postgres://u:hunter2@h/db")]),
            Layer::default(),
        )
        .expect("valid");
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
