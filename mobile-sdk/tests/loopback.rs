//! The SDK's I/O against a scripted gateway on loopback: the real HTTP key fetch, WebSocket,
//! Noise handshake and CBOR messages, with a gateway that answers from a script instead of
//! an event store. The real gateway's flows are tested in the workspace's `tests/` crate;
//! these check the SDK's own plumbing (framing, multiplexing, pinning, notices, timers).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use countersign_mobile_sdk::{
    ChannelCallbacks, Event, HistoryStatus, Interaction, MemoryStorage, NoCallbacks, Sdk,
    SdkConfig, SdkError, SessionKind, State,
};
use countersign_protocol::channel::{Responder, StaticKey, fingerprint};
use countersign_protocol::device::{
    self, Answer, Bytes, Hello, Intent, Notice, Outcome, Refusal, Request, RequestBody,
    ServerMessage, ServerParams, SessionDetails, SessionEnd, Welcome,
};
use countersign_protocol::qr::{QrKind, QrPayload};
use futures::{SinkExt as _, StreamExt as _};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio_tungstenite::tungstenite::Message;

const SERVER_ID: [u8; 16] = [1; 16];
const ACCOUNT_ID: [u8; 16] = [9; 16];
const HSID: [u8; 32] = [7; 32];

#[derive(Default)]
struct Script {
    ping_time_secs: u32,
    deleted: bool,
}

#[derive(Clone)]
struct Gateway {
    url: String,
    key: StaticKey,
    script: Arc<Mutex<Script>>,
    notices: broadcast::Sender<Notice>,
    /// The requests answered, by name, in order.
    seen: watch::Sender<Vec<String>>,
}

