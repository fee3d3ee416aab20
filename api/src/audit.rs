//! The audit trail over HTTP: signed checkpoints, inclusion and consistency proofs, the audit
//! public key, and a tenant's own leaf bytes.
//!
//! Rules:
//! - checkpoints and proofs carry sizes and hashes only, so any valid credential (the admin
//!   key or any server's API key) may read them; they reveal nothing of any tenant's events;
//! - the bytes of a leaf (the canonical event) are personal to its tenant: an API key gets the
//!   leaves of its own server's streams only (`{kind}-{server id}-…`, `server-{server id}`),
//!   anything else answers 404;
//! - a proof is only served for a size the tree has committed; callers check proofs against a
//!   checkpoint they verified, never against a root the server hands them.

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use countersign_projections::audit::{AuditError, StoredCheckpoint};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::{Admin, Tenant};
use crate::error::{ApiError, Json, Path, Problem, Query};
use crate::state::AppState;

/// Any valid credential: the admin key or an API key of any server.
#[derive(Debug, Clone, Copy)]
pub struct AnyCaller;

impl FromRequestParts<AppState> for AnyCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if Admin::from_request_parts(parts, state).await.is_ok() {
            return Ok(Self);
        }
        crate::auth::api_key_of(parts, state).await.map(|_| Self)
    }
}

impl From<AuditError> for ApiError {
    fn from(error: AuditError) -> Self {
        match error {
            AuditError::OutOfRange(message) => Self::Invalid(message),
            other => Self::internal(other),
        }
    }
}

/// A signed tree head.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CheckpointView {
    pub tree_size: u64,
    /// SHA-256 root of the first `tree_size` events, hex.
    pub root_hash: String,
    pub timestamp_ms: i64,
    /// The COSE_Sign1 (ES256) the deployment's audit key made over {origin, size, root,
    /// timestamp}, unpadded base64url: verify this, not the fields beside it.
    pub signed: String,
}

impl From<StoredCheckpoint> for CheckpointView {
    fn from(c: StoredCheckpoint) -> Self {
        Self {
            tree_size: c.tree_size,
            root_hash: hex::encode(c.root_hash),
            timestamp_ms: c.timestamp_ms,
            signed: URL_SAFE_NO_PAD.encode(&c.signed),
        }
    }
}

/// `tree_size` of a checkpoint to read.
#[derive(Debug, Clone, Copy, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CheckpointParams {
    /// The checkpoint for exactly this size (below 2^63); the newest when absent.
    #[param(minimum = 1)]
    #[serde(default, deserialize_with = "crate::error::positions::optional")]
    pub tree_size: Option<u64>,
}

/// The latest signed checkpoint, or the one for a size.
#[utoipa::path(get, path = "/v1/audit/checkpoint", tag = "audit", params(CheckpointParams),
    responses(
        (status = 200, description = "The checkpoint", body = CheckpointView),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No checkpoint (for that size)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin" = []), ("api_key" = [])))]
pub async fn checkpoint(
    State(state): State<AppState>,
    _caller: AnyCaller,
    Query(params): Query<CheckpointParams>,
) -> Result<Json<CheckpointView>, ApiError> {
    let found = state.audit().find_checkpoint(params.tree_size).await?;
    found
        .map(|c| Json(c.into()))
        .ok_or_else(|| ApiError::NotFound("no such checkpoint".into()))
}

/// The audit public key.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditKeyView {
    /// SEC1 uncompressed P-256 public key, hex.
    pub public_key: String,
    /// The COSE key id checkpoints carry, hex.
    pub key_id: String,
}

/// The public key checkpoints are signed with. Pin it out of band; fetching it here is
/// convenient, not trust.
#[utoipa::path(get, path = "/v1/audit/key", tag = "audit",
    responses(
        (status = 200, description = "The key", body = AuditKeyView),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "This instance does not sign checkpoints", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin" = []), ("api_key" = [])))]
pub async fn key(
    State(state): State<AppState>,
    _caller: AnyCaller,
) -> Result<Json<AuditKeyView>, ApiError> {
    let key = state
        .audit_key()
        .ok_or_else(|| ApiError::NotFound("this instance does not sign checkpoints".into()))?;
    Ok(Json(AuditKeyView {
        public_key: hex::encode(key.to_sec1_point(false).as_bytes()),
        key_id: hex::encode(countersign_protocol::checkpoint::key_id(key)),
    }))
}

/// Parameters of an inclusion proof.
#[derive(Debug, Clone, Copy, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct InclusionParams {
    /// The event's log position (= leaf index).
    #[param(minimum = 0)]
    pub position: u64,
    /// The size of the tree (take it from a checkpoint you verified).
    #[param(minimum = 1)]
    pub tree_size: u64,
}

