//! AppLogin: the app logs its user in to the app itself (seed 004's third way to start a
//! session), and gets a **web nonce** its own backend turns into a web session
//! (docs/app-login.md). A child of [`super`] (`session.rs`): it is one more kind of the same
//! driven session, and adds only what is its own.
//!
//! Flow: [`start`] picks the account (the one named, or the only one), connects as it, sends
//! `app_login`; the gateway opens and confirms a continuous session for the account's user
//! and answers its hsid and the web nonce. Then the session is the seed-004 machine's
//! AppLogin path: `Starting` → `WaitForSecondFactor` (always; no confirmation state, no reuse
//! of an earlier factor — the gateway refuses a login without a factor proven on the session)
//! → `Active` (history `LoggedIn`, pinging) → `Done` (history `LoggedOut`).
//!
//! Rules enforced here:
//! - a failure before the gateway opened a session answers the error and records nothing
//!   (there is no session to record); after it, failures end the session in `Error` as for
//!   any login;
//! - the inactivity timeout ([`SdkConfig::app_login_inactivity_timeout`]) runs on the
//!   device's clock ([`crate::Sdk::set_clock`]): each [`SessionHandle::touch`] restarts it,
//!   logging in starts it. It is checked before every ping, by a background task at the
//!   deadline, and whenever the app calls [`SessionHandle::check_inactivity`]; a session
//!   found inactive logs out (as `stop_session` does) before anything else is sent;
//! - the web nonce is a [`WebNonce`]: shown in the snapshot only while `Active`, dropped when
//!   the session ends, wiped on drop, never printed by `Debug` nor logged.
//!
//! [`SdkConfig::app_login_inactivity_timeout`]: crate::SdkConfig::app_login_inactivity_timeout

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use countersign_protocol::device::{Answer, Notice, RequestBody, Secret};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use super::{Origin, Session, SessionHandle, begin, unexpected};
use crate::callbacks::Callbacks;
use crate::client::Connection;
use crate::error::SdkError;
use crate::machine::{Input, SessionKind, State};
use crate::sdk::{Inner, parse_id};

/// An AppLogin's web nonce: the base64url text (no padding) of 32 random bytes the server
/// made. The app hands it to its own backend (over its own TLS connection), which reads the
/// session with it: `GET /v1/servers/{server}/session` with `X-Nonce: <web nonce>`. A bearer
/// secret: `Debug` prints nothing, the memory is wiped on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct WebNonce(Zeroizing<String>);

impl WebNonce {
    fn from_bytes(bytes: &[u8; 32]) -> Self {
        Self(Zeroizing::new(
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes),
        ))
    }

    /// The text to hand the backend.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for WebNonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebNonce(..)")
    }
}

/// What the gateway answered `app_login` with, handed to the session it starts.
pub(crate) struct Opened {
    connection: Connection,
    notices: mpsc::UnboundedReceiver<Notice>,
    account_id: String,
    web_nonce: WebNonce,
    ping_time_secs: u32,
}

/// Starts an AppLogin; see [`crate::Sdk::app_login`].
pub(crate) async fn start(
    sdk: Arc<Inner>,
    account_id: Option<&str>,
    callbacks: Arc<dyn Callbacks>,
) -> Result<SessionHandle, SdkError> {
    let ping_time_secs = sdk.config.app_login_ping_time_secs;
    if !(1..=3600).contains(&ping_time_secs) {
        return Err(SdkError::InvalidConfig(
            "app_login_ping_time_secs must be 1..=3600",
        ));
    }
    if sdk.config.app_login_inactivity_timeout.is_zero() {
        return Err(SdkError::InvalidConfig(
            "app_login_inactivity_timeout must be more than zero",
        ));
    }
    let (account, server) = sdk.read(|s| {
        let account = match account_id {
            Some(id) => s.accounts.get(id).cloned().ok_or(SdkError::UnknownAccount),
            None => {
                let mut all = s.accounts.values();
                match (all.next(), all.next()) {
                    (Some(only), None) => Ok(only.clone()),
                    (None, _) => Err(SdkError::NoAccounts),
                    // Which one is the app's to say.
                    (Some(_), Some(_)) => Err(SdkError::UnknownAccount),
                }
            }
        }?;
        let server = s
            .servers
            .get(&account.server_id)
            .cloned()
            .ok_or(SdkError::UnknownAccount)?;
        Ok::<_, SdkError>((account, server))
    })??;
    let (connection, notices) = sdk
        .connect_account(&account.account_id, None, callbacks.as_ref())
        .await?;
    let answer = connection
        .request(RequestBody::AppLogin { ping_time_secs })
        .await?;
    let Answer::AppLogin {
        hsid,
        web_nonce,
        ping_time_secs,
        ..
    } = answer
    else {
        return Err(unexpected("app_login"));
    };
    let origin = Origin {
        kind: SessionKind::AppLogin,
        server_id: parse_id(&server.server_id)?,
        token: Secret::new(hsid.0),
        gateway: server.gateway.clone(),
        fingerprint: parse_id(&server.fingerprint)?,
        preselected: Some(account.account_id.clone()),
        app_login: Some(Opened {
            connection,
            notices,
            account_id: account.account_id.clone(),
            web_nonce: WebNonce::from_bytes(web_nonce.expose()),
            ping_time_secs,
        }),
    };
    begin(sdk, origin, callbacks).await
}

