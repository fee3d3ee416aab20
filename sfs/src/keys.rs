//! The SFS's keys, kept in the key vault and created on first start: the Noise channel key
//! (`sfs/channel-key`), the attestation key (`sfs/attestation-key`) and the OPAQUE server
//! setup (`sfs/opaque-setup`). `put_if_absent` makes concurrent first starts agree on one key.

use std::fmt;

use countersign_eventstore::vault::KeyVault;
use countersign_protocol::channel::StaticKey;
use p256::ecdsa::{SigningKey, VerifyingKey};
use zeroize::Zeroizing;

use crate::Error;
use crate::opaque::Setup;

/// Vault reference of the Noise static key.
pub const CHANNEL_KEY_REF: &str = "sfs/channel-key";
/// Vault reference of the attestation signing key.
pub const ATTESTATION_KEY_REF: &str = "sfs/attestation-key";
/// Vault reference of the OPAQUE server setup.
pub const OPAQUE_SETUP_REF: &str = "sfs/opaque-setup";

pub(crate) struct Keys {
    pub(crate) channel: StaticKey,
    pub(crate) channel_public: Vec<u8>,
    pub(crate) attestation: SigningKey,
    pub(crate) opaque: Setup,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    pub(crate) async fn load_or_create(vault: &KeyVault) -> Result<Self, Error> {
        let channel = StaticKey::from_bytes(&p256_scalar(vault, CHANNEL_KEY_REF).await?)
            .map_err(|_| Error::Keys(CHANNEL_KEY_REF))?;
        let channel_public = channel
            .public_key()
            .map_err(|_| Error::Keys(CHANNEL_KEY_REF))?;
        let attestation = attestation_key(vault).await?;
        let opaque = match vault.get(OPAQUE_SETUP_REF).await? {
            Some(bytes) => bytes,
            None => {
                vault
                    .put_if_absent(OPAQUE_SETUP_REF, &Setup::generate().to_bytes())
                    .await?
            }
        };
        let opaque = Setup::from_bytes(&opaque).map_err(|_| Error::Keys(OPAQUE_SETUP_REF))?;
        Ok(Self {
            channel,
            channel_public,
            attestation,
            opaque,
        })
    }
}

/// The attestation key, created if absent.
pub(crate) async fn attestation_key(vault: &KeyVault) -> Result<SigningKey, Error> {
    SigningKey::from_slice(&p256_scalar(vault, ATTESTATION_KEY_REF).await?)
        .map_err(|_| Error::Keys(ATTESTATION_KEY_REF))
}

/// The public half of the deployment's attestation key, for an NS that trusts its own SFS:
/// read from the vault (and created there if no SFS ran yet).
///
/// # Errors
/// [`Error::Store`] when the vault fails, [`Error::Keys`] when its entry is not a key.
pub async fn attestation_public_key(vault: &KeyVault) -> Result<VerifyingKey, Error> {
    Ok(*attestation_key(vault).await?.verifying_key())
}

/// A P-256 private scalar from the vault, or a fresh one put there.
async fn p256_scalar(vault: &KeyVault, key_ref: &'static str) -> Result<Zeroizing<Vec<u8>>, Error> {
    if let Some(bytes) = vault.get(key_ref).await? {
        return Ok(bytes);
    }
    let mut scalar = Zeroizing::new([0u8; 32]);
    // A uniformly random 32-byte string is a valid scalar with probability 1 − 2^-32;
    // draw again otherwise.
    loop {
        getrandom::fill(scalar.as_mut_slice()).map_err(|_| Error::Random)?;
        if p256::SecretKey::from_slice(scalar.as_slice()).is_ok() {
            break;
        }
    }
    Ok(vault.put_if_absent(key_ref, scalar.as_slice()).await?)
}
