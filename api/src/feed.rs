//! A tenant's own events, for integrators: `GET /v1/servers/{id}/events?after=P` pages through
//! them, `…/events/stream` follows them as server-sent events (each with `id:` = its position,
//! so a client resumes with `Last-Event-ID`). Scaled deployments also publish every event to
//! Kafka (see `docs/scale-out.md`); this is the per-tenant view of the same log.
//!
//! A page scans at most [`SCAN`] positions of the log after `after`, so a tenant with few
//! events in a busy log may get an empty page with `next_after` moved on: ask again from
//! there. Only events of the tenant's own streams (`server-{id}`, `{kind}-{id}-…`) are shown.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use countersign_domain::{AnyEvent, DomainEvent as _};
use countersign_eventstore::RecordedEvent;
use futures::Stream;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Tenant;
use crate::error::{ApiError, Json, Path, Problem, Query};
use crate::state::AppState;
use crate::streams::Heard;

/// Log positions one page scans at most.
pub const SCAN: usize = 10_000;

/// Where a page starts and how long it is.
#[derive(Debug, Clone, Copy, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FeedParams {
    /// Events after this log position, below 2^63 − 1 (absent: from the start of the log).
    #[param(minimum = 0)]
    #[serde(default, deserialize_with = "crate::error::positions::optional_after")]
    pub after: Option<u64>,
    /// Events per page, 1–1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// One event of the tenant's.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventView {
    pub position: u64,
    pub stream: String,
    /// Per stream, from 0.
    pub version: u64,
    pub event_id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub schema_version: u16,
    /// Commit time, milliseconds since the Unix epoch.
    pub recorded_at: i64,
    /// The payload as JSON (sealed personal data stays sealed).
    pub payload: serde_json::Value,
    /// The canonical bytes the audit trail hashes (unpadded base64url): check the event's
    /// inclusion proof with them.
    pub canonical: String,
}

/// A page of events.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventPage {
    pub events: Vec<EventView>,
    /// The last log position this page looked at: the next page's `after` (`null` when the
    /// log holds nothing after `after`).
    pub next_after: Option<u64>,
    /// The log's last position when the page was read.
    pub head: Option<u64>,
}

fn view(event: &RecordedEvent) -> Result<EventView, ApiError> {
    let payload = match AnyEvent::decode(&event.event_type, event.schema_version, &event.payload) {
        Ok(decoded) => decoded.to_json(),
        Err(_) => serde_json::Value::Null,
    };
    Ok(EventView {
        position: event.position,
        stream: event.stream.clone(),
        version: event.version,
        event_id: event.event_id.to_string(),
        event_type: event.event_type.clone(),
        schema_version: event.schema_version,
        recorded_at: event.recorded_at,
        payload,
        canonical: URL_SAFE_NO_PAD.encode(event.canonical_bytes()?),
    })
}

/// An event as the feed shows it, as JSON; `None` (and a warning) when it cannot be shown.
pub(crate) fn render(event: &RecordedEvent) -> Option<std::sync::Arc<str>> {
    match view(event).and_then(|v| serde_json::to_string(&v).map_err(ApiError::internal)) {
        Ok(json) => Some(json.into()),
        Err(error) => {
            tracing::warn!(%error, position = event.position, "event stream: cannot show an event");
            None
        }
    }
}

/// Up to `limit` of the tenant's events after `after`, scanning at most [`SCAN`] positions.
async fn page(
    state: &AppState,
    server: &str,
    after: Option<u64>,
    limit: usize,
) -> Result<EventPage, ApiError> {
    let head = state.store().last_position().await?;
    let mut from = after.map_or(0, |p| p.saturating_add(1));
    let mut events = Vec::new();
    let mut next_after = None;
    let mut scanned = 0;
    while scanned < SCAN && events.len() < limit {
        let batch = state
            .store()
            .read_all(from, 1_000.min(SCAN - scanned))
            .await?;
        let Some(last) = batch.last().map(|e| e.position) else {
            break;
        };
        for event in &batch {
            if crate::audit::stream_of(&event.stream, server) {
                events.push(view(event)?);
            }
            next_after = Some(event.position);
            if events.len() == limit {
                break;
            }
        }
        scanned += batch.len();
        from = last + 1;
    }
    Ok(EventPage {
        events,
        next_after: next_after.or(after),
        head,
    })
}

