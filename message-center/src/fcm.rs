//! The FCM HTTP v1 sender: service-account OAuth2 and `messages:send`.
//!
//! Owns the Google credential flow and the mapping of FCM's answers onto [`SendOutcome`].
//! Rules:
//! - The credential is a service account (`client_email`, an RSA `private_key`, `token_uri`,
//!   `project_id`): an RS256 JWT (`scope` = firebase.messaging, `aud` = `token_uri`, one hour)
//!   is exchanged at `token_uri` (grant `urn:ietf:params:oauth:grant-type:jwt-bearer`) for an
//!   access token, cached until five minutes before it expires. One refresh runs at a time;
//!   senders waiting for it reuse its result (single flight).
//! - On 401/403 the sender fetches a new access token once (unless another send already did)
//!   and tries again; a second refusal is [`SendOutcome::AuthFailed`].
//! - `404`/`UNREGISTERED` → [`SendOutcome::TokenDropped`]; `429`/`500`/`503` (and other 5xx,
//!   transport failures) → [`SendOutcome::Retry`] with `Retry-After`; `400`/`INVALID_ARGUMENT`
//!   and other 4xx → [`SendOutcome::Failed`].
//! - Only ciphertext or a message id leaves: `data.cs` (base64url envelope) or `data.cs_wake`
//!   (hex message id), with `android.priority`, `android.ttl` and `android.collapse_key`.
//! - The private key and access tokens never reach a log, an error or `Debug`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, StatusCode, header};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::credential::{self, CachedCredential, Fresh, Verdict};
use crate::push::{
    self, HttpClient, OutgoingPush, Platform, Priority, PushConfigError, PushSender, SendOutcome,
    SystemWallClock, WallClock,
};

/// Where FCM's HTTP v1 API lives.
pub const FCM_DEFAULT_BASE_URL: &str = "https://fcm.googleapis.com";
/// The OAuth2 scope FCM's `messages:send` needs.
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// The OAuth2 grant a service account's JWT is exchanged with.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// An access token is replaced this long before Google says it expires.
pub const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);
/// The lifetime asked for in the JWT assertion (Google's maximum).
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);

/// A Google service account, as the JSON key file Google hands out (extra fields ignored).
#[derive(Clone, Deserialize)]
pub struct ServiceAccount {
    /// The account's e-mail, the JWT's `iss`.
    pub client_email: String,
    /// The RSA private key, PEM (`BEGIN PRIVATE KEY` or `BEGIN RSA PRIVATE KEY`).
    #[serde(deserialize_with = "secret_string")]
    private_key: Zeroizing<String>,
    /// Optional key id, sent as the JWT header's `kid`.
    #[serde(default)]
    pub private_key_id: Option<String>,
    /// The OAuth2 token endpoint, the JWT's `aud`.
    pub token_uri: String,
    /// The Firebase project messages are sent for.
    pub project_id: String,
}

impl ServiceAccount {
    /// Reads a service-account key file's JSON.
    ///
    /// # Errors
    /// [`PushConfigError::ServiceAccount`] when it is not such a JSON object (the message names
    /// the problem, never a value).
    pub fn from_json(json: &str) -> Result<Self, PushConfigError> {
        serde_json::from_str(json).map_err(|e| {
            // serde_json's message names a field or a position, not the value.
            PushConfigError::ServiceAccount(format!(
                "{} at line {} column {}",
                match e.classify() {
                    serde_json::error::Category::Data => "missing or mistyped field",
                    serde_json::error::Category::Syntax | serde_json::error::Category::Eof =>
                        "not JSON",
                    serde_json::error::Category::Io => "unreadable",
                },
                e.line(),
                e.column()
            ))
        })
    }

    /// Builds one from its parts (the stand-in and tests).
    #[must_use]
    pub fn new(
        client_email: String,
        private_key_pem: String,
        token_uri: String,
        project_id: String,
    ) -> Self {
        Self {
            client_email,
            private_key: Zeroizing::new(private_key_pem),
            private_key_id: None,
            token_uri,
            project_id,
        }
    }
}

impl fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .field("private_key", &"<redacted>")
            .field("token_uri", &self.token_uri)
            .field("project_id", &self.project_id)
            .finish_non_exhaustive()
    }
}

