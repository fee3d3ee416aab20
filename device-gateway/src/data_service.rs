//! The Data Service client: how the NS delivers a device's app data to its server's Data
//! Service (DS), signed with the virtual server's key (the wire format is
//! [`countersign_protocol::data_service`], the contract `docs/data-service.md`).
//!
//! Rules:
//! - One HTTP/1.1 client for all servers (hyper, TLS by rustls on ring with the system's
//!   roots): pooled, kept-alive connections, `TCP_NODELAY`, no redirects followed (a
//!   redirect would carry signed app data somewhere the admin did not configure), no cookies.
//! - The URL must be absolute `http`/`https` with a host, no user info and no fragment
//!   ([`check_url`]); `@target-uri` is its normalised form, which is what goes on the wire.
//! - Every attempt gets a fresh signature nonce, so a retry of the same request id is a new
//!   message (the DS answers it from its idempotency memory) while a byte-for-byte replay is
//!   refused by the DS's nonce memory.
//! - 2xx and 4xx are the DS's answer and go back to the app ([`DsAnswer`]); 5xx (and 1xx/3xx),
//!   timeouts, refused connections and oversize answers are a [`DsError`]: nothing of them
//!   reaches the app but the kind.
//! - The app data, the key and the URL (which may carry a token in its query) never reach a
//!   log, an error or `Debug`.

use std::time::Duration;

use countersign_domain::{AccountId, AppInstanceId, ServerId};
use countersign_protocol::data_service::DsMessage;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use p256::ecdsa::SigningKey;

/// Largest app data one request carries, in bytes.
pub const MAX_DS_REQUEST_BYTES: usize = 64 * 1024;
/// Largest Data Service answer body accepted, in bytes.
pub const MAX_DS_ANSWER_BYTES: usize = 64 * 1024;
/// Idle kept-alive connections per DS host.
const MAX_IDLE_PER_HOST: usize = 512;

/// Posts signed requests to Data Services: one pooled, kept-alive HTTP/1.1 client (TLS by
/// rustls on the ring provider, the system's roots); cheap to clone.
#[derive(Clone)]
pub struct DataServiceClient {
    http: Option<Client<HttpsConnector<HttpConnector>, Full<Bytes>>>,
}

impl std::fmt::Debug for DataServiceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataServiceClient").finish_non_exhaustive()
    }
}

impl Default for DataServiceClient {
    fn default() -> Self {
        Self::new()
    }
}

/// [`DataServiceClient::with_extra_ca`] was given no PEM certificate it could use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a PEM certificate authority")]
pub struct InvalidCa;

impl DataServiceClient {
    /// A client with its own connection pool, trusting the system's roots.
    #[must_use]
    pub fn new() -> Self {
        Self::build(roots())
    }

