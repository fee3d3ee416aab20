//! The SFS end to end over in-memory frames, against a real store on both backends: an
//! OPAQUE client (opaque-ke with small Argon2id parameters) registers and logs in, wrong PINs
//! lock and revoke, locks survive a restart, concurrent logins never exceed the policy, the
//! biometric flow, and the PIN never reaches an event, a table, the vault or a log line.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use countersign_commands::Clock;
use countersign_domain::second_factor::LockoutPolicy;
use countersign_domain::{AppInstanceId, DataKey, Timestamp};
use countersign_eventstore::testing::TestDb;
use countersign_eventstore::vault::KeyVault;
use countersign_eventstore::{Database, StoreOptions, open, with_pool};
use countersign_protocol::attestation::{AttestationClaims, Expected, Factor, verify_attestation};
use countersign_protocol::channel::{Channel, Initiator, SFS_PROLOGUE, StaticKey};
use countersign_protocol::device::{Blob, Bytes};
use countersign_protocol::sfs::{
    self, FactorState, SfsAnswer, SfsBody, SfsCode, SfsError, SfsHello, SfsOutcome, SfsRefusal,
    SfsReply, SfsRequest, SfsWelcome,
};
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use opaque_ke::{
    ClientLogin, ClientLoginFinishParameters, ClientRegistration,
    ClientRegistrationFinishParameters, CredentialResponse, Identifiers, RegistrationResponse,
};
use rand_core::OsRng;

use crate::opaque::Suite;
use crate::{AnonymousLimits, EnrolmentError, Enrolments, Rate, Sfs, records};

const T0: i64 = 1_790_000_000_000;
const PIN: &str = "917364";
const CHALLENGE: [u8; 32] = [0xc1; 32];
const THUMBPRINT: [u8; 32] = [0x7b; 32];

/// A clock the test moves.
#[derive(Debug)]
pub(crate) struct TestClock(AtomicI64);

impl TestClock {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self(AtomicI64::new(T0)))
    }
    fn advance_secs(&self, secs: i64) {
        self.0.fetch_add(secs * 1000, Ordering::SeqCst);
    }
}

impl Clock for TestClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

/// Small Argon2id parameters: the server never sees them, and tests should be fast.
pub(crate) fn argon() -> argon2::Argon2<'static> {
    argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(64, 1, 1, None).unwrap(),
    )
}

/// The app instances a countersign server enrolled, as the test says.
#[derive(Debug, Default)]
struct TestEnrolments(Mutex<HashSet<AppInstanceId>>);

impl Enrolments for TestEnrolments {
    fn enrolled(
        &self,
        app: AppInstanceId,
    ) -> futures::future::BoxFuture<'_, Result<bool, EnrolmentError>> {
        let known = self.0.lock().unwrap().contains(&app);
        Box::pin(async move { Ok(known) })
    }
}

/// Limits no test reaches unless it means to.
const GENEROUS: AnonymousLimits = AnonymousLimits {
    per_address: Rate {
        burst: 100_000,
        per_second: 100_000,
    },
    global: Rate {
        burst: 100_000,
        per_second: 100_000,
    },
    max_addresses: 16,
};

struct Env {
    store: countersign_eventstore::SharedStore,
    vault: KeyVault,
    database: Database,
    clock: Arc<TestClock>,
    enrolments: Arc<TestEnrolments>,
}

impl Env {
    async fn new(db: &TestDb) -> Self {
        let opened = open(&StoreOptions {
            url: db.url().to_owned(),
            pool_size: 4,
        })
        .await
        .unwrap();
        Self {
            store: db.store.clone(),
            vault: KeyVault::new(opened.vault, DataKey::from_bytes([9; 32])),
            database: opened.database,
            clock: TestClock::new(),
            enrolments: Arc::default(),
        }
    }

    async fn sfs(&self) -> Sfs {
        self.sfs_limited(GENEROUS).await
    }

    async fn sfs_limited(&self, limits: AnonymousLimits) -> Sfs {
        Sfs::with_limits(
            self.store.clone(),
            self.vault.clone(),
            self.database.clone(),
            self.clock.clone(),
            LockoutPolicy::default(),
            self.enrolments.clone(),
            limits,
        )
        .await
        .unwrap()
    }

    /// A countersign server enrolled an account of `app`.
    fn enrol(&self, app: [u8; 16]) {
        self.enrolments
            .0
            .lock()
            .unwrap()
            .insert(AppInstanceId::from_bytes(app));
    }

    async fn head(&self) -> Option<u64> {
        self.store.last_position().await.unwrap()
    }

