//! AppLogin end to end: `countersign serve` (business API, device gateway and SFS in one
//! process) on a loopback port, the mobile SDK with a PIN as the phone, and the app's backend
//! as an HTTP client reading the session with the web nonce the app handed it. The phone's
//! clock is the server's manual clock, so the inactivity timeout passes without sleeping.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use countersign_eventstore::testing::TestDb;
use countersign_mobile_sdk::{
    ChannelCallbacks, HistoryStatus, Interaction, MemoryStorage, Sdk, SdkConfig, SdkError,
    SecondFactor, SessionHandle, SessionKind, State,
};
use countersign_protocol::device::ErrorCode;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::api::{Api, next_state, session_call_at};
use crate::device::enrolment_qr;
use crate::leaks::{contains, encodings, logs, written};
use crate::second_factor::{enrolment_to_factor_prompt, phone_config, pin_tenant};
use crate::transactions_device::{PIN, enrol_with_pin};

const WAIT: Duration = Duration::from_secs(20);

/// A phone bound to the server's SFS, on the server's clock. Its AppLogins ping hourly, so
/// moving the clock past the inactivity timeout (the default 5 minutes) misses no ping.
async fn phone(api: &Api) -> Sdk {
    let config = SdkConfig {
        app_login_ping_time_secs: 3600,
        ..phone_config(api).await
    };
    let phone = Sdk::open(Arc::new(MemoryStorage::new()), config).unwrap();
    let clock = api.clock.clone();
    phone.set_clock(Arc::new(move || clock.now_ms())).unwrap();
    phone
}

/// An AppLogin with the PIN, up to logged in: the session and its web nonce.
async fn app_login(phone: &Sdk, account: Option<&str>) -> (SessionHandle, String) {
    let (callbacks, _events) = ChannelCallbacks::new();
    let login = phone.app_login(account, callbacks).await.unwrap();
    assert!(login.is_app_login());
    assert_eq!(login.snapshot().kind, SessionKind::AppLogin);
    assert_eq!(
        login.state(),
        State::UserInteraction(Interaction::WaitForSecondFactor),
        "straight to the second factor: no confirmation"
    );
    assert!(
        login.snapshot().web_nonce.is_none(),
        "no web nonce before the login"
    );
    login
        .set_pin_biometric(SecondFactor::pin(PIN))
        .await
        .unwrap();
    let active = tokio::time::timeout(WAIT, login.wait_for(|s| s.state == State::Active))
        .await
        .unwrap();
    assert_eq!(active.history_status, Some(HistoryStatus::LoggedIn));
    assert_eq!(active.ping_time_secs, Some(3600));
    let nonce = active.web_nonce.unwrap().expose().to_owned();
    (login, nonce)
}

/// The backend's read of the session its app's web nonce names, at `server` with `token`.
async fn backend_read(api: &Api, server: &str, token: &str, nonce: &str) -> (StatusCode, Value) {
    let head = api.head().await.unwrap();
    session_call_at(
        &api.http,
        &api.base,
        Method::GET,
        &format!("/v1/servers/{server}/session?min_position={head}"),
        token,
        nonce,
        None,
    )
    .await
}

/// The web nonce as the ways it could have leaked: its text, raw bytes, hex, standard base64.
fn forms(nonce: &str) -> Vec<Vec<u8>> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(nonce)
        .unwrap();
    assert_eq!(raw.len(), 32, "256 random bits");
    // The base64url form is the nonce itself.
    encodings(&raw)
}

/// No web nonce, in any form, in an event, a table or a log line.
async fn assert_never_written(api: &Api, db: &TestDb, nonces: &[String]) {
    let written = written(api, db).await;
    let logged = logs().0.lock().unwrap().clone();
    assert!(
        contains(&logged, b"app login opened"),
        "the log capture sees the gateway and the phone"
    );
    for nonce in nonces {
        for form in forms(nonce) {
            assert!(!contains(&written, &form), "a web nonce was stored");
            assert!(!contains(&logged, &form), "a web nonce was logged");
        }
    }
}

