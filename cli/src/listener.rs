//! The one TCP listener `serve` opens (the business API, the device gateway and the SFS share
//! it), and the limits that keep a client without credentials from taking it down.
//!
//! Rules:
//! - at most `max_connections` connections are open at once, and at most
//!   `max_connections_per_address` from one client address. Past either cap a new connection is
//!   answered `503` problem+json and closed at once: the process never runs into its open-file
//!   limit, so accepting never fails and `/healthz` keeps answering well-behaved clients. The
//!   global cap is lowered at start to fit the process's open-file limit, keeping
//!   [`RESERVED_FILES`] for the database pool, the broker and logs;
//! - a connection must send a complete request head within `header_timeout`, the first one and
//!   every one after on a kept-alive connection: a client that connects and sends nothing, or
//!   trickles a request line (slowloris), is closed then;
//! - an HTTP connection on which nothing was read or written for `idle_timeout` is closed (a
//!   client that asked for a large answer or a stream and stopped reading it);
//! - a connection upgraded to a WebSocket (device and SFS channels) still counts against both
//!   caps until it closes; its idle and handshake limits are the gateway's and the SFS's own.
//!
//! The accept loop never sleeps on a healthy listener; after an accept error (the file limit
//! reached by something else in the process) it waits [`ACCEPT_BACKOFF`] and logs at most once
//! a second.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::connect_info::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt as _;

/// Open files kept free of connections for everything else the process opens.
pub const RESERVED_FILES: u64 = 256;
/// Most header lines hyper parses in one request.
pub const MAX_HEADERS: usize = 256;
/// How long the accept loop pauses after an accept error.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Connection limits of `serve`'s listener.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionLimits {
    /// Most connections open at once (lowered to fit the open-file limit).
    #[arg(long, env = "COUNTERSIGN_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Most connections open at once from one client address; 0: no per-address cap (behind
    /// a reverse proxy, every connection comes from the proxy's address).
    #[arg(
        long,
        env = "COUNTERSIGN_MAX_CONNECTIONS_PER_ADDRESS",
        default_value_t = 256
    )]
    pub max_connections_per_address: usize,
    /// Longest a client may take to send a request head, also between two requests on a
    /// kept-alive connection, milliseconds.
    #[arg(long, env = "COUNTERSIGN_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_timeout_ms: u64,
    /// An HTTP connection on which nothing moved for this long is closed, milliseconds.
    #[arg(long, env = "COUNTERSIGN_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    pub idle_timeout_ms: u64,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_connections_per_address: 256,
            header_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
        }
    }
}

/// The answer a connection past a cap gets before it is closed.
static FULL: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    let body = r#"{"type":"about:blank","title":"Service Unavailable","status":503,"detail":"too many connections: retry in a moment"}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
});

/// The process's soft open-file limit, where the platform tells it.
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Who holds which connections: the global count and one count per client address.
#[derive(Debug)]
struct Counts {
    open: usize,
    by_address: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
struct Gate {
    max: usize,
    per_address: usize,
    counts: Mutex<Counts>,
}

/// One admitted connection; gives its place back when dropped (with the socket, also after
/// an upgrade).
#[derive(Debug)]
struct Admission {
    gate: Arc<Gate>,
    address: IpAddr,
}

impl Gate {
    fn admit(self: &Arc<Self>, address: IpAddr) -> Option<Admission> {
        let mut counts = self.counts.lock().ok()?;
        if counts.open >= self.max {
            return None;
        }
        let from = counts.by_address.get(&address).copied().unwrap_or(0);
        if self.per_address > 0 && from >= self.per_address {
            return None;
        }
        counts.open += 1;
        counts.by_address.insert(address, from + 1);
        Some(Admission {
            gate: self.clone(),
            address,
        })
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.gate.counts.lock() {
            counts.open = counts.open.saturating_sub(1);
            if let Some(n) = counts.by_address.get_mut(&self.address) {
                *n -= 1;
                if *n == 0 {
                    counts.by_address.remove(&self.address);
                }
            }
        }
    }
}

/// Milliseconds since the first use, for cheap shared timestamps.
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A socket that remembers when bytes last moved, and holds its connection's admission.
struct Watched {
    socket: TcpStream,
    last: Arc<AtomicU64>,
    _admission: Admission,
}

impl Watched {
    fn touch(&self) {
        self.last.store(now_ms(), Ordering::Relaxed);
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.socket).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.touch();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.socket).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.socket).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.socket.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().socket).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().socket).poll_shutdown(cx)
    }
}

