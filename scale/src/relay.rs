//! The outbox relay: publishes committed events, in position order, to the event topic.
//!
//! Rules:
//! - **One relay at a time.** A relay leads only while it holds a PostgreSQL advisory lock on
//!   its own connection; the others wait on standby and retry every second. If the leader's
//!   process or connection dies, PostgreSQL releases the lock and a standby takes over from the
//!   checkpoint. Any number of instances may run the relay role.
//! - **At least once, in order.** A page of events is sent through the idempotent producer
//!   (never reordered or duplicated within a producer session), every delivery is awaited, and
//!   only then does the checkpoint move, on the lock's connection: a checkpoint write that
//!   fails means the lease may be lost, and the relay stops leading. After a crash the events
//!   since the checkpoint are published again; consumers drop positions they have seen.
//! - **Never skips.** Pages come from the log read after the checkpoint, and the log is
//!   gapless.

use std::time::Duration;

use countersign_eventstore::{Database, RecordedEvent, SharedStore, StoreError};
use futures::future::try_join_all;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};
use tokio::sync::watch;

use crate::kafka::{self, KafkaConfig, PARTITION};

/// Why relaying stopped.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The relay needs PostgreSQL (its lease is an advisory lock).
    #[error("the outbox relay needs PostgreSQL")]
    NotPostgres,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("relay database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
}

