//! What crosses the wire and what outlives it, as pure functions: no I/O, no clock, no RNG.
//! Times are inputs, signing takes the key (ECDSA here is deterministic, RFC 6979), and every
//! decoder of outside bytes answers with a typed error, never a panic.
//!
//! - [`merkle`]: the RFC 9162 audit tree: hashing, node addressing, proofs over stored nodes,
//!   the incremental builder, proof verification.
//! - [`cose`]: COSE_Sign1 with ES256, the only signature format we emit or accept.
//! - [`checkpoint`]: signed tree heads, and proofs checked against them.
//! - [`qr`]: the versioned CBOR payload of login and enrolment QR codes and deep links.
//! - [`device`]: the messages between devices and the device gateway, with their limits.
//! - [`channel`]: the Noise `IK` channel those messages travel in, and its framing.
//! - [`sfs`]: the messages between an app and its second-factor server (same channel, its own
//!   prologue).
//! - [`mc`]: the messages between an app and the Message Center (same channel, its own
//!   prologue): registering a mailbox, updating the push token, pulling and acknowledging.
//! - [`push`]: the push envelope, HPKE-sealed (RFC 9180, auth mode) by the server to an
//!   account's push key, that the Message Center, FCM and APNs carry unread.
//! - [`data_service`]: the request the NS posts to a server's Data Service, signed with HTTP
//!   Message Signatures (RFC 9421, ES256) under the server's key, and its verifier.
//! - [`attestation`]: the second-factor server's signed statement that a factor was verified,
//!   and the checks a verifier runs on it.
//! - [`evidence`]: the non-repudiation evidence bundle of a signed transaction, the device's
//!   signed payload, and the offline verifier (`docs/evidence.md`).

pub mod attestation;
pub mod cbor;
pub mod channel;
pub mod checkpoint;
pub mod cose;
pub mod data_service;
pub mod device;
pub mod evidence;
pub mod mc;
pub mod merkle;
pub mod push;
pub mod qr;
pub mod sfs;

pub use checkpoint::{
    CheckpointError, TreeHead, sign_checkpoint, verify_checkpoint,
    verify_consistency_between_checkpoints, verify_inclusion_against_checkpoint,
};
pub use cose::{CoseError, Verified, sign1_es256, verify_sign1_es256};
pub use merkle::{Hash, NodeId, NodeSource, ProofError};
