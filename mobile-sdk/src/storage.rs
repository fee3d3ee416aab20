//! Where the SDK keeps its state: one opaque blob, loaded at open and saved after each change.
//!
//! [`Storage`] is the seam the app plugs its platform into. [`EncryptedFileStorage`] is the
//! implementation for a file system: AES-256-GCM with a fresh random nonce per save, the
//! file being `magic ‖ nonce (12) ‖ ciphertext` with the magic as associated data, so a file
//! of another format or version never decrypts as ours. Saves are atomic (a temporary file in
//! the same folder, then a rename) and, on unix, readable by the owner only (0600). A wrong
//! key, a truncated or tampered file is a [`StorageError`], never a panic and never partial
//! state. [`MemoryStorage`] keeps the blob in memory, for tests.

use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use zeroize::Zeroizing;

use crate::error::SdkError;

/// The first bytes of an encrypted state file, version 1; also its associated data.
pub const MAGIC: &[u8; 6] = b"CSSDK\x01";
const NONCE_LEN: usize = 12;
/// The file [`EncryptedFileStorage::in_dir`] keeps the key in.
pub const KEY_FILE: &str = "storage.key";
/// The file [`EncryptedFileStorage::in_dir`] keeps the state in.
pub const STATE_FILE: &str = "sdk.state";

/// Keeps the SDK's whole state as one blob.
pub trait Storage: Send + Sync + fmt::Debug {
    /// The blob last saved, or `None` before the first save.
    ///
    /// # Errors
    /// [`SdkError::Storage`].
    fn load(&self) -> Result<Option<Vec<u8>>, SdkError>;
    /// Replaces the blob, atomically.
    ///
    /// # Errors
    /// [`SdkError::Storage`].
    fn save(&self, bytes: &[u8]) -> Result<(), SdkError>;
}

/// Why the state could not be read or written. Messages name no path content or key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// The operating system failed (permissions, disk full…).
    #[error("i/o: {0}")]
    Io(String),
    /// The file does not start with our magic (another format, or truncated).
    #[error("not an SDK state file")]
    NotOurs,
    /// The file did not decrypt: a wrong key, or tampered bytes.
    #[error("the state file does not authenticate (wrong key or tampered)")]
    Unauthentic,
    /// The key file is not 32 bytes.
    #[error("the storage key file is malformed")]
    BadKey,
    /// The decrypted state is not what this SDK writes.
    #[error("the state is malformed: {0}")]
    Malformed(String),
}

impl From<StorageError> for SdkError {
    fn from(e: StorageError) -> Self {
        Self::Storage(e)
    }
}

fn io(e: &io::Error) -> StorageError {
    StorageError::Io(e.kind().to_string())
}

/// The state in a file, encrypted with a 32-byte key.
pub struct EncryptedFileStorage {
    path: PathBuf,
    key: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for EncryptedFileStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptedFileStorage")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl EncryptedFileStorage {
    /// The state in `path`, under `key` (from the platform's keystore).
    pub fn new(path: impl Into<PathBuf>, key: [u8; 32]) -> Self {
        Self {
            path: path.into(),
            key: Zeroizing::new(key),
        }
    }

    /// The state in `dir/sdk.state`, its key in `dir/storage.key` (made at random, 0600, if
    /// missing). The key file is the stand-in for the phone's keystore (Android Keystore,
    /// iOS Keychain): an app on a phone passes the keystore's key to [`new`](Self::new).
    ///
    /// # Errors
    /// [`StorageError::Io`], or [`StorageError::BadKey`] for a key file of the wrong size.
    pub fn in_dir(dir: impl AsRef<Path>) -> Result<Self, SdkError> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(|e| io(&e))?;
        let key_path = dir.join(KEY_FILE);
        let key = match fs::read(&key_path) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| StorageError::BadKey)?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                crate::random::fill(&mut key)?;
                write_private(&key_path, &key, true)?;
                key
            }
            Err(e) => return Err(io(&e).into()),
        };
        Ok(Self::new(dir.join(STATE_FILE), key))
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&(*self.key).into())
    }
}

impl Storage for EncryptedFileStorage {
    fn load(&self) -> Result<Option<Vec<u8>>, SdkError> {
        let file = match fs::read(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&e).into()),
        };
        let rest = file.strip_prefix(MAGIC).ok_or(StorageError::NotOurs)?;
        let (nonce, ciphertext) = rest
            .split_first_chunk::<NONCE_LEN>()
            .ok_or(StorageError::NotOurs)?;
        let plain = self
            .cipher()
            .decrypt(
                &Nonce::from(*nonce),
                Payload {
                    msg: ciphertext,
                    aad: MAGIC,
                },
            )
            .map_err(|_| StorageError::Unauthentic)?;
        Ok(Some(plain))
    }

    fn save(&self, bytes: &[u8]) -> Result<(), SdkError> {
        let mut nonce = [0u8; NONCE_LEN];
        crate::random::fill(&mut nonce)?;
        let ciphertext = self
            .cipher()
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: bytes,
                    aad: MAGIC,
                },
            )
            .map_err(|_| StorageError::Io("state too large to encrypt".into()))?;
        let mut file = Vec::with_capacity(MAGIC.len() + NONCE_LEN + ciphertext.len());
        file.extend_from_slice(MAGIC);
        file.extend_from_slice(&nonce);
        file.extend_from_slice(&ciphertext);
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        write_private(&tmp, &file, false)?;
        fs::rename(&tmp, &self.path).map_err(|e| io(&e))?;
        Ok(())
    }
}

