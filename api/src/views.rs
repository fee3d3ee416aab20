//! What goes over the wire: request bodies (unknown fields refused) and answers. Ids are
//! lowercase hex, times are milliseconds since the Unix epoch (UTC).

use std::collections::BTreeMap;

use countersign_domain::server::{DataServiceSettings, SecondFactorPolicy, ServerSettings};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Which second factor a server asks for at login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SecondFactorMode {
    /// No second factor for logins (transactions still need one: PIN or biometric).
    None,
    /// The app's PIN.
    Pin,
    /// A biometric-protected key.
    Biometric,
    /// Either.
    PinOrBiometric,
}

impl SecondFactorMode {
    /// The domain policy for this mode with the given reuse window.
    pub fn policy(self, cache_secs: u32) -> SecondFactorPolicy {
        let (pin, bio, required) = match self {
            Self::None => (true, true, false),
            Self::Pin => (true, false, true),
            Self::Biometric => (false, true, true),
            Self::PinOrBiometric => (true, true, true),
        };
        SecondFactorPolicy {
            pin_allowed: pin,
            biometric_allowed: bio,
            require_for_login: required,
            login_reuse_window_secs: cache_secs,
        }
    }

    /// The mode a domain policy expresses.
    pub fn of(policy: &SecondFactorPolicy) -> Self {
        match (
            policy.require_for_login,
            policy.pin_allowed,
            policy.biometric_allowed,
        ) {
            (false, _, _) => Self::None,
            (true, true, false) => Self::Pin,
            (true, false, true) => Self::Biometric,
            (true, _, _) => Self::PinOrBiometric,
        }
    }
}

/// `POST /v1/servers`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateServerRequest {
    /// Shown to users in the app: 1..=100 characters.
    #[schema(min_length = 1, max_length = 100)]
    pub name: String,
}

/// `PATCH /v1/servers/{server_id}`: only the fields given change.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateServerRequest {
    /// 1..=100 characters.
    #[schema(min_length = 1, max_length = 100)]
    pub name: Option<String>,
    /// An absolute `https` URL; `null` removes the logo.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub logo_url: Option<Option<String>>,
    /// Login second-factor policy.
    pub second_factor: Option<SecondFactorMode>,
    /// Seconds (0..=3600) a verified second factor may be reused for another login.
    #[schema(minimum = 0, maximum = 3600)]
    pub second_factor_cache_secs: Option<u32>,
    /// Seconds (30..=86400) a session may take to complete.
    #[schema(minimum = 30, maximum = 86400)]
    pub session_timeout_secs: Option<u32>,
    /// Default ping interval (0..=3600, below the timeout); 0 = one-shot sessions.
    #[schema(minimum = 0, maximum = 3600)]
    pub default_ping_time_secs: Option<u32>,
    /// Where the secure channel delivers app data (docs/data-service.md); `null` removes it.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<DataServiceView>)]
    pub data_service: Option<Option<DataServiceView>>,
    /// Whether an app with no account here may create a headless account on its first
    /// secure-channel message (default `false`).
    pub headless_enrolment: Option<bool>,
}

/// A server's Data Service: the URL the NS POSTs signed app data to, and how long it waits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DataServiceView {
    /// Absolute `http` or `https` URL, at most 2048 bytes, no credentials or fragment.
    #[schema(max_length = 2048)]
    pub url: String,
    /// Milliseconds (100..=30000) the NS waits for the DS's answer; default 5000.
    #[serde(default = "default_ds_timeout")]
    #[schema(minimum = 100, maximum = 30000, default = 5000)]
    pub timeout_ms: u32,
}

fn default_ds_timeout() -> u32 {
    DataServiceSettings::DEFAULT_TIMEOUT_MS
}

impl From<DataServiceView> for DataServiceSettings {
    fn from(v: DataServiceView) -> Self {
        Self {
            url: v.url,
            timeout_ms: v.timeout_ms,
        }
    }
}

