//! The login-session aggregate: one login, from the QR code (or push, link, AppLogin) that
//! opens it to the logout that ends it.
//!
//! States ([`Session`]) and the commands that move between them:
//!
//! ```text
//! NotOpened --OpenSession--> Pending --ScanSession--> Scanned
//! Pending | Scanned --ConfirmSession--> Confirmed --VerifySecondFactor--> SecondFactorVerified
//! Pending | Scanned | Confirmed | SecondFactorVerified --LogIn--> LoggedIn --Ping--> LoggedIn
//! LoggedIn --LogOut | EndByServer | Expire (ping missed)--> LoggedOut
//! before login: --Abort | EndByServer--> Aborted, --Expire--> Expired, --Fail--> Failed
//! LoggedOut | LoggedIn (one-shot) --ProvokeSession--> Pending (a push login, same account)
//! NotOpened --OpenPushSession--> Pending (a push login to the named accounts)
//! NotOpened --OpenAppLogin--> Confirmed (an AppLogin: opened and confirmed for the account)
//! ```
//!
//! `Aborted`, `Expired` and `Failed` are terminal; `LoggedOut` is, but for a provoke.
//!
//! Rules enforced by [`Session::decide`]:
//! - opening: timeout 30..=86400 s; ping time 0..=3600 s (0: a one-shot login, otherwise the
//!   login is continuous and lasts while the device pings); announce and session info at most
//!   1000 characters with no control character but `\n`; `expires_at = now + timeout`.
//!   Opening an open session again with the same options emits nothing (an idempotent PUT);
//!   with other options it is [`SessionError::AlreadyExists`]; opening an ended session is
//!   [`SessionError::Ended`].
//! - deadlines: before login the session must log in before `expires_at`; a continuous login
//!   must ping before its `ping_deadline`, and each ping moves the deadline to
//!   `now + ping time`. A command that needs a live session once its deadline has passed is
//!   [`SessionError::Expired`]; recording that fact is [`Expire`]'s job (the edge's sweeper, or
//!   a read that finds the deadline passed). A command that ends the session (log out, abort,
//!   fail, end by server) after its deadline records what `Expire` would instead, because the
//!   deadline came first.
//! - a login must be by the intended user when the opener named one, and with the confirmed
//!   account once one was confirmed. Whether a second factor was needed is the gateway's
//!   check against the server's policy, not this aggregate's — except for an AppLogin
//!   (`app_login`, opened by the app for itself): it logs in only after a second factor
//!   verified on the session itself, never a reused one ([`SessionError::WrongState`]).
//! - repeating a step that already happened with the same data (scan, confirm, verify, log
//!   in) emits nothing, so a device may retry; ending an ended session emits nothing (a
//!   repeated DELETE); every other command on an ended session is [`SessionError::Ended`].
//! - any command but [`OpenSession`] on a session never opened is [`SessionError::NotFound`].
//! - push logins: a session opened by [`OpenPushSession`] names the accounts asked (1..=16,
//!   the user's), and only they may confirm or log in ([`SessionError::AccountMismatch`]).
//!   [`ProvokeSession`] asks the account that last logged in to log in again: only a session
//!   whose login is over or was one-shot (`LoggedOut`, one-shot `LoggedIn`) may be provoked;
//!   one that never logged in is [`SessionError::NotProvokable`], a continuous login still on
//!   or a login in progress [`SessionError::WrongState`], and an aborted (declined), expired or
//!   failed one [`SessionError::Ended`] — a declined push is not asked again.

mod events;
#[cfg(test)]
mod tests;

pub use events::*;

use crate::aggregate::{Aggregate, Classify, Context, ErrorKind};
use crate::ids::{AccountId, SessionRef, Timestamp, UserDigest};
use crate::second_factor::SecondFactorKind;
use crate::server::into_command;
use crate::validate::{self, ValidationError};

/// Shortest session timeout, seconds.
pub const MIN_TIMEOUT_SECS: u32 = 30;
/// Longest session timeout, seconds (a day).
pub const MAX_TIMEOUT_SECS: u32 = 86_400;
/// Longest ping interval of a continuous session, seconds.
pub const MAX_PING_TIME_SECS: u32 = 3600;
/// Longest announce or session info, in characters.
pub const INFO_MAX_CHARS: usize = 1000;

