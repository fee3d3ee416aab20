//! Push in the SDK against a scripted gateway and a scripted Message Center on loopback: the
//! real WebSockets, Noise handshakes and CBOR messages, the real HPKE sealing
//! (`countersign_protocol::push::seal`, as the NS seals), with servers that answer from a
//! script. What is checked: registration (once at the MC, once per account at the gateway,
//! at enrolment afterwards), the action a message chooses, and the refusals (replay even
//! after a restart, re-targeted, expired, another key, another sender), and that a message
//! pushed and pulled runs once. The real NS and MC are driven in the workspace's `tests/`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use countersign_mobile_sdk::{
    ChannelCallbacks, Event, HistoryStatus, Interaction, McConfig, MemoryStorage, NoCallbacks,
    Platform, PushAction, PushRefusal, Sdk, SdkConfig, SdkError, State,
};
use countersign_protocol::channel::{MC_PROLOGUE, Responder, StaticKey, fingerprint};
use countersign_protocol::device::{
    self, Answer, Blob, Bytes, Hello, Intent, Outcome, PendingTransaction, Refusal, Request,
    RequestBody, ServerMessage, ServerParams, SessionDetails, Welcome,
};
use countersign_protocol::mc::{
    self, McAnswer, McHello, McMessage, McOutcome, McRefusal, McRequest, McRequestBody,
    McServerMessage, McWelcome,
};
use countersign_protocol::push::{self, PushBody, PushMessage, PushTarget};
use countersign_protocol::qr::{QrKind, QrPayload};
use futures::{SinkExt as _, StreamExt as _};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

const SERVER_ID: [u8; 16] = [1; 16];
const HSID: [u8; 32] = [7; 32];
const TX_ID: [u8; 16] = [0x7a; 16];
/// The device clock of every test: messages expire relative to it.
const NOW_MS: i64 = 1_000_000;

// ---------------------------------------------------------------------------------------
// A scripted gateway: enrols accounts (one new id each), answers logins, records
// `register_push`, refuses deleted accounts.

/// What a device registered for an account: (MC key, MC token, push public key).
type Registered = (Vec<u8>, [u8; 32], Vec<u8>);

#[derive(Default)]
struct GatewayState {
    enrolled: u8,
    deleted: HashSet<[u8; 16]>,
    /// By account: (MC key, MC token, push public key), as last registered.
    push: HashMap<[u8; 16], Registered>,
    /// Requests answered: (the account the channel spoke as, the request's name).
    seen: Vec<(Option<[u8; 16]>, String)>,
}

#[derive(Clone)]
struct Gateway {
    url: String,
    key: StaticKey,
    /// The server's push sender key pair.
    push_secret: [u8; 32],
    push_public: Vec<u8>,
    state: Arc<Mutex<GatewayState>>,
}

