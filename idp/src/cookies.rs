//! The browser's side of a login: sealed cookies and the CSRF tokens bound to them.
//!
//! Two cookies, both sealed with AES-256-GCM under a per-server key
//! (`secrets.derive(server, "idp-cookie", "")`), associated data = cookie name ‖ 0 ‖ server id,
//! a random 96-bit nonce each time, value `base64url(nonce ‖ ciphertext)`:
//! - `cs_authz`: the pending authorization (the RP's request and the nonce of the login session
//!   opened for it). Lives as long as that session may wait, and a little more for the
//!   "expired, start again" page.
//! - `cs_sso`: the nonce of the last session this browser logged in with, for SSO and for
//!   "send to my phone". Lives [`SSO_MAX_AGE_SECS`].
//!
//! Rules: a cookie of another server, another name, tampered or older than its lifetime opens
//! to nothing (treated as absent, never an error shown with details). The session nonce is the
//! session's bearer secret: it is only ever inside a sealed cookie, never in a URL, an event
//! or a log line; `Debug` of every type here prints none of it. Every cookie is `HttpOnly;
//! SameSite=Lax; Path=/`, plus `Secure` when the deployment is reached over https.
//!
//! CSRF token of a form = `base64url(HMAC-SHA256(derive(server, "idp-csrf", ""), cookie value))`:
//! bound to the browser's own sealed cookie, checked in constant time.

use axum::http::{HeaderMap, HeaderValue, header};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use countersign_domain::ServerId;
use hmac::{Hmac, KeyInit, Mac};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroize;

use crate::state::IdpState;

/// The pending authorization's cookie.
pub const AUTHZ_COOKIE: &str = "cs_authz";
/// The last login's cookie.
pub const SSO_COOKIE: &str = "cs_sso";
/// How long `cs_authz` outlives its session's deadline (to show "expired, start again").
pub const AUTHZ_GRACE_SECS: i64 = 600;
/// How long a browser remembers its last login at a server (`cs_sso`).
pub const SSO_MAX_AGE_SECS: i64 = 30 * 24 * 3600;
/// Longest sealed cookie value accepted or made (browsers keep 4096 bytes per cookie).
pub const MAX_COOKIE_CHARS: usize = 3900;

const NONCE_LEN: usize = 12;

/// Why a cookie or token could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CookieError {
    /// The content does not fit a cookie (the caller's request was too large: 400).
    #[error("the authorization request is too large")]
    TooLarge,
    /// Our failure (500; the cause is logged, never shown).
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<countersign_commands::CommandError> for CookieError {
    fn from(e: countersign_commands::CommandError) -> Self {
        Self::Internal(e.to_string())
    }
}

/// A login session's nonce (its bearer secret). `Debug` prints nothing; zeroized on drop.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionNonce(String);

impl SessionNonce {
    /// A fresh nonce: 32 random bytes, base64url.
    pub fn random() -> Result<Self, CookieError> {
        let mut bytes = [0u8; 32];
        countersign_commands::random_bytes(&mut bytes)?;
        let nonce = URL_SAFE_NO_PAD.encode(bytes);
        bytes.zeroize();
        Ok(Self(nonce))
    }

    /// The nonce, for deriving the session's id.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Drop for SessionNonce {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for SessionNonce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionNonce(..)")
    }
}

/// What `cs_authz` holds: the relying party's checked request and the session opened for it.
#[derive(Clone, Serialize, Deserialize)]
pub struct PendingAuthorization {
    /// The login session's nonce.
    #[serde(rename = "n")]
    pub session_nonce: SessionNonce,
    #[serde(rename = "c")]
    pub client_id: String,
    /// Shown on the page ("Log in to …").
    #[serde(rename = "cn")]
    pub client_name: String,
    /// Registered for the client, matched exactly.
    #[serde(rename = "r")]
    pub redirect_uri: String,
    /// Granted scopes (requested ∩ allowed, `openid` first).
    #[serde(rename = "sc")]
    pub scope: Vec<String>,
    /// The RP's `state`, returned verbatim.
    #[serde(rename = "st", default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The RP's OIDC `nonce`, returned verbatim in the ID token.
    #[serde(rename = "on", default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// The PKCE S256 challenge (base64url of 32 bytes).
    #[serde(rename = "cc", default, skip_serializing_if = "Option::is_none")]
    pub code_challenge: Option<String>,
    /// When the cookie was made, ms since the epoch.
    #[serde(rename = "i")]
    pub issued_at: i64,
    /// When the session stops waiting for the phone, ms since the epoch.
    #[serde(rename = "e")]
    pub expires_at: i64,
}

