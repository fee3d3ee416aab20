//! What a hostile network or a careless integrator can hold: connection floods on loopback
//! (silent, slowloris, past the caps) while a well-behaved client keeps getting answers;
//! guest device channels that do nothing; event streams past their caps, after their key is
//! revoked and past their lifetime; and the one shared reader of the log behind every stream.
//!
//! Floods come from other loopback addresses (127.0.0.2, 127.0.0.3…) than the well-behaved
//! client (127.0.0.1), as separate machines would. Every loop is bounded in count and time.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use countersign_eventstore::testing::TestDb;
use countersign_protocol::channel::StaticKey;
use countersign_protocol::device::{Intent, Welcome};
use futures::StreamExt as _;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

use crate::api::Api;
use crate::device::RawDevice;
use crate::transactions_device::put_user;

/// Longest any single step here may take before the test fails.
const WAIT: Duration = Duration::from_secs(20);

async fn connect_from(source: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    socket.connect(to).await
}

/// Reads until the server closes the connection; answers what it sent.
async fn read_to_close(socket: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buffer = [0u8; 1024];
    loop {
        match socket.read(&mut buffer).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buffer[..n]),
        }
    }
}

async fn healthz(client: &reqwest::Client, api: &Api) -> StatusCode {
    client
        .get(api.url("/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_or(StatusCode::SERVICE_UNAVAILABLE, |r| r.status())
}

/// A client of its own from 127.0.0.1 (no pooled connection shared with the test's others).
fn well_behaved() -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::LOCALHOST))
        .build()
        .unwrap()
}

/// Two flooding addresses, 1,000 connections each, half silent and half sending a partial
/// request line: each address gets its 100, the rest a 503 at once; the held ones are closed
/// by the header timeout; `/healthz` answers the well-behaved client throughout.
#[tokio::test]
async fn a_connection_flood_does_not_stop_the_server() {
    let db = TestDb::sqlite().await;
    let api = Api::start_tuned(&db, |args| {
        args.limits.max_connections = 1_000;
        args.limits.max_connections_per_address = 100;
        args.limits.header_timeout_ms = 5_000;
    })
    .await;
    let addr = api.running.addr;
    let client = well_behaved();
    assert_eq!(healthz(&client, &api).await, StatusCode::OK);

    let mut held = Vec::new();
    let mut refused = 0;
    for (i, source) in [Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)]
        .into_iter()
        .enumerate()
    {
        for n in 0..1_000 {
            let Ok(mut socket) = connect_from(source, addr).await else {
                continue;
            };
            if n % 2 == 0 {
                socket
                    .write_all(b"GET /v1/servers HTTP/1.1\r\nHo")
                    .await
                    .ok();
            }
            held.push((i, socket));
        }
        assert_eq!(
            healthz(&client, &api).await,
            StatusCode::OK,
            "during the flood"
        );
    }
    // The refused ones were answered 503 problem+json and closed at once; the held ones say
    // nothing until the header timeout.
    let probes = held.into_iter().map(|(i, mut socket)| async move {
        let mut first = [0u8; 12];
        match tokio::time::timeout(Duration::from_millis(500), socket.read(&mut first)).await {
            Ok(Ok(n)) if n > 0 => {
                let rest = read_to_close(&mut socket).await;
                Err((first[..n].to_vec(), rest))
            }
            _ => Ok((i, socket)),
        }
    });
    let mut kept = Vec::new();
    for probe in futures::future::join_all(probes).await {
        match probe {
            Ok(held) => kept.push(held),
            Err((first, rest)) => {
                assert_eq!(first, &b"HTTP/1.1 503"[..first.len()], "refusal");
                assert!(
                    String::from_utf8_lossy(&rest).contains("application/problem+json"),
                    "a problem document"
                );
                refused += 1;
            }
        }
    }
    assert_eq!(kept.len(), 200, "100 held from each address");
    assert_eq!(refused, 1_800, "the rest refused, none left hanging");
    assert_eq!(healthz(&client, &api).await, StatusCode::OK);

    // The held ones are closed by the header timeout, silent and slowloris alike.
    let closed = tokio::time::timeout(WAIT, async {
        for (_, mut socket) in kept {
            read_to_close(&mut socket).await;
        }
    })
    .await;
    assert!(closed.is_ok(), "every held connection was closed");
    // And the address may connect again.
    let mut again = connect_from(Ipv4Addr::new(127, 0, 0, 2), addr)
        .await
        .unwrap();
    again
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = tokio::time::timeout(WAIT, read_to_close(&mut again))
        .await
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    api.stop().await;
    db.finish().await;
}

