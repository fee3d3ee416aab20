//! The sessions read model: one row per session (`rm_sessions`, the API's hottest read: one
//! primary-key lookup) and its state changes (`rm_session_history`).
//!
//! States: `session.opened` → pending; `scanned`, `confirmed`, `second_factor_verified` →
//! scanned; `logged_in` → logged_in; `pinged` moves the ping deadline only; `logged_out`,
//! `aborted`, `expired`, `failed` → their state. A history row is written only when the state
//! changes. Times are the event's own where it carries one, else the envelope's
//! `recorded_at`.
//!
//! Whether the first state event of a batch changes the state of a session opened in an
//! earlier batch depends on the stored row, so that history row is inserted by SQL that
//! compares with it (before the row is updated); every later one the fold decides itself.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use countersign_domain::session::SessionEvent;
use countersign_domain::{AccountId, Hsid, ServerId, SessionRef, Timestamp, UserDigest};
use countersign_eventstore::with_pool;

use super::fold::{At, db_position};
use super::rows::Get;
use super::{ProjectionError, ReadModels};

/// Where a session stands, as the read model names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionState {
    Pending,
    Scanned,
    LoggedIn,
    LoggedOut,
    Aborted,
    Expired,
    Failed,
}

impl SessionState {
    /// Every state, in flow order.
    pub const ALL: [Self; 7] = [
        Self::Pending,
        Self::Scanned,
        Self::LoggedIn,
        Self::LoggedOut,
        Self::Aborted,
        Self::Expired,
        Self::Failed,
    ];

    /// The stored (and API) name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Scanned => "scanned",
            Self::LoggedIn => "logged_in",
            Self::LoggedOut => "logged_out",
            Self::Aborted => "aborted",
            Self::Expired => "expired",
            Self::Failed => "failed",
        }
    }

    /// The state of a stored name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Waiting for the user (the session expires at `expires_at` in these states).
    pub const fn is_waiting(self) -> bool {
        matches!(self, Self::Pending | Self::Scanned)
    }
}

impl std::fmt::Display for SessionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A session as the API reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub server_id: ServerId,
    pub hsid: Hsid,
    /// One of [`SessionState`]'s names.
    pub state: String,
    /// 0 for a one-shot login.
    pub ping_time_secs: u32,
    pub expires_at: Timestamp,
    /// For a logged-in continuous session, when the next ping is due.
    pub ping_deadline: Option<Timestamp>,
    pub app_login: bool,
    /// The user the caller named when opening it.
    pub intended_user: Option<UserDigest>,
    /// The user who logged in.
    pub user_digest: Option<UserDigest>,
    pub account_id: Option<AccountId>,
    pub announce_info: Option<String>,
    pub session_info: Option<String>,
    pub opened_at: Timestamp,
    /// Time of the last event applied.
    pub updated_at: Timestamp,
    /// Position of the last event applied (pings included).
    pub last_position: u64,
    /// State changes, oldest first: filled by [`ReadModels::session`] only.
    pub history: Vec<HistoryRow>,
}

/// One state change of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRow {
    pub position: u64,
    pub state: String,
    pub at: Timestamp,
}

type Key = (ServerId, Hsid);

#[derive(Debug, Clone)]
struct Row {
    state: SessionState,
    ping_time_secs: u32,
    expires_at: Timestamp,
    ping_deadline: Option<Timestamp>,
    app_login: bool,
    intended_user: Option<UserDigest>,
    user_digest: Option<UserDigest>,
    account_id: Option<AccountId>,
    announce_info: Option<String>,
    session_info: Option<String>,
    opened_at: Timestamp,
    updated_at: Timestamp,
    last_position: u64,
}

#[derive(Debug, Clone, Copy)]
struct History {
    position: u64,
    state: SessionState,
    at: Timestamp,
}

/// What one event after `opened` sets.
#[derive(Debug, Default)]
struct Delta {
    state: Option<SessionState>,
    account_id: Option<AccountId>,
    user_digest: Option<UserDigest>,
    ping_deadline: Option<Option<Timestamp>>,
}

