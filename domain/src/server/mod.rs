//! The server (tenant) aggregate: identity key, settings, API keys, OIDC clients and OIDC
//! signing keys (their rules: [`oidc`]).
//!
//! Lifecycle: `NotCreated --CreateServer--> Active --DeleteServer--> Deleted` (terminal).
//! Rules enforced by [`Server::decide`]:
//! - the public key is a valid P-256 point; the event stores its uncompressed SEC1 form and
//!   SHA-256 thumbprint (the private key never reaches the domain);
//! - settings: name 1..=100 characters without control characters; logo `https`, ≤ 2048
//!   bytes; session timeout 30..=86400 s; default ping time 0..=3600 s and below the timeout;
//!   second-factor reuse window 0..=3600 s; at least one second factor allowed; a Data
//!   Service URL absolute `http(s)` (no credentials), ≤ 2048 bytes, its timeout 100..=30000 ms;
//! - a configuration that changes nothing emits nothing;
//! - API keys: id never reused (even after revocation), label 1..=100 characters, at most
//!   [`MAX_ACTIVE_API_KEYS`] active; revoking an unknown key is `ApiKeyNotFound`, revoking a
//!   revoked key emits nothing;
//! - a deleted server refuses every command with [`ServerError::Deleted`];
//! - a new server names its user streams with keyed digests
//!   ([`UserDigestScheme::HmacSha256`]); servers created before keep the unkeyed scheme their
//!   `server.created` v1 implies, so their existing streams stay where they are.

mod events;
pub mod oidc;
#[cfg(test)]
mod oidc_tests;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

pub use events::*;
pub use oidc::{
    CibaMode, CibaSettings, MAX_OIDC_CLIENTS, OidcClientError, OidcClientKind,
    OidcClientRegistered, OidcClientRemoved, OidcClientSecretRotated, OidcClientSettings,
    OidcClientState, OidcClientUpdated, OidcKeyRotated, RegisterOidcClient, RemoveOidcClient,
    RotateOidcClientSecret, RotateOidcKey, UpdateOidcClient, oidc_kid,
};

use crate::aggregate::{Aggregate, Classify, Context, ErrorKind};
use crate::ids::{ApiKeyId, OidcClientId, ServerId, UserDigestScheme};
use crate::validate::{self, ValidationError};

/// Most API keys a server may have active at once.
pub const MAX_ACTIVE_API_KEYS: usize = 20;
/// Longest server name, in characters.
pub const NAME_MAX_CHARS: usize = 100;
/// Longest API key label, in characters.
pub const LABEL_MAX_CHARS: usize = 100;

/// Create a tenant. The edge generated `id` and the key pair and keeps the private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateServer {
    /// The new server's id.
    pub id: ServerId,
    /// Its display name.
    pub name: String,
    /// SEC1 P-256 public key, compressed or uncompressed.
    pub public_key: Vec<u8>,
}

/// Change some settings; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigureServer {
    /// New name.
    pub name: Option<String>,
    /// `Some(None)` removes the logo.
    pub logo_url: Option<Option<String>>,
    /// New second-factor policy, in full.
    pub second_factor: Option<SecondFactorPolicy>,
    /// New session timeout, seconds.
    pub session_timeout_secs: Option<u32>,
    /// New default ping time, seconds.
    pub default_ping_time_secs: Option<u32>,
    /// `Some(None)` removes the Data Service (the secure channel stops delivering).
    pub data_service: Option<Option<DataServiceSettings>>,
    /// Whether anonymous devices may create headless accounts.
    pub headless_enrolment: Option<bool>,
}

/// Record a new API key. The edge generated the token, showed it once, and passes its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueApiKey {
    /// The key's public id.
    pub key_id: ApiKeyId,
    /// The operator's label.
    pub label: String,
    /// SHA-256 of the token.
    pub secret_hash: [u8; 32],
}

/// Stop an API key from authenticating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokeApiKey {
    /// The key.
    pub key_id: ApiKeyId,
}

/// Delete the tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteServer;

