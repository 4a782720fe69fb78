//! Test support: a real sidecar (started through `tollgate_sidecar::run` on 127.0.0.1:0) in front
//! of a real upstream, against the real Redis at `REDIS_URL` (or the Redis Cluster at
//! `TOLLGATE_TEST_REDIS_CLUSTER_URL`), under a key prefix of the test's own. The test plays the
//! control plane's part: it serves a JWKS, signs tokens, and writes users and API keys into Redis
//! under the shared key schema.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{any, get, post};
use fred::interfaces::{ClientLike, HashesInterface, KeysInterface, PubsubInterface};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tollgate_common::keys::{CacheEvent, Keys, user_field};
use tollgate_common::window::Window;
use uuid::Uuid;

pub const KID: &str = "sidecar-test-key";

/// Users the fake control plane writes only when a sidecar asks, with their limits.
type Pending = Arc<std::sync::Mutex<BTreeMap<Uuid, Vec<(String, i64, Window)>>>>;

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// The Redis Cluster that `scripts/test` starts (it always exports
/// `TOLLGATE_TEST_REDIS_CLUSTER_URL`). Without one, `test`, a cluster variant, is skipped with a
/// message; under CI (`CI` set, as CI runs) it fails instead, so that a cluster variant never
/// passes there unrun.
pub fn cluster_url(test: &str) -> Option<String> {
    match std::env::var("TOLLGATE_TEST_REDIS_CLUSTER_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
            assert!(
                !ci,
                "{test}: TOLLGATE_TEST_REDIS_CLUSTER_URL is not set under CI; run scripts/test, which starts a Redis Cluster"
            );
            eprintln!(
                "SKIPPED {test}: TOLLGATE_TEST_REDIS_CLUSTER_URL is not set (scripts/test starts a Redis Cluster and sets it)"
            );
            None
        }
    }
}

pub async fn redis(url: &str) -> fred::clients::Client {
    let config = fred::types::config::Config::from_url(url).expect("redis url");
    let client = fred::types::Builder::from_config(config)
        .build()
        .expect("client");
    client.init().await.expect("redis connects");
    client
}

/// The control plane's part, played by the test.
pub struct ControlPlane {
    pub url: String,
    /// Deletes the test's keys when the test ends, failed or not.
    _prefix: tollgate_testkit::RedisPrefix,
    pub redis: fred::clients::Client,
    pub keys: Keys,
    encoding: EncodingKey,
    /// Users the fake control plane writes on a refill request, with their limits.
    pending: Pending,
    pub refills: Arc<AtomicUsize>,
}

#[derive(Clone)]
struct CpState {
    jwks: Arc<Value>,
    redis: fred::clients::Client,
    keys: Keys,
    pending: Pending,
    refills: Arc<AtomicUsize>,
}

