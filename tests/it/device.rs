//! Devices over real sockets: `countersign serve` on a loopback port (business API and device
//! gateway in one process), the mobile SDK as the phone, the business system as an HTTP
//! client. Enrolment, QR and deep-link login, continuous sessions, logout from either side,
//! account deletion from either side, NOACCOUNTS, one phone with accounts at two servers;
//! and the raw channel refusing what it must.

use std::sync::Arc;
use std::time::Duration;

use countersign_eventstore::testing::TestDb;
use countersign_mobile_sdk::{
    ChannelCallbacks, HistoryStatus, Interaction, MemoryStorage, NoCallbacks, Sdk, SdkConfig,
    SdkError, SessionKind, State,
};
use countersign_protocol::channel::{Channel, Initiator, StaticKey};
use countersign_protocol::device::{
    self, Bytes, ErrorCode, Hello, Intent, Outcome, Refusal, Request, RequestBody, ServerMessage,
    VERSION, Welcome,
};
use futures::{SinkExt as _, StreamExt as _};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::api::{Api, next_state};

const WAIT: Duration = Duration::from_secs(10);

pub(crate) fn nonce(byte: u8) -> String {
    hex::encode([byte; 16])
}

fn sdk() -> Sdk {
    Sdk::open(Arc::new(MemoryStorage::new()), SdkConfig::default()).unwrap()
}

