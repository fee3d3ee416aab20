//! The SQLite event store: the embedded default, one file, nothing to install.
//!
//! SQLite has one writer at a time. The writer task owns a dedicated connection and opens
//! every batch with `BEGIN IMMEDIATE`, which takes the database's write lock before it reads
//! the head, so even several processes on one file assign positions in commit order. The
//! database runs in WAL mode with `synchronous = FULL`: an acknowledged append survives a
//! crash of the process and of the machine. The database file is created readable by its
//! owner only (0600), and SQLite gives its `-wal` and `-shm` files the same mode: they hold
//! the log, transaction texts in clear among it.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, Executor, Row as _};
use tokio::sync::watch;
use uuid::Uuid;

use crate::plan::{PendingAppend, Row, StoredId, plan_batch};
use crate::writer::{BatchWriter, WriterHandle};
use crate::{
    AppendResult, Direction, EventStore, ExpectedVersion, NewEvent, RecordedEvent, StoreError,
    codec, now_millis,
};

/// An event store in one SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// One read-write connection for the key vault (the writer task owns the log's).
    vault_pool: SqlitePool,
    writer: WriterHandle,
    head: watch::Receiver<Option<u64>>,
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` (`sqlite://path/to/file.db`).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        if url.contains(":memory:") || url.contains("mode=memory") {
            return Err(StoreError::Config(
                "an in-memory SQLite database cannot hold an event log; give a file path".into(),
            ));
        }
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("bad SQLite URL: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true)
            // Readers map the file instead of copying pages through read(2), and keep a
            // larger page cache: `$all` catch-up reads are sequential scans of the log.
            .pragma("mmap_size", "1073741824")
            .pragma("cache_size", "-65536");
        create_private(options.get_filename())?;
        let mut writer_conn = SqliteConnection::connect_with(&options)
            .await
            .map_err(|e| StoreError::Config(format!("cannot open SQLite database: {e}")))?;
        crate::migrate::sqlite(&mut writer_conn).await?;
        let vault_pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .map_err(|e| StoreError::Config(format!("cannot open SQLite database: {e}")))?;
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await
            .map_err(|e| StoreError::Config(format!("cannot open SQLite database: {e}")))?;
        let last = read_head(&pool).await?;
        let (head_tx, head) = watch::channel(last);
        let writer = WriterHandle::spawn(SqliteWriter { conn: writer_conn }, head_tx);
        Ok(Self {
            pool,
            vault_pool,
            writer,
            head,
        })
    }

    /// The read-write pool (one connection; the log's own writer has another).
    pub fn write_pool(&self) -> &SqlitePool {
        &self.vault_pool
    }
}

/// Creates the database file with mode 0600 unless it exists. SQLite itself would create it
/// 0644 (less the umask), and it creates the `-wal`, `-shm` and journal files with the
/// database file's mode: deciding it at this one creation keeps all of them private, with no
/// moment in which they are readable by others (a `chmod` afterwards would leave one).
fn create_private(path: &std::path::Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path);
        match created {
            Ok(_) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(error) => Err(StoreError::Config(format!(
                "cannot create the SQLite database {}: {error}",
                path.display()
            ))),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

async fn read_head(pool: &SqlitePool) -> Result<Option<u64>, StoreError> {
    let last: i64 = sqlx::query_scalar("SELECT last_position FROM es_head WHERE id = 1")
        .fetch_one(pool)
        .await?;
    Ok(u64::try_from(last).ok())
}

struct SqliteWriter {
    conn: SqliteConnection,
}

/// Multi-row INSERT statements come in a few fixed sizes so each stays prepared and cached.
const CHUNKS: [usize; 5] = [256, 64, 16, 4, 1];

fn insert_statement(rows: usize) -> &'static str {
    static STATEMENTS: [OnceLock<String>; 5] = [const { OnceLock::new() }; 5];
    let index = CHUNKS
        .iter()
        .position(|&c| c == rows)
        .unwrap_or(CHUNKS.len() - 1);
    let rows = CHUNKS.get(index).copied().unwrap_or(1);
    STATEMENTS
        .get(index)
        .map(|cell| {
            cell.get_or_init(|| {
                let values = vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; rows].join(", ");
                format!(
                    "INSERT INTO es_events (position, stream, version, event_id, event_type, \
                     schema_version, payload, metadata, server_id, recorded_at) VALUES {values}"
                )
            })
            .as_str()
        })
        .unwrap_or("")
}

