//! The sessions read model: one row per session in `rm_sessions` (the API's hottest read: one
//! primary-key lookup), its state changes kept in the same row.
//!
//! States: `session.opened` → pending; `scanned`, `confirmed`, `second_factor_verified` →
//! scanned; `logged_in` → logged_in; `pinged` moves the ping deadline only; `logged_out`,
//! `aborted`, `expired`, `failed` → their state; `provoked` (a push login asked again of the
//! account that last logged in) → pending, with the provoke's expiry, user and infos, the
//! last login's account kept. A history entry is written only when the state
//! changes. Times are the event's own where it carries one, else the envelope's
//! `recorded_at`.
//!
//! The history (`position:state:at;` per change, oldest first) is a column of the session's
//! row rather than a table of its own: a row per change and its index entry cost PostgreSQL
//! about as much as everything else a replay writes, and nothing reads history but by session.
//! A batch appends to it. Whether the batch's first state event changes the state of a
//! session opened in an earlier batch depends on the stored state, so the update compares
//! with it; every later change the fold decides itself.

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

impl SessionRow {
    /// Whether a provoke may ask for a login again (provokeLogin): someone logged in on the
    /// session, and that login is over (logged out) or was one-shot. The aggregate decides;
    /// this is what the session read shows.
    pub fn can_provoke(&self) -> bool {
        self.account_id.is_some()
            && (self.state == SessionState::LoggedOut.as_str()
                || (self.state == SessionState::LoggedIn.as_str() && self.ping_time_secs == 0))
    }
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
    reopen: Option<Reopen>,
}

/// What a provoke sets anew.
#[derive(Debug, Clone)]
struct Reopen {
    expires_at: Timestamp,
    intended_user: Option<UserDigest>,
    announce_info: Option<String>,
    session_info: Option<String>,
}

