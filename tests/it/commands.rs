//! The write side end to end on both backends: load → decide → append, retries on conflict,
//! idempotency keys, the key vault and crypto-shredding.

use std::sync::Arc;

use countersign_commands::secrets::ServerSecrets;
use countersign_commands::server::ServerCommands;
use countersign_commands::user::{UserCommands, data_key_ref};
use countersign_commands::{CommandError, FixedClock, execute, load};
use countersign_domain::server::{ConfigureServer, Server, ServerEvent};
use countersign_domain::user::{User, UserEvent};
use countersign_domain::{Context, DataKey, ErrorKind, Timestamp};
use countersign_eventstore::testing::TestDb;
use countersign_eventstore::vault::KeyVault;
use countersign_eventstore::{Direction, Metadata, StoreOptions, open};

async fn vault_for(db: &TestDb) -> KeyVault {
    let opened = open(&StoreOptions {
        url: db.url().to_owned(),
        pool_size: 4,
    })
    .await
    .unwrap();
    KeyVault::new(opened.vault, DataKey::from_bytes([9; 32]))
}

fn clock() -> Arc<FixedClock> {
    Arc::new(FixedClock(Timestamp(1_790_000_000_000)))
}

async fn user_lifecycle_and_shredding(db: &TestDb) {
    let vault = vault_for(db).await;
    let servers = ServerCommands::new(
        db.store.clone(),
        vault.clone(),
        ServerSecrets::new(vault.clone()),
        clock(),
    );
    let users = UserCommands::new(db.store.clone(), vault.clone(), clock());
    let meta = Metadata::default();
    let (server, created) = servers.create("Test Bank", &meta, None).await.unwrap();
    assert!(matches!(
        created.events.as_slice(),
        [ServerEvent::Created(_)]
    ));
    assert!(
        vault
            .get(&countersign_commands::server::signing_key_ref(server))
            .await
            .unwrap()
            .is_some(),
        "the private key is in the vault"
    );

    let (alice, registered) = users
        .register(server, "alice@example.org", &meta)
        .await
        .unwrap();
    let UserEvent::Registered(event) = &registered.events[0] else {
        panic!("{registered:?}")
    };
    assert_eq!(
        users
            .open(&alice.stream(), "userid", &event.userid)
            .await
            .unwrap()
            .as_deref(),
        Some("alice@example.org")
    );
    // Registering again is a conflict, and writes nothing.
    let again = users
        .register(server, "alice@example.org", &meta)
        .await
        .unwrap_err();
    assert!(
        matches!(
            again,
            CommandError::Rejected {
                kind: ErrorKind::Conflict,
                ..
            }
        ),
        "{again}"
    );
    let set = users
        .set_attribute(&alice, "email", "alice@example.org", &meta)
        .await
        .unwrap();
    assert!(
        set.position > registered.position,
        "answers carry the position reached"
    );

    users.delete(&alice, &meta).await.unwrap();
    assert!(
        vault.get(&data_key_ref(&alice)).await.unwrap().is_none(),
        "the data key is destroyed"
    );
    assert_eq!(
        users
            .open(&alice.stream(), "userid", &event.userid)
            .await
            .unwrap(),
        None
    );
    // The log still holds every event, and they still decode.
    let stream = db
        .store
        .read_stream(&alice.stream(), None, Direction::Forwards, 100)
        .await
        .unwrap();
    assert_eq!(stream.len(), 3);
    for e in &stream {
        e.decode::<UserEvent>().unwrap();
    }
    let after = users
        .set_attribute(&alice, "name", "A", &meta)
        .await
        .unwrap_err();
    assert!(
        matches!(
            after,
            CommandError::Rejected {
                kind: ErrorKind::Gone,
                ..
            }
        ),
        "{after}"
    );
}