/// The FCM sender's configuration.
#[derive(Debug, Clone)]
pub struct FcmConfig {
    /// The service account messages are sent as.
    pub service_account: ServiceAccount,
    /// FCM's API base URL ([`FCM_DEFAULT_BASE_URL`], or a stand-in's).
    pub api_base_url: String,
    /// A CA to trust beyond the system's roots (PEM), e.g. for a TLS-fronted stand-in.
    pub extra_ca_pem: Option<String>,
    /// How long one HTTP exchange may take before it counts as a transport failure.
    pub request_timeout: Duration,
}

impl FcmConfig {
    /// The production API, system roots and a 10 s timeout.
    #[must_use]
    pub fn new(service_account: ServiceAccount) -> Self {
        Self {
            service_account,
            api_base_url: FCM_DEFAULT_BASE_URL.to_owned(),
            extra_ca_pem: None,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// What getting an access token came to, when it did not give one.
enum TokenFailure {
    /// Google refused the assertion (400/401/403 at the token endpoint).
    Refused(String),
    /// Transport failure or 5xx: retry later.
    Unavailable(String, Option<Duration>),
}

/// Sends through FCM HTTP v1; cheap to share (`Arc`), one connection pool.
pub struct FcmSender {
    http: HttpClient,
    key: ring::signature::RsaKeyPair,
    rng: ring::rand::SystemRandom,
    client_email: String,
    key_id: Option<String>,
    token_uri: String,
    send_url: String,
    timeout: Duration,
    clock: Arc<dyn WallClock>,
    cached: CachedCredential,
}

impl fmt::Debug for FcmSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FcmSender")
            .field("client_email", &self.client_email)
            .field("send_url", &self.send_url)
            .finish_non_exhaustive()
    }
}

impl FcmSender {
    /// A sender on the system clock.
    ///
    /// # Errors
    /// A bad key, URL or CA ([`PushConfigError`]).
    pub fn new(config: FcmConfig) -> Result<Self, PushConfigError> {
        Self::with_clock(config, Arc::new(SystemWallClock))
    }

    /// A sender reading `clock` for JWT times and the token cache.
    ///
    /// # Errors
    /// A bad key, URL or CA ([`PushConfigError`]).
    pub fn with_clock(
        config: FcmConfig,
        clock: Arc<dyn WallClock>,
    ) -> Result<Self, PushConfigError> {
        let account = &config.service_account;
        let key = rsa_key(&account.private_key)?;
        let token_uri = push::base_url(&account.token_uri, "token_uri")?;
        let base = push::base_url(&config.api_base_url, "the FCM base URL")?;
        if account.project_id.is_empty()
            || !account
                .project_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(PushConfigError::ServiceAccount(
                "project_id is not a project id".to_owned(),
            ));
        }
        let send_url = format!("{base}/v1/projects/{}/messages:send", account.project_id);
        Ok(Self {
            http: push::http_client(config.extra_ca_pem.as_deref(), false)?,
            key,
            rng: ring::rand::SystemRandom::new(),
            client_email: account.client_email.clone(),
            key_id: account.private_key_id.clone(),
            token_uri,
            send_url,
            timeout: config.request_timeout,
            clock,
            cached: CachedCredential::default(),
        })
    }

    /// How many times an access token was fetched from the token endpoint (tests, metrics).
    #[must_use]
    pub fn token_fetches(&self) -> u64 {
        self.cached.made()
    }

    /// The cached access token, or a new one. `refused` names a token the API just refused:
    /// it is replaced unless another send replaced it already.
    async fn access_token(
        &self,
        refused: Option<u64>,
    ) -> Result<(Zeroizing<String>, u64), TokenFailure> {
        self.cached
            .get(self.clock.as_ref(), refused, || self.fetch_token())
            .await
    }

