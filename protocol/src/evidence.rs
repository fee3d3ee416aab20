//! The evidence bundle (`docs/evidence.md`): one CBOR file per signed transaction that proves,
//! offline and years later, that the holder of an enrolled account key signed exactly this data
//! and text after a fresh second factor, and that the server recorded it in its audit trail.
//!
//! This module owns the byte formats (the device's signed payload, the bundle) and the offline
//! verifier. Rules it enforces:
//! - Every structure is deterministic CBOR (RFC 8949 §4.2.1) and decoding is strict: bytes that
//!   do not re-encode to themselves, unknown keys, a version other than 1, or a field over its
//!   limit are refused before anything is hashed or verified.
//! - [`verify_evidence`] runs its checks in the documented order and answers the first that
//!   fails, each with its own [`EvidenceError`] variant. Nothing the bundle claims is trusted
//!   until a check has tied it to the audit key or to the enrolled account key.
//! - The attestation's freshness is judged at the device time of the signature, never at the
//!   verifier's clock: evidence is verified long after the attestation expired.

use std::collections::BTreeMap;

use p256::ecdsa::{SigningKey, VerifyingKey};
use p256::elliptic_curve::sec1::ToSec1Point as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::attestation::{self, AttestationError, Factor};
use crate::cbor::{self, Value};
use crate::checkpoint::{self, CheckpointError, TreeHead};
use crate::cose::{self, ContentType, CoseError, ProtectedFields};
use crate::device::Bytes;
use crate::merkle::{self, ProofError};

/// The only bundle version this verifier reads and writes.
pub const EVIDENCE_VERSION: u64 = 1;
/// Content type (COSE header 3) of the device's signature over a transaction.
pub const SIGNED_TRANSACTION_CONTENT_TYPE: &str = "application/countersign-signed-transaction+cbor";
/// Domain separation prefix of the transaction challenge (followed by one 0x00 byte).
pub const TRANSACTION_CHALLENGE_CONTEXT: &[u8] = b"countersign/transaction-challenge/v1";
/// Event type and schema version of the enrolment event a bundle carries.
pub const ENROLMENT_EVENT_TYPE: (&str, u16) = ("account.registered", 1);
/// Event type and schema version of the signing event a bundle carries.
pub const SIGNED_EVENT_TYPE: (&str, u16) = ("transaction.signed", 1);
/// Event type and schema version of a key rotation a bundle carries.
pub const KEY_ROTATED_EVENT_TYPE: (&str, u16) = ("account.key_rotated", 1);
/// The key role (`account.key_rotated`'s `role`) whose rotations a bundle carries.
pub const SIGNING_KEY_ROLE: &str = "signing";

/// Largest bundle accepted, in bytes.
pub const MAX_EVIDENCE_BYTES: usize = 512 * 1024;
/// Largest transaction data, in bytes.
pub const MAX_DATA_BYTES: usize = 64 * 1024;
/// Longest transaction text shown to the user, in bytes of UTF-8.
pub const MAX_TEXT_BYTES: usize = 16 * 1024;
/// Longest content type of the data, in bytes.
pub const MAX_CONTENT_TYPE_BYTES: usize = 255;
/// Most entries of `device_data`.
pub const MAX_DEVICE_DATA_ENTRIES: usize = 32;
/// Longest `device_data` key, in bytes (a key has at least 1).
pub const MAX_DEVICE_DATA_KEY_BYTES: usize = 64;
/// Longest `device_data` value, in bytes.
pub const MAX_DEVICE_DATA_VALUE_BYTES: usize = 1024;
/// Largest `client_data`, in bytes.
pub const MAX_CLIENT_DATA_BYTES: usize = 4 * 1024;
/// Largest device signature, attestation or checkpoint (each a COSE_Sign1), in bytes.
pub const MAX_COSE_BYTES: usize = 16 * 1024;
/// Largest canonical event (enrolment or signing), in bytes.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;
/// Most hashes in an inclusion proof (a tree of 2^64 leaves needs 64).
pub const MAX_PROOF_HASHES: usize = 64;
/// Most signing-key rotations a bundle carries (`account.key_rotations`).
pub const MAX_KEY_ROTATIONS: usize = 64;
/// How far a checkpoint may be ahead of the verifier's clock, when a clock is given.
pub const CLOCK_SKEW_MS: i64 = 5_000;

