//! The APNs sender: Apple's HTTP/2 provider API with token-based (ES256 JWT) authentication.
//!
//! Owns the provider token and the mapping of APNs's answers onto [`SendOutcome`]. Rules:
//! - HTTP/2 over TLS only (ALPN `h2`), one pooled, multiplexed connection per host; the system's
//!   roots plus an optional extra CA (the stand-in's), never verification switched off.
//! - The provider token is an ES256 JWT, header `{"alg":"ES256","kid":key_id}`, claims
//!   `{"iss":team_id,"iat":now}`, signed with the `.p8` key (P-256); it is reused for
//!   [`PROVIDER_TOKEN_LIFETIME`] (Apple accepts 20–60 minutes and refuses refreshing more often
//!   than every 20) and regenerated early when APNs answers `403 ExpiredProviderToken` /
//!   `InvalidProviderToken`: then the send is tried once more, and a second refusal is
//!   [`SendOutcome::AuthFailed`].
//! - Headers: `apns-topic` (the push's app id, else the configured default), `apns-push-type:
//!   alert`, `apns-expiration` (Unix seconds), `apns-priority` `10`/`5`, `apns-collapse-id`
//!   (≤ 64 bytes), `apns-id` (the message id as a UUID). Body:
//!   `{"aps":{"alert":{"loc-key":"COUNTERSIGN_MESSAGE"},"mutable-content":1},"cs":…}` (or
//!   `"cs_wake"`): the notification service extension decrypts and shows the text.
//! - `410` → [`SendOutcome::TokenDropped`]; `400 BadDeviceToken` and other 4xx →
//!   [`SendOutcome::Failed`]; `429`/`500`/`503` and other 5xx, transport failures →
//!   [`SendOutcome::Retry`] with `Retry-After`.
//! - The signing key and provider tokens never reach a log, an error or `Debug`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, header};
use p256::ecdsa::SigningKey;
use p256::ecdsa::signature::Signer as _;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::credential::{self, CachedCredential, Fresh, Verdict};
use crate::push::{
    self, HttpClient, OutgoingPush, Platform, Priority, PushConfigError, PushSender, SendOutcome,
    SystemWallClock, WallClock,
};

/// Where Apple's production provider API lives.
pub const APNS_DEFAULT_BASE_URL: &str = "https://api.push.apple.com";
/// Apple's development (sandbox) provider API.
pub const APNS_SANDBOX_BASE_URL: &str = "https://api.sandbox.push.apple.com";
/// How long a provider token is used before a new one is made.
pub const PROVIDER_TOKEN_LIFETIME: Duration = Duration::from_secs(40 * 60);
/// The alert's localisation key: the app's notification service extension replaces the text.
pub const ALERT_LOC_KEY: &str = "COUNTERSIGN_MESSAGE";

/// The APNs sender's configuration.
#[derive(Clone)]
pub struct ApnsConfig {
    /// The provider API's base URL ([`APNS_DEFAULT_BASE_URL`], the sandbox, or a stand-in).
    pub base_url: String,
    /// The Apple developer team id, the JWT's `iss`.
    pub team_id: String,
    /// The key id of the `.p8` key, the JWT's `kid`.
    pub key_id: String,
    /// The `.p8` key (PKCS#8 PEM, P-256).
    pub signing_key_pem: Zeroizing<String>,
    /// The topic (bundle id) when a push's app id is empty.
    pub default_topic: String,
    /// A CA to trust beyond the system's roots (PEM), e.g. the stand-in's test CA.
    pub extra_ca_pem: Option<String>,
    /// How long one HTTP exchange may take before it counts as a transport failure.
    pub request_timeout: Duration,
}

impl ApnsConfig {
    /// The production API, system roots, a 10 s timeout.
    #[must_use]
    pub fn new(
        team_id: String,
        key_id: String,
        signing_key_pem: String,
        default_topic: String,
    ) -> Self {
        Self {
            base_url: APNS_DEFAULT_BASE_URL.to_owned(),
            team_id,
            key_id,
            signing_key_pem: Zeroizing::new(signing_key_pem),
            default_topic,
            extra_ca_pem: None,
            request_timeout: Duration::from_secs(10),
        }
    }
}

