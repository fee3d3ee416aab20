//! The grant aggregate: one OAuth grant of the identity provider, from the authorization code
//! (or CIBA request) that opens it, through the tokens it was redeemed for and each refresh,
//! to its revocation.
//!
//! States ([`Grant`]) and the commands that move between them:
//!
//! ```text
//! NotIssued --IssueCode--> CodeIssued --RedeemCode--> Active --Refresh--> Active
//! NotIssued --RequestCiba--> CibaPending --CompleteCiba--> Active
//! CodeIssued | CibaPending | Active --Revoke--> Revoked
//! Active (from a code) --RedeemCode with the right code--> Revoked (code_reused)
//! Active --Refresh with a rotated-away refresh token--> Revoked (refresh_reused)
//! ```
//!
//! Rules enforced by [`Grant::decide`]:
//! - an authorization code is single-use, expires at `code_expires_at`, and is bound to its
//!   client, its redirect URI (exact string) and its PKCE challenge: the token request shows
//!   SHA-256 of the verifier, compared with the challenge. Any mismatch, or a grant that was
//!   revoked, is [`GrantError::InvalidGrant`] and records nothing, so a wrong guess leaves no
//!   trace but the refusal.
//! - a code presented again after it was redeemed (the right code: its hash matches) revokes
//!   the grant and everything issued from it (RFC 6749 §4.1.2): `decide` answers the
//!   `grant.revoked` event, and the caller answers `invalid_grant` all the same.
//! - refresh tokens rotate: each refresh issues a new one, and the spent ones are kept; a
//!   spent refresh token presented again revokes the grant (RFC 9700 §4.14.2). A grant issued
//!   without a refresh token cannot be refreshed.
//! - a CIBA request completes once, by its client, before it expires
//!   ([`GrantError::Expired`] after); again is `InvalidGrant`.
//! - revoking is idempotent: a revoked grant emits nothing.
//! - every hash compared here is of a secret of at least 256 bits; comparisons take constant
//!   time all the same.
//! - whether the login session is still logged in, and the client's own credentials, are the
//!   edge's checks (it reads the session's and the server's streams), not this aggregate's.

mod events;
#[cfg(test)]
mod tests;

pub use events::*;

use crate::aggregate::{Aggregate, Classify, Context, ErrorKind};
use crate::ids::{AccountId, OidcClientId, SessionRef, Timestamp, UserDigest};
use crate::server::into_command;
use crate::validate::ValidationError;

/// Seconds an authorization code stays valid.
pub const CODE_LIFETIME_SECS: u32 = 60;
/// Seconds an access token stays valid.
pub const ACCESS_TOKEN_LIFETIME_SECS: u32 = 600;
/// Seconds an ID token stays valid.
pub const ID_TOKEN_LIFETIME_SECS: u32 = 600;
/// Longest CIBA binding message, in characters.
pub const BINDING_MESSAGE_MAX_CHARS: usize = 100;

/// Issue an authorization code for a login that completed. The edge made the code, and hands
/// over only its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueCode {
    /// What the event records.
    pub code: GrantCodeIssued,
}

/// Record a CIBA request (the push login was opened).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestCiba {
    /// What the event records.
    pub request: GrantCibaRequested,
}

/// The hashes and lifetime of tokens about to be handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewTokens {
    /// SHA-256 of the access token's secret part.
    pub access_hash: [u8; 32],
    /// SHA-256 of the refresh token's secret part, when one is issued.
    pub refresh_hash: Option<[u8; 32]>,
    /// When the access token expires.
    pub access_expires_at: Timestamp,
}

/// Redeem the authorization code at the token endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedeemCode {
    /// The authenticated client.
    pub client_id: OidcClientId,
    /// The token request's `redirect_uri`.
    pub redirect_uri: String,
    /// SHA-256 of the token request's `code_verifier`; `None` when it sent none.
    pub verifier_digest: Option<[u8; 32]>,
    /// SHA-256 of the presented code's secret part.
    pub code_hash: [u8; 32],
    /// What to issue.
    pub tokens: NewTokens,
}

/// The user approved the CIBA request on the phone: issue its tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompleteCiba {
    /// The authenticated client.
    pub client_id: OidcClientId,
    /// The account that logged in.
    pub account_id: AccountId,
    /// When it logged in.
    pub auth_time: Timestamp,
    /// How (RFC 8176).
    pub amr: Vec<String>,
    /// The assurance level reached.
    pub acr: String,
    /// What to issue.
    pub tokens: NewTokens,
}

