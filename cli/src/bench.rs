//! `countersign bench`: measures the platform in release builds. Speed is reported, never
//! asserted; each run also measures a baseline on the same database (a raw multi-row INSERT
//! of the same rows) so numbers from a noisy machine come with a ratio to what the database
//! itself does at that moment.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use countersign_eventstore::{ExpectedVersion, Metadata, NewEvent, SharedStore};
use hdrhistogram::Histogram;
use serde::Serialize;
use uuid::Uuid;

use crate::Settings;

/// AppLogin and the secure channel end to end (uses the transactions bench's phones).
#[path = "bench_app.rs"]
mod app;
/// The device benches (a module of this one so the crate root stays as it is).
#[path = "bench_device.rs"]
pub(crate) mod device;
/// The OpenID Connect provider: code exchanges, userinfo, the login page (uses the
/// transactions bench's phones).
#[path = "bench_oidc.rs"]
mod oidc;
/// Scaled mode: the outbox relay and the Kafka-fed projector.
#[path = "bench_scale.rs"]
mod scale;
/// Signed transactions end to end (uses the device benches' business side).
#[path = "bench_tx.rs"]
mod transactions;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Debug, clap::Subcommand)]
pub enum BenchWhat {
    /// Append throughput and latency by batch size × concurrent writers, plus `$all` reads.
    Append(AppendArgs),
    /// Audit tree: leaves appended per second and inclusion-proof latency at given sizes.
    /// Needs a scratch database whose event log is empty (it fills the tree with synthetic
    /// leaves).
    Audit(AuditArgs),
    /// The business API under load: session creations and status reads over HTTP.
    Api(crate::bench_api::ApiArgs),
    /// Read-model rebuild rate on a generated log (needs a scratch database with an empty
    /// log); also checks the rebuild equals incremental processing.
    Replay(crate::bench_api::ReplayBenchArgs),
    /// End-to-end QR logins against a running server, virtual devices in this process.
    Logins(device::LoginsArgs),
    /// Idle device connections held against a running server: its memory per connection.
    Connections(device::ConnectionsArgs),
    /// Signed transactions end to end against a running server (PIN at the SFS, device
    /// signature, business read), virtual phones in this process.
    Transactions(transactions::TransactionsArgs),
    /// AppLogins with a PIN against QR logins with a PIN in the same run, against a running
    /// server, virtual phones in this process.
    AppLogins(app::AppLoginsArgs),
    /// Secure-channel round trips through the NS to an echo Data Service in this process,
    /// against the same DS hit directly (the ceiling), against a running server.
    Data(app::DataArgs),
    /// The second-factor server's hot paths: server-side OPAQUE logins, attestation sign +
    /// verify (one thread and every core) against bare ES256. Needs no database.
    Sfs(SfsArgs),
    /// What open event streams cost the writers: user writes with none open (the floor) and
    /// under `--streams` tenant feeds of one key, with every event checked delivered.
    Streams(crate::bench_streams::StreamsArgs),
    /// Scaled mode: outbox relay throughput into Kafka (against a bare producer), then the
    /// append-to-projection lag through relay, broker and Kafka-fed projector at a steady
    /// rate. Needs a scratch PostgreSQL database with an empty log, and a broker.
    Scale(scale::ScaleArgs),
    /// The Message Center: messages/s to an FCM stand-in (with its bare HTTP rate as the
    /// ceiling), and the drain of a backlog queued during a stand-in outage, none lost.
    Push(crate::bench_push::PushBenchArgs),
    /// The OpenID Connect provider against a running server: SSO authorizations, code →
    /// token exchanges and userinfo against `/healthz` (the ceiling), and the hosted login
    /// page's first byte under many clients; one virtual phone in this process.
    Oidc(oidc::OidcArgs),
}