impl fmt::Debug for ApnsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApnsConfig")
            .field("base_url", &self.base_url)
            .field("team_id", &self.team_id)
            .field("key_id", &self.key_id)
            .field("signing_key_pem", &"<redacted>")
            .field("default_topic", &self.default_topic)
            .field("extra_ca_pem", &self.extra_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// Sends through APNs; share it (`Arc`): one HTTP/2 connection pool.
pub struct ApnsSender {
    http: HttpClient,
    key: SigningKey,
    team_id: String,
    key_id: String,
    base_url: String,
    default_topic: String,
    timeout: Duration,
    clock: Arc<dyn WallClock>,
    token: CachedCredential,
}

impl fmt::Debug for ApnsSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApnsSender")
            .field("base_url", &self.base_url)
            .field("team_id", &self.team_id)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Why a provider token could not be made.
struct SigningFailed;

impl ApnsSender {
    /// A sender on the system clock.
    ///
    /// # Errors
    /// A bad key, URL or CA ([`PushConfigError`]).
    pub fn new(config: ApnsConfig) -> Result<Self, PushConfigError> {
        Self::with_clock(config, Arc::new(SystemWallClock))
    }

    /// A sender reading `clock` for `iat`s and the token's age.
    ///
    /// # Errors
    /// A bad key, URL or CA ([`PushConfigError`]).
    pub fn with_clock(
        config: ApnsConfig,
        clock: Arc<dyn WallClock>,
    ) -> Result<Self, PushConfigError> {
        use p256::pkcs8::DecodePrivateKey as _;
        let key = SigningKey::from_pkcs8_pem(&config.signing_key_pem)
            .map_err(|_| PushConfigError::Key("P-256"))?;
        let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
        if !plain(&config.team_id) || !plain(&config.key_id) {
            return Err(PushConfigError::Key("APNs team id / key id"));
        }
        Ok(Self {
            http: push::http_client(config.extra_ca_pem.as_deref(), true)?,
            key,
            team_id: config.team_id,
            key_id: config.key_id,
            base_url: push::base_url(&config.base_url, "the APNs base URL")?,
            default_topic: config.default_topic,
            timeout: config.request_timeout,
            clock,
            token: CachedCredential::default(),
        })
    }

    /// How many provider tokens were made so far (tests, metrics).
    #[must_use]
    pub fn provider_tokens_made(&self) -> u64 {
        self.token.made()
    }

    /// The current provider token, or a new one when it is older than the lifetime or is the
    /// one APNs just `refused` (unless another send replaced it already).
    async fn provider_token(
        &self,
        refused: Option<u64>,
    ) -> Result<(Zeroizing<String>, u64), SigningFailed> {
        self.token
            .get(self.clock.as_ref(), refused, || async {
                let now = self.clock.now_unix_secs();
                let jwt = self.sign(now)?;
                Ok(Fresh {
                    secret: jwt,
                    use_until: now + PROVIDER_TOKEN_LIFETIME.as_secs(),
                    generation: self.token.next_generation(),
                })
            })
            .await
    }

    fn sign(&self, now: u64) -> Result<Zeroizing<String>, SigningFailed> {
        let header = serde_json::json!({"alg": "ES256", "kid": self.key_id});
        let claims = serde_json::json!({"iss": self.team_id, "iat": now});
        let signing_input = format!(
            "{}.{}",
            push::b64url(header.to_string().as_bytes()),
            push::b64url(claims.to_string().as_bytes())
        );
        let signature: p256::ecdsa::Signature = self
            .key
            .try_sign(signing_input.as_bytes())
            .map_err(|_| SigningFailed)?;
        Ok(Zeroizing::new(format!(
            "{signing_input}.{}",
            push::b64url(&signature.to_bytes())
        )))
    }

    fn request(
        &self,
        push: &OutgoingPush,
        body: &Bytes,
        jwt: &str,
    ) -> Result<Request<Full<Bytes>>, String> {
        let topic = if push.app_id.is_empty() {
            self.default_topic.as_str()
        } else {
            push.app_id.as_str()
        };
        let mut request = Request::post(format!("{}/3/device/{}", self.base_url, push.push_token))
            .header(header::AUTHORIZATION, format!("bearer {jwt}"))
            .header(header::CONTENT_TYPE, "application/json")
            .header("apns-topic", topic)
            .header("apns-push-type", "alert")
            .header("apns-expiration", (push.expires_at_ms / 1000).to_string())
            .header(
                "apns-priority",
                match push.priority {
                    Priority::High => "10",
                    Priority::Normal => "5",
                },
            )
            .header("apns-id", apns_id(&push.message_id));
        if let Some(collapse) = push::collapse_id(push) {
            request = request.header("apns-collapse-id", collapse);
        }
        request
            .body(Full::new(body.clone()))
            .map_err(|_| "request".to_owned())
    }
}

/// The message id in the canonical UUID form APNs wants for `apns-id`.
fn apns_id(id: &[u8; 16]) -> String {
    uuid_form(&hex::encode(id))
}

/// 32 hex digits grouped 8-4-4-4-12, as a UUID is written (the stand-in checks this form).
pub(crate) fn uuid_form(hex: &str) -> String {
    format!(
        "{}-{}-{}-{}-{}",
        hex.get(0..8).unwrap_or_default(),
        hex.get(8..12).unwrap_or_default(),
        hex.get(12..16).unwrap_or_default(),
        hex.get(16..20).unwrap_or_default(),
        hex.get(20..32).unwrap_or_default()
    )
}

/// The JSON body of a push.
fn body(push: &OutgoingPush) -> serde_json::Value {
    let (field, value) = push::payload_fields(push);
    serde_json::json!({
        "aps": {
            "alert": { "loc-key": ALERT_LOC_KEY },
            "mutable-content": 1,
        },
        field: value,
    })
}

/// APNs's error body, `{"reason": "…", "timestamp": ms}`.
#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    reason: String,
}

