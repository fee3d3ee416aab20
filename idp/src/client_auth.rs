//! Client authentication at the token, revocation, introspection and back-channel
//! authentication endpoints (RFC 6749 §2.3, OpenID Connect Core §9).
//!
//! Methods: `client_secret_basic` (HTTP Basic, id and secret form-urlencoded first, RFC 6749
//! §2.3.1), `client_secret_post` (`client_id` + `client_secret` in the form), and `none` for
//! public clients (`client_id` alone). Rules:
//! - one method per request: Basic together with a `client_secret` in the form is
//!   `invalid_request`, and so is a form `client_id` that differs from the Basic one;
//! - an unknown (or removed, or another server's) client, a wrong secret, a missing secret
//!   for a confidential client and a secret sent by a public client all answer the same 401
//!   `invalid_client`; the secret's SHA-256 is compared in constant time, and computed for
//!   unknown clients too;
//! - clients are read from the read model and kept for [`CLIENT_TTL`], so a removal or a
//!   secret rotation takes effect within it.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, header};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use countersign_domain::grant::digest_eq;
use countersign_domain::server::OidcClientKind;
use countersign_domain::{OidcClientId, ServerId};
use countersign_projections::read_models::OidcClientRow;
use zeroize::Zeroizing;

use crate::error::OAuthError;
use crate::state::IdpState;

/// How long a client read from the read model is reused.
pub const CLIENT_TTL: Duration = Duration::from_secs(1);
/// Most clients remembered before stale ones are dropped.
const MAX_CACHED: usize = 10_000;

type Rows = HashMap<(ServerId, OidcClientId), (Instant, Option<OidcClientRow>)>;

/// Recently read clients (present or not), per (server, client).
#[derive(Debug, Default)]
pub struct ClientCache {
    rows: RwLock<Rows>,
}

impl ClientCache {
    fn get(&self, key: (ServerId, OidcClientId)) -> Option<Option<OidcClientRow>> {
        let rows = self.rows.read().ok()?;
        let (at, row) = rows.get(&key)?;
        (at.elapsed() < CLIENT_TTL).then(|| row.clone())
    }

    fn put(&self, key: (ServerId, OidcClientId), row: Option<OidcClientRow>) {
        if let Ok(mut rows) = self.rows.write() {
            if rows.len() >= MAX_CACHED {
                rows.retain(|_, (at, _)| at.elapsed() < CLIENT_TTL);
                if rows.len() >= MAX_CACHED {
                    rows.clear();
                }
            }
            rows.insert(key, (Instant::now(), row));
        }
    }
}

/// The client `client_id` names at `server` (cached for [`CLIENT_TTL`]); `None` when it is
/// not a client id of this server.
///
/// # Errors
/// `server_error` when the read model fails.
pub async fn client(
    state: &IdpState,
    server: ServerId,
    client_id: &str,
) -> Result<Option<OidcClientRow>, OAuthError> {
    let Ok(id) = client_id.parse::<OidcClientId>() else {
        return Ok(None);
    };
    let cache = state.client_cache();
    if let Some(row) = cache.get((server, id)) {
        return Ok(row);
    }
    let row = state
        .api()
        .reads()
        .oidc_client(server, id)
        .await
        .map_err(|e| OAuthError::server_error("client read", &e))?;
    cache.put((server, id), row.clone());
    Ok(row)
}

/// `Authorization: Basic` credentials: (client_id, client_secret), each form-urlencoded
/// before base64 (RFC 6749 §2.3.1).
fn basic(headers: &HeaderMap) -> Result<Option<(String, Zeroizing<String>)>, OAuthError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| OAuthError::invalid_client())?;
    let Some((scheme, encoded)) = value.split_once(' ') else {
        return Err(OAuthError::invalid_client());
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(OAuthError::invalid_client());
    }
    let decoded = Zeroizing::new(
        STANDARD
            .decode(encoded.trim())
            .map_err(|_| OAuthError::invalid_client())?,
    );
    let text = std::str::from_utf8(&decoded).map_err(|_| OAuthError::invalid_client())?;
    let Some((id, secret)) = text.split_once(':') else {
        return Err(OAuthError::invalid_client());
    };
    let unescape = |s: &str| -> String {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    Ok(Some((unescape(id), Zeroizing::new(unescape(secret)))))
}

/// Authenticates the client of a request at `server` from its headers and form.
///
/// # Errors
/// 401 `invalid_client` (see the module rules), 400 `invalid_request` for two methods at
/// once, 500 `server_error`.
pub async fn authenticate(
    state: &IdpState,
    server: ServerId,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> Result<OidcClientRow, OAuthError> {
    let form_id = form.get("client_id").filter(|v| !v.is_empty());
    let form_secret = form.get("client_secret").filter(|v| !v.is_empty());
    let (client_id, secret): (&str, Option<&str>) = match basic(headers)? {
        Some((id, secret)) => {
            if form_secret.is_some() {
                return Err(OAuthError::invalid_request(
                    "use one client authentication method, not two",
                ));
            }
            if form_id.is_some_and(|f| *f != id) {
                return Err(OAuthError::invalid_request(
                    "client_id does not match the Authorization header",
                ));
            }
            // An empty password is how some libraries send a public client's id alone.
            let secret = (!secret.is_empty()).then_some(secret.as_str());
            let row = check(state, server, &id, secret).await?;
            return Ok(row);
        }
        None => match form_id {
            Some(id) => (id.as_str(), form_secret.map(String::as_str)),
            None => return Err(OAuthError::invalid_client()),
        },
    };
    check(state, server, client_id, secret).await
}

async fn check(
    state: &IdpState,
    server: ServerId,
    client_id: &str,
    secret: Option<&str>,
) -> Result<OidcClientRow, OAuthError> {
    let row = client(state, server, client_id).await?;
    // Hash whatever was sent, so an unknown client costs what a known one does.
    let presented = secret.map(countersign_commands::server::client_secret_hash);
    let Some(row) = row else {
        return Err(OAuthError::invalid_client());
    };
    let ok = match (row.settings.kind, &row.secret_hash, presented) {
        (OidcClientKind::Public, _, None) => true,
        (OidcClientKind::Confidential, Some(stored), Some(presented)) => {
            digest_eq(stored, &presented)
        }
        _ => false,
    };
    if ok {
        Ok(row)
    } else {
        tracing::info!(server = %server, client = %row.client_id, "client authentication failed");
        Err(OAuthError::invalid_client())
    }
}
