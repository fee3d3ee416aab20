//! Scaled mode across real processes: `countersign serve --role …` instances sharing one
//! PostgreSQL database, the Kafka broker (tansu, started by `.ci/test`) and Redis.
//!
//! - a phone on instance A and the business system on instance B: B sees the login at once;
//! - the relay killed with SIGKILL in mid-stream and restarted: every event is in the topic
//!   at least once, and the read models fed from Kafka equal a rebuild from the log;
//! - the broker paused (SIGSTOP) for 30 s under load: nothing lost, everything caught up;
//! - Redis killed: reads fall back to polling and answer, and follow announcements again
//!   once it is back.
//!
//! The broker is `COUNTERSIGN_TEST_KAFKA` (default 127.0.0.1:9092); the tests that stop a
//! broker or Redis start their own on a free port, so other tests keep theirs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use countersign_eventstore::Database;
use countersign_eventstore::testing::TestDb;
use countersign_mobile_sdk::{
    ChannelCallbacks, Interaction, MemoryStorage, NoCallbacks, Sdk, SdkConfig, State,
};
use countersign_projections::ReadModels;
use rdkafka::Message as _;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt as _;
use uuid::Uuid;

use crate::binary::binary;

const ADMIN: &str = "scale-test-admin-key-0123456789abcdef";
const WAIT: Duration = Duration::from_secs(120);

