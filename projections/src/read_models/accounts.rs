//! The accounts read model (`rm_accounts`): one row per live account, found by id or by
//! user. Headless accounts have no user or second factor until `user_linked` / `upgraded`;
//! a rotated signing key replaces the thumbprint; `account.device_data_changed` replaces the
//! device data (stored as its JSON); `account.deleted` deletes the row.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use countersign_domain::account::{AccountEvent, DeviceData, KeyRole};
use countersign_domain::second_factor::SecondFactorKind;
use countersign_domain::{AccountId, AppInstanceId, ServerId, Timestamp, UserDigest};
use countersign_eventstore::with_pool;

use super::fold::{At, db_position};
use super::rows::Get;
use super::{ProjectionError, ReadModels};

/// An account as the API reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRow {
    pub server_id: ServerId,
    pub account_id: AccountId,
    /// `None` until a headless account learns its user.
    pub user_digest: Option<UserDigest>,
    pub app_instance: AppInstanceId,
    /// `pin` or `biometric`; `None` for a headless account.
    pub second_factor: Option<String>,
    /// SHA-256 of the current signing key.
    pub signing_key_thumbprint: [u8; 32],
    pub registered_at: Timestamp,
    /// What the app last said about its device, and when; `None` until it says.
    pub device_data: Option<(DeviceData, Timestamp)>,
    pub last_position: u64,
}

/// The stored name of a second factor.
pub(crate) fn factor_name(kind: SecondFactorKind) -> &'static str {
    match kind {
        SecondFactorKind::Pin => "pin",
        SecondFactorKind::Biometric => "biometric",
    }
}

type Key = (ServerId, AccountId);

#[derive(Debug)]
struct Row {
    user_digest: Option<UserDigest>,
    app_instance: AppInstanceId,
    second_factor: Option<&'static str>,
    signing_key_thumbprint: [u8; 32],
    registered_at: Timestamp,
    device_data: Option<(String, i64)>,
    last_position: u64,
}

#[derive(Debug, Default)]
struct Patch {
    user_digest: Option<UserDigest>,
    second_factor: Option<&'static str>,
    signing_key_thumbprint: Option<[u8; 32]>,
    /// The device data's JSON and when it changed.
    device_data: Option<(String, i64)>,
    last_position: u64,
}

#[derive(Debug)]
enum Change {
    Put(Row),
    Patch(Patch),
    Delete,
}

/// The batch's accounts, one change per account.
#[derive(Debug, Default)]
pub(crate) struct Fold {
    changes: HashMap<Key, Change>,
}

impl Fold {
    pub fn apply(&mut self, at: &At<'_>, event: AccountEvent) -> Result<(), ProjectionError> {
        let key = at.ids::<AccountId>("account")?;
        let patch = match event {
            AccountEvent::Registered(e) => {
                self.changes.insert(
                    key,
                    Change::Put(Row {
                        user_digest: e.user,
                        app_instance: e.app_instance,
                        second_factor: e.second_factor.map(factor_name),
                        signing_key_thumbprint: e.signing_key_thumbprint,
                        registered_at: at.recorded_at,
                        device_data: None,
                        last_position: at.position,
                    }),
                );
                return Ok(());
            }
            AccountEvent::Deleted(_) => {
                self.changes.insert(key, Change::Delete);
                return Ok(());
            }
            AccountEvent::UserLinked(e) => Patch {
                user_digest: Some(e.user),
                ..Patch::default()
            },
            AccountEvent::Upgraded(e) => Patch {
                second_factor: Some(factor_name(e.second_factor)),
                ..Patch::default()
            },
            AccountEvent::KeyRotated(e) => Patch {
                signing_key_thumbprint: (e.role == KeyRole::Signing).then_some(e.key_thumbprint),
                ..Patch::default()
            },
            AccountEvent::DeviceDataChanged(e) => Patch {
                device_data: Some((device_data_json(&e.device_data)?, e.changed_at.as_millis())),
                ..Patch::default()
            },
            // The read model shows which factor an account has, not when it last used it.
            AccountEvent::SecondFactorVerified(_) | AccountEvent::PushRegistered(_) => {
                Patch::default()
            }
        };
        let patch = Patch {
            last_position: at.position,
            ..patch
        };
        match self.changes.entry(key) {
            Entry::Occupied(mut o) => match o.get_mut() {
                Change::Put(row) => {
                    row.user_digest = patch.user_digest.or(row.user_digest);
                    row.second_factor = patch.second_factor.or(row.second_factor);
                    row.signing_key_thumbprint = patch
                        .signing_key_thumbprint
                        .unwrap_or(row.signing_key_thumbprint);
                    row.device_data = patch.device_data.or(row.device_data.take());
                    row.last_position = patch.last_position;
                }
                Change::Patch(old) => {
                    old.user_digest = patch.user_digest.or(old.user_digest);
                    old.second_factor = patch.second_factor.or(old.second_factor);
                    old.signing_key_thumbprint =
                        patch.signing_key_thumbprint.or(old.signing_key_thumbprint);
                    old.device_data = patch.device_data.or(old.device_data.take());
                    old.last_position = patch.last_position;
                }
                // An update of a deleted row changes nothing, as it would in the database.
                Change::Delete => {}
            },
            Entry::Vacant(v) => {
                v.insert(Change::Patch(patch));
            }
        }
        Ok(())
    }

