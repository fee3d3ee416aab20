//! The second-factor aggregate of the SFS: one per app instance (stream `sf-{app instance}`),
//! holding which channel key the app instance uses, whether a PIN and a biometric key are
//! registered, and the lockout state (`docs/second-factor.md`).
//!
//! Lifecycle of the lockout, for failures `f` (consecutive, PIN and biometric together):
//!
//! ```text
//! Active --f reaches a lock threshold--> Locked{until} --clock passes until--> Active
//! Active/Locked --a verification succeeds--> Active (f = 0)
//! Active/Locked --f reaches revoke_after--> Revoked (terminal for this app instance)
//! ```
//!
//! Rules enforced by [`SecondFactor::decide`]:
//! - nothing is recorded for an app instance until its first PIN registration, and that one
//!   needs an enrolment a countersign server authorised for the app instance
//!   ([`RegisterPin::enrolled`], else [`SecondFactorError::NotEnrolled`]): an anonymous
//!   client cannot write to the log. The first registration records the channel key
//!   (`key_bound`) in the same append as the PIN; later registrations must come over the same
//!   key ([`SecondFactorError::KeyMismatch`]);
//! - a PIN may be registered when none is, or when the channel proved the current PIN (a
//!   change); otherwise [`SecondFactorError::AlreadyRegistered`];
//! - a biometric key needs a registered PIN proven on the channel ([`SecondFactorError::NotAllowed`]);
//! - [`StartPinLogin`] counts a failure *before* the SFS answers anything, so an abandoned
//!   login stays counted. It is refused while locked (with the lock's end) or revoked. The
//!   start that reaches a threshold is still answered (it is one of the allowed tries) and
//!   records the lock or the revocation with its failure; OPAQUE lets the client learn the
//!   outcome from the answer alone, so every answered start is one guess;
//! - a PIN success therefore ends a lock its own start caused (it was counted within the
//!   budget); a biometric success is refused while locked, because a biometric attempt is
//!   counted only when it fails;
//! - nothing succeeds or registers once revoked: the app enrols a new app instance.
//!
//! The policy is data ([`LockoutPolicy`]) given with each counting command, so an operator
//! can change it without touching history: a lock is recorded once per threshold crossed.

mod events;
#[cfg(test)]
mod tests;

pub use events::*;

use crate::aggregate::{Aggregate, Classify, Context, ErrorKind};
use crate::ids::{AppInstanceId, Timestamp};
use crate::server::into_command;
use crate::validate::{self, ValidationError};

/// How many consecutive failures lock the second factor, for how long, and when it is revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockoutPolicy {
    /// `(failures, lock seconds)`: reaching `failures` locks for that long.
    pub lock_after: Vec<(u32, u32)>,
    /// Reaching this many failures revokes the second factor.
    pub revoke_after: u32,
}

impl Default for LockoutPolicy {
    /// 5 failures → 1 minute, 8 → 1 hour, 10 → revoked.
    fn default() -> Self {
        Self {
            lock_after: vec![(5, 60), (8, 3_600)],
            revoke_after: 10,
        }
    }
}

impl LockoutPolicy {
    /// Parses `"5:60,8:3600,10:revoke"`: each `failures:seconds` locks, `failures:revoke`
    /// revokes. Locks must come before the revocation and grow with the failure count.
    ///
    /// # Errors
    /// A message naming what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut lock_after = Vec::new();
        let mut revoke_after = None;
        for step in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (failures, what) = step
                .split_once(':')
                .ok_or_else(|| format!("`{step}` is not failures:seconds or failures:revoke"))?;
            let failures: u32 = failures
                .trim()
                .parse()
                .map_err(|_| format!("`{failures}` is not a number of failures"))?;
            if failures == 0 {
                return Err("a step needs at least one failure".into());
            }
            match what.trim() {
                "revoke" => revoke_after = Some(failures),
                secs => lock_after.push((
                    failures,
                    secs.parse()
                        .map_err(|_| format!("`{secs}` is not a number of seconds"))?,
                )),
            }
        }
        let revoke_after = revoke_after.ok_or("the policy needs a `failures:revoke` step")?;
        if !lock_after
            .windows(2)
            .all(|w| matches!(w, [a, b] if a.0 < b.0))
            || lock_after.iter().any(|&(at, _)| at >= revoke_after)
        {
            return Err("lock steps must grow and come before the revocation".into());
        }
        Ok(Self {
            lock_after,
            revoke_after,
        })
    }

    /// Failures left before the next lock or the revocation, once `failures` are counted.
    #[must_use]
    pub fn attempts_left(&self, failures: u32) -> u32 {
        self.lock_after
            .iter()
            .map(|&(at, _)| at)
            .chain([self.revoke_after])
            .filter(|&at| at > failures)
            .min()
            .map_or(0, |at| at - failures)
    }

    /// The lock (seconds) that `failures` calls for, when the last lock was recorded at
    /// `locked_at` failures: the highest threshold crossed since then.
    fn lock_for(&self, failures: u32, locked_at: u32) -> Option<u32> {
        self.lock_after
            .iter()
            .filter(|&&(at, _)| at > locked_at && at <= failures)
            .max_by_key(|&&(at, _)| at)
            .map(|&(_, secs)| secs)
    }
}

