//! Group commit: one task per store owns the write path.
//!
//! Appends from any number of tasks queue on a channel; the writer takes everything that is
//! waiting (up to a bound), decides it with [`crate::plan::plan_batch`] inside one
//! transaction and commits once, so concurrent single-event appends share one transaction
//! and one fsync. An append is answered only after its transaction committed (invariant 1);
//! if the transaction fails, every append in it gets the error and none of it is stored.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, watch};

use crate::plan::PendingAppend;
use crate::{AppendResult, StoreError};

/// Upper bounds for one group-commit transaction.
const MAX_APPENDS_PER_BATCH: usize = 1_024;
const MAX_EVENTS_PER_BATCH: usize = 20_000;

pub(crate) type Reply = oneshot::Sender<Result<AppendResult, StoreError>>;

/// A backend's transaction: decide and write one batch.
#[async_trait]
pub(crate) trait BatchWriter: Send + 'static {
    /// Writes the batch in one transaction and returns each append's outcome plus the head
    /// after commit. An `Err` means nothing of the batch was committed.
    async fn write_batch(
        &mut self,
        batch: &[PendingAppend],
    ) -> Result<(Vec<Result<AppendResult, StoreError>>, Option<u64>), StoreError>;
}

/// Counters of the write path since the store was opened in this process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct WriteStats {
    /// Transactions committed by the writer.
    pub transactions: u64,
    /// Appends answered from those transactions (written or recognised as retries).
    pub appends: u64,
    /// Events written.
    pub events: u64,
}

#[derive(Debug, Default)]
struct Counters {
    transactions: AtomicU64,
    appends: AtomicU64,
    events: AtomicU64,
}

/// The handle appenders use.
#[derive(Debug, Clone)]
pub(crate) struct WriterHandle {
    queue: mpsc::Sender<(PendingAppend, Reply)>,
    counters: Arc<Counters>,
}

impl WriterHandle {
    /// Starts the writer task. `head` is published after every commit.
    pub(crate) fn spawn<W: BatchWriter>(writer: W, head: watch::Sender<Option<u64>>) -> Self {
        let (queue, rx) = mpsc::channel(8_192);
        let counters = Arc::new(Counters::default());
        tokio::spawn(run(writer, rx, head, counters.clone()));
        Self { queue, counters }
    }

    pub(crate) fn stats(&self) -> WriteStats {
        WriteStats {
            transactions: self.counters.transactions.load(Ordering::Relaxed),
            appends: self.counters.appends.load(Ordering::Relaxed),
            events: self.counters.events.load(Ordering::Relaxed),
        }
    }

    pub(crate) async fn append(&self, append: PendingAppend) -> Result<AppendResult, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((append, reply))
            .await
            .map_err(|_| StoreError::Unavailable("writer stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("writer stopped before answering".into()))?
    }
}

async fn run<W: BatchWriter>(
    mut writer: W,
    mut rx: mpsc::Receiver<(PendingAppend, Reply)>,
    head: watch::Sender<Option<u64>>,
    counters: Arc<Counters>,
) {
    let mut batch = Vec::new();
    let mut replies = Vec::new();
    while let Some((first, reply)) = rx.recv().await {
        let mut events = first.events.len();
        batch.push(first);
        replies.push(reply);
        while batch.len() < MAX_APPENDS_PER_BATCH && events < MAX_EVENTS_PER_BATCH {
            match rx.try_recv() {
                Ok((append, reply)) => {
                    events += append.events.len();
                    batch.push(append);
                    replies.push(reply);
                }
                Err(_) => break,
            }
        }
        match writer.write_batch(&batch).await {
            Ok((outcomes, new_head)) => {
                let written: u64 = outcomes
                    .iter()
                    .filter_map(|o| o.as_ref().ok())
                    .map(|r| r.last_position - r.first_position + 1)
                    .sum();
                counters.transactions.fetch_add(1, Ordering::Relaxed);
                counters
                    .appends
                    .fetch_add(outcomes.len() as u64, Ordering::Relaxed);
                counters.events.fetch_add(written, Ordering::Relaxed);
                head.send_if_modified(|h| {
                    let changed = new_head > *h;
                    if changed {
                        *h = new_head;
                    }
                    changed
                });
                for (reply, outcome) in replies.drain(..).zip(outcomes) {
                    // The appender may have given up waiting; its events are committed anyway.
                    let _ = reply.send(outcome);
                }
            }
            Err(error) => {
                tracing::error!(%error, appends = batch.len(), "group commit failed");
                let message = error.to_string();
                for reply in replies.drain(..) {
                    let _ = reply.send(Err(StoreError::Unavailable(format!(
                        "group commit failed ({message}); retry with the same event ids, appends are idempotent"
                    ))));
                }
            }
        }
        batch.clear();
    }
}
