//! Token introspection (RFC 7662), `POST /oidc/{server_id}/introspect`, and token
//! revocation (RFC 7009), `POST /oidc/{server_id}/revoke`. Both take client authentication
//! as the token endpoint does.
//!
//! Rules:
//! - a client learns about its own tokens only: another client's token, like an unknown,
//!   expired, revoked or refreshed-away one, or one whose login session ended, is
//!   `{"active": false}` and nothing more;
//! - an active access token answers `scope`, `client_id`, `token_type`, `exp`, `iat`, `sub`,
//!   `aud`, `iss` and `sid`; an active refresh token the same without `exp`;
//! - revocation revokes the whole grant (the access and the refresh token, RFC 7009 §2.1)
//!   of an access or refresh token of the client; anything else changes nothing, and every
//!   well-formed request answers 200 (RFC 7009 §2.2), so it tells nobody which tokens exist.
//!   Neither endpoint writes anything but the revocation.

use std::collections::HashMap;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use countersign_commands::grant::parse_token;
use countersign_domain::ServerId;
use countersign_domain::grant::{ActiveGrant, Grant, digest_eq};
use countersign_projections::read_models::OidcClientRow;

use crate::error::OAuthError;
use crate::state::IdpState;
use crate::tokens::{client_metadata, param, parse_form, server_of};
use crate::userinfo::session_logged_in;

/// This module's routes.
pub(crate) fn routes() -> Router<IdpState> {
    Router::new()
        .route("/oidc/{server_id}/introspect", post(introspect))
        .route("/oidc/{server_id}/revoke", post(revoke))
}

fn json(body: &serde_json::Value) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response()
}

/// An introspection or revocation request: the server, the client it authenticated as, and
/// the `token` it names.
struct TokenRequest {
    server: ServerId,
    client: OidcClientRow,
    token: String,
    form: HashMap<String, String>,
}

impl TokenRequest {
    async fn read(
        state: &IdpState,
        server_id: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Self, OAuthError> {
        let server = server_of(server_id)?;
        let form = parse_form(headers, body)?;
        let client = crate::client_auth::authenticate(state, server, headers, &form).await?;
        let Some(token) = param(&form, "token") else {
            return Err(OAuthError::invalid_request("token is required"));
        };
        let token = token.to_owned();
        Ok(Self {
            server,
            client,
            token,
            form,
        })
    }
}

async fn introspect(
    State(state): State<IdpState>,
    Path(server_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let answer = async {
        let asked = TokenRequest::read(&state, &server_id, &headers, &body).await?;
        answer(
            &state,
            asked.server,
            &asked.client,
            &asked.token,
            &asked.form,
        )
        .await
    };
    match answer.await {
        Ok(body) => json(&body),
        Err(e) => e.into_response(),
    }
}

fn secs(t: countersign_domain::Timestamp) -> i64 {
    t.as_millis().div_euclid(1000)
}

async fn answer(
    state: &IdpState,
    server: ServerId,
    client: &OidcClientRow,
    token: &str,
    _form: &HashMap<String, String>,
) -> Result<serde_json::Value, OAuthError> {
    let inactive = serde_json::json!({ "active": false });
    let Some(presented) = parse_token(server, token) else {
        return Ok(inactive);
    };
    let api = state.api();
    let loaded = api
        .commands()
        .grants
        .load(presented.grant)
        .await
        .map_err(|e| OAuthError::server_error("grant load", &e))?;
    let Grant::Active(active) = &loaded.state else {
        return Ok(inactive);
    };
    if active.origin.client_id() != client.client_id {
        return Ok(inactive);
    }
    let now = api.clock().now();
    let access = digest_eq(&active.access_hash, &presented.hash) && now < active.access_expires_at;
    let refresh = active
        .refresh_hash
        .is_some_and(|h| digest_eq(&h, &presented.hash));
    if !access && !refresh {
        return Ok(inactive);
    }
    if !session_logged_in(state, active.origin.session(), now).await? {
        return Ok(inactive);
    }
    active_answer(state, server, active, access).await
}

async fn active_answer(
    state: &IdpState,
    server: ServerId,
    active: &ActiveGrant,
    access: bool,
) -> Result<serde_json::Value, OAuthError> {
    let sub = state
        .api()
        .commands()
        .grants
        .subject(server, active.origin.user())
        .await
        .map_err(|e| OAuthError::server_error("subject", &e))?;
    let client = active.origin.client_id().to_string();
    let mut body = serde_json::json!({
        "active": true,
        "scope": active.origin.scope().join(" "),
        "client_id": client,
        "token_type": if access { "Bearer" } else { "refresh_token" },
        "iat": secs(active.issued.issued_at),
        "sub": sub,
        "aud": client,
        "iss": state.issuer(server),
        "sid": crate::tokens::sid(active.origin.session()),
    });
    if access && let Some(map) = body.as_object_mut() {
        map.insert("exp".to_owned(), secs(active.access_expires_at).into());
    }
    Ok(body)
}

async fn revoke(
    State(state): State<IdpState>,
    Path(server_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let answer = async {
        let TokenRequest {
            server,
            client,
            token,
            ..
        } = TokenRequest::read(&state, &server_id, &headers, &body).await?;
        let token = token.as_str();
        let done = state
            .api()
            .commands()
            .grants
            .revoke_token(
                server,
                client.client_id,
                token,
                &client_metadata(client.client_id),
            )
            .await
            .map_err(|e| OAuthError::server_error("revoke", &e))?;
        if done.is_some()
            && let Some(presented) = parse_token(server, token)
        {
            state.userinfo_cache().forget_grant(presented.grant);
        }
        Ok::<(), OAuthError>(())
    };
    match answer.await {
        Ok(()) => (StatusCode::OK, [(header::CACHE_CONTROL, "no-store")]).into_response(),
        Err(e) => e.into_response(),
    }
}
