//! OAuth grant commands: the edge work around the grant aggregate (the identity provider's
//! authorization codes, CIBA requests, access and refresh tokens).
//!
//! Every token is `base64url_nopad(grant id (16 bytes) ‖ secret (32 random bytes))`, 64
//! characters: the authorization code, the access token, the refresh token and the CIBA
//! `auth_req_id`. The token names its grant (stream `grant-{server}-{grant}`), so a token of
//! one server looked up at another finds no stream; the grant keeps only SHA-256 of each
//! secret, compared in constant time. A token is a [`GrantToken`], zeroized on drop, whose
//! `Debug` prints nothing; no token reaches an event, an error or a log line.
//!
//! The CIBA `auth_req_id`'s secret is not random but derived, `HMAC(server secret,
//! "ciba-auth-req" ‖ 0 ‖ grant id)`, so whichever instance sends the ping can rebuild it;
//! the client's notification token is sealed (AES-256-GCM) under a key derived the same way
//! (`"ciba-notification"`), bound to the grant's stream.
//!
//! Login facts (who logged in, when, with which factor) are read from the login session's own
//! stream at the moment a code is issued or a CIBA request completes, and a refresh is refused
//! once that session is no longer logged in.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use countersign_domain::grant::{
    ACCESS_TOKEN_LIFETIME_SECS, CODE_LIFETIME_SECS, CompleteCiba, Grant, GrantCibaRequested,
    GrantCodeIssued, GrantCommand, GrantError, GrantEvent, InvalidGrantReason, IssueCode,
    NewTokens, RedeemCode, Refresh, RequestCiba, Revoke, RevokeReason,
};
use countersign_domain::second_factor::SecondFactorKind;
use countersign_domain::session::{Session, SessionEvent, SessionStatus};
use countersign_domain::{
    AccountId, Aggregate as _, Clock, Context, DataKey, ErrorKind, GrantId, GrantRef, OidcClientId,
    Sealed, ServerId, SessionRef, Timestamp, UserDigest,
};
use countersign_eventstore::vault::KeyVault;
use countersign_eventstore::{Direction, Metadata, SharedStore};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::secrets::ServerSecrets;
use crate::{CommandError, Executed, Loaded, Refused, execute_typed, load, random_bytes};

/// The derivation label of a CIBA `auth_req_id`'s secret.
pub const CIBA_AUTH_REQ_LABEL: &str = "ciba-auth-req";
/// The derivation label of the key a CIBA notification token is sealed under.
pub const CIBA_NOTIFICATION_LABEL: &str = "ciba-notification";
/// The derivation label of the OIDC `sub`.
pub const SUBJECT_LABEL: &str = "oidc-sub";
/// `acr` of a login with a second factor.
pub const ACR_SECOND_FACTOR: &str = "urn:countersign:acr:2";
/// `acr` of a login with the device key alone.
pub const ACR_DEVICE_ONLY: &str = "urn:countersign:acr:1";

/// A code or token, handed to the client once. `Debug` prints nothing of it.
pub struct GrantToken(Zeroizing<String>);

impl GrantToken {
    fn new(grant: GrantId, secret: &[u8; 32]) -> Self {
        let mut raw = Zeroizing::new(Vec::with_capacity(48));
        raw.extend_from_slice(grant.as_bytes());
        raw.extend_from_slice(secret);
        Self(Zeroizing::new(URL_SAFE_NO_PAD.encode(raw.as_slice())))
    }

    /// The token, for the one answer that hands it over.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for GrantToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrantToken(..)")
    }
}

/// A presented token taken apart: the grant it names and SHA-256 of its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct PresentedToken {
    /// The grant the token names (at the server it was presented to).
    pub grant: GrantRef,
    /// SHA-256 of its secret part, what the grant keeps.
    pub hash: [u8; 32],
    secret: [u8; 32],
}

impl std::fmt::Debug for PresentedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresentedToken")
            .field("grant", &self.grant)
            .finish_non_exhaustive()
    }
}

impl Drop for PresentedToken {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.secret);
    }
}

