//! CIBA (OpenID Client-Initiated Backchannel Authentication Core 1.0) end to end over real
//! sockets: `countersign serve` with its Message Center delivering through the FCM stand-in,
//! a confidential client registered for CIBA through the business API, and the mobile SDK as
//! the phone approving (or declining) the push login. Poll mode: `authorization_pending`,
//! `slow_down`, then the tokens once; `access_denied` when declined; `expired_token` on the
//! server's fixed clock; an unknown user answered byte for byte as a user without a phone,
//! with nothing written. Ping mode: a notification endpoint on loopback receives the bearer
//! token and the `auth_req_id`.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use countersign_eventstore::testing::TestDb;
use countersign_message_center::standin::{FcmStandin, ReceivedPush};
use countersign_mobile_sdk::{NoCallbacks, Platform, PushAction, Sdk, SessionHandle, State};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::api::Api;
use crate::device::tenant;
use crate::push::{PushRig, enrolled_push_phone};

pub(crate) const WAIT: Duration = Duration::from_secs(20);

/// A served API whose MC delivers through the FCM stand-in, on the wall clock's time (the
/// push services judge expiry by it) but moved only by the test: a [`PushRig`] without APNs.
pub(crate) struct CibaRig {
    pub api: Api,
    pub fcm: FcmStandin,
    _dir: tempfile::TempDir,
}

impl CibaRig {
    pub(crate) async fn start(db: &TestDb) -> Self {
        let PushRig { api, fcm, dir, .. } = PushRig::start(db, false).await;
        Self {
            api,
            fcm,
            _dir: dir,
        }
    }