/// The fields a batch sets on a session opened before it.
#[derive(Debug)]
struct Patch {
    state: Option<SessionState>,
    account_id: Option<AccountId>,
    user_digest: Option<UserDigest>,
    ping_deadline: Option<Option<Timestamp>>,
    updated_at: Timestamp,
    last_position: u64,
    /// History rows; `true` marks the first, kept only if the stored state differs.
    history: Vec<(History, bool)>,
}

#[derive(Debug)]
enum Change {
    Put { row: Row, history: Vec<History> },
    Patch(Patch),
}

/// The batch's sessions, one change per session.
#[derive(Debug, Default)]
pub(crate) struct Fold {
    changes: HashMap<Key, Change>,
}

impl Fold {
    pub fn apply(&mut self, at: &At<'_>, event: SessionEvent) -> Result<(), ProjectionError> {
        let key = at.ids::<Hsid>("session")?;
        let (delta, time) = match event {
            SessionEvent::Opened(o) => {
                let row = Row {
                    state: SessionState::Pending,
                    ping_time_secs: o.ping_time_secs,
                    expires_at: o.expires_at,
                    ping_deadline: None,
                    app_login: o.app_login,
                    intended_user: o.user,
                    user_digest: None,
                    account_id: None,
                    announce_info: o.announce_info,
                    session_info: o.session_info,
                    opened_at: at.recorded_at,
                    updated_at: at.recorded_at,
                    last_position: at.position,
                };
                let history = vec![History {
                    position: at.position,
                    state: SessionState::Pending,
                    at: at.recorded_at,
                }];
                self.changes.insert(key, Change::Put { row, history });
                return Ok(());
            }
            SessionEvent::Scanned(e) => (state(SessionState::Scanned), e.scanned_at),
            SessionEvent::Confirmed(e) => (
                Delta {
                    account_id: Some(e.account_id),
                    ..state(SessionState::Scanned)
                },
                at.recorded_at,
            ),
            SessionEvent::SecondFactorVerified(e) => {
                (state(SessionState::Scanned), e.verified_at)
            }
            SessionEvent::LoggedIn(e) => (
                Delta {
                    account_id: Some(e.account_id),
                    user_digest: Some(e.user),
                    ping_deadline: Some(e.ping_deadline),
                    ..state(SessionState::LoggedIn)
                },
                at.recorded_at,
            ),
            SessionEvent::Pinged(e) => (
                Delta {
                    ping_deadline: Some(Some(e.ping_deadline)),
                    ..Delta::default()
                },
                e.pinged_at,
            ),
            SessionEvent::LoggedOut(e) => (state(SessionState::LoggedOut), e.logged_out_at),
            SessionEvent::Aborted(e) => (state(SessionState::Aborted), e.aborted_at),
            SessionEvent::Expired(e) => (state(SessionState::Expired), e.expired_at),
            SessionEvent::Failed(e) => (state(SessionState::Failed), e.failed_at),
        };
        let entry = History {
            position: at.position,
            state: SessionState::Pending,
            at: time,
        };
        match self.changes.entry(key) {
            Entry::Occupied(mut occupied) => match occupied.get_mut() {
                Change::Put { row, history } => {
                    if let Some(new) = delta.state
                        && new != row.state
                    {
                        history.push(History { state: new, ..entry });
                        row.state = new;
                    }
                    row.account_id = delta.account_id.or(row.account_id);
                    row.user_digest = delta.user_digest.or(row.user_digest);
                    if let Some(deadline) = delta.ping_deadline {
                        row.ping_deadline = deadline;
                    }
                    row.updated_at = time;
                    row.last_position = at.position;
                }
                Change::Patch(patch) => patch.merge(delta, entry),
            },
            Entry::Vacant(vacant) => {
                let mut patch = Patch {
                    state: None,
                    account_id: None,
                    user_digest: None,
                    ping_deadline: None,
                    updated_at: time,
                    last_position: at.position,
                    history: Vec::new(),
                };
                patch.merge(delta, entry);
                vacant.insert(Change::Patch(patch));
            }
        }
        Ok(())
    }
}

