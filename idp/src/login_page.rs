//! The hosted login page, `/login/{server_id}`: what the browser shows while the phone logs
//! in, and the steps that finish the login.
//!
//! - `GET /login/{server}`: server-rendered HTML (inline CSS and JS under a per-response CSP
//!   nonce, no build step): the server's name and logo, the client's name, the session's QR
//!   code, the app's deep link on a phone's browser, "Send to my phone" when `cs_sso` shows an
//!   earlier login here, live status over SSE, then the continue form posted by the script (a
//!   Continue button without script). It makes no database read when `cs_authz` is fresh: the
//!   session's id is derived from the cookie's nonce, the server's face is cached.
//! - `GET …/qr.png`: the session's login QR code, the same payload as the API's.
//! - `GET …/events`: SSE, `data: {"state": …}` now and on every change, bound to the cookie,
//!   ending on a final state and at the session's deadline at the latest.
//! - `POST …/provoke`: asks the phone of the `cs_sso` session to log in again (the API's
//!   per-user provoke limiter applies) and moves the pending authorization onto that session.
//! - `POST …/continue`: logged in → a code (`grants.issue_code`), `cs_sso` set, `cs_authz`
//!   cleared, 303 to the client; declined or failed → `access_denied` to the client; expired →
//!   a page with a restart button (`POST …/restart`).
//!
//! Every POST carries the CSRF token of its cookie (see [`crate::cookies`]); without it, or
//! with a wrong one, the answer is a 403 page and nothing is written. Every answer has a
//! strict CSP (`frame-ancestors 'none'`), `X-Frame-Options: DENY`, `Referrer-Policy:
//! no-referrer`, `Cache-Control: no-store` and `X-Content-Type-Options: nosniff`.
//!
//! Optional plain login (`GET /login/{server}?client_id=…&return_to=URL`, for the forward-auth
//! issue) is not served yet: `return_to` is refused unless it is a redirect URI the client
//! registered (no open redirect), and then the page says plain login is not available.

// Every step answers a page, whether it went on or not: `Err(Response)` is the early page.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use countersign_commands::CommandError;
use countersign_commands::grant::CodeRequest;
use countersign_domain::server::OidcClientKind;
use countersign_domain::session::SessionEvent;
use countersign_domain::{AccountRef, ErrorKind, Hsid, OidcClientId, ServerId, SessionRef};
use countersign_protocol::qr::{QrKind, QrPayload};

use crate::authorize::{self, LoginLimiter, Params, Request};
use crate::cookies::{
    self, AUTHZ_COOKIE, CookieError, PendingAuthorization, SSO_COOKIE, SsoCookie,
};
use crate::state::{IdpConfig, IdpState};

/// How long a server's name, logo and key fingerprint are reused without reading them again.
pub const FACE_TTL: Duration = Duration::from_secs(60);
/// Size of the QR image, pixels.
pub const QR_SIZE: u32 = 256;

/// This module's routes.
pub(crate) fn routes() -> Router<IdpState> {
    Router::new()
        .route("/login/{server_id}", get(page))
        .route("/login/{server_id}/qr.png", get(qr_png))
        .route("/login/{server_id}/events", get(events))
        .route("/login/{server_id}/provoke", post(provoke))
        .route("/login/{server_id}/continue", post(finish))
        .route("/login/{server_id}/restart", post(restart))
}

/// What the page shows of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFace {
    pub name: String,
    pub logo_url: Option<String>,
    /// SHA-256 of the server's public key (the app pins it; it goes into the QR code).
    pub fingerprint: [u8; 32],
}

/// The browser side's shared state: the server faces cache and the login limiter.
#[derive(Debug)]
pub struct Browser {
    faces: RwLock<HashMap<ServerId, (Instant, Arc<ServerFace>)>>,
    logins: LoginLimiter,
}

impl Browser {
    pub fn new(config: &IdpConfig) -> Self {
        Self {
            faces: RwLock::default(),
            logins: LoginLimiter::new(config.login_burst, config.login_per_second),
        }
    }

    /// The per-server browser login limiter.
    pub fn logins(&self) -> &LoginLimiter {
        &self.logins
    }
}

/// A registered client as the browser flows need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// `client_id`: 32 hex digits.
    pub id: String,
    pub name: String,
    /// A public client (no secret): PKCE is required.
    pub public: bool,
    pub redirect_uris: Vec<String>,
    pub post_logout_redirect_uris: Vec<String>,
    pub scopes: Vec<String>,
}

