//! Push logins (the product's provokeLogin, provokeLoginOnUser, provokeLoginOnAccount): the
//! business system asks a user's phone to log in to a session without a QR code; the NS
//! pushes an encrypted message to the app through its Message Center
//! (docs/message-center.md), and the phone then logs in as after a scan.
//!
//! - `POST …/session/provoke` (nonce in `X-Nonce`): the account that last logged in on the
//!   session is asked again; the session waits for a login again. Only after a login that is
//!   over or was one-shot (`can_provoke` in the session read).
//! - `POST …/users/{userid}/provoke`: every account of the user that can receive push; the
//!   first to log in takes the session, the others are told it was withdrawn.
//! - `POST …/users/{userid}/accounts/{account_id}/provoke`: that account only.
//!
//! Every provoke takes `min_position`, like a read: it decides on the read models (the
//! session's last login, the user's accounts), so a caller that just enrolled an account
//! passes the position that answer carried.
//!
//! The last two open the session named by the body's nonce. Retrying with the same nonce and
//! options changes nothing (200). Refusals write nothing: no login to ask again or no account
//! that can receive push (409 `not-provokable`), an unknown user or another tenant's
//! user/account/session (404), too many push logins for the user within the window (429
//! `provoke-limited`). Whom to ask must come from the business system's own authenticated
//! state (its session), never from what an anonymous visitor typed: a provoke is a prompt on
//! a real person's phone.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use countersign_commands::session::SessionOptions;
use countersign_domain::account::Account;
use countersign_domain::session::SessionEvent;
use countersign_domain::{AccountId, AccountRef, ServerId, UserDigest};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Tenant;
use crate::error::{ApiError, Path, Problem, Query};
use crate::idempotency::IdempotencyKey;
use crate::servers::written;
use crate::sessions::{NonceHeader, bind_session_key, opened_until, optional_json, session_ref};
use crate::state::AppState;
use crate::users::{tenant_metadata, user_ref};
use crate::views::ReadParams;

/// How many push logins one user may be sent within a window.
#[derive(Debug, Clone, Copy)]
pub struct ProvokeLimits {
    /// Push logins per user per window.
    pub per_user: u32,
    /// The window.
    pub window: Duration,
}

impl Default for ProvokeLimits {
    fn default() -> Self {
        Self {
            per_user: 3,
            window: Duration::from_secs(60),
        }
    }
}

/// Counts push logins per user in this process (a phone is not prompted more often than the
/// limit, whichever endpoint asks). Scaled out, each instance counts its own.
#[derive(Debug, Default)]
pub struct Limiter {
    limits: ProvokeLimits,
    sent: Mutex<HashMap<(ServerId, UserDigest), Vec<Instant>>>,
}

impl Limiter {
    pub fn new(limits: ProvokeLimits) -> Self {
        Self {
            limits,
            sent: Mutex::default(),
        }
    }

    /// Takes one push login for the user, or refuses when the window is full
    /// ([`ApiError::ProvokeLimited`]). Also taken by the IdP's CIBA requests.
    pub fn take(&self, server: ServerId, user: UserDigest) -> Result<(), ApiError> {
        let now = Instant::now();
        let window = self.limits.window;
        let Ok(mut sent) = self.sent.lock() else {
            return Err(ApiError::internal("the provoke limiter is poisoned"));
        };
        if sent.len() > 100_000 {
            sent.retain(|_, times| times.iter().any(|t| now.duration_since(*t) < window));
        }
        let times = sent.entry((server, user)).or_default();
        times.retain(|t| now.duration_since(*t) < window);
        if times.len() >= self.limits.per_user as usize {
            return Err(ApiError::ProvokeLimited(format!(
                "this user was sent {} push logins within {} s; wait before asking again",
                times.len(),
                window.as_secs()
            )));
        }
        times.push(now);
        Ok(())
    }
}

/// The body of a provoke on a session: what to show, as at opening.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProvokeSessionRequest {
    /// Shown to the user while confirming (≤ 1000 characters).
    pub announce_info: Option<String>,
    /// Shown to the user once logged in (≤ 1000 characters).
    pub session_info: Option<String>,
}

/// The body of a provoke on a user or an account: the new session's nonce and options.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProvokeUserRequest {
    /// The caller's secret nonce for the new session (hex or base64, ≥ 128 bits), as for
    /// `PUT …/session`. Read the session with it afterwards.
    pub nonce: String,
    /// Ping interval; the server's default when absent.
    pub ping_time_secs: Option<u32>,
    /// Shown to the user while confirming (≤ 1000 characters).
    pub announce_info: Option<String>,
    /// Shown to the user once logged in (≤ 1000 characters).
    pub session_info: Option<String>,
}

