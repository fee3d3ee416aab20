//! The secure channel end to end over real sockets: `countersign serve` (business API and
//! device gateway in one process) on a loopback port, the mobile SDK as the phone, and
//! `tests/ds/ds_verify.py` as the Data Service — an independent verifier of the NS's RFC 9421
//! signature in Python (`cryptography`), written from docs/data-service.md, not from our code.
//!
//! Shown: a fresh phone's first `send_data` enrols a headless account (one event), the DS
//! gets the data with that account's id and verifies it, later messages write nothing; a DS
//! that fails, hangs or is not there is a typed error for the app and leaves nothing behind;
//! refused, each writing nothing: another account's id claimed with a key of one's own,
//! oversize data, no DS configured, headless enrolment forbidden by the server's policy;
//! device data become an event shown in the account read; no app data in any event, table or
//! log line.
//!
//! The Python DS checks `created` against its wall clock, so the server's manual clock is
//! moved to the wall clock first. The tests skip, saying so, without python3 + cryptography.

use std::sync::Arc;
use std::time::Duration;

use countersign_eventstore::testing::TestDb;
use countersign_mobile_sdk::{DataServer, MemoryStorage, Sdk, SdkConfig, SdkError};
use countersign_protocol::channel::StaticKey;
use countersign_protocol::device::{
    Answer, Blob, Bytes, ErrorCode, Intent, MAX_APP_DATA_BYTES, Opaque, Outcome, Refusal,
    RequestBody, Welcome,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::api::Api;
use crate::data_service::{PythonDs, silent_ds};
use crate::device::{RawDevice, code, enrol, enrolment_qr, tenant};
use crate::leaks::{contains, encodings, logs};

/// A served API on the wall clock (the Python DS judges `created` by it).
async fn served(db: &TestDb) -> Api {
    on_the_wall_clock(Api::start_with(db, None).await)
}

fn on_the_wall_clock(api: Api) -> Api {
    #[allow(clippy::disallowed_methods)] // The wall clock the Python DS runs on.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    api.clock.advance_secs((now - api.clock.now_ms()) / 1000);
    api
}

fn phone() -> Sdk {
    Sdk::open(Arc::new(MemoryStorage::new()), SdkConfig::default()).unwrap()
}

/// The server as the app knows it: gateway, id, key fingerprint (from the API's view).
async fn data_server(api: &Api, server: &str) -> (DataServer, String) {
    let (status, view) = api
        .admin(Method::GET, &format!("/v1/servers/{server}"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    let target = DataServer {
        gateway: format!("ws://{}/v1/device", api.running.addr),
        server_id: server.to_owned(),
        key_fingerprint: view["key_fingerprint"].as_str().unwrap().to_owned(),
    };
    (target, view["public_key"].as_str().unwrap().to_owned())
}

/// A server, "Bank", and a Python DS that verifies its signatures: the server's id, the
/// server as the app knows it, the DS.
async fn bank_with_ds(api: &Api) -> (String, DataServer, PythonDs) {
    let (server, _) = api.tenant("Bank").await;
    let (target, public_key) = data_server(api, &server).await;
    (server, target, PythonDs::start(&public_key, None))
}

/// Sets the server's Data Service (or clears it with `Value::Null`) and headless policy.
async fn configure(api: &Api, server: &str, data_service: Value, headless: bool) -> Value {
    let (status, body) = api
        .admin(
            Method::PATCH,
            &format!("/v1/servers/{server}"),
            Some(json!({"data_service": data_service, "headless_enrolment": headless})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["server"].clone()
}

/// Fresh random bytes: app data nothing else could contain by chance.
fn random_data(n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).unwrap();
    bytes
}

async fn events_after(api: &Api, head: Option<u64>) -> Vec<countersign_eventstore::RecordedEvent> {
    let from = head.map_or(0, |h| h + 1);
    api.running
        .state
        .store()
        .read_all(from, 10_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| head.is_none_or(|h| e.position > h))
        .collect()
}

fn server_code(result: Result<impl std::fmt::Debug, SdkError>) -> ErrorCode {
    match result {
        Err(SdkError::Server(e)) => e.code,
        other => panic!("expected a refusal from the gateway, got {other:?}"),
    }
}

async fn a_fresh_phone_enrols_headless_and_the_ds_verifies_what_it_sends(db: &TestDb) {
    if !PythonDs::available() {
        return;
    }
    logs();
    let api = served(db).await;
    let (server, target, mut ds) = bank_with_ds(&api).await;
    let view = configure(
        &api,
        &server,
        json!({"url": ds.url, "timeout_ms": 2000}),
        true,
    )
    .await;
    assert_eq!(
        view["data_service"],
        json!({"url": ds.url, "timeout_ms": 2000})
    );
    assert_eq!(view["headless_enrolment"], true);

    // The first message enrols a headless account, then goes to the DS, which verifies it.
    let phone = phone();
    let head = api.head().await;
    let data = random_data(48);
    let (account, answer) = phone.send_data(&target, &data).await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, data, "the DS echoes what it verified");
    let record = ds.next_record().await;
    assert_eq!(record["outcome"], "delivered", "{record}");
    assert_eq!(record["account"], account.as_str(), "{record}");
    assert_eq!(record["server"], server.as_str(), "{record}");
    assert_eq!(record["headless"], true, "{record}");
    assert!(
        record["user"].is_null(),
        "a headless account has no user: {record}"
    );
    assert_eq!(
        record["app_instance"],
        phone.app_instance().unwrap(),
        "{record}"
    );
    assert_eq!(
        record["body_sha256"],
        hex::encode(Sha256::digest(&data)),
        "{record}"
    );
    let written = events_after(&api, head).await;
    let types: Vec<&str> = written.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        ["account.registered"],
        "one event: the headless account"
    );
    let registered: countersign_domain::account::AccountEvent = written[0].decode().unwrap();
    let countersign_domain::account::AccountEvent::Registered(registered) = registered else {
        unreachable!()
    };
    assert_eq!(registered.account.account_id.to_string(), account);
    assert_eq!((registered.user, registered.second_factor), (None, None));
    let accounts = phone.accounts().unwrap();
    assert_eq!(accounts.len(), 1);
    assert!(accounts[0].headless && accounts[0].userid.is_empty());

    // Later messages reuse the account and its channel, and write nothing.
    let head = api.head().await;
    let more = random_data(1000);
    let (again, answer) = phone.send_data(&target, &more).await.unwrap();
    assert_eq!(
        (again.as_str(), answer.body.as_slice()),
        (account.as_str(), more.as_slice())
    );
    let record = ds.next_record().await;
    assert_eq!(record["body_sha256"], hex::encode(Sha256::digest(&more)));
    assert_ne!(
        record["request_id"],
        Value::Null,
        "each message carries its request id"
    );
    assert_eq!(api.head().await, head, "no event per message");
    assert_eq!(phone.accounts().unwrap().len(), 1);

    // Device data: an event when they change, none when they do not; the read shows them.
    phone
        .set_device_data(&target, "Pixel 8", "Android 15", "1.2.3")
        .await
        .unwrap();
    let changed = events_after(&api, head).await;
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].event_type, "account.device_data_changed");
    let position = api.head().await;
    phone
        .set_device_data(&target, "Pixel 8", "Android 15", "1.2.3")
        .await
        .unwrap();
    assert_eq!(
        api.head().await,
        position,
        "the same data again writes nothing"
    );
    let reads = api.running.state.reads();
    reads
        .wait_for(position.unwrap(), Duration::from_secs(5))
        .await
        .unwrap();
    let row = reads
        .account(
            countersign_domain::ServerId::parse_hex(&server).unwrap(),
            countersign_domain::AccountId::parse_hex(&account).unwrap(),
        )
        .await
        .unwrap()
        .unwrap();
    let (device, _) = row.device_data.unwrap();
    assert_eq!(
        (
            device.model.as_str(),
            device.os.as_str(),
            device.app_version.as_str()
        ),
        ("Pixel 8", "Android 15", "1.2.3")
    );

    // Deliveries are counted by outcome and timed; the API documents the new settings.
    let metrics = api.metrics().await;
    assert!(
        metrics.contains("countersign_ds_requests_total{outcome=\"answered\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("countersign_ds_request_duration_seconds_count 2"));
    let (_, doc) = api.call(Method::GET, "/openapi.json", None, None).await;
    let schemas = &doc["components"]["schemas"];
    let update = &schemas["UpdateServerRequest"]["properties"];
    assert!(update["data_service"].is_object() && update["headless_enrolment"].is_object());
    assert!(schemas["DataServiceView"]["properties"]["timeout_ms"].is_object());
    assert!(schemas["DeviceDataView"]["properties"]["model"].is_object());

    // No app data, nor the DS's answers, in any event, table or log line.
    let stored = crate::leaks::written(&api, db).await;
    let logged = logs().0.lock().unwrap().clone();
    assert!(
        contains(&logged, b"headless account enrolled"),
        "the log capture sees the gateway and the phone"
    );
    for secret in [&data, &more] {
        for form in encodings(secret) {
            assert!(!contains(&stored, &form), "app data were stored");
            assert!(!contains(&logged, &form), "app data were logged");
        }
    }
    api.stop().await;
}

async fn a_linked_account_sends_with_its_user_and_shows_its_device_data(db: &TestDb) {
    if !PythonDs::available() {
        return;
    }
    let api = served(db).await;
    let (server, token) = tenant(&api, "Bank", "olga").await;
    let (target, public_key) = data_server(&api, &server).await;
    let mut ds = PythonDs::start(&public_key, None);
    // Headless enrolment stays off: an enrolled account needs none.
    configure(&api, &server, json!({"url": ds.url}), false).await;
    let phone = phone();
    let account = enrol(&phone, &enrolment_qr(&api, &server, &token, "olga").await).await;
    let (used, answer) = phone.send_data(&target, b"to my bank").await.unwrap();
    assert_eq!((used.as_str(), answer.status), (account.as_str(), 200));
    let record = ds.next_record().await;
    assert_eq!(record["outcome"], "delivered", "{record}");
    assert_eq!(record["user"], "olga", "{record}");
    assert_eq!(record["account"], account.as_str());
    // No second factor was added: headless, though linked to a user.
    assert_eq!(record["headless"], true, "{record}");

    phone
        .set_device_data(&target, "iPhone 15", "iOS 18.1", "2.0.0")
        .await
        .unwrap();
    let head = api.head().await.unwrap();
    let (status, accounts) = api
        .read(
            &format!("/v1/servers/{server}/users/olga/accounts"),
            Some(&token),
            head,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{accounts}");
    let shown = &accounts["accounts"][0];
    assert_eq!(shown["account_id"], account.as_str());
    assert_eq!(shown["device_data"]["model"], "iPhone 15", "{shown}");
    assert_eq!(shown["device_data"]["os"], "iOS 18.1");
    assert_eq!(shown["device_data"]["app_version"], "2.0.0");
    assert!(shown["device_data"]["changed_at"].is_i64());
    api.stop().await;
}

/// A server configured with this Data Service and policy before any device talks to it (the
/// gateway reads a server's settings at most a second old, so a test that changed them under
/// a connected phone would race that cache).
async fn server_with(
    api: &Api,
    data_service: Value,
    headless: bool,
) -> (String, DataServer, String) {
    let (server, _) = api.tenant("Bank").await;
    let (target, public_key) = data_server(api, &server).await;
    configure(api, &server, data_service, headless).await;
    (server, target, public_key)
}

async fn delivery_failures_are_typed_errors_and_leave_nothing(db: &TestDb) {
    if !PythonDs::available() {
        return;
    }
    let api = served(db).await;
    let (silent, _held) = silent_ds().await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/ds", listener.local_addr().unwrap())
    };
    // The Python DS answering 500 needs the server's key: make the server first.
    let (server, _) = api.tenant("Bank").await;
    let (failing_target, public_key) = data_server(&api, &server).await;
    let failing = PythonDs::start(&public_key, Some(500));
    configure(&api, &server, json!({"url": failing.url}), true).await;
    let cases = [
        (failing_target, ErrorCode::DataServiceFailed),
        (
            server_with(&api, json!({"url": silent, "timeout_ms": 300}), true)
                .await
                .1,
            ErrorCode::DataServiceTimeout,
        ),
        (
            server_with(&api, json!({"url": closed}), true).await.1,
            ErrorCode::DataServiceUnavailable,
        ),
    ];
    for (target, expected) in cases {
        let phone = phone();
        let head = api.head().await;
        assert_eq!(
            server_code(phone.send_data(&target, b"undeliverable").await),
            expected
        );
        // The headless account was enrolled before the delivery failed; nothing else.
        let written = events_after(&api, head).await;
        let types: Vec<&str> = written.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types, ["account.registered"], "{expected:?}");
        // Again, on the account's channel: a typed error and nothing written.
        let head = api.head().await;
        assert_eq!(
            server_code(phone.send_data(&target, b"undeliverable").await),
            expected
        );
        assert_eq!(api.head().await, head, "a failed delivery records nothing");
        assert_eq!(phone.accounts().unwrap().len(), 1);
    }
    api.stop().await;
}

async fn refused_requests_write_nothing(db: &TestDb) {
    if !PythonDs::available() {
        return;
    }
    let api = served(db).await;
    let (server, target, mut ds) = bank_with_ds(&api).await;

    // Headless enrolment forbidden (the default): a fresh phone is refused; nothing written.
    let (_, forbidden, _) = server_with(&api, json!({"url": ds.url}), false).await;
    let head = api.head().await;
    let fresh = phone();
    assert_eq!(
        server_code(fresh.send_data(&forbidden, b"hello").await),
        ErrorCode::NotAllowed
    );
    assert!(fresh.accounts().unwrap().is_empty());
    assert_eq!(api.head().await, head);

    // A key of the wrong server is caught before anything is sent.
    let wrong = DataServer {
        key_fingerprint: "00".repeat(32),
        ..target.clone()
    };
    assert_eq!(
        fresh.send_data(&wrong, b"hello").await.unwrap_err(),
        SdkError::FingerprintMismatch
    );
    assert!(fresh.accounts().unwrap().is_empty());

    // No Data Service configured: refused, nothing sent (the headless account it enrolled is
    // the only write).
    let (_, unconfigured, _) = server_with(&api, Value::Null, true).await;
    let head = api.head().await;
    assert_eq!(
        server_code(fresh.send_data(&unconfigured, b"to nowhere").await),
        ErrorCode::DataServiceNotConfigured
    );
    let written = events_after(&api, head).await;
    assert_eq!(written.len(), 1);
    assert_eq!(written[0].event_type, "account.registered");
    let head = api.head().await;
    assert_eq!(
        server_code(fresh.send_data(&unconfigured, b"to nowhere").await),
        ErrorCode::DataServiceNotConfigured
    );
    assert_eq!(api.head().await, head);

    // A working server: one account, then the refusals around it.
    configure(&api, &server, json!({"url": ds.url}), true).await;
    let phone = phone();
    let (account, _) = phone.send_data(&target, b"enrol me").await.unwrap();
    ds.next_record().await;
    let head = api.head().await;

    // Another account's id claimed with a key of one's own: the channel is refused.
    let intruder = fresh_key();
    let account_bytes: [u8; 16] = hex::decode(&account).unwrap().try_into().unwrap();
    let (_, welcome) = RawDevice::connect(
        &api,
        &server,
        &intruder,
        Intent::Account {
            account_id: Bytes(account_bytes),
        },
    )
    .await;
    assert_eq!(
        welcome,
        Welcome::Refused {
            reason: Refusal::UnknownAccount
        }
    );
    // A guest channel cannot send data.
    let (mut guest, welcome) = RawDevice::connect(&api, &server, &intruder, Intent::Guest).await;
    assert!(matches!(welcome, Welcome::Accepted { .. }));
    let outcome = guest
        .request(
            1,
            RequestBody::SendData {
                request_id: Bytes([1; 16]),
                data: Opaque(b"as a guest".to_vec()),
            },
        )
        .await;
    assert_eq!(code(&outcome), Some(ErrorCode::NotAllowed));
    assert_eq!(api.head().await, head);

    // By hand: a headless enrolment, repeated with the same key (a retry: the same account,
    // nothing new), then oversize data on its channel (the SDK refuses it before sending).
    let key = fresh_key();
    let signing = fresh_key().public_key().unwrap();
    let enrol_headless = RequestBody::EnrolHeadless {
        signing_public_key: Blob(signing),
        app_instance: Bytes([9; 16]),
    };
    let (mut raw, _) = RawDevice::connect(&api, &server, &key, Intent::Guest).await;
    let Outcome::Ok(Answer::HeadlessEnrolled { account_id }) =
        raw.request(1, enrol_headless.clone()).await
    else {
        panic!("a headless enrolment");
    };
    let position = api.head().await;
    let Outcome::Ok(Answer::HeadlessEnrolled { account_id: again }) =
        raw.request(2, enrol_headless).await
    else {
        panic!("a repeated headless enrolment");
    };
    assert_eq!(again, account_id);
    assert_eq!(api.head().await, position);
    let (mut raw, welcome) =
        RawDevice::connect(&api, &server, &key, Intent::Account { account_id }).await;
    assert!(matches!(welcome, Welcome::Accepted { .. }));
    let outcome = raw
        .request(
            1,
            RequestBody::SendData {
                request_id: Bytes([2; 16]),
                data: Opaque(vec![7; MAX_APP_DATA_BYTES + 1]),
            },
        )
        .await;
    assert_eq!(code(&outcome), Some(ErrorCode::TooLarge));
    assert_eq!(api.head().await, position);
    assert_eq!(
        phone
            .send_data(&target, &vec![7; MAX_APP_DATA_BYTES + 1])
            .await
            .unwrap_err(),
        SdkError::InvalidConfig("app data may be at most 64 KiB")
    );

    // The DS heard none of the refused messages: the next one it gets is this.
    let (_, answer) = phone.send_data(&target, b"the next one").await.unwrap();
    assert_eq!(answer.status, 200);
    let record = ds.next_record().await;
    assert_eq!(
        record["body_sha256"],
        hex::encode(Sha256::digest(b"the next one"))
    );
    api.stop().await;
}

async fn the_cli_sends_data_and_writes_the_answer(db: &TestDb) {
    if !PythonDs::available() {
        return;
    }
    let api = served(db).await;
    let (server, target, mut ds) = bank_with_ds(&api).await;
    configure(&api, &server, json!({"url": ds.url}), true).await;
    let home = tempfile::tempdir().unwrap();
    let file = home.path().join("message.bin");
    std::fs::write(&file, b"hello from the command line").unwrap();
    let file = file.to_str().unwrap();
    // First use: gateway and fingerprint given; the answer is the echo on stdout.
    let out = crate::device_cli::device_ok(
        home.path(),
        &[
            "send-data",
            "--data",
            file,
            "--server",
            &server,
            "--gateway",
            &target.gateway,
            "--fingerprint",
            &target.key_fingerprint,
            "--device-data",
            "Virtual phone",
            "countersign CLI",
            "1.0",
        ],
        "",
    );
    assert_eq!(out, "hello from the command line");
    let first = ds.next_record().await;
    assert_eq!(first["outcome"], "delivered", "{first}");
    assert_eq!(first["headless"], true);
    // Then the stored server: the same account.
    let out = crate::device_cli::device_ok(
        home.path(),
        &["send-data", "--data", file, "--server", &server],
        "",
    );
    assert_eq!(out, "hello from the command line");
    let second = ds.next_record().await;
    assert_eq!(second["account"], first["account"]);
    // A server without a Data Service: exit 1 and the reason.
    let (other, other_target, _) = server_with(&api, Value::Null, true).await;
    let failed = crate::device_cli::device_command(
        home.path(),
        &[
            "send-data",
            "--data",
            file,
            "--server",
            &other,
            "--gateway",
            &other_target.gateway,
            "--fingerprint",
            &other_target.key_fingerprint,
        ],
    )
    .output()
    .unwrap();
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains("the server has no data service"),
        "{stderr}"
    );
    assert!(failed.stdout.is_empty());
    api.stop().await;
}

