//! The token endpoint, `POST /oidc/{server_id}/token` (RFC 6749 §3.2, OpenID Connect Core
//! §3.1.3), and the token answer every grant type shares.
//!
//! Grant types: `authorization_code` (with PKCE, RFC 7636), `refresh_token` (RFC 6749 §6,
//! rotating), and `urn:openid:params:grant-type:ciba` (answered by [`crate::ciba`]). The
//! client authenticates first ([`crate::client_auth`]). Rules:
//! - the request is `application/x-www-form-urlencoded`, each parameter at most once;
//! - a code is redeemed by the client it was issued to, with the authorization request's
//!   exact `redirect_uri` and a `code_verifier` whose SHA-256 is the challenge; every mismatch,
//!   an expired or used code, and a code of another server answer the same `invalid_grant`,
//!   and write nothing — except a used code presented again, which revokes its grant;
//! - a refresh is refused (`invalid_grant`, nothing written) once the phone's login session
//!   is no longer logged in; a rotated-away refresh token presented again revokes the grant;
//! - answers carry `Cache-Control: no-store`; tokens are in the body only.
//!
//! The ID token (ES256, [`crate::jwt`]): `iss`, `sub` (per server, [`subject`]), `aud` (the
//! client id), `azp`, `exp` (+600 s), `iat`, `auth_time`, `nonce` (code flow, first issue
//! only: OpenID Connect Core §12.2), `amr` (RFC 8176), `acr`, `sid` (the login session),
//! `at_hash`.

use std::collections::HashMap;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use countersign_commands::CommandError;
use countersign_commands::grant::{GrantRefused, IssuedTokens};
use countersign_domain::grant::{ActiveGrant, Grant, GrantEvent, ID_TOKEN_LIFETIME_SECS};
use countersign_domain::{OidcClientId, ServerId, UserDigest};
use countersign_eventstore::Metadata;
use countersign_projections::read_models::OidcClientRow;
use sha2::{Digest, Sha256};

use crate::error::OAuthError;
use crate::state::IdpState;

/// This module's routes.
pub(crate) fn routes() -> Router<IdpState> {
    Router::new().route("/oidc/{server_id}/token", post(token))
}

