//! Local stand-ins for FCM and APNs, for tests, benches and a developer's machine.
//!
//! Owns two small servers that speak the documented HTTP APIs of the push services closely
//! enough that the real senders ([`crate::fcm`], [`crate::apns`]) run against them unchanged:
//! the FCM stand-in ([`FcmStandin`], HTTP/1.1) with its OAuth2 token endpoint, the APNs stand-in
//! ([`ApnsStandin`], HTTP/2 over TLS with a test CA it generates at start). What they share
//! lives here:
//! - [`Faults`]: the next N answers, for one token or for all, are `unregistered`, `bad_token`,
//!   `unavailable` (with an optional `Retry-After`), `auth` or `drop` (answered as a success but
//!   never handed to the phone).
//! - [`Recording`]: every request as received (request line, headers, body), for the test that
//!   no clear text ever reaches a push service.
//! - Per-token inboxes the virtual phone reads, in process ([`FcmStandin::next_push`]) or over
//!   the plain HTTP control API (`GET /standin/devices/{token}/pushes?after=N&wait_ms=M`, a long
//!   poll answering `[{"seq":n,"payload":{…}}]`), so another process (`countersign device
//!   listen`) can receive pushes too.
//! - Control routes: `POST /standin/faults` (`{"token":null|"…","fault":{"kind":"unavailable",
//!   "retry_after_secs":2},"count":1}`), `DELETE /standin/faults`, `GET /standin/stats`
//!   (`{"accepted":n,"requests":n}`), `GET /standin/recording` (the raw bytes) and
//!   `/standin/echo` (an empty 200, the stand-in's bare HTTP rate for the bench).
//!
//! Rules: a stand-in generates its own credentials (the FCM one uses the fixed test-only RSA key
//! in `standin_rsa_key.pem`, since RSA key generation is slow and ring cannot do it); nothing
//! here is a real credential; waiting is on a notification, never a sleep.

/// The accessors both stand-ins have on what they share (`self.state.shared`, a [`Shared`]):
/// faults, the recording, the phones' inboxes and the success count. Expands inside an `impl`;
/// `recorded` and `accepted` say what the stand-in records and counts.
macro_rules! shared_accessors {
    (recorded: $recorded:literal, accepted: $accepted:literal $(,)?) => {
        /// The faults the next sends answer.
        #[must_use]
        pub fn faults(&self) -> &$crate::standin::Faults {
            &self.state.shared.faults
        }

        #[doc = $recorded]
        #[must_use]
        pub fn recording(&self) -> &$crate::standin::Recording {
            &self.state.shared.recording
        }

        /// The next push for `token` not yet returned by this method; waits for one.
        pub async fn next_push(&self, token: &str) -> $crate::standin::ReceivedPush {
            self.state.shared.inbox.next(token).await
        }

        /// Every push handed to `token` so far.
        #[must_use]
        pub fn pushes(&self, token: &str) -> Vec<$crate::standin::ReceivedPush> {
            self.state.shared.inbox.all(token)
        }

        #[doc = $accepted]
        #[must_use]
        pub fn received_count(&self) -> u64 {
            self.state.shared.accepted()
        }
    };
}

pub mod apns;
pub mod fcm;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::BodyExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use apns::ApnsStandin;
pub use fcm::FcmStandin;

/// The largest request body a stand-in reads (the services' own limits are 4 KiB payloads).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// The longest a control long poll may wait.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// Why a stand-in could not start.
#[derive(Debug, thiserror::Error)]
pub enum StandinError {
    /// Binding or reading a listener's address failed.
    #[error("stand-in listener: {0}")]
    Listen(#[from] std::io::Error),
    /// Generating or loading the stand-in's own credentials failed.
    #[error("stand-in credentials: {0}")]
    Credentials(&'static str),
}

/// One injected misbehaviour of a push service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// FCM `404 UNREGISTERED` / APNs `410 Unregistered`.
    Unregistered,
    /// FCM `400 INVALID_ARGUMENT` / APNs `400 BadDeviceToken`.
    BadToken,
    /// FCM `503 UNAVAILABLE` / APNs `503 ServiceUnavailable`, with `Retry-After` when given.
    Unavailable {
        /// The `Retry-After` seconds to send, if any.
        #[serde(default)]
        retry_after_secs: Option<u64>,
    },
    /// FCM `401 UNAUTHENTICATED` (and every access token issued so far is revoked) / APNs
    /// `403 ExpiredProviderToken`.
    Auth,
    /// Answer success, but do not hand the push to the phone (a push lost on the way).
    Drop,
}

#[derive(Debug, Default)]
struct FaultQueues {
    for_token: HashMap<String, VecDeque<Fault>>,
    for_all: VecDeque<Fault>,
}

/// The faults waiting to be answered; cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct Faults(Arc<Mutex<FaultQueues>>);

impl Faults {
    fn lock(&self) -> MutexGuard<'_, FaultQueues> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next `count` sends to `token` (or, with `None`, to any token) answer `fault`.
    /// A token's own faults are answered before the ones for all.
    pub fn inject(&self, token: Option<&str>, fault: Fault, count: usize) {
        let mut queues = self.lock();
        let queue = match token {
            Some(token) => queues.for_token.entry(token.to_owned()).or_default(),
            None => &mut queues.for_all,
        };
        queue.extend(std::iter::repeat_n(fault, count));
    }

