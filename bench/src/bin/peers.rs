//! `tollgate-peers` — Tollgate's decision (`Store::decide`, i.e. `lua/decide.lua`) and Limitador
//! (the `limitador` crate, Redis storage) side by side on one Redis, for issue #11.
//!
//! Both check and update the same kind of limit for the same number of users: a monthly quota
//! per user plus a per-second rate limit per user. Each system runs as TWO instances in this
//! process (two Redis connections, as two sidecars or two Limitador replicas would have), and:
//!
//! - `throughput`: for each concurrency in `--concurrency`, that many tasks (split over the two
//!   instances) decide as fast as they can for `--seconds`, rotating over `--users` users whose
//!   limits never refuse. Reports decisions/s, p50/p99/p99.9 of one decision, Redis commands per
//!   decision (INFO commandstats deltas: every command, those run inside scripts included), Redis
//!   CPU per decision (INFO cpu) and this process's CPU per decision.
//! - `accuracy`: a fresh user with `--remaining` left of its quota; `--requests` decisions are
//!   started at once, half on each instance. Exact admission is min(requests, remaining).
//!
//! Systems: `tollgate` (decide.lua by SHA through fred, as the sidecar calls it),
//! `limitador` (`AsyncRedisStorage`: every decision reads the counters, then updates them) and
//! `limitador_cached` (`CachedRedisStorage`: counters cached in process and flushed to Redis in
//! batches, Limitador's setting for throughput).
//!
//! Everything it writes is under a prefix / namespace of its own, deleted at the end (never a
//! FLUSH); the figures are one JSON object per line on stdout, rendered by `bench/report.py`.
//!
//! ```text
//! tollgate-peers [--redis URL] [--users 1000] [--seconds 10] [--concurrency 8,32,128]
//!                [--requests 1000] [--remaining 100] [--rounds 5]
//!                [--systems tollgate,limitador,limitador_cached] [--clk-tck 100]
//! ```

use std::collections::BTreeMap;
use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fred::prelude::{Builder, ClientLike, Config, HashesInterface, KeysInterface};
use fred::types::InfoKind;
use http::Method;
#[cfg(feature = "limitador")]
use limitador::AsyncRateLimiter;
#[cfg(feature = "limitador")]
use limitador::limit::{Context, Limit, Namespace};
#[cfg(feature = "limitador")]
use limitador::storage::redis::{AsyncRedisStorage, CachedRedisStorageBuilder};
use serde_json::json;
use tollgate_common::keys::{Keys, user_field};
use tollgate_common::window::{BoundsCache, Window};
use tollgate_sidecar::routes::{Quota, RateLimit, Routes};
use tollgate_sidecar::store::{Charge, DecideInput, Decision, Store};
use uuid::Uuid;

type BoxError = Box<dyn Error + Send + Sync>;

const IDOCTOR_ROUTES: &str = include_str!("../../../demo/idoctor/routes.yaml");
/// A month, in seconds, for Limitador's quota (its windows are fixed lengths of seconds).
#[cfg(feature = "limitador")]
const MONTH_S: u64 = 30 * 24 * 3600;
/// Limits that never refuse during the throughput runs.
const HUGE_QUOTA: u64 = 1_000_000_000_000;
const RATE_PER_S: u64 = 1_000_000;
/// The settle marker's time to live, as the sidecar's default settle window.
const MARKER_TTL_MS: u64 = 10_000;

/// The two instances' runtimes: a current-thread runtime on a thread of its own each, the
/// sidecar's shape (one per core, each with its own Redis connection). An instance's Redis
/// connection is opened on its runtime and its decisions run there.
static INSTANCES: std::sync::OnceLock<[tokio::runtime::Handle; 2]> = std::sync::OnceLock::new();

fn instance_runtime(instance: usize) -> &'static tokio::runtime::Handle {
    &INSTANCES.get().expect("main starts the instance runtimes")[instance]
}

/// Runs `work` on instance `instance`'s runtime.
async fn on_instance<T: Send + 'static>(
    instance: usize,
    work: impl std::future::Future<Output = Result<T, BoxError>> + Send + 'static,
) -> Result<T, BoxError> {
    instance_runtime(instance).spawn(work).await?
}

struct Args {
    redis: String,
    users: usize,
    seconds: u64,
    concurrency: Vec<usize>,
    requests: usize,
    remaining: u64,
    rounds: usize,
    systems: Vec<String>,
    clk_tck: f64,
}

