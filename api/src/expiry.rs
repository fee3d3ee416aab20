//! Deadlines: sessions, enrolments and transactions not completed in time become expired, and continuous
//! sessions whose device stopped pinging are logged out — each as an event, decided by the
//! aggregate (which checks the deadline itself, so a sweep that races a login changes
//! nothing). The sweep reads due items from the read models once a second; every instance
//! may run it, since a second `Expire` on an expired session emits nothing.

use std::time::Duration;

use countersign_eventstore::Metadata;

use crate::state::AppState;

/// Items handled per sweep and kind.
const BATCH: u32 = 500;

fn system_metadata() -> Metadata {
    Metadata {
        actor: Some("system:expiry".into()),
        ..Metadata::default()
    }
}

/// How many due items a sweep looked at, per kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    pub sessions: usize,
    pub enrolments: usize,
    pub transactions: usize,
}

/// Expires what is due, once. Returns how many items of each kind were looked at.
pub async fn sweep(state: &AppState) -> Swept {
    let now = state.clock().now();
    let metadata = system_metadata();
    let mut counts = Swept::default();
    match state.reads().sessions_due(now, BATCH).await {
        Ok(due) => {
            counts.sessions = due.len();
            for session in due {
                if let Err(error) = state.commands().sessions.expire(session, &metadata).await {
                    tracing::warn!(%error, "could not expire a session");
                }
            }
        }
        Err(error) => tracing::warn!(%error, "could not list due sessions"),
    }
    match state.reads().enrolments_due(now, BATCH).await {
        Ok(due) => {
            counts.enrolments = due.len();
            for enrolment in due {
                if let Err(error) = state
                    .commands()
                    .enrolments
                    .expire(enrolment, &metadata)
                    .await
                {
                    tracing::warn!(%error, "could not expire an enrolment");
                }
            }
        }
        Err(error) => tracing::warn!(%error, "could not list due enrolments"),
    }
    match state.reads().transactions_due(now, BATCH).await {
        Ok(due) => {
            counts.transactions = due.len();
            for transaction in due {
                if let Err(error) = state
                    .commands()
                    .transactions
                    .expire(transaction, &metadata)
                    .await
                {
                    tracing::warn!(%error, "could not expire a transaction");
                }
            }
        }
        Err(error) => tracing::warn!(%error, "could not list due transactions"),
    }
    counts
}

/// Sweeps every `interval` until the task is dropped.
pub async fn run(state: AppState, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        sweep(&state).await;
    }
}
