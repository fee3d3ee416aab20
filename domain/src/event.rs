//! Event identity and the (type, version, payload) codec.
//!
//! Owns the contract between stored bytes and Rust types. Rules:
//! - Every event has an explicit, namespaced, stable type name (`server.created`) and a schema
//!   version, written once per aggregate in a [`domain_events!`](crate::domain_events) table. They are never derived
//!   from a Rust identifier, so renaming a variant or a struct cannot break replay.
//! - The payload is the canonical CBOR of the variant's payload struct (see `cbor`).
//! - A stored event is never rewritten. Changing a payload's shape means: keep the old struct
//!   (renamed, e.g. `ServerCreatedV1`), bump the version in the table, and list the old
//!   `(type, version) => OldStruct` under `upcast` with a `From<OldStruct>` for the event enum.
//!   `decode` then reads old events through the old struct and converts them, so deciders and
//!   projections only ever see the current shape.
//! - Decoding unknown or garbage input is a typed [`EventDecodeError`], never a panic.

use crate::cbor::CborError;

/// An aggregate's event enum: knows its stable type name and version and its payload codec.
pub trait DomainEvent: Sized {
    /// The stable, namespaced type name, e.g. `server.created`.
    fn event_type(&self) -> &'static str;
    /// The schema version of the payload this value encodes to.
    fn schema_version(&self) -> u16;
    /// Canonical CBOR of the payload struct.
    ///
    /// # Errors
    /// [`CborError::Encode`] if a payload cannot be serialized (not expected for these types).
    fn encode(&self) -> Result<Vec<u8>, CborError>;
    /// Rebuilds an event from its stored parts, upcasting old versions.
    ///
    /// # Errors
    /// [`EventDecodeError`] for an unknown type, a version this build cannot read, or a payload
    /// that is not the expected CBOR.
    fn decode(
        event_type: &str,
        schema_version: u16,
        payload: &[u8],
    ) -> Result<Self, EventDecodeError>;
}

/// Why a stored event could not be turned back into a domain event.
/// The event store adds the position; nothing here echoes payload bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventDecodeError {
    /// No aggregate knows this type name (written by a newer build, or corrupt).
    #[error("unknown event type {event_type:?}")]
    UnknownType {
        /// The stored type name.
        event_type: String,
    },
    /// The type is known but not at this schema version.
    #[error("event type {event_type:?} has no schema version {schema_version}")]
    UnsupportedVersion {
        /// The stored type name.
        event_type: String,
        /// The stored version.
        schema_version: u16,
    },
    /// The payload is not valid CBOR for the type's payload struct.
    #[error("payload of {event_type:?} does not decode")]
    Payload {
        /// The stored type name.
        event_type: String,
        /// What the CBOR decoder found.
        #[source]
        source: CborError,
    },
}

/// Declares an aggregate's event enum and its type-name table, and implements
/// [`DomainEvent`] and `From<Payload>` for it.
///
/// ```ignore
/// domain_events! {
///     /// Events of the server aggregate.
///     pub enum ServerEvent {
///         Created(ServerCreated) = ("server.created", 1),
///         Deleted(ServerDeleted) = ("server.deleted", 2),
///     }
///     upcast {
///         ("server.deleted", 1) => ServerDeletedV1,   // needs From<ServerDeletedV1> for ServerEvent
///     }
/// }
/// ```
#[macro_export]
macro_rules! domain_events {
    (
        $(#[$meta:meta])*
        pub enum $enum:ident {
            $(
                $(#[$vmeta:meta])*
                $variant:ident($payload:ty) = ($type:literal, $version:literal)
            ),+ $(,)?
        }
        $(upcast {
            $( ($otype:literal, $oversion:literal) => $old:ty ),* $(,)?
        })?
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum $enum {
            $(
                $(#[$vmeta])*
                #[doc = concat!("`", $type, "` v", stringify!($version))]
                $variant($payload),
            )+
        }

        impl $enum {
            /// Every (type name, current schema version) this enum writes.
            pub const TYPES: &'static [(&'static str, u16)] = &[$(($type, $version)),+];

        }

        impl $crate::event::DomainEvent for $enum {
            fn event_type(&self) -> &'static str {
                match self {
                    $(Self::$variant(_) => $type,)+
                }
            }

            fn schema_version(&self) -> u16 {
                match self {
                    $(Self::$variant(_) => $version,)+
                }
            }

            fn encode(&self) -> Result<Vec<u8>, $crate::cbor::CborError> {
                match self {
                    $(Self::$variant(p) => $crate::cbor::to_canonical_vec(p),)+
                }
            }

            fn decode(
                event_type: &str,
                schema_version: u16,
                payload: &[u8],
            ) -> Result<Self, $crate::event::EventDecodeError> {
                let bad_payload = |source| $crate::event::EventDecodeError::Payload {
                    event_type: event_type.to_owned(),
                    source,
                };
                match (event_type, schema_version) {
                    $(
                        ($type, $version) => $crate::cbor::from_slice::<$payload>(payload)
                            .map(Self::$variant)
                            .map_err(bad_payload),
                    )+
                    $($(
                        ($otype, $oversion) => $crate::cbor::from_slice::<$old>(payload)
                            .map(Self::from)
                            .map_err(bad_payload),
                    )*)?
                    _ if Self::TYPES.iter().any(|(t, _)| *t == event_type) => {
                        Err($crate::event::EventDecodeError::UnsupportedVersion {
                            event_type: event_type.to_owned(),
                            schema_version,
                        })
                    }
                    _ => Err($crate::event::EventDecodeError::UnknownType {
                        event_type: event_type.to_owned(),
                    }),
                }
            }
        }

        $(
            impl From<$payload> for $enum {
                fn from(p: $payload) -> Self {
                    Self::$variant(p)
                }
            }
        )+
    };
}