pub async fn spawn_router(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

impl ControlPlane {
    pub async fn start(redis_url: &str) -> ControlPlane {
        let pem = tollgate_common::claims::generate_ed25519_pem();
        let encoding = EncodingKey::from_ed_pem(pem.as_bytes()).expect("key");
        let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::EdDSA).expect("jwk");
        jwk.common.key_id = Some(KID.to_owned());
        let jwks = serde_json::to_value(JwkSet { keys: vec![jwk] }).expect("json");
        let redis = redis(redis_url).await;
        let prefix = tollgate_testkit::RedisPrefix::new(redis_url);
        let keys = Keys::new(prefix.prefix.clone());
        let pending = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let refills = Arc::new(AtomicUsize::new(0));
        let state = CpState {
            jwks: Arc::new(jwks),
            redis: redis.clone(),
            keys: keys.clone(),
            pending: pending.clone(),
            refills: refills.clone(),
        };
        let router = Router::new()
            .route(
                "/.well-known/jwks.json",
                get(|State(s): State<CpState>| async move { axum::Json((*s.jwks).clone()) }),
            )
            .route("/internal/users/{id}/sync", post(refill))
            .with_state(state);
        let addr = spawn_router(router).await;
        ControlPlane {
            url: format!("http://{addr}"),
            _prefix: prefix,
            redis,
            keys,
            encoding,
            pending,
            refills,
        }
    }

    /// Writes an active user with these limits (app `idoctor`), as the control plane would.
    pub async fn user(&self, limits: &[(&str, i64, Window)]) -> Uuid {
        let id = Uuid::new_v4();
        self.write_user(id, "active", limits).await;
        id
    }

    pub async fn write_user(&self, id: Uuid, status: &str, limits: &[(&str, i64, Window)]) {
        let limits: Vec<(String, i64, Window)> = limits
            .iter()
            .map(|(t, l, w)| ((*t).to_owned(), *l, *w))
            .collect();
        write_user_hash(&self.redis, &self.keys, id, status, &limits).await;
        // As the control plane does after every write of a user: sidecars drop what they cached.
        let _: () = self
            .redis
            .publish(self.keys.events_channel(), CacheEvent::User(id).encode())
            .await
            .expect("publish");
    }

    /// A user the fake control plane only writes when a sidecar asks for it.
    pub fn user_on_request(&self, limits: &[(&str, i64, Window)]) -> Uuid {
        let id = Uuid::new_v4();
        self.pending.lock().expect("lock").insert(
            id,
            limits
                .iter()
                .map(|(t, l, w)| ((*t).to_owned(), *l, *w))
                .collect(),
        );
        id
    }

    pub fn token(&self, user: Uuid) -> String {
        self.token_with(user, json!({}))
    }

    pub fn token_with(&self, user: Uuid, over: Value) -> String {
        let now = chrono::Utc::now().timestamp();
        let mut claims = json!({
            "sub": user.to_string(), "iss": "tollgate", "aud": "tollgate", "iat": now,
            "nbf": now, "exp": now + 600, "jti": Uuid::new_v4().to_string(), "role": "user"
        });
        for (k, v) in over.as_object().expect("object") {
            claims[k] = v.clone();
        }
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(KID.to_owned());
        jsonwebtoken::encode(&header, &claims, &self.encoding).expect("sign")
    }

    /// A live API key for `user`, written into Redis.
    pub async fn api_key(&self, user: Uuid, expires_at: i64) -> String {
        let key = tollgate_common::api_key::generate();
        let hex = tollgate_common::api_key::hex(&tollgate_common::api_key::hash(&key));
        let _: () = self
            .redis
            .hset(
                self.keys.api_key(&hex),
                [
                    ("uid", user.to_string()),
                    ("kid", Uuid::new_v4().to_string()),
                    ("exp", expires_at.to_string()),
                ],
            )
            .await
            .expect("hset key");
        key
    }

    /// Revokes a key as the control plane does: delete, then announce.
    pub async fn revoke(&self, key: &str) {
        let hex = tollgate_common::api_key::hex(&tollgate_common::api_key::hash(key));
        let _: () = self.redis.del(self.keys.api_key(&hex)).await.expect("del");
        let _: () = self
            .redis
            .publish(self.keys.events_channel(), CacheEvent::ApiKey(hex).encode())
            .await
            .expect("publish");
    }

    /// The user's counter of one quota type (any window).
    pub async fn used(&self, user: Uuid, quota_type: &str) -> i64 {
        let counter: Option<String> = self
            .redis
            .hget(
                self.keys.user(user),
                user_field::counter("idoctor", quota_type),
            )
            .await
            .expect("hget");
        counter
            .and_then(|c| user_field::parse_counter(&c))
            .map_or(0, |(used, _)| used)
    }

    /// The user's usage in the shard's buckets (live and staged, every minute), by quota type:
    /// (amount, calls), entries that sum to zero left out.
    pub async fn usage(&self, user: Uuid) -> BTreeMap<String, (i64, i64)> {
        use fred::types::scan::Scanner;
        use futures_util::{StreamExt, TryStreamExt};
        let pattern = format!(
            "{}:{{s:{}}}:b:*",
            self.keys.prefix(),
            tollgate_common::keys::shard(user)
        );
        let mut scan = if self.redis.is_clustered() {
            self.redis.scan_cluster(pattern, Some(1000), None).boxed()
        } else {
            self.redis.scan(pattern, Some(1000), None).boxed()
        };
        let mut buckets = Vec::new();
        while let Ok(Some(mut page)) = scan.try_next().await {
            buckets.extend(page.take_results().unwrap_or_default());
        }
        let mut out: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        for bucket in buckets {
            let fields: HashMap<String, String> =
                self.redis.hgetall(bucket).await.expect("hgetall");
            for (field, value) in &fields {
                let Some(f) = tollgate_common::keys::bucket_field::parse(field) else {
                    continue;
                };
                if f.user != user {
                    continue;
                }
                let n: i64 = value.parse().expect("a number");
                let entry = out.entry(f.quota_type.to_owned()).or_default();
                if f.amount {
                    entry.0 += n;
                } else {
                    entry.1 += n;
                }
            }
        }
        out.retain(|_, v| *v != (0, 0));
        out
    }

    /// Calls of the user that the buckets hold, all quota types together.
    pub async fn calls(&self, user: Uuid) -> i64 {
        self.usage(user)
            .await
            .values()
            .map(|(_, calls)| calls)
            .sum()
    }
}

