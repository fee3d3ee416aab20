//! The schema, embedded in the binary so the embedded default needs no files beside it.

use sqlx::migrate::Migrator;
use sqlx::{PgPool, SqliteConnection};

use crate::StoreError;

static POSTGRES: Migrator = sqlx::migrate!("../migrations/postgres");
static SQLITE: Migrator = sqlx::migrate!("../migrations/sqlite");

/// Applies pending PostgreSQL migrations. Concurrent instances serialise on sqlx's lock.
pub(crate) async fn postgres(pool: &PgPool) -> Result<(), StoreError> {
    POSTGRES.run(pool).await?;
    Ok(())
}

/// Applies pending SQLite migrations.
pub(crate) async fn sqlite(conn: &mut SqliteConnection) -> Result<(), StoreError> {
    SQLITE.run(conn).await?;
    Ok(())
}
