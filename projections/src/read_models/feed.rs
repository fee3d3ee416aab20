//! Where the projector's events come from: the log itself (embedded mode, catch-up, replay)
//! or, in scaled mode, a stream the outbox relay fills (Kafka). The projection code and its
//! checkpoints are the same over both; a feed only has to deliver the log in position order.

use std::sync::Arc;

use countersign_eventstore::RecordedEvent;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};

use super::ProjectionError;

/// Where a feed sends its pages of events.
pub type PageSender = mpsc::Sender<Result<Vec<RecordedEvent>, ProjectionError>>;

/// A source of the log's events for the read-model projector.
pub trait EventFeed: Send + Sync + std::fmt::Debug + 'static {
    /// The log's last committed position (`None`: empty), for progress reports.
    fn last_position(&self) -> BoxFuture<'_, Result<Option<u64>, ProjectionError>>;

    /// Sends pages of at most `batch` events, in position order, from position `from` on,
    /// until `pages` is closed or, unless `follow`, until it has sent what the log holds now.
    ///
    /// A feed may repeat events from before `from` or send one twice (at-least-once delivery):
    /// the projector drops them. It must never skip one: a gap stops the projector.
    /// `processed` publishes the position below which every projection has committed, for a
    /// feed that acknowledges what it delivered (a consumer group's offsets).
    fn read(
        self: Arc<Self>,
        from: u64,
        batch: usize,
        follow: bool,
        processed: watch::Receiver<u64>,
        pages: PageSender,
    ) -> BoxFuture<'static, Result<(), ProjectionError>>;
}