    fn assertion(&self, now: u64) -> Result<String, TokenFailure> {
        let mut header = serde_json::Map::new();
        header.insert("alg".to_owned(), "RS256".into());
        header.insert("typ".to_owned(), "JWT".into());
        if let Some(kid) = &self.key_id {
            header.insert("kid".to_owned(), kid.as_str().into());
        }
        let header = serde_json::Value::Object(header);
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": FCM_SCOPE,
            "aud": self.token_uri,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME.as_secs(),
        });
        let signing_input = format!(
            "{}.{}",
            push::b64url(header.to_string().as_bytes()),
            push::b64url(claims.to_string().as_bytes())
        );
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &self.rng,
                signing_input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| TokenFailure::Refused("signing the assertion failed".to_owned()))?;
        Ok(format!("{signing_input}.{}", push::b64url(&signature)))
    }

    async fn fetch_token(&self) -> Result<Fresh, TokenFailure> {
        #[derive(Deserialize)]
        struct Grant {
            #[serde(deserialize_with = "secret_string")]
            access_token: Zeroizing<String>,
            expires_in: u64,
        }
        let now = self.clock.now_unix_secs();
        let assertion = Zeroizing::new(self.assertion(now)?);
        // The assertion is base64url and dots: nothing in it needs form-encoding.
        let form = format!(
            "grant_type={}&assertion={}",
            JWT_BEARER_GRANT.replace(':', "%3A"),
            assertion.as_str()
        );
        let request = Request::post(self.token_uri.as_str())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(form)))
            .map_err(|_| TokenFailure::Refused("token request".to_owned()))?;
        let generation = self.cached.next_generation();
        let answer = push::exchange(&self.http, request, self.timeout)
            .await
            .map_err(|reason| {
                TokenFailure::Unavailable(format!("token endpoint {reason}"), None)
            })?;
        if answer.status.is_success() {
            let grant: Grant = serde_json::from_slice(&answer.body).map_err(|_| {
                TokenFailure::Unavailable("token endpoint answer malformed".to_owned(), None)
            })?;
            let lifetime = grant
                .expires_in
                .saturating_sub(TOKEN_REFRESH_MARGIN.as_secs());
            return Ok(Fresh {
                secret: grant.access_token,
                use_until: now + lifetime,
                generation,
            });
        }
        let reason = format!("token endpoint {}", answer.status.as_u16());
        if answer.status.is_server_error() || answer.status == StatusCode::TOO_MANY_REQUESTS {
            Err(TokenFailure::Unavailable(
                reason,
                push::retry_after(&answer.headers),
            ))
        } else {
            Err(TokenFailure::Refused(reason))
        }
    }

    fn body(&self, push: &OutgoingPush) -> serde_json::Value {
        let (field, value) = push::payload_fields(push);
        let now_ms = self.clock.now_unix_secs().saturating_mul(1000);
        let ttl_secs = push.expires_at_ms.saturating_sub(now_ms).div_ceil(1000);
        let mut android = serde_json::Map::new();
        let priority = match push.priority {
            Priority::High => "HIGH",
            Priority::Normal => "NORMAL",
        };
        android.insert("priority".to_owned(), priority.into());
        android.insert("ttl".to_owned(), format!("{ttl_secs}s").into());
        if let Some(collapse) = push::collapse_id(push) {
            android.insert("collapse_key".to_owned(), collapse.into());
        }
        serde_json::json!({
            "message": {
                "token": push.push_token,
                "data": { field: value },
                "android": android,
            }
        })
    }

    async fn attempt(&self, body: &Bytes, token: &str) -> Result<push::Answer, String> {
        let request = Request::post(self.send_url.as_str())
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.clone()))
            .map_err(|_| "request".to_owned())?;
        push::exchange(&self.http, request, self.timeout).await
    }
}

/// FCM's error body: `{"error":{"code","message","status","details":[{"@type","errorCode"}]}}`.
#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    error: ErrorInner,
}

#[derive(Deserialize, Default)]
struct ErrorInner {
    #[serde(default)]
    status: String,
    #[serde(default)]
    details: Vec<ErrorDetail>,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(rename = "errorCode", default)]
    error_code: Option<String>,
}

fn verdict(answer: &push::Answer) -> Verdict {
    let status = answer.status;
    if status.is_success() {
        return Verdict::Outcome(SendOutcome::Delivered);
    }
    let error: ErrorBody = serde_json::from_slice(&answer.body).unwrap_or_default();
    let code = error
        .error
        .details
        .iter()
        .find_map(|d| d.error_code.clone())
        .filter(|c| c.len() <= 64 && c.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'));
    let word = code.clone().unwrap_or_else(|| {
        let s = error.error.status;
        if s.len() <= 64 && s.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') {
            s
        } else {
            String::new()
        }
    });
    let reason = if word.is_empty() {
        status.as_u16().to_string()
    } else {
        format!("{} {word}", status.as_u16())
    };
    let outcome = match (status.as_u16(), code.as_deref()) {
        (_, Some("UNREGISTERED")) => SendOutcome::TokenDropped {
            reason: "UNREGISTERED".to_owned(),
        },
        (_, Some("SENDER_ID_MISMATCH")) => SendOutcome::Failed { reason },
        (401 | 403, _) => return Verdict::Auth(reason),
        (429, _) | (500..=599, _) => SendOutcome::Retry {
            after: push::retry_after(&answer.headers),
            reason,
        },
        _ => SendOutcome::Failed { reason },
    };
    Verdict::Outcome(outcome)
}