impl From<&DataServiceSettings> for DataServiceView {
    fn from(s: &DataServiceSettings) -> Self {
        Self {
            url: s.url.clone(),
            timeout_ms: s.timeout_ms,
        }
    }
}

fn double_option<'de, D, T>(de: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(de).map(Some)
}

/// A virtual server.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServerView {
    pub server_id: String,
    pub name: String,
    pub logo_url: Option<String>,
    pub second_factor: SecondFactorMode,
    pub second_factor_cache_secs: u32,
    pub session_timeout_secs: u32,
    pub default_ping_time_secs: u32,
    /// The secure channel's Data Service; absent when none is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_service: Option<DataServiceView>,
    /// Whether apps may create headless accounts through the secure channel.
    #[serde(default)]
    pub headless_enrolment: bool,
    /// SEC1 uncompressed P-256 public key, hex.
    pub public_key: String,
    /// SHA-256 of the public key, hex: what apps pin.
    pub key_fingerprint: String,
    pub created_at: i64,
    /// Set once deleted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<i64>,
}

impl ServerView {
    pub fn new(
        server_id: String,
        settings: &ServerSettings,
        public_key: &[u8],
        fingerprint: &[u8],
        created_at: i64,
        deleted_at: Option<i64>,
    ) -> Self {
        Self {
            server_id,
            name: settings.name.clone(),
            logo_url: settings.logo_url.clone(),
            second_factor: SecondFactorMode::of(&settings.second_factor),
            second_factor_cache_secs: settings.second_factor.login_reuse_window_secs,
            session_timeout_secs: settings.session_timeout_secs,
            default_ping_time_secs: settings.default_ping_time_secs,
            data_service: settings.data_service.as_ref().map(DataServiceView::from),
            headless_enrolment: settings.headless_enrolment,
            public_key: hex::encode(public_key),
            key_fingerprint: hex::encode(fingerprint),
            created_at,
            deleted_at,
        }
    }
}

/// A write's answer carrying a server.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServerWritten {
    pub server: ServerView,
    /// The log position the write reached: pass it as `min_position` to read it back.
    pub position: Option<u64>,
}

/// A page of servers.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServerList {
    pub servers: Vec<ServerView>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// `POST /v1/servers/{server_id}/api-keys`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IssueApiKeyRequest {
    /// What the key is for: 1..=100 characters.
    #[schema(min_length = 1, max_length = 100)]
    pub label: String,
}

/// `POST /v1/servers/{server_id}/sfs-keys`: trust a third-party app's second-factor server.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrustSfsKeyRequest {
    /// The SFS attestation public key, SEC1 P-256, hex (compressed or uncompressed).
    #[schema(min_length = 66, max_length = 130)]
    pub public_key: String,
    /// Who runs it: 1..=100 characters.
    #[schema(min_length = 1, max_length = 100)]
    pub label: String,
}

/// A trusted SFS key.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SfsKeyTrustedView {
    /// SHA-256 of the compressed key, hex: the `kid` its attestations carry.
    pub key_id: String,
    /// The log position reached.
    pub position: Option<u64>,
}

/// A new API key. `token` is shown here once and never again.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiKeyIssued {
    pub key_id: String,
    pub label: String,
    /// The bearer token (≥ 256 random bits). Store it: it cannot be shown again.
    pub token: String,
    pub position: Option<u64>,
}

/// An API key, without its secret.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiKeyView {
    pub key_id: String,
    pub label: String,
    pub issued_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
}

/// A server's API keys.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiKeyList {
    pub api_keys: Vec<ApiKeyView>,
}

/// The answer of a write that returns nothing else.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Written {
    /// The log position reached (`null`: nothing was ever written there).
    pub position: Option<u64>,
}

