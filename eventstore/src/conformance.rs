//! The conformance suite: every test runs against PostgreSQL (a fresh database each) and
//! SQLite (a fresh file each); see [`crate::testing`].

// Test ids come from the clock here; in production ids are inputs.
#![allow(clippy::disallowed_methods)]

use std::collections::HashSet;
use std::time::Duration;

use uuid::Uuid;

use crate::testing::TestDb;
use crate::{Direction, ExpectedVersion, Metadata, NewEvent, StoreError, Subscription};

fn event(n: u64) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "test.happened".into(),
        schema_version: 1,
        payload: n.to_be_bytes().to_vec(),
        metadata: Metadata {
            actor: Some("conformance".into()),
            ..Metadata::default()
        },
    }
}

fn events(n: u64) -> Vec<NewEvent> {
    (0..n).map(event).collect()
}

async fn append_and_read(db: &TestDb) {
    let store = &db.store;
    assert_eq!(store.last_position().await.unwrap(), None);
    let written = events(3);
    let result = store
        .append("order-1", ExpectedVersion::NoStream, written.clone())
        .await
        .unwrap();
    assert_eq!(
        (
            result.first_position,
            result.last_position,
            result.next_expected_version
        ),
        (0, 2, 2)
    );
    let other = store
        .append("order-2", ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    assert_eq!(other.first_position, 3);

    let forwards = store
        .read_stream("order-1", None, Direction::Forwards, 100)
        .await
        .unwrap();
    assert_eq!(
        forwards.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(
        forwards.iter().map(|e| e.position).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    for (stored, sent) in forwards.iter().zip(&written) {
        assert_eq!(stored.event_id, sent.event_id);
        assert_eq!(stored.payload, sent.payload);
        assert_eq!(stored.metadata, sent.metadata);
        assert_eq!(stored.event_type, "test.happened");
        assert!(stored.recorded_at > 0);
    }
    let from_one = store
        .read_stream("order-1", Some(1), Direction::Forwards, 1)
        .await
        .unwrap();
    assert_eq!(
        from_one.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![1]
    );
    let backwards = store
        .read_stream("order-1", None, Direction::Backwards, 2)
        .await
        .unwrap();
    assert_eq!(
        backwards.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![2, 1]
    );
    let backwards_from = store
        .read_stream("order-1", Some(0), Direction::Backwards, 10)
        .await
        .unwrap();
    assert_eq!(backwards_from.len(), 1);
    assert!(
        store
            .read_stream("nothing", None, Direction::Forwards, 10)
            .await
            .unwrap()
            .is_empty()
    );

    let all = store.read_all(0, 100).await.unwrap();
    assert_eq!(
        all.iter().map(|e| e.position).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    assert_eq!(store.read_all(2, 1).await.unwrap()[0].position, 2);
    assert_eq!(store.last_position().await.unwrap(), Some(3));
}

async fn expected_version_conflicts(db: &TestDb) {
    let store = &db.store;
    let conflict = |r: Result<crate::AppendResult, StoreError>| {
        assert!(
            matches!(r, Err(StoreError::WrongExpectedVersion { .. })),
            "expected a conflict, got {r:?}"
        );
    };
    conflict(
        store
            .append("s", ExpectedVersion::StreamExists, events(1))
            .await,
    );
    conflict(
        store
            .append("s", ExpectedVersion::Exact(0), events(1))
            .await,
    );
    store
        .append("s", ExpectedVersion::NoStream, events(2))
        .await
        .unwrap();
    conflict(
        store
            .append("s", ExpectedVersion::NoStream, events(1))
            .await,
    );
    conflict(
        store
            .append("s", ExpectedVersion::Exact(0), events(1))
            .await,
    );
    conflict(
        store
            .append("s", ExpectedVersion::Exact(2), events(1))
            .await,
    );
    assert_eq!(
        store.last_position().await.unwrap(),
        Some(1),
        "refused appends wrote nothing"
    );
    store
        .append("s", ExpectedVersion::Exact(1), events(1))
        .await
        .unwrap();
    store
        .append("s", ExpectedVersion::StreamExists, events(1))
        .await
        .unwrap();
    let r = store
        .append("s", ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    assert_eq!(r.next_expected_version, 4);
    let r = store
        .append("t", ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    assert_eq!((r.first_position, r.next_expected_version), (5, 0));
}

async fn concurrent_appends_at_one_version(db: &TestDb) {
    let store = &db.store;
    store
        .append("contested", ExpectedVersion::NoStream, events(1))
        .await
        .unwrap();
    for round in 0..10u64 {
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .append("contested", ExpectedVersion::Exact(round), events(1))
                    .await
            }));
        }
        let mut wins = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(_) => wins += 1,
                Err(StoreError::WrongExpectedVersion { .. }) => {}
                Err(other) => panic!("unexpected {other}"),
            }
        }
        assert_eq!(wins, 1, "exactly one writer wins round {round}");
    }
    let stream = db
        .store
        .read_stream("contested", None, Direction::Forwards, 100)
        .await
        .unwrap();
    assert_eq!(stream.len(), 11);
}

