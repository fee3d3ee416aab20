//! The Message Center's own tables (migration `0010_message_center.sql`), beside the log.
//!
//! - `mc_mailboxes`: one row per registered app instance: the mailbox id, SHA-256 of its MC
//!   token (the token itself is never stored), SHA-256 of the Noise static key it is bound to,
//!   the platform, the app id, the push token (kept only here, never in an event) and whether
//!   the provider dropped that token.
//! - `mc_messages`: one row per outstanding message (payload and queue state together, so a
//!   submit is one insert): the envelope and its digest, expiry, priority, collapse id, when
//!   it was queued, and its push state: `0` awaiting a push, due at `next_attempt_at_ms`
//!   (a lease while a send is in flight, or the retry time), `1` pushed, `2` mailbox only (no
//!   push token, token dropped, refused by the provider). `attempts` counts failed sends.
//!   A row is removed when the app acknowledges it or when it expires. Submits are inserted
//!   in batches ([`insert_messages`]: concurrent submits share one statement, one commit);
//!   the per-mailbox capacity is checked against the rows before the statement, so one
//!   batch may pass it by its own rows (a bound, not an exact count).
//!
//! Ordering with the log: rows are written before the events that name them (a mailbox row
//! before `mc.mailbox_registered`, a message row before `mc.message_queued`), so no event
//! names a row that is not there; a row whose event a crash prevented is completed on the
//! next submit of the same message or by the recovery scan (their event ids are derived from
//! the message id, so a second append writes nothing).
//!
//! Claiming due rows ([`claim_due`]) is one `UPDATE … RETURNING` that moves their due time by
//! a lease, so two MC instances never claim the same row at once (PostgreSQL re-checks the
//! condition on rows another transaction changed; SQLite has one writer).

use countersign_eventstore::{Database, with_pool};

use crate::push::{Platform, Priority};

/// Awaiting a push.
pub(crate) const AWAITING: i16 = 0;
/// Pushed (the provider accepted it).
pub(crate) const PUSHED: i16 = 1;
/// Waiting for pull only.
pub(crate) const MAILBOX_ONLY: i16 = 2;

pub(crate) fn platform_name(platform: Platform) -> &'static str {
    platform.as_str()
}

fn parse_platform(name: &str) -> Result<Platform, sqlx::Error> {
    match name {
        "fcm" => Ok(Platform::Fcm),
        "apns" => Ok(Platform::Apns),
        other => Err(sqlx::Error::Decode(
            format!("mc_mailboxes.platform {other:?} is not fcm or apns").into(),
        )),
    }
}

pub(crate) fn priority_code(priority: Priority) -> i16 {
    match priority {
        Priority::High => 1,
        Priority::Normal => 0,
    }
}

pub(crate) fn priority_of(code: i16) -> Priority {
    if code == 1 {
        Priority::High
    } else {
        Priority::Normal
    }
}

/// A mailbox as the MC works with it.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Mailbox {
    pub(crate) id: [u8; 16],
    pub(crate) platform: Platform,
    pub(crate) app_id: String,
    /// `""`: no token (pull only).
    pub(crate) push_token: String,
    pub(crate) push_dropped: bool,
    pub(crate) channel_key_digest: [u8; 32],
}

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox")
            .field("id", &hex::encode(self.id))
            .field("platform", &self.platform)
            .field("push_dropped", &self.push_dropped)
            .finish_non_exhaustive()
    }
}

impl Mailbox {
    /// Whether a push may be sent now (a token that was not dropped).
    pub(crate) fn pushable(&self) -> bool {
        !self.push_token.is_empty() && !self.push_dropped
    }
}

fn fixed<const N: usize>(bytes: &[u8], what: &str) -> Result<[u8; N], sqlx::Error> {
    <[u8; N]>::try_from(bytes)
        .map_err(|_| sqlx::Error::Decode(format!("{what} is not {N} bytes").into()))
}

type MailboxRow = (Vec<u8>, String, String, String, bool, Vec<u8>);

fn mailbox_of(row: MailboxRow) -> Result<Mailbox, sqlx::Error> {
    let (id, platform, app_id, push_token, push_dropped, key) = row;
    Ok(Mailbox {
        id: fixed(&id, "mailbox_id")?,
        platform: parse_platform(&platform)?,
        app_id,
        push_token,
        push_dropped,
        channel_key_digest: fixed(&key, "channel_key_digest")?,
    })
}

const MAILBOX_COLUMNS: &str = "SELECT mailbox_id, platform, app_id, push_token, push_dropped, channel_key_digest FROM mc_mailboxes ";

