//! What each device request does: the checks only the gateway can make (who is on this
//! channel, the server's policy), then a command, then the answer.
//!
//! - `enrol` (guest): the enrolment token names the enrolment; the new account's id is
//!   derived from the enrolment and the channel key, so a device that lost the answer and
//!   retries lands on the same account, while another device presenting the same token finds
//!   the enrolment completed. The enrolment is completed before the account is registered:
//!   a crash in between is repaired by the retry, and no second account can use the token.
//! - `confirm` / `log_in`: only an account channel; the session must be meant for the
//!   account's user, if the business system named one; a server whose policy asks a second
//!   factor for logins answers `second_factor_required` (the SFS flow plugs in here).
//! - `ping` / `log_out`: only by the account that logged in.
//! - `app_login`: see [`app_login`]; its `log_in` needs a second factor verified on the
//!   session itself, whatever the server's policy and reuse window.
//! - transactions: see [`transaction`].
//! - errors of the domain keep their meaning: not found, expired, ended, conflict; anything
//!   on our side is `internal` with no detail (the cause is logged).

mod app_login;
pub(crate) mod data;
mod push;
#[cfg(test)]
mod test_world;
#[cfg(test)]
mod tests;
mod transaction;

use std::collections::HashSet;

use countersign_commands::CommandError;
use countersign_commands::Loaded;
use countersign_domain::Timestamp;
use countersign_domain::account::ActiveAccount;
use countersign_domain::account::{RecordVerification, RegisterAccount, UpgradeAccount};
use countersign_domain::attestation::UseAttestation;
use countersign_domain::enrolment::Enrolment;
use countersign_domain::second_factor::SecondFactorKind;
use countersign_domain::server::ServerSettings;
use countersign_domain::session::{
    ConfirmSession, LogIn, LogOut, LogoutReason, Ping, ScanSession, VerifySecondFactor,
};
use countersign_domain::session::{Session, SessionFailure};
use countersign_domain::{
    AccountId, AccountRef, AppInstanceId, EnrolmentRef, ErrorKind, Hsid, ServerId, SessionRef,
    UserRef,
};
use countersign_eventstore::Metadata;
use countersign_protocol::attestation::{
    AttestationClaims, Expected, Factor, attestation_hash, verify_attestation,
};
use countersign_protocol::device::{
    Answer, Bytes, ChallengePurpose, DeviceError, ErrorCode, FailReason, RequestBody,
    SessionDetails,
};
use sha2::{Digest, Sha256};

use crate::Gateway;
use crate::hub::ConnectionId;

/// Who is on the channel.
#[derive(Debug)]
pub(crate) enum Identity {
    /// No account yet; the key the device connected with.
    Guest { channel_key: Vec<u8> },
    /// An enrolled, active account.
    Account(Box<ActiveAccount>),
}

/// A connection's state between requests.
pub(crate) struct Connection {
    pub gateway: Gateway,
    pub server: ServerId,
    pub settings: ServerSettings,
    pub identity: Identity,
    pub id: ConnectionId,
    /// Sessions this connection scanned (it may abort them).
    pub scanned: HashSet<Hsid>,
    /// Set by a request after which the gateway closes the channel.
    pub close_after_reply: bool,
}

fn error(code: ErrorCode, message: &str) -> DeviceError {
    DeviceError::new(code, message)
}

/// Maps a command's refusal to the device's error codes; internal failures are logged and
/// answered without detail.
fn refused(e: CommandError) -> DeviceError {
    match e {
        CommandError::Rejected { kind, message } => {
            let code = match kind {
                ErrorKind::Invalid => ErrorCode::Invalid,
                ErrorKind::NotFound => ErrorCode::NotFound,
                ErrorKind::Conflict => ErrorCode::Conflict,
                ErrorKind::Gone if message.contains("expired") => ErrorCode::Expired,
                ErrorKind::Gone => ErrorCode::Ended,
                ErrorKind::Internal => ErrorCode::Internal,
            };
            DeviceError::new(code, message)
        }
        CommandError::Conflict { .. } => error(ErrorCode::Conflict, "busy; try again"),
        other => internal(&other),
    }
}

