//! Events of the enrolment aggregate (stream `enrolment-{server id}-{enrolment id}`).
//!
//! An enrolment links a new account to a user through a QR code or deep link that expires.
//! `enrolment.started` carries the expiry so readers never recompute it.

use serde::{Deserialize, Serialize};

use crate::ids::{AccountId, EnrolmentRef, Timestamp, UserDigest};

/// `enrolment.started` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolmentStarted {
    /// Tenant and enrolment id.
    pub enrolment: EnrolmentRef,
    /// The user the new account will belong to.
    pub user: UserDigest,
    /// The lifetime asked for, seconds (60..=604800); a retried start compares it.
    pub ttl_secs: u32,
    /// `started at + ttl`: from this instant the enrolment can no longer complete.
    pub expires_at: Timestamp,
}

/// `enrolment.completed` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolmentCompleted {
    /// The account created.
    pub account_id: AccountId,
    /// When.
    pub completed_at: Timestamp,
}

/// `enrolment.expired` v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolmentExpired {
    /// When it was found expired.
    pub expired_at: Timestamp,
}

crate::domain_events! {
    /// Everything that happens to an enrolment.
    pub enum EnrolmentEvent {
        Started(EnrolmentStarted) = ("enrolment.started", 1),
        Completed(EnrolmentCompleted) = ("enrolment.completed", 1),
        Expired(EnrolmentExpired) = ("enrolment.expired", 1),
    }
}