impl Gateway {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (push_secret, push_public) = push::generate_push_key([0x51; 32]);
        let gateway = Self {
            url: format!("ws://{}/v1/device", listener.local_addr().unwrap()),
            key: StaticKey::from_bytes(&[3; 32]).unwrap(),
            push_secret,
            push_public,
            state: Arc::default(),
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

    fn code(&self, kind: QrKind, token: [u8; 32]) -> Vec<u8> {
        QrPayload {
            kind,
            server_id: SERVER_ID,
            token,
            gateway: self.url.clone(),
            server_key_fingerprint: fingerprint(&self.key.public_key().unwrap()),
        }
        .encode()
    }

    fn seen(&self) -> Vec<(Option<[u8; 16]>, String)> {
        self.state.lock().unwrap().seen.clone()
    }

    fn count(&self, name: &str) -> usize {
        self.seen().iter().filter(|(_, n)| n == name).count()
    }

    /// The push key the device registered for `account`.
    fn push_key_of(&self, account: &str) -> Vec<u8> {
        let id: [u8; 16] = hex::decode(account).unwrap().try_into().unwrap();
        self.state.lock().unwrap().push[&id].2.clone()
    }

    /// Seals `body` for `account` the way the NS does.
    fn seal(&self, account: &str, message_id: u8, expires_at_ms: u64, body: PushBody) -> Vec<u8> {
        let target = PushTarget {
            server_id: SERVER_ID,
            account_id: hex::decode(account).unwrap().try_into().unwrap(),
        };
        seal_with(
            &self.push_secret,
            &self.push_key_of(account),
            &target,
            message_id,
            expires_at_ms,
            body,
        )
    }

    async fn serve(self, mut stream: tokio::net::TcpStream) {
        let mut head = [0u8; 512];
        let n = stream.peek(&mut head).await.unwrap();
        if !String::from_utf8_lossy(&head[..n]).contains("/channel") {
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
        let account = match hello.intent {
            Intent::Account { account_id } => Some(account_id.0),
            Intent::Guest => None,
        };
        let deleted = account.is_some_and(|a| self.state.lock().unwrap().deleted.contains(&a));
        let welcome = if deleted {
            Welcome::Refused {
                reason: Refusal::AccountDeleted,
            }
        } else {
            Welcome::Accepted {
                server: ServerParams {
                    server_id: Bytes(SERVER_ID),
                    name: "Bank".into(),
                    logo_url: None,
                    second_factor: "none".into(),
                    second_factor_cache_secs: 0,
                    default_ping_time_secs: 0,
                    push_key: Some(Blob(self.push_public.clone())),
                },
            }
        };
        let (mut channel, second) = responder
            .accept(&device::encode(&welcome).unwrap())
            .unwrap();
        ws.send(Message::binary(second)).await.unwrap();
        if deleted {
            return;
        }
        while let Some(Ok(Message::Binary(frame))) = ws.next().await {
            let Some(bytes) = channel.open(&frame).unwrap() else {
                continue;
            };
            let request: Request = device::decode(&bytes).unwrap();
            let reply = ServerMessage::Reply {
                id: request.id,
                outcome: Outcome::Ok(self.answer(account, &request.body)),
            };
            for frame in channel.seal(&device::encode(&reply).unwrap()).unwrap() {
                ws.send(Message::binary(frame)).await.unwrap();
            }
        }
    }

    fn answer(&self, account: Option<[u8; 16]>, body: &RequestBody) -> Answer {
        let mut state = self.state.lock().unwrap();
        let name = format!("{body:?}");
        let name = name.split([' ', '{', '(']).next().unwrap().to_owned();
        state.seen.push((account, name));
        match body {
            RequestBody::Enrol { .. } => {
                state.enrolled += 1;
                Answer::Enrolled {
                    account_id: Bytes([0x10 + state.enrolled; 16]),
                    userid: format!("user{}", state.enrolled),
                }
            }
            RequestBody::Scan { .. } => Answer::Session(SessionDetails {
                announce_info: Some("Log in to Bank".into()),
                ping_time_secs: 0,
                second_factor_required: false,
                expires_at_ms: 0,
            }),
            RequestBody::LogIn { .. } => Answer::LoggedIn {
                session_info: None,
                ping_time_secs: 0,
            },
            RequestBody::RegisterPush {
                mc_key,
                mc_token,
                push_public_key,
            } => {
                let account = account.expect("register_push is for accounts");
                state.push.insert(
                    account,
                    (
                        mc_key.0.clone(),
                        *mc_token.expose(),
                        push_public_key.0.clone(),
                    ),
                );
                Answer::Done
            }
            RequestBody::PendingTransactions => Answer::Transactions {
                pending: vec![PendingTransaction {
                    transaction_id: Bytes(TX_ID),
                    announce_info: Some("Payment".into()),
                    expires_at_ms: 301_000,
                }],
            },
            _ => Answer::Done,
        }
    }
}

fn seal_with(
    sender_secret: &[u8; 32],
    recipient_public: &[u8],
    target: &PushTarget,
    message_id: u8,
    expires_at_ms: u64,
    body: PushBody,
) -> Vec<u8> {
    let message = PushMessage {
        body,
        sent_at_ms: 999_000,
    };
    push::seal(
        sender_secret,
        recipient_public,
        target,
        [message_id; 16],
        expires_at_ms,
        &message,
        [message_id ^ 0x55; 32],
    )
    .unwrap()
}

// ---------------------------------------------------------------------------------------
// A scripted Message Center: one mailbox per registration, a queue to pull from.

#[derive(Default)]
struct McState {
    /// Mailbox → (the channel key bound to it, MC token, push token).
    mailboxes: HashMap<[u8; 16], (Vec<u8>, [u8; 32], String)>,
    /// Outstanding messages, oldest first: (id, expiry, envelope).
    queue: Vec<([u8; 16], u64, Vec<u8>)>,
    acked: Vec<[u8; 16]>,
    /// Requests answered, by name.
    seen: Vec<String>,
}

#[derive(Clone)]
struct Mc {
    url: String,
    key: StaticKey,
    state: Arc<Mutex<McState>>,
}

impl Mc {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mc = Self {
            url: format!("ws://{}/v1/mc", listener.local_addr().unwrap()),
            key: StaticKey::from_bytes(&[0x4d; 32]).unwrap(),
            state: Arc::default(),
        };
        let serving = mc.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(serving.clone().serve(stream));
            }
        });
        mc
    }

    fn config(&self) -> McConfig {
        McConfig {
            url: self.url.clone(),
            channel_public_key: self.key.public_key().unwrap(),
        }
    }

    fn seen(&self) -> Vec<String> {
        self.state.lock().unwrap().seen.clone()
    }

    fn queue(&self, envelope: &[u8]) {
        let decoded = push::decode_envelope(envelope).unwrap();
        self.state.lock().unwrap().queue.push((
            decoded.message_id,
            decoded.expires_at_ms,
            envelope.to_vec(),
        ));
    }

    async fn serve(self, stream: tokio::net::TcpStream) {
        let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        let Some(Ok(Message::Binary(first))) = ws.next().await else {
            return;
        };
        let (responder, hello) =
            Responder::read_with_prologue(&self.key, MC_PROLOGUE, &first).unwrap();
        let hello: McHello = mc::decode(&hello).unwrap();
        let remote = responder.remote_static().to_vec();
        let mailbox = hello.mailbox.map(|m| m.0);
        let known = mailbox.is_none_or(|m| {
            self.state
                .lock()
                .unwrap()
                .mailboxes
                .get(&m)
                .is_some_and(|(key, _, _)| *key == remote)
        });
        let welcome = if known {
            McWelcome::Accepted {}
        } else {
            McWelcome::Refused {
                reason: McRefusal::UnknownMailbox,
            }
        };
        let (mut channel, second) = responder.accept(&mc::encode(&welcome).unwrap()).unwrap();
        ws.send(Message::binary(second)).await.unwrap();
        if !known {
            return;
        }
        let mut mailbox = mailbox;
        while let Some(Ok(Message::Binary(frame))) = ws.next().await {
            let Some(bytes) = channel.open(&frame).unwrap() else {
                continue;
            };
            let request: McRequest = mc::decode(&bytes).unwrap();
            let answer = self.answer(&mut mailbox, &remote, request.body);
            let reply = McServerMessage::Reply {
                id: request.id,
                outcome: McOutcome::Ok(answer),
            };
            for frame in channel.seal(&mc::encode(&reply).unwrap()).unwrap() {
                ws.send(Message::binary(frame)).await.unwrap();
            }
        }
    }

    fn answer(
        &self,
        mailbox: &mut Option<[u8; 16]>,
        remote: &[u8],
        body: McRequestBody,
    ) -> McAnswer {
        let mut state = self.state.lock().unwrap();
        let name = format!("{body:?}");
        state
            .seen
            .push(name.split([' ', '{', '(']).next().unwrap().to_owned());
        match body {
            McRequestBody::Register { push_token, .. } => {
                assert!(mailbox.is_none(), "register on a registered channel");
                let id = [0x60 + u8::try_from(state.mailboxes.len()).unwrap(); 16];
                let token = [0x70 + u8::try_from(state.mailboxes.len()).unwrap(); 32];
                state
                    .mailboxes
                    .insert(id, (remote.to_vec(), token, push_token));
                *mailbox = Some(id);
                McAnswer::Registered {
                    mailbox: Bytes(id),
                    mc_token: device::Secret::new(token),
                }
            }
            McRequestBody::UpdatePushToken { push_token } => {
                let id = mailbox.expect("a mailbox");
                state.mailboxes.get_mut(&id).unwrap().2 = push_token;
                McAnswer::Done
            }
            McRequestBody::Pull { limit } => {
                let acked = state.acked.clone();
                let outstanding: Vec<_> = state
                    .queue
                    .iter()
                    .filter(|(id, _, _)| !acked.contains(id))
                    .collect();
                let limit = usize::from(limit);
                McAnswer::Messages {
                    more: outstanding.len() > limit,
                    messages: outstanding
                        .iter()
                        .take(limit)
                        .map(|(id, exp, envelope)| McMessage {
                            message_id: Bytes(*id),
                            expires_at_ms: *exp,
                            envelope: Blob(envelope.clone()),
                        })
                        .collect(),
                }
            }
            McRequestBody::Ack { message_ids } => {
                state.acked.extend(message_ids.iter().map(|m| m.0));
                McAnswer::Done
            }
        }
    }
}

