//! Deterministic CBOR: the only encoding of event payloads.
//!
//! Owns the byte form that the audit trail hashes (`SHA-256(0x00 ‖ canonical bytes)`), so the
//! same value must always give the same bytes, whichever process or crate version wrote it.
//! Rules enforced on every encode (RFC 8949 §4.2.1, core deterministic encoding):
//! - every integer, length and tag argument in its shortest form;
//! - definite lengths only;
//! - map keys sorted by the bytewise order of their own encoded bytes;
//! - floats in the shortest of binary16/32/64 that keeps the value exactly, every NaN as `f97e00`;
//! - integers outside the 64-bit argument range as bignums (tags 2/3) with no leading zero bytes.
//!
//! Decoding with [`decode_value`] / [`from_slice`] is lenient about form (it accepts any
//! well-formed item, so old or foreign writers can be read); [`decode_canonical`] /
//! [`from_canonical_slice`] also refuse every encoding but the deterministic one, and are what
//! every verifier of signed or hashed bytes uses. Both are strict about content: truncated
//! input, trailing bytes, nesting deeper than 256 levels and wrong shapes are a [`CborError`],
//! never a panic. `cbor4ii` does the parsing
//! and the serde mapping; this module owns only the canonical writer, because `cbor4ii` writes
//! floats at their Rust width and keeps map entries in insertion order.
//!
//! `cbor4ii`'s [`Value`] has no `undefined` or `simple(n)` variant: `undefined` decodes as null
//! and other simple values are rejected. No countersign payload uses them.

pub use cbor4ii::core::Value;
use cbor4ii::core::dec::{Decode, Read};
use cbor4ii::core::enc::Encode;
use cbor4ii::core::utils::{BufWriter, SliceReader};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a value could not be encoded or bytes could not be decoded.
///
/// Messages describe the shape of the problem only; they never echo payload content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CborError {
    /// The value cannot be represented (a serde error from the value's own `Serialize`).
    #[error("cannot encode value as CBOR: {0}")]
    Encode(String),
    /// The bytes are not a well-formed CBOR item, or not of the shape the target type expects.
    #[error("cannot decode CBOR: {0}")]
    Decode(String),
    /// A well-formed item was followed by more bytes: a payload is exactly one item.
    #[error("{0} trailing byte(s) after the CBOR item")]
    TrailingBytes(usize),
    /// Well-formed, but not the core deterministic encoding of what it decodes to (a longer
    /// head than needed, an indefinite length, map keys out of order, a wider float):
    /// refused where one value must have exactly one encoding (see [`decode_canonical`]).
    #[error("not deterministic CBOR (RFC 8949 §4.2.1)")]
    NotDeterministic,
}

/// Serializes `v` with serde and returns its canonical CBOR encoding.
///
/// # Errors
/// [`CborError::Encode`] when the value's `Serialize` implementation fails.
pub fn to_canonical_vec<T: Serialize + ?Sized>(v: &T) -> Result<Vec<u8>, CborError> {
    let value = to_value(v)?;
    Ok(encode_canonical(&value))
}

/// Serializes `v` with serde into a [`Value`] tree (not yet canonical: maps in field order).
///
/// # Errors
/// [`CborError::Encode`] when the value's `Serialize` implementation fails.
pub fn to_value<T: Serialize + ?Sized>(v: &T) -> Result<Value, CborError> {
    // cbor4ii has no serde serializer into `Value`, so go through its (non-canonical) bytes:
    // they are lossless for everything serde produces, and are parsed back right away.
    let mut ser = cbor4ii::serde::Serializer::new(BufWriter::new(Vec::new()));
    v.serialize(&mut ser)
        .map_err(|e| CborError::Encode(format!("{e}")))?;
    decode_value(ser.into_inner().buffer())
}

