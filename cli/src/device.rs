//! `countersign device`: a virtual phone. It is the mobile SDK ([`countersign_mobile_sdk`])
//! behind a command line, with its state in a folder (`--home`), so the platform can be tried
//! and tested end to end without a phone: enrol from a QR image, log in, approve or decline a
//! transaction, list the accounts, the transactions waiting and the history, delete an
//! account, and the second factor (the app PIN, checked by the
//! second-factor server with OPAQUE, or a simulated biometric check). With push: register at
//! the Message Center (`register-push`), and `listen`: every account's gateway notices, the
//! mailbox pulled at start, and the pushes a local FCM/APNs stand-in received for this device
//! (its control API long-polled), each handed to the SDK; a pushed login is answered with the
//! same code as a scanned one.
//!
//! Rules kept here:
//! - the SDK decides; this module only reads input, prints what the SDK reports and answers
//!   its questions (which account, confirm or not, the second factor), from the terminal or
//!   from `--yes` / `--pin` / `--biometric`;
//! - a transaction is never signed without `--yes` or an explicit `y` on stdin after its
//!   content type, data size and text were printed; any other answer declines it;
//! - a login or enrolment is never confirmed without `--yes` or an explicit `y` on stdin, and
//!   a declined or interrupted session is stopped (`stop_session` / `input_cancel`) before
//!   the command exits, so the server never keeps a session the device gave up on;
//! - the PIN is read into [`Pin`] (wiped on drop, `Debug` prints nothing) without terminal
//!   echo, and never printed, logged or put in an error;
//! - the second-factor server (SFS) is the one the phone first enrolled with (trust on first
//!   use: its keys are fetched from `{gateway http base}/v1/sfs/key` and stored in
//!   `{home}/sfs.json`), or the one `--sfs` names; later runs pin the stored keys;
//! - the Message Center (MC) is pinned the same way: `--mc-url`, else the one stored in
//!   `{home}/mc.json`, else (for `register-push` and `listen`) the one served next to the
//!   gateway of this device's first server (`…/v1/device` → `…/v1/mc`, trust on first use);
//! - a QR image is untrusted input: it is decoded with size limits and checked indexing; a
//!   push (from a stand-in's control API) is untrusted too: the SDK opens and checks it, this
//!   module only hands it over and prints what the SDK did with it.
//!
//! Everything printed goes through the writer passed in (stdout for the binary); errors go
//! up as `anyhow` errors and the binary prints them on stderr.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, anyhow, bail};
use countersign_mobile_sdk::{
    ChannelCallbacks, EncryptedFileStorage, Event, HistoryStatus, Interaction, McConfig, Pin,
    Platform, PullReport, PushAction, Sdk, SdkConfig, SdkError, SecondFactor, SecondFactorEvent,
    SessionHandle, SessionKind, SessionSnapshot, SfsConfig, SimulatedBiometric, State,
    TransactionDetails, decode_input,
};
use countersign_protocol::device::ErrorCode;
use countersign_protocol::qr::{DEEP_LINK_PREFIX, QrKind};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

#[path = "device_app_login.rs"]
pub mod app_login;
#[path = "device_data.rs"]
pub mod data;

const EXIT_STATUS: &str = "\
Exit status: 0 when the command completed (a continuous login: once the session ended, by the \
server or by Ctrl-C / SIGTERM, which log out first); 1 on any error, with the reason on \
stderr, for example `no account for this server on this device` (a login QR code of a server \
this device has not enrolled at), `login declined`, `wrong PIN: 4 attempts left` (with \
`--pin`; at the prompt a wrong PIN is asked again), `locked until 2026-01-01 12:00:00Z`, \
`the transaction expired`. A declined transaction (any answer but `y`) is rejected at the \
server and exits 0.";

/// A virtual phone built on the mobile SDK, its state in `--home`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXIT_STATUS)]
pub struct DeviceArgs {
    /// Folder holding this device's state (encrypted; created if missing).
    #[arg(long, env = "COUNTERSIGN_DEVICE_HOME")]
    pub home: PathBuf,
    /// The second-factor server, e.g. `http://127.0.0.1:8080/v1/sfs` (default: the one stored
    /// in `--home`, else the one of the server this device first enrols at). Its keys are
    /// fetched when it is not the stored one, and stored.
    #[arg(
        long,
        env = "COUNTERSIGN_DEVICE_SFS",
        global = true,
        value_name = "URL"
    )]
    pub sfs: Option<String>,
    /// The Message Center, e.g. `http://127.0.0.1:8080/v1/mc` (default: the one stored in
    /// `--home`, else the one served next to the gateway of this device's first server). Its
    /// key is fetched when it is not the stored one, and stored.
    #[arg(
        long = "mc-url",
        env = "COUNTERSIGN_DEVICE_MC_URL",
        global = true,
        value_name = "URL"
    )]
    pub mc_url: Option<String>,
    #[command(subcommand)]
    pub command: DeviceCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum DeviceCommand {
    /// Enrol an account from an enrolment QR code (at a server that asks a second factor, the
    /// first enrolment registers the PIN).
    #[command(after_help = EXIT_STATUS)]
    Enrol(EnrolArgs),
    /// Log in to a session from its QR code; a continuous session stays up until the server
    /// logs it out or Ctrl-C.
    #[command(after_help = EXIT_STATUS)]
    Login(LoginArgs),
    /// Log in to the app itself (AppLogin) with the second factor, and print (or write) the
    /// web nonce the app's backend reads the session with; stays logged in until the server
    /// logs it out, the inactivity timeout or Ctrl-C.
    #[command(after_help = EXIT_STATUS)]
    AppLogin(app_login::AppLoginArgs),
    /// Send app data over the secure channel to the server's Data Service and write its
    /// answer (the first use at a server enrols a headless account, if the server allows it).
    #[command(after_help = EXIT_STATUS)]
    SendData(data::SendDataArgs),
    /// List the accounts on this device, headless or with a second factor.
    Accounts,
    /// List the sessions this device took part in, oldest first.
    History,
    /// Delete an account: tell its server, then forget it here.
    DeleteAccount {
        /// The account id (32 hex digits, as `accounts` lists it).
        account_id: String,
    },
    /// Give a headless account a second factor (registering the PIN at the second-factor
    /// server if this device has none yet).
    #[command(after_help = EXIT_STATUS)]
    Upgrade(UpgradeArgs),
    /// Change the app PIN at the second-factor server (asks the old and the new one).
    #[command(after_help = EXIT_STATUS)]
    ChangePin(ChangePinArgs),
    /// Register a (simulated) biometric key at the second-factor server; needs the PIN.
    #[command(after_help = EXIT_STATUS)]
    RegisterBiometric(PinArgs),
    /// Approve (sign, with a fresh second factor) or decline a transaction from its QR code:
    /// shows its content type, data size and text first.
    #[command(after_help = EXIT_STATUS)]
    Sign(SignArgs),
    /// List the transactions waiting for this device's accounts, oldest first.
    Transactions {
        /// Only this account's (default: every account's).
        #[arg(long)]
        account: Option<String>,
    },
    /// Register this device for push at its Message Center, and give every account's server
    /// the mailbox (again with a new token: updates it).
    RegisterPush(RegisterPushArgs),
    /// Stay connected and handle what the servers send: every account's notices over the
    /// gateway, the mailbox pulled at start, and (with `--push-control` and `--push-token`)
    /// the pushes a stand-in receives for this device. A pushed login is answered as `login`
    /// answers a scanned one. Runs until Ctrl-C / SIGTERM (which log out first).
    #[command(after_help = EXIT_STATUS)]
    Listen(ListenArgs),
}

/// The push services a device registers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PushPlatform {
    /// Firebase Cloud Messaging (Android).
    Fcm,
    /// Apple Push Notification service (iOS).
    Apns,
}

impl From<PushPlatform> for Platform {
    fn from(platform: PushPlatform) -> Self {
        match platform {
            PushPlatform::Fcm => Self::Fcm,
            PushPlatform::Apns => Self::Apns,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct RegisterPushArgs {
    /// The push service of the token.
    #[arg(long, value_enum)]
    pub platform: PushPlatform,
    /// The FCM registration token or the APNs device token (hex); empty: pull only.
    #[arg(long)]
    pub token: String,
    /// The Android package or the APNs topic (bundle id).
    #[arg(long, default_value = DEFAULT_APP_ID)]
    pub app_id: String,
}

/// The app id `register-push` gives when none is named.
pub const DEFAULT_APP_ID: &str = "com.example.countersign";

#[derive(Debug, clap::Args)]
pub struct ListenArgs {
    /// A push stand-in's control API (the FCM stand-in's base URL, the APNs stand-in's
    /// control URL), long-polled for the pushes sent to `--push-token`.
    #[arg(long, value_name = "URL", requires = "push_token")]
    pub push_control: Option<String>,
    /// The push token this device registered (`register-push --token`).
    #[arg(long, value_name = "TOKEN", requires = "push_control")]
    pub push_token: Option<String>,
    /// Confirm pushed logins without asking, with the account the push names.
    #[arg(long)]
    pub yes: bool,
    #[command(flatten)]
    pub factor: FactorArgs,
}

#[derive(Debug, clap::Args)]
pub struct SignArgs {
    /// A transaction QR code: a PNG image or a file with its bytes or text, a `countersign:`
    /// link, or the base64url text.
    pub input: String,
    /// Approve without asking.
    #[arg(long)]
    pub yes: bool,
    /// The account to sign with (default: the first of this device's accounts at the server
    /// that may).
    #[arg(long)]
    pub account: Option<String>,
    #[command(flatten)]
    pub factor: FactorArgs,
}

#[derive(Debug, clap::Args)]
pub struct EnrolArgs {
    /// A QR code: a PNG image or a file with its bytes or text, a `countersign:` link, or
    /// the base64url text.
    pub input: String,
    /// Confirm without asking.
    #[arg(long)]
    pub yes: bool,
    #[command(flatten)]
    pub factor: FactorArgs,
}

#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    /// A QR code: a PNG image or a file with its bytes or text, a `countersign:` link, or
    /// the base64url text.
    pub input: String,
    /// Confirm without asking, with `--account` or else the first eligible account.
    #[arg(long)]
    pub yes: bool,
    /// The account to log in with (default: ask, or the first with `--yes`).
    #[arg(long)]
    pub account: Option<String>,
    #[command(flatten)]
    pub factor: FactorArgs,
}

#[derive(Debug, clap::Args)]
pub struct UpgradeArgs {
    /// The account id (32 hex digits, as `accounts` lists it).
    pub account_id: String,
    #[command(flatten)]
    pub factor: FactorArgs,
}

/// How the second factor is given when a server asks one (default: `PIN:` on the terminal).
#[derive(Debug, Clone, clap::Args)]
pub struct FactorArgs {
    /// The app PIN, for scripts (default: ask on the terminal, without echo). A wrong one
    /// fails the command instead of asking again.
    #[arg(
        long,
        env = "COUNTERSIGN_DEVICE_PIN",
        hide_env_values = true,
        value_name = "PIN"
    )]
    pub pin: Option<Pin>,
    /// Give the biometric factor instead: a simulated check that passes (the key comes from
    /// `register-biometric`).
    #[arg(long)]
    pub biometric: bool,
    /// Give the biometric factor with a simulated check that fails (for tests).
    #[arg(long)]
    pub biometric_fail: bool,
}