/// What the device signs: the payload of its COSE_Sign1, a deterministic CBOR map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedTransaction {
    /// The transaction, as the server issued it.
    pub transaction_id: Bytes<16>,
    /// The tenant (virtual server).
    pub server_id: Bytes<16>,
    /// SHA-256 of the transaction data.
    pub data_hash: Bytes<32>,
    /// SHA-256 of the UTF-8 text shown to the user.
    pub text_hash: Bytes<32>,
    /// SHA-256 of the SFS attestation's bytes.
    pub attestation_hash: Bytes<32>,
    /// The device's clock when it signed, milliseconds since the Unix epoch.
    pub device_time_ms: i64,
    /// What the device says about itself (model, OS, app version); at most 32 entries.
    pub device_data: BTreeMap<String, String>,
    /// Opaque data of the integrating app, at most 4 KiB; `null` when there is none.
    #[serde(with = "serde_bytes")]
    pub client_data: Option<Vec<u8>>,
}

/// The transaction request as the business system made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransactionRequest {
    /// Issued by the server.
    pub transaction_id: Bytes<16>,
    /// The tenant.
    pub server_id: Bytes<16>,
    /// The data that was signed (by its hash).
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// Media type of `data`; proven by the signing event (check 10).
    pub content_type: String,
    /// The text shown to the user (signed by its hash).
    pub text: String,
    /// When the transaction was created; proven by the signing event (check 10).
    pub created_at_ms: i64,
    /// When it would have expired; proven by the signing event (check 10).
    pub expires_at_ms: i64,
}

/// The signing account and the proof that its key was enrolled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountProof {
    /// The account.
    pub account_id: Bytes<16>,
    /// SEC1 uncompressed P-256 signing key (0x04 ‖ x ‖ y).
    pub signing_public_key: Bytes<65>,
    /// Canonical bytes of the `account.registered` event, as the audit tree hashed them.
    #[serde(with = "serde_bytes")]
    pub enrolment_event: Vec<u8>,
    /// Its position in the log (its leaf index).
    pub enrolment_position: u64,
    /// Its RFC 9162 inclusion proof against the bundle's checkpoint.
    pub enrolment_proof: Vec<Bytes<32>>,
    /// The account's signing-key rotations before the signature, oldest first: the chain from
    /// the enrolled key to `signing_public_key`. Empty (and then absent from the CBOR, so a
    /// bundle of a never-rotated account is unchanged) when the enrolled key signed; an
    /// explicitly empty list is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_rotations: Vec<KeyRotationProof>,
}

/// One `account.key_rotated` event of the signing account and its proof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRotationProof {
    /// Canonical bytes of the event, as the audit tree hashed them.
    #[serde(with = "serde_bytes")]
    pub event: Vec<u8>,
    /// Its position in the log (its leaf index).
    pub position: u64,
    /// Its RFC 9162 inclusion proof against the bundle's checkpoint.
    pub proof: Vec<Bytes<32>>,
}

/// A whole evidence bundle (layout in `docs/evidence.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evidence {
    /// Always [`EVIDENCE_VERSION`].
    pub version: u64,
    /// The request.
    pub transaction: TransactionRequest,
    /// The device's COSE_Sign1 over a [`SignedTransaction`].
    #[serde(with = "serde_bytes")]
    pub device_signature: Vec<u8>,
    /// The SFS's COSE_Sign1 attestation.
    #[serde(with = "serde_bytes")]
    pub attestation: Vec<u8>,
    /// The account and its enrolment.
    pub account: AccountProof,
    /// Canonical bytes of the `transaction.signed` event.
    #[serde(with = "serde_bytes")]
    pub signed_event: Vec<u8>,
    /// Its position in the log.
    pub signed_position: u64,
    /// Its inclusion proof against the checkpoint.
    pub inclusion_proof: Vec<Bytes<32>>,
    /// The signed tree head both proofs lead to.
    #[serde(with = "serde_bytes")]
    pub checkpoint: Vec<u8>,
}

/// What a bundle proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedEvidence {
    /// The transaction.
    pub transaction_id: [u8; 16],
    /// The tenant.
    pub server_id: [u8; 16],
    /// The account whose enrolled key signed.
    pub account_id: [u8; 16],
    /// The second factor the SFS attested.
    pub factor: Factor,
    /// The app instance the account was enrolled from, on which the SFS attested the factor.
    pub app_instance: [u8; 16],
    /// The device's clock at signing.
    pub device_time_ms: i64,
    /// Position of the signing event in the log.
    pub signed_position: u64,
    /// The checkpoint both events are included in (origin, size, root, timestamp).
    pub checkpoint: TreeHead,
}

