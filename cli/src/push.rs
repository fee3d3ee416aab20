//! Push configuration for `serve` (the Message Center's FCM and APNs credentials, the Message
//! Centers the NS trusts) and `countersign push-standin fcm|apns`, the local stand-ins for
//! Google's and Apple's push services that tests, benches and developers run.
//!
//! Nothing here contacts Google or Apple unless their credentials are configured: without
//! `--fcm-service-account` / `--apns-key-file` the MC keeps messages for pull only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use countersign_device_gateway::TrustedMc;
use countersign_message_center::Senders;
use countersign_message_center::apns::{ApnsConfig, ApnsSender};
use countersign_message_center::fcm::{FcmConfig, FcmSender, ServiceAccount};
use countersign_message_center::standin::{StandinKind, run_standin};

/// The Message Center's push credentials and the Message Centers this NS sends through.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PushArgs {
    /// FCM: the Firebase service-account JSON file (client_email, private_key, token_uri,
    /// project_id). Without it, Android mailboxes are pull only.
    #[arg(long, env = "COUNTERSIGN_FCM_SERVICE_ACCOUNT")]
    pub fcm_service_account: Option<PathBuf>,
    /// FCM: the API's base URL (a stand-in's, in tests).
    #[arg(long, env = "COUNTERSIGN_FCM_URL", default_value = countersign_message_center::fcm::FCM_DEFAULT_BASE_URL)]
    pub fcm_url: String,
    /// APNs: the provider token signing key (the `.p8` file). Without it, iOS mailboxes are
    /// pull only.
    #[arg(long, env = "COUNTERSIGN_APNS_KEY_FILE")]
    pub apns_key_file: Option<PathBuf>,
    /// APNs: the key's id (10 characters, from Apple's developer account).
    #[arg(long, env = "COUNTERSIGN_APNS_KEY_ID", default_value = "")]
    pub apns_key_id: String,
    /// APNs: the team id.
    #[arg(long, env = "COUNTERSIGN_APNS_TEAM_ID", default_value = "")]
    pub apns_team_id: String,
    /// APNs: the topic (the app's bundle id) when a mailbox names none.
    #[arg(long, env = "COUNTERSIGN_APNS_TOPIC", default_value = "")]
    pub apns_topic: String,
    /// APNs: the base URL (`https://api.sandbox.push.apple.com` for development builds, a
    /// stand-in's in tests).
    #[arg(long, env = "COUNTERSIGN_APNS_URL", default_value = countersign_message_center::apns::APNS_DEFAULT_BASE_URL)]
    pub apns_url: String,
    /// A PEM file of extra certificate authorities the push clients trust (a stand-in's).
    #[arg(long, env = "COUNTERSIGN_PUSH_CA_FILE")]
    pub push_ca_file: Option<PathBuf>,
    /// Where the NS reaches this instance's own Message Center (default
    /// `http://{listen address}`), when it runs the `mc` role.
    #[arg(long, env = "COUNTERSIGN_MC_URL")]
    pub mc_url: Option<String>,
    /// Other Message Centers this NS sends push through (third-party apps', or the MC
    /// instances of a scaled deployment): `KEY=URL`, the MC's channel key in hex (from its
    /// `GET /v1/mc/key`) and its base URL.
    #[arg(
        long = "trust-mc",
        env = "COUNTERSIGN_TRUST_MCS",
        value_delimiter = ','
    )]
    pub trust_mc: Vec<String>,
}

impl PushArgs {
    /// The senders the configured credentials make.
    pub fn senders(&self) -> anyhow::Result<Senders> {
        let ca = match &self.push_ca_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?,
            ),
            None => None,
        };
        let mut senders = Senders::default();
        if let Some(path) = &self.fcm_service_account {
            let json = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let account = ServiceAccount::from_json(&json)
                .map_err(|e| anyhow::anyhow!("--fcm-service-account: {e}"))?;
            let mut config = FcmConfig::new(account);
            config.api_base_url.clone_from(&self.fcm_url);
            config.extra_ca_pem.clone_from(&ca);
            senders.fcm = Some(Arc::new(
                FcmSender::new(config).map_err(|e| anyhow::anyhow!("FCM: {e}"))?,
            ));
        }
        if let Some(path) = &self.apns_key_file {
            let key = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let mut config = ApnsConfig::new(
                self.apns_team_id.clone(),
                self.apns_key_id.clone(),
                key,
                self.apns_topic.clone(),
            );
            config.base_url.clone_from(&self.apns_url);
            config.extra_ca_pem = ca;
            senders.apns = Some(Arc::new(
                ApnsSender::new(config).map_err(|e| anyhow::anyhow!("APNs: {e}"))?,
            ));
        }
        Ok(senders)
    }

    /// The `--trust-mc` entries.
    pub fn trusted(&self) -> anyhow::Result<Vec<TrustedMc>> {
        self.trust_mc
            .iter()
            .filter(|entry| !entry.trim().is_empty())
            .map(|entry| {
                let (key, url) = entry.split_once('=').context("--trust-mc takes KEY=URL")?;
                let key = hex::decode(key.trim()).context("--trust-mc: the key must be hex")?;
                let key = p256::PublicKey::from_sec1_bytes(&key)
                    .map_err(|_| anyhow::anyhow!("--trust-mc: the key is not a P-256 point"))?;
                use p256::elliptic_curve::sec1::ToSec1Point as _;
                Ok(TrustedMc {
                    key: key.as_affine().to_sec1_point(false).as_bytes().to_vec(),
                    url: url.trim().trim_end_matches('/').to_owned(),
                })
            })
            .collect()
    }
}

/// `countersign push-standin`.
#[derive(Debug, Clone, clap::Args)]
pub struct StandinArgs {
    /// Which service to stand in for.
    #[arg(value_enum)]
    pub kind: StandinChoice,
    /// Address of the service (FCM: HTTP; APNs: HTTP/2 over TLS).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// APNs: address of the plain-HTTP control listener (inboxes, faults).
    #[arg(long)]
    pub control_listen: Option<SocketAddr>,
    /// Folder to write the credentials into (service-account JSON, CA, p8 key).
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// Keep no recording of the bytes received (for long benches).
    #[arg(long)]
    pub no_recording: bool,
}

/// The services a stand-in speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StandinChoice {
    Fcm,
    Apns,
}

/// Runs a stand-in until Ctrl-C, after writing its credentials and printing how to use them.
#[allow(clippy::print_stdout)] // The command's output is its instructions.
pub async fn run(args: StandinArgs) -> anyhow::Result<()> {
    let kind = match args.kind {
        StandinChoice::Fcm => StandinKind::Fcm,
        StandinChoice::Apns => StandinKind::Apns,
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let out = args.out.clone();
    let mut written = Ok(());
    run_standin(
        kind,
        args.listen,
        args.control_listen,
        !args.no_recording,
        |info| {
            for (name, contents) in &info.files {
                let path = out.join(name);
                if let Err(e) = std::fs::write(&path, contents) {
                    written = Err(anyhow::anyhow!("cannot write {}: {e}", path.display()));
                }
            }
            println!("{}", info.describe());
            println!("credentials written to {}", out.display());
        },
        async {
            let _ = tokio::signal::ctrl_c().await;
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("the stand-in failed: {e}"))?;
    written
}