fn internal(e: &dyn std::fmt::Display) -> DeviceError {
    tracing::error!(error = %e, "device request failed");
    error(ErrorCode::Internal, "internal error")
}

impl Connection {
    fn metadata(&self) -> Metadata {
        let actor = match &self.identity {
            Identity::Guest { .. } => "device".to_owned(),
            Identity::Account(active) => format!("account:{}", active.account.account_id),
        };
        Metadata {
            actor: Some(actor),
            ..Metadata::default()
        }
    }

    fn account(&self) -> Result<&ActiveAccount, DeviceError> {
        match &self.identity {
            Identity::Account(active) => Ok(active),
            Identity::Guest { .. } => Err(error(
                ErrorCode::NotAllowed,
                "only an enrolled account may do this; connect as the account",
            )),
        }
    }

    fn session(&self, hsid: &Bytes<32>) -> SessionRef {
        SessionRef::new(self.server, Hsid::from_bytes(hsid.0))
    }

    async fn load_session(&self, session: SessionRef) -> Result<Session, DeviceError> {
        Ok(self.load_session_for_command(session).await?.state)
    }

    /// The session as loaded, to check and then decide on without loading it again.
    async fn load_session_for_command(
        &self,
        session: SessionRef,
    ) -> Result<Loaded<Session>, DeviceError> {
        let loaded = self
            .gateway
            .0
            .commands
            .sessions
            .load(session)
            .await
            .map_err(refused)?;
        match loaded.state {
            Session::NotOpened => Err(error(ErrorCode::NotFound, "session not found")),
            _ => Ok(loaded),
        }
    }

    /// Whether a login on this channel must prove a second factor now: the policy asks one
    /// and (for an account) none was proven within the server's reuse window.
    async fn second_factor_required(&self) -> Result<bool, DeviceError> {
        let policy = &self.settings.second_factor;
        if !policy.require_for_login {
            return Ok(false);
        }
        Ok(self.recent_verification().await?.is_none())
    }

    /// The account's last second factor, if it is within the server's reuse window, read from
    /// the account's stream (it may have changed since the handshake).
    async fn recent_verification(
        &self,
    ) -> Result<Option<(SecondFactorKind, [u8; 32], Timestamp)>, DeviceError> {
        let Identity::Account(active) = &self.identity else {
            return Ok(None);
        };
        let window = self.settings.second_factor.login_reuse_window_secs;
        if window == 0 {
            return Ok(None);
        }
        let gateway = &self.gateway.0;
        let loaded = gateway
            .commands
            .accounts
            .load(active.account)
            .await
            .map_err(refused)?;
        let now = gateway.clock.now();
        Ok(match loaded.state {
            countersign_domain::Account::Active(a) if a.verified_within(window, now) => {
                a.last_verification
            }
            _ => None,
        })
    }

    /// The session must be meant for this account's user, when the opener named one.
    fn check_intended_user(&self, state: &Session) -> Result<(), DeviceError> {
        let account = self.account()?;
        match state.opened().and_then(|o| o.user) {
            Some(intended) if account.user != Some(intended) => Err(error(
                ErrorCode::NotAllowed,
                "this session is meant for another user",
            )),
            _ => Ok(()),
        }
    }
}

