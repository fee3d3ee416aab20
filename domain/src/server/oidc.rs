//! OIDC clients (relying parties) and OIDC signing keys of a server.
//!
//! A server is its own OpenID Provider (issuer `…/oidc/{server_id}`); the clients allowed to
//! use it and the public halves of its token-signing keys live on the server aggregate, next
//! to its API keys. Rules enforced here (through [`super::Server::decide`]):
//! - a client's name is 1..=100 characters without control characters;
//! - every URL (redirect, post-logout redirect, back-channel logout, CIBA notification) is
//!   absolute, at most [`OIDC_URL_MAX_BYTES`], without a fragment or userinfo, and `https`, or
//!   `http` only for a loopback host (`127.0.0.1`, `[::1]`, `localhost`), as OAuth 2.0 for
//!   native apps (RFC 8252 §7.3) allows; a list holds at most [`MAX_URIS`] distinct URLs;
//! - a client has at least one redirect URI unless it is a CIBA-only client;
//! - scopes are distinct, drawn from [`OIDC_SCOPES`], and include `openid`;
//! - a public client has no secret and cannot use CIBA; a confidential client always has a
//!   secret (only its SHA-256 reaches the log); CIBA ping mode needs a notification
//!   endpoint, poll mode has none;
//! - at most [`MAX_OIDC_CLIENTS`] clients; an id is never reused (even after removal); a
//!   client's type never changes; an update that changes nothing emits nothing; a removed or
//!   unknown client is [`ServerError::OidcClientNotFound`];
//! - a signing key is a valid P-256 point whose `kid` is its RFC 7638 thumbprint; rotating to
//!   a key already recorded emits nothing.

use serde::{Deserialize, Serialize};

use super::{ActiveServer, ServerError, ServerEvent};
use crate::aggregate::Context;
use crate::ids::{OidcClientId, Timestamp};
use crate::validate::{self, ValidationError};

/// Most OIDC clients a server may have at once (removed ones do not count).
pub const MAX_OIDC_CLIENTS: usize = 100;
/// Most URLs in one list of a client (redirect URIs, post-logout redirect URIs).
pub const MAX_URIS: usize = 10;
/// Longest accepted client URL, in bytes.
pub const OIDC_URL_MAX_BYTES: usize = 2048;
/// Longest client name, in characters.
pub const CLIENT_NAME_MAX_CHARS: usize = 100;
/// The scopes a client may be allowed.
pub const OIDC_SCOPES: &[&str] = &[
    "openid",
    "profile",
    "email",
    "phone",
    "groups",
    "offline_access",
];

/// Whether a client can keep a secret (RFC 6749 §2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OidcClientKind {
    /// A browser or native app: no secret, PKCE required, no CIBA.
    Public,
    /// A server-side app with a client secret.
    Confidential,
}

/// How a CIBA client learns that the user decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CibaMode {
    /// The client polls the token endpoint.
    Poll,
    /// The provider calls the client's notification endpoint, then the client fetches.
    Ping,
}

/// A client's CIBA settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CibaSettings {
    /// Poll or ping.
    pub mode: CibaMode,
    /// Where ping notifications go: required in ping mode, absent in poll mode.
    pub notification_endpoint: Option<String>,
}

/// Everything registered about a client except its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OidcClientSettings {
    /// Shown on the login page: 1..=100 characters, no control characters.
    pub name: String,
    /// Public or confidential; fixed at registration.
    pub kind: OidcClientKind,
    /// Exact redirect URIs (0..=10; empty only for a CIBA-only client).
    pub redirect_uris: Vec<String>,
    /// Where RP-initiated logout may return to (0..=10).
    pub post_logout_redirect_uris: Vec<String>,
    /// The scopes the client may ask for (always includes `openid`).
    pub scopes: Vec<String>,
    /// OIDC Back-Channel Logout endpoint, if the client wants logout tokens.
    pub backchannel_logout_uri: Option<String>,
    /// CIBA, if the client uses it (confidential clients only).
    pub ciba: Option<CibaSettings>,
}

/// `server.oidc_client_registered` v1: a client exists. A confidential client's secret is
/// recorded as its SHA-256 only (the secret has 256 random bits, so it needs no salt).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OidcClientRegistered {
    /// The `client_id`.
    pub client_id: OidcClientId,
    /// The registered settings.
    pub settings: OidcClientSettings,
    /// SHA-256 of the client secret; `None` for a public client.
    #[serde(with = "serde_bytes")]
    pub secret_hash: Option<[u8; 32]>,
}

/// `server.oidc_client_updated` v1: the client's settings after a change, in full.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OidcClientUpdated {
    /// The client.
    pub client_id: OidcClientId,
    /// The resulting settings.
    pub settings: OidcClientSettings,
}

