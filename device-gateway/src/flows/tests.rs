//! The race between a session step and the session's end, made deterministic: the log runs a
//! hook right after the step's event is committed and before the append answers the gateway,
//! and the hook ends the session and tells the hub of it, as the follower does. That is the
//! instant a business system's DELETE (or a missed ping) may land in; the device on whose
//! connection the step ran must hear of the end all the same.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use countersign_commands::Commands;
use countersign_domain::account::{Account, RegisterAccount};
use countersign_domain::server::{ConfigureServer, SecondFactorPolicy};
use countersign_domain::{
    AccountId, AccountRef, AppInstanceId, Hsid, ServerId, SessionRef, UserDigest,
};
use countersign_eventstore::{
    AppendResult, Direction, EventStore, ExpectedVersion, Metadata, NewEvent, RecordedEvent,
    SharedStore, StoreError, WriteStats,
};
use countersign_protocol::device::{Answer, Bytes, ErrorCode, Notice, RequestBody, SessionEnd};
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};

use super::test_world::{Base, connection, key, settings_now};
use super::{Connection, Identity, handle};
use crate::hub::Hub;
use crate::{Gateway, GatewayConfig};

type Hook = Box<dyn FnOnce(u64) -> BoxFuture<'static, ()> + Send>;

/// The log, running a hook once right after an event of the armed type is committed, before
/// the append answers. The hook is given the position after the committed append.
struct Hooked {
    inner: SharedStore,
    armed: Mutex<Option<(&'static str, Hook)>>,
}

impl std::fmt::Debug for Hooked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hooked(..)")
    }
}

#[async_trait]
impl EventStore for Hooked {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        let hook = {
            let mut armed = self.armed.lock().unwrap();
            let hit = armed
                .as_ref()
                .is_some_and(|(kind, _)| events.iter().any(|e| e.event_type == *kind));
            if hit { armed.take() } else { None }
        };
        let done = self.inner.append(stream, expected, events).await?;
        if let Some((_, hook)) = hook {
            hook(done.last_position + 1).await;
        }
        Ok(done)
    }

    async fn read_stream(
        &self,
        stream: &str,
        from_version: Option<u64>,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner
            .read_stream(stream, from_version, direction, limit)
            .await
    }

    async fn read_all(&self, from: u64, limit: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_all(from, limit).await
    }

    async fn last_position(&self) -> Result<Option<u64>, StoreError> {
        self.inner.last_position().await
    }

    fn head(&self) -> watch::Receiver<Option<u64>> {
        self.inner.head()
    }

    fn write_stats(&self) -> WriteStats {
        self.inner.write_stats()
    }
}

struct World {
    _dir: tempfile::TempDir,
    store: Arc<Hooked>,
    gateway: Gateway,
    commands: Commands,
    server: ServerId,
    account: Box<countersign_domain::account::ActiveAccount>,
    session: SessionRef,
}

impl World {
    /// A server asking no second factor, an account of a user, a continuous session open.
    async fn new() -> Self {
        let none = SecondFactorPolicy {
            require_for_login: false,
            ..SecondFactorPolicy::default()
        };
        let configure = ConfigureServer {
            name: None,
            logo_url: None,
            second_factor: Some(none),
            session_timeout_secs: None,
            default_ping_time_secs: None,
            ..ConfigureServer::default()
        };
        let mut hooked = None;
        let Base {
            _dir: dir,
            commands,
            gateway,
            server,
            ..
        } = Base::new(GatewayConfig::default(), configure, |inner| {
            let store = Arc::new(Hooked {
                inner,
                armed: Mutex::new(None),
            });
            hooked = Some(store.clone());
            store
        })
        .await;
        let store = hooked.unwrap();
        let metadata = Metadata::default();
        let account = AccountRef::new(server, AccountId::from_bytes([2; 16]));
        commands
            .accounts
            .register(
                RegisterAccount {
                    account,
                    app_instance: AppInstanceId::from_bytes([4; 16]),
                    user: Some(UserDigest::from_bytes([5; 16])),
                    channel_public_key: key(6),
                    signing_public_key: key(7),
                    second_factor: None,
                },
                &metadata,
            )
            .await
            .unwrap();
        let Account::Active(active) = commands.accounts.load(account).await.unwrap().state else {
            panic!("the account is not active");
        };
        let session = SessionRef::new(server, Hsid::from_bytes([3; 32]));
        commands
            .sessions
            .open(
                session,
                countersign_commands::session::SessionOptions {
                    ping_time_secs: Some(30),
                    announce_info: None,
                    session_info: None,
                    user: None,
                },
                &metadata,
                None,
            )
            .await
            .unwrap();
        Self {
            _dir: dir,
            store,
            gateway,
            commands,
            server,
            account: Box::new(active),
            session,
        }
    }

    fn hub(&self) -> &Hub {
        self.gateway.hub()
    }

