//! The Message Center end to end over in-memory frames and `oneshot` HTTP, against a real
//! store on both backends, with a scripted push sender: registration over the Noise channel,
//! submit → push → `mc.message_delivered`, idempotent submits and every refusal, pull and
//! ack, the static-key check, token drops, retries, a restart with messages outstanding, and
//! expiry.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine as _;
use countersign_commands::Clock;
use countersign_eventstore::testing::TestDb;
use countersign_eventstore::vault::KeyVault;
use countersign_eventstore::{Database, Direction, RecordedEvent, StoreOptions, open};
use countersign_protocol::channel::{Channel, Initiator, MC_PROLOGUE, StaticKey};
use countersign_protocol::device::Bytes;
use countersign_protocol::mc::{
    self, McAnswer, McError, McErrorCode, McHello, McOutcome, McRefusal, McRequest, McRequestBody,
    McServerMessage, McWelcome, Platform,
};
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use tokio::sync::watch;
use tower::ServiceExt as _;

use crate::events::{AttemptOutcome, McEvent};
use crate::push::{OutgoingPush, PushPayload, PushSender, SendOutcome};
use crate::{AnonymousLimits, McLimits, MessageCenter, Rate, Senders};

const T0: i64 = 1_790_000_000_000;
const WAIT: Duration = Duration::from_secs(30);

/// A clock the test moves.
#[derive(Debug)]
struct TestClock(AtomicI64);

impl TestClock {
    fn advance_ms(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
    fn ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl Clock for TestClock {
    fn now(&self) -> countersign_domain::Timestamp {
        countersign_domain::Timestamp(self.0.load(Ordering::SeqCst))
    }
}

/// A push sender that records what it is asked and answers from a script (then
/// `Delivered`).
#[derive(Debug)]
struct FakeSender {
    sent: Mutex<Vec<OutgoingPush>>,
    script: Mutex<VecDeque<SendOutcome>>,
    count: watch::Sender<usize>,
}

impl FakeSender {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            sent: Mutex::default(),
            script: Mutex::default(),
            count: watch::channel(0).0,
        })
    }
    fn then(&self, outcome: SendOutcome) {
        self.script.lock().unwrap().push_back(outcome);
    }
    fn sent(&self) -> Vec<OutgoingPush> {
        self.sent.lock().unwrap().clone()
    }
    async fn wait_sent(&self, n: usize) {
        let mut rx = self.count.subscribe();
        tokio::time::timeout(WAIT, rx.wait_for(|c| *c >= n))
            .await
            .expect("pushes in time")
            .unwrap();
    }
}

#[async_trait::async_trait]
impl PushSender for FakeSender {
    async fn send(&self, push: &OutgoingPush) -> SendOutcome {
        self.sent.lock().unwrap().push(push.clone());
        self.count.send_modify(|c| *c += 1);
        self.script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(SendOutcome::Delivered)
    }
}

struct Env {
    store: countersign_eventstore::SharedStore,
    vault: KeyVault,
    database: Database,
    clock: Arc<TestClock>,
    fcm: Arc<FakeSender>,
}

fn limits() -> McLimits {
    McLimits {
        anonymous: AnonymousLimits {
            per_address: Rate {
                burst: 1000,
                per_second: 1000,
            },
            global: Rate {
                burst: 1000,
                per_second: 1000,
            },
            max_addresses: 16,
        },
        max_outstanding: 5,
        scan_interval: Duration::from_millis(20),
        ..McLimits::default()
    }
}

impl Env {
    async fn new(db: &TestDb) -> Self {
        let opened = open(&StoreOptions {
            url: db.url().to_owned(),
            pool_size: 4,
        })
        .await
        .unwrap();
        Self {
            store: db.store.clone(),
            vault: KeyVault::new(
                opened.vault,
                countersign_domain::DataKey::from_bytes([9; 32]),
            ),
            database: opened.database,
            clock: Arc::new(TestClock(AtomicI64::new(T0))),
            fcm: FakeSender::new(),
        }
    }

    async fn mc_with(&self, limits: McLimits) -> MessageCenter {
        MessageCenter::new(
            self.store.clone(),
            self.vault.clone(),
            self.database.clone(),
            self.clock.clone(),
            Senders {
                fcm: Some(self.fcm.clone()),
                apns: None,
            },
            limits,
        )
        .await
        .unwrap()
    }