/// Open a session (the business system's PUT). The edge derived `session` from the caller's
/// nonce and took defaults from the server's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSession {
    /// Tenant and hsid.
    pub session: SessionRef,
    /// Ping interval, seconds; 0 for a one-shot login.
    pub ping_time_secs: u32,
    /// Seconds the session may take to log in.
    pub timeout_secs: u32,
    /// Started by the app for itself rather than by a QR code, link or push.
    pub app_login: bool,
    /// The intended user, when the caller named one.
    pub user: Option<UserDigest>,
    /// Shown to the user while confirming.
    pub announce_info: Option<String>,
    /// Shown to the user once logged in.
    pub session_info: Option<String>,
}

/// Most accounts one push login may ask.
pub const MAX_PUSH_ACCOUNTS: usize = 16;

/// Open a session as a push login to these accounts (provoke on a user or an account).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenPushSession {
    /// The options, as for any session (`user` is the accounts' user).
    pub open: OpenSession,
    /// The accounts asked (1..=[`MAX_PUSH_ACCOUNTS`]); only they may log in.
    pub push_to: Vec<AccountId>,
}

/// Open an AppLogin (the app logging in to itself) for one account: the session is opened
/// and confirmed for that account in one decision, so one append records both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAppLogin {
    /// The options (`app_login` is taken as set; `user` is the account's user, required).
    pub open: OpenSession,
    /// The account the app logs in with.
    pub account_id: AccountId,
}

/// Ask the account that last logged in on this session to log in again, by push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvokeSession {
    /// Seconds the new login may take.
    pub timeout_secs: u32,
    /// Shown to the user while confirming.
    pub announce_info: Option<String>,
    /// Shown to the user once logged in.
    pub session_info: Option<String>,
}

/// A device picked up the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanSession;

/// The user chose the account to continue with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfirmSession {
    /// The account.
    pub account_id: AccountId,
}

/// The SFS verified a second factor for the confirmed account (the gateway checked the
/// attestation and passes its hash).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifySecondFactor {
    /// Which factor.
    pub factor: SecondFactorKind,
    /// SHA-256 of the SFS attestation.
    pub attestation_hash: [u8; 32],
    /// When the SFS verified it.
    pub verified_at: Timestamp,
    /// A recent verification reused under the server's policy.
    pub reused: bool,
}

/// The device logged in (the gateway verified its signature).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogIn {
    /// The account.
    pub account_id: AccountId,
    /// Its user.
    pub user: UserDigest,
}

/// The device says a continuous session is still in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ping;

/// End a logged-in session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOut {
    /// Why.
    pub reason: LogoutReason,
}

/// Cancel a session before login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abort {
    /// Who.
    pub by: AbortedBy,
}

/// The business system's DELETE: log out when logged in, abort before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndByServer;

/// Record that a deadline passed, if one did: the expiry before login, the ping deadline of a
/// continuous login. Emits nothing when nothing is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expire;

/// The login failed before completing (the SDK's ERROR state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fail {
    /// Why.
    pub reason: SessionFailure,
}

/// Commands of the session aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionCommand {
    /// See [`OpenSession`].
    Open(OpenSession),
    /// See [`OpenPushSession`].
    OpenPush(OpenPushSession),
    /// See [`OpenAppLogin`].
    OpenAppLogin(OpenAppLogin),
    /// See [`ProvokeSession`].
    Provoke(ProvokeSession),
    /// See [`ScanSession`].
    Scan(ScanSession),
    /// See [`ConfirmSession`].
    Confirm(ConfirmSession),
    /// See [`VerifySecondFactor`].
    VerifySecondFactor(VerifySecondFactor),
    /// See [`LogIn`].
    LogIn(LogIn),
    /// See [`Ping`].
    Ping(Ping),
    /// See [`LogOut`].
    LogOut(LogOut),
    /// See [`Abort`].
    Abort(Abort),
    /// See [`EndByServer`].
    EndByServer(EndByServer),
    /// See [`Expire`].
    Expire(Expire),
    /// See [`Fail`].
    Fail(Fail),
}

