//! The audit projection: an RFC 9162 Merkle tree over the whole log in position order, kept
//! beside the log, plus signed checkpoints (tree heads).
//!
//! Rules it enforces:
//! - Leaf *i* is `SHA-256(0x00 ‖ canonical bytes of event i)` (see
//!   `RecordedEvent::canonical_bytes`); leaves are added strictly in position order, in
//!   batches, each batch in one transaction together with the new tree size.
//! - Only complete subtrees are stored, as tiles (`audit_tiles`, see [`tiles`]): a row holds
//!   up to 16 consecutive nodes of every fourth tree level, and the levels between are
//!   recomputed from it, so a proof reads one row per tile level, in one statement, and the
//!   immutable upper tiles are cached in memory.
//! - A checkpoint is signed only over a tree size the projection has committed.
//! - The tree is a cache of the log: `verify` recomputes everything from the events and
//!   checks it against the signed checkpoints.

mod tiles;

use std::collections::HashMap;
use std::sync::Arc;

use countersign_eventstore::{Database, SharedStore, StoreError, with_pool};
use countersign_protocol::checkpoint::{TreeHead, sign_checkpoint, verify_checkpoint};
use countersign_protocol::merkle::{self, CompactRange, Hash, NodeId, NodeSource};
use sqlx::Row as _;

use tiles::{TileCache, TileId, Tiles};

/// Why the audit projection failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Reading the log failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The audit tables failed.
    #[error("audit database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The stored tree contradicts itself (a node missing or malformed): rebuild it.
    #[error("the audit tree is damaged: {0}")]
    Damaged(String),
    /// A proof was asked for sizes the tree does not have (HTTP 400/404).
    #[error("{0}")]
    OutOfRange(String),
}

/// The stored tree. Clones share one cache of immutable upper tiles.
#[derive(Debug, Clone)]
pub struct AuditTree {
    db: Database,
    cache: Arc<TileCache>,
}

fn to_i64(n: u64) -> Result<i64, AuditError> {
    i64::try_from(n).map_err(|_| AuditError::OutOfRange(format!("{n} is out of range")))
}

fn to_hash(bytes: &[u8]) -> Result<Hash, AuditError> {
    bytes
        .try_into()
        .map_err(|_| AuditError::Damaged("a stored hash is not 32 bytes".into()))
}

/// A tile row read back: its address and hashes.
fn tile_row(level: i32, idx: i64, hashes: &[u8]) -> Result<(TileId, Arc<[Hash]>), AuditError> {
    let id = TileId {
        level: u8::try_from(level).map_err(|_| AuditError::Damaged("bad tile level".into()))?,
        index: u64::try_from(idx).map_err(|_| AuditError::Damaged("bad tile index".into()))?,
    };
    let tile = tiles::decode(hashes).ok_or_else(|| {
        AuditError::Damaged(format!(
            "tile ({}, {}) holds {} bytes, not 1 to {} hashes",
            id.level,
            id.index,
            hashes.len(),
            tiles::WIDTH
        ))
    })?;
    Ok((id, tile))
}

impl AuditTree {
    pub fn new(db: Database) -> Self {
        Self {
            db,
            cache: Arc::new(TileCache::new()),
        }
    }

    /// Leaves committed so far.
    pub async fn size(&self) -> Result<u64, AuditError> {
        let size: i64 = with_pool!(&self.db, pool => {
            sqlx::query_scalar("SELECT tree_size FROM audit_state WHERE id = 1").fetch_one(pool).await?
        });
        u64::try_from(size).map_err(|_| AuditError::Damaged("negative tree size".into()))
    }

    /// The tiles holding `nodes`: from the cache, the rest in one round trip on PostgreSQL;
    /// SQLite is in-process, so a prepared lookup per key costs less than building one.
    async fn nodes(&self, nodes: &[NodeId]) -> Result<StoredNodes, AuditError> {
        let mut found = HashMap::new();
        let mut missing = Vec::new();
        for id in tiles::tiles_for(nodes) {
            match self.cache.get(id) {
                Some(tile) => {
                    found.insert(id, tile);
                }
                None => missing.push(id),
            }
        }
        if missing.is_empty() {
            return Ok(StoredNodes(Tiles(found)));
        }
        match &self.db {
            // One tile (the usual case once the upper tiles are cached): scalar parameters,
            // so PostgreSQL settles on one generic primary-key plan instead of planning each
            // call as it does for array parameters.
            Database::Postgres(pool) if missing.len() > 1 => {
                let levels: Vec<i32> = missing.iter().map(|id| i32::from(id.level)).collect();
                let indexes = missing
                    .iter()
                    .map(|id| to_i64(id.index))
                    .collect::<Result<Vec<_>, _>>()?;
                let rows = sqlx::query(
                    "SELECT t.level, t.idx, t.hashes FROM unnest($1::int[], $2::bigint[]) AS k(level, idx) \
                     JOIN audit_tiles t ON t.level = k.level AND t.idx = k.idx",
                )
                .bind(&levels)
                .bind(&indexes)
                .fetch_all(pool)
                .await?;
                for row in rows {
                    let hashes: Vec<u8> = row.try_get(2)?;
                    let (id, tile) = tile_row(row.try_get(0)?, row.try_get(1)?, &hashes)?;
                    self.cache.keep(id, &tile);
                    found.insert(id, tile);
                }
            }
            database => {
                for id in missing {
                    let hashes: Option<Vec<u8>> = with_pool!(database, pool => {
                        sqlx::query_scalar("SELECT hashes FROM audit_tiles WHERE level = $1 AND idx = $2")
                            .bind(i32::from(id.level))
                            .bind(to_i64(id.index)?)
                            .fetch_optional(pool)
                            .await?
                    });
                    if let Some(hashes) = hashes {
                        let (_, tile) = tile_row(i32::from(id.level), to_i64(id.index)?, &hashes)?;
                        self.cache.keep(id, &tile);
                        found.insert(id, tile);
                    }
                }
            }
        }
        Ok(StoredNodes(Tiles(found)))
    }