// ---------------------------------------------------------------------------------------

struct Phone {
    sdk: Sdk,
    storage: Arc<MemoryStorage>,
    /// Account ids, in enrolment order.
    accounts: Vec<String>,
}

fn config(mc: &Mc) -> SdkConfig {
    SdkConfig {
        request_timeout: Duration::from_secs(5),
        mc: Some(mc.config()),
        ..SdkConfig::default()
    }
}

fn open(storage: &Arc<MemoryStorage>, mc: &Mc) -> Sdk {
    let sdk = Sdk::open(storage.clone(), config(mc)).unwrap();
    sdk.set_clock(Arc::new(|| NOW_MS)).unwrap();
    sdk
}

async fn enrol(sdk: &Sdk, gateway: &Gateway) -> String {
    let session = sdk
        .start_session(
            &gateway.code(QrKind::Enrolment, [5; 32]),
            Arc::new(NoCallbacks),
        )
        .await
        .unwrap();
    session.set_account(None).await.unwrap();
    assert_eq!(session.history_status(), Some(HistoryStatus::Enrolled));
    session.snapshot().account_id.unwrap()
}

/// A phone with `accounts` accounts at the gateway's server, registered for push.
async fn phone(gateway: &Gateway, mc: &Mc, accounts: usize) -> Phone {
    let storage = Arc::new(MemoryStorage::new());
    let sdk = open(&storage, mc);
    let mut ids = Vec::new();
    for _ in 0..accounts {
        ids.push(enrol(&sdk, gateway).await);
    }
    let registration = sdk
        .register_push(Platform::Fcm, "fcm-token-1", "com.example.bank")
        .await
        .unwrap();
    assert_eq!(registration.registered, ids);
    assert!(registration.failed.is_empty(), "{:?}", registration.failed);
    Phone {
        sdk,
        storage,
        accounts: ids,
    }
}