/// Eight concurrent commands on one stream all succeed, each deciding on the state the
/// previous one left: the losers of each race decide again.
async fn concurrent_commands_retry_on_conflict(db: &TestDb) {
    let vault = vault_for(db).await;
    let users = UserCommands::new(db.store.clone(), vault, clock());
    let meta = Metadata::default();
    let servers = {
        let v = vault_for(db).await;
        ServerCommands::new(db.store.clone(), v.clone(), ServerSecrets::new(v), clock())
    };
    let (server, _) = servers.create("Race", &meta, None).await.unwrap();
    let (user, _) = users.register(server, "racer", &meta).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let users = users.clone();
        tasks.push(tokio::spawn(async move {
            users
                .set_attribute(&user, &format!("attr{i}"), "v", &Metadata::default())
                .await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let loaded = load::<User>(&db.store, &user.stream()).await.unwrap();
    let User::Active(active) = loaded.state else {
        panic!("{:?}", loaded.state)
    };
    assert_eq!(active.attributes.len(), 8);
    assert_eq!(loaded.version, Some(8));
}

/// A command retried with the same idempotency key answers the first result and writes nothing.
async fn idempotency_keys(db: &TestDb) {
    let vault = vault_for(db).await;
    let servers = ServerCommands::new(
        db.store.clone(),
        vault.clone(),
        ServerSecrets::new(vault.clone()),
        clock(),
    );
    let meta = Metadata::default();
    let (server, _) = servers.create("Idempotent", &meta, None).await.unwrap();
    let stream = server.stream();
    let change = ConfigureServer {
        session_timeout_secs: Some(900),
        ..ConfigureServer::default()
    };
    let mut ctx = Context::new(Timestamp(1));
    let first = execute::<Server>(
        &db.store,
        &stream,
        change.clone().into(),
        &mut ctx,
        &meta,
        Some("req-1"),
    )
    .await
    .unwrap();
    let head = db.store.last_position().await.unwrap();
    let second = execute::<Server>(
        &db.store,
        &stream,
        change.into(),
        &mut ctx,
        &meta,
        Some("req-1"),
    )
    .await
    .unwrap();
    assert_eq!(first, second);
    assert_eq!(db.store.last_position().await.unwrap(), head);
}

/// A writer that keeps its state (an SFS channel) decides without reloading, and when another
/// writer got there first the store refuses its append and it decides again on the stream as
/// it is.
async fn a_kept_state_appends_without_reloading_and_recovers_from_a_race(db: &TestDb) {
    use countersign_commands::{Kept, execute_kept};
    use countersign_domain::transaction::{
        CreateTransaction, PresentTransaction, RejectTransaction, Transaction, TransactionEvent,
        TransactionRequest, TransactionStatus,
    };
    use countersign_domain::{AccountId, ServerId, TransactionId, TransactionRef, UserDigest};

    let store = db.store.clone();
    let tx = TransactionRef::new(
        ServerId::from_bytes([1; 16]),
        TransactionId::from_bytes([2; 16]),
    );
    let (account, user) = (
        AccountId::from_bytes([3; 16]),
        UserDigest::from_bytes([4; 16]),
    );
    let stream = tx.stream();
    let meta = Metadata::default();
    let now = Timestamp(1_790_000_000_000);
    let mut kept: Option<Kept<Transaction>> = None;
    let request = TransactionRequest {
        transaction: tx,
        user,
        account_id: None,
        data: b"data".to_vec(),
        content_type: "text/plain".into(),
        text: "Sign?".into(),
        announce_info: None,
        timeout_secs: 300,
    };
    let created = execute_kept::<Transaction>(
        &store,
        &stream,
        &mut kept,
        CreateTransaction(request).into(),
        &mut Context::new(now),
        &meta,
    )
    .await
    .unwrap();
    assert!(matches!(
        created.events.as_slice(),
        [TransactionEvent::Created(_)]
    ));
    assert_eq!(
        kept.as_ref().unwrap().state.status(),
        TransactionStatus::Pending
    );

    // Another writer presents it: the kept state is now one event behind.
    execute::<Transaction>(
        &store,
        &stream,
        PresentTransaction {
            account_id: account,
            user,
        }
        .into(),
        &mut Context::new(now),
        &meta,
        None,
    )
    .await
    .unwrap();
    let rejected = execute_kept::<Transaction>(
        &store,
        &stream,
        &mut kept,
        RejectTransaction {
            account_id: account,
            user,
        }
        .into(),
        &mut Context::new(now),
        &meta,
    )
    .await
    .unwrap();
    assert!(matches!(
        rejected.events.as_slice(),
        [TransactionEvent::Rejected(_)]
    ));
    let types: Vec<String> = store
        .read_stream(&stream, Some(0), Direction::Forwards, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(
        types,
        [
            "transaction.created",
            "transaction.presented",
            "transaction.rejected"
        ]
    );
    let loaded = load::<Transaction>(&store, &stream).await.unwrap();
    assert_eq!(kept.as_ref().unwrap().state, loaded.state);
    // Kept in step: the next command appends on the right version without a race.
    let again = execute_kept::<Transaction>(
        &store,
        &stream,
        &mut kept,
        RejectTransaction {
            account_id: account,
            user,
        }
        .into(),
        &mut Context::new(now),
        &meta,
    )
    .await
    .unwrap();
    assert!(again.events.is_empty(), "rejecting again changes nothing");
}

countersign_eventstore::on_both_backends!(
    user_lifecycle_and_shredding,
    concurrent_commands_retry_on_conflict,
    idempotency_keys,
    a_kept_state_appends_without_reloading_and_recovers_from_a_race
);