/// A form body (`application/x-www-form-urlencoded`), each parameter at most once.
///
/// # Errors
/// `invalid_request` for another content type or a repeated parameter.
pub fn parse_form(headers: &HeaderMap, body: &[u8]) -> Result<HashMap<String, String>, OAuthError> {
    let form_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !form_type {
        return Err(OAuthError::invalid_request(
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    let mut form = HashMap::new();
    for (name, value) in url::form_urlencoded::parse(body) {
        if form.insert(name.into_owned(), value.into_owned()).is_some() {
            return Err(OAuthError::invalid_request(
                "a parameter was given more than once",
            ));
        }
    }
    Ok(form)
}

/// A non-empty form parameter.
pub(crate) fn param<'f>(form: &'f HashMap<String, String>, name: &str) -> Option<&'f str> {
    form.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

/// The server a path names, or 404.
pub(crate) fn server_of(text: &str) -> Result<ServerId, OAuthError> {
    ServerId::parse_hex(text).map_err(|_| OAuthError::no_such_issuer())
}

/// Who writes for a client: its id in the event metadata (never a secret).
pub fn client_metadata(client: OidcClientId) -> Metadata {
    Metadata {
        actor: Some(format!("oidc-client:{client}")),
        ..Metadata::default()
    }
}

/// The OIDC `sub` of a user at a server (see `GrantCommands::subject`).
///
/// # Errors
/// The server's secret cannot be read (a deleted server).
pub async fn subject(
    state: &IdpState,
    server: ServerId,
    user: UserDigest,
) -> Result<String, CommandError> {
    state.api().commands().grants.subject(server, user).await
}

/// `sid`: the login session's hsid, base64url.
pub fn sid(session: countersign_domain::SessionRef) -> String {
    URL_SAFE_NO_PAD.encode(session.hsid.as_bytes())
}

/// `at_hash`: base64url of the left half of SHA-256 of the access token (ES256).
pub fn at_hash(access_token: &str) -> String {
    let digest = Sha256::digest(access_token.as_bytes());
    URL_SAFE_NO_PAD.encode(digest.get(..16).unwrap_or_default())
}

fn secs(t: countersign_domain::Timestamp) -> i64 {
    t.as_millis().div_euclid(1000)
}

/// The ID token claims for an active grant.
async fn id_token(
    state: &IdpState,
    server: ServerId,
    active: &ActiveGrant,
    access_token: &str,
    first_issue: bool,
) -> Result<String, OAuthError> {
    let now = secs(state.api().clock().now());
    let sub = subject(state, server, active.origin.user())
        .await
        .map_err(|e| OAuthError::server_error("subject", &e))?;
    let client = active.origin.client_id().to_string();
    let mut claims = serde_json::json!({
        "iss": state.issuer(server),
        "sub": sub,
        "aud": client,
        "azp": client,
        "exp": now + i64::from(ID_TOKEN_LIFETIME_SECS),
        "iat": now,
        "auth_time": secs(active.issued.auth_time),
        "amr": active.issued.amr,
        "acr": active.issued.acr,
        "sid": sid(active.origin.session()),
        "at_hash": at_hash(access_token),
    });
    if first_issue
        && let Some(nonce) = active.origin.nonce()
        && let Some(map) = claims.as_object_mut()
    {
        map.insert(
            "nonce".to_owned(),
            serde_json::Value::String(nonce.to_owned()),
        );
    }
    let signer = state.keys().signer(server).await.map_err(|e| match e {
        crate::keys::KeyError::NotFound => OAuthError::no_such_issuer(),
        other => OAuthError::server_error("signing key", &other),
    })?;
    crate::jwt::sign(&signer, &claims).map_err(|e| OAuthError::server_error("id token", &e))
}

/// The token answer for tokens just issued (code, CIBA or refresh): access token, ID token,
/// refresh token when there is one, `Cache-Control: no-store`.
///
/// # Errors
/// `server_error` when the ID token cannot be signed; 404 for a deleted server.
pub async fn issue(
    state: &IdpState,
    server: ServerId,
    issued: &IssuedTokens,
    client: &OidcClientRow,
) -> Result<Response, OAuthError> {
    let Grant::Active(active) = &issued.state else {
        // Revoked (or changed) between the append and the reload: the tokens are void.
        return Err(OAuthError::invalid_grant(
            "the grant was revoked while its tokens were issued",
        ));
    };
    if active.origin.client_id() != client.client_id {
        return Err(OAuthError::invalid_grant("not this client's grant"));
    }
    let first_issue = issued
        .executed
        .events
        .iter()
        .any(|e| matches!(e, GrantEvent::TokensIssued(_)));
    let access_token = issued.access_token.expose();
    let now = state.api().clock().now();
    let expires_in = (issued.access_expires_at.as_millis() - now.as_millis())
        .div_euclid(1000)
        .max(0);
    let mut body = serde_json::json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": expires_in,
        "scope": active.origin.scope().join(" "),
    });
    if let Some(map) = body.as_object_mut() {
        if active.origin.scope().iter().any(|s| s == "openid") {
            let id_token = id_token(state, server, active, access_token, first_issue).await?;
            map.insert("id_token".to_owned(), serde_json::Value::String(id_token));
        }
        if let Some(refresh) = &issued.refresh_token {
            map.insert(
                "refresh_token".to_owned(),
                serde_json::Value::String(refresh.expose().to_owned()),
            );
        }
    }
    // The body carries the tokens: it goes to the socket as it is (a zeroizing copy kept
    // here would not clear the one the response owns).
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
            (header::PRAGMA, "no-cache"),
        ],
        body.to_string(),
    )
        .into_response())
}

/// The OAuth error for a refused grant.
pub fn refused(server: ServerId, refused: GrantRefused) -> OAuthError {
    match refused {
        GrantRefused::Invalid(reason) => {
            tracing::info!(server = %server, reason = reason.as_str(), "token request refused");
            OAuthError::invalid_grant(
                "the code or token is invalid, expired, used, or not this client's",
            )
        }
        GrantRefused::Reused { reason, .. } => {
            tracing::warn!(server = %server, reason = reason.as_str(), "grant revoked for reuse");
            OAuthError::invalid_grant(
                "the code or token was used already; every token issued from it is revoked",
            )
        }
        GrantRefused::Expired => OAuthError::new(
            StatusCode::BAD_REQUEST,
            "expired_token",
            "the request has expired",
        ),
        GrantRefused::SessionNotLoggedIn(status) => {
            tracing::info!(server = %server, %status, "token request for a session not logged in");
            OAuthError::invalid_grant("the login session has ended")
        }
        GrantRefused::Command(e) => OAuthError::server_error("grant command", &e),
    }
}

