//! Transactions on a device end to end: the business API creates one, the device gateway tells
//! the user's connected phone, the phone (the mobile SDK, with a PIN at the SFS) shows and signs
//! it; and a device speaking the protocol by hand, with attestations a trusted test key signs,
//! to show that each signature the gateway must refuse is refused and writes nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use countersign_eventstore::testing::TestDb;
use countersign_mobile_sdk::{
    ChannelCallbacks, Event, Sdk, SdkError, SecondFactor, SecondFactorEvent, State,
    TransactionDetails,
};
use countersign_protocol::attestation::attestation_hash;
use countersign_protocol::channel::StaticKey;
use countersign_protocol::cose::noncanonical;
use countersign_protocol::device::{
    Answer, Blob, Bytes, ChallengePurpose, ErrorCode, Intent, Outcome, RequestBody, Secret,
};
use countersign_protocol::evidence::{SignedTransaction, sign_transaction, transaction_challenge};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::api::Api;
use crate::device::{RawDevice, code, enrolment_qr, open_session};
use crate::second_factor::{TestSfs, enrolment_to_factor_prompt, phone, pin_tenant};

const WAIT: Duration = Duration::from_secs(20);
pub(crate) const PIN: &str = "917364";
const DATA: &[u8] = b"{\"amount\":\"100.00\",\"currency\":\"EUR\",\"to\":\"Acme\"}";
const TEXT: &str = "Pay 100.00 EUR to Acme?";

pub(crate) fn payment(userid: &str, timeout_secs: u32) -> Value {
    json!({
        "userid": userid,
        "data": STANDARD.encode(DATA),
        "content_type": "application/json",
        "text": TEXT,
        "announce_info": "Payment to Acme",
        "timeout_secs": timeout_secs,
    })
}

