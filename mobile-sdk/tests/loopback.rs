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
    Argon2Params, ChannelCallbacks, Event, HistoryStatus, Interaction, MemoryStorage, NoCallbacks,
    Pin, Sdk, SdkConfig, SdkError, SecondFactor, SecondFactorEvent, SessionKind, SfsConfig,
    SimulatedBiometric, State,
};
use countersign_protocol::attestation::{Expected, Factor, verify_attestation};
use countersign_protocol::channel::{Responder, StaticKey, fingerprint};
use countersign_protocol::device::{
    self, Answer, Blob, Bytes, Hello, Intent, Notice, Outcome, PendingTransaction, Refusal,
    Request, RequestBody, ServerMessage, ServerParams, SessionDetails, SessionEnd,
    TransactionDetails, Welcome,
};
use countersign_protocol::evidence::{transaction_challenge, verify_signed_transaction};
use countersign_protocol::qr::{QrKind, QrPayload};
use futures::{SinkExt as _, StreamExt as _};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio_tungstenite::tungstenite::Message;

const SERVER_ID: [u8; 16] = [1; 16];
const ACCOUNT_ID: [u8; 16] = [9; 16];
const HSID: [u8; 32] = [7; 32];
const TX_ID: [u8; 16] = [0x7a; 16];
const TX_DATA: &[u8] = b"pay:10.00:EUR:acme";
const TX_TEXT: &str = "Pay 10.00 EUR to Acme?";

