//! `countersign bench push`: the Message Center's delivery path, in this process, on the
//! configured database (the embedded default: a SQLite file in a temporary folder).
//!
//! - **Throughput**: a [`MessageCenter`] (the code `serve` mounts, its worker and the real FCM
//!   sender) pushing to an in-process FCM stand-in (recording off). `--mailboxes` mailboxes
//!   are registered over the MC's Noise channel (`countersign_protocol::mc` `Register`), then
//!   `--messages` messages are submitted over HTTP (`POST /v1/mc/messages`, what the NS's
//!   pusher calls) from `--clients` concurrent clients. The rate runs from the first submit to
//!   the last distinct message taken from the stand-in's phone inboxes; latency from each
//!   submit to that message reaching its inbox. The ceiling, same run: the stand-in's bare
//!   HTTP rate (`POST /standin/echo` with a body of an FCM send's size) at the same
//!   concurrency; the NS→MC leg shows as the submit rate (answers per second).
//! - **Outage**: every send answers `503` with `Retry-After: 1` for `--outage-secs` while
//!   `--outage-messages` messages are submitted; then the faults are cleared and the drain is
//!   timed until every message id reached the stand-in's inboxes (distinct ids counted: none
//!   lost, duplicates reported).
//!
//! Speed is reported, never asserted. Message ids carry a run prefix, the phase and an index,
//! so the inboxes say which message arrived and how often.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use countersign_commands::SystemClock;
use countersign_eventstore::vault::KeyVault;
use countersign_message_center::fcm::FcmSender;
use countersign_message_center::standin::{Fault, FcmStandin};
use countersign_message_center::{AnonymousLimits, McLimits, MessageCenter, Rate, Senders};
use countersign_protocol::channel::{Initiator, MC_PROLOGUE, StaticKey};
use countersign_protocol::mc::{
    self, McAnswer, McHello, McOutcome, McRequest, McRequestBody, McServerMessage, McWelcome,
    Platform,
};
use futures::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::Settings;

/// Mailboxes whose inboxes are read as pushes arrive, for the latency (the first ones).
const SAMPLED_MAILBOXES: usize = 8;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

