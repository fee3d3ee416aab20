//! Transaction commands: the business API creates transactions; the device gateway records
//! what a device did with them (presented, signed after checking the signature and the
//! attestation, rejected) and the app's own signed transactions; the expiry sweeper and reads
//! record passed deadlines.

use std::sync::Arc;

use countersign_domain::UserDigest;
use countersign_domain::transaction::{
    CreateSignedTransaction, CreateTransaction, ExpireTransaction, PresentTransaction,
    RejectTransaction, SignTransaction, Signature, Transaction, TransactionCommand,
    TransactionEvent, TransactionRequest,
};
use countersign_domain::{AccountId, Clock, Context, ServerId, TransactionId, TransactionRef};
use countersign_eventstore::{Metadata, SharedStore};

use crate::secrets::ServerSecrets;
use crate::{CommandError, Executed, Loaded, execute, execute_from, load};

/// Transaction commands on one store.
#[derive(Clone)]
pub struct TransactionCommands {
    store: SharedStore,
    secrets: ServerSecrets,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for TransactionCommands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransactionCommands")
            .finish_non_exhaustive()
    }
}

impl TransactionCommands {
    pub fn new(store: SharedStore, secrets: ServerSecrets, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            secrets,
            clock,
        }
    }

    fn metadata(transaction: TransactionRef, metadata: &Metadata) -> Metadata {
        Metadata {
            server_id: Some(transaction.server_id.to_string()),
            ..metadata.clone()
        }
    }

    async fn run(
        &self,
        transaction: TransactionRef,
        command: TransactionCommand,
        metadata: &Metadata,
    ) -> Result<Executed<TransactionEvent>, CommandError> {
        let mut ctx = Context::new(self.clock.now());
        execute::<Transaction>(
            &self.store,
            &transaction.stream(),
            command,
            &mut ctx,
            &Self::metadata(transaction, metadata),
            None,
        )
        .await
    }

    /// The id a creation with this idempotency key gets: a retry with the key lands on the
    /// same transaction (and, with the same request, changes nothing). Keyed by the server's
    /// secret so ids cannot be predicted from keys.
    pub async fn id_for_key(
        &self,
        server: ServerId,
        idempotency_key: &str,
    ) -> Result<TransactionId, CommandError> {
        let derived = self
            .secrets
            .derive(server, "transaction-id", idempotency_key.as_bytes())
            .await?;
        let mut id = [0u8; 16];
        id.copy_from_slice(derived.get(..16).unwrap_or(&[0; 16]));
        Ok(TransactionId::from_bytes(id))
    }

    /// Creates a transaction (business API).
    pub async fn create(
        &self,
        request: TransactionRequest,
        metadata: &Metadata,
    ) -> Result<Executed<TransactionEvent>, CommandError> {
        let transaction = request.transaction;
        self.run(transaction, CreateTransaction(request).into(), metadata)
            .await
    }

    /// Records the app's own transaction with its verified signature (device gateway).
    pub async fn create_signed(
        &self,
        command: CreateSignedTransaction,
        metadata: &Metadata,
    ) -> Result<Executed<TransactionEvent>, CommandError> {
        let transaction = command.request.transaction;
        self.run(transaction, command.into(), metadata).await
    }

    /// Records that an account's device fetched it (device gateway), deciding on the state
    /// the gateway loaded to check.
    pub async fn present(
        &self,
        transaction: TransactionRef,
        loaded: Loaded<Transaction>,
        account_id: AccountId,
        user: UserDigest,
        metadata: &Metadata,
    ) -> Result<Executed<TransactionEvent>, CommandError> {
        let command = PresentTransaction { account_id, user };
        self.run_on(transaction, loaded, command.into(), metadata)
            .await
    }

    /// Records a verified signature (device gateway).
    pub async fn sign(
        &self,
        transaction: TransactionRef,
        loaded: Loaded<Transaction>,
        signature: Signature,
        metadata: &Metadata,
    ) -> Result<Executed<TransactionEvent>, CommandError> {
        self.run_on(
            transaction,
            loaded,
            SignTransaction(signature).into(),
            metadata,
        )
        .await
    }

    /// The user declined (device gateway).
    pub async fn reject(
        &self,
        transaction: TransactionRef,
        account_id: AccountId,
        user: UserDigest,
        metadata: &Metadata,
    ) -> Result<Executed<TransactionEvent>, CommandError> {
        let command = RejectTransaction { account_id, user };
        self.run(transaction, command.into(), metadata).await
    }

    /// Records a passed deadline; nothing before it or once ended.
    pub async fn expire(
        &self,
        transaction: TransactionRef,
        metadata: &Metadata,
    ) -> Result<Executed<TransactionEvent>, CommandError> {
        self.run(transaction, ExpireTransaction.into(), metadata)
            .await
    }

    async fn run_on(
        &self,
        transaction: TransactionRef,
        loaded: Loaded<Transaction>,
        command: TransactionCommand,
        metadata: &Metadata,
    ) -> Result<Executed<TransactionEvent>, CommandError> {
        let mut ctx = Context::new(self.clock.now());
        execute_from::<Transaction>(
            &self.store,
            &transaction.stream(),
            loaded,
            command,
            &mut ctx,
            &Self::metadata(transaction, metadata),
        )
        .await
    }

    /// The transaction's current state, from its own stream (the write model).
    pub async fn load(
        &self,
        transaction: TransactionRef,
    ) -> Result<Loaded<Transaction>, CommandError> {
        load::<Transaction>(&self.store, &transaction.stream()).await
    }
}
