//! Criterion micro-benches of the sidecar's request path, one part at a time:
//!
//! - `jwt/first` and `jwt/cached` — `Authenticator::verify_jwt` on a token it has never seen (an
//!   EdDSA signature check) and on a repeat caller's token (one cache lookup). The JWKS comes from
//!   a small local server, as the control plane would serve it.
//! - `api_key/warm` and `api_key/cold` — `Authenticator::verify_api_key` answered from the
//!   in-process cache, and (for comparison) after dropping the key from it, which costs one
//!   HGETALL.
//! - `routes/*` — `Routes::find` over the iDoctor routes file and a 50-route file: a metered hit,
//!   the last route, and a path that matches nothing (a full scan).
//! - `decide/l3` — one `Store::decide` (decide.lua by SHA) for a metered route with a rate limit.
//!
//! The Redis parts run against `REDIS_URL` (default `redis://127.0.0.1:6379`) under a key prefix
//! of their own, deleted at the end (never FLUSH); without Redis they are skipped.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion};
use fred::prelude::*;
use http::Method;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tollgate_common::api_key;
use tollgate_common::keys::{Keys, api_key_field, user_field};
use tollgate_common::window::Window;
use tollgate_sidecar::auth::Authenticator;
use tollgate_sidecar::metrics::Metrics;
use tollgate_sidecar::routes::{RateLimit, Routes};
use tollgate_sidecar::store::{Charge, DecideInput, Decision, Store};
use uuid::Uuid;

const IDOCTOR_ROUTES: &str = include_str!("../../demo/idoctor/routes.yaml");
const KID: &str = "bench-key";
/// The sidecar's defaults for `TOLLGATE_JWT_ISSUER` / `TOLLGATE_JWT_AUDIENCE`.
const ISSUER: &str = "tollgate";
const AUDIENCE: &str = "tollgate";

struct Fixture {
    rt: tokio::runtime::Runtime,
    /// `None` when Redis is unreachable: the Redis benches are skipped.
    redis: Option<Client>,
    keys: Keys,
    store: Store,
    auth: Authenticator,
    signing: EncodingKey,
}

impl Fixture {
    fn start() -> Fixture {
        // Two workers, like the sidecar on this two-core machine.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let pem = tollgate_common::claims::generate_ed25519_pem();
        let signing = EncodingKey::from_ed_pem(pem.as_bytes()).expect("ed25519 key");
        let mut jwk = Jwk::from_encoding_key(&signing, Algorithm::EdDSA).expect("jwk");
        jwk.common.key_id = Some(KID.to_owned());
        let jwks = serde_json::to_value(JwkSet { keys: vec![jwk] }).expect("jwks json");
        let keys = Keys::new(format!(
            "bench{}",
            &Uuid::new_v4().simple().to_string()[..10]
        ));
        let url =
            std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());

        let (redis, store, auth) = rt.block_on(async {
            let jwks_url = serve_jwks(jwks).await;
            let client = Builder::from_config(Config::from_url(&url).expect("REDIS_URL"))
                .build()
                .expect("redis client");
            let _connection = client.connect();
            let redis = match tokio::time::timeout(
                Duration::from_secs(2),
                client.wait_for_connect(),
            )
            .await
            {
                Ok(Ok(())) => Some(client.clone()),
                _ => {
                    eprintln!(
                        "redis at {url} is not reachable: skipping the api_key and decide benches"
                    );
                    None
                }
            };
            let store = Store::new(client, keys.clone());
            if redis.is_some() {
                store.load_scripts().await.expect("load the lua scripts");
            }
            let http =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build(hyper_util::client::legacy::connect::HttpConnector::new());
            let auth = Authenticator::new(
                http,
                &jwks_url,
                Vec::new(),
                ISSUER.to_owned(),
                AUDIENCE.to_owned(),
                store.clone(),
                std::sync::Arc::new(Metrics::new()),
            );
            auth.refresh_jwks().await.expect("jwks loads");
            (redis, store, auth)
        });
        Fixture {
            rt,
            redis,
            keys,
            store,
            auth,
            signing,
        }
    }

    /// A fresh access token for `user`, as the control plane signs them.
    fn token(&self, user: Uuid) -> String {
        let now = chrono::Utc::now().timestamp();
        let claims = json!({
            "sub": user.to_string(), "iss": ISSUER, "aud": AUDIENCE, "iat": now, "nbf": now,
            "exp": now + 3600, "jti": Uuid::new_v4().to_string(), "role": "user"
        });
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(KID.to_owned());
        jsonwebtoken::encode(&header, &claims, &self.signing).expect("sign")
    }

    /// Deletes every key under the bench's prefix, and nothing else.
    fn cleanup(&self) {
        let Some(redis) = &self.redis else { return };
        self.rt.block_on(async {
            use fred::types::scan::Scanner;
            use futures_util::TryStreamExt;
            let mut scan = redis.scan(format!("{}:*", self.keys.prefix()), Some(1000), None);
            let mut found: Vec<Key> = Vec::new();
            while let Ok(Some(mut page)) = scan.try_next().await {
                found.extend(page.take_results().unwrap_or_default());
            }
            for chunk in found.chunks(500) {
                let _: Result<(), _> = redis.del(chunk.to_vec()).await;
            }
            eprintln!(
                "removed {} redis keys under {}:*",
                found.len(),
                self.keys.prefix()
            );
        });
    }
}

