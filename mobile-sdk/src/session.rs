//! One login or enrolment: the driver around the pure [`Machine`], and [`SessionHandle`],
//! what the app holds.
//!
//! The driver feeds inputs to the machine and performs the effects it answers: requests on
//! the session's connection (whose answers become the next inputs), history records,
//! callbacks, the ping task. Background tasks feed inputs too: the interaction timeout, the
//! pinger (a ping answered `ended` is [`Input::ServerEnded`]) and the notice watcher
//! (`session_ended` for this session's hsid; the connection closing under a live session is a
//! failure). The machine's lock is never held across an `.await`.
//!
//! The snapshot the app sees ([`SessionHandle::snapshot`], the `watch` behind
//! [`SessionHandle::wait_for`], [`Callbacks::on_state`]) changes when the machine's
//! `StateChanged` effect is performed, which comes after the requests of the same step: once
//! a test sees `Done`, the `abort` or `log_out` of that step has been answered. Within that
//! effect [`Callbacks::on_state`] is called first and the watch is published last, so an app
//! that waits on the snapshot and then reads what its callbacks recorded finds the change
//! there too (the CLI once missed a `done (logged out)` line that a notice's task had
//! published to the watch but not yet told the callbacks).
//!
//! The second factor the user gives is kept in the session only between
//! `set_pin_biometric` and the step that proves it (it is taken out, and dropped with the
//! session otherwise); a refusal the user must hear of comes back from that step as
//! [`SdkError::SecondFactor`] and becomes [`Input::SecondFactorRefused`].
//!
//! A login a push message asks for ([`start_pushed`]) is the same flow as a scanned login
//! code, at the account's server (its pinned gateway and key) with that one account eligible;
//! a second push for an hsid whose login still runs answers that session. The [`Registry`]
//! holds every session weakly, so a push saying the server ended a login
//! ([`ended_by_server`]) reaches its session as [`Input::ServerEnded`].
//!
//! An AppLogin (the app logging in to itself) is driven here too; what is its own (opening it
//! at the gateway, the web nonce, the inactivity timeout, `touch`) is in [`app_login`].
//!
//! The hsid and the enrolment token live in [`Secret`]s and never reach a log line.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use countersign_protocol::channel::StaticKey;
use countersign_protocol::device::{
    Answer, Blob, Bytes, ErrorCode, FailReason, Intent, Notice, RequestBody, Secret, ServerParams,
};
use countersign_protocol::qr::{QrKind, QrPayload};
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::callbacks::Callbacks;
use crate::client::{self, Connection, Target};
use crate::error::SdkError;
use crate::machine::{Effect, Input, LoginDetails, Machine, SessionKind, State};
use crate::model::{AccountInfo, HistoryEntry, SecondFactor, SessionSnapshot};
use crate::persisted::{AccountRecord, KeyBytes, ServerRecord};
use crate::sdk::{Inner, now_ms};
use crate::storage::StorageError;

#[path = "app_login.rs"]
pub(crate) mod app_login;

/// Reads a QR payload from raw bytes, a deep link or base64url text.
///
/// # Errors
/// [`SdkError::InvalidInput`] with the error of the form the input looks most like.
pub fn decode_input(input: &[u8]) -> Result<QrPayload, SdkError> {
    let binary = match QrPayload::decode(input) {
        Ok(payload) => return Ok(payload),
        Err(e) => e,
    };
    let Ok(text) = std::str::from_utf8(input) else {
        return Err(binary.into());
    };
    let text = text.trim();
    let looks_like_link = text
        .get(..countersign_protocol::qr::DEEP_LINK_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(countersign_protocol::qr::DEEP_LINK_PREFIX));
    if looks_like_link {
        return Ok(QrPayload::from_deep_link(text)?);
    }
    Ok(QrPayload::from_base64url(text)?)
}

/// A session, as the app holds it. Cheap to clone.
#[derive(Clone)]
pub struct SessionHandle {
    session: Arc<Session>,
}