/// A server whose logins need no second factor, one API key, and `userid` with attributes.
pub(crate) async fn tenant(api: &Api, name: &str, userid: &str) -> (String, String) {
    let (server, token) = api.tenant(name).await;
    let (status, body) = api
        .admin(
            Method::PATCH,
            &format!("/v1/servers/{server}"),
            Some(json!({"second_factor": "none"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = api
        .call(
            Method::PUT,
            &format!("/v1/servers/{server}/users/{userid}"),
            Some(&token),
            Some(json!({"attributes": {"name": format!("{userid} at {name}")}})),
        )
        .await;
    assert!(status.is_success(), "{body}");
    (server, token)
}

/// Starts an enrolment and answers its QR payload as base64url text.
pub(crate) async fn enrolment_qr(api: &Api, server: &str, token: &str, userid: &str) -> String {
    let (status, body) = api
        .call(
            Method::POST,
            &format!("/v1/servers/{server}/enrolments"),
            Some(token),
            Some(json!({"userid": userid})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["qr"]["base64url"].as_str().unwrap().to_owned()
}

/// Enrols the SDK through a QR code; answers the new account id.
pub(crate) async fn enrol(sdk: &Sdk, qr: &str) -> String {
    let (callbacks, _events) = ChannelCallbacks::new();
    let session = sdk.start_session(qr.as_bytes(), callbacks).await.unwrap();
    assert!(session.is_enrolment());
    assert_eq!(
        session.state(),
        State::UserInteraction(Interaction::WaitForConfirmation)
    );
    session.confirm_enrol().await.unwrap();
    let done = tokio::time::timeout(WAIT, session.wait_for(|s| s.state == State::Done))
        .await
        .unwrap();
    assert_eq!(done.history_status, Some(HistoryStatus::Enrolled));
    done.account_id.unwrap()
}

/// Logs the phone in with `account` by a continuous session's link; answers it once ACTIVE.
async fn log_in(phone: &Sdk, link: &str, account: &str) -> countersign_mobile_sdk::SessionHandle {
    let login = phone
        .start_session(link.as_bytes(), Arc::new(NoCallbacks))
        .await
        .unwrap();
    login.set_account(Some(account)).await.unwrap();
    tokio::time::timeout(WAIT, login.wait_for(|s| s.state == State::Active))
        .await
        .unwrap();
    login
}

/// Opens a login session; answers its deep link.
pub(crate) async fn open_session(
    api: &Api,
    server: &str,
    token: &str,
    n: u8,
    body: Value,
) -> String {
    let (status, opened) = session_call(
        api,
        Method::PUT,
        &format!("/v1/servers/{server}/session"),
        token,
        n,
        Some(body),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{opened}");
    opened["qr"]["deep_link"].as_str().unwrap().to_owned()
}

pub(crate) async fn session_view(api: &Api, server: &str, token: &str, n: u8) -> Value {
    let head = api.head().await.unwrap();
    let (status, view) = session_call(
        api,
        Method::GET,
        &format!("/v1/servers/{server}/session?min_position={head}"),
        token,
        n,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    view
}

/// A call on the session of `nonce(n)`, its nonce in `X-Nonce` as integrators send it.
async fn session_call(
    api: &Api,
    method: Method,
    path: &str,
    token: &str,
    n: u8,
    body: Option<Value>,
) -> (StatusCode, Value) {
    crate::api::session_call_at(&api.http, &api.base, method, path, token, &nonce(n), body).await
}

async fn device_enrols_logs_in_and_the_api_logs_out(db: &TestDb) {
    let api = Api::start_with(db, None).await;
    let (server, token) = tenant(&api, "Bank", "alice").await;
    let phone = sdk();
    let account = enrol(&phone, &enrolment_qr(&api, &server, &token, "alice").await).await;
    let accounts = phone.accounts().unwrap();
    assert_eq!(accounts.len(), 1);
    assert_eq!(accounts[0].userid, "alice");
    assert_eq!(accounts[0].server_name, "Bank");
    let head = api.head().await.unwrap();
    let (status, listed) = api
        .read(
            &format!("/v1/servers/{server}/users/alice/accounts"),
            Some(&token),
            head,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        listed["accounts"][0]["account_id"],
        account.as_str(),
        "{listed}"
    );

    let link = open_session(
        &api,
        &server,
        &token,
        1,
        json!({"ping_time_secs": 30, "announce_info": "Log in to the bank", "session_info": "Welcome"}),
    )
    .await;
    let (callbacks, _events) = ChannelCallbacks::new();
    let login = phone
        .start_session(link.as_bytes(), callbacks)
        .await
        .unwrap();
    assert_eq!(
        login.state(),
        State::UserInteraction(Interaction::WaitForConfirmation)
    );
    assert_eq!(login.announce_info().as_deref(), Some("Log in to the bank"));
    assert_eq!(
        session_view(&api, &server, &token, 1).await["state"],
        "scanned"
    );
    login.set_account(Some(&account)).await.unwrap();
    let active = tokio::time::timeout(WAIT, login.wait_for(|s| s.state == State::Active))
        .await
        .unwrap();
    assert_eq!(active.history_status, Some(HistoryStatus::LoggedIn));
    assert_eq!(active.session_info.as_deref(), Some("Welcome"));

    let view = session_view(&api, &server, &token, 1).await;
    assert_eq!(view["state"], "logged_in", "{view}");
    assert_eq!(view["userid"], "alice");
    assert_eq!(view["account_id"], account.as_str());
    assert_eq!(view["attributes"]["name"], "alice at Bank");

    // The business system logs the user out: the phone hears it at once.
    let (status, _) = session_call(
        &api,
        Method::DELETE,
        &format!("/v1/servers/{server}/session"),
        &token,
        1,
        None,
    )
    .await;
    assert!(status.is_success());
    let done = tokio::time::timeout(WAIT, login.wait_for(|s| s.state == State::Done))
        .await
        .expect("the logout reaches the device");
    assert_eq!(done.history_status, Some(HistoryStatus::LoggedOut));
    let history = phone.history().unwrap();
    assert!(
        history
            .iter()
            .any(|h| h.status == HistoryStatus::LoggedOut && h.kind == SessionKind::Login),
        "{history:?}"
    );
    api.stop().await;
}

async fn device_logout_reaches_the_business_sse(db: &TestDb) {
    let api = Api::start_with(db, None).await;
    let (server, token) = tenant(&api, "Bank", "bob").await;
    let phone = sdk();
    let account = enrol(&phone, &enrolment_qr(&api, &server, &token, "bob").await).await;
    let link = open_session(&api, &server, &token, 2, json!({"ping_time_secs": 60})).await;
    let head = api.head().await.unwrap();
    let events = api
        .http
        .get(api.url(&format!(
            "/v1/servers/{server}/session/events?min_position={head}"
        )))
        .header("X-Nonce", nonce(2))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let mut stream = events.bytes_stream();
    let mut buffer = String::new();
    assert_eq!(
        next_state(&mut stream, &mut buffer).await["state"],
        "pending"
    );

    let login = log_in(&phone, &link, &account).await;
    let mut states = Vec::new();
    loop {
        let state = next_state(&mut stream, &mut buffer).await;
        states.push(state["state"].as_str().unwrap().to_owned());
        if state["state"] == "logged_in" {
            break;
        }
    }
    assert_eq!(
        states.first().map(String::as_str),
        Some("scanned"),
        "{states:?}"
    );

    login.stop_session().await.unwrap();
    assert_eq!(login.history_status(), Some(HistoryStatus::LoggedOut));
    assert_eq!(
        next_state(&mut stream, &mut buffer).await["state"],
        "logged_out"
    );
    api.stop().await;
}

async fn a_continuous_session_without_pings_logs_out(db: &TestDb) {
    let api = Api::start_with(db, None).await;
    let (server, token) = tenant(&api, "Bank", "carol").await;
    let phone = sdk();
    let account = enrol(&phone, &enrolment_qr(&api, &server, &token, "carol").await).await;
    let link = open_session(&api, &server, &token, 3, json!({"ping_time_secs": 30})).await;
    let login = log_in(&phone, &link, &account).await;
    assert_eq!(
        session_view(&api, &server, &token, 3).await["state"],
        "logged_in"
    );
    // The device pings every 15 s of real time; the server's clock jumps past the deadline
    // before any ping arrives, as if the phone had gone silent.
    api.clock.advance_secs(31);
    let done = tokio::time::timeout(WAIT, login.wait_for(|s| s.state == State::Done))
        .await
        .expect("the missed ping reaches the device");
    assert_eq!(done.history_status, Some(HistoryStatus::LoggedOut));
    let view = session_view(&api, &server, &token, 3).await;
    assert_eq!(view["state"], "logged_out", "{view}");
    api.stop().await;
}

async fn account_deletion_from_either_side(db: &TestDb) {
    let api = Api::start_with(db, None).await;
    let (server, token) = tenant(&api, "Bank", "dave").await;
    let phone = sdk();
    let first = enrol(&phone, &enrolment_qr(&api, &server, &token, "dave").await).await;
    let second = enrol(&phone, &enrolment_qr(&api, &server, &token, "dave").await).await;
    assert_eq!(phone.accounts().unwrap().len(), 2);

    // The server deletes the first: the listening phone is told and forgets it.
    let listener = phone.listen(&first, Arc::new(NoCallbacks)).await.unwrap();
    let (status, _) = api
        .call(
            Method::DELETE,
            &format!("/v1/servers/{server}/users/dave/accounts/{first}"),
            Some(&token),
            None,
        )
        .await;
    assert!(status.is_success());
    let ended = tokio::time::timeout(WAIT, listener.ended()).await.unwrap();
    assert!(
        matches!(&ended, countersign_mobile_sdk::ListenEnd::AccountDeleted(a) if a.account_id == first),
        "{ended:?}"
    );
    let left: Vec<String> = phone
        .accounts()
        .unwrap()
        .into_iter()
        .map(|a| a.account_id)
        .collect();
    assert_eq!(left, vec![second.clone()]);

    // The phone deletes the second: the server records it.
    phone.delete_account(&second).await.unwrap();
    assert!(phone.accounts().unwrap().is_empty());
    let head = api.head().await.unwrap();
    let (status, listed) = api
        .read(
            &format!("/v1/servers/{server}/users/dave/accounts"),
            Some(&token),
            head,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["accounts"], json!([]), "{listed}");
    let events = api.running.state.store().read_all(0, 10_000).await.unwrap();
    let deleted: Vec<_> = events
        .iter()
        .filter(|e| e.event_type == "account.deleted")
        .map(|e| e.stream.clone())
        .collect();
    assert_eq!(deleted.len(), 2, "one deletion from each side");
    api.stop().await;
}

async fn no_accounts_and_two_servers(db: &TestDb) {
    let api = Api::start_with(db, None).await;
    let (bank, bank_token) = tenant(&api, "Bank", "erin").await;
    let (clinic, clinic_token) = tenant(&api, "Clinic", "erin").await;

    // A phone with no account for the bank: NOACCOUNTS, and the business system sees it.
    let phone = sdk();
    let link = open_session(&api, &bank, &bank_token, 4, json!({})).await;
    let refused = phone
        .start_session(link.as_bytes(), Arc::new(NoCallbacks))
        .await;
    assert!(matches!(refused, Err(SdkError::NoAccounts)), "{refused:?}");
    let view = session_view(&api, &bank, &bank_token, 4).await;
    assert_eq!(view["state"], "failed", "{view}");

    // One phone, accounts at both servers; each login offers only that server's account.
    let at_bank = enrol(
        &phone,
        &enrolment_qr(&api, &bank, &bank_token, "erin").await,
    )
    .await;
    let at_clinic = enrol(
        &phone,
        &enrolment_qr(&api, &clinic, &clinic_token, "erin").await,
    )
    .await;
    let servers: std::collections::BTreeSet<String> = phone
        .accounts()
        .unwrap()
        .into_iter()
        .map(|a| a.server_id)
        .collect();
    assert_eq!(servers.len(), 2);
    for (server, token, account, n) in [
        (&bank, &bank_token, &at_bank, 5),
        (&clinic, &clinic_token, &at_clinic, 6),
    ] {
        let link = open_session(&api, server, token, n, json!({"ping_time_secs": 0})).await;
        let login = phone
            .start_session(link.as_bytes(), Arc::new(NoCallbacks))
            .await
            .unwrap();
        let eligible: Vec<String> = login
            .eligible_accounts()
            .unwrap()
            .into_iter()
            .map(|a| a.account_id)
            .collect();
        assert_eq!(eligible, std::slice::from_ref(account));
        login.set_account(Some(account)).await.unwrap();
        let done = tokio::time::timeout(WAIT, login.wait_for(|s| s.state == State::Done))
            .await
            .unwrap();
        assert_eq!(done.history_status, Some(HistoryStatus::LoggedInOneShot));
        let view = session_view(&api, server, token, n).await;
        assert_eq!(view["state"], "logged_in");
        assert_eq!(view["account_id"], account.as_str());
    }
    api.stop().await;
}

/// A device speaking the protocol by hand, to send what the SDK never would.
pub(crate) struct RawDevice {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    channel: Channel,
}

impl RawDevice {
    pub(crate) async fn connect(
        api: &Api,
        server: &str,
        key: &StaticKey,
        intent: Intent,
    ) -> (Self, Welcome) {
        let (mut ws, first) = Self::open(api, server, key, intent).await;
        let reply = ws.next().await.unwrap().unwrap().into_data();
        let (channel, welcome) = first.finish(&reply).unwrap();
        (Self { ws, channel }, device::decode(&welcome).unwrap())
    }

    async fn open(
        api: &Api,
        server: &str,
        key: &StaticKey,
        intent: Intent,
    ) -> (
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        Initiator,
    ) {
        let (_, body) = api
            .call(
                Method::GET,
                &format!("/v1/device/servers/{server}"),
                None,
                None,
            )
            .await;
        let public_key = hex::decode(body["public_key"].as_str().unwrap()).unwrap();
        let id: [u8; 16] = hex::decode(server).unwrap().try_into().unwrap();
        let hello = device::encode(&Hello {
            version: VERSION,
            intent,
        })
        .unwrap();
        let (initiator, frame) = Initiator::start(key, &public_key, &id, &hello).unwrap();
        let url = format!(
            "ws://{}/v1/device/servers/{server}/channel",
            api.running.addr
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        ws.send(Message::Binary(frame.into())).await.unwrap();
        (ws, initiator)
    }

    async fn send_raw(&mut self, message: &[u8]) {
        for frame in self.channel.seal(message).unwrap() {
            self.ws.send(Message::Binary(frame.into())).await.unwrap();
        }
    }

    async fn reply(&mut self) -> (u32, Outcome) {
        loop {
            let frame = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap()
                .into_data();
            if let Some(message) = self.channel.open(&frame).unwrap()
                && let ServerMessage::Reply { id, outcome } = device::decode(&message).unwrap()
            {
                return (id, outcome);
            }
        }
    }

    pub(crate) async fn request(&mut self, id: u32, body: RequestBody) -> Outcome {
        self.send_raw(&device::encode(&Request { id, body }).unwrap())
            .await;
        let (got, outcome) = self.reply().await;
        assert_eq!(got, id);
        outcome
    }

    /// True once the server closed the connection.
    pub(crate) async fn closed(&mut self) -> bool {
        matches!(
            tokio::time::timeout(WAIT, self.ws.next()).await.unwrap(),
            None | Some(Err(_)) | Some(Ok(Message::Close(_)))
        )
    }
}

pub(crate) fn code(outcome: &Outcome) -> Option<ErrorCode> {
    match outcome {
        Outcome::Err(e) => Some(e.code),
        Outcome::Ok(_) => None,
    }
}

async fn the_channel_refuses_what_it_must(db: &TestDb) {
    let api = Api::start_with(db, None).await;
    let (server, token) = tenant(&api, "Bank", "frank").await;
    let phone = sdk();
    let account = enrol(&phone, &enrolment_qr(&api, &server, &token, "frank").await).await;
    let account_id = Bytes(hex::decode(&account).unwrap().try_into().unwrap());
    let head = api.head().await;

    // Unknown servers: 404 before any upgrade.
    let unknown = "00".repeat(16);
    let (status, body) = api
        .call(
            Method::GET,
            &format!("/v1/device/servers/{unknown}"),
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["status"], 404);

    // Another key claiming the account: refused, then closed, exactly as an account id that
    // does not exist is (item 9 of issue 19: the answer must not tell whether it exists).
    let stranger = StaticKey::from_bytes(&[7; 32]).unwrap();
    let (mut raw, claimed) =
        RawDevice::connect(&api, &server, &stranger, Intent::Account { account_id }).await;
    assert_eq!(
        claimed,
        Welcome::Refused {
            reason: Refusal::UnknownAccount
        }
    );
    assert!(raw.closed().await);
    let (mut raw, welcome) = RawDevice::connect(
        &api,
        &server,
        &stranger,
        Intent::Account {
            account_id: Bytes([9; 16]),
        },
    )
    .await;
    assert_eq!(
        welcome,
        Welcome::Refused {
            reason: Refusal::UnknownAccount
        }
    );
    assert_eq!(
        device::encode(&claimed).unwrap(),
        device::encode(&welcome).unwrap(),
        "the same bytes for an existing account claimed with another key and for no account"
    );
    assert!(raw.closed().await);

    // A guest may not log in, confirm, ping or delete; a bad request is answered and the
    // channel stays usable; an enrolment token that does not exist is not found.
    let (mut guest, welcome) = RawDevice::connect(&api, &server, &stranger, Intent::Guest).await;
    assert!(matches!(welcome, Welcome::Accepted { .. }));
    let hsid = Bytes([1; 32]);
    for body in [
        RequestBody::LogIn { hsid },
        RequestBody::Confirm { hsid },
        RequestBody::Ping { hsid },
        RequestBody::DeleteAccount,
    ] {
        assert_eq!(
            code(&guest.request(1, body).await),
            Some(ErrorCode::NotAllowed)
        );
    }
    assert_eq!(
        code(&guest.request(2, RequestBody::Scan { hsid }).await),
        Some(ErrorCode::NotFound)
    );
    guest.send_raw(b"\xa1\x62id\x18").await;
    let (id, outcome) = guest.reply().await;
    assert_eq!((id, code(&outcome)), (0, Some(ErrorCode::Invalid)));
    let enrol = RequestBody::Enrol {
        token: device::Secret::new([3; 32]),
        signing_public_key: device::Blob(
            StaticKey::from_bytes(&[8; 32])
                .unwrap()
                .public_key()
                .unwrap(),
        ),
        app_instance: Bytes([4; 16]),
    };
    assert_eq!(
        code(&guest.request(3, enrol).await),
        Some(ErrorCode::NotFound)
    );
    let bad_key = RequestBody::Enrol {
        token: device::Secret::new([3; 32]),
        signing_public_key: device::Blob(vec![4; 65]),
        app_instance: Bytes([4; 16]),
    };
    assert_eq!(
        code(&guest.request(4, bad_key).await),
        Some(ErrorCode::Invalid)
    );

    // A text message, or a frame that does not decrypt, closes the connection.
    guest.ws.send(Message::Text("hello".into())).await.unwrap();
    assert!(guest.closed().await);
    let (mut tampered, _) = RawDevice::connect(&api, &server, &stranger, Intent::Guest).await;
    tampered
        .ws
        .send(Message::Binary(vec![0u8; 40].into()))
        .await
        .unwrap();
    assert!(tampered.closed().await);

    // A first frame that is not a handshake for this server: closed without an answer.
    let url = format!(
        "ws://{}/v1/device/servers/{server}/channel",
        api.running.addr
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::Binary(vec![4u8; 120].into()))
        .await
        .unwrap();
    assert!(matches!(
        tokio::time::timeout(WAIT, ws.next()).await.unwrap(),
        None | Some(Err(_)) | Some(Ok(Message::Close(_)))
    ));

    // A version the gateway does not speak.
    let (mut ws, initiator) = RawDevice::open(&api, &server, &stranger, Intent::Guest).await;
    drop((ws.close(None).await, initiator));
    let hello = device::encode(&Hello {
        version: VERSION + 1,
        intent: Intent::Guest,
    })
    .unwrap();
    let (_, body) = api
        .call(
            Method::GET,
            &format!("/v1/device/servers/{server}"),
            None,
            None,
        )
        .await;
    let public_key = hex::decode(body["public_key"].as_str().unwrap()).unwrap();
    let id: [u8; 16] = hex::decode(&server).unwrap().try_into().unwrap();
    let (initiator, frame) = Initiator::start(&stranger, &public_key, &id, &hello).unwrap();
    let url = format!(
        "ws://{}/v1/device/servers/{server}/channel",
        api.running.addr
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::Binary(frame.into())).await.unwrap();
    let reply = ws.next().await.unwrap().unwrap().into_data();
    let (_, welcome) = initiator.finish(&reply).unwrap();
    assert_eq!(
        device::decode::<Welcome>(&welcome).unwrap(),
        Welcome::Refused {
            reason: Refusal::UnsupportedVersion
        }
    );

    assert_eq!(api.head().await, head, "refused input wrote nothing");
    api.stop().await;
}

/// Item 9 of issue 19: a deleted account is told as deleted only to its own channel key; any
/// other key claiming its id hears exactly what an id that never existed hears.
async fn a_deleted_account_is_told_only_to_its_own_key(db: &TestDb) {
    let api = Api::start_with(db, None).await;
    let (server, token) = tenant(&api, "Bank", "gina").await;
    let phone = sdk();
    let account = enrol(&phone, &enrolment_qr(&api, &server, &token, "gina").await).await;
    let account_id = Bytes(hex::decode(&account).unwrap().try_into().unwrap());
    // Deleted by the business system while the phone is not connected (once its read model
    // lists the account).
    let accounts = format!("/v1/servers/{server}/users/gina/accounts");
    let (_, listed) = api
        .read(&accounts, Some(&token), api.head().await.unwrap())
        .await;
    assert_eq!(
        listed["accounts"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    let (status, _) = api
        .call(
            Method::DELETE,
            &format!("{accounts}/{account}"),
            Some(&token),
            None,
        )
        .await;
    assert!(status.is_success(), "{status}");
    let head = api.head().await;

    let stranger = StaticKey::from_bytes(&[7; 32]).unwrap();
    let mut welcomes = Vec::new();
    for claimed in [account_id, Bytes([9; 16])] {
        let (mut raw, welcome) = RawDevice::connect(
            &api,
            &server,
            &stranger,
            Intent::Account {
                account_id: claimed,
            },
        )
        .await;
        assert!(raw.closed().await);
        welcomes.push(device::encode(&welcome).unwrap());
    }
    assert_eq!(
        welcomes[0],
        device::encode(&Welcome::Refused {
            reason: Refusal::UnknownAccount
        })
        .unwrap(),
        "a stranger claiming a deleted account's id"
    );
    assert_eq!(
        welcomes[0], welcomes[1],
        "the same bytes for a deleted account claimed with another key and for no account"
    );
    assert_eq!(api.head().await, head, "refused handshakes wrote nothing");

    // The phone that held it still hears `account_deleted` at its next handshake, and forgets
    // it (an `unknown_account` would leave it in `failed`, kept).
    let report = phone.refresh(&NoCallbacks).await.unwrap();
    let forgotten: Vec<_> = report
        .forgotten
        .iter()
        .map(|a| a.account_id.clone())
        .collect();
    assert_eq!(forgotten, vec![account], "{report:?}");
    assert!(report.failed.is_empty(), "{report:?}");
    assert!(phone.accounts().unwrap().is_empty());
    api.stop().await;
}

/// A TCP relay that records every byte both ways, standing where a network observer would.
async fn recording_relay(
    listener: tokio::net::TcpListener,
    target: std::net::SocketAddr,
    record: Arc<std::sync::Mutex<Vec<u8>>>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            return;
        };
        let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
            return;
        };
        let (mut in_read, mut in_write) = inbound.into_split();
        let (mut out_read, mut out_write) = outbound.into_split();
        let up = record.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n @ 1..) = in_read.read(&mut buf).await {
                up.lock().unwrap().extend_from_slice(&buf[..n]);
                if out_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let down = record.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n @ 1..) = out_read.read(&mut buf).await {
                down.lock().unwrap().extend_from_slice(&buf[..n]);
                if in_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Every form a secret could take on the wire: raw, hex (both cases), base64 (all alphabets).
fn encodings(bytes: &[u8]) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    let engines = [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::STANDARD_NO_PAD,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    let mut forms = vec![
        bytes.to_vec(),
        hex::encode(bytes).into_bytes(),
        hex::encode_upper(bytes).into_bytes(),
    ];
    forms.extend(engines.iter().map(|e| e.encode(bytes).into_bytes()));
    forms
}

async fn frames_carry_nothing_readable(db: &TestDb) {
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway = format!("ws://{}/v1/device", relay.local_addr().unwrap());
    let api = Api::start_with(db, Some(&gateway)).await;
    let record = Arc::new(std::sync::Mutex::new(Vec::new()));
    tokio::spawn(recording_relay(relay, api.running.addr, record.clone()));

    let userid = "zed.userid.secret";
    let (server, token) = tenant(&api, "Bank", userid).await;
    let enrolment = enrolment_qr(&api, &server, &token, userid).await;
    let phone = sdk();
    let account = enrol(&phone, &enrolment).await;
    let link = open_session(
        &api,
        &server,
        &token,
        7,
        json!({"ping_time_secs": 60, "announce_info": "Pay the rent"}),
    )
    .await;
    let hsid = countersign_protocol::qr::QrPayload::from_deep_link(&link)
        .unwrap()
        .token;
    let login = log_in(&phone, &link, &account).await;
    let view = session_view(&api, &server, &token, 7).await;
    assert_eq!(view["userid"], userid);
    login.stop_session().await.unwrap();

    let recorded = record.lock().unwrap().clone();
    let text = String::from_utf8_lossy(&recorded);
    assert!(
        text.contains("101 Switching Protocols"),
        "the relay saw the WebSocket"
    );
    assert!(recorded.len() > 2_000, "the relay saw the conversation");
    let token_bytes = countersign_protocol::qr::QrPayload::from_base64url(&enrolment)
        .unwrap()
        .token;
    let secrets: Vec<(&str, Vec<u8>)> = vec![
        ("userid", userid.as_bytes().to_vec()),
        ("attribute", format!("{userid} at Bank").into_bytes()),
        ("announce info", b"Pay the rent".to_vec()),
        ("hsid", hsid.to_vec()),
        ("account id", hex::decode(&account).unwrap()),
        ("enrolment token", token_bytes.to_vec()),
    ];
    for (what, secret) in &secrets {
        for form in encodings(secret) {
            assert!(
                !recorded.windows(form.len()).any(|w| w == form.as_slice()),
                "the {what} crossed the wire readable ({})",
                String::from_utf8_lossy(&form)
            );
        }
    }
    api.stop().await;
}

async fn replayed_truncated_and_oversized_frames_fail(db: &TestDb) {
    let api = Api::start_with(db, None).await;
    let (server, token) = tenant(&api, "Bank", "gina").await;
    let link = open_session(&api, &server, &token, 8, json!({})).await;
    let hsid = Bytes(
        countersign_protocol::qr::QrPayload::from_deep_link(&link)
            .unwrap()
            .token,
    );
    let key = StaticKey::from_bytes(&[5; 32]).unwrap();

    // Record a guest's handshake and one request as they went over the wire.
    let (mut ws, initiator) = RawDevice::open(&api, &server, &key, Intent::Guest).await;
    let reply = ws.next().await.unwrap().unwrap().into_data();
    let (mut channel, _) = initiator.finish(&reply).unwrap();
    let scan = device::encode(&Request {
        id: 1,
        body: RequestBody::Scan { hsid },
    })
    .unwrap();
    let recorded_request = channel.seal(&scan).unwrap().remove(0);
    drop(ws);
    let head = api.head().await;

    // Replayed on a new connection: the server answers the handshake with new keys, so the
    // recorded request does not decrypt and the connection closes; nothing is written.
    let (mut ws, _) = RawDevice::open(&api, &server, &key, Intent::Guest).await;
    let _answer = ws.next().await.unwrap().unwrap();
    ws.send(Message::Binary(recorded_request.clone().into()))
        .await
        .unwrap();
    assert!(matches!(
        tokio::time::timeout(WAIT, ws.next()).await.unwrap(),
        None | Some(Err(_)) | Some(Ok(Message::Close(_)))
    ));
    assert_eq!(api.head().await, head, "a replay changes nothing");

    // Truncated: half a frame does not authenticate.
    let (mut raw, _) = RawDevice::connect(&api, &server, &key, Intent::Guest).await;
    let frame = raw.channel.seal(&scan).unwrap().remove(0);
    raw.ws
        .send(Message::Binary(frame[..frame.len() / 2].to_vec().into()))
        .await
        .unwrap();
    assert!(raw.closed().await);
    // Oversized: a WebSocket message longer than a Noise message is refused by the socket.
    let (mut raw, _) = RawDevice::connect(&api, &server, &key, Intent::Guest).await;
    raw.ws
        .send(Message::Binary(vec![1u8; 70_000].into()))
        .await
        .unwrap();
    assert!(raw.closed().await);
    assert_eq!(api.head().await, head, "refused frames change nothing");

    // A QR code whose pinned key is not the server's: the SDK refuses to talk.
    let mut forged = countersign_protocol::qr::QrPayload::from_base64url(
        &enrolment_qr(&api, &server, &token, "gina").await,
    )
    .unwrap();
    forged.server_key_fingerprint[0] ^= 1;
    let phone = sdk();
    let refused = phone
        .start_session(forged.to_base64url().as_bytes(), Arc::new(NoCallbacks))
        .await;
    assert!(
        matches!(refused, Err(SdkError::FingerprintMismatch)),
        "{refused:?}"
    );
    assert!(phone.accounts().unwrap().is_empty());
    api.stop().await;
}

async fn snapshots_of_device_event_streams(db: &TestDb) {
    let api = Api::start_with(db, None).await;
    let (server, token) = tenant(&api, "Bank", "hana").await;
    let start = api.head().await.unwrap() + 1;
    let phone = sdk();
    let account = enrol(&phone, &enrolment_qr(&api, &server, &token, "hana").await).await;
    let link = open_session(&api, &server, &token, 9, json!({"ping_time_secs": 60})).await;
    let login = log_in(&phone, &link, &account).await;
    login.stop_session().await.unwrap();
    let events = api
        .running
        .state
        .store()
        .read_all(start, 100)
        .await
        .unwrap();
    let events: Vec<Value> = events
        .iter()
        .map(|e| {
            let mut payload = crate::api::payload_json(e);
            for key in [
                "app_instance",
                "channel_public_key",
                "signing_public_key",
                "signing_key_thumbprint",
            ] {
                if let Some(v) = payload.get_mut(key) {
                    *v = Value::String(format!("[{key}]"));
                }
            }
            json!({
                "type": e.event_type,
                "stream": e.stream.split('-').next(),
                "actor": e.metadata.actor.as_deref().map(|a| a.split(':').next()),
                "payload": payload,
            })
        })
        .collect();
    let mut events = Value::Array(events);
    crate::api::redact(&mut events);
    insta::assert_json_snapshot!("device_enrol_login_logout_events", events);
    api.stop().await;
}

countersign_eventstore::on_both_backends!(
    frames_carry_nothing_readable,
    replayed_truncated_and_oversized_frames_fail,
    snapshots_of_device_event_streams,
    device_enrols_logs_in_and_the_api_logs_out,
    device_logout_reaches_the_business_sse,
    a_continuous_session_without_pings_logs_out,
    account_deletion_from_either_side,
    no_accounts_and_two_servers,
    the_channel_refuses_what_it_must,
    a_deleted_account_is_told_only_to_its_own_key,
);