/// `server.oidc_client_secret_rotated` v1: the old secret stops authenticating.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OidcClientSecretRotated {
    /// The client.
    pub client_id: OidcClientId,
    /// SHA-256 of the new secret.
    #[serde(with = "serde_bytes")]
    pub secret_hash: [u8; 32],
}

/// `server.oidc_client_removed` v1: the client can no longer log anyone in; its id stays
/// taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OidcClientRemoved {
    /// The client.
    pub client_id: OidcClientId,
}

/// `server.oidc_key_rotated` v1: a new token-signing key; from now on it signs. The private
/// key is in the vault under `server/{id}/oidc-key/{kid}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OidcKeyRotated {
    /// RFC 7638 JWK thumbprint of the key, base64url without padding.
    pub kid: String,
    /// SEC1 uncompressed P-256 public key (65 bytes).
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
    /// When it became the signing key.
    pub rotated_at: Timestamp,
}

/// Register a client. The edge made the id and, for a confidential client, the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterOidcClient {
    /// The new client's id.
    pub client_id: OidcClientId,
    /// Its settings.
    pub settings: OidcClientSettings,
    /// SHA-256 of its secret: `Some` exactly for a confidential client.
    pub secret_hash: Option<[u8; 32]>,
}

/// Change some of a client's settings; `None` leaves a field as it is. The type cannot change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateOidcClient {
    /// The client.
    pub client_id: OidcClientId,
    /// New name.
    pub name: Option<String>,
    /// New redirect URIs, in full.
    pub redirect_uris: Option<Vec<String>>,
    /// New post-logout redirect URIs, in full.
    pub post_logout_redirect_uris: Option<Vec<String>>,
    /// New allowed scopes, in full.
    pub scopes: Option<Vec<String>>,
    /// `Some(None)` removes the back-channel logout URI.
    pub backchannel_logout_uri: Option<Option<String>>,
    /// `Some(None)` turns CIBA off.
    pub ciba: Option<Option<CibaSettings>>,
}

/// Replace a confidential client's secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotateOidcClientSecret {
    /// The client.
    pub client_id: OidcClientId,
    /// SHA-256 of the new secret.
    pub secret_hash: [u8; 32],
}

/// Remove a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoveOidcClient {
    /// The client.
    pub client_id: OidcClientId,
}

/// Make a new signing key current. The edge made the key pair and stored the private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotateOidcKey {
    /// SEC1 P-256 public key, compressed or uncompressed.
    pub public_key: Vec<u8>,
}

/// What the write model keeps of a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcClientState {
    /// Current settings.
    pub settings: OidcClientSettings,
    /// Removed: the id stays taken, every command on it is `OidcClientNotFound`.
    pub removed: bool,
}

/// Why a client's settings were refused (HTTP 422). Messages never repeat the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OidcClientError {
    /// A URL breaks the rules (see the module docs).
    #[error("{field}: {problem}")]
    Url {
        /// The field.
        field: &'static str,
        /// What is wrong.
        problem: UrlProblem,
    },
    /// A list is longer than allowed.
    #[error("{field} may hold at most {max} entries")]
    TooMany {
        /// The field.
        field: &'static str,
        /// The limit.
        max: usize,
    },
    /// A list names the same value twice.
    #[error("{field} must not repeat an entry")]
    Duplicate {
        /// The field.
        field: &'static str,
    },
    /// A client that does not use CIBA needs somewhere to send the browser back to.
    #[error("redirect_uris must hold at least one URI (only a CIBA client may have none)")]
    NoRedirectUri,
    /// A scope outside [`OIDC_SCOPES`].
    #[error("scopes may only contain openid, profile, email, phone, groups and offline_access")]
    UnknownScope,
    /// `openid` is missing from the scopes.
    #[error("scopes must contain openid")]
    MissingOpenid,
    /// A public client asked for CIBA, which needs client authentication.
    #[error("a public client cannot use CIBA")]
    PublicCiba,
    /// CIBA ping mode without a notification endpoint.
    #[error("ciba.notification_endpoint is required in ping mode")]
    PingWithoutEndpoint,
    /// CIBA poll mode with a notification endpoint, which it would never use.
    #[error("ciba.notification_endpoint is only used in ping mode")]
    PollWithEndpoint,
    /// A public client with a secret, or a confidential one without (the edge's mistake).
    #[error("a confidential client has a secret and a public client has none")]
    SecretMismatch,
    /// A public client has no secret to rotate.
    #[error("a public client has no secret")]
    PublicSecret,
}

