//! The encodings of a COSE_Sign1 that a verifier must refuse although their signature still
//! verifies: negative conformance vectors, for this crate's tests and for anyone testing
//! their own verifier of countersign's checkpoints, attestations or device signatures.
//!
//! Each variant of a valid message keeps the Sig_structure (the protected header bytes and the
//! payload are untouched, or re-signed where they are not), so a verifier that accepts one of
//! them accepts two files for one signed object. The rule they break is the module rule of
//! [`crate::cose`]: tag 18 in its shortest form, deterministic CBOR, an empty unprotected
//! header.

use coset::{CoseSign1, TaggedCborSerializable as _};
use p256::ecdsa::SigningKey;

use super::{CoseError, decode_lenient, sign_es256};
use crate::cbor::{self, Value};

/// One way of writing a valid message that must be refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variant {
    /// What was changed, for test messages.
    pub name: &'static str,
    /// The re-encoded message.
    pub bytes: Vec<u8>,
    /// What [`super::verify_sign1_es256`] answers for it.
    pub refused_with: CoseError,
}

const MAJOR_BYTES: u8 = 2;
const MAJOR_ARRAY: u8 = 4;
const MAJOR_MAP: u8 = 5;

fn head(major: u8, arg: u64) -> Vec<u8> {
    let mut out = Vec::new();
    cbor::write_head(&mut out, major, arg);
    out
}

