//! The browser side of the OpenID Connect provider over real HTTP: `countersign serve` (API,
//! device gateway and the IdP in one process) on a loopback port, an HTTP client as the
//! browser (its own cookie jar, redirects not followed), and the mobile SDK as the phone,
//! which logs in from the QR code it reads off the hosted page's PNG, as a phone would.
//!
//! Shown: authorize → hosted page (headers, CSP) → QR → phone login → live status → continue
//! → redirect with code, state and iss; SSO answering a code at once; "send to my phone" (a
//! provoke through the FCM stand-in); declined (`access_denied`) and expired (restart) logins;
//! RP-initiated logout ending the phone's session; and the refusals, each
//! writing nothing: unknown client, wrong, extra or repeated redirect URI (a 400 page, no
//! Location), OAuth errors to the client, an open redirect on the login page, posts without
//! or with a wrong CSRF token (403), and the login limiter (429).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use countersign_domain::ServerId;
use countersign_domain::server::{OidcClientKind, OidcClientSettings};
use countersign_eventstore::Metadata;
use countersign_eventstore::testing::TestDb;
use countersign_mobile_sdk::{
    ChannelCallbacks, Interaction, MemoryStorage, NoCallbacks, Platform, PushAction, Sdk,
    SdkConfig, State,
};
use futures::StreamExt as _;
use reqwest::{Method, StatusCode, header};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::api::{Api, next_state};
use crate::device::{enrol, enrolment_qr, tenant};
use crate::leaks::{contains, logs, written};
use crate::push::{PushRig, enrolled_push_phone};

const WAIT: Duration = Duration::from_secs(20);
const RP: &str = "https://rp.test/cb";

