//! `countersign bench app-logins` and `countersign bench data`: AppLogin and the secure
//! channel end to end against a running server, virtual phones (the SDK) in this process.
//!
//! - **app-logins**: phones enrolled with a PIN on a server whose policy asks it. Two phases
//!   in the same run and at the same concurrency: QR logins with the PIN (the business PUTs a
//!   session, the phone scans it, proves the PIN at the SFS, logs in; the business reads
//!   `logged_in`), then AppLogins with the PIN (the phone opens the session itself, proves
//!   the PIN, logs in; the backend reads `logged_in` with the web nonce; the phone stops the
//!   session, untimed but counted in the CPU). Rates, latency and the server's CPU per login.
//! - **data**: an echo Data Service in this process (HTTP/1.1, answers the body it got), set
//!   as the server's DS; each phone sends `--bytes` of app data over its kept gateway channel
//!   (the first send enrols a headless account); round trips per second. The ceiling, same
//!   run: the same DS hit directly with a reqwest client at the same concurrency and size.
//!
//! Speed is reported, never asserted.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use countersign_mobile_sdk::{
    DataServer, HistoryStatus, Interaction, MemoryStorage, NoCallbacks, Sdk, SdkConfig,
    SecondFactor, SfsConfig, State as SdkState,
};
use hdrhistogram::Histogram;
use serde::Serialize;

use super::device::{Business, CpuMark, CpuShare, STEP_TIMEOUT, admin_key, histogram, ms, random};
use super::transactions::{PIN, Phone, check_args, enrol_phones};