/// Register (or change) the PIN: the OPAQUE record is stored by the SFS, its digest here.
/// The first registration also binds the channel key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisterPin {
    /// The app instance.
    pub app_instance: AppInstanceId,
    /// SHA-256 of the OPAQUE registration record.
    pub record_digest: [u8; 32],
    /// SHA-256 of the SEC1 uncompressed Noise static key of the channel registering.
    pub key_thumbprint: [u8; 32],
    /// Whether this channel completed a PIN login (needed to change a registered PIN).
    pub pin_proven: bool,
    /// Whether a countersign server enrolled an account of this app instance (needed for the
    /// first registration; the SFS asks the NS only when no PIN is registered).
    pub enrolled: bool,
}

/// Register (or replace) the biometric key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterBiometric {
    /// The app instance.
    pub app_instance: AppInstanceId,
    /// SEC1 P-256 public key.
    pub public_key: Vec<u8>,
    /// Whether this channel completed a PIN login (required).
    pub pin_proven: bool,
}

/// A PIN login starts: count it as a failure until it succeeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartPinLogin {
    /// The lockout policy in force.
    pub policy: LockoutPolicy,
}

/// A biometric signature did not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailBiometric {
    /// The lockout policy in force.
    pub policy: LockoutPolicy,
}

/// A factor verified; the SFS issues the attestation described here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SucceedVerification {
    /// Which factor.
    pub factor: SecondFactorKind,
    /// SHA-256 of the attested challenge.
    pub challenge_hash: [u8; 32],
    /// SHA-256 of the attestation.
    pub attestation_hash: [u8; 32],
    /// The attestation's expiry.
    pub attestation_expires_at: Timestamp,
}

/// Commands of the second-factor aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecondFactorCommand {
    /// See [`RegisterPin`].
    RegisterPin(RegisterPin),
    /// See [`RegisterBiometric`].
    RegisterBiometric(RegisterBiometric),
    /// See [`StartPinLogin`].
    StartPinLogin(StartPinLogin),
    /// See [`FailBiometric`].
    FailBiometric(FailBiometric),
    /// See [`SucceedVerification`].
    SucceedVerification(SucceedVerification),
}

into_command!(SecondFactorCommand {
    RegisterPin(RegisterPin),
    RegisterBiometric(RegisterBiometric),
    StartPinLogin(StartPinLogin),
    FailBiometric(FailBiometric),
    SucceedVerification(SucceedVerification),
});

/// Why a second-factor command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecondFactorError {
    /// The input breaks a rule (a biometric key that is not a P-256 point). HTTP 422.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// Another channel key is bound to this app instance. HTTP 409.
    #[error("another key is bound to this app instance")]
    KeyMismatch,
    /// A first PIN registration for an app instance no countersign server enrolled. HTTP 422.
    #[error("no countersign server enrolled this app instance; enrol it first")]
    NotEnrolled,
    /// No PIN (or, for a biometric verification, no biometric key) is registered. HTTP 404.
    #[error("no such factor is registered")]
    NotRegistered,
    /// A PIN is registered and this channel did not prove it. HTTP 409.
    #[error("a PIN is registered already")]
    AlreadyRegistered,
    /// Needs a PIN login on this channel first. HTTP 422.
    #[error("a PIN login on this channel is needed first")]
    NotAllowed,
    /// Too many failures; refused until `until`. HTTP 409 (retry later).
    #[error("locked until {until}")]
    Locked {
        /// End of the lock.
        until: Timestamp,
    },
    /// Too many failures; the app instance must enrol again. HTTP 410.
    #[error("the second factor is revoked")]
    Revoked,
}

impl Classify for SecondFactorError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Invalid(_) | Self::NotAllowed | Self::NotEnrolled => ErrorKind::Invalid,
            Self::KeyMismatch | Self::AlreadyRegistered | Self::Locked { .. } => {
                ErrorKind::Conflict
            }
            Self::NotRegistered => ErrorKind::NotFound,
            Self::Revoked => ErrorKind::Gone,
        }
    }
}