impl fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionHandle")
            .field("session_id", &self.session.id)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl SessionHandle {
    /// The session as last published.
    #[must_use]
    pub fn snapshot(&self) -> SessionSnapshot {
        self.session.watch.borrow().clone()
    }

    /// The local session id (as in the history).
    #[must_use]
    pub fn session_id(&self) -> &str {
        &self.session.id
    }

    /// The state.
    #[must_use]
    pub fn state(&self) -> State {
        self.session.watch.borrow().state
    }

    /// The history status, once there is one.
    #[must_use]
    pub fn history_status(&self) -> Option<crate::machine::HistoryStatus> {
        self.session.watch.borrow().history_status
    }

    /// Whether this is an enrolment.
    #[must_use]
    pub fn is_enrolment(&self) -> bool {
        self.session.kind == SessionKind::Enrolment
    }

    /// Shown to the user while confirming.
    #[must_use]
    pub fn announce_info(&self) -> Option<String> {
        self.session.watch.borrow().announce_info.clone()
    }

    /// Shown to the user once logged in.
    #[must_use]
    pub fn session_info(&self) -> Option<String> {
        self.session.watch.borrow().session_info.clone()
    }

    /// The accounts the user may pick for this login (none for an enrolment).
    ///
    /// # Errors
    /// [`SdkError::Storage`] if the state lock is poisoned.
    pub fn eligible_accounts(&self) -> Result<Vec<AccountInfo>, SdkError> {
        let ids = self.session.core()?.eligible.clone();
        self.session.sdk.read(|s| {
            ids.iter()
                .filter_map(|id| s.accounts.get(id).map(|a| s.account_info(a)))
                .collect()
        })
    }

    /// The user picked an account (`None`: the first eligible one; for an enrolment, always
    /// `None`: accept it). Answers once the step is over (logged in, enrolled, or waiting
    /// for a second factor).
    ///
    /// # Errors
    /// [`SdkError::InvalidState`] outside `WaitForConfirmation`; [`SdkError::UnknownAccount`]
    /// for an account that may not log in here; else what made the session fail.
    pub async fn set_account(&self, account_id: Option<&str>) -> Result<(), SdkError> {
        let chosen = match (self.session.kind, account_id) {
            (SessionKind::Enrolment, None) => None,
            (SessionKind::Enrolment, Some(_)) => return Err(SdkError::UnknownAccount),
            (SessionKind::Login, None) => None,
            (SessionKind::Login, Some(id)) => {
                if !self.session.core()?.eligible.iter().any(|e| e == id) {
                    return Err(SdkError::UnknownAccount);
                }
                Some(id.to_owned())
            }
            // No confirmation step: the machine refuses it.
            (SessionKind::AppLogin, _) => None,
        };
        self.session
            .drive_with(Input::AccountSet, None, move |core| {
                if let Some(id) = chosen {
                    core.chosen = Some(id);
                }
            })
            .await
    }

    /// Accepts an enrolment: `set_account(None)`.
    ///
    /// # Errors
    /// As [`set_account`](Self::set_account).
    pub async fn confirm_enrol(&self) -> Result<(), SdkError> {
        self.set_account(None).await
    }

    /// The user's second factor. A login has the SFS attest it for the session's challenge
    /// and hands the attestation to the gateway, then logs in; an enrolment gives the new
    /// account the factor (registering the PIN at the SFS first if this app instance has
    /// none yet). Answers once the step is over; every outcome is also told to
    /// [`Callbacks::on_second_factor`].
    ///
    /// # Errors
    /// [`SdkError::InvalidState`] outside `WaitForSecondFactor` (or while a factor is being
    /// checked); [`SdkError::SecondFactorUnavailable`] without an SFS;
    /// [`SdkError::SecondFactor`] when the factor is refused: after a wrong PIN, a failed
    /// biometric check or a factor not registered the session still waits (try again, or
    /// `input_cancel`), after `locked` or `revoked` it is in `Error`; else what made the
    /// session fail.
    pub async fn set_pin_biometric(&self, factor: SecondFactor) -> Result<(), SdkError> {
        if self.session.sdk.config.sfs.is_none() {
            let state = self.session.core()?.machine.state();
            if state != State::UserInteraction(crate::machine::Interaction::WaitForSecondFactor) {
                return Err(SdkError::InvalidState {
                    state,
                    action: "set_pin_biometric",
                });
            }
            return Err(SdkError::SecondFactorUnavailable);
        }
        self.session
            .drive_with(Input::SecondFactorEntered, None, move |core| {
                core.pending_factor = Some(factor);
            })
            .await
    }

    /// The user declined to give a second factor: the session is aborted.
    ///
    /// # Errors
    /// [`SdkError::InvalidState`] outside `WaitForSecondFactor`.
    pub async fn input_cancel(&self) -> Result<(), SdkError> {
        self.session.drive(Input::InputCancel, None).await
    }

    /// Stops the session: `abort` before login, `log_out` once Active.
    ///
    /// # Errors
    /// [`SdkError::InvalidState`] once Done or Error.
    pub async fn stop_session(&self) -> Result<(), SdkError> {
        self.session.drive(Input::Stop, None).await
    }

    /// Waits for the next published change; answers the snapshot after it.
    pub async fn changed(&self) -> SessionSnapshot {
        let mut rx = self.session.watch.subscribe();
        // The sender lives as long as the session, which this handle keeps alive.
        let _ = rx.changed().await;
        rx.borrow().clone()
    }

    /// Waits until the published snapshot satisfies `pred` (checked at once first).
    pub async fn wait_for(&self, pred: impl Fn(&SessionSnapshot) -> bool) -> SessionSnapshot {
        let mut rx = self.session.watch.subscribe();
        if let Ok(snapshot) = rx.wait_for(|s| pred(s)).await {
            return snapshot.clone();
        }
        rx.borrow().clone()
    }
}

/// Runs a session's `Starting` phase; see [`crate::Sdk::start_session`].
pub(crate) async fn start(
    sdk: Arc<Inner>,
    input: &[u8],
    callbacks: Arc<dyn Callbacks>,
) -> Result<SessionHandle, SdkError> {
    let payload = decode_input(input)?;
    let kind = match payload.kind {
        QrKind::Login => SessionKind::Login,
        QrKind::Enrolment => SessionKind::Enrolment,
        QrKind::Transaction => {
            return Err(SdkError::InvalidTransaction(
                "this code asks to approve a transaction: use transaction_from_input".into(),
            ));
        }
    };
    let origin = Origin {
        kind,
        server_id: payload.server_id,
        token: Secret::new(payload.token),
        gateway: payload.gateway.clone(),
        fingerprint: payload.server_key_fingerprint,
        preselected: None,
        app_login: None,
    };
    begin(sdk, origin, callbacks).await
}