    /// A client that also trusts the CAs in `pem` (a DS with a private CA; tests).
    ///
    /// # Errors
    /// [`InvalidCa`] if `pem` holds no certificate, or one that does not parse.
    pub fn with_extra_ca(pem: &str) -> Result<Self, InvalidCa> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;
        let mut roots = roots();
        let mut added = 0usize;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots
                .add(cert.map_err(|_| InvalidCa)?)
                .map_err(|_| InvalidCa)?;
            added += 1;
        }
        if added == 0 {
            return Err(InvalidCa);
        }
        Ok(Self::build(roots))
    }

    fn build(roots: rustls::RootCertStore) -> Self {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let Ok(tls) = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
        else {
            // ring supports rustls's safe defaults, so this does not happen; if it did, every
            // delivery would fail as unreachable rather than the process panic.
            tracing::error!("no TLS configuration: data service deliveries will fail");
            return Self { http: None };
        };
        let tls = tls.with_root_certificates(roots).with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
            .build(connector);
        Self { http: Some(http) }
    }

    /// Signs `request` with `signer` and posts it to `target`; one attempt, no retry (the
    /// app retries with the same request id). `target.timeout` bounds the whole exchange:
    /// connecting, sending, and reading the answer.
    ///
    /// # Errors
    /// [`DsError::RequestTooLarge`] and [`DsError::BadUrl`] before anything is sent;
    /// [`DsError::Key`] if no nonce could be drawn; then [`DsError::Timeout`],
    /// [`DsError::Unreachable`], [`DsError::ServerError`], [`DsError::AnswerTooLarge`].
    pub async fn call(
        &self,
        target: &DsTarget<'_>,
        signer: &DsSigner,
        request: &DsRequest<'_>,
    ) -> Result<DsAnswer, DsError> {
        if request.data.len() > MAX_DS_REQUEST_BYTES {
            return Err(DsError::RequestTooLarge);
        }
        let url = parse_url(target.url)?;
        let uri: hyper::Uri = url.as_str().parse().map_err(|_| DsError::BadUrl)?;
        let mut nonce = [0u8; 16];
        countersign_commands::random_bytes(&mut nonce).map_err(|_| DsError::Key)?;
        let message = request.message(url.as_str(), nonce);
        let mut builder = hyper::Request::post(uri)
            .header(hyper::header::USER_AGENT, USER_AGENT)
            .header(hyper::header::ACCEPT, "*/*");
        for (name, value) in message.sign(&signer.key) {
            builder = builder.header(name, value);
        }
        let http_request = builder
            .body(Full::new(Bytes::copy_from_slice(request.data)))
            // Only a header value could fail, and every one is ASCII made here.
            .map_err(|_| DsError::Key)?;
        tokio::time::timeout(target.timeout, self.exchange(http_request))
            .await
            .map_err(|_| DsError::Timeout)?
    }

    async fn exchange(&self, request: hyper::Request<Full<Bytes>>) -> Result<DsAnswer, DsError> {
        // hyper's errors may name the host; only their kind is kept.
        let http = self.http.as_ref().ok_or(DsError::Unreachable)?;
        let response = http
            .request(request)
            .await
            .map_err(|_| DsError::Unreachable)?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) && !(400..500).contains(&status) {
            return Err(DsError::ServerError { status });
        }
        let announced = response
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if announced.is_some_and(|n| n > MAX_DS_ANSWER_BYTES as u64) {
            return Err(DsError::AnswerTooLarge);
        }
        let mut incoming = response.into_body();
        let mut body = Vec::new();
        while let Some(frame) = incoming.frame().await {
            let frame = frame.map_err(|_| DsError::Unreachable)?;
            if let Ok(chunk) = frame.into_data() {
                if body.len() + chunk.len() > MAX_DS_ANSWER_BYTES {
                    return Err(DsError::AnswerTooLarge);
                }
                body.extend_from_slice(&chunk);
            }
        }
        Ok(DsAnswer { status, body })
    }
}

const USER_AGENT: &str = concat!("countersign/", env!("CARGO_PKG_VERSION"));

fn roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    if !native.errors.is_empty() {
        tracing::debug!(
            errors = native.errors.len(),
            "some system root certificates could not be loaded"
        );
    }
    roots.add_parsable_certificates(native.certs);
    roots
}

/// Whether `url` is a usable Data Service URL; its normalised form (what the NS signs as
/// `@target-uri` and what a DS should compare against) when it is.
///
/// # Errors
/// [`DsError::BadUrl`]: not absolute `http`/`https` with a host, or with user info or a
/// fragment.
pub fn check_url(url: &str) -> Result<String, DsError> {
    parse_url(url).map(|u| u.as_str().to_owned())
}

fn parse_url(url: &str) -> Result<reqwest::Url, DsError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| DsError::BadUrl)?;
    let usable = matches!(parsed.scheme(), "http" | "https")
        && parsed.host_str().is_some_and(|h| !h.is_empty())
        && parsed.username().is_empty()
        && parsed.password().is_none()
        && parsed.fragment().is_none();
    if usable {
        Ok(parsed)
    } else {
        Err(DsError::BadUrl)
    }
}

/// Where a server's Data Service is.
#[derive(Debug, Clone, Copy)]
pub struct DsTarget<'a> {
    /// Absolute `http` or `https` URL.
    pub url: &'a str,
    /// Longest the whole exchange may take.
    pub timeout: Duration,
}

/// A virtual server's signing key, ready to sign Data Service requests (cache one per server:
/// building it parses the key).
pub struct DsSigner {
    server: ServerId,
    key: SigningKey,
}

impl std::fmt::Debug for DsSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DsSigner")
            .field("server", &self.server.to_string())
            .finish_non_exhaustive()
    }
}