/// Spend a refresh token for new tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refresh {
    /// The authenticated client.
    pub client_id: OidcClientId,
    /// SHA-256 of the presented refresh token's secret part.
    pub refresh_hash: [u8; 32],
    /// SHA-256 of the new access token's secret part.
    pub new_access_hash: [u8; 32],
    /// SHA-256 of the new refresh token's secret part.
    pub new_refresh_hash: [u8; 32],
    /// When the new access token expires.
    pub access_expires_at: Timestamp,
}

/// Revoke the grant and every token issued from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revoke {
    /// Why.
    pub reason: RevokeReason,
}

/// Commands of the grant aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantCommand {
    /// See [`IssueCode`].
    IssueCode(IssueCode),
    /// See [`RequestCiba`].
    RequestCiba(RequestCiba),
    /// See [`RedeemCode`].
    RedeemCode(RedeemCode),
    /// See [`CompleteCiba`].
    CompleteCiba(CompleteCiba),
    /// See [`Refresh`].
    Refresh(Refresh),
    /// See [`Revoke`].
    Revoke(Revoke),
}

into_command!(GrantCommand {
    IssueCode(IssueCode),
    RequestCiba(RequestCiba),
    RedeemCode(RedeemCode),
    CompleteCiba(CompleteCiba),
    Refresh(Refresh),
    Revoke(Revoke),
});

/// Why a presented code or token was refused: for the log and tests only. OAuth answers
/// every one of them with the same `invalid_grant`, so a client learns nothing from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidGrantReason {
    /// The code's or token's secret does not match.
    WrongSecret,
    /// Issued to another client.
    WrongClient,
    /// Another redirect URI than the authorization request's.
    WrongRedirectUri,
    /// No code verifier, or one whose SHA-256 is not the challenge.
    WrongVerifier,
    /// The code expired.
    Expired,
    /// The code was redeemed already (the grant is revoked for it).
    Redeemed,
    /// The grant was revoked.
    Revoked,
    /// The grant is not at the step the request needs (a code for a CIBA grant, a refresh
    /// before any token, a CIBA completion twice, …).
    WrongStep,
    /// The grant issued no refresh token.
    NotRefreshable,
}

impl InvalidGrantReason {
    /// The snake_case name, for logs.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::WrongSecret => "wrong_secret",
            Self::WrongClient => "wrong_client",
            Self::WrongRedirectUri => "wrong_redirect_uri",
            Self::WrongVerifier => "wrong_verifier",
            Self::Expired => "expired",
            Self::Redeemed => "redeemed",
            Self::Revoked => "revoked",
            Self::WrongStep => "wrong_step",
            Self::NotRefreshable => "not_refreshable",
        }
    }
}

impl std::fmt::Display for InvalidGrantReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a grant command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// The input breaks a rule. HTTP 422 (the IdP's own mistake: it builds these commands).
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The grant exists already (a code or request under the same id). HTTP 409.
    #[error("grant exists already")]
    AlreadyExists,
    /// No grant under this id. HTTP 404 (OAuth: `invalid_grant`).
    #[error("grant not found")]
    NotFound,
    /// The code or token was refused. HTTP 400 (OAuth: `invalid_grant`).
    #[error("invalid grant ({reason})")]
    InvalidGrant {
        /// Why, for the log.
        reason: InvalidGrantReason,
    },
    /// The CIBA request expired before the user decided. HTTP 400 (OAuth: `expired_token`).
    #[error("the request expired")]
    Expired,
}

impl GrantError {
    const fn invalid(reason: InvalidGrantReason) -> Self {
        Self::InvalidGrant { reason }
    }
}

impl Classify for GrantError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Invalid(_) | Self::InvalidGrant { .. } | Self::Expired => ErrorKind::Invalid,
            Self::AlreadyExists => ErrorKind::Conflict,
            Self::NotFound => ErrorKind::NotFound,
        }
    }
}

/// How a grant began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantOrigin {
    /// An authorization code.
    Code(GrantCodeIssued),
    /// A CIBA request.
    Ciba(GrantCibaRequested),
}

impl GrantOrigin {
    /// The client it is for.
    #[must_use]
    pub const fn client_id(&self) -> OidcClientId {
        match self {
            Self::Code(c) => c.client_id,
            Self::Ciba(c) => c.client_id,
        }
    }

    /// The login session behind it.
    #[must_use]
    pub const fn session(&self) -> SessionRef {
        match self {
            Self::Code(c) => c.session,
            Self::Ciba(c) => c.session,
        }
    }

    /// Its user.
    #[must_use]
    pub const fn user(&self) -> UserDigest {
        match self {
            Self::Code(c) => c.user,
            Self::Ciba(c) => c.user,
        }
    }

