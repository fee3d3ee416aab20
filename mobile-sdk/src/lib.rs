//! The countersign mobile SDK: what an app links to log its user in with a QR code or a
//! link, and to enrol accounts.
//!
//! - [`sdk`]: [`Sdk`], the entry point: local state, accounts, servers, history, sessions,
//!   refresh, delete, listen.
//! - [`session`]: [`SessionHandle`] and the driver of one login or enrolment.
//! - `session::app_login` (`app_login.rs`): the AppLogin — [`Sdk::app_login`], the web nonce
//!   ([`WebNonce`]), the inactivity timeout, [`SessionHandle::touch`].
//! - [`data`]: the secure channel — [`Sdk::send_data`] to the server's Data Service,
//!   headless enrolment on first use, [`Sdk::set_device_data`].
//! - `transaction` (private): listing, showing, approving, declining transactions, and the
//!   app's own signed transactions (behind [`Sdk`]'s transaction methods).
//! - [`machine`]: the session state machine (seed 004), pure.
//! - [`client`] (private): HTTP key fetch, WebSocket, Noise handshake, request multiplexing.
//! - [`second_factor`]: the PIN and biometric factor: SFS configuration, [`Pin`], the
//!   biometric prompt hook, and the flows that turn a factor into an SFS attestation.
//! - `sfs_client` (private): the SFS channel (Noise IK with the SFS prologue).
//! - [`push`]: the Message Center ([`McConfig`]), push registration, and the push messages
//!   (`process_push`, `pull_messages` behind [`Sdk`]).
//! - `mc_client` (private): the MC channel (Noise IK with the MC prologue).
//! - `opaque` (private): the OPAQUE client (ristretto255, TripleDH, Argon2id).
//! - [`storage`]: where the state blob lives ([`EncryptedFileStorage`], [`MemoryStorage`]).
//! - [`persisted`] (private): the state inside the blob.
//! - [`callbacks`]: how the app hears what happens.
//! - [`model`]: the values the app sees.
//! - [`error`]: the one error type, [`SdkError`].
//!
//! The only workspace crate this depends on is `countersign-protocol`: the SDK speaks the
//! device protocol (docs/device-protocol.md), the SFS protocol (docs/second-factor.md) and
//! the Message Center's channel and push format (docs/message-center.md), and knows nothing
//! of the servers' insides.

pub mod callbacks;
mod client;
pub mod data;
pub mod error;
pub mod machine;
mod mc_client;
pub mod model;
mod noise_link;
mod opaque;
mod persisted;
pub mod push;
mod random;
pub mod sdk;
pub mod second_factor;
pub mod session;
mod sfs_client;
pub mod storage;
mod transaction;

pub use callbacks::{Callbacks, ChannelCallbacks, Event, NoCallbacks};
pub use data::{DataAnswer, DataServer};
pub use error::{PushRefusal, SdkError};
pub use machine::{HistoryStatus, Interaction, SecondFactorEvent, SessionKind, State};
pub use model::{
    AccountInfo, HistoryEntry, PendingTransaction, SecondFactor, ServerInfo, SessionSnapshot,
    TransactionDetails, TransactionReceipt, TransactionTarget,
};
pub use push::{McConfig, Platform, PullReport, PushAction, PushRegistration};
pub use sdk::{DeviceClock, ListenEnd, Listener, RefreshReport, Sdk, SdkConfig};
pub use second_factor::{
    Argon2Params, BiometricPrompt, Pin, SecondFactorStatus, SfsConfig, SimulatedBiometric,
};
pub use session::app_login::WebNonce;
pub use session::{SessionHandle, decode_input};
pub use storage::{EncryptedFileStorage, MemoryStorage, Storage, StorageError};
