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
pub mod state;
pub mod tokens;
pub mod userinfo;

pub use state::{IdpConfig, IdpState};

/// Every IdP route, ready to merge into the server's router or to drive with `oneshot`.
pub fn router(state: IdpState) -> axum::Router {
    axum::Router::new()
        .merge(discovery::routes())
        .merge(tokens::routes())
        .merge(userinfo::routes())
        .merge(introspect::routes())
        .merge(authorize::routes())
        .merge(login_page::routes())
        .merge(end_session::routes())
        .merge(ciba::routes())
        .with_state(state)
}
