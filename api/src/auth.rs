//! Who is calling: the admin key (manages servers) or a server's API key (everything inside
//! that server).
//!
//! Rules:
//! - credentials come only as one `Authorization: Bearer …` header; anything else is 401,
//!   and two or more `Authorization` headers are 400;
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
    let mut credentials = parts.headers.get_all(AUTHORIZATION).iter();
    let first = credentials.next();
    if credentials.next().is_some() {
        // Which one would count is up to each intermediary: refuse rather than pick.
        return Err(ApiError::BadRequest(
            "send exactly one Authorization header".into(),
        ));
    }
    first
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
#[derive(Clone, Copy)]
pub struct Tenant {
    /// The server, checked against the path.
    pub server: ServerId,
    /// The key used (for event metadata).
    pub key_id: ApiKeyId,
    /// SHA-256 of the server's public key (goes into QR codes).
    pub server_fingerprint: [u8; 32],
    /// SHA-256 of the key itself, to check it again later ([`still_valid`]).
    pub key_hash: [u8; 32],
}

impl std::fmt::Debug for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenant")
            .field("server", &self.server)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Whether the key `tenant` was checked with is still active and its server not deleted
/// (streams ask before each batch). A database failure counts as valid: a blip must not cut
/// every stream; the next check decides.
///
/// Streams of one key ask together, after each batch: when the remembered check has expired,
/// one stream at a time reads the read model (the others then find it remembered), so a
/// thousand streams cost one query per [`CREDENTIAL_TTL`], not a thousand. A key found
/// invalid stays invalid (a revoked key or a deleted server never comes back).
pub(crate) async fn still_valid(state: &AppState, tenant: &Tenant) -> bool {
    let hash = tenant.key_hash;
    if let Some(now) = state.remembered_credential(&hash, CREDENTIAL_TTL) {
        return now.key_id == tenant.key_id;
    }
    let streams = state.streams();
    if streams.known_invalid(&hash) {
        return false;
    }
    let _one_at_a_time = streams.checking().await;
    match check_api_key(state, hash).await {
        Ok(now) => now.key_id == tenant.key_id,
        Err(ApiError::Unauthorized) => {
            streams.invalid(hash);
            false
        }
        Err(_) => true,
    }
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
        key_hash: hash,
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
