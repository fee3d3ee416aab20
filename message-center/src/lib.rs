//! The Message Center (MC): the mailboxes of app instances, a durable push queue, delivery
//! through FCM and APNs, and the pull fallback (`docs/message-center.md`).
//!
//! The MC sees ciphertext only: the NS seals every message for the app instance (HPKE,
//! [`countersign_protocol::push`]) before it submits it; the MC stores, pushes and hands out
//! the envelope without reading it.
//!
//! - [`MessageCenter::router`] serves `GET /v1/mc/key` (the channel key an SDK pins), the
//!   WebSocket `GET /v1/mc/channel` (Noise `IK`, [`countersign_protocol::channel::MC_PROLOGUE`],
//!   then [`countersign_protocol::mc`] requests: register, update push token, pull, ack;
//!   [`connection`] runs the socket, [`session`] answers) and `POST /v1/mc/messages`, the
//!   NS's submit ([`submit`]).
//! - [`MessageCenter::run`] is the delivery worker ([`worker`]): a submitted message is handed
//!   to it at once (the fast path); a recovery scan picks up every message whose push was not
//!   recorded within a lease (a crash anywhere means delivered at least once; the SDK drops
//!   duplicates), retries whose time came, and expiries.
//! - State: the `mc-{mailbox}` event streams ([`events`]: what happened, digests only, never
//!   an envelope, an MC token or a push token) and two tables (`store`: mailboxes with the
//!   push token, outstanding messages with their envelope and push state). Rows are written
//!   before the events that name them.
//! - The Noise static key is in the vault ([`keys`]).
//!
//! Rules enforced here: a hello without a mailbox may only `register` and is rate-limited per
//! address and globally ([`limiter`]); a hello naming a mailbox must come from the static key
//! that registered it (else the one refusal `unknown_mailbox`, whichever is wrong); the MC
//! token is 32 random bytes of which only SHA-256 is kept; a mailbox holds at most
//! [`McLimits::max_outstanding`] messages; an expired message is never pushed nor pulled; a
//! dropped push token means later messages wait for pull until the app gives a new one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use countersign_commands::Clock;
use countersign_eventstore::vault::KeyVault;
use countersign_eventstore::{Database, SharedStore, StoreError};
use tokio::sync::{Notify, mpsc, watch};

pub mod apns;
pub mod connection;
mod credential;
pub mod events;
pub mod fcm;
pub mod keys;
pub mod limiter;
mod metrics;
pub mod push;
pub mod session;
pub mod standin;
mod store;
pub mod submit;
pub mod worker;

#[cfg(test)]
mod tests;

pub use limiter::{AnonymousLimits, Rate};
pub use push::{OutgoingPush, PushSender, SendOutcome};

/// Envelopes larger than [`PUSH_INLINE_LIMIT`] travel as a wake-up push and are pulled; the
/// MC accepts none larger than [`MAX_ENVELOPE_BYTES`].
pub use countersign_protocol::push::{MAX_ENVELOPE_BYTES, PUSH_INLINE_LIMIT};