/// Writes `bytes` to `path`, owner-only on unix, flushed to disk. `new` refuses an existing
/// file (for the key, so two processes never make two keys).
fn write_private(path: &Path, bytes: &[u8], new: bool) -> Result<(), StorageError> {
    let mut options = fs::OpenOptions::new();
    options.write(true);
    if new {
        options.create_new(true);
    } else {
        options.create(true).truncate(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        options.mode(0o600);
        let mut file = options.open(path).map_err(|e| io(&e))?;
        // `mode` applies to new files only; a stale temporary file keeps its mode otherwise.
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(|e| io(&e))?;
        file.write_all(bytes).map_err(|e| io(&e))?;
        file.sync_all().map_err(|e| io(&e))?;
    }
    #[cfg(not(unix))]
    {
        let mut file = options.open(path).map_err(|e| io(&e))?;
        file.write_all(bytes).map_err(|e| io(&e))?;
        file.sync_all().map_err(|e| io(&e))?;
    }
    Ok(())
}

/// The state in memory, for tests and for apps that persist elsewhere.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    blob: Mutex<Option<Vec<u8>>>,
}

impl MemoryStorage {
    /// Empty.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }
}

impl Storage for MemoryStorage {
    fn load(&self) -> Result<Option<Vec<u8>>, SdkError> {
        let blob = self
            .blob
            .lock()
            .map_err(|_| StorageError::Io("poisoned".into()))?;
        Ok(blob.clone())
    }

    fn save(&self, bytes: &[u8]) -> Result<(), SdkError> {
        let mut blob = self
            .blob
            .lock()
            .map_err(|_| StorageError::Io("poisoned".into()))?;
        *blob = Some(bytes.to_vec());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    #[test]
    fn round_trip_and_nothing_before_the_first_save() {
        let dir = tempfile::tempdir().unwrap();
        let storage = EncryptedFileStorage::in_dir(dir.path()).unwrap();
        assert_eq!(storage.load().unwrap(), None);
        storage.save(b"{\"state\":1}").unwrap();
        assert_eq!(storage.load().unwrap().unwrap(), b"{\"state\":1}");
        storage.save(b"second").unwrap();
        // A second storage over the same folder finds the same key.
        let again = EncryptedFileStorage::in_dir(dir.path()).unwrap();
        assert_eq!(again.load().unwrap().unwrap(), b"second");
        let file = fs::read(dir.path().join(STATE_FILE)).unwrap();
        assert!(file.starts_with(MAGIC));
        assert!(!file.windows(6).any(|w| w == b"second"), "encrypted");
        assert!(
            !dir.path().join("sdk.state.tmp").exists(),
            "renamed into place"
        );
    }

    #[test]
    fn a_wrong_key_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        EncryptedFileStorage::new(&path, [1; 32])
            .save(b"secret")
            .unwrap();
        assert_eq!(
            EncryptedFileStorage::new(&path, [2; 32]).load(),
            Err(SdkError::Storage(StorageError::Unauthentic))
        );
    }

    #[test]
    fn a_tampered_file_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let storage = EncryptedFileStorage::new(&path, [1; 32]);
        storage.save(b"secret state").unwrap();
        let good = fs::read(&path).unwrap();
        for at in [MAGIC.len(), MAGIC.len() + NONCE_LEN, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 1;
            fs::write(&path, &bad).unwrap();
            assert_eq!(
                storage.load(),
                Err(SdkError::Storage(StorageError::Unauthentic)),
                "byte {at}"
            );
        }
        let mut other_version = good.clone();
        other_version[5] = 2;
        fs::write(&path, &other_version).unwrap();
        assert_eq!(
            storage.load(),
            Err(SdkError::Storage(StorageError::NotOurs))
        );
        for truncated in [
            &good[..3],
            &good[..MAGIC.len() + 5],
            &good[..MAGIC.len() + NONCE_LEN],
        ] {
            fs::write(&path, truncated).unwrap();
            assert!(matches!(storage.load(), Err(SdkError::Storage(_))));
        }
    }

    #[test]
    fn a_malformed_key_file_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(KEY_FILE), [0u8; 31]).unwrap();
        assert_eq!(
            EncryptedFileStorage::in_dir(dir.path()).unwrap_err(),
            SdkError::Storage(StorageError::BadKey)
        );
    }

    #[cfg(unix)]
    #[test]
    fn files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let storage = EncryptedFileStorage::in_dir(dir.path()).unwrap();
        storage.save(b"x").unwrap();
        for name in [KEY_FILE, STATE_FILE] {
            let mode = fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
    }

    #[test]
    fn debug_prints_no_key() {
        let storage = EncryptedFileStorage::new("/tmp/x", [0xab; 32]);
        let text = format!("{storage:?}");
        assert!(
            !text.contains("171") && !text.contains("ab, ab") && !text.contains("abab"),
            "{text}"
        );
    }

    #[test]
    fn memory_storage_round_trips() {
        let storage = MemoryStorage::new();
        assert_eq!(storage.load().unwrap(), None);
        storage.save(b"abc").unwrap();
        assert_eq!(storage.load().unwrap().unwrap(), b"abc");
    }
}