impl Gateway {
    async fn start(ping_time_secs: u32) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/v1/device", listener.local_addr().unwrap());
        let gateway = Self {
            url,
            key: StaticKey::from_bytes(&[3; 32]).unwrap(),
            script: Arc::new(Mutex::new(Script {
                ping_time_secs,
                ..Script::default()
            })),
            notices: broadcast::channel(8).0,
            seen: watch::channel(Vec::new()).0,
        };
        let serving = gateway.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(serving.clone().serve(stream));
            }
        });
        gateway
    }

    fn fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.key.public_key().unwrap())
    }

    fn qr(&self, kind: QrKind) -> Vec<u8> {
        QrPayload {
            kind,
            server_id: SERVER_ID,
            token: HSID,
            gateway: self.url.clone(),
            server_key_fingerprint: self.fingerprint(),
        }
        .encode()
    }

    fn seen(&self) -> Vec<String> {
        self.seen.borrow().clone()
    }

    async fn serve(self, mut stream: tokio::net::TcpStream) {
        let mut head = [0u8; 512];
        let n = stream.peek(&mut head).await.unwrap();
        let line = String::from_utf8_lossy(&head[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_owned();
        if !line.contains("/channel") {
            // The key document, over plain HTTP/1.1.
            let body = serde_json::json!({
                "server_id": hex::encode(SERVER_ID),
                "public_key": hex::encode(self.key.public_key().unwrap()),
            })
            .to_string();
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let mut buf = vec![0u8; 4096];
            let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
            stream.write_all(response.as_bytes()).await.unwrap();
            return;
        }
        let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        let Some(Ok(Message::Binary(first))) = ws.next().await else {
            return;
        };
        let (responder, hello) = Responder::read(&self.key, &SERVER_ID, &first).unwrap();
        let hello: Hello = device::decode(&hello).unwrap();
        let welcome = match hello.intent {
            Intent::Account { .. } if self.script.lock().unwrap().deleted => Welcome::Refused {
                reason: Refusal::AccountDeleted,
            },
            _ => Welcome::Accepted {
                server: ServerParams {
                    server_id: Bytes(SERVER_ID),
                    name: "Bank".into(),
                    logo_url: None,
                    second_factor: "none".into(),
                    second_factor_cache_secs: 0,
                    default_ping_time_secs: 0,
                },
            },
        };
        let refused = matches!(welcome, Welcome::Refused { .. });
        let (mut channel, second) = responder
            .accept(&device::encode(&welcome).unwrap())
            .unwrap();
        ws.send(Message::binary(second)).await.unwrap();
        if refused {
            return;
        }
        let mut notices = self.notices.subscribe();
        loop {
            let message = tokio::select! {
                notice = notices.recv() => match notice {
                    Ok(notice) => ServerMessage::Notice(notice),
                    Err(_) => return,
                },
                frame = ws.next() => {
                    let Some(Ok(Message::Binary(frame))) = frame else { return };
                    let Some(bytes) = channel.open(&frame).unwrap() else { continue };
                    let request: Request = device::decode(&bytes).unwrap();
                    ServerMessage::Reply { id: request.id, outcome: Outcome::Ok(self.answer(&request.body)) }
                }
            };
            for frame in channel.seal(&device::encode(&message).unwrap()).unwrap() {
                ws.send(Message::binary(frame)).await.unwrap();
            }
        }
    }

    fn answer(&self, body: &RequestBody) -> Answer {
        let script = self.script.lock().unwrap();
        let name = format!("{body:?}");
        let name = name.split([' ', '{', '(']).next().unwrap().to_owned();
        self.seen.send_modify(|seen| seen.push(name));
        match body {
            RequestBody::Enrol { .. } => Answer::Enrolled {
                account_id: Bytes(ACCOUNT_ID),
                userid: "alice".into(),
            },
            RequestBody::Scan { .. } => Answer::Session(SessionDetails {
                announce_info: Some("Log in to Bank".into()),
                ping_time_secs: script.ping_time_secs,
                second_factor_required: false,
                expires_at_ms: 0,
            }),
            RequestBody::LogIn { .. } => Answer::LoggedIn {
                session_info: Some("Welcome".into()),
                ping_time_secs: script.ping_time_secs,
            },
            _ => Answer::Done,
        }
    }
}

fn config() -> SdkConfig {
    SdkConfig {
        request_timeout: Duration::from_secs(5),
        ..SdkConfig::default()
    }
}

async fn enrolled(gateway: &Gateway, config: SdkConfig) -> Sdk {
    let sdk = Sdk::open(Arc::new(MemoryStorage::new()), config).unwrap();
    let (callbacks, mut events) = ChannelCallbacks::new();
    let session = sdk
        .start_session(&gateway.qr(QrKind::Enrolment), callbacks)
        .await
        .unwrap();
    assert!(session.is_enrolment());
    assert_eq!(
        session.state(),
        State::UserInteraction(Interaction::WaitForConfirmation)
    );
    session.set_account(None).await.unwrap();
    assert_eq!(session.state(), State::Done);
    assert_eq!(session.history_status(), Some(HistoryStatus::Enrolled));
    let mut asked = false;
    while let Ok(event) = events.try_recv() {
        if let Event::ConfirmEnrol(_, server) = event {
            assert_eq!(server.name, "Bank");
            asked = true;
        }
    }
    assert!(asked, "confirm_enrol was called");
    sdk
}

#[tokio::test]
async fn enrol_then_log_in_once() {
    let gateway = Gateway::start(0).await;
    let sdk = enrolled(&gateway, config()).await;
    let accounts = sdk.accounts().unwrap();
    assert_eq!(accounts.len(), 1);
    assert_eq!(accounts[0].account_id, hex::encode(ACCOUNT_ID));
    assert_eq!(accounts[0].userid, "alice");
    assert_eq!(
        sdk.servers().unwrap()[0].fingerprint,
        hex::encode(gateway.fingerprint())
    );

    let session = sdk
        .start_session(&gateway.qr(QrKind::Login), Arc::new(NoCallbacks))
        .await
        .unwrap();
    assert_eq!(session.announce_info().as_deref(), Some("Log in to Bank"));
    assert_eq!(
        session.state(),
        State::UserInteraction(Interaction::WaitForConfirmation)
    );
    session.set_account(None).await.unwrap();
    assert_eq!(session.state(), State::Done);
    assert_eq!(
        session.history_status(),
        Some(HistoryStatus::LoggedInOneShot)
    );
    assert_eq!(session.session_info().as_deref(), Some("Welcome"));
    assert_eq!(gateway.seen(), ["Enrol", "Scan", "Confirm", "LogIn"]);
    // Refused afterwards, state unchanged.
    assert!(matches!(
        session.set_account(None).await,
        Err(SdkError::InvalidState {
            state: State::Done,
            ..
        })
    ));
    let history = sdk.history().unwrap();
    let statuses: Vec<_> = history.iter().map(|h| (h.kind, h.status)).collect();
    assert_eq!(
        statuses,
        [
            (SessionKind::Enrolment, HistoryStatus::Enrolled),
            (SessionKind::Login, HistoryStatus::LoggedInOneShot)
        ]
    );
}

#[tokio::test]
async fn a_continuous_session_pings_and_logs_out_on_stop() {
    let gateway = Gateway::start(2).await;
    let sdk = enrolled(
        &gateway,
        SdkConfig {
            skip_single_account_confirmation: true,
            ..config()
        },
    )
    .await;
    let session = sdk
        .start_session(&gateway.qr(QrKind::Login), Arc::new(NoCallbacks))
        .await
        .unwrap();
    // One account and the skip option: straight to Active.
    assert_eq!(session.state(), State::Active);
    assert_eq!(session.history_status(), Some(HistoryStatus::LoggedIn));
    // Wait for a ping (every max(1, 2/2) = 1 s).
    let mut seen = gateway.seen.subscribe();
    tokio::time::timeout(
        Duration::from_secs(5),
        seen.wait_for(|s| s.iter().any(|r| r == "Ping")),
    )
    .await
    .unwrap()
    .unwrap();
    session.stop_session().await.unwrap();
    assert_eq!(session.state(), State::Done);
    assert_eq!(session.history_status(), Some(HistoryStatus::LoggedOut));
    assert_eq!(gateway.seen().last().map(String::as_str), Some("LogOut"));
    assert_eq!(
        sdk.history().unwrap().last().unwrap().status,
        HistoryStatus::LoggedOut
    );
}

#[tokio::test]
async fn a_session_ended_notice_logs_out() {
    let gateway = Gateway::start(60).await;
    let sdk = enrolled(&gateway, config()).await;
    let session = sdk
        .start_session(&gateway.qr(QrKind::Login), Arc::new(NoCallbacks))
        .await
        .unwrap();
    session
        .set_account(Some(&hex::encode(ACCOUNT_ID)))
        .await
        .unwrap();
    assert_eq!(session.state(), State::Active);
    gateway
        .notices
        .send(Notice::SessionEnded {
            hsid: Bytes(HSID),
            how: SessionEnd::LoggedOut,
        })
        .unwrap();
    let done = tokio::time::timeout(
        Duration::from_secs(5),
        session.wait_for(|s| s.state.is_final()),
    )
    .await
    .unwrap();
    assert_eq!(
        (done.state, done.history_status),
        (State::Done, Some(HistoryStatus::LoggedOut))
    );
}

#[tokio::test]
async fn unknown_accounts_and_wrong_fingerprints_are_refused() {
    let gateway = Gateway::start(0).await;
    let sdk = enrolled(&gateway, config()).await;
    let session = sdk
        .start_session(&gateway.qr(QrKind::Login), Arc::new(NoCallbacks))
        .await
        .unwrap();
    assert_eq!(
        session.set_account(Some("00")).await,
        Err(SdkError::UnknownAccount)
    );
    assert_eq!(
        session.state(),
        State::UserInteraction(Interaction::WaitForConfirmation)
    );
    session.stop_session().await.unwrap();

    let mut qr = QrPayload::decode(&gateway.qr(QrKind::Enrolment)).unwrap();
    qr.server_key_fingerprint = [0; 32];
    let fresh = Sdk::open(Arc::new(MemoryStorage::new()), config()).unwrap();
    assert_eq!(
        fresh
            .start_session(&qr.encode(), Arc::new(NoCallbacks))
            .await
            .unwrap_err(),
        SdkError::FingerprintMismatch
    );
    assert_eq!(fresh.history().unwrap()[0].status, HistoryStatus::Error);

    // A login at a server with no account here: fail{no_accounts} on a guest channel.
    let (callbacks, mut events) = ChannelCallbacks::new();
    assert_eq!(
        fresh
            .start_session(&gateway.qr(QrKind::Login), callbacks)
            .await
            .unwrap_err(),
        SdkError::NoAccounts
    );
    assert_eq!(gateway.seen().last().map(String::as_str), Some("Fail"));
    let mut error_state = None;
    while let Ok(event) = events.try_recv() {
        if let Event::State(s) = event {
            error_state = Some((s.state, s.error));
        }
    }
    assert_eq!(
        error_state,
        Some((State::Error, Some(SdkError::NoAccounts)))
    );
}

#[tokio::test]
async fn the_interaction_timeout_aborts() {
    let gateway = Gateway::start(0).await;
    let sdk = enrolled(
        &gateway,
        SdkConfig {
            interaction_timeout: Duration::from_millis(200),
            ..config()
        },
    )
    .await;
    let session = sdk
        .start_session(&gateway.qr(QrKind::Login), Arc::new(NoCallbacks))
        .await
        .unwrap();
    let done = tokio::time::timeout(
        Duration::from_secs(5),
        session.wait_for(|s| s.state.is_final()),
    )
    .await
    .unwrap();
    assert_eq!(
        (done.state, done.history_status),
        (State::Done, Some(HistoryStatus::Aborted))
    );
    assert_eq!(gateway.seen().last().map(String::as_str), Some("Abort"));
}

#[tokio::test]
async fn refresh_forgets_an_account_the_server_deleted_and_delete_tells_the_server() {
    let gateway = Gateway::start(0).await;
    let sdk = enrolled(&gateway, config()).await;
    let report = sdk.refresh(&NoCallbacks).await.unwrap();
    assert_eq!(report.refreshed, [hex::encode(ACCOUNT_ID)]);

    let (callbacks, mut events) = ChannelCallbacks::new();
    gateway.script.lock().unwrap().deleted = true;
    let report = sdk.refresh(callbacks.as_ref()).await.unwrap();
    assert_eq!(report.forgotten.len(), 1);
    assert!(sdk.accounts().unwrap().is_empty());
    assert!(sdk.servers().unwrap().is_empty());
    assert!(matches!(events.try_recv(), Ok(Event::AccountDeleted(a)) if a.userid == "alice"));

    gateway.script.lock().unwrap().deleted = false;
    let sdk = enrolled(&gateway, config()).await;
    sdk.delete_account(&hex::encode(ACCOUNT_ID)).await.unwrap();
    assert_eq!(
        gateway.seen().last().map(String::as_str),
        Some("DeleteAccount")
    );
    assert!(sdk.accounts().unwrap().is_empty());
    assert_eq!(
        sdk.delete_account(&hex::encode(ACCOUNT_ID)).await,
        Err(SdkError::UnknownAccount)
    );
}

#[tokio::test]
async fn an_account_deleted_notice_reaches_a_listener() {
    let gateway = Gateway::start(0).await;
    let sdk = enrolled(&gateway, config()).await;
    let (callbacks, mut events) = ChannelCallbacks::new();
    let listener = sdk
        .listen(&hex::encode(ACCOUNT_ID), callbacks)
        .await
        .unwrap();
    gateway
        .notices
        .send(Notice::AccountDeleted {
            account_id: Bytes(ACCOUNT_ID),
        })
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), listener.ended())
        .await
        .unwrap();
    assert!(
        matches!(end, countersign_mobile_sdk::ListenEnd::AccountDeleted(a) if a.userid == "alice")
    );
    assert!(sdk.accounts().unwrap().is_empty());
    assert!(matches!(events.try_recv(), Ok(Event::AccountDeleted(_))));
}
