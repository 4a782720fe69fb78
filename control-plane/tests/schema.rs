//! The migrations and the seed against a real PostgreSQL: idempotent, safe to run concurrently,
//! and the constraints refuse bad rows.

mod support;

use support::TestDb;
use tollgate_control_plane::db::{DbError, migrate, seed};

#[tokio::test]
async fn migrations_apply_to_an_empty_database_and_twice_is_a_no_op() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let first = migrate::run(&mut client).await.expect("first run");
    assert_eq!(first.len(), migrate::MIGRATIONS.len());
    let second = migrate::run(&mut client).await.expect("second run");
    assert!(second.is_empty(), "second run applied {second:?}");
    let recorded: i64 = client
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(recorded as usize, migrate::MIGRATIONS.len());
}

#[tokio::test]
async fn concurrent_migrations_take_turns() {
    let db = TestDb::new().await;
    let runs = (0..4).map(|_| {
        let url = db.url.clone();
        tokio::spawn(async move {
            let mut client = tollgate_control_plane::db::connect(&url)
                .await
                .expect("connect");
            migrate::run(&mut client).await.expect("migrate")
        })
    });
    let mut applied = 0;
    for run in runs {
        applied += run.await.expect("join").len();
    }
    assert_eq!(
        applied,
        migrate::MIGRATIONS.len(),
        "each migration applied once"
    );
}

#[tokio::test]
async fn seed_is_idempotent_and_has_the_contract_data() {
    let db = TestDb::migrated().await;
    let mut client = db.client().await;
    seed::run(&mut client).await.expect("second seed");
    let plans: Vec<(String, i64)> = client
        .query(
            "SELECT id, price_amount FROM plans ORDER BY sort_order",
            &[],
        )
        .await
        .expect("plans")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(plans.len(), 3);
    assert_eq!(plans[0], ("free".to_owned(), 0));
    assert!(plans[1].0 == "pro" && plans[1].1 > 0);
    assert!(plans[2].0 == "enterprise" && plans[2].1 > plans[1].1);

    let types: Vec<(String, String, String)> = client
        .query(
            "SELECT key, unit, \"window\" FROM quota_types WHERE app_id = 'idoctor' ORDER BY key",
            &[],
        )
        .await
        .expect("types")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let want = [
        ("api_calls_full_process", "calls", "month"),
        ("api_calls_l3_detect", "calls", "month"),
        ("api_calls_muscle_seg", "calls", "month"),
        ("storage_bytes", "bytes", "lifetime"),
    ];
    assert_eq!(types.len(), want.len());
    for (got, want) in types.iter().zip(want) {
        assert_eq!((got.0.as_str(), got.1.as_str(), got.2.as_str()), want);
    }

    let free_limit: i64 = client
        .query_one(
            "SELECT pq.\"limit\" FROM plan_quotas pq JOIN quota_types qt ON qt.id = pq.quota_type_id
             WHERE pq.plan_id = 'free' AND qt.key = 'api_calls_full_process'",
            &[],
        )
        .await
        .expect("free limit")
        .get(0);
    assert_eq!(free_limit, 50);
    let rows: i64 = client
        .query_one("SELECT count(*) FROM plan_quotas", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 12, "a second seed adds no rows");
}

/// Runs `sql` and expects the named constraint to refuse it.
async fn refused(client: &tokio_postgres::Client, sql: &str, constraint_hint: &str) {
    let err = client
        .batch_execute(sql)
        .await
        .map_err(DbError::op("test"))
        .expect_err(sql);
    let named = err
        .check_violation()
        .or(err.unique_violation())
        .unwrap_or_else(|| panic!("{sql}: expected a check or unique violation, got {err}"));
    assert!(
        named.contains(constraint_hint),
        "{sql}: violated {named}, expected one about {constraint_hint}"
    );
}

