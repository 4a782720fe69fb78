//! Test support: each test gets its own PostgreSQL database (created here, dropped when the test
//! ends) and its own Redis key prefix, on the servers at `DATABASE_URL` and `REDIS_URL`. Nothing
//! else on those servers is touched.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::str::FromStr;

use tokio_postgres::NoTls;
use tollgate_control_plane::config::{Config, Layer};

pub fn server_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn with_dbname(url: &str, dbname: &str) -> String {
    let mut config = tokio_postgres::Config::from_str(url).expect("DATABASE_URL parses");
    config.dbname(dbname);
    // tokio-postgres cannot print a Config back as a URL; build a key=value string instead.
    let mut parts = vec![format!("dbname={dbname}")];
    if let Some(user) = config.get_user() {
        parts.push(format!("user={user}"));
    }
    if let Some(password) = config.get_password() {
        parts.push(format!(
            "password={}",
            String::from_utf8_lossy(password)
                .replace('\\', "\\\\")
                .replace(' ', "\\ ")
        ));
    }
    for host in config.get_hosts() {
        match host {
            tokio_postgres::config::Host::Tcp(h) => parts.push(format!("host={h}")),
            tokio_postgres::config::Host::Unix(p) => parts.push(format!("host={}", p.display())),
        }
    }
    if let Some(port) = config.get_ports().first() {
        parts.push(format!("port={port}"));
    }
    parts.join(" ")
}

/// A database of this test's own.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let name = format!("tollgate_test_{}", uuid::Uuid::new_v4().simple());
        let admin = with_dbname(&server_url(), "postgres");
        let (client, conn) = tokio_postgres::connect(&admin, NoTls)
            .await
            .expect("connect to the test PostgreSQL server (DATABASE_URL)");
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let url = with_dbname(&server_url(), &name);
        TestDb { name, url }
    }

    /// A fresh database with the schema and the seed.
    pub async fn migrated() -> TestDb {
        let db = TestDb::new().await;
        let mut client = db.client().await;
        tollgate_control_plane::db::migrate::run(&mut client)
            .await
            .expect("migrate");
        tollgate_control_plane::db::seed::run(&mut client)
            .await
            .expect("seed");
        db
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        tollgate_control_plane::db::connect(&self.url)
            .await
            .expect("connect to test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = with_dbname(&server_url(), "postgres");
        let name = self.name.clone();
        // Drop runs outside any runtime guarantee; a scoped thread with its own runtime does the
        // async clean-up and is joined, so the database is gone when the test ends.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                if let Ok((client, conn)) = tokio_postgres::connect(&admin, NoTls).await {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// A unique Redis key prefix for one test.
pub fn redis_prefix() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// A config pointing at this test's database and Redis prefix.
pub fn config(db: &TestDb) -> Config {
    config_with(db, &[])
}

/// The signing key every test control plane uses, so tests can forge tokens with the real key.
pub const TEST_KID: &str = "test-key-1";

pub fn test_pem() -> &'static str {
    static PEM: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PEM.get_or_init(tollgate_control_plane::auth::signing::generate_pem)
}

/// A config with extra environment settings.
pub fn config_with(db: &TestDb, extra: &[(&str, &str)]) -> Config {
    let mut env: BTreeMap<String, String> = [
        ("DATABASE_URL".to_owned(), db.url.clone()),
        ("REDIS_URL".to_owned(), redis_url()),
        ("TOLLGATE_REDIS_PREFIX".to_owned(), redis_prefix()),
        ("TOLLGATE_LOG_FORMAT".to_owned(), "text".to_owned()),
        ("TOLLGATE_JWT_PRIVATE_KEY".to_owned(), test_pem().to_owned()),
        ("TOLLGATE_JWT_KID".to_owned(), TEST_KID.to_owned()),
    ]
    .into();
    for (k, v) in extra {
        env.insert((*k).to_owned(), (*v).to_owned());
    }
    Config::load(None, &env, Layer::default()).expect("test config is valid")
}

/// A running control plane on 127.0.0.1:0; stops when the returned sender is dropped.
pub struct Server {
    pub base: String,
    /// The internal listener (`/internal/`), where sidecars call.
    pub internal: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    redis_url: String,
    redis_ca: Option<std::path::PathBuf>,
    prefix: String,
}

impl Drop for Server {
    /// Stops the server, then deletes the keys it made under the test's prefix (its usage
    /// streams and consumer groups included) and nothing else.
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let (url, prefix, ca) = (
            self.redis_url.clone(),
            self.prefix.clone(),
            self.redis_ca.clone(),
        );
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                // Let the server's workers stop before their keys go.
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                let redis = redis_with_ca(&url, ca.as_deref()).await;
                delete_prefix(&redis, &prefix).await;
            });
        })
        .join();
    }
}

