//! The Message Center's Noise channel key, kept in the key vault under [`CHANNEL_KEY_REF`]
//! and created on first start (`put_if_absent`: concurrent first starts agree on one key).

use countersign_eventstore::vault::KeyVault;
use countersign_protocol::channel::StaticKey;
use zeroize::Zeroizing;

use crate::Error;

/// Vault reference of the Noise static key.
pub const CHANNEL_KEY_REF: &str = "mc-channel";

pub(crate) struct Keys {
    pub(crate) channel: StaticKey,
    /// SEC1 uncompressed.
    pub(crate) channel_public: Vec<u8>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    pub(crate) async fn load_or_create(vault: &KeyVault) -> Result<Self, Error> {
        let scalar = match vault.get(CHANNEL_KEY_REF).await? {
            Some(bytes) => bytes,
            None => {
                let mut scalar = Zeroizing::new([0u8; 32]);
                // A uniformly random 32-byte string is a valid P-256 scalar with probability
                // 1 − 2^-32; draw again otherwise.
                loop {
                    getrandom::fill(scalar.as_mut_slice()).map_err(|_| Error::Random)?;
                    if StaticKey::from_bytes(scalar.as_slice())
                        .and_then(|k| k.public_key())
                        .is_ok()
                    {
                        break;
                    }
                }
                vault
                    .put_if_absent(CHANNEL_KEY_REF, scalar.as_slice())
                    .await?
            }
        };
        let channel = StaticKey::from_bytes(&scalar).map_err(|_| Error::Keys(CHANNEL_KEY_REF))?;
        let channel_public = channel
            .public_key()
            .map_err(|_| Error::Keys(CHANNEL_KEY_REF))?;
        Ok(Self {
            channel,
            channel_public,
        })
    }
}
