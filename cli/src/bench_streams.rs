//! `countersign bench streams`: what open event streams cost the writers. Starts the real
//! server (the code of `serve`) on the configured database with the stream caps raised to fit
//! `--streams`, times `--writes` user writes one after another with no stream open (the floor,
//! same run, same database), opens `--streams` tenant feeds (`GET …/events/stream`) of one API
//! key, times the same writes again while every stream receives them, and checks that every
//! stream got every event. Also reports the log reads made for the streams (the shared reader
//! and backlog reads, from `/metrics`) per write.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::Settings;
use crate::bench_api::BenchServer;

#[derive(Debug, clap::Args)]
pub struct StreamsArgs {
    /// Tenant event streams held open by one API key.
    #[arg(long, default_value_t = 2_000)]
    pub streams: usize,
    /// User writes timed in each phase, one after another.
    #[arg(long, default_value_t = 200)]
    pub writes: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Writes {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    backend: String,
    streams: usize,
    writes: u64,
    without_streams: Writes,
    with_streams: Writes,
    p50_ratio: f64,
    events_delivered: u64,
    events_expected: u64,
    shared_reads_per_write: f64,
    catch_up_reads_during_writes: u64,
}

fn summary(histogram: &Histogram<u64>) -> Writes {
    let ms = |us: u64| us as f64 / 1000.0;
    Writes {
        p50_ms: ms(histogram.value_at_quantile(0.5)),
        p99_ms: ms(histogram.value_at_quantile(0.99)),
        max_ms: ms(histogram.max()),
    }
}

/// `countersign_stream_log_reads_total{reader=…}` from the server's `/metrics`.
async fn log_reads(bench: &BenchServer, reader: &str) -> anyhow::Result<u64> {
    let text = bench
        .http
        .get(format!("{}/metrics", bench.base))
        .send()
        .await?
        .text()
        .await?;
    let prefix = format!("countersign_stream_log_reads_total{{reader=\"{reader}\"}} ");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

/// `writes` user writes one after another, named `{prefix}{n}`; their latencies.
async fn write_users(
    bench: &BenchServer,
    prefix: &str,
    writes: u64,
) -> anyhow::Result<Histogram<u64>> {
    let mut histogram = Histogram::<u64>::new(3)?;
    for n in 0..writes {
        let started = Instant::now();
        bench
            .http
            .put(format!(
                "{}/v1/servers/{}/users/{prefix}{n}",
                bench.base, bench.server
            ))
            .bearer_auth(&*bench.token)
            .json(&serde_json::json!({"attributes": {}}))
            .send()
            .await?
            .error_for_status()?;
        histogram.record(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX))?;
    }
    Ok(histogram)
}

pub async fn streams(settings: &Settings, args: StreamsArgs) -> anyhow::Result<()> {
    if args.streams == 0 || args.writes == 0 {
        bail!("--streams and --writes must be positive");
    }
    let cap = args.streams + 16;
    let bench = BenchServer::start(settings, 64, |serve| {
        serve.streams.max_streams_per_key = cap;
        serve.streams.max_streams_per_server = cap;
        serve.streams.max_streams = cap;
        serve.limits.max_connections_per_address = 0;
    })
    .await?;
    let floor = write_users(&bench, "floor-", args.writes).await?;

    // The streams, each counting the user registrations it receives.
    let head = bench
        .running
        .state
        .store()
        .last_position()
        .await?
        .context("the log is empty")?;
    let received = Arc::new(AtomicU64::new(0));
    let arrived = Arc::new(tokio::sync::Notify::new());
    let streamer = reqwest::Client::builder().build()?;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.streams {
        let response = streamer
            .get(format!(
                "{}/v1/servers/{}/events/stream?after={head}",
                bench.base, bench.server
            ))
            .bearer_auth(&*bench.token)
            .send()
            .await?
            .error_for_status()?;
        let (received, arrived) = (received.clone(), arrived.clone());
        tasks.spawn(async move {
            let mut body = response.bytes_stream();
            while let Some(Ok(chunk)) = body.next().await {
                let text = String::from_utf8_lossy(&chunk);
                let n = text.matches("\"type\":\"user.registered\"").count();
                received.fetch_add(n as u64, Ordering::Relaxed);
                arrived.notify_one();
            }
        });
    }
    let shared = log_reads(&bench, "shared").await?;
    let catch_up = log_reads(&bench, "catch_up").await?;
    let loaded = write_users(&bench, "loaded-", args.writes).await?;
    let expected = args.writes * args.streams as u64;
    // Woken by each chunk a stream receives; at most a minute in all.
    let _ = tokio::time::timeout(Duration::from_secs(60), async {
        while received.load(Ordering::Relaxed) < expected {
            arrived.notified().await;
        }
    })
    .await;
    let delivered = received.load(Ordering::Relaxed);
    let shared_reads = log_reads(&bench, "shared").await?.saturating_sub(shared);
    let catch_up_reads = log_reads(&bench, "catch_up")
        .await?
        .saturating_sub(catch_up);
    tasks.abort_all();
    let report = Report {
        backend: settings.database_display(),
        streams: args.streams,
        writes: args.writes,
        p50_ratio: loaded.value_at_quantile(0.5) as f64
            / floor.value_at_quantile(0.5).max(1) as f64,
        without_streams: summary(&floor),
        with_streams: summary(&loaded),
        events_delivered: delivered,
        events_expected: expected,
        shared_reads_per_write: shared_reads as f64 / args.writes as f64,
        catch_up_reads_during_writes: catch_up_reads,
    };
    let BenchServer { running, .. } = bench;
    running.stop().await?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "bench streams on {}: {} writes, then {} writes under {} open event streams of one key",
        report.backend, report.writes, report.writes, report.streams
    )?;
    for (name, w) in [
        ("without streams (floor)", &report.without_streams),
        ("with streams", &report.with_streams),
    ] {
        writeln!(
            out,
            "  {name:<26} p50 {:7.2} ms  p99 {:7.2} ms  max {:7.2} ms",
            w.p50_ms, w.p99_ms, w.max_ms
        )?;
    }
    writeln!(
        out,
        "  p50 with / without: {:.2}x; events delivered {} of {}; log reads for streams: {:.2} shared per write, {} backlog reads",
        report.p50_ratio,
        report.events_delivered,
        report.events_expected,
        report.shared_reads_per_write,
        report.catch_up_reads_during_writes
    )?;
    Ok(())
}