fn cs(envelope: &[u8]) -> Vec<u8> {
    URL_SAFE_NO_PAD.encode(envelope).into_bytes()
}

fn refusal(result: Result<PushAction, SdkError>) -> PushRefusal {
    match result {
        Err(SdkError::Push(refusal)) => refusal,
        other => panic!("expected a push refusal, got {other:?}"),
    }
}

const LATER: u64 = 2_000_000;

#[tokio::test]
async fn register_push_registers_the_mailbox_once_and_each_account_once() {
    let gateway = Gateway::start().await;
    let mc = Mc::start().await;
    let phone = phone(&gateway, &mc, 2).await;
    let mailbox = phone.sdk.push_mailbox().unwrap().unwrap();
    assert_eq!(mc.seen(), ["Register"]);
    {
        let state = gateway.state.lock().unwrap();
        let (mailbox_id, (_, token, _)) = mc
            .state
            .lock()
            .unwrap()
            .mailboxes
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .next()
            .unwrap();
        assert_eq!(hex::encode(mailbox_id), mailbox);
        assert_eq!(state.push.len(), 2);
        let keys: HashSet<_> = state.push.values().map(|(_, _, k)| k.clone()).collect();
        assert_eq!(keys.len(), 2, "one push key per account");
        for (mc_key, mc_token, push_key) in state.push.values() {
            assert_eq!(mc_key, &mc.key.public_key().unwrap());
            assert_eq!(mc_token, &token, "the MC's token reaches the server");
            assert_eq!(push_key.len(), 65);
        }
    }
    // Again: the MC only hears the new push token, the servers nothing.
    let again = phone
        .sdk
        .register_push(Platform::Fcm, "fcm-token-2", "com.example.bank")
        .await
        .unwrap();
    assert!(!again.new_mailbox);
    assert!(again.registered.is_empty());
    assert_eq!(again.already, phone.accounts);
    assert_eq!(mc.seen(), ["Register", "UpdatePushToken"]);
    assert_eq!(gateway.count("RegisterPush"), 2);
    phone.sdk.update_push_token("fcm-token-3").await.unwrap();
    assert_eq!(
        mc.state
            .lock()
            .unwrap()
            .mailboxes
            .values()
            .next()
            .unwrap()
            .2,
        "fcm-token-3"
    );
    // An account enrolled now is registered at enrolment.
    let third = enrol(&phone.sdk, &gateway).await;
    assert_eq!(gateway.count("RegisterPush"), 3);
    let third_id: [u8; 16] = hex::decode(&third).unwrap().try_into().unwrap();
    assert!(gateway.state.lock().unwrap().push.contains_key(&third_id));
    // The state survives a restart: same mailbox, nothing registered again.
    let reopened = open(&phone.storage, &mc);
    assert_eq!(reopened.push_mailbox().unwrap(), Some(mailbox));
    let after = reopened
        .register_push(Platform::Fcm, "fcm-token-4", "com.example.bank")
        .await
        .unwrap();
    assert_eq!(after.already.len(), 3);
    assert_eq!(gateway.count("RegisterPush"), 3);
}