/// Runs the `Starting` phase of a login a push message asked for: the same flow as a
/// scanned login code for `hsid` at the account's server (its pinned gateway and key), with
/// `account_id` the one account to log in with. A login for the same hsid that is still
/// running is answered instead of starting a second one.
pub(crate) async fn start_pushed(
    sdk: Arc<Inner>,
    account_id: &str,
    hsid: [u8; 32],
    callbacks: Arc<dyn Callbacks>,
) -> Result<SessionHandle, SdkError> {
    if let Some(session) = sdk.sessions.running_login(&hsid)? {
        tracing::info!(session_id = %session.id, "push login for a session already running");
        return Ok(SessionHandle { session });
    }
    let server = sdk
        .read(|s| {
            s.accounts
                .get(account_id)
                .and_then(|a| s.servers.get(&a.server_id))
                .cloned()
        })?
        .ok_or(SdkError::UnknownAccount)?;
    let origin = Origin {
        kind: SessionKind::Login,
        server_id: crate::sdk::parse_id(&server.server_id)?,
        token: Secret::new(hsid),
        gateway: server.gateway.clone(),
        fingerprint: crate::sdk::parse_id(&server.fingerprint)?,
        preselected: Some(account_id.to_owned()),
        app_login: None,
    };
    begin(sdk, origin, callbacks).await
}

/// The server ended the login of `hsid` (a push said it was withdrawn or logged out): the
/// running session, if any, ends as [`Input::ServerEnded`] makes it (Aborted before login,
/// LoggedOut once Active). Answers its session id.
pub(crate) async fn ended_by_server(
    sdk: &Inner,
    hsid: &[u8; 32],
) -> Result<Option<String>, SdkError> {
    let Some(session) = sdk.sessions.running_login(hsid)? else {
        return Ok(None);
    };
    tracing::info!(session_id = %session.id, "a push ended the session");
    if let Err(e) = session.drive(Input::ServerEnded, None).await {
        // Another input ended it first (a notice, the user): it is over either way.
        tracing::debug!(session_id = %session.id, error = %e, "session already ending");
    }
    Ok(Some(session.id.clone()))
}

/// Where a session comes from: a scanned code, or a push message.
struct Origin {
    kind: SessionKind,
    server_id: [u8; 16],
    token: Secret<32>,
    gateway: String,
    fingerprint: [u8; 32],
    /// A pushed login: the one account that may log in.
    preselected: Option<String>,
    /// An AppLogin: the session the gateway opened, on its connection.
    app_login: Option<app_login::Opened>,
}

/// The sessions of this SDK still referenced somewhere, so a push can find the login of an
/// hsid. Holds them weakly: a session nobody holds and no task drives is gone.
#[derive(Default)]
pub(crate) struct Registry {
    sessions: Mutex<Vec<std::sync::Weak<Session>>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    fn lock(&self) -> Result<MutexGuard<'_, Vec<std::sync::Weak<Session>>>, SdkError> {
        self.sessions
            .lock()
            .map_err(|_| SdkError::Storage(StorageError::Io("session registry poisoned".into())))
    }

    fn insert(&self, session: &Arc<Session>) -> Result<(), SdkError> {
        let mut sessions = self.lock()?;
        sessions.retain(|s| s.strong_count() > 0);
        sessions.push(Arc::downgrade(session));
        Ok(())
    }

    /// The login of `hsid` that is not over yet.
    fn running_login(&self, hsid: &[u8; 32]) -> Result<Option<Arc<Session>>, SdkError> {
        Ok(self
            .lock()?
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .find(|s| {
                matches!(s.kind, SessionKind::Login | SessionKind::AppLogin)
                    && s.token.expose() == hsid
                    && !s.watch.borrow().state.is_final()
            }))
    }
}

async fn begin(
    sdk: Arc<Inner>,
    origin: Origin,
    callbacks: Arc<dyn Callbacks>,
) -> Result<SessionHandle, SdkError> {
    let kind = origin.kind;
    let opened = origin.app_login;
    let id = hex::encode(crate::random::bytes::<16>()?);
    let machine = Machine::new(kind, sdk.config.skip_single_account_confirmation);
    let core = Core {
        machine,
        server_name: None,
        account_id: None,
        chosen: None,
        announce_info: None,
        session_info: None,
        ping_time_secs: None,
        error: None,
        eligible: Vec::new(),
        connection: None,
        generation: 0,
        pinger: None,
        enrolment: None,
        pending_factor: None,
        account_channel: false,
        web_nonce: None,
        last_activity_ms: 0,
    };
    let (watch, _) = watch::channel(snapshot_of(&id, kind, &origin.server_id, &core));
    let session = Arc::new(Session {
        sdk,
        callbacks,
        id,
        kind,
        server_id: origin.server_id,
        token: origin.token,
        gateway: origin.gateway,
        fingerprint: origin.fingerprint,
        preselected: origin.preselected,
        core: Mutex::new(core),
        watch,
    });
    session.sdk.sessions.insert(&session)?;
    tracing::info!(session_id = %session.id, server_id = %hex::encode(session.server_id), ?kind, pushed = session.preselected.is_some(), "session starting");
    tokio::spawn(interaction_timeout(
        Arc::clone(&session),
        session.sdk.config.interaction_timeout,
    ));
    let started = match kind {
        SessionKind::Login => session.start_login().await,
        SessionKind::Enrolment => session.start_enrolment().await,
        SessionKind::AppLogin => session.start_app_login(opened).await,
    };
    match started {
        Ok(()) => Ok(SessionHandle { session }),
        Err(e) => {
            // A failure before the machine knew it: record it (refused if already final).
            let _ = session.drive(Input::Failed, Some(e.clone())).await;
            Err(e)
        }
    }
}

