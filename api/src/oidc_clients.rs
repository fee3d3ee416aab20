//! Per-server endpoints for the server's OpenID Provider: its OIDC clients (relying parties)
//! and its OIDC signing keys, under the server's API key.
//!
//! Rules: a client of another server is `404` like an unknown one (the path's server must be
//! the API key's, and every read is filtered on it); a confidential client's secret is in the
//! answer that made it (registration, rotation) and nowhere else: reads never show it, the log
//! and the read model hold only its SHA-256. Writes wait for the read models before answering,
//! so the IdP on this instance knows a client the moment its registration is answered, and
//! answer the log position they reached. `POST`s take `Idempotency-Key`: a retry answers the
//! same client and the same secret (derived from the key, never stored).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use countersign_domain::OidcClientId;
use countersign_domain::server::{
    CibaMode, CibaSettings, OidcClientKind, OidcClientSettings, UpdateOidcClient,
};
use countersign_projections::{OidcClientRow, OidcKeyRow};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Tenant;
use crate::error::{ApiError, Json, Path, Problem, Query};
use crate::idempotency::{IdempotencyKey, KeyedJson};
use crate::servers::written;
use crate::state::AppState;
use crate::users::{bind_tenant_key, tenant_metadata};
use crate::views::{ReadParams, Written};

/// Whether a client can keep a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClientType {
    /// A browser or native app: no secret, PKCE required, no CIBA.
    Public,
    /// A server-side app: authenticates with its client secret.
    Confidential,
}

impl From<ClientType> for OidcClientKind {
    fn from(t: ClientType) -> Self {
        match t {
            ClientType::Public => Self::Public,
            ClientType::Confidential => Self::Confidential,
        }
    }
}

impl From<OidcClientKind> for ClientType {
    fn from(k: OidcClientKind) -> Self {
        match k {
            OidcClientKind::Public => Self::Public,
            OidcClientKind::Confidential => Self::Confidential,
        }
    }
}

/// CIBA delivery mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CibaModeView {
    /// The client polls the token endpoint.
    Poll,
    /// The provider calls `notification_endpoint` when the user decided.
    Ping,
}

/// A client's CIBA settings (confidential clients only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CibaView {
    pub mode: CibaModeView,
    /// Required in ping mode, absent in poll mode: an `https` URL (`http` only for loopback).
    #[serde(default)]
    #[schema(max_length = 2048)]
    pub notification_endpoint: Option<String>,
}

impl From<CibaView> for CibaSettings {
    fn from(v: CibaView) -> Self {
        Self {
            mode: match v.mode {
                CibaModeView::Poll => CibaMode::Poll,
                CibaModeView::Ping => CibaMode::Ping,
            },
            notification_endpoint: v.notification_endpoint,
        }
    }
}

impl From<&CibaSettings> for CibaView {
    fn from(s: &CibaSettings) -> Self {
        Self {
            mode: match s.mode {
                CibaMode::Poll => CibaModeView::Poll,
                CibaMode::Ping => CibaModeView::Ping,
            },
            notification_endpoint: s.notification_endpoint.clone(),
        }
    }
}

fn default_scopes() -> Vec<String> {
    vec!["openid".into()]
}

/// `POST /v1/servers/{server_id}/oidc/clients`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterClientRequest {
    /// Shown on the login page: 1..=100 characters.
    #[schema(min_length = 1, max_length = 100)]
    pub name: String,
    /// `public` (no secret) or `confidential` (a secret, shown once in the answer).
    #[serde(rename = "type")]
    pub client_type: ClientType,
    /// Exact redirect URIs, at most 10: absolute `https` (`http` only for 127.0.0.1, [::1],
    /// localhost), no fragment, no userinfo, at most 2048 bytes. Empty only for a CIBA client.
    #[serde(default)]
    pub redirect_uris: Vec<String>,
    /// Where RP-initiated logout may return to, at most 10, same rules.
    #[serde(default)]
    pub post_logout_redirect_uris: Vec<String>,
    /// Allowed scopes (of openid, profile, email, phone, groups, offline_access); must contain
    /// `openid`. Default `["openid"]`.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// OIDC Back-Channel Logout endpoint, same URL rules.
    #[serde(default)]
    pub backchannel_logout_uri: Option<String>,
    /// CIBA settings; confidential clients only.
    #[serde(default)]
    pub ciba: Option<CibaView>,
}

/// `PATCH /v1/servers/{server_id}/oidc/clients/{client_id}`: only the fields given change; the
/// type cannot change.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateClientRequest {
    #[schema(min_length = 1, max_length = 100)]
    pub name: Option<String>,
    pub redirect_uris: Option<Vec<String>>,
    pub post_logout_redirect_uris: Option<Vec<String>>,
    pub scopes: Option<Vec<String>>,
    /// `null` removes it.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub backchannel_logout_uri: Option<Option<String>>,
    /// `null` turns CIBA off.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<CibaView>)]
    pub ciba: Option<Option<CibaView>>,
}