fn kafka() -> String {
    std::env::var("COUNTERSIGN_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn redis() -> String {
    std::env::var("COUNTERSIGN_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What every instance of one deployment shares: the database, the keys, the topic.
struct Deployment {
    db: String,
    dir: tempfile::TempDir,
    topic: String,
    namespace: String,
}

impl Deployment {
    fn new(db: &TestDb) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("master.key"), "22".repeat(32)).unwrap();
        std::fs::write(dir.path().join("admin.key"), ADMIN).unwrap();
        let id = Uuid::new_v4().simple().to_string();
        Self {
            db: db.url().to_owned(),
            dir,
            topic: format!("cs-test-{id}"),
            namespace: format!("cs-test-{id}"),
        }
    }

    /// Starts `countersign serve --role roles` with `extra` arguments.
    async fn spawn(&self, name: &str, roles: &str, extra: &[String]) -> Instance {
        let log = self.dir.path().join(format!("{name}.log"));
        let mut child = tokio::process::Command::new(binary())
            .arg("serve")
            .args(["--database-url", &self.db])
            .arg("--master-key-file")
            .arg(self.dir.path().join("master.key"))
            .arg("--admin-key-file")
            .arg(self.dir.path().join("admin.key"))
            .args(["--listen", "127.0.0.1:0", "--role", roles])
            .args([
                "--kafka-topic",
                &self.topic,
                "--redis-namespace",
                &self.namespace,
            ])
            .args(["--checkpoint-interval-ms", "200", "--max-wait-ms", "3000"])
            .args(extra)
            .env("COUNTERSIGN_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{name} did not start: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })
            .unwrap()
            .unwrap_or_else(|| {
                panic!(
                    "{name} exited: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        let base = line.rsplit(' ').next().unwrap().to_owned();
        assert!(base.starts_with("http://"), "{line}");
        Instance {
            child,
            base,
            log,
            http: reqwest::Client::new(),
        }
    }

    fn kafka_args(&self, brokers: &str) -> Vec<String> {
        vec![
            "--kafka-brokers".into(),
            brokers.into(),
            "--kafka-group".into(),
            format!("{}-projector", self.topic),
        ]
    }
}

fn redis_args(url: &str) -> Vec<String> {
    vec!["--redis-url".into(), url.into()]
}

struct Instance {
    child: tokio::process::Child,
    base: String,
    log: PathBuf,
    http: reqwest::Client,
}

impl Instance {
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        crate::api::call_at(&self.http, &self.base, method, path, token, body).await
    }

    /// A call on the login session of `nonce`, its nonce in `X-Nonce`.
    async fn session_call(
        &self,
        method: Method,
        path: &str,
        token: &str,
        nonce: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        crate::api::session_call_at(&self.http, &self.base, method, path, token, nonce, body).await
    }

    /// A tenant whose logins need no second factor, with an API key: (server id, token).
    async fn tenant(&self, name: &str) -> (String, String) {
        let (status, created) = self
            .call(
                Method::POST,
                "/v1/servers",
                Some(ADMIN),
                Some(json!({"name": name})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let server = created["server"]["server_id"].as_str().unwrap().to_owned();
        let (status, body) = self
            .call(
                Method::PATCH,
                &format!("/v1/servers/{server}"),
                Some(ADMIN),
                Some(json!({"second_factor": "none"})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, key) = self
            .call(
                Method::POST,
                &format!("/v1/servers/{server}/api-keys"),
                Some(ADMIN),
                Some(json!({"label": "backend"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{key}");
        (server, key["token"].as_str().unwrap().to_owned())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }
}

/// Business traffic on `instance` until `stop`: session creations from `workers` tasks.
/// Answers the count of creations acknowledged (201).
fn load(
    instance: &Instance,
    server: &str,
    token: &str,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    let created = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (http, url, token, stop, created) = (
            instance.http.clone(),
            format!("{}/v1/servers/{server}/sessions", instance.base),
            token.to_owned(),
            stop.clone(),
            created.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let nonce = Uuid::new_v4().simple().to_string();
                if let Ok(response) = http
                    .put(format!("{url}/{nonce}"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    && response.status() == StatusCode::CREATED
                {
                    created.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::spawn(async move {
        for task in tasks {
            task.await.unwrap();
        }
        created.load(Ordering::Relaxed)
    })
}

async fn pg(db: &TestDb) -> sqlx::PgPool {
    sqlx::PgPool::connect(db.url()).await.unwrap()
}

async fn relay_checkpoint(pool: &sqlx::PgPool, topic: &str) -> u64 {
    let position: Option<i64> =
        sqlx::query_scalar("SELECT position FROM relay_checkpoints WHERE name = $1")
            .bind(topic)
            .fetch_optional(pool)
            .await
            .unwrap();
    position.map_or(0, |p| u64::try_from(p).unwrap())
}

/// Waits until `check` answers `Ok`; its `Err` says what it saw, for the failure message.
/// The state lives in other processes (their database rows, ports, logs), which send this
/// test no event to wait on, so it is looked at every 50 ms, for at most [`WAIT`].
async fn eventually<T, F, Fut>(mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(seen) => assert!(Instant::now() < deadline, "gave up waiting: {seen}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn log_size(db: &TestDb) -> u64 {
    db.store.last_position().await.unwrap().map_or(0, |p| p + 1)
}

/// Waits until the relay has published more than `position` events.
async fn relayed_beyond(pool: &sqlx::PgPool, topic: &str, position: u64) {
    eventually(|| async {
        let relayed = relay_checkpoint(pool, topic).await;
        if relayed > position {
            Ok(())
        } else {
            Err(format!(
                "relayed {relayed}, waiting for more than {position}"
            ))
        }
    })
    .await;
}

/// Waits until the relay has published and every projection has applied the whole log;
/// answers the log's size.
async fn caught_up(db: &TestDb, pool: &sqlx::PgPool, topic: &str) -> u64 {
    eventually(|| async {
        let size = log_size(db).await;
        let lowest: i64 = sqlx::query_scalar("SELECT min(position) FROM rm_checkpoints")
            .fetch_one(pool)
            .await
            .unwrap();
        let relayed = relay_checkpoint(pool, topic).await;
        if relayed == size && u64::try_from(lowest).unwrap() == size {
            Ok(size)
        } else {
            Err(format!(
                "not caught up: log {size}, relayed {relayed}, projected {lowest}"
            ))
        }
    })
    .await
}

/// How many times each position is in `topic`, read from its beginning until every position
/// below `size` was seen.
async fn topic_positions(brokers: &str, topic: &str, size: u64) -> BTreeMap<u64, u32> {
    let consumer: StreamConsumer = countersign_scale::KafkaConfig::new(brokers, topic)
        .consumer_config(&format!("{topic}-audit-{}", Uuid::new_v4().simple()))
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut seen = BTreeMap::new();
    let deadline = Instant::now() + WAIT;
    while (seen.len() as u64) < size {
        assert!(
            Instant::now() < deadline,
            "the topic holds {} of {size} positions",
            seen.len()
        );
        let Ok(message) = tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await
        else {
            continue;
        };
        let message = message.unwrap().detach();
        let event = countersign_scale::kafka::decode(&message).unwrap();
        assert_eq!(
            message.key(),
            Some(event.stream.as_bytes()),
            "the key is the stream"
        );
        *seen.entry(event.position).or_insert(0) += 1;
    }
    seen
}

/// The read models equal a rebuild from the log (the projector processes must be stopped).
async fn read_models_equal_a_rebuild(db: &TestDb, size: u64) {
    let reads = ReadModels::new(Database::Postgres(pg(db).await));
    let incremental = reads.dump().await.unwrap();
    let replayed = reads.replay(&db.store, None, &mut |_, _| {}).await.unwrap();
    assert_eq!(replayed, size);
    assert_eq!(
        reads.dump().await.unwrap(),
        incremental,
        "the read models fed from Kafka differ from a rebuild"
    );
}

async fn scaled_instances_share_a_login(db: &TestDb) {
    let deployment = Deployment::new(db);
    let brokers = kafka();
    let mut back = deployment.kafka_args(&brokers);
    back.extend(redis_args(&redis()));
    let projector = deployment
        .spawn("projector", "projector,relay", &back)
        .await;
    let a = deployment
        .spawn("a", "gateway,sfs", &redis_args(&redis()))
        .await;
    let mut b_args = redis_args(&redis());
    b_args.extend([
        "--gateway-url".into(),
        format!("{}/v1/device", a.base.replace("http://", "ws://")),
    ]);
    let b = deployment.spawn("b", "api", &b_args).await;

    let (server, token) = b.tenant("Bank").await;
    let (status, body) = b
        .call(
            Method::PUT,
            &format!("/v1/servers/{server}/users/alice"),
            Some(&token),
            Some(json!({"attributes": {"name": "Alice"}})),
        )
        .await;
    assert!(status.is_success(), "{body}");
    // The phone enrols through instance A from a QR code instance B made.
    let (status, body) = b
        .call(
            Method::POST,
            &format!("/v1/servers/{server}/enrolments"),
            Some(&token),
            Some(json!({"userid": "alice"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let phone = Sdk::open(Arc::new(MemoryStorage::new()), SdkConfig::default()).unwrap();
    let (callbacks, _events) = ChannelCallbacks::new();
    let enrolment = phone
        .start_session(
            body["qr"]["base64url"].as_str().unwrap().as_bytes(),
            callbacks,
        )
        .await
        .unwrap();
    enrolment.confirm_enrol().await.unwrap();
    let done = tokio::time::timeout(WAIT, enrolment.wait_for(|s| s.state == State::Done))
        .await
        .unwrap();
    let account = done.account_id.unwrap();

    // The business system opens a session on B and follows it there.
    let nonce = hex::encode([7u8; 16]);
    let (status, opened) = b
        .session_call(
            Method::PUT,
            &format!("/v1/servers/{server}/session"),
            &token,
            &nonce,
            Some(json!({"ping_time_secs": 60})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{opened}");
    let response = b
        .http
        .get(format!(
            "{}/v1/servers/{server}/session/events?min_position={}",
            b.base, opened["position"]
        ))
        .header("X-Nonce", &nonce)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut sse = response.bytes_stream();
    let mut buffer = String::new();
    let first = crate::api::next_state(&mut sse, &mut buffer).await;
    assert_eq!(first["state"], "pending", "{first}");

    // The phone logs in through A.
    let login = phone
        .start_session(
            opened["qr"]["deep_link"].as_str().unwrap().as_bytes(),
            Arc::new(NoCallbacks),
        )
        .await
        .unwrap();
    if login.state() == State::UserInteraction(Interaction::WaitForConfirmation) {
        login.set_account(Some(&account)).await.unwrap();
    }
    let logged_in = tokio::time::timeout(WAIT, async {
        loop {
            let state = crate::api::next_state(&mut sse, &mut buffer).await;
            if state["state"] == "logged_in" {
                return state;
            }
        }
    })
    .await
    .expect("B never saw the login made on A");
    let (status, view) = b
        .session_call(
            Method::GET,
            &format!(
                "/v1/servers/{server}/session?min_position={}",
                logged_in["position"]
            ),
            &token,
            &nonce,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["userid"], "alice", "{view}");
    assert_eq!(view["account_id"], account.as_str());
    assert_eq!(view["attributes"]["name"], "Alice");
    assert!(
        !b.log_text().contains("polling the read models"),
        "B followed Redis announcements: {}",
        b.log_text()
    );
    // B logs the user out: the phone, connected to A's gateway, hears it (A's notice
    // follower learns of B's commit from the read models' progress, not from a commit of
    // its own).
    let active = tokio::time::timeout(WAIT, login.wait_for(|s| s.state == State::Active))
        .await
        .expect("a continuous session");
    assert_eq!(active.state, State::Active);
    let (status, _) = b
        .session_call(
            Method::DELETE,
            &format!("/v1/servers/{server}/session"),
            &token,
            &nonce,
            None,
        )
        .await;
    assert!(status.is_success());
    tokio::time::timeout(WAIT, login.wait_for(|s| s.state == State::Done))
        .await
        .expect("the logout made on B reaches the phone on A");
    for instance in [a, b, projector] {
        instance.kill().await;
    }
}

async fn relay_killed_in_mid_stream_loses_nothing(db: &TestDb) {
    let deployment = Deployment::new(db);
    let brokers = kafka();
    let pool = pg(db).await;
    let mut back = deployment.kafka_args(&brokers);
    back.extend(redis_args(&redis()));
    let projector = deployment.spawn("projector", "projector", &back).await;
    let relay = deployment
        .spawn("relay", "relay", &deployment.kafka_args(&brokers))
        .await;
    let api = deployment.spawn("api", "api", &redis_args(&redis())).await;
    let (server, token) = api.tenant("Bank").await;

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(&api, &server, &token, 8, stop.clone());
    // Kill the relay while it is publishing: it has published some, and more is coming.
    relayed_beyond(&pool, &deployment.topic, 300).await;
    relay.kill().await;
    let killed_at = relay_checkpoint(&pool, &deployment.topic).await;
    // The log goes on growing with no relay…
    let head = log_size(db).await;
    eventually(|| async {
        let size = log_size(db).await;
        if size > head + 300 {
            Ok(())
        } else {
            Err(format!("log {size} after the kill at {head}"))
        }
    })
    .await;
    // …and a new relay takes over from the checkpoint while the load goes on.
    let relay = deployment
        .spawn("relay-2", "relay", &deployment.kafka_args(&brokers))
        .await;
    relayed_beyond(&pool, &deployment.topic, killed_at).await;
    stop.store(true, Ordering::Relaxed);
    let created = traffic.await.unwrap();
    assert!(created > 0);

    let size = caught_up(db, &pool, &deployment.topic).await;
    assert!(size > killed_at, "events were appended after the kill");
    let positions = topic_positions(&brokers, &deployment.topic, size).await;
    assert_eq!(
        positions.len() as u64,
        size,
        "every position is in the topic"
    );
    assert_eq!(positions.keys().next_back(), Some(&(size - 1)));
    relay.kill().await;
    projector.kill().await;
    api.kill().await;
    read_models_equal_a_rebuild(db, size).await;
}

/// A tansu broker of the test's own, on a free port, with memory storage.
struct Broker {
    child: tokio::process::Child,
    address: String,
}

impl Broker {
    async fn start() -> Self {
        let port = free_port();
        let address = format!("127.0.0.1:{port}");
        let url = format!("tcp://{address}");
        let child = tokio::process::Command::new("tansu")
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", &format!("memory://tansu-{port}/")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("tansu is not installed: .ci/test installs it (cargo install tansu --locked --features dynostore)");
        listening(&address).await;
        Self { child, address }
    }

    /// Sends `signal` (`STOP`, `CONT`) with kill(1): this workspace forbids unsafe code.
    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().unwrap().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }
}

async fn broker_paused_for_30_seconds_under_load(db: &TestDb) {
    let broker = Broker::start().await;
    let deployment = Deployment::new(db);
    let pool = pg(db).await;
    let mut back = deployment.kafka_args(&broker.address);
    back.extend(redis_args(&redis()));
    let back_end = deployment
        .spawn("projector", "projector,relay", &back)
        .await;
    let api = deployment.spawn("api", "api", &redis_args(&redis())).await;
    let (server, token) = api.tenant("Bank").await;

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(&api, &server, &token, 4, stop.clone());
    relayed_beyond(&pool, &deployment.topic, 300).await;
    broker.signal("STOP");
    let paused_at = db.store.last_position().await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let during = db.store.last_position().await.unwrap().unwrap();
    assert!(
        during > paused_at,
        "the log kept taking writes while the broker was away"
    );
    broker.signal("CONT");
    // The load goes on until the relay has published past what was written during the pause.
    relayed_beyond(&pool, &deployment.topic, during).await;
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();

    let size = caught_up(db, &pool, &deployment.topic).await;
    let positions = topic_positions(&broker.address, &deployment.topic, size).await;
    assert_eq!(
        positions.len() as u64,
        size,
        "every position is in the topic"
    );
    back_end.kill().await;
    api.kill().await;
    read_models_equal_a_rebuild(db, size).await;
}

/// A redis-server of the test's own, on `port`.
async fn start_redis(port: u16) -> tokio::process::Child {
    let child = tokio::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server is not installed");
    listening(&format!("127.0.0.1:{port}")).await;
    child
}

/// Waits until something accepts connections at `address`.
async fn listening(address: &str) {
    eventually(|| async {
        match tokio::net::TcpStream::connect(address).await {
            Ok(_) => Ok(()),
            Err(error) => Err(format!("nothing listens at {address}: {error}")),
        }
    })
    .await;
}

async fn wait_for_log(instance: &Instance, text: &str) {
    eventually(|| async {
        let log = instance.log_text();
        if log.contains(text) {
            Ok(())
        } else {
            Err(format!("never logged {text:?}: {log}"))
        }
    })
    .await;
}

async fn redis_away_reads_fall_back_and_recover(db: &TestDb) {
    let port = free_port();
    let mut redis = start_redis(port).await;
    let url = format!("redis://127.0.0.1:{port}");
    let deployment = Deployment::new(db);
    let projector = deployment
        .spawn("projector", "projector", &redis_args(&url))
        .await;
    let api = deployment.spawn("api", "api", &redis_args(&url)).await;
    let (server, token) = api.tenant("Bank").await;

    redis.kill().await.unwrap();
    wait_for_log(&api, "Redis unreachable: polling").await;
    // Writes and the reads that wait for them still answer, from the polled checkpoints.
    for user in ["u1", "u2", "u3"] {
        let (status, body) = api
            .call(
                Method::PUT,
                &format!("/v1/servers/{server}/users/{user}"),
                Some(&token),
                Some(json!({"attributes": {}})),
            )
            .await;
        assert!(status.is_success(), "{status} {body}");
        let position = body["position"].as_u64().unwrap();
        let (status, body) = api
            .call(
                Method::GET,
                &format!("/v1/servers/{server}/users/{user}?min_position={position}"),
                Some(&token),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let _redis = start_redis(port).await;
    wait_for_log(&api, "Redis is back").await;
    let (status, body) = api
        .call(
            Method::PUT,
            &format!("/v1/servers/{server}/users/u4"),
            Some(&token),
            Some(json!({"attributes": {}})),
        )
        .await;
    assert!(status.is_success(), "{status} {body}");
    wait_for_log(&projector, "Redis is back").await;
    projector.kill().await;
    api.kill().await;
}

macro_rules! on_postgres {
    ($($test:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    let db = countersign_eventstore::testing::TestDb::postgres().await;
                    super::$test(&db).await;
                    db.finish().await;
                }
            )*
        }
    };
}

// Scaled mode is PostgreSQL's: the relay's lease is an advisory lock.
on_postgres!(
    scaled_instances_share_a_login,
    relay_killed_in_mid_stream_loses_nothing,
    broker_paused_for_30_seconds_under_load,
    redis_away_reads_fall_back_and_recover,
);
