//! The session nonce in the `X-Nonce` header (`…/session`), the form to use, against the path
//! form (`…/sessions/{nonce}`), which keeps working: both name the same session, every call
//! (open, read, QR code, events, logout) answers alike in both, and the OpenAPI document shows
//! the header form with the path form deprecated.

use countersign_eventstore::Metadata;
use countersign_eventstore::testing::TestDb;
use countersign_protocol::qr::{QrKind, QrPayload};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::api::{Api, next_state, register_account};

/// A request to the header form, with the nonce in `X-Nonce`.
async fn by_header(
    api: &Api,
    method: Method,
    path: &str,
    token: &str,
    nonce: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = api
        .http
        .request(method, api.url(path))
        .bearer_auth(token)
        .header("X-Nonce", nonce);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or_default();
    (status, value)
}

async fn the_nonce_header_form_answers_every_session_call(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    let (status, _) = api
        .call(
            Method::PUT,
            &format!("/v1/servers/{server}/users/alice"),
            Some(&token),
            Some(json!({"attributes": {"name": "Alice"}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let account = register_account(&api, &server, "alice", 3).await;
    let nonce = hex::encode([0x5a; 16]);
    let session = format!("/v1/servers/{server}/session");
    let by_path = format!("/v1/servers/{server}/sessions/{nonce}");

    let (status, opened) = by_header(
        &api,
        Method::PUT,
        &session,
        &token,
        &nonce,
        Some(json!({"userid": "alice", "ping_time_secs": 0})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{opened}");
    assert_eq!(opened["state"], "pending");
    let payload = QrPayload::from_base64url(opened["qr"]["base64url"].as_str().unwrap()).unwrap();
    assert_eq!(payload.kind, QrKind::Login);
    let position = opened["position"].as_u64().unwrap();

    // The same session through both forms.
    let (status, read) = by_header(
        &api,
        Method::GET,
        &format!("{session}?min_position={position}"),
        &token,
        &nonce,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{read}");
    assert_eq!(read["state"], "pending");
    let (status, read_by_path) = api.read(&by_path, Some(&token), position).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(read_by_path, read, "both forms name the same session");
    let (status, again) = api
        .call(
            Method::PUT,
            &by_path,
            Some(&token),
            Some(json!({"userid": "alice", "ping_time_secs": 0})),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "open already, through the path form"
    );
    assert_eq!(again["qr"], opened["qr"]);

    let (status, qr) = by_header(
        &api,
        Method::GET,
        &format!("{session}/qr"),
        &token,
        &nonce,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(qr, opened["qr"]);
    let (_, qr_by_path) = api
        .call(Method::GET, &format!("{by_path}/qr"), Some(&token), None)
        .await;
    assert_eq!(qr_by_path, qr);

    let events = api
        .http
        .get(api.url(&format!("{session}/events")))
        .bearer_auth(&token)
        .header("X-Nonce", &nonce)
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), StatusCode::OK);
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let mut stream = events.bytes_stream();
    let mut buffer = String::new();
    assert_eq!(
        next_state(&mut stream, &mut buffer).await["state"],
        "pending"
    );

    let commands = api.running.state.commands();
    let session_ref = commands
        .sessions
        .session_ref(server.parse().unwrap(), &nonce)
        .await
        .unwrap();
    commands
        .sessions
        .scan(session_ref, &Metadata::default())
        .await
        .unwrap();
    assert_eq!(
        next_state(&mut stream, &mut buffer).await["state"],
        "scanned"
    );
    let alice = commands
        .users
        .user_ref(server.parse().unwrap(), "alice")
        .await
        .unwrap();
    let done = commands
        .sessions
        .log_in(session_ref, account, alice.digest, &Metadata::default())
        .await
        .unwrap();
    assert_eq!(
        next_state(&mut stream, &mut buffer).await["state"],
        "logged_in"
    );
    let (_, logged_in) = by_header(
        &api,
        Method::GET,
        &format!("{session}?min_position={}", done.position.unwrap()),
        &token,
        &nonce,
        None,
    )
    .await;
    assert_eq!(logged_in["state"], "logged_in");
    assert_eq!(logged_in["userid"], "alice");

    let (status, ended) = by_header(&api, Method::DELETE, &session, &token, &nonce, None).await;
    assert_eq!(status, StatusCode::OK, "{ended}");
    assert_eq!(ended["state"], "logged_out");
    let (_, after) = api.read(&by_path, Some(&token), &ended["position"]).await;
    assert_eq!(
        after["state"], "logged_out",
        "the path form sees the logout"
    );

    // A session opened and ended through the path form is read through the header form.
    let old = hex::encode([0x6b; 16]);
    let old_path = format!("/v1/servers/{server}/sessions/{old}");
    let (status, opened) = api.call(Method::PUT, &old_path, Some(&token), None).await;
    assert_eq!(status, StatusCode::CREATED, "the path form still works");
    let (status, read) = by_header(
        &api,
        Method::GET,
        &format!("{session}?min_position={}", opened["position"]),
        &token,
        &old,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(read["state"], "pending");
    let (status, ended) = api
        .call(Method::DELETE, &old_path, Some(&token), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ended["state"], "aborted");
    let (_, read) = by_header(
        &api,
        Method::GET,
        &format!("{session}?min_position={}", ended["position"]),
        &token,
        &old,
        None,
    )
    .await;
    assert_eq!(read["state"], "aborted");
    api.stop().await;
}

async fn a_missing_or_weak_nonce_header_is_refused(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    let session = format!("/v1/servers/{server}/session");
    let head = api.head().await;
    for (method, path) in [
        (Method::PUT, session.clone()),
        (Method::GET, session.clone()),
        (Method::DELETE, session.clone()),
        (Method::GET, format!("{session}/qr")),
        (Method::GET, format!("{session}/events")),
    ] {
        let response = api
            .http
            .request(method.clone(), api.url(&path))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "{method} {path}"
        );
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let (status, problem) = by_header(&api, method.clone(), &path, &token, "abcd", None).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{method} {path}: {problem}"
        );
        assert!(!problem.to_string().contains("abcd"), "never repeated");
    }
    let twice = api
        .http
        .put(api.url(&session))
        .bearer_auth(&token)
        .header("X-Nonce", hex::encode([1u8; 16]))
        .header("X-Nonce", hex::encode([2u8; 16]))
        .send()
        .await
        .unwrap();
    assert_eq!(
        twice.status(),
        StatusCode::BAD_REQUEST,
        "one nonce, not two"
    );
    assert_eq!(api.head().await, head, "nothing written");
    api.stop().await;
}

async fn the_openapi_document_shows_the_header_form(db: &TestDb) {
    let api = Api::start(db).await;
    let (status, doc) = api.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let paths = &doc["paths"];
    for (path, methods) in [
        (
            "/v1/servers/{server_id}/session",
            &["put", "get", "delete"][..],
        ),
        ("/v1/servers/{server_id}/session/qr", &["get"][..]),
        ("/v1/servers/{server_id}/session/events", &["get"][..]),
    ] {
        for method in methods {
            let operation = &paths[path][method];
            let params = operation["parameters"].as_array().unwrap_or_else(|| {
                panic!("{method} {path} is documented: {}", paths[path]);
            });
            assert!(
                params.iter().any(|p| p["name"] == "X-Nonce"
                    && p["in"] == "header"
                    && p["required"] == true),
                "{method} {path} takes X-Nonce"
            );
            assert!(operation.get("deprecated").is_none_or(|d| d == false));
        }
    }
    for (path, methods) in [
        (
            "/v1/servers/{server_id}/sessions/{nonce}",
            &["put", "get", "delete"][..],
        ),
        ("/v1/servers/{server_id}/sessions/{nonce}/qr", &["get"][..]),
        (
            "/v1/servers/{server_id}/sessions/{nonce}/events",
            &["get"][..],
        ),
    ] {
        for method in methods {
            assert_eq!(
                paths[path][method]["deprecated"], true,
                "{method} {path} is deprecated"
            );
        }
    }
    api.stop().await;
}

countersign_eventstore::on_both_backends!(
    the_nonce_header_form_answers_every_session_call,
    a_missing_or_weak_nonce_header_is_refused,
    the_openapi_document_shows_the_header_form,
);
