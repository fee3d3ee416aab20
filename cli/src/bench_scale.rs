//! `countersign bench scale`: the outbox relay's throughput into the broker, measured against
//! a bare idempotent producer sending the same messages in the same run, then the lag from an
//! acknowledged append to the read models having applied it, through the relay, the broker
//! and the Kafka-fed projector, at a steady append rate.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use countersign_eventstore::ExpectedVersion;
use countersign_projections::ReadModels;
use countersign_scale::{KafkaConfig, KafkaFeed, Relay};
use hdrhistogram::Histogram;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;

use super::{ms, new_event};
use crate::Settings;

#[derive(Debug, clap::Args)]
pub struct ScaleArgs {
    /// Kafka brokers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// Events in the log the relay publishes.
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,
    /// Appended events per second during the lag run.
    #[arg(long, default_value_t = 5_000)]
    pub rate: u64,
    /// Length of the lag run, seconds.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct ScaleReport {
    events: u64,
    relay_events_per_sec: f64,
    baseline_bare_producer_events_per_sec: f64,
    lag_rate_events_per_sec: f64,
    lag_appends: u64,
    lag_p50_ms: f64,
    lag_p99_ms: f64,
    lag_max_ms: f64,
}

/// Appends in batches of this many events; the lag run appends one batch every
/// `BATCH / rate` seconds.
const BATCH: u64 = 50;