macro_rules! any_event {
    ($($variant:ident($enum:ty) = $prefix:literal),+ $(,)?) => {
        /// An event of any aggregate, for code that reads the whole log (`$all`, projections,
        /// the CLI). Decoding dispatches on the type name's prefix, up to the first `.`.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum AnyEvent {
            $(
                #[doc = concat!("`", $prefix, ".*`")]
                $variant($enum),
            )+
        }

        impl AnyEvent {
            /// The type-name prefixes, one per aggregate.
            pub const PREFIXES: &'static [&'static str] = &[$($prefix),+];

            /// Every (type name, schema version) any aggregate writes.
            #[must_use]
            pub fn types() -> Vec<(&'static str, u16)> {
                let mut all = Vec::new();
                $(all.extend_from_slice(<$enum>::TYPES);)+
                all
            }

            /// The payload as JSON for people: byte strings as lowercase hex, field names as
            /// stored. A payload that cannot be encoded (not expected) renders as
            /// `{"error": …}` rather than failing the listing it appears in.
            #[must_use]
            pub fn to_json(&self) -> serde_json::Value {
                match self
                    .encode()
                    .and_then(|bytes| $crate::cbor::decode_value(&bytes))
                {
                    Ok(value) => $crate::cbor::value_to_json(&value),
                    Err(e) => serde_json::json!({ "error": e.to_string() }),
                }
            }
        }

        impl DomainEvent for AnyEvent {
            fn event_type(&self) -> &'static str {
                match self {
                    $(Self::$variant(e) => e.event_type(),)+
                }
            }

            fn schema_version(&self) -> u16 {
                match self {
                    $(Self::$variant(e) => e.schema_version(),)+
                }
            }

            fn encode(&self) -> Result<Vec<u8>, CborError> {
                match self {
                    $(Self::$variant(e) => e.encode(),)+
                }
            }

            fn decode(event_type: &str, schema_version: u16, payload: &[u8]) -> Result<Self, EventDecodeError> {
                let prefix = event_type.split_once('.').map_or(event_type, |(p, _)| p);
                match prefix {
                    $($prefix => <$enum>::decode(event_type, schema_version, payload).map(Self::$variant),)+
                    _ => Err(EventDecodeError::UnknownType { event_type: event_type.to_owned() }),
                }
            }
        }

        $(
            impl From<$enum> for AnyEvent {
                fn from(e: $enum) -> Self {
                    Self::$variant(e)
                }
            }
        )+
    };
}