#[tokio::test]
async fn without_an_mc_or_a_registration_push_is_unavailable() {
    let storage = Arc::new(MemoryStorage::new());
    let sdk = Sdk::open(storage, SdkConfig::default()).unwrap();
    assert_eq!(
        sdk.register_push(Platform::Apns, "t", "com.example")
            .await
            .unwrap_err(),
        SdkError::PushUnavailable
    );
    let mc = Mc::start().await;
    let sdk = open(&Arc::new(MemoryStorage::new()), &mc);
    assert_eq!(
        sdk.update_push_token("t").await.unwrap_err(),
        SdkError::PushNotRegistered
    );
    assert_eq!(
        sdk.pull_messages(Arc::new(NoCallbacks)).await.unwrap_err(),
        SdkError::PushNotRegistered
    );
}

#[tokio::test]
async fn a_pushed_login_starts_the_session_with_the_message_s_account() {
    let gateway = Gateway::start().await;
    let mc = Mc::start().await;
    let phone = phone(&gateway, &mc, 2).await;
    let second = &phone.accounts[1];
    let envelope = gateway.seal(second, 1, LATER, PushBody::Login { hsid: Bytes(HSID) });
    let (callbacks, mut events) = ChannelCallbacks::new();
    let action = phone
        .sdk
        .process_push(&cs(&envelope), callbacks)
        .await
        .unwrap();
    let PushAction::Login(session) = action else {
        panic!("a login, got {action:?}");
    };
    assert_eq!(
        session.state(),
        State::UserInteraction(Interaction::WaitForConfirmation)
    );
    let eligible: Vec<_> = session
        .eligible_accounts()
        .unwrap()
        .into_iter()
        .map(|a| a.account_id)
        .collect();
    assert_eq!(
        &eligible,
        std::slice::from_ref(second),
        "only the message's account"
    );
    assert_eq!(session.snapshot().account_id.as_ref(), Some(second));
    assert_eq!(session.announce_info().as_deref(), Some("Log in to Bank"));
    let asked = std::iter::from_fn(|| events.try_recv().ok())
        .any(|e| matches!(e, Event::ConfirmLogin(_, accounts) if accounts.len() == 1));
    assert!(asked, "confirm_login was called");
    // The scan went out as the message's account.
    let second_id: [u8; 16] = hex::decode(second).unwrap().try_into().unwrap();
    assert!(
        gateway
            .seen()
            .contains(&(Some(second_id), "Scan".to_owned()))
    );
    session.set_account(None).await.unwrap();
    assert_eq!(
        session.history_status(),
        Some(HistoryStatus::LoggedInOneShot)
    );
    let last = phone.sdk.history().unwrap().pop().unwrap();
    assert_eq!(last.account_id.as_ref(), Some(second));
    assert_eq!(last.status, HistoryStatus::LoggedInOneShot);
}

