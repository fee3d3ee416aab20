//! The read models of the business API: servers and their API keys, users, accounts,
//! enrolments, sessions and transactions, kept in `rm_*` tables beside the log and built only
//! from events.
//!
//! Rules it enforces:
//! - **Events only.** Every row comes from the log; nothing else writes these tables, and no
//!   business rule is recomputed here (deadlines, states and keys come from the events).
//! - **Tenant isolation.** Every tenant-scoped query takes the server id and filters on it;
//!   keys are always `(server_id, …)`, with ids taken from the event's stream name.
//! - **Checkpoints in the same transaction.** Each projection has a row in `rm_checkpoints`
//!   (next position to process). A batch of events is one transaction that writes every
//!   projection's rows and moves its checkpoint, only if the checkpoint is still where this
//!   projector read it: of two projectors (two instances, or a replay and a follower) one
//!   writes the batch and the other reloads and carries on from there.
//! - **Rebuild equals incremental.** A batch is folded in memory first (see [`fold`]): events
//!   touching one row become one upsert, one update of the fields they set, or one delete.
//!   An update applies only the fields its events determine (a session's history entry that
//!   depends on the stored state is decided in SQL against it), so any cut of the log into
//!   batches gives the same tables ([`ReadModels::dump`] compares them).
//! - **Sealed personal data stays sealed.** The userid and attribute values are stored as the
//!   CBOR of the [`Sealed`](countersign_domain::Sealed) values the events carry; the API opens
//!   them with the user's data key. `user.deleted` deletes the user's rows (transactions
//!   excepted: records of approvals outlive the user, in the clear as the log keeps them).
//! - **Reads can wait for writes.** [`ReadModels::processed`] publishes the lowest next
//!   position over all projections after each committed batch; [`ReadModels::wait_for`] waits
//!   on it (never polling the database).
//!
//! Speed: a reader task reads the log and a folding task decodes and folds the next batch
//! while the current one is written. PostgreSQL writes each table's changes with one
//! `UNNEST` statement; SQLite, in process, runs prepared per-row statements in the batch's
//! transaction.

mod accounts;
mod dump;
mod enrolments;
mod feed;
mod fold;
mod oidc;
#[cfg(test)]
mod oidc_tests;
mod rows;
mod servers;
mod sessions;
#[cfg(test)]
mod tests;
mod transactions;
mod users;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use countersign_eventstore::{Database, RecordedEvent, SharedStore, StoreError, with_pool};
use futures::future::BoxFuture;
use sqlx::Row as _;
use tokio::sync::{mpsc, watch};

pub use accounts::AccountRow;
pub use enrolments::EnrolmentRow;
pub use feed::{EventFeed, PageSender};
pub use oidc::{OidcClientRow, OidcKeyRow};
pub use servers::{ApiKeyRow, ServerRow};
pub use sessions::{HistoryRow, SessionRow, SessionState};
pub use transactions::TransactionRow;
pub use users::UserRow;

use fold::Batch;

/// Why a read model could not be built or read.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// Reading the log failed (HTTP 500; `run` retries).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The read-model tables failed (HTTP 500; `run` retries).
    #[error("read model database error: {0}")]
    Database(#[from] sqlx::Error),
    /// An event the read models must understand does not decode, or sits in a stream whose
    /// name does not say whose it is. The projection stops before it (HTTP 500).
    #[error("event at position {position} ({event_type}) cannot be projected: {reason}")]
    Decode {
        position: u64,
        event_type: String,
        reason: String,
    },
    /// A stored row does not decode: the read model is damaged; replay it (HTTP 500).
    #[error("the read model is damaged: {0}")]
    Damaged(String),
    /// `replay` was asked for a projection that does not exist (the caller's mistake).
    #[error(
        "no read model called {0:?}; known: servers, users, accounts, enrolments, sessions, transactions"
    )]
    UnknownProjection(String),
}