    /// Nodes for a proof over `size` leaves: a missing node means the size is beyond the
    /// committed tree (the caller's mistake) or the tree is damaged; the size tells which.
    async fn nodes_for(&self, ids: &[NodeId], size: u64) -> Result<StoredNodes, AuditError> {
        let nodes = self.nodes(ids).await?;
        if !ids.iter().all(|id| nodes.0.holds(*id)) {
            self.within(size).await?;
        }
        Ok(nodes)
    }

    /// The right edge of the committed tree, read back from its nodes.
    pub async fn frontier(&self) -> Result<CompactRange, AuditError> {
        let size = self.size().await?;
        let ids = CompactRange::frontier_nodes(size);
        let found = self.nodes(&ids).await?;
        let hashes = ids
            .iter()
            .map(|id| found.node(*id))
            .collect::<Result<Vec<_>, _>>()?;
        CompactRange::from_frontier(size, hashes)
            .map_err(|e| AuditError::Damaged(format!("frontier does not fit the size: {e:?}")))
    }

    /// The root of the tree of the first `size` leaves (`size` ≤ the committed size).
    pub async fn root(&self, size: u64) -> Result<Hash, AuditError> {
        let nodes = self.nodes_for(&merkle::root_nodes(size), size).await?;
        merkle::root(&nodes, size).map_err(prove_error)
    }

    /// The inclusion proof of leaf `index` in the tree of `size` leaves.
    pub async fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, AuditError> {
        let ids = merkle::inclusion_proof_nodes(index, size).map_err(prove_error)?;
        let nodes = self.nodes_for(&ids, size).await?;
        merkle::inclusion_proof(&nodes, index, size).map_err(prove_error)
    }

    /// The consistency proof between the trees of `old_size` and `new_size` leaves.
    pub async fn consistency_proof(
        &self,
        old_size: u64,
        new_size: u64,
    ) -> Result<Vec<Hash>, AuditError> {
        let ids = merkle::consistency_proof_nodes(old_size, new_size).map_err(prove_error)?;
        let nodes = self.nodes_for(&ids, new_size).await?;
        merkle::consistency_proof(&nodes, old_size, new_size).map_err(prove_error)
    }

    async fn within(&self, size: u64) -> Result<(), AuditError> {
        let committed = self.size().await?;
        if size > committed {
            return Err(AuditError::OutOfRange(format!(
                "the audit tree holds {committed} leaves, not {size}"
            )));
        }
        Ok(())
    }
}

/// Tiles fetched for one proof, answering the proof generator from memory.
#[derive(Debug)]
struct StoredNodes(Tiles);

impl NodeSource for StoredNodes {
    type Error = AuditError;

    fn node(&self, id: NodeId) -> Result<Hash, AuditError> {
        self.0.node(id).ok_or_else(|| {
            AuditError::Damaged(format!("node ({}, {}) is missing", id.level, id.index))
        })
    }
}

fn prove_error<E: std::fmt::Display>(error: merkle::ProveError<E>) -> AuditError {
    match error {
        merkle::ProveError::Source(e) => AuditError::Damaged(e.to_string()),
        other => AuditError::OutOfRange(other.to_string()),
    }
}

/// Tile rows per INSERT statement (three parameters each).
const INSERT_CHUNK: usize = 1_000;
/// Events per batch of leaves.
const BATCH: usize = 5_000;