#[derive(Debug, clap::Args)]
pub struct AppLoginsArgs {
    /// The running server's base URL (API, `/v1/device` and `/v1/sfs` on the same address).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub api: String,
    /// Virtual phones (each with one account of its own user).
    #[arg(long, default_value_t = 32)]
    pub devices: usize,
    /// Logins in flight at once (worker `w` uses phone `w % devices`).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Seconds per phase.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// The server's process id, to report its CPU time per login.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct DataArgs {
    /// The running server's base URL (API and `/v1/device` on the same address).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub api: String,
    /// Virtual phones (each enrols one headless account on its first send). Each account may
    /// send 100 messages a second (the gateway's per-account limit): 128 phones leave room
    /// for 12,800/s.
    #[arg(long, default_value_t = 128)]
    pub devices: usize,
    /// Round trips in flight at once (worker `w` uses phone `w % devices`).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Seconds per phase.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// App data bytes per message (the DS echoes them).
    #[arg(long, default_value_t = 256)]
    pub bytes: usize,
    /// The server's process id, to report its CPU time per round trip.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One measured phase.
#[derive(Debug, Serialize)]
pub(crate) struct Phase {
    pub(crate) name: &'static str,
    pub(crate) concurrency: usize,
    pub(crate) count: u64,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
    pub(crate) seconds: f64,
    pub(crate) per_sec: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
    /// `None` for the direct DS phase (no countersign server involved).
    pub(crate) cpu: Option<CpuShare>,
}

struct Tally {
    latency: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

/// Runs `one` from `concurrency` workers for `seconds`, each worker with its index; answers
/// the phase.
pub(crate) async fn phase<F, Fut>(
    name: &'static str,
    concurrency: usize,
    seconds: f64,
    server_pid: Option<u32>,
    one: F,
) -> anyhow::Result<Phase>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = anyhow::Result<Duration>> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let before = CpuMark::now(server_pid);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for worker in 0..concurrency {
        let (stop, one) = (Arc::clone(&stop), one.clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally {
                latency: histogram()?,
                errors: 0,
                first_error: None,
            };
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match one(worker, i).await {
                    Ok(took) => {
                        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
                        tally.latency.saturating_record(us);
                    }
                    Err(error) => {
                        tally.errors += 1;
                        tally
                            .first_error
                            .get_or_insert_with(|| format!("{error:#}"));
                    }
                }
                i += 1;
            }
            anyhow::Ok(tally)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Tally {
        latency: histogram()?,
        errors: 0,
        first_error: None,
    };
    for task in tasks {
        let tally = task.await.context("a worker died")??;
        all.latency.add(&tally.latency)?;
        all.errors += tally.errors;
        if all.first_error.is_none() {
            all.first_error = tally.first_error;
        }
    }
    // Workers finish the operation in hand after the stop: count the time they took.
    let seconds = started.elapsed().as_secs_f64();
    let after = CpuMark::now(server_pid);
    let count = all.latency.len();
    #[allow(clippy::cast_precision_loss)]
    Ok(Phase {
        name,
        concurrency,
        count,
        errors: all.errors,
        first_error: all.first_error,
        seconds,
        per_sec: count as f64 / seconds,
        p50_ms: ms(&all.latency, 0.5),
        p99_ms: ms(&all.latency, 0.99),
        max_ms: all.latency.max() as f64 / 1_000.0,
        cpu: Some(before.per(&after, count)),
    })
}

pub(crate) fn print(title: &str, phases: &[Phase], json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(phases)?)?;
        return Ok(());
    }
    writeln!(out, "{title}")?;
    writeln!(
        out,
        "| phase | in flight | per s | p50 ms | p99 ms | max ms | errors | CPU ms each: server + PostgreSQL (phones) |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---|")?;
    for p in phases {
        let cpu = p.cpu.as_ref().map_or_else(
            || "–".to_owned(),
            |c| {
                let server = c
                    .server_ms
                    .map_or_else(|| "?".to_owned(), |s| format!("{s:.2}"));
                format!("{server} + {:.2} ({:.2})", c.postgres_ms, c.bench_ms)
            },
        );
        writeln!(
            out,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} |",
            p.name, p.concurrency, p.per_sec, p.p50_ms, p.p99_ms, p.max_ms, p.errors, cpu
        )?;
        if let Some(error) = &p.first_error {
            writeln!(out, "  first error of {}: {error}", p.name)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// AppLogins against QR logins.

/// Waits for the session to reach a state `until` accepts.
async fn reach(
    session: &countersign_mobile_sdk::SessionHandle,
    what: &str,
    until: impl Fn(&countersign_mobile_sdk::SessionSnapshot) -> bool,
) -> anyhow::Result<countersign_mobile_sdk::SessionSnapshot> {
    tokio::time::timeout(STEP_TIMEOUT, session.wait_for(until))
        .await
        .with_context(|| format!("the session did not reach {what}"))
}

fn asks_factor(s: &countersign_mobile_sdk::SessionSnapshot) -> bool {
    matches!(
        s.state,
        SdkState::UserInteraction(Interaction::WaitForSecondFactor)
            | SdkState::Done
            | SdkState::Error
    )
}

/// One QR login with the PIN; answers its duration.
async fn qr_login(business: &Business, phone: &Phone, nonce: &str) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let (qr, position) = business.open_session(nonce).await?;
    let session = phone
        .sdk
        .start_session(&qr.encode(), Arc::new(NoCallbacks))
        .await?;
    let asked = reach(&session, "the PIN question", asks_factor).await?;
    if asked.state != SdkState::UserInteraction(Interaction::WaitForSecondFactor) {
        bail!("the login did not ask for the PIN: {:?}", asked.error);
    }
    session.set_pin_biometric(SecondFactor::pin(PIN)).await?;
    let done = reach(&session, "the end", |s| s.state.is_final()).await?;
    if done.history_status != Some(HistoryStatus::LoggedInOneShot) {
        bail!("the SDK did not log in: {:?}", done.error);
    }
    business.await_logged_in(nonce, position).await?;
    Ok(t0.elapsed())
}

/// One AppLogin with the PIN up to the backend's read of the web nonce; answers its
/// duration, then stops the session.
async fn app_login(business: &Business, phone: &Phone) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let session = phone
        .sdk
        .app_login(Some(&phone.account), Arc::new(NoCallbacks))
        .await?;
    let asked = reach(&session, "the PIN question", asks_factor).await?;
    if asked.state != SdkState::UserInteraction(Interaction::WaitForSecondFactor) {
        bail!("the AppLogin did not ask for the PIN: {:?}", asked.error);
    }
    session.set_pin_biometric(SecondFactor::pin(PIN)).await?;
    let active = reach(&session, "Active", |s| {
        s.state == SdkState::Active || s.state.is_final()
    })
    .await?;
    let web_nonce = active
        .web_nonce
        .as_ref()
        .context("an active AppLogin without a web nonce")?;
    business
        .await_logged_in(web_nonce.expose(), 0)
        .await
        .context("the backend's read of the web nonce")?;
    let took = t0.elapsed();
    session.stop_session().await?;
    Ok(took)
}

