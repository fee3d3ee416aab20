//! What long-lived answers (server-sent events: the tenant feed, session and transaction
//! events) may hold, and the one reader of the log they share.
//!
//! Rules:
//! - one task per process reads the log after each commit it hears of (and every
//!   [`POLL`], for writers it cannot hear) and fans each batch out to every open stream; no
//!   stream queries the database per commit. A stream that starts behind, or falls behind
//!   the fan-out, reads its backlog in pages, at most [`CATCH_UP_READERS`] at a time in the
//!   process: however many streams are open, they hold at most that many database
//!   connections, and writes keep theirs;
//! - a stream counts against its API key, its virtual server and the process
//!   ([`StreamLimits`]); past a cap it is refused `429` problem+json before it starts;
//! - a stream ends after [`StreamLimits::lifetime`] (clients resume with `Last-Event-ID`);
//! - the key that opened a stream is checked again before each batch it sends and every
//!   [`RECHECK`]; a revoked key or a deleted server ends it (at once when revoked through
//!   this instance, within [`RECHECK`] through another).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use countersign_domain::{ApiKeyId, ServerId};
use countersign_eventstore::{RecordedEvent, SharedStore};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, watch};

use crate::auth::{Tenant, still_valid};
use crate::error::ApiError;
use crate::metrics::{ReaderLabels, StreamMetrics};
use crate::state::AppState;

/// How often the shared reader looks at the log when it heard of no commit.
pub const POLL: Duration = Duration::from_secs(1);
/// Streams reading their backlog from the database at once, in the whole process.
pub const CATCH_UP_READERS: usize = 4;
/// How often an idle stream checks that its key is still valid.
pub const RECHECK: Duration = Duration::from_secs(2);
/// Batches the fan-out keeps for a slow stream before that stream must read the backlog.
const FAN_OUT_DEPTH: usize = 256;
/// Events the shared reader reads at once.
const READ_BATCH: usize = 1_000;

/// Caps on streams.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Streams one API key may hold.
    pub per_key: usize,
    /// Streams one virtual server's keys may hold together.
    pub per_server: usize,
    /// Streams the process holds.
    pub total: usize,
    /// Longest a stream lives.
    pub lifetime: Duration,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            per_key: 500,
            per_server: 1_000,
            total: 5_000,
            lifetime: Duration::from_secs(3_600),
        }
    }
}

/// One event as streams get it: the stored event, and its JSON for the tenant feed, made
/// once for all the streams that show it (not once per stream).
#[derive(Debug)]
pub(crate) struct Shared {
    pub event: RecordedEvent,
    json: OnceLock<Option<Arc<str>>>,
}

impl Shared {
    fn new(event: RecordedEvent) -> Self {
        Self {
            event,
            json: OnceLock::new(),
        }
    }

    /// The feed's JSON of the event (`None`: it cannot be shown, which was logged).
    pub(crate) fn json(&self) -> Option<Arc<str>> {
        self.json
            .get_or_init(|| crate::feed::render(&self.event))
            .clone()
    }
}

/// A batch of consecutive events of the log, as the shared reader read it.
pub(crate) type Batch = Arc<Vec<Shared>>;

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_key: HashMap<ApiKeyId, usize>,
    by_server: HashMap<ServerId, usize>,
}

/// The process's streams: their counts, the fan-out and its reader.
#[derive(Debug)]
pub(crate) struct Streams {
    limits: StreamLimits,
    counts: Mutex<Counts>,
    fan_out: broadcast::Sender<Batch>,
    /// Whether the shared reader runs (it stops when no stream listens).
    reading: Mutex<bool>,
    catch_up: Arc<Semaphore>,
    /// Bumped whenever this instance revokes a key or deletes a server.
    revoked: watch::Sender<u64>,
    /// Held while a stream checks its key against the read model.
    checking: tokio::sync::Mutex<()>,
    /// Hashes of keys found revoked (or of a deleted server) by a stream's check.
    invalid: Mutex<std::collections::HashSet<[u8; 32]>>,
    metrics: StreamMetrics,
}

