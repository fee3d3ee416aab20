//! Events of the transaction aggregate (stream `transaction-{server id}-{transaction id}`).
//!
//! A transaction is data to sign plus a text shown to the user. `transaction.created` keeps the
//! data and text themselves (the evidence bundle must carry them years later, and records of
//! payment approvals are kept for as long as the law asks, so they are not crypto-shredded with
//! the user). `transaction.signed` is the event the audit trail proves in an evidence bundle: it
//! repeats every fact of the transaction a verifier relies on (hashes, content type, creation and
//! expiry) next to the device's COSE_Sign1 and the SFS attestation, verbatim. Signing always
//! needs a fresh second factor.

use serde::{Deserialize, Serialize};

use crate::ids::{AccountId, Timestamp, TransactionRef, UserDigest};
use crate::second_factor::SecondFactorKind;

/// Who created a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransactionOrigin {
    /// A business system through the API.
    Api,
    /// The app through the SDK (stored only once signed).
    Device,
}

/// `transaction.created` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionCreated {
    /// Tenant and transaction id.
    pub transaction: TransactionRef,
    /// The user who must sign.
    pub user: UserDigest,
    /// The one account that may sign, when the creator named one.
    pub account_id: Option<AccountId>,
    /// The data to sign, at most 64 KiB.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// SHA-256 of `data`.
    #[serde(with = "serde_bytes")]
    pub data_hash: [u8; 32],
    /// Media type of `data`.
    pub content_type: String,
    /// The text shown to the user, at most 16 KiB of UTF-8.
    pub text: String,
    /// SHA-256 of the text's UTF-8 bytes.
    #[serde(with = "serde_bytes")]
    pub text_hash: [u8; 32],
    /// Shown in a push or a list before the text, optional.
    pub announce_info: Option<String>,
    /// When it was created.
    pub created_at: Timestamp,
    /// After this instant the transaction can no longer be signed.
    pub expires_at: Timestamp,
    /// Who created it.
    pub origin: TransactionOrigin,
}

/// `transaction.presented` v1: an account's device fetched the transaction to show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionPresented {
    /// The account whose device shows it.
    pub account_id: AccountId,
    /// When.
    pub presented_at: Timestamp,
}

/// `transaction.signed` v1: what an evidence bundle proves (`docs/evidence.md`, check 10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionSigned {
    /// The signing account.
    pub account_id: AccountId,
    /// SHA-256 of the data signed.
    #[serde(with = "serde_bytes")]
    pub data_hash: [u8; 32],
    /// SHA-256 of the text shown.
    #[serde(with = "serde_bytes")]
    pub text_hash: [u8; 32],
    /// Media type of the data.
    pub content_type: String,
    /// When the transaction was created.
    pub created_at: Timestamp,
    /// When it would have expired.
    pub expires_at: Timestamp,
    /// The device's COSE_Sign1 over the transaction (ES256, the account's signing key).
    #[serde(with = "serde_bytes")]
    pub device_signature: Vec<u8>,
    /// The SFS's COSE_Sign1 attestation of the fresh second factor.
    #[serde(with = "serde_bytes")]
    pub attestation: Vec<u8>,
    /// The factor the attestation proves.
    pub factor: SecondFactorKind,
    /// The device's clock when it signed (its claim, bracketed by the attestation).
    pub device_time: Timestamp,
    /// When the server accepted the signature.
    pub signed_at: Timestamp,
}

/// `transaction.rejected` v1: the user declined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionRejected {
    /// The account that declined.
    pub account_id: AccountId,
    /// When.
    pub rejected_at: Timestamp,
}

/// `transaction.expired` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionExpired {
    /// When it was found expired.
    pub expired_at: Timestamp,
}

crate::domain_events! {
    /// Everything that happens to a transaction.
    pub enum TransactionEvent {
        Created(TransactionCreated) = ("transaction.created", 1),
        Presented(TransactionPresented) = ("transaction.presented", 1),
        Signed(TransactionSigned) = ("transaction.signed", 1),
        Rejected(TransactionRejected) = ("transaction.rejected", 1),
        Expired(TransactionExpired) = ("transaction.expired", 1),
    }
}
