//! Events of the account aggregate (stream `account-{server id}-{account id}`).
//!
//! An account is one app instance's registration for one user at one server, with its own key
//! pairs. Headless accounts (created by the secure channel) have no second factor; upgrading
//! adds one. Only public keys and hashes appear here.

use serde::{Deserialize, Serialize};

use crate::ids::{AccountRef, AppInstanceId, Timestamp, UserDigest};
use crate::second_factor::SecondFactorKind;

/// Which of an account's key pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyRole {
    /// Authenticates the Noise channel.
    Channel,
    /// Signs logins and transactions.
    Signing,
}

/// Who deleted an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeletedBy {
    /// The business system, through the API (the app is then told to delete it).
    Server,
    /// The app, which notified the server.
    App,
}

/// `account.registered` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRegistered {
    /// Tenant and account id.
    pub account: AccountRef,
    /// The app installation holding the keys.
    pub app_instance: AppInstanceId,
    /// The user, if known yet (a secure-channel account starts without one).
    pub user: Option<UserDigest>,
    /// SEC1 uncompressed P-256 channel key.
    #[serde(with = "serde_bytes")]
    pub channel_public_key: Vec<u8>,
    /// SEC1 uncompressed P-256 signing key.
    #[serde(with = "serde_bytes")]
    pub signing_public_key: Vec<u8>,
    /// SHA-256 of `signing_public_key`, as attestations name it.
    #[serde(with = "serde_bytes")]
    pub signing_key_thumbprint: [u8; 32],
    /// `None` for a headless account.
    pub second_factor: Option<SecondFactorKind>,
}

/// `account.user_linked` v1: a headless account learnt its user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountUserLinked {
    /// The user.
    pub user: UserDigest,
}

/// `account.upgraded` v1: a second factor was added to a headless account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountUpgraded {
    /// The factor.
    pub second_factor: SecondFactorKind,
    /// SHA-256 of the SFS attestation that proved it.
    #[serde(with = "serde_bytes")]
    pub attestation_hash: [u8; 32],
}

/// `account.key_rotated` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountKeyRotated {
    /// Which key.
    pub role: KeyRole,
    /// The new SEC1 uncompressed P-256 public key.
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
    /// SHA-256 of `public_key`.
    #[serde(with = "serde_bytes")]
    pub key_thumbprint: [u8; 32],
}

/// `account.deleted` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountDeleted {
    /// Who.
    pub by: DeletedBy,
    /// When.
    pub deleted_at: Timestamp,
}

/// `account.second_factor_verified` v1: the account proved a second factor for a login (the
/// NS checked the SFS attestation). A later login within the server's reuse window may rely
/// on it instead of asking again; a transaction never does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountSecondFactorVerified {
    /// Which factor.
    pub factor: SecondFactorKind,
    /// SHA-256 of the attestation that proved it.
    #[serde(with = "serde_bytes")]
    pub attestation_hash: [u8; 32],
    /// When the SFS verified it.
    pub verified_at: Timestamp,
}

/// `account.push_registered` v1: push messages for the account go through a Message Center
/// mailbox, sealed to this push key (docs/message-center.md). The MC token that names the
/// mailbox is a bearer secret: it is sealed in the key vault under `token_ref`, never here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountPushRegistered {
    /// SHA-256 of the Message Center's channel key (SEC1 uncompressed): which MC.
    #[serde(with = "serde_bytes")]
    pub mc_key_id: [u8; 32],
    /// The account's push public key, SEC1 uncompressed P-256.
    #[serde(with = "serde_bytes")]
    pub push_public_key: Vec<u8>,
    /// Where the vault keeps the MC token.
    pub token_ref: String,
    /// When.
    pub registered_at: Timestamp,
}

/// What the app says about the device it runs on (secure channel, `set_device_data`).
/// Self-reported and unverified: for the business system's records, never for a decision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceData {
    /// Device model, e.g. `Pixel 8`; at most 100 characters.
    pub model: String,
    /// Operating system and version, e.g. `Android 15`; at most 100 characters.
    pub os: String,
    /// The app's version; at most 100 characters.
    pub app_version: String,
}

/// `account.device_data_changed` v1: the app reported device data that differ from what the
/// account had ("the NS will also persist device data"). Repeating the same data writes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountDeviceDataChanged {
    /// The data now.
    pub device_data: DeviceData,
    /// When.
    pub changed_at: Timestamp,
}

crate::domain_events! {
    /// Everything that happens to an account.
    pub enum AccountEvent {
        Registered(AccountRegistered) = ("account.registered", 1),
        UserLinked(AccountUserLinked) = ("account.user_linked", 1),
        Upgraded(AccountUpgraded) = ("account.upgraded", 1),
        KeyRotated(AccountKeyRotated) = ("account.key_rotated", 1),
        Deleted(AccountDeleted) = ("account.deleted", 1),
        SecondFactorVerified(AccountSecondFactorVerified) = ("account.second_factor_verified", 1),
        PushRegistered(AccountPushRegistered) = ("account.push_registered", 1),
        DeviceDataChanged(AccountDeviceDataChanged) = ("account.device_data_changed", 1),
    }
}
