//! What the flows' unit tests share: a gateway on a fresh SQLite log with one server, device
//! keys, and connections built as the socket code builds them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use countersign_commands::{Commands, SystemClock};
use countersign_domain::server::{ConfigureServer, ServerSettings};
use countersign_domain::{DataKey, ServerId};
use countersign_eventstore::vault::KeyVault;
use countersign_eventstore::{Metadata, SharedStore, StoreOptions, open};
use countersign_projections::read_models::ReadModels;

use super::{Connection, Identity};
use crate::hub::ConnectionId;
use crate::{Gateway, GatewayConfig};

/// The SEC1 public key of the P-256 secret `[byte; 32]`.
pub(super) fn key(byte: u8) -> Vec<u8> {
    p256::SecretKey::from_slice(&[byte; 32])
        .unwrap()
        .public_key()
        .to_sec1_bytes()
        .to_vec()
}

/// A gateway and its commands on a fresh SQLite log, and one server, "Bank".
pub(super) struct Base {
    /// Holds the log's file: keep it as long as the gateway.
    pub(super) _dir: tempfile::TempDir,
    /// The log as opened (beneath any wrapper the gateway writes through).
    pub(super) store: SharedStore,
    pub(super) commands: Commands,
    pub(super) gateway: Gateway,
    pub(super) server: ServerId,
}

impl Base {
    /// The gateway runs with `config`; it and the commands write through `wrap(the log)`
    /// (`|log| log` for the log itself); the server is configured with `configure`.
    pub(super) async fn new(
        config: GatewayConfig,
        configure: ConfigureServer,
        wrap: impl FnOnce(SharedStore) -> SharedStore,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("log.db").display());
        let opened = open(&StoreOptions { url, pool_size: 2 }).await.unwrap();
        let store: SharedStore = opened.events.clone();
        let through = wrap(store.clone());
        let vault = KeyVault::new(opened.vault.clone(), DataKey::from_bytes([9; 32]));
        let clock = Arc::new(SystemClock);
        let commands = Commands::new(through.clone(), vault.clone(), clock.clone());
        let gateway = Gateway::new(
            commands.clone(),
            ReadModels::new(opened.database.clone()),
            through,
            vault,
            clock,
            config,
        );
        let metadata = Metadata::default();
        let (server, _) = commands
            .servers
            .create("Bank", &metadata, None)
            .await
            .unwrap();
        commands
            .servers
            .configure(server, configure, &metadata, None)
            .await
            .unwrap();
        Self {
            _dir: dir,
            store,
            commands,
            gateway,
            server,
        }
    }
}

/// The server's settings as its stream says now.
pub(super) async fn settings_now(gateway: &Gateway, server: ServerId) -> ServerSettings {
    gateway
        .active_server_now(server)
        .await
        .unwrap()
        .unwrap()
        .settings
}

/// A fresh connection to `server` with `identity`, registered with the hub as `id`.
pub(super) fn connection(
    gateway: &Gateway,
    server: ServerId,
    settings: ServerSettings,
    identity: Identity,
    id: ConnectionId,
) -> Connection {
    Connection {
        gateway: gateway.clone(),
        server,
        settings,
        identity,
        id,
        scanned: Default::default(),
        close_after_reply: false,
    }
}
