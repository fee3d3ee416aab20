//! The messages between an app (the mobile SDK) and the Message Center (MC), version 1
//! (`docs/message-center.md`, "The app ⇄ MC channel").
//!
//! They travel in the Noise channel of [`crate::channel`] opened with
//! [`crate::channel::MC_PROLOGUE`]; the app's Noise static key is its mailbox key. The
//! handshake carries an [`McHello`] (app → MC) and an [`McWelcome`] (MC → app); after it the
//! app sends [`McRequest`]s and the MC answers each with an [`McServerMessage::Reply`]
//! carrying the request's `id`.
//!
//! - A hello without a mailbox may only `register`: that creates a mailbox bound to the
//!   channel's static key and answers its id and the MC token the notification server submits
//!   pushes with. One registration per static key: a second one is [`McErrorCode::Conflict`].
//! - A hello with a mailbox opens only with that mailbox's static key
//!   ([`McRefusal::UnknownMailbox`] otherwise, one refusal for "no such mailbox" and "another
//!   key"), and may `update_push_token`, `pull` and `ack`.
//!
//! The encoding rules are those of [`crate::device`], and so are [`encode`] and [`decode`]
//! (re-exported here): canonical CBOR, size and depth limits checked before serde, exact byte
//! lengths, externally tagged snake_case enums. [`McRequest::validate`] and
//! [`McServerMessage::validate`] check the limits serde cannot. `Debug` never prints a push
//! token or an MC token.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::device::{Blob, Bytes, MAX_MESSAGE_BYTES, MAX_TEXT_BYTES, Secret};
pub use crate::device::{MessageError, decode, encode};
use crate::push::MAX_ENVELOPE_BYTES;

/// The protocol version this code speaks.
pub const VERSION: u16 = 1;
/// Longest push token (FCM registration token, APNs device token in hex), in bytes.
pub const MAX_PUSH_TOKEN_BYTES: usize = 4096;
/// Longest app id (APNs topic, Android package name), in bytes.
pub const MAX_APP_ID_BYTES: usize = 255;
/// Most messages one `pull` asks for, and most ids one `ack` carries.
pub const MAX_BATCH: usize = 100;
/// Most envelope bytes the MC puts in one `messages` answer (it sets `more` and stops before
/// passing it), so that the answer stays well below [`MAX_MESSAGE_BYTES`].
pub const MAX_PULL_ENVELOPE_BYTES: usize = MAX_MESSAGE_BYTES - 32 * 1024;

/// First handshake message's payload, app → MC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct McHello {
    /// The protocol version the app speaks.
    pub version: u16,
    /// The app's mailbox; `None` before it registered (the channel may then only `register`).
    pub mailbox: Option<Bytes<16>>,
}

/// Second handshake message's payload, MC → app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum McWelcome {
    /// The channel is open.
    Accepted {},
    /// The handshake is refused; the MC closes the connection after this.
    Refused {
        /// Why.
        reason: McRefusal,
    },
}

/// Why the MC refused a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum McRefusal {
    /// The app speaks a version the MC does not.
    UnsupportedVersion,
    /// No mailbox with this id opens with this static key: none exists, or its key is another.
    UnknownMailbox,
    /// Too many connections or registrations right now; try again later.
    Busy,
}

/// The push service a mailbox's pushes go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Platform {
    /// Firebase Cloud Messaging (Android).
    Fcm,
    /// Apple Push Notification service (iOS).
    Apns,
}

impl Platform {
    /// The wire name (`"fcm"`, `"apns"`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fcm => "fcm",
            Self::Apns => "apns",
        }
    }
}

/// An app request; the MC answers with a reply carrying the same `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct McRequest {
    /// Chosen by the app; unique among its requests in flight on this connection.
    pub id: u32,
    /// What it asks.
    pub body: McRequestBody,
}

