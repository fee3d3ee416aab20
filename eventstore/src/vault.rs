//! The key vault: secrets that must stay out of the immutable log and stay deletable.
//!
//! Server private keys and the per-user data keys that seal personal data in events
//! (crypto-shredding) live here, each sealed with AES-256-GCM under the deployment's master
//! key, with the key's reference as associated data so a sealed blob cannot be moved to
//! another reference. Destroying a user's data key makes every sealed field of that user in
//! the log unreadable for good, while the log itself stays untouched and verifiable.

use std::sync::Arc;

use async_trait::async_trait;
use countersign_domain::{DataKey, Sealed, cbor};
use zeroize::Zeroizing;

use crate::{Database, StoreError, now_millis, with_pool};

/// Where sealed secrets are kept: the same database as the log, a table that allows delete.
#[async_trait]
pub trait VaultStorage: Send + Sync + std::fmt::Debug {
    /// Stores `sealed` under `key_ref` unless something is there already; answers whether it
    /// stored it (false: another caller won the race, use theirs).
    async fn put_if_absent(&self, key_ref: &str, sealed: &[u8]) -> Result<bool, StoreError>;
    async fn get(&self, key_ref: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Deletes for good; answers whether there was something to delete.
    async fn destroy(&self, key_ref: &str) -> Result<bool, StoreError>;
}

/// One implementation for both databases: the SQL is shared, only the pool differs.
#[async_trait]
impl VaultStorage for Database {
    async fn put_if_absent(&self, key_ref: &str, sealed: &[u8]) -> Result<bool, StoreError> {
        let done = with_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO key_vault (key_ref, sealed, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (key_ref) DO NOTHING",
            )
            .bind(key_ref)
            .bind(sealed)
            .bind(now_millis())
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(done == 1)
    }

    async fn get(&self, key_ref: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(with_pool!(self, pool => {
            sqlx::query_scalar("SELECT sealed FROM key_vault WHERE key_ref = $1")
                .bind(key_ref)
                .fetch_optional(pool)
                .await?
        }))
    }

    async fn destroy(&self, key_ref: &str) -> Result<bool, StoreError> {
        let done = with_pool!(self, pool => {
            sqlx::query("DELETE FROM key_vault WHERE key_ref = $1")
                .bind(key_ref)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(done == 1)
    }
}

/// Seals and opens secrets in a [`VaultStorage`] under the master key.
#[derive(Debug, Clone)]
pub struct KeyVault {
    storage: Arc<dyn VaultStorage>,
    master: Arc<DataKey>,
}

impl KeyVault {
    pub fn new(storage: Arc<dyn VaultStorage>, master: DataKey) -> Self {
        Self {
            storage,
            master: Arc::new(master),
        }
    }

    /// Keeps `secret` under `key_ref` unless one is there; answers the one that is kept.
    pub async fn put_if_absent(
        &self,
        key_ref: &str,
        secret: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        let nonce = random_nonce()?;
        let sealed = self
            .master
            .seal(nonce, key_ref.as_bytes(), secret)
            .map_err(|e| StoreError::InvalidAppend {
                reason: format!("cannot seal: {e}"),
            })?;
        let bytes = cbor::to_canonical_vec(&sealed)
            .map_err(|e| StoreError::Config(format!("cannot encode a sealed key: {e}")))?;
        if self.storage.put_if_absent(key_ref, &bytes).await? {
            return Ok(Zeroizing::new(secret.to_vec()));
        }
        self.get(key_ref)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("vault entry {key_ref} vanished")))
    }

    /// The secret under `key_ref`; `None` if there is none (never was, or destroyed).
    pub async fn get(&self, key_ref: &str) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        let Some(bytes) = self.storage.get(key_ref).await? else {
            return Ok(None);
        };
        let sealed: Sealed = cbor::from_slice(&bytes)
            .map_err(|e| StoreError::Corrupt(format!("vault entry {key_ref}: {e}")))?;
        let secret = self.master.open(key_ref.as_bytes(), &sealed).map_err(|_| {
            StoreError::Config(format!(
                "vault entry {key_ref} does not open with this master key: wrong key?"
            ))
        })?;
        Ok(Some(Zeroizing::new(secret)))
    }

    /// Destroys the secret for good (crypto-shredding).
    pub async fn destroy(&self, key_ref: &str) -> Result<bool, StoreError> {
        self.storage.destroy(key_ref).await
    }
}

fn random_nonce() -> Result<[u8; 12], StoreError> {
    let mut nonce = [0u8; 12];
    getrandom::fill(&mut nonce)
        .map_err(|e| StoreError::Unavailable(format!("no randomness from the OS: {e}")))?;
    Ok(nonce)
}

/// Parses a master key: 32 random bytes, hex encoded (as `countersign` writes key files).
pub fn parse_master_key(hex_text: &str) -> Result<DataKey, StoreError> {
    let bytes = Zeroizing::new(
        hex::decode(hex_text.trim())
            .map_err(|_| StoreError::Config("the master key must be 64 hex digits".into()))?,
    );
    let array: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| StoreError::Config("the master key must be 64 hex digits".into()))?;
    Ok(DataKey::from_bytes(array))
}