/// Takes a presented token apart, as seen at `server`; `None` when it is not 64 base64url
/// characters of 48 bytes. Never fails on any input.
pub fn parse_token(server: ServerId, token: &str) -> Option<PresentedToken> {
    if token.len() != 64 {
        return None;
    }
    let raw = Zeroizing::new(URL_SAFE_NO_PAD.decode(token).ok()?);
    let grant: [u8; 16] = raw.get(..16)?.try_into().ok()?;
    let secret: [u8; 32] = raw.get(16..48)?.try_into().ok()?;
    Some(PresentedToken {
        grant: GrantRef::new(server, GrantId::from_bytes(grant)),
        hash: secret_hash(&secret),
        secret,
    })
}

/// What the grant keeps of a token's secret: its SHA-256 (256 random or derived bits: no
/// salt needed).
pub fn secret_hash(secret: &[u8; 32]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// SHA-256 of a PKCE `code_verifier` (what an S256 `code_challenge` decodes to).
pub fn pkce_digest(verifier: &str) -> [u8; 32] {
    Sha256::digest(verifier.as_bytes()).into()
}

/// Who logged in on a session, when and how: what an ID token says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginFacts {
    /// Where the session is now.
    pub status: SessionStatus,
    /// The account that logged in last.
    pub account_id: AccountId,
    /// Its user.
    pub user: UserDigest,
    /// When it logged in (continuous logins: from the first ping deadline; one-shot: the
    /// store's commit time of `session.logged_in`, never later than the caller's now).
    pub auth_time: Timestamp,
    /// RFC 8176: `hwk`, plus `pin` or `fpt` for the second factor verified on this login.
    pub amr: Vec<String>,
    /// [`ACR_SECOND_FACTOR`] or [`ACR_DEVICE_ONLY`].
    pub acr: String,
    /// The login lasts while the phone pings (ping time > 0).
    pub continuous: bool,
    /// The session's last position.
    pub position: u64,
}

/// The last login on a session and where the session is at `now` ([`Session::status_at`]:
/// an overdue ping counts as logged out); `None` when nobody ever logged in on it (or there
/// is no such session).
pub async fn login_facts(
    store: &SharedStore,
    session: SessionRef,
    now: Timestamp,
) -> Result<Option<LoginFacts>, CommandError> {
    let stream = session.stream();
    let mut state = Session::default();
    let mut facts: Option<LoginFacts> = None;
    let mut factor: Option<SecondFactorKind> = None;
    let mut from = 0u64;
    loop {
        let page = store
            .read_stream(&stream, Some(from), Direction::Forwards, 1_000)
            .await?;
        let Some(last) = page.last() else { break };
        from = last.version + 1;
        for recorded in &page {
            let event = recorded.decode::<SessionEvent>()?;
            match &event {
                SessionEvent::Opened(_) | SessionEvent::Provoked(_) => factor = None,
                SessionEvent::SecondFactorVerified(e) => factor = Some(e.factor),
                SessionEvent::LoggedIn(e) => {
                    let mut amr = vec!["hwk".to_owned()];
                    let acr = match factor {
                        Some(SecondFactorKind::Pin) => {
                            amr.push("pin".to_owned());
                            ACR_SECOND_FACTOR
                        }
                        Some(SecondFactorKind::Biometric) => {
                            amr.push("fpt".to_owned());
                            ACR_SECOND_FACTOR
                        }
                        None => ACR_DEVICE_ONLY,
                    };
                    // A continuous login's first deadline is the login time plus the ping
                    // time, on the clock the session's commands were decided by; a one-shot
                    // login records no time, so the store's commit time stands in.
                    let ping_ms = state
                        .opened()
                        .map_or(0, |o| i64::from(o.ping_time_secs) * 1000);
                    let auth_time = e
                        .ping_deadline
                        .map_or(Timestamp::from_millis(recorded.recorded_at), |deadline| {
                            Timestamp::from_millis(deadline.as_millis() - ping_ms)
                        });
                    facts = Some(LoginFacts {
                        status: SessionStatus::LoggedIn,
                        account_id: e.account_id,
                        user: e.user,
                        auth_time,
                        amr,
                        acr: acr.to_owned(),
                        continuous: e.continuous,
                        position: recorded.position,
                    });
                }
                _ => {}
            }
            state.apply(&event);
            if let Some(f) = facts.as_mut() {
                f.position = recorded.position;
            }
        }
    }
    Ok(facts.map(|f| LoginFacts {
        status: state.status_at(now),
        ..f
    }))
}