fn len(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn bstr(bytes: &[u8]) -> Vec<u8> {
    let mut out = head(MAJOR_BYTES, len(bytes.len()));
    out.extend_from_slice(bytes);
    out
}

/// A byte string whose length is written one size wider than needed (never shortest).
fn wide_bstr(bytes: &[u8]) -> Vec<u8> {
    let mut out = match u16::try_from(bytes.len()) {
        Ok(n) if n < 0x100 => {
            let mut h = vec![(MAJOR_BYTES << 5) | 25];
            h.extend_from_slice(&n.to_be_bytes());
            h
        }
        _ => {
            let mut h = vec![(MAJOR_BYTES << 5) | 27];
            h.extend_from_slice(&len(bytes.len()).to_be_bytes());
            h
        }
    };
    out.extend_from_slice(bytes);
    out
}

/// An indefinite-length byte string of one chunk.
fn chunked_bstr(bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![(MAJOR_BYTES << 5) | 31];
    out.extend(bstr(bytes));
    out.push(0xff);
    out
}

struct Parts {
    protected: Vec<u8>,
    payload: Vec<u8>,
    signature: Vec<u8>,
}

impl Parts {
    /// `tag ‖ array head ‖ protected ‖ unprotected ‖ payload ‖ signature ‖ trailer`.
    fn write(&self, tag: &[u8], array: &[u8], unprotected: &[u8], trailer: &[u8]) -> Vec<u8> {
        self.write_items(
            tag,
            array,
            [
                bstr(&self.protected),
                unprotected.to_vec(),
                bstr(&self.payload),
                bstr(&self.signature),
            ],
            trailer,
        )
    }

    fn write_items(
        &self,
        tag: &[u8],
        array: &[u8],
        items: [Vec<u8>; 4],
        trailer: &[u8],
    ) -> Vec<u8> {
        let mut out = tag.to_vec();
        out.extend_from_slice(array);
        for item in items {
            out.extend(item);
        }
        out.extend_from_slice(trailer);
        out
    }
}

fn parts(message: &[u8]) -> Result<Parts, CoseError> {
    let msg = decode_lenient(message)?;
    Ok(Parts {
        protected: msg.protected.original_data.clone().unwrap_or_default(),
        payload: msg.payload.clone().ok_or(CoseError::DetachedPayload)?,
        signature: msg.signature,
    })
}

/// Every re-encoding of `message` (a COSE_Sign1 with an attached payload) that keeps its
/// signature valid and must be refused: untagged; the tag as `d812` and `d90012`; the array
/// indefinite or with a long head; the payload and the signature with long or indefinite
/// heads; the unprotected header holding another `kid`, a content type or a 15,000-byte blob,
/// or written `b800` / `bfff`.
///
/// # Errors
/// [`CoseError::Malformed`] (or another decoding error) if `message` is not a COSE_Sign1.
pub fn variants(message: &[u8]) -> Result<Vec<Variant>, CoseError> {
    let p = parts(message)?;
    let tag = [0xd2];
    let array = head(MAJOR_ARRAY, 4);
    let empty = head(MAJOR_MAP, 0);
    let not_det = || CoseError::NotDeterministic("COSE_Sign1");
    let blob = {
        // {"x": h'00…'} with 15,000 bytes: anything at all can ride there.
        let mut m = head(MAJOR_MAP, 1);
        m.extend([0x61, b'x']);
        m.extend(bstr(&[0u8; 15_000]));
        m
    };
    let kid = {
        let mut m = head(MAJOR_MAP, 1);
        m.push(0x04);
        m.extend(bstr(b"another key"));
        m
    };
    let content_type = {
        let mut m = head(MAJOR_MAP, 1);
        m.push(0x03);
        m.extend(cbor::encode_canonical(&Value::Text(
            "text/plain".to_owned(),
        )));
        m
    };
    let items = |payload: Vec<u8>, signature: Vec<u8>| {
        [bstr(&p.protected), empty.clone(), payload, signature]
    };
    Ok(vec![
        Variant {
            name: "untagged",
            bytes: p.write(&[], &array, &empty, &[]),
            refused_with: CoseError::Untagged,
        },
        Variant {
            name: "tag 18 written d812",
            bytes: p.write(&[0xd8, 0x12], &array, &empty, &[]),
            refused_with: not_det(),
        },
        Variant {
            name: "tag 18 written d90012",
            bytes: p.write(&[0xd9, 0x00, 0x12], &array, &empty, &[]),
            refused_with: not_det(),
        },
        Variant {
            name: "indefinite-length array",
            bytes: p.write(&tag, &[0x9f], &empty, &[0xff]),
            refused_with: not_det(),
        },
        Variant {
            name: "array head 9804",
            bytes: p.write(&tag, &[0x98, 0x04], &empty, &[]),
            refused_with: not_det(),
        },
        Variant {
            name: "payload with a non-shortest length",
            bytes: p.write_items(
                &tag,
                &array,
                items(wide_bstr(&p.payload), bstr(&p.signature)),
                &[],
            ),
            refused_with: not_det(),
        },
        Variant {
            name: "indefinite-length payload",
            bytes: p.write_items(
                &tag,
                &array,
                items(chunked_bstr(&p.payload), bstr(&p.signature)),
                &[],
            ),
            refused_with: not_det(),
        },
        Variant {
            name: "signature with a non-shortest length",
            bytes: p.write_items(
                &tag,
                &array,
                items(bstr(&p.payload), wide_bstr(&p.signature)),
                &[],
            ),
            refused_with: not_det(),
        },
        Variant {
            name: "empty unprotected header written b800",
            bytes: p.write(&tag, &array, &[0xb8, 0x00], &[]),
            refused_with: not_det(),
        },
        Variant {
            name: "empty unprotected header written bfff",
            bytes: p.write(&tag, &array, &[0xbf, 0xff], &[]),
            refused_with: not_det(),
        },
        Variant {
            name: "another kid in the unprotected header",
            bytes: p.write(&tag, &array, &kid, &[]),
            refused_with: CoseError::UnprotectedHeader,
        },
        Variant {
            name: "a content type in the unprotected header",
            bytes: p.write(&tag, &array, &content_type, &[]),
            refused_with: CoseError::UnprotectedHeader,
        },
        Variant {
            name: "a 15,000-byte blob in the unprotected header",
            bytes: p.write(&tag, &array, &blob, &[]),
            refused_with: CoseError::UnprotectedHeader,
        },
    ])
}

/// `message` with its protected header map re-encoded with a non-shortest head and *re-signed*
/// by `key` over the new Sig_structure, so the signature verifies and only the encoding of the
/// protected header is wrong: refused with [`CoseError::NotDeterministic`]`("protected
/// header")`.
///
/// # Errors
/// A decoding error if `message` is not a COSE_Sign1 with a protected header map.
pub fn loose_protected_header(
    message: &[u8],
    key: &SigningKey,
    external_aad: &[u8],
) -> Result<Vec<u8>, CoseError> {
    let mut msg: CoseSign1 = decode_lenient(message)?;
    let original = msg.protected.original_data.clone().unwrap_or_default();
    let Ok(Value::Map(entries)) = cbor::decode_value(&original) else {
        return Err(CoseError::Malformed("no protected header map".to_owned()));
    };
    // The same map, its length written as `b8 nn` instead of `a0 + n`.
    let mut loose = vec![
        (MAJOR_MAP << 5) | 24,
        u8::try_from(entries.len()).unwrap_or(0),
    ];
    loose.extend(original.iter().skip(1));
    msg.protected.original_data = Some(loose);
    let tbs = msg.tbs_data(external_aad);
    msg.signature = sign_es256(key, &tbs).to_vec();
    Ok(msg.to_tagged_vec()?)
}

/// A CBOR map re-encoded with its first key–value pair moved last (out of deterministic order),
/// for a payload-level variant; `None` if `bytes` is not a map of at least two pairs.
#[must_use]
pub fn reordered_map(bytes: &[u8]) -> Option<Vec<u8>> {
    let Ok(Value::Map(mut entries)) = cbor::decode_value(bytes) else {
        return None;
    };
    if entries.len() < 2 {
        return None;
    }
    entries.rotate_left(1);
    let mut out = head(MAJOR_MAP, len(entries.len()));
    for (k, v) in &entries {
        out.extend(cbor::encode_canonical(k));
        out.extend(cbor::encode_canonical(v));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_variants_differ_from_the_original_and_keep_its_sig_structure() {
        let k = SigningKey::from_slice(&[3; 32]).unwrap();
        let msg = super::super::sign1_es256(&k, &Default::default(), b"hello", b"").unwrap();
        let tbs = super::super::to_be_signed(&msg, b"").unwrap();
        for v in variants(&msg).unwrap() {
            assert_ne!(v.bytes, msg, "{}", v.name);
            assert_eq!(
                super::super::to_be_signed(&v.bytes, b"").unwrap(),
                tbs,
                "{}",
                v.name
            );
        }
    }
}
