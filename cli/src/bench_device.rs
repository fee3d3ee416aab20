//! `countersign bench logins` and `bench connections`: the device gateway under load, from
//! this process, against a `countersign serve` running in another one (so the virtual
//! devices' CPU and memory never count as the server's). Speed and memory are reported,
//! never asserted; each run measures its baselines on the same machine at the same moment.
//!
//! - `logins`: creates a virtual server whose logins need no second factor, `--devices` users
//!   and devices enrolled through QR codes, then `--concurrency` workers loop for
//!   `--seconds`: open a session (`PUT …/session`, one-shot, the nonce in `X-Nonce`), the
//!   device logs in from the QR code over a new connection (handshake, `scan`, `confirm`,
//!   `log_in`), and the business side reads the session until the API shows `logged_in`.
//!   End-to-end latency runs from before the PUT to that read. The device is either the
//!   mobile SDK (`--client sdk`, what an app runs) or a raw protocol client (`--client raw`:
//!   the same messages with no SDK state machine or persistence), or both one after the
//!   other. Baselines: the bare PUT rate of the same API at the same concurrency, and full
//!   Noise IK handshakes (both sides) per second on one core. With `--server-pid`, the CPU
//!   seconds per login of the server, of PostgreSQL (all local `postgres` processes) and of
//!   this process are reported, read from `/proc` before and after each phase.
//! - `connections`: opens `--count` idle device connections (as one enrolled account, or as
//!   guests), each bound to a source address in 127.0.0.2… so ephemeral ports never run out,
//!   holds them, and reports the server's resident memory (`VmRSS`) per connection, read
//!   at each quarter so growth can be seen to be linear, plus the kernel's TCP memory. At the
//!   end a sample of the connections must still answer a request.
//!
//! Both need the admin key in `COUNTERSIGN_ADMIN_KEY` (never on the command line) and talk
//! to `ws://` on loopback: they are benchmarks, not clients for a deployment.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use countersign_mobile_sdk::{
    HistoryStatus, MemoryStorage, NoCallbacks, Sdk, SdkConfig, State as SdkState,
};
use countersign_protocol::channel::{Channel, Initiator, Responder, StaticKey};
use countersign_protocol::device::{
    self, Answer, Blob, Bytes, Hello, Intent, Outcome, Request, RequestBody, Secret, ServerMessage,
    VERSION, Welcome,
};
use countersign_protocol::qr::QrPayload;
use futures::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Longest any one step (a request, a handshake, a read) may take before it counts as failed.
pub(crate) const STEP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientKind {
    /// The mobile SDK, one `Sdk` (in-memory storage) per device.
    Sdk,
    /// The device protocol by hand: handshake, `scan`, `confirm`, `log_in`.
    Raw,
    /// The SDK, then the raw client.
    Both,
}

#[derive(Debug, clap::Args)]
pub struct LoginsArgs {
    /// The running server's base URL (its gateway URL must be reachable from here).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub api: String,
    /// Virtual devices (each with one account of its own user).
    #[arg(long, default_value_t = 64)]
    pub devices: usize,
    /// Logins in flight at once (worker `w` uses device `w % devices`).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Seconds per measured phase.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Which device client drives the logins.
    #[arg(long, value_enum, default_value_t = ClientKind::Both)]
    pub client: ClientKind,
    /// The server's process id, to report its CPU time per login.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ConnectionsArgs {
    /// The gateway URL as the server writes it into QR codes (`ws://host:port/v1/device`);
    /// the API is at the same host and port.
    #[arg(long, default_value = "ws://127.0.0.1:8080/v1/device")]
    pub gateway: String,
    /// The server's process id, whose VmRSS is read.
    #[arg(long)]
    pub server_pid: u32,
    /// Connections to open and hold (this process needs that many file descriptors, and the
    /// server as many: raise `ulimit -n` for both).
    #[arg(long, default_value_t = 50_000)]
    pub count: usize,
    /// Connect as guests instead of as one enrolled account.
    #[arg(long)]
    pub guest: bool,
    /// Connections per source address (127.0.0.2, 127.0.0.3, …).
    #[arg(long, default_value_t = 1_000)]
    pub per_source: usize,
    /// Handshakes in flight while opening.
    #[arg(long, default_value_t = 64)]
    pub parallel: usize,
    /// Seconds to hold all connections idle before the final reading.
    #[arg(long, default_value_t = 5.0)]
    pub hold_seconds: f64,
    /// Connections, evenly spread, that must answer a request at the end.
    #[arg(long, default_value_t = 200)]
    pub sample: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn admin_key() -> anyhow::Result<String> {
    let key = std::env::var("COUNTERSIGN_ADMIN_KEY")
        .context("set COUNTERSIGN_ADMIN_KEY to the server's admin key")?;
    if key.trim().len() < 32 {
        bail!("COUNTERSIGN_ADMIN_KEY is shorter than 32 characters");
    }
    Ok(key.trim().to_owned())
}

pub(crate) fn random<const N: usize>() -> anyhow::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(bytes)
}

