//! `countersign audit`: build the Merkle audit tree, sign checkpoints, print the audit key,
//! and verify the whole log against the signed checkpoints.

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use countersign_commands::{Clock, SystemClock};
use countersign_eventstore::vault::KeyVault;
use countersign_projections::audit::{AuditTree, check_signed};
use p256::ecdsa::{SigningKey, VerifyingKey};
use zeroize::Zeroizing;

use crate::Settings;

/// Where the deployment's audit signing key is kept in the key vault.
pub const AUDIT_KEY_REF: &str = "audit/signing-key";

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub what: AuditWhat,
}

#[derive(Debug, clap::Subcommand)]
pub enum AuditWhat {
    /// Add every new event to the audit tree and print its size and root.
    Build,
    /// Add new events and sign a checkpoint (tree head) with the audit key.
    Checkpoint {
        /// The log's name in its checkpoints.
        #[arg(long, default_value = "countersign")]
        origin: String,
    },
    /// Keep the tree up to date and sign a checkpoint at most every `--interval-ms` while
    /// events arrive (one JSON line per checkpoint, with its lag behind the newest event).
    Follow {
        #[arg(long, default_value = "countersign")]
        origin: String,
        #[arg(long, default_value_t = 1_000)]
        interval_ms: u64,
    },
    /// Print the audit public key (SEC1, hex): give it to whoever verifies.
    Key,
    /// Watch a deployment's checkpoints as a CT monitor does: verify each new one with the
    /// audit key and check, with a consistency proof, that it extends the previous one. Prints
    /// a JSON line per checkpoint; exits non-zero at the first violation. The credential (any
    /// API key or the admin key) comes from `COUNTERSIGN_MONITOR_TOKEN`, never the command line.
    Monitor {
        /// The deployment's base URL, e.g. `https://countersign.example.com`.
        url: String,
        /// The audit public key (hex SEC1), pinned out of band.
        #[arg(long)]
        audit_key: String,
        /// Poll interval, milliseconds.
        #[arg(long, default_value_t = 1_000)]
        interval_ms: u64,
        /// Stop after this many new checkpoints (default: run until stopped).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Recompute the tree from the stored events and check every signed checkpoint; exits
    /// non-zero and names the first position that disagrees.
    Verify {
        /// The audit public key (hex SEC1); by default read from this deployment's vault.
        #[arg(long)]
        audit_key: Option<String>,
    },
}

/// The audit signing key, created in the vault on first use.
pub async fn signing_key(vault: &KeyVault) -> anyhow::Result<SigningKey> {
    let existing = vault.get(AUDIT_KEY_REF).await?;
    let bytes = match existing {
        Some(bytes) => bytes,
        None => {
            let mut fresh = Zeroizing::new([0u8; 32]);
            loop {
                getrandom::fill(fresh.as_mut())
                    .map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
                if SigningKey::from_slice(fresh.as_ref()).is_ok() {
                    break;
                }
            }
            vault.put_if_absent(AUDIT_KEY_REF, fresh.as_ref()).await?
        }
    };
    SigningKey::from_slice(&bytes).context("the vault's audit key is not a P-256 key")
}

pub async fn run(settings: &Settings, args: AuditArgs) -> anyhow::Result<()> {
    if let AuditWhat::Monitor {
        url,
        audit_key,
        interval_ms,
        count,
    } = &args.what
    {
        return monitor(url, audit_key, Duration::from_millis(*interval_ms), *count).await;
    }
    let opened = crate::connect(settings).await?;
    let tree = AuditTree::new(opened.database.clone());
    let vault = || -> anyhow::Result<KeyVault> {
        Ok(KeyVault::new(opened.vault.clone(), settings.master_key()?))
    };
    let mut out = std::io::stdout().lock();
    match args.what {
        AuditWhat::Build => {
            let size = tree.catch_up(&opened.events).await?;
            let root = tree.root(size).await?;
            writeln!(
                out,
                "{{\"tree_size\":{size},\"root_hash\":\"{}\"}}",
                hex::encode(root)
            )?;
        }
        AuditWhat::Checkpoint { origin } => {
            let key = signing_key(&vault()?).await?;
            let now = SystemClock.now().0;
            match tree.checkpoint(&opened.events, &key, &origin, now).await? {
                Some(c) => writeln!(
                    out,
                    "{{\"tree_size\":{},\"root_hash\":\"{}\",\"timestamp_ms\":{},\"signed\":\"{}\"}}",
                    c.tree_size,
                    hex::encode(c.root_hash),
                    c.timestamp_ms,
                    hex::encode(&c.signed)
                )?,
                None => writeln!(out, "nothing new to sign")?,
            }
        }
        AuditWhat::Follow {
            origin,
            interval_ms,
        } => {
            drop(out);
            let key = signing_key(&vault()?).await?;
            follow(
                &opened.events,
                &tree,
                &key,
                &origin,
                Duration::from_millis(interval_ms.max(10)),
            )
            .await?;
        }
        AuditWhat::Monitor { .. } => unreachable_monitor()?,
        AuditWhat::Key => {
            let key = signing_key(&vault()?).await?;
            writeln!(out, "{}", hex::encode(key.verifying_key().to_sec1_bytes()))?;
        }
        AuditWhat::Verify { audit_key } => {
            let key = match audit_key {
                Some(text) => VerifyingKey::from_sec1_bytes(
                    &hex::decode(text.trim()).context("--audit-key is not hex")?,
                )
                .context("--audit-key is not a P-256 public key")?,
                None => *signing_key(&vault()?).await?.verifying_key(),
            };
            let mut last_shown = 0u64;
            let report = tree
                .verify(&opened.events, check_signed(&key), |done, total| {
                    if done - last_shown >= 100_000 || done == total {
                        last_shown = done;
                        eprint!("\rverified {done} of {total} events");
                    }
                })
                .await?;
            eprintln!();
            match report.finding {
                None => writeln!(
                    out,
                    "OK: {} events, {} signed checkpoints agree with the log",
                    report.events, report.checkpoints
                )?,
                Some(finding) => {
                    let at = finding
                        .position
                        .map_or_else(String::new, |p| format!(" at position {p}"));
                    anyhow::bail!("the log does not verify{at}: {}", finding.reason);
                }
            }
        }
    }
    Ok(())
}

/// `run` answers `Monitor` before opening a database.
fn unreachable_monitor() -> anyhow::Result<()> {
    anyhow::bail!("audit monitor runs without a database")
}

fn unbase64(value: &serde_json::Value, what: &str) -> anyhow::Result<Vec<u8>> {
    use base64::Engine as _;
    let text = value
        .get(what)
        .and_then(|v| v.as_str())
        .with_context(|| format!("the answer has no {what}"))?;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .with_context(|| format!("{what} is not base64url"))
}

async fn fetch(
    http: &reqwest::Client,
    url: String,
    token: &str,
) -> anyhow::Result<Option<serde_json::Value>> {
    let response = http.get(&url).bearer_auth(token).send().await?;
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    let response = response
        .error_for_status()
        .with_context(|| format!("GET {}", url.split('?').next().unwrap_or("")))?;
    Ok(Some(response.json().await?))
}

/// `audit monitor`: see [`AuditWhat::Monitor`].
async fn monitor(
    base: &str,
    audit_key: &str,
    interval: Duration,
    count: Option<u64>,
) -> anyhow::Result<()> {
    use countersign_protocol::checkpoint::{
        verify_checkpoint, verify_consistency_between_checkpoints,
    };
    let key = VerifyingKey::from_sec1_bytes(
        &hex::decode(audit_key.trim()).context("--audit-key is not hex")?,
    )
    .context("--audit-key is not a P-256 public key")?;
    let token = Zeroizing::new(std::env::var("COUNTERSIGN_MONITOR_TOKEN").context(
        "set COUNTERSIGN_MONITOR_TOKEN to an API key (or the admin key) of the deployment",
    )?);
    let base = base.trim_end_matches('/');
    let http = reqwest::Client::new();
    let mut previous: Option<(u64, Vec<u8>)> = None;
    let mut seen = 0u64;
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        let Some(answer) = fetch(&http, format!("{base}/v1/audit/checkpoint"), &token).await?
        else {
            continue;
        };
        let signed = unbase64(&answer, "signed")?;
        let head = verify_checkpoint(&signed, &key)
            .map_err(|e| anyhow::anyhow!("checkpoint does not verify with the audit key: {e}"))?;
        match &previous {
            Some((size, _)) if head.tree_size < *size => anyhow::bail!(
                "the log shrank: checkpoint of size {} after one of size {size}",
                head.tree_size
            ),
            Some((size, old)) if head.tree_size == *size => {
                if *old != signed
                    && verify_checkpoint(old, &key).map(|h| h.root_hash).ok()
                        != Some(head.root_hash)
                {
                    anyhow::bail!("two different roots signed for size {size}: the log forked");
                }
                continue;
            }
            Some((size, old)) => {
                let proof = fetch(
                    &http,
                    format!(
                        "{base}/v1/audit/proofs/consistency?from={size}&to={}",
                        head.tree_size
                    ),
                    &token,
                )
                .await?
                .context("no consistency proof served")?;
                let hashes = proof
                    .get("hashes")
                    .and_then(|h| h.as_array())
                    .context("the proof has no hashes")?
                    .iter()
                    .map(|h| {
                        h.as_str()
                            .and_then(|h| hex::decode(h).ok())
                            .context("a proof hash is not hex")
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                verify_consistency_between_checkpoints(old, &signed, &hashes, &key).map_err(
                    |e| {
                        anyhow::anyhow!(
                            "checkpoint of size {} is not consistent with size {size}: {e}",
                            head.tree_size
                        )
                    },
                )?;
            }
            None => {}
        }
        {
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{{\"tree_size\":{},\"root_hash\":\"{}\",\"timestamp_ms\":{},\"consistent_with\":{}}}",
                head.tree_size,
                hex::encode(head.root_hash),
                head.timestamp_ms,
                previous
                    .as_ref()
                    .map_or("null".to_owned(), |(size, _)| size.to_string())
            )?;
            out.flush()?;
        }
        previous = Some((head.tree_size, signed));
        seen += 1;
        if count.is_some_and(|c| seen >= c) {
            return Ok(());
        }
    }
}

/// The audit role: catch up on every commit, sign when the interval has passed and the tree
/// grew, until Ctrl-C. Checkpoint lag = signing time − commit time of the oldest event the
/// checkpoint is the first to cover (how long any event waited to be under a signature).
async fn follow(
    store: &countersign_eventstore::SharedStore,
    tree: &AuditTree,
    key: &SigningKey,
    origin: &str,
    interval: Duration,
) -> anyhow::Result<()> {
    let mut head = store.head();
    let mut last_signed: Option<Instant> = None;
    let mut covered = tree.size().await?;
    loop {
        head.borrow_and_update();
        let size = tree.catch_up(store).await?;
        let due = last_signed.is_none_or(|t| t.elapsed() >= interval);
        if size > 0 && due {
            let now = SystemClock.now().0;
            if let Some(c) = tree.checkpoint(store, key, origin, now).await? {
                last_signed = Some(Instant::now());
                let signed_at = SystemClock.now().0;
                // The longest wait: the first event this checkpoint covers that the previous
                // one did not.
                let first_new = store.read_all(covered, 1).await?;
                let lag = first_new.first().map_or(0, |e| signed_at - e.recorded_at);
                covered = c.tree_size;
                let mut out = std::io::stdout().lock();
                writeln!(
                    out,
                    "{{\"tree_size\":{},\"root_hash\":\"{}\",\"timestamp_ms\":{},\"lag_ms\":{lag}}}",
                    c.tree_size,
                    hex::encode(c.root_hash),
                    c.timestamp_ms
                )?;
                out.flush()?;
            }
        }
        let wait = last_signed.map_or(interval, |t| {
            interval
                .saturating_sub(t.elapsed())
                .max(Duration::from_millis(10))
        });
        // Wake on a commit in this process or a PostgreSQL notification; otherwise when the
        // next checkpoint is due (which also covers writers this process cannot hear).
        tokio::select! {
            _ = head.changed() => {}
            () = tokio::time::sleep(wait) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}