    /// Forgets every waiting fault.
    pub fn clear(&self) {
        *self.lock() = FaultQueues::default();
    }

    /// How many faults are still waiting.
    #[must_use]
    pub fn pending(&self) -> usize {
        let queues = self.lock();
        queues.for_all.len() + queues.for_token.values().map(VecDeque::len).sum::<usize>()
    }

    /// Takes the fault the next send to `token` answers, if any.
    pub(crate) fn take(&self, token: &str) -> Option<Fault> {
        let mut queues = self.lock();
        if let Some(queue) = queues.for_token.get_mut(token)
            && let Some(fault) = queue.pop_front()
        {
            if queue.is_empty() {
                queues.for_token.remove(token);
            }
            return Some(fault);
        }
        queues.for_all.pop_front()
    }
}

#[derive(Debug)]
struct RecordingState {
    enabled: bool,
    requests: Vec<Vec<u8>>,
}

/// Every request a stand-in received, as bytes: `METHOD path-and-query VERSION\r\n`, the
/// headers as `name: value\r\n`, a blank line, the body. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Recording(Arc<Mutex<RecordingState>>);

impl Default for Recording {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(RecordingState {
            enabled: true,
            requests: Vec::new(),
        })))
    }
}

impl Recording {
    fn lock(&self) -> MutexGuard<'_, RecordingState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Each request received so far, in arrival order.
    #[must_use]
    pub fn requests(&self) -> Vec<Vec<u8>> {
        self.lock().requests.clone()
    }

    /// All requests received so far, one after the other.
    #[must_use]
    pub fn bytes(&self) -> Vec<u8> {
        self.lock().requests.concat()
    }

    /// How many requests were recorded.
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().requests.len()
    }

    /// Whether nothing was recorded.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets what was recorded.
    pub fn clear(&self) {
        self.lock().requests.clear();
    }

    /// Turns recording on or off (a bench sending 100,000 pushes does not need it).
    pub fn set_enabled(&self, enabled: bool) {
        self.lock().enabled = enabled;
    }

    fn record(&self, head: &axum::http::request::Parts, body: &[u8]) {
        let mut state = self.lock();
        if !state.enabled {
            return;
        }
        let mut bytes = Vec::with_capacity(256 + body.len());
        let target = head
            .uri
            .path_and_query()
            .map_or_else(|| head.uri.path(), |p| p.as_str());
        bytes.extend_from_slice(
            format!("{} {target} {:?}\r\n", head.method, head.version).as_bytes(),
        );
        if let Some(authority) = head.uri.authority() {
            // HTTP/2's :authority, which has no Host header.
            bytes.extend_from_slice(format!(":authority: {authority}\r\n").as_bytes());
        }
        for (name, value) in &head.headers {
            bytes.extend_from_slice(name.as_str().as_bytes());
            bytes.extend_from_slice(b": ");
            bytes.extend_from_slice(value.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(b"\r\n");
        bytes.extend_from_slice(body);
        state.requests.push(bytes);
    }
}

/// A push as the phone receives it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReceivedPush {
    /// Position among all pushes the stand-in handed to phones, from 1.
    pub seq: u64,
    /// The token it was sent to.
    #[serde(skip)]
    pub token: String,
    /// What the app gets: FCM's `message.data` object, APNs's whole JSON body; both carry
    /// `cs` (base64url envelope) or `cs_wake` (hex message id).
    #[serde(rename = "payload")]
    pub payload_json: serde_json::Value,
}

