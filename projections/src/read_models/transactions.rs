//! The transactions read model (`rm_transactions`): one row per transaction with the data and
//! text to show, where it stands, and who presented, signed or rejected it. Open transactions
//! (pending or presented) are found by user for the device gateway and by deadline for the
//! expiry sweep.
//!
//! Statuses: `transaction.created` → pending; `presented` → presented (the account whose
//! device shows it); `signed`, `rejected`, `expired` → their status, with who and when as the
//! event says. Every event sets the status; the other fields are only ever filled in, so a
//! batch's update sets what its events carry and keeps the rest.
//!
//! Rows outlive their user: `user.deleted` leaves them, as the log keeps the data and text of
//! an approval for as long as the law asks (see the transaction events).

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use countersign_domain::second_factor::SecondFactorKind;
use countersign_domain::transaction::{TransactionEvent, TransactionOrigin, TransactionStatus};
use countersign_domain::{
    AccountId, ServerId, Timestamp, TransactionId, TransactionRef, UserDigest,
};
use countersign_eventstore::with_pool;

use super::accounts::factor_name;
use super::fold::{At, db_position};
use super::rows::Get;
use super::{ProjectionError, ReadModels};

/// A transaction as the API and the device gateway read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionRow {
    pub server_id: ServerId,
    pub transaction_id: TransactionId,
    /// The user who must sign.
    pub user: UserDigest,
    /// The one account that may sign, when the creator named one.
    pub account_id: Option<AccountId>,
    pub origin: TransactionOrigin,
    /// Never [`TransactionStatus::NotCreated`].
    pub status: TransactionStatus,
    pub content_type: String,
    pub data: Vec<u8>,
    pub text: String,
    pub announce_info: Option<String>,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    /// The account whose device last fetched it to show it.
    pub presented_by: Option<AccountId>,
    pub signed_by: Option<AccountId>,
    /// The second factor the signature's attestation proves.
    pub factor: Option<SecondFactorKind>,
    pub signed_at: Option<Timestamp>,
    pub rejected_by: Option<AccountId>,
    pub rejected_at: Option<Timestamp>,
    pub expired_at: Option<Timestamp>,
    /// Position of the last event applied.
    pub position: u64,
}

/// The statuses a row can have, for reading stored names back.
const STATUSES: [TransactionStatus; 5] = [
    TransactionStatus::Pending,
    TransactionStatus::Presented,
    TransactionStatus::Signed,
    TransactionStatus::Rejected,
    TransactionStatus::Expired,
];

fn origin_name(origin: TransactionOrigin) -> &'static str {
    match origin {
        TransactionOrigin::Api => "api",
        TransactionOrigin::Device => "device",
    }
}

type Key = (ServerId, TransactionId);

#[derive(Debug)]
struct Row {
    user: UserDigest,
    account_id: Option<AccountId>,
    origin: TransactionOrigin,
    content_type: String,
    data: Vec<u8>,
    text: String,
    announce_info: Option<String>,
    created_at: Timestamp,
    expires_at: Timestamp,
    outcome: Patch,
}

/// What the events after `created` set: the status, and fields that are only filled in.
#[derive(Debug)]
struct Patch {
    status: TransactionStatus,
    presented_by: Option<AccountId>,
    signed_by: Option<AccountId>,
    factor: Option<SecondFactorKind>,
    signed_at: Option<Timestamp>,
    rejected_by: Option<AccountId>,
    rejected_at: Option<Timestamp>,
    expired_at: Option<Timestamp>,
    last_position: u64,
}

impl Patch {
    fn new(status: TransactionStatus, last_position: u64) -> Self {
        Self {
            status,
            presented_by: None,
            signed_by: None,
            factor: None,
            signed_at: None,
            rejected_by: None,
            rejected_at: None,
            expired_at: None,
            last_position,
        }
    }

    /// A later patch on top of this one.
    fn then(&mut self, later: Self) {
        self.status = later.status;
        self.presented_by = later.presented_by.or(self.presented_by);
        self.signed_by = later.signed_by.or(self.signed_by);
        self.factor = later.factor.or(self.factor);
        self.signed_at = later.signed_at.or(self.signed_at);
        self.rejected_by = later.rejected_by.or(self.rejected_by);
        self.rejected_at = later.rejected_at.or(self.rejected_at);
        self.expired_at = later.expired_at.or(self.expired_at);
        self.last_position = later.last_position;
    }
}