/// Decodes exactly one CBOR item into `T`.
///
/// # Errors
/// [`CborError::Decode`] for malformed input or a shape `T` does not accept,
/// [`CborError::TrailingBytes`] when bytes follow the item.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CborError> {
    // cbor4ii's serde reader wants floats at the width of the Rust field, but canonical
    // writers (this one included) shorten them; parsing to `Value` first and handing serde
    // cbor4ii's own full-width encoding of it removes that mismatch.
    let value = decode_value(bytes)?;
    let mut wide = BufWriter::new(Vec::new());
    value
        .encode(&mut wide)
        .map_err(|e| CborError::Decode(format!("{e:?}")))?;
    let mut de = cbor4ii::serde::Deserializer::new(SliceReader::new(wide.buffer()));
    T::deserialize(&mut de).map_err(|e| CborError::Decode(format!("{e}")))
}

/// Decodes exactly one CBOR item into a [`Value`] tree.
///
/// # Errors
/// As [`from_slice`].
pub fn decode_value(bytes: &[u8]) -> Result<Value, CborError> {
    let mut reader = SliceReader::new(bytes);
    let value = Value::decode(&mut reader).map_err(|e| CborError::Decode(format!("{e:?}")))?;
    ensure_consumed(reader)?;
    Ok(value)
}

/// Decodes exactly one CBOR item and refuses it unless `bytes` is its core deterministic
/// encoding: decode, re-encode canonically, compare bytes. This is the one strictness check
/// for everything signed or hashed (COSE_Sign1 messages and their protected headers in
/// [`crate::cose`], attestation claims, signed transactions, evidence bundles and their events),
/// so a valid value has exactly one valid encoding.
///
/// # Errors
/// As [`decode_value`], and [`CborError::NotDeterministic`] for any other encoding.
pub fn decode_canonical(bytes: &[u8]) -> Result<Value, CborError> {
    let value = decode_value(bytes)?;
    // A map with a repeated key re-encodes to itself, but RFC 8949 §5.6 makes it invalid and
    // readers disagree on which entry wins: it too has no one meaning.
    if encode_canonical(&value) == bytes && !has_duplicate_keys(&value) {
        Ok(value)
    } else {
        Err(CborError::NotDeterministic)
    }
}

fn has_duplicate_keys(value: &Value) -> bool {
    match value {
        Value::Map(entries) => {
            let mut keys: Vec<Vec<u8>> = entries.iter().map(|(k, _)| encode_canonical(k)).collect();
            keys.sort();
            keys.windows(2).any(|w| w.first() == w.get(1))
                || entries
                    .iter()
                    .any(|(k, v)| has_duplicate_keys(k) || has_duplicate_keys(v))
        }
        Value::Array(items) => items.iter().any(has_duplicate_keys),
        Value::Tag(_, inner) => has_duplicate_keys(inner),
        _ => false,
    }
}

/// [`decode_canonical`], then the serde mapping into `T`.
///
/// # Errors
/// As [`decode_canonical`] and [`from_slice`].
pub fn from_canonical_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CborError> {
    decode_canonical(bytes)?;
    from_slice(bytes)
}

fn ensure_consumed<'de, R: Read<'de>>(mut reader: R) -> Result<(), CborError> {
    // `fill` returns at most what is left, so an empty answer means the input was consumed.
    let left = reader
        .fill(usize::MAX)
        .map(|r| r.as_ref().len())
        .map_err(|_| CborError::Decode("read failed".to_owned()))?;
    if left == 0 {
        Ok(())
    } else {
        Err(CborError::TrailingBytes(left))
    }
}

/// Encodes a [`Value`] tree in core deterministic form (see the module docs).
#[must_use]
pub fn encode_canonical(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_value(&mut out, value);
    out
}

const MAJOR_UNSIGNED: u8 = 0;
const MAJOR_NEGATIVE: u8 = 1;
const MAJOR_BYTES: u8 = 2;
const MAJOR_TEXT: u8 = 3;
const MAJOR_ARRAY: u8 = 4;
const MAJOR_MAP: u8 = 5;
const MAJOR_TAG: u8 = 6;
const TAG_POS_BIGNUM: u64 = 2;
const TAG_NEG_BIGNUM: u64 = 3;

fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.push(0xf6),
        Value::Bool(false) => out.push(0xf4),
        Value::Bool(true) => out.push(0xf5),
        Value::Integer(i) => write_integer(out, *i),
        Value::Float(f) => write_float(out, *f),
        Value::Bytes(b) => {
            write_head(out, MAJOR_BYTES, len_arg(b.len()));
            out.extend_from_slice(b);
        }
        Value::Text(s) => {
            write_head(out, MAJOR_TEXT, len_arg(s.len()));
            out.extend_from_slice(s.as_bytes());
        }
        Value::Array(items) => {
            write_head(out, MAJOR_ARRAY, len_arg(items.len()));
            for item in items {
                write_value(out, item);
            }
        }
        Value::Map(entries) => {
            let mut encoded: Vec<(Vec<u8>, Vec<u8>)> = entries
                .iter()
                .map(|(k, v)| (encode_canonical(k), encode_canonical(v)))
                .collect();
            // Bytewise order of the encoded keys (§4.2.1), not length-first (§4.2.3).
            encoded.sort();
            write_head(out, MAJOR_MAP, len_arg(encoded.len()));
            for (k, v) in encoded {
                out.extend_from_slice(&k);
                out.extend_from_slice(&v);
            }
        }
        Value::Tag(tag, inner) => {
            write_head(out, MAJOR_TAG, *tag);
            write_value(out, inner);
        }
        // `Value` is non-exhaustive; a future variant must not silently vanish from a hash
        // input, so it is written as CBOR `undefined`, which no countersign payload uses.
        _ => out.push(0xf7),
    }
}

