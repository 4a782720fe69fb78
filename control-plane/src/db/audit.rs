//! The audit log of administrative changes.

use uuid::Uuid;

use super::DbError;

pub async fn record(
    client: &impl tokio_postgres::GenericClient,
    actor: Uuid,
    action: &str,
    target_type: &str,
    target_id: &str,
    details: &serde_json::Value,
) -> Result<(), DbError> {
    client
        .execute(
            "INSERT INTO audit_log (actor_id, action, target_type, target_id, details)
             VALUES ($1, $2, $3, $4, $5)",
            &[&actor, &action, &target_type, &target_id, details],
        )
        .await
        .map_err(DbError::op("write audit log"))?;
    Ok(())
}