async fn an_app_login_with_a_pin_lets_the_backend_read_the_user_until_it_ends(db: &TestDb) {
    logs();
    let api = Api::start_with(db, None).await;
    let (server, token) = pin_tenant(&api, "ines").await;
    let phone = phone(&api).await;
    let account = enrol_with_pin(&api, &phone, &server, &token, "ines").await;

    // The app logs in with the PIN; its backend reads who it is with the web nonce.
    let (login, nonce) = app_login(&phone, None).await;
    let (status, view) = backend_read(&api, &server, &token, &nonce).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["state"], "logged_in", "{view}");
    assert_eq!(view["kind"], "app_login", "{view}");
    assert_eq!(view["userid"], "ines");
    assert_eq!(view["account_id"], account.as_str());
    assert_eq!(view["attributes"]["name"], "Ines");
    assert_eq!(view["continuous"], true);

    // The backend follows the session's events.
    let head = api.head().await.unwrap();
    let events = api
        .http
        .get(api.url(&format!(
            "/v1/servers/{server}/session/events?min_position={head}"
        )))
        .header("X-Nonce", &nonce)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), StatusCode::OK);
    let mut stream = events.bytes_stream();
    let mut buffer = String::new();
    assert_eq!(
        next_state(&mut stream, &mut buffer).await["state"],
        "logged_in"
    );

    // Activity keeps it: 200 s, a touch, 200 s more is 400 s since the login, 200 s idle.
    assert!(!login.check_inactivity().await.unwrap());
    api.clock.advance_secs(200);
    login.touch().unwrap();
    api.clock.advance_secs(200);
    assert!(
        !login.check_inactivity().await.unwrap(),
        "touched 200 s ago"
    );
    assert_eq!(login.state(), State::Active);
    let (_, view) = backend_read(&api, &server, &token, &nonce).await;
    assert_eq!(view["state"], "logged_in", "{view}");

    // Five minutes without activity log it out; the backend's stream hears it.
    api.clock.advance_secs(101);
    assert!(login.check_inactivity().await.unwrap());
    let done = login.snapshot();
    assert_eq!(done.state, State::Done);
    assert_eq!(done.history_status, Some(HistoryStatus::LoggedOut));
    assert!(
        done.web_nonce.is_none(),
        "the web nonce goes with the session"
    );
    assert_eq!(
        next_state(&mut stream, &mut buffer).await["state"],
        "logged_out"
    );
    let (_, view) = backend_read(&api, &server, &token, &nonce).await;
    assert_eq!(view["state"], "logged_out", "{view}");
    assert!(login.touch().is_err(), "an ended AppLogin takes no touch");

    // A second AppLogin, ended by the backend: the app hears it.
    let (second, second_nonce) = app_login(&phone, Some(&account)).await;
    assert_ne!(second_nonce, nonce, "a new web nonce each time");
    let (status, ended) = session_call_at(
        &api.http,
        &api.base,
        Method::DELETE,
        &format!("/v1/servers/{server}/session"),
        &token,
        &second_nonce,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{ended}");
    assert_eq!(ended["state"], "logged_out");
    let done = tokio::time::timeout(WAIT, second.wait_for(|s| s.state.is_final()))
        .await
        .expect("the backend's logout reaches the app");
    assert_eq!(done.state, State::Done);
    assert_eq!(done.history_status, Some(HistoryStatus::LoggedOut));

    // The app stops a third one itself.
    let (third, third_nonce) = app_login(&phone, None).await;
    third.stop_session().await.unwrap();
    assert_eq!(third.history_status(), Some(HistoryStatus::LoggedOut));
    let (_, view) = backend_read(&api, &server, &token, &third_nonce).await;
    assert_eq!(view["state"], "logged_out", "{view}");

    let history: Vec<_> = phone
        .history()
        .unwrap()
        .into_iter()
        .filter(|h| h.kind == SessionKind::AppLogin)
        .map(|h| h.status)
        .collect();
    assert_eq!(history, vec![HistoryStatus::LoggedOut; 3], "{history:?}");

    assert_never_written(&api, db, &[nonce, second_nonce, third_nonce]).await;
    api.stop().await;
}

