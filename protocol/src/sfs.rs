//! The messages between an app (the mobile SDK) and its second-factor server (SFS), version 1
//! (`docs/second-factor.md`, "The channel").
//!
//! They travel in the Noise channel of [`crate::channel`] opened with
//! [`crate::channel::SFS_PROLOGUE`]: the handshake carries an [`SfsHello`] (app → SFS) and an
//! [`SfsWelcome`] (SFS → app); after it the app sends [`SfsRequest`]s and the SFS answers each
//! with an [`SfsReply`] carrying the request's `id`.
//!
//! The encoding rules are those of [`crate::device`], and so are [`encode`] and [`decode`]
//! (re-exported here): canonical CBOR, size and depth limits checked before serde, exact byte
//! lengths, externally tagged snake_case enums.
//!
//! OPAQUE messages are opaque byte strings here; `Debug` of a request or answer prints only
//! their lengths, so a log line never carries protocol material derived from a PIN.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::device::{Blob, Bytes};
pub use crate::device::{MessageError, decode, encode};

/// The protocol version this code speaks.
pub const VERSION: u16 = 1;

/// First handshake message's payload, app → SFS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SfsHello {
    /// The protocol version the app speaks.
    pub version: u16,
    /// The app instance; its Noise static key must be the one bound to this id.
    pub app_instance: Bytes<16>,
}

/// Second handshake message's payload, SFS → app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SfsWelcome {
    /// The channel is open.
    Accepted {
        /// A PIN is registered for this app instance.
        pin_registered: bool,
        /// A biometric key is registered for this app instance.
        biometric_registered: bool,
        /// Whether the second factor may be used now.
        state: FactorState,
    },
    /// The handshake is refused; the SFS closes the connection after this.
    Refused {
        /// Why.
        reason: SfsRefusal,
    },
}

/// Why the SFS refused a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SfsRefusal {
    /// The app speaks a version the SFS does not.
    UnsupportedVersion,
    /// Another static key is bound to this app instance.
    KeyMismatch,
}

/// Whether an app instance's second factor may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FactorState {
    /// Registered and usable.
    Active,
    /// Too many failures; usable again after `until_ms`.
    Locked {
        /// Milliseconds since the Unix epoch.
        until_ms: i64,
    },
    /// Too many failures; the app must enrol its second factor again.
    Revoked,
    /// Nothing registered yet.
    None,
}

/// An app request; the SFS answers with a reply carrying the same `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SfsRequest {
    /// Chosen by the app; unique among its requests in flight on this connection.
    pub id: u32,
    /// What it asks.
    pub body: SfsBody,
}

/// What an app may ask.
///
/// Flows: `register_pin_start` → `register_pin_finish`; `login_start` → `login_finish`
/// (answers an attestation); `biometric_start` → `biometric_finish` (answers an attestation);
/// `register_biometric` after a PIN login on the same channel.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SfsBody {
    /// OPAQUE registration, first message (`RegistrationRequest`).
    RegisterPinStart {
        /// The serialised `RegistrationRequest`.
        request: Blob,
    },
    /// OPAQUE registration, last message (`RegistrationUpload`).
    RegisterPinFinish {
        /// The serialised `RegistrationUpload`.
        upload: Blob,
    },
    /// OPAQUE login, first message (`CredentialRequest`); counts as a failed attempt until
    /// `login_finish` verifies.
    LoginStart {
        /// The serialised `CredentialRequest`.
        request: Blob,
    },
    /// OPAQUE login, last message (`CredentialFinalization`), with what to attest.
    LoginFinish {
        /// The serialised `CredentialFinalization`.
        finalization: Blob,
        /// The NS challenge to attest.
        challenge: Bytes<32>,
        /// SHA-256 of the account's signing public key.
        account_key_thumbprint: Bytes<32>,
    },
    /// Registers the biometric key (needs a PIN login on this channel first).
    RegisterBiometric {
        /// SEC1 uncompressed P-256 public key.
        public_key: Bytes<65>,
    },
    /// Asks a fresh nonce for a biometric signature.
    BiometricStart,
    /// The biometric key's signature over
    /// `"countersign/sfs/biometric/v1" 0x00 ‖ nonce ‖ challenge ‖ account_key_thumbprint`.
    BiometricFinish {
        /// Raw ES256 `r ‖ s`.
        signature: Bytes<64>,
        /// The NS challenge to attest.
        challenge: Bytes<32>,
        /// SHA-256 of the account's signing public key.
        account_key_thumbprint: Bytes<32>,
    },
}

impl fmt::Debug for SfsBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RegisterPinStart { request } => {
                write!(f, "RegisterPinStart({} bytes)", request.0.len())
            }
            Self::RegisterPinFinish { upload } => {
                write!(f, "RegisterPinFinish({} bytes)", upload.0.len())
            }
            Self::LoginStart { request } => write!(f, "LoginStart({} bytes)", request.0.len()),
            Self::LoginFinish { finalization, .. } => {
                write!(f, "LoginFinish({} bytes)", finalization.0.len())
            }
            Self::RegisterBiometric { .. } => f.write_str("RegisterBiometric"),
            Self::BiometricStart => f.write_str("BiometricStart"),
            Self::BiometricFinish { .. } => f.write_str("BiometricFinish"),
        }
    }
}