#[derive(Debug, Default)]
struct InboxState {
    by_token: HashMap<String, Vec<ReceivedPush>>,
    /// How far [`Inbox::next`] has read each token's pushes.
    cursors: HashMap<String, usize>,
    seq: u64,
}

/// The pushes handed to phones, per token.
#[derive(Debug)]
pub(crate) struct Inbox {
    state: Mutex<InboxState>,
    changed: watch::Sender<u64>,
}

impl Default for Inbox {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            changed: watch::Sender::new(0),
        }
    }
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn deliver(&self, token: &str, payload_json: serde_json::Value) -> u64 {
        let seq = {
            let mut state = self.lock();
            state.seq += 1;
            let seq = state.seq;
            state
                .by_token
                .entry(token.to_owned())
                .or_default()
                .push(ReceivedPush {
                    seq,
                    token: token.to_owned(),
                    payload_json,
                });
            seq
        };
        self.changed.send_modify(|v| *v = seq);
        seq
    }

    /// The next push for `token` this method has not returned yet; waits for one.
    pub(crate) async fn next(&self, token: &str) -> ReceivedPush {
        loop {
            // Subscribed before looking, so a push arriving in between still wakes us.
            let mut changed = self.changed.subscribe();
            {
                let mut state = self.lock();
                let read = state.cursors.get(token).copied().unwrap_or(0);
                let found = state
                    .by_token
                    .get(token)
                    .and_then(|pushes| pushes.get(read))
                    .cloned();
                if let Some(push) = found {
                    state.cursors.insert(token.to_owned(), read + 1);
                    return push;
                }
            }
            if changed.changed().await.is_err() {
                // The sender lives as long as `self`: unreachable, but never spin.
                std::future::pending::<()>().await;
            }
        }
    }

    /// The pushes for `token` after `after`, waiting up to `wait` for at least one.
    pub(crate) async fn after(&self, token: &str, after: u64, wait: Duration) -> Vec<ReceivedPush> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut changed = self.changed.subscribe();
            let found: Vec<ReceivedPush> = self
                .lock()
                .by_token
                .get(token)
                .map(|pushes| pushes.iter().filter(|p| p.seq > after).cloned().collect())
                .unwrap_or_default();
            if !found.is_empty() {
                return found;
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Vec::new(),
            }
        }
    }

    /// All pushes for `token` so far.
    pub(crate) fn all(&self, token: &str) -> Vec<ReceivedPush> {
        self.lock().by_token.get(token).cloned().unwrap_or_default()
    }
}

/// What both stand-ins keep.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) faults: Faults,
    pub(crate) recording: Recording,
    pub(crate) inbox: Inbox,
    /// Pushes answered as a success (including dropped ones).
    pub(crate) accepted: AtomicU64,
    /// Push requests received (any answer).
    pub(crate) requests: AtomicU64,
}

impl Shared {
    pub(crate) fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

/// Reads the whole body (up to [`MAX_REQUEST_BYTES`]), records the request, hands it on.
pub(crate) async fn record_layer(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let (head, body) = request.into_parts();
    let body = match http_body_util::Limited::new(body, MAX_REQUEST_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return StatusCode::PAYLOAD_TOO_LARGE.into_response(),
    };
    shared.recording.record(&head, &body);
    next.run(Request::from_parts(head, axum::body::Body::from(body)))
        .await
}

#[derive(Deserialize)]
struct PushesQuery {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    wait_ms: u64,
}

async fn pushes(
    State(shared): State<Arc<Shared>>,
    Path(token): Path<String>,
    Query(query): Query<PushesQuery>,
) -> Response {
    let wait = Duration::from_millis(query.wait_ms).min(MAX_WAIT);
    let found = shared.inbox.after(&token, query.after, wait).await;
    axum::Json(found).into_response()
}

#[derive(Deserialize)]
struct FaultRequest {
    #[serde(default)]
    token: Option<String>,
    fault: Fault,
    #[serde(default = "one")]
    count: usize,
}

fn one() -> usize {
    1
}

async fn add_fault(
    State(shared): State<Arc<Shared>>,
    axum::Json(request): axum::Json<FaultRequest>,
) -> StatusCode {
    shared.faults.inject(
        request.token.as_deref(),
        request.fault,
        request.count.min(1_000_000),
    );
    StatusCode::NO_CONTENT
}

async fn clear_faults(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.faults.clear();
    StatusCode::NO_CONTENT
}

async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(serde_json::json!({
        "accepted": shared.accepted(),
        "requests": shared.requests.load(Ordering::Relaxed),
    }))
    .into_response()
}