#[tokio::test]
async fn a_withdrawn_login_ends_its_running_session_as_aborted() {
    let gateway = Gateway::start().await;
    let mc = Mc::start().await;
    let phone = phone(&gateway, &mc, 1).await;
    let account = &phone.accounts[0];
    let login = gateway.seal(account, 1, LATER, PushBody::Login { hsid: Bytes(HSID) });
    let PushAction::Login(session) = phone
        .sdk
        .process_push(&login, Arc::new(NoCallbacks))
        .await
        .unwrap()
    else {
        panic!("a login");
    };
    let withdrawn = gateway.seal(account, 2, LATER, PushBody::Withdrawn { hsid: Bytes(HSID) });
    let action = phone
        .sdk
        .process_push(&withdrawn, Arc::new(NoCallbacks))
        .await
        .unwrap();
    let PushAction::SessionEnded {
        session_id,
        logged_out,
    } = action
    else {
        panic!("session ended, got {action:?}");
    };
    assert_eq!(session_id.as_deref(), Some(session.session_id()));
    assert!(!logged_out);
    assert_eq!(
        (session.state(), session.history_status()),
        (State::Done, Some(HistoryStatus::Aborted))
    );
    assert_eq!(
        phone.sdk.history().unwrap().last().unwrap().status,
        HistoryStatus::Aborted
    );
    // A logged_out for an hsid with no running session ends nothing.
    let other = gateway.seal(
        account,
        3,
        LATER,
        PushBody::LoggedOut {
            hsid: Bytes([8; 32]),
        },
    );
    let action = phone
        .sdk
        .process_push(&other, Arc::new(NoCallbacks))
        .await
        .unwrap();
    assert!(matches!(
        action,
        PushAction::SessionEnded {
            session_id: None,
            logged_out: true
        }
    ));
}

#[tokio::test]
async fn account_deleted_is_confirmed_with_the_gateway_before_the_account_is_forgotten() {
    let gateway = Gateway::start().await;
    let mc = Mc::start().await;
    let phone = phone(&gateway, &mc, 2).await;
    let (first, second) = (&phone.accounts[0], &phone.accounts[1]);
    // The gateway still accepts the first account: kept.
    let message = gateway.seal(first, 1, LATER, PushBody::AccountDeleted);
    let action = phone
        .sdk
        .process_push(&message, Arc::new(NoCallbacks))
        .await
        .unwrap();
    assert!(matches!(
        action,
        PushAction::AccountDeleted { account: None }
    ));
    assert_eq!(phone.sdk.accounts().unwrap().len(), 2);
    // The second is deleted at the server: forgotten, the app told.
    let second_id: [u8; 16] = hex::decode(second).unwrap().try_into().unwrap();
    gateway.state.lock().unwrap().deleted.insert(second_id);
    let message = gateway.seal(second, 2, LATER, PushBody::AccountDeleted);
    let (callbacks, mut events) = ChannelCallbacks::new();
    let action = phone.sdk.process_push(&message, callbacks).await.unwrap();
    let PushAction::AccountDeleted {
        account: Some(gone),
    } = action
    else {
        panic!("forgotten, got {action:?}");
    };
    assert_eq!(&gone.account_id, second);
    let told = std::iter::from_fn(|| events.try_recv().ok())
        .any(|e| matches!(e, Event::AccountDeleted(a) if &a.account_id == second));
    assert!(told, "on_account_deleted was called");
    let left: Vec<_> = phone
        .sdk
        .accounts()
        .unwrap()
        .into_iter()
        .map(|a| a.account_id)
        .collect();
    assert_eq!(&left, std::slice::from_ref(first));
}

