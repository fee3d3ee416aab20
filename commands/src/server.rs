//! Server (tenant) commands: the edge work around the pure aggregate. Creating a server makes
//! its P-256 key pair here, keeps the private key in the key vault and hands the domain only
//! the public key; issuing an API key makes a random token, returns it to the caller once and
//! hands the domain only its SHA-256.

use std::sync::Arc;

use countersign_domain::server::{
    ConfigureServer, CreateServer, DeleteServer, DistrustSfsKey, IssueApiKey, RevokeApiKey, Server,
    ServerCommand, ServerEvent, TrustSfsKey,
};
use countersign_domain::{ApiKeyId, Clock, Context, ServerId};
use countersign_eventstore::vault::KeyVault;
use countersign_eventstore::{Metadata, SharedStore};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::secrets::ServerSecrets;
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
    secrets: ServerSecrets,
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
    pub fn new(
        store: SharedStore,
        vault: KeyVault,
        secrets: ServerSecrets,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            store,
            vault,
            secrets,
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

    /// Creates a server with a fresh id, P-256 key pair and secret. With an idempotency key the
    /// id is derived from the key, so a retried request lands on the same stream and answers
    /// the first attempt's result; the vault keeps the first key pair it was given.
    pub async fn create(
        &self,
        name: &str,
        metadata: &Metadata,
        idempotency_key: Option<&str>,
    ) -> Result<(ServerId, Executed<ServerEvent>), CommandError> {
        let mut id = [0u8; 16];
        match idempotency_key {
            Some(key) => {
                let digest = Sha256::new()
                    .chain_update(b"countersign/server-id\0")
                    .chain_update(key.as_bytes())
                    .finalize();
                id.copy_from_slice(digest.get(..16).unwrap_or(&[0; 16]));
            }
            None => random_bytes(&mut id)?,
        }
        let server = ServerId::from_bytes(id);
        let fresh = generate_p256_secret()?;
        let fresh_bytes = Zeroizing::new(fresh.to_bytes().to_vec());
        // The key is in the vault before the event that names it exists; a crash in between
        // leaves an unused vault entry, never a server without its key.
        let kept = self
            .vault
            .put_if_absent(&signing_key_ref(server), &fresh_bytes)
            .await?;
        let secret = p256::SecretKey::from_slice(&kept)
            .map_err(|_| CommandError::Internal("a stored server key is not P-256".into()))?;
        self.secrets.create(server).await?;
        let command = CreateServer {
            id: server,
            name: name.to_owned(),
            public_key: secret.public_key().to_sec1_bytes().to_vec(),
        };
        let done = self
            .run(server, command.into(), metadata, idempotency_key)
            .await?;
        Ok((server, done))
    }

    pub async fn configure(
        &self,
        server: ServerId,
        change: ConfigureServer,
        metadata: &Metadata,
        idempotency_key: Option<&str>,
    ) -> Result<Executed<ServerEvent>, CommandError> {
        let done = self
            .run(server, change.into(), metadata, idempotency_key)
            .await;
        self.secrets.forget_settings(server);
        done
    }

    /// Issues an API key; the token is in the answer and nowhere else. With an idempotency
    /// key, the key id and the token's secret are derived from it under the server's secret,
    /// so a retry answers the same token although the token was never stored.
    pub async fn issue_api_key(
        &self,
        server: ServerId,
        label: &str,
        metadata: &Metadata,
        idempotency_key: Option<&str>,
    ) -> Result<(ApiKeyId, ApiKeyToken, Executed<ServerEvent>), CommandError> {
        let mut id = [0u8; 16];
        let mut secret = Zeroizing::new([0u8; 32]);
        match idempotency_key {
            Some(key) => {
                let derived = self
                    .secrets
                    .derive(server, "api-key-id", key.as_bytes())
                    .await?;
                id.copy_from_slice(derived.get(..16).unwrap_or(&[0; 16]));
                *secret = self
                    .secrets
                    .derive(server, "api-key", key.as_bytes())
                    .await?;
            }
            None => {
                random_bytes(&mut id)?;
                random_bytes(secret.as_mut())?;
            }
        }
        let key_id = ApiKeyId::from_bytes(id);
        let token = ApiKeyToken(Zeroizing::new(format!(
            "cs_{key_id}_{}",
            hex::encode(secret.as_ref())
        )));
        let secret_hash = api_key_hash(token.expose());
        let command = IssueApiKey {
            key_id,
            label: label.to_owned(),
            secret_hash,
        };
        let done = self
            .run(server, command.into(), metadata, idempotency_key)
            .await?;
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

    /// Trusts a third-party SFS's attestation key for this server (nothing new if it is
    /// trusted already).
    pub async fn trust_sfs_key(
        &self,
        server: ServerId,
        public_key: Vec<u8>,
        label: &str,
        metadata: &Metadata,
    ) -> Result<Executed<ServerEvent>, CommandError> {
        let command = TrustSfsKey {
            public_key,
            label: label.to_owned(),
        };
        self.run(server, command.into(), metadata, None).await
    }

    /// Stops trusting an SFS key (nothing new if it was not trusted).
    pub async fn distrust_sfs_key(
        &self,
        server: ServerId,
        key_id: [u8; 32],
        metadata: &Metadata,
    ) -> Result<Executed<ServerEvent>, CommandError> {
        self.run(server, DistrustSfsKey { key_id }.into(), metadata, None)
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
        self.secrets.destroy(server).await?;
        Ok(done)
    }
}

/// What the read model keeps of an API key token: its SHA-256 (the token has 256 random bits,
/// so the hash cannot be reversed and needs no salt).
pub fn api_key_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
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
