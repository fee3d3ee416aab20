//! The FCM stand-in: FCM HTTP v1's `messages:send` and Google's OAuth2 token endpoint.
//!
//! Owns a plain HTTP/1.1 server that answers as the documentation says:
//! - `POST /token` (form `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=JWT`):
//!   the RS256 JWT must verify against the service account's public key and carry `iss` =
//!   `client_email`, `aud` = this token URI, the firebase.messaging `scope`, and a current
//!   `iat`/`exp` at most an hour apart; answers `{"access_token","expires_in","token_type":"Bearer"}`
//!   or `400 {"error":"invalid_grant"}`.
//! - `POST /v1/projects/{project}/messages:send` with `Authorization: Bearer <access token>`:
//!   `{"name":"projects/P/messages/ID"}`, or FCM's error body
//!   `{"error":{"code","message","status","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode"}]}}`
//!   (`401 UNAUTHENTICATED`, `403 PERMISSION_DENIED`, `400 INVALID_ARGUMENT`, `404 UNREGISTERED`,
//!   `503 UNAVAILABLE`), faults first (see [`super::Fault`]).
//! - The control API of [`super`] on the same listener (not recorded).
//!
//! The service account's key is the fixed test-only RSA key `standin_rsa_key.pem`: a stand-in's,
//! never a real one (RSA key generation is slow and ring has none).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use super::{Fault, Shared, StandinError, StandinInfo, StandinKind};
use crate::fcm::{ASSERTION_LIFETIME, FCM_SCOPE, JWT_BEARER_GRANT, ServiceAccount};
use crate::push::{SystemWallClock, WallClock};

/// The stand-in's test-only RSA key file (an explanation, then the PKCS#8 PEM). Not a real
/// credential.
const STANDIN_RSA_KEY_FILE: &str = include_str!("standin_rsa_key.pem");

/// The PEM part of [`STANDIN_RSA_KEY_FILE`], as a service-account file carries it.
fn standin_key_pem() -> &'static str {
    STANDIN_RSA_KEY_FILE
        .find("-----BEGIN")
        .and_then(|start| STANDIN_RSA_KEY_FILE.get(start..))
        .unwrap_or(STANDIN_RSA_KEY_FILE)
}
/// The project the stand-in's service account sends for.
pub const STANDIN_PROJECT_ID: &str = "countersign-standin";
/// The stand-in's service account.
pub const STANDIN_CLIENT_EMAIL: &str = "push-sender@countersign-standin.iam.gserviceaccount.com";
/// Access tokens live as long as Google's (3599 s).
const ACCESS_TOKEN_LIFETIME_SECS: u64 = 3599;
/// FCM's limit on a message's `data` (keys and values).
const MAX_DATA_BYTES: usize = 4096;
/// How far a JWT's `iat` may lie in the future (clock skew).
const CLOCK_SKEW_SECS: u64 = 300;

struct FcmState {
    shared: Arc<Shared>,
    public_key_der: Vec<u8>,
    token_uri: String,
    clock: Arc<dyn WallClock>,
    /// Issued access tokens and when they expire (Unix seconds).
    tokens: Mutex<HashMap<String, u64>>,
    token_requests: AtomicU64,
}

/// A running FCM stand-in; stops when dropped.
pub struct FcmStandin {
    state: Arc<FcmState>,
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for FcmStandin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FcmStandin")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Drop for FcmStandin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The URL a client uses for a bound address (an unspecified address means this host).
pub(crate) fn url_for(scheme: &str, addr: SocketAddr) -> String {
    let ip = if addr.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        addr.ip()
    };
    format!("{scheme}://{}", SocketAddr::new(ip, addr.port()))
}

impl FcmStandin {
    /// Starts on `addr` (port 0: any free port) with the system clock.
    ///
    /// # Errors
    /// [`StandinError`] when it cannot listen or load its key.
    pub async fn start(addr: SocketAddr) -> Result<Self, StandinError> {
        Self::start_with_clock(addr, Arc::new(SystemWallClock)).await
    }

