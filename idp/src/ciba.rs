//! CIBA (OpenID Connect Client-Initiated Backchannel Authentication Flow – Core 1.0), poll
//! and ping modes: a confidential client registered for CIBA names a user by `login_hint`
//! (the userid), the IdP pushes a login to that user's phones, and the client fetches the
//! tokens at the token endpoint with `grant_type=urn:openid:params:grant-type:ciba`.
//!
//! `POST /oidc/{server_id}/bc-authorize` (client authentication as at the token endpoint):
//! - `scope` (must hold `openid`; granted = asked ∩ the client's allowed), exactly one hint,
//!   which must be `login_hint` (`login_hint_token` and `id_token_hint` are not supported:
//!   `invalid_request`), `binding_message` (≤ [`BINDING_MESSAGE_MAX_CHARS`] characters, no
//!   control characters, shown on the phone: else `invalid_binding_message`),
//!   `client_notification_token` (ping mode: required, RFC 6750 token syntax, ≤ 1024
//!   characters), `requested_expiry` (positive seconds; shortens the request, never lengthens
//!   it past the server's session timeout). `user_code` is not supported and ignored.
//! - A client that is public or not registered for CIBA: `unauthorized_client`.
//! - The per-user push limiter of the business API's provokes applies (a phone is not
//!   prompted more often, whoever asks): over it, `403 access_denied`, nothing written. It is
//!   counted for every well-formed userid, known or not, so it tells nobody whether a userid
//!   exists.
//! - A userid that is malformed, unknown, or whose user has no account that can receive push
//!   gets one answer, byte for byte ([`UNKNOWN_USER_DESCRIPTION`]), and nothing is written.
//! - Else: a push login (a session with a nonce nobody keeps, announced with the binding
//!   message) to each of the user's push-capable accounts, a grant `grant.ciba_requested`,
//!   and `{auth_req_id, expires_in, interval}` (`interval` = [`POLL_INTERVAL_SECS`]).
//!
//! The token endpoint's CIBA grant ([`token_grant`]): a wrong, unknown or another client's
//! `auth_req_id` is `invalid_grant`; past the request's expiry (or a session that expired)
//! `expired_token`; a declined, failed or ended login `access_denied`; a login still
//! pending `authorization_pending`, or `slow_down` when polled sooner than the interval (which
//! then grows by 5 s for this client's later polls; remembered in this process only); a
//! login that completed issues the tokens once (again: `invalid_grant`). Ping-mode clients
//! may poll too. The ping notification itself is sent by [`crate::backchannel`].

use std::collections::HashMap;
use std::sync::Mutex;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use countersign_api::error::ApiError;
use countersign_commands::CommandError;
use countersign_commands::grant::{CibaRequest, GrantRefused};
use countersign_commands::session::SessionOptions;
use countersign_domain::grant::{BINDING_MESSAGE_MAX_CHARS, Grant};
use countersign_domain::session::{MAX_PUSH_ACCOUNTS, SessionEvent, SessionStatus};
use countersign_domain::{AccountRef, ErrorKind, GrantId, ServerId};
use countersign_projections::OidcClientRow;
use zeroize::Zeroizing;

use crate::error::OAuthError;
use crate::state::IdpState;
use crate::tokens::param;

/// The least number of seconds between two polls, as first answered.
pub const POLL_INTERVAL_SECS: u32 = 5;
/// What a `slow_down` adds to the interval.
pub const SLOW_DOWN_STEP_SECS: u32 = 5;
/// Longest `client_notification_token`, in characters (CIBA Core §7.1).
pub const MAX_NOTIFICATION_TOKEN_CHARS: usize = 1024;
/// The `error_description` of `unknown_user_id`: the same for every userid that cannot be
/// asked, so the answer tells nothing about which userids exist.
pub const UNKNOWN_USER_DESCRIPTION: &str =
    "no user that can be asked by push is known by this login_hint";
/// The CIBA grant type at the token endpoint.
pub const CIBA_GRANT_TYPE: &str = "urn:openid:params:grant-type:ciba";

/// This module's routes.
pub(crate) fn routes() -> Router<IdpState> {
    Router::new().route("/oidc/{server_id}/bc-authorize", post(bc_authorize))
}

/// When each pending CIBA request was last polled, and its interval now (this process).
#[derive(Debug, Default)]
pub struct PollTimes {
    polls: Mutex<HashMap<GrantId, Poll>>,
}

#[derive(Debug, Clone, Copy)]
struct Poll {
    last_ms: i64,
    interval_secs: u32,
}

/// How many pending requests are remembered before the stale ones are dropped.
const REMEMBERED_POLLS: usize = 100_000;

