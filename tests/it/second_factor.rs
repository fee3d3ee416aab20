//! The second factor end to end: `countersign serve` (business API, device gateway and SFS in
//! one process), the mobile SDK with a PIN, and a device speaking the protocol by hand with
//! attestations a test key signs, to show each refusal of the server's checks.

use std::sync::Arc;
use std::time::Duration;

use countersign_eventstore::testing::TestDb;
use countersign_mobile_sdk::{
    Argon2Params, Interaction, MemoryStorage, NoCallbacks, Sdk, SdkConfig, SdkError, SecondFactor,
    SecondFactorEvent, SfsConfig, State,
};
use countersign_protocol::attestation::{AttestationClaims, Factor, sign_attestation};
use countersign_protocol::channel::StaticKey;
use countersign_protocol::device::{
    Answer, Blob, Bytes, ChallengePurpose, ErrorCode, Intent, Outcome, RequestBody, Secret,
};
use p256::elliptic_curve::sec1::ToSec1Point;
use reqwest::{Method, StatusCode};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::api::Api;
use crate::device::{RawDevice, code, enrolment_qr, open_session, session_view};

const WAIT: Duration = Duration::from_secs(20);
const PIN: &str = "917364";

/// A server whose logins need a PIN, an API key, and `userid`.
pub(crate) async fn pin_tenant(api: &Api, userid: &str) -> (String, String) {
    let (server, token) = api.tenant("Bank").await;
    let (status, body) = api
        .admin(
            Method::PATCH,
            &format!("/v1/servers/{server}"),
            Some(json!({"second_factor": "pin"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = api
        .call(
            Method::PUT,
            &format!("/v1/servers/{server}/users/{userid}"),
            Some(&token),
            Some(json!({"attributes": {"name": "Ines"}})),
        )
        .await;
    assert!(status.is_success());
    (server, token)
}

pub(crate) async fn phone(api: &Api) -> Sdk {
    Sdk::open(Arc::new(MemoryStorage::new()), phone_config(api).await).unwrap()
}

/// A phone's configuration: bound to the server's SFS, with a cheap Argon2id.
pub(crate) async fn phone_config(api: &Api) -> SdkConfig {
    let sfs = SfsConfig::fetch(&format!("{}/v1/sfs", api.base))
        .await
        .unwrap();
    SdkConfig {
        sfs: Some(sfs),
        // Argon2id's cost is the client's; tests keep it small.
        argon2_params: Argon2Params {
            m_kib: 1024,
            t: 1,
            p: 1,
        },
        ..SdkConfig::default()
    }
}

/// Starts an enrolment on the phone and confirms it, up to the second-factor prompt.
pub(crate) async fn enrolment_to_factor_prompt(
    phone: &Sdk,
    qr: &str,
) -> countersign_mobile_sdk::SessionHandle {
    let enrol = phone
        .start_session(qr.as_bytes(), Arc::new(NoCallbacks))
        .await
        .unwrap();
    enrol.confirm_enrol().await.unwrap();
    tokio::time::timeout(
        WAIT,
        enrol.wait_for(|s| s.state == State::UserInteraction(Interaction::WaitForSecondFactor)),
    )
    .await
    .unwrap();
    enrol
}

/// Opens a one-shot login on the phone up to the PIN prompt.
async fn to_pin_prompt(
    api: &Api,
    phone: &Sdk,
    server: &str,
    token: &str,
    n: u8,
    account: &str,
) -> countersign_mobile_sdk::SessionHandle {
    let link = open_session(api, server, token, n, json!({"ping_time_secs": 0})).await;
    let login = phone
        .start_session(link.as_bytes(), Arc::new(NoCallbacks))
        .await
        .unwrap();
    login.set_account(Some(account)).await.unwrap();
    let prompt = tokio::time::timeout(
        WAIT,
        login.wait_for(|s| s.state == State::UserInteraction(Interaction::WaitForSecondFactor)),
    )
    .await
    .unwrap();
    assert_eq!(prompt.account_id.as_deref(), Some(account));
    login
}

async fn pin_enrolment_login_lockout_and_restart(db: &TestDb) {
    let api = Api::start_with(db, None).await;
    let (server, token) = pin_tenant(&api, "ines").await;
    let phone = phone(&api).await;

    // Enrolment on a PIN server: the first enrolment registers the app's PIN at the SFS and
    // upgrades the new account with an attestation.
    let qr = enrolment_qr(&api, &server, &token, "ines").await;
    let enrol = enrolment_to_factor_prompt(&phone, &qr).await;
    enrol
        .set_pin_biometric(SecondFactor::pin(PIN))
        .await
        .unwrap();
    let done = tokio::time::timeout(WAIT, enrol.wait_for(|s| s.state == State::Done))
        .await
        .unwrap();
    let account = done.account_id.unwrap();
    assert!(!phone.accounts().unwrap()[0].headless);
    let head = api.head().await.unwrap();
    let (_, listed) = api
        .read(
            &format!("/v1/servers/{server}/users/ines/accounts"),
            Some(&token),
            head,
        )
        .await;
    assert_eq!(listed["accounts"][0]["second_factor"], "pin", "{listed}");

    // A login: a wrong PIN counts down and the session waits; the right one logs in.
    let login = to_pin_prompt(&api, &phone, &server, &token, 1, &account).await;
    let wrong = login.set_pin_biometric(SecondFactor::pin("000000")).await;
    assert!(
        matches!(
            wrong,
            Err(SdkError::SecondFactor(SecondFactorEvent::WrongPin {
                attempts_left: 4
            }))
        ),
        "{wrong:?}"
    );
    assert_eq!(
        login.state(),
        State::UserInteraction(Interaction::WaitForSecondFactor)
    );
    login
        .set_pin_biometric(SecondFactor::pin(PIN))
        .await
        .unwrap();
    tokio::time::timeout(WAIT, login.wait_for(|s| s.state == State::Done))
        .await
        .unwrap();
    let view = session_view(&api, &server, &token, 1).await;
    assert_eq!(view["state"], "logged_in", "{view}");
    assert_eq!(view["userid"], "ines");

    // Five wrong PINs lock the PIN; the lock survives a restart of the whole server.
    let login = to_pin_prompt(&api, &phone, &server, &token, 2, &account).await;
    let mut last = None;
    for _ in 0..5 {
        last = Some(login.set_pin_biometric(SecondFactor::pin("111111")).await);
        if login.state() == State::Error {
            break;
        }
    }
    assert!(
        matches!(
            last,
            Some(Err(SdkError::SecondFactor(
                SecondFactorEvent::Locked { .. }
            )))
        ),
        "{last:?}"
    );
    let api = api.restart(db).await;
    let login = to_pin_prompt(&api, &phone, &server, &token, 3, &account).await;
    let locked = login.set_pin_biometric(SecondFactor::pin(PIN)).await;
    assert!(
        matches!(
            locked,
            Err(SdkError::SecondFactor(SecondFactorEvent::Locked { .. }))
        ),
        "still locked after the restart, even with the right PIN: {locked:?}"
    );
    // Once the clock passes the lock, the right PIN works again.
    api.clock.advance_secs(61);
    let login = to_pin_prompt(&api, &phone, &server, &token, 4, &account).await;
    login
        .set_pin_biometric(SecondFactor::pin(PIN))
        .await
        .unwrap();
    tokio::time::timeout(WAIT, login.wait_for(|s| s.state == State::Done))
        .await
        .unwrap();
    assert_eq!(
        session_view(&api, &server, &token, 4).await["state"],
        "logged_in"
    );

    // The PIN never reached the log or any table, in any encoding.
    let needles = [
        PIN.as_bytes().to_vec(),
        hex::encode(PIN).into_bytes(),
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, PIN).into_bytes(),
    ];
    let written = crate::leaks::written(&api, db).await;
    for needle in &needles {
        assert!(
            !written
                .windows(needle.len())
                .any(|w| w == needle.as_slice()),
            "the PIN was written somewhere"
        );
    }
    api.stop().await;
}

async fn biometric_login_and_account_upgrade(db: &TestDb) {
    let api = Api::start_with(db, None).await;
    let (server, token) = pin_tenant(&api, "kim").await;
    let (status, _) = api
        .admin(
            Method::PATCH,
            &format!("/v1/servers/{server}"),
            Some(json!({"second_factor": "pin_or_biometric"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let phone = phone(&api).await;
    let prompt = Arc::new(countersign_mobile_sdk::SimulatedBiometric::new(true));
    phone.set_biometric_prompt(prompt.clone()).unwrap();

    // A headless account first (the phone has no SFS-proven factor yet, and the user leaves
    // the enrolment's second-factor step), then upgraded with the PIN.
    let qr = enrolment_qr(&api, &server, &token, "kim").await;
    let enrol = enrolment_to_factor_prompt(&phone, &qr).await;
    enrol.input_cancel().await.unwrap();
    let account = phone.accounts().unwrap()[0].clone();
    assert!(account.headless, "left without a second factor");
    phone
        .upgrade_account(&account.account_id, SecondFactor::pin(PIN))
        .await
        .unwrap();
    assert!(!phone.accounts().unwrap()[0].headless);
    let head = api.head().await.unwrap();
    let (_, listed) = api
        .read(
            &format!("/v1/servers/{server}/users/kim/accounts"),
            Some(&token),
            head,
        )
        .await;
    assert_eq!(listed["accounts"][0]["second_factor"], "pin", "{listed}");

    // A biometric key, registered with the PIN, then a login with it.
    phone
        .register_biometric(countersign_mobile_sdk::Pin::new(PIN))
        .await
        .unwrap();
    prompt.set(false);
    let login = to_pin_prompt(&api, &phone, &server, &token, 1, &account.account_id).await;
    let refused = login.set_pin_biometric(SecondFactor::Biometric).await;
    assert!(
        matches!(
            refused,
            Err(SdkError::SecondFactor(SecondFactorEvent::BiometricFailed))
        ),
        "the platform did not release the key: {refused:?}"
    );
    prompt.set(true);
    login
        .set_pin_biometric(SecondFactor::Biometric)
        .await
        .unwrap();
    tokio::time::timeout(WAIT, login.wait_for(|s| s.state == State::Done))
        .await
        .unwrap();
    let view = session_view(&api, &server, &token, 1).await;
    assert_eq!(view["state"], "logged_in", "{view}");
    let events = api.running.state.store().read_all(0, 10_000).await.unwrap();
    assert!(events.iter().any(|e| {
        e.event_type == "session.second_factor_verified"
            && crate::api::payload_json(e)["factor"] == "biometric"
    }));
    api.stop().await;
}

/// Every row of every table, as text (PostgreSQL) or the database files' bytes (SQLite).
pub(crate) async fn dump_tables(db: &TestDb) -> Vec<u8> {
    if db.url().starts_with("sqlite") {
        let path = db.url().trim_start_matches("sqlite://");
        let path = path.split('?').next().unwrap_or(path);
        let mut bytes = Vec::new();
        for suffix in ["", "-wal"] {
            if let Ok(b) = std::fs::read(format!("{path}{suffix}")) {
                bytes.extend(b);
            }
        }
        assert!(!bytes.is_empty(), "read the SQLite files at {path}");
        return bytes;
    }
    let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut out = Vec::new();
    for table in tables {
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT t::text FROM \"{table}\" t"
        )))
        .fetch_all(&pool)
        .await
        .unwrap();
        for row in rows {
            out.extend(row.into_bytes());
        }
    }
    pool.close().await;
    out
}

/// Attestations made with a key the deployment was told to trust, so each check can be broken
/// on purpose.
pub(crate) struct TestSfs {
    pub(crate) key: p256::ecdsa::SigningKey,
}

impl TestSfs {
    pub(crate) fn new(seed: u8) -> Self {
        Self {
            key: p256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap(),
        }
    }

    pub(crate) fn public_hex(&self) -> String {
        hex::encode(
            self.key
                .verifying_key()
                .as_affine()
                .to_sec1_point(false)
                .as_bytes(),
        )
    }

    pub(crate) fn attest(
        &self,
        app_instance: [u8; 16],
        challenge: [u8; 32],
        thumbprint: [u8; 32],
        issued_at_ms: i64,
        id: u8,
    ) -> Vec<u8> {
        let claims = AttestationClaims {
            app_instance: Bytes(app_instance),
            factor: Factor::Pin,
            challenge: Bytes(challenge),
            account_key_thumbprint: Bytes(thumbprint),
            issued_at_ms,
            expires_at_ms: issued_at_ms + 30_000,
            attestation_id: Bytes([id; 16]),
        };
        sign_attestation(&claims, &self.key).unwrap()
    }
}

async fn the_server_checks_every_attestation(db: &TestDb) {
    let sfs = TestSfs::new(0x31);
    let untrusted = TestSfs::new(0x32);
    let api = Api::start_with(db, None).await;
    let (server, token) = pin_tenant(&api, "jo").await;
    // This server trusts a third-party app's SFS (the test's key); others do not.
    let (status, trusted) = api
        .admin(
            Method::POST,
            &format!("/v1/servers/{server}/sfs-keys"),
            Some(json!({"public_key": sfs.public_hex(), "label": "Partner app"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{trusted}");
    let (status, _) = api
        .admin(
            Method::POST,
            &format!("/v1/servers/{server}/sfs-keys"),
            Some(json!({"public_key": "04abcd", "label": "Broken"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // A login within five minutes of a proven factor may skip the prompt.
    let (status, _) = api
        .admin(
            Method::PATCH,
            &format!("/v1/servers/{server}"),
            Some(json!({"second_factor_cache_secs": 300})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let now = api.clock.now_ms();

    // Enrol by hand: a guest channel whose key becomes the account's channel key.
    let channel_key = StaticKey::from_bytes(&[0x41; 32]).unwrap();
    let signing_public = StaticKey::from_bytes(&[0x42; 32])
        .unwrap()
        .public_key()
        .unwrap();
    let thumbprint: [u8; 32] = Sha256::digest(&signing_public).into();
    let app_instance = [0x43; 16];
    let qr = enrolment_qr(&api, &server, &token, "jo").await;
    let enrolment = countersign_protocol::qr::QrPayload::from_base64url(&qr).unwrap();
    let (mut guest, _) = RawDevice::connect(&api, &server, &channel_key, Intent::Guest).await;
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
    let (mut phone, _) =
        RawDevice::connect(&api, &server, &channel_key, Intent::Account { account_id }).await;

    // Upgrade the headless account with an attestation for the upgrade challenge.
    let Outcome::Ok(Answer::Challenge { challenge }) = phone
        .request(
            2,
            RequestBody::Challenge {
                purpose: ChallengePurpose::Upgrade,
            },
        )
        .await
    else {
        panic!("a challenge")
    };
    let upgrade = sfs.attest(app_instance, challenge.0, thumbprint, now, 1);
    assert_eq!(
        phone
            .request(
                3,
                RequestBody::UpgradeAccount {
                    attestation: Blob(upgrade.clone()),
                }
            )
            .await,
        Outcome::Ok(Answer::Done)
    );

    // A login: log_in without a factor is refused; then every broken attestation is refused;
    // then a good one logs in; then the same one, replayed on another session, is refused.
    let session_challenge = |n: u8| {
        let api = &api;
        let server = server.clone();
        let token = token.clone();
        async move {
            let link = open_session(api, &server, &token, n, json!({})).await;
            Bytes(
                countersign_protocol::qr::QrPayload::from_deep_link(&link)
                    .unwrap()
                    .token,
            )
        }
    };
    let hsid = session_challenge(1).await;
    for (id, body) in [
        (10, RequestBody::Scan { hsid }),
        (11, RequestBody::Confirm { hsid }),
    ] {
        assert!(matches!(phone.request(id, body).await, Outcome::Ok(_)));
    }
    assert_eq!(
        code(&phone.request(12, RequestBody::LogIn { hsid }).await),
        Some(ErrorCode::SecondFactorRequired)
    );
    let Outcome::Ok(Answer::Challenge { challenge }) = phone
        .request(
            13,
            RequestBody::Challenge {
                purpose: ChallengePurpose::Login { hsid },
            },
        )
        .await
    else {
        panic!("a challenge")
    };
    let verify = |attestation: Vec<u8>| RequestBody::VerifySecondFactor {
        hsid,
        attestation: Blob(attestation),
    };
    let refusals = [
        (
            "untrusted key",
            untrusted.attest(app_instance, challenge.0, thumbprint, now, 2),
        ),
        (
            "another challenge",
            sfs.attest(app_instance, [9; 32], thumbprint, now, 3),
        ),
        (
            "another account key",
            sfs.attest(app_instance, challenge.0, [9; 32], now, 4),
        ),
        (
            "another app instance",
            sfs.attest([9; 16], challenge.0, thumbprint, now, 5),
        ),
        (
            "expired",
            sfs.attest(app_instance, challenge.0, thumbprint, now - 120_000, 6),
        ),
        (
            "not yet valid",
            sfs.attest(app_instance, challenge.0, thumbprint, now + 120_000, 7),
        ),
        ("the upgrade's, replayed", upgrade.clone()),
        ("not COSE", b"\xa0".to_vec()),
    ];
    for (what, attestation) in refusals {
        let outcome = phone.request(20, verify(attestation)).await;
        assert_eq!(
            code(&outcome),
            Some(ErrorCode::BadAttestation),
            "{what}: {outcome:?}"
        );
    }
    let good = sfs.attest(app_instance, challenge.0, thumbprint, now, 8);
    assert_eq!(
        phone.request(21, verify(good.clone())).await,
        Outcome::Ok(Answer::Done)
    );
    assert!(matches!(
        phone.request(22, RequestBody::LogIn { hsid }).await,
        Outcome::Ok(Answer::LoggedIn { .. })
    ));
    assert_eq!(
        session_view(&api, &server, &token, 1).await["state"],
        "logged_in"
    );

    let hsid2 = session_challenge(2).await;
    let Outcome::Ok(Answer::Session(details)) =
        phone.request(30, RequestBody::Scan { hsid: hsid2 }).await
    else {
        panic!("scanned")
    };
    assert!(
        !details.second_factor_required,
        "a factor proven a moment ago stands in for this login"
    );
    assert!(matches!(
        phone
            .request(31, RequestBody::Confirm { hsid: hsid2 })
            .await,
        Outcome::Ok(_)
    ));
    let replay = RequestBody::VerifySecondFactor {
        hsid: hsid2,
        attestation: Blob(good),
    };
    let outcome = phone.request(32, replay).await;
    assert_eq!(
        code(&outcome),
        Some(ErrorCode::BadAttestation),
        "{outcome:?}"
    );
    assert!(matches!(
        phone.request(33, RequestBody::LogIn { hsid: hsid2 }).await,
        Outcome::Ok(Answer::LoggedIn { .. })
    ));
    let events = api.running.state.store().read_all(0, 10_000).await.unwrap();
    let reused = events
        .iter()
        .filter(|e| e.event_type == "session.second_factor_verified")
        .filter(|e| crate::api::payload_json(e)["reused"] == true)
        .count();
    assert_eq!(
        reused, 1,
        "the second login records that it reused the factor"
    );

    // Distrusted: a good attestation by that key is refused from then on.
    let key_id = trusted["key_id"].as_str().unwrap();
    let (status, _) = api
        .admin(
            Method::DELETE,
            &format!("/v1/servers/{server}/sfs-keys/{key_id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let Outcome::Ok(Answer::Challenge {
        challenge: upgrade_again,
    }) = phone
        .request(
            34,
            RequestBody::Challenge {
                purpose: ChallengePurpose::Upgrade,
            },
        )
        .await
    else {
        panic!("a challenge")
    };
    let outcome = phone
        .request(
            35,
            RequestBody::UpgradeAccount {
                attestation: Blob(sfs.attest(
                    app_instance,
                    upgrade_again.0,
                    thumbprint,
                    api.clock.now_ms(),
                    9,
                )),
            },
        )
        .await;
    assert_eq!(
        code(&outcome),
        Some(ErrorCode::BadAttestation),
        "{outcome:?}"
    );

    // Past the window the prompt is back.
    api.clock.advance_secs(301);
    let hsid3 = session_challenge(3).await;
    let Outcome::Ok(Answer::Session(details)) =
        phone.request(40, RequestBody::Scan { hsid: hsid3 }).await
    else {
        panic!("scanned")
    };
    assert!(details.second_factor_required);
    assert!(matches!(
        phone
            .request(41, RequestBody::Confirm { hsid: hsid3 })
            .await,
        Outcome::Ok(_)
    ));
    assert_eq!(
        code(&phone.request(42, RequestBody::LogIn { hsid: hsid3 }).await),
        Some(ErrorCode::SecondFactorRequired)
    );
    api.stop().await;
}

countersign_eventstore::on_both_backends!(
    biometric_login_and_account_upgrade,
    pin_enrolment_login_lockout_and_restart,
    the_server_checks_every_attestation,
);
