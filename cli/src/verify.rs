//! `countersign verify EVIDENCE --audit-key KEY --sfs-key KEY`: checks an evidence bundle
//! offline (no network, no database) with the checks of `docs/evidence.md`, in order.
//!
//! Exit 0 and a summary when every check passes; exit 1 and the first failing check otherwise.
//! Keys are hex SEC1 P-256 points, given inline or as a file holding the hex (a file path is
//! anything that is not hex). The second factor cannot be proven without trusting an SFS key,
//! so at least one `--sfs-key` is required: the deployment publishes its own at
//! `GET /v1/sfs/key` (`attestation_public_key`), and the audit key at `GET /v1/audit/key`.
//!
//! The only use of a clock is check 1's "the checkpoint is not dated in the future". By
//! default that is the machine's clock; `--at TIME` judges at a given time instead (RFC 3339
//! in UTC or with an offset, or milliseconds since the Unix epoch), and `--no-clock` skips that
//! one check, for a verifier whose clock cannot be trusted or that wants the answer to depend on
//! the file and the keys alone. Everything else is judged at the signed device time, never at
//! the verifier's.

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
    /// Judge "the checkpoint is not dated in the future" at TIME instead of the machine's
    /// clock: RFC 3339 (`2031-05-01T12:00:00Z`, `…+02:00`) or milliseconds since the Unix epoch.
    #[arg(long, value_name = "TIME", value_parser = parse_time, conflicts_with = "no_clock")]
    pub at: Option<i64>,
    /// Read no clock: skip only the checkpoint-date check; every other check is unchanged.
    #[arg(long)]
    pub no_clock: bool,
}

/// Parses `--at`: milliseconds since the Unix epoch, or an RFC 3339 date-time
/// (`YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`), into milliseconds since the Unix epoch.
///
/// # Errors
/// A message naming the expected forms.
pub fn parse_time(text: &str) -> Result<i64, String> {
    let text = text.trim();
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    rfc3339_ms(text).ok_or_else(|| {
        format!(
            "{text:?} is neither milliseconds since the Unix epoch nor an RFC 3339 time \
             such as 2031-05-01T12:00:00Z"
        )
    })
}

fn digits(text: &str, range: std::ops::Range<usize>) -> Option<i64> {
    let part = text.get(range)?;
    if part.bytes().all(|b| b.is_ascii_digit()) {
        part.parse().ok()
    } else {
        None
    }
}

fn rfc3339_ms(t: &str) -> Option<i64> {
    let bytes = t.as_bytes();
    let sep = |i: usize, allowed: &[u8]| bytes.get(i).is_some_and(|b| allowed.contains(b));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (year, month, day) = (digits(t, 0..4)?, digits(t, 5..7)?, digits(t, 8..10)?);
    let (hour, minute, second) = (digits(t, 11..13)?, digits(t, 14..16)?, digits(t, 17..19)?);
    let mut rest = t.get(19..)?;
    let mut millis = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let n = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        let first3 = format!("{:0<3}", fraction.get(..n.min(3))?);
        millis = first3.parse::<i64>().ok()?;
        rest = fraction.get(n..)?;
    }
    let offset_min = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first() {
                Some(b'+') => 1,
                Some(b'-') => -1,
                _ => return None,
            };
            if rest.len() != 6 || !sep_at(rest, 3, b':') {
                return None;
            }
            let (h, m) = (digits(rest, 1..3)?, digits(rest, 4..6)?);
            if h > 23 || m > 59 {
                return None;
            }
            sign * (h * 60 + m)
        }
    };
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => return None,
    };
    // RFC 3339 allows a leap second (60); it is read as the second after 59.
    if day < 1 || day > days_in_month || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_min * 60;
    secs.checked_mul(1_000)?.checked_add(millis)
}

fn sep_at(text: &str, i: usize, want: u8) -> bool {
    text.as_bytes().get(i) == Some(&want)
}

/// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
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
    let now_ms = if args.no_clock {
        None
    } else {
        Some(
            args.at
                .unwrap_or_else(|| countersign_commands::clock::SystemClock.now().as_millis()),
        )
    };
    Ok(verify_evidence(&bytes, &audit, &sfs, now_ms))
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
                "  app instance  {} (the enrolled one)",
                hex::encode(v.app_instance)
            )?;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn at_takes_milliseconds_or_rfc3339() {
        assert_eq!(parse_time("0"), Ok(0));
        assert_eq!(parse_time("-1000"), Ok(-1000));
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_time("2000-02-29T00:00:00Z"), Ok(951_782_400_000));
        assert_eq!(
            parse_time("2026-09-21T14:13:20.999Z"),
            Ok(1_790_000_000_999)
        );
        assert_eq!(parse_time("2026-09-21T14:13:20.9Z"), Ok(1_790_000_000_900));
        assert_eq!(
            parse_time("2026-09-21 16:13:20+02:00"),
            Ok(1_790_000_000_000)
        );
        assert_eq!(parse_time("1969-12-31T23:59:59z"), Ok(-1000));
        assert_eq!(
            parse_time("2026-09-21T14:13:20-00:30"),
            Ok(1_790_001_800_000)
        );
        for bad in [
            "",
            "yesterday",
            "2026-09-21",
            "2026-09-21T14:13:20",
            "2026-02-30T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-09-21T24:00:00Z",
            "2026-09-21T14:13:20.Z",
            "2026-09-21T14:13:20+2:00",
            "2026-09-21T14:13:20+24:00",
            "2026-9-21T14:13:20Z",
        ] {
            assert!(parse_time(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn no_clock_and_at_exclude_each_other() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: VerifyArgs,
        }
        let base = ["x", "e.cbor", "--audit-key", "k", "--sfs-key", "k"];
        let parse = |extra: &[&str]| Cli::try_parse_from(base.iter().chain(extra)).map(|c| c.args);
        assert!(parse(&["--at", "0", "--no-clock"]).is_err());
        assert!(parse(&["--at", "soon"]).is_err());
        let at = parse(&["--at", "1970-01-01T00:00:01Z"]).unwrap();
        assert_eq!((at.at, at.no_clock), (Some(1000), false));
        let none = parse(&["--no-clock"]).unwrap();
        assert_eq!((none.at, none.no_clock), (None, true));
    }
}
