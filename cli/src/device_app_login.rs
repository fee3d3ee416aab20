//! `countersign device app-login`: the virtual phone logs in to the app itself (AppLogin,
//! docs/app-login.md). The SDK opens the session at the account's server and asks the second
//! factor straight away (no confirmation); once logged in this prints the web nonce (or
//! writes it to `--web-nonce-file`, owner-only) for the app's backend, then stays logged in,
//! pinging, until the server or the backend logs it out, the inactivity timeout passes (the
//! virtual phone reports no activity of its own) or Ctrl-C / SIGTERM, which log out first.
//!
//! The web nonce is the app's bearer secret: it goes to stdout (the user asked for it) or the
//! file, never to a log line or an error.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use countersign_mobile_sdk::{
    ChannelCallbacks, EncryptedFileStorage, McConfig, Sdk, SdkConfig, SdkError, SfsConfig,
    SimulatedBiometric, State,
};
use countersign_protocol::device::ErrorCode;

use super::{
    Answers, FactorArgs, FactorSource, Interrupt, NO_SFS, States, account_label, finish,
    give_factor, stay_logged_in,
};

#[derive(Debug, clap::Args)]
pub struct AppLoginArgs {
    /// The account to log in with (default: the only one on this device).
    #[arg(long)]
    pub account: Option<String>,
    /// Ping interval, seconds (1..=3600).
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub ping_time_secs: u32,
    /// Log out after this many seconds without activity.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub inactivity_secs: u64,
    /// Write the web nonce to this file (created owner-readable only) instead of printing it.
    #[arg(long, value_name = "FILE")]
    pub web_nonce_file: Option<PathBuf>,
    #[command(flatten)]
    pub factor: FactorArgs,
}

/// Runs one AppLogin to its end.
///
/// # Errors
/// No SFS, no (or no single) account, the server refused (a headless account), the second
/// factor was not accepted (the session is cancelled first), the session failed.
pub(super) async fn run(
    home: &Path,
    sfs: Option<SfsConfig>,
    mc: Option<McConfig>,
    args: &AppLoginArgs,
    answers: &mut Answers,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    if sfs.is_none() {
        bail!("an AppLogin asks a second factor, and {NO_SFS}");
    }
    let storage = EncryptedFileStorage::in_dir(home)
        .with_context(|| format!("cannot open the device home {}", home.display()))?;
    let config = SdkConfig {
        sfs,
        mc,
        app_login_ping_time_secs: args.ping_time_secs,
        app_login_inactivity_timeout: Duration::from_secs(args.inactivity_secs),
        ..SdkConfig::default()
    };
    let sdk = Sdk::open(Arc::new(storage), config)
        .with_context(|| format!("cannot read the device state in {}", home.display()))?;
    if args.factor.biometric || args.factor.biometric_fail {
        sdk.set_biometric_prompt(Arc::new(SimulatedBiometric::new(
            !args.factor.biometric_fail,
        )))?;
    }
    let (callbacks, events) = ChannelCallbacks::new();
    let mut states = States::new(events, "");
    let started = sdk.app_login(args.account.as_deref(), callbacks).await;
    states.print(out)?;
    let session = match started {
        Ok(session) => session,
        Err(SdkError::NoAccounts) => bail!("no account on this device: enrol first"),
        Err(SdkError::UnknownAccount) if args.account.is_none() => {
            bail!("this device holds several accounts: name one with --account")
        }
        Err(SdkError::UnknownAccount) => bail!("no such account on this device"),
        Err(SdkError::Server(e)) if e.code == ErrorCode::NotAllowed => {
            bail!("the server refused the AppLogin: {}", e.message)
        }
        Err(error) => return Err(error).context("the AppLogin could not start"),
    };
    let snapshot = session.snapshot();
    writeln!(
        out,
        "server: {} ({})",
        snapshot.server_name.as_deref().unwrap_or("?"),
        snapshot.server_id
    )?;
    let handle = &session;
    let given = give_factor(
        &FactorSource::of(&args.factor),
        answers,
        out,
        move |factor| handle.set_pin_biometric(factor),
    )
    .await;
    states.print(out)?;
    if let Err(error) = given {
        if !session.state().is_final() {
            let _ = session.input_cancel().await;
        }
        states.print(out)?;
        return Err(error);
    }
    let mut last = session.snapshot();
    if last.state == State::Active {
        let Some(web_nonce) = last.web_nonce.clone() else {
            bail!("the AppLogin logged in without a web nonce");
        };
        let mut interrupt = Interrupt::new()?;
        match &args.web_nonce_file {
            Some(path) => {
                write_owner_only(path, web_nonce.expose())?;
                writeln!(out, "web nonce written to {}", path.display())?;
            }
            None => writeln!(out, "web nonce: {}", web_nonce.expose())?,
        }
        drop(web_nonce);
        writeln!(
            out,
            "logged in to the app as {}; the session stays open (pinging every {} s) until the \
             server logs it out, {} s without activity, or Ctrl-C",
            account_label(&sdk, last.account_id.as_deref()),
            last.ping_time_secs.unwrap_or(0),
            args.inactivity_secs
        )?;
        out.flush()?;
        last = stay_logged_in(&session, &mut states, &mut interrupt, out).await?;
    }
    states.print(out)?;
    finish(&sdk, &last, out)
}

/// Writes `text` to a new file only its owner may read.
fn write_owner_only(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