/// A stream's place under the caps; given back when the stream ends.
#[derive(Debug)]
pub(crate) struct Lease {
    streams: Arc<Streams>,
    key: ApiKeyId,
    server: ServerId,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.streams.counts.lock() {
            counts.total = counts.total.saturating_sub(1);
            self.streams.metrics.open.dec();
            decrement(&mut counts.by_key, self.key);
            decrement(&mut counts.by_server, self.server);
        }
    }
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: K) {
    if let Some(n) = map.get_mut(&key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(&key);
        }
    }
}

impl Streams {
    pub(crate) fn new(limits: StreamLimits, metrics: StreamMetrics) -> Arc<Self> {
        Arc::new(Self {
            limits,
            counts: Mutex::new(Counts::default()),
            fan_out: broadcast::channel(FAN_OUT_DEPTH).0,
            reading: Mutex::new(false),
            catch_up: Arc::new(Semaphore::new(CATCH_UP_READERS)),
            revoked: watch::channel(0).0,
            checking: tokio::sync::Mutex::new(()),
            invalid: Mutex::default(),
            metrics,
        })
    }

    pub(crate) fn limits(&self) -> &StreamLimits {
        &self.limits
    }

    /// A place for one more stream of `key` at `server`, or `TooManyStreams`.
    pub(crate) fn lease(
        self: &Arc<Self>,
        key: ApiKeyId,
        server: ServerId,
    ) -> Result<Lease, ApiError> {
        let mut counts = self
            .counts
            .lock()
            .map_err(|_| ApiError::Internal("stream counts poisoned".into()))?;
        let of_key = counts.by_key.get(&key).copied().unwrap_or(0);
        let of_server = counts.by_server.get(&server).copied().unwrap_or(0);
        let refusal = if counts.total >= self.limits.total {
            Some("this instance holds as many event streams as it may")
        } else if of_key >= self.limits.per_key {
            Some("this API key holds as many event streams as it may")
        } else if of_server >= self.limits.per_server {
            Some("this server's API keys hold as many event streams as they may")
        } else {
            None
        };
        if let Some(reason) = refusal {
            return Err(ApiError::TooManyStreams(reason.into()));
        }
        counts.total += 1;
        self.metrics.open.inc();
        counts.by_key.insert(key, of_key + 1);
        counts.by_server.insert(server, of_server + 1);
        Ok(Lease {
            streams: self.clone(),
            key,
            server,
        })
    }

    /// The fan-out of the log's batches from now on; starts the shared reader if it is not
    /// running. Batches before this call are the caller's to read ([`Streams::catch_up`]).
    pub(crate) fn subscribe(
        self: &Arc<Self>,
        store: &SharedStore,
        woken: watch::Receiver<u64>,
    ) -> broadcast::Receiver<Batch> {
        let receiver = self.fan_out.subscribe();
        if let Ok(mut reading) = self.reading.lock()
            && !*reading
        {
            *reading = true;
            tokio::spawn(read_log(self.clone(), store.clone(), woken));
        }
        receiver
    }

    /// Up to `limit` events from `from` on, read from the database under the process-wide
    /// cap on backlog readers.
    pub(crate) async fn catch_up(
        &self,
        store: &SharedStore,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Shared>, ApiError> {
        let _permit: OwnedSemaphorePermit = self
            .catch_up
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::Internal("stream readers closed".into()))?;
        self.metrics
            .log_reads
            .get_or_create(&ReaderLabels { reader: "catch_up" })
            .inc();
        let events = store.read_all(from, limit).await?;
        Ok(events.into_iter().map(Shared::new).collect())
    }

    /// Changes whenever this instance revokes a key or deletes a server.
    pub(crate) fn revocations(&self) -> watch::Receiver<u64> {
        self.revoked.subscribe()
    }

    /// One key check at a time (see [`crate::auth::still_valid`]).
    pub(crate) async fn checking(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.checking.lock().await
    }

    /// Whether a stream's check already found this key invalid.
    pub(crate) fn known_invalid(&self, hash: &[u8; 32]) -> bool {
        self.invalid.lock().is_ok_and(|known| known.contains(hash))
    }

    /// Remembers that this key is invalid for good (bounded: past 10,000 it starts again).
    pub(crate) fn invalid(&self, hash: [u8; 32]) {
        if let Ok(mut known) = self.invalid.lock() {
            if known.len() >= 10_000 {
                known.clear();
            }
            known.insert(hash);
        }
    }