/// What an enrolment keeps between its steps.
struct Enrolment {
    channel_key: StaticKey,
    signing_key: StaticKey,
    public_key: Vec<u8>,
    params: ServerParams,
}

/// The mutable part of a session.
struct Core {
    machine: Machine,
    server_name: Option<String>,
    /// The account the connection speaks as (login), or the enrolled one.
    account_id: Option<String>,
    /// The account the user picked, if not the connected one.
    chosen: Option<String>,
    announce_info: Option<String>,
    session_info: Option<String>,
    ping_time_secs: Option<u32>,
    error: Option<SdkError>,
    eligible: Vec<String>,
    connection: Option<Connection>,
    /// Bumped when the connection is replaced, so an old connection closing is no failure.
    generation: u64,
    pinger: Option<JoinHandle<()>>,
    enrolment: Option<Enrolment>,
    /// The factor the user gave, until the step that proves it takes it.
    pending_factor: Option<SecondFactor>,
    /// The connection speaks as `account_id` (an enrolment's starts as a guest).
    account_channel: bool,
    /// An AppLogin's web nonce (shown in the snapshot while Active).
    web_nonce: Option<app_login::WebNonce>,
    /// An AppLogin's last activity by the device's clock, milliseconds since the epoch.
    last_activity_ms: i64,
}

struct Session {
    sdk: Arc<Inner>,
    callbacks: Arc<dyn Callbacks>,
    id: String,
    kind: SessionKind,
    server_id: [u8; 16],
    /// The hsid (login) or enrolment token.
    token: Secret<32>,
    gateway: String,
    fingerprint: [u8; 32],
    /// A pushed login: the one account that may log in.
    preselected: Option<String>,
    core: Mutex<Core>,
    watch: watch::Sender<SessionSnapshot>,
}

fn snapshot_of(id: &str, kind: SessionKind, server_id: &[u8; 16], core: &Core) -> SessionSnapshot {
    SessionSnapshot {
        session_id: id.to_owned(),
        kind,
        state: core.machine.state(),
        history_status: core.machine.history(),
        server_id: hex::encode(server_id),
        server_name: core.server_name.clone(),
        account_id: core.account_id.clone(),
        announce_info: core.announce_info.clone(),
        session_info: core.session_info.clone(),
        ping_time_secs: core.ping_time_secs,
        error: core.error.clone(),
        web_nonce: core
            .web_nonce
            .clone()
            .filter(|_| core.machine.state() == State::Active),
    }
}

fn unexpected(request: &str) -> SdkError {
    SdkError::Transport(format!("unexpected answer to {request}"))
}