/// What an app may ask.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum McRequestBody {
    /// Hello without a mailbox only: create a mailbox bound to this channel's static key.
    /// Answers [`McAnswer::Registered`].
    Register {
        /// The push service.
        platform: Platform,
        /// The FCM registration token or APNs device token; empty: no push, pull only.
        push_token: String,
        /// The APNs topic (bundle id) or Android package name.
        app_id: String,
    },
    /// Mailbox only: the platform gave the app a new push token (empty: stop pushing).
    UpdatePushToken {
        /// The new token.
        push_token: String,
    },
    /// Mailbox only: the oldest unexpired, unacknowledged messages, at most `limit`
    /// (1..=[`MAX_BATCH`]). Answers [`McAnswer::Messages`].
    Pull {
        /// How many at most.
        limit: u16,
    },
    /// Mailbox only: these messages were processed; the MC forgets them (unknown ids are
    /// ignored, so an ack may be repeated).
    Ack {
        /// 1..=[`MAX_BATCH`] message ids.
        message_ids: Vec<Bytes<16>>,
    },
}

impl fmt::Debug for McRequestBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Register {
                platform,
                push_token,
                app_id,
            } => f
                .debug_struct("Register")
                .field("platform", platform)
                .field("push_token_len", &push_token.len())
                .field("app_id", app_id)
                .finish(),
            Self::UpdatePushToken { push_token } => f
                .debug_struct("UpdatePushToken")
                .field("push_token_len", &push_token.len())
                .finish(),
            Self::Pull { limit } => f.debug_struct("Pull").field("limit", limit).finish(),
            Self::Ack { message_ids } => f
                .debug_struct("Ack")
                .field("message_ids", message_ids)
                .finish(),
        }
    }
}

/// A push token is what the MC puts in an FCM body or an APNs URL path: visible ASCII of the
/// characters the platforms use (letters, digits, `-`, `_`, `:`, `.`), nothing that could
/// reach a path separator, a query or a header.
fn is_token_text(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b':' | b'.'))
}

impl McRequest {
    /// Checks the limits serde cannot: token and app id lengths and characters, batch sizes.
    ///
    /// # Errors
    /// An [`McError`] with [`McErrorCode::Invalid`].
    pub fn validate(&self) -> Result<(), McError> {
        let invalid = |m: &str| Err(McError::new(McErrorCode::Invalid, m));
        match &self.body {
            McRequestBody::Register {
                push_token, app_id, ..
            } => {
                check_push_token(push_token)?;
                if app_id.is_empty() || app_id.len() > MAX_APP_ID_BYTES {
                    return invalid("app_id must be 1 to 255 bytes");
                }
                if !is_token_text(app_id) || app_id.contains(':') {
                    return invalid("app_id may hold only letters, digits, '-', '_' and '.'");
                }
                Ok(())
            }
            McRequestBody::UpdatePushToken { push_token } => check_push_token(push_token),
            McRequestBody::Pull { limit } if *limit == 0 || usize::from(*limit) > MAX_BATCH => {
                invalid("pull limit must be 1 to 100")
            }
            McRequestBody::Ack { message_ids }
                if message_ids.is_empty() || message_ids.len() > MAX_BATCH =>
            {
                invalid("ack must name 1 to 100 message ids")
            }
            McRequestBody::Pull { .. } | McRequestBody::Ack { .. } => Ok(()),
        }
    }
}

fn check_push_token(push_token: &str) -> Result<(), McError> {
    if push_token.len() > MAX_PUSH_TOKEN_BYTES {
        return Err(McError::new(
            McErrorCode::Invalid,
            "push_token is longer than 4096 bytes",
        ));
    }
    if !is_token_text(push_token) {
        return Err(McError::new(
            McErrorCode::Invalid,
            "push_token may hold only letters, digits, '-', '_', ':' and '.'",
        ));
    }
    Ok(())
}

/// A message from the MC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum McServerMessage {
    /// The answer to a request.
    Reply {
        /// The request's id.
        id: u32,
        /// Its outcome.
        outcome: McOutcome,
    },
}

