//! The `sfs_records` table: each app instance's current OPAQUE registration record. The
//! stream holds the record's digest; [`get`] answers a record only with its digest so the
//! caller can check it is the registered one.

use countersign_domain::AppInstanceId;
use countersign_eventstore::{Database, with_pool};
use sha2::{Digest, Sha256};

/// SHA-256 of a record, as `second_factor.pin_registered` carries it.
pub(crate) fn digest(record: &[u8]) -> [u8; 32] {
    Sha256::digest(record).into()
}

/// The record of `app`, if any.
pub(crate) async fn get(
    db: &Database,
    app: &AppInstanceId,
) -> Result<Option<Vec<u8>>, sqlx::Error> {
    Ok(with_pool!(db, pool => {
        sqlx::query_scalar("SELECT record FROM sfs_records WHERE app_instance = $1")
            .bind(app.as_bytes().as_slice())
            .fetch_optional(pool)
            .await?
    }))
}

/// Stores `record` as the record of `app`, replacing any other.
pub(crate) async fn put(
    db: &Database,
    app: &AppInstanceId,
    record: &[u8],
    now_ms: i64,
) -> Result<(), sqlx::Error> {
    with_pool!(db, pool => {
        sqlx::query(
            "INSERT INTO sfs_records (app_instance, record, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (app_instance) DO UPDATE SET record = excluded.record, \
             updated_at = excluded.updated_at",
        )
        .bind(app.as_bytes().as_slice())
        .bind(record)
        .bind(now_ms)
        .execute(pool)
        .await?
        .rows_affected()
    });
    Ok(())
}

/// Removes the record of `app` (undoing a registration the stream refused).
pub(crate) async fn delete(db: &Database, app: &AppInstanceId) -> Result<(), sqlx::Error> {
    with_pool!(db, pool => {
        sqlx::query("DELETE FROM sfs_records WHERE app_instance = $1")
            .bind(app.as_bytes().as_slice())
            .execute(pool)
            .await?
            .rows_affected()
    });
    Ok(())
}
