//! Signed tree heads ("checkpoints"): the deployment's audit key vouching for the root of the
//! audit tree at a size and time. An inclusion or consistency proof proves nothing on its own
//! (the root hash does not even commit to the tree size); it proves something only against a
//! checkpoint whose signature, content type, key id and payload have all been checked, which is
//! what the `verify_*_against_checkpoint` functions here do, link by link.
//!
//! Wire format, for verifiers in other languages:
//! - A tagged COSE_Sign1 (tag 18, written `d2`), ES256, empty external AAD, an empty
//!   unprotected header (`a0`: a `kid` or anything else there is refused), deterministic CBOR
//!   throughout (refused otherwise, by [`crate::cose`]), and the protected header
//!   `{1: -7, 3: "application/countersign-checkpoint+cbor", 4: kid}` where
//!   `kid` = SHA-256 of the audit key's 33-byte compressed SEC1 encoding.
//! - The payload is this CBOR map, in RFC 8949 §4.2.1 core deterministic encoding (definite
//!   lengths, shortest-form heads, keys in ascending order), and nothing else is accepted:
//!
//!   ```text
//!   A4                         map, 4 pairs
//!     01  78 xx / 6x  origin   1: origin, text, 1..=255 bytes of UTF-8
//!     02  <uint>               2: tree_size, unsigned
//!     03  58 20 <32 bytes>     3: root_hash, byte string of exactly 32 bytes
//!     04  <uint | nint>        4: timestamp_ms, signed milliseconds since the Unix epoch
//!   ```
//!
//! The timestamp is an input: whoever issues checkpoints reads the clock, not this module.

use p256::ecdsa::{SigningKey, VerifyingKey};
use sha2::{Digest as _, Sha256};

use crate::cose::{self, ContentType, CoseError, ProtectedFields};
use crate::merkle::{self, Hash, ProofError};

/// The content type every checkpoint's protected header carries.
pub const CHECKPOINT_CONTENT_TYPE: &str = "application/countersign-checkpoint+cbor";

/// Longest origin accepted, in bytes.
pub const MAX_ORIGIN_LEN: usize = 255;

/// What a checkpoint says: the tree named `origin` had `tree_size` leaves and root `root_hash`
/// at `timestamp_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeHead {
    /// Which log this is (e.g. the deployment's host name); ties a checkpoint to one tree.
    pub origin: String,
    /// Number of leaves.
    pub tree_size: u64,
    /// RFC 9162 root of the first `tree_size` leaves.
    pub root_hash: Hash,
    /// When it was issued, in milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
}