#[derive(Debug, clap::Args)]
pub struct SfsArgs {
    /// OPAQUE logins timed.
    #[arg(long, default_value_t = 2_000)]
    pub logins: u32,
    /// Attestations signed and verified (and bare ES256 rounds).
    #[arg(long, default_value_t = 5_000)]
    pub attestations: u32,
}

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// Tree sizes at which proof latency is measured (the tree grows to the largest).
    #[arg(long, value_delimiter = ',', default_value = "1000000")]
    pub sizes: Vec<u64>,
    /// Inclusion proofs timed at each size.
    #[arg(long, default_value_t = 10_000)]
    pub proofs: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct AppendArgs {
    /// Events per append (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    pub batch: Vec<usize>,
    /// Concurrent writers (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    pub writers: Vec<usize>,
    /// Seconds per cell.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Payload bytes per event (a typical countersign event is 100–300 bytes of CBOR).
    #[arg(long, default_value_t = 200)]
    pub payload_bytes: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Cell {
    batch: usize,
    writers: usize,
    events: u64,
    seconds: f64,
    events_per_sec: f64,
    appends_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    backend: String,
    cells: Vec<Cell>,
    baseline_raw_insert_events_per_sec: f64,
    read_all_events: u64,
    read_all_events_per_sec: f64,
}

pub async fn run(settings: &Settings, args: BenchArgs) -> anyhow::Result<()> {
    match args.what {
        BenchWhat::Append(args) => append(settings, args).await,
        BenchWhat::Audit(args) => audit(settings, args).await,
        BenchWhat::Api(args) => crate::bench_api::api(settings, args).await,
        BenchWhat::Replay(args) => crate::bench_api::replay(settings, args).await,
        BenchWhat::Logins(args) => device::logins(args).await,
        BenchWhat::Connections(args) => device::connections(args).await,
        BenchWhat::Transactions(args) => transactions::transactions(args).await,
        BenchWhat::AppLogins(args) => app::app_logins(args).await,
        BenchWhat::Data(args) => app::data(args).await,
        BenchWhat::Sfs(args) => sfs(&args),
        BenchWhat::Scale(args) => scale::scale(settings, args).await,
        BenchWhat::Streams(args) => crate::bench_streams::streams(settings, args).await,
        BenchWhat::Push(args) => crate::bench_push::push(settings, args).await,
        BenchWhat::Oidc(args) => oidc::oidc(args).await,
    }
}

fn sfs(args: &SfsArgs) -> anyhow::Result<()> {
    let opaque = countersign_sfs::bench::opaque_logins(args.logins).map_err(anyhow::Error::msg)?;
    let attest =
        countersign_sfs::bench::attestations(args.attestations).map_err(anyhow::Error::msg)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "server-side OPAQUE logins: {:.0}/s on one thread (first step {:.0}/s, second {:.0}/s; {} logins)",
        opaque.logins, opaque.starts, opaque.finishes, args.logins
    )?;
    writeln!(
        out,
        "attestation sign + verify: {:.0}/s on one thread, {:.0}/s on {} threads; bare ES256 sign + verify {:.0}/s on one thread ({:.0} % of it; {} rounds)",
        attest.one_thread,
        attest.all_cores,
        attest.threads,
        attest.bare_es256,
        100.0 * attest.one_thread / attest.bare_es256,
        args.attestations
    )?;
    Ok(())
}

pub(crate) fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1_000.0
}

async fn append(settings: &Settings, args: AppendArgs) -> anyhow::Result<()> {
    if args.batch.iter().chain(&args.writers).any(|&n| n == 0) {
        anyhow::bail!("--batch and --writers take positive numbers");
    }
    if !(args.seconds > 0.0 && args.seconds <= 600.0) {
        anyhow::bail!("--seconds must be between 0 and 600");
    }
    let store = crate::connect(settings).await?.events;
    let run_id = run_id()?;
    let mut cells = Vec::new();
    for &batch in &args.batch {
        for &writers in &args.writers {
            let cell = append_cell(&store, &run_id, batch, writers, &args).await?;
            if !args.json {
                eprintln!(
                    "batch {batch:>4} × writers {writers:>3}: {:>9.0} events/s",
                    cell.events_per_sec
                );
            }
            cells.push(cell);
        }
    }
    let baseline = baseline_insert(settings, args.seconds, args.payload_bytes).await?;
    let (read_events, read_rate) = read_all(&store).await?;
    let report = Report {
        backend: settings.database_display(),
        cells,
        baseline_raw_insert_events_per_sec: baseline,
        read_all_events: read_events,
        read_all_events_per_sec: read_rate,
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(());
    }
    writeln!(out, "event store append benchmark on {}", report.backend)?;
    writeln!(
        out,
        "| batch | writers | events/s | appends/s | p50 ms | p99 ms | vs raw INSERT |"
    )?;
    writeln!(
        out,
        "|------:|--------:|---------:|----------:|-------:|-------:|--------------:|"
    )?;
    for c in &report.cells {
        writeln!(
            out,
            "| {:>5} | {:>7} | {:>8.0} | {:>9.0} | {:>6.2} | {:>6.2} | {:>12.0}% |",
            c.batch,
            c.writers,
            c.events_per_sec,
            c.appends_per_sec,
            c.p50_ms,
            c.p99_ms,
            100.0 * c.events_per_sec / report.baseline_raw_insert_events_per_sec.max(1.0)
        )?;
    }
    writeln!(
        out,
        "baseline: raw multi-row INSERT (100 rows/statement, 1 connection): {:.0} events/s",
        report.baseline_raw_insert_events_per_sec
    )?;
    writeln!(
        out,
        "$all read: {} events at {:.0} events/s",
        report.read_all_events, report.read_all_events_per_sec
    )?;
    Ok(())
}