#[derive(Debug, clap::Args)]
pub struct PinArgs {
    /// The app PIN (default: ask on the terminal, without echo).
    #[arg(
        long,
        env = "COUNTERSIGN_DEVICE_PIN",
        hide_env_values = true,
        value_name = "PIN"
    )]
    pub pin: Option<Pin>,
}

#[derive(Debug, clap::Args)]
pub struct ChangePinArgs {
    /// The current PIN (default: ask on the terminal, without echo).
    #[arg(
        long,
        env = "COUNTERSIGN_DEVICE_PIN",
        hide_env_values = true,
        value_name = "OLD"
    )]
    pub pin: Option<Pin>,
    /// The new PIN (default: ask twice on the terminal, without echo).
    #[arg(
        long,
        env = "COUNTERSIGN_DEVICE_NEW_PIN",
        hide_env_values = true,
        value_name = "NEW"
    )]
    pub new_pin: Option<Pin>,
}

pub async fn run(args: DeviceArgs) -> anyhow::Result<()> {
    let home = args.home.as_path();
    let mut out = std::io::stdout();
    let mut answers = Answers;
    let mut sfs = load_sfs(home)?;
    if let Some(url) = &args.sfs {
        sfs = Some(set_sfs(home, sfs, url, &mut out).await?);
    }
    let mut mc = load_mc(home)?;
    if let Some(url) = &args.mc_url {
        mc = Some(set_mc(home, mc, url, &mut out).await?);
    }
    match args.command {
        DeviceCommand::Enrol(enrol) => {
            let input = read_input(&enrol.input)?;
            if sfs.is_none() {
                // Trust on first use: the SFS of the server this device first enrols at.
                let payload = decode_input(&input)?;
                if payload.kind == QrKind::Enrolment {
                    sfs = first_use(home, &payload.gateway, &mut out).await;
                }
            }
            let has_sfs = sfs.is_some();
            let sdk = open_sdk(home, sfs, mc.clone(), &enrol.factor)?;
            let choice = Choice {
                yes: enrol.yes,
                account: None,
                factor: FactorSource::of(&enrol.factor),
                has_sfs,
            };
            run_session(
                &sdk,
                &input,
                SessionKind::Enrolment,
                &choice,
                &mut answers,
                &mut out,
            )
            .await
        }
        DeviceCommand::Login(login) => {
            let input = read_input(&login.input)?;
            let has_sfs = sfs.is_some();
            let sdk = open_sdk(home, sfs, mc.clone(), &login.factor)?;
            let choice = Choice {
                yes: login.yes,
                account: login.account,
                factor: FactorSource::of(&login.factor),
                has_sfs,
            };
            run_session(
                &sdk,
                &input,
                SessionKind::Login,
                &choice,
                &mut answers,
                &mut out,
            )
            .await
        }
        DeviceCommand::AppLogin(args) => {
            app_login::run(home, sfs, mc, &args, &mut answers, &mut out).await
        }
        DeviceCommand::SendData(args) => {
            let sdk = open_sdk(home, sfs, mc.clone(), &FactorArgs::none())?;
            data::run(&sdk, &args, &mut out).await
        }
        DeviceCommand::Accounts => {
            let sdk = open_sdk(home, sfs.clone(), mc.clone(), &FactorArgs::none())?;
            print_accounts(&sdk, sfs.as_ref(), &mut out)
        }
        DeviceCommand::History => print_history(
            &open_sdk(home, sfs, mc.clone(), &FactorArgs::none())?,
            &mut out,
        ),
        DeviceCommand::DeleteAccount { account_id } => {
            let sdk = open_sdk(home, sfs, mc.clone(), &FactorArgs::none())?;
            let info = match sdk.delete_account(&account_id).await {
                Err(SdkError::UnknownAccount) => bail!("no account {account_id} on this device"),
                other => other.context("cannot delete the account")?,
            };
            writeln!(
                out,
                "deleted account {} ({} at {}); the server was told",
                info.account_id, info.userid, info.server_name
            )?;
            Ok(())
        }
        DeviceCommand::Upgrade(upgrade) => {
            let mut sdk = open_sdk(home, sfs.clone(), mc.clone(), &upgrade.factor)?;
            let Some(account) = sdk
                .accounts()?
                .into_iter()
                .find(|a| a.account_id == upgrade.account_id)
            else {
                bail!("no account {} on this device", upgrade.account_id);
            };
            if !account.headless {
                bail!("account {} already has a second factor", account.account_id);
            }
            if sfs.is_none() {
                let gateway = sdk
                    .servers()?
                    .into_iter()
                    .find(|s| s.server_id == account.server_id)
                    .map(|s| s.gateway)
                    .context("the account's server is not on this device")?;
                let found = first_use(home, &gateway, &mut out).await;
                if found.is_none() {
                    bail!("{NO_SFS}");
                }
                drop(sdk);
                sdk = open_sdk(home, found, mc.clone(), &upgrade.factor)?;
            }
            let source = FactorSource::of(&upgrade.factor);
            let (sdk_ref, id) = (&sdk, account.account_id.as_str());
            give_factor(&source, &mut answers, &mut out, move |factor| async move {
                sdk_ref.upgrade_account(id, factor).await.map(drop)
            })
            .await?;
            writeln!(
                out,
                "upgraded {}: it now has a second factor",
                account_label(&sdk, Some(id))
            )?;
            Ok(())
        }
        DeviceCommand::ChangePin(change) => {
            if sfs.is_none() {
                bail!("{NO_SFS}");
            }
            let sdk = open_sdk(home, sfs, mc.clone(), &FactorArgs::none())?;
            let old = match change.pin {
                Some(pin) => pin,
                None => answers.require_pin("old PIN: ", &mut out).await?,
            };
            let new = match change.new_pin {
                Some(pin) => pin,
                None => answers.new_pin(&mut out).await?,
            };
            sdk.change_pin(old, new).await.map_err(factor_error)?;
            writeln!(out, "PIN changed")?;
            Ok(())
        }
        DeviceCommand::RegisterBiometric(register) => {
            if sfs.is_none() {
                bail!("{NO_SFS}");
            }
            let sdk = open_sdk(home, sfs, mc.clone(), &FactorArgs::none())?;
            let source = register.pin.map_or(FactorSource::Prompt, FactorSource::Pin);
            let sdk_ref = &sdk;
            give_factor(&source, &mut answers, &mut out, move |factor| async move {
                match factor {
                    SecondFactor::Pin(pin) => sdk_ref.register_biometric(pin).await,
                    SecondFactor::Biometric => Err(SdkError::InvalidConfig("a PIN is needed")),
                }
            })
            .await?;
            writeln!(
                out,
                "biometric key registered: `--biometric` gives it as the second factor"
            )?;
            Ok(())
        }
        DeviceCommand::Sign(sign) => {
            let input = read_input(&sign.input)?;
            if sfs.is_none() {
                bail!("{NO_SFS}");
            }
            let sdk = open_sdk(home, sfs, mc.clone(), &sign.factor)?;
            approve_transaction(&sdk, &input, &sign, &mut answers, &mut out).await
        }
        DeviceCommand::Transactions { account } => {
            let sdk = open_sdk(home, sfs, mc.clone(), &FactorArgs::none())?;
            print_transactions(&sdk, account.as_deref(), &mut out).await
        }
        DeviceCommand::RegisterPush(register) => {
            let mc = match mc {
                Some(mc) => mc,
                None => mc_first_use(home, sfs.clone(), &mut out).await?,
            };
            let sdk = open_sdk(home, sfs, Some(mc), &FactorArgs::none())?;
            register_push(&sdk, &register, &mut out).await
        }
        DeviceCommand::Listen(args) => {
            if mc.is_none() && args.push_control.is_some() {
                bail!(
                    "this device is not registered for push: `countersign device register-push` first"
                );
            }
            let choice = Choice {
                yes: args.yes,
                account: None,
                factor: FactorSource::of(&args.factor),
                has_sfs: sfs.is_some(),
            };
            let sdk = open_sdk(home, sfs, mc, &args.factor)?;
            listen(&sdk, &args, &choice, &mut answers, &mut out).await
        }
    }
}

