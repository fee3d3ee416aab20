//! The APNs stand-in: Apple's HTTP/2 provider API over TLS, token-based authentication.
//!
//! Owns two listeners:
//! - the push API, HTTP/2 only (ALPN `h2`) over TLS with a server certificate for `127.0.0.1`
//!   and `localhost` issued by a test CA, both generated at start with rcgen (the CA's PEM,
//!   [`ApnsStandin::ca_pem`], is what a sender trusts by configuration):
//!   `POST /3/device/{token}` checks the provider token (ES256 JWT, `kid` = the stand-in's key
//!   id, `iss` = its team id, `iat` within the hour, else `403 MissingProviderToken` /
//!   `InvalidProviderToken` / `ExpiredProviderToken`), the device token (hex, else
//!   `400 BadDeviceToken`), `apns-topic` (`MissingTopic`), `apns-push-type`
//!   (`InvalidPushType`), `apns-priority` (`BadPriority`), `apns-expiration`
//!   (`BadExpirationDate`), `apns-collapse-id` ≤ 64 bytes (`BadCollapseId`), `apns-id`
//!   (`BadMessageId`), the body (`PayloadEmpty`, `413 PayloadTooLarge` above 4 KiB); then the
//!   faults (`410 Unregistered` with a timestamp, `400 BadDeviceToken`, `503
//!   ServiceUnavailable` with `Retry-After`, `403 ExpiredProviderToken`, drop). Success is
//!   `200` with `apns-id`. `/standin/echo` answers an empty 200 (the bare HTTP/2 rate).
//! - the plain HTTP control API of [`super`].
//!
//! The provider key (`.p8`, P-256), team id and key id are generated at start.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use super::fcm::url_for;
use super::{Fault, Shared, StandinError, StandinInfo, StandinKind};
use crate::apns::ApnsConfig;
use crate::push::{SystemWallClock, WallClock};

/// APNs's limit on a notification payload.
const MAX_PAYLOAD_BYTES: usize = 4096;
/// How old a provider token may be (Apple: one hour).
const PROVIDER_TOKEN_MAX_AGE_SECS: u64 = 3600;
/// How far a provider token's `iat` may lie in the future (clock skew).
const CLOCK_SKEW_SECS: u64 = 300;
const PUSH_TYPES: &[&str] = &[
    "alert",
    "background",
    "location",
    "voip",
    "complication",
    "fileprovider",
    "mdm",
    "liveactivity",
    "pushtotalk",
    "widgets",
];

struct ApnsState {
    shared: Arc<Shared>,
    team_id: String,
    key_id: String,
    verifying_key: VerifyingKey,
    clock: Arc<dyn WallClock>,
}

/// A running APNs stand-in; stops when dropped.
pub struct ApnsStandin {
    state: Arc<ApnsState>,
    url: String,
    control_url: String,
    ca_pem: String,
    signing_key_pem: Zeroizing<String>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl fmt::Debug for ApnsStandin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApnsStandin")
            .field("url", &self.url)
            .field("control_url", &self.control_url)
            .field("team_id", &self.state.team_id)
            .field("key_id", &self.state.key_id)
            .finish_non_exhaustive()
    }
}

impl Drop for ApnsStandin {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Ten upper-case letters and digits, the shape of Apple's team and key ids.
fn apple_id() -> String {
    let mut bytes = [0u8; 10];
    let _ = getrandom::fill(&mut bytes);
    const ALPHABET: &[u8; 36] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    bytes
        .iter()
        .map(|b| char::from(ALPHABET.get(usize::from(*b) % 36).copied().unwrap_or(b'A')))
        .collect()
}

/// A fresh P-256 key.
fn generate_p256() -> Result<SigningKey, StandinError> {
    for _ in 0..8 {
        let mut secret = Zeroizing::new([0u8; 32]);
        getrandom::fill(secret.as_mut_slice())
            .map_err(|_| StandinError::Credentials("the system RNG failed"))?;
        if let Ok(key) = SigningKey::from_slice(secret.as_slice()) {
            return Ok(key);
        }
    }
    Err(StandinError::Credentials("no valid P-256 key"))
}

/// The test CA (PEM) and a TLS server configuration for `127.0.0.1` and `localhost`.
fn tls_server() -> Result<(String, rustls::ServerConfig), StandinError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let failed = |_| StandinError::Credentials("generating the test certificates");
    let ca_key = KeyPair::generate().map_err(failed)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "countersign APNs stand-in test CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).map_err(failed)?;
    let issuer = Issuer::new(ca, ca_key);

