//! The session state machine (seed 004), pure: no I/O, no clock, no randomness.
//!
//! [`Machine::apply`] takes an [`Input`] (something the user, the gateway or a timer said)
//! and answers the [`Effect`]s the driver must perform (send a request, start pinging,
//! record history, call the app back), or a [`TransitionError`] that leaves the machine
//! unchanged. The driver ([`crate::session`]) performs requests and feeds their answers back
//! as new inputs; while a request is in flight, user inputs that would send another one are
//! refused, but stop, timeout, failure and the server ending the session are not.
//!
//! ```text
//! Starting ──login details──▶ UserInteraction(WaitForConfirmation) ──AccountSet──▶ [confirm]
//!    │  └─one account, skip_single_account_confirmation──▶ [confirm]
//!    ├──enrolment details──▶ UserInteraction(WaitForConfirmation) ──AccountSet──▶ [enrol]
//!    ├──no accounts──▶ Error (history Error; fail{no_accounts} sent)
//!    └──AppLoginOpened (AppLogin)──▶ UserInteraction(WaitForSecondFactor)
//! [confirm] ──Confirmed, second factor required──▶ UserInteraction(WaitForSecondFactor)
//! [confirm] ──Confirmed, not required──▶ [log_in]
//! WaitForSecondFactor ──SecondFactorEntered──▶ [second factor]
//!                     ├─SecondFactorNotNeeded──▶ [log_in]
//!                     └─InputCancel──▶ Done (Aborted; Enrolled for an enrolment)
//! [second factor] ──SecondFactorGiven──▶ [log_in] (login) / Done (Enrolled) (enrolment)
//! [second factor] ──SecondFactorRefused(wrong PIN, biometric failed, not registered)──▶
//!                     WaitForSecondFactor again (the user may retry)
//! [second factor] ──SecondFactorRefused(locked, revoked)──▶ Error (Error)
//! [log_in] ──LoggedIn, ping 0──▶ Done (LoggedInOneShot)
//! [log_in] ──LoggedIn, ping > 0──▶ Active (LoggedIn; pinging)
//! [enrol]  ──Enrolled──▶ Done (Enrolled)
//! [enrol]  ──EnrolledNeedsSecondFactor──▶ UserInteraction(WaitForSecondFactor)
//! Starting / UserInteraction ──Stop / Timeout / ServerEnded──▶ Done (Aborted)
//! Active ──Stop / ServerEnded──▶ Done (LoggedOut)
//! any but Done / Error ──Failed──▶ Error (Error)
//! ```
//!
//! `[second factor]` is one effect, [`Effect::SendSecondFactor`]: the driver asks the gateway
//! for a challenge, has the SFS attest the user's factor, and hands the attestation to the
//! gateway (`verify_second_factor` for a login, `upgrade_account` for an enrolment). Every
//! outcome is told to the app ([`Effect::TellSecondFactor`]), as seed 004 asks. An enrolment
//! that reached WaitForSecondFactor has its account already: cancelling, stopping or timing
//! out leaves that account headless and records `Enrolled`, not `Aborted`.
//!
//! An AppLogin (the app logging in to itself) has no confirmation state and always asks a
//! second factor: `SecondFactorNotNeeded` is refused for it, and its login is continuous.
//! The inactivity timeout is the driver's (it stops the session, as `Stop` does).
//!
//! History status `Enrolled` is our addition to the seed's five: a completed enrolment is
//! neither a login nor an abort. Stopping while a `log_in` is in flight sends both `abort`
//! and `log_out` (each harmless if the other applies), so the server never keeps a login
//! the device believes it aborted.

use serde::{Deserialize, Serialize};

/// A session's main state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Fetching what the session is about from the server.
    Starting,
    /// Waiting for the user.
    UserInteraction(Interaction),
    /// Logged in to a continuous session; the SDK pings in the background.
    Active,
    /// Finished normally (not necessarily logged in: see the history status).
    Done,
    /// Finished by an error.
    Error,
}

impl State {
    /// Done or Error: nothing more happens to this session.
    #[must_use]
    pub const fn is_final(self) -> bool {
        matches!(self, Self::Done | Self::Error)
    }
}

/// What the session waits for from the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interaction {
    /// The user picks an account (`set_account`) or stops.
    WaitForConfirmation,
    /// The user gives their PIN or biometric (`set_pin_biometric`) or cancels.
    WaitForSecondFactor,
}

/// How a session ended up, as the history shows it. Stored: the names are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryStatus {
    /// Logged in to a continuous session (ping time > 0).
    LoggedIn,
    /// Logged in once (ping time 0).
    LoggedInOneShot,
    /// A continuous session ended.
    LoggedOut,
    /// Declined, cancelled or timed out before login.
    Aborted,
    /// Failed.
    Error,
    /// An enrolment completed (our addition to the seed's statuses).
    Enrolled,
}

/// What the app hears about a second factor it gave (seed 004's SecondFactor callback).
/// Carries no PIN and nothing derived from one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecondFactorEvent {
    /// The factor was verified; the session goes on.
    Verified,
    /// The PIN was wrong; the session waits for another try.
    WrongPin {
        /// Failures left before the next lock or the revocation.
        attempts_left: u32,
    },
    /// The platform's biometric check did not release the key, or the SFS did not accept its
    /// signature; the session waits for another try (or a PIN).
    BiometricFailed,
    /// No such factor is registered for this app instance (at the SFS, or no biometric key on
    /// this device); the session waits for another factor.
    NotRegistered,
    /// Too many failures: the factor is locked until then; the session fails.
    Locked {
        /// Milliseconds since the Unix epoch.
        until_ms: i64,
    },
    /// Too many failures: the factor is revoked and must be enrolled again; the session fails.
    Revoked,
}