/// What is wrong with a URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UrlProblem {
    /// Longer than [`OIDC_URL_MAX_BYTES`].
    #[error("a URL must be at most 2048 bytes")]
    TooLong,
    /// Not an absolute URL with a host (or has spaces or control characters).
    #[error("not an absolute URL without spaces or control characters")]
    Malformed,
    /// Neither `https` nor loopback `http`.
    #[error("a URL must use https (http only for 127.0.0.1, [::1] or localhost)")]
    Scheme,
    /// Has a `#fragment`.
    #[error("a URL must not have a fragment")]
    Fragment,
    /// Has `user:password@`.
    #[error("a URL must not contain a user name or password")]
    Userinfo,
}

/// Checks one client URL (see the module docs).
///
/// # Errors
/// [`OidcClientError::Url`] naming `field`.
pub fn check_url(field: &'static str, text: &str) -> Result<(), OidcClientError> {
    let problem = |problem| OidcClientError::Url { field, problem };
    if text.len() > OIDC_URL_MAX_BYTES {
        return Err(problem(UrlProblem::TooLong));
    }
    // The parser would quietly drop or escape these; the URL is compared as written, so what
    // is registered must be exactly what a client sends.
    if text.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(problem(UrlProblem::Malformed));
    }
    let url = url::Url::parse(text).map_err(|_| problem(UrlProblem::Malformed))?;
    let Some(host) = url.host() else {
        return Err(problem(UrlProblem::Malformed));
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err(problem(UrlProblem::Userinfo));
    }
    if url.fragment().is_some() || text.contains('#') {
        return Err(problem(UrlProblem::Fragment));
    }
    let loopback = match host {
        url::Host::Domain(name) => name.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => ip == std::net::Ipv4Addr::LOCALHOST,
        url::Host::Ipv6(ip) => ip == std::net::Ipv6Addr::LOCALHOST,
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(problem(UrlProblem::Scheme)),
    }
}

fn check_urls(field: &'static str, urls: &[String]) -> Result<(), OidcClientError> {
    if urls.len() > MAX_URIS {
        return Err(OidcClientError::TooMany {
            field,
            max: MAX_URIS,
        });
    }
    for (i, url) in urls.iter().enumerate() {
        check_url(field, url)?;
        if urls.get(..i).is_some_and(|before| before.contains(url)) {
            return Err(OidcClientError::Duplicate { field });
        }
    }
    Ok(())
}

/// Checks a client's settings as a whole.
///
/// # Errors
/// [`ServerError::Invalid`] for the name, [`ServerError::OidcClient`] for the rest.
pub fn validate_client(settings: &OidcClientSettings) -> Result<(), ServerError> {
    validate::display_text("name", &settings.name, CLIENT_NAME_MAX_CHARS)?;
    check_urls("redirect_uris", &settings.redirect_uris)?;
    check_urls(
        "post_logout_redirect_uris",
        &settings.post_logout_redirect_uris,
    )?;
    if let Some(uri) = &settings.backchannel_logout_uri {
        check_url("backchannel_logout_uri", uri)?;
    }
    if settings.scopes.len() > OIDC_SCOPES.len() {
        return Err(OidcClientError::TooMany {
            field: "scopes",
            max: OIDC_SCOPES.len(),
        }
        .into());
    }
    for (i, scope) in settings.scopes.iter().enumerate() {
        if !OIDC_SCOPES.contains(&scope.as_str()) {
            return Err(OidcClientError::UnknownScope.into());
        }
        if settings
            .scopes
            .get(..i)
            .is_some_and(|before| before.contains(scope))
        {
            return Err(OidcClientError::Duplicate { field: "scopes" }.into());
        }
    }
    if !settings.scopes.iter().any(|s| s == "openid") {
        return Err(OidcClientError::MissingOpenid.into());
    }
    match &settings.ciba {
        None if settings.redirect_uris.is_empty() => {
            return Err(OidcClientError::NoRedirectUri.into());
        }
        None => {}
        Some(_) if settings.kind == OidcClientKind::Public => {
            return Err(OidcClientError::PublicCiba.into());
        }
        Some(ciba) => match (ciba.mode, &ciba.notification_endpoint) {
            (CibaMode::Ping, None) => return Err(OidcClientError::PingWithoutEndpoint.into()),
            (CibaMode::Ping, Some(url)) => check_url("ciba.notification_endpoint", url)?,
            (CibaMode::Poll, Some(_)) => return Err(OidcClientError::PollWithEndpoint.into()),
            (CibaMode::Poll, None) => {}
        },
    }
    Ok(())
}

