//! Login-session commands: the edge work around the session aggregate.
//!
//! The caller names a session by its nonce, a bearer secret of at least 128 bits. Here it is
//! checked and turned into the session's internal id, `hsid = HMAC-SHA256(server secret,
//! "hsid" ‖ nonce)`, and dropped: no event, row or log line ever holds the nonce. A session
//! takes its timeout and default ping time from the server's settings at the moment it is
//! opened, read from the server's own stream (the write model), not from a read model.

use std::sync::Arc;

use base64::Engine as _;
use countersign_domain::server::Server;
use countersign_domain::session::{
    Abort, AbortedBy, ConfirmSession, EndByServer, Expire, Fail, LogIn, LogOut, LogoutReason,
    OpenAppLogin, OpenPushSession, OpenSession, Ping, ProvokeSession, ScanSession, Session,
    SessionCommand, SessionEvent, SessionFailure, VerifySecondFactor,
};
use countersign_domain::{
    AccountId, Clock, Context, ErrorKind, Hsid, ServerId, SessionRef, UserDigest,
};
use countersign_eventstore::{Metadata, SharedStore};

use crate::secrets::ServerSecrets;
use crate::{CommandError, Executed, Loaded, execute, execute_from, load};

/// Fewest bytes of entropy a nonce must carry.
pub const MIN_NONCE_BYTES: usize = 16;
/// Longest nonce accepted, in characters.
pub const MAX_NONCE_CHARS: usize = 512;

/// Why a nonce was refused (HTTP 422). Never repeats the nonce.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NonceError {
    #[error("the nonce must be hex or base64")]
    Encoding,
    #[error("the nonce must carry at least 128 bits (16 bytes); it carries {0}")]
    TooShort(usize),
    #[error("the nonce is longer than {MAX_NONCE_CHARS} characters")]
    TooLong,
}

/// How many bytes a nonce carries: hex (even length) first, then base64 (standard or
/// URL-safe, padded or not).
pub fn nonce_bytes(nonce: &str) -> Result<usize, NonceError> {
    if nonce.len() > MAX_NONCE_CHARS {
        return Err(NonceError::TooLong);
    }
    let decoded = if nonce.len().is_multiple_of(2) && nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        nonce.len() / 2
    } else {
        let engines = [
            &base64::engine::general_purpose::STANDARD,
            &base64::engine::general_purpose::STANDARD_NO_PAD,
            &base64::engine::general_purpose::URL_SAFE,
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ];
        engines
            .iter()
            .find_map(|engine| engine.decode(nonce).ok())
            .map(|bytes| bytes.len())
            .ok_or(NonceError::Encoding)?
    };
    if decoded < MIN_NONCE_BYTES {
        return Err(NonceError::TooShort(decoded));
    }
    Ok(decoded)
}

/// What a business system sets when it opens a session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionOptions {
    /// Ping interval; `None` takes the server's default.
    pub ping_time_secs: Option<u32>,
    /// Shown to the user while confirming.
    pub announce_info: Option<String>,
    /// Shown to the user once logged in.
    pub session_info: Option<String>,
    /// The user the session is meant for, when known.
    pub user: Option<UserDigest>,
}

/// Session commands on one store.
#[derive(Clone)]
pub struct SessionCommands {
    store: SharedStore,
    secrets: ServerSecrets,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for SessionCommands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionCommands").finish_non_exhaustive()
    }
}

