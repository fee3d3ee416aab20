//! The messages between a device (the mobile SDK) and the device gateway, version 1.
//!
//! Every message is one CBOR item travelling inside the Noise channel ([`crate::channel`]):
//! the handshake carries a [`Hello`] (device → gateway) and a [`Welcome`] (gateway → device);
//! after it, the device sends [`Request`]s and the gateway answers each with a
//! [`ServerMessage::Reply`] carrying the request's `id`, and tells the device of things it did
//! not ask about with [`ServerMessage::Notice`] (a logout from the business API, an account
//! deleted by the server).
//!
//! Rules enforced by [`decode`]:
//! - at most [`MAX_MESSAGE_BYTES`] bytes and [`MAX_DEPTH`] levels of nesting, checked before
//!   serde sees anything;
//! - exactly one item, no trailing bytes; ids, tokens and keys of their exact lengths
//!   ([`Bytes`]); strings within their documented limits ([`Request::validate`]);
//! - enums are externally tagged maps (`{"scan": {"hsid": h'…'}}`), field names in
//!   snake_case, so a reader in another language sees names, not indexes.
//!
//! A version the gateway does not speak is refused in the handshake
//! ([`Refusal::UnsupportedVersion`]) rather than misread.

use std::fmt;

use serde::de::{DeserializeOwned, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::cbor::{self, CborError};

/// The protocol version this code speaks.
pub const VERSION: u16 = 1;
/// Largest message, in bytes of CBOR (a message may span several Noise frames).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Deepest nesting of arrays and maps a message may have.
pub const MAX_DEPTH: usize = 16;
/// Longest text field a device may send (announce info, names), in bytes.
pub const MAX_TEXT_BYTES: usize = 4096;
/// Longest SFS attestation accepted, in bytes.
pub const MAX_ATTESTATION_BYTES: usize = 1024;
/// Longest device signature over a transaction accepted, in bytes.
pub const MAX_SIGNATURE_BYTES: usize = 16 * 1024;
/// Largest transaction data, in bytes.
pub const MAX_TRANSACTION_DATA_BYTES: usize = 64 * 1024;
/// Longest transaction text, in bytes of UTF-8.
pub const MAX_TRANSACTION_TEXT_BYTES: usize = 16 * 1024;
/// Most transactions a `pending_transactions` answer lists.
pub const MAX_PENDING_TRANSACTIONS: usize = 50;

/// A byte string of exactly `N` bytes (ids, hsids, tokens). Encoded as a CBOR byte string;
/// any other length or type is a decoding error.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bytes<const N: usize>(pub [u8; N]);

impl<const N: usize> fmt::Debug for Bytes<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl<const N: usize> Serialize for Bytes<N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de, const N: usize> Deserialize<'de> for Bytes<N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Exact<const N: usize>;
        impl<const N: usize> Visitor<'_> for Exact<N> {
            type Value = Bytes<N>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a byte string of {N} bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                <[u8; N]>::try_from(v)
                    .map(Bytes)
                    .map_err(|_| E::invalid_length(v.len(), &self))
            }
        }
        d.deserialize_bytes(Exact::<N>)
    }
}

/// A secret of `N` bytes (an enrolment token): like [`Bytes`] on the wire, but `Debug`
/// prints nothing and the memory is wiped on drop.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret<const N: usize>(Bytes<N>);

impl<const N: usize> Secret<N> {
    /// Wraps secret bytes.
    pub fn new(bytes: [u8; N]) -> Self {
        Self(Bytes(bytes))
    }
    /// The bytes, for the one place that uses them.
    pub fn expose(&self) -> &[u8; N] {
        &self.0.0
    }
}

impl<const N: usize> Drop for Secret<N> {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0.0);
    }
}

impl<const N: usize> fmt::Debug for Secret<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A variable-length byte string (public keys).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0))
    }
}

/// Opaque app data (secure channel): on the wire like [`Blob`], but `Debug` prints only its
/// length, so a logged request or answer never shows what the app sent or got back.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Opaque(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl fmt::Debug for Opaque {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Opaque({} bytes)", self.0.len())
    }
}

/// Largest app data one `send_data` carries, and largest Data Service answer relayed, in
/// bytes (the device gateway enforces both; docs/data-service.md).
pub const MAX_APP_DATA_BYTES: usize = 64 * 1024;
/// Longest device data field (model, OS, app version), in bytes.
pub const MAX_DEVICE_DATA_BYTES: usize = 400;