fn token_failure(failure: TokenFailure) -> SendOutcome {
    match failure {
        TokenFailure::Refused(reason) => SendOutcome::AuthFailed { reason },
        TokenFailure::Unavailable(reason, after) => SendOutcome::Retry { after, reason },
    }
}

#[async_trait]
impl PushSender for FcmSender {
    #[tracing::instrument(skip_all, fields(message_id = %hex::encode(push.message_id)))]
    async fn send(&self, push: &OutgoingPush) -> SendOutcome {
        if let Some(refused) = credential::other_platform(push, Platform::Fcm, "FCM") {
            return refused;
        }
        if let Some(expired) = credential::expired(push, self.clock.as_ref()) {
            return expired;
        }
        let body = Bytes::from(self.body(push).to_string());
        let access_token =
            |refused| async move { self.access_token(refused).await.map_err(token_failure) };
        let attempt = |token: Zeroizing<String>| {
            let body = &body;
            async move {
                self.attempt(body, &token)
                    .await
                    .map_err(credential::transport_failure)
            }
        };
        credential::send_with_one_refresh("FCM", access_token, attempt, verdict).await
    }
}

/// A string kept in a [`Zeroizing`] as soon as it is read.
fn secret_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Zeroizing<String>, D::Error> {
    String::deserialize(d).map(Zeroizing::new)
}

