//! [`Sdk`], the app's entry point: opens the local state, lists accounts, servers and
//! history, starts sessions, and keeps accounts in step with their servers (refresh,
//! delete, listen).
//!
//! Rules enforced here:
//! - the state lives behind one lock, changed by [`Inner::write`]: the change is saved first
//!   and only then becomes visible, so memory never runs ahead of storage; the lock is never
//!   held across an `.await`;
//! - an account the gateway reports deleted (a `refused: account_deleted` handshake or an
//!   `account_deleted` notice) is forgotten at once and the app told
//!   ([`Callbacks::on_account_deleted`]);
//! - account connections use the server key pinned at enrolment, never a fetched one;
//! - transactions are signed only after a fresh second factor, over the data and text the app
//!   was given to show (see `transaction`);
//! - the SFS is the one of [`SdkConfig::sfs`], with its pinned keys; without it, no second
//!   factor can be given ([`SdkError::SecondFactorUnavailable`]) and enrolments leave their
//!   accounts headless;
//! - the Message Center is the one of [`SdkConfig::mc`], with its pinned key; push messages
//!   are checked and run by [`crate::push`] (once each, even across restarts).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use countersign_protocol::device::{Answer, Bytes, Intent, Notice, Refusal, RequestBody};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::callbacks::{Callbacks, NoCallbacks};
use crate::client::{self, Connection, Target};
use crate::error::SdkError;
use crate::model::{
    AccountInfo, HistoryEntry, PendingTransaction, SecondFactor, ServerInfo, TransactionDetails,
    TransactionReceipt, TransactionTarget,
};
use crate::persisted::Persisted;
use crate::push::{McConfig, Platform, PullReport, PushAction, PushRegistration};
use crate::second_factor::{
    self, Argon2Params, BiometricPrompt, Pin, SecondFactorStatus, SfsConfig,
};
use crate::session::{self, SessionHandle};
use crate::storage::{Storage, StorageError};
use crate::transaction::{self, Extras, Own};

/// How the SDK behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdkConfig {
    /// With exactly one eligible account, a login does not wait for the user to pick it.
    pub skip_single_account_confirmation: bool,
    /// A session still starting or waiting for the user this long after its last state
    /// change goes to Done (Aborted). Default 120 s.
    pub interaction_timeout: Duration,
    /// How long one request (or a handshake, or the key fetch) may take. Default 10 s.
    pub request_timeout: Duration,
    /// The second-factor server this app is bound to, with its pinned keys; `None`: no
    /// second factor (logins that need one cannot complete, enrolments stay headless).
    pub sfs: Option<SfsConfig>,
    /// Argon2id parameters of the PIN's key stretching (default m = 19 MiB, t = 2, p = 1).
    /// A PIN registered with some parameters only verifies with the same ones.
    pub argon2_params: Argon2Params,
    /// The Message Center this app is bound to, with its pinned key; `None`: no push
    /// ([`Sdk::register_push`] answers [`SdkError::PushUnavailable`]).
    pub mc: Option<McConfig>,
    /// An AppLogin ([`Sdk::app_login`]) the app reports no activity for this long
    /// ([`SessionHandle::touch`]) logs out. Default 5 minutes.
    pub app_login_inactivity_timeout: Duration,
    /// How often an AppLogin pings, seconds (1..=3600). Default 300, as the product advises
    /// for critical apps.
    pub app_login_ping_time_secs: u32,
}

impl Default for SdkConfig {
    fn default() -> Self {
        Self {
            skip_single_account_confirmation: false,
            interaction_timeout: Duration::from_secs(120),
            request_timeout: Duration::from_secs(10),
            sfs: None,
            argon2_params: Argon2Params::default(),
            mc: None,
            app_login_inactivity_timeout: Duration::from_secs(300),
            app_login_ping_time_secs: 300,
        }
    }
}

/// The mobile SDK. Cheap to clone; every clone shares the same state.
#[derive(Clone)]
pub struct Sdk {
    inner: Arc<Inner>,
}

impl fmt::Debug for Sdk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sdk")
            .field("storage", &self.inner.storage)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// What [`Sdk::refresh`] did, account by account.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RefreshReport {
    /// Accounts whose server answered; their server's parameters are up to date.
    pub refreshed: Vec<String>,
    /// Accounts the server deleted, now forgotten.
    pub forgotten: Vec<AccountInfo>,
    /// Accounts that could not be checked, and why (kept).
    pub failed: Vec<(String, SdkError)>,
}

