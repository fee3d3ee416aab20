//! Crypto-shredding of personal data in events.
//!
//! Events are never deleted, yet a user's personal data (the userid, attribute values) must be
//! erasable. So events carry that data only as [`Sealed`] AES-256-GCM ciphertext under a
//! per-user [`DataKey`] that the edge keeps in a deletable key vault: destroying the key erases
//! the data from every event, replica and Kafka record at once.
//!
//! Rules:
//! - The associated data binds a ciphertext to its place: [`aad`] is the stream name and the
//!   field name, so a ciphertext copied to another user's stream or another field fails to open.
//! - Nonces are inputs (this crate has no RNG). A nonce must never repeat under one key; the
//!   edge's [`Sealer`] draws them from the OS. [`CounterSealer`] numbers them and is only safe
//!   while a single counter is ever used with its key, which holds for tests.
//! - Key bytes are zeroized on drop and never printed.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// A per-user AES-256-GCM key. `Debug` prints nothing of the key.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DataKey([u8; 32]);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// Ciphertext with the nonce it was sealed under. Both are CBOR byte strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// The 96-bit GCM nonce.
    #[serde(with = "serde_bytes")]
    pub nonce: [u8; 12],
    /// Ciphertext followed by the 16-byte tag.
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
}

/// Why sealing or opening failed. Says nothing about the key or the plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Wrong key, wrong associated data (moved ciphertext) or tampered bytes: AES-GCM cannot
    /// tell these apart, by design.
    #[error("sealed data cannot be opened: wrong key, wrong context or tampered")]
    Open,
    /// The plaintext is beyond AES-GCM's length limit.
    #[error("data too long to seal")]
    TooLong,
}

impl DataKey {
    /// Wraps 32 key bytes (random at the edge).
    #[must_use]
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&self.0.into())
    }

    /// Encrypts `plaintext` under `nonce`, authenticating `aad` too.
    ///
    /// # Errors
    /// [`SealError::TooLong`] past AES-GCM's limit (about 64 GiB).
    pub fn seal(&self, nonce: [u8; 12], aad: &[u8], plaintext: &[u8]) -> Result<Sealed, SealError> {
        let ciphertext = self
            .cipher()
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| SealError::TooLong)?;
        Ok(Sealed { nonce, ciphertext })
    }

    /// Decrypts `sealed`, checking that it was sealed with this key and this `aad`.
    ///
    /// # Errors
    /// [`SealError::Open`] when the key, the associated data or the bytes do not match.
    pub fn open(&self, aad: &[u8], sealed: &Sealed) -> Result<Vec<u8>, SealError> {
        self.cipher()
            .decrypt(
                &Nonce::from(sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad,
                },
            )
            .map_err(|_| SealError::Open)
    }
}

/// Seals personal data for the aggregate that is deciding. The edge implements it with the
/// user's [`DataKey`] and nonces from the OS RNG; the domain only ever seals, never opens.
pub trait Sealer {
    /// Seals `plaintext` bound to `aad` (build it with [`aad`]).
    ///
    /// # Errors
    /// [`SealError`] when the data cannot be sealed.
    fn seal(&mut self, aad: &[u8], plaintext: &[u8]) -> Result<Sealed, SealError>;
}

/// The associated data of a sealed field: `stream ‖ 0x00 ‖ field`. The separator keeps
/// (`"ab"`, `"c"`) and (`"a"`, `"bc"`) apart.
#[must_use]
pub fn aad(stream: &str, field: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(stream.len() + 1 + field.len());
    out.extend_from_slice(stream.as_bytes());
    out.push(0);
    out.extend_from_slice(field.as_bytes());
    out
}

/// A [`Sealer`] with deterministic nonces `(prefix ‖ counter)`, for tests, demos and snapshot
/// fixtures. Never use two of these with the same key and prefix: GCM nonce reuse leaks
/// plaintext and forges tags.
#[derive(Debug)]
pub struct CounterSealer {
    key: DataKey,
    prefix: [u8; 4],
    counter: u64,
}

impl CounterSealer {
    /// Starts numbering nonces at zero under `prefix`.
    #[must_use]
    pub const fn new(key: DataKey, prefix: [u8; 4]) -> Self {
        Self {
            key,
            prefix,
            counter: 0,
        }
    }

    /// The key, to open what was sealed.
    #[must_use]
    pub const fn key(&self) -> &DataKey {
        &self.key
    }
}

impl Sealer for CounterSealer {
    fn seal(&mut self, aad: &[u8], plaintext: &[u8]) -> Result<Sealed, SealError> {
        let mut nonce = [0u8; 12];
        for (n, b) in nonce
            .iter_mut()
            .zip(self.prefix.iter().chain(self.counter.to_be_bytes().iter()))
        {
            *n = *b;
        }
        self.counter = self.counter.wrapping_add(1);
        self.key.seal(nonce, aad, plaintext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_binding() {
        let key = DataKey::from_bytes([7; 32]);
        let a = aad("user-1", "userid");
        let sealed = key.seal([1; 12], &a, b"alice").unwrap();
        assert_eq!(sealed.ciphertext.len(), 5 + 16);
        assert_eq!(key.open(&a, &sealed).unwrap(), b"alice");
        assert_eq!(
            key.open(&aad("user-2", "userid"), &sealed),
            Err(SealError::Open)
        );
        assert_eq!(
            key.open(&aad("user-1", "attr"), &sealed),
            Err(SealError::Open)
        );
        assert_eq!(
            DataKey::from_bytes([8; 32]).open(&a, &sealed),
            Err(SealError::Open)
        );
        let mut tampered = sealed.clone();
        if let Some(b) = tampered.ciphertext.first_mut() {
            *b ^= 1;
        }
        assert_eq!(key.open(&a, &tampered), Err(SealError::Open));
    }

    #[test]
    fn aad_separates_stream_and_field() {
        assert_ne!(aad("ab", "c"), aad("a", "bc"));
    }

    #[test]
    fn counter_sealer_never_repeats_a_nonce() {
        let mut s = CounterSealer::new(DataKey::from_bytes([7; 32]), *b"test");
        let one = s.seal(b"x", b"same").unwrap();
        let two = s.seal(b"x", b"same").unwrap();
        assert_ne!(one.nonce, two.nonce);
        assert_ne!(one.ciphertext, two.ciphertext);
        assert_eq!(&one.nonce[..4], b"test");
    }

    #[test]
    fn debug_hides_the_key() {
        let key = DataKey::from_bytes([0x42; 32]);
        assert_eq!(format!("{key:?}"), "DataKey(..)");
        let s = CounterSealer::new(key, *b"test");
        assert!(!format!("{s:?}").contains("42"));
    }

    #[test]
    fn sealed_is_byte_strings_in_cbor() {
        let sealed = Sealed {
            nonce: [1; 12],
            ciphertext: vec![2, 3],
        };
        let bytes = crate::cbor::to_canonical_vec(&sealed).unwrap();
        let value = crate::cbor::decode_value(&bytes).unwrap();
        let crate::cbor::Value::Map(entries) = value else {
            panic!("map")
        };
        assert!(
            entries
                .iter()
                .all(|(_, v)| matches!(v, crate::cbor::Value::Bytes(_)))
        );
        assert_eq!(crate::cbor::from_slice::<Sealed>(&bytes).unwrap(), sealed);
    }
}
