//! One channel's requests, after the handshake: the OPAQUE and biometric flows of
//! `docs/second-factor.md`, with their per-connection state.
//!
//! Flows (per connection; the state lives in [`Session`] and dies with it):
//!
//! ```text
//! register_pin_start → register_pin_finish                    (none registered, or pin proven)
//! login_start (failure counted) → login_finish → attestation  (sets "pin proven")
//! register_biometric                                          (needs "pin proven")
//! biometric_start (nonce kept) → biometric_finish → attestation (a bad signature is counted)
//! ```
//!
//! A new `login_start` replaces a pending login, a new `biometric_start` a pending nonce; a
//! nonce is used once whatever the outcome. While the app instance has no PIN registered the
//! channel is anonymous: each request takes a token from the limiter (none left: `internal`,
//! "busy"), and the first registration is refused `not_allowed` unless a countersign server
//! enrolled the app instance; that registration binds the channel key in the same append. Every refusal is an [`SfsError`] with a code the
//! app acts on; internal failures are logged here with the app instance id and answered
//! `internal` without detail.

use countersign_commands::{CommandError, Kept, Refused, execute_kept, load};
use countersign_domain::second_factor::{
    FactorStatus, FailBiometric, RegisterBiometric, RegisterPin, SecondFactor, SecondFactorCommand,
    SecondFactorError, SecondFactorKind, StartPinLogin, SucceedVerification,
};
use std::net::IpAddr;

use countersign_domain::{AppInstanceId, Context, Timestamp};
use countersign_eventstore::Metadata;
use countersign_protocol::attestation::{self, AttestationClaims, Factor, MAX_LIFETIME_MS};
use countersign_protocol::device::{Blob, Bytes};
use countersign_protocol::sfs::{FactorState, SfsAnswer, SfsBody, SfsCode, SfsError};
use sha2::{Digest, Sha256};

use crate::opaque::{self, PendingLogin};
use crate::{Error, Sfs, records};

/// One connection's state: who it is and how far its flows got.
#[derive(Debug)]
pub struct Session {
    sfs: Sfs,
    app: AppInstanceId,
    /// SHA-256 of the channel's Noise static key (checked at the hello, bound by the first
    /// PIN registration).
    key_thumbprint: [u8; 32],
    /// The client's address, when known: anonymous work is counted per address.
    peer: Option<IpAddr>,
    /// A PIN login completed on this channel (allows changing the PIN, registering a
    /// biometric key).
    pin_proven: bool,
    login: Option<PendingLogin>,
    nonce: Option<[u8; 32]>,
    /// The app instance's stream as this channel last saw it: a kept channel (an app approving
    /// transaction after transaction) appends without reloading a stream that only grows.
    kept: Option<Kept<SecondFactor>>,
}

type Answer = Result<SfsAnswer, SfsError>;

impl Session {
    /// The session of an app instance whose channel key was checked.
    pub(crate) fn new(
        sfs: Sfs,
        app: AppInstanceId,
        key_thumbprint: [u8; 32],
        peer: Option<IpAddr>,
    ) -> Self {
        Self {
            sfs,
            app,
            key_thumbprint,
            peer,
            pin_proven: false,
            login: None,
            nonce: None,
            kept: None,
        }
    }

    /// Answers one request.
    pub async fn handle(&mut self, body: SfsBody) -> Answer {
        match self.within_budget().await {
            Ok(true) => {}
            Ok(false) => {
                return Err(SfsError::new(
                    SfsCode::Internal,
                    "too many requests of unregistered app instances; try again later",
                ));
            }
            Err(error) => return Err(self.internal(&error)),
        }
        let result = match body {
            SfsBody::RegisterPinStart { request } => self.register_pin_start(&request.0).await,
            SfsBody::RegisterPinFinish { upload } => self.register_pin_finish(&upload.0).await,
            SfsBody::LoginStart { request } => self.login_start(&request.0).await,
            SfsBody::LoginFinish {
                finalization,
                challenge,
                account_key_thumbprint,
            } => {
                self.login_finish(&finalization.0, challenge, account_key_thumbprint)
                    .await
            }
            SfsBody::RegisterBiometric { public_key } => {
                self.register_biometric(public_key.0.to_vec()).await
            }
            SfsBody::BiometricStart => self.biometric_start().await,
            SfsBody::BiometricFinish {
                signature,
                challenge,
                account_key_thumbprint,
            } => {
                self.biometric_finish(&signature.0, challenge, account_key_thumbprint)
                    .await
            }
        };
        result.unwrap_or_else(|error| Err(self.internal(&error)))
    }