fn state(state: SessionState) -> Delta {
    Delta {
        state: Some(state),
        ..Delta::default()
    }
}

impl Patch {
    fn merge(&mut self, delta: Delta, entry: History) {
        if let Some(new) = delta.state {
            match self.state {
                None => self.history.push((History { state: new, ..entry }, true)),
                Some(old) if old != new => self.history.push((History { state: new, ..entry }, false)),
                Some(_) => {}
            }
            self.state = Some(new);
        }
        self.account_id = delta.account_id.or(self.account_id);
        self.user_digest = delta.user_digest.or(self.user_digest);
        if delta.ping_deadline.is_some() {
            self.ping_deadline = delta.ping_deadline;
        }
        self.updated_at = entry.at;
        self.last_position = entry.position;
    }
}

fn bytes<const N: usize>(id: Option<&[u8; N]>) -> Option<Vec<u8>> {
    id.map(|b| b.to_vec())
}

/// Column arrays of the rows to upsert (PostgreSQL binds them as arrays).
#[derive(Default)]
struct PutColumns {
    server_id: Vec<Vec<u8>>,
    hsid: Vec<Vec<u8>>,
    state: Vec<&'static str>,
    ping_time_secs: Vec<i64>,
    expires_at: Vec<i64>,
    ping_deadline: Vec<Option<i64>>,
    app_login: Vec<bool>,
    intended_user: Vec<Option<Vec<u8>>>,
    user_digest: Vec<Option<Vec<u8>>>,
    account_id: Vec<Option<Vec<u8>>>,
    announce_info: Vec<Option<String>>,
    session_info: Vec<Option<String>>,
    opened_at: Vec<i64>,
    updated_at: Vec<i64>,
    last_position: Vec<i64>,
}

#[derive(Default)]
struct HistoryColumns {
    server_id: Vec<Vec<u8>>,
    hsid: Vec<Vec<u8>>,
    position: Vec<i64>,
    state: Vec<&'static str>,
    at: Vec<i64>,
    conditional: Vec<bool>,
}

impl HistoryColumns {
    fn push(&mut self, key: &Key, h: &History, conditional: bool) -> Result<(), ProjectionError> {
        self.server_id.push(key.0.as_bytes().to_vec());
        self.hsid.push(key.1.as_bytes().to_vec());
        self.position.push(db_position(h.position)?);
        self.state.push(h.state.as_str());
        self.at.push(h.at.as_millis());
        self.conditional.push(conditional);
        Ok(())
    }
}

#[derive(Default)]
struct PatchColumns {
    server_id: Vec<Vec<u8>>,
    hsid: Vec<Vec<u8>>,
    state: Vec<Option<&'static str>>,
    account_id: Vec<Option<Vec<u8>>>,
    user_digest: Vec<Option<Vec<u8>>>,
    set_ping: Vec<bool>,
    ping_deadline: Vec<Option<i64>>,
    updated_at: Vec<i64>,
    last_position: Vec<i64>,
}

macro_rules! upsert_sql {
    ($values:literal) => {
        concat!(
            "INSERT INTO rm_sessions (server_id, hsid, state, ping_time_secs, expires_at, ",
            "ping_deadline, app_login, intended_user, user_digest, account_id, announce_info, ",
            "session_info, opened_at, updated_at, last_position) ",
            $values,
            " ON CONFLICT (server_id, hsid) DO UPDATE SET state = EXCLUDED.state, ",
            "ping_time_secs = EXCLUDED.ping_time_secs, expires_at = EXCLUDED.expires_at, ",
            "ping_deadline = EXCLUDED.ping_deadline, app_login = EXCLUDED.app_login, ",
            "intended_user = EXCLUDED.intended_user, user_digest = EXCLUDED.user_digest, ",
            "account_id = EXCLUDED.account_id, announce_info = EXCLUDED.announce_info, ",
            "session_info = EXCLUDED.session_info, opened_at = EXCLUDED.opened_at, ",
            "updated_at = EXCLUDED.updated_at, last_position = EXCLUDED.last_position"
        )
    };
}