/// A fresh P-256 key (a random scalar; out-of-range draws, about 2^-32 of them, are redrawn).
fn new_key() -> anyhow::Result<StaticKey> {
    loop {
        if let Ok(key) = StaticKey::from_bytes(&random::<32>()?) {
            return Ok(key);
        }
    }
}

pub(crate) fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?)
}

pub(crate) fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1_000.0
}

// ---------------------------------------------------------------------------------------
// The business side: a virtual server, its API key, users, enrolments, sessions.

/// The business system's view: one virtual server and its API key.
#[derive(Clone)]
pub(crate) struct Business {
    pub(crate) http: reqwest::Client,
    pub(crate) base: String,
    pub(crate) server: String,
    pub(crate) token: Arc<str>,
}

impl std::fmt::Debug for Business {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Business")
            .field("base", &self.base)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl Business {
    /// Creates a virtual server (logins without a second factor) and an API key.
    async fn create(base: &str, admin: &str, pool: usize) -> anyhow::Result<Self> {
        Self::create_with_policy(base, admin, pool, "none").await
    }

    /// Creates a virtual server with this second-factor policy and an API key.
    pub(crate) async fn create_with_policy(
        base: &str,
        admin: &str,
        pool: usize,
        policy: &str,
    ) -> anyhow::Result<Self> {
        let base = base.trim_end_matches('/').to_owned();
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(pool.max(1))
            .timeout(STEP_TIMEOUT)
            .build()?;
        let created: serde_json::Value = http
            .post(format!("{base}/v1/servers"))
            .bearer_auth(admin)
            .json(&serde_json::json!({"name": "Bench devices"}))
            .send()
            .await
            .with_context(|| format!("cannot reach {base}"))?
            .error_for_status()?
            .json()
            .await?;
        let server = created
            .pointer("/server/server_id")
            .and_then(|v| v.as_str())
            .context("no server id")?
            .to_owned();
        http.patch(format!("{base}/v1/servers/{server}"))
            .bearer_auth(admin)
            .json(&serde_json::json!({"second_factor": policy}))
            .send()
            .await?
            .error_for_status()?;
        let key: serde_json::Value = http
            .post(format!("{base}/v1/servers/{server}/api-keys"))
            .bearer_auth(admin)
            .json(&serde_json::json!({"label": "bench"}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let token = key
            .get("token")
            .and_then(|v| v.as_str())
            .context("no API key token")?
            .into();
        Ok(Self {
            http,
            base,
            server,
            token,
        })
    }

    pub(crate) fn url(&self, rest: &str) -> String {
        format!("{}/v1/servers/{}{rest}", self.base, self.server)
    }

    /// Creates `userid` and an enrolment for it; answers the enrolment QR code.
    pub(crate) async fn enrolment(&self, userid: &str) -> anyhow::Result<QrPayload> {
        self.http
            .put(self.url(&format!("/users/{userid}")))
            .bearer_auth(&*self.token)
            .json(&serde_json::json!({"attributes": {}}))
            .send()
            .await?
            .error_for_status()?;
        let body: serde_json::Value = self
            .http
            .post(self.url("/enrolments"))
            .bearer_auth(&*self.token)
            .json(&serde_json::json!({"userid": userid}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        qr_of(&body)
    }

    /// Opens a one-shot login session; answers its QR code and the log position.
    pub(crate) async fn open_session(&self, nonce: &str) -> anyhow::Result<(QrPayload, u64)> {
        let response = self
            .http
            .put(self.url("/session"))
            .header("X-Nonce", nonce)
            .bearer_auth(&*self.token)
            .json(&serde_json::json!({"ping_time_secs": 0}))
            .send()
            .await?;
        if response.status() != reqwest::StatusCode::CREATED {
            bail!("PUT session answered {}", response.status());
        }
        let body: serde_json::Value = response.json().await?;
        let position = body
            .get("position")
            .and_then(serde_json::Value::as_u64)
            .context("no position")?;
        Ok((qr_of(&body)?, position))
    }

    /// Reads the session until it shows `logged_in`; answers how many reads that took.
    pub(crate) async fn await_logged_in(&self, nonce: &str, position: u64) -> anyhow::Result<u64> {
        self.await_field_as(
            "/session",
            Some(nonce),
            position,
            ("state", "logged_in"),
            &["pending", "scanned"],
        )
        .await
    }

    /// Reads `path` (waiting for `position`) until its `field` shows `done`, polling while it
    /// shows one of `waiting`: the device's step is committed (it heard so) and the read model
    /// follows within milliseconds. A benchmark may poll. Answers how many reads that took.
    pub(crate) async fn await_field(
        &self,
        path: &str,
        position: u64,
        (field, done): (&str, &str),
        waiting: &[&str],
    ) -> anyhow::Result<u64> {
        self.await_field_as(path, None, position, (field, done), waiting)
            .await
    }

    /// [`Self::await_field`], naming a login session by its nonce in `X-Nonce`.
    async fn await_field_as(
        &self,
        path: &str,
        nonce: Option<&str>,
        position: u64,
        (field, done): (&str, &str),
        waiting: &[&str],
    ) -> anyhow::Result<u64> {
        let url = self.url(path);
        let started = Instant::now();
        let mut reads = 0;
        loop {
            reads += 1;
            let mut request = self
                .http
                .get(format!("{url}?min_position={position}"))
                .bearer_auth(&*self.token);
            if let Some(nonce) = nonce {
                request = request.header("X-Nonce", nonce);
            }
            let view: serde_json::Value = request.send().await?.error_for_status()?.json().await?;
            match view.get(field).and_then(|s| s.as_str()) {
                Some(value) if value == done => return Ok(reads),
                Some(value) if waiting.contains(&value) && started.elapsed() < STEP_TIMEOUT => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                other => bail!("{path} shows {field} {other:?}, not {done}"),
            }
        }
    }
}

fn qr_of(body: &serde_json::Value) -> anyhow::Result<QrPayload> {
    let text = body
        .pointer("/qr/base64url")
        .and_then(|v| v.as_str())
        .context("no qr.base64url")?;
    QrPayload::from_base64url(text).map_err(|e| anyhow::anyhow!("bad QR payload: {e}"))
}

// ---------------------------------------------------------------------------------------
// The raw device: the protocol by hand.

/// Where devices connect: the channel URL and the server's pinned key.
#[derive(Debug, Clone)]
struct Target {
    server_id: [u8; 16],
    /// `host:port` of the gateway.
    address: SocketAddr,
    channel_url: String,
    public_key: Vec<u8>,
}

impl Target {
    /// From a QR code's gateway URL; the key is fetched and checked against the QR's pin.
    async fn from_qr(http: &reqwest::Client, qr: &QrPayload) -> anyhow::Result<Self> {
        let gateway = qr.gateway.trim_end_matches('/');
        let rest = gateway
            .strip_prefix("ws://")
            .context("the benchmark speaks ws:// only (run it on loopback)")?;
        let host = rest.split('/').next().unwrap_or(rest);
        let address = tokio::net::lookup_host(host)
            .await?
            .find(SocketAddr::is_ipv4)
            .with_context(|| format!("cannot resolve {host}"))?;
        let server_hex = hex::encode(qr.server_id);
        let doc: serde_json::Value = http
            .get(format!("http://{rest}/servers/{server_hex}"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let public_key = hex::decode(
            doc.get("public_key")
                .and_then(|v| v.as_str())
                .context("no public_key")?,
        )?;
        if countersign_protocol::channel::fingerprint(&public_key) != qr.server_key_fingerprint {
            bail!("the gateway's key is not the one the QR code pins");
        }
        Ok(Self {
            server_id: qr.server_id,
            address,
            channel_url: format!("{gateway}/servers/{server_hex}/channel"),
            public_key,
        })
    }
}

type Socket = WebSocketStream<TcpStream>;

/// One open channel.
struct RawConnection {
    ws: Socket,
    channel: Channel,
    next_id: u32,
}

impl std::fmt::Debug for RawConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawConnection(..)")
    }
}

impl RawConnection {
    /// TCP (from `source`, if given), WebSocket with small buffers, Noise IK with `Hello`.
    async fn open(
        target: &Target,
        key: &StaticKey,
        intent: Intent,
        source: Option<IpAddr>,
    ) -> anyhow::Result<Self> {
        let socket = TcpSocket::new_v4()?;
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let stream = socket.connect(target.address).await?;
        stream.set_nodelay(true)?;
        let config = WebSocketConfig::default()
            .read_buffer_size(4 * 1024)
            .write_buffer_size(0);
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(
            target.channel_url.as_str(),
            stream,
            Some(config),
        )
        .await?;
        let hello = device::encode(&Hello {
            version: VERSION,
            intent,
        })?;
        let (initiator, first) =
            Initiator::start(key, &target.public_key, &target.server_id, &hello)?;
        ws.send(Message::Binary(first.into())).await?;
        let answer = next_binary(&mut ws).await?;
        let (channel, welcome) = initiator.finish(&answer)?;
        match device::decode::<Welcome>(&welcome)? {
            Welcome::Accepted { .. } => Ok(Self {
                ws,
                channel,
                next_id: 1,
            }),
            Welcome::Refused { reason } => bail!("the gateway refused the handshake: {reason:?}"),
        }
    }

    /// Sends one request and answers its reply (notices in between are skipped).
    async fn request(&mut self, body: RequestBody) -> anyhow::Result<Outcome> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        for frame in self.channel.seal(&device::encode(&Request { id, body })?)? {
            self.ws.send(Message::Binary(frame.into())).await?;
        }
        loop {
            let frame = next_binary(&mut self.ws).await?;
            let Some(message) = self.channel.open(&frame)? else {
                continue;
            };
            if let ServerMessage::Reply { id: got, outcome } = device::decode(&message)?
                && got == id
            {
                return Ok(outcome);
            }
        }
    }

    async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

async fn next_binary(ws: &mut Socket) -> anyhow::Result<Vec<u8>> {
    loop {
        let message = tokio::time::timeout(STEP_TIMEOUT, ws.next())
            .await
            .context("no answer in time")?
            .context("the gateway closed the connection")??;
        match message {
            Message::Binary(bytes) => return Ok(bytes.to_vec()),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            Message::Text(_) | Message::Close(_) => bail!("the gateway closed the channel"),
        }
    }
}

fn expect_ok(outcome: Outcome, what: &str) -> anyhow::Result<Answer> {
    match outcome {
        Outcome::Ok(answer) => Ok(answer),
        Outcome::Err(error) => bail!("{what} refused: {:?} {}", error.code, error.message),
    }
}

/// A device with one enrolled account, spoken to without the SDK.
struct RawDevice {
    key: StaticKey,
    account_id: [u8; 16],
}

impl RawDevice {
    /// Enrols through an enrolment QR code on a guest channel with a fresh key.
    async fn enrol(target: &Target, qr: &QrPayload) -> anyhow::Result<Self> {
        let key = new_key()?;
        let mut connection = RawConnection::open(target, &key, Intent::Guest, None).await?;
        let answer = connection
            .request(RequestBody::Enrol {
                token: Secret::new(qr.token),
                signing_public_key: Blob(new_key()?.public_key()?),
                app_instance: Bytes(random()?),
            })
            .await?;
        connection.close().await;
        match expect_ok(answer, "enrol")? {
            Answer::Enrolled { account_id, .. } => Ok(Self {
                key,
                account_id: account_id.0,
            }),
            other => bail!("enrol answered {other:?}"),
        }
    }

    fn intent(&self) -> Intent {
        Intent::Account {
            account_id: Bytes(self.account_id),
        }
    }

    /// What the SDK sends for a one-shot login: a new connection, `scan`, `confirm`, `log_in`.
    async fn log_in(&self, target: &Target, hsid: [u8; 32]) -> anyhow::Result<()> {
        let mut connection = RawConnection::open(target, &self.key, self.intent(), None).await?;
        let hsid = Bytes(hsid);
        expect_ok(
            connection.request(RequestBody::Scan { hsid }).await?,
            "scan",
        )?;
        expect_ok(
            connection.request(RequestBody::Confirm { hsid }).await?,
            "confirm",
        )?;
        match expect_ok(
            connection.request(RequestBody::LogIn { hsid }).await?,
            "log_in",
        )? {
            Answer::LoggedIn { .. } => {}
            other => bail!("log_in answered {other:?}"),
        }
        connection.close().await;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The SDK device.

fn sdk_config() -> SdkConfig {
    SdkConfig {
        // Headless: one account, no question to the user.
        skip_single_account_confirmation: true,
        request_timeout: STEP_TIMEOUT,
        ..SdkConfig::default()
    }
}

async fn sdk_enrol(qr: &QrPayload) -> anyhow::Result<Sdk> {
    let sdk = Sdk::open(Arc::new(MemoryStorage::new()), sdk_config())?;
    let session = sdk
        .start_session(&qr.encode(), Arc::new(NoCallbacks))
        .await?;
    session.confirm_enrol().await?;
    let done = tokio::time::timeout(
        STEP_TIMEOUT,
        session.wait_for(|s| matches!(s.state, SdkState::Done | SdkState::Error)),
    )
    .await
    .context("the enrolment did not finish")?;
    if done.history_status != Some(HistoryStatus::Enrolled) {
        bail!("the SDK did not enrol: {:?}", done.error);
    }
    Ok(sdk)
}

async fn sdk_log_in(sdk: &Sdk, qr: &QrPayload) -> anyhow::Result<()> {
    let session = sdk
        .start_session(&qr.encode(), Arc::new(NoCallbacks))
        .await?;
    let done = tokio::time::timeout(
        STEP_TIMEOUT,
        session.wait_for(|s| matches!(s.state, SdkState::Done | SdkState::Error)),
    )
    .await
    .context("the login did not finish")?;
    if done.history_status != Some(HistoryStatus::LoggedInOneShot) {
        bail!("the SDK did not log in: {:?}", done.error);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// CPU time from /proc.

/// CPU seconds (user + system) of a process and its reaped children, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it are space separated.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime, stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux ABI the benchmark runs on.
    Some(ticks as f64 / 100.0)
}

/// CPU seconds of every process named `postgres`.
fn postgres_cpu_seconds() -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "postgres")
        })
        .filter_map(cpu_seconds)
        .sum()
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuMark {
    bench: f64,
    server: Option<f64>,
    postgres: f64,
}

impl CpuMark {
    pub(crate) fn now(server_pid: Option<u32>) -> Self {
        Self {
            bench: cpu_seconds(std::process::id()).unwrap_or(0.0),
            server: server_pid.and_then(cpu_seconds),
            postgres: postgres_cpu_seconds(),
        }
    }

    /// CPU milliseconds per unit of work since `self`.
    pub(crate) fn per(&self, later: &Self, units: u64) -> CpuShare {
        let per = |a: f64, b: f64| 1_000.0 * (b - a) / units.max(1) as f64;
        CpuShare {
            bench_ms: per(self.bench, later.bench),
            server_ms: self.server.zip(later.server).map(|(a, b)| per(a, b)),
            postgres_ms: per(self.postgres, later.postgres),
        }
    }
}

/// CPU milliseconds spent per login, by process.
#[derive(Debug, Serialize)]
pub(crate) struct CpuShare {
    pub(crate) bench_ms: f64,
    pub(crate) server_ms: Option<f64>,
    pub(crate) postgres_ms: f64,
}

// ---------------------------------------------------------------------------------------
// bench logins

/// Logged-in devices: the SDK's and the raw ones.
struct Devices {
    sdk: Vec<Sdk>,
    raw: Vec<RawDevice>,
}

#[derive(Debug, Serialize)]
struct LoginPhase {
    client: &'static str,
    concurrency: usize,
    logins: u64,
    errors: u64,
    first_error: Option<String>,
    seconds: f64,
    logins_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Median of each part: the PUT, the device's login, the reads until `logged_in`.
    put_p50_ms: f64,
    device_p50_ms: f64,
    device_p99_ms: f64,
    visible_p50_ms: f64,
    reads_per_login: f64,
    cpu_per_login: CpuShare,
}

#[derive(Debug, Serialize)]
struct LoginsReport {
    api: String,
    devices: usize,
    phases: Vec<LoginPhase>,
    baseline_put_per_sec: f64,
    baseline_put_p50_ms: f64,
    baseline_handshakes_per_sec_one_core: f64,
    /// The gateway's half of a handshake alone (`Responder::read` + `accept`).
    baseline_responder_halves_per_sec_one_core: f64,
}

struct WorkerResult {
    total: Histogram<u64>,
    put: Histogram<u64>,
    device: Histogram<u64>,
    visible: Histogram<u64>,
    reads: u64,
    errors: u64,
    first_error: Option<String>,
}

pub async fn logins(args: LoginsArgs) -> anyhow::Result<()> {
    if args.devices == 0 || args.concurrency == 0 {
        bail!("--devices and --concurrency take positive numbers");
    }
    if !(args.seconds > 0.0 && args.seconds <= 600.0) {
        bail!("--seconds must be between 0 and 600");
    }
    let admin = admin_key()?;
    let business = Business::create(&args.api, &admin, args.concurrency * 2).await?;
    let (want_sdk, want_raw) = match args.client {
        ClientKind::Sdk => (true, false),
        ClientKind::Raw => (false, true),
        ClientKind::Both => (true, true),
    };
    let setup = Instant::now();
    let (devices, target) = enrol_devices(&business, args.devices, want_sdk, want_raw).await?;
    if !args.json {
        eprintln!(
            "server {}: {} devices enrolled in {:.1} s",
            business.server,
            args.devices,
            setup.elapsed().as_secs_f64()
        );
    }
    let devices = Arc::new(devices);
    let target = Arc::new(target);
    let prefix = hex::encode(random::<4>()?);
    let mut phases = Vec::new();
    for (client, wanted) in [("sdk", want_sdk), ("raw", want_raw)] {
        if !wanted {
            continue;
        }
        let phase = login_phase(
            client,
            &business,
            &devices,
            &target,
            &format!("{prefix}{}", if client == "sdk" { "5d" } else { "7a" }),
            &args,
        )
        .await?;
        if !args.json {
            eprintln!(
                "{client}: {:.0} logins/s, p50 {:.1} ms, p99 {:.1} ms ({} errors)",
                phase.logins_per_sec, phase.p50_ms, phase.p99_ms, phase.errors
            );
        }
        phases.push(phase);
    }
    let (put_rate, put_p50) = baseline_puts(&business, &prefix, &args).await?;
    let (handshakes, responder_halves) =
        tokio::task::spawn_blocking(|| handshakes_per_sec(Duration::from_secs(3)))
            .await
            .context("the handshake baseline died")??;
    let report = LoginsReport {
        api: business.base.clone(),
        devices: args.devices,
        phases,
        baseline_put_per_sec: put_rate,
        baseline_put_p50_ms: put_p50,
        baseline_handshakes_per_sec_one_core: handshakes,
        baseline_responder_halves_per_sec_one_core: responder_halves,
    };
    print_logins(&report, args.json)
}

async fn enrol_devices(
    business: &Business,
    count: usize,
    sdk: bool,
    raw: bool,
) -> anyhow::Result<(Devices, Target)> {
    let mut devices = Devices {
        sdk: Vec::new(),
        raw: Vec::new(),
    };
    let mut target = None;
    for i in 0..count {
        if sdk {
            let qr = business.enrolment(&format!("sdk-device-{i}")).await?;
            devices.sdk.push(
                sdk_enrol(&qr)
                    .await
                    .with_context(|| format!("enrolling SDK device {i}"))?,
            );
        }
        if raw {
            let qr = business.enrolment(&format!("raw-device-{i}")).await?;
            let t = match &target {
                Some(t) => t,
                None => target.insert(Target::from_qr(&business.http, &qr).await?),
            };
            devices.raw.push(
                RawDevice::enrol(t, &qr)
                    .await
                    .with_context(|| format!("enrolling raw device {i}"))?,
            );
        }
    }
    let target = match target {
        Some(t) => t,
        None => {
            // The SDK pins the key itself; the target is only needed for the raw client.
            let qr = business.enrolment("key-probe").await?;
            Target::from_qr(&business.http, &qr).await?
        }
    };
    Ok((devices, target))
}

async fn login_phase(
    client: &'static str,
    business: &Business,
    devices: &Arc<Devices>,
    target: &Arc<Target>,
    prefix: &str,
    args: &LoginsArgs,
) -> anyhow::Result<LoginPhase> {
    let stop = Arc::new(AtomicBool::new(false));
    let before = CpuMark::now(args.server_pid);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.concurrency);
    for worker in 0..args.concurrency {
        let (business, devices, target, stop) = (
            business.clone(),
            Arc::clone(devices),
            Arc::clone(target),
            Arc::clone(&stop),
        );
        let device = worker % args.devices;
        let prefix = prefix.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut result = WorkerResult {
                total: histogram()?,
                put: histogram()?,
                device: histogram()?,
                visible: histogram()?,
                reads: 0,
                errors: 0,
                first_error: None,
            };
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // 10 + 6 + 16 hex digits: a 32-digit nonce, unique in the run.
                let nonce = format!("{prefix}{worker:06x}{i:016x}");
                i += 1;
                let one = async {
                    let t0 = Instant::now();
                    let (qr, position) = business.open_session(&nonce).await?;
                    let t1 = Instant::now();
                    match client {
                        "sdk" => {
                            let sdk = devices.sdk.get(device).context("no such device")?;
                            sdk_log_in(sdk, &qr).await?;
                        }
                        _ => {
                            let raw = devices.raw.get(device).context("no such device")?;
                            raw.log_in(&target, qr.token).await?;
                        }
                    }
                    let t2 = Instant::now();
                    let reads = business.await_logged_in(&nonce, position).await?;
                    let t3 = Instant::now();
                    anyhow::Ok((t0, t1, t2, t3, reads))
                };
                match one.await {
                    Ok((t0, t1, t2, t3, reads)) => {
                        let us = |a: Instant, b: Instant| (b - a).as_micros().max(1) as u64;
                        result.total.saturating_record(us(t0, t3));
                        result.put.saturating_record(us(t0, t1));
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
    let mut all = WorkerResult {
        total: histogram()?,
        put: histogram()?,
        device: histogram()?,
        visible: histogram()?,
        reads: 0,
        errors: 0,
        first_error: None,
    };
    for task in tasks {
        let r = task.await.context("a login worker died")??;
        all.total.add(&r.total)?;
        all.put.add(&r.put)?;
        all.device.add(&r.device)?;
        all.visible.add(&r.visible)?;
        all.reads += r.reads;
        all.errors += r.errors;
        if all.first_error.is_none() {
            all.first_error = r.first_error;
        }
    }
    // Workers finish the login in hand after the stop: count the time they took.
    let seconds = started.elapsed().as_secs_f64();
    let after = CpuMark::now(args.server_pid);
    let logins = all.total.len();
    Ok(LoginPhase {
        client,
        concurrency: args.concurrency,
        logins,
        errors: all.errors,
        first_error: all.first_error,
        seconds,
        logins_per_sec: logins as f64 / seconds,
        p50_ms: ms(&all.total, 0.5),
        p99_ms: ms(&all.total, 0.99),
        max_ms: all.total.max() as f64 / 1_000.0,
        put_p50_ms: ms(&all.put, 0.5),
        device_p50_ms: ms(&all.device, 0.5),
        device_p99_ms: ms(&all.device, 0.99),
        visible_p50_ms: ms(&all.visible, 0.5),
        reads_per_login: all.reads as f64 / logins.max(1) as f64,
        cpu_per_login: before.per(&after, logins),
    })
}

/// The business half alone: PUTs of one-shot sessions at the same concurrency.
async fn baseline_puts(
    business: &Business,
    prefix: &str,
    args: &LoginsArgs,
) -> anyhow::Result<(f64, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let seconds = args.seconds.min(5.0);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..args.concurrency {
        let (business, stop, done) = (business.clone(), Arc::clone(&stop), Arc::clone(&done));
        let prefix = format!("{prefix}ba");
        tasks.push(tokio::spawn(async move {
            let mut h = histogram()?;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                if business
                    .open_session(&format!("{prefix}{worker:06x}{i:016x}"))
                    .await
                    .is_ok()
                {
                    h.saturating_record(t.elapsed().as_micros().max(1) as u64);
                    done.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
            anyhow::Ok(h)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = histogram()?;
    for task in tasks {
        all.add(&task.await.context("a PUT worker died")??)?;
    }
    let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    Ok((rate, ms(&all, 0.5)))
}

/// Complete Noise IK handshakes (initiator and responder, in memory) per second on the
/// calling thread, and the rate of the responder's half alone: the cryptographic floor of
/// one login's connection, for the whole and for the gateway's share.
fn handshakes_per_sec(duration: Duration) -> anyhow::Result<(f64, f64)> {
    let device = new_key()?;
    let server = new_key()?;
    let server_public = server.public_key()?;
    let id = [7u8; 16];
    let started = Instant::now();
    let mut responding = Duration::ZERO;
    let mut n = 0u64;
    while started.elapsed() < duration {
        let (initiator, first) = Initiator::start(&device, &server_public, &id, b"hello")?;
        let t = Instant::now();
        let (responder, _) = Responder::read(&server, &id, &first)?;
        let (_, second) = responder.accept(b"welcome")?;
        responding += t.elapsed();
        let (channel, _) = initiator.finish(&second)?;
        std::hint::black_box(channel);
        n += 1;
    }
    Ok((
        n as f64 / started.elapsed().as_secs_f64(),
        n as f64 / responding.as_secs_f64().max(1e-9),
    ))
}

fn print_logins(report: &LoginsReport, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(report)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "bench logins against {} with {} devices",
        report.api, report.devices
    )?;
    writeln!(
        out,
        "| client | conc. | logins/s | p50 ms | p99 ms | max ms | PUT p50 | device p50/p99 | visible p50 | reads/login | CPU ms/login bench/server/pg | vs bare PUT | errors |"
    )?;
    writeln!(
        out,
        "|--------|------:|---------:|-------:|-------:|-------:|--------:|---------------:|------------:|------------:|-----------------------------:|------------:|-------:|"
    )?;
    for p in &report.phases {
        let server = p
            .cpu_per_login
            .server_ms
            .map_or_else(|| "?".to_owned(), |s| format!("{s:.2}"));
        writeln!(
            out,
            "| {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1}/{:.1} | {:.1} | {:.2} | {:.2}/{}/{:.2} | {:.0}% | {} |",
            p.client,
            p.concurrency,
            p.logins_per_sec,
            p.p50_ms,
            p.p99_ms,
            p.max_ms,
            p.put_p50_ms,
            p.device_p50_ms,
            p.device_p99_ms,
            p.visible_p50_ms,
            p.reads_per_login,
            p.cpu_per_login.bench_ms,
            server,
            p.cpu_per_login.postgres_ms,
            100.0 * p.logins_per_sec / report.baseline_put_per_sec.max(1.0),
            p.errors
        )?;
        if let Some(error) = &p.first_error {
            writeln!(out, "  first error ({}): {error}", p.client)?;
        }
    }
    writeln!(
        out,
        "baseline: bare session PUTs at the same concurrency {:.0}/s (p50 {:.1} ms); \
         full Noise IK handshakes (both sides) on one core {:.0}/s, the gateway's half \
         alone {:.0}/s",
        report.baseline_put_per_sec,
        report.baseline_put_p50_ms,
        report.baseline_handshakes_per_sec_one_core,
        report.baseline_responder_halves_per_sec_one_core
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// bench connections

#[derive(Debug, Serialize)]
struct RssReading {
    connections: usize,
    server_rss_kib: u64,
    kib_per_connection: f64,
    /// Growth since the previous reading per connection opened since: immune to memory the
    /// allocator had not yet returned when the first reading was taken.
    kib_per_connection_step: f64,
    kernel_tcp_kib: u64,
}

#[derive(Debug, Serialize)]
struct ConnectionsReport {
    gateway: String,
    as_guest: bool,
    requested: usize,
    opened: usize,
    first_error: Option<String>,
    open_seconds: f64,
    handshakes_per_sec: f64,
    rss_before_kib: u64,
    kernel_tcp_before_kib: u64,
    readings: Vec<RssReading>,
    sampled: usize,
    answered: usize,
}

/// `VmRSS` of a process, KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS line")
}

/// Kernel memory of all TCP sockets (`/proc/net/sockstat`, `TCP: … mem N` in pages), KiB.
fn kernel_tcp_kib() -> u64 {
    std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("TCP:"))?.to_owned();
            let mut words = line.split_whitespace();
            words.find(|w| *w == "mem")?;
            words.next()?.parse::<u64>().ok()
        })
        .map_or(0, |pages| pages * 4)
}

/// The `i`-th source address: 127.0.0.2, 127.0.0.3, …, `per_source` connections each.
fn source(i: usize, per_source: usize) -> IpAddr {
    let n = u32::try_from(i / per_source.max(1)).unwrap_or(u32::MAX - 2);
    let base = u32::from(Ipv4Addr::new(127, 0, 0, 2));
    IpAddr::V4(Ipv4Addr::from(
        base.saturating_add(n)
            .min(u32::from(Ipv4Addr::new(127, 255, 255, 254))),
    ))
}

pub async fn connections(args: ConnectionsArgs) -> anyhow::Result<()> {
    if args.count == 0 || args.parallel == 0 {
        bail!("--count and --parallel take positive numbers");
    }
    let admin = admin_key()?;
    let api = args
        .gateway
        .trim_end_matches('/')
        .strip_suffix("/v1/device")
        .and_then(|base| base.strip_prefix("ws://"))
        .map(|host| format!("http://{host}"))
        .context("--gateway must be ws://host:port/v1/device")?;
    let business = Business::create(&api, &admin, 4).await?;
    let qr = business.enrolment("idle-device").await?;
    let target = Arc::new(Target::from_qr(&business.http, &qr).await?);
    let device = if args.guest {
        None
    } else {
        Some(RawDevice::enrol(&target, &qr).await?)
    };
    let (key, intent) = match &device {
        Some(d) => (d.key.clone(), d.intent()),
        None => (new_key()?, Intent::Guest),
    };
    // Let the server settle after setup before the first reading.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = rss_kib(args.server_pid)?;
    let tcp_before = kernel_tcp_kib();
    if !args.json {
        eprintln!("server VmRSS before: {rss_before} KiB");
    }

    let mut held: Vec<RawConnection> = Vec::with_capacity(args.count);
    let mut readings = Vec::new();
    let mut first_error = None;
    let quarters: Vec<usize> = (1..=4).map(|q| args.count * q / 4).collect();
    let started = Instant::now();
    let mut next = 0usize;
    'open: for &mark in &quarters {
        while next < mark {
            let batch_end = (next + args.parallel).min(mark);
            let opening: Vec<_> = (next..batch_end)
                .map(|i| {
                    let (target, key, intent) = (Arc::clone(&target), key.clone(), intent.clone());
                    let source = source(i, args.per_source);
                    tokio::spawn(async move {
                        RawConnection::open(&target, &key, intent, Some(source)).await
                    })
                })
                .collect();
            next = batch_end;
            for task in opening {
                match task.await.context("an opener died")? {
                    Ok(connection) => held.push(connection),
                    Err(error) => {
                        first_error.get_or_insert_with(|| format!("{error:#}"));
                    }
                }
            }
            if first_error.is_some() {
                break 'open;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let reading = reading(&args, held.len(), rss_before, tcp_before, readings.last())?;
        if !args.json {
            eprintln!(
                "{} connections: server VmRSS {} KiB, {:.1} KiB per connection ({:.1} since the last reading)",
                reading.connections,
                reading.server_rss_kib,
                reading.kib_per_connection,
                reading.kib_per_connection_step
            );
        }
        readings.push(reading);
    }
    let open_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(
        args.hold_seconds.clamp(0.0, 3_600.0),
    ))
    .await;
    let last = reading(&args, held.len(), rss_before, tcp_before, readings.last())?;
    readings.push(last);

    // Evenly spread connections must still answer (a ping of an unknown session: any reply).
    let sample = args.sample.min(held.len());
    let mut answered = 0;
    if let Some(step) = held.len().checked_div(sample) {
        for i in (0..sample).map(|k| k * step) {
            if let Some(connection) = held.get_mut(i) {
                let asked = connection.request(RequestBody::Ping {
                    hsid: Bytes(random()?),
                });
                if matches!(tokio::time::timeout(STEP_TIMEOUT, asked).await, Ok(Ok(_))) {
                    answered += 1;
                }
            }
        }
    }
    let report = ConnectionsReport {
        gateway: args.gateway.clone(),
        as_guest: args.guest,
        requested: args.count,
        opened: held.len(),
        first_error,
        open_seconds,
        handshakes_per_sec: held.len() as f64 / open_seconds,
        rss_before_kib: rss_before,
        kernel_tcp_before_kib: tcp_before,
        readings,
        sampled: sample,
        answered,
    };
    drop(held);
    print_connections(&report, args.json)
}

fn reading(
    args: &ConnectionsArgs,
    connections: usize,
    before: u64,
    tcp_before: u64,
    previous: Option<&RssReading>,
) -> anyhow::Result<RssReading> {
    let rss = rss_kib(args.server_pid)?;
    let (rss_then, connections_then) =
        previous.map_or((before, 0), |p| (p.server_rss_kib, p.connections));
    let opened = connections.saturating_sub(connections_then);
    Ok(RssReading {
        connections,
        server_rss_kib: rss,
        kib_per_connection: rss.saturating_sub(before) as f64 / connections.max(1) as f64,
        kib_per_connection_step: if opened == 0 {
            0.0
        } else {
            (rss as f64 - rss_then as f64) / opened as f64
        },
        kernel_tcp_kib: kernel_tcp_kib().saturating_sub(tcp_before),
    })
}

fn print_connections(report: &ConnectionsReport, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(report)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "bench connections against {} as {}: {} of {} opened in {:.1} s ({:.0}/s)",
        report.gateway,
        if report.as_guest {
            "guests"
        } else {
            "one account"
        },
        report.opened,
        report.requested,
        report.open_seconds,
        report.handshakes_per_sec
    )?;
    if let Some(error) = &report.first_error {
        writeln!(out, "  stopped opening at the first error: {error}")?;
    }
    writeln!(
        out,
        "| connections | server VmRSS KiB | KiB/connection | KiB/connection since last row | kernel TCP KiB (both ends) |"
    )?;
    writeln!(
        out,
        "|------------:|-----------------:|---------------:|------------------------------:|---------------------------:|"
    )?;
    writeln!(out, "| 0 | {} | — | — | — |", report.rss_before_kib)?;
    for r in &report.readings {
        writeln!(
            out,
            "| {} | {} | {:.1} | {:.1} | {} |",
            r.connections,
            r.server_rss_kib,
            r.kib_per_connection,
            r.kib_per_connection_step,
            r.kernel_tcp_kib
        )?;
    }
    writeln!(
        out,
        "sample: {} of {} held connections answered a request after the hold",
        report.answered, report.sampled
    )?;
    Ok(())
}
