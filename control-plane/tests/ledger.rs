//! The usage ledger under failure: the control plane killed mid-stream loses nothing and counts
//! nothing twice; Redis lost and replaced is rebuilt from PostgreSQL, counters included.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fred::interfaces::{ClientLike, HashesInterface};
use serde_json::json;
use support::{Api, Cred, IDOCTOR_ROUTES, TestDb, config, demo_app, make_admin, serve, sidecar};
use tollgate_common::keys::Keys;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate-control-plane");
const PW: &str = "correct horse battery";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Kills the child when dropped, so a failing test leaves no process behind.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_control_plane(
    config: &tollgate_control_plane::config::Config,
    port: u16,
    internal_port: u16,
) -> Killed {
    Killed(
        Command::new(BIN)
            .arg("serve")
            .env("DATABASE_URL", config.database_url.expose())
            .env("REDIS_URL", config.redis_url.expose())
            .env("TOLLGATE_REDIS_PREFIX", &config.redis_prefix)
            .env("TOLLGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "TOLLGATE_INTERNAL_LISTEN",
                format!("127.0.0.1:{internal_port}"),
            )
            .env("TOLLGATE_JWT_PRIVATE_KEY", support::test_pem())
            .env("TOLLGATE_JWT_KID", support::TEST_KID)
            .env("TOLLGATE_LOG_FORMAT", "text")
            .env("TOLLGATE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn control plane"),
    )
}

