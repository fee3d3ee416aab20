//! Second-factor attestations (`docs/second-factor.md`, "The attestation"): the short-lived
//! COSE_Sign1 by which a second-factor server (SFS) vouches that an app instance's user just
//! proved their PIN or biometric factor, bound to one NS challenge and one account key.
//!
//! Rules enforced by [`verify_attestation`], in this order, each with its own error:
//! 1. a COSE_Sign1 in its one encoding (tag 18, deterministic CBOR, empty unprotected header:
//!    [`crate::cose`]) with `alg` ES256 in the protected header only, no `crit`, a 64-byte raw
//!    `r ‖ s` signature (DER is refused) and the attestation content type;
//! 2. its `kid` names one of the trusted keys, and the signature verifies under that key; the
//!    payload is the claims map in deterministic CBOR (RFC 8949 §4.2.1), nothing else;
//! 3. the challenge is the expected one;
//! 4. the account key thumbprint is the expected one;
//! 5. it is fresh: `issued_at_ms − 5 s ≤ now ≤ expires_at_ms`, and it lives at most 60 s.
//!
//! Check 6 of the spec (the attestation id was never used) needs the event store, so the NS
//! does it after this function, keyed by [`AttestationClaims::attestation_id`] — never by the
//! signature bytes, which ECDSA malleability makes non-unique (see [`crate::cose`]).

use p256::ecdsa::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::checkpoint::key_id;
use crate::cose::{self, ContentType, CoseError, ProtectedFields};
use crate::device::Bytes;

/// The content type (COSE header 3) of every attestation.
pub const ATTESTATION_CONTENT_TYPE: &str = "application/countersign-attestation+cbor";
/// Longest lifetime an attestation may claim, `expires_at_ms − issued_at_ms`.
pub const MAX_LIFETIME_MS: i64 = 60_000;
/// How far ahead of the verifier's clock the signer's clock may be.
pub const CLOCK_SKEW_MS: i64 = 5_000;

/// Which second factor the user proved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Factor {
    /// The PIN, through OPAQUE.
    Pin,
    /// A platform biometric check that released the biometric key.
    Biometric,
}

/// What an attestation says: its payload, a deterministic CBOR map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestationClaims {
    /// The app instance whose user proved the factor.
    pub app_instance: Bytes<16>,
    /// Which factor.
    pub factor: Factor,
    /// The NS challenge the app asked to have attested.
    pub challenge: Bytes<32>,
    /// SHA-256 of the account's signing public key, as the app gave it.
    pub account_key_thumbprint: Bytes<32>,
    /// When the SFS signed, milliseconds since the Unix epoch.
    pub issued_at_ms: i64,
    /// After this the attestation is refused.
    pub expires_at_ms: i64,
    /// Random; the NS refuses a second use of the same id.
    pub attestation_id: Bytes<16>,
}

/// What the verifier expects the attestation to be bound to, and its clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    /// The challenge the NS issued for this session, transaction or upgrade.
    pub challenge: [u8; 32],
    /// SHA-256 of the account's signing public key.
    pub account_key_thumbprint: [u8; 32],
    /// The verifier's clock, milliseconds since the Unix epoch.
    pub now_ms: i64,
}

/// Why an attestation was refused (all the presenter's fault: a 4xx), or could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestationError {
    /// Check 1: not a well-formed ES256 COSE_Sign1 (wrong or unprotected `alg`, `crit`, DER
    /// or otherwise mis-sized signature, malformed CBOR).
    #[error("not an acceptable COSE_Sign1: {0}")]
    Cose(CoseError),
    /// Check 1: the content type is not [`ATTESTATION_CONTENT_TYPE`].
    #[error("not an attestation (content type)")]
    WrongContentType,
    /// Check 2: no `kid`, or it names no trusted key.
    #[error("the attestation key is not trusted")]
    UntrustedKey,
    /// Check 2: the signature does not verify under the key its `kid` names.
    #[error("the attestation signature does not verify")]
    BadSignature,
    /// The signed payload is not an attestation claims map.
    #[error("malformed attestation claims")]
    Malformed,
    /// The signed payload is a claims map, but not in its one deterministic encoding.
    #[error("the attestation claims are not deterministic CBOR")]
    NotDeterministic,
    /// Check 3: attests another challenge.
    #[error("the attestation is for another challenge")]
    ChallengeMismatch,
    /// Check 4: attests another account key.
    #[error("the attestation is for another account key")]
    AccountMismatch,
    /// Check 5: past `expires_at_ms`.
    #[error("the attestation expired")]
    Expired,
    /// Check 5: issued more than the allowed skew in the future.
    #[error("the attestation is not yet valid")]
    NotYetValid,
    /// Check 5: claims a lifetime above [`MAX_LIFETIME_MS`] (or a negative one).
    #[error("the attestation claims too long a lifetime")]
    LifetimeTooLong,
}