/// Why a checkpoint, or a proof against one, was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// The COSE envelope or its signature is bad (a 4xx, or tampering).
    #[error(transparent)]
    Cose(#[from] CoseError),
    /// Validly signed, but not a checkpoint (another kind of payload from the same key).
    #[error("content type is not {CHECKPOINT_CONTENT_TYPE}")]
    WrongContentType,
    /// The signed key id is not the id of the key it verified under.
    #[error("the signed key id does not name the verifying key")]
    KeyIdMismatch,
    /// The payload is not the canonical tree head encoding.
    #[error("malformed checkpoint payload: {0}")]
    MalformedPayload(&'static str),
    /// The origin is empty or longer than 255 bytes (refused when signing too).
    #[error("origin must be 1 to 255 bytes")]
    InvalidOrigin,
    /// Two checkpoints name different logs.
    #[error("checkpoints are for different logs: {old:?} and {new:?}")]
    OriginMismatch {
        /// Origin of the earlier checkpoint.
        old: String,
        /// Origin of the later checkpoint.
        new: String,
    },
    /// The proof does not hold against the checkpoint.
    #[error(transparent)]
    Proof(#[from] ProofError),
}

impl TreeHead {
    /// The canonical CBOR payload (layout in the module documentation).
    ///
    /// # Errors
    /// [`CheckpointError::InvalidOrigin`] for an empty or over-long origin.
    pub fn to_cbor(&self) -> Result<Vec<u8>, CheckpointError> {
        check_origin(&self.origin)?;
        let mut out = Vec::with_capacity(64 + self.origin.len());
        crate::cbor::write_head(&mut out, MAJOR_MAP, 4);
        crate::cbor::write_head(&mut out, MAJOR_UINT, 1);
        crate::cbor::write_head(&mut out, MAJOR_TEXT, self.origin.len() as u64);
        out.extend_from_slice(self.origin.as_bytes());
        crate::cbor::write_head(&mut out, MAJOR_UINT, 2);
        crate::cbor::write_head(&mut out, MAJOR_UINT, self.tree_size);
        crate::cbor::write_head(&mut out, MAJOR_UINT, 3);
        crate::cbor::write_head(&mut out, MAJOR_BYTES, self.root_hash.len() as u64);
        out.extend_from_slice(&self.root_hash);
        crate::cbor::write_head(&mut out, MAJOR_UINT, 4);
        match u64::try_from(self.timestamp_ms) {
            Ok(t) => crate::cbor::write_head(&mut out, MAJOR_UINT, t),
            // CBOR negative integers carry -1 - n; for n < 0 that is !n as u64.
            Err(_) => crate::cbor::write_head(&mut out, MAJOR_NINT, !(self.timestamp_ms as u64)),
        }
        Ok(out)
    }

    /// Decodes exactly the canonical payload and nothing else: any other key order, extra or
    /// missing key, longer-than-needed head, indefinite length or trailing byte is refused, so
    /// one tree head has exactly one encoding.
    ///
    /// # Errors
    /// [`CheckpointError::MalformedPayload`] or [`CheckpointError::InvalidOrigin`].
    pub fn from_cbor(bytes: &[u8]) -> Result<Self, CheckpointError> {
        let mut r = Reader(bytes);
        r.expect(MAJOR_MAP, 4, "expected a map of 4 pairs")?;
        r.expect(MAJOR_UINT, 1, "expected key 1 (origin)")?;
        let len = r.arg(MAJOR_TEXT, "origin must be a text string")?;
        let len = usize::try_from(len).map_err(|_| CheckpointError::InvalidOrigin)?;
        if len == 0 || len > MAX_ORIGIN_LEN {
            return Err(CheckpointError::InvalidOrigin);
        }
        let origin = std::str::from_utf8(r.take(len)?)
            .map_err(|_| CheckpointError::MalformedPayload("origin is not UTF-8"))?
            .to_owned();
        r.expect(MAJOR_UINT, 2, "expected key 2 (tree_size)")?;
        let tree_size = r.arg(MAJOR_UINT, "tree_size must be an unsigned integer")?;
        r.expect(MAJOR_UINT, 3, "expected key 3 (root_hash)")?;
        r.expect(MAJOR_BYTES, 32, "root_hash must be a 32-byte string")?;
        let root_hash: Hash = r
            .take(32)?
            .try_into()
            .map_err(|_| CheckpointError::MalformedPayload("root_hash must be 32 bytes"))?;
        r.expect(MAJOR_UINT, 4, "expected key 4 (timestamp_ms)")?;
        let (major, n) = r.head()?;
        let n = i64::try_from(n)
            .map_err(|_| CheckpointError::MalformedPayload("timestamp_ms out of range"))?;
        let timestamp_ms = match major {
            MAJOR_UINT => n,
            MAJOR_NINT => -1 - n,
            _ => {
                return Err(CheckpointError::MalformedPayload(
                    "timestamp_ms must be an integer",
                ));
            }
        };
        if !r.0.is_empty() {
            return Err(CheckpointError::MalformedPayload("trailing bytes"));
        }
        Ok(Self {
            origin,
            tree_size,
            root_hash,
            timestamp_ms,
        })
    }
}

/// The key id checkpoints carry: SHA-256 of the compressed SEC1 public key.
#[must_use]
pub fn key_id(key: &VerifyingKey) -> Vec<u8> {
    Sha256::digest(key.to_sec1_point(true).as_bytes()).to_vec()
}

/// Signs a tree head with the audit key (deterministic ECDSA: same head, same bytes).
///
/// # Errors
/// [`CheckpointError::InvalidOrigin`] for an empty or over-long origin.
pub fn sign_checkpoint(head: &TreeHead, key: &SigningKey) -> Result<Vec<u8>, CheckpointError> {
    let fields = ProtectedFields {
        content_type: Some(ContentType::MediaType(CHECKPOINT_CONTENT_TYPE.to_owned())),
        key_id: Some(key_id(key.verifying_key())),
    };
    Ok(cose::sign1_es256(key, &fields, &head.to_cbor()?, b"")?)
}

/// Verifies a checkpoint under the audit key: COSE rules, signature, content type, key id,
/// canonical payload. The caller that knows which log it expects compares `origin`.
///
/// # Errors
/// The [`CheckpointError`] for the first check that failed.
pub fn verify_checkpoint(bytes: &[u8], key: &VerifyingKey) -> Result<TreeHead, CheckpointError> {
    let verified = cose::verify_sign1_es256(bytes, key, b"")?;
    match &verified.protected.content_type {
        Some(ContentType::MediaType(t)) if t == CHECKPOINT_CONTENT_TYPE => {}
        _ => return Err(CheckpointError::WrongContentType),
    }
    if verified.protected.key_id.as_deref() != Some(key_id(key).as_slice()) {
        return Err(CheckpointError::KeyIdMismatch);
    }
    TreeHead::from_cbor(&verified.payload)
}

/// Checks that the leaf with canonical bytes `leaf_bytes` is at `index` in the tree a checkpoint
/// vouches for: the checkpoint is verified first, and the tree size and root come from it, never
/// from the caller. Returns the verified tree head.
///
/// # Errors
/// [`CheckpointError::Proof`] if the proof fails, or what [`verify_checkpoint`] reports.
pub fn verify_inclusion_against_checkpoint<P: AsRef<[u8]>>(
    leaf_bytes: &[u8],
    index: u64,
    proof: &[P],
    checkpoint: &[u8],
    key: &VerifyingKey,
) -> Result<TreeHead, CheckpointError> {
    let head = verify_checkpoint(checkpoint, key)?;
    merkle::verify_inclusion(
        &merkle::leaf_hash(leaf_bytes),
        index,
        head.tree_size,
        proof,
        &head.root_hash,
    )?;
    Ok(head)
}

/// Checks that the tree of checkpoint `new` extends the tree of checkpoint `old` (both verified
/// under `key`, same origin), as a monitor does for each new checkpoint. An empty old tree is a
/// prefix of every tree, so against it the proof must be empty and its root the empty root.
/// Returns both verified heads; comparing their timestamps is left to the caller.
///
/// # Errors
/// [`CheckpointError::OriginMismatch`], [`CheckpointError::Proof`], or what
/// [`verify_checkpoint`] reports for either.
pub fn verify_consistency_between_checkpoints<P: AsRef<[u8]>>(
    old: &[u8],
    new: &[u8],
    proof: &[P],
    key: &VerifyingKey,
) -> Result<(TreeHead, TreeHead), CheckpointError> {
    let old = verify_checkpoint(old, key)?;
    let new = verify_checkpoint(new, key)?;
    if old.origin != new.origin {
        return Err(CheckpointError::OriginMismatch {
            old: old.origin,
            new: new.origin,
        });
    }
    if old.tree_size == 0 {
        if !proof.is_empty() {
            return Err(ProofError::WrongProofLength {
                expected: 0,
                got: proof.len(),
            }
            .into());
        }
        if old.root_hash != merkle::empty_root() {
            return Err(ProofError::OldRootMismatch.into());
        }
        if new.tree_size == 0 && new.root_hash != old.root_hash {
            return Err(ProofError::NewRootMismatch.into());
        }
        return Ok((old, new));
    }
    merkle::verify_consistency(
        old.tree_size,
        new.tree_size,
        &old.root_hash,
        &new.root_hash,
        proof,
    )?;
    Ok((old, new))
}

fn check_origin(origin: &str) -> Result<(), CheckpointError> {
    if origin.is_empty() || origin.len() > MAX_ORIGIN_LEN {
        Err(CheckpointError::InvalidOrigin)
    } else {
        Ok(())
    }
}

const MAJOR_UINT: u8 = 0;
const MAJOR_NINT: u8 = 1;
const MAJOR_BYTES: u8 = 2;
const MAJOR_TEXT: u8 = 3;
const MAJOR_MAP: u8 = 5;

/// A strict reader of the few CBOR items a tree head uses; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CheckpointError> {
        let (taken, rest) = self
            .0
            .split_at_checked(n)
            .ok_or(CheckpointError::MalformedPayload("truncated"))?;
        self.0 = rest;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CheckpointError> {
        let (taken, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or(CheckpointError::MalformedPayload("truncated"))?;
        self.0 = rest;
        Ok(*taken)
    }

    /// One head: (major type, argument), refusing anything but the shortest form.
    fn head(&mut self) -> Result<(u8, u64), CheckpointError> {
        let [initial] = self.array::<1>()?;
        let (major, info) = (initial >> 5, initial & 0x1f);
        let (arg, min) = match info {
            0..=23 => (u64::from(info), 0),
            24 => (u64::from(u8::from_be_bytes(self.array()?)), 24),
            25 => (u64::from(u16::from_be_bytes(self.array()?)), 0x100),
            26 => (u64::from(u32::from_be_bytes(self.array()?)), 0x1_0000),
            27 => (u64::from_be_bytes(self.array()?), 0x1_0000_0000),
            _ => {
                return Err(CheckpointError::MalformedPayload(
                    "indefinite length or reserved head",
                ));
            }
        };
        if arg < min {
            return Err(CheckpointError::MalformedPayload(
                "non-shortest integer head",
            ));
        }
        Ok((major, arg))
    }

    fn arg(&mut self, major: u8, what: &'static str) -> Result<u64, CheckpointError> {
        match self.head()? {
            (m, arg) if m == major => Ok(arg),
            _ => Err(CheckpointError::MalformedPayload(what)),
        }
    }

    fn expect(&mut self, major: u8, arg: u64, what: &'static str) -> Result<(), CheckpointError> {
        if self.arg(major, what)? == arg {
            Ok(())
        } else {
            Err(CheckpointError::MalformedPayload(what))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use proptest::prelude::*;

    use super::*;
    use crate::merkle::MemoryTree;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_slice(&[seed; 32]).unwrap()
    }

    fn sample() -> TreeHead {
        TreeHead {
            origin: "audit.example.org".into(),
            tree_size: 1000,
            root_hash: [0xab; 32],
            timestamp_ms: 1_795_000_000_000,
        }
    }

    #[test]
    fn payload_layout_is_the_documented_one() {
        let bytes = sample().to_cbor().unwrap();
        let want = format!(
            "a4 01 71 {} 02 19 03e8 03 5820 {} 04 1b 000001a1ee565e00",
            hex::encode("audit.example.org"),
            "ab".repeat(32)
        )
        .replace(' ', "");
        assert_eq!(hex::encode(&bytes), want);
        assert_eq!(TreeHead::from_cbor(&bytes).unwrap(), sample());
        // Negative timestamps are CBOR negative integers: -1 is 0x20, -1000 is 0x39 03e7.
        for (t, tail) in [
            (-1i64, "0420"),
            (-1000, "043903e7"),
            (i64::MIN, "043b7fffffffffffffff"),
        ] {
            let h = TreeHead {
                timestamp_ms: t,
                ..sample()
            };
            let bytes = h.to_cbor().unwrap();
            assert!(hex::encode(&bytes).ends_with(tail), "{t}");
            assert_eq!(TreeHead::from_cbor(&bytes).unwrap(), h);
        }
        // -2^63 - 1 does not fit an i64.
        let too_small = hex::encode(sample().to_cbor().unwrap())
            .replace("041b000001a1ee565e00", "043b8000000000000000");
        assert!(TreeHead::from_cbor(&hex::decode(too_small).unwrap()).is_err());
    }

    #[test]
    fn non_canonical_payloads_are_refused() {
        let good = hex::encode(sample().to_cbor().unwrap());
        let bad = [
            // tree_size 1000 with a 4-byte head instead of 2.
            good.replace("021903e8", "021a000003e8"),
            // Keys out of order (swap 1 and 2 is not expressible by replace; use an extra key).
            good.replacen("a4", "a5", 1) + "0500",
            // Indefinite-length map.
            good.replacen("a4", "bf", 1) + "ff",
            // Trailing byte.
            good.clone() + "00",
            // Root hash of 31 bytes.
            good.replace(
                &format!("5820{}", "ab".repeat(32)),
                &format!("581f{}", "ab".repeat(31)),
            ),
            // Wrong key for origin.
            good.replacen("a401", "a400", 1),
            // Truncated.
            good[..good.len() - 2].to_owned(),
            String::new(),
        ];
        for b in bad {
            assert!(
                TreeHead::from_cbor(&hex::decode(&b).unwrap()).is_err(),
                "{b}"
            );
        }
        let mut long = sample();
        long.origin = "x".repeat(256);
        assert_eq!(long.to_cbor(), Err(CheckpointError::InvalidOrigin));
        long.origin.clear();
        assert_eq!(
            sign_checkpoint(&long, &key(1)),
            Err(CheckpointError::InvalidOrigin)
        );
    }

    #[test]
    fn signed_checkpoint_round_trips_and_every_flipped_byte_fails() {
        let k = key(5);
        let signed = sign_checkpoint(&sample(), &k).unwrap();
        assert_eq!(
            verify_checkpoint(&signed, k.verifying_key()).unwrap(),
            sample()
        );
        for i in 0..signed.len() {
            for bit in [0x01, 0x80] {
                let mut bad = signed.clone();
                bad[i] ^= bit;
                assert!(
                    verify_checkpoint(&bad, k.verifying_key()).is_err(),
                    "byte {i} bit {bit:#x} accepted"
                );
            }
        }
    }

    #[test]
    fn only_the_one_deterministic_encoding_is_accepted() {
        let k = key(5);
        let signed = sign_checkpoint(&sample(), &k).unwrap();
        for v in cose::noncanonical::variants(&signed).unwrap() {
            assert_eq!(
                verify_checkpoint(&v.bytes, k.verifying_key()),
                Err(CheckpointError::Cose(v.refused_with)),
                "{}",
                v.name
            );
        }
        let loose = cose::noncanonical::loose_protected_header(&signed, &k, b"").unwrap();
        assert_eq!(
            verify_checkpoint(&loose, k.verifying_key()),
            Err(CheckpointError::Cose(CoseError::NotDeterministic(
                "protected header"
            )))
        );
    }

    #[test]
    fn another_key_or_another_kind_of_payload_fails() {
        let signed = sign_checkpoint(&sample(), &key(5)).unwrap();
        assert_eq!(
            verify_checkpoint(&signed, key(6).verifying_key()),
            Err(CheckpointError::Cose(CoseError::BadSignature))
        );
        // Same key, same payload, but signed as something else.
        let k = key(5);
        let payload = sample().to_cbor().unwrap();
        let other = cose::sign1_es256(&k, &ProtectedFields::default(), &payload, b"").unwrap();
        assert_eq!(
            verify_checkpoint(&other, k.verifying_key()),
            Err(CheckpointError::WrongContentType)
        );
        let no_kid = ProtectedFields {
            content_type: Some(ContentType::MediaType(CHECKPOINT_CONTENT_TYPE.into())),
            key_id: Some(key_id(key(6).verifying_key())),
        };
        let other = cose::sign1_es256(&k, &no_kid, &payload, b"").unwrap();
        assert_eq!(
            verify_checkpoint(&other, k.verifying_key()),
            Err(CheckpointError::KeyIdMismatch)
        );
    }

    #[test]
    fn proofs_against_checkpoints() {
        let k = key(5);
        let vk = k.verifying_key();
        let mut tree = MemoryTree::new();
        let events: Vec<Vec<u8>> = (0..300u32)
            .map(|i| format!("event {i}").into_bytes())
            .collect();
        for e in &events {
            tree.push_leaf(e);
        }
        let cp = |size: u64| {
            sign_checkpoint(
                &TreeHead {
                    origin: "o".into(),
                    tree_size: size,
                    root_hash: tree.root_at(size).unwrap(),
                    timestamp_ms: size as i64,
                },
                &k,
            )
            .unwrap()
        };
        let (old, new) = (cp(120), cp(300));
        let proof = tree.inclusion_proof(77, 300).unwrap();
        let head = verify_inclusion_against_checkpoint(&events[77], 77, &proof, &new, vk).unwrap();
        assert_eq!(head.tree_size, 300);
        // Wrong event, wrong position, checkpoint of another size, another key: all fail.
        assert!(verify_inclusion_against_checkpoint(&events[78], 77, &proof, &new, vk).is_err());
        assert!(verify_inclusion_against_checkpoint(&events[77], 78, &proof, &new, vk).is_err());
        assert!(verify_inclusion_against_checkpoint(&events[77], 77, &proof, &old, vk).is_err());
        assert!(
            verify_inclusion_against_checkpoint(
                &events[77],
                77,
                &proof,
                &new,
                key(6).verifying_key()
            )
            .is_err()
        );

        let proof = tree.consistency_proof(120, 300).unwrap();
        verify_consistency_between_checkpoints(&old, &new, &proof, vk).unwrap();
        assert!(verify_consistency_between_checkpoints(&new, &old, &proof, vk).is_err());
        assert!(verify_consistency_between_checkpoints(&old, &cp(299), &proof, vk).is_err());
        let empty = cp(0);
        verify_consistency_between_checkpoints::<Hash>(&empty, &new, &[], vk).unwrap();
        assert!(verify_consistency_between_checkpoints(&empty, &new, &proof, vk).is_err());

        let elsewhere = sign_checkpoint(
            &TreeHead {
                origin: "p".into(),
                ..verify_checkpoint(&new, vk).unwrap()
            },
            &k,
        )
        .unwrap();
        assert!(matches!(
            verify_consistency_between_checkpoints(&old, &elsewhere, &proof, vk),
            Err(CheckpointError::OriginMismatch { .. })
        ));
    }

    proptest! {
        #[test]
        fn any_tree_head_round_trips(
            origin in "[a-z0-9./-]{1,255}",
            tree_size in any::<u64>(),
            root_hash in any::<[u8; 32]>(),
            timestamp_ms in any::<i64>(),
        ) {
            let h = TreeHead { origin, tree_size, root_hash, timestamp_ms };
            prop_assert_eq!(TreeHead::from_cbor(&h.to_cbor().unwrap()).unwrap(), h);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            let _ = TreeHead::from_cbor(&bytes);
            let _ = verify_checkpoint(&bytes, key(1).verifying_key());
        }
    }
}