into_command!(SessionCommand {
    Open(OpenSession),
    OpenPush(OpenPushSession),
    OpenAppLogin(OpenAppLogin),
    Provoke(ProvokeSession),
    Scan(ScanSession),
    Confirm(ConfirmSession),
    VerifySecondFactor(VerifySecondFactor),
    LogIn(LogIn),
    Ping(Ping),
    LogOut(LogOut),
    Abort(Abort),
    EndByServer(EndByServer),
    Expire(Expire),
    Fail(Fail),
});

/// Why a session command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The input breaks a rule. HTTP 422.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The session is open with other options. HTTP 409.
    #[error("session is already open with other options")]
    AlreadyExists,
    /// No session was opened under this id. HTTP 404.
    #[error("session not found")]
    NotFound,
    /// The session has ended. HTTP 410.
    #[error("session has ended ({status})")]
    Ended {
        /// How it ended.
        status: SessionStatus,
    },
    /// The session's deadline has passed (expiry before login, ping deadline after). HTTP 410.
    #[error("session expired")]
    Expired,
    /// The command does not fit the session's current step. HTTP 409.
    #[error("{command} is not possible while the session is {status}")]
    WrongState {
        /// What was asked.
        command: &'static str,
        /// Where the session is.
        status: SessionStatus,
    },
    /// A ping for a one-shot login, which takes none. HTTP 409.
    #[error("session is a one-shot login and takes no pings")]
    NotContinuous,
    /// The login is by another user than the one the session was opened for. HTTP 409.
    #[error("session is meant for another user")]
    UserMismatch,
    /// The login or confirmation names another account than the one confirmed, or one the
    /// push login did not ask. HTTP 409.
    #[error("another account was confirmed for this session")]
    AccountMismatch,
    /// A provoke on a session nobody logged in to: there is no account to ask. HTTP 409.
    #[error("nobody has logged in on this session; there is no account to ask")]
    NotProvokable,
}

impl Classify for SessionError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Invalid(_) => ErrorKind::Invalid,
            Self::AlreadyExists
            | Self::WrongState { .. }
            | Self::NotContinuous
            | Self::UserMismatch
            | Self::AccountMismatch
            | Self::NotProvokable => ErrorKind::Conflict,
            Self::NotFound => ErrorKind::NotFound,
            Self::Ended { .. } | Self::Expired => ErrorKind::Gone,
        }
    }
}

/// Where a session is, as callers and read models name it. `Confirmed` and
/// `SecondFactorVerified` count as [`SessionStatus::Scanned`]: to the business system the
/// device is still working on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionStatus {
    /// Never opened.
    NotOpened,
    /// Opened, no device yet.
    Pending,
    /// A device is on it.
    Scanned,
    /// Logged in.
    LoggedIn,
    /// Logged out after login.
    LoggedOut,
    /// Cancelled before login.
    Aborted,
    /// Not logged in before its deadline.
    Expired,
    /// Failed before login.
    Failed,
}

impl SessionStatus {
    /// The snake_case name: `pending`, `scanned`, `logged_in`, ….
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NotOpened => "not_opened",
            Self::Pending => "pending",
            Self::Scanned => "scanned",
            Self::LoggedIn => "logged_in",
            Self::LoggedOut => "logged_out",
            Self::Aborted => "aborted",
            Self::Expired => "expired",
            Self::Failed => "failed",
        }
    }

    /// Terminal: nothing more happens to the session.
    #[must_use]
    pub const fn is_ended(self) -> bool {
        matches!(
            self,
            Self::LoggedOut | Self::Aborted | Self::Expired | Self::Failed
        )
    }
}

