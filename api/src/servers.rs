//! Admin endpoints: virtual servers and their API keys. Admin writes wait for the read
//! models before answering (they are rare), so a key issued or revoked here takes effect on
//! this instance the moment the answer arrives.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use countersign_commands::idempotency::Scope;
use countersign_commands::load;
use countersign_domain::server::{ConfigureServer, Server, ServerEvent};
use countersign_domain::{ApiKeyId, ServerId};
use countersign_eventstore::Metadata;
use countersign_projections::ServerRow;

use crate::auth::Admin;
use crate::error::{ApiError, Json, Path, Query};
use crate::idempotency::{IdempotencyKey, KeyedJson};
use crate::state::AppState;
use crate::views::{
    ApiKeyIssued, ApiKeyList, ApiKeyView, CreateServerRequest, IssueApiKeyRequest, PageParams,
    ReadParams, SecondFactorMode, ServerList, ServerView, ServerWritten, SfsKeyTrustedView,
    TrustSfsKeyRequest, UpdateServerRequest, Written,
};
use crate::{POSITION_HEADER, error::Problem};

/// Answers `body` with `status` and the position header.
pub fn written<T: serde::Serialize>(
    status: StatusCode,
    position: Option<u64>,
    body: T,
) -> Response {
    let mut response = (status, Json(body)).into_response();
    if let Some(position) = position
        && let Ok(value) = position.to_string().parse()
    {
        response.headers_mut().insert(POSITION_HEADER, value);
    }
    response
}

pub(crate) fn parse_server_id(text: &str) -> Result<ServerId, ApiError> {
    text.parse()
        .map_err(|_| ApiError::NotFound("no such server".into()))
}

/// Who makes admin requests (in event metadata and idempotency fingerprints).
const ADMIN: &str = "admin";

fn admin_metadata() -> Metadata {
    Metadata {
        actor: Some(ADMIN.into()),
        ..Metadata::default()
    }
}

fn view(row: &ServerRow) -> ServerView {
    ServerView::new(
        row.server_id.to_string(),
        &row.settings,
        &row.public_key,
        &row.key_thumbprint,
        row.created_at.as_millis(),
        row.deleted_at.map(|t| t.as_millis()),
    )
}

async fn live_server(state: &AppState, server: ServerId) -> Result<ServerRow, ApiError> {
    state
        .reads()
        .server(server)
        .await?
        .filter(|row| row.deleted_at.is_none())
        .ok_or_else(|| ApiError::NotFound("no such server".into()))
}

/// Creates a virtual server with a fresh id and P-256 key pair.
#[utoipa::path(post, path = "/v1/servers", tag = "servers",
    request_body = CreateServerRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Retry-safe: the same key and request answer the same server; another request under the key is 422")),
    responses(
        (status = 201, description = "Created", body = ServerWritten),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No admin key", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Conflict", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "Created earlier under this idempotency key and deleted since", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid, or the Idempotency-Key was used for another request (type urn:countersign:problem:idempotency-key-reused)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin" = [])))]
pub async fn create_server(
    State(state): State<AppState>,
    _admin: Admin,
    key: IdempotencyKey,
    body: KeyedJson<CreateServerRequest>,
) -> Result<Response, ApiError> {
    let request = body.value;
    let key = key
        .bind(&state, Scope::Admin, ADMIN, b"", &body.canonical)
        .await?;
    let (server, done) = state
        .commands()
        .servers
        .create(&request.name, &admin_metadata(), key)
        .await?;
    state.wait_for(done.position).await?;
    let row = live_server(&state, server).await.map_err(|_| {
        ApiError::Gone("the server created under this idempotency key was deleted since".into())
    })?;
    Ok(written(
        StatusCode::CREATED,
        done.position,
        ServerWritten {
            server: view(&row),
            position: done.position,
        },
    ))
}

/// Lists servers, oldest id first.
#[utoipa::path(get, path = "/v1/servers", tag = "servers", params(PageParams),
    responses(
        (status = 200, description = "A page", body = ServerList),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No admin key", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid input, or min_position beyond the log", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind min_position", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin" = [])))]
