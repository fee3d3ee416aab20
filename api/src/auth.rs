//! Who is calling: the admin key (manages servers) or a server's API key (everything inside
//! that server).
//!
//! Rules:
//! - credentials come only as `Authorization: Bearer …`; anything else is 401;
//! - keys are compared by SHA-256 (the admin key in constant time); an API key is looked up
//!   by its hash in the servers read model and must not be revoked, and its server must not
//!   be deleted;
//! - an API key only reaches paths of its own server: another server's id in the path answers
//!   404, exactly as a server that does not exist, so ids cannot be probed.

use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use countersign_commands::server::api_key_hash;
use countersign_domain::{ApiKeyId, ServerId};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::state::AppState;

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    parts
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|token| !token.is_empty())
        .ok_or(ApiError::Unauthorized)
}

/// Constant-time comparison of two digests.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The caller holds the admin key.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if same_digest(&hash, &state.config().admin_key_hash) {
            Ok(Self)
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

/// The caller holds an active API key of the server named in the path.
#[derive(Debug, Clone, Copy)]
pub struct Tenant {
    /// The server, checked against the path.
    pub server: ServerId,
    /// The key used (for event metadata).
    pub key_id: ApiKeyId,
}

impl FromRequestParts<AppState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        let key = state
            .reads()
            .api_key_by_hash(&api_key_hash(token))
            .await?
            .filter(|key| key.revoked_at.is_none())
            .ok_or(ApiError::Unauthorized)?;
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::NotFound("no such server".into()))?;
        let in_path = params
            .iter()
            .find(|(name, _)| *name == "server_id")
            .map(|(_, value)| value);
        if in_path != Some(key.server_id.to_string().as_str()) {
            return Err(ApiError::NotFound("no such server".into()));
        }
        let server = state.reads().server(key.server_id).await?;
        if server.is_none_or(|s| s.deleted_at.is_some()) {
            return Err(ApiError::Unauthorized);
        }
        Ok(Self {
            server: key.server_id,
            key_id: key.key_id,
        })
    }
}