/// The mailbox whose `column` (a unique column of `mc_mailboxes`) is `value`, if any.
async fn mailbox_where(
    db: &Database,
    column: &'static str,
    value: &[u8],
) -> Result<Option<Mailbox>, sqlx::Error> {
    let row: Option<MailboxRow> = with_pool!(db, pool => sqlx::query_as(sqlx::AssertSqlSafe(
        format!("{MAILBOX_COLUMNS}WHERE {column} = $1")))
        .bind(value)
        .fetch_optional(pool)
        .await?);
    row.map(mailbox_of).transpose()
}

/// Appends `(…)` with one bind per id: the list of an `IN` (`ids` is not empty).
fn push_id_list<DB: sqlx::Database, const N: usize>(q: &mut sqlx::QueryBuilder<DB>, ids: &[[u8; N]])
where
    for<'t> Vec<u8>: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    q.push("(");
    let mut list = q.separated(", ");
    for id in ids {
        list.push_bind(id.to_vec());
    }
    q.push(")");
}

/// A new mailbox row. `false`: a mailbox is already bound to this key (or, improbably, the
/// id or token hash exists): nothing written.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn insert_mailbox(
    db: &Database,
    id: &[u8; 16],
    token_hash: &[u8; 32],
    key_digest: &[u8; 32],
    platform: Platform,
    app_id: &str,
    push_token: &str,
    now_ms: i64,
) -> Result<bool, sqlx::Error> {
    let rows = with_pool!(db, pool => sqlx::query(
        "INSERT INTO mc_mailboxes (mailbox_id, token_hash, channel_key_digest, platform, app_id, \
         push_token, push_dropped, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT DO NOTHING",
    )
    .bind(id.as_slice())
    .bind(token_hash.as_slice())
    .bind(key_digest.as_slice())
    .bind(platform_name(platform))
    .bind(app_id)
    .bind(push_token)
    .bind(false)
    .bind(now_ms)
    .execute(pool)
    .await?
    .rows_affected());
    Ok(rows == 1)
}

/// The mailbox bound to a channel key, if any.
pub(crate) async fn mailbox_by_key(
    db: &Database,
    key_digest: &[u8; 32],
) -> Result<Option<Mailbox>, sqlx::Error> {
    mailbox_where(db, "channel_key_digest", key_digest).await
}

/// The mailbox of an id, if any.
pub(crate) async fn mailbox_by_id(
    db: &Database,
    id: &[u8; 16],
) -> Result<Option<Mailbox>, sqlx::Error> {
    mailbox_where(db, "mailbox_id", id).await
}

/// Several mailboxes by id.
pub(crate) async fn mailboxes(
    db: &Database,
    ids: &[[u8; 16]],
) -> Result<Vec<Mailbox>, sqlx::Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<MailboxRow> = with_pool!(db, pool => {
        let mut q = sqlx::QueryBuilder::new(MAILBOX_COLUMNS);
        q.push("WHERE mailbox_id IN ");
        push_id_list(&mut q, ids);
        q.build_query_as().fetch_all(pool).await?
    });
    rows.into_iter().map(mailbox_of).collect()
}

/// The mailboxes several token hashes name, with the hash each answers to (unknown hashes
/// are absent).
pub(crate) async fn mailboxes_by_tokens(
    db: &Database,
    token_hashes: &[[u8; 32]],
) -> Result<Vec<([u8; 32], Mailbox)>, sqlx::Error> {
    if token_hashes.is_empty() {
        return Ok(Vec::new());
    }
    type Row = (Vec<u8>, Vec<u8>, String, String, String, bool, Vec<u8>);
    let rows: Vec<Row> = with_pool!(db, pool => {
        let mut q = sqlx::QueryBuilder::new(
            "SELECT token_hash, mailbox_id, platform, app_id, push_token, push_dropped, \
             channel_key_digest FROM mc_mailboxes WHERE token_hash IN ",
        );
        push_id_list(&mut q, token_hashes);
        q.build_query_as().fetch_all(pool).await?
    });
    rows.into_iter()
        .map(|(hash, id, platform, app_id, push_token, dropped, key)| {
            Ok((
                fixed(&hash, "token_hash")?,
                mailbox_of((id, platform, app_id, push_token, dropped, key))?,
            ))
        })
        .collect()
}