    fn internal(&self, error: &Error) -> SfsError {
        tracing::error!(app_instance = %self.app, %error, "sfs request failed");
        SfsError::new(SfsCode::Internal, "internal error; try again later")
    }

    /// A registered app instance (one with a PIN) is not limited; an anonymous channel's
    /// request takes a token.
    async fn within_budget(&mut self) -> Result<bool, Error> {
        if self.state().await?.pin_record_digest().is_some() {
            return Ok(true);
        }
        Ok(self.sfs.0.limiter.take(self.peer, self.now().as_millis()))
    }

    /// Whether a first registration is authorised: a countersign server enrolled the app
    /// instance. Asked only when no PIN is registered.
    async fn enrolled(&self, state: &SecondFactor) -> Result<bool, Error> {
        if state.pin_record_digest().is_some() {
            return Ok(true);
        }
        Ok(self.sfs.0.enrolments.enrolled(self.app).await?)
    }

    fn now(&self) -> Timestamp {
        self.sfs.0.clock.now()
    }

    /// The stream's state: as this channel's last command left it, else loaded.
    async fn state(&mut self) -> Result<SecondFactor, Error> {
        if let Some(kept) = &self.kept {
            return Ok(kept.state.clone());
        }
        let loaded = load::<SecondFactor>(&self.sfs.0.store, &self.app.stream()).await?;
        let state = loaded.state.clone();
        self.kept = Some(loaded.into());
        Ok(state)
    }

    /// Runs a command on the stream; a refusal by a rule comes back as the app's answer.
    async fn execute(
        &mut self,
        command: impl Into<SecondFactorCommand>,
    ) -> Result<Result<Vec<countersign_domain::second_factor::SecondFactorEvent>, SfsError>, Error>
    {
        let mut ctx = Context::new(self.now());
        let metadata = Metadata {
            actor: Some("sfs".to_owned()),
            ..Metadata::default()
        };
        match execute_kept::<SecondFactor>(
            &self.sfs.0.store,
            &self.app.stream(),
            &mut self.kept,
            command.into(),
            &mut ctx,
            &metadata,
        )
        .await
        {
            Ok(done) => Ok(Ok(done.events)),
            Err(Refused::Rule(rule)) => Ok(Err(refusal(&rule))),
            Err(Refused::Command(CommandError::Conflict { .. })) => {
                Ok(Err(SfsError::new(SfsCode::Internal, "busy; try again")))
            }
            Err(Refused::Command(other)) => Err(other.into()),
        }
    }

    /// Refuses a PIN registration the stream would refuse, before any OPAQUE work.
    fn may_register_pin(&self, state: &SecondFactor) -> Result<(), SfsError> {
        if state.status(self.now()) == FactorStatus::Revoked {
            return Err(refusal(&SecondFactorError::Revoked));
        }
        // Another channel's key was bound since this one's hello.
        if state
            .key_thumbprint()
            .is_some_and(|bound| *bound != self.key_thumbprint)
        {
            return Err(refusal(&SecondFactorError::KeyMismatch));
        }
        if state.pin_record_digest().is_some() && !self.pin_proven {
            return Err(refusal(&SecondFactorError::AlreadyRegistered));
        }
        Ok(())
    }

    async fn register_pin_start(&mut self, request: &[u8]) -> Result<Answer, Error> {
        let state = self.state().await?;
        if let Err(refused) = self.may_register_pin(&state) {
            return Ok(Err(refused));
        }
        if !self.enrolled(&state).await? {
            return Ok(Err(refusal(&SecondFactorError::NotEnrolled)));
        }
        Ok(
            match self
                .sfs
                .0
                .keys
                .opaque
                .registration_response(request, self.app.as_bytes())
            {
                Ok(response) => Ok(SfsAnswer::Registration {
                    response: Blob(response),
                }),
                Err(_) => Err(invalid("not an OPAQUE registration request")),
            },
        )
    }