/// What the authorization endpoint asks for once the login session logged in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeRequest {
    /// The client.
    pub client_id: OidcClientId,
    /// The login session (logged in).
    pub session: SessionRef,
    /// The scopes granted (the request's, within the client's; with `openid`).
    pub scope: Vec<String>,
    /// The request's redirect URI, exactly as sent (and registered).
    pub redirect_uri: String,
    /// The PKCE S256 `code_challenge`, base64url-decoded (32 bytes); `None` only for a
    /// confidential client that sent none.
    pub code_challenge: Option<[u8; 32]>,
    /// The client's OIDC `nonce`, if it sent one.
    pub nonce: Option<String>,
}

/// What the back-channel authentication endpoint asks for once it opened the push login.
#[derive(Clone, PartialEq, Eq)]
pub struct CibaRequest {
    /// The client.
    pub client_id: OidcClientId,
    /// The push login opened for it.
    pub session: SessionRef,
    /// The user asked.
    pub user: UserDigest,
    /// The scopes asked (with `openid`).
    pub scope: Vec<String>,
    /// Shown on the phone (≤ 100 characters).
    pub binding_message: Option<String>,
    /// When the request expires (at most the push login's own expiry).
    pub expires_at: Timestamp,
    /// Least seconds between polls (`interval`).
    pub interval_secs: u32,
    /// Ping mode.
    pub ping: bool,
    /// The client's `client_notification_token` (ping mode); sealed before it is recorded.
    pub notification_token: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for CibaRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CibaRequest")
            .field("client_id", &self.client_id)
            .field("session", &self.session)
            .field("scope", &self.scope)
            .field("expires_at", &self.expires_at)
            .field("ping", &self.ping)
            .finish_non_exhaustive()
    }
}

/// Tokens just issued (a code redeemed, a CIBA request completed, a refresh).
#[derive(Debug)]
pub struct IssuedTokens {
    /// The grant.
    pub grant: GrantRef,
    /// The access token.
    pub access_token: GrantToken,
    /// The refresh token (continuous sessions only).
    pub refresh_token: Option<GrantToken>,
    /// When the access token expires.
    pub access_expires_at: Timestamp,
    /// The grant after the issue: its origin (client, session, scope, nonce) and login facts.
    pub state: Grant,
    /// What was written.
    pub executed: Executed<GrantEvent>,
}

/// Why a token request was refused. Each variant says its OAuth error.
#[derive(Debug, thiserror::Error)]
pub enum GrantRefused {
    /// `invalid_grant`; nothing was written.
    #[error("invalid grant ({0})")]
    Invalid(InvalidGrantReason),
    /// `invalid_grant`: the code or refresh token was used again, and the grant is now
    /// revoked (`grant.revoked` was written at `position`).
    #[error("grant revoked: {reason:?}")]
    Reused {
        /// `code_reused` or `refresh_reused`.
        reason: RevokeReason,
        /// Where the revocation was written.
        position: Option<u64>,
    },
    /// `expired_token` (CIBA); nothing written.
    #[error("the request expired")]
    Expired,
    /// `invalid_grant`: the login session is not logged in (any more); nothing written.
    #[error("the login session is {0}")]
    SessionNotLoggedIn(SessionStatus),
    /// Anything else (500, or 409 on a lost race).
    #[error(transparent)]
    Command(#[from] CommandError),
}

impl From<Refused<GrantError>> for GrantRefused {
    fn from(e: Refused<GrantError>) -> Self {
        match e {
            Refused::Rule(GrantError::InvalidGrant { reason }) => Self::Invalid(reason),
            Refused::Rule(GrantError::NotFound) => Self::Invalid(InvalidGrantReason::WrongSecret),
            Refused::Rule(GrantError::Expired) => Self::Expired,
            Refused::Rule(other) => Self::Command(CommandError::rejected(other)),
            Refused::Command(other) => Self::Command(other),
        }
    }
}

impl From<countersign_eventstore::StoreError> for GrantRefused {
    fn from(e: countersign_eventstore::StoreError) -> Self {
        Self::Command(e.into())
    }
}

/// Grant commands on one store.
#[derive(Clone)]
pub struct GrantCommands {
    store: SharedStore,
    vault: KeyVault,
    secrets: ServerSecrets,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for GrantCommands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantCommands").finish_non_exhaustive()
    }
}

