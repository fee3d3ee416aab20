//! `countersign verify EVIDENCE --audit-key KEY --sfs-key KEY`: checks an evidence bundle
//! offline (no network, no database) with the checks of `docs/evidence.md`, in order.
//!
//! Exit 0 and a summary when every check passes; exit 1 and the first failing check otherwise.
//! Keys are hex SEC1 P-256 points, given inline or as a file holding the hex (a file path is
//! anything that is not hex). The second factor cannot be proven without trusting an SFS key,
//! so at least one `--sfs-key` is required: the deployment publishes its own at
//! `GET /v1/sfs/key` (`attestation_public_key`), and the audit key at `GET /v1/audit/key`.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use countersign_domain::Clock as _;
use countersign_protocol::attestation::Factor;
use countersign_protocol::evidence::{Evidence, EvidenceError, VerifiedEvidence, verify_evidence};
use p256::ecdsa::VerifyingKey;

/// `countersign verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The evidence bundle (CBOR, as `GET …/transactions/{id}/evidence` serves it).
    pub evidence: PathBuf,
    /// The deployment's audit public key: hex SEC1, or a file holding it.
    #[arg(long)]
    pub audit_key: String,
    /// A trusted SFS attestation public key: hex SEC1, or a file holding it. Repeat for several.
    #[arg(long = "sfs-key", required = true)]
    pub sfs_keys: Vec<String>,
    /// Also print the bundle as JSON (unverified parts included) after the summary.
    #[arg(long)]
    pub json: bool,
}

/// Reads a key given inline (hex) or as a file of hex.
fn key(value: &str, flag: &str) -> anyhow::Result<VerifyingKey> {
    let value = value.trim();
    let hex_text = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        value.to_owned()
    } else {
        std::fs::read_to_string(value)
            .with_context(|| format!("{flag}: not hex, and no readable file {value:?}"))?
            .trim()
            .to_owned()
    };
    let bytes = hex::decode(&hex_text).with_context(|| format!("{flag} is not hex"))?;
    VerifyingKey::from_sec1_bytes(&bytes)
        .map_err(|_| anyhow::anyhow!("{flag} is not a P-256 public key"))
}

/// Verifies the bundle; `Ok(Err(_))` is a bundle that does not verify, `Err(_)` a usage
/// problem (unreadable file, bad key).
pub fn check(args: &VerifyArgs) -> anyhow::Result<Result<VerifiedEvidence, EvidenceError>> {
    let bytes = std::fs::read(&args.evidence)
        .with_context(|| format!("cannot read {}", args.evidence.display()))?;
    let audit = key(&args.audit_key, "--audit-key")?;
    let sfs = args
        .sfs_keys
        .iter()
        .map(|k| key(k, "--sfs-key"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let now_ms = countersign_commands::clock::SystemClock.now().as_millis();
    Ok(verify_evidence(&bytes, &audit, &sfs, Some(now_ms)))
}

fn factor(f: Factor) -> &'static str {
    match f {
        Factor::Pin => "PIN",
        Factor::Biometric => "biometric",
    }
}

/// Runs `countersign verify`: the summary on stdout when valid; an error (exit 1, its message
/// on stderr) naming the first failing check when not.
pub fn run(args: &VerifyArgs) -> anyhow::Result<()> {
    let outcome = check(args)?;
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(v) => {
            writeln!(out, "VALID evidence")?;
            writeln!(out, "  transaction   {}", hex::encode(v.transaction_id))?;
            writeln!(out, "  server        {}", hex::encode(v.server_id))?;
            writeln!(out, "  account       {}", hex::encode(v.account_id))?;
            writeln!(
                out,
                "  second factor {} (attested by a trusted SFS)",
                factor(v.factor)
            )?;
            writeln!(
                out,
                "  device time   {}",
                crate::device::utc(v.device_time_ms)
            )?;
            writeln!(
                out,
                "  audit trail   event {} in tree of {} leaves, root {}",
                v.signed_position,
                v.checkpoint.tree_size,
                hex::encode(v.checkpoint.root_hash)
            )?;
            writeln!(
                out,
                "  checkpoint    origin {:?}, signed {}",
                v.checkpoint.origin,
                crate::device::utc(v.checkpoint.timestamp_ms)
            )?;
            if args.json {
                let bytes = std::fs::read(&args.evidence)?;
                let bundle = Evidence::from_cbor(&bytes)?;
                writeln!(out, "{}", serde_json::to_string_pretty(&bundle.to_json())?)?;
            }
            Ok(())
        }
        Err(failure) => Err(anyhow::anyhow!("NOT VALID: {failure}")),
    }
}
