//! The QR code / deep-link payload: what a phone reads to start a login, an enrolment or a
//! transaction approval.
//!
//! The payload is one deterministic CBOR array, compact enough for a small QR code:
//! `[version, kind, server_id bstr(16), token bstr(32), gateway tstr(≤ 256), fingerprint bstr(32)]`.
//! The version comes first and is checked before anything else, so a later version may change
//! the rest of the array. Text forms are the unpadded base64url of those bytes, and the deep
//! link `countersign:<base64url>`.
//!
//! Rules enforced by [`QrPayload::decode`], which reads bytes from a camera or a link, so from
//! anyone: at most [`MAX_PAYLOAD_LEN`] bytes; exactly one CBOR item; a known version and kind;
//! exact lengths for ids, token and fingerprint; a gateway of at most [`MAX_GATEWAY_LEN`] bytes;
//! and the canonical encoding, so a payload has exactly one byte form. Every failure is a
//! [`QrError`], never a panic. The token (a session's hsid or an enrolment token) is kept out of
//! `Debug` output and error messages.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::cbor::{self, CborError, Value};

/// The payload version written by [`QrPayload::encode`], and the only one accepted.
pub const QR_VERSION: u8 = 1;
/// The largest encoded payload [`QrPayload::decode`] accepts, in bytes.
pub const MAX_PAYLOAD_LEN: usize = 512;
/// The longest gateway URL a payload may carry, in bytes of UTF-8.
pub const MAX_GATEWAY_LEN: usize = 256;
/// The URI scheme of deep links, with its colon.
pub const DEEP_LINK_PREFIX: &str = "countersign:";

/// The number of items in a version-1 payload array.
const ITEMS_V1: usize = 6;
/// Base64url text longer than this cannot hold a payload of [`MAX_PAYLOAD_LEN`] bytes; checked
/// before decoding so that a huge string is refused without allocating for it.
const MAX_BASE64_LEN: usize = MAX_PAYLOAD_LEN.div_ceil(3) * 4;

/// What the phone is asked to do. Encoded as a small unsigned integer whose value is fixed here,
/// not derived from the variant's position, so reordering variants cannot change the wire form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QrKind {
    /// Log in to a session: the token is the session's hsid. Wire value 1.
    Login,
    /// Enrol an account: the token is the enrolment token. Wire value 2.
    Enrolment,
    /// Approve a transaction: the token is the 16-byte transaction id followed by 16 zero
    /// bytes (not a secret: only the user's own accounts may fetch it). Wire value 3.
    Transaction,
}

impl QrKind {
    /// The wire value of this kind.
    #[must_use]
    pub const fn code(self) -> u8 {
        match self {
            Self::Login => 1,
            Self::Enrolment => 2,
            Self::Transaction => 3,
        }
    }

    /// The kind with this wire value, if there is one.
    #[must_use]
    pub const fn from_code(code: u64) -> Option<Self> {
        match code {
            1 => Some(Self::Login),
            2 => Some(Self::Enrolment),
            3 => Some(Self::Transaction),
            _ => None,
        }
    }
}

/// The content of a login or enrolment QR code.
#[derive(Clone, PartialEq, Eq)]
pub struct QrPayload {
    /// What the phone is asked to do.
    pub kind: QrKind,
    /// The virtual server's id.
    pub server_id: [u8; 16],
    /// hsid (32 bytes) for Login, enrolment token (32 bytes) for Enrolment, transaction id
    /// and 16 zero bytes for Transaction.
    pub token: [u8; 32],
    /// Where the app connects (device gateway URL, e.g. "wss://gw.example.com/v1/device"), ≤ 256 bytes.
    pub gateway: String,
    /// SHA-256 of the server's SEC1 uncompressed public key (the app pins it).
    pub server_key_fingerprint: [u8; 32],
}

impl QrPayload {
    /// The token of a transaction QR code: the id, then 16 zero bytes.
    #[must_use]
    pub fn transaction_token(transaction_id: [u8; 16]) -> [u8; 32] {
        let mut token = [0u8; 32];
        token[..16].copy_from_slice(&transaction_id);
        token
    }

