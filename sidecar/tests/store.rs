//! The Lua scripts through `Store`, against the real Redis: rate limits above 1,000/s are exact,
//! and settling gives back exactly what a decision took — once, and nothing for a decision that
//! never ran (a timed-out call settled blindly).

mod support;

use fred::interfaces::ClientLike;
use support::ControlPlane;
use tollgate_common::window::Window::Month;
use tollgate_sidecar::routes::RateLimit;
use tollgate_sidecar::store::{Charge, DecideInput, Decision, SettleInput, SettleItem, Store};
use uuid::Uuid;

async fn store(cp: &ControlPlane) -> Store {
    let client = support::redis(&support::redis_url()).await;
    assert!(client.is_connected());
    Store::new(client, cp.keys.clone())
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
    }];
    let now = chrono::Utc::now();
    let mut admitted = 0;
    for _ in 0..11 {
        let input = DecideInput {
            user,
            request: "",
            iat: 0,
            app: "idoctor",
            method: "GET",
            path: "/x",
            charges: &[],
            rates: &rates,
            now,
            time_zone: chrono_tz::UTC,
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
    cp.cleanup().await;
}

#[tokio::test]
async fn blind_settling_gives_back_exactly_what_was_taken_once() {
    let cp = ControlPlane::start(&support::redis_url()).await;
    let store = store(&cp).await;
    let user = cp.user(&[("api_calls_l3_detect", 10, Month)]).await;
    let event = Uuid::new_v4();
    let request = event.to_string();
    let charges = [Charge {
        quota_type: "api_calls_l3_detect",
        cost: 3,
        event_id: event,
        reserve: false,
    }];
    let input = DecideInput {
        user,
        request: &request,
        iat: 0,
        app: "idoctor",
        method: "POST",
        path: "/l3/p",
        charges: &charges,
        rates: &[],
        now: chrono::Utc::now(),
        time_zone: chrono_tz::UTC,
    };
    assert!(matches!(
        store.decide(&input).await.expect("decide"),
        Decision::Admitted { .. }
    ));
    assert_eq!(cp.used(user, "api_calls_l3_detect").await, 3);
    assert_eq!(cp.events(user).await.len(), 1);

    // The caller knows nothing of what was taken (its answer was lost).
    let settle = |request_id: &str| {
        let items = [SettleItem {
            quota_type: "api_calls_l3_detect",
            event_id: event,
            actual: 0,
        }];
        let store = store.clone();
        let request_id = request_id.to_owned();
        async move {
            store
                .settle(&SettleInput {
                    refund: true,
                    user,
                    request_id: &request_id,
                    app: "idoctor",
                    method: "POST",
                    path: "/l3/p",
                    now: chrono::Utc::now(),
                    items: &items,
                })
                .await
                .expect("settle")
        }
    };
    assert!(
        settle(&request).await,
        "the decision ran: its cost comes back"
    );
    assert_eq!(cp.used(user, "api_calls_l3_detect").await, 0);
    assert!(
        cp.events(user).await.is_empty(),
        "and its usage event is gone"
    );
    assert!(
        !settle(&request).await,
        "a second settle gives nothing back"
    );
    assert_eq!(cp.used(user, "api_calls_l3_detect").await, 0);

    // A decision that never ran gives nothing back, even with a counter in place.
    assert!(matches!(
        store
            .decide(&DecideInput {
                request: &Uuid::new_v4().to_string(),
                ..input
            })
            .await
            .expect("decide"),
        Decision::Admitted { .. }
    ));
    assert!(!settle(&Uuid::new_v4().to_string()).await);
    assert_eq!(cp.used(user, "api_calls_l3_detect").await, 3);
    cp.cleanup().await;
}
