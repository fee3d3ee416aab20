//! Server-sent events that follow one read-model row: its current state at once, then every
//! change, until a final state. Each stream listens to the process's one reader of the log
//! ([`crate::streams`]) and reads its row again only when an event of the row's own stream
//! was committed (and projected): a thousand open streams cost no query per commit. A change
//! that moves the row's position without changing its state (a session's ping, a second
//! `presented`) sends nothing. Streams count against their key's caps, end after the
//! configured lifetime, and end when their key is revoked or their server deleted.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use crate::auth::Tenant;
use crate::error::ApiError;
use crate::state::AppState;
use crate::streams::{Heard, Listener};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;

/// What one row says, as a stream sends it.
pub(crate) struct Step {
    /// The state's name (`pending`, `logged_in`, `signed`…).
    pub value: String,
    /// The log position the row reflects.
    pub position: u64,
    /// Nothing follows this state.
    pub last: bool,
}

/// The row to follow: its event stream in the log and how to read and show it.
pub(crate) struct Row<R, F> {
    /// The name of the log stream whose events change the row.
    pub stream: String,
    /// The row as read before the stream starts.
    pub first: R,
    /// Reads the row again.
    pub read: F,
    /// What the row says.
    pub step: fn(&R) -> Step,
}

/// Streams `row.first`, then the row as `row.read` finds it after each event of its stream.
/// Each event is named `key` and carries `{key: state, "position": position}`.
pub(crate) fn follow<R, F, Fut>(
    state: AppState,
    tenant: Tenant,
    key: &'static str,
    row: Row<R, F>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError>
where
    R: Send + 'static,
    F: Fn(AppState) -> Fut + Send + 'static,
    Fut: Future<Output = Option<R>> + Send,
{
    let listener = Listener::open(&state, tenant)?;
    struct Follow<R, F> {
        state: AppState,
        stream: String,
        listener: Listener,
        read: F,
        step: fn(&R) -> Step,
        pending: Option<R>,
        /// Read once more after the first answer, once the read models reached the log's
        /// head: a change committed between the handler's read and the subscription would
        /// otherwise wait for the next one.
        recheck: bool,
        /// The state last sent.
        last: Option<String>,
        done: bool,
    }
    let start = Follow {
        state,
        stream: row.stream,
        listener,
        read: row.read,
        step: row.step,
        pending: Some(row.first),
        recheck: true,
        last: None,
        done: false,
    };
    let stream = futures::stream::unfold(start, move |mut follow| async move {
        if follow.done {
            return None;
        }
        loop {
            if let Some(row) = follow.pending.take() {
                let Step {
                    value,
                    position,
                    last,
                } = (follow.step)(&row);
                if follow.last.as_deref() == Some(value.as_str()) {
                    continue;
                }
                follow.done = last;
                let data = serde_json::json!({ key: value, "position": position }).to_string();
                follow.last = Some(value);
                let event = Event::default()
                    .event(key)
                    .id(position.to_string())
                    .data(data);
                return Some((Ok(event), follow));
            }
            if follow.recheck {
                // Whatever was committed before the subscription is at or below the head read
                // now; once projected, the row shows it (later commits come by the fan-out).
                follow.recheck = false;
                if let Ok(Some(head)) = follow.state.store().last_position().await {
                    let wait = follow.state.config().max_wait;
                    let _ = follow.state.reads().wait_for(head, wait).await;
                }
                follow.pending = (follow.read)(follow.state.clone()).await;
                continue;
            }
            let changed_at = match follow.listener.next(&follow.state).await? {
                Heard::Batch(batch) => {
                    match batch.iter().rev().find(|e| e.event.stream == follow.stream) {
                        Some(shared) => Some(shared.event.position),
                        None => continue,
                    }
                }
                // Fell behind the fan-out: whatever happened, the row says it now.
                Heard::Lagged => None,
            };
            if let Some(position) = changed_at {
                // Bounded: a stalled projector shows as no change, not a stuck stream.
                let wait = follow.state.config().max_wait;
                let _ = follow.state.reads().wait_for(position, wait).await;
            }
            follow.pending = (follow.read)(follow.state.clone()).await;
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