    /// The transaction id of a [`QrKind::Transaction`] payload; `None` for other kinds or a
    /// token whose last 16 bytes are not zero.
    #[must_use]
    pub fn transaction_id(&self) -> Option<[u8; 16]> {
        let (id, zeros) = self.token.split_at(16);
        (self.kind == QrKind::Transaction && zeros.iter().all(|b| *b == 0))
            .then(|| id.try_into().ok())
            .flatten()
    }
}

impl fmt::Debug for QrPayload {
    // The token logs a user in or enrols a phone: it must never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QrPayload")
            .field("kind", &self.kind)
            .field("server_id", &hex::encode(self.server_id))
            .field("token", &"<redacted>")
            .field("gateway", &self.gateway)
            .field(
                "server_key_fingerprint",
                &hex::encode(self.server_key_fingerprint),
            )
            .finish()
    }
}

/// Why bytes or text are not a QR payload. Every variant is the sender's mistake (a bad or
/// foreign QR code, a mangled link); messages describe the shape only and never echo content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QrError {
    /// More than [`MAX_PAYLOAD_LEN`] bytes (or base64url text that would decode to more).
    #[error("QR payload is too long: {len} bytes, at most {max} allowed")]
    TooLong {
        /// The length received (bytes, or characters for base64url text).
        len: usize,
        /// The limit for that form.
        max: usize,
    },
    /// The bytes are not one well-formed CBOR item.
    #[error("QR payload is not valid CBOR")]
    NotCbor(#[source] CborError),
    /// A CBOR item was followed by more bytes.
    #[error("QR payload has {0} trailing byte(s) after the CBOR item")]
    TrailingBytes(usize),
    /// Well-formed CBOR, but not the payload's shape (not an array, wrong item count).
    #[error("QR payload is malformed: {0}")]
    Malformed(&'static str),
    /// A field is missing or of the wrong CBOR type.
    #[error("QR payload field {field} is missing or not {expected}")]
    WrongType {
        /// Which field.
        field: &'static str,
        /// The type it must have.
        expected: &'static str,
    },
    /// A version this code does not know (only [`QR_VERSION`] is accepted).
    #[error("unknown QR payload version {0} (supported: {QR_VERSION})")]
    UnknownVersion(u64),
    /// A kind this code does not know.
    #[error("unknown QR payload kind {0}")]
    UnknownKind(u64),
    /// A byte-string field of the wrong length.
    #[error("QR payload field {field} is {actual} bytes, expected {expected}")]
    WrongLength {
        /// Which field.
        field: &'static str,
        /// The length it must have.
        expected: usize,
        /// The length it has.
        actual: usize,
    },
    /// The gateway URL is longer than [`MAX_GATEWAY_LEN`] bytes.
    #[error("QR payload gateway is {len} bytes, at most {MAX_GATEWAY_LEN} allowed")]
    GatewayTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// Valid content in a non-canonical encoding (e.g. an integer or length not in its
    /// shortest form): each payload has exactly one byte form.
    #[error("QR payload is not canonically encoded")]
    NotCanonical,
    /// The text is not unpadded base64url.
    #[error("QR payload text is not unpadded base64url")]
    NotBase64url,
    /// The link does not start with `countersign:`.
    #[error("not a countersign deep link (expected the \"countersign:\" scheme)")]
    NotADeepLink,
}

impl QrPayload {
    /// The payload as canonical CBOR: `[version, kind, server_id, token, gateway, fingerprint]`.
    ///
    /// Encoding cannot fail, but [`decode`](Self::decode) refuses a gateway longer than
    /// [`MAX_GATEWAY_LEN`] bytes, so callers must not put one in.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        cbor::encode_canonical(&Value::Array(vec![
            Value::Integer(i128::from(QR_VERSION)),
            Value::Integer(i128::from(self.kind.code())),
            Value::Bytes(self.server_id.to_vec()),
            Value::Bytes(self.token.to_vec()),
            Value::Text(self.gateway.clone()),
            Value::Bytes(self.server_key_fingerprint.to_vec()),
        ]))
    }

    /// Reads a payload from the bytes of a QR code.
    ///
    /// # Errors
    /// A [`QrError`] for every rule in the module docs.
    pub fn decode(bytes: &[u8]) -> Result<Self, QrError> {
        if bytes.len() > MAX_PAYLOAD_LEN {
            return Err(QrError::TooLong {
                len: bytes.len(),
                max: MAX_PAYLOAD_LEN,
            });
        }
        let value = cbor::decode_value(bytes).map_err(|e| match e {
            CborError::TrailingBytes(n) => QrError::TrailingBytes(n),
            other => QrError::NotCbor(other),
        })?;
        let Value::Array(items) = value else {
            return Err(QrError::Malformed("not a CBOR array"));
        };
        let mut items = items.into_iter();
        let version = unsigned(items.next(), "version")?;
        if version != u64::from(QR_VERSION) {
            return Err(QrError::UnknownVersion(version));
        }
        if items.len() != ITEMS_V1 - 1 {
            return Err(QrError::Malformed("wrong number of items for version 1"));
        }
        let kind_code = unsigned(items.next(), "kind")?;
        let kind = QrKind::from_code(kind_code).ok_or(QrError::UnknownKind(kind_code))?;
        let server_id = fixed_bytes(items.next(), "server_id")?;
        let token = fixed_bytes(items.next(), "token")?;
        let Some(Value::Text(gateway)) = items.next() else {
            return Err(QrError::WrongType {
                field: "gateway",
                expected: "a text string",
            });
        };
        if gateway.len() > MAX_GATEWAY_LEN {
            return Err(QrError::GatewayTooLong { len: gateway.len() });
        }
        let server_key_fingerprint = fixed_bytes(items.next(), "server_key_fingerprint")?;
        let payload = Self {
            kind,
            server_id,
            token,
            gateway,
            server_key_fingerprint,
        };
        if payload.encode() != bytes {
            return Err(QrError::NotCanonical);
        }
        Ok(payload)
    }

    /// The encoded payload as unpadded base64url.
    #[must_use]
    pub fn to_base64url(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.encode())
    }

    /// Reads a payload from unpadded base64url text.
    ///
    /// # Errors
    /// [`QrError::TooLong`] for text longer than any valid payload, [`QrError::NotBase64url`]
    /// for padding or characters outside the base64url alphabet, else as [`decode`](Self::decode).
    pub fn from_base64url(text: &str) -> Result<Self, QrError> {
        if text.len() > MAX_BASE64_LEN {
            return Err(QrError::TooLong {
                len: text.len(),
                max: MAX_BASE64_LEN,
            });
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| QrError::NotBase64url)?;
        Self::decode(&bytes)
    }

    /// The deep link that opens the app on this payload: `countersign:<base64url>`.
    #[must_use]
    pub fn deep_link(&self) -> String {
        format!("{DEEP_LINK_PREFIX}{}", self.to_base64url())
    }

    /// Reads a payload from a deep link. The scheme is matched without regard to ASCII case, as
    /// URI schemes are (RFC 3986 §3.1); the rest must be exactly the base64url payload.
    ///
    /// # Errors
    /// [`QrError::NotADeepLink`] without the `countersign:` scheme, else as
    /// [`from_base64url`](Self::from_base64url).
    pub fn from_deep_link(link: &str) -> Result<Self, QrError> {
        let prefix_len = DEEP_LINK_PREFIX.len();
        match (link.get(..prefix_len), link.get(prefix_len..)) {
            (Some(scheme), Some(rest)) if scheme.eq_ignore_ascii_case(DEEP_LINK_PREFIX) => {
                Self::from_base64url(rest)
            }
            _ => Err(QrError::NotADeepLink),
        }
    }
}