/// Handles one request.
pub(crate) async fn handle(
    conn: &mut Connection,
    body: RequestBody,
) -> Result<Answer, DeviceError> {
    let commands = conn.gateway.0.commands.clone();
    let metadata = conn.metadata();
    match body {
        RequestBody::Enrol {
            token,
            signing_public_key,
            app_instance,
        } => enrol(conn, token.expose(), signing_public_key.0, app_instance.0).await,
        RequestBody::Scan { hsid } => {
            let session = conn.session(&hsid);
            let opened = watching(conn, session, async {
                let loaded = conn.load_session_for_command(session).await?;
                let opened = loaded
                    .state
                    .opened()
                    .cloned()
                    .ok_or_else(|| error(ErrorCode::NotFound, "session not found"))?;
                commands
                    .sessions
                    .run_on(session, loaded, ScanSession.into(), &metadata)
                    .await
                    .map_err(refused)?;
                Ok(opened)
            })
            .await?;
            conn.scanned.insert(session.hsid);
            Ok(Answer::Session(SessionDetails {
                announce_info: opened.announce_info.clone(),
                ping_time_secs: opened.ping_time_secs,
                second_factor_required: conn.second_factor_required().await?,
                expires_at_ms: opened.expires_at.as_millis(),
            }))
        }
        RequestBody::Confirm { hsid } => {
            let session = conn.session(&hsid);
            let account = conn.account()?.account.account_id;
            watching(conn, session, async {
                let loaded = conn.load_session_for_command(session).await?;
                conn.check_intended_user(&loaded.state)?;
                let confirm = ConfirmSession {
                    account_id: account,
                };
                commands
                    .sessions
                    .run_on(session, loaded, confirm.into(), &metadata)
                    .await
                    .map_err(refused)?;
                Ok(Answer::Done)
            })
            .await
        }
        RequestBody::LogIn { hsid } => {
            let session = conn.session(&hsid);
            let active = conn.account()?;
            let (account, user) = (active.account.account_id, active.user);
            let user = user.ok_or_else(|| {
                error(
                    ErrorCode::NotAllowed,
                    "this account is not linked to a user",
                )
            })?;
            watching(conn, session, async {
                let loaded = conn.load_session_for_command(session).await?;
                conn.check_intended_user(&loaded.state)?;
                let opened = loaded
                    .state
                    .opened()
                    .cloned()
                    .ok_or_else(|| error(ErrorCode::NotFound, "session not found"))?;
                let verified = matches!(&loaded.state,
                    Session::SecondFactorVerified { account_id, .. } if *account_id == account);
                let log_in = LogIn {
                    account_id: account,
                    user,
                };
                if opened.app_login && !verified {
                    // An AppLogin always asks a factor proven on the session: a reused one
                    // would unlock the app without the user present (docs/app-login.md).
                    return Err(error(
                        ErrorCode::SecondFactorRequired,
                        "an AppLogin needs a second factor verified on this session: verify one first",
                    ));
                }
                if conn.settings.second_factor.require_for_login && !verified {
                    // A factor proven recently enough may stand in, per the server's policy.
                    let Some((factor, attestation_hash, verified_at)) =
                        conn.recent_verification().await?
                    else {
                        return Err(error(
                            ErrorCode::SecondFactorRequired,
                            "this server asks a second factor for logins: verify one first",
                        ));
                    };
                    let reuse = VerifySecondFactor {
                        factor,
                        attestation_hash,
                        verified_at,
                        reused: true,
                    };
                    commands
                        .sessions
                        .run_on(session, loaded, reuse.into(), &metadata)
                        .await
                        .map_err(refused)?;
                    commands
                        .sessions
                        .log_in(session, account, user, &metadata)
                        .await
                        .map_err(refused)?;
                } else {
                    commands
                        .sessions
                        .run_on(session, loaded, log_in.into(), &metadata)
                        .await
                        .map_err(refused)?;
                }
                Ok(Answer::LoggedIn {
                    session_info: opened.session_info.clone(),
                    ping_time_secs: opened.ping_time_secs,
                })
            })
            .await
        }
        RequestBody::Ping { hsid } => {
            let session = conn.session(&hsid);
            let loaded = logged_in_by_me(conn, session).await?;
            commands
                .sessions
                .run_on(session, loaded, Ping.into(), &metadata)
                .await
                .map_err(refused)?;
            Ok(Answer::Done)
        }
        RequestBody::LogOut { hsid } => {
            let session = conn.session(&hsid);
            let loaded = match logged_in_by_me(conn, session).await {
                Ok(loaded) => loaded,
                // Logging out of a session that ended already is done.
                Err(e) if e.code == ErrorCode::Ended => return Ok(Answer::Done),
                Err(e) => return Err(e),
            };
            let log_out = LogOut {
                reason: LogoutReason::User,
            };
            commands
                .sessions
                .run_on(session, loaded, log_out.into(), &metadata)
                .await
                .map_err(refused)?;
            Ok(Answer::Done)
        }
        RequestBody::Abort { hsid } => {
            let session = conn.session(&hsid);
            if !conn.scanned.contains(&session.hsid) {
                return Err(error(
                    ErrorCode::NotAllowed,
                    "scan the session on this connection before aborting it",
                ));
            }
            commands
                .sessions
                .abort_by_user(session, &metadata)
                .await
                .map_err(refused)?;
            Ok(Answer::Done)
        }
        // No `scanned` check, unlike `abort`: a device with no account at this server reports
        // `no_accounts` on a fresh guest channel that never scanned (mobile-sdk `session.rs`,
        // `no_accounts`). The hsid is the credential either way; any guest may scan first.
        RequestBody::Fail { hsid, reason } => {
            let session = conn.session(&hsid);
            let reason = match reason {
                FailReason::NoAccounts => SessionFailure::NoAccounts,
            };
            commands
                .sessions
                .fail(session, reason, &metadata)
                .await
                .map_err(refused)?;
            Ok(Answer::Done)
        }
        RequestBody::Challenge { purpose } => {
            let account = conn.account()?.account.account_id;
            let (purpose, id) = match purpose {
                ChallengePurpose::Login { hsid } => ("login", hsid.0.to_vec()),
                ChallengePurpose::Upgrade => ("upgrade", Vec::new()),
                ChallengePurpose::Transaction { transaction_id } => {
                    return transaction::challenge(conn, &transaction_id).await;
                }
            };
            let challenge = commands
                .sessions
                .second_factor_challenge(conn.server, purpose, &id, account)
                .await
                .map_err(refused)?;
            Ok(Answer::Challenge {
                challenge: Bytes(challenge),
            })
        }
        RequestBody::VerifySecondFactor { hsid, attestation } => {
            let session = conn.session(&hsid);
            let me = conn.account()?.account.account_id;
            match conn.load_session(session).await? {
                Session::Confirmed { account_id, .. }
                | Session::SecondFactorVerified { account_id, .. }
                    if account_id == me => {}
                Session::LoggedOut { .. }
                | Session::Aborted { .. }
                | Session::Expired { .. }
                | Session::Failed { .. } => {
                    return Err(error(ErrorCode::Ended, "the session has ended"));
                }
                _ => {
                    return Err(error(
                        ErrorCode::NotAllowed,
                        "confirm the session with this account first",
                    ));
                }
            }
            let (claims, hash) = accept_attestation(conn, &attestation.0, "login", &hsid.0).await?;
            let command = VerifySecondFactor {
                factor: kind_of(claims.factor),
                attestation_hash: hash,
                verified_at: Timestamp::from_millis(claims.issued_at_ms),
                reused: false,
            };
            commands
                .sessions
                .verify_second_factor(session, command, &metadata)
                .await
                .map_err(refused)?;
            if conn.settings.second_factor.login_reuse_window_secs > 0 {
                let record = RecordVerification {
                    factor: kind_of(claims.factor),
                    attestation_hash: hash,
                    verified_at: Timestamp::from_millis(claims.issued_at_ms),
                };
                let account = conn.account()?.account;
                commands
                    .accounts
                    .record_verification(account, record, &metadata)
                    .await
                    .map_err(refused)?;
            }
            Ok(Answer::Done)
        }
        RequestBody::UpgradeAccount { attestation } => {
            let account = conn.account()?.account;
            let (claims, hash) = accept_attestation(conn, &attestation.0, "upgrade", &[]).await?;
            let second_factor = kind_of(claims.factor);
            let command = UpgradeAccount {
                second_factor,
                attestation_hash: hash,
            };
            commands
                .accounts
                .upgrade(account, command, &metadata)
                .await
                .map_err(refused)?;
            // The channel's account has its factor from now on (an AppLogin may follow).
            if let Identity::Account(active) = &mut conn.identity {
                active.second_factor = Some(second_factor);
            }
            Ok(Answer::Done)
        }
        RequestBody::GetTransaction { transaction_id } => {
            transaction::get(conn, &transaction_id).await
        }
        RequestBody::PendingTransactions => transaction::pending(conn).await,
        RequestBody::SignTransaction {
            transaction_id,
            signature,
            attestation,
        } => transaction::sign(conn, &transaction_id, signature.0, attestation.0).await,
        RequestBody::RejectTransaction { transaction_id } => {
            transaction::reject(conn, &transaction_id).await
        }
        RequestBody::SignOwnTransaction {
            transaction_id,
            data,
            content_type,
            text,
            signature,
            attestation,
        } => {
            let own = transaction::OwnTransaction {
                data: data.0,
                content_type,
                text,
                device_signature: signature.0,
                attestation: attestation.0,
            };
            transaction::sign_own(conn, &transaction_id, own).await
        }
        RequestBody::DeleteAccount => {
            let account = conn.account()?.account;
            commands
                .accounts
                .delete_by_app(account, &metadata)
                .await
                .map_err(refused)?;
            conn.close_after_reply = true;
            Ok(Answer::Done)
        }
        RequestBody::RegisterPush {
            mc_key,
            mc_token,
            push_public_key,
        } => push::register(conn, &mc_key.0, mc_token, &push_public_key.0).await,
        RequestBody::AppLogin { ping_time_secs } => app_login::open(conn, ping_time_secs).await,
        RequestBody::EnrolHeadless {
            signing_public_key,
            app_instance,
        } => data::enrol_headless(conn, signing_public_key.0, app_instance.0).await,
        RequestBody::SendData { request_id, data } => data::send(conn, request_id.0, &data.0).await,
        RequestBody::SetDeviceData {
            model,
            os,
            app_version,
        } => {
            let device_data = countersign_domain::account::DeviceData {
                model,
                os,
                app_version,
            };
            data::set_device_data(conn, device_data).await
        }
    }
}