async fn wait_ready(base: &str) {
    let http = reqwest::Client::new();
    for _ in 0..200 {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("control plane at {base} never became ready");
}

async fn ledger_count(db: &TestDb, user: &str) -> i64 {
    db.client()
        .await
        .query_one(
            "SELECT count(*) FROM usage_events WHERE user_id = $1::text::uuid",
            &[&user],
        )
        .await
        .expect("count")
        .get(0)
}

#[tokio::test]
async fn killing_the_control_plane_mid_stream_loses_and_doubles_nothing() {
    let db = TestDb::migrated().await;
    let config = config(&db);
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let internal_port = free_port();
    let internal = format!("http://127.0.0.1:{internal_port}");
    let mut cp = spawn_control_plane(&config, port, internal_port);
    wait_ready(&base).await;
    let api = Api::new(&base);
    let (user, token, _) = api.register("heavy@example.com", PW).await;
    api.register("root@example.com", PW).await;
    let admin = make_admin(&db, &api, "root@example.com", PW).await;
    let grant = api
        .post(
            &format!("/v1/admin/users/{user}/grants"),
            Cred::Bearer(&admin),
            json!({"app": "idoctor", "type": "api_calls_l3_detect", "amount": 2000, "reason": "load test"}),
        )
        .await;
    assert_eq!(grant.status, 201);
    let app = demo_app().await;
    // The demo's per-user rate limit would refuse a burst of 1,100 calls; lift it here.
    let routes = IDOCTOR_ROUTES
        .replace("rate: 100\n", "rate: 100000\n")
        .replace("burst: 200", "burst: 100000");
    assert_ne!(routes, IDOCTOR_ROUTES);
    let a = sidecar(&config, &base, &internal, &app, &routes).await;
    let b = sidecar(&config, &base, &internal, &app, &routes).await;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .expect("client");

    // 1,000 successful calls and 100 failing ones, over two sidecars, 16 at a time; the control
    // plane is SIGKILLed after the first half and restarted.
    let mut ok = 0;
    let mut failed = 0;
    for round in 0..2 {
        let calls = (0..550).map(|i| {
            let base = if i % 2 == 0 { &a.base } else { &b.base };
            let patient = if i % 11 == 10 {
                "fail".to_owned()
            } else {
                format!("p{round}x{i}")
            };
            let request = http
                .post(format!("{base}/l3/{patient}"))
                .bearer_auth(&token)
                .send();
            async move { request.await.map(|r| r.status().as_u16()).unwrap_or(0) }
        });
        use futures_util::StreamExt;
        let statuses: Vec<u16> = futures_util::stream::iter(calls)
            .buffer_unordered(16)
            .collect()
            .await;
        ok += statuses.iter().filter(|s| **s == 200).count();
        failed += statuses.iter().filter(|s| **s == 500).count();
        if round == 0 {
            cp.0.kill().expect("SIGKILL");
            cp.0.wait().expect("reaped");
            cp = spawn_control_plane(&config, port, internal_port);
            wait_ready(&base).await;
        }
    }
    assert_eq!(ok, 1000);
    assert_eq!(failed, 100);

    let started = Instant::now();
    loop {
        let n = ledger_count(&db, &user).await;
        if n == 1000 {
            break;
        }
        assert!(n < 1000, "the ledger counted a request twice: {n}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "ledger stuck at {n}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pg = db.client().await;
    let fails: i64 = pg
        .query_one(
            "SELECT count(*) FROM usage_events WHERE path LIKE '%/fail'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(fails, 0, "refunded requests are not in the ledger");
    let distinct: i64 = pg
        .query_one("SELECT count(DISTINCT path) FROM usage_events", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(distinct, 1000, "one row per request");
    // It stays exactly 1,000 (nothing late or redelivered is counted again).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(ledger_count(&db, &user).await, 1000);
    drop(cp);
    let redis = support::redis().await;
    support::delete_prefix(&redis, &config.redis_prefix).await;
}

#[tokio::test]
async fn losing_redis_is_repaired_by_reconcile_with_counters_from_the_ledger() {
    let db = TestDb::migrated().await;
    let config = config(&db);
    let cp = serve(config.clone()).await;
    let api = Api::new(&cp.base);
    let (user, token, _) = api.register("survivor@example.com", PW).await;
    let app = demo_app().await;
    let sc = sidecar(&config, &cp.base, &cp.internal, &app, IDOCTOR_ROUTES).await;
    let http = reqwest::Client::new();
    for i in 0..7 {
        let r = http
            .post(format!("{}/process/p{i}/2026-11-25", sc.base))
            .bearer_auth(&token)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
    }
    let started = Instant::now();
    while ledger_count(&db, &user).await < 7 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "ledger did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A fresh, empty redis-server of the test's own.
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("tg-fresh-redis-{port}"));
    std::fs::create_dir_all(&dir).expect("dir");
    let fresh = Killed(
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                dir.to_str().expect("utf-8"),
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server"),
    );
    let fresh_url = format!("redis://127.0.0.1:{port}");
    let mut moved = config.clone();
    moved.redis_url = tollgate_common::config::Secret::new(fresh_url.clone());
    let redis = support::redis_at(&fresh_url).await;
    // The control plane restarted against it reconciles at start.
    let cp2 = serve(moved.clone()).await;
    let keys = Keys::new(config.redis_prefix.clone());
    let uid: uuid::Uuid = user.parse().expect("uuid");
    let started = Instant::now();
    loop {
        let limit: Option<String> = redis
            .hget(keys.user(uid), "q:idoctor:api_calls_full_process")
            .await
            .expect("hget");
        let used: Option<i64> = redis
            .hget(keys.counter(uid, "idoctor", "api_calls_full_process"), "u")
            .await
            .expect("hget");
        if limit.as_deref() == Some("50|month") && used == Some(7) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "not rebuilt: {limit:?} {used:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A sidecar on the new Redis continues from 7 used, not from zero.
    let sc2 = sidecar(&moved, &cp2.base, &cp2.internal, &app, IDOCTOR_ROUTES).await;
    let r = http
        .post(format!("{}/process/p9/2026-11-25", sc2.base))
        .bearer_auth(&token)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-quota-remaining"], "42");
    let _ = redis.quit().await;
    drop(fresh);
    let _ = std::fs::remove_dir_all(&dir);
    let shared = support::redis().await;
    support::delete_prefix(&shared, &config.redis_prefix).await;
}