impl PollTimes {
    /// Records a poll of a pending request at `now_ms`; answers whether it came too soon (the
    /// interval then grows by [`SLOW_DOWN_STEP_SECS`]).
    fn too_soon(&self, grant: GrantId, interval_secs: u32, now_ms: i64) -> bool {
        let Ok(mut polls) = self.polls.lock() else {
            return false;
        };
        if polls.len() >= REMEMBERED_POLLS {
            // Requests live at most a session timeout; an hour-old poll is of none alive.
            polls.retain(|_, p| now_ms - p.last_ms < 3_600_000);
        }
        match polls.get_mut(&grant) {
            None => {
                polls.insert(
                    grant,
                    Poll {
                        last_ms: now_ms,
                        interval_secs,
                    },
                );
                false
            }
            Some(poll) => {
                let soon = now_ms - poll.last_ms < i64::from(poll.interval_secs) * 1000;
                if soon {
                    poll.interval_secs = poll.interval_secs.saturating_add(SLOW_DOWN_STEP_SECS);
                }
                poll.last_ms = now_ms;
                soon
            }
        }
    }

    /// Forgets a request that was answered for good.
    fn forget(&self, grant: GrantId) {
        if let Ok(mut polls) = self.polls.lock() {
            polls.remove(&grant);
        }
    }
}

fn error(status: StatusCode, code: &'static str, description: &str) -> OAuthError {
    OAuthError::new(status, code, description)
}

fn invalid_request(description: &str) -> OAuthError {
    error(StatusCode::BAD_REQUEST, "invalid_request", description)
}

fn unknown_user() -> OAuthError {
    error(
        StatusCode::BAD_REQUEST,
        "unknown_user_id",
        UNKNOWN_USER_DESCRIPTION,
    )
}

fn internal(what: &str, cause: &dyn std::fmt::Display) -> OAuthError {
    OAuthError::server_error(what, cause)
}

/// RFC 6750 §2.1 `b64token`: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn is_b64token(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
}