    /// The stored OPAQUE records of `app` (both schemas).
    async fn record_rows(&self, app: [u8; 16]) -> usize {
        with_pool!(&self.database, pool => {
            let keyed: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM sfs_opaque_records WHERE app_instance = $1",
            )
            .bind(app.as_slice())
            .fetch_one(pool)
            .await
            .unwrap();
            let legacy: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM sfs_records WHERE app_instance = $1")
                    .bind(app.as_slice())
                    .fetch_one(pool)
                    .await
                    .unwrap();
            usize::try_from(keyed + legacy).unwrap()
        })
    }

    fn now_ms(&self) -> i64 {
        self.clock.now().as_millis()
    }

    async fn event_types(&self, app: [u8; 16]) -> Vec<String> {
        let stream = countersign_domain::AppInstanceId::from_bytes(app).stream();
        self.store
            .read_stream(
                &stream,
                None,
                countersign_eventstore::Direction::Forwards,
                10_000,
            )
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.event_type)
            .collect()
    }
}

/// An app instance talking to the SFS over in-memory frames.
struct App {
    channel: Channel,
    to_sfs: mpsc::UnboundedSender<Result<Vec<u8>, String>>,
    from_sfs: mpsc::UnboundedReceiver<Vec<u8>>,
    next_id: u32,
}

fn app_key(seed: u8) -> StaticKey {
    StaticKey::from_bytes(&[seed; 32]).unwrap()
}

async fn connect(
    sfs: &Sfs,
    key: &StaticKey,
    app: [u8; 16],
    version: u16,
) -> Result<(App, SfsWelcome), SfsWelcome> {
    connect_from(sfs, None, key, app, version)
        .await
        .map(|connected| connected.expect("the SFS closed the connection"))
}

/// As [`connect`] from `peer`; `Ok(None)` when the SFS closed the connection unanswered.
async fn connect_from(
    sfs: &Sfs,
    peer: Option<IpAddr>,
    key: &StaticKey,
    app: [u8; 16],
    version: u16,
) -> Result<Option<(App, SfsWelcome)>, SfsWelcome> {
    let (mut to_sfs, incoming) = mpsc::unbounded();
    let (outgoing, mut from_sfs) = mpsc::unbounded();
    tokio::spawn(crate::connection::serve_frames_from(
        sfs.clone(),
        peer,
        incoming,
        outgoing,
    ));
    let hello = sfs::encode(&SfsHello {
        version,
        app_instance: Bytes(app),
    })
    .unwrap();
    let (initiator, first) =
        Initiator::start_with_prologue(key, &sfs.0.keys.channel_public, SFS_PROLOGUE, &hello)
            .unwrap();
    to_sfs.send(Ok(first)).await.unwrap();
    let Some(second) = from_sfs.next().await else {
        return Ok(None);
    };
    let (channel, welcome) = initiator.finish(&second).unwrap();
    let welcome: SfsWelcome = sfs::decode(&welcome).unwrap();
    match welcome {
        SfsWelcome::Accepted { .. } => Ok(Some((
            App {
                channel,
                to_sfs,
                from_sfs,
                next_id: 1,
            },
            welcome,
        ))),
        SfsWelcome::Refused { .. } => Err(welcome),
    }
}

impl App {
    async fn ask(&mut self, body: SfsBody) -> Result<SfsAnswer, SfsError> {
        let id = self.next_id;
        self.next_id += 1;
        let bytes = sfs::encode(&SfsRequest { id, body }).unwrap();
        for frame in self.channel.seal(&bytes).unwrap() {
            self.to_sfs.send(Ok(frame)).await.unwrap();
        }
        let frame = self.from_sfs.next().await.unwrap();
        let reply: SfsReply = sfs::decode(&self.channel.open(&frame).unwrap().unwrap()).unwrap();
        assert_eq!(reply.id, id);
        match reply.outcome {
            SfsOutcome::Ok(answer) => Ok(answer),
            SfsOutcome::Err(error) => Err(error),
        }
    }

    async fn register_pin(&mut self, pin: &str) -> Result<(), SfsError> {
        let start = ClientRegistration::<Suite>::start(&mut OsRng, pin.as_bytes()).unwrap();
        let SfsAnswer::Registration { response } = self
            .ask(SfsBody::RegisterPinStart {
                request: Blob(start.message.serialize().to_vec()),
            })
            .await?
        else {
            panic!("not a registration response");
        };
        let argon = argon();
        let finish = start
            .state
            .finish(
                &mut OsRng,
                pin.as_bytes(),
                RegistrationResponse::deserialize(&response.0).unwrap(),
                ClientRegistrationFinishParameters::new(Identifiers::default(), Some(&argon)),
            )
            .unwrap();
        let answer = self
            .ask(SfsBody::RegisterPinFinish {
                upload: Blob(finish.message.serialize().to_vec()),
            })
            .await?;
        assert_eq!(answer, SfsAnswer::Done);
        Ok(())
    }