    pub async fn write_postgres(self, tx: &mut sqlx::PgConnection) -> Result<(), ProjectionError> {
        let mut deleted = Columns::default();
        let mut put = Columns::default();
        let mut patched = Columns::default();
        for (key, change) in &self.changes {
            match change {
                Change::Delete => deleted.key(key),
                Change::Put(row) => {
                    put.key(key);
                    put.user_digest
                        .push(row.user_digest.map(|d| d.as_bytes().to_vec()));
                    put.app_instance.push(row.app_instance.as_bytes().to_vec());
                    put.second_factor.push(row.second_factor);
                    put.thumbprint
                        .push(Some(row.signing_key_thumbprint.to_vec()));
                    put.registered_at.push(row.registered_at.as_millis());
                    put.push_device_data(row.device_data.as_ref());
                    put.last_position.push(db_position(row.last_position)?);
                }
                Change::Patch(p) => {
                    patched.key(key);
                    patched
                        .user_digest
                        .push(p.user_digest.map(|d| d.as_bytes().to_vec()));
                    patched.second_factor.push(p.second_factor);
                    patched
                        .thumbprint
                        .push(p.signing_key_thumbprint.map(|t| t.to_vec()));
                    patched.push_device_data(p.device_data.as_ref());
                    patched.last_position.push(db_position(p.last_position)?);
                }
            }
        }
        if !deleted.server_id.is_empty() {
            sqlx::query(
                "DELETE FROM rm_accounts t USING UNNEST($1::bytea[], $2::bytea[]) AS u(server_id, account_id) \
                 WHERE t.server_id = u.server_id AND t.account_id = u.account_id",
            )
            .bind(&deleted.server_id)
            .bind(&deleted.account_id)
            .execute(&mut *tx)
            .await?;
        }
        if !put.server_id.is_empty() {
            sqlx::query(
                "INSERT INTO rm_accounts (server_id, account_id, user_digest, app_instance, second_factor, \
                   signing_key_thumbprint, registered_at, last_position, device_data, device_data_at) \
                 SELECT * FROM UNNEST($1::bytea[], $2::bytea[], $3::bytea[], $4::bytea[], $5::text[], \
                   $6::bytea[], $7::bigint[], $8::bigint[], $9::text[], $10::bigint[]) \
                 ON CONFLICT (server_id, account_id) DO UPDATE SET user_digest = EXCLUDED.user_digest, \
                   app_instance = EXCLUDED.app_instance, second_factor = EXCLUDED.second_factor, \
                   signing_key_thumbprint = EXCLUDED.signing_key_thumbprint, \
                   registered_at = EXCLUDED.registered_at, last_position = EXCLUDED.last_position, \
                   device_data = EXCLUDED.device_data, device_data_at = EXCLUDED.device_data_at",
            )
            .bind(&put.server_id)
            .bind(&put.account_id)
            .bind(&put.user_digest)
            .bind(&put.app_instance)
            .bind(&put.second_factor)
            .bind(&put.thumbprint)
            .bind(&put.registered_at)
            .bind(&put.last_position)
            .bind(&put.device_data)
            .bind(&put.device_data_at)
            .execute(&mut *tx)
            .await?;
        }
        if !patched.server_id.is_empty() {
            sqlx::query(
                "UPDATE rm_accounts t SET user_digest = COALESCE(u.user_digest, t.user_digest), \
                   second_factor = COALESCE(u.second_factor, t.second_factor), \
                   signing_key_thumbprint = COALESCE(u.thumbprint, t.signing_key_thumbprint), \
                   device_data = COALESCE(u.device_data, t.device_data), \
                   device_data_at = COALESCE(u.device_data_at, t.device_data_at), \
                   last_position = u.last_position \
                 FROM UNNEST($1::bytea[], $2::bytea[], $3::bytea[], $4::text[], $5::bytea[], $6::bigint[], \
                   $7::text[], $8::bigint[]) \
                   AS u(server_id, account_id, user_digest, second_factor, thumbprint, last_position, \
                   device_data, device_data_at) \
                 WHERE t.server_id = u.server_id AND t.account_id = u.account_id",
            )
            .bind(&patched.server_id)
            .bind(&patched.account_id)
            .bind(&patched.user_digest)
            .bind(&patched.second_factor)
            .bind(&patched.thumbprint)
            .bind(&patched.last_position)
            .bind(&patched.device_data)
            .bind(&patched.device_data_at)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    pub async fn write_sqlite(
        self,
        tx: &mut sqlx::SqliteConnection,
    ) -> Result<(), ProjectionError> {
        for ((server, account), change) in &self.changes {
            let (server, account) = (server.as_bytes().as_slice(), account.as_bytes().as_slice());
            let query = match change {
                Change::Delete => {
                    sqlx::query("DELETE FROM rm_accounts WHERE server_id = $1 AND account_id = $2")
                        .bind(server)
                        .bind(account)
                }
                Change::Put(row) => sqlx::query(
                    "INSERT INTO rm_accounts (server_id, account_id, user_digest, app_instance, second_factor, \
                       signing_key_thumbprint, registered_at, last_position, device_data, device_data_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                     ON CONFLICT (server_id, account_id) DO UPDATE SET user_digest = EXCLUDED.user_digest, \
                       app_instance = EXCLUDED.app_instance, second_factor = EXCLUDED.second_factor, \
                       signing_key_thumbprint = EXCLUDED.signing_key_thumbprint, \
                       registered_at = EXCLUDED.registered_at, last_position = EXCLUDED.last_position, \
                       device_data = EXCLUDED.device_data, device_data_at = EXCLUDED.device_data_at",
                )
                .bind(server)
                .bind(account)
                .bind(row.user_digest.as_ref().map(|d| d.as_bytes().as_slice()))
                .bind(row.app_instance.as_bytes().as_slice())
                .bind(row.second_factor)
                .bind(row.signing_key_thumbprint.as_slice())
                .bind(row.registered_at.as_millis())
                .bind(db_position(row.last_position)?)
                .bind(row.device_data.as_ref().map(|(json, _)| json.as_str()))
                .bind(row.device_data.as_ref().map(|(_, at)| *at)),
                Change::Patch(p) => sqlx::query(
                    "UPDATE rm_accounts SET user_digest = COALESCE($3, user_digest), \
                       second_factor = COALESCE($4, second_factor), \
                       signing_key_thumbprint = COALESCE($5, signing_key_thumbprint), last_position = $6, \
                       device_data = COALESCE($7, device_data), device_data_at = COALESCE($8, device_data_at) \
                     WHERE server_id = $1 AND account_id = $2",
                )
                .bind(server)
                .bind(account)
                .bind(p.user_digest.as_ref().map(|d| d.as_bytes().as_slice()))
                .bind(p.second_factor)
                .bind(p.signing_key_thumbprint.as_ref().map(|t| t.as_slice()))
                .bind(db_position(p.last_position)?)
                .bind(p.device_data.as_ref().map(|(json, _)| json.as_str()))
                .bind(p.device_data.as_ref().map(|(_, at)| *at)),
            };
            query.execute(&mut *tx).await?;
        }
        Ok(())
    }
}

/// Column arrays for PostgreSQL's `UNNEST`.
#[derive(Default)]
struct Columns {
    server_id: Vec<Vec<u8>>,
    account_id: Vec<Vec<u8>>,
    user_digest: Vec<Option<Vec<u8>>>,
    app_instance: Vec<Vec<u8>>,
    second_factor: Vec<Option<&'static str>>,
    thumbprint: Vec<Option<Vec<u8>>>,
    registered_at: Vec<i64>,
    last_position: Vec<i64>,
    device_data: Vec<Option<String>>,
    device_data_at: Vec<Option<i64>>,
}

impl Columns {
    fn push_device_data(&mut self, data: Option<&(String, i64)>) {
        self.device_data.push(data.map(|(json, _)| json.clone()));
        self.device_data_at.push(data.map(|(_, at)| *at));
    }

    fn key(&mut self, (server, account): &Key) {
        self.server_id.push(server.as_bytes().to_vec());
        self.account_id.push(account.as_bytes().to_vec());
    }
}

fn account_row(row: &impl Get) -> Result<AccountRow, ProjectionError> {
    Ok(AccountRow {
        server_id: row.id(0)?,
        account_id: row.id(1)?,
        user_digest: row.opt_id(2)?,
        app_instance: row.id(3)?,
        second_factor: row.opt_text(4)?,
        signing_key_thumbprint: row.id(5)?,
        registered_at: row.time(6)?,
        last_position: row.position(7)?,
        device_data: match (row.opt_text(8)?, row.opt_time(9)?) {
            (Some(json), Some(at)) => Some((
                serde_json::from_str(&json).map_err(|e| {
                    ProjectionError::Damaged(format!("stored device data do not decode: {e}"))
                })?,
                at,
            )),
            _ => None,
        },
    })
}

fn device_data_json(data: &DeviceData) -> Result<String, ProjectionError> {
    serde_json::to_string(data)
        .map_err(|e| ProjectionError::Damaged(format!("device data do not encode: {e}")))
}

macro_rules! select_accounts {
    ($where:literal) => {
        concat!(
            "SELECT server_id, account_id, user_digest, app_instance, second_factor, ",
            "signing_key_thumbprint, registered_at, last_position, device_data, device_data_at ",
            "FROM rm_accounts ",
            $where
        )
    };
}

impl ReadModels {
    /// Whether any server of the deployment has an account of `app` (the SFS registers a
    /// first PIN only for an enrolled app instance). Through `rm_accounts_by_app_instance`.
    pub async fn app_instance_enrolled(&self, app: AppInstanceId) -> Result<bool, ProjectionError> {
        Ok(with_pool!(self.reads(), pool => {
            sqlx::query_scalar::<_, Vec<u8>>(
                "SELECT app_instance FROM rm_accounts WHERE app_instance = $1 LIMIT 1",
            )
            .bind(app.as_bytes().as_slice())
            .fetch_optional(pool)
            .await?
            .is_some()
        }))
    }

    /// The accounts of a user of `server`, oldest first.
    pub async fn accounts(
        &self,
        server: ServerId,
        user: UserDigest,
    ) -> Result<Vec<AccountRow>, ProjectionError> {
        let mut rows = with_pool!(self.reads(), pool => {
            // Through the user index, in a form SQLite without statistics does not trade for a
            // scan of the tenant's primary-key range.
            sqlx::query(select_accounts!(
                "WHERE (server_id, account_id) IN (SELECT server_id, account_id FROM rm_accounts \
                 WHERE server_id = $1 AND user_digest = $2)"
            ))
                .bind(server.as_bytes().as_slice())
                .bind(user.as_bytes().as_slice())
                .fetch_all(pool)
                .await?
                .iter()
                .map(account_row)
                .collect::<Result<Vec<_>, _>>()?
        });
        rows.sort_by_key(|a| (a.registered_at, a.account_id));
        Ok(rows)
    }

    /// An account of `server`.
    pub async fn account(
        &self,
        server: ServerId,
        account: AccountId,
    ) -> Result<Option<AccountRow>, ProjectionError> {
        with_pool!(self.reads(), pool => {
            sqlx::query(select_accounts!("WHERE server_id = $1 AND account_id = $2"))
                .bind(server.as_bytes().as_slice())
                .bind(account.as_bytes().as_slice())
                .fetch_optional(pool)
                .await?
                .map(|row| account_row(&row))
                .transpose()
        })
    }
}