impl McServerMessage {
    /// Checks the limits serde cannot (the SDK runs it on what it receives): batch size,
    /// envelope and text lengths.
    ///
    /// # Errors
    /// An [`McError`] with [`McErrorCode::Invalid`].
    pub fn validate(&self) -> Result<(), McError> {
        let Self::Reply { outcome, .. } = self;
        let invalid = |m: &str| Err(McError::new(McErrorCode::Invalid, m));
        match outcome {
            McOutcome::Ok(McAnswer::Messages { messages, .. }) => {
                if messages.len() > MAX_BATCH {
                    return invalid("more than 100 messages in one answer");
                }
                if messages
                    .iter()
                    .any(|m| m.envelope.0.is_empty() || m.envelope.0.len() > MAX_ENVELOPE_BYTES)
                {
                    return invalid("an envelope is empty or longer than 16 KiB");
                }
                Ok(())
            }
            McOutcome::Err(e) if e.message.len() > MAX_TEXT_BYTES => {
                invalid("the error message is longer than 4096 bytes")
            }
            McOutcome::Ok(_) | McOutcome::Err(_) => Ok(()),
        }
    }
}

/// A request's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum McOutcome {
    /// Done.
    Ok(McAnswer),
    /// Refused.
    Err(McError),
}

/// What a successful request answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum McAnswer {
    /// The mailbox exists. The app keeps both; it hands the MC token to each of its servers
    /// (`register_push` over the device gateway), never to anyone else.
    Registered {
        /// The new mailbox: say it in every later hello.
        mailbox: Bytes<16>,
        /// What a notification server submits pushes for this mailbox with.
        mc_token: Secret<32>,
    },
    /// Done, nothing to say.
    Done,
    /// Messages waiting, oldest first.
    Messages {
        /// At most the pull's limit, and at most [`MAX_PULL_ENVELOPE_BYTES`] of envelopes.
        messages: Vec<McMessage>,
        /// More are waiting: pull again after acknowledging these.
        more: bool,
    },
}

/// One waiting message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct McMessage {
    /// The push's message id (as in its envelope).
    pub message_id: Bytes<16>,
    /// Milliseconds since the Unix epoch after which the MC drops it.
    pub expires_at_ms: u64,
    /// The push envelope ([`crate::push`]), as the server submitted it.
    pub envelope: Blob,
}

/// A refused request: a code to act on and a message for people. Messages never echo
/// secrets or foreign content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct McError {
    /// What went wrong.
    pub code: McErrorCode,
    /// For people.
    pub message: String,
}