/// `PUT /v1/servers/{server_id}/users/{userid}`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutUserRequest {
    /// The user's attributes after this call (names `[a-z0-9_.-]{1,64}`, values ≤ 4096
    /// bytes); attributes not named are removed.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// A user.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    pub userid: String,
    pub attributes: BTreeMap<String, String>,
}

/// A write's answer carrying a user.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UserWritten {
    pub user: UserView,
    pub position: Option<u64>,
}

/// A page of users, in registration order.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UserList {
    pub users: Vec<UserView>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<u64>,
}

/// An account: one app instance's registration for a user.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AccountView {
    pub account_id: String,
    pub app_instance: String,
    /// `pin`, `biometric`, or absent for a headless account.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub second_factor: Option<String>,
    /// SHA-256 of the account's signing key, hex.
    pub signing_key_fingerprint: String,
    pub registered_at: i64,
    /// What the app last said about its device (self-reported); absent until it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_data: Option<DeviceDataView>,
}

/// Device data an app reported over its secure channel (`account.device_data_changed`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeviceDataView {
    pub model: String,
    pub os: String,
    pub app_version: String,
    /// When it last changed, ms since the epoch.
    pub changed_at: i64,
}

/// A user's accounts.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AccountList {
    pub accounts: Vec<AccountView>,
}

/// `POST /v1/servers/{server_id}/enrolments`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEnrolmentRequest {
    /// A registered user.
    #[schema(min_length = 1, max_length = 256)]
    pub userid: String,
    /// Seconds the QR code stays valid (60..=604800, default 600).
    #[schema(minimum = 60, maximum = 604800)]
    pub ttl_secs: Option<u32>,
}

/// A QR code's payload in the text forms; images come from `format=png|svg`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct QrView {
    /// The CBOR payload, unpadded base64url.
    pub base64url: String,
    /// `countersign:<base64url>`, for app-to-app login on the same device.
    pub deep_link: String,
}

/// A started enrolment.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EnrolmentCreated {
    pub enrolment_id: String,
    pub state: String,
    pub expires_at: i64,
    pub qr: QrView,
    pub position: Option<u64>,
}

/// An enrolment's state.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EnrolmentView {
    pub enrolment_id: String,
    /// `pending`, `completed` or `expired`.
    pub state: String,
    pub expires_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
}

/// `PUT /v1/servers/{server_id}/sessions/{nonce}`; every field is optional and the body
/// itself may be empty.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutSessionRequest {
    /// Ping interval, seconds (0..=3600; 0 = one-shot); default: the server's.
    #[schema(minimum = 0, maximum = 3600)]
    pub ping_time_secs: Option<u32>,
    /// Shown to the user while confirming (≤ 1000 characters).
    pub announce_info: Option<String>,
    /// Shown to the user once logged in (≤ 1000 characters).
    pub session_info: Option<String>,
    /// The user this session is meant for, if known.
    pub userid: Option<String>,
}

/// A session as the business system sees it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SessionView {
    /// `pending`, `scanned`, `logged_in`, `logged_out`, `aborted`, `expired` or `failed`.
    pub state: String,
    /// `login` (opened by `PUT`, logged in from a QR code, link or push) or `app_login` (the
    /// app logged in to itself and handed its backend the web nonce this read was made with;
    /// docs/app-login.md).
    #[schema(example = "login")]
    pub kind: String,
    /// The logged-in user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub userid: Option<String>,
    /// The account that logged in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    /// The logged-in user's attributes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attributes: Option<BTreeMap<String, String>>,
    /// Whether `POST …/session/provoke` may ask for a login again: someone logged in on the
    /// session and that login is over (logged out) or was one-shot.
    pub can_provoke: bool,
    /// `ping_time_secs > 0`.
    pub continuous: bool,
    pub expires_at: i64,
    /// The log position of the session's last change: wait for it with `min_position`.
    pub position: u64,
}

/// The answer of `PUT …/sessions/{nonce}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SessionOpenedView {
    pub state: String,
    pub expires_at: i64,
    pub qr: QrView,
    /// The log position reached.
    pub position: Option<u64>,
}

