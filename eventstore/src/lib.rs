//! countersign's event store: the source of truth for everything the platform does.
//!
//! EventStoreDB semantics on sqlx, with two backends behind one [`EventStore`] trait:
//! PostgreSQL for scaled deployments and SQLite (one file) for the embedded default.
//!
//! The rules it enforces:
//! - **Append-only.** There is no update or delete operation; on PostgreSQL a trigger refuses
//!   UPDATE, DELETE and TRUNCATE of `es_events`, on SQLite triggers refuse UPDATE and DELETE.
//! - **Positions are global, gapless, from 0, and visible in order.** No reader ever sees
//!   position n+1 before n (see `postgres` and `sqlite` for how each backend guarantees it).
//! - **Optimistic concurrency.** Each append names the version it expects the stream to be
//!   at; of two concurrent appends expecting the same version one wins and the other gets
//!   [`StoreError::WrongExpectedVersion`].
//! - **Idempotent retries.** Retrying an append with the same event ids writes nothing new and
//!   answers the original positions.
//! - **Acknowledged means committed.** An append is answered after its transaction commits.
//! - **Group commit.** Concurrent appends in one process share one transaction (`writer`).

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;

/// A SELECT of whole envelopes, as a `&'static str` so statements stay prepared and cached.
macro_rules! select_events {
    ($rest:literal) => {
        concat!(
            "SELECT position, stream, version, event_id, event_type, schema_version, payload, ",
            "metadata, recorded_at FROM es_events ",
            $rest
        )
    };
}

/// The reading half of [`EventStore`] and the envelope decoding, written once for both
/// backends: their SQL is the same (sqlx binds `$n` on SQLite too), only the pool and row
/// types differ. Each backend module provides `read_head` and its `writer` and `pool` fields.
macro_rules! event_store_impl {
    ($store:ident, $row:ident) => {
        fn decode_row(row: &$row) -> Result<RecordedEvent, StoreError> {
            let position = $crate::codec::to_u64(row.try_get("position")?)?;
            let event_type: String = row.try_get("event_type")?;
            let metadata_bytes: Vec<u8> = row.try_get("metadata")?;
            Ok(RecordedEvent {
                position,
                stream: row.try_get("stream")?,
                version: $crate::codec::to_u64(row.try_get("version")?)?,
                event_id: row.try_get("event_id")?,
                schema_version: $crate::codec::schema_version(
                    position,
                    &event_type,
                    i64::from(row.try_get::<i32, _>("schema_version")?),
                )?,
                metadata: $crate::codec::decode_metadata(position, &event_type, &metadata_bytes)?,
                metadata_cbor: metadata_bytes,
                event_type,
                payload: row.try_get("payload")?,
                recorded_at: row.try_get("recorded_at")?,
            })
        }

        #[async_trait]
        impl EventStore for $store {
            async fn append(
                &self,
                stream: &str,
                expected: ExpectedVersion,
                events: Vec<NewEvent>,
            ) -> Result<AppendResult, StoreError> {
                $crate::model::validate_append(stream, &events)?;
                self.writer
                    .append($crate::plan::PendingAppend {
                        stream: stream.to_owned(),
                        expected,
                        events,
                    })
                    .await
            }

            async fn read_stream(
                &self,
                stream: &str,
                from_version: Option<u64>,
                direction: Direction,
                limit: usize,
            ) -> Result<Vec<RecordedEvent>, StoreError> {
                let limit = $crate::codec::to_i64(limit as u64)?;
                let rows = match direction {
                    Direction::Forwards => {
                        let from = $crate::codec::to_i64(from_version.unwrap_or(0))?;
                        sqlx::query(select_events!(
                            "WHERE stream = $1 AND version >= $2 ORDER BY version LIMIT $3"
                        ))
                        .bind(stream)
                        .bind(from)
                        .bind(limit)
                        .fetch_all(&self.pool)
                        .await?
                    }
                    Direction::Backwards => {
                        let from = from_version
                            .map($crate::codec::to_i64)
                            .transpose()?
                            .unwrap_or(i64::MAX);
                        sqlx::query(select_events!(
                            "WHERE stream = $1 AND version <= $2 ORDER BY version DESC LIMIT $3"
                        ))
                        .bind(stream)
                        .bind(from)
                        .bind(limit)
                        .fetch_all(&self.pool)
                        .await?
                    }
                };
                rows.iter().map(decode_row).collect()
            }

            async fn read_all(
                &self,
                from: u64,
                limit: usize,
            ) -> Result<Vec<RecordedEvent>, StoreError> {
                let rows = sqlx::query(select_events!(
                    "WHERE position >= $1 ORDER BY position LIMIT $2"
                ))
                .bind($crate::codec::to_i64(from)?)
                .bind($crate::codec::to_i64(limit as u64)?)
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(decode_row).collect()
            }

            async fn last_position(&self) -> Result<Option<u64>, StoreError> {
                read_head(&self.pool).await
            }

            fn head(&self) -> watch::Receiver<Option<u64>> {
                self.head.clone()
            }

            fn write_stats(&self) -> $crate::WriteStats {
                self.writer.stats()
            }
        }
    };
}
pub(crate) use event_store_impl;

