//! Discovery: OpenID Connect Discovery 1.0 metadata at
//! `/oidc/{server_id}/.well-known/openid-configuration`, the same document as RFC 8414
//! authorization server metadata at `/oidc/{server_id}/.well-known/oauth-authorization-server`
//! (and at RFC 8414 §3's `/.well-known/oauth-authorization-server/oidc/{server_id}`), and the
//! issuer's JWKS at `/oidc/{server_id}/jwks`.
//!
//! Rules: one issuer per virtual server, `{public_url}/oidc/{server_id}`; every endpoint the
//! IdP serves is listed, with exactly the methods and algorithms it implements (ES256 only,
//! PKCE S256 only, `code` only); a server that does not exist or was deleted is a 404 JSON
//! error. The documents are public and may be cached briefly.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use countersign_domain::ServerId;

use crate::error::OAuthError;
use crate::keys::KeyError;
use crate::state::IdpState;
use crate::tokens::server_of;

/// The scopes a client may be allowed.
pub const SCOPES: &[&str] = &[
    "openid",
    "profile",
    "email",
    "phone",
    "groups",
    "offline_access",
];

/// How long a client may cache the metadata and the JWKS, seconds.
const MAX_AGE_SECS: u32 = 60;

/// This module's routes.
pub(crate) fn routes() -> Router<IdpState> {
    Router::new()
        .route(
            "/oidc/{server_id}/.well-known/openid-configuration",
            get(configuration),
        )
        .route(
            "/oidc/{server_id}/.well-known/oauth-authorization-server",
            get(configuration),
        )
        .route(
            "/.well-known/oauth-authorization-server/oidc/{server_id}",
            get(configuration),
        )
        .route(
            "/.well-known/openid-configuration/oidc/{server_id}",
            get(configuration),
        )
        .route("/oidc/{server_id}/jwks", get(jwks))
}

fn cacheable(body: &serde_json::Value) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (
                header::CACHE_CONTROL,
                format!("public, max-age={MAX_AGE_SECS}"),
            ),
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*".to_owned()),
        ],
        body.to_string(),
    )
        .into_response()
}

fn key_error(e: KeyError) -> OAuthError {
    match e {
        KeyError::NotFound => OAuthError::no_such_issuer(),
        other => OAuthError::server_error("signing keys", &other),
    }
}

/// The metadata document of `server`'s issuer.
pub fn metadata(state: &IdpState, server: ServerId) -> serde_json::Value {
    let issuer = state.issuer(server);
    let auth_methods = ["client_secret_basic", "client_secret_post", "none"];
    let mut claims = vec![
        "iss",
        "sub",
        "aud",
        "exp",
        "iat",
        "auth_time",
        "nonce",
        "amr",
        "acr",
        "sid",
        "azp",
        "at_hash",
    ];
    for (_, scope_claims) in crate::userinfo::SCOPE_CLAIMS {
        claims.extend_from_slice(scope_claims);
    }
    serde_json::json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/authorize"),
        "token_endpoint": format!("{issuer}/token"),
        "userinfo_endpoint": format!("{issuer}/userinfo"),
        "jwks_uri": format!("{issuer}/jwks"),
        "revocation_endpoint": format!("{issuer}/revoke"),
        "introspection_endpoint": format!("{issuer}/introspect"),
        "end_session_endpoint": format!("{issuer}/end_session"),
        "backchannel_authentication_endpoint": format!("{issuer}/bc-authorize"),
        "backchannel_token_delivery_modes_supported": ["poll", "ping"],
        "backchannel_user_code_parameter_supported": false,
        "backchannel_logout_supported": true,
        "backchannel_logout_session_supported": true,
        "frontchannel_logout_supported": false,
        "scopes_supported": SCOPES,
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": [
            "authorization_code",
            "refresh_token",
            crate::ciba::CIBA_GRANT_TYPE,
        ],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "token_endpoint_auth_methods_supported": auth_methods,
        "revocation_endpoint_auth_methods_supported": auth_methods,
        "introspection_endpoint_auth_methods_supported": auth_methods,
        "code_challenge_methods_supported": ["S256"],
        "claims_supported": claims,
        "claims_parameter_supported": false,
        "request_parameter_supported": false,
        "request_uri_parameter_supported": false,
        "acr_values_supported": [
            countersign_commands::grant::ACR_DEVICE_ONLY,
            countersign_commands::grant::ACR_SECOND_FACTOR,
        ],
        "prompt_values_supported": ["none", "login"],
        "authorization_response_iss_parameter_supported": true,
    })
}

async fn configuration(State(state): State<IdpState>, Path(server_id): Path<String>) -> Response {
    let answer = async {
        let server = server_of(&server_id)?;
        // A server exists while its key does (deleting it destroys the key).
        state.keys().signer(server).await.map_err(key_error)?;
        Ok::<_, OAuthError>(metadata(&state, server))
    };
    match answer.await {
        Ok(body) => cacheable(&body),
        Err(e) => e.into_response(),
    }
}

/// `?min_position=N`: the JWKS as of at least log position N (the position a key rotation
/// answered), as every read of the API takes one.
#[derive(Debug, serde::Deserialize)]
struct JwksParams {
    min_position: Option<u64>,
}

async fn jwks(
    State(state): State<IdpState>,
    Path(server_id): Path<String>,
    params: Result<axum::extract::Query<JwksParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(axum::extract::Query(JwksParams { min_position: seen })) = params else {
        return OAuthError::invalid_request("min_position must be a log position").into_response();
    };
    let answer = async {
        let server = server_of(&server_id)?;
        if seen.is_some() {
            state.api().wait_for(seen).await.map_err(|e| match e {
                countersign_api::error::ApiError::Invalid(why) => OAuthError::invalid_request(why),
                other => OAuthError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "temporarily_unavailable",
                    other.to_string(),
                ),
            })?;
        }
        state
            .keys()
            .jwks_after(server, seen)
            .await
            .map_err(key_error)
    };
    match answer.await {
        Ok(body) => cacheable(&body),
        Err(e) => e.into_response(),
    }
}
