//! The users read model: one row per registered user (`rm_users`) and one per attribute
//! (`rm_user_attributes`), personal data kept sealed: the userid and values are the CBOR of
//! the [`Sealed`] values in the events, which only the user's data key opens.
//! `user.deleted` deletes the user's rows; users are paged by the position of their
//! registration, a cursor that new registrations cannot shift. Attributes come sorted by
//! name in byte order (on both backends, whatever the database's collation).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use countersign_domain::user::UserEvent;
use countersign_domain::{Sealed, ServerId, Timestamp, UserDigest};
use countersign_eventstore::with_pool;

use super::fold::{At, db_position};
use super::rows::{Get, sealed_bytes};
use super::{ProjectionError, ReadModels};

/// A user as the API reads it: sealed userid and attributes (sorted by name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub server_id: ServerId,
    pub user_digest: UserDigest,
    /// Sealed under the user's data key with associated data `aad(stream, "userid")`.
    pub userid_sealed: Sealed,
    /// (name, value sealed with associated data `aad(stream, "attribute/{name}")`).
    pub attributes: Vec<(String, Sealed)>,
    pub registered_at: Timestamp,
    /// Position of `user.registered`: the paging cursor of [`ReadModels::users`].
    pub registered_position: u64,
    pub last_position: u64,
}

type Key = (ServerId, UserDigest);

#[derive(Debug)]
enum Change {
    /// Registered in this batch.
    Put {
        userid_sealed: Vec<u8>,
        registered_at: Timestamp,
        registered_position: u64,
        last_position: u64,
    },
    /// Registered before: only the last position moves.
    Touch { last_position: u64 },
}

/// The batch's users and attributes.
#[derive(Debug, Default)]
pub(crate) struct Fold {
    /// Users deleted in this batch: their rows and attributes go first.
    deleted: HashSet<Key>,
    users: HashMap<Key, Change>,
    /// Per user, per name: the value set last, or `None` for removed.
    attributes: HashMap<Key, HashMap<String, Option<Vec<u8>>>>,
}

impl Fold {
    pub fn apply(&mut self, at: &At<'_>, event: UserEvent) -> Result<(), ProjectionError> {
        let key = at.ids::<UserDigest>("user")?;
        match event {
            UserEvent::Registered(e) => {
                self.users.insert(
                    key,
                    Change::Put {
                        userid_sealed: sealed_bytes(&e.userid)?,
                        registered_at: at.recorded_at,
                        registered_position: at.position,
                        last_position: at.position,
                    },
                );
            }
            UserEvent::AttributeSet(e) => {
                self.touch(key, at.position);
                self.attributes
                    .entry(key)
                    .or_default()
                    .insert(e.name, Some(sealed_bytes(&e.value)?));
            }
            UserEvent::AttributeRemoved(e) => {
                self.touch(key, at.position);
                self.attributes.entry(key).or_default().insert(e.name, None);
            }
            UserEvent::Deleted(_) => {
                self.deleted.insert(key);
                self.users.remove(&key);
                self.attributes.remove(&key);
            }
        }
        Ok(())
    }

    fn touch(&mut self, key: Key, position: u64) {
        match self.users.entry(key) {
            Entry::Occupied(mut o) => match o.get_mut() {
                Change::Put { last_position, .. } | Change::Touch { last_position } => {
                    *last_position = position;
                }
            },
            Entry::Vacant(v) => {
                v.insert(Change::Touch {
                    last_position: position,
                });
            }
        }
    }

