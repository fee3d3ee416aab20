//! COSE_Sign1 with ES256 (RFC 9052 §4.2, RFC 9053 §2.1): the one signature format countersign
//! emits and accepts, for checkpoints, device signatures and attestations.
//!
//! Rules enforced here:
//! - The algorithm is bound by the signature: `alg` must be ES256 (-7) in the *protected*
//!   header, and an `alg` in the unprotected header is refused outright, even alongside a
//!   protected one, because an unsigned algorithm claim is what algorithm-confusion attacks use.
//! - A `crit` header is refused: we understand no critical extensions, and RFC 9052 §3.1 says a
//!   recipient must then reject the message.
//! - The signature is IEEE P1363 `r ‖ s`, exactly 64 bytes (RFC 9053 §2.1), never DER; `r` and
//!   `s` must lie in `[1, n−1]`.
//! - ECDSA over P-256 is malleable: if `(r, s)` verifies, so does `(r, n−s)`. We *accept both*
//!   (phones' secure hardware and other COSE libraries emit either) and *emit only low-S*
//!   (`s ≤ n/2`), so what we sign is canonical. Consequently signature bytes must never serve as
//!   an identifier or a replay key: hash the payload (or the Sig_structure) instead.
//! - One valid encoding of every message (DESIGN.md, "one valid encoding of every signed
//!   object"): the input must be tagged 18 with the tag head in its shortest form (`d2`), be
//!   RFC 8949 §4.2.1 deterministic CBOR as a whole and in its protected header bytes (definite
//!   lengths, shortest heads, map keys in bytewise order, no repeated key), and carry an
//!   **empty unprotected header** (`a0`): nothing binds the unprotected header, so anything in
//!   it (another `kid`, a content type, a 15 kB blob) would ride unsigned inside a valid
//!   message and make two different files verify. The check is "decode, re-encode
//!   canonically, compare bytes" ([`crate::cbor::decode_canonical`]), in [`decode_strict`],
//!   which every verifier here goes through ([`verify_sign1_es256`], [`inspect_sign1_es256`]).
//!   Untagged input, another tag, any other encoding, trailing bytes, a detached (nil)
//!   payload, or malformed CBOR is a typed [`CoseError`]. What the payload must be is the
//!   caller's rule (every countersign payload is deterministic CBOR too, checked by its
//!   verifier with the same function). The Sig_structure is built from the protected header
//!   bytes as received, which this rule makes the only bytes possible.
//! - [`to_be_signed`] alone stays lenient (tagged or untagged, any encoding): it is a
//!   diagnostic for comparing Sig_structures with other implementations' vectors, and checks
//!   no signature.
//! - Signing is deterministic (RFC 6979), so it needs no RNG and stays pure.

use coset::cbor::value::Value;
use coset::iana::{self, EnumI64 as _};
use coset::{
    AsCborValue as _, CborSerializable as _, CoseSign1, CoseSign1Builder, HeaderBuilder,
    RegisteredLabel, RegisteredLabelWithPrivate, TaggedCborSerializable as _,
};
use p256::ecdsa::signature::Signer as _;

use crate::cbor::{self, CborError};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::elliptic_curve::sec1::ToSec1Point as _;

pub mod noncanonical;

/// Length of an ES256 signature: `r ‖ s`, 32 bytes each.
pub const ES256_SIGNATURE_LEN: usize = 64;

/// The CBOR tag of a COSE_Sign1 message.
pub const COSE_SIGN1_TAG: u64 = 18;

/// A payload's content type (RFC 9052 header 3): a media type, or a CoAP content-format number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentType {
    /// A media type such as `application/countersign-checkpoint+cbor`.
    MediaType(String),
    /// A registered CoAP content format (0 is `text/plain; charset=utf-8`).
    CoapFormat(i64),
}

/// The protected header fields besides `alg` that countersign reads and writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProtectedFields {
    /// What the payload is; a verifier that expects one kind of payload checks this.
    pub content_type: Option<ContentType>,
    /// Which key signed, as the signer names it (signed, so it cannot be swapped).
    pub key_id: Option<Vec<u8>>,
}