/// The client `client_id` of `server` (`None`: unknown, removed, or not an id).
pub(crate) async fn client(
    state: &IdpState,
    server: ServerId,
    client_id: &str,
) -> Result<Option<Client>, Response> {
    let Ok(id) = countersign_domain::OidcClientId::parse_hex(client_id) else {
        return Ok(None);
    };
    let row = state
        .api()
        .reads()
        .oidc_client(server, id)
        .await
        .map_err(internal)?;
    Ok(row.map(|row| Client {
        id: row.client_id.to_string(),
        public: row.settings.kind == OidcClientKind::Public,
        name: row.settings.name,
        redirect_uris: row.settings.redirect_uris,
        post_logout_redirect_uris: row.settings.post_logout_redirect_uris,
        scopes: row.settings.scopes,
    }))
}

/// The server's face, cached for [`FACE_TTL`]; `None` for an unknown or deleted server.
pub(crate) async fn face(
    state: &IdpState,
    server: ServerId,
) -> Result<Option<Arc<ServerFace>>, Response> {
    let browser = state.browser();
    if let Ok(faces) = browser.faces.read()
        && let Some((at, face)) = faces.get(&server)
        && at.elapsed() < FACE_TTL
    {
        return Ok(Some(Arc::clone(face)));
    }
    let row = state.api().reads().server(server).await.map_err(internal)?;
    let Some(row) = row.filter(|r| r.deleted_at.is_none()) else {
        return Ok(None);
    };
    let face = Arc::new(ServerFace {
        name: row.name,
        logo_url: row.logo_url,
        fingerprint: row.key_thumbprint,
    });
    if let Ok(mut faces) = browser.faces.write() {
        if faces.len() > 10_000 {
            faces.retain(|_, (at, _)| at.elapsed() < FACE_TTL);
        }
        faces.insert(server, (Instant::now(), Arc::clone(&face)));
    }
    Ok(Some(face))
}

// ---------------------------------------------------------------------------------------
// Answers

/// HTML-escapes text for element content and quoted attributes.
pub(crate) use crate::error::html_escape as escape;

/// Puts the headers every browser answer carries, with `csp`.
pub(crate) fn harden(headers: &mut HeaderMap, csp: &str) {
    if let Ok(csp) = HeaderValue::from_str(csp) {
        headers.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
}

/// The CSP of a page with no script, style `nonce` and forms posting to `form_action`.
fn csp(nonce: &str, form_action: &str) -> String {
    format!(
        "default-src 'none'; img-src 'self' https: data:; style-src 'nonce-{nonce}'; \
         script-src 'nonce-{nonce}'; connect-src 'self'; form-action 'self'{form_action}; \
         frame-ancestors 'none'; base-uri 'none'"
    )
}

/// A random CSP nonce (128 bits).
fn csp_nonce() -> Result<String, Response> {
    let mut bytes = [0u8; 16];
    countersign_commands::random_bytes(&mut bytes).map_err(internal)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;\
background:#f4f5f7;color:#1d2330}main{max-width:26rem;margin:2rem auto;background:#fff;\
border-radius:12px;padding:2rem;box-shadow:0 2px 12px rgba(0,0,0,.08);text-align:center}\
header img{max-height:48px;max-width:12rem}h1{font-size:1.3rem;margin:.5rem 0 1rem}\
#qr{width:256px;height:256px;image-rendering:pixelated}button,.button{display:inline-block;\
margin:.4rem;padding:.7rem 1.2rem;border:0;border-radius:8px;background:#1f5eff;color:#fff;\
font-size:1rem;text-decoration:none;cursor:pointer}button.secondary{background:#e6e9f0;\
color:#1d2330}#status{min-height:1.5em;color:#4a5263}";

fn html(status: StatusCode, nonce: &str, form_action: &str, title: &str, body: &str) -> Response {
    let document = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <meta name=\"referrer\" content=\"no-referrer\"><title>{title}</title>\
         <style nonce=\"{nonce}\">{STYLE}</style></head><body><main>{body}</main></body></html>",
        title = escape(title),
    );
    let mut response = (status, document).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    harden(response.headers_mut(), &csp(nonce, form_action));
    response
}

