//! `countersign bench transactions`: signed transactions end to end against a running
//! `countersign serve` (API, device gateway and SFS), virtual devices in this process.
//!
//! Setup: a virtual server whose policy asks a PIN, `--devices` users each with one phone
//! (the mobile SDK, in-memory storage) enrolled through its QR code with a PIN registered at
//! the SFS. Then `--concurrency` workers loop for `--seconds`:
//!
//! 1. the business system creates a transaction for the device's user
//!    (`POST …/transactions`: a 120-byte JSON payment and its text);
//! 2. the phone fetches it (`get_transaction`), has the SFS attest a **fresh** PIN for its
//!    challenge (OPAQUE), signs it and sends signature and attestation (`sign_transaction`);
//! 3. the business system reads the transaction until the API shows `signed`.
//!
//! End-to-end latency runs from before the POST to that read. The phone learns the id from the
//! business side (a real phone hears the gateway's `transaction_pending` notice or a push). The
//! client's Argon2id cost is set low (`m` = 1 MiB, `t` = 1): it is the phone's CPU, not the
//! platform's, and here it would share the two cores with the server. With `--server-pid`, the
//! CPU milliseconds per transaction of the server, PostgreSQL and this process are reported.
//! Baseline in the same run: bare transaction creations (`POST` alone) at the same
//! concurrency.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use countersign_mobile_sdk::{
    Argon2Params, HistoryStatus, Interaction, MemoryStorage, NoCallbacks, Sdk, SdkConfig,
    SecondFactor, SfsConfig, State as SdkState,
};
use hdrhistogram::Histogram;
use serde::Serialize;

use super::device::{Business, CpuMark, CpuShare, STEP_TIMEOUT, admin_key, histogram, ms, random};

/// The PIN every virtual phone registers (never printed).
pub(crate) const PIN: &str = "602918";

#[derive(Debug, clap::Args)]
pub struct TransactionsArgs {
    /// The running server's base URL (API, `/v1/device` and `/v1/sfs` on the same address).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub api: String,
    /// Virtual phones (each with one account of its own user).
    #[arg(long, default_value_t = 32)]
    pub devices: usize,
    /// Transactions in flight at once (worker `w` uses phone `w % devices`).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Seconds to measure.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// The server's process id, to report its CPU time per transaction.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One phone and its account.
pub(crate) struct Phone {
    pub(crate) sdk: Sdk,
    pub(crate) account: String,
    pub(crate) userid: String,
}

#[derive(Debug, Serialize)]
struct Report {
    api: String,
    devices: usize,
    concurrency: usize,
    transactions: u64,
    errors: u64,
    first_error: Option<String>,
    seconds: f64,
    signed_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Medians of the parts: the POST, the phone (fetch, SFS, sign), the reads until `signed`.
    create_p50_ms: f64,
    device_p50_ms: f64,
    device_p99_ms: f64,
    visible_p50_ms: f64,
    reads_per_transaction: f64,
    cpu_per_transaction: CpuShare,
    baseline_create_per_sec: f64,
    baseline_create_p50_ms: f64,
}

struct WorkerResult {
    total: Histogram<u64>,
    create: Histogram<u64>,
    device: Histogram<u64>,
    visible: Histogram<u64>,
    reads: u64,
    errors: u64,
    first_error: Option<String>,
}

impl WorkerResult {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            total: histogram()?,
            create: histogram()?,
            device: histogram()?,
            visible: histogram()?,
            reads: 0,
            errors: 0,
            first_error: None,
        })
    }

    fn add(&mut self, other: Self) -> anyhow::Result<()> {
        self.total.add(&other.total)?;
        self.create.add(&other.create)?;
        self.device.add(&other.device)?;
        self.visible.add(&other.visible)?;
        self.reads += other.reads;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        Ok(())
    }
}

