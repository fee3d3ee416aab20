//! The read-model projector's events from the event topic, through a consumer group.
//!
//! The projector's checkpoints in PostgreSQL stay the truth of what it applied: the consumer
//! stores a message's offset for commit only once the read models have committed its
//! position, so a restart or a rebalance redelivers at most what was not yet applied, and
//! the projector drops what it already has. A gap in the topic (a message lost, a topic
//! recreated, retention shorter than the projector's absence) is filled from the log itself,
//! and counted, so the projector never stops on it and never skips. So is a topic silent for
//! 2 s while the log is ahead (the relay or the broker away, a consumer that lost its
//! partition): the read models keep up, and the topic's late messages are dropped as repeats.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use countersign_eventstore::{RecordedEvent, SharedStore, StoreError};
use countersign_projections::{EventFeed, PageSender, ProjectionError};
use futures::FutureExt as _;
use futures::future::BoxFuture;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::{Message as _, Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::kafka::{self, KafkaConfig};

/// How long a page waits for more messages once it has one.
const GATHER: Duration = Duration::from_millis(2);
/// How long the topic may stay silent before the feed looks whether the log is ahead.
const SILENCE: Duration = Duration::from_secs(2);

/// Where the projected events came from, for metrics and tests.
#[derive(Debug, Default)]
pub struct FeedCounts {
    /// Events taken from the topic.
    pub from_topic: AtomicU64,
    /// Events read from the log to fill a gap in the topic.
    pub from_log: AtomicU64,
    /// Messages dropped as repeats.
    pub repeated: AtomicU64,
}

/// A feed of the log's events from the event topic.
#[derive(Debug)]
pub struct KafkaFeed {
    kafka: KafkaConfig,
    group: String,
    store: SharedStore,
    counts: Arc<FeedCounts>,
}

impl KafkaFeed {
    /// A feed in consumer group `group`, filling gaps from `store`.
    pub fn new(kafka: KafkaConfig, group: impl Into<String>, store: SharedStore) -> Self {
        Self {
            kafka,
            group: group.into(),
            store,
            counts: Arc::default(),
        }
    }

    pub fn counts(&self) -> Arc<FeedCounts> {
        self.counts.clone()
    }

    async fn follow(
        &self,
        from: u64,
        batch: usize,
        mut processed: watch::Receiver<u64>,
        pages: PageSender,
    ) -> Result<(), ProjectionError> {
        let consumer: StreamConsumer = self
            .kafka
            .consumer_config(&self.group)
            .create()
            .map_err(unavailable)?;
        consumer
            .subscribe(&[&self.kafka.topic])
            .map_err(unavailable)?;
        let mut next = from;
        // (position, partition, offset) of events sent and not yet known to be committed.
        let mut sent: VecDeque<(u64, i32, i64)> = VecDeque::new();
        loop {
            let first = tokio::select! {
                received = consumer.recv() => Some(received.map_err(unavailable)?.detach()),
                changed = processed.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    None
                }
                () = tokio::time::sleep(SILENCE) => {
                    // The topic is silent: if the log is ahead (the relay or the broker is
                    // away, or the consumer lost its partition), read it from the log.
                    let mut page = Vec::new();
                    if let Some(head) = self.store.last_position().await? {
                        let to = head.min(next + batch as u64 - 1) + 1;
                        if to > next {
                            let filled = self.fill(next, to, &mut page).await?;
                            tracing::warn!(from = next, events = filled, "the event topic is silent and the log is ahead: read from the log");
                            next = to;
                            if pages.send(Ok(page)).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                    None
                }
            };
            self.acknowledge(&consumer, &mut sent, *processed.borrow())?;
            let Some(first) = first else { continue };
            let mut messages = vec![first];
            while messages.len() < batch {
                match tokio::time::timeout(GATHER, consumer.recv()).await {
                    Ok(received) => messages.push(received.map_err(unavailable)?.detach()),
                    Err(_) => break,
                }
            }
            let mut page: Vec<RecordedEvent> = Vec::with_capacity(messages.len());
            for message in &messages {
                let event = match kafka::decode(message) {
                    Ok(event) => event,
                    Err(error) => {
                        // A message that is not one of ours: the next one shows the gap, which
                        // the log fills.
                        tracing::warn!(%error, offset = message.offset(), "skipping a message of the event topic");
                        continue;
                    }
                };
                if event.position < next {
                    // Acknowledged like the rest once projected, so a restart skips it.
                    sent.push_back((event.position, message.partition(), message.offset()));
                    self.counts.repeated.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if event.position > next {
                    let filled = self.fill(next, event.position, &mut page).await?;
                    tracing::warn!(
                        from = next,
                        events = filled,
                        "filled a gap in the event topic from the log"
                    );
                }
                sent.push_back((event.position, message.partition(), message.offset()));
                next = event.position + 1;
                self.counts.from_topic.fetch_add(1, Ordering::Relaxed);
                page.push(event);
            }
            if page.is_empty() {
                continue;
            }
            if pages.send(Ok(page)).await.is_err() {
                return Ok(());
            }
        }
    }

    /// Reads positions `[from, to)` from the log into `page`.
    async fn fill(
        &self,
        mut from: u64,
        to: u64,
        page: &mut Vec<RecordedEvent>,
    ) -> Result<u64, ProjectionError> {
        let start = from;
        while from < to {
            let limit = usize::try_from(to - from).unwrap_or(usize::MAX).min(5_000);
            let events = self.store.read_all(from, limit).await?;
            let Some(last) = events.last() else {
                return Err(StoreError::Corrupt(format!(
                    "the event topic holds position {to}, the log ends before {from}"
                ))
                .into());
            };
            from = last.position + 1;
            self.counts
                .from_log
                .fetch_add(events.len() as u64, Ordering::Relaxed);
            page.extend(events.into_iter().filter(|e| e.position < to));
        }
        Ok(from - start)
    }

    /// Stores for commit the offsets of the events the read models have committed.
    fn acknowledge(
        &self,
        consumer: &StreamConsumer,
        sent: &mut VecDeque<(u64, i32, i64)>,
        processed: u64,
    ) -> Result<(), ProjectionError> {
        let mut last = None;
        while let Some(&(position, partition, offset)) = sent.front() {
            if position >= processed {
                break;
            }
            last = Some((partition, offset));
            sent.pop_front();
        }
        if let Some((partition, offset)) = last {
            let mut offsets = TopicPartitionList::new();
            offsets
                .add_partition_offset(&self.kafka.topic, partition, Offset::Offset(offset + 1))
                .map_err(unavailable)?;
            if let Err(error) = consumer.store_offsets(&offsets) {
                // After a rebalance the partition may be another member's: it will redeliver,
                // and the projector drops the repeats.
                tracing::debug!(%error, "could not store the consumer's offset");
            }
        }
        Ok(())
    }
}

fn unavailable(error: rdkafka::error::KafkaError) -> ProjectionError {
    StoreError::Unavailable(format!("Kafka: {error}")).into()
}

impl EventFeed for KafkaFeed {
    fn last_position(&self) -> BoxFuture<'_, Result<Option<u64>, ProjectionError>> {
        async move { Ok(self.store.last_position().await?) }.boxed()
    }

    fn read(
        self: Arc<Self>,
        from: u64,
        batch: usize,
        follow: bool,
        processed: watch::Receiver<u64>,
        pages: PageSender,
    ) -> BoxFuture<'static, Result<(), ProjectionError>> {
        async move {
            if !follow {
                // Catching up to what the log holds now is the log's job.
                let mut next = from;
                loop {
                    let page = self.store.read_all(next, batch).await?;
                    let Some(last) = page.last() else {
                        return Ok(());
                    };
                    next = last.position + 1;
                    if pages.send(Ok(page)).await.is_err() {
                        return Ok(());
                    }
                }
            }
            self.follow(from, batch, processed, pages).await
        }
        .boxed()
    }
}