/// An HTML page saying what went wrong (no script, no form but to ourselves).
pub(crate) fn error_page(status: StatusCode, title: &str, message: &str) -> Response {
    let nonce = csp_nonce().unwrap_or_else(|_| "none".into());
    let body = format!("<h1>{}</h1><p>{}</p>", escape(title), escape(message));
    html(status, &nonce, "", title, &body)
}

/// A page whose `body` (trusted, already escaped HTML) may hold forms posting to ourselves.
pub(crate) fn page_with_form(status: StatusCode, title: &str, body: &str) -> Response {
    let nonce = csp_nonce().unwrap_or_else(|_| "none".into());
    html(status, &nonce, "", title, body)
}

/// 303 to `location`, setting `cookies`.
pub(crate) fn see_other(location: &str, cookies: Vec<HeaderValue>) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(location) {
        headers.insert(header::LOCATION, location);
    }
    for cookie in cookies {
        headers.append(header::SET_COOKIE, cookie);
    }
    harden(headers, "default-src 'none'; frame-ancestors 'none'");
    response
}

/// 500, the cause logged.
pub(crate) fn internal(error: impl std::fmt::Display) -> Response {
    tracing::error!(%error, "browser login failed");
    error_page(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Something went wrong",
        "The login could not go on. Try again in a moment.",
    )
}

/// A command's refusal as a page.
pub(crate) fn command_failed(error: CommandError) -> Response {
    match &error {
        CommandError::Rejected {
            kind: ErrorKind::NotFound,
            ..
        } => no_such_server(),
        CommandError::Rejected { .. } | CommandError::Conflict { .. } => error_page(
            StatusCode::CONFLICT,
            "The login cannot go on",
            "The login changed meanwhile. Go back to the application and start again.",
        ),
        CommandError::Store(_) | CommandError::Internal(_) => internal(error),
    }
}

pub(crate) fn cookie_failed(error: CookieError) -> Response {
    match error {
        CookieError::TooLarge => error_page(
            StatusCode::BAD_REQUEST,
            "The request is too large",
            "The application's login request is too large.",
        ),
        CookieError::Internal(_) => internal(error),
    }
}

pub(crate) fn no_such_server() -> Response {
    error_page(
        StatusCode::NOT_FOUND,
        "No such login service",
        "There is no login service at this address.",
    )
}

fn no_login() -> Response {
    error_page(
        StatusCode::BAD_REQUEST,
        "No login in progress",
        "This browser has no login in progress here (or it is too old). Go back to the \
         application and log in again.",
    )
}

fn forbidden() -> Response {
    error_page(
        StatusCode::FORBIDDEN,
        "This form cannot be used",
        "The form was not sent by this login page. Go back to the application and start again.",
    )
}

fn form_origin(redirect_uri: &str) -> String {
    url::Url::parse(redirect_uri)
        .ok()
        .map(|u| u.origin())
        .filter(url::Origin::is_tuple)
        .map(|o| format!(" {}", o.ascii_serialization()))
        .unwrap_or_default()
}

fn is_phone(headers: &HeaderMap) -> bool {
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ua| {
            ["Android", "iPhone", "iPad", "iPod", "Mobile"]
                .iter()
                .any(|m| ua.contains(m))
        })
}

// ---------------------------------------------------------------------------------------
// The page and what it reads

/// The browser's pending authorization at `server`, if fresh: (content, cookie value).
async fn pending(
    state: &IdpState,
    server: ServerId,
    headers: &HeaderMap,
) -> Option<(PendingAuthorization, String)> {
    cookies::read_open::<PendingAuthorization>(state, server, headers, AUTHZ_COOKIE).await
}

async fn session_of(
    state: &IdpState,
    server: ServerId,
    nonce: &cookies::SessionNonce,
) -> Result<SessionRef, Response> {
    state
        .api()
        .commands()
        .sessions
        .session_ref(server, nonce.expose())
        .await
        .map_err(command_failed)
}

fn login_qr(state: &IdpState, server: ServerId, hsid: Hsid, face: &ServerFace) -> QrPayload {
    QrPayload {
        kind: QrKind::Login,
        server_id: *server.as_bytes(),
        token: *hsid.as_bytes(),
        gateway: state.api().config().gateway_url.clone(),
        server_key_fingerprint: face.fingerprint,
    }
}

fn parse_server(server: &str) -> Result<ServerId, Response> {
    ServerId::parse_hex(server).map_err(|_| no_such_server())
}

async fn page(
    State(state): State<IdpState>,
    Path(server): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    match render(&state, &server, query.as_deref(), &headers).await {
        Ok(response) | Err(response) => response,
    }
}