/// Trust a third-party SFS's attestation key for this server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustSfsKey {
    /// SEC1 P-256 public key, compressed or uncompressed.
    pub public_key: Vec<u8>,
    /// Who runs it, 1..=100 characters.
    pub label: String,
}

/// Stop trusting an SFS key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DistrustSfsKey {
    /// SHA-256 of the compressed key.
    pub key_id: [u8; 32],
}

/// Commands of the server aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerCommand {
    /// See [`CreateServer`].
    Create(CreateServer),
    /// See [`ConfigureServer`].
    Configure(ConfigureServer),
    /// See [`IssueApiKey`].
    IssueApiKey(IssueApiKey),
    /// See [`RevokeApiKey`].
    RevokeApiKey(RevokeApiKey),
    /// See [`DeleteServer`].
    Delete(DeleteServer),
    /// See [`TrustSfsKey`].
    TrustSfsKey(TrustSfsKey),
    /// See [`DistrustSfsKey`].
    DistrustSfsKey(DistrustSfsKey),
    /// See [`RegisterOidcClient`].
    RegisterOidcClient(RegisterOidcClient),
    /// See [`UpdateOidcClient`].
    UpdateOidcClient(UpdateOidcClient),
    /// See [`RotateOidcClientSecret`].
    RotateOidcClientSecret(RotateOidcClientSecret),
    /// See [`RemoveOidcClient`].
    RemoveOidcClient(RemoveOidcClient),
    /// See [`RotateOidcKey`].
    RotateOidcKey(RotateOidcKey),
}

macro_rules! into_command {
    ($enum:ident { $($variant:ident($cmd:ty)),+ $(,)? }) => {
        $(impl From<$cmd> for $enum {
            fn from(c: $cmd) -> Self {
                Self::$variant(c)
            }
        })+
    };
}
pub(crate) use into_command;

into_command!(ServerCommand {
    Create(CreateServer),
    Configure(ConfigureServer),
    IssueApiKey(IssueApiKey),
    RevokeApiKey(RevokeApiKey),
    Delete(DeleteServer),
    TrustSfsKey(TrustSfsKey),
    DistrustSfsKey(DistrustSfsKey),
    RegisterOidcClient(RegisterOidcClient),
    UpdateOidcClient(UpdateOidcClient),
    RotateOidcClientSecret(RotateOidcClientSecret),
    RemoveOidcClient(RemoveOidcClient),
    RotateOidcKey(RotateOidcKey),
});

/// Why a server command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerError {
    /// The input breaks a rule. HTTP 422.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// `CreateServer` for an id that exists. HTTP 409.
    #[error("server already exists")]
    AlreadyExists,
    /// No server with this id. HTTP 404.
    #[error("server not found")]
    NotFound,
    /// The server was deleted. HTTP 410.
    #[error("server was deleted")]
    Deleted,
    /// An API key with this id exists or existed. HTTP 409.
    #[error("API key id already used")]
    ApiKeyExists,
    /// No API key with this id. HTTP 404.
    #[error("API key not found")]
    ApiKeyNotFound,
    /// The active-key limit is reached; revoke one first. HTTP 409.
    #[error("at most {max} API keys may be active")]
    TooManyApiKeys {
        /// The limit.
        max: usize,
    },
    /// An OIDC client's settings break a rule. HTTP 422.
    #[error(transparent)]
    OidcClient(#[from] OidcClientError),
    /// An OIDC client with this id exists or existed. HTTP 409.
    #[error("OIDC client id already used")]
    OidcClientExists,
    /// No OIDC client with this id (or it was removed). HTTP 404.
    #[error("OIDC client not found")]
    OidcClientNotFound,
    /// The client limit is reached; remove one first. HTTP 409.
    #[error("at most {max} OIDC clients may be registered")]
    TooManyOidcClients {
        /// The limit.
        max: usize,
    },
}

impl Classify for ServerError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Invalid(_) | Self::OidcClient(_) => ErrorKind::Invalid,
            Self::AlreadyExists
            | Self::ApiKeyExists
            | Self::TooManyApiKeys { .. }
            | Self::OidcClientExists
            | Self::TooManyOidcClients { .. } => ErrorKind::Conflict,
            Self::NotFound | Self::ApiKeyNotFound | Self::OidcClientNotFound => ErrorKind::NotFound,
            Self::Deleted => ErrorKind::Gone,
        }
    }
}

