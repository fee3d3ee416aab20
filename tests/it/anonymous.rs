//! Nobody without credentials writes to the log: every entry point an anonymous client can
//! reach (the API without a key or with a junk one, the device gateway's guest and account
//! channels, the SFS channel) is driven with junk and with fresh keys, and the log's head
//! must not move.

use countersign_eventstore::testing::TestDb;
use countersign_protocol::channel::{Channel, Initiator, SFS_PROLOGUE, StaticKey};
use countersign_protocol::device::{
    Blob, Bytes, ChallengePurpose, ErrorCode, FailReason, Intent, Outcome, RequestBody, Secret,
    Welcome,
};
use countersign_protocol::sfs::{
    self, SfsBody, SfsCode, SfsHello, SfsOutcome, SfsReply, SfsRequest, SfsWelcome,
};
use futures::{SinkExt as _, StreamExt as _};
use reqwest::{Method, StatusCode};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::api::Api;
use crate::device::{RawDevice, code, open_session};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Fresh random bytes (N ≤ 32) for junk.
fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).unwrap();
    bytes
}

fn fresh_key() -> StaticKey {
    loop {
        if let Ok(key) = StaticKey::from_bytes(&random::<32>()) {
            return key;
        }
    }
}

/// A P-256 public key nobody enrolled.
fn fresh_public_key() -> Vec<u8> {
    fresh_key().public_key().unwrap()
}

/// An app instance on the SFS channel, by hand.
struct RawSfsApp {
    ws: Socket,
    channel: Channel,
    next_id: u32,
}

impl RawSfsApp {
    async fn connect(api: &Api, app: [u8; 16]) -> (Self, SfsWelcome) {
        let (_, keys) = api.call(Method::GET, "/v1/sfs/key", None, None).await;
        let public = hex::decode(keys["channel_public_key"].as_str().unwrap()).unwrap();
        let hello = sfs::encode(&SfsHello {
            version: sfs::VERSION,
            app_instance: Bytes(app),
        })
        .unwrap();
        let (initiator, first) =
            Initiator::start_with_prologue(&fresh_key(), &public, SFS_PROLOGUE, &hello).unwrap();
        let url = format!("ws://{}/v1/sfs/channel", api.running.addr);
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        ws.send(Message::Binary(first.into())).await.unwrap();
        let reply = ws.next().await.unwrap().unwrap().into_data();
        let (channel, welcome) = initiator.finish(&reply).unwrap();
        let app = Self {
            ws,
            channel,
            next_id: 1,
        };
        (app, sfs::decode(&welcome).unwrap())
    }

    async fn ask(&mut self, body: SfsBody) -> SfsOutcome {
        let id = self.next_id;
        self.next_id += 1;
        let bytes = sfs::encode(&SfsRequest { id, body }).unwrap();
        for frame in self.channel.seal(&bytes).unwrap() {
            self.ws.send(Message::Binary(frame.into())).await.unwrap();
        }
        let frame = self.ws.next().await.unwrap().unwrap().into_data();
        let reply: SfsReply = sfs::decode(&self.channel.open(&frame).unwrap().unwrap()).unwrap();
        assert_eq!(reply.id, id);
        reply.outcome
    }
}

fn sfs_code(outcome: &SfsOutcome) -> Option<SfsCode> {
    match outcome {
        SfsOutcome::Err(e) => Some(e.code),
        SfsOutcome::Ok(_) => None,
    }
}

/// Sends one frame of junk where a handshake is expected: the server closes.
async fn junk_handshake(url: String) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let junk = [random::<32>(), random(), random()].concat();
    ws.send(Message::Binary(junk.into())).await.unwrap();
    let next = tokio::time::timeout(std::time::Duration::from_secs(20), ws.next())
        .await
        .unwrap();
    assert!(
        matches!(next, None | Some(Err(_)) | Some(Ok(Message::Close(_)))),
        "{next:?}"
    );
}

