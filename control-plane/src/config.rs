//! The control plane's one `Config`, built as defaults < file (`--config`) < environment < flags
//! and validated as a whole. Every setting is declared once, in `settings!` below: its type,
//! default, environment variable, flag and help, from which `--help` and docs/configuration.md
//! are made.

use std::net::SocketAddr;
use std::path::PathBuf;

use tollgate_common::config::{ConfigError, Env, LogFormat, Millis, Problems, Secret, addr};

tollgate_common::settings! {
    /// REST listener (the public API)
    listen: String = "127.0.0.1:9001", env ENV_LISTEN = "TOLLGATE_LISTEN", flag "--listen";
    /// the sidecars' calls (`/internal/`) and nothing else; must differ from `listen`. Expose it
    /// to the sidecars only
    internal_listen: String = "127.0.0.1:9002",
        env ENV_INTERNAL_LISTEN = "TOLLGATE_INTERNAL_LISTEN";
    /// PostgreSQL (secret). TLS with `sslmode=require`, `verify-ca` or `verify-full` (and
    /// `sslrootcert=/path/ca.pem`), as libpq:
    /// [deployment.md](deployment.md#tls-to-redis-and-postgresql)
    database_url: Secret = "postgres://postgres@127.0.0.1:5432/tollgate",
        env ENV_DATABASE_URL = "DATABASE_URL", flag "--database-url";
    /// PEM file of the CA(s) that sign PostgreSQL's certificate, when the URL names no
    /// `sslrootcert`
    database_ca_file: PathBuf, unset "none",
        env ENV_DATABASE_CA_FILE = "TOLLGATE_DATABASE_CA_FILE";
    /// Redis; `redis-cluster://host:port` for Redis Cluster; `rediss://` (`rediss-cluster://`)
    /// for TLS (secret)
    redis_url: Secret = "redis://127.0.0.1:6379",
        env ENV_REDIS_URL = "REDIS_URL", flag "--redis-url";
    /// PEM file of the CA(s) that sign Redis's certificate (`rediss://`)
    redis_ca_file: PathBuf, unset "public web roots",
        env ENV_REDIS_CA_FILE = "TOLLGATE_REDIS_CA_FILE";
    /// prefix of every Redis key; must match the sidecars'
    redis_prefix: String = "tg", env ENV_REDIS_PREFIX = "TOLLGATE_REDIS_PREFIX";
    /// the URL users and payment gateways reach this service at
    public_url: String, unset "`http://<listen>`", env ENV_PUBLIC_URL = "TOLLGATE_PUBLIC_URL";
    /// where development keys are generated when none are configured
    data_dir: PathBuf, unset "none", env ENV_DATA_DIR = "TOLLGATE_DATA_DIR";
    /// largest request body (1024–67108864); larger answers `413 payload_too_large`
    body_limit_bytes: usize = "1048576", env ENV_BODY_LIMIT = "TOLLGATE_BODY_LIMIT_BYTES";
    /// largest payment notification (1024–1048576); larger is refused with `413` and only a
    /// bounded record kept ([payments.md](payments.md#notifications))
    notify_body_limit_bytes: usize = "16384",
        env ENV_NOTIFY_BODY_LIMIT = "TOLLGATE_NOTIFY_BODY_LIMIT_BYTES";
    /// rejected (unverified) notifications recorded per channel and minute, per replica; the
    /// rest are only counted
    notify_rejected_per_minute: u32 = "60",
        env ENV_NOTIFY_REJECTED_PER_MINUTE = "TOLLGATE_NOTIFY_REJECTED_PER_MINUTE";
    /// PostgreSQL connections per process (1–512)
    db_pool_size: usize = "16", env ENV_DB_POOL_SIZE = "TOLLGATE_DB_POOL_SIZE";
    /// `json` (one object per line) or `text`
    log_format: LogFormat = "json", env ENV_LOG_FORMAT = "TOLLGATE_LOG_FORMAT";
    /// a tracing filter, e.g. `info,tollgate_control_plane=debug`
    log: String = "info", env ENV_LOG = "TOLLGATE_LOG";
    /// after SIGTERM, how long the requests already received may take; then the process exits
    shutdown_grace: Millis = "20s", env ENV_SHUTDOWN_GRACE = "TOLLGATE_SHUTDOWN_GRACE";
    /// open client connections; at the cap the idlest is closed to make room, else
    /// `503 overloaded` with `Retry-After: 1`. Lowered at start if the open-files limit cannot
    /// hold it
    max_connections: usize = "1024", env ENV_MAX_CONNECTIONS = "TOLLGATE_MAX_CONNECTIONS";
    /// requests in progress; past it `503 overloaded` with `Retry-After: 1` at once
    max_in_flight: usize = "256", env ENV_MAX_IN_FLIGHT = "TOLLGATE_MAX_IN_FLIGHT";
    /// a connection with no request in progress is closed (HTTP/2: GOAWAY); keep it longer than
    /// the idle timeout of the proxy in front
    idle_timeout: Millis = "75s", env ENV_IDLE_TIMEOUT = "TOLLGATE_IDLE_TIMEOUT";
    /// a request head must be complete this long after its first byte, else the connection is
    /// cut
    header_read_timeout: Millis = "10s",
        env ENV_HEADER_READ_TIMEOUT = "TOLLGATE_HEADER_READ_TIMEOUT";
    /// the longest a request body may stall between two pieces (then `400`)
    body_read_timeout: Millis = "30s", env ENV_BODY_READ_TIMEOUT = "TOLLGATE_BODY_READ_TIMEOUT";
    /// directory of Ed25519 PKCS#8 PEM signing keys, `<kid>.pem`; all are published in the JWKS
    jwt_keys_dir: PathBuf, unset "none", env ENV_JWT_KEYS_DIR = "TOLLGATE_JWT_KEYS_DIR";
    /// which key of the directory signs
    jwt_active_kid: String, unset "last by name", env ENV_JWT_ACTIVE_KID = "TOLLGATE_JWT_ACTIVE_KID";
    /// one inline PEM signing key (secret), with `jwt_kid`
    jwt_private_key: Secret, unset "none", env ENV_JWT_PRIVATE_KEY = "TOLLGATE_JWT_PRIVATE_KEY";
    /// the kid of `jwt_private_key`
    jwt_kid: String, unset "none", env ENV_JWT_KID = "TOLLGATE_JWT_KID";
    /// `iss` of access tokens; the sidecars must expect the same
    jwt_issuer: String = "tollgate", env ENV_JWT_ISSUER = "TOLLGATE_JWT_ISSUER";
    /// `aud` of access tokens; the sidecars must expect the same
    jwt_audience: String = "tollgate", env ENV_JWT_AUDIENCE = "TOLLGATE_JWT_AUDIENCE";
    /// access-token lifetime (10s–24h)
    access_token_ttl: Millis = "15m", env ENV_ACCESS_TTL = "TOLLGATE_ACCESS_TOKEN_TTL";
    /// refresh-token lifetime (sliding); longer than `access_token_ttl`
    refresh_token_ttl: Millis = "30d", env ENV_REFRESH_TTL = "TOLLGATE_REFRESH_TOKEN_TTL";
    /// failed logins of one account **from one client** at which that client starts to wait for
    /// that account ([auth.md](auth.md#login-throttling))
    login_max_failures_account: u32 = "5",
        env ENV_LOGIN_MAX_FAILURES_ACCOUNT = "TOLLGATE_LOGIN_MAX_FAILURES_ACCOUNT";
    /// failed logins from one client (any accounts) at which it starts to wait
    login_max_failures_client: u32 = "20",
        env ENV_LOGIN_MAX_FAILURES_CLIENT = "TOLLGATE_LOGIN_MAX_FAILURES_CLIENT";
    /// the first wait; doubles with each further failure (≥ 100ms)
    login_base_delay: Millis = "1s", env ENV_LOGIN_BASE_DELAY = "TOLLGATE_LOGIN_BASE_DELAY";
    /// the longest wait (≤ 1h)
    login_max_delay: Millis = "5m", env ENV_LOGIN_MAX_DELAY = "TOLLGATE_LOGIN_MAX_DELAY";
    /// failures are forgotten this long after the last one
    login_window: Millis = "15m", env ENV_LOGIN_WINDOW = "TOLLGATE_LOGIN_WINDOW";
    /// password hashes computed at once (19 MiB each), 1–64; not the number of cores, so memory
    /// does not grow with the node
    hash_concurrency: usize = "2", env ENV_HASH_CONCURRENCY = "TOLLGATE_HASH_CONCURRENCY";
    /// logins/registrations that may wait for a hashing slot; past that `503 busy` with
    /// `Retry-After: 1`
    hash_queue: usize = "64", env ENV_HASH_QUEUE = "TOLLGATE_HASH_QUEUE";
    /// take the client address from the last `X-Forwarded-For` hop (only behind a proxy that
    /// sets it)
    trust_forwarded_for: bool = "false",
        env ENV_TRUST_FORWARDED_FOR = "TOLLGATE_TRUST_FORWARDED_FOR";
    /// Alipay's gateway ([payments.md](payments.md#all-settings))
    alipay_gateway_url: String = "https://openapi.alipay.com/gateway.do",
        env ENV_ALIPAY_GATEWAY_URL = "TOLLGATE_ALIPAY_GATEWAY_URL";
    /// Alipay: the app id; set it and the next three, or none of them
    alipay_app_id: String, unset "none", env ENV_ALIPAY_APP_ID = "TOLLGATE_ALIPAY_APP_ID";
    /// Alipay: the seller id
    alipay_seller_id: String, unset "none", env ENV_ALIPAY_SELLER_ID = "TOLLGATE_ALIPAY_SELLER_ID";
    /// Alipay: the app's private key file (PEM)
    alipay_app_private_key_file: PathBuf, unset "none",
        env ENV_ALIPAY_APP_PRIVATE_KEY_FILE = "TOLLGATE_ALIPAY_APP_PRIVATE_KEY_FILE";
    /// Alipay: Alipay's public key file (PEM)
    alipay_public_key_file: PathBuf, unset "none",
        env ENV_ALIPAY_PUBLIC_KEY_FILE = "TOLLGATE_ALIPAY_PUBLIC_KEY_FILE";
    /// WeChat Pay's API ([payments.md](payments.md#all-settings))
    wechat_api_base: String = "https://api.mch.weixin.qq.com",
        env ENV_WECHAT_API_BASE = "TOLLGATE_WECHAT_API_BASE";
    /// WeChat Pay: the merchant id; set it and the next six, or none of them
    wechat_mchid: String, unset "none", env ENV_WECHAT_MCHID = "TOLLGATE_WECHAT_MCHID";
    /// WeChat Pay: the app id
    wechat_appid: String, unset "none", env ENV_WECHAT_APPID = "TOLLGATE_WECHAT_APPID";
    /// WeChat Pay: the merchant certificate's serial
    wechat_merchant_serial: String, unset "none",
        env ENV_WECHAT_MERCHANT_SERIAL = "TOLLGATE_WECHAT_MERCHANT_SERIAL";
    /// WeChat Pay: the merchant private key file (PEM)
    wechat_merchant_private_key_file: PathBuf, unset "none",
        env ENV_WECHAT_MERCHANT_PRIVATE_KEY_FILE = "TOLLGATE_WECHAT_MERCHANT_PRIVATE_KEY_FILE";
    /// WeChat Pay: the platform public key's id
    wechat_platform_serial: String, unset "none",
        env ENV_WECHAT_PLATFORM_SERIAL = "TOLLGATE_WECHAT_PLATFORM_SERIAL";
    /// WeChat Pay: the platform public key file (PEM)
    wechat_platform_public_key_file: PathBuf, unset "none",
        env ENV_WECHAT_PLATFORM_PUBLIC_KEY_FILE = "TOLLGATE_WECHAT_PLATFORM_PUBLIC_KEY_FILE";
    /// WeChat Pay: the APIv3 key, exactly 32 characters (secret)
    wechat_apiv3_key: Secret, unset "none", env ENV_WECHAT_APIV3_KEY = "TOLLGATE_WECHAT_APIV3_KEY";
    /// how long an order may be paid (at least `1m`); the gateways are told the same expiry
    order_ttl: Millis = "30m", env ENV_ORDER_TTL = "TOLLGATE_ORDER_TTL";
    /// how long after a minute ends its usage buckets are drained: the clock skew allowed between
    /// sidecars and control plane; at most 10m
    usage_close_grace: Millis = "10s", env ENV_USAGE_CLOSE_GRACE = "TOLLGATE_USAGE_CLOSE_GRACE";
    /// how far back the drain looks for late changes to drained minutes (refunds); must exceed
    /// the sidecars' `upstream_timeout` + `settle_window`; 5m..7d
    usage_lookback: Millis = "15m", env ENV_USAGE_LOOKBACK = "TOLLGATE_USAGE_LOOKBACK";
    /// minute rows of the usage ledger older than this are deleted (month rows are kept); at
    /// least `1d`
    usage_minute_retention: Millis = "35d",
        env ENV_USAGE_MINUTE_RETENTION = "TOLLGATE_USAGE_MINUTE_RETENTION";
}

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