impl AuditTree {
    /// Appends `leaves` after the committed tree, in one transaction with the new size. The
    /// frontier moves only if the transaction committed.
    pub async fn append(
        &self,
        frontier: &mut CompactRange,
        leaves: &[Hash],
    ) -> Result<(), AuditError> {
        if leaves.is_empty() {
            return Ok(());
        }
        let mut next = frontier.clone();
        let completed = next
            .extend(leaves.iter().copied())
            .map_err(|_| AuditError::OutOfRange("the audit tree is full".into()))?;
        let mut writes = tiles::writes(&completed);
        let old_size = to_i64(frontier.size())?;
        let new_size = to_i64(next.size())?;
        // Addresses of the tiles this batch continues, as bound parameters.
        let continued: Vec<(i32, i64)> = writes
            .iter()
            .filter(|w| w.offset > 0)
            .map(|w| Ok((i32::from(w.tile.level), to_i64(w.tile.index)?)))
            .collect::<Result<_, AuditError>>()?;
        let rows: Vec<(i32, i64, Vec<u8>)> = with_pool!(&self.db, pool => {
            let mut tx = pool.begin().await?;
            // Only one projector may move the tree: the size it started from must still be
            // there. Updating it first also makes a second projector wait here, before it
            // reads the right edge.
            let moved = sqlx::query("UPDATE audit_state SET tree_size = $1 WHERE id = 1 AND tree_size = $2")
                .bind(new_size)
                .bind(old_size)
                .execute(&mut *tx)
                .await?;
            if moved.rows_affected() != 1 {
                return Err(AuditError::Damaged("another projector moved the audit tree".into()));
            }
            let mut edge = Vec::with_capacity(continued.len());
            if !continued.is_empty() {
                let mut select = sqlx::QueryBuilder::new("SELECT level, idx, hashes FROM audit_tiles WHERE ");
                let mut keys = select.separated(" OR ");
                for (level, idx) in &continued {
                    keys.push("(level = ")
                        .push_bind_unseparated(*level)
                        .push_unseparated(" AND idx = ")
                        .push_bind_unseparated(*idx)
                        .push_unseparated(")");
                }
                for row in select.build().fetch_all(&mut *tx).await? {
                    let hashes: Vec<u8> = row.try_get(2)?;
                    edge.push(tile_row(row.try_get(0)?, row.try_get(1)?, &hashes)?);
                }
            }
            let rows = tile_rows(&mut writes, &edge)?;
            for chunk in rows.chunks(INSERT_CHUNK) {
                let mut insert = sqlx::QueryBuilder::new("INSERT INTO audit_tiles (level, idx, hashes) ");
                insert.push_values(chunk, |mut row, (level, idx, hashes)| {
                    row.push_bind(*level).push_bind(*idx).push_bind(hashes.as_slice());
                });
                insert.push(" ON CONFLICT (level, idx) DO UPDATE SET hashes = excluded.hashes");
                insert.build().execute(&mut *tx).await?;
            }
            tx.commit().await?;
            rows
        });
        for (level, idx, hashes) in &rows {
            let (id, tile) = tile_row(*level, *idx, hashes)?;
            self.cache.keep(id, &tile);
        }
        *frontier = next;
        Ok(())
    }

    /// Adds every event committed after the tree's size, in batches; answers the new size.
    pub async fn catch_up(&self, store: &SharedStore) -> Result<u64, AuditError> {
        Ok(self.catch_up_range(store).await?.size())
    }

    /// [`Self::catch_up`], answering the new right edge.
    async fn catch_up_range(&self, store: &SharedStore) -> Result<CompactRange, AuditError> {
        let mut frontier = self.frontier().await?;
        loop {
            let events = store.read_all(frontier.size(), BATCH).await?;
            if events.is_empty() {
                return Ok(frontier);
            }
            let mut leaves = Vec::with_capacity(events.len());
            for (offset, event) in events.iter().enumerate() {
                if event.position != frontier.size() + offset as u64 {
                    return Err(AuditError::Store(StoreError::Corrupt(format!(
                        "expected position {}, read {}",
                        frontier.size() + offset as u64,
                        event.position
                    ))));
                }
                leaves.push(merkle::leaf_hash(&event.canonical_bytes()?));
            }
            self.append(&mut frontier, &leaves).await?;
            if events.len() < BATCH {
                // A short page was the end of the log when it was read.
                return Ok(frontier);
            }
        }
    }
}

/// The rows an append writes: each touched tile in full, the hashes already stored (`edge`,
/// the right-edge tiles read in the append's transaction) followed by the new ones.
fn tile_rows(
    writes: &mut [tiles::TileWrite],
    edge: &[(TileId, Arc<[Hash]>)],
) -> Result<Vec<(i32, i64, Vec<u8>)>, AuditError> {
    writes
        .iter_mut()
        .map(|write| {
            if write.offset > 0 {
                let stored = edge
                    .iter()
                    .find(|(id, _)| *id == write.tile)
                    .map(|(_, tile)| tile)
                    .filter(|tile| tile.len() == write.offset)
                    .ok_or_else(|| {
                        AuditError::Damaged(format!(
                            "tile ({}, {}) does not hold the {} hashes the tree size implies",
                            write.tile.level, write.tile.index, write.offset
                        ))
                    })?;
                write.hashes.splice(0..0, stored.iter().copied());
            }
            Ok((
                i32::from(write.tile.level),
                to_i64(write.tile.index)?,
                tiles::encode(&write.hashes),
            ))
        })
        .collect()
}

