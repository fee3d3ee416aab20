//! Idempotency keys: each key is bound, for good, to the one request that first used it.
//!
//! A command sent with an `Idempotency-Key` derives its event ids (and any token or id it
//! makes) from the key, so a retry lands on what the first attempt wrote and answers it. On its
//! own that would also answer a *different* request sent under the same key with the first
//! one's result (another user's enrolment QR code, a user value that was never stored). So the
//! edge fingerprints every keyed request (method, path, caller, body: whatever makes two
//! requests differ) and binds the key to that fingerprint before the command runs.
//!
//! Rules it enforces:
//! - the first request under a key binds it, whatever its outcome: a corrected request is
//!   another request and needs another key (the IETF `idempotency-key-header` draft, Stripe);
//! - the same fingerprint again is [`KeyBinding::Bound`]: the command runs and answers the
//!   first attempt's result without writing again;
//! - another fingerprint is [`KeyBinding::Reused`]: the caller refuses it before anything is
//!   decided or written;
//! - binding is atomic across instances: the record is kept first-writer-wins in the key
//!   vault's table (`INSERT … ON CONFLICT DO NOTHING` on both databases), under
//!   `idempotency/{scope}/{key digest}`;
//! - for a tenant, the key digest and the fingerprint are HMACs under the server's secret, so
//!   a record says nothing of the request (bodies hold personal data) and means nothing once
//!   the server and its secret are deleted; admin requests (no tenant secret, no personal
//!   data) use SHA-256 under distinct labels.

use countersign_domain::ServerId;
use countersign_eventstore::vault::KeyVault;
use sha2::{Digest, Sha256};

use crate::CommandError;
use crate::secrets::ServerSecrets;

/// Whose keys these are: keys of different scopes never meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The deployment's admin endpoints (servers and their API keys).
    Admin,
    /// One tenant's endpoints, whichever of its API keys calls.
    Server(ServerId),
}

/// What binding a key to a request found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyBinding {
    /// The key is bound to this request (just now, or by an earlier attempt of it).
    Bound,
    /// The key is bound to another request: refuse this one, write nothing.
    Reused,
}

/// Binds idempotency keys to request fingerprints.
#[derive(Clone)]
pub struct IdempotencyKeys {
    vault: KeyVault,
    secrets: ServerSecrets,
}

impl std::fmt::Debug for IdempotencyKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyKeys").finish_non_exhaustive()
    }
}

impl IdempotencyKeys {
    pub fn new(vault: KeyVault, secrets: ServerSecrets) -> Self {
        Self { vault, secrets }
    }

    /// Binds `key` to the request `parts` describe (each part length-prefixed, so no two
    /// different lists of parts read the same), or finds it bound to this or another request.
    pub async fn bind(
        &self,
        scope: Scope,
        key: &str,
        parts: &[&[u8]],
    ) -> Result<KeyBinding, CommandError> {
        let mut request = Vec::new();
        for part in parts {
            request.extend_from_slice(&(part.len() as u64).to_be_bytes());
            request.extend_from_slice(part);
        }
        let (key_ref, fingerprint) = match scope {
            Scope::Admin => (
                format!(
                    "idempotency/admin/{}",
                    hex::encode(sha256(b"key", key.as_bytes()))
                ),
                sha256(b"request", &request),
            ),
            Scope::Server(server) => {
                let digest = self
                    .secrets
                    .derive(server, "idempotency-key", key.as_bytes())
                    .await?;
                let fingerprint = self
                    .secrets
                    .derive(server, "idempotency-request", &request)
                    .await?;
                (
                    format!("idempotency/server/{server}/{}", hex::encode(digest)),
                    fingerprint,
                )
            }
        };
        let kept = self.vault.put_if_absent(&key_ref, &fingerprint).await?;
        Ok(if kept.as_slice() == fingerprint.as_slice() {
            KeyBinding::Bound
        } else {
            KeyBinding::Reused
        })
    }
}

fn sha256(label: &[u8], input: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update(b"countersign/idempotency-")
        .chain_update(label)
        .chain_update([0])
        .chain_update(input)
        .finalize()
        .into()
}
