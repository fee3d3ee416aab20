//! Configuration: command-line flags, then `COUNTERSIGN_*` environment variables (clap reads
//! both), then an optional TOML file, then defaults. Secrets are never taken on the command
//! line (they would show in `ps`): the master key comes from a file.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use countersign_domain::DataKey;
use countersign_eventstore::{StoreOptions, redact_url, vault::parse_master_key};
use serde::Deserialize;
use zeroize::Zeroizing;

/// The embedded default: one SQLite file in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://countersign.db";
const DEFAULT_POOL_SIZE: u32 = 16;

/// Flags shared by every subcommand.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GlobalArgs {
    /// TOML configuration file (keys: database_url, pool_size, master_key_file, log).
    #[arg(long, env = "COUNTERSIGN_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// `sqlite://path/to/file.db` (the embedded default) or `postgres://user@host/db`.
    #[arg(long, env = "COUNTERSIGN_DATABASE_URL", global = true)]
    pub database_url: Option<String>,
    /// Database connections per instance.
    #[arg(long, env = "COUNTERSIGN_POOL_SIZE", global = true)]
    pub pool_size: Option<u32>,
    /// File holding the 32-byte master key (64 hex digits) that seals the key vault. With
    /// SQLite it defaults to `<database file>.key`, created on first use.
    #[arg(long, env = "COUNTERSIGN_MASTER_KEY_FILE", global = true)]
    pub master_key_file: Option<PathBuf>,
    /// Log filter, e.g. `info` or `countersign_eventstore=debug`.
    #[arg(long, env = "COUNTERSIGN_LOG", global = true)]
    pub log: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    database_url: Option<String>,
    pool_size: Option<u32>,
    master_key_file: Option<PathBuf>,
    log: Option<String>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database_url: String,
    /// No flag, variable or file named a database: the embedded default is in use.
    pub database_url_is_default: bool,
    pub pool_size: u32,
    pub master_key_file: Option<PathBuf>,
    pub log: Option<String>,
}

impl Settings {
    pub fn resolve(args: &GlobalArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let configured = args.database_url.clone().or(file.database_url);
        let database_url_is_default = configured.is_none();
        let database_url = configured.unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
        let pool_size = args
            .pool_size
            .or(file.pool_size)
            .unwrap_or(DEFAULT_POOL_SIZE);
        if pool_size == 0 || pool_size > 1_000 {
            bail!("pool_size must be between 1 and 1000, not {pool_size}");
        }
        Ok(Self {
            database_url,
            database_url_is_default,
            pool_size,
            master_key_file: args.master_key_file.clone().or(file.master_key_file),
            log: args.log.clone().or(file.log),
        })
    }

    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            url: self.database_url.clone(),
            pool_size: self.pool_size,
        }
    }

    /// The database URL fit for printing.
    pub fn database_display(&self) -> String {
        redact_url(&self.database_url)
    }

    /// Loads the master key; with SQLite and no key file configured, uses (and on first use
    /// creates, readable by the owner only) `<database file>.key`.
    pub fn master_key(&self) -> anyhow::Result<DataKey> {
        let path = match (&self.master_key_file, sqlite_path(&self.database_url)) {
            (Some(path), _) => path.clone(),
            (None, Some(db)) => {
                let mut name = db.into_os_string();
                name.push(".key");
                let path = PathBuf::from(name);
                if !path.exists() {
                    create_key_file(&path)?;
                }
                path
            }
            (None, None) => bail!(
                "no master key: set --master-key-file or COUNTERSIGN_MASTER_KEY_FILE \
                 (create one with `countersign keygen > master.key`)"
            ),
        };
        let text = Zeroizing::new(
            std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read the master key file {}", path.display()))?,
        );
        warn_if_readable_by_others(&path, "master key");
        parse_master_key(&text).with_context(|| format!("in {}", path.display()))
    }
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("bad configuration file {}", path.display()))
}

/// The file behind a `sqlite:` URL, if it is one.
pub fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty()).then(|| PathBuf::from(path))
}