    let server_key = KeyPair::generate().map_err(failed)?;
    let mut server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .map_err(failed)?;
    server
        .distinguished_name
        .push(DnType::CommonName, "countersign APNs stand-in");
    server.use_authority_key_identifier_extension = true;
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &issuer).map_err(failed)?;

    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|_| StandinError::Credentials("TLS versions"))?
    .with_no_client_auth()
    .with_single_cert(vec![server_cert.der().clone()], key)
    .map_err(|_| StandinError::Credentials("the TLS server certificate"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((ca_cert.pem(), config))
}

/// Accepts TLS connections and serves `router` over HTTP/2 on each, until aborted.
fn serve_h2_tls(
    listener: tokio::net::TcpListener,
    config: rustls::ServerConfig,
    router: Router,
) -> tokio::task::JoinHandle<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::debug!(error = %e, "stand-in accept failed");
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let service = hyper_util::service::TowerToHyperService::new(router.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    // A client that does not trust the CA ends here.
                    return;
                };
                let served =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .max_concurrent_streams(1000)
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                if let Err(e) = served {
                    tracing::debug!(error = %e, "stand-in HTTP/2 connection ended");
                }
            });
        }
    })
}

impl ApnsStandin {
    /// Starts the push API on `addr` and the control API on `control_addr` (port 0: any free
    /// port), with the system clock.
    ///
    /// # Errors
    /// [`StandinError`] when it cannot listen or make its credentials.
    pub async fn start(addr: SocketAddr, control_addr: SocketAddr) -> Result<Self, StandinError> {
        Self::start_with_clock(addr, control_addr, Arc::new(SystemWallClock)).await
    }

    /// Starts, judging provider-token ages by `clock`.
    ///
    /// # Errors
    /// [`StandinError`] when it cannot listen or make its credentials.
    pub async fn start_with_clock(
        addr: SocketAddr,
        control_addr: SocketAddr,
        clock: Arc<dyn WallClock>,
    ) -> Result<Self, StandinError> {
        use p256::pkcs8::EncodePrivateKey as _;
        let signing_key = generate_p256()?;
        let signing_key_pem = signing_key
            .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
            .map_err(|_| StandinError::Credentials("encoding the provider key"))?;
        let (ca_pem, tls) = tls_server()?;
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let control = tokio::net::TcpListener::bind(control_addr).await?;
        let url = url_for("https", listener.local_addr()?);
        let control_url = url_for("http", control.local_addr()?);
        let shared = Arc::new(Shared::default());
        let state = Arc::new(ApnsState {
            shared: shared.clone(),
            team_id: apple_id(),
            key_id: apple_id(),
            verifying_key: *signing_key.verifying_key(),
            clock,
        });
        let api = Router::new()
            .route("/3/device/{token}", post(device))
            .layer(axum::middleware::from_fn_with_state(
                shared.clone(),
                super::record_layer,
            ))
            .with_state(state.clone())
            .route(
                "/standin/echo",
                axum::routing::get(super::echo).post(super::echo),
            );
        let tasks = vec![
            serve_h2_tls(listener, tls, api),
            super::serve_plain(control, super::control_router(shared)),
        ];
        Ok(Self {
            state,
            url,
            control_url,
            ca_pem,
            signing_key_pem: Zeroizing::new(signing_key_pem.to_string()),
            tasks,
        })
    }

    /// The push API's base URL (`https://127.0.0.1:PORT`), the sender's `base_url`.
    #[must_use]
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The plain HTTP control API's base URL.
    #[must_use]
    pub fn control_url(&self) -> String {
        self.control_url.clone()
    }

