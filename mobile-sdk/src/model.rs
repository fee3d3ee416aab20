//! What the SDK shows the app: accounts, servers, history entries and session snapshots.
//! Plain values (ids as lowercase hex), never a key or a token.

use serde::{Deserialize, Serialize};

use crate::error::SdkError;
use crate::machine::{HistoryStatus, SessionKind, State};
use crate::second_factor::Pin;

/// An account this device holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountInfo {
    /// The account id, 32 hex digits.
    pub account_id: String,
    /// Its server's id, 32 hex digits.
    pub server_id: String,
    /// Its server's display name.
    pub server_name: String,
    /// The user, as the business system names them.
    pub userid: String,
    /// No second factor was added to it from this device (enrolled without one, never
    /// upgraded).
    pub headless: bool,
    /// When it was enrolled, milliseconds since the Unix epoch.
    pub created_at_ms: i64,
}

/// A server this device holds accounts at, as last seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// The server id, 32 hex digits.
    pub server_id: String,
    /// Display name.
    pub name: String,
    /// Logo URL, if set.
    pub logo_url: Option<String>,
    /// "none", "pin", "biometric" or "pin_or_biometric".
    pub second_factor: String,
    /// Seconds a verified second factor may be reused for a login.
    pub second_factor_cache_secs: u32,
    /// Ping interval of sessions opened without one, seconds.
    pub default_ping_time_secs: u32,
    /// The device gateway URL.
    pub gateway: String,
    /// SHA-256 of the server's channel key, 64 hex digits (pinned at enrolment).
    pub fingerprint: String,
}

/// One session in the history. Stored: field names are stable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// A local id for the session (32 hex digits; not the server's hsid).
    pub session_id: String,
    /// The server, 32 hex digits.
    pub server_id: String,
    /// The account that logged in or was enrolled, if any.
    pub account_id: Option<String>,
    /// Login or enrolment.
    pub kind: SessionKind,
    /// How it ended up (so far: a continuous login moves from LoggedIn to LoggedOut).
    pub status: HistoryStatus,
    /// What the user was shown while confirming.
    pub announce_info: Option<String>,
    /// When the status was last set, milliseconds since the Unix epoch.
    pub at_ms: i64,
}

/// A session as the app sees it at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSnapshot {
    /// The local session id (the history entry's).
    pub session_id: String,
    /// Login, enrolment or AppLogin.
    pub kind: SessionKind,
    /// The state.
    pub state: State,
    /// The history status, once there is one.
    pub history_status: Option<HistoryStatus>,
    /// The server, 32 hex digits.
    pub server_id: String,
    /// The server's name, once known.
    pub server_name: Option<String>,
    /// The account in use (login: the connected or chosen one; enrolment: the new one).
    pub account_id: Option<String>,
    /// Shown while confirming (login).
    pub announce_info: Option<String>,
    /// Shown once logged in.
    pub session_info: Option<String>,
    /// The session's ping time, once known (0: one-shot).
    pub ping_time_secs: Option<u32>,
    /// Why the session is in `Error`.
    pub error: Option<SdkError>,
    /// An AppLogin's web nonce while it is logged in (Active): the app hands it to its own
    /// backend, which reads the session with it (docs/app-login.md). A bearer secret: `Debug`
    /// prints nothing.
    pub web_nonce: Option<crate::WebNonce>,
}

/// A transaction waiting for an account's approval (a list entry, or what a notice says).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingTransaction {
    /// The account that may approve it, 32 hex digits.
    pub account_id: String,
    /// The transaction, 32 hex digits.
    pub transaction_id: String,
    /// Shown before the text, optional.
    pub announce_info: Option<String>,
    /// After this, signing is refused; milliseconds since the Unix epoch.
    pub expires_at_ms: i64,
}

/// A transaction as fetched to show it: everything the user must see before approving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionDetails {
    /// The account it was fetched with, 32 hex digits.
    pub account_id: String,
    /// Its server, 32 hex digits.
    pub server_id: String,
    /// The transaction, 32 hex digits.
    pub transaction_id: String,
    /// The exact bytes signed.
    pub data: Vec<u8>,
    /// Their media type.
    pub content_type: String,
    /// The text to show; it is signed by its hash.
    pub text: String,
    /// Shown before the text, optional.
    pub announce_info: Option<String>,
    /// When it was created, milliseconds since the Unix epoch.
    pub created_at_ms: i64,
    /// After this, signing is refused.
    pub expires_at_ms: i64,
}

/// What a signature the server accepted was: the device's COSE_Sign1 and the SFS attestation
/// it binds (the app may keep them; the server's evidence bundle carries the same bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionReceipt {
    /// The account that signed, 32 hex digits.
    pub account_id: String,
    /// The transaction, 32 hex digits (for the app's own transactions, the id it got).
    pub transaction_id: String,
    /// The device's COSE_Sign1 over the signed transaction.
    pub device_signature: Vec<u8>,
    /// The SFS attestation of the transaction's challenge.
    pub attestation: Vec<u8>,
    /// The device's clock when it signed, milliseconds since the Unix epoch.
    pub device_time_ms: i64,
}

/// A transaction code (QR, link) read: which transaction, at which server, and which of this
/// device's accounts there may try to approve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionTarget {
    /// The server, 32 hex digits.
    pub server_id: String,
    /// The transaction, 32 hex digits.
    pub transaction_id: String,
    /// This device's accounts at the server, oldest first.
    pub accounts: Vec<AccountInfo>,
}

/// A second factor the user gave. `Debug` never prints the PIN.
#[derive(Clone)]
pub enum SecondFactor {
    /// The app PIN.
    Pin(Pin),
    /// The biometric key, which the SDK has the platform release through the app's
    /// [`crate::BiometricPrompt`].
    Biometric,
}

impl SecondFactor {
    /// The PIN the user typed.
    #[must_use]
    pub fn pin(pin: impl Into<String>) -> Self {
        Self::Pin(Pin::new(pin))
    }
}

impl std::fmt::Debug for SecondFactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pin(_) => f.write_str("Pin(..)"),
            Self::Biometric => f.write_str("Biometric"),
        }
    }
}

impl SessionSnapshot {
    /// Whether this is an enrolment.
    #[must_use]
    pub fn is_enrolment(&self) -> bool {
        self.kind == SessionKind::Enrolment
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_a_pin_prints_nothing() {
        let pin = SecondFactor::Pin(Pin::new("918273"));
        let text = format!("{pin:?}");
        assert!(!text.contains("918273"), "{text}");
        assert_eq!(text, "Pin(..)");
    }
}