    /// A connection of the account, registered with the hub as the socket code does.
    async fn connect(&self) -> (Connection, mpsc::Receiver<Notice>) {
        let settings = settings_now(&self.gateway, self.server).await;
        let (id, notices) = self
            .hub()
            .register(Some((self.server, self.account.account.account_id)));
        let identity = Identity::Account(self.account.clone());
        let conn = connection(&self.gateway, self.server, settings, identity, id);
        (conn, notices)
    }

    /// Right after the next `event_type` is committed, before the gateway hears its append
    /// answered, the business system ends the session and the follower tells the hub.
    fn end_right_after(&self, event_type: &'static str) {
        let (commands, hub, store, session) = (
            self.commands.clone(),
            self.hub().clone(),
            self.store.inner.clone(),
            self.session,
        );
        let hook: Hook = Box::new(move |from| {
            Box::pin(async move {
                commands
                    .sessions
                    .end_by_server(session, &Metadata::default())
                    .await
                    .unwrap();
                for event in store.read_all(from, 100).await.unwrap() {
                    hub.dispatch(&event);
                }
            })
        });
        *self.store.armed.lock().unwrap() = Some((event_type, hook));
    }

    fn hsid(&self) -> Bytes<32> {
        Bytes(*self.session.hsid.as_bytes())
    }
}

fn ended(hsid: Bytes<32>, how: SessionEnd) -> Notice {
    Notice::SessionEnded { hsid, how }
}

#[tokio::test]
async fn an_abort_committed_right_after_the_scan_reaches_the_scanner() {
    let world = World::new().await;
    let (mut conn, mut notices) = world.connect().await;
    world.end_right_after("session.scanned");
    let answer = handle(&mut conn, RequestBody::Scan { hsid: world.hsid() }).await;
    assert!(matches!(answer, Ok(Answer::Session(_))), "{answer:?}");
    assert_eq!(
        notices.try_recv().ok(),
        Some(ended(world.hsid(), SessionEnd::Aborted)),
        "the abort committed between the scan and its answer reached no one"
    );
}

/// Confirm and log in on a connection that did not scan (the scan was on another one, as
/// after a reconnect): the step itself must make the connection listen, before it appends.
#[tokio::test]
async fn an_end_committed_right_after_a_confirm_or_a_login_reaches_that_connection() {
    for (step, event_type, how) in [
        ("confirm", "session.confirmed", SessionEnd::Aborted),
        ("log_in", "session.logged_in", SessionEnd::LoggedOut),
    ] {
        let world = World::new().await;
        let (mut scanner, _) = world.connect().await;
        let scanned = handle(&mut scanner, RequestBody::Scan { hsid: world.hsid() }).await;
        assert!(matches!(scanned, Ok(Answer::Session(_))), "{scanned:?}");
        let (mut conn, mut notices) = world.connect().await;
        world.end_right_after(event_type);
        let body = match step {
            "confirm" => RequestBody::Confirm { hsid: world.hsid() },
            _ => RequestBody::LogIn { hsid: world.hsid() },
        };
        let answer = handle(&mut conn, body).await;
        assert!(answer.is_ok(), "{step}: {answer:?}");
        assert_eq!(
            notices.try_recv().ok(),
            Some(ended(world.hsid(), how)),
            "{step}: the end committed between the step and its answer reached no one"
        );
    }
}

/// A step that fails leaves the connection listening to nothing it did not listen to.
#[tokio::test]
async fn a_failed_step_forgets_the_watch_it_added() {
    let world = World::new().await;
    let (mut conn, mut notices) = world.connect().await;
    let stranger = Hsid::from_bytes([8; 32]);
    let refused = handle(
        &mut conn,
        RequestBody::Scan {
            hsid: Bytes(*stranger.as_bytes()),
        },
    )
    .await;
    assert_eq!(refused.err().map(|e| e.code), Some(ErrorCode::NotFound));
    world
        .hub()
        .session_ended(world.server, stranger, SessionEnd::Aborted);
    assert!(notices.try_recv().is_err(), "a refused scan still listens");

    // A watch from an earlier step stays when a later one fails.
    let scanned = handle(&mut conn, RequestBody::Scan { hsid: world.hsid() }).await;
    assert!(matches!(scanned, Ok(Answer::Session(_))), "{scanned:?}");
    world
        .commands
        .sessions
        .end_by_server(world.session, &Metadata::default())
        .await
        .unwrap();
    let refused = handle(&mut conn, RequestBody::LogIn { hsid: world.hsid() }).await;
    assert_eq!(refused.err().map(|e| e.code), Some(ErrorCode::Ended));
    world
        .hub()
        .session_ended(world.server, world.session.hsid, SessionEnd::Aborted);
    assert_eq!(
        notices.try_recv().ok(),
        Some(ended(world.hsid(), SessionEnd::Aborted))
    );
}
