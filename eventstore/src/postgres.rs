//! The PostgreSQL event store.
//!
//! Every appending transaction first locks the single `es_head` row, so transactions that
//! append are serialised across all processes sharing the database: positions are assigned
//! in commit order, a rolled-back transaction gives its positions back, and a reader's
//! snapshot that contains position n+1 also contains n (the holder of n committed before the
//! next writer could read the head). Within one process the writer batches appends (group
//! commit). A `NOTIFY` in each transaction wakes subscribers in other processes.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions, Row as _};
use tokio::sync::watch;
use uuid::Uuid;

use crate::plan::{PendingAppend, StoredId, plan_batch};
use crate::writer::{BatchWriter, WriterHandle};
use crate::{
    AppendResult, Direction, EventStore, ExpectedVersion, NewEvent, RecordedEvent, StoreError,
    codec, now_millis,
};

/// Channel that carries "the head moved to N" between processes.
const NOTIFY_CHANNEL: &str = "countersign_events";

/// An event store on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    writer: WriterHandle,
    head: watch::Receiver<Option<u64>>,
}

impl PostgresStore {
    /// Connects, applies the schema and starts the writer and the cross-process listener.
    pub async fn connect(url: &str, pool_size: u32) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("bad PostgreSQL URL: {e}")))?
            .log_statements(tracing::log::LevelFilter::Trace)
            // sqlx prepares every statement; after five runs PostgreSQL may switch to a generic
            // plan made from the statistics of that moment. For a log that starts empty that
            // plan is a sequential scan, kept while the table grows to millions of rows
            // (measured: appends fell to 3k events/s). Planning each execution is cheap here.
            .options([("plan_cache_mode", "force_custom_plan")]);
        let pool = PgPoolOptions::new()
            .max_connections(pool_size.max(2))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Config(format!("cannot connect to PostgreSQL: {e}")))?;
        Self::from_pool(pool).await
    }

    /// Uses an existing pool (tests, or a caller that shares it with read models).
    pub async fn from_pool(pool: PgPool) -> Result<Self, StoreError> {
        crate::migrate::postgres(&pool).await?;
        let last = read_head(&pool).await?;
        let (head_tx, head) = watch::channel(last);
        spawn_listener(pool.clone(), head_tx.clone());
        let writer = WriterHandle::spawn(PgWriter { pool: pool.clone() }, head_tx);
        Ok(Self { pool, writer, head })
    }

    /// The pool, for components that keep their read models in the same database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

async fn read_head(pool: &PgPool) -> Result<Option<u64>, StoreError> {
    let last: i64 = sqlx::query_scalar("SELECT last_position FROM es_head WHERE id = 1")
        .fetch_one(pool)
        .await?;
    Ok(u64::try_from(last).ok())
}

