//! Folding a batch of events into the changes each projection writes.
//!
//! Each projection's fold turns the batch into one final change per row: an upsert of a row
//! created in the batch (later events of the batch already applied to it), an update of the
//! fields the batch's events set on a row created earlier, or a delete. The same fold serves
//! catch-up, following and replay, so where the log is cut into batches cannot change the
//! result: an update only sets what its events determine, exactly as the in-memory row would
//! have been changed.
//!
//! Whose row an event changes comes from its stream name (`{kind}-{server id}-{id}`), which
//! the event store's writers derive from the same ids; so does the tenant.

use std::str::FromStr;

use countersign_domain::{DomainEvent, ServerId, Timestamp};
use countersign_eventstore::RecordedEvent;

use super::{
    Checkpoints, Projection, ProjectionError, accounts, enrolments, oidc, servers, sessions,
    transactions, users,
};

pub(crate) use super::rows::db_position;

/// Where and when an event happened, and whose stream it is in.
pub(crate) struct At<'a> {
    pub position: u64,
    pub recorded_at: Timestamp,
    stream: &'a str,
    event_type: &'a str,
}

impl At<'_> {
    pub fn error(&self, reason: impl Into<String>) -> ProjectionError {
        ProjectionError::Decode {
            position: self.position,
            event_type: self.event_type.to_owned(),
            reason: reason.into(),
        }
    }

    /// The server of a `server-{id}` stream.
    pub fn server(&self) -> Result<ServerId, ProjectionError> {
        self.stream
            .strip_prefix("server-")
            .and_then(|id| id.parse().ok())
            .ok_or_else(|| self.error(format!("stream {:?} is not a server's", self.stream)))
    }

    /// The tenant and the aggregate id of a `{kind}-{server id}-{id}` stream.
    pub fn ids<T: FromStr>(&self, kind: &str) -> Result<(ServerId, T), ProjectionError> {
        self.stream
            .strip_prefix(kind)
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(server, id)| Some((server.parse().ok()?, id.parse().ok()?)))
            .ok_or_else(|| self.error(format!("stream {:?} is not a {kind}'s", self.stream)))
    }
}

/// A batch of the log `[from, to)`, folded per projection.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub to: u64,
    /// Events in the batch (whether or not a projection needed them).
    pub events: u64,
    servers: servers::Fold,
    oidc: oidc::Fold,
    users: users::Fold,
    accounts: accounts::Fold,
    enrolments: enrolments::Fold,
    sessions: sessions::Fold,
    transactions: transactions::Fold,
}

fn decode<E: DomainEvent>(event: &RecordedEvent) -> Result<E, ProjectionError> {
    E::decode(&event.event_type, event.schema_version, &event.payload).map_err(|e| {
        ProjectionError::Decode {
            position: event.position,
            event_type: event.event_type.clone(),
            reason: e.to_string(),
        }
    })
}

impl Batch {
    /// Folds consecutive events; a projection takes only events at or past its checkpoint.
    /// Events of other aggregates (second factors…) are not read models' concern.
    pub fn fold(
        events: &[RecordedEvent],
        checkpoints: &Checkpoints,
    ) -> Result<Self, ProjectionError> {
        let mut batch = Self::default();
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return Ok(batch);
        };
        batch.to = last.position + 1;
        batch.events = batch.to - first.position;
        for event in events {
            let wants = |p: Projection| {
                checkpoints
                    .get(p as usize)
                    .is_some_and(|from| event.position >= *from)
            };
            let at = At {
                position: event.position,
                recorded_at: Timestamp::from_millis(event.recorded_at),
                stream: &event.stream,
                event_type: &event.event_type,
            };
            let prefix = event.event_type.split_once('.').map_or("", |(p, _)| p);
            match prefix {
                "server" if wants(Projection::Servers) => {
                    let event = decode(event)?;
                    if oidc::is_oidc(&event) {
                        batch.oidc.apply(&at, event)?;
                    } else {
                        batch.servers.apply(&at, event)?;
                    }
                }
                "user" if wants(Projection::Users) => batch.users.apply(&at, decode(event)?)?,
                "account" if wants(Projection::Accounts) => {
                    batch.accounts.apply(&at, decode(event)?)?;
                }
                "enrolment" if wants(Projection::Enrolments) => {
                    batch.enrolments.apply(&at, decode(event)?)?;
                }
                "session" if wants(Projection::Sessions) => {
                    batch.sessions.apply(&at, decode(event)?)?;
                }
                "transaction" if wants(Projection::Transactions) => {
                    batch.transactions.apply(&at, decode(event)?)?;
                }
                _ => {}
            }
        }
        Ok(batch)
    }

    pub async fn write_postgres(self, tx: &mut sqlx::PgConnection) -> Result<(), ProjectionError> {
        self.servers.write_postgres(tx).await?;
        self.oidc.write_postgres(tx).await?;
        self.users.write_postgres(tx).await?;
        self.accounts.write_postgres(tx).await?;
        self.enrolments.write_postgres(tx).await?;
        self.sessions.write_postgres(tx).await?;
        self.transactions.write_postgres(tx).await
    }

    pub async fn write_sqlite(
        self,
        tx: &mut sqlx::SqliteConnection,
    ) -> Result<(), ProjectionError> {
        self.servers.write_sqlite(tx).await?;
        self.oidc.write_sqlite(tx).await?;
        self.users.write_sqlite(tx).await?;
        self.accounts.write_sqlite(tx).await?;
        self.enrolments.write_sqlite(tx).await?;
        self.sessions.write_sqlite(tx).await?;
        self.transactions.write_sqlite(tx).await
    }
}
