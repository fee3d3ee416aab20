//! The Message Center's events, on one stream per mailbox, `mc-{mailbox id hex}`.
//!
//! Type names and schema versions are explicit, stable strings (every type is at version 1);
//! payloads are deterministic CBOR maps ([`countersign_protocol::cbor`]). No event carries an
//! envelope, a push token or an MC token: only their SHA-256 digests and sizes.
//!
//! Event ids of the message events that happen at most once (queued, delivered, expired) are
//! derived from the message id ([`event_id`]), so re-appending after a crash or a retried
//! submit writes nothing new; the others are random.
//!
//! | type | payload |
//! |---|---|
//! | `mc.mailbox_registered` | `platform`, `app_id`, `token_digest`, `channel_key_digest`, `push` (a token was given) |
//! | `mc.push_token_updated` | `push_token_digest` (SHA-256 of the token; of `""` when cleared) |
//! | `mc.message_queued` | `message_id`, `envelope_digest`, `size`, `expires_at_ms`, `priority` |
//! | `mc.delivery_attempted` | `message_id`, `attempt`, `outcome`, `reason`, `next_attempt_at_ms`? |
//! | `mc.message_delivered` | `message_id`, `latency_ms` |
//! | `mc.push_token_dropped` | `reason` |
//! | `mc.message_expired` | `message_id` |
//! | `mc.message_pulled` | `message_ids` |
//! | `mc.message_acknowledged` | `message_ids` |
//!
//! A successful push appends only `mc.message_delivered` (no `mc.delivery_attempted`): one
//! event per delivered message keeps the log's cost per message at two events.

use countersign_eventstore::{Metadata, NewEvent, RecordedEvent};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::Error;

/// The stream of a mailbox.
#[must_use]
pub fn stream(mailbox: &[u8; 16]) -> String {
    format!("mc-{}", hex::encode(mailbox))
}

/// How a delivery attempt ended, as `mc.delivery_attempted` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// The provider asked to try again later.
    Retry,
    /// The provider refused this push for good; the message waits for pull.
    Failed,
    /// The provider dropped the token; the message waits for pull.
    TokenDropped,
    /// Our provider credentials were refused; retried later.
    AuthFailed,
}

impl AttemptOutcome {
    /// The metric label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Retry => "retry",
            Self::Failed => "failed",
            Self::TokenDropped => "token_dropped",
            Self::AuthFailed => "auth_failed",
        }
    }
}

/// One Message Center event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum McEvent {
    /// An app instance registered a mailbox.
    MailboxRegistered {
        /// `fcm` or `apns`.
        platform: String,
        /// The APNs topic or Android package.
        app_id: String,
        /// SHA-256 of the MC token.
        token_digest: [u8; 32],
        /// SHA-256 of the channel's Noise static key (SEC1).
        channel_key_digest: [u8; 32],
        /// Whether a push token was given (else: pull only).
        push: bool,
    },
    /// The app gave a new push token.
    PushTokenUpdated {
        /// SHA-256 of the token.
        push_token_digest: [u8; 32],
    },
    /// A message was accepted into the mailbox.
    MessageQueued {
        /// The message id.
        message_id: [u8; 16],
        /// SHA-256 of the envelope.
        envelope_digest: [u8; 32],
        /// The envelope's length in bytes.
        size: u64,
        /// When it expires (ms since the Unix epoch).
        expires_at_ms: u64,
        /// `high` or `normal`.
        priority: String,
    },
    /// A push did not go through.
    DeliveryAttempted {
        /// The message id.
        message_id: [u8; 16],
        /// Which attempt (from 1).
        attempt: u32,
        /// What happened.
        outcome: AttemptOutcome,
        /// The sender's reason (no token, no content).
        reason: String,
        /// When the next attempt is due, if there is one.
        next_attempt_at_ms: Option<u64>,
    },
    /// The provider accepted the push.
    MessageDelivered {
        /// The message id.
        message_id: [u8; 16],
        /// From queued to delivered.
        latency_ms: u64,
    },
    /// The provider said the push token is no longer valid.
    PushTokenDropped {
        /// The sender's reason.
        reason: String,
    },
    /// The message expired before it was acknowledged; it is gone from the mailbox.
    MessageExpired {
        /// The message id.
        message_id: [u8; 16],
    },
    /// The app pulled these messages.
    MessagePulled {
        /// Their ids, oldest first.
        message_ids: Vec<[u8; 16]>,
    },
    /// The app acknowledged these messages; they are gone from the mailbox.
    MessageAcknowledged {
        /// Their ids.
        message_ids: Vec<[u8; 16]>,
    },
}