#[derive(Debug, clap::Args)]
pub struct PushBenchArgs {
    /// Mailboxes registered (messages go to them in turn; each holds at most 1,000).
    #[arg(long, default_value_t = 400)]
    pub mailboxes: usize,
    /// Messages submitted in the throughput phase.
    #[arg(long, default_value_t = 50_000)]
    pub messages: u64,
    /// Concurrent HTTP clients submitting (and hitting the echo for the ceiling).
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Seconds every send to the stand-in answers 503 in the outage phase (0: skip it).
    #[arg(long, default_value_t = 60)]
    pub outage_secs: u64,
    /// Messages submitted during the outage.
    #[arg(long, default_value_t = 100_000)]
    pub outage_messages: u64,
    /// Provokes per second in the push-login phase (0: skip it).
    #[arg(long, default_value_t = 500)]
    pub provoke_rate: u64,
    /// Seconds of provokes at that rate.
    #[arg(long, default_value_t = 6)]
    pub provoke_secs: u64,
    /// Phones (one user each) for the push-login phase; by default enough that no user is
    /// asked more often than the NS's limit (3 push logins a minute).
    #[arg(long)]
    pub phones: Option<usize>,
    /// The longest wait for the last message of a phase before it counts as lost.
    #[arg(long, default_value_t = 300)]
    pub wait_secs: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Latency {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

#[derive(Debug, Serialize)]
struct Throughput {
    messages: u64,
    clients: usize,
    submit_seconds: f64,
    submits_per_sec: f64,
    submit_errors: u64,
    delivered_distinct: u64,
    duplicates: u64,
    seconds: f64,
    messages_per_sec: f64,
    ceiling_echo_requests: u64,
    ceiling_echo_per_sec: f64,
    ratio_to_ceiling: f64,
    submit_to_inbox: Latency,
}

#[derive(Debug, Serialize)]
struct Outage {
    outage_secs: u64,
    /// The outage lasts at least `outage_secs` and until every message was submitted.
    outage_lasted_secs: f64,
    messages: u64,
    submitted_in_secs: f64,
    submit_errors: u64,
    refused_sends_during_outage: u64,
    delivered_during_outage: u64,
    drain_secs: f64,
    drain_messages_per_sec: f64,
    delivered_distinct: u64,
    lost: u64,
    duplicates: u64,
}

#[derive(Debug, Serialize)]
struct Provokes {
    phones: usize,
    target_per_sec: u64,
    seconds: u64,
    provokes: u64,
    accepted: u64,
    refused: u64,
    achieved_per_sec: f64,
    provoke_answer: Latency,
    provoke_to_inbox: Latency,
    provoke_to_decrypted: Latency,
    decrypted: u64,
    push_errors: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    backend: String,
    mailboxes: usize,
    throughput: Throughput,
    outage: Option<Outage>,
    provokes: Option<Provokes>,
}

/// One pushed message as a phone inbox saw it: (phase, index, when).
type Arrival = (u8, u64, Instant);

/// The Message Center under test, its stand-in, its HTTP address and the mailboxes.
struct Bench {
    mc: MessageCenter,
    standin: Arc<FcmStandin>,
    base: String,
    /// MC tokens (base64url), by mailbox index.
    tokens: Vec<Arc<str>>,
    /// Push tokens, by mailbox index.
    push_tokens: Vec<String>,
    /// Every distinct arrival goes here, from one inbox reader per mailbox.
    arrivals: mpsc::UnboundedReceiver<Arrival>,
    /// Message ids: a run prefix (7 bytes), the phase (1), the index (8).
    prefix: [u8; 7],
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

fn random<const N: usize>() -> anyhow::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(bytes)
}

fn new_key() -> anyhow::Result<StaticKey> {
    loop {
        if let Ok(key) = StaticKey::from_bytes(&random::<32>()?) {
            return Ok(key);
        }
    }
}

/// A message id: the run prefix, the phase, the index.
fn message_id(prefix: [u8; 7], phase: u8, index: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..7].copy_from_slice(&prefix);
    id[7] = phase;
    id[8..].copy_from_slice(&index.to_be_bytes());
    id
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn summary(h: &Histogram<u64>) -> Latency {
    let ms = |us: u64| us as f64 / 1000.0;
    Latency {
        p50_ms: ms(h.value_at_quantile(0.5)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        max_ms: ms(h.max()),
    }
}

/// Registers one mailbox over the MC's Noise channel (in-memory frames into the connection
/// code the WebSocket runs); answers its MC token.
async fn register(mc: &MessageCenter, push_token: &str) -> anyhow::Result<[u8; 32]> {
    let (mut to_mc, incoming) = futures::channel::mpsc::unbounded::<Result<Vec<u8>, String>>();
    let (outgoing, mut from_mc) = futures::channel::mpsc::unbounded::<Vec<u8>>();
    let serving = tokio::spawn(countersign_message_center::connection::serve_frames_from(
        mc.clone(),
        None,
        incoming,
        outgoing,
    ));
    let key = new_key()?;
    let hello = mc::encode(&McHello {
        version: mc::VERSION,
        mailbox: None,
    })?;
    let (initiator, first) =
        Initiator::start_with_prologue(&key, &mc.public_key(), MC_PROLOGUE, &hello)?;
    to_mc.send(Ok(first)).await?;
    let second = from_mc.next().await.context("no answer to the hello")?;
    let (mut channel, welcome) = initiator.finish(&second)?;
    if !matches!(mc::decode::<McWelcome>(&welcome)?, McWelcome::Accepted {}) {
        bail!("the MC refused the hello");
    }
    let request = mc::encode(&McRequest {
        id: 1,
        body: McRequestBody::Register {
            platform: Platform::Fcm,
            push_token: push_token.to_owned(),
            app_id: "com.example.bench".to_owned(),
        },
    })?;
    for frame in channel.seal(&request)? {
        to_mc.send(Ok(frame)).await?;
    }
    let mut message = None;
    while message.is_none() {
        let frame = from_mc.next().await.context("the channel closed")?;
        message = channel.open(&frame)?;
    }
    let McServerMessage::Reply { outcome, .. } = mc::decode(&message.context("no reply")?)?;
    drop(to_mc);
    serving.abort();
    match outcome {
        McOutcome::Ok(McAnswer::Registered { mc_token, .. }) => Ok(*mc_token.expose()),
        other => bail!("register answered {other:?}"),
    }
}

/// The (phase, index) of a pushed message of this run, from its `cs` payload.
fn push_index(payload: &serde_json::Value, prefix: [u8; 7]) -> Option<(u8, u64)> {
    let cs = payload.get("cs")?.as_str()?;
    let bytes = B64.decode(cs).ok()?;
    let id = countersign_protocol::push::decode_envelope(&bytes)
        .ok()?
        .message_id;
    if id.get(..7)? != prefix {
        return None;
    }
    let index: [u8; 8] = id.get(8..)?.try_into().ok()?;
    Some((*id.get(7)?, u64::from_be_bytes(index)))
}

/// Reads one mailbox's phone inbox forever, sending each message's (phase, index) on.
async fn read_inbox(
    standin: Arc<FcmStandin>,
    token: String,
    prefix: [u8; 7],
    arrivals: mpsc::UnboundedSender<Arrival>,
) {
    loop {
        let push = standin.next_push(&token).await;
        let at = Instant::now();
        let Some((phase, index)) = push_index(&push.payload_json, prefix) else {
            continue;
        };
        if arrivals.send((phase, index, at)).is_err() {
            return;
        }
    }
}

impl Bench {
    async fn start(settings: &Settings, args: &PushBenchArgs) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut settings = settings.clone();
        let key = if settings.database_url_is_default {
            settings.database_url = format!("sqlite://{}", dir.path().join("bench.db").display());
            settings.master_key()?
        } else if settings.master_key_file.is_some()
            || crate::config::sqlite_path(&settings.database_url).is_some()
        {
            settings.master_key()?
        } else {
            // A scratch PostgreSQL database: a key for this run only.
            countersign_domain::DataKey::from_bytes(random()?)
        };
        let opened = crate::connect(&settings).await?;
        let standin = Arc::new(FcmStandin::start(SocketAddr::from(([127, 0, 0, 1], 0))).await?);
        standin.recording().set_enabled(false);
        let sender = FcmSender::new(standin.sender_config())
            .map_err(|e| anyhow::anyhow!("FCM sender: {e}"))?;
        // Room for every registration of the run (the bench's mailboxes and the phones).
        let room = u32::try_from(args.mailboxes + phones(args) + 16).unwrap_or(u32::MAX);
        let limits = McLimits {
            anonymous: AnonymousLimits {
                per_address: Rate {
                    burst: room,
                    per_second: room,
                },
                global: Rate {
                    burst: room,
                    per_second: room,
                },
                ..AnonymousLimits::default()
            },
            ..McLimits::default()
        };
        let mc = MessageCenter::new(
            opened.events.clone(),
            KeyVault::new(opened.vault.clone(), key),
            opened.database.clone(),
            Arc::new(SystemClock),
            Senders {
                fcm: Some(Arc::new(sender)),
                apns: None,
            },
            limits,
        )
        .await?;
        let (stop, stopped) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        let worker = mc.clone();
        tasks.spawn(async move {
            if let Err(error) = worker.run(stopped).await {
                tracing::error!(%error, "bench push: the MC worker stopped");
            }
        });
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let base = format!("http://{}", listener.local_addr()?);
        let router = mc.router();
        tasks.spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        let prefix: [u8; 7] = random()?;
        let (arrived, arrivals) = mpsc::unbounded_channel();
        let mut tokens = Vec::with_capacity(args.mailboxes);
        let mut push_tokens = Vec::with_capacity(args.mailboxes);
        for i in 0..args.mailboxes {
            let push_token = format!("bench-push-{i}");
            let token = register(&mc, &push_token).await?;
            tokens.push(Arc::from(B64.encode(token)));
            // Latency is sampled on a few mailboxes: every push wakes every inbox reader.
            if i < SAMPLED_MAILBOXES {
                tasks.spawn(read_inbox(
                    standin.clone(),
                    push_token.clone(),
                    prefix,
                    arrived.clone(),
                ));
            }
            push_tokens.push(push_token);
        }
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(args.clients.max(1))
            .build()?;
        Ok(Self {
            mc,
            standin,
            base,
            tokens,
            push_tokens,
            arrivals,
            prefix,
            stop,
            tasks,
            http,
            _dir: dir,
        })
    }

    /// Submits `count` messages of `phase` from `clients` tasks; answers the submit instants
    /// (by index, microseconds after `t0`), the errors and the time it took.
    async fn submit(
        &self,
        phase: u8,
        count: u64,
        clients: usize,
        t0: Instant,
    ) -> anyhow::Result<(Arc<Vec<AtomicU64>>, u64, Duration)> {
        let stamps: Arc<Vec<AtomicU64>> = Arc::new((0..count).map(|_| AtomicU64::new(0)).collect());
        let next = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let url = Arc::<str>::from(format!("{}/v1/mc/messages", self.base));
        let now_ms = countersign_commands::Clock::now(&SystemClock).as_millis();
        let expires_at_ms = u64::try_from(now_ms)? + 3_600_000;
        let started = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..clients.max(1) {
            let (stamps, next, errors, url) =
                (stamps.clone(), next.clone(), errors.clone(), url.clone());
            let http = self.http.clone();
            let tokens = self.tokens.clone();
            let prefix = self.prefix;
            set.spawn(async move {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= count {
                        return;
                    }
                    let id = message_id(prefix, phase, index);
                    let envelope = countersign_protocol::push::Envelope {
                        message_id: id,
                        expires_at_ms,
                        key_id: [7; 8],
                        enc: vec![4; 65],
                        // About the size of a sealed login push (CBOR plaintext + the tag).
                        ciphertext: vec![0x5a; 96],
                    }
                    .encode();
                    let body = serde_json::json!({
                        "message_id": hex::encode(id),
                        "expires_at_ms": expires_at_ms,
                        "priority": "high",
                        "collapse_id": null,
                        "envelope": B64.encode(envelope),
                    });
                    let slot = usize::try_from(index).unwrap_or(0);
                    let Some(token) = tokens.get(slot % tokens.len()) else {
                        return;
                    };
                    if let Some(stamp) = stamps.get(slot) {
                        stamp.store(micros(t0.elapsed()).max(1), Ordering::Relaxed);
                    }
                    let ok = match http
                        .post(&*url)
                        .header("authorization", format!("Bearer {token}"))
                        .json(&body)
                        .send()
                        .await
                    {
                        Ok(response) => response.status() == reqwest::StatusCode::ACCEPTED,
                        Err(_) => false,
                    };
                    if !ok {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        while set.join_next().await.is_some() {}
        Ok((stamps, errors.load(Ordering::Relaxed), started.elapsed()))
    }

    /// Which messages of `phase` the phone inboxes hold: (distinct, duplicates).
    fn inboxes(&self, phase: u8, count: u64) -> anyhow::Result<(u64, u64)> {
        let mut seen = vec![false; usize::try_from(count)?];
        let (mut distinct, mut duplicates) = (0u64, 0u64);
        for token in &self.push_tokens {
            for push in self.standin.pushes(token) {
                let Some((p, index)) = push_index(&push.payload_json, self.prefix) else {
                    continue;
                };
                let Some(mark) = usize::try_from(index).ok().and_then(|i| seen.get_mut(i)) else {
                    continue;
                };
                if p != phase {
                    continue;
                }
                if *mark {
                    duplicates += 1;
                } else {
                    *mark = true;
                    distinct += 1;
                }
            }
        }
        Ok((distinct, duplicates))
    }

    /// Waits until the stand-in accepted `count` sends more than `before` and its inboxes
    /// hold `count` distinct messages of `phase`, or `wait` passed (polling every 2 ms: a
    /// bench may). Answers (distinct, duplicates, when the count was reached, latencies of
    /// the sampled mailboxes' messages from the stamps).
    async fn collect(
        &mut self,
        phase: u8,
        count: u64,
        before: u64,
        stamps: &[AtomicU64],
        t0: Instant,
        wait: Duration,
    ) -> anyhow::Result<(u64, u64, Option<Instant>, Histogram<u64>)> {
        let deadline = Instant::now() + wait;
        let mut reached = None;
        let (mut distinct, mut duplicates) = (0, 0);
        while Instant::now() < deadline {
            if self.standin.received_count() >= before + count {
                let at = Instant::now();
                (distinct, duplicates) = self.inboxes(phase, count)?;
                if distinct >= count {
                    reached = Some(at);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            } else {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        if reached.is_none() {
            (distinct, duplicates) = self.inboxes(phase, count)?;
        }
        let mut latency = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
        while let Ok((p, index, at)) = self.arrivals.try_recv() {
            let stamp = usize::try_from(index).ok().and_then(|i| stamps.get(i));
            if let (true, Some(stamp)) = (p == phase, stamp) {
                let sent = stamp.load(Ordering::Relaxed);
                latency.record(micros(at.duration_since(t0)).saturating_sub(sent).max(1))?;
            }
        }
        Ok((distinct, duplicates, reached, latency))
    }

    /// The ceiling: `count` bare `POST /standin/echo` with a body of an FCM send's size, from
    /// `clients` tasks; requests per second.
    async fn echo(&self, count: u64, clients: usize) -> anyhow::Result<f64> {
        let url = Arc::<str>::from(format!("{}/standin/echo", self.standin.url()));
        let body = Arc::<str>::from(
            serde_json::json!({"message": {"token": "bench-push-0", "data": {"cs": "A".repeat(260)},
                "android": {"priority": "HIGH", "ttl": "3600s"}}})
            .to_string(),
        );
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(clients.max(1))
            .build()?;
        let next = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..clients.max(1) {
            let (url, body, http, next) = (url.clone(), body.clone(), http.clone(), next.clone());
            set.spawn(async move {
                let mut failed = 0u64;
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    let ok = http
                        .post(&*url)
                        .header("content-type", "application/json")
                        .body(body.to_string())
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    failed += u64::from(!ok);
                }
                failed
            });
        }
        let mut failed = 0;
        while let Some(result) = set.join_next().await {
            failed += result.unwrap_or(0);
        }
        if failed > 0 {
            bail!("{failed} echo requests failed");
        }
        Ok(count as f64 / started.elapsed().as_secs_f64())
    }

    async fn throughput(&mut self, args: &PushBenchArgs) -> anyhow::Result<Throughput> {
        // Warm-up: connections and the FCM access token (not timed).
        let t0 = Instant::now();
        let before = self.standin.received_count();
        let (stamps, _, _) = self.submit(0, 200, args.clients.min(16), t0).await?;
        self.collect(
            0,
            200,
            before,
            &stamps,
            t0,
            Duration::from_secs(args.wait_secs),
        )
        .await?;

        let echo_requests = args.messages.clamp(1, 50_000);
        let ceiling = self.echo(echo_requests, args.clients).await?;

        let t0 = Instant::now();
        let before = self.standin.received_count();
        let (stamps, submit_errors, submit_time) =
            self.submit(1, args.messages, args.clients, t0).await?;
        let (distinct, duplicates, last, latency) = self
            .collect(
                1,
                args.messages,
                before,
                &stamps,
                t0,
                Duration::from_secs(args.wait_secs),
            )
            .await?;
        let seconds = last.map_or(0.0, |at| at.duration_since(t0).as_secs_f64());
        let rate = if seconds > 0.0 {
            distinct as f64 / seconds
        } else {
            0.0
        };
        Ok(Throughput {
            messages: args.messages,
            clients: args.clients,
            submit_seconds: submit_time.as_secs_f64(),
            submits_per_sec: args.messages as f64 / submit_time.as_secs_f64(),
            submit_errors,
            delivered_distinct: distinct,
            duplicates,
            seconds,
            messages_per_sec: rate,
            ceiling_echo_requests: echo_requests,
            ceiling_echo_per_sec: ceiling,
            ratio_to_ceiling: rate / ceiling,
            submit_to_inbox: summary(&latency),
        })
    }

    async fn outage(&mut self, args: &PushBenchArgs) -> anyhow::Result<Outage> {
        let count = args.outage_messages;
        let before = self.standin.received_count();
        // Every send answers 503 + Retry-After: 1 until cleared: the stand-in's fault queue
        // holds one entry per answer, so it is topped up every 20 ms while the outage lasts.
        let unavailable = Fault::Unavailable {
            retry_after_secs: Some(1),
        };
        const STOCK: usize = 100_000;
        self.standin.faults().inject(None, unavailable, STOCK);
        let mut injected = STOCK as u64;
        let outage_start = Instant::now();
        let t0 = outage_start;
        let outage = Duration::from_secs(args.outage_secs);
        let faults = self.standin.faults().clone();
        let (done, mut done_rx) = watch::channel(false);
        let topping = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(20));
            loop {
                tokio::select! {
                    _ = every.tick() => {
                        let short = STOCK.saturating_sub(faults.pending());
                        faults.inject(None, unavailable, short);
                        injected += short as u64;
                    }
                    _ = done_rx.changed() => break,
                }
            }
            injected
        });
        let (stamps, submit_errors, submit_time) = self.submit(2, count, args.clients, t0).await?;
        if let Some(left) = outage.checked_sub(outage_start.elapsed()) {
            tokio::time::sleep(left).await;
        }
        let _ = done.send(true);
        let injected = topping.await?;
        let refused = injected.saturating_sub(self.standin.faults().pending() as u64);
        let delivered_during = self.standin.received_count().saturating_sub(before);
        self.standin.faults().clear();
        let outage_lasted = outage_start.elapsed();
        let drain_start = Instant::now();
        // The backlog waits for its retry time (1 s) and the scan; wake the scan at once too.
        self.mc.wake();
        let (distinct, duplicates, last, _) = self
            .collect(
                2,
                count,
                before,
                &stamps,
                t0,
                Duration::from_secs(args.wait_secs),
            )
            .await?;
        let drain = last.map_or(0.0, |at| {
            at.saturating_duration_since(drain_start).as_secs_f64()
        });
        Ok(Outage {
            outage_secs: args.outage_secs,
            outage_lasted_secs: outage_lasted.as_secs_f64(),
            messages: count,
            submitted_in_secs: submit_time.as_secs_f64(),
            submit_errors,
            refused_sends_during_outage: refused,
            delivered_during_outage: delivered_during,
            drain_secs: drain,
            drain_messages_per_sec: if drain > 0.0 {
                distinct as f64 / drain
            } else {
                0.0
            },
            delivered_distinct: distinct,
            lost: count.saturating_sub(distinct),
            duplicates,
        })
    }

    async fn stop(mut self) {
        let _ = self.stop.send(true);
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

pub async fn push(settings: &Settings, args: PushBenchArgs) -> anyhow::Result<()> {
    if args.mailboxes == 0 || args.messages == 0 || args.clients == 0 {
        bail!("--mailboxes, --messages and --clients must be positive");
    }
    let per_mailbox = (args.messages + 200 + args.outage_messages) / args.mailboxes as u64 + 1;
    if per_mailbox > u64::from(McLimits::default().max_outstanding) {
        bail!(
            "{per_mailbox} messages per mailbox would pass the MC's limit of {}; raise --mailboxes",
            McLimits::default().max_outstanding
        );
    }
    if phones(&args) > 0
        && settings.master_key_file.is_none()
        && crate::config::sqlite_path(&settings.database_url).is_none()
    {
        bail!("the push-login phase runs `serve`, which needs --master-key-file on PostgreSQL");
    }
    let mut bench = Bench::start(settings, &args).await?;
    let backend = if settings.database_url_is_default {
        "sqlite (temporary file)".to_owned()
    } else {
        settings.database_display()
    };
    let throughput = bench.throughput(&args).await?;
    let outage = if args.outage_secs > 0 && args.outage_messages > 0 {
        Some(bench.outage(&args).await?)
    } else {
        None
    };
    let provokes = if args.provoke_rate > 0 && args.provoke_secs > 0 {
        Some(provokes(&bench, settings, &args).await?)
    } else {
        None
    };
    bench.stop().await;
    let report = Report {
        backend,
        mailboxes: args.mailboxes,
        throughput,
        outage,
        provokes,
    };
    print(&report, args.json)
}

fn print(report: &Report, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(report)?)?;
        return Ok(());
    }
    let t = &report.throughput;
    writeln!(
        out,
        "bench push on {}: {} mailboxes, MC → FCM stand-in in this process",
        report.backend, report.mailboxes
    )?;
    writeln!(
        out,
        "  throughput: {} messages from {} clients delivered in {:.2} s: {:.0} messages/s \
         ({} distinct, {} duplicates, {} submit errors)",
        t.messages,
        t.clients,
        t.seconds,
        t.messages_per_sec,
        t.delivered_distinct,
        t.duplicates,
        t.submit_errors
    )?;
    writeln!(
        out,
        "  ceiling (stand-in bare HTTP, {} echoes, {} clients): {:.0} requests/s; ratio {:.2}",
        t.ceiling_echo_requests, t.clients, t.ceiling_echo_per_sec, t.ratio_to_ceiling
    )?;
    writeln!(
        out,
        "  NS → MC leg: {:.0} submits/s answered ({:.2} s for all)",
        t.submits_per_sec, t.submit_seconds
    )?;
    writeln!(
        out,
        "  submit → phone inbox: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        t.submit_to_inbox.p50_ms, t.submit_to_inbox.p99_ms, t.submit_to_inbox.max_ms
    )?;
    if let Some(o) = &report.outage {
        writeln!(
            out,
            "  outage: {} messages submitted in {:.2} s during a {:.1} s outage (503, Retry-After 1; \
             {} sends refused, {} delivered, {} submit errors)",
            o.messages,
            o.submitted_in_secs,
            o.outage_lasted_secs,
            o.refused_sends_during_outage,
            o.delivered_during_outage,
            o.submit_errors
        )?;
        writeln!(
            out,
            "  drain after the outage: {:.2} s, {:.0} messages/s; {} of {} delivered, {} lost, {} duplicates",
            o.drain_secs,
            o.drain_messages_per_sec,
            o.delivered_distinct,
            o.messages,
            o.lost,
            o.duplicates
        )?;
    }
    if let Some(p) = &report.provokes {
        writeln!(
            out,
            "  push logins: {} provokes on {} users' phones at {}/s for {} s: {:.0}/s achieved \
             ({} accepted, {} refused); provoke answered p50 {:.2} ms p99 {:.2} ms",
            p.provokes,
            p.phones,
            p.target_per_sec,
            p.seconds,
            p.achieved_per_sec,
            p.accepted,
            p.refused,
            p.provoke_answer.p50_ms,
            p.provoke_answer.p99_ms
        )?;
        writeln!(
            out,
            "  provoke → phone inbox: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            p.provoke_to_inbox.p50_ms, p.provoke_to_inbox.p99_ms, p.provoke_to_inbox.max_ms
        )?;
        writeln!(
            out,
            "  provoke → phone decrypted (process_push returned): p50 {:.2} ms  p99 {:.2} ms  \
             max {:.2} ms; {} decrypted, {} refused by the SDK",
            p.provoke_to_decrypted.p50_ms,
            p.provoke_to_decrypted.p99_ms,
            p.provoke_to_decrypted.max_ms,
            p.decrypted,
            p.push_errors
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Push logins: business provoke → NS (pusher: HPKE seal, submit) → the bench's MC → FCM
// stand-in → phone (the mobile SDK's `process_push`).

/// Per user: when each provoke the phone has not seen yet was sent (by sequence number).
type Pending = Arc<Vec<std::sync::Mutex<std::collections::VecDeque<(u64, Instant)>>>>;

/// What a phone reports per push: when its provoke was sent (if one was waiting), when the
/// push reached its inbox, when `process_push` returned, and whether it succeeded.
type Seen = (Option<Instant>, Instant, Instant, bool);

/// The phones of the push-login phase: `--phones`, or enough that no user is asked more
/// than 3 times (the NS's limit per minute).
fn phones(args: &PushBenchArgs) -> usize {
    if args.provoke_rate == 0 || args.provoke_secs == 0 {
        return 0;
    }
    let total = args.provoke_rate * args.provoke_secs;
    args.phones
        .unwrap_or_else(|| usize::try_from(total.div_ceil(3)).unwrap_or(usize::MAX))
        .max(1)
}

fn userid(user: usize) -> String {
    format!("push-{user}")
}

/// Enrols a phone (the mobile SDK, in-memory storage) for `userid` and registers it for push
/// with the bench's MC under `push_token`.
async fn enrolled_phone(
    business: &crate::bench::device::Business,
    mc: &countersign_mobile_sdk::McConfig,
    user: usize,
    push_token: &str,
) -> anyhow::Result<countersign_mobile_sdk::Sdk> {
    use countersign_mobile_sdk::{
        HistoryStatus, MemoryStorage, NoCallbacks, Sdk, SdkConfig, State,
    };
    let qr = business.enrolment(&userid(user)).await?;
    let sdk = Sdk::open(
        Arc::new(MemoryStorage::new()),
        SdkConfig {
            mc: Some(mc.clone()),
            request_timeout: crate::bench::device::STEP_TIMEOUT,
            ..SdkConfig::default()
        },
    )?;
    let session = sdk
        .start_session(&qr.encode(), Arc::new(NoCallbacks))
        .await?;
    session.confirm_enrol().await?;
    let done = tokio::time::timeout(
        crate::bench::device::STEP_TIMEOUT,
        session.wait_for(|s| matches!(s.state, State::Done | State::Error)),
    )
    .await
    .context("the enrolment did not finish")?;
    if done.history_status != Some(HistoryStatus::Enrolled) {
        bail!("the phone did not enrol: {:?}", done.error);
    }
    let registered = sdk
        .register_push(
            countersign_mobile_sdk::Platform::Fcm,
            push_token,
            "com.example.bench",
        )
        .await?;
    if registered.registered.is_empty() {
        bail!("push not registered at the server: {:?}", registered.failed);
    }
    Ok(sdk)
}

/// The phone: takes each push from its inbox and hands it to the SDK.
async fn run_phone(
    standin: Arc<FcmStandin>,
    sdk: countersign_mobile_sdk::Sdk,
    push_token: String,
    user: usize,
    pending: Pending,
    seen: mpsc::UnboundedSender<Seen>,
) {
    loop {
        let push = standin.next_push(&push_token).await;
        let arrived = Instant::now();
        let Ok(bytes) = serde_json::to_vec(&push.payload_json) else {
            continue;
        };
        let outcome = sdk
            .process_push(&bytes, Arc::new(countersign_mobile_sdk::NoCallbacks))
            .await;
        let decrypted = Instant::now();
        let sent = pending.get(user).and_then(|queue| {
            queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pop_front()
                .map(|(_, at)| at)
        });
        if seen
            .send((sent, arrived, decrypted, outcome.is_ok()))
            .is_err()
        {
            return;
        }
    }
}

async fn provokes(
    bench: &Bench,
    settings: &Settings,
    args: &PushBenchArgs,
) -> anyhow::Result<Provokes> {
    use crate::serve::{Role, ServeArgs};
    let total = args.provoke_rate * args.provoke_secs;
    let phones = phones(args);
    let dir = tempfile::tempdir()?;
    let mut settings = settings.clone();
    if settings.database_url_is_default {
        settings.database_url = format!("sqlite://{}", dir.path().join("ns.db").display());
    }
    let admin_file = dir.path().join("admin.key");
    crate::config::create_secret_file(&admin_file)?;
    let admin_key = std::fs::read_to_string(&admin_file)?.trim().to_owned();
    let mut serve = ServeArgs::local(admin_file);
    // The NS and the gateway (the code of `serve`); the MC is the bench's, trusted as a
    // separate Message Center (its registration budget raised for this many phones).
    serve.role = vec![Role::Api, Role::Gateway, Role::Sfs, Role::Projector];
    serve.push.trust_mc = vec![format!(
        "{}={}",
        hex::encode(bench.mc.public_key()),
        bench.base
    )];
    serve.limits.max_connections_per_address = 0;
    let running = crate::serve::start(&settings, &serve, Arc::new(SystemClock)).await?;
    let base = format!("http://{}", running.addr);
    let business =
        crate::bench::device::Business::create_with_policy(&base, &admin_key, 256, "none").await?;
    let mc = countersign_mobile_sdk::McConfig::fetch(&format!("{}/v1/mc", bench.base)).await?;

    // The phones, enrolled and registered 16 at a time.
    let pending: Pending = Arc::new(
        (0..phones)
            .map(|_| std::sync::Mutex::new(std::collections::VecDeque::new()))
            .collect(),
    );
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<Seen>();
    let enrolling = Instant::now();
    let limit = Arc::new(tokio::sync::Semaphore::new(16));
    let mut enrolments = tokio::task::JoinSet::new();
    for user in 0..phones {
        let (business, mc, limit) = (business.clone(), mc.clone(), limit.clone());
        enrolments.spawn(async move {
            let _permit = limit.acquire_owned().await?;
            let token = format!("phone-{user}");
            let sdk = enrolled_phone(&business, &mc, user, &token).await?;
            anyhow::Ok((user, token, sdk))
        });
    }
    let mut phone_tasks = tokio::task::JoinSet::new();
    while let Some(joined) = enrolments.join_next().await {
        let (user, token, sdk) = joined??;
        phone_tasks.spawn(run_phone(
            bench.standin.clone(),
            sdk,
            token,
            user,
            pending.clone(),
            seen_tx.clone(),
        ));
    }
    eprintln!(
        "bench push: {phones} phones enrolled and registered for push in {:.1} s",
        enrolling.elapsed().as_secs_f64()
    );

    // Provokes on the users in turn, at the target rate (open loop).
    let period = Duration::from_secs_f64(1.0 / args.provoke_rate.max(1) as f64);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for k in 0..total {
        tick.tick().await;
        let user = usize::try_from(k).unwrap_or(0) % phones;
        let (business, pending) = (business.clone(), pending.clone());
        calls.spawn(async move {
            let nonce = hex::encode(random::<16>().unwrap_or([0; 16]));
            let sent = Instant::now();
            let queue = pending.get(user)?;
            queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push_back((k, sent));
            let ok = business
                .http
                .post(business.url(&format!("/users/{}/provoke", userid(user))))
                .bearer_auth(&*business.token)
                .json(&serde_json::json!({
                    "nonce": nonce,
                    "announce_info": "Log in to the bench?",
                    "ping_time_secs": 0,
                }))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if !ok {
                queue
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .retain(|(seq, _)| *seq != k);
            }
            Some((ok, sent.elapsed()))
        });
    }
    let mut answers = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let (mut accepted, mut refused) = (0u64, 0u64);
    while let Some(joined) = calls.join_next().await {
        let Some((ok, took)) = joined? else { continue };
        answers.record(micros(took).max(1))?;
        if ok {
            accepted += 1;
        } else {
            refused += 1;
        }
    }
    let answered = started.elapsed();

    let mut to_inbox = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let mut to_decrypted = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let (mut decrypted, mut push_errors) = (0u64, 0u64);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.wait_secs);
    while decrypted + push_errors < accepted {
        let Ok(Some((sent, arrived, done, ok))) =
            tokio::time::timeout_at(deadline, seen.recv()).await
        else {
            break;
        };
        if !ok {
            push_errors += 1;
            continue;
        }
        decrypted += 1;
        if let Some(sent) = sent {
            to_inbox.record(micros(arrived.saturating_duration_since(sent)).max(1))?;
            to_decrypted.record(micros(done.saturating_duration_since(sent)).max(1))?;
        }
    }
    phone_tasks.abort_all();
    while phone_tasks.join_next().await.is_some() {}
    running.stop().await?;
    Ok(Provokes {
        phones,
        target_per_sec: args.provoke_rate,
        seconds: args.provoke_secs,
        provokes: total,
        accepted,
        refused,
        achieved_per_sec: total as f64 / answered.as_secs_f64(),
        provoke_answer: summary(&answers),
        provoke_to_inbox: summary(&to_inbox),
        provoke_to_decrypted: summary(&to_decrypted),
        decrypted,
        push_errors,
    })
}