/// Whether an API key still authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKeyStatus {
    /// Usable.
    Active,
    /// Revoked; its id stays taken.
    Revoked,
}

/// A live server's write model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveServer {
    /// The tenant.
    pub id: ServerId,
    /// SHA-256 of the uncompressed public key.
    pub key_thumbprint: [u8; 32],
    /// Current settings.
    pub settings: ServerSettings,
    /// Every key ever issued.
    pub api_keys: BTreeMap<ApiKeyId, ApiKeyStatus>,
    /// Third-party SFS attestation keys this server accepts, by key id (SEC1 uncompressed).
    pub trusted_sfs_keys: BTreeMap<[u8; 32], Vec<u8>>,
    /// How this server's user streams are named (from `server.created`).
    pub user_digest: UserDigestScheme,
    /// Every OIDC client ever registered (removed ones kept, so ids are never reused).
    pub oidc_clients: BTreeMap<OidcClientId, OidcClientState>,
    /// The `kid`s of the OIDC signing keys, oldest first (the last one signs).
    pub oidc_keys: Vec<String>,
}

/// The server aggregate's state.
// Loaded once per command and dropped: the live variant's size costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Server {
    /// Nothing in the stream yet.
    #[default]
    NotCreated,
    /// Created and not deleted.
    Active(ActiveServer),
    /// Deleted: terminal.
    Deleted {
        /// The tenant.
        id: ServerId,
    },
}

impl Server {
    fn active(&self) -> Result<&ActiveServer, ServerError> {
        match self {
            Self::NotCreated => Err(ServerError::NotFound),
            Self::Active(active) => Ok(active),
            Self::Deleted { .. } => Err(ServerError::Deleted),
        }
    }
}

fn validate_settings(s: &ServerSettings) -> Result<(), ValidationError> {
    validate::display_text("name", &s.name, NAME_MAX_CHARS)?;
    if let Some(url) = &s.logo_url {
        validate::logo_url(url)?;
    }
    validate::in_range(
        "second_factor.login_reuse_window_secs",
        s.second_factor.login_reuse_window_secs,
        0,
        3600,
    )?;
    if !s.second_factor.pin_allowed && !s.second_factor.biometric_allowed {
        return Err(ValidationError::NoSecondFactorAllowed);
    }
    validate::in_range("session_timeout_secs", s.session_timeout_secs, 30, 86_400)?;
    if let Some(ds) = &s.data_service {
        validate::data_service_url(&ds.url)?;
        validate::in_range(
            "data_service.timeout_ms",
            ds.timeout_ms,
            DataServiceSettings::MIN_TIMEOUT_MS,
            DataServiceSettings::MAX_TIMEOUT_MS,
        )?;
    }
    validate::in_range("default_ping_time_secs", s.default_ping_time_secs, 0, 3600)?;
    if s.default_ping_time_secs >= s.session_timeout_secs {
        return Err(ValidationError::PingNotBelowTimeout {
            ping: s.default_ping_time_secs,
            timeout: s.session_timeout_secs,
        });
    }
    Ok(())
}

fn decide_create(cmd: CreateServer) -> Result<Vec<ServerEvent>, ServerError> {
    let (public_key, key_thumbprint) =
        validate::p256_public_key(&cmd.public_key).ok_or(ValidationError::PublicKey)?;
    let settings = ServerSettings::defaults(cmd.name);
    validate_settings(&settings)?;
    Ok(vec![ServerEvent::Created(ServerCreated {
        server_id: cmd.id,
        public_key,
        key_thumbprint,
        settings,
        user_digest: UserDigestScheme::HmacSha256,
    })])
}

