//! The one-use record of an SFS attestation: stream `attestation-{server id}-{attestation id}`.
//!
//! An attestation proves a second factor once. The NS records each one it accepts here before
//! acting on it; the stream's first event is written with "no stream" expected, so of two
//! requests presenting the same attestation (a replay, or a race) exactly one records it and
//! the other finds it [`AttestationError::Replayed`]. Rules enforced by [`AttestationUse::decide`]:
//! - using an attestation that was never used records `attestation.used`;
//! - using it again, for anything, is `Replayed` (never an idempotent retry: the device asks
//!   the SFS for a new one).

use serde::{Deserialize, Serialize};

use crate::aggregate::{Aggregate, Classify, Context, ErrorKind};
use crate::ids::{AccountId, Timestamp};
use crate::second_factor::SecondFactorKind;

/// Record that an attestation was used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UseAttestation {
    /// SHA-256 of the COSE_Sign1 bytes.
    pub attestation_hash: [u8; 32],
    /// Which factor it attests.
    pub factor: SecondFactorKind,
    /// The account it was used for.
    pub account_id: AccountId,
    /// What for: `login`, `upgrade`, `transaction`.
    pub purpose: String,
}

/// `attestation.used` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestationUsed {
    /// SHA-256 of the COSE_Sign1 bytes.
    #[serde(with = "serde_bytes")]
    pub attestation_hash: [u8; 32],
    /// Which factor it attests.
    pub factor: SecondFactorKind,
    /// The account it was used for.
    pub account_id: AccountId,
    /// What for.
    pub purpose: String,
    /// When.
    pub used_at: Timestamp,
}

crate::domain_events! {
    /// The attestation record's events.
    pub enum AttestationEvent {
        Used(AttestationUsed) = ("attestation.used", 1),
    }
}

/// Why an attestation may not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestationError {
    /// It was used before. HTTP 409 / device `bad_attestation`.
    #[error("this attestation was used before")]
    Replayed,
}

impl Classify for AttestationError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Conflict
    }
}

/// Whether an attestation was used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AttestationUse {
    /// Never.
    #[default]
    Unused,
    /// Once; forever.
    Used,
}

impl Aggregate for AttestationUse {
    type Command = UseAttestation;
    type Event = AttestationEvent;
    type Error = AttestationError;

    fn decide(
        &self,
        command: UseAttestation,
        ctx: &mut Context<'_>,
    ) -> Result<Vec<AttestationEvent>, AttestationError> {
        match self {
            Self::Used => Err(AttestationError::Replayed),
            Self::Unused => Ok(vec![AttestationEvent::Used(AttestationUsed {
                attestation_hash: command.attestation_hash,
                factor: command.factor,
                account_id: command.account_id,
                purpose: command.purpose,
                used_at: ctx.now,
            })]),
        }
    }

    fn apply(&mut self, _event: &AttestationEvent) {
        *self = Self::Used;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn use_it() -> UseAttestation {
        UseAttestation {
            attestation_hash: [1; 32],
            factor: SecondFactorKind::Pin,
            account_id: AccountId::from_bytes([2; 16]),
            purpose: "login".into(),
        }
    }

    #[test]
    fn first_use_is_recorded_and_any_second_is_a_replay() {
        let mut ctx = Context::new(Timestamp::from_millis(5));
        let events = AttestationUse::Unused.decide(use_it(), &mut ctx);
        assert!(
            matches!(events.as_deref(), Ok([AttestationEvent::Used(u)]) if u.used_at == Timestamp::from_millis(5))
        );
        let used = AttestationUse::from_events(&events.unwrap_or_default());
        assert_eq!(
            used.decide(use_it(), &mut ctx),
            Err(AttestationError::Replayed)
        );
    }
}