    /// A PIN login; answers the attestation. The client aborts after a wrong PIN (its
    /// envelope does not open) by sending a garbage finalization, as a real SDK's failure
    /// path would end the login one way or another.
    async fn login(&mut self, pin: &str) -> Result<Vec<u8>, SfsError> {
        let start = ClientLogin::<Suite>::start(&mut OsRng, pin.as_bytes()).unwrap();
        let SfsAnswer::Credential { response } = self
            .ask(SfsBody::LoginStart {
                request: Blob(start.message.serialize().to_vec()),
            })
            .await?
        else {
            panic!("not a credential response");
        };
        let argon = argon();
        let finalization = match start.state.finish(
            pin.as_bytes(),
            CredentialResponse::deserialize(&response.0).unwrap(),
            ClientLoginFinishParameters::new(None, Identifiers::default(), Some(&argon)),
        ) {
            Ok(finish) => finish.message.serialize().to_vec(),
            Err(_) => vec![0; 64],
        };
        match self
            .ask(SfsBody::LoginFinish {
                finalization: Blob(finalization),
                challenge: Bytes(CHALLENGE),
                account_key_thumbprint: Bytes(THUMBPRINT),
            })
            .await?
        {
            SfsAnswer::Attestation { cose } => Ok(cose.0),
            other => panic!("not an attestation: {other:?}"),
        }
    }
}

fn check(sfs: &Sfs, cose: &[u8], now_ms: i64) -> AttestationClaims {
    verify_attestation(
        cose,
        &[sfs.attestation_verifying_key()],
        &Expected {
            challenge: CHALLENGE,
            account_key_thumbprint: THUMBPRINT,
            now_ms,
        },
    )
    .unwrap()
}

fn code(result: Result<impl std::fmt::Debug, SfsError>) -> SfsCode {
    result.unwrap_err().code
}

async fn register_login_and_change_pin(db: &TestDb) {
    let env = Env::new(db).await;
    let sfs = env.sfs().await;
    let app = [1; 16];
    env.enrol(app);
    let (mut a, welcome) = connect(&sfs, &app_key(1), app, 1).await.unwrap();
    assert_eq!(
        welcome,
        SfsWelcome::Accepted {
            pin_registered: false,
            biometric_registered: false,
            state: FactorState::None
        }
    );
    assert_eq!(code(a.login(PIN).await), SfsCode::NotRegistered);
    a.register_pin(PIN).await.unwrap();
    let cose = a.login(PIN).await.unwrap();
    let claims = check(&sfs, &cose, env.now_ms());
    assert_eq!(claims.factor, Factor::Pin);
    assert_eq!(claims.app_instance, Bytes(app));
    assert_eq!(claims.expires_at_ms - claims.issued_at_ms, 60_000);

    // Another channel may not replace the PIN without proving it; this one (logged in) may.
    let (mut b, welcome) = connect(&sfs, &app_key(1), app, 1).await.unwrap();
    assert!(matches!(
        welcome,
        SfsWelcome::Accepted {
            pin_registered: true,
            state: FactorState::Active,
            ..
        }
    ));
    assert_eq!(
        code(b.register_pin("000000").await),
        SfsCode::AlreadyRegistered
    );
    a.register_pin("246802").await.unwrap();
    assert_eq!(
        code(b.login(PIN).await),
        SfsCode::WrongPin { attempts_left: 4 }
    );
    check(&sfs, &b.login("246802").await.unwrap(), env.now_ms());
    // The refused login before registration counted nothing.
    assert_eq!(
        env.event_types(app).await,
        [
            "second_factor.key_bound",
            "second_factor.pin_registered",
            "second_factor.verification_failed",
            "second_factor.verification_succeeded",
            "second_factor.pin_registered",
            "second_factor.verification_failed",
            "second_factor.verification_failed",
            "second_factor.verification_succeeded",
        ]
    );
}

async fn a_handshake_with_another_key_or_version_is_refused(db: &TestDb) {
    let env = Env::new(db).await;
    let sfs = env.sfs().await;
    env.enrol([2; 16]);
    // Before the first registration no key is bound: two keys may say hello, and the first
    // to register binds its key; the other then registers nothing.
    let (mut first, _) = connect(&sfs, &app_key(1), [2; 16], 1).await.unwrap();
    let (mut second, _) = connect(&sfs, &app_key(2), [2; 16], 1).await.unwrap();
    first.register_pin(PIN).await.unwrap();
    assert_eq!(code(second.register_pin(PIN).await), SfsCode::NotAllowed);
    assert_eq!(
        connect(&sfs, &app_key(2), [2; 16], 1).await.err(),
        Some(SfsWelcome::Refused {
            reason: SfsRefusal::KeyMismatch
        })
    );
    assert_eq!(
        connect(&sfs, &app_key(1), [2; 16], 2).await.err(),
        Some(SfsWelcome::Refused {
            reason: SfsRefusal::UnsupportedVersion
        })
    );
    assert_eq!(
        env.event_types([2; 16]).await,
        ["second_factor.key_bound", "second_factor.pin_registered"]
    );
    assert_eq!(
        env.record_rows([2; 16]).await,
        1,
        "the refused record was removed"
    );
}