/// A prefix for this run's streams, so runs on one database never collide.
fn run_id() -> anyhow::Result<String> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(hex::encode(bytes))
}

#[allow(clippy::disallowed_methods)] // the bench is an edge: it makes its own ids
pub(crate) fn new_event(payload: &[u8]) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "bench.appended".into(),
        schema_version: 1,
        payload: payload.to_vec(),
        metadata: Metadata {
            actor: Some("bench".into()),
            ..Metadata::default()
        },
    }
}

async fn append_cell(
    store: &SharedStore,
    run_id: &str,
    batch: usize,
    writers: usize,
    args: &AppendArgs,
) -> anyhow::Result<Cell> {
    let payload: Arc<[u8]> = (0..args.payload_bytes).map(|i| (i % 251) as u8).collect();
    let duration = Duration::from_secs_f64(args.seconds);
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        let payload = payload.clone();
        let stream = format!("bench-{run_id}-b{batch}-w{writers}-{w}");
        tasks.push(tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new(3)?;
            let mut expected = ExpectedVersion::NoStream;
            let mut events = 0u64;
            while Instant::now() < deadline {
                let batch_events = (0..batch).map(|_| new_event(&payload)).collect();
                let t = Instant::now();
                let result = store.append(&stream, expected, batch_events).await?;
                histogram.record(t.elapsed().as_micros() as u64)?;
                expected = ExpectedVersion::Exact(result.next_expected_version);
                events += batch as u64;
            }
            anyhow::Ok((events, histogram))
        }));
    }
    let mut histogram = Histogram::<u64>::new(3)?;
    let mut events = 0;
    for task in tasks {
        let (n, h) = task.await.context("a bench writer died")??;
        events += n;
        histogram.add(h)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Cell {
        batch,
        writers,
        events,
        seconds,
        events_per_sec: events as f64 / seconds,
        appends_per_sec: histogram.len() as f64 / seconds,
        p50_ms: ms(&histogram, 0.5),
        p99_ms: ms(&histogram, 0.99),
    })
}

/// What the database does with the same rows and no event-store logic: 100-row INSERTs into
/// a table shaped like `es_events`, one statement per transaction, from one connection.
async fn baseline_insert(
    settings: &Settings,
    seconds: f64,
    payload_bytes: usize,
) -> anyhow::Result<f64> {
    use sqlx::Connection as _;
    let url = settings.database_url.as_str();
    let payload: Vec<u8> = (0..payload_bytes).map(|i| (i % 251) as u8).collect();
    let metadata = vec![
        0xa1u8, 0x65, b'a', b'c', b't', b'o', b'r', 0x65, b'b', b'e', b'n', b'c', b'h',
    ];
    let duration = Duration::from_secs_f64(seconds);
    if url.starts_with("postgres") {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        baseline_on!(
            conn,
            sqlx::Postgres,
            "bytea",
            "uuid",
            payload,
            metadata,
            duration
        )
    } else {
        let mut conn = sqlx::SqliteConnection::connect(url).await?;
        sqlx::query("PRAGMA synchronous = FULL")
            .execute(&mut conn)
            .await?;
        baseline_on!(
            conn,
            sqlx::Sqlite,
            "blob",
            "blob",
            payload,
            metadata,
            duration
        )
    }
}

/// The baseline's body, the same SQL on both databases but for two column types.
macro_rules! baseline_on {
    ($conn:ident, $db:ty, $bytes:literal, $uuid:literal, $payload:ident, $metadata:ident, $duration:ident) => {{
        sqlx::query("DROP TABLE IF EXISTS bench_baseline")
            .execute(&mut $conn)
            .await?;
        sqlx::query(concat!(
            "CREATE TABLE bench_baseline (position bigint PRIMARY KEY, stream text NOT NULL, ",
            "version bigint NOT NULL, event_id ",
            $uuid,
            " NOT NULL UNIQUE, event_type text NOT NULL, ",
            "schema_version integer NOT NULL, payload ",
            $bytes,
            " NOT NULL, metadata ",
            $bytes,
            " NOT NULL, server_id text, recorded_at bigint NOT NULL, UNIQUE (stream, version))"
        ))
        .execute(&mut $conn)
        .await?;
        let started = Instant::now();
        let mut position = 0i64;
        while started.elapsed() < $duration {
            let mut q = sqlx::QueryBuilder::<$db>::new(
                "INSERT INTO bench_baseline (position, stream, version, event_id, event_type, \
                 schema_version, payload, metadata, server_id, recorded_at) ",
            );
            q.push_values(0..100i64, |mut row, i| {
                row.push_bind(position + i)
                    .push_bind("baseline")
                    .push_bind(position + i)
                    .push_bind(new_event(&[]).event_id)
                    .push_bind("bench.appended")
                    .push_bind(1i32)
                    .push_bind($payload.clone())
                    .push_bind($metadata.clone())
                    .push_bind(None::<String>)
                    .push_bind(0i64);
            });
            q.build().execute(&mut $conn).await?;
            position += 100;
        }
        let rate = position as f64 / started.elapsed().as_secs_f64();
        sqlx::query("DROP TABLE bench_baseline")
            .execute(&mut $conn)
            .await?;
        Ok(rate)
    }};
}
use baseline_on;