/// First handshake message's payload, device → gateway (encrypted to the server's key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol version the device speaks.
    pub version: u16,
    /// Who the device says it is.
    pub intent: Intent,
}

/// Who the device says it is; the Noise static key proves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Intent {
    /// An enrolled account: the device's Noise static key must be this account's channel key.
    Account {
        /// The account.
        account_id: Bytes<16>,
    },
    /// A device with no account at this server yet: it may read the server's parameters,
    /// enrol (its static key becomes the new account's channel key) or report that it has no
    /// account for a session.
    Guest,
}

/// Second handshake message's payload, gateway → device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Welcome {
    /// The channel is open.
    Accepted {
        /// The server's current parameters (the SDK refreshes its cache from them).
        server: ServerParams,
    },
    /// The gateway closes the connection after this.
    Refused {
        /// Why.
        reason: Refusal,
    },
}

/// Why the gateway refused a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The device speaks a version the gateway does not.
    UnsupportedVersion,
    /// No account with this id opens with this Noise static key: either none exists, or its
    /// channel key is another. One refusal for both, so that a made-up key does not tell
    /// whether an id exists.
    UnknownAccount,
    /// The account was deleted (the device should forget it).
    AccountDeleted,
    /// Sent by gateways before [`Refusal::UnknownAccount`] covered it (the static key is not
    /// the account's channel key); no longer sent, still decoded, and to be treated alike.
    KeyMismatch,
    /// The server was deleted.
    ServerGone,
}

/// A virtual server's parameters, as the SDK caches them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerParams {
    /// The server id.
    pub server_id: Bytes<16>,
    /// Display name.
    pub name: String,
    /// Logo URL, if set.
    pub logo_url: Option<String>,
    /// The second factor a login needs: "none", "pin", "biometric" or "pin_or_biometric".
    pub second_factor: String,
    /// Seconds a verified second factor may be reused for a login (0: never).
    pub second_factor_cache_secs: u32,
    /// Ping interval of sessions opened without one, seconds.
    pub default_ping_time_secs: u32,
    /// The server's push sender key (SEC1 uncompressed P-256, 65 bytes): push messages for
    /// this server's accounts are HPKE-sealed in auth mode with it (`docs/message-center.md`).
    /// Absent from servers that send no push.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_key: Option<Blob>,
}

/// A device request; the gateway answers with a reply carrying the same `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the device; unique among its requests in flight on this connection.
    pub id: u32,
    /// What it asks.
    pub body: RequestBody,
}

