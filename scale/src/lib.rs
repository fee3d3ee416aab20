//! countersign's scaled mode: many stateless instances on PostgreSQL, Kafka and Redis.
//!
//! - [`relay`]: the outbox relay. Committed events go from the log to a Kafka topic, in
//!   position order, through an idempotent producer. The relay keeps its own checkpoint, and a
//!   PostgreSQL advisory lock lets only one instance relay at a time.
//! - [`feed`]: the read-model projector's events from that topic (a consumer group), with the
//!   same projection code and checkpoints as the embedded mode.
//! - [`bus`]: Redis between instances. The projector announces how far the read models are,
//!   and every other instance wakes the reads waiting for it.
//!
//! The topic's format is documented in `docs/scale-out.md` for integrators; [`kafka`] is its
//! code.

pub mod bus;
pub mod feed;
pub mod kafka;
pub mod relay;

pub use bus::Bus;
pub use feed::KafkaFeed;
pub use kafka::KafkaConfig;
pub use relay::Relay;
