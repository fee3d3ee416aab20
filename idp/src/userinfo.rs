//! The UserInfo endpoint (OpenID Connect Core §5.3), `GET|POST /oidc/{server_id}/userinfo`
//! with an access token (`Authorization: Bearer`, or `access_token` in a POST form, RFC 6750
//! §2.2), and the access token check introspection shares.
//!
//! Rules:
//! - an access token is valid while its grant is active, the token is the grant's current
//!   one (a refresh replaces it), it has not expired, and the phone's login session is still
//!   logged in (its ping deadline not passed); anything else, including a token of another
//!   server, is 401 with `WWW-Authenticate: Bearer error="invalid_token"`;
//! - claims by scope, from the user's attributes (attribute names are the standard claim
//!   names): always `sub`; `profile` → `name`, `given_name`, `family_name`, `middle_name`,
//!   `nickname`, `preferred_username` (the userid unless an attribute says otherwise),
//!   `profile`, `picture`, `website`, `gender`, `birthdate`, `zoneinfo`, `locale`; `email` →
//!   `email`, `email_verified`; `phone` → `phone_number`, `phone_number_verified`; `groups` →
//!   `groups` (the attribute split at commas);
//! - answers are cached in this process for [`USERINFO_TTL`] by SHA-256 of the token, so a
//!   client polling userinfo costs no database read per call; a revocation or refresh through
//!   this process drops the grant's entries at once, one elsewhere is seen within the TTL.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use countersign_commands::grant::parse_token;
use countersign_domain::grant::{ActiveGrant, Grant, digest_eq};
use countersign_domain::session::SessionStatus;
use countersign_domain::{GrantRef, ServerId, SessionRef, Timestamp};
use sha2::{Digest, Sha256};

use crate::error::OAuthError;
use crate::state::IdpState;
use crate::tokens::{param, parse_form, server_of};

/// How long a userinfo answer is reused.
pub const USERINFO_TTL: Duration = Duration::from_secs(1);
/// Most answers kept before the stale ones are dropped.
const MAX_CACHED: usize = 100_000;

/// The claims each scope releases (besides `sub`).
pub const SCOPE_CLAIMS: &[(&str, &[&str])] = &[
    (
        "profile",
        &[
            "name",
            "given_name",
            "family_name",
            "middle_name",
            "nickname",
            "preferred_username",
            "profile",
            "picture",
            "website",
            "gender",
            "birthdate",
            "zoneinfo",
            "locale",
        ],
    ),
    ("email", &["email", "email_verified"]),
    ("phone", &["phone_number", "phone_number_verified"]),
    ("groups", &["groups"]),
];

/// This module's routes.
pub(crate) fn routes() -> Router<IdpState> {
    Router::new().route(
        "/oidc/{server_id}/userinfo",
        get(userinfo_get).post(userinfo_post),
    )
}

struct Cached {
    at: Instant,
    grant: GrantRef,
    body: Arc<String>,
}

/// Userinfo answers by SHA-256 of the access token.
#[derive(Default)]
pub struct UserinfoCache {
    answers: RwLock<HashMap<[u8; 32], Cached>>,
}

impl std::fmt::Debug for UserinfoCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserinfoCache").finish_non_exhaustive()
    }
}

impl UserinfoCache {
    fn get(&self, key: &[u8; 32], server: ServerId) -> Option<Arc<String>> {
        let answers = self.answers.read().ok()?;
        let cached = answers.get(key)?;
        (cached.at.elapsed() < USERINFO_TTL && cached.grant.server_id == server)
            .then(|| Arc::clone(&cached.body))
    }

    fn put(&self, key: [u8; 32], grant: GrantRef, body: Arc<String>) {
        if let Ok(mut answers) = self.answers.write() {
            if answers.len() >= MAX_CACHED {
                answers.retain(|_, c| c.at.elapsed() < USERINFO_TTL);
                if answers.len() >= MAX_CACHED {
                    answers.clear();
                }
            }
            answers.insert(
                key,
                Cached {
                    at: Instant::now(),
                    grant,
                    body,
                },
            );
        }
    }

    /// Drops every answer given for the grant's tokens (revoked, refreshed).
    pub fn forget_grant(&self, grant: GrantRef) {
        if let Ok(mut answers) = self.answers.write() {
            answers.retain(|_, c| c.grant != grant);
        }
    }
}

/// An access token that checked out.
#[derive(Debug, Clone)]
pub struct ValidAccess {
    /// Its grant.
    pub grant: GrantRef,
    /// The grant's state.
    pub active: Box<ActiveGrant>,
}

/// Checks an access token presented at `server` (see the module rules).
///
/// # Errors
/// 401 `invalid_token`, or `server_error`.
pub async fn check_access(
    state: &IdpState,
    server: ServerId,
    token: &str,
) -> Result<ValidAccess, OAuthError> {
    let invalid = || OAuthError::invalid_token("the access token is invalid or has expired");
    let presented = parse_token(server, token).ok_or_else(invalid)?;
    let api = state.api();
    let loaded = api
        .commands()
        .grants
        .load(presented.grant)
        .await
        .map_err(|e| OAuthError::server_error("grant load", &e))?;
    let Grant::Active(active) = loaded.state else {
        return Err(invalid());
    };
    let now = api.clock().now();
    if !digest_eq(&active.access_hash, &presented.hash) || now >= active.access_expires_at {
        return Err(invalid());
    }
    if !session_logged_in(state, active.origin.session(), now).await? {
        return Err(invalid());
    }
    Ok(ValidAccess {
        grant: presented.grant,
        active,
    })
}

