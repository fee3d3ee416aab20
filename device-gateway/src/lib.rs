//! The device gateway: where apps connect.
//!
//! Two routes under `/v1/device` (the wire format is `docs/device-protocol.md`):
//! - `GET /servers/{server_id}`: the virtual server's public channel key, which the app checks
//!   against the fingerprint it pinned from a QR code before it trusts it;
//! - `GET /servers/{server_id}/channel`: a WebSocket that carries one Noise `IK` channel
//!   ([`countersign_protocol::channel`]) and nothing readable.
//!
//! Each connection is authenticated in its first message: the device's static key is either
//! an account's channel key (checked against the account's stream, the write model, so a
//! device can connect the moment it enrolled) or a guest's key (enrolment, NOACCOUNTS). Then
//! requests become commands ([`flows`]) and their events; [`hub::Hub`] tails the log and tells
//! connected devices what happened elsewhere (a logout by the business system, an account
//! deleted by it).
//!
//! Rules: a connection must finish its handshake within the configured time; a guest channel
//! (no account) is closed after `guest_idle` without a request and after `guest_lifetime` in
//! all, so keys made up by anyone hold nothing for long; a frame that
//! does not decrypt closes the connection; a text WebSocket message closes it; a request that
//! does not decode is answered `invalid` with id 0 and the connection stays usable.

mod connection;
pub mod data_service;
mod flows;
pub mod hub;
pub mod pusher;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use countersign_commands::{Clock, Commands, load};
use countersign_domain::server::ActiveServer;
use countersign_domain::{Server, ServerId};
use countersign_eventstore::SharedStore;
use countersign_eventstore::vault::KeyVault;
use countersign_projections::read_models::ReadModels;
use countersign_protocol::channel::StaticKey;
use serde::Serialize;

pub use flows::data::{Rate, SecureChannelLimits};
pub use hub::Hub;
pub use pusher::Pusher;

/// Tunables.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Longest a device may take to send its first frame.
    pub handshake_timeout: Duration,
    /// Longest a read waits for a read model to catch up (the userid at enrolment).
    pub max_wait: Duration,
    /// SFS attestation keys this deployment trusts (its own SFS, and third-party apps' SFS
    /// it accepts). Empty: no second factor can be proven, so only servers with policy `none`
    /// log anyone in.
    pub trusted_sfs_keys: Vec<p256::ecdsa::VerifyingKey>,
    /// Longest a guest channel (no account: enrolment, a scan before enrolling) may go without
    /// a request before it is closed.
    pub guest_idle: Duration,
    /// Longest a guest channel may stay open at all.
    pub guest_lifetime: Duration,
    /// Message Centers this deployment sends push messages through (its own, and those of
    /// third-party apps it accepts): an account may register for push only with one of them.
    pub message_centers: Vec<TrustedMc>,
    /// Rate limits of the secure channel (app data, device data, headless enrolment).
    pub secure_channel: SecureChannelLimits,
}

/// A Message Center the deployment trusts: its channel key (what the app pins) and where the
/// NS submits messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedMc {
    /// SEC1 uncompressed P-256 channel key.
    pub key: Vec<u8>,
    /// Base URL, e.g. `http://127.0.0.1:8080` (the NS posts to `{url}/v1/mc/messages`).
    pub url: String,
}

impl TrustedMc {
    /// SHA-256 of the key: what `account.push_registered` names.
    #[must_use]
    pub fn key_id(&self) -> [u8; 32] {
        use sha2::Digest as _;
        sha2::Sha256::digest(&self.key).into()
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            max_wait: Duration::from_secs(5),
            trusted_sfs_keys: Vec::new(),
            guest_idle: Duration::from_secs(30),
            guest_lifetime: Duration::from_secs(600),
            message_centers: Vec::new(),
            secure_channel: SecureChannelLimits::default(),
        }
    }
}