impl Config {
    /// Merges the layers and validates the result. `file` is the config file's name and text,
    /// `flags` what the command line set.
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
        // Stands in for an address that does not parse: a problem, so the `Config` is discarded.
        let unbound = SocketAddr::from(([127, 0, 0, 1], 0));
        let listen = addr(problems, "listen", &s.listen);
        let internal_listen = addr(problems, "internal_listen", &s.internal_listen);
        if listen.is_some_and(|l| l.port() != 0) && internal_listen == listen {
            problems.push(
                "internal_listen",
                "must differ from listen: /internal/ is never on the public listener",
            );
        }
        let database_url = s.database_url;
        if let Err(e) = crate::db::tls::DbTarget::parse(database_url.expose()) {
            // The parser's message never repeats the URL, so no password can leak here.
            problems.push("database_url", format_args!("not a PostgreSQL URL: {e}"));
        }
        for (setting, file) in [
            ("database_ca_file", &s.database_ca_file),
            ("redis_ca_file", &s.redis_ca_file),
        ] {
            if let Some(path) = file
                && let Err(e) = crate::db::tls::read_roots(path)
            {
                problems.push(setting, e);
            }
        }
        let redis_url = s.redis_url;
        if let Err(e) = fred::types::config::Config::from_url(redis_url.expose()) {
            problems.push(
                "redis_url",
                format_args!("not a Redis URL: {}", e.details()),
            );
        }
        let redis_prefix = tollgate_common::config::redis_prefix(problems, s.redis_prefix);
        let public_url = s
            .public_url
            .unwrap_or_else(|| format!("http://{}", listen.unwrap_or(unbound)))
            .trim_end_matches('/')
            .to_owned();
        if !(public_url.starts_with("http://") || public_url.starts_with("https://")) {
            problems.push(
                "public_url",
                format_args!("{public_url:?} must start with http:// or https://"),
            );
        }
        let body_limit = s.body_limit_bytes;
        if !(1024..=64 << 20).contains(&body_limit) {
            problems.push(
                "body_limit_bytes",
                format_args!("{body_limit} is outside 1024..=67108864"),
            );
        }
        let notify_body_limit = s.notify_body_limit_bytes;
        if !(1024..=1 << 20).contains(&notify_body_limit) {
            problems.push(
                "notify_body_limit_bytes",
                format_args!("{notify_body_limit} is outside 1024..=1048576"),
            );
        }
        let notify_rejected_per_minute = s.notify_rejected_per_minute;
        let db_pool_size = s.db_pool_size;
        if !(1..=512).contains(&db_pool_size) {
            problems.push(
                "db_pool_size",
                format_args!("{db_pool_size} is outside 1..=512"),
            );
        }
        let log_filter = tollgate_common::config::log_filter(problems, s.log);
        if s.jwt_private_key.is_some() != s.jwt_kid.is_some() {
            problems.push(
                "jwt_kid",
                format_args!("{ENV_JWT_PRIVATE_KEY} and {ENV_JWT_KID} go together"),
            );
        }
        if s.jwt_private_key.is_some() && s.jwt_keys_dir.is_some() {
            problems.push(
                "jwt_keys_dir",
                format_args!("give either {ENV_JWT_KEYS_DIR} or {ENV_JWT_PRIVATE_KEY}, not both"),
            );
        }
        let access_ttl = s.access_token_ttl;
        if !(10_000..=24 * 3_600_000).contains(&access_ttl.0) {
            problems.push("access_token_ttl", "must be between 10s and 24h");
        }
        let refresh_ttl = s.refresh_token_ttl;
        if refresh_ttl.0 <= access_ttl.0 {
            problems.push(
                "refresh_token_ttl",
                "must be longer than the access token lifetime",
            );
        }
        let login = LoginConfig {
            max_failures_account: s.login_max_failures_account,
            max_failures_client: s.login_max_failures_client,
            base_delay: s.login_base_delay,
            max_delay: s.login_max_delay,
            window: s.login_window,
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
        let hash_concurrency = s.hash_concurrency;
        if !(1..=64).contains(&hash_concurrency) {
            problems.push(
                "hash_concurrency",
                format_args!("{hash_concurrency} is outside 1..=64"),
            );
        }
        let limits = ListenerLimits {
            max_connections: s.max_connections,
            max_in_flight: s.max_in_flight,
            idle_timeout: s.idle_timeout,
            header_read_timeout: s.header_read_timeout,
            body_read_timeout: s.body_read_timeout,
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
        let hash_queue = s.hash_queue;
        if hash_queue > 10_000 {
            problems.push("hash_queue", format_args!("{hash_queue} is above 10000"));
        }
        let jwt = JwtConfig {
            keys_dir: s.jwt_keys_dir,
            active_kid: s.jwt_active_kid,
            private_key: s.jwt_private_key,
            kid: s.jwt_kid,
            issuer: s.jwt_issuer,
            audience: s.jwt_audience,
            access_ttl,
            refresh_ttl,
        };
        let alipay = match (
            s.alipay_app_id,
            s.alipay_seller_id,
            s.alipay_app_private_key_file,
            s.alipay_public_key_file,
        ) {
            (None, None, None, None) => None,
            (Some(app_id), Some(seller_id), Some(app_private_key_file), Some(public_key_file)) => {
                Some(AlipaySettings {
                    gateway_url: s.alipay_gateway_url,
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
            s.wechat_mchid,
            s.wechat_appid,
            s.wechat_merchant_serial,
            s.wechat_merchant_private_key_file,
            s.wechat_platform_serial,
            s.wechat_platform_public_key_file,
            s.wechat_apiv3_key,
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
                    api_base: s.wechat_api_base.trim_end_matches('/').to_owned(),
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
        let usage_close_grace = s.usage_close_grace;
        if usage_close_grace.0 > 600_000 {
            problems.push("usage_close_grace", "must be at most 10m");
        }
        let usage_lookback = s.usage_lookback;
        if !(5 * 60_000..=7 * 86_400_000).contains(&usage_lookback.0) {
            problems.push("usage_lookback", "must be between 5m and 7d");
        }
        let usage_minute_retention = s.usage_minute_retention;
        if usage_minute_retention.0 < 86_400_000 {
            problems.push("usage_minute_retention", "must be at least 1d");
        }
        let order_ttl = s.order_ttl;
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
            trust_forwarded_for: s.trust_forwarded_for,
            listen: listen.unwrap_or(unbound),
            internal_listen: internal_listen.unwrap_or(unbound),
            database_url,
            redis_url,
            database_ca_file: s.database_ca_file,
            redis_ca_file: s.redis_ca_file,
            redis_prefix,
            public_url,
            data_dir: s.data_dir,
            body_limit,
            notify_body_limit,
            notify_rejected_per_minute,
            db_pool_size,
            log_format: s.log_format,
            log_filter,
            shutdown_grace: s.shutdown_grace,
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

    #[test]
    fn settings_are_documented_as_declared() {
        tollgate_testkit::check_settings("tollgate-control-plane", SETTINGS);
    }

    /// A variable both programs read has one default.
    #[test]
    fn shared_variables_have_one_default() {
        let mut shared = 0;
        for ours in SETTINGS {
            for theirs in tollgate_sidecar::config::SETTINGS {
                if ours.env == theirs.env {
                    assert_eq!(ours.default, theirs.default, "{}", ours.env);
                    assert_eq!(ours.key, theirs.key, "{}", ours.env);
                    shared += 1;
                }
            }
        }
        assert!(shared >= 8, "{shared}");
    }
}