/// Why a [`Listener`] stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenEnd {
    /// The server deleted the account; the SDK forgot it.
    AccountDeleted(AccountInfo),
    /// The connection closed for another reason (or the listener was stopped).
    Closed,
}

/// An open connection for one account, so that a server-side deletion or a new transaction
/// reaches the device at once. Dropping it closes the connection.
pub struct Listener {
    account_id: String,
    task: Option<JoinHandle<ListenEnd>>,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("account_id", &self.account_id)
            .finish_non_exhaustive()
    }
}

impl Listener {
    /// Waits until the connection ends; answers why.
    pub async fn ended(mut self) -> ListenEnd {
        match self.task.take() {
            Some(task) => task.await.unwrap_or(ListenEnd::Closed),
            None => ListenEnd::Closed,
        }
    }

    /// Closes the connection.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Sdk {
    /// Opens the SDK over `storage`; a first open creates the app instance id.
    ///
    /// # Errors
    /// [`SdkError::Storage`] when the state cannot be read (wrong key, tampered) or written.
    pub fn open(storage: Arc<dyn Storage>, config: SdkConfig) -> Result<Self, SdkError> {
        let state = match storage.load()? {
            Some(bytes) => Persisted::decode(&zeroize::Zeroizing::new(bytes))?,
            None => {
                let state = Persisted::new(crate::random::bytes()?);
                storage.save(&state.encode()?)?;
                state
            }
        };
        let http = reqwest::Client::builder()
            .build()
            .map_err(|e| SdkError::Transport(e.to_string()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                storage,
                config,
                state: Mutex::new(state),
                http,
                biometric: Mutex::new(None),
                clock: Mutex::new(None),
                channels: Mutex::new(std::collections::HashMap::new()),
                sfs_channel: tokio::sync::Mutex::new(None),
                sessions: session::Registry::default(),
                mc_lock: tokio::sync::Mutex::new(()),
                headless_lock: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Sets the platform's biometric check, which releases the biometric key
    /// ([`SecondFactor::Biometric`]).
    ///
    /// # Errors
    /// [`SdkError::Storage`] if the lock is poisoned.
    pub fn set_biometric_prompt(&self, prompt: Arc<dyn BiometricPrompt>) -> Result<(), SdkError> {
        *self.inner.biometric.lock().map_err(poisoned)? = Some(prompt);
        Ok(())
    }

    /// Replaces the device's clock (default: the system clock), for a virtual device or a test
    /// whose servers run on a clock of their own. It dates transaction signatures, which the
    /// gateway accepts only within the SFS attestation's validity.
    ///
    /// # Errors
    /// [`SdkError::Storage`] if the lock is poisoned.
    pub fn set_clock(&self, clock: DeviceClock) -> Result<(), SdkError> {
        *self.inner.clock.lock().map_err(poisoned)? = Some(clock);
        Ok(())
    }

    /// What the SFS says about this app instance's second factor (opens an SFS channel).
    ///
    /// # Errors
    /// [`SdkError::SecondFactorUnavailable`] without an SFS; [`SdkError::SfsRefused`],
    /// [`SdkError::Transport`], [`SdkError::Timeout`].
    pub async fn second_factor_status(&self) -> Result<SecondFactorStatus, SdkError> {
        second_factor::status(&self.inner).await
    }

    /// Gives a headless account a second factor: asks its server for the `upgrade`
    /// challenge, has the SFS attest `factor` (registering the PIN first if this app
    /// instance has none at the SFS yet), and sends `upgrade_account`. The account is then
    /// no longer headless.
    ///
    /// # Errors
    /// [`SdkError::UnknownAccount`]; [`SdkError::SecondFactor`] when the factor is refused
    /// (wrong PIN…: nothing changed, the app may retry); [`SdkError::SecondFactorUnavailable`]
    /// without an SFS; [`SdkError::Server`] when the server refuses (`bad_attestation`…);
    /// transport errors.
    #[tracing::instrument(skip_all, fields(account_id = %account_id))]
    pub async fn upgrade_account(
        &self,
        account_id: &str,
        factor: SecondFactor,
    ) -> Result<AccountInfo, SdkError> {
        if self.inner.config.sfs.is_none() {
            return Err(SdkError::SecondFactorUnavailable);
        }
        let (connection, _notices) = self
            .inner
            .connect_account(account_id, None, &NoCallbacks)
            .await?;
        second_factor::upgrade(&self.inner, &connection, account_id, &factor).await?;
        self.inner
            .read(|s| s.accounts.get(account_id).map(|a| s.account_info(a)))?
            .ok_or(SdkError::UnknownAccount)
    }

    /// Changes the app PIN at the SFS: the old PIN must verify first (a wrong one counts as
    /// a failed attempt, like any).
    ///
    /// # Errors
    /// [`SdkError::SecondFactor`] for a wrong, locked or revoked old PIN;
    /// [`SdkError::SecondFactorUnavailable`] without an SFS; transport errors.
    pub async fn change_pin(&self, old: Pin, new: Pin) -> Result<(), SdkError> {
        second_factor::change_pin(&self.inner, &old, &new).await
    }

    /// Makes a biometric key and registers it at the SFS, proven by the PIN; afterwards
    /// [`SecondFactor::Biometric`] works (through the [`BiometricPrompt`]).
    ///
    /// # Errors
    /// As [`change_pin`](Self::change_pin).
    pub async fn register_biometric(&self, pin: Pin) -> Result<(), SdkError> {
        second_factor::register_biometric(&self.inner, &pin).await
    }

    /// Reads a transaction code (a QR code's raw bytes, its base64url text or a
    /// `countersign:` deep link): which transaction, and this device's accounts at its server.
    ///
    /// # Errors
    /// [`SdkError::InvalidInput`] for input that is no countersign code;
    /// [`SdkError::InvalidTransaction`] for a login or enrolment code; [`SdkError::NoAccounts`]
    /// when this device has no account at the server; [`SdkError::FingerprintMismatch`] when
    /// the code names another server key than the one pinned at enrolment.
    pub fn transaction_from_input(&self, input: &[u8]) -> Result<TransactionTarget, SdkError> {
        let payload = session::decode_input(input)?;
        let id = payload.transaction_id().ok_or_else(|| {
            SdkError::InvalidTransaction("this code is not a transaction code".into())
        })?;
        let server_id = hex::encode(payload.server_id);
        let pinned = self.inner.read(|s| {
            s.servers
                .get(&server_id)
                .map(|server| server.fingerprint.clone())
        })?;
        match pinned {
            None => return Err(SdkError::NoAccounts),
            Some(pinned) if pinned != hex::encode(payload.server_key_fingerprint) => {
                return Err(SdkError::FingerprintMismatch);
            }
            Some(_) => {}
        }
        let accounts: Vec<AccountInfo> = self
            .accounts()?
            .into_iter()
            .filter(|a| a.server_id == server_id)
            .collect();
        if accounts.is_empty() {
            return Err(SdkError::NoAccounts);
        }
        Ok(TransactionTarget {
            server_id,
            transaction_id: hex::encode(id),
            accounts,
        })
    }

    /// The transactions waiting for `account_id`'s approval, oldest first.
    ///
    /// # Errors
    /// [`SdkError::UnknownAccount`]; [`SdkError::Server`] when the gateway refuses; transport
    /// errors.
    #[tracing::instrument(skip_all, fields(account_id = %account_id))]
    pub async fn pending_transactions(
        &self,
        account_id: &str,
    ) -> Result<Vec<PendingTransaction>, SdkError> {
        transaction::pending(&self.inner, account_id).await
    }

    /// Fetches a transaction to show it to the user (the server records that it was shown).
    /// Show at least its text (and its content type) before asking to approve.
    ///
    /// # Errors
    /// [`SdkError::UnknownAccount`]; [`SdkError::InvalidTransaction`] for an id that is not
    /// 32 hex digits; [`SdkError::Server`] with `not_found`, `not_allowed` (another user's, or
    /// meant for another account), `ended`, `expired`; transport errors.
    #[tracing::instrument(skip_all, fields(account_id = %account_id))]
    pub async fn get_transaction(
        &self,
        account_id: &str,
        transaction_id: &str,
    ) -> Result<TransactionDetails, SdkError> {
        transaction::get(&self.inner, account_id, transaction_id).await
    }

    /// Approves a transaction the user was shown: has the SFS attest `factor` for the
    /// transaction's challenge (computed here from `shown`'s data and text, never from a hash
    /// the server sent), signs the transaction with the account's key, and sends both. A fresh
    /// factor is asked every time. `device_data` (at most 32 entries) and `client_data` (at
    /// most 4 KiB) are signed with it.
    ///
    /// # Errors
    /// [`SdkError::UnknownAccount`]; [`SdkError::InvalidTransaction`] (a limit broken, or
    /// `shown` is of another server); [`SdkError::SecondFactor`] when the factor is refused
    /// (nothing was sent: the app may retry); [`SdkError::SecondFactorUnavailable`];
    /// [`SdkError::Server`] when the gateway refuses (`bad_attestation`, `invalid`, `ended`,
    /// `expired`…); transport errors.
    #[tracing::instrument(skip_all, fields(account_id = %account_id))]
    pub async fn sign_transaction(
        &self,
        account_id: &str,
        shown: &TransactionDetails,
        factor: SecondFactor,
        device_data: BTreeMap<String, String>,
        client_data: Option<Vec<u8>>,
    ) -> Result<TransactionReceipt, SdkError> {
        if self.inner.config.sfs.is_none() {
            return Err(SdkError::SecondFactorUnavailable);
        }
        let extras = Extras {
            device_data,
            client_data,
        };
        transaction::sign(&self.inner, account_id, shown, &factor, extras).await
    }

    /// Declines a transaction.
    ///
    /// # Errors
    /// As [`get_transaction`](Self::get_transaction).
    #[tracing::instrument(skip_all, fields(account_id = %account_id))]
    pub async fn reject_transaction(
        &self,
        account_id: &str,
        transaction_id: &str,
    ) -> Result<(), SdkError> {
        transaction::reject(&self.inner, account_id, transaction_id).await
    }

    /// Signs a transaction of the app's own (not one a business system created): `data`
    /// (`content_type`) and the `text` the app showed the user, after a fresh `factor`. The
    /// server stores it only once the signature is accepted; the receipt names its new id.
    ///
    /// # Errors
    /// As [`sign_transaction`](Self::sign_transaction); `invalid` from the server for data,
    /// content type or text it does not accept.
    #[tracing::instrument(skip_all, fields(account_id = %account_id))]
    #[allow(clippy::too_many_arguments)]
    pub async fn sign_own_transaction(
        &self,
        account_id: &str,
        data: Vec<u8>,
        content_type: &str,
        text: &str,
        factor: SecondFactor,
        device_data: BTreeMap<String, String>,
        client_data: Option<Vec<u8>>,
    ) -> Result<TransactionReceipt, SdkError> {
        if self.inner.config.sfs.is_none() {
            return Err(SdkError::SecondFactorUnavailable);
        }
        let own = Own {
            data,
            content_type: content_type.to_owned(),
            text: text.to_owned(),
        };
        let extras = Extras {
            device_data,
            client_data,
        };
        transaction::sign_own(&self.inner, account_id, own, &factor, extras).await
    }

    /// This app installation's id, 32 hex digits.
    ///
    /// # Errors
    /// [`SdkError::Storage`] if the state lock is poisoned.
    pub fn app_instance(&self) -> Result<String, SdkError> {
        self.inner.read(|s| s.app_instance.clone())
    }

    /// The accounts on this device, oldest first.
    ///
    /// # Errors
    /// [`SdkError::Storage`] if the state lock is poisoned.
    pub fn accounts(&self) -> Result<Vec<AccountInfo>, SdkError> {
        self.inner.read(|s| {
            let mut accounts: Vec<AccountInfo> =
                s.accounts.values().map(|a| s.account_info(a)).collect();
            accounts.sort_by(|a, b| {
                (a.created_at_ms, &a.account_id).cmp(&(b.created_at_ms, &b.account_id))
            });
            accounts
        })
    }

    /// The servers this device holds accounts at.
    ///
    /// # Errors
    /// [`SdkError::Storage`] if the state lock is poisoned.
    pub fn servers(&self) -> Result<Vec<ServerInfo>, SdkError> {
        self.inner
            .read(|s| s.servers.values().map(|r| r.info()).collect())
    }

    /// The history, oldest first.
    ///
    /// # Errors
    /// [`SdkError::Storage`] if the state lock is poisoned.
    pub fn history(&self) -> Result<Vec<HistoryEntry>, SdkError> {
        self.inner.read(|s| s.history.clone())
    }

    /// Starts a session from a QR code's raw bytes, its base64url text or a `countersign:`
    /// deep link, and runs its `Starting` phase: answers the session waiting for the user
    /// (or already Active/Done when nothing was asked of them).
    ///
    /// # Errors
    /// [`SdkError::InvalidInput`] for input that is no countersign code (no session is
    /// made). Every other failure ends the session in `Error` (recorded in the history and
    /// told to `callbacks`) and is also answered here: [`SdkError::NoAccounts`] for a login
    /// at a server this device has no account at, [`SdkError::FingerprintMismatch`],
    /// [`SdkError::Server`], [`SdkError::Transport`], [`SdkError::Timeout`].
    pub async fn start_session(
        &self,
        input: &[u8],
        callbacks: Arc<dyn Callbacks>,
    ) -> Result<SessionHandle, SdkError> {
        session::start(Arc::clone(&self.inner), input, callbacks).await
    }

    /// Logs the user in to the app itself (AppLogin) with `account_id`, or with the one account
    /// this device holds when `None`: the gateway opens a continuous session and the SDK goes
    /// from `Starting` straight to `WaitForSecondFactor` (no confirmation); once the factor
    /// is given it logs in (Active, pinging every
    /// [`SdkConfig::app_login_ping_time_secs`]), and the snapshot carries the
    /// [`crate::WebNonce`] for the app's backend. It logs out on
    /// [`SessionHandle::stop_session`], when the backend or the server ends it, and after
    /// [`SdkConfig::app_login_inactivity_timeout`] without [`SessionHandle::touch`].
    ///
    /// # Errors
    /// Before a session exists (none is recorded): [`SdkError::InvalidConfig`],
    /// [`SdkError::UnknownAccount`] (no such account, or `None` with several),
    /// [`SdkError::NoAccounts`], [`SdkError::Server`] (`not_allowed` for a headless
    /// account: upgrade it first), transport errors.
    pub async fn app_login(
        &self,
        account_id: Option<&str>,
        callbacks: Arc<dyn Callbacks>,
    ) -> Result<SessionHandle, SdkError> {
        session::app_login::start(Arc::clone(&self.inner), account_id, callbacks).await
    }

    /// Sends app data over the secure channel to `server`'s Data Service and answers what it
    /// said, with no user interaction (docs/data-service.md). The oldest account this device
    /// holds at the server sends it; with none, a headless account is enrolled first (if the
    /// server's policy allows it) and kept for later messages. Answers the account used and
    /// the Data Service's answer (a 4xx is an answer: the DS refused the data).
    ///
    /// # Errors
    /// [`SdkError::InvalidConfig`] for a malformed [`DataServer`](crate::DataServer) or data
    /// over 64 KiB; [`SdkError::FingerprintMismatch`]; [`SdkError::Server`] with
    /// `not_allowed` (the server allows no headless accounts), `data_service_not_configured`,
    /// `data_service_unavailable` / `data_service_timeout` (retry: the Data Service sees the
    /// same request id only when the SDK resends after a lost connection),
    /// `data_service_failed`, `too_large`, `rate_limited`; transport errors.
    pub async fn send_data(
        &self,
        server: &crate::DataServer,
        data: &[u8],
    ) -> Result<(String, crate::DataAnswer), SdkError> {
        crate::data::send(&self.inner, server, data).await
    }

    /// Tells `server` what this device is (model, OS, app version; each at most 100
    /// characters), over the secure channel; the server records it on the account when it
    /// changed. Uses (or enrols) the account as [`send_data`](Self::send_data) does; answers it.
    ///
    /// # Errors
    /// As [`send_data`](Self::send_data); `invalid` for a field over its limit.
    pub async fn set_device_data(
        &self,
        server: &crate::DataServer,
        model: &str,
        os: &str,
        app_version: &str,
    ) -> Result<String, SdkError> {
        crate::data::set_device_data(&self.inner, server, model, os, app_version).await
    }

    /// Deletes an account: tells its server (`delete_account`), then forgets it. It is
    /// forgotten too when the server says it is already gone.
    ///
    /// # Errors
    /// [`SdkError::UnknownAccount`]; network errors leave the account in place, so the
    /// app may retry.
    #[tracing::instrument(skip_all, fields(account_id = %account_id))]
    pub async fn delete_account(&self, account_id: &str) -> Result<AccountInfo, SdkError> {
        let info = self
            .inner
            .read(|s| s.accounts.get(account_id).map(|a| s.account_info(a)))?
            .ok_or(SdkError::UnknownAccount)?;
        match self
            .inner
            .connect_account(account_id, None, &NoCallbacks)
            .await
        {
            Ok((connection, _notices)) => {
                match connection.request(RequestBody::DeleteAccount).await? {
                    Answer::Done => {}
                    _ => {
                        return Err(SdkError::Transport(
                            "unexpected answer to delete_account".into(),
                        ));
                    }
                }
            }
            // Gone, or not this device's to delete: either way nothing here can use it.
            // (`key_mismatch` is what older gateways answer for the second.)
            Err(SdkError::Refused(
                Refusal::AccountDeleted | Refusal::UnknownAccount | Refusal::KeyMismatch,
            )) => {}
            Err(e) => return Err(e),
        }
        self.inner.drop_channels(account_id)?;
        self.inner.write(|s| s.forget_account(account_id))?;
        tracing::info!("account deleted");
        Ok(info)
    }

    /// Connects each account once: refreshes its server's parameters, and forgets the
    /// accounts the server deleted (telling `callbacks`).
    ///
    /// # Errors
    /// [`SdkError::Storage`] if the state cannot be read; per-account failures are in the
    /// report.
    pub async fn refresh(&self, callbacks: &dyn Callbacks) -> Result<RefreshReport, SdkError> {
        let mut report = RefreshReport::default();
        for account in self.accounts()? {
            let id = account.account_id.clone();
            match self.inner.connect_account(&id, None, callbacks).await {
                Ok(_) => report.refreshed.push(id),
                Err(SdkError::Refused(Refusal::AccountDeleted)) => report.forgotten.push(account),
                Err(e) => report.failed.push((id, e)),
            }
        }
        Ok(report)
    }

    /// Keeps a connection open for `account_id` until the server deletes the account (it is
    /// then forgotten at once and `callbacks` told) or the connection ends. Meanwhile each
    /// transaction a business system creates for the account's user is told at once
    /// ([`Callbacks::on_transaction_pending`]).
    ///
    /// # Errors
    /// As the handshake: [`SdkError::UnknownAccount`], [`SdkError::Refused`] (an
    /// `account_deleted` refusal forgets the account first), transport errors.
    pub async fn listen(
        &self,
        account_id: &str,
        callbacks: Arc<dyn Callbacks>,
    ) -> Result<Listener, SdkError> {
        let (connection, notices) = self
            .inner
            .connect_account(account_id, None, callbacks.as_ref())
            .await?;
        let inner = Arc::clone(&self.inner);
        let task = tokio::spawn(listen(
            inner,
            account_id.to_owned(),
            connection,
            notices,
            callbacks,
        ));
        Ok(Listener {
            account_id: account_id.to_owned(),
            task: Some(task),
        })
    }
}

impl Sdk {
    /// Registers this app instance for push at its Message Center ([`SdkConfig::mc`]), then
    /// gives every account's server the mailbox's MC token and the account's push public key
    /// (`register_push` over the gateway; a push key is made for an account that has none).
    /// The mailbox is registered once: a later call only updates the push token (or
    /// registers anew when `platform` or `app_id` changed, or the MC lost the mailbox), and
    /// tells only the servers not told yet. Accounts enrolled afterwards are registered at
    /// enrolment. `push_token` is the FCM registration token or the APNs device token (empty:
    /// pull only); `app_id` the Android package or the APNs topic.
    ///
    /// # Errors
    /// [`SdkError::PushUnavailable`] without an MC; [`SdkError::McRefused`] / [`SdkError::Mc`]
    /// when the MC refuses; transport errors. Per-account failures are in the report (call
    /// again to retry them).
    pub async fn register_push(
        &self,
        platform: Platform,
        push_token: &str,
        app_id: &str,
    ) -> Result<PushRegistration, SdkError> {
        crate::push::register(&self.inner, platform, push_token, app_id).await
    }

    /// The platform rotated the push token: tells the MC.
    ///
    /// # Errors
    /// [`SdkError::PushUnavailable`]; [`SdkError::PushNotRegistered`] before
    /// [`register_push`](Self::register_push); MC refusals; transport errors.
    pub async fn update_push_token(&self, push_token: &str) -> Result<(), SdkError> {
        crate::push::update_push_token(&self.inner, push_token).await
    }

    /// Runs a push message: `payload` is the `cs` value of the FCM data message or the APNs
    /// payload (base64url text), the whole data map / payload as JSON, or the raw envelope;
    /// a wake-up (`cs_wake`, or its value) pulls the mailbox instead
    /// ([`PushAction::Pulled`]). A `login` starts the same session a scanned login code
    /// would, with the message's account as the only one to log in with (answered as
    /// [`PushAction::Login`]; drive it like [`start_session`](Self::start_session)'s).
    ///
    /// # Errors
    /// [`SdkError::Push`] when the message is refused (nothing was done): malformed, sealed
    /// to no key here, no sender key, does not open for that account and server, expired,
    /// already processed. Once a message opened and is new, its id is recorded before it is
    /// acted upon; what the action may fail with is answered then (as `start_session`,
    /// `refresh`, `pending_transactions` do), and the message will not run again.
    pub async fn process_push(
        &self,
        payload: &[u8],
        callbacks: Arc<dyn Callbacks>,
    ) -> Result<PushAction, SdkError> {
        crate::push::process(&self.inner, payload, callbacks).await
    }

    /// Pulls the mailbox's outstanding messages from the MC (call it when the app shows its
    /// main screen, and on a wake-up push), runs each as [`process_push`](Self::process_push)
    /// would (duplicates and expired ones are counted and ignored), and acknowledges every
    /// message pulled.
    ///
    /// # Errors
    /// [`SdkError::PushUnavailable`]; [`SdkError::PushNotRegistered`]; MC refusals;
    /// transport errors (messages acknowledged before stay acknowledged; those not
    /// acknowledged come again and run once).
    pub async fn pull_messages(
        &self,
        callbacks: Arc<dyn Callbacks>,
    ) -> Result<PullReport, SdkError> {
        crate::push::pull(&self.inner, callbacks).await
    }

    /// Whether push is registered with the configured MC: its mailbox id (32 hex digits).
    ///
    /// # Errors
    /// [`SdkError::Storage`] if the state lock is poisoned.
    pub fn push_mailbox(&self) -> Result<Option<String>, SdkError> {
        let Some(config) = self.inner.config.mc.as_ref() else {
            return Ok(None);
        };
        let mc_key = hex::encode(&config.channel_public_key);
        self.inner.read(|s| {
            s.mc.as_ref()
                .filter(|r| r.mc_key == mc_key)
                .map(|r| r.mailbox.clone())
        })
    }
}

async fn listen(
    inner: Arc<Inner>,
    account_id: String,
    connection: Connection,
    mut notices: mpsc::UnboundedReceiver<Notice>,
    callbacks: Arc<dyn Callbacks>,
) -> ListenEnd {
    // Held so the connection stays open while listening.
    let _connection = connection;
    while let Some(notice) = notices.recv().await {
        if let Notice::TransactionPending(pending) = &notice {
            let info = inner.read(|s| s.accounts.get(&account_id).map(|a| s.account_info(a)));
            if let Ok(Some(info)) = info {
                let pending = PendingTransaction {
                    account_id: account_id.clone(),
                    transaction_id: hex::encode(pending.transaction_id.0),
                    announce_info: pending.announce_info.clone(),
                    expires_at_ms: pending.expires_at_ms,
                };
                callbacks.on_transaction_pending(&info, &pending);
            }
            continue;
        }
        if let Notice::AccountDeleted { account_id } = notice {
            match inner.account_deleted(&hex::encode(account_id.0), callbacks.as_ref()) {
                Ok(Some(info)) => return ListenEnd::AccountDeleted(info),
                Ok(None) => return ListenEnd::Closed,
                Err(e) => {
                    tracing::warn!(error = %e, "could not forget a deleted account");
                    return ListenEnd::Closed;
                }
            }
        }
    }
    ListenEnd::Closed
}

/// The shared core of [`Sdk`] and its sessions.
pub(crate) struct Inner {
    storage: Arc<dyn Storage>,
    pub(crate) config: SdkConfig,
    state: Mutex<Persisted>,
    pub(crate) http: reqwest::Client,
    biometric: Mutex<Option<Arc<dyn BiometricPrompt>>>,
    clock: Mutex<Option<DeviceClock>>,
    /// Each account's gateway channel for transaction requests, kept open between them so a
    /// phone approving one transaction after another pays one handshake, not one per request.
    pub(crate) channels: Mutex<std::collections::HashMap<String, Connection>>,
    /// The SFS channel, kept open between second-factor proofs for the same reason; one proof
    /// at a time (a user enters one PIN at a time).
    pub(crate) sfs_channel: tokio::sync::Mutex<Option<crate::sfs_client::SfsConnection>>,
    /// The sessions still held, so a push can end the login of an hsid.
    pub(crate) sessions: session::Registry,
    /// One Message Center registration or token update at a time.
    pub(crate) mc_lock: tokio::sync::Mutex<()>,
    /// One headless enrolment at a time (secure channel; see `data`).
    pub(crate) headless_lock: tokio::sync::Mutex<()>,
}

/// A device clock: milliseconds since the Unix epoch.
pub type DeviceClock = Arc<dyn Fn() -> i64 + Send + Sync>;

fn poisoned<T>(_: T) -> SdkError {
    SdkError::Storage(StorageError::Io("the state lock is poisoned".into()))
}

/// Milliseconds since the Unix epoch: the SDK is an edge and reads the clock.
pub(crate) fn now_ms() -> i64 {
    #[allow(
        clippy::disallowed_methods,
        reason = "the SDK is an edge: it reads the clock"
    )]
    let now = std::time::SystemTime::now();
    now.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Parses an id of `N` bytes from hex (ids in the state are hex).
pub(crate) fn parse_id<const N: usize>(text: &str) -> Result<[u8; N], SdkError> {
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out)
        .map_err(|_| SdkError::Storage(StorageError::Malformed("an id is not hex".into())))?;
    Ok(out)
}

impl Inner {
    /// Sends a transaction request on the account's kept channel, opening one when there is
    /// none or the kept one has closed (then the request is sent again on the new one: every
    /// transaction request is idempotent at the gateway).
    pub(crate) async fn account_request(
        &self,
        account_id: &str,
        body: RequestBody,
    ) -> Result<Answer, SdkError> {
        let kept = self
            .channels
            .lock()
            .map_err(poisoned)?
            .get(account_id)
            .cloned();
        if let Some(connection) = kept {
            match connection.request(body.clone()).await {
                Err(SdkError::Transport(_)) => {
                    self.channels.lock().map_err(poisoned)?.remove(account_id);
                }
                other => return other,
            }
        }
        let (connection, _notices) = self.connect_account(account_id, None, &NoCallbacks).await?;
        self.channels
            .lock()
            .map_err(poisoned)?
            .insert(account_id.to_owned(), connection.clone());
        connection.request(body).await
    }