/// A message whose signature checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The signed payload.
    pub payload: Vec<u8>,
    /// The signed header fields.
    pub protected: ProtectedFields,
}

/// Why a COSE_Sign1 message was not accepted (all are the sender's fault: a 4xx).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoseError {
    /// Not well-formed CBOR, not a COSE_Sign1 structure, or bytes after it.
    #[error("malformed COSE_Sign1: {0}")]
    Malformed(String),
    /// Tagged with something other than 18 (COSE_Sign1).
    #[error("CBOR tag {0} is not COSE_Sign1 (18)")]
    WrongTag(u64),
    /// Not tagged: a COSE_Sign1 countersign accepts always carries tag 18.
    #[error("COSE_Sign1 must be tagged 18")]
    Untagged,
    /// Well-formed, but not the one deterministic encoding of the message (or of its protected
    /// header): a non-shortest head (the tag as `d812` included), an indefinite length, map
    /// keys out of order or repeated. Names the part.
    #[error("the {0} is not deterministic CBOR (RFC 8949 §4.2.1)")]
    NotDeterministic(&'static str),
    /// The unprotected header is not empty; nothing binds it, so nothing may be in it.
    #[error("the unprotected header must be empty")]
    UnprotectedHeader,
    /// The protected header names no algorithm.
    #[error("the protected header has no alg")]
    MissingAlgorithm,
    /// An `alg` appears in the unprotected header, where nothing binds it.
    #[error("alg must be in the protected header only")]
    UnprotectedAlgorithm,
    /// The algorithm is not ES256.
    #[error("algorithm {0} is not ES256")]
    UnsupportedAlgorithm(String),
    /// The message marks header parameters critical; we understand none.
    #[error("critical header parameters are not supported")]
    CriticalHeaders,
    /// The payload is detached (nil); countersign always carries it.
    #[error("detached payloads are not accepted")]
    DetachedPayload,
    /// The signature is not 64 bytes.
    #[error("ES256 signature is {0} bytes long, not 64")]
    SignatureLength(usize),
    /// The signature does not verify with this key (or `r`/`s` are out of range).
    #[error("signature does not verify")]
    BadSignature,
    /// A content format number we were asked to write is not registered.
    #[error("CoAP content format {0} is not registered")]
    UnknownContentFormat(i64),
}

impl From<coset::CoseError> for CoseError {
    fn from(e: coset::CoseError) -> Self {
        Self::Malformed(e.to_string())
    }
}

/// Signs `payload` as a tagged COSE_Sign1 with ES256: protected header `{1: -7}` plus
/// `fields`, empty unprotected header, low-S `r ‖ s` signature over the RFC 9052 §4.4
/// Sig_structure `["Signature1", protected, external_aad, payload]`.
///
/// # Errors
/// [`CoseError::UnknownContentFormat`] for an unregistered CoAP content format; CBOR
/// serialisation of a message built here does not otherwise fail.
pub fn sign1_es256(
    key: &SigningKey,
    fields: &ProtectedFields,
    payload: &[u8],
    external_aad: &[u8],
) -> Result<Vec<u8>, CoseError> {
    let mut header = HeaderBuilder::new().algorithm(iana::Algorithm::ES256);
    match &fields.content_type {
        Some(ContentType::MediaType(t)) => header = header.content_type(t.clone()),
        Some(ContentType::CoapFormat(n)) => {
            let format =
                iana::CoapContentFormat::from_i64(*n).ok_or(CoseError::UnknownContentFormat(*n))?;
            header = header.content_format(format);
        }
        None => {}
    }
    if let Some(kid) = &fields.key_id {
        header = header.key_id(kid.clone());
    }
    let msg = CoseSign1Builder::new()
        .protected(header.build())
        .payload(payload.to_vec())
        .create_signature(external_aad, |tbs| sign_es256(key, tbs).to_vec())
        .build();
    Ok(msg.to_tagged_vec()?)
}

