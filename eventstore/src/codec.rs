//! Conversions between the envelope and database columns. Every conversion of stored bytes
//! is checked and answers a typed error naming the event's position and type.

use countersign_domain::cbor;

use crate::{Metadata, StoreError};

pub(crate) fn to_i64(n: u64) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::InvalidAppend {
        reason: format!("{n} is out of the store's range"),
    })
}

pub(crate) fn to_u64(n: i64) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("negative position or version {n}")))
}

pub(crate) fn schema_version(
    position: u64,
    event_type: &str,
    stored: i64,
) -> Result<u16, StoreError> {
    u16::try_from(stored).map_err(|_| StoreError::Decode {
        position,
        event_type: event_type.to_owned(),
        reason: format!("schema version {stored} is out of range"),
    })
}

pub(crate) fn encode_metadata(metadata: &Metadata) -> Result<Vec<u8>, StoreError> {
    cbor::to_canonical_vec(metadata).map_err(|e| StoreError::InvalidAppend {
        reason: format!("metadata does not encode: {e}"),
    })
}

pub(crate) fn decode_metadata(
    position: u64,
    event_type: &str,
    bytes: &[u8],
) -> Result<Metadata, StoreError> {
    // Metadata holds no floats, so cbor4ii's serde reader takes it in one pass; the general
    // decoder (which normalises float widths first) is the fallback.
    if let Ok(metadata) = cbor4ii::serde::from_slice(bytes) {
        return Ok(metadata);
    }
    cbor::from_slice(bytes).map_err(|e| StoreError::Decode {
        position,
        event_type: event_type.to_owned(),
        reason: format!("metadata: {e}"),
    })
}
