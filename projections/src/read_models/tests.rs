//! Read models built from real domain events in a real store, on PostgreSQL and SQLite.

use std::time::Duration;

use countersign_domain::account::{
    AccountDeleted, AccountEvent, AccountKeyRotated, AccountRegistered, AccountUpgraded,
    AccountUserLinked, DeletedBy, KeyRole,
};
use countersign_domain::enrolment::{
    EnrolmentCompleted, EnrolmentEvent, EnrolmentExpired, EnrolmentStarted,
};
use countersign_domain::second_factor::SecondFactorKind;
use countersign_domain::server::{
    ApiKeyIssued, ApiKeyRevoked, ServerConfigured, ServerCreated, ServerDeleted, ServerEvent,
    ServerSettings,
};
use countersign_domain::session::{
    AbortedBy, LogoutReason, SessionAborted, SessionConfirmed, SessionEvent, SessionExpired,
    SessionFailed, SessionFailure, SessionLoggedIn, SessionLoggedOut, SessionOpened, SessionPinged,
    SessionScanned, SessionSecondFactorVerified,
};
use countersign_domain::transaction::{
    TransactionCreated, TransactionEvent, TransactionExpired, TransactionOrigin,
    TransactionPresented, TransactionRejected, TransactionSigned, TransactionStatus,
};
use countersign_domain::user::{
    UserAttributeRemoved, UserAttributeSet, UserDeleted, UserEvent, UserRegistered,
};
use countersign_domain::{
    AccountId, AccountRef, AnyEvent, ApiKeyId, AppInstanceId, EnrolmentId, EnrolmentRef, Hsid,
    Sealed, ServerId, SessionRef, Timestamp, TransactionId, TransactionRef, UserDigest, UserRef,
};
use countersign_eventstore::testing::TestDb;
use countersign_eventstore::{
    ExpectedVersion, Metadata, NewEvent, SharedStore, StoreOptions, open,
};

use super::*;

// ---------------------------------------------------------------------------------------
// Fixtures

const T0: i64 = 1_767_225_600_000;

fn t(secs: i64) -> Timestamp {
    Timestamp::from_millis(T0 + secs * 1000)
}

fn sid(n: u8) -> ServerId {
    ServerId::from_bytes([n; 16])
}

fn digest(n: u8) -> UserDigest {
    UserDigest::from_bytes([n; 16])
}

fn account_id(n: u8) -> AccountId {
    AccountId::from_bytes([n; 16])
}

fn hsid(n: u8) -> Hsid {
    Hsid::from_bytes([n; 32])
}

fn enrolment_id(n: u8) -> EnrolmentId {
    EnrolmentId::from_bytes([n; 16])
}

fn sealed(tag: u8, len: usize) -> Sealed {
    Sealed {
        nonce: [tag; 12],
        ciphertext: vec![tag; len],
    }
}

fn settings(name: &str) -> ServerSettings {
    ServerSettings::defaults(name.to_owned())
}

/// Appends domain events to the store with deterministic event ids.
struct Log {
    store: SharedStore,
    next_id: u128,
}

impl Log {
    fn new(db: &TestDb) -> Self {
        Self {
            store: db.store.clone(),
            next_id: 1,
        }
    }

    /// Appends to `stream`; answers the last position.
    async fn append(&mut self, stream: &str, events: Vec<AnyEvent>) -> u64 {
        let events = events
            .iter()
            .map(|e| {
                self.next_id += 1;
                NewEvent::from_domain(uuid::Uuid::from_u128(self.next_id), e, Metadata::default())
                    .unwrap()
            })
            .collect();
        self.store
            .append(stream, ExpectedVersion::Any, events)
            .await
            .unwrap()
            .last_position
    }

    async fn server(&mut self, server: ServerId, events: Vec<ServerEvent>) -> u64 {
        self.append(
            &server.stream(),
            events.into_iter().map(Into::into).collect(),
        )
        .await
    }

    async fn user(&mut self, server: ServerId, user: UserDigest, events: Vec<UserEvent>) -> u64 {
        let stream = UserRef {
            server_id: server,
            digest: user,
        }
        .stream();
        self.append(&stream, events.into_iter().map(Into::into).collect())
            .await
    }

    async fn account(&mut self, server: ServerId, id: AccountId, events: Vec<AccountEvent>) -> u64 {
        let stream = AccountRef::new(server, id).stream();
        self.append(&stream, events.into_iter().map(Into::into).collect())
            .await
    }

    async fn enrolment(
        &mut self,
        server: ServerId,
        id: EnrolmentId,
        events: Vec<EnrolmentEvent>,
    ) -> u64 {
        let stream = EnrolmentRef::new(server, id).stream();
        self.append(&stream, events.into_iter().map(Into::into).collect())
            .await
    }

    async fn session(&mut self, server: ServerId, id: Hsid, events: Vec<SessionEvent>) -> u64 {
        let stream = SessionRef::new(server, id).stream();
        self.append(&stream, events.into_iter().map(Into::into).collect())
            .await
    }

    async fn transaction(
        &mut self,
        server: ServerId,
        id: TransactionId,
        events: Vec<TransactionEvent>,
    ) -> u64 {
        let stream = TransactionRef::new(server, id).stream();
        self.append(&stream, events.into_iter().map(Into::into).collect())
            .await
    }
}

fn server_created(server: ServerId, name: &str) -> ServerEvent {
    ServerEvent::Created(ServerCreated {
        server_id: server,
        public_key: vec![4; 65],
        key_thumbprint: [server.as_bytes()[0]; 32],
        settings: settings(name),
        user_digest: countersign_domain::UserDigestScheme::HmacSha256,
    })
}

fn key_issued(key: u8, label: &str, at: Timestamp) -> ServerEvent {
    ServerEvent::ApiKeyIssued(ApiKeyIssued {
        key_id: ApiKeyId::from_bytes([key; 16]),
        label: label.into(),
        secret_hash: [key; 32],
        issued_at: at,
    })
}