async fn wrong_pins_lock_survive_a_restart_and_revoke(db: &TestDb) {
    let env = Env::new(db).await;
    let sfs = env.sfs().await;
    let app = [3; 16];
    env.enrol(app);
    let (mut a, _) = connect(&sfs, &app_key(3), app, 1).await.unwrap();
    a.register_pin(PIN).await.unwrap();
    for left in [4, 3, 2, 1] {
        assert_eq!(
            code(a.login("111111").await),
            SfsCode::WrongPin {
                attempts_left: left
            }
        );
    }
    let until_ms = env.now_ms() + 60_000;
    assert_eq!(code(a.login("111111").await), SfsCode::Locked { until_ms });
    assert_eq!(code(a.login(PIN).await), SfsCode::Locked { until_ms });

    // A restart: a new SFS on the same store still sees the lock.
    drop(sfs);
    let sfs = env.sfs().await;
    let (mut a, welcome) = connect(&sfs, &app_key(3), app, 1).await.unwrap();
    assert!(matches!(
        welcome,
        SfsWelcome::Accepted { state: FactorState::Locked { until_ms: u }, .. } if u == until_ms
    ));
    assert_eq!(code(a.login(PIN).await), SfsCode::Locked { until_ms });
    env.clock.advance_secs(59);
    assert_eq!(code(a.login(PIN).await), SfsCode::Locked { until_ms });
    env.clock.advance_secs(1);
    check(&sfs, &a.login(PIN).await.unwrap(), env.now_ms());

    // From a fresh count: 5 → 1 minute, 8 → 1 hour, 10 → revoked.
    for _ in 0..4 {
        code(a.login("111111").await);
    }
    assert!(matches!(
        code(a.login("111111").await),
        SfsCode::Locked { .. }
    ));
    env.clock.advance_secs(60);
    for left in [2, 1] {
        assert_eq!(
            code(a.login("111111").await),
            SfsCode::WrongPin {
                attempts_left: left
            }
        );
    }
    let until_ms = env.now_ms() + 3_600_000;
    assert_eq!(code(a.login("111111").await), SfsCode::Locked { until_ms });
    env.clock.advance_secs(3_600);
    assert_eq!(
        code(a.login("111111").await),
        SfsCode::WrongPin { attempts_left: 1 }
    );
    assert_eq!(code(a.login("111111").await), SfsCode::Revoked);
    assert_eq!(code(a.login(PIN).await), SfsCode::Revoked);
    assert_eq!(code(a.register_pin(PIN).await), SfsCode::Revoked);
    let (_, welcome) = connect(&sfs, &app_key(3), app, 1).await.unwrap();
    assert!(matches!(
        welcome,
        SfsWelcome::Accepted {
            state: FactorState::Revoked,
            ..
        }
    ));
}

async fn concurrent_logins_never_exceed_the_policy(db: &TestDb) {
    let env = Env::new(db).await;
    let sfs = env.sfs().await;
    let app = [4; 16];
    env.enrol(app);
    let (mut a, _) = connect(&sfs, &app_key(4), app, 1).await.unwrap();
    a.register_pin(PIN).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let sfs = sfs.clone();
        tasks.push(tokio::spawn(async move {
            let (mut app, _) = connect(&sfs, &app_key(4), app, 1).await.unwrap();
            let start = ClientLogin::<Suite>::start(&mut OsRng, b"000000").unwrap();
            app.ask(SfsBody::LoginStart {
                request: Blob(start.message.serialize().to_vec()),
            })
            .await
        }));
    }
    let mut answered = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(SfsAnswer::Credential { .. }) => answered += 1,
            Ok(other) => panic!("{other:?}"),
            Err(e) => assert!(
                matches!(e.code, SfsCode::Locked { .. } | SfsCode::Internal),
                "{e:?}"
            ),
        }
    }
    let types = env.event_types(app).await;
    let failures = types
        .iter()
        .filter(|t| *t == "second_factor.verification_failed")
        .count();
    let before_lock = types
        .iter()
        .take_while(|t| *t != "second_factor.locked")
        .filter(|t| *t == "second_factor.verification_failed")
        .count();
    assert_eq!(answered, 5, "{types:?}");
    assert_eq!(failures, 5);
    assert_eq!(before_lock, 5);
    assert_eq!(
        types
            .iter()
            .filter(|t| *t == "second_factor.locked")
            .count(),
        1
    );
}