pub async fn scale(settings: &Settings, args: ScaleArgs) -> anyhow::Result<()> {
    if args.events == 0 || args.rate == 0 || args.seconds == 0 {
        bail!("--events, --rate and --seconds must be positive");
    }
    let opened = crate::connect(settings).await?;
    if opened.events.last_position().await?.is_some() {
        bail!(
            "bench scale fills its own log: give it a scratch PostgreSQL database with an empty event log"
        );
    }
    let store = opened.events.clone();
    let run = super::run_id()?;
    let payload = vec![7u8; 200];
    // The log to relay.
    let mut appended = 0;
    while appended < args.events {
        let n = 1_000.min(args.events - appended);
        let events = (0..n).map(|_| new_event(&payload)).collect();
        store
            .append(
                &format!("bench-{run}-{}", appended % 64),
                ExpectedVersion::Any,
                events,
            )
            .await?;
        appended += n;
    }
    eprintln!("log of {} events written; relaying", args.events);

    let kafka = KafkaConfig::new(&args.kafka_brokers, format!("bench-{run}"));
    let relay = Relay::new(&opened.database, store.clone(), kafka.clone())?;
    relay.ensure_topic().await?;
    let mut published = relay.published();
    let started = Instant::now();
    let relaying = {
        let relay = relay.clone();
        tokio::spawn(async move { relay.run().await })
    };
    tokio::time::timeout(
        Duration::from_secs(600),
        published.wait_for(|p| *p >= args.events),
    )
    .await
    .context("the relay did not publish the log within 10 minutes")??;
    let relay_rate = args.events as f64 / started.elapsed().as_secs_f64();
    eprintln!("relay: {relay_rate:.0} events/s");

    // The same messages through a bare producer, into a topic of their own.
    let bare = KafkaConfig::new(&args.kafka_brokers, format!("bench-{run}-bare"));
    Relay::new(&opened.database, store.clone(), bare.clone())?
        .ensure_topic()
        .await?;
    let producer: FutureProducer = bare.producer_config().create()?;
    let mut from = 0;
    let mut messages = Vec::new();
    loop {
        let page = store.read_all(from, 10_000).await?;
        let Some(last) = page.last() else { break };
        from = last.position + 1;
        for event in page {
            messages.push((
                event.stream.clone(),
                event.canonical_bytes()?,
                countersign_scale::kafka::headers(&event),
            ));
        }
    }
    let started = Instant::now();
    for chunk in messages.chunks(10_000) {
        let mut deliveries = Vec::with_capacity(chunk.len());
        for (key, value, headers) in chunk {
            let record = FutureRecord::to(&bare.topic)
                .partition(0)
                .key(key.as_bytes())
                .payload(value)
                .headers(headers.clone());
            deliveries.push(
                producer
                    .send_result(record)
                    .map_err(|(e, _)| anyhow::anyhow!("bare producer: {e}"))?,
            );
        }
        for delivery in deliveries {
            delivery
                .await?
                .map_err(|(e, _)| anyhow::anyhow!("bare producer: {e}"))?;
        }
    }
    let bare_rate = messages.len() as f64 / started.elapsed().as_secs_f64();
    eprintln!("bare producer: {bare_rate:.0} events/s");

    // Lag: the projector fed from the topic while events are appended at `rate`.
    let reads = ReadModels::new(opened.database.clone());
    reads.catch_up(&store).await?;
    let feed = Arc::new(KafkaFeed::new(
        kafka.clone(),
        format!("bench-{run}"),
        store.clone(),
    ));
    let projecting = {
        let reads = reads.clone();
        tokio::spawn(async move { reads.run_from(feed).await })
    };
    let mut processed = reads.processed();
    // Warm up: the consumer joins its group and gets its partition before the clock starts.
    let warm = store
        .append(
            &format!("lag-{run}-warm"),
            ExpectedVersion::Any,
            vec![new_event(&payload)],
        )
        .await?;
    tokio::time::timeout(
        Duration::from_secs(60),
        processed.wait_for(|p| *p > warm.last_position),
    )
    .await
    .context("the projector did not start within a minute")??;
    // Every move of the read models, with when it was seen.
    let moves = Arc::new(std::sync::Mutex::new(Vec::<(u64, Instant)>::new()));
    let watcher = {
        let mut processed = reads.processed();
        let moves = moves.clone();
        tokio::spawn(async move {
            loop {
                let position = *processed.borrow_and_update();
                if let Ok(mut moves) = moves.lock() {
                    moves.push((position, Instant::now()));
                }
                if processed.changed().await.is_err() {
                    return;
                }
            }
        })
    };
    let interval = Duration::from_secs_f64(BATCH as f64 / args.rate as f64);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut acks = Vec::new();
    let started = Instant::now();
    let until = started + Duration::from_secs(args.seconds);
    let mut n = 0u64;
    while Instant::now() < until {
        ticker.tick().await;
        let events = (0..BATCH).map(|_| new_event(&payload)).collect();
        let written = store
            .append(
                &format!("lag-{run}-{}", n % 64),
                ExpectedVersion::Any,
                events,
            )
            .await?;
        n += 1;
        acks.push((written.last_position, Instant::now()));
    }
    let achieved = (n * BATCH) as f64 / started.elapsed().as_secs_f64();
    let last = acks.last().map_or(0, |(p, _)| *p);
    tokio::time::timeout(Duration::from_secs(60), processed.wait_for(|p| *p > last))
        .await
        .context("the projector did not catch up within a minute")??;
    projecting.abort();
    relaying.abort();
    watcher.abort();
    let moves = moves
        .lock()
        .map_err(|_| anyhow::anyhow!("lost the projector's progress"))?
        .clone();
    let mut lags = Histogram::<u64>::new(3)?;
    for (position, acked) in &acks {
        let seen = moves
            .iter()
            .find(|(p, _)| p > position)
            .map(|(_, at)| *at)
            .context("a position the projector never passed")?;
        lags.record(seen.saturating_duration_since(*acked).as_micros() as u64)?;
    }
    let report = ScaleReport {
        events: args.events,
        relay_events_per_sec: relay_rate,
        baseline_bare_producer_events_per_sec: bare_rate,
        lag_rate_events_per_sec: achieved,
        lag_appends: acks.len() as u64,
        lag_p50_ms: ms(&lags, 0.5),
        lag_p99_ms: ms(&lags, 0.99),
        lag_max_ms: lags.max() as f64 / 1_000.0,
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "scaled mode on {} with Kafka at {}",
        settings.database_display(),
        args.kafka_brokers
    )?;
    writeln!(
        out,
        "relay: {:.0} events/s ({} events); bare idempotent producer, same messages: {:.0} events/s ({:.0} %)",
        report.relay_events_per_sec,
        report.events,
        report.baseline_bare_producer_events_per_sec,
        100.0 * report.relay_events_per_sec / report.baseline_bare_producer_events_per_sec
    )?;
    writeln!(
        out,
        "append-to-projection lag at {:.0} events/s ({} appends of {BATCH}): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        report.lag_rate_events_per_sec,
        report.lag_appends,
        report.lag_p50_ms,
        report.lag_p99_ms,
        report.lag_max_ms
    )?;
    Ok(())
}