/// The lock key: "cs-relay" plus the topic's hash would collide only by accident; one key per
/// topic lets two deployments share a database with different topics.
fn lock_key(topic: &str) -> i64 {
    // FNV-1a, stable across builds and platforms.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in topic.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// Events read from the log and published per page.
const PAGE: usize = 10_000;
/// How often a standby asks for the lease, and how often a leader re-reads the log when it
/// heard no commit.
const STANDBY: Duration = Duration::from_secs(1);
/// Longest pause after a failure.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The outbox relay.
#[derive(Debug, Clone)]
pub struct Relay {
    pool: PgPool,
    store: SharedStore,
    kafka: KafkaConfig,
    published: watch::Sender<u64>,
}

impl Relay {
    pub fn new(db: &Database, store: SharedStore, kafka: KafkaConfig) -> Result<Self, RelayError> {
        let Database::Postgres(pool) = db else {
            return Err(RelayError::NotPostgres);
        };
        Ok(Self {
            pool: pool.clone(),
            store,
            kafka,
            published: watch::channel(0).0,
        })
    }

    /// The next position to publish, as far as this process has published (0 until it leads).
    pub fn published(&self) -> watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// The stored checkpoint: every position below it is in the topic.
    pub async fn checkpoint(&self) -> Result<u64, RelayError> {
        let position: Option<i64> =
            sqlx::query_scalar("SELECT position FROM relay_checkpoints WHERE name = $1")
                .bind(&self.kafka.topic)
                .fetch_optional(&self.pool)
                .await?;
        Ok(position.map_or(0, |p| u64::try_from(p).unwrap_or(0)))
    }

    /// Relays for as long as the process runs: waits for the lease, publishes, and after a
    /// failure (broker or database away) starts over from the checkpoint after a pause.
    pub async fn run(&self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let before = *self.published.borrow();
            match self.lead().await {
                Ok(()) => {}
                Err(error) => {
                    if *self.published.borrow() != before {
                        backoff = Duration::from_millis(100);
                    }
                    tracing::warn!(%error, "outbox relay: starting over in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Creates the topic with one partition if it does not exist.
    pub async fn ensure_topic(&self) -> Result<(), RelayError> {
        let admin: AdminClient<_> = self.kafka.admin_config().create()?;
        let topic = NewTopic::new(&self.kafka.topic, 1, TopicReplication::Fixed(1));
        let results = admin
            .create_topics(
                [&topic],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    tracing::warn!(%topic, %code, "cannot create the event topic");
                    return Err(KafkaError::AdminOp(code).into());
                }
            }
        }
        Ok(())
    }

    /// Leads until an error: takes the lease, then publishes page after page.
    async fn lead(&self) -> Result<(), RelayError> {
        let mut lease = self.pool.acquire().await?;
        let key = lock_key(&self.kafka.topic);
        loop {
            let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(key)
                .fetch_one(&mut *lease)
                .await?;
            if held {
                break;
            }
            tokio::time::sleep(STANDBY).await;
        }
        let result = self.publish_all(&mut lease).await;
        // Give the lease back at once (a closed connection would release it too).
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(key)
            .execute(&mut *lease)
            .await;
        result
    }

    async fn publish_all(&self, lease: &mut PoolConnection<Postgres>) -> Result<(), RelayError> {
        if let Err(error) = self.ensure_topic().await {
            tracing::warn!(%error, "could not make sure the event topic exists");
        }
        let producer: FutureProducer = self.kafka.producer_config().create()?;
        sqlx::query(
            "INSERT INTO relay_checkpoints (name, position) VALUES ($1, 0) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&self.kafka.topic)
        .execute(&mut **lease)
        .await?;
        let mut next = self.checkpoint().await?;
        tracing::info!(topic = %self.kafka.topic, from = next, "outbox relay leading");
        self.published.send_replace(next);
        let mut head = self.store.head();
        loop {
            head.borrow_and_update();
            let page = self.store.read_all(next, PAGE).await?;
            let Some(last) = page.last() else {
                tokio::select! {
                    changed = head.changed() => {
                        if changed.is_err() {
                            return Err(StoreError::Unavailable("the store was closed".into()).into());
                        }
                    }
                    () = tokio::time::sleep(STANDBY) => {}
                }
                continue;
            };
            let to = last.position + 1;
            publish(&producer, &self.kafka.topic, &page).await?;
            let moved = sqlx::query(
                "UPDATE relay_checkpoints SET position = $1 WHERE name = $2 AND position = $3",
            )
            .bind(i64::try_from(to).unwrap_or(i64::MAX))
            .bind(&self.kafka.topic)
            .bind(i64::try_from(next).unwrap_or(i64::MAX))
            .execute(&mut **lease)
            .await?;
            if moved.rows_affected() != 1 {
                return Err(StoreError::Corrupt(
                    "another relay moved the checkpoint: the lease was lost".into(),
                )
                .into());
            }
            next = to;
            self.published.send_replace(next);
        }
    }
}

/// Sends every event of `page` and waits for each delivery.
async fn publish(
    producer: &FutureProducer,
    topic: &str,
    page: &[RecordedEvent],
) -> Result<(), RelayError> {
    let mut deliveries = Vec::with_capacity(page.len());
    let mut delivered = 0;
    for event in page {
        let value = event.canonical_bytes()?;
        let mut record = FutureRecord::to(topic)
            .partition(PARTITION)
            .key(event.stream.as_bytes())
            .payload(&value)
            .headers(kafka::headers(event))
            .timestamp(event.recorded_at);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // The producer's queue is full: wait for the oldest delivery still
                    // outstanding, which frees its place.
                    record = back;
                    match deliveries.get_mut(delivered) {
                        Some(oldest) => {
                            delivery_result(oldest).await?;
                            delivered += 1;
                        }
                        None => {
                            return Err(
                                KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull).into()
                            );
                        }
                    }
                }
                Err((error, _)) => return Err(error.into()),
            }
        }
    }
    try_join_all(deliveries.iter_mut().skip(delivered).map(delivery_result)).await?;
    Ok(())
}

/// Waits for one delivery's acknowledgement.
async fn delivery_result(delivery: &mut DeliveryFuture) -> Result<(), RelayError> {
    match delivery.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((error, _))) => Err(RelayError::Kafka(error)),
        Err(_) => Err(RelayError::Kafka(KafkaError::Canceled)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_topic_has_its_own_lease() {
        assert_eq!(
            lock_key("countersign.events"),
            lock_key("countersign.events")
        );
        assert_ne!(lock_key("countersign.events"), lock_key("other.events"));
    }
}