/// Wakes local subscribers when another process appends. A lost notification only delays a
/// subscriber until its next fallback read; it can never make it skip an event.
fn spawn_listener(pool: PgPool, head: watch::Sender<Option<u64>>) {
    tokio::spawn(async move {
        loop {
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(l) => l,
                Err(error) => {
                    tracing::warn!(%error, "event listener cannot connect; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if let Err(error) = listener.listen(NOTIFY_CHANNEL).await {
                tracing::warn!(%error, "LISTEN failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            loop {
                // Stop when the store is gone (no one watches the head any more).
                let received = tokio::select! {
                    received = listener.recv() => received,
                    () = head.closed() => return,
                };
                match received {
                    Ok(n) => {
                        let Ok(position) = n.payload().parse::<u64>() else {
                            continue;
                        };
                        head.send_if_modified(|h| {
                            let moved = Some(position) > *h;
                            if moved {
                                *h = Some(position);
                            }
                            moved
                        });
                    }
                    Err(error) => {
                        tracing::warn!(%error, "event listener lost its connection");
                        break;
                    }
                }
            }
        }
    });
}

struct PgWriter {
    pool: PgPool,
}

#[async_trait]
impl BatchWriter for PgWriter {
    async fn write_batch(
        &mut self,
        batch: &[PendingAppend],
    ) -> Result<(Vec<Result<AppendResult, StoreError>>, Option<u64>), StoreError> {
        let mut tx = self.pool.begin().await?;
        let head: i64 =
            sqlx::query_scalar("SELECT last_position FROM es_head WHERE id = 1 FOR UPDATE")
                .fetch_one(&mut *tx)
                .await?;

        let mut streams: Vec<&str> = batch.iter().map(|a| a.stream.as_str()).collect();
        streams.sort_unstable();
        streams.dedup();
        let versions: HashMap<String, u64> = sqlx::query(
            "SELECT s.stream, (SELECT max(version) FROM es_events e WHERE e.stream = s.stream) \
             FROM unnest($1::text[]) AS s(stream)",
        )
        .bind(&streams)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .filter_map(|row| {
            let stream: String = row.try_get(0).ok()?;
            let version: Option<i64> = row.try_get(1).ok()?;
            Some((stream, u64::try_from(version?).ok()?))
        })
        .collect();

        let ids: Vec<Uuid> = batch
            .iter()
            .flat_map(|a| a.events.iter().map(|e| e.event_id))
            .collect();
        let existing: HashMap<Uuid, StoredId> = sqlx::query(
            "SELECT event_id, stream, version, position FROM es_events WHERE event_id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|row| -> Result<(Uuid, StoredId), StoreError> {
            Ok((
                row.try_get(0)?,
                StoredId {
                    stream: row.try_get(1)?,
                    version: codec::to_u64(row.try_get(2)?)?,
                    position: codec::to_u64(row.try_get(3)?)?,
                },
            ))
        })
        .collect::<Result<_, _>>()?;

        let plan = plan_batch(batch, u64::try_from(head).ok(), &versions, &existing);
        if plan.rows.is_empty() {
            tx.rollback().await?;
            return Ok((plan.outcomes, plan.new_head));
        }

        let recorded_at = now_millis();
        let n = plan.rows.len();
        let mut positions = Vec::with_capacity(n);
        let mut stream_names = Vec::with_capacity(n);
        let mut stream_versions = Vec::with_capacity(n);
        let mut event_ids = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        let mut schema_versions = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut metadata = Vec::with_capacity(n);
        let mut server_ids = Vec::with_capacity(n);
        for row in &plan.rows {
            positions.push(codec::to_i64(row.position)?);
            stream_names.push(row.stream);
            stream_versions.push(codec::to_i64(row.version)?);
            event_ids.push(row.event.event_id);
            types.push(row.event.event_type.as_str());
            schema_versions.push(i32::from(row.event.schema_version));
            payloads.push(row.event.payload.as_slice());
            metadata.push(codec::encode_metadata(&row.event.metadata)?);
            server_ids.push(row.event.metadata.server_id.as_deref());
        }
        let new_head = plan.new_head.map(codec::to_i64).transpose()?.unwrap_or(-1);
        // One statement writes the rows, moves the head and notifies other processes (a
        // data-modifying WITH runs to completion whether or not its output is read): the
        // writer's transaction is on the append path of every caller, so each round trip
        // saved here is saved for all of them.
        sqlx::query(
            "WITH written AS (INSERT INTO es_events (position, stream, version, event_id, \
             event_type, schema_version, payload, metadata, server_id, recorded_at) \
             SELECT p, s, v, i, t, sv, pl, m, sid, $10 FROM unnest($1::bigint[], $2::text[], \
             $3::bigint[], $4::uuid[], $5::text[], $6::int[], $7::bytea[], $8::bytea[], \
             $9::text[]) AS x(p, s, v, i, t, sv, pl, m, sid)), \
             moved AS (UPDATE es_head SET last_position = $11 WHERE id = 1) \
             SELECT pg_notify($12, $13)",
        )
        .bind(&positions)
        .bind(&stream_names)
        .bind(&stream_versions)
        .bind(&event_ids)
        .bind(&types)
        .bind(&schema_versions)
        .bind(&payloads)
        .bind(&metadata)
        .bind(&server_ids)
        .bind(recorded_at)
        .bind(new_head)
        .bind(NOTIFY_CHANNEL)
        .bind(new_head.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((plan.outcomes, plan.new_head))
    }
}

crate::event_store_impl!(PostgresStore, PgRow);