impl Session {
    fn core(&self) -> Result<MutexGuard<'_, Core>, SdkError> {
        self.core
            .lock()
            .map_err(|_| SdkError::Storage(StorageError::Io("session lock poisoned".into())))
    }

    fn hsid(&self) -> Bytes<32> {
        Bytes(*self.token.expose())
    }

    fn snapshot(&self) -> Result<SessionSnapshot, SdkError> {
        let core = self.core()?;
        Ok(snapshot_of(&self.id, self.kind, &self.server_id, &core))
    }

    fn server_hex(&self) -> String {
        hex::encode(self.server_id)
    }

    /// Installs a connection (replacing any) and watches its notices.
    fn attach(
        self: &Arc<Self>,
        connection: Connection,
        notices: mpsc::UnboundedReceiver<Notice>,
    ) -> Result<(), SdkError> {
        let generation = {
            let mut core = self.core()?;
            core.generation += 1;
            core.server_name = Some(connection.params().name.clone());
            core.connection = Some(connection);
            core.generation
        };
        tokio::spawn(watch_notices(Arc::clone(self), notices, generation));
        Ok(())
    }

    fn connection(&self) -> Result<Connection, SdkError> {
        self.core()?
            .connection
            .clone()
            .ok_or_else(|| SdkError::Transport("the session has no connection".into()))
    }

    async fn start_login(self: &Arc<Self>) -> Result<(), SdkError> {
        let server_hex = self.server_hex();
        let (mut accounts, server) = self.sdk.read(|s| {
            (
                s.accounts_at(&server_hex),
                s.servers.get(&server_hex).cloned(),
            )
        })?;
        if let Some(preselected) = &self.preselected {
            accounts.retain(|a| &a.account_id == preselected);
        }
        let server = match server {
            Some(server) if !accounts.is_empty() => server,
            _ => return self.no_accounts().await,
        };
        if server.fingerprint != hex::encode(self.fingerprint) {
            tracing::warn!(session_id = %self.id, "login QR pins another key than the one enrolled");
            return Err(SdkError::FingerprintMismatch);
        }
        let mut connected = None;
        let mut eligible = Vec::new();
        for account in &accounts {
            if connected.is_none() {
                match self
                    .sdk
                    .connect_account(
                        &account.account_id,
                        Some(&self.gateway),
                        self.callbacks.as_ref(),
                    )
                    .await
                {
                    Ok(open) => connected = Some((account.account_id.clone(), open)),
                    // Forgotten already; try the next one.
                    Err(SdkError::Refused(
                        countersign_protocol::device::Refusal::AccountDeleted,
                    )) => continue,
                    Err(e) => return Err(e),
                }
            }
            eligible.push(account.account_id.clone());
        }
        let Some((account_id, (connection, notices))) = connected else {
            return self.no_accounts().await;
        };
        self.attach(connection.clone(), notices)?;
        {
            let mut core = self.core()?;
            core.account_id = Some(account_id);
            core.account_channel = true;
            core.eligible.clone_from(&eligible);
        }
        let details = match connection
            .request(RequestBody::Scan { hsid: self.hsid() })
            .await?
        {
            Answer::Session(details) => details,
            _ => return Err(unexpected("scan")),
        };
        {
            let mut core = self.core()?;
            core.announce_info.clone_from(&details.announce_info);
            core.ping_time_secs = Some(details.ping_time_secs);
        }
        self.drive(
            Input::LoginDetails(LoginDetails {
                eligible_accounts: eligible.len(),
                second_factor_required: details.second_factor_required,
                ping_time_secs: details.ping_time_secs,
            }),
            None,
        )
        .await
    }

    /// No account for this server: tell the gateway on a guest channel (best effort), end
    /// in Error.
    async fn no_accounts(self: &Arc<Self>) -> Result<(), SdkError> {
        let timeout = self.sdk.config.request_timeout;
        let guest = async {
            let public_key = client::fetch_server_key(
                &self.sdk.http,
                &self.gateway,
                &self.server_id,
                &self.fingerprint,
                timeout,
            )
            .await?;
            let target = Target {
                server_id: self.server_id,
                gateway: self.gateway.clone(),
                public_key,
            };
            client::connect(&target, &crate::random::p256_key()?, Intent::Guest, timeout).await
        };
        match guest.await {
            Ok((connection, notices)) => self.attach(connection, notices)?,
            Err(e) => tracing::debug!(error = %e, "no guest channel to report no_accounts"),
        }
        self.drive(Input::NoAccounts, Some(SdkError::NoAccounts))
            .await?;
        Err(SdkError::NoAccounts)
    }

    async fn start_enrolment(self: &Arc<Self>) -> Result<(), SdkError> {
        let server_hex = self.server_hex();
        let pinned = self
            .sdk
            .read(|s| s.servers.get(&server_hex).map(|r| r.fingerprint.clone()))?;
        if pinned.is_some_and(|p| p != hex::encode(self.fingerprint)) {
            // A server id stays bound to the key first pinned for it.
            return Err(SdkError::FingerprintMismatch);
        }
        let public_key = client::fetch_server_key(
            &self.sdk.http,
            &self.gateway,
            &self.server_id,
            &self.fingerprint,
            self.sdk.config.request_timeout,
        )
        .await?;
        let channel_key = crate::random::p256_key()?;
        let signing_key = crate::random::p256_key()?;
        let target = Target {
            server_id: self.server_id,
            gateway: self.gateway.clone(),
            public_key: public_key.clone(),
        };
        let (connection, notices) = client::connect(
            &target,
            &channel_key,
            Intent::Guest,
            self.sdk.config.request_timeout,
        )
        .await?;
        let params = connection.params().clone();
        self.attach(connection, notices)?;
        self.core()?.enrolment = Some(Enrolment {
            channel_key,
            signing_key,
            public_key,
            params,
        });
        self.drive(Input::EnrolmentDetails, None).await
    }

    /// Feeds `input` and everything its effects lead to. Answers the refusal of `input`
    /// itself, or the first failure of a request it led to.
    async fn drive(
        self: &Arc<Self>,
        input: Input,
        error: Option<SdkError>,
    ) -> Result<(), SdkError> {
        self.drive_with(input, error, |_| {}).await
    }

    /// As [`drive`](Self::drive), running `accepted` on the core in the same lock when the
    /// machine accepts `input`. Boxed: effects spawn tasks that drive again, and the
    /// compiler cannot prove such a cycle of futures `Send` without a named type.
    fn drive_with<'a>(
        self: &'a Arc<Self>,
        input: Input,
        error: Option<SdkError>,
        accepted: impl FnOnce(&mut Core) + Send + 'a,
    ) -> BoxFuture<'a, Result<(), SdkError>> {
        Box::pin(self.drive_inner(input, error, accepted))
    }

    async fn drive_inner(
        self: &Arc<Self>,
        input: Input,
        error: Option<SdkError>,
        accepted: impl FnOnce(&mut Core),
    ) -> Result<(), SdkError> {
        let mut effects: VecDeque<Effect> = self.apply(input, error, accepted)?.into();
        let mut failure = None;
        while let Some(effect) = effects.pop_front() {
            let next = match self.perform(effect).await {
                Ok(None) => continue,
                Ok(Some(next)) => (next, None),
                Err(SdkError::SecondFactor(event)) => {
                    tracing::info!(session_id = %self.id, ?event, "second factor refused");
                    let refused = SdkError::SecondFactor(event);
                    failure.get_or_insert_with(|| refused.clone());
                    (Input::SecondFactorRefused(event), Some(refused))
                }
                Err(e) => {
                    tracing::info!(session_id = %self.id, error = %e, "session step failed");
                    failure.get_or_insert_with(|| e.clone());
                    (Input::Failed, Some(e))
                }
            };
            match self.apply(next.0, next.1, |_| {}) {
                Ok(more) => effects.extend(more),
                // Another input won the race (a stop, a timeout): that one decided.
                Err(e) => tracing::debug!(session_id = %self.id, error = %e, "late input refused"),
            }
        }
        failure.map_or(Ok(()), Err)
    }

    fn apply(
        &self,
        input: Input,
        error: Option<SdkError>,
        accepted: impl FnOnce(&mut Core),
    ) -> Result<Vec<Effect>, SdkError> {
        let mut core = self.core()?;
        let effects = core.machine.apply(input)?;
        // The snapshot's error says why the session is in Error; a refusal the user may
        // retry after is no such reason.
        if let Some(error) = error
            && core.machine.state() == State::Error
        {
            core.error.get_or_insert(error);
        }
        accepted(&mut core);
        tracing::debug!(session_id = %self.id, input = input.name(), state = ?core.machine.state(), "transition");
        Ok(effects)
    }

    /// Performs one effect; answers the input its answer makes, if any.
    async fn perform(self: &Arc<Self>, effect: Effect) -> Result<Option<Input>, SdkError> {
        match effect {
            Effect::StateChanged(_) => {
                let snapshot = self.snapshot()?;
                // Published last: whoever sees the change in the watch (`wait_for`, another
                // thread) finds `on_state` told of it and a final state's cleanup done, even
                // when a background task (a notice, the pinger) made the change.
                self.callbacks.on_state(&snapshot);
                if snapshot.state.is_final() {
                    let mut core = self.core()?;
                    core.connection = None;
                    core.generation += 1;
                    stop_pinger(&mut core);
                    core.enrolment = None;
                    core.pending_factor = None;
                    core.web_nonce = None;
                }
                self.watch.send_replace(snapshot);
                Ok(None)
            }
            Effect::AskConfirmLogin => {
                let snapshot = self.snapshot()?;
                let accounts = SessionHandle {
                    session: Arc::clone(self),
                }
                .eligible_accounts()?;
                self.callbacks.confirm_login(&snapshot, &accounts);
                Ok(None)
            }
            Effect::AskConfirmEnrol => {
                let snapshot = self.snapshot()?;
                let server = self
                    .core()?
                    .enrolment
                    .as_ref()
                    .map(|e| ServerRecord::new(&e.params, &e.public_key, &self.gateway).info());
                if let Some(server) = server {
                    self.callbacks.confirm_enrol(&snapshot, &server);
                }
                Ok(None)
            }
            Effect::AskSecondFactor => {
                self.callbacks.second_factor_needed(&self.snapshot()?);
                Ok(None)
            }
            Effect::TellSecondFactor(event) => {
                self.callbacks.on_second_factor(&self.snapshot()?, &event);
                Ok(None)
            }
            Effect::SendSecondFactor => self
                .prove_second_factor()
                .await
                .map(|()| Some(Input::SecondFactorGiven)),
            Effect::SendConfirm => {
                let connection = self.switch_account_if_chosen().await?;
                match connection
                    .request(RequestBody::Confirm { hsid: self.hsid() })
                    .await?
                {
                    Answer::Done => Ok(Some(Input::Confirmed)),
                    _ => Err(unexpected("confirm")),
                }
            }
            Effect::SendLogIn => {
                let connection = self.connection()?;
                match connection
                    .request(RequestBody::LogIn { hsid: self.hsid() })
                    .await?
                {
                    Answer::LoggedIn {
                        session_info,
                        ping_time_secs,
                    } => {
                        let mut core = self.core()?;
                        core.session_info = session_info;
                        core.ping_time_secs = Some(ping_time_secs);
                        Ok(Some(Input::LoggedIn { ping_time_secs }))
                    }
                    _ => Err(unexpected("log_in")),
                }
            }
            Effect::SendEnrol => self.enrol().await.map(Some),
            Effect::SendAbort => {
                self.best_effort(RequestBody::Abort { hsid: self.hsid() })
                    .await;
                Ok(None)
            }
            Effect::SendLogOut => {
                self.best_effort(RequestBody::LogOut { hsid: self.hsid() })
                    .await;
                Ok(None)
            }
            Effect::SendFailNoAccounts => {
                self.best_effort(RequestBody::Fail {
                    hsid: self.hsid(),
                    reason: FailReason::NoAccounts,
                })
                .await;
                Ok(None)
            }
            Effect::StartPinging { every_secs } => {
                let task = tokio::spawn(ping(
                    Arc::clone(self),
                    Duration::from_secs(every_secs.into()),
                ));
                {
                    let mut core = self.core()?;
                    stop_pinger(&mut core);
                    core.pinger = Some(task);
                }
                if self.kind == SessionKind::AppLogin {
                    self.app_login_active()?;
                }
                Ok(None)
            }
            Effect::StopPinging => {
                stop_pinger(&mut *self.core()?);
                Ok(None)
            }
            Effect::RecordHistory(status) => {
                let entry = {
                    let core = self.core()?;
                    HistoryEntry {
                        session_id: self.id.clone(),
                        server_id: self.server_hex(),
                        account_id: core.account_id.clone(),
                        kind: self.kind,
                        status,
                        announce_info: core.announce_info.clone(),
                        at_ms: now_ms(),
                    }
                };
                // History is a record for the user; failing to store it must not fail
                // the session.
                if let Err(e) = self.sdk.write(|s| s.record(entry.clone())) {
                    tracing::warn!(session_id = %self.id, error = %e, "history not stored");
                }
                self.callbacks.on_history(&entry);
                Ok(None)
            }
        }
    }

    async fn best_effort(&self, body: RequestBody) {
        let Ok(connection) = self.connection() else {
            return;
        };
        if let Err(e) = connection.request(body).await {
            tracing::debug!(session_id = %self.id, error = %e, "best-effort request failed");
        }
    }

    /// The connection to confirm on: the user's chosen account, reconnecting and scanning
    /// again as that account if it is not the one connected.
    async fn switch_account_if_chosen(self: &Arc<Self>) -> Result<Connection, SdkError> {
        let (chosen, current) = {
            let core = self.core()?;
            (core.chosen.clone(), core.account_id.clone())
        };
        match chosen {
            Some(chosen) if Some(&chosen) != current.as_ref() => {
                let (connection, notices) = self
                    .sdk
                    .connect_account(&chosen, Some(&self.gateway), self.callbacks.as_ref())
                    .await?;
                self.attach(connection.clone(), notices)?;
                {
                    let mut core = self.core()?;
                    core.account_id = Some(chosen);
                    core.account_channel = true;
                }
                match connection
                    .request(RequestBody::Scan { hsid: self.hsid() })
                    .await?
                {
                    Answer::Session(_) => Ok(connection),
                    _ => Err(unexpected("scan")),
                }
            }
            _ => self.connection(),
        }
    }

    /// Proves the factor the user gave: for a login, on the session's connection
    /// (`challenge`, the SFS, `verify_second_factor`); for an enrolment, on a connection as
    /// the new account (`challenge`, the SFS, `upgrade_account`).
    async fn prove_second_factor(self: &Arc<Self>) -> Result<(), SdkError> {
        let (factor, account_id) = {
            let mut core = self.core()?;
            (core.pending_factor.take(), core.account_id.clone())
        };
        let factor =
            factor.ok_or_else(|| SdkError::Transport("no second factor was given".into()))?;
        let account_id = account_id.ok_or(SdkError::UnknownAccount)?;
        match self.kind {
            SessionKind::Login | SessionKind::AppLogin => {
                let connection = self.connection()?;
                crate::second_factor::verify_login(
                    &self.sdk,
                    &connection,
                    &account_id,
                    self.hsid(),
                    &factor,
                )
                .await
            }
            SessionKind::Enrolment => {
                let connection = self.account_connection(&account_id).await?;
                crate::second_factor::upgrade(&self.sdk, &connection, &account_id, &factor).await
            }
        }
    }

    /// The connection as `account_id`: the current one, or a new one replacing a guest's.
    async fn account_connection(
        self: &Arc<Self>,
        account_id: &str,
    ) -> Result<Connection, SdkError> {
        if self.core()?.account_channel {
            return self.connection();
        }
        let (connection, notices) = self
            .sdk
            .connect_account(account_id, Some(&self.gateway), self.callbacks.as_ref())
            .await?;
        self.attach(connection.clone(), notices)?;
        self.core()?.account_channel = true;
        Ok(connection)
    }

    /// Sends `enrol`, then stores the server and the new account.
    async fn enrol(self: &Arc<Self>) -> Result<Input, SdkError> {
        let connection = self.connection()?;
        let (signing_public_key, app_instance) = {
            let core = self.core()?;
            let enrolment = core
                .enrolment
                .as_ref()
                .ok_or_else(|| SdkError::Transport("the enrolment was not prepared".into()))?;
            let public = enrolment
                .signing_key
                .public_key()
                .map_err(|e| SdkError::Transport(e.to_string()))?;
            (public, self.sdk.read(|s| s.app_instance())??)
        };
        let answer = connection
            .request(RequestBody::Enrol {
                token: Secret::new(*self.token.expose()),
                signing_public_key: Blob(signing_public_key),
                app_instance: Bytes(app_instance),
            })
            .await?;
        let Answer::Enrolled { account_id, userid } = answer else {
            return Err(unexpected("enrol"));
        };
        let account_hex = hex::encode(account_id.0);
        let (server, params, account) = {
            let core = self.core()?;
            let enrolment = core
                .enrolment
                .as_ref()
                .ok_or_else(|| SdkError::Transport("the enrolment was not prepared".into()))?;
            (
                ServerRecord::new(&enrolment.params, &enrolment.public_key, &self.gateway),
                enrolment.params.clone(),
                AccountRecord {
                    account_id: account_hex.clone(),
                    server_id: self.server_hex(),
                    userid,
                    channel_key: KeyBytes::from_key(&enrolment.channel_key),
                    signing_key: KeyBytes::from_key(&enrolment.signing_key),
                    created_at_ms: now_ms(),
                    second_factor: false,
                    push_key: Some(crate::push::new_push_key()?),
                    push_registered: None,
                },
            )
        };
        self.sdk.write(|s| {
            s.servers
                .entry(server.server_id.clone())
                .and_modify(|r| r.refresh(&params))
                .or_insert_with(|| server.clone());
            s.accounts.insert(account.account_id.clone(), account);
        })?;
        tracing::info!(session_id = %self.id, account_id = %account_hex, "enrolled");
        // Push is registered: the new account's server gets the mailbox and its push key
        // now. A failure does not fail the enrolment (the next `register_push` retries).
        if let Err(e) = crate::push::register_account_if_registered(&self.sdk, &account_hex).await {
            tracing::warn!(session_id = %self.id, error = %e, "push not registered for the new account");
        }
        self.core()?.account_id = Some(account_hex);
        // The server asks a second factor and the app has an SFS: give the account one now.
        if self.sdk.config.sfs.is_some() && params.second_factor != "none" {
            return Ok(Input::EnrolledNeedsSecondFactor);
        }
        Ok(Input::Enrolled)
    }
}