/// Reads an RSA private key PEM (PKCS#8 or PKCS#1).
fn rsa_key(pem: &str) -> Result<ring::signature::RsaKeyPair, PushConfigError> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject as _;
    let der =
        PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| PushConfigError::Key("RSA"))?;
    match &der {
        PrivateKeyDer::Pkcs8(k) => ring::signature::RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
        PrivateKeyDer::Pkcs1(k) => ring::signature::RsaKeyPair::from_der(k.secret_pkcs1_der()),
        _ => return Err(PushConfigError::Key("RSA")),
    }
    .map_err(|_| PushConfigError::Key("RSA"))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::push::{ManualClock, PushPayload};
    use crate::standin::{Fault, FcmStandin};

    fn any_port() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    fn config(standin: &FcmStandin) -> FcmConfig {
        let account = ServiceAccount::from_json(&standin.service_account_json()).unwrap();
        let mut config = FcmConfig::new(account);
        config.api_base_url = standin.url();
        config
    }

    fn push(token: &str, payload: PushPayload, now_secs: u64) -> OutgoingPush {
        OutgoingPush {
            platform: Platform::Fcm,
            push_token: token.to_owned(),
            app_id: "com.example.bank".to_owned(),
            message_id: [7; 16],
            expires_at_ms: (now_secs + 600) * 1000,
            priority: Priority::High,
            collapse_id: Some("login".to_owned()),
            payload,
        }
    }

    fn now() -> u64 {
        SystemWallClock.now_unix_secs()
    }

    async fn started() -> (FcmStandin, FcmSender) {
        let standin = FcmStandin::start(any_port()).await.unwrap();
        let sender = FcmSender::new(config(&standin)).unwrap();
        (standin, sender)
    }

    #[tokio::test]
    async fn delivers_the_envelope_to_the_phone() {
        let (standin, sender) = started().await;
        let envelope = vec![0xfb; 40];
        let outcome = sender
            .send(&push(
                "phone-1",
                PushPayload::Envelope(envelope.clone()),
                now(),
            ))
            .await;
        assert_eq!(outcome, SendOutcome::Delivered);
        let received = standin.next_push("phone-1").await;
        assert_eq!(
            received.payload_json,
            serde_json::json!({ "cs": push::b64url(&envelope) })
        );
        assert_eq!(standin.received_count(), 1);
        let requests = standin.recording().requests();
        assert_eq!(requests.len(), 2, "the token request and the send");
        let send = String::from_utf8(requests[1].clone()).unwrap();
        assert!(
            send.starts_with("POST /v1/projects/countersign-standin/messages:send HTTP/1.1\r\n"),
            "{send}"
        );
        let body: serde_json::Value =
            serde_json::from_str(send.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        let android = &body["message"]["android"];
        assert_eq!(android["priority"], "HIGH");
        assert_eq!(android["collapse_key"], "login");
        let ttl = android["ttl"].as_str().unwrap();
        assert!(ttl == "600s" || ttl == "599s", "{ttl}");
        assert_eq!(body["message"]["token"], "phone-1");
    }

    #[tokio::test]
    async fn a_wake_up_carries_only_the_message_id() {
        let (standin, sender) = started().await;
        let mut wake = push("phone-1", PushPayload::WakeUp, now());
        wake.priority = Priority::Normal;
        wake.collapse_id = None;
        assert_eq!(sender.send(&wake).await, SendOutcome::Delivered);
        let received = standin.next_push("phone-1").await;
        assert_eq!(
            received.payload_json,
            serde_json::json!({ "cs_wake": "07".repeat(16) })
        );
        let send = String::from_utf8(standin.recording().requests()[1].clone()).unwrap();
        assert!(send.contains(r#""priority":"NORMAL""#), "{send}");
        assert!(!send.contains("collapse_key"), "{send}");
    }

    #[tokio::test]
    async fn unregistered_drops_the_token() {
        let (standin, sender) = started().await;
        standin
            .faults()
            .inject(Some("phone-1"), Fault::Unregistered, 1);
        let outcome = sender
            .send(&push("phone-1", PushPayload::WakeUp, now()))
            .await;
        assert_eq!(
            outcome,
            SendOutcome::TokenDropped {
                reason: "UNREGISTERED".to_owned()
            }
        );
        assert!(standin.pushes("phone-1").is_empty());
        assert_eq!(standin.received_count(), 0);
        // Another token was never affected; the fault was used up.
        assert_eq!(
            sender
                .send(&push("phone-2", PushPayload::WakeUp, now()))
                .await,
            SendOutcome::Delivered
        );
        assert_eq!(
            sender
                .send(&push("phone-1", PushPayload::WakeUp, now()))
                .await,
            SendOutcome::Delivered
        );
    }

    #[tokio::test]
    async fn unavailable_is_retried_after_what_retry_after_says() {
        let (standin, sender) = started().await;
        standin.faults().inject(
            None,
            Fault::Unavailable {
                retry_after_secs: Some(7),
            },
            1,
        );
        standin.faults().inject(
            None,
            Fault::Unavailable {
                retry_after_secs: None,
            },
            1,
        );
        let p = push("phone-1", PushPayload::WakeUp, now());
        assert_eq!(
            sender.send(&p).await,
            SendOutcome::Retry {
                after: Some(Duration::from_secs(7)),
                reason: "503 UNAVAILABLE".to_owned()
            }
        );
        assert_eq!(
            sender.send(&p).await,
            SendOutcome::Retry {
                after: None,
                reason: "503 UNAVAILABLE".to_owned()
            }
        );
        assert_eq!(sender.send(&p).await, SendOutcome::Delivered);
        assert_eq!(standin.pushes("phone-1").len(), 1);
    }

    #[tokio::test]
    async fn a_bad_token_fails() {
        let (standin, sender) = started().await;
        standin.faults().inject(Some("phone-1"), Fault::BadToken, 1);
        assert_eq!(
            sender
                .send(&push("phone-1", PushPayload::WakeUp, now()))
                .await,
            SendOutcome::Failed {
                reason: "400 INVALID_ARGUMENT".to_owned()
            }
        );
        assert!(standin.pushes("phone-1").is_empty());
    }

    #[tokio::test]
    async fn a_dropped_push_is_answered_as_delivered_but_never_reaches_the_phone() {
        let (standin, sender) = started().await;
        standin.faults().inject(Some("phone-1"), Fault::Drop, 1);
        assert_eq!(
            sender
                .send(&push("phone-1", PushPayload::WakeUp, now()))
                .await,
            SendOutcome::Delivered
        );
        assert_eq!(standin.received_count(), 1);
        assert!(standin.pushes("phone-1").is_empty());
    }

    #[tokio::test]
    async fn an_auth_error_refreshes_the_credential_once_then_gives_up() {
        let (standin, sender) = started().await;
        let p = push("phone-1", PushPayload::WakeUp, now());
        assert_eq!(sender.send(&p).await, SendOutcome::Delivered);
        assert_eq!(standin.token_requests(), 1);

        // The stand-in revokes every token it issued and answers 401: only a new one works.
        standin.faults().inject(None, Fault::Auth, 1);
        assert_eq!(sender.send(&p).await, SendOutcome::Delivered);
        assert_eq!(standin.token_requests(), 2);
        assert_eq!(sender.token_fetches(), 2);
        assert_eq!(standin.pushes("phone-1").len(), 2);

        standin.faults().inject(None, Fault::Auth, 2);
        assert_eq!(
            sender.send(&p).await,
            SendOutcome::AuthFailed {
                reason: "401 UNAUTHENTICATED".to_owned()
            }
        );
        assert_eq!(standin.token_requests(), 3, "one refresh, not more");
        assert_eq!(standin.pushes("phone-1").len(), 2);
    }

    #[tokio::test]
    async fn the_access_token_is_cached_across_many_sends() {
        let (standin, sender) = started().await;
        let sender = Arc::new(sender);
        let sends: Vec<_> = (0..20)
            .map(|i| {
                let sender = sender.clone();
                tokio::spawn(async move {
                    sender
                        .send(&push(&format!("phone-{i}"), PushPayload::WakeUp, now()))
                        .await
                })
            })
            .collect();
        for send in sends {
            assert_eq!(send.await.unwrap(), SendOutcome::Delivered);
        }
        assert_eq!(standin.received_count(), 20);
        assert_eq!(standin.token_requests(), 1, "single flight, then the cache");
        assert_eq!(sender.token_fetches(), 1);
    }

    #[tokio::test]
    async fn the_access_token_is_replaced_five_minutes_before_it_expires() {
        let clock = ManualClock::new(1_900_000_000);
        let standin = FcmStandin::start_with_clock(any_port(), clock.clone())
            .await
            .unwrap();
        let sender = FcmSender::with_clock(config(&standin), clock.clone()).unwrap();
        let send = || {
            let p = push("phone-1", PushPayload::WakeUp, clock.now_unix_secs());
            let sender = &sender;
            async move { sender.send(&p).await }
        };
        assert_eq!(send().await, SendOutcome::Delivered);
        // The stand-in's tokens live 3599 s: kept until 3299 s.
        clock.advance(Duration::from_secs(3298));
        assert_eq!(send().await, SendOutcome::Delivered);
        assert_eq!(standin.token_requests(), 1);
        clock.advance(Duration::from_secs(1));
        assert_eq!(send().await, SendOutcome::Delivered);
        assert_eq!(standin.token_requests(), 2);
    }

    #[tokio::test]
    async fn a_refused_assertion_is_an_auth_failure() {
        let standin = FcmStandin::start(any_port()).await.unwrap();
        let mut config = config(&standin);
        config.service_account.client_email = "someone-else@example.invalid".to_owned();
        let sender = FcmSender::new(config).unwrap();
        assert_eq!(
            sender
                .send(&push("phone-1", PushPayload::WakeUp, now()))
                .await,
            SendOutcome::AuthFailed {
                reason: "token endpoint 400".to_owned()
            }
        );
        assert_eq!(standin.received_count(), 0);
    }

    #[tokio::test]
    async fn an_unreachable_service_is_retried_later() {
        let standin = FcmStandin::start(any_port()).await.unwrap();
        let closed = tokio::net::TcpListener::bind(any_port()).await.unwrap();
        let closed_url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let mut config = config(&standin);
        config.api_base_url = closed_url;
        let sender = FcmSender::new(config).unwrap();
        let outcome = sender
            .send(&push("phone-1", PushPayload::WakeUp, now()))
            .await;
        assert_eq!(
            outcome,
            SendOutcome::Retry {
                after: None,
                reason: "connect".to_owned()
            }
        );
    }

    #[tokio::test]
    async fn an_expired_or_foreign_push_is_not_sent() {
        let (standin, sender) = started().await;
        let mut p = push("phone-1", PushPayload::WakeUp, now());
        p.expires_at_ms = now() * 1000 - 1;
        assert_eq!(
            sender.send(&p).await,
            SendOutcome::Failed {
                reason: "expired".to_owned()
            }
        );
        let mut p = push("phone-1", PushPayload::WakeUp, now());
        p.platform = Platform::Apns;
        assert!(matches!(sender.send(&p).await, SendOutcome::Failed { .. }));
        assert!(standin.recording().is_empty());
    }

    #[test]
    fn the_service_account_debug_hides_the_key() {
        let account = ServiceAccount::new(
            "a@b".into(),
            "-----BEGIN PRIVATE KEY-----secret".into(),
            "https://oauth2.googleapis.com/token".into(),
            "p".into(),
        );
        let shown = format!("{account:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(matches!(
            FcmSender::new(FcmConfig::new(account)),
            Err(PushConfigError::Key("RSA"))
        ));
        assert!(matches!(
            ServiceAccount::from_json(r#"{"client_email": 1}"#),
            Err(PushConfigError::ServiceAccount(_))
        ));
    }
}
