//! Events of the server aggregate (stream `server-{id}`).
//!
//! Each payload carries the facts a reader needs without replaying rules: `server.configured`
//! holds the full resulting settings, not a diff, so a projection just stores it.

use serde::{Deserialize, Serialize};

use super::oidc::{
    OidcClientRegistered, OidcClientRemoved, OidcClientSecretRotated, OidcClientUpdated,
    OidcKeyRotated,
};
use crate::ids::{ApiKeyId, ServerId, Timestamp, UserDigestScheme};

/// Which second factors a server accepts and when logins need one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecondFactorPolicy {
    /// Accounts may use the app's PIN.
    pub pin_allowed: bool,
    /// Accounts may use a biometric-protected key.
    pub biometric_allowed: bool,
    /// Whether a login needs a second factor at all (transactions always do).
    pub require_for_login: bool,
    /// How long, in seconds (0..=3600), a verified second factor may be reused for another
    /// login; 0 means never. Transactions never reuse one.
    pub login_reuse_window_secs: u32,
}

impl Default for SecondFactorPolicy {
    /// Both factors allowed, required for login, no reuse: the strictest useful setting.
    fn default() -> Self {
        Self {
            pin_allowed: true,
            biometric_allowed: true,
            require_for_login: true,
            login_reuse_window_secs: 0,
        }
    }
}

/// Where a server's secure-channel messages go: the Data Service the NS POSTs app data to
/// (docs/data-service.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataServiceSettings {
    /// Absolute `http` or `https` URL, at most 2048 bytes, no credentials or fragment.
    pub url: String,
    /// How long the NS waits for the DS's answer, milliseconds (100..=30000).
    pub timeout_ms: u32,
}

impl DataServiceSettings {
    /// Default DS timeout, milliseconds.
    pub const DEFAULT_TIMEOUT_MS: u32 = 5000;
    /// Shortest DS timeout, milliseconds.
    pub const MIN_TIMEOUT_MS: u32 = 100;
    /// Longest DS timeout, milliseconds.
    pub const MAX_TIMEOUT_MS: u32 = 30_000;
}

/// A server's complete configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerSettings {
    /// Shown to users in the app: 1..=100 characters, no control characters.
    pub name: String,
    /// Absolute `https` URL of the logo, at most 2048 bytes; none by default.
    pub logo_url: Option<String>,
    /// Second-factor policy.
    pub second_factor: SecondFactorPolicy,
    /// A session not completed within this many seconds (30..=86400) expires. Default 300.
    pub session_timeout_secs: u32,
    /// Ping interval of continuous sessions, seconds (0..=3600, below the timeout); 0 makes
    /// sessions one-shot. Default 0.
    pub default_ping_time_secs: u32,
    /// The Data Service secure-channel messages are delivered to; none by default (the
    /// secure channel answers `data_service_not_configured`). Absent from payloads written
    /// before it existed and from those without one, so they decode and encode unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_service: Option<DataServiceSettings>,
    /// Whether an anonymous device may create a headless account over the secure channel
    /// (its first `send_data`). Off by default: that is a write by an unauthenticated client,
    /// which the administrator opts in to. Absent when off (as in older payloads).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub headless_enrolment: bool,
}

impl ServerSettings {
    /// Default session timeout, seconds.
    pub const DEFAULT_SESSION_TIMEOUT_SECS: u32 = 300;
    /// Default ping time, seconds (one-shot sessions).
    pub const DEFAULT_PING_TIME_SECS: u32 = 0;

    /// The settings of a new server called `name`.
    #[must_use]
    pub fn defaults(name: String) -> Self {
        Self {
            name,
            logo_url: None,
            second_factor: SecondFactorPolicy::default(),
            session_timeout_secs: Self::DEFAULT_SESSION_TIMEOUT_SECS,
            default_ping_time_secs: Self::DEFAULT_PING_TIME_SECS,
            data_service: None,
            headless_enrolment: false,
        }
    }
}