async fn idempotent_retries(db: &TestDb) {
    let store = &db.store;
    for (i, expected) in [
        ExpectedVersion::NoStream,
        ExpectedVersion::Exact(1),
        ExpectedVersion::StreamExists,
        ExpectedVersion::Any,
    ]
    .into_iter()
    .enumerate()
    {
        let batch = events(2);
        let first = store
            .append("retried", expected, batch.clone())
            .await
            .unwrap();
        let head = store.last_position().await.unwrap();
        let again = store
            .append("retried", expected, batch.clone())
            .await
            .unwrap();
        assert_eq!(
            first, again,
            "retry {i} ({expected:?}) answers the original positions"
        );
        assert_eq!(
            store.last_position().await.unwrap(),
            head,
            "retry {i} wrote nothing"
        );
    }
    let stream = store
        .read_stream("retried", None, Direction::Forwards, 100)
        .await
        .unwrap();
    assert_eq!(stream.len(), 8);
    let ids: HashSet<Uuid> = stream.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), 8);

    // One stored id mixed with a new one, or a stored id offered on another stream: refused.
    let mut mixed = events(1);
    mixed.push(stream[0].clone_as_new());
    assert!(matches!(
        store.append("retried", ExpectedVersion::Any, mixed).await,
        Err(StoreError::DuplicateEventId { .. })
    ));
    assert!(matches!(
        store
            .append(
                "elsewhere",
                ExpectedVersion::Any,
                vec![stream[0].clone_as_new()]
            )
            .await,
        Err(StoreError::DuplicateEventId { .. })
    ));
    // A retry whose expected version cannot have produced the stored events: a conflict.
    assert!(matches!(
        store
            .append(
                "retried",
                ExpectedVersion::Exact(5),
                vec![stream[0].clone_as_new(), stream[1].clone_as_new()]
            )
            .await,
        Err(StoreError::WrongExpectedVersion { .. })
    ));
    assert_eq!(store.read_all(0, 100).await.unwrap().len(), 8);
}

impl crate::RecordedEvent {
    fn clone_as_new(&self) -> NewEvent {
        NewEvent {
            event_id: self.event_id,
            event_type: self.event_type.clone(),
            schema_version: self.schema_version,
            payload: self.payload.clone(),
            metadata: self.metadata.clone(),
        }
    }
}

async fn invalid_appends_change_nothing(db: &TestDb) {
    let store = &db.store;
    let invalid = |r: Result<crate::AppendResult, StoreError>| {
        assert!(
            matches!(r, Err(StoreError::InvalidAppend { .. })),
            "got {r:?}"
        );
    };
    invalid(store.append("s", ExpectedVersion::Any, vec![]).await);
    invalid(store.append("", ExpectedVersion::Any, events(1)).await);
    invalid(store.append("$all", ExpectedVersion::Any, events(1)).await);
    invalid(store.append("a\nb", ExpectedVersion::Any, events(1)).await);
    invalid(
        store
            .append(&"x".repeat(300), ExpectedVersion::Any, events(1))
            .await,
    );
    let mut twice = events(1);
    twice.push(twice[0].clone());
    invalid(store.append("s", ExpectedVersion::Any, twice).await);
    let mut unversioned = events(1);
    unversioned[0].schema_version = 0;
    invalid(store.append("s", ExpectedVersion::Any, unversioned).await);
    let mut huge = events(1);
    huge[0].payload = vec![0; crate::MAX_PAYLOAD_BYTES + 1];
    invalid(store.append("s", ExpectedVersion::Any, huge).await);
    assert_eq!(store.last_position().await.unwrap(), None);
}

