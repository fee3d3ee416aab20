//! The OIDC read model from real server events in a real store, on PostgreSQL and SQLite:
//! what the reads answer, tenant isolation, and rebuilds in any batch size giving the same rows.

use countersign_domain::server::{
    OidcClientKind, OidcClientRegistered, OidcClientRemoved, OidcClientSecretRotated,
    OidcClientSettings, OidcClientUpdated, OidcKeyRotated, ServerCreated, ServerEvent,
    ServerSettings,
};
use countersign_domain::{AnyEvent, OidcClientId, ServerId, Timestamp, UserDigestScheme};
use countersign_eventstore::testing::TestDb;
use countersign_eventstore::{ExpectedVersion, Metadata, NewEvent, StoreOptions, open};

use super::*;

async fn models(db: &TestDb, batch: usize) -> ReadModels {
    let opened = open(&StoreOptions {
        url: db.url().to_owned(),
        pool_size: 4,
    })
    .await
    .unwrap();
    ReadModels::new(opened.database).with_batch_size(batch)
}

fn sid(n: u8) -> ServerId {
    ServerId::from_bytes([n; 16])
}

fn cid(n: u8) -> OidcClientId {
    OidcClientId::from_bytes([n; 16])
}

fn settings(name: &str, kind: OidcClientKind) -> OidcClientSettings {
    OidcClientSettings {
        name: name.into(),
        kind,
        redirect_uris: vec![format!("https://{name}.example/cb")],
        post_logout_redirect_uris: vec![],
        scopes: vec!["openid".into()],
        backchannel_logout_uri: None,
        ciba: None,
    }
}

fn registered(n: u8, kind: OidcClientKind) -> ServerEvent {
    ServerEvent::OidcClientRegistered(OidcClientRegistered {
        client_id: cid(n),
        settings: settings(&format!("c{n}"), kind),
        secret_hash: (kind == OidcClientKind::Confidential).then_some([n; 32]),
    })
}

async fn append(db: &TestDb, next_id: &mut u128, server: ServerId, events: Vec<ServerEvent>) {
    let events = events
        .into_iter()
        .map(|e| {
            *next_id += 1;
            NewEvent::from_domain(
                uuid::Uuid::from_u128(*next_id),
                &AnyEvent::from(e),
                Metadata::default(),
            )
            .unwrap()
        })
        .collect();
    db.store
        .append(&server.stream(), ExpectedVersion::Any, events)
        .await
        .unwrap();
}

/// Two servers; server 1 registers, updates, rotates and removes clients (some in one append,
/// so in one batch) and rotates keys; server 2 has a client of its own.
async fn history(db: &TestDb) {
    let mut next = 0;
    for n in [1, 2] {
        append(
            db,
            &mut next,
            sid(n),
            vec![ServerEvent::Created(ServerCreated {
                server_id: sid(n),
                public_key: vec![4; 65],
                key_thumbprint: [n; 32],
                settings: ServerSettings::defaults(format!("S{n}")),
                user_digest: UserDigestScheme::HmacSha256,
            })],
        )
        .await;
    }
    let key = |kid: &str, at: i64| {
        ServerEvent::OidcKeyRotated(OidcKeyRotated {
            kid: kid.into(),
            public_key: vec![4; 65],
            rotated_at: Timestamp::from_millis(at),
        })
    };
    append(
        db,
        &mut next,
        sid(1),
        vec![
            registered(1, OidcClientKind::Confidential),
            registered(2, OidcClientKind::Public),
            key("k1", 1),
        ],
    )
    .await;
    append(
        db,
        &mut next,
        sid(2),
        vec![registered(9, OidcClientKind::Public), key("k9", 2)],
    )
    .await;
    append(
        db,
        &mut next,
        sid(1),
        vec![
            ServerEvent::OidcClientUpdated(OidcClientUpdated {
                client_id: cid(1),
                settings: settings("renamed", OidcClientKind::Confidential),
            }),
            ServerEvent::OidcClientSecretRotated(OidcClientSecretRotated {
                client_id: cid(1),
                secret_hash: [0xee; 32],
            }),
            registered(3, OidcClientKind::Public),
            ServerEvent::OidcClientRemoved(OidcClientRemoved { client_id: cid(3) }),
            key("k2", 3),
        ],
    )
    .await;
    append(
        db,
        &mut next,
        sid(1),
        vec![ServerEvent::OidcClientRemoved(OidcClientRemoved {
            client_id: cid(2),
        })],
    )
    .await;
}

async fn oidc_reads_answer_from_events(db: &TestDb) {
    history(db).await;
    let reads = models(db, DEFAULT_BATCH).await;
    reads.catch_up(&db.store).await.unwrap();

    let one = reads.oidc_client(sid(1), cid(1)).await.unwrap().unwrap();
    assert_eq!(one.settings.name, "renamed");
    assert_eq!(one.secret_hash, Some([0xee; 32]), "the rotated secret");
    assert!(one.updated_at >= one.created_at);
    assert!(!one.removed);
    // Removed: in the same batch as its registration, or later.
    assert_eq!(reads.oidc_client(sid(1), cid(3)).await.unwrap(), None);
    assert_eq!(reads.oidc_client(sid(1), cid(2)).await.unwrap(), None);
    let listed: Vec<_> = reads
        .oidc_clients(sid(1))
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.client_id)
        .collect();
    assert_eq!(listed, [cid(1)]);
    // Tenant isolation: server 2's client is not server 1's, and the other way round.
    assert_eq!(reads.oidc_client(sid(1), cid(9)).await.unwrap(), None);
    assert_eq!(reads.oidc_client(sid(2), cid(1)).await.unwrap(), None);
    let nine = reads.oidc_client(sid(2), cid(9)).await.unwrap().unwrap();
    assert_eq!(nine.secret_hash, None);
    let kids = |keys: Vec<OidcKeyRow>| keys.into_iter().map(|k| k.kid).collect::<Vec<_>>();
    assert_eq!(kids(reads.oidc_keys(sid(1)).await.unwrap()), ["k1", "k2"]);
    assert_eq!(kids(reads.oidc_keys(sid(2)).await.unwrap()), ["k9"]);
    assert_eq!(
        kids(reads.oidc_keys(sid(3)).await.unwrap()),
        Vec::<String>::new()
    );
}

async fn oidc_rebuild_equals_incremental(db: &TestDb) {
    history(db).await;
    let reads = models(db, DEFAULT_BATCH).await;
    reads.catch_up(&db.store).await.unwrap();
    let incremental = reads.dump().await.unwrap();
    assert_eq!(incremental.matches("rm_oidc_clients ").count(), 4);
    assert_eq!(incremental.matches("rm_oidc_keys ").count(), 3);
    for batch in [1, 2, 3] {
        let reads = models(db, batch).await;
        reads.replay(&db.store, None, &mut |_, _| {}).await.unwrap();
        assert_eq!(
            reads.dump().await.unwrap(),
            incremental,
            "replay in batches of {batch}"
        );
    }
    let reads = models(db, 1).await;
    reads
        .replay(&db.store, Some(&["servers".to_owned()]), &mut |_, _| {})
        .await
        .unwrap();
    assert_eq!(reads.dump().await.unwrap(), incremental, "servers alone");
}

countersign_eventstore::on_both_backends!(
    oidc_reads_answer_from_events,
    oidc_rebuild_equals_incremental,
);