/// `server.created` v2: a tenant exists, with its public key, default settings and the scheme
/// its user digests use (always [`UserDigestScheme::HmacSha256`] for servers created now).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerCreated {
    /// The tenant.
    pub server_id: ServerId,
    /// SEC1 uncompressed P-256 public key (65 bytes); the private key stays in the edge's vault.
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
    /// SHA-256 of `public_key`, which devices pin.
    #[serde(with = "serde_bytes")]
    pub key_thumbprint: [u8; 32],
    /// The initial settings (defaults plus the given name).
    pub settings: ServerSettings,
    /// How this server's user streams are named; fixed for the server's life.
    pub user_digest: UserDigestScheme,
}

/// `server.created` v1, written before user digests were keyed. It upcasts to v2 with
/// [`UserDigestScheme::Sha256Unkeyed`]: such a server's user streams were named with the
/// unkeyed digest and keep that name (see docs/event-log.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerCreatedV1 {
    /// The tenant.
    pub server_id: ServerId,
    /// SEC1 uncompressed P-256 public key.
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
    /// SHA-256 of `public_key`.
    #[serde(with = "serde_bytes")]
    pub key_thumbprint: [u8; 32],
    /// The initial settings.
    pub settings: ServerSettings,
}

impl From<ServerCreatedV1> for ServerEvent {
    fn from(old: ServerCreatedV1) -> Self {
        Self::Created(ServerCreated {
            server_id: old.server_id,
            public_key: old.public_key,
            key_thumbprint: old.key_thumbprint,
            settings: old.settings,
            user_digest: UserDigestScheme::Sha256Unkeyed,
        })
    }
}

/// `server.configured` v1: the settings after a change, in full.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerConfigured {
    /// The resulting settings.
    pub settings: ServerSettings,
}

/// `server.api_key_issued` v1: a key exists. Only the SHA-256 of its secret is recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyIssued {
    /// The key's public id.
    pub key_id: ApiKeyId,
    /// The operator's label: 1..=100 characters.
    pub label: String,
    /// SHA-256 of the secret token (high-entropy, so the hash cannot be reversed).
    #[serde(with = "serde_bytes")]
    pub secret_hash: [u8; 32],
    /// When it was issued.
    pub issued_at: Timestamp,
}

/// `server.api_key_revoked` v1: the key no longer authenticates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRevoked {
    /// The key.
    pub key_id: ApiKeyId,
    /// When it was revoked.
    pub revoked_at: Timestamp,
}

/// `server.deleted` v1: the tenant is gone; every later command is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerDeleted {
    /// When it was deleted.
    pub deleted_at: Timestamp,
}

/// `server.sfs_key_trusted` v1: the server accepts attestations signed by this SFS key (a
/// third-party app's second-factor server; the deployment's own SFS is always trusted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SfsKeyTrusted {
    /// SHA-256 of the compressed SEC1 key: the `kid` its attestations carry.
    #[serde(with = "serde_bytes")]
    pub key_id: [u8; 32],
    /// SEC1 uncompressed P-256 public key.
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
    /// Who runs it, for people.
    pub label: String,
}

/// `server.sfs_key_distrusted` v1: attestations by this key are refused from now on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SfsKeyDistrusted {
    /// The key's id.
    #[serde(with = "serde_bytes")]
    pub key_id: [u8; 32],
}

crate::domain_events! {
    /// Everything that happens to a server.
    pub enum ServerEvent {
        Created(ServerCreated) = ("server.created", 2),
        Configured(ServerConfigured) = ("server.configured", 1),
        ApiKeyIssued(ApiKeyIssued) = ("server.api_key_issued", 1),
        ApiKeyRevoked(ApiKeyRevoked) = ("server.api_key_revoked", 1),
        Deleted(ServerDeleted) = ("server.deleted", 1),
        SfsKeyTrusted(SfsKeyTrusted) = ("server.sfs_key_trusted", 1),
        SfsKeyDistrusted(SfsKeyDistrusted) = ("server.sfs_key_distrusted", 1),
        OidcClientRegistered(OidcClientRegistered) = ("server.oidc_client_registered", 1),
        OidcClientUpdated(OidcClientUpdated) = ("server.oidc_client_updated", 1),
        OidcClientSecretRotated(OidcClientSecretRotated) = ("server.oidc_client_secret_rotated", 1),
        OidcClientRemoved(OidcClientRemoved) = ("server.oidc_client_removed", 1),
        OidcKeyRotated(OidcKeyRotated) = ("server.oidc_key_rotated", 1),
    }
    upcast {
        ("server.created", 1) => ServerCreatedV1,
    }
}