impl AuditTree {
    /// Forgets the tree (nodes and size) so [`AuditTree::catch_up`] rebuilds it from position
    /// 0. Checkpoints are kept: they are signed statements and must match the rebuilt roots.
    pub async fn reset(&self) -> Result<(), AuditError> {
        with_pool!(&self.db, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query("DELETE FROM audit_tiles").execute(&mut *tx).await?;
            sqlx::query("UPDATE audit_state SET tree_size = 0 WHERE id = 1").execute(&mut *tx).await?;
            tx.commit().await?;
        });
        self.cache.clear();
        Ok(())
    }
}

/// A checkpoint as stored: the signed bytes and what they claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCheckpoint {
    pub tree_size: u64,
    pub root_hash: Hash,
    pub timestamp_ms: i64,
    /// The COSE_Sign1 the deployment's audit key made.
    pub signed: Vec<u8>,
}

/// The first disagreement `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The first position that disagrees, when it can be named.
    pub position: Option<u64>,
    pub reason: String,
}

/// What `verify` checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub events: u64,
    pub checkpoints: u64,
    /// `None`: the log, the tree and every checkpoint agree.
    pub finding: Option<Finding>,
}

impl AuditTree {
    /// Every checkpoint, oldest first.
    pub async fn checkpoints(&self) -> Result<Vec<StoredCheckpoint>, AuditError> {
        let rows = with_pool!(&self.db, pool => {
            sqlx::query("SELECT tree_size, root_hash, timestamp_ms, signed FROM audit_checkpoints ORDER BY tree_size")
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(|row| -> Result<StoredCheckpoint, AuditError> {
                    let size: i64 = row.try_get(0)?;
                    let root: Vec<u8> = row.try_get(1)?;
                    Ok(StoredCheckpoint {
                        tree_size: u64::try_from(size).map_err(|_| AuditError::Damaged("negative checkpoint size".into()))?,
                        root_hash: to_hash(&root)?,
                        timestamp_ms: row.try_get(2)?,
                        signed: row.try_get(3)?,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        });
        Ok(rows)
    }

    /// The newest checkpoint, or the one for exactly `size`.
    pub async fn find_checkpoint(
        &self,
        size: Option<u64>,
    ) -> Result<Option<StoredCheckpoint>, AuditError> {
        let (sql, bound) = match size {
            Some(size) => (
                "SELECT tree_size, root_hash, timestamp_ms, signed FROM audit_checkpoints WHERE tree_size = $1",
                to_i64(size)?,
            ),
            None => (
                "SELECT tree_size, root_hash, timestamp_ms, signed FROM audit_checkpoints \
                 WHERE tree_size > $1 ORDER BY tree_size DESC LIMIT 1",
                0,
            ),
        };
        let found: Option<(i64, Vec<u8>, i64, Vec<u8>)> = with_pool!(&self.db, pool => {
            sqlx::query_as(sql).bind(bound).fetch_optional(pool).await?
        });
        let Some((size, root, timestamp_ms, signed)) = found else {
            return Ok(None);
        };
        Ok(Some(StoredCheckpoint {
            tree_size: u64::try_from(size)
                .map_err(|_| AuditError::Damaged("negative checkpoint size".into()))?,
            root_hash: to_hash(&root)?,
            timestamp_ms,
            signed,
        }))
    }

    /// Keeps a checkpoint (idempotent for the same size).
    pub async fn store_checkpoint(&self, checkpoint: &StoredCheckpoint) -> Result<(), AuditError> {
        with_pool!(&self.db, pool => {
            sqlx::query(
                "INSERT INTO audit_checkpoints (tree_size, root_hash, timestamp_ms, signed) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (tree_size) DO NOTHING",
            )
            .bind(to_i64(checkpoint.tree_size)?)
            .bind(checkpoint.root_hash.to_vec())
            .bind(checkpoint.timestamp_ms)
            .bind(checkpoint.signed.clone())
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Stored leaf hashes for positions `[from, to)`, read from the database (never the
    /// cache: `verify` checks what is stored).
    async fn stored_leaves(&self, from: u64, to: u64) -> Result<HashMap<u64, Hash>, AuditError> {
        let width = tiles::WIDTH as u64;
        let rows: Vec<(i32, i64, Vec<u8>)> = with_pool!(&self.db, pool => {
            sqlx::query_as("SELECT level, idx, hashes FROM audit_tiles WHERE level = 0 AND idx >= $1 AND idx < $2")
                .bind(to_i64(from / width)?)
                .bind(to_i64(to.div_ceil(width))?)
                .fetch_all(pool)
                .await?
        });
        let mut leaves = HashMap::with_capacity(rows.len() * tiles::WIDTH);
        for (level, idx, hashes) in rows {
            let (id, tile) = tile_row(level, idx, &hashes)?;
            let first = id.index * width;
            for (position, hash) in (first..).zip(tile.iter()) {
                if (from..to).contains(&position) {
                    leaves.insert(position, *hash);
                }
            }
        }
        Ok(leaves)
    }

    /// Recomputes the tree from the stored events and checks it against the stored leaves
    /// and every checkpoint (`check` verifies a checkpoint's signature and answers the size
    /// and root it signs). Reports the first position that disagrees. `progress` gets
    /// (events checked, events in the log).
    pub async fn verify(
        &self,
        store: &SharedStore,
        check: impl Fn(&StoredCheckpoint) -> Result<(u64, Hash), String>,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<VerifyReport, AuditError> {
        let head = store.last_position().await?;
        let total = head.map_or(0, |h| h + 1);
        let checkpoints = self.checkpoints().await?;
        let mut pending = checkpoints.iter().peekable();
        let mut range = CompactRange::new();
        let mut verified = 0u64;
        let found =
            |position: Option<u64>, reason: String, events: u64, checkpoints: u64| VerifyReport {
                events,
                checkpoints,
                finding: Some(Finding { position, reason }),
            };
        loop {
            let position = range.size();
            let page = match store.read_all(position, BATCH).await {
                Ok(page) => page,
                Err(StoreError::Decode {
                    position,
                    event_type,
                    reason,
                }) => {
                    return Ok(found(
                        Some(position),
                        format!("event ({event_type}) does not decode: {reason}"),
                        position,
                        verified,
                    ));
                }
                Err(other) => return Err(other.into()),
            };
            let Some(last) = page.last() else { break };
            let stored = self
                .stored_leaves(position, last.position.saturating_add(1))
                .await?;
            for event in &page {
                let expected = range.size();
                if event.position != expected {
                    return Ok(found(
                        Some(expected),
                        format!(
                            "position {expected} is missing: the next stored event has position {}",
                            event.position
                        ),
                        expected,
                        verified,
                    ));
                }
                let leaf = merkle::leaf_hash(&event.canonical_bytes()?);
                if stored.get(&expected).is_some_and(|s| *s != leaf) {
                    return Ok(found(
                        Some(expected),
                        "the event differs from the one the audit tree recorded".into(),
                        expected,
                        verified,
                    ));
                }
                range
                    .append(leaf)
                    .map_err(|_| AuditError::OutOfRange("the audit tree is full".into()))?;
                while let Some(checkpoint) = pending.next_if(|c| c.tree_size == range.size()) {
                    let from = verified_size(&checkpoints, checkpoint.tree_size);
                    match check(checkpoint) {
                        Ok((size, root))
                            if size == checkpoint.tree_size && root == range.root() =>
                        {
                            verified += 1
                        }
                        Ok(_) => {
                            return Ok(found(
                                Some(from),
                                format!(
                                    "the log disagrees with the signed checkpoint at size {}: an event in positions {from}..{} was changed, removed, inserted or moved",
                                    checkpoint.tree_size,
                                    checkpoint.tree_size - 1
                                ),
                                range.size(),
                                verified,
                            ));
                        }
                        Err(reason) => {
                            return Ok(found(
                                None,
                                format!("checkpoint at size {}: {reason}", checkpoint.tree_size),
                                range.size(),
                                verified,
                            ));
                        }
                    }
                }
            }
            progress(range.size(), total);
        }
        let size = range.size();
        if size != total {
            return Ok(found(
                Some(size.min(total)),
                format!("the log's head says {total} events but {size} are stored"),
                size,
                verified,
            ));
        }
        if let Some(beyond) = pending.next() {
            return Ok(found(
                Some(size),
                format!(
                    "a signed checkpoint covers {} events but the log holds {size}: events were removed",
                    beyond.tree_size
                ),
                size,
                verified,
            ));
        }
        Ok(VerifyReport {
            events: size,
            checkpoints: verified,
            finding: None,
        })
    }
}

impl AuditTree {
    /// Catches up with the log and signs a checkpoint over the committed tree, unless the
    /// newest checkpoint already covers that size. `now_ms` is the checkpoint's timestamp.
    pub async fn checkpoint(
        &self,
        store: &SharedStore,
        key: &p256::ecdsa::SigningKey,
        origin: &str,
        now_ms: i64,
    ) -> Result<Option<StoredCheckpoint>, AuditError> {
        let range = self.catch_up_range(store).await?;
        let size = range.size();
        if size == 0 {
            return Ok(None);
        }
        let newest = self.newest_checkpoint_size().await?;
        if newest >= Some(size) {
            return Ok(None);
        }
        // The root of the committed tree is the folded right edge.
        let root_hash = range.root();
        let head = TreeHead {
            origin: origin.to_owned(),
            tree_size: size,
            root_hash,
            timestamp_ms: now_ms,
        };
        let signed = sign_checkpoint(&head, key)
            .map_err(|e| AuditError::Damaged(format!("cannot sign a checkpoint: {e}")))?;
        let checkpoint = StoredCheckpoint {
            tree_size: size,
            root_hash,
            timestamp_ms: now_ms,
            signed,
        };
        self.store_checkpoint(&checkpoint).await?;
        Ok(Some(checkpoint))
    }

    async fn newest_checkpoint_size(&self) -> Result<Option<u64>, AuditError> {
        let newest: Option<i64> = with_pool!(&self.db, pool => {
            sqlx::query_scalar("SELECT max(tree_size) FROM audit_checkpoints").fetch_one(pool).await?
        });
        Ok(newest.and_then(|n| u64::try_from(n).ok()))
    }
}

/// Checks a stored checkpoint against the audit public key: its COSE signature, and that the
/// row's size and root are the ones it signs. Answers the signed size and root.
pub fn check_signed(
    key: &p256::ecdsa::VerifyingKey,
) -> impl Fn(&StoredCheckpoint) -> Result<(u64, Hash), String> + '_ {
    move |stored| {
        let head = verify_checkpoint(&stored.signed, key)
            .map_err(|e| format!("signature does not verify: {e}"))?;
        if head.tree_size != stored.tree_size || head.root_hash != stored.root_hash {
            return Err("the stored row differs from what the checkpoint signs".into());
        }
        Ok((head.tree_size, head.root_hash))
    }
}

/// The size of the checkpoint before the one of `size` (0 if none): where a disagreement
/// found at `size` can start.
fn verified_size(checkpoints: &[StoredCheckpoint], size: u64) -> u64 {
    checkpoints
        .iter()
        .map(|c| c.tree_size)
        .filter(|&s| s < size)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // test events get clock-based ids
mod tests {
    use countersign_eventstore::testing::TestDb;
    use countersign_eventstore::{
        ExpectedVersion, Metadata, NewEvent, RecordedEvent, StoreOptions, open,
    };
    use countersign_protocol::merkle::{MemoryTree, verify_consistency, verify_inclusion};

    use super::*;

    async fn tree_of(db: &TestDb) -> AuditTree {
        let opened = open(&StoreOptions {
            url: db.url().to_owned(),
            pool_size: 4,
        })
        .await
        .unwrap();
        AuditTree::new(opened.database)
    }

    async fn append(db: &TestDb, n: u64) {
        for chunk in 0..n.div_ceil(100) {
            let count = 100.min(n - chunk * 100);
            let events = (0..count)
                .map(|i| NewEvent {
                    event_id: uuid::Uuid::now_v7(),
                    event_type: "audit.tested".into(),
                    schema_version: 1,
                    payload: (chunk * 100 + i).to_be_bytes().to_vec(),
                    metadata: Metadata::default(),
                })
                .collect();
            db.store
                .append(&format!("s-{chunk}"), ExpectedVersion::Any, events)
                .await
                .unwrap();
        }
    }

    async fn all_events(db: &TestDb) -> Vec<RecordedEvent> {
        db.store.read_all(0, 1_000_000).await.unwrap()
    }

    async fn proofs_match_an_independent_tree(db: &TestDb) {
        let tree = tree_of(db).await;
        append(db, 777).await;
        assert_eq!(tree.catch_up(&db.store).await.unwrap(), 777);
        append(db, 300).await;
        assert_eq!(tree.catch_up(&db.store).await.unwrap(), 1_077);

        let events = all_events(db).await;
        // A second instance starts with nothing cached.
        let cold = tree_of(db).await;
        let memory = MemoryTree::from_leaf_hashes(
            events
                .iter()
                .map(|e| merkle::leaf_hash(&e.canonical_bytes().unwrap())),
        );
        for size in [1, 2, 3, 255, 256, 257, 777, 1_000, 1_077] {
            let root = tree.root(size).await.unwrap();
            assert_eq!(root, memory.root_at(size).unwrap(), "root at {size}");
            for index in [0, size / 3, size - 1] {
                let proof = tree.inclusion_proof(index, size).await.unwrap();
                assert_eq!(
                    cold.inclusion_proof(index, size).await.unwrap(),
                    proof,
                    "the cache answers as the database does"
                );
                let leaf_hash =
                    merkle::leaf_hash(&events[index as usize].canonical_bytes().unwrap());
                verify_inclusion(&leaf_hash, index, size, &proof, &root).unwrap();
            }
            for old in [1, size / 2, size] {
                if old == 0 {
                    continue;
                }
                let proof = tree.consistency_proof(old, size).await.unwrap();
                let old_root = tree.root(old).await.unwrap();
                verify_consistency(old, size, &old_root, &root, &proof).unwrap();
            }
        }
        assert!(matches!(
            tree.inclusion_proof(5, 2_000).await,
            Err(AuditError::OutOfRange(_))
        ));
        assert!(matches!(
            tree.inclusion_proof(5, 5).await,
            Err(AuditError::OutOfRange(_))
        ));
        assert!(matches!(
            tree.consistency_proof(0, 5).await,
            Err(AuditError::OutOfRange(_))
        ));
    }

    async fn rebuild_gives_the_same_roots(db: &TestDb) {
        let tree = tree_of(db).await;
        let mut roots = Vec::new();
        for round in 0..5u64 {
            append(db, 37 * (round + 1)).await;
            let size = tree.catch_up(&db.store).await.unwrap();
            roots.push((size, tree.root(size).await.unwrap()));
        }
        tree.reset().await.unwrap();
        assert_eq!(tree.size().await.unwrap(), 0);
        let size = tree.catch_up(&db.store).await.unwrap();
        assert_eq!(size, roots.last().unwrap().0);
        for (size, root) in roots {
            assert_eq!(
                tree.root(size).await.unwrap(),
                root,
                "rebuilt root at {size}"
            );
        }
    }

    /// Two projectors starting from the same size: the second one's batch is refused and
    /// leaves the tree as the first one wrote it.
    async fn one_projector_moves_the_tree(db: &TestDb) {
        let (first, second) = (tree_of(db).await, tree_of(db).await);
        append(db, 21).await;
        first.catch_up(&db.store).await.unwrap();
        let (mut a, mut b) = (
            first.frontier().await.unwrap(),
            second.frontier().await.unwrap(),
        );
        let leaves: Vec<Hash> = (0u8..9).map(|i| merkle::leaf_hash(&[i])).collect();
        first.append(&mut a, &leaves).await.unwrap();
        let refused = second.append(&mut b, &leaves[..4]).await;
        assert!(
            matches!(&refused, Err(AuditError::Damaged(m)) if m.contains("another projector")),
            "{refused:?}"
        );
        assert_eq!(b.size(), 21, "the refused frontier did not move");
        assert_eq!(second.frontier().await.unwrap(), a);
        assert_eq!(second.root(30).await.unwrap(), a.root());
    }

    /// Trusts a checkpoint row as it stands (signatures are checked by the caller's closure
    /// in production; here the stored root is what the tamper must contradict).
    fn trust_row(c: &StoredCheckpoint) -> Result<(u64, Hash), String> {
        Ok((c.tree_size, c.root_hash))
    }

    /// Changes the log behind the store's back: the database triggers are bypassed the way an
    /// attacker with database access would (PostgreSQL: replica role; SQLite: no triggers).
    struct Tamperer {
        url: String,
    }

    impl Tamperer {
        async fn run(&self, statements: &[String]) {
            use sqlx::Connection;
            if self.url.starts_with("postgres") {
                let mut conn = sqlx::PgConnection::connect(&self.url).await.unwrap();
                sqlx::query("SET session_replication_role = replica")
                    .execute(&mut conn)
                    .await
                    .unwrap();
                for sql in statements {
                    sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                        .execute(&mut conn)
                        .await
                        .unwrap();
                }
            } else {
                let mut conn = sqlx::SqliteConnection::connect(&self.url).await.unwrap();
                sqlx::query("DROP TRIGGER IF EXISTS es_events_no_update")
                    .execute(&mut conn)
                    .await
                    .unwrap();
                sqlx::query("DROP TRIGGER IF EXISTS es_events_no_delete")
                    .execute(&mut conn)
                    .await
                    .unwrap();
                for sql in statements {
                    sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                        .execute(&mut conn)
                        .await
                        .unwrap();
                }
            }
        }
    }

    /// 100 random tampers (change, delete, insert, reorder), each found by `verify` at the
    /// position it touched, then undone.
    async fn tamper_sweep(db: &TestDb) {
        const EVENTS: u64 = 200;
        let tree = tree_of(db).await;
        append(db, EVENTS).await;
        tree.catch_up(&db.store).await.unwrap();
        for size in [50, 120, EVENTS] {
            let root = tree.root(size).await.unwrap();
            tree.store_checkpoint(&StoredCheckpoint {
                tree_size: size,
                root_hash: root,
                timestamp_ms: 0,
                signed: vec![],
            })
            .await
            .unwrap();
        }
        let clean = tree.verify(&db.store, trust_row, |_, _| {}).await.unwrap();
        assert_eq!(
            (clean.events, clean.checkpoints, clean.finding),
            (EVENTS, 3, None)
        );

        let tamperer = Tamperer {
            url: db.url().to_owned(),
        };
        let postgres = db.url().starts_with("postgres");
        let blob = |bytes: &[u8]| {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            if postgres {
                format!("decode('{hex}', 'hex')")
            } else {
                format!("X'{hex}'")
            }
        };
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound
        };
        let mut found = 0;
        for round in 0..100 {
            let events = all_events(db).await;
            let p = next(EVENTS);
            let e = &events[p as usize];
            let insert = |position: u64, e: &RecordedEvent, id: &str| {
                format!(
                    "INSERT INTO es_events (position, stream, version, event_id, event_type, schema_version, payload, metadata, server_id, recorded_at) \
                     VALUES ({position}, '{}', {}, {id}, '{}', {}, {}, {}, NULL, {})",
                    e.stream,
                    e.version,
                    e.event_type,
                    e.schema_version,
                    blob(&e.payload),
                    blob(&e.metadata_cbor),
                    e.recorded_at
                )
            };
            let id = if db.url().starts_with("postgres") {
                format!("'{}'", e.event_id)
            } else {
                blob(e.event_id.as_bytes())
            };
            let (tamper, undo, expected) = match round % 4 {
                0 => (
                    vec![format!(
                        "UPDATE es_events SET payload = {} WHERE position = {p}",
                        blob(b"forged")
                    )],
                    vec![format!(
                        "UPDATE es_events SET payload = {} WHERE position = {p}",
                        blob(&e.payload)
                    )],
                    p,
                ),
                1 => (
                    vec![format!("DELETE FROM es_events WHERE position = {p}")],
                    vec![insert(p, e, &id)],
                    p,
                ),
                2 => {
                    // An event slipped in after the last one, without going through the store.
                    let forged_id = if db.url().starts_with("postgres") {
                        "'00000000-0000-7000-8000-000000000001'".to_owned()
                    } else {
                        blob(&[1; 16])
                    };
                    let mut forged = e.clone();
                    forged.version += 10_000;
                    (
                        vec![insert(EVENTS, &forged, &forged_id)],
                        vec![format!("DELETE FROM es_events WHERE position = {EVENTS}")],
                        EVENTS,
                    )
                }
                _ => {
                    let q = (p + 1 + next(EVENTS - 1)) % EVENTS;
                    let (a, b) = (p.min(q), p.max(q));
                    let swap = vec![
                        format!("UPDATE es_events SET position = 1000000000 WHERE position = {a}"),
                        format!("UPDATE es_events SET position = {a} WHERE position = {b}"),
                        format!("UPDATE es_events SET position = {b} WHERE position = 1000000000"),
                    ];
                    (swap.clone(), swap, a)
                }
            };
            tamperer.run(&tamper).await;
            let report = tree.verify(&db.store, trust_row, |_, _| {}).await.unwrap();
            let finding = report
                .finding
                .unwrap_or_else(|| panic!("round {round}: tamper not found"));
            assert_eq!(
                finding.position,
                Some(expected),
                "round {round}: {}",
                finding.reason
            );
            found += 1;
            tamperer.run(&undo).await;
        }
        assert_eq!(found, 100);
        let clean = tree.verify(&db.store, trust_row, |_, _| {}).await.unwrap();
        assert_eq!(clean.finding, None, "every tamper was undone");
    }

    /// Checkpoints signed with the audit key verify, and a checkpoint row whose root was
    /// swapped (or signed by another key) is reported.
    async fn signed_checkpoints(db: &TestDb) {
        let tree = tree_of(db).await;
        let key = p256::ecdsa::SigningKey::from_slice(&[7; 32]).unwrap();
        let other = p256::ecdsa::SigningKey::from_slice(&[8; 32]).unwrap();
        append(db, 10).await;
        let first = tree
            .checkpoint(&db.store, &key, "test", 1)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.tree_size, 10);
        assert!(
            tree.checkpoint(&db.store, &key, "test", 2)
                .await
                .unwrap()
                .is_none(),
            "nothing new to sign"
        );
        append(db, 5).await;
        let second = tree
            .checkpoint(&db.store, &key, "test", 3)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(second.tree_size, 15);
        let report = tree
            .verify(&db.store, check_signed(key.verifying_key()), |_, _| {})
            .await
            .unwrap();
        assert_eq!(
            (report.events, report.checkpoints, report.finding),
            (15, 2, None)
        );
        let report = tree
            .verify(&db.store, check_signed(other.verifying_key()), |_, _| {})
            .await
            .unwrap();
        assert!(report.finding.unwrap().reason.contains("signature"));
    }

    countersign_eventstore::on_both_backends!(
        signed_checkpoints,
        proofs_match_an_independent_tree,
        rebuild_gives_the_same_roots,
        one_projector_moves_the_tree,
        tamper_sweep,
    );
}