#[derive(Debug)]
enum Change {
    Put(Box<Row>),
    Patch(Patch),
}

macro_rules! upsert_sql {
    ($values:literal) => {
        concat!(
            "INSERT INTO rm_transactions (server_id, transaction_id, user_digest, account_id, ",
            "origin, status, content_type, data, text, announce_info, created_at, expires_at, ",
            "presented_by, signed_by, factor, signed_at, rejected_by, rejected_at, expired_at, ",
            "last_position) ",
            $values,
            " ON CONFLICT (server_id, transaction_id) DO UPDATE SET ",
            "user_digest = EXCLUDED.user_digest, account_id = EXCLUDED.account_id, ",
            "origin = EXCLUDED.origin, status = EXCLUDED.status, ",
            "content_type = EXCLUDED.content_type, data = EXCLUDED.data, text = EXCLUDED.text, ",
            "announce_info = EXCLUDED.announce_info, created_at = EXCLUDED.created_at, ",
            "expires_at = EXCLUDED.expires_at, presented_by = EXCLUDED.presented_by, ",
            "signed_by = EXCLUDED.signed_by, factor = EXCLUDED.factor, ",
            "signed_at = EXCLUDED.signed_at, rejected_by = EXCLUDED.rejected_by, ",
            "rejected_at = EXCLUDED.rejected_at, expired_at = EXCLUDED.expired_at, ",
            "last_position = EXCLUDED.last_position"
        )
    };
}

/// The batch's transactions, one change per transaction.
#[derive(Debug, Default)]
pub(crate) struct Fold {
    changes: HashMap<Key, Change>,
}

impl Fold {
    pub fn apply(&mut self, at: &At<'_>, event: TransactionEvent) -> Result<(), ProjectionError> {
        let key = at.ids::<TransactionId>("transaction")?;
        let patch = match event {
            TransactionEvent::Created(c) => {
                let row = Row {
                    user: c.user,
                    account_id: c.account_id,
                    origin: c.origin,
                    content_type: c.content_type,
                    data: c.data,
                    text: c.text,
                    announce_info: c.announce_info,
                    created_at: c.created_at,
                    expires_at: c.expires_at,
                    outcome: Patch::new(TransactionStatus::Pending, at.position),
                };
                self.changes.insert(key, Change::Put(Box::new(row)));
                return Ok(());
            }
            TransactionEvent::Presented(p) => Patch {
                presented_by: Some(p.account_id),
                ..Patch::new(TransactionStatus::Presented, at.position)
            },
            TransactionEvent::Signed(s) => Patch {
                signed_by: Some(s.account_id),
                factor: Some(s.factor),
                signed_at: Some(s.signed_at),
                ..Patch::new(TransactionStatus::Signed, at.position)
            },
            TransactionEvent::Rejected(r) => Patch {
                rejected_by: Some(r.account_id),
                rejected_at: Some(r.rejected_at),
                ..Patch::new(TransactionStatus::Rejected, at.position)
            },
            TransactionEvent::Expired(e) => Patch {
                expired_at: Some(e.expired_at),
                ..Patch::new(TransactionStatus::Expired, at.position)
            },
        };
        match self.changes.entry(key) {
            Entry::Occupied(mut o) => match o.get_mut() {
                Change::Put(row) => row.outcome.then(patch),
                Change::Patch(old) => old.then(patch),
            },
            Entry::Vacant(v) => {
                v.insert(Change::Patch(patch));
            }
        }
        Ok(())
    }