fn registered(server: ServerId, user: UserDigest, tag: u8) -> UserEvent {
    UserEvent::Registered(UserRegistered {
        user: UserRef {
            server_id: server,
            digest: user,
        },
        userid: sealed(tag, 24),
    })
}

fn attribute(name: &str, tag: u8) -> UserEvent {
    UserEvent::AttributeSet(UserAttributeSet {
        name: name.into(),
        value: sealed(tag, 8),
    })
}

fn account_registered(
    server: ServerId,
    id: AccountId,
    user: Option<UserDigest>,
    factor: Option<SecondFactorKind>,
) -> AccountEvent {
    AccountEvent::Registered(AccountRegistered {
        account: AccountRef::new(server, id),
        app_instance: AppInstanceId::from_bytes([0xa0; 16]),
        user,
        channel_public_key: vec![4; 65],
        signing_public_key: vec![4; 65],
        signing_key_thumbprint: [id.as_bytes()[0]; 32],
        second_factor: factor,
    })
}

fn enrolment_started(
    server: ServerId,
    id: EnrolmentId,
    user: UserDigest,
    expires: Timestamp,
) -> EnrolmentEvent {
    EnrolmentEvent::Started(EnrolmentStarted {
        enrolment: EnrolmentRef::new(server, id),
        user,
        ttl_secs: 600,
        expires_at: expires,
    })
}

fn opened(
    server: ServerId,
    id: Hsid,
    ping: u32,
    expires: Timestamp,
    user: Option<UserDigest>,
) -> SessionEvent {
    SessionEvent::Opened(SessionOpened {
        session: SessionRef::new(server, id),
        ping_time_secs: ping,
        timeout_secs: 300,
        expires_at: expires,
        app_login: false,
        user,
        announce_info: Some("Log in to Acme?".into()),
        session_info: None,
        push_to: Vec::new(),
    })
}

fn confirmed(account: AccountId) -> SessionEvent {
    SessionEvent::Confirmed(SessionConfirmed {
        account_id: account,
    })
}

fn verified(at: Timestamp) -> SessionEvent {
    SessionEvent::SecondFactorVerified(SessionSecondFactorVerified {
        factor: SecondFactorKind::Pin,
        attestation_hash: [9; 32],
        verified_at: at,
        reused: false,
    })
}

fn logged_in(account: AccountId, user: UserDigest, deadline: Option<Timestamp>) -> SessionEvent {
    SessionEvent::LoggedIn(SessionLoggedIn {
        account_id: account,
        user,
        continuous: deadline.is_some(),
        ping_deadline: deadline,
    })
}

fn pinged(at: Timestamp, deadline: Timestamp) -> SessionEvent {
    SessionEvent::Pinged(SessionPinged {
        pinged_at: at,
        ping_deadline: deadline,
    })
}

fn transaction_id(n: u8) -> TransactionId {
    TransactionId::from_bytes([n; 16])
}

/// `transaction.created` for `user`, created at `created` and due at `expires`.
fn tx_created(
    server: ServerId,
    id: TransactionId,
    user: UserDigest,
    account: Option<AccountId>,
    created: Timestamp,
    expires: Timestamp,
) -> TransactionEvent {
    TransactionEvent::Created(TransactionCreated {
        transaction: TransactionRef::new(server, id),
        user,
        account_id: account,
        data: vec![id.as_bytes()[0], 0, 0xff],
        data_hash: [1; 32],
        content_type: "application/json".into(),
        text: format!("Pay {} EUR?", id.as_bytes()[0]),
        text_hash: [2; 32],
        announce_info: account.map(|_| "Payment".into()),
        created_at: created,
        expires_at: expires,
        origin: TransactionOrigin::Api,
    })
}

fn tx_presented(account: AccountId, at: Timestamp) -> TransactionEvent {
    TransactionEvent::Presented(TransactionPresented {
        account_id: account,
        presented_at: at,
    })
}

fn tx_signed(account: AccountId, at: Timestamp) -> TransactionEvent {
    TransactionEvent::Signed(TransactionSigned {
        account_id: account,
        data_hash: [1; 32],
        text_hash: [2; 32],
        content_type: "application/json".into(),
        created_at: t(0),
        expires_at: t(300),
        device_signature: vec![7; 70],
        attestation: vec![8; 90],
        factor: SecondFactorKind::Biometric,
        device_time: at,
        signed_at: at,
    })
}

fn tx_rejected(account: AccountId, at: Timestamp) -> TransactionEvent {
    TransactionEvent::Rejected(TransactionRejected {
        account_id: account,
        rejected_at: at,
    })
}

fn tx_expired(at: Timestamp) -> TransactionEvent {
    TransactionEvent::Expired(TransactionExpired { expired_at: at })
}

fn logged_out(at: Timestamp) -> SessionEvent {
    SessionEvent::LoggedOut(SessionLoggedOut {
        reason: LogoutReason::User,
        logged_out_at: at,
    })
}

async fn models(db: &TestDb) -> ReadModels {
    let opened = open(&StoreOptions {
        url: db.url().to_owned(),
        pool_size: 4,
    })
    .await
    .unwrap();
    ReadModels::new(opened.database)
}