/// `min_position` on reads.
#[derive(Debug, Clone, Copy, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReadParams {
    /// Wait (bounded) until the read model has processed this log position.
    #[param(minimum = 0)]
    pub min_position: Option<u64>,
}

/// Paging and `min_position`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// The `next` value of the previous page.
    pub after: Option<String>,
    /// Page size, 1..=1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// Wait (bounded) until the read model has processed this log position.
    #[param(minimum = 0)]
    pub min_position: Option<u64>,
}

/// How to serve a QR code.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum QrFormat {
    /// JSON with the text forms.
    #[default]
    Json,
    /// The CBOR payload bytes (`application/cbor`).
    Raw,
    /// The payload as unpadded base64url text.
    Base64url,
    /// The deep link as text.
    Link,
    /// A PNG image of `size` pixels.
    Png,
    /// An SVG image.
    Svg,
}

/// `format` and `size` of a QR answer.
#[derive(Debug, Clone, Copy, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct QrParams {
    pub format: Option<QrFormat>,
    /// Wait (bounded) until the read model has processed this log position.
    #[param(minimum = 0)]
    pub min_position: Option<u64>,
    /// Image size in pixels, 64..=2048 (default 256).
    #[param(minimum = 64, maximum = 2048)]
    pub size: Option<u32>,
}

/// `POST /v1/servers/{server_id}/transactions`: what the user is asked to sign.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTransactionRequest {
    /// The registered user who must sign.
    #[schema(min_length = 1, max_length = 256)]
    pub userid: String,
    /// The one account that may sign (32 hex digits), an active account of the user; any of
    /// the user's accounts when absent.
    pub account_id: Option<String>,
    /// The data to sign, standard base64 (at most 64 KiB decoded).
    pub data: String,
    /// The data's media type: 1..=255 printable ASCII characters, no spaces.
    #[schema(min_length = 1, max_length = 255)]
    pub content_type: String,
    /// The text shown to the user: 1..=16384 bytes of UTF-8.
    #[schema(min_length = 1)]
    pub text: String,
    /// Shown in a push or a list before the text (≤ 1000 characters).
    pub announce_info: Option<String>,
    /// Seconds to sign (30..=86400, default 300).
    #[schema(minimum = 30, maximum = 86400)]
    pub timeout_secs: Option<u32>,
}

/// A transaction as the business system sees it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TransactionView {
    pub transaction_id: String,
    /// `pending`, `presented`, `signed`, `rejected` or `expired`.
    pub status: String,
    /// The user who must sign (absent once the user was deleted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub userid: Option<String>,
    /// The one account that may sign, if the creator named one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    pub content_type: String,
    /// The data to sign, standard base64.
    pub data: String,
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_info: Option<String>,
    /// `api` (created here) or `device` (the app's own, stored once signed).
    pub origin: String,
    pub created_at: i64,
    /// After this instant it can no longer be signed.
    pub expires_at: i64,
    /// The account that signed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signed_by: Option<String>,
    /// The second factor the signature's attestation proves: `pin` or `biometric`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub factor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signed_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expired_at: Option<i64>,
    /// The log position of the transaction's last change: wait for it with `min_position`.
    pub position: u64,
}

/// How to serve an evidence bundle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EvidenceFormat {
    /// The canonical CBOR bundle (`application/cbor`), what verifiers check.
    #[default]
    Cbor,
    /// The same bundle as JSON, for people to read (byte strings as hex).
    Json,
}

/// `format` of an evidence answer.
#[derive(Debug, Clone, Copy, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EvidenceParams {
    pub format: Option<EvidenceFormat>,
}

/// One server-sent event as a client parses it from a `text/event-stream` body: its name
/// (`state`, `event`), its id (the log position it reflects) and its data (JSON text).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SseEvent {
    pub event: Option<String>,
    pub id: Option<String>,
    pub data: String,
}