impl SessionCommands {
    pub fn new(store: SharedStore, secrets: ServerSecrets, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            secrets,
            clock,
        }
    }

    /// The session a nonce names at a server. Checks the nonce first (422 when it is too
    /// weak), then derives; answers `NotFound` for a server without a secret.
    pub async fn session_ref(
        &self,
        server: ServerId,
        nonce: &str,
    ) -> Result<SessionRef, CommandError> {
        nonce_bytes(nonce).map_err(|e| CommandError::Rejected {
            kind: ErrorKind::Invalid,
            message: e.to_string(),
        })?;
        let hsid = self
            .secrets
            .derive(server, "hsid", nonce.as_bytes())
            .await?;
        Ok(SessionRef::new(server, Hsid::from_bytes(hsid)))
    }

    async fn run(
        &self,
        session: SessionRef,
        command: SessionCommand,
        metadata: &Metadata,
        idempotency_key: Option<&str>,
    ) -> Result<Executed<SessionEvent>, CommandError> {
        let mut ctx = Context::new(self.clock.now());
        let metadata = Metadata {
            server_id: Some(session.server_id.to_string()),
            ..metadata.clone()
        };
        execute::<Session>(
            &self.store,
            &session.stream(),
            command,
            &mut ctx,
            &metadata,
            idempotency_key,
        )
        .await
    }

    /// Opens the session (or finds it open with the same options: no new event).
    pub async fn open(
        &self,
        session: SessionRef,
        options: SessionOptions,
        metadata: &Metadata,
        idempotency_key: Option<&str>,
    ) -> Result<Executed<SessionEvent>, CommandError> {
        let command = self.open_command(session, options).await?;
        self.run(session, command.into(), metadata, idempotency_key)
            .await
    }

    /// Opens an AppLogin session (the app logging in to itself; device gateway) confirmed for
    /// `account`: continuous, pinged every `ping_time_secs`, meant for `user`, with the
    /// server's session timeout. One append holds both events.
    pub async fn open_app_login(
        &self,
        session: SessionRef,
        ping_time_secs: u32,
        account: AccountId,
        user: UserDigest,
        metadata: &Metadata,
    ) -> Result<Executed<SessionEvent>, CommandError> {
        let settings = self.settings(session.server_id).await?;
        let command = OpenAppLogin {
            open: OpenSession {
                session,
                ping_time_secs,
                timeout_secs: settings.session_timeout_secs,
                app_login: true,
                user: Some(user),
                announce_info: None,
                session_info: None,
            },
            account_id: account,
        };
        self.run(session, command.into(), metadata, None).await
    }

    /// Opens the session as a push login to `push_to` (provoke on a user or an account), or
    /// finds it open so already (a retried provoke: no new event).
    pub async fn open_push(
        &self,
        session: SessionRef,
        options: SessionOptions,
        push_to: Vec<AccountId>,
        metadata: &Metadata,
        idempotency_key: Option<&str>,
    ) -> Result<Executed<SessionEvent>, CommandError> {
        let open = self.open_command(session, options).await?;
        let command = OpenPushSession { open, push_to };
        self.run(session, command.into(), metadata, idempotency_key)
            .await
    }

    /// Asks the account that last logged in on the session to log in again (provokeLogin),
    /// with the server's session timeout.
    pub async fn provoke(
        &self,
        session: SessionRef,
        announce_info: Option<String>,
        session_info: Option<String>,
        metadata: &Metadata,
        idempotency_key: Option<&str>,
    ) -> Result<Executed<SessionEvent>, CommandError> {
        let settings = self.settings(session.server_id).await?;
        let command = ProvokeSession {
            timeout_secs: settings.session_timeout_secs,
            announce_info,
            session_info,
        };
        self.run(session, command.into(), metadata, idempotency_key)
            .await
    }

    async fn open_command(
        &self,
        session: SessionRef,
        options: SessionOptions,
    ) -> Result<OpenSession, CommandError> {
        let settings = self.settings(session.server_id).await?;
        Ok(OpenSession {
            session,
            ping_time_secs: options
                .ping_time_secs
                .unwrap_or(settings.default_ping_time_secs),
            timeout_secs: settings.session_timeout_secs,
            app_login: false,
            user: options.user,
            announce_info: options.announce_info,
            session_info: options.session_info,
        })
    }

    /// The server's settings for opening sessions (cached for [`crate::secrets::SETTINGS_TTL`]).
    async fn settings(
        &self,
        server: ServerId,
    ) -> Result<countersign_domain::server::ServerSettings, CommandError> {
        let settings = match self.secrets.cached_settings(server) {
            Some(settings) => settings,
            None => {
                let loaded = load::<Server>(&self.store, &server.stream()).await?;
                match loaded.state {
                    Server::Active(active) => {
                        self.secrets
                            .remember_settings(server, active.settings.clone());
                        active.settings
                    }
                    Server::NotCreated | Server::Deleted { .. } => {
                        return Err(CommandError::Rejected {
                            kind: ErrorKind::NotFound,
                            message: "server not found".into(),
                        });
                    }
                }
            }
        };
        Ok(settings)
    }

    /// The business system ends the session: logout when logged in, abort before.
    pub async fn end_by_server(
        &self,
        session: SessionRef,
        metadata: &Metadata,
    ) -> Result<Executed<SessionEvent>, CommandError> {
        self.run(session, EndByServer.into(), metadata, None).await
    }

    /// Records that the session's deadline passed, if it did (nothing otherwise).
    pub async fn expire(
        &self,
        session: SessionRef,
        metadata: &Metadata,
    ) -> Result<Executed<SessionEvent>, CommandError> {
        self.run(session, Expire.into(), metadata, None).await
    }

    /// A device picked up the session (from the device gateway).
    pub async fn scan(
        &self,
        session: SessionRef,
        metadata: &Metadata,
    ) -> Result<Executed<SessionEvent>, CommandError> {
        self.run(session, ScanSession.into(), metadata, None).await
    }

    /// A device logged in with an account (from the device gateway, after its checks).
    pub async fn log_in(
        &self,
        session: SessionRef,
        account_id: AccountId,
        user: UserDigest,
        metadata: &Metadata,
    ) -> Result<Executed<SessionEvent>, CommandError> {
        self.run(session, LogIn { account_id, user }.into(), metadata, None)
            .await
    }

    /// The user chose an account for the session (device gateway).
    pub async fn confirm(
        &self,
        session: SessionRef,
        account_id: AccountId,
        metadata: &Metadata,
    ) -> Result<Executed<SessionEvent>, CommandError> {
        self.run(
            session,
            ConfirmSession { account_id }.into(),
            metadata,
            None,
        )
        .await
    }

    /// The confirmed account proved a second factor (device gateway, after checking the SFS
    /// attestation).
    pub async fn verify_second_factor(
        &self,
        session: SessionRef,
        command: VerifySecondFactor,
        metadata: &Metadata,
    ) -> Result<Executed<SessionEvent>, CommandError> {
        self.run(session, command.into(), metadata, None).await
    }

    /// A continuous session is still in use (device gateway).
    pub async fn ping(
        &self,
        session: SessionRef,
        metadata: &Metadata,
    ) -> Result<Executed<SessionEvent>, CommandError> {
        self.run(session, Ping.into(), metadata, None).await
    }

    /// The user logged out in the app (device gateway).
    pub async fn log_out_by_user(
        &self,
        session: SessionRef,
        metadata: &Metadata,
    ) -> Result<Executed<SessionEvent>, CommandError> {
        let command = LogOut {
            reason: LogoutReason::User,
        };
        self.run(session, command.into(), metadata, None).await
    }

    /// The user declined the session in the app (device gateway).
    pub async fn abort_by_user(
        &self,
        session: SessionRef,
        metadata: &Metadata,
    ) -> Result<Executed<SessionEvent>, CommandError> {
        let command = Abort {
            by: AbortedBy::User,
        };
        self.run(session, command.into(), metadata, None).await
    }

    /// The session cannot go on on the device (device gateway).
    pub async fn fail(
        &self,
        session: SessionRef,
        reason: SessionFailure,
        metadata: &Metadata,
    ) -> Result<Executed<SessionEvent>, CommandError> {
        self.run(session, Fail { reason }.into(), metadata, None)
            .await
    }

    /// The challenge an SFS attestation must carry for `purpose` (`"login"`, `"upgrade"`,
    /// `"transaction"`) on `id` by `account`: `HMAC-SHA256(server secret, "sf-challenge" ‖
    /// purpose ‖ 0x00 ‖ id ‖ account id)`. Derived, so the server keeps no state per challenge
    /// and any instance recognises it.
    pub async fn second_factor_challenge(
        &self,
        server: ServerId,
        purpose: &str,
        id: &[u8],
        account: AccountId,
    ) -> Result<[u8; 32], CommandError> {
        let mut input = Vec::with_capacity(purpose.len() + 1 + id.len() + 16);
        input.extend_from_slice(purpose.as_bytes());
        input.push(0);
        input.extend_from_slice(id);
        input.extend_from_slice(account.as_bytes());
        self.secrets.derive(server, "sf-challenge", &input).await
    }

    /// Runs a command on a session the caller loaded already (the device gateway checks the
    /// state first), without loading it again unless it lost a race.
    pub async fn run_on(
        &self,
        session: SessionRef,
        loaded: Loaded<Session>,
        command: SessionCommand,
        metadata: &Metadata,
    ) -> Result<Executed<SessionEvent>, CommandError> {
        let mut ctx = Context::new(self.clock.now());
        let metadata = Metadata {
            server_id: Some(session.server_id.to_string()),
            ..metadata.clone()
        };
        execute_from::<Session>(
            &self.store,
            &session.stream(),
            loaded,
            command,
            &mut ctx,
            &metadata,
        )
        .await
    }

    /// The session's current state, from its own stream (the write model).
    pub async fn load(&self, session: SessionRef) -> Result<Loaded<Session>, CommandError> {
        load::<Session>(&self.store, &session.stream()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_strength() {
        assert_eq!(nonce_bytes(&"ab".repeat(16)), Ok(16));
        assert_eq!(nonce_bytes(&"ab".repeat(15)), Err(NonceError::TooShort(15)));
        assert_eq!(nonce_bytes("AAECAwQFBgcICQoLDA0ODw=="), Ok(16));
        assert_eq!(nonce_bytes("AAECAwQFBgcICQoLDA0ODw"), Ok(16));
        assert_eq!(nonce_bytes("-_-_-_-_-_-_-_-_-_-_-w"), Ok(16));
        assert_eq!(nonce_bytes("short"), Err(NonceError::Encoding));
        assert_eq!(
            nonce_bytes("AAAA"),
            Err(NonceError::TooShort(2)),
            "hex first"
        );
        assert_eq!(nonce_bytes("AAA="), Err(NonceError::TooShort(2)));
        assert_eq!(
            nonce_bytes("not base64 at all!!"),
            Err(NonceError::Encoding)
        );
        assert_eq!(nonce_bytes(&"a".repeat(600)), Err(NonceError::TooLong));
    }
}