#[derive(Serialize, Deserialize)]
struct Registered {
    platform: String,
    app_id: String,
    token_digest: ByteBuf,
    channel_key_digest: ByteBuf,
    push: bool,
}

#[derive(Serialize, Deserialize)]
struct TokenUpdated {
    push_token_digest: ByteBuf,
}

#[derive(Serialize, Deserialize)]
struct Queued {
    message_id: ByteBuf,
    envelope_digest: ByteBuf,
    size: u64,
    expires_at_ms: u64,
    priority: String,
}

#[derive(Serialize, Deserialize)]
struct Attempted {
    message_id: ByteBuf,
    attempt: u32,
    outcome: AttemptOutcome,
    reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next_attempt_at_ms: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct Delivered {
    message_id: ByteBuf,
    latency_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct Dropped {
    reason: String,
}

#[derive(Serialize, Deserialize)]
struct Expired {
    message_id: ByteBuf,
}

#[derive(Serialize, Deserialize)]
struct Ids {
    message_ids: Vec<ByteBuf>,
}

fn buf(bytes: &[u8]) -> ByteBuf {
    ByteBuf::from(bytes.to_vec())
}

fn fixed<const N: usize>(bytes: &ByteBuf) -> Result<[u8; N], Error> {
    <[u8; N]>::try_from(bytes.as_slice())
        .map_err(|_| Error::Decode(format!("a {N}-byte field has {} bytes", bytes.len())))
}

fn cbor<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    countersign_protocol::cbor::to_canonical_vec(value).map_err(|e| Error::Decode(e.to_string()))
}

fn parse<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, Error> {
    countersign_protocol::cbor::from_slice(payload).map_err(|e| Error::Decode(e.to_string()))
}

/// The longest reason an event keeps (a sender's reason is for people, not for storage).
const MAX_REASON: usize = 200;

fn short(reason: &str) -> String {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason.get(..end).unwrap_or_default().to_owned()
}

impl McEvent {
    /// The stable type name.
    #[must_use]
    pub fn event_type(&self) -> &'static str {
        match self {
            Self::MailboxRegistered { .. } => "mc.mailbox_registered",
            Self::PushTokenUpdated { .. } => "mc.push_token_updated",
            Self::MessageQueued { .. } => "mc.message_queued",
            Self::DeliveryAttempted { .. } => "mc.delivery_attempted",
            Self::MessageDelivered { .. } => "mc.message_delivered",
            Self::PushTokenDropped { .. } => "mc.push_token_dropped",
            Self::MessageExpired { .. } => "mc.message_expired",
            Self::MessagePulled { .. } => "mc.message_pulled",
            Self::MessageAcknowledged { .. } => "mc.message_acknowledged",
        }
    }

    /// The payload schema version (1 for every type).
    #[must_use]
    pub fn schema_version(&self) -> u16 {
        1
    }

