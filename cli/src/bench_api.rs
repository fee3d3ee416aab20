//! `countersign bench api` and `bench replay`: the business API under load and read-model
//! rebuilds, each with a baseline measured in the same run so a noisy machine shows as a
//! ratio rather than a wrong number.
//!
//! - `api` starts the real server (the code of `serve`) on the configured database, creates a
//!   server and an API key over HTTP, then runs `--connections` concurrent HTTP/1.1 clients in
//!   the same process: session creations (`PUT …/session`, the nonce in `X-Nonce`) for
//!   `--seconds`, then status reads (`GET …/session`, `X-Nonce`) of those sessions for
//!   `--seconds`, as an integrator calls them (docs/api.md). Baseline: the bare primary-key
//!   lookup of a session row through the same pool, from as many tasks.
//! - `replay` fills an empty log with `--events` realistic events (servers, users, sessions
//!   through their whole life), projects them incrementally, dumps the read models, rebuilds
//!   them from position 0 and checks the dump is identical; it reports the rebuild rate.
//!   Baseline: reading `$all` alone.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use countersign_commands::SystemClock;
use countersign_domain::server::{ServerCreated, ServerEvent, ServerSettings};
use countersign_domain::session::{
    LogoutReason, SessionEvent, SessionLoggedIn, SessionLoggedOut, SessionOpened, SessionScanned,
};
use countersign_domain::user::{UserAttributeSet, UserEvent, UserRegistered};
use countersign_domain::{
    AccountId, DataKey, DomainEvent, Hsid, ServerId, SessionRef, Timestamp, UserDigestKey,
    UserDigestScheme, UserRef, Userid,
};
use countersign_eventstore::{ExpectedVersion, Metadata, NewEvent, SharedStore};
use countersign_projections::ReadModels;
use hdrhistogram::Histogram;
use serde::Serialize;
use uuid::Uuid;

use crate::Settings;
use crate::serve::{ServeArgs, start};