impl Args {
    fn parse() -> Result<Args, BoxError> {
        let mut args = Args {
            redis: std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
            users: 1000,
            seconds: 10,
            concurrency: vec![8, 32, 128],
            requests: 1000,
            remaining: 100,
            rounds: 5,
            systems: vec![
                "tollgate".into(),
                "limitador".into(),
                "limitador_cached".into(),
            ],
            clk_tck: 100.0,
        };
        let list = |v: &str| -> Vec<String> {
            v.split([',', ' '])
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--redis" => args.redis = value,
                "--users" => args.users = value.parse()?,
                "--seconds" => args.seconds = value.parse()?,
                "--concurrency" => {
                    args.concurrency = list(&value)
                        .iter()
                        .map(|c| c.parse())
                        .collect::<Result<_, _>>()?
                }
                "--requests" => args.requests = value.parse()?,
                "--remaining" => args.remaining = value.parse()?,
                "--rounds" => args.rounds = value.parse()?,
                "--systems" => args.systems = list(&value),
                "--clk-tck" => args.clk_tck = value.parse()?,
                _ => return Err(format!("unknown option {flag}").into()),
            }
        }
        if args.users == 0 || args.concurrency.contains(&0) || args.requests < 2 {
            return Err("--users, --concurrency and --requests must be positive".into());
        }
        Ok(args)
    }
}

/// One decision by one of the two instances of a system: `true` if admitted.
enum Instances {
    Tollgate {
        stores: Box<[Store; 2]>,
        quota: Arc<Quota>,
        rates: Vec<RateLimit>,
        windows: BoundsCache,
        /// Users of the throughput runs.
        users: Vec<Uuid>,
    },
    #[cfg(feature = "limitador")]
    Limitador {
        limiters: [AsyncRateLimiter; 2],
        namespace: Namespace,
    },
}

impl Instances {
    async fn decide(&self, instance: usize, user: usize) -> Result<bool, BoxError> {
        match self {
            Instances::Tollgate { users, .. } => self.decide_tollgate(instance, users[user]).await,
            #[cfg(feature = "limitador")]
            Instances::Limitador {
                limiters,
                namespace,
            } => {
                let values =
                    std::collections::HashMap::from([("user".to_owned(), user.to_string())]);
                let ctx: Context = values.into();
                let result = limiters[instance]
                    .check_rate_limited_and_update(namespace, &ctx, 1)
                    .await
                    .map_err(|e| format!("limitador: {e}"))?;
                Ok(!result.limited)
            }
        }
    }

    async fn decide_tollgate(&self, instance: usize, user: Uuid) -> Result<bool, BoxError> {
        #[allow(irrefutable_let_patterns)] // without the `limitador` feature
        let Instances::Tollgate {
            stores,
            quota,
            rates,
            windows,
            ..
        } = self
        else {
            return Err("not tollgate".into());
        };
        // Random per request, as the sidecar's: the markers of earlier decisions (10 s) are still
        // there, and decide.lua cancels a decision whose marker exists.
        let settle_id = tollgate_sidecar::proxy::new_settle_id();
        let input = DecideInput {
            user,
            settle_id: &settle_id,
            iat: 0,
            charge: Some(Charge {
                quota,
                cost: 1,
                reserve: false,
            }),
            rates,
            now_ms: chrono::Utc::now().timestamp_millis(),
            marker_ttl_ms: MARKER_TTL_MS,
            windows,
        };
        match stores[instance].decide(&input).await? {
            Decision::Admitted { .. } => Ok(true),
            Decision::QuotaExceeded { .. } | Decision::RateLimited { .. } => Ok(false),
            other => Err(format!("unexpected decision {other:?}").into()),
        }
    }
}

/// A fred client configured as the sidecar's (one multiplexed connection).
async fn fred_client(url: &str) -> Result<fred::clients::Client, BoxError> {
    let client = Builder::from_config(Config::from_url(url)?).build()?;
    client.init().await?;
    Ok(client)
}

/// Writes the user hashes decide.lua reads: active, no token cut-off, a monthly quota.
async fn write_users(
    redis: &fred::clients::Client,
    keys: &Keys,
    users: &[Uuid],
    limit: u64,
) -> Result<(), BoxError> {
    for user in users {
        let _: () = redis
            .hset(
                keys.user(*user),
                [
                    (user_field::STATUS.to_owned(), "active".to_owned()),
                    (user_field::TOKENS_VALID_AFTER.to_owned(), "0".to_owned()),
                    (user_field::PLAN.to_owned(), "bench".to_owned()),
                    (
                        user_field::quota("idoctor", "api_calls_l3_detect"),
                        user_field::quota_value(limit as i64, Window::Month),
                    ),
                ],
            )
            .await?;
    }
    Ok(())
}