/// What a device may ask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestBody {
    /// Guest only: create an account through an enrolment token; the channel's static key
    /// becomes its channel key.
    Enrol {
        /// The enrolment token from the QR code or link.
        token: Secret<32>,
        /// The account's signing public key, SEC1 P-256.
        signing_public_key: Blob,
        /// The app installation.
        app_instance: Bytes<16>,
    },
    /// Pick up a login session from its QR code or link; answers its details.
    Scan {
        /// The session's derived id.
        hsid: Bytes<32>,
    },
    /// Account only: the user chose this account for the session.
    Confirm {
        /// The session.
        hsid: Bytes<32>,
    },
    /// Account only: log in to the session with this account.
    LogIn {
        /// The session.
        hsid: Bytes<32>,
    },
    /// Account only: a continuous session is still in use.
    Ping {
        /// The session.
        hsid: Bytes<32>,
    },
    /// Account only: the user logs out.
    LogOut {
        /// The session.
        hsid: Bytes<32>,
    },
    /// The user declined the session before logging in.
    Abort {
        /// The session.
        hsid: Bytes<32>,
    },
    /// The session cannot go on on this device.
    Fail {
        /// The session.
        hsid: Bytes<32>,
        /// Why.
        reason: FailReason,
    },
    /// Account only: the user removed this account from the app.
    DeleteAccount,
    /// Account only: the challenge an SFS attestation must carry for this purpose.
    Challenge {
        /// What the second factor is for.
        purpose: ChallengePurpose,
    },
    /// Account only: an SFS attestation for a session's challenge (before `log_in`).
    VerifySecondFactor {
        /// The session.
        hsid: Bytes<32>,
        /// The COSE_Sign1 attestation from the SFS.
        attestation: Blob,
    },
    /// Account only: add a second factor to a headless account, proven by an attestation
    /// for the `upgrade` challenge.
    UpgradeAccount {
        /// The COSE_Sign1 attestation from the SFS.
        attestation: Blob,
    },
    /// Account only: fetch a transaction to show it (records that it was presented); answers
    /// its details.
    GetTransaction {
        /// The transaction.
        transaction_id: Bytes<16>,
    },
    /// Account only: the transactions waiting for this account's approval, oldest first (at
    /// most [`MAX_PENDING_TRANSACTIONS`]).
    PendingTransactions,
    /// Account only: approve a transaction. `signature` is the account key's COSE_Sign1 over a
    /// signed transaction (`docs/evidence.md`) binding the hash of `attestation`, a fresh SFS
    /// attestation for the transaction's challenge.
    SignTransaction {
        /// The transaction.
        transaction_id: Bytes<16>,
        /// The device's COSE_Sign1.
        signature: Blob,
        /// The SFS attestation.
        attestation: Blob,
    },
    /// Account only: decline a transaction.
    RejectTransaction {
        /// The transaction.
        transaction_id: Bytes<16>,
    },
    /// Account only: the app's own transaction (SDK-initiated), created and signed at once.
    /// The id is the app's (16 random bytes); the signature and attestation are as for
    /// `sign_transaction`.
    SignOwnTransaction {
        /// Chosen by the app.
        transaction_id: Bytes<16>,
        /// The data signed.
        data: Blob,
        /// Its media type.
        content_type: String,
        /// The text shown to the user.
        text: String,
        /// The device's COSE_Sign1.
        signature: Blob,
        /// The SFS attestation.
        attestation: Blob,
    },
    /// Account only: push messages for this account go through this Message Center mailbox,
    /// sealed to this push key (`docs/message-center.md`). Registering again replaces the
    /// earlier registration (a new MC token, a rotated push key).
    RegisterPush {
        /// The Message Center's Noise static key (SEC1 P-256): which MC, among those the
        /// server trusts.
        mc_key: Blob,
        /// The MC token naming the app's mailbox (the server keeps it sealed).
        mc_token: Secret<32>,
        /// The account's push public key, SEC1 uncompressed P-256 (65 bytes).
        push_public_key: Blob,
    },
    /// Account only: log in to the app itself (AppLogin, `docs/app-login.md`). The gateway
    /// opens a continuous session for this account's user and answers its hsid and the web
    /// nonce the app hands its own backend; the device then proves a second factor on that
    /// session (`challenge`, `verify_second_factor`) and sends `log_in`, as for any login. A
    /// second factor proven on the session itself is always needed: no reuse window applies.
    AppLogin {
        /// How often the app will ping, 1..=3600 seconds.
        ping_time_secs: u32,
    },
    /// Guest only: create a headless account (no user, no second factor) for the secure
    /// channel, when the server's policy allows it; the channel's static key becomes its
    /// channel key. Retrying with the same channel key answers the same account.
    EnrolHeadless {
        /// The account's signing public key, SEC1 P-256.
        signing_public_key: Blob,
        /// The app installation.
        app_instance: Bytes<16>,
    },
    /// Account only: deliver app data to the server's Data Service (docs/data-service.md) and
    /// answer what it said. No user interaction; nothing is recorded per message.
    SendData {
        /// Chosen by the app, the same on a retry: the Data Service sees it and can answer a
        /// retry without acting twice.
        request_id: Bytes<16>,
        /// At most [`MAX_APP_DATA_BYTES`].
        data: Opaque,
    },
    /// Account only: what the app says about its device; recorded on the account when it
    /// changed (`account.device_data_changed`).
    SetDeviceData {
        /// Device model.
        model: String,
        /// Operating system and its version.
        os: String,
        /// The app's version.
        app_version: String,
    },
}

/// What a second-factor challenge is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChallengePurpose {
    /// A login session.
    Login {
        /// The session.
        hsid: Bytes<32>,
    },
    /// Upgrading this headless account.
    Upgrade,
    /// Signing a transaction. The challenge is public
    /// (`evidence::transaction_challenge`); asking for it is a convenience.
    Transaction {
        /// The transaction.
        transaction_id: Bytes<16>,
    },
}

/// Why a device gave up on a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailReason {
    /// The app holds no account for the session's server (NOACCOUNTS).
    NoAccounts,
}