impl Fold {
    fn split(self) -> Result<(PutColumns, HistoryColumns, PatchColumns, HistoryColumns), ProjectionError> {
        let mut puts = PutColumns::default();
        let mut put_history = HistoryColumns::default();
        let mut patches = PatchColumns::default();
        let mut patch_history = HistoryColumns::default();
        // In key order: PostgreSQL's index inserts then walk the B-tree in order.
        let mut changes: Vec<(Key, Change)> = self.changes.into_iter().collect();
        changes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (key, change) in changes {
            match change {
                Change::Put { row, history } => {
                    puts.server_id.push(key.0.as_bytes().to_vec());
                    puts.hsid.push(key.1.as_bytes().to_vec());
                    puts.state.push(row.state.as_str());
                    puts.ping_time_secs.push(i64::from(row.ping_time_secs));
                    puts.expires_at.push(row.expires_at.as_millis());
                    puts.ping_deadline.push(row.ping_deadline.map(Timestamp::as_millis));
                    puts.app_login.push(row.app_login);
                    puts.intended_user.push(bytes(row.intended_user.as_ref().map(UserDigest::as_bytes)));
                    puts.user_digest.push(bytes(row.user_digest.as_ref().map(UserDigest::as_bytes)));
                    puts.account_id.push(bytes(row.account_id.as_ref().map(AccountId::as_bytes)));
                    puts.announce_info.push(row.announce_info);
                    puts.session_info.push(row.session_info);
                    puts.opened_at.push(row.opened_at.as_millis());
                    puts.updated_at.push(row.updated_at.as_millis());
                    puts.last_position.push(db_position(row.last_position)?);
                    for h in &history {
                        put_history.push(&key, h, false)?;
                    }
                }
                Change::Patch(p) => {
                    patches.server_id.push(key.0.as_bytes().to_vec());
                    patches.hsid.push(key.1.as_bytes().to_vec());
                    patches.state.push(p.state.map(SessionState::as_str));
                    patches.account_id.push(bytes(p.account_id.as_ref().map(AccountId::as_bytes)));
                    patches.user_digest.push(bytes(p.user_digest.as_ref().map(UserDigest::as_bytes)));
                    patches.set_ping.push(p.ping_deadline.is_some());
                    patches.ping_deadline.push(p.ping_deadline.flatten().map(Timestamp::as_millis));
                    patches.updated_at.push(p.updated_at.as_millis());
                    patches.last_position.push(db_position(p.last_position)?);
                    for (h, conditional) in &p.history {
                        patch_history.push(&key, h, *conditional)?;
                    }
                }
            }
        }
        Ok((puts, put_history, patches, patch_history))
    }