/// A Merkle audit path or consistency proof.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProofView {
    /// Hashes, hex, in RFC 9162 order.
    pub hashes: Vec<String>,
}

fn committed(state_size: u64, wanted: u64) -> Result<(), ApiError> {
    if wanted > state_size {
        return Err(ApiError::Invalid(format!(
            "tree size {wanted} is beyond the committed tree ({state_size})"
        )));
    }
    Ok(())
}

/// The inclusion proof of an event in the tree of a given size.
#[utoipa::path(get, path = "/v1/audit/proofs/inclusion", tag = "audit", params(InclusionParams),
    responses(
        (status = 200, description = "The audit path", body = ProofView),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Sizes out of range", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin" = []), ("api_key" = [])))]
pub async fn inclusion(
    State(state): State<AppState>,
    _caller: AnyCaller,
    Query(params): Query<InclusionParams>,
) -> Result<Json<ProofView>, ApiError> {
    if params.position >= params.tree_size {
        return Err(ApiError::Invalid("position must be below tree_size".into()));
    }
    committed(state.audit().size().await?, params.tree_size)?;
    let proof = state
        .audit()
        .inclusion_proof(params.position, params.tree_size)
        .await?;
    Ok(Json(ProofView {
        hashes: proof.iter().map(hex::encode).collect(),
    }))
}

/// Parameters of a consistency proof.
#[derive(Debug, Clone, Copy, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ConsistencyParams {
    /// The older tree size.
    #[param(minimum = 1)]
    pub from: u64,
    /// The newer tree size.
    #[param(minimum = 1)]
    pub to: u64,
}

/// The proof that the tree of size `to` extends the tree of size `from`.
#[utoipa::path(get, path = "/v1/audit/proofs/consistency", tag = "audit", params(ConsistencyParams),
    responses(
        (status = 200, description = "The consistency proof", body = ProofView),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Sizes out of range", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin" = []), ("api_key" = [])))]
pub async fn consistency(
    State(state): State<AppState>,
    _caller: AnyCaller,
    Query(params): Query<ConsistencyParams>,
) -> Result<Json<ProofView>, ApiError> {
    if params.from == 0 || params.from > params.to {
        return Err(ApiError::Invalid("need 0 < from <= to".into()));
    }
    committed(state.audit().size().await?, params.to)?;
    let proof = state
        .audit()
        .consistency_proof(params.from, params.to)
        .await?;
    Ok(Json(ProofView {
        hashes: proof.iter().map(hex::encode).collect(),
    }))
}

/// One of the tenant's own leaves.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LeafView {
    pub position: u64,
    /// The canonical event bytes (the leaf is SHA-256(0x00 ‖ these)), unpadded base64url.
    pub canonical: String,
    /// SHA-256(0x00 ‖ canonical), hex.
    pub leaf_hash: String,
}

/// Whether a stream belongs to a server: `server-{id}` or `{kind}-{id}-…`.
pub(crate) fn stream_of(stream: &str, server: &str) -> bool {
    stream.split('-').nth(1) == Some(server)
}

/// The canonical bytes of one of this server's events, to check its inclusion proof.
#[utoipa::path(get, path = "/v1/servers/{server_id}/audit/leaves/{position}", tag = "audit",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("position" = u64, Path, description = "The event's log position")),
    responses(
        (status = 200, description = "The leaf", body = LeafView),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such event of this server", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn leaf(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(path): Path<(String, u64)>,
) -> Result<Json<LeafView>, ApiError> {
    let position = crate::error::position("position", path.1)?;
    let event = state
        .store()
        .read_all(position, 1)
        .await?
        .into_iter()
        .next()
        .filter(|e| e.position == position && stream_of(&e.stream, &tenant.server.to_string()))
        .ok_or_else(|| ApiError::NotFound("no such event of this server".into()))?;
    let canonical = event.canonical_bytes()?;
    Ok(Json(LeafView {
        position,
        leaf_hash: hex::encode(countersign_protocol::merkle::leaf_hash(&canonical)),
        canonical: URL_SAFE_NO_PAD.encode(&canonical),
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn streams_belong_to_their_server() {
        let id = "ab".repeat(16);
        assert!(super::stream_of(&format!("server-{id}"), &id));
        assert!(super::stream_of(
            &format!("session-{id}-{}", "cd".repeat(32)),
            &id
        ));
        assert!(!super::stream_of(
            &format!("session-{}-{id}", "cd".repeat(16)),
            &id
        ));
        assert!(!super::stream_of(&format!("sf-{id}"), &"cd".repeat(16)));
    }
}