async fn tollgate(
    url: &str,
    keys: &Keys,
    admin: &fred::clients::Client,
    users: usize,
    quota_limit: u64,
) -> Result<Instances, BoxError> {
    let routes = Routes::parse("demo/idoctor/routes.yaml", IDOCTOR_ROUTES)?;
    let route = routes.find(&Method::POST, "/l3/p-1");
    let quota = route
        .quota
        .clone()
        .ok_or("POST /l3/{patient} is not metered")?;
    let rates = vec![RateLimit {
        name: "per-second".to_owned(),
        rate: RATE_PER_S,
        period_ms: 1000,
        burst: RATE_PER_S,
        field: user_field::rate("idoctor", "per-second"),
    }];
    let ids: Vec<Uuid> = (0..users).map(|_| Uuid::new_v4()).collect();
    write_users(admin, keys, &ids, quota_limit).await?;
    let (url_a, url_b) = (url.to_owned(), url.to_owned());
    let a = Store::new(
        on_instance(0, async move { fred_client(&url_a).await }).await?,
        keys.clone(),
    );
    let b = Store::new(
        on_instance(1, async move { fred_client(&url_b).await }).await?,
        keys.clone(),
    );
    a.load_scripts().await?;
    b.load_scripts().await?;
    Ok(Instances::Tollgate {
        stores: Box::new([a, b]),
        quota,
        rates,
        windows: BoundsCache::new(routes.time_zone),
        users: ids,
    })
}

#[cfg(feature = "limitador")]
async fn limitador(
    url: &str,
    system: &str,
    namespace: &str,
    quota_limit: u64,
) -> Result<Instances, BoxError> {
    let mut limiters = Vec::new();
    for instance in 0..2 {
        let (url, cached) = (url.to_owned(), system == "limitador_cached");
        let limiter = on_instance(instance, async move {
            Ok(if cached {
                AsyncRateLimiter::new_with_storage(Box::new(
                    CachedRedisStorageBuilder::new(&url).build().await?,
                ))
            } else {
                AsyncRateLimiter::new_with_storage(Box::new(AsyncRedisStorage::new(&url).await?))
            })
        })
        .await?;
        for (max, seconds) in [(quota_limit, MONTH_S), (RATE_PER_S, 1)] {
            limiter.add_limit(Limit::new(
                namespace,
                max,
                seconds,
                Vec::new(),
                vec!["user".try_into()?],
            ));
        }
        limiters.push(limiter);
    }
    let [a, b]: [AsyncRateLimiter; 2] =
        limiters.try_into().map_err(|_| "two limiters were built")?;
    Ok(Instances::Limitador {
        limiters: [a, b],
        namespace: namespace.into(),
    })
}

/// INFO commandstats as command → (calls, µs), and Redis's CPU seconds (user + sys).
async fn redis_stats(
    admin: &fred::clients::Client,
) -> Result<(BTreeMap<String, (u64, u64)>, f64), BoxError> {
    let text: String = admin.info(Some(InfoKind::CommandStats)).await?;
    let mut stats = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("cmdstat_") else {
            continue;
        };
        let Some((name, fields)) = rest.split_once(':') else {
            continue;
        };
        let field = |key: &str| -> u64 {
            fields
                .split(',')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
                .unwrap_or(0)
        };
        stats.insert(name.to_owned(), (field("calls"), field("usec")));
    }
    let cpu: String = admin.info(Some(InfoKind::Cpu)).await?;
    let mut seconds = 0.0;
    for line in cpu.lines() {
        if let Some((k, v)) = line.trim().split_once(':')
            && (k == "used_cpu_sys" || k == "used_cpu_user")
        {
            seconds += v.parse::<f64>().unwrap_or(0.0);
        }
    }
    Ok((stats, seconds))
}

/// This process's CPU seconds (user + system), from /proc/self/stat.
fn own_cpu(clk_tck: f64) -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let Some((_, after)) = stat.rsplit_once(") ") else {
        return 0.0;
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command: state is field 3 overall, utime 14, stime 15.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / clk_tck
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p / 100.0).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)]) / 1000.0
}

