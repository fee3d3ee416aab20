//! OIDC clients and OIDC signing keys through the business API over real HTTP, against
//! PostgreSQL and SQLite: registration (a confidential client's secret shown once, only its
//! SHA-256 in the log and the read model), reads, changes, secret rotation, removal, tenant
//! isolation, refusals that write nothing, idempotent retries, key rotation, and a replay that
//! rebuilds the same rows.

use countersign_commands::server::client_secret_hash;
use countersign_domain::server::{OidcClientKind, oidc_kid};
use countersign_domain::{OidcClientId, ServerId};
use countersign_eventstore::Direction;
use countersign_eventstore::testing::TestDb;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

use crate::api::Api;

/// A request with an optional `Idempotency-Key`; answers (status, position header, body).
async fn send(
    api: &Api,
    method: Method,
    path: &str,
    token: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Option<u64>, Value) {
    let mut request = api.http.request(method, api.url(path)).bearer_auth(token);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let position = response
        .headers()
        .get("x-countersign-position")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    if !status.is_success() {
        assert_eq!(
            response.headers().get("content-type").unwrap(),
            "application/problem+json",
            "errors are problem+json"
        );
    }
    let value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or_default();
    (status, position, value)
}

fn confidential() -> Value {
    json!({
        "name": "Team wiki",
        "type": "confidential",
        "redirect_uris": ["https://wiki.example/oidc/callback"],
        "post_logout_redirect_uris": ["https://wiki.example/"],
        "scopes": ["openid", "profile", "email", "offline_access"],
        "backchannel_logout_uri": "https://wiki.example/oidc/backchannel",
        "ciba": {"mode": "poll"}
    })
}

fn public() -> Value {
    json!({
        "name": "Desktop app",
        "type": "public",
        "redirect_uris": ["http://127.0.0.1:7777/cb", "http://[::1]:7777/cb"]
    })
}

fn clients(server: &str) -> String {
    format!("/v1/servers/{server}/oidc/clients")
}

