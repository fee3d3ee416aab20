//! Push login end to end over real sockets: `countersign serve` (business API, device gateway,
//! Message Center and the NS's push dispatch in one process), the FCM stand-in (HTTP/1.1 with
//! its OAuth token endpoint) and the APNs stand-in (HTTP/2 over TLS, a CA trusted by
//! configuration), and the mobile SDK as the phone: business provoke → NS → MC → stand-in →
//! phone → login. Also: the pull fallback, token drops and retries, what the stand-ins see,
//! and the provoke refusals.

use std::sync::Arc;
use std::time::Duration;

use countersign_eventstore::SharedStore;
use countersign_eventstore::testing::TestDb;
use countersign_message_center::standin::{ApnsStandin, Fault, FcmStandin, ReceivedPush};
use countersign_mobile_sdk::{
    HistoryStatus, McConfig, MemoryStorage, NoCallbacks, Platform, PushAction, Sdk, SdkConfig,
    SessionHandle, State,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::api::Api;
use crate::device::{enrol, enrolment_qr, nonce, open_session, session_view, tenant};

const WAIT: Duration = Duration::from_secs(20);
const APP_ID: &str = "com.example.bank";

/// A phone with `api`'s MC configured, on the server's clock.
pub(crate) async fn mc_phone(api: &Api) -> Sdk {
    let mc = McConfig::fetch(&api.url("/v1/mc")).await.unwrap();
    let config = SdkConfig {
        mc: Some(mc),
        ..SdkConfig::default()
    };
    let phone = Sdk::open(Arc::new(MemoryStorage::new()), config).unwrap();
    let clock = api.clock.clone();
    phone.set_clock(Arc::new(move || clock.now_ms())).unwrap();
    phone
}

/// Enrols a new phone for `userid` and registers it for push with `push_token`: (phone,
/// account).
pub(crate) async fn enrolled_push_phone(
    api: &Api,
    server: &str,
    api_token: &str,
    userid: &str,
    platform: Platform,
    push_token: &str,
) -> (Sdk, String) {
    let phone = mc_phone(api).await;
    let account = enrol(&phone, &enrolment_qr(api, server, api_token, userid).await).await;
    let registered = phone
        .register_push(platform, push_token, APP_ID)
        .await
        .unwrap();
    assert!(registered.failed.is_empty(), "{:?}", registered.failed);
    assert_eq!(registered.registered, vec![account.clone()]);
    (phone, account)
}

/// A served API whose MC delivers through the FCM stand-in (and the APNs one, when given), on
/// the wall clock's time but moved only by the test. The OIDC tests start theirs with it too.
pub(crate) struct PushRig {
    pub(crate) api: Api,
    pub(crate) fcm: FcmStandin,
    apns: Option<ApnsStandin>,
    /// Holds the stand-ins' credential files for as long as the server runs.
    pub(crate) dir: tempfile::TempDir,
}

impl PushRig {
    pub(crate) async fn start(db: &TestDb, with_apns: bool) -> Self {
        let fcm = FcmStandin::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let apns = if with_apns {
            Some(
                ApnsStandin::start(
                    "127.0.0.1:0".parse().unwrap(),
                    "127.0.0.1:0".parse().unwrap(),
                )
                .await
                .unwrap(),
            )
        } else {
            None
        };
        let dir = tempfile::tempdir().unwrap();
        let account = dir.path().join("fcm.json");
        std::fs::write(&account, fcm.service_account_json()).unwrap();
        let mut apns_files = None;
        if let Some(apns) = &apns {
            let key = dir.path().join("apns.p8");
            std::fs::write(&key, apns.signing_key_pem()).unwrap();
            let ca = dir.path().join("ca.pem");
            std::fs::write(&ca, apns.ca_pem()).unwrap();
            apns_files = Some((key, ca, apns.url(), apns.team_id(), apns.key_id()));
        }
        let fcm_url = fcm.url();
        let api = Api::start_tuned(db, move |args| {
            args.push.fcm_service_account = Some(account);
            args.push.fcm_url = fcm_url;
            if let Some((key, ca, url, team, key_id)) = apns_files {
                args.push.apns_key_file = Some(key);
                args.push.push_ca_file = Some(ca);
                args.push.apns_url = url;
                args.push.apns_team_id = team;
                args.push.apns_key_id = key_id;
                args.push.apns_topic = APP_ID.into();
            }
        })
        .await;
        // The MC, the push services and the phone judge expiry by the wall clock: run the
        // server's clock from now.
        #[allow(clippy::disallowed_methods)] // The wall clock the push services run on.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        api.clock.advance_secs((now - api.clock.now_ms()) / 1000);
        Self {
            api,
            fcm,
            apns,
            dir,
        }
    }

    /// A phone with this deployment's MC configured, on the server's clock.
    async fn phone(&self) -> Sdk {
        mc_phone(&self.api).await
    }

    /// Enrols a phone for `userid` and registers it for push with `token`.
    async fn enrolled_phone(
        &self,
        server: &str,
        api_token: &str,
        userid: &str,
        platform: Platform,
        push_token: &str,
    ) -> (Sdk, String) {
        enrolled_push_phone(&self.api, server, api_token, userid, platform, push_token).await
    }

    async fn next_push(&self, token: &str) -> ReceivedPush {
        let push = async {
            match &self.apns {
                Some(apns) if is_hex(token) => apns.next_push(token).await,
                _ => self.fcm.next_push(token).await,
            }
        };
        tokio::time::timeout(WAIT, push)
            .await
            .expect("no push reached the stand-in")
    }

    /// A provoke that sees every write before it (`min_position`).
    async fn provoke(&self, path: &str, api_token: &str, body: Value) -> (StatusCode, Value) {
        let head = self.api.head().await.unwrap_or(0);
        let joiner = if path.contains('?') { '&' } else { '?' };
        self.api
            .call(
                Method::POST,
                &format!("{path}{joiner}min_position={head}"),
                Some(api_token),
                Some(body),
            )
            .await
    }

    async fn stop(self) {
        self.api.stop().await;
    }
}

/// How many events of `event_type` the log holds.
async fn count_events(store: &SharedStore, event_type: &str) -> usize {
    store
        .read_all(0, 1_000_000)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.event_type == event_type)
        .count()
}