fn limit(params: &FeedParams) -> Result<usize, ApiError> {
    match params.limit {
        None => Ok(100),
        Some(n @ 1..=1000) => Ok(n as usize),
        Some(_) => Err(ApiError::Invalid("limit must be between 1 and 1000".into())),
    }
}

/// The tenant's events after a position.
#[utoipa::path(get, path = "/v1/servers/{server_id}/events", tag = "events",
    params(("server_id" = String, Path, description = "32 hex digits"), FeedParams),
    responses(
        (status = 200, description = "A page of events", body = EventPage),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "limit out of range", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn events(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(_server): Path<String>,
    Query(params): Query<FeedParams>,
) -> Result<Json<EventPage>, ApiError> {
    let limit = limit(&params)?;
    Ok(Json(
        page(&state, &tenant.server.to_string(), params.after, limit).await?,
    ))
}

/// The tenant's events as they are committed (server-sent events named `event`, `id` = the
/// position). Starts after `after`, or after the `Last-Event-ID` header's position.
#[utoipa::path(get, path = "/v1/servers/{server_id}/events/stream", tag = "events",
    params(("server_id" = String, Path, description = "32 hex digits"), FeedParams),
    responses(
        (status = 200, description = "An event stream of EventView", content_type = "text/event-stream", body = crate::views::SseEvent),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "limit out of range", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn event_stream(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(_server): Path<String>,
    Query(params): Query<FeedParams>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let limit = limit(&params)?;
    let resume = match headers.get("last-event-id") {
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::Invalid("Last-Event-ID must be a log position".into()))
                .and_then(|p| crate::error::position_after("Last-Event-ID", p))?,
        ),
        None => None,
    };
    let listener = crate::streams::Listener::open(&state, tenant)?;
    let after = resume.or(params.after);
    struct Follow {
        state: AppState,
        server: String,
        /// The next log position to look at.
        next: u64,
        listener: crate::streams::Listener,
        /// The fan-out may not hold everything from `next` on: read the log.
        behind: bool,
        /// (position, the event's JSON) to send.
        queue: std::collections::VecDeque<(u64, std::sync::Arc<str>)>,
        greeted: bool,
    }
    impl Follow {
        /// Queues the tenant's events of `batch` from `next` on.
        fn take(&mut self, batch: &[crate::streams::Shared]) {
            let from = self.next;
            for shared in batch.iter().filter(|e| e.event.position >= from) {
                let event = &shared.event;
                if crate::audit::stream_of(&event.stream, &self.server)
                    && let Some(json) = shared.json()
                {
                    self.queue.push_back((event.position, json));
                }
                self.next = event.position + 1;
            }
        }
    }
    let start = Follow {
        state,
        server: tenant.server.to_string(),
        next: after.map_or(0, |p| p.saturating_add(1)),
        listener,
        behind: true,
        queue: std::collections::VecDeque::new(),
        greeted: false,
    };
    let stream = futures::stream::unfold(start, move |mut follow| async move {
        if !follow.greeted {
            // A comment first, so the client has the response before the first event.
            follow.greeted = true;
            let after = after.map_or("the start".into(), |p| p.to_string());
            return Some((
                Ok(Event::default().comment(format!("events after {after}"))),
                follow,
            ));
        }
        loop {
            if let Some((position, json)) = follow.queue.pop_front() {
                let sse = Event::default()
                    .event("event")
                    .id(position.to_string())
                    .data(&*json);
                return Some((Ok(sse), follow));
            }
            if !follow.listener.may_go_on(&follow.state).await {
                return None;
            }
            if follow.behind {
                let streams = follow.state.streams().clone();
                match streams
                    .catch_up(follow.state.store(), follow.next, limit)
                    .await
                {
                    Ok(batch) => {
                        // A short read reached the log's end after the fan-out was
                        // subscribed: whatever comes next, the fan-out carries.
                        follow.behind = batch.len() == limit;
                        follow.take(&batch);
                        continue;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "event stream: reading the log failed");
                        tokio::time::sleep(crate::streams::POLL).await;
                        continue;
                    }
                }
            }
            match follow.listener.next(&follow.state).await? {
                Heard::Batch(batch) => match batch.first() {
                    // A gap between what was read and the fan-out: read it from the log.
                    Some(first) if first.event.position > follow.next => follow.behind = true,
                    _ => follow.take(&batch),
                },
                Heard::Lagged => follow.behind = true,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