fn decide_configure(
    server: &ActiveServer,
    cmd: ConfigureServer,
) -> Result<Vec<ServerEvent>, ServerError> {
    let mut settings = server.settings.clone();
    if let Some(name) = cmd.name {
        settings.name = name;
    }
    if let Some(logo_url) = cmd.logo_url {
        settings.logo_url = logo_url;
    }
    if let Some(policy) = cmd.second_factor {
        settings.second_factor = policy;
    }
    if let Some(timeout) = cmd.session_timeout_secs {
        settings.session_timeout_secs = timeout;
    }
    if let Some(ping) = cmd.default_ping_time_secs {
        settings.default_ping_time_secs = ping;
    }
    if let Some(data_service) = cmd.data_service {
        settings.data_service = data_service;
    }
    if let Some(headless) = cmd.headless_enrolment {
        settings.headless_enrolment = headless;
    }
    // Validating the merged result checks cross-field rules against the values that will hold.
    validate_settings(&settings)?;
    if settings == server.settings {
        return Ok(Vec::new());
    }
    Ok(vec![ServerEvent::Configured(ServerConfigured { settings })])
}

fn decide_issue(
    server: &ActiveServer,
    cmd: IssueApiKey,
    ctx: &Context<'_>,
) -> Result<Vec<ServerEvent>, ServerError> {
    validate::display_text("label", &cmd.label, LABEL_MAX_CHARS)?;
    if server.api_keys.contains_key(&cmd.key_id) {
        return Err(ServerError::ApiKeyExists);
    }
    let active = server
        .api_keys
        .values()
        .filter(|s| **s == ApiKeyStatus::Active)
        .count();
    if active >= MAX_ACTIVE_API_KEYS {
        return Err(ServerError::TooManyApiKeys {
            max: MAX_ACTIVE_API_KEYS,
        });
    }
    Ok(vec![ServerEvent::ApiKeyIssued(ApiKeyIssued {
        key_id: cmd.key_id,
        label: cmd.label,
        secret_hash: cmd.secret_hash,
        issued_at: ctx.now,
    })])
}

fn decide_revoke(
    server: &ActiveServer,
    cmd: RevokeApiKey,
    ctx: &Context<'_>,
) -> Result<Vec<ServerEvent>, ServerError> {
    match server.api_keys.get(&cmd.key_id) {
        None => Err(ServerError::ApiKeyNotFound),
        Some(ApiKeyStatus::Revoked) => Ok(Vec::new()),
        Some(ApiKeyStatus::Active) => Ok(vec![ServerEvent::ApiKeyRevoked(ApiKeyRevoked {
            key_id: cmd.key_id,
            revoked_at: ctx.now,
        })]),
    }
}

/// The id attestations name an SFS key by: SHA-256 of its compressed SEC1 form.
#[must_use]
pub fn sfs_key_id(public_key: &[u8]) -> Option<[u8; 32]> {
    use p256::elliptic_curve::sec1::ToSec1Point as _;
    use sha2::Digest as _;
    let key = p256::PublicKey::from_sec1_bytes(public_key).ok()?;
    Some(sha2::Sha256::digest(key.as_affine().to_sec1_point(true).as_bytes()).into())
}

impl Aggregate for Server {
    type Command = ServerCommand;
    type Event = ServerEvent;
    type Error = ServerError;