impl std::fmt::Debug for PendingAuthorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingAuthorization")
            .field("client_id", &self.client_id)
            .field("scope", &self.scope)
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// A cookie's content that expires: [`read_open`] answers only what is within its lifetime.
pub trait Fresh {
    /// Whether `now` (ms) is within the cookie's lifetime.
    fn is_fresh(&self, now: i64) -> bool;
}

impl Fresh for PendingAuthorization {
    fn is_fresh(&self, now: i64) -> bool {
        now >= self.issued_at.saturating_sub(60_000)
            && now <= self.expires_at.saturating_add(AUTHZ_GRACE_SECS * 1000)
    }
}

impl Fresh for SsoCookie {
    fn is_fresh(&self, now: i64) -> bool {
        now >= self.issued_at.saturating_sub(60_000)
            && now <= self.issued_at.saturating_add(SSO_MAX_AGE_SECS * 1000)
    }
}

impl PendingAuthorization {
    /// The cookie's `Max-Age` from `now` (ms).
    pub fn max_age_secs(&self, now: i64) -> i64 {
        (self.expires_at.saturating_sub(now) / 1000 + AUTHZ_GRACE_SECS).max(1)
    }
}

/// What `cs_sso` holds: the session this browser last logged in with.
#[derive(Clone, Serialize, Deserialize)]
pub struct SsoCookie {
    #[serde(rename = "n")]
    pub session_nonce: SessionNonce,
    /// When the login was completed (the code issued), ms since the epoch.
    #[serde(rename = "i")]
    pub issued_at: i64,
}

impl std::fmt::Debug for SsoCookie {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SsoCookie")
            .field("issued_at", &self.issued_at)
            .finish_non_exhaustive()
    }
}

fn aad(name: &str, server: ServerId) -> Vec<u8> {
    let mut aad = Vec::with_capacity(name.len() + 1 + 16);
    aad.extend_from_slice(name.as_bytes());
    aad.push(0);
    aad.extend_from_slice(server.as_bytes());
    aad
}

async fn cipher(state: &IdpState, server: ServerId) -> Result<aes_gcm::Aes256Gcm, CookieError> {
    let mut key = state
        .api()
        .commands()
        .secrets
        .derive(server, "idp-cookie", b"")
        .await?;
    let cipher = <aes_gcm::Aes256Gcm as aes_gcm::aead::KeyInit>::new(&key.into());
    key.zeroize();
    Ok(cipher)
}

/// Seals `content` as the value of cookie `name` at `server`.
///
/// # Errors
/// [`CookieError::TooLarge`] when the value would not fit a cookie; `Internal` otherwise.
pub async fn seal<T: Serialize>(
    state: &IdpState,
    server: ServerId,
    name: &str,
    content: &T,
) -> Result<String, CookieError> {
    use aes_gcm::aead::{Aead, Payload};
    let mut plain =
        serde_json::to_vec(content).map_err(|e| CookieError::Internal(e.to_string()))?;
    let mut nonce = [0u8; NONCE_LEN];
    countersign_commands::random_bytes(&mut nonce)?;
    let sealed = cipher(state, server)
        .await?
        .encrypt(
            &aes_gcm::Nonce::from(nonce),
            Payload {
                msg: &plain,
                aad: &aad(name, server),
            },
        )
        .map_err(|_| CookieError::Internal("AES-GCM refused to seal a cookie".into()));
    plain.zeroize();
    let mut bytes = nonce.to_vec();
    bytes.extend_from_slice(&sealed?);
    let value = URL_SAFE_NO_PAD.encode(&bytes);
    if value.len() > MAX_COOKIE_CHARS {
        return Err(CookieError::TooLarge);
    }
    Ok(value)
}

/// Opens the value of cookie `name` at `server`; `None` for anything that is not a cookie this
/// server sealed under this name (tampered, another server's, garbage).
pub async fn open<T: DeserializeOwned>(
    state: &IdpState,
    server: ServerId,
    name: &str,
    value: &str,
) -> Option<T> {
    use aes_gcm::aead::{Aead, Payload};
    if value.len() > MAX_COOKIE_CHARS {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(value).ok()?;
    let (nonce, ciphertext) = bytes.split_at_checked(NONCE_LEN)?;
    let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
    let cipher = match cipher(state, server).await {
        Ok(cipher) => cipher,
        Err(error) => {
            tracing::warn!(%error, %server, "no cookie key");
            return None;
        }
    };
    let mut plain = cipher
        .decrypt(
            &aes_gcm::Nonce::from(nonce),
            Payload {
                msg: ciphertext,
                aad: &aad(name, server),
            },
        )
        .ok()?;
    let content = serde_json::from_slice(&plain).ok();
    plain.zeroize();
    content
}

/// The value of cookie `name` in the request's `Cookie` headers (the first one).
pub fn read<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.trim().trim_matches('"'))
        .filter(|v| !v.is_empty())
}