    async fn mc(&self) -> MessageCenter {
        self.mc_with(limits()).await
    }

    async fn events(&self, mailbox: [u8; 16]) -> Vec<RecordedEvent> {
        self.store
            .read_stream(
                &crate::events::stream(&mailbox),
                None,
                Direction::Forwards,
                10_000,
            )
            .await
            .unwrap()
    }

    async fn types(&self, mailbox: [u8; 16]) -> Vec<String> {
        self.events(mailbox)
            .await
            .into_iter()
            .map(|e| e.event_type)
            .collect()
    }

    /// Waits until the mailbox's stream holds `n` events of `event_type`.
    async fn wait_events(&self, mailbox: [u8; 16], event_type: &str, n: usize) -> Vec<McEvent> {
        let mut head = self.store.head();
        tokio::time::timeout(WAIT, async {
            loop {
                head.borrow_and_update();
                let found: Vec<McEvent> = self
                    .events(mailbox)
                    .await
                    .iter()
                    .filter(|e| e.event_type == event_type)
                    .map(|e| McEvent::decode(e).unwrap())
                    .collect();
                if found.len() >= n {
                    return found;
                }
                head.changed().await.unwrap();
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{n} {event_type} events in time"))
    }
}

/// Runs the worker until the returned sender says stop.
fn start(mc: &MessageCenter) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let (stop, stopped) = watch::channel(false);
    let mc = mc.clone();
    let handle = tokio::spawn(async move { mc.run(stopped).await.unwrap() });
    (stop, handle)
}

struct App {
    channel: Channel,
    to_mc: mpsc::UnboundedSender<Result<Vec<u8>, String>>,
    from_mc: mpsc::UnboundedReceiver<Vec<u8>>,
    next_id: u32,
}

fn key(seed: u8) -> StaticKey {
    StaticKey::from_bytes(&[seed; 32]).unwrap()
}

async fn connect(
    mc_center: &MessageCenter,
    key: &StaticKey,
    mailbox: Option<[u8; 16]>,
) -> Result<App, McRefusal> {
    let (mut to_mc, incoming) = mpsc::unbounded();
    let (outgoing, mut from_mc) = mpsc::unbounded();
    tokio::spawn(crate::connection::serve_frames_from(
        mc_center.clone(),
        None,
        incoming,
        outgoing,
    ));
    let hello = mc::encode(&McHello {
        version: mc::VERSION,
        mailbox: mailbox.map(Bytes),
    })
    .unwrap();
    let (initiator, first) =
        Initiator::start_with_prologue(key, &mc_center.public_key(), MC_PROLOGUE, &hello).unwrap();
    to_mc.send(Ok(first)).await.unwrap();
    let second = from_mc.next().await.expect("an answer to the hello");
    let (channel, welcome) = initiator.finish(&second).unwrap();
    match mc::decode::<McWelcome>(&welcome).unwrap() {
        McWelcome::Accepted {} => Ok(App {
            channel,
            to_mc,
            from_mc,
            next_id: 1,
        }),
        McWelcome::Refused { reason } => Err(reason),
    }
}

impl App {
    async fn ask(&mut self, body: McRequestBody) -> Result<McAnswer, McError> {
        let id = self.next_id;
        self.next_id += 1;
        let bytes = mc::encode(&McRequest { id, body }).unwrap();
        for frame in self.channel.seal(&bytes).unwrap() {
            self.to_mc.send(Ok(frame)).await.unwrap();
        }
        let mut message = None;
        while message.is_none() {
            let frame = self.from_mc.next().await.unwrap();
            message = self.channel.open(&frame).unwrap();
        }
        let McServerMessage::Reply {
            id: reply_id,
            outcome,
        } = mc::decode(&message.unwrap()).unwrap();
        assert_eq!(reply_id, id);
        match outcome {
            McOutcome::Ok(answer) => Ok(answer),
            McOutcome::Err(error) => Err(error),
        }
    }

    async fn pull(&mut self, limit: u16) -> (Vec<([u8; 16], u64, Vec<u8>)>, bool) {
        match self.ask(McRequestBody::Pull { limit }).await.unwrap() {
            McAnswer::Messages { messages, more } => (
                messages
                    .into_iter()
                    .map(|m| (m.message_id.0, m.expires_at_ms, m.envelope.0))
                    .collect(),
                more,
            ),
            other => panic!("not messages: {other:?}"),
        }
    }
}

/// Registers a mailbox with `key`; answers the app (connected), the mailbox and the token.
async fn register(
    mc_center: &MessageCenter,
    key: &StaticKey,
    push_token: &str,
) -> (App, [u8; 16], [u8; 32]) {
    let mut app = connect(mc_center, key, None).await.unwrap();
    let answer = app
        .ask(McRequestBody::Register {
            platform: Platform::Fcm,
            push_token: push_token.to_owned(),
            app_id: "com.example.bank".to_owned(),
        })
        .await
        .unwrap();
    let McAnswer::Registered { mailbox, mc_token } = answer else {
        panic!("not registered: {answer:?}");
    };
    (app, mailbox.0, *mc_token.expose())
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn id(n: u8) -> [u8; 16] {
    [n; 16]
}

/// An envelope (not really sealed: the MC never opens one) of a message carrying `content`.
fn sealed(message_id: [u8; 16], expires_at_ms: i64, content: &[u8]) -> Vec<u8> {
    let mut ciphertext = content.to_vec();
    ciphertext.resize(ciphertext.len().max(16), 0);
    countersign_protocol::push::Envelope {
        message_id,
        expires_at_ms: u64::try_from(expires_at_ms).unwrap(),
        key_id: [1; 8],
        enc: vec![4; 65],
        ciphertext,
    }
    .encode()
}

/// Submits an envelope of `content` for `message_id`.
async fn submit(
    mc_center: &MessageCenter,
    token: Option<&[u8]>,
    message_id: [u8; 16],
    expires_at_ms: i64,
    content: &[u8],
) -> (StatusCode, serde_json::Value, Option<String>) {
    let envelope = sealed(message_id, expires_at_ms, content);
    submit_raw(mc_center, token, message_id, expires_at_ms, &envelope).await
}

async fn submit_raw(
    mc_center: &MessageCenter,
    token: Option<&[u8]>,
    message_id: [u8; 16],
    expires_at_ms: i64,
    envelope: &[u8],
) -> (StatusCode, serde_json::Value, Option<String>) {
    let body = serde_json::json!({
        "message_id": hex::encode(message_id),
        "expires_at_ms": expires_at_ms,
        "priority": "high",
        "collapse_id": null,
        "envelope": b64(envelope),
    });
    let mut request =
        Request::post("/v1/mc/messages").header(header::CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {}", b64(token)));
    }
    let response = mc_center
        .router()
        .oneshot(request.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        content_type,
    )
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn register_submit_and_deliver(db: &TestDb) {
    let env = Env::new(db).await;
    let mc_center = env.mc().await;
    let (_worker, _) = start(&mc_center);
    let (_app, mailbox, token) = register(&mc_center, &key(1), "fcm-token-1").await;
    let expires = T0 + 60_000;
    let envelope = sealed(id(1), expires, b"sealed envelope bytes");
    let (status, body, _) = submit_raw(&mc_center, Some(&token), id(1), expires, &envelope).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body, serde_json::json!({"queued": true}));
    env.fcm.wait_sent(1).await;
    let sent = env.fcm.sent();
    assert_eq!(sent.len(), 1);
    let push = sent.first().unwrap();
    assert_eq!(push.push_token, "fcm-token-1");
    assert_eq!(push.app_id, "com.example.bank");
    assert_eq!(push.message_id, id(1));
    assert_eq!(push.expires_at_ms, u64::try_from(expires).unwrap());
    assert_eq!(push.payload, PushPayload::Envelope(envelope.clone()));
    let delivered = env.wait_events(mailbox, "mc.message_delivered", 1).await;
    assert!(matches!(
        delivered.first(),
        Some(McEvent::MessageDelivered { message_id, .. }) if *message_id == id(1)
    ));
    assert_eq!(
        env.types(mailbox).await,
        [
            "mc.mailbox_registered",
            "mc.message_queued",
            "mc.message_delivered"
        ]
    );
    // Digests only: no event holds the envelope, the push token or the MC token.
    for event in env.events(mailbox).await {
        assert!(!contains(&event.payload, &envelope));
        assert!(!contains(&event.payload, b"fcm-token-1"));
        assert!(!contains(&event.payload, &token));
        assert_eq!(event.schema_version, 1);
    }
    let registered = McEvent::decode(env.events(mailbox).await.first().unwrap()).unwrap();
    let McEvent::MailboxRegistered { token_digest, .. } = registered else {
        panic!("first event: {registered:?}");
    };
    assert_eq!(token_digest, <[u8; 32]>::from(sha2::Sha256::digest(token)));
    // The metrics saw it (once the delivered row is marked: that update is batched).
    let mut marked = mc_center.0.marked.subscribe();
    tokio::time::timeout(WAIT, marked.wait_for(|n| *n >= 1))
        .await
        .unwrap()
        .unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    mc_center.register_metrics(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(
            "countersign_mc_push_attempts_total{platform=\"fcm\",outcome=\"delivered\"} 1"
        )
    );
    assert!(text.contains("countersign_mc_delivery_latency_seconds_count 1"));
    assert!(text.contains("countersign_mc_queue_depth 0"));
}

use sha2::Digest as _;

async fn submits_are_idempotent(db: &TestDb) {
    let env = Env::new(db).await;
    let mc_center = env.mc().await;
    let (_worker, _) = start(&mc_center);
    let (_app, mailbox, token) = register(&mc_center, &key(2), "tok").await;
    let expires = T0 + 60_000;
    let first = submit(&mc_center, Some(&token), id(1), expires, b"one").await;
    assert_eq!(first.0, StatusCode::ACCEPTED);
    let again = submit(&mc_center, Some(&token), id(1), expires, b"one").await;
    assert_eq!(again.0, StatusCode::OK);
    assert_eq!(again.1, serde_json::json!({"queued": false}));
    let other = submit(&mc_center, Some(&token), id(1), expires, b"two").await;
    assert_eq!(other.0, StatusCode::CONFLICT);
    assert_eq!(other.2.as_deref(), Some("application/problem+json"));
    // Another mailbox cannot reuse the id either.
    let (_app2, _, token2) = register(&mc_center, &key(3), "tok2").await;
    let stolen = submit(&mc_center, Some(&token2), id(1), expires, b"one").await;
    assert_eq!(stolen.0, StatusCode::CONFLICT);
    env.wait_events(mailbox, "mc.message_delivered", 1).await;
    let types = env.types(mailbox).await;
    assert_eq!(
        types.iter().filter(|t| *t == "mc.message_queued").count(),
        1
    );
    assert_eq!(env.fcm.sent().len(), 1);
}

async fn submit_refusals(db: &TestDb) {
    let env = Env::new(db).await;
    let mc_center = env.mc().await;
    let (_app, mailbox, token) = register(&mc_center, &key(4), "").await;
    let expires = T0 + 60_000;
    let (status, body, content_type) = submit(&mc_center, None, id(1), expires, b"x").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(content_type.as_deref(), Some("application/problem+json"));
    assert_eq!(body["type"], "urn:countersign:problem:mc-unauthorized");
    let unknown = submit(&mc_center, Some(&[7u8; 32]), id(1), expires, b"x").await;
    assert_eq!(unknown.0, StatusCode::UNAUTHORIZED);
    let short = submit(&mc_center, Some(&token[..31]), id(1), expires, b"x").await;
    assert_eq!(short.0, StatusCode::UNAUTHORIZED);
    let big = vec![1u8; crate::MAX_ENVELOPE_BYTES + 1];
    let too_large = submit_raw(&mc_center, Some(&token), id(1), expires, &big).await;
    assert_eq!(too_large.0, StatusCode::PAYLOAD_TOO_LARGE);
    let huge = vec![1u8; 64 * 1024];
    let body_too_large = submit_raw(&mc_center, Some(&token), id(1), expires, &huge).await;
    assert_eq!(body_too_large.0, StatusCode::PAYLOAD_TOO_LARGE);
    let expired = submit(&mc_center, Some(&token), id(1), T0, b"x").await;
    assert_eq!(expired.0, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        expired.1["type"],
        "urn:countersign:problem:mc-invalid-message"
    );
    let foreign = sealed(id(2), expires, b"x");
    let mismatched = submit_raw(&mc_center, Some(&token), id(1), expires, &foreign).await;
    assert_eq!(mismatched.0, StatusCode::UNPROCESSABLE_ENTITY);
    // Nothing was written by any refusal.
    assert_eq!(env.types(mailbox).await, ["mc.mailbox_registered"]);
    // The mailbox holds at most five (the test's limit).
    for n in 1..=5 {
        let ok = submit(&mc_center, Some(&token), id(n), expires, &[n]).await;
        assert_eq!(ok.0, StatusCode::ACCEPTED);
    }
    let full = submit(&mc_center, Some(&token), id(6), expires, b"6").await;
    assert_eq!(full.0, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(full.1["type"], "urn:countersign:problem:mc-mailbox-full");
    // A retry of a queued message is still answered, full or not.
    let retry = submit(&mc_center, Some(&token), id(5), expires, &[5]).await;
    assert_eq!(retry.0, StatusCode::OK);
}

async fn pull_answers_unexpired_unacknowledged_oldest_first(db: &TestDb) {
    let env = Env::new(db).await;
    let mc_center = env.mc().await;
    // No push token: pull only.
    let (mut app, mailbox, token) = register(&mc_center, &key(5), "").await;
    let soon = T0 + 1_000;
    let later = T0 + 600_000;
    assert_eq!(
        submit(&mc_center, Some(&token), id(9), later, b"first")
            .await
            .0,
        StatusCode::ACCEPTED
    );
    env.clock.advance_ms(1);
    assert_eq!(
        submit(&mc_center, Some(&token), id(3), soon, b"short-lived")
            .await
            .0,
        StatusCode::ACCEPTED
    );
    env.clock.advance_ms(1);
    assert_eq!(
        submit(&mc_center, Some(&token), id(7), later, b"third")
            .await
            .0,
        StatusCode::ACCEPTED
    );
    let (all, more) = app.pull(10).await;
    assert!(!more);
    let ids: Vec<[u8; 16]> = all.iter().map(|m| m.0).collect();
    assert_eq!(ids, [id(9), id(3), id(7)]);
    assert_eq!(all.first().unwrap().2, sealed(id(9), later, b"first"));
    env.clock.advance_ms(1_000);
    let (unexpired, _) = app.pull(10).await;
    let ids: Vec<[u8; 16]> = unexpired.iter().map(|m| m.0).collect();
    assert_eq!(ids, [id(9), id(7)]);
    let (one, more) = app.pull(1).await;
    assert_eq!(one.len(), 1);
    assert!(more);
    assert_eq!(
        app.ask(McRequestBody::Ack {
            message_ids: vec![Bytes(id(9)), Bytes(id(42))],
        })
        .await
        .unwrap(),
        McAnswer::Done
    );
    let (left, _) = app.pull(10).await;
    let ids: Vec<[u8; 16]> = left.iter().map(|m| m.0).collect();
    assert_eq!(ids, [id(7)]);
    let acked = env.wait_events(mailbox, "mc.message_acknowledged", 1).await;
    assert_eq!(
        acked,
        [McEvent::MessageAcknowledged {
            message_ids: vec![id(9)]
        }]
    );
    assert_eq!(
        env.wait_events(mailbox, "mc.message_pulled", 4).await.len(),
        4
    );
    // Limits are checked.
    let refused = app.ask(McRequestBody::Pull { limit: 0 }).await.unwrap_err();
    assert_eq!(refused.code, McErrorCode::Invalid);
    // Nothing was pushed: there is no token.
    assert!(env.fcm.sent().is_empty());
}

async fn a_hello_with_another_key_or_an_unknown_mailbox_is_refused(db: &TestDb) {
    let env = Env::new(db).await;
    let mc_center = env.mc().await;
    let (_app, mailbox, _) = register(&mc_center, &key(6), "tok").await;
    assert_eq!(
        connect(&mc_center, &key(7), Some(mailbox)).await.err(),
        Some(McRefusal::UnknownMailbox)
    );
    assert_eq!(
        connect(&mc_center, &key(6), Some(id(0xee))).await.err(),
        Some(McRefusal::UnknownMailbox)
    );
    let mut app = connect(&mc_center, &key(6), Some(mailbox)).await.unwrap();
    assert_eq!(app.pull(5).await, (vec![], false));
    // One mailbox per key.
    let mut again = connect(&mc_center, &key(6), None).await.unwrap();
    let refused = again
        .ask(McRequestBody::Register {
            platform: Platform::Fcm,
            push_token: String::new(),
            app_id: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code, McErrorCode::Conflict);
    // An anonymous channel may only register.
    let mut anonymous = connect(&mc_center, &key(8), None).await.unwrap();
    let refused = anonymous
        .ask(McRequestBody::Pull { limit: 1 })
        .await
        .unwrap_err();
    assert_eq!(refused.code, McErrorCode::NotAllowed);
    assert_eq!(env.types(mailbox).await, ["mc.mailbox_registered"]);
}

async fn anonymous_hellos_are_rate_limited(db: &TestDb) {
    let env = Env::new(db).await;
    let mc_center = env
        .mc_with(McLimits {
            anonymous: AnonymousLimits {
                per_address: Rate {
                    burst: 2,
                    per_second: 1,
                },
                global: Rate {
                    burst: 100,
                    per_second: 1,
                },
                max_addresses: 16,
            },
            ..limits()
        })
        .await;
    assert!(connect(&mc_center, &key(9), None).await.is_ok());
    assert!(connect(&mc_center, &key(10), None).await.is_ok());
    assert_eq!(
        connect(&mc_center, &key(11), None).await.err(),
        Some(McRefusal::Busy)
    );
    env.clock.advance_ms(1_000);
    assert!(connect(&mc_center, &key(11), None).await.is_ok());
}

async fn a_dropped_token_leaves_later_messages_to_pull(db: &TestDb) {
    let env = Env::new(db).await;
    let mc_center = env.mc().await;
    let (_worker, _) = start(&mc_center);
    let (mut app, mailbox, token) = register(&mc_center, &key(12), "old-token").await;
    env.fcm.then(SendOutcome::TokenDropped {
        reason: "UNREGISTERED".into(),
    });
    let expires = T0 + 60_000;
    assert_eq!(
        submit(&mc_center, Some(&token), id(1), expires, b"a")
            .await
            .0,
        StatusCode::ACCEPTED
    );
    let dropped = env.wait_events(mailbox, "mc.push_token_dropped", 1).await;
    assert_eq!(
        dropped,
        [McEvent::PushTokenDropped {
            reason: "UNREGISTERED".into()
        }]
    );
    assert_eq!(
        submit(&mc_center, Some(&token), id(2), expires, b"b")
            .await
            .0,
        StatusCode::ACCEPTED
    );
    let (messages, _) = app.pull(10).await;
    let ids: Vec<[u8; 16]> = messages.iter().map(|m| m.0).collect();
    assert_eq!(ids, [id(1), id(2)]);
    // A new token: pushes again.
    assert_eq!(
        app.ask(McRequestBody::UpdatePushToken {
            push_token: "new-token".into()
        })
        .await
        .unwrap(),
        McAnswer::Done
    );
    assert_eq!(
        submit(&mc_center, Some(&token), id(3), expires, b"c")
            .await
            .0,
        StatusCode::ACCEPTED
    );
    env.wait_events(mailbox, "mc.message_delivered", 1).await;
    let sent: Vec<([u8; 16], String)> = env
        .fcm
        .sent()
        .into_iter()
        .map(|p| (p.message_id, p.push_token))
        .collect();
    assert_eq!(
        sent,
        [
            (id(1), "old-token".to_owned()),
            (id(3), "new-token".to_owned())
        ]
    );
    let attempted = env.wait_events(mailbox, "mc.delivery_attempted", 1).await;
    assert!(matches!(
        attempted.as_slice(),
        [McEvent::DeliveryAttempted {
            outcome: AttemptOutcome::TokenDropped,
            ..
        }]
    ));
    for event in env.events(mailbox).await {
        assert!(!contains(&event.payload, b"old-token"));
        assert!(!contains(&event.payload, b"new-token"));
    }
}

async fn a_retry_outcome_is_retried_after_its_time(db: &TestDb) {
    let env = Env::new(db).await;
    let mc_center = env.mc().await;
    let (_worker, _) = start(&mc_center);
    let (_app, mailbox, token) = register(&mc_center, &key(13), "tok").await;
    env.fcm.then(SendOutcome::Retry {
        after: Some(Duration::from_secs(3)),
        reason: "503".into(),
    });
    env.fcm.then(SendOutcome::Failed {
        reason: "INVALID_ARGUMENT".into(),
    });
    assert_eq!(
        submit(&mc_center, Some(&token), id(1), T0 + 600_000, b"m")
            .await
            .0,
        StatusCode::ACCEPTED
    );
    let attempted = env.wait_events(mailbox, "mc.delivery_attempted", 1).await;
    let Some(McEvent::DeliveryAttempted {
        outcome: AttemptOutcome::Retry,
        attempt: 1,
        next_attempt_at_ms: Some(next),
        ..
    }) = attempted.first()
    else {
        panic!("a retry: {attempted:?}");
    };
    assert_eq!(i64::try_from(*next).unwrap(), env.clock.ms() + 3_000);
    // Not due before its time...
    env.clock.advance_ms(2_999);
    let now = env.clock.ms();
    let early = crate::store::claim_due(&env.database, now, now + 10_000, 10)
        .await
        .unwrap();
    assert!(early.is_empty());
    // ...then a second attempt (answered Failed: counted, left for pull), then a third
    // message goes through.
    env.clock.advance_ms(1);
    mc_center.wake();
    env.fcm.wait_sent(2).await;
    let attempts = env.wait_events(mailbox, "mc.delivery_attempted", 2).await;
    assert!(matches!(
        attempts.get(1),
        Some(McEvent::DeliveryAttempted {
            outcome: AttemptOutcome::Failed,
            attempt: 2,
            ..
        })
    ));
    assert_eq!(
        env.fcm
            .sent()
            .iter()
            .filter(|p| p.message_id == id(1))
            .count(),
        2
    );
    assert_eq!(
        submit(&mc_center, Some(&token), id(2), T0 + 600_000, b"n")
            .await
            .0,
        StatusCode::ACCEPTED
    );
    env.wait_events(mailbox, "mc.message_delivered", 1).await;
    assert_eq!(env.fcm.sent().len(), 3);
}

async fn a_restart_delivers_every_outstanding_message(db: &TestDb) {
    let env = Env::new(db).await;
    let first = env.mc().await;
    let (_app, mailbox, token) = register(&first, &key(14), "tok").await;
    // Queued while no worker runs (as if the process died right after answering).
    let expires = T0 + 600_000;
    for n in 1..=5 {
        assert_eq!(
            submit(&first, Some(&token), id(n), expires, &[n]).await.0,
            StatusCode::ACCEPTED
        );
    }
    drop(first);
    // Two sends at a time: the scan claims two, then scans again at once for the rest.
    let second = env
        .mc_with(McLimits {
            max_in_flight: 2,
            scan_interval: Duration::from_secs(3600),
            ..limits()
        })
        .await;
    let (_worker, _) = start(&second);
    // Due once their lease is over.
    env.clock.advance_ms(10_000);
    second.wake();
    env.wait_events(mailbox, "mc.message_delivered", 5).await;
    let mut sent: Vec<[u8; 16]> = env.fcm.sent().into_iter().map(|p| p.message_id).collect();
    sent.sort_unstable();
    assert_eq!(sent, (1..=5).map(id).collect::<Vec<_>>());
    assert_eq!(
        env.types(mailbox)
            .await
            .iter()
            .filter(|t| *t == "mc.message_queued")
            .count(),
        5
    );
}

async fn an_expired_message_is_recorded_and_never_sent(db: &TestDb) {
    let env = Env::new(db).await;
    let mc_center = env.mc().await;
    let (mut app, mailbox, token) = register(&mc_center, &key(15), "tok").await;
    assert_eq!(
        submit(&mc_center, Some(&token), id(1), T0 + 1_000, b"late")
            .await
            .0,
        StatusCode::ACCEPTED
    );
    env.clock.advance_ms(20_000);
    let (_worker, _) = start(&mc_center);
    mc_center.wake();
    let expired = env.wait_events(mailbox, "mc.message_expired", 1).await;
    assert_eq!(expired, [McEvent::MessageExpired { message_id: id(1) }]);
    assert!(env.fcm.sent().is_empty());
    assert_eq!(app.pull(10).await, (vec![], false));
}

async fn a_large_envelope_travels_as_a_wake_up(db: &TestDb) {
    let env = Env::new(db).await;
    let mc_center = env.mc().await;
    let (_worker, _) = start(&mc_center);
    let (mut app, mailbox, token) = register(&mc_center, &key(16), "tok").await;
    let big = sealed(id(1), T0 + 60_000, &[0x5a; crate::PUSH_INLINE_LIMIT]);
    assert!(big.len() > crate::PUSH_INLINE_LIMIT);
    assert_eq!(
        submit_raw(&mc_center, Some(&token), id(1), T0 + 60_000, &big)
            .await
            .0,
        StatusCode::ACCEPTED
    );
    env.wait_events(mailbox, "mc.message_delivered", 1).await;
    assert_eq!(env.fcm.sent().first().unwrap().payload, PushPayload::WakeUp);
    let (messages, _) = app.pull(1).await;
    assert_eq!(messages.first().unwrap().2, big);
}

async fn the_key_endpoint_answers_the_channel_key(db: &TestDb) {
    let env = Env::new(db).await;
    let mc_center = env.mc().await;
    let response = mc_center
        .router()
        .oneshot(Request::get("/v1/mc/key").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
        .await
        .unwrap();
    let key: crate::PublicKey = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(key.channel_public_key, hex::encode(mc_center.public_key()));
    assert_eq!(mc_center.public_key().len(), 65);
    // The same key after a restart (it is in the vault).
    assert_eq!(env.mc().await.public_key(), mc_center.public_key());
}

async fn a_row_a_crash_left_without_its_event_is_completed_and_delivered(db: &TestDb) {
    let env = Env::new(db).await;
    let mc_center = env.mc().await;
    let (_app, mailbox, _) = register(&mc_center, &key(17), "tok").await;
    // As if the process died between the insert and the append of a submit.
    let expires = T0 + 600_000;
    let envelope = sealed(id(1), expires, b"orphan");
    let inserted = crate::store::insert_messages(
        &env.database,
        &[crate::store::NewMessage {
            message_id: id(1),
            mailbox_id: mailbox,
            envelope_digest: sha2::Sha256::digest(&envelope).into(),
            envelope,
            expires_at_ms: expires,
            priority: crate::push::Priority::High,
            collapse_id: None,
            queued_at_ms: T0,
            push_state: crate::store::AWAITING,
            next_attempt_at_ms: T0 + 10_000,
        }],
        100,
    )
    .await
    .unwrap();
    assert_eq!(inserted, [id(1)]);
    let (_worker, _) = start(&mc_center);
    env.clock.advance_ms(10_000);
    mc_center.wake();
    env.wait_events(mailbox, "mc.message_delivered", 1).await;
    assert_eq!(
        env.types(mailbox).await,
        [
            "mc.mailbox_registered",
            "mc.message_queued",
            "mc.message_delivered"
        ]
    );
}

async fn a_platform_without_a_sender_keeps_messages_for_pull(db: &TestDb) {
    let env = Env::new(db).await;
    let mc_center = env.mc().await;
    let (_worker, _) = start(&mc_center);
    let mut app = connect(&mc_center, &key(18), None).await.unwrap();
    let McAnswer::Registered { mailbox, mc_token } = app
        .ask(McRequestBody::Register {
            platform: Platform::Apns,
            push_token: "abcdef0123".into(),
            app_id: "com.example.bank".into(),
        })
        .await
        .unwrap()
    else {
        panic!("not registered");
    };
    let token = *mc_token.expose();
    assert_eq!(
        submit(&mc_center, Some(&token), id(1), T0 + 60_000, b"x")
            .await
            .0,
        StatusCode::ACCEPTED
    );
    let (messages, _) = app.pull(10).await;
    assert_eq!(messages.len(), 1);
    assert!(env.fcm.sent().is_empty());
    assert_eq!(
        env.types(mailbox.0).await,
        [
            "mc.mailbox_registered",
            "mc.message_queued",
            "mc.message_pulled"
        ]
    );
}

countersign_eventstore::on_both_backends!(
    a_row_a_crash_left_without_its_event_is_completed_and_delivered,
    a_platform_without_a_sender_keeps_messages_for_pull,
    register_submit_and_deliver,
    submits_are_idempotent,
    submit_refusals,
    pull_answers_unexpired_unacknowledged_oldest_first,
    a_hello_with_another_key_or_an_unknown_mailbox_is_refused,
    anonymous_hellos_are_rate_limited,
    a_dropped_token_leaves_later_messages_to_pull,
    a_retry_outcome_is_retried_after_its_time,
    a_restart_delivers_every_outstanding_message,
    an_expired_message_is_recorded_and_never_sent,
    a_large_envelope_travels_as_a_wake_up,
    the_key_endpoint_answers_the_channel_key,
);