    /// Starts on `addr`, judging JWT and access-token times by `clock`.
    ///
    /// # Errors
    /// [`StandinError`] when it cannot listen or load its key.
    pub async fn start_with_clock(
        addr: SocketAddr,
        clock: Arc<dyn WallClock>,
    ) -> Result<Self, StandinError> {
        let key = standin_key()?;
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let url = url_for("http", listener.local_addr()?);
        let shared = Arc::new(Shared::default());
        let state = Arc::new(FcmState {
            shared: shared.clone(),
            public_key_der: ring::signature::KeyPair::public_key(&key).as_ref().to_vec(),
            token_uri: format!("{url}/token"),
            clock,
            tokens: Mutex::default(),
            token_requests: AtomicU64::new(0),
        });
        let api = Router::new()
            .route("/token", post(token))
            .route("/v1/projects/{project}/messages:send", post(send))
            .layer(axum::middleware::from_fn_with_state(
                shared.clone(),
                super::record_layer,
            ))
            .with_state(state.clone());
        let router = api.merge(super::control_router(shared));
        let task = super::serve_plain(listener, router);
        Ok(Self { state, url, task })
    }

    /// The API base URL (`http://127.0.0.1:PORT`), the sender's `api_base_url`.
    #[must_use]
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The control API's base URL: the same listener.
    #[must_use]
    pub fn control_url(&self) -> String {
        self.url.clone()
    }

    /// The token endpoint (`{url}/token`), the service account's `token_uri`.
    #[must_use]
    pub fn token_uri(&self) -> String {
        self.state.token_uri.clone()
    }

    /// The project id messages are sent for.
    #[must_use]
    pub fn project_id(&self) -> &'static str {
        STANDIN_PROJECT_ID
    }

    /// The service-account key file a Message Center is configured with (Google's format).
    #[must_use]
    pub fn service_account_json(&self) -> String {
        json!({
            "type": "service_account",
            "project_id": STANDIN_PROJECT_ID,
            "private_key_id": "standin",
            "private_key": standin_key_pem(),
            "client_email": STANDIN_CLIENT_EMAIL,
            "client_id": "0",
            "token_uri": self.state.token_uri,
        })
        .to_string()
    }

    /// The same service account, parsed.
    #[must_use]
    pub fn service_account(&self) -> ServiceAccount {
        ServiceAccount::new(
            STANDIN_CLIENT_EMAIL.to_owned(),
            standin_key_pem().to_owned(),
            self.state.token_uri.clone(),
            STANDIN_PROJECT_ID.to_owned(),
        )
    }

    /// A sender configuration for this stand-in (its URL and service account).
    #[must_use]
    pub fn sender_config(&self) -> crate::fcm::FcmConfig {
        let mut config = crate::fcm::FcmConfig::new(self.service_account());
        config.api_base_url = self.url();
        config
    }

    shared_accessors! {
        recorded: "Every request received on the API routes.",
        accepted: "How many messages were answered as a success (dropped ones included).",
    }

    /// How many times the token endpoint was asked for an access token.
    #[must_use]
    pub fn token_requests(&self) -> u64 {
        self.state.token_requests.load(Ordering::Relaxed)
    }

    /// What a developer needs to use it.
    #[must_use]
    pub fn info(&self) -> StandinInfo {
        StandinInfo {
            kind: StandinKind::Fcm,
            url: self.url(),
            control_url: self.control_url(),
            files: vec![(
                "fcm-service-account.json".to_owned(),
                self.service_account_json(),
            )],
            settings: vec![("project_id".to_owned(), STANDIN_PROJECT_ID.to_owned())],
        }
    }
}

fn standin_key() -> Result<ring::signature::RsaKeyPair, StandinError> {
    use rustls::pki_types::PrivatePkcs8KeyDer;
    use rustls::pki_types::pem::PemObject as _;
    let der = PrivatePkcs8KeyDer::from_pem_slice(standin_key_pem().as_bytes())
        .map_err(|_| StandinError::Credentials("the stand-in RSA key PEM"))?;
    ring::signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
        .map_err(|_| StandinError::Credentials("the stand-in RSA key"))
}