fn double_option<'de, D, T>(de: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(de).map(Some)
}

/// An OIDC client, without its secret.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClientView {
    /// The OAuth `client_id` (32 hex digits).
    pub client_id: String,
    pub name: String,
    #[serde(rename = "type")]
    pub client_type: ClientType,
    pub redirect_uris: Vec<String>,
    pub post_logout_redirect_uris: Vec<String>,
    pub scopes: Vec<String>,
    pub backchannel_logout_uri: Option<String>,
    pub ciba: Option<CibaView>,
    /// Milliseconds since the epoch.
    pub created_at: i64,
    /// Milliseconds since the epoch: the last change of settings or secret.
    pub updated_at: i64,
    /// The log position of the client's last change (of the write, in a write's answer).
    pub position: Option<u64>,
}

/// A new client (or a new secret): `client_secret` is shown here once and never again.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClientRegistered {
    #[serde(flatten)]
    pub client: ClientView,
    /// Confidential clients only (absent for public ones): 43 characters, ≥ 256 random bits.
    /// Store it: it cannot be shown again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
}

/// A confidential client's new secret.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClientSecretRotated {
    pub client_id: String,
    /// The new secret, shown once; the old one no longer authenticates.
    pub client_secret: String,
    pub position: Option<u64>,
}

/// A server's clients, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClientList {
    pub clients: Vec<ClientView>,
}

/// A public OIDC signing key.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OidcKeyView {
    /// RFC 7638 JWK thumbprint (the JWS `kid`).
    pub kid: String,
    /// SEC1 uncompressed P-256 point, hex.
    pub public_key: String,
    /// Milliseconds since the epoch.
    pub rotated_at: i64,
    /// Whether this key signs new tokens (the newest one).
    pub current: bool,
}

/// A server's OIDC signing keys, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OidcKeyList {
    pub keys: Vec<OidcKeyView>,
}

/// A rotation's answer: the new current key.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OidcKeyRotatedView {
    pub kid: String,
    pub position: Option<u64>,
}

fn view(row: &OidcClientRow, position: Option<u64>) -> ClientView {
    let s = &row.settings;
    ClientView {
        client_id: row.client_id.to_string(),
        name: s.name.clone(),
        client_type: s.kind.into(),
        redirect_uris: s.redirect_uris.clone(),
        post_logout_redirect_uris: s.post_logout_redirect_uris.clone(),
        scopes: s.scopes.clone(),
        backchannel_logout_uri: s.backchannel_logout_uri.clone(),
        ciba: s.ciba.as_ref().map(CibaView::from),
        created_at: row.created_at.as_millis(),
        updated_at: row.updated_at.as_millis(),
        position: position.or(Some(row.last_position)),
    }
}

fn key_view(row: &OidcKeyRow, current: bool) -> OidcKeyView {
    OidcKeyView {
        kid: row.kid.clone(),
        public_key: hex::encode(&row.public_key),
        rotated_at: row.rotated_at.as_millis(),
        current,
    }
}

fn no_client() -> ApiError {
    ApiError::NotFound("no such OIDC client".into())
}

fn parse_client_id(text: &str) -> Result<OidcClientId, ApiError> {
    text.parse().map_err(|_| no_client())
}

async fn client_row(
    state: &AppState,
    tenant: &Tenant,
    client: OidcClientId,
) -> Result<OidcClientRow, ApiError> {
    state
        .reads()
        .oidc_client(tenant.server, client)
        .await?
        .ok_or_else(no_client)
}

/// Registers an OIDC client. A confidential client's secret is in this answer only.
#[utoipa::path(post, path = "/v1/servers/{server_id}/oidc/clients", tag = "oidc",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe: the same key and request answer the same client and secret; another request under the key is 422")),
    request_body = RegisterClientRequest,
    responses(
        (status = 201, description = "Registered", body = ClientRegistered),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not this key's server", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "At most 100 clients, or a conflict (retry)", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The server was deleted", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid settings, or the Idempotency-Key was used for another request (type urn:countersign:problem:idempotency-key-reused)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Not yet visible to reads; retry", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn register_client(
    State(state): State<AppState>,
    tenant: Tenant,
    key: IdempotencyKey,
    body: KeyedJson<RegisterClientRequest>,
) -> Result<Response, ApiError> {
    let request = body.value;
    let key = bind_tenant_key(&state, &tenant, &key, b"", &body.canonical).await?;
    let settings = OidcClientSettings {
        name: request.name,
        kind: request.client_type.into(),
        redirect_uris: request.redirect_uris,
        post_logout_redirect_uris: request.post_logout_redirect_uris,
        scopes: request.scopes,
        backchannel_logout_uri: request.backchannel_logout_uri,
        ciba: request.ciba.map(Into::into),
    };
    let (client_id, secret, done) = state
        .commands()
        .servers
        .register_oidc_client(tenant.server, settings, &tenant_metadata(&tenant), key)
        .await?;
    state.wait_for(done.position).await?;
    // A retry under the same key after the client was removed finds no client any more.
    let row = match client_row(&state, &tenant, client_id).await {
        Err(ApiError::NotFound(_)) => {
            return Err(ApiError::Gone(
                "the client registered under this idempotency key was removed since".into(),
            ));
        }
        other => other?,
    };
    Ok(written(
        StatusCode::CREATED,
        done.position,
        ClientRegistered {
            client: view(&row, done.position),
            client_secret: secret.map(|s| s.expose().to_owned()),
        },
    ))
}

