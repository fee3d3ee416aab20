//! `countersign ds-echo`: a tiny Data Service for the demo and for developers. It verifies each
//! request with [`countersign_protocol::data_service::verify_request`] against the server's
//! published public key, refuses a nonce seen before (replay, 401), answers a request id seen
//! before with the answer it gave then (idempotency), and otherwise answers `200` with the body
//! it got. It is what `docs/data-service.md` asks of a DS, in Rust; `tests/ds/ds_verify.py` is
//! the same in Python, written from the doc alone.
//!
//! It logs ids and outcomes, never the app data. Its memory is in-process and bounded
//! ([`MAX_REMEMBERED`] answers, nonces for twice the window): a real DS keeps both where its
//! instances share them.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use countersign_commands::Clock as _;
use countersign_protocol::data_service::{
    DEFAULT_WINDOW_SECS, IncomingRequest, VerifiedRequest, verify_request,
};
use p256::ecdsa::VerifyingKey;

/// Answers remembered for repeated request ids.
pub const MAX_REMEMBERED: usize = 100_000;
/// Largest body accepted: the NS's own cap.
const MAX_BODY: usize = 64 * 1024;

/// `countersign ds-echo`.
#[derive(Debug, clap::Args)]
pub struct DsEchoArgs {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// Where to read the server's public key: the NS's `GET /v1/device/servers/{server_id}`
    /// (its JSON's `public_key`), read once at start.
    #[arg(
        long,
        required_unless_present = "public_key",
        conflicts_with = "public_key"
    )]
    pub server_key_url: Option<String>,
    /// A file holding the server's public key: SEC1 uncompressed, hex (the API's
    /// `public_key`).
    #[arg(long)]
    pub public_key: Option<PathBuf>,
    /// This DS's URL as configured at the NS (what the signature's `@target-uri` must be).
    /// Default: `http://` + the request's `Host` + its path.
    #[arg(long)]
    pub url: Option<String>,
    /// Seconds either side of now a signature's `created` may be.
    #[arg(long, default_value_t = DEFAULT_WINDOW_SECS)]
    pub window_secs: u64,
}

/// What the echo DS checks against.
#[derive(Debug, Clone)]
pub struct EchoConfig {
    /// The server's public key.
    pub key: VerifyingKey,
    /// Its own URL as configured at the NS, if not derived from `Host`.
    pub url: Option<String>,
    /// Seconds either side of now a signature's `created` may be.
    pub window_secs: u64,
}

/// Runs `countersign ds-echo` until interrupted.
pub async fn run(args: DsEchoArgs) -> anyhow::Result<()> {
    let hex_key = match (&args.public_key, &args.server_key_url) {
        (Some(path), _) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?,
        (None, Some(url)) => {
            let view: serde_json::Value = reqwest::get(url)
                .await
                .context("cannot fetch the server key")?
                .error_for_status()
                .context("the server key URL answered an error")?
                .json()
                .await
                .context("the server key URL did not answer JSON")?;
            view.get("public_key")
                .and_then(|k| k.as_str())
                .context("the server key JSON has no public_key")?
                .to_owned()
        }
        (None, None) => anyhow::bail!("give --server-key-url or --public-key"),
    };
    let key = parse_public_key(&hex_key)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr()?;
    {
        use std::io::Write as _;
        writeln!(
            std::io::stdout().lock(),
            "ds-echo listening on http://{local}"
        )?;
    }
    serve(
        listener,
        EchoConfig {
            key,
            url: args.url,
            window_secs: args.window_secs,
        },
    )
    .await?;
    Ok(())
}

/// A SEC1 uncompressed P-256 public key in hex (surrounding whitespace ignored).
pub fn parse_public_key(hex_key: &str) -> anyhow::Result<VerifyingKey> {
    let bytes = hex::decode(hex_key.trim()).context("the public key is not hex")?;
    VerifyingKey::from_sec1_bytes(&bytes).map_err(|_| anyhow::anyhow!("not a P-256 public key"))
}

/// Serves the echo DS on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, config: EchoConfig) -> std::io::Result<()> {
    let state = Arc::new(Echo {
        config,
        memory: Mutex::new(Memory::default()),
    });
    let app = axum::Router::new()
        .fallback(handle)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state);
    axum::serve(listener, app).await
}

struct Echo {
    config: EchoConfig,
    memory: Mutex<Memory>,
}

#[derive(Default)]
struct Memory {
    /// (server, nonce) → created.
    nonces: HashMap<([u8; 16], [u8; 16]), u64>,
    /// (server, request id) → the answer given.
    answers: HashMap<([u8; 16], [u8; 16]), Bytes>,
    order: VecDeque<([u8; 16], [u8; 16])>,
}

async fn handle(
    State(echo): State<Arc<Echo>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let target = match &echo.config.url {
        Some(url) => url.clone(),
        None => {
            let host = headers
                .get(axum::http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or_default();
            let path = uri.path_and_query().map_or("/", |p| p.as_str());
            format!("http://{host}{path}")
        }
    };
    // Non-ASCII header values cannot be covered components; they are left out and, if covered,
    // fail as absent.
    let fields: Vec<(&str, &str)> = headers
        .iter()
        .filter_map(|(n, v)| v.to_str().ok().map(|v| (n.as_str(), v)))
        .collect();
    let now =
        u64::try_from(countersign_commands::SystemClock.now().as_millis() / 1000).unwrap_or(0);
    let verified = verify_request(
        &IncomingRequest {
            method: method.as_str(),
            target_uri: &target,
            headers: &fields,
            body: &body,
        },
        &echo.config.key,
        now,
        echo.config.window_secs,
    );
    let request = match verified {
        Ok(request) => request,
        Err(error) => {
            tracing::info!(%error, "ds-echo refused a request");
            return (StatusCode::UNAUTHORIZED, format!("refused: {error}")).into_response();
        }
    };
    match remember(&echo, &request, &body, now) {
        Seen::Replay => {
            tracing::info!(request_id = %hex::encode(request.request_id), "ds-echo refused a replay");
            (StatusCode::UNAUTHORIZED, "refused: replayed").into_response()
        }
        Seen::Repeat(answer) => {
            tracing::info!(request_id = %hex::encode(request.request_id), "ds-echo answered a repeat");
            (StatusCode::OK, answer).into_response()
        }
        Seen::New => {
            tracing::info!(
                account = %hex::encode(request.account_id),
                headless = request.headless,
                request_id = %hex::encode(request.request_id),
                bytes = body.len(),
                "ds-echo delivered"
            );
            (StatusCode::OK, body).into_response()
        }
    }
}

enum Seen {
    New,
    Repeat(Bytes),
    Replay,
}

fn remember(echo: &Echo, request: &VerifiedRequest, body: &Bytes, now: u64) -> Seen {
    let Ok(mut memory) = echo.memory.lock() else {
        return Seen::Replay;
    };
    let horizon = now.saturating_sub(2 * echo.config.window_secs);
    memory.nonces.retain(|_, created| *created >= horizon);
    if memory
        .nonces
        .insert((request.server_id, request.nonce), request.created)
        .is_some()
    {
        return Seen::Replay;
    }
    let key = (request.server_id, request.request_id);
    if let Some(answer) = memory.answers.get(&key) {
        return Seen::Repeat(answer.clone());
    }
    if memory.order.len() >= MAX_REMEMBERED
        && let Some(oldest) = memory.order.pop_front()
    {
        memory.answers.remove(&oldest);
    }
    memory.answers.insert(key, body.clone());
    memory.order.push_back(key);
    Seen::New
}