mod codec;
mod error;
pub mod follow;
mod migrate;
mod model;
mod plan;
mod postgres;
mod sqlite;
mod subscription;
pub mod vault;
mod writer;

#[cfg(test)]
mod conformance;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use error::StoreError;
pub use model::{
    AppendResult, Direction, ExpectedVersion, MAX_EVENTS_PER_APPEND, MAX_PAYLOAD_BYTES,
    MAX_STREAM_NAME_BYTES, Metadata, NewEvent, RecordedEvent,
};
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;
pub use subscription::Subscription;
pub use writer::WriteStats;

/// The event store's operations. Both backends pass the same conformance suite.
#[async_trait]
pub trait EventStore: Send + Sync + std::fmt::Debug {
    /// Appends `events` to `stream` if it is at the `expected` version. Answers after commit.
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError>;

    /// Reads up to `limit` events of one stream. Forwards starts at `from_version` (default
    /// 0); backwards starts at `from_version` (default: the last event) and goes down.
    async fn read_stream(
        &self,
        stream: &str,
        from_version: Option<u64>,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Reads up to `limit` events of `$all` from position `from` on, in position order.
    async fn read_all(&self, from: u64, limit: usize) -> Result<Vec<RecordedEvent>, StoreError>;

    /// The last committed position, read from the database (`None`: the log is empty).
    async fn last_position(&self) -> Result<Option<u64>, StoreError>;

    /// The last committed position as this process knows it, updated after each commit (and,
    /// on PostgreSQL, on other processes' notifications): what subscribers wait on.
    fn head(&self) -> watch::Receiver<Option<u64>>;

    /// This process's write counters (for metrics, and to see group commit at work).
    fn write_stats(&self) -> WriteStats;
}

/// A shared handle to whichever backend the configuration chose.
pub type SharedStore = Arc<dyn EventStore>;

/// Options for [`open`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// `postgres://…` or `sqlite://path/to/file.db`.
    pub url: String,
    /// PostgreSQL connections for reads and the writer.
    pub pool_size: u32,
}

/// An opened database: the event log and the key vault beside it.
#[derive(Debug, Clone)]
pub struct Opened {
    pub events: SharedStore,
    pub vault: Arc<dyn vault::VaultStorage>,
    /// The database itself, for read models and projections kept beside the log.
    pub database: Database,
}

/// A read-write pool on the log's database, for components that keep their own tables there
/// (read models, the audit tree). Their SQL uses `$n` placeholders, which both accept.
#[derive(Debug, Clone)]
pub enum Database {
    Postgres(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

/// Runs the same code against whichever pool a [`Database`] holds: the SQL text is shared,
/// only the driver types differ.
#[macro_export]
macro_rules! with_pool {
    ($database:expr, $pool:ident => $body:expr) => {
        match $database {
            $crate::Database::Postgres($pool) => $body,
            $crate::Database::Sqlite($pool) => $body,
        }
    };
}

/// Opens the store named by the URL's scheme and applies its schema.
pub async fn open(options: &StoreOptions) -> Result<Opened, StoreError> {
    let url = options.url.as_str();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let store = Arc::new(PostgresStore::connect(url, options.pool_size).await?);
        let database = Database::Postgres(store.pool().clone());
        Ok(Opened {
            vault: Arc::new(database.clone()),
            database,
            events: store,
        })
    } else if url.starts_with("sqlite:") {
        let store = Arc::new(SqliteStore::connect(url).await?);
        let database = Database::Sqlite(store.write_pool().clone());
        Ok(Opened {
            vault: Arc::new(database.clone()),
            database,
            events: store,
        })
    } else {
        Err(StoreError::Config(format!(
            "unsupported database URL scheme in {:?}: use postgres://… or sqlite://…",
            redact_url(url)
        )))
    }
}

/// A URL fit for error messages and logs: any password is replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let authority_start = scheme_end + 3;
    let rest = url.get(authority_start..).unwrap_or("");
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = rest.get(..authority_end).unwrap_or("");
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = authority.get(..at).unwrap_or("");
    let Some((user, _password)) = userinfo.split_once(':') else {
        return url.to_owned();
    };
    format!(
        "{}{user}:***{}",
        url.get(..authority_start).unwrap_or(""),
        url.get(authority_start + at..).unwrap_or("")
    )
}

/// The store stamps `recorded_at` itself: it is the edge where events meet the clock.
#[allow(clippy::disallowed_methods)]
pub(crate) fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod redact_tests {
    use super::redact_url;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact_url("postgres://u:s3cret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("postgres://h/db?x=a@b"), "postgres://h/db?x=a@b");
        assert_eq!(
            redact_url("sqlite://countersign.db"),
            "sqlite://countersign.db"
        );
        assert!(!redact_url("postgres://u:p@ss@h/db").contains("ss"));
    }
}