/// Removes a mailbox row no event names (a registration a crash cut short).
pub(crate) async fn delete_mailbox(db: &Database, id: &[u8; 16]) -> Result<(), sqlx::Error> {
    with_pool!(db, pool => sqlx::query("DELETE FROM mc_mailboxes WHERE mailbox_id = $1")
        .bind(id.as_slice())
        .execute(pool)
        .await?
        .rows_affected());
    Ok(())
}

/// A new push token (clears a drop). Messages waiting for pull only stay so.
pub(crate) async fn update_push_token(
    db: &Database,
    id: &[u8; 16],
    push_token: &str,
) -> Result<(), sqlx::Error> {
    with_pool!(db, pool => sqlx::query(
        "UPDATE mc_mailboxes SET push_token = $2, push_dropped = $3 WHERE mailbox_id = $1")
        .bind(id.as_slice())
        .bind(push_token)
        .bind(false)
        .execute(pool)
        .await?
        .rows_affected());
    Ok(())
}

/// The provider dropped `token`, the mailbox's push token: forget it (unless the app gave
/// another since), and every message still awaiting a push waits for pull instead. Answers
/// whether the token was dropped now (not before, nor replaced) and how many messages stopped
/// awaiting a push.
pub(crate) async fn drop_push_token(
    db: &Database,
    id: &[u8; 16],
    token: &str,
) -> Result<(bool, u64), sqlx::Error> {
    Ok(with_pool!(db, pool => {
        let dropped = sqlx::query(
            "UPDATE mc_mailboxes SET push_token = '', push_dropped = $2 \
             WHERE mailbox_id = $1 AND push_token = $3 AND push_token <> ''")
            .bind(id.as_slice())
            .bind(true)
            .bind(token)
            .execute(pool)
            .await?
            .rows_affected();
        let moved = if dropped == 1 {
            sqlx::query(
                "UPDATE mc_messages SET push_state = $2 WHERE mailbox_id = $1 AND push_state = $3")
                .bind(id.as_slice())
                .bind(MAILBOX_ONLY)
                .bind(AWAITING)
                .execute(pool)
                .await?
                .rows_affected()
        } else {
            0
        };
        (dropped == 1, moved)
    }))
}

/// A message to insert.
#[derive(Clone)]
pub(crate) struct NewMessage {
    pub(crate) message_id: [u8; 16],
    pub(crate) mailbox_id: [u8; 16],
    pub(crate) envelope: Vec<u8>,
    pub(crate) envelope_digest: [u8; 32],
    pub(crate) expires_at_ms: i64,
    pub(crate) priority: Priority,
    pub(crate) collapse_id: Option<String>,
    pub(crate) queued_at_ms: i64,
    pub(crate) push_state: i16,
    pub(crate) next_attempt_at_ms: i64,
}

impl std::fmt::Debug for NewMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewMessage")
            .field("message_id", &hex::encode(self.message_id))
            .finish_non_exhaustive()
    }
}

/// Most rows one insert statement carries (10 parameters each).
pub(crate) const INSERT_BATCH: usize = 500;

/// Inserts messages in one statement, each if its id is new and its mailbox held fewer than
/// `capacity` messages before the statement (so a batch may pass the capacity by its own
/// rows: the limit is a bound on a mailbox's size, not an exact count). Answers the ids
/// inserted; for the others see [`message_digest`].
pub(crate) async fn insert_messages(
    db: &Database,
    rows: &[NewMessage],
    capacity: i64,
) -> Result<Vec<[u8; 16]>, sqlx::Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    // `VALUES` names its columns column1… on both backends.
    let inserted: Vec<(Vec<u8>,)> = with_pool!(db, pool => {
        let mut q = sqlx::QueryBuilder::new(
            "INSERT INTO mc_messages (message_id, mailbox_id, envelope, envelope_digest, \
             expires_at_ms, priority, collapse_id, queued_at_ms, push_state, attempts, \
             next_attempt_at_ms) \
             SELECT v.column1, v.column2, v.column3, v.column4, v.column5, v.column6, \
             v.column7, v.column8, v.column9, 0, v.column10 FROM (",
        );
        q.push_values(rows, |mut row, m| {
            row.push_bind(m.message_id.to_vec())
                .push_bind(m.mailbox_id.to_vec())
                .push_bind(m.envelope.clone())
                .push_bind(m.envelope_digest.to_vec())
                .push_bind(m.expires_at_ms)
                .push_bind(priority_code(m.priority))
                .push_bind(m.collapse_id.clone())
                .push_bind(m.queued_at_ms)
                .push_bind(m.push_state)
                .push_bind(m.next_attempt_at_ms);
        });
        q.push(
            ") AS v WHERE (SELECT COUNT(*) FROM mc_messages c WHERE c.mailbox_id = v.column2) < ",
        );
        q.push_bind(capacity);
        q.push(" ON CONFLICT (message_id) DO NOTHING RETURNING message_id");
        q.build_query_as().fetch_all(pool).await?
    });
    inserted
        .into_iter()
        .map(|(id,)| fixed(&id, "message_id"))
        .collect()
}

