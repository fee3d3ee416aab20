//! The enrolments read model (`rm_enrolments`): one row per enrolment, `pending` until
//! `completed` (with the account it created) or `expired`. Pending enrolments past their
//! expiry feed the expiry sweep.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use countersign_domain::enrolment::EnrolmentEvent;
use countersign_domain::{AccountId, EnrolmentId, ServerId, Timestamp, UserDigest};
use countersign_eventstore::with_pool;

use super::fold::{At, db_position};
use super::rows::Get;
use super::{ProjectionError, ReadModels};

use countersign_domain::EnrolmentRef;

/// An enrolment as the API reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolmentRow {
    pub server_id: ServerId,
    pub enrolment_id: EnrolmentId,
    pub user_digest: UserDigest,
    /// `pending`, `completed` or `expired`.
    pub state: String,
    pub expires_at: Timestamp,
    /// The account created, once completed.
    pub account_id: Option<AccountId>,
    pub last_position: u64,
}

const PENDING: &str = "pending";
const COMPLETED: &str = "completed";
const EXPIRED: &str = "expired";

type Key = (ServerId, EnrolmentId);

#[derive(Debug)]
struct Row {
    user_digest: UserDigest,
    state: &'static str,
    expires_at: Timestamp,
    account_id: Option<AccountId>,
    last_position: u64,
}

#[derive(Debug)]
struct Patch {
    state: &'static str,
    account_id: Option<AccountId>,
    last_position: u64,
}

#[derive(Debug)]
enum Change {
    Put(Row),
    Patch(Patch),
}

/// The batch's enrolments, one change per enrolment.
#[derive(Debug, Default)]
pub(crate) struct Fold {
    changes: HashMap<Key, Change>,
}

impl Fold {
    pub fn apply(&mut self, at: &At<'_>, event: EnrolmentEvent) -> Result<(), ProjectionError> {
        let key = at.ids::<EnrolmentId>("enrolment")?;
        let patch = match event {
            EnrolmentEvent::Started(e) => {
                self.changes.insert(
                    key,
                    Change::Put(Row {
                        user_digest: e.user,
                        state: PENDING,
                        expires_at: e.expires_at,
                        account_id: None,
                        last_position: at.position,
                    }),
                );
                return Ok(());
            }
            EnrolmentEvent::Completed(e) => Patch {
                state: COMPLETED,
                account_id: Some(e.account_id),
                last_position: at.position,
            },
            EnrolmentEvent::Expired(_) => Patch {
                state: EXPIRED,
                account_id: None,
                last_position: at.position,
            },
        };
        match self.changes.entry(key) {
            Entry::Occupied(mut o) => match o.get_mut() {
                Change::Put(row) => {
                    row.state = patch.state;
                    row.account_id = patch.account_id.or(row.account_id);
                    row.last_position = patch.last_position;
                }
                Change::Patch(old) => {
                    old.state = patch.state;
                    old.account_id = patch.account_id.or(old.account_id);
                    old.last_position = patch.last_position;
                }
            },
            Entry::Vacant(v) => {
                v.insert(Change::Patch(patch));
            }
        }
        Ok(())
    }

