//! OpenID Connect Back-Channel Logout 1.0 end to end: a relying party's back-channel endpoint
//! on loopback receives a logout token when the phone logs out, and when the business side
//! ends the session; the token verifies against the issuer's JWKS and carries exactly the
//! claims the spec requires (no `nonce`). An endpoint that fails first (500) is retried with
//! backoff and then receives it. The logins come from CIBA (a push login the phone approves),
//! so the session is the phone's continuous session.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use countersign_domain::{Hsid, ServerId, SessionRef};
use countersign_eventstore::Metadata;
use countersign_eventstore::testing::TestDb;
use countersign_mobile_sdk::{SessionHandle, State};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::oidc_ciba::{
    CibaRig, Receiver, WAIT, approve, poll_until_decided, push_login, verify_jwt,
};

/// A CIBA login of `userid`'s phone for the client: (the phone's login, the ID token claims).
async fn logged_in(
    rig: &CibaRig,
    server: &str,
    client: (&str, &str),
    userid: &str,
    phone: &countersign_mobile_sdk::Sdk,
    account: &str,
    push_token: &str,
) -> (SessionHandle, Value) {
    let (status, asked) = rig
        .bc_authorize(
            server,
            client,
            &[("scope", "openid offline_access"), ("login_hint", userid)],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{asked}");
    let auth_req_id = asked["auth_req_id"].as_str().unwrap().to_owned();
    let push = rig.next_push(push_token).await;
    let login = push_login(phone, &push).await;
    approve(&login, account).await;
    assert_eq!(login.state(), State::Active, "a continuous session");
    let (status, tokens) = poll_until_decided(rig, server, client, &auth_req_id).await;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    let (_, id_token) = verify_jwt(&rig.api, server, tokens["id_token"].as_str().unwrap()).await;
    (login, id_token)
}

/// The logout token of a back-channel POST: checks the request's form and the token's
/// signature and claims; answers the claims.
async fn check_logout_token(
    rig: &CibaRig,
    server: &str,
    client_id: &str,
    id_token: &Value,
    request: (Option<String>, String, Vec<u8>),
) -> Value {
    let (_, content_type, body) = request;
    assert!(
        content_type.starts_with("application/x-www-form-urlencoded"),
        "{content_type}"
    );
    let form: Vec<(String, String)> = reqwest::Url::parse(&format!(
        "http://form.invalid/?{}",
        String::from_utf8(body).unwrap()
    ))
    .unwrap()
    .query_pairs()
    .map(|(k, v)| (k.into_owned(), v.into_owned()))
    .collect();
    assert_eq!(form.len(), 1, "{form:?}");
    assert_eq!(form[0].0, "logout_token");
    let (header, claims) = verify_jwt(&rig.api, server, &form[0].1).await;
    assert_eq!(header["typ"], "logout+jwt", "{header}");
    assert_eq!(
        claims["iss"],
        rig.api.url(&format!("/oidc/{server}")),
        "{claims}"
    );
    assert_eq!(claims["aud"], client_id, "{claims}");
    assert_eq!(claims["sub"], id_token["sub"], "{claims}");
    if id_token.get("sid").is_some() {
        assert_eq!(claims["sid"], id_token["sid"], "{claims}");
    }
    assert!(claims["sid"].is_string(), "{claims}");
    let iat = claims["iat"].as_i64().unwrap();
    assert_eq!(claims["exp"].as_i64().unwrap(), iat + 120, "{claims}");
    assert!(
        (iat - rig.api.clock.now_ms() / 1000).abs() <= 120,
        "{claims}"
    );
    assert!(
        claims["jti"].as_str().is_some_and(|j| j.len() >= 16),
        "{claims}"
    );
    assert_eq!(
        claims["events"],
        json!({"http://schemas.openid.net/event/backchannel-logout": {}}),
        "{claims}"
    );
    assert!(
        claims.get("nonce").is_none(),
        "a logout token has no nonce: {claims}"
    );
    claims
}

async fn the_phone_logging_out_reaches_the_rp(db: &TestDb) {
    let rig = CibaRig::start(db).await;
    let (server, token, phone, account) = rig.tenant_with_phone("alice", "token-alice", 60).await;
    let mut rp = Receiver::start(Vec::new()).await;
    let (client_id, secret) = rig
        .client(
            &server,
            &token,
            json!({"backchannel_logout_uri": rp.url,
                   "ciba": {"mode": "poll", "notification_endpoint": null}}),
        )
        .await;
    // A second client of the same server without a logout URI, and one that got no tokens
    // for this session: neither is sent anything.
    let (_quiet_id, _quiet_secret) = rig.poll_client(&server, &token).await;
    let client = (client_id.as_str(), secret.as_str());
    let (login, id_token) = logged_in(
        &rig,
        &server,
        client,
        "alice",
        &phone,
        &account,
        "token-alice",
    )
    .await;
    // The user logs out in the app.
    login.stop_session().await.unwrap();
    tokio::time::timeout(WAIT, login.wait_for(|s| s.state == State::Done))
        .await
        .unwrap();
    let request = rp.next().await;
    let claims = check_logout_token(&rig, &server, &client_id, &id_token, request).await;
    let sid = claims["sid"].as_str().unwrap();
    assert_eq!(
        URL_SAFE_NO_PAD.decode(sid).unwrap().len(),
        32,
        "sid is the session's hsid"
    );
    // Sent once (the follower's checkpoint moved past it).
    assert!(rp.received.try_recv().is_err(), "one logout token");
    rig.stop().await;
}

async fn the_business_side_ending_the_session_is_retried_until_delivered(db: &TestDb) {
    let rig = CibaRig::start(db).await;
    let (server, token, phone, account) = rig.tenant_with_phone("bob", "token-bob", 60).await;
    // The RP's endpoint fails once.
    let mut rp = Receiver::start(vec![500]).await;
    let (client_id, secret) = rig
        .client(
            &server,
            &token,
            json!({"backchannel_logout_uri": rp.url,
                   "ciba": {"mode": "poll", "notification_endpoint": null}}),
        )
        .await;
    let client = (client_id.as_str(), secret.as_str());
    let (_login, id_token) =
        logged_in(&rig, &server, client, "bob", &phone, &account, "token-bob").await;
    // The business system ends the session (what DELETE …/session and the IdP's
    // end_session endpoint do).
    let hsid: [u8; 32] = URL_SAFE_NO_PAD
        .decode(
            id_token["sid"]
                .as_str()
                .expect("the ID token names the session"),
        )
        .unwrap()
        .try_into()
        .unwrap();
    let session = SessionRef::new(
        ServerId::parse_hex(&server).unwrap(),
        Hsid::from_bytes(hsid),
    );
    let ended = rig
        .api
        .running
        .state
        .commands()
        .sessions
        .end_by_server(session, &Metadata::default())
        .await
        .unwrap();
    assert!(!ended.events.is_empty(), "the session was logged out");
    // The first attempt gets 500; the retry (after its backoff) gets the token.
    let first = rp.next().await;
    let first_claims = check_logout_token(&rig, &server, &client_id, &id_token, first).await;
    let again = rp.next().await;
    let claims = check_logout_token(&rig, &server, &client_id, &id_token, again).await;
    assert_ne!(
        claims["jti"], first_claims["jti"],
        "each attempt is a new token"
    );
    assert_eq!(claims["sid"], first_claims["sid"]);
    let metrics = rig.api.metrics().await;
    assert!(
        metrics.contains(r#"countersign_idp_deliveries_total{kind="logout",outcome="retry"} 1"#),
        "{metrics}"
    );
    // The delivered count is bumped right after the RP's answer: wait for it.
    let mut delivered = rig.api.running.idp.as_ref().unwrap().delivered();
    tokio::time::timeout(WAIT, delivered.wait_for(|n| *n >= 1))
        .await
        .expect("the delivery is never counted")
        .unwrap();
    let metrics = rig.api.metrics().await;
    assert!(
        metrics
            .contains(r#"countersign_idp_deliveries_total{kind="logout",outcome="delivered"} 1"#),
        "{metrics}"
    );
    rig.stop().await;
}

countersign_eventstore::on_both_backends!(
    the_phone_logging_out_reaches_the_rp,
    the_business_side_ending_the_session_is_retried_until_delivered,
);