    pub(crate) fn revoked(&self) {
        self.revoked.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// The shared reader: follows the log from its head at start and sends every batch to the
/// fan-out, until no stream listens. Woken by this process's commits, by the read models'
/// progress (commits of other instances) and every [`POLL`].
async fn read_log(streams: Arc<Streams>, store: SharedStore, mut woken: watch::Receiver<u64>) {
    let mut head = store.head();
    let mut next = loop {
        match store.last_position().await {
            Ok(last) => break last.map_or(0, |p| p + 1),
            Err(error) => {
                tracing::warn!(%error, "event streams: cannot read the log's head");
                tokio::time::sleep(POLL).await;
            }
        }
    };
    loop {
        if let Ok(mut reading) = streams.reading.lock()
            && streams.fan_out.receiver_count() == 0
        {
            *reading = false;
            return;
        }
        head.borrow_and_update();
        woken.borrow_and_update();
        loop {
            streams
                .metrics
                .log_reads
                .get_or_create(&ReaderLabels { reader: "shared" })
                .inc();
            match store.read_all(next, READ_BATCH).await {
                Ok(batch) => {
                    let Some(last) = batch.last().map(|e| e.position) else {
                        break;
                    };
                    next = last + 1;
                    let full = batch.len() == READ_BATCH;
                    // No receiver left is not an error: the check above ends the task.
                    let batch = batch.into_iter().map(Shared::new).collect();
                    let _ = streams.fan_out.send(Arc::new(batch));
                    if !full {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "event streams: reading the log failed");
                    break;
                }
            }
        }
        tokio::select! {
            Ok(()) = head.changed() => {}
            Ok(()) = woken.changed() => {}
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

/// What a stream hears next from the fan-out.
#[derive(Debug)]
pub(crate) enum Heard {
    /// The next batch of the log (it may start past what the stream has seen).
    Batch(Batch),
    /// Batches were missed: the stream reads what it needs from the log or the read model.
    Lagged,
}

/// One open stream's side of the fan-out, with what ends it: its lifetime, its key's
/// revocation or its server's deletion. Holds the stream's place under the caps.
#[derive(Debug)]
pub(crate) struct Listener {
    tenant: Tenant,
    fan_out: broadcast::Receiver<Batch>,
    revocations: watch::Receiver<u64>,
    ends: tokio::time::Instant,
    _lease: Lease,
}

impl Listener {
    /// A place under the caps for a stream of `tenant`'s key, listening from now on; or
    /// `TooManyStreams`.
    pub(crate) fn open(state: &AppState, tenant: Tenant) -> Result<Self, ApiError> {
        let streams = state.streams();
        let lease = streams.lease(tenant.key_id, tenant.server)?;
        Ok(Self {
            fan_out: streams.subscribe(state.store(), state.reads().processed()),
            revocations: streams.revocations(),
            ends: tokio::time::Instant::now() + streams.limits().lifetime,
            tenant,
            _lease: lease,
        })
    }

    /// Whether the stream may go on: within its lifetime, its key still valid.
    pub(crate) async fn may_go_on(&self, state: &AppState) -> bool {
        tokio::time::Instant::now() < self.ends && still_valid(state, &self.tenant).await
    }

    /// The next batch (after checking the key again), or `None` once the stream must end.
    /// Between batches the key is checked at every revocation through this instance and
    /// every [`RECHECK`].
    pub(crate) async fn next(&mut self, state: &AppState) -> Option<Heard> {
        loop {
            tokio::select! {
                batch = self.fan_out.recv() => {
                    return match batch {
                        Ok(batch) => still_valid(state, &self.tenant).await.then_some(Heard::Batch(batch)),
                        Err(RecvError::Lagged(_)) => Some(Heard::Lagged),
                        Err(RecvError::Closed) => None,
                    };
                }
                () = tokio::time::sleep_until(self.ends) => return None,
                changed = self.revocations.changed() => {
                    if changed.is_err() || !still_valid(state, &self.tenant).await {
                        return None;
                    }
                }
                () = tokio::time::sleep(RECHECK) => {
                    if !still_valid(state, &self.tenant).await {
                        return None;
                    }
                }
            }
        }
    }
}