/// Signs `claims` with the SFS attestation key: tagged COSE_Sign1, ES256, protected header
/// `{1: -7, 3: content type, 4: kid}`, payload the canonical CBOR of the claims.
///
/// # Errors
/// [`AttestationError::LifetimeTooLong`] for claims no verifier would accept;
/// [`AttestationError::Malformed`] if the claims do not encode (they always do).
pub fn sign_attestation(
    claims: &AttestationClaims,
    key: &SigningKey,
) -> Result<Vec<u8>, AttestationError> {
    if !lifetime_ok(claims) {
        return Err(AttestationError::LifetimeTooLong);
    }
    let payload = crate::cbor::to_canonical_vec(claims).map_err(|_| AttestationError::Malformed)?;
    let fields = ProtectedFields {
        content_type: Some(ContentType::MediaType(ATTESTATION_CONTENT_TYPE.to_owned())),
        key_id: Some(key_id(key.verifying_key())),
    };
    cose::sign1_es256(key, &fields, &payload, b"").map_err(AttestationError::Cose)
}

/// Verifies an attestation against the trusted SFS keys and what the verifier expects,
/// running checks 1–5 of the module documentation in order; answers the claims.
///
/// # Errors
/// The [`AttestationError`] of the first check that fails.
pub fn verify_attestation(
    bytes: &[u8],
    trusted: &[VerifyingKey],
    expect: &Expected,
) -> Result<AttestationClaims, AttestationError> {
    // 1. Shape, without a key.
    let fields = cose::inspect_sign1_es256(bytes).map_err(AttestationError::Cose)?;
    match &fields.content_type {
        Some(ContentType::MediaType(t)) if t == ATTESTATION_CONTENT_TYPE => {}
        _ => return Err(AttestationError::WrongContentType),
    }
    // 2. The key the kid names, and the signature under it.
    let kid = fields.key_id.ok_or(AttestationError::UntrustedKey)?;
    let key = trusted
        .iter()
        .find(|k| key_id(k) == kid)
        .ok_or(AttestationError::UntrustedKey)?;
    let verified = cose::verify_sign1_es256(bytes, key, b"").map_err(|e| match e {
        CoseError::BadSignature => AttestationError::BadSignature,
        other => AttestationError::Cose(other),
    })?;
    let claims: AttestationClaims =
        crate::cbor::from_canonical_slice(&verified.payload).map_err(|e| match e {
            crate::cbor::CborError::NotDeterministic => AttestationError::NotDeterministic,
            _ => AttestationError::Malformed,
        })?;
    // 3, 4. What it is bound to.
    if claims.challenge.0 != expect.challenge {
        return Err(AttestationError::ChallengeMismatch);
    }
    if claims.account_key_thumbprint.0 != expect.account_key_thumbprint {
        return Err(AttestationError::AccountMismatch);
    }
    // 5. Freshness.
    if expect.now_ms > claims.expires_at_ms {
        return Err(AttestationError::Expired);
    }
    if claims.issued_at_ms.saturating_sub(CLOCK_SKEW_MS) > expect.now_ms {
        return Err(AttestationError::NotYetValid);
    }
    if !lifetime_ok(&claims) {
        return Err(AttestationError::LifetimeTooLong);
    }
    Ok(claims)
}

