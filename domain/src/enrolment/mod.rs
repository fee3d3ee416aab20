//! The enrolment aggregate: a time-limited invitation (QR code or deep link) for a device to
//! create an account for one user.
//!
//! Lifecycle:
//!
//! ```text
//! NotStarted --StartEnrolment--> Pending --CompleteEnrolment--> Completed
//! Pending --ExpireEnrolment (once due)--> Expired
//! ```
//!
//! `Completed` and `Expired` are terminal.
//!
//! Rules enforced by [`Enrolment::decide`]:
//! - the lifetime is 60..=604800 s (a minute to a week); `expires_at = now + ttl`;
//! - starting again with the same user and lifetime emits nothing (an idempotent retry that
//!   answers the same QR code) while the enrolment is pending and not due; with another user
//!   or lifetime it is [`EnrolmentError::AlreadyExists`]; a retry after the enrolment
//!   completed is [`EnrolmentError::AlreadyCompleted`], after it expired (or became due)
//!   [`EnrolmentError::Expired`];
//! - completing needs a pending enrolment before `expires_at`; completing again with the same
//!   account emits nothing (a device retry), with another it is `AlreadyCompleted`;
//! - expiring records `enrolment.expired` only for a pending enrolment whose deadline has
//!   passed, and emits nothing otherwise;
//! - any command but start on an enrolment never started is [`EnrolmentError::NotFound`].
//!
//! Whether the user exists is not this aggregate's knowledge: `commands` checks it first.

mod events;
#[cfg(test)]
mod tests;

pub use events::*;

use crate::aggregate::{Aggregate, Classify, Context, ErrorKind};
use crate::ids::{AccountId, EnrolmentRef, Timestamp, UserDigest};
use crate::server::into_command;
use crate::validate::{self, ValidationError};

/// Shortest enrolment lifetime, seconds.
pub const MIN_TTL_SECS: u32 = 60;
/// Longest enrolment lifetime, seconds (a week).
pub const MAX_TTL_SECS: u32 = 604_800;

/// Start an enrolment. The edge derived `enrolment` from the token it hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartEnrolment {
    /// Tenant and enrolment id.
    pub enrolment: EnrolmentRef,
    /// The user the new account will belong to.
    pub user: UserDigest,
    /// Lifetime, seconds.
    pub ttl_secs: u32,
}

/// A device created an account through this enrolment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompleteEnrolment {
    /// The new account.
    pub account_id: AccountId,
}

/// Record that the deadline passed, if it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpireEnrolment;

/// Commands of the enrolment aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrolmentCommand {
    /// See [`StartEnrolment`].
    Start(StartEnrolment),
    /// See [`CompleteEnrolment`].
    Complete(CompleteEnrolment),
    /// See [`ExpireEnrolment`].
    Expire(ExpireEnrolment),
}

into_command!(EnrolmentCommand {
    Start(StartEnrolment),
    Complete(CompleteEnrolment),
    Expire(ExpireEnrolment),
});

/// Why an enrolment command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrolmentError {
    /// The input breaks a rule. HTTP 422.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// Started already, for another user or lifetime. HTTP 409.
    #[error("enrolment already exists")]
    AlreadyExists,
    /// No enrolment was started under this id. HTTP 404.
    #[error("enrolment not found")]
    NotFound,
    /// The enrolment expired or its deadline passed. HTTP 410.
    #[error("enrolment expired")]
    Expired,
    /// The enrolment was used already. HTTP 409.
    #[error("enrolment already completed")]
    AlreadyCompleted,
}

impl Classify for EnrolmentError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Invalid(_) => ErrorKind::Invalid,
            Self::AlreadyExists | Self::AlreadyCompleted => ErrorKind::Conflict,
            Self::NotFound => ErrorKind::NotFound,
            Self::Expired => ErrorKind::Gone,
        }
    }
}

/// Where an enrolment is, as callers and read models name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EnrolmentStatus {
    /// Never started.
    NotStarted,
    /// Waiting for a device.
    Pending,
    /// An account was created.
    Completed,
    /// Not used in time.
    Expired,
}

impl EnrolmentStatus {
    /// The snake_case name: `not_started`, `pending`, `completed`, `expired`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NotStarted => "not_started",
            Self::Pending => "pending",
            Self::Completed => "completed",
            Self::Expired => "expired",
        }
    }
}