    pub async fn write_postgres(self, tx: &mut sqlx::PgConnection) -> Result<(), ProjectionError> {
        if self.changes.is_empty() {
            return Ok(());
        }
        let mut puts = PutColumns::default();
        let mut patches = PatchColumns::default();
        // In key order: PostgreSQL's index inserts then walk the B-tree in order.
        let mut changes: Vec<(Key, Change)> = self.changes.into_iter().collect();
        changes.sort_unstable_by_key(|(key, _)| *key);
        for ((server, transaction), change) in changes {
            match change {
                Change::Put(row) => {
                    puts.server_id.push(server.as_bytes().to_vec());
                    puts.transaction_id.push(transaction.as_bytes().to_vec());
                    puts.user_digest.push(row.user.as_bytes().to_vec());
                    puts.account_id.push(bytes(row.account_id));
                    puts.origin.push(origin_name(row.origin));
                    puts.content_type.push(row.content_type);
                    puts.data.push(row.data);
                    puts.text.push(row.text);
                    puts.announce_info.push(row.announce_info);
                    puts.created_at.push(row.created_at.as_millis());
                    puts.expires_at.push(row.expires_at.as_millis());
                    puts.outcome.push(&row.outcome)?;
                }
                Change::Patch(p) => {
                    patches.server_id.push(server.as_bytes().to_vec());
                    patches.transaction_id.push(transaction.as_bytes().to_vec());
                    patches.outcome.push(&p)?;
                }
            }
        }
        if !puts.server_id.is_empty() {
            let o = &puts.outcome;
            sqlx::query(upsert_sql!(
                "SELECT * FROM UNNEST($1::bytea[], $2::bytea[], $3::bytea[], $4::bytea[], \
                 $5::text[], $6::text[], $7::text[], $8::bytea[], $9::text[], $10::text[], \
                 $11::bigint[], $12::bigint[], $13::bytea[], $14::bytea[], $15::text[], \
                 $16::bigint[], $17::bytea[], $18::bigint[], $19::bigint[], $20::bigint[])"
            ))
            .bind(&puts.server_id)
            .bind(&puts.transaction_id)
            .bind(&puts.user_digest)
            .bind(&puts.account_id)
            .bind(&puts.origin)
            .bind(&o.status)
            .bind(&puts.content_type)
            .bind(&puts.data)
            .bind(&puts.text)
            .bind(&puts.announce_info)
            .bind(&puts.created_at)
            .bind(&puts.expires_at)
            .bind(&o.presented_by)
            .bind(&o.signed_by)
            .bind(&o.factor)
            .bind(&o.signed_at)
            .bind(&o.rejected_by)
            .bind(&o.rejected_at)
            .bind(&o.expired_at)
            .bind(&o.last_position)
            .execute(&mut *tx)
            .await?;
        }
        if !patches.server_id.is_empty() {
            let o = &patches.outcome;
            sqlx::query(
                "UPDATE rm_transactions t SET status = u.status, \
                   presented_by = COALESCE(u.presented_by, t.presented_by), \
                   signed_by = COALESCE(u.signed_by, t.signed_by), \
                   factor = COALESCE(u.factor, t.factor), \
                   signed_at = COALESCE(u.signed_at, t.signed_at), \
                   rejected_by = COALESCE(u.rejected_by, t.rejected_by), \
                   rejected_at = COALESCE(u.rejected_at, t.rejected_at), \
                   expired_at = COALESCE(u.expired_at, t.expired_at), \
                   last_position = u.last_position \
                 FROM UNNEST($1::bytea[], $2::bytea[], $3::text[], $4::bytea[], $5::bytea[], \
                   $6::text[], $7::bigint[], $8::bytea[], $9::bigint[], $10::bigint[], \
                   $11::bigint[]) AS u(server_id, transaction_id, status, presented_by, signed_by, \
                   factor, signed_at, rejected_by, rejected_at, expired_at, last_position) \
                 WHERE t.server_id = u.server_id AND t.transaction_id = u.transaction_id",
            )
            .bind(&patches.server_id)
            .bind(&patches.transaction_id)
            .bind(&o.status)
            .bind(&o.presented_by)
            .bind(&o.signed_by)
            .bind(&o.factor)
            .bind(&o.signed_at)
            .bind(&o.rejected_by)
            .bind(&o.rejected_at)
            .bind(&o.expired_at)
            .bind(&o.last_position)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    pub async fn write_sqlite(
        self,
        tx: &mut sqlx::SqliteConnection,
    ) -> Result<(), ProjectionError> {
        for ((server, transaction), change) in &self.changes {
            let (server, transaction) = (
                server.as_bytes().as_slice(),
                transaction.as_bytes().as_slice(),
            );
            let query = match change {
                Change::Put(row) => {
                    let o = &row.outcome;
                    sqlx::query(upsert_sql!(
                        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
                         $15, $16, $17, $18, $19, $20)"
                    ))
                    .bind(server)
                    .bind(transaction)
                    .bind(row.user.as_bytes().as_slice())
                    .bind(row.account_id.as_ref().map(|a| a.as_bytes().as_slice()))
                    .bind(origin_name(row.origin))
                    .bind(o.status.as_str())
                    .bind(row.content_type.as_str())
                    .bind(row.data.as_slice())
                    .bind(row.text.as_str())
                    .bind(row.announce_info.as_deref())
                    .bind(row.created_at.as_millis())
                    .bind(row.expires_at.as_millis())
                    .bind(o.presented_by.as_ref().map(|a| a.as_bytes().as_slice()))
                    .bind(o.signed_by.as_ref().map(|a| a.as_bytes().as_slice()))
                    .bind(o.factor.map(factor_name))
                    .bind(o.signed_at.map(Timestamp::as_millis))
                    .bind(o.rejected_by.as_ref().map(|a| a.as_bytes().as_slice()))
                    .bind(o.rejected_at.map(Timestamp::as_millis))
                    .bind(o.expired_at.map(Timestamp::as_millis))
                    .bind(db_position(o.last_position)?)
                }
                Change::Patch(p) => sqlx::query(
                    "UPDATE rm_transactions SET status = $3, \
                       presented_by = COALESCE($4, presented_by), \
                       signed_by = COALESCE($5, signed_by), factor = COALESCE($6, factor), \
                       signed_at = COALESCE($7, signed_at), \
                       rejected_by = COALESCE($8, rejected_by), \
                       rejected_at = COALESCE($9, rejected_at), \
                       expired_at = COALESCE($10, expired_at), last_position = $11 \
                     WHERE server_id = $1 AND transaction_id = $2",
                )
                .bind(server)
                .bind(transaction)
                .bind(p.status.as_str())
                .bind(p.presented_by.as_ref().map(|a| a.as_bytes().as_slice()))
                .bind(p.signed_by.as_ref().map(|a| a.as_bytes().as_slice()))
                .bind(p.factor.map(factor_name))
                .bind(p.signed_at.map(Timestamp::as_millis))
                .bind(p.rejected_by.as_ref().map(|a| a.as_bytes().as_slice()))
                .bind(p.rejected_at.map(Timestamp::as_millis))
                .bind(p.expired_at.map(Timestamp::as_millis))
                .bind(db_position(p.last_position)?),
            };
            query.execute(&mut *tx).await?;
        }
        Ok(())
    }
}

fn bytes(id: Option<AccountId>) -> Option<Vec<u8>> {
    id.map(|a| a.as_bytes().to_vec())
}

/// Column arrays of the fields a [`Patch`] sets, for PostgreSQL's `UNNEST`.
#[derive(Default)]
struct OutcomeColumns {
    status: Vec<&'static str>,
    presented_by: Vec<Option<Vec<u8>>>,
    signed_by: Vec<Option<Vec<u8>>>,
    factor: Vec<Option<&'static str>>,
    signed_at: Vec<Option<i64>>,
    rejected_by: Vec<Option<Vec<u8>>>,
    rejected_at: Vec<Option<i64>>,
    expired_at: Vec<Option<i64>>,
    last_position: Vec<i64>,
}

impl OutcomeColumns {
    fn push(&mut self, p: &Patch) -> Result<(), ProjectionError> {
        self.status.push(p.status.as_str());
        self.presented_by.push(bytes(p.presented_by));
        self.signed_by.push(bytes(p.signed_by));
        self.factor.push(p.factor.map(factor_name));
        self.signed_at.push(p.signed_at.map(Timestamp::as_millis));
        self.rejected_by.push(bytes(p.rejected_by));
        self.rejected_at
            .push(p.rejected_at.map(Timestamp::as_millis));
        self.expired_at.push(p.expired_at.map(Timestamp::as_millis));
        self.last_position.push(db_position(p.last_position)?);
        Ok(())
    }
}

#[derive(Default)]
struct PutColumns {
    server_id: Vec<Vec<u8>>,
    transaction_id: Vec<Vec<u8>>,
    user_digest: Vec<Vec<u8>>,
    account_id: Vec<Option<Vec<u8>>>,
    origin: Vec<&'static str>,
    content_type: Vec<String>,
    data: Vec<Vec<u8>>,
    text: Vec<String>,
    announce_info: Vec<Option<String>>,
    created_at: Vec<i64>,
    expires_at: Vec<i64>,
    outcome: OutcomeColumns,
}

#[derive(Default)]
struct PatchColumns {
    server_id: Vec<Vec<u8>>,
    transaction_id: Vec<Vec<u8>>,
    outcome: OutcomeColumns,
}

fn transaction_row(row: &impl Get) -> Result<TransactionRow, ProjectionError> {
    let origin = match row.text(4)?.as_str() {
        "api" => TransactionOrigin::Api,
        "device" => TransactionOrigin::Device,
        other => {
            return Err(ProjectionError::Damaged(format!(
                "unknown transaction origin {other:?}"
            )));
        }
    };
    let status = row.text(5)?;
    let status = STATUSES
        .into_iter()
        .find(|s| s.as_str() == status)
        .ok_or_else(|| {
            ProjectionError::Damaged(format!("unknown transaction status {status:?}"))
        })?;
    let factor = match row.opt_text(14)?.as_deref() {
        None => None,
        Some("pin") => Some(SecondFactorKind::Pin),
        Some("biometric") => Some(SecondFactorKind::Biometric),
        Some(other) => {
            return Err(ProjectionError::Damaged(format!(
                "unknown second factor {other:?}"
            )));
        }
    };
    Ok(TransactionRow {
        server_id: row.id(0)?,
        transaction_id: row.id(1)?,
        user: row.id(2)?,
        account_id: row.opt_id(3)?,
        origin,
        status,
        content_type: row.text(6)?,
        data: row.bytes(7)?,
        text: row.text(8)?,
        announce_info: row.opt_text(9)?,
        created_at: row.time(10)?,
        expires_at: row.time(11)?,
        presented_by: row.opt_id(12)?,
        signed_by: row.opt_id(13)?,
        factor,
        signed_at: row.opt_time(15)?,
        rejected_by: row.opt_id(16)?,
        rejected_at: row.opt_time(17)?,
        expired_at: row.opt_time(18)?,
        position: row.position(19)?,
    })
}

macro_rules! select_transaction {
    ($where:literal) => {
        concat!(
            "SELECT server_id, transaction_id, user_digest, account_id, origin, status, ",
            "content_type, data, text, announce_info, created_at, expires_at, presented_by, ",
            "signed_by, factor, signed_at, rejected_by, rejected_at, expired_at, last_position ",
            "FROM rm_transactions ",
            $where
        )
    };
}

impl ReadModels {
    /// A transaction of `server`: one primary-key lookup.
    pub async fn transaction(
        &self,
        server: ServerId,
        id: TransactionId,
    ) -> Result<Option<TransactionRow>, ProjectionError> {
        with_pool!(self.reads(), pool => {
            sqlx::query(select_transaction!("WHERE server_id = $1 AND transaction_id = $2"))
                .bind(server.as_bytes().as_slice())
                .bind(id.as_bytes().as_slice())
                .fetch_optional(pool)
                .await?
                .map(|row| transaction_row(&row))
                .transpose()
        })
    }

