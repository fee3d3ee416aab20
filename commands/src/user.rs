//! User commands. A user's personal data (userid, attribute values) is sealed in events with
//! the user's own data key, which lives in the key vault; deleting the user destroys that key
//! (crypto-shredding), so the log keeps every event and none of that user's personal data.
//!
//! The user's stream is named by a digest of the userid keyed with the server's user digest
//! key ([`user_digest_key`]), so the digests left in the log after the shredding cannot be
//! tested against a guessed userid by anyone who lacks the vault.

use std::collections::BTreeMap;
use std::sync::Arc;

use countersign_domain::server::Server;
use countersign_domain::user::{
    DeleteUser, PutUser, RegisterUser, RemoveAttribute, SetAttribute, User, UserCommand, UserEvent,
};
use countersign_domain::{
    Clock, Context, DataKey, ErrorKind, SealError, Sealed, Sealer, ServerId, UserDigestKey,
    UserDigestScheme, UserRef, Userid,
};
use countersign_eventstore::vault::KeyVault;
use countersign_eventstore::{Metadata, SharedStore};
use zeroize::Zeroizing;

use crate::secrets::{ServerSecrets, USER_DIGEST_LABEL};
use crate::{CommandError, Executed, execute, load, random_bytes};

/// The vault reference of a user's data key.
pub fn data_key_ref(user: &UserRef) -> String {
    key_ref_of_stream(&user.stream())
}

fn key_ref_of_stream(stream: &str) -> String {
    format!("{stream}/data-key")
}

/// A userid from caller input, refused as the caller's mistake (422) when it breaks the rules.
pub fn parse_userid(userid: &str) -> Result<Userid, CommandError> {
    Userid::new(userid).map_err(|e| CommandError::Rejected {
        kind: countersign_domain::ErrorKind::Invalid,
        message: e.to_string(),
    })
}

/// The key `server`'s user streams are named under, cached after the first call.
///
/// Which scheme a server uses is a fact of its `server.created` event (read once from its
/// stream); a keyed server's key is derived from its secret in the vault. A server that does
/// not exist is `NotFound`, a deleted one `Gone`.
pub async fn user_digest_key(
    store: &SharedStore,
    secrets: &ServerSecrets,
    server: ServerId,
) -> Result<Arc<UserDigestKey>, CommandError> {
    if let Some(key) = secrets.cached_user_digest_key(server) {
        return Ok(key);
    }
    let scheme = match load::<Server>(store, &server.stream()).await?.state {
        Server::Active(active) => active.user_digest,
        Server::NotCreated => {
            return Err(CommandError::Rejected {
                kind: ErrorKind::NotFound,
                message: "server not found".into(),
            });
        }
        Server::Deleted { .. } => {
            return Err(CommandError::Rejected {
                kind: ErrorKind::Gone,
                message: "server was deleted".into(),
            });
        }
    };
    let key = match scheme {
        UserDigestScheme::Sha256Unkeyed => UserDigestKey::legacy_unkeyed(),
        UserDigestScheme::HmacSha256 => {
            let bytes = Zeroizing::new(secrets.derive(server, USER_DIGEST_LABEL, &[]).await?);
            UserDigestKey::hmac_sha256(*bytes)
        }
    };
    Ok(secrets.remember_user_digest_key(server, key))
}

/// The stream reference of `userid` (caller input) at `server`: the userid is checked and
/// normalised first (422 when it breaks the rules), then digested under the server's key.
pub async fn user_ref(
    store: &SharedStore,
    secrets: &ServerSecrets,
    server: ServerId,
    userid: &str,
) -> Result<UserRef, CommandError> {
    let userid = parse_userid(userid)?;
    let key = user_digest_key(store, secrets, server).await?;
    Ok(UserRef::new(server, &key, &userid))
}

/// Seals with the user's data key and a fresh random nonce per field.
struct OsSealer {
    key: DataKey,
}

impl Sealer for OsSealer {
    fn seal(&mut self, aad: &[u8], plaintext: &[u8]) -> Result<Sealed, SealError> {
        let mut nonce = [0u8; 12];
        // A failing OS generator must not fall back to a fixed nonce: refuse instead.
        getrandom::fill(&mut nonce).map_err(|_| SealError::TooLong)?;
        self.key.seal(nonce, aad, plaintext)
    }
}

/// User commands on one store.
#[derive(Clone)]
pub struct UserCommands {
    store: SharedStore,
    vault: KeyVault,
    secrets: ServerSecrets,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for UserCommands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserCommands")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl UserCommands {
    /// User commands with their own cache of server secrets.
    pub fn new(store: SharedStore, vault: KeyVault, clock: Arc<dyn Clock>) -> Self {
        let secrets = ServerSecrets::new(vault.clone());
        Self::with_secrets(store, vault, secrets, clock)
    }

    /// User commands sharing `secrets` (and its key caches) with the other commands.
    pub fn with_secrets(
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

    /// The stream reference of `userid` at `server`, see [`user_ref`].
    pub async fn user_ref(&self, server: ServerId, userid: &str) -> Result<UserRef, CommandError> {
        user_ref(&self.store, &self.secrets, server, userid).await
    }

    /// The server's user digest key, see [`user_digest_key`].
    pub async fn user_digest_key(
        &self,
        server: ServerId,
    ) -> Result<Arc<UserDigestKey>, CommandError> {
        user_digest_key(&self.store, &self.secrets, server).await
    }

    /// The user's data key, created on first use.
    async fn data_key(&self, user: &UserRef, create: bool) -> Result<DataKey, CommandError> {
        let key_ref = data_key_ref(user);
        let bytes = if create {
            let mut fresh = Zeroizing::new([0u8; 32]);
            random_bytes(fresh.as_mut())?;
            Some(self.vault.put_if_absent(&key_ref, fresh.as_ref()).await?)
        } else {
            self.vault.get(&key_ref).await?
        };
        let Some(bytes) = bytes else {
            return Err(CommandError::Rejected {
                kind: countersign_domain::ErrorKind::Gone,
                message: "the user's personal data was erased".into(),
            });
        };
        let array: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| CommandError::Internal("a data key is not 32 bytes".into()))?;
        Ok(DataKey::from_bytes(array))
    }