impl SecondFactorEvent {
    /// Whether the session may go on waiting for a second factor after this.
    #[must_use]
    pub const fn may_retry(self) -> bool {
        matches!(
            self,
            Self::WrongPin { .. } | Self::BiometricFailed | Self::NotRegistered
        )
    }
}

/// Login or enrolment, fixed when the session starts (from the QR code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionKind {
    /// Log in to a session.
    Login,
    /// Enrol a new account.
    Enrolment,
    /// Log in to the app itself (AppLogin): no confirmation, always a second factor.
    AppLogin,
}

/// What the server said about a login session, reduced to what the machine decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginDetails {
    /// How many of this device's accounts may log in (the accounts at the session's server).
    pub eligible_accounts: usize,
    /// Whether the server asks a second factor.
    pub second_factor_required: bool,
    /// 0 for a one-shot login.
    pub ping_time_secs: u32,
}

/// Something that happened to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// The gateway answered the scan.
    LoginDetails(LoginDetails),
    /// The gateway accepted the guest channel of an enrolment.
    EnrolmentDetails,
    /// A login for a server this device holds no account at.
    NoAccounts,
    /// The gateway opened an AppLogin session.
    AppLoginOpened,
    /// The user chose the account (login) or accepted the enrolment.
    AccountSet,
    /// The gateway answered `confirm`.
    Confirmed,
    /// The user gave a second factor (`set_pin_biometric`); the driver keeps it, the machine
    /// never sees it.
    SecondFactorEntered,
    /// The user's second factor was verified (and the gateway accepted its attestation).
    SecondFactorGiven,
    /// The SFS refused the user's second factor.
    SecondFactorRefused(SecondFactorEvent),
    /// No second factor is needed after all (a recent one is still valid).
    SecondFactorNotNeeded,
    /// The user declined to give a second factor.
    InputCancel,
    /// The gateway answered `log_in`.
    LoggedIn {
        /// 0 for a one-shot login.
        ping_time_secs: u32,
    },
    /// The gateway answered `enrol`.
    Enrolled,
    /// The gateway answered `enrol`, and the new account should get a second factor (the
    /// server asks one and the app has an SFS).
    EnrolledNeedsSecondFactor,
    /// The app stopped the session.
    Stop,
    /// The server ended the session (a notice, or a ping answered `ended`).
    ServerEnded,
    /// The user did not act in time.
    Timeout,
    /// Something failed (network, refusal).
    Failed,
}

impl Input {
    /// A stable name for errors and logs.
    #[must_use]
    pub const fn name(&self) -> &'static str {
        match self {
            Self::LoginDetails(_) => "login_details",
            Self::EnrolmentDetails => "enrolment_details",
            Self::NoAccounts => "no_accounts",
            Self::AppLoginOpened => "app_login_opened",
            Self::AccountSet => "set_account",
            Self::Confirmed => "confirmed",
            Self::SecondFactorEntered => "set_pin_biometric",
            Self::SecondFactorGiven => "second_factor_given",
            Self::SecondFactorRefused(_) => "second_factor_refused",
            Self::SecondFactorNotNeeded => "second_factor_not_needed",
            Self::InputCancel => "input_cancel",
            Self::LoggedIn { .. } => "logged_in",
            Self::Enrolled => "enrolled",
            Self::EnrolledNeedsSecondFactor => "enrolled_needs_second_factor",
            Self::Stop => "stop_session",
            Self::ServerEnded => "server_ended",
            Self::Timeout => "timeout",
            Self::Failed => "failed",
        }
    }
}

/// What the driver must do after a transition, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Tell the app the new state.
    StateChanged(State),
    /// Ask the user to pick an account for a login.
    AskConfirmLogin,
    /// Ask the user to accept an enrolment.
    AskConfirmEnrol,
    /// Ask the user for their second factor.
    AskSecondFactor,
    /// Tell the app how its second factor fared.
    TellSecondFactor(SecondFactorEvent),
    /// Prove the second factor the user gave: `challenge`, the SFS, then
    /// `verify_second_factor` (login) or `upgrade_account` (enrolment); its answer is
    /// [`Input::SecondFactorGiven`] or [`Input::SecondFactorRefused`].
    SendSecondFactor,
    /// Send `confirm`; its answer is [`Input::Confirmed`].
    SendConfirm,
    /// Send `log_in`; its answer is [`Input::LoggedIn`].
    SendLogIn,
    /// Send `enrol`; its answer is [`Input::Enrolled`].
    SendEnrol,
    /// Send `abort` (best effort).
    SendAbort,
    /// Send `log_out` (best effort).
    SendLogOut,
    /// Send `fail{no_accounts}` (best effort).
    SendFailNoAccounts,
    /// Ping every so many seconds while Active.
    StartPinging {
        /// `max(1, ping_time_secs / 2)`.
        every_secs: u32,
    },
    /// Stop pinging.
    StopPinging,
    /// Store (create or update) this session's history entry.
    RecordHistory(HistoryStatus),
}

