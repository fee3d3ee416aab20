//! Events of the transaction aggregate (stream `transaction-{server id}-{transaction id}`).
//!
//! A transaction is data to sign (recorded by its SHA-256) plus a text shown to the user. Once
//! signed, the event keeps the device's COSE_Sign1 and the SFS attestation verbatim, which is
//! what the evidence bundle later proves. Signing always needs a fresh second factor.

use serde::{Deserialize, Serialize};

use crate::ids::{AccountId, Timestamp, TransactionRef, UserDigest};

/// Who created a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransactionOrigin {
    /// A business system through the API.
    Api,
    /// The app through the SDK.
    Device,
}

/// `transaction.created` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionCreated {
    /// Tenant and transaction id.
    pub transaction: TransactionRef,
    /// The user who must sign.
    pub user: UserDigest,
    /// SHA-256 of the data to sign.
    #[serde(with = "serde_bytes")]
    pub data_hash: [u8; 32],
    /// The text shown to the user.
    pub text: String,
    /// After this instant the transaction can no longer be signed.
    pub expires_at: Timestamp,
    /// Who created it.
    pub origin: TransactionOrigin,
}

/// `transaction.signed` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionSigned {
    /// The signing account.
    pub account_id: AccountId,
    /// The device's COSE_Sign1 over the transaction (ES256).
    #[serde(with = "serde_bytes")]
    pub device_signature: Vec<u8>,
    /// The SFS's COSE_Sign1 attestation of the fresh second factor.
    #[serde(with = "serde_bytes")]
    pub attestation: Vec<u8>,
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
        Signed(TransactionSigned) = ("transaction.signed", 1),
        Rejected(TransactionRejected) = ("transaction.rejected", 1),
        Expired(TransactionExpired) = ("transaction.expired", 1),
    }
}