fn kind_of(factor: Factor) -> SecondFactorKind {
    match factor {
        Factor::Pin => SecondFactorKind::Pin,
        Factor::Biometric => SecondFactorKind::Biometric,
    }
}

/// Checks an SFS attestation for `purpose` on `id` by this connection's account (the checks
/// of docs/second-factor.md, in order, against the challenge the NS issued), then records its
/// one use. Answers its claims and hash.
async fn accept_attestation(
    conn: &Connection,
    bytes: &[u8],
    purpose: &str,
    id: &[u8],
) -> Result<(AttestationClaims, [u8; 32]), DeviceError> {
    let account = conn.account()?.account.account_id;
    let challenge = conn
        .gateway
        .0
        .commands
        .sessions
        .second_factor_challenge(conn.server, purpose, id, account)
        .await
        .map_err(refused)?;
    let (claims, hash) = check_attestation(conn, bytes, challenge).await?;
    use_attestation(conn, &claims, hash, purpose).await?;
    Ok((claims, hash))
}

/// Checks an SFS attestation of `challenge` by this connection's account (the checks of
/// docs/second-factor.md, in order) without recording anything. Answers its claims and hash.
async fn check_attestation(
    conn: &Connection,
    bytes: &[u8],
    challenge: [u8; 32],
) -> Result<(AttestationClaims, [u8; 32]), DeviceError> {
    let active = conn.account()?;
    let gateway = &conn.gateway.0;
    let expect = Expected {
        challenge,
        account_key_thumbprint: active.signing_key_thumbprint,
        now_ms: gateway.clock.now().as_millis(),
    };
    // The deployment's own SFS (and any it was told to trust), plus the third-party SFS keys
    // this server trusts, read from its stream now: distrusting a key takes effect at once.
    let mut trusted = gateway.config.trusted_sfs_keys.clone();
    let server = conn
        .gateway
        .active_server_now(conn.server)
        .await
        .map_err(|e| internal(&e))?;
    if let Some(active) = &server {
        trusted.extend(
            active
                .trusted_sfs_keys
                .values()
                .filter_map(|k| p256::ecdsa::VerifyingKey::from_sec1_bytes(k).ok()),
        );
    }
    let claims = verify_attestation(bytes, &trusted, &expect).map_err(|e| {
        error(
            ErrorCode::BadAttestation,
            &format!("attestation refused: {e}"),
        )
    })?;
    if claims.app_instance.0 != *active.app_instance.as_bytes() {
        return Err(error(
            ErrorCode::BadAttestation,
            "attestation refused: it is for another app instance",
        ));
    }
    // The policy as it is now, not as it was when the device connected.
    let policy = server
        .as_ref()
        .map_or(&conn.settings.second_factor, |a| &a.settings.second_factor);
    let allowed = match claims.factor {
        Factor::Pin => policy.pin_allowed,
        Factor::Biometric => policy.biometric_allowed,
    };
    if !allowed {
        return Err(error(
            ErrorCode::BadAttestation,
            "attestation refused: this server does not accept that factor",
        ));
    }
    Ok((claims, attestation_hash(bytes)))
}