async fn an_account_over_its_rate_is_refused_and_the_ds_hears_nothing(db: &TestDb) {
    if !PythonDs::available() {
        return;
    }
    let api = Api::start_tuned(db, |args| {
        args.streams.secure_channel_burst = 3;
        args.streams.secure_channel_per_second = 0;
    })
    .await;
    let api = on_the_wall_clock(api);
    let (server, target, mut ds) = bank_with_ds(&api).await;
    configure(&api, &server, json!({"url": ds.url}), true).await;
    let phone = phone();
    for n in 0..3u8 {
        let (_, answer) = phone.send_data(&target, &[n]).await.unwrap();
        assert_eq!(answer.body, [n]);
        ds.next_record().await;
    }
    let head = api.head().await;
    assert_eq!(
        server_code(phone.send_data(&target, b"one too many").await),
        ErrorCode::RateLimited
    );
    assert_eq!(
        server_code(phone.set_device_data(&target, "m", "o", "v").await),
        ErrorCode::RateLimited,
        "device data share the account's budget"
    );
    assert_eq!(api.head().await, head);
    // Another account has its own budget; the DS's next message is that one's.
    let (other, answer) = self::phone()
        .send_data(&target, b"another phone")
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    let record = ds.next_record().await;
    assert_eq!(record["account"], other.as_str());
    api.stop().await;
}

fn fresh_key() -> StaticKey {
    loop {
        if let Ok(key) = StaticKey::from_bytes(&random_data(32)) {
            return key;
        }
    }
}

countersign_eventstore::on_both_backends!(
    a_fresh_phone_enrols_headless_and_the_ds_verifies_what_it_sends,
    a_linked_account_sends_with_its_user_and_shows_its_device_data,
    delivery_failures_are_typed_errors_and_leave_nothing,
    refused_requests_write_nothing,
    the_cli_sends_data_and_writes_the_answer,
    an_account_over_its_rate_is_refused_and_the_ds_hears_nothing,
);