/// 32 random bytes, hex encoded.
pub fn new_master_key_hex() -> anyhow::Result<Zeroizing<String>> {
    let mut key = Zeroizing::new([0u8; 32]);
    getrandom::fill(key.as_mut()).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    Ok(Zeroizing::new(hex::encode(key.as_ref())))
}

fn create_key_file(path: &Path) -> anyhow::Result<()> {
    create_secret_file(path)?;
    tracing::info!(path = %path.display(), "created a master key file");
    Ok(())
}

/// Warns when the secret file at `path` (`what` names it in the log) can be read by its
/// group or by others, and answers that mode; `None` when only its owner can read it (or on
/// a system without Unix modes). It warns rather than refuses: a key file managed by a
/// secrets agent may be shared with a group on purpose.
pub fn warn_if_readable_by_others(path: &Path, what: &str) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "the {what} file can be read by others than its owner: chmod 600 it"
            );
            return Some(mode);
        }
        None
    }
    #[cfg(not(unix))]
    {
        let _ = (path, what);
        None
    }
}

/// Writes 32 fresh random bytes, hex encoded, to a new file only its owner can read.
pub fn create_secret_file(path: &Path) -> anyhow::Result<()> {
    use std::io::Write as _;
    let key = new_master_key_hex()?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create the master key file {}", path.display()))?;
    file.write_all(key.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "database_url = \"sqlite://from-file.db\"\npool_size = 3\n",
        )
        .unwrap();
        let args = GlobalArgs {
            config: Some(path.clone()),
            ..GlobalArgs::default()
        };
        let s = Settings::resolve(&args).unwrap();
        assert_eq!(
            (s.database_url.as_str(), s.pool_size),
            ("sqlite://from-file.db", 3)
        );
        let args = GlobalArgs {
            config: Some(path),
            database_url: Some("postgres://x@h/db".into()),
            ..GlobalArgs::default()
        };
        assert_eq!(
            Settings::resolve(&args).unwrap().database_url,
            "postgres://x@h/db"
        );
        let s = Settings::resolve(&GlobalArgs::default()).unwrap();
        assert_eq!(s.database_url, DEFAULT_DATABASE_URL);
    }

    #[test]
    fn an_unknown_key_or_a_bad_pool_size_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "databse_url = \"typo\"\n").unwrap();
        let args = GlobalArgs {
            config: Some(path),
            ..GlobalArgs::default()
        };
        let error = format!("{:#}", Settings::resolve(&args).unwrap_err());
        assert!(error.contains("databse_url"), "{error}");
        let args = GlobalArgs {
            pool_size: Some(0),
            ..GlobalArgs::default()
        };
        assert!(Settings::resolve(&args).is_err());
    }

    /// What `f` logs, as text.
    fn logged(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    /// A key file others can read is named in a warning (without its content); a private one
    /// passes in silence.
    #[cfg(unix)]
    #[test]
    fn a_secret_file_readable_by_others_is_warned_about() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.key");
        std::fs::write(&path, "very-secret-admin-key-0123456789abcdef").unwrap();
        for (mode, warned) in [(0o644, true), (0o640, true), (0o604, true), (0o600, false)] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let mut answer = None;
            let log = logged(|| answer = warn_if_readable_by_others(&path, "admin key"));
            assert_eq!(answer, warned.then_some(mode), "{mode:o}");
            assert_eq!(log.contains("WARN"), warned, "{mode:o}: {log}");
            assert_eq!(log.contains("chmod 600"), warned, "{mode:o}: {log}");
            assert!(!log.contains("very-secret"), "{log}");
        }
    }

    #[test]
    fn sqlite_paths() {
        assert_eq!(
            sqlite_path("sqlite://a/b.db?mode=rwc"),
            Some(PathBuf::from("a/b.db"))
        );
        assert_eq!(sqlite_path("sqlite:x.db"), Some(PathBuf::from("x.db")));
        assert_eq!(sqlite_path("postgres://h/db"), None);
    }
}