/// Waits until the log holds at least `count` events of `event_type`, looking again after
/// every commit the store hears of: this process's, and on PostgreSQL other processes' too
/// (their notifications). Another process's SQLite commits wake nobody, so for those it also
/// looks every `CROSS_PROCESS_LOOK` (the one case where a test cannot wait on the position).
async fn wait_for_events(store: &SharedStore, event_type: &str, count: usize, within: Duration) {
    const CROSS_PROCESS_LOOK: Duration = Duration::from_millis(100);
    let mut head = store.head();
    tokio::time::timeout(within, async {
        loop {
            head.borrow_and_update();
            if count_events(store, event_type).await >= count {
                return;
            }
            let _ = tokio::time::timeout(CROSS_PROCESS_LOOK, head.changed()).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("fewer than {count} {event_type} events"));
}

fn is_hex(token: &str) -> bool {
    token.len().is_multiple_of(2) && token.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Hands a stand-in's push to the phone; answers the login it starts.
async fn process(phone: &Sdk, push: &ReceivedPush) -> PushAction {
    let bytes = serde_json::to_vec(&push.payload_json).unwrap();
    phone
        .process_push(&bytes, Arc::new(NoCallbacks))
        .await
        .unwrap()
}

async fn log_in(login: &SessionHandle, account: &str) {
    login.set_account(Some(account)).await.unwrap();
    let done = tokio::time::timeout(
        WAIT,
        login.wait_for(|s| matches!(s.state, State::Active | State::Done | State::Error)),
    )
    .await
    .unwrap();
    assert!(
        matches!(done.state, State::Active | State::Done),
        "{done:?}"
    );
}

fn provoke_body(n: u8) -> Value {
    json!({"nonce": nonce(n), "announce_info": "Log in to the bank?", "ping_time_secs": 0})
}

async fn provoke_on_a_user_asks_both_phones_and_withdraws_the_other(db: &TestDb) {
    let rig = PushRig::start(db, false).await;
    let (server, token) = tenant(&rig.api, "Bank", "alice").await;
    let (first, first_account) = rig
        .enrolled_phone(&server, &token, "alice", Platform::Fcm, "token-first")
        .await;
    let (second, _second_account) = rig
        .enrolled_phone(&server, &token, "alice", Platform::Fcm, "token-second")
        .await;
    let (status, answer) = rig
        .provoke(
            &format!("/v1/servers/{server}/users/alice/provoke"),
            &token,
            provoke_body(1),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(answer["accounts"].as_array().unwrap().len(), 2);
    // A retry of the same provoke changes nothing and pushes nothing more.
    let (status, _) = rig
        .provoke(
            &format!("/v1/servers/{server}/users/alice/provoke"),
            &token,
            provoke_body(1),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let to_first = rig.next_push("token-first").await;
    let to_second = rig.next_push("token-second").await;
    let PushAction::Login(first_login) = process(&first, &to_first).await else {
        panic!("not a login")
    };
    let PushAction::Login(second_login) = process(&second, &to_second).await else {
        panic!("not a login")
    };
    log_in(&first_login, &first_account).await;
    let view = session_view(&rig.api, &server, &token, 1).await;
    assert_eq!(view["state"], "logged_in", "{view}");
    assert_eq!(view["account_id"], first_account.as_str());
    assert_eq!(view["userid"], "alice");
    // The other phone is told its request was withdrawn.
    let withdrawn = rig.next_push("token-second").await;
    let action = process(&second, &withdrawn).await;
    assert!(
        matches!(
            action,
            PushAction::SessionEnded {
                logged_out: false,
                ..
            }
        ),
        "{action:?}"
    );
    let ended = tokio::time::timeout(
        WAIT,
        second_login.wait_for(|s| matches!(s.state, State::Done | State::Error)),
    )
    .await
    .unwrap();
    assert_eq!(
        ended.history_status,
        Some(HistoryStatus::Aborted),
        "{ended:?}"
    );
    rig.stop().await;
}

async fn provoke_on_an_account_logs_in_through_apns(db: &TestDb) {
    let rig = PushRig::start(db, true).await;
    let (server, token) = tenant(&rig.api, "Bank", "bob").await;
    let apns_token = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
    let (phone, account) = rig
        .enrolled_phone(&server, &token, "bob", Platform::Apns, apns_token)
        .await;
    let (status, answer) = rig
        .provoke(
            &format!("/v1/servers/{server}/users/bob/accounts/{account}/provoke"),
            &token,
            provoke_body(2),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(answer["accounts"], json!([account]));
    let push = rig.next_push(apns_token).await;
    assert!(
        push.payload_json["aps"].is_object(),
        "{}",
        push.payload_json
    );
    let PushAction::Login(login) = process(&phone, &push).await else {
        panic!("not a login")
    };
    log_in(&login, &account).await;
    let view = session_view(&rig.api, &server, &token, 2).await;
    assert_eq!(view["state"], "logged_in", "{view}");
    assert_eq!(view["account_id"], account.as_str());
    rig.stop().await;
}

async fn provoke_on_a_session_asks_the_last_account_again(db: &TestDb) {
    let rig = PushRig::start(db, false).await;
    let (server, token) = tenant(&rig.api, "Bank", "carol").await;
    let (phone, account) = rig
        .enrolled_phone(&server, &token, "carol", Platform::Fcm, "token-carol")
        .await;
    let path = format!("/v1/servers/{server}/session/provoke");
    let provoke = |n: u8| {
        let api = &rig.api;
        let path = path.clone();
        let token = token.clone();
        async move {
            crate::api::session_call_at(
                &api.http,
                &api.base,
                Method::POST,
                &path,
                &token,
                &nonce(n),
                Some(json!({"announce_info": "Again?"})),
            )
            .await
        }
    };
    // A session nobody logged in to cannot be provoked: nothing is written.
    let link = open_session(&rig.api, &server, &token, 3, json!({"ping_time_secs": 0})).await;
    assert_eq!(
        session_view(&rig.api, &server, &token, 3).await["can_provoke"],
        false
    );
    let head = rig.api.head().await;
    let (status, problem) = provoke(3).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(problem["type"], "urn:countersign:problem:not-provokable");
    assert_eq!(
        rig.api.head().await,
        head,
        "a refused provoke writes nothing"
    );
    // After a one-shot login by QR, the session can be provoked: the same account is asked.
    let login = phone
        .start_session(link.as_bytes(), Arc::new(NoCallbacks))
        .await
        .unwrap();
    log_in(&login, &account).await;
    let view = session_view(&rig.api, &server, &token, 3).await;
    assert_eq!(view["state"], "logged_in", "{view}");
    assert_eq!(view["can_provoke"], true, "{view}");
    let (status, answer) = provoke(3).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["accounts"], json!([account]));
    let view = session_view(&rig.api, &server, &token, 3).await;
    assert_eq!(view["state"], "pending", "{view}");
    let push = rig.next_push("token-carol").await;
    let PushAction::Login(again) = process(&phone, &push).await else {
        panic!("not a login")
    };
    log_in(&again, &account).await;
    let view = session_view(&rig.api, &server, &token, 3).await;
    assert_eq!(view["state"], "logged_in", "{view}");
    rig.stop().await;
}

async fn a_dropped_push_is_pulled_and_runs_once(db: &TestDb) {
    let rig = PushRig::start(db, false).await;
    let (server, token) = tenant(&rig.api, "Bank", "dave").await;
    let (phone, account) = rig
        .enrolled_phone(&server, &token, "dave", Platform::Fcm, "token-dave")
        .await;
    // The stand-in answers success but never hands the push to the phone.
    rig.fcm.faults().inject(Some("token-dave"), Fault::Drop, 1);
    let store = rig.api.running.state.store().clone();
    let queued = count_events(&store, "mc.message_queued").await;
    let (status, _) = rig
        .provoke(
            &format!("/v1/servers/{server}/users/dave/provoke"),
            &token,
            provoke_body(4),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    // Once the MC has the message, the phone opens its main screen and pulls.
    wait_for_events(&store, "mc.message_queued", queued + 1, WAIT).await;
    let report = phone.pull_messages(Arc::new(NoCallbacks)).await.unwrap();
    assert_eq!(report.processed, 1);
    let Some(PushAction::Login(login)) = report.actions.into_iter().next() else {
        panic!("the pulled message was not a login")
    };
    log_in(&login, &account).await;
    // A second provoke is pushed and also pulled: it runs once.
    let (status, _) = rig
        .provoke(
            &format!("/v1/servers/{server}/users/dave/provoke"),
            &token,
            provoke_body(5),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let push = rig.next_push("token-dave").await;
    let PushAction::Login(second) = process(&phone, &push).await else {
        panic!("not a login")
    };
    let pulled = phone.pull_messages(Arc::new(NoCallbacks)).await.unwrap();
    assert_eq!(pulled.processed, 0, "{pulled:?}");
    let bytes = serde_json::to_vec(&push.payload_json).unwrap();
    assert!(
        phone
            .process_push(&bytes, Arc::new(NoCallbacks))
            .await
            .is_err(),
        "a message already run is refused"
    );
    log_in(&second, &account).await;
    rig.stop().await;
}

async fn unregistered_drops_the_token_and_unavailable_is_retried(db: &TestDb) {
    let rig = PushRig::start(db, false).await;
    let (server, token) = tenant(&rig.api, "Bank", "erin").await;
    let (phone, _account) = rig
        .enrolled_phone(&server, &token, "erin", Platform::Fcm, "token-erin")
        .await;
    // 503 with Retry-After: retried, then delivered.
    rig.fcm.faults().inject(
        Some("token-erin"),
        Fault::Unavailable {
            retry_after_secs: Some(1),
        },
        1,
    );
    let (status, _) = rig
        .provoke(
            &format!("/v1/servers/{server}/users/erin/provoke"),
            &token,
            provoke_body(6),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    // The MC's clock is the test's: move it past Retry-After until the retry is sent.
    let push = tokio::time::timeout(WAIT, async {
        loop {
            rig.api.clock.advance_secs(1);
            if let Ok(push) =
                tokio::time::timeout(Duration::from_millis(300), rig.fcm.next_push("token-erin"))
                    .await
            {
                return push;
            }
        }
    })
    .await
    .expect("the retry never reached the stand-in");
    assert!(matches!(process(&phone, &push).await, PushAction::Login(_)));
    // UNREGISTERED: the token is dropped (an event), later messages wait in the mailbox.
    rig.fcm
        .faults()
        .inject(Some("token-erin"), Fault::Unregistered, 1);
    let received = rig.fcm.received_count();
    let (status, _) = rig
        .provoke(
            &format!("/v1/servers/{server}/users/erin/provoke"),
            &token,
            provoke_body(7),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let store = rig.api.running.state.store().clone();
    wait_for_events(&store, "mc.push_token_dropped", 1, WAIT).await;
    let queued = count_events(&store, "mc.message_queued").await;
    let (status, _) = rig
        .provoke(
            &format!("/v1/servers/{server}/users/erin/provoke"),
            &token,
            provoke_body(8),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    wait_for_events(&store, "mc.message_queued", queued + 1, WAIT).await;
    let pulled = phone
        .pull_messages(Arc::new(NoCallbacks))
        .await
        .unwrap()
        .processed;
    assert_eq!(pulled, 2, "both messages after the drop are pulled");
    assert_eq!(
        rig.fcm.received_count(),
        received,
        "nothing more was pushed to the dropped token"
    );
    rig.stop().await;
}

async fn the_push_services_see_nothing_readable(db: &TestDb) {
    let rig = PushRig::start(db, true).await;
    let (server, token) = tenant(&rig.api, "Bank", "frank.user@example.com").await;
    let fcm_token = "token-f1";
    let (phone, account) = rig
        .enrolled_phone(
            &server,
            &token,
            "frank.user@example.com",
            Platform::Fcm,
            fcm_token,
        )
        .await;
    let announce = "Pay Acme Widgets Ltd 1234.56 EUR";
    let (status, _) = rig
        .provoke(
            &format!("/v1/servers/{server}/users/frank.user@example.com/provoke"),
            &token,
            json!({"nonce": nonce(9), "announce_info": announce, "session_info": "Welcome back Frank"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let push = rig.next_push(fcm_token).await;
    let PushAction::Login(login) = process(&phone, &push).await else {
        panic!("not a login")
    };
    log_in(&login, &account).await;
    let (status, created) = rig
        .api
        .call(
            Method::POST,
            &format!("/v1/servers/{server}/transactions"),
            Some(&token),
            Some(json!({
                "userid": "frank.user@example.com",
                "text": "Transfer 999.99 EUR to Mallory Secretname",
                "data": "c2VjcmV0LXBheWxvYWQ=",
                "content_type": "text/plain",
            })),
        )
        .await;
    assert!(status.is_success(), "{created}");
    let tx = rig.next_push(fcm_token).await;
    assert!(
        matches!(process(&phone, &tx).await, PushAction::Transaction { .. }),
        "a transaction push"
    );
    let view = session_view(&rig.api, &server, &token, 9).await;
    assert_eq!(view["state"], "logged_in");
    // The session's hsid, from its stream's name.
    let events = rig
        .api
        .running
        .state
        .store()
        .read_all(0, 100_000)
        .await
        .unwrap();
    let prefix = format!("session-{server}-");
    let hsids: Vec<String> = events
        .iter()
        .filter_map(|e| e.stream.strip_prefix(&prefix).map(str::to_owned))
        .collect();
    assert!(!hsids.is_empty());
    let mut recorded = rig.fcm.recording().bytes();
    recorded.extend(rig.apns.as_ref().unwrap().recording().bytes());
    assert!(!recorded.is_empty());
    let text = String::from_utf8_lossy(&recorded).to_lowercase();
    use base64::Engine as _;
    let b64 = |s: &[u8]| {
        [
            base64::engine::general_purpose::STANDARD.encode(s),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s),
        ]
    };
    let mut needles: Vec<String> = vec![
        "frank".into(),
        "example.com".into(),
        "acme".into(),
        "mallory".into(),
        "welcome back".into(),
        "999.99".into(),
        account.to_lowercase(),
        server.to_lowercase(),
    ];
    let account_bytes = hex::decode(&account).unwrap();
    needles.extend(b64(&account_bytes).map(|s| s.to_lowercase()));
    needles.extend(b64(b"frank.user@example.com").map(|s| s.to_lowercase()));
    needles.extend(b64(announce.as_bytes()).map(|s| s.to_lowercase()));
    for hsid in &hsids {
        needles.push(hsid.to_lowercase());
        let bytes = hex::decode(hsid).unwrap();
        needles.extend(b64(&bytes).map(|s| s.to_lowercase()));
    }
    for needle in needles {
        assert!(
            !text.contains(&needle),
            "the push services saw {needle:?} in clear"
        );
    }
    rig.stop().await;
}

async fn provoke_refusals_write_nothing(db: &TestDb) {
    let rig = PushRig::start(db, false).await;
    let (server, token) = tenant(&rig.api, "Bank", "gina").await;
    let (other_server, other_token) = tenant(&rig.api, "Other", "gina").await;
    let (_phone, account) = rig
        .enrolled_phone(&server, &token, "gina", Platform::Fcm, "token-gina")
        .await;
    // Hank has an account whose app never registered for push.
    let (status, _) = rig
        .api
        .call(
            Method::PUT,
            &format!("/v1/servers/{server}/users/hank"),
            Some(&token),
            Some(json!({})),
        )
        .await;
    assert!(status.is_success());
    let hank_phone = rig.phone().await;
    let hank_account = enrol(
        &hank_phone,
        &enrolment_qr(&rig.api, &server, &token, "hank").await,
    )
    .await;
    let head = rig.api.head().await;
    // Reads below see every write so far.
    let (status, _) = rig
        .api
        .read(
            &format!("/v1/servers/{server}/users/hank/accounts"),
            Some(&token),
            head.unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let cases = [
        (
            format!("/v1/servers/{server}/users/nobody/provoke"),
            &token,
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            format!("/v1/servers/{server}/users/hank/provoke"),
            &token,
            StatusCode::CONFLICT,
            Some("urn:countersign:problem:not-provokable"),
        ),
        (
            format!("/v1/servers/{server}/users/hank/accounts/{hank_account}/provoke"),
            &token,
            StatusCode::CONFLICT,
            Some("urn:countersign:problem:not-provokable"),
        ),
        (
            format!("/v1/servers/{server}/users/hank/accounts/{account}/provoke"),
            &token,
            StatusCode::NOT_FOUND,
            None,
        ),
        // Another tenant's user and account: not found, whatever its key.
        (
            format!("/v1/servers/{other_server}/users/gina/provoke"),
            &other_token,
            StatusCode::CONFLICT,
            Some("urn:countersign:problem:not-provokable"),
        ),
        (
            format!("/v1/servers/{other_server}/users/gina/accounts/{account}/provoke"),
            &other_token,
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            format!("/v1/servers/{server}/users/gina/provoke"),
            &other_token,
            StatusCode::NOT_FOUND,
            None,
        ),
    ];
    for (n, (path, key, expected, kind)) in cases.iter().enumerate() {
        let (status, problem) = rig.provoke(path, key, provoke_body(20 + n as u8)).await;
        assert_eq!(status, *expected, "{path}: {problem}");
        if let Some(kind) = kind {
            assert_eq!(problem["type"], *kind, "{path}");
        }
    }
    // A weak nonce and a missing body are the caller's mistakes.
    let (status, _) = rig
        .provoke(
            &format!("/v1/servers/{server}/users/gina/provoke"),
            &token,
            json!({"nonce": "abcd"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(rig.api.head().await, head, "no refusal wrote anything");
    // Three push logins a minute per user, then 429 with nothing written.
    for n in 0..3 {
        let (status, body) = rig
            .provoke(
                &format!("/v1/servers/{server}/users/gina/provoke"),
                &token,
                provoke_body(40 + n),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (status, problem) = rig
        .provoke(
            &format!("/v1/servers/{server}/users/gina/provoke"),
            &token,
            provoke_body(50),
        )
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{problem}");
    assert_eq!(problem["type"], "urn:countersign:problem:provoke-limited");
    // No session was opened (the MC's delivery events of the first three move the head, so
    // look at the session itself).
    let (status, _) = crate::api::session_call_at(
        &rig.api.http,
        &rig.api.base,
        Method::GET,
        &format!("/v1/servers/{server}/session"),
        &token,
        &nonce(50),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    rig.stop().await;
}

/// `countersign serve` as a child process on `db`, its MC delivering through `fcm`.
struct Served {
    child: tokio::process::Child,
    base: String,
}

async fn serve_child(db: &TestDb, dir: &std::path::Path, fcm: &FcmStandin, listen: &str) -> Served {
    use tokio::io::AsyncBufReadExt as _;
    let account = dir.join("fcm.json");
    std::fs::write(&account, fcm.service_account_json()).unwrap();
    let master = dir.join("master.key");
    std::fs::write(&master, "22".repeat(32)).unwrap();
    let admin = dir.join("admin.key");
    std::fs::write(&admin, crate::api::ADMIN_KEY).unwrap();
    let mut child = tokio::process::Command::new(crate::binary::binary())
        .args(["serve", "--listen", listen, "--database-url", db.url()])
        .arg("--master-key-file")
        .arg(&master)
        .arg("--admin-key-file")
        .arg(&admin)
        .arg("--fcm-service-account")
        .arg(&account)
        .args(["--fcm-url", &fcm.url()])
        .env_remove("COUNTERSIGN_CONFIG")
        .env_remove("COUNTERSIGN_ADMIN_KEY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    tokio::io::BufReader::new(stdout)
        .read_line(&mut line)
        .await
        .unwrap();
    let base = line
        .trim()
        .strip_prefix("countersign serve: listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    Served { child, base }
}

/// The message id inside a stand-in's push (the envelope's, base64url in `cs`).
fn message_id_of(push: &ReceivedPush) -> [u8; 16] {
    use base64::Engine as _;
    let cs = push.payload_json["cs"].as_str().unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cs.trim_end_matches('='))
        .unwrap();
    countersign_protocol::push::decode_envelope(&bytes)
        .unwrap()
        .message_id
}

async fn a_killed_message_center_loses_and_repeats_nothing(db: &TestDb) {
    const PER_PHONE: usize = 500;
    let fcm = FcmStandin::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    // The push service is down: everything queues, retried every few seconds.
    fcm.faults().inject(
        None,
        Fault::Unavailable {
            retry_after_secs: Some(3),
        },
        200_000,
    );
    let dir = tempfile::tempdir().unwrap();
    let served = serve_child(db, dir.path(), &fcm, "127.0.0.1:0").await;
    let http = reqwest::Client::new();
    let call = |method: Method, path: String, key: String, body: Value| {
        let http = http.clone();
        let base = served.base.clone();
        async move {
            let answer = http
                .request(method, format!("{base}{path}"))
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = answer.status();
            (status, answer.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let admin = crate::api::ADMIN_KEY.to_owned();
    let (_, created) = call(
        Method::POST,
        "/v1/servers".into(),
        admin.clone(),
        json!({"name": "Bank"}),
    )
    .await;
    let server = created["server"]["server_id"].as_str().unwrap().to_owned();
    call(
        Method::PATCH,
        format!("/v1/servers/{server}"),
        admin.clone(),
        json!({"second_factor": "none"}),
    )
    .await;
    let (_, key) = call(
        Method::POST,
        format!("/v1/servers/{server}/api-keys"),
        admin,
        json!({"label": "b"}),
    )
    .await;
    let token = key["token"].as_str().unwrap().to_owned();
    let mc = McConfig::fetch(&format!("{}/v1/mc", served.base))
        .await
        .unwrap();
    let mut phones = Vec::new();
    for (userid, push_token) in [("ida", "token-ida"), ("jon", "token-jon")] {
        let (status, _) = call(
            Method::PUT,
            format!("/v1/servers/{server}/users/{userid}"),
            token.clone(),
            json!({}),
        )
        .await;
        assert!(status.is_success());
        let (_, enrolment) = call(
            Method::POST,
            format!("/v1/servers/{server}/enrolments"),
            token.clone(),
            json!({"userid": userid}),
        )
        .await;
        let phone = Sdk::open(
            Arc::new(MemoryStorage::new()),
            SdkConfig {
                mc: Some(mc.clone()),
                ..SdkConfig::default()
            },
        )
        .unwrap();
        enrol(&phone, enrolment["qr"]["base64url"].as_str().unwrap()).await;
        let registered = phone
            .register_push(Platform::Fcm, push_token, APP_ID)
            .await
            .unwrap();
        assert!(registered.failed.is_empty(), "{:?}", registered.failed);
        phones.push((userid, push_token, phone));
    }
    // 1,000 transactions waiting to be signed, each pushed to its user's phone.
    use futures::StreamExt as _;
    let created: Vec<StatusCode> = futures::stream::iter(0..2 * PER_PHONE)
        .map(|n| {
            let userid = phones[n % 2].0;
            call(
                Method::POST,
                format!("/v1/servers/{server}/transactions"),
                token.clone(),
                json!({"userid": userid, "data": "AAEC", "content_type": "application/octet-stream",
                       "text": format!("Payment {n}"), "timeout_secs": 3600}),
            )
        })
        .buffer_unordered(16)
        .map(|(status, _)| status)
        .collect()
        .await;
    assert!(created.iter().all(|s| *s == StatusCode::CREATED));
    let store = db.second_instance().await;
    wait_for_events(
        &store,
        "mc.message_queued",
        2 * PER_PHONE,
        Duration::from_secs(300),
    )
    .await;
    assert_eq!(
        fcm.received_count(),
        0,
        "nothing was delivered before the kill"
    );
    // SIGKILL with everything queued, then the push service recovers and the server restarts.
    let port = served.base.rsplit(':').next().unwrap().to_owned();
    let mut child = served.child;
    child.kill().await.unwrap();
    fcm.faults().clear();
    let restarted = serve_child(db, dir.path(), &fcm, &format!("127.0.0.1:{port}")).await;
    // Every push as it reaches each phone's inbox, until each phone has every message.
    let mut seen = std::collections::HashMap::<&str, std::collections::HashSet<[u8; 16]>>::new();
    tokio::time::timeout(Duration::from_secs(120), async {
        for (_, push_token, _) in &phones {
            let ids = seen.entry(push_token).or_default();
            while ids.len() < PER_PHONE {
                ids.insert(message_id_of(&fcm.next_push(push_token).await));
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "not every message was delivered: {:?}",
            seen.values().map(|s| s.len()).collect::<Vec<_>>()
        )
    });
    // Each phone runs each message once, however often it was pushed.
    for (_, push_token, phone) in &phones {
        let pushes = fcm.pushes(push_token);
        let mut ran = 0;
        for push in &pushes {
            let bytes = serde_json::to_vec(&push.payload_json).unwrap();
            if phone
                .process_push(&bytes, Arc::new(NoCallbacks))
                .await
                .is_ok()
            {
                ran += 1;
            }
        }
        assert_eq!(ran, PER_PHONE, "{push_token}: {} pushes", pushes.len());
    }
    drop(restarted);
}

countersign_eventstore::on_both_backends!(
    provoke_on_a_user_asks_both_phones_and_withdraws_the_other,
    provoke_on_an_account_logs_in_through_apns,
    provoke_on_a_session_asks_the_last_account_again,
    a_dropped_push_is_pulled_and_runs_once,
    unregistered_drops_the_token_and_unavailable_is_retried,
    the_push_services_see_nothing_readable,
    provoke_refusals_write_nothing,
    a_killed_message_center_loses_and_repeats_nothing,
);