/// The mailbox, envelope digest and expiry of a stored message, if any.
pub(crate) async fn message_digest(
    db: &Database,
    message_id: &[u8; 16],
) -> Result<Option<([u8; 16], [u8; 32], i64)>, sqlx::Error> {
    let row: Option<(Vec<u8>, Vec<u8>, i64)> = with_pool!(db, pool => sqlx::query_as(
        "SELECT mailbox_id, envelope_digest, expires_at_ms FROM mc_messages WHERE message_id = $1")
        .bind(message_id.as_slice())
        .fetch_optional(pool)
        .await?);
    row.map(|(mailbox, digest, expires)| {
        Ok((
            fixed(&mailbox, "mailbox_id")?,
            fixed(&digest, "envelope_digest")?,
            expires,
        ))
    })
    .transpose()
}

/// Sets the push state of messages still awaiting a push, in one statement; answers how
/// many changed.
pub(crate) async fn set_state_many(
    db: &Database,
    ids: &[[u8; 16]],
    state: i16,
) -> Result<u64, sqlx::Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    Ok(with_pool!(db, pool => {
        let mut q = sqlx::QueryBuilder::new("UPDATE mc_messages SET push_state = ");
        q.push_bind(state);
        q.push(" WHERE push_state = ");
        q.push_bind(AWAITING);
        q.push(" AND message_id IN ");
        push_id_list(&mut q, ids);
        q.build().execute(pool).await?.rows_affected()
    }))
}

/// A failed attempt to be retried at `next_attempt_at_ms`.
pub(crate) async fn set_retry(
    db: &Database,
    id: &[u8; 16],
    attempts: u32,
    next_attempt_at_ms: i64,
) -> Result<(), sqlx::Error> {
    with_pool!(db, pool => sqlx::query(
        "UPDATE mc_messages SET attempts = $2, next_attempt_at_ms = $3 \
         WHERE message_id = $1 AND push_state = $4")
        .bind(id.as_slice())
        .bind(i32::try_from(attempts).unwrap_or(i32::MAX))
        .bind(next_attempt_at_ms)
        .bind(AWAITING)
        .execute(pool)
        .await?
        .rows_affected());
    Ok(())
}

/// A message claimed for a push.
#[derive(Clone)]
pub(crate) struct Due {
    pub(crate) message_id: [u8; 16],
    pub(crate) mailbox_id: [u8; 16],
    pub(crate) envelope: Vec<u8>,
    pub(crate) envelope_digest: [u8; 32],
    pub(crate) expires_at_ms: i64,
    pub(crate) priority: Priority,
    pub(crate) collapse_id: Option<String>,
    pub(crate) queued_at_ms: i64,
    pub(crate) attempts: u32,
}

