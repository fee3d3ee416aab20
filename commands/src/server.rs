//! Server (tenant) commands: the edge work around the pure aggregate. Creating a server makes
//! its P-256 key pair here, keeps the private key in the key vault and hands the domain only
//! the public key; issuing an API key makes a random token, returns it to the caller once and
//! hands the domain only its SHA-256. OIDC clients get the same treatment (a confidential
//! client's secret is returned once, only its SHA-256 is recorded); rotating the OIDC signing
//! key makes a P-256 key here and puts the private key in the vault under
//! [`oidc_key_ref`] before the event that names it exists.

use std::sync::Arc;

use countersign_domain::server::{
    ConfigureServer, CreateServer, DeleteServer, DistrustSfsKey, IssueApiKey, OidcClientKind,
    OidcClientSettings, RegisterOidcClient, RemoveOidcClient, RevokeApiKey, RotateOidcClientSecret,
    RotateOidcKey, Server, ServerCommand, ServerEvent, TrustSfsKey, UpdateOidcClient, oidc_kid,
};
use countersign_domain::{ApiKeyId, Clock, Context, OidcClientId, ServerId};
use countersign_eventstore::vault::KeyVault;
use countersign_eventstore::{Metadata, SharedStore};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::secrets::ServerSecrets;
use crate::{CommandError, Executed, execute, load, random_bytes};

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

/// An OIDC client secret, shown to the caller once: 32 random bytes, base64url without
/// padding (43 characters). `Debug` prints nothing of it.
pub struct ClientSecret(Zeroizing<String>);

impl ClientSecret {
    /// The secret, for the one answer that hands it over.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientSecret(..)")
    }
}

/// What the log and the read model keep of a client secret: the SHA-256 of the secret as the
/// client presents it (256 random bits, so the hash needs no salt and cannot be reversed).
pub fn client_secret_hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The vault reference of one OIDC signing key's private half (the 32-byte P-256 scalar).
pub fn oidc_key_ref(server: ServerId, kid: &str) -> String {
    format!("server/{server}/oidc-key/{kid}")
}