/// Serves `jwks` at `/.well-known/jwks.json` on 127.0.0.1:0; returns the base URL.
async fn serve_jwks(jwks: serde_json::Value) -> String {
    let router = axum::Router::new().route(
        "/.well-known/jwks.json",
        axum::routing::get(move || {
            let jwks = jwks.clone();
            async move { axum::Json(jwks) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

fn bench_jwt(c: &mut Criterion, fx: &Fixture) {
    let mut group = c.benchmark_group("jwt");
    let token = fx.token(Uuid::new_v4());
    fx.rt
        .block_on(fx.auth.verify_jwt(&token))
        .expect("a valid token");
    group.bench_function("cached", |b| {
        b.to_async(&fx.rt).iter(|| async {
            fx.auth
                .verify_jwt(black_box(&token))
                .await
                .expect("a valid token")
        });
    });
    // Signing the new token is setup, not measured.
    group.bench_function("first", |b| {
        b.to_async(&fx.rt).iter_batched(
            || fx.token(Uuid::new_v4()),
            |token| async move { fx.auth.verify_jwt(&token).await.expect("a valid token") },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

fn bench_api_key(c: &mut Criterion, fx: &Fixture) {
    let Some(redis) = &fx.redis else { return };
    let key = api_key::generate();
    let hex = api_key::hex(&api_key::hash(&key));
    fx.rt.block_on(async {
        let _: () = redis
            .hset(
                fx.keys.api_key(&hex),
                [
                    (api_key_field::USER_ID, Uuid::new_v4().to_string()),
                    (api_key_field::KEY_ID, Uuid::new_v4().to_string()),
                    (api_key_field::EXPIRES_AT, "0".to_owned()),
                ],
            )
            .await
            .expect("write the api key");
        fx.auth.verify_api_key(&key).await.expect("a live key");
    });
    let mut group = c.benchmark_group("api_key");
    group.bench_function("warm", |b| {
        b.to_async(&fx.rt).iter(|| async {
            fx.auth
                .verify_api_key(black_box(&key))
                .await
                .expect("a live key")
        });
    });
    group.bench_function("cold", |b| {
        b.to_async(&fx.rt).iter(|| async {
            fx.auth.forget_key(&hex);
            fx.auth
                .verify_api_key(black_box(&key))
                .await
                .expect("a live key")
        });
    });
    group.finish();
}

/// A routes file of `n` routes in the shapes real APIs have: a version prefix, parameters,
/// several methods, a few trailing wildcards.
fn many_routes(n: usize) -> String {
    let mut text = String::from(
        "app: bench\ntime_zone: UTC\nrate_limits:\n  - {name: per-second, rate: 100, period: 1s, burst: 200}\nroutes:\n",
    );
    for i in 0..n {
        let line = match i % 5 {
            0 => format!("  - {{method: GET, path: \"/v1/svc{i}/{{id}}\"}}\n"),
            1 => format!(
                "  - {{method: POST, path: \"/v1/svc{i}/{{tenant}}/items/{{item}}\", quota: q{i}, cost: 1}}\n"
            ),
            2 => format!("  - {{method: PUT, path: \"/v1/svc{i}/{{id}}/state\"}}\n"),
            3 => format!(
                "  - {{method: '*', path: \"/v2/files{i}/*\", quota: bytes, cost: request_body_bytes}}\n"
            ),
            _ => {
                format!("  - {{method: DELETE, path: \"/v1/svc{i}/{{tenant}}/items/{{item}}\"}}\n")
            }
        };
        text.push_str(&line);
    }
    text
}

fn bench_routes(c: &mut Criterion) {
    let idoctor = Routes::parse("demo/idoctor/routes.yaml", IDOCTOR_ROUTES).expect("valid");
    let fifty = Routes::parse("50 routes", &many_routes(50)).expect("valid");
    let cases: [(&str, &Routes, Method, &str, &str); 6] = [
        (
            "idoctor/metered",
            &idoctor,
            Method::POST,
            "/l3/p-1234",
            "POST /l3/{patient}",
        ),
        (
            "idoctor/unmatched",
            &idoctor,
            Method::GET,
            "/results/p-1234",
            "unmatched",
        ),
        (
            "50/first",
            &fifty,
            Method::GET,
            "/v1/svc0/abc",
            "GET /v1/svc0/{id}",
        ),
        (
            "50/middle",
            &fifty,
            Method::POST,
            "/v1/svc26/acme/items/42",
            "POST /v1/svc26/{tenant}/items/{item}",
        ),
        (
            "50/last",
            &fifty,
            Method::DELETE,
            "/v1/svc49/acme/items/42",
            "DELETE /v1/svc49/{tenant}/items/{item}",
        ),
        (
            "50/unmatched",
            &fifty,
            Method::GET,
            "/v3/nothing/here",
            "unmatched",
        ),
    ];
    let mut group = c.benchmark_group("routes");
    for (name, routes, method, path, label) in cases {
        assert_eq!(&*routes.find(&method, path).label, label, "{name}");
        group.bench_function(name, |b| {
            b.iter(|| routes.find(black_box(&method), black_box(path)));
        });
    }
    group.finish();
}

fn bench_decide(c: &mut Criterion, fx: &Fixture) {
    let Some(redis) = &fx.redis else { return };
    let routes = Routes::parse("demo/idoctor/routes.yaml", IDOCTOR_ROUTES).expect("valid");
    let user = Uuid::new_v4();
    fx.rt.block_on(async {
        let _: () = redis
            .hset(
                fx.keys.user(user),
                [
                    (user_field::STATUS.to_owned(), "active".to_owned()),
                    (user_field::ROLE.to_owned(), "user".to_owned()),
                    (user_field::TOKENS_VALID_AFTER.to_owned(), "0".to_owned()),
                    (user_field::PLAN.to_owned(), "enterprise".to_owned()),
                    (
                        user_field::quota("idoctor", "api_calls_l3_detect"),
                        user_field::quota_value(1_000_000_000_000, Window::Month),
                    ),
                ],
            )
            .await
            .expect("write the user");
    });
    // The iDoctor limit (100/s, burst 200) would refuse a tight loop after 200 calls; an
    // integral interval (1 ms) with a huge burst keeps the same GCRA work without refusing.
    let rates = [RateLimit {
        name: "per-second".to_owned(),
        rate: 1000,
        period_ms: 1000,
        burst: 1_000_000_000,
        field: user_field::rate("idoctor", "per-second"),
    }];
    let quota = routes
        .find(&Method::POST, "/l3/p-1234")
        .quota
        .clone()
        .expect("metered");
    let windows = tollgate_common::window::BoundsCache::new(routes.time_zone);
    let mut group = c.benchmark_group("decide");
    group.bench_function("l3", |b| {
        b.to_async(&fx.rt).iter(|| async {
            let settle_id = format!("{:016x}", Uuid::new_v4().as_u64_pair().0);
            let input = DecideInput {
                user,
                settle_id: &settle_id,
                iat: 0,
                charge: Some(Charge {
                    quota: &quota,
                    cost: 1,
                    reserve: false,
                }),
                rates: &rates,
                now_ms: chrono::Utc::now().timestamp_millis(),
                marker_ttl_ms: 10_000,
                windows: &windows,
            };
            let decision = fx.store.decide(&input).await.expect("redis answers");
            assert!(
                matches!(decision, Decision::Admitted { .. }),
                "{decision:?}"
            );
            decision
        });
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_routes(&mut c);
    let fx = Fixture::start();
    bench_jwt(&mut c, &fx);
    bench_api_key(&mut c, &fx);
    bench_decide(&mut c, &fx);
    fx.cleanup();
    c.final_summary();
}