/// Verifies a COSE_Sign1 ES256 message under `key` with `external_aad`, enforcing every rule
/// in the module documentation, and returns the payload and the signed header fields.
///
/// # Errors
/// The [`CoseError`] for the first rule the message breaks.
pub fn verify_sign1_es256(
    bytes: &[u8],
    key: &VerifyingKey,
    external_aad: &[u8],
) -> Result<Verified, CoseError> {
    let (msg, payload) = decode_checked(bytes)?;
    msg.verify_signature(external_aad, |sig, tbs| verify_es256(key, tbs, sig))?;
    Ok(Verified {
        payload,
        protected: protected_fields(&msg),
    })
}

/// Checks every rule of the module documentation that needs no key (tag 18, deterministic
/// encoding, `alg` ES256 in the protected header only, no `crit`, an empty unprotected header,
/// an attached payload, a 64-byte signature) and answers the
/// signed header fields, so a verifier can pick the key by its `kid` before calling
/// [`verify_sign1_es256`]. Nothing returned here is authenticated yet.
///
/// # Errors
/// The [`CoseError`] for the first rule the message breaks.
pub fn inspect_sign1_es256(bytes: &[u8]) -> Result<ProtectedFields, CoseError> {
    let (msg, _) = decode_checked(bytes)?;
    if msg.signature.len() != ES256_SIGNATURE_LEN {
        return Err(CoseError::SignatureLength(msg.signature.len()));
    }
    Ok(protected_fields(&msg))
}

fn decode_checked(bytes: &[u8]) -> Result<(CoseSign1, Vec<u8>), CoseError> {
    let msg = decode_strict(bytes)?;
    let protected = &msg.protected.header;
    if msg.unprotected.alg.is_some() {
        return Err(CoseError::UnprotectedAlgorithm);
    }
    match &protected.alg {
        None => return Err(CoseError::MissingAlgorithm),
        Some(RegisteredLabelWithPrivate::Assigned(iana::Algorithm::ES256)) => {}
        Some(other) => return Err(CoseError::UnsupportedAlgorithm(format!("{other:?}"))),
    }
    if !protected.crit.is_empty() || !msg.unprotected.crit.is_empty() {
        return Err(CoseError::CriticalHeaders);
    }
    if !msg.unprotected.is_empty() {
        return Err(CoseError::UnprotectedHeader);
    }
    let Some(payload) = msg.payload.clone() else {
        return Err(CoseError::DetachedPayload);
    };
    Ok((msg, payload))
}

/// Decodes a COSE_Sign1 that is in the one encoding countersign accepts (module
/// documentation): tag 18, deterministic CBOR as a whole and in the protected header bytes.
/// The header rules (`alg`, `crit`, an empty unprotected header) are [`decode_checked`]'s.
///
/// # Errors
/// [`CoseError::Untagged`], [`CoseError::WrongTag`], [`CoseError::NotDeterministic`] or
/// [`CoseError::Malformed`].
pub fn decode_strict(bytes: &[u8]) -> Result<CoseSign1, CoseError> {
    // The tag first, read leniently, so that an untagged or otherwise tagged message is named
    // as such rather than as a mere encoding problem.
    match cbor::decode_value(bytes) {
        Ok(cbor::Value::Tag(COSE_SIGN1_TAG, _)) => {}
        Ok(cbor::Value::Tag(other, _)) => return Err(CoseError::WrongTag(other)),
        Ok(_) => return Err(CoseError::Untagged),
        Err(e) => return Err(CoseError::Malformed(e.to_string())),
    }
    let value = cbor::decode_canonical(bytes).map_err(|e| not_deterministic(e, "COSE_Sign1"))?;
    // The protected header is a map inside a byte string: its encoding is checked the same way
    // (before coset reads it). A zero-length one is the one encoding of "no protected
    // attributes" (RFC 9052 §3), refused later for its missing `alg`.
    if let cbor::Value::Tag(_, inner) = &value
        && let cbor::Value::Array(items) = inner.as_ref()
        && let Some(cbor::Value::Bytes(header)) = items.first()
        && !header.is_empty()
    {
        cbor::decode_canonical(header).map_err(|e| not_deterministic(e, "protected header"))?;
    }
    Ok(CoseSign1::from_tagged_slice(bytes)?)
}

