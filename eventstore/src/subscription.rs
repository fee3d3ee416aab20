//! Catch-up subscriptions to `$all`: history first, then live events, in position order,
//! each exactly once.
//!
//! A subscription reads pages after the last position it delivered; when a read comes back
//! empty it waits until the store's head moves. Because positions are gapless and become
//! visible in order, "read after my last position" can never skip an event. The head is
//! marked seen *before* each read, so a commit that lands between the read and the wait
//! still wakes the subscriber. A periodic re-read covers writers this process cannot hear
//! (another process on the same SQLite file, a lost PostgreSQL notification).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::watch;

use crate::{RecordedEvent, SharedStore, StoreError};

const PAGE: usize = 1_000;
const FALLBACK_READ: Duration = Duration::from_millis(500);

/// A catch-up subscription; see the module docs.
#[derive(Debug)]
pub struct Subscription {
    store: SharedStore,
    next_position: u64,
    buffer: VecDeque<RecordedEvent>,
    head: watch::Receiver<Option<u64>>,
}

impl Subscription {
    /// Subscribes to `$all` from `from` (0 for the whole history).
    pub fn new(store: SharedStore, from: u64) -> Self {
        let head = store.head();
        Self {
            store,
            next_position: from,
            buffer: VecDeque::new(),
            head,
        }
    }

    /// The position the next delivered event will have.
    pub fn next_position(&self) -> u64 {
        self.next_position
    }

    /// The next event, waiting for one to be committed if the subscriber is caught up.
    pub async fn next(&mut self) -> Result<RecordedEvent, StoreError> {
        loop {
            if let Some(event) = self.buffer.pop_front() {
                if event.position != self.next_position {
                    // Only a damaged database can get here: never skip silently.
                    return Err(StoreError::Corrupt(format!(
                        "gap in the event log: expected position {}, read {}",
                        self.next_position, event.position
                    )));
                }
                self.next_position = event.position + 1;
                return Ok(event);
            }
            self.head.borrow_and_update();
            let page = self.store.read_all(self.next_position, PAGE).await?;
            if !page.is_empty() {
                self.buffer.extend(page);
                continue;
            }
            tokio::select! {
                changed = self.head.changed() => {
                    if changed.is_err() {
                        return Err(StoreError::Unavailable("the store was closed".into()));
                    }
                }
                () = tokio::time::sleep(FALLBACK_READ) => {}
            }
        }
    }
}
