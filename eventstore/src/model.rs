//! The envelope of an event as it goes into the store and comes back out.
//!
//! The store is agnostic of the domain: it keeps `event_type`, `schema_version` and the
//! payload bytes as given, and never interprets them. Decoding into domain types happens in
//! [`RecordedEvent::decode`], which turns a bad payload into a typed error naming the event's
//! position and type.

use countersign_domain::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::StoreError;

/// How the stream must look for an append to be accepted (EventStoreDB semantics).
///
/// Versions count from 0: a stream whose last event has version 4 holds five events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpectedVersion {
    /// Append whatever the stream holds. Concurrent writers never conflict.
    Any,
    /// The stream must not exist yet (no event has ever been appended to it).
    NoStream,
    /// The stream must hold at least one event.
    StreamExists,
    /// The stream's last event must have exactly this version.
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream whose last version is `current` (None: no stream) satisfies this.
    pub(crate) fn accepts(self, current: Option<u64>) -> bool {
        match self {
            Self::Any => true,
            Self::NoStream => current.is_none(),
            Self::StreamExists => current.is_some(),
            Self::Exact(n) => current == Some(n),
        }
    }

    /// Whether events already stored from version `first_version` on can be the result of an
    /// earlier, successful append with this expectation (the idempotent-retry check).
    pub(crate) fn matches_earlier_append(self, first_version: u64) -> bool {
        match self {
            Self::Any | Self::StreamExists => true,
            Self::NoStream => first_version == 0,
            Self::Exact(n) => Some(first_version) == n.checked_add(1),
        }
    }
}

/// Who and what caused an event: carried with it, never interpreted by the store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// The request or flow this event belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// The event or command that caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// Who asked: an API key id, an account, `system`, `cli`. Never a secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// The tenant (virtual server) the event belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_id: Option<String>,
}

/// An event to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Chosen by the caller (UUIDv7): retrying an append with the same ids is idempotent.
    pub event_id: Uuid,
    /// Stable, namespaced type name, e.g. `server.created`.
    pub event_type: String,
    /// Version of the payload's schema for this type.
    pub schema_version: u16,
    /// Deterministic CBOR.
    pub payload: Vec<u8>,
    pub metadata: Metadata,
}

impl NewEvent {
    /// Wraps a domain event, encoding its payload as deterministic CBOR.
    pub fn from_domain<E: DomainEvent>(
        event_id: Uuid,
        event: &E,
        metadata: Metadata,
    ) -> Result<Self, StoreError> {
        let payload = event.encode().map_err(|e| StoreError::InvalidAppend {
            reason: format!("event {} does not encode: {e}", event.event_type()),
        })?;
        Ok(Self {
            event_id,
            event_type: event.event_type().to_owned(),
            schema_version: event.schema_version(),
            payload,
            metadata,
        })
    }
}

/// An event as stored: the envelope of DESIGN.md's event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordedEvent {
    /// Global, gapless, from 0.
    pub position: u64,
    pub stream: String,
    /// Per stream, from 0.
    pub version: u64,
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: u16,
    #[serde(skip)]
    pub payload: Vec<u8>,
    pub metadata: Metadata,
    /// The metadata exactly as stored: the audit trail hashes these bytes, not a re-encoding.
    #[serde(skip)]
    pub metadata_cbor: Vec<u8>,
    /// Milliseconds since the Unix epoch, set by the store when the event was committed.
    pub recorded_at: i64,
}

impl RecordedEvent {
    /// The bytes the audit trail hashes for this event (its leaf is SHA-256(0x00 ‖ bytes)):
    /// the deterministic CBOR array `[position, stream, version, event_id (16-byte string),
    /// event_type, schema_version, payload (byte string), metadata (byte string),
    /// recorded_at]`, payload and metadata exactly as stored. Any implementation can rebuild
    /// them from an exported event to check an inclusion proof.
    pub fn canonical_bytes(&self) -> Result<Vec<u8>, StoreError> {
        let envelope = (
            self.position,
            self.stream.as_str(),
            self.version,
            serde_bytes::Bytes::new(self.event_id.as_bytes()),
            self.event_type.as_str(),
            self.schema_version,
            serde_bytes::Bytes::new(&self.payload),
            serde_bytes::Bytes::new(&self.metadata_cbor),
            self.recorded_at,
        );
        countersign_domain::cbor::to_canonical_vec(&envelope).map_err(|e| StoreError::Decode {
            position: self.position,
            event_type: self.event_type.clone(),
            reason: format!("cannot encode the envelope: {e}"),
        })
    }