async fn biometric_registration_and_login(db: &TestDb) {
    let env = Env::new(db).await;
    let sfs = env.sfs().await;
    let app = [5; 16];
    env.enrol(app);
    let biometric = p256::ecdsa::SigningKey::from_slice(&[0x55; 32]).unwrap();
    let public: [u8; 65] = biometric
        .verifying_key()
        .to_sec1_point(false)
        .as_bytes()
        .try_into()
        .unwrap();
    let (mut a, _) = connect(&sfs, &app_key(5), app, 1).await.unwrap();
    a.register_pin(PIN).await.unwrap();
    let register = SfsBody::RegisterBiometric {
        public_key: Bytes(public),
    };
    assert_eq!(code(a.ask(register.clone()).await), SfsCode::NotAllowed);
    a.login(PIN).await.unwrap();
    assert_eq!(a.ask(register).await, Ok(SfsAnswer::Done));

    let (mut b, welcome) = connect(&sfs, &app_key(5), app, 1).await.unwrap();
    assert!(matches!(
        welcome,
        SfsWelcome::Accepted {
            biometric_registered: true,
            ..
        }
    ));
    let finish = |signature: [u8; 64]| SfsBody::BiometricFinish {
        signature: Bytes(signature),
        challenge: Bytes(CHALLENGE),
        account_key_thumbprint: Bytes(THUMBPRINT),
    };
    assert_eq!(
        code(b.ask(finish([0; 64])).await),
        SfsCode::Invalid,
        "no nonce"
    );
    let Ok(SfsAnswer::BiometricChallenge { nonce }) = b.ask(SfsBody::BiometricStart).await else {
        panic!("no challenge");
    };
    let message = sfs::biometric_message(&nonce.0, &CHALLENGE, &THUMBPRINT);
    let signature = countersign_protocol::cose::sign_es256(&biometric, &message);
    let Ok(SfsAnswer::Attestation { cose }) = b.ask(finish(signature)).await else {
        panic!("no attestation");
    };
    assert_eq!(check(&sfs, &cose.0, env.now_ms()).factor, Factor::Biometric);
    // The nonce was used: the same signature again is refused.
    assert_eq!(code(b.ask(finish(signature)).await), SfsCode::Invalid);
    // A signature by another key is refused and counted.
    let Ok(SfsAnswer::BiometricChallenge { nonce }) = b.ask(SfsBody::BiometricStart).await else {
        panic!("no challenge");
    };
    let other = p256::ecdsa::SigningKey::from_slice(&[0x56; 32]).unwrap();
    let forged = countersign_protocol::cose::sign_es256(
        &other,
        &sfs::biometric_message(&nonce.0, &CHALLENGE, &THUMBPRINT),
    );
    assert_eq!(code(b.ask(finish(forged)).await), SfsCode::Invalid);
    let types = env.event_types(app).await;
    assert_eq!(
        types.last().map(String::as_str),
        Some("second_factor.verification_failed")
    );
}

async fn the_key_endpoint_answers_the_pinned_keys(db: &TestDb) {
    use tower::ServiceExt as _;
    let env = Env::new(db).await;
    let sfs = env.sfs().await;
    let response = sfs
        .router()
        .oneshot(
            axum::http::Request::get("/v1/sfs/key")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = axum::body::to_bytes(response.into_body(), 10_000)
        .await
        .unwrap();
    let keys: crate::PublicKeys = serde_json::from_slice(&body).unwrap();
    assert_eq!(keys, sfs.public_keys());
    assert_eq!(keys.channel_public_key.len(), 130);
    assert!(keys.attestation_public_key.starts_with("04"));
    // A restart loads the same keys from the vault.
    assert_eq!(env.sfs().await.public_keys(), keys);
    assert_eq!(
        crate::attestation_public_key(&env.vault).await.unwrap(),
        sfs.attestation_verifying_key()
    );
}

/// A fresh app instance id and channel key from the OS generator.
fn stranger() -> ([u8; 16], StaticKey) {
    let mut app = [0u8; 16];
    getrandom::fill(&mut app).unwrap();
    loop {
        let mut scalar = [0u8; 32];
        getrandom::fill(&mut scalar).unwrap();
        if let Ok(key) = StaticKey::from_bytes(&scalar) {
            return (app, key);
        }
    }
}

async fn a_thousand_anonymous_hellos_write_nothing(db: &TestDb) {
    let env = Env::new(db).await;
    let sfs = env.sfs().await;
    let head = env.head().await;
    for _ in 0..1_000 {
        let (app, key) = stranger();
        let (_, welcome) = connect(&sfs, &key, app, 1).await.unwrap();
        assert_eq!(
            welcome,
            SfsWelcome::Accepted {
                pin_registered: false,
                biometric_registered: false,
                state: FactorState::None
            }
        );
    }
    assert_eq!(env.head().await, head, "no event for a hello");
}

/// An open channel on which the app sends nothing is closed after the idle timeout, whether
/// the app instance is registered or not; one that keeps asking stays open.
async fn an_idle_channel_is_closed(db: &TestDb) {
    let env = Env::new(db).await;
    let sfs = env
        .sfs()
        .await
        .with_idle_timeout(std::time::Duration::from_millis(300));
    let (app, key) = stranger();
    let (mut busy, _) = connect(&sfs, &key, app, 1).await.unwrap();
    let (other, other_key) = stranger();
    let (mut quiet, _) = connect(&sfs, &other_key, other, 1).await.unwrap();
    // The busy one keeps asking (any answer will do: an error keeps the channel open) until
    // the quiet one is closed.
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let _ = busy.ask(SfsBody::BiometricStart).await;
            if let Some(end) = futures::FutureExt::now_or_never(quiet.from_sfs.next()) {
                return end;
            }
        }
    })
    .await
    .unwrap();
    assert!(closed.is_none(), "the quiet channel was closed");
    // The busy one, open as long, still answers.
    let _ = busy.ask(SfsBody::BiometricStart).await;
}

