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
    let env: BTreeMap<String, String> = [
        ("DATABASE_URL".to_owned(), db.url.clone()),
        ("REDIS_URL".to_owned(), redis_url()),
        ("TOLLGATE_REDIS_PREFIX".to_owned(), redis_prefix()),
        ("TOLLGATE_LOG_FORMAT".to_owned(), "text".to_owned()),
        (
            "TOLLGATE_JWT_PRIVATE_KEY".to_owned(),
            tollgate_control_plane::auth::signing::generate_pem(),
        ),
        ("TOLLGATE_JWT_KID".to_owned(), "test-key-1".to_owned()),
    ]
    .into();
    Config::load(None, &env, Layer::default()).expect("test config is valid")
}

/// A running control plane on 127.0.0.1:0; stops when the returned sender is dropped.
pub struct Server {
    pub base: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

pub async fn serve(config: Config) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stopped.await;
        };
        if let Err(e) = tollgate_control_plane::run(config, listener, shutdown).await {
            panic!("control plane failed: {e}");
        }
    });
    Server { base, _stop: stop }
}
