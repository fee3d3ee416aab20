//! The OPAQUE registration records, kept outside the log: the stream holds each record's
//! digest (`second_factor.pin_registered`), the `sfs_opaque_records` table the record under
//! that digest.
//!
//! Crash safety: a registration stores its record *before* appending the event that names
//! it, and never overwrites: a row is keyed by (app instance, digest), so a crash between the
//! two steps leaves an extra row that no event names. A login reads only the row whose digest
//! the stream registered ([`get`]), so such an orphan is never used and the previous PIN
//! keeps working; the next registration succeeds as if nothing happened. After an event
//! commits, the record it superseded is removed, and so are orphans older than
//! [`ORPHAN_GRACE_MS`] (younger ones may belong to a registration still in flight)
//! ([`prune`]). Records of the first schema (`sfs_records`, one row per app instance) are
//! still read, by digest too, until the app instance registers again.

use countersign_domain::AppInstanceId;
use countersign_eventstore::{Database, with_pool};
use sha2::{Digest, Sha256};

/// An unreferenced record younger than this may belong to a registration between its two
/// steps, so [`prune`] keeps it.
pub(crate) const ORPHAN_GRACE_MS: i64 = 10 * 60 * 1000;

/// SHA-256 of a record, as `second_factor.pin_registered` carries it.
pub(crate) fn digest(record: &[u8]) -> [u8; 32] {
    Sha256::digest(record).into()
}

/// The record of `app` whose digest is `digest` (the one the stream registered), if stored.
pub(crate) async fn get(
    db: &Database,
    app: &AppInstanceId,
    digest: &[u8; 32],
) -> Result<Option<Vec<u8>>, sqlx::Error> {
    let (keyed, legacy): (Option<Vec<u8>>, Option<Vec<u8>>) = with_pool!(db, pool => {
        let keyed: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT record FROM sfs_opaque_records WHERE app_instance = $1 AND record_digest = $2",
        )
        .bind(app.as_bytes().as_slice())
        .bind(digest.as_slice())
        .fetch_optional(pool)
        .await?;
        let legacy = match keyed {
            Some(_) => None,
            None => sqlx::query_scalar("SELECT record FROM sfs_records WHERE app_instance = $1")
                .bind(app.as_bytes().as_slice())
                .fetch_optional(pool)
                .await?,
        };
        (keyed, legacy)
    });
    // The digest is checked again on the bytes: a row is used only if it is the record named.
    Ok(keyed
        .or(legacy)
        .filter(|record| self::digest(record) == *digest))
}

/// Stores `record` of `app` under its digest, beside any other.
pub(crate) async fn put(
    db: &Database,
    app: &AppInstanceId,
    record: &[u8],
    now_ms: i64,
) -> Result<(), sqlx::Error> {
    with_pool!(db, pool => {
        sqlx::query(
            "INSERT INTO sfs_opaque_records (app_instance, record_digest, record, created_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (app_instance, record_digest) DO NOTHING",
        )
        .bind(app.as_bytes().as_slice())
        .bind(digest(record).as_slice())
        .bind(record)
        .bind(now_ms)
        .execute(pool)
        .await?
        .rows_affected()
    });
    Ok(())
}

/// Removes the record of `app` under `digest` (a registration the stream refused).
pub(crate) async fn discard(
    db: &Database,
    app: &AppInstanceId,
    digest: &[u8; 32],
) -> Result<(), sqlx::Error> {
    with_pool!(db, pool => {
        sqlx::query("DELETE FROM sfs_opaque_records WHERE app_instance = $1 AND record_digest = $2")
            .bind(app.as_bytes().as_slice())
            .bind(digest.as_slice())
            .execute(pool)
            .await?
            .rows_affected()
    });
    Ok(())
}

/// Once the stream registered `current`: removes the record it superseded (`previous`), the
/// first schema's row, and orphans older than the grace period. Answers how many rows went.
pub(crate) async fn prune(
    db: &Database,
    app: &AppInstanceId,
    current: &[u8; 32],
    previous: Option<&[u8; 32]>,
    now_ms: i64,
) -> Result<u64, sqlx::Error> {
    let previous = previous.filter(|p| *p != current).unwrap_or(current);
    Ok(with_pool!(db, pool => {
        let keyed = sqlx::query(
            "DELETE FROM sfs_opaque_records WHERE app_instance = $1 AND record_digest <> $2 \
             AND (record_digest = $3 OR created_at < $4)",
        )
        .bind(app.as_bytes().as_slice())
        .bind(current.as_slice())
        .bind(previous.as_slice())
        .bind(now_ms.saturating_sub(ORPHAN_GRACE_MS))
        .execute(pool)
        .await?
        .rows_affected();
        let legacy = sqlx::query("DELETE FROM sfs_records WHERE app_instance = $1")
            .bind(app.as_bytes().as_slice())
            .execute(pool)
            .await?
            .rows_affected();
        keyed + legacy
    }))
}