    async fn run(
        &self,
        user: &UserRef,
        command: UserCommand,
        key: Option<DataKey>,
        metadata: &Metadata,
        idempotency_key: Option<&str>,
    ) -> Result<Executed<UserEvent>, CommandError> {
        let metadata = Metadata {
            server_id: Some(user.server_id.to_string()),
            ..metadata.clone()
        };
        let now = self.clock.now();
        let mut sealer = key.map(|key| OsSealer { key });
        let mut ctx = match sealer.as_mut() {
            Some(sealer) => Context::with_sealer(now, sealer),
            None => Context::new(now),
        };
        execute::<User>(
            &self.store,
            &user.stream(),
            command,
            &mut ctx,
            &metadata,
            idempotency_key,
        )
        .await
    }

    /// Creates the user if needed and replaces their attributes with `attributes`, in one
    /// decision on the user's stream.
    pub async fn put(
        &self,
        server: ServerId,
        userid: &str,
        attributes: BTreeMap<String, String>,
        metadata: &Metadata,
        idempotency_key: Option<&str>,
    ) -> Result<(UserRef, Executed<UserEvent>), CommandError> {
        let userid = parse_userid(userid)?;
        let user = UserRef::new(server, &*self.user_digest_key(server).await?, &userid);
        let key = self.data_key(&user, true).await?;
        let command = PutUser {
            user,
            userid,
            attributes,
        };
        let done = self
            .run(&user, command.into(), Some(key), metadata, idempotency_key)
            .await?;
        Ok((user, done))
    }

    pub async fn register(
        &self,
        server: ServerId,
        userid: &str,
        metadata: &Metadata,
    ) -> Result<(UserRef, Executed<UserEvent>), CommandError> {
        let userid = parse_userid(userid)?;
        let user = UserRef::new(server, &*self.user_digest_key(server).await?, &userid);
        let key = self.data_key(&user, true).await?;
        let command = RegisterUser { user, userid };
        let done = self
            .run(&user, command.into(), Some(key), metadata, None)
            .await?;
        Ok((user, done))
    }

    pub async fn set_attribute(
        &self,
        user: &UserRef,
        name: &str,
        value: &str,
        metadata: &Metadata,
    ) -> Result<Executed<UserEvent>, CommandError> {
        let key = self.data_key(user, false).await?;
        let command = SetAttribute {
            name: name.to_owned(),
            value: value.to_owned(),
        };
        self.run(user, command.into(), Some(key), metadata, None)
            .await
    }

    pub async fn remove_attribute(
        &self,
        user: &UserRef,
        name: &str,
        metadata: &Metadata,
    ) -> Result<Executed<UserEvent>, CommandError> {
        let command = RemoveAttribute {
            name: name.to_owned(),
        };
        self.run(user, command.into(), None, metadata, None).await
    }

    /// Deletes the user and destroys their data key.
    pub async fn delete(
        &self,
        user: &UserRef,
        metadata: &Metadata,
    ) -> Result<Executed<UserEvent>, CommandError> {
        let result = self
            .run(user, DeleteUser.into(), None, metadata, None)
            .await;
        // Destroy even if the user was already deleted: a crash after the event and before
        // the destruction must not leave the key behind.
        self.vault.destroy(&data_key_ref(user)).await?;
        result
    }

    /// Opens several sealed fields of the user whose stream is `stream` with one key lookup;
    /// `None` once the user's data key is destroyed.
    pub async fn open_all(
        &self,
        stream: &str,
        fields: &[(&str, &Sealed)],
    ) -> Result<Option<Vec<String>>, CommandError> {
        let Some(bytes) = self.vault.get(&key_ref_of_stream(stream)).await? else {
            return Ok(None);
        };
        let array: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| CommandError::Internal("a data key is not 32 bytes".into()))?;
        let key = DataKey::from_bytes(array);
        let mut opened = Vec::with_capacity(fields.len());
        for (field, sealed) in fields {
            let plain = key
                .open(&countersign_domain::seal::aad(stream, field), sealed)
                .map_err(|e| CommandError::Internal(e.to_string()))?;
            opened.push(
                String::from_utf8(plain)
                    .map_err(|_| CommandError::Internal("sealed field is not UTF-8".into()))?,
            );
        }
        Ok(Some(opened))
    }

    /// Opens a sealed field of the user whose stream is `stream`, or `None` once the user's
    /// data key is destroyed.
    pub async fn open(
        &self,
        stream: &str,
        field: &str,
        sealed: &Sealed,
    ) -> Result<Option<String>, CommandError> {
        let Some(bytes) = self.vault.get(&key_ref_of_stream(stream)).await? else {
            return Ok(None);
        };
        let array: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| CommandError::Internal("a data key is not 32 bytes".into()))?;
        let plain = DataKey::from_bytes(array)
            .open(&countersign_domain::seal::aad(stream, field), sealed)
            .map_err(|e| CommandError::Internal(e.to_string()))?;
        String::from_utf8(plain)
            .map(Some)
            .map_err(|_| CommandError::Internal("sealed field is not UTF-8".into()))
    }
}