/// Decodes `application/x-www-form-urlencoded` (`+` and `%XX`); `None` when malformed.
fn form_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            _ => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn form_field(body: &str, name: &str) -> Option<String> {
    body.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (form_decode(key)? == name)
            .then(|| form_decode(value))
            .flatten()
    })
}

fn invalid_grant(description: &'static str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"error": "invalid_grant", "error_description": description})),
    )
        .into_response()
}

/// Splits and checks a JWT's RS256 signature; gives its claims.
fn verify_rs256(jwt: &str, public_key_der: &[u8]) -> Result<Value, &'static str> {
    let b64 = |part: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| "Invalid JWT: not base64url")
    };
    let Some((header, claims, signature)) = super::jwt_parts(jwt) else {
        return Err("Invalid JWT: not three parts");
    };
    let header: Value =
        serde_json::from_slice(&b64(header)?).map_err(|_| "Invalid JWT: header not JSON")?;
    if header.get("alg").and_then(Value::as_str) != Some("RS256") {
        return Err("Invalid JWT: alg is not RS256");
    }
    let signing_input_len = jwt.len() - signature.len() - 1;
    let signing_input = jwt.get(..signing_input_len).ok_or("Invalid JWT")?;
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        public_key_der,
    )
    .verify(signing_input.as_bytes(), &b64(signature)?)
    .map_err(|_| "Invalid JWT Signature.")?;
    serde_json::from_slice(&b64(claims)?).map_err(|_| "Invalid JWT: claims not JSON")
}

async fn token(State(state): State<Arc<FcmState>>, body: Bytes) -> Response {
    state.token_requests.fetch_add(1, Ordering::Relaxed);
    let Ok(body) = std::str::from_utf8(&body) else {
        return invalid_grant("malformed form");
    };
    if form_field(body, "grant_type").as_deref() != Some(JWT_BEARER_GRANT) {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "unsupported_grant_type", "error_description": "Invalid grant_type"})),
        )
            .into_response();
    }
    let Some(assertion) = form_field(body, "assertion") else {
        return invalid_grant("Missing assertion");
    };
    let claims = match verify_rs256(&assertion, &state.public_key_der) {
        Ok(claims) => claims,
        Err(description) => return invalid_grant(description),
    };
    let now = state.clock.now_unix_secs();
    let text = |name: &str| claims.get(name).and_then(Value::as_str).unwrap_or_default();
    let number = |name: &str| claims.get(name).and_then(Value::as_u64);
    if text("iss") != STANDIN_CLIENT_EMAIL {
        return invalid_grant("Invalid issuer");
    }
    if text("aud") != state.token_uri {
        return invalid_grant("Invalid audience");
    }
    if !text("scope").split(' ').any(|s| s == FCM_SCOPE) {
        return invalid_grant("Missing the firebase.messaging scope");
    }
    let (Some(iat), Some(exp)) = (number("iat"), number("exp")) else {
        return invalid_grant("Missing iat or exp");
    };
    if exp <= now
        || iat > now + CLOCK_SKEW_SECS
        || exp < iat
        || exp - iat > ASSERTION_LIFETIME.as_secs()
    {
        return invalid_grant(
            "Invalid JWT: Token must be a short-lived token and in a reasonable timeframe",
        );
    }
    let access_token = format!("ya29.standin.{}", super::random_hex(24));
    state
        .tokens
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(access_token.clone(), now + ACCESS_TOKEN_LIFETIME_SECS);
    axum::Json(json!({
        "access_token": access_token,
        "expires_in": ACCESS_TOKEN_LIFETIME_SECS,
        "token_type": "Bearer",
    }))
    .into_response()
}

/// FCM's error answer.
fn fcm_error(
    status: StatusCode,
    status_word: &str,
    message: &str,
    error_code: Option<&str>,
) -> Response {
    let details = error_code.map_or_else(Vec::new, |code| {
        vec![json!({
            "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
            "errorCode": code,
        })]
    });
    let mut error = json!({
        "code": status.as_u16(),
        "message": message,
        "status": status_word,
    });
    if !details.is_empty()
        && let Some(fields) = error.as_object_mut()
    {
        fields.insert("details".to_owned(), Value::Array(details));
    }
    (status, axum::Json(json!({ "error": error }))).into_response()
}