/// Past the global cap every new connection gets a 503 at once, never an accept error, and
/// the server answers again as soon as the held connections time out.
#[tokio::test]
async fn past_the_global_cap_connections_are_refused_not_dropped() {
    let db = TestDb::sqlite().await;
    let api = Api::start_tuned(&db, |args| {
        args.limits.max_connections = 50;
        args.limits.max_connections_per_address = 0;
        args.limits.header_timeout_ms = 1_000;
    })
    .await;
    let addr = api.running.addr;
    let mut held = Vec::new();
    for n in 0..50u8 {
        held.push(
            connect_from(Ipv4Addr::new(127, 0, 1, n + 1), addr)
                .await
                .unwrap(),
        );
    }
    // Full: even the well-behaved client is refused, with a document, not a reset.
    let mut refused = connect_from(Ipv4Addr::LOCALHOST, addr).await.unwrap();
    let answer = tokio::time::timeout(WAIT, read_to_close(&mut refused))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("retry-after: 1"), "{text}");
    // Once the silent ones are closed, it answers again.
    tokio::time::timeout(WAIT, async {
        for mut socket in held {
            read_to_close(&mut socket).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(healthz(&well_behaved(), &api).await, StatusCode::OK);
    api.stop().await;
    db.finish().await;
}

/// A guest channel (a key anyone can make up) that completed its handshake and then sends
/// nothing is closed after the guest idle time; one that keeps sending requests is closed at
/// the end of the guest lifetime. An account's channel is not a guest's.
#[tokio::test]
async fn idle_guest_channels_are_closed() {
    let db = TestDb::sqlite().await;
    let api = Api::start_tuned(&db, |args| {
        args.streams.guest_idle_ms = 300;
        args.streams.guest_lifetime_ms = 3_000;
    })
    .await;
    let (server, _token) = api.tenant("Bank").await;
    let mut guests = Vec::new();
    for n in 0..20u8 {
        let key = StaticKey::from_bytes(&[n + 1; 32]).unwrap();
        let (guest, welcome) = RawDevice::connect(&api, &server, &key, Intent::Guest).await;
        assert!(matches!(welcome, Welcome::Accepted { .. }), "{welcome:?}");
        guests.push(guest);
    }
    let started = std::time::Instant::now();
    for guest in &mut guests {
        assert!(guest.closed().await, "an idle guest is closed");
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "by the idle time, not the lifetime"
    );
    api.stop().await;
    db.finish().await;
}

/// One server-sent-event frame's data.
struct Frame {
    data: Option<String>,
}

/// Reads SSE frames off a response body.
struct SseReader {
    body: futures::stream::BoxStream<'static, reqwest::Result<Vec<u8>>>,
    buffer: String,
}

impl SseReader {
    async fn open(api: &Api, path: &str, token: &str) -> Result<Self, (StatusCode, Value)> {
        let response = api
            .http
            .get(api.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        if response.status() != StatusCode::OK {
            let status = response.status();
            return Err((status, response.json().await.unwrap_or(Value::Null)));
        }
        Ok(Self {
            body: Box::pin(
                response
                    .bytes_stream()
                    .map(|chunk| chunk.map(|b| b.to_vec())),
            ),
            buffer: String::new(),
        })
    }

    /// The next frame with data, or `None` once the server ended the stream.
    async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let text: String = self.buffer.drain(..end + 2).collect();
                let field = |name: &str| {
                    text.lines()
                        .find_map(|l| l.strip_prefix(name))
                        .map(|v| v.trim().to_owned())
                };
                let frame = Frame {
                    data: field("data:"),
                };
                if frame.data.is_some() {
                    return Some(frame);
                }
                continue;
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buffer.push_str(std::str::from_utf8(&chunk).unwrap()),
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// The next event's data as JSON, within [`WAIT`].
    async fn event(&mut self) -> Value {
        let frame = tokio::time::timeout(WAIT, self.next())
            .await
            .expect("an event in time")
            .expect("the stream is open");
        serde_json::from_str(&frame.data.unwrap()).unwrap()
    }

    /// Whether the server ends the stream within [`WAIT`] (events before the end are skipped).
    async fn ends(&mut self) -> bool {
        tokio::time::timeout(WAIT, async { while self.next().await.is_some() {} })
            .await
            .is_ok()
    }
}

/// `countersign_stream_log_reads_total{reader=…}` from `/metrics`.
async fn log_reads(api: &Api, reader: &str) -> u64 {
    let text = api.metrics().await;
    let prefix = format!("countersign_stream_log_reads_total{{reader=\"{reader}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// 200 open feeds of one tenant cost no query each per commit: after they caught up, ten
/// writes are read from the log by the one shared reader only, every stream gets every event,
/// and the writes answer as without streams.
async fn many_streams_share_one_reader_of_the_log(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    put_user(&api, &server, &token, "before").await;
    let head = api.head().await.unwrap();
    let mut streams = Vec::new();
    for _ in 0..200 {
        let path = format!("/v1/servers/{server}/events/stream?after={head}");
        streams.push(SseReader::open(&api, &path, &token).await.ok().unwrap());
    }
    // Each caught up once it answered its greeting; the first write shows they all listen.
    put_user(&api, &server, &token, "first").await;
    for stream in &mut streams {
        let event = stream.event().await;
        assert!(
            event["stream"].as_str().unwrap().contains(&server),
            "{event}"
        );
    }
    let catch_up = log_reads(&api, "catch_up").await;
    let shared = log_reads(&api, "shared").await;
    for n in 0..10 {
        put_user(&api, &server, &token, &format!("u{n}")).await;
    }
    for stream in &mut streams {
        let mut registered = 0;
        while registered < 10 {
            if stream.event().await["type"] == "user.registered" {
                registered += 1;
            }
        }
    }
    assert_eq!(
        log_reads(&api, "catch_up").await,
        catch_up,
        "no stream read the log itself"
    );
    let shared_reads = log_reads(&api, "shared").await - shared;
    assert!(
        (1..200).contains(&shared_reads),
        "ten commits, {shared_reads} reads by the shared reader: fewer than one per stream"
    );
    drop(streams);
    api.stop().await;
}

/// Caps per key and per server answer 429 problem+json before a stream starts, and a closed
/// stream gives its place back.
async fn streams_are_capped_per_key_and_per_server(db: &TestDb) {
    let api = Api::start_tuned(db, |args| {
        args.streams.max_streams_per_key = 3;
        args.streams.max_streams_per_server = 4;
    })
    .await;
    let (server, token) = api.tenant("Bank").await;
    let (status, second) = api
        .admin(
            Method::POST,
            &format!("/v1/servers/{server}/api-keys"),
            Some(serde_json::json!({"label": "second"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let second = second["token"].as_str().unwrap().to_owned();
    let path = format!("/v1/servers/{server}/events/stream");
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(SseReader::open(&api, &path, &token).await.ok().unwrap());
    }
    let Err((status, problem)) = SseReader::open(&api, &path, &token).await else {
        panic!("a fourth stream of one key");
    };
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(problem["status"], 429, "{problem}");
    // Another key of the same server: one more, then the server's cap.
    open.push(SseReader::open(&api, &path, &second).await.ok().unwrap());
    let Err((status, _)) = SseReader::open(&api, &path, &second).await else {
        panic!("a fifth stream of one server");
    };
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // Closing one frees its place (the server notices the closed connection on its next
    // write; the keep-alive or an event makes one).
    drop(open.remove(0));
    put_user(&api, &server, &token, "wake").await;
    let reopened = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(stream) = SseReader::open(&api, &path, &token).await {
                return stream;
            }
            tokio::task::yield_now().await;
            put_user(&api, &server, &token, "wake").await;
        }
    })
    .await;
    assert!(reopened.is_ok(), "a closed stream gives its place back");
    api.stop().await;
}

/// Revoking the key that opened a stream ends it (feed and session events alike); so does
/// deleting the server; and no stream outlives its lifetime.
async fn revocation_and_lifetime_end_streams(db: &TestDb) {
    let api = Api::start_tuned(db, |args| args.streams.max_stream_secs = 2).await;
    let (server, token) = api.tenant("Bank").await;
    let (status, key) = api
        .admin(
            Method::POST,
            &format!("/v1/servers/{server}/api-keys"),
            Some(serde_json::json!({"label": "revoked soon"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let doomed = key["token"].as_str().unwrap().to_owned();
    let key_id = key["key_id"].as_str().unwrap().to_owned();
    let nonce = hex::encode([0x42u8; 16]);
    let (status, body) = api
        .call(
            Method::PUT,
            &format!("/v1/servers/{server}/sessions/{nonce}"),
            Some(&doomed),
            Some(serde_json::json!({})),
        )
        .await;
    assert!(status.is_success(), "{body}");
    let mut feed = SseReader::open(
        &api,
        &format!("/v1/servers/{server}/events/stream"),
        &doomed,
    )
    .await
    .ok()
    .unwrap();
    let head = api.head().await.unwrap();
    let mut session = SseReader::open(
        &api,
        &format!("/v1/servers/{server}/sessions/{nonce}/events?min_position={head}"),
        &doomed,
    )
    .await
    .ok()
    .unwrap();
    assert_eq!(session.event().await["state"], "pending");
    let (status, _) = api
        .admin(
            Method::DELETE,
            &format!("/v1/servers/{server}/api-keys/{key_id}"),
            None,
        )
        .await;
    assert!(status.is_success());
    assert!(feed.ends().await, "the feed of a revoked key ends");
    assert!(session.ends().await, "session events of a revoked key end");
    // Nothing written after the revocation reaches the revoked key.
    let (status, _) = api
        .call(
            Method::GET,
            &format!("/v1/servers/{server}/events/stream"),
            Some(&doomed),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A deleted server's streams end too.
    let mut feed = SseReader::open(&api, &format!("/v1/servers/{server}/events/stream"), &token)
        .await
        .ok()
        .unwrap();
    let (status, _) = api
        .admin(Method::DELETE, &format!("/v1/servers/{server}"), None)
        .await;
    assert!(status.is_success());
    assert!(feed.ends().await, "the feed of a deleted server ends");

    // Lifetime: a quiet stream ends on its own after two seconds.
    let (other, other_token) = api.tenant("Other").await;
    let mut quiet = SseReader::open(
        &api,
        &format!("/v1/servers/{other}/events/stream"),
        &other_token,
    )
    .await
    .ok()
    .unwrap();
    let started = std::time::Instant::now();
    assert!(quiet.ends().await);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "not before its time"
    );
    api.stop().await;
}

countersign_eventstore::on_both_backends!(
    many_streams_share_one_reader_of_the_log,
    streams_are_capped_per_key_and_per_server,
    revocation_and_lifetime_end_streams
);