async fn nothing_anonymous_reaches_the_log_or_the_records(db: &TestDb) {
    let env = Env::new(db).await;
    let sfs = env.sfs().await;
    let head = env.head().await;
    let (app, key) = stranger();
    let (mut a, _) = connect(&sfs, &key, app, 1).await.unwrap();
    // Every request of a channel whose app instance nobody enrolled, with junk and with
    // well-formed OPAQUE messages: refused, nothing written.
    assert_eq!(code(a.register_pin(PIN).await), SfsCode::NotAllowed);
    let upload = SfsBody::RegisterPinFinish {
        upload: Blob(vec![7; 192]),
    };
    assert_eq!(code(a.ask(upload).await), SfsCode::NotAllowed);
    assert_eq!(code(a.login(PIN).await), SfsCode::NotRegistered);
    let junk_login = SfsBody::LoginStart {
        request: Blob(vec![1; 96]),
    };
    assert_eq!(code(a.ask(junk_login).await), SfsCode::NotRegistered);
    let finish = SfsBody::LoginFinish {
        finalization: Blob(vec![0; 64]),
        challenge: Bytes(CHALLENGE),
        account_key_thumbprint: Bytes(THUMBPRINT),
    };
    assert_eq!(code(a.ask(finish).await), SfsCode::Invalid);
    let biometric = SfsBody::RegisterBiometric {
        public_key: Bytes([4; 65]),
    };
    assert_eq!(code(a.ask(biometric).await), SfsCode::NotRegistered);
    assert_eq!(
        code(a.ask(SfsBody::BiometricStart).await),
        SfsCode::NotRegistered
    );
    let signature = SfsBody::BiometricFinish {
        signature: Bytes([0; 64]),
        challenge: Bytes(CHALLENGE),
        account_key_thumbprint: Bytes(THUMBPRINT),
    };
    assert_eq!(code(a.ask(signature).await), SfsCode::Invalid);
    // A bad version, and another key for the same id, write nothing either.
    assert!(connect(&sfs, &key, app, 2).await.is_err());
    connect(&sfs, &app_key(9), app, 1).await.unwrap();
    assert_eq!(env.head().await, head);
    assert_eq!(env.record_rows(app).await, 0);

    // Once a countersign server enrolled the app instance, its first registration binds the
    // key with the PIN, in one append.
    env.enrol(app);
    a.register_pin(PIN).await.unwrap();
    let events = env
        .store
        .read_all(head.map_or(0, |h| h + 1), 10)
        .await
        .unwrap();
    let types: Vec<_> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        ["second_factor.key_bound", "second_factor.pin_registered"]
    );
    assert_eq!(events[0].recorded_at, events[1].recorded_at);
    check(&sfs, &a.login(PIN).await.unwrap(), env.now_ms());
    assert_eq!(
        connect(&sfs, &app_key(9), app, 1).await.err(),
        Some(SfsWelcome::Refused {
            reason: SfsRefusal::KeyMismatch
        })
    );
}