fn client_secret(bytes: &[u8; 32]) -> ClientSecret {
    use base64::Engine as _;
    ClientSecret(Zeroizing::new(
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes),
    ))
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

    /// Registers an OIDC client with a fresh id and, for a confidential client, a fresh
    /// secret that is in the answer and nowhere else. With an idempotency key both are derived
    /// from it under the server's secret, so a retry answers the same secret.
    pub async fn register_oidc_client(
        &self,
        server: ServerId,
        settings: OidcClientSettings,
        metadata: &Metadata,
        idempotency_key: Option<&str>,
    ) -> Result<(OidcClientId, Option<ClientSecret>, Executed<ServerEvent>), CommandError> {
        let mut id = [0u8; 16];
        let mut secret = Zeroizing::new([0u8; 32]);
        match idempotency_key {
            Some(key) => {
                let derived = self
                    .secrets
                    .derive(server, "oidc-client-id", key.as_bytes())
                    .await?;
                id.copy_from_slice(derived.get(..16).unwrap_or(&[0; 16]));
                *secret = self
                    .secrets
                    .derive(server, "oidc-client-secret", key.as_bytes())
                    .await?;
            }
            None => {
                random_bytes(&mut id)?;
                random_bytes(secret.as_mut())?;
            }
        }
        let client_id = OidcClientId::from_bytes(id);
        let secret =
            (settings.kind == OidcClientKind::Confidential).then(|| client_secret(&secret));
        let command = RegisterOidcClient {
            client_id,
            settings,
            secret_hash: secret.as_ref().map(|s| client_secret_hash(s.expose())),
        };
        let done = self
            .run(server, command.into(), metadata, idempotency_key)
            .await?;
        Ok((client_id, secret, done))
    }

    /// Changes some of a client's settings (nothing new if nothing changes).
    pub async fn update_oidc_client(
        &self,
        server: ServerId,
        change: UpdateOidcClient,
        metadata: &Metadata,
        idempotency_key: Option<&str>,
    ) -> Result<Executed<ServerEvent>, CommandError> {
        self.run(server, change.into(), metadata, idempotency_key)
            .await
    }

    /// Gives a confidential client a new secret (in the answer only); the old one stops
    /// matching at once. With an idempotency key the secret is derived from it, so a retry
    /// answers the same secret.
    pub async fn rotate_oidc_client_secret(
        &self,
        server: ServerId,
        client_id: OidcClientId,
        metadata: &Metadata,
        idempotency_key: Option<&str>,
    ) -> Result<(ClientSecret, Executed<ServerEvent>), CommandError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        match idempotency_key {
            Some(key) => {
                let mut input = client_id.as_bytes().to_vec();
                input.extend_from_slice(key.as_bytes());
                *bytes = self
                    .secrets
                    .derive(server, "oidc-client-secret-rotated", &input)
                    .await?;
            }
            None => random_bytes(bytes.as_mut())?,
        }
        let secret = client_secret(&bytes);
        let command = RotateOidcClientSecret {
            client_id,
            secret_hash: client_secret_hash(secret.expose()),
        };
        let done = self
            .run(server, command.into(), metadata, idempotency_key)
            .await?;
        Ok((secret, done))
    }

    /// Removes a client: it can no longer log anyone in.
    pub async fn remove_oidc_client(
        &self,
        server: ServerId,
        client_id: OidcClientId,
        metadata: &Metadata,
    ) -> Result<Executed<ServerEvent>, CommandError> {
        self.run(
            server,
            RemoveOidcClient { client_id }.into(),
            metadata,
            None,
        )
        .await
    }

    /// Makes a new OIDC signing key the current one and answers its `kid`. The private key is
    /// in the vault before the event that names it exists: a crash in between leaves an unused
    /// vault entry, never a published key nobody can sign with. With an idempotency key the
    /// key is derived from it under the server's secret, so a retry lands on the same key.
    pub async fn rotate_oidc_key(
        &self,
        server: ServerId,
        metadata: &Metadata,
        idempotency_key: Option<&str>,
    ) -> Result<(String, Executed<ServerEvent>), CommandError> {
        let fresh = match idempotency_key {
            Some(key) => {
                let derived = Zeroizing::new(
                    self.secrets
                        .derive(server, "oidc-signing-key", key.as_bytes())
                        .await?,
                );
                p256::SecretKey::from_slice(derived.as_ref()).map_err(|_| {
                    CommandError::Internal("a derived OIDC key is not a P-256 scalar".into())
                })?
            }
            None => generate_p256_secret()?,
        };
        let public_key = fresh.public_key().to_sec1_bytes().to_vec();
        let kid = oidc_kid(&public_key)
            .ok_or_else(|| CommandError::Internal("a fresh P-256 key has no thumbprint".into()))?;
        // Only a live server gets a vault entry (a deleted one's keys were shredded).
        match load::<Server>(&self.store, &server.stream()).await?.state {
            Server::Active(_) => {}
            Server::NotCreated | Server::Deleted { .. } => {
                return self
                    .run(server, RotateOidcKey { public_key }.into(), metadata, None)
                    .await
                    .map(|done| (kid, done));
            }
        }
        let fresh_bytes = Zeroizing::new(fresh.to_bytes().to_vec());
        let kept = self
            .vault
            .put_if_absent(&oidc_key_ref(server, &kid), &fresh_bytes)
            .await?;
        if kept.as_slice() != fresh_bytes.as_slice() {
            return Err(CommandError::Internal(
                "the vault holds another key under this kid".into(),
            ));
        }
        let done = self
            .run(
                server,
                RotateOidcKey { public_key }.into(),
                metadata,
                idempotency_key,
            )
            .await?;
        let kid = done
            .events
            .iter()
            .find_map(|e| match e {
                ServerEvent::OidcKeyRotated(rotated) => Some(rotated.kid.clone()),
                _ => None,
            })
            .unwrap_or(kid);
        Ok((kid, done))
    }

    /// The private half of the OIDC signing key `kid`, from the vault (`None` once shredded).
    pub async fn oidc_signing_key(
        &self,
        server: ServerId,
        kid: &str,
    ) -> Result<Option<p256::SecretKey>, CommandError> {
        let Some(bytes) = self.vault.get(&oidc_key_ref(server, kid)).await? else {
            return Ok(None);
        };
        p256::SecretKey::from_slice(&bytes)
            .map(Some)
            .map_err(|_| CommandError::Internal("a stored OIDC key is not P-256".into()))
    }

    /// Deletes the server and destroys its private keys (its own and its OIDC signing keys).
    pub async fn delete(
        &self,
        server: ServerId,
        metadata: &Metadata,
    ) -> Result<Executed<ServerEvent>, CommandError> {
        let oidc_keys = match load::<Server>(&self.store, &server.stream()).await?.state {
            Server::Active(active) => active.oidc_keys,
            Server::NotCreated | Server::Deleted { .. } => Vec::new(),
        };
        let done = self
            .run(server, DeleteServer.into(), metadata, None)
            .await?;
        for kid in &oidc_keys {
            self.vault.destroy(&oidc_key_ref(server, kid)).await?;
        }
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