/// 64 writers × 500 appends while a subscriber checks it sees 0..N once each, in order.
async fn concurrent_writers_with_a_subscriber(db: &TestDb) {
    const WRITERS: u64 = 64;
    const APPENDS: u64 = 500;
    let total = WRITERS * APPENDS;
    let mut subscription = Subscription::new(db.store.clone(), 0);
    let subscriber = tokio::spawn(async move {
        for expected in 0..total {
            let event = tokio::time::timeout(Duration::from_secs(60), subscription.next())
                .await
                .expect("subscriber stalled")
                .expect("subscription failed");
            assert_eq!(
                event.position, expected,
                "positions arrive once each, in order"
            );
        }
    });
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = db.store.clone();
        writers.push(tokio::spawn(async move {
            let stream = format!("writer-{w}");
            let mut expected = ExpectedVersion::NoStream;
            for i in 0..APPENDS {
                let r = store
                    .append(&stream, expected, vec![event(i)])
                    .await
                    .expect("append");
                expected = ExpectedVersion::Exact(r.next_expected_version);
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    subscriber.await.unwrap();
    assert_eq!(db.store.last_position().await.unwrap(), Some(total - 1));
    // Group commit: the 32,000 single-event appends shared transactions.
    let stats = db.store.write_stats();
    assert_eq!((stats.appends, stats.events), (total, total));
    assert!(
        stats.transactions < total / 2,
        "appends shared transactions: {stats:?}"
    );
}

async fn catch_up_then_live(db: &TestDb) {
    db.store
        .append("a", ExpectedVersion::Any, events(5))
        .await
        .unwrap();
    let mut subscription = Subscription::new(db.store.clone(), 2);
    for expected in 2..5 {
        assert_eq!(subscription.next().await.unwrap().position, expected);
    }
    let store = db.store.clone();
    let live =
        tokio::spawn(async move { store.append("b", ExpectedVersion::Any, events(2)).await });
    assert_eq!(subscription.next().await.unwrap().position, 5);
    assert_eq!(subscription.next().await.unwrap().position, 6);
    live.await.unwrap().unwrap();
}

/// Two instances (two pools, two writers) on one database stay gapless, and a subscriber on
/// one sees what the other appends.
async fn two_instances_share_one_log(db: &TestDb) {
    let other = db.second_instance().await;
    let mut subscription = Subscription::new(other.clone(), 0);
    let mut tasks = Vec::new();
    for (i, store) in [db.store.clone(), other.clone()].into_iter().enumerate() {
        for w in 0..8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0..50 {
                    store
                        .append(&format!("i{i}-w{w}"), ExpectedVersion::Any, vec![event(n)])
                        .await
                        .expect("append");
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    for expected in 0..800 {
        let e = tokio::time::timeout(Duration::from_secs(30), subscription.next())
            .await
            .expect("stalled")
            .unwrap();
        assert_eq!(e.position, expected);
    }
    // Live: an append on the first instance wakes a subscriber of the second.
    let r = db
        .store
        .append("late", ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), subscription.next())
        .await
        .expect("stalled")
        .unwrap();
    assert_eq!(e.position, r.first_position);
}

async fn undecodable_payload_is_a_typed_error(db: &TestDb) {
    use countersign_domain::server::ServerEvent;
    let garbage = NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "server.created".into(),
        schema_version: 1,
        payload: vec![0xff, 0x00, 0x13],
        metadata: Metadata::default(),
    };
    db.store
        .append("server-x", ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    db.store
        .append("server-x", ExpectedVersion::Any, vec![garbage])
        .await
        .unwrap();
    let stored = db
        .store
        .read_stream("server-x", Some(1), Direction::Forwards, 1)
        .await
        .unwrap();
    match stored[0].decode::<ServerEvent>() {
        Err(StoreError::Decode {
            position,
            event_type,
            reason,
        }) => {
            assert_eq!(position, 1);
            assert_eq!(event_type, "server.created");
            assert!(!reason.is_empty());
        }
        other => panic!("expected a decode error, got {other:?}"),
    }
    let unknown = db
        .store
        .read_stream("server-x", Some(0), Direction::Forwards, 1)
        .await
        .unwrap();
    let error = unknown[0].decode::<ServerEvent>().unwrap_err().to_string();
    assert!(
        error.contains("position 0") && error.contains("test.happened"),
        "{error}"
    );
}

crate::on_both_backends!(
    append_and_read,
    expected_version_conflicts,
    concurrent_appends_at_one_version,
    idempotent_retries,
    invalid_appends_change_nothing,
    concurrent_writers_with_a_subscriber,
    catch_up_then_live,
    two_instances_share_one_log,
    undecodable_payload_is_a_typed_error,
    events_cannot_be_changed,
);

async fn events_cannot_be_changed(db: &TestDb) {
    use sqlx::Connection;
    db.store
        .append("s", ExpectedVersion::Any, events(2))
        .await
        .unwrap();
    let statements = [
        "UPDATE es_events SET payload = payload WHERE position = 0",
        "DELETE FROM es_events WHERE position = 1",
    ];
    if db.url().starts_with("postgres") {
        let mut conn = sqlx::PgConnection::connect(db.url()).await.unwrap();
        for sql in statements.into_iter().chain(["TRUNCATE es_events"]) {
            let error = sqlx::query(sql).execute(&mut conn).await.unwrap_err();
            assert!(error.to_string().contains("append-only"), "{sql}: {error}");
        }
    } else {
        let mut conn = sqlx::SqliteConnection::connect(db.url()).await.unwrap();
        for sql in statements {
            let error = sqlx::query(sql).execute(&mut conn).await.unwrap_err();
            assert!(error.to_string().contains("append-only"), "{sql}: {error}");
        }
    }
    assert_eq!(db.store.read_all(0, 10).await.unwrap().len(), 2);
}

#[test]
fn canonical_bytes_are_a_fixed_cbor_array() {
    let event = crate::RecordedEvent {
        position: 1,
        stream: "s".into(),
        version: 0,
        event_id: Uuid::from_u128(0x0102),
        event_type: "t.x".into(),
        schema_version: 1,
        payload: vec![0xa0],
        metadata: Metadata::default(),
        metadata_cbor: vec![0xa0],
        recorded_at: 1000,
    };
    let bytes = event.canonical_bytes().unwrap();
    let mut expected = vec![0x89, 0x01, 0x61, b's', 0x00, 0x50];
    expected.extend_from_slice(Uuid::from_u128(0x0102).as_bytes());
    expected.extend_from_slice(&[
        0x63, b't', b'.', b'x', 0x01, 0x41, 0xa0, 0x41, 0xa0, 0x19, 0x03, 0xe8,
    ]);
    assert_eq!(hex::encode(&bytes), hex::encode(&expected));
}

#[test]
fn canonical_bytes_decode_back_and_nothing_else_does() {
    let event = crate::RecordedEvent {
        position: 70_000,
        stream: "session-ab-cd".into(),
        version: 3,
        event_id: Uuid::from_u128(0x0102_0304),
        event_type: "session.opened".into(),
        schema_version: 2,
        payload: vec![0xa1, 0x61, b'k', 0x01],
        metadata: Metadata {
            server_id: Some("ab".into()),
            ..Metadata::default()
        },
        metadata_cbor: crate::codec::encode_metadata(&Metadata {
            server_id: Some("ab".into()),
            ..Metadata::default()
        })
        .unwrap(),
        recorded_at: 1_790_000_000_000,
    };
    let bytes = event.canonical_bytes().unwrap();
    let back = crate::RecordedEvent::from_canonical_bytes(&bytes).unwrap();
    assert_eq!(back.canonical_bytes().unwrap(), bytes);
    assert_eq!(back.metadata.server_id.as_deref(), Some("ab"));
    assert_eq!(
        (back.position, back.version, back.event_id),
        (70_000, 3, event.event_id)
    );
    // Truncated, padded, a wrong id length, and a non-shortest integer are all refused.
    assert!(crate::RecordedEvent::from_canonical_bytes(&bytes[..bytes.len() - 1]).is_err());
    let mut padded = bytes.clone();
    padded.push(0);
    assert!(crate::RecordedEvent::from_canonical_bytes(&padded).is_err());
    let mut short_id = bytes.clone();
    let at = short_id.iter().position(|b| *b == 0x50).unwrap();
    short_id[at] = 0x4f;
    short_id.remove(at + 1);
    assert!(crate::RecordedEvent::from_canonical_bytes(&short_id).is_err());
    // The position (70,000: 0x1a + 4 bytes) written as an 8-byte integer.
    assert_eq!(bytes[1..6], [0x1a, 0x00, 0x01, 0x11, 0x70]);
    let long_form = [
        vec![0x89, 0x1b, 0, 0, 0, 0, 0x00, 0x01, 0x11, 0x70],
        bytes[6..].to_vec(),
    ]
    .concat();
    assert!(crate::RecordedEvent::from_canonical_bytes(&long_form).is_err());
    assert!(crate::RecordedEvent::from_canonical_bytes(b"not cbor").is_err());
}