/// The fields a batch sets on a session opened before it.
#[derive(Debug)]
struct Patch {
    state: Option<SessionState>,
    account_id: Option<AccountId>,
    user_digest: Option<UserDigest>,
    ping_deadline: Option<Option<Timestamp>>,
    reopen: Option<Reopen>,
    updated_at: Timestamp,
    last_position: u64,
    /// State changes to append; the first is kept only if the stored state differs from it.
    history: Vec<History>,
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
            SessionEvent::SecondFactorVerified(e) => (state(SessionState::Scanned), e.verified_at),
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
            SessionEvent::Provoked(e) => (
                Delta {
                    ping_deadline: Some(None),
                    reopen: Some(Reopen {
                        expires_at: e.expires_at,
                        intended_user: Some(e.user),
                        announce_info: e.announce_info,
                        session_info: e.session_info,
                    }),
                    ..state(SessionState::Pending)
                },
                e.provoked_at,
            ),
        };
        let change = delta.state.map(|state| History {
            position: at.position,
            state,
            at: time,
        });
        match self.changes.entry(key) {
            Entry::Occupied(mut occupied) => match occupied.get_mut() {
                Change::Put { row, history } => {
                    if let Some(change) = change
                        && change.state != row.state
                    {
                        history.push(change);
                        row.state = change.state;
                    }
                    row.account_id = delta.account_id.or(row.account_id);
                    row.user_digest = delta.user_digest.or(row.user_digest);
                    if let Some(deadline) = delta.ping_deadline {
                        row.ping_deadline = deadline;
                    }
                    if let Some(reopen) = &delta.reopen {
                        row.expires_at = reopen.expires_at;
                        row.intended_user = reopen.intended_user;
                        row.announce_info.clone_from(&reopen.announce_info);
                        row.session_info.clone_from(&reopen.session_info);
                    }
                    row.updated_at = time;
                    row.last_position = at.position;
                }
                Change::Patch(patch) => patch.merge(&delta, change, time, at.position),
            },
            Entry::Vacant(vacant) => {
                let mut patch = Patch {
                    state: None,
                    account_id: None,
                    user_digest: None,
                    ping_deadline: None,
                    reopen: None,
                    updated_at: time,
                    last_position: at.position,
                    history: Vec::new(),
                };
                patch.merge(&delta, change, time, at.position);
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
    fn merge(&mut self, delta: &Delta, change: Option<History>, time: Timestamp, position: u64) {
        if let Some(change) = change {
            // The first change is always recorded here (the update compares it with the
            // stored state); later ones only if they change the state this patch reached.
            if self.state != Some(change.state) || self.history.is_empty() {
                self.history.push(change);
            }
            self.state = Some(change.state);
        }
        self.account_id = delta.account_id.or(self.account_id);
        self.user_digest = delta.user_digest.or(self.user_digest);
        if delta.ping_deadline.is_some() {
            self.ping_deadline = delta.ping_deadline;
        }
        if delta.reopen.is_some() {
            self.reopen.clone_from(&delta.reopen);
        }
        self.updated_at = time;
        self.last_position = position;
    }
}

/// The stored form of `entries`: `position:state:at;` each.
fn encode_history(entries: &[History]) -> String {
    use std::fmt::Write as _;
    let mut text = String::with_capacity(entries.len() * 32);
    for h in entries {
        // Writing to a String cannot fail.
        let _ = write!(text, "{}:{}:{};", h.position, h.state, h.at.as_millis());
    }
    text
}

fn decode_history(text: &str) -> Result<Vec<HistoryRow>, ProjectionError> {
    let damaged = || ProjectionError::Damaged(format!("session history {text:?}"));
    text.split_terminator(';')
        .map(|entry| {
            let mut parts = entry.splitn(3, ':');
            let (Some(position), Some(state), Some(at)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(damaged());
            };
            let state = SessionState::parse(state).ok_or_else(damaged)?;
            Ok(HistoryRow {
                position: position.parse().map_err(|_| damaged())?,
                state: state.as_str().to_owned(),
                at: Timestamp::from_millis(at.parse().map_err(|_| damaged())?),
            })
        })
        .collect()
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
    history: Vec<String>,
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
    reopen: Vec<bool>,
    expires_at: Vec<Option<i64>>,
    intended_user: Vec<Option<Vec<u8>>>,
    announce_info: Vec<Option<String>>,
    session_info: Vec<Option<String>>,
    updated_at: Vec<i64>,
    last_position: Vec<i64>,
    /// The first change's state (`None`: the batch changed no state).
    first_state: Vec<Option<&'static str>>,
    /// Every change, to append when the stored state differs from the first's.
    all: Vec<String>,
    /// Every change but the first, to append when it does not.
    rest: Vec<String>,
}

/// What a patch appends to the stored history (see [`Fold::write_postgres`]).
struct PatchHistory {
    first_state: Option<&'static str>,
    all: String,
    rest: String,
}

impl Patch {
    fn history(&self) -> PatchHistory {
        PatchHistory {
            first_state: self.history.first().map(|h| h.state.as_str()),
            all: encode_history(&self.history),
            rest: encode_history(self.history.get(1..).unwrap_or_default()),
        }
    }
}

macro_rules! upsert_sql {
    ($values:literal) => {
        concat!(
            "INSERT INTO rm_sessions (server_id, hsid, state, ping_time_secs, expires_at, ",
            "ping_deadline, app_login, intended_user, user_digest, account_id, announce_info, ",
            "session_info, opened_at, updated_at, last_position, history) ",
            $values,
            " ON CONFLICT (server_id, hsid) DO UPDATE SET state = EXCLUDED.state, ",
            "ping_time_secs = EXCLUDED.ping_time_secs, expires_at = EXCLUDED.expires_at, ",
            "ping_deadline = EXCLUDED.ping_deadline, app_login = EXCLUDED.app_login, ",
            "intended_user = EXCLUDED.intended_user, user_digest = EXCLUDED.user_digest, ",
            "account_id = EXCLUDED.account_id, announce_info = EXCLUDED.announce_info, ",
            "session_info = EXCLUDED.session_info, opened_at = EXCLUDED.opened_at, ",
            "updated_at = EXCLUDED.updated_at, last_position = EXCLUDED.last_position, ",
            "history = EXCLUDED.history"
        )
    };
}

impl Fold {
    fn split(self) -> Result<(PutColumns, PatchColumns), ProjectionError> {
        let mut puts = PutColumns::default();
        let mut patches = PatchColumns::default();
        // In key order: PostgreSQL's index inserts then walk the B-tree in order.
        let mut changes: Vec<(Key, Change)> = self.changes.into_iter().collect();
        changes.sort_unstable_by_key(|(key, _)| *key);
        for (key, change) in changes {
            match change {
                Change::Put { row, history } => {
                    puts.server_id.push(key.0.as_bytes().to_vec());
                    puts.hsid.push(key.1.as_bytes().to_vec());
                    puts.state.push(row.state.as_str());
                    puts.ping_time_secs.push(i64::from(row.ping_time_secs));
                    puts.expires_at.push(row.expires_at.as_millis());
                    puts.ping_deadline
                        .push(row.ping_deadline.map(Timestamp::as_millis));
                    puts.app_login.push(row.app_login);
                    puts.intended_user
                        .push(bytes(row.intended_user.as_ref().map(UserDigest::as_bytes)));
                    puts.user_digest
                        .push(bytes(row.user_digest.as_ref().map(UserDigest::as_bytes)));
                    puts.account_id
                        .push(bytes(row.account_id.as_ref().map(AccountId::as_bytes)));
                    puts.announce_info.push(row.announce_info);
                    puts.session_info.push(row.session_info);
                    puts.opened_at.push(row.opened_at.as_millis());
                    puts.updated_at.push(row.updated_at.as_millis());
                    puts.last_position.push(db_position(row.last_position)?);
                    puts.history.push(encode_history(&history));
                }
                Change::Patch(p) => {
                    let history = p.history();
                    patches.server_id.push(key.0.as_bytes().to_vec());
                    patches.hsid.push(key.1.as_bytes().to_vec());
                    patches.state.push(p.state.map(SessionState::as_str));
                    patches
                        .account_id
                        .push(bytes(p.account_id.as_ref().map(AccountId::as_bytes)));
                    patches
                        .user_digest
                        .push(bytes(p.user_digest.as_ref().map(UserDigest::as_bytes)));
                    patches.set_ping.push(p.ping_deadline.is_some());
                    patches
                        .ping_deadline
                        .push(p.ping_deadline.flatten().map(Timestamp::as_millis));
                    patches.reopen.push(p.reopen.is_some());
                    patches
                        .expires_at
                        .push(p.reopen.as_ref().map(|r| r.expires_at.as_millis()));
                    patches.intended_user.push(bytes(
                        p.reopen
                            .as_ref()
                            .and_then(|r| r.intended_user.as_ref())
                            .map(UserDigest::as_bytes),
                    ));
                    patches
                        .announce_info
                        .push(p.reopen.as_ref().and_then(|r| r.announce_info.clone()));
                    patches
                        .session_info
                        .push(p.reopen.as_ref().and_then(|r| r.session_info.clone()));
                    patches.updated_at.push(p.updated_at.as_millis());
                    patches.last_position.push(db_position(p.last_position)?);
                    patches.first_state.push(history.first_state);
                    patches.all.push(history.all);
                    patches.rest.push(history.rest);
                }
            }
        }
        Ok((puts, patches))
    }

    pub async fn write_postgres(self, tx: &mut sqlx::PgConnection) -> Result<(), ProjectionError> {
        if self.changes.is_empty() {
            return Ok(());
        }
        let (puts, patches) = self.split()?;
        if !puts.server_id.is_empty() {
            sqlx::query(upsert_sql!(
                "SELECT * FROM UNNEST($1::bytea[], $2::bytea[], $3::text[], $4::bigint[], \
                 $5::bigint[], $6::bigint[], $7::boolean[], $8::bytea[], $9::bytea[], $10::bytea[], \
                 $11::text[], $12::text[], $13::bigint[], $14::bigint[], $15::bigint[], $16::text[])"
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
            .bind(&puts.history)
            .execute(&mut *tx)
            .await?;
        }
        if !patches.server_id.is_empty() {
            // SET sees the stored row: the first change is appended only if it changes the
            // stored state.
            sqlx::query(
                "UPDATE rm_sessions s SET state = COALESCE(u.state, s.state), \
                   account_id = COALESCE(u.account_id, s.account_id), \
                   user_digest = COALESCE(u.user_digest, s.user_digest), \
                   ping_deadline = CASE WHEN u.set_ping THEN u.ping_deadline ELSE s.ping_deadline END, \
                   expires_at = CASE WHEN u.reopen THEN u.expires_at ELSE s.expires_at END, \
                   intended_user = CASE WHEN u.reopen THEN u.intended_user ELSE s.intended_user END, \
                   announce_info = CASE WHEN u.reopen THEN u.announce_info ELSE s.announce_info END, \
                   session_info = CASE WHEN u.reopen THEN u.session_info ELSE s.session_info END, \
                   updated_at = u.updated_at, last_position = u.last_position, \
                   history = s.history || CASE WHEN s.state = u.first_state THEN u.rest ELSE u.all_changes END \
                 FROM UNNEST($1::bytea[], $2::bytea[], $3::text[], $4::bytea[], $5::bytea[], \
                   $6::boolean[], $7::bigint[], $8::bigint[], $9::bigint[], $10::text[], $11::text[], \
                   $12::text[], $13::boolean[], $14::bigint[], $15::bytea[], $16::text[], $17::text[]) \
                   AS u(server_id, hsid, state, account_id, user_digest, set_ping, \
                   ping_deadline, updated_at, last_position, first_state, all_changes, rest, \
                   reopen, expires_at, intended_user, announce_info, session_info) \
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
            .bind(&patches.first_state)
            .bind(&patches.all)
            .bind(&patches.rest)
            .bind(&patches.reopen)
            .bind(&patches.expires_at)
            .bind(&patches.intended_user)
            .bind(&patches.announce_info)
            .bind(&patches.session_info)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    pub async fn write_sqlite(
        self,
        tx: &mut sqlx::SqliteConnection,
    ) -> Result<(), ProjectionError> {
        for (key, change) in &self.changes {
            let (server, hsid) = (key.0.as_bytes().as_slice(), key.1.as_bytes().as_slice());
            let query = match change {
                Change::Put { row, history } => sqlx::query(upsert_sql!(
                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
                ))
                .bind(server)
                .bind(hsid)
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
                .bind(encode_history(history)),
                Change::Patch(p) => {
                    let history = p.history();
                    sqlx::query(
                        "UPDATE rm_sessions SET state = COALESCE($3, state), \
                           account_id = COALESCE($4, account_id), user_digest = COALESCE($5, user_digest), \
                           ping_deadline = CASE WHEN $6 THEN $7 ELSE ping_deadline END, \
                           expires_at = CASE WHEN $13 THEN $14 ELSE expires_at END, \
                           intended_user = CASE WHEN $13 THEN $15 ELSE intended_user END, \
                           announce_info = CASE WHEN $13 THEN $16 ELSE announce_info END, \
                           session_info = CASE WHEN $13 THEN $17 ELSE session_info END, \
                           updated_at = $8, last_position = $9, \
                           history = history || CASE WHEN state = $10 THEN $12 ELSE $11 END \
                         WHERE server_id = $1 AND hsid = $2",
                    )
                    .bind(server)
                    .bind(hsid)
                    .bind(p.state.map(SessionState::as_str))
                    .bind(p.account_id.as_ref().map(|a| a.as_bytes().as_slice()))
                    .bind(p.user_digest.as_ref().map(|d| d.as_bytes().as_slice()))
                    .bind(p.ping_deadline.is_some())
                    .bind(p.ping_deadline.flatten().map(Timestamp::as_millis))
                    .bind(p.updated_at.as_millis())
                    .bind(db_position(p.last_position)?)
                    .bind(history.first_state)
                    .bind(history.all)
                    .bind(history.rest)
                    .bind(p.reopen.is_some())
                    .bind(p.reopen.as_ref().map(|r| r.expires_at.as_millis()))
                    .bind(
                        p.reopen
                            .as_ref()
                            .and_then(|r| r.intended_user.as_ref())
                            .map(|d| d.as_bytes().to_vec()),
                    )
                    .bind(p.reopen.as_ref().and_then(|r| r.announce_info.clone()))
                    .bind(p.reopen.as_ref().and_then(|r| r.session_info.clone()))
                }
            };
            query.execute(&mut *tx).await?;
        }
        Ok(())
    }
}

fn session_row(row: &impl Get) -> Result<SessionRow, ProjectionError> {
    let state = row.text(2)?;
    if SessionState::parse(&state).is_none() {
        return Err(ProjectionError::Damaged(format!(
            "unknown session state {state:?}"
        )));
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
    ($more:literal) => {
        concat!(
            "SELECT server_id, hsid, state, ping_time_secs, expires_at, ping_deadline, app_login, ",
            "intended_user, user_digest, account_id, announce_info, session_info, opened_at, ",
            "updated_at, last_position",
            $more,
            " FROM rm_sessions WHERE server_id = $1 AND hsid = $2"
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
            sqlx::query(select_session!(""))
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
            let Some(row) = sqlx::query(select_session!(", history"))
                .bind(server.as_bytes().as_slice())
                .bind(hsid.as_bytes().as_slice())
                .fetch_optional(pool)
                .await?
            else {
                return Ok(None);
            };
            let mut session = session_row(&row)?;
            session.history = decode_history(&row.text(15)?)?;
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