impl ProjectionError {
    /// Whether `run` should try again after a pause (the database or the log failed) rather
    /// than stop (an event or a row it cannot read will not read better later).
    fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Store(StoreError::Database(_) | StoreError::Unavailable(_)) | Self::Database(_)
        )
    }
}

/// The projections, in the order their checkpoints are claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Projection {
    Servers = 0,
    Users = 1,
    Accounts = 2,
    Enrolments = 3,
    Sessions = 4,
    Transactions = 5,
}

impl Projection {
    const ALL: [Self; 6] = [
        Self::Servers,
        Self::Users,
        Self::Accounts,
        Self::Enrolments,
        Self::Sessions,
        Self::Transactions,
    ];

    fn name(self) -> &'static str {
        ReadModels::NAMES
            .get(self as usize)
            .copied()
            .unwrap_or("unknown")
    }

    /// The tables it owns, children first (the order they are emptied in).
    fn tables(self) -> &'static [&'static str] {
        match self {
            Self::Servers => &[
                "rm_oidc_keys",
                "rm_oidc_clients",
                "rm_api_keys",
                "rm_servers",
            ],
            Self::Users => &["rm_user_attributes", "rm_users"],
            Self::Accounts => &["rm_accounts"],
            Self::Enrolments => &["rm_enrolments"],
            Self::Sessions => &["rm_sessions"],
            Self::Transactions => &["rm_transactions"],
        }
    }
}

impl FromStr for Projection {
    type Err = ProjectionError;
    fn from_str(name: &str) -> Result<Self, ProjectionError> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| ProjectionError::UnknownProjection(name.to_owned()))
    }
}

/// Next position to process, per projection (indexed by [`Projection`]).
pub(crate) type Checkpoints = [u64; 6];

/// Events read and folded per batch (and per transaction).
pub const DEFAULT_BATCH: usize = 5_000;
/// Batches folded ahead of the one being written.
const PIPELINE_DEPTH: usize = 2;
/// How often a follower re-reads the log when no head change was heard (writers in another
/// process on SQLite, a lost PostgreSQL notification).
const FALLBACK_READ: Duration = Duration::from_millis(500);
/// Longest pause between retries after a failure in `run`.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The read models: their queries and the projector that keeps them up to date. Cheap to
/// clone; clones share the processed-position watch.
#[derive(Debug, Clone)]
pub struct ReadModels {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The database as given to [`ReadModels::new`].
    given: Database,
    /// Where the projector writes (on SQLite one connection of its own).
    db: Database,
    /// Where queries read: on SQLite a pool of read-only connections, so reads never wait for
    /// the write connection.
    reads: Database,
    processed: watch::Sender<u64>,
    loaded: AtomicBool,
    batch: AtomicUsize,
}

/// What writing one batch came to.
enum Written {
    Committed,
    /// Another projector moved a checkpoint first: nothing was written.
    Conflict,
}

impl ReadModels {
    /// The projections' names, as `replay` accepts them.
    pub const NAMES: &[&str] = &[
        "servers",
        "users",
        "accounts",
        "enrolments",
        "sessions",
        "transactions",
    ];