    /// The scopes granted.
    #[must_use]
    pub fn scope(&self) -> &[String] {
        match self {
            Self::Code(c) => &c.scope,
            Self::Ciba(c) => &c.scope,
        }
    }

    /// The client's OIDC nonce (code flow only).
    #[must_use]
    pub fn nonce(&self) -> Option<&str> {
        match self {
            Self::Code(c) => c.nonce.as_deref(),
            Self::Ciba(_) => None,
        }
    }
}

/// A grant whose tokens were issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveGrant {
    /// How it began.
    pub origin: GrantOrigin,
    /// The first issuance: the login facts (account, auth time, amr, acr).
    pub issued: GrantTokensIssued,
    /// SHA-256 of the current access token's secret.
    pub access_hash: [u8; 32],
    /// When the current access token expires.
    pub access_expires_at: Timestamp,
    /// SHA-256 of the current refresh token's secret, if any.
    pub refresh_hash: Option<[u8; 32]>,
    /// SHA-256 of every refresh token spent already: presenting one again revokes the grant.
    pub spent_refresh: Vec<[u8; 32]>,
}

/// The grant aggregate's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Grant {
    /// Nothing in the stream yet.
    #[default]
    NotIssued,
    /// A code waits to be redeemed.
    CodeIssued(GrantCodeIssued),
    /// A CIBA request waits for the user.
    CibaPending(GrantCibaRequested),
    /// Tokens were issued.
    Active(Box<ActiveGrant>),
    /// Revoked: terminal.
    Revoked {
        /// How it began.
        origin: GrantOrigin,
        /// The tokens' state when it was revoked, if any were issued.
        active: Option<Box<ActiveGrant>>,
        /// Why.
        reason: RevokeReason,
        /// When.
        revoked_at: Timestamp,
    },
}

/// Compares two digests in constant time.
#[must_use]
pub fn digest_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b.iter()) {
        diff |= x ^ y;
    }
    diff == 0
}

