//! The seed: the `idoctor` app, its quota types and the `free` / `pro` / `enterprise` plans.
//! Idempotent: rows that exist are left alone, so an operator's later edits (through the admin
//! API) survive a second `seed`.

use super::DbError;

const SEED: &str = r#"
INSERT INTO apps (id, name, time_zone) VALUES ('idoctor', 'iDoctor CT analysis', 'Asia/Shanghai')
ON CONFLICT DO NOTHING;

INSERT INTO quota_types (app_id, key, name, unit, "window") VALUES
    ('idoctor', 'api_calls_full_process', 'Full CT processing (L3 detection + muscle segmentation)', 'calls', 'month'),
    ('idoctor', 'api_calls_l3_detect',    'L3 vertebra detection',                                    'calls', 'month'),
    ('idoctor', 'api_calls_muscle_seg',   'Muscle segmentation',                                      'calls', 'month'),
    ('idoctor', 'storage_bytes',          'Stored uploads',                                           'bytes', 'lifetime')
ON CONFLICT (app_id, key) DO NOTHING;

INSERT INTO plans (id, name, price_amount, currency, period, public, sort_order) VALUES
    ('free',       'Free',       0,     'CNY', 'month', true, 0),
    ('pro',        'Pro',        9900,  'CNY', 'month', true, 1),
    ('enterprise', 'Enterprise', 99900, 'CNY', 'month', true, 2)
ON CONFLICT (id) DO NOTHING;

INSERT INTO plan_quotas (plan_id, quota_type_id, "limit")
SELECT v.plan_id, qt.id, v.lim
FROM (VALUES
    ('free',       'api_calls_full_process', 50::bigint),
    ('free',       'api_calls_l3_detect',    100),
    ('free',       'api_calls_muscle_seg',   100),
    ('free',       'storage_bytes',          104857600),      -- 100 MiB
    ('pro',        'api_calls_full_process', 2000),
    ('pro',        'api_calls_l3_detect',    10000),
    ('pro',        'api_calls_muscle_seg',   10000),
    ('pro',        'storage_bytes',          10737418240),    -- 10 GiB
    ('enterprise', 'api_calls_full_process', 50000),
    ('enterprise', 'api_calls_l3_detect',    500000),
    ('enterprise', 'api_calls_muscle_seg',   500000),
    ('enterprise', 'storage_bytes',          1099511627776)   -- 1 TiB
) AS v (plan_id, quota_key, lim)
JOIN quota_types qt ON qt.app_id = 'idoctor' AND qt.key = v.quota_key
WHERE NOT EXISTS (SELECT 1 FROM plan_quotas pq WHERE pq.plan_id = v.plan_id)
ON CONFLICT DO NOTHING;
"#;

/// Inserts the seed data in one transaction.
pub async fn run(client: &mut tokio_postgres::Client) -> Result<(), DbError> {
    let tx = client
        .transaction()
        .await
        .map_err(DbError::op("begin seed"))?;
    tx.batch_execute(SEED).await.map_err(DbError::op("seed"))?;
    tx.commit().await.map_err(DbError::op("commit seed"))
}