#[tokio::test]
async fn constraints_refuse_bad_rows() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO users (id, email, password_hash)
             VALUES ('00000000-0000-0000-0000-000000000001', 'Dup@Example.com', 'x')",
        )
        .await
        .expect("first user");

    refused(
        &client,
        "INSERT INTO users (email, password_hash) VALUES ('dup@example.COM', 'x')",
        "users_email_lower_key",
    )
    .await;
    refused(
        &client,
        "INSERT INTO users (email, password_hash, role) VALUES ('r@example.com', 'x', 'root')",
        "role",
    )
    .await;
    refused(
        &client,
        "INSERT INTO quota_types (app_id, key, name, unit, \"window\")
         VALUES ('idoctor', 'weekly', 'Weekly', 'calls', 'week')",
        "window",
    )
    .await;
    refused(
        &client,
        "INSERT INTO plans (id, name, price_amount, period) VALUES ('neg', 'Neg', -1, 'month')",
        "price_amount",
    )
    .await;
    refused(
        &client,
        "INSERT INTO plan_quotas (plan_id, quota_type_id, \"limit\")
         SELECT 'free', id, -5 FROM quota_types WHERE key = 'storage_bytes'
         ON CONFLICT (plan_id, quota_type_id) DO UPDATE SET \"limit\" = -5",
        "limit",
    )
    .await;
    refused(
        &client,
        "INSERT INTO orders (id, user_id, plan_id, channel, amount, currency, expires_at)
         VALUES ('o1', '00000000-0000-0000-0000-000000000001', 'pro', 'alipay_page', -9900, 'CNY', now())",
        "amount",
    )
    .await;
    refused(
        &client,
        "INSERT INTO orders (id, user_id, plan_id, channel, amount, currency, expires_at)
         VALUES ('bad-id!', '00000000-0000-0000-0000-000000000001', 'pro', 'alipay_page', 9900, 'CNY', now())",
        "id",
    )
    .await;
    refused(
        &client,
        "INSERT INTO usage_minutes (user_id, minute, app_id, quota_key, route, amount, calls)
         VALUES ('00000000-0000-0000-0000-000000000001', '2026-11-25T10:00:30Z', 'idoctor',
                 'storage_bytes', 'POST /upload', 1, 1)",
        "usage_minutes_minute_check",
    )
    .await;
    refused(
        &client,
        "INSERT INTO quota_grants (user_id, quota_type_id, amount, window_start, reason)
         SELECT '00000000-0000-0000-0000-000000000001', id, 0, now(), 'none' FROM quota_types LIMIT 1",
        "amount",
    )
    .await;

    // Usage of a quota type that does not exist is refused by the foreign key.
    let err = client
        .batch_execute(
            "INSERT INTO usage_minutes (user_id, minute, app_id, quota_key, route, amount, calls)
             VALUES ('00000000-0000-0000-0000-000000000001', '2026-11-25T10:00:00Z', 'idoctor',
                     'no_such_type', 'POST /x', 1, 1)",
        )
        .await
        .expect_err("unknown quota type");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION)
    );

    // Two active subscriptions for one user are refused.
    client
        .batch_execute(
            "INSERT INTO subscriptions (user_id, plan_id) VALUES ('00000000-0000-0000-0000-000000000001', 'free')",
        )
        .await
        .expect("first subscription");
    refused(
        &client,
        "INSERT INTO subscriptions (user_id, plan_id) VALUES ('00000000-0000-0000-0000-000000000001', 'pro')",
        "subscriptions_one_active_per_user",
    )
    .await;
}

/// Migration 7 carries the order keys of the last 24 hours into `idempotency_keys`, with the
/// order as it was answered, so that a retry in flight across the upgrade gets its order back.
#[tokio::test]
async fn order_keys_of_the_last_day_move_to_idempotency_keys() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let before: Vec<_> = migrate::MIGRATIONS
        .iter()
        .filter(|m| m.version < 7)
        .collect();
    for m in &before {
        client.batch_execute(m.sql).await.expect(m.name);
    }
    client
        .batch_execute(
            "INSERT INTO users (id, email, password_hash) VALUES
                 ('00000000-0000-0000-0000-000000000001', 'old@example.com', 'x');
             INSERT INTO plans (id, name, price_amount, currency, period) VALUES ('p', 'P', 100, 'CNY', 'month');
             INSERT INTO orders (id, user_id, plan_id, channel, amount, currency, idempotency_key, pay_url, expires_at, created_at)
             VALUES ('TGRECENT', '00000000-0000-0000-0000-000000000001', 'p', 'alipay_page', 100, 'CNY', 'k-recent',
                     'https://pay.example/x', now() + interval '1 hour', now() - interval '1 hour'),
                    ('TGOLD', '00000000-0000-0000-0000-000000000001', 'p', 'wechat_native', 100, 'CNY', 'k-old',
                     NULL, now(), now() - interval '2 days');",
        )
        .await
        .expect("rows of before");
    let seven = migrate::MIGRATIONS
        .iter()
        .find(|m| m.version == 7)
        .expect("migration 7");
    client
        .batch_execute(seven.sql)
        .await
        .expect("migration 7 applies");
    let rows = client
        .query(
            "SELECT key, request, body_hash IS NULL, response_status, convert_from(response_body, 'UTF8')
             FROM idempotency_keys",
            &[],
        )
        .await
        .expect("keys");
    assert_eq!(rows.len(), 1, "only the last day's keys");
    let (key, request, any_body, status, body): (String, String, bool, i16, String) = (
        rows[0].get(0),
        rows[0].get(1),
        rows[0].get(2),
        rows[0].get(3),
        rows[0].get(4),
    );
    assert_eq!(
        (key.as_str(), request.as_str(), any_body, status),
        ("k-recent", "POST /v1/orders", true, 201)
    );
    let order: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(order["id"], "TGRECENT");
    assert_eq!(order["status"], "pending");
    assert_eq!(
        order["amount"],
        serde_json::json!({"amount": 100, "currency": "CNY"})
    );
    assert_eq!(order["pay_url"], "https://pay.example/x");
    assert!(order["paid_at"].is_null() && order.get("code_url").is_none());
    assert!(
        chrono::DateTime::parse_from_rfc3339(order["created_at"].as_str().expect("time")).is_ok()
    );
}
