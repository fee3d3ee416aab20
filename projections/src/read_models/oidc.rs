//! The OIDC read model: each server's OIDC clients (`rm_oidc_clients`) and the public halves
//! of its OIDC signing keys (`rm_oidc_keys`), from the `server.oidc_*` events. Part of the
//! servers projection (they are events of the server stream and share its checkpoint).
//!
//! Rules: a client row holds the full settings the last event carried (as JSON), never a
//! secret, only the SHA-256 a confidential client's secret hashes to; a removed client keeps
//! its row with `removed` set, and the reads for the IdP ([`ReadModels::oidc_client`],
//! [`ReadModels::oidc_clients`]) leave it out. Every read takes the server id: a client of
//! another server is not found. Changes are few, so they are written one by one in log order
//! with the same SQL on both backends.

use countersign_domain::server::{OidcClientSettings, ServerEvent};
use countersign_domain::{OidcClientId, ServerId, Timestamp};
use countersign_eventstore::with_pool;

use super::fold::{At, db_position};
use super::rows::Get;
use super::{ProjectionError, ReadModels};

/// An OIDC client as the API and the IdP read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcClientRow {
    /// The server (issuer) it is registered at.
    pub server_id: ServerId,
    /// The OAuth `client_id`.
    pub client_id: OidcClientId,
    /// Its current settings.
    pub settings: OidcClientSettings,
    /// SHA-256 of the client secret (see `countersign_commands::server::client_secret_hash`);
    /// `None` for a public client.
    pub secret_hash: Option<[u8; 32]>,
    /// When it was registered.
    pub created_at: Timestamp,
    /// When its settings or secret last changed (its registration, if never).
    pub updated_at: Timestamp,
    /// Removed: [`ReadModels::oidc_client`] does not return it.
    pub removed: bool,
    /// Position of the last event that changed it.
    pub last_position: u64,
}

/// A public OIDC signing key of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcKeyRow {
    /// The server.
    pub server_id: ServerId,
    /// RFC 7638 thumbprint, base64url without padding.
    pub kid: String,
    /// SEC1 uncompressed P-256 public key (65 bytes).
    pub public_key: Vec<u8>,
    /// When it became the signing key.
    pub rotated_at: Timestamp,
    /// Its event's log position.
    pub position: u64,
}

/// One change, kept in log order.
#[derive(Debug)]
enum Change {
    Register(OidcClientRow),
    Update {
        server: ServerId,
        client: OidcClientId,
        settings: OidcClientSettings,
        at: Timestamp,
        position: u64,
    },
    Secret {
        server: ServerId,
        client: OidcClientId,
        secret_hash: [u8; 32],
        at: Timestamp,
        position: u64,
    },
    Remove {
        server: ServerId,
        client: OidcClientId,
        at: Timestamp,
        position: u64,
    },
    Key(OidcKeyRow),
}

/// The batch's OIDC changes.
#[derive(Debug, Default)]
pub(crate) struct Fold {
    changes: Vec<Change>,
}

/// Whether the OIDC read model (rather than the servers one) takes `event`.
pub(crate) fn is_oidc(event: &ServerEvent) -> bool {
    matches!(
        event,
        ServerEvent::OidcClientRegistered(_)
            | ServerEvent::OidcClientUpdated(_)
            | ServerEvent::OidcClientSecretRotated(_)
            | ServerEvent::OidcClientRemoved(_)
            | ServerEvent::OidcKeyRotated(_)
    )
}

impl Fold {
    pub fn apply(&mut self, at: &At<'_>, event: ServerEvent) -> Result<(), ProjectionError> {
        let server = at.server()?;
        let (now, position) = (at.recorded_at, at.position);
        let change = match event {
            ServerEvent::OidcClientRegistered(e) => Change::Register(OidcClientRow {
                server_id: server,
                client_id: e.client_id,
                settings: e.settings,
                secret_hash: e.secret_hash,
                created_at: now,
                updated_at: now,
                removed: false,
                last_position: position,
            }),
            ServerEvent::OidcClientUpdated(e) => Change::Update {
                server,
                client: e.client_id,
                settings: e.settings,
                at: now,
                position,
            },
            ServerEvent::OidcClientSecretRotated(e) => Change::Secret {
                server,
                client: e.client_id,
                secret_hash: e.secret_hash,
                at: now,
                position,
            },
            ServerEvent::OidcClientRemoved(e) => Change::Remove {
                server,
                client: e.client_id,
                at: now,
                position,
            },
            ServerEvent::OidcKeyRotated(e) => Change::Key(OidcKeyRow {
                server_id: server,
                kid: e.kid,
                public_key: e.public_key,
                rotated_at: e.rotated_at,
                position,
            }),
            _ => return Ok(()),
        };
        self.changes.push(change);
        Ok(())
    }
}

