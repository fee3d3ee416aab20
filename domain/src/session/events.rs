//! Events of the session aggregate (stream `session-{server id}-{hsid}`).
//!
//! A session is known only by its derived id (`hsid`): the caller's nonce is a bearer secret
//! and never appears in an event. Flow, as the SDK sees it:
//! `opened → scanned? → confirmed → second_factor_verified? → logged_in → pinged* →
//! logged_out`, or `aborted | expired | failed` before login; `provoked` (a push login asked
//! of the account that last logged in) takes a logged-out or one-shot session back to waiting
//! for a login. Events carry the deadlines
//! (expiry, next ping) computed when they were decided, so readers never recompute timeouts.

use serde::{Deserialize, Serialize};

use crate::ids::{AccountId, SessionRef, Timestamp, UserDigest};
use crate::second_factor::SecondFactorKind;

/// How a logged-in session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogoutReason {
    /// The user logged out in the app.
    User,
    /// The business system logged the session out.
    Server,
    /// The device stopped pinging a continuous session.
    PingMissed,
}

/// Who aborted a session before login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AbortedBy {
    /// The user declined or cancelled in the app.
    User,
    /// The business system cancelled it.
    Server,
}

/// Why a session failed (the SDK's ERROR state). Codes, never free text from a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionFailure {
    /// The device's login signature did not verify.
    BadSignature,
    /// The attestation was invalid, stale or replayed.
    BadAttestation,
    /// The second factor is locked at the SFS.
    SecondFactorLocked,
    /// The account is not allowed for this session.
    AccountNotAllowed,
    /// The app that scanned it holds no account for this server (the SDK's NOACCOUNTS).
    NoAccounts,
}

/// `session.opened` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionOpened {
    /// Tenant and hsid.
    pub session: SessionRef,
    /// Ping interval in seconds; 0 for a one-shot login.
    pub ping_time_secs: u32,
    /// Seconds the session may take to complete.
    pub timeout_secs: u32,
    /// `opened at + timeout`: after this the session expires unless logged in.
    pub expires_at: Timestamp,
    /// Started by the app for itself (AppLogin) rather than by a QR code, link or push.
    pub app_login: bool,
    /// The intended user, when the caller named one (push login, AppLogin).
    pub user: Option<UserDigest>,
    /// Shown to the user while confirming: at most 1000 characters, no control characters
    /// but `\n`.
    pub announce_info: Option<String>,
    /// Shown to the user once logged in; same rules as `announce_info`.
    pub session_info: Option<String>,
    /// Opened by a push login (provoke on a user or an account): the accounts asked, the only
    /// ones that may log in. Empty (and absent from the payload) for every other session.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub push_to: Vec<AccountId>,
}

/// `session.scanned` v1: a device picked up the session (read the QR code or opened the link).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionScanned {
    /// When.
    pub scanned_at: Timestamp,
}

/// `session.confirmed` v1: the user chose the account to continue with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionConfirmed {
    /// The account.
    pub account_id: AccountId,
}

/// `session.second_factor_verified` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSecondFactorVerified {
    /// Which factor.
    pub factor: SecondFactorKind,
    /// SHA-256 of the SFS attestation.
    #[serde(with = "serde_bytes")]
    pub attestation_hash: [u8; 32],
    /// When the SFS verified it.
    pub verified_at: Timestamp,
    /// True when a recent verification was reused under the server's policy.
    pub reused: bool,
}

/// `session.logged_in` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionLoggedIn {
    /// The account.
    pub account_id: AccountId,
    /// Its user.
    pub user: UserDigest,
    /// `ping_time > 0`: stays logged in while the device pings.
    pub continuous: bool,
    /// For continuous sessions, the deadline of the first ping.
    pub ping_deadline: Option<Timestamp>,
}

/// `session.pinged` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionPinged {
    /// When.
    pub pinged_at: Timestamp,
    /// The next ping's deadline.
    pub ping_deadline: Timestamp,
}

/// `session.logged_out` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionLoggedOut {
    /// Why.
    pub reason: LogoutReason,
    /// When.
    pub logged_out_at: Timestamp,
}

/// `session.provoked` v1: the business system asked the account that last logged in on this
/// session to log in again, by push (provokeLogin). The session waits for a login again,
/// with these options; only that account may log in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionProvoked {
    /// The account asked: the one that last logged in.
    pub account_id: AccountId,
    /// Its user.
    pub user: UserDigest,
    /// Seconds the new login may take.
    pub timeout_secs: u32,
    /// `provoked at + timeout`.
    pub expires_at: Timestamp,
    /// Shown to the user while confirming (same rules as at opening).
    pub announce_info: Option<String>,
    /// Shown to the user once logged in.
    pub session_info: Option<String>,
    /// When.
    pub provoked_at: Timestamp,
}

/// `session.aborted` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionAborted {
    /// Who.
    pub by: AbortedBy,
    /// When.
    pub aborted_at: Timestamp,
}

/// `session.expired` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionExpired {
    /// When it was found expired.
    pub expired_at: Timestamp,
}

/// `session.failed` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionFailed {
    /// Why.
    pub reason: SessionFailure,
    /// When.
    pub failed_at: Timestamp,
}

crate::domain_events! {
    /// Everything that happens to a session.
    pub enum SessionEvent {
        Opened(SessionOpened) = ("session.opened", 1),
        Scanned(SessionScanned) = ("session.scanned", 1),
        Confirmed(SessionConfirmed) = ("session.confirmed", 1),
        SecondFactorVerified(SessionSecondFactorVerified) = ("session.second_factor_verified", 1),
        LoggedIn(SessionLoggedIn) = ("session.logged_in", 1),
        Pinged(SessionPinged) = ("session.pinged", 1),
        LoggedOut(SessionLoggedOut) = ("session.logged_out", 1),
        Aborted(SessionAborted) = ("session.aborted", 1),
        Expired(SessionExpired) = ("session.expired", 1),
        Failed(SessionFailed) = ("session.failed", 1),
        Provoked(SessionProvoked) = ("session.provoked", 1),
    }
}