/// Why the MC failed. All internal (a 500 or an `internal` answer, logged, never shown).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store or the vault failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An MC table failed.
    #[error("mc tables: {0}")]
    Database(#[from] sqlx::Error),
    /// A vault entry is not the key it should be.
    #[error("vault entry {0} is not a valid key")]
    Keys(&'static str),
    /// The OS random generator failed.
    #[error("no randomness from the OS")]
    Random,
    /// An event payload did not encode or decode.
    #[error("mc event: {0}")]
    Decode(String),
}

/// The senders, per platform. A platform without one keeps its messages for pull only.
#[derive(Debug, Clone, Default)]
pub struct Senders {
    /// Firebase Cloud Messaging.
    pub fcm: Option<Arc<dyn PushSender>>,
    /// Apple Push Notification service.
    pub apns: Option<Arc<dyn PushSender>>,
}

impl Senders {
    pub(crate) fn for_platform(&self, platform: push::Platform) -> Option<&Arc<dyn PushSender>> {
        match platform {
            push::Platform::Fcm => self.fcm.as_ref(),
            push::Platform::Apns => self.apns.as_ref(),
        }
    }
}

/// The MC's limits and timings.
#[derive(Debug, Clone)]
pub struct McLimits {
    /// Budget of anonymous channels (hellos without a mailbox).
    pub anonymous: AnonymousLimits,
    /// A mailbox holding this many messages refuses more (429).
    pub max_outstanding: u32,
    /// At most this many pushes in flight at once.
    pub max_in_flight: usize,
    /// A push not recorded within this time after it was handed to a sender is due again.
    pub lease: Duration,
    /// How often the recovery scan looks for due and expired messages.
    pub scan_interval: Duration,
    /// The longest wait between two attempts (the backoff doubles from one second to this).
    pub max_backoff: Duration,
    /// The latest expiry a submit may ask, from now.
    pub max_ttl: Duration,
    /// How long a client has to send the first handshake frame.
    pub handshake_timeout: Duration,
    /// An open channel without a frame from the app for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for McLimits {
    /// 1,000 messages per mailbox, 256 pushes in flight, a 10 s lease, a scan every second,
    /// backoff up to 5 minutes, expiries up to 28 days ahead (FCM's longest TTL), 10 s for the
    /// handshake and 60 s idle.
    fn default() -> Self {
        Self {
            anonymous: AnonymousLimits::default(),
            max_outstanding: 1000,
            max_in_flight: 256,
            lease: Duration::from_secs(10),
            scan_interval: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            max_ttl: Duration::from_secs(28 * 24 * 3600),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// The Message Center: cheap to clone, one per process.
#[derive(Debug, Clone)]
pub struct MessageCenter(pub(crate) Arc<Inner>);

pub(crate) struct Inner {
    pub(crate) store: SharedStore,
    pub(crate) database: Database,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) keys: keys::Keys,
    pub(crate) senders: Senders,
    pub(crate) limits: McLimits,
    pub(crate) limiter: limiter::Limiter,
    pub(crate) metrics: metrics::Metrics,
    /// The fast path: submits hand their message to the worker here.
    pub(crate) jobs: mpsc::Sender<worker::Job>,
    pub(crate) jobs_rx: Mutex<Option<mpsc::Receiver<worker::Job>>>,
    /// Wakes the recovery scan early.
    pub(crate) wake: Notify,
    /// Submits' rows, inserted in batches.
    pub(crate) inserts: mpsc::Sender<submit::Insert>,
    /// How many delivered rows were marked pushed (the batched update's progress).
    pub(crate) marked: watch::Sender<u64>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageCenter")
            .field("limits", &self.limits)
            .field("senders", &self.senders)
            .finish_non_exhaustive()
    }
}

/// `GET /v1/mc/key`: the key an SDK pins.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PublicKey {
    /// The Noise responder static key, SEC1 uncompressed, hex.
    pub channel_public_key: String,
}

/// How many fast-path jobs may wait for the worker; beyond, the recovery scan picks the
/// message up after its lease.
const JOB_QUEUE: usize = 16 * 1024;

impl MessageCenter {
    /// Loads (or, on the first start, creates) the channel key from the vault.
    ///
    /// # Errors
    /// [`Error::Store`] when the vault fails, [`Error::Keys`] when its entry is not a key.
    pub async fn new(
        store: SharedStore,
        vault: KeyVault,
        database: Database,
        clock: Arc<dyn Clock>,
        senders: Senders,
        limits: McLimits,
    ) -> Result<Self, Error> {
        let keys = keys::Keys::load_or_create(&vault).await?;
        let (jobs, jobs_rx) = mpsc::channel(JOB_QUEUE);
        let inserts = submit::spawn_inserter(submit::InserterConfig {
            database: database.clone(),
            capacity: limits.max_outstanding,
            senders: senders.clone(),
            lease: limits.lease,
        });
        Ok(Self(Arc::new(Inner {
            store,
            database,
            clock,
            keys,
            senders,
            limiter: limiter::Limiter::new(limits.anonymous),
            limits,
            metrics: metrics::Metrics::default(),
            jobs,
            jobs_rx: Mutex::new(Some(jobs_rx)),
            wake: Notify::new(),
            inserts,
            marked: watch::channel(0).0,
        })))
    }

    /// The channel key's public half, SEC1 uncompressed (what an SDK pins).
    #[must_use]
    pub fn public_key(&self) -> Vec<u8> {
        self.0.keys.channel_public.clone()
    }

    /// `GET /v1/mc/key`, `GET /v1/mc/channel` and `POST /v1/mc/messages`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/mc/key", get(public_key))
            .route("/v1/mc/channel", get(connection::channel))
            .route("/v1/mc/messages", post(submit::submit))
            .with_state(self.clone())
    }

    /// Registers the MC's metrics.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.0.metrics.register(registry);
    }

    /// Runs the delivery worker until `stop` turns `true` (or its sender is dropped). Only the
    /// first call runs; another returns at once. Sends in flight when it stops are abandoned
    /// (their messages are due again after the lease, in this or another process).
    ///
    /// # Errors
    /// [`Error::Database`] when the queue cannot be read at start.
    pub async fn run(&self, stop: watch::Receiver<bool>) -> Result<(), Error> {
        worker::run(self.clone(), stop).await
    }

    /// Wakes the recovery scan now (it otherwise runs every [`McLimits::scan_interval`]).
    pub fn wake(&self) {
        self.0.wake.notify_one();
    }

    pub(crate) fn now_ms(&self) -> i64 {
        self.0.clock.now().as_millis()
    }
}

async fn public_key(
    axum::extract::State(mc): axum::extract::State<MessageCenter>,
) -> axum::Json<PublicKey> {
    axum::Json(PublicKey {
        channel_public_key: hex::encode(mc.public_key()),
    })
}

/// `N` random bytes from the OS.
pub(crate) fn random<const N: usize>() -> Result<[u8; N], Error> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|_| Error::Random)?;
    Ok(bytes)
}

/// Appends one event to a mailbox's stream (concurrent appends share a transaction).
pub(crate) async fn record(
    mc: &MessageCenter,
    mailbox: &[u8; 16],
    event: &events::McEvent,
) -> Result<(), Error> {
    let new = event.to_new(random()?)?;
    mc.0.store
        .append(
            &events::stream(mailbox),
            countersign_eventstore::ExpectedVersion::Any,
            vec![new],
        )
        .await?;
    Ok(())
}