/// A payment of about 120 bytes and the text the phone shows.
fn payment(n: u64) -> (String, String) {
    let cents = 1_000 + n % 90_000;
    let data = format!(
        "{{\"amount\":\"{}.{:02}\",\"currency\":\"EUR\",\"creditor\":\"ACME BV\",\"iban\":\"NL91ABNA0417164300\",\"ref\":\"{n:016x}\"}}",
        cents / 100,
        cents % 100
    );
    let text = format!(
        "Pay €{}.{:02} to ACME BV\nIBAN NL91 ABNA 0417 1643 00",
        cents / 100,
        cents % 100
    );
    (data, text)
}

impl Business {
    /// Creates a transaction for `userid`; answers its id and the position of its creation.
    async fn create_transaction(&self, userid: &str, n: u64) -> anyhow::Result<(String, u64)> {
        let (data, text) = payment(n);
        let response = self
            .http
            .post(self.url("/transactions"))
            .bearer_auth(&*self.token)
            .json(&serde_json::json!({
                "userid": userid,
                "data": base64::engine::general_purpose::STANDARD.encode(data),
                "content_type": "application/json",
                "text": text,
            }))
            .send()
            .await?;
        if response.status() != reqwest::StatusCode::CREATED {
            bail!("POST transaction answered {}", response.status());
        }
        let body: serde_json::Value = response.json().await?;
        let id = body
            .get("transaction_id")
            .and_then(|v| v.as_str())
            .context("no transaction id")?
            .to_owned();
        let position = body
            .get("position")
            .and_then(serde_json::Value::as_u64)
            .context("no position")?;
        Ok((id, position))
    }

    /// Reads the transaction until it shows `signed`; answers how many reads that took.
    async fn await_signed(&self, id: &str, position: u64) -> anyhow::Result<u64> {
        self.await_field(
            &format!("/transactions/{id}"),
            position,
            ("status", "signed"),
            &["pending", "presented"],
        )
        .await
    }
}

fn sdk_config(sfs: SfsConfig) -> SdkConfig {
    SdkConfig {
        sfs: Some(sfs),
        // One account: a login does not wait for the user to pick it.
        skip_single_account_confirmation: true,
        argon2_params: Argon2Params {
            m_kib: 1024,
            t: 1,
            p: 1,
        },
        request_timeout: STEP_TIMEOUT,
        ..SdkConfig::default()
    }
}

/// Enrols one phone for `userid` with the PIN registered at the SFS.
pub(crate) async fn enrol(
    business: &Business,
    sfs: SfsConfig,
    userid: &str,
) -> anyhow::Result<Phone> {
    let qr = business.enrolment(userid).await?;
    let sdk = Sdk::open(Arc::new(MemoryStorage::new()), sdk_config(sfs))?;
    let session = sdk
        .start_session(&qr.encode(), Arc::new(NoCallbacks))
        .await?;
    session.confirm_enrol().await?;
    tokio::time::timeout(
        STEP_TIMEOUT,
        session.wait_for(|s| {
            matches!(
                s.state,
                SdkState::UserInteraction(Interaction::WaitForSecondFactor)
                    | SdkState::Done
                    | SdkState::Error
            )
        }),
    )
    .await
    .context("the enrolment did not ask for the PIN")?;
    session.set_pin_biometric(SecondFactor::pin(PIN)).await?;
    let done = tokio::time::timeout(
        STEP_TIMEOUT,
        session.wait_for(|s| matches!(s.state, SdkState::Done | SdkState::Error)),
    )
    .await
    .context("the enrolment did not finish")?;
    if done.history_status != Some(HistoryStatus::Enrolled) {
        bail!("the SDK did not enrol: {:?}", done.error);
    }
    let account = done.account_id.context("no account after enrolment")?;
    Ok(Phone {
        sdk,
        account,
        userid: userid.to_owned(),
    })
}

/// The phone's part: fetch, fresh PIN at the SFS, sign, send.
async fn approve(phone: &Phone, id: &str) -> anyhow::Result<()> {
    let details = phone.sdk.get_transaction(&phone.account, id).await?;
    phone
        .sdk
        .sign_transaction(
            &phone.account,
            &details,
            SecondFactor::pin(PIN),
            std::collections::BTreeMap::new(),
            None,
        )
        .await?;
    Ok(())
}