/// Aborts the ping task, unless it is the caller (it ends by itself after this step).
fn stop_pinger(core: &mut Core) {
    if let Some(task) = core.pinger.take()
        && tokio::task::try_id() != Some(task.id())
    {
        task.abort();
    }
}

/// Pings while Active; a ping answered `ended` ends the session, a lost connection fails it.
/// A ping that times out is tried again next time: the server allows one late ping.
async fn ping(session: Arc<Session>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        if session.watch.borrow().state != State::Active {
            return;
        }
        // An AppLogin the app left idle past its inactivity timeout ends instead of pinging.
        let idle = session.kind == SessionKind::AppLogin
            && session.end_if_inactive().await.unwrap_or(true);
        if idle {
            return;
        }
        let Ok(connection) = session.connection() else {
            return;
        };
        match connection
            .request(RequestBody::Ping {
                hsid: session.hsid(),
            })
            .await
        {
            Ok(_) => {}
            Err(SdkError::Timeout) => tracing::debug!(session_id = %session.id, "ping timed out"),
            Err(SdkError::Server(e)) if e.code == ErrorCode::Ended => {
                let _ = session.drive(Input::ServerEnded, None).await;
                return;
            }
            Err(e) => {
                let _ = session.drive(Input::Failed, Some(e)).await;
                return;
            }
        }
    }
}