/// Two dumps are equal; on failure, shows only the lines that differ.
#[track_caller]
fn assert_same_dump(actual: &str, expected: &str, what: &str) {
    if actual != expected {
        let only = |a: &str, b: &str| {
            a.lines()
                .filter(|l| !b.lines().any(|m| m == *l))
                .map(|l| format!("  {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        panic!(
            "{what}: dumps differ\nonly in actual:\n{}\nonly in expected:\n{}",
            only(actual, expected),
            only(expected, actual)
        );
    }
}

fn states(row: &SessionRow) -> Vec<&str> {
    row.history.iter().map(|h| h.state.as_str()).collect()
}

// ---------------------------------------------------------------------------------------
// A varied, interleaved log (deterministic): every event type, sessions advancing in turns
// so a session's events are spread over many batches.

struct Rng(u64);

impl Rng {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

/// Appends a scenario of about `sessions * 4` session events plus users, accounts,
/// enrolments and server changes over two servers, in `rounds`; calls `between` after each
/// round (to process incrementally).
async fn scenario<F, Fut>(log: &mut Log, sessions: u8, rounds: usize, mut between: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let servers = [sid(1), sid(2)];
    for (i, s) in servers.iter().enumerate() {
        log.server(
            *s,
            vec![
                server_created(*s, &format!("Server {i}")),
                key_issued(i as u8 + 1, "ci", t(0)),
            ],
        )
        .await;
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Per session: which step comes next (0 = not opened).
    let mut steps = vec![0u8; usize::from(sessions)];
    let per_round = (usize::from(sessions) * 6).div_ceil(rounds).max(1);
    for round in 0..rounds {
        for _ in 0..per_round {
            let n = rng.below(u64::from(sessions)) as u8;
            let server = servers[usize::from(n % 2)];
            let user = digest(n % 7 + 1);
            let account = account_id(n % 5 + 1);
            let step = &mut steps[usize::from(n)];
            let at = t(i64::from(n) * 10 + i64::from(*step));
            let events = match *step {
                0 => vec![opened(
                    server,
                    hsid(n),
                    u32::from(n % 3) * 30,
                    t(300 + i64::from(n)),
                    n.is_multiple_of(4).then_some(user),
                )],
                1 if n.is_multiple_of(3) => {
                    vec![SessionEvent::Scanned(SessionScanned { scanned_at: at })]
                }
                1 | 2 => vec![confirmed(account)],
                3 if n.is_multiple_of(2) => vec![verified(at)],
                3 => vec![confirmed(account)],
                4 if n.is_multiple_of(11) => vec![SessionEvent::Aborted(SessionAborted {
                    by: AbortedBy::User,
                    aborted_at: at,
                })],
                4 if n.is_multiple_of(13) => vec![SessionEvent::Failed(SessionFailed {
                    reason: SessionFailure::BadSignature,
                    failed_at: at,
                })],
                4 if n.is_multiple_of(17) => {
                    vec![SessionEvent::Expired(SessionExpired { expired_at: at })]
                }
                4 => vec![logged_in(
                    account,
                    user,
                    (!n.is_multiple_of(3)).then(|| t(500)),
                )],
                5 | 6 if !n.is_multiple_of(3) => vec![pinged(at, t(600 + i64::from(*step)))],
                5..=7 => vec![logged_out(at)],
                _ => vec![],
            };
            *step += 1;
            if !events.is_empty() {
                log.session(server, hsid(n), events).await;
            }
            // Other aggregates, now and then.
            match rng.below(12) {
                0 => {
                    let u = rng.below(7) as u8 + 1;
                    log.user(
                        server,
                        digest(u),
                        vec![registered(server, digest(u), u), attribute("email", u)],
                    )
                    .await;
                }
                1 => {
                    let u = rng.below(7) as u8 + 1;
                    let name = ["email", "name", "groups"][rng.below(3) as usize];
                    log.user(
                        server,
                        digest(u),
                        vec![attribute(name, rng.below(200) as u8)],
                    )
                    .await;
                }
                2 => {
                    let u = rng.below(7) as u8 + 1;
                    log.user(
                        server,
                        digest(u),
                        vec![UserEvent::AttributeRemoved(UserAttributeRemoved {
                            name: "name".into(),
                        })],
                    )
                    .await;
                }
                3 if rng.below(3) == 0 => {
                    let u = rng.below(7) as u8 + 1;
                    log.user(
                        server,
                        digest(u),
                        vec![UserEvent::Deleted(UserDeleted { deleted_at: at })],
                    )
                    .await;
                }
                4 => {
                    let a = rng.below(5) as u8 + 1;
                    log.account(
                        server,
                        account_id(a),
                        vec![account_registered(server, account_id(a), None, None)],
                    )
                    .await;
                }
                5 => {
                    let a = rng.below(5) as u8 + 1;
                    let event = match rng.below(4) {
                        0 => AccountEvent::UserLinked(AccountUserLinked { user: digest(a) }),
                        1 => AccountEvent::Upgraded(AccountUpgraded {
                            second_factor: SecondFactorKind::Biometric,
                            attestation_hash: [1; 32],
                        }),
                        2 => AccountEvent::KeyRotated(AccountKeyRotated {
                            role: KeyRole::Signing,
                            public_key: vec![4; 65],
                            key_thumbprint: [rng.below(200) as u8; 32],
                        }),
                        _ => AccountEvent::Deleted(AccountDeleted {
                            by: DeletedBy::App,
                            deleted_at: at,
                        }),
                    };
                    log.account(server, account_id(a), vec![event]).await;
                }
                6 => {
                    let e = rng.below(6) as u8 + 1;
                    let event = match rng.below(3) {
                        0 => enrolment_started(server, enrolment_id(e), digest(e), t(100)),
                        1 => EnrolmentEvent::Completed(EnrolmentCompleted {
                            account_id: account_id(e),
                            completed_at: at,
                        }),
                        _ => EnrolmentEvent::Expired(EnrolmentExpired { expired_at: at }),
                    };
                    log.enrolment(server, enrolment_id(e), vec![event]).await;
                }
                7 => {
                    let event = match rng.below(4) {
                        0 => ServerEvent::Configured(ServerConfigured {
                            settings: settings(&format!("Renamed {round}")),
                        }),
                        1 => key_issued(rng.below(50) as u8 + 10, "more", at),
                        2 => ServerEvent::ApiKeyRevoked(ApiKeyRevoked {
                            key_id: ApiKeyId::from_bytes([rng.below(50) as u8 + 10; 16]),
                            revoked_at: at,
                        }),
                        _ => ServerEvent::ApiKeyRevoked(ApiKeyRevoked {
                            key_id: ApiKeyId::from_bytes([1; 16]),
                            revoked_at: at,
                        }),
                    };
                    log.server(server, vec![event]).await;
                }
                8 => {
                    let n = rng.below(6) as u8 + 1;
                    let account = n.is_multiple_of(2).then(|| account_id(n));
                    let created =
                        tx_created(server, transaction_id(n), digest(n), account, at, t(400));
                    log.transaction(server, transaction_id(n), vec![created])
                        .await;
                }
                9 => {
                    let n = rng.below(6) as u8 + 1;
                    let event = match rng.below(4) {
                        0 => tx_presented(account_id(n), at),
                        1 => tx_signed(account_id(n), at),
                        2 => tx_rejected(account_id(n), at),
                        _ => tx_expired(at),
                    };
                    log.transaction(server, transaction_id(n), vec![event])
                        .await;
                }
                _ => {}
            }
        }
        between().await;
    }
    log.server(
        servers[1],
        vec![ServerEvent::Deleted(ServerDeleted {
            deleted_at: t(9_999),
        })],
    )
    .await;
    between().await;
}

// ---------------------------------------------------------------------------------------
// Tests

async fn queries_answer_from_events(db: &TestDb) {
    let reads = models(db).await;
    let mut log = Log::new(db);
    let s = sid(1);
    log.server(
        s,
        vec![
            server_created(s, "Acme"),
            key_issued(1, "prod", t(1)),
            key_issued(2, "old", t(2)),
        ],
    )
    .await;
    log.server(
        s,
        vec![
            ServerEvent::ApiKeyRevoked(ApiKeyRevoked {
                key_id: ApiKeyId::from_bytes([2; 16]),
                revoked_at: t(3),
            }),
            ServerEvent::Configured(ServerConfigured {
                settings: ServerSettings {
                    logo_url: Some("https://acme.example/logo.png".into()),
                    ..settings("Acme Corp")
                },
            }),
        ],
    )
    .await;
    let u = digest(7);
    log.user(
        s,
        u,
        vec![
            registered(s, u, 7),
            attribute("name", 1),
            attribute("email", 2),
        ],
    )
    .await;
    log.user(
        s,
        u,
        vec![
            attribute("name", 3),
            UserEvent::AttributeRemoved(UserAttributeRemoved {
                name: "email".into(),
            }),
        ],
    )
    .await;
    let a = account_id(3);
    log.account(s, a, vec![account_registered(s, a, None, None)])
        .await;
    log.account(
        s,
        a,
        vec![
            AccountEvent::UserLinked(AccountUserLinked { user: u }),
            AccountEvent::Upgraded(AccountUpgraded {
                second_factor: SecondFactorKind::Pin,
                attestation_hash: [0; 32],
            }),
            AccountEvent::KeyRotated(AccountKeyRotated {
                role: KeyRole::Signing,
                public_key: vec![4; 65],
                key_thumbprint: [0x77; 32],
            }),
            AccountEvent::KeyRotated(AccountKeyRotated {
                role: KeyRole::Channel,
                public_key: vec![4; 65],
                key_thumbprint: [0x88; 32],
            }),
        ],
    )
    .await;
    let gone = account_id(4);
    log.account(
        s,
        gone,
        vec![account_registered(
            s,
            gone,
            Some(u),
            Some(SecondFactorKind::Biometric),
        )],
    )
    .await;
    log.account(
        s,
        gone,
        vec![AccountEvent::Deleted(AccountDeleted {
            by: DeletedBy::Server,
            deleted_at: t(5),
        })],
    )
    .await;
    let e = enrolment_id(5);
    log.enrolment(s, e, vec![enrolment_started(s, e, u, t(600))])
        .await;
    log.enrolment(
        s,
        e,
        vec![EnrolmentEvent::Completed(EnrolmentCompleted {
            account_id: a,
            completed_at: t(7),
        })],
    )
    .await;
    let h = hsid(9);
    let opened_at = log
        .session(s, h, vec![opened(s, h, 30, t(300), Some(u))])
        .await;
    log.session(
        s,
        h,
        vec![
            SessionEvent::Scanned(SessionScanned { scanned_at: t(10) }),
            confirmed(a),
            verified(t(12)),
        ],
    )
    .await;
    log.session(
        s,
        h,
        vec![logged_in(a, u, Some(t(60))), pinged(t(40), t(90))],
    )
    .await;
    let last = log.session(s, h, vec![logged_out(t(50))]).await;

    assert_eq!(reads.catch_up(&db.store).await.unwrap(), last + 1);
    assert_eq!(*reads.processed().borrow(), last + 1);

    let server = reads.server(s).await.unwrap().unwrap();
    assert_eq!(server.name, "Acme Corp");
    assert_eq!(
        server.logo_url.as_deref(),
        Some("https://acme.example/logo.png")
    );
    assert_eq!(server.settings.name, "Acme Corp");
    assert_eq!(server.key_thumbprint, [1; 32]);
    assert_eq!(server.deleted_at, None);
    assert!(reads.server(sid(99)).await.unwrap().is_none());
    assert_eq!(reads.servers(None, 10).await.unwrap().len(), 1);
    assert!(reads.servers(Some(s), 10).await.unwrap().is_empty());

    let keys = reads.api_keys(s).await.unwrap();
    assert_eq!(
        keys.iter().map(|k| k.label.as_str()).collect::<Vec<_>>(),
        ["prod", "old"]
    );
    assert_eq!(keys[0].revoked_at, None);
    assert_eq!(keys[1].revoked_at, Some(t(3)));
    let by_hash = reads.api_key_by_hash(&[1; 32]).await.unwrap().unwrap();
    assert_eq!(
        (by_hash.server_id, by_hash.key_id),
        (s, ApiKeyId::from_bytes([1; 16]))
    );
    assert!(reads.api_key_by_hash(&[3; 32]).await.unwrap().is_none());

    let user = reads.user(s, u).await.unwrap().unwrap();
    assert_eq!(user.userid_sealed, sealed(7, 24));
    assert_eq!(user.attributes, vec![("name".to_owned(), sealed(3, 8))]);
    let users = reads.users(s, None, 10).await.unwrap();
    assert_eq!(users, vec![user.clone()]);
    assert!(
        reads
            .users(s, Some(user.registered_position), 10)
            .await
            .unwrap()
            .is_empty()
    );

    let accounts = reads.accounts(s, u).await.unwrap();
    assert_eq!(accounts.len(), 1, "the deleted account is gone");
    let account = &accounts[0];
    assert_eq!(account.account_id, a);
    assert_eq!(account.user_digest, Some(u));
    assert_eq!(account.second_factor.as_deref(), Some("pin"));
    assert_eq!(
        account.signing_key_thumbprint, [0x77; 32],
        "only the signing key's rotation counts"
    );
    assert_eq!(reads.account(s, a).await.unwrap().as_ref(), Some(account));
    assert!(reads.account(s, gone).await.unwrap().is_none());

    let enrolment = reads.enrolment(s, e).await.unwrap().unwrap();
    assert_eq!(
        (
            enrolment.state.as_str(),
            enrolment.account_id,
            enrolment.expires_at
        ),
        ("completed", Some(a), t(600))
    );

    let session = reads.session(s, h).await.unwrap().unwrap();
    assert_eq!(session.state, "logged_out");
    assert_eq!(
        states(&session),
        ["pending", "scanned", "logged_in", "logged_out"]
    );
    assert_eq!(session.history[0].position, opened_at);
    assert_eq!(session.history[1].at, t(10), "the event's own time");
    assert_eq!(session.history[3].at, t(50));
    assert_eq!(session.ping_deadline, Some(t(90)));
    assert_eq!(
        (
            session.account_id,
            session.user_digest,
            session.intended_user
        ),
        (Some(a), Some(u), Some(u))
    );
    assert_eq!(session.ping_time_secs, 30);
    assert_eq!(session.announce_info.as_deref(), Some("Log in to Acme?"));
    assert_eq!(session.last_position, last);
    assert_eq!(session.updated_at, t(50));
    let state = reads.session_state(s, h).await.unwrap().unwrap();
    assert!(state.history.is_empty());
    assert_eq!(
        SessionRow {
            history: session.history.clone(),
            ..state
        },
        session
    );

    // Deleting the user deletes its rows; nothing else.
    let deleted = log
        .user(
            s,
            u,
            vec![UserEvent::Deleted(UserDeleted { deleted_at: t(70) })],
        )
        .await;
    log.server(
        s,
        vec![ServerEvent::Deleted(ServerDeleted { deleted_at: t(80) })],
    )
    .await;
    assert_eq!(reads.catch_up(&db.store).await.unwrap(), 2);
    assert!(reads.user(s, u).await.unwrap().is_none());
    assert!(reads.users(s, None, 10).await.unwrap().is_empty());
    assert!(!reads.dump().await.unwrap().contains("rm_user_attributes"));
    assert_eq!(
        reads.server(s).await.unwrap().unwrap().deleted_at,
        Some(t(80)),
        "deleted servers stay readable"
    );
    assert!(reads.wait_for(deleted, Duration::ZERO).await.unwrap());
}

/// The same ids under two servers never meet: every query is scoped by the server.
async fn tenants_never_cross(db: &TestDb) {
    let reads = models(db).await;
    let mut log = Log::new(db);
    let (a, b) = (sid(0xa), sid(0xb));
    let (u, acc, e, h) = (digest(1), account_id(1), enrolment_id(1), hsid(1));
    for (s, tag) in [(a, 0xa), (b, 0xb)] {
        log.server(
            s,
            vec![
                server_created(s, &format!("tenant {tag}")),
                key_issued(tag, "k", t(0)),
            ],
        )
        .await;
        log.user(s, u, vec![registered(s, u, tag), attribute("name", tag)])
            .await;
        log.account(s, acc, vec![account_registered(s, acc, Some(u), None)])
            .await;
        log.enrolment(s, e, vec![enrolment_started(s, e, u, t(i64::from(tag)))])
            .await;
        log.session(s, h, vec![opened(s, h, 0, t(i64::from(tag)), None)])
            .await;
    }
    // Tenant b's session logs in; a's is aborted; b deletes the user and the account.
    log.session(b, h, vec![confirmed(acc), logged_in(acc, u, None)])
        .await;
    log.session(
        a,
        h,
        vec![SessionEvent::Aborted(SessionAborted {
            by: AbortedBy::Server,
            aborted_at: t(1),
        })],
    )
    .await;
    log.user(
        b,
        u,
        vec![UserEvent::Deleted(UserDeleted { deleted_at: t(2) })],
    )
    .await;
    log.account(
        b,
        acc,
        vec![AccountEvent::Deleted(AccountDeleted {
            by: DeletedBy::App,
            deleted_at: t(2),
        })],
    )
    .await;
    reads.catch_up(&db.store).await.unwrap();

    assert_eq!(
        reads.session_state(a, h).await.unwrap().unwrap().state,
        "aborted"
    );
    assert_eq!(
        reads.session_state(b, h).await.unwrap().unwrap().state,
        "logged_in"
    );
    assert_eq!(
        states(&reads.session(a, h).await.unwrap().unwrap()),
        ["pending", "aborted"]
    );
    assert_eq!(
        reads.session_state(b, h).await.unwrap().unwrap().expires_at,
        t(0xb)
    );
    let user_a = reads.user(a, u).await.unwrap().unwrap();
    assert_eq!(user_a.attributes, vec![("name".to_owned(), sealed(0xa, 8))]);
    assert!(reads.user(b, u).await.unwrap().is_none());
    assert_eq!(reads.users(a, None, 10).await.unwrap().len(), 1);
    assert!(reads.users(b, None, 10).await.unwrap().is_empty());
    assert_eq!(reads.accounts(a, u).await.unwrap().len(), 1);
    assert!(reads.accounts(b, u).await.unwrap().is_empty());
    assert!(reads.account(b, acc).await.unwrap().is_none());
    assert_eq!(
        reads.enrolment(a, e).await.unwrap().unwrap().expires_at,
        t(0xa)
    );
    assert_eq!(
        reads.enrolment(b, e).await.unwrap().unwrap().expires_at,
        t(0xb)
    );
    assert_eq!(reads.api_keys(a).await.unwrap().len(), 1);
    assert_eq!(
        reads.api_keys(a).await.unwrap()[0].key_id,
        ApiKeyId::from_bytes([0xa; 16])
    );
    let c = sid(0xc);
    assert!(reads.session_state(c, h).await.unwrap().is_none());
    assert!(reads.session(c, h).await.unwrap().is_none());
    assert!(reads.user(c, u).await.unwrap().is_none());
    assert!(reads.account(c, acc).await.unwrap().is_none());
    assert!(reads.enrolment(c, e).await.unwrap().is_none());
    assert!(reads.api_keys(c).await.unwrap().is_empty());
}

/// Incremental processing (small batches, caught up after every few appends) and a replay
/// from position 0 give the same tables, whatever the batch size.
async fn replay_equals_incremental(db: &TestDb) {
    let reads = models(db).await.with_batch_size(7);
    let mut log = Log::new(db);
    let store = db.store.clone();
    scenario(&mut log, 60, 25, || {
        let (reads, store) = (reads.clone(), store.clone());
        async move {
            reads.catch_up(&store).await.unwrap();
        }
    })
    .await;
    let head = db.store.last_position().await.unwrap().unwrap();
    assert_eq!(*reads.processed().borrow(), head + 1);
    let incremental = reads.dump().await.unwrap();
    assert!(incremental.contains(":pending:") && incremental.contains(":logged_out:"));
    assert!(incremental.contains("state=\"scanned\""));
    assert!(incremental.contains("rm_user_attributes"));
    assert!(incremental.contains("rm_transactions") && incremental.contains("status=\"signed\""));

    for batch in [DEFAULT_BATCH, 1, 13] {
        let reads = models(db).await.with_batch_size(batch);
        let mut calls = Vec::new();
        let replayed = reads
            .replay(&db.store, None, &mut |done, total| {
                calls.push((done, total))
            })
            .await
            .unwrap();
        assert_eq!(replayed, head + 1);
        assert_eq!(calls.last(), Some(&(head + 1, head + 1)));
        assert_same_dump(
            &reads.dump().await.unwrap(),
            &incremental,
            &format!("replay in batches of {batch}"),
        );
    }

    // One projection alone: the others are left as they are and the result is the same.
    let names = vec![
        "sessions".to_owned(),
        "users".to_owned(),
        "transactions".to_owned(),
    ];
    let replayed = reads
        .replay(&db.store, Some(&names), &mut |_, _| {})
        .await
        .unwrap();
    assert_eq!(replayed, head + 1);
    assert_same_dump(
        &reads.dump().await.unwrap(),
        &incremental,
        "replay of two projections",
    );
    assert!(matches!(
        reads
            .replay(&db.store, Some(&["nope".to_owned()]), &mut |_, _| {})
            .await,
        Err(ProjectionError::UnknownProjection(_))
    ));
}

/// Two projectors on one database (two instances) end with the same tables as one: each
/// batch is written by whichever claims its checkpoints first.
async fn concurrent_projectors_agree(db: &TestDb) {
    let mut log = Log::new(db);
    scenario(&mut log, 40, 4, || async {}).await;
    let one = models(db).await.with_batch_size(5);
    let two = models(db).await.with_batch_size(3);
    let (a, b) = tokio::join!(one.catch_up(&db.store), two.catch_up(&db.store));
    a.unwrap();
    b.unwrap();
    let head = db.store.last_position().await.unwrap().unwrap();
    one.catch_up(&db.store).await.unwrap();
    assert_eq!(*one.processed().borrow(), head + 1);
    let together = one.dump().await.unwrap();
    one.replay(&db.store, None, &mut |_, _| {}).await.unwrap();
    assert_same_dump(
        &one.dump().await.unwrap(),
        &together,
        "replay after two projectors",
    );
}

async fn checkpoints_survive_a_new_instance(db: &TestDb) {
    let mut log = Log::new(db);
    let s = sid(1);
    log.server(s, vec![server_created(s, "Acme")]).await;
    let h = hsid(1);
    let last = log.session(s, h, vec![opened(s, h, 0, t(300), None)]).await;
    let first = models(db).await;
    assert_eq!(first.catch_up(&db.store).await.unwrap(), last + 1);
    drop(first);

    let second = models(db).await;
    assert!(
        second.wait_for(last, Duration::ZERO).await.unwrap(),
        "loaded from the checkpoints"
    );
    assert_eq!(
        second.catch_up(&db.store).await.unwrap(),
        0,
        "nothing twice"
    );
    let more = log.session(s, h, vec![confirmed(account_id(1))]).await;
    assert_eq!(second.catch_up(&db.store).await.unwrap(), 1);
    assert_eq!(*second.processed().borrow(), more + 1);
    assert_eq!(
        states(&second.session(s, h).await.unwrap().unwrap()),
        ["pending", "scanned"]
    );
    // A later batch that starts in the stored state adds no entry for it, only what follows.
    log.session(s, h, vec![verified(t(20)), confirmed(account_id(2))])
        .await;
    second.catch_up(&db.store).await.unwrap();
    log.session(
        s,
        h,
        vec![verified(t(21)), logged_in(account_id(2), digest(1), None)],
    )
    .await;
    second.catch_up(&db.store).await.unwrap();
    let row = second.session(s, h).await.unwrap().unwrap();
    assert_eq!(states(&row), ["pending", "scanned", "logged_in"]);
    assert_eq!(row.account_id, Some(account_id(2)));
}

async fn wait_for_follows_run(db: &TestDb) {
    let reads = models(db).await;
    let running = tokio::spawn({
        let (reads, store) = (reads.clone(), db.store.clone());
        async move { reads.run(store).await }
    });
    let mut log = Log::new(db);
    let s = sid(1);
    log.server(s, vec![server_created(s, "Acme")]).await;
    for n in 0..20u8 {
        let h = hsid(n);
        let position = log.session(s, h, vec![opened(s, h, 0, t(300), None)]).await;
        assert!(
            reads
                .wait_for(position, Duration::from_secs(30))
                .await
                .unwrap()
        );
        assert_eq!(
            reads.session_state(s, h).await.unwrap().unwrap().state,
            "pending"
        );
        let position = log.session(s, h, vec![confirmed(account_id(1))]).await;
        assert!(
            reads
                .wait_for(position, Duration::from_secs(30))
                .await
                .unwrap()
        );
        assert_eq!(
            reads.session_state(s, h).await.unwrap().unwrap().state,
            "scanned"
        );
    }
    let head = db.store.last_position().await.unwrap().unwrap();
    assert!(
        !reads
            .wait_for(head + 1, Duration::from_millis(200))
            .await
            .unwrap(),
        "nothing there yet"
    );
    assert!(!running.is_finished());
    running.abort();
}

async fn deadlines_are_due(db: &TestDb) {
    let reads = models(db).await;
    let mut log = Log::new(db);
    let (a, b) = (sid(1), sid(2));
    // pending, expires at 100 (b) / 200 (a); scanned, expires at 150; logged in with a ping
    // deadline at 120; one-shot logged in; logged out; a pending one not due yet.
    log.session(a, hsid(1), vec![opened(a, hsid(1), 0, t(200), None)])
        .await;
    log.session(b, hsid(2), vec![opened(b, hsid(2), 0, t(100), None)])
        .await;
    log.session(
        a,
        hsid(3),
        vec![
            opened(a, hsid(3), 0, t(150), None),
            confirmed(account_id(1)),
        ],
    )
    .await;
    log.session(
        a,
        hsid(4),
        vec![
            opened(a, hsid(4), 30, t(90), None),
            logged_in(account_id(1), digest(1), Some(t(110))),
        ],
    )
    .await;
    log.session(a, hsid(4), vec![pinged(t(100), t(120))]).await;
    log.session(
        a,
        hsid(5),
        vec![
            opened(a, hsid(5), 0, t(10), None),
            logged_in(account_id(1), digest(1), None),
        ],
    )
    .await;
    log.session(
        a,
        hsid(6),
        vec![opened(a, hsid(6), 0, t(10), None), logged_out(t(20))],
    )
    .await;
    log.session(a, hsid(7), vec![opened(a, hsid(7), 0, t(1_000), None)])
        .await;
    log.enrolment(
        a,
        enrolment_id(1),
        vec![enrolment_started(a, enrolment_id(1), digest(1), t(50))],
    )
    .await;
    log.enrolment(
        b,
        enrolment_id(2),
        vec![enrolment_started(b, enrolment_id(2), digest(1), t(40))],
    )
    .await;
    log.enrolment(
        a,
        enrolment_id(3),
        vec![enrolment_started(a, enrolment_id(3), digest(1), t(30))],
    )
    .await;
    log.enrolment(
        a,
        enrolment_id(3),
        vec![EnrolmentEvent::Expired(EnrolmentExpired {
            expired_at: t(31),
        })],
    )
    .await;
    log.enrolment(
        a,
        enrolment_id(4),
        vec![enrolment_started(a, enrolment_id(4), digest(1), t(5_000))],
    )
    .await;
    reads.catch_up(&db.store).await.unwrap();

    let due = reads.sessions_due(t(500), 100).await.unwrap();
    assert_eq!(
        due,
        vec![
            SessionRef::new(b, hsid(2)),
            SessionRef::new(a, hsid(4)),
            SessionRef::new(a, hsid(3)),
            SessionRef::new(a, hsid(1)),
        ]
    );
    assert_eq!(reads.sessions_due(t(500), 2).await.unwrap(), due[..2]);
    assert_eq!(reads.sessions_due(t(119), 100).await.unwrap(), due[..1]);
    assert!(reads.sessions_due(t(99), 100).await.unwrap().is_empty());

    let due = reads.enrolments_due(t(100), 100).await.unwrap();
    assert_eq!(
        due,
        vec![
            EnrolmentRef::new(b, enrolment_id(2)),
            EnrolmentRef::new(a, enrolment_id(1))
        ]
    );
    assert_eq!(reads.enrolments_due(t(100), 1).await.unwrap(), due[..1]);
    assert!(reads.enrolments_due(t(39), 100).await.unwrap().is_empty());
}

/// Transactions: each event's facts land in the row; a device of the user sees the open
/// ones meant for it (no account named, or its own), oldest first, until their deadline;
/// the sweep sees open ones past it; another tenant sees none of them.
async fn transactions_answer_from_events(db: &TestDb) {
    let reads = models(db).await;
    let mut log = Log::new(db);
    let (a, b) = (sid(1), sid(2));
    let (u, other) = (digest(1), digest(2));
    let (mine, theirs) = (account_id(1), account_id(2));
    // 1: open for any account; 2: named for `theirs`; 3: presented on `mine`; 4: signed;
    // 5: rejected; 6: expired; 7: another user's; 8: open, due at 50; 9: another tenant's.
    log.transaction(
        a,
        transaction_id(1),
        vec![tx_created(a, transaction_id(1), u, None, t(10), t(300))],
    )
    .await;
    log.transaction(
        a,
        transaction_id(2),
        vec![tx_created(
            a,
            transaction_id(2),
            u,
            Some(theirs),
            t(5),
            t(300),
        )],
    )
    .await;
    log.transaction(
        a,
        transaction_id(3),
        vec![
            tx_created(a, transaction_id(3), u, Some(mine), t(1), t(300)),
            tx_presented(theirs, t(2)),
        ],
    )
    .await;
    let presented = log
        .transaction(a, transaction_id(3), vec![tx_presented(mine, t(3))])
        .await;
    log.transaction(
        a,
        transaction_id(4),
        vec![tx_created(a, transaction_id(4), u, None, t(2), t(300))],
    )
    .await;
    log.transaction(a, transaction_id(4), vec![tx_presented(mine, t(3))])
        .await;
    let signed = log
        .transaction(a, transaction_id(4), vec![tx_signed(mine, t(4))])
        .await;
    log.transaction(
        a,
        transaction_id(5),
        vec![
            tx_created(a, transaction_id(5), u, None, t(3), t(300)),
            tx_rejected(mine, t(6)),
        ],
    )
    .await;
    log.transaction(
        a,
        transaction_id(6),
        vec![tx_created(a, transaction_id(6), u, None, t(4), t(20))],
    )
    .await;
    log.transaction(a, transaction_id(6), vec![tx_expired(t(21))])
        .await;
    log.transaction(
        a,
        transaction_id(7),
        vec![tx_created(a, transaction_id(7), other, None, t(4), t(300))],
    )
    .await;
    log.transaction(
        a,
        transaction_id(8),
        vec![tx_created(a, transaction_id(8), u, None, t(20), t(50))],
    )
    .await;
    log.transaction(
        b,
        transaction_id(9),
        vec![tx_created(b, transaction_id(9), u, None, t(0), t(40))],
    )
    .await;
    reads.catch_up(&db.store).await.unwrap();

    let row = reads
        .transaction(a, transaction_id(3))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.status, TransactionStatus::Presented);
    assert_eq!(row.presented_by, Some(mine));
    assert_eq!(row.account_id, Some(mine));
    assert_eq!(row.position, presented);
    assert_eq!(row.origin, TransactionOrigin::Api);
    assert_eq!(row.data, vec![3, 0, 0xff]);
    assert_eq!(row.text, "Pay 3 EUR?");
    assert_eq!(row.announce_info.as_deref(), Some("Payment"));
    assert_eq!((row.created_at, row.expires_at), (t(1), t(300)));
    assert_eq!(row.signed_by, None);

    let row = reads
        .transaction(a, transaction_id(4))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.status, TransactionStatus::Signed);
    assert_eq!(row.presented_by, Some(mine));
    assert_eq!(row.signed_by, Some(mine));
    assert_eq!(row.factor, Some(SecondFactorKind::Biometric));
    assert_eq!(row.signed_at, Some(t(4)));
    assert_eq!(row.position, signed);
    let row = reads
        .transaction(a, transaction_id(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.status, TransactionStatus::Rejected);
    assert_eq!((row.rejected_by, row.rejected_at), (Some(mine), Some(t(6))));
    let row = reads
        .transaction(a, transaction_id(6))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.status, TransactionStatus::Expired);
    assert_eq!(row.expired_at, Some(t(21)));
    assert!(
        reads
            .transaction(b, transaction_id(1))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        reads
            .transaction(a, transaction_id(9))
            .await
            .unwrap()
            .is_none()
    );

    let ids = |rows: Vec<TransactionRow>| -> Vec<u8> {
        rows.iter()
            .map(|r| r.transaction_id.as_bytes()[0])
            .collect()
    };
    let open = reads.pending_transactions(a, u, mine, t(30), 100).await;
    assert_eq!(ids(open.unwrap()), vec![3, 1, 8]);
    let open = reads.pending_transactions(a, u, theirs, t(30), 100).await;
    assert_eq!(ids(open.unwrap()), vec![2, 1, 8]);
    let open = reads.pending_transactions(a, u, mine, t(30), 2).await;
    assert_eq!(ids(open.unwrap()), vec![3, 1]);
    let open = reads.pending_transactions(a, u, mine, t(50), 100).await;
    assert_eq!(ids(open.unwrap()), vec![3, 1], "due at 50: gone at 50");
    let open = reads.pending_transactions(a, other, mine, t(30), 100).await;
    assert_eq!(ids(open.unwrap()), vec![7]);
    let open = reads.pending_transactions(b, u, mine, t(30), 100).await;
    assert_eq!(ids(open.unwrap()), vec![9]);

    assert_eq!(
        reads.transactions_due(t(100), 100).await.unwrap(),
        vec![
            TransactionRef::new(b, transaction_id(9)),
            TransactionRef::new(a, transaction_id(8)),
        ]
    );
    assert_eq!(
        reads.transactions_due(t(100), 1).await.unwrap(),
        vec![TransactionRef::new(b, transaction_id(9))]
    );
    assert!(reads.transactions_due(t(39), 100).await.unwrap().is_empty());
    assert_eq!(reads.transactions_due(t(300), 100).await.unwrap().len(), 6);

    // The transactions alone rebuild to the same rows.
    let before = reads.dump().await.unwrap();
    reads
        .replay(
            &db.store,
            Some(&["transactions".to_owned()]),
            &mut |_, _| {},
        )
        .await
        .unwrap();
    assert_same_dump(
        &reads.dump().await.unwrap(),
        &before,
        "replay of transactions",
    );
}

/// An event of a read model's aggregate that does not decode stops the projection before
/// it, naming its position; other aggregates' events are not read models' concern.
async fn undecodable_events_stop_the_projection(db: &TestDb) {
    let reads = models(db).await;
    let mut log = Log::new(db);
    let s = sid(1);
    let ok = log.server(s, vec![server_created(s, "Acme")]).await;
    let other = |event_type: &str, payload: Vec<u8>| NewEvent {
        event_id: uuid::Uuid::from_u128(u128::from(payload.len() as u64) << 64 | 7),
        event_type: event_type.into(),
        schema_version: 1,
        payload,
        metadata: Metadata::default(),
    };
    db.store
        .append(
            "bench-1",
            ExpectedVersion::Any,
            vec![other("bench.appended", vec![1, 2, 3])],
        )
        .await
        .unwrap();
    assert_eq!(reads.catch_up(&db.store).await.unwrap(), ok + 2);
    let bad = db
        .store
        .append(
            &SessionRef::new(s, hsid(1)).stream(),
            ExpectedVersion::Any,
            vec![other("session.opened", vec![0xff])],
        )
        .await
        .unwrap()
        .last_position;
    let error = reads.catch_up(&db.store).await.unwrap_err();
    assert!(
        matches!(error, ProjectionError::Decode { position, .. } if position == bad),
        "{error}"
    );
    assert!(!reads.wait_for(bad, Duration::ZERO).await.unwrap());
    assert!(reads.wait_for(bad - 1, Duration::ZERO).await.unwrap());
}

countersign_eventstore::on_both_backends!(
    queries_answer_from_events,
    tenants_never_cross,
    replay_equals_incremental,
    concurrent_projectors_agree,
    checkpoints_survive_a_new_instance,
    wait_for_follows_run,
    deadlines_are_due,
    transactions_answer_from_events,
    undecodable_events_stop_the_projection,
);