    /// Forgets the account's kept channel (the account is gone).
    pub(crate) fn drop_channels(&self, account_id: &str) -> Result<(), SdkError> {
        self.channels.lock().map_err(poisoned)?.remove(account_id);
        Ok(())
    }

    /// The device's clock: the app's, if it set one, else the system's.
    pub(crate) fn device_time_ms(&self) -> Result<i64, SdkError> {
        let clock = self.clock.lock().map_err(poisoned)?.clone();
        Ok(clock.map_or_else(now_ms, |clock| clock()))
    }

    /// The app's biometric check, if it set one.
    pub(crate) fn biometric_prompt(&self) -> Result<Option<Arc<dyn BiometricPrompt>>, SdkError> {
        Ok(self.biometric.lock().map_err(poisoned)?.clone())
    }

    pub(crate) fn read<T>(&self, f: impl FnOnce(&Persisted) -> T) -> Result<T, SdkError> {
        let state = self.state.lock().map_err(poisoned)?;
        Ok(f(&state))
    }

    /// Applies `f` to a copy, saves the copy if it changed, then makes it current.
    pub(crate) fn write<T>(&self, f: impl FnOnce(&mut Persisted) -> T) -> Result<T, SdkError> {
        let mut state = self.state.lock().map_err(poisoned)?;
        let mut next = state.clone();
        let out = f(&mut next);
        if next != *state {
            self.storage.save(&next.encode()?)?;
            *state = next;
        }
        Ok(out)
    }