/// Reads and opens cookie `name`; one past its lifetime (by the server's clock) is none.
pub async fn read_open<T: DeserializeOwned + Fresh>(
    state: &IdpState,
    server: ServerId,
    headers: &HeaderMap,
    name: &str,
) -> Option<(T, String)> {
    let value = read(headers, name)?;
    let content: T = open(state, server, name, value).await?;
    content
        .is_fresh(state.api().clock().now().as_millis())
        .then(|| (content, value.to_owned()))
}

/// A `Set-Cookie` value for `name=value` kept `max_age_secs`.
pub fn set_cookie(state: &IdpState, name: &str, value: &str, max_age_secs: i64) -> HeaderValue {
    let secure = if state.config().secure_cookies() {
        "; Secure"
    } else {
        ""
    };
    let text = format!(
        "{name}={value}; Max-Age={}; Path=/; HttpOnly; SameSite=Lax{secure}",
        max_age_secs.max(0)
    );
    // Names are ours and values base64url: always a valid header value.
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// A `Set-Cookie` value that removes cookie `name`.
pub fn clear_cookie(state: &IdpState, name: &str) -> HeaderValue {
    set_cookie(state, name, "", 0)
}

async fn csrf_mac(
    state: &IdpState,
    server: ServerId,
    cookie_value: &str,
) -> Result<Hmac<Sha256>, CookieError> {
    let mut key = state
        .api()
        .commands()
        .secrets
        .derive(server, "idp-csrf", b"")
        .await?;
    let mac = Hmac::<Sha256>::new_from_slice(&key)
        .map_err(|_| CookieError::Internal("HMAC refused a 32-byte key".into()));
    key.zeroize();
    let mut mac = mac?;
    mac.update(cookie_value.as_bytes());
    Ok(mac)
}

/// The CSRF token of forms posted with cookie value `cookie_value`.
pub async fn csrf_token(
    state: &IdpState,
    server: ServerId,
    cookie_value: &str,
) -> Result<String, CookieError> {
    let mac = csrf_mac(state, server, cookie_value).await?;
    Ok(URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
}

/// Whether `token` is the CSRF token of `cookie_value` (constant time).
pub async fn csrf_ok(
    state: &IdpState,
    server: ServerId,
    cookie_value: &str,
    token: Option<&str>,
) -> Result<bool, CookieError> {
    let Some(token) = token else {
        return Ok(false);
    };
    let Ok(given) = URL_SAFE_NO_PAD.decode(token) else {
        return Ok(false);
    };
    let mac = csrf_mac(state, server, cookie_value).await?;
    Ok(mac.verify_slice(&given).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_exact_name() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("cs_authz_x=1; cs_authz=abc; other=2"),
        );
        headers.append(header::COOKIE, HeaderValue::from_static("cs_sso=def"));
        assert_eq!(read(&headers, AUTHZ_COOKIE), Some("abc"));
        assert_eq!(read(&headers, SSO_COOKIE), Some("def"));
        assert_eq!(read(&headers, "missing"), None);
    }

    #[test]
    fn debug_prints_no_nonce() {
        let nonce = SessionNonce::random().unwrap();
        let sso = SsoCookie {
            session_nonce: nonce.clone(),
            issued_at: 1,
        };
        assert!(!format!("{nonce:?}{sso:?}").contains(nonce.expose()));
        assert_eq!(nonce.expose().len(), 43);
    }

    #[test]
    fn freshness_has_bounds_on_both_sides() {
        let pending = PendingAuthorization {
            session_nonce: SessionNonce::random().unwrap(),
            client_id: "c".into(),
            client_name: "n".into(),
            redirect_uri: "https://rp/cb".into(),
            scope: vec!["openid".into()],
            state: None,
            nonce: None,
            code_challenge: None,
            issued_at: 1_000_000,
            expires_at: 1_300_000,
        };
        assert!(pending.is_fresh(1_000_000));
        assert!(pending.is_fresh(1_300_000 + AUTHZ_GRACE_SECS * 1000));
        assert!(!pending.is_fresh(1_300_001 + AUTHZ_GRACE_SECS * 1000));
        assert!(!pending.is_fresh(1_000_000 - 60_001));
    }
}
