//! The SDK's one error type, [`SdkError`].
//!
//! Rules: a message never contains a key, a token, an hsid or a PIN (ids of accounts and
//! servers are not secret and may appear in logs, not here); variants keep apart the app's
//! mistake (a bad QR code, an unknown account, a call in the wrong state), what the server
//! decided (a refusal, a request error) and a failure of the machine or the network. The
//! type is `Clone` so a session snapshot can carry the reason it failed.

use countersign_protocol::device::{DeviceError, Refusal};
use countersign_protocol::mc::{McError, McRefusal};
use countersign_protocol::qr::QrError;
use countersign_protocol::sfs::{SfsError, SfsRefusal};

use crate::machine::{SecondFactorEvent, State, TransitionError};
use crate::storage::StorageError;

/// Everything that can go wrong in the SDK.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SdkError {
    /// The app's mistake: the input is not a countersign QR code or link.
    #[error("not a countersign QR code or link: {0}")]
    InvalidInput(#[from] QrError),
    /// A login QR code for a server this app holds no account at.
    #[error("no account for this server")]
    NoAccounts,
    /// The server's key does not hash to the pinned fingerprint: stop, do not talk to it.
    #[error("the server key does not match the pinned fingerprint")]
    FingerprintMismatch,
    /// The gateway refused the channel (the account is deleted, the key does not match…).
    #[error("the gateway refused the channel: {0:?}")]
    Refused(Refusal),
    /// The gateway refused a request.
    #[error("the gateway refused the request: {0}")]
    Server(DeviceError),
    /// The network or the channel failed (connection lost, malformed frame, HTTP error).
    #[error("transport: {0}")]
    Transport(String),
    /// The local state could not be read or written (wrong key, tampered file, disk).
    #[error("storage: {0}")]
    Storage(StorageError),
    /// The app's mistake: this call makes no sense in the session's current state.
    #[error("{action} is not possible in state {state:?}")]
    InvalidState {
        /// The session's state, unchanged.
        state: State,
        /// What was asked.
        action: &'static str,
    },
    /// The app's mistake: no SFS is configured ([`crate::SdkConfig::sfs`]), so no second
    /// factor can be given.
    #[error("no second-factor server is configured")]
    SecondFactorUnavailable,
    /// The user's second factor was refused (wrong PIN, locked, revoked, not registered,
    /// biometric check failed); the session's state says whether they may retry.
    #[error("the second factor was refused: {0:?}")]
    SecondFactor(SecondFactorEvent),
    /// The SFS refused its channel (another key is bound to this app instance…).
    #[error("the second-factor server refused the channel: {0:?}")]
    SfsRefused(SfsRefusal),
    /// The SFS refused a request for another reason than the user's factor.
    #[error("the second-factor server refused the request: {0}")]
    Sfs(SfsError),
    /// The app's mistake: a biometric factor without a [`crate::BiometricPrompt`] set.
    #[error("no biometric prompt is set")]
    BiometricUnavailable,
    /// The app's mistake: a configuration value is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(&'static str),
    /// The app's mistake: no such account on this device (or not eligible here).
    #[error("unknown account")]
    UnknownAccount,
    /// The app's mistake: a transaction to sign breaks a limit (data, text, device data,
    /// client data), or a code that is not for this call (a transaction code to
    /// `start_session`, a login code to `transaction_from_input`).
    #[error("invalid transaction: {0}")]
    InvalidTransaction(String),
    /// The gateway did not answer in time.
    #[error("timed out")]
    Timeout,
    /// The app's mistake: no Message Center is configured ([`crate::SdkConfig::mc`]), so
    /// there is no push.
    #[error("no message center is configured")]
    PushUnavailable,
    /// The app's mistake: push is not registered yet ([`crate::Sdk::register_push`]).
    #[error("push is not registered")]
    PushNotRegistered,
    /// The Message Center refused its channel (it does not know the mailbox, is busy…).
    #[error("the message center refused the channel: {0:?}")]
    McRefused(McRefusal),
    /// The Message Center refused a request.
    #[error("the message center refused the request: {0}")]
    Mc(McError),
    /// A push message was refused; nothing was done.
    #[error("push message refused: {0}")]
    Push(PushRefusal),
}

/// Why [`crate::Sdk::process_push`] refused a message. Refusals say nothing of the content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushRefusal {
    /// Not a countersign push message (or an envelope too large, of an unknown version).
    #[error("not a countersign push message")]
    Malformed,
    /// Sealed to no push key of this device (the account is gone, or another device's).
    #[error("sealed to no push key on this device")]
    UnknownKey,
    /// The account's server published no push sender key, so its messages cannot be
    /// authenticated.
    #[error("the server's push sender key is not known")]
    NoSenderKey,
    /// Does not decrypt with the account's key and its server's sender key, for that server
    /// and account: forged, altered, or re-targeted at another account or server.
    #[error("does not decrypt for this account")]
    Undecryptable,
    /// Its expiry passed by the device's clock.
    #[error("expired")]
    Expired,
    /// This message id ran already (a replay, or the second copy of a pushed and pulled
    /// message).
    #[error("already processed")]
    AlreadyProcessed,
}

impl From<TransitionError> for SdkError {
    fn from(e: TransitionError) -> Self {
        Self::InvalidState {
            state: e.state,
            action: e.input,
        }
    }
}

impl From<DeviceError> for SdkError {
    fn from(e: DeviceError) -> Self {
        Self::Server(e)
    }
}