fn not_deterministic(e: CborError, what: &'static str) -> CoseError {
    match e {
        CborError::NotDeterministic => CoseError::NotDeterministic(what),
        other => CoseError::Malformed(other.to_string()),
    }
}

fn protected_fields(msg: &CoseSign1) -> ProtectedFields {
    let protected = &msg.protected.header;
    ProtectedFields {
        content_type: protected.content_type.as_ref().map(|c| match c {
            RegisteredLabel::Assigned(f) => ContentType::CoapFormat(f.to_i64()),
            RegisteredLabel::Text(t) => ContentType::MediaType(t.clone()),
        }),
        key_id: (!protected.key_id.is_empty()).then(|| protected.key_id.clone()),
    }
}

/// The Sig_structure (the exact bytes ES256 signs) of a COSE_Sign1 message, for diagnostics and
/// for checking another implementation byte for byte. No signature is checked, and the input
/// is read leniently (untagged, any encoding, any unprotected header): this is not a verifier.
///
/// # Errors
/// [`CoseError::Malformed`] or [`CoseError::WrongTag`] if `bytes` is not a COSE_Sign1.
pub fn to_be_signed(bytes: &[u8], external_aad: &[u8]) -> Result<Vec<u8>, CoseError> {
    Ok(decode_lenient(bytes)?.tbs_data(external_aad))
}

/// Signs `message` with ES256 (SHA-256, RFC 6979 deterministic nonce) and returns the low-S
/// `r ‖ s` form.
#[must_use]
pub fn sign_es256(key: &SigningKey, message: &[u8]) -> [u8; ES256_SIGNATURE_LEN] {
    let sig: Signature = key.sign(message);
    sig.normalize_s().to_bytes().into()
}

/// Verifies a raw ES256 signature `r ‖ s` over `message`: exactly 64 bytes, `r` and `s` in
/// `[1, n−1]`, either `s` half accepted (see the module documentation). This is the single
/// verification primitive all COSE verification goes through.
///
/// # Errors
/// [`CoseError::SignatureLength`] or [`CoseError::BadSignature`].
pub fn verify_es256(key: &VerifyingKey, message: &[u8], signature: &[u8]) -> Result<(), CoseError> {
    if signature.len() != ES256_SIGNATURE_LEN {
        return Err(CoseError::SignatureLength(signature.len()));
    }
    // `r`, `s` in [1, n−1], checked by the parser; the verification itself is ring's, about
    // five times faster than the pure-Rust arithmetic here (19k against 3.7k verifications/s
    // on one core), which the NS pays for every attestation and device signature. Signing
    // stays with `p256`: it is deterministic (RFC 6979), ring's is randomised.
    Signature::from_slice(signature).map_err(|_| CoseError::BadSignature)?;
    let point = key.as_affine().to_sec1_point(false);
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_FIXED,
        point.as_bytes(),
    )
    .verify(message, signature)
    .map_err(|_| CoseError::BadSignature)
}

