//! How the SDK tells the app what happens: [`Callbacks`], every method a no-op by default, so
//! an app implements only what it shows. [`ChannelCallbacks`] turns the calls into
//! [`Event`]s on a tokio channel, for tests and command-line tools that prefer to await.
//!
//! Callbacks run on the SDK's tasks: they must return quickly and must not block.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::machine::SecondFactorEvent;
use crate::model::{AccountInfo, HistoryEntry, PendingTransaction, ServerInfo, SessionSnapshot};

/// What the app hears from the SDK.
pub trait Callbacks: Send + Sync {
    /// A session's state changed. Called before the change is visible through
    /// `SessionHandle::snapshot`, `state` or `wait_for` (use `session` here, not the handle):
    /// once `wait_for` answers a state, `on_state` has been told of it.
    fn on_state(&self, _session: &SessionSnapshot) {}
    /// A login waits for the user to pick one of `accounts` (`set_account`) or stop.
    fn confirm_login(&self, _session: &SessionSnapshot, _accounts: &[AccountInfo]) {}
    /// An enrolment waits for the user to accept `server` (`set_account(None)`) or stop.
    fn confirm_enrol(&self, _session: &SessionSnapshot, _server: &ServerInfo) {}
    /// A login or an enrolment waits for the user's second factor (`set_pin_biometric`) or
    /// `input_cancel`.
    fn second_factor_needed(&self, _session: &SessionSnapshot) {}
    /// How the second factor the user gave fared (seed 004's SecondFactor callback); the
    /// session's state says whether it waits for another try.
    fn on_second_factor(&self, _session: &SessionSnapshot, _event: &SecondFactorEvent) {}
    /// A history entry was created or changed.
    fn on_history(&self, _entry: &HistoryEntry) {}
    /// The server deleted an account; the SDK has forgotten it.
    fn on_account_deleted(&self, _account: &AccountInfo) {}
    /// A transaction waits for this account's approval (heard while [`crate::Sdk::listen`]
    /// keeps its connection open): fetch it with [`crate::Sdk::get_transaction`].
    fn on_transaction_pending(&self, _account: &AccountInfo, _pending: &PendingTransaction) {}
}

/// Callbacks that do nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoCallbacks;

impl Callbacks for NoCallbacks {}

/// One callback, as a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// [`Callbacks::on_state`].
    State(SessionSnapshot),
    /// [`Callbacks::confirm_login`].
    ConfirmLogin(SessionSnapshot, Vec<AccountInfo>),
    /// [`Callbacks::confirm_enrol`].
    ConfirmEnrol(SessionSnapshot, ServerInfo),
    /// [`Callbacks::second_factor_needed`].
    SecondFactorNeeded(SessionSnapshot),
    /// [`Callbacks::on_second_factor`].
    SecondFactor(SessionSnapshot, SecondFactorEvent),
    /// [`Callbacks::on_history`].
    History(HistoryEntry),
    /// [`Callbacks::on_account_deleted`].
    AccountDeleted(AccountInfo),
    /// [`Callbacks::on_transaction_pending`].
    TransactionPending(AccountInfo, PendingTransaction),
}

/// Forwards every callback as an [`Event`] over an unbounded tokio channel (events are
/// dropped once the receiver is gone).
#[derive(Debug, Clone)]
pub struct ChannelCallbacks {
    events: mpsc::UnboundedSender<Event>,
}

impl ChannelCallbacks {
    /// The callbacks and the receiving end.
    #[must_use]
    pub fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<Event>) {
        let (events, rx) = mpsc::unbounded_channel();
        (Arc::new(Self { events }), rx)
    }

    fn send(&self, event: Event) {
        let _ = self.events.send(event);
    }
}

impl Callbacks for ChannelCallbacks {
    fn on_state(&self, session: &SessionSnapshot) {
        self.send(Event::State(session.clone()));
    }
    fn confirm_login(&self, session: &SessionSnapshot, accounts: &[AccountInfo]) {
        self.send(Event::ConfirmLogin(session.clone(), accounts.to_vec()));
    }
    fn confirm_enrol(&self, session: &SessionSnapshot, server: &ServerInfo) {
        self.send(Event::ConfirmEnrol(session.clone(), server.clone()));
    }
    fn second_factor_needed(&self, session: &SessionSnapshot) {
        self.send(Event::SecondFactorNeeded(session.clone()));
    }
    fn on_second_factor(&self, session: &SessionSnapshot, event: &SecondFactorEvent) {
        self.send(Event::SecondFactor(session.clone(), *event));
    }
    fn on_history(&self, entry: &HistoryEntry) {
        self.send(Event::History(entry.clone()));
    }
    fn on_account_deleted(&self, account: &AccountInfo) {
        self.send(Event::AccountDeleted(account.clone()));
    }
    fn on_transaction_pending(&self, account: &AccountInfo, pending: &PendingTransaction) {
        self.send(Event::TransactionPending(account.clone(), pending.clone()));
    }
}