/// `POST /oidc/{server_id}/bc-authorize`.
async fn bc_authorize(
    State(state): State<IdpState>,
    Path(server_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match authorize(&state, &server_id, &headers, &body).await {
        Ok(answer) => answer,
        Err(error) => error.into_response(),
    }
}

async fn authorize(
    state: &IdpState,
    server_id: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, OAuthError> {
    let server = crate::tokens::server_of(server_id)?;
    let form = crate::tokens::parse_form(headers, body)?;
    let client = crate::client_auth::authenticate(state, server, headers, &form).await?;
    let confidential = matches!(
        client.settings.kind,
        countersign_domain::server::OidcClientKind::Confidential
    );
    let Some(ciba) = client.settings.ciba.clone().filter(|_| confidential) else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            "this client is not registered for CIBA",
        ));
    };
    let ping = matches!(ciba.mode, countersign_domain::server::CibaMode::Ping);
    // The request's parameters, each checked before anything is looked up.
    let Some(scope) = param(&form, "scope") else {
        return Err(invalid_request("scope is required"));
    };
    let asked: Vec<&str> = scope.split(' ').filter(|s| !s.is_empty()).collect();
    if !asked.contains(&"openid") {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "scope must include openid",
        ));
    }
    let mut granted: Vec<String> = Vec::new();
    for scope in asked {
        if client.settings.scopes.iter().any(|s| s == scope) && !granted.iter().any(|g| g == scope)
        {
            granted.push(scope.to_owned());
        }
    }
    let hints = ["login_hint", "login_hint_token", "id_token_hint"]
        .iter()
        .filter(|h| form.contains_key(**h))
        .count();
    if hints != 1 {
        return Err(invalid_request(
            "exactly one of login_hint, login_hint_token and id_token_hint is required",
        ));
    }
    let Some(login_hint) = param(&form, "login_hint") else {
        return Err(invalid_request(
            "only login_hint (the userid) is supported as the hint",
        ));
    };
    let binding_message = param(&form, "binding_message").map(str::to_owned);
    if let Some(message) = &binding_message
        && (message.chars().count() > BINDING_MESSAGE_MAX_CHARS
            || message.chars().any(char::is_control))
    {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_binding_message",
            "binding_message must be at most 100 characters, without control characters",
        ));
    }
    let notification_token = if ping {
        let Some(token) = param(&form, "client_notification_token") else {
            return Err(invalid_request(
                "client_notification_token is required in ping mode",
            ));
        };
        if token.len() > MAX_NOTIFICATION_TOKEN_CHARS || !is_b64token(token) {
            return Err(invalid_request(
                "client_notification_token must be an RFC 6750 bearer token of at most 1024 characters",
            ));
        }
        Some(Zeroizing::new(token.to_owned()))
    } else {
        None
    };
    let requested_expiry = match param(&form, "requested_expiry") {
        None => None,
        Some(text) => match text.parse::<u32>() {
            Ok(secs) if secs > 0 => Some(secs),
            _ => {
                return Err(invalid_request(
                    "requested_expiry must be a positive integer",
                ));
            }
        },
    };
    // Whom to ask. From here on, every userid that cannot be asked gets the same answer.
    let api = state.api();
    let user = match api.commands().users.user_ref(server, login_hint).await {
        Ok(user) => user,
        // A userid that is not one (too long, refused characters) is unknown like any other.
        Err(countersign_commands::CommandError::Rejected { .. }) => return Err(unknown_user()),
        Err(other) => return Err(internal("user lookup", &other)),
    };
    match api.provokes().take(server, user.digest) {
        Ok(()) => {}
        Err(ApiError::ProvokeLimited(_)) => {
            return Err(error(
                StatusCode::FORBIDDEN,
                "access_denied",
                "too many push logins were sent to this user lately; try again later",
            ));
        }
        Err(other) => return Err(internal("provoke limiter", &other)),
    }
    if api
        .reads()
        .user(server, user.digest)
        .await
        .map_err(|e| internal("user read", &e))?
        .is_none()
    {
        return Err(unknown_user());
    }
    let accounts = api
        .reads()
        .accounts(server, user.digest)
        .await
        .map_err(|e| internal("accounts read", &e))?;
    let mut push_to = Vec::new();
    for account in &accounts {
        let reachable = countersign_api::provoke::can_receive_push(
            api,
            AccountRef::new(server, account.account_id),
        )
        .await
        .map_err(|e| internal("account load", &e))?;
        if reachable {
            push_to.push(account.account_id);
        }
    }
    if push_to.is_empty() {
        return Err(unknown_user());
    }
    push_to.truncate(MAX_PUSH_ACCOUNTS);
    // The push login: a session under a nonce nobody keeps (the grant names the session).
    let mut nonce = Zeroizing::new([0u8; 32]);
    countersign_commands::random_bytes(nonce.as_mut_slice())
        .map_err(|e| internal("randomness", &e))?;
    let nonce = Zeroizing::new(URL_SAFE_NO_PAD.encode(nonce.as_slice()));
    let session = api
        .commands()
        .sessions
        .session_ref(server, &nonce)
        .await
        .map_err(|e| internal("session id", &e))?;
    let metadata = crate::tokens::client_metadata(client.client_id);
    let opened = api
        .commands()
        .sessions
        .open_push(
            session,
            SessionOptions {
                ping_time_secs: None,
                announce_info: binding_message.clone(),
                session_info: None,
                user: Some(user.digest),
            },
            push_to,
            &metadata,
            None,
        )
        .await
        .map_err(|e| internal("push login", &e))?;
    let now = api.clock().now();
    let session_expires = opened
        .events
        .iter()
        .find_map(|e| match e {
            SessionEvent::Opened(o) => Some(o.expires_at),
            _ => None,
        })
        .unwrap_or(now);
    let until_session_expires =
        u32::try_from((session_expires.as_millis() - now.as_millis()).div_euclid(1000))
            .unwrap_or(0)
            .max(1);
    let expires_in = requested_expiry.map_or(until_session_expires, |asked| {
        asked.min(until_session_expires)
    });
    let (auth_req_id, grant, _done) = api
        .commands()
        .grants
        .request_ciba(
            CibaRequest {
                client_id: client.client_id,
                session,
                user: user.digest,
                scope: granted,
                binding_message,
                expires_at: now.plus_secs(expires_in),
                interval_secs: POLL_INTERVAL_SECS,
                ping,
                notification_token,
            },
            &metadata,
        )
        .await
        .map_err(|e| internal("grant", &e))?;
    tracing::info!(
        server = %server,
        client = %client.client_id,
        grant = %grant.grant_id,
        ping,
        "CIBA request: push login sent"
    );
    let body = serde_json::json!({
        "auth_req_id": auth_req_id.expose(),
        "expires_in": expires_in,
        "interval": POLL_INTERVAL_SECS,
    })
    .to_string();
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response())
}