fn decode_lenient(bytes: &[u8]) -> Result<CoseSign1, CoseError> {
    // `Value::from_slice` refuses trailing bytes after the one data item.
    let mut msg = match Value::from_slice(bytes)? {
        Value::Tag(COSE_SIGN1_TAG, inner) => CoseSign1::from_cbor_value(*inner)?,
        Value::Tag(other, _) => return Err(CoseError::WrongTag(other)),
        untagged => CoseSign1::from_cbor_value(untagged)?,
    };
    // RFC 9052 §4.4: with no protected attributes the Sig_structure carries a zero-length bstr,
    // even when the sender wrote an empty map (h'A0'), which §3 says recipients must accept.
    if msg.protected.header.is_empty() {
        msg.protected.original_data = None;
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_slice(&[seed; 32]).unwrap()
    }

    fn fields() -> ProtectedFields {
        ProtectedFields {
            content_type: Some(ContentType::MediaType("application/example+cbor".into())),
            key_id: Some(b"k1".to_vec()),
        }
    }

    #[test]
    fn round_trip_and_tagging() {
        let k = key(7);
        let msg = sign1_es256(&k, &fields(), b"hello", b"aad").unwrap();
        assert_eq!(msg.first(), Some(&0xD2), "tag 18");
        let v = verify_sign1_es256(&msg, k.verifying_key(), b"aad").unwrap();
        assert_eq!(v.payload, b"hello");
        assert_eq!(v.protected, fields());
        // Deterministic: same inputs, same bytes.
        assert_eq!(msg, sign1_es256(&k, &fields(), b"hello", b"aad").unwrap());
    }

    #[test]
    fn wrong_aad_key_trailing_bytes_and_every_flipped_byte_fail() {
        let k = key(7);
        let msg = sign1_es256(&k, &fields(), b"hello", b"aad").unwrap();
        assert_eq!(
            verify_sign1_es256(&msg, k.verifying_key(), b"other"),
            Err(CoseError::BadSignature)
        );
        assert_eq!(
            verify_sign1_es256(&msg, key(8).verifying_key(), b"aad"),
            Err(CoseError::BadSignature)
        );
        let mut long = msg.clone();
        long.push(0);
        assert!(matches!(
            verify_sign1_es256(&long, k.verifying_key(), b"aad"),
            Err(CoseError::Malformed(_))
        ));
        for i in 0..msg.len() {
            let mut bad = msg.clone();
            bad[i] ^= 0x01;
            assert!(
                verify_sign1_es256(&bad, k.verifying_key(), b"aad").is_err(),
                "byte {i}"
            );
        }
    }

    #[test]
    fn signatures_are_low_s_and_high_s_is_accepted() {
        let k = key(9);
        let sig = Signature::from_slice(&sign_es256(&k, b"m")).unwrap();
        assert_eq!(sig, sig.normalize_s());
        // (r, n − s) is the same signature mathematically; we accept it.
        let (r, s) = sig.split_scalars();
        let high = Signature::from_scalars(r.to_bytes(), (-*s).to_bytes()).unwrap();
        assert_ne!(high, sig);
        verify_es256(k.verifying_key(), b"m", &high.to_bytes()).unwrap();
    }

    fn forge(protected: HeaderBuilder, unprotected: HeaderBuilder, k: &SigningKey) -> Vec<u8> {
        CoseSign1Builder::new()
            .protected(protected.build())
            .unprotected(unprotected.build())
            .payload(b"p".to_vec())
            .create_signature(b"", |tbs| sign_es256(k, tbs).to_vec())
            .build()
            .to_tagged_vec()
            .unwrap()
    }

    #[test]
    fn header_rules() {
        let k = key(3);
        let vk = k.verifying_key();
        let es256 = || HeaderBuilder::new().algorithm(iana::Algorithm::ES256);
        let none = HeaderBuilder::new;
        assert_eq!(
            verify_sign1_es256(&forge(none(), es256(), &k), vk, b""),
            Err(CoseError::UnprotectedAlgorithm)
        );
        assert_eq!(
            verify_sign1_es256(&forge(es256(), es256(), &k), vk, b""),
            Err(CoseError::UnprotectedAlgorithm)
        );
        assert_eq!(
            verify_sign1_es256(&forge(none(), none(), &k), vk, b""),
            Err(CoseError::MissingAlgorithm)
        );
        let es384 = HeaderBuilder::new().algorithm(iana::Algorithm::ES384);
        assert!(matches!(
            verify_sign1_es256(&forge(es384, none(), &k), vk, b""),
            Err(CoseError::UnsupportedAlgorithm(_))
        ));
        let crit = es256().add_critical(iana::HeaderParameter::Alg);
        assert_eq!(
            verify_sign1_es256(&forge(crit, none(), &k), vk, b""),
            Err(CoseError::CriticalHeaders)
        );
        verify_sign1_es256(&forge(es256(), none(), &k), vk, b"").unwrap();
    }

    #[test]
    fn only_the_one_deterministic_encoding_is_accepted() {
        let k = key(7);
        let vk = k.verifying_key();
        let msg = sign1_es256(&k, &fields(), b"hello", b"aad").unwrap();
        // What we sign is itself the canonical form.
        assert_eq!(
            cbor::encode_canonical(&cbor::decode_value(&msg).unwrap()),
            msg
        );
        let variants = noncanonical::variants(&msg).unwrap();
        assert_eq!(variants.len(), 13);
        for v in variants {
            // The signature still verifies over the same Sig_structure: only the rule refuses it.
            let tbs = to_be_signed(&v.bytes, b"aad").unwrap();
            let sig = decode_lenient(&v.bytes).unwrap().signature;
            verify_es256(vk, &tbs, &sig).unwrap();
            assert_eq!(
                verify_sign1_es256(&v.bytes, vk, b"aad"),
                Err(v.refused_with.clone()),
                "{}",
                v.name
            );
            assert_eq!(
                inspect_sign1_es256(&v.bytes),
                Err(v.refused_with),
                "{}",
                v.name
            );
        }
        let loose = noncanonical::loose_protected_header(&msg, &k, b"aad").unwrap();
        verify_es256(
            vk,
            &to_be_signed(&loose, b"aad").unwrap(),
            &decode_lenient(&loose).unwrap().signature,
        )
        .unwrap();
        assert_eq!(
            verify_sign1_es256(&loose, vk, b"aad"),
            Err(CoseError::NotDeterministic("protected header"))
        );
        // A protected header with its keys out of order, re-signed.
        let mut m = decode_lenient(&msg).unwrap();
        let reordered =
            noncanonical::reordered_map(m.protected.original_data.as_ref().unwrap()).unwrap();
        m.protected.original_data = Some(reordered);
        let tbs = m.tbs_data(b"aad");
        m.signature = sign_es256(&k, &tbs).to_vec();
        assert_eq!(
            verify_sign1_es256(&m.to_tagged_vec().unwrap(), vk, b"aad"),
            Err(CoseError::NotDeterministic("protected header"))
        );
        // A repeated key in the protected header, re-signed: refused before coset reads it.
        let mut m = decode_lenient(&msg).unwrap();
        m.protected.original_data = Some(hex::decode("a201260126").unwrap());
        let tbs = m.tbs_data(b"aad");
        m.signature = sign_es256(&k, &tbs).to_vec();
        assert_eq!(
            verify_sign1_es256(&m.to_tagged_vec().unwrap(), vk, b"aad"),
            Err(CoseError::NotDeterministic("protected header"))
        );
    }

    #[test]
    fn wrong_tag_detached_and_short_signature_fail() {
        let k = key(3);
        let vk = k.verifying_key();
        let mut msg = CoseSign1Builder::new()
            .protected(
                HeaderBuilder::new()
                    .algorithm(iana::Algorithm::ES256)
                    .build(),
            )
            .create_signature(b"", |tbs| sign_es256(&k, tbs).to_vec())
            .build();
        assert_eq!(
            verify_sign1_es256(&msg.clone().to_tagged_vec().unwrap(), vk, b""),
            Err(CoseError::DetachedPayload)
        );
        msg.payload = Some(vec![]);
        msg.signature.truncate(63);
        assert_eq!(
            verify_sign1_es256(&msg.clone().to_tagged_vec().unwrap(), vk, b""),
            Err(CoseError::SignatureLength(63))
        );
        assert_eq!(
            verify_sign1_es256(&msg.clone().to_vec().unwrap(), vk, b""),
            Err(CoseError::Untagged)
        );
        let wrong_tag = Value::Tag(98, Box::new(msg.to_cbor_value().unwrap()))
            .to_vec()
            .unwrap();
        assert_eq!(
            verify_sign1_es256(&wrong_tag, vk, b""),
            Err(CoseError::WrongTag(98))
        );
        for junk in [&[][..], &[0xff], &[0xd2], &[0x84, 0x40]] {
            assert!(matches!(
                verify_sign1_es256(junk, vk, b""),
                Err(CoseError::Malformed(_))
            ));
        }
    }
}