async fn recording(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        shared.recording.bytes(),
    )
        .into_response()
}

/// The cheapest answer a stand-in gives: what its HTTP stack alone costs.
pub(crate) async fn echo() -> StatusCode {
    StatusCode::OK
}

/// The control API (see the module doc), the same for both stand-ins.
pub(crate) fn control_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/standin/devices/{token}/pushes", get(pushes))
        .route("/standin/faults", post(add_fault).delete(clear_faults))
        .route("/standin/stats", get(stats))
        .route("/standin/recording", get(recording))
        .route("/standin/echo", get(echo).post(echo))
        .with_state(shared)
}

/// A compact JWS's three dot-separated parts (header, claims, signature), if it has exactly
/// three.
pub(crate) fn jwt_parts(jwt: &str) -> Option<(&str, &str, &str)> {
    let mut parts = jwt.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(header), Some(claims), Some(signature), None) => Some((header, claims, signature)),
        _ => None,
    }
}

/// Random bytes for ids and tokens the stand-ins issue.
pub(crate) fn random_hex(len: usize) -> String {
    let mut bytes = vec![0u8; len];
    // A failing system RNG only makes the stand-in's ids predictable; it is not a security
    // boundary, so the zeroes are kept rather than failing a request.
    let _ = getrandom::fill(&mut bytes);
    hex::encode(bytes)
}

/// Serves `router` on `listener` (plain HTTP/1.1) until the task is aborted.
pub(crate) fn serve_plain(
    listener: tokio::net::TcpListener,
    router: Router,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::warn!(error = %e, "stand-in listener stopped");
        }
    })
}

/// Which stand-in [`run_standin`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StandinKind {
    /// The FCM HTTP v1 stand-in.
    Fcm,
    /// The APNs HTTP/2 stand-in.
    Apns,
}

/// What a developer needs to point a Message Center at a running stand-in.
#[derive(Clone)]
pub struct StandinInfo {
    /// Which stand-in.
    pub kind: StandinKind,
    /// The push API's base URL (FCM `api_base_url`, APNs `base_url`).
    pub url: String,
    /// The plain HTTP control API's base URL (pushes, faults, stats).
    pub control_url: String,
    /// Credential files to write, `(file name, contents)`: FCM `fcm-service-account.json`;
    /// APNs `apns-ca.pem` (the CA to trust) and `apns-key.p8` (the provider key).
    pub files: Vec<(String, String)>,
    /// Other settings, `(name, value)`: APNs `team_id`, `key_id`.
    pub settings: Vec<(String, String)>,
}

impl fmt::Debug for StandinInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StandinInfo")
            .field("kind", &self.kind)
            .field("url", &self.url)
            .field("control_url", &self.control_url)
            .field(
                "files",
                &self.files.iter().map(|(name, _)| name).collect::<Vec<_>>(),
            )
            .field("settings", &self.settings)
            .finish()
    }
}

impl StandinInfo {
    /// A few lines for a terminal: the URLs, the settings and which files hold what.
    #[must_use]
    pub fn describe(&self) -> String {
        let name = match self.kind {
            StandinKind::Fcm => "FCM",
            StandinKind::Apns => "APNs",
        };
        let mut out = format!(
            "{name} stand-in\n  push API:    {}\n  control API: {}\n  pushes for a token: GET {}/standin/devices/{{token}}/pushes?after=0&wait_ms=25000\n",
            self.url, self.control_url, self.control_url
        );
        for (key, value) in &self.settings {
            out.push_str(&format!("  {key}: {value}\n"));
        }
        for (file, _) in &self.files {
            out.push_str(&format!("  credential file: {file}\n"));
        }
        out
    }
}