    async fn register_pin_finish(&mut self, upload: &[u8]) -> Result<Answer, Error> {
        let state = self.state().await?;
        if let Err(refused) = self.may_register_pin(&state) {
            return Ok(Err(refused));
        }
        let enrolled = self.enrolled(&state).await?;
        if !enrolled {
            return Ok(Err(refusal(&SecondFactorError::NotEnrolled)));
        }
        let Ok(record) = opaque::registration_record(upload) else {
            return Ok(Err(invalid("not an OPAQUE registration upload")));
        };
        // The record first, under its digest, then the event naming it (`records` explains
        // why a crash in between is harmless). Nothing is overwritten: a refused
        // registration removes its own row; the superseded one goes once the event is in.
        let db = self.sfs.0.database.clone();
        let record_digest = records::digest(&record);
        records::put(&db, &self.app, &record, self.now().as_millis()).await?;
        let registered = self
            .execute(RegisterPin {
                app_instance: self.app,
                record_digest,
                key_thumbprint: self.key_thumbprint,
                pin_proven: self.pin_proven,
                enrolled,
            })
            .await?;
        if let Err(refused) = registered {
            // Refused for sure (an internal error may have committed, so its row stays).
            records::discard(&db, &self.app, &record_digest).await?;
            return Ok(Err(refused));
        }
        let pruned = records::prune(
            &db,
            &self.app,
            &record_digest,
            state.pin_record_digest(),
            self.now().as_millis(),
        )
        .await;
        if let Err(error) = pruned {
            // The registration stands; an unreferenced row is never read.
            tracing::warn!(app_instance = %self.app, %error, "superseded OPAQUE records not removed");
        }
        tracing::info!(app_instance = %self.app, "pin registered");
        Ok(Ok(SfsAnswer::Done))
    }

    async fn login_start(&mut self, request: &[u8]) -> Result<Answer, Error> {
        self.login = None;
        // Counted before anything is answered: an abandoned login stays a failure.
        if let Err(refused) = self
            .execute(StartPinLogin {
                policy: self.sfs.0.policy.clone(),
            })
            .await?
        {
            return Ok(Err(refused));
        }
        let state = self.state().await?;
        let Some(digest) = state.pin_record_digest() else {
            return Err(Error::RecordMismatch);
        };
        // Only the record the stream registered: an orphan of a crashed registration is
        // never used.
        let Some(record) = records::get(&self.sfs.0.database, &self.app, digest).await? else {
            return Err(Error::RecordMismatch);
        };
        Ok(
            match self
                .sfs
                .0
                .keys
                .opaque
                .login_start(&record, request, self.app.as_bytes())
            {
                Ok((pending, response)) => {
                    self.login = Some(pending);
                    Ok(SfsAnswer::Credential {
                        response: Blob(response),
                    })
                }
                Err(_) => Err(invalid("not an OPAQUE credential request")),
            },
        )
    }

    async fn login_finish(
        &mut self,
        finalization: &[u8],
        challenge: Bytes<32>,
        thumbprint: Bytes<32>,
    ) -> Result<Answer, Error> {
        let Some(pending) = self.login.take() else {
            return Ok(Err(invalid("no login in progress on this channel")));
        };
        if pending.finish(finalization).is_err() {
            tracing::info!(app_instance = %self.app, "pin login failed");
            return Ok(Err(self.failure_answer().await?));
        }
        let answer = self.attest(Factor::Pin, challenge, thumbprint).await?;
        if answer.is_ok() {
            self.pin_proven = true;
        }
        Ok(answer)
    }

    /// What a failed verification answers, from the stream as it is now (the failure was
    /// counted already).
    async fn failure_answer(&mut self) -> Result<SfsError, Error> {
        let state = self.state().await?;
        Ok(match state.status(self.now()) {
            FactorStatus::Revoked => refusal(&SecondFactorError::Revoked),
            FactorStatus::Locked(until) => refusal(&SecondFactorError::Locked { until }),
            FactorStatus::None | FactorStatus::Active => SfsError::new(
                SfsCode::WrongPin {
                    attempts_left: self.sfs.0.policy.attempts_left(state.failures()),
                },
                "wrong PIN",
            ),
        })
    }

