//! Keyed user digests and userid normalisation, through the API: after a user is deleted,
//! nothing in the log or the tenant feed can be linked to the userid without the key vault;
//! two servers name the same userid differently; a server created before keyed digests keeps
//! its users' stream names; NFC and NFD spellings are one user and invisible characters are
//! refused.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use countersign_commands::CommandError;
use countersign_commands::secrets::secret_ref;
use countersign_domain::server::{ServerCreatedV1, ServerSettings};
use countersign_domain::{DataKey, ErrorKind, ServerId};
use countersign_eventstore::testing::TestDb;
use countersign_eventstore::vault::{KeyVault, parse_master_key};
use countersign_eventstore::{ExpectedVersion, Metadata, NewEvent, StoreOptions, open};
use hmac::{Hmac, KeyInit, Mac};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::api::Api;

/// The vault of the test server's database (the `Api` helper's master key is `11…11`).
async fn vault(db: &TestDb) -> KeyVault {
    let opened = open(&StoreOptions {
        url: db.url().to_owned(),
        pool_size: 2,
    })
    .await
    .unwrap();
    let master: DataKey = parse_master_key(&"11".repeat(32)).unwrap();
    KeyVault::new(opened.vault, master)
}

/// The digest as it was computed before keying, which anyone can compute from a guess.
fn unkeyed(server: ServerId, userid: &str) -> [u8; 16] {
    let hash = Sha256::new()
        .chain_update(server.as_bytes())
        .chain_update([0u8])
        .chain_update(userid.as_bytes())
        .finalize();
    hash[..16].try_into().unwrap()
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap();
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// The keyed digest, recomputed here from the server's secret as only the vault's holder can:
/// key = HMAC(secret, "user-digest" ‖ 0), digest = HMAC(key, server ‖ 0 ‖ userid)[..16].
fn keyed(secret: &[u8], server: ServerId, userid: &str) -> [u8; 16] {
    let key = hmac(secret, &[b"user-digest", &[0]]);
    let full = hmac(&key, &[server.as_bytes(), &[0], userid.as_bytes()]);
    full[..16].try_into().unwrap()
}

/// Every event of the tenant's feed, each as (stream, payload JSON text, canonical bytes
/// the audit leaf hashes).
async fn feed(api: &Api, server: &str, token: &str) -> Vec<(String, String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut after: Option<u64> = None;
    loop {
        let path = match after {
            Some(p) => format!("/v1/servers/{server}/events?limit=1000&after={p}"),
            None => format!("/v1/servers/{server}/events?limit=1000"),
        };
        let (status, page) = api.call(Method::GET, &path, Some(token), None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        for e in page["events"].as_array().unwrap() {
            out.push((
                e["stream"].as_str().unwrap().to_owned(),
                e["payload"].to_string(),
                URL_SAFE_NO_PAD
                    .decode(e["canonical"].as_str().unwrap())
                    .unwrap(),
            ));
        }
        match page["next_after"].as_u64() {
            Some(next) if Some(next) != page["head"].as_u64() => after = Some(next),
            Some(_) | None => break,
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// After a user is deleted, the digests left in stream names, payloads (`user.registered`,
/// `session.opened`), the tenant feed and the audit leaves' bytes cannot be recomputed from a
/// guessed userid: the unkeyed SHA-256 form appears nowhere. With the vault's server secret
/// they can, and once the server is deleted that secret is gone too.
async fn a_deleted_users_digest_is_unlinkable_without_the_vault(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    let server_id: ServerId = server.parse().unwrap();
    let userid = "alice@example.org";
    let path = format!("/v1/servers/{server}/users/alice%40example.org");
    let (status, body) = api
        .call(
            Method::PUT,
            &path,
            Some(&token),
            Some(json!({"attributes": {"name": "Alice"}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // A session opened for the user carries the digest in `session.opened`.
    let (status, body) = api
        .call(
            Method::PUT,
            &format!("/v1/servers/{server}/sessions/{}", "5a".repeat(16)),
            Some(&token),
            Some(json!({"userid": userid})),
        )
        .await;
    assert!(status.is_success(), "{status} {body}");
    let (status, body) = api.call(Method::DELETE, &path, Some(&token), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let events = feed(&api, &server, &token).await;
    let old = unkeyed(server_id, userid);
    let old_hex = hex::encode(old);
    let secret = vault(db)
        .await
        .get(&secret_ref(server_id))
        .await
        .unwrap()
        .unwrap();
    let new = keyed(&secret, server_id, userid);
    let new_hex = hex::encode(new);
    assert_ne!(old, new);
    let mut seen_in_payloads = 0;
    for (stream, payload, canonical) in &events {
        assert!(!stream.contains(&old_hex), "{stream}");
        assert!(!payload.contains(&old_hex), "{payload}");
        assert!(!contains(canonical, &old), "unkeyed digest in {stream}");
        assert!(!contains(canonical, userid.as_bytes()), "userid in clear");
        if payload.contains(&new_hex) && contains(canonical, &new) {
            seen_in_payloads += 1;
        }
    }
    // With the vault the link is there: the user's stream and the events that name it.
    let user_stream = format!("user-{server}-{new_hex}");
    assert!(
        events.iter().any(|(stream, ..)| *stream == user_stream),
        "{user_stream} not in the feed"
    );
    assert!(
        seen_in_payloads >= 2,
        "user.registered and session.opened name the keyed digest ({seen_in_payloads})"
    );
    assert_eq!(
        api.running
            .state
            .commands()
            .users
            .user_ref(server_id, userid)
            .await
            .unwrap()
            .stream(),
        user_stream
    );

    // Deleting the server destroys the secret the key derives from.
    let (status, body) = api
        .admin(Method::DELETE, &format!("/v1/servers/{server}"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        vault(db)
            .await
            .get(&secret_ref(server_id))
            .await
            .unwrap()
            .is_none()
    );
    let gone = api
        .running
        .state
        .commands()
        .users
        .user_ref(server_id, userid)
        .await
        .unwrap_err();
    assert!(
        matches!(
            gone,
            CommandError::Rejected {
                kind: ErrorKind::Gone,
                ..
            }
        ),
        "{gone}"
    );
    api.stop().await;
}

/// One userid at two servers: two digests unrelated to each other and to the unkeyed form.
async fn two_servers_give_unrelated_digests(db: &TestDb) {
    let api = Api::start(db).await;
    let mut streams = Vec::new();
    for name in ["A", "B"] {
        let (server, token) = api.tenant(name).await;
        let (status, body) = api
            .call(
                Method::PUT,
                &format!("/v1/servers/{server}/users/alice"),
                Some(&token),
                Some(json!({})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let server_id: ServerId = server.parse().unwrap();
        let user = api
            .running
            .state
            .commands()
            .users
            .user_ref(server_id, "alice")
            .await
            .unwrap();
        assert_ne!(user.digest.as_bytes(), &unkeyed(server_id, "alice"));
        let written = feed(&api, &server, &token).await;
        assert!(written.iter().any(|(s, ..)| *s == user.stream()));
        streams.push(user.digest);
    }
    assert_ne!(streams[0], streams[1]);
    api.stop().await;
}

/// A server whose `server.created` is v1 (written before keyed digests) keeps the unkeyed
/// scheme: its users are found under the stream names they were given, through the API.
async fn a_server_from_before_keyed_digests_keeps_its_streams(db: &TestDb) {
    let api = Api::start(db).await;
    let server_id = ServerId::from_bytes([0x0d; 16]);
    let public_key = crate::api::p256_point(3);
    let v1 = ServerCreatedV1 {
        server_id,
        key_thumbprint: Sha256::digest(&public_key).into(),
        public_key,
        settings: ServerSettings::defaults("Old Bank".into()),
    };
    api.running
        .state
        .store()
        .append(
            &server_id.stream(),
            ExpectedVersion::NoStream,
            vec![NewEvent {
                event_id: uuid::Uuid::from_u128(0x0d),
                event_type: "server.created".into(),
                schema_version: 1,
                payload: countersign_domain::cbor::to_canonical_vec(&v1).unwrap(),
                metadata: Metadata::default(),
            }],
        )
        .await
        .unwrap();
    let server = server_id.to_string();
    let (status, key) = api
        .admin(
            Method::POST,
            &format!("/v1/servers/{server}/api-keys"),
            Some(json!({"label": "backend"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    let token = key["token"].as_str().unwrap().to_owned();
    let path = format!("/v1/servers/{server}/users/carol");
    let (status, body) = api
        .call(Method::PUT, &path, Some(&token), Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let legacy = format!("user-{server}-{}", hex::encode(unkeyed(server_id, "carol")));
    let written = feed(&api, &server, &token).await;
    assert!(
        written.iter().any(|(s, ..)| *s == legacy),
        "the user stream keeps the unkeyed name"
    );
    let position = body["position"].as_u64().unwrap();
    let (status, user) = api.read(&path, Some(&token), position).await;
    assert_eq!(status, StatusCode::OK, "{user}");
    assert_eq!(user["userid"], "carol");
    api.stop().await;
}

/// NFC and NFD spellings are one user; format characters are a 422 that writes nothing.
async fn userids_are_normalised_and_invisible_characters_refused(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    // "josé" composed (U+00E9) and decomposed (e + U+0301).
    let nfc = format!("/v1/servers/{server}/users/jos%C3%A9");
    let nfd = format!("/v1/servers/{server}/users/jose%CC%81");
    let (status, body) = api
        .call(
            Method::PUT,
            &nfd,
            Some(&token),
            Some(json!({"attributes": {"name": "José"}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = api
        .call(
            Method::PUT,
            &nfc,
            Some(&token),
            Some(json!({"attributes": {"name": "José"}})),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the NFC form is the same user: {body}"
    );
    let position = body["position"].as_u64().unwrap();
    let (status, user) = api.read(&nfd, Some(&token), position).await;
    assert_eq!(status, StatusCode::OK, "{user}");
    assert_eq!(user["userid"], "jos\u{e9}", "answered in NFC");
    let (_, list) = api
        .read(
            &format!("/v1/servers/{server}/users"),
            Some(&token),
            position,
        )
        .await;
    assert_eq!(list["users"].as_array().unwrap().len(), 1, "{list}");

    let head = api.head().await;
    for (encoded, code_point) in [
        ("ali%E2%80%8Bce", "U+200B"),
        ("%E2%80%AEmoc.elpmaxe%40ecila", "U+202E"),
        ("%EF%BB%BFalice", "U+FEFF"),
        ("alice%C2%A0smith", "U+00A0"),
    ] {
        let (status, problem): (StatusCode, Value) = api
            .call(
                Method::PUT,
                &format!("/v1/servers/{server}/users/{encoded}"),
                Some(&token),
                Some(json!({})),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains(code_point), "{detail}");
        assert!(!detail.contains("alice") && !detail.contains("ecila"));
        let (status, _) = api
            .call(
                Method::POST,
                &format!("/v1/servers/{server}/enrolments"),
                Some(&token),
                Some(json!({"userid": format!("ali\u{200b}ce")})),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    }
    assert_eq!(api.head().await, head, "nothing written");
    api.stop().await;
}

countersign_eventstore::on_both_backends!(
    a_deleted_users_digest_is_unlinkable_without_the_vault,
    two_servers_give_unrelated_digests,
    a_server_from_before_keyed_digests_keeps_its_streams,
    userids_are_normalised_and_invisible_characters_refused,
);