    pub async fn write_postgres(self, tx: &mut sqlx::PgConnection) -> Result<(), ProjectionError> {
        let mut put = Columns::default();
        let mut patched = Columns::default();
        for ((server, enrolment), change) in &self.changes {
            let columns = match change {
                Change::Put(row) => {
                    put.user_digest.push(row.user_digest.as_bytes().to_vec());
                    put.expires_at.push(row.expires_at.as_millis());
                    put.state.push(row.state);
                    put.account_id
                        .push(row.account_id.map(|a| a.as_bytes().to_vec()));
                    put.last_position.push(db_position(row.last_position)?);
                    &mut put
                }
                Change::Patch(p) => {
                    patched.state.push(p.state);
                    patched
                        .account_id
                        .push(p.account_id.map(|a| a.as_bytes().to_vec()));
                    patched.last_position.push(db_position(p.last_position)?);
                    &mut patched
                }
            };
            columns.server_id.push(server.as_bytes().to_vec());
            columns.enrolment_id.push(enrolment.as_bytes().to_vec());
        }
        if !put.server_id.is_empty() {
            sqlx::query(
                "INSERT INTO rm_enrolments (server_id, enrolment_id, user_digest, state, expires_at, account_id, last_position) \
                 SELECT * FROM UNNEST($1::bytea[], $2::bytea[], $3::bytea[], $4::text[], $5::bigint[], $6::bytea[], $7::bigint[]) \
                 ON CONFLICT (server_id, enrolment_id) DO UPDATE SET user_digest = EXCLUDED.user_digest, \
                   state = EXCLUDED.state, expires_at = EXCLUDED.expires_at, account_id = EXCLUDED.account_id, \
                   last_position = EXCLUDED.last_position",
            )
            .bind(&put.server_id)
            .bind(&put.enrolment_id)
            .bind(&put.user_digest)
            .bind(&put.state)
            .bind(&put.expires_at)
            .bind(&put.account_id)
            .bind(&put.last_position)
            .execute(&mut *tx)
            .await?;
        }
        if !patched.server_id.is_empty() {
            sqlx::query(
                "UPDATE rm_enrolments t SET state = u.state, account_id = COALESCE(u.account_id, t.account_id), \
                   last_position = u.last_position \
                 FROM UNNEST($1::bytea[], $2::bytea[], $3::text[], $4::bytea[], $5::bigint[]) \
                   AS u(server_id, enrolment_id, state, account_id, last_position) \
                 WHERE t.server_id = u.server_id AND t.enrolment_id = u.enrolment_id",
            )
            .bind(&patched.server_id)
            .bind(&patched.enrolment_id)
            .bind(&patched.state)
            .bind(&patched.account_id)
            .bind(&patched.last_position)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    pub async fn write_sqlite(
        self,
        tx: &mut sqlx::SqliteConnection,
    ) -> Result<(), ProjectionError> {
        for ((server, enrolment), change) in &self.changes {
            let (server, enrolment) = (
                server.as_bytes().as_slice(),
                enrolment.as_bytes().as_slice(),
            );
            let query = match change {
                Change::Put(row) => sqlx::query(
                    "INSERT INTO rm_enrolments (server_id, enrolment_id, user_digest, state, expires_at, account_id, last_position) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7) \
                     ON CONFLICT (server_id, enrolment_id) DO UPDATE SET user_digest = EXCLUDED.user_digest, \
                       state = EXCLUDED.state, expires_at = EXCLUDED.expires_at, account_id = EXCLUDED.account_id, \
                       last_position = EXCLUDED.last_position",
                )
                .bind(server)
                .bind(enrolment)
                .bind(row.user_digest.as_bytes().as_slice())
                .bind(row.state)
                .bind(row.expires_at.as_millis())
                .bind(row.account_id.as_ref().map(|a| a.as_bytes().as_slice()))
                .bind(db_position(row.last_position)?),
                Change::Patch(p) => sqlx::query(
                    "UPDATE rm_enrolments SET state = $3, account_id = COALESCE($4, account_id), last_position = $5 \
                     WHERE server_id = $1 AND enrolment_id = $2",
                )
                .bind(server)
                .bind(enrolment)
                .bind(p.state)
                .bind(p.account_id.as_ref().map(|a| a.as_bytes().as_slice()))
                .bind(db_position(p.last_position)?),
            };
            query.execute(&mut *tx).await?;
        }
        Ok(())
    }
}

/// Column arrays for PostgreSQL's `UNNEST`.
#[derive(Default)]
struct Columns {
    server_id: Vec<Vec<u8>>,
    enrolment_id: Vec<Vec<u8>>,
    user_digest: Vec<Vec<u8>>,
    state: Vec<&'static str>,
    expires_at: Vec<i64>,
    account_id: Vec<Option<Vec<u8>>>,
    last_position: Vec<i64>,
}

impl ReadModels {
    /// An enrolment of `server`.
    pub async fn enrolment(
        &self,
        server: ServerId,
        id: EnrolmentId,
    ) -> Result<Option<EnrolmentRow>, ProjectionError> {
        with_pool!(self.reads(), pool => {
            sqlx::query(
                "SELECT server_id, enrolment_id, user_digest, state, expires_at, account_id, last_position \
                 FROM rm_enrolments WHERE server_id = $1 AND enrolment_id = $2",
            )
            .bind(server.as_bytes().as_slice())
            .bind(id.as_bytes().as_slice())
            .fetch_optional(pool)
            .await?
            .map(|r| {
                Ok(EnrolmentRow {
                    server_id: r.id(0)?,
                    enrolment_id: r.id(1)?,
                    user_digest: r.id(2)?,
                    state: r.text(3)?,
                    expires_at: r.time(4)?,
                    account_id: r.opt_id(5)?,
                    last_position: r.position(6)?,
                })
            })
            .transpose()
        })
    }

    /// Pending enrolments whose expiry has passed, oldest first, across tenants (for the
    /// expiry sweep, which decides per enrolment).
    pub async fn enrolments_due(
        &self,
        now: Timestamp,
        limit: u32,
    ) -> Result<Vec<EnrolmentRef>, ProjectionError> {
        with_pool!(self.reads(), pool => {
            sqlx::query(
                "SELECT server_id, enrolment_id FROM rm_enrolments \
                 WHERE state = 'pending' AND expires_at <= $1 \
                 ORDER BY expires_at, server_id, enrolment_id LIMIT $2",
            )
            .bind(now.as_millis())
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| Ok(EnrolmentRef::new(r.id(0)?, r.id(1)?)))
            .collect()
        })
    }
}