    /// The event back from its [`canonical_bytes`](Self::canonical_bytes) (as the outbox relay
    /// publishes them). Bytes that are not such an array are a `Decode` error.
    pub fn from_canonical_bytes(bytes: &[u8]) -> Result<Self, StoreError> {
        type Envelope = (
            u64,
            String,
            u64,
            serde_bytes::ByteBuf,
            String,
            u16,
            serde_bytes::ByteBuf,
            serde_bytes::ByteBuf,
            i64,
        );
        let bad = |reason: String| StoreError::Decode {
            position: 0,
            event_type: String::new(),
            reason,
        };
        let (position, stream, version, id, event_type, schema_version, payload, metadata, at): Envelope =
            cbor4ii::serde::from_slice(bytes)
                .map_err(|e| bad(format!("not a canonical event: {e}")))?;
        let event_id =
            Uuid::from_slice(&id).map_err(|_| bad("the event id is not 16 bytes".into()))?;
        let event = Self {
            position,
            metadata: crate::codec::decode_metadata(position, &event_type, &metadata)?,
            stream,
            version,
            event_id,
            event_type,
            schema_version,
            payload: payload.into_vec(),
            metadata_cbor: metadata.into_vec(),
            recorded_at: at,
        };
        // Only the one encoding is accepted: what decodes must encode to the same bytes.
        if event.canonical_bytes()? != bytes {
            return Err(bad("not in canonical form".into()));
        }
        Ok(event)
    }

    /// Decodes the payload into a domain event type.
    pub fn decode<E: DomainEvent>(&self) -> Result<E, StoreError> {
        E::decode(&self.event_type, self.schema_version, &self.payload).map_err(|source| {
            StoreError::Decode {
                position: self.position,
                event_type: self.event_type.clone(),
                reason: source.to_string(),
            }
        })
    }
}

/// What an acknowledged append wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AppendResult {
    /// Position of the first event written.
    pub first_position: u64,
    /// Position of the last event written: reads that wait for this see the append.
    pub last_position: u64,
    /// The stream's version after the append (use it as the next `Exact`).
    pub next_expected_version: u64,
}

/// Which way to read a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Forwards,
    Backwards,
}

/// Limits that keep one append from monopolising the writer.
pub const MAX_EVENTS_PER_APPEND: usize = 10_000;
/// Largest payload accepted for one event.
pub const MAX_PAYLOAD_BYTES: usize = 1 << 20;
/// Longest stream name accepted.
pub const MAX_STREAM_NAME_BYTES: usize = 256;

/// Checks what an append asks for before it reaches the writer.
pub(crate) fn validate_append(stream: &str, events: &[NewEvent]) -> Result<(), StoreError> {
    let invalid = |reason: String| Err(StoreError::InvalidAppend { reason });
    if stream.is_empty() || stream.len() > MAX_STREAM_NAME_BYTES {
        return invalid(format!(
            "stream name must be 1 to {MAX_STREAM_NAME_BYTES} bytes"
        ));
    }
    if stream.starts_with('$') {
        return invalid("stream names starting with '$' are reserved".into());
    }
    if stream.chars().any(char::is_control) {
        return invalid("stream name contains a control character".into());
    }
    if events.is_empty() {
        return invalid("an append needs at least one event".into());
    }
    if events.len() > MAX_EVENTS_PER_APPEND {
        return invalid(format!(
            "an append takes at most {MAX_EVENTS_PER_APPEND} events"
        ));
    }
    for event in events {
        if event.event_type.is_empty() || event.event_type.len() > 128 {
            return invalid("event type must be 1 to 128 bytes".into());
        }
        if event.schema_version == 0 {
            return invalid(format!("{}: schema version starts at 1", event.event_type));
        }
        if event.payload.len() > MAX_PAYLOAD_BYTES {
            return invalid(format!(
                "{}: payload larger than {MAX_PAYLOAD_BYTES} bytes",
                event.event_type
            ));
        }
    }
    let mut ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    ids.sort_unstable();
    if ids.windows(2).any(|w| w.first() == w.get(1)) {
        return invalid("the same event id appears twice in one append".into());
    }
    Ok(())
}
