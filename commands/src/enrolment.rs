//! Enrolment commands: start an enrolment for a registered user and hand out its token.
//!
//! The token (32 bytes, in the enrolment QR code) is the bearer secret a device presents to
//! enrol; only its digest names the enrolment (`enrolment id = SHA-256("countersign/enrolment"
//! ‖ token)[..16]`), so the event log never holds the token. With an idempotency key the token
//! is derived from the key under the server's secret, so a retry answers the same QR code.

use std::sync::Arc;

use countersign_domain::enrolment::{
    CompleteEnrolment, Enrolment, EnrolmentCommand, EnrolmentEvent, ExpireEnrolment, StartEnrolment,
};
use countersign_domain::user::User;
use countersign_domain::{
    AccountId, Clock, Context, EnrolmentId, EnrolmentRef, ErrorKind, ServerId,
};
use countersign_eventstore::{Metadata, SharedStore};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::secrets::ServerSecrets;
use crate::user::user_ref;
use crate::{CommandError, Executed, Loaded, execute, load, random_bytes};

/// An enrolment token; `Debug` prints nothing of it.
pub struct EnrolmentToken(Zeroizing<[u8; 32]>);

impl EnrolmentToken {
    /// The token bytes, for the QR code.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// The enrolment this token names.
    pub fn enrolment_id(&self) -> EnrolmentId {
        enrolment_id(self.expose())
    }
}

impl std::fmt::Debug for EnrolmentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EnrolmentToken(..)")
    }
}

/// The id of the enrolment a token names.
pub fn enrolment_id(token: &[u8; 32]) -> EnrolmentId {
    let digest = Sha256::new()
        .chain_update(b"countersign/enrolment\0")
        .chain_update(token)
        .finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(digest.get(..16).unwrap_or(&[0; 16]));
    EnrolmentId::from_bytes(id)
}

/// Default lifetime of an enrolment QR code, seconds.
pub const DEFAULT_TTL_SECS: u32 = 600;

/// Enrolment commands on one store.
#[derive(Clone)]
pub struct EnrolmentCommands {
    store: SharedStore,
    secrets: ServerSecrets,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for EnrolmentCommands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrolmentCommands").finish_non_exhaustive()
    }
}

impl EnrolmentCommands {
    pub fn new(store: SharedStore, secrets: ServerSecrets, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            secrets,
            clock,
        }
    }

    async fn run(
        &self,
        enrolment: EnrolmentRef,
        command: EnrolmentCommand,
        metadata: &Metadata,
        idempotency_key: Option<&str>,
    ) -> Result<Executed<EnrolmentEvent>, CommandError> {
        let mut ctx = Context::new(self.clock.now());
        let metadata = Metadata {
            server_id: Some(enrolment.server_id.to_string()),
            ..metadata.clone()
        };
        execute::<Enrolment>(
            &self.store,
            &enrolment.stream(),
            command,
            &mut ctx,
            &metadata,
            idempotency_key,
        )
        .await
    }

    /// Starts an enrolment for a registered user.
    pub async fn start(
        &self,
        server: ServerId,
        userid: &str,
        ttl_secs: Option<u32>,
        metadata: &Metadata,
        idempotency_key: Option<&str>,
    ) -> Result<(EnrolmentRef, EnrolmentToken, Executed<EnrolmentEvent>), CommandError> {
        let user = user_ref(&self.store, &self.secrets, server, userid).await?;
        let loaded = load::<User>(&self.store, &user.stream()).await?;
        if !matches!(loaded.state, User::Active(_)) {
            return Err(CommandError::Rejected {
                kind: ErrorKind::NotFound,
                message: "user not found".into(),
            });
        }
        let mut token = Zeroizing::new([0u8; 32]);
        match idempotency_key {
            Some(key) => {
                *token = self
                    .secrets
                    .derive(server, "enrolment", key.as_bytes())
                    .await?
            }
            None => random_bytes(token.as_mut())?,
        }
        let token = EnrolmentToken(token);
        let enrolment = EnrolmentRef::new(server, token.enrolment_id());
        let command = StartEnrolment {
            enrolment,
            user: user.digest,
            ttl_secs: ttl_secs.unwrap_or(DEFAULT_TTL_SECS),
        };
        let done = self
            .run(enrolment, command.into(), metadata, idempotency_key)
            .await?;
        Ok((enrolment, token, done))
    }

    /// The device completed the enrolment with a new account (from the device gateway).
    pub async fn complete(
        &self,
        enrolment: EnrolmentRef,
        account_id: AccountId,
        metadata: &Metadata,
    ) -> Result<Executed<EnrolmentEvent>, CommandError> {
        self.run(
            enrolment,
            CompleteEnrolment { account_id }.into(),
            metadata,
            None,
        )
        .await
    }

    /// The enrolment's current state, from its own stream (the write model).
    pub async fn load(&self, enrolment: EnrolmentRef) -> Result<Loaded<Enrolment>, CommandError> {
        load::<Enrolment>(&self.store, &enrolment.stream()).await
    }

    /// Records that the enrolment's deadline passed, if it did.
    pub async fn expire(
        &self,
        enrolment: EnrolmentRef,
        metadata: &Metadata,
    ) -> Result<Executed<EnrolmentEvent>, CommandError> {
        self.run(enrolment, ExpireEnrolment.into(), metadata, None)
            .await
    }
}