async fn render(
    state: &IdpState,
    server: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response, Response> {
    let server = parse_server(server)?;
    if let Some(query) = query.filter(|q| !q.is_empty()) {
        return plain_login(state, server, &Params::parse(query.as_bytes())).await;
    }
    let Some((pending, value)) = pending(state, server, headers).await else {
        return Err(no_login());
    };
    let now = state.api().clock().now().as_millis();
    if now > pending.expires_at {
        return expired_page(state, server, &value).await;
    }
    let face = face(state, server).await?.ok_or_else(no_such_server)?;
    let session = session_of(state, server, &pending.session_nonce).await?;
    let csrf = cookies::csrf_token(state, server, &value)
        .await
        .map_err(cookie_failed)?;
    let has_sso = cookies::read_open::<SsoCookie>(state, server, headers, SSO_COOKIE)
        .await
        .is_some();
    let nonce = csp_nonce()?;
    let logo = face
        .logo_url
        .as_deref()
        .map(|url| format!("<img src=\"{}\" alt=\"\">", escape(url)))
        .unwrap_or_default();
    let deep_link = if is_phone(headers) {
        let link = login_qr(state, server, session.hsid, &face).deep_link();
        format!(
            "<p><a class=\"button\" id=\"open-app\" href=\"{}\">Open the app</a></p>",
            escape(&link)
        )
    } else {
        String::new()
    };
    let provoke = if has_sso {
        format!(
            "<form id=\"provoke\" method=\"post\" action=\"/login/{server}/provoke\" hidden>\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <button type=\"submit\" class=\"secondary\">Send to my phone</button></form>\
             <noscript><style nonce=\"{nonce}\">#provoke{{display:block}}</style></noscript>"
        )
    } else {
        String::new()
    };
    let body = format!(
        "<header>{logo}<h1>{server_name}</h1></header>\
         <p>Log in to <strong>{client}</strong> with the countersign app.</p>\
         <img id=\"qr\" src=\"/login/{server}/qr.png\" alt=\"QR code: scan it with the app\" \
         width=\"256\" height=\"256\">{deep_link}\
         <p id=\"status\" role=\"status\" data-events=\"/login/{server}/events\">Scan the code with the app.</p>{provoke}\
         <form id=\"continue\" method=\"post\" action=\"/login/{server}/continue\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <noscript><button type=\"submit\">Continue</button></noscript></form>\
         <script nonce=\"{nonce}\">{script}</script>",
        server_name = escape(&face.name),
        client = escape(&pending.client_name),
        script = SCRIPT,
    );
    Ok(html(
        StatusCode::OK,
        &nonce,
        &form_origin(&pending.redirect_uri),
        &authorize::announce(&pending.client_name),
        &body,
    ))
}

const SCRIPT: &str = "(function(){var s=document.getElementById('status'),\
f=document.getElementById('continue'),p=document.getElementById('provoke');\
var m={pending:'Scan the code with the app.',scanned:'Confirm on your phone.',\
logged_in:'Logged in. Returning to the application\\u2026',aborted:'The login was declined.',\
failed:'The login failed.',expired:'The login expired.',logged_out:'The login has ended.'};\
if(!window.EventSource){return;}var e=new EventSource(s.dataset.events);\
e.onmessage=function(ev){var d;try{d=JSON.parse(ev.data);}catch(x){return;}\
if(p&&d.provoke){p.hidden=false;}s.textContent=m[d.state]||'';\
if(d.state!=='pending'&&d.state!=='scanned'){e.close();f.submit();}};})();";

async fn expired_page(
    state: &IdpState,
    server: ServerId,
    cookie_value: &str,
) -> Result<Response, Response> {
    let csrf = cookies::csrf_token(state, server, cookie_value)
        .await
        .map_err(cookie_failed)?;
    let nonce = csp_nonce()?;
    let body = format!(
        "<h1>The login expired</h1><p>The phone did not log in in time.</p>\
         <form method=\"post\" action=\"/login/{server}/restart\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <button type=\"submit\">Start again</button></form>"
    );
    Ok(html(StatusCode::OK, &nonce, "", "The login expired", &body))
}

/// `?client_id=…&return_to=…`: refuses a `return_to` the client did not register.
async fn plain_login(
    state: &IdpState,
    server: ServerId,
    params: &Params,
) -> Result<Response, Response> {
    let client = match params.one("client_id") {
        Ok(Some(id)) => client(state, server, id).await?,
        _ => None,
    };
    let registered = client.as_ref().is_some_and(|c| {
        params
            .one("return_to")
            .ok()
            .flatten()
            .is_some_and(|to| c.redirect_uris.iter().any(|r| r == to))
    });
    if !registered {
        return Err(error_page(
            StatusCode::BAD_REQUEST,
            "This address cannot be used",
            "The return address is not one the application registered. Nothing was sent to it.",
        ));
    }
    Err(error_page(
        StatusCode::NOT_FOUND,
        "Plain login is not available",
        "Log in through the application (OpenID Connect).",
    ))
}

async fn qr_png(
    State(state): State<IdpState>,
    Path(server): Path<String>,
    headers: HeaderMap,
) -> Response {
    let answer = async {
        let server = parse_server(&server)?;
        let (pending, _) = pending(&state, server, &headers)
            .await
            .ok_or_else(no_login)?;
        let face = face(&state, server).await?.ok_or_else(no_such_server)?;
        let session = session_of(&state, server, &pending.session_nonce).await?;
        let payload = login_qr(&state, server, session.hsid, &face);
        let png = countersign_api::qr::png(&payload.encode(), QR_SIZE).map_err(internal)?;
        let mut response = png.into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
        harden(response.headers_mut(), "default-src 'none'");
        Ok::<_, Response>(response)
    };
    match answer.await {
        Ok(response) | Err(response) => response,
    }
}

// ---------------------------------------------------------------------------------------
// Live status

fn is_final(state: &str) -> bool {
    !matches!(state, "pending" | "scanned")
}

/// Whether the `cs_sso` session can be asked to log in again by push.
async fn can_provoke(
    state: &IdpState,
    server: ServerId,
    headers: &HeaderMap,
    current: Hsid,
) -> bool {
    let Some((sso, _)) = cookies::read_open::<SsoCookie>(state, server, headers, SSO_COOKIE).await
    else {
        return false;
    };
    let Ok(session) = session_of(state, server, &sso.session_nonce).await else {
        return false;
    };
    if session.hsid == current {
        return false;
    }
    let Ok(Some(row)) = state
        .api()
        .reads()
        .session_state(server, session.hsid)
        .await
    else {
        return false;
    };
    let Some(account) = row.account_id.filter(|_| row.can_provoke()) else {
        return false;
    };
    countersign_api::provoke::can_receive_push(state.api(), AccountRef::new(server, account))
        .await
        .unwrap_or(false)
}

struct Watch {
    state: IdpState,
    session: SessionRef,
    processed: tokio::sync::watch::Receiver<u64>,
    deadline: tokio::time::Instant,
    last: Option<String>,
    provoke: Option<bool>,
    done: bool,
}

impl Watch {
    async fn next(mut self) -> Option<(Result<Event, std::convert::Infallible>, Self)> {
        if self.done {
            return None;
        }
        loop {
            if self.last.is_some() {
                match tokio::time::timeout_at(self.deadline, self.processed.changed()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) | Err(_) => return None,
                }
            }
            self.processed.borrow_and_update();
            let row = match self
                .state
                .api()
                .reads()
                .session_state(self.session.server_id, self.session.hsid)
                .await
            {
                Ok(row) => row,
                Err(error) => {
                    tracing::warn!(%error, "login status read failed");
                    return None;
                }
            };
            let now = row.map_or_else(|| "pending".to_owned(), |r| r.state);
            if self.last.as_deref() == Some(now.as_str()) {
                continue;
            }
            self.done = is_final(&now);
            let data = match self.provoke.take() {
                Some(provoke) => serde_json::json!({ "state": now, "provoke": provoke }),
                None => serde_json::json!({ "state": now }),
            };
            self.last = Some(now);
            return Some((Ok(Event::default().data(data.to_string())), self));
        }
    }
}