/// An input that makes no sense in the current state; the machine is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{input} is not possible in state {state:?}")]
pub struct TransitionError {
    /// The unchanged state.
    pub state: State,
    /// The refused input's name.
    pub input: &'static str,
}

/// The request a session waits for an answer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InFlight {
    Confirm,
    SecondFactor,
    LogIn,
    Enrol,
}

/// One session's state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    kind: SessionKind,
    skip_single_account_confirmation: bool,
    state: State,
    history: Option<HistoryStatus>,
    in_flight: Option<InFlight>,
    second_factor_required: bool,
    /// An enrolment whose account exists (it waits to give it a second factor).
    enrolled: bool,
}

impl Machine {
    /// A session in `Starting`.
    #[must_use]
    pub const fn new(kind: SessionKind, skip_single_account_confirmation: bool) -> Self {
        Self {
            kind,
            skip_single_account_confirmation,
            state: State::Starting,
            history: None,
            in_flight: None,
            second_factor_required: false,
            enrolled: false,
        }
    }

    /// The current state.
    #[must_use]
    pub const fn state(&self) -> State {
        self.state
    }

    /// The history status, once there is one.
    #[must_use]
    pub const fn history(&self) -> Option<HistoryStatus> {
        self.history
    }

    /// Login or enrolment.
    #[must_use]
    pub const fn kind(&self) -> SessionKind {
        self.kind
    }

    /// Applies `input`; answers the effects to perform, or refuses and changes nothing.
    ///
    /// # Errors
    /// [`TransitionError`] when the input makes no sense in this state.
    pub fn apply(&mut self, input: Input) -> Result<Vec<Effect>, TransitionError> {
        use {Input as I, Interaction as W, SessionKind as K, State as S};
        let refuse = TransitionError {
            state: self.state,
            input: input.name(),
        };
        if self.state.is_final() {
            return Err(refuse);
        }
        let idle = self.in_flight.is_none();
        let before_login = matches!(self.state, S::Starting | S::UserInteraction(_));
        match (input, self.kind, self.state) {
            (I::LoginDetails(d), K::Login, S::Starting) if idle => {
                self.second_factor_required = d.second_factor_required;
                match d.eligible_accounts {
                    0 => Ok(self.finish(
                        S::Error,
                        HistoryStatus::Error,
                        &[Effect::SendFailNoAccounts],
                    )),
                    1 if self.skip_single_account_confirmation => {
                        self.in_flight = Some(InFlight::Confirm);
                        Ok(vec![Effect::SendConfirm])
                    }
                    _ => Ok(self.enter(
                        S::UserInteraction(W::WaitForConfirmation),
                        Effect::AskConfirmLogin,
                    )),
                }
            }
            (I::EnrolmentDetails, K::Enrolment, S::Starting) if idle => Ok(self.enter(
                S::UserInteraction(W::WaitForConfirmation),
                Effect::AskConfirmEnrol,
            )),
            (I::AppLoginOpened, K::AppLogin, S::Starting) if idle => Ok(self.enter(
                S::UserInteraction(W::WaitForSecondFactor),
                Effect::AskSecondFactor,
            )),
            (I::NoAccounts, K::Login, S::Starting) if idle => Ok(self.finish(
                S::Error,
                HistoryStatus::Error,
                &[Effect::SendFailNoAccounts],
            )),
            (I::AccountSet, kind, S::UserInteraction(W::WaitForConfirmation)) if idle => {
                let (flight, send) = match kind {
                    K::Login | K::AppLogin => (InFlight::Confirm, Effect::SendConfirm),
                    K::Enrolment => (InFlight::Enrol, Effect::SendEnrol),
                };
                self.in_flight = Some(flight);
                Ok(vec![send])
            }
            (I::Confirmed, K::Login, _) if self.in_flight == Some(InFlight::Confirm) => {
                if self.second_factor_required {
                    self.in_flight = None;
                    Ok(self.enter(
                        S::UserInteraction(W::WaitForSecondFactor),
                        Effect::AskSecondFactor,
                    ))
                } else {
                    self.in_flight = Some(InFlight::LogIn);
                    Ok(vec![Effect::SendLogIn])
                }
            }
            (I::SecondFactorEntered, _, S::UserInteraction(W::WaitForSecondFactor)) if idle => {
                self.in_flight = Some(InFlight::SecondFactor);
                Ok(vec![Effect::SendSecondFactor])
            }
            (I::SecondFactorGiven, kind, S::UserInteraction(W::WaitForSecondFactor))
                if self.in_flight == Some(InFlight::SecondFactor) =>
            {
                let verified = Effect::TellSecondFactor(SecondFactorEvent::Verified);
                match kind {
                    K::Login | K::AppLogin => {
                        self.in_flight = Some(InFlight::LogIn);
                        Ok(vec![verified, Effect::SendLogIn])
                    }
                    K::Enrolment => Ok(self.finish(S::Done, HistoryStatus::Enrolled, &[verified])),
                }
            }
            (I::SecondFactorRefused(event), _, S::UserInteraction(W::WaitForSecondFactor))
                if self.in_flight == Some(InFlight::SecondFactor) =>
            {
                self.in_flight = None;
                let told = Effect::TellSecondFactor(event);
                if event.may_retry() {
                    Ok(vec![told])
                } else {
                    let mut sends = vec![told];
                    sends.extend(self.abort_sends());
                    Ok(self.finish(S::Error, HistoryStatus::Error, &sends))
                }
            }
            (
                I::SecondFactorGiven | I::SecondFactorNotNeeded,
                K::Login,
                S::UserInteraction(W::WaitForSecondFactor),
            ) if idle => {
                self.in_flight = Some(InFlight::LogIn);
                Ok(vec![Effect::SendLogIn])
            }
            (I::InputCancel, _, S::UserInteraction(W::WaitForSecondFactor)) => {
                Ok(self.end_before_login())
            }
            (I::LoggedIn { ping_time_secs }, K::Login | K::AppLogin, _)
                if self.in_flight == Some(InFlight::LogIn) =>
            {
                if ping_time_secs == 0 {
                    Ok(self.finish(S::Done, HistoryStatus::LoggedInOneShot, &[]))
                } else {
                    self.in_flight = None;
                    self.state = S::Active;
                    self.history = Some(HistoryStatus::LoggedIn);
                    Ok(vec![
                        Effect::StartPinging {
                            every_secs: (ping_time_secs / 2).max(1),
                        },
                        Effect::RecordHistory(HistoryStatus::LoggedIn),
                        Effect::StateChanged(S::Active),
                    ])
                }
            }
            (I::Enrolled, K::Enrolment, _) if self.in_flight == Some(InFlight::Enrol) => {
                Ok(self.finish(S::Done, HistoryStatus::Enrolled, &[]))
            }
            (I::EnrolledNeedsSecondFactor, K::Enrolment, _)
                if self.in_flight == Some(InFlight::Enrol) =>
            {
                self.in_flight = None;
                self.enrolled = true;
                Ok(self.enter(
                    S::UserInteraction(W::WaitForSecondFactor),
                    Effect::AskSecondFactor,
                ))
            }
            (I::Stop, _, S::Active) => Ok(self.finish(
                S::Done,
                HistoryStatus::LoggedOut,
                &[Effect::StopPinging, Effect::SendLogOut],
            )),
            (I::Stop | I::Timeout, _, _) if before_login => Ok(self.end_before_login()),
            (I::ServerEnded, _, S::Active) => {
                Ok(self.finish(S::Done, HistoryStatus::LoggedOut, &[Effect::StopPinging]))
            }
            (I::ServerEnded, _, _) if before_login => {
                Ok(self.finish(S::Done, HistoryStatus::Aborted, &[]))
            }
            (I::Failed, _, S::Active) => {
                Ok(self.finish(S::Error, HistoryStatus::Error, &[Effect::StopPinging]))
            }
            (I::Failed, _, _) => Ok(self.finish(S::Error, HistoryStatus::Error, &[])),
            _ => Err(refuse),
        }
    }

