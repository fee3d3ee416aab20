//! The `Idempotency-Key` header: which request a key names, and refusing its reuse for another.
//!
//! Every endpoint that accepts the header binds the key to the request before calling its
//! command ([`countersign_commands::idempotency`]): the same request again answers the first
//! answer, another request under the key answers `422` of type
//! [`IDEMPOTENCY_KEY_REUSED`](crate::error::IDEMPOTENCY_KEY_REUSED) and writes nothing.
//!
//! What makes two requests the same (the fingerprint):
//! - the method and the path as sent (so a key used for one user or one route cannot be
//!   reused for another);
//! - the caller: the API key (two keys of one tenant never share a request) or the admin key;
//! - what the endpoint names beside the path (a session's nonce sent in `X-Nonce`);
//! - the body as JSON, canonical: whitespace and the order of object members do not count,
//!   anything else does (`null` is not an absent member). The query string does not count: it
//!   only chooses how the answer is rendered (`format`, `size`).
//!
//! The key is bound once the request passed the checks that need no state (syntax, shape), so
//! a malformed request does not use up its key; from then on it is bound whatever the outcome.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method};
use countersign_commands::idempotency::{KeyBinding, Scope};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{ApiError, Json};
use crate::state::AppState;

/// The idempotency key of a request, if it carries one (1..=255 visible ASCII characters).
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .ok()
        .filter(|t| !t.is_empty() && t.len() <= 255)
        .ok_or_else(|| {
            ApiError::BadRequest("Idempotency-Key must be 1..=255 visible ASCII characters".into())
        })?;
    Ok(Some(text.to_owned()))
}

/// A request's `Idempotency-Key` with what it needs to be bound: the method and path.
#[derive(Debug, Clone)]
pub struct IdempotencyKey(Option<Keyed>);

#[derive(Debug, Clone)]
struct Keyed {
    key: String,
    method: Method,
    path: String,
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(idempotency_key(&parts.headers)?.map(|key| Keyed {
            key,
            method: parts.method.clone(),
            path: parts.uri.path().to_owned(),
        })))
    }
}

impl IdempotencyKey {
    /// Binds the key (if any) to this request of `caller` with `named` (what the request
    /// names beside its path) and `body` (its canonical JSON, [`canonical_json`]); answers
    /// the key for the command, or [`ApiError::IdempotencyKeyReused`].
    pub async fn bind(
        &self,
        state: &AppState,
        scope: Scope,
        caller: &str,
        named: &[u8],
        body: &[u8],
    ) -> Result<Option<&str>, ApiError> {
        let Some(keyed) = &self.0 else {
            return Ok(None);
        };
        let parts: [&[u8]; 5] = [
            keyed.method.as_str().as_bytes(),
            keyed.path.as_bytes(),
            caller.as_bytes(),
            named,
            body,
        ];
        match state
            .commands()
            .idempotency
            .bind(scope, &keyed.key, &parts)
            .await?
        {
            KeyBinding::Bound => Ok(Some(&keyed.key)),
            KeyBinding::Reused => Err(ApiError::IdempotencyKeyReused),
        }
    }
}

/// A JSON body as [`Json`] extracts it (same refusals), with its canonical form for the
/// fingerprint.
#[derive(Debug, Clone)]
pub struct KeyedJson<T> {
    pub value: T,
    pub canonical: Vec<u8>,
}

impl<T, S> FromRequest<S> for KeyedJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // Media type, size and syntax are refused as `Json` refuses them; the shape is read
        // by axum's own decoder, so a refusal names the field as it does.
        let Json(raw) = Json::<Value>::from_request(req, state).await?;
        let canonical = canonical_value(&raw);
        let compact = serde_json::to_vec(&raw).map_err(ApiError::internal)?;
        let axum::Json(value) =
            axum::Json::<T>::from_bytes(&compact).map_err(|rejection| match rejection {
                JsonRejection::JsonSyntaxError(e) => ApiError::BadRequest(e.body_text()),
                other => ApiError::Invalid(other.body_text()),
            })?;
        Ok(Self { value, canonical })
    }
}

/// The canonical form of a JSON body: members sorted by name, no whitespace. An empty body
/// (allowed where every field is optional) reads as `{}`. Bytes that are not JSON are kept
/// as they are (the handler refuses them before binding anyway).
pub fn canonical_json(body: &[u8]) -> Vec<u8> {
    if body.is_empty() {
        return b"{}".to_vec();
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(value) => canonical_value(&value),
        Err(_) => body.to_vec(),
    }
}

fn canonical_value(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(members) => {
            // Sorted here, not by the map, so the form does not depend on serde_json's
            // `preserve_order` feature.
            let mut sorted: Vec<(&String, &Value)> = members.iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (name, member)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(&Value::String(name.clone()), out);
                out.push(b':');
                write_canonical(member, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => write_scalar(scalar, out),
    }
}

fn write_scalar(value: &Value, out: &mut Vec<u8>) {
    // Serialising a scalar cannot fail; an empty form would only make fingerprints stricter.
    if let Ok(bytes) = serde_json::to_vec(value) {
        out.extend_from_slice(&bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_ignores_layout_and_member_order_only() {
        let a = canonical_json(br#"{"b": 1, "a": {"y": [1, 2], "x": null}}"#);
        let b = canonical_json(br#"{"a":{"x":null,"y":[1,2]},"b":1}"#);
        assert_eq!(a, b);
        assert_eq!(a, br#"{"a":{"x":null,"y":[1,2]},"b":1}"#.to_vec());
        assert_ne!(
            canonical_json(br#"{"a":null}"#),
            canonical_json(b"{}"),
            "null is not absent"
        );
        assert_ne!(
            canonical_json(br#"{"a":[1,2]}"#),
            canonical_json(br#"{"a":[2,1]}"#)
        );
        assert_eq!(canonical_json(b""), canonical_json(b"{}"));
    }
}