/// The domain separator of the biometric signature.
pub const BIOMETRIC_CONTEXT: &[u8] = b"countersign/sfs/biometric/v1\0";

/// The bytes the biometric key signs for `biometric_finish`.
#[must_use]
pub fn biometric_message(nonce: &[u8; 32], challenge: &[u8; 32], thumbprint: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(BIOMETRIC_CONTEXT.len() + 96);
    m.extend_from_slice(BIOMETRIC_CONTEXT);
    m.extend_from_slice(nonce);
    m.extend_from_slice(challenge);
    m.extend_from_slice(thumbprint);
    m
}

/// The SFS's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SfsReply {
    /// The request's id.
    pub id: u32,
    /// Its outcome.
    pub outcome: SfsOutcome,
}

/// A request's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SfsOutcome {
    /// Done.
    Ok(SfsAnswer),
    /// Refused.
    Err(SfsError),
}

/// What a successful request answers.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SfsAnswer {
    /// OPAQUE `RegistrationResponse`.
    Registration {
        /// The serialised response.
        response: Blob,
    },
    /// OPAQUE `CredentialResponse`.
    Credential {
        /// The serialised response.
        response: Blob,
    },
    /// The nonce the biometric key signs.
    BiometricChallenge {
        /// Fresh, single use, valid on this connection only.
        nonce: Bytes<32>,
    },
    /// An attestation (COSE_Sign1, see [`crate::attestation`]).
    Attestation {
        /// The COSE_Sign1 bytes.
        cose: Blob,
    },
    /// Done, nothing to say.
    Done,
}

impl fmt::Debug for SfsAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Registration { response } => {
                write!(f, "Registration({} bytes)", response.0.len())
            }
            Self::Credential { response } => write!(f, "Credential({} bytes)", response.0.len()),
            Self::BiometricChallenge { .. } => f.write_str("BiometricChallenge"),
            Self::Attestation { cose } => write!(f, "Attestation({} bytes)", cose.0.len()),
            Self::Done => f.write_str("Done"),
        }
    }
}

/// A refused request: a code to act on and a message for people. Messages never echo
/// secrets or foreign content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct SfsError {
    /// What went wrong.
    pub code: SfsCode,
    /// For people.
    pub message: String,
}