async fn write_user_hash(
    redis: &fred::clients::Client,
    keys: &Keys,
    id: Uuid,
    status: &str,
    limits: &[(String, i64, Window)],
) {
    let mut fields: Vec<(String, String)> = vec![
        (user_field::STATUS.to_owned(), status.to_owned()),
        (user_field::ROLE.to_owned(), "user".to_owned()),
        (user_field::TOKENS_VALID_AFTER.to_owned(), "0".to_owned()),
        (user_field::PLAN.to_owned(), "free".to_owned()),
    ];
    for (quota_type, limit, window) in limits {
        fields.push((
            user_field::quota("idoctor", quota_type),
            user_field::quota_value(*limit, *window),
        ));
    }
    let _: () = redis.hset(keys.user(id), fields).await.expect("hset user");
}

async fn refill(State(s): State<CpState>, Path(id): Path<String>) -> StatusCode {
    s.refills.fetch_add(1, Ordering::SeqCst);
    let Ok(id) = id.parse::<Uuid>() else {
        return StatusCode::NOT_FOUND;
    };
    let limits = s.pending.lock().expect("lock").get(&id).cloned();
    match limits {
        Some(limits) => {
            write_user_hash(&s.redis, &s.keys, id, "active", &limits).await;
            StatusCode::NO_CONTENT
        }
        None => StatusCode::NOT_FOUND,
    }
}

/// An upstream that echoes what it received: `/status/{code}` answers that status.
pub async fn echo_upstream() -> (String, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let router = Router::new().fallback(any(move |method: axum::http::Method, uri: axum::http::Uri, headers: HeaderMap, body: axum::body::Bytes| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            let status = uri
                .path()
                .strip_prefix("/status/")
                .and_then(|c| c.parse::<u16>().ok())
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::OK);
            let headers: BTreeMap<String, String> = headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                .collect();
            (
                status,
                axum::Json(json!({"method": method.as_str(), "path": uri.path(), "headers": headers, "body_len": body.len()})),
            )
        }
    }));
    let addr = spawn_router(router).await;
    (format!("http://{addr}"), calls)
}

/// The demo iDoctor app on 127.0.0.1:0.
pub async fn demo_upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(tollgate_demo_idoctor::run(listener, std::future::pending()));
    format!("http://{addr}")
}

pub const ROUTES: &str = r#"
app: idoctor
time_zone: Asia/Shanghai
rate_limits:
  - {name: per-second, rate: 100, period: 1s, burst: 200}
routes:
  - {method: GET, path: /health, public: true}
  - {method: POST, path: "/process/{patient}/{date}", quota: api_calls_full_process, cost: 1}
  - {method: POST, path: "/l3/{patient}", quota: api_calls_l3_detect, cost: 1}
  - {method: POST, path: "/muscle/{patient}", quota: api_calls_muscle_seg, cost: 1}
  - {method: POST, path: /upload, quota: storage_bytes, cost: request_body_bytes}
  - {method: '*', path: "/status/*", quota: api_calls_l3_detect, cost: 1}
  - method: GET
    path: /tight
    rate_limits: [{name: tight, rate: 2, period: 1m, burst: 2}]
"#;

pub use tollgate_testkit::Sidecar;

/// A sidecar's environment: in front of `upstream`, on the test's prefix, with the fake control
/// plane for both of its URLs (it answers the refill call on the same address).
fn setup<'a>(
    cp: &'a ControlPlane,
    redis_url: &'a str,
    upstream: &'a str,
    routes: &'a str,
    extra: &'a [(&'a str, &'a str)],
) -> tollgate_testkit::SidecarSetup<'a> {
    tollgate_testkit::SidecarSetup {
        control_plane: &cp.url,
        control_plane_internal: &cp.url,
        redis_url,
        redis_prefix: cp.keys.prefix(),
        upstream,
        routes,
        extra,
    }
}

pub fn sidecar_env(
    cp: &ControlPlane,
    redis_url: &str,
    upstream: &str,
    routes: &std::path::Path,
    extra: &[(&str, &str)],
) -> BTreeMap<String, String> {
    setup(cp, redis_url, upstream, "", extra).env(routes)
}

pub async fn start_sidecar(
    cp: &ControlPlane,
    redis_url: &str,
    upstream: &str,
    routes: &str,
    extra: &[(&str, &str)],
) -> Sidecar {
    std::mem::forget(tollgate_common::telemetry::init(
        tollgate_common::config::LogFormat::Text,
        "warn",
    ));
    setup(cp, redis_url, upstream, routes, extra).start().await
}

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

pub async fn send(request: reqwest::RequestBuilder) -> Reply {
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Reply {
        status,
        headers,
        body,
    }
}
