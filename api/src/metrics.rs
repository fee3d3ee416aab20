//! Prometheus metrics at `/metrics`: requests by route, method and status; latency by route;
//! how far the read models are behind the log, in positions and in seconds. Routes are the
//! matched templates (`/v1/servers/{server_id}/sessions/{nonce}`), never the raw path, which
//! would hold nonces and userids.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::error::ApiError;
use crate::state::AppState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReaderLabels {
    /// `shared` (the fan-out's one reader) or `catch_up` (a stream reading its backlog).
    pub reader: &'static str,
}

/// The event streams' counters, shared with [`crate::streams::Streams`].
#[derive(Clone, Debug, Default)]
pub(crate) struct StreamMetrics {
    /// Reads of the log made for event streams, by reader.
    pub log_reads: Family<ReaderLabels, Counter>,
    /// Event streams open now.
    pub open: Gauge,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    ])
}

struct Inner {
    registry: Registry,
    /// Metrics of components served beside the API (the Message Center), registered after
    /// start-up, without the prefix (their names carry it).
    extra: std::sync::Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    lag_positions: Gauge,
    lag_seconds: Gauge<f64, AtomicU64>,
    streams: StreamMetrics,
}

/// The API's metrics.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("countersign");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        let lag_positions = Gauge::default();
        let lag_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by method, route and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer, by method and route",
            latency.clone(),
        );
        registry.register(
            "projection_lag_positions",
            "Committed log positions the read models have not processed yet",
            lag_positions.clone(),
        );
        registry.register(
            "projection_lag_seconds",
            "Age of the oldest committed event the read models have not processed yet",
            lag_seconds.clone(),
        );
        let streams = StreamMetrics::default();
        registry.register(
            "stream_log_reads",
            "Reads of the log made for event streams, by reader: shared (the one reader that fans out to every stream) or catch_up (a stream reading its backlog)",
            streams.log_reads.clone(),
        );
        registry.register(
            "streams_open",
            "Server-sent event streams open now",
            streams.open.clone(),
        );
        Self(Arc::new(Inner {
            streams,
            registry,
            extra: std::sync::Mutex::new(Registry::default()),
            requests,
            latency,
            lag_positions,
            lag_seconds,
        }))
    }
}

impl Metrics {
    /// Adds a component's metrics to what `GET /metrics` answers.
    pub fn register(&self, register: impl FnOnce(&mut Registry)) {
        if let Ok(mut extra) = self.0.extra.lock() {
            register(&mut extra);
        }
    }

    pub(crate) fn streams(&self) -> &StreamMetrics {
        &self.0.streams
    }
}

/// Counts and times every request.
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let metrics = &state.metrics().0;
    metrics
        .latency
        .get_or_create(&RouteLabels {
            method: method.clone(),
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    metrics
        .requests
        .get_or_create(&RequestLabels {
            method,
            route,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

/// The Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format (OpenMetrics)", body = String, content_type = "application/openmetrics-text")))]
pub async fn scrape(State(state): State<AppState>) -> Result<Response, ApiError> {
    let processed = *state.reads().processed().borrow();
    let head = state.store().last_position().await?;
    let behind = head.map_or(0, |h| (h + 1).saturating_sub(processed));
    let metrics = &state.metrics().0;
    metrics
        .lag_positions
        .set(i64::try_from(behind).unwrap_or(i64::MAX));
    let mut lag_seconds = 0.0;
    if behind > 0 {
        let oldest = state.store().read_all(processed, 1).await?;
        if let Some(event) = oldest.first() {
            let age_ms = state.clock().now().as_millis() - event.recorded_at;
            lag_seconds = age_ms.max(0) as f64 / 1000.0;
        }
    }
    metrics.lag_seconds.set(lag_seconds);
    let mut text = String::new();
    prometheus_client::encoding::text::encode_registry(&mut text, &metrics.registry)
        .map_err(ApiError::internal)?;
    if let Ok(extra) = metrics.extra.lock() {
        prometheus_client::encoding::text::encode_registry(&mut text, &extra)
            .map_err(ApiError::internal)?;
    }
    prometheus_client::encoding::text::encode_eof(&mut text).map_err(ApiError::internal)?;
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(response)
}
