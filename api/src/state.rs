//! What every handler shares: the command services, the read models, the configuration, and
//! read-your-writes waiting.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use countersign_commands::{Clock, Commands};
use countersign_eventstore::SharedStore;
use countersign_projections::ReadModels;
use countersign_projections::audit::AuditTree;
use serde::Serialize;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use crate::auth::Tenant;
use crate::error::{ApiError, Json};
use crate::metrics::Metrics;

/// The API's settings.
#[derive(Clone)]
pub struct ApiConfig {
    /// SHA-256 of the admin key (the key itself is not kept).
    pub admin_key_hash: [u8; 32],
    /// Where apps reach the device gateway; goes into QR codes.
    pub gateway_url: String,
    /// Longest a read waits for `min_position`.
    pub max_wait: Duration,
    /// Largest request body, bytes.
    pub body_limit: usize,
    /// Longest a request may take before it answers 408 (streams excluded once started).
    pub request_timeout: Duration,
    /// Caps on server-sent event streams.
    pub streams: crate::streams::StreamLimits,
    /// How often one user may be sent a push login.
    pub provoke: crate::provoke::ProvokeLimits,
    /// OpenAPI paths, schemas, security schemes and tags served with the API's own in
    /// `/openapi.json`: the routes other crates merge into the same server (the IdP's).
    pub openapi_extension: Option<std::sync::Arc<serde_json::Value>>,
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("gateway_url", &self.gateway_url)
            .field("max_wait", &self.max_wait)
            .field("body_limit", &self.body_limit)
            .field("request_timeout", &self.request_timeout)
            .field("streams", &self.streams)
            .finish_non_exhaustive()
    }
}

impl ApiConfig {
    /// Settings with the given admin key and defaults for the rest.
    pub fn new(admin_key: &str, gateway_url: impl Into<String>) -> Self {
        Self {
            admin_key_hash: Sha256::digest(admin_key.as_bytes()).into(),
            gateway_url: gateway_url.into(),
            max_wait: crate::DEFAULT_MAX_WAIT,
            body_limit: 64 * 1024,
            request_timeout: Duration::from_secs(30),
            streams: crate::streams::StreamLimits::default(),
            provoke: crate::provoke::ProvokeLimits::default(),
            openapi_extension: None,
        }
    }
}

type Credentials =
    std::sync::RwLock<std::collections::HashMap<[u8; 32], (std::time::Instant, Tenant)>>;

struct Inner {
    credentials: Credentials,
    audit: AuditTree,
    audit_key: Option<p256::ecdsa::VerifyingKey>,
    commands: Commands,
    reads: ReadModels,
    store: SharedStore,
    clock: Arc<dyn Clock>,
    config: ApiConfig,
    metrics: Metrics,
    streams: Arc<crate::streams::Streams>,
    provokes: crate::provoke::Limiter,
}

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("config", &self.0.config)
            .finish_non_exhaustive()
    }
}

impl AppState {
    pub fn new(
        commands: Commands,
        reads: ReadModels,
        store: SharedStore,
        clock: Arc<dyn Clock>,
        config: ApiConfig,
    ) -> Self {
        let audit = AuditTree::new(reads.database().clone());
        let metrics = Metrics::new();
        let streams = crate::streams::Streams::new(config.streams, metrics.streams().clone());
        let provokes = crate::provoke::Limiter::new(config.provoke);
        Self(Arc::new(Inner {
            provokes,
            streams,
            credentials: Credentials::default(),
            audit,
            audit_key: None,
            commands,
            reads,
            store,
            clock,
            config,
            metrics,
        }))
    }

    /// The per-user push login limiter (the provoke endpoints and the IdP's CIBA requests).
    pub fn provokes(&self) -> &crate::provoke::Limiter {
        &self.0.provokes
    }

    /// A key checked less than `ttl` ago.
    pub(crate) fn remembered_credential(&self, hash: &[u8; 32], ttl: Duration) -> Option<Tenant> {
        let credentials = self.0.credentials.read().ok()?;
        let (at, tenant) = credentials.get(hash)?;
        (at.elapsed() < ttl).then_some(*tenant)
    }

    pub(crate) fn remember_credential(&self, hash: [u8; 32], tenant: Tenant) {
        if let Ok(mut credentials) = self.0.credentials.write() {
            if credentials.len() > 10_000 {
                credentials.clear();
            }
            credentials.insert(hash, (std::time::Instant::now(), tenant));
        }
    }

    /// Forgets every remembered key (a key was revoked or a server deleted).
    pub(crate) fn forget_credentials(&self) {
        if let Ok(mut credentials) = self.0.credentials.write() {
            credentials.clear();
        }
        self.0.streams.revoked();
    }

    /// The process's event streams: caps, the shared log reader.
    pub(crate) fn streams(&self) -> &Arc<crate::streams::Streams> {
        &self.0.streams
    }

    /// The audit tree to serve proofs from and the key this deployment signs checkpoints
    /// with (served at `/v1/audit/key`). Call before sharing the state.
    #[must_use]
    pub fn with_audit(self, tree: AuditTree, key: p256::ecdsa::VerifyingKey) -> Self {
        match Arc::try_unwrap(self.0) {
            Ok(mut inner) => {
                inner.audit = tree;
                inner.audit_key = Some(key);
                Self(Arc::new(inner))
            }
            Err(shared) => Self(shared),
        }
    }

    pub fn audit(&self) -> &AuditTree {
        &self.0.audit
    }

    pub fn audit_key(&self) -> Option<&p256::ecdsa::VerifyingKey> {
        self.0.audit_key.as_ref()
    }

    pub fn commands(&self) -> &Commands {
        &self.0.commands
    }

    pub fn reads(&self) -> &ReadModels {
        &self.0.reads
    }

    pub fn store(&self) -> &SharedStore {
        &self.0.store
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.0.clock
    }

    pub fn config(&self) -> &ApiConfig {
        &self.0.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// Waits until every read model has processed `position` (no wait for `None`), at most
    /// the configured time; then `NotReady` (503, retry).
    pub async fn wait_for(&self, position: Option<u64>) -> Result<(), ApiError> {
        let Some(position) = position else {
            return Ok(());
        };
        if *self.0.reads.processed().borrow() > position {
            return Ok(());
        }
        // No write was ever acknowledged beyond the log's head: such a position is the
        // caller's mistake, not something to wait for.
        let head = self.0.store.last_position().await?;
        if head.is_none_or(|head| position > head) {
            return Err(ApiError::Invalid(format!(
                "min_position {position} is beyond the end of the log"
            )));
        }
        if self
            .0
            .reads
            .wait_for(position, self.0.config.max_wait)
            .await?
        {
            Ok(())
        } else {
            Err(ApiError::NotReady(position))
        }
    }
}

/// `/healthz` and `/readyz` answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, or what is wrong.
    pub status: String,
    /// The last committed log position (`null`: empty log).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head: Option<u64>,
    /// The next position the read models will process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processed: Option<u64>,
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is up", body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        head: None,
        processed: None,
    })
}

/// The database answers; reports how far the read models are.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "The database does not answer", body = Health),
    ))]
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    match state.store().last_position().await {
        Ok(head) => (
            StatusCode::OK,
            Json(Health {
                status: "ok".into(),
                head,
                processed: Some(*state.reads().processed().borrow()),
            }),
        ),
        Err(error) => {
            tracing::warn!(%error, "not ready");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(Health {
                    status: "database unavailable".into(),
                    head: None,
                    processed: None,
                }),
            )
        }
    }
}
