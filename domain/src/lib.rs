//! countersign's domain: ids, event types, and the aggregates' decisions. Pure: no I/O, no
//! clock, no RNG; time and random bytes are inputs, so every decision replays identically.
//!
//! Modules and what each owns:
//! - [`cbor`]: deterministic CBOR (RFC 8949 §4.2.1), the byte form of every event payload and
//!   hence of the audit trail's leaves.
//! - [`ids`]: identifiers, [`Timestamp`], [`Userid`] rules and stream names; personal data never
//!   appears in a stream name.
//! - [`seal`]: crypto-shredding: personal data in events is AES-256-GCM sealed under a per-user
//!   [`DataKey`] bound to its stream and field.
//! - [`event`]: [`DomainEvent`] (stable type names + versions, payload codec, upcasting) and
//!   [`AnyEvent`] over all aggregates.
//! - [`aggregate`]: the decide/apply contract ([`Aggregate`], [`Context`]) and error classes.
//! - [`validate`]: caller-input rules shared by aggregates.
//! - Aggregates, one module each with its state, commands, events and rules, decide/apply
//!   implemented: [`server`], [`user`], [`account`], [`enrolment`], [`session`],
//!   [`second_factor`] (the SFS's, per app instance), [`transaction`].

pub mod account;
pub mod aggregate;
pub mod attestation;
/// Deterministic CBOR lives in `protocol`, the bottom layer, so checkpoints and evidence use
/// the same encoder as event payloads.
pub use countersign_protocol::cbor;
pub mod enrolment;
pub mod event;
pub mod grant;
pub mod ids;
pub mod seal;
pub mod second_factor;
pub mod server;
pub mod session;
pub mod transaction;
pub mod user;
pub mod validate;

#[cfg(test)]
mod testing;

pub use account::Account;
pub use aggregate::{Aggregate, Classify, Context, ErrorKind};
pub use cbor::CborError;
pub use enrolment::Enrolment;
pub use event::{AnyEvent, DomainEvent, EventDecodeError};
pub use ids::{
    AccountId, AccountRef, ApiKeyId, AppInstanceId, Clock, EnrolmentId, EnrolmentRef, FixedClock,
    GrantId, GrantRef, Hsid, OidcClientId, ServerId, SessionRef, Timestamp, TransactionId,
    TransactionRef, UserDigest, UserDigestKey, UserDigestScheme, UserRef, Userid, UseridError,
};
pub use seal::{CounterSealer, DataKey, SealError, Sealed, Sealer};
pub use second_factor::SecondFactor;
pub use server::Server;
pub use session::Session;
pub use user::User;
