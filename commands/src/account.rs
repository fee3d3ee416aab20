//! Account commands. Accounts are registered by the device gateway when an app enrols (or
//! opens a secure channel); the business API lists them and deletes one.

use std::sync::Arc;

use countersign_domain::account::{
    Account, AccountCommand, AccountEvent, DeleteAccount, DeletedBy, RecordVerification,
    RegisterAccount, RegisterPush, UpgradeAccount,
};
use countersign_domain::attestation::{AttestationEvent, AttestationUse, UseAttestation};
use countersign_domain::{AccountRef, Clock, Context, ServerId};
use countersign_eventstore::{Metadata, SharedStore};

use crate::{CommandError, Executed, Loaded, execute, load};

/// Account commands on one store.
#[derive(Clone)]
pub struct AccountCommands {
    store: SharedStore,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for AccountCommands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountCommands").finish_non_exhaustive()
    }
}

impl AccountCommands {
    pub fn new(store: SharedStore, clock: Arc<dyn Clock>) -> Self {
        Self { store, clock }
    }

    async fn run(
        &self,
        account: AccountRef,
        command: AccountCommand,
        metadata: &Metadata,
    ) -> Result<Executed<AccountEvent>, CommandError> {
        let mut ctx = Context::new(self.clock.now());
        let metadata = Metadata {
            server_id: Some(account.server_id.to_string()),
            ..metadata.clone()
        };
        execute::<Account>(
            &self.store,
            &account.stream(),
            command,
            &mut ctx,
            &metadata,
            None,
        )
        .await
    }

    /// Registers an account (device gateway).
    pub async fn register(
        &self,
        command: RegisterAccount,
        metadata: &Metadata,
    ) -> Result<Executed<AccountEvent>, CommandError> {
        self.run(command.account, command.into(), metadata).await
    }

    /// The user removed the account from the app (device gateway).
    pub async fn delete_by_app(
        &self,
        account: AccountRef,
        metadata: &Metadata,
    ) -> Result<Executed<AccountEvent>, CommandError> {
        let command = DeleteAccount { by: DeletedBy::App };
        self.run(account, command.into(), metadata).await
    }

    /// Adds a second factor to a headless account (device gateway, after checking the SFS
    /// attestation).
    pub async fn upgrade(
        &self,
        account: AccountRef,
        command: UpgradeAccount,
        metadata: &Metadata,
    ) -> Result<Executed<AccountEvent>, CommandError> {
        self.run(account, command.into(), metadata).await
    }

    /// Records that the account proved a second factor for a login (so a later login within
    /// the server's reuse window may rely on it).
    pub async fn record_verification(
        &self,
        account: AccountRef,
        command: RecordVerification,
        metadata: &Metadata,
    ) -> Result<Executed<AccountEvent>, CommandError> {
        self.run(account, command.into(), metadata).await
    }

    /// Records what the app says about its device (device gateway, secure channel); the same
    /// data again writes nothing.
    pub async fn set_device_data(
        &self,
        account: AccountRef,
        command: countersign_domain::account::SetDeviceData,
        metadata: &Metadata,
    ) -> Result<Executed<AccountEvent>, CommandError> {
        self.run(account, command.into(), metadata).await
    }

    /// Records where the account's push messages go (device gateway; the MC token is sealed
    /// in the vault under `command.token_ref` first).
    pub async fn register_push(
        &self,
        account: AccountRef,
        command: RegisterPush,
        metadata: &Metadata,
    ) -> Result<Executed<AccountEvent>, CommandError> {
        self.run(account, command.into(), metadata).await
    }

    /// Records that an SFS attestation was used, once ever: its stream
    /// `attestation-{server}-{attestation id}` starts with this event, so a replay (or a
    /// concurrent second use) is `Rejected { kind: Conflict }`.
    pub async fn use_attestation(
        &self,
        server: ServerId,
        attestation_id: &[u8; 16],
        command: UseAttestation,
        metadata: &Metadata,
    ) -> Result<Executed<AttestationEvent>, CommandError> {
        let mut ctx = Context::new(self.clock.now());
        let metadata = Metadata {
            server_id: Some(server.to_string()),
            ..metadata.clone()
        };
        let stream = format!("attestation-{server}-{}", hex::encode(attestation_id));
        execute::<AttestationUse>(&self.store, &stream, command, &mut ctx, &metadata, None).await
    }

    /// The account's current state, from its own stream (the write model).
    pub async fn load(&self, account: AccountRef) -> Result<Loaded<Account>, CommandError> {
        load::<Account>(&self.store, &account.stream()).await
    }

    /// Deletes an account on the business system's request.
    pub async fn delete_by_server(
        &self,
        account: AccountRef,
        metadata: &Metadata,
    ) -> Result<Executed<AccountEvent>, CommandError> {
        let command = DeleteAccount {
            by: DeletedBy::Server,
        };
        self.run(account, command.into(), metadata).await
    }
}