fn unauthenticated() -> Response {
    fcm_error(
        StatusCode::UNAUTHORIZED,
        "UNAUTHENTICATED",
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
        None,
    )
}

fn invalid_argument(message: &str) -> Response {
    fcm_error(
        StatusCode::BAD_REQUEST,
        "INVALID_ARGUMENT",
        message,
        Some("INVALID_ARGUMENT"),
    )
}

/// The message's token and data, or why FCM would refuse it (`INVALID_ARGUMENT`).
fn check_message(body: &[u8]) -> Result<(String, Value), &'static str> {
    let body: Value = serde_json::from_slice(body).map_err(|_| "Invalid JSON payload received.")?;
    let message = body
        .get("message")
        .and_then(Value::as_object)
        .ok_or("Request contains an invalid argument: message")?;
    let token = message
        .get("token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or("Recipient of the message is not set.")?;
    let data = message.get("data").cloned().unwrap_or_else(|| json!({}));
    let Some(fields) = data.as_object() else {
        return Err("Invalid value at 'message.data'");
    };
    let mut size = 0;
    for (key, value) in fields {
        let Some(value) = value.as_str() else {
            return Err("Invalid value at 'message.data': values must be strings");
        };
        size += key.len() + value.len();
    }
    if size > MAX_DATA_BYTES {
        return Err("Message is too big");
    }
    if let Some(android) = message.get("android") {
        let priority = android.get("priority").and_then(Value::as_str);
        if !matches!(priority, None | Some("HIGH" | "NORMAL")) {
            return Err("Invalid value at 'message.android.priority'");
        }
        if let Some(ttl) = android.get("ttl") {
            let valid = ttl
                .as_str()
                .and_then(|t| t.strip_suffix('s'))
                .is_some_and(|n| !n.is_empty() && n.parse::<f64>().is_ok_and(|v| v >= 0.0));
            if !valid {
                return Err("Invalid value at 'message.android.ttl'");
            }
        }
    }
    Ok((token.to_owned(), data))
}

async fn send(
    State(state): State<Arc<FcmState>>,
    Path(project): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let shared = &state.shared;
    shared.requests.fetch_add(1, Ordering::Relaxed);
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let now = state.clock.now_unix_secs();
    let authorised = bearer.is_some_and(|token| {
        state
            .tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(token)
            .is_some_and(|&expires| now < expires)
    });
    if !authorised {
        return unauthenticated();
    }
    if project != STANDIN_PROJECT_ID {
        return fcm_error(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            "Permission 'cloudmessaging.messages.create' denied on resource",
            None,
        );
    }
    let (token, data) = match check_message(&body) {
        Ok(found) => found,
        Err(message) => return invalid_argument(message),
    };
    match shared.faults.take(&token) {
        Some(Fault::Unregistered) => {
            return fcm_error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "Requested entity was not found.",
                Some("UNREGISTERED"),
            );
        }
        Some(Fault::BadToken) => {
            return invalid_argument(
                "The registration token is not a valid FCM registration token",
            );
        }
        Some(Fault::Unavailable { retry_after_secs }) => {
            let mut answer = fcm_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "The service is currently unavailable.",
                Some("UNAVAILABLE"),
            );
            if let Some(secs) = retry_after_secs {
                answer
                    .headers_mut()
                    .insert(header::RETRY_AFTER, secs.into());
            }
            return answer;
        }
        Some(Fault::Auth) => {
            // As if the credential had been revoked: every token issued so far stops working.
            state
                .tokens
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
            return unauthenticated();
        }
        Some(Fault::Drop) => {
            shared.accepted.fetch_add(1, Ordering::Relaxed);
            return axum::Json(json!({
                "name": format!("projects/{project}/messages/0:dropped%{}", super::random_hex(8)),
            }))
            .into_response();
        }
        None => {}
    }
    shared.accepted.fetch_add(1, Ordering::Relaxed);
    let seq = shared.inbox.deliver(&token, data);
    axum::Json(json!({ "name": format!("projects/{project}/messages/0:{seq}") })).into_response()
}