/// `grant_type=urn:openid:params:grant-type:ciba` at the token endpoint, for the
/// authenticated `client`.
///
/// # Errors
/// The OAuth error to answer: `invalid_request`, `invalid_grant`, `expired_token`,
/// `access_denied`, `authorization_pending`, `slow_down` (all 400), `server_error` (500).
pub async fn token_grant(
    state: &IdpState,
    server: ServerId,
    client: &OidcClientRow,
    form: &HashMap<String, String>,
) -> Result<Response, OAuthError> {
    let Some(text) = param(form, "auth_req_id") else {
        return Err(invalid_request("auth_req_id is required"));
    };
    let api = state.api();
    let grants = &api.commands().grants;
    let grant = match grants.check_ciba_auth_req_id(server, text).await {
        Ok(Some(grant)) => grant,
        Ok(None) => return Err(invalid_grant()),
        Err(CommandError::Rejected {
            kind: ErrorKind::NotFound,
            ..
        }) => return Err(invalid_grant()),
        Err(other) => return Err(internal("auth_req_id check", &other)),
    };
    let loaded = grants
        .load(grant)
        .await
        .map_err(|e| internal("grant load", &e))?;
    let Grant::CibaPending(request) = loaded.state else {
        // Not a CIBA grant, or its tokens were issued (or it was revoked) already.
        return Err(invalid_grant());
    };
    if request.client_id != client.client_id {
        return Err(invalid_grant());
    }
    let now = api.clock().now();
    let forget = || state.ciba_polls().forget(grant.grant_id);
    if now >= request.expires_at {
        forget();
        return Err(expired());
    }
    let session = api
        .commands()
        .sessions
        .load(request.session)
        .await
        .map_err(|e| internal("session load", &e))?;
    let status = session.state.status_at(now);
    match status {
        SessionStatus::LoggedIn => {}
        SessionStatus::NotOpened => return Err(invalid_grant()),
        SessionStatus::Pending | SessionStatus::Scanned => {
            return Err(
                if state.ciba_polls().too_soon(
                    grant.grant_id,
                    request.interval_secs,
                    now.as_millis(),
                ) {
                    error(
                        StatusCode::BAD_REQUEST,
                        "slow_down",
                        "polled sooner than the interval; wait 5 seconds longer between polls from now on",
                    )
                } else {
                    error(
                        StatusCode::BAD_REQUEST,
                        "authorization_pending",
                        "the user has not answered on the phone yet",
                    )
                },
            );
        }
        ended => {
            forget();
            return Err(refusal_of(ended));
        }
    }
    forget();
    let issued = grants
        .complete_ciba(
            grant,
            client.client_id,
            &crate::tokens::client_metadata(client.client_id),
        )
        .await
        .map_err(|refused| match refused {
            GrantRefused::Invalid(_) | GrantRefused::Reused { .. } => invalid_grant(),
            GrantRefused::Expired => expired(),
            GrantRefused::SessionNotLoggedIn(status) => refusal_of(status),
            GrantRefused::Command(e) => internal("completion", &e),
        })?;
    crate::tokens::issue(state, server, &issued, client).await
}

fn invalid_grant() -> OAuthError {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_grant",
        "the auth_req_id is invalid, was used already, or is not this client's",
    )
}

fn expired() -> OAuthError {
    error(
        StatusCode::BAD_REQUEST,
        "expired_token",
        "the auth_req_id has expired; make a new authentication request",
    )
}

/// The CIBA error for a push login that will not log in (any more).
fn refusal_of(status: SessionStatus) -> OAuthError {
    match status {
        SessionStatus::Expired => expired(),
        SessionStatus::NotOpened => invalid_grant(),
        _ => error(
            StatusCode::BAD_REQUEST,
            "access_denied",
            "the user declined, or the login failed or ended",
        ),
    }
}

#[cfg(test)]
mod tests {
    use countersign_domain::GrantId;

    use super::{PollTimes, is_b64token};

    #[test]
    fn polls_sooner_than_the_interval_slow_down_and_widen_it() {
        let polls = PollTimes::default();
        let grant = GrantId::from_bytes([1; 16]);
        assert!(
            !polls.too_soon(grant, 5, 0),
            "the first poll is never too soon"
        );
        assert!(polls.too_soon(grant, 5, 4_999), "4.999 s after: too soon");
        // The interval is now 10 s.
        assert!(polls.too_soon(grant, 5, 4_999 + 9_999));
        // Now 15 s.
        assert!(!polls.too_soon(grant, 5, 4_999 + 9_999 + 15_000));
        polls.forget(grant);
        assert!(!polls.too_soon(grant, 5, 4_999 + 9_999 + 15_001));
    }

    #[test]
    fn notification_tokens_follow_rfc_6750() {
        assert!(is_b64token("abc-._~+/=="));
        assert!(!is_b64token("=="));
        assert!(!is_b64token("a b"));
        assert!(!is_b64token(""));
    }
}