    /// The test CA that issued the server certificate (PEM): trust it to talk to the stand-in.
    #[must_use]
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// The team id provider tokens must name (`iss`).
    #[must_use]
    pub fn team_id(&self) -> String {
        self.state.team_id.clone()
    }

    /// The key id provider tokens must name (`kid`).
    #[must_use]
    pub fn key_id(&self) -> String {
        self.state.key_id.clone()
    }

    /// The provider key, as Apple's `.p8` file (PKCS#8 PEM, P-256).
    #[must_use]
    pub fn signing_key_pem(&self) -> String {
        self.signing_key_pem.to_string()
    }

    /// A sender configuration for this stand-in (its URL, credentials and CA).
    #[must_use]
    pub fn sender_config(&self, default_topic: &str) -> ApnsConfig {
        let mut config = ApnsConfig::new(
            self.team_id(),
            self.key_id(),
            self.signing_key_pem(),
            default_topic.to_owned(),
        );
        config.base_url = self.url();
        config.extra_ca_pem = Some(self.ca_pem());
        config
    }

    shared_accessors! {
        recorded: "Every request received on `/3/device/…`.",
        accepted: "How many notifications were answered `200` (dropped ones included).",
    }

    /// What a developer needs to use it.
    #[must_use]
    pub fn info(&self) -> StandinInfo {
        StandinInfo {
            kind: StandinKind::Apns,
            url: self.url(),
            control_url: self.control_url(),
            files: vec![
                ("apns-ca.pem".to_owned(), self.ca_pem()),
                ("apns-key.p8".to_owned(), self.signing_key_pem()),
            ],
            settings: vec![
                ("team_id".to_owned(), self.team_id()),
                ("key_id".to_owned(), self.key_id()),
            ],
        }
    }
}

/// APNs's error answer.
fn refuse(status: StatusCode, reason: &str, apns_id: &HeaderValue) -> Response {
    let mut answer = (status, axum::Json(json!({ "reason": reason }))).into_response();
    answer.headers_mut().insert("apns-id", apns_id.clone());
    answer
}

/// Checks the provider token; the refusal's reason otherwise.
fn check_provider_token(state: &ApnsState, headers: &HeaderMap) -> Result<(), &'static str> {
    use base64::Engine as _;
    let b64 = |part: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| "InvalidProviderToken")
    };
    let jwt = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("bearer ")
                .or_else(|| v.strip_prefix("Bearer "))
        })
        .ok_or("MissingProviderToken")?;
    let Some((header, claims, signature)) = super::jwt_parts(jwt) else {
        return Err("InvalidProviderToken");
    };
    let header: Value =
        serde_json::from_slice(&b64(header)?).map_err(|_| "InvalidProviderToken")?;
    if header.get("alg").and_then(Value::as_str) != Some("ES256") {
        return Err("InvalidProviderToken");
    }
    if header.get("kid").and_then(Value::as_str) != Some(state.key_id.as_str()) {
        return Err("InvalidProviderToken");
    }
    let signature = Signature::from_slice(&b64(signature)?).map_err(|_| "InvalidProviderToken")?;
    let signing_input = jwt
        .get(..header_and_claims_len(jwt))
        .ok_or("InvalidProviderToken")?;
    state
        .verifying_key
        .verify(signing_input.as_bytes(), &signature)
        .map_err(|_| "InvalidProviderToken")?;
    let claims: Value =
        serde_json::from_slice(&b64(claims)?).map_err(|_| "InvalidProviderToken")?;
    if claims.get("iss").and_then(Value::as_str) != Some(state.team_id.as_str()) {
        return Err("InvalidProviderToken");
    }
    let iat = claims
        .get("iat")
        .and_then(Value::as_u64)
        .ok_or("InvalidProviderToken")?;
    let now = state.clock.now_unix_secs();
    if iat > now + CLOCK_SKEW_SECS {
        return Err("InvalidProviderToken");
    }
    if now.saturating_sub(iat) > PROVIDER_TOKEN_MAX_AGE_SECS {
        return Err("ExpiredProviderToken");
    }
    Ok(())
}

