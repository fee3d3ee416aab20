//! Events of the grant aggregate (stream `grant-{server id}-{grant id}`).
//!
//! A grant is the record of who got which tokens: an authorization code (or a CIBA request),
//! the tokens it was redeemed for, each refresh, and its revocation. Events never hold a code
//! or a token, only SHA-256 of each token's secret part; a token names its grant, so a reader
//! of the log can tell which grant a presented token belongs to, never forge one.
//!
//! Flow: `code_issued → tokens_issued → refreshed* → revoked?`, or
//! `ciba_requested → tokens_issued → refreshed* → revoked?`; `revoked` may also end a grant
//! before its tokens were issued.

use serde::{Deserialize, Serialize};

use crate::ids::{AccountId, OidcClientId, SessionRef, Timestamp, UserDigest};
use crate::seal::Sealed;

/// Why a grant was revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevokeReason {
    /// Its authorization code was presented again after it was redeemed (RFC 6749 §4.1.2).
    CodeReused,
    /// A refresh token it had already rotated away was presented (RFC 9700 §4.14.2).
    RefreshReused,
    /// The client revoked one of its tokens (RFC 7009).
    Client,
    /// The login session it came from ended.
    Logout,
}

impl RevokeReason {
    /// The snake_case name.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::CodeReused => "code_reused",
            Self::RefreshReused => "refresh_reused",
            Self::Client => "client",
            Self::Logout => "logout",
        }
    }
}

/// `grant.code_issued` v1: the login session logged in and the client got an authorization
/// code, bound to the client, the redirect URI and the PKCE challenge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantCodeIssued {
    /// The client the code was issued to.
    pub client_id: OidcClientId,
    /// The login session behind it.
    pub session: SessionRef,
    /// The account that logged in.
    pub account_id: AccountId,
    /// Its user.
    pub user: UserDigest,
    /// The scopes granted (among them `openid`).
    pub scope: Vec<String>,
    /// The redirect URI of the authorization request: the token request must name it exactly.
    pub redirect_uri: String,
    /// The PKCE S256 challenge, decoded: SHA-256 of the verifier the token request must show.
    /// `None` only for a confidential client that sent none: its token request must then
    /// send no verifier either.
    #[serde(with = "serde_bytes")]
    pub code_challenge: Option<[u8; 32]>,
    /// The client's `nonce`, returned in the ID token as sent (the client's value, no secret
    /// of ours).
    pub nonce: Option<String>,
    /// SHA-256 of the code's secret part.
    #[serde(with = "serde_bytes")]
    pub code_hash: [u8; 32],
    /// After this the code is refused.
    pub code_expires_at: Timestamp,
    /// When the user logged in (the ID token's `auth_time`).
    pub auth_time: Timestamp,
    /// How (RFC 8176 values: `hwk`, `pin`, `fpt`).
    pub amr: Vec<String>,
    /// The assurance level reached.
    pub acr: String,
}

/// `grant.ciba_requested` v1: a client asked, by back channel, for a user's login (OpenID
/// CIBA Core); the push login is `session`. The `auth_req_id`'s secret is derived from the
/// grant id under the server's secret, never stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantCibaRequested {
    /// The client that asked.
    pub client_id: OidcClientId,
    /// The push login opened for it.
    pub session: SessionRef,
    /// The user asked.
    pub user: UserDigest,
    /// The scopes asked (among them `openid`).
    pub scope: Vec<String>,
    /// Shown on the phone (the client's text, at most 100 characters).
    pub binding_message: Option<String>,
    /// After this the request is `expired_token`.
    pub expires_at: Timestamp,
    /// The least number of seconds between two polls.
    pub interval_secs: u32,
    /// Ping mode: the client's notification endpoint is called once the user decided.
    pub ping: bool,
    /// The client's notification token (ping mode), sealed under a key derived from the
    /// server's secret and the grant, so the ping sender can open it and nobody else.
    pub notification_token: Option<Sealed>,
}

/// `grant.tokens_issued` v1: the code was redeemed, or the CIBA request completed. Facts of
/// the login are repeated so a reader needs nothing else to know what the tokens stand for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantTokensIssued {
    /// SHA-256 of the access token's secret part.
    #[serde(with = "serde_bytes")]
    pub access_hash: [u8; 32],
    /// SHA-256 of the refresh token's secret part; `None` when no refresh token was issued
    /// (a one-shot session, or no `offline_access`).
    #[serde(with = "serde_bytes")]
    pub refresh_hash: Option<[u8; 32]>,
    /// After this the access token is refused.
    pub access_expires_at: Timestamp,
    /// When.
    pub issued_at: Timestamp,
    /// The account that logged in.
    pub account_id: AccountId,
    /// When the user logged in.
    pub auth_time: Timestamp,
    /// How (RFC 8176).
    pub amr: Vec<String>,
    /// The assurance level reached.
    pub acr: String,
}

/// `grant.refreshed` v1: a refresh token was spent for a new access and refresh token; the
/// spent one is refused from now on, and presenting it again revokes the grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRefreshed {
    /// SHA-256 of the new access token's secret part.
    #[serde(with = "serde_bytes")]
    pub access_hash: [u8; 32],
    /// SHA-256 of the new refresh token's secret part.
    #[serde(with = "serde_bytes")]
    pub refresh_hash: [u8; 32],
    /// After this the new access token is refused.
    pub access_expires_at: Timestamp,
    /// When.
    pub refreshed_at: Timestamp,
}

/// `grant.revoked` v1: every token of the grant is refused from now on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRevoked {
    /// Why.
    pub reason: RevokeReason,
    /// When.
    pub revoked_at: Timestamp,
}

crate::domain_events! {
    /// Everything that happens to a grant.
    pub enum GrantEvent {
        CodeIssued(GrantCodeIssued) = ("grant.code_issued", 1),
        CibaRequested(GrantCibaRequested) = ("grant.ciba_requested", 1),
        TokensIssued(GrantTokensIssued) = ("grant.tokens_issued", 1),
        Refreshed(GrantRefreshed) = ("grant.refreshed", 1),
        Revoked(GrantRevoked) = ("grant.revoked", 1),
    }
}