/// Creates a transaction through the business API; answers its id.
pub(crate) async fn create(api: &Api, server: &str, token: &str, body: Value) -> String {
    let (status, created) = api
        .call(
            Method::POST,
            &format!("/v1/servers/{server}/transactions"),
            Some(token),
            Some(body),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created["transaction_id"].as_str().unwrap().to_owned()
}

/// The transaction as the business API shows it, once the read models caught up.
async fn view(api: &Api, server: &str, token: &str, id: &str) -> Value {
    let head = api.head().await.unwrap();
    let (status, body) = api
        .read(
            &format!("/v1/servers/{server}/transactions/{id}"),
            Some(token),
            head,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

pub(crate) async fn put_user(api: &Api, server: &str, token: &str, userid: &str) {
    let (status, body) = api
        .call(
            Method::PUT,
            &format!("/v1/servers/{server}/users/{userid}"),
            Some(token),
            Some(json!({"attributes": {}})),
        )
        .await;
    assert!(status.is_success(), "{body}");
}

/// The event types of one transaction's stream.
async fn stream(api: &Api, server: &str, id: &str) -> Vec<String> {
    let name = format!("transaction-{server}-{id}");
    let all = api
        .running
        .state
        .store()
        .read_all(0, 100_000)
        .await
        .unwrap();
    all.iter()
        .filter(|e| e.stream == name)
        .map(|e| e.event_type.clone())
        .collect()
}

async fn count(api: &Api, event_type: &str) -> usize {
    let all = api
        .running
        .state
        .store()
        .read_all(0, 100_000)
        .await
        .unwrap();
    all.iter().filter(|e| e.event_type == event_type).count()
}

fn id16(hex_id: &str) -> [u8; 16] {
    hex::decode(hex_id).unwrap().try_into().unwrap()
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn server_error(result: &Result<impl std::fmt::Debug, SdkError>) -> Option<ErrorCode> {
    match result {
        Err(SdkError::Server(e)) => Some(e.code),
        _ => None,
    }
}

/// Enrols the phone at a PIN server (registering its PIN); answers the account id.
pub(crate) async fn enrol_with_pin(
    api: &Api,
    phone: &Sdk,
    server: &str,
    token: &str,
    userid: &str,
) -> String {
    let qr = enrolment_qr(api, server, token, userid).await;
    let enrol = enrolment_to_factor_prompt(phone, &qr).await;
    enrol
        .set_pin_biometric(SecondFactor::pin(PIN))
        .await
        .unwrap();
    let done = tokio::time::timeout(WAIT, enrol.wait_for(|s| s.state == State::Done))
        .await
        .unwrap();
    assert_eq!(
        done.history_status,
        Some(countersign_mobile_sdk::HistoryStatus::Enrolled)
    );
    done.account_id.unwrap()
}

/// The phone's transactions: told at once, listed, shown, signed with a PIN; declined ones and
/// expired ones cannot be signed; its own transaction is stored only once signed. Ends with a
/// snapshot of the streams it wrote.
async fn a_phone_is_told_shows_and_signs(db: &TestDb) {
    let api = Api::start_with(db, None).await;
    let (server, token) = pin_tenant(&api, "ines").await;
    let phone = phone(&api).await;
    // The servers run on the test's clock; so does the phone.
    let clock = api.clock.clone();
    phone.set_clock(Arc::new(move || clock.now_ms())).unwrap();
    let account = enrol_with_pin(&api, &phone, &server, &token, "ines").await;
    let start = api.head().await.unwrap() + 1;

    // Connected: a new transaction reaches the phone at once.
    let (callbacks, mut events) = ChannelCallbacks::new();
    let listener = phone.listen(&account, callbacks).await.unwrap();
    let id = create(&api, &server, &token, payment("ines", 300)).await;
    let pending = loop {
        match tokio::time::timeout(WAIT, events.recv()).await.unwrap() {
            Some(Event::TransactionPending(info, pending)) => {
                assert_eq!(info.account_id, account);
                break pending;
            }
            Some(_) => {}
            None => panic!("the listener stopped"),
        }
    };
    assert_eq!(pending.transaction_id, id);
    assert_eq!(pending.announce_info.as_deref(), Some("Payment to Acme"));
    let listed = phone.pending_transactions(&account).await.unwrap();
    assert_eq!(
        listed.iter().map(|p| &p.transaction_id).collect::<Vec<_>>(),
        vec![&id]
    );

    // Shown, then signed with the PIN.
    let shown = phone.get_transaction(&account, &id).await.unwrap();
    assert_eq!(shown.data, DATA);
    assert_eq!(shown.text, TEXT);
    assert_eq!(shown.content_type, "application/json");
    let device_data = BTreeMap::from([("model".to_owned(), "Test phone".to_owned())]);
    let receipt = phone
        .sign_transaction(
            &account,
            &shown,
            SecondFactor::pin(PIN),
            device_data.clone(),
            Some(b"order-42".to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(receipt.transaction_id, id);
    let signed = view(&api, &server, &token, &id).await;
    assert_eq!(signed["status"], "signed", "{signed}");
    assert_eq!(signed["signed_by"], account.as_str());
    assert_eq!(signed["factor"], "pin");
    assert!(
        phone
            .pending_transactions(&account)
            .await
            .unwrap()
            .is_empty(),
        "a signed transaction no longer waits"
    );
    // Signing it again is refused: it ended.
    let again = phone
        .sign_transaction(
            &account,
            &shown,
            SecondFactor::pin(PIN),
            BTreeMap::new(),
            None,
        )
        .await;
    assert_eq!(server_error(&again), Some(ErrorCode::Ended), "{again:?}");
    assert_eq!(stream(&api, &server, &id).await.len(), 3);

    // A text the server did not send (a hash the server would like signed instead) is refused.
    let other = create(&api, &server, &token, payment("ines", 300)).await;
    let mut tampered = phone.get_transaction(&account, &other).await.unwrap();
    tampered.text = "Pay 1.00 EUR to Acme?".into();
    let refused = phone
        .sign_transaction(
            &account,
            &tampered,
            SecondFactor::pin(PIN),
            BTreeMap::new(),
            None,
        )
        .await;
    assert_eq!(
        server_error(&refused),
        Some(ErrorCode::BadAttestation),
        "{refused:?}"
    );

    // Declined, then it cannot be signed.
    phone.reject_transaction(&account, &other).await.unwrap();
    let shown_other = TransactionDetails {
        text: TEXT.into(),
        ..tampered
    };
    let after_reject = phone
        .sign_transaction(
            &account,
            &shown_other,
            SecondFactor::pin(PIN),
            BTreeMap::new(),
            None,
        )
        .await;
    assert_eq!(
        server_error(&after_reject),
        Some(ErrorCode::Ended),
        "{after_reject:?}"
    );
    assert_eq!(
        view(&api, &server, &token, &other).await["status"],
        "rejected"
    );

    // Past its deadline it cannot be signed.
    let late = create(&api, &server, &token, payment("ines", 30)).await;
    let shown_late = phone.get_transaction(&account, &late).await.unwrap();
    api.clock.advance_secs(31);
    let expired = phone
        .sign_transaction(
            &account,
            &shown_late,
            SecondFactor::pin(PIN),
            BTreeMap::new(),
            None,
        )
        .await;
    assert_eq!(
        server_error(&expired),
        Some(ErrorCode::Expired),
        "{expired:?}"
    );
    assert_eq!(
        view(&api, &server, &token, &late).await["status"],
        "expired"
    );

    // The app's own transaction: a wrong PIN stores nothing; the right one stores it signed.
    let created_before = count(&api, "transaction.created").await;
    let wrong = phone
        .sign_own_transaction(
            &account,
            b"savings:5.00".to_vec(),
            "text/plain",
            "Move 5.00 EUR to savings?",
            SecondFactor::pin("000000"),
            BTreeMap::new(),
            None,
        )
        .await;
    assert!(
        matches!(
            wrong,
            Err(SdkError::SecondFactor(SecondFactorEvent::WrongPin { .. }))
        ),
        "{wrong:?}"
    );
    assert_eq!(count(&api, "transaction.created").await, created_before);
    let own = phone
        .sign_own_transaction(
            &account,
            b"savings:5.00".to_vec(),
            "text/plain",
            "Move 5.00 EUR to savings?",
            SecondFactor::pin(PIN),
            device_data,
            None,
        )
        .await
        .unwrap();
    let own_view = view(&api, &server, &token, &own.transaction_id).await;
    assert_eq!(own_view["status"], "signed", "{own_view}");
    assert_eq!(own_view["origin"], "device");
    assert_eq!(own_view["signed_by"], account.as_str());
    assert_eq!(count(&api, "transaction.created").await, created_before + 1);

    // What the transactions' streams hold, in order.
    let events = api
        .running
        .state
        .store()
        .read_all(start, 1_000)
        .await
        .unwrap();
    let events: Vec<Value> = events
        .iter()
        .filter(|e| e.stream.starts_with("transaction-") || e.event_type == "attestation.used")
        .map(|e| {
            let mut payload = crate::api::payload_json(e);
            for key in [
                "device_signature",
                "attestation",
                "attestation_hash",
                "device_time",
            ] {
                if let Some(v) = payload.get_mut(key) {
                    *v = Value::String(format!("[{key}]"));
                }
            }
            // Whoever finds the deadline passed first records the expiry: the API's sweeper,
            // a read, or the gateway refusing the signature.
            let actor = match e.event_type.as_str() {
                "transaction.expired" => Some("[first to notice]"),
                _ => e
                    .metadata
                    .actor
                    .as_deref()
                    .and_then(|a| a.split(':').next()),
            };
            json!({
                "type": e.event_type,
                "stream": e.stream.split('-').next(),
                "actor": actor,
                "payload": payload,
            })
        })
        .collect();
    let mut events = Value::Array(events);
    crate::api::redact(&mut events);
    insta::assert_json_snapshot!("device_transaction_events", events);
    listener.stop();
    api.stop().await;
}

/// An account enrolled by hand, with its keys, to sign what the SDK never would.
struct RawAccount {
    device: RawDevice,
    app_instance: [u8; 16],
    signing: p256::ecdsa::SigningKey,
    thumbprint: [u8; 32],
}

impl RawAccount {
    async fn enrol(api: &Api, server: &str, token: &str, userid: &str, seed: u8) -> Self {
        let channel_key = StaticKey::from_bytes(&[seed; 32]).unwrap();
        let signing_key = StaticKey::from_bytes(&[seed + 1; 32]).unwrap();
        let signing_public = signing_key.public_key().unwrap();
        let app_instance = [seed + 2; 16];
        let qr = enrolment_qr(api, server, token, userid).await;
        let enrolment = countersign_protocol::qr::QrPayload::from_base64url(&qr).unwrap();
        let (mut guest, _) = RawDevice::connect(api, server, &channel_key, Intent::Guest).await;
        let Outcome::Ok(Answer::Enrolled { account_id, .. }) = guest
            .request(
                1,
                RequestBody::Enrol {
                    token: Secret::new(enrolment.token),
                    signing_public_key: Blob(signing_public.clone()),
                    app_instance: Bytes(app_instance),
                },
            )
            .await
        else {
            panic!("enrolled")
        };
        let (device, _) =
            RawDevice::connect(api, server, &channel_key, Intent::Account { account_id }).await;
        Self {
            device,
            app_instance,
            signing: p256::ecdsa::SigningKey::from_slice(signing_key.expose()).unwrap(),
            thumbprint: sha256(&signing_public),
        }
    }

    fn attest(&self, sfs: &TestSfs, challenge: [u8; 32], now: i64, id: u8) -> Vec<u8> {
        sfs.attest(self.app_instance, challenge, self.thumbprint, now, id)
    }
}

/// What a device signs, with every field a test may break.
struct Sign<'a> {
    server: [u8; 16],
    transaction: [u8; 16],
    data: &'a [u8],
    text: &'a str,
    attestation: &'a [u8],
    device_time_ms: i64,
}

impl<'a> Sign<'a> {
    /// A signature over the test's payment, as the SDK would make it.
    fn good(server: [u8; 16], transaction: [u8; 16], attestation: &'a [u8], now: i64) -> Self {
        Self {
            server,
            transaction,
            data: DATA,
            text: TEXT,
            attestation,
            device_time_ms: now,
        }
    }

    fn with(&self, key: &p256::ecdsa::SigningKey) -> Vec<u8> {
        sign_transaction(
            &SignedTransaction {
                transaction_id: Bytes(self.transaction),
                server_id: Bytes(self.server),
                data_hash: Bytes(sha256(self.data)),
                text_hash: Bytes(sha256(self.text.as_bytes())),
                attestation_hash: Bytes(attestation_hash(self.attestation)),
                device_time_ms: self.device_time_ms,
                device_data: BTreeMap::new(),
                client_data: None,
            },
            key,
        )
        .unwrap()
    }
}

fn sign_request(transaction: [u8; 16], signature: Vec<u8>, attestation: &[u8]) -> RequestBody {
    RequestBody::SignTransaction {
        transaction_id: Bytes(transaction),
        signature: Blob(signature),
        attestation: Blob(attestation.to_vec()),
    }
}

/// Every signature the gateway must refuse is refused, and writes nothing; a good one is
/// recorded once, and its retry answers done.
async fn the_gateway_checks_every_transaction_signature(db: &TestDb) {
    let sfs = TestSfs::new(0x51);
    let api = Api::start_with(db, None).await;
    let (server, token) = pin_tenant(&api, "ana").await;
    put_user(&api, &server, &token, "ben").await;
    let (status, trusted) = api
        .admin(
            Method::POST,
            &format!("/v1/servers/{server}/sfs-keys"),
            Some(json!({"public_key": sfs.public_hex(), "label": "Test SFS"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{trusted}");
    let mut ana = RawAccount::enrol(&api, &server, &token, "ana", 0x61).await;
    let mut ben = RawAccount::enrol(&api, &server, &token, "ben", 0x71).await;
    let server_id = id16(&server);
    let now = api.clock.now_ms();
    let first = id16(&create(&api, &server, &token, payment("ana", 300)).await);
    let second = id16(&create(&api, &server, &token, payment("ana", 300)).await);
    let challenge_of = |tx: [u8; 16]| {
        transaction_challenge(&server_id, &tx, &sha256(DATA), &sha256(TEXT.as_bytes()))
    };
    let good = |tx: [u8; 16], attestation| Sign::good(server_id, tx, attestation, now);

    // Another user's account: cannot fetch, challenge or sign it, and nothing is written.
    let head = api.head().await;
    let ben_attestation = ben.attest(&sfs, challenge_of(first), now, 1);
    let ben_signature = good(first, &ben_attestation).with(&ben.signing);
    for (id, body) in [
        (
            1,
            RequestBody::GetTransaction {
                transaction_id: Bytes(first),
            },
        ),
        (
            2,
            RequestBody::Challenge {
                purpose: ChallengePurpose::Transaction {
                    transaction_id: Bytes(first),
                },
            },
        ),
        (3, sign_request(first, ben_signature, &ben_attestation)),
        (
            4,
            RequestBody::RejectTransaction {
                transaction_id: Bytes(first),
            },
        ),
    ] {
        let outcome = ben.device.request(id, body).await;
        assert_eq!(code(&outcome), Some(ErrorCode::NotAllowed), "{outcome:?}");
    }
    assert_eq!(api.head().await, head, "a refusal writes nothing");

    // The owner fetches it and is given the public challenge.
    let Outcome::Ok(Answer::Transaction(details)) = ana
        .device
        .request(
            10,
            RequestBody::GetTransaction {
                transaction_id: Bytes(first),
            },
        )
        .await
    else {
        panic!("the transaction")
    };
    assert_eq!(details.data.0, DATA);
    assert_eq!(details.text, TEXT);
    let Outcome::Ok(Answer::Challenge { challenge }) = ana
        .device
        .request(
            11,
            RequestBody::Challenge {
                purpose: ChallengePurpose::Transaction {
                    transaction_id: Bytes(first),
                },
            },
        )
        .await
    else {
        panic!("a challenge")
    };
    assert_eq!(challenge.0, challenge_of(first));

    // Each broken signature or attestation is refused, and nothing is written.
    let link = open_session(&api, &server, &token, 1, json!({})).await;
    let hsid = Bytes(
        countersign_protocol::qr::QrPayload::from_deep_link(&link)
            .unwrap()
            .token,
    );
    let Outcome::Ok(Answer::Challenge { challenge: login }) = ana
        .device
        .request(
            12,
            RequestBody::Challenge {
                purpose: ChallengePurpose::Login { hsid },
            },
        )
        .await
    else {
        panic!("a login challenge")
    };
    let head = api.head().await;
    let for_login = ana.attest(&sfs, login.0, now, 2);
    let fresh = ana.attest(&sfs, challenge_of(first), now, 3);
    let other_fresh = ana.attest(&sfs, challenge_of(first), now, 4);
    let cases: Vec<(&str, RequestBody, ErrorCode)> = vec![
        (
            "an attestation for a login",
            sign_request(
                first,
                good(first, &for_login).with(&ana.signing),
                &for_login,
            ),
            ErrorCode::BadAttestation,
        ),
        (
            "a signature over other data",
            sign_request(
                first,
                Sign {
                    data: b"{\"amount\":\"1.00\"}",
                    ..good(first, &fresh)
                }
                .with(&ana.signing),
                &fresh,
            ),
            ErrorCode::Invalid,
        ),
        (
            "a signature over another text",
            sign_request(
                first,
                Sign {
                    text: "Pay 1.00 EUR to Acme?",
                    ..good(first, &fresh)
                }
                .with(&ana.signing),
                &fresh,
            ),
            ErrorCode::Invalid,
        ),
        (
            "a signature by another account's key",
            sign_request(first, good(first, &fresh).with(&ben.signing), &fresh),
            ErrorCode::Invalid,
        ),
        (
            "a signature binding another attestation",
            sign_request(first, good(first, &other_fresh).with(&ana.signing), &fresh),
            ErrorCode::Invalid,
        ),
        (
            "a signature dated before the attestation",
            sign_request(
                first,
                Sign {
                    device_time_ms: now - 60_000,
                    ..good(first, &fresh)
                }
                .with(&ana.signing),
                &fresh,
            ),
            ErrorCode::Invalid,
        ),
        (
            "a signature of another server",
            sign_request(
                first,
                Sign {
                    server: [0xee; 16],
                    ..good(first, &fresh)
                }
                .with(&ana.signing),
                &fresh,
            ),
            ErrorCode::Invalid,
        ),
    ];
    for (n, (what, body, expected)) in cases.into_iter().enumerate() {
        let outcome = ana.device.request(20 + n as u32, body).await;
        assert_eq!(code(&outcome), Some(expected), "{what}: {outcome:?}");
    }
    assert_eq!(api.head().await, head, "a refused signature writes nothing");

    // Issue 19 item 10: another encoding of a good device signature or attestation (its
    // signature still verifies) is refused with the reason, and nothing is written.
    let head = api.head().await;
    let refused = |outcome: &Outcome, code: ErrorCode, reason: &str, what: &str| match outcome {
        Outcome::Err(e) => {
            assert_eq!(e.code, code, "{what}: {e:?}");
            assert!(e.message.contains(reason), "{what}: {e:?}, want {reason}");
        }
        Outcome::Ok(_) => panic!("{what}: accepted"),
    };
    let canonical = good(first, &fresh).with(&ana.signing);
    let mut request_id = 100;
    for v in noncanonical::variants(&canonical).unwrap() {
        request_id += 1;
        let outcome = ana
            .device
            .request(request_id, sign_request(first, v.bytes, &fresh))
            .await;
        let reason = v.refused_with.to_string();
        refused(&outcome, ErrorCode::Invalid, &reason, v.name);
    }
    for v in noncanonical::variants(&fresh).unwrap() {
        request_id += 1;
        // The device signs the re-encoded attestation's hash, so only its encoding is wrong.
        let signature = Sign::good(server_id, first, &v.bytes, now).with(&ana.signing);
        let outcome = ana
            .device
            .request(request_id, sign_request(first, signature, &v.bytes))
            .await;
        if v.bytes.len() > 1_024 {
            // Over the attestation size limit: refused before it is even read.
            refused(&outcome, ErrorCode::Invalid, "attestation", v.name);
        } else {
            let reason = v.refused_with.to_string();
            refused(&outcome, ErrorCode::BadAttestation, &reason, v.name);
        }
    }
    let loose = noncanonical::loose_protected_header(&fresh, &sfs.key, b"").unwrap();
    let outcome = ana
        .device
        .request(
            request_id + 1,
            sign_request(
                first,
                Sign::good(server_id, first, &loose, now).with(&ana.signing),
                &loose,
            ),
        )
        .await;
    refused(
        &outcome,
        ErrorCode::BadAttestation,
        "protected header is not deterministic",
        "loose protected header",
    );
    assert_eq!(api.head().await, head, "a refused encoding writes nothing");

    // A good signature is recorded once; its retry answers done.
    let signature = good(first, &fresh).with(&ana.signing);
    for id in [30, 31] {
        assert_eq!(
            ana.device
                .request(id, sign_request(first, signature.clone(), &fresh))
                .await,
            Outcome::Ok(Answer::Done)
        );
    }
    assert_eq!(
        stream(&api, &server, &hex::encode(first)).await,
        [
            "transaction.created",
            "transaction.presented",
            "transaction.signed"
        ]
    );

    // Replayed onto another transaction: the same attestation (bound to the first), or a
    // fresh attestation with the first transaction's signature.
    let head = api.head().await;
    let outcome = ana
        .device
        .request(32, sign_request(second, signature.clone(), &fresh))
        .await;
    assert_eq!(
        code(&outcome),
        Some(ErrorCode::BadAttestation),
        "{outcome:?}"
    );
    let for_second = ana.attest(&sfs, challenge_of(second), now, 5);
    let replayed = good(first, &for_second).with(&ana.signing);
    let outcome = ana
        .device
        .request(33, sign_request(second, replayed, &for_second))
        .await;
    assert_eq!(code(&outcome), Some(ErrorCode::Invalid), "{outcome:?}");
    assert_eq!(api.head().await, head);

    // Declined, then a good signature is refused.
    assert_eq!(
        ana.device
            .request(
                34,
                RequestBody::RejectTransaction {
                    transaction_id: Bytes(second),
                }
            )
            .await,
        Outcome::Ok(Answer::Done)
    );
    let head = api.head().await;
    let outcome = ana
        .device
        .request(
            35,
            sign_request(
                second,
                good(second, &for_second).with(&ana.signing),
                &for_second,
            ),
        )
        .await;
    assert_eq!(code(&outcome), Some(ErrorCode::Ended), "{outcome:?}");
    assert_eq!(api.head().await, head);

    // Past its deadline: refused, and the expiry is recorded, not a signature.
    let late = id16(&create(&api, &server, &token, payment("ana", 30)).await);
    api.clock.advance_secs(31);
    let later = api.clock.now_ms();
    let for_late = ana.attest(&sfs, challenge_of(late), later, 6);
    let outcome = ana
        .device
        .request(
            36,
            sign_request(
                late,
                Sign {
                    device_time_ms: later,
                    ..good(late, &for_late)
                }
                .with(&ana.signing),
                &for_late,
            ),
        )
        .await;
    assert_eq!(code(&outcome), Some(ErrorCode::Expired), "{outcome:?}");
    assert_eq!(
        stream(&api, &server, &hex::encode(late)).await,
        ["transaction.created", "transaction.expired"]
    );

    // The app's own transaction: refused over another text, with nothing stored; then stored
    // signed, once.
    let own = [0x99; 16];
    let own_challenge = transaction_challenge(
        &server_id,
        &own,
        &sha256(b"savings:5.00"),
        &sha256(b"Move 5.00 EUR?"),
    );
    let own_attestation = ana.attest(&sfs, own_challenge, later, 7);
    let own_sign = Sign {
        server: server_id,
        transaction: own,
        data: b"savings:5.00",
        text: "Move 5.00 EUR?",
        attestation: &own_attestation,
        device_time_ms: later,
    };
    let own_request = |signature: Vec<u8>| RequestBody::SignOwnTransaction {
        transaction_id: Bytes(own),
        data: Blob(b"savings:5.00".to_vec()),
        content_type: "text/plain".into(),
        text: "Move 5.00 EUR?".into(),
        signature: Blob(signature),
        attestation: Blob(own_attestation.clone()),
    };
    let head = api.head().await;
    let outcome = ana
        .device
        .request(
            40,
            own_request(
                Sign {
                    text: "Move 500.00 EUR?",
                    ..own_sign
                }
                .with(&ana.signing),
            ),
        )
        .await;
    assert_eq!(code(&outcome), Some(ErrorCode::Invalid), "{outcome:?}");
    assert_eq!(api.head().await, head);
    assert!(stream(&api, &server, &hex::encode(own)).await.is_empty());
    let own_signature = Sign { ..own_sign }.with(&ana.signing);
    for id in [41, 42] {
        assert_eq!(
            ana.device
                .request(id, own_request(own_signature.clone()))
                .await,
            Outcome::Ok(Answer::Done)
        );
    }
    assert_eq!(
        stream(&api, &server, &hex::encode(own)).await,
        ["transaction.created", "transaction.signed"]
    );
    api.stop().await;
}

countersign_eventstore::on_both_backends!(
    a_phone_is_told_shows_and_signs,
    the_gateway_checks_every_transaction_signature,
);