impl SfsError {
    /// A refusal.
    pub fn new(code: SfsCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// What went wrong with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SfsCode {
    /// Malformed, or out of order (a `login_finish` with no `login_start`).
    Invalid,
    /// The PIN did not verify.
    WrongPin {
        /// Failures left before the next lock or the revocation.
        attempts_left: u32,
    },
    /// Too many failures; try again after `until_ms`.
    Locked {
        /// Milliseconds since the Unix epoch.
        until_ms: i64,
    },
    /// Too many failures; the second factor must be enrolled again.
    Revoked,
    /// No PIN (or biometric key) is registered.
    NotRegistered,
    /// A PIN is registered; changing it needs a PIN login on this channel first.
    AlreadyRegistered,
    /// This channel may not do this yet (register a biometric key before a PIN login).
    NotAllowed,
    /// The SFS failed; try again later.
    Internal,
}

/// `SfsError` from a decoding failure, for replies.
impl From<MessageError> for SfsError {
    fn from(e: MessageError) -> Self {
        Self::new(SfsCode::Invalid, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde::de::DeserializeOwned;

    use super::*;
    use crate::cbor;

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + fmt::Debug>(message: &T) {
        let bytes = encode(message).unwrap();
        assert_eq!(&decode::<T>(&bytes).unwrap(), message);
        assert_eq!(encode(&decode::<T>(&bytes).unwrap()).unwrap(), bytes);
    }

    fn json<T: Serialize>(message: &T) -> serde_json::Value {
        cbor::value_to_json(&cbor::decode_value(&encode(message).unwrap()).unwrap())
    }

    #[test]
    fn every_message_round_trips() {
        round_trip(&SfsHello {
            version: VERSION,
            app_instance: Bytes([1; 16]),
        });
        for state in [
            FactorState::Active,
            FactorState::Locked { until_ms: 5 },
            FactorState::Revoked,
            FactorState::None,
        ] {
            round_trip(&SfsWelcome::Accepted {
                pin_registered: true,
                biometric_registered: false,
                state,
            });
        }
        round_trip(&SfsWelcome::Refused {
            reason: SfsRefusal::KeyMismatch,
        });
        for body in [
            SfsBody::RegisterPinStart {
                request: Blob(vec![1; 32]),
            },
            SfsBody::RegisterPinFinish {
                upload: Blob(vec![2; 192]),
            },
            SfsBody::LoginStart {
                request: Blob(vec![3; 96]),
            },
            SfsBody::LoginFinish {
                finalization: Blob(vec![4; 64]),
                challenge: Bytes([5; 32]),
                account_key_thumbprint: Bytes([6; 32]),
            },
            SfsBody::RegisterBiometric {
                public_key: Bytes([4; 65]),
            },
            SfsBody::BiometricStart,
            SfsBody::BiometricFinish {
                signature: Bytes([7; 64]),
                challenge: Bytes([5; 32]),
                account_key_thumbprint: Bytes([6; 32]),
            },
        ] {
            round_trip(&SfsRequest { id: 9, body });
        }
        for answer in [
            SfsAnswer::Registration {
                response: Blob(vec![1; 64]),
            },
            SfsAnswer::Credential {
                response: Blob(vec![1; 320]),
            },
            SfsAnswer::BiometricChallenge {
                nonce: Bytes([8; 32]),
            },
            SfsAnswer::Attestation {
                cose: Blob(vec![0xd2; 200]),
            },
            SfsAnswer::Done,
        ] {
            round_trip(&SfsReply {
                id: 3,
                outcome: SfsOutcome::Ok(answer),
            });
        }
        for code in [
            SfsCode::Invalid,
            SfsCode::WrongPin { attempts_left: 3 },
            SfsCode::Locked {
                until_ms: 1_700_000_000_000,
            },
            SfsCode::Revoked,
            SfsCode::NotRegistered,
            SfsCode::AlreadyRegistered,
            SfsCode::NotAllowed,
            SfsCode::Internal,
        ] {
            round_trip(&SfsReply {
                id: 4,
                outcome: SfsOutcome::Err(SfsError::new(code, "no")),
            });
        }
    }

    #[test]
    fn shapes_are_those_of_the_spec() {
        let welcome = json(&SfsWelcome::Accepted {
            pin_registered: true,
            biometric_registered: false,
            state: FactorState::Locked { until_ms: 7 },
        });
        assert_eq!(welcome["accepted"]["state"]["locked"]["until_ms"], 7);
        let none = json(&SfsWelcome::Accepted {
            pin_registered: false,
            biometric_registered: false,
            state: FactorState::None,
        });
        assert_eq!(none["accepted"]["state"], "none");
        assert_eq!(
            json(&SfsWelcome::Refused {
                reason: SfsRefusal::UnsupportedVersion
            })["refused"]["reason"],
            "unsupported_version"
        );
        assert_eq!(
            json(&SfsRequest {
                id: 1,
                body: SfsBody::BiometricStart
            })["body"],
            "biometric_start"
        );
        let reply = json(&SfsReply {
            id: 2,
            outcome: SfsOutcome::Err(SfsError::new(SfsCode::WrongPin { attempts_left: 3 }, "x")),
        });
        assert_eq!(
            reply["outcome"]["err"]["code"]["wrong_pin"]["attempts_left"],
            3
        );
        let done = json(&SfsReply {
            id: 2,
            outcome: SfsOutcome::Ok(SfsAnswer::Done),
        });
        assert_eq!(done["outcome"]["ok"], "done");
    }

    #[test]
    fn wrong_lengths_are_refused_and_debug_hides_opaque_bytes() {
        let short =
            cbor::to_canonical_vec(&serde_json::json!({"id": 1, "body": "launch"})).unwrap();
        assert!(decode::<SfsRequest>(&short).is_err());
        // A 64-byte "public key" is not a Bytes<65>.
        let mut bad = encode(&SfsRequest {
            id: 1,
            body: SfsBody::RegisterBiometric {
                public_key: Bytes([4; 65]),
            },
        })
        .unwrap();
        let at = bad.len() - 67;
        assert_eq!(bad.get(at..at + 2), Some(&[0x58, 65][..]));
        if let Some(b) = bad.get_mut(at + 1) {
            *b = 64;
        }
        bad.pop();
        assert!(matches!(
            decode::<SfsRequest>(&bad),
            Err(MessageError::Malformed(_))
        ));
        let body = SfsBody::RegisterPinFinish {
            upload: Blob(vec![0xab; 8]),
        };
        assert_eq!(format!("{body:?}"), "RegisterPinFinish(8 bytes)");
    }

    #[test]
    fn the_biometric_message_is_the_documented_concatenation() {
        let m = biometric_message(&[1; 32], &[2; 32], &[3; 32]);
        assert_eq!(m.len(), 29 + 96);
        assert!(m.starts_with(b"countersign/sfs/biometric/v1\0"));
        assert_eq!(m.last(), Some(&3));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = decode::<SfsRequest>(&bytes);
            let _ = decode::<SfsReply>(&bytes);
            let _ = decode::<SfsHello>(&bytes);
            let _ = decode::<SfsWelcome>(&bytes);
        }
    }
}