#[tokio::test]
async fn a_transaction_message_tells_the_pending_transaction() {
    let gateway = Gateway::start().await;
    let mc = Mc::start().await;
    let phone = phone(&gateway, &mc, 1).await;
    let account = &phone.accounts[0];
    let message = gateway.seal(
        account,
        1,
        LATER,
        PushBody::Transaction {
            transaction_id: Bytes(TX_ID),
        },
    );
    let (callbacks, mut events) = ChannelCallbacks::new();
    let action = phone.sdk.process_push(&message, callbacks).await.unwrap();
    let PushAction::Transaction {
        account_id,
        transaction_id,
        pending,
    } = action
    else {
        panic!("a transaction, got {action:?}");
    };
    assert_eq!(
        (&account_id, transaction_id.as_str()),
        (account, hex::encode(TX_ID).as_str())
    );
    assert_eq!(pending.unwrap().announce_info.as_deref(), Some("Payment"));
    let told = std::iter::from_fn(|| events.try_recv().ok()).any(|e| {
        matches!(e, Event::TransactionPending(a, p) if &a.account_id == account && p.transaction_id == hex::encode(TX_ID))
    });
    assert!(told, "on_transaction_pending was called");
    // A transaction no longer pending is answered without a callback.
    let gone = gateway.seal(
        account,
        2,
        LATER,
        PushBody::Transaction {
            transaction_id: Bytes([0x7b; 16]),
        },
    );
    let (callbacks, mut events) = ChannelCallbacks::new();
    let action = phone.sdk.process_push(&gone, callbacks).await.unwrap();
    assert!(matches!(
        action,
        PushAction::Transaction { pending: None, .. }
    ));
    assert!(events.try_recv().is_err());
}

#[tokio::test]
async fn a_replayed_message_is_refused_even_after_a_restart() {
    let gateway = Gateway::start().await;
    let mc = Mc::start().await;
    let phone = phone(&gateway, &mc, 1).await;
    let message = gateway.seal(
        &phone.accounts[0],
        1,
        LATER,
        PushBody::LoggedOut { hsid: Bytes(HSID) },
    );
    phone
        .sdk
        .process_push(&message, Arc::new(NoCallbacks))
        .await
        .unwrap();
    assert_eq!(
        refusal(
            phone
                .sdk
                .process_push(&message, Arc::new(NoCallbacks))
                .await
        ),
        PushRefusal::AlreadyProcessed
    );
    // The cs text form of the same message is the same message.
    assert_eq!(
        refusal(
            phone
                .sdk
                .process_push(&cs(&message), Arc::new(NoCallbacks))
                .await
        ),
        PushRefusal::AlreadyProcessed
    );
    let reopened = open(&phone.storage, &mc);
    assert_eq!(
        refusal(reopened.process_push(&message, Arc::new(NoCallbacks)).await),
        PushRefusal::AlreadyProcessed,
        "remembered across a restart"
    );
}