    /// Read models over `db` (the log's database, migrated by the event store's `open`).
    pub fn new(given: Database) -> Self {
        let (db, reads) = match given.clone() {
            Database::Postgres(pool) => {
                (Database::Postgres(pool.clone()), Database::Postgres(pool))
            }
            Database::Sqlite(pool) => {
                let options = (*pool.connect_options()).clone();
                // Own connections: the projector's write transactions do not hold the key
                // vault's, and commit without waiting for the disk (`synchronous = NORMAL`,
                // still atomic: a crash loses whole batches with their checkpoints, which are
                // then projected again), as on PostgreSQL.
                let writes = sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_lazy_with(
                        options
                            .clone()
                            .synchronous(sqlx::sqlite::SqliteSynchronous::Normal),
                    );
                let reads = sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(4)
                    .connect_lazy_with(options.read_only(true));
                (Database::Sqlite(writes), Database::Sqlite(reads))
            }
        };
        let (processed, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                given,
                db,
                reads,
                processed,
                loaded: AtomicBool::new(false),
                batch: AtomicUsize::new(DEFAULT_BATCH),
            }),
        }
    }

    /// Events per batch from now on (at least 1): the CLI tunes it, tests use small batches
    /// to cut the log in many places.
    pub fn with_batch_size(self, events: usize) -> Self {
        self.inner.batch.store(events.max(1), Ordering::Relaxed);
        self
    }

    fn batch_size(&self) -> usize {
        self.inner.batch.load(Ordering::Relaxed)
    }

    pub(crate) fn reads(&self) -> &Database {
        &self.inner.reads
    }

    /// The database the read models live in (the log's own), as given to
    /// [`ReadModels::new`]: on SQLite not the projector's own connections.
    pub fn database(&self) -> &Database {
        &self.inner.given
    }

    /// The lowest next-position over all projections, as this process has seen it: updated
    /// after each batch this process commits (or, after a conflict, reads back).
    pub fn processed(&self) -> watch::Receiver<u64> {
        self.inner.processed.subscribe()
    }

    /// Waits until every projection has processed `position` (its checkpoint is beyond it) or
    /// `timeout` passes; `Ok(true)` if reached. Waits on [`ReadModels::processed`]; the
    /// database is read at most once, when this process has not loaded the checkpoints yet.
    pub async fn wait_for(
        &self,
        position: u64,
        timeout: Duration,
    ) -> Result<bool, ProjectionError> {
        let mut processed = self.processed();
        if *processed.borrow_and_update() > position {
            return Ok(true);
        }
        if !self.inner.loaded.load(Ordering::Acquire) {
            self.load_checkpoints().await?;
        }
        match tokio::time::timeout(timeout, processed.wait_for(|p| *p > position)).await {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(_)) | Err(_) => Ok(false),
        }
    }

    /// Reads every projection's checkpoint and publishes the lowest.
    async fn load_checkpoints(&self) -> Result<Checkpoints, ProjectionError> {
        let first = !self.inner.loaded.load(Ordering::Acquire);
        let rows: Vec<(String, i64)> = with_pool!(&self.inner.db, pool => {
            // A projection added after the migration that seeded the others starts at 0.
            for name in Self::NAMES.iter().filter(|_| first) {
                sqlx::query(
                    "INSERT INTO rm_checkpoints (projection, position) VALUES ($1, 0) \
                     ON CONFLICT (projection) DO NOTHING",
                )
                .bind(*name)
                .execute(pool)
                .await?;
            }
            sqlx::query("SELECT projection, position FROM rm_checkpoints")
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
                .collect::<Result<Vec<_>, sqlx::Error>>()?
        });
        let mut checkpoints = [0; 6];
        for (name, position) in rows {
            let Ok(projection) = name.parse::<Projection>() else {
                continue;
            };
            if let Some(slot) = checkpoints.get_mut(projection as usize) {
                *slot = u64::try_from(position)
                    .map_err(|_| ProjectionError::Damaged(format!("checkpoint of {name}")))?;
            }
        }
        self.publish(&checkpoints);
        self.inner.loaded.store(true, Ordering::Release);
        Ok(checkpoints)
    }

    fn publish(&self, checkpoints: &Checkpoints) {
        let lowest = checkpoints.iter().copied().min().unwrap_or(0);
        self.inner.processed.send_if_modified(|p| {
            let changed = *p != lowest;
            *p = lowest;
            changed
        });
    }

    /// Runs until an event cannot be projected: catches up from each projection's checkpoint,
    /// then follows the log as it grows, one transaction per batch. Failures of the database
    /// or the log are logged and retried with a growing pause.
    pub async fn run(&self, store: SharedStore) -> Result<(), ProjectionError> {
        self.run_from(store_feed(&store)).await
    }

    /// [`ReadModels::run`] over another source of the log's events (in scaled mode, the
    /// Kafka topic the outbox relay fills): the same projection code, the same checkpoints.
    pub async fn run_from(&self, feed: Arc<dyn EventFeed>) -> Result<(), ProjectionError> {
        const FIRST_BACKOFF: Duration = Duration::from_millis(100);
        let mut backoff = FIRST_BACKOFF;
        loop {
            let before = *self.inner.processed.borrow();
            match self.project(&feed, true, &mut |_, _| {}).await {
                Ok(_) => {}
                Err(error) if error.is_transient() => {
                    if *self.inner.processed.borrow() != before {
                        backoff = FIRST_BACKOFF;
                    }
                    tracing::warn!(%error, "read models: retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(error) => {
                    tracing::error!(%error, "read models stopped");
                    return Err(error);
                }
            }
        }
    }

    /// Tells this process that every projection has processed the positions before
    /// `position`, as another process (the projector role) announced: wakes the reads waiting
    /// for them. Never moves backwards.
    pub fn observe_processed(&self, position: u64) {
        self.inner.processed.send_if_modified(|p| {
            let moved = position > *p;
            if moved {
                *p = position;
            }
            moved
        });
    }

    /// Reads the projections' checkpoints from the database and publishes the lowest: how a
    /// process that does not project learns of progress when no announcement reaches it.
    pub async fn refresh_processed(&self) -> Result<u64, ProjectionError> {
        let checkpoints = self.load_checkpoints().await?;
        Ok(checkpoints.iter().copied().min().unwrap_or(0))
    }

    /// Applies everything in the log (up to where reading finds no more) and returns how many
    /// events were processed.
    pub async fn catch_up(&self, store: &SharedStore) -> Result<u64, ProjectionError> {
        self.project(&store_feed(store), false, &mut |_, _| {})
            .await
    }

    /// Deletes the named projections' rows (all when `None`), sets their checkpoints to 0 and
    /// rebuilds them from the log; `progress(done, total)` is called after each batch with the
    /// positions processed and the log's size. Returns the events processed.
    pub async fn replay(
        &self,
        store: &SharedStore,
        names: Option<&[String]>,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<u64, ProjectionError> {
        let projections = match names {
            None => Projection::ALL.to_vec(),
            Some(names) => names
                .iter()
                .map(|n| n.parse())
                .collect::<Result<Vec<Projection>, _>>()?,
        };
        self.reset(&projections).await?;
        let started = Instant::now();
        let events = self.project(&store_feed(store), false, progress).await?;
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            events,
            seconds,
            rate = events as f64 / seconds.max(1e-9),
            "read models replayed"
        );
        Ok(events)
    }

    /// Empties the projections' tables and sets their checkpoints to 0, in one transaction.
    /// PostgreSQL truncates (a rebuild then writes into fresh tables and indexes rather than
    /// beside every dead row); SQLite's unqualified DELETE does the same.
    async fn reset(&self, projections: &[Projection]) -> Result<(), ProjectionError> {
        let projections: Vec<Projection> = Projection::ALL
            .into_iter()
            .filter(|p| projections.contains(p))
            .collect();
        let names: Vec<&str> = projections.iter().map(|p| p.name()).collect();
        let tables: Vec<&str> = projections
            .iter()
            .flat_map(|p| p.tables())
            .copied()
            .collect();
        with_pool!(&self.inner.db, pool => {
            let mut tx = pool.begin().await?;
            // Claimed first, so a projector writing a batch meanwhile finishes before or
            // finds its checkpoint moved.
            for name in &names {
                sqlx::query("UPDATE rm_checkpoints SET position = 0 WHERE projection = $1")
                    .bind(*name)
                    .execute(&mut *tx)
                    .await?;
            }
            let postgres = matches!(self.inner.db, Database::Postgres(_));
            for table in &tables {
                let sql = if postgres {
                    format!("TRUNCATE {table}")
                } else {
                    format!("DELETE FROM {table}")
                };
                sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
        self.load_checkpoints().await?;
        Ok(())
    }

    /// The projector: reads batches from the lowest checkpoint on (following the log when
    /// `follow`), writes each in one transaction, and starts over from the stored checkpoints
    /// when another projector got a batch in first. Returns the events processed.
    async fn project(
        &self,
        feed: &Arc<dyn EventFeed>,
        follow: bool,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<u64, ProjectionError> {
        let mut processed = 0u64;
        'restart: loop {
            let mut checkpoints = self.load_checkpoints().await?;
            let from = checkpoints.iter().copied().min().unwrap_or(0);
            let total = feed.last_position().await?.map_or(0, |p| p + 1);
            let mut pipeline = Pipeline::start(
                feed.clone(),
                from,
                checkpoints,
                self.batch_size(),
                follow,
                self.processed(),
            );
            while let Some(batch) = pipeline.next().await {
                let batch = batch?;
                let (to, events) = (batch.to, batch.events);
                match self.write(batch, &checkpoints).await? {
                    Written::Conflict => {
                        tracing::debug!("another projector moved the read models; reloading");
                        continue 'restart;
                    }
                    Written::Committed => {
                        for checkpoint in &mut checkpoints {
                            *checkpoint = (*checkpoint).max(to);
                        }
                        processed += events;
                        self.publish(&checkpoints);
                        progress(to, total.max(to));
                    }
                }
            }
            return Ok(processed);
        }
    }

    /// Writes a folded batch and moves the checkpoints it covers, in one transaction.
    async fn write(
        &self,
        batch: Batch,
        checkpoints: &Checkpoints,
    ) -> Result<Written, ProjectionError> {
        let to = fold::db_position(batch.to)?;
        let claims = Projection::ALL
            .iter()
            .zip(checkpoints)
            .filter(|(_, at)| **at < batch.to)
            .map(|(p, at)| Ok((p.name(), fold::db_position(*at)?)))
            .collect::<Result<Vec<_>, ProjectionError>>()?;
        match &self.inner.db {
            Database::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                // The batch and its checkpoints commit together; losing the last commits in a
                // crash only means projecting them again, so the flush need not be awaited.
                sqlx::query("SET LOCAL synchronous_commit = off")
                    .execute(&mut *tx)
                    .await?;
                if !claim_postgres(&mut tx, &claims, to).await? {
                    return Ok(Written::Conflict);
                }
                batch.write_postgres(&mut tx).await?;
                tx.commit().await?;
            }
            Database::Sqlite(pool) => {
                let mut tx = pool.begin().await?;
                // The first statement writes, so the transaction takes the write lock at once.
                for (name, at) in &claims {
                    let moved = sqlx::query(
                        "UPDATE rm_checkpoints SET position = $1 WHERE projection = $2 AND position = $3",
                    )
                    .bind(to)
                    .bind(*name)
                    .bind(*at)
                    .execute(&mut *tx)
                    .await?;
                    if moved.rows_affected() != 1 {
                        return Ok(Written::Conflict);
                    }
                }
                batch.write_sqlite(&mut tx).await?;
                tx.commit().await?;
            }
        }
        Ok(Written::Committed)
    }
}

/// Moves the checkpoints in `claims` from where they were read to `to`, one statement per
/// distinct starting position (usually one). False if any had moved.
async fn claim_postgres(
    tx: &mut sqlx::PgConnection,
    claims: &[(&'static str, i64)],
    to: i64,
) -> Result<bool, ProjectionError> {
    let mut starts: Vec<i64> = claims.iter().map(|(_, at)| *at).collect();
    starts.sort_unstable();
    starts.dedup();
    for start in starts {
        let names: Vec<&str> = claims
            .iter()
            .filter(|(_, at)| *at == start)
            .map(|(n, _)| *n)
            .collect();
        let moved = sqlx::query(
            "UPDATE rm_checkpoints SET position = $1 WHERE projection = ANY($2::text[]) AND position = $3",
        )
        .bind(to)
        .bind(&names)
        .bind(start)
        .execute(&mut *tx)
        .await?;
        if moved.rows_affected() != names.len() as u64 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The reading and folding stages: a task reads pages of the log, another decodes and folds
/// them, while the caller writes the batch before. Dropping it stops both.
struct Pipeline {
    batches: mpsc::Receiver<Result<Batch, ProjectionError>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Pipeline {
    fn start(
        feed: Arc<dyn EventFeed>,
        from: u64,
        checkpoints: Checkpoints,
        batch: usize,
        follow: bool,
        processed: watch::Receiver<u64>,
    ) -> Self {
        let (pages_tx, mut pages) = mpsc::channel(PIPELINE_DEPTH);
        let (batches_tx, batches) = mpsc::channel(PIPELINE_DEPTH);
        let reader = tokio::spawn(async move {
            let errors = pages_tx.clone();
            if let Err(error) = feed.read(from, batch, follow, processed, pages_tx).await {
                let _ = errors.send(Err(error)).await;
            }
        });
        let folder = tokio::spawn(async move {
            let mut next = from;
            while let Some(page) = pages.recv().await {
                let batch = page
                    .and_then(|events| in_order(&mut next, events))
                    .and_then(|events| Batch::fold(&events, &checkpoints));
                let failed = batch.is_err();
                // A page of repeats only: nothing to write.
                let empty = batch.as_ref().is_ok_and(|b| b.events == 0);
                if !empty && (batches_tx.send(batch).await.is_err() || failed) {
                    return;
                }
            }
        });
        Self {
            batches,
            tasks: vec![reader, folder],
        }
    }

    async fn next(&mut self) -> Option<Result<Batch, ProjectionError>> {
        self.batches.recv().await
    }
}

/// Drops the events of a page before `next` (a feed may deliver some twice) and checks that
/// the rest continue the log without a gap; moves `next` past them.
fn in_order(
    next: &mut u64,
    mut events: Vec<RecordedEvent>,
) -> Result<Vec<RecordedEvent>, ProjectionError> {
    events.retain(|event| event.position >= *next);
    for event in &events {
        if event.position != *next {
            return Err(StoreError::Corrupt(format!(
                "gap in the event log: expected position {next}, read {}",
                event.position
            ))
            .into());
        }
        *next += 1;
    }
    Ok(events)
}

/// The projector's events straight from the log (the embedded mode, catch-up and replay).
#[derive(Debug)]
struct StoreFeed(SharedStore);

/// The log itself as a feed (what [`ReadModels::run`] follows).
pub fn store_feed(store: &SharedStore) -> Arc<dyn EventFeed> {
    Arc::new(StoreFeed(store.clone()))
}

impl EventFeed for StoreFeed {
    fn last_position(&self) -> BoxFuture<'_, Result<Option<u64>, ProjectionError>> {
        Box::pin(async move { Ok(self.0.last_position().await?) })
    }

    fn read(
        self: Arc<Self>,
        from: u64,
        batch: usize,
        follow: bool,
        _processed: watch::Receiver<u64>,
        pages: PageSender,
    ) -> BoxFuture<'static, Result<(), ProjectionError>> {
        Box::pin(async move { read_pages(&self.0, from, batch, follow, &pages).await })
    }
}

/// Reads the log from `from` in pages of up to `batch` events; when caught up, ends
/// (catch-up) or waits for the head to move (follow).
async fn read_pages(
    store: &SharedStore,
    mut next: u64,
    batch: usize,
    follow: bool,
    pages: &PageSender,
) -> Result<(), ProjectionError> {
    let mut head = store.head();
    loop {
        // Marked seen before the read, so a commit between the read and the wait still wakes.
        head.borrow_and_update();
        let page = store.read_all(next, batch).await?;
        if page.is_empty() {
            if !follow {
                return Ok(());
            }
            tokio::select! {
                changed = head.changed() => {
                    if changed.is_err() {
                        return Err(StoreError::Unavailable("the store was closed".into()).into());
                    }
                }
                () = tokio::time::sleep(FALLBACK_READ) => {}
            }
            continue;
        }
        next += page.len() as u64;
        if pages.send(Ok(page)).await.is_err() {
            return Ok(());
        }
    }
}