impl SessionHandle {
    /// Whether this is an AppLogin.
    #[must_use]
    pub fn is_app_login(&self) -> bool {
        self.session.kind == SessionKind::AppLogin
    }

    /// The app saw its user act: an AppLogin's inactivity timeout starts again (by the
    /// device's clock).
    ///
    /// # Errors
    /// [`SdkError::InvalidState`] for a session that is no AppLogin or has ended.
    pub fn touch(&self) -> Result<(), SdkError> {
        let now = self.session.sdk.device_time_ms()?;
        let mut core = self.session.core()?;
        let state = core.machine.state();
        if self.session.kind != SessionKind::AppLogin || state.is_final() {
            return Err(SdkError::InvalidState {
                state,
                action: "touch",
            });
        }
        core.last_activity_ms = now;
        Ok(())
    }

    /// Checks an AppLogin's inactivity timeout now, by the device's clock: past it, the
    /// session logs out (history `LoggedOut`). Answers whether it did. The SDK checks on its
    /// own before each ping and at the deadline; an app (or a test on a fixed clock) may
    /// check whenever it likes, say when it comes back to the foreground.
    ///
    /// # Errors
    /// What logging out failed with (the session is ended either way).
    pub async fn check_inactivity(&self) -> Result<bool, SdkError> {
        self.session.end_if_inactive().await
    }
}

impl Session {
    /// Runs an AppLogin's `Starting` phase on the connection the gateway opened it on.
    pub(super) async fn start_app_login(
        self: &Arc<Self>,
        opened: Option<Opened>,
    ) -> Result<(), SdkError> {
        let opened =
            opened.ok_or_else(|| SdkError::Transport("the AppLogin was not opened".into()))?;
        self.attach(opened.connection, opened.notices)?;
        let now = self.sdk.device_time_ms()?;
        {
            let mut core = self.core()?;
            core.eligible = vec![opened.account_id.clone()];
            core.account_id = Some(opened.account_id);
            core.account_channel = true;
            core.ping_time_secs = Some(opened.ping_time_secs);
            core.web_nonce = Some(opened.web_nonce);
            core.last_activity_ms = now;
        }
        tracing::info!(session_id = %self.id, "app login opened");
        self.drive(Input::AppLoginOpened, None).await
    }

    /// The AppLogin logged in: its inactivity timeout starts now, watched in the background.
    pub(super) fn app_login_active(self: &Arc<Self>) -> Result<(), SdkError> {
        let now = self.sdk.device_time_ms()?;
        self.core()?.last_activity_ms = now;
        tokio::spawn(watch_inactivity(Arc::clone(self)));
        Ok(())
    }

    /// How long until the inactivity timeout, by the device's clock (zero: it passed).
    fn until_inactive(&self) -> Result<Duration, SdkError> {
        let now = self.sdk.device_time_ms()?;
        let last = self.core()?.last_activity_ms;
        let timeout = self.sdk.config.app_login_inactivity_timeout;
        let idle = u64::try_from(now.saturating_sub(last)).unwrap_or(0);
        Ok(timeout.saturating_sub(Duration::from_millis(idle)))
    }

