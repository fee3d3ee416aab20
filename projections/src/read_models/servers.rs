//! The servers read model: tenants (`rm_servers`, deleted ones kept with `deleted_at`) and
//! their API keys (`rm_api_keys`, found by the SHA-256 of the secret, which is all the log
//! holds of it). Settings are stored as the JSON of the full [`ServerSettings`] each
//! `server.created` / `server.configured` carries. Servers are few, so their changes are
//! written row by row with the same SQL on both backends.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use countersign_domain::server::{ServerEvent, ServerSettings};
use countersign_domain::{ApiKeyId, ServerId, Timestamp};
use countersign_eventstore::with_pool;

use super::fold::{At, db_position};
use super::rows::Get;
use super::{ProjectionError, ReadModels};

/// A server as the API reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerRow {
    pub server_id: ServerId,
    pub name: String,
    pub logo_url: Option<String>,
    pub settings: ServerSettings,
    /// SEC1 uncompressed P-256 public key.
    pub public_key: Vec<u8>,
    pub key_thumbprint: [u8; 32],
    pub created_at: Timestamp,
    pub deleted_at: Option<Timestamp>,
    pub last_position: u64,
}

/// An API key as the API reads it (the secret itself is never known here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRow {
    pub secret_hash: [u8; 32],
    pub server_id: ServerId,
    pub key_id: ApiKeyId,
    pub label: String,
    pub issued_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
}

#[derive(Debug)]
struct Row {
    settings: ServerSettings,
    public_key: Vec<u8>,
    key_thumbprint: [u8; 32],
    created_at: Timestamp,
    deleted_at: Option<Timestamp>,
    last_position: u64,
}

#[derive(Debug)]
enum Change {
    Put(Row),
    Patch {
        settings: Option<ServerSettings>,
        deleted_at: Option<Timestamp>,
        last_position: u64,
    },
}

/// API key changes stay in log order: keys are stored by secret hash but revoked by id, so
/// merging them by either could reorder two writes of one row.
#[derive(Debug)]
enum KeyChange {
    Put(ApiKeyRow),
    Revoke {
        server: ServerId,
        key_id: ApiKeyId,
        revoked_at: Timestamp,
    },
}

/// The batch's servers and API keys.
#[derive(Debug, Default)]
pub(crate) struct Fold {
    servers: HashMap<ServerId, Change>,
    keys: Vec<KeyChange>,
}

impl Fold {
    pub fn apply(&mut self, at: &At<'_>, event: ServerEvent) -> Result<(), ProjectionError> {
        let server = at.server()?;
        let (mut settings, mut deleted_at) = (None, None);
        match event {
            ServerEvent::Created(e) => {
                self.servers.insert(
                    server,
                    Change::Put(Row {
                        settings: e.settings,
                        public_key: e.public_key,
                        key_thumbprint: e.key_thumbprint,
                        created_at: at.recorded_at,
                        deleted_at: None,
                        last_position: at.position,
                    }),
                );
                return Ok(());
            }
            ServerEvent::Configured(e) => settings = Some(e.settings),
            // Which SFS keys a server trusts is the gateway's concern, read from the stream.
            ServerEvent::SfsKeyTrusted(_) | ServerEvent::SfsKeyDistrusted(_) => {}
            // The OIDC read model's (`oidc.rs`); the batch routes them there.
            ServerEvent::OidcClientRegistered(_)
            | ServerEvent::OidcClientUpdated(_)
            | ServerEvent::OidcClientSecretRotated(_)
            | ServerEvent::OidcClientRemoved(_)
            | ServerEvent::OidcKeyRotated(_) => return Ok(()),
            ServerEvent::Deleted(e) => deleted_at = Some(e.deleted_at),
            ServerEvent::ApiKeyIssued(e) => self.keys.push(KeyChange::Put(ApiKeyRow {
                secret_hash: e.secret_hash,
                server_id: server,
                key_id: e.key_id,
                label: e.label,
                issued_at: e.issued_at,
                revoked_at: None,
            })),
            ServerEvent::ApiKeyRevoked(e) => self.keys.push(KeyChange::Revoke {
                server,
                key_id: e.key_id,
                revoked_at: e.revoked_at,
            }),
        }
        match self.servers.entry(server) {
            Entry::Occupied(mut o) => match o.get_mut() {
                Change::Put(row) => {
                    row.settings = settings.unwrap_or_else(|| row.settings.clone());
                    row.deleted_at = deleted_at.or(row.deleted_at);
                    row.last_position = at.position;
                }
                Change::Patch {
                    settings: s,
                    deleted_at: d,
                    last_position,
                } => {
                    *s = settings.or(s.take());
                    *d = deleted_at.or(*d);
                    *last_position = at.position;
                }
            },
            Entry::Vacant(v) => {
                v.insert(Change::Patch {
                    settings,
                    deleted_at,
                    last_position: at.position,
                });
            }
        }
        Ok(())
    }
}