/// Records the single use of a checked attestation for `purpose`; a second use is refused.
async fn use_attestation(
    conn: &Connection,
    claims: &AttestationClaims,
    hash: [u8; 32],
    purpose: &str,
) -> Result<(), DeviceError> {
    let record = UseAttestation {
        attestation_hash: hash,
        factor: kind_of(claims.factor),
        account_id: conn.account()?.account.account_id,
        purpose: purpose.to_owned(),
    };
    conn.gateway
        .0
        .commands
        .accounts
        .use_attestation(
            conn.server,
            &claims.attestation_id.0,
            record,
            &conn.metadata(),
        )
        .await
        .map_err(|e| match refused(e) {
            e if e.code == ErrorCode::Conflict => error(
                ErrorCode::BadAttestation,
                "attestation refused: it was used before",
            ),
            e => e,
        })?;
    Ok(())
}

/// Runs a step of `session` (scan, confirm, log in) with the connection already told of the
/// session's end: an end committed after the step loaded the session (a DELETE by the
/// business system right after the scan or the login, a missed ping) reaches the device as a
/// notice, and one committed before is in what the step loaded, so the step answers `ended`.
/// A step that fails forgets a watch it added.
async fn watching<T>(
    conn: &Connection,
    session: SessionRef,
    step: impl Future<Output = Result<T, DeviceError>>,
) -> Result<T, DeviceError> {
    let hub = &conn.gateway.0.hub;
    let added = hub.watch_session(conn.id, session.server_id, session.hsid);
    let done = step.await;
    if done.is_err() && added {
        hub.unwatch_session(conn.id, session.server_id, session.hsid);
    }
    done
}