/// A reuse revoked the grant: this process stops answering userinfo for it at once.
fn forget_if_revoked(state: &IdpState, server: ServerId, token: &str, refused: &GrantRefused) {
    if matches!(refused, GrantRefused::Reused { .. })
        && let Some(presented) = countersign_commands::grant::parse_token(server, token)
    {
        state.userinfo_cache().forget_grant(presented.grant);
    }
}

async fn token(
    State(state): State<IdpState>,
    Path(server_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match answer(&state, &server_id, &headers, &body).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn answer(
    state: &IdpState,
    server_id: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, OAuthError> {
    let server = server_of(server_id)?;
    let form = parse_form(headers, body)?;
    let client = crate::client_auth::authenticate(state, server, headers, &form).await?;
    match param(&form, "grant_type") {
        Some("authorization_code") => authorization_code(state, server, &client, &form).await,
        Some("refresh_token") => refresh(state, server, &client, &form).await,
        Some(crate::ciba::CIBA_GRANT_TYPE) => {
            crate::ciba::token_grant(state, server, &client, &form).await
        }
        Some(_) => Err(OAuthError::unsupported_grant_type(
            "grant_type must be authorization_code, refresh_token or urn:openid:params:grant-type:ciba",
        )),
        None => Err(OAuthError::invalid_request("grant_type is required")),
    }
}

async fn authorization_code(
    state: &IdpState,
    server: ServerId,
    client: &OidcClientRow,
    form: &HashMap<String, String>,
) -> Result<Response, OAuthError> {
    let Some(code) = param(form, "code") else {
        return Err(OAuthError::invalid_request("code is required"));
    };
    let Some(redirect_uri) = param(form, "redirect_uri") else {
        return Err(OAuthError::invalid_request("redirect_uri is required"));
    };
    let verifier = param(form, "code_verifier");
    if let Some(v) = verifier
        && !(43..=128).contains(&v.len())
    {
        return Err(OAuthError::invalid_grant(
            "the code or token is invalid, expired, used, or not this client's",
        ));
    }
    let issued = state
        .api()
        .commands()
        .grants
        .redeem_code(
            server,
            client.client_id,
            code,
            redirect_uri,
            verifier,
            &client_metadata(client.client_id),
        )
        .await
        .map_err(|e| {
            forget_if_revoked(state, server, code, &e);
            refused(server, e)
        })?;
    issue(state, server, &issued, client).await
}

async fn refresh(
    state: &IdpState,
    server: ServerId,
    client: &OidcClientRow,
    form: &HashMap<String, String>,
) -> Result<Response, OAuthError> {
    let Some(refresh_token) = param(form, "refresh_token") else {
        return Err(OAuthError::invalid_request("refresh_token is required"));
    };
    if let Some(scope) = param(form, "scope") {
        // A refresh may narrow nothing here: it must ask no scope the grant lacks.
        let grant =
            countersign_commands::grant::parse_token(server, refresh_token).map(|t| t.grant);
        if let Some(grant) = grant {
            let loaded = state
                .api()
                .commands()
                .grants
                .load(grant)
                .await
                .map_err(|e| OAuthError::server_error("grant load", &e))?;
            if let Grant::Active(active) = &loaded.state
                && scope
                    .split(' ')
                    .filter(|s| !s.is_empty())
                    .any(|s| !active.origin.scope().iter().any(|g| g == s))
            {
                return Err(OAuthError::invalid_scope(
                    "a refresh cannot ask a scope the grant does not have",
                ));
            }
        }
    }
    let issued = state
        .api()
        .commands()
        .grants
        .refresh(
            server,
            client.client_id,
            refresh_token,
            &client_metadata(client.client_id),
        )
        .await
        .map_err(|e| {
            forget_if_revoked(state, server, refresh_token, &e);
            refused(server, e)
        })?;
    state.userinfo_cache().forget_grant(issued.grant);
    issue(state, server, &issued, client).await
}