any_event! {
    Server(crate::server::ServerEvent) = "server",
    User(crate::user::UserEvent) = "user",
    Account(crate::account::AccountEvent) = "account",
    Enrolment(crate::enrolment::EnrolmentEvent) = "enrolment",
    Session(crate::session::SessionEvent) = "session",
    Transaction(crate::transaction::TransactionEvent) = "transaction",
    SecondFactor(crate::second_factor::SecondFactorEvent) = "second_factor",
    Attestation(crate::attestation::AttestationEvent) = "attestation",
    Grant(crate::grant::GrantEvent) = "grant",
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Renamed {
        pub new_name: String,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct RenamedV1 {
        pub old_name: String,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Other {}

    crate::domain_events! {
        /// A test enum whose `demo.renamed` moved to v2.
        pub enum DemoEvent {
            Renamed(Renamed) = ("demo.renamed", 2),
            Other(Other) = ("demo.other", 1),
        }
        upcast {
            ("demo.renamed", 1) => RenamedV1,
        }
    }

    impl From<RenamedV1> for DemoEvent {
        fn from(old: RenamedV1) -> Self {
            Self::Renamed(Renamed {
                new_name: old.old_name,
            })
        }
    }

    #[test]
    fn upcasts_old_versions_and_writes_the_new_one() {
        let old = crate::cbor::to_canonical_vec(&RenamedV1 {
            old_name: "x".into(),
        })
        .unwrap();
        let event = DemoEvent::decode("demo.renamed", 1, &old).unwrap();
        assert_eq!(
            event,
            DemoEvent::Renamed(Renamed {
                new_name: "x".into()
            })
        );
        assert_eq!(event.schema_version(), 2);
        let new = event.encode().unwrap();
        assert_eq!(DemoEvent::decode("demo.renamed", 2, &new).unwrap(), event);
        // v2 bytes are not v1 bytes: reading them as v1 is a payload error, not a mix-up.
        assert!(matches!(
            DemoEvent::decode("demo.renamed", 1, &new),
            Err(EventDecodeError::Payload { .. })
        ));
    }

    #[test]
    fn unknown_and_unsupported() {
        assert_eq!(
            DemoEvent::decode("demo.other", 9, &[0xa0]),
            Err(EventDecodeError::UnsupportedVersion {
                event_type: "demo.other".into(),
                schema_version: 9
            })
        );
        assert_eq!(
            DemoEvent::decode("demo.nope", 1, &[0xa0]),
            Err(EventDecodeError::UnknownType {
                event_type: "demo.nope".into()
            })
        );
        assert!(matches!(
            DemoEvent::decode("demo.other", 1, &[0xff, 0x00]),
            Err(EventDecodeError::Payload { .. })
        ));
        assert_eq!(
            DemoEvent::decode("demo.other", 1, &[0xa0]).unwrap(),
            DemoEvent::Other(Other {})
        );
    }

    #[test]
    fn every_event_round_trips_canonically() {
        let samples = crate::testing::samples();
        let mut covered: Vec<_> = samples
            .iter()
            .map(|e| (e.event_type(), e.schema_version()))
            .collect();
        covered.sort_unstable();
        let mut all = AnyEvent::types();
        all.sort_unstable();
        assert_eq!(covered, all, "one sample per event type");
        for event in samples {
            let (ty, version) = (event.event_type(), event.schema_version());
            let bytes = event.encode().unwrap();
            let decoded = AnyEvent::decode(ty, version, &bytes).unwrap();
            assert_eq!(decoded, event, "{ty}");
            let value = crate::cbor::decode_value(&bytes).unwrap();
            assert_eq!(
                crate::cbor::encode_canonical(&value),
                bytes,
                "{ty} not canonical"
            );
            assert!(ty.starts_with(&format!("{}.", ty.split('.').next().unwrap())));
        }
    }

    #[test]
    fn type_names_are_unique_namespaced_and_versioned() {
        let all = AnyEvent::types();
        let mut names: Vec<_> = all.iter().map(|(t, _)| *t).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len(), "duplicate type name");
        for (ty, version) in all {
            let (prefix, rest) = ty.split_once('.').unwrap();
            assert!(AnyEvent::PREFIXES.contains(&prefix), "{ty}");
            assert!(
                !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{ty}"
            );
            assert!(version >= 1);
        }
    }

    #[test]
    fn any_event_decode_errors() {
        assert_eq!(
            AnyEvent::decode("nope.created", 1, &[0xa0]),
            Err(EventDecodeError::UnknownType {
                event_type: "nope.created".into()
            })
        );
        assert_eq!(
            AnyEvent::decode("server.exploded", 1, &[0xa0]),
            Err(EventDecodeError::UnknownType {
                event_type: "server.exploded".into()
            })
        );
        assert_eq!(
            AnyEvent::decode("server", 1, &[0xa0]),
            Err(EventDecodeError::UnknownType {
                event_type: "server".into()
            })
        );
        assert!(matches!(
            AnyEvent::decode("server.created", 3, &[0xa0]),
            Err(EventDecodeError::UnsupportedVersion {
                schema_version: 3,
                ..
            })
        ));
        for garbage in [&[][..], &[0xff], &[0xa0], &[0x1b, 0, 0], b"not cbor at all"] {
            let err = AnyEvent::decode("server.created", 1, garbage).unwrap_err();
            assert!(
                matches!(&err, EventDecodeError::Payload { event_type, .. } if event_type == "server.created"),
                "{err}"
            );
        }
        // The right payload under the wrong type is refused too, not misread.
        let created = crate::testing::samples()
            .into_iter()
            .find(|e| e.event_type() == "server.created")
            .unwrap();
        let err = AnyEvent::decode("user.registered", 1, &created.encode().unwrap()).unwrap_err();
        assert!(matches!(err, EventDecodeError::Payload { .. }));
    }

    #[test]
    fn to_json_renders_bytes_as_hex() {
        let created = crate::testing::samples().into_iter().next().unwrap();
        let json = created.to_json();
        assert_eq!(json["server_id"], "01".repeat(16));
        assert_eq!(json["key_thumbprint"], "07".repeat(32));
        assert_eq!(json["settings"]["session_timeout_secs"], 300);
        assert_eq!(json["settings"]["logo_url"], serde_json::Value::Null);
    }

    proptest::proptest! {
        #[test]
        fn garbage_payloads_never_panic(
            index in 0usize..64,
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..128),
        ) {
            let types = AnyEvent::types();
            let (ty, version) = types[index % types.len()];
            let _ = AnyEvent::decode(ty, version, &bytes);
        }
    }
}
