//! Server-sent events that follow one read-model row: its current state at once, then every
//! change, until a final state. Woken by the read models' progress (never polling the
//! database); a change that moves the row's position without changing its state (a session's
//! ping, a second `presented`) sends nothing.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;

use crate::state::AppState;

/// What one row says, as a stream sends it.
pub(crate) struct Step {
    /// The state's name (`pending`, `logged_in`, `signed`…).
    pub value: String,
    /// The log position the row reflects.
    pub position: u64,
    /// Nothing follows this state.
    pub last: bool,
}

/// Streams `first`, then the row as `read` finds it after each batch the read models commit.
/// Each event is named `key` and carries `{key: state, "position": position}`.
pub(crate) fn follow<R, F, Fut>(
    state: AppState,
    key: &'static str,
    first: R,
    read: F,
    step: fn(&R) -> Step,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>>
where
    R: Send + 'static,
    F: Fn(AppState) -> Fut + Send + 'static,
    Fut: Future<Output = Option<R>> + Send,
{
    struct Follow<R, F> {
        state: AppState,
        processed: tokio::sync::watch::Receiver<u64>,
        read: F,
        pending: Option<R>,
        /// The state last sent.
        last: Option<String>,
        done: bool,
    }
    let start = Follow {
        processed: state.reads().processed(),
        state,
        read,
        pending: Some(first),
        last: None,
        done: false,
    };
    let stream = futures::stream::unfold(start, move |mut follow| async move {
        if follow.done {
            return None;
        }
        loop {
            let row = match follow.pending.take() {
                Some(row) => Some(row),
                None => {
                    if follow.processed.changed().await.is_err() {
                        return None;
                    }
                    (follow.read)(follow.state.clone()).await
                }
            };
            let Some(row) = row else { continue };
            let Step {
                value,
                position,
                last,
            } = step(&row);
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
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