impl std::fmt::Display for SessionStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The session aggregate's state. Every opened state keeps the `session.opened` facts
/// (options and expiry) so a repeated open can be compared with them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Session {
    /// Nothing in the stream yet.
    #[default]
    NotOpened,
    /// Waiting for a device.
    Pending {
        /// What it was opened with.
        opened: SessionOpened,
    },
    /// A device picked it up.
    Scanned {
        /// What it was opened with.
        opened: SessionOpened,
        /// When.
        scanned_at: Timestamp,
    },
    /// The user chose an account.
    Confirmed {
        /// What it was opened with.
        opened: SessionOpened,
        /// The account.
        account_id: AccountId,
    },
    /// The confirmed account proved a second factor.
    SecondFactorVerified {
        /// What it was opened with.
        opened: SessionOpened,
        /// The account.
        account_id: AccountId,
        /// Which factor.
        factor: SecondFactorKind,
        /// SHA-256 of the attestation, to recognise a retry.
        attestation_hash: [u8; 32],
    },
    /// Logged in.
    LoggedIn {
        /// What it was opened with.
        opened: SessionOpened,
        /// The account.
        account_id: AccountId,
        /// Its user.
        user: UserDigest,
        /// For a continuous login, when the next ping is due; `None` for a one-shot login.
        ping_deadline: Option<Timestamp>,
    },
    /// Logged out: terminal, but for a provoke.
    LoggedOut {
        /// What it was opened with.
        opened: SessionOpened,
        /// Why.
        reason: LogoutReason,
        /// The account that was logged in.
        account_id: AccountId,
        /// Its user.
        user: UserDigest,
    },
    /// Cancelled before login: terminal.
    Aborted {
        /// What it was opened with.
        opened: SessionOpened,
        /// Who.
        by: AbortedBy,
    },
    /// Not logged in in time: terminal.
    Expired {
        /// What it was opened with.
        opened: SessionOpened,
    },
    /// Failed before login: terminal.
    Failed {
        /// What it was opened with.
        opened: SessionOpened,
        /// Why.
        reason: SessionFailure,
    },
}

impl Session {
    /// Where the session is.
    #[must_use]
    pub fn status(&self) -> SessionStatus {
        match self {
            Self::NotOpened => SessionStatus::NotOpened,
            Self::Pending { .. } => SessionStatus::Pending,
            Self::Scanned { .. } | Self::Confirmed { .. } | Self::SecondFactorVerified { .. } => {
                SessionStatus::Scanned
            }
            Self::LoggedIn { .. } => SessionStatus::LoggedIn,
            Self::LoggedOut { .. } => SessionStatus::LoggedOut,
            Self::Aborted { .. } => SessionStatus::Aborted,
            Self::Expired { .. } => SessionStatus::Expired,
            Self::Failed { .. } => SessionStatus::Failed,
        }
    }

    /// The `session.opened` facts; `None` before it was opened.
    #[must_use]
    pub fn opened(&self) -> Option<&SessionOpened> {
        match self {
            Self::NotOpened => None,
            Self::Pending { opened }
            | Self::Scanned { opened, .. }
            | Self::Confirmed { opened, .. }
            | Self::SecondFactorVerified { opened, .. }
            | Self::LoggedIn { opened, .. }
            | Self::LoggedOut { opened, .. }
            | Self::Aborted { opened, .. }
            | Self::Expired { opened }
            | Self::Failed { opened, .. } => Some(opened),
        }
    }

    /// The deadline to log in; `None` before it was opened.
    #[must_use]
    pub fn expires_at(&self) -> Option<Timestamp> {
        self.opened().map(|o| o.expires_at)
    }

    /// Where the session is at `now`: as [`Self::status`], with a deadline that has passed
    /// taken as recorded (a continuous login whose ping is overdue is logged out, a login not
    /// completed in time expired), whether or not the sweeper has written it yet. What every
    /// reader that hands out something for a login (tokens, SSO) decides by.
    #[must_use]
    pub fn status_at(&self, now: Timestamp) -> SessionStatus {
        match self.overdue(now) {
            Some(event) => {
                let mut later = self.clone();
                later.apply(&event);
                later.status()
            }
            None => self.status(),
        }
    }

    /// When a continuous login's next ping is due; `None` in every other state.
    #[must_use]
    pub fn ping_deadline(&self) -> Option<Timestamp> {
        match self {
            Self::LoggedIn { ping_deadline, .. } => *ping_deadline,
            _ => None,
        }
    }