async fn anonymous_work_is_rate_limited_per_address(db: &TestDb) {
    let env = Env::new(db).await;
    let limits = AnonymousLimits {
        per_address: Rate {
            burst: 3,
            per_second: 1,
        },
        global: Rate {
            burst: 7,
            per_second: 1,
        },
        max_addresses: 2,
    };
    let sfs = env.sfs_limited(limits).await;
    let registered = [0x42; 16];
    env.enrol(registered);
    // Registered before the storm (its hello and two registration steps: three tokens of
    // another address).
    let (mut r, _) = connect_from(
        &sfs,
        Some([10, 9, 9, 9].into()),
        &app_key(0x42),
        registered,
        1,
    )
    .await
    .unwrap()
    .unwrap();
    r.register_pin(PIN).await.unwrap();

    let attacker = Some(IpAddr::from([10, 0, 0, 1]));
    let mut accepted = Vec::new();
    let mut closed = 0;
    for _ in 0..10 {
        let (app, key) = stranger();
        match connect_from(&sfs, attacker, &key, app, 1).await.unwrap() {
            Some((channel, _)) => accepted.push(channel),
            None => closed += 1,
        }
    }
    // Its address's three; the global bucket keeps one (seven, less three each).
    assert_eq!((accepted.len(), closed), (3, 7));
    // A request on an anonymous channel takes a token too: none left now.
    let (app, key) = stranger();
    let other = Some(IpAddr::from([10, 0, 0, 2]));
    let (mut quiet, _) = connect_from(&sfs, other, &key, app, 1)
        .await
        .unwrap()
        .unwrap();
    let refused = quiet.ask(SfsBody::BiometricStart).await.unwrap_err();
    assert_eq!(refused.code, SfsCode::Internal);
    // A registered app instance is not limited.
    let (mut r, _) = connect_from(&sfs, attacker, &app_key(0x42), registered, 1)
        .await
        .unwrap()
        .unwrap();
    check(&sfs, &r.login(PIN).await.unwrap(), env.now_ms());
    // The buckets refill with time.
    env.clock.advance_secs(3);
    assert!(
        connect_from(&sfs, attacker, &key, app, 1)
            .await
            .unwrap()
            .is_some()
    );
    assert!(sfs.0.limiter.addresses() <= 2);
}

/// The record a client registering `pin` would upload, as the SFS would store it.
fn record_for(sfs: &Sfs, app: [u8; 16], pin: &str) -> Vec<u8> {
    let start = ClientRegistration::<Suite>::start(&mut OsRng, pin.as_bytes()).unwrap();
    let response = sfs
        .0
        .keys
        .opaque
        .registration_response(&start.message.serialize(), &app)
        .unwrap();
    let argon = argon();
    let finish = start
        .state
        .finish(
            &mut OsRng,
            pin.as_bytes(),
            RegistrationResponse::deserialize(&response).unwrap(),
            ClientRegistrationFinishParameters::new(Identifiers::default(), Some(&argon)),
        )
        .unwrap();
    crate::opaque::registration_record(&finish.message.serialize()).unwrap()
}

async fn a_record_stored_without_its_event_is_never_used(db: &TestDb) {
    let env = Env::new(db).await;
    let sfs = env.sfs().await;
    let app = [0x14; 16];
    let id = AppInstanceId::from_bytes(app);
    env.enrol(app);

    // A crash during the first registration: the record is stored, its event never appended.
    records::put(
        &env.database,
        &id,
        &record_for(&sfs, app, "555555"),
        env.now_ms(),
    )
    .await
    .unwrap();
    let (mut a, welcome) = connect(&sfs, &app_key(0x14), app, 1).await.unwrap();
    assert!(matches!(
        welcome,
        SfsWelcome::Accepted {
            pin_registered: false,
            ..
        }
    ));
    assert_eq!(code(a.login("555555").await), SfsCode::NotRegistered);
    a.register_pin(PIN).await.unwrap();
    check(&sfs, &a.login(PIN).await.unwrap(), env.now_ms());

    // A crash during a PIN change: the new record is stored, its event never appended. The
    // registered PIN keeps working and the orphan is never used.
    records::put(
        &env.database,
        &id,
        &record_for(&sfs, app, "666666"),
        env.now_ms(),
    )
    .await
    .unwrap();
    let (mut b, _) = connect(&sfs, &app_key(0x14), app, 1).await.unwrap();
    check(&sfs, &b.login(PIN).await.unwrap(), env.now_ms());
    assert_eq!(
        code(b.login("666666").await),
        SfsCode::WrongPin { attempts_left: 4 }
    );
    assert_eq!(
        env.record_rows(app).await,
        3,
        "the current record and two orphans"
    );

    // The next change works; it removes the record it supersedes and orphans past the grace.
    env.clock.advance_secs(11 * 60);
    check(&sfs, &b.login(PIN).await.unwrap(), env.now_ms());
    b.register_pin("777777").await.unwrap();
    check(&sfs, &b.login("777777").await.unwrap(), env.now_ms());
    assert_eq!(
        code(b.login(PIN).await),
        SfsCode::WrongPin { attempts_left: 4 }
    );
    assert_eq!(env.record_rows(app).await, 1);
    assert_eq!(
        env.event_types(app)
            .await
            .iter()
            .filter(|t| *t == "second_factor.pin_registered")
            .count(),
        2
    );
}