/// Why a bundle (or a device signature) was refused. All mean "not proven": the bundle's
/// fault, never the verifier's; the variant names the first check that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvidenceError {
    /// Decoding: larger than [`MAX_EVIDENCE_BYTES`].
    #[error("evidence bundle larger than {MAX_EVIDENCE_BYTES} bytes")]
    TooLarge,
    /// Decoding: not deterministic CBOR (the bytes do not re-encode to themselves).
    #[error("{0} is not deterministic CBOR")]
    NotDeterministic(&'static str),
    /// Decoding: a version this verifier does not know.
    #[error("unsupported evidence version {0}")]
    UnsupportedVersion(String),
    /// Decoding: not the documented structure.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// Which structure.
        what: &'static str,
        /// The shape problem (never content).
        reason: String,
    },
    /// Decoding or signing: a field over its limit.
    #[error("{0} exceeds its limit")]
    Limit(&'static str),
    /// Check 1: the checkpoint does not verify under the audit key.
    #[error("checkpoint: {0}")]
    Checkpoint(CheckpointError),
    /// Check 1: the checkpoint is dated after the verifier's clock (plus skew).
    #[error("the checkpoint is dated in the future")]
    CheckpointInFuture,
    /// Check 2: the signing event is not at its position in the checkpoint's tree.
    #[error("the signing event is not included: {0}")]
    SignedEventNotIncluded(ProofError),
    /// Check 3: the enrolment event is not at its position in the checkpoint's tree.
    #[error("the enrolment event is not included: {0}")]
    EnrolmentNotIncluded(ProofError),
    /// Check 4: the enrolment event is not this account's `account.registered` v1 event, at
    /// its position, before the signing event.
    #[error("enrolment event: {0}")]
    EnrolmentEvent(&'static str),
    /// Check 3: a key rotation event is not at its position in the checkpoint's tree.
    #[error("key rotation {link} is not included: {error}")]
    KeyRotationNotIncluded {
        /// Its index in `account.key_rotations`.
        link: usize,
        /// Why its proof failed.
        error: ProofError,
    },
    /// Check 4: a key rotation is not this account's `account.key_rotated` v1 of its signing
    /// key, at its position, after the previous link and before the signing event.
    #[error("key rotation {link}: {reason}")]
    KeyRotation {
        /// Its index in `account.key_rotations`.
        link: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Check 4: the key the enrolment and its rotations end at is not the bundle's account key.
    #[error("the account key is not the enrolled one")]
    AccountKeyNotEnrolled,
    /// Check 4: the account key is not a P-256 point.
    #[error("the account key is not a valid P-256 public key")]
    InvalidAccountKey,
    /// Check 5: the device signature is not an acceptable ES256 COSE_Sign1.
    #[error("device signature: {0}")]
    DeviceSignature(CoseError),
    /// Check 5: the device signature does not verify under the account key.
    #[error("the device signature does not verify under the account key")]
    BadDeviceSignature,
    /// Check 5: signed, but not a signed transaction (content type or kid).
    #[error("the device signature is not a signed transaction of this key: {0}")]
    NotASignedTransaction(&'static str),
    /// Check 6: the data is not the data signed.
    #[error("the data does not match the signed hash")]
    DataMismatch,
    /// Check 6: the text is not the text signed.
    #[error("the text does not match the signed hash")]
    TextMismatch,
    /// Check 7: the signature is for another transaction or server.
    #[error("the device signature is for another transaction")]
    TransactionMismatch,
    /// Check 8: the attestation is refused (untrusted key, other challenge or account key,
    /// not valid at the device time).
    #[error("attestation: {0}")]
    Attestation(AttestationError),
    /// Check 8: the attestation is for another app instance than the one the account was
    /// enrolled from.
    #[error("the attestation is for another app instance than the enrolled one")]
    AppInstanceMismatch,
    /// Check 9: the device signed another attestation.
    #[error("the device signed another attestation")]
    AttestationHashMismatch,
    /// Check 10: the signing event is not `transaction.signed` v1 of this transaction, at its
    /// position, carrying this account, signature and attestation.
    #[error("signing event: {0}")]
    SignedEvent(&'static str),
}

/// The challenge an attestation for a transaction binds:
/// `SHA-256(context ‖ 0x00 ‖ server_id ‖ transaction_id ‖ SHA-256(data) ‖ SHA-256(text))`.
#[must_use]
pub fn transaction_challenge(
    server_id: &[u8; 16],
    transaction_id: &[u8; 16],
    data_hash: &[u8; 32],
    text_hash: &[u8; 32],
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(TRANSACTION_CHALLENGE_CONTEXT);
    h.update([0u8]);
    h.update(server_id);
    h.update(transaction_id);
    h.update(data_hash);
    h.update(text_hash);
    h.finalize().into()
}

/// SHA-256 of an account's SEC1 uncompressed signing key: the attestation's account key
/// thumbprint and the device signature's `kid`.
#[must_use]
pub fn account_key_thumbprint(key: &VerifyingKey) -> [u8; 32] {
    Sha256::digest(key.as_affine().to_sec1_point(false).as_bytes()).into()
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl SignedTransaction {
    fn check_limits(&self) -> Result<(), EvidenceError> {
        if self.device_data.len() > MAX_DEVICE_DATA_ENTRIES {
            return Err(EvidenceError::Limit("device_data entries"));
        }
        for (k, v) in &self.device_data {
            if k.is_empty() || k.len() > MAX_DEVICE_DATA_KEY_BYTES {
                return Err(EvidenceError::Limit("device_data key"));
            }
            if v.len() > MAX_DEVICE_DATA_VALUE_BYTES {
                return Err(EvidenceError::Limit("device_data value"));
            }
        }
        if self
            .client_data
            .as_ref()
            .is_some_and(|c| c.len() > MAX_CLIENT_DATA_BYTES)
        {
            return Err(EvidenceError::Limit("client_data"));
        }
        Ok(())
    }
}

/// Signs a transaction with the account's signing key: tagged COSE_Sign1, ES256, protected
/// header `{1: -7, 3: SIGNED_TRANSACTION_CONTENT_TYPE, 4: SHA-256(uncompressed key)}`, empty
/// external AAD, payload the canonical CBOR of `tx`.
///
/// # Errors
/// [`EvidenceError::Limit`] for a payload no verifier would accept.
pub fn sign_transaction(
    tx: &SignedTransaction,
    key: &SigningKey,
) -> Result<Vec<u8>, EvidenceError> {
    tx.check_limits()?;
    let payload = cbor::to_canonical_vec(tx).map_err(|e| EvidenceError::Malformed {
        what: "signed transaction",
        reason: e.to_string(),
    })?;
    let fields = ProtectedFields {
        content_type: Some(ContentType::MediaType(
            SIGNED_TRANSACTION_CONTENT_TYPE.to_owned(),
        )),
        key_id: Some(account_key_thumbprint(key.verifying_key()).to_vec()),
    };
    cose::sign1_es256(key, &fields, &payload, b"").map_err(EvidenceError::DeviceSignature)
}

/// Verifies a device signature under the account key (COSE rules, signature, content type,
/// `kid` = the key's thumbprint, canonical payload within limits) and answers its payload.
///
/// # Errors
/// [`EvidenceError::DeviceSignature`], [`EvidenceError::BadDeviceSignature`],
/// [`EvidenceError::NotASignedTransaction`], or a decoding error for the payload.
pub fn verify_signed_transaction(
    bytes: &[u8],
    key: &VerifyingKey,
) -> Result<SignedTransaction, EvidenceError> {
    let verified = cose::verify_sign1_es256(bytes, key, b"").map_err(|e| match e {
        CoseError::BadSignature => EvidenceError::BadDeviceSignature,
        other => EvidenceError::DeviceSignature(other),
    })?;
    match &verified.protected.content_type {
        Some(ContentType::MediaType(t)) if t == SIGNED_TRANSACTION_CONTENT_TYPE => {}
        _ => return Err(EvidenceError::NotASignedTransaction("content type")),
    }
    if verified.protected.key_id.as_deref() != Some(&account_key_thumbprint(key)[..]) {
        return Err(EvidenceError::NotASignedTransaction("kid"));
    }
    let tx: SignedTransaction = strict_decode(&verified.payload, "signed transaction")?;
    tx.check_limits()?;
    Ok(tx)
}

/// Decodes one deterministic CBOR item into `T`, refusing any other encoding of it.
fn strict_decode<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T, EvidenceError> {
    decode_canonical(bytes, what)?;
    cbor::from_slice(bytes).map_err(|e| EvidenceError::Malformed {
        what,
        reason: e.to_string(),
    })
}

fn decode_canonical(bytes: &[u8], what: &'static str) -> Result<Value, EvidenceError> {
    cbor::decode_canonical(bytes).map_err(|e| match e {
        cbor::CborError::NotDeterministic => EvidenceError::NotDeterministic(what),
        other => EvidenceError::Malformed {
            what,
            reason: other.to_string(),
        },
    })
}

impl Evidence {
    /// The bundle's deterministic CBOR.
    ///
    /// # Errors
    /// [`EvidenceError::Limit`] or [`EvidenceError::UnsupportedVersion`] for a bundle
    /// [`Evidence::from_cbor`] would refuse.
    pub fn to_cbor(&self) -> Result<Vec<u8>, EvidenceError> {
        self.check()?;
        let bytes = cbor::to_canonical_vec(self).map_err(|e| EvidenceError::Malformed {
            what: "evidence bundle",
            reason: e.to_string(),
        })?;
        if bytes.len() > MAX_EVIDENCE_BYTES {
            return Err(EvidenceError::TooLarge);
        }
        Ok(bytes)
    }

    /// Decodes a bundle strictly: at most [`MAX_EVIDENCE_BYTES`], deterministic CBOR, version 1,
    /// no unknown or missing key, every field within its limit. Nothing is verified yet.
    ///
    /// # Errors
    /// The decoding variants of [`EvidenceError`].
    pub fn from_cbor(bytes: &[u8]) -> Result<Self, EvidenceError> {
        if bytes.len() > MAX_EVIDENCE_BYTES {
            return Err(EvidenceError::TooLarge);
        }
        let value = decode_canonical(bytes, "evidence bundle")?;
        // The version first, so a future layout is named as such rather than as malformed.
        let Value::Map(entries) = &value else {
            return Err(EvidenceError::Malformed {
                what: "evidence bundle",
                reason: "not a map".to_owned(),
            });
        };
        match entries
            .iter()
            .find(|(k, _)| matches!(k, Value::Text(t) if t == "version"))
        {
            Some((_, Value::Integer(v))) if *v == i128::from(EVIDENCE_VERSION) => {}
            Some((_, Value::Integer(v))) => {
                return Err(EvidenceError::UnsupportedVersion(v.to_string()));
            }
            Some(_) => return Err(EvidenceError::UnsupportedVersion("(not an integer)".into())),
            None => return Err(EvidenceError::UnsupportedVersion("(missing)".into())),
        }
        // An empty rotation list is written by omitting the key: `[]` would be a second
        // encoding of the same bundle.
        let rotations = field(entries, "account").and_then(|a| match a {
            Value::Map(account) => field(account, "key_rotations"),
            _ => None,
        });
        if matches!(rotations, Some(Value::Array(links)) if links.is_empty()) {
            return Err(EvidenceError::Malformed {
                what: "evidence bundle",
                reason: "account.key_rotations is empty (omit it instead)".to_owned(),
            });
        }
        let evidence: Self = cbor::from_slice(bytes).map_err(|e| EvidenceError::Malformed {
            what: "evidence bundle",
            reason: e.to_string(),
        })?;
        evidence.check()?;
        Ok(evidence)
    }

    /// A rendering for people: the same structure as JSON, byte strings as lowercase hex, and
    /// the device's signed payload decoded under `"signed_transaction"` when it decodes
    /// (unverified: run [`verify_evidence`] for what is proven).
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        let mut json = cbor::to_value(self)
            .map(|v| cbor::value_to_json(&v))
            .unwrap_or(serde_json::Value::Null);
        let payload = cose::inspect_sign1_es256(&self.device_signature)
            .ok()
            .and_then(|_| coset_payload(&self.device_signature))
            .and_then(|p| cbor::decode_value(&p).ok())
            .map(|v| cbor::value_to_json(&v));
        if let (Some(obj), Some(p)) = (json.as_object_mut(), payload) {
            obj.insert("signed_transaction".to_owned(), p);
        }
        json
    }

    fn check(&self) -> Result<(), EvidenceError> {
        if self.version != EVIDENCE_VERSION {
            return Err(EvidenceError::UnsupportedVersion(self.version.to_string()));
        }
        let t = &self.transaction;
        let limits: [(bool, &'static str); 10] = [
            (t.data.len() > MAX_DATA_BYTES, "transaction.data"),
            (t.text.len() > MAX_TEXT_BYTES, "transaction.text"),
            (
                t.content_type.len() > MAX_CONTENT_TYPE_BYTES,
                "transaction.content_type",
            ),
            (
                self.device_signature.len() > MAX_COSE_BYTES,
                "device_signature",
            ),
            (self.attestation.len() > MAX_COSE_BYTES, "attestation"),
            (self.checkpoint.len() > MAX_COSE_BYTES, "checkpoint"),
            (self.signed_event.len() > MAX_EVENT_BYTES, "signed_event"),
            (
                self.account.enrolment_event.len() > MAX_EVENT_BYTES,
                "account.enrolment_event",
            ),
            (
                self.inclusion_proof.len() > MAX_PROOF_HASHES,
                "inclusion_proof",
            ),
            (
                self.account.enrolment_proof.len() > MAX_PROOF_HASHES,
                "account.enrolment_proof",
            ),
        ];
        if let Some((_, what)) = limits.iter().find(|(over, _)| *over) {
            return Err(EvidenceError::Limit(what));
        }
        let rotations = &self.account.key_rotations;
        if rotations.len() > MAX_KEY_ROTATIONS {
            return Err(EvidenceError::Limit("account.key_rotations"));
        }
        for link in rotations {
            if link.event.len() > MAX_EVENT_BYTES {
                return Err(EvidenceError::Limit("account.key_rotations.event"));
            }
            if link.proof.len() > MAX_PROOF_HASHES {
                return Err(EvidenceError::Limit("account.key_rotations.proof"));
            }
        }
        Ok(())
    }
}

/// The value of text key `name` in a decoded map's entries.
fn field<'a>(entries: &'a [(Value, Value)], name: &str) -> Option<&'a Value> {
    entries
        .iter()
        .find(|(k, _)| matches!(k, Value::Text(t) if t == name))
        .map(|(_, v)| v)
}

fn coset_payload(bytes: &[u8]) -> Option<Vec<u8>> {
    use coset::{CborSerializable as _, TaggedCborSerializable as _};
    coset::CoseSign1::from_tagged_slice(bytes)
        .or_else(|_| coset::CoseSign1::from_slice(bytes))
        .ok()
        .and_then(|m| m.payload)
}

/// One event as the audit tree hashed it (`RecordedEvent::canonical_bytes` in the event store):
/// the deterministic CBOR array `[position, stream, version, event_id, event_type,
/// schema_version, payload, metadata, recorded_at]`.
struct CanonicalEvent {
    position: u64,
    stream: String,
    event_type: String,
    schema_version: u64,
    payload: Vec<u8>,
}

fn decode_event(bytes: &[u8]) -> Result<CanonicalEvent, &'static str> {
    let value = decode_canonical(bytes, "event").map_err(|_| "not deterministic CBOR")?;
    let Value::Array(items) = value else {
        return Err("not an array");
    };
    let [
        Value::Integer(position),
        Value::Text(stream),
        Value::Integer(version),
        Value::Bytes(event_id),
        Value::Text(event_type),
        Value::Integer(schema_version),
        Value::Bytes(payload),
        Value::Bytes(_metadata),
        Value::Integer(_recorded_at),
    ] = <[Value; 9]>::try_from(items).map_err(|_| "not an array of 9 items")?
    else {
        return Err("an item has the wrong type");
    };
    if u64::try_from(version).is_err() || event_id.len() != 16 {
        return Err("bad version or event id");
    }
    Ok(CanonicalEvent {
        position: u64::try_from(position).map_err(|_| "bad position")?,
        stream,
        event_type,
        schema_version: u64::try_from(schema_version).map_err(|_| "bad schema version")?,
        payload,
    })
}

/// The fields of `account.registered` v1 the verifier needs; others are ignored.
#[derive(Deserialize)]
struct RegisteredPayload {
    account: AccountRefPayload,
    app_instance: Bytes<16>,
    #[serde(with = "serde_bytes")]
    signing_public_key: Vec<u8>,
    signing_key_thumbprint: Bytes<32>,
}

#[derive(Deserialize)]
struct AccountRefPayload {
    server_id: Bytes<16>,
    account_id: Bytes<16>,
}

/// The fields of `account.key_rotated` v1 (all of them).
#[derive(Deserialize)]
struct KeyRotatedPayload {
    role: String,
    #[serde(with = "serde_bytes")]
    public_key: Vec<u8>,
    key_thumbprint: Bytes<32>,
}

/// The fields of `transaction.signed` v1 the verifier needs; others are ignored.
#[derive(Deserialize)]
struct SignedPayload {
    account_id: Bytes<16>,
    data_hash: Bytes<32>,
    text_hash: Bytes<32>,
    content_type: String,
    created_at: i64,
    expires_at: i64,
    #[serde(with = "serde_bytes")]
    device_signature: Vec<u8>,
    #[serde(with = "serde_bytes")]
    attestation: Vec<u8>,
}

fn hashes(proof: &[Bytes<32>]) -> Vec<[u8; 32]> {
    proof.iter().map(|h| h.0).collect()
}

fn stream_name(prefix: &str, server_id: &[u8; 16], id: &[u8; 16]) -> String {
    format!("{prefix}-{}-{}", hex::encode(server_id), hex::encode(id))
}

/// Walks the signing-key rotation chain from the enrolled key: each link is
/// `account.key_rotated` v1 of the signing key in the account's stream, at its position, after
/// the previous link (or the enrolment) and before the signing event, its thumbprint that of its
/// key. Answers the key the chain ends at (the enrolled one when there is no link).
fn rotated_key(
    rotations: &[KeyRotationProof],
    account_stream: &str,
    enrolled: Vec<u8>,
    enrolment_position: u64,
    signed_position: u64,
) -> Result<Vec<u8>, EvidenceError> {
    let mut key = enrolled;
    let mut after = enrolment_position;
    for (link, rotation) in rotations.iter().enumerate() {
        let refuse = |reason| EvidenceError::KeyRotation { link, reason };
        let event = decode_event(&rotation.event).map_err(refuse)?;
        if (event.event_type.as_str(), event.schema_version)
            != (
                KEY_ROTATED_EVENT_TYPE.0,
                u64::from(KEY_ROTATED_EVENT_TYPE.1),
            )
        {
            return Err(refuse("not account.key_rotated v1"));
        }
        if event.stream != account_stream {
            return Err(refuse("not this account's stream"));
        }
        if event.position != rotation.position {
            return Err(refuse("position differs from its leaf"));
        }
        if event.position <= after {
            return Err(refuse("not after the previous link or the enrolment"));
        }
        if event.position >= signed_position {
            return Err(refuse("not before the signing event"));
        }
        let rotated: KeyRotatedPayload = cbor::from_canonical_slice(&event.payload)
            .map_err(|_| refuse("malformed account.key_rotated payload"))?;
        if rotated.role != SIGNING_KEY_ROLE {
            return Err(refuse("rotates another key than the signing key"));
        }
        if rotated.key_thumbprint.0 != sha256(&rotated.public_key) {
            return Err(refuse("thumbprint is not its key's"));
        }
        key = rotated.public_key;
        after = event.position;
    }
    Ok(key)
}

/// Verifies an evidence bundle offline against the deployment's audit key and the trusted SFS
/// keys (at least one), running the checks of `docs/evidence.md` in order:
///
/// 1. the checkpoint verifies under `audit_key` (and, if `now_ms` is given, is not dated more
///    than [`CLOCK_SKEW_MS`] after it);
/// 2. `signed_event` is leaf `signed_position` of the checkpoint's tree;
/// 3. `enrolment_event` is leaf `enrolment_position` of the same tree, and so is each
///    `key_rotations` event at its position;
/// 4. the enrolment event is `account.registered` v1 of this account in stream
///    `account-{server}-{account}`, at its position, before the signing event, and carries a
///    signing key (and its thumbprint) and an app instance; each key rotation is
///    `account.key_rotated` v1 of the signing key in that stream, at its position, the
///    positions strictly increasing after the enrolment and before the signing event; the key
///    the enrolment and the rotations end at is exactly the bundle's signing key;
/// 5. the device signature verifies under that key as a signed transaction;
/// 6. its data and text hashes are SHA-256 of the bundle's data and text;
/// 7. its transaction and server ids are the bundle's;
/// 8. the attestation verifies under a trusted SFS key, for the transaction challenge and the
///    account key thumbprint, valid at the signed device time, and attests the app instance the
///    enrolment event names;
/// 9. the signed attestation hash is SHA-256 of the attestation bytes;
/// 10. the signing event is `transaction.signed` v1 in stream
///     `transaction-{server}-{transaction}`, at its position, and carries this account id,
///     device signature and attestation byte for byte, the data and text hashes, and the
///     bundle's content type, creation and expiry.
///
/// # Errors
/// The [`EvidenceError`] of the first check that fails (or of decoding).
pub fn verify_evidence(
    bundle: &[u8],
    audit_key: &VerifyingKey,
    sfs_keys: &[VerifyingKey],
    now_ms: Option<i64>,
) -> Result<VerifiedEvidence, EvidenceError> {
    let ev = Evidence::from_cbor(bundle)?;
    let tx = &ev.transaction;
    let account = &ev.account;

    // 1, 2. The checkpoint first; the tree size and root come from it.
    let head = checkpoint::verify_inclusion_against_checkpoint(
        &ev.signed_event,
        ev.signed_position,
        &hashes(&ev.inclusion_proof),
        &ev.checkpoint,
        audit_key,
    )
    .map_err(|e| match e {
        CheckpointError::Proof(p) => EvidenceError::SignedEventNotIncluded(p),
        other => EvidenceError::Checkpoint(other),
    })?;
    if now_ms.is_some_and(|now| head.timestamp_ms.saturating_sub(CLOCK_SKEW_MS) > now) {
        return Err(EvidenceError::CheckpointInFuture);
    }

    // 3.
    merkle::verify_inclusion(
        &merkle::leaf_hash(&account.enrolment_event),
        account.enrolment_position,
        head.tree_size,
        &hashes(&account.enrolment_proof),
        &head.root_hash,
    )
    .map_err(EvidenceError::EnrolmentNotIncluded)?;
    for (link, rotation) in account.key_rotations.iter().enumerate() {
        merkle::verify_inclusion(
            &merkle::leaf_hash(&rotation.event),
            rotation.position,
            head.tree_size,
            &hashes(&rotation.proof),
            &head.root_hash,
        )
        .map_err(|error| EvidenceError::KeyRotationNotIncluded { link, error })?;
    }

    // 4.
    let enrolment =
        decode_event(&account.enrolment_event).map_err(EvidenceError::EnrolmentEvent)?;
    if (enrolment.event_type.as_str(), enrolment.schema_version)
        != (ENROLMENT_EVENT_TYPE.0, u64::from(ENROLMENT_EVENT_TYPE.1))
    {
        return Err(EvidenceError::EnrolmentEvent("not account.registered v1"));
    }
    let account_stream = stream_name("account", &tx.server_id.0, &account.account_id.0);
    if enrolment.stream != account_stream {
        return Err(EvidenceError::EnrolmentEvent("not this account's stream"));
    }
    if enrolment.position != account.enrolment_position {
        return Err(EvidenceError::EnrolmentEvent(
            "position differs from its leaf",
        ));
    }
    if enrolment.position >= ev.signed_position {
        return Err(EvidenceError::EnrolmentEvent(
            "not before the signing event",
        ));
    }
    let registered: RegisteredPayload = cbor::from_canonical_slice(&enrolment.payload)
        .map_err(|_| EvidenceError::EnrolmentEvent("malformed account.registered payload"))?;
    if registered.account.server_id != tx.server_id
        || registered.account.account_id != account.account_id
    {
        return Err(EvidenceError::EnrolmentEvent("registers another account"));
    }
    if registered.signing_key_thumbprint.0 != sha256(&registered.signing_public_key) {
        return Err(EvidenceError::AccountKeyNotEnrolled);
    }
    let signing_key = rotated_key(
        &account.key_rotations,
        &account_stream,
        registered.signing_public_key,
        enrolment.position,
        ev.signed_position,
    )?;
    if signing_key != account.signing_public_key.0 {
        return Err(EvidenceError::AccountKeyNotEnrolled);
    }
    let account_key = VerifyingKey::from_sec1_bytes(&account.signing_public_key.0)
        .map_err(|_| EvidenceError::InvalidAccountKey)?;

    // 5.
    let signed = verify_signed_transaction(&ev.device_signature, &account_key)?;

    // 6.
    let data_hash = sha256(&tx.data);
    let text_hash = sha256(tx.text.as_bytes());
    if signed.data_hash.0 != data_hash {
        return Err(EvidenceError::DataMismatch);
    }
    if signed.text_hash.0 != text_hash {
        return Err(EvidenceError::TextMismatch);
    }

    // 7.
    if signed.transaction_id != tx.transaction_id || signed.server_id != tx.server_id {
        return Err(EvidenceError::TransactionMismatch);
    }

    // 8. Judged at the device time: the verifier's clock is years later.
    let expect = attestation::Expected {
        challenge: transaction_challenge(
            &tx.server_id.0,
            &tx.transaction_id.0,
            &data_hash,
            &text_hash,
        ),
        account_key_thumbprint: account_key_thumbprint(&account_key),
        now_ms: signed.device_time_ms,
    };
    let claims = attestation::verify_attestation(&ev.attestation, sfs_keys, &expect)
        .map_err(EvidenceError::Attestation)?;
    // The factor was proven on the enrolled app instance (which `account.registered` fixes for
    // the account's life), not on another installation holding a copy of the key.
    if claims.app_instance != registered.app_instance {
        return Err(EvidenceError::AppInstanceMismatch);
    }

    // 9.
    if signed.attestation_hash.0 != attestation::attestation_hash(&ev.attestation) {
        return Err(EvidenceError::AttestationHashMismatch);
    }

    // 10.
    let event = decode_event(&ev.signed_event).map_err(EvidenceError::SignedEvent)?;
    if (event.event_type.as_str(), event.schema_version)
        != (SIGNED_EVENT_TYPE.0, u64::from(SIGNED_EVENT_TYPE.1))
    {
        return Err(EvidenceError::SignedEvent("not transaction.signed v1"));
    }
    if event.stream != stream_name("transaction", &tx.server_id.0, &tx.transaction_id.0) {
        return Err(EvidenceError::SignedEvent("names another transaction"));
    }
    if event.position != ev.signed_position {
        return Err(EvidenceError::SignedEvent("position differs from its leaf"));
    }
    let payload: SignedPayload = cbor::from_canonical_slice(&event.payload)
        .map_err(|_| EvidenceError::SignedEvent("malformed transaction.signed payload"))?;
    if payload.account_id != account.account_id {
        return Err(EvidenceError::SignedEvent("signed by another account"));
    }
    if payload.device_signature != ev.device_signature || payload.attestation != ev.attestation {
        return Err(EvidenceError::SignedEvent(
            "records another signature or attestation",
        ));
    }
    if payload.data_hash.0 != data_hash || payload.text_hash.0 != text_hash {
        return Err(EvidenceError::SignedEvent("records other data or text"));
    }
    if payload.content_type != tx.content_type
        || payload.created_at != tx.created_at_ms
        || payload.expires_at != tx.expires_at_ms
    {
        return Err(EvidenceError::SignedEvent(
            "records another content type, creation or expiry",
        ));
    }

    Ok(VerifiedEvidence {
        transaction_id: tx.transaction_id.0,
        server_id: tx.server_id.0,
        account_id: account.account_id.0,
        factor: claims.factor,
        app_instance: claims.app_instance.0,
        device_time_ms: signed.device_time_ms,
        signed_position: ev.signed_position,
        checkpoint: head,
    })
}

#[cfg(test)]
mod tests;