    /// The event recording a deadline that has passed at `now`, if one has.
    fn overdue(&self, now: Timestamp) -> Option<SessionEvent> {
        match self {
            Self::Pending { opened }
            | Self::Scanned { opened, .. }
            | Self::Confirmed { opened, .. }
            | Self::SecondFactorVerified { opened, .. }
                if now >= opened.expires_at =>
            {
                Some(SessionEvent::Expired(SessionExpired { expired_at: now }))
            }
            Self::LoggedIn {
                ping_deadline: Some(deadline),
                ..
            } if now >= *deadline => Some(SessionEvent::LoggedOut(SessionLoggedOut {
                reason: LogoutReason::PingMissed,
                logged_out_at: now,
            })),
            _ => None,
        }
    }

    /// The opened facts of a session that is neither ended nor past its deadline.
    fn live(&self, now: Timestamp) -> Result<&SessionOpened, SessionError> {
        let status = self.status();
        let opened = self.opened().ok_or(SessionError::NotFound)?;
        if status.is_ended() {
            return Err(SessionError::Ended { status });
        }
        if self.overdue(now).is_some() {
            return Err(SessionError::Expired);
        }
        Ok(opened)
    }

    /// What a command that ends the session records regardless of the command: nothing when it
    /// has ended already, the passed deadline's outcome when one passed first. `None` when the
    /// command decides.
    fn already_ending(&self, now: Timestamp) -> Result<Option<Vec<SessionEvent>>, SessionError> {
        let status = self.status();
        if status == SessionStatus::NotOpened {
            return Err(SessionError::NotFound);
        }
        if status.is_ended() {
            return Ok(Some(Vec::new()));
        }
        Ok(self.overdue(now).map(|e| vec![e]))
    }

    fn wrong_state(&self, command: &'static str) -> SessionError {
        SessionError::WrongState {
            command,
            status: self.status(),
        }
    }

    fn decide_open(
        &self,
        cmd: OpenSession,
        push_to: Vec<AccountId>,
        now: Timestamp,
    ) -> Result<Vec<SessionEvent>, SessionError> {
        validate::in_range(
            "timeout_secs",
            cmd.timeout_secs,
            MIN_TIMEOUT_SECS,
            MAX_TIMEOUT_SECS,
        )?;
        validate::in_range("ping_time_secs", cmd.ping_time_secs, 0, MAX_PING_TIME_SECS)?;
        if let Some(info) = &cmd.announce_info {
            validate::multiline_text("announce_info", info, INFO_MAX_CHARS)?;
        }
        if let Some(info) = &cmd.session_info {
            validate::multiline_text("session_info", info, INFO_MAX_CHARS)?;
        }
        let Some(opened) = self.opened() else {
            return Ok(vec![SessionEvent::Opened(SessionOpened {
                session: cmd.session,
                ping_time_secs: cmd.ping_time_secs,
                timeout_secs: cmd.timeout_secs,
                expires_at: now.plus_secs(cmd.timeout_secs),
                app_login: cmd.app_login,
                user: cmd.user,
                announce_info: cmd.announce_info,
                session_info: cmd.session_info,
                push_to,
            })]);
        };
        let status = self.status();
        if status.is_ended() {
            return Err(SessionError::Ended { status });
        }
        if self.overdue(now).is_some() {
            return Err(SessionError::Expired);
        }
        // Everything the caller chose; `expires_at` is not, it follows from when it was opened.
        let same = opened.session == cmd.session
            && opened.ping_time_secs == cmd.ping_time_secs
            && opened.timeout_secs == cmd.timeout_secs
            && opened.app_login == cmd.app_login
            && opened.user == cmd.user
            && opened.announce_info == cmd.announce_info
            && opened.session_info == cmd.session_info
            && opened.push_to == push_to;
        if same {
            Ok(Vec::new())
        } else {
            Err(SessionError::AlreadyExists)
        }
    }

    fn decide_open_push(
        &self,
        cmd: OpenPushSession,
        now: Timestamp,
    ) -> Result<Vec<SessionEvent>, SessionError> {
        let count = u32::try_from(cmd.push_to.len()).unwrap_or(u32::MAX);
        validate::in_range("push_to", count, 1, MAX_PUSH_ACCOUNTS as u32)?;
        if cmd.open.user.is_none() {
            return Err(ValidationError::Empty { field: "user" }.into());
        }
        let mut push_to = cmd.push_to;
        push_to.sort_unstable();
        push_to.dedup();
        self.decide_open(cmd.open, push_to, now)
    }