/// The length of `header.claims` in a JWT.
fn header_and_claims_len(jwt: &str) -> usize {
    jwt.rfind('.').unwrap_or(0)
}

/// Checks the request headers; the refusal's reason otherwise.
fn check_headers(headers: &HeaderMap) -> Result<(), &'static str> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if text("apns-topic").is_none_or(str::is_empty) {
        return Err("MissingTopic");
    }
    if let Some(kind) = text("apns-push-type")
        && !PUSH_TYPES.contains(&kind)
    {
        return Err("InvalidPushType");
    }
    if let Some(priority) = text("apns-priority")
        && !matches!(priority, "1" | "5" | "10")
    {
        return Err("BadPriority");
    }
    if let Some(expiration) = text("apns-expiration")
        && expiration.parse::<u64>().is_err()
    {
        return Err("BadExpirationDate");
    }
    if let Some(collapse) = headers.get("apns-collapse-id")
        && collapse.len() > 64
    {
        return Err("BadCollapseId");
    }
    Ok(())
}

/// The request's `apns-id` if it is a canonical UUID; `Err` if it is present but malformed.
fn apns_id(headers: &HeaderMap) -> Result<HeaderValue, ()> {
    match headers.get("apns-id") {
        None => HeaderValue::from_str(&uuid_like(&super::random_hex(16))).map_err(|_| ()),
        Some(value) => {
            let text = value.to_str().map_err(|_| ())?;
            let groups: Vec<usize> = text.split('-').map(str::len).collect();
            let hex = text.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit());
            if hex && groups == [8, 4, 4, 4, 12] {
                Ok(value.clone())
            } else {
                Err(())
            }
        }
    }
}

fn uuid_like(hex: &str) -> String {
    crate::apns::uuid_form(hex).to_uppercase()
}

async fn device(
    State(state): State<Arc<ApnsState>>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let shared = &state.shared;
    shared.requests.fetch_add(1, Ordering::Relaxed);
    let Ok(id) = apns_id(&headers) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "BadMessageId",
            &HeaderValue::from_static("00000000-0000-0000-0000-000000000000"),
        );
    };
    if let Err(reason) = check_provider_token(&state, &headers) {
        return refuse(StatusCode::FORBIDDEN, reason, &id);
    }
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return refuse(StatusCode::BAD_REQUEST, "BadDeviceToken", &id);
    }
    if let Err(reason) = check_headers(&headers) {
        return refuse(StatusCode::BAD_REQUEST, reason, &id);
    }
    if body.len() > MAX_PAYLOAD_BYTES {
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge", &id);
    }
    let payload: Value = match serde_json::from_slice(&body) {
        Ok(payload @ Value::Object(_)) if payload.get("aps").is_some_and(Value::is_object) => {
            payload
        }
        _ => return refuse(StatusCode::BAD_REQUEST, "PayloadEmpty", &id),
    };
    match shared.faults.take(&token) {
        Some(Fault::Unregistered) => {
            let now_ms = state.clock.now_unix_secs().saturating_mul(1000);
            let mut answer = (
                StatusCode::GONE,
                axum::Json(json!({"reason": "Unregistered", "timestamp": now_ms})),
            )
                .into_response();
            answer.headers_mut().insert("apns-id", id);
            return answer;
        }
        Some(Fault::BadToken) => return refuse(StatusCode::BAD_REQUEST, "BadDeviceToken", &id),
        Some(Fault::Unavailable { retry_after_secs }) => {
            let mut answer = refuse(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", &id);
            if let Some(secs) = retry_after_secs {
                answer
                    .headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, secs.into());
            }
            return answer;
        }
        Some(Fault::Auth) => return refuse(StatusCode::FORBIDDEN, "ExpiredProviderToken", &id),
        Some(Fault::Drop) => {
            shared.accepted.fetch_add(1, Ordering::Relaxed);
        }
        None => {
            shared.accepted.fetch_add(1, Ordering::Relaxed);
            shared.inbox.deliver(&token, payload);
        }
    }
    let mut answer = StatusCode::OK.into_response();
    answer.headers_mut().insert("apns-id", id);
    answer
}