impl Request {
    /// Checks the limits serde cannot: key and text lengths.
    ///
    /// # Errors
    /// A [`DeviceError`] with [`ErrorCode::Invalid`].
    pub fn validate(&self) -> Result<(), DeviceError> {
        match &self.body {
            RequestBody::Enrol {
                signing_public_key, ..
            } if !matches!(signing_public_key.0.len(), 33 | 65) => Err(DeviceError::new(
                ErrorCode::Invalid,
                "signing_public_key must be a SEC1 P-256 point (33 or 65 bytes)",
            )),
            RequestBody::RegisterPush {
                mc_key,
                push_public_key,
                ..
            } if !matches!(mc_key.0.len(), 33 | 65) || push_public_key.0.len() != 65 => {
                Err(DeviceError::new(
                    ErrorCode::Invalid,
                    "mc_key must be a SEC1 P-256 point and push_public_key an uncompressed one (65 bytes)",
                ))
            }
            RequestBody::VerifySecondFactor { attestation, .. }
            | RequestBody::UpgradeAccount { attestation }
            | RequestBody::SignTransaction { attestation, .. }
            | RequestBody::SignOwnTransaction { attestation, .. }
                if attestation.0.len() > MAX_ATTESTATION_BYTES =>
            {
                Err(DeviceError::new(
                    ErrorCode::Invalid,
                    "the attestation is longer than an attestation can be",
                ))
            }
            RequestBody::SignTransaction { signature, .. }
            | RequestBody::SignOwnTransaction { signature, .. }
                if signature.0.len() > MAX_SIGNATURE_BYTES =>
            {
                Err(DeviceError::new(
                    ErrorCode::Invalid,
                    "the signature is longer than a signed transaction can be",
                ))
            }
            RequestBody::EnrolHeadless {
                signing_public_key, ..
            } if !matches!(signing_public_key.0.len(), 33 | 65) => Err(DeviceError::new(
                ErrorCode::Invalid,
                "signing_public_key must be a SEC1 P-256 point (33 or 65 bytes)",
            )),
            RequestBody::SetDeviceData {
                model,
                os,
                app_version,
            } if [model, os, app_version]
                .iter()
                .any(|t| t.len() > MAX_DEVICE_DATA_BYTES) =>
            {
                Err(DeviceError::new(
                    ErrorCode::Invalid,
                    "a device data field is over its limit",
                ))
            }
            RequestBody::SignOwnTransaction {
                data,
                content_type,
                text,
                ..
            } if data.0.len() > MAX_TRANSACTION_DATA_BYTES
                || content_type.len() > 255
                || text.len() > MAX_TRANSACTION_TEXT_BYTES =>
            {
                Err(DeviceError::new(
                    ErrorCode::Invalid,
                    "the transaction's data, content type or text is over its limit",
                ))
            }
            _ => Ok(()),
        }
    }
}

/// A message from the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerMessage {
    /// The answer to a request.
    Reply {
        /// The request's id.
        id: u32,
        /// Its outcome.
        outcome: Outcome,
    },
    /// Something the device did not ask about.
    Notice(Notice),
}

/// A request's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Done.
    Ok(Answer),
    /// Refused.
    Err(DeviceError),
}

/// What a successful request answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// The account exists; reconnect with [`Intent::Account`].
    Enrolled {
        /// The new account.
        account_id: Bytes<16>,
        /// The user it belongs to, as the business system names them.
        userid: String,
    },
    /// A session's details (after a scan).
    Session(SessionDetails),
    /// Logged in.
    LoggedIn {
        /// Shown to the user once logged in.
        session_info: Option<String>,
        /// 0 for a one-shot login; otherwise ping at least this often, seconds.
        ping_time_secs: u32,
    },
    /// The challenge to have the SFS attest.
    Challenge {
        /// 32 bytes.
        challenge: Bytes<32>,
    },
    /// Done, nothing to say.
    Done,
    /// A transaction to show.
    Transaction(TransactionDetails),
    /// Transactions waiting for approval.
    Transactions {
        /// Oldest first.
        pending: Vec<PendingTransaction>,
    },
    /// An AppLogin session is open: prove a second factor on `hsid`, then `log_in`.
    AppLogin {
        /// The session's derived id, for the requests that follow.
        hsid: Bytes<32>,
        /// The web nonce: 32 random bytes whose base64url text (no padding) the app hands its
        /// backend, which reads the session with it (`GET …/sessions/{web_nonce}`). A bearer
        /// secret: `Debug` prints nothing.
        web_nonce: Secret<32>,
        /// Milliseconds since the Unix epoch after which the login is refused.
        expires_at_ms: i64,
        /// The session's ping time, seconds.
        ping_time_secs: u32,
    },
    /// A headless account exists; reconnect with [`Intent::Account`].
    HeadlessEnrolled {
        /// The new account.
        account_id: Bytes<16>,
    },
    /// What the Data Service answered a `send_data` (a 2xx or 4xx status; 5xx is
    /// `data_service_failed`).
    Data {
        /// Its HTTP status.
        status: u16,
        /// Its body, at most [`MAX_APP_DATA_BYTES`].
        body: Opaque,
    },
}