/// Lists the server's OIDC clients (never their secrets).
#[utoipa::path(get, path = "/v1/servers/{server_id}/oidc/clients", tag = "oidc",
    params(("server_id" = String, Path, description = "32 hex digits"), ReadParams),
    responses(
        (status = 200, description = "The clients", body = ClientList),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not this key's server", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid input, or min_position beyond the log", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind min_position", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn list_clients(
    State(state): State<AppState>,
    tenant: Tenant,
    Query(read): Query<ReadParams>,
) -> Result<Json<ClientList>, ApiError> {
    state.wait_for(read.min_position).await?;
    let clients = state
        .reads()
        .oidc_clients(tenant.server)
        .await?
        .iter()
        .map(|row| view(row, None))
        .collect();
    Ok(Json(ClientList { clients }))
}

/// Reads an OIDC client (never its secret).
#[utoipa::path(get, path = "/v1/servers/{server_id}/oidc/clients/{client_id}", tag = "oidc",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("client_id" = String, Path, description = "32 hex digits"), ReadParams),
    responses(
        (status = 200, description = "The client", body = ClientView),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such client at this server", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid input, or min_position beyond the log", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind min_position", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn get_client(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(path): Path<(String, String)>,
    Query(read): Query<ReadParams>,
) -> Result<Json<ClientView>, ApiError> {
    let client = parse_client_id(&path.1)?;
    state.wait_for(read.min_position).await?;
    Ok(Json(view(
        &client_row(&state, &tenant, client).await?,
        None,
    )))
}

