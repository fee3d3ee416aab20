//! A caller's mistakes, as the router sees them (driven with `oneshot`, no TCP, so limits that
//! hyper would enforce first are reached too): every one answers RFC 9457 problem+json with
//! a 4xx status, none logs at ERROR, none writes (issue 19, items 8 and 9).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode, header};
use countersign_eventstore::testing::TestDb;
use serde_json::{Value, json};
use tower::ServiceExt as _;

use crate::api::Api;
use crate::leaks::Logged;

/// A body that must not be read: polling it fails the request in a way the test sees.
fn unread_body(polled: Arc<AtomicBool>) -> Body {
    Body::from_stream(futures::stream::poll_fn(move |_| {
        polled.store(true, Ordering::SeqCst);
        std::task::Poll::Ready(Some(Err::<Bytes, _>(std::io::Error::other(
            "the body was read",
        ))))
    }))
}

struct Answer {
    status: StatusCode,
    content_type: Option<String>,
    body: Value,
}

async fn send(api: &Api, request: Request<Body>) -> Answer {
    send_to(countersign_api::router(api.running.state.clone()), request).await
}

async fn send_to(router: axum::Router, request: Request<Body>) -> Answer {
    let response = router.oneshot(request).await.unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        content_type,
        body,
    }
}

fn get(uri: &str, token: &str) -> Request<Body> {
    Request::get(uri)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap()
}