    /// The transactions `account` of `user` may still act on: pending or presented, before
    /// their deadline, naming no account or this one; the oldest first.
    pub async fn pending_transactions(
        &self,
        server: ServerId,
        user: UserDigest,
        account: AccountId,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<TransactionRow>, ProjectionError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        with_pool!(self.reads(), pool => {
            sqlx::query(select_transaction!(
                "WHERE server_id = $1 AND user_digest = $2 AND status IN ('pending', 'presented') \
                 AND expires_at > $3 AND (account_id IS NULL OR account_id = $4) \
                 ORDER BY created_at, transaction_id LIMIT $5"
            ))
            .bind(server.as_bytes().as_slice())
            .bind(user.as_bytes().as_slice())
            .bind(now.as_millis())
            .bind(account.as_bytes().as_slice())
            .bind(limit)
            .fetch_all(pool)
            .await?
            .iter()
            .map(transaction_row)
            .collect()
        })
    }

    /// Open transactions (pending or presented) whose deadline has passed, the oldest deadline
    /// first, across tenants (for the expiry sweep, which decides per transaction).
    pub async fn transactions_due(
        &self,
        now: Timestamp,
        limit: u32,
    ) -> Result<Vec<TransactionRef>, ProjectionError> {
        with_pool!(self.reads(), pool => {
            sqlx::query(
                "SELECT server_id, transaction_id FROM rm_transactions \
                 WHERE status IN ('pending', 'presented') AND expires_at <= $1 \
                 ORDER BY expires_at, server_id, transaction_id LIMIT $2",
            )
            .bind(now.as_millis())
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| Ok(TransactionRef::new(r.id(0)?, r.id(1)?)))
            .collect()
        })
    }
}