    /// Signs an attestation and records the success; answers it unless the stream refuses.
    async fn attest(
        &mut self,
        factor: Factor,
        challenge: Bytes<32>,
        thumbprint: Bytes<32>,
    ) -> Result<Answer, Error> {
        let now = self.now();
        let mut attestation_id = [0u8; 16];
        getrandom::fill(&mut attestation_id).map_err(|_| Error::Random)?;
        let claims = AttestationClaims {
            app_instance: Bytes(*self.app.as_bytes()),
            factor,
            challenge,
            account_key_thumbprint: thumbprint,
            issued_at_ms: now.as_millis(),
            expires_at_ms: now.as_millis().saturating_add(MAX_LIFETIME_MS),
            attestation_id: Bytes(attestation_id),
        };
        let cose = attestation::sign_attestation(&claims, &self.sfs.0.keys.attestation)
            .map_err(|_| Error::Keys(crate::keys::ATTESTATION_KEY_REF))?;
        let recorded = self
            .execute(SucceedVerification {
                factor: match factor {
                    Factor::Pin => SecondFactorKind::Pin,
                    Factor::Biometric => SecondFactorKind::Biometric,
                },
                challenge_hash: Sha256::digest(challenge.0).into(),
                attestation_hash: attestation::attestation_hash(&cose),
                attestation_expires_at: Timestamp::from_millis(claims.expires_at_ms),
            })
            .await?;
        Ok(recorded.map(|_| {
            tracing::info!(app_instance = %self.app, ?factor, "second factor verified");
            SfsAnswer::Attestation { cose: Blob(cose) }
        }))
    }

    async fn register_biometric(&mut self, public_key: Vec<u8>) -> Result<Answer, Error> {
        Ok(self
            .execute(RegisterBiometric {
                app_instance: self.app,
                public_key,
                pin_proven: self.pin_proven,
            })
            .await?
            .map(|_| SfsAnswer::Done))
    }

    async fn biometric_start(&mut self) -> Result<Answer, Error> {
        self.nonce = None;
        let state = self.state().await?;
        if let Err(refused) = state.ensure_usable(self.now()) {
            return Ok(Err(refusal(&refused)));
        }
        if state.biometric_key().is_none() {
            return Ok(Err(refusal(&SecondFactorError::NotRegistered)));
        }
        let mut nonce = [0u8; 32];
        getrandom::fill(&mut nonce).map_err(|_| Error::Random)?;
        self.nonce = Some(nonce);
        Ok(Ok(SfsAnswer::BiometricChallenge {
            nonce: Bytes(nonce),
        }))
    }

    async fn biometric_finish(
        &mut self,
        signature: &[u8; 64],
        challenge: Bytes<32>,
        thumbprint: Bytes<32>,
    ) -> Result<Answer, Error> {
        let Some(nonce) = self.nonce.take() else {
            return Ok(Err(invalid(
                "no biometric challenge in progress on this channel",
            )));
        };
        let state = self.state().await?;
        let Some(key) = state.biometric_key() else {
            return Ok(Err(refusal(&SecondFactorError::NotRegistered)));
        };
        let message =
            countersign_protocol::sfs::biometric_message(&nonce, &challenge.0, &thumbprint.0);
        let verified = p256::ecdsa::VerifyingKey::from_sec1_bytes(key)
            .ok()
            .is_some_and(|key| {
                countersign_protocol::cose::verify_es256(&key, &message, signature).is_ok()
            });
        if verified {
            return self.attest(Factor::Biometric, challenge, thumbprint).await;
        }
        tracing::info!(app_instance = %self.app, "biometric signature refused");
        if let Err(refused) = self
            .execute(FailBiometric {
                policy: self.sfs.0.policy.clone(),
            })
            .await?
        {
            return Ok(Err(refused));
        }
        Ok(Err(match self.failure_answer().await? {
            SfsError {
                code: SfsCode::WrongPin { .. },
                ..
            } => invalid("the biometric signature does not verify"),
            other => other,
        }))
    }
}

/// The app's view of a rule's refusal.
fn refusal(error: &SecondFactorError) -> SfsError {
    let code = match error {
        SecondFactorError::Invalid(_) => SfsCode::Invalid,
        SecondFactorError::KeyMismatch
        | SecondFactorError::NotAllowed
        | SecondFactorError::NotEnrolled => SfsCode::NotAllowed,
        SecondFactorError::NotRegistered => SfsCode::NotRegistered,
        SecondFactorError::AlreadyRegistered => SfsCode::AlreadyRegistered,
        SecondFactorError::Locked { until } => SfsCode::Locked {
            until_ms: until.as_millis(),
        },
        SecondFactorError::Revoked => SfsCode::Revoked,
    };
    SfsError::new(code, error.to_string())
}

fn invalid(message: &str) -> SfsError {
    SfsError::new(SfsCode::Invalid, message)
}

/// The wire form of a factor's status.
pub(crate) fn factor_state(status: FactorStatus) -> FactorState {
    match status {
        FactorStatus::None => FactorState::None,
        FactorStatus::Active => FactorState::Active,
        FactorStatus::Locked(until) => FactorState::Locked {
            until_ms: until.as_millis(),
        },
        FactorStatus::Revoked => FactorState::Revoked,
    }
}
