//! The transaction aggregate: exact bytes a user approves (or declines) on a device, after a
//! fresh second factor.
//!
//! States ([`Transaction`]) and the commands that move between them:
//!
//! ```text
//! NotCreated --CreateTransaction--> Pending --PresentTransaction--> Presented
//! Pending | Presented --SignTransaction--> Signed
//! Pending | Presented --RejectTransaction--> Rejected
//! Pending | Presented --ExpireTransaction (deadline passed)--> Expired
//! NotCreated --CreateSignedTransaction (the app's own)--> Signed
//! ```
//!
//! `Signed`, `Rejected` and `Expired` are terminal.
//!
//! Rules enforced by [`Transaction::decide`]:
//! - creating: data 0..=64 KiB; content type 1..=255 bytes of printable ASCII with no space;
//!   text 1..=16 KiB of UTF-8 with no control character but `\n`; announce info at most 1000
//!   characters; timeout 30..=86400 s; `expires_at = now + timeout`. Creating it again with
//!   the same request emits nothing (an idempotent retry); with another request it is
//!   [`TransactionError::AlreadyExists`].
//! - who: only an account of the transaction's user, and only the named account when the
//!   creator named one ([`TransactionError::NotAllowed`]).
//! - signing binds exactly what was created: the signed data and text hashes must be the
//!   transaction's ([`TransactionError::Mismatch`]); the gateway has verified the device's
//!   signature and the SFS attestation before it asks. Signing the same way again emits
//!   nothing (a device retry); anything else on a terminal transaction is
//!   [`TransactionError::Ended`].
//! - deadlines: signing, presenting or rejecting at or after `expires_at` is
//!   [`TransactionError::Expired`]; recording the expiry is [`ExpireTransaction`]'s job (the
//!   edge's sweeper, or a read that finds it passed). Expiring before the deadline emits
//!   nothing.
//! - any command but creation on a transaction never created is [`TransactionError::NotFound`].

mod events;
#[cfg(test)]
mod tests;

pub use events::*;

use sha2::{Digest as _, Sha256};

use crate::aggregate::{Aggregate, Classify, Context, ErrorKind};
use crate::ids::{AccountId, Timestamp, TransactionRef, UserDigest};
use crate::second_factor::SecondFactorKind;
use crate::server::into_command;
use crate::validate::{self, ValidationError};

/// Largest transaction data, in bytes.
pub const MAX_DATA_BYTES: usize = 64 * 1024;
/// Longest text shown to the user, in bytes of UTF-8.
pub const MAX_TEXT_BYTES: usize = 16 * 1024;
/// Longest content type, in bytes.
pub const MAX_CONTENT_TYPE_BYTES: usize = 255;
/// Longest announce info, in characters.
pub const ANNOUNCE_MAX_CHARS: usize = 1000;
/// Shortest time to sign, seconds.
pub const MIN_TIMEOUT_SECS: u32 = 30;
/// Longest time to sign, seconds (a day).
pub const MAX_TIMEOUT_SECS: u32 = 86_400;
/// Time to sign when the creator gives none, seconds.
pub const DEFAULT_TIMEOUT_SECS: u32 = 300;

/// What a transaction asks the user to approve; the same for both origins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionRequest {
    /// Tenant and transaction id.
    pub transaction: TransactionRef,
    /// The user who must sign.
    pub user: UserDigest,
    /// The one account that may sign, if the creator names one.
    pub account_id: Option<AccountId>,
    /// The bytes to sign.
    pub data: Vec<u8>,
    /// Media type of `data`.
    pub content_type: String,
    /// The text shown to the user.
    pub text: String,
    /// Shown before the text (push, list), optional.
    pub announce_info: Option<String>,
    /// Seconds the user has to sign.
    pub timeout_secs: u32,
}

/// Create a transaction (the business API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateTransaction(pub TransactionRequest);

/// An account's device fetched the transaction to show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresentTransaction {
    /// The account.
    pub account_id: AccountId,
    /// Its user.
    pub user: UserDigest,
}

/// What the gateway verified of a device's signature, to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// The signing account.
    pub account_id: AccountId,
    /// Its user.
    pub user: UserDigest,
    /// The data hash the device signed.
    pub data_hash: [u8; 32],
    /// The text hash the device signed.
    pub text_hash: [u8; 32],
    /// The device's COSE_Sign1.
    pub device_signature: Vec<u8>,
    /// The SFS attestation it signed the hash of.
    pub attestation: Vec<u8>,
    /// The factor attested.
    pub factor: SecondFactorKind,
    /// The device's clock when it signed.
    pub device_time: Timestamp,
}

/// Record a verified signature of a pending transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignTransaction(pub Signature);

