//! The sender interface between the Message Center's queue and the push services.
//!
//! Owns what one push attempt is ([`OutgoingPush`]), what it can come to ([`SendOutcome`]) and
//! the [`PushSender`] trait the FCM ([`crate::fcm`]) and APNs ([`crate::apns`]) senders
//! implement. Rules:
//! - A sender never retries on its own beyond the one credential refresh the push services'
//!   documentation asks for (401/403 → new credential → one more try → [`SendOutcome::AuthFailed`]);
//!   backoff and `Retry-After` belong to the queue, which reads [`SendOutcome::Retry`].
//! - The payload is the sealed envelope (ciphertext) or a wake-up naming a message id: nothing a
//!   sender puts on the wire can name a user, an account or a session.
//! - Reasons in outcomes are the push service's status words (`UNREGISTERED`, `BadDeviceToken`,
//!   a status code, a transport error's kind): never a push token, a credential or a body.
//! - Time is an input ([`WallClock`]): credential lifetimes and JWT `iat`s are computed from it,
//!   so tests move the clock instead of sleeping.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// The push service a mailbox's app instance listens on: the protocol's own (FCM over the
/// HTTP v1 API, APNs over the HTTP/2 provider API); [`Platform::as_str`] is the stable
/// lower-case name used in metrics labels, the tables and the protocol.
pub use countersign_protocol::mc::Platform;

/// How urgently the push service should wake the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Deliver now, waking the device (FCM `HIGH`, APNs `10`): logins, transactions.
    High,
    /// May be batched for power saving (FCM `NORMAL`, APNs `5`).
    Normal,
}

/// What a push carries.
#[derive(Clone, PartialEq, Eq)]
pub enum PushPayload {
    /// The sealed envelope bytes (sent base64url, no padding, as `cs`).
    Envelope(Vec<u8>),
    /// Too big for a push: only the message id travels (hex, as `cs_wake`) and the app pulls.
    WakeUp,
}

impl fmt::Debug for PushPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Envelope(bytes) => write!(f, "Envelope({} bytes)", bytes.len()),
            Self::WakeUp => f.write_str("WakeUp"),
        }
    }
}

/// One push attempt, as the queue hands it to a sender.
#[derive(Clone, PartialEq, Eq)]
pub struct OutgoingPush {
    /// Which service the token belongs to (a sender refuses the other platform's pushes).
    pub platform: Platform,
    /// The FCM registration token or the APNs device token (hex).
    pub push_token: String,
    /// The APNs topic (bundle id) or the Android package; empty: the sender's configured default.
    pub app_id: String,
    /// The message id (also the wake-up's content and, hex, the APNs `apns-id`).
    pub message_id: [u8; 16],
    /// When the message stops being worth delivering (Unix ms): FCM `ttl`, APNs `apns-expiration`.
    pub expires_at_ms: u64,
    /// FCM `android.priority` / APNs `apns-priority`.
    pub priority: Priority,
    /// FCM `collapse_key` / APNs `apns-collapse-id` (at most 64 bytes; longer ones are not sent).
    pub collapse_id: Option<String>,
    /// The envelope or a wake-up.
    pub payload: PushPayload,
}

impl fmt::Debug for OutgoingPush {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The push token identifies a device to the push service: kept out of logs.
        f.debug_struct("OutgoingPush")
            .field("platform", &self.platform)
            .field("push_token", &"<redacted>")
            .field("app_id", &self.app_id)
            .field("message_id", &hex::encode(self.message_id))
            .field("expires_at_ms", &self.expires_at_ms)
            .field("priority", &self.priority)
            .field("collapse_id", &self.collapse_id)
            .field("payload", &self.payload)
            .finish()
    }
}

/// What one [`PushSender::send`] came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// The push service accepted the message for the device.
    Delivered,
    /// The token is no longer valid (FCM `UNREGISTERED`, APNs `410 Unregistered`): drop it, the
    /// mailbox keeps working by pull.
    TokenDropped {
        /// The service's word for it.
        reason: String,
    },
    /// Try again later (429, 500, 503, a transport failure); `after` is the service's
    /// `Retry-After` when it sent one.
    Retry {
        /// The service's `Retry-After`, if any.
        after: Option<Duration>,
        /// The status or transport failure.
        reason: String,
    },
    /// The service refused this message for good (FCM `INVALID_ARGUMENT`, APNs `BadDeviceToken`,
    /// a payload too large...): count it, do not retry.
    Failed {
        /// The service's word for it.
        reason: String,
    },
    /// The credential was refused even after one refresh: an operator must look at it.
    AuthFailed {
        /// The service's word for it.
        reason: String,
    },
}

