//! The OIDC token side over real HTTP: `countersign serve` on loopback (its IdP routes), the
//! mobile SDK as the phone logging in to a continuous session, codes issued through
//! `commands.grants.issue_code` for that session (the login page is tested apart), then a
//! relying party's requests: discovery, the code exchange with PKCE, the ID token verified
//! against the JWKS with p256 directly, userinfo, introspection, refresh, revocation; and
//! every refusal the issue names that is the token endpoint's or userinfo's, each with the
//! spec's error code and nothing written but the revocation a reused code causes.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use countersign_commands::grant::CodeRequest;
use countersign_domain::{OidcClientId, SessionRef};
use countersign_eventstore::Metadata;
use countersign_eventstore::testing::TestDb;
use countersign_mobile_sdk::{MemoryStorage, NoCallbacks, Sdk, SdkConfig, SessionHandle, State};
use p256::ecdsa::signature::Verifier as _;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::api::Api;
use crate::device::{enrol, enrolment_qr, nonce, open_session, tenant};

const WAIT: Duration = Duration::from_secs(10);
const REDIRECT: &str = "https://rp.example/cb";
const VERIFIER: &str = "dBjftJeZ4CVP-mJ92K9bc-ekX1J2ByDJd4mB7o_Rb8kJm-u0ad8VbDfMXT";

