//! Server (tenant) commands: the edge work around the pure aggregate. Creating a server makes
//! its P-256 key pair here, keeps the private key in the key vault and hands the domain only
//! the public key; issuing an API key makes a random token, returns it to the caller once and
//! hands the domain only its SHA-256.

use std::sync::Arc;

use countersign_domain::server::{
    ConfigureServer, CreateServer, DeleteServer, IssueApiKey, RevokeApiKey, Server, ServerCommand,
    ServerEvent,
};
use countersign_domain::{ApiKeyId, Clock, Context, ServerId};
use countersign_eventstore::vault::KeyVault;
use countersign_eventstore::{Metadata, SharedStore};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::{CommandError, Executed, execute, random_bytes};

/// An API key token, shown to the caller once. `Debug` prints nothing of it.
pub struct ApiKeyToken(Zeroizing<String>);

impl ApiKeyToken {
    /// The token, for the one answer that hands it over.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKeyToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKeyToken(..)")
    }
}

/// The vault reference of a server's private key.
pub fn signing_key_ref(server: ServerId) -> String {
    format!("server/{server}/signing-key")
}

/// Server commands on one store.
#[derive(Clone)]
pub struct ServerCommands {
    store: SharedStore,
    vault: KeyVault,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for ServerCommands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCommands")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl ServerCommands {
    pub fn new(store: SharedStore, vault: KeyVault, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            vault,
            clock,
        }
    }

    async fn run(
        &self,
        server: ServerId,
        command: ServerCommand,
        metadata: &Metadata,
        idempotency_key: Option<&str>,
    ) -> Result<Executed<ServerEvent>, CommandError> {
        let mut ctx = Context::new(self.clock.now());
        let metadata = Metadata {
            server_id: Some(server.to_string()),
            ..metadata.clone()
        };
        execute::<Server>(
            &self.store,
            &server.stream(),
            command,
            &mut ctx,
            &metadata,
            idempotency_key,
        )
        .await
    }

    /// Creates a server with a fresh id and P-256 key pair.
    pub async fn create(
        &self,
        name: &str,
        metadata: &Metadata,
    ) -> Result<(ServerId, Executed<ServerEvent>), CommandError> {
        let mut id = [0u8; 16];
        random_bytes(&mut id)?;
        let server = ServerId::from_bytes(id);
        let secret = generate_p256_secret()?;
        let public_key = secret.public_key().to_sec1_bytes().to_vec();
        let secret_bytes = Zeroizing::new(secret.to_bytes().to_vec());
        // The key is in the vault before the event that names it exists; a crash in between
        // leaves an unused vault entry, never a server without its key.
        self.vault
            .put_if_absent(&signing_key_ref(server), &secret_bytes)
            .await?;
        let command = CreateServer {
            id: server,
            name: name.to_owned(),
            public_key,
        };
        let done = self.run(server, command.into(), metadata, None).await?;
        Ok((server, done))
    }

    pub async fn configure(
        &self,
        server: ServerId,
        change: ConfigureServer,
        metadata: &Metadata,
    ) -> Result<Executed<ServerEvent>, CommandError> {
        self.run(server, change.into(), metadata, None).await
    }

    /// Issues an API key; the token is in the answer and nowhere else.
    pub async fn issue_api_key(
        &self,
        server: ServerId,
        label: &str,
        metadata: &Metadata,
    ) -> Result<(ApiKeyId, ApiKeyToken, Executed<ServerEvent>), CommandError> {
        let mut id = [0u8; 16];
        random_bytes(&mut id)?;
        let key_id = ApiKeyId::from_bytes(id);
        let mut secret = Zeroizing::new([0u8; 32]);
        random_bytes(secret.as_mut())?;
        let token = ApiKeyToken(Zeroizing::new(format!(
            "cs_{key_id}_{}",
            hex::encode(secret.as_ref())
        )));
        let secret_hash: [u8; 32] = Sha256::digest(token.expose().as_bytes()).into();
        let command = IssueApiKey {
            key_id,
            label: label.to_owned(),
            secret_hash,
        };
        let done = self.run(server, command.into(), metadata, None).await?;
        Ok((key_id, token, done))
    }

    pub async fn revoke_api_key(
        &self,
        server: ServerId,
        key_id: ApiKeyId,
        metadata: &Metadata,
    ) -> Result<Executed<ServerEvent>, CommandError> {
        self.run(server, RevokeApiKey { key_id }.into(), metadata, None)
            .await
    }

    /// Deletes the server and destroys its private key.
    pub async fn delete(
        &self,
        server: ServerId,
        metadata: &Metadata,
    ) -> Result<Executed<ServerEvent>, CommandError> {
        let done = self
            .run(server, DeleteServer.into(), metadata, None)
            .await?;
        self.vault.destroy(&signing_key_ref(server)).await?;
        Ok(done)
    }
}

/// A P-256 secret key from OS randomness (rejection sampling: out-of-range bytes are redrawn).
fn generate_p256_secret() -> Result<p256::SecretKey, CommandError> {
    for _ in 0..16 {
        let mut bytes = Zeroizing::new([0u8; 32]);
        random_bytes(bytes.as_mut())?;
        if let Ok(secret) = p256::SecretKey::from_slice(bytes.as_ref()) {
            return Ok(secret);
        }
    }
    Err(CommandError::Internal("could not draw a P-256 key".into()))
}