    fn decide(
        &self,
        command: ServerCommand,
        ctx: &mut Context<'_>,
    ) -> Result<Vec<ServerEvent>, ServerError> {
        match command {
            ServerCommand::Create(cmd) => match self {
                Self::NotCreated => decide_create(cmd),
                Self::Active(_) => Err(ServerError::AlreadyExists),
                Self::Deleted { .. } => Err(ServerError::Deleted),
            },
            ServerCommand::Configure(cmd) => decide_configure(self.active()?, cmd),
            ServerCommand::IssueApiKey(cmd) => decide_issue(self.active()?, cmd, ctx),
            ServerCommand::RevokeApiKey(cmd) => decide_revoke(self.active()?, cmd, ctx),
            ServerCommand::TrustSfsKey(cmd) => {
                let server = self.active()?;
                validate::display_text("label", &cmd.label, LABEL_MAX_CHARS)?;
                let (public_key, _) =
                    validate::p256_public_key(&cmd.public_key).ok_or(ValidationError::PublicKey)?;
                let key_id = sfs_key_id(&public_key).ok_or(ValidationError::PublicKey)?;
                if server.trusted_sfs_keys.contains_key(&key_id) {
                    return Ok(Vec::new());
                }
                Ok(vec![ServerEvent::SfsKeyTrusted(SfsKeyTrusted {
                    key_id,
                    public_key,
                    label: cmd.label,
                })])
            }
            ServerCommand::DistrustSfsKey(cmd) => {
                let server = self.active()?;
                if !server.trusted_sfs_keys.contains_key(&cmd.key_id) {
                    return Ok(Vec::new());
                }
                Ok(vec![ServerEvent::SfsKeyDistrusted(SfsKeyDistrusted {
                    key_id: cmd.key_id,
                })])
            }
            ServerCommand::RegisterOidcClient(cmd) => oidc::decide_register(self.active()?, cmd),
            ServerCommand::UpdateOidcClient(cmd) => oidc::decide_update(self.active()?, cmd),
            ServerCommand::RotateOidcClientSecret(cmd) => {
                oidc::decide_rotate_secret(self.active()?, cmd)
            }
            ServerCommand::RemoveOidcClient(cmd) => oidc::decide_remove(self.active()?, cmd),
            ServerCommand::RotateOidcKey(cmd) => oidc::decide_rotate_key(self.active()?, cmd, ctx),
            ServerCommand::Delete(DeleteServer) => {
                self.active()?;
                Ok(vec![ServerEvent::Deleted(ServerDeleted {
                    deleted_at: ctx.now,
                })])
            }
        }
    }

    fn apply(&mut self, event: &ServerEvent) {
        match (event, &mut *self) {
            (ServerEvent::Created(e), _) => {
                *self = Self::Active(ActiveServer {
                    id: e.server_id,
                    key_thumbprint: e.key_thumbprint,
                    settings: e.settings.clone(),
                    api_keys: BTreeMap::new(),
                    trusted_sfs_keys: BTreeMap::new(),
                    user_digest: e.user_digest,
                    oidc_clients: BTreeMap::new(),
                    oidc_keys: Vec::new(),
                });
            }
            (ServerEvent::Configured(e), Self::Active(s)) => s.settings = e.settings.clone(),
            (ServerEvent::ApiKeyIssued(e), Self::Active(s)) => {
                s.api_keys.insert(e.key_id, ApiKeyStatus::Active);
            }
            (ServerEvent::ApiKeyRevoked(e), Self::Active(s)) => {
                s.api_keys.insert(e.key_id, ApiKeyStatus::Revoked);
            }
            (ServerEvent::Deleted(_), Self::Active(s)) => *self = Self::Deleted { id: s.id },
            (ServerEvent::SfsKeyTrusted(e), Self::Active(s)) => {
                s.trusted_sfs_keys.insert(e.key_id, e.public_key.clone());
            }
            (ServerEvent::SfsKeyDistrusted(e), Self::Active(s)) => {
                s.trusted_sfs_keys.remove(&e.key_id);
            }
            (ServerEvent::OidcClientRegistered(e), Self::Active(s)) => {
                s.oidc_clients.insert(
                    e.client_id,
                    OidcClientState {
                        settings: e.settings.clone(),
                        removed: false,
                    },
                );
            }
            (ServerEvent::OidcClientUpdated(e), Self::Active(s)) => {
                if let Some(client) = s.oidc_clients.get_mut(&e.client_id) {
                    client.settings = e.settings.clone();
                }
            }
            // The write model needs no secret hash: rotation only checks the client exists.
            (ServerEvent::OidcClientSecretRotated(_), Self::Active(_)) => {}
            (ServerEvent::OidcClientRemoved(e), Self::Active(s)) => {
                if let Some(client) = s.oidc_clients.get_mut(&e.client_id) {
                    client.removed = true;
                }
            }
            (ServerEvent::OidcKeyRotated(e), Self::Active(s)) => s.oidc_keys.push(e.kid.clone()),
            // History is a fact: an event that cannot follow the current state (a corrupt or
            // hand-edited stream) changes nothing rather than inventing state.
            _ => {}
        }
    }
}