async fn events(
    State(state): State<IdpState>,
    Path(server): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Ok(server) = parse_server(&server) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Some((pending, _)) = pending(&state, server, &headers).await else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Ok(session) = session_of(&state, server, &pending.session_nonce).await else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let provoke = can_provoke(&state, server, &headers, session.hsid).await;
    let now = state.api().clock().now().as_millis();
    let wait = pending
        .expires_at
        .saturating_sub(now)
        .clamp(1_000, 86_400_000);
    let deadline = tokio::time::Instant::now()
        + Duration::from_millis(u64::try_from(wait).unwrap_or(1_000))
        + Duration::from_secs(5);
    let watch = Watch {
        processed: state.api().reads().processed(),
        state: state.clone(),
        session,
        deadline,
        last: None,
        provoke: Some(provoke),
        done: false,
    };
    let stream = futures::stream::unfold(watch, Watch::next);
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    harden(response.headers_mut(), "default-src 'none'");
    response
}

// ---------------------------------------------------------------------------------------
// Posts

/// The form's fields and the pending authorization, CSRF checked.
async fn posted(
    state: &IdpState,
    server: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(ServerId, PendingAuthorization, String), Response> {
    let server = parse_server(server)?;
    let form = Params::parse(body);
    let Some((pending, value)) = pending(state, server, headers).await else {
        // Without the cookie there is no token to check against: refuse as a forgery.
        return Err(forbidden());
    };
    let token = form.one("csrf").ok().flatten();
    if !cookies::csrf_ok(state, server, &value, token)
        .await
        .map_err(cookie_failed)?
    {
        return Err(forbidden());
    }
    Ok((server, pending, value))
}

async fn provoke(
    State(state): State<IdpState>,
    Path(server): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match provoke_sso(&state, &server, &headers, &body).await {
        Ok(response) | Err(response) => response,
    }
}

fn not_provokable() -> Response {
    error_page(
        StatusCode::CONFLICT,
        "Your phone cannot be asked",
        "There is no earlier login on this browser that the phone can be asked to repeat. \
         Scan the QR code instead.",
    )
}

async fn provoke_sso(
    state: &IdpState,
    server: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, Response> {
    let (server, pending, _) = posted(state, server, headers, body).await?;
    let Some((sso, _)) = cookies::read_open::<SsoCookie>(state, server, headers, SSO_COOKIE).await
    else {
        return Err(not_provokable());
    };
    let current = session_of(state, server, &pending.session_nonce).await?;
    let session = session_of(state, server, &sso.session_nonce).await?;
    if session == current {
        return Ok(see_other(&format!("/login/{server}"), Vec::new()));
    }
    let row = state
        .api()
        .reads()
        .session_state(server, session.hsid)
        .await
        .map_err(internal)?
        .ok_or_else(not_provokable)?;
    let (Some(account), Some(user)) = (row.account_id, row.user_digest) else {
        return Err(not_provokable());
    };
    if !row.can_provoke()
        || !countersign_api::provoke::can_receive_push(
            state.api(),
            AccountRef::new(server, account),
        )
        .await
        .map_err(internal)?
    {
        return Err(not_provokable());
    }
    if state.api().provokes().take(server, user).is_err() {
        let mut response = error_page(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many requests to your phone",
            "Your phone was asked several times just now. Wait a minute, or scan the QR code.",
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
        return Err(response);
    }
    let metadata = authorize::metadata(&pending.client_id);
    let commands = state.api().commands();
    let done = commands
        .sessions
        .provoke(
            session,
            Some(authorize::announce(&pending.client_name)),
            None,
            &metadata,
            None,
        )
        .await
        .map_err(command_failed)?;
    let Some(expires_at) = done.events.iter().find_map(|e| match e {
        SessionEvent::Provoked(p) => Some(p.expires_at.as_millis()),
        _ => None,
    }) else {
        return Err(not_provokable());
    };
    // The QR code's session is not needed any more: end it so no phone logs in on it.
    if let Err(error) = commands.sessions.end_by_server(current, &metadata).await {
        tracing::warn!(%error, %server, "the replaced login session could not be ended");
    }
    // The page's status stream must see the provoked state, not the earlier login.
    state
        .api()
        .wait_for(done.position)
        .await
        .map_err(internal)?;
    let now = state.api().clock().now().as_millis();
    let moved = PendingAuthorization {
        session_nonce: sso.session_nonce.clone(),
        issued_at: now,
        expires_at,
        ..pending
    };
    let value = cookies::seal(state, server, AUTHZ_COOKIE, &moved)
        .await
        .map_err(cookie_failed)?;
    let cookie = cookies::set_cookie(state, AUTHZ_COOKIE, &value, moved.max_age_secs(now));
    Ok(see_other(&format!("/login/{server}"), vec![cookie]))
}

async fn finish(
    State(state): State<IdpState>,
    Path(server): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match continue_login(&state, &server, &headers, &body).await {
        Ok(response) | Err(response) => response,
    }
}

async fn continue_login(
    state: &IdpState,
    server: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, Response> {
    let (server, pending, value) = posted(state, server, headers, body).await?;
    let session = session_of(state, server, &pending.session_nonce).await?;
    let row = state
        .api()
        .reads()
        .session_state(server, session.hsid)
        .await
        .map_err(internal)?;
    let Some(row) = row else {
        return Ok(see_other(&format!("/login/{server}"), Vec::new()));
    };
    match row.state.as_str() {
        "pending" | "scanned" => Ok(see_other(&format!("/login/{server}"), Vec::new())),
        "expired" => expired_page(state, server, &value).await,
        "logged_in" => Ok(issue_code(state, server, &pending, session, true).await),
        _ => Ok(authorize::client_redirect(
            state,
            server,
            &pending.redirect_uri,
            &denied(&pending),
            vec![cookies::clear_cookie(state, AUTHZ_COOKIE)],
        )),
    }
}

fn denied(pending: &PendingAuthorization) -> Vec<(&'static str, &str)> {
    let mut params = vec![
        ("error", "access_denied"),
        (
            "error_description",
            "the login was declined or failed on the phone",
        ),
    ];
    if let Some(rp_state) = pending.state.as_deref() {
        params.push(("state", rp_state));
    }
    params
}

/// Issues the code for a logged-in session and sends the browser back to the client; from
/// the page (`from_page`), also remembers the login (`cs_sso`) and clears `cs_authz`.
pub(crate) async fn issue_code(
    state: &IdpState,
    server: ServerId,
    pending: &PendingAuthorization,
    session: SessionRef,
    from_page: bool,
) -> Response {
    let Ok(client_id) = OidcClientId::parse_hex(&pending.client_id) else {
        return internal("a pending authorization names no client");
    };
    let code_challenge = match pending.code_challenge.as_deref() {
        None => None,
        Some(text) => match base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
        {
            Some(challenge) => Some(challenge),
            None => return internal("a pending authorization has a malformed challenge"),
        },
    };
    let request = CodeRequest {
        client_id,
        session,
        scope: pending.scope.clone(),
        redirect_uri: pending.redirect_uri.clone(),
        code_challenge,
        nonce: pending.nonce.clone(),
    };
    let issued = state
        .api()
        .commands()
        .grants
        .issue_code(request, &authorize::metadata(&pending.client_id))
        .await;
    let code = match issued {
        Ok((code, _, _)) => code,
        Err(error) => return command_failed(error),
    };
    let mut set = Vec::new();
    if from_page {
        let now = state.api().clock().now().as_millis();
        let sso = SsoCookie {
            session_nonce: pending.session_nonce.clone(),
            issued_at: now,
        };
        match cookies::seal(state, server, SSO_COOKIE, &sso).await {
            Ok(value) => set.push(cookies::set_cookie(
                state,
                SSO_COOKIE,
                &value,
                cookies::SSO_MAX_AGE_SECS,
            )),
            Err(error) => return cookie_failed(error),
        }
        set.push(cookies::clear_cookie(state, AUTHZ_COOKIE));
    }
    let mut params = vec![("code", code.expose())];
    if let Some(rp_state) = pending.state.as_deref() {
        params.push(("state", rp_state));
    }
    authorize::client_redirect(state, server, &pending.redirect_uri, &params, set)
}

async fn restart(
    State(state): State<IdpState>,
    Path(server): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let restarted = async {
        let (server, pending, _) = posted(&state, &server, &headers, &body).await?;
        let client = client(&state, server, &pending.client_id)
            .await?
            .filter(|c| c.redirect_uris.contains(&pending.redirect_uri))
            .ok_or_else(no_login)?;
        let request = Request {
            client,
            redirect_uri: pending.redirect_uri.clone(),
            scope: pending.scope.clone(),
            state: pending.state.clone(),
            nonce: pending.nonce.clone(),
            code_challenge: pending.code_challenge.clone(),
        };
        authorize::open_login(&state, server, request).await
    };
    match restarted.await {
        Ok(response) | Err(response) => response,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn form_action_names_the_redirect_origin_only() {
        assert_eq!(
            form_origin("https://rp.example:8443/cb?x=1"),
            " https://rp.example:8443"
        );
        assert_eq!(form_origin("not a url"), "");
    }
}