/// Record the app's own transaction together with its signature (SDK-initiated: stored only
/// once signed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateSignedTransaction {
    /// What was approved; `account_id` must be the signer.
    pub request: TransactionRequest,
    /// The verified signature.
    pub signature: Signature,
}

/// The user declined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RejectTransaction {
    /// The account.
    pub account_id: AccountId,
    /// Its user.
    pub user: UserDigest,
}

/// Record that the deadline passed (nothing before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpireTransaction;

/// Everything that can be asked of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransactionCommand {
    /// See [`CreateTransaction`].
    Create(CreateTransaction),
    /// See [`PresentTransaction`].
    Present(PresentTransaction),
    /// See [`SignTransaction`].
    Sign(SignTransaction),
    /// See [`CreateSignedTransaction`].
    CreateSigned(CreateSignedTransaction),
    /// See [`RejectTransaction`].
    Reject(RejectTransaction),
    /// See [`ExpireTransaction`].
    Expire(ExpireTransaction),
}

into_command!(TransactionCommand {
    Create(CreateTransaction),
    Present(PresentTransaction),
    Sign(SignTransaction),
    CreateSigned(CreateSignedTransaction),
    Reject(RejectTransaction),
    Expire(ExpireTransaction),
});

/// Why a transaction command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransactionError {
    /// The input breaks a rule. HTTP 422.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// Created already with another request. HTTP 409.
    #[error("a different transaction with this id exists")]
    AlreadyExists,
    /// Never created. HTTP 404.
    #[error("transaction not found")]
    NotFound,
    /// This account may not act on it (another user's, or not the named account). HTTP 422.
    #[error("this account may not sign this transaction")]
    NotAllowed,
    /// The signature is over other data or another text than the transaction's. HTTP 422.
    #[error("the signature is over another {0} than the transaction's")]
    Mismatch(&'static str),
    /// Past its deadline. HTTP 410.
    #[error("transaction expired")]
    Expired,
    /// Signed, rejected or expired already. HTTP 410.
    #[error("transaction ended ({status})")]
    Ended {
        /// Where it ended.
        status: TransactionStatus,
    },
}

impl Classify for TransactionError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Invalid(_) | Self::NotAllowed | Self::Mismatch(_) => ErrorKind::Invalid,
            Self::AlreadyExists => ErrorKind::Conflict,
            Self::NotFound => ErrorKind::NotFound,
            Self::Expired | Self::Ended { .. } => ErrorKind::Gone,
        }
    }
}

/// Where a transaction is, as the API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransactionStatus {
    /// Never created.
    NotCreated,
    /// Waiting for a device.
    Pending,
    /// A device is showing it.
    Presented,
    /// Approved: terminal.
    Signed,
    /// Declined: terminal.
    Rejected,
    /// Not signed in time: terminal.
    Expired,
}

impl TransactionStatus {
    /// The name in the API and the read model.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NotCreated => "not_created",
            Self::Pending => "pending",
            Self::Presented => "presented",
            Self::Signed => "signed",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
        }
    }

    /// Terminal: nothing more happens to the transaction.
    #[must_use]
    pub const fn is_ended(self) -> bool {
        matches!(self, Self::Signed | Self::Rejected | Self::Expired)
    }
}

impl std::fmt::Display for TransactionStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The transaction aggregate's state; every created state keeps the `transaction.created`
/// facts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Transaction {
    /// Nothing in the stream yet.
    #[default]
    NotCreated,
    /// Waiting for a device.
    Pending {
        /// What was created.
        created: Box<TransactionCreated>,
    },
    /// Shown on a device (the last account that fetched it).
    Presented {
        /// What was created.
        created: Box<TransactionCreated>,
        /// The account.
        account_id: AccountId,
    },
    /// Approved.
    Signed {
        /// What was created.
        created: Box<TransactionCreated>,
        /// The signature.
        signed: Box<TransactionSigned>,
    },
    /// Declined.
    Rejected {
        /// What was created.
        created: Box<TransactionCreated>,
        /// By whom.
        account_id: AccountId,
    },
    /// Not signed in time.
    Expired {
        /// What was created.
        created: Box<TransactionCreated>,
    },
}

impl Transaction {
    /// Where it is.
    #[must_use]
    pub const fn status(&self) -> TransactionStatus {
        match self {
            Self::NotCreated => TransactionStatus::NotCreated,
            Self::Pending { .. } => TransactionStatus::Pending,
            Self::Presented { .. } => TransactionStatus::Presented,
            Self::Signed { .. } => TransactionStatus::Signed,
            Self::Rejected { .. } => TransactionStatus::Rejected,
            Self::Expired { .. } => TransactionStatus::Expired,
        }
    }

