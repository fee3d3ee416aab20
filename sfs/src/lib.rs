//! The second-factor server (SFS): checks an app instance's PIN (OPAQUE, so the PIN never
//! reaches it) or biometric key, and signs short-lived attestations the app hands to the
//! countersign server (`docs/second-factor.md`).
//!
//! - [`Sfs::router`] serves `GET /v1/sfs/key` (the pinned public keys) and the WebSocket
//!   `GET /v1/sfs/channel`: Noise `IK` with the SFS prologue, then [`countersign_protocol::sfs`]
//!   requests ([`connection`] runs the socket, [`session`] answers the requests).
//! - State lives in three places: the `sf-{app instance}` event stream (key binding, the
//!   record's digest, the biometric key, failures, locks, revocation: the
//!   [`SecondFactor`](countersign_domain::second_factor::SecondFactor) aggregate, written
//!   through `countersign_commands`), the `sfs_opaque_records` table ([`records`]: the OPAQUE
//!   registration records, keyed by digest so a crash between record and event is harmless)
//!   and the key vault ([`keys`]).
//! - Nothing is written for an app instance until its first PIN registration, which needs an
//!   enrolment a countersign server authorised ([`admission::Enrolments`]); anonymous work
//!   (hellos and requests of app instances with no PIN) is rate-limited ([`admission`]).
//! - Per connection, in memory only: the pending OPAQUE login, the biometric nonce, and
//!   whether the channel proved the PIN.
//!
//! Rules this crate enforces at the edge (the aggregate enforces the rest): a `login_start`
//! is counted before any OPAQUE work is answered; an attestation is signed only after a
//! verification, for the challenge and account key the app asked, for at most 60 s; the PIN
//! and OPAQUE secrets never reach a log line, an event, an error or a response (there is no
//! PIN here to leak, and the OPAQUE state types print nothing).

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{State, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use countersign_commands::{Clock, CommandError};
use countersign_domain::second_factor::LockoutPolicy;
use countersign_eventstore::vault::KeyVault;
use countersign_eventstore::{Database, SharedStore, StoreError};
use p256::ecdsa::VerifyingKey;
use serde::Serialize;

pub mod admission;
pub mod connection;
pub mod keys;
pub mod opaque;
mod records;
pub mod session;

pub mod bench;
#[cfg(test)]
mod tests;

pub use admission::{AnonymousLimits, EnrolmentError, Enrolments, NoEnrolments, Rate};
pub use keys::attestation_public_key;

/// How long a client has to send the first handshake frame.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest an open channel may go without a frame from the app before it is closed (the SDK
/// opens a new one when it needs it again).
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Why the SFS failed. All of these are internal (500, logged, never shown to the app: a
/// request answers `internal`); refusals are [`countersign_protocol::sfs::SfsError`]s.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store or the vault failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A command failed for a reason other than a rule.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The `sfs_records` table failed.
    #[error("sfs_records: {0}")]
    Records(#[from] sqlx::Error),
    /// A vault entry is not the key it should be.
    #[error("vault entry {0} is not a valid key")]
    Keys(&'static str),
    /// The OS random generator failed.
    #[error("no randomness from the OS")]
    Random,
    /// The record the stream registered is not stored (lost, or changed outside the SFS).
    #[error("the OPAQUE record the stream registered is not stored")]
    RecordMismatch,
    /// The NS could not say whether it enrolled the app instance.
    #[error(transparent)]
    Enrolments(#[from] EnrolmentError),
}

/// The second-factor server: cheap to clone, one per process.
#[derive(Debug, Clone)]
pub struct Sfs(Arc<Inner>);

pub(crate) struct Inner {
    pub(crate) store: SharedStore,
    pub(crate) database: Database,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) policy: LockoutPolicy,
    pub(crate) keys: keys::Keys,
    pub(crate) handshake_timeout: std::time::Duration,
    pub(crate) idle_timeout: std::time::Duration,
    pub(crate) enrolments: Arc<dyn Enrolments>,
    pub(crate) limiter: admission::Limiter,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sfs")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// `GET /v1/sfs/key`: the keys an app pins, SEC1 uncompressed, hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PublicKeys {
    /// The Noise responder static key.
    pub channel_public_key: String,
    /// The key attestations are signed with.
    pub attestation_public_key: String,
}

impl Sfs {
    /// Loads (or, on the first start, creates) the SFS keys from the vault. `enrolments`
    /// says which app instances a countersign server enrolled: only those may register a
    /// first PIN. Anonymous work is limited by [`AnonymousLimits::default`].
    ///
    /// # Errors
    /// [`Error::Store`] when the vault fails, [`Error::Keys`] when an entry is not a key.
    pub async fn new(
        store: SharedStore,
        vault: KeyVault,
        database: Database,
        clock: Arc<dyn Clock>,
        policy: LockoutPolicy,
        enrolments: Arc<dyn Enrolments>,
    ) -> Result<Self, Error> {
        Self::with_limits(
            store,
            vault,
            database,
            clock,
            policy,
            enrolments,
            AnonymousLimits::default(),
        )
        .await
    }

    /// As [`Sfs::new`], with another budget for anonymous work.
    ///
    /// # Errors
    /// As [`Sfs::new`].
    pub async fn with_limits(
        store: SharedStore,
        vault: KeyVault,
        database: Database,
        clock: Arc<dyn Clock>,
        policy: LockoutPolicy,
        enrolments: Arc<dyn Enrolments>,
        limits: AnonymousLimits,
    ) -> Result<Self, Error> {
        let keys = keys::Keys::load_or_create(&vault).await?;
        Ok(Self(Arc::new(Inner {
            store,
            database,
            clock,
            policy,
            keys,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            enrolments,
            limiter: admission::Limiter::new(limits),
        })))
    }

    /// With another idle timeout for open channels ([`IDLE_TIMEOUT`] by default). Call before
    /// sharing the SFS; on a shared one it changes nothing.
    #[must_use]
    pub fn with_idle_timeout(mut self, idle: std::time::Duration) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.0) {
            inner.idle_timeout = idle;
        }
        self
    }

    /// The attestation key's public half: what a countersign server trusts.
    #[must_use]
    pub fn attestation_verifying_key(&self) -> VerifyingKey {
        *self.0.keys.attestation.verifying_key()
    }

    /// The keys `GET /v1/sfs/key` answers.
    #[must_use]
    pub fn public_keys(&self) -> PublicKeys {
        PublicKeys {
            channel_public_key: hex::encode(&self.0.keys.channel_public),
            attestation_public_key: hex::encode(
                self.attestation_verifying_key()
                    .to_sec1_point(false)
                    .as_bytes(),
            ),
        }
    }

    /// The lockout policy in force.
    #[must_use]
    pub fn policy(&self) -> &LockoutPolicy {
        &self.0.policy
    }

    /// `GET /v1/sfs/key` and `GET /v1/sfs/channel`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/sfs/key", get(public_keys))
            .route("/v1/sfs/channel", get(channel))
            .with_state(self.clone())
    }
}

async fn public_keys(State(sfs): State<Sfs>) -> Json<PublicKeys> {
    Json(sfs.public_keys())
}

async fn channel(
    State(sfs): State<Sfs>,
    extensions: axum::http::Extensions,
    upgrade: WebSocketUpgrade,
) -> Response {
    // The client's address, when the listener recorded it: anonymous work is limited per
    // address.
    let peer = extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip());
    // Small buffers, as the device gateway's: a channel sits idle between a few small
    // messages. Frames larger than a Noise message are refused at the WebSocket layer.
    upgrade
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_frame_size(countersign_protocol::channel::MAX_FRAME)
        .max_message_size(countersign_protocol::channel::MAX_FRAME)
        .on_upgrade(move |socket| connection::serve_socket(sfs, peer, socket))
        .into_response()
}
