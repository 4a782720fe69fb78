//! The Lua scripts through `Store`, against the real Redis: rate limits above 1,000/s are exact;
//! settling gives back exactly what a decision took — once, nothing for a decision that never
//! ran, and a refund that overtakes its decision cancels it; a decision learns its quota's window;
//! nothing a request writes outlives the settle window.

mod support;

use std::sync::Arc;

use fred::interfaces::{ClientLike, KeysInterface};
use support::ControlPlane;
use tollgate_common::window::BoundsCache;
use tollgate_common::window::Window::{Day, Month};
use tollgate_sidecar::routes::{Cost, Quota, RateLimit, Routes};
use tollgate_sidecar::store::{Charge, DecideInput, Decision, SettleInput, Store};

const TTL_MS: u64 = 10_000;

async fn store(cp: &ControlPlane) -> Store {
    let client = support::redis(&support::redis_url()).await;
    assert!(client.is_connected());
    Store::new(client, cp.keys.clone())
}

/// The l3 route's quota, as a routes file builds it.
fn l3_quota() -> Arc<Quota> {
    let routes = Routes::parse(
        "test",
        "app: idoctor\nroutes:\n  - {method: POST, path: '/l3/{patient}', quota: api_calls_l3_detect, cost: 3}\n",
    )
    .expect("routes");
    let route = routes.find(&http::Method::POST, "/l3/p");
    let quota = route.quota.clone().expect("metered");
    assert_eq!(quota.cost, Cost::Fixed(3));
    quota
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[tokio::test]
async fn a_burst_at_a_high_rate_is_admitted_in_full() {
    let cp = ControlPlane::start(&support::redis_url()).await;
    let store = store(&cp).await;
    let user = cp.user(&[]).await;
    let rates = [RateLimit {
        name: "fast".to_owned(),
        rate: 10_000,
        period_ms: 1_000,
        burst: 10,
        field: tollgate_common::keys::user_field::rate("idoctor", "fast"),
    }];
    let windows = BoundsCache::new(chrono_tz::UTC);
    let now = now_ms();
    let mut admitted = 0;
    for _ in 0..11 {
        let input = DecideInput {
            user,
            settle_id: "",
            iat: 0,
            charge: None,
            rates: &rates,
            now_ms: now,
            marker_ttl_ms: TTL_MS,
            windows: &windows,
        };
        if matches!(
            store.decide(&input).await.expect("decide"),
            Decision::Admitted { .. }
        ) {
            admitted += 1;
        }
    }
    assert_eq!(
        admitted, 10,
        "a burst of 10 at 10,000/s, all at one instant"
    );
}

#[tokio::test]
async fn blind_settling_gives_back_exactly_what_was_taken_once() {
    let cp = ControlPlane::start(&support::redis_url()).await;
    let store = store(&cp).await;
    let user = cp.user(&[("api_calls_l3_detect", 10, Month)]).await;
    let quota = l3_quota();
    let windows = BoundsCache::new(chrono_tz::UTC);
    let request = "blind-1";
    let input = DecideInput {
        user,
        settle_id: request,
        iat: 0,
        charge: Some(Charge {
            quota: &quota,
            cost: 3,
            reserve: false,
        }),
        rates: &[],
        now_ms: now_ms(),
        marker_ttl_ms: TTL_MS,
        windows: &windows,
    };
    assert!(matches!(
        store.decide(&input).await.expect("decide"),
        Decision::Admitted { .. }
    ));
    assert_eq!(cp.used(user, "api_calls_l3_detect").await, 3);
    assert_eq!(
        cp.usage(user).await.get("api_calls_l3_detect"),
        Some(&(3, 1))
    );

    // The caller knows nothing of what was taken (its answer was lost).
    let settle = |settle_id: &'static str| {
        let store = store.clone();
        let quota = quota.clone();
        let decided_ms = input.now_ms;
        async move {
            store
                .settle(&SettleInput {
                    refund: true,
                    user,
                    settle_id,
                    quota: &quota,
                    decided_ms,
                    actual: 0,
                    marker_ttl_ms: TTL_MS,
                })
                .await
                .expect("settle")
        }
    };
    assert!(
        settle(request).await,
        "the decision ran: its cost comes back"
    );
    assert_eq!(cp.used(user, "api_calls_l3_detect").await, 0);
    assert!(
        cp.usage(user).await.is_empty(),
        "and its usage is out of the bucket"
    );
    assert!(!settle(request).await, "a second settle gives nothing back");
    assert_eq!(cp.used(user, "api_calls_l3_detect").await, 0);

    // A decision that never ran gives nothing back, even with a counter in place.
    assert!(matches!(
        store
            .decide(&DecideInput {
                settle_id: "ran",
                ..input
            })
            .await
            .expect("decide"),
        Decision::Admitted { .. }
    ));
    assert!(!settle("never-ran").await);
    assert_eq!(cp.used(user, "api_calls_l3_detect").await, 3);
    assert_eq!(cp.calls(user).await, 1);

    // A refund that overtakes its decision (the decision's answer was given up on before the
    // script ran) cancels it: nothing is taken, now or later.
    assert!(!settle("overtaken").await);
    assert_eq!(
        store
            .decide(&DecideInput {
                settle_id: "overtaken",
                ..input
            })
            .await
            .expect("decide"),
        Decision::Cancelled
    );
    assert_eq!(cp.used(user, "api_calls_l3_detect").await, 3);
    assert_eq!(cp.calls(user).await, 1);
}

#[tokio::test]
async fn a_decision_learns_its_quotas_window_and_keeps_no_state_per_request() {
    let cp = ControlPlane::start(&support::redis_url()).await;
    let store = store(&cp).await;
    // A day quota, while the route has not learned anything yet (it starts with month).
    let user = cp.user(&[("api_calls_l3_detect", 100, Day)]).await;
    let quota = l3_quota();
    assert_eq!(quota.window(), Month);
    let tz: chrono_tz::Tz = "Asia/Shanghai".parse().expect("tz");
    let windows = BoundsCache::new(tz);
    let now = now_ms();
    let decision = store
        .decide(&DecideInput {
            user,
            settle_id: "w1",
            iat: 0,
            charge: Some(Charge {
                quota: &quota,
                cost: 3,
                reserve: false,
            }),
            rates: &[],
            now_ms: now,
            marker_ttl_ms: TTL_MS,
            windows: &windows,
        })
        .await
        .expect("decide");
    let Decision::Admitted {
        charged: Some(charged),
        ..
    } = decision
    else {
        panic!("admitted: {decision:?}");
    };
    assert_eq!(quota.window(), Day, "the route learned the window");
    let (start, end) = windows.get(Day, now);
    assert_eq!(charged.window_start_ms, start);
    assert_eq!(charged.resets_at_ms, end);
    assert_eq!(
        (charged.limit, charged.remaining, charged.taken),
        (100, 97, 3)
    );

    // Per request, only the settle marker is written, and it expires with the settle window.
    let marker = cp.keys.marker(user, "w1");
    let ttl: i64 = store.client.pttl(&marker).await.expect("pttl");
    assert!(0 < ttl && ttl <= TTL_MS as i64, "marker ttl {ttl}");
}