/// The session is logged in by this connection's account; `ended` once it is over.
async fn logged_in_by_me(
    conn: &Connection,
    session: SessionRef,
) -> Result<Loaded<Session>, DeviceError> {
    let me = conn.account()?.account.account_id;
    let loaded = conn.load_session_for_command(session).await?;
    match &loaded.state {
        Session::LoggedIn { account_id, .. } if *account_id == me => Ok(loaded),
        Session::LoggedOut { .. }
        | Session::Aborted { .. }
        | Session::Expired { .. }
        | Session::Failed { .. } => Err(error(ErrorCode::Ended, "the session has ended")),
        _ => Err(error(
            ErrorCode::NotAllowed,
            "this account is not logged in to the session",
        )),
    }
}

/// The account id an enrolment gives a channel key.
fn account_id_for(enrolment: &EnrolmentRef, channel_key: &[u8]) -> AccountId {
    let digest = Sha256::new()
        .chain_update(b"countersign/account\0")
        .chain_update(enrolment.server_id.as_bytes())
        .chain_update(enrolment.enrolment_id.as_bytes())
        .chain_update(channel_key)
        .finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(digest.get(..16).unwrap_or(&[0; 16]));
    AccountId::from_bytes(id)
}

async fn enrol(
    conn: &mut Connection,
    token: &[u8; 32],
    signing_public_key: Vec<u8>,
    app_instance: [u8; 16],
) -> Result<Answer, DeviceError> {
    let channel_key = enrolling_channel_key(conn)?;
    check_signing_key(&signing_public_key)?;
    let gateway = conn.gateway.clone();
    let commands = &gateway.0.commands;
    let metadata = conn.metadata();
    let enrolment = EnrolmentRef::new(
        conn.server,
        countersign_commands::enrolment::enrolment_id(token),
    );
    let loaded = commands.enrolments.load(enrolment).await.map_err(refused)?;
    let started = match loaded.state {
        Enrolment::NotStarted => return Err(error(ErrorCode::NotFound, "enrolment not found")),
        Enrolment::Expired { .. } => return Err(error(ErrorCode::Expired, "enrolment expired")),
        Enrolment::Pending { started } | Enrolment::Completed { started, .. } => started,
    };
    let account_id = account_id_for(&enrolment, &channel_key);
    commands
        .enrolments
        .complete(enrolment, account_id, &metadata)
        .await
        .map_err(|e| match refused(e) {
            e if e.code == ErrorCode::Conflict => error(
                ErrorCode::Ended,
                "this enrolment was used by another device",
            ),
            e => e,
        })?;
    let account = AccountRef::new(conn.server, account_id);
    let register = RegisterAccount {
        account,
        app_instance: AppInstanceId::from_bytes(app_instance),
        user: Some(started.user),
        channel_public_key: channel_key.clone(),
        signing_public_key,
        second_factor: None,
    };
    register_account(commands, register, &metadata).await?;
    let userid = userid(
        &gateway,
        UserRef {
            server_id: conn.server,
            digest: started.user,
        },
        loaded.position,
    )
    .await?;
    tracing::info!(server = %conn.server, account = %account_id, "device enrolled");
    Ok(Answer::Enrolled {
        account_id: Bytes(*account_id.as_bytes()),
        userid,
    })
}

