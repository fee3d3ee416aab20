//! The Kafka side: connection settings, the producer's and consumer's configurations, and the
//! message format of the event topic.
//!
//! One message per event, all on partition 0 so the topic keeps the log's order:
//! - key: the stream name (UTF-8);
//! - value: the event's canonical bytes, the CBOR array the audit trail hashes (its leaf is
//!   SHA-256(0x00 ‖ value)), so a consumer can check an event's inclusion proof from the
//!   message alone;
//! - headers `position` (decimal), `type` (the event type) and `server` (the tenant's server
//!   id, absent for events of no tenant);
//! - timestamp: when the event was committed to the log.
//!
//! Delivery is at least once: after a relay restart the events since its last checkpoint are
//! published again. Consumers drop a position they have already seen.

use countersign_eventstore::{RecordedEvent, StoreError};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, Headers as _, Message, OwnedHeaders};

/// Where the broker is and which topic carries the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// `host:port[,host:port…]`.
    pub brokers: String,
    /// The event topic (default `countersign.events`).
    pub topic: String,
}

/// The topic's default name.
pub const DEFAULT_TOPIC: &str = "countersign.events";

/// The only partition events are written to (the log's order is the partition's order).
pub const PARTITION: i32 = 0;

impl KafkaConfig {
    pub fn new(brokers: impl Into<String>, topic: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topic: topic.into(),
        }
    }

    /// The relay's producer: idempotent (`enable.idempotence`, which implies `acks=all` and at
    /// most 5 requests in flight, retried without reordering or duplicating within a producer
    /// session), batching up to 10,000 messages for at most 5 ms. A message that cannot be
    /// delivered within 5 minutes fails, and the relay starts over from its checkpoint.
    pub fn producer_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", "countersign-relay")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", "5")
            .set("retries", "2147483647")
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "200000")
            .set("message.timeout.ms", "300000")
            .set("socket.keepalive.enable", "true");
        config
    }

    /// A projector's consumer in `group`: offsets are stored by the consumer only for events
    /// the read models have committed, then committed by librdkafka every second; it starts
    /// from the beginning of the topic when the group has no offset yet.
    pub fn consumer_config(&self, group: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", "countersign-projector")
            .set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "10")
            .set("session.timeout.ms", "10000")
            .set("socket.keepalive.enable", "true");
        config
    }

    /// An admin client's settings (creating the topic).
    pub fn admin_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        config
    }
}

/// The headers of an event's message.
pub fn headers(event: &RecordedEvent) -> OwnedHeaders {
    let position = event.position.to_string();
    let headers = OwnedHeaders::new_with_capacity(3)
        .insert(Header {
            key: "position",
            value: Some(position.as_bytes()),
        })
        .insert(Header {
            key: "type",
            value: Some(event.event_type.as_bytes()),
        });
    match &event.metadata.server_id {
        Some(server) => headers.insert(Header {
            key: "server",
            value: Some(server.as_bytes()),
        }),
        None => headers,
    }
}

/// The event a message carries. Its `position` header must agree with the value.
pub fn decode<M: Message>(message: &M) -> Result<RecordedEvent, StoreError> {
    let value = message
        .payload()
        .ok_or_else(|| corrupt("a message without a value"))?;
    let event = RecordedEvent::from_canonical_bytes(value)?;
    let header = message
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == "position"))
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse::<u64>().ok());
    if header != Some(event.position) {
        return Err(corrupt("the position header does not match the event"));
    }
    Ok(event)
}

fn corrupt(reason: &str) -> StoreError {
    StoreError::Corrupt(format!("event topic: {reason}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// The relay's delivery guarantee rests on these settings: a change here must be
    /// deliberate.
    #[test]
    fn the_producer_is_idempotent_and_waits_for_every_replica() {
        let config = KafkaConfig::new("127.0.0.1:9092", DEFAULT_TOPIC).producer_config();
        assert_eq!(config.get("enable.idempotence"), Some("true"));
        assert_eq!(config.get("acks"), Some("all"));
        let in_flight: u32 = config
            .get("max.in.flight.requests.per.connection")
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (1..=5).contains(&in_flight),
            "idempotence keeps order only with at most 5 requests in flight"
        );
        assert_eq!(config.get("retries"), Some("2147483647"));
        // The producer librdkafka builds from it accepts the combination.
        let producer: rdkafka::producer::BaseProducer = config.create().unwrap();
        drop(producer);
    }

    #[test]
    fn consumers_store_offsets_only_when_told() {
        let config = KafkaConfig::new("127.0.0.1:9092", DEFAULT_TOPIC).consumer_config("g");
        assert_eq!(config.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(config.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(config.get("group.id"), Some("g"));
    }
}