/// Reads `$all` from position 0 to the head, in pages, as a projection catching up does.
async fn read_all(store: &SharedStore) -> anyhow::Result<(u64, f64)> {
    let started = Instant::now();
    let mut from = 0;
    let mut count = 0u64;
    loop {
        let page = store.read_all(from, 5_000).await?;
        let Some(last) = page.last() else { break };
        from = last.position + 1;
        count += page.len() as u64;
    }
    Ok((count, count as f64 / started.elapsed().as_secs_f64()))
}

#[derive(Debug, Serialize)]
struct AuditCell {
    size: u64,
    leaves_per_sec: f64,
    proof_p50_ms: f64,
    proof_p99_ms: f64,
    proof_max_ms: f64,
}

async fn audit(settings: &Settings, args: AuditArgs) -> anyhow::Result<()> {
    use countersign_projections::audit::AuditTree;
    use countersign_protocol::merkle;

    let opened = crate::connect(settings).await?;
    if opened.events.last_position().await?.is_some() {
        anyhow::bail!(
            "bench audit fills the audit tree with synthetic leaves: give it a scratch database with an empty event log"
        );
    }
    let tree = AuditTree::new(opened.database.clone());
    tree.reset().await?;
    let mut frontier = tree.frontier().await?;
    let mut sizes = args.sizes.clone();
    sizes.sort_unstable();
    let mut cells = Vec::new();
    let mut counter = 0u64;
    for &size in &sizes {
        let started = Instant::now();
        let grown_from = frontier.size();
        while frontier.size() < size {
            let n = 5_000.min(size - frontier.size());
            let leaves: Vec<merkle::Hash> = (0..n)
                .map(|_| {
                    counter += 1;
                    merkle::leaf_hash(&counter.to_be_bytes())
                })
                .collect();
            tree.append(&mut frontier, &leaves).await?;
        }
        let leaves_per_sec = (size - grown_from) as f64 / started.elapsed().as_secs_f64();
        // Proofs from a fresh instance: nothing cached yet, as after a restart. Each proof
        // is followed by the cheapest round trip through the same pool and runtime (a
        // one-row lookup), a same-run baseline that tells the machine's own tail apart from
        // the tree's.
        let prover = AuditTree::new(opened.database.clone());
        let mut histogram = Histogram::<u64>::new(3)?;
        let mut bare = Histogram::<u64>::new(3)?;
        let mut rng = size ^ 0x9e37_79b9_7f4a_7c15;
        for _ in 0..args.proofs {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let index = rng % size;
            let t = Instant::now();
            let proof = prover.inclusion_proof(index, size).await?;
            histogram.record(t.elapsed().as_micros() as u64)?;
            std::hint::black_box(proof);
            let t = Instant::now();
            std::hint::black_box(prover.size().await?);
            bare.record(t.elapsed().as_micros() as u64)?;
        }
        if !args.json {
            eprintln!(
                "size {size}: baseline one-row lookup p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
                ms(&bare, 0.5),
                ms(&bare, 0.99),
                bare.max() as f64 / 1_000.0
            );
        }
        let cell = AuditCell {
            size,
            leaves_per_sec,
            proof_p50_ms: ms(&histogram, 0.5),
            proof_p99_ms: ms(&histogram, 0.99),
            proof_max_ms: histogram.max() as f64 / 1_000.0,
        };
        if !args.json {
            eprintln!(
                "size {size}: {leaves_per_sec:.0} leaves/s, proof p99 {:.3} ms",
                cell.proof_p99_ms
            );
        }
        cells.push(cell);
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&cells)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "audit tree benchmark on {}",
        settings.database_display()
    )?;
    writeln!(
        out,
        "| tree size | leaves/s appended | proof p50 ms | proof p99 ms | proof max ms |"
    )?;
    writeln!(
        out,
        "|----------:|------------------:|-------------:|-------------:|-------------:|"
    )?;
    for c in &cells {
        writeln!(
            out,
            "| {:>9} | {:>17.0} | {:>12.3} | {:>12.3} | {:>12.3} |",
            c.size, c.leaves_per_sec, c.proof_p50_ms, c.proof_p99_ms, c.proof_max_ms
        )?;
    }
    Ok(())
}