fn settings_json(settings: &OidcClientSettings) -> Result<String, ProjectionError> {
    serde_json::to_string(settings)
        .map_err(|e| ProjectionError::Damaged(format!("OIDC client settings do not encode: {e}")))
}

/// The same statements on both backends (one connection type each).
macro_rules! write_rows {
    ($fold:expr, $tx:expr) => {{
        let fold = $fold;
        let tx = $tx;
        for change in &fold.changes {
            match change {
                Change::Register(row) => {
                    sqlx::query(
                        "INSERT INTO rm_oidc_clients (server_id, client_id, settings, secret_hash, \
                           created_at, updated_at, removed, last_position) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                         ON CONFLICT (server_id, client_id) DO UPDATE SET settings = EXCLUDED.settings, \
                           secret_hash = EXCLUDED.secret_hash, created_at = EXCLUDED.created_at, \
                           updated_at = EXCLUDED.updated_at, removed = EXCLUDED.removed, \
                           last_position = EXCLUDED.last_position",
                    )
                    .bind(row.server_id.as_bytes().as_slice())
                    .bind(row.client_id.as_bytes().as_slice())
                    .bind(settings_json(&row.settings)?)
                    .bind(row.secret_hash.as_ref().map(|h| h.as_slice()))
                    .bind(row.created_at.as_millis())
                    .bind(row.updated_at.as_millis())
                    .bind(row.removed)
                    .bind(db_position(row.last_position)?)
                    .execute(&mut *tx)
                    .await?;
                }
                Change::Update {
                    server,
                    client,
                    settings,
                    at,
                    position,
                } => {
                    sqlx::query(
                        "UPDATE rm_oidc_clients SET settings = $3, updated_at = $4, last_position = $5 \
                         WHERE server_id = $1 AND client_id = $2",
                    )
                    .bind(server.as_bytes().as_slice())
                    .bind(client.as_bytes().as_slice())
                    .bind(settings_json(settings)?)
                    .bind(at.as_millis())
                    .bind(db_position(*position)?)
                    .execute(&mut *tx)
                    .await?;
                }
                Change::Secret {
                    server,
                    client,
                    secret_hash,
                    at,
                    position,
                } => {
                    sqlx::query(
                        "UPDATE rm_oidc_clients SET secret_hash = $3, updated_at = $4, last_position = $5 \
                         WHERE server_id = $1 AND client_id = $2",
                    )
                    .bind(server.as_bytes().as_slice())
                    .bind(client.as_bytes().as_slice())
                    .bind(secret_hash.as_slice())
                    .bind(at.as_millis())
                    .bind(db_position(*position)?)
                    .execute(&mut *tx)
                    .await?;
                }
                Change::Remove {
                    server,
                    client,
                    at,
                    position,
                } => {
                    sqlx::query(
                        "UPDATE rm_oidc_clients SET removed = $3, updated_at = $4, last_position = $5 \
                         WHERE server_id = $1 AND client_id = $2",
                    )
                    .bind(server.as_bytes().as_slice())
                    .bind(client.as_bytes().as_slice())
                    .bind(true)
                    .bind(at.as_millis())
                    .bind(db_position(*position)?)
                    .execute(&mut *tx)
                    .await?;
                }
                Change::Key(row) => {
                    sqlx::query(
                        "INSERT INTO rm_oidc_keys (server_id, kid, public_key, rotated_at, position) \
                         VALUES ($1, $2, $3, $4, $5) \
                         ON CONFLICT (server_id, kid) DO UPDATE SET public_key = EXCLUDED.public_key, \
                           rotated_at = EXCLUDED.rotated_at, position = EXCLUDED.position",
                    )
                    .bind(row.server_id.as_bytes().as_slice())
                    .bind(row.kid.as_str())
                    .bind(row.public_key.as_slice())
                    .bind(row.rotated_at.as_millis())
                    .bind(db_position(row.position)?)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        Ok(())
    }};
}

impl Fold {
    pub async fn write_postgres(self, tx: &mut sqlx::PgConnection) -> Result<(), ProjectionError> {
        write_rows!(self, tx)
    }

    pub async fn write_sqlite(
        self,
        tx: &mut sqlx::SqliteConnection,
    ) -> Result<(), ProjectionError> {
        write_rows!(self, tx)
    }
}

fn damaged(what: &str) -> ProjectionError {
    ProjectionError::Damaged(format!("stored OIDC {what}"))
}

fn client_row(row: &impl Get) -> Result<OidcClientRow, ProjectionError> {
    let client_id: [u8; 16] = row.bytes(1)?.try_into().map_err(|_| damaged("client id"))?;
    let settings = serde_json::from_str(&row.text(2)?).map_err(|_| damaged("client settings"))?;
    let secret_hash = row
        .opt_bytes(3)?
        .map(|b| <[u8; 32]>::try_from(b).map_err(|_| damaged("client secret hash")))
        .transpose()?;
    Ok(OidcClientRow {
        server_id: row.id(0)?,
        client_id: OidcClientId::from_bytes(client_id),
        settings,
        secret_hash,
        created_at: row.time(4)?,
        updated_at: row.time(5)?,
        removed: row.boolean(6)?,
        last_position: row.position(7)?,
    })
}

fn key_row(row: &impl Get) -> Result<OidcKeyRow, ProjectionError> {
    Ok(OidcKeyRow {
        server_id: row.id(0)?,
        kid: row.text(1)?,
        public_key: row.bytes(2)?,
        rotated_at: row.time(3)?,
        position: row.position(4)?,
    })
}

macro_rules! select_clients {
    ($rest:literal) => {
        concat!(
            "SELECT server_id, client_id, settings, secret_hash, created_at, updated_at, removed, ",
            "last_position FROM rm_oidc_clients ",
            $rest
        )
    };
}

impl ReadModels {
    /// The server's client `client_id`; `None` when it is unknown, removed, or another
    /// server's. The IdP's lookup on every authorize and token request.
    pub async fn oidc_client(
        &self,
        server: ServerId,
        client_id: OidcClientId,
    ) -> Result<Option<OidcClientRow>, ProjectionError> {
        let row = with_pool!(self.reads(), pool => {
            sqlx::query(select_clients!("WHERE server_id = $1 AND client_id = $2"))
                .bind(server.as_bytes().as_slice())
                .bind(client_id.as_bytes().as_slice())
                .fetch_optional(pool)
                .await?
                .map(|r| client_row(&r))
                .transpose()?
        });
        Ok(row.filter(|c| !c.removed))
    }

    /// The server's clients, oldest first, removed ones left out.
    pub async fn oidc_clients(
        &self,
        server: ServerId,
    ) -> Result<Vec<OidcClientRow>, ProjectionError> {
        let mut clients = with_pool!(self.reads(), pool => {
            sqlx::query(select_clients!("WHERE server_id = $1"))
                .bind(server.as_bytes().as_slice())
                .fetch_all(pool)
                .await?
                .iter()
                .map(client_row)
                .collect::<Result<Vec<_>, _>>()?
        });
        clients.retain(|c| !c.removed);
        clients.sort_by_key(|c| (c.created_at, c.client_id));
        Ok(clients)
    }

    /// The server's OIDC signing keys, oldest first: the last one is the current signer.
    pub async fn oidc_keys(&self, server: ServerId) -> Result<Vec<OidcKeyRow>, ProjectionError> {
        let mut keys = with_pool!(self.reads(), pool => {
            sqlx::query(
                "SELECT server_id, kid, public_key, rotated_at, position FROM rm_oidc_keys \
                 WHERE server_id = $1",
            )
            .bind(server.as_bytes().as_slice())
            .fetch_all(pool)
            .await?
            .iter()
            .map(key_row)
            .collect::<Result<Vec<_>, _>>()?
        });
        keys.sort_by_key(|k| k.position);
        Ok(keys)
    }
}