/// Percent-encodes a query or form value.
fn enc(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn dec(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 3 <= bytes.len() => {
                out.push(u8::from_str_radix(&text[i + 1..i + 3], 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// The query of a URL as name → value.
fn query(url: &str) -> BTreeMap<String, String> {
    url.split_once('?')
        .map(|(_, q)| q)
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (n, v) = p.split_once('=').unwrap_or((p, ""));
            (dec(n), dec(v))
        })
        .collect()
}

/// A browser: cookies kept by hand, redirects not followed.
struct Browser {
    http: reqwest::Client,
    base: String,
    jar: BTreeMap<String, String>,
    user_agent: &'static str,
}

impl Browser {
    fn new(api: &Api) -> Self {
        Self {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            base: api.base.clone(),
            jar: BTreeMap::new(),
            user_agent: "Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0",
        }
    }

    fn keep(&mut self, response: &reqwest::Response) {
        for value in response.headers().get_all(header::SET_COOKIE) {
            let text = value.to_str().unwrap();
            let (pair, _) = text.split_once(';').unwrap_or((text, ""));
            let (name, value) = pair.split_once('=').unwrap();
            if value.is_empty() || text.contains("Max-Age=0") {
                self.jar.remove(name);
            } else {
                self.jar.insert(name.to_owned(), value.to_owned());
            }
        }
    }

    fn cookie_header(&self) -> String {
        self.jar
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        form: Option<String>,
    ) -> reqwest::Response {
        let url = if path.starts_with("http") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base)
        };
        let mut request = self
            .http
            .request(method, url)
            .header(header::USER_AGENT, self.user_agent);
        if !self.jar.is_empty() {
            request = request.header(header::COOKIE, self.cookie_header());
        }
        if let Some(form) = form {
            request = request
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(form);
        }
        let response = request.send().await.unwrap();
        self.keep(&response);
        response
    }

    async fn get(&mut self, path: &str) -> reqwest::Response {
        self.send(Method::GET, path, None).await
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        let body = form
            .iter()
            .map(|(n, v)| format!("{}={}", enc(n), enc(v)))
            .collect::<Vec<_>>()
            .join("&");
        self.send(Method::POST, path, Some(body)).await
    }
}

fn location(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get(header::LOCATION)
        .map(|v| v.to_str().unwrap().to_owned())
}

/// Asserts that `response` sends the browser to the server's login page.
fn assert_to_page(w: &World, response: &reqwest::Response) {
    assert_eq!(
        location(response).as_deref(),
        Some(format!("/login/{}", w.server).as_str())
    );
}

/// The HTML of the server's login page, as the browser sees it now.
async fn page_html(w: &World, browser: &mut Browser) -> String {
    browser
        .get(&format!("/login/{}", w.server))
        .await
        .text()
        .await
        .unwrap()
}

/// The value of the first `name="csrf"` field of a page.
fn csrf_of(html: &str) -> String {
    let start = html.find("name=\"csrf\" value=\"").unwrap() + "name=\"csrf\" value=\"".len();
    let end = start + html[start..].find('"').unwrap();
    html[start..end].to_owned()
}

/// Reads a QR code PNG back to its bytes, with an independent decoder.
fn decode_qr(png_bytes: &[u8]) -> Vec<u8> {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    let (width, height) = (frame.width as usize, frame.height as usize);
    assert_eq!(frame.color_type, png::ColorType::Grayscale);
    let mut image =
        rqrr::PreparedImage::prepare_from_greyscale(width, height, |x, y| pixels[y * width + x]);
    let grids = image.detect_grids();
    assert_eq!(grids.len(), 1);
    let mut out = Vec::new();
    grids[0].decode_to(&mut out).unwrap();
    out
}

struct Pkce {
    verifier: String,
    challenge: String,
}

fn new_pkce(seed: u8) -> Pkce {
    let verifier = URL_SAFE_NO_PAD.encode([seed; 40]);
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    Pkce {
        verifier,
        challenge,
    }
}

/// A server with continuous sessions, a phone enrolled for `alice`, and a public client.
struct World {
    api: Api,
    server: String,
    client_id: String,
    phone: Sdk,
    account: String,
}

async fn world(api: Api) -> World {
    let (server, token) = tenant(&api, "Bank", "alice").await;
    let (status, body) = api
        .admin(
            Method::PATCH,
            &format!("/v1/servers/{server}"),
            Some(json!({"default_ping_time_secs": 60})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let phone = Sdk::open(Arc::new(MemoryStorage::new()), SdkConfig::default()).unwrap();
    let account = enrol(&phone, &enrolment_qr(&api, &server, &token, "alice").await).await;
    let client_id = register(&api, &server, "Shop", OidcClientKind::Public).await;
    World {
        api,
        server,
        client_id,
        phone,
        account,
    }
}

async fn register(api: &Api, server: &str, name: &str, kind: OidcClientKind) -> String {
    let settings = OidcClientSettings {
        name: name.into(),
        kind,
        redirect_uris: vec![RP.into(), "http://127.0.0.1:9/cb".into()],
        post_logout_redirect_uris: vec!["https://rp.test/bye".into()],
        scopes: vec!["openid".into(), "profile".into()],
        backchannel_logout_uri: None,
        ciba: None,
    };
    let state = &api.running.state;
    let (client, _, done) = state
        .commands()
        .servers
        .register_oidc_client(
            ServerId::parse_hex(server).unwrap(),
            settings,
            &Metadata::default(),
            None,
        )
        .await
        .unwrap();
    state.wait_for(done.position).await.unwrap();
    client.to_string()
}

fn authorize_path(w: &World, pkce: &Pkce, extra: &str) -> String {
    format!(
        "/oidc/{}/authorize?response_type=code&client_id={}&redirect_uri={}&scope={}\
         &state=st-1&nonce=n-1&code_challenge={}&code_challenge_method=S256{extra}",
        w.server,
        w.client_id,
        enc(RP),
        enc("openid profile email"),
        pkce.challenge,
    )
}

fn assert_hardened(response: &reqwest::Response) {
    let h = response.headers();
    let csp = h[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    for part in [
        "default-src 'none'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "script-src 'nonce-",
    ] {
        assert!(csp.contains(part), "{csp}");
    }
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(h[header::X_FRAME_OPTIONS], "DENY");
    assert_eq!(h[header::REFERRER_POLICY], "no-referrer");
    assert_eq!(h[header::CACHE_CONTROL], "no-store");
    assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
}

/// Authorize to the page: answers the page's HTML.
async fn to_page(w: &World, browser: &mut Browser, pkce: &Pkce) -> String {
    let response = browser.get(&authorize_path(w, pkce, "")).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_to_page(w, &response);
    let set = response.headers()[header::SET_COOKIE].to_str().unwrap();
    assert!(set.starts_with("cs_authz="), "{set}");
    for attribute in ["HttpOnly", "SameSite=Lax", "Path=/", "Max-Age="] {
        assert!(set.contains(attribute), "{set}");
    }
    assert!(!set.contains("Secure"), "plain http: no Secure ({set})");
    let page = browser.get(&format!("/login/{}", w.server)).await;
    assert_eq!(page.status(), StatusCode::OK);
    assert_hardened(&page);
    let csp = page.headers()[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("form-action 'self' https://rp.test"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(html.contains("Bank"), "server name");
    assert!(
        html.contains("Log in to <strong>Shop</strong>"),
        "client name"
    );
    assert!(html.contains(&format!("src=\"/login/{}/qr.png\"", w.server)));
    let nonce = csp
        .split("'nonce-")
        .nth(1)
        .unwrap()
        .split('\'')
        .next()
        .unwrap()
        .to_owned();
    assert!(html.contains(&format!("<script nonce=\"{nonce}\">")));
    assert!(
        !html.contains("open-app"),
        "no deep link on a desktop browser"
    );
    html
}

/// The phone reads the page's QR code and logs in.
async fn phone_logs_in(w: &World, browser: &mut Browser) -> countersign_mobile_sdk::SessionHandle {
    let png = browser.get(&format!("/login/{}/qr.png", w.server)).await;
    assert_eq!(png.status(), StatusCode::OK);
    assert_eq!(png.headers()[header::CONTENT_TYPE], "image/png");
    assert_eq!(png.headers()[header::CACHE_CONTROL], "no-store");
    let scanned = decode_qr(&png.bytes().await.unwrap());
    let (callbacks, _events) = ChannelCallbacks::new();
    let login = w.phone.start_session(&scanned, callbacks).await.unwrap();
    assert_eq!(
        login.state(),
        State::UserInteraction(Interaction::WaitForConfirmation)
    );
    assert_eq!(login.announce_info().as_deref(), Some("Log in to Shop"));
    login.set_account(Some(&w.account)).await.unwrap();
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
    login
}

/// Follows the page's status stream until the phone logged in.
async fn until_logged_in(w: &World, browser: &mut Browser) {
    let events = browser.get(&format!("/login/{}/events", w.server)).await;
    let mut stream = events.bytes_stream();
    let mut buffer = String::new();
    for _ in 0..5 {
        if next_state(&mut stream, &mut buffer).await["state"] == "logged_in" {
            return;
        }
    }
    panic!("not logged in");
}

/// Continue on the page: answers the code sent back to the client.
async fn continue_to_client(w: &World, browser: &mut Browser, csrf: &str) -> String {
    let done = browser
        .post(&format!("/login/{}/continue", w.server), &[("csrf", csrf)])
        .await;
    let status = done.status();
    if status != StatusCode::SEE_OTHER {
        panic!("continue: {status}: {}", done.text().await.unwrap());
    }
    let back = location(&done).unwrap();
    assert!(back.starts_with(&format!("{RP}?")), "{back}");
    query(&back)["code"].clone()
}

async fn browser_login_then_sso(db: &TestDb) {
    let logged = logs();
    let w = world(Api::start_with(db, None).await).await;
    let mut browser = Browser::new(&w.api);
    let pkce = new_pkce(1);
    let html = to_page(&w, &mut browser, &pkce).await;
    let csrf = csrf_of(&html);

    // Live status: the current state at once, then each change.
    let events = browser.get(&format!("/login/{}/events", w.server)).await;
    assert_eq!(events.status(), StatusCode::OK);
    assert_eq!(events.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut stream = events.bytes_stream();
    let mut buffer = String::new();
    let first = next_state(&mut stream, &mut buffer).await;
    assert_eq!(first, json!({"state": "pending", "provoke": false}));

    // Continue before the phone logged in: back to the page, nothing written.
    let head = w.api.head().await;
    let early = browser
        .post(&format!("/login/{}/continue", w.server), &[("csrf", &csrf)])
        .await;
    assert_eq!(early.status(), StatusCode::SEE_OTHER);
    assert_to_page(&w, &early);
    assert_eq!(w.api.head().await, head);

    let login = phone_logs_in(&w, &mut browser).await;
    let mut seen = Vec::new();
    loop {
        let state = next_state(&mut stream, &mut buffer).await;
        let name = state["state"].as_str().unwrap().to_owned();
        seen.push(name.clone());
        if name == "logged_in" {
            break;
        }
        assert!(seen.len() < 5, "{seen:?}");
    }
    assert!(
        tokio::time::timeout(WAIT, stream.next())
            .await
            .unwrap()
            .is_none(),
        "the status stream ends on a final state"
    );

    // Continue: a code for the client, with state and iss.
    let authz_cookie = browser.jar["cs_authz"].clone();
    let done = browser
        .post(&format!("/login/{}/continue", w.server), &[("csrf", &csrf)])
        .await;
    assert_eq!(done.status(), StatusCode::SEE_OTHER);
    let back = location(&done).unwrap();
    assert!(back.starts_with(&format!("{RP}?")), "{back}");
    let params = query(&back);
    let code = params["code"].clone();
    assert_eq!(code.len(), 64);
    assert_eq!(params["state"], "st-1");
    assert_eq!(params["iss"], format!("{}/oidc/{}", w.api.base, w.server));
    assert!(!browser.jar.contains_key("cs_authz"), "cs_authz cleared");
    let sso_cookie = browser.jar["cs_sso"].clone();

    // The code exchanges at the token endpoint (client auth `none`, PKCE).
    let token = w
        .api
        .http
        .post(w.api.url(&format!("/oidc/{}/token", w.server)))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(format!(
            "grant_type=authorization_code&code={code}&redirect_uri={}&client_id={}&code_verifier={}",
            enc(RP),
            w.client_id,
            pkce.verifier
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(token.status(), StatusCode::OK);
    let answer: serde_json::Value = token.json().await.unwrap();
    let id_token = answer["id_token"].as_str().unwrap().to_owned();

    // SSO: a second authorize answers a code at once, without a new session.
    let second = new_pkce(2);
    let head = w.api.head().await.unwrap();
    let again = browser.get(&authorize_path(&w, &second, "")).await;
    assert_eq!(again.status(), StatusCode::SEE_OTHER);
    let back = location(&again).unwrap();
    assert!(back.starts_with(&format!("{RP}?")), "{back}");
    let params = query(&back);
    assert_eq!(params["code"].len(), 64);
    assert_ne!(params["code"], code);
    assert_eq!(params["state"], "st-1");
    let events = w
        .api
        .running
        .state
        .store()
        .read_all(head + 1, 100)
        .await
        .unwrap();
    assert!(
        events.iter().all(|e| !e.event_type.starts_with("session.")),
        "SSO opens no session: {:?}",
        events.iter().map(|e| &e.event_type).collect::<Vec<_>>()
    );
    // prompt=login asks the phone again: a new session and the page.
    let forced = browser
        .get(&authorize_path(&w, &new_pkce(3), "&prompt=login"))
        .await;
    assert_to_page(&w, &forced);

    // prompt=none without a login: login_required, to the client, nothing written.
    let mut stranger = Browser::new(&w.api);
    let head = w.api.head().await;
    let none = stranger
        .get(&authorize_path(&w, &new_pkce(4), "&prompt=none"))
        .await;
    let params = query(&location(&none).unwrap());
    assert_eq!(params["error"], "login_required");
    assert_eq!(params["state"], "st-1");
    assert_eq!(w.api.head().await, head);

    // RP-initiated logout. Without a hint: a confirmation page, whose form needs its token.
    let confirm = browser
        .get(&format!("/oidc/{}/end_session", w.server))
        .await;
    assert_eq!(confirm.status(), StatusCode::OK);
    assert_hardened(&confirm);
    let logout_csrf = csrf_of(&confirm.text().await.unwrap());
    let head = w.api.head().await;
    let forged = browser
        .post(
            &format!("/oidc/{}/end_session", w.server),
            &[("confirm", "yes"), ("csrf", &logout_csrf[2..])],
        )
        .await;
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    // With the hint: a return address the client did not register is refused.
    for (hint, to) in [
        (id_token.as_str(), "https://evil.test/bye"),
        (id_token.as_str(), "https://rp.test/bye/x"),
        (&id_token[..id_token.len() - 2], "https://rp.test/bye"),
    ] {
        let refused = browser
            .get(&format!(
                "/oidc/{}/end_session?id_token_hint={hint}&post_logout_redirect_uri={}",
                w.server,
                enc(to)
            ))
            .await;
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "{to}");
        assert!(location(&refused).is_none());
    }
    assert_eq!(w.api.head().await, head, "refused logouts write nothing");
    assert!(browser.jar.contains_key("cs_sso"));
    let out = browser
        .get(&format!(
            "/oidc/{}/end_session?id_token_hint={id_token}&post_logout_redirect_uri={}&state=bye-1",
            w.server,
            enc("https://rp.test/bye")
        ))
        .await;
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        location(&out).as_deref(),
        Some("https://rp.test/bye?state=bye-1")
    );
    assert!(!browser.jar.contains_key("cs_sso"), "cs_sso cleared");
    // The phone's session ended with it.
    tokio::time::timeout(WAIT, login.wait_for(|s| s.state == State::Done))
        .await
        .unwrap();
    let head = w.api.head().await.unwrap();
    let logged_out = w
        .api
        .running
        .state
        .store()
        .read_all(0, 10_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == "session.logged_out")
        .count();
    assert_eq!(logged_out, 1, "up to {head}");

    // No cookie value, code or verifier in a log line or anything written.
    let text = logged.text();
    assert!(text.contains("session"), "the log capture works");
    let stored = written(&w.api, db).await;
    for secret in [&authz_cookie, &sso_cookie, &code, &pkce.verifier] {
        assert!(!text.contains(secret.as_str()), "a secret in the logs");
        assert!(!contains(&stored, secret.as_bytes()), "a secret written");
    }
    w.api.stop().await;
}

async fn refusals_write_nothing(db: &TestDb) {
    let w = world(Api::start_with(db, None).await).await;
    let pkce = new_pkce(1);
    let mut browser = Browser::new(&w.api);
    let head = w.api.head().await;

    // Client and redirect URI first: a 400 page, never a redirect.
    let base = format!(
        "/oidc/{}/authorize?response_type=code&scope=openid&state=s\
         &code_challenge={}&code_challenge_method=S256",
        w.server, pkce.challenge
    );
    let unknown = "0".repeat(32);
    for (case, extra) in [
        (
            "unknown client",
            format!("&client_id={unknown}&redirect_uri={}", enc(RP)),
        ),
        ("no client", format!("&redirect_uri={}", enc(RP))),
        (
            "unregistered redirect",
            format!(
                "&client_id={}&redirect_uri={}",
                w.client_id,
                enc("https://evil.test/cb")
            ),
        ),
        (
            "extra path",
            format!(
                "&client_id={}&redirect_uri={}",
                w.client_id,
                enc("https://rp.test/cb/x")
            ),
        ),
        (
            "extra query",
            format!(
                "&client_id={}&redirect_uri={}",
                w.client_id,
                enc("https://rp.test/cb?a=1")
            ),
        ),
        (
            "two redirect URIs",
            format!(
                "&client_id={}&redirect_uri={}&redirect_uri={}",
                w.client_id,
                enc(RP),
                enc("https://evil.test/cb")
            ),
        ),
        ("no redirect URI", format!("&client_id={}", w.client_id)),
    ] {
        let response = browser.get(&format!("{base}{extra}")).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{case}");
        assert!(location(&response).is_none(), "{case}: no redirect");
        assert!(
            response.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/html"),
            "{case}"
        );
        assert_hardened(&response);
    }

    // Then OAuth errors go back to the client with state and iss.
    let path = |params: &str| {
        format!(
            "/oidc/{}/authorize?client_id={}&redirect_uri={}&state=s{params}",
            w.server,
            w.client_id,
            enc(RP)
        )
    };
    for (case, params, error) in [
        (
            "token response type",
            format!(
                "&response_type=token&scope=openid&code_challenge={}&code_challenge_method=S256",
                pkce.challenge
            ),
            "unsupported_response_type",
        ),
        (
            "no openid",
            format!(
                "&response_type=code&scope=profile&code_challenge={}&code_challenge_method=S256",
                pkce.challenge
            ),
            "invalid_scope",
        ),
        (
            "public client without PKCE",
            "&response_type=code&scope=openid".to_owned(),
            "invalid_request",
        ),
        (
            "plain PKCE",
            format!(
                "&response_type=code&scope=openid&code_challenge={}&code_challenge_method=plain",
                pkce.verifier
            ),
            "invalid_request",
        ),
        (
            "repeated scope",
            format!(
                "&response_type=code&scope=openid&scope=openid&code_challenge={}&code_challenge_method=S256",
                pkce.challenge
            ),
            "invalid_request",
        ),
    ] {
        let response = browser.get(&path(&params)).await;
        assert_eq!(response.status(), StatusCode::SEE_OTHER, "{case}");
        let back = location(&response).unwrap();
        assert!(back.starts_with(&format!("{RP}?")), "{case}: {back}");
        let q = query(&back);
        assert_eq!(q["error"], error, "{case}");
        assert_eq!(q["state"], "s", "{case}");
        assert_eq!(
            q["iss"],
            format!("{}/oidc/{}", w.api.base, w.server),
            "{case}"
        );
        assert!(q.contains_key("error_description"), "{case}");
    }

    // An open redirect on the plain login page.
    for return_to in [
        "https://evil.test/",
        "https://rp.test/cb/../evil",
        "//evil.test",
    ] {
        let response = browser
            .get(&format!(
                "/login/{}?client_id={}&return_to={}",
                w.server,
                w.client_id,
                enc(return_to)
            ))
            .await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{return_to}");
        assert!(location(&response).is_none());
    }
    assert_eq!(w.api.head().await, head, "nothing written so far");

    // Posts without, or with a wrong, CSRF token: 403, nothing written.
    let html = to_page(&w, &mut browser, &pkce).await;
    let csrf = csrf_of(&html);
    let head = w.api.head().await;
    for step in ["continue", "provoke", "restart"] {
        for form in [vec![], vec![("csrf", "AAAA")], vec![("csrf", &csrf[1..])]] {
            let response = browser
                .post(&format!("/login/{}/{step}", w.server), &form)
                .await;
            assert_eq!(response.status(), StatusCode::FORBIDDEN, "{step} {form:?}");
            assert!(location(&response).is_none());
        }
    }
    assert_eq!(w.api.head().await, head, "forged posts write nothing");
    // Another browser's token does not fit this browser's cookie.
    let mut other = Browser::new(&w.api);
    let other_csrf = csrf_of(&to_page(&w, &mut other, &pkce).await);
    let head = w.api.head().await;
    let response = browser
        .post(
            &format!("/login/{}/continue", w.server),
            &[("csrf", &other_csrf)],
        )
        .await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    // Without any cookie.
    let mut bare = Browser::new(&w.api);
    let response = bare
        .post(&format!("/login/{}/continue", w.server), &[("csrf", &csrf)])
        .await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    // With the token but no earlier login: nothing to send to the phone.
    let response = browser
        .post(&format!("/login/{}/provoke", w.server), &[("csrf", &csrf)])
        .await;
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert_eq!(w.api.head().await, head, "refused posts write nothing");

    // A cookie sealed for one server means nothing at another.
    let (second, _) = tenant(&w.api, "Other", "bob").await;
    let response = browser.get(&format!("/login/{second}")).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = browser.get(&format!("/login/{second}/qr.png")).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    w.api.stop().await;
}

async fn the_login_limiter_answers_429(db: &TestDb) {
    let api = Api::start_tuned(db, |args| {
        args.idp.login_burst = 1;
        args.idp.login_per_second = 0;
    })
    .await;
    let w = world(api).await;
    let pkce = new_pkce(1);
    let mut first = Browser::new(&w.api);
    let _ = to_page(&w, &mut first, &pkce).await;
    let head = w.api.head().await;
    let mut second = Browser::new(&w.api);
    let refused = second.get(&authorize_path(&w, &pkce, "")).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(location(&refused).is_none());
    assert!(refused.headers().get(header::SET_COOKIE).is_none());
    assert!(refused.headers().contains_key(header::RETRY_AFTER));
    assert_eq!(w.api.head().await, head, "a refused login writes nothing");
    w.api.stop().await;
}

async fn a_phone_browser_gets_the_deep_link(db: &TestDb) {
    let w = world(Api::start_with(db, None).await).await;
    let mut browser = Browser::new(&w.api);
    browser.user_agent = "Mozilla/5.0 (iPhone; CPU iPhone OS 18_0 like Mac OS X) Mobile/15E148";
    let response = browser.get(&authorize_path(&w, &new_pkce(1), "")).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let html = page_html(&w, &mut browser).await;
    let start = html.find("id=\"open-app\" href=\"").unwrap() + "id=\"open-app\" href=\"".len();
    let link = &html[start..start + html[start..].find('"').unwrap()];
    assert!(link.starts_with("countersign:"), "{link}");
    // The link is the QR code's payload.
    let png = browser.get(&format!("/login/{}/qr.png", w.server)).await;
    let scanned = decode_qr(&png.bytes().await.unwrap());
    let from_link = countersign_protocol::qr::QrPayload::from_deep_link(link).unwrap();
    assert_eq!(from_link.encode(), scanned);
    w.api.stop().await;
}

/// "Send to my phone": a browser that logged in before asks that phone again by push, and the
/// pending authorization moves onto that session.
async fn send_to_my_phone(db: &TestDb) {
    let PushRig {
        api,
        fcm,
        dir: _dir,
        ..
    } = PushRig::start(db, false).await;
    // One-shot logins (the server's default): a completed login can be asked again.
    let (server, token) = tenant(&api, "Bank", "alice").await;
    let (phone, account) =
        enrolled_push_phone(&api, &server, &token, "alice", Platform::Fcm, "token-alice").await;
    let client_id = register(&api, &server, "Shop", OidcClientKind::Public).await;
    let w = World {
        api,
        server,
        client_id,
        phone,
        account,
    };

    // The first login, by the QR code.
    let mut browser = Browser::new(&w.api);
    let csrf = csrf_of(&to_page(&w, &mut browser, &new_pkce(1)).await);
    let _first = phone_logs_in(&w, &mut browser).await;
    until_logged_in(&w, &mut browser).await;
    continue_to_client(&w, &mut browser, &csrf).await;

    // Asked again (prompt=login): the page offers to send it to the phone.
    let again = browser
        .get(&authorize_path(&w, &new_pkce(2), "&prompt=login"))
        .await;
    assert_eq!(again.status(), StatusCode::SEE_OTHER);
    let html = page_html(&w, &mut browser).await;
    assert!(html.contains(&format!("action=\"/login/{}/provoke\"", w.server)));
    let csrf = csrf_of(&html);
    let events = browser.get(&format!("/login/{}/events", w.server)).await;
    let mut stream = events.bytes_stream();
    let mut buffer = String::new();
    assert_eq!(
        next_state(&mut stream, &mut buffer).await,
        json!({"state": "pending", "provoke": true})
    );
    drop(stream);
    let aborted_before = count(&w.api, "session.aborted").await;
    let sent = browser
        .post(&format!("/login/{}/provoke", w.server), &[("csrf", &csrf)])
        .await;
    assert_eq!(sent.status(), StatusCode::SEE_OTHER);
    assert_to_page(&w, &sent);
    assert_eq!(
        count(&w.api, "session.aborted").await,
        aborted_before + 1,
        "the QR code's session is ended"
    );
    let push = tokio::time::timeout(WAIT, fcm.next_push("token-alice"))
        .await
        .unwrap();
    let bytes = serde_json::to_vec(&push.payload_json).unwrap();
    let PushAction::Login(login) = w
        .phone
        .process_push(&bytes, Arc::new(NoCallbacks))
        .await
        .unwrap()
    else {
        panic!("not a login")
    };
    assert_eq!(login.announce_info().as_deref(), Some("Log in to Shop"));
    login.set_account(Some(&w.account)).await.unwrap();
    // The page the provoke sent the browser back to: its cookie, and so its token, are new.
    let html = page_html(&w, &mut browser).await;
    let moved = csrf_of(&html);
    assert_ne!(moved, csrf);
    until_logged_in(&w, &mut browser).await;
    let code = continue_to_client(&w, &mut browser, &moved).await;
    assert_eq!(code.len(), 64);
    w.api.stop().await;
}

async fn count(api: &Api, event_type: &str) -> usize {
    api.running
        .state
        .store()
        .read_all(0, 100_000)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.event_type == event_type)
        .count()
}

/// Declined on the phone → `access_denied` to the client; expired → a page that starts again.
async fn declined_and_expired_logins(db: &TestDb) {
    let w = world(Api::start_with(db, None).await).await;
    let mut browser = Browser::new(&w.api);
    let csrf = csrf_of(&to_page(&w, &mut browser, &new_pkce(1)).await);
    let png = browser.get(&format!("/login/{}/qr.png", w.server)).await;
    let scanned = decode_qr(&png.bytes().await.unwrap());
    let (callbacks, _events) = ChannelCallbacks::new();
    let login = w.phone.start_session(&scanned, callbacks).await.unwrap();
    login.stop_session().await.unwrap();
    let events = browser.get(&format!("/login/{}/events", w.server)).await;
    let mut stream = events.bytes_stream();
    let mut buffer = String::new();
    for _ in 0..5 {
        if next_state(&mut stream, &mut buffer).await["state"] == "aborted" {
            break;
        }
    }
    let done = browser
        .post(&format!("/login/{}/continue", w.server), &[("csrf", &csrf)])
        .await;
    assert_eq!(done.status(), StatusCode::SEE_OTHER);
    let params = query(&location(&done).unwrap());
    assert_eq!(params["error"], "access_denied");
    assert_eq!(params["state"], "st-1");
    assert!(!browser.jar.contains_key("cs_authz"), "cs_authz cleared");

    // Nobody scans: the session expires; the page says so and starts again.
    let csrf = csrf_of(&to_page(&w, &mut browser, &new_pkce(2)).await);
    let events = browser.get(&format!("/login/{}/events", w.server)).await;
    let mut stream = events.bytes_stream();
    let mut buffer = String::new();
    assert_eq!(
        next_state(&mut stream, &mut buffer).await["state"],
        "pending"
    );
    w.api.clock.advance_secs(301);
    assert_eq!(
        next_state(&mut stream, &mut buffer).await["state"],
        "expired"
    );
    let page = browser.get(&format!("/login/{}", w.server)).await;
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(html.contains("The login expired"), "{html}");
    assert_eq!(csrf_of(&html), csrf);
    let expired = browser
        .post(&format!("/login/{}/continue", w.server), &[("csrf", &csrf)])
        .await;
    assert_eq!(expired.status(), StatusCode::OK);
    assert!(expired.text().await.unwrap().contains("restart"));
    let before = browser.jar["cs_authz"].clone();
    let restarted = browser
        .post(&format!("/login/{}/restart", w.server), &[("csrf", &csrf)])
        .await;
    assert_eq!(restarted.status(), StatusCode::SEE_OTHER);
    assert_to_page(&w, &restarted);
    assert_ne!(
        browser.jar["cs_authz"], before,
        "a new pending authorization"
    );
    let page = browser.get(&format!("/login/{}", w.server)).await;
    let html = page.text().await.unwrap();
    assert!(html.contains("Log in to <strong>Shop</strong>"));
    let _ = phone_logs_in(&w, &mut browser).await;
    until_logged_in(&w, &mut browser).await;
    let code = continue_to_client(&w, &mut browser, &csrf_of(&html)).await;
    assert_eq!(code.len(), 64);
    w.api.stop().await;
}

countersign_eventstore::on_both_backends!(
    declined_and_expired_logins,
    send_to_my_phone,
    browser_login_then_sso,
    refusals_write_nothing,
    the_login_limiter_answers_429,
    a_phone_browser_gets_the_deep_link,
);