    /// The `transaction.created` facts; `None` before it was created.
    #[must_use]
    pub fn created(&self) -> Option<&TransactionCreated> {
        match self {
            Self::NotCreated => None,
            Self::Pending { created }
            | Self::Presented { created, .. }
            | Self::Signed { created, .. }
            | Self::Rejected { created, .. }
            | Self::Expired { created } => Some(created),
        }
    }

    /// The signature, once signed.
    #[must_use]
    pub fn signed(&self) -> Option<&TransactionSigned> {
        match self {
            Self::Signed { signed, .. } => Some(signed),
            _ => None,
        }
    }

    /// Whether `account_id` of `user` may act on this transaction.
    #[must_use]
    pub fn allows(&self, account_id: AccountId, user: UserDigest) -> bool {
        self.created()
            .is_some_and(|c| c.user == user && c.account_id.is_none_or(|named| named == account_id))
    }

    /// The created facts of a transaction this account may act on now: it exists
    /// ([`TransactionError::NotFound`]), the account is allowed ([`TransactionError::NotAllowed`]),
    /// it has not ended ([`TransactionError::Ended`]) and its deadline has not passed
    /// ([`TransactionError::Expired`]), checked in that order. The edge asks this before work
    /// that must not happen for a refused command (spending an attestation).
    ///
    /// # Errors
    /// The first rule broken.
    pub fn live(
        &self,
        account_id: AccountId,
        user: UserDigest,
        now: Timestamp,
    ) -> Result<&TransactionCreated, TransactionError> {
        let created = self.created().ok_or(TransactionError::NotFound)?;
        if !self.allows(account_id, user) {
            return Err(TransactionError::NotAllowed);
        }
        let status = self.status();
        if status.is_ended() {
            return Err(TransactionError::Ended { status });
        }
        if now >= created.expires_at {
            return Err(TransactionError::Expired);
        }
        Ok(created)
    }
}

/// The `transaction.created` event a request makes at `now`, after checking its rules.
fn created_event(
    request: TransactionRequest,
    origin: TransactionOrigin,
    now: Timestamp,
) -> Result<TransactionCreated, TransactionError> {
    if request.data.len() > MAX_DATA_BYTES {
        return Err(ValidationError::TooLong {
            field: "data",
            max: MAX_DATA_BYTES,
            actual: request.data.len(),
            unit: "bytes",
        }
        .into());
    }
    content_type(&request.content_type)?;
    if request.text.is_empty() {
        return Err(ValidationError::Empty { field: "text" }.into());
    }
    if request.text.len() > MAX_TEXT_BYTES {
        return Err(ValidationError::TooLong {
            field: "text",
            max: MAX_TEXT_BYTES,
            actual: request.text.len(),
            unit: "bytes",
        }
        .into());
    }
    validate::multiline_text("text", &request.text, usize::MAX)?;
    if let Some(info) = &request.announce_info {
        validate::multiline_text("announce_info", info, ANNOUNCE_MAX_CHARS)?;
    }
    validate::in_range(
        "timeout_secs",
        request.timeout_secs,
        MIN_TIMEOUT_SECS,
        MAX_TIMEOUT_SECS,
    )?;
    Ok(TransactionCreated {
        transaction: request.transaction,
        user: request.user,
        account_id: request.account_id,
        data_hash: Sha256::digest(&request.data).into(),
        text_hash: Sha256::digest(request.text.as_bytes()).into(),
        data: request.data,
        content_type: request.content_type,
        text: request.text,
        announce_info: request.announce_info,
        created_at: now,
        expires_at: now.plus_secs(request.timeout_secs),
        origin,
    })
}

/// A media type as the API accepts it: 1..=255 bytes of printable ASCII, no space.
fn content_type(value: &str) -> Result<(), ValidationError> {
    let field = "content_type";
    if value.is_empty() {
        return Err(ValidationError::Empty { field });
    }
    if value.len() > MAX_CONTENT_TYPE_BYTES {
        return Err(ValidationError::TooLong {
            field,
            max: MAX_CONTENT_TYPE_BYTES,
            actual: value.len(),
            unit: "bytes",
        });
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ValidationError::Charset {
            field,
            allowed: "printable ASCII without spaces",
        });
    }
    Ok(())
}

/// The `transaction.signed` event for a verified signature of `created`.
fn signed_event(
    created: &TransactionCreated,
    signature: Signature,
    now: Timestamp,
) -> Result<TransactionSigned, TransactionError> {
    if signature.data_hash != created.data_hash {
        return Err(TransactionError::Mismatch("data"));
    }
    if signature.text_hash != created.text_hash {
        return Err(TransactionError::Mismatch("text"));
    }
    Ok(TransactionSigned {
        account_id: signature.account_id,
        data_hash: created.data_hash,
        text_hash: created.text_hash,
        content_type: created.content_type.clone(),
        created_at: created.created_at,
        expires_at: created.expires_at,
        device_signature: signature.device_signature,
        attestation: signature.attestation,
        factor: signature.factor,
        device_time: signature.device_time,
        signed_at: now,
    })
}