/// Changes some of a client's settings; fields not given stay as they are.
#[utoipa::path(patch, path = "/v1/servers/{server_id}/oidc/clients/{client_id}", tag = "oidc",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("client_id" = String, Path, description = "32 hex digits"),
           ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe; another request under the key is 422")),
    request_body = UpdateClientRequest,
    responses(
        (status = 200, description = "The client after the change", body = ClientView),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such client at this server", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A conflict (retry)", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The server was deleted", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid settings, or the Idempotency-Key was used for another request (type urn:countersign:problem:idempotency-key-reused)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Not yet visible to reads; retry", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn update_client(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(path): Path<(String, String)>,
    key: IdempotencyKey,
    body: KeyedJson<UpdateClientRequest>,
) -> Result<Response, ApiError> {
    let client_id = parse_client_id(&path.1)?;
    let request = body.value;
    let key = bind_tenant_key(&state, &tenant, &key, b"", &body.canonical).await?;
    let change = UpdateOidcClient {
        client_id,
        name: request.name,
        redirect_uris: request.redirect_uris,
        post_logout_redirect_uris: request.post_logout_redirect_uris,
        scopes: request.scopes,
        backchannel_logout_uri: request.backchannel_logout_uri,
        ciba: request.ciba.map(|c| c.map(Into::into)),
    };
    let done = state
        .commands()
        .servers
        .update_oidc_client(tenant.server, change, &tenant_metadata(&tenant), key)
        .await?;
    state.wait_for(done.position).await?;
    let row = client_row(&state, &tenant, client_id).await?;
    Ok(written(
        StatusCode::OK,
        done.position,
        view(&row, done.position),
    ))
}

/// Removes a client: it can no longer log anyone in; its id is never given out again.
#[utoipa::path(delete, path = "/v1/servers/{server_id}/oidc/clients/{client_id}", tag = "oidc",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("client_id" = String, Path, description = "32 hex digits")),
    responses(
        (status = 200, description = "Removed", body = Written),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such client at this server", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A conflict (retry)", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The server was deleted", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Not yet visible to reads; retry", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn remove_client(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(path): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let client_id = parse_client_id(&path.1)?;
    let done = state
        .commands()
        .servers
        .remove_oidc_client(tenant.server, client_id, &tenant_metadata(&tenant))
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

/// Gives a confidential client a new secret, shown in this answer only; the old secret stops
/// authenticating at once.
#[utoipa::path(post, path = "/v1/servers/{server_id}/oidc/clients/{client_id}/secret", tag = "oidc",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("client_id" = String, Path, description = "32 hex digits"),
           ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe: the same key answers the same secret; another request under the key is 422")),
    responses(
        (status = 201, description = "Rotated", body = ClientSecretRotated),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such client at this server", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A conflict (retry)", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The server was deleted", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A public client has no secret, or the Idempotency-Key was used for another request", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Not yet visible to reads; retry", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn rotate_client_secret(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(path): Path<(String, String)>,
    key: IdempotencyKey,
) -> Result<Response, ApiError> {
    let client_id = parse_client_id(&path.1)?;
    let key = bind_tenant_key(&state, &tenant, &key, b"", b"").await?;
    let (secret, done) = state
        .commands()
        .servers
        .rotate_oidc_client_secret(tenant.server, client_id, &tenant_metadata(&tenant), key)
        .await?;
    state.wait_for(done.position).await?;
    Ok(written(
        StatusCode::CREATED,
        done.position,
        ClientSecretRotated {
            client_id: client_id.to_string(),
            client_secret: secret.expose().to_owned(),
            position: done.position,
        },
    ))
}

/// Makes a new OIDC signing key current. Tokens signed with the older keys stay verifiable:
/// the JWKS keeps them while such tokens may be in flight.
#[utoipa::path(post, path = "/v1/servers/{server_id}/oidc/keys", tag = "oidc",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe: the same key lands on the same signing key; another request under the key is 422")),
    responses(
        (status = 201, description = "Rotated", body = OidcKeyRotatedView),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not this key's server", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A conflict (retry)", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The server was deleted", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The Idempotency-Key was used for another request", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Not yet visible to reads; retry", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn rotate_key(
    State(state): State<AppState>,
    tenant: Tenant,
    key: IdempotencyKey,
) -> Result<Response, ApiError> {
    let key = bind_tenant_key(&state, &tenant, &key, b"", b"").await?;
    let (kid, done) = state
        .commands()
        .servers
        .rotate_oidc_key(tenant.server, &tenant_metadata(&tenant), key)
        .await?;
    state.wait_for(done.position).await?;
    Ok(written(
        StatusCode::CREATED,
        done.position,
        OidcKeyRotatedView {
            kid,
            position: done.position,
        },
    ))
}

/// Lists the server's OIDC signing keys made by rotation, oldest first; the newest signs.
/// (Before the first rotation the server's own key signs; the JWKS at the issuer lists what
/// verifiers need.)
#[utoipa::path(get, path = "/v1/servers/{server_id}/oidc/keys", tag = "oidc",
    params(("server_id" = String, Path, description = "32 hex digits"), ReadParams),
    responses(
        (status = 200, description = "The keys", body = OidcKeyList),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not this key's server", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid input, or min_position beyond the log", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind min_position", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn list_keys(
    State(state): State<AppState>,
    tenant: Tenant,
    Query(read): Query<ReadParams>,
) -> Result<Json<OidcKeyList>, ApiError> {
    state.wait_for(read.min_position).await?;
    let rows = state.reads().oidc_keys(tenant.server).await?;
    let last = rows.len().checked_sub(1);
    let keys = rows
        .iter()
        .enumerate()
        .map(|(i, row)| key_view(row, Some(i) == last))
        .collect();
    Ok(Json(OidcKeyList { keys }))
}

#[cfg(test)]
mod tests {
    use utoipa::OpenApi as _;

    #[test]
    fn every_route_is_documented_under_the_api_key() {
        let doc = serde_json::to_value(crate::openapi::ApiDoc::openapi()).unwrap();
        for (path, methods) in [
            ("/v1/servers/{server_id}/oidc/clients", &["get", "post"][..]),
            (
                "/v1/servers/{server_id}/oidc/clients/{client_id}",
                &["get", "patch", "delete"][..],
            ),
            (
                "/v1/servers/{server_id}/oidc/clients/{client_id}/secret",
                &["post"][..],
            ),
            ("/v1/servers/{server_id}/oidc/keys", &["get", "post"][..]),
        ] {
            for method in methods {
                let operation = &doc["paths"][path][method];
                assert_eq!(
                    operation["tags"],
                    serde_json::json!(["oidc"]),
                    "{method} {path}"
                );
                assert_eq!(
                    operation["security"],
                    serde_json::json!([{"api_key": []}]),
                    "{method} {path}"
                );
                assert!(operation["responses"]["401"].is_object(), "{method} {path}");
            }
        }
        let schemas = &doc["components"]["schemas"];
        let registered = schemas["ClientRegistered"].to_string();
        assert!(registered.contains("client_secret"), "{registered}");
        assert!(
            !schemas["ClientView"].to_string().contains("client_secret"),
            "reads never carry the secret"
        );
    }
}