    fn decide_provoke(
        &self,
        cmd: ProvokeSession,
        now: Timestamp,
    ) -> Result<Vec<SessionEvent>, SessionError> {
        validate::in_range(
            "timeout_secs",
            cmd.timeout_secs,
            MIN_TIMEOUT_SECS,
            MAX_TIMEOUT_SECS,
        )?;
        if let Some(info) = &cmd.announce_info {
            validate::multiline_text("announce_info", info, INFO_MAX_CHARS)?;
        }
        if let Some(info) = &cmd.session_info {
            validate::multiline_text("session_info", info, INFO_MAX_CHARS)?;
        }
        let (account_id, user) = match self {
            Self::NotOpened => return Err(SessionError::NotFound),
            Self::LoggedOut {
                account_id, user, ..
            }
            | Self::LoggedIn {
                account_id,
                user,
                ping_deadline: None,
                ..
            } => (*account_id, *user),
            Self::LoggedIn { .. } => return Err(self.wrong_state("provoke")),
            Self::Aborted { .. } | Self::Expired { .. } | Self::Failed { .. } => {
                return Err(SessionError::Ended {
                    status: self.status(),
                });
            }
            Self::Pending { opened } if opened.push_to.is_empty() => {
                return Err(SessionError::NotProvokable);
            }
            Self::Pending { .. }
            | Self::Scanned { .. }
            | Self::Confirmed { .. }
            | Self::SecondFactorVerified { .. } => {
                return Err(self.wrong_state("provoke"));
            }
        };
        Ok(vec![SessionEvent::Provoked(SessionProvoked {
            account_id,
            user,
            timeout_secs: cmd.timeout_secs,
            expires_at: now.plus_secs(cmd.timeout_secs),
            announce_info: cmd.announce_info,
            session_info: cmd.session_info,
            provoked_at: now,
        })])
    }

    fn decide_log_in(&self, cmd: LogIn, now: Timestamp) -> Result<Vec<SessionEvent>, SessionError> {
        let opened = self.live(now)?;
        if opened.user.is_some_and(|intended| intended != cmd.user) {
            return Err(SessionError::UserMismatch);
        }
        if !opened.push_to.is_empty() && !opened.push_to.contains(&cmd.account_id) {
            return Err(SessionError::AccountMismatch);
        }
        match self {
            Self::Confirmed { account_id, .. } | Self::SecondFactorVerified { account_id, .. }
                if *account_id != cmd.account_id =>
            {
                return Err(SessionError::AccountMismatch);
            }
            // An AppLogin always asks a second factor, proven on this very session.
            Self::Pending { .. } | Self::Scanned { .. } | Self::Confirmed { .. }
                if opened.app_login =>
            {
                return Err(self.wrong_state("an AppLogin's log in without a second factor"));
            }
            Self::Pending { .. }
            | Self::Scanned { .. }
            | Self::Confirmed { .. }
            | Self::SecondFactorVerified { .. } => {}
            Self::LoggedIn {
                account_id, user, ..
            } if *account_id == cmd.account_id && *user == cmd.user => return Ok(Vec::new()),
            _ => return Err(self.wrong_state("log in")),
        }
        let continuous = opened.ping_time_secs > 0;
        Ok(vec![SessionEvent::LoggedIn(SessionLoggedIn {
            account_id: cmd.account_id,
            user: cmd.user,
            continuous,
            ping_deadline: continuous.then(|| now.plus_secs(opened.ping_time_secs)),
        })])
    }
}

impl Aggregate for Session {
    type Command = SessionCommand;
    type Event = SessionEvent;
    type Error = SessionError;