impl std::fmt::Display for EnrolmentStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The enrolment aggregate's state. Every started state keeps the `enrolment.started` facts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Enrolment {
    /// Nothing in the stream yet.
    #[default]
    NotStarted,
    /// Waiting for a device.
    Pending {
        /// What it was started with.
        started: EnrolmentStarted,
    },
    /// Used: terminal.
    Completed {
        /// What it was started with.
        started: EnrolmentStarted,
        /// The account created.
        account_id: AccountId,
    },
    /// Not used in time: terminal.
    Expired {
        /// What it was started with.
        started: EnrolmentStarted,
    },
}

impl Enrolment {
    /// Where the enrolment is.
    #[must_use]
    pub fn status(&self) -> EnrolmentStatus {
        match self {
            Self::NotStarted => EnrolmentStatus::NotStarted,
            Self::Pending { .. } => EnrolmentStatus::Pending,
            Self::Completed { .. } => EnrolmentStatus::Completed,
            Self::Expired { .. } => EnrolmentStatus::Expired,
        }
    }

    /// The `enrolment.started` facts; `None` before it was started.
    #[must_use]
    pub fn started(&self) -> Option<&EnrolmentStarted> {
        match self {
            Self::NotStarted => None,
            Self::Pending { started }
            | Self::Completed { started, .. }
            | Self::Expired { started } => Some(started),
        }
    }

    /// The deadline to complete; `None` before it was started.
    #[must_use]
    pub fn expires_at(&self) -> Option<Timestamp> {
        self.started().map(|s| s.expires_at)
    }

    fn decide_start(
        &self,
        cmd: StartEnrolment,
        now: Timestamp,
    ) -> Result<Vec<EnrolmentEvent>, EnrolmentError> {
        validate::in_range("ttl_secs", cmd.ttl_secs, MIN_TTL_SECS, MAX_TTL_SECS)?;
        let Some(started) = self.started() else {
            return Ok(vec![EnrolmentEvent::Started(EnrolmentStarted {
                enrolment: cmd.enrolment,
                user: cmd.user,
                ttl_secs: cmd.ttl_secs,
                expires_at: now.plus_secs(cmd.ttl_secs),
            })]);
        };
        if started.enrolment != cmd.enrolment
            || started.user != cmd.user
            || started.ttl_secs != cmd.ttl_secs
        {
            return Err(EnrolmentError::AlreadyExists);
        }
        match self {
            Self::Pending { started } if now < started.expires_at => Ok(Vec::new()),
            Self::Completed { .. } => Err(EnrolmentError::AlreadyCompleted),
            _ => Err(EnrolmentError::Expired),
        }
    }
}

impl Aggregate for Enrolment {
    type Command = EnrolmentCommand;
    type Event = EnrolmentEvent;
    type Error = EnrolmentError;

    fn decide(
        &self,
        command: EnrolmentCommand,
        ctx: &mut Context<'_>,
    ) -> Result<Vec<EnrolmentEvent>, EnrolmentError> {
        let now = ctx.now;
        match command {
            EnrolmentCommand::Start(cmd) => self.decide_start(cmd, now),
            EnrolmentCommand::Complete(cmd) => match self {
                Self::NotStarted => Err(EnrolmentError::NotFound),
                Self::Pending { started } if now < started.expires_at => {
                    Ok(vec![EnrolmentEvent::Completed(EnrolmentCompleted {
                        account_id: cmd.account_id,
                        completed_at: now,
                    })])
                }
                Self::Pending { .. } | Self::Expired { .. } => Err(EnrolmentError::Expired),
                Self::Completed { account_id, .. } if *account_id == cmd.account_id => {
                    Ok(Vec::new())
                }
                Self::Completed { .. } => Err(EnrolmentError::AlreadyCompleted),
            },
            EnrolmentCommand::Expire(ExpireEnrolment) => match self {
                Self::NotStarted => Err(EnrolmentError::NotFound),
                Self::Pending { started } if now >= started.expires_at => {
                    Ok(vec![EnrolmentEvent::Expired(EnrolmentExpired {
                        expired_at: now,
                    })])
                }
                Self::Pending { .. } | Self::Completed { .. } | Self::Expired { .. } => {
                    Ok(Vec::new())
                }
            },
        }
    }

    fn apply(&mut self, event: &EnrolmentEvent) {
        let state = std::mem::take(self);
        *self = match (state, event) {
            (Self::NotStarted, EnrolmentEvent::Started(e)) => Self::Pending { started: e.clone() },
            (Self::Pending { started }, EnrolmentEvent::Completed(e)) => Self::Completed {
                started,
                account_id: e.account_id,
            },
            (Self::Pending { started }, EnrolmentEvent::Expired(_)) => Self::Expired { started },
            // An event that cannot follow the current state changes nothing (see `server`).
            (state, _) => state,
        };
    }
}