async fn register(api: &Api, server: &str, token: &str, body: Value) -> Value {
    let (status, position, created) =
        send(api, Method::POST, &clients(server), token, None, Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(
        position,
        created["position"].as_u64(),
        "header and body agree"
    );
    created
}

fn ids(server: &str, client: &Value) -> (ServerId, OidcClientId) {
    (
        server.parse().unwrap(),
        client["client_id"].as_str().unwrap().parse().unwrap(),
    )
}

async fn clients_are_registered_read_changed_and_removed(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    let reads = api.running.state.reads().clone();

    let app = register(&api, &server, &token, public()).await;
    assert_eq!(app["type"], "public");
    assert!(
        app.get("client_secret").is_none(),
        "a public client has no secret"
    );
    assert_eq!(app["scopes"], json!(["openid"]), "the default scopes");
    assert_eq!(app["ciba"], Value::Null);
    let wiki = register(&api, &server, &token, confidential()).await;
    let secret = wiki["client_secret"].as_str().unwrap().to_owned();
    assert_eq!(secret.len(), 43, "32 random bytes, base64url");
    assert_eq!(wiki["type"], "confidential");
    assert_eq!(
        wiki["ciba"],
        json!({"mode": "poll", "notification_endpoint": null})
    );
    assert_eq!(
        wiki["backchannel_logout_uri"],
        "https://wiki.example/oidc/backchannel"
    );

    // The read model: settings, only the secret's hash.
    let (sid, app_id) = ids(&server, &app);
    let (_, wiki_id) = ids(&server, &wiki);
    let row = reads.oidc_client(sid, wiki_id).await.unwrap().unwrap();
    assert_eq!(row.secret_hash, Some(client_secret_hash(&secret)));
    assert_eq!(row.settings.kind, OidcClientKind::Confidential);
    assert_eq!(
        row.settings.redirect_uris,
        ["https://wiki.example/oidc/callback"]
    );
    assert!(!row.removed);
    let app_row = reads.oidc_client(sid, app_id).await.unwrap().unwrap();
    assert_eq!(app_row.secret_hash, None);
    assert_eq!(app_row.settings.kind, OidcClientKind::Public);

    // Reads never show the secret; neither does the log.
    let (status, _, one) = send(
        &api,
        Method::GET,
        &format!(
            "{}/{}",
            clients(&server),
            wiki["client_id"].as_str().unwrap()
        ),
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(one.get("client_secret").is_none());
    assert_eq!(one["name"], "Team wiki");
    let (status, _, list) = send(&api, Method::GET, &clients(&server), &token, None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["clients"].as_array().unwrap().len(), 2);
    assert_eq!(
        list["clients"][0]["client_id"], app["client_id"],
        "oldest first"
    );
    assert!(
        !list.to_string().contains(&secret),
        "no secret in a listing"
    );
    let events = api
        .running
        .state
        .store()
        .read_stream(&sid.stream(), None, Direction::Forwards, 100)
        .await
        .unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.event_type == "server.oidc_client_registered")
    );
    for event in &events {
        let payload = &event.payload;
        assert!(
            !payload
                .windows(secret.len())
                .any(|w| w == secret.as_bytes()),
            "the secret is not in {}",
            event.event_type
        );
    }

    // PATCH changes only what it names; the same values again write nothing.
    let wiki_path = format!(
        "{}/{}",
        clients(&server),
        wiki["client_id"].as_str().unwrap()
    );
    let (status, position, changed) = send(
        &api,
        Method::PATCH,
        &wiki_path,
        &token,
        None,
        Some(json!({"name": "Wiki", "backchannel_logout_uri": null, "scopes": ["openid"]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    assert_eq!(changed["name"], "Wiki");
    assert_eq!(changed["backchannel_logout_uri"], Value::Null);
    assert_eq!(changed["scopes"], json!(["openid"]));
    assert_eq!(
        changed["redirect_uris"],
        json!(["https://wiki.example/oidc/callback"])
    );
    assert_eq!(position, changed["position"].as_u64());
    let row = reads.oidc_client(sid, wiki_id).await.unwrap().unwrap();
    assert_eq!(row.settings.name, "Wiki");
    assert_eq!(row.settings.backchannel_logout_uri, None);
    assert_eq!(row.secret_hash, Some(client_secret_hash(&secret)), "kept");
    let head = api.head().await;
    let (status, _, _) = send(
        &api,
        Method::PATCH,
        &wiki_path,
        &token,
        None,
        Some(json!({"name": "Wiki"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(api.head().await, head, "no change, no event");

    // Rotating the secret: the old one stops matching.
    let (status, _, rotated) = send(
        &api,
        Method::POST,
        &format!("{wiki_path}/secret"),
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{rotated}");
    let new_secret = rotated["client_secret"].as_str().unwrap();
    assert_ne!(new_secret, secret);
    let row = reads.oidc_client(sid, wiki_id).await.unwrap().unwrap();
    assert_eq!(row.secret_hash, Some(client_secret_hash(new_secret)));
    assert_ne!(row.secret_hash, Some(client_secret_hash(&secret)));
    // A public client has none to rotate.
    let app_path = format!(
        "{}/{}",
        clients(&server),
        app["client_id"].as_str().unwrap()
    );
    let head = api.head().await;
    let (status, _, problem) = send(
        &api,
        Method::POST,
        &format!("{app_path}/secret"),
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert_eq!(api.head().await, head);

    // DELETE: gone from every read; a second DELETE is 404 and writes nothing.
    let (status, position, removed) =
        send(&api, Method::DELETE, &wiki_path, &token, None, None).await;
    assert_eq!(status, StatusCode::OK, "{removed}");
    assert_eq!(position, removed["position"].as_u64());
    assert_eq!(reads.oidc_client(sid, wiki_id).await.unwrap(), None);
    let left = reads.oidc_clients(sid).await.unwrap();
    assert_eq!(
        left.iter().map(|c| c.client_id).collect::<Vec<_>>(),
        [app_id]
    );
    let (status, _, _) = send(&api, Method::GET, &wiki_path, &token, None, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let head = api.head().await;
    for (method, path) in [
        (Method::DELETE, wiki_path.clone()),
        (Method::POST, format!("{wiki_path}/secret")),
    ] {
        let (status, _, _) = send(&api, method, &path, &token, None, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    let (status, _, _) = send(
        &api,
        Method::PATCH,
        &wiki_path,
        &token,
        None,
        Some(json!({"name": "again"})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        api.head().await,
        head,
        "nothing written for a removed client"
    );
    api.stop().await;
}

async fn clients_are_tenant_isolated(db: &TestDb) {
    let api = Api::start(db).await;
    let (server_a, token_a) = api.tenant("A").await;
    let (server_b, token_b) = api.tenant("B").await;
    let client = register(&api, &server_a, &token_a, confidential()).await;
    let id = client["client_id"].as_str().unwrap();
    let head = api.head().await;
    // B's key on B's path, naming A's client: not found, nothing written.
    let at_b = format!("{}/{id}", clients(&server_b));
    for (method, path, body) in [
        (Method::GET, at_b.clone(), None),
        (
            Method::PATCH,
            at_b.clone(),
            Some(json!({"name": "mine now"})),
        ),
        (Method::DELETE, at_b.clone(), None),
        (Method::POST, format!("{at_b}/secret"), None),
    ] {
        let (status, _, problem) = send(&api, method, &path, &token_b, None, body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {problem}");
    }
    // B's key on A's path: not found either.
    let at_a = format!("{}/{id}", clients(&server_a));
    for (method, path) in [
        (Method::GET, at_a.clone()),
        (Method::DELETE, at_a.clone()),
        (Method::GET, clients(&server_a)),
        (Method::POST, format!("/v1/servers/{server_a}/oidc/keys")),
        (Method::GET, format!("/v1/servers/{server_a}/oidc/keys")),
    ] {
        let (status, _, _) = send(&api, method, &path, &token_b, None, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    // No key at all: 401.
    let (status, _) = api.call(Method::GET, &clients(&server_a), None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(api.head().await, head, "nothing written");
    let (status, _, list) =
        send(&api, Method::GET, &clients(&server_b), &token_b, None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["clients"], json!([]));
    let reads = api.running.state.reads();
    let (_, client_id) = ids(&server_a, &client);
    let b: ServerId = server_b.parse().unwrap();
    assert_eq!(reads.oidc_client(b, client_id).await.unwrap(), None);
    assert!(
        reads
            .oidc_client(server_a.parse().unwrap(), client_id)
            .await
            .unwrap()
            .is_some()
    );
    api.stop().await;
}

/// `base` with `key` set to `value`.
fn with(mut base: Value, key: &str, value: Value) -> Value {
    base[key] = value;
    base
}

async fn invalid_clients_are_refused_without_writing(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    let long = format!("https://rp.example/{}", "a".repeat(2048));
    let eleven: Vec<String> = (0..11).map(|i| format!("https://rp.example/{i}")).collect();
    let refused = [
        (
            "plain http",
            with(public(), "redirect_uris", json!(["http://rp.example/cb"])),
        ),
        (
            "http to another host",
            with(public(), "redirect_uris", json!(["http://127.0.0.2/cb"])),
        ),
        (
            "fragment",
            with(
                public(),
                "redirect_uris",
                json!(["https://rp.example/cb#x"]),
            ),
        ),
        (
            "userinfo",
            with(
                public(),
                "redirect_uris",
                json!(["https://u:p@rp.example/cb"]),
            ),
        ),
        ("relative", with(public(), "redirect_uris", json!(["/cb"]))),
        ("too long", with(public(), "redirect_uris", json!([long]))),
        (
            "eleven redirect URIs",
            with(public(), "redirect_uris", json!(eleven)),
        ),
        (
            "duplicate redirect URI",
            with(
                public(),
                "redirect_uris",
                json!(["https://rp.example/cb", "https://rp.example/cb"]),
            ),
        ),
        (
            "no redirect URI",
            with(public(), "redirect_uris", json!([])),
        ),
        (
            "bad post-logout URI",
            with(
                public(),
                "post_logout_redirect_uris",
                json!(["javascript:alert(1)"]),
            ),
        ),
        (
            "bad back-channel URI",
            with(
                confidential(),
                "backchannel_logout_uri",
                json!("ftp://rp.example/bcl"),
            ),
        ),
        ("no openid", with(public(), "scopes", json!(["profile"]))),
        (
            "unknown scope",
            with(public(), "scopes", json!(["openid", "admin"])),
        ),
        (
            "public CIBA",
            with(public(), "ciba", json!({"mode": "poll"})),
        ),
        (
            "ping without endpoint",
            with(confidential(), "ciba", json!({"mode": "ping"})),
        ),
        ("empty name", with(public(), "name", json!(""))),
        (
            "control character",
            with(public(), "name", json!("a\u{1b}[31m")),
        ),
        ("unknown type", with(public(), "type", json!("trusted"))),
        (
            "unknown field",
            with(public(), "client_secret", json!("chosen-by-me")),
        ),
    ];
    let head = api.head().await;
    for (what, body) in refused {
        let (status, _, problem) = send(
            &api,
            Method::POST,
            &clients(&server),
            &token,
            None,
            Some(body),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{what}: {problem}"
        );
        assert_eq!(problem["status"], 422, "{what}");
        assert_eq!(api.head().await, head, "{what} wrote nothing");
    }
    let response = api
        .http
        .post(api.url(&clients(&server)))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    // Changes are checked as merged: a public client cannot turn CIBA on.
    let app = register(&api, &server, &token, public()).await;
    let path = format!(
        "{}/{}",
        clients(&server),
        app["client_id"].as_str().unwrap()
    );
    let head = api.head().await;
    for body in [
        json!({"ciba": {"mode": "poll"}}),
        json!({"redirect_uris": []}),
        json!({"type": "confidential"}),
        json!({"scopes": ["email"]}),
    ] {
        let (status, _, problem) =
            send(&api, Method::PATCH, &path, &token, None, Some(body.clone())).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}: {problem}"
        );
        assert_eq!(api.head().await, head, "{body} wrote nothing");
    }
    // Unparseable ids are 404s.
    let (status, _, _) = send(
        &api,
        Method::GET,
        &format!("{}/not-an-id", clients(&server)),
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // At most 100 clients: the 101st is a conflict that writes nothing.
    for _ in 1..100 {
        register(&api, &server, &token, public()).await;
    }
    let head = api.head().await;
    let (status, _, problem) = send(
        &api,
        Method::POST,
        &clients(&server),
        &token,
        None,
        Some(public()),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(api.head().await, head);
    api.stop().await;
}

async fn registration_retries_answer_the_same_secret(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    let post = |key: &'static str, body: Value| {
        let (api, server, token) = (&api, &server, &token);
        async move {
            send(
                api,
                Method::POST,
                &clients(server),
                token,
                Some(key),
                Some(body),
            )
            .await
        }
    };
    let (status, _, first) = post("reg-1", confidential()).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let head = api.head().await;
    let (status, _, again) = post("reg-1", confidential()).await;
    assert_eq!(status, StatusCode::CREATED, "{again}");
    assert_eq!(again["client_id"], first["client_id"]);
    assert_eq!(again["client_secret"], first["client_secret"]);
    assert_eq!(api.head().await, head, "a retry writes nothing");
    let (status, _, problem) = post("reg-1", public()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        problem["type"],
        "urn:countersign:problem:idempotency-key-reused"
    );
    assert_eq!(api.head().await, head);
    // Without a key every registration is a new client with a new secret.
    let (_, _, other) = post_without_key(&api, &server, &token).await;
    assert_ne!(other["client_id"], first["client_id"]);
    assert_ne!(other["client_secret"], first["client_secret"]);
    api.stop().await;
}

async fn post_without_key(
    api: &Api,
    server: &str,
    token: &str,
) -> (StatusCode, Option<u64>, Value) {
    send(
        api,
        Method::POST,
        &clients(server),
        token,
        None,
        Some(confidential()),
    )
    .await
}

async fn signing_keys_rotate(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    let keys = format!("/v1/servers/{server}/oidc/keys");
    let (status, _, list) = send(&api, Method::GET, &keys, &token, None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["keys"], json!([]));

    let (status, position, first) = send(&api, Method::POST, &keys, &token, None, None).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(position, first["position"].as_u64());
    let (status, _, second) = send(&api, Method::POST, &keys, &token, None, None).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_ne!(first["kid"], second["kid"]);

    let (status, _, list) = send(&api, Method::GET, &keys, &token, None, None).await;
    assert_eq!(status, StatusCode::OK);
    let listed = list["keys"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["kid"], first["kid"], "oldest first");
    assert_eq!(listed[0]["current"], false);
    assert_eq!(listed[1]["kid"], second["kid"]);
    assert_eq!(listed[1]["current"], true);
    let server_id: ServerId = server.parse().unwrap();
    for key in listed {
        let public = hex::decode(key["public_key"].as_str().unwrap()).unwrap();
        let kid = key["kid"].as_str().unwrap();
        assert_eq!(
            oidc_kid(&public).as_deref(),
            Some(kid),
            "kid is the thumbprint"
        );
        // The private half is in the vault, and matches the published key.
        let secret = api
            .running
            .state
            .commands()
            .servers
            .oidc_signing_key(server_id, kid)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            p256::PublicKey::from_sec1_bytes(&public).unwrap(),
            secret.public_key()
        );
    }
    let rows = api
        .running
        .state
        .reads()
        .oidc_keys(server_id)
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows[0].position < rows[1].position);

    // Retrying a rotation under its idempotency key lands on the same key.
    let (_, _, keyed) = send(&api, Method::POST, &keys, &token, Some("rot-1"), None).await;
    let head = api.head().await;
    let (status, _, again) = send(&api, Method::POST, &keys, &token, Some("rot-1"), None).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(again["kid"], keyed["kid"]);
    assert_eq!(api.head().await, head);

    // Deleting the server shreds the OIDC keys with it.
    let kid = second["kid"].as_str().unwrap().to_owned();
    let (status, _) = api
        .admin(Method::DELETE, &format!("/v1/servers/{server}"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let gone = api
        .running
        .state
        .commands()
        .servers
        .oidc_signing_key(server_id, &kid)
        .await
        .unwrap();
    assert!(gone.is_none(), "the private key is destroyed");
    api.stop().await;
}

async fn replay_rebuilds_the_same_oidc_rows(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    let wiki = register(&api, &server, &token, confidential()).await;
    let app = register(&api, &server, &token, public()).await;
    let wiki_path = format!(
        "{}/{}",
        clients(&server),
        wiki["client_id"].as_str().unwrap()
    );
    let app_path = format!(
        "{}/{}",
        clients(&server),
        app["client_id"].as_str().unwrap()
    );
    send(
        &api,
        Method::PATCH,
        &wiki_path,
        &token,
        None,
        Some(json!({"name": "W"})),
    )
    .await;
    send(
        &api,
        Method::POST,
        &format!("{wiki_path}/secret"),
        &token,
        None,
        None,
    )
    .await;
    send(&api, Method::DELETE, &app_path, &token, None, None).await;
    send(
        &api,
        Method::POST,
        &format!("/v1/servers/{server}/oidc/keys"),
        &token,
        None,
        None,
    )
    .await;
    let head = api.head().await.unwrap();
    let reads = api.running.state.reads().clone();
    assert!(reads.wait_for(head, Duration::from_secs(10)).await.unwrap());
    let incremental = reads.dump().await.unwrap();
    assert_eq!(
        incremental.matches("rm_oidc_clients ").count(),
        2,
        "{incremental}"
    );
    assert!(incremental.contains("removed=true"));
    assert_eq!(incremental.matches("rm_oidc_keys ").count(), 1);
    let store = api.running.state.store().clone();
    api.stop().await;
    reads.replay(&store, None, &mut |_, _| {}).await.unwrap();
    assert_eq!(reads.dump().await.unwrap(), incremental);
    // In small batches too: where the log is cut does not matter.
    let small = reads.clone().with_batch_size(2);
    small
        .replay(&store, Some(&["servers".to_owned()]), &mut |_, _| {})
        .await
        .unwrap();
    assert_eq!(small.dump().await.unwrap(), incremental);
}

countersign_eventstore::on_both_backends!(
    clients_are_registered_read_changed_and_removed,
    clients_are_tenant_isolated,
    invalid_clients_are_refused_without_writing,
    registration_retries_answer_the_same_secret,
    signing_keys_rotate,
    replay_rebuilds_the_same_oidc_rows,
);