    fn decide(
        &self,
        command: SessionCommand,
        ctx: &mut Context<'_>,
    ) -> Result<Vec<SessionEvent>, SessionError> {
        let now = ctx.now;
        match command {
            SessionCommand::Open(cmd) => self.decide_open(cmd, Vec::new(), now),
            SessionCommand::OpenPush(cmd) => self.decide_open_push(cmd, now),
            SessionCommand::OpenAppLogin(cmd) => {
                if cmd.open.user.is_none() {
                    return Err(ValidationError::Empty { field: "user" }.into());
                }
                let open = OpenSession {
                    app_login: true,
                    ..cmd.open
                };
                let confirm = ConfirmSession {
                    account_id: cmd.account_id,
                };
                let mut events = self.decide_open(open, Vec::new(), now)?;
                if events.is_empty() {
                    // Open already (a retry): confirming is then what is left to decide.
                    return self.decide(confirm.into(), ctx);
                }
                events.push(SessionEvent::Confirmed(SessionConfirmed {
                    account_id: confirm.account_id,
                }));
                Ok(events)
            }
            SessionCommand::Provoke(cmd) => self.decide_provoke(cmd, now),
            SessionCommand::Scan(ScanSession) => {
                self.live(now)?;
                match self {
                    Self::Pending { .. } => Ok(vec![SessionEvent::Scanned(SessionScanned {
                        scanned_at: now,
                    })]),
                    Self::Scanned { .. }
                    | Self::Confirmed { .. }
                    | Self::SecondFactorVerified { .. } => Ok(Vec::new()),
                    _ => Err(self.wrong_state("scan")),
                }
            }
            SessionCommand::Confirm(cmd) => {
                let opened = self.live(now)?;
                if !opened.push_to.is_empty() && !opened.push_to.contains(&cmd.account_id) {
                    return Err(SessionError::AccountMismatch);
                }
                match self {
                    Self::Pending { .. } | Self::Scanned { .. } => {
                        Ok(vec![SessionEvent::Confirmed(SessionConfirmed {
                            account_id: cmd.account_id,
                        })])
                    }
                    Self::Confirmed { account_id, .. }
                    | Self::SecondFactorVerified { account_id, .. } => {
                        if *account_id == cmd.account_id {
                            Ok(Vec::new())
                        } else {
                            Err(SessionError::AccountMismatch)
                        }
                    }
                    _ => Err(self.wrong_state("confirm")),
                }
            }
            SessionCommand::VerifySecondFactor(cmd) => {
                let opened = self.live(now)?;
                if opened.app_login && cmd.reused {
                    return Err(self.wrong_state("an AppLogin's reuse of a second factor"));
                }
                match self {
                    Self::Confirmed { .. } => Ok(vec![SessionEvent::SecondFactorVerified(
                        SessionSecondFactorVerified {
                            factor: cmd.factor,
                            attestation_hash: cmd.attestation_hash,
                            verified_at: cmd.verified_at,
                            reused: cmd.reused,
                        },
                    )]),
                    Self::SecondFactorVerified {
                        attestation_hash, ..
                    } if *attestation_hash == cmd.attestation_hash => Ok(Vec::new()),
                    _ => Err(self.wrong_state("verify a second factor")),
                }
            }
            SessionCommand::LogIn(cmd) => self.decide_log_in(cmd, now),
            SessionCommand::Ping(Ping) => {
                let opened = self.live(now)?;
                match self {
                    Self::LoggedIn {
                        ping_deadline: Some(_),
                        ..
                    } => Ok(vec![SessionEvent::Pinged(SessionPinged {
                        pinged_at: now,
                        ping_deadline: now.plus_secs(opened.ping_time_secs),
                    })]),
                    Self::LoggedIn {
                        ping_deadline: None,
                        ..
                    } => Err(SessionError::NotContinuous),
                    _ => Err(self.wrong_state("ping")),
                }
            }
            SessionCommand::LogOut(cmd) => {
                if let Some(events) = self.already_ending(now)? {
                    return Ok(events);
                }
                match self {
                    Self::LoggedIn { .. } => Ok(vec![SessionEvent::LoggedOut(SessionLoggedOut {
                        reason: cmd.reason,
                        logged_out_at: now,
                    })]),
                    _ => Err(self.wrong_state("log out")),
                }
            }
            SessionCommand::Abort(cmd) => {
                if let Some(events) = self.already_ending(now)? {
                    return Ok(events);
                }
                match self {
                    Self::LoggedIn { .. } => Err(self.wrong_state("abort")),
                    _ => Ok(vec![SessionEvent::Aborted(SessionAborted {
                        by: cmd.by,
                        aborted_at: now,
                    })]),
                }
            }
            SessionCommand::Fail(cmd) => {
                if let Some(events) = self.already_ending(now)? {
                    return Ok(events);
                }
                match self {
                    Self::LoggedIn { .. } => Err(self.wrong_state("fail")),
                    _ => Ok(vec![SessionEvent::Failed(SessionFailed {
                        reason: cmd.reason,
                        failed_at: now,
                    })]),
                }
            }
            SessionCommand::EndByServer(EndByServer) => {
                if let Some(events) = self.already_ending(now)? {
                    return Ok(events);
                }
                match self {
                    Self::LoggedIn { .. } => Ok(vec![SessionEvent::LoggedOut(SessionLoggedOut {
                        reason: LogoutReason::Server,
                        logged_out_at: now,
                    })]),
                    _ => Ok(vec![SessionEvent::Aborted(SessionAborted {
                        by: AbortedBy::Server,
                        aborted_at: now,
                    })]),
                }
            }
            SessionCommand::Expire(Expire) => {
                if matches!(self, Self::NotOpened) {
                    return Err(SessionError::NotFound);
                }
                Ok(self.overdue(now).into_iter().collect())
            }
        }
    }