async fn a_record_of_the_first_schema_is_read_by_digest_until_replaced(db: &TestDb) {
    let env = Env::new(db).await;
    let sfs = env.sfs().await;
    let app = [0x15; 16];
    env.enrol(app);
    let (mut a, _) = connect(&sfs, &app_key(0x15), app, 1).await.unwrap();
    a.register_pin(PIN).await.unwrap();
    // As the first schema kept it: one row per app instance in `sfs_records`.
    with_pool!(&env.database, pool => {
        sqlx::query(
            "INSERT INTO sfs_records (app_instance, record, updated_at) \
             SELECT app_instance, record, created_at FROM sfs_opaque_records",
        )
        .execute(pool)
        .await
        .unwrap();
        sqlx::query("DELETE FROM sfs_opaque_records").execute(pool).await.unwrap();
    });
    check(&sfs, &a.login(PIN).await.unwrap(), env.now_ms());
    a.register_pin("246802").await.unwrap();
    check(&sfs, &a.login("246802").await.unwrap(), env.now_ms());
    assert_eq!(
        env.record_rows(app).await,
        1,
        "the old row went with the change"
    );
    // A first-schema row the stream does not name (overwritten before a crash) is not used.
    with_pool!(&env.database, pool => {
        sqlx::query("DELETE FROM sfs_opaque_records").execute(pool).await.unwrap();
        sqlx::query("INSERT INTO sfs_records (app_instance, record, updated_at) VALUES ($1, $2, 0)")
            .bind(app.as_slice())
            .bind(record_for(&sfs, app, "246802"))
            .execute(pool)
            .await
            .unwrap();
    });
    assert_eq!(code(a.login("246802").await), SfsCode::Internal);
}

countersign_eventstore::on_both_backends!(
    an_idle_channel_is_closed,
    a_thousand_anonymous_hellos_write_nothing,
    nothing_anonymous_reaches_the_log_or_the_records,
    anonymous_work_is_rate_limited_per_address,
    a_record_stored_without_its_event_is_never_used,
    a_record_of_the_first_schema_is_read_by_digest_until_replaced,
    register_login_and_change_pin,
    a_handshake_with_another_key_or_version_is_refused,
    wrong_pins_lock_survive_a_restart_and_revoke,
    concurrent_logins_never_exceed_the_policy,
    biometric_registration_and_login,
    the_key_endpoint_answers_the_pinned_keys,
);

/// Captured log output.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The process-wide log capture. Global rather than scoped: tracing caches per-callsite
/// interest across threads, so a scoped subscriber misses callsites other tests hit first.
/// Every test's log lines land here, so the scan below covers them all.
fn capture() -> &'static Captured {
    static CAPTURE: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    CAPTURE.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        captured
    })
}

#[tokio::test]
async fn the_pin_never_reaches_an_event_a_row_or_a_log_line() {
    let captured = capture();
    let db = TestDb::sqlite().await;
    let env = Env::new(&db).await;
    let sfs = env.sfs().await;
    let app = [6; 16];
    env.enrol(app);
    let (mut a, _) = connect(&sfs, &app_key(6), app, 1).await.unwrap();
    a.register_pin(PIN).await.unwrap();
    code(a.login("917365").await);
    a.login(PIN).await.unwrap();
    a.register_pin("917364917364").await.unwrap();
    a.login("917364917364").await.unwrap();
    tracing::info!("flows done");

    let needles: [&[u8]; 2] = [PIN.as_bytes(), b"393137333634"];
    let events = env.store.read_all(0, 10_000).await.unwrap();
    assert!(events.len() >= 6);
    for event in &events {
        for needle in needles {
            assert!(!contains(&event.payload, needle), "{}", event.event_type);
            assert!(!contains(&event.metadata_cbor, needle));
        }
    }
    let rows: Vec<Vec<u8>> = with_pool!(&env.database, pool => {
        let mut rows: Vec<Vec<u8>> = sqlx::query_scalar("SELECT record FROM sfs_opaque_records")
            .fetch_all(pool)
            .await
            .unwrap();
        rows.extend(
            sqlx::query_scalar::<_, Vec<u8>>("SELECT sealed FROM key_vault")
                .fetch_all(pool)
                .await
                .unwrap(),
        );
        rows
    });
    assert!(rows.len() >= 4, "a record and three vault entries");
    for row in &rows {
        for needle in needles {
            assert!(!contains(row, needle));
        }
    }
    let log = captured.0.lock().unwrap().clone();
    assert!(contains(&log, b"flows done"), "the capture works");
    assert!(contains(&log, b"pin login failed"), "the SFS logged");
    for needle in needles {
        assert!(!contains(&log, needle));
    }
    db.finish().await;
}