/// Serves `app` on `listener` under `limits` until `stop` resolves; then stops accepting,
/// lets open requests finish (connections close once idle) and answers. Connections still
/// open are the caller's to cut (by dropping the runtime or a grace timer).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &ConnectionLimits,
    stop: impl std::future::Future<Output = ()> + Send,
) {
    let max = match open_file_limit() {
        Some(files) => {
            let fit =
                usize::try_from(files.saturating_sub(RESERVED_FILES).max(1)).unwrap_or(usize::MAX);
            if fit < limits.max_connections {
                tracing::warn!(
                    open_file_limit = files,
                    max_connections = fit,
                    "lowered max connections to fit the open-file limit"
                );
            }
            fit.min(limits.max_connections)
        }
        None => limits.max_connections,
    }
    .max(1);
    let gate = Arc::new(Gate {
        max,
        per_address: limits.max_connections_per_address,
        counts: Mutex::new(Counts {
            open: 0,
            by_address: HashMap::new(),
        }),
    });
    let header_timeout = Duration::from_millis(limits.header_timeout_ms.max(1));
    let idle_timeout = Duration::from_millis(limits.idle_timeout_ms.max(1));
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    let mut stop = std::pin::pin!(stop);
    let mut last_error_log: Option<Instant> = None;
    loop {
        let (socket, remote) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    if last_error_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        tracing::warn!(%error, "accept failed");
                        last_error_log = Some(Instant::now());
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Some(admission) = gate.admit(remote.ip()) else {
            // Answered without waiting: a fresh socket's send buffer takes these bytes.
            let _ = socket.try_write(&FULL);
            continue;
        };
        let _ = socket.set_nodelay(true);
        let last = Arc::new(AtomicU64::new(now_ms()));
        let io = Watched {
            socket,
            last: last.clone(),
            _admission: admission,
        };
        tokio::spawn(connection(
            io,
            remote,
            app.clone(),
            header_timeout,
            idle_timeout,
            last,
            stopped.clone(),
        ));
    }
    let _ = stopping.send(true);
    // Wait for every connection task to let go of its receiver (this one's first).
    drop(stopped);
    stopping.closed().await;
}

async fn connection(
    io: Watched,
    remote: SocketAddr,
    app: Router,
    header_timeout: Duration,
    idle_timeout: Duration,
    last: Arc<AtomicU64>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let service = tower::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(remote));
        let app = app.clone();
        async move {
            let response = app
                .oneshot(request.map(axum::body::Body::new))
                .await
                .unwrap_or_else(|never: Infallible| match never {});
            Ok::<_, Infallible>(response)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        // Above hyper's 100, so that the API's own limit on header bytes answers a
        // problem document (431) before hyper's bare one.
        .max_headers(MAX_HEADERS);
    let conn = builder
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let mut watch = tokio::time::interval((idle_timeout / 4).max(Duration::from_millis(10)));
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut draining = *stopped.borrow();
    if draining {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(error) = served {
                    tracing::debug!(%error, "connection ended");
                }
                break;
            }
            changed = stopped.changed(), if !draining => {
                draining = true;
                if changed.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
            }
            _ = watch.tick() => {
                let idle = now_ms().saturating_sub(last.load(Ordering::Relaxed));
                if u128::from(idle) >= idle_timeout.as_millis() {
                    tracing::debug!(%remote, "closing an idle connection");
                    break;
                }
            }
        }
    }
}