#[tokio::test]
async fn re_targeted_other_key_other_sender_and_expired_messages_are_refused() {
    let gateway = Gateway::start().await;
    let mc = Mc::start().await;
    let phone = phone(&gateway, &mc, 2).await;
    let (first, second) = (&phone.accounts[0], &phone.accounts[1]);
    let login = || PushBody::Login { hsid: Bytes(HSID) };
    let target = |server: [u8; 16], account: &str| PushTarget {
        server_id: server,
        account_id: hex::decode(account).unwrap().try_into().unwrap(),
    };
    let process = |bytes: Vec<u8>| {
        let sdk = phone.sdk.clone();
        async move { refusal(sdk.process_push(&bytes, Arc::new(NoCallbacks)).await) }
    };
    // Sealed to the first account's key, but for the second account (AAD): refused.
    let retargeted = seal_with(
        &gateway.push_secret,
        &gateway.push_key_of(first),
        &target(SERVER_ID, second),
        1,
        LATER,
        login(),
    );
    assert_eq!(process(retargeted).await, PushRefusal::Undecryptable);
    // For another server.
    let other_server = seal_with(
        &gateway.push_secret,
        &gateway.push_key_of(first),
        &target([2; 16], first),
        2,
        LATER,
        login(),
    );
    assert_eq!(process(other_server).await, PushRefusal::Undecryptable);
    // Sealed by another sender than the account's server.
    let (other_sender, _) = push::generate_push_key([0x52; 32]);
    let forged = seal_with(
        &other_sender,
        &gateway.push_key_of(first),
        &target(SERVER_ID, first),
        3,
        LATER,
        login(),
    );
    assert_eq!(process(forged).await, PushRefusal::Undecryptable);
    // Sealed to a key this device does not hold (another phone's account).
    let (_, stranger) = push::generate_push_key([0x53; 32]);
    let elsewhere = seal_with(
        &gateway.push_secret,
        &stranger,
        &target(SERVER_ID, first),
        4,
        LATER,
        login(),
    );
    assert_eq!(process(elsewhere).await, PushRefusal::UnknownKey);
    // Expired by the device's clock.
    let expired = gateway.seal(first, 5, u64::try_from(NOW_MS).unwrap() - 1, login());
    assert_eq!(process(expired).await, PushRefusal::Expired);
    // Garbage.
    assert_eq!(process(b"AAAA".to_vec()).await, PushRefusal::Malformed);
    assert_eq!(process(vec![0xa6, 0x00]).await, PushRefusal::Malformed);
    // None of them ran, none was recorded: the genuine message with id 1 still runs.
    assert_eq!(
        phone.sdk.history().unwrap().len(),
        2,
        "the two enrolments only"
    );
    let genuine = gateway.seal(first, 1, LATER, PushBody::Withdrawn { hsid: Bytes(HSID) });
    phone
        .sdk
        .process_push(&genuine, Arc::new(NoCallbacks))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_message_pushed_and_pulled_runs_once_and_everything_pulled_is_acknowledged() {
    let gateway = Gateway::start().await;
    let mc = Mc::start().await;
    let phone = phone(&gateway, &mc, 1).await;
    let account = &phone.accounts[0];
    let tx = |id| PushBody::Transaction {
        transaction_id: Bytes(id),
    };
    let pushed = gateway.seal(account, 1, LATER, tx(TX_ID));
    let fresh = gateway.seal(account, 2, LATER, tx(TX_ID));
    let expired = gateway.seal(account, 3, 10, tx(TX_ID));
    for envelope in [&pushed, &fresh, &expired] {
        mc.queue(envelope);
    }
    // Pushed first: runs.
    let (callbacks, mut events) = ChannelCallbacks::new();
    phone
        .sdk
        .process_push(&cs(&pushed), callbacks.clone())
        .await
        .unwrap();
    // Then pulled: the pushed one is a duplicate, the expired one ignored.
    let report = phone.sdk.pull_messages(callbacks.clone()).await.unwrap();
    assert_eq!(
        (report.processed, report.duplicates, report.expired),
        (1, 1, 1)
    );
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.actions.len(), 1);
    let told = std::iter::from_fn(|| events.try_recv().ok())
        .filter(|e| matches!(e, Event::TransactionPending(..)))
        .count();
    assert_eq!(told, 2, "the pushed and the fresh message, once each");
    let acked: HashSet<_> = mc.state.lock().unwrap().acked.iter().copied().collect();
    assert_eq!(acked, HashSet::from([[1; 16], [2; 16], [3; 16]]));
    // Nothing left.
    let again = phone.sdk.pull_messages(callbacks.clone()).await.unwrap();
    assert_eq!(
        (again.processed, again.duplicates, again.expired),
        (0, 0, 0)
    );
    // A wake-up pulls.
    mc.queue(&gateway.seal(account, 4, LATER, tx(TX_ID)));
    let wake = format!(r#"{{"cs_wake":"{}"}}"#, hex::encode([4u8; 16]));
    let action = phone
        .sdk
        .process_push(wake.as_bytes(), callbacks)
        .await
        .unwrap();
    let PushAction::Pulled(report) = action else {
        panic!("a pull, got {action:?}");
    };
    assert_eq!(report.processed, 1);
}

#[tokio::test]
async fn a_pulled_login_starts_its_session_once() {
    let gateway = Gateway::start().await;
    let mc = Mc::start().await;
    let phone = phone(&gateway, &mc, 1).await;
    let login = gateway.seal(
        &phone.accounts[0],
        1,
        LATER,
        PushBody::Login { hsid: Bytes(HSID) },
    );
    mc.queue(&login);
    mc.queue(&login);
    let report = phone
        .sdk
        .pull_messages(Arc::new(NoCallbacks))
        .await
        .unwrap();
    assert_eq!((report.processed, report.duplicates), (1, 1));
    let [PushAction::Login(session)] = report.actions.as_slice() else {
        panic!("one login, got {:?}", report.actions);
    };
    assert_eq!(
        session.state(),
        State::UserInteraction(Interaction::WaitForConfirmation)
    );
    assert_eq!(gateway.count("Scan"), 1);
}