/// A form POST, with `client_secret_basic` when `basic` is given: (status, headers, JSON).
async fn post_form(
    api: &Api,
    path: &str,
    basic: Option<(&str, &str)>,
    pairs: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Value) {
    let mut encoded = reqwest::Url::parse("http://form.invalid/").unwrap();
    encoded.query_pairs_mut().extend_pairs(pairs);
    let mut request = api
        .http
        .post(api.url(path))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(encoded.query().unwrap_or_default().to_owned());
    if let Some((id, secret)) = basic {
        request = request.basic_auth(id, Some(secret));
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.bytes().await.unwrap();
    (
        status,
        headers,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

async fn get_json(api: &Api, path: &str, bearer: Option<&str>) -> (StatusCode, HeaderMap, Value) {
    let mut request = api.http.get(api.url(path));
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.bytes().await.unwrap();
    (
        status,
        headers,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

/// Registers a client through the business API and waits for the read model to have it:
/// (client_id, client_secret if confidential).
async fn register_client(
    api: &Api,
    server: &str,
    token: &str,
    kind: &str,
) -> (String, Option<String>) {
    let (status, created) = api
        .call(
            Method::POST,
            &format!("/v1/servers/{server}/oidc/clients"),
            Some(token),
            Some(json!({
                "name": "Bank web",
                "type": kind,
                "redirect_uris": [REDIRECT],
                "scopes": ["openid", "profile", "email", "groups", "offline_access"],
            })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["client_id"].as_str().unwrap().to_owned();
    let (status, _) = api
        .read(
            &format!("/v1/servers/{server}/oidc/clients/{id}"),
            Some(token),
            created["position"].as_u64().unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    (id, created["client_secret"].as_str().map(str::to_owned))
}

/// Logs the phone in to a continuous session (`nonce(n)`); answers its handle once ACTIVE
/// and the session it is.
async fn logged_in_session(
    api: &Api,
    server: &str,
    token: &str,
    phone: &Sdk,
    account: &str,
    n: u8,
) -> (SessionHandle, SessionRef) {
    let link = open_session(api, server, token, n, json!({"ping_time_secs": 3600})).await;
    let login = phone
        .start_session(link.as_bytes(), Arc::new(NoCallbacks))
        .await
        .unwrap();
    login.set_account(Some(account)).await.unwrap();
    tokio::time::timeout(WAIT, login.wait_for(|s| s.state == State::Active))
        .await
        .unwrap();
    let session = api
        .running
        .state
        .commands()
        .sessions
        .session_ref(server.parse().unwrap(), &nonce(n))
        .await
        .unwrap();
    (login, session)
}

/// A code for `client` on the logged-in `session`, as the login page issues it.
async fn code(api: &Api, client: &str, session: SessionRef, challenge: Option<[u8; 32]>) -> String {
    let (code, _grant, done) = api
        .running
        .state
        .commands()
        .grants
        .issue_code(
            CodeRequest {
                client_id: client.parse::<OidcClientId>().unwrap(),
                session,
                scope: vec![
                    "openid".into(),
                    "profile".into(),
                    "email".into(),
                    "groups".into(),
                ],
                redirect_uri: REDIRECT.into(),
                code_challenge: challenge,
                nonce: Some("n-0S6_WzA2Mj".into()),
            },
            &Metadata::default(),
        )
        .await
        .unwrap();
    assert_eq!(done.events.len(), 1);
    code.expose().to_owned()
}

fn challenge() -> Option<[u8; 32]> {
    Some(Sha256::digest(VERIFIER.as_bytes()).into())
}

fn exchange<'a>(code: &'a str, verifier: Option<&'a str>) -> Vec<(&'a str, &'a str)> {
    let mut pairs = vec![
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", REDIRECT),
    ];
    if let Some(v) = verifier {
        pairs.push(("code_verifier", v));
    }
    pairs
}

/// The token endpoint's refresh grant for `refresh_token`.
fn refreshing(refresh_token: &str) -> [(&str, &str); 2] {
    [
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token),
    ]
}

/// Verifies a compact ES256 JWS against a JWKS document with p256 alone; answers the claims.
fn verify_with_jwks(jwks: &Value, token: &str) -> Value {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    assert_eq!(header["alg"], "ES256");
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == header["kid"])
        .expect("the token's kid is in the JWKS");
    assert_eq!(
        (jwk["kty"].as_str(), jwk["crv"].as_str()),
        (Some("EC"), Some("P-256"))
    );
    let mut sec1 = vec![4u8];
    sec1.extend(URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap());
    sec1.extend(URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap());
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1).unwrap();
    let signature =
        p256::ecdsa::Signature::from_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap()).unwrap();
    let signed = format!("{}.{}", parts[0], parts[1]);
    key.verify(signed.as_bytes(), &signature)
        .expect("the ID token's signature verifies against the JWKS");
    // The kid is the RFC 7638 thumbprint.
    let canonical = format!(
        r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
        jwk["x"].as_str().unwrap(),
        jwk["y"].as_str().unwrap()
    );
    assert_eq!(
        jwk["kid"].as_str().unwrap(),
        URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
    );
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap()
}

/// Asserts an OAuth error answer and that the log head did not move.
#[track_caller]
fn refused(answer: &(StatusCode, HeaderMap, Value), status: StatusCode, code: &str) {
    assert_eq!(answer.0, status, "{}", answer.2);
    assert_eq!(answer.2["error"], code, "{}", answer.2);
    assert_eq!(answer.1["cache-control"], "no-store");
}

async fn the_code_flow_and_its_refusals(db: &TestDb) {
    let api = Api::start_with(db, None).await;
    let (server, token) = tenant(&api, "Bank", "alice").await;
    let (status, body) = api
        .call(
            Method::PUT,
            &format!("/v1/servers/{server}/users/alice"),
            Some(&token),
            Some(json!({"attributes": {
                "name": "Alice Liddell",
                "given_name": "Alice",
                "email": "alice@example.com",
                "email_verified": "true",
                "groups": "staff, admins",
            }})),
        )
        .await;
    assert!(status.is_success(), "{body}");
    let phone = Sdk::open(Arc::new(MemoryStorage::new()), SdkConfig::default()).unwrap();
    let account = enrol(&phone, &enrolment_qr(&api, &server, &token, "alice").await).await;
    let (rp, rp_secret) = register_client(&api, &server, &token, "confidential").await;
    let rp_secret = rp_secret.unwrap();
    let (other_rp, other_secret) = register_client(&api, &server, &token, "confidential").await;
    let other_secret = other_secret.unwrap();
    let (_login, session) = logged_in_session(&api, &server, &token, &phone, &account, 1).await;
    let rp_auth = Some((rp.as_str(), rp_secret.as_str()));
    let token_path = format!("/oidc/{server}/token");

    // Discovery names every endpoint, and the JWKS the key.
    let (status, _, meta) = get_json(
        &api,
        &format!("/oidc/{server}/.well-known/openid-configuration"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let issuer = format!("{}/oidc/{server}", api.base);
    assert_eq!(meta["issuer"], issuer.as_str());
    assert_eq!(meta["token_endpoint"], format!("{issuer}/token"));
    assert_eq!(
        meta["end_session_endpoint"],
        format!("{issuer}/end_session")
    );
    assert_eq!(meta["code_challenge_methods_supported"], json!(["S256"]));
    assert_eq!(
        meta["id_token_signing_alg_values_supported"],
        json!(["ES256"])
    );
    assert_eq!(
        meta["backchannel_token_delivery_modes_supported"],
        json!(["poll", "ping"])
    );
    assert_eq!(meta["authorization_response_iss_parameter_supported"], true);
    let (status, _, as_meta) = get_json(
        &api,
        &format!("/oidc/{server}/.well-known/oauth-authorization-server"),
        None,
    )
    .await;
    assert_eq!((status, &as_meta), (StatusCode::OK, &meta));
    let jwks_path = meta["jwks_uri"]
        .as_str()
        .unwrap()
        .strip_prefix(&api.base)
        .unwrap();
    let (status, _, jwks) = get_json(&api, jwks_path, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
    let unknown = hex::encode([0xee; 16]);
    let (status, _, body) = get_json(
        &api,
        &format!("/oidc/{unknown}/.well-known/openid-configuration"),
        None,
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("invalid_request"))
    );

    // Refusals of a valid code: each answers its error, and nothing is written.
    let code1 = code(&api, &rp, session, challenge()).await;
    let head = api.head().await;
    let wrong_uri = post_form(
        &api,
        &token_path,
        rp_auth,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code1),
            ("redirect_uri", "https://rp.example/cb/other"),
            ("code_verifier", VERIFIER),
        ],
    )
    .await;
    refused(&wrong_uri, StatusCode::BAD_REQUEST, "invalid_grant");
    let extra_uri = post_form(
        &api,
        &token_path,
        rp_auth,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code1),
            ("redirect_uri", REDIRECT),
            ("redirect_uri", "https://evil.example/cb"),
            ("code_verifier", VERIFIER),
        ],
    )
    .await;
    refused(&extra_uri, StatusCode::BAD_REQUEST, "invalid_request");
    let no_verifier = post_form(&api, &token_path, rp_auth, &exchange(&code1, None)).await;
    refused(&no_verifier, StatusCode::BAD_REQUEST, "invalid_grant");
    let wrong_verifier = "x".repeat(43);
    let wrong = post_form(
        &api,
        &token_path,
        rp_auth,
        &exchange(&code1, Some(&wrong_verifier)),
    )
    .await;
    refused(&wrong, StatusCode::BAD_REQUEST, "invalid_grant");
    let other_client = post_form(
        &api,
        &token_path,
        Some((&other_rp, &other_secret)),
        &exchange(&code1, Some(VERIFIER)),
    )
    .await;
    refused(&other_client, StatusCode::BAD_REQUEST, "invalid_grant");
    let unknown_client = post_form(
        &api,
        &token_path,
        Some((&hex::encode([7u8; 16]), &rp_secret)),
        &exchange(&code1, Some(VERIFIER)),
    )
    .await;
    refused(&unknown_client, StatusCode::UNAUTHORIZED, "invalid_client");
    assert!(unknown_client.1.contains_key("www-authenticate"));
    let wrong_secret = post_form(
        &api,
        &token_path,
        Some((&rp, "not-the-secret")),
        &exchange(&code1, Some(VERIFIER)),
    )
    .await;
    refused(&wrong_secret, StatusCode::UNAUTHORIZED, "invalid_client");
    // An unknown client and a wrong secret cannot be told apart.
    assert_eq!(wrong_secret.2, unknown_client.2);
    let no_auth = post_form(&api, &token_path, None, &exchange(&code1, Some(VERIFIER))).await;
    refused(&no_auth, StatusCode::UNAUTHORIZED, "invalid_client");
    let garbage = post_form(
        &api,
        &token_path,
        rp_auth,
        &exchange("garbage", Some(VERIFIER)),
    )
    .await;
    refused(&garbage, StatusCode::BAD_REQUEST, "invalid_grant");
    let grant_type = post_form(&api, &token_path, rp_auth, &[("grant_type", "password")]).await;
    refused(
        &grant_type,
        StatusCode::BAD_REQUEST,
        "unsupported_grant_type",
    );
    assert_eq!(api.head().await, head, "no refusal wrote anything");

    // The exchange.
    let (status, headers, tokens) = post_form(
        &api,
        &token_path,
        rp_auth,
        &exchange(&code1, Some(VERIFIER)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(tokens["token_type"], "Bearer");
    assert_eq!(tokens["expires_in"], 600);
    let access = tokens["access_token"].as_str().unwrap().to_owned();
    let refresh = tokens["refresh_token"].as_str().unwrap().to_owned();
    assert_eq!((access.len(), refresh.len()), (64, 64));
    let claims = verify_with_jwks(&jwks, tokens["id_token"].as_str().unwrap());
    assert_eq!(claims["iss"], issuer.as_str());
    assert_eq!(claims["aud"], rp.as_str());
    assert_eq!(claims["nonce"], "n-0S6_WzA2Mj");
    assert_eq!(claims["amr"], json!(["hwk"]));
    assert_eq!(claims["acr"], "urn:countersign:acr:1");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        600
    );
    assert!(claims["auth_time"].as_i64().unwrap() <= claims["iat"].as_i64().unwrap());
    assert_eq!(
        claims["sid"],
        URL_SAFE_NO_PAD.encode(session.hsid.as_bytes())
    );
    let sub = claims["sub"].as_str().unwrap().to_owned();
    assert_eq!(sub.len(), 43);
    assert!(!sub.contains("alice") && sub != account);
    assert_eq!(
        claims["at_hash"],
        URL_SAFE_NO_PAD.encode(&Sha256::digest(access.as_bytes())[..16])
    );

    // Userinfo, GET and POST: claims by scope.
    let userinfo_path = format!("/oidc/{server}/userinfo");
    let (status, _, info) = get_json(&api, &userinfo_path, Some(&access)).await;
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!(info["sub"], sub.as_str());
    assert_eq!(info["name"], "Alice Liddell");
    assert_eq!(info["given_name"], "Alice");
    assert_eq!(info["preferred_username"], "alice");
    assert_eq!(info["email"], "alice@example.com");
    assert_eq!(info["email_verified"], true);
    assert_eq!(info["groups"], json!(["staff", "admins"]));
    let (status, _, posted) =
        post_form(&api, &userinfo_path, None, &[("access_token", &access)]).await;
    assert_eq!((status, &posted), (StatusCode::OK, &info));
    let (status, headers, _) = get_json(&api, &userinfo_path, Some(&refresh)).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a refresh token is no access token"
    );
    assert!(
        headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("error=\"invalid_token\"")
    );

    // Server A's token at server B's userinfo.
    let (server_b, _) = api.tenant("Other").await;
    let (status, headers, body) =
        get_json(&api, &format!("/oidc/{server_b}/userinfo"), Some(&access)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_token"))
    );
    assert!(headers.contains_key("www-authenticate"));

    // Introspection: the client's own tokens only.
    let introspect_path = format!("/oidc/{server}/introspect");
    let (status, _, view) = post_form(&api, &introspect_path, rp_auth, &[("token", &access)]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(view["active"], true, "{view}");
    assert_eq!(view["client_id"], rp.as_str());
    assert_eq!(view["sub"], sub.as_str());
    assert_eq!(view["scope"], "openid profile email groups");
    let (_, _, view) = post_form(&api, &introspect_path, rp_auth, &[("token", &refresh)]).await;
    assert_eq!(
        (view["active"].as_bool(), view["token_type"].as_str()),
        (Some(true), Some("refresh_token"))
    );
    let (_, _, view) = post_form(
        &api,
        &introspect_path,
        Some((&other_rp, &other_secret)),
        &[("token", &access)],
    )
    .await;
    assert_eq!(view, json!({"active": false}));
    let (_, _, view) = post_form(&api, &introspect_path, rp_auth, &[("token", "nope")]).await;
    assert_eq!(view, json!({"active": false}));

    // Refresh: new tokens, the old access token gone.
    let head = api.head().await.unwrap();
    let (status, _, refreshed) = post_form(&api, &token_path, rp_auth, &refreshing(&refresh)).await;
    assert_eq!(status, StatusCode::OK, "{refreshed}");
    let access2 = refreshed["access_token"].as_str().unwrap().to_owned();
    let refresh2 = refreshed["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(refresh2, refresh);
    let claims2 = verify_with_jwks(&jwks, refreshed["id_token"].as_str().unwrap());
    assert_eq!(
        (claims2["sub"].as_str(), claims2["auth_time"].as_i64()),
        (Some(sub.as_str()), claims["auth_time"].as_i64())
    );
    assert_eq!(
        claims2.get("nonce"),
        None,
        "no nonce on a refresh (OIDC Core §12.2)"
    );
    assert_eq!(api.head().await, Some(head + 1), "one grant.refreshed");
    let (status, _, _) = get_json(&api, &userinfo_path, Some(&access2)).await;
    assert_eq!(status, StatusCode::OK);

    // A reused code: invalid_grant, and the grant revoked (its one event).
    let head = api.head().await.unwrap();
    let reused = post_form(
        &api,
        &token_path,
        rp_auth,
        &exchange(&code1, Some(VERIFIER)),
    )
    .await;
    refused(&reused, StatusCode::BAD_REQUEST, "invalid_grant");
    assert_eq!(api.head().await, Some(head + 1));
    let last = api
        .running
        .state
        .store()
        .read_all(head + 1, 1)
        .await
        .unwrap();
    assert_eq!(last[0].event_type, "grant.revoked");
    assert_eq!(crate::api::payload_json(&last[0])["reason"], "code_reused");
    assert!(last[0].stream.starts_with(&format!("grant-{server}-")));
    // What the code issued is void at once: userinfo (whose cache this process dropped for
    // the grant, though access2 was answered a moment ago) and introspection.
    let (status, _, _) = get_json(&api, &userinfo_path, Some(&access2)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (_, _, view) = post_form(&api, &introspect_path, rp_auth, &[("token", &access2)]).await;
    assert_eq!(
        view,
        json!({"active": false}),
        "the reuse revoked what the code issued"
    );
    let after = post_form(&api, &token_path, rp_auth, &refreshing(&refresh2)).await;
    refused(&after, StatusCode::BAD_REQUEST, "invalid_grant");

    // Revocation: a fresh grant's access token revoked; unknown tokens answer 200 too.
    let code2 = code(&api, &rp, session, challenge()).await;
    let (status, _, tokens2) = post_form(
        &api,
        &token_path,
        rp_auth,
        &exchange(&code2, Some(VERIFIER)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{tokens2}");
    let access3 = tokens2["access_token"].as_str().unwrap().to_owned();
    let refresh3 = tokens2["refresh_token"].as_str().unwrap().to_owned();
    let revoke_path = format!("/oidc/{server}/revoke");
    let head = api.head().await.unwrap();
    let (status, _, _) = post_form(&api, &revoke_path, rp_auth, &[("token", "unknown")]).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = post_form(
        &api,
        &revoke_path,
        Some((&other_rp, &other_secret)),
        &[("token", &access3)],
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "another client's token: 200, nothing done"
    );
    assert_eq!(api.head().await, Some(head));
    let (status, _, _) = post_form(&api, &revoke_path, rp_auth, &[("token", &access3)]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(api.head().await, Some(head + 1), "one grant.revoked");
    let (status, _, _) = get_json(&api, &userinfo_path, Some(&access3)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let revoked_refresh = post_form(&api, &token_path, rp_auth, &refreshing(&refresh3)).await;
    refused(&revoked_refresh, StatusCode::BAD_REQUEST, "invalid_grant");

    // An expired code (the server's clock moved past its minute).
    let code3 = code(&api, &rp, session, challenge()).await;
    let code4 = code(&api, &rp, session, challenge()).await;
    let (status, _, tokens4) = post_form(
        &api,
        &token_path,
        rp_auth,
        &exchange(&code4, Some(VERIFIER)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let refresh4 = tokens4["refresh_token"].as_str().unwrap().to_owned();
    api.clock.advance_secs(61);
    let head = api.head().await;
    let expired = post_form(
        &api,
        &token_path,
        rp_auth,
        &exchange(&code3, Some(VERIFIER)),
    )
    .await;
    refused(&expired, StatusCode::BAD_REQUEST, "invalid_grant");
    assert_eq!(api.head().await, head);

    // The business side ends the session: refresh refused, nothing written.
    let (status, _) = crate::api::session_call_at(
        &api.http,
        &api.base,
        Method::DELETE,
        &format!("/v1/servers/{server}/session"),
        &token,
        &nonce(1),
        None,
    )
    .await;
    assert!(status.is_success());
    let head = api.head().await;
    let ended = post_form(&api, &token_path, rp_auth, &refreshing(&refresh4)).await;
    refused(&ended, StatusCode::BAD_REQUEST, "invalid_grant");
    assert_eq!(api.head().await, head);
    // A code for the ended session cannot be issued at all.
    let refused_code = api
        .running
        .state
        .commands()
        .grants
        .issue_code(
            CodeRequest {
                client_id: rp.parse().unwrap(),
                session,
                scope: vec!["openid".into()],
                redirect_uri: REDIRECT.into(),
                code_challenge: challenge(),
                nonce: None,
            },
            &Metadata::default(),
        )
        .await;
    assert!(refused_code.is_err());
    api.stop().await;
}

/// A public client authenticates with `client_id` alone (`none`) and must use PKCE; a code
/// issued without a challenge to a confidential client refuses any verifier.
async fn public_clients_and_pkce(db: &TestDb) {
    let api = Api::start_with(db, None).await;
    let (server, token) = tenant(&api, "Shop", "bob").await;
    let phone = Sdk::open(Arc::new(MemoryStorage::new()), SdkConfig::default()).unwrap();
    let account = enrol(&phone, &enrolment_qr(&api, &server, &token, "bob").await).await;
    let (public, none) = register_client(&api, &server, &token, "public").await;
    assert!(none.is_none());
    let (conf, secret) = register_client(&api, &server, &token, "confidential").await;
    let secret = secret.unwrap();
    let (_login, session) = logged_in_session(&api, &server, &token, &phone, &account, 2).await;
    let token_path = format!("/oidc/{server}/token");

    let code1 = code(&api, &public, session, challenge()).await;
    let mut pairs = exchange(&code1, Some(VERIFIER));
    pairs.push(("client_id", &public));
    // A public client sending a secret is refused like a wrong one.
    let mut with_secret = pairs.clone();
    with_secret.push(("client_secret", "whatever"));
    let head = api.head().await;
    refused(
        &post_form(&api, &token_path, None, &with_secret).await,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
    );
    assert_eq!(api.head().await, head);
    let (status, _, tokens) = post_form(&api, &token_path, None, &pairs).await;
    assert_eq!(status, StatusCode::OK, "{tokens}");

    // client_secret_post for the confidential one, a code without PKCE.
    let code2 = code(&api, &conf, session, None).await;
    let head = api.head().await;
    let mut pairs = exchange(&code2, Some(VERIFIER));
    pairs.extend([
        ("client_id", conf.as_str()),
        ("client_secret", secret.as_str()),
    ]);
    refused(
        &post_form(&api, &token_path, None, &pairs).await,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
    );
    assert_eq!(api.head().await, head);
    let mut pairs = exchange(&code2, None);
    pairs.extend([
        ("client_id", conf.as_str()),
        ("client_secret", secret.as_str()),
    ]);
    let (status, _, tokens) = post_form(&api, &token_path, None, &pairs).await;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    api.stop().await;
}

/// The JWKS of `server`, as of at least log position `seen` when given (a rotation's answer).
async fn jwks_at(api: &Api, server: &str, seen: Option<u64>) -> Value {
    let query = seen.map_or_else(String::new, |p| format!("?min_position={p}"));
    let (status, _, jwks) = get_json(api, &format!("/oidc/{server}/jwks{query}"), None).await;
    assert_eq!(status, StatusCode::OK, "{jwks}");
    jwks
}

fn kid_of(token: &str) -> String {
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

/// A key rotation: the new key signs at once, the old one stays in the JWKS while tokens it
/// signed may be in flight (600 s + 120 s) and leaves after.
async fn key_rotation_keeps_tokens_in_flight_verifiable(db: &TestDb) {
    let api = Api::start_with(db, None).await;
    let (server, token) = tenant(&api, "Bank", "carol").await;
    let phone = Sdk::open(Arc::new(MemoryStorage::new()), SdkConfig::default()).unwrap();
    let account = enrol(&phone, &enrolment_qr(&api, &server, &token, "carol").await).await;
    let (rp, secret) = register_client(&api, &server, &token, "confidential").await;
    let secret = secret.unwrap();
    let rp_auth = Some((rp.as_str(), secret.as_str()));
    let (_login, session) = logged_in_session(&api, &server, &token, &phone, &account, 3).await;
    let token_path = format!("/oidc/{server}/token");
    let code1 = code(&api, &rp, session, challenge()).await;
    let (_, _, before) = post_form(
        &api,
        &token_path,
        rp_auth,
        &exchange(&code1, Some(VERIFIER)),
    )
    .await;
    let old_token = before["id_token"].as_str().unwrap().to_owned();
    let old_kid = kid_of(&old_token);

    let (status, rotated) = api
        .call(
            Method::POST,
            &format!("/v1/servers/{server}/oidc/keys"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{rotated}");
    let new_kid = rotated["kid"].as_str().unwrap().to_owned();
    assert_ne!(new_kid, old_kid);
    // Read with the rotation's position: no cached key set from before it.
    let jwks = jwks_at(&api, &server, rotated["position"].as_u64()).await;
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2, "{jwks}");
    assert_eq!(
        jwks["keys"][0]["kid"],
        new_kid.as_str(),
        "the current key first"
    );
    // The token signed before still verifies; a new one is signed by the new key.
    verify_with_jwks(&jwks, &old_token);
    let code2 = code(&api, &rp, session, challenge()).await;
    let (_, _, after) = post_form(
        &api,
        &token_path,
        rp_auth,
        &exchange(&code2, Some(VERIFIER)),
    )
    .await;
    let new_token = after["id_token"].as_str().unwrap();
    assert_eq!(kid_of(new_token), new_kid);
    verify_with_jwks(&jwks, new_token);

    // Once every token the old key signed has expired, it leaves the JWKS.
    api.clock.advance_secs(721);
    let jwks = jwks_at(&api, &server, None).await;
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1, "{jwks}");
    assert_eq!(jwks["keys"][0]["kid"], new_kid.as_str());
    api.stop().await;
}

countersign_eventstore::on_both_backends!(
    the_code_flow_and_its_refusals,
    public_clients_and_pkce,
    key_rotation_keeps_tokens_in_flight_verifiable,
);