/// A transaction, as a device shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionDetails {
    /// The transaction.
    pub transaction_id: Bytes<16>,
    /// The bytes to sign (the device hashes them itself).
    pub data: Blob,
    /// Their media type.
    pub content_type: String,
    /// The text the user must see before approving.
    pub text: String,
    /// Shown before the text, optional.
    pub announce_info: Option<String>,
    /// When it was created, milliseconds since the Unix epoch.
    pub created_at_ms: i64,
    /// After this, signing is refused.
    pub expires_at_ms: i64,
}

/// A transaction waiting for approval, as a list or a notice names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingTransaction {
    /// The transaction.
    pub transaction_id: Bytes<16>,
    /// Shown before the text, optional.
    pub announce_info: Option<String>,
    /// After this, signing is refused.
    pub expires_at_ms: i64,
}

/// A login session, as a device sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionDetails {
    /// Shown to the user while confirming.
    pub announce_info: Option<String>,
    /// 0 for a one-shot login.
    pub ping_time_secs: u32,
    /// Whether the server's policy asks a second factor for this login.
    pub second_factor_required: bool,
    /// Milliseconds since the Unix epoch after which the login is refused.
    pub expires_at_ms: i64,
}

/// Something the gateway tells a device without being asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Notice {
    /// A session this device took part in ended.
    SessionEnded {
        /// The session.
        hsid: Bytes<32>,
        /// How.
        how: SessionEnd,
    },
    /// The server deleted this account; the device should forget it. The gateway closes
    /// the connection after this.
    AccountDeleted {
        /// The account.
        account_id: Bytes<16>,
    },
    /// A transaction waits for this account's approval: fetch it with `get_transaction`.
    TransactionPending(PendingTransaction),
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionEnd {
    /// Logged out (by the business system, the user, or a missed ping).
    LoggedOut,
    /// Cancelled before login.
    Aborted,
    /// Not logged in in time.
    Expired,
    /// Failed.
    Failed,
}

/// A refused request: a code to act on and a message for people. Messages never echo
/// secrets or foreign content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct DeviceError {
    /// What went wrong.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
}

impl DeviceError {
    /// A refusal.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// What went wrong with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or breaks a rule.
    Invalid,
    /// No such session or enrolment.
    NotFound,
    /// The session or enrolment is past its deadline.
    Expired,
    /// The session ended or the enrolment was used.
    Ended,
    /// The request conflicts with what happened already (another account logged in).
    Conflict,
    /// This channel may not do this (a guest asking to log in, another account's session).
    NotAllowed,
    /// The server's policy needs a second factor this device did not give.
    SecondFactorRequired,
    /// The attestation was refused (untrusted key, other challenge, stale, replayed...).
    BadAttestation,
    /// The gateway failed; try again later.
    Internal,
    /// Secure channel: the server has no Data Service configured; nothing was sent.
    DataServiceNotConfigured,
    /// Secure channel: the Data Service could not be reached (refused, unreachable); the data
    /// may be sent again with the same request id.
    DataServiceUnavailable,
    /// Secure channel: the Data Service did not answer within the server's timeout; it may
    /// have acted, so a retry must carry the same request id.
    DataServiceTimeout,
    /// Secure channel: the Data Service failed (a 5xx status, or an answer over the size
    /// limit); its answer is not relayed.
    DataServiceFailed,
    /// The request's payload is over its limit (app data over [`MAX_APP_DATA_BYTES`]).
    TooLarge,
    /// Too many requests of this kind; slow down and try again.
    RateLimited,
}

/// Why bytes are not a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// Longer than [`MAX_MESSAGE_BYTES`].
    #[error("message is {0} bytes, at most {MAX_MESSAGE_BYTES} allowed")]
    TooLong(usize),
    /// Nested deeper than [`MAX_DEPTH`].
    #[error("message nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// Not CBOR, or not the expected shape.
    #[error("malformed message: {0}")]
    Malformed(#[from] CborError),
}