fn unsigned(item: Option<Value>, field: &'static str) -> Result<u64, QrError> {
    match item {
        Some(Value::Integer(i)) => u64::try_from(i).ok(),
        _ => None,
    }
    .ok_or(QrError::WrongType {
        field,
        expected: "an unsigned integer",
    })
}

fn fixed_bytes<const N: usize>(
    item: Option<Value>,
    field: &'static str,
) -> Result<[u8; N], QrError> {
    let Some(Value::Bytes(bytes)) = item else {
        return Err(QrError::WrongType {
            field,
            expected: "a byte string",
        });
    };
    let actual = bytes.len();
    <[u8; N]>::try_from(bytes).map_err(|_| QrError::WrongLength {
        field,
        expected: N,
        actual,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn example() -> QrPayload {
        QrPayload {
            kind: QrKind::Login,
            server_id: [0x11; 16],
            token: [0x22; 32],
            gateway: "wss://gw.example.com/v1/device".to_owned(),
            server_key_fingerprint: [0x33; 32],
        }
    }

    /// Encodes an arbitrary array with the canonical writer, for building bad payloads.
    fn array(items: Vec<Value>) -> Vec<u8> {
        cbor::encode_canonical(&Value::Array(items))
    }

    fn items_of(p: &QrPayload) -> Vec<Value> {
        let Value::Array(items) = cbor::decode_value(&p.encode()).unwrap() else {
            unreachable!()
        };
        items
    }

    #[test]
    #[rustfmt::skip] // one line per CBOR item
    fn exact_byte_layout() {
        let bytes = example().encode();
        let want = concat!(
            // array(6), version 1, kind 1 (Login)
            "86", "01", "01",
            // server_id: bstr(16)
            "50", "11111111111111111111111111111111",
            // token: bstr(32)
            "5820", "2222222222222222222222222222222222222222222222222222222222222222",
            // gateway: tstr(30) "wss://gw.example.com/v1/device"
            "781e", "7773733a2f2f67772e6578616d706c652e636f6d2f76312f646576696365",
            // server_key_fingerprint: bstr(32)
            "5820", "3333333333333333333333333333333333333333333333333333333333333333",
        );
        assert_eq!(hex::encode(&bytes), want);
        assert_eq!(bytes.len(), 120);
    }

    #[test]
    fn enrolment_kind_is_wire_value_2() {
        let p = QrPayload {
            kind: QrKind::Enrolment,
            ..example()
        };
        let bytes = p.encode();
        assert_eq!(bytes.get(..3), Some(&[0x86, 0x01, 0x02][..]));
        assert_eq!(QrPayload::decode(&bytes).unwrap(), p);
    }

    #[test]
    fn round_trips_through_every_form() {
        let p = example();
        assert_eq!(QrPayload::decode(&p.encode()).unwrap(), p);
        let text = p.to_base64url();
        assert!(!text.contains('=') && !text.contains('+') && !text.contains('/'));
        assert_eq!(QrPayload::from_base64url(&text).unwrap(), p);
        let link = p.deep_link();
        assert_eq!(link, format!("countersign:{text}"));
        assert_eq!(QrPayload::from_deep_link(&link).unwrap(), p);
        assert_eq!(
            QrPayload::from_deep_link(&format!("CounterSign:{text}")).unwrap(),
            p
        );
    }

    #[test]
    fn longest_gateway_fits_and_one_more_byte_does_not() {
        let mut p = example();
        p.gateway = "g".repeat(MAX_GATEWAY_LEN);
        assert!(p.encode().len() <= MAX_PAYLOAD_LEN);
        assert_eq!(QrPayload::decode(&p.encode()).unwrap(), p);
        p.gateway.push('g');
        assert_eq!(
            QrPayload::decode(&p.encode()),
            Err(QrError::GatewayTooLong { len: 257 })
        );
    }

    #[test]
    fn debug_hides_the_token() {
        let text = format!("{:?}", example());
        assert!(!text.contains(&hex::encode([0x22; 32])), "{text}");
        assert!(!text.contains("34, 34"), "{text}");
        assert!(text.contains("<redacted>"));
    }

    #[test]
    fn too_long() {
        let bytes = vec![0u8; MAX_PAYLOAD_LEN + 1];
        assert_eq!(
            QrPayload::decode(&bytes),
            Err(QrError::TooLong { len: 513, max: 512 })
        );
        let text = "A".repeat(MAX_BASE64_LEN + 1);
        assert_eq!(
            QrPayload::from_base64url(&text),
            Err(QrError::TooLong { len: 685, max: 684 })
        );
    }

    #[test]
    fn not_cbor() {
        assert!(matches!(QrPayload::decode(&[]), Err(QrError::NotCbor(_))));
        // Truncated: the array announces 6 items and has one.
        assert!(matches!(
            QrPayload::decode(&[0x86, 0x01]),
            Err(QrError::NotCbor(_))
        ));
        assert!(matches!(
            QrPayload::decode(&[0xff]),
            Err(QrError::NotCbor(_))
        ));
    }

    #[test]
    fn trailing_bytes() {
        let mut bytes = example().encode();
        bytes.extend_from_slice(&[0x00, 0x00]);
        assert_eq!(QrPayload::decode(&bytes), Err(QrError::TrailingBytes(2)));
    }

    #[test]
    fn unknown_version_is_reported_before_the_shape() {
        let mut items = items_of(&example());
        items[0] = Value::Integer(2);
        assert_eq!(
            QrPayload::decode(&array(items)),
            Err(QrError::UnknownVersion(2))
        );
        // A future version may have a different array; still reported as its version.
        assert_eq!(
            QrPayload::decode(&array(vec![Value::Integer(7)])),
            Err(QrError::UnknownVersion(7))
        );
        assert_eq!(
            QrPayload::decode(&array(vec![Value::Integer(0), Value::Null])),
            Err(QrError::UnknownVersion(0))
        );
    }

    #[test]
    fn transaction_token_carries_the_id_and_zeros() {
        let id = [0x5a; 16];
        let payload = QrPayload {
            kind: QrKind::Transaction,
            token: QrPayload::transaction_token(id),
            ..example()
        };
        let decoded = QrPayload::decode(&payload.encode()).unwrap();
        assert_eq!(decoded.transaction_id(), Some(id));
        let mut other = decoded.clone();
        other.token[31] = 1;
        assert_eq!(other.transaction_id(), None, "nonzero padding");
        assert_eq!(example().transaction_id(), None, "not a transaction QR");
    }

    #[test]
    fn unknown_kind() {
        for code in [0, 4, 255] {
            let mut items = items_of(&example());
            items[1] = Value::Integer(code);
            assert_eq!(
                QrPayload::decode(&array(items)),
                Err(QrError::UnknownKind(u64::try_from(code).unwrap()))
            );
        }
    }

    #[test]
    fn wrong_lengths() {
        let cases: [(usize, &str, usize, usize); 6] = [
            (2, "server_id", 16, 15),
            (2, "server_id", 16, 32),
            (3, "token", 32, 31),
            (3, "token", 32, 16),
            (5, "server_key_fingerprint", 32, 0),
            (5, "server_key_fingerprint", 32, 33),
        ];
        for (index, field, expected, actual) in cases {
            let mut items = items_of(&example());
            items[index] = Value::Bytes(vec![0xaa; actual]);
            assert_eq!(
                QrPayload::decode(&array(items)),
                Err(QrError::WrongLength {
                    field,
                    expected,
                    actual
                }),
                "{field} of {actual}"
            );
        }
    }

    #[test]
    fn malformed_shapes() {
        let not_array = cbor::encode_canonical(&Value::Map(vec![]));
        assert_eq!(
            QrPayload::decode(&not_array),
            Err(QrError::Malformed("not a CBOR array"))
        );
        // Too few and too many items for version 1.
        let mut items = items_of(&example());
        items.pop();
        assert_eq!(
            QrPayload::decode(&array(items)),
            Err(QrError::Malformed("wrong number of items for version 1"))
        );
        let mut items = items_of(&example());
        items.push(Value::Null);
        assert_eq!(
            QrPayload::decode(&array(items)),
            Err(QrError::Malformed("wrong number of items for version 1"))
        );
    }

    #[test]
    fn wrong_types() {
        let integer = "an unsigned integer";
        for version in [
            vec![],
            vec![Value::Integer(-1)],
            vec![Value::Text("1".into())],
        ] {
            assert_eq!(
                QrPayload::decode(&array(version)),
                Err(QrError::WrongType {
                    field: "version",
                    expected: integer
                })
            );
        }
        let swaps = [
            (1, Value::Text("login".into()), "kind", integer),
            (1, Value::Integer(-2), "kind", integer),
            (2, Value::Text("id".into()), "server_id", "a byte string"),
            (3, Value::Array(vec![]), "token", "a byte string"),
            (
                4,
                Value::Bytes(b"wss://x".to_vec()),
                "gateway",
                "a text string",
            ),
            (5, Value::Null, "server_key_fingerprint", "a byte string"),
        ];
        for (index, value, field, expected) in swaps {
            let mut items = items_of(&example());
            items[index] = value;
            assert_eq!(
                QrPayload::decode(&array(items)),
                Err(QrError::WrongType { field, expected }),
                "item {index}"
            );
        }
    }

    #[test]
    fn non_canonical_encodings_are_refused() {
        let canonical = example().encode();
        // Version as a one-byte argument (0x18 0x01) instead of inline.
        let mut long_int = vec![0x86, 0x18, 0x01];
        long_int.extend_from_slice(canonical.get(2..).unwrap());
        assert_eq!(QrPayload::decode(&long_int), Err(QrError::NotCanonical));
        // Indefinite-length array.
        let mut indefinite = vec![0x9f];
        indefinite.extend_from_slice(canonical.get(1..).unwrap());
        indefinite.push(0xff);
        assert_eq!(QrPayload::decode(&indefinite), Err(QrError::NotCanonical));
    }

    #[test]
    fn bad_text_forms() {
        let text = example().to_base64url();
        assert_eq!(
            QrPayload::from_base64url(&format!("{text}=")),
            Err(QrError::NotBase64url)
        );
        assert_eq!(
            QrPayload::from_base64url("a+b/"),
            Err(QrError::NotBase64url)
        );
        assert_eq!(
            QrPayload::from_base64url(&format!("{text} ")),
            Err(QrError::NotBase64url)
        );
        assert!(matches!(
            QrPayload::from_base64url(""),
            Err(QrError::NotCbor(_))
        ));
        assert_eq!(QrPayload::from_deep_link(&text), Err(QrError::NotADeepLink));
        assert_eq!(
            QrPayload::from_deep_link(&format!("https://{text}")),
            Err(QrError::NotADeepLink)
        );
        assert_eq!(
            QrPayload::from_deep_link("countersign"),
            Err(QrError::NotADeepLink)
        );
        // A multi-byte character straddling the prefix boundary must not panic.
        assert_eq!(
            QrPayload::from_deep_link("countersigné"),
            Err(QrError::NotADeepLink)
        );
        assert_eq!(
            QrPayload::from_deep_link(&format!("countersign://{text}")),
            Err(QrError::NotBase64url)
        );
    }

    #[test]
    fn error_messages_do_not_echo_content() {
        let mut bytes = example().encode();
        bytes.push(0);
        let errors = [
            QrPayload::decode(&bytes).unwrap_err(),
            QrPayload::from_base64url("%%%").unwrap_err(),
            QrPayload::from_deep_link("nope:abc").unwrap_err(),
        ];
        for e in errors {
            let message = e.to_string();
            assert!(!message.contains("2222"), "{message}");
            assert!(!message.contains("abc"), "{message}");
        }
    }

    fn any_kind() -> impl Strategy<Value = QrKind> {
        prop_oneof![
            Just(QrKind::Login),
            Just(QrKind::Enrolment),
            Just(QrKind::Transaction)
        ]
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(p) = QrPayload::decode(&bytes) {
                // Anything accepted is canonical: it re-encodes to the same bytes.
                prop_assert_eq!(p.encode(), bytes);
            }
        }

        #[test]
        fn text_decoders_never_panic(text in ".{0,80}") {
            let _ = QrPayload::from_base64url(&text);
            let _ = QrPayload::from_deep_link(&text);
            let _ = QrPayload::from_deep_link(&format!("countersign:{text}"));
        }

        #[test]
        fn mutated_payloads_never_panic(index in 0usize..120, byte in any::<u8>()) {
            let mut bytes = example().encode();
            if let Some(b) = bytes.get_mut(index) {
                *b = byte;
            }
            let _ = QrPayload::decode(&bytes);
        }

        #[test]
        fn round_trips_for_arbitrary_fields(
            kind in any_kind(),
            server_id in any::<[u8; 16]>(),
            token in any::<[u8; 32]>(),
            gateway in "\\PC{0,64}",
            server_key_fingerprint in any::<[u8; 32]>(),
        ) {
            prop_assume!(gateway.len() <= MAX_GATEWAY_LEN);
            let p = QrPayload { kind, server_id, token, gateway, server_key_fingerprint };
            let bytes = p.encode();
            prop_assert!(bytes.len() <= MAX_PAYLOAD_LEN);
            prop_assert_eq!(&QrPayload::decode(&bytes).unwrap(), &p);
            prop_assert_eq!(&QrPayload::from_base64url(&p.to_base64url()).unwrap(), &p);
            prop_assert_eq!(&QrPayload::from_deep_link(&p.deep_link()).unwrap(), &p);
        }
    }
}