/// Runs a stand-in until `stop` resolves; `ready` is told what it needs to know first.
/// APNs uses `control_listen` for its plain control API (port 0 of the same host if `None`);
/// FCM serves both on `listen`.
///
/// # Errors
/// [`StandinError`] when it cannot listen or make its credentials.
pub async fn run_standin(
    kind: StandinKind,
    listen: SocketAddr,
    control_listen: Option<SocketAddr>,
    record: bool,
    ready: impl FnOnce(&StandinInfo),
    stop: impl Future<Output = ()>,
) -> Result<(), StandinError> {
    match kind {
        StandinKind::Fcm => {
            let standin = FcmStandin::start(listen).await?;
            standin.recording().set_enabled(record);
            ready(&standin.info());
            stop.await;
        }
        StandinKind::Apns => {
            let control = control_listen.unwrap_or_else(|| SocketAddr::new(listen.ip(), 0));
            let standin = ApnsStandin::start(listen, control).await?;
            standin.recording().set_enabled(record);
            ready(&standin.info());
            stop.await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_faults_come_before_the_ones_for_all_and_run_out() {
        let faults = Faults::default();
        faults.inject(None, Fault::Drop, 1);
        faults.inject(Some("a"), Fault::Unregistered, 2);
        assert_eq!(faults.pending(), 3);
        assert_eq!(faults.take("a"), Some(Fault::Unregistered));
        assert_eq!(faults.take("b"), Some(Fault::Drop));
        assert_eq!(faults.take("b"), None);
        assert_eq!(faults.take("a"), Some(Fault::Unregistered));
        assert_eq!(faults.take("a"), None);
        assert_eq!(faults.pending(), 0);
    }

    #[test]
    fn fault_json_is_tagged_by_kind() {
        let f: Fault =
            serde_json::from_str(r#"{"kind":"unavailable","retry_after_secs":3}"#).unwrap();
        assert_eq!(
            f,
            Fault::Unavailable {
                retry_after_secs: Some(3)
            }
        );
        let f: Fault = serde_json::from_str(r#"{"kind":"bad_token"}"#).unwrap();
        assert_eq!(f, Fault::BadToken);
    }

    use crate::push::{
        HttpClient, OutgoingPush, Platform, Priority, PushPayload, PushSender as _, SendOutcome,
        WallClock as _,
    };

    async fn call(
        client: &HttpClient,
        method: &str,
        url: &str,
        body: &str,
    ) -> (StatusCode, Vec<u8>) {
        let request = axum::http::Request::builder()
            .method(method)
            .uri(url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(hyper::body::Bytes::from(
                body.to_owned(),
            )))
            .unwrap();
        let answer = crate::push::exchange(client, request, Duration::from_secs(20))
            .await
            .unwrap();
        (answer.status, answer.body.to_vec())
    }

    fn wake(platform: Platform, token: &str) -> OutgoingPush {
        OutgoingPush {
            platform,
            push_token: token.to_owned(),
            app_id: "com.example.bank".to_owned(),
            message_id: [1; 16],
            expires_at_ms: (crate::push::SystemWallClock.now_unix_secs() + 60) * 1000,
            priority: Priority::High,
            collapse_id: None,
            payload: PushPayload::WakeUp,
        }
    }

    fn local() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    #[tokio::test]
    async fn the_fcm_control_api_long_polls_pushes_and_takes_faults() {
        let standin = FcmStandin::start(local()).await.unwrap();
        let mut config = crate::fcm::FcmConfig::new(standin.service_account());
        config.api_base_url = standin.url();
        let sender = crate::fcm::FcmSender::new(config).unwrap();
        let client = crate::push::http_client(None, false).unwrap();

        let url = format!(
            "{}/standin/devices/phone-1/pushes?after=0&wait_ms=15000",
            standin.control_url()
        );
        let poll = {
            let client = client.clone();
            tokio::spawn(async move { call(&client, "GET", &url, "").await })
        };
        assert_eq!(
            sender.send(&wake(Platform::Fcm, "phone-1")).await,
            SendOutcome::Delivered
        );
        let (status, body) = poll.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        let pushes: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            pushes,
            serde_json::json!([{"seq": 1, "payload": {"cs_wake": "01".repeat(16)}}])
        );
        let (_, body) = call(
            &client,
            "GET",
            &format!(
                "{}/standin/devices/phone-1/pushes?after=1&wait_ms=0",
                standin.control_url()
            ),
            "",
        )
        .await;
        assert_eq!(body, b"[]");

        let (status, _) = call(
            &client,
            "POST",
            &format!("{}/standin/faults", standin.control_url()),
            r#"{"token":"phone-1","fault":{"kind":"unregistered"},"count":1}"#,
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert!(matches!(
            sender.send(&wake(Platform::Fcm, "phone-1")).await,
            SendOutcome::TokenDropped { .. }
        ));
        let (_, body) = call(
            &client,
            "GET",
            &format!("{}/standin/stats", standin.control_url()),
            "",
        )
        .await;
        let stats: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(stats, serde_json::json!({"accepted": 1, "requests": 2}));
        let (status, body) = call(
            &client,
            "GET",
            &format!("{}/standin/recording", standin.control_url()),
            "",
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, standin.recording().bytes());
        let (status, _) = call(
            &client,
            "POST",
            &format!("{}/standin/echo", standin.url()),
            "",
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn the_apns_control_api_is_a_plain_listener_beside_the_tls_one() {
        let standin = ApnsStandin::start(local(), local()).await.unwrap();
        assert!(standin.url().starts_with("https://127.0.0.1:"));
        assert!(standin.control_url().starts_with("http://127.0.0.1:"));
        let sender = crate::apns::ApnsSender::new(standin.sender_config("t")).unwrap();
        let token = "0a".repeat(32);
        assert_eq!(
            sender.send(&wake(Platform::Apns, &token)).await,
            SendOutcome::Delivered
        );
        let plain = crate::push::http_client(None, false).unwrap();
        let (_, body) = call(
            &plain,
            "GET",
            &format!(
                "{}/standin/devices/{token}/pushes?after=0&wait_ms=0",
                standin.control_url()
            ),
            "",
        )
        .await;
        let pushes: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(pushes[0]["payload"]["cs_wake"], "01".repeat(16));
        // The bare HTTP/2 rate is measured on the TLS listener's echo route.
        let h2 = crate::push::http_client(Some(&standin.ca_pem()), true).unwrap();
        let (status, _) = call(&h2, "POST", &format!("{}/standin/echo", standin.url()), "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(standin.recording().len(), 1, "the echo is not recorded");
    }

    #[tokio::test]
    async fn the_fcm_service_account_file_is_googles_format() {
        let standin = FcmStandin::start(local()).await.unwrap();
        let file: serde_json::Value =
            serde_json::from_str(&standin.service_account_json()).unwrap();
        assert_eq!(file["type"], "service_account");
        assert_eq!(file["project_id"], standin.project_id());
        assert_eq!(file["token_uri"], format!("{}/token", standin.url()));
        let key = file["private_key"].as_str().unwrap();
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{key}");
        assert!(key.trim_end().ends_with("-----END PRIVATE KEY-----"));
        let info = standin.info();
        assert_eq!(info.files[0].0, "fcm-service-account.json");
        assert_eq!(info.control_url, info.url);
    }

    #[tokio::test]
    async fn run_standin_tells_what_a_developer_needs_and_stops() {
        let (info_tx, info_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(run_standin(
            StandinKind::Apns,
            local(),
            None,
            true,
            move |info| {
                let _ = info_tx.send(info.clone());
            },
            async move {
                let _ = stop_rx.await;
            },
        ));
        let info = info_rx.await.unwrap();
        let names: Vec<&str> = info.files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["apns-ca.pem", "apns-key.p8"]);
        assert!(info.files[0].1.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(info.files[1].1.starts_with("-----BEGIN PRIVATE KEY-----"));
        let text = info.describe();
        assert!(
            text.contains(&info.url) && text.contains(&info.control_url),
            "{text}"
        );
        assert!(!format!("{info:?}").contains("PRIVATE KEY"));
        stop_tx.send(()).unwrap();
        running.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn next_push_waits_for_a_delivery_and_reads_each_once() {
        let inbox = Arc::new(Inbox::default());
        let waiting = {
            let inbox = inbox.clone();
            tokio::spawn(async move { inbox.next("t").await })
        };
        tokio::task::yield_now().await;
        inbox.deliver("other", serde_json::json!({"n": 0}));
        inbox.deliver("t", serde_json::json!({"n": 1}));
        let first = waiting.await.unwrap();
        assert_eq!(first.payload_json, serde_json::json!({"n": 1}));
        assert_eq!(first.seq, 2);
        inbox.deliver("t", serde_json::json!({"n": 2}));
        assert_eq!(
            inbox.next("t").await.payload_json,
            serde_json::json!({"n": 2})
        );
        let after = inbox.after("t", 2, Duration::ZERO).await;
        assert_eq!(after.len(), 1);
        assert!(inbox.after("t", 3, Duration::ZERO).await.is_empty());
    }
}