    pub async fn write_postgres(self, tx: &mut sqlx::PgConnection) -> Result<(), ProjectionError> {
        if !self.deleted.is_empty() {
            let (servers, digests): (Vec<Vec<u8>>, Vec<Vec<u8>>) = self
                .deleted
                .iter()
                .map(|(s, d)| (s.as_bytes().to_vec(), d.as_bytes().to_vec()))
                .unzip();
            for sql in [
                "DELETE FROM rm_user_attributes t USING UNNEST($1::bytea[], $2::bytea[]) AS u(server_id, user_digest) \
                 WHERE t.server_id = u.server_id AND t.user_digest = u.user_digest",
                "DELETE FROM rm_users t USING UNNEST($1::bytea[], $2::bytea[]) AS u(server_id, user_digest) \
                 WHERE t.server_id = u.server_id AND t.user_digest = u.user_digest",
            ] {
                sqlx::query(sql)
                    .bind(&servers)
                    .bind(&digests)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let mut put = Columns::default();
        let mut touched = Columns::default();
        for (key, change) in &self.users {
            match change {
                Change::Put {
                    userid_sealed,
                    registered_at,
                    registered_position,
                    last_position,
                } => {
                    put.key(key);
                    put.sealed.push(userid_sealed.clone());
                    put.registered_at.push(registered_at.as_millis());
                    put.registered_position
                        .push(db_position(*registered_position)?);
                    put.last_position.push(db_position(*last_position)?);
                }
                Change::Touch { last_position } => {
                    touched.key(key);
                    touched.last_position.push(db_position(*last_position)?);
                }
            }
        }
        if !put.server_id.is_empty() {
            sqlx::query(
                "INSERT INTO rm_users (server_id, user_digest, userid_sealed, registered_at, registered_position, last_position) \
                 SELECT * FROM UNNEST($1::bytea[], $2::bytea[], $3::bytea[], $4::bigint[], $5::bigint[], $6::bigint[]) \
                 ON CONFLICT (server_id, user_digest) DO UPDATE SET userid_sealed = EXCLUDED.userid_sealed, \
                   registered_at = EXCLUDED.registered_at, registered_position = EXCLUDED.registered_position, \
                   last_position = EXCLUDED.last_position",
            )
            .bind(&put.server_id)
            .bind(&put.digest)
            .bind(&put.sealed)
            .bind(&put.registered_at)
            .bind(&put.registered_position)
            .bind(&put.last_position)
            .execute(&mut *tx)
            .await?;
        }
        if !touched.server_id.is_empty() {
            sqlx::query(
                "UPDATE rm_users t SET last_position = u.last_position \
                 FROM UNNEST($1::bytea[], $2::bytea[], $3::bigint[]) AS u(server_id, user_digest, last_position) \
                 WHERE t.server_id = u.server_id AND t.user_digest = u.user_digest",
            )
            .bind(&touched.server_id)
            .bind(&touched.digest)
            .bind(&touched.last_position)
            .execute(&mut *tx)
            .await?;
        }
        let mut set = Columns::default();
        let mut removed = Columns::default();
        for (key, attributes) in self.attributes {
            for (name, value) in attributes {
                match value {
                    Some(value) => {
                        set.key(&key);
                        set.name.push(name);
                        set.sealed.push(value);
                    }
                    None => {
                        removed.key(&key);
                        removed.name.push(name);
                    }
                }
            }
        }
        if !removed.server_id.is_empty() {
            sqlx::query(
                "DELETE FROM rm_user_attributes t \
                 USING UNNEST($1::bytea[], $2::bytea[], $3::text[]) AS u(server_id, user_digest, name) \
                 WHERE t.server_id = u.server_id AND t.user_digest = u.user_digest AND t.name = u.name",
            )
            .bind(&removed.server_id)
            .bind(&removed.digest)
            .bind(&removed.name)
            .execute(&mut *tx)
            .await?;
        }
        if !set.server_id.is_empty() {
            sqlx::query(
                "INSERT INTO rm_user_attributes (server_id, user_digest, name, value_sealed) \
                 SELECT * FROM UNNEST($1::bytea[], $2::bytea[], $3::text[], $4::bytea[]) \
                 ON CONFLICT (server_id, user_digest, name) DO UPDATE SET value_sealed = EXCLUDED.value_sealed",
            )
            .bind(&set.server_id)
            .bind(&set.digest)
            .bind(&set.name)
            .bind(&set.sealed)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    pub async fn write_sqlite(
        self,
        tx: &mut sqlx::SqliteConnection,
    ) -> Result<(), ProjectionError> {
        for (server, digest) in &self.deleted {
            for sql in [
                "DELETE FROM rm_user_attributes WHERE server_id = $1 AND user_digest = $2",
                "DELETE FROM rm_users WHERE server_id = $1 AND user_digest = $2",
            ] {
                sqlx::query(sql)
                    .bind(server.as_bytes().as_slice())
                    .bind(digest.as_bytes().as_slice())
                    .execute(&mut *tx)
                    .await?;
            }
        }
        for ((server, digest), change) in &self.users {
            match change {
                Change::Put {
                    userid_sealed,
                    registered_at,
                    registered_position,
                    last_position,
                } => {
                    sqlx::query(
                        "INSERT INTO rm_users (server_id, user_digest, userid_sealed, registered_at, registered_position, last_position) \
                         VALUES ($1, $2, $3, $4, $5, $6) \
                         ON CONFLICT (server_id, user_digest) DO UPDATE SET userid_sealed = EXCLUDED.userid_sealed, \
                           registered_at = EXCLUDED.registered_at, registered_position = EXCLUDED.registered_position, \
                           last_position = EXCLUDED.last_position",
                    )
                    .bind(server.as_bytes().as_slice())
                    .bind(digest.as_bytes().as_slice())
                    .bind(userid_sealed.as_slice())
                    .bind(registered_at.as_millis())
                    .bind(db_position(*registered_position)?)
                    .bind(db_position(*last_position)?)
                    .execute(&mut *tx)
                    .await?;
                }
                Change::Touch { last_position } => {
                    sqlx::query(
                        "UPDATE rm_users SET last_position = $3 WHERE server_id = $1 AND user_digest = $2",
                    )
                    .bind(server.as_bytes().as_slice())
                    .bind(digest.as_bytes().as_slice())
                    .bind(db_position(*last_position)?)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        for ((server, digest), attributes) in &self.attributes {
            for (name, value) in attributes {
                let query = match value {
                    Some(value) => sqlx::query(
                        "INSERT INTO rm_user_attributes (server_id, user_digest, name, value_sealed) \
                         VALUES ($1, $2, $3, $4) \
                         ON CONFLICT (server_id, user_digest, name) DO UPDATE SET value_sealed = EXCLUDED.value_sealed",
                    )
                    .bind(server.as_bytes().as_slice())
                    .bind(digest.as_bytes().as_slice())
                    .bind(name.as_str())
                    .bind(value.as_slice()),
                    None => sqlx::query(
                        "DELETE FROM rm_user_attributes WHERE server_id = $1 AND user_digest = $2 AND name = $3",
                    )
                    .bind(server.as_bytes().as_slice())
                    .bind(digest.as_bytes().as_slice())
                    .bind(name.as_str()),
                };
                query.execute(&mut *tx).await?;
            }
        }
        Ok(())
    }
}

/// Column arrays for PostgreSQL's `UNNEST`.
#[derive(Default)]
struct Columns {
    server_id: Vec<Vec<u8>>,
    digest: Vec<Vec<u8>>,
    name: Vec<String>,
    sealed: Vec<Vec<u8>>,
    registered_at: Vec<i64>,
    registered_position: Vec<i64>,
    last_position: Vec<i64>,
}

impl Columns {
    fn key(&mut self, (server, digest): &Key) {
        self.server_id.push(server.as_bytes().to_vec());
        self.digest.push(digest.as_bytes().to_vec());
    }
}

fn user_row(row: &impl Get) -> Result<UserRow, ProjectionError> {
    Ok(UserRow {
        server_id: row.id(0)?,
        user_digest: row.id(1)?,
        userid_sealed: row.sealed(2)?,
        attributes: Vec::new(),
        registered_at: row.time(3)?,
        registered_position: row.position(4)?,
        last_position: row.position(5)?,
    })
}

impl ReadModels {
    /// A user of `server`, with its attributes sorted by name.
    pub async fn user(
        &self,
        server: ServerId,
        user: UserDigest,
    ) -> Result<Option<UserRow>, ProjectionError> {
        with_pool!(self.reads(), pool => {
            let mut tx = pool.begin().await?;
            let Some(row) = sqlx::query(
                "SELECT server_id, user_digest, userid_sealed, registered_at, registered_position, last_position \
                 FROM rm_users WHERE server_id = $1 AND user_digest = $2",
            )
            .bind(server.as_bytes().as_slice())
            .bind(user.as_bytes().as_slice())
            .fetch_optional(&mut *tx)
            .await?
            else {
                return Ok(None);
            };
            let mut user_row = user_row(&row)?;
            user_row.attributes = sqlx::query(
                "SELECT name, value_sealed FROM rm_user_attributes \
                 WHERE server_id = $1 AND user_digest = $2",
            )
            .bind(server.as_bytes().as_slice())
            .bind(user.as_bytes().as_slice())
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| Ok((r.text(0)?, r.sealed(1)?)))
            .collect::<Result<_, ProjectionError>>()?;
            tx.commit().await?;
            user_row.attributes.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(Some(user_row))
        })
    }

    /// Users of `server` in registration order, after the one registered at `after_position`
    /// (from the first when `None`), at most `limit`, each with its attributes.
    pub async fn users(
        &self,
        server: ServerId,
        after_position: Option<u64>,
        limit: u32,
    ) -> Result<Vec<UserRow>, ProjectionError> {
        let after = after_position.map(db_position).transpose()?.unwrap_or(-1);
        with_pool!(self.reads(), pool => {
            let mut tx = pool.begin().await?;
            let mut users = sqlx::query(
                "SELECT server_id, user_digest, userid_sealed, registered_at, registered_position, last_position \
                 FROM rm_users WHERE server_id = $1 AND registered_position > $2 \
                 ORDER BY registered_position LIMIT $3",
            )
            .bind(server.as_bytes().as_slice())
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(user_row)
            .collect::<Result<Vec<_>, _>>()?;
            let Some(last) = users.last().map(|u| u.registered_position) else {
                return Ok(users);
            };
            let attributes = sqlx::query(
                "SELECT u.user_digest, a.name, a.value_sealed FROM rm_users u \
                 JOIN rm_user_attributes a ON a.server_id = u.server_id AND a.user_digest = u.user_digest \
                 WHERE u.server_id = $1 AND u.registered_position > $2 AND u.registered_position <= $3",
            )
            .bind(server.as_bytes().as_slice())
            .bind(after)
            .bind(db_position(last)?)
            .fetch_all(&mut *tx)
            .await?;
            tx.commit().await?;
            let mut by_user: HashMap<UserDigest, Vec<(String, Sealed)>> = HashMap::new();
            for r in &attributes {
                by_user.entry(r.id(0)?).or_default().push((r.text(1)?, r.sealed(2)?));
            }
            for user in &mut users {
                user.attributes = by_user.remove(&user.user_digest).unwrap_or_default();
                user.attributes.sort_by(|a, b| a.0.cmp(&b.0));
            }
            Ok(users)
        })
    }
}