/// What to tell the user when the server refused a transaction request.
fn transaction_error(error: SdkError) -> anyhow::Error {
    match error {
        SdkError::Server(e) => match e.code {
            ErrorCode::Expired => anyhow!("the transaction expired"),
            ErrorCode::Ended => anyhow!("{}", e.message),
            ErrorCode::NotFound => anyhow!("no such transaction at this server"),
            ErrorCode::NotAllowed => anyhow!("this account may not sign this transaction"),
            _ => anyhow!("the server refused: {}", e.message),
        },
        SdkError::SecondFactor(_) | SdkError::SecondFactorUnavailable => factor_error(error),
        other => anyhow::Error::new(other).context("the transaction failed"),
    }
}

/// `device sign`: reads the code, fetches the transaction with the first account that may see
/// it, shows it, asks, then signs (with the factor, asked again after a wrong PIN at the
/// prompt) or declines.
async fn approve_transaction(
    sdk: &Sdk,
    input: &[u8],
    args: &SignArgs,
    answers: &mut Answers,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let target = match sdk.transaction_from_input(input) {
        Err(SdkError::NoAccounts) => bail!("no account for this server on this device"),
        other => other.context("not a transaction QR code")?,
    };
    let mut candidates = target.accounts;
    if let Some(wanted) = &args.account {
        candidates.retain(|a| &a.account_id == wanted);
        if candidates.is_empty() {
            bail!("no account {wanted} at this server on this device");
        }
    }
    let mut found = None;
    for account in candidates {
        match sdk
            .get_transaction(&account.account_id, &target.transaction_id)
            .await
        {
            Ok(details) => {
                found = Some((account, details));
                break;
            }
            // Another user's account on this device: try the next.
            Err(SdkError::Server(e))
                if e.code == ErrorCode::NotAllowed && args.account.is_none() => {}
            Err(e) => return Err(transaction_error(e)),
        }
    }
    let (account, details) =
        found.context("no account on this device may sign this transaction")?;
    show_transaction(&details, out)?;
    if !args.yes {
        let answer = answers
            .ask(&format!("Approve as {}? [y/N] ", account.userid), out)
            .await?;
        let Some(answer) = answer else {
            bail!("no answer: the transaction was left as it is");
        };
        if !is_yes(Some(&answer)) {
            sdk.reject_transaction(&account.account_id, &details.transaction_id)
                .await
                .map_err(transaction_error)?;
            writeln!(out, "rejected transaction {}", details.transaction_id)?;
            return Ok(());
        }
    }
    let source = FactorSource::of(&args.factor);
    loop {
        let factor = match &source {
            FactorSource::Pin(pin) => SecondFactor::Pin(pin.clone()),
            FactorSource::Biometric => SecondFactor::Biometric,
            FactorSource::Prompt => SecondFactor::Pin(answers.require_pin("PIN: ", out).await?),
        };
        match sdk
            .sign_transaction(&account.account_id, &details, factor, BTreeMap::new(), None)
            .await
        {
            Ok(_) => break,
            Err(SdkError::SecondFactor(SecondFactorEvent::WrongPin { attempts_left }))
                if matches!(source, FactorSource::Prompt) =>
            {
                writeln!(out, "{}", wrong_pin(attempts_left))?;
            }
            Err(e) => return Err(transaction_error(e)),
        }
    }
    writeln!(
        out,
        "signed transaction {} as {}",
        details.transaction_id,
        account_label(sdk, Some(&account.account_id))
    )?;
    Ok(())
}

/// Prints what the user approves: content type, data size, announce info, expiry and the
/// text, indented.
fn show_transaction(details: &TransactionDetails, out: &mut dyn Write) -> anyhow::Result<()> {
    writeln!(out, "transaction {}", details.transaction_id)?;
    if let Some(info) = &details.announce_info {
        writeln!(out, "  {info}")?;
    }
    writeln!(
        out,
        "  content type: {} ({} bytes of data)",
        details.content_type,
        details.data.len()
    )?;
    writeln!(out, "  expires: {}", utc(details.expires_at_ms))?;
    writeln!(out, "  text:")?;
    for line in details.text.lines() {
        writeln!(out, "    {line}")?;
    }
    Ok(())
}

/// `device transactions`.
async fn print_transactions(
    sdk: &Sdk,
    only: Option<&str>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let accounts: Vec<_> = sdk
        .accounts()?
        .into_iter()
        .filter(|a| only.is_none_or(|id| a.account_id == id))
        .collect();
    if let Some(id) = only
        && accounts.is_empty()
    {
        bail!("no account {id} on this device");
    }
    let mut any = false;
    for account in accounts {
        let pending = sdk
            .pending_transactions(&account.account_id)
            .await
            .map_err(transaction_error)?;
        for p in pending {
            any = true;
            writeln!(
                out,
                "{}  {}  expires {}  ({} at {}, account {})",
                p.transaction_id,
                p.announce_info.as_deref().unwrap_or("-"),
                utc(p.expires_at_ms),
                account.userid,
                account.server_name,
                account.account_id
            )?;
        }
    }
    if !any {
        writeln!(out, "no transactions waiting")?;
    }
    Ok(())
}

const NO_SFS: &str = "this device has no second-factor server: enrol at a server first, or \
                      pass --sfs URL (a server's http://HOST:PORT/v1/sfs)";

/// Opens the SDK over the encrypted state in `home`, bound to `sfs` and `mc`, with the simulated
/// biometric check `factor` asks for.
fn open_sdk(
    home: &Path,
    sfs: Option<SfsConfig>,
    mc: Option<McConfig>,
    factor: &FactorArgs,
) -> anyhow::Result<Sdk> {
    let storage = EncryptedFileStorage::in_dir(home)
        .with_context(|| format!("cannot open the device home {}", home.display()))?;
    let config = SdkConfig {
        sfs,
        mc,
        ..SdkConfig::default()
    };
    let sdk = Sdk::open(Arc::new(storage), config)
        .with_context(|| format!("cannot read the device state in {}", home.display()))?;
    if factor.biometric || factor.biometric_fail {
        sdk.set_biometric_prompt(Arc::new(SimulatedBiometric::new(!factor.biometric_fail)))?;
    }
    Ok(sdk)
}

impl FactorArgs {
    /// No factor options (commands that give none).
    fn none() -> Self {
        Self {
            pin: None,
            biometric: false,
            biometric_fail: false,
        }
    }
}

/// Where the second factor comes from.
#[derive(Debug, Clone)]
enum FactorSource {
    /// `--pin`: a wrong one fails the command.
    Pin(Pin),
    /// `--biometric` / `--biometric-fail`.
    Biometric,
    /// `PIN:` on the terminal, asked again after a wrong one.
    Prompt,
}

impl FactorSource {
    fn of(args: &FactorArgs) -> Self {
        if args.biometric || args.biometric_fail {
            Self::Biometric
        } else {
            args.pin.clone().map_or(Self::Prompt, Self::Pin)
        }
    }
}

/// Gives `attempt` the factor from `source` until it is accepted; at the prompt a wrong PIN
/// is told (`wrong PIN: N attempts left`) and asked again, anything else ends it.
///
/// # Errors
/// The factor was refused (see [`factor_error`]), or no PIN was typed.
async fn give_factor<F, Fut>(
    source: &FactorSource,
    answers: &mut Answers,
    out: &mut dyn Write,
    mut attempt: F,
) -> anyhow::Result<()>
where
    F: FnMut(SecondFactor) -> Fut,
    Fut: Future<Output = Result<(), SdkError>>,
{
    loop {
        let factor = match source {
            FactorSource::Pin(pin) => SecondFactor::Pin(pin.clone()),
            FactorSource::Biometric => SecondFactor::Biometric,
            FactorSource::Prompt => SecondFactor::Pin(answers.require_pin("PIN: ", out).await?),
        };
        match attempt(factor).await {
            Ok(()) => return Ok(()),
            Err(SdkError::SecondFactor(SecondFactorEvent::WrongPin { attempts_left }))
                if matches!(source, FactorSource::Prompt) =>
            {
                writeln!(out, "{}", wrong_pin(attempts_left))?;
            }
            Err(error) => return Err(factor_error(error)),
        }
    }
}

fn wrong_pin(attempts_left: u32) -> String {
    match attempts_left {
        1 => "wrong PIN: 1 attempt left".to_owned(),
        n => format!("wrong PIN: {n} attempts left"),
    }
}

/// What to tell the user when their factor was not accepted.
fn factor_error(error: SdkError) -> anyhow::Error {
    match error {
        SdkError::SecondFactor(event) => anyhow!(refusal_text(event)),
        SdkError::SecondFactorUnavailable => anyhow!(NO_SFS),
        other => anyhow::Error::new(other).context("the second factor failed"),
    }
}

fn refusal_text(event: SecondFactorEvent) -> String {
    match event {
        SecondFactorEvent::WrongPin { attempts_left } => wrong_pin(attempts_left),
        SecondFactorEvent::Locked { until_ms } => format!("locked until {}", utc(until_ms)),
        SecondFactorEvent::Revoked => "revoked: too many wrong attempts; this device's second \
                                       factor must be enrolled again"
            .to_owned(),
        SecondFactorEvent::BiometricFailed => "the biometric check failed".to_owned(),
        SecondFactorEvent::NotRegistered => "this factor is not registered for this device (the \
                                             PIN: at the first enrolment at a server that asks \
                                             one, or `device upgrade`; a biometric key: `device \
                                             register-biometric`)"
            .to_owned(),
        SecondFactorEvent::Verified => "the second factor was verified".to_owned(),
    }
}