fn verdict(answer: &push::Answer) -> Verdict {
    let status = answer.status;
    if status.is_success() {
        return Verdict::Outcome(SendOutcome::Delivered);
    }
    let error: ErrorBody = serde_json::from_slice(&answer.body).unwrap_or_default();
    // Apple's reasons are single CamelCase words; anything else is not repeated.
    let word = Some(error.reason)
        .filter(|r| !r.is_empty() && r.len() <= 64 && r.bytes().all(|b| b.is_ascii_alphanumeric()));
    let reason = match &word {
        Some(word) => format!("{} {word}", status.as_u16()),
        None => status.as_u16().to_string(),
    };
    let outcome = match status.as_u16() {
        410 => SendOutcome::TokenDropped {
            reason: word.unwrap_or_else(|| "Unregistered".to_owned()),
        },
        403 => return Verdict::Auth(reason),
        429 | 500..=599 => SendOutcome::Retry {
            after: push::retry_after(&answer.headers),
            reason,
        },
        _ => SendOutcome::Failed { reason },
    };
    Verdict::Outcome(outcome)
}

#[async_trait]
impl PushSender for ApnsSender {
    #[tracing::instrument(skip_all, fields(message_id = %hex::encode(push.message_id)))]
    async fn send(&self, push: &OutgoingPush) -> SendOutcome {
        if let Some(refused) = credential::other_platform(push, Platform::Apns, "APNs") {
            return refused;
        }
        // A device token is hex; anything else must not reach the request path.
        if push.push_token.is_empty()
            || push.push_token.len() > 200
            || !push.push_token.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return SendOutcome::Failed {
                reason: "BadDeviceToken".to_owned(),
            };
        }
        if let Some(expired) = credential::expired(push, self.clock.as_ref()) {
            return expired;
        }
        let body = Bytes::from(body(push).to_string());
        let provider_token = |refused| async move {
            self.provider_token(refused)
                .await
                .map_err(|SigningFailed| SendOutcome::AuthFailed {
                    reason: "signing the provider token failed".to_owned(),
                })
        };
        let attempt = |jwt: Zeroizing<String>| {
            let request = self.request(push, &body, &jwt);
            async move {
                let request = request.map_err(|reason| SendOutcome::Failed { reason })?;
                push::exchange(&self.http, request, self.timeout)
                    .await
                    .map_err(credential::transport_failure)
            }
        };
        credential::send_with_one_refresh("APNs", provider_token, attempt, verdict).await
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::push::{ManualClock, PushPayload};
    use crate::standin::{ApnsStandin, Fault};

    const TOKEN: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

    fn any_port() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    fn now() -> u64 {
        SystemWallClock.now_unix_secs()
    }

    fn push(token: &str, payload: PushPayload, now_secs: u64) -> OutgoingPush {
        OutgoingPush {
            platform: Platform::Apns,
            push_token: token.to_owned(),
            app_id: "com.example.bank".to_owned(),
            message_id: [0x5a; 16],
            expires_at_ms: (now_secs + 600) * 1000,
            priority: Priority::High,
            collapse_id: Some("login".to_owned()),
            payload,
        }
    }

    async fn started() -> (ApnsStandin, ApnsSender) {
        let standin = ApnsStandin::start(any_port(), any_port()).await.unwrap();
        let sender = ApnsSender::new(standin.sender_config("com.example.default")).unwrap();
        (standin, sender)
    }