/// `concurrency` tasks decide for `seconds`; one JSON line of figures.
async fn throughput(
    system: &str,
    instances: Arc<Instances>,
    admin: &fred::clients::Client,
    args: &Args,
    concurrency: usize,
) -> Result<serde_json::Value, BoxError> {
    // A short warm-up: connections, scripts, caches.
    let warm_until = Instant::now() + Duration::from_secs(1);
    run_tasks(instances.clone(), args.users, concurrency, warm_until).await?;

    let (before, redis_cpu_before) = redis_stats(admin).await?;
    let cpu_before = own_cpu(args.clk_tck);
    let started = Instant::now();
    let (mut latencies_ns, refused) = run_tasks(
        instances,
        args.users,
        concurrency,
        started + Duration::from_secs(args.seconds),
    )
    .await?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = own_cpu(args.clk_tck) - cpu_before;
    let (after, redis_cpu_after) = redis_stats(admin).await?;

    let decisions = latencies_ns.len() as u64;
    latencies_ns.sort_unstable();
    let per = |n: f64| {
        if decisions > 0 {
            n / decisions as f64
        } else {
            0.0
        }
    };
    let mut commands = serde_json::Map::new();
    let mut total = 0u64;
    let mut usec = serde_json::Map::new();
    for (name, (calls, us)) in &after {
        let (c0, u0) = before.get(name).copied().unwrap_or((0, 0));
        let calls = calls.saturating_sub(c0);
        // This measurement's own INFO calls are not decisions.
        if calls == 0 || name == "info" {
            continue;
        }
        total += calls;
        commands.insert(name.clone(), json!(calls));
        usec.insert(name.clone(), json!(us.saturating_sub(u0)));
    }
    let usec_total: u64 = usec.values().filter_map(|v| v.as_u64()).sum();
    Ok(json!({
        "kind": "throughput",
        "system": system,
        "concurrency": concurrency,
        "users": args.users,
        "seconds": (elapsed * 100.0).round() / 100.0,
        "decisions": decisions,
        "refused": refused,
        "per_s": (decisions as f64 / elapsed).round(),
        // µs; latencies are kept in ns and rendered with µs precision.
        "p50_ms": percentile(&latencies_ns, 50.0) / 1000.0,
        "p99_ms": percentile(&latencies_ns, 99.0) / 1000.0,
        "p999_ms": percentile(&latencies_ns, 99.9) / 1000.0,
        "redis_commands": commands,
        "redis_usec": usec,
        "redis_commands_per_decision": per(total as f64),
        "redis_usec_per_decision": per(usec_total as f64),
        "redis_cpu_us_per_decision": per((redis_cpu_after - redis_cpu_before) * 1e6),
        "client_cpu_us_per_decision": per(cpu * 1e6),
    }))
}

/// Runs `concurrency` tasks over both instances until `until`; returns every decision's
/// latency (ns, saturated at u32) and how many were refused.
async fn run_tasks(
    instances: Arc<Instances>,
    users: usize,
    concurrency: usize,
    until: Instant,
) -> Result<(Vec<u32>, u64), BoxError> {
    let next_user = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(concurrency);
    for task in 0..concurrency {
        let (instances, next_user) = (instances.clone(), next_user.clone());
        tasks.push(instance_runtime(task % 2).spawn(async move {
            let mut latencies = Vec::with_capacity(1 << 14);
            let mut refused = 0u64;
            while Instant::now() < until {
                let user = next_user.fetch_add(1, Ordering::Relaxed) % users;
                let t = Instant::now();
                let admitted = instances.decide(task % 2, user).await?;
                latencies.push(u32::try_from(t.elapsed().as_nanos()).unwrap_or(u32::MAX));
                refused += u64::from(!admitted);
            }
            Ok::<_, BoxError>((latencies, refused))
        }));
    }
    let mut all = Vec::new();
    let mut refused = 0;
    for task in tasks {
        let (latencies, r) = task.await??;
        all.extend(latencies);
        refused += r;
    }
    Ok((all, refused))
}