    /// A server (no second factor, continuous sessions pinged every `ping_secs`), its API
    /// key, and `userid` with a phone registered for push: (server, api token, phone, account).
    pub(crate) async fn tenant_with_phone(
        &self,
        userid: &str,
        push_token: &str,
        ping_secs: u32,
    ) -> (String, String, Sdk, String) {
        let (server, token) = tenant(&self.api, "Bank", userid).await;
        let (status, body) = self
            .api
            .admin(
                Method::PATCH,
                &format!("/v1/servers/{server}"),
                Some(json!({"default_ping_time_secs": ping_secs})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (phone, account) = self.phone_for(&server, &token, userid, push_token).await;
        (server, token, phone, account)
    }

    /// Enrols a new phone for `userid` and registers it for push with `push_token`.
    pub(crate) async fn phone_for(
        &self,
        server: &str,
        token: &str,
        userid: &str,
        push_token: &str,
    ) -> (Sdk, String) {
        enrolled_push_phone(&self.api, server, token, userid, Platform::Fcm, push_token).await
    }

    /// Registers a confidential client; answers (client_id, client_secret).
    pub(crate) async fn client(
        &self,
        server: &str,
        token: &str,
        settings: Value,
    ) -> (String, String) {
        let mut body = json!({
            "name": "Bank web",
            "type": "confidential",
            "redirect_uris": ["https://rp.example/cb"],
            "scopes": ["openid", "profile", "offline_access"],
        });
        for (key, value) in settings.as_object().unwrap() {
            body[key] = value.clone();
        }
        let (status, created) = self
            .api
            .call(
                Method::POST,
                &format!("/v1/servers/{server}/oidc/clients"),
                Some(token),
                Some(body),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        (
            created["client_id"].as_str().unwrap().to_owned(),
            created["client_secret"].as_str().unwrap().to_owned(),
        )
    }

    /// Registers a confidential client for CIBA in poll mode; answers (client_id,
    /// client_secret).
    pub(crate) async fn poll_client(&self, server: &str, token: &str) -> (String, String) {
        self.client(
            server,
            token,
            json!({"ciba": {"mode": "poll", "notification_endpoint": null}}),
        )
        .await
    }

    /// A form POST to an IdP endpoint with `client_secret_basic`: (status, raw body).
    pub(crate) async fn form(
        &self,
        path: &str,
        client: (&str, &str),
        pairs: &[(&str, &str)],
    ) -> (StatusCode, Vec<u8>, reqwest::header::HeaderMap) {
        let mut encoded = reqwest::Url::parse("http://form.invalid/").unwrap();
        encoded.query_pairs_mut().extend_pairs(pairs);
        let response = self
            .api
            .http
            .post(self.api.url(path))
            .basic_auth(client.0, Some(client.1))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(encoded.query().unwrap_or_default().to_owned())
            .send()
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        (status, response.bytes().await.unwrap().to_vec(), headers)
    }

    /// `bc-authorize` for `userid`: (status, JSON).
    pub(crate) async fn bc_authorize(
        &self,
        server: &str,
        client: (&str, &str),
        extra: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let (status, body, _) = self
            .form(&format!("/oidc/{server}/bc-authorize"), client, extra)
            .await;
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    /// The token endpoint's CIBA grant: (status, JSON).
    pub(crate) async fn poll(
        &self,
        server: &str,
        client: (&str, &str),
        auth_req_id: &str,
    ) -> (StatusCode, Value) {
        let (status, body, headers) = self
            .form(
                &format!("/oidc/{server}/token"),
                client,
                &[
                    ("grant_type", "urn:openid:params:grant-type:ciba"),
                    ("auth_req_id", auth_req_id),
                ],
            )
            .await;
        assert_eq!(
            headers.get("cache-control").and_then(|v| v.to_str().ok()),
            Some("no-store"),
            "token answers are not cached"
        );
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    pub(crate) async fn next_push(&self, token: &str) -> ReceivedPush {
        tokio::time::timeout(WAIT, self.fcm.next_push(token))
            .await
            .expect("no push reached the stand-in")
    }

    pub(crate) async fn stop(self) {
        self.api.stop().await;
    }
}

/// Hands a push to the phone; answers the login it starts and the announce text shown.
pub(crate) async fn push_login(phone: &Sdk, push: &ReceivedPush) -> SessionHandle {
    let bytes = serde_json::to_vec(&push.payload_json).unwrap();
    let PushAction::Login(login) = phone
        .process_push(&bytes, Arc::new(NoCallbacks))
        .await
        .unwrap()
    else {
        panic!("the push was not a login")
    };
    tokio::time::timeout(WAIT, login.wait_for(|s| s.state != State::Starting))
        .await
        .unwrap_or_else(|_| panic!("the login never reached the user: {:?}", login.snapshot()));
    login
}

/// The user approves with `account`; answers once the phone is logged in.
pub(crate) async fn approve(login: &SessionHandle, account: &str) {
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

/// Polls until the answer is no longer `authorization_pending`/`slow_down`, moving the
/// server's clock past the interval before each poll (no waiting in real time).
pub(crate) async fn poll_until_decided(
    rig: &CibaRig,
    server: &str,
    client: (&str, &str),
    auth_req_id: &str,
) -> (StatusCode, Value) {
    for _ in 0..200 {
        rig.api.clock.advance_secs(30);
        let (status, body) = rig.poll(server, client, auth_req_id).await;
        if status == StatusCode::BAD_REQUEST
            && matches!(
                body["error"].as_str(),
                Some("authorization_pending" | "slow_down")
            )
        {
            tokio::task::yield_now().await;
            continue;
        }
        return (status, body);
    }
    panic!("the CIBA request stayed pending")
}

/// Verifies an ES256 compact JWS against the server's JWKS; answers (header, payload).
pub(crate) async fn verify_jwt(api: &Api, server: &str, token: &str) -> (Value, Value) {
    use p256::ecdsa::signature::Verifier as _;
    let (status, jwks) = api
        .call(Method::GET, &format!("/oidc/{server}/jwks"), None, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{jwks}");
    let mut parts = token.split('.');
    let (header_b64, payload_b64, signature_b64) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    assert!(parts.next().is_none(), "a compact JWS has three parts");
    let header: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header_b64).unwrap()).unwrap();
    assert_eq!(header["alg"], "ES256", "{header}");
    let kid = header["kid"].as_str().unwrap();
    let key = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid)
        .unwrap_or_else(|| panic!("kid {kid} is not in the JWKS {jwks}"));
    assert_eq!(key["kty"], "EC");
    assert_eq!(key["crv"], "P-256");
    let x = URL_SAFE_NO_PAD.decode(key["x"].as_str().unwrap()).unwrap();
    let y = URL_SAFE_NO_PAD.decode(key["y"].as_str().unwrap()).unwrap();
    let sec1 = [&[4u8][..], &x, &y].concat();
    let verifying = p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1).unwrap();
    let signature =
        p256::ecdsa::Signature::from_slice(&URL_SAFE_NO_PAD.decode(signature_b64).unwrap())
            .unwrap();
    verifying
        .verify(format!("{header_b64}.{payload_b64}").as_bytes(), &signature)
        .expect("the signature verifies against the JWKS");
    let payload = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload_b64).unwrap()).unwrap();
    (header, payload)
}

/// The log's head.
async fn head(rig: &CibaRig) -> Option<u64> {
    rig.api.head().await
}

async fn poll_mode_pending_slow_down_then_tokens_once(db: &TestDb) {
    let rig = CibaRig::start(db).await;
    let (server, token, phone, account) = rig.tenant_with_phone("alice", "token-alice", 60).await;
    let (client_id, secret) = rig.poll_client(&server, &token).await;
    let client = (client_id.as_str(), secret.as_str());
    let (status, asked) = rig
        .bc_authorize(
            &server,
            client,
            &[
                ("scope", "openid profile"),
                ("login_hint", "alice"),
                ("binding_message", "Pay 12.00 to ACME? Code W4K"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{asked}");
    let auth_req_id = asked["auth_req_id"].as_str().unwrap().to_owned();
    assert_eq!(auth_req_id.len(), 64, "base64url(grant id ‖ secret)");
    assert_eq!(asked["interval"], 5);
    let expires_in = asked["expires_in"].as_i64().unwrap();
    assert!((1..=300).contains(&expires_in), "{asked}");
    // Pending, then polled again at once: slow down.
    let (status, pending) = rig.poll(&server, client, &auth_req_id).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(pending["error"], "authorization_pending", "{pending}");
    let (status, slow) = rig.poll(&server, client, &auth_req_id).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(slow["error"], "slow_down", "{slow}");
    // The interval is now 10 s: 6 s later is still too soon (and it grows to 15 s); 16 s
    // after that is fine.
    rig.api.clock.advance_secs(6);
    let (_, slow) = rig.poll(&server, client, &auth_req_id).await;
    assert_eq!(
        slow["error"], "slow_down",
        "the interval grew by 5 s: {slow}"
    );
    rig.api.clock.advance_secs(16);
    let (_, pending) = rig.poll(&server, client, &auth_req_id).await;
    assert_eq!(pending["error"], "authorization_pending", "{pending}");
    // The phone shows the binding message and approves.
    let push = rig.next_push("token-alice").await;
    let login = push_login(&phone, &push).await;
    assert_eq!(
        login.announce_info().as_deref(),
        Some("Pay 12.00 to ACME? Code W4K")
    );
    approve(&login, &account).await;
    let (status, tokens) = poll_until_decided(&rig, &server, client, &auth_req_id).await;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    assert_eq!(tokens["token_type"], "Bearer", "{tokens}");
    assert!(tokens["access_token"].is_string(), "{tokens}");
    let (_, claims) = verify_jwt(&rig.api, &server, tokens["id_token"].as_str().unwrap()).await;
    assert_eq!(claims["aud"], client_id.as_str());
    assert_eq!(claims["iss"], rig.api.url(&format!("/oidc/{server}")));
    assert!(claims["sub"].as_str().unwrap().len() >= 43, "{claims}");
    assert!(
        claims["amr"].as_array().unwrap().contains(&json!("hwk")),
        "{claims}"
    );
    // Once only.
    let (status, again) = rig.poll(&server, client, &auth_req_id).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(again["error"], "invalid_grant", "{again}");
    // Another client's secret cannot fetch it, nor can a forged id naming the grant.
    let (other_id, other_secret) = rig.poll_client(&server, &token).await;
    let (status, stolen) = rig
        .poll(&server, (&other_id, &other_secret), &auth_req_id)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(stolen["error"], "invalid_grant", "{stolen}");
    let mut forged = URL_SAFE_NO_PAD.decode(&auth_req_id).unwrap();
    forged[40] ^= 1;
    let (_, forged) = rig
        .poll(&server, client, &URL_SAFE_NO_PAD.encode(&forged))
        .await;
    assert_eq!(forged["error"], "invalid_grant", "{forged}");
    rig.stop().await;
}

async fn a_declined_push_is_access_denied(db: &TestDb) {
    let rig = CibaRig::start(db).await;
    let (server, token, phone, _account) = rig.tenant_with_phone("bob", "token-bob", 0).await;
    let (client_id, secret) = rig.poll_client(&server, &token).await;
    let client = (client_id.as_str(), secret.as_str());
    let (status, asked) = rig
        .bc_authorize(
            &server,
            client,
            &[("scope", "openid"), ("login_hint", "bob")],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{asked}");
    let auth_req_id = asked["auth_req_id"].as_str().unwrap();
    let push = rig.next_push("token-bob").await;
    let login = push_login(&phone, &push).await;
    login.stop_session().await.unwrap();
    let (status, denied) = poll_until_decided(&rig, &server, client, auth_req_id).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(denied["error"], "access_denied", "{denied}");
    rig.stop().await;
}

async fn an_unanswered_request_expires(db: &TestDb) {
    let rig = CibaRig::start(db).await;
    let (server, token, _phone, _account) = rig.tenant_with_phone("carol", "token-carol", 0).await;
    let (client_id, secret) = rig.poll_client(&server, &token).await;
    let client = (client_id.as_str(), secret.as_str());
    let (status, asked) = rig
        .bc_authorize(
            &server,
            client,
            &[
                ("scope", "openid"),
                ("login_hint", "carol"),
                ("requested_expiry", "30"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{asked}");
    assert_eq!(
        asked["expires_in"], 30,
        "requested_expiry shortens the request"
    );
    let auth_req_id = asked["auth_req_id"].as_str().unwrap();
    rig.api.clock.advance_secs(29);
    let (_, pending) = rig.poll(&server, client, auth_req_id).await;
    assert_eq!(pending["error"], "authorization_pending", "{pending}");
    rig.api.clock.advance_secs(1);
    let (status, expired) = rig.poll(&server, client, auth_req_id).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(expired["error"], "expired_token", "{expired}");
    rig.stop().await;
}

async fn unknown_users_and_users_without_a_phone_look_the_same(db: &TestDb) {
    let rig = CibaRig::start(db).await;
    let (server, token, _phone, _account) = rig.tenant_with_phone("dave", "token-dave", 0).await;
    // erin exists but has no phone; "nobody" does not exist; "bad\u{7}id" is no userid.
    let (status, body) = rig
        .api
        .call(
            Method::PUT,
            &format!("/v1/servers/{server}/users/erin"),
            Some(&token),
            Some(json!({"attributes": {"name": "Erin"}})),
        )
        .await;
    assert!(status.is_success(), "{body}");
    let (client_id, secret) = rig.poll_client(&server, &token).await;
    let client = (client_id.as_str(), secret.as_str());
    let path = format!("/oidc/{server}/bc-authorize");
    let ask = |userid: &'static str| {
        let rig = &rig;
        let path = path.clone();
        async move {
            rig.form(
                &path,
                client,
                &[("scope", "openid"), ("login_hint", userid)],
            )
            .await
        }
    };
    // Let the read models see erin before asking.
    let at = rig.api.head().await.unwrap();
    let (status, _) = rig
        .api
        .read(
            &format!("/v1/servers/{server}/users/erin"),
            Some(&token),
            at,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let before = head(&rig).await;
    let (no_phone_status, no_phone, _) = ask("erin").await;
    let (unknown_status, unknown, _) = ask("nobody").await;
    assert_eq!(no_phone_status, StatusCode::BAD_REQUEST);
    assert_eq!(unknown_status, no_phone_status);
    assert_eq!(
        unknown, no_phone,
        "the same bytes: userids cannot be probed"
    );
    let answer: Value = serde_json::from_slice(&unknown).unwrap();
    assert_eq!(answer["error"], "unknown_user_id", "{answer}");
    assert_eq!(head(&rig).await, before, "a refused request writes nothing");
    // The limiter counts unknown userids too: a fourth ask within the window is refused
    // for both alike (3 per user per window by default).
    for _ in 0..2 {
        assert_eq!(ask("nobody").await.1, no_phone);
        assert_eq!(ask("erin").await.1, no_phone);
    }
    let (limited_status, limited_unknown, _) = ask("nobody").await;
    let (_, limited_known, _) = ask("erin").await;
    assert_eq!(limited_status, StatusCode::FORBIDDEN);
    assert_eq!(limited_unknown, limited_known);
    let limited: Value = serde_json::from_slice(&limited_known).unwrap();
    assert_eq!(limited["error"], "access_denied", "{limited}");
    assert_eq!(head(&rig).await, before, "nothing written for any of them");
    // A client not registered for CIBA may not ask.
    let (plain_id, plain_secret) = rig.client(&server, &token, json!({})).await;
    // Registering that client was a write; nothing after it may be.
    let before = head(&rig).await;
    let (status, refused) = rig
        .bc_authorize(
            &server,
            (&plain_id, &plain_secret),
            &[("scope", "openid"), ("login_hint", "dave")],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(refused["error"], "unauthorized_client", "{refused}");
    // Malformed requests, each with the spec's code.
    let cases: [(&[(&str, &str)], &str); 5] = [
        (&[("login_hint", "dave")], "invalid_request"),
        (
            &[("scope", "profile"), ("login_hint", "dave")],
            "invalid_scope",
        ),
        (&[("scope", "openid")], "invalid_request"),
        (
            &[
                ("scope", "openid"),
                ("login_hint", "dave"),
                ("id_token_hint", "x"),
            ],
            "invalid_request",
        ),
        (
            &[
                ("scope", "openid"),
                ("login_hint", "dave"),
                ("binding_message", "line\nbreak"),
            ],
            "invalid_binding_message",
        ),
    ];
    for (pairs, code) in cases {
        let (status, answer) = rig.bc_authorize(&server, client, pairs).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{pairs:?}: {answer}");
        assert_eq!(answer["error"], code, "{pairs:?}: {answer}");
    }
    // A wrong secret is invalid_client, 401.
    let (status, answer) = rig
        .bc_authorize(
            &server,
            (client_id.as_str(), "not-the-secret"),
            &[("scope", "openid"), ("login_hint", "dave")],
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer["error"], "invalid_client", "{answer}");
    assert_eq!(head(&rig).await, before, "no refusal wrote anything");
    rig.stop().await;
}

/// A notification endpoint on loopback: every request's `Authorization` and JSON body.
pub(crate) struct Receiver {
    pub url: String,
    pub received: tokio::sync::mpsc::UnboundedReceiver<(Option<String>, String, Vec<u8>)>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Answers `statuses` in turn (then 200 for good); records every request (its
    /// Authorization header, content type, body).
    pub(crate) async fn start(statuses: Vec<u16>) -> Self {
        use axum::extract::State;
        use axum::http::HeaderMap;
        type Shared = Arc<(
            std::sync::Mutex<std::collections::VecDeque<u16>>,
            tokio::sync::mpsc::UnboundedSender<(Option<String>, String, Vec<u8>)>,
        )>;
        async fn take(
            State(shared): State<Shared>,
            headers: HeaderMap,
            body: axum::body::Bytes,
        ) -> axum::http::StatusCode {
            let get = |name: &str| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let _ = shared.1.send((
                get("authorization"),
                get("content-type").unwrap_or_default(),
                body.to_vec(),
            ));
            let status = shared.0.lock().unwrap().pop_front().unwrap_or(200);
            axum::http::StatusCode::from_u16(status).unwrap()
        }
        let (send, received) = tokio::sync::mpsc::unbounded_channel();
        let shared: Shared = Arc::new((std::sync::Mutex::new(statuses.into()), send));
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(take))
            .with_state(shared);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url,
            received,
            task,
        }
    }

    pub(crate) async fn next(&mut self) -> (Option<String>, String, Vec<u8>) {
        tokio::time::timeout(WAIT, self.received.recv())
            .await
            .expect("nothing reached the receiver")
            .unwrap()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn ping_mode_calls_the_notification_endpoint(db: &TestDb) {
    let rig = CibaRig::start(db).await;
    let (server, token, phone, account) = rig.tenant_with_phone("frank", "token-frank", 0).await;
    let mut hook = Receiver::start(Vec::new()).await;
    let (client_id, secret) = rig
        .client(
            &server,
            &token,
            json!({"ciba": {"mode": "ping", "notification_endpoint": hook.url}}),
        )
        .await;
    let client = (client_id.as_str(), secret.as_str());
    // Ping mode needs the client's notification token.
    let (status, refused) = rig
        .bc_authorize(
            &server,
            client,
            &[("scope", "openid"), ("login_hint", "frank")],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(refused["error"], "invalid_request", "{refused}");
    let notification_token = "8d67dc78-7faa-4d41-aabd-67707b37425a";
    let (status, asked) = rig
        .bc_authorize(
            &server,
            client,
            &[
                ("scope", "openid"),
                ("login_hint", "frank"),
                ("client_notification_token", notification_token),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{asked}");
    let auth_req_id = asked["auth_req_id"].as_str().unwrap().to_owned();
    let push = rig.next_push("token-frank").await;
    let login = push_login(&phone, &push).await;
    approve(&login, &account).await;
    let (authorization, content_type, body) = hook.next().await;
    assert_eq!(
        authorization.as_deref(),
        Some(format!("Bearer {notification_token}").as_str())
    );
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body, json!({"auth_req_id": auth_req_id}));
    // Then the client fetches the tokens (no slow_down for its first poll).
    let (status, tokens) = rig.poll(&server, client, &auth_req_id).await;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    assert!(tokens["id_token"].is_string(), "{tokens}");
    // The notification token is in no event of the log.
    let events = rig
        .api
        .running
        .state
        .store()
        .read_all(0, 1_000_000)
        .await
        .unwrap();
    let needle = notification_token.as_bytes();
    for event in &events {
        assert!(
            !event.payload.windows(needle.len()).any(|w| w == needle),
            "{} holds the notification token",
            event.event_type
        );
    }
    rig.stop().await;
}

countersign_eventstore::on_both_backends!(
    poll_mode_pending_slow_down_then_tokens_once,
    a_declined_push_is_access_denied,
    an_unanswered_request_expires,
    unknown_users_and_users_without_a_phone_look_the_same,
    ping_mode_calls_the_notification_endpoint,
);