async fn no_anonymous_request_moves_the_log_head(db: &TestDb) {
    let api = Api::start_with(db, None).await;
    let (server, token) = crate::second_factor::pin_tenant(&api, "ines").await;
    // A live session, so the anonymous client has a real server and a real session around it
    // (its hsid is a capability shown to the user; the junk ones below are not).
    open_session(&api, &server, &token, 1, json!({"ping_time_secs": 0})).await;
    let head = api.head().await;
    assert!(head.is_some());

    // The API: every write without credentials, or with junk ones, is refused.
    let writes = [
        (Method::POST, "/v1/servers".to_owned(), json!({"name": "x"})),
        (
            Method::PATCH,
            format!("/v1/servers/{server}"),
            json!({"name": "x"}),
        ),
        (Method::DELETE, format!("/v1/servers/{server}"), json!({})),
        (
            Method::POST,
            format!("/v1/servers/{server}/api-keys"),
            json!({}),
        ),
        (
            Method::POST,
            format!("/v1/servers/{server}/sfs-keys"),
            json!({"public_key": hex::encode(fresh_public_key()), "label": "x"}),
        ),
        (
            Method::PUT,
            format!("/v1/servers/{server}/users/mallory"),
            json!({"attributes": {"a": "1"}}),
        ),
        (
            Method::DELETE,
            format!("/v1/servers/{server}/users/ines"),
            json!({}),
        ),
        (
            Method::POST,
            format!("/v1/servers/{server}/enrolments"),
            json!({"userid": "ines"}),
        ),
        (
            Method::PUT,
            format!("/v1/servers/{server}/sessions/{}", "ab".repeat(16)),
            json!({}),
        ),
        (
            Method::POST,
            format!("/v1/servers/{server}/transactions"),
            json!({"userid": "ines", "data": "", "text": "pay"}),
        ),
    ];
    for (method, path, body) in &writes {
        for credential in [None, Some("junk"), Some("0123456789abcdef0123456789abcdef")] {
            let (status, answer) = api
                .call(method.clone(), path, credential, Some(body.clone()))
                .await;
            assert!(
                status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN,
                "{method} {path} with {credential:?}: {status} {answer}"
            );
        }
    }

    // The device gateway: a guest with a fresh key, junk for every request.
    let (mut guest, welcome) = RawDevice::connect(&api, &server, &fresh_key(), Intent::Guest).await;
    assert!(matches!(welcome, Welcome::Accepted { .. }));
    let hsid = || Bytes(random::<32>());
    let requests = [
        RequestBody::Enrol {
            token: Secret::new(random()),
            signing_public_key: Blob(fresh_public_key()),
            app_instance: Bytes(random()),
        },
        RequestBody::Scan { hsid: hsid() },
        RequestBody::Confirm { hsid: hsid() },
        RequestBody::LogIn { hsid: hsid() },
        RequestBody::Ping { hsid: hsid() },
        RequestBody::LogOut { hsid: hsid() },
        RequestBody::Abort { hsid: hsid() },
        RequestBody::Fail {
            hsid: hsid(),
            reason: FailReason::NoAccounts,
        },
        RequestBody::DeleteAccount,
        RequestBody::Challenge {
            purpose: ChallengePurpose::Upgrade,
        },
        RequestBody::VerifySecondFactor {
            hsid: hsid(),
            attestation: Blob([random::<32>(), random()].concat()),
        },
        RequestBody::UpgradeAccount {
            attestation: Blob([random::<32>(), random()].concat()),
        },
        RequestBody::GetTransaction {
            transaction_id: Bytes(random()),
        },
        RequestBody::PendingTransactions,
        RequestBody::RejectTransaction {
            transaction_id: Bytes(random()),
        },
        RequestBody::SignTransaction {
            transaction_id: Bytes(random()),
            signature: Blob([random::<32>(), random()].concat()),
            attestation: Blob([random::<32>(), random()].concat()),
        },
        // The secure channel: headless enrolment is off unless the server's admin allows it.
        RequestBody::EnrolHeadless {
            signing_public_key: Blob(fresh_public_key()),
            app_instance: Bytes(random()),
        },
        RequestBody::SendData {
            request_id: Bytes(random()),
            data: countersign_protocol::device::Opaque(random::<32>().to_vec()),
        },
        RequestBody::SetDeviceData {
            model: "m".into(),
            os: "o".into(),
            app_version: "v".into(),
        },
    ];
    for (id, body) in requests.into_iter().enumerate() {
        let what = format!("{body:?}");
        let outcome = guest.request(u32::try_from(id).unwrap() + 1, body).await;
        assert!(
            matches!(outcome, Outcome::Err(_)),
            "{what} answered {outcome:?}"
        );
        assert_ne!(code(&outcome), Some(ErrorCode::Internal), "{what}");
    }
    // An account hello with a fresh key and an unknown account id is refused.
    let stranger = Intent::Account {
        account_id: Bytes(random()),
    };
    let (_, welcome) = RawDevice::connect(&api, &server, &fresh_key(), stranger).await;
    assert!(matches!(welcome, Welcome::Refused { .. }), "{welcome:?}");
    // Junk where a handshake belongs, on both channels.
    junk_handshake(format!(
        "ws://{}/v1/device/servers/{server}/channel",
        api.running.addr
    ))
    .await;
    junk_handshake(format!("ws://{}/v1/sfs/channel", api.running.addr)).await;

    // The SFS: fresh app instances say hello and try everything; nobody enrolled them.
    for _ in 0..3 {
        let (mut app, welcome) = RawSfsApp::connect(&api, random()).await;
        assert!(matches!(
            welcome,
            SfsWelcome::Accepted {
                pin_registered: false,
                ..
            }
        ));
        let start = SfsBody::RegisterPinStart {
            request: Blob(random::<32>().to_vec()),
        };
        assert_eq!(sfs_code(&app.ask(start).await), Some(SfsCode::NotAllowed));
        let finish = SfsBody::RegisterPinFinish {
            upload: Blob([random::<32>(); 6].concat()),
        };
        assert_eq!(sfs_code(&app.ask(finish).await), Some(SfsCode::NotAllowed));
        let login = SfsBody::LoginStart {
            request: Blob([random::<32>(), random(), random()].concat()),
        };
        assert_eq!(
            sfs_code(&app.ask(login).await),
            Some(SfsCode::NotRegistered)
        );
    }
    // The SDK of a phone nobody enrolled asks its status (a hello).
    let phone = crate::second_factor::phone(&api).await;
    let status = phone.second_factor_status().await.unwrap();
    assert!(!status.pin_registered);

    assert_eq!(
        api.head().await,
        head,
        "an anonymous client wrote to the log"
    );
    api.stop().await;
}

countersign_eventstore::on_both_backends!(no_anonymous_request_moves_the_log_head);
