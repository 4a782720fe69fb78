//! The usage ledger under load and failure: counters, ledger sums and successful calls agree
//! after concurrent load over two sidecars with failing calls and the control plane killed
//! mid-way; a drain that dies after its commit, and two drains at once, count each bucket once;
//! Redis lost and replaced is rebuilt from PostgreSQL, every open window's counter exact.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fred::interfaces::{ClientLike, HashesInterface};
use serde_json::json;
use support::{Api, Cred, IDOCTOR_ROUTES, TestDb, config, demo_app, make_admin, serve, sidecar};
use tollgate_common::keys::{Keys, user_field};

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

/// The ledger's sums for one user and quota type: (amount, calls).
async fn ledger_sums(db: &TestDb, user: &str, quota_type: &str) -> (i64, i64) {
    let row = db
        .client()
        .await
        .query_one(
            "SELECT COALESCE(sum(amount), 0)::int8, COALESCE(sum(calls), 0)::int8
             FROM usage_minutes WHERE user_id = $1::text::uuid AND quota_key = $2",
            &[&user, &quota_type],
        )
        .await
        .expect("sums");
    (row.get(0), row.get(1))
}

/// The user's counter in Redis for one quota type (of any window).
async fn counter(redis: &fred::clients::Client, keys: &Keys, user: &str, quota_type: &str) -> i64 {
    let uid: uuid::Uuid = user.parse().expect("uuid");
    let value: Option<String> = redis
        .hget(keys.user(uid), user_field::counter("idoctor", quota_type))
        .await
        .expect("hget");
    value
        .as_deref()
        .and_then(user_field::parse_counter)
        .map_or(0, |(used, _)| used)
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

    // 1,000 successful calls and 430 failing ones (30 %), over two sidecars, 64 at a time; the
    // control plane is SIGKILLed after the first half and restarted.
    let mut ok = 0;
    let mut failed = 0;
    for round in 0..2 {
        let calls = (0..715).map(|i| {
            let base = if i % 2 == 0 { &a.base } else { &b.base };
            let patient = if i % 13 < 4 && i < 645 || i >= 700 {
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
            .buffer_unordered(64)
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
    assert_eq!(ok + failed, 1430);
    assert_eq!(failed, 1430 - ok, "every call answered 200 or 500");
    let ok = ok as i64;

    // Counters == successful calls at once; the ledger agrees once the minutes have closed.
    let redis = support::redis().await;
    let keys = Keys::new(config.redis_prefix.clone());
    assert_eq!(
        counter(&redis, &keys, &user, "api_calls_l3_detect").await,
        ok
    );
    support::drain_now(&config).await;
    assert_eq!(
        ledger_sums(&db, &user, "api_calls_l3_detect").await,
        (ok, ok),
        "ledger == counter == successful calls"
    );
    // Nothing late or drained twice is counted again.
    support::drain_now(&config).await;
    assert_eq!(
        ledger_sums(&db, &user, "api_calls_l3_detect").await,
        (ok, ok)
    );
    let pg = db.client().await;
    let rows: i64 = pg
        .query_one("SELECT count(*) FROM usage_minutes", &[])
        .await
        .expect("count")
        .get(0);
    assert!(
        rows <= 10,
        "one row per user, route and minute, not per call: {rows}"
    );
    drop(cp);
    support::delete_prefix(&redis, &config.redis_prefix).await;
}

#[tokio::test]
async fn a_drain_that_dies_after_its_commit_and_two_drains_at_once_count_each_bucket_once() {
    let db = TestDb::migrated().await;
    let config = config(&db);
    let cp = serve(config.clone()).await;
    let api = Api::new(&cp.base);
    let (user, token, _) = api.register("twice@example.com", PW).await;
    let app = demo_app().await;
    let sc = sidecar(&config, &cp.base, &cp.internal, &app, IDOCTOR_ROUTES).await;
    let http = reqwest::Client::new();
    let call = |i: usize| {
        http.post(format!("{}/process/p{i}/2026-11-25", sc.base))
            .bearer_auth(&token)
            .send()
    };
    for i in 0..5 {
        assert_eq!(call(i).await.expect("send").status(), 200);
    }
    let redis_client = support::redis().await;
    let drainer = || {
        tollgate_control_plane::ledger::Drainer::new(
            tollgate_control_plane::db::pool(config.database_url.expose(), 2, None).expect("pool"),
            redis_client.clone(),
            Keys::new(config.redis_prefix.clone()),
            std::sync::Arc::new(tollgate_control_plane::metrics::Metrics::new()),
            tollgate_control_plane::ledger::DrainSettings::default(),
        )
    };
    let now = chrono::Utc::now().timestamp_millis();
    let (from, later) = (now - 600_000, now + 120_000);

    // A pass that commits and dies before deleting what it staged.
    let dying = drainer();
    let staged = dying.stage(from, later).await.expect("stage");
    assert!(!staged.is_empty());
    dying.record(&staged).await.expect("record");
    assert_eq!(
        ledger_sums(&db, &user, "api_calls_full_process").await,
        (5, 5)
    );
    // A later pass (once the dead one's buckets have waited long enough) finds the staged
    // buckets again and adds nothing.
    let pass = drainer()
        .pass_from(from, later + 60_000)
        .await
        .expect("pass");
    assert_eq!(pass.recorded.applied, 0, "{pass:?}");
    assert!(pass.recorded.duplicate > 0, "{pass:?}");
    assert_eq!(
        ledger_sums(&db, &user, "api_calls_full_process").await,
        (5, 5)
    );

    // Two drainers at once, over the same new buckets: each bucket is added once.
    for i in 0..4 {
        assert_eq!(call(10 + i).await.expect("send").status(), 200);
    }
    let (one, two) = (drainer(), drainer());
    let (a, b) = tokio::join!(one.pass_from(from, later), two.pass_from(from, later));
    let (a, b) = (a.expect("first"), b.expect("second"));
    assert_eq!(a.recorded.applied + b.recorded.applied, 1, "{a:?} {b:?}");
    assert_eq!(
        ledger_sums(&db, &user, "api_calls_full_process").await,
        (9, 9)
    );
    // And a call refunded after its minute was drained comes out of that minute's row.
    assert_eq!(
        http.post(format!("{}/process/fail/2026-11-25", sc.base))
            .bearer_auth(&token)
            .send()
            .await
            .expect("send")
            .status(),
        500
    );
    drainer().pass_from(from, later).await.expect("pass");
    assert_eq!(
        ledger_sums(&db, &user, "api_calls_full_process").await,
        (9, 9)
    );
    support::delete_prefix(&redis_client, &config.redis_prefix).await;
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
    // An upload of 1,500 bytes (a lifetime quota) too.
    let r = http
        .post(format!("{}/upload", sc.base))
        .bearer_auth(&token)
        .body(vec![b'x'; 1500])
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 201);
    support::drain_now(&config).await;
    assert_eq!(
        ledger_sums(&db, &user, "api_calls_full_process").await,
        (7, 7)
    );
    assert_eq!(ledger_sums(&db, &user, "storage_bytes").await, (1500, 1));

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
    let started = std::time::Instant::now();
    loop {
        let limit: Option<String> = redis
            .hget(keys.user(uid), "q:idoctor:api_calls_full_process")
            .await
            .expect("hget");
        let used = counter(&redis, &keys, &user, "api_calls_full_process").await;
        let stored = counter(&redis, &keys, &user, "storage_bytes").await;
        if limit.as_deref() == Some("50|month") && used == 7 && stored == 1500 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "not rebuilt: {limit:?} {used:?} {stored}"
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

/// A pass that dies before its commit leaves buckets of many shards staged under one stamp; the
/// pass that takes them over records them in other groups of shards than the dead one had: every
/// bucket is recorded once, whatever the grouping.
#[tokio::test]
async fn buckets_a_dead_pass_left_staged_are_recorded_once_by_whoever_takes_them_over() {
    use fred::interfaces::HashesInterface;
    let db = TestDb::migrated().await;
    let config = config(&db);
    let keys = Keys::new(config.redis_prefix.clone());
    let redis = support::redis().await;
    let pg = db.client().await;
    // 40 users spread over the shards (and so over the drain's groups of 64 shards), each with
    // usage in two minutes, written as the sidecars write it.
    let now = chrono::Utc::now().timestamp_millis();
    let minutes = [
        tollgate_common::keys::bucket_start(now - 180_000),
        tollgate_common::keys::bucket_start(now - 120_000),
    ];
    let suffix = tollgate_common::keys::bucket_field::suffix(
        "idoctor",
        "api_calls_l3_detect",
        "POST /l3/{patient}",
    );
    let mut users = Vec::new();
    for i in 0..40 {
        let user = uuid::Uuid::new_v4();
        pg.execute(
            "INSERT INTO users (id, email, password_hash) VALUES ($1, $2, 'x')",
            &[&user, &format!("u{i}@example.com")],
        )
        .await
        .expect("user");
        for (j, minute) in minutes.iter().enumerate() {
            let bucket = keys.bucket(tollgate_common::keys::shard(user), *minute);
            let calls = (i + j + 1) as i64;
            let _: () = redis
                .hset(
                    bucket,
                    [
                        (format!("a:{user}|{suffix}"), (calls * 2).to_string()),
                        (format!("n:{user}|{suffix}"), calls.to_string()),
                    ],
                )
                .await
                .expect("bucket");
        }
        users.push((user, (2 * i + 3) as i64));
    }
    let drainer = || {
        tollgate_control_plane::ledger::Drainer::new(
            tollgate_control_plane::db::pool(config.database_url.expose(), 2, None).expect("pool"),
            redis.clone(),
            keys.clone(),
            std::sync::Arc::new(tollgate_control_plane::metrics::Metrics::new()),
            tollgate_control_plane::ledger::DrainSettings::default(),
        )
    };
    // The dead pass: staged everything under one stamp, recorded nothing.
    let staged = drainer()
        .stage(minutes[0] - 60_000, now)
        .await
        .expect("stage");
    let shards: std::collections::HashSet<u16> = users
        .iter()
        .map(|(u, _)| tollgate_common::keys::shard(*u))
        .collect();
    assert_eq!(
        staged.len(),
        2 * shards.len(),
        "two minutes of the users' shards"
    );
    // Two takeovers (the first may find some groups empty): all of it, once.
    for _ in 0..2 {
        drainer()
            .pass_from(minutes[0] - 60_000, now + 60_000)
            .await
            .expect("pass");
    }
    for (user, calls) in users {
        let row = pg
            .query_one(
                "SELECT COALESCE(sum(amount), 0)::int8, COALESCE(sum(calls), 0)::int8
                 FROM usage_minutes WHERE user_id = $1",
                &[&user],
            )
            .await
            .expect("sums");
        assert_eq!(
            (row.get::<_, i64>(0), row.get::<_, i64>(1)),
            (calls * 2, calls),
            "user {user} in shard {}",
            tollgate_common::keys::shard(user)
        );
    }
    support::delete_prefix(&redis, &config.redis_prefix).await;
}