fn settings_json(settings: &ServerSettings) -> Result<String, ProjectionError> {
    serde_json::to_string(settings)
        .map_err(|e| ProjectionError::Damaged(format!("server settings do not encode: {e}")))
}

/// The same statements on both backends (one connection type each).
macro_rules! write_rows {
    ($fold:expr, $tx:expr) => {{
        let fold = $fold;
        let tx = $tx;
        for (server, change) in &fold.servers {
            let server = server.as_bytes().as_slice();
            match change {
                Change::Put(row) => {
                    sqlx::query(
                        "INSERT INTO rm_servers (server_id, name, logo_url, settings, public_key, key_thumbprint, \
                           created_at, deleted_at, last_position) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                         ON CONFLICT (server_id) DO UPDATE SET name = EXCLUDED.name, logo_url = EXCLUDED.logo_url, \
                           settings = EXCLUDED.settings, public_key = EXCLUDED.public_key, \
                           key_thumbprint = EXCLUDED.key_thumbprint, created_at = EXCLUDED.created_at, \
                           deleted_at = EXCLUDED.deleted_at, last_position = EXCLUDED.last_position",
                    )
                    .bind(server)
                    .bind(row.settings.name.as_str())
                    .bind(row.settings.logo_url.as_deref())
                    .bind(settings_json(&row.settings)?)
                    .bind(row.public_key.as_slice())
                    .bind(row.key_thumbprint.as_slice())
                    .bind(row.created_at.as_millis())
                    .bind(row.deleted_at.map(Timestamp::as_millis))
                    .bind(db_position(row.last_position)?)
                    .execute(&mut *tx)
                    .await?;
                }
                Change::Patch {
                    settings,
                    deleted_at,
                    last_position,
                } => {
                    if let Some(settings) = settings {
                        sqlx::query(
                            "UPDATE rm_servers SET name = $2, logo_url = $3, settings = $4 WHERE server_id = $1",
                        )
                        .bind(server)
                        .bind(settings.name.as_str())
                        .bind(settings.logo_url.as_deref())
                        .bind(settings_json(settings)?)
                        .execute(&mut *tx)
                        .await?;
                    }
                    sqlx::query(
                        "UPDATE rm_servers SET deleted_at = COALESCE($2, deleted_at), last_position = $3 \
                         WHERE server_id = $1",
                    )
                    .bind(server)
                    .bind(deleted_at.map(Timestamp::as_millis))
                    .bind(db_position(*last_position)?)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        for change in &fold.keys {
            match change {
                KeyChange::Put(row) => {
                    sqlx::query(
                        "INSERT INTO rm_api_keys (secret_hash, server_id, key_id, label, issued_at, revoked_at) \
                         VALUES ($1, $2, $3, $4, $5, $6) \
                         ON CONFLICT (secret_hash) DO UPDATE SET server_id = EXCLUDED.server_id, \
                           key_id = EXCLUDED.key_id, label = EXCLUDED.label, issued_at = EXCLUDED.issued_at, \
                           revoked_at = EXCLUDED.revoked_at",
                    )
                    .bind(row.secret_hash.as_slice())
                    .bind(row.server_id.as_bytes().as_slice())
                    .bind(row.key_id.as_bytes().as_slice())
                    .bind(row.label.as_str())
                    .bind(row.issued_at.as_millis())
                    .bind(row.revoked_at.map(Timestamp::as_millis))
                    .execute(&mut *tx)
                    .await?;
                }
                KeyChange::Revoke {
                    server,
                    key_id,
                    revoked_at,
                } => {
                    sqlx::query(
                        "UPDATE rm_api_keys SET revoked_at = $3 WHERE server_id = $1 AND key_id = $2",
                    )
                    .bind(server.as_bytes().as_slice())
                    .bind(key_id.as_bytes().as_slice())
                    .bind(revoked_at.as_millis())
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

fn server_row(row: &impl Get) -> Result<ServerRow, ProjectionError> {
    let settings = serde_json::from_str(&row.text(3)?)
        .map_err(|e| ProjectionError::Damaged(format!("stored server settings: {e}")))?;
    Ok(ServerRow {
        server_id: row.id(0)?,
        name: row.text(1)?,
        logo_url: row.opt_text(2)?,
        settings,
        public_key: row.bytes(4)?,
        key_thumbprint: row.id(5)?,
        created_at: row.time(6)?,
        deleted_at: row.opt_time(7)?,
        last_position: row.position(8)?,
    })
}

fn api_key_row(row: &impl Get) -> Result<ApiKeyRow, ProjectionError> {
    Ok(ApiKeyRow {
        secret_hash: row.id(0)?,
        server_id: row.id(1)?,
        key_id: row.id(2)?,
        label: row.text(3)?,
        issued_at: row.time(4)?,
        revoked_at: row.opt_time(5)?,
    })
}

macro_rules! select_servers {
    ($rest:literal) => {
        concat!(
            "SELECT server_id, name, logo_url, settings, public_key, key_thumbprint, created_at, ",
            "deleted_at, last_position FROM rm_servers ",
            $rest
        )
    };
}

macro_rules! select_api_keys {
    ($rest:literal) => {
        concat!(
            "SELECT secret_hash, server_id, key_id, label, issued_at, revoked_at FROM rm_api_keys ",
            $rest
        )
    };
}

impl ReadModels {
    /// A server, deleted or not (`deleted_at` says).
    pub async fn server(&self, id: ServerId) -> Result<Option<ServerRow>, ProjectionError> {
        with_pool!(self.reads(), pool => {
            sqlx::query(select_servers!("WHERE server_id = $1"))
                .bind(id.as_bytes().as_slice())
                .fetch_optional(pool)
                .await?
                .map(|r| server_row(&r))
                .transpose()
        })
    }

    /// Servers in id order after `after` (from the first when `None`), at most `limit`,
    /// deleted ones included: the operator's listing, across tenants by design.
    pub async fn servers(
        &self,
        after: Option<ServerId>,
        limit: u32,
    ) -> Result<Vec<ServerRow>, ProjectionError> {
        // The empty byte string sorts before every id on both backends.
        let after = after.map(|a| a.as_bytes().to_vec()).unwrap_or_default();
        with_pool!(self.reads(), pool => {
            sqlx::query(select_servers!("WHERE server_id > $1 ORDER BY server_id LIMIT $2"))
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?
                .iter()
                .map(server_row)
                .collect()
        })
    }

    /// The API key whose secret hashes to `secret_hash`, revoked or not (`revoked_at` says).
    pub async fn api_key_by_hash(
        &self,
        secret_hash: &[u8; 32],
    ) -> Result<Option<ApiKeyRow>, ProjectionError> {
        with_pool!(self.reads(), pool => {
            sqlx::query(select_api_keys!("WHERE secret_hash = $1"))
                .bind(secret_hash.as_slice())
                .fetch_optional(pool)
                .await?
                .map(|r| api_key_row(&r))
                .transpose()
        })
    }

    /// A server's API keys, oldest first, revoked ones included.
    pub async fn api_keys(&self, server: ServerId) -> Result<Vec<ApiKeyRow>, ProjectionError> {
        let mut keys = with_pool!(self.reads(), pool => {
            sqlx::query(select_api_keys!("WHERE server_id = $1"))
                .bind(server.as_bytes().as_slice())
                .fetch_all(pool)
                .await?
                .iter()
                .map(api_key_row)
                .collect::<Result<Vec<_>, _>>()?
        });
        keys.sort_by_key(|k| (k.issued_at, k.key_id));
        Ok(keys)
    }
}
