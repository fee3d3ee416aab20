//! The authorization endpoint, `GET|POST /oidc/{server_id}/authorize` (OpenID Connect Core
//! §3.1.2, authorization code flow with PKCE, RFC 7636; `iss` in every answer, RFC 9207).
//!
//! The order of the checks is the security of this endpoint:
//! 1. the client and its `redirect_uri` (registered, matched exactly, each given once). Until
//!    both are known good nothing is ever sent to the `redirect_uri`: a wrong one is an HTML
//!    400 page, never a redirect (RFC 6749 §4.1.2.1, no open redirector);
//! 2. then every other mistake goes back to the client as `error`, `error_description`,
//!    `state` and `iss`: `response_type=code` only, `openid` in `scope` (granted = requested ∩
//!    the client's allowed), PKCE `S256` (required for public clients, used when given by
//!    others; `plain` refused), `prompt` (`none` alone), `max_age`;
//! 3. SSO: `cs_sso` naming a session still logged in (continuous, or one-shot logged in
//!    within [`SSO_ONE_SHOT_SECS`]) answers a code at once, unless `prompt=login` or the login
//!    is older than `max_age`; without one, `prompt=none` answers `login_required`;
//! 4. the per-server login limiter (each login opens a session: a write on behalf of an
//!    anonymous visitor): refused → 429 page, nothing written;
//! 5. a login session with a fresh 256-bit nonce only this browser's sealed `cs_authz` holds,
//!    announced to the phone as "Log in to {client}", then 303 to the hosted page.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use countersign_commands::grant::{LoginFacts, login_facts};
use countersign_commands::session::SessionOptions;
use countersign_domain::ServerId;
use countersign_domain::session::{SessionEvent, SessionOpened, SessionStatus};
use countersign_eventstore::Metadata;

use crate::cookies::{
    self, AUTHZ_COOKIE, CookieError, PendingAuthorization, SSO_COOKIE, SessionNonce, SsoCookie,
};
use crate::login_page::{self, Client, error_page, see_other};
use crate::state::IdpState;

/// How long a one-shot login (which stays `logged_in` for good) serves SSO after it completed.
pub const SSO_ONE_SHOT_SECS: i64 = 8 * 3600;
/// Longest `state` accepted (it travels in the sealed cookie).
pub const MAX_STATE_CHARS: usize = 512;
/// Longest OIDC `nonce` accepted.
pub const MAX_NONCE_CHARS: usize = 255;

/// This module's routes.
pub(crate) fn routes() -> Router<IdpState> {
    Router::new().route(
        "/oidc/{server_id}/authorize",
        get(authorize_get).post(authorize_post),
    )
}

/// Browser logins per server: a token bucket of `burst` taking `per_second` more each second
/// (0: the burst only). In this process; scaled out, each instance counts its own.
#[derive(Debug)]
pub struct LoginLimiter {
    burst: f64,
    per_second: f64,
    buckets: Mutex<HashMap<ServerId, (f64, Instant)>>,
}

impl LoginLimiter {
    pub fn new(burst: u32, per_second: u32) -> Self {
        Self {
            burst: f64::from(burst),
            per_second: f64::from(per_second),
            buckets: Mutex::default(),
        }
    }

