//! An independent OpenID Connect client against the IdP: Authlib (tests/oidc/rp_authlib.py, a
//! Python relying party that knows countersign only through discovery and the login page's
//! HTML) does discovery, the code flow with PKCE, ID-token validation against the JWKS,
//! userinfo, refresh, introspection, revocation, RP-initiated logout and CIBA in poll mode,
//! against `countersign serve` on a loopback port (API, IdP, gateway, SFS and Message Center
//! in one process, pushing through the FCM stand-in). The phone is the mobile SDK with a PIN:
//! it logs in from the QR code the script took from the hosted page, and approves the CIBA
//! request the push brought it.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use countersign_eventstore::testing::TestDb;
use countersign_mobile_sdk::{
    HistoryStatus, Interaction, McConfig, MemoryStorage, NoCallbacks, Platform, PushAction, Sdk,
    SdkConfig, SecondFactor, SessionHandle, State,
};
use reqwest::{Method, StatusCode};
use serde_json::json;
use tokio::io::AsyncBufReadExt as _;

use crate::leaks::{contains, logs, written};
use crate::push::PushRig;
use crate::second_factor::{phone_config, pin_tenant};
use crate::transactions_device::{PIN, enrol_with_pin};

const WAIT: Duration = Duration::from_secs(30);
const APP_ID: &str = "com.example.bank";
const PUSH_TOKEN: &str = "fcm-token-ines";

/// Whether the Python side can run here; the script's imports are its dependencies.
fn python_ready() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import authlib, requests"])
        .status()
        .is_ok_and(|s| s.success())
}

/// Takes the phone through a login it was handed (scanned or pushed) with the PIN, up to
/// logged in.
async fn approve(login: &SessionHandle, account: &str) {
    if login.state() == State::UserInteraction(Interaction::WaitForConfirmation) {
        login.set_account(Some(account)).await.unwrap();
    }
    let asked = tokio::time::timeout(
        WAIT,
        login.wait_for(|s| {
            s.state == State::UserInteraction(Interaction::WaitForSecondFactor)
                || s.state.is_final()
        }),
    )
    .await
    .unwrap();
    assert_eq!(
        asked.state,
        State::UserInteraction(Interaction::WaitForSecondFactor),
        "{asked:?}"
    );
    login
        .set_pin_biometric(SecondFactor::pin(PIN))
        .await
        .unwrap();
    let done = tokio::time::timeout(
        WAIT,
        login.wait_for(|s| s.state == State::Active || s.state.is_final()),
    )
    .await
    .unwrap();
    assert!(
        matches!(done.state, State::Active | State::Done),
        "{done:?}"
    );
}