/// The channel key of a guest connection, which an enrolment makes an account's.
fn enrolling_channel_key(conn: &Connection) -> Result<Vec<u8>, DeviceError> {
    let Identity::Guest { channel_key } = &conn.identity else {
        return Err(error(
            ErrorCode::NotAllowed,
            "enrol on a guest connection with the new account's channel key",
        ));
    };
    Ok(channel_key.clone())
}

/// An enrolling device's signing key must be a P-256 point.
fn check_signing_key(signing_public_key: &[u8]) -> Result<(), DeviceError> {
    if countersign_domain::validate::p256_public_key(signing_public_key).is_none() {
        return Err(error(
            ErrorCode::Invalid,
            "signing_public_key is not a P-256 point",
        ));
    }
    Ok(())
}

/// Registers an enrolling device's account. A conflict is a retry after a lost answer when
/// the account has our channel key (then it is ours, and this is a success); otherwise
/// `conflict`.
async fn register_account(
    commands: &countersign_commands::Commands,
    register: RegisterAccount,
    metadata: &Metadata,
) -> Result<(), DeviceError> {
    let account = register.account;
    let channel_key = register.channel_public_key.clone();
    match commands.accounts.register(register, metadata).await {
        Ok(_) => Ok(()),
        Err(CommandError::Rejected {
            kind: ErrorKind::Conflict,
            ..
        }) => {
            let existing = commands.accounts.load(account).await.map_err(refused)?;
            let ours = matches!(&existing.state,
                countersign_domain::Account::Active(a) if a.channel_public_key == channel_key);
            if ours {
                Ok(())
            } else {
                Err(error(ErrorCode::Conflict, "account exists"))
            }
        }
        Err(e) => Err(refused(e)),
    }
}

/// The user's userid, opened from the users read model once it has seen `position`.
async fn userid(
    gateway: &Gateway,
    user: UserRef,
    position: Option<u64>,
) -> Result<String, DeviceError> {
    let reads = &gateway.0.reads;
    if let Some(position) = position {
        reads
            .wait_for(position, gateway.0.config.max_wait)
            .await
            .map_err(|e| internal(&e))?;
    }
    let row = reads
        .user(user.server_id, user.digest)
        .await
        .map_err(|e| internal(&e))?
        .ok_or_else(|| error(ErrorCode::NotFound, "the enrolment's user was deleted"))?;
    gateway
        .0
        .commands
        .users
        .open(&user.stream(), "userid", &row.userid_sealed)
        .await
        .map_err(|e| internal(&e))?
        .ok_or_else(|| error(ErrorCode::NotFound, "the enrolment's user was deleted"))
}