/// Where an app instance's second factor stands at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FactorStatus {
    /// Nothing registered.
    None,
    /// Usable.
    Active,
    /// Locked until the instant given.
    Locked(Timestamp),
    /// Revoked.
    Revoked,
}

/// The second-factor aggregate's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecondFactor {
    key_thumbprint: Option<[u8; 32]>,
    pin_record_digest: Option<[u8; 32]>,
    biometric_key: Option<Vec<u8>>,
    failures: u32,
    /// The failure count at which the last lock was recorded (0: none since the last success).
    locked_at_failures: u32,
    locked_until: Option<Timestamp>,
    revoked: bool,
}

impl SecondFactor {
    /// SHA-256 of the bound channel key.
    #[must_use]
    pub fn key_thumbprint(&self) -> Option<&[u8; 32]> {
        self.key_thumbprint.as_ref()
    }

    /// SHA-256 of the current OPAQUE registration record.
    #[must_use]
    pub fn pin_record_digest(&self) -> Option<&[u8; 32]> {
        self.pin_record_digest.as_ref()
    }

    /// The registered biometric key, SEC1 uncompressed.
    #[must_use]
    pub fn biometric_key(&self) -> Option<&[u8]> {
        self.biometric_key.as_deref()
    }

    /// Consecutive failures.
    #[must_use]
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Where the factor stands at `now`.
    #[must_use]
    pub fn status(&self, now: Timestamp) -> FactorStatus {
        if self.revoked {
            FactorStatus::Revoked
        } else if let Some(until) = self.locked_until.filter(|&u| u > now) {
            FactorStatus::Locked(until)
        } else if self.pin_record_digest.is_none() && self.biometric_key.is_none() {
            FactorStatus::None
        } else {
            FactorStatus::Active
        }
    }

    /// Refuses when revoked or locked at `now`.
    ///
    /// # Errors
    /// [`SecondFactorError::Revoked`] or [`SecondFactorError::Locked`].
    pub fn ensure_usable(&self, now: Timestamp) -> Result<(), SecondFactorError> {
        match self.status(now) {
            FactorStatus::Revoked => Err(SecondFactorError::Revoked),
            FactorStatus::Locked(until) => Err(SecondFactorError::Locked { until }),
            FactorStatus::None | FactorStatus::Active => Ok(()),
        }
    }

    fn count_failure(
        &self,
        factor: SecondFactorKind,
        policy: &LockoutPolicy,
        now: Timestamp,
    ) -> Vec<SecondFactorEvent> {
        let failed_attempts = self.failures.saturating_add(1);
        let mut events = vec![SecondFactorEvent::VerificationFailed(VerificationFailed {
            factor,
            failed_attempts,
            failed_at: now,
        })];
        if failed_attempts >= policy.revoke_after {
            events.push(SecondFactorEvent::Revoked(SecondFactorRevoked {
                factor,
                reason: RevocationReason::TooManyFailures,
                revoked_at: now,
            }));
        } else if let Some(secs) = policy.lock_for(failed_attempts, self.locked_at_failures) {
            events.push(SecondFactorEvent::Locked(SecondFactorLocked {
                factor,
                failed_attempts,
                locked_until: now.plus_secs(secs),
            }));
        }
        events
    }

    fn decide_register_pin(
        &self,
        cmd: RegisterPin,
        now: Timestamp,
    ) -> Result<Vec<SecondFactorEvent>, SecondFactorError> {
        if self.revoked {
            return Err(SecondFactorError::Revoked);
        }
        let bind = match self.key_thumbprint {
            None => Some(SecondFactorEvent::KeyBound(KeyBound {
                app_instance: cmd.app_instance,
                key_thumbprint: cmd.key_thumbprint,
                bound_at: now,
            })),
            Some(bound) if bound == cmd.key_thumbprint => None,
            Some(_) => return Err(SecondFactorError::KeyMismatch),
        };
        let pin = match self.pin_record_digest {
            Some(d) if d == cmd.record_digest => None,
            Some(_) if !cmd.pin_proven => return Err(SecondFactorError::AlreadyRegistered),
            Some(_) => Some(cmd.record_digest),
            None if !cmd.enrolled => return Err(SecondFactorError::NotEnrolled),
            None => Some(cmd.record_digest),
        };
        Ok(bind
            .into_iter()
            .chain(pin.map(|record_digest| {
                SecondFactorEvent::PinRegistered(PinRegistered {
                    app_instance: cmd.app_instance,
                    record_digest,
                })
            }))
            .collect())
    }