    /// Logs an Active AppLogin out if its inactivity timeout passed; answers whether the
    /// session is over because of it.
    pub(super) async fn end_if_inactive(self: &Arc<Self>) -> Result<bool, SdkError> {
        if self.kind != SessionKind::AppLogin
            || self.core()?.machine.state() != State::Active
            || !self.until_inactive()?.is_zero()
        {
            return Ok(false);
        }
        tracing::info!(session_id = %self.id, "app login inactive: logging out");
        match self.drive(Input::Stop, None).await {
            Ok(()) => Ok(true),
            // Something else ended it first.
            Err(SdkError::InvalidState { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Ends the AppLogin at its inactivity deadline (real time until then; the deadline is
/// checked again on the device's clock, which may run otherwise), or returns once the
/// session is over.
async fn watch_inactivity(session: Arc<Session>) {
    let mut rx = session.watch.subscribe();
    loop {
        if rx.borrow_and_update().state.is_final() {
            return;
        }
        let Ok(wait) = session.until_inactive() else {
            return;
        };
        if wait.is_zero() {
            match session.end_if_inactive().await {
                Ok(false) if session.core().is_ok_and(|c| !c.machine.state().is_final()) => {
                    // Not Active yet or any more, but not over: wait for the next change.
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
                _ => return,
            }
            continue;
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use crate::machine::{
        Effect, HistoryStatus, Input, Interaction, Machine, SecondFactorEvent, SessionKind, State,
    };

    use super::WebNonce;

    fn opened() -> Machine {
        let mut m = Machine::new(SessionKind::AppLogin, false);
        let effects = m.apply(Input::AppLoginOpened).unwrap();
        assert_eq!(
            effects,
            vec![
                Effect::StateChanged(State::UserInteraction(Interaction::WaitForSecondFactor)),
                Effect::AskSecondFactor
            ]
        );
        m
    }

    #[test]
    fn an_app_login_goes_straight_to_the_second_factor_and_stays_logged_in() {
        let mut m = opened();
        assert_eq!(
            m.apply(Input::SecondFactorEntered).unwrap(),
            vec![Effect::SendSecondFactor]
        );
        assert_eq!(
            m.apply(Input::SecondFactorGiven).unwrap(),
            vec![
                Effect::TellSecondFactor(SecondFactorEvent::Verified),
                Effect::SendLogIn
            ]
        );
        let effects = m.apply(Input::LoggedIn {
            ping_time_secs: 300,
        });
        assert_eq!(
            effects.unwrap(),
            vec![
                Effect::StartPinging { every_secs: 150 },
                Effect::RecordHistory(HistoryStatus::LoggedIn),
                Effect::StateChanged(State::Active)
            ]
        );
        let stopped = m.apply(Input::Stop).unwrap();
        assert!(stopped.contains(&Effect::SendLogOut), "{stopped:?}");
        assert!(stopped.contains(&Effect::RecordHistory(HistoryStatus::LoggedOut)));
        assert_eq!(m.state(), State::Done);
    }

    #[test]
    fn an_app_login_never_skips_the_factor_nor_asks_to_confirm() {
        let mut m = opened();
        assert!(m.apply(Input::SecondFactorNotNeeded).is_err());
        assert!(m.apply(Input::AccountSet).is_err());
        assert_eq!(
            m.state(),
            State::UserInteraction(Interaction::WaitForSecondFactor)
        );
        // Before it is opened, nothing but the opening (or an end) is accepted.
        let mut fresh = Machine::new(SessionKind::AppLogin, true);
        let details = crate::machine::LoginDetails {
            eligible_accounts: 1,
            second_factor_required: false,
            ping_time_secs: 300,
        };
        assert!(fresh.apply(Input::LoginDetails(details)).is_err());
        // Cancelling the factor aborts the server's session.
        let cancelled = m.apply(Input::InputCancel).unwrap();
        assert!(cancelled.contains(&Effect::SendAbort), "{cancelled:?}");
        assert!(cancelled.contains(&Effect::RecordHistory(HistoryStatus::Aborted)));
    }

    #[test]
    fn the_server_ending_an_active_app_login_logs_it_out() {
        let mut m = opened();
        m.apply(Input::SecondFactorEntered).unwrap();
        m.apply(Input::SecondFactorGiven).unwrap();
        m.apply(Input::LoggedIn { ping_time_secs: 60 }).unwrap();
        let ended = m.apply(Input::ServerEnded).unwrap();
        assert!(ended.contains(&Effect::RecordHistory(HistoryStatus::LoggedOut)));
        assert!(!ended.contains(&Effect::SendLogOut), "{ended:?}");
    }

    #[test]
    fn debug_of_a_web_nonce_prints_nothing() {
        let nonce = WebNonce::from_bytes(&[0xab; 32]);
        assert_eq!(nonce.expose().len(), 43);
        assert!(!nonce.expose().contains('='));
        assert_eq!(format!("{nonce:?}"), "WebNonce(..)");
    }
}