/// The SFS as stored in `{home}/sfs.json` (public keys, hex SEC1).
#[derive(Debug, Serialize, Deserialize)]
struct StoredSfs {
    url: String,
    channel_public_key: String,
    attestation_public_key: String,
}

const SFS_FILE: &str = "sfs.json";

fn load_sfs(home: &Path) -> anyhow::Result<Option<SfsConfig>> {
    let path = home.join(SFS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let stored: StoredSfs = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an SFS record", path.display()))?;
    let key = |hex_text: &str| {
        hex::decode(hex_text)
            .with_context(|| format!("{} holds a key that is not hex", path.display()))
    };
    Ok(Some(SfsConfig {
        channel_public_key: key(&stored.channel_public_key)?,
        attestation_public_key: key(&stored.attestation_public_key)?,
        url: stored.url,
    }))
}

fn save_sfs(home: &Path, sfs: &SfsConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(home)
        .with_context(|| format!("cannot create the device home {}", home.display()))?;
    let stored = StoredSfs {
        url: sfs.url.clone(),
        channel_public_key: hex::encode(&sfs.channel_public_key),
        attestation_public_key: hex::encode(&sfs.attestation_public_key),
    };
    let path = home.join(SFS_FILE);
    let tmp = home.join(format!("{SFS_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&stored)?)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// `url` in the SFS's WebSocket form (`http` → `ws`, `https` → `wss`, no trailing `/`), to
/// compare with the stored one.
fn ws_form(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    match url.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => format!("ws://{rest}"),
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => format!("wss://{rest}"),
        _ => url.to_owned(),
    }
}

/// `--sfs URL`: the stored SFS if it is that one (its keys stay pinned), else fetches the
/// keys at `url` and stores them.
async fn set_sfs(
    home: &Path,
    stored: Option<SfsConfig>,
    url: &str,
    out: &mut dyn Write,
) -> anyhow::Result<SfsConfig> {
    if let Some(stored) = stored.filter(|s| ws_form(&s.url) == ws_form(url)) {
        return Ok(stored);
    }
    let fetched = SfsConfig::fetch(url)
        .await
        .with_context(|| format!("cannot read the second-factor server's keys at {url}"))?;
    save_sfs(home, &fetched)?;
    writeln!(
        out,
        "second-factor server: {} (its keys are now pinned)",
        fetched.url
    )?;
    Ok(fetched)
}

/// The SFS `countersign serve` serves next to its device gateway: `…/v1/device` →
/// `…/v1/sfs`; `None` for a gateway URL of another shape.
fn sfs_next_to(gateway: &str) -> Option<String> {
    service_next_to(gateway, "sfs")
}

/// The service `countersign serve` serves next to its device gateway: `…/v1/device` →
/// `…/v1/{service}`; `None` for a gateway URL of another shape.
fn service_next_to(gateway: &str, service: &str) -> Option<String> {
    let base = gateway.trim_end_matches('/').strip_suffix("/v1/device")?;
    Some(format!("{base}/v1/{service}"))
}

/// Trust on first use: the SFS served next to `gateway` (`…/v1/device` → `…/v1/sfs`),
/// stored for later runs. `None` (with a warning) when there is none: enrolments then leave
/// their accounts headless.
async fn first_use(home: &Path, gateway: &str, out: &mut dyn Write) -> Option<SfsConfig> {
    let Some(url) = sfs_next_to(gateway) else {
        eprintln!(
            "warning: cannot tell the second-factor server of gateway {gateway}: pass --sfs URL"
        );
        return None;
    };
    let fetched = match SfsConfig::fetch(&url).await {
        Ok(fetched) => fetched,
        Err(error) => {
            eprintln!(
                "warning: no second-factor server at {url} ({error}); accounts enrolled now stay \
                 headless"
            );
            return None;
        }
    };
    if let Err(error) = save_sfs(home, &fetched) {
        eprintln!("warning: {error:#}");
    }
    let _ = writeln!(
        out,
        "second-factor server: {} (trusted on first use; its keys are now pinned)",
        fetched.url
    );
    Some(fetched)
}

/// The MC as stored in `{home}/mc.json` (its channel key, hex SEC1).
#[derive(Debug, Serialize, Deserialize)]
struct StoredMc {
    url: String,
    channel_public_key: String,
}

const MC_FILE: &str = "mc.json";

fn load_mc(home: &Path) -> anyhow::Result<Option<McConfig>> {
    let path = home.join(MC_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let stored: StoredMc = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a Message Center record", path.display()))?;
    Ok(Some(McConfig {
        channel_public_key: hex::decode(&stored.channel_public_key)
            .with_context(|| format!("{} holds a key that is not hex", path.display()))?,
        url: stored.url,
    }))
}

fn save_mc(home: &Path, mc: &McConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(home)
        .with_context(|| format!("cannot create the device home {}", home.display()))?;
    let stored = StoredMc {
        url: mc.url.clone(),
        channel_public_key: hex::encode(&mc.channel_public_key),
    };
    let path = home.join(MC_FILE);
    let tmp = home.join(format!("{MC_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&stored)?)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Fetches the MC key at `url` and stores it.
async fn fetch_mc(
    home: &Path,
    url: &str,
    out: &mut dyn Write,
    how: &str,
) -> anyhow::Result<McConfig> {
    let fetched = McConfig::fetch(url)
        .await
        .with_context(|| format!("cannot read the Message Center's key at {url}"))?;
    save_mc(home, &fetched)?;
    writeln!(
        out,
        "message center: {} ({how}its key is now pinned)",
        fetched.url
    )?;
    Ok(fetched)
}

/// `--mc-url URL`: the stored MC if it is that one (its key stays pinned), else fetches the
/// key at `url` and stores it.
async fn set_mc(
    home: &Path,
    stored: Option<McConfig>,
    url: &str,
    out: &mut dyn Write,
) -> anyhow::Result<McConfig> {
    if let Some(stored) = stored.filter(|m| ws_form(&m.url) == ws_form(url)) {
        return Ok(stored);
    }
    fetch_mc(home, url, out, "").await
}

/// Trust on first use: the MC served next to the gateway of this device's first server
/// (`…/v1/device` → `…/v1/mc`), stored for later runs.
async fn mc_first_use(
    home: &Path,
    sfs: Option<SfsConfig>,
    out: &mut dyn Write,
) -> anyhow::Result<McConfig> {
    let sdk = open_sdk(home, sfs, None, &FactorArgs::none())?;
    let gateway = sdk
        .servers()?
        .into_iter()
        .next()
        .map(|s| s.gateway)
        .context("this device has no server yet: enrol first, or pass --mc-url URL")?;
    let url = service_next_to(&gateway, "mc").with_context(|| {
        format!("cannot tell the Message Center of gateway {gateway}: pass --mc-url URL")
    })?;
    fetch_mc(home, &url, out, "trusted on first use; ").await
}

/// `device register-push`.
async fn register_push(
    sdk: &Sdk,
    args: &RegisterPushArgs,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let report = sdk
        .register_push(args.platform.into(), &args.token, &args.app_id)
        .await
        .context("cannot register at the Message Center")?;
    writeln!(
        out,
        "push registered: mailbox {} ({})",
        report.mailbox,
        if report.new_mailbox {
            "new"
        } else {
            "known; its push token updated"
        }
    )?;
    for account in &report.registered {
        writeln!(
            out,
            "  {}: registered at its server",
            account_label(sdk, Some(account))
        )?;
    }
    for account in &report.already {
        writeln!(
            out,
            "  {}: registered already",
            account_label(sdk, Some(account))
        )?;
    }
    for (account, error) in &report.failed {
        writeln!(
            out,
            "  {}: not registered: {error}",
            account_label(sdk, Some(account))
        )?;
    }
    if report.registered.is_empty() && report.already.is_empty() && report.failed.is_empty() {
        writeln!(
            out,
            "  no accounts yet: accounts enrolled from now on get push at enrolment"
        )?;
    }
    if !report.failed.is_empty() {
        bail!(
            "{} account(s) could not be registered: run `register-push` again",
            report.failed.len()
        );
    }
    Ok(())
}

/// How long one long poll of a stand-in's pushes may wait (the stand-in caps it at 30 s).
const PUSH_POLL_WAIT_MS: u64 = 25_000;

/// One push as a stand-in's control API lists it.
#[derive(Debug, Deserialize)]
struct StandinPush {
    seq: u64,
    payload: serde_json::Value,
}

/// Long-polls `{control}/standin/devices/{token}/pushes` and sends each push on, in order,
/// until `pushes` is dropped. A failed poll is told on stderr and tried again a second later.
async fn poll_pushes(control: String, token: String, pushes: mpsc::Sender<StandinPush>) {
    let http = reqwest::Client::new();
    let base = control.trim_end_matches('/').to_owned();
    let mut after = 0u64;
    loop {
        let url = format!(
            "{base}/standin/devices/{token}/pushes?after={after}&wait_ms={PUSH_POLL_WAIT_MS}"
        );
        let answer = http
            .get(&url)
            .timeout(std::time::Duration::from_millis(PUSH_POLL_WAIT_MS + 10_000))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status);
        let listed = match answer {
            Ok(response) => response.json::<Vec<StandinPush>>().await,
            Err(e) => Err(e),
        };
        match listed {
            Ok(listed) => {
                for push in listed {
                    after = after.max(push.seq);
                    if pushes.send(push).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                eprintln!("warning: cannot read the pushes at {base}: {e}");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

/// `device listen`: every account's gateway connection (notices: a transaction waiting, the
/// account deleted), the mailbox pulled at start, and the stand-in's pushes, until Ctrl-C.
async fn listen(
    sdk: &Sdk,
    args: &ListenArgs,
    choice: &Choice,
    answers: &mut Answers,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    use futures::stream::FuturesUnordered;

    let mut interrupt = Interrupt::new()?;
    let (callbacks, events) = ChannelCallbacks::new();
    let mut notices = States::new(events, "");
    let mut connections = FuturesUnordered::new();
    for account in sdk.accounts()? {
        let id = account.account_id.clone();
        match sdk.listen(&id, callbacks.clone()).await {
            Ok(listener) => {
                writeln!(out, "listening for {}", account_label(sdk, Some(&id)))?;
                connections.push(async move { (id, listener.ended().await) });
            }
            Err(e) => writeln!(out, "cannot listen for account {id}: {e}")?,
        }
    }
    notices.print(out)?;
    let mut phone = Phone {
        sdk,
        choice,
        open: Vec::new(),
    };
    if sdk.push_mailbox()?.is_some() {
        let (pull_callbacks, events) = ChannelCallbacks::new();
        let mut states = States::new(events, "  ");
        match sdk.pull_messages(pull_callbacks).await {
            Ok(report) => {
                phone
                    .pulled("pulled at start", report, &mut states, answers, out)
                    .await?
            }
            Err(e) => writeln!(out, "cannot pull the mailbox: {e}")?,
        }
    } else {
        writeln!(
            out,
            "not registered for push: `countersign device register-push` first"
        )?;
    }
    let (push_tx, mut pushes) = mpsc::channel(16);
    let poller = match (&args.push_control, &args.push_token) {
        (Some(control), Some(token)) => {
            writeln!(out, "receiving pushes from {control}")?;
            Some(tokio::spawn(poll_pushes(
                control.clone(),
                token.clone(),
                push_tx,
            )))
        }
        _ => {
            drop(push_tx);
            None
        }
    };
    out.flush()?;
    let result = loop {
        let ended = phone.ended();
        tokio::select! {
            Some(push) = pushes.recv() => {
                if let Err(e) = phone.push(push, answers, out).await {
                    break Err(e);
                }
            }
            Some((id, end)) = connections.next() => {
                notices.print(out)?;
                if end == countersign_mobile_sdk::ListenEnd::Closed {
                    writeln!(out, "the gateway connection for account {id} closed")?;
                }
            }
            Some(event) = notices.events.recv() => notices.show(&event, out)?,
            Some(n) = ended => phone.close(n, out)?,
            () = interrupt.recv() => {
                writeln!(out, "interrupted")?;
                break Ok(());
            }
        }
        out.flush()?;
    };
    if let Some(poller) = poller {
        poller.abort();
    }
    phone.log_out_all(out).await?;
    result
}

/// The pushed logins `device listen` keeps open, and how it answers pushes.
struct Phone<'a> {
    sdk: &'a Sdk,
    choice: &'a Choice,
    /// Continuous sessions logged in by push, with their state printers.
    open: Vec<(SessionHandle, States)>,
}

impl Phone<'_> {
    /// Resolves with the index of an open session that ended (never, with none open).
    fn ended(&self) -> impl Future<Output = Option<usize>> + use<> {
        let waits: Vec<_> = self
            .open
            .iter()
            .enumerate()
            .map(|(n, (session, _))| {
                let session = session.clone();
                Box::pin(async move {
                    session.wait_for(|s| s.state.is_final()).await;
                    n
                })
            })
            .collect();
        async move {
            if waits.is_empty() {
                std::future::pending::<()>().await;
            }
            Some(futures::future::select_all(waits).await.0)
        }
    }

    /// An open session ended: prints how, forgets it.
    fn close(&mut self, n: usize, out: &mut dyn Write) -> anyhow::Result<()> {
        if n >= self.open.len() {
            return Ok(());
        }
        let (session, mut states) = self.open.remove(n);
        states.print(out)?;
        let last = session.snapshot();
        if last.history_status == Some(HistoryStatus::LoggedOut) {
            writeln!(out, "  logged out by the server")?;
        }
        if let Err(e) = finish(self.sdk, &last, out) {
            writeln!(out, "  {e:#}")?;
        }
        Ok(())
    }

    /// Ctrl-C: logs the open sessions out.
    async fn log_out_all(&mut self, out: &mut dyn Write) -> anyhow::Result<()> {
        for (session, mut states) in std::mem::take(&mut self.open) {
            if !session.state().is_final() {
                writeln!(out, "logging out of {}", session_label(self.sdk, &session))?;
                session.stop_session().await.context("cannot log out")?;
            }
            states.print(out)?;
        }
        out.flush()?;
        Ok(())
    }

    /// One push from the stand-in: handed to the SDK, one line on what it was.
    async fn push(
        &mut self,
        push: StandinPush,
        answers: &mut Answers,
        out: &mut dyn Write,
    ) -> anyhow::Result<()> {
        let label = format!("push {}", push.seq);
        let bytes = serde_json::to_vec(&push.payload)?;
        let (callbacks, events) = ChannelCallbacks::new();
        let mut states = States::new(events, "  ");
        match self.sdk.process_push(&bytes, callbacks).await {
            Ok(PushAction::Pulled(report)) => {
                self.pulled(
                    &format!("{label}: a wake-up"),
                    report,
                    &mut states,
                    answers,
                    out,
                )
                .await
            }
            Ok(action) => self.act(&label, action, states, answers, out).await,
            Err(e) => {
                writeln!(out, "{label}: refused: {e}")?;
                Ok(())
            }
        }
    }

    /// A pull's report: a line for it, then each message as a push.
    async fn pulled(
        &mut self,
        label: &str,
        report: PullReport,
        states: &mut States,
        answers: &mut Answers,
        out: &mut dyn Write,
    ) -> anyhow::Result<()> {
        writeln!(
            out,
            "{label}: {} message(s) pulled from the mailbox ({} ran before, {} expired)",
            report.processed + report.duplicates + report.expired + report.failed.len(),
            report.duplicates,
            report.expired
        )?;
        for (id, error) in &report.failed {
            writeln!(out, "  message {id}: {error}")?;
        }
        for action in report.actions {
            // The pulled sessions share the pull's callbacks: one printer for them all.
            let (callbacks, events) = ChannelCallbacks::new();
            drop(callbacks);
            let shared = std::mem::replace(states, States::new(events, "  "));
            self.act("  pulled", action, shared, answers, out).await?;
        }
        Ok(())
    }

    /// Does what a push (or a pulled message) asked and the SDK started.
    async fn act(
        &mut self,
        label: &str,
        action: PushAction,
        mut states: States,
        answers: &mut Answers,
        out: &mut dyn Write,
    ) -> anyhow::Result<()> {
        match action {
            PushAction::Login(session) => {
                writeln!(
                    out,
                    "{label}: a login request for {}",
                    session_label(self.sdk, &session)
                )?;
                let now = session.state();
                if now.is_final() || now == State::Active || self.is_open(&session) {
                    writeln!(out, "  already answered")?;
                    return Ok(());
                }
                let answered = answer_session(
                    self.sdk,
                    &session,
                    SessionKind::Login,
                    self.choice,
                    &mut states,
                    answers,
                    out,
                )
                .await;
                states.print(out)?;
                match answered {
                    Ok(last) if last.state == State::Active => {
                        writeln!(
                            out,
                            "  logged in as {}; the session stays open until the server logs \
                             it out or Ctrl-C",
                            account_label(self.sdk, last.account_id.as_deref())
                        )?;
                        self.open.push((session, states));
                    }
                    Ok(last) => {
                        if let Err(e) = finish(self.sdk, &last, out) {
                            writeln!(out, "  {e:#}")?;
                        }
                    }
                    Err(e) => writeln!(out, "  {e:#}")?,
                }
            }
            PushAction::SessionEnded {
                session_id,
                logged_out,
            } => {
                let what = if logged_out {
                    "the server logged a session out"
                } else {
                    "a login request was withdrawn (answered elsewhere, or ended)"
                };
                let here = if session_id.is_some() {
                    "; it ended here too"
                } else {
                    ""
                };
                writeln!(out, "{label}: {what}{here}")?;
                states.print(out)?;
            }
            PushAction::AccountDeleted { account } => match account {
                Some(a) => writeln!(
                    out,
                    "{label}: the server deleted account {} ({} at {}); forgotten",
                    a.account_id, a.userid, a.server_name
                )?,
                None => writeln!(
                    out,
                    "{label}: an account deletion the gateway does not confirm; kept"
                )?,
            },
            PushAction::Transaction {
                account_id,
                transaction_id,
                pending,
            } => match pending {
                Some(_) => writeln!(
                    out,
                    "{label}: transaction {transaction_id} waits for {}: `countersign device \
                     transactions`, then `sign`",
                    account_label(self.sdk, Some(&account_id))
                )?,
                None => writeln!(
                    out,
                    "{label}: transaction {transaction_id} is no longer waiting"
                )?,
            },
            PushAction::Pulled(report) => writeln!(
                out,
                "{label}: a wake-up: {} message(s) pulled",
                report.processed
            )?,
        }
        Ok(())
    }

    fn is_open(&self, session: &SessionHandle) -> bool {
        let id = session.snapshot().session_id;
        self.open.iter().any(|(s, _)| s.snapshot().session_id == id)
    }
}

/// `userid at server (account id)` of the account a pushed login is for, else the server.
fn session_label(sdk: &Sdk, session: &SessionHandle) -> String {
    let snapshot = session.snapshot();
    if let Some(account) = snapshot.account_id.as_deref() {
        return account_label(sdk, Some(account));
    }
    match session
        .eligible_accounts()
        .ok()
        .and_then(|a| a.into_iter().next())
    {
        Some(a) => format!(
            "{} at {} (account {})",
            a.userid, a.server_name, a.account_id
        ),
        None => snapshot
            .server_name
            .unwrap_or_else(|| snapshot.server_id.clone()),
    }
}

/// What the command line already decided for the user.
#[derive(Debug, Clone)]
struct Choice {
    /// Confirm without asking.
    yes: bool,
    /// Log in with this account.
    account: Option<String>,
    /// Where the second factor comes from, if the server asks one.
    factor: FactorSource,
    /// The SDK has an SFS (without one no second factor can be given).
    has_sfs: bool,
}

/// Where the user's answers come from: lines of stdin (typed, or written by a script).
#[derive(Debug)]
struct Answers;

impl Answers {
    /// Prints `question` and reads one line; `None` at the end of the input.
    async fn ask(&mut self, question: &str, out: &mut dyn Write) -> anyhow::Result<Option<String>> {
        write!(out, "{question}")?;
        out.flush()?;
        // std's stdin keeps its buffer between calls, so lines written ahead are not lost.
        let line = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .map(|n| (n > 0).then_some(line))
        })
        .await
        .context("cannot read stdin")?
        .context("cannot read stdin")?;
        if line.is_none() {
            writeln!(out)?;
        }
        Ok(line.map(|l| l.trim().to_owned()))
    }

    /// Prints `question` and reads a secret line: on a terminal without echo (Ctrl-C
    /// restores it); never printed back. `None` at the end of the input or for an empty line.
    async fn ask_secret(
        &mut self,
        question: &str,
        out: &mut dyn Write,
    ) -> anyhow::Result<Option<Zeroizing<String>>> {
        use std::io::IsTerminal as _;
        write!(out, "{question}")?;
        out.flush()?;
        let terminal = std::io::stdin().is_terminal();
        let read = tokio::task::spawn_blocking(move || read_hidden_line(terminal));
        let line = if terminal {
            tokio::select! {
                line = read => line,
                _ = tokio::signal::ctrl_c() => {
                    set_echo(true);
                    writeln!(out)?;
                    bail!("interrupted");
                }
            }
        } else {
            read.await
        };
        let line = line
            .context("cannot read stdin")?
            .context("cannot read stdin")?;
        // What was typed is not shown (nor, on a terminal, the Enter): end the prompt's line.
        writeln!(out)?;
        Ok(line
            .map(|l| Zeroizing::new(l.trim().to_owned()))
            .filter(|l| !l.is_empty()))
    }

    /// A PIN, asked with `question`; none is an error.
    async fn require_pin(&mut self, question: &str, out: &mut dyn Write) -> anyhow::Result<Pin> {
        let pin = self
            .ask_secret(question, out)
            .await?
            .context("no PIN given")?;
        Ok(Pin::new(pin.as_str()))
    }

    /// A new PIN, typed twice.
    async fn new_pin(&mut self, out: &mut dyn Write) -> anyhow::Result<Pin> {
        let pin = self
            .ask_secret("new PIN: ", out)
            .await?
            .context("no PIN given")?;
        let again = self
            .ask_secret("new PIN again: ", out)
            .await?
            .context("no PIN given")?;
        if pin != again {
            bail!("the two new PINs differ");
        }
        Ok(Pin::new(pin.as_str()))
    }
}

/// One line of stdin, with the terminal's echo off while it is typed when `terminal`.
fn read_hidden_line(terminal: bool) -> std::io::Result<Option<Zeroizing<String>>> {
    let _echo = terminal.then(EchoOff::new);
    // Room for any PIN, so the buffer is not moved (leaving a copy behind) while it fills.
    let mut line = Zeroizing::new(String::with_capacity(256));
    let n = std::io::stdin().read_line(&mut line)?;
    Ok((n > 0).then_some(line))
}

/// Turns the terminal's echo off while it lives.
struct EchoOff;

impl EchoOff {
    fn new() -> Self {
        set_echo(false);
        Self
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        set_echo(true);
    }
}

/// Turns the echo of the terminal on stdin on or off, best effort. Through `stty(1)`: the
/// workspace forbids `unsafe`, so no termios calls.
fn set_echo(on: bool) {
    #[cfg(unix)]
    {
        let _ = std::process::Command::new("stty")
            .arg(if on { "echo" } else { "-echo" })
            .stdin(std::process::Stdio::inherit())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    #[cfg(not(unix))]
    let _ = on;
}

/// Runs one enrolment or login to its end (enrolled, logged in once, or logged out of a
/// continuous session), printing every state change.
///
/// # Errors
/// The input is no QR code of `expected` kind, the user declined, or the session failed
/// (`no account for this server on this device` for NOACCOUNTS).
async fn run_session(
    sdk: &Sdk,
    input: &[u8],
    expected: SessionKind,
    choice: &Choice,
    answers: &mut Answers,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let payload = decode_input(input)?;
    match (payload.kind, expected) {
        (QrKind::Login, SessionKind::Enrolment) => {
            bail!("this is a login QR code: use `countersign device login`")
        }
        (QrKind::Enrolment, SessionKind::Login) => {
            bail!("this is an enrolment QR code: use `countersign device enrol`")
        }
        (QrKind::Transaction, _) => {
            bail!("this is a transaction QR code: use `countersign device sign`")
        }
        _ => {}
    }
    let (callbacks, events) = ChannelCallbacks::new();
    let mut states = States::new(events, "");
    let started = sdk.start_session(input, callbacks).await;
    states.print(out)?;
    let session = match started {
        Ok(session) => session,
        Err(SdkError::NoAccounts) => bail!("no account for this server on this device"),
        Err(error) => return Err(error).context("the session could not start"),
    };
    let mut last =
        answer_session(sdk, &session, expected, choice, &mut states, answers, out).await?;
    if last.state == State::Active {
        let mut interrupt = Interrupt::new()?;
        if let Some(info) = &last.session_info {
            writeln!(out, "session info: {info}")?;
        }
        writeln!(
            out,
            "logged in as {}; the session stays open (pinging every {} s) until the server \
             logs it out or Ctrl-C",
            account_label(sdk, last.account_id.as_deref()),
            last.ping_time_secs.unwrap_or(0)
        )?;
        out.flush()?;
        last = stay_logged_in(&session, &mut states, &mut interrupt, out).await?;
    }
    states.print(out)?;
    finish(sdk, &last, out)
}

/// Answers a started enrolment or login (scanned or pushed) up to its end or, for a
/// continuous login, Active: prints the server and the announce info, confirms (asking
/// unless `choice` says), gives the second factor if it is asked. Answers the last snapshot.
///
/// # Errors
/// The user declined (the session is stopped first), the second factor was not accepted
/// (the session is cancelled first).
async fn answer_session(
    sdk: &Sdk,
    session: &SessionHandle,
    expected: SessionKind,
    choice: &Choice,
    states: &mut States,
    answers: &mut Answers,
    out: &mut dyn Write,
) -> anyhow::Result<SessionSnapshot> {
    let snapshot = session.snapshot();
    writeln!(
        out,
        "server: {} ({})",
        snapshot.server_name.as_deref().unwrap_or("?"),
        snapshot.server_id
    )?;
    if let Some(announce) = session.announce_info() {
        writeln!(out, "announce: {announce}")?;
    }
    let confirmed = match expected {
        SessionKind::Enrolment => confirm_enrolment(session, choice, answers, out).await,
        SessionKind::Login => confirm_login(session, choice, answers, out).await,
        // No confirmation: `device app-login` drives its own sessions.
        SessionKind::AppLogin => Ok(()),
    };
    states.print(out)?;
    if let Err(error) = confirmed {
        // Declined, or the answer could not be read: the server must not wait for us.
        if !session.state().is_final() {
            let _ = session.stop_session().await;
        }
        states.print(out)?;
        return Err(error);
    }
    let mut last = session.snapshot();
    if last.state == State::UserInteraction(Interaction::WaitForSecondFactor) {
        let given = if choice.has_sfs {
            let handle = session;
            give_factor(&choice.factor, answers, out, move |factor| {
                handle.set_pin_biometric(factor)
            })
            .await
        } else {
            Err(anyhow!("the server asks a second factor, and {NO_SFS}"))
        };
        states.print(out)?;
        if let Err(error) = given {
            // Locked or revoked ended the session already; else the server must not wait.
            if !session.state().is_final() {
                let _ = session.input_cancel().await;
            }
            states.print(out)?;
            let last = session.snapshot();
            if last.history_status == Some(HistoryStatus::Enrolled) {
                let account = last.account_id.unwrap_or_default();
                writeln!(
                    out,
                    "enrolled {} without a second factor (headless); `countersign device \
                     upgrade {account}` gives it one",
                    account_label(sdk, Some(&account))
                )?;
            }
            return Err(error);
        }
        last = session.snapshot();
    }
    Ok(last)
}

async fn confirm_enrolment(
    session: &SessionHandle,
    choice: &Choice,
    answers: &mut Answers,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    if !choice.yes {
        let server = session.snapshot().server_name.unwrap_or_default();
        let answer = answers
            .ask(&format!("Enrol an account at {server}? [y/N] "), out)
            .await?;
        if !is_yes(answer.as_deref()) {
            bail!("enrolment declined");
        }
    }
    session
        .confirm_enrol()
        .await
        .context("the enrolment failed")
}

async fn confirm_login(
    session: &SessionHandle,
    choice: &Choice,
    answers: &mut Answers,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let eligible = session.eligible_accounts()?;
    let account = match &choice.account {
        Some(wanted) => eligible
            .iter()
            .find(|a| &a.account_id == wanted)
            .with_context(|| format!("account {wanted} may not log in to this session"))?,
        None if choice.yes => eligible
            .first()
            .context("no account for this server on this device")?,
        None => {
            writeln!(out, "accounts at this server:")?;
            for (n, account) in eligible.iter().enumerate() {
                writeln!(
                    out,
                    "  {}. {} (account {})",
                    n + 1,
                    account.userid,
                    account.account_id
                )?;
            }
            let question = if eligible.len() == 1 {
                "Account [1]: ".to_owned()
            } else {
                format!("Account [1-{}]: ", eligible.len())
            };
            let answer = answers.ask(&question, out).await?;
            let picked = match answer.as_deref() {
                None => bail!("login declined"),
                Some("") if eligible.len() == 1 => Some(0),
                Some(text) => text.parse::<usize>().ok().and_then(|n| n.checked_sub(1)),
            };
            picked
                .and_then(|n| eligible.get(n))
                .with_context(|| format!("no account number {:?}", answer.unwrap_or_default()))?
        }
    };
    if !choice.yes {
        let server = session.snapshot().server_name.unwrap_or_default();
        let answer = answers
            .ask(
                &format!("Log in as {} at {server}? [y/N] ", account.userid),
                out,
            )
            .await?;
        if !is_yes(answer.as_deref()) {
            bail!("login declined");
        }
    }
    session
        .set_account(Some(&account.account_id))
        .await
        .context("the login failed")
}

fn is_yes(answer: Option<&str>) -> bool {
    answer.is_some_and(|a| a.eq_ignore_ascii_case("y") || a.eq_ignore_ascii_case("yes"))
}

/// Waits while the session is Active (the SDK pings); on Ctrl-C or SIGTERM logs out first.
async fn stay_logged_in(
    session: &SessionHandle,
    states: &mut States,
    interrupt: &mut Interrupt,
    out: &mut dyn Write,
) -> anyhow::Result<SessionSnapshot> {
    let ended = session.wait_for(|s| s.state.is_final());
    tokio::pin!(ended);
    loop {
        tokio::select! {
            snapshot = &mut ended => {
                states.print(out)?;
                if snapshot.history_status == Some(HistoryStatus::LoggedOut) {
                    writeln!(out, "logged out by the server")?;
                }
                return Ok(snapshot);
            }
            Some(event) = states.events.recv() => states.show(&event, out)?,
            () = interrupt.recv() => {
                writeln!(out, "interrupted: logging out")?;
                session.stop_session().await.context("cannot log out")?;
                states.print(out)?;
                return Ok(session.snapshot());
            }
        }
    }
}

/// Prints the outcome of a finished session; errors for anything but a success.
fn finish(sdk: &Sdk, last: &SessionSnapshot, out: &mut dyn Write) -> anyhow::Result<()> {
    let account = last.account_id.as_deref();
    match (last.state, last.history_status) {
        (State::Done, Some(HistoryStatus::Enrolled)) => {
            writeln!(out, "enrolled {}", account_label(sdk, account))?;
        }
        (State::Done, Some(HistoryStatus::LoggedInOneShot)) => {
            if let Some(info) = &last.session_info {
                writeln!(out, "session info: {info}")?;
            }
            writeln!(out, "logged in as {}", account_label(sdk, account))?;
        }
        (State::Done, Some(HistoryStatus::LoggedOut)) => writeln!(out, "session ended")?,
        (State::Done, _) => bail!("the session was aborted"),
        (_, _) => match &last.error {
            Some(error) => bail!("the session failed: {error}"),
            None => bail!("the session failed"),
        },
    }
    out.flush()?;
    Ok(())
}

/// `userid at server (account id)`, or the bare id if the account is not (or no longer) here.
fn account_label(sdk: &Sdk, account_id: Option<&str>) -> String {
    let Some(id) = account_id else {
        return "?".to_owned();
    };
    let found = sdk
        .accounts()
        .ok()
        .and_then(|all| all.into_iter().find(|a| a.account_id == id));
    match found {
        Some(a) => format!(
            "{} at {} (account {})",
            a.userid, a.server_name, a.account_id
        ),
        None => format!("account {id}"),
    }
}

/// Turns the SDK's callbacks into one printed line per state change, in order, each line
/// starting with `prefix`.
pub(crate) struct States {
    events: mpsc::UnboundedReceiver<Event>,
    last: Option<(State, Option<HistoryStatus>)>,
    prefix: &'static str,
}

impl States {
    pub(crate) fn new(events: mpsc::UnboundedReceiver<Event>, prefix: &'static str) -> Self {
        Self {
            events,
            last: None,
            prefix,
        }
    }

    /// Prints what happened since the last call.
    pub(crate) fn print(&mut self, out: &mut dyn Write) -> anyhow::Result<()> {
        while let Ok(event) = self.events.try_recv() {
            self.show(&event, out)?;
        }
        out.flush()?;
        Ok(())
    }

    fn show(&mut self, event: &Event, out: &mut dyn Write) -> anyhow::Result<()> {
        match event {
            Event::State(snapshot) => {
                let now = (snapshot.state, snapshot.history_status);
                if self.last != Some(now) {
                    self.last = Some(now);
                    writeln!(out, "{}state: {}", self.prefix, describe_state(snapshot))?;
                }
            }
            Event::SecondFactor(_, SecondFactorEvent::Verified) => {
                writeln!(out, "{}second factor verified", self.prefix)?;
            }
            Event::AccountDeleted(account) => writeln!(
                out,
                "{}the server deleted account {} ({}); forgotten",
                self.prefix, account.account_id, account.userid
            )?,
            Event::TransactionPending(account, pending) => writeln!(
                out,
                "{}transaction {} waits for {} at {} (account {}){}",
                self.prefix,
                pending.transaction_id,
                account.userid,
                account.server_name,
                account.account_id,
                pending
                    .announce_info
                    .as_deref()
                    .map(|info| format!(": {info}"))
                    .unwrap_or_default()
            )?,
            _ => {}
        }
        Ok(())
    }
}

fn describe_state(snapshot: &SessionSnapshot) -> String {
    match snapshot.state {
        State::Starting => "starting".to_owned(),
        State::UserInteraction(Interaction::WaitForConfirmation) => {
            "waiting for confirmation".to_owned()
        }
        State::UserInteraction(Interaction::WaitForSecondFactor) => {
            "waiting for a second factor".to_owned()
        }
        State::Active => "active (logged in)".to_owned(),
        State::Done => match snapshot.history_status {
            Some(status) => format!("done ({})", status_text(status)),
            None => "done".to_owned(),
        },
        State::Error => match &snapshot.error {
            Some(SdkError::SecondFactor(event)) => format!("error ({})", refusal_text(*event)),
            Some(error) => format!("error ({error})"),
            None => "error".to_owned(),
        },
    }
}

fn status_text(status: HistoryStatus) -> &'static str {
    match status {
        HistoryStatus::LoggedIn => "logged in",
        HistoryStatus::LoggedInOneShot => "logged in once",
        HistoryStatus::LoggedOut => "logged out",
        HistoryStatus::Aborted => "aborted",
        HistoryStatus::Error => "error",
        HistoryStatus::Enrolled => "enrolled",
    }
}

/// Ctrl-C, or SIGTERM on unix. Listening starts when it is made, so a signal that comes
/// before [`Interrupt::recv`] is polled is not lost (nor does it kill the process).
struct Interrupt {
    #[cfg(unix)]
    signals: (tokio::signal::unix::Signal, tokio::signal::unix::Signal),
}

impl Interrupt {
    fn new() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let interrupt = signal(SignalKind::interrupt()).context("cannot handle Ctrl-C")?;
            let terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
            Ok(Self {
                signals: (interrupt, terminate),
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            let (interrupt, terminate) = &mut self.signals;
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn print_accounts(sdk: &Sdk, sfs: Option<&SfsConfig>, out: &mut dyn Write) -> anyhow::Result<()> {
    let accounts = sdk.accounts()?;
    if accounts.is_empty() {
        writeln!(out, "no accounts on this device")?;
    } else {
        let name_width = accounts
            .iter()
            .map(|a| a.server_name.chars().count())
            .max()
            .unwrap_or(0)
            .max("server".len());
        // `factor`: `yes` when the account has a second factor from this device, `headless`
        // when it has none (enrolled without one and never upgraded).
        writeln!(
            out,
            "{:<32}  {:<name_width$}  {:<32}  {:<8}  userid",
            "account", "server", "server id", "factor"
        )?;
        for a in &accounts {
            let factor = if a.headless { "headless" } else { "yes" };
            writeln!(
                out,
                "{:<32}  {:<name_width$}  {:<32}  {factor:<8}  {}",
                a.account_id, a.server_name, a.server_id, a.userid
            )?;
        }
    }
    if let Some(sfs) = sfs {
        writeln!(out, "second-factor server: {}", sfs.url)?;
    }
    Ok(())
}

fn print_history(sdk: &Sdk, out: &mut dyn Write) -> anyhow::Result<()> {
    let history = sdk.history()?;
    if history.is_empty() {
        writeln!(out, "no history on this device")?;
        return Ok(());
    }
    let servers = sdk.servers()?;
    let server_name = |id: &str| {
        servers
            .iter()
            .find(|s| s.server_id == id)
            .map_or_else(|| id.to_owned(), |s| s.name.clone())
    };
    writeln!(
        out,
        "{:<20}  {:<9}  {:<24}  status",
        "time (UTC)", "kind", "server"
    )?;
    for entry in &history {
        let kind = match entry.kind {
            SessionKind::Login => "login",
            SessionKind::Enrolment => "enrolment",
            SessionKind::AppLogin => "app login",
        };
        writeln!(
            out,
            "{:<20}  {kind:<9}  {:<24}  {}",
            utc(entry.at_ms),
            server_name(&entry.server_id),
            status_text(entry.status)
        )?;
    }
    Ok(())
}

/// `YYYY-MM-DD hh:mm:ssZ` of milliseconds since the Unix epoch (proleptic Gregorian calendar;
/// Howard Hinnant's `civil_from_days`).
pub(crate) fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, time) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        time / 3600,
        time % 3600 / 60,
        time % 60
    )
}

/// The QR code's bytes from what the user gave: a `countersign:` link or base64url text as
/// is, else a file: a PNG image is decoded, text is trimmed, other bytes are the payload.
///
/// # Errors
/// An unreadable file, or an image without a readable QR code.
pub fn read_input(input: &str) -> anyhow::Result<Vec<u8>> {
    let is_link = input
        .get(..DEEP_LINK_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(DEEP_LINK_PREFIX));
    let path = Path::new(input);
    if is_link || !path.is_file() {
        return Ok(input.trim().as_bytes().to_vec());
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {input}"))?;
    if bytes.starts_with(PNG_SIGNATURE) {
        return read_qr_png(&bytes).with_context(|| format!("cannot read a QR code in {input}"));
    }
    match std::str::from_utf8(&bytes) {
        Ok(text) => Ok(text.trim().as_bytes().to_vec()),
        Err(_) => Ok(bytes),
    }
}

const PNG_SIGNATURE: &[u8] = &[0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
/// A phone photo is a few megapixels; this bounds what a hostile file makes us allocate.
const PNG_MAX_BYTES: usize = 64 << 20;

/// Decodes a PNG image (any colour type) and answers the bytes of the first QR code in it.
///
/// # Errors
/// Not a PNG, too large, or no QR code that decodes.
pub fn read_qr_png(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut decoder = png::Decoder::new_with_limits(
        std::io::Cursor::new(bytes),
        png::Limits {
            bytes: PNG_MAX_BYTES,
        },
    );
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().context("not a readable PNG image")?;
    let size = reader
        .output_buffer_size()
        .context("the PNG image is too large")?;
    let mut pixels = vec![0u8; size];
    let frame = reader
        .next_frame(&mut pixels)
        .context("not a readable PNG image")?;
    let (width, height) = (frame.width as usize, frame.height as usize);
    let channels = frame.color_type.samples();
    let gray: Vec<u8> = pixels
        .get(..frame.buffer_size())
        .context("the PNG frame is larger than its buffer")?
        .chunks_exact(channels.max(1))
        .map(luma)
        .collect();
    if gray.len() < width * height {
        bail!("the PNG image is truncated");
    }
    let mut prepared = rqrr::PreparedImage::prepare_from_greyscale(width, height, |x, y| {
        gray.get(y * width + x).copied().unwrap_or(255)
    });
    for grid in prepared.detect_grids() {
        let mut out = Vec::new();
        if grid.decode_to(&mut out).is_ok() {
            return Ok(out);
        }
    }
    bail!("no QR code found in the image")
}

/// One pixel (gray, gray+alpha, RGB or RGBA, 8 bits each) as a gray level over white.
fn luma(pixel: &[u8]) -> u8 {
    let (gray, alpha) = match *pixel {
        [g] => (u32::from(g), 255),
        [g, a] => (u32::from(g), u32::from(a)),
        [r, g, b] => (
            (299 * u32::from(r) + 587 * u32::from(g) + 114 * u32::from(b)) / 1000,
            255,
        ),
        [r, g, b, a] => (
            (299 * u32::from(r) + 587 * u32::from(g) + 114 * u32::from(b)) / 1000,
            u32::from(a),
        ),
        _ => (255, 255),
    };
    // Transparent pixels show the (white) background.
    u8::try_from((gray * alpha + 255 * (255 - alpha)) / 255).unwrap_or(255)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_epoch_milliseconds() {
        assert_eq!(utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00Z");
        assert_eq!(utc(1_790_000_000_999), "2026-09-21 14:13:20Z");
        assert_eq!(utc(-1), "1969-12-31 23:59:59Z");
    }

    #[test]
    fn a_png_qr_code_reads_back_to_its_bytes() {
        let data: Vec<u8> = (0..=255u8).cycle().take(150).collect();
        let image = countersign_api::qr::png(&data, 256).unwrap();
        assert_eq!(read_qr_png(&image).unwrap(), data);
    }

    #[test]
    fn an_image_without_a_qr_code_is_an_error() {
        let mut png = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut png, 64, 64);
            encoder.set_color(png::ColorType::Rgba);
            let mut writer = encoder.write_header().unwrap();
            writer.write_image_data(&[200u8; 64 * 64 * 4]).unwrap();
        }
        assert!(read_qr_png(&png).is_err());
        assert!(read_qr_png(b"\x89PNG\r\n\x1a\nnot really").is_err());
    }

    #[test]
    fn the_sfs_is_found_next_to_the_gateway() {
        assert_eq!(
            sfs_next_to("ws://127.0.0.1:8080/v1/device").as_deref(),
            Some("ws://127.0.0.1:8080/v1/sfs")
        );
        assert_eq!(
            sfs_next_to("wss://gw.example.com/v1/device/").as_deref(),
            Some("wss://gw.example.com/v1/sfs")
        );
        assert_eq!(sfs_next_to("wss://gw.example.com/device"), None);
    }

    #[test]
    fn the_mc_is_found_next_to_the_gateway_and_pinned_in_the_home() {
        assert_eq!(
            service_next_to("ws://127.0.0.1:8080/v1/device", "mc").as_deref(),
            Some("ws://127.0.0.1:8080/v1/mc")
        );
        assert_eq!(service_next_to("wss://gw.example.com/ws", "mc"), None);
        let home = tempfile::tempdir().unwrap();
        assert_eq!(load_mc(home.path()).unwrap(), None);
        let mc = McConfig {
            url: "ws://127.0.0.1:8080/v1/mc".to_owned(),
            channel_public_key: vec![4, 9, 9],
        };
        save_mc(home.path(), &mc).unwrap();
        assert_eq!(load_mc(home.path()).unwrap(), Some(mc));
    }

    #[test]
    fn a_stand_in_push_list_reads_as_the_control_api_answers_it() {
        let listed: Vec<StandinPush> =
            serde_json::from_str(r#"[{"seq":3,"payload":{"cs":"oWF2AQ"}}]"#).unwrap();
        assert_eq!(listed[0].seq, 3);
        assert_eq!(
            serde_json::to_vec(&listed[0].payload).unwrap(),
            br#"{"cs":"oWF2AQ"}"#.to_vec()
        );
    }

    #[test]
    fn sfs_urls_compare_in_their_websocket_form() {
        assert_eq!(ws_form("http://h:1/v1/sfs/"), "ws://h:1/v1/sfs");
        assert_eq!(ws_form("HTTPS://h/v1/sfs"), "wss://h/v1/sfs");
        assert_eq!(ws_form("ws://h/v1/sfs"), "ws://h/v1/sfs");
    }

    #[test]
    fn the_pinned_sfs_reads_back_from_the_home() {
        let home = tempfile::tempdir().unwrap();
        assert_eq!(load_sfs(home.path()).unwrap(), None);
        let sfs = SfsConfig {
            url: "ws://127.0.0.1:8080/v1/sfs".to_owned(),
            channel_public_key: vec![4; 65],
            attestation_public_key: vec![4, 1, 2],
        };
        save_sfs(home.path(), &sfs).unwrap();
        assert_eq!(load_sfs(home.path()).unwrap(), Some(sfs));
    }

    #[test]
    fn a_transaction_is_shown_in_full_before_the_question() {
        let details = TransactionDetails {
            account_id: "a".repeat(32),
            server_id: "b".repeat(32),
            transaction_id: "c".repeat(32),
            data: b"{\"amount\":\"10.00\"}".to_vec(),
            content_type: "application/json".into(),
            text: "Pay 10.00 EUR?\nReference 42".into(),
            announce_info: Some("Payment".into()),
            created_at_ms: 1_790_000_000_000,
            expires_at_ms: 1_790_000_300_000,
        };
        let mut out = Vec::new();
        show_transaction(&details, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!(
                "transaction {}\n  Payment\n  content type: application/json (18 bytes of data)\n  \
                 expires: 2026-09-21 14:18:20Z\n  text:\n    Pay 10.00 EUR?\n    Reference 42\n",
                "c".repeat(32)
            )
        );
        let expired = SdkError::Server(countersign_protocol::device::DeviceError::new(
            ErrorCode::Expired,
            "the transaction expired",
        ));
        assert_eq!(
            transaction_error(expired).to_string(),
            "the transaction expired"
        );
    }

    #[test]
    fn refusals_read_as_the_user_needs_them() {
        assert_eq!(
            refusal_text(SecondFactorEvent::WrongPin { attempts_left: 4 }),
            "wrong PIN: 4 attempts left"
        );
        assert_eq!(wrong_pin(1), "wrong PIN: 1 attempt left");
        assert_eq!(
            refusal_text(SecondFactorEvent::Locked {
                until_ms: 951_782_400_000
            }),
            "locked until 2000-02-29 00:00:00Z"
        );
    }

    #[test]
    fn links_and_text_are_taken_as_given() {
        assert_eq!(
            read_input("countersign:abc").unwrap(),
            b"countersign:abc".to_vec()
        );
        assert_eq!(read_input(" AAEC ").unwrap(), b"AAEC".to_vec());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("qr.txt");
        std::fs::write(&file, "countersign:xyz\n").unwrap();
        assert_eq!(
            read_input(file.to_str().unwrap()).unwrap(),
            b"countersign:xyz".to_vec()
        );
    }
}
