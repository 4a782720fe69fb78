//! What the control plane's and the sidecar's tests share (a dev-dependency of both, never of a
//! program): a sidecar started in process on 127.0.0.1:0 ([`SidecarSetup::start`]), the removal of
//! a test's Redis keys ([`delete_prefix`], [`RedisPrefix`] on drop), a temporary directory, and the
//! check that docs/configuration.md shows a program's settings as declared ([`check_settings`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fred::interfaces::{ClientLike, KeysInterface};
use tollgate_common::config::SettingDoc;
use tollgate_sidecar::config as sidecar;

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!("tg-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where a test sidecar finds the control plane, Redis and the app; every other setting is its
/// default unless `extra` sets it.
pub struct SidecarSetup<'a> {
    /// The control plane's public listener (the JWKS).
    pub control_plane: &'a str,
    /// The control plane's internal listener (the refill call).
    pub control_plane_internal: &'a str,
    pub redis_url: &'a str,
    pub redis_prefix: &'a str,
    pub upstream: &'a str,
    /// The routes file's text.
    pub routes: &'a str,
    /// More settings by environment variable (`tollgate_sidecar::config::ENV_*`); they win.
    pub extra: &'a [(&'a str, &'a str)],
}

/// A sidecar running in this process; it stops when this is dropped.
pub struct Sidecar {
    pub base: String,
    pub admin: String,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: TempDir,
}

impl SidecarSetup<'_> {
    /// The environment a sidecar is configured from, with its routes file at `routes`.
    pub fn env(&self, routes: &Path) -> BTreeMap<String, String> {
        let mut env: BTreeMap<String, String> = [
            (sidecar::ENV_ROUTES, routes.display().to_string()),
            (sidecar::ENV_UPSTREAM, self.upstream.to_owned()),
            (
                sidecar::ENV_CONTROL_PLANE_URL,
                self.control_plane.to_owned(),
            ),
            (
                sidecar::ENV_CONTROL_PLANE_INTERNAL_URL,
                self.control_plane_internal.to_owned(),
            ),
            (sidecar::ENV_REDIS_URL, self.redis_url.to_owned()),
            (sidecar::ENV_REDIS_PREFIX, self.redis_prefix.to_owned()),
            (sidecar::ENV_REDIS_TIMEOUT, "500ms".to_owned()),
            (sidecar::ENV_LOG_FORMAT, "text".to_owned()),
            // The listeners are handed in bound; these only have to pass validation.
            (sidecar::ENV_LISTEN, "127.0.0.1:0".to_owned()),
            (sidecar::ENV_ADMIN_LISTEN, "127.0.0.1:1".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (k, v) in self.extra {
            env.insert((*k).to_owned(), (*v).to_owned());
        }
        env
    }

    /// Starts the sidecar through `tollgate_sidecar::run` and waits until `/readyz` answers 200
    /// (the JWKS loaded, Redis answering), or five seconds have passed.
    pub async fn start(&self) -> Sidecar {
        let dir = TempDir::new();
        let path = dir.0.join("routes.yaml");
        std::fs::write(&path, self.routes).expect("write routes");
        let config = sidecar::Config::load(None, &self.env(&path), Default::default())
            .expect("valid sidecar config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let admin_url = format!("http://{}", admin.local_addr().expect("addr"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(e) = tollgate_sidecar::run(config, listener, admin, shutdown).await {
                panic!("sidecar failed: {e}");
            }
        });
        let http = reqwest::Client::new();
        for _ in 0..100 {
            if let Ok(r) = http.get(format!("{admin_url}/readyz")).send().await
                && r.status() == 200
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Sidecar {
            base,
            admin: admin_url,
            _stop: stop,
            _dir: dir,
        }
    }
}

/// Deletes every Redis key under `prefix` (`<prefix>:*`) and nothing else: SCAN (on every
/// master of a cluster), then UNLINK.
pub async fn delete_prefix(redis: &fred::clients::Client, prefix: &str) {
    use fred::types::scan::Scanner;
    use futures_util::{StreamExt, TryStreamExt};
    let pattern = format!("{prefix}:*");
    let mut scan = if redis.is_clustered() {
        redis.scan_cluster(pattern, Some(1000), None).boxed()
    } else {
        redis.scan(pattern, Some(1000), None).boxed()
    };
    let mut found = Vec::new();
    while let Ok(Some(mut page)) = scan.try_next().await {
        found.extend(page.take_results().unwrap_or_default());
    }
    // One key per call: in a cluster the keys of one call must share a slot.
    for key in found {
        let _: Result<(), _> = redis.unlink(key).await;
    }
}

/// A test's Redis key prefix; its keys are deleted when this is dropped, so a test that fails
/// half-way leaves nothing behind either.
pub struct RedisPrefix {
    pub url: String,
    pub prefix: String,
}

impl RedisPrefix {
    /// A fresh prefix (`t` and 10 hex digits) on the Redis at `url`.
    pub fn new(url: &str) -> RedisPrefix {
        RedisPrefix {
            url: url.to_owned(),
            prefix: format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10]),
        }
    }
}

impl Drop for RedisPrefix {
    fn drop(&mut self) {
        let (url, prefix) = (self.url.clone(), self.prefix.clone());
        // Drop may run inside the test's runtime, which cannot be blocked on: a thread with a
        // runtime of its own deletes the keys, and is joined.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let Ok(config) = fred::types::config::Config::from_url(&url) else {
                    return;
                };
                let Ok(redis) = fred::types::Builder::from_config(config).build() else {
                    return;
                };
                if redis.init().await.is_ok() {
                    delete_prefix(&redis, &prefix).await;
                    let _ = redis.quit().await;
                }
            });
        })
        .join();
    }
}

/// Checks a program's settings table — flags spelt `--` and the key with `-` for `_`, keys and
/// variables unique — and that docs/configuration.md shows it between
/// `<!-- settings: PROGRAM … -->` and `<!-- end settings -->`. With `TOLLGATE_BLESS=1` it
/// rewrites the doc instead of failing.
pub fn check_settings(program: &str, settings: &[SettingDoc]) {
    for (i, s) in settings.iter().enumerate() {
        if let Some(flag) = s.flag {
            assert_eq!(flag, format!("--{}", s.key.replace('_', "-")), "{}", s.key);
        }
        assert!(
            settings[..i]
                .iter()
                .all(|t| t.key != s.key && t.env != s.env),
            "{} or {} is declared twice",
            s.key,
            s.env
        );
        assert!(!s.help.is_empty(), "{} has no help", s.key);
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
    let doc = std::fs::read_to_string(&path).expect("docs/configuration.md");
    let table = tollgate_common::config::doc_table(settings);
    let Some(updated) = tollgate_common::config::splice_doc_table(&doc, program, &table) else {
        panic!(
            "docs/configuration.md has no `<!-- settings: {program} ... -->` … `<!-- end settings -->`"
        );
    };
    if updated == doc {
        return;
    }
    if std::env::var_os("TOLLGATE_BLESS").is_some() {
        std::fs::write(&path, updated).expect("write docs/configuration.md");
    } else {
        panic!(
            "docs/configuration.md does not show {program}'s settings as declared; \
             rewrite it with `TOLLGATE_BLESS=1 cargo test --workspace --lib config`"
        );
    }
}
