//! RP-initiated logout, `GET|POST /oidc/{server_id}/end_session` (OpenID Connect RP-Initiated
//! Logout 1.0): the relying party sends the browser here to end the login on the phone too.
//!
//! - With `id_token_hint`: an ID token this server signed (its signature checked against the
//!   server's keys, its expiry ignored as the spec allows), `iss` this issuer; `client_id`, if
//!   given, must be its `aud`. Its `sid` names the phone's session, which is ended
//!   (`commands.sessions.end_by_server`: the phone is logged out, back-channel logouts
//!   follow). `post_logout_redirect_uri` must be registered, exactly, by the token's client;
//!   a wrong one is a 400 page and nothing is ended or sent anywhere.
//! - Without a hint: a confirmation page (a POST with the CSRF token of `cs_sso`) ends the
//!   session `cs_sso` names; `post_logout_redirect_uri` then needs `client_id` and the same
//!   registration.
//!
//! Either way `cs_sso` is cleared, then the browser goes to `post_logout_redirect_uri` (with
//! `state`) or sees a "logged out" page.

// Every step answers a page, whether it went on or not: `Err(Response)` is the early page.
#![allow(clippy::result_large_err)]

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use countersign_commands::CommandError;
use countersign_domain::{Hsid, ServerId, SessionRef};

use crate::authorize::{self, Params};
use crate::cookies::{self, SSO_COOKIE, SsoCookie};
use crate::login_page::{self, Client, error_page, escape, see_other};
use crate::state::IdpState;

/// This module's routes.
pub(crate) fn routes() -> Router<IdpState> {
    Router::new().route("/oidc/{server_id}/end_session", get(end_get).post(end_post))
}

async fn end_get(
    State(state): State<IdpState>,
    Path(server): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let params = Params::parse(query.unwrap_or_default().as_bytes());
    match end_session(&state, &server, &params, &headers, false).await {
        Ok(response) | Err(response) => response,
    }
}

async fn end_post(
    State(state): State<IdpState>,
    Path(server): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match end_session(&state, &server, &Params::parse(&body), &headers, true).await {
        Ok(response) | Err(response) => response,
    }
}

fn invalid(message: &str) -> Response {
    error_page(
        StatusCode::BAD_REQUEST,
        "This logout cannot be done",
        message,
    )
}

/// What a verified `id_token_hint` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hint {
    /// The client (`aud`).
    pub client_id: String,
    /// The phone's session (`sid`).
    pub session: Option<SessionRef>,
}

/// Verifies `token` as an ID token of `server` (expiry ignored); `None` when it is not one.
async fn verify_hint(state: &IdpState, server: ServerId, token: &str) -> Option<Hint> {
    let claims = crate::jwt::verify_for(state, server, token).await.ok()?;
    let client_id = match claims.get("aud")? {
        serde_json::Value::String(aud) => aud.clone(),
        serde_json::Value::Array(auds) => match auds.as_slice() {
            [only] => only.as_str()?.to_owned(),
            _ => claims.get("azp")?.as_str()?.to_owned(),
        },
        _ => return None,
    };
    let session = claims
        .get("sid")
        .and_then(serde_json::Value::as_str)
        .and_then(|sid| sid_session(server, sid));
    Some(Hint { client_id, session })
}

/// The session a `sid` claim names (base64url of the hsid).
pub(crate) fn sid_session(server: ServerId, sid: &str) -> Option<SessionRef> {
    let bytes: [u8; 32] = URL_SAFE_NO_PAD.decode(sid).ok()?.try_into().ok()?;
    Some(SessionRef::new(server, Hsid::from_bytes(bytes)))
}