/// SHA-256 of an attestation's bytes, for logs and audit records that must name it without
/// holding it.
#[must_use]
pub fn attestation_hash(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn lifetime_ok(claims: &AttestationClaims) -> bool {
    claims
        .expires_at_ms
        .checked_sub(claims.issued_at_ms)
        .is_some_and(|life| (0..=MAX_LIFETIME_MS).contains(&life))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use coset::cbor::value::Value;
    use coset::{
        CborSerializable as _, CoseSign1, CoseSign1Builder, HeaderBuilder,
        TaggedCborSerializable as _, iana,
    };
    use p256::ecdsa::Signature;
    use p256::ecdsa::signature::Signer as _;

    use super::*;

    const NOW: i64 = 1_700_000_000_000;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_slice(&[seed; 32]).unwrap()
    }

    fn claims() -> AttestationClaims {
        AttestationClaims {
            app_instance: Bytes([1; 16]),
            factor: Factor::Pin,
            challenge: Bytes([2; 32]),
            account_key_thumbprint: Bytes([3; 32]),
            issued_at_ms: NOW,
            expires_at_ms: NOW + 60_000,
            attestation_id: Bytes([4; 16]),
        }
    }

    fn expected() -> Expected {
        Expected {
            challenge: [2; 32],
            account_key_thumbprint: [3; 32],
            now_ms: NOW + 1_000,
        }
    }

    fn verify(bytes: &[u8], expect: &Expected) -> Result<AttestationClaims, AttestationError> {
        verify_attestation(
            bytes,
            &[*key(9).verifying_key(), *key(1).verifying_key()],
            expect,
        )
    }

    /// A message signed by `key(1)` with the given headers and signature encoding.
    fn forge(protected: HeaderBuilder, unprotected: HeaderBuilder, der: bool) -> Vec<u8> {
        let k = key(1);
        let payload = crate::cbor::to_canonical_vec(&claims()).unwrap();
        CoseSign1Builder::new()
            .protected(protected.build())
            .unprotected(unprotected.build())
            .payload(payload)
            .create_signature(b"", |tbs| {
                let sig: Signature = k.sign(tbs);
                if der {
                    sig.to_der().as_bytes().to_vec()
                } else {
                    cose::sign_es256(&k, tbs).to_vec()
                }
            })
            .build()
            .to_tagged_vec()
            .unwrap()
    }

    fn headers() -> HeaderBuilder {
        HeaderBuilder::new()
            .content_type(ATTESTATION_CONTENT_TYPE.to_owned())
            .key_id(key_id(key(1).verifying_key()))
    }

    #[test]
    fn a_valid_attestation_verifies_and_is_deterministic() {
        let bytes = sign_attestation(&claims(), &key(1)).unwrap();
        assert_eq!(verify(&bytes, &expected()).unwrap(), claims());
        assert_eq!(bytes, sign_attestation(&claims(), &key(1)).unwrap());
        // The forged path with proper headers is also valid: the helpers are sound.
        let manual = forge(
            headers().algorithm(iana::Algorithm::ES256),
            HeaderBuilder::new(),
            false,
        );
        assert_eq!(verify(&manual, &expected()).unwrap(), claims());
        assert_eq!(attestation_hash(&bytes), attestation_hash(&bytes));
        assert_ne!(attestation_hash(&bytes), attestation_hash(&manual[1..]));
    }

    #[test]
    fn the_payload_is_the_documented_map() {
        let bytes = crate::cbor::to_canonical_vec(&claims()).unwrap();
        let json = crate::cbor::value_to_json(&crate::cbor::decode_value(&bytes).unwrap());
        assert_eq!(json["factor"], "pin");
        assert_eq!(json["issued_at_ms"], NOW);
        assert_eq!(json.as_object().unwrap().len(), 7);
    }

    #[test]
    fn only_the_one_deterministic_encoding_is_accepted() {
        let good = sign_attestation(&claims(), &key(1)).unwrap();
        for v in cose::noncanonical::variants(&good).unwrap() {
            assert_eq!(
                verify(&v.bytes, &expected()),
                Err(AttestationError::Cose(v.refused_with)),
                "{}",
                v.name
            );
        }
        let loose = cose::noncanonical::loose_protected_header(&good, &key(1), b"").unwrap();
        assert_eq!(
            verify(&loose, &expected()),
            Err(AttestationError::Cose(CoseError::NotDeterministic(
                "protected header"
            )))
        );
        // Claims that decode to the same map but are not its deterministic encoding, validly
        // signed by a trusted key.
        let canonical = crate::cbor::to_canonical_vec(&claims()).unwrap();
        let mut indefinite = vec![0xbf];
        indefinite.extend_from_slice(&canonical[1..]);
        indefinite.push(0xff);
        let fields = ProtectedFields {
            content_type: Some(ContentType::MediaType(ATTESTATION_CONTENT_TYPE.to_owned())),
            key_id: Some(key_id(key(1).verifying_key())),
        };
        for payload in [
            cose::noncanonical::reordered_map(&canonical).unwrap(),
            indefinite,
        ] {
            assert_eq!(
                crate::cbor::from_slice::<AttestationClaims>(&payload).unwrap(),
                claims(),
                "the same claims"
            );
            let signed = cose::sign1_es256(&key(1), &fields, &payload, b"").unwrap();
            assert_eq!(
                verify(&signed, &expected()),
                Err(AttestationError::NotDeterministic)
            );
        }
    }

    #[test]
    fn each_check_has_its_error() {
        let good = sign_attestation(&claims(), &key(1)).unwrap();
        // 1. alg of another algorithm, alg unprotected only, DER signature, content type.
        let es384 = forge(
            headers().algorithm(iana::Algorithm::ES384),
            HeaderBuilder::new(),
            false,
        );
        assert!(matches!(
            verify(&es384, &expected()),
            Err(AttestationError::Cose(CoseError::UnsupportedAlgorithm(_)))
        ));
        let unprotected = forge(
            headers(),
            HeaderBuilder::new().algorithm(iana::Algorithm::ES256),
            false,
        );
        assert_eq!(
            verify(&unprotected, &expected()),
            Err(AttestationError::Cose(CoseError::UnprotectedAlgorithm))
        );
        let der = forge(
            headers().algorithm(iana::Algorithm::ES256),
            HeaderBuilder::new(),
            true,
        );
        assert!(matches!(
            verify(&der, &expected()),
            Err(AttestationError::Cose(CoseError::SignatureLength(n))) if n != 64
        ));
        let untyped = forge(
            HeaderBuilder::new()
                .algorithm(iana::Algorithm::ES256)
                .key_id(key_id(key(1).verifying_key())),
            HeaderBuilder::new(),
            false,
        );
        assert_eq!(
            verify(&untyped, &expected()),
            Err(AttestationError::WrongContentType)
        );
        // 2. Untrusted key; tampered payload.
        let stranger = sign_attestation(&claims(), &key(5)).unwrap();
        assert_eq!(
            verify(&stranger, &expected()),
            Err(AttestationError::UntrustedKey)
        );
        let mut msg = CoseSign1::from_tagged_slice(&good).unwrap();
        let mut other = claims();
        other.factor = Factor::Biometric;
        msg.payload = Some(crate::cbor::to_canonical_vec(&other).unwrap());
        let tampered = msg.to_tagged_vec().unwrap();
        assert_eq!(
            verify(&tampered, &expected()),
            Err(AttestationError::BadSignature)
        );
        // 3, 4. Another challenge, another account key.
        let mut e = expected();
        e.challenge = [7; 32];
        assert_eq!(verify(&good, &e), Err(AttestationError::ChallengeMismatch));
        let mut e = expected();
        e.account_key_thumbprint = [7; 32];
        assert_eq!(verify(&good, &e), Err(AttestationError::AccountMismatch));
        // 5. Expired, from the future, too long a lifetime (signed by hand: sign_attestation
        // refuses to make one).
        let mut e = expected();
        e.now_ms = NOW + 60_001;
        assert_eq!(verify(&good, &e), Err(AttestationError::Expired));
        e.now_ms = NOW + 60_000;
        assert!(verify(&good, &e).is_ok(), "the last millisecond is valid");
        e.now_ms = NOW - 5_001;
        assert_eq!(verify(&good, &e), Err(AttestationError::NotYetValid));
        e.now_ms = NOW - 5_000;
        assert!(verify(&good, &e).is_ok(), "within the skew");
        let mut long = claims();
        long.expires_at_ms = NOW + 60_001;
        assert_eq!(
            sign_attestation(&long, &key(1)),
            Err(AttestationError::LifetimeTooLong)
        );
        let fields = ProtectedFields {
            content_type: Some(ContentType::MediaType(ATTESTATION_CONTENT_TYPE.to_owned())),
            key_id: Some(key_id(key(1).verifying_key())),
        };
        let long = cose::sign1_es256(
            &key(1),
            &fields,
            &crate::cbor::to_canonical_vec(&long).unwrap(),
            b"",
        )
        .unwrap();
        assert_eq!(
            verify(&long, &expected()),
            Err(AttestationError::LifetimeTooLong)
        );
        // A signed payload that is not claims.
        let junk = cose::sign1_es256(&key(1), &fields, &[0xa0], b"").unwrap();
        assert_eq!(verify(&junk, &expected()), Err(AttestationError::Malformed));
        // Not CBOR at all.
        assert!(matches!(
            verify(&Value::Bool(true).to_vec().unwrap(), &expected()),
            Err(AttestationError::Cose(_))
        ));
    }
}