/// Routes one connection's notices to the session.
async fn watch_notices(
    session: Arc<Session>,
    mut notices: mpsc::UnboundedReceiver<Notice>,
    generation: u64,
) {
    while let Some(notice) = notices.recv().await {
        match notice {
            Notice::SessionEnded { hsid, how } if hsid == session.hsid() => {
                tracing::info!(session_id = %session.id, ?how, "the server ended the session");
                let _ = session.drive(Input::ServerEnded, None).await;
            }
            Notice::SessionEnded { .. } => {}
            // Transactions are announced on `Sdk::listen`'s connection, not a session's.
            Notice::TransactionPending(_) => {}
            Notice::AccountDeleted { account_id } => {
                let _ = session
                    .sdk
                    .account_deleted(&hex::encode(account_id.0), session.callbacks.as_ref());
                let _ = session.drive(Input::ServerEnded, None).await;
            }
        }
    }
    let current = session
        .core()
        .map(|core| core.generation == generation && !core.machine.state().is_final())
        .unwrap_or(false);
    if current {
        let lost = SdkError::Transport("the connection to the gateway closed".into());
        let _ = session.drive(Input::Failed, Some(lost)).await;
    }
}

/// Times out a session that stays Starting or waiting for the user: each published state
/// change restarts the clock.
async fn interaction_timeout(session: Arc<Session>, timeout: Duration) {
    let mut rx = session.watch.subscribe();
    loop {
        let state = rx.borrow_and_update().state;
        if !matches!(state, State::Starting | State::UserInteraction(_)) {
            return;
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(timeout) => {
                tracing::info!(session_id = %session.id, "session timed out");
                let _ = session.drive(Input::Timeout, None).await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn inputs_in_every_form_decode() {
        let payload = QrPayload {
            kind: QrKind::Login,
            server_id: [1; 16],
            token: [2; 32],
            gateway: "ws://127.0.0.1:1/v1/device".into(),
            server_key_fingerprint: [3; 32],
        };
        assert_eq!(decode_input(&payload.encode()).unwrap(), payload);
        assert_eq!(
            decode_input(payload.to_base64url().as_bytes()).unwrap(),
            payload
        );
        assert_eq!(
            decode_input(payload.deep_link().as_bytes()).unwrap(),
            payload
        );
        assert_eq!(
            decode_input(format!(" {}\n", payload.deep_link()).as_bytes()).unwrap(),
            payload
        );
        assert!(matches!(
            decode_input(b"hello"),
            Err(SdkError::InvalidInput(_))
        ));
        assert!(matches!(
            decode_input(b"countersign:AAAA"),
            Err(SdkError::InvalidInput(_))
        ));
        assert!(matches!(
            decode_input(&[0xff, 0x00]),
            Err(SdkError::InvalidInput(_))
        ));
    }
}