#[derive(Debug, clap::Args)]
pub struct ApiArgs {
    /// Concurrent HTTP connections.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Seconds per phase.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ReplayBenchArgs {
    /// Events to generate (the log must be empty).
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Phase {
    requests: u64,
    errors: u64,
    seconds: f64,
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

#[derive(Debug, Serialize)]
struct ApiReport {
    backend: String,
    connections: usize,
    session_creations: Phase,
    session_status_reads: Phase,
    baseline_pk_lookups_per_sec: f64,
}

fn backend(settings: &Settings) -> &'static str {
    if settings.database_url.starts_with("postgres") {
        "postgresql"
    } else {
        "sqlite"
    }
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(hex::encode(buf))
}

/// The real server (the code of `serve`) on the configured database, with one virtual server
/// (second factor `none`) and an API key made over HTTP: what the API benches run against.
pub(crate) struct BenchServer {
    pub running: crate::serve::Running,
    pub base: String,
    pub http: reqwest::Client,
    pub server: String,
    pub token: Arc<str>,
    _dir: tempfile::TempDir,
}

impl BenchServer {
    pub(crate) async fn start(
        settings: &Settings,
        pool: usize,
        tune: impl FnOnce(&mut ServeArgs),
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let admin_file = dir.path().join("admin.key");
        // Made as `serve` would: a key file only its owner reads.
        crate::config::create_secret_file(&admin_file)?;
        let admin_key = std::fs::read_to_string(&admin_file)?.trim().to_owned();
        let mut serve_args = ServeArgs::local(admin_file);
        serve_args.gateway_url = Some("wss://gateway.bench/v1/device".into());
        serve_args.checkpoint_interval_ms = 1_000;
        tune(&mut serve_args);
        let running = start(settings, &serve_args, Arc::new(SystemClock)).await?;
        let base = format!("http://{}", running.addr);
        let business =
            crate::bench::device::Business::create_with_policy(&base, &admin_key, pool, "none")
                .await?;
        Ok(Self {
            running,
            base: business.base,
            http: business.http,
            server: business.server,
            token: business.token,
            _dir: dir,
        })
    }
}

/// Runs `work` from `connections` tasks for `seconds`; each call answers whether it succeeded.
async fn phase<F, Fut>(connections: usize, seconds: f64, work: F) -> Phase
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let work = Arc::new(work);
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(connections);
    for worker in 0..connections {
        let work = Arc::clone(&work);
        let stop = Arc::clone(&stop);
        let errors = Arc::clone(&errors);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable_histogram()));
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                if work(worker, i).await {
                    let _ = latencies.record(t.elapsed().as_micros().max(1) as u64);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
            latencies
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Histogram::<u64>::new(3).unwrap_or_else(|_| unreachable_histogram());
    for task in tasks {
        if let Ok(h) = task.await {
            let _ = all.add(&h);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    Phase {
        requests: all.len(),
        errors: errors.load(Ordering::Relaxed),
        seconds: elapsed,
        per_sec: all.len() as f64 / elapsed,
        p50_ms: all.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: all.value_at_quantile(0.99) as f64 / 1000.0,
    }
}

#[allow(clippy::expect_used)] // three significant digits is always a valid histogram
fn unreachable_histogram() -> Histogram<u64> {
    Histogram::new(3).expect("valid histogram")
}

pub async fn api(settings: &Settings, args: ApiArgs) -> anyhow::Result<()> {
    if args.connections == 0 {
        bail!("--connections must be positive");
    }
    let bench = BenchServer::start(settings, args.connections, |_| {}).await?;
    let (base, http, server, token) = (
        bench.base.clone(),
        bench.http.clone(),
        bench.server.clone(),
        bench.token.clone(),
    );
    let prefix: Arc<str> = random_hex(8)?.into();
    // The header form: the nonce in `X-Nonce`, never in the path (docs/api.md).
    let session_url: Arc<str> = format!("{base}/v1/servers/{server}/session").into();

    // Each worker creates sessions 0, 1, 2… of its own, then re-reads those it created.
    let created: Arc<Vec<AtomicU64>> =
        Arc::new((0..args.connections).map(|_| AtomicU64::new(0)).collect());
    let creations = {
        let (http, token, prefix, url) = (
            http.clone(),
            token.clone(),
            prefix.clone(),
            session_url.clone(),
        );
        let created = Arc::clone(&created);
        phase(args.connections, args.seconds, move |worker, _| {
            let n = created.get(worker).map_or(0, |c| c.load(Ordering::Relaxed));
            let request = http
                .put(&*url)
                .header("X-Nonce", format!("{prefix}{worker:08x}{n:016x}"))
                .bearer_auth(&*token)
                .send();
            let created = Arc::clone(&created);
            async move {
                let ok =
                    matches!(request.await, Ok(r) if r.status() == reqwest::StatusCode::CREATED);
                if ok && let Some(c) = created.get(worker) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                ok
            }
        })
        .await
    };
    let reads =
        {
            let (http, token, prefix, url) = (
                http.clone(),
                token.clone(),
                prefix.clone(),
                session_url.clone(),
            );
            let created = Arc::clone(&created);
            phase(args.connections, args.seconds, move |worker, i| {
            let n = created.get(worker).map_or(1, |c| c.load(Ordering::Relaxed).max(1));
            let request = http
                .get(&*url)
                .header("X-Nonce", format!("{prefix}{worker:08x}{:016x}", i % n))
                .bearer_auth(&*token)
                .send();
            async move { matches!(request.await, Ok(r) if r.status() == reqwest::StatusCode::OK) }
        })
        .await
        };
    let baseline = baseline_lookups(&bench.running, args.connections, args.seconds).await?;
    bench.running.stop().await?;
    let report = ApiReport {
        backend: backend(settings).into(),
        connections: args.connections,
        session_creations: creations,
        session_status_reads: reads,
        baseline_pk_lookups_per_sec: baseline,
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        writeln!(
            out,
            "bench api on {} with {} connections",
            report.backend, report.connections
        )?;
        for (name, p) in [
            ("session creations (PUT)", &report.session_creations),
            ("session status reads (GET)", &report.session_status_reads),
        ] {
            writeln!(
                out,
                "  {name:<28} {:>9.0}/s  p50 {:>6.2} ms  p99 {:>6.2} ms  ({} ok, {} errors)",
                p.per_sec, p.p50_ms, p.p99_ms, p.requests, p.errors
            )?;
        }
        writeln!(
            out,
            "  baseline: bare session-row lookups through the same pool {:>9.0}/s",
            report.baseline_pk_lookups_per_sec
        )?;
    }
    Ok(())
}

/// The database's share of a status read: the read model's primary-key lookup, without HTTP.
async fn baseline_lookups(
    running: &crate::serve::Running,
    connections: usize,
    seconds: f64,
) -> anyhow::Result<f64> {
    let reads = running.state.reads().clone();
    let server = ServerId::from_bytes([0; 16]);
    let phase = phase(connections, seconds, move |_, i| {
        let reads = reads.clone();
        async move {
            let mut hsid = [0u8; 32];
            hsid[..8].copy_from_slice(&i.to_be_bytes());
            reads
                .session_state(server, Hsid::from_bytes(hsid))
                .await
                .is_ok()
        }
    })
    .await;
    Ok(phase.per_sec)
}

#[derive(Debug, Serialize)]
struct ReplayReport {
    backend: String,
    events: u64,
    generate_seconds: f64,
    incremental_seconds: f64,
    replay_seconds: f64,
    replay_events_per_sec: f64,
    baseline_read_all_events_per_sec: f64,
    identical: bool,
}

#[allow(clippy::disallowed_methods)] // the bench is an edge: it makes its own ids
fn event<E: DomainEvent>(e: &E) -> anyhow::Result<NewEvent> {
    Ok(NewEvent::from_domain(
        Uuid::now_v7(),
        e,
        Metadata::default(),
    )?)
}

/// Appends about `target` events of realistic flows: per server 50 users; per user an
/// attribute and a few sessions opened, scanned, logged in and out (or left to expire).
pub async fn synthetic_log(store: &SharedStore, target: u64) -> anyhow::Result<u64> {
    let key = DataKey::from_bytes([7; 32]);
    // Synthetic servers have no vault entry; their user digests use a fixed key instead.
    let digest_key = UserDigestKey::hmac_sha256([8; 32]);
    let now = Timestamp(1_790_000_000_000);
    let mut written = 0u64;
    let mut n = 0u64;
    let mut batch: Vec<(String, Vec<NewEvent>)> = Vec::new();
    while written < target {
        let server = ServerId::from_bytes(u128::from(n / 50 + 1).to_be_bytes());
        if n.is_multiple_of(50) {
            let public = p256::SecretKey::from_slice(&[1; 32])?
                .public_key()
                .to_sec1_bytes()
                .to_vec();
            let created = ServerEvent::Created(ServerCreated {
                server_id: server,
                key_thumbprint: [3; 32],
                public_key: public,
                settings: ServerSettings::defaults(format!("Server {}", n / 50)),
                user_digest: UserDigestScheme::HmacSha256,
            });
            batch.push((server.stream(), vec![event(&created)?]));
        }
        let userid = Userid::new(format!("user{n}@example.org"))?;
        let user = UserRef::new(server, &digest_key, &userid);
        let stream = user.stream();
        let seal = |field: &str, value: &str| {
            key.seal(
                [(n % 251) as u8; 12],
                &countersign_domain::seal::aad(&stream, field),
                value.as_bytes(),
            )
        };
        batch.push((
            stream.clone(),
            vec![
                event(&UserEvent::Registered(UserRegistered {
                    user,
                    userid: seal("userid", userid.as_str())?,
                }))?,
                event(&UserEvent::AttributeSet(UserAttributeSet {
                    name: "name".into(),
                    value: seal("attribute/name", "A Name")?,
                }))?,
            ],
        ));
        for s in 0..3u64 {
            let mut hsid = [0u8; 32];
            hsid[..8].copy_from_slice(&n.to_be_bytes());
            hsid[8..16].copy_from_slice(&s.to_be_bytes());
            let session = SessionRef::new(server, Hsid::from_bytes(hsid));
            let mut events = vec![event(&SessionEvent::Opened(SessionOpened {
                session,
                ping_time_secs: 0,
                timeout_secs: 300,
                expires_at: now.plus_secs(300),
                app_login: false,
                user: None,
                announce_info: Some("Log in".into()),
                session_info: None,
                push_to: Vec::new(),
            }))?];
            if s < 2 {
                events.push(event(&SessionEvent::Scanned(SessionScanned {
                    scanned_at: now,
                }))?);
                events.push(event(&SessionEvent::LoggedIn(SessionLoggedIn {
                    account_id: AccountId::from_bytes([1; 16]),
                    user: user.digest,
                    continuous: false,
                    ping_deadline: None,
                }))?);
            }
            if s == 0 {
                events.push(event(&SessionEvent::LoggedOut(SessionLoggedOut {
                    reason: LogoutReason::Server,
                    logged_out_at: now,
                }))?);
            }
            batch.push((session.stream(), events));
        }
        n += 1;
        if batch.len() >= 256 {
            written += flush(store, &mut batch).await?;
        }
    }
    written += flush(store, &mut batch).await?;
    Ok(written)
}

async fn flush(
    store: &SharedStore,
    batch: &mut Vec<(String, Vec<NewEvent>)>,
) -> anyhow::Result<u64> {
    let mut appends = Vec::new();
    for (stream, events) in batch.drain(..) {
        let store = store.clone();
        appends.push(tokio::spawn(async move {
            let count = events.len() as u64;
            store
                .append(&stream, ExpectedVersion::Any, events)
                .await
                .map(|_| count)
        }));
    }
    let mut written = 0;
    for append in appends {
        written += append.await??;
    }
    Ok(written)
}

pub async fn replay(settings: &Settings, args: ReplayBenchArgs) -> anyhow::Result<()> {
    let opened = crate::connect(settings).await?;
    if opened.events.last_position().await?.is_some() {
        bail!(
            "bench replay generates its own log: give it a scratch database with an empty event log"
        );
    }
    let store = opened.events.clone();
    let t = Instant::now();
    let events = synthetic_log(&store, args.events).await?;
    let generate_seconds = t.elapsed().as_secs_f64();
    let reads = ReadModels::new(opened.database.clone());
    let t = Instant::now();
    reads.catch_up(&store).await?;
    let incremental_seconds = t.elapsed().as_secs_f64();
    let incremental = reads.dump().await?;
    let t = Instant::now();
    let replayed = reads.replay(&store, None, &mut |_, _| {}).await?;
    let replay_seconds = t.elapsed().as_secs_f64();
    let identical = reads.dump().await? == incremental;
    let t = Instant::now();
    let mut from = 0;
    loop {
        let page = store.read_all(from, 10_000).await?;
        let Some(last) = page.last() else { break };
        from = last.position + 1;
    }
    let baseline = from as f64 / t.elapsed().as_secs_f64();
    let report = ReplayReport {
        backend: backend(settings).into(),
        events,
        generate_seconds,
        incremental_seconds,
        replay_seconds,
        replay_events_per_sec: replayed as f64 / replay_seconds,
        baseline_read_all_events_per_sec: baseline,
        identical,
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        writeln!(
            out,
            "bench replay on {}: {} events; incremental {:.2} s; rebuild {:.2} s = {:.0} events/s \
             (reading $all alone: {:.0} events/s); rebuilt {} incremental",
            report.backend,
            report.events,
            report.incremental_seconds,
            report.replay_seconds,
            report.replay_events_per_sec,
            report.baseline_read_all_events_per_sec,
            if identical { "equals" } else { "DIFFERS FROM" }
        )?;
    }
    if !identical {
        bail!("the rebuilt read models differ from the incremental ones");
    }
    Ok(())
}