pub async fn list_servers(
    State(state): State<AppState>,
    _admin: Admin,
    Query(page): Query<PageParams>,
) -> Result<Json<ServerList>, ApiError> {
    state.wait_for(page.min_position).await?;
    let after = match page.after.as_deref() {
        Some(text) => Some(
            text.parse::<ServerId>()
                .map_err(|_| ApiError::BadRequest("after must be a server id".into()))?,
        ),
        None => None,
    };
    let limit = page_limit(page.limit)?;
    let rows = state.reads().servers(after, limit + 1).await?;
    let more = rows.len() > limit as usize;
    let servers: Vec<ServerView> = rows.iter().take(limit as usize).map(view).collect();
    let next = more
        .then(|| servers.last().map(|s| s.server_id.clone()))
        .flatten();
    Ok(Json(ServerList { servers, next }))
}

pub(crate) fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit.unwrap_or(100) {
        n @ 1..=1000 => Ok(n),
        _ => Err(ApiError::BadRequest("limit must be 1..=1000".into())),
    }
}

/// Reads a server.
#[utoipa::path(get, path = "/v1/servers/{server_id}", tag = "servers",
    params(("server_id" = String, Path, description = "32 hex digits"), ReadParams),
    responses(
        (status = 200, description = "The server", body = ServerView),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No admin key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such server", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid input, or min_position beyond the log", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind min_position", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin" = [])))]
pub async fn get_server(
    State(state): State<AppState>,
    _admin: Admin,
    Path(server_id): Path<String>,
    Query(read): Query<ReadParams>,
) -> Result<Json<ServerView>, ApiError> {
    let server = parse_server_id(&server_id)?;
    state.wait_for(read.min_position).await?;
    Ok(Json(view(&live_server(&state, server).await?)))
}