async fn end_session(
    state: &IdpState,
    server: &str,
    params: &Params,
    headers: &HeaderMap,
    posted: bool,
) -> Result<Response, Response> {
    let server = ServerId::parse_hex(server).map_err(|_| login_page::no_such_server())?;
    let one = |name: &str| {
        params
            .one(name)
            .map_err(|()| invalid("A parameter is repeated."))
    };
    let hint = one("id_token_hint")?;
    let client_id = one("client_id")?;
    let redirect = one("post_logout_redirect_uri")?;
    let rp_state = one("state")?;
    let (client_id, session) = match hint {
        Some(token) => {
            let hint = verify_hint(state, server, token)
                .await
                .ok_or_else(|| invalid("The ID token given is not one this service issued."))?;
            if client_id.is_some_and(|c| c != hint.client_id) {
                return Err(invalid("client_id is not the ID token's audience."));
            }
            (Some(hint.client_id), hint.session)
        }
        None => (client_id.map(str::to_owned), None),
    };
    let redirect = match redirect {
        None => None,
        Some(uri) => {
            let client = match client_id.as_deref() {
                Some(id) => login_page::client(state, server, id).await?,
                None => None,
            };
            if !client
                .as_ref()
                .is_some_and(|c: &Client| c.post_logout_redirect_uris.iter().any(|r| r == uri))
            {
                return Err(invalid(
                    "The address to return to is not one the application registered. \
                     Nothing was ended and nothing was sent to it.",
                ));
            }
            Some(uri.to_owned())
        }
    };
    let actor = authorize::metadata(client_id.as_deref().unwrap_or("end-session"));
    let sso = cookies::read_open::<SsoCookie>(state, server, headers, SSO_COOKIE).await;
    let session = match session {
        Some(session) => Some(session),
        None if hint.is_some() => None,
        None => {
            // No hint: only the browser's own login, after it confirmed.
            let Some((sso, value)) = sso else {
                return Ok(done(state, redirect.as_deref(), rp_state));
            };
            let confirmed = posted && one("confirm")? == Some("yes");
            if !confirmed {
                return confirm_page(state, server, params, &value).await;
            }
            let token = one("csrf")?;
            if !cookies::csrf_ok(state, server, &value, token)
                .await
                .map_err(login_page::cookie_failed)?
            {
                return Err(error_page(
                    StatusCode::FORBIDDEN,
                    "This form cannot be used",
                    "The logout form was not sent by this service.",
                ));
            }
            Some(
                state
                    .api()
                    .commands()
                    .sessions
                    .session_ref(server, sso.session_nonce.expose())
                    .await
                    .map_err(login_page::command_failed)?,
            )
        }
    };
    if let Some(session) = session {
        match state
            .api()
            .commands()
            .sessions
            .end_by_server(session, &actor)
            .await
        {
            // Already over (or never there): nothing more to end.
            Ok(_) | Err(CommandError::Rejected { .. }) => {}
            Err(error) => return Err(login_page::internal(error)),
        }
    }
    Ok(done(state, redirect.as_deref(), rp_state))
}

/// Clears `cs_sso`, then redirects or shows the "logged out" page.
fn done(state: &IdpState, redirect: Option<&str>, rp_state: Option<&str>) -> Response {
    let clear = cookies::clear_cookie(state, SSO_COOKIE);
    if let Some(uri) = redirect
        && let Ok(mut url) = url::Url::parse(uri)
    {
        if let Some(rp_state) = rp_state {
            url.query_pairs_mut().append_pair("state", rp_state);
        }
        return see_other(url.as_str(), vec![clear]);
    }
    let mut response = error_page(
        StatusCode::OK,
        "You are logged out",
        "The login has ended, on your phone too. You can close this page.",
    );
    response
        .headers_mut()
        .append(axum::http::header::SET_COOKIE, clear);
    response
}

async fn confirm_page(
    state: &IdpState,
    server: ServerId,
    params: &Params,
    cookie_value: &str,
) -> Result<Response, Response> {
    let csrf = cookies::csrf_token(state, server, cookie_value)
        .await
        .map_err(login_page::cookie_failed)?;
    let mut hidden = String::new();
    for name in ["client_id", "post_logout_redirect_uri", "state"] {
        if let Ok(Some(value)) = params.one(name) {
            hidden.push_str(&format!(
                "<input type=\"hidden\" name=\"{name}\" value=\"{}\">",
                escape(value)
            ));
        }
    }
    let body = format!(
        "<h1>Log out?</h1><p>This ends your login here, on your phone too.</p>\
         <form method=\"post\" action=\"/oidc/{server}/end_session\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <input type=\"hidden\" name=\"confirm\" value=\"yes\">{hidden}\
         <button type=\"submit\">Log out</button></form>"
    );
    Ok(login_page::page_with_form(
        StatusCode::OK,
        "Log out?",
        &body,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sid_names_a_session_of_its_server_only() {
        let server = ServerId::from_bytes([7; 16]);
        let sid = URL_SAFE_NO_PAD.encode([9u8; 32]);
        let session = sid_session(server, &sid).unwrap();
        assert_eq!(session.server_id, server);
        assert_eq!(session.hsid.as_bytes(), &[9u8; 32]);
        assert!(sid_session(server, "short").is_none());
    }
}