pub async fn serve(config: Config) -> Server {
    // The first test to get here installs the logger for the whole test process.
    std::mem::forget(tollgate_common::telemetry::init(
        tollgate_common::config::LogFormat::Text,
        "warn,tollgate_control_plane=info",
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let internal = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let internal_base = format!("http://{}", internal.local_addr().expect("addr"));
    let redis_url = config.redis_url.expose().to_owned();
    let redis_ca = config.redis_ca_file.clone();
    let prefix = config.redis_prefix.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stopped.await;
        };
        if let Err(e) =
            tollgate_control_plane::run_with_internal(config, listener, internal, shutdown).await
        {
            panic!("control plane failed: {e}");
        }
    });
    Server {
        base,
        internal: internal_base,
        stop: Some(stop),
        redis_url,
        redis_ca,
        prefix,
    }
}

/// A small JSON client for tests.
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: serde_json::Value,
}

#[derive(Clone, Copy)]
pub enum Cred<'a> {
    None,
    Bearer(&'a str),
    Key(&'a str),
}

impl Api {
    pub fn new(base: &str) -> Api {
        Api {
            base: base.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        cred: Cred<'_>,
        body: Option<serde_json::Value>,
    ) -> Reply {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        request = match cred {
            Cred::None => request,
            Cred::Bearer(token) => request.bearer_auth(token),
            Cred::Key(key) => request.header("x-api-key", key),
        };
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body");
        let body = if text.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str, cred: Cred<'_>) -> Reply {
        self.call(reqwest::Method::GET, path, cred, None).await
    }

    pub async fn post(&self, path: &str, cred: Cred<'_>, body: serde_json::Value) -> Reply {
        self.call(reqwest::Method::POST, path, cred, Some(body))
            .await
    }

    pub async fn delete(&self, path: &str, cred: Cred<'_>) -> Reply {
        self.call(reqwest::Method::DELETE, path, cred, None).await
    }

    pub async fn patch(&self, path: &str, cred: Cred<'_>, body: serde_json::Value) -> Reply {
        self.call(reqwest::Method::PATCH, path, cred, Some(body))
            .await
    }

    /// Registers a user; returns (user id, access token, refresh token).
    pub async fn register(&self, email: &str, password: &str) -> (String, String, String) {
        let reply = self
            .post(
                "/v1/auth/register",
                Cred::None,
                serde_json::json!({"email": email, "password": password}),
            )
            .await;
        assert_eq!(reply.status, 201, "register {email}: {:?}", reply.body);
        (
            reply.body["user"]["id"].as_str().expect("id").to_owned(),
            reply.body["access_token"]
                .as_str()
                .expect("access")
                .to_owned(),
            reply.body["refresh_token"]
                .as_str()
                .expect("refresh")
                .to_owned(),
        )
    }
}

/// A Redis connection for assertions, on the test's own prefix only.
pub async fn redis() -> fred::clients::Client {
    redis_at(&redis_url()).await
}

pub async fn redis_at(url: &str) -> fred::clients::Client {
    redis_with_ca(url, None).await
}

pub async fn redis_with_ca(url: &str, ca: Option<&std::path::Path>) -> fred::clients::Client {
    use fred::interfaces::ClientLike;
    let client = tollgate_control_plane::redis::client_with_ca(url, ca).expect("redis config");
    let mut tries = 0;
    loop {
        match client.init().await {
            Ok(_) => return client,
            Err(e) if tries < 50 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("redis at {url}: {e}"),
        }
    }
}

pub use tollgate_testkit::{Sidecar, delete_prefix};

/// A sidecar (in process) in front of `upstream`, reading the same Redis prefix as `config`,
/// with the routes file `routes` (its `upstream` is overridden).
pub async fn sidecar(
    config: &Config,
    control_plane: &str,
    control_plane_internal: &str,
    upstream: &str,
    routes: &str,
) -> Sidecar {
    use tollgate_sidecar::config::{ENV_REDIS_CA_FILE, ENV_REDIS_TIMEOUT};
    let ca = config
        .redis_ca_file
        .as_ref()
        .map(|ca| ca.display().to_string());
    let mut extra = vec![(ENV_REDIS_TIMEOUT, "1s")];
    if let Some(ca) = &ca {
        extra.push((ENV_REDIS_CA_FILE, ca));
    }
    tollgate_testkit::SidecarSetup {
        control_plane,
        control_plane_internal,
        redis_url: config.redis_url.expose(),
        redis_prefix: &config.redis_prefix,
        upstream,
        routes,
        extra: &extra,
    }
    .start()
    .await
}

/// The demo iDoctor app on 127.0.0.1:0.
pub async fn demo_app() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(tollgate_demo_idoctor::run(listener, std::future::pending()));
    format!("http://{addr}")
}

pub const IDOCTOR_ROUTES: &str = include_str!("../../../demo/idoctor/routes.yaml");

/// Makes a registered user an admin and logs in again; returns the admin's access token.
pub async fn make_admin(db: &TestDb, api: &Api, email: &str, password: &str) -> String {
    let client = db.client().await;
    client
        .execute(
            "UPDATE users SET role = 'admin' WHERE lower(email) = lower($1)",
            &[&email],
        )
        .await
        .expect("promote");
    let login = api
        .post(
            "/v1/auth/login",
            Cred::None,
            serde_json::json!({"email": email, "password": password}),
        )
        .await;
    assert_eq!(login.status, 200, "{:?}", login.body);
    login.body["access_token"]
        .as_str()
        .expect("token")
        .to_owned()
}

/// Drains every usage bucket of the test's prefix into its database as the control plane would
/// two minutes from now, when the current minute has closed: what a user sees in `/v1/usage`
/// once time has passed, without waiting for it. (Draining a minute early is safe: a later write
/// to it starts a new bucket, which a later pass adds.)
pub async fn drain_now(config: &Config) -> tollgate_control_plane::ledger::Pass {
    use tollgate_control_plane::ledger::{DrainSettings, Drainer};
    let db = tollgate_control_plane::db::pool(config.database_url.expose(), 2, None).expect("pool");
    let drainer = Drainer::new(
        db,
        redis_at(config.redis_url.expose()).await,
        tollgate_common::keys::Keys::new(config.redis_prefix.clone()),
        std::sync::Arc::new(tollgate_control_plane::metrics::Metrics::new()),
        DrainSettings::default(),
    );
    let now = chrono::Utc::now().timestamp_millis();
    drainer
        .pass_from(now - 20 * 60_000, now + 2 * 60_000)
        .await
        .expect("drain pass")
}

/// The user's usage over every granularity of `GET /v1/usage` (all pages): per granularity, the
/// sums of amount and calls. They must agree.
pub async fn usage_totals(api: &Api, cred: Cred<'_>, query: &str) -> Vec<(String, i64, i64)> {
    let mut out = Vec::new();
    for g in ["minute", "hour", "day", "month"] {
        let (mut amount, mut calls) = (0, 0);
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/v1/usage?granularity={g}&limit=7{query}");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let page = api.get(&path, cred).await;
            assert_eq!(page.status, 200, "{path}: {:?}", page.body);
            for item in page.body["items"].as_array().expect("items") {
                assert_eq!(item["granularity"], g);
                amount += item["amount"].as_i64().expect("amount");
                calls += item["calls"].as_i64().expect("calls");
            }
            match page.body["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
        }
        out.push((g.to_owned(), amount, calls));
    }
    out
}