impl SqliteWriter {
    async fn write_in_transaction(
        &mut self,
        batch: &[PendingAppend],
    ) -> Result<(Vec<Result<AppendResult, StoreError>>, Option<u64>), StoreError> {
        let head: i64 = sqlx::query_scalar("SELECT last_position FROM es_head WHERE id = 1")
            .fetch_one(&mut self.conn)
            .await?;

        let mut streams: Vec<&str> = batch.iter().map(|a| a.stream.as_str()).collect();
        streams.sort_unstable();
        streams.dedup();
        let streams_json =
            serde_json::to_string(&streams).map_err(|e| StoreError::InvalidAppend {
                reason: e.to_string(),
            })?;
        let mut versions = HashMap::new();
        for row in sqlx::query(
            "SELECT j.value, (SELECT max(version) FROM es_events e WHERE e.stream = j.value) \
             FROM json_each(?) AS j",
        )
        .bind(streams_json)
        .fetch_all(&mut self.conn)
        .await?
        {
            let stream: String = row.try_get(0)?;
            let version: Option<i64> = row.try_get(1)?;
            if let Some(v) = version {
                versions.insert(stream, codec::to_u64(v)?);
            }
        }

        let ids: Vec<String> = batch
            .iter()
            .flat_map(|a| a.events.iter().map(|e| e.event_id.simple().to_string()))
            .collect();
        let ids_json = serde_json::to_string(&ids).map_err(|e| StoreError::InvalidAppend {
            reason: e.to_string(),
        })?;
        let mut existing = HashMap::new();
        for row in sqlx::query(
            "SELECT event_id, stream, version, position FROM es_events \
             WHERE event_id IN (SELECT unhex(value) FROM json_each(?))",
        )
        .bind(ids_json)
        .fetch_all(&mut self.conn)
        .await?
        {
            let id: Uuid = row.try_get(0)?;
            existing.insert(
                id,
                StoredId {
                    stream: row.try_get(1)?,
                    version: codec::to_u64(row.try_get(2)?)?,
                    position: codec::to_u64(row.try_get(3)?)?,
                },
            );
        }

        let plan = plan_batch(batch, u64::try_from(head).ok(), &versions, &existing);
        let recorded_at = now_millis();
        let mut rest: &[Row<'_>] = &plan.rows;
        while !rest.is_empty() {
            let size = CHUNKS
                .iter()
                .copied()
                .find(|&c| c <= rest.len())
                .unwrap_or(1);
            let (chunk, tail) = rest.split_at(size.min(rest.len()));
            let mut query = sqlx::query(insert_statement(chunk.len()));
            for row in chunk {
                query = query
                    .bind(codec::to_i64(row.position)?)
                    .bind(row.stream)
                    .bind(codec::to_i64(row.version)?)
                    .bind(row.event.event_id)
                    .bind(row.event.event_type.as_str())
                    .bind(i64::from(row.event.schema_version))
                    .bind(row.event.payload.as_slice())
                    .bind(codec::encode_metadata(&row.event.metadata)?)
                    .bind(row.event.metadata.server_id.as_deref())
                    .bind(recorded_at);
            }
            query.execute(&mut self.conn).await?;
            rest = tail;
        }
        if !plan.rows.is_empty() {
            let new_head = plan.new_head.map(codec::to_i64).transpose()?.unwrap_or(-1);
            sqlx::query("UPDATE es_head SET last_position = ? WHERE id = 1")
                .bind(new_head)
                .execute(&mut self.conn)
                .await?;
        }
        Ok((plan.outcomes, plan.new_head))
    }
}

#[async_trait]
impl BatchWriter for SqliteWriter {
    async fn write_batch(
        &mut self,
        batch: &[PendingAppend],
    ) -> Result<(Vec<Result<AppendResult, StoreError>>, Option<u64>), StoreError> {
        self.conn.execute("BEGIN IMMEDIATE").await?;
        match self.write_in_transaction(batch).await {
            Ok(result) => {
                if let Err(error) = self.conn.execute("COMMIT").await {
                    let _ = self.conn.execute("ROLLBACK").await;
                    return Err(error.into());
                }
                Ok(result)
            }
            Err(error) => {
                if let Err(rollback) = self.conn.execute("ROLLBACK").await {
                    tracing::error!(%rollback, "rollback failed");
                }
                Err(error)
            }
        }
    }
}

crate::event_store_impl!(SqliteStore, SqliteRow);

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::SqliteStore;

    /// The database and its WAL and shared-memory files are the owner's only, whatever the
    /// umask lets through (the default 022 would give 0644).
    #[tokio::test]
    async fn database_files_are_created_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.db");
        let store = SqliteStore::connect(&format!("sqlite://{}", path.display()))
            .await
            .expect("open");
        let mut seen = Vec::new();
        for suffix in ["", "-wal", "-shm"] {
            let file = dir.path().join(format!("events.db{suffix}"));
            let mode = std::fs::metadata(&file)
                .expect("the migrations wrote through the WAL, which is open")
                .permissions()
                .mode();
            seen.push((suffix, format!("{:o}", mode & 0o777)));
        }
        let private = |suffix| (suffix, "600".to_owned());
        assert_eq!(seen, [private(""), private("-wal"), private("-shm")]);
        drop(store);
    }
}
