//! Applies the numbered SQL files of `migrations/`, embedded at build time. Each file runs in its
//! own transaction and is recorded in `schema_migrations` with a checksum; a session-level
//! advisory lock makes concurrent runs (two replicas starting at once) take turns, so running
//! twice, or from two processes, is safe.

use sha2::{Digest, Sha256};

use super::DbError;

pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

pub static MIGRATIONS: &[Migration] = include!(concat!(env!("OUT_DIR"), "/migrations.rs"));

/// Arbitrary but fixed: the advisory-lock key that serialises migration runs.
const LOCK_KEY: i64 = 0x746f_6c6c_6761_7465; // "tollgate"

/// Applies every pending migration and returns the versions it applied.
pub async fn run(client: &mut tokio_postgres::Client) -> Result<Vec<i64>, DbError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(DbError::op("take migration lock"))?;
    let result = apply_pending(client).await;
    // Unlock even after a failure; the lock would also go with the connection.
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await
        .map_err(DbError::op("release migration lock"));
    let applied = result?;
    unlock?;
    Ok(applied)
}

fn checksum(sql: &str) -> String {
    hex::encode(Sha256::digest(sql.as_bytes()))
}

async fn apply_pending(client: &mut tokio_postgres::Client) -> Result<Vec<i64>, DbError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    bigint PRIMARY KEY,
                 name       text NOT NULL,
                 checksum   text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(DbError::op("create schema_migrations"))?;
    let rows = client
        .query("SELECT version, checksum FROM schema_migrations", &[])
        .await
        .map_err(DbError::op("read schema_migrations"))?;
    let done: std::collections::HashMap<i64, String> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();

    let mut applied = Vec::new();
    for m in MIGRATIONS {
        let sum = checksum(m.sql);
        if let Some(recorded) = done.get(&m.version) {
            if *recorded != sum {
                return Err(DbError::Invalid(format!(
                    "migration {} ({}) was changed after it was applied; add a new migration instead",
                    m.version, m.name
                )));
            }
            continue;
        }
        let tx = client
            .transaction()
            .await
            .map_err(DbError::op("begin migration"))?;
        tx.batch_execute(m.sql)
            .await
            .map_err(DbError::op("apply migration"))
            .map_err(|e| DbError::Invalid(format!("migration {} ({}): {e}", m.version, m.name)))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[&m.version, &m.name, &sum],
        )
        .await
        .map_err(DbError::op("record migration"))?;
        tx.commit().await.map_err(DbError::op("commit migration"))?;
        tracing::info!(version = m.version, name = m.name, "applied migration");
        applied.push(m.version);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_embedded_in_order() {
        assert!(!MIGRATIONS.is_empty());
        assert!(MIGRATIONS.windows(2).all(|w| w[0].version < w[1].version));
        assert_eq!(MIGRATIONS[0].version, 1);
    }
}