impl std::fmt::Debug for ProvokeUserRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProvokeUserRequest")
            .field("ping_time_secs", &self.ping_time_secs)
            .finish_non_exhaustive()
    }
}

/// The answer of a provoke: where the session is, like a `PUT …/session`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProvokedView {
    /// `pending`: waiting for the phone.
    pub state: String,
    /// The login deadline, ms since the epoch.
    pub expires_at: i64,
    /// The accounts asked.
    pub accounts: Vec<String>,
    /// The log position reached: read the session with `min_position` set to it.
    pub position: Option<u64>,
}

/// Whether the account can receive push (it registered with a Message Center). Also the
/// IdP's CIBA test of whom a push login can reach.
pub async fn can_receive_push(state: &AppState, account: AccountRef) -> Result<bool, ApiError> {
    let loaded = state.commands().accounts.load(account).await?;
    Ok(matches!(loaded.state, Account::Active(a) if a.push.is_some()))
}

/// Asks the account that last logged in on the session named by `X-Nonce` to log in again.
#[utoipa::path(post, path = "/v1/servers/{server_id}/session/provoke", tag = "sessions",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("X-Nonce" = String, Header, description = "The session's secret nonce"), ReadParams,
           ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe; another request under the key is 422")),
    request_body(content = Option<ProvokeSessionRequest>, description = "May be empty"),
    responses(
        (status = 202, description = "Asked: the session waits for the phone again", body = ProvokedView),
        (status = 400, description = "Malformed, or no X-Nonce", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Nobody logged in on it, the login is still on or in progress, or the account cannot receive push (type urn:countersign:problem:not-provokable)", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "Declined, expired or failed: not asked again", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Weak nonce or invalid infos", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many push logins for the user (type urn:countersign:problem:provoke-limited)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind min_position", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn provoke_session(
    State(state): State<AppState>,
    tenant: Tenant,
    NonceHeader(nonce): NonceHeader,
    Query(read): Query<ReadParams>,
    key: IdempotencyKey,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: ProvokeSessionRequest = optional_json(&headers, &body)?;
    state.wait_for(read.min_position).await?;
    let session = session_ref(&state, &tenant, &nonce).await?;
    let row = state
        .reads()
        .session_state(session.server_id, session.hsid)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such session".into()))?;
    let (Some(account_id), Some(user)) = (row.account_id, row.user_digest) else {
        return Err(ApiError::NotProvokable(
            "nobody has logged in on this session; show its QR code instead".into(),
        ));
    };
    if !can_receive_push(&state, AccountRef::new(tenant.server, account_id)).await? {
        return Err(ApiError::NotProvokable(
            "the account that logged in on this session cannot receive push".into(),
        ));
    }
    let key = bind_session_key(&state, &tenant, &key, session, &body).await?;
    if row.can_provoke() {
        // A provoke the aggregate will take: count it (refusals are not counted).
        state.provokes().take(tenant.server, user)?;
    }
    let done = state
        .commands()
        .sessions
        .provoke(
            session,
            request.announce_info,
            request.session_info,
            &tenant_metadata(&tenant),
            key,
        )
        .await?;
    let expires_at = done
        .events
        .iter()
        .find_map(|e| match e {
            SessionEvent::Provoked(p) => Some(p.expires_at.as_millis()),
            _ => None,
        })
        .unwrap_or(row.expires_at.as_millis());
    Ok(written(
        StatusCode::ACCEPTED,
        done.position,
        ProvokedView {
            state: "pending".into(),
            expires_at,
            accounts: vec![account_id.to_string()],
            position: done.position,
        },
    ))
}

/// Pushes a login to every account of the user that can receive push.
#[utoipa::path(post, path = "/v1/servers/{server_id}/users/{userid}/provoke", tag = "sessions",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("userid" = String, Path, description = "URL-encoded"), ReadParams,
           ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe; another request under the key is 422")),
    request_body = ProvokeUserRequest,
    responses(
        (status = 201, description = "Opened and pushed", body = ProvokedView),
        (status = 200, description = "Already opened so (a retry)", body = ProvokedView),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such user", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "No account of the user can receive push (type urn:countersign:problem:not-provokable), or the nonce names another session", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Weak nonce or invalid options", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many push logins for the user (type urn:countersign:problem:provoke-limited)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind min_position", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn provoke_user(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(path): Path<(String, String)>,
    Query(read): Query<ReadParams>,
    key: IdempotencyKey,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (_, userid) = path;
    state.wait_for(read.min_position).await?;
    provoke_accounts(&state, &tenant, &userid, None, &key, &headers, &body).await
}

/// Pushes a login to one account of the user.
#[utoipa::path(post, path = "/v1/servers/{server_id}/users/{userid}/accounts/{account_id}/provoke", tag = "sessions",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("userid" = String, Path, description = "URL-encoded"),
           ("account_id" = String, Path, description = "32 hex digits"), ReadParams,
           ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe; another request under the key is 422")),
    request_body = ProvokeUserRequest,
    responses(
        (status = 201, description = "Opened and pushed", body = ProvokedView),
        (status = 200, description = "Already opened so (a retry)", body = ProvokedView),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such user, or not the user's account", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The account cannot receive push (type urn:countersign:problem:not-provokable), or the nonce names another session", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Weak nonce or invalid options", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many push logins for the user (type urn:countersign:problem:provoke-limited)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind min_position", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn provoke_account(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(path): Path<(String, String, String)>,
    Query(read): Query<ReadParams>,
    key: IdempotencyKey,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (_, userid, account_id) = path;
    state.wait_for(read.min_position).await?;
    let account_id: AccountId = account_id
        .parse()
        .map_err(|_| ApiError::NotFound("no such account".into()))?;
    provoke_accounts(
        &state,
        &tenant,
        &userid,
        Some(account_id),
        &key,
        &headers,
        &body,
    )
    .await
}

async fn provoke_accounts(
    state: &AppState,
    tenant: &Tenant,
    userid: &str,
    only: Option<AccountId>,
    key: &IdempotencyKey,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let request: ProvokeUserRequest =
        match optional_json::<Option<ProvokeUserRequest>>(headers, body)? {
            Some(request) => request,
            None => {
                return Err(ApiError::Invalid(
                    "the body names the new session's nonce".into(),
                ));
            }
        };
    let session = session_ref(state, tenant, &request.nonce).await?;
    let user = user_ref(state, tenant, userid).await?;
    if state
        .reads()
        .user(tenant.server, user.digest)
        .await?
        .is_none()
    {
        return Err(ApiError::NotFound("no such user".into()));
    }
    let accounts = state.reads().accounts(tenant.server, user.digest).await?;
    if let Some(named) = only
        && !accounts.iter().any(|a| a.account_id == named)
    {
        return Err(ApiError::NotFound("no such account".into()));
    }
    let mut push_to = Vec::new();
    for account in accounts
        .iter()
        .filter(|a| only.is_none_or(|named| a.account_id == named))
    {
        if can_receive_push(state, AccountRef::new(tenant.server, account.account_id)).await? {
            push_to.push(account.account_id);
        }
    }
    if push_to.is_empty() {
        return Err(ApiError::NotProvokable(if only.is_some() {
            "this account cannot receive push (its app has not registered for push)".into()
        } else {
            "no account of this user can receive push".into()
        }));
    }
    push_to.truncate(countersign_domain::session::MAX_PUSH_ACCOUNTS);
    let key = bind_session_key(state, tenant, key, session, body).await?;
    // A retry of a push login already sent is not counted again.
    let existing = state.commands().sessions.load(session).await?;
    if existing.version.is_none() {
        state.provokes().take(tenant.server, user.digest)?;
    }
    let options = SessionOptions {
        ping_time_secs: request.ping_time_secs,
        announce_info: request.announce_info,
        session_info: request.session_info,
        user: Some(user.digest),
    };
    let done = state
        .commands()
        .sessions
        .open_push(
            session,
            options,
            push_to.clone(),
            &tenant_metadata(tenant),
            key,
        )
        .await?;
    let opened = opened_until(&done.events).map(|at| at.as_millis());
    let (status, expires_at) = match opened {
        Some(at) => (StatusCode::CREATED, at),
        None => (
            StatusCode::OK,
            existing
                .state
                .expires_at()
                .map_or(0, countersign_domain::Timestamp::as_millis),
        ),
    };
    push_to.sort_unstable();
    Ok(written(
        status,
        done.position,
        ProvokedView {
            state: "pending".into(),
            expires_at,
            accounts: push_to.iter().map(ToString::to_string).collect(),
            position: done.position,
        },
    ))
}