    pub async fn write_postgres(self, tx: &mut sqlx::PgConnection) -> Result<(), ProjectionError> {
        if self.changes.is_empty() {
            return Ok(());
        }
        let (puts, put_history, patches, patch_history) = self.split()?; let mut __t = std::time::Instant::now();
        if !puts.server_id.is_empty() {
            sqlx::query(upsert_sql!(
                "SELECT * FROM UNNEST($1::bytea[], $2::bytea[], $3::text[], $4::bigint[], \
                 $5::bigint[], $6::bigint[], $7::boolean[], $8::bytea[], $9::bytea[], $10::bytea[], \
                 $11::text[], $12::text[], $13::bigint[], $14::bigint[], $15::bigint[])"
            ))
            .bind(&puts.server_id)
            .bind(&puts.hsid)
            .bind(&puts.state)
            .bind(&puts.ping_time_secs)
            .bind(&puts.expires_at)
            .bind(&puts.ping_deadline)
            .bind(&puts.app_login)
            .bind(&puts.intended_user)
            .bind(&puts.user_digest)
            .bind(&puts.account_id)
            .bind(&puts.announce_info)
            .bind(&puts.session_info)
            .bind(&puts.opened_at)
            .bind(&puts.updated_at)
            .bind(&puts.last_position)
            .execute(&mut *tx)
            .await?; if std::env::var("CS_PROFILE").is_ok() { eprintln!("  stmt1 {:?}", __t.elapsed()); } __t = std::time::Instant::now();
        }
        if !put_history.position.is_empty() {
            sqlx::query(
                "INSERT INTO rm_session_history (server_id, hsid, position, state, at) \
                 SELECT * FROM UNNEST($1::bytea[], $2::bytea[], $3::bigint[], $4::text[], $5::bigint[])",
            )
            .bind(&put_history.server_id)
            .bind(&put_history.hsid)
            .bind(&put_history.position)
            .bind(&put_history.state)
            .bind(&put_history.at)
            .execute(&mut *tx)
            .await?; if std::env::var("CS_PROFILE").is_ok() { eprintln!("  stmt2 {:?}", __t.elapsed()); } __t = std::time::Instant::now();
        }
        if patches.server_id.is_empty() {
            return Ok(());
        }
        // Before the update: the first state change of each session is compared with the
        // stored state, and none is recorded for a session that does not exist.
        if !patch_history.position.is_empty() {
            sqlx::query(
                "INSERT INTO rm_session_history (server_id, hsid, position, state, at) \
                 SELECT u.server_id, u.hsid, u.position, u.state, u.at \
                 FROM UNNEST($1::bytea[], $2::bytea[], $3::bigint[], $4::text[], $5::bigint[], $6::boolean[]) \
                   AS u(server_id, hsid, position, state, at, conditional) \
                 JOIN rm_sessions s ON s.server_id = u.server_id AND s.hsid = u.hsid \
                 WHERE NOT u.conditional OR s.state <> u.state",
            )
            .bind(&patch_history.server_id)
            .bind(&patch_history.hsid)
            .bind(&patch_history.position)
            .bind(&patch_history.state)
            .bind(&patch_history.at)
            .bind(&patch_history.conditional)
            .execute(&mut *tx)
            .await?; if std::env::var("CS_PROFILE").is_ok() { eprintln!("  stmt3 {:?}", __t.elapsed()); } __t = std::time::Instant::now();
        }
        sqlx::query(
            "UPDATE rm_sessions s SET state = COALESCE(u.state, s.state), \
               account_id = COALESCE(u.account_id, s.account_id), \
               user_digest = COALESCE(u.user_digest, s.user_digest), \
               ping_deadline = CASE WHEN u.set_ping THEN u.ping_deadline ELSE s.ping_deadline END, \
               updated_at = u.updated_at, last_position = u.last_position \
             FROM UNNEST($1::bytea[], $2::bytea[], $3::text[], $4::bytea[], $5::bytea[], $6::boolean[], \
                         $7::bigint[], $8::bigint[], $9::bigint[]) \
               AS u(server_id, hsid, state, account_id, user_digest, set_ping, ping_deadline, updated_at, last_position) \
             WHERE s.server_id = u.server_id AND s.hsid = u.hsid",
        )
        .bind(&patches.server_id)
        .bind(&patches.hsid)
        .bind(&patches.state)
        .bind(&patches.account_id)
        .bind(&patches.user_digest)
        .bind(&patches.set_ping)
        .bind(&patches.ping_deadline)
        .bind(&patches.updated_at)
        .bind(&patches.last_position)
        .execute(&mut *tx)
            .await?; if std::env::var("CS_PROFILE").is_ok() { eprintln!("  stmt4 {:?}", __t.elapsed()); } __t = std::time::Instant::now();
        Ok(())
    }