fn put_json(uri: &str, token: &str, body: &Value) -> Request<Body> {
    Request::put(uri)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn assert_problem(what: &str, answer: &Answer, expected: StatusCode) {
    assert_eq!(answer.status, expected, "{what}: {}", answer.body);
    assert_eq!(
        answer.content_type.as_deref(),
        Some("application/problem+json"),
        "{what}"
    );
    assert_eq!(answer.body["status"], expected.as_u16(), "{what}");
    assert!(
        answer.body["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("urn:countersign:problem:")),
        "{what}: {}",
        answer.body
    );
    assert!(answer.body["detail"].is_string(), "{what}: {}", answer.body);
}

/// Item 8: out-of-range numbers, an absurd `Content-Length`, a long URI or large headers,
/// unknown routes, wrong methods and malformed input all answer problem+json with the
/// caller's status, at once, without an ERROR line and without writing.
async fn client_mistakes_answer_problem_json_and_never_log_errors(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    let before = api.head().await;
    let logged = Logged::default();
    // WARN and above, on this thread (the router runs on it under `oneshot`).
    let guard = logged.capture(tracing::Level::WARN);
    let base = format!("/v1/servers/{server}");
    let bad = StatusCode::BAD_REQUEST;
    let above = 9_223_372_036_854_775_808_u64;
    let numbers: Vec<(String, StatusCode)> = vec![
        // The store keeps positions as i64: one above it is malformed, not a failed query.
        (format!("{base}/audit/leaves/9223372036854775808"), bad),
        (format!("{base}/audit/leaves/18446744073709551616"), bad),
        (format!("{base}/audit/leaves/-1"), bad),
        (format!("{base}/audit/leaves/abc"), bad),
        (format!("{base}/users?after=9223372036854775808"), bad),
        (format!("{base}/users?after=18446744073709551615"), bad),
        (format!("{base}/events?after=9223372036854775807"), bad),
        (format!("{base}/events?after=18446744073709551616"), bad),
        (
            format!("{base}/events/stream?after=9223372036854775807"),
            bad,
        ),
        (format!("{base}/events?limit=4294967296"), bad),
        (
            "/v1/audit/checkpoint?tree_size=9223372036854775808".into(),
            bad,
        ),
        (
            format!(
                "/v1/audit/proofs/inclusion?position={above}&tree_size={}",
                above + 1
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/v1/audit/proofs/consistency?from=1&to=18446744073709551615".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            format!("{base}/users/alice?min_position=18446744073709551615"),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        // The largest values that can name something are answered, not refused.
        (
            format!("{base}/audit/leaves/9223372036854775807"),
            StatusCode::NOT_FOUND,
        ),
        (
            "/v1/audit/checkpoint?tree_size=9223372036854775807".into(),
            StatusCode::NOT_FOUND,
        ),
    ];
    for (uri, expected) in numbers {
        let answer = send(&api, get(&uri, &token)).await;
        assert_problem(&uri, &answer, expected);
    }
    for uri in [
        format!("{base}/events?after=9223372036854775806"),
        format!("{base}/users?after=9223372036854775807"),
    ] {
        let answer = send(&api, get(&uri, &token)).await;
        assert_eq!(answer.status, StatusCode::OK, "{uri}: {}", answer.body);
    }
    let mut resume = get(&format!("{base}/events/stream"), &token);
    resume
        .headers_mut()
        .insert("last-event-id", "9223372036854775807".parse().unwrap());
    assert_problem("Last-Event-ID", &send(&api, resume).await, bad);

    // A declared length beyond the route's limit: 413 before a byte of the body is read.
    let user = format!("{base}/users/alice");
    let transactions = format!("{base}/transactions");
    let transaction_limit = countersign_api::transactions::BODY_LIMIT.max(64 * 1024);
    for (method, uri, length) in [
        ("PUT", &user, "1000000000000".to_owned()),
        ("PUT", &user, (64 * 1024 + 1).to_string()),
        ("PUT", &user, "99999999999999999999999999".to_owned()),
        ("POST", &transactions, (transaction_limit + 1).to_string()),
    ] {
        let polled = Arc::new(AtomicBool::new(false));
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, &length)
            .body(unread_body(polled.clone()))
            .unwrap();
        let answer = send(&api, request).await;
        assert_problem(&length, &answer, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(!polled.load(Ordering::SeqCst), "{method} {uri} {length}");
    }

    // The request head: a target over 8 KiB is 414, headers over 16 KiB are 431.
    let long = format!("{base}/users?after={}", "1".repeat(8 * 1024));
    assert_problem(
        "long URI",
        &send(&api, get(&long, &token)).await,
        StatusCode::URI_TOO_LONG,
    );
    let fits = format!("{base}/users?limit=10&pad={}", "x".repeat(7 * 1024));
    assert_problem(
        "a URI under the limit reaches the handler",
        &send(&api, get(&fits, &token)).await,
        bad,
    );
    let mut large = get(&format!("{base}/users"), &token);
    for i in 0..3 {
        large.headers_mut().insert(
            header::HeaderName::from_bytes(format!("x-pad-{i}").as_bytes()).unwrap(),
            "y".repeat(6 * 1024).parse().unwrap(),
        );
    }
    assert_problem(
        "large headers",
        &send(&api, large).await,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
    );

    // The framework's own refusals and malformed input.
    let unknown = Request::get("/v1/nothing/here")
        .body(Body::empty())
        .unwrap();
    assert_problem(
        "unknown route",
        &send(&api, unknown).await,
        StatusCode::NOT_FOUND,
    );
    let wrong_method = Request::patch(&user)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    let answer = send(&api, wrong_method).await;
    assert_problem("wrong method", &answer, StatusCode::METHOD_NOT_ALLOWED);
    let bad_json = Request::put(&user)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{\"attributes\": "))
        .unwrap();
    assert_problem("bad JSON", &send(&api, bad_json).await, bad);
    let not_json = Request::put(&user)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from("{}"))
        .unwrap();
    assert_problem(
        "wrong content type",
        &send(&api, not_json).await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
    );
    assert_problem(
        "bad query",
        &send(&api, get(&format!("{base}/users?limit=lots"), &token)).await,
        bad,
    );
    assert_problem(
        "unknown query parameter",
        &send(&api, get(&format!("{base}/events?nope=1"), &token)).await,
        bad,
    );
    assert_problem(
        "bad attribute",
        &send(
            &api,
            put_json(&user, &token, &json!({"attributes": {"Bad Name": "x"}})),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    );

    drop(guard);
    let log = logged.text();
    assert!(
        !log.contains("ERROR"),
        "a caller's mistake logged an error:\n{log}"
    );
    assert_eq!(
        api.head().await,
        before,
        "no refused request wrote an event"
    );
    api.stop().await;
}

/// Item 9: more than 64 attributes breaks a rule of the input (422), it is not a conflict
/// (409) to retry; nothing is written.
async fn more_than_64_attributes_is_unprocessable(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    let user = format!("/v1/servers/{server}/users/alice");
    let attributes = |n: usize| -> Value {
        (0..n)
            .map(|i| (format!("a{i}"), Value::String("x".into())))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let before = api.head().await;
    let answer = send(
        &api,
        put_json(&user, &token, &json!({ "attributes": attributes(65) })),
    )
    .await;
    assert_problem("65 attributes", &answer, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(api.head().await, before);
    let answer = send(
        &api,
        put_json(&user, &token, &json!({ "attributes": attributes(64) })),
    )
    .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    api.stop().await;
}

/// Item 9: two `Authorization` headers are refused (400) whichever of them is valid, rather
/// than one picked as some intermediary might pick the other.
async fn two_authorization_headers_are_refused(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    let (_, other) = api.tenant("Shop").await;
    let uri = format!("/v1/servers/{server}/users");
    for (first, second) in [
        (token.as_str(), token.as_str()),
        (token.as_str(), other.as_str()),
        (other.as_str(), token.as_str()),
        (token.as_str(), "cs_00_00"),
    ] {
        let request = Request::get(&uri)
            .header(header::AUTHORIZATION, format!("Bearer {first}"))
            .header(header::AUTHORIZATION, format!("Bearer {second}"))
            .body(Body::empty())
            .unwrap();
        let answer = send(&api, request).await;
        assert_problem(
            "two Authorization headers",
            &answer,
            StatusCode::BAD_REQUEST,
        );
        assert!(
            !answer.body.to_string().contains(&token),
            "the answer repeats no token"
        );
    }
    assert_eq!(send(&api, get(&uri, &token)).await.status, StatusCode::OK);
    api.stop().await;
}

/// A request still unanswered at the request timeout (here: a body that never arrives)
/// answers 408 problem+json, not an empty body, and writes nothing.
async fn a_request_past_its_timeout_answers_problem_json(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    let served = &api.running.state;
    let mut config = served.config().clone();
    config.request_timeout = std::time::Duration::from_millis(100);
    let state = countersign_api::AppState::new(
        served.commands().clone(),
        served.reads().clone(),
        served.store().clone(),
        served.clock().clone(),
        config,
    );
    let head = api.head().await;
    let never = Body::from_stream(futures::stream::pending::<Result<Vec<u8>, std::io::Error>>());
    let request = Request::put(format!("/v1/servers/{server}/users/slow"))
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, "2")
        .body(never)
        .unwrap();
    let answer = send_to(countersign_api::router(state), request).await;
    assert_problem(
        "a body that never arrives",
        &answer,
        StatusCode::REQUEST_TIMEOUT,
    );
    assert_eq!(api.head().await, head, "nothing written");
    api.stop().await;
}

countersign_eventstore::on_both_backends!(
    a_request_past_its_timeout_answers_problem_json,
    client_mistakes_answer_problem_json_and_never_log_errors,
    more_than_64_attributes_is_unprocessable,
    two_authorization_headers_are_refused,
);