    #[tokio::test]
    async fn delivers_over_http2_and_tls_with_the_stand_ins_ca() {
        let (standin, sender) = started().await;
        let envelope = vec![0xfe; 33];
        let now = now();
        let outcome = sender
            .send(&push(TOKEN, PushPayload::Envelope(envelope.clone()), now))
            .await;
        assert_eq!(outcome, SendOutcome::Delivered);
        let received = standin.next_push(TOKEN).await;
        assert_eq!(
            received.payload_json,
            serde_json::json!({
                "aps": {"alert": {"loc-key": "COUNTERSIGN_MESSAGE"}, "mutable-content": 1},
                "cs": push::b64url(&envelope),
            })
        );
        assert_eq!(standin.received_count(), 1);
        let request = String::from_utf8(standin.recording().requests()[0].clone()).unwrap();
        assert!(
            request.starts_with(&format!("POST /3/device/{TOKEN} HTTP/2.0\r\n")),
            "{request}"
        );
        for header in [
            "apns-topic: com.example.bank\r\n".to_owned(),
            "apns-push-type: alert\r\n".to_owned(),
            "apns-priority: 10\r\n".to_owned(),
            "apns-collapse-id: login\r\n".to_owned(),
            format!("apns-expiration: {}\r\n", now + 600),
            format!("apns-id: {}\r\n", "5a5a5a5a-5a5a-5a5a-5a5a-5a5a5a5a5a5a"),
            "authorization: bearer ".to_owned(),
        ] {
            assert!(request.contains(&header), "{header} in {request}");
        }
    }

    #[tokio::test]
    async fn a_wake_up_with_normal_priority_and_the_default_topic() {
        let (standin, sender) = started().await;
        let mut wake = push(TOKEN, PushPayload::WakeUp, now());
        wake.app_id = String::new();
        wake.priority = Priority::Normal;
        wake.collapse_id = None;
        assert_eq!(sender.send(&wake).await, SendOutcome::Delivered);
        let received = standin.next_push(TOKEN).await;
        assert_eq!(received.payload_json["cs_wake"], "5a".repeat(16));
        assert!(received.payload_json.get("cs").is_none());
        let request = String::from_utf8(standin.recording().requests()[0].clone()).unwrap();
        assert!(
            request.contains("apns-topic: com.example.default\r\n"),
            "{request}"
        );
        assert!(request.contains("apns-priority: 5\r\n"), "{request}");
        assert!(!request.contains("apns-collapse-id"), "{request}");
    }

    #[tokio::test]
    async fn without_the_ca_the_stand_in_is_not_trusted() {
        let standin = ApnsStandin::start(any_port(), any_port()).await.unwrap();
        let mut config = standin.sender_config("com.example.bank");
        config.extra_ca_pem = None;
        let sender = ApnsSender::new(config).unwrap();
        let outcome = sender.send(&push(TOKEN, PushPayload::WakeUp, now())).await;
        assert!(
            matches!(outcome, SendOutcome::Retry { after: None, .. }),
            "{outcome:?}"
        );
        assert!(standin.recording().is_empty(), "nothing got through TLS");
        assert_eq!(standin.received_count(), 0);
    }

    #[tokio::test]
    async fn gone_drops_the_token() {
        let (standin, sender) = started().await;
        standin.faults().inject(Some(TOKEN), Fault::Unregistered, 1);
        assert_eq!(
            sender.send(&push(TOKEN, PushPayload::WakeUp, now())).await,
            SendOutcome::TokenDropped {
                reason: "Unregistered".to_owned()
            }
        );
        assert!(standin.pushes(TOKEN).is_empty());
    }

    #[tokio::test]
    async fn unavailable_is_retried_after_what_retry_after_says() {
        let (standin, sender) = started().await;
        standin.faults().inject(
            None,
            Fault::Unavailable {
                retry_after_secs: Some(30),
            },
            1,
        );
        let p = push(TOKEN, PushPayload::WakeUp, now());
        assert_eq!(
            sender.send(&p).await,
            SendOutcome::Retry {
                after: Some(Duration::from_secs(30)),
                reason: "503 ServiceUnavailable".to_owned()
            }
        );
        assert_eq!(sender.send(&p).await, SendOutcome::Delivered);
        assert_eq!(standin.pushes(TOKEN).len(), 1);
    }