    /// Takes one login for `server`; `false` when the bucket is empty.
    pub fn take(&self, server: ServerId) -> bool {
        let now = Instant::now();
        let Ok(mut buckets) = self.buckets.lock() else {
            return false;
        };
        if buckets.len() > 100_000 {
            let (burst, rate) = (self.burst, self.per_second);
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = buckets.entry(server).or_insert((self.burst, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Request parameters, each name with all its values (OAuth parameters must not repeat).
#[derive(Default)]
pub(crate) struct Params(HashMap<String, Vec<String>>);

impl Params {
    pub(crate) fn parse(text: &[u8]) -> Self {
        let mut map: HashMap<String, Vec<String>> = HashMap::new();
        for (name, value) in url::form_urlencoded::parse(text) {
            map.entry(name.into_owned())
                .or_default()
                .push(value.into_owned());
        }
        Self(map)
    }

    /// The value, when given exactly once (`Err` when repeated), empty counting as absent.
    pub(crate) fn one(&self, name: &str) -> Result<Option<&str>, ()> {
        match self.0.get(name).map(Vec::as_slice) {
            None | Some([]) => Ok(None),
            Some([value]) => Ok(Some(value.as_str()).filter(|v| !v.is_empty())),
            Some(_) => Err(()),
        }
    }

    fn repeated(&self) -> Option<&str> {
        self.0
            .iter()
            .find(|(_, values)| values.len() > 1)
            .map(|(name, _)| name.as_str())
    }
}

async fn authorize_get(
    State(state): State<IdpState>,
    Path(server): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let params = Params::parse(query.unwrap_or_default().as_bytes());
    authorize(&state, &server, &params, &headers).await
}

async fn authorize_post(
    State(state): State<IdpState>,
    Path(server): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    authorize(&state, &server, &Params::parse(&body), &headers).await
}

/// The checked request, ready to become a pending authorization.
pub(crate) struct Request {
    pub client: Client,
    pub redirect_uri: String,
    pub scope: Vec<String>,
    pub state: Option<String>,
    pub nonce: Option<String>,
    pub code_challenge: Option<String>,
}

async fn authorize(
    state: &IdpState,
    server: &str,
    params: &Params,
    headers: &HeaderMap,
) -> Response {
    let Ok(server) = ServerId::parse_hex(server) else {
        return login_page::no_such_server();
    };
    // The page's face of the server, cached here for the page that follows.
    match login_page::face(state, server).await {
        Ok(Some(_)) => {}
        Ok(None) => return login_page::no_such_server(),
        Err(response) => return response,
    }
    // 1. Client and redirect URI: never redirect before both are known good.
    let client = match params.one("client_id") {
        Ok(Some(id)) => match login_page::client(state, server, id).await {
            Ok(Some(client)) => client,
            Ok(None) => return unknown_client(),
            Err(response) => return response,
        },
        Ok(None) | Err(()) => return unknown_client(),
    };
    let redirect_uri = match params.one("redirect_uri") {
        Ok(Some(uri)) if client.redirect_uris.iter().any(|r| r == uri) => uri.to_owned(),
        _ => {
            return error_page(
                StatusCode::BAD_REQUEST,
                "This address cannot be used",
                "The application asked to return to an address it has not registered. \
                 Nothing was sent to it. Tell the application's operator.",
            );
        }
    };
    let fail = |error: &str, description: &str| {
        let given_state = params.one("state").ok().flatten();
        error_redirect(
            state,
            server,
            &redirect_uri,
            error,
            description,
            given_state,
        )
    };
    // 2. Everything else goes back to the client.
    if let Some(name) = params.repeated() {
        return fail(
            "invalid_request",
            &format!("parameter {name} is given more than once"),
        );
    }
    let request = match check(params, &client, &redirect_uri) {
        Ok(request) => request,
        Err((error, description)) => return fail(error, &description),
    };
    let prompt: Vec<&str> = params
        .one("prompt")
        .ok()
        .flatten()
        .map(|p| p.split(' ').filter(|p| !p.is_empty()).collect())
        .unwrap_or_default();
    if prompt.contains(&"none") && prompt.len() > 1 {
        return fail("invalid_request", "prompt=none cannot be combined");
    }
    let max_age = match params.one("max_age").ok().flatten() {
        None => None,
        Some(text) => match text.parse::<u32>() {
            Ok(secs) => Some(secs),
            Err(_) => return fail("invalid_request", "max_age must be a number of seconds"),
        },
    };
    // 3. SSO.
    if !prompt.contains(&"login")
        && let Some(response) = sso(state, server, &request, max_age, headers).await
    {
        return response;
    }
    if prompt.contains(&"none") {
        return fail(
            "login_required",
            "the user is not logged in here; ask again without prompt=none",
        );
    }
    // 4 and 5.
    match open_login(state, server, request).await {
        Ok(response) => response,
        Err(response) => response,
    }
}

fn unknown_client() -> Response {
    error_page(
        StatusCode::BAD_REQUEST,
        "Unknown application",
        "The application that sent you here is not registered at this login service. \
         Tell the application's operator.",
    )
}

/// Checks what goes back to the client as an error: (`error`, `error_description`).
fn check(
    params: &Params,
    client: &Client,
    redirect_uri: &str,
) -> Result<Request, (&'static str, String)> {
    let one = |name: &str| params.one(name).ok().flatten();
    if one("request").is_some() {
        return Err((
            "request_not_supported",
            "request objects are not supported".into(),
        ));
    }
    if one("request_uri").is_some() {
        return Err((
            "request_uri_not_supported",
            "request_uri is not supported".into(),
        ));
    }
    match one("response_type") {
        Some("code") => {}
        None => return Err(("invalid_request", "response_type is required".into())),
        Some(_) => {
            return Err((
                "unsupported_response_type",
                "only response_type=code is supported".into(),
            ));
        }
    }
    if let Some(mode) = one("response_mode")
        && mode != "query"
    {
        return Err((
            "invalid_request",
            "only response_mode=query is supported".into(),
        ));
    }
    let requested: Vec<&str> = one("scope")
        .unwrap_or_default()
        .split(' ')
        .filter(|s| !s.is_empty())
        .collect();
    if !requested.contains(&"openid") {
        return Err(("invalid_scope", "scope must include openid".into()));
    }
    let mut scope: Vec<String> = vec!["openid".into()];
    for s in requested {
        if client.scopes.iter().any(|allowed| allowed == s) && !scope.iter().any(|g| g == s) {
            scope.push(s.to_owned());
        }
    }
    let code_challenge = match (one("code_challenge"), one("code_challenge_method")) {
        (None, None) if client.public => {
            return Err((
                "invalid_request",
                "a public client must use PKCE (code_challenge with S256)".into(),
            ));
        }
        (None, None) => None,
        (None, Some(_)) => {
            return Err((
                "invalid_request",
                "code_challenge_method without code_challenge".into(),
            ));
        }
        (Some(_), Some(method)) if method != "S256" => {
            return Err((
                "invalid_request",
                "only code_challenge_method=S256 is supported".into(),
            ));
        }
        (Some(_), None) => {
            return Err((
                "invalid_request",
                "code_challenge_method=S256 is required (plain is not supported)".into(),
            ));
        }
        (Some(challenge), Some(_)) => {
            if challenge.len() != 43
                || URL_SAFE_NO_PAD
                    .decode(challenge)
                    .map_or(true, |b| b.len() != 32)
            {
                return Err((
                    "invalid_request",
                    "code_challenge must be the base64url SHA-256 of the verifier".into(),
                ));
            }
            Some(challenge.to_owned())
        }
    };
    let rp_state = one("state").map(str::to_owned);
    if rp_state.as_ref().is_some_and(|s| s.len() > MAX_STATE_CHARS) {
        return Err((
            "invalid_request",
            format!("state is longer than {MAX_STATE_CHARS} characters"),
        ));
    }
    let nonce = one("nonce").map(str::to_owned);
    if nonce.as_ref().is_some_and(|n| n.len() > MAX_NONCE_CHARS) {
        return Err((
            "invalid_request",
            format!("nonce is longer than {MAX_NONCE_CHARS} characters"),
        ));
    }
    Ok(Request {
        client: client.clone(),
        redirect_uri: redirect_uri.to_owned(),
        scope,
        state: rp_state,
        nonce,
        code_challenge,
    })
}

/// A redirect to the client's (checked) `redirect_uri` with `params` added to its query, and
/// `iss`.
pub(crate) fn client_redirect(
    state: &IdpState,
    server: ServerId,
    redirect_uri: &str,
    params: &[(&str, &str)],
    cookies: Vec<HeaderValue>,
) -> Response {
    let Ok(mut url) = url::Url::parse(redirect_uri) else {
        return error_page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Something went wrong",
            "The application's return address cannot be used.",
        );
    };
    {
        let mut query = url.query_pairs_mut();
        for (name, value) in params {
            query.append_pair(name, value);
        }
        query.append_pair("iss", &state.issuer(server));
    }
    see_other(url.as_str(), cookies)
}

/// An OAuth error back to the client.
pub(crate) fn error_redirect(
    state: &IdpState,
    server: ServerId,
    redirect_uri: &str,
    error: &str,
    description: &str,
    rp_state: Option<&str>,
) -> Response {
    let mut params = vec![("error", error), ("error_description", description)];
    if let Some(rp_state) = rp_state {
        params.push(("state", rp_state));
    }
    client_redirect(state, server, redirect_uri, &params, Vec::new())
}

/// Answers a code at once when `cs_sso` names a login that may be reused.
async fn sso(
    state: &IdpState,
    server: ServerId,
    request: &Request,
    max_age: Option<u32>,
    headers: &HeaderMap,
) -> Option<Response> {
    let (sso, _) = cookies::read_open::<SsoCookie>(state, server, headers, SSO_COOKIE).await?;
    let now = state.api().clock().now().as_millis();
    let session = state
        .api()
        .commands()
        .sessions
        .session_ref(server, sso.session_nonce.expose())
        .await
        .ok()?;
    let facts = match login_facts(state.api().store(), session, state.api().clock().now()).await {
        Ok(facts) => facts?,
        Err(error) => {
            tracing::warn!(%error, %server, "SSO session read failed");
            return None;
        }
    };
    if !sso_usable(&facts, &sso, now) {
        return None;
    }
    if let Some(max_age) = max_age
        && now.saturating_sub(facts.auth_time.as_millis()) > i64::from(max_age) * 1000
    {
        return None;
    }
    let pending = PendingAuthorization {
        session_nonce: sso.session_nonce.clone(),
        client_id: request.client.id.clone(),
        client_name: request.client.name.clone(),
        redirect_uri: request.redirect_uri.clone(),
        scope: request.scope.clone(),
        state: request.state.clone(),
        nonce: request.nonce.clone(),
        code_challenge: request.code_challenge.clone(),
        issued_at: now,
        expires_at: now,
    };
    Some(login_page::issue_code(state, server, &pending, session, false).await)
}

/// Whether the login `cs_sso` names serves SSO at `now`: logged in, and continuous or
/// completed within [`SSO_ONE_SHOT_SECS`].
fn sso_usable(facts: &LoginFacts, sso: &SsoCookie, now: i64) -> bool {
    facts.status == SessionStatus::LoggedIn
        && (facts.continuous || now.saturating_sub(sso.issued_at) <= SSO_ONE_SHOT_SECS * 1000)
}

/// The actor of what the IdP writes for `client`'s browser logins.
pub(crate) fn metadata(client_id: &str) -> Metadata {
    Metadata {
        actor: Some(format!("idp:{client_id}")),
        ..Metadata::default()
    }
}

/// Takes a login from the limiter, opens the session, sets `cs_authz` and sends the browser
/// to the hosted page.
pub(crate) async fn open_login(
    state: &IdpState,
    server: ServerId,
    request: Request,
) -> Result<Response, Response> {
    let now = state.api().clock().now().as_millis();
    let mut pending = PendingAuthorization {
        session_nonce: SessionNonce::random().map_err(login_page::internal)?,
        client_id: request.client.id.clone(),
        client_name: request.client.name.clone(),
        redirect_uri: request.redirect_uri,
        scope: request.scope,
        state: request.state,
        nonce: request.nonce,
        code_challenge: request.code_challenge,
        issued_at: now,
        // The real deadline has as many digits: the size check below holds for it.
        expires_at: now,
    };
    // A request too large for the cookie is refused before anything is written.
    match cookies::seal(state, server, AUTHZ_COOKIE, &pending).await {
        Ok(_) => {}
        Err(CookieError::TooLarge) => {
            return Err(error_redirect(
                state,
                server,
                &pending.redirect_uri,
                "invalid_request",
                "the authorization request is too large",
                pending.state.as_deref(),
            ));
        }
        Err(error) => return Err(login_page::cookie_failed(error)),
    }
    if !state.browser().logins().take(server) {
        let mut response = error_page(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many logins right now",
            "This login service is busy. Wait a moment and try again.",
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return Err(response);
    }
    let commands = state.api().commands();
    let session = commands
        .sessions
        .session_ref(server, pending.session_nonce.expose())
        .await
        .map_err(login_page::command_failed)?;
    let options = SessionOptions {
        ping_time_secs: None,
        announce_info: Some(announce(&request.client.name)),
        session_info: None,
        user: None,
    };
    let done = commands
        .sessions
        .open(session, options, &metadata(&request.client.id), None)
        .await
        .map_err(login_page::command_failed)?;
    pending.expires_at = done
        .events
        .iter()
        .find_map(|e| match e {
            SessionEvent::Opened(SessionOpened { expires_at, .. }) => Some(expires_at.as_millis()),
            _ => None,
        })
        .unwrap_or(now);
    let value = cookies::seal(state, server, AUTHZ_COOKIE, &pending)
        .await
        .map_err(login_page::cookie_failed)?;
    let cookie = cookies::set_cookie(state, AUTHZ_COOKIE, &value, pending.max_age_secs(now));
    Ok(see_other(&format!("/login/{server}"), vec![cookie]))
}

/// What the phone shows while the user confirms.
pub(crate) fn announce(client_name: &str) -> String {
    format!("Log in to {client_name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_takes_the_burst_then_refuses() {
        let limiter = LoginLimiter::new(2, 0);
        let server = ServerId::from_bytes([1; 16]);
        assert!(limiter.take(server));
        assert!(limiter.take(server));
        assert!(!limiter.take(server));
        assert!(limiter.take(ServerId::from_bytes([2; 16])), "per server");
    }

    #[test]
    fn repeated_parameters_are_seen() {
        let params = Params::parse(b"a=1&b=2&b=3&c=");
        assert_eq!(params.one("a"), Ok(Some("1")));
        assert_eq!(params.one("b"), Err(()));
        assert_eq!(params.one("c"), Ok(None));
        assert_eq!(params.repeated(), Some("b"));
    }
}