fn new_grant_id() -> Result<GrantId, CommandError> {
    let mut id = [0u8; 16];
    random_bytes(&mut id)?;
    Ok(GrantId::from_bytes(id))
}

fn new_secret() -> Result<Zeroizing<[u8; 32]>, CommandError> {
    let mut secret = Zeroizing::new([0u8; 32]);
    random_bytes(secret.as_mut())?;
    Ok(secret)
}

/// A fresh token for `grant`, and the hash its grant keeps.
fn new_token(grant: GrantId) -> Result<(GrantToken, [u8; 32]), CommandError> {
    let secret = new_secret()?;
    Ok((GrantToken::new(grant, &secret), secret_hash(&secret)))
}

fn with_server(metadata: &Metadata, server: ServerId) -> Metadata {
    Metadata {
        server_id: Some(server.to_string()),
        ..metadata.clone()
    }
}

impl GrantCommands {
    pub fn new(
        store: SharedStore,
        vault: KeyVault,
        secrets: ServerSecrets,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            store,
            vault,
            secrets,
            clock,
        }
    }

    async fn run(
        &self,
        grant: GrantRef,
        command: GrantCommand,
        metadata: &Metadata,
    ) -> Result<Executed<GrantEvent>, Refused<GrantError>> {
        let mut ctx = Context::new(self.clock.now());
        execute_typed::<Grant>(
            &self.store,
            &grant.stream(),
            command,
            &mut ctx,
            &with_server(metadata, grant.server_id),
            None,
        )
        .await
    }

    /// The private key (P-256 scalar bytes) the IdP signs with: the server's own key
    /// (`kid: None`, vault [`crate::server::signing_key_ref`]) or a rotated OIDC key (vault
    /// [`crate::server::oidc_key_ref`]). `None` when the vault has none (a deleted server).
    pub async fn signing_key(
        &self,
        server: ServerId,
        kid: Option<&str>,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, CommandError> {
        let key_ref = match kid {
            None => crate::server::signing_key_ref(server),
            Some(kid) => crate::server::oidc_key_ref(server, kid),
        };
        Ok(self.vault.get(&key_ref).await?)
    }

    /// The grant's current state, from its own stream.
    pub async fn load(&self, grant: GrantRef) -> Result<Loaded<Grant>, CommandError> {
        load::<Grant>(&self.store, &grant.stream()).await
    }

    /// The OIDC `sub` of a user at a server: `base64url(HMAC(server secret, "oidc-sub" ‖ 0 ‖
    /// user digest))`, 43 characters, stable, per server, not the userid nor an account key.
    pub async fn subject(
        &self,
        server: ServerId,
        user: UserDigest,
    ) -> Result<String, CommandError> {
        let sub = self
            .secrets
            .derive(server, SUBJECT_LABEL, user.as_bytes())
            .await?;
        Ok(URL_SAFE_NO_PAD.encode(sub))
    }

    /// Issues an authorization code for a session that is logged in: the answer is the code
    /// (hand it to the redirect) and its grant. A session that is not logged in is `Rejected`
    /// (409).
    pub async fn issue_code(
        &self,
        request: CodeRequest,
        metadata: &Metadata,
    ) -> Result<(GrantToken, GrantRef, Executed<GrantEvent>), CommandError> {
        let server = request.session.server_id;
        let facts = login_facts(&self.store, request.session, self.clock.now())
            .await?
            .filter(|f| f.status == SessionStatus::LoggedIn)
            .ok_or_else(|| CommandError::Rejected {
                kind: ErrorKind::Conflict,
                message: "the login session is not logged in".into(),
            })?;
        let grant = GrantRef::new(server, new_grant_id()?);
        let (code, code_hash) = new_token(grant.grant_id)?;
        let now = self.clock.now();
        let command = IssueCode {
            code: GrantCodeIssued {
                client_id: request.client_id,
                session: request.session,
                account_id: facts.account_id,
                user: facts.user,
                scope: request.scope,
                redirect_uri: request.redirect_uri,
                code_challenge: request.code_challenge,
                nonce: request.nonce,
                code_hash,
                code_expires_at: now.plus_secs(CODE_LIFETIME_SECS),
                auth_time: facts.auth_time.min(now),
                amr: facts.amr,
                acr: facts.acr,
            },
        };
        let done = self
            .run(grant, command.into(), metadata)
            .await
            .map_err(|e| match e {
                Refused::Rule(rule) => CommandError::rejected(rule),
                Refused::Command(other) => other,
            })?;
        Ok((code, grant, done))
    }

    /// Records a CIBA request whose push login is open: the answer is the `auth_req_id` and
    /// the grant.
    pub async fn request_ciba(
        &self,
        request: CibaRequest,
        metadata: &Metadata,
    ) -> Result<(GrantToken, GrantRef, Executed<GrantEvent>), CommandError> {
        let server = request.session.server_id;
        let grant = GrantRef::new(server, new_grant_id()?);
        let auth_req_id = self.ciba_auth_req_id(grant).await?;
        let notification_token = match &request.notification_token {
            Some(token) => Some(self.seal_notification_token(grant, token).await?),
            None => None,
        };
        let command = RequestCiba {
            request: GrantCibaRequested {
                client_id: request.client_id,
                session: request.session,
                user: request.user,
                scope: request.scope,
                binding_message: request.binding_message,
                expires_at: request.expires_at,
                interval_secs: request.interval_secs,
                ping: request.ping,
                notification_token,
            },
        };
        let done = self
            .run(grant, command.into(), metadata)
            .await
            .map_err(|e| match e {
                Refused::Rule(rule) => CommandError::rejected(rule),
                Refused::Command(other) => other,
            })?;
        Ok((auth_req_id, grant, done))
    }

    /// The `auth_req_id` of a CIBA grant, rebuilt from the server's secret (the ping sender
    /// needs it; it is never stored).
    pub async fn ciba_auth_req_id(&self, grant: GrantRef) -> Result<GrantToken, CommandError> {
        let secret = Zeroizing::new(
            self.secrets
                .derive(
                    grant.server_id,
                    CIBA_AUTH_REQ_LABEL,
                    grant.grant_id.as_bytes(),
                )
                .await?,
        );
        Ok(GrantToken::new(grant.grant_id, &secret))
    }

    /// The grant a presented `auth_req_id` names at `server`, if it is one of ours (its secret
    /// is the derived one; compared in constant time). `None` for anything else.
    pub async fn check_ciba_auth_req_id(
        &self,
        server: ServerId,
        auth_req_id: &str,
    ) -> Result<Option<GrantRef>, CommandError> {
        let Some(presented) = parse_token(server, auth_req_id) else {
            return Ok(None);
        };
        let expected = Zeroizing::new(
            self.secrets
                .derive(
                    server,
                    CIBA_AUTH_REQ_LABEL,
                    presented.grant.grant_id.as_bytes(),
                )
                .await?,
        );
        let ok = countersign_domain::grant::digest_eq(&expected, &presented.secret);
        Ok(ok.then_some(presented.grant))
    }

    async fn notification_key(&self, grant: GrantRef) -> Result<DataKey, CommandError> {
        let key = self
            .secrets
            .derive(
                grant.server_id,
                CIBA_NOTIFICATION_LABEL,
                grant.grant_id.as_bytes(),
            )
            .await?;
        Ok(DataKey::from_bytes(key))
    }

    async fn seal_notification_token(
        &self,
        grant: GrantRef,
        token: &str,
    ) -> Result<Sealed, CommandError> {
        let key = self.notification_key(grant).await?;
        let mut nonce = [0u8; 12];
        random_bytes(&mut nonce)?;
        let aad = countersign_domain::seal::aad(&grant.stream(), "notification_token");
        key.seal(nonce, &aad, token.as_bytes())
            .map_err(|_| CommandError::Internal("could not seal a notification token".into()))
    }

    /// Opens a CIBA grant's sealed client notification token (for the ping).
    pub async fn open_notification_token(
        &self,
        grant: GrantRef,
        sealed: &Sealed,
    ) -> Result<Zeroizing<String>, CommandError> {
        let key = self.notification_key(grant).await?;
        let aad = countersign_domain::seal::aad(&grant.stream(), "notification_token");
        let bytes =
            Zeroizing::new(key.open(&aad, sealed).map_err(|_| {
                CommandError::Internal("a notification token does not open".into())
            })?);
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| CommandError::Internal("a notification token is not text".into()))?;
        Ok(Zeroizing::new(text.to_owned()))
    }

    /// Redeems an authorization code at the token endpoint for `client` (authenticated by
    /// the caller). A refresh token comes with it when the login session is continuous.
    pub async fn redeem_code(
        &self,
        server: ServerId,
        client: OidcClientId,
        code: &str,
        redirect_uri: &str,
        code_verifier: Option<&str>,
        metadata: &Metadata,
    ) -> Result<IssuedTokens, GrantRefused> {
        let Some(presented) = parse_token(server, code) else {
            return Err(GrantRefused::Invalid(InvalidGrantReason::WrongSecret));
        };
        let grant = presented.grant;
        let loaded = self.load(grant).await?;
        let session = match &loaded.state {
            // A code that is not this one or not this client's is refused before the session
            // is read: guesses cost one stream read. The aggregate checks both again.
            Grant::CodeIssued(c)
                if !countersign_domain::grant::digest_eq(&c.code_hash, &presented.hash) =>
            {
                return Err(GrantRefused::Invalid(InvalidGrantReason::WrongSecret));
            }
            Grant::CodeIssued(c) if c.client_id != client => {
                return Err(GrantRefused::Invalid(InvalidGrantReason::WrongClient));
            }
            Grant::CodeIssued(c) => Some(c.session),
            _ => None,
        };
        // A session that ended since the code was issued gets no tokens; reuse detection
        // and every other refusal are the aggregate's, whatever the session.
        let mut continuous = false;
        if let Some(session) = session {
            let facts = login_facts(&self.store, session, self.clock.now()).await?;
            match facts {
                Some(f) if f.status == SessionStatus::LoggedIn => continuous = f.continuous,
                Some(f) => return Err(GrantRefused::SessionNotLoggedIn(f.status)),
                None => return Err(GrantRefused::SessionNotLoggedIn(SessionStatus::NotOpened)),
            }
        }
        let (access_token, access_hash) = new_token(grant.grant_id)?;
        let refresh = if continuous {
            Some(new_token(grant.grant_id)?)
        } else {
            None
        };
        let access_expires_at = self.clock.now().plus_secs(ACCESS_TOKEN_LIFETIME_SECS);
        let command = RedeemCode {
            client_id: client,
            redirect_uri: redirect_uri.to_owned(),
            verifier_digest: code_verifier.map(pkce_digest),
            code_hash: presented.hash,
            tokens: NewTokens {
                access_hash,
                refresh_hash: refresh.as_ref().map(|(_, h)| *h),
                access_expires_at,
            },
        };
        self.issue(
            grant,
            loaded,
            command.into(),
            (access_token, refresh.map(|(t, _)| t), access_expires_at),
            &with_server(metadata, server),
        )
        .await
    }

    /// Decides a token-issuing `command` on the `loaded` grant and appends it (`metadata`
    /// names the server already); answers the `tokens` (access token, refresh token, access
    /// expiry) it issued, or the reuse it detected ([`Self::finish`]).
    async fn issue(
        &self,
        grant: GrantRef,
        loaded: Loaded<Grant>,
        command: GrantCommand,
        tokens: (GrantToken, Option<GrantToken>, Timestamp),
        metadata: &Metadata,
    ) -> Result<IssuedTokens, GrantRefused> {
        let before = loaded.state.clone();
        let mut ctx = Context::new(self.clock.now());
        let done = crate::decide_and_append::<Grant>(
            &self.store,
            &grant.stream(),
            Some(loaded),
            command,
            &mut ctx,
            metadata,
            None,
        )
        .await?;
        let (access_token, refresh_token, access_expires_at) = tokens;
        Self::finish(
            grant,
            before,
            access_token,
            refresh_token,
            access_expires_at,
            done,
        )
    }

    /// The answer to a command that issued tokens, or the reuse it detected.
    ///
    /// `before` is the state the command was first decided on. The events the command wrote
    /// were decided on it or, after a lost race, on a later state that gave the same
    /// decision (a code is issued once, a refresh matches only the current token), so
    /// applying them to it gives the grant as the answer needs it without reading it again.
    fn finish(
        grant: GrantRef,
        before: Grant,
        access_token: GrantToken,
        refresh_token: Option<GrantToken>,
        access_expires_at: Timestamp,
        done: Executed<GrantEvent>,
    ) -> Result<IssuedTokens, GrantRefused> {
        if let Some(GrantEvent::Revoked(revoked)) = done.events.first() {
            tracing::warn!(
                grant = %grant.grant_id,
                server = %grant.server_id,
                reason = revoked.reason.as_str(),
                "a spent code or refresh token was presented again; grant revoked"
            );
            return Err(GrantRefused::Reused {
                reason: revoked.reason,
                position: done.position,
            });
        }
        let mut state = before;
        for event in &done.events {
            state.apply(event);
        }
        Ok(IssuedTokens {
            grant,
            access_token,
            refresh_token,
            access_expires_at,
            state,
            executed: done,
        })
    }

    /// Completes a CIBA request whose push login logged in: issues its tokens, once. The
    /// caller checked the `auth_req_id` ([`Self::check_ciba_auth_req_id`]) and authenticated
    /// `client`. A session that is not logged in is [`GrantRefused::SessionNotLoggedIn`]
    /// (the caller maps pending / aborted / expired to CIBA's errors).
    pub async fn complete_ciba(
        &self,
        grant: GrantRef,
        client: OidcClientId,
        metadata: &Metadata,
    ) -> Result<IssuedTokens, GrantRefused> {
        let loaded = self.load(grant).await?;
        let session = match &loaded.state {
            Grant::CibaPending(r) => r.session,
            Grant::NotIssued => return Err(GrantRefused::Invalid(InvalidGrantReason::WrongSecret)),
            Grant::Revoked { .. } => {
                return Err(GrantRefused::Invalid(InvalidGrantReason::Revoked));
            }
            Grant::CodeIssued(_) | Grant::Active(_) => {
                return Err(GrantRefused::Invalid(InvalidGrantReason::WrongStep));
            }
        };
        let facts = login_facts(&self.store, session, self.clock.now()).await?;
        let facts = match facts {
            Some(f) if f.status == SessionStatus::LoggedIn => f,
            Some(f) => return Err(GrantRefused::SessionNotLoggedIn(f.status)),
            None => {
                let status = self
                    .store
                    .read_stream(&session.stream(), None, Direction::Forwards, 1_000)
                    .await?;
                let mut state = Session::default();
                for recorded in &status {
                    state.apply(&recorded.decode::<SessionEvent>()?);
                }
                return Err(GrantRefused::SessionNotLoggedIn(state.status()));
            }
        };
        let (access_token, access_hash) = new_token(grant.grant_id)?;
        let refresh = if facts.continuous {
            Some(new_token(grant.grant_id)?)
        } else {
            None
        };
        let access_expires_at = self.clock.now().plus_secs(ACCESS_TOKEN_LIFETIME_SECS);
        let command = CompleteCiba {
            client_id: client,
            account_id: facts.account_id,
            auth_time: facts.auth_time.min(self.clock.now()),
            amr: facts.amr,
            acr: facts.acr,
            tokens: NewTokens {
                access_hash,
                refresh_hash: refresh.as_ref().map(|(_, h)| *h),
                access_expires_at,
            },
        };
        self.issue(
            grant,
            loaded,
            command.into(),
            (access_token, refresh.map(|(t, _)| t), access_expires_at),
            &with_server(metadata, grant.server_id),
        )
        .await
    }

    /// Spends a refresh token of `client` for a new access and refresh token. Refused once
    /// the login session is no longer logged in (nothing written); a spent refresh token
    /// presented again revokes the grant.
    pub async fn refresh(
        &self,
        server: ServerId,
        client: OidcClientId,
        refresh_token: &str,
        metadata: &Metadata,
    ) -> Result<IssuedTokens, GrantRefused> {
        let Some(presented) = parse_token(server, refresh_token) else {
            return Err(GrantRefused::Invalid(InvalidGrantReason::WrongSecret));
        };
        let grant = presented.grant;
        let loaded = self.load(grant).await?;
        if let Grant::Active(active) = &loaded.state {
            // Only a presentation the aggregate would accept depends on the session; a reuse
            // revokes whatever the session does.
            let current = active
                .refresh_hash
                .is_some_and(|h| countersign_domain::grant::digest_eq(&h, &presented.hash));
            if current && active.origin.client_id() == client {
                match login_facts(&self.store, active.origin.session(), self.clock.now()).await? {
                    Some(f) if f.status == SessionStatus::LoggedIn => {}
                    Some(f) => return Err(GrantRefused::SessionNotLoggedIn(f.status)),
                    None => {
                        return Err(GrantRefused::SessionNotLoggedIn(SessionStatus::NotOpened));
                    }
                }
            }
        }
        let (access_token, new_access_hash) = new_token(grant.grant_id)?;
        let (refresh, new_refresh_hash) = new_token(grant.grant_id)?;
        let access_expires_at = self.clock.now().plus_secs(ACCESS_TOKEN_LIFETIME_SECS);
        let command = Refresh {
            client_id: client,
            refresh_hash: presented.hash,
            new_access_hash,
            new_refresh_hash,
            access_expires_at,
        };
        self.issue(
            grant,
            loaded,
            command.into(),
            (access_token, Some(refresh), access_expires_at),
            &with_server(metadata, server),
        )
        .await
    }

    /// Revokes a grant (nothing new if it is revoked already; `NotFound` if it never existed).
    pub async fn revoke(
        &self,
        grant: GrantRef,
        reason: RevokeReason,
        metadata: &Metadata,
    ) -> Result<Executed<GrantEvent>, CommandError> {
        self.run(grant, Revoke { reason }.into(), metadata)
            .await
            .map_err(|e| match e {
                Refused::Rule(rule) => CommandError::rejected(rule),
                Refused::Command(other) => other,
            })
    }

    /// RFC 7009: revokes the grant of a presented access or refresh token of `client`. A token
    /// that is not one (unknown, wrong secret, another client's, revoked already) changes
    /// nothing and is not an error: the answer is whether anything was written.
    pub async fn revoke_token(
        &self,
        server: ServerId,
        client: OidcClientId,
        token: &str,
        metadata: &Metadata,
    ) -> Result<Option<Executed<GrantEvent>>, CommandError> {
        let Some(presented) = parse_token(server, token) else {
            return Ok(None);
        };
        let loaded = self.load(presented.grant).await?;
        let Grant::Active(active) = &loaded.state else {
            return Ok(None);
        };
        let eq = countersign_domain::grant::digest_eq;
        let matches = eq(&active.access_hash, &presented.hash)
            | active.refresh_hash.is_some_and(|h| eq(&h, &presented.hash));
        if !matches || active.origin.client_id() != client {
            return Ok(None);
        }
        let mut ctx = Context::new(self.clock.now());
        let command = Revoke {
            reason: RevokeReason::Client,
        };
        let done = crate::decide_and_append::<Grant>(
            &self.store,
            &presented.grant.stream(),
            Some(loaded),
            command.into(),
            &mut ctx,
            &with_server(metadata, server),
            None,
        )
        .await
        .map_err(|e| match e {
            Refused::Rule(rule) => CommandError::rejected(rule),
            Refused::Command(other) => other,
        })?;
        Ok(Some(done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_their_grant_and_hide_their_secret() {
        let server = ServerId::from_bytes([1; 16]);
        let grant = GrantId::from_bytes([2; 16]);
        let token = GrantToken::new(grant, &[3; 32]);
        assert_eq!(token.expose().len(), 64);
        assert_eq!(format!("{token:?}"), "GrantToken(..)");
        let presented = parse_token(server, token.expose()).unwrap();
        assert_eq!(presented.grant, GrantRef::new(server, grant));
        assert_eq!(presented.hash, secret_hash(&[3; 32]));
        assert!(!format!("{presented:?}").contains("3, 3"));
        assert!(parse_token(server, "short").is_none());
        assert!(parse_token(server, &"!".repeat(64)).is_none());
        assert!(parse_token(server, &"é".repeat(32)).is_none());
    }
}