impl Grant {
    /// How the grant began; `None` before it did.
    #[must_use]
    pub const fn origin(&self) -> Option<GrantOriginRef<'_>> {
        match self {
            Self::NotIssued => None,
            Self::CodeIssued(c) => Some(GrantOriginRef::Code(c)),
            Self::CibaPending(c) => Some(GrantOriginRef::Ciba(c)),
            Self::Active(a) => Some(a.origin.as_ref()),
            Self::Revoked { origin, .. } => Some(origin.as_ref()),
        }
    }

    /// The issued tokens, while the grant is active.
    #[must_use]
    pub const fn active(&self) -> Option<&ActiveGrant> {
        match self {
            Self::Active(a) => Some(a),
            _ => None,
        }
    }

    /// Whether the grant was revoked.
    #[must_use]
    pub const fn is_revoked(&self) -> bool {
        matches!(self, Self::Revoked { .. })
    }

    fn decide_redeem(
        &self,
        cmd: &RedeemCode,
        now: Timestamp,
    ) -> Result<Vec<GrantEvent>, GrantError> {
        use InvalidGrantReason as R;
        let code = match self {
            Self::NotIssued => return Err(GrantError::NotFound),
            Self::CodeIssued(code) => code,
            Self::Active(active) => {
                let GrantOrigin::Code(code) = &active.origin else {
                    return Err(GrantError::invalid(R::WrongStep));
                };
                // A redeemed code presented again: only its holder can revoke the grant.
                if !digest_eq(&code.code_hash, &cmd.code_hash) {
                    return Err(GrantError::invalid(R::WrongSecret));
                }
                return Ok(vec![GrantEvent::Revoked(GrantRevoked {
                    reason: RevokeReason::CodeReused,
                    revoked_at: now,
                })]);
            }
            Self::Revoked {
                origin: GrantOrigin::Code(_),
                ..
            } => return Err(GrantError::invalid(R::Revoked)),
            Self::CibaPending(_) | Self::Revoked { .. } => {
                return Err(GrantError::invalid(R::WrongStep));
            }
        };
        // Every check runs whatever the earlier ones found, so the refusal's timing says
        // nothing about which one failed.
        let secret_ok = digest_eq(&code.code_hash, &cmd.code_hash);
        let client_ok = code.client_id == cmd.client_id;
        let redirect_ok = code.redirect_uri == cmd.redirect_uri;
        let verifier_ok = match (&code.code_challenge, &cmd.verifier_digest) {
            (Some(challenge), Some(verifier)) => digest_eq(challenge, verifier),
            // RFC 9700 §2.1.1: a verifier for a code issued without a challenge is refused.
            (None, None) => true,
            (Some(_), None) | (None, Some(_)) => false,
        };
        let fresh = now < code.code_expires_at;
        let refusal = if !secret_ok {
            Some(R::WrongSecret)
        } else if !client_ok {
            Some(R::WrongClient)
        } else if !fresh {
            Some(R::Expired)
        } else if !redirect_ok {
            Some(R::WrongRedirectUri)
        } else if !verifier_ok {
            Some(R::WrongVerifier)
        } else {
            None
        };
        if let Some(reason) = refusal {
            return Err(GrantError::invalid(reason));
        }
        Ok(vec![GrantEvent::TokensIssued(GrantTokensIssued {
            access_hash: cmd.tokens.access_hash,
            refresh_hash: cmd.tokens.refresh_hash,
            access_expires_at: cmd.tokens.access_expires_at,
            issued_at: now,
            account_id: code.account_id,
            auth_time: code.auth_time,
            amr: code.amr.clone(),
            acr: code.acr.clone(),
        })])
    }

    fn decide_complete_ciba(
        &self,
        cmd: CompleteCiba,
        now: Timestamp,
    ) -> Result<Vec<GrantEvent>, GrantError> {
        use InvalidGrantReason as R;
        let request = match self {
            Self::NotIssued => return Err(GrantError::NotFound),
            Self::CibaPending(request) => request,
            Self::Revoked { .. } => return Err(GrantError::invalid(R::Revoked)),
            Self::CodeIssued(_) | Self::Active(_) => return Err(GrantError::invalid(R::WrongStep)),
        };
        if request.client_id != cmd.client_id {
            return Err(GrantError::invalid(R::WrongClient));
        }
        if now >= request.expires_at {
            return Err(GrantError::Expired);
        }
        Ok(vec![GrantEvent::TokensIssued(GrantTokensIssued {
            access_hash: cmd.tokens.access_hash,
            refresh_hash: cmd.tokens.refresh_hash,
            access_expires_at: cmd.tokens.access_expires_at,
            issued_at: now,
            account_id: cmd.account_id,
            auth_time: cmd.auth_time,
            amr: cmd.amr,
            acr: cmd.acr,
        })])
    }

    fn decide_refresh(&self, cmd: Refresh, now: Timestamp) -> Result<Vec<GrantEvent>, GrantError> {
        use InvalidGrantReason as R;
        let active = match self {
            Self::NotIssued => return Err(GrantError::NotFound),
            Self::Active(active) => active,
            Self::Revoked { .. } => return Err(GrantError::invalid(R::Revoked)),
            Self::CodeIssued(_) | Self::CibaPending(_) => {
                return Err(GrantError::invalid(R::WrongStep));
            }
        };
        if active.origin.client_id() != cmd.client_id {
            return Err(GrantError::invalid(R::WrongClient));
        }
        let Some(current) = active.refresh_hash else {
            return Err(GrantError::invalid(R::NotRefreshable));
        };
        if digest_eq(&current, &cmd.refresh_hash) {
            return Ok(vec![GrantEvent::Refreshed(GrantRefreshed {
                access_hash: cmd.new_access_hash,
                refresh_hash: cmd.new_refresh_hash,
                access_expires_at: cmd.access_expires_at,
                refreshed_at: now,
            })]);
        }
        let spent = active
            .spent_refresh
            .iter()
            .fold(false, |found, h| found | digest_eq(h, &cmd.refresh_hash));
        if spent {
            return Ok(vec![GrantEvent::Revoked(GrantRevoked {
                reason: RevokeReason::RefreshReused,
                revoked_at: now,
            })]);
        }
        Err(GrantError::invalid(R::WrongSecret))
    }
}

/// How a grant began, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantOriginRef<'a> {
    /// An authorization code.
    Code(&'a GrantCodeIssued),
    /// A CIBA request.
    Ciba(&'a GrantCibaRequested),
}

impl GrantOrigin {
    /// Borrowed.
    #[must_use]
    pub const fn as_ref(&self) -> GrantOriginRef<'_> {
        match self {
            Self::Code(c) => GrantOriginRef::Code(c),
            Self::Ciba(c) => GrantOriginRef::Ciba(c),
        }
    }
}

impl GrantOriginRef<'_> {
    /// The client it is for.
    #[must_use]
    pub const fn client_id(self) -> OidcClientId {
        match self {
            Self::Code(c) => c.client_id,
            Self::Ciba(c) => c.client_id,
        }
    }

    /// The login session behind it.
    #[must_use]
    pub const fn session(self) -> SessionRef {
        match self {
            Self::Code(c) => c.session,
            Self::Ciba(c) => c.session,
        }
    }

    /// Its user.
    #[must_use]
    pub const fn user(self) -> UserDigest {
        match self {
            Self::Code(c) => c.user,
            Self::Ciba(c) => c.user,
        }
    }
}