impl McError {
    /// A refusal.
    pub fn new(code: McErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// What went wrong with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum McErrorCode {
    /// Malformed, or over a limit.
    Invalid,
    /// This channel may not do this: `register` on a mailbox hello, or a mailbox request on a
    /// hello without one.
    NotAllowed,
    /// This static key already registered a mailbox.
    Conflict,
    /// Too many requests (registrations) for now; try again later.
    RateLimited,
    /// The MC failed; try again later.
    Internal,
}

/// `McError` from a decoding failure, for replies.
impl From<MessageError> for McError {
    fn from(e: MessageError) -> Self {
        Self::new(McErrorCode::Invalid, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

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

    fn register(push_token: &str, app_id: &str) -> McRequest {
        McRequest {
            id: 1,
            body: McRequestBody::Register {
                platform: Platform::Apns,
                push_token: push_token.into(),
                app_id: app_id.into(),
            },
        }
    }

    #[test]
    fn every_message_round_trips() {
        round_trip(&McHello {
            version: VERSION,
            mailbox: None,
        });
        round_trip(&McHello {
            version: VERSION,
            mailbox: Some(Bytes([7; 16])),
        });
        round_trip(&McWelcome::Accepted {});
        for reason in [
            McRefusal::UnsupportedVersion,
            McRefusal::UnknownMailbox,
            McRefusal::Busy,
        ] {
            round_trip(&McWelcome::Refused { reason });
        }
        for body in [
            McRequestBody::Register {
                platform: Platform::Fcm,
                push_token: "fcm:APA91b-x_y".into(),
                app_id: "com.example.bank".into(),
            },
            McRequestBody::UpdatePushToken {
                push_token: String::new(),
            },
            McRequestBody::Pull { limit: 100 },
            McRequestBody::Ack {
                message_ids: vec![Bytes([1; 16]), Bytes([2; 16])],
            },
        ] {
            let request = McRequest { id: 9, body };
            request.validate().unwrap();
            round_trip(&request);
        }
        for answer in [
            McAnswer::Registered {
                mailbox: Bytes([3; 16]),
                mc_token: Secret::new([4; 32]),
            },
            McAnswer::Done,
            McAnswer::Messages {
                messages: vec![McMessage {
                    message_id: Bytes([5; 16]),
                    expires_at_ms: 1_700_000_000_000,
                    envelope: Blob(vec![0xa6; 200]),
                }],
                more: true,
            },
            McAnswer::Messages {
                messages: vec![],
                more: false,
            },
        ] {
            let reply = McServerMessage::Reply {
                id: 3,
                outcome: McOutcome::Ok(answer),
            };
            reply.validate().unwrap();
            round_trip(&reply);
        }
        for code in [
            McErrorCode::Invalid,
            McErrorCode::NotAllowed,
            McErrorCode::Conflict,
            McErrorCode::RateLimited,
            McErrorCode::Internal,
        ] {
            round_trip(&McServerMessage::Reply {
                id: 4,
                outcome: McOutcome::Err(McError::new(code, "no")),
            });
        }
    }

    #[test]
    fn shapes_are_those_of_the_doc() {
        assert_eq!(
            json(&McHello {
                version: 1,
                mailbox: None
            }),
            serde_json::json!({"version": 1, "mailbox": null})
        );
        assert_eq!(
            json(&McWelcome::Accepted {}),
            serde_json::json!({"accepted": {}})
        );
        assert_eq!(
            json(&McWelcome::Refused {
                reason: McRefusal::UnknownMailbox
            }),
            serde_json::json!({"refused": {"reason": "unknown_mailbox"}})
        );
        assert_eq!(
            json(&register("ab12", "com.example.bank")),
            serde_json::json!({"id": 1, "body": {"register": {
                "platform": "apns", "push_token": "ab12", "app_id": "com.example.bank"}}})
        );
        assert_eq!(
            json(&McRequest {
                id: 2,
                body: McRequestBody::Pull { limit: 10 }
            })["body"],
            serde_json::json!({"pull": {"limit": 10}})
        );
        let registered = json(&McServerMessage::Reply {
            id: 1,
            outcome: McOutcome::Ok(McAnswer::Registered {
                mailbox: Bytes([3; 16]),
                mc_token: Secret::new([4; 32]),
            }),
        });
        assert_eq!(
            registered["reply"]["outcome"]["ok"]["registered"]["mc_token"],
            "04".repeat(32)
        );
        let done = json(&McServerMessage::Reply {
            id: 2,
            outcome: McOutcome::Ok(McAnswer::Done),
        });
        assert_eq!(done["reply"]["outcome"]["ok"], "done");
        let err = json(&McServerMessage::Reply {
            id: 2,
            outcome: McOutcome::Err(McError::new(McErrorCode::Conflict, "registered")),
        });
        assert_eq!(err["reply"]["outcome"]["err"]["code"], "conflict");
        assert_eq!(Platform::Apns.as_str(), "apns");
        assert_eq!(json(&Platform::Fcm), "fcm");
    }

    #[test]
    fn limits_are_refused() {
        let too_long = "a".repeat(MAX_PUSH_TOKEN_BYTES + 1);
        let at_limit = "a".repeat(MAX_PUSH_TOKEN_BYTES);
        assert!(register(&at_limit, "com.example").validate().is_ok());
        assert!(register("", "com.example").validate().is_ok(), "pull only");
        let refused = [
            register(&too_long, "com.example"),
            register("abc/../x", "com.example"),
            register("abc def", "com.example"),
            register("abc\r\nx-injected: 1", "com.example"),
            register("abc", ""),
            register("abc", &"a".repeat(MAX_APP_ID_BYTES + 1)),
            register("abc", "com.example/evil"),
            register("abc", "com.example:evil"),
            McRequest {
                id: 1,
                body: McRequestBody::UpdatePushToken {
                    push_token: too_long.clone(),
                },
            },
            McRequest {
                id: 1,
                body: McRequestBody::Pull { limit: 0 },
            },
            McRequest {
                id: 1,
                body: McRequestBody::Pull { limit: 101 },
            },
            McRequest {
                id: 1,
                body: McRequestBody::Ack {
                    message_ids: vec![],
                },
            },
            McRequest {
                id: 1,
                body: McRequestBody::Ack {
                    message_ids: vec![Bytes([0; 16]); 101],
                },
            },
        ];
        for (i, request) in refused.iter().enumerate() {
            assert_eq!(
                request.validate().map_err(|e| e.code),
                Err(McErrorCode::Invalid),
                "case {i}"
            );
        }
        assert!(
            McRequest {
                id: 1,
                body: McRequestBody::Pull { limit: 1 },
            }
            .validate()
            .is_ok()
        );
        let message = |len: usize| McMessage {
            message_id: Bytes([1; 16]),
            expires_at_ms: 1,
            envelope: Blob(vec![0; len]),
        };
        let reply = |messages: Vec<McMessage>| McServerMessage::Reply {
            id: 1,
            outcome: McOutcome::Ok(McAnswer::Messages {
                messages,
                more: false,
            }),
        };
        assert!(reply(vec![message(MAX_ENVELOPE_BYTES)]).validate().is_ok());
        assert!(
            reply(vec![message(MAX_ENVELOPE_BYTES + 1)])
                .validate()
                .is_err()
        );
        assert!(reply(vec![message(0)]).validate().is_err());
        assert!(reply(vec![message(10); MAX_BATCH + 1]).validate().is_err());
        let long_error = McServerMessage::Reply {
            id: 1,
            outcome: McOutcome::Err(McError::new(
                McErrorCode::Internal,
                "x".repeat(MAX_TEXT_BYTES + 1),
            )),
        };
        assert!(long_error.validate().is_err());
    }

    #[test]
    fn strict_decoding() {
        // A 15-byte mailbox id.
        let mut bytes = encode(&McHello {
            version: 1,
            mailbox: Some(Bytes([7; 16])),
        })
        .unwrap();
        let at = bytes.windows(2).position(|w| w == [0x50, 7]).unwrap();
        bytes[at] = 0x4f;
        bytes.remove(at + 1);
        assert!(matches!(
            decode::<McHello>(&bytes),
            Err(MessageError::Malformed(_))
        ));
        // Trailing bytes, garbage, an unknown request, an unknown platform.
        let mut trailing = encode(&McWelcome::Accepted {}).unwrap();
        trailing.push(0);
        assert!(decode::<McWelcome>(&trailing).is_err());
        for garbage in [&b""[..], b"\xff", b"\xa0", b"\x82\x01"] {
            assert!(decode::<McRequest>(garbage).is_err());
        }
        let unknown =
            cbor::to_canonical_vec(&serde_json::json!({"id": 1, "body": {"purge": {}}})).unwrap();
        assert!(decode::<McRequest>(&unknown).is_err());
        let platform = cbor::to_canonical_vec(&serde_json::json!({"id": 1, "body": {"register": {
            "platform": "hms", "push_token": "a", "app_id": "b"}}}))
        .unwrap();
        assert!(decode::<McRequest>(&platform).is_err());
        // A pull limit past u16.
        let big = cbor::to_canonical_vec(
            &serde_json::json!({"id": 1, "body": {"pull": {"limit": 70000}}}),
        )
        .unwrap();
        assert!(decode::<McRequest>(&big).is_err());
    }

    #[test]
    fn debug_hides_tokens() {
        let request = register("SECRETPUSHTOKEN", "com.example");
        let shown = format!("{request:?}");
        assert!(!shown.contains("SECRETPUSHTOKEN"), "{shown}");
        assert!(shown.contains("push_token_len: 15"), "{shown}");
        let answer = McAnswer::Registered {
            mailbox: Bytes([1; 16]),
            mc_token: Secret::new([0xab; 32]),
        };
        assert!(!format!("{answer:?}").contains("abab"));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = decode::<McHello>(&bytes);
            let _ = decode::<McWelcome>(&bytes);
            if let Ok(r) = decode::<McRequest>(&bytes) {
                let _ = r.validate();
            }
            if let Ok(m) = decode::<McServerMessage>(&bytes) {
                let _ = m.validate();
            }
        }
    }
}
