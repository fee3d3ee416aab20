//! The web face of a virtual server: an OpenID Connect provider per server (discovery, JWKS,
//! authorization code with PKCE, refresh, userinfo, revocation, introspection, RP-initiated
//! and back-channel logout, CIBA in poll and ping modes) and the hosted login page that shows
//! the QR code, the deep link and the "send to my phone" button (docs/oidc.md).
//!
//! The IdP is a business system inside the server: a browser login opens an ordinary login
//! session with a nonce only the IdP knows, a CIBA request a push login; once the phone has
//! logged in, a grant (its own event stream, `grant-{server}-{grant}`) records the code and
//! every token issued from it. Tokens are `base64url(grant id ‖ secret)`; the log keeps only
//! SHA-256 of each secret, so no code, token or client secret is ever in an event or a log line.
//!
//! Routes, per server (`{server_id}`, 32 hex digits):
//! - `/oidc/{server_id}/.well-known/openid-configuration`, `…/.well-known/oauth-authorization-server`,
//!   `…/jwks`, `…/authorize`, `…/token`, `…/userinfo`, `…/revoke`, `…/introspect`,
//!   `…/end_session`, `…/bc-authorize`;
//! - `/login/{server_id}` (the hosted page), `…/qr.png`, `…/events`, `…/provoke`, `…/continue`.

pub mod authorize;
pub mod backchannel;
pub mod ciba;
pub mod client_auth;
pub mod cookies;
pub mod discovery;
pub mod end_session;
pub mod error;
pub mod introspect;
pub mod jwt;
pub mod keys;
pub mod login_page;
pub mod openapi;
pub mod state;
pub mod tokens;
pub mod userinfo;

pub use state::{IdpConfig, IdpState};

/// Largest request body an IdP endpoint takes (forms and JSON are small).
pub const BODY_LIMIT: usize = 16 * 1024;

/// Longest an IdP request may take before it answers 408 (event streams once started
/// excepted).
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Every IdP route, ready to merge into the server's router or to drive with `oneshot`. The
/// business API's guards apply here too: a bounded head and body, a timeout, request ids, and
/// the request metrics (by matched route, so no code or token in a label).
pub fn router(state: IdpState) -> axum::Router {
    use axum::extract::DefaultBodyLimit;
    use axum::http::StatusCode;
    use countersign_api::{REQUEST_ID, error, metrics};
    use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
    use tower_http::timeout::TimeoutLayer;

    let api = state.api().clone();
    axum::Router::new()
        .merge(discovery::routes())
        .merge(tokens::routes())
        .merge(userinfo::routes())
        .merge(introspect::routes())
        .merge(authorize::routes())
        .merge(login_page::routes())
        .merge(end_session::routes())
        .merge(ciba::routes())
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            BODY_LIMIT,
            error::refuse_oversize_body,
        ))
        .layer(axum::middleware::from_fn(error::refuse_oversize_head))
        .layer(axum::middleware::from_fn_with_state(api, metrics::track))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(state)
}