async fn a_headless_account_is_refused_until_upgraded_and_a_nonce_reads_only_its_session(
    db: &TestDb,
) {
    logs();
    let api = Api::start_with(db, None).await;
    let (server, token) = pin_tenant(&api, "kim").await;
    let phone = phone(&api).await;

    // The user leaves the enrolment's second-factor step: a headless account.
    let qr = enrolment_qr(&api, &server, &token, "kim").await;
    let enrol = enrolment_to_factor_prompt(&phone, &qr).await;
    enrol.input_cancel().await.unwrap();
    let account = phone.accounts().unwrap()[0].clone();
    assert!(account.headless);
    let before = api.head().await;
    let refused = phone
        .app_login(None, Arc::new(countersign_mobile_sdk::NoCallbacks))
        .await;
    match &refused {
        Err(SdkError::Server(e)) => {
            assert_eq!(e.code, ErrorCode::NotAllowed);
            assert!(e.message.contains("upgrade"), "{}", e.message);
        }
        other => panic!("a headless account's AppLogin is refused: {other:?}"),
    }
    assert_eq!(
        api.head().await,
        before,
        "a refused AppLogin writes nothing"
    );
    assert!(
        !phone
            .history()
            .unwrap()
            .iter()
            .any(|h| h.kind == SessionKind::AppLogin),
        "no session was made"
    );

    // Upgraded with the PIN, the same account logs in to the app.
    phone
        .upgrade_account(&account.account_id, SecondFactor::pin(PIN))
        .await
        .unwrap();
    let (login, nonce) = app_login(&phone, None).await;
    let (status, view) = backend_read(&api, &server, &token, &nonce).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["userid"], "kim", "{view}");

    // Another server's backend, with its own key, finds nothing under that web nonce; nor
    // does a guess at this server; the two answers are the same.
    let (other, other_token) = api.tenant("Other bank").await;
    let (status, at_other) = backend_read(&api, &other, &other_token, &nonce).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{at_other}");
    let guess = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0x5a; 32]);
    let (status, guessed) = backend_read(&api, &server, &token, &guess).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{guessed}");
    assert_eq!(at_other, guessed, "unknown and foreign answer alike");
    // Nor may the other server's key read this server's sessions.
    let (status, _) = backend_read(&api, &server, &other_token, &nonce).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let before = api.head().await;
    backend_read(&api, &other, &other_token, &nonce).await;
    assert_eq!(api.head().await, before, "the refused reads wrote nothing");
    assert_eq!(login.state(), State::Active);

    login.stop_session().await.unwrap();
    assert_never_written(&api, db, &[nonce]).await;
    api.stop().await;
}

/// `countersign device app-login`, as a user runs it against `countersign serve` (a child
/// process on SQLite): the PIN asked straight away, the web nonce written to an owner-only
/// file and never printed, the backend reading the user with it, then logging it out, which
/// ends the command.
#[test]
fn the_virtual_phone_logs_in_to_the_app_until_the_backend_logs_it_out() {
    use std::io::BufRead as _;

    use crate::device_cli::{Served, device_command, device_ok, rest};

    let served = Served::start();
    let (server, token) = served.tenant_with("pin");
    let home = served.dir.path().join("phone");
    let enrolment = served.png(
        Method::POST,
        &format!("/v1/servers/{server}/enrolments?format=png"),
        &token,
        Some(serde_json::json!({"userid": "alice"})),
        "enrol.png",
    );
    device_ok(
        &home,
        &["enrol", enrolment.to_str().unwrap(), "--yes", "--pin", PIN],
        "",
    );
    let file = served.dir.path().join("web-nonce");
    let mut child = device_command(
        &home,
        &[
            "app-login",
            "--pin",
            PIN,
            "--web-nonce-file",
            file.to_str().unwrap(),
        ],
    )
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    loop {
        let Some(line) = lines.next() else {
            let _ = child.kill();
            panic!("app-login never logged in:\n{seen}");
        };
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("logged in to the app as ") {
            break;
        }
    }
    assert!(
        seen.contains("state: waiting for a second factor"),
        "{seen}"
    );
    assert!(seen.contains("second factor verified"), "{seen}");
    assert!(seen.contains("state: active (logged in)"), "{seen}");
    assert!(seen.contains("web nonce written to"), "{seen}");
    let nonce = std::fs::read_to_string(&file).unwrap();
    assert_eq!(nonce.len(), 43, "base64url of 32 bytes");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the web nonce file is the owner's alone");
    }

    let view = served.session_call(
        Method::GET,
        &format!("/v1/servers/{server}/session"),
        &token,
        &nonce,
        None,
    );
    assert_eq!(view["state"], "logged_in", "{view}");
    assert_eq!(view["kind"], "app_login", "{view}");
    assert_eq!(view["userid"], "alice");
    served.session_call(
        Method::DELETE,
        &format!("/v1/servers/{server}/session"),
        &token,
        &nonce,
        None,
    );
    let tail = rest(lines);
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{stderr}\n{seen}{tail}");
    assert!(tail.contains("state: done (logged out)"), "{tail}");
    assert!(tail.contains("session ended"), "{tail}");
    for output in [&seen, &tail, &stderr] {
        assert!(!output.contains(&nonce), "the web nonce was printed");
        assert!(!output.contains(PIN), "the PIN was printed");
    }
    let history = device_ok(&home, &["history"], "");
    assert!(
        history
            .lines()
            .any(|l| l.contains("app login") && l.ends_with("logged out")),
        "{history}"
    );
}

countersign_eventstore::on_both_backends!(
    an_app_login_with_a_pin_lets_the_backend_read_the_user_until_it_ends,
    a_headless_account_is_refused_until_upgraded_and_a_nonce_reads_only_its_session,
);