impl SendOutcome {
    /// A stable label for metrics: `delivered`, `token_dropped`, `retry`, `failed`, `auth_failed`.
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::TokenDropped { .. } => "token_dropped",
            Self::Retry { .. } => "retry",
            Self::Failed { .. } => "failed",
            Self::AuthFailed { .. } => "auth_failed",
        }
    }
}

/// Something that hands pushes to a push service.
#[async_trait]
pub trait PushSender: Send + Sync + fmt::Debug {
    /// Tries to hand `push` to the service once (plus at most one credential refresh).
    async fn send(&self, push: &OutgoingPush) -> SendOutcome;
}

/// The wall clock senders read for credential lifetimes (Unix seconds).
pub trait WallClock: Send + Sync + fmt::Debug {
    /// Seconds since the Unix epoch.
    fn now_unix_secs(&self) -> u64;
}

/// The system clock: the senders are an edge of the system (they talk to Google and Apple,
/// whose credentials carry wall-clock times), so this is where the clock is read.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemWallClock;

impl WallClock for SystemWallClock {
    fn now_unix_secs(&self) -> u64 {
        #[allow(clippy::disallowed_methods)] // the edge that reads the clock, see the type's doc
        let now = std::time::SystemTime::now();
        now.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

/// A clock a test moves by hand.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock standing at `unix_secs`.
    #[must_use]
    pub fn new(unix_secs: u64) -> Arc<Self> {
        Arc::new(Self(AtomicU64::new(unix_secs)))
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_secs(), Ordering::SeqCst);
    }

    /// Sets the clock.
    pub fn set(&self, unix_secs: u64) {
        self.0.store(unix_secs, Ordering::SeqCst);
    }
}