/// Changes some settings; fields not given stay as they are.
#[utoipa::path(patch, path = "/v1/servers/{server_id}", tag = "servers",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe; another request under the key is 422")),
    request_body = UpdateServerRequest,
    responses(
        (status = 200, description = "The server after the change", body = ServerWritten),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No admin key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such server", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Conflict", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "Deleted", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid, or the Idempotency-Key was used for another request (type urn:countersign:problem:idempotency-key-reused)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin" = [])))]
pub async fn update_server(
    State(state): State<AppState>,
    _admin: Admin,
    Path(server_id): Path<String>,
    key: IdempotencyKey,
    body: KeyedJson<UpdateServerRequest>,
) -> Result<Response, ApiError> {
    let server = parse_server_id(&server_id)?;
    let request = body.value;
    let key = key
        .bind(&state, Scope::Admin, ADMIN, b"", &body.canonical)
        .await?;
    let second_factor = if request.second_factor.is_some()
        || request.second_factor_cache_secs.is_some()
    {
        let current = match load::<Server>(state.store(), &server.stream()).await?.state {
            Server::Active(active) => active.settings.second_factor,
            Server::NotCreated => return Err(ApiError::NotFound("no such server".into())),
            Server::Deleted { .. } => return Err(ApiError::Gone("the server was deleted".into())),
        };
        let mode = request
            .second_factor
            .unwrap_or_else(|| SecondFactorMode::of(&current));
        Some(
            mode.policy(
                request
                    .second_factor_cache_secs
                    .unwrap_or(current.login_reuse_window_secs),
            ),
        )
    } else {
        None
    };
    let change = ConfigureServer {
        name: request.name,
        logo_url: request.logo_url,
        second_factor,
        session_timeout_secs: request.session_timeout_secs,
        default_ping_time_secs: request.default_ping_time_secs,
        data_service: request.data_service.map(|ds| ds.map(Into::into)),
        headless_enrolment: request.headless_enrolment,
    };
    let done = state
        .commands()
        .servers
        .configure(server, change, &admin_metadata(), key)
        .await?;
    state.wait_for(done.position).await?;
    let row = live_server(&state, server).await?;
    Ok(written(
        StatusCode::OK,
        done.position,
        ServerWritten {
            server: view(&row),
            position: done.position,
        },
    ))
}

/// Deletes a server: its keys stop working, its private key is destroyed.
#[utoipa::path(delete, path = "/v1/servers/{server_id}", tag = "servers",
    params(("server_id" = String, Path, description = "32 hex digits")),
    responses(
        (status = 200, description = "Deleted", body = Written),
        (status = 401, description = "No admin key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such server", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "Already deleted", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin" = [])))]
pub async fn delete_server(
    State(state): State<AppState>,
    _admin: Admin,
    Path(server_id): Path<String>,
) -> Result<Response, ApiError> {
    let server = parse_server_id(&server_id)?;
    let done = state
        .commands()
        .servers
        .delete(server, &admin_metadata())
        .await?;
    state.wait_for(done.position).await?;
    state.forget_credentials();
    Ok(written(
        StatusCode::OK,
        done.position,
        Written {
            position: done.position,
        },
    ))
}

/// Issues an API key for the server. The token is in this answer only.
#[utoipa::path(post, path = "/v1/servers/{server_id}/api-keys", tag = "servers",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe: the same key and request answer the same token; another request under the key is 422")),
    request_body = IssueApiKeyRequest,
    responses(
        (status = 201, description = "Issued", body = ApiKeyIssued),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No admin key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such server", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Too many keys", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "Deleted", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid, or the Idempotency-Key was used for another request (type urn:countersign:problem:idempotency-key-reused)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin" = [])))]
pub async fn issue_api_key(
    State(state): State<AppState>,
    _admin: Admin,
    Path(server_id): Path<String>,
    key: IdempotencyKey,
    body: KeyedJson<IssueApiKeyRequest>,
) -> Result<Response, ApiError> {
    let server = parse_server_id(&server_id)?;
    let request = body.value;
    let key = key
        .bind(&state, Scope::Admin, ADMIN, b"", &body.canonical)
        .await?;
    let (key_id, token, done) = state
        .commands()
        .servers
        .issue_api_key(server, &request.label, &admin_metadata(), key)
        .await?;
    state.wait_for(done.position).await?;
    let label = done
        .events
        .iter()
        .find_map(|e| match e {
            ServerEvent::ApiKeyIssued(issued) => Some(issued.label.clone()),
            _ => None,
        })
        .unwrap_or(request.label);
    Ok(written(
        StatusCode::CREATED,
        done.position,
        ApiKeyIssued {
            key_id: key_id.to_string(),
            label,
            token: token.expose().to_owned(),
            position: done.position,
        },
    ))
}

/// Lists the server's API keys (never their secrets).
#[utoipa::path(get, path = "/v1/servers/{server_id}/api-keys", tag = "servers",
    params(("server_id" = String, Path, description = "32 hex digits"), ReadParams),
    responses(
        (status = 200, description = "The keys", body = ApiKeyList),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No admin key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such server", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid input, or min_position beyond the log", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind min_position", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin" = [])))]
pub async fn list_api_keys(
    State(state): State<AppState>,
    _admin: Admin,
    Path(server_id): Path<String>,
    Query(read): Query<ReadParams>,
) -> Result<Json<ApiKeyList>, ApiError> {
    let server = parse_server_id(&server_id)?;
    state.wait_for(read.min_position).await?;
    live_server(&state, server).await?;
    let api_keys = state
        .reads()
        .api_keys(server)
        .await?
        .into_iter()
        .map(|k| ApiKeyView {
            key_id: k.key_id.to_string(),
            label: k.label,
            issued_at: k.issued_at.as_millis(),
            revoked_at: k.revoked_at.map(|t| t.as_millis()),
        })
        .collect();
    Ok(Json(ApiKeyList { api_keys }))
}

/// Revokes an API key: it stops authenticating at once.
#[utoipa::path(delete, path = "/v1/servers/{server_id}/api-keys/{key_id}", tag = "servers",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("key_id" = String, Path, description = "32 hex digits")),
    responses(
        (status = 200, description = "Revoked (or already revoked)", body = Written),
        (status = 401, description = "No admin key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such server or key", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "Server deleted", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin" = [])))]
pub async fn revoke_api_key(
    State(state): State<AppState>,
    _admin: Admin,
    Path(path): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (server_id, key_id) = path;
    let server = parse_server_id(&server_id)?;
    let key_id: ApiKeyId = key_id
        .parse()
        .map_err(|_| ApiError::NotFound("no such API key".into()))?;
    let done = state
        .commands()
        .servers
        .revoke_api_key(server, key_id, &admin_metadata())
        .await?;
    state.wait_for(done.position).await?;
    state.forget_credentials();
    Ok(written(
        StatusCode::OK,
        done.position,
        Written {
            position: done.position,
        },
    ))
}

/// Trusts a third-party app's second-factor server for this server's logins: attestations
/// signed by this key are accepted (the deployment's own SFS is always trusted).
#[utoipa::path(post, path = "/v1/servers/{server_id}/sfs-keys", tag = "servers",
    params(("server_id" = String, Path, description = "32 hex digits")),
    request_body = TrustSfsKeyRequest,
    responses(
        (status = 201, description = "Trusted (or trusted already)", body = SfsKeyTrustedView),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No admin key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such server", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "Server deleted", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not a P-256 key, or a bad label", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin" = [])))]
pub async fn trust_sfs_key(
    State(state): State<AppState>,
    _admin: Admin,
    Path(server_id): Path<String>,
    Json(request): Json<TrustSfsKeyRequest>,
) -> Result<Response, ApiError> {
    let server = parse_server_id(&server_id)?;
    let public_key = hex::decode(request.public_key.trim())
        .map_err(|_| ApiError::Invalid("public_key must be hex".into()))?;
    let key_id = countersign_domain::server::sfs_key_id(&public_key)
        .ok_or_else(|| ApiError::Invalid("public_key is not a P-256 point".into()))?;
    let done = state
        .commands()
        .servers
        .trust_sfs_key(server, public_key, &request.label, &admin_metadata())
        .await?;
    state.wait_for(done.position).await?;
    Ok(written(
        StatusCode::CREATED,
        done.position,
        SfsKeyTrustedView {
            key_id: hex::encode(key_id),
            position: done.position,
        },
    ))
}

/// Stops trusting an SFS key: its attestations are refused from now on (within a second on
/// every instance).
#[utoipa::path(delete, path = "/v1/servers/{server_id}/sfs-keys/{key_id}", tag = "servers",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("key_id" = String, Path, description = "64 hex digits")),
    responses(
        (status = 200, description = "Not trusted (any more)", body = Written),
        (status = 401, description = "No admin key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such server or key id", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "Server deleted", body = Problem, content_type = "application/problem+json"),
    ),
    security(("admin" = [])))]
pub async fn distrust_sfs_key(
    State(state): State<AppState>,
    _admin: Admin,
    Path(path): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (server_id, key_id) = path;
    let server = parse_server_id(&server_id)?;
    let mut id = [0u8; 32];
    hex::decode_to_slice(&key_id, &mut id)
        .map_err(|_| ApiError::NotFound("no such SFS key".into()))?;
    let done = state
        .commands()
        .servers
        .distrust_sfs_key(server, id, &admin_metadata())
        .await?;
    state.wait_for(done.position).await?;
    Ok(written(
        StatusCode::OK,
        done.position,
        Written {
            position: done.position,
        },
    ))
}
