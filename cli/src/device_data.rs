//! `countersign device send-data`: the virtual phone sends app data over the secure channel to
//! its server's Data Service (docs/data-service.md) and writes what the DS answered. With no
//! account at the server yet, the SDK enrols a headless one first (when the server allows it);
//! the gateway URL and key fingerprint are then needed, later they are those stored.
//!
//! The app data and the answer are the user's: the answer goes to stdout (or `--out`), never
//! to a log line or an error; the status goes to stderr.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use countersign_mobile_sdk::{DataServer, Sdk, SdkError};
use countersign_protocol::device::ErrorCode;

#[derive(Debug, clap::Args)]
pub struct SendDataArgs {
    /// The app data: a file, or `-` for stdin (at most 64 KiB).
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// The server, 32 hex digits.
    #[arg(long, value_name = "ID")]
    pub server: String,
    /// The device gateway, e.g. `ws://127.0.0.1:8080/v1/device` (default: the one stored for
    /// the server; needed on first use).
    #[arg(long, value_name = "URL")]
    pub gateway: Option<String>,
    /// SHA-256 of the server's key, 64 hex digits, as `GET /v1/servers/{id}` shows it
    /// (`key_fingerprint`; default: the one pinned for the server; needed on first use).
    #[arg(long, value_name = "HEX")]
    pub fingerprint: Option<String>,
    /// Write the Data Service's answer here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Also report this device's model, OS and app version (recorded on the account when they
    /// changed).
    #[arg(long, num_args = 3, value_names = ["MODEL", "OS", "APP_VERSION"])]
    pub device_data: Option<Vec<String>>,
}

fn read_data(path: &Path) -> anyhow::Result<Vec<u8>> {
    if path.as_os_str() == "-" {
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut data)
            .context("cannot read the app data from stdin")?;
        return Ok(data);
    }
    std::fs::read(path).with_context(|| format!("cannot read the app data {}", path.display()))
}

/// Where the server is: the arguments, else what the device stored for it.
fn target(sdk: &Sdk, args: &SendDataArgs) -> anyhow::Result<DataServer> {
    let stored = sdk
        .servers()?
        .into_iter()
        .find(|s| s.server_id.eq_ignore_ascii_case(&args.server));
    let gateway = args
        .gateway
        .clone()
        .or_else(|| stored.as_ref().map(|s| s.gateway.clone()));
    let fingerprint = args
        .fingerprint
        .clone()
        .or_else(|| stored.as_ref().map(|s| s.fingerprint.clone()));
    match (gateway, fingerprint) {
        (Some(gateway), Some(key_fingerprint)) => Ok(DataServer {
            gateway,
            server_id: args.server.to_ascii_lowercase(),
            key_fingerprint,
        }),
        _ => bail!(
            "this device has no account at server {}: give --gateway and --fingerprint",
            args.server
        ),
    }
}

/// What a refusal means, for people.
fn explain(e: SdkError) -> anyhow::Error {
    let SdkError::Server(refusal) = &e else {
        return anyhow!(e);
    };
    match refusal.code {
        ErrorCode::NotAllowed => {
            anyhow!("the server does not allow headless accounts: enrol with a code first")
        }
        ErrorCode::DataServiceNotConfigured => anyhow!("the server has no data service"),
        ErrorCode::DataServiceUnavailable => anyhow!("the data service is unreachable"),
        ErrorCode::DataServiceTimeout => anyhow!("the data service did not answer in time"),
        ErrorCode::DataServiceFailed => anyhow!("the data service failed"),
        ErrorCode::TooLarge => anyhow!("the app data are too large (at most 64 KiB)"),
        ErrorCode::RateLimited => anyhow!("too many messages; try again shortly"),
        _ => anyhow!(e),
    }
}

/// Sends the data; writes the answer.
///
/// # Errors
/// The data cannot be read, the server is unknown without `--gateway`/`--fingerprint`, the
/// SDK or the server refused, or the answer cannot be written.
pub(super) async fn run(sdk: &Sdk, args: &SendDataArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let data = read_data(&args.data)?;
    let target = target(sdk, args)?;
    if let Some(fields) = &args.device_data
        && let [model, os, app_version] = fields.as_slice()
    {
        sdk.set_device_data(&target, model, os, app_version)
            .await
            .map_err(explain)?;
    }
    let (account, answer) = sdk.send_data(&target, &data).await.map_err(explain)?;
    eprintln!(
        "account {account}: the data service answered {} ({} bytes)",
        answer.status,
        answer.body.len()
    );
    match &args.out {
        Some(path) => std::fs::write(path, &answer.body)
            .with_context(|| format!("cannot write the answer to {}", path.display()))?,
        None => out.write_all(&answer.body)?,
    }
    if !(200..300).contains(&answer.status) {
        bail!(
            "the data service refused the data (status {})",
            answer.status
        );
    }
    Ok(())
}