/// Encodes a message as canonical CBOR.
///
/// # Errors
/// [`MessageError::Malformed`] if serde fails, [`MessageError::TooLong`] past the limit.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, MessageError> {
    let bytes = cbor::to_canonical_vec(message)?;
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(MessageError::TooLong(bytes.len()));
    }
    Ok(bytes)
}

/// Decodes one message, enforcing the size and depth limits first.
///
/// # Errors
/// See [`MessageError`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, MessageError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(MessageError::TooLong(bytes.len()));
    }
    let value = cbor::decode_value(bytes)?;
    if depth(&value) > MAX_DEPTH {
        return Err(MessageError::TooDeep);
    }
    Ok(cbor::from_slice(bytes)?)
}

fn depth(value: &cbor4ii::core::Value) -> usize {
    use cbor4ii::core::Value;
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Map(entries) => {
            1 + entries
                .iter()
                .map(|(k, v)| depth(k).max(depth(v)))
                .max()
                .unwrap_or(0)
        }
        Value::Tag(_, inner) => 1 + depth(inner),
        _ => 0,
    }
}

/// `DeviceError` from a decoding failure, for replies.
impl From<MessageError> for DeviceError {
    fn from(e: MessageError) -> Self {
        Self::new(ErrorCode::Invalid, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + fmt::Debug>(message: &T) {
        let bytes = encode(message).unwrap();
        assert_eq!(&decode::<T>(&bytes).unwrap(), message);
        assert_eq!(encode(&decode::<T>(&bytes).unwrap()).unwrap(), bytes);
    }

    #[test]
    fn app_data_is_never_printed() {
        let send = RequestBody::SendData {
            request_id: Bytes([8; 16]),
            data: Opaque(b"secret app data".to_vec()),
        };
        let answer = Answer::Data {
            status: 200,
            body: Opaque(b"secret answer".to_vec()),
        };
        round_trip(&answer);
        let printed = format!("{send:?} {answer:?}");
        assert!(printed.contains("Opaque(15 bytes)"), "{printed}");
        for secret in [&b"secret app data"[..], b"secret answer"] {
            assert!(!printed.contains(&hex::encode(secret)), "{printed}");
            assert!(!printed.contains(std::str::from_utf8(secret).unwrap()));
        }
    }

    #[test]
    fn secure_channel_limits_are_checked() {
        let request = |body| Request { id: 1, body };
        let bad_key = request(RequestBody::EnrolHeadless {
            signing_public_key: Blob(vec![4; 10]),
            app_instance: Bytes([6; 16]),
        });
        assert_eq!(bad_key.validate().unwrap_err().code, ErrorCode::Invalid);
        let long = request(RequestBody::SetDeviceData {
            model: "m".repeat(MAX_DEVICE_DATA_BYTES + 1),
            os: String::new(),
            app_version: String::new(),
        });
        assert_eq!(long.validate().unwrap_err().code, ErrorCode::Invalid);
        let fine = request(RequestBody::SetDeviceData {
            model: "m".repeat(MAX_DEVICE_DATA_BYTES),
            os: String::new(),
            app_version: String::new(),
        });
        assert!(fine.validate().is_ok());
    }

    #[test]
    fn every_message_round_trips() {
        round_trip(&Hello {
            version: VERSION,
            intent: Intent::Account {
                account_id: Bytes([7; 16]),
            },
        });
        round_trip(&Hello {
            version: VERSION,
            intent: Intent::Guest,
        });
        round_trip(&Welcome::Refused {
            reason: Refusal::KeyMismatch,
        });
        round_trip(&Welcome::Accepted {
            server: ServerParams {
                server_id: Bytes([1; 16]),
                name: "Bank".into(),
                logo_url: None,
                second_factor: "none".into(),
                second_factor_cache_secs: 0,
                default_ping_time_secs: 0,
                push_key: None,
            },
        });
        for body in [
            RequestBody::Enrol {
                token: Secret::new([9; 32]),
                signing_public_key: Blob(vec![4; 65]),
                app_instance: Bytes([3; 16]),
            },
            RequestBody::Scan {
                hsid: Bytes([2; 32]),
            },
            RequestBody::LogIn {
                hsid: Bytes([2; 32]),
            },
            RequestBody::Fail {
                hsid: Bytes([2; 32]),
                reason: FailReason::NoAccounts,
            },
            RequestBody::DeleteAccount,
            RequestBody::AppLogin {
                ping_time_secs: 300,
            },
            RequestBody::EnrolHeadless {
                signing_public_key: Blob(vec![4; 65]),
                app_instance: Bytes([6; 16]),
            },
            RequestBody::SendData {
                request_id: Bytes([8; 16]),
                data: Opaque(b"app data".to_vec()),
            },
            RequestBody::SetDeviceData {
                model: "Pixel 8".into(),
                os: "Android 15".into(),
                app_version: "1.2.3".into(),
            },
        ] {
            round_trip(&Request { id: 5, body });
        }
        let app_login = ServerMessage::Reply {
            id: 7,
            outcome: Outcome::Ok(Answer::AppLogin {
                hsid: Bytes([2; 32]),
                web_nonce: Secret::new([0xcd; 32]),
                expires_at_ms: 1_700_000_000_000,
                ping_time_secs: 300,
            }),
        };
        round_trip(&app_login);
        assert!(
            !format!("{app_login:?}").contains("cdcdcdcd"),
            "the web nonce is secret"
        );
        round_trip(&ServerMessage::Reply {
            id: 5,
            outcome: Outcome::Err(DeviceError::new(ErrorCode::Expired, "session expired")),
        });
        round_trip(&ServerMessage::Reply {
            id: 6,
            outcome: Outcome::Ok(Answer::Session(SessionDetails {
                announce_info: Some("Log in to Bank".into()),
                ping_time_secs: 30,
                second_factor_required: false,
                expires_at_ms: 1_700_000_000_000,
            })),
        });
        round_trip(&ServerMessage::Notice(Notice::SessionEnded {
            hsid: Bytes([2; 32]),
            how: SessionEnd::LoggedOut,
        }));
    }

    #[test]
    fn names_are_readable_on_the_wire() {
        let bytes = encode(&Request {
            id: 1,
            body: RequestBody::Scan {
                hsid: Bytes([0; 32]),
            },
        })
        .unwrap();
        let json = cbor::value_to_json(&cbor::decode_value(&bytes).unwrap());
        assert_eq!(
            json["body"]["scan"]["hsid"].as_str().map(str::len),
            Some(64)
        );
    }

    #[test]
    fn wrong_lengths_and_shapes_are_typed_errors() {
        // A 31-byte hsid.
        let mut short = encode(&Request {
            id: 1,
            body: RequestBody::Scan {
                hsid: Bytes([0; 32]),
            },
        })
        .unwrap();
        let at = short.len() - 34;
        assert_eq!(short[at], 0x58, "bstr(32) head");
        short[at + 1] = 31;
        short.pop();
        assert!(matches!(
            decode::<Request>(&short),
            Err(MessageError::Malformed(_))
        ));
        for garbage in [&b""[..], b"\xff", b"\xa0", b"\x82\x01", b"\x01\x02"] {
            assert!(decode::<Request>(garbage).is_err());
        }
        let unknown =
            cbor::to_canonical_vec(&serde_json::json!({"id": 1, "body": {"launch": {}}})).unwrap();
        assert!(matches!(
            decode::<Request>(&unknown),
            Err(MessageError::Malformed(_))
        ));
    }

    #[test]
    fn size_and_depth_are_limited_before_serde() {
        let mut deep = vec![0x81u8; MAX_DEPTH + 1];
        deep.push(0x00);
        assert_eq!(decode::<Request>(&deep), Err(MessageError::TooDeep));
        let long = vec![0u8; MAX_MESSAGE_BYTES + 1];
        assert_eq!(
            decode::<Request>(&long),
            Err(MessageError::TooLong(MAX_MESSAGE_BYTES + 1))
        );
    }

    #[test]
    fn an_invalid_signing_key_length_is_refused() {
        let request = Request {
            id: 1,
            body: RequestBody::Enrol {
                token: Secret::new([0xab; 32]),
                signing_public_key: Blob(vec![4; 64]),
                app_instance: Bytes([0; 16]),
            },
        };
        assert_eq!(request.validate().unwrap_err().code, ErrorCode::Invalid);
        assert!(
            !format!("{request:?}").contains("abababab"),
            "the token is secret"
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = decode::<Request>(&bytes);
            let _ = decode::<ServerMessage>(&bytes);
            let _ = decode::<Hello>(&bytes);
        }
    }
}