    /// The user or a timer ends the session before login: `Aborted`, except for an enrolment
    /// whose account exists (it stays, headless: `Enrolled`).
    fn end_before_login(&mut self) -> Vec<Effect> {
        let status = if self.enrolled {
            HistoryStatus::Enrolled
        } else {
            HistoryStatus::Aborted
        };
        let sends = self.abort_sends();
        self.finish(State::Done, status, &sends)
    }

    /// What to send when a session ends before login: nothing for an enrolment (there is
    /// no server session), `abort` for a login, and `log_out` too if a `log_in` is in flight.
    fn abort_sends(&self) -> Vec<Effect> {
        match (self.kind, self.in_flight) {
            (SessionKind::Enrolment, _) => vec![],
            (SessionKind::Login | SessionKind::AppLogin, Some(InFlight::LogIn)) => {
                vec![Effect::SendAbort, Effect::SendLogOut]
            }
            (SessionKind::Login | SessionKind::AppLogin, _) => vec![Effect::SendAbort],
        }
    }

    fn enter(&mut self, state: State, ask: Effect) -> Vec<Effect> {
        self.state = state;
        vec![Effect::StateChanged(state), ask]
    }

    fn finish(&mut self, state: State, status: HistoryStatus, first: &[Effect]) -> Vec<Effect> {
        self.state = state;
        self.history = Some(status);
        self.in_flight = None;
        let mut effects = first.to_vec();
        effects.push(Effect::RecordHistory(status));
        effects.push(Effect::StateChanged(state));
        effects
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use Effect as E;
    use HistoryStatus as H;
    use Interaction::{WaitForConfirmation, WaitForSecondFactor};
    use State as S;

    const CONFIRM: S = S::UserInteraction(WaitForConfirmation);
    const SECOND: S = S::UserInteraction(WaitForSecondFactor);

    fn details(eligible: usize, second: bool, ping: u32) -> Input {
        Input::LoginDetails(LoginDetails {
            eligible_accounts: eligible,
            second_factor_required: second,
            ping_time_secs: ping,
        })
    }

    /// Given a login machine fed `given`, when `when`, then these effects.
    fn login(
        skip: bool,
        given: &[Input],
        when: Input,
    ) -> (Machine, Result<Vec<Effect>, TransitionError>) {
        let mut m = Machine::new(SessionKind::Login, skip);
        for input in given {
            m.apply(*input).unwrap();
        }
        let out = m.apply(when);
        (m, out)
    }

    fn enrolment(given: &[Input], when: Input) -> (Machine, Result<Vec<Effect>, TransitionError>) {
        let mut m = Machine::new(SessionKind::Enrolment, false);
        for input in given {
            m.apply(*input).unwrap();
        }
        let out = m.apply(when);
        (m, out)
    }

    /// Asserts a refusal that leaves the machine as it was.
    fn refused(mut m: Machine, input: Input) {
        let before = m.clone();
        let err = m.apply(input).unwrap_err();
        assert_eq!(err.state, before.state());
        assert_eq!(err.input, input.name());
        assert_eq!(m, before, "a refused input changes nothing");
    }

    const CONFIRMED_NO_2FA: [Input; 3] = [
        Input::LoginDetails(LoginDetails {
            eligible_accounts: 2,
            second_factor_required: false,
            ping_time_secs: 30,
        }),
        Input::AccountSet,
        Input::Confirmed,
    ];

    #[test]
    fn starts_in_starting() {
        let m = Machine::new(SessionKind::Login, false);
        assert_eq!(m.state(), S::Starting);
        assert_eq!(m.history(), None);
    }

    #[test]
    fn login_details_ask_for_confirmation() {
        let (m, out) = login(false, &[], details(1, false, 0));
        assert_eq!(
            out.unwrap(),
            vec![E::StateChanged(CONFIRM), E::AskConfirmLogin]
        );
        assert_eq!(m.state(), CONFIRM);
    }

    #[test]
    fn skip_single_account_confirmation_confirms_at_once() {
        let (m, out) = login(true, &[], details(1, false, 0));
        assert_eq!(out.unwrap(), vec![E::SendConfirm]);
        assert_eq!(m.state(), S::Starting, "WaitForConfirmation is skipped");
        // Straight to Done once logged in, never through WaitForConfirmation.
        let (m, out) = login(
            true,
            &[details(1, false, 0), Input::Confirmed],
            Input::LoggedIn { ping_time_secs: 0 },
        );
        assert_eq!(
            out.unwrap(),
            vec![
                E::RecordHistory(H::LoggedInOneShot),
                E::StateChanged(S::Done)
            ]
        );
        assert_eq!(m.state(), S::Done);
    }

    #[test]
    fn skip_does_not_apply_to_several_accounts() {
        let (m, out) = login(true, &[], details(2, false, 0));
        assert_eq!(
            out.unwrap(),
            vec![E::StateChanged(CONFIRM), E::AskConfirmLogin]
        );
        assert_eq!(m.state(), CONFIRM);
    }

    #[test]
    fn skip_with_a_second_factor_goes_to_wait_for_second_factor() {
        let (m, out) = login(true, &[details(1, true, 0)], Input::Confirmed);
        assert_eq!(
            out.unwrap(),
            vec![E::StateChanged(SECOND), E::AskSecondFactor]
        );
        assert_eq!(m.state(), SECOND);
    }

    #[test]
    fn no_eligible_account_is_an_error() {
        for (given, when) in [(vec![], details(0, false, 0)), (vec![], Input::NoAccounts)] {
            let (m, out) = login(false, &given, when);
            assert_eq!(
                out.unwrap(),
                vec![
                    E::SendFailNoAccounts,
                    E::RecordHistory(H::Error),
                    E::StateChanged(S::Error)
                ]
            );
            assert_eq!(m.state(), S::Error);
            assert_eq!(m.history(), Some(H::Error));
        }
    }

    #[test]
    fn enrolment_details_ask_to_confirm_the_enrolment() {
        let (m, out) = enrolment(&[], Input::EnrolmentDetails);
        assert_eq!(
            out.unwrap(),
            vec![E::StateChanged(CONFIRM), E::AskConfirmEnrol]
        );
        assert_eq!(m.state(), CONFIRM);
    }

    #[test]
    fn set_account_sends_confirm_for_a_login() {
        let (m, out) = login(false, &[details(2, false, 0)], Input::AccountSet);
        assert_eq!(out.unwrap(), vec![E::SendConfirm]);
        assert_eq!(m.state(), CONFIRM);
    }

    #[test]
    fn set_account_sends_enrol_for_an_enrolment() {
        let (_, out) = enrolment(&[Input::EnrolmentDetails], Input::AccountSet);
        assert_eq!(out.unwrap(), vec![E::SendEnrol]);
    }

    #[test]
    fn enrolled_is_done_with_history_enrolled() {
        let (m, out) = enrolment(
            &[Input::EnrolmentDetails, Input::AccountSet],
            Input::Enrolled,
        );
        assert_eq!(
            out.unwrap(),
            vec![E::RecordHistory(H::Enrolled), E::StateChanged(S::Done)]
        );
        assert_eq!((m.state(), m.history()), (S::Done, Some(H::Enrolled)));
    }

    #[test]
    fn confirmed_without_second_factor_logs_in() {
        let (_, out) = login(
            false,
            &[details(2, false, 0), Input::AccountSet],
            Input::Confirmed,
        );
        assert_eq!(out.unwrap(), vec![E::SendLogIn]);
    }

    #[test]
    fn confirmed_with_second_factor_waits_for_it() {
        let (m, out) = login(
            false,
            &[details(2, true, 0), Input::AccountSet],
            Input::Confirmed,
        );
        assert_eq!(
            out.unwrap(),
            vec![E::StateChanged(SECOND), E::AskSecondFactor]
        );
        assert_eq!(m.state(), SECOND);
    }

    #[test]
    fn second_factor_given_or_not_needed_logs_in() {
        let given = [details(2, true, 0), Input::AccountSet, Input::Confirmed];
        for when in [Input::SecondFactorGiven, Input::SecondFactorNotNeeded] {
            let (m, out) = login(false, &given, when);
            assert_eq!(out.unwrap(), vec![E::SendLogIn]);
            assert_eq!(m.state(), SECOND);
        }
    }

    #[test]
    fn input_cancel_aborts() {
        let given = [details(2, true, 0), Input::AccountSet, Input::Confirmed];
        let (m, out) = login(false, &given, Input::InputCancel);
        assert_eq!(
            out.unwrap(),
            vec![
                E::SendAbort,
                E::RecordHistory(H::Aborted),
                E::StateChanged(S::Done)
            ]
        );
        assert_eq!(m.history(), Some(H::Aborted));
    }

    #[test]
    fn one_shot_login_is_done() {
        let (m, out) = login(
            false,
            &CONFIRMED_NO_2FA,
            Input::LoggedIn { ping_time_secs: 0 },
        );
        assert_eq!(
            out.unwrap(),
            vec![
                E::RecordHistory(H::LoggedInOneShot),
                E::StateChanged(S::Done)
            ]
        );
        assert_eq!(
            (m.state(), m.history()),
            (S::Done, Some(H::LoggedInOneShot))
        );
    }

    #[test]
    fn continuous_login_is_active_and_pings_at_half_the_ping_time() {
        let (m, out) = login(
            false,
            &CONFIRMED_NO_2FA,
            Input::LoggedIn { ping_time_secs: 30 },
        );
        assert_eq!(
            out.unwrap(),
            vec![
                E::StartPinging { every_secs: 15 },
                E::RecordHistory(H::LoggedIn),
                E::StateChanged(S::Active)
            ]
        );
        assert_eq!((m.state(), m.history()), (S::Active, Some(H::LoggedIn)));
        let (_, out) = login(
            false,
            &CONFIRMED_NO_2FA,
            Input::LoggedIn { ping_time_secs: 1 },
        );
        assert_eq!(
            out.unwrap().first(),
            Some(&E::StartPinging { every_secs: 1 })
        );
    }

    fn active() -> Vec<Input> {
        let mut given = CONFIRMED_NO_2FA.to_vec();
        given.push(Input::LoggedIn { ping_time_secs: 10 });
        given
    }

    #[test]
    fn stop_while_active_logs_out() {
        let (m, out) = login(false, &active(), Input::Stop);
        assert_eq!(
            out.unwrap(),
            vec![
                E::StopPinging,
                E::SendLogOut,
                E::RecordHistory(H::LoggedOut),
                E::StateChanged(S::Done)
            ]
        );
        assert_eq!((m.state(), m.history()), (S::Done, Some(H::LoggedOut)));
    }

    #[test]
    fn stop_before_login_aborts() {
        for given in [
            vec![],
            vec![details(2, false, 0)],
            vec![details(2, true, 0), Input::AccountSet, Input::Confirmed],
        ] {
            let (m, out) = login(false, &given, Input::Stop);
            assert_eq!(
                out.unwrap(),
                vec![
                    E::SendAbort,
                    E::RecordHistory(H::Aborted),
                    E::StateChanged(S::Done)
                ]
            );
            assert_eq!((m.state(), m.history()), (S::Done, Some(H::Aborted)));
        }
    }

    #[test]
    fn stop_while_log_in_is_in_flight_sends_abort_and_log_out() {
        let (_, out) = login(false, &CONFIRMED_NO_2FA, Input::Stop);
        assert_eq!(
            out.unwrap(),
            vec![
                E::SendAbort,
                E::SendLogOut,
                E::RecordHistory(H::Aborted),
                E::StateChanged(S::Done)
            ]
        );
    }

    #[test]
    fn stopping_an_enrolment_sends_nothing() {
        let (m, out) = enrolment(&[Input::EnrolmentDetails], Input::Stop);
        assert_eq!(
            out.unwrap(),
            vec![E::RecordHistory(H::Aborted), E::StateChanged(S::Done)]
        );
        assert_eq!(m.state(), S::Done);
    }

    #[test]
    fn server_ending_an_active_session_logs_out() {
        let (m, out) = login(false, &active(), Input::ServerEnded);
        assert_eq!(
            out.unwrap(),
            vec![
                E::StopPinging,
                E::RecordHistory(H::LoggedOut),
                E::StateChanged(S::Done)
            ]
        );
        assert_eq!(m.history(), Some(H::LoggedOut));
    }

    #[test]
    fn server_ending_before_login_aborts() {
        let (m, out) = login(false, &[details(2, false, 0)], Input::ServerEnded);
        assert_eq!(
            out.unwrap(),
            vec![E::RecordHistory(H::Aborted), E::StateChanged(S::Done)]
        );
        assert_eq!(m.history(), Some(H::Aborted));
    }

    #[test]
    fn timeout_before_login_is_done_and_aborted() {
        for given in [vec![], vec![details(2, false, 0)]] {
            let (m, out) = login(false, &given, Input::Timeout);
            assert_eq!(
                out.unwrap(),
                vec![
                    E::SendAbort,
                    E::RecordHistory(H::Aborted),
                    E::StateChanged(S::Done)
                ]
            );
            assert_eq!((m.state(), m.history()), (S::Done, Some(H::Aborted)));
        }
    }

    #[test]
    fn failure_is_an_error() {
        for given in [
            vec![],
            vec![details(2, false, 0)],
            CONFIRMED_NO_2FA.to_vec(),
        ] {
            let (m, out) = login(false, &given, Input::Failed);
            assert_eq!(
                out.unwrap(),
                vec![E::RecordHistory(H::Error), E::StateChanged(S::Error)]
            );
            assert_eq!((m.state(), m.history()), (S::Error, Some(H::Error)));
        }
        let (_, out) = login(false, &active(), Input::Failed);
        assert_eq!(
            out.unwrap(),
            vec![
                E::StopPinging,
                E::RecordHistory(H::Error),
                E::StateChanged(S::Error)
            ]
        );
    }

    #[test]
    fn refused_transitions_change_nothing() {
        let at = |given: &[Input]| {
            let mut m = Machine::new(SessionKind::Login, false);
            for input in given {
                m.apply(*input).unwrap();
            }
            m
        };
        // set_account while Active, while Starting, twice in a row.
        refused(at(&active()), Input::AccountSet);
        refused(at(&[]), Input::AccountSet);
        refused(
            at(&[details(2, false, 0), Input::AccountSet]),
            Input::AccountSet,
        );
        // Timeout while Active.
        refused(at(&active()), Input::Timeout);
        // Answers nobody waits for.
        refused(at(&[details(2, false, 0)]), Input::Confirmed);
        refused(
            at(&[details(2, false, 0)]),
            Input::LoggedIn { ping_time_secs: 0 },
        );
        refused(at(&[]), Input::Enrolled);
        // Second-factor inputs outside WaitForSecondFactor.
        refused(at(&[details(2, false, 0)]), Input::InputCancel);
        refused(at(&[details(2, false, 0)]), Input::SecondFactorGiven);
        // Enrolment inputs on a login and the reverse.
        refused(at(&[]), Input::EnrolmentDetails);
        let mut enrol = Machine::new(SessionKind::Enrolment, false);
        refused(enrol.clone(), details(1, false, 0));
        refused(enrol.clone(), Input::NoAccounts);
        enrol.apply(Input::EnrolmentDetails).unwrap();
        refused(enrol, Input::Confirmed);
        // Details twice.
        refused(at(&[details(2, false, 0)]), details(2, false, 0));
    }

    #[test]
    fn nothing_happens_after_done_or_error() {
        let all = [
            details(1, false, 0),
            Input::EnrolmentDetails,
            Input::NoAccounts,
            Input::AccountSet,
            Input::Confirmed,
            Input::SecondFactorGiven,
            Input::SecondFactorNotNeeded,
            Input::InputCancel,
            Input::LoggedIn { ping_time_secs: 0 },
            Input::Enrolled,
            Input::Stop,
            Input::ServerEnded,
            Input::Timeout,
            Input::Failed,
        ];
        let done = login(false, &[], Input::Stop).0;
        let error = login(false, &[], Input::Failed).0;
        assert_eq!(done.state(), S::Done);
        assert_eq!(error.state(), S::Error);
        for input in all {
            refused(done.clone(), input);
            refused(error.clone(), input);
        }
    }

    // The second factor (docs/second-factor.md).

    use SecondFactorEvent as Ev;

    const AT_SECOND_FACTOR: [Input; 3] = [
        Input::LoginDetails(LoginDetails {
            eligible_accounts: 2,
            second_factor_required: true,
            ping_time_secs: 0,
        }),
        Input::AccountSet,
        Input::Confirmed,
    ];

    fn verifying() -> Vec<Input> {
        let mut given = AT_SECOND_FACTOR.to_vec();
        given.push(Input::SecondFactorEntered);
        given
    }

    const ENROLLED_WAITING: [Input; 3] = [
        Input::EnrolmentDetails,
        Input::AccountSet,
        Input::EnrolledNeedsSecondFactor,
    ];

    #[test]
    fn a_second_factor_given_is_sent_and_the_user_waits() {
        let (m, out) = login(false, &AT_SECOND_FACTOR, Input::SecondFactorEntered);
        assert_eq!(out.unwrap(), vec![E::SendSecondFactor]);
        assert_eq!(m.state(), SECOND, "still waiting while it is verified");
        // A second one while the first is checked is refused.
        refused(m, Input::SecondFactorEntered);
    }

    #[test]
    fn a_verified_second_factor_is_told_and_logs_in() {
        let (m, out) = login(false, &verifying(), Input::SecondFactorGiven);
        assert_eq!(
            out.unwrap(),
            vec![E::TellSecondFactor(Ev::Verified), E::SendLogIn]
        );
        let mut m = m;
        assert_eq!(
            m.apply(Input::LoggedIn { ping_time_secs: 0 }).unwrap(),
            vec![
                E::RecordHistory(H::LoggedInOneShot),
                E::StateChanged(S::Done)
            ]
        );
    }

    #[test]
    fn a_wrong_pin_is_told_and_the_user_may_try_again() {
        let wrong = Ev::WrongPin { attempts_left: 3 };
        let (m, out) = login(false, &verifying(), Input::SecondFactorRefused(wrong));
        assert_eq!(out.unwrap(), vec![E::TellSecondFactor(wrong)]);
        assert_eq!((m.state(), m.history()), (SECOND, None));
        let mut m = m;
        assert_eq!(
            m.apply(Input::SecondFactorEntered).unwrap(),
            vec![E::SendSecondFactor],
            "a retry is accepted"
        );
        for event in [Ev::BiometricFailed, Ev::NotRegistered] {
            let (m, out) = login(false, &verifying(), Input::SecondFactorRefused(event));
            assert_eq!(out.unwrap(), vec![E::TellSecondFactor(event)]);
            assert_eq!(m.state(), SECOND);
        }
    }

    #[test]
    fn a_locked_or_revoked_factor_fails_the_session() {
        for event in [Ev::Locked { until_ms: 60_000 }, Ev::Revoked] {
            let (m, out) = login(false, &verifying(), Input::SecondFactorRefused(event));
            assert_eq!(
                out.unwrap(),
                vec![
                    E::TellSecondFactor(event),
                    E::SendAbort,
                    E::RecordHistory(H::Error),
                    E::StateChanged(S::Error)
                ]
            );
            assert_eq!((m.state(), m.history()), (S::Error, Some(H::Error)));
        }
    }

    #[test]
    fn cancelling_the_second_factor_aborts_even_while_it_is_checked() {
        for given in [AT_SECOND_FACTOR.to_vec(), verifying()] {
            let (m, out) = login(false, &given, Input::InputCancel);
            assert_eq!(
                out.unwrap(),
                vec![
                    E::SendAbort,
                    E::RecordHistory(H::Aborted),
                    E::StateChanged(S::Done)
                ]
            );
            assert_eq!((m.state(), m.history()), (S::Done, Some(H::Aborted)));
            // The verification's late answer changes nothing.
            refused(m, Input::SecondFactorGiven);
        }
    }

    #[test]
    fn second_factor_answers_nobody_waits_for_are_refused() {
        let at = |given: &[Input]| {
            let mut m = Machine::new(SessionKind::Login, false);
            for input in given {
                m.apply(*input).unwrap();
            }
            m
        };
        refused(
            at(&AT_SECOND_FACTOR),
            Input::SecondFactorRefused(Ev::Revoked),
        );
        refused(at(&[details(2, true, 0)]), Input::SecondFactorEntered);
        refused(at(&CONFIRMED_NO_2FA), Input::SecondFactorEntered);
        refused(at(&[]), Input::EnrolledNeedsSecondFactor);
    }

    #[test]
    fn an_enrolment_asks_a_second_factor_then_is_done_once_verified() {
        let (m, out) = enrolment(
            &[Input::EnrolmentDetails, Input::AccountSet],
            Input::EnrolledNeedsSecondFactor,
        );
        assert_eq!(
            out.unwrap(),
            vec![E::StateChanged(SECOND), E::AskSecondFactor]
        );
        assert_eq!((m.state(), m.history()), (SECOND, None));
        let mut given = ENROLLED_WAITING.to_vec();
        given.push(Input::SecondFactorEntered);
        let (m, out) = enrolment(&given, Input::SecondFactorGiven);
        assert_eq!(
            out.unwrap(),
            vec![
                E::TellSecondFactor(Ev::Verified),
                E::RecordHistory(H::Enrolled),
                E::StateChanged(S::Done)
            ]
        );
        assert_eq!((m.state(), m.history()), (S::Done, Some(H::Enrolled)));
        // A wrong PIN at an enrolment waits too.
        let (m, out) = enrolment(
            &given,
            Input::SecondFactorRefused(Ev::WrongPin { attempts_left: 1 }),
        );
        assert_eq!(
            out.unwrap(),
            vec![E::TellSecondFactor(Ev::WrongPin { attempts_left: 1 })]
        );
        assert_eq!(m.state(), SECOND);
    }

    #[test]
    fn leaving_an_enrolment_without_a_second_factor_keeps_the_account() {
        for when in [Input::InputCancel, Input::Stop, Input::Timeout] {
            let (m, out) = enrolment(&ENROLLED_WAITING, when);
            assert_eq!(
                out.unwrap(),
                vec![E::RecordHistory(H::Enrolled), E::StateChanged(S::Done)],
                "{when:?}: nothing to abort, the account exists (headless)"
            );
            assert_eq!((m.state(), m.history()), (S::Done, Some(H::Enrolled)));
        }
        let mut given = ENROLLED_WAITING.to_vec();
        given.push(Input::SecondFactorEntered);
        let (m, out) = enrolment(&given, Input::SecondFactorRefused(Ev::Revoked));
        assert_eq!(
            out.unwrap(),
            vec![
                E::TellSecondFactor(Ev::Revoked),
                E::RecordHistory(H::Error),
                E::StateChanged(S::Error)
            ]
        );
        assert_eq!(m.state(), S::Error);
    }

    #[test]
    fn nothing_second_factor_happens_after_done_or_error() {
        let done = login(false, &[], Input::Stop).0;
        let error = login(false, &[], Input::Failed).0;
        for input in [
            Input::SecondFactorEntered,
            Input::SecondFactorRefused(Ev::WrongPin { attempts_left: 1 }),
            Input::EnrolledNeedsSecondFactor,
        ] {
            refused(done.clone(), input);
            refused(error.clone(), input);
        }
    }
}