/// Checks a bench's `--devices`, `--concurrency` and `--seconds`.
pub(crate) fn check_args(devices: usize, concurrency: usize, seconds: f64) -> anyhow::Result<()> {
    if devices == 0 || concurrency == 0 {
        bail!("--devices and --concurrency take positive numbers");
    }
    if !(seconds > 0.0 && seconds <= 600.0) {
        bail!("--seconds must be between 0 and 600");
    }
    Ok(())
}

/// Enrols `devices` phones with a PIN, as users `{userids}-0`, `{userids}-1`, …, saying how
/// long it took unless the output is JSON.
pub(crate) async fn enrol_phones(
    business: &Business,
    sfs: &SfsConfig,
    userids: &str,
    devices: usize,
    json: bool,
) -> anyhow::Result<Vec<Phone>> {
    let setup = Instant::now();
    let mut phones = Vec::with_capacity(devices);
    for i in 0..devices {
        let userid = format!("{userids}-{i}");
        // The SFS admits a few new app instances per client address, then two requests a
        // second (all phones here share one address): wait for it rather than fail.
        let mut waited = 0;
        let phone = loop {
            match enrol(business, sfs.clone(), &userid).await {
                // Refused ("too many requests") or cut off at the socket by the same limits.
                Err(error) if waited < 40 => {
                    tracing::debug!(error = %format!("{error:#}"), "enrolment refused; waiting");
                    waited += 1;
                    // Long enough for the bucket to hold a whole onboarding (four requests).
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                other => break other.with_context(|| format!("enrolling phone {i}"))?,
            }
        };
        phones.push(phone);
    }
    if !json {
        eprintln!(
            "server {}: {} phones enrolled with a PIN in {:.1} s",
            business.server,
            devices,
            setup.elapsed().as_secs_f64()
        );
    }
    Ok(phones)
}

pub async fn transactions(args: TransactionsArgs) -> anyhow::Result<()> {
    check_args(args.devices, args.concurrency, args.seconds)?;
    let admin = admin_key()?;
    let business =
        Business::create_with_policy(&args.api, &admin, args.concurrency * 2, "pin").await?;
    let sfs = SfsConfig::fetch(&format!("{}/v1/sfs", business.base)).await?;
    let prefix = hex::encode(random::<4>()?);
    let phones = Arc::new(
        enrol_phones(
            &business,
            &sfs,
            &format!("tx-{prefix}"),
            args.devices,
            args.json,
        )
        .await?,
    );

    let stop = Arc::new(AtomicBool::new(false));
    let before = CpuMark::now(args.server_pid);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.concurrency);
    for worker in 0..args.concurrency {
        let (business, phones, stop) = (business.clone(), Arc::clone(&phones), Arc::clone(&stop));
        let phone = worker % args.devices;
        tasks.push(tokio::spawn(async move {
            let mut result = WorkerResult::new()?;
            let phone = phones.get(phone).context("no such phone")?;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let n = (worker as u64) << 40 | i;
                i += 1;
                let one = async {
                    let t0 = Instant::now();
                    let (id, position) = business.create_transaction(&phone.userid, n).await?;
                    let t1 = Instant::now();
                    approve(phone, &id).await?;
                    let t2 = Instant::now();
                    let reads = business.await_signed(&id, position).await?;
                    anyhow::Ok((t0, t1, t2, Instant::now(), reads))
                };
                match one.await {
                    Ok((t0, t1, t2, t3, reads)) => {
                        let us = |a: Instant, b: Instant| (b - a).as_micros().max(1) as u64;
                        result.total.saturating_record(us(t0, t3));
                        result.create.saturating_record(us(t0, t1));
                        result.device.saturating_record(us(t1, t2));
                        result.visible.saturating_record(us(t2, t3));
                        result.reads += reads;
                    }
                    Err(error) => {
                        result.errors += 1;
                        result
                            .first_error
                            .get_or_insert_with(|| format!("{error:#}"));
                    }
                }
            }
            anyhow::Ok(result)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = WorkerResult::new()?;
    for task in tasks {
        all.add(task.await.context("a worker died")??)?;
    }
    // Workers finish the transaction in hand after the stop: count the time they took.
    let seconds = started.elapsed().as_secs_f64();
    let after = CpuMark::now(args.server_pid);
    let done = all.total.len();
    let (baseline_rate, baseline_p50) = baseline_creates(&business, &phones, &args).await?;
    let report = Report {
        api: business.base.clone(),
        devices: args.devices,
        concurrency: args.concurrency,
        transactions: done,
        errors: all.errors,
        first_error: all.first_error,
        seconds,
        signed_per_sec: done as f64 / seconds,
        p50_ms: ms(&all.total, 0.5),
        p99_ms: ms(&all.total, 0.99),
        max_ms: all.total.max() as f64 / 1_000.0,
        create_p50_ms: ms(&all.create, 0.5),
        device_p50_ms: ms(&all.device, 0.5),
        device_p99_ms: ms(&all.device, 0.99),
        visible_p50_ms: ms(&all.visible, 0.5),
        reads_per_transaction: all.reads as f64 / done.max(1) as f64,
        cpu_per_transaction: before.per(&after, done),
        baseline_create_per_sec: baseline_rate,
        baseline_create_p50_ms: baseline_p50,
    };
    print(&report, args.json)
}

/// The business half alone: transaction creations at the same concurrency for 3 s.
async fn baseline_creates(
    business: &Business,
    phones: &Arc<Vec<Phone>>,
    args: &TransactionsArgs,
) -> anyhow::Result<(f64, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.concurrency);
    for worker in 0..args.concurrency {
        let (business, phones, stop) = (business.clone(), Arc::clone(phones), Arc::clone(&stop));
        let phone = worker % args.devices;
        tasks.push(tokio::spawn(async move {
            let mut h = histogram()?;
            let userid = &phones.get(phone).context("no such phone")?.userid;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                business
                    .create_transaction(userid, (1 << 60) | (worker as u64) << 40 | i)
                    .await?;
                h.saturating_record((t0.elapsed().as_micros() as u64).max(1));
                i += 1;
            }
            anyhow::Ok(h)
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = histogram()?;
    for task in tasks {
        all.add(&task.await.context("a baseline worker died")??)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok((all.len() as f64 / seconds, ms(&all, 0.5)))
}

fn print(report: &Report, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(report)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "signed transactions end to end ({} phones, {} in flight, {:.1} s): {} signed, {} errors",
        report.devices, report.concurrency, report.seconds, report.transactions, report.errors
    )?;
    if let Some(e) = &report.first_error {
        writeln!(out, "  first error: {e}")?;
    }
    writeln!(
        out,
        "  {:.0} signed/s   p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms",
        report.signed_per_sec, report.p50_ms, report.p99_ms, report.max_ms
    )?;
    writeln!(
        out,
        "  parts (p50): create {:.1} ms, phone {:.1} ms (p99 {:.1}), visible {:.1} ms; {:.1} reads each",
        report.create_p50_ms,
        report.device_p50_ms,
        report.device_p99_ms,
        report.visible_p50_ms,
        report.reads_per_transaction
    )?;
    let cpu = &report.cpu_per_transaction;
    writeln!(
        out,
        "  CPU ms per transaction: bench {:.2}, server {}, PostgreSQL {:.2}",
        cpu.bench_ms,
        cpu.server_ms
            .map_or_else(|| "n/a".to_owned(), |s| format!("{s:.2}")),
        cpu.postgres_ms
    )?;
    writeln!(
        out,
        "  baseline: bare creations {:.0}/s (p50 {:.1} ms): signed is {:.0} % of it",
        report.baseline_create_per_sec,
        report.baseline_create_p50_ms,
        100.0 * report.signed_per_sec / report.baseline_create_per_sec.max(1.0)
    )?;
    Ok(())
}
