//! The business API over real HTTP: `countersign serve`'s own start-up code on a loopback
//! port, against PostgreSQL and SQLite, driven with an HTTP client. Device-side steps (scan,
//! login, account registration) go through the same command services the device gateway
//! uses, standing in for it until it exists.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use countersign::config::Settings;
use countersign::serve::{Running, ServeArgs, start};
use countersign_commands::Clock;
use countersign_domain::account::RegisterAccount;
use countersign_domain::{AccountId, AccountRef, AppInstanceId, ServerId, Timestamp};
use countersign_eventstore::testing::TestDb;
use countersign_eventstore::{Direction, Metadata};
use countersign_protocol::qr::{QrKind, QrPayload};
use futures::StreamExt as _;
use reqwest::StatusCode;
use serde_json::{Value, json};

pub(crate) const ADMIN_KEY: &str = "test-admin-key-0123456789abcdef0123456789";
const START: i64 = 1_790_000_000_000;

/// A clock the test moves by hand.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    pub fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }

    pub fn advance_secs(&self, secs: i64) {
        self.0.fetch_add(secs * 1000, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

/// A served API on the test's database.
pub struct Api {
    pub running: Running,
    pub base: String,
    pub http: reqwest::Client,
    pub clock: ManualClock,
    _dir: tempfile::TempDir,
}

impl Api {
    pub async fn start(db: &TestDb) -> Self {
        Self::start_with(db, Some("wss://gateway.test/v1/device")).await
    }

    /// With `gateway_url: None` the QR codes name this process's own device gateway.
    pub async fn start_with(db: &TestDb, gateway_url: Option<&str>) -> Self {
        Self::start_trusting(db, gateway_url, Vec::new()).await
    }

    /// Also trusting these SFS attestation keys (SEC1 hex) besides the deployment's own.
    pub async fn start_trusting(
        db: &TestDb,
        gateway_url: Option<&str>,
        trust_sfs_keys: Vec<String>,
    ) -> Self {
        Self::start_on(
            db,
            gateway_url,
            trust_sfs_keys,
            "127.0.0.1:0".parse().unwrap(),
            |_| {},
        )
        .await
    }

    /// With settings changed by `tune` (limits, timeouts); QR codes name this process's own
    /// device gateway.
    pub async fn start_tuned(db: &TestDb, tune: impl FnOnce(&mut ServeArgs)) -> Self {
        Self::start_on(db, None, Vec::new(), "127.0.0.1:0".parse().unwrap(), tune).await
    }

    /// Stops this server and starts a new one on the same address and database (a restart,
    /// as clients that kept the address see it); the clock starts again from `START`.
    pub async fn restart(self, db: &TestDb) -> Self {
        let addr = self.running.addr;
        self.stop().await;
        Self::start_on(db, None, Vec::new(), addr, |_| {}).await
    }

    async fn start_on(
        db: &TestDb,
        gateway_url: Option<&str>,
        trust_sfs_keys: Vec<String>,
        listen: std::net::SocketAddr,
        tune: impl FnOnce(&mut ServeArgs),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let master = dir.path().join("master.key");
        std::fs::write(&master, "11".repeat(32)).unwrap();
        let admin = dir.path().join("admin.key");
        std::fs::write(&admin, ADMIN_KEY).unwrap();
        let settings = Settings {
            database_url: db.url().to_owned(),
            database_url_is_default: false,
            pool_size: 8,
            master_key_file: Some(master),
            log: None,
        };
        let mut args = ServeArgs::local(admin);
        args.listen = listen;
        args.gateway_url = gateway_url.map(str::to_owned);
        args.max_wait_ms = 2_000;
        args.expiry_interval_ms = 50;
        args.checkpoint_interval_ms = 100;
        args.trust_sfs_keys = trust_sfs_keys;
        tune(&mut args);
        let clock = ManualClock(Arc::new(AtomicI64::new(START)));
        let running = start(&settings, &args, Arc::new(clock.clone()))
            .await
            .unwrap();
        Self {
            base: format!("http://{}", running.addr),
            running,
            http: reqwest::Client::new(),
            clock,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request and answers (status, JSON body or Null).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        call_at(&self.http, &self.base, method, path, token, body).await
    }

    /// A GET that waits for the read models to reach `position` (read-your-writes).
    pub async fn read(
        &self,
        path: &str,
        token: Option<&str>,
        position: impl std::fmt::Display,
    ) -> (StatusCode, Value) {
        let joiner = if path.contains('?') { '&' } else { '?' };
        let path = format!("{path}{joiner}min_position={position}");
        self.call(Method::GET, &path, token, None).await
    }

    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.call(method, path, Some(ADMIN_KEY), body).await
    }

    /// A server with one API key: (server id, token).
    pub async fn tenant(&self, name: &str) -> (String, String) {
        let (status, created) = self
            .admin(
                reqwest::Method::POST,
                "/v1/servers",
                Some(json!({"name": name})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let server = created["server"]["server_id"].as_str().unwrap().to_owned();
        let (status, key) = self
            .admin(
                reqwest::Method::POST,
                &format!("/v1/servers/{server}/api-keys"),
                Some(json!({"label": "backend"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{key}");
        (server, key["token"].as_str().unwrap().to_owned())
    }

    pub async fn head(&self) -> Option<u64> {
        self.running.state.store().last_position().await.unwrap()
    }

    /// `/metrics`, as text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn stop(self) {
        self.running.stop().await.unwrap();
    }
}

/// Sends a request to the server at `base` and answers (status, JSON body or Null).
pub(crate) async fn call_at(
    http: &reqwest::Client,
    base: &str,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = http.request(method, format!("{base}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    send(request).await
}

/// [`call_at`] on the login session of `nonce`, named as integrators should: in `X-Nonce`,
/// with `path` the session's header-form path (`/v1/servers/{server}/session…`).
pub(crate) async fn session_call_at(
    http: &reqwest::Client,
    base: &str,
    method: reqwest::Method,
    path: &str,
    token: &str,
    nonce: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = http
        .request(method, format!("{base}{path}"))
        .bearer_auth(token)
        .header("X-Nonce", nonce);
    if let Some(body) = body {
        request = request.json(&body);
    }
    send(request).await
}

async fn send(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let response = request.send().await.unwrap();
    let status = response.status();
    let bytes = response.bytes().await.unwrap();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, value)
}

fn nonce(byte: u8) -> String {
    hex::encode([byte; 16])
}

pub(crate) fn p256_point(seed: u8) -> Vec<u8> {
    let secret = p256::SecretKey::from_slice(&[seed; 32]).unwrap();
    secret.public_key().to_sec1_bytes().to_vec()
}

/// Registers an account for a user, as the device gateway does after an enrolment.
pub(crate) async fn register_account(api: &Api, server: &str, userid: &str, seed: u8) -> AccountId {
    let server: ServerId = server.parse().unwrap();
    let account_id = AccountId::from_bytes([seed; 16]);
    let user = api
        .running
        .state
        .commands()
        .users
        .user_ref(server, userid)
        .await
        .unwrap();
    api.running
        .state
        .commands()
        .accounts
        .register(
            RegisterAccount {
                account: AccountRef::new(server, account_id),
                app_instance: AppInstanceId::from_bytes([seed; 16]),
                user: Some(user.digest),
                channel_public_key: p256_point(seed),
                signing_public_key: p256_point(seed.wrapping_add(1)),
                second_factor: None,
            },
            &Metadata::default(),
        )
        .await
        .unwrap();
    account_id
}

use reqwest::Method;

async fn admin_manages_servers_and_keys(db: &TestDb) {
    let api = Api::start(db).await;
    let (status, problem) = api.call(Method::GET, "/v1/servers", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(problem["status"], 401);
    let (status, _) = api
        .call(
            Method::GET,
            "/v1/servers",
            Some("wrong-key-wrong-key-wrong-key-wrong"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, created) = api
        .admin(Method::POST, "/v1/servers", Some(json!({"name": "Bank"})))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let server = created["server"]["server_id"].as_str().unwrap().to_owned();
    assert_eq!(created["server"]["public_key"].as_str().unwrap().len(), 130);
    assert_eq!(created["server"]["second_factor"], "pin_or_biometric");
    let position = created["position"].as_u64().unwrap();

    let (status, read) = api
        .admin(
            Method::GET,
            &format!("/v1/servers/{server}?min_position={position}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(read["name"], "Bank");

    let (status, updated) = api
        .admin(
            Method::PATCH,
            &format!("/v1/servers/{server}"),
            Some(
                json!({"name": "Bank 2", "second_factor": "pin", "second_factor_cache_secs": 60,
                        "session_timeout_secs": 120, "default_ping_time_secs": 30,
                        "logo_url": "https://bank.example/logo.png"}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["server"]["second_factor"], "pin");
    assert_eq!(updated["server"]["second_factor_cache_secs"], 60);
    assert_eq!(updated["server"]["session_timeout_secs"], 120);
    assert_eq!(
        updated["server"]["logo_url"],
        "https://bank.example/logo.png"
    );

    let before = api.head().await;
    for bad in [
        json!({"session_timeout_secs": 5}),
        json!({"logo_url": "http://insecure.example/logo.png"}),
        json!({"name": ""}),
        json!({"second_factor": "retina"}),
        json!({"unknown": 1}),
    ] {
        let (status, problem) = api
            .admin(
                Method::PATCH,
                &format!("/v1/servers/{server}"),
                Some(bad.clone()),
            )
            .await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{bad} → {problem}"
        );
        assert!(problem["detail"].is_string());
    }
    assert_eq!(api.head().await, before, "refused updates wrote nothing");

    let (status, key) = api
        .admin(
            Method::POST,
            &format!("/v1/servers/{server}/api-keys"),
            Some(json!({"label": "web"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let token = key["token"].as_str().unwrap().to_owned();
    assert!(
        token.starts_with("cs_") && token.len() >= 3 + 32 + 1 + 64,
        "{token}"
    );
    let key_id = key["key_id"].as_str().unwrap().to_owned();
    let (status, keys) = api
        .admin(Method::GET, &format!("/v1/servers/{server}/api-keys"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(keys["api_keys"][0]["key_id"], key_id.as_str());
    assert!(
        !keys.to_string().contains(&token[20..]),
        "a listing never shows a secret"
    );

    let users = format!("/v1/servers/{server}/users");
    assert_eq!(
        api.call(Method::GET, &users, Some(&token), None).await.0,
        StatusCode::OK
    );
    let (status, _) = api
        .admin(
            Method::DELETE,
            &format!("/v1/servers/{server}/api-keys/{key_id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        api.call(Method::GET, &users, Some(&token), None).await.0,
        StatusCode::UNAUTHORIZED,
        "a revoked key stops at once"
    );

    let (status, list) = api.admin(Method::GET, "/v1/servers?limit=10", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["servers"].as_array().unwrap().len(), 1);

    let (status, _) = api
        .admin(Method::DELETE, &format!("/v1/servers/{server}"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = api
        .admin(Method::GET, &format!("/v1/servers/{server}"), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    api.stop().await;
}

async fn users_accounts_and_shredding(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    let alice = format!("/v1/servers/{server}/users/alice%40example.org");
    let (status, put) = api
        .call(
            Method::PUT,
            &alice,
            Some(&token),
            Some(json!({"attributes": {"name": "Alice", "email": "alice@example.org"}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{put}");
    let (status, put) = api
        .call(
            Method::PUT,
            &alice,
            Some(&token),
            Some(json!({"attributes": {"name": "Alice A."}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let position = put["position"].as_u64().unwrap();
    let (status, user) = api.read(&alice, Some(&token), position).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        user,
        json!({"userid": "alice@example.org", "attributes": {"name": "Alice A."}})
    );

    for who in ["bob", "carol"] {
        let (status, _) = api
            .call(
                Method::PUT,
                &format!("/v1/servers/{server}/users/{who}"),
                Some(&token),
                Some(json!({})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let head = api.head().await.unwrap();
    let (status, page) = api
        .read(
            &format!("/v1/servers/{server}/users?limit=2"),
            Some(&token),
            head,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = page["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["userid"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alice@example.org", "bob"]);
    let next = page["next"].as_u64().unwrap();
    let (_, page) = api
        .call(
            Method::GET,
            &format!("/v1/servers/{server}/users?limit=2&after={next}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(page["users"][0]["userid"], "carol");
    assert!(page.get("next").is_none());

    let account = register_account(&api, &server, "alice@example.org", 7).await;
    let head = api.head().await.unwrap();
    let (status, accounts) = api
        .read(&format!("{alice}/accounts"), Some(&token), head)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(accounts["accounts"][0]["account_id"], account.to_string());
    let (status, _) = api
        .call(
            Method::DELETE,
            &format!("/v1/servers/{server}/users/bob/accounts/{account}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "an account is deleted only through its own user"
    );
    let (status, deleted) = api
        .call(
            Method::DELETE,
            &format!("{alice}/accounts/{account}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let position = deleted["position"].as_u64().unwrap();
    let (_, accounts) = api
        .read(&format!("{alice}/accounts"), Some(&token), position)
        .await;
    assert_eq!(accounts["accounts"], json!([]));

    let (status, deleted) = api.call(Method::DELETE, &alice, Some(&token), None).await;
    assert_eq!(status, StatusCode::OK);
    let position = deleted["position"].as_u64().unwrap();
    let (status, _) = api.read(&alice, Some(&token), position).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let events = api.running.state.store().read_all(0, 10_000).await.unwrap();
    for event in &events {
        let bytes = [event.payload.as_slice(), event.metadata_cbor.as_slice()].concat();
        assert!(
            !bytes.windows(5).any(|w| w == b"alice" || w == b"Alice"),
            "personal data in clear at position {}",
            event.position
        );
    }
    api.stop().await;
}

async fn tenants_are_isolated(db: &TestDb) {
    let api = Api::start(db).await;
    let (a, key_a) = api.tenant("A").await;
    let (b, key_b) = api.tenant("B").await;
    let (status, _) = api
        .call(
            Method::PUT,
            &format!("/v1/servers/{a}/users/alice"),
            Some(&key_a),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, opened) = api
        .call(
            Method::PUT,
            &format!("/v1/servers/{a}/sessions/{}", nonce(1)),
            Some(&key_a),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{opened}");
    let head = api.head().await.unwrap();
    for path in [
        format!("/v1/servers/{a}/users/alice?min_position={head}"),
        format!("/v1/servers/{a}/users"),
        format!("/v1/servers/{a}/sessions/{}", nonce(1)),
    ] {
        let (status, problem) = api.call(Method::GET, &path, Some(&key_b), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {problem}");
        assert_eq!(problem["status"], 404);
    }
    for path in [
        format!("/v1/servers/{b}/users/alice?min_position={head}"),
        format!("/v1/servers/{b}/sessions/{}", nonce(1)),
    ] {
        let (status, _) = api.call(Method::GET, &path, Some(&key_b), None).await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "{path}: B sees nothing of A under its own id"
        );
    }
    let (status, _) = api
        .call(
            Method::GET,
            &format!("/v1/servers/{a}/sessions/{}", nonce(1)),
            Some(&key_a),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = api
        .call(
            Method::GET,
            &format!("/v1/servers/{a}/users"),
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the admin key is not an API key"
    );
    api.stop().await;
}

async fn idempotency_keys_answer_the_same(db: &TestDb) {
    let api = Api::start(db).await;
    let create = |key: &'static str| {
        api.http
            .post(api.url("/v1/servers"))
            .bearer_auth(ADMIN_KEY)
            .header("Idempotency-Key", key)
            .json(&json!({"name": "Once"}))
            .send()
    };
    let first: Value = create("create-1").await.unwrap().json().await.unwrap();
    let head = api.head().await;
    let second: Value = create("create-1").await.unwrap().json().await.unwrap();
    assert_eq!(first, second);
    assert_eq!(api.head().await, head, "no second event");
    let server = first["server"]["server_id"].as_str().unwrap().to_owned();

    let issue = || {
        api.http
            .post(api.url(&format!("/v1/servers/{server}/api-keys")))
            .bearer_auth(ADMIN_KEY)
            .header("Idempotency-Key", "key-1")
            .json(&json!({"label": "retry-safe"}))
            .send()
    };
    let first: Value = issue().await.unwrap().json().await.unwrap();
    let head = api.head().await;
    let second: Value = issue().await.unwrap().json().await.unwrap();
    assert_eq!(
        first["token"], second["token"],
        "the same token, never stored"
    );
    assert_eq!(api.head().await, head);
    let token = first["token"].as_str().unwrap().to_owned();

    let put = || {
        api.http
            .put(api.url(&format!("/v1/servers/{server}/users/dave")))
            .bearer_auth(&token)
            .header("Idempotency-Key", "put-dave")
            .json(&json!({"attributes": {"a": "1"}}))
            .send()
    };
    let first: Value = put().await.unwrap().json().await.unwrap();
    let head = api.head().await;
    let second: Value = put().await.unwrap().json().await.unwrap();
    assert_eq!(first["position"], second["position"]);
    assert_eq!(api.head().await, head);

    let enrol = || {
        api.http
            .post(api.url(&format!("/v1/servers/{server}/enrolments")))
            .bearer_auth(&token)
            .header("Idempotency-Key", "enrol-dave")
            .json(&json!({"userid": "dave"}))
            .send()
    };
    let first: Value = enrol().await.unwrap().json().await.unwrap();
    let head = api.head().await;
    let second: Value = enrol().await.unwrap().json().await.unwrap();
    assert_eq!(first["qr"], second["qr"]);
    assert_eq!(api.head().await, head);
    let payload = QrPayload::from_base64url(first["qr"]["base64url"].as_str().unwrap()).unwrap();
    assert_eq!(payload.kind, QrKind::Enrolment);
    assert_eq!(hex::encode(payload.server_id), server);
    api.stop().await;
}

/// Reads the next `event: state` of a server-sent event stream.
pub(crate) async fn next_state<S, B>(stream: &mut S, buffer: &mut String) -> Value
where
    S: futures::Stream<Item = reqwest::Result<B>> + Unpin,
    B: AsRef<[u8]>,
{
    loop {
        if let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:")) {
                return serde_json::from_str(data.trim()).unwrap();
            }
            continue;
        }
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("an event within 10 s")
            .unwrap_or_else(|| panic!("the stream stays open; had {buffer:?}"))
            .unwrap();
        buffer.push_str(std::str::from_utf8(chunk.as_ref()).unwrap());
    }
}

async fn session_login_flow(db: &TestDb) {
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

    let before = api.head().await;
    for weak in ["abcd", &"ab".repeat(15), "not-a-nonce!"] {
        let (status, problem) = api
            .call(
                Method::PUT,
                &format!("/v1/servers/{server}/sessions/{weak}"),
                Some(&token),
                None,
            )
            .await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{weak}: {problem}"
        );
        assert!(
            !problem.to_string().contains(weak),
            "errors never repeat the nonce"
        );
    }
    assert_eq!(api.head().await, before);

    let nonce = nonce(9);
    let path = format!("/v1/servers/{server}/sessions/{nonce}");
    let (status, opened) = api
        .call(
            Method::PUT,
            &path,
            Some(&token),
            Some(json!({"announce_info": "Log in to Bank", "userid": "alice"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{opened}");
    assert_eq!(opened["state"], "pending");
    let payload = QrPayload::from_deep_link(opened["qr"]["deep_link"].as_str().unwrap()).unwrap();
    assert_eq!(payload.kind, QrKind::Login);
    assert_eq!(payload.gateway, "wss://gateway.test/v1/device");
    assert_ne!(
        hex::encode(payload.token),
        nonce,
        "the QR carries the hsid, not the nonce"
    );
    let (status, again) = api
        .call(
            Method::PUT,
            &path,
            Some(&token),
            Some(json!({"announce_info": "Log in to Bank", "userid": "alice"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "the same PUT again changes nothing");
    assert_eq!(again["qr"], opened["qr"]);
    let (status, _) = api
        .call(
            Method::PUT,
            &path,
            Some(&token),
            Some(json!({"ping_time_secs": 60})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);

    let raw = api
        .http
        .get(api.url(&format!("{path}/qr?format=raw")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(raw.headers()["content-type"], "application/cbor");
    assert_eq!(
        QrPayload::decode(&raw.bytes().await.unwrap()).unwrap(),
        payload
    );
    let png = api
        .http
        .get(api.url(&format!("{path}/qr?format=png&size=300")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(png.headers()["content-type"], "image/png");
    assert!(png.bytes().await.unwrap().starts_with(b"\x89PNG\r\n\x1a\n"));
    let svg = api
        .http
        .get(api.url(&format!("{path}/qr?format=svg")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert!(
        String::from_utf8(svg.bytes().await.unwrap().to_vec())
            .unwrap()
            .contains("<svg")
    );
    let (status, _) = api
        .call(
            Method::GET,
            &format!("{path}/qr?format=png&size=5"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    let (status, session) = api.read(&path, Some(&token), &opened["position"]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(session["state"], "pending");
    assert_eq!(
        session["can_provoke"], false,
        "nobody has logged in on it yet: there is no account to push to"
    );

    let events = api
        .http
        .get(api.url(&format!("{path}/events")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let mut stream = events.bytes_stream();
    let mut buffer = String::new();
    assert_eq!(
        next_state(&mut stream, &mut buffer).await["state"],
        "pending"
    );

    let session_ref = api
        .running
        .state
        .commands()
        .sessions
        .session_ref(server.parse().unwrap(), &nonce)
        .await
        .unwrap();
    let sessions = &api.running.state.commands().sessions;
    sessions
        .scan(session_ref, &Metadata::default())
        .await
        .unwrap();
    assert_eq!(
        next_state(&mut stream, &mut buffer).await["state"],
        "scanned"
    );
    let alice = api
        .running
        .state
        .commands()
        .users
        .user_ref(server.parse().unwrap(), "alice")
        .await
        .unwrap();
    let done = sessions
        .log_in(session_ref, account, alice.digest, &Metadata::default())
        .await
        .unwrap();
    let change = next_state(&mut stream, &mut buffer).await;
    assert_eq!(change["state"], "logged_in");
    assert_eq!(change["position"], done.position.unwrap());

    let (status, session) = api
        .call(
            Method::GET,
            &format!("{path}?min_position={}", done.position.unwrap()),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(session["state"], "logged_in");
    assert_eq!(session["userid"], "alice");
    assert_eq!(session["account_id"], account.to_string());
    assert_eq!(session["attributes"], json!({"name": "Alice"}));

    let (status, ended) = api.call(Method::DELETE, &path, Some(&token), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ended["state"], "logged_out");
    let (_, ended_again) = api.call(Method::DELETE, &path, Some(&token), None).await;
    assert_eq!(
        ended_again["position"], ended["position"],
        "ending twice writes nothing"
    );

    let stream_events = api
        .running
        .state
        .store()
        .read_stream(&session_ref.stream(), None, Direction::Forwards, 100)
        .await
        .unwrap();
    let types: Vec<&str> = stream_events
        .iter()
        .map(|e| e.event_type.as_str())
        .collect();
    assert_eq!(
        types,
        [
            "session.opened",
            "session.scanned",
            "session.logged_in",
            "session.logged_out"
        ]
    );
    let all = api.running.state.store().read_all(0, 10_000).await.unwrap();
    assert!(
        !all.iter().any(|e| e
            .payload
            .windows(nonce.len())
            .any(|w| w == nonce.as_bytes())
            || e.payload.windows(16).any(|w| w == [9u8; 16])),
        "the nonce is never stored"
    );
    api.stop().await;
}

async fn sessions_expire_as_events(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    let (status, _) = api
        .admin(
            Method::PATCH,
            &format!("/v1/servers/{server}"),
            Some(json!({"session_timeout_secs": 30})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let swept = format!("/v1/servers/{server}/sessions/{}", nonce(1));
    let read = format!("/v1/servers/{server}/sessions/{}", nonce(2));
    let mut opened_at = 0;
    for path in [&swept, &read] {
        let (status, opened) = api.call(Method::PUT, path, Some(&token), None).await;
        assert_eq!(status, StatusCode::CREATED);
        opened_at = opened["position"].as_u64().unwrap();
    }
    // Without min_position the stream may start before the read model has the session (404).
    let events = api
        .http
        .get(api.url(&format!("{swept}/events?min_position={opened_at}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), StatusCode::OK);
    let mut stream = events.bytes_stream();
    let mut buffer = String::new();
    assert_eq!(
        next_state(&mut stream, &mut buffer).await["state"],
        "pending"
    );
    api.clock.advance_secs(31);
    // The sweeper finds the first one; the second is read before the sweeper gets to it or
    // after — either way it answers expired.
    assert_eq!(
        next_state(&mut stream, &mut buffer).await["state"],
        "expired"
    );
    let (status, session) = api.call(Method::GET, &read, Some(&token), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(session["state"], "expired");
    let (status, _) = api.call(Method::PUT, &read, Some(&token), None).await;
    assert_eq!(
        status,
        StatusCode::GONE,
        "an expired session cannot be reopened"
    );
    let all = api.running.state.store().read_all(0, 10_000).await.unwrap();
    assert_eq!(
        all.iter()
            .filter(|e| e.event_type == "session.expired")
            .count(),
        2
    );
    api.stop().await;
}

async fn bad_input_is_refused_without_writing(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    let before = api.head().await;
    let user = api.url(&format!("/v1/servers/{server}/users/alice"));
    // A connection per request: after refusing an oversize body unread, the server closes
    // the connection, and a pooled client could send the next case on it as it closes.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let send = |request: reqwest::RequestBuilder| async move {
        let response = request.send().await.unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned());
        let body: Value = response.json().await.unwrap_or(Value::Null);
        (status, content_type, body)
    };
    let cases = vec![
        (
            "malformed JSON",
            http.put(&user)
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body("{\"attributes\": "),
            StatusCode::BAD_REQUEST,
        ),
        (
            "unknown field",
            http.put(&user)
                .bearer_auth(&token)
                .json(&json!({"attributes": {}, "admin": true})),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "wrong type",
            http.put(&user)
                .bearer_auth(&token)
                .json(&json!({"attributes": [1]})),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "bad attribute name",
            http.put(&user)
                .bearer_auth(&token)
                .json(&json!({"attributes": {"Bad Name": "x"}})),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "oversize body",
            http.put(&user)
                .bearer_auth(&token)
                .json(&json!({"attributes": {"a": "x".repeat(100_000)}})),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "not JSON",
            http.put(&user)
                .bearer_auth(&token)
                .header("content-type", "text/plain")
                .body("{}"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "no key",
            http.put(&user).json(&json!({})),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "wrong key",
            http.put(&user).bearer_auth("cs_00_00").json(&json!({})),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "bad server id",
            http.get(api.url("/v1/servers/zz/users"))
                .bearer_auth(&token),
            StatusCode::NOT_FOUND,
        ),
        (
            "bad admin path id",
            http.get(api.url("/v1/servers/xyz")).bearer_auth(ADMIN_KEY),
            StatusCode::NOT_FOUND,
        ),
        (
            "bad query",
            http.get(api.url(&format!("/v1/servers/{server}/users?limit=lots")))
                .bearer_auth(&token),
            StatusCode::BAD_REQUEST,
        ),
        (
            "unknown route",
            http.get(api.url("/v1/nothing")),
            StatusCode::NOT_FOUND,
        ),
        (
            "wrong method",
            http.post(&user).bearer_auth(&token).json(&json!({})),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            "userid too long",
            http.put(api.url(&format!("/v1/servers/{server}/users/{}", "a".repeat(300))))
                .bearer_auth(&token)
                .json(&json!({})),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "enrol an unknown user",
            http.post(api.url(&format!("/v1/servers/{server}/enrolments")))
                .bearer_auth(&token)
                .json(&json!({"userid": "nobody"})),
            StatusCode::NOT_FOUND,
        ),
    ];
    for (what, request, expected) in cases {
        let (status, content_type, body) = send(request).await;
        assert_eq!(status, expected, "{what}: {body}");
        assert_eq!(
            content_type.as_deref(),
            Some("application/problem+json"),
            "{what}"
        );
        assert_eq!(body["status"], expected.as_u16(), "{what}");
        assert!(
            body["type"]
                .as_str()
                .unwrap()
                .starts_with("urn:countersign:problem:")
        );
    }
    assert_eq!(
        api.head().await,
        before,
        "no refused request wrote an event"
    );
    api.stop().await;
}

async fn reads_wait_for_their_writes(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    for i in 0..20 {
        let (status, put) = api
            .call(
                Method::PUT,
                &format!("/v1/servers/{server}/users/u{i}"),
                Some(&token),
                Some(json!({"attributes": {"n": i.to_string()}})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
        let (status, user) = api
            .call(
                Method::GET,
                &format!(
                    "/v1/servers/{server}/users/u{i}?min_position={}",
                    put["position"]
                ),
                Some(&token),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "read-your-writes at once, no retry");
        assert_eq!(user["attributes"]["n"], i.to_string());
    }
    let future = api.head().await.unwrap() + 1_000;
    let response = api
        .http
        .get(api.url(&format!(
            "/v1/servers/{server}/users/u0?min_position={future}"
        )))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "no write was acknowledged beyond the log's end: nothing to wait for"
    );
    api.stop().await;
}

async fn operations_endpoints(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    let _ = api
        .call(
            Method::GET,
            &format!("/v1/servers/{server}/users"),
            Some(&token),
            None,
        )
        .await;
    let (status, health) = api.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(
        (status, health["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let (status, ready) = api.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(ready["head"].as_u64().is_some());
    let metrics = api.metrics().await;
    assert!(
        metrics.contains("countersign_http_requests_total{"),
        "{metrics}"
    );
    assert!(
        metrics.contains("route=\"/v1/servers/{server_id}/users\""),
        "{metrics}"
    );
    assert!(metrics.contains("countersign_projection_lag_positions"));
    assert!(metrics.contains("countersign_projection_lag_seconds"));
    assert!(!metrics.contains(&server), "metrics name routes, not ids");
    let (status, doc) = api.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/v1/servers",
        "/v1/servers/{server_id}",
        "/v1/servers/{server_id}/api-keys",
        "/v1/servers/{server_id}/api-keys/{key_id}",
        "/v1/servers/{server_id}/users",
        "/v1/servers/{server_id}/users/{userid}",
        "/v1/servers/{server_id}/users/{userid}/accounts",
        "/v1/servers/{server_id}/users/{userid}/accounts/{account_id}",
        "/v1/servers/{server_id}/enrolments",
        "/v1/servers/{server_id}/enrolments/{enrolment_id}",
        "/v1/servers/{server_id}/sessions/{nonce}",
        "/v1/servers/{server_id}/sessions/{nonce}/qr",
        "/v1/servers/{server_id}/sessions/{nonce}/events",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(paths.contains_key(path), "{path} is documented");
    }
    api.stop().await;
}

async fn replay_rebuilds_the_same_read_models(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Bank").await;
    for i in 0..5 {
        api.call(
            Method::PUT,
            &format!("/v1/servers/{server}/users/u{i}"),
            Some(&token),
            Some(json!({"attributes": {"k": "v"}})),
        )
        .await;
        api.call(
            Method::PUT,
            &format!("/v1/servers/{server}/sessions/{}", nonce(i)),
            Some(&token),
            None,
        )
        .await;
    }
    api.call(
        Method::DELETE,
        &format!("/v1/servers/{server}/users/u1"),
        Some(&token),
        None,
    )
    .await;
    api.call(
        Method::DELETE,
        &format!("/v1/servers/{server}/sessions/{}", nonce(2)),
        Some(&token),
        None,
    )
    .await;
    let head = api.head().await.unwrap();
    let reads = api.running.state.reads().clone();
    assert!(reads.wait_for(head, Duration::from_secs(10)).await.unwrap());
    let incremental = reads.dump().await.unwrap();
    let store = api.running.state.store().clone();
    api.stop().await;
    let replayed = reads.replay(&store, None, &mut |_, _| {}).await.unwrap();
    assert_eq!(replayed, head + 1);
    assert_eq!(reads.dump().await.unwrap(), incremental);
}

async fn snapshots_of_bodies_and_events(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Snapshot Bank").await;
    let start = api.head().await.unwrap() + 1;
    let (_, user) = api
        .call(
            Method::PUT,
            &format!("/v1/servers/{server}/users/erin"),
            Some(&token),
            Some(json!({"attributes": {"name": "Erin"}})),
        )
        .await;
    let path = format!("/v1/servers/{server}/sessions/{}", nonce(5));
    let (_, opened) = api
        .call(
            Method::PUT,
            &path,
            Some(&token),
            Some(json!({"session_info": "Welcome"})),
        )
        .await;
    let (_, session) = api.read(&path, Some(&token), &opened["position"]).await;
    let (_, ended) = api.call(Method::DELETE, &path, Some(&token), None).await;
    let (_, problem) = api
        .call(
            Method::PUT,
            &format!("/v1/servers/{server}/sessions/abc"),
            Some(&token),
            None,
        )
        .await;
    let bodies = json!({"put_user": user, "put_session": opened, "get_session": session, "delete_session": ended, "weak_nonce": problem});
    let redactions = |value: &Value| {
        let text = value.to_string().replace(&server, "[server]");
        let mut value: Value = serde_json::from_str(&text).unwrap();
        redact(&mut value);
        value
    };
    insta::assert_json_snapshot!("api_bodies", redactions(&bodies));
    let events = api
        .running
        .state
        .store()
        .read_all(start, 100)
        .await
        .unwrap();
    let events: Vec<Value> = events
        .iter()
        .map(|e| {
            json!({"type": e.event_type, "stream": e.stream.split('-').next(), "payload": payload_json(e)})
        })
        .collect();
    insta::assert_json_snapshot!("api_events", redactions(&Value::Array(events)));
    api.stop().await;
}

/// A stored event's payload as JSON, decoded through the domain's own types.
pub(crate) fn payload_json(event: &countersign_eventstore::RecordedEvent) -> Value {
    <countersign_domain::AnyEvent as countersign_domain::DomainEvent>::decode(
        &event.event_type,
        event.schema_version,
        &event.payload,
    )
    .unwrap()
    .to_json()
}

/// Replaces values that change from run to run (ids, times, positions, sealed bytes, QR
/// payloads) with placeholders, keeping the shape.
pub(crate) fn redact(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                let volatile = key.ends_with("_at")
                    || key.ends_with("position")
                    || key.ends_with("_id")
                    || matches!(
                        key.as_str(),
                        "base64url"
                            | "deep_link"
                            | "hsid"
                            | "session"
                            | "user"
                            | "userid_sealed"
                            | "value"
                            | "userid"
                            | "digest"
                            | "nonce"
                            | "ciphertext"
                            | "expires_at"
                    );
                let scalar = !(item.is_object() || item.is_array() || item.is_null());
                if volatile && scalar && !(key == "userid" && item.is_string()) {
                    *item = Value::String(format!("[{key}]"));
                } else {
                    redact(item);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

/// The newest checkpoint once it covers `position` (the server signs one per 100 ms here).
pub(crate) async fn checkpoint_covering(api: &Api, token: &str, position: u64) -> Value {
    let mut ticks = tokio::time::interval(Duration::from_millis(20));
    for _ in 0..500 {
        ticks.tick().await;
        let (status, checkpoint) = api
            .call(Method::GET, "/v1/audit/checkpoint", Some(token), None)
            .await;
        if status == StatusCode::OK && checkpoint["tree_size"].as_u64().unwrap() > position {
            return checkpoint;
        }
    }
    panic!("no checkpoint covered position {position} within 10 s");
}

fn unb64(text: &Value) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.as_str().unwrap())
        .unwrap()
}

fn hashes(proof: &Value) -> Vec<Vec<u8>> {
    proof["hashes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| hex::decode(h.as_str().unwrap()).unwrap())
        .collect()
}

async fn audit_checkpoints_and_proofs(db: &TestDb) {
    use countersign_protocol::checkpoint::{
        verify_consistency_between_checkpoints, verify_inclusion_against_checkpoint,
    };
    let api = Api::start(db).await;
    let (a, key_a) = api.tenant("A").await;
    let (b, key_b) = api.tenant("B").await;
    let (_, put) = api
        .call(
            Method::PUT,
            &format!("/v1/servers/{a}/users/alice"),
            Some(&key_a),
            Some(json!({"attributes": {"k": "v"}})),
        )
        .await;
    let position = put["position"].as_u64().unwrap();
    let first = checkpoint_covering(&api, &key_b, position).await;
    let (status, key) = api
        .call(Method::GET, "/v1/audit/key", Some(&key_b), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(
        &hex::decode(key["public_key"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    let size = first["tree_size"].as_u64().unwrap();

    let (status, leaf) = api
        .call(
            Method::GET,
            &format!("/v1/servers/{a}/audit/leaves/{position}"),
            Some(&key_a),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{leaf}");
    let canonical = unb64(&leaf["canonical"]);
    let (status, _) = api
        .call(
            Method::GET,
            &format!("/v1/servers/{b}/audit/leaves/{position}"),
            Some(&key_b),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "B never reads A's leaves");
    let (status, proof) = api
        .call(
            Method::GET,
            &format!("/v1/audit/proofs/inclusion?position={position}&tree_size={size}"),
            Some(&key_b),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let signed = unb64(&first["signed"]);
    verify_inclusion_against_checkpoint(&canonical, position, &hashes(&proof), &signed, &key)
        .unwrap();
    let mut forged = canonical.clone();
    forged[10] ^= 1;
    assert!(
        verify_inclusion_against_checkpoint(&forged, position, &hashes(&proof), &signed, &key)
            .is_err()
    );

    let (_, more) = api
        .call(
            Method::PUT,
            &format!("/v1/servers/{b}/users/bob"),
            Some(&key_b),
            Some(json!({})),
        )
        .await;
    let second = checkpoint_covering(&api, &key_a, more["position"].as_u64().unwrap()).await;
    let size2 = second["tree_size"].as_u64().unwrap();
    let (status, proof) = api
        .call(
            Method::GET,
            &format!("/v1/audit/proofs/consistency?from={size}&to={size2}"),
            Some(&key_a),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    verify_consistency_between_checkpoints(
        &signed,
        &unb64(&second["signed"]),
        &hashes(&proof),
        &key,
    )
    .unwrap();
    let (status, by_size) = api
        .call(
            Method::GET,
            &format!("/v1/audit/checkpoint?tree_size={size}"),
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(by_size["signed"], first["signed"]);

    for (path, expected) in [
        (
            format!("/v1/audit/proofs/inclusion?position={size}&tree_size={size}"),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            format!(
                "/v1/audit/proofs/inclusion?position=0&tree_size={}",
                size2 + 1_000
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            format!("/v1/audit/proofs/consistency?from={size2}&to={size}"),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/v1/audit/proofs/inclusion?position=x".to_owned(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/audit/checkpoint?tree_size=999999".to_owned(),
            StatusCode::NOT_FOUND,
        ),
    ] {
        let (status, body) = api.call(Method::GET, &path, Some(&key_a), None).await;
        assert_eq!(status, expected, "{path}: {body}");
    }
    let (status, _) = api
        .call(Method::GET, "/v1/audit/checkpoint", None, None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    api.stop().await;
}

async fn audit_monitor_follows_the_checkpoints(db: &TestDb) {
    let api = Api::start(db).await;
    let (server, token) = api.tenant("Monitored").await;
    let (_, key) = api
        .call(Method::GET, "/v1/audit/key", Some(&token), None)
        .await;
    let audit_key = key["public_key"].as_str().unwrap().to_owned();
    let monitor = tokio::process::Command::new(crate::binary::binary())
        .args([
            "audit",
            "monitor",
            &api.base,
            "--audit-key",
            &audit_key,
            "--interval-ms",
            "50",
            "--count",
            "2",
        ])
        .env("COUNTERSIGN_MONITOR_TOKEN", &token)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Keep the log growing until the monitor has seen two checkpoints.
    let writer = async {
        for i in 0..200 {
            api.call(
                Method::PUT,
                &format!("/v1/servers/{server}/users/m{i}"),
                Some(&token),
                Some(json!({})),
            )
            .await;
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    };
    let out = tokio::select! {
        out = monitor.wait_with_output() => out.unwrap(),
        () = writer => panic!("the monitor saw fewer than two checkpoints"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[1]["tree_size"].as_u64() > lines[0]["tree_size"].as_u64());
    assert_eq!(lines[1]["consistent_with"], lines[0]["tree_size"]);

    let wrong_key = hex::encode(p256_point(42));
    let out = tokio::process::Command::new(crate::binary::binary())
        .args([
            "audit",
            "monitor",
            &api.base,
            "--audit-key",
            &wrong_key,
            "--count",
            "1",
        ])
        .env("COUNTERSIGN_MONITOR_TOKEN", &token)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not verify"));
    api.stop().await;
}

countersign_eventstore::on_both_backends!(
    audit_monitor_follows_the_checkpoints,
    audit_checkpoints_and_proofs,
    admin_manages_servers_and_keys,
    users_accounts_and_shredding,
    tenants_are_isolated,
    idempotency_keys_answer_the_same,
    session_login_flow,
    sessions_expire_as_events,
    bad_input_is_refused_without_writing,
    reads_wait_for_their_writes,
    operations_endpoints,
    replay_rebuilds_the_same_read_models,
    snapshots_of_bodies_and_events,
);
