//! `Idempotency-Key` on every endpoint that accepts it: the same request again answers the
//! first answer and writes nothing; another request under the same key (another body, path,
//! nonce or API key) answers 422 `idempotency-key-reused` and changes nothing.

use countersign_eventstore::testing::TestDb;
use countersign_protocol::qr::QrPayload;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::api::{ADMIN_KEY, Api};

const REUSED: &str = "urn:countersign:problem:idempotency-key-reused";

/// Sends a request with an optional idempotency key and session nonce header; answers
/// (status, JSON body or Null).
async fn send(
    api: &Api,
    method: Method,
    path: &str,
    token: &str,
    key: Option<&str>,
    nonce: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = api.http.request(method, api.url(path)).bearer_auth(token);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    if let Some(nonce) = nonce {
        request = request.header("X-Nonce", nonce);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let value: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or_default();
    if status == StatusCode::UNPROCESSABLE_ENTITY && value["type"] == REUSED {
        assert_eq!(content_type.as_deref(), Some("application/problem+json"));
        assert_eq!(value["status"], 422);
    }
    (status, value)
}

/// Asserts a refusal for reuse that wrote nothing.
async fn assert_reused(api: &Api, head: Option<u64>, (status, problem): (StatusCode, Value)) {
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert_eq!(problem["type"], REUSED, "{problem}");
    assert_eq!(api.head().await, head, "a reused key writes nothing");
}

async fn put_user_under_a_reused_key_is_refused(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    let user = |id: &str| format!("/v1/servers/{server}/users/{id}");
    let put = |path: String, token: String, body: Value| {
        let api = &api;
        async move {
            send(
                api,
                Method::PUT,
                &path,
                &token,
                Some("put-1"),
                None,
                Some(body),
            )
            .await
        }
    };

    // A malformed request is refused before its key is bound: the key stays usable.
    let (status, _) = put(user("dave"), token.clone(), json!({"attributes": 5})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    let (status, first) = put(
        user("dave"),
        token.clone(),
        json!({"attributes": {"a": "1"}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let head = api.head().await;
    let (status, again) = put(
        user("dave"),
        token.clone(),
        json!({"attributes": {"a": "1"}}),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "a replay answers the first answer"
    );
    assert_eq!(again, first);
    assert_eq!(api.head().await, head, "and writes nothing");

    let reused = put(
        user("dave"),
        token.clone(),
        json!({"attributes": {"a": "2"}}),
    )
    .await;
    assert!(
        !reused.1.to_string().contains("\"2\""),
        "the refusal echoes nothing of the body"
    );
    assert_reused(&api, head, reused).await;
    let (_, stored) = api.read(&user("dave"), Some(&token), head.unwrap()).await;
    assert_eq!(
        stored["attributes"],
        json!({"a": "1"}),
        "the value is unchanged"
    );

    // Another path (another user) under the key.
    let reused = put(
        user("erin"),
        token.clone(),
        json!({"attributes": {"a": "1"}}),
    )
    .await;
    assert_reused(&api, head, reused).await;
    let (status, _) = api.read(&user("erin"), Some(&token), head.unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "erin was never created");

    // The same request from another API key of the tenant.
    let (status, second) = api
        .admin(
            Method::POST,
            &format!("/v1/servers/{server}/api-keys"),
            Some(json!({"label": "other"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let head = api.head().await;
    let other = second["token"].as_str().unwrap().to_owned();
    let reused = put(user("dave"), other, json!({"attributes": {"a": "1"}})).await;
    assert_reused(&api, head, reused).await;

    // Another tenant's key of the same name is another key.
    let (b, token_b) = api.tenant("Other").await;
    let (status, _) = put(
        format!("/v1/servers/{b}/users/dave"),
        token_b,
        json!({"attributes": {"a": "2"}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    api.stop().await;
}

async fn enrolment_under_a_reused_key_is_refused(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    for userid in ["e1", "e2"] {
        let (status, _) = api
            .call(
                Method::PUT,
                &format!("/v1/servers/{server}/users/{userid}"),
                Some(&token),
                Some(json!({})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let path = format!("/v1/servers/{server}/enrolments");
    let enrol = |userid: &str| {
        send(
            &api,
            Method::POST,
            &path,
            &token,
            Some("enrol-1"),
            None,
            Some(json!({"userid": userid})),
        )
    };
    let (status, first) = enrol("e1").await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let head = api.head().await;
    let (status, again) = enrol("e1").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        again["qr"], first["qr"],
        "a replay answers the same QR code"
    );
    assert_eq!(again["enrolment_id"], first["enrolment_id"]);
    assert_eq!(api.head().await, head);

    let reused = enrol("e2").await;
    assert!(
        reused.1.get("qr").is_none() && reused.1.get("enrolment_id").is_none(),
        "e2's caller never receives e1's enrolment: {}",
        reused.1
    );
    assert!(
        !reused
            .1
            .to_string()
            .contains(first["qr"]["base64url"].as_str().unwrap())
    );
    assert_reused(&api, head, reused).await;

    // The QR code in any other format is refused alike.
    let (status, _) = send(
        &api,
        Method::POST,
        &format!("{path}?format=base64url"),
        &token,
        Some("enrol-1"),
        None,
        Some(json!({"userid": "e2"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(api.head().await, head);
    let token_in_qr = QrPayload::from_base64url(first["qr"]["base64url"].as_str().unwrap())
        .unwrap()
        .token;
    let (_, enrolment) = api
        .read(
            &format!("{path}/{}", first["enrolment_id"].as_str().unwrap()),
            Some(&token),
            head.unwrap(),
        )
        .await;
    assert_eq!(enrolment["state"], "pending");
    assert_ne!(token_in_qr, [0; 32]);
    api.stop().await;
}

async fn session_under_a_reused_key_is_refused(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    let nonce = hex::encode([7u8; 16]);
    let other_nonce = hex::encode([8u8; 16]);
    let session = format!("/v1/servers/{server}/session");
    let open = |nonce: String, body: Value| {
        let (api, session, token) = (&api, &session, &token);
        async move {
            send(
                api,
                Method::PUT,
                session,
                token,
                Some("open-1"),
                Some(&nonce),
                Some(body),
            )
            .await
        }
    };
    let (status, first) = open(nonce.clone(), json!({"ping_time_secs": 0})).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let head = api.head().await;
    let (status, again) = open(nonce.clone(), json!({"ping_time_secs": 0})).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "a replay answers the first answer"
    );
    assert_eq!(again, first);
    assert_eq!(api.head().await, head);

    let reused = open(nonce.clone(), json!({"ping_time_secs": 30})).await;
    assert_reused(&api, head, reused).await;
    let read = send(
        &api,
        Method::GET,
        &format!("{session}?min_position={}", head.unwrap()),
        &token,
        None,
        Some(&nonce),
        None,
    )
    .await;
    assert_eq!(read.0, StatusCode::OK);
    assert_eq!(read.1["continuous"], false, "the options are unchanged");

    // Another session (another nonce) under the key.
    let reused = open(other_nonce.clone(), json!({"ping_time_secs": 0})).await;
    assert_reused(&api, head, reused).await;
    let (status, _) = send(
        &api,
        Method::GET,
        &format!("{session}?min_position={}", head.unwrap()),
        &token,
        None,
        Some(&other_nonce),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no session was opened");

    // The path form under another key: its own binding, replayed alike.
    let path = format!("/v1/servers/{server}/sessions/{other_nonce}");
    let by_path = |body: Value| {
        send(
            &api,
            Method::PUT,
            &path,
            &token,
            Some("open-2"),
            None,
            Some(body),
        )
    };
    let (status, first) = by_path(json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
    let head = api.head().await;
    let (_, again) = by_path(json!({})).await;
    assert_eq!(again, first);
    assert_reused(&api, head, by_path(json!({"session_info": "Hi"})).await).await;
    api.stop().await;
}

async fn admin_writes_under_a_reused_key_are_refused(db: &TestDb) {
    let api = Api::start(db).await;
    let admin = |method: Method, path: String, key: &'static str, body: Value| {
        let api = &api;
        async move { send(api, method, &path, ADMIN_KEY, Some(key), None, Some(body)).await }
    };

    let (status, first) = admin(
        Method::POST,
        "/v1/servers".into(),
        "srv-1",
        json!({"name": "One"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let head = api.head().await;
    let (_, again) = admin(
        Method::POST,
        "/v1/servers".into(),
        "srv-1",
        json!({"name": "One"}),
    )
    .await;
    assert_eq!(again, first, "a replay answers the same server");
    assert_eq!(api.head().await, head);
    let reused = admin(
        Method::POST,
        "/v1/servers".into(),
        "srv-1",
        json!({"name": "Two"}),
    )
    .await;
    assert_reused(&api, head, reused).await;
    let (_, servers) = api.admin(Method::GET, "/v1/servers", None).await;
    assert_eq!(
        servers["servers"].as_array().unwrap().len(),
        1,
        "no second server"
    );
    let server = first["server"]["server_id"].as_str().unwrap().to_owned();
    let at = format!("/v1/servers/{server}");

    let (status, renamed) = admin(
        Method::PATCH,
        at.clone(),
        "patch-1",
        json!({"name": "Renamed"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{renamed}");
    let head = api.head().await;
    let (_, again) = admin(
        Method::PATCH,
        at.clone(),
        "patch-1",
        json!({"name": "Renamed"}),
    )
    .await;
    assert_eq!(again, renamed);
    assert_eq!(api.head().await, head);
    let reused = admin(
        Method::PATCH,
        at.clone(),
        "patch-1",
        json!({"name": "Other"}),
    )
    .await;
    assert_reused(&api, head, reused).await;
    // Absent and null are different requests (null removes the logo).
    let reused = admin(
        Method::PATCH,
        at.clone(),
        "patch-1",
        json!({"name": "Renamed", "logo_url": null}),
    )
    .await;
    assert_reused(&api, head, reused).await;
    // A key used for one route is not reusable on another.
    let reused = admin(
        Method::POST,
        "/v1/servers".into(),
        "patch-1",
        json!({"name": "Renamed"}),
    )
    .await;
    assert_reused(&api, head, reused).await;
    let (_, read) = api.admin(Method::GET, &at, None).await;
    assert_eq!(read["name"], "Renamed");

    let keys = format!("{at}/api-keys");
    let (status, issued) =
        admin(Method::POST, keys.clone(), "issue-1", json!({"label": "a"})).await;
    assert_eq!(status, StatusCode::CREATED, "{issued}");
    let head = api.head().await;
    let (_, again) = admin(Method::POST, keys.clone(), "issue-1", json!({"label": "a"})).await;
    assert_eq!(
        again["token"], issued["token"],
        "a replay answers the same token"
    );
    assert_eq!(api.head().await, head);
    let reused = admin(Method::POST, keys.clone(), "issue-1", json!({"label": "b"})).await;
    assert!(
        reused.1.get("token").is_none(),
        "no token for the other request"
    );
    assert_reused(&api, head, reused).await;
    let (_, list) = api.admin(Method::GET, &keys, None).await;
    assert_eq!(
        list["api_keys"].as_array().unwrap().len(),
        1,
        "no second key"
    );
    api.stop().await;
}

countersign_eventstore::on_both_backends!(
    put_user_under_a_reused_key_is_refused,
    enrolment_under_a_reused_key_is_refused,
    session_under_a_reused_key_is_refused,
    admin_writes_under_a_reused_key_are_refused,
);
