//! The SDK's one door to the operating system's random generator: nonces, keys, ids.

use countersign_protocol::channel::StaticKey;

use crate::error::SdkError;
use crate::storage::StorageError;

/// Fills `out` with random bytes.
///
/// # Errors
/// [`SdkError::Storage`] if the generator fails (nothing else can go on without it).
pub(crate) fn fill(out: &mut [u8]) -> Result<(), SdkError> {
    getrandom::fill(out).map_err(|_| StorageError::Io("random generator failed".into()).into())
}

/// `N` random bytes.
pub(crate) fn bytes<const N: usize>() -> Result<[u8; N], SdkError> {
    let mut out = [0u8; N];
    fill(&mut out)?;
    Ok(out)
}

/// A fresh P-256 private key (channel or signing). A random 32-byte string is a valid scalar
/// except with probability about 2^-32; those are drawn again.
pub(crate) fn p256_key() -> Result<StaticKey, SdkError> {
    loop {
        let mut candidate = zeroize::Zeroizing::new([0u8; 32]);
        fill(candidate.as_mut_slice())?;
        if let Ok(key) = StaticKey::from_bytes(candidate.as_slice()) {
            return Ok(key);
        }
    }
}