/// `requests` decisions at once for one user with `remaining` left, half on each instance.
async fn accuracy(
    system: &str,
    instances: Arc<Instances>,
    user: usize,
    args: &Args,
) -> Result<u64, BoxError> {
    let tasks: Vec<_> = (0..args.requests)
        .map(|i| {
            let instances = instances.clone();
            instance_runtime(i % 2).spawn(async move { instances.decide(i % 2, user).await })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        admitted += u64::from(task.await??);
    }
    eprintln!(
        "[peers] {system}: {admitted} admitted of {} against {} remaining",
        args.requests, args.remaining
    );
    Ok(admitted)
}

/// Deletes every key matching `pattern` (never a FLUSH).
async fn delete_matching(admin: &fred::clients::Client, pattern: &str) -> Result<usize, BoxError> {
    use fred::types::scan::Scanner;
    use futures_util::TryStreamExt;
    let mut scan = admin.scan(pattern, Some(1000), None);
    let mut found: Vec<fred::types::Key> = Vec::new();
    while let Some(mut page) = scan.try_next().await? {
        found.extend(page.take_results().unwrap_or_default());
    }
    for chunk in found.chunks(500) {
        let _: i64 = admin.del(chunk.to_vec()).await?;
    }
    Ok(found.len())
}

async fn run(args: Args) -> Result<(), BoxError> {
    let admin = fred_client(&args.redis).await?;
    let run_id = &Uuid::new_v4().simple().to_string()[..10];
    let keys = Keys::new(format!("peers{run_id}"));
    let mut outcome = Ok(());
    for system in &args.systems {
        let namespace = format!("peers{run_id}-{system}");
        outcome = measure(system, &args, &admin, &keys, &namespace).await;
        if outcome.is_err() {
            break;
        }
    }
    // Limitador's cached storage flushes in the background (every second by default).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let removed = delete_matching(&admin, &format!("{}:*", keys.prefix())).await?
        + delete_matching(&admin, &format!("namespace:{{peers{run_id}-*")).await?;
    eprintln!("[peers] removed {removed} redis keys of this run");
    outcome
}

async fn measure(
    system: &str,
    args: &Args,
    admin: &fred::clients::Client,
    keys: &Keys,
    namespace: &str,
) -> Result<(), BoxError> {
    let build = |quota: u64, users: usize, namespace: String| async move {
        match system {
            "tollgate" => tollgate(&args.redis, keys, admin, users, quota).await,
            #[cfg(feature = "limitador")]
            "limitador" | "limitador_cached" => {
                limitador(&args.redis, system, &namespace, quota).await
            }
            #[cfg(not(feature = "limitador"))]
            "limitador" | "limitador_cached" => {
                let _ = namespace;
                Err("built without the `limitador` feature (see bench/Cargo.toml)".into())
            }
            other => Err(format!("unknown system {other}").into()),
        }
    };
    let instances = Arc::new(build(HUGE_QUOTA, args.users, namespace.to_owned()).await?);
    for &concurrency in &args.concurrency {
        eprintln!(
            "[peers] {system}: {}s at concurrency {concurrency}",
            args.seconds
        );
        let line = throughput(system, instances.clone(), admin, args, concurrency).await?;
        println!("{line}");
    }
    drop(instances);
    let mut admitted = Vec::new();
    for round in 0..args.rounds {
        // A fresh limit and user each round, so each starts from exactly `remaining`.
        let ns = format!("{namespace}-acc{round}");
        let instances = Arc::new(build(args.remaining, 1, ns).await?);
        admitted.push(accuracy(system, instances, 0, args).await?);
    }
    let exact = (args.requests as u64).min(args.remaining);
    println!(
        "{}",
        json!({
            "kind": "accuracy",
            "system": system,
            "requests": args.requests,
            "remaining": args.remaining,
            "exact": exact,
            "admitted": admitted,
            "over_admitted": admitted.iter().map(|a| a.saturating_sub(exact)).sum::<u64>(),
            "under_admitted": admitted.iter().map(|a| exact.saturating_sub(*a)).sum::<u64>(),
        })
    );
    Ok(())
}

fn main() -> Result<(), BoxError> {
    let args = Args::parse()?;
    // Two instances on a runtime and thread each, like the sidecar's two workers on the
    // project's two-core machine; this thread only starts them and collects the figures.
    let mut handles = Vec::new();
    for n in 0..2 {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        handles.push(runtime.handle().clone());
        std::thread::Builder::new()
            .name(format!("instance-{n}"))
            .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
    }
    let [a, b]: [tokio::runtime::Handle; 2] =
        handles.try_into().map_err(|_| "two runtimes were built")?;
    INSTANCES.get_or_init(|| [a, b]);
    let main = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    main.block_on(run(args))
}