/// The `kid` of a P-256 key: its RFC 7638 JWK thumbprint, base64url without padding (the
/// SHA-256 of `{"crv":"P-256","kty":"EC","x":…,"y":…}`). `None` when `sec1` is not a point.
#[must_use]
pub fn oidc_kid(sec1: &[u8]) -> Option<String> {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use p256::elliptic_curve::sec1::ToSec1Point as _;
    use sha2::Digest as _;

    let key = p256::PublicKey::from_sec1_bytes(sec1).ok()?;
    let point = key.as_affine().to_sec1_point(false);
    let (x, y) = (point.x()?, point.y()?);
    let jwk = format!(
        r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(x),
        URL_SAFE_NO_PAD.encode(y)
    );
    Some(URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(jwk.as_bytes())))
}

fn live_client(
    server: &ActiveServer,
    client_id: OidcClientId,
) -> Result<&OidcClientState, ServerError> {
    server
        .oidc_clients
        .get(&client_id)
        .filter(|c| !c.removed)
        .ok_or(ServerError::OidcClientNotFound)
}

pub(super) fn decide_register(
    server: &ActiveServer,
    cmd: RegisterOidcClient,
) -> Result<Vec<ServerEvent>, ServerError> {
    validate_client(&cmd.settings)?;
    let confidential = cmd.settings.kind == OidcClientKind::Confidential;
    if confidential != cmd.secret_hash.is_some() {
        return Err(OidcClientError::SecretMismatch.into());
    }
    if server.oidc_clients.contains_key(&cmd.client_id) {
        return Err(ServerError::OidcClientExists);
    }
    let live = server.oidc_clients.values().filter(|c| !c.removed).count();
    if live >= MAX_OIDC_CLIENTS {
        return Err(ServerError::TooManyOidcClients {
            max: MAX_OIDC_CLIENTS,
        });
    }
    Ok(vec![ServerEvent::OidcClientRegistered(
        OidcClientRegistered {
            client_id: cmd.client_id,
            settings: cmd.settings,
            secret_hash: cmd.secret_hash,
        },
    )])
}

pub(super) fn decide_update(
    server: &ActiveServer,
    cmd: UpdateOidcClient,
) -> Result<Vec<ServerEvent>, ServerError> {
    let current = &live_client(server, cmd.client_id)?.settings;
    let mut settings = current.clone();
    if let Some(name) = cmd.name {
        settings.name = name;
    }
    if let Some(uris) = cmd.redirect_uris {
        settings.redirect_uris = uris;
    }
    if let Some(uris) = cmd.post_logout_redirect_uris {
        settings.post_logout_redirect_uris = uris;
    }
    if let Some(scopes) = cmd.scopes {
        settings.scopes = scopes;
    }
    if let Some(uri) = cmd.backchannel_logout_uri {
        settings.backchannel_logout_uri = uri;
    }
    if let Some(ciba) = cmd.ciba {
        settings.ciba = ciba;
    }
    // The merged result is checked, so cross-field rules hold for what will be in force.
    validate_client(&settings)?;
    if settings == *current {
        return Ok(Vec::new());
    }
    Ok(vec![ServerEvent::OidcClientUpdated(OidcClientUpdated {
        client_id: cmd.client_id,
        settings,
    })])
}

pub(super) fn decide_rotate_secret(
    server: &ActiveServer,
    cmd: RotateOidcClientSecret,
) -> Result<Vec<ServerEvent>, ServerError> {
    let client = live_client(server, cmd.client_id)?;
    if client.settings.kind == OidcClientKind::Public {
        return Err(OidcClientError::PublicSecret.into());
    }
    Ok(vec![ServerEvent::OidcClientSecretRotated(
        OidcClientSecretRotated {
            client_id: cmd.client_id,
            secret_hash: cmd.secret_hash,
        },
    )])
}

pub(super) fn decide_remove(
    server: &ActiveServer,
    cmd: RemoveOidcClient,
) -> Result<Vec<ServerEvent>, ServerError> {
    live_client(server, cmd.client_id)?;
    Ok(vec![ServerEvent::OidcClientRemoved(OidcClientRemoved {
        client_id: cmd.client_id,
    })])
}

pub(super) fn decide_rotate_key(
    server: &ActiveServer,
    cmd: RotateOidcKey,
    ctx: &Context<'_>,
) -> Result<Vec<ServerEvent>, ServerError> {
    let (public_key, _) =
        validate::p256_public_key(&cmd.public_key).ok_or(ValidationError::InvalidKey {
            field: "public_key",
        })?;
    let kid = oidc_kid(&public_key).ok_or(ValidationError::InvalidKey {
        field: "public_key",
    })?;
    if server.oidc_keys.contains(&kid) {
        return Ok(Vec::new());
    }
    Ok(vec![ServerEvent::OidcKeyRotated(OidcKeyRotated {
        kid,
        public_key,
        rotated_at: ctx.now,
    })])
}
