//! The transactions business API over real HTTP, on PostgreSQL and SQLite: creating a
//! transaction for a user, reading it back, its QR code, idempotent retries, refusals that
//! write nothing, tenant isolation, expiry, and evidence before a signature. (Signing itself
//! goes through the device gateway and is tested with the device flows.)

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use countersign_eventstore::testing::TestDb;
use countersign_protocol::qr::{QrKind, QrPayload};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::api::{Api, next_state, register_account};

/// What a creation answered: status, headers and JSON body.
struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn position(&self) -> u64 {
        self.header("x-countersign-position")
            .unwrap()
            .parse()
            .unwrap()
    }
}

async fn create(api: &Api, server: &str, token: &str, key: Option<&str>, body: &Value) -> Answer {
    let mut request = api
        .http
        .post(api.url(&format!("/v1/servers/{server}/transactions")))
        .bearer_auth(token)
        .json(body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    let body = response.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
    }
}

async fn put_user(api: &Api, server: &str, token: &str, userid: &str) -> u64 {
    let (status, user) = api
        .call(
            Method::PUT,
            &format!("/v1/servers/{server}/users/{userid}"),
            Some(token),
            Some(json!({"attributes": {}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{user}");
    user["position"].as_u64().unwrap()
}

const DATA: &[u8] = b"{\"amount\":\"100.00\",\"currency\":\"EUR\",\"to\":\"Acme\"}";

fn payment(userid: &str) -> Value {
    json!({
        "userid": userid,
        "data": STANDARD.encode(DATA),
        "content_type": "application/json",
        "text": "Pay 100.00 EUR to Acme?",
        "announce_info": "Payment to Acme",
        "timeout_secs": 60,
    })
}

/// How many events of `event_type` the log holds.
async fn count(api: &Api, event_type: &str) -> usize {
    let all = api.running.state.store().read_all(0, 10_000).await.unwrap();
    all.iter().filter(|e| e.event_type == event_type).count()
}

async fn created_read_and_shown_as_qr(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    put_user(&api, &server, &token, "alice").await;
    let account = register_account(&api, &server, "alice", 7).await;

    let mut body = payment("alice");
    body["account_id"] = json!(account.to_string());
    let created = create(&api, &server, &token, None, &body).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let t = &created.body;
    let id = t["transaction_id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 32);
    assert_eq!(
        created.header("location"),
        Some(format!("/v1/servers/{server}/transactions/{id}").as_str())
    );
    assert_eq!(t["status"], "pending");
    assert_eq!(t["userid"], "alice");
    assert_eq!(t["account_id"], account.to_string());
    assert_eq!(t["origin"], "api");
    assert_eq!(STANDARD.decode(t["data"].as_str().unwrap()).unwrap(), DATA);
    assert_eq!(
        t["expires_at"].as_i64().unwrap() - t["created_at"].as_i64().unwrap(),
        60_000
    );
    assert_eq!(t["position"].as_u64(), Some(created.position()));
    assert!(t.get("signed_by").is_none() && t.get("factor").is_none());

    let path = format!("/v1/servers/{server}/transactions/{id}");
    let (status, read) = api.read(&path, Some(&token), created.position()).await;
    assert_eq!(status, StatusCode::OK, "{read}");
    assert_eq!(&read, t, "the read model answers what the creation did");

    let (status, qr) = api
        .read(&format!("{path}/qr"), Some(&token), created.position())
        .await;
    assert_eq!(status, StatusCode::OK, "{qr}");
    let payload = QrPayload::from_base64url(qr["base64url"].as_str().unwrap()).unwrap();
    assert_eq!(payload.kind, QrKind::Transaction);
    assert_eq!(hex::encode(payload.server_id), server);
    assert_eq!(payload.transaction_id().map(hex::encode), Some(id.clone()));
    assert_eq!(payload.gateway, "wss://gateway.test/v1/device");
    assert_eq!(qr["deep_link"], payload.deep_link());
    let png = api
        .http
        .get(api.url(&format!("{path}/qr?format=png")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(png.status(), StatusCode::OK);
    assert_eq!(png.headers()["content-type"], "image/png");
    assert!(png.bytes().await.unwrap().starts_with(b"\x89PNG"));

    // A second one without a key is another transaction, for any of the user's accounts.
    let other = create(&api, &server, &token, None, &payment("alice")).await;
    assert_eq!(other.status, StatusCode::CREATED, "{}", other.body);
    assert_ne!(other.body["transaction_id"], id.as_str());
    assert!(other.body.get("account_id").is_none());
    assert_eq!(count(&api, "transaction.created").await, 2);
    api.stop().await;
}

async fn idempotent_creation(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    put_user(&api, &server, &token, "alice").await;
    let first = create(&api, &server, &token, Some("pay-1"), &payment("alice")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    let again = create(&api, &server, &token, Some("pay-1"), &payment("alice")).await;
    assert_eq!(again.status, StatusCode::CREATED, "{}", again.body);
    assert_eq!(
        again.body, first.body,
        "a retry answers the same transaction"
    );
    assert_eq!(again.position(), first.position(), "and writes nothing");
    assert_eq!(count(&api, "transaction.created").await, 1);

    let mut other = payment("alice");
    other["text"] = json!("Pay 1000.00 EUR to Acme?");
    let head = api.head().await;
    let conflict = create(&api, &server, &token, Some("pay-1"), &other).await;
    assert_eq!(
        conflict.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        conflict.body
    );
    assert_eq!(
        conflict.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(
        conflict.body["type"],
        "urn:countersign:problem:idempotency-key-reused"
    );
    assert_eq!(api.head().await, head, "a reused key writes nothing");
    let again = create(&api, &server, &token, Some("pay-1"), &payment("alice")).await;
    assert_eq!(
        again.body, first.body,
        "the key still answers its own request"
    );
    let another = create(&api, &server, &token, Some("pay-2"), &other).await;
    assert_eq!(another.status, StatusCode::CREATED, "{}", another.body);
    assert_ne!(another.body["transaction_id"], first.body["transaction_id"]);
    assert_eq!(count(&api, "transaction.created").await, 2);
    api.stop().await;
}

async fn refusals_write_nothing(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    put_user(&api, &server, &token, "alice").await;
    put_user(&api, &server, &token, "bob").await;
    let bobs = register_account(&api, &server, "bob", 9).await;
    let before = api.head().await;
    let with = |field: &str, value: Value| {
        let mut body = payment("alice");
        body[field] = value;
        body
    };
    let cases = [
        (
            "bad base64",
            with("data", json!("not base64!")),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "data over 64 KiB",
            with("data", json!(STANDARD.encode(vec![7u8; 64 * 1024 + 1]))),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "empty text",
            with("text", json!("")),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "text over 16 KiB",
            with("text", json!("x".repeat(16 * 1024 + 1))),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "bad content type",
            with("content_type", json!("text plain")),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "timeout too short",
            with("timeout_secs", json!(5)),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "unknown field",
            with("amount", json!(100)),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "another user's account",
            with("account_id", json!(bobs.to_string())),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "no such account",
            with("account_id", json!("ab".repeat(16))),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "not an account id",
            with("account_id", json!("xyz")),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        ("unknown user", payment("carol"), StatusCode::NOT_FOUND),
        (
            "body too large",
            with("announce_info", json!("x".repeat(300_000))),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (what, body, expected) in cases {
        let answer = create(&api, &server, &token, Some(what), &body).await;
        assert_eq!(answer.status, expected, "{what}: {}", answer.body);
        assert_eq!(
            answer.header("content-type"),
            Some("application/problem+json"),
            "{what}"
        );
    }
    assert_eq!(api.head().await, before, "no refusal wrote anything");
    // Deleted users are unknown too.
    let (status, _) = api
        .call(
            Method::DELETE,
            &format!("/v1/servers/{server}/users/bob"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let after_delete = api.head().await;
    let answer = create(&api, &server, &token, None, &payment("bob")).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND, "{}", answer.body);
    assert_eq!(api.head().await, after_delete);
    assert!(after_delete > before);
    assert_eq!(count(&api, "transaction.created").await, 0);
    api.stop().await;
}

async fn other_tenants_see_nothing(db: &TestDb) {
    let api = Api::start(db).await;
    let (a, a_token) = api.tenant("Bank A").await;
    let (b, b_token) = api.tenant("Bank B").await;
    put_user(&api, &a, &a_token, "alice").await;
    put_user(&api, &b, &b_token, "alice").await;
    let created = create(&api, &a, &a_token, None, &payment("alice")).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let id = created.body["transaction_id"].as_str().unwrap();
    let position = created.position();
    for suffix in ["", "/qr", "/events", "/evidence"] {
        // B's key under B's server: no such transaction there (evidence reads the log itself,
        // the others wait for the read model).
        let path = format!("/v1/servers/{b}/transactions/{id}{suffix}");
        let (status, body) = if suffix == "/evidence" {
            api.call(Method::GET, &path, Some(&b_token), None).await
        } else {
            api.read(&path, Some(&b_token), position).await
        };
        assert_eq!(status, StatusCode::NOT_FOUND, "{suffix}: {body}");
        // B's key under A's server: not this key's server.
        let (status, body) = api
            .call(
                Method::GET,
                &format!("/v1/servers/{a}/transactions/{id}{suffix}"),
                Some(&b_token),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{suffix}: {body}");
    }
    let (status, _) = api
        .read(
            &format!("/v1/servers/{a}/transactions/{}", "00".repeat(16)),
            Some(&a_token),
            position,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = api
        .call(
            Method::GET,
            &format!("/v1/servers/{a}/transactions/not-an-id"),
            Some(&a_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    api.stop().await;
}

async fn deadlines_expire_transactions(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    put_user(&api, &server, &token, "alice").await;
    let mut body = payment("alice");
    body["timeout_secs"] = json!(30);
    let created = create(&api, &server, &token, None, &body).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let id = created.body["transaction_id"].as_str().unwrap();
    let path = format!("/v1/servers/{server}/transactions/{id}");
    let events = api
        .http
        .get(api.url(&format!(
            "{path}/events?min_position={}",
            created.position()
        )))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), StatusCode::OK);
    let mut stream = events.bytes_stream();
    let mut buffer = String::new();
    assert_eq!(
        next_state(&mut stream, &mut buffer).await["status"],
        "pending"
    );

    api.clock.advance_secs(31);
    // The sweeper or the read records it, whichever comes first; either way it is expired.
    let (status, read) = api.call(Method::GET, &path, Some(&token), None).await;
    assert_eq!(status, StatusCode::OK, "{read}");
    assert_eq!(read["status"], "expired");
    assert!(read["expired_at"].as_i64().unwrap() >= read["expires_at"].as_i64().unwrap());
    assert_eq!(
        next_state(&mut stream, &mut buffer).await["status"],
        "expired"
    );
    assert_eq!(count(&api, "transaction.expired").await, 1);
    // Nothing was signed: there is no evidence, and the answer says why.
    let evidence = api
        .call(Method::GET, &format!("{path}/evidence"), Some(&token), None)
        .await;
    assert_eq!(evidence.0, StatusCode::CONFLICT, "{}", evidence.1);
    assert!(evidence.1["detail"].as_str().unwrap().contains("expired"));
    api.stop().await;
}

async fn no_evidence_before_a_signature(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    put_user(&api, &server, &token, "alice").await;
    let created = create(&api, &server, &token, None, &payment("alice")).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let id = created.body["transaction_id"].as_str().unwrap();
    for format in ["", "?format=json", "?format=cbor"] {
        let response = api
            .http
            .get(api.url(&format!(
                "/v1/servers/{server}/transactions/{id}/evidence{format}"
            )))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CONFLICT, "{format}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem: Value = response.json().await.unwrap();
        assert!(
            problem["detail"].as_str().unwrap().contains("pending"),
            "{problem}"
        );
    }
    let (status, _) = api
        .call(
            Method::GET,
            &format!(
                "/v1/servers/{server}/transactions/{}/evidence",
                "00".repeat(16)
            ),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = api
        .call(
            Method::GET,
            &format!("/v1/servers/{server}/transactions/{id}/evidence?format=xml"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    api.stop().await;
}

countersign_eventstore::on_both_backends!(
    created_read_and_shown_as_qr,
    idempotent_creation,
    refusals_write_nothing,
    other_tenants_see_nothing,
    deadlines_expire_transactions,
    no_evidence_before_a_signature,
);