fn validate_scope(scope: &[String]) -> Result<(), GrantError> {
    if !scope.iter().any(|s| s == "openid") {
        return Err(ValidationError::Empty { field: "scope" }.into());
    }
    Ok(())
}

impl Aggregate for Grant {
    type Command = GrantCommand;
    type Event = GrantEvent;
    type Error = GrantError;

    fn decide(
        &self,
        command: GrantCommand,
        ctx: &mut Context<'_>,
    ) -> Result<Vec<GrantEvent>, GrantError> {
        let now = ctx.now;
        match command {
            GrantCommand::IssueCode(cmd) => {
                validate_scope(&cmd.code.scope)?;
                match self {
                    Self::NotIssued => Ok(vec![GrantEvent::CodeIssued(cmd.code)]),
                    Self::CodeIssued(existing) if *existing == cmd.code => Ok(Vec::new()),
                    _ => Err(GrantError::AlreadyExists),
                }
            }
            GrantCommand::RequestCiba(cmd) => {
                validate_scope(&cmd.request.scope)?;
                if let Some(message) = &cmd.request.binding_message {
                    crate::validate::multiline_text(
                        "binding_message",
                        message,
                        BINDING_MESSAGE_MAX_CHARS,
                    )?;
                }
                match self {
                    Self::NotIssued => Ok(vec![GrantEvent::CibaRequested(cmd.request)]),
                    Self::CibaPending(existing) if *existing == cmd.request => Ok(Vec::new()),
                    _ => Err(GrantError::AlreadyExists),
                }
            }
            GrantCommand::RedeemCode(cmd) => self.decide_redeem(&cmd, now),
            GrantCommand::CompleteCiba(cmd) => self.decide_complete_ciba(cmd, now),
            GrantCommand::Refresh(cmd) => self.decide_refresh(cmd, now),
            GrantCommand::Revoke(cmd) => match self {
                Self::NotIssued => Err(GrantError::NotFound),
                Self::Revoked { .. } => Ok(Vec::new()),
                _ => Ok(vec![GrantEvent::Revoked(GrantRevoked {
                    reason: cmd.reason,
                    revoked_at: now,
                })]),
            },
        }
    }

    fn apply(&mut self, event: &GrantEvent) {
        use GrantEvent as E;
        let state = std::mem::take(self);
        *self = match (state, event) {
            (Self::NotIssued, E::CodeIssued(e)) => Self::CodeIssued(e.clone()),
            (Self::NotIssued, E::CibaRequested(e)) => Self::CibaPending(e.clone()),
            (Self::CodeIssued(code), E::TokensIssued(e)) => {
                Self::Active(Box::new(active(GrantOrigin::Code(code), e)))
            }
            (Self::CibaPending(request), E::TokensIssued(e)) => {
                Self::Active(Box::new(active(GrantOrigin::Ciba(request), e)))
            }
            (Self::Active(mut a), E::Refreshed(e)) => {
                if let Some(spent) = a.refresh_hash.take() {
                    a.spent_refresh.push(spent);
                }
                a.refresh_hash = Some(e.refresh_hash);
                a.access_hash = e.access_hash;
                a.access_expires_at = e.access_expires_at;
                Self::Active(a)
            }
            (Self::CodeIssued(code), E::Revoked(e)) => Self::Revoked {
                origin: GrantOrigin::Code(code),
                active: None,
                reason: e.reason,
                revoked_at: e.revoked_at,
            },
            (Self::CibaPending(request), E::Revoked(e)) => Self::Revoked {
                origin: GrantOrigin::Ciba(request),
                active: None,
                reason: e.reason,
                revoked_at: e.revoked_at,
            },
            (Self::Active(a), E::Revoked(e)) => Self::Revoked {
                origin: a.origin.clone(),
                active: Some(a),
                reason: e.reason,
                revoked_at: e.revoked_at,
            },
            // An event that cannot follow the current state changes nothing (see `server`).
            (state, _) => state,
        };
    }
}

fn active(origin: GrantOrigin, issued: &GrantTokensIssued) -> ActiveGrant {
    ActiveGrant {
        origin,
        issued: issued.clone(),
        access_hash: issued.access_hash,
        access_expires_at: issued.access_expires_at,
        refresh_hash: issued.refresh_hash,
        spent_refresh: Vec::new(),
    }
}