impl std::fmt::Debug for Due {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Due")
            .field("message_id", &hex::encode(self.message_id))
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

type DueRow = (
    Vec<u8>,
    Vec<u8>,
    Vec<u8>,
    Vec<u8>,
    i64,
    i16,
    Option<String>,
    i64,
    i32,
);

/// Claims up to `limit` messages awaiting a push whose due time came (`≤ now_ms`), moving
/// their due time to `lease_until_ms`.
pub(crate) async fn claim_due(
    db: &Database,
    now_ms: i64,
    lease_until_ms: i64,
    limit: i64,
) -> Result<Vec<Due>, sqlx::Error> {
    let rows: Vec<DueRow> = with_pool!(db, pool => sqlx::query_as(
        "UPDATE mc_messages SET next_attempt_at_ms = $1 WHERE message_id IN \
         (SELECT message_id FROM mc_messages WHERE push_state = $4 AND next_attempt_at_ms <= $2 \
          ORDER BY next_attempt_at_ms LIMIT $3) \
         AND push_state = $4 AND next_attempt_at_ms <= $2 \
         RETURNING message_id, mailbox_id, envelope, envelope_digest, expires_at_ms, priority, \
         collapse_id, queued_at_ms, attempts")
        .bind(lease_until_ms)
        .bind(now_ms)
        .bind(limit)
        .bind(AWAITING)
        .fetch_all(pool)
        .await?);
    rows.into_iter()
        .map(
            |(id, mailbox, envelope, digest, expires, priority, collapse, queued, attempts)| {
                Ok(Due {
                    message_id: fixed(&id, "message_id")?,
                    mailbox_id: fixed(&mailbox, "mailbox_id")?,
                    envelope,
                    envelope_digest: fixed(&digest, "envelope_digest")?,
                    expires_at_ms: expires,
                    priority: priority_of(priority),
                    collapse_id: collapse,
                    queued_at_ms: queued,
                    attempts: u32::try_from(attempts).unwrap_or(0),
                })
            },
        )
        .collect()
}

/// One message as a pull answers it.
pub(crate) type Pulled = ([u8; 16], i64, Vec<u8>);

/// Up to `limit` unexpired messages of a mailbox, oldest first.
pub(crate) async fn pull(
    db: &Database,
    mailbox: &[u8; 16],
    now_ms: i64,
    limit: i64,
) -> Result<Vec<Pulled>, sqlx::Error> {
    let rows: Vec<(Vec<u8>, i64, Vec<u8>)> = with_pool!(db, pool => sqlx::query_as(
        "SELECT message_id, expires_at_ms, envelope FROM mc_messages \
         WHERE mailbox_id = $1 AND expires_at_ms > $2 \
         ORDER BY queued_at_ms, message_id LIMIT $3")
        .bind(mailbox.as_slice())
        .bind(now_ms)
        .bind(limit)
        .fetch_all(pool)
        .await?);
    rows.into_iter()
        .map(|(id, expires, envelope)| Ok((fixed(&id, "message_id")?, expires, envelope)))
        .collect()
}

/// Which of `ids` are messages of `mailbox`, with their push state.
pub(crate) async fn owned(
    db: &Database,
    mailbox: &[u8; 16],
    ids: &[[u8; 16]],
) -> Result<Vec<([u8; 16], i16)>, sqlx::Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<(Vec<u8>, i16)> = with_pool!(db, pool => {
        let mut q = sqlx::QueryBuilder::new(
            "SELECT message_id, push_state FROM mc_messages WHERE mailbox_id = ");
        q.push_bind(mailbox.to_vec());
        q.push(" AND message_id IN ");
        push_id_list(&mut q, ids);
        q.build_query_as().fetch_all(pool).await?
    });
    with_states(rows)
}

/// Message ids with their push state, from their rows.
fn with_states(rows: Vec<(Vec<u8>, i16)>) -> Result<Vec<([u8; 16], i16)>, sqlx::Error> {
    rows.into_iter()
        .map(|(id, state)| Ok((fixed(&id, "message_id")?, state)))
        .collect()
}

/// Removes messages (acknowledged or expired) and answers which rows went with the push
/// state they had.
pub(crate) async fn delete_messages(
    db: &Database,
    ids: &[[u8; 16]],
) -> Result<Vec<([u8; 16], i16)>, sqlx::Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<(Vec<u8>, i16)> = with_pool!(db, pool => {
        let mut q = sqlx::QueryBuilder::new("DELETE FROM mc_messages WHERE message_id IN ");
        push_id_list(&mut q, ids);
        q.push(" RETURNING message_id, push_state");
        q.build_query_as().fetch_all(pool).await?
    });
    with_states(rows)
}

/// Up to `limit` messages that expired (`expires_at_ms ≤ now_ms`): (message, mailbox).
pub(crate) async fn expired(
    db: &Database,
    now_ms: i64,
    limit: i64,
) -> Result<Vec<([u8; 16], [u8; 16])>, sqlx::Error> {
    let rows: Vec<(Vec<u8>, Vec<u8>)> = with_pool!(db, pool => sqlx::query_as(
        "SELECT message_id, mailbox_id FROM mc_messages WHERE expires_at_ms <= $1 \
         ORDER BY expires_at_ms LIMIT $2")
        .bind(now_ms)
        .bind(limit)
        .fetch_all(pool)
        .await?);
    rows.into_iter()
        .map(|(id, mailbox)| Ok((fixed(&id, "message_id")?, fixed(&mailbox, "mailbox_id")?)))
        .collect()
}

/// How many messages await a push (for the queue depth gauge at start).
pub(crate) async fn count_awaiting(db: &Database) -> Result<i64, sqlx::Error> {
    Ok(with_pool!(db, pool => sqlx::query_scalar(
        "SELECT COUNT(*) FROM mc_messages WHERE push_state = $1")
        .bind(AWAITING)
        .fetch_one(pool)
        .await?))
}