/// Whether `created` is what `request` would create (the creation instant aside).
fn same_request(created: &TransactionCreated, request: &TransactionRequest) -> bool {
    created.transaction == request.transaction
        && created.user == request.user
        && created.account_id == request.account_id
        && created.data == request.data
        && created.content_type == request.content_type
        && created.text == request.text
        && created.announce_info == request.announce_info
        && created.expires_at.as_millis() - created.created_at.as_millis()
            == i64::from(request.timeout_secs) * 1000
}

impl Aggregate for Transaction {
    type Command = TransactionCommand;
    type Event = TransactionEvent;
    type Error = TransactionError;

    fn decide(
        &self,
        command: TransactionCommand,
        ctx: &mut Context<'_>,
    ) -> Result<Vec<TransactionEvent>, TransactionError> {
        let now = ctx.now;
        match command {
            TransactionCommand::Create(CreateTransaction(request)) => match self.created() {
                None => Ok(vec![TransactionEvent::Created(created_event(
                    request,
                    TransactionOrigin::Api,
                    now,
                )?)]),
                Some(created) if same_request(created, &request) => Ok(Vec::new()),
                Some(_) => Err(TransactionError::AlreadyExists),
            },
            TransactionCommand::CreateSigned(CreateSignedTransaction { request, signature }) => {
                if let Some(signed) = self.signed()
                    && self.created().is_some_and(|c| same_request(c, &request))
                    && signed.device_signature == signature.device_signature
                {
                    return Ok(Vec::new());
                }
                if self.created().is_some() {
                    return Err(TransactionError::AlreadyExists);
                }
                if request.account_id != Some(signature.account_id)
                    || request.user != signature.user
                {
                    return Err(TransactionError::NotAllowed);
                }
                let created = created_event(request, TransactionOrigin::Device, now)?;
                let signed = signed_event(&created, signature, now)?;
                Ok(vec![
                    TransactionEvent::Created(created),
                    TransactionEvent::Signed(signed),
                ])
            }
            TransactionCommand::Present(PresentTransaction { account_id, user }) => {
                self.live(account_id, user, now)?;
                match self {
                    Self::Presented {
                        account_id: shown, ..
                    } if *shown == account_id => Ok(Vec::new()),
                    _ => Ok(vec![TransactionEvent::Presented(TransactionPresented {
                        account_id,
                        presented_at: now,
                    })]),
                }
            }
            TransactionCommand::Sign(SignTransaction(signature)) => {
                if let Some(signed) = self.signed()
                    && signed.account_id == signature.account_id
                    && signed.device_signature == signature.device_signature
                    && signed.attestation == signature.attestation
                {
                    return Ok(Vec::new());
                }
                let created = self.live(signature.account_id, signature.user, now)?;
                Ok(vec![TransactionEvent::Signed(signed_event(
                    created, signature, now,
                )?)])
            }
            TransactionCommand::Reject(RejectTransaction { account_id, user }) => {
                if let Self::Rejected { account_id: by, .. } = self
                    && *by == account_id
                {
                    return Ok(Vec::new());
                }
                self.live(account_id, user, now)?;
                Ok(vec![TransactionEvent::Rejected(TransactionRejected {
                    account_id,
                    rejected_at: now,
                })])
            }
            TransactionCommand::Expire(ExpireTransaction) => {
                let created = self.created().ok_or(TransactionError::NotFound)?;
                if self.status().is_ended() || now < created.expires_at {
                    return Ok(Vec::new());
                }
                Ok(vec![TransactionEvent::Expired(TransactionExpired {
                    expired_at: now,
                })])
            }
        }
    }

    fn apply(&mut self, event: &TransactionEvent) {
        let created = match std::mem::take(self) {
            Self::NotCreated => None,
            Self::Pending { created }
            | Self::Presented { created, .. }
            | Self::Signed { created, .. }
            | Self::Rejected { created, .. }
            | Self::Expired { created } => Some(created),
        };
        *self = match (event, created) {
            (TransactionEvent::Created(c), _) => Self::Pending {
                created: Box::new(c.clone()),
            },
            (TransactionEvent::Presented(p), Some(created)) => Self::Presented {
                created,
                account_id: p.account_id,
            },
            (TransactionEvent::Signed(s), Some(created)) => Self::Signed {
                created,
                signed: Box::new(s.clone()),
            },
            (TransactionEvent::Rejected(r), Some(created)) => Self::Rejected {
                created,
                account_id: r.account_id,
            },
            (TransactionEvent::Expired(_), Some(created)) => Self::Expired { created },
            // An event before any creation cannot have been decided; history is kept as it is.
            (_, None) => Self::NotCreated,
        };
    }
}