fn len_arg(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

fn write_integer(out: &mut Vec<u8>, i: i128) {
    if let Ok(u) = u64::try_from(i) {
        write_head(out, MAJOR_UNSIGNED, u);
        return;
    }
    // CBOR negative integers carry -1 - n; i128::MIN cannot overflow here since -1 - MIN = MAX.
    let n = -1 - i;
    if let Ok(u) = u64::try_from(n) {
        write_head(out, MAJOR_NEGATIVE, u);
        return;
    }
    let (tag, magnitude) = if i >= 0 {
        (TAG_POS_BIGNUM, i.unsigned_abs())
    } else {
        (TAG_NEG_BIGNUM, n.unsigned_abs())
    };
    let bytes = magnitude.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    let significant: Vec<u8> = bytes.iter().skip(skip).copied().collect();
    write_head(out, MAJOR_TAG, tag);
    write_head(out, MAJOR_BYTES, len_arg(significant.len()));
    out.extend_from_slice(&significant);
}

fn write_float(out: &mut Vec<u8>, f: f64) {
    if f.is_nan() {
        // One NaN for all payloads and signs: §4.2.2 leaves the choice to the protocol.
        out.extend_from_slice(&[0xf9, 0x7e, 0x00]);
        return;
    }
    let h = half::f16::from_f64(f);
    if f64::from(h).to_bits() == f.to_bits() {
        out.push(0xf9);
        out.extend_from_slice(&h.to_bits().to_be_bytes());
        return;
    }
    #[allow(clippy::cast_possible_truncation)] // checked exact by the round trip below
    let s = f as f32;
    if f64::from(s).to_bits() == f.to_bits() {
        out.push(0xfa);
        out.extend_from_slice(&s.to_bits().to_be_bytes());
        return;
    }
    out.push(0xfb);
    out.extend_from_slice(&f.to_bits().to_be_bytes());
}

/// Writes a data item's head (major type and argument) in its shortest form.
pub fn write_head(out: &mut Vec<u8>, major: u8, arg: u64) {
    let m = major << 5;
    if arg < 24 {
        // `arg < 24` fits in the low five bits.
        out.push(m | u8::try_from(arg).unwrap_or(0));
    } else if let Ok(a) = u8::try_from(arg) {
        out.push(m | 24);
        out.push(a);
    } else if let Ok(a) = u16::try_from(arg) {
        out.push(m | 25);
        out.extend_from_slice(&a.to_be_bytes());
    } else if let Ok(a) = u32::try_from(arg) {
        out.push(m | 26);
        out.extend_from_slice(&a.to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&arg.to_be_bytes());
    }
}

/// Converts a [`Value`] to JSON for people to read: byte strings become lowercase hex, integers
/// outside ±2⁶⁴ and non-finite floats become strings, non-text map keys their JSON text.
#[must_use]
pub fn value_to_json(value: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        Value::Null => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Integer(i) => {
            if let Ok(v) = i64::try_from(*i) {
                J::from(v)
            } else if let Ok(v) = u64::try_from(*i) {
                J::from(v)
            } else {
                J::String(i.to_string())
            }
        }
        Value::Float(f) => {
            serde_json::Number::from_f64(*f).map_or_else(|| J::String(f.to_string()), J::Number)
        }
        Value::Bytes(b) => J::String(hex::encode(b)),
        Value::Text(s) => J::String(s.clone()),
        Value::Array(items) => J::Array(items.iter().map(value_to_json).collect()),
        Value::Map(entries) => J::Object(
            entries
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        Value::Text(s) => s.clone(),
                        other => value_to_json(other).to_string(),
                    };
                    (key, value_to_json(v))
                })
                .collect(),
        ),
        Value::Tag(tag, inner) => {
            let mut m = serde_json::Map::new();
            m.insert("tag".to_owned(), J::from(*tag));
            m.insert("value".to_owned(), value_to_json(inner));
            J::Object(m)
        }
        _ => J::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;
    use std::path::PathBuf;

    fn vectors_dir() -> PathBuf {
        std::env::var_os("COUNTERSIGN_TESTVECTORS").map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/testvectors"),
            PathBuf::from,
        )
    }

    #[derive(Deserialize)]
    struct Vector {
        hex: String,
        roundtrip: bool,
    }

    /// Items `cbor4ii::core::Value` cannot hold (see module docs): undefined decodes as null,
    /// simple(16), simple(24) and simple(255) are rejected. Listed so that any other failure is a failure.
    const NOT_REPRESENTABLE: &[&str] = &["f7", "f0", "f818", "f8ff"];

    #[test]
    fn rfc8949_appendix_a() {
        let path = vectors_dir().join("cbor/appendix_a.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            println!("skipped: {} not found", path.display());
            return;
        };
        let vectors: Vec<Vector> = serde_json::from_str(&text).unwrap();
        assert!(vectors.len() > 80, "expected the full appendix");
        let (mut exact, mut normalised) = (0, 0);
        for v in &vectors {
            let bytes = hex::decode(&v.hex).unwrap();
            if NOT_REPRESENTABLE.contains(&v.hex.as_str()) {
                match decode_value(&bytes) {
                    Ok(value) => assert_eq!(value, Value::Null, "{}", v.hex),
                    Err(e) => assert!(matches!(e, CborError::Decode(_)), "{}", v.hex),
                }
                continue;
            }
            let value =
                decode_value(&bytes).unwrap_or_else(|e| panic!("{} should decode: {e}", v.hex));
            let again = encode_canonical(&value);
            if v.roundtrip {
                assert_eq!(hex::encode(&again), v.hex, "canonical re-encoding");
                exact += 1;
            } else {
                // Non-preferred or indefinite forms: the canonical form is a fixed point.
                let value2 = decode_value(&again).unwrap();
                assert_eq!(encode_canonical(&value2), again, "{}", v.hex);
                assert_ne!(again, bytes, "{} was supposedly non-canonical", v.hex);
                normalised += 1;
            }
        }
        assert!(
            exact > 60 && normalised > 5,
            "exact {exact}, normalised {normalised}"
        );
    }

    #[test]
    fn map_keys_sort_by_encoded_bytes() {
        // 10 (0x0a) < 100 (0x1864) < -1 (0x20) < "z" (0x617a) < "aa" (0x626161)
        let map = Value::Map(vec![
            (Value::Text("aa".into()), Value::Integer(1)),
            (Value::Integer(-1), Value::Integer(2)),
            (Value::Text("z".into()), Value::Integer(3)),
            (Value::Integer(100), Value::Integer(4)),
            (Value::Integer(10), Value::Integer(5)),
        ]);
        assert_eq!(
            hex::encode(encode_canonical(&map)),
            "a50a051864042002617a0362616101"
        );
    }

    #[test]
    fn floats_take_the_shortest_exact_width() {
        let cases = [
            (0.0, "f90000"),
            (-0.0, "f98000"),
            (1.5, "f93e00"),
            (100000.0, "fa47c35000"),
            (1.1, "fb3ff199999999999a"),
            (f64::INFINITY, "f97c00"),
            (f64::NAN, "f97e00"),
            (5.960464477539063e-8, "f90001"),
        ];
        for (f, want) in cases {
            assert_eq!(hex::encode(encode_canonical(&Value::Float(f))), want, "{f}");
        }
    }

    #[test]
    fn integers_beyond_64_bits_become_minimal_bignums() {
        let v = Value::Integer(i128::from(u64::MAX) + 1);
        assert_eq!(hex::encode(encode_canonical(&v)), "c249010000000000000000");
        let v = Value::Integer(-i128::from(u64::MAX) - 2);
        assert_eq!(hex::encode(encode_canonical(&v)), "c349010000000000000000");
    }

    #[test]
    fn serde_struct_encodes_canonically_and_back() {
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        struct S {
            zeta: u32,
            alpha: String,
            #[serde(with = "serde_bytes")]
            raw: Vec<u8>,
            ratio: f64,
        }
        let s = S {
            zeta: 1000,
            alpha: "a".into(),
            raw: vec![1, 2],
            ratio: 0.5,
        };
        let bytes = to_canonical_vec(&s).unwrap();
        // keys: "raw"(63..) "zeta"(64..) "alpha"(65..) "ratio"(65.. 'r' > 'a')
        assert_eq!(
            hex::encode(&bytes),
            "a463726177420102647a6574611903e865616c706861616165726174696ff93800"
        );
        assert_eq!(from_slice::<S>(&bytes).unwrap(), s);
    }

    #[test]
    fn trailing_bytes_and_truncation_are_errors() {
        assert_eq!(
            from_slice::<u32>(&[0x01, 0x02]),
            Err(CborError::TrailingBytes(1))
        );
        assert!(matches!(
            from_slice::<String>(&[0x65, b'a']),
            Err(CborError::Decode(_))
        ));
        assert!(matches!(decode_value(&[]), Err(CborError::Decode(_))));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let bytes = vec![0x81; 100_000];
        assert!(decode_value(&bytes).is_err());
        assert!(from_slice::<Value>(&bytes).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(v) = decode_value(&bytes) {
                let canonical = encode_canonical(&v);
                let again = decode_value(&canonical).unwrap();
                prop_assert_eq!(encode_canonical(&again), canonical);
            }
            let _ = from_slice::<Value>(&bytes);
            let _ = from_slice::<std::collections::BTreeMap<String, u64>>(&bytes);
        }

        #[test]
        fn canonical_encoding_is_a_fixed_point(
            ints in proptest::collection::vec(any::<i64>(), 0..8),
            floats in proptest::collection::vec(any::<f64>(), 0..8),
            keys in proptest::collection::vec(".{0,6}", 0..8),
        ) {
            let value = Value::Map(keys.into_iter().enumerate().map(|(i, k)| {
                (Value::Text(k), Value::Array(vec![
                    Value::Integer(i128::from(*ints.get(i).unwrap_or(&0))),
                    Value::Float(*floats.get(i).unwrap_or(&0.0)),
                ]))
            }).collect());
            let bytes = encode_canonical(&value);
            let decoded = decode_value(&bytes).unwrap();
            prop_assert_eq!(encode_canonical(&decoded), bytes);
        }
    }
}