    fn apply(&mut self, event: &SessionEvent) {
        use SessionEvent as E;
        let state = std::mem::take(self);
        *self = match (state, event) {
            (Self::NotOpened, E::Opened(e)) => Self::Pending { opened: e.clone() },
            (Self::Pending { opened }, E::Scanned(e)) => Self::Scanned {
                opened,
                scanned_at: e.scanned_at,
            },
            (Self::Pending { opened } | Self::Scanned { opened, .. }, E::Confirmed(e)) => {
                Self::Confirmed {
                    opened,
                    account_id: e.account_id,
                }
            }
            (Self::Confirmed { opened, account_id }, E::SecondFactorVerified(e)) => {
                Self::SecondFactorVerified {
                    opened,
                    account_id,
                    factor: e.factor,
                    attestation_hash: e.attestation_hash,
                }
            }
            (
                Self::Pending { opened }
                | Self::Scanned { opened, .. }
                | Self::Confirmed { opened, .. }
                | Self::SecondFactorVerified { opened, .. },
                E::LoggedIn(e),
            ) => Self::LoggedIn {
                opened,
                account_id: e.account_id,
                user: e.user,
                ping_deadline: e.ping_deadline,
            },
            (
                Self::LoggedIn {
                    opened,
                    account_id,
                    user,
                    ..
                },
                E::Pinged(e),
            ) => Self::LoggedIn {
                opened,
                account_id,
                user,
                ping_deadline: Some(e.ping_deadline),
            },
            (
                Self::LoggedIn {
                    opened,
                    account_id,
                    user,
                    ..
                },
                E::LoggedOut(e),
            ) => Self::LoggedOut {
                opened,
                reason: e.reason,
                account_id,
                user,
            },
            (Self::LoggedIn { opened, .. } | Self::LoggedOut { opened, .. }, E::Provoked(e)) => {
                Self::Pending {
                    opened: SessionOpened {
                        session: opened.session,
                        ping_time_secs: opened.ping_time_secs,
                        timeout_secs: e.timeout_secs,
                        expires_at: e.expires_at,
                        app_login: false,
                        user: Some(e.user),
                        announce_info: e.announce_info.clone(),
                        session_info: e.session_info.clone(),
                        push_to: vec![e.account_id],
                    },
                }
            }
            (
                Self::Pending { opened }
                | Self::Scanned { opened, .. }
                | Self::Confirmed { opened, .. }
                | Self::SecondFactorVerified { opened, .. },
                E::Aborted(e),
            ) => Self::Aborted { opened, by: e.by },
            (
                Self::Pending { opened }
                | Self::Scanned { opened, .. }
                | Self::Confirmed { opened, .. }
                | Self::SecondFactorVerified { opened, .. },
                E::Expired(_),
            ) => Self::Expired { opened },
            (
                Self::Pending { opened }
                | Self::Scanned { opened, .. }
                | Self::Confirmed { opened, .. }
                | Self::SecondFactorVerified { opened, .. },
                E::Failed(e),
            ) => Self::Failed {
                opened,
                reason: e.reason,
            },
            // An event that cannot follow the current state changes nothing (see `server`).
            (state, _) => state,
        };
    }
}
