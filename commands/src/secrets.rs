//! Per-server secrets and what is derived from them.
//!
//! Each server has one 32-byte random secret in the key vault (`server/{id}/secret`), made
//! with the server. Everything a server must be able to recompute from a caller's input is
//! derived from it with HMAC-SHA256 under a distinct label, so no derived value can be
//! mistaken for another:
//! - `hsid`: a session's internal id from the caller's nonce; the nonce itself is never stored;
//! - `api-key`, `enrolment`: the secret part of a token issued under an idempotency key, so a
//!   retried request answers the same token without the token ever being stored;
//! - `user-digest`: the key user streams are named under (`HMAC-SHA256(key, server ‖ 0 ‖
//!   userid)`, see [`UserRef`](countersign_domain::UserRef)). It lives and dies with the
//!   server's secret: deleting a user leaves it (the server's other users need it), deleting
//!   the server destroys it with the secret.
//!
//! Secrets, and each server's user digest key, are cached in memory (they never change while
//! the server exists) and dropped from the cache when the server is deleted. Beside them sits a short-lived cache of each server's
//! settings for opening sessions ([`SETTINGS_TTL`]): a change made through this process
//! drops it at once, a change made by another instance is seen within the TTL.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use countersign_domain::server::ServerSettings;
use countersign_domain::{ServerId, UserDigestKey};
use countersign_eventstore::vault::KeyVault;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::{CommandError, random_bytes};

type Secret = Arc<Zeroizing<[u8; 32]>>;

/// How long a server's settings are reused for opening sessions without reading its stream.
pub const SETTINGS_TTL: std::time::Duration = std::time::Duration::from_secs(1);

type SettingsCache = Arc<RwLock<HashMap<ServerId, (std::time::Instant, ServerSettings)>>>;

/// The vault reference of a server's secret.
pub fn secret_ref(server: ServerId) -> String {
    format!("server/{server}/secret")
}

/// The derivation label of a server's user digest key.
pub const USER_DIGEST_LABEL: &str = "user-digest";

/// Reads, creates and caches server secrets.
#[derive(Clone)]
pub struct ServerSecrets {
    vault: KeyVault,
    cache: Arc<RwLock<HashMap<ServerId, Secret>>>,
    settings: SettingsCache,
    user_digest_keys: Arc<RwLock<HashMap<ServerId, Arc<UserDigestKey>>>>,
}

impl std::fmt::Debug for ServerSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSecrets").finish_non_exhaustive()
    }
}

impl ServerSecrets {
    pub fn new(vault: KeyVault) -> Self {
        Self {
            vault,
            cache: Arc::default(),
            settings: Arc::default(),
            user_digest_keys: Arc::default(),
        }
    }

    /// The server's user digest key if this process has it already.
    pub fn cached_user_digest_key(&self, server: ServerId) -> Option<Arc<UserDigestKey>> {
        self.user_digest_keys.read().ok()?.get(&server).cloned()
    }

    /// Keeps the server's user digest key for every later request (it never changes while the
    /// server exists).
    pub fn remember_user_digest_key(
        &self,
        server: ServerId,
        key: UserDigestKey,
    ) -> Arc<UserDigestKey> {
        let key = Arc::new(key);
        if let Ok(mut cache) = self.user_digest_keys.write() {
            cache.insert(server, Arc::clone(&key));
        }
        key
    }

    /// The server's settings if read less than [`SETTINGS_TTL`] ago.
    pub fn cached_settings(&self, server: ServerId) -> Option<ServerSettings> {
        let cache = self.settings.read().ok()?;
        let (at, settings) = cache.get(&server)?;
        (at.elapsed() < SETTINGS_TTL).then(|| settings.clone())
    }

    /// Remembers settings just read from the server's stream.
    pub fn remember_settings(&self, server: ServerId, settings: ServerSettings) {
        if let Ok(mut cache) = self.settings.write() {
            if cache.len() > 10_000 {
                cache.retain(|_, (at, _)| at.elapsed() < SETTINGS_TTL);
            }
            cache.insert(server, (std::time::Instant::now(), settings));
        }
    }

    /// Drops the server's cached settings (they just changed).
    pub fn forget_settings(&self, server: ServerId) {
        if let Ok(mut cache) = self.settings.write() {
            cache.remove(&server);
        }
    }

    /// Makes the server's secret unless it exists (creating a server calls this first).
    pub async fn create(&self, server: ServerId) -> Result<(), CommandError> {
        let mut fresh = Zeroizing::new([0u8; 32]);
        random_bytes(fresh.as_mut())?;
        let kept = self
            .vault
            .put_if_absent(&secret_ref(server), fresh.as_ref())
            .await?;
        self.remember(server, &kept)?;
        Ok(())
    }

    /// Forgets and destroys the server's secret (deleting a server).
    pub async fn destroy(&self, server: ServerId) -> Result<(), CommandError> {
        if let Ok(mut cache) = self.cache.write() {
            cache.remove(&server);
        }
        if let Ok(mut cache) = self.user_digest_keys.write() {
            cache.remove(&server);
        }
        self.forget_settings(server);
        self.vault.destroy(&secret_ref(server)).await?;
        Ok(())
    }

    fn remember(&self, server: ServerId, bytes: &[u8]) -> Result<Secret, CommandError> {
        let array: [u8; 32] = bytes
            .try_into()
            .map_err(|_| CommandError::Internal("a server secret is not 32 bytes".into()))?;
        let secret = Arc::new(Zeroizing::new(array));
        if let Ok(mut cache) = self.cache.write() {
            cache.insert(server, Arc::clone(&secret));
        }
        Ok(secret)
    }

    /// The server's secret, or `NotFound` when the server has none (never existed, deleted).
    async fn secret(&self, server: ServerId) -> Result<Secret, CommandError> {
        if let Some(secret) = self.cache.read().ok().and_then(|c| c.get(&server).cloned()) {
            return Ok(secret);
        }
        match self.vault.get(&secret_ref(server)).await? {
            Some(bytes) => self.remember(server, &bytes),
            None => Err(CommandError::Rejected {
                kind: countersign_domain::ErrorKind::NotFound,
                message: "server not found".into(),
            }),
        }
    }

    /// The server's push sender key: the P-256 secret scalar push messages are sealed with
    /// (HPKE auth mode, docs/message-center.md), derived under the label `push-sender` with a
    /// one-byte counter, the first that is a valid scalar (the first, but for a chance of
    /// about 2^-32). It lives and dies with the server's secret.
    pub async fn push_sender_key(
        &self,
        server: ServerId,
    ) -> Result<Zeroizing<[u8; 32]>, CommandError> {
        for counter in 0u8..=255 {
            let candidate = Zeroizing::new(self.derive(server, "push-sender", &[counter]).await?);
            if p256::SecretKey::from_slice(candidate.as_ref()).is_ok() {
                return Ok(candidate);
            }
        }
        Err(CommandError::Internal(
            "no push sender key could be derived".into(),
        ))
    }

    /// `HMAC-SHA256(secret, label ‖ 0x00 ‖ input)`.
    pub async fn derive(
        &self,
        server: ServerId,
        label: &str,
        input: &[u8],
    ) -> Result<[u8; 32], CommandError> {
        let secret = self.secret(server).await?;
        let mut mac = Hmac::<Sha256>::new_from_slice(&secret[..])
            .map_err(|_| CommandError::Internal("HMAC refused a 32-byte key".into()))?;
        mac.update(label.as_bytes());
        mac.update(&[0]);
        mac.update(input);
        Ok(mac.finalize().into_bytes().into())
    }
}