impl DsSigner {
    /// The signer of `server` from its P-256 secret scalar (32 bytes, as the vault keeps it).
    ///
    /// # Errors
    /// [`DsError::Key`] if the bytes are not a P-256 secret key.
    pub fn new(server: ServerId, secret_key_bytes: &[u8]) -> Result<Self, DsError> {
        let key = SigningKey::from_slice(secret_key_bytes).map_err(|_| DsError::Key)?;
        Ok(Self { server, key })
    }

    /// The server this signer signs for (the signature's `keyid`).
    #[must_use]
    pub fn server(&self) -> ServerId {
        self.server
    }

    /// The public key a DS verifies with: SEC1 uncompressed, as the server's published key.
    #[must_use]
    pub fn public_key_sec1(&self) -> Vec<u8> {
        use p256::elliptic_curve::sec1::ToSec1Point as _;
        self.key
            .verifying_key()
            .as_affine()
            .to_sec1_point(false)
            .as_bytes()
            .to_vec()
    }
}

/// One delivery: the app data and who it comes from.
#[derive(Clone, Copy)]
pub struct DsRequest<'a> {
    /// The virtual server.
    pub server_id: ServerId,
    /// The account that sent it (authenticated by its channel).
    pub account_id: AccountId,
    /// The account's user, when it is linked to one (`None`: headless).
    pub userid: Option<&'a str>,
    /// Whether the account is headless.
    pub headless: bool,
    /// The app installation the account lives in.
    pub app_instance: AppInstanceId,
    /// Chosen by the app; a retry carries the same id (idempotency at the DS).
    pub request_id: [u8; 16],
    /// Unix seconds, the signature's `created`.
    pub created_secs: u64,
    /// The app data.
    pub data: &'a [u8],
}

impl<'a> DsRequest<'a> {
    /// What is signed and sent for this request to `target_uri`, with the attempt's `nonce`.
    pub fn message(&self, target_uri: &'a str, nonce: [u8; 16]) -> DsMessage<'a> {
        DsMessage {
            target_uri,
            server_id: *self.server_id.as_bytes(),
            account_id: *self.account_id.as_bytes(),
            userid: self.userid,
            headless: self.headless,
            app_instance: *self.app_instance.as_bytes(),
            request_id: self.request_id,
            created: self.created_secs,
            nonce,
            body: self.data,
        }
    }
}

impl std::fmt::Debug for DsRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DsRequest")
            .field("server_id", &self.server_id.to_string())
            .field("account_id", &self.account_id.to_string())
            .field("headless", &self.headless)
            .field("data_len", &self.data.len())
            .finish_non_exhaustive()
    }
}

/// What the Data Service answered: a 2xx or 4xx status and its body.
#[derive(Clone, PartialEq, Eq)]
pub struct DsAnswer {
    /// The HTTP status (200..=299 or 400..=499).
    pub status: u16,
    /// The body, at most [`MAX_DS_ANSWER_BYTES`].
    pub body: Vec<u8>,
}

impl std::fmt::Debug for DsAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DsAnswer")
            .field("status", &self.status)
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// Why a delivery did not produce an answer. Messages never carry the URL, data or key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DsError {
    /// The Data Service did not answer within the target's timeout.
    #[error("the data service did not answer in time")]
    Timeout,
    /// No connection (refused, unresolvable, reset) or a broken answer.
    #[error("the data service is unreachable")]
    Unreachable,
    /// The Data Service answered 5xx (or a 1xx/3xx it should not).
    #[error("the data service failed with status {status}")]
    ServerError {
        /// The status it answered.
        status: u16,
    },
    /// The answer body is longer than [`MAX_DS_ANSWER_BYTES`].
    #[error("the data service answer is too large")]
    AnswerTooLarge,
    /// The app data is longer than [`MAX_DS_REQUEST_BYTES`] (nothing was sent).
    #[error("the app data is too large")]
    RequestTooLarge,
    /// The URL is not an absolute `http`/`https` URL.
    #[error("the data service URL is not an absolute http(s) URL")]
    BadUrl,
    /// The request could not be signed: the key is not a P-256 secret key, or the OS gave
    /// no randomness for the nonce.
    #[error("the data service request could not be signed")]
    Key,
}