pub async fn app_logins(args: AppLoginsArgs) -> anyhow::Result<()> {
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
            &format!("app-{prefix}"),
            args.devices,
            args.json,
        )
        .await?,
    );
    let devices = args.devices;
    let qr = {
        let (business, phones, prefix) = (business.clone(), Arc::clone(&phones), prefix.clone());
        phase(
            "QR login with PIN",
            args.concurrency,
            args.seconds,
            args.server_pid,
            move |worker, i| {
                let (business, phones) = (business.clone(), Arc::clone(&phones));
                // 8 + 2 + 6 + 16 hex digits: a 32-digit nonce, unique in the run.
                let nonce = format!("{prefix}5e{worker:06x}{i:016x}");
                async move {
                    let phone = phones.get(worker % devices).context("no such phone")?;
                    qr_login(&business, phone, &nonce).await
                }
            },
        )
        .await?
    };
    let app = {
        let (business, phones) = (business.clone(), Arc::clone(&phones));
        phase(
            "AppLogin with PIN",
            args.concurrency,
            args.seconds,
            args.server_pid,
            move |worker, _| {
                let (business, phones) = (business.clone(), Arc::clone(&phones));
                async move {
                    let phone = phones.get(worker % devices).context("no such phone")?;
                    app_login(&business, phone).await
                }
            },
        )
        .await?
    };
    let title = format!(
        "bench app-logins on {}: {} phones; AppLogin / QR login = {:.2}",
        business.base,
        args.devices,
        app.per_sec / qr.per_sec.max(f64::MIN_POSITIVE)
    );
    print(&title, &[qr, app], args.json)
}

// ---------------------------------------------------------------------------------------
// The secure channel against the bare Data Service.

/// An echo Data Service on loopback: answers 200 with the body it got.
async fn echo_ds() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let address = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/ds",
        axum::routing::post(|body: axum::body::Bytes| async move { body }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(address)
}