    #[tokio::test]
    async fn a_bad_device_token_fails() {
        let (standin, sender) = started().await;
        standin.faults().inject(Some(TOKEN), Fault::BadToken, 1);
        assert_eq!(
            sender.send(&push(TOKEN, PushPayload::WakeUp, now())).await,
            SendOutcome::Failed {
                reason: "400 BadDeviceToken".to_owned()
            }
        );
        // Not hex: refused before anything is sent.
        assert_eq!(
            sender
                .send(&push("not/a/token", PushPayload::WakeUp, now()))
                .await,
            SendOutcome::Failed {
                reason: "BadDeviceToken".to_owned()
            }
        );
        assert_eq!(standin.recording().len(), 1);
    }

    #[tokio::test]
    async fn an_expired_provider_token_is_made_anew_once_then_gives_up() {
        let (standin, sender) = started().await;
        let p = push(TOKEN, PushPayload::WakeUp, now());
        standin.faults().inject(None, Fault::Auth, 1);
        assert_eq!(sender.send(&p).await, SendOutcome::Delivered);
        assert_eq!(sender.provider_tokens_made(), 2);
        assert_eq!(standin.recording().len(), 2);

        standin.faults().inject(None, Fault::Auth, 2);
        assert_eq!(
            sender.send(&p).await,
            SendOutcome::AuthFailed {
                reason: "403 ExpiredProviderToken".to_owned()
            }
        );
        assert_eq!(sender.provider_tokens_made(), 3, "one refresh, not more");
        assert_eq!(standin.pushes(TOKEN).len(), 1);
    }

    #[tokio::test]
    async fn a_foreign_key_is_refused_as_an_invalid_provider_token() {
        let (standin, _) = started().await;
        let other = ApnsStandin::start(any_port(), any_port()).await.unwrap();
        let mut config = standin.sender_config("com.example.bank");
        config.signing_key_pem = Zeroizing::new(other.signing_key_pem());
        let sender = ApnsSender::new(config).unwrap();
        assert_eq!(
            sender.send(&push(TOKEN, PushPayload::WakeUp, now())).await,
            SendOutcome::AuthFailed {
                reason: "403 InvalidProviderToken".to_owned()
            }
        );
        assert_eq!(sender.provider_tokens_made(), 2);
    }

    #[tokio::test]
    async fn the_provider_token_is_reused_for_40_minutes_over_one_connection() {
        let clock = ManualClock::new(1_900_000_000);
        let standin = ApnsStandin::start_with_clock(any_port(), any_port(), clock.clone())
            .await
            .unwrap();
        let sender = Arc::new(
            ApnsSender::with_clock(standin.sender_config("com.example.bank"), clock.clone())
                .unwrap(),
        );
        let sends: Vec<_> = (0..30u8)
            .map(|i| {
                let sender = sender.clone();
                let token = format!("{i:02x}{}", &TOKEN[2..]);
                let p = push(&token, PushPayload::WakeUp, clock.now_unix_secs());
                tokio::spawn(async move { sender.send(&p).await })
            })
            .collect();
        for send in sends {
            assert_eq!(send.await.unwrap(), SendOutcome::Delivered);
        }
        assert_eq!(standin.received_count(), 30);
        assert_eq!(sender.provider_tokens_made(), 1);
        clock.advance(PROVIDER_TOKEN_LIFETIME - Duration::from_secs(1));
        let p = push(TOKEN, PushPayload::WakeUp, clock.now_unix_secs());
        assert_eq!(sender.send(&p).await, SendOutcome::Delivered);
        assert_eq!(sender.provider_tokens_made(), 1);
        clock.advance(Duration::from_secs(1));
        let p = push(TOKEN, PushPayload::WakeUp, clock.now_unix_secs());
        assert_eq!(sender.send(&p).await, SendOutcome::Delivered);
        assert_eq!(sender.provider_tokens_made(), 2);
    }

    #[test]
    fn the_message_id_is_sent_as_a_uuid() {
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::try_from(i).unwrap();
        }
        assert_eq!(apns_id(&id), "00010203-0405-0607-0809-0a0b0c0d0e0f");
    }

    #[test]
    fn the_config_debug_hides_the_key() {
        let config = ApnsConfig::new(
            "TEAM".into(),
            "KEY".into(),
            "-----BEGIN PRIVATE KEY-----secret".into(),
            "t".into(),
        );
        let shown = format!("{config:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(matches!(
            ApnsSender::new(config),
            Err(PushConfigError::Key("P-256"))
        ));
    }
}
