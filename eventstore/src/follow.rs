//! What a follower of the log that hands work to others needs (the push dispatcher, the IdP's
//! back-channel sender): which positions it is done with, so that its checkpoint moves only
//! past events whose work is all finished and a crash repeats, never loses, a delivery.
//!
//! Rules: an event's work items are counted when it is read ([`Progress::expect`]) and
//! counted down as each finishes, in any order; [`Progress::done_before`] is the first
//! position with work still out, else the next position to read. A finish for a position
//! with nothing out changes nothing.

use std::collections::BTreeMap;

/// Positions read and work still outstanding per position.
#[derive(Debug)]
pub struct Progress {
    /// Work items not yet finished, per event position (positions with none are absent).
    outstanding: BTreeMap<u64, usize>,
    /// The next position to read: every event before it was worked out.
    read_to: u64,
}

impl Progress {
    /// A follower starting at `from` (its checkpoint).
    #[must_use]
    pub fn new(from: u64) -> Self {
        Self {
            outstanding: BTreeMap::new(),
            read_to: from,
        }
    }

    /// The event at `position` calls for `items` pieces of work.
    pub fn expect(&mut self, position: u64, items: usize) {
        if items > 0 {
            *self.outstanding.entry(position).or_default() += items;
        }
    }

    /// Every event before `next` was read.
    pub fn read_to(&mut self, next: u64) {
        self.read_to = self.read_to.max(next);
    }

    /// One piece of work of the event at `position` is finished.
    pub fn finished(&mut self, position: u64) {
        if let Some(left) = self.outstanding.get_mut(&position) {
            *left = left.saturating_sub(1);
            if *left == 0 {
                self.outstanding.remove(&position);
            }
        }
    }

    /// The first position not done with: the first with work in flight, else the next to
    /// read. The checkpoint may move here.
    #[must_use]
    pub fn done_before(&self) -> u64 {
        self.outstanding
            .keys()
            .next()
            .map_or(self.read_to, |first| (*first).min(self.read_to))
    }
}

/// Locks a follower's shared tracker; a panicked holder left it consistent (every update is
/// one assignment), so its state is taken as it is.
pub fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Aborts the task when dropped (a follower's worker ends with its round).
#[derive(Debug)]
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `{prefix}{server hex}-{id hex}` → the two hex parts (the stream names of scoped aggregates:
/// `session-…`, `grant-…`, `account-…`).
#[must_use]
pub fn scoped<'a>(stream: &'a str, prefix: &str) -> Option<(&'a str, &'a str)> {
    stream.strip_prefix(prefix)?.split_once('-')
}

#[cfg(test)]
mod tests {
    use super::{Progress, scoped};

    #[test]
    fn the_checkpoint_waits_for_the_first_unfinished_event() {
        let mut progress = Progress::new(10);
        assert_eq!(progress.done_before(), 10);
        progress.expect(10, 0);
        progress.expect(11, 2);
        progress.expect(12, 1);
        progress.read_to(13);
        assert_eq!(progress.done_before(), 11, "event 11 has work in flight");
        progress.finished(12);
        assert_eq!(
            progress.done_before(),
            11,
            "a later event finishing moves nothing"
        );
        progress.finished(11);
        assert_eq!(progress.done_before(), 11, "one of 11's two is still out");
        progress.finished(11);
        assert_eq!(progress.done_before(), 13, "all read and finished");
        progress.finished(11);
        assert_eq!(
            progress.done_before(),
            13,
            "an extra finish changes nothing"
        );
    }

    #[test]
    fn streams_split_into_server_and_id() {
        assert_eq!(scoped("grant-aa-bb", "grant-"), Some(("aa", "bb")));
        assert_eq!(scoped("session-aa-bb", "grant-"), None);
    }
}