pub async fn data(args: DataArgs) -> anyhow::Result<()> {
    check_args(args.devices, args.concurrency, args.seconds)?;
    if args.bytes == 0 || args.bytes > 64 * 1024 {
        bail!("--bytes must be 1 to 65536");
    }
    let admin = admin_key()?;
    let business =
        Business::create_with_policy(&args.api, &admin, args.concurrency * 2, "none").await?;
    let ds = echo_ds().await?;
    let ds_url = format!("http://{ds}/ds");
    business
        .http
        .patch(format!("{}/v1/servers/{}", business.base, business.server))
        .bearer_auth(&admin)
        .json(&serde_json::json!({
            "data_service": {"url": ds_url, "timeout_ms": 5000},
            "headless_enrolment": true,
        }))
        .send()
        .await?
        .error_for_status()
        .context("setting the server's Data Service")?;
    let view: serde_json::Value = business
        .http
        .get(format!("{}/v1/servers/{}", business.base, business.server))
        .bearer_auth(&admin)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let fingerprint = view
        .pointer("/server/key_fingerprint")
        .or_else(|| view.get("key_fingerprint"))
        .and_then(|v| v.as_str())
        .context("no key fingerprint in the server view")?
        .to_owned();
    let gateway = format!(
        "{}/v1/device",
        business
            .base
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1)
    );
    let server = DataServer {
        gateway,
        server_id: business.server.clone(),
        key_fingerprint: fingerprint,
    };
    let payload: Arc<Vec<u8>> = Arc::new((0..args.bytes).map(|i| (i % 251) as u8).collect());
    let setup = Instant::now();
    let mut phones = Vec::with_capacity(args.devices);
    for i in 0..args.devices {
        let sdk = Sdk::open(
            Arc::new(MemoryStorage::new()),
            SdkConfig {
                request_timeout: STEP_TIMEOUT,
                ..SdkConfig::default()
            },
        )?;
        // The first send enrols the headless account and opens the kept channel; the server
        // takes 10 headless enrolments a second after a burst of 100, so later phones wait.
        let mut tries = 0;
        let answer = loop {
            match sdk.send_data(&server, &payload).await {
                Ok((_, answer)) => break answer,
                Err(error) if tries < 50 => {
                    tries += 1;
                    tracing::debug!(%error, "first send refused; trying again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => {
                    return Err(
                        anyhow::Error::new(error).context(format!("phone {i}'s first send"))
                    );
                }
            }
        };
        if answer.status != 200 || answer.body != *payload {
            bail!("the echo DS answered {} with other bytes", answer.status);
        }
        phones.push(sdk);
    }
    if !args.json {
        eprintln!(
            "server {}: {} phones with a headless account in {:.1} s",
            business.server,
            args.devices,
            setup.elapsed().as_secs_f64()
        );
    }
    let phones = Arc::new(phones);
    let server = Arc::new(server);
    let (devices, concurrency) = (args.devices, args.concurrency);
    let through = {
        let (phones, server, payload) = (
            Arc::clone(&phones),
            Arc::clone(&server),
            Arc::clone(&payload),
        );
        phase(
            "send_data through the NS",
            args.concurrency,
            args.seconds,
            args.server_pid,
            move |worker, i| {
                let (phones, server, payload) = (
                    Arc::clone(&phones),
                    Arc::clone(&server),
                    Arc::clone(&payload),
                );
                // Every phone takes its turn, so each account stays within its rate limit.
                let turn = usize::try_from(i).unwrap_or(0).wrapping_mul(concurrency);
                async move {
                    let t0 = Instant::now();
                    let sdk = phones
                        .get(worker.wrapping_add(turn) % devices)
                        .context("no such phone")?;
                    let (_, answer) = sdk.send_data(&server, &payload).await?;
                    if answer.status != 200 || answer.body.len() != payload.len() {
                        bail!(
                            "the DS answered {} ({} bytes)",
                            answer.status,
                            answer.body.len()
                        );
                    }
                    Ok(t0.elapsed())
                }
            },
        )
        .await?
    };
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let mut direct = {
        let (http, payload, url) = (http.clone(), Arc::clone(&payload), Arc::new(ds_url));
        phase(
            "the same DS, direct (ceiling)",
            args.concurrency,
            args.seconds,
            None,
            move |_, _| {
                let (http, payload, url) = (http.clone(), Arc::clone(&payload), Arc::clone(&url));
                async move {
                    let t0 = Instant::now();
                    let answer = http
                        .post(url.as_str())
                        .header("content-type", "application/octet-stream")
                        .body(payload.to_vec())
                        .send()
                        .await?;
                    if answer.status() != reqwest::StatusCode::OK {
                        bail!("the DS answered {}", answer.status());
                    }
                    let body = answer.bytes().await?;
                    if body.len() != payload.len() {
                        bail!("the DS echoed {} bytes", body.len());
                    }
                    Ok(t0.elapsed())
                }
            },
        )
        .await?
    };
    direct.cpu = None;
    let title = format!(
        "bench data on {}: {} phones, {} bytes each way; through the NS / direct = {:.2}",
        business.base,
        args.devices,
        args.bytes,
        through.per_sec / direct.per_sec.max(f64::MIN_POSITIVE)
    );
    print(&title, &[through, direct], args.json)
}