async fn authlib_runs_the_code_flow_refresh_logout_and_ciba(db: &TestDb) {
    logs();
    if !python_ready() {
        eprintln!(
            "skipped: python3 with authlib and requests is not installed (.ci/test installs them)"
        );
        return;
    }
    // Authlib judges the tokens' times by the wall clock: the rig runs the server's clock
    // from now.
    let PushRig { api, fcm, dir, .. } = PushRig::start(db, false).await;

    let (server, token) = pin_tenant(&api, "ines").await;
    let (status, body) = api
        .admin(
            Method::PATCH,
            &format!("/v1/servers/{server}"),
            Some(json!({"default_ping_time_secs": 60})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = api
        .call(
            Method::PUT,
            &format!("/v1/servers/{server}/users/ines"),
            Some(&token),
            Some(json!({"attributes": {"name": "Ines Duarte", "email": "ines@example.com"}})),
        )
        .await;
    assert!(status.is_success(), "{body}");

    let mc = McConfig::fetch(&api.url("/v1/mc")).await.unwrap();
    let config = SdkConfig {
        mc: Some(mc),
        ..phone_config(&api).await
    };
    let phone = Sdk::open(Arc::new(MemoryStorage::new()), config).unwrap();
    let clock = api.clock.clone();
    phone.set_clock(Arc::new(move || clock.now_ms())).unwrap();
    let account = enrol_with_pin(&api, &phone, &server, &token, "ines").await;
    let registered = phone
        .register_push(Platform::Fcm, PUSH_TOKEN, APP_ID)
        .await
        .unwrap();
    assert!(registered.failed.is_empty(), "{:?}", registered.failed);

    let redirect_uri = "http://127.0.0.1:9/oidc/callback";
    let post_logout = "http://127.0.0.1:9/logged-out";
    let (status, client) = api
        .call(
            Method::POST,
            &format!("/v1/servers/{server}/oidc/clients"),
            Some(&token),
            Some(json!({
                "name": "Online banking",
                "type": "confidential",
                "redirect_uris": [redirect_uri],
                "post_logout_redirect_uris": [post_logout],
                "scopes": ["openid", "profile", "email"],
                "ciba": {"mode": "poll"},
            })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{client}");
    let issuer = api.url(&format!("/oidc/{server}"));
    // The IdP's JSON endpoints are in the server's OpenAPI document.
    let (status, document) = api.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    for path in [
        "token",
        "userinfo",
        "introspect",
        "revoke",
        "bc-authorize",
        "jwks",
    ] {
        assert!(
            document["paths"][format!("/oidc/{{server_id}}/{path}")].is_object(),
            "{path} is not in /openapi.json"
        );
    }
    assert!(document["paths"]["/v1/servers/{server_id}/oidc/clients"].is_object());

    let mut rp = tokio::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/oidc/rp_authlib.py"))
        .args([
            issuer.as_str(),
            client["client_id"].as_str().unwrap(),
            client["client_secret"].as_str().unwrap(),
            redirect_uri,
            post_logout,
            "ines",
            dir.path().to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(rp.stdout.take().unwrap()).lines();
    let mut passed = Vec::new();
    let mut browser_login: Option<SessionHandle> = None;
    let mut ciba_login: Option<SessionHandle> = None;
    let finished = tokio::time::timeout(Duration::from_secs(180), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(path) = line.strip_prefix("QR ") {
                // The phone's camera reads the code the page showed.
                let png = std::fs::read(path).unwrap();
                let payload = countersign::device::read_qr_png(&png).unwrap();
                let login = phone
                    .start_session(&payload, Arc::new(NoCallbacks))
                    .await
                    .unwrap();
                approve(&login, &account).await;
                browser_login = Some(login);
            } else if let Some(message) = line.strip_prefix("CIBA ") {
                // Earlier pushes (the logout the RP asked for) come first.
                let login = loop {
                    let push = tokio::time::timeout(WAIT, fcm.next_push(PUSH_TOKEN))
                        .await
                        .expect("no login push reached the stand-in");
                    let bytes = serde_json::to_vec(&push.payload_json).unwrap();
                    if let PushAction::Login(login) = phone
                        .process_push(&bytes, Arc::new(NoCallbacks))
                        .await
                        .unwrap()
                    {
                        break login;
                    }
                };
                assert_eq!(
                    login.snapshot().announce_info.as_deref(),
                    Some(message),
                    "the phone does not show the binding message"
                );
                approve(&login, &account).await;
                ciba_login = Some(login);
            } else if let Some(check) = line.strip_prefix("OK ") {
                passed.push(check.to_owned());
            } else if line == "DONE" {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    let output = rp.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        finished && output.status.success(),
        "the relying party failed after {passed:?}: {stderr}"
    );
    assert_eq!(
        passed,
        [
            "discovery",
            "code-flow",
            "userinfo",
            "refresh",
            "revocation",
            "logout",
            "ciba"
        ]
    );
    // RP-initiated logout logged the phone's session out too.
    let login = browser_login.expect("the phone never logged in from the page");
    let ended = tokio::time::timeout(WAIT, login.wait_for(|s| s.state.is_final()))
        .await
        .expect("the phone's session did not end with the RP's logout");
    assert_eq!(ended.history_status, Some(HistoryStatus::LoggedOut));
    assert!(ciba_login.is_some());

    // No code, token, client secret, nonce, verifier or cookie the RP handled is in a log
    // line of this process (the server's and the phone's) or in anything the server wrote.
    // The OIDC nonce is the RP's own value, sent in the authorization URL, and must come back
    // verbatim in the ID token: the grant keeps it (never a log line).
    let seen: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("secrets.json")).unwrap()).unwrap();
    let secrets: Vec<&str> = seen["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(secrets.len() >= 10, "{} secrets", secrets.len());
    let logged = logs().text();
    let stored = written(&api, db).await;
    for secret in secrets {
        assert!(!logged.contains(secret), "a secret the RP holds was logged");
        if secret != seen["nonce"] {
            assert!(
                !contains(&stored, secret.as_bytes()),
                "a secret the RP holds was stored"
            );
        }
    }

    // The log says who got what: the grants' events.
    let events = api
        .running
        .state
        .store()
        .read_all(0, 1_000_000)
        .await
        .unwrap();
    for kind in [
        "grant.code_issued",
        "grant.tokens_issued",
        "grant.refreshed",
        "grant.revoked",
        "grant.ciba_requested",
    ] {
        assert!(
            events.iter().any(|e| e.event_type == kind),
            "no {kind} event in the log"
        );
    }
    api.stop().await;
}

countersign_eventstore::on_both_backends!(authlib_runs_the_code_flow_refresh_logout_and_ciba);