    /// Forgets an account the server deleted; tells `callbacks` if it was known.
    pub(crate) fn account_deleted(
        &self,
        account_id: &str,
        callbacks: &dyn Callbacks,
    ) -> Result<Option<AccountInfo>, SdkError> {
        self.drop_channels(account_id)?;
        let info = self.write(|s| s.forget_account(account_id))?;
        if let Some(info) = &info {
            tracing::info!(account_id, "the server deleted the account; forgotten");
            callbacks.on_account_deleted(info);
        }
        Ok(info)
    }

    /// Opens a channel as `account_id` with its pinned server key, at `gateway` (default:
    /// the one stored at enrolment). Refreshes the server's cached parameters from the
    /// `Welcome`; forgets the account on an `account_deleted` refusal.
    pub(crate) async fn connect_account(
        &self,
        account_id: &str,
        gateway: Option<&str>,
        callbacks: &dyn Callbacks,
    ) -> Result<(Connection, mpsc::UnboundedReceiver<Notice>), SdkError> {
        let (account, server) = self
            .read(|s| {
                let account = s.accounts.get(account_id)?.clone();
                let server = s.servers.get(&account.server_id)?.clone();
                Some((account, server))
            })?
            .ok_or(SdkError::UnknownAccount)?;
        let target = Target {
            server_id: parse_id(&server.server_id)?,
            gateway: gateway.unwrap_or(&server.gateway).to_owned(),
            public_key: server.public_key()?,
        };
        let key = account.channel_key.to_key()?;
        let intent = Intent::Account {
            account_id: Bytes(parse_id(&account.account_id)?),
        };
        match client::connect(&target, &key, intent, self.config.request_timeout).await {
            Ok((connection, notices)) => {
                self.write(|s| {
                    if let Some(record) = s.servers.get_mut(&server.server_id) {
                        record.refresh(connection.params());
                    }
                })?;
                Ok((connection, notices))
            }
            Err(SdkError::Refused(Refusal::AccountDeleted)) => {
                self.account_deleted(account_id, callbacks)?;
                Err(SdkError::Refused(Refusal::AccountDeleted))
            }
            Err(e) => Err(e),
        }
    }
}
