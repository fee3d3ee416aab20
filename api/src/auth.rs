//! Who is calling: the admin key (manages servers) or a server's API key (everything inside
//! that server).
//!
//! Rules:
//! - credentials come only as `Authorization: Bearer …`; anything else is 401;
//! - keys are compared by SHA-256 (the admin key in constant time); an API key is looked up
//!   by its hash in the servers read model and must not be revoked, and its server must not
//!   be deleted;
//! - an API key only reaches paths of its own server: another server's id in the path answers
//!   404, exactly as a server that does not exist, so ids cannot be probed;
//! - a key that checked out is remembered for [`CREDENTIAL_TTL`] (by its hash); revoking a key
//!   or deleting a server through this instance forgets every remembered key at once, other
//!   instances stop accepting it within the TTL.

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

/// How long a checked API key is accepted without reading the read model again.
pub const CREDENTIAL_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// The caller's API key, whatever server it belongs to (no path check).
pub(crate) async fn api_key_of(parts: &Parts, state: &AppState) -> Result<Tenant, ApiError> {
    check_api_key(state, api_key_hash(bearer(parts)?)).await
}

/// The caller holds an active API key of the server named in the path.
#[derive(Debug, Clone, Copy)]
pub struct Tenant {
    /// The server, checked against the path.
    pub server: ServerId,
    /// The key used (for event metadata).
    pub key_id: ApiKeyId,
    /// SHA-256 of the server's public key (goes into QR codes).
    pub server_fingerprint: [u8; 32],
}

async fn check_api_key(state: &AppState, hash: [u8; 32]) -> Result<Tenant, ApiError> {
    if let Some(tenant) = state.remembered_credential(&hash, CREDENTIAL_TTL) {
        return Ok(tenant);
    }
    let key = state
        .reads()
        .api_key_by_hash(&hash)
        .await?
        .filter(|key| key.revoked_at.is_none())
        .ok_or(ApiError::Unauthorized)?;
    let server = state
        .reads()
        .server(key.server_id)
        .await?
        .filter(|s| s.deleted_at.is_none())
        .ok_or(ApiError::Unauthorized)?;
    let tenant = Tenant {
        server: key.server_id,
        key_id: key.key_id,
        server_fingerprint: server.key_thumbprint,
    };
    state.remember_credential(hash, tenant);
    Ok(tenant)
}

impl FromRequestParts<AppState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        let tenant = check_api_key(state, api_key_hash(token)).await?;
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::NotFound("no such server".into()))?;
        let in_path = params
            .iter()
            .find(|(name, _)| *name == "server_id")
            .map(|(_, value)| value);
        if in_path != Some(tenant.server.to_string().as_str()) {
            return Err(ApiError::NotFound("no such server".into()));
        }
        Ok(tenant)
    }
}