    /// The deterministic CBOR payload.
    ///
    /// # Errors
    /// [`Error::Decode`] if a value does not encode (it always does).
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        match self {
            Self::MailboxRegistered {
                platform,
                app_id,
                token_digest,
                channel_key_digest,
                push,
            } => cbor(&Registered {
                platform: platform.clone(),
                app_id: app_id.clone(),
                token_digest: buf(token_digest),
                channel_key_digest: buf(channel_key_digest),
                push: *push,
            }),
            Self::PushTokenUpdated { push_token_digest } => cbor(&TokenUpdated {
                push_token_digest: buf(push_token_digest),
            }),
            Self::MessageQueued {
                message_id,
                envelope_digest,
                size,
                expires_at_ms,
                priority,
            } => cbor(&Queued {
                message_id: buf(message_id),
                envelope_digest: buf(envelope_digest),
                size: *size,
                expires_at_ms: *expires_at_ms,
                priority: priority.clone(),
            }),
            Self::DeliveryAttempted {
                message_id,
                attempt,
                outcome,
                reason,
                next_attempt_at_ms,
            } => cbor(&Attempted {
                message_id: buf(message_id),
                attempt: *attempt,
                outcome: *outcome,
                reason: short(reason),
                next_attempt_at_ms: *next_attempt_at_ms,
            }),
            Self::MessageDelivered {
                message_id,
                latency_ms,
            } => cbor(&Delivered {
                message_id: buf(message_id),
                latency_ms: *latency_ms,
            }),
            Self::PushTokenDropped { reason } => cbor(&Dropped {
                reason: short(reason),
            }),
            Self::MessageExpired { message_id } => cbor(&Expired {
                message_id: buf(message_id),
            }),
            Self::MessagePulled { message_ids } | Self::MessageAcknowledged { message_ids } => {
                cbor(&Ids {
                    message_ids: message_ids.iter().map(|id| buf(id)).collect(),
                })
            }
        }
    }

    /// Decodes a recorded event of one of these types.
    ///
    /// # Errors
    /// [`Error::Decode`] for another type, version or a payload that is not this shape.
    pub fn decode(event: &RecordedEvent) -> Result<Self, Error> {
        if event.schema_version != 1 {
            return Err(Error::Decode(format!(
                "{} v{} is not known",
                event.event_type, event.schema_version
            )));
        }
        let p = &event.payload;
        Ok(match event.event_type.as_str() {
            "mc.mailbox_registered" => {
                let r: Registered = parse(p)?;
                Self::MailboxRegistered {
                    platform: r.platform,
                    app_id: r.app_id,
                    token_digest: fixed(&r.token_digest)?,
                    channel_key_digest: fixed(&r.channel_key_digest)?,
                    push: r.push,
                }
            }
            "mc.push_token_updated" => {
                let r: TokenUpdated = parse(p)?;
                Self::PushTokenUpdated {
                    push_token_digest: fixed(&r.push_token_digest)?,
                }
            }
            "mc.message_queued" => {
                let r: Queued = parse(p)?;
                Self::MessageQueued {
                    message_id: fixed(&r.message_id)?,
                    envelope_digest: fixed(&r.envelope_digest)?,
                    size: r.size,
                    expires_at_ms: r.expires_at_ms,
                    priority: r.priority,
                }
            }
            "mc.delivery_attempted" => {
                let r: Attempted = parse(p)?;
                Self::DeliveryAttempted {
                    message_id: fixed(&r.message_id)?,
                    attempt: r.attempt,
                    outcome: r.outcome,
                    reason: r.reason,
                    next_attempt_at_ms: r.next_attempt_at_ms,
                }
            }
            "mc.message_delivered" => {
                let r: Delivered = parse(p)?;
                Self::MessageDelivered {
                    message_id: fixed(&r.message_id)?,
                    latency_ms: r.latency_ms,
                }
            }
            "mc.push_token_dropped" => {
                let r: Dropped = parse(p)?;
                Self::PushTokenDropped { reason: r.reason }
            }
            "mc.message_expired" => {
                let r: Expired = parse(p)?;
                Self::MessageExpired {
                    message_id: fixed(&r.message_id)?,
                }
            }
            "mc.message_pulled" | "mc.message_acknowledged" => {
                let r: Ids = parse(p)?;
                let message_ids = r
                    .message_ids
                    .iter()
                    .map(fixed::<16>)
                    .collect::<Result<Vec<_>, _>>()?;
                if event.event_type == "mc.message_pulled" {
                    Self::MessagePulled { message_ids }
                } else {
                    Self::MessageAcknowledged { message_ids }
                }
            }
            other => return Err(Error::Decode(format!("{other} is not an MC event"))),
        })
    }

    /// The event id: derived from the message id for the at-most-once message events, else
    /// from `random`.
    #[must_use]
    pub fn event_id(&self, random: [u8; 16]) -> Uuid {
        match self {
            Self::MessageQueued { message_id, .. }
            | Self::MessageDelivered { message_id, .. }
            | Self::MessageExpired { message_id } => event_id(self.event_type(), message_id),
            _ => uuid::Builder::from_random_bytes(random).into_uuid(),
        }
    }

    /// As an event to append, with `random` for the id of events not tied to a message.
    ///
    /// # Errors
    /// As [`McEvent::encode`].
    pub fn to_new(&self, random: [u8; 16]) -> Result<NewEvent, Error> {
        Ok(NewEvent {
            event_id: self.event_id(random),
            event_type: self.event_type().to_owned(),
            schema_version: self.schema_version(),
            payload: self.encode()?,
            metadata: Metadata {
                actor: Some("mc".to_owned()),
                ..Metadata::default()
            },
        })
    }
}

/// The id of the `event_type` event of message `message_id`: the first 16 bytes of
/// SHA-256(`"countersign-mc-event\0"` ‖ type ‖ 0 ‖ message id), as a version 4 UUID.
#[must_use]
pub fn event_id(event_type: &str, message_id: &[u8; 16]) -> Uuid {
    let mut hash = Sha256::new();
    hash.update(b"countersign-mc-event\0");
    hash.update(event_type.as_bytes());
    hash.update([0]);
    hash.update(message_id);
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(digest.get(..16).unwrap_or(&[0u8; 16]));
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}
