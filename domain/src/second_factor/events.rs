//! Events of the SFS's second-factor aggregate (stream `sf-{app instance id}`).
//!
//! One stream per app instance, because the PIN belongs to the app instance and is shared by
//! all its accounts (at any server). The events carry what readers need: attempt counts and
//! lock expiry, so no projection recomputes the lockout policy. Never in an event: the PIN, OPAQUE key material or
//! any private key. `pin_registered` holds only a digest of the OPAQUE registration record,
//! which the SFS keeps in its own store.

use serde::{Deserialize, Serialize};

use crate::ids::{AppInstanceId, Timestamp};

/// A kind of second factor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecondFactorKind {
    /// The app instance's PIN, checked with OPAQUE.
    Pin,
    /// A P-256 key the platform releases only after a biometric check.
    Biometric,
}

/// Why a factor was revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationReason {
    /// The user reset or removed it in the app.
    User,
    /// The app instance was wiped or uninstalled.
    AppReset,
    /// An operator revoked it.
    Operator,
    /// Replaced by a newly registered factor of the same kind.
    Replaced,
    /// The lockout policy's failure limit was reached.
    TooManyFailures,
}

/// `second_factor.key_bound` v1: the first SFS channel of this app instance authenticated with
/// this Noise static key; later channels must use the same key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyBound {
    /// The app instance.
    pub app_instance: AppInstanceId,
    /// SHA-256 of the SEC1 uncompressed channel public key.
    #[serde(with = "serde_bytes")]
    pub key_thumbprint: [u8; 32],
    /// When.
    pub bound_at: Timestamp,
}

/// `second_factor.pin_registered` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinRegistered {
    /// The app instance.
    pub app_instance: AppInstanceId,
    /// SHA-256 of the OPAQUE registration record the SFS stored.
    #[serde(with = "serde_bytes")]
    pub record_digest: [u8; 32],
}

/// `second_factor.biometric_key_registered` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BiometricKeyRegistered {
    /// The app instance.
    pub app_instance: AppInstanceId,
    /// SEC1 uncompressed P-256 public key.
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
    /// SHA-256 of `public_key`.
    #[serde(with = "serde_bytes")]
    pub key_thumbprint: [u8; 32],
}

/// `second_factor.verification_succeeded` v1: the SFS issued an attestation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerificationSucceeded {
    /// Which factor.
    pub factor: SecondFactorKind,
    /// SHA-256 of the challenge the server issued.
    #[serde(with = "serde_bytes")]
    pub challenge_hash: [u8; 32],
    /// SHA-256 of the COSE_Sign1 attestation returned.
    #[serde(with = "serde_bytes")]
    pub attestation_hash: [u8; 32],
    /// When it was verified.
    pub verified_at: Timestamp,
    /// The attestation's expiry.
    pub attestation_expires_at: Timestamp,
}

/// `second_factor.verification_failed` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerificationFailed {
    /// Which factor.
    pub factor: SecondFactorKind,
    /// Consecutive failures including this one.
    pub failed_attempts: u32,
    /// When.
    pub failed_at: Timestamp,
}

/// `second_factor.locked` v1: too many failures; verifications are refused until `locked_until`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecondFactorLocked {
    /// Which factor.
    pub factor: SecondFactorKind,
    /// Consecutive failures that caused the lock.
    pub failed_attempts: u32,
    /// End of the lock.
    pub locked_until: Timestamp,
}

/// `second_factor.revoked` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecondFactorRevoked {
    /// Which factor.
    pub factor: SecondFactorKind,
    /// Why.
    pub reason: RevocationReason,
    /// When.
    pub revoked_at: Timestamp,
}

crate::domain_events! {
    /// Everything that happens to an app instance's second factors.
    pub enum SecondFactorEvent {
        KeyBound(KeyBound) = ("second_factor.key_bound", 1),
        PinRegistered(PinRegistered) = ("second_factor.pin_registered", 1),
        BiometricKeyRegistered(BiometricKeyRegistered) = ("second_factor.biometric_key_registered", 1),
        VerificationSucceeded(VerificationSucceeded) = ("second_factor.verification_succeeded", 1),
        VerificationFailed(VerificationFailed) = ("second_factor.verification_failed", 1),
        Locked(SecondFactorLocked) = ("second_factor.locked", 1),
        Revoked(SecondFactorRevoked) = ("second_factor.revoked", 1),
    }
}