#[derive(Default)]
struct Script {
    ping_time_secs: u32,
    deleted: bool,
    /// The server asks a second factor (params "pin_or_biometric", scans require one).
    second_factor: bool,
    /// The signing key the device enrolled with.
    signing_public_key: Vec<u8>,
    /// Attestations received, with their purpose ("login" or "upgrade").
    attestations: Vec<(&'static str, Vec<u8>)>,
    /// Transaction signatures received: (transaction id, device signature, attestation).
    signed: Vec<([u8; 16], Vec<u8>, Vec<u8>)>,
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
                    second_factor: if self.script.lock().unwrap().second_factor {
                        "pin_or_biometric".into()
                    } else {
                        "none".into()
                    },
                    second_factor_cache_secs: 0,
                    default_ping_time_secs: 0,
                    push_key: None,
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
        let mut script = self.script.lock().unwrap();
        let name = format!("{body:?}");
        let name = name.split([' ', '{', '(']).next().unwrap().to_owned();
        self.seen.send_modify(|seen| seen.push(name));
        match body {
            RequestBody::Enrol {
                signing_public_key, ..
            } => {
                script.signing_public_key.clone_from(&signing_public_key.0);
                Answer::Enrolled {
                    account_id: Bytes(ACCOUNT_ID),
                    userid: "alice".into(),
                }
            }
            RequestBody::Scan { .. } => Answer::Session(SessionDetails {
                announce_info: Some("Log in to Bank".into()),
                ping_time_secs: script.ping_time_secs,
                second_factor_required: script.second_factor,
                expires_at_ms: 0,
            }),
            RequestBody::Challenge { .. } => Answer::Challenge {
                challenge: Bytes(CHALLENGE),
            },
            RequestBody::VerifySecondFactor { attestation, .. } => {
                script.attestations.push(("login", attestation.0.clone()));
                Answer::Done
            }
            RequestBody::UpgradeAccount { attestation } => {
                script.attestations.push(("upgrade", attestation.0.clone()));
                Answer::Done
            }
            RequestBody::LogIn { .. } => Answer::LoggedIn {
                session_info: Some("Welcome".into()),
                ping_time_secs: script.ping_time_secs,
            },
            RequestBody::GetTransaction { transaction_id } => {
                Answer::Transaction(TransactionDetails {
                    transaction_id: *transaction_id,
                    data: Blob(TX_DATA.to_vec()),
                    content_type: "text/plain".into(),
                    text: TX_TEXT.into(),
                    announce_info: Some("Payment".into()),
                    created_at_ms: 1_000,
                    expires_at_ms: 301_000,
                })
            }
            RequestBody::PendingTransactions => Answer::Transactions {
                pending: vec![PendingTransaction {
                    transaction_id: Bytes(TX_ID),
                    announce_info: Some("Payment".into()),
                    expires_at_ms: 301_000,
                }],
            },
            RequestBody::SignTransaction {
                transaction_id,
                signature,
                attestation,
            }
            | RequestBody::SignOwnTransaction {
                transaction_id,
                signature,
                attestation,
                ..
            } => {
                script
                    .signed
                    .push((transaction_id.0, signature.0.clone(), attestation.0.clone()));
                Answer::Done
            }
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

/// For each state it is told of: that state, and the one the session's handle showed then.
#[derive(Default)]
struct TellsBeforePublishing {
    handle: std::sync::OnceLock<countersign_mobile_sdk::SessionHandle>,
    told: Mutex<Vec<(State, Option<State>)>>,
}

impl countersign_mobile_sdk::Callbacks for TellsBeforePublishing {
    fn on_state(&self, session: &countersign_mobile_sdk::SessionSnapshot) {
        let shown = self
            .handle
            .get()
            .map(countersign_mobile_sdk::SessionHandle::state);
        self.told.lock().unwrap().push((session.state, shown));
    }
}

/// A notice ends the session on the notice task while the app waits on the handle (what
/// `countersign device login` does while a continuous session is up): the app must not see
/// `Done` through `wait_for` before `on_state` told it, or it misses the final state (the
/// CLI printed no `state: done (logged out)` when its thread ran between the two).
#[tokio::test]
async fn on_state_is_told_of_a_notice_before_the_handle_shows_it() {
    let gateway = Gateway::start(60).await;
    let sdk = enrolled(&gateway, config()).await;
    let callbacks = Arc::new(TellsBeforePublishing::default());
    let session = sdk
        .start_session(&gateway.qr(QrKind::Login), callbacks.clone())
        .await
        .unwrap();
    assert!(callbacks.handle.set(session.clone()).is_ok());
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
    let told = callbacks.told.lock().unwrap().clone();
    // Told of Done by the time `wait_for` answered it, and while the handle still showed
    // Active: no waiter could have seen Done first.
    assert_eq!(
        told.iter().find(|(state, _)| *state == State::Done),
        Some(&(State::Done, Some(State::Active))),
        "{told:?}"
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

// The second factor, against a scripted SFS that runs the real OPAQUE server half and signs
// real attestations (the real SFS's flows are tested in the workspace's `tests/` crate).

mod sfs_script {
    use std::sync::{Arc, Mutex};

    use countersign_protocol::attestation::{AttestationClaims, Factor, sign_attestation};
    use countersign_protocol::channel::{Responder, SFS_PROLOGUE, StaticKey};
    use countersign_protocol::device::{Blob, Bytes};
    use countersign_protocol::sfs::{
        self, FactorState, SfsAnswer, SfsBody, SfsCode, SfsError, SfsHello, SfsOutcome, SfsReply,
        SfsRequest, SfsWelcome,
    };
    use futures::{SinkExt as _, StreamExt as _};
    use opaque_ke::{
        CipherSuite, CredentialFinalization, CredentialRequest, RegistrationRequest,
        RegistrationUpload, ServerLogin, ServerLoginStartParameters, ServerRegistration,
        ServerSetup,
    };
    use rand_core::OsRng;
    use tokio::io::AsyncWriteExt as _;
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::Message;

    /// The suite of docs/second-factor.md, restated as the SFS states it.
    pub struct Suite;
    impl CipherSuite for Suite {
        type OprfCs = opaque_ke::Ristretto255;
        type KeGroup = opaque_ke::Ristretto255;
        type KeyExchange = opaque_ke::key_exchange::tripledh::TripleDh;
        type Ksf = argon2::Argon2<'static>;
    }

    pub const ISSUED_AT_MS: i64 = 1_700_000_000_000;
    const ATTEMPTS: u32 = 5;

    pub struct State {
        setup: ServerSetup<Suite>,
        record: Option<Vec<u8>>,
        failures: u32,
        biometric_key: Option<Vec<u8>>,
    }

    #[derive(Clone)]
    pub struct Sfs {
        pub url: String,
        pub channel_key: StaticKey,
        pub attestation_key: p256::ecdsa::SigningKey,
        state: Arc<Mutex<State>>,
    }

    struct Conn {
        app: [u8; 16],
        login: Option<ServerLogin<Suite>>,
        nonce: Option<[u8; 32]>,
        pin_proven: bool,
    }

    fn refuse(code: SfsCode) -> Result<SfsAnswer, SfsError> {
        Err(SfsError::new(code, "refused"))
    }

    impl Sfs {
        pub async fn start() -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let sfs = Self {
                url: format!("ws://{}/v1/sfs", listener.local_addr().unwrap()),
                channel_key: StaticKey::from_bytes(&[0x51; 32]).unwrap(),
                attestation_key: p256::ecdsa::SigningKey::from_slice(&[0x52; 32]).unwrap(),
                state: Arc::new(Mutex::new(State {
                    setup: ServerSetup::new(&mut OsRng),
                    record: None,
                    failures: 0,
                    biometric_key: None,
                })),
            };
            let serving = sfs.clone();
            tokio::spawn(async move {
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    tokio::spawn(serving.clone().serve(stream));
                }
            });
            sfs
        }

        pub fn attestation_public_key(&self) -> Vec<u8> {
            self.attestation_key
                .verifying_key()
                .to_sec1_point(false)
                .as_bytes()
                .to_vec()
        }

        async fn serve(self, mut stream: tokio::net::TcpStream) {
            let mut head = [0u8; 512];
            let n = stream.peek(&mut head).await.unwrap();
            let line = String::from_utf8_lossy(&head[..n])
                .lines()
                .next()
                .unwrap_or("")
                .to_owned();
            if line.contains("/v1/sfs/key") {
                let body = serde_json::json!({
                    "channel_public_key": hex::encode(self.channel_key.public_key().unwrap()),
                    "attestation_public_key": hex::encode(self.attestation_public_key()),
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
            assert!(line.contains("/v1/sfs/channel"), "{line}");
            let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
            let Some(Ok(Message::Binary(first))) = ws.next().await else {
                return;
            };
            let (responder, hello) =
                Responder::read_with_prologue(&self.channel_key, SFS_PROLOGUE, &first).unwrap();
            let hello: SfsHello = sfs::decode(&hello).unwrap();
            let welcome = {
                let state = self.state.lock().unwrap();
                SfsWelcome::Accepted {
                    pin_registered: state.record.is_some(),
                    biometric_registered: state.biometric_key.is_some(),
                    state: if state.record.is_some() {
                        FactorState::Active
                    } else {
                        FactorState::None
                    },
                }
            };
            let (mut channel, second) = responder.accept(&sfs::encode(&welcome).unwrap()).unwrap();
            ws.send(Message::binary(second)).await.unwrap();
            let mut conn = Conn {
                app: hello.app_instance.0,
                login: None,
                nonce: None,
                pin_proven: false,
            };
            while let Some(Ok(Message::Binary(frame))) = ws.next().await {
                let Some(bytes) = channel.open(&frame).unwrap() else {
                    continue;
                };
                let request: SfsRequest = sfs::decode(&bytes).unwrap();
                let outcome = match self.handle(&mut conn, request.body) {
                    Ok(answer) => SfsOutcome::Ok(answer),
                    Err(error) => SfsOutcome::Err(error),
                };
                let reply = SfsReply {
                    id: request.id,
                    outcome,
                };
                for frame in channel.seal(&sfs::encode(&reply).unwrap()).unwrap() {
                    ws.send(Message::binary(frame)).await.unwrap();
                }
            }
        }

        fn attest(
            &self,
            conn: &Conn,
            factor: Factor,
            challenge: Bytes<32>,
            thumbprint: Bytes<32>,
        ) -> Result<SfsAnswer, SfsError> {
            let claims = AttestationClaims {
                app_instance: Bytes(conn.app),
                factor,
                challenge,
                account_key_thumbprint: thumbprint,
                issued_at_ms: ISSUED_AT_MS,
                expires_at_ms: ISSUED_AT_MS + 60_000,
                attestation_id: Bytes([9; 16]),
            };
            Ok(SfsAnswer::Attestation {
                cose: Blob(sign_attestation(&claims, &self.attestation_key).unwrap()),
            })
        }

        fn handle(&self, conn: &mut Conn, body: SfsBody) -> Result<SfsAnswer, SfsError> {
            let mut state = self.state.lock().unwrap();
            match body {
                SfsBody::RegisterPinStart { request } => {
                    if state.record.is_some() && !conn.pin_proven {
                        return refuse(SfsCode::AlreadyRegistered);
                    }
                    let response = ServerRegistration::<Suite>::start(
                        &state.setup,
                        RegistrationRequest::deserialize(&request.0).unwrap(),
                        &conn.app,
                    )
                    .unwrap();
                    Ok(SfsAnswer::Registration {
                        response: Blob(response.message.serialize().to_vec()),
                    })
                }
                SfsBody::RegisterPinFinish { upload } => {
                    let upload = RegistrationUpload::<Suite>::deserialize(&upload.0).unwrap();
                    state.record = Some(ServerRegistration::finish(upload).serialize().to_vec());
                    Ok(SfsAnswer::Done)
                }
                SfsBody::LoginStart { request } => {
                    let Some(record) = state.record.clone() else {
                        return refuse(SfsCode::NotRegistered);
                    };
                    state.failures += 1;
                    let started = ServerLogin::start(
                        &mut OsRng,
                        &state.setup,
                        Some(ServerRegistration::<Suite>::deserialize(&record).unwrap()),
                        CredentialRequest::deserialize(&request.0).unwrap(),
                        &conn.app,
                        ServerLoginStartParameters::default(),
                    )
                    .unwrap();
                    conn.login = Some(started.state);
                    Ok(SfsAnswer::Credential {
                        response: Blob(started.message.serialize().to_vec()),
                    })
                }
                SfsBody::LoginFinish {
                    finalization,
                    challenge,
                    account_key_thumbprint,
                } => {
                    let pending = conn.login.take().unwrap();
                    let verified = CredentialFinalization::deserialize(&finalization.0)
                        .ok()
                        .is_some_and(|f| pending.finish(f).is_ok());
                    if !verified {
                        return refuse(SfsCode::WrongPin {
                            attempts_left: ATTEMPTS.saturating_sub(state.failures),
                        });
                    }
                    state.failures = 0;
                    conn.pin_proven = true;
                    self.attest(conn, Factor::Pin, challenge, account_key_thumbprint)
                }
                SfsBody::RegisterBiometric { public_key } => {
                    if !conn.pin_proven {
                        return refuse(SfsCode::NotAllowed);
                    }
                    state.biometric_key = Some(public_key.0.to_vec());
                    Ok(SfsAnswer::Done)
                }
                SfsBody::BiometricStart => {
                    let nonce = [0x4e; 32];
                    conn.nonce = Some(nonce);
                    Ok(SfsAnswer::BiometricChallenge {
                        nonce: Bytes(nonce),
                    })
                }
                SfsBody::BiometricFinish {
                    signature,
                    challenge,
                    account_key_thumbprint,
                } => {
                    let nonce = conn.nonce.take().unwrap();
                    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(
                        state.biometric_key.as_ref().unwrap(),
                    )
                    .unwrap();
                    let message =
                        sfs::biometric_message(&nonce, &challenge.0, &account_key_thumbprint.0);
                    if countersign_protocol::cose::verify_es256(&key, &message, &signature.0)
                        .is_err()
                    {
                        return refuse(SfsCode::Invalid);
                    }
                    self.attest(conn, Factor::Biometric, challenge, account_key_thumbprint)
                }
            }
        }
    }
}

const CHALLENGE: [u8; 32] = [0xc1; 32];

/// Checks each attestation the gateway received as the NS would (checks 1–5).
fn attested(gateway: &Gateway, sfs: &sfs_script::Sfs) -> Vec<(&'static str, Factor)> {
    let script = gateway.script.lock().unwrap();
    let trusted = [*sfs.attestation_key.verifying_key()];
    let expect = Expected {
        challenge: CHALLENGE,
        account_key_thumbprint: fingerprint(&script.signing_public_key),
        now_ms: sfs_script::ISSUED_AT_MS,
    };
    script
        .attestations
        .iter()
        .map(|(purpose, bytes)| {
            (
                *purpose,
                verify_attestation(bytes, &trusted, &expect).unwrap().factor,
            )
        })
        .collect()
}

fn second_factor_events(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<Event>,
) -> Vec<SecondFactorEvent> {
    let mut out = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let Event::SecondFactor(_, e) = event {
            out.push(e);
        }
    }
    out
}

#[tokio::test]
async fn the_second_factor_at_enrolment_login_and_by_biometric() {
    const WAIT_2FA: State = State::UserInteraction(Interaction::WaitForSecondFactor);
    let gateway = Gateway::start(0).await;
    gateway.script.lock().unwrap().second_factor = true;
    let sfs = sfs_script::Sfs::start().await;
    let pinned = SfsConfig::fetch(&sfs.url).await.unwrap();
    assert_eq!(
        pinned.channel_public_key,
        sfs.channel_key.public_key().unwrap()
    );
    assert_eq!(pinned.attestation_public_key, sfs.attestation_public_key());
    let sdk = Sdk::open(
        Arc::new(MemoryStorage::new()),
        SdkConfig {
            sfs: Some(pinned),
            argon2_params: Argon2Params {
                m_kib: 64,
                t: 1,
                p: 1,
            },
            ..config()
        },
    )
    .unwrap();

    // The first enrolment registers the PIN, then upgrades the new account.
    let (callbacks, mut events) = ChannelCallbacks::new();
    let enrolment = sdk
        .start_session(&gateway.qr(QrKind::Enrolment), callbacks)
        .await
        .unwrap();
    enrolment.set_account(None).await.unwrap();
    assert_eq!(enrolment.state(), WAIT_2FA);
    assert!(sdk.accounts().unwrap()[0].headless);
    enrolment
        .set_pin_biometric(SecondFactor::pin("2580"))
        .await
        .unwrap();
    assert_eq!(enrolment.state(), State::Done);
    assert_eq!(enrolment.history_status(), Some(HistoryStatus::Enrolled));
    assert_eq!(
        second_factor_events(&mut events),
        [SecondFactorEvent::Verified]
    );
    assert!(!sdk.accounts().unwrap()[0].headless);
    let status = sdk.second_factor_status().await.unwrap();
    assert!(status.pin_registered && !status.biometric_registered);

    // A login: a wrong PIN is told and waits, the right one logs in.
    let (callbacks, mut events) = ChannelCallbacks::new();
    let login = sdk
        .start_session(&gateway.qr(QrKind::Login), callbacks)
        .await
        .unwrap();
    login.set_account(None).await.unwrap();
    assert_eq!(login.state(), WAIT_2FA);
    let wrong = login.set_pin_biometric(SecondFactor::pin("0000")).await;
    let told = SecondFactorEvent::WrongPin { attempts_left: 4 };
    assert_eq!(wrong, Err(SdkError::SecondFactor(told)));
    assert_eq!(login.state(), WAIT_2FA);
    assert_eq!(login.snapshot().error, None);
    login
        .set_pin_biometric(SecondFactor::pin("2580"))
        .await
        .unwrap();
    assert_eq!(login.history_status(), Some(HistoryStatus::LoggedInOneShot));
    assert_eq!(
        second_factor_events(&mut events),
        [told, SecondFactorEvent::Verified]
    );
    assert!(
        gateway.seen().ends_with(&[
            "Challenge".into(),
            "VerifySecondFactor".into(),
            "LogIn".into()
        ]),
        "{:?}",
        gateway.seen()
    );

    // A biometric key, registered with the PIN, released by the prompt.
    sdk.register_biometric(Pin::new("2580")).await.unwrap();
    let prompt = Arc::new(SimulatedBiometric::new(false));
    sdk.set_biometric_prompt(prompt.clone()).unwrap();
    let login = sdk
        .start_session(&gateway.qr(QrKind::Login), Arc::new(NoCallbacks))
        .await
        .unwrap();
    login.set_account(None).await.unwrap();
    assert_eq!(
        login.set_pin_biometric(SecondFactor::Biometric).await,
        Err(SdkError::SecondFactor(SecondFactorEvent::BiometricFailed))
    );
    assert_eq!(login.state(), WAIT_2FA);
    prompt.set(true);
    login
        .set_pin_biometric(SecondFactor::Biometric)
        .await
        .unwrap();
    assert_eq!(login.history_status(), Some(HistoryStatus::LoggedInOneShot));

    // Change the PIN; the old one no longer works; cancelling aborts.
    assert_eq!(
        sdk.change_pin(Pin::new("1111"), Pin::new("3690")).await,
        Err(SdkError::SecondFactor(SecondFactorEvent::WrongPin {
            attempts_left: 4
        }))
    );
    sdk.change_pin(Pin::new("2580"), Pin::new("3690"))
        .await
        .unwrap();
    let login = sdk
        .start_session(&gateway.qr(QrKind::Login), Arc::new(NoCallbacks))
        .await
        .unwrap();
    login.set_account(None).await.unwrap();
    assert!(
        login
            .set_pin_biometric(SecondFactor::pin("2580"))
            .await
            .is_err()
    );
    login.input_cancel().await.unwrap();
    assert_eq!(login.history_status(), Some(HistoryStatus::Aborted));

    assert_eq!(
        attested(&gateway, &sfs),
        [
            ("upgrade", Factor::Pin),
            ("login", Factor::Pin),
            ("login", Factor::Biometric)
        ]
    );
}

#[tokio::test]
async fn without_an_sfs_a_second_factor_is_unavailable_and_enrolments_stay_headless() {
    let gateway = Gateway::start(0).await;
    gateway.script.lock().unwrap().second_factor = true;
    let sdk = enrolled(&gateway, config()).await;
    assert!(sdk.accounts().unwrap()[0].headless);
    let login = sdk
        .start_session(&gateway.qr(QrKind::Login), Arc::new(NoCallbacks))
        .await
        .unwrap();
    login.set_account(None).await.unwrap();
    assert_eq!(
        login.set_pin_biometric(SecondFactor::pin("1234")).await,
        Err(SdkError::SecondFactorUnavailable)
    );
    assert_eq!(
        sdk.upgrade_account(&hex::encode(ACCOUNT_ID), SecondFactor::Biometric)
            .await,
        Err(SdkError::SecondFactorUnavailable)
    );
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

#[tokio::test]
async fn transactions_are_told_shown_and_signed_over_what_was_shown() {
    let gateway = Gateway::start(0).await;
    gateway.script.lock().unwrap().second_factor = true;
    let sfs = sfs_script::Sfs::start().await;
    let sdk = Sdk::open(
        Arc::new(MemoryStorage::new()),
        SdkConfig {
            sfs: Some(SfsConfig::fetch(&sfs.url).await.unwrap()),
            argon2_params: Argon2Params {
                m_kib: 64,
                t: 1,
                p: 1,
            },
            ..config()
        },
    )
    .unwrap();
    let enrolment = sdk
        .start_session(&gateway.qr(QrKind::Enrolment), Arc::new(NoCallbacks))
        .await
        .unwrap();
    enrolment.set_account(None).await.unwrap();
    enrolment
        .set_pin_biometric(SecondFactor::pin("2580"))
        .await
        .unwrap();
    let account = hex::encode(ACCOUNT_ID);

    // A notice on the listening connection reaches the callback.
    let (callbacks, mut events) = ChannelCallbacks::new();
    let listener = sdk.listen(&account, callbacks).await.unwrap();
    gateway
        .notices
        .send(Notice::TransactionPending(PendingTransaction {
            transaction_id: Bytes(TX_ID),
            announce_info: Some("Payment".into()),
            expires_at_ms: 301_000,
        }))
        .unwrap();
    let told = loop {
        if let Event::TransactionPending(info, pending) =
            tokio::time::timeout(Duration::from_secs(5), events.recv())
                .await
                .unwrap()
                .unwrap()
        {
            break (info, pending);
        }
    };
    assert_eq!(told.0.account_id, account);
    assert_eq!(told.1.transaction_id, hex::encode(TX_ID));
    listener.stop();

    // A transaction code names the transaction and this device's accounts at its server.
    let code = QrPayload {
        kind: QrKind::Transaction,
        server_id: SERVER_ID,
        token: QrPayload::transaction_token(TX_ID),
        gateway: gateway.url.clone(),
        server_key_fingerprint: gateway.fingerprint(),
    };
    let target = sdk.transaction_from_input(&code.encode()).unwrap();
    assert_eq!(target.transaction_id, hex::encode(TX_ID));
    assert_eq!(target.accounts.len(), 1);
    assert!(matches!(
        sdk.start_session(&code.encode(), Arc::new(NoCallbacks))
            .await,
        Err(SdkError::InvalidTransaction(_))
    ));
    let forged = QrPayload {
        server_key_fingerprint: [0; 32],
        ..code
    };
    assert_eq!(
        sdk.transaction_from_input(&forged.encode()),
        Err(SdkError::FingerprintMismatch)
    );

    let listed = sdk.pending_transactions(&account).await.unwrap();
    assert_eq!(listed[0].transaction_id, hex::encode(TX_ID));
    let shown = sdk
        .get_transaction(&account, &hex::encode(TX_ID))
        .await
        .unwrap();
    assert_eq!(
        (shown.data.as_slice(), shown.text.as_str()),
        (TX_DATA, TX_TEXT)
    );

    // Signed over what was shown, with a fresh attestation of the public challenge computed
    // from it (the gateway's challenge is never asked for).
    let before = gateway.seen().len();
    let device_data = std::collections::BTreeMap::from([("os".to_owned(), "test".to_owned())]);
    let receipt = sdk
        .sign_transaction(
            &account,
            &shown,
            SecondFactor::pin("2580"),
            device_data.clone(),
            Some(b"ref".to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(&gateway.seen()[before..], ["SignTransaction"]);
    let own = sdk
        .sign_own_transaction(
            &account,
            b"note".to_vec(),
            "text/plain",
            "Sign this note?",
            SecondFactor::pin("2580"),
            Default::default(),
            None,
        )
        .await
        .unwrap();
    let script = gateway.script.lock().unwrap();
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&script.signing_public_key).unwrap();
    let trusted = [*sfs.attestation_key.verifying_key()];
    let cases = [
        (TX_ID, TX_DATA, TX_TEXT),
        (
            <[u8; 16]>::try_from(hex::decode(&own.transaction_id).unwrap()).unwrap(),
            b"note".as_slice(),
            "Sign this note?",
        ),
    ];
    assert_eq!(script.signed.len(), 2);
    for ((id, signature, attestation), (want_id, data, text)) in script.signed.iter().zip(cases) {
        assert_eq!(*id, want_id);
        let signed = verify_signed_transaction(signature, &key).unwrap();
        assert_eq!(signed.transaction_id.0, want_id);
        assert_eq!(signed.server_id.0, SERVER_ID);
        assert_eq!(signed.data_hash.0, sha256(data));
        assert_eq!(signed.text_hash.0, sha256(text.as_bytes()));
        assert_eq!(signed.attestation_hash.0, sha256(attestation));
        let expect = Expected {
            challenge: transaction_challenge(
                &SERVER_ID,
                &want_id,
                &sha256(data),
                &sha256(text.as_bytes()),
            ),
            account_key_thumbprint: fingerprint(&script.signing_public_key),
            now_ms: sfs_script::ISSUED_AT_MS,
        };
        verify_attestation(attestation, &trusted, &expect).unwrap();
    }
    assert_eq!(
        verify_signed_transaction(&script.signed[0].1, &key)
            .unwrap()
            .device_data,
        device_data
    );
    assert_eq!(receipt.device_signature, script.signed[0].1);
}