/// Whether the login session `session` is still logged in at `now` (its ping deadline not
/// passed): what keeps a grant's tokens good.
///
/// # Errors
/// `server_error` when the session cannot be loaded.
pub(crate) async fn session_logged_in(
    state: &IdpState,
    session: SessionRef,
    now: Timestamp,
) -> Result<bool, OAuthError> {
    let session = state
        .api()
        .commands()
        .sessions
        .load(session)
        .await
        .map_err(|e| OAuthError::server_error("session load", &e))?;
    Ok(session.state.status_at(now) == SessionStatus::LoggedIn)
}

/// The bearer token of a request: the `Authorization` header, else (POST) the form's
/// `access_token`; both at once is `invalid_request` (RFC 6750 §2).
fn bearer<'a>(
    headers: &'a HeaderMap,
    form: Option<&'a HashMap<String, String>>,
) -> Result<&'a str, OAuthError> {
    let header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let in_form = form.and_then(|f| param(f, "access_token"));
    match (header, in_form) {
        (Some(_), Some(_)) => Err(OAuthError::invalid_request(
            "send the access token once, not in both the header and the body",
        )),
        (Some(token), None) | (None, Some(token)) => Ok(token),
        (None, None) => {
            // RFC 6750 §3.1: no credentials, no error code in the challenge.
            Err(OAuthError::invalid_token("an access token is required"))
        }
    }
}

async fn userinfo_get(
    State(state): State<IdpState>,
    Path(server_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    respond(userinfo(&state, &server_id, &headers, None).await)
}

async fn userinfo_post(
    State(state): State<IdpState>,
    Path(server_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = if body.is_empty() {
        Ok(None)
    } else {
        parse_form(&headers, &body).map(Some)
    };
    let answer = match form {
        Ok(form) => userinfo(&state, &server_id, &headers, form.as_ref()).await,
        Err(e) => Err(e),
    };
    respond(answer)
}

fn respond(answer: Result<Arc<String>, OAuthError>) -> Response {
    match answer {
        Ok(body) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            body.as_str().to_owned(),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn userinfo(
    state: &IdpState,
    server_id: &str,
    headers: &HeaderMap,
    form: Option<&HashMap<String, String>>,
) -> Result<Arc<String>, OAuthError> {
    let server = server_of(server_id)?;
    let token = bearer(headers, form)?;
    let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    if let Some(body) = state.userinfo_cache().get(&key, server) {
        return Ok(body);
    }
    let access = check_access(state, server, token).await?;
    let body = Arc::new(claims(state, server, &access.active).await?.to_string());
    state
        .userinfo_cache()
        .put(key, access.grant, Arc::clone(&body));
    Ok(body)
}

/// The userinfo claims of an active grant: `sub` and the claims its scopes release.
///
/// # Errors
/// `server_error` when the user's data cannot be read.
pub async fn claims(
    state: &IdpState,
    server: ServerId,
    active: &ActiveGrant,
) -> Result<serde_json::Value, OAuthError> {
    let api = state.api();
    let user = active.origin.user();
    let sub = api
        .commands()
        .grants
        .subject(server, user)
        .await
        .map_err(|e| OAuthError::server_error("subject", &e))?;
    let mut out = serde_json::Map::new();
    out.insert("sub".to_owned(), serde_json::Value::String(sub));
    let scope = active.origin.scope();
    let wanted: Vec<&str> = SCOPE_CLAIMS
        .iter()
        .filter(|(s, _)| scope.iter().any(|g| g == s))
        .flat_map(|(_, claims)| claims.iter().copied())
        .collect();
    if wanted.is_empty() {
        return Ok(serde_json::Value::Object(out));
    }
    let row = api
        .reads()
        .user(server, user)
        .await
        .map_err(|e| OAuthError::server_error("user read", &e))?;
    let Some(row) = row else {
        // Deleted since: only `sub` is left to say.
        return Ok(serde_json::Value::Object(out));
    };
    let view = match countersign_api::users::open_user(api, &row).await {
        Ok(view) => view,
        Err(countersign_api::error::ApiError::NotFound(_)) => {
            return Ok(serde_json::Value::Object(out));
        }
        Err(e) => return Err(OAuthError::server_error("user open", &e)),
    };
    for claim in wanted {
        let value = view.attributes.get(claim).cloned();
        let value = match (claim, value) {
            ("preferred_username", None) => Some(serde_json::Value::String(view.userid.clone())),
            ("email_verified" | "phone_number_verified", Some(v)) => {
                Some(serde_json::Value::Bool(v.eq_ignore_ascii_case("true")))
            }
            ("email_verified", None) if view.attributes.contains_key("email") => {
                Some(serde_json::Value::Bool(false))
            }
            ("phone_number_verified", None) if view.attributes.contains_key("phone_number") => {
                Some(serde_json::Value::Bool(false))
            }
            ("groups", Some(v)) => Some(serde_json::Value::Array(
                v.split(',')
                    .map(str::trim)
                    .filter(|g| !g.is_empty())
                    .map(|g| serde_json::Value::String(g.to_owned()))
                    .collect(),
            )),
            (_, Some(v)) => Some(serde_json::Value::String(v)),
            (_, None) => None,
        };
        if let Some(value) = value {
            out.insert(claim.to_owned(), value);
        }
    }
    Ok(serde_json::Value::Object(out))
}