    pub async fn write_sqlite(self, tx: &mut sqlx::SqliteConnection) -> Result<(), ProjectionError> {
        let mut patches = Vec::new();
        let mut conditional_history = Vec::new();
        for (key, change) in &self.changes {
            match change {
                Change::Put { row, history } => {
                    sqlx::query(upsert_sql!(
                        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
                    ))
                    .bind(key.0.as_bytes().as_slice())
                    .bind(key.1.as_bytes().as_slice())
                    .bind(row.state.as_str())
                    .bind(i64::from(row.ping_time_secs))
                    .bind(row.expires_at.as_millis())
                    .bind(row.ping_deadline.map(Timestamp::as_millis))
                    .bind(row.app_login)
                    .bind(row.intended_user.as_ref().map(|d| d.as_bytes().as_slice()))
                    .bind(row.user_digest.as_ref().map(|d| d.as_bytes().as_slice()))
                    .bind(row.account_id.as_ref().map(|a| a.as_bytes().as_slice()))
                    .bind(row.announce_info.as_deref())
                    .bind(row.session_info.as_deref())
                    .bind(row.opened_at.as_millis())
                    .bind(row.updated_at.as_millis())
                    .bind(db_position(row.last_position)?)
                    .execute(&mut *tx)
                    .await?;
                    for h in history {
                        insert_history_sqlite(tx, key, h, false).await?;
                    }
                }
                Change::Patch(patch) => {
                    conditional_history.extend(patch.history.iter().map(|(h, c)| (key, h, *c)));
                    patches.push((key, patch));
                }
            }
        }
        for (key, h, conditional) in conditional_history {
            insert_history_sqlite(tx, key, h, conditional).await?;
        }
        for (key, p) in patches {
            sqlx::query(
                "UPDATE rm_sessions SET state = COALESCE($3, state), \
                   account_id = COALESCE($4, account_id), user_digest = COALESCE($5, user_digest), \
                   ping_deadline = CASE WHEN $6 THEN $7 ELSE ping_deadline END, \
                   updated_at = $8, last_position = $9 \
                 WHERE server_id = $1 AND hsid = $2",
            )
            .bind(key.0.as_bytes().as_slice())
            .bind(key.1.as_bytes().as_slice())
            .bind(p.state.map(SessionState::as_str))
            .bind(p.account_id.as_ref().map(|a| a.as_bytes().as_slice()))
            .bind(p.user_digest.as_ref().map(|d| d.as_bytes().as_slice()))
            .bind(p.ping_deadline.is_some())
            .bind(p.ping_deadline.flatten().map(Timestamp::as_millis))
            .bind(p.updated_at.as_millis())
            .bind(db_position(p.last_position)?)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }
}

/// One history row, kept only if its session exists and, when `conditional`, is in another
/// state (so it runs before the session is updated).
async fn insert_history_sqlite(
    tx: &mut sqlx::SqliteConnection,
    key: &Key,
    h: &History,
    conditional: bool,
) -> Result<(), ProjectionError> {
    sqlx::query(
        "INSERT INTO rm_session_history (server_id, hsid, position, state, at) \
         SELECT server_id, hsid, $3, $4, $5 FROM rm_sessions \
         WHERE server_id = $1 AND hsid = $2 AND (NOT $6 OR state <> $4)",
    )
    .bind(key.0.as_bytes().as_slice())
    .bind(key.1.as_bytes().as_slice())
    .bind(db_position(h.position)?)
    .bind(h.state.as_str())
    .bind(h.at.as_millis())
    .bind(conditional)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

fn session_row(row: &impl Get) -> Result<SessionRow, ProjectionError> {
    let state = row.text(2)?;
    if SessionState::parse(&state).is_none() {
        return Err(ProjectionError::Damaged(format!("unknown session state {state:?}")));
    }
    Ok(SessionRow {
        server_id: row.id(0)?,
        hsid: row.id(1)?,
        state,
        ping_time_secs: u32::try_from(row.int(3)?)
            .map_err(|_| ProjectionError::Damaged("ping time out of range".into()))?,
        expires_at: row.time(4)?,
        ping_deadline: row.opt_time(5)?,
        app_login: row.boolean(6)?,
        intended_user: row.opt_id(7)?,
        user_digest: row.opt_id(8)?,
        account_id: row.opt_id(9)?,
        announce_info: row.opt_text(10)?,
        session_info: row.opt_text(11)?,
        opened_at: row.time(12)?,
        updated_at: row.time(13)?,
        last_position: row.position(14)?,
        history: Vec::new(),
    })
}

macro_rules! select_session {
    () => {
        concat!(
            "SELECT server_id, hsid, state, ping_time_secs, expires_at, ping_deadline, app_login, ",
            "intended_user, user_digest, account_id, announce_info, session_info, opened_at, ",
            "updated_at, last_position FROM rm_sessions WHERE server_id = $1 AND hsid = $2"
        )
    };
}

impl ReadModels {
    /// A session's current row: one primary-key lookup, no history (the status hot path).
    pub async fn session_state(
        &self,
        server: ServerId,
        hsid: Hsid,
    ) -> Result<Option<SessionRow>, ProjectionError> {
        with_pool!(self.reads(), pool => {
            sqlx::query(select_session!())
                .bind(server.as_bytes().as_slice())
                .bind(hsid.as_bytes().as_slice())
                .fetch_optional(pool)
                .await?
                .map(|row| session_row(&row))
                .transpose()
        })
    }

    /// A session with its state history, oldest change first.
    pub async fn session(
        &self,
        server: ServerId,
        hsid: Hsid,
    ) -> Result<Option<SessionRow>, ProjectionError> {
        with_pool!(self.reads(), pool => {
            let mut tx = pool.begin().await?;
            let Some(row) = sqlx::query(select_session!())
                .bind(server.as_bytes().as_slice())
                .bind(hsid.as_bytes().as_slice())
                .fetch_optional(&mut *tx)
                .await?
            else {
                return Ok(None);
            };
            let mut session = session_row(&row)?;
            let history = sqlx::query(
                "SELECT position, state, at FROM rm_session_history \
                 WHERE server_id = $1 AND hsid = $2 ORDER BY position",
            )
            .bind(server.as_bytes().as_slice())
            .bind(hsid.as_bytes().as_slice())
            .fetch_all(&mut *tx)
            .await?;
            tx.commit().await?;
            session.history = history
                .iter()
                .map(|r| {
                    Ok(HistoryRow {
                        position: r.position(0)?,
                        state: r.text(1)?,
                        at: r.time(2)?,
                    })
                })
                .collect::<Result<_, ProjectionError>>()?;
            Ok(Some(session))
        })
    }

    /// Sessions whose deadline has passed: waiting (pending or scanned) with `expires_at` ≤
    /// `now`, or logged in with `ping_deadline` ≤ `now`; the oldest deadline first. Across all
    /// tenants: it feeds the expiry sweep, which decides per session.
    pub async fn sessions_due(
        &self,
        now: Timestamp,
        limit: u32,
    ) -> Result<Vec<SessionRef>, ProjectionError> {
        let rows = with_pool!(self.reads(), pool => {
            sqlx::query(
                "SELECT server_id, hsid, due FROM ( \
                   SELECT * FROM (SELECT server_id, hsid, expires_at AS due FROM rm_sessions \
                     WHERE state IN ('pending', 'scanned') AND expires_at <= $1 \
                     ORDER BY expires_at LIMIT $2) AS waiting \
                   UNION ALL \
                   SELECT * FROM (SELECT server_id, hsid, ping_deadline AS due FROM rm_sessions \
                     WHERE state = 'logged_in' AND ping_deadline <= $1 \
                     ORDER BY ping_deadline LIMIT $2) AS pinging \
                 ) AS due ORDER BY due, server_id, hsid LIMIT $2",
            )
            .bind(now.as_millis())
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| Ok(SessionRef::new(r.id(0)?, r.id(1)?)))
            .collect::<Result<Vec<_>, ProjectionError>>()?
        });
        Ok(rows)
    }
}