    fn decide_register_biometric(
        &self,
        cmd: RegisterBiometric,
    ) -> Result<Vec<SecondFactorEvent>, SecondFactorError> {
        if self.revoked {
            return Err(SecondFactorError::Revoked);
        }
        if self.pin_record_digest.is_none() {
            return Err(SecondFactorError::NotRegistered);
        }
        if !cmd.pin_proven {
            return Err(SecondFactorError::NotAllowed);
        }
        let (public_key, key_thumbprint) =
            validate::p256_public_key(&cmd.public_key).ok_or(ValidationError::PublicKey)?;
        if self.biometric_key.as_deref() == Some(public_key.as_slice()) {
            return Ok(Vec::new());
        }
        Ok(vec![SecondFactorEvent::BiometricKeyRegistered(
            BiometricKeyRegistered {
                app_instance: cmd.app_instance,
                public_key,
                key_thumbprint,
            },
        )])
    }

    fn decide_success(
        &self,
        cmd: SucceedVerification,
        now: Timestamp,
    ) -> Result<Vec<SecondFactorEvent>, SecondFactorError> {
        if self.revoked {
            return Err(SecondFactorError::Revoked);
        }
        match cmd.factor {
            SecondFactorKind::Pin if self.pin_record_digest.is_none() => {
                return Err(SecondFactorError::NotRegistered);
            }
            SecondFactorKind::Biometric if self.biometric_key.is_none() => {
                return Err(SecondFactorError::NotRegistered);
            }
            SecondFactorKind::Biometric => self.ensure_usable(now)?,
            SecondFactorKind::Pin => {}
        }
        Ok(vec![SecondFactorEvent::VerificationSucceeded(
            VerificationSucceeded {
                factor: cmd.factor,
                challenge_hash: cmd.challenge_hash,
                attestation_hash: cmd.attestation_hash,
                verified_at: now,
                attestation_expires_at: cmd.attestation_expires_at,
            },
        )])
    }
}

impl Aggregate for SecondFactor {
    type Command = SecondFactorCommand;
    type Event = SecondFactorEvent;
    type Error = SecondFactorError;

    fn decide(
        &self,
        command: SecondFactorCommand,
        ctx: &mut Context<'_>,
    ) -> Result<Vec<SecondFactorEvent>, SecondFactorError> {
        let now = ctx.now;
        match command {
            SecondFactorCommand::RegisterPin(cmd) => self.decide_register_pin(cmd, now),
            SecondFactorCommand::RegisterBiometric(cmd) => self.decide_register_biometric(cmd),
            SecondFactorCommand::StartPinLogin(cmd) => {
                self.ensure_usable(now)?;
                if self.pin_record_digest.is_none() {
                    return Err(SecondFactorError::NotRegistered);
                }
                Ok(self.count_failure(SecondFactorKind::Pin, &cmd.policy, now))
            }
            SecondFactorCommand::FailBiometric(cmd) => {
                self.ensure_usable(now)?;
                if self.biometric_key.is_none() {
                    return Err(SecondFactorError::NotRegistered);
                }
                Ok(self.count_failure(SecondFactorKind::Biometric, &cmd.policy, now))
            }
            SecondFactorCommand::SucceedVerification(cmd) => self.decide_success(cmd, now),
        }
    }

    fn apply(&mut self, event: &SecondFactorEvent) {
        match event {
            SecondFactorEvent::KeyBound(e) => self.key_thumbprint = Some(e.key_thumbprint),
            SecondFactorEvent::PinRegistered(e) => self.pin_record_digest = Some(e.record_digest),
            SecondFactorEvent::BiometricKeyRegistered(e) => {
                self.biometric_key = Some(e.public_key.clone());
            }
            SecondFactorEvent::VerificationSucceeded(_) => {
                self.failures = 0;
                self.locked_at_failures = 0;
                self.locked_until = None;
            }
            SecondFactorEvent::VerificationFailed(e) => self.failures = e.failed_attempts,
            SecondFactorEvent::Locked(e) => {
                self.locked_at_failures = e.failed_attempts;
                self.locked_until = Some(e.locked_until);
            }
            SecondFactorEvent::Revoked(e) => match (e.reason, e.factor) {
                (RevocationReason::TooManyFailures, _) => self.revoked = true,
                (_, SecondFactorKind::Pin) => self.pin_record_digest = None,
                (_, SecondFactorKind::Biometric) => self.biometric_key = None,
            },
        }
    }
}