struct Inner {
    commands: Commands,
    reads: ReadModels,
    store: SharedStore,
    vault: KeyVault,
    hub: Hub,
    keys: RwLock<HashMap<ServerId, StaticKey>>,
    push_keys: RwLock<HashMap<ServerId, Vec<u8>>>,
    servers: RwLock<HashMap<ServerId, (std::time::Instant, ActiveServer)>>,
    clock: Arc<dyn Clock>,
    config: GatewayConfig,
    secure_channel: flows::data::SecureChannel,
}

/// The gateway's shared state. Cheap to clone.
#[derive(Clone)]
pub struct Gateway(Arc<Inner>);

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("config", &self.0.config)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    pub fn new(
        commands: Commands,
        reads: ReadModels,
        store: SharedStore,
        vault: KeyVault,
        clock: Arc<dyn Clock>,
        config: GatewayConfig,
    ) -> Self {
        Self(Arc::new(Inner {
            commands,
            reads,
            store,
            vault,
            hub: Hub::default(),
            keys: RwLock::default(),
            push_keys: RwLock::default(),
            servers: RwLock::default(),
            clock,
            secure_channel: flows::data::SecureChannel::new(&config.secure_channel),
            config,
        }))
    }

    /// The routes, to be merged at the root of the HTTP server.
    pub fn router(&self) -> axum::Router {
        axum::Router::new()
            .route("/v1/device/servers/{server_id}", get(server_key))
            .route("/v1/device/servers/{server_id}/channel", get(channel))
            .with_state(self.clone())
    }

    /// The server's push sender public key (SEC1 uncompressed), when this deployment sends
    /// push messages (it trusts a Message Center); derived from the server's secret.
    pub(crate) async fn push_key(
        &self,
        server: ServerId,
    ) -> Result<Option<Vec<u8>>, countersign_commands::CommandError> {
        if self.0.config.message_centers.is_empty() {
            return Ok(None);
        }
        if let Some(key) = self
            .0
            .push_keys
            .read()
            .ok()
            .and_then(|k| k.get(&server).cloned())
        {
            return Ok(Some(key));
        }
        let secret = self.0.commands.secrets.push_sender_key(server).await?;
        let public = countersign_protocol::push::push_public_key(&secret).map_err(|e| {
            countersign_commands::CommandError::Internal(format!("push sender key: {e}"))
        })?;
        if let Ok(mut keys) = self.0.push_keys.write() {
            keys.insert(server, public.clone());
        }
        Ok(Some(public))
    }

    /// Adds the secure channel's metrics (`countersign_ds_requests_total{outcome}`, its
    /// latency) to `registry`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.0.secure_channel.register_metrics(registry);
    }

    /// The connection registry (for tests and metrics).
    pub fn hub(&self) -> &Hub {
        &self.0.hub
    }

    /// Tails the log and tells connected devices what they must hear of; restarts after a
    /// store failure. Runs until the task is dropped.
    pub async fn follow(&self) {
        let mut next = None;
        loop {
            let woken = self.0.reads.processed();
            match self
                .0
                .hub
                .follow(self.0.store.clone(), &mut next, woken)
                .await
            {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(%error, "the device notice follower failed; restarting");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// The server's static channel key, from the vault (cached: it never changes).
    async fn server_key(&self, server: ServerId) -> Result<Option<StaticKey>, GatewayError> {
        if let Some(key) = self
            .0
            .keys
            .read()
            .ok()
            .and_then(|keys| keys.get(&server).cloned())
        {
            return Ok(Some(key));
        }
        let reference = countersign_commands::server::signing_key_ref(server);
        let Some(bytes) = self.0.vault.get(&reference).await? else {
            return Ok(None);
        };
        let key = StaticKey::from_bytes(&bytes)
            .map_err(|_| GatewayError::Internal("a stored server key is not P-256".into()))?;
        if let Ok(mut keys) = self.0.keys.write() {
            keys.insert(server, key.clone());
        }
        Ok(Some(key))
    }

    /// The server's state from its own stream; `None` unless it exists and is not deleted.
    /// Remembered for [`SERVER_CACHE`]: every connection needs it twice (before the upgrade,
    /// and for the settings it answers with), and settings changes may take that long to
    /// reach devices.
    pub(crate) async fn active_server(
        &self,
        server: ServerId,
    ) -> Result<Option<ActiveServer>, GatewayError> {
        if let Some(active) = self.0.servers.read().ok().and_then(|servers| {
            servers
                .get(&server)
                .filter(|(at, _)| at.elapsed() < SERVER_CACHE)
                .map(|(_, active)| active.clone())
        }) {
            return Ok(Some(active));
        }
        self.active_server_now(server).await
    }

    /// As [`Self::active_server`], read from the stream now (a trust decision must not lag).
    pub(crate) async fn active_server_now(
        &self,
        server: ServerId,
    ) -> Result<Option<ActiveServer>, GatewayError> {
        let loaded = load::<Server>(&self.0.store, &server.stream()).await?;
        Ok(match loaded.state {
            Server::Active(active) => {
                if let Ok(mut servers) = self.0.servers.write() {
                    if servers.len() > 10_000 {
                        servers.clear();
                    }
                    servers.insert(server, (std::time::Instant::now(), active.clone()));
                }
                Some(active)
            }
            Server::NotCreated | Server::Deleted { .. } => None,
        })
    }
}

/// How long a server's settings are remembered.
const SERVER_CACHE: Duration = Duration::from_secs(1);

/// Failures on the gateway's side (never the device's fault).
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Command(#[from] countersign_commands::CommandError),
    #[error(transparent)]
    Store(#[from] countersign_eventstore::StoreError),
    #[error(transparent)]
    Projection(#[from] countersign_projections::ProjectionError),
    #[error("{0}")]
    Internal(String),
}

/// `GET /v1/device/servers/{server_id}`.
#[derive(Debug, Serialize)]
struct ServerKeyView {
    server_id: String,
    /// SEC1 uncompressed, hex.
    public_key: String,
}

fn problem(status: StatusCode, detail: &str) -> Response {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

fn internal(error: &GatewayError) -> Response {
    tracing::error!(%error, "device gateway failure");
    problem(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
}

async fn server_key(State(gateway): State<Gateway>, Path(server_id): Path<String>) -> Response {
    let Ok(server) = ServerId::parse_hex(&server_id) else {
        return problem(StatusCode::NOT_FOUND, "no such server");
    };
    let key = match gateway.active_server(server).await {
        Ok(Some(_)) => gateway.server_key(server).await,
        Ok(None) => return problem(StatusCode::NOT_FOUND, "no such server"),
        Err(error) => return internal(&error),
    };
    match key.map(|key| key.map(|key| key.public_key())) {
        Ok(Some(Ok(public_key))) => Json(ServerKeyView {
            server_id: server.to_string(),
            public_key: hex::encode(public_key),
        })
        .into_response(),
        Ok(None) => problem(StatusCode::NOT_FOUND, "no such server"),
        Ok(Some(Err(_))) => internal(&GatewayError::Internal(
            "a stored server key is not P-256".into(),
        )),
        Err(error) => internal(&error),
    }
}

async fn channel(
    State(gateway): State<Gateway>,
    Path(server_id): Path<String>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let Ok(server) = ServerId::parse_hex(&server_id) else {
        return problem(StatusCode::NOT_FOUND, "no such server");
    };
    let key = match gateway.active_server(server).await {
        Ok(Some(_)) => match gateway.server_key(server).await {
            Ok(Some(key)) => key,
            Ok(None) => return problem(StatusCode::NOT_FOUND, "no such server"),
            Err(error) => return internal(&error),
        },
        Ok(None) => return problem(StatusCode::NOT_FOUND, "no such server"),
        Err(error) => return internal(&error),
    };
    // Small buffers: most connections sit idle between a few small messages, and tungstenite's
    // 128 KiB defaults would cost that much per device. Frames larger than a Noise message
    // are refused at the WebSocket layer.
    upgrade
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_frame_size(countersign_protocol::channel::MAX_FRAME)
        .max_message_size(countersign_protocol::channel::MAX_FRAME)
        .on_upgrade(move |socket| connection::serve_socket(gateway, server, key, socket))
}