impl WallClock for ManualClock {
    fn now_unix_secs(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The `Retry-After` of an answer, in its delay-seconds form (the form FCM and APNs send);
/// an HTTP-date or garbage counts as absent.
pub(crate) fn retry_after(headers: &hyper::HeaderMap) -> Option<Duration> {
    headers
        .get(hyper::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// The payload's JSON fields (`cs` or `cs_wake`), shared by both senders.
pub(crate) fn payload_fields(push: &OutgoingPush) -> (&'static str, String) {
    match &push.payload {
        PushPayload::Envelope(bytes) => ("cs", b64url(bytes)),
        PushPayload::WakeUp => ("cs_wake", hex::encode(push.message_id)),
    }
}

/// The collapse id if it fits the services' 64-byte limit.
pub(crate) fn collapse_id(push: &OutgoingPush) -> Option<&str> {
    push.collapse_id
        .as_deref()
        .filter(|c| !c.is_empty() && c.len() <= 64)
}

/// Why a sender could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum PushConfigError {
    /// The FCM service-account JSON is not one (missing fields, not JSON).
    #[error("the service account JSON is malformed: {0}")]
    ServiceAccount(String),
    /// The private key is not a PEM key of the kind the service needs (RSA for FCM, P-256 for APNs).
    #[error("the private key is not a usable {0} key")]
    Key(&'static str),
    /// A base URL or token URI is not an http(s) URL.
    #[error("{0} is not a usable http(s) URL")]
    Url(&'static str),
    /// The extra CA PEM holds no certificate, or one rustls refuses.
    #[error("the extra trusted CA PEM is unusable")]
    Ca,
    /// rustls refused the TLS configuration.
    #[error("the TLS configuration was refused")]
    Tls,
}

/// The pooled HTTP client both senders use: HTTP/1.1 or HTTP/2 (ALPN) over rustls with the
/// ring provider, trusting the system's roots plus an optional extra CA (a stand-in's).
pub(crate) type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<hyper::body::Bytes>,
>;

/// Builds the pooled client; `http2_only` for APNs (which speaks nothing else).
pub(crate) fn http_client(
    extra_ca_pem: Option<&str>,
    http2_only: bool,
) -> Result<HttpClient, PushConfigError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;

    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    if !native.errors.is_empty() {
        tracing::debug!(
            errors = native.errors.len(),
            "some system root certificates could not be loaded"
        );
    }
    roots.add_parsable_certificates(native.certs);
    if let Some(pem) = extra_ca_pem {
        let mut added = 0usize;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|_| PushConfigError::Ca)?;
            roots.add(cert).map_err(|_| PushConfigError::Ca)?;
            added += 1;
        }
        if added == 0 {
            return Err(PushConfigError::Ca);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|_| PushConfigError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let connector = if http2_only {
        builder.enable_http2().build()
    } else {
        builder.enable_all_versions().build()
    };
    let mut client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new());
    client
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .http2_only(http2_only);
    Ok(client.build(connector))
}

/// A push service's answer, its body read up to [`MAX_ANSWER_BYTES`].
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: hyper::StatusCode,
    pub(crate) headers: hyper::HeaderMap,
    pub(crate) body: hyper::body::Bytes,
}

/// Push services answer with small JSON bodies; anything longer is cut off unread.
pub(crate) const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Sends `request` and reads the answer; `Err` is a transport failure's kind (no details: they
/// may hold URLs), to be retried.
pub(crate) async fn exchange(
    client: &HttpClient,
    request: hyper::Request<http_body_util::Full<hyper::body::Bytes>>,
    timeout: Duration,
) -> Result<Answer, String> {
    use http_body_util::BodyExt as _;
    let work = async {
        let response = client.request(request).await.map_err(|e| {
            tracing::debug!(error = %e, "push service request failed");
            if e.is_connect() {
                "connect"
            } else {
                "transport"
            }
            .to_owned()
        })?;
        let (parts, body) = response.into_parts();
        let body = http_body_util::Limited::new(body, MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|_| "answer body".to_owned())?
            .to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err("timeout".to_owned()))
}

/// base64url without padding, the JWT alphabet.
pub(crate) fn b64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Parses an http(s) URL and drops a trailing `/`, so paths can be appended.
pub(crate) fn base_url(url: &str, what: &'static str) -> Result<String, PushConfigError> {
    let uri: hyper::Uri = url.parse().map_err(|_| PushConfigError::Url(what))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(_)) => Ok(url.trim_end_matches('/').to_owned()),
        _ => Err(PushConfigError::Url(what)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(payload: PushPayload) -> OutgoingPush {
        OutgoingPush {
            platform: Platform::Fcm,
            push_token: "secret-token".into(),
            app_id: "com.example".into(),
            message_id: [0xab; 16],
            expires_at_ms: 1,
            priority: Priority::High,
            collapse_id: Some("x".repeat(65)),
            payload,
        }
    }

    #[test]
    fn debug_hides_the_token_and_the_envelope() {
        let p = push(PushPayload::Envelope(b"ciphertext!".to_vec()));
        let shown = format!("{p:?}");
        assert!(!shown.contains("secret-token"), "{shown}");
        assert!(!shown.contains("ciphertext"), "{shown}");
        assert!(shown.contains("11 bytes"), "{shown}");
    }

    #[test]
    fn payload_fields_are_base64url_or_the_hex_id() {
        let (k, v) = payload_fields(&push(PushPayload::Envelope(vec![0xfb, 0xff])));
        assert_eq!((k, v.as_str()), ("cs", "-_8"));
        let (k, v) = payload_fields(&push(PushPayload::WakeUp));
        assert_eq!((k, v.as_str()), ("cs_wake", "ab".repeat(16).as_str()));
    }

    #[test]
    fn an_overlong_collapse_id_is_not_sent() {
        let mut p = push(PushPayload::WakeUp);
        assert_eq!(collapse_id(&p), None);
        p.collapse_id = Some("login".into());
        assert_eq!(collapse_id(&p), Some("login"));
    }

    #[test]
    fn retry_after_reads_delay_seconds_only() {
        let mut h = hyper::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(hyper::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(
            hyper::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
    }
}
