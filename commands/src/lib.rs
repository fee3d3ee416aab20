//! The write side: load an aggregate's stream, let its `decide` rule on a command, append the
//! events with the stream's version as the expected version, and retry from the top when
//! another writer got there first.
//!
//! Rules it enforces:
//! - A command's events are committed before its answer; the answer carries the position
//!   reached, so a reader can wait for it (invariant 8).
//! - Two concurrent commands on one stream never both succeed on the same state: the loser's
//!   append conflicts and it decides again on the new state, up to [`MAX_ATTEMPTS`] times.
//! - With an idempotency key, the event ids are derived from the key, so a retried command
//!   whose first attempt was committed answers that attempt's result instead of deciding again;
//!   the edge first binds the key to its request ([`idempotency`]), so only a retry of the
//!   same request ever gets that far.
//! - This crate is an edge: it reads the clock (through [`Clock`]) and the OS random generator
//!   (ids, keys, nonces); the domain gets both as inputs.

use countersign_domain::{Aggregate, Classify, Context, ErrorKind};
use countersign_eventstore::{
    Direction, ExpectedVersion, Metadata, NewEvent, RecordedEvent, SharedStore, StoreError,
};
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub mod account;
pub mod clock;
pub mod enrolment;
pub mod grant;
pub mod idempotency;
pub mod secrets;
pub mod server;
pub mod session;
pub mod transaction;
pub mod user;

pub use clock::{Clock, FixedClock, SystemClock};

/// Every command service of one store, sharing one cache of server secrets.
#[derive(Debug, Clone)]
pub struct Commands {
    pub servers: server::ServerCommands,
    pub users: user::UserCommands,
    pub sessions: session::SessionCommands,
    pub enrolments: enrolment::EnrolmentCommands,
    pub accounts: account::AccountCommands,
    pub transactions: transaction::TransactionCommands,
    /// The identity provider's grants: codes, tokens, CIBA requests.
    pub grants: grant::GrantCommands,
    /// Binds idempotency keys to the requests that used them.
    pub idempotency: idempotency::IdempotencyKeys,
    /// Per-server secrets and what is derived from them (the push sender key).
    pub secrets: secrets::ServerSecrets,
}

impl Commands {
    pub fn new(
        store: SharedStore,
        vault: countersign_eventstore::vault::KeyVault,
        clock: std::sync::Arc<dyn Clock>,
    ) -> Self {
        let secrets = secrets::ServerSecrets::new(vault.clone());
        Self {
            servers: server::ServerCommands::new(
                store.clone(),
                vault.clone(),
                secrets.clone(),
                clock.clone(),
            ),
            users: user::UserCommands::with_secrets(
                store.clone(),
                vault.clone(),
                secrets.clone(),
                clock.clone(),
            ),
            sessions: session::SessionCommands::new(store.clone(), secrets.clone(), clock.clone()),
            enrolments: enrolment::EnrolmentCommands::new(
                store.clone(),
                secrets.clone(),
                clock.clone(),
            ),
            accounts: account::AccountCommands::new(store.clone(), clock.clone()),
            grants: grant::GrantCommands::new(
                store.clone(),
                vault.clone(),
                secrets.clone(),
                clock.clone(),
            ),
            transactions: transaction::TransactionCommands::new(store, secrets.clone(), clock),
            idempotency: idempotency::IdempotencyKeys::new(vault, secrets.clone()),
            secrets,
        }
    }
}

/// How often a command is decided again after losing a race on its stream. Each race has a
/// winner, so n writers racing on one stream all get through within n attempts.
pub const MAX_ATTEMPTS: usize = 12;

/// Why a command did not go through. Each variant says how an API maps it.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// A business rule refused it; `kind` gives the HTTP mapping (400/404/409/410/422).
    #[error("{message}")]
    Rejected { kind: ErrorKind, message: String },
    /// Other writers kept changing the stream (HTTP 409, retryable).
    #[error("stream {stream} kept changing; try again")]
    Conflict { stream: String },
    /// The store failed or refused (see [`StoreError`]'s own mapping).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Something on our side broke (HTTP 500; logged, never shown).
    #[error("internal error: {0}")]
    Internal(String),
}

impl CommandError {
    pub(crate) fn rejected<E: Classify + std::fmt::Display>(error: E) -> Self {
        Self::Rejected {
            kind: error.kind(),
            message: error.to_string(),
        }
    }
}

/// What a command did.
#[derive(Debug, Clone, PartialEq)]
pub struct Executed<E> {
    /// The events appended (empty: the command changed nothing).
    pub events: Vec<E>,
    /// The last position written, or the stream's last position when nothing was written:
    /// a reader that waits for it sees the command's effect.
    pub position: Option<u64>,
}

/// An aggregate's state as of its stream's last event.
#[derive(Debug)]
pub struct Loaded<A> {
    pub state: A,
    /// The stream's last version (`None`: no stream).
    pub version: Option<u64>,
    /// The stream's last position.
    pub position: Option<u64>,
    events: Vec<RecordedEvent>,
}

/// Folds a whole stream into its aggregate.
pub async fn load<A: Aggregate>(
    store: &SharedStore,
    stream: &str,
) -> Result<Loaded<A>, CommandError> {
    let mut state = A::default();
    let mut version = None;
    let mut position = None;
    let mut events = Vec::new();
    loop {
        let from = version.map_or(0, |v: u64| v + 1);
        let page = store
            .read_stream(stream, Some(from), Direction::Forwards, 1_000)
            .await?;
        if page.is_empty() {
            break;
        }
        for recorded in page {
            state.apply(&recorded.decode::<A::Event>()?);
            version = Some(recorded.version);
            position = Some(recorded.position);
            events.push(recorded);
        }
    }
    Ok(Loaded {
        state,
        version,
        position,
        events,
    })
}

/// Runs one command on one stream: load, decide, append, retry on conflict.
pub async fn execute<A>(
    store: &SharedStore,
    stream: &str,
    command: A::Command,
    ctx: &mut Context<'_>,
    metadata: &Metadata,
    idempotency_key: Option<&str>,
) -> Result<Executed<A::Event>, CommandError>
where
    A: Aggregate,
    A::Command: Clone,
    A::Error: Classify + std::fmt::Display,
{
    execute_typed::<A>(store, stream, command, ctx, metadata, idempotency_key)
        .await
        .map_err(|e| match e {
            Refused::Rule(rule) => CommandError::rejected(rule),
            Refused::Command(other) => other,
        })
}

/// Why [`execute_typed`] did not go through.
#[derive(Debug, thiserror::Error)]
pub enum Refused<E> {
    /// The aggregate's own refusal, kept typed for an edge that answers with its data (the
    /// SFS answers `locked` with the lock's end).
    #[error(transparent)]
    Rule(E),
    /// Anything else, as [`execute`] reports it.
    #[error(transparent)]
    Command(#[from] CommandError),
}

impl<E> From<StoreError> for Refused<E> {
    fn from(e: StoreError) -> Self {
        Self::Command(e.into())
    }
}

/// As [`execute`], but a refusal by the aggregate comes back as the aggregate's error.
pub async fn execute_typed<A>(
    store: &SharedStore,
    stream: &str,
    command: A::Command,
    ctx: &mut Context<'_>,
    metadata: &Metadata,
    idempotency_key: Option<&str>,
) -> Result<Executed<A::Event>, Refused<A::Error>>
where
    A: Aggregate,
    A::Command: Clone,
{
    decide_and_append::<A>(store, stream, None, command, ctx, metadata, idempotency_key).await
}

/// As [`execute`], deciding first on a state the caller loaded already (to check something of
/// its own) instead of loading the stream again; a lost race reloads as usual.
pub async fn execute_from<A>(
    store: &SharedStore,
    stream: &str,
    loaded: Loaded<A>,
    command: A::Command,
    ctx: &mut Context<'_>,
    metadata: &Metadata,
) -> Result<Executed<A::Event>, CommandError>
where
    A: Aggregate,
    A::Command: Clone,
    A::Error: Classify + std::fmt::Display,
{
    decide_and_append(store, stream, Some(loaded), command, ctx, metadata, None)
        .await
        .map_err(|e| match e {
            Refused::Rule(rule) => CommandError::rejected(rule),
            Refused::Command(other) => other,
        })
}

async fn decide_and_append<A>(
    store: &SharedStore,
    stream: &str,
    mut preloaded: Option<Loaded<A>>,
    command: A::Command,
    ctx: &mut Context<'_>,
    metadata: &Metadata,
    idempotency_key: Option<&str>,
) -> Result<Executed<A::Event>, Refused<A::Error>>
where
    A: Aggregate,
    A::Command: Clone,
{
    for attempt in 0..MAX_ATTEMPTS {
        if attempt > 0 {
            backoff(attempt).await;
        }
        let loaded = match preloaded.take() {
            Some(loaded) => loaded,
            None => load::<A>(store, stream).await?,
        };
        if let Some(key) = idempotency_key
            && let Some(done) = earlier_result::<A>(&loaded, stream, key)?
        {
            return Ok(done);
        }
        let events = loaded
            .state
            .decide(command.clone(), ctx)
            .map_err(Refused::Rule)?;
        if events.is_empty() {
            return Ok(Executed {
                events,
                position: loaded.position,
            });
        }
        let new_events = events
            .iter()
            .enumerate()
            .map(|(i, event)| {
                let id = match idempotency_key {
                    Some(key) => derived_event_id(key, stream, i),
                    None => new_event_id(),
                };
                NewEvent::from_domain(id, event, metadata.clone())
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let expected = loaded
            .version
            .map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
        match store.append(stream, expected, new_events).await {
            Ok(written) => {
                return Ok(Executed {
                    events,
                    position: Some(written.last_position),
                });
            }
            Err(StoreError::WrongExpectedVersion { .. }) => {
                tracing::debug!(stream, "lost a race on the stream; deciding again");
            }
            Err(other) => return Err(other.into()),
        }
    }
    Err(CommandError::Conflict {
        stream: stream.to_owned(),
    }
    .into())
}

/// An aggregate's state kept in memory between commands by one long-lived writer (an SFS
/// channel), so that each command costs an append but no reload of a stream that only grows.
/// The store stays the judge: every append expects the kept version, and a lost race (another
/// writer was first) drops the state and reloads it.
#[derive(Debug)]
pub struct Kept<A> {
    /// The state as of `version`.
    pub state: A,
    version: Option<u64>,
}

impl<A> From<Loaded<A>> for Kept<A> {
    fn from(loaded: Loaded<A>) -> Self {
        Self {
            state: loaded.state,
            version: loaded.version,
        }
    }
}

/// As [`execute_typed`], deciding on the state `kept` holds (loading it first when empty) and
/// keeping the state after the append for the next command.
pub async fn execute_kept<A>(
    store: &SharedStore,
    stream: &str,
    kept: &mut Option<Kept<A>>,
    command: A::Command,
    ctx: &mut Context<'_>,
    metadata: &Metadata,
) -> Result<Executed<A::Event>, Refused<A::Error>>
where
    A: Aggregate,
    A::Command: Clone,
{
    for attempt in 0..MAX_ATTEMPTS {
        if attempt > 0 {
            backoff(attempt).await;
        }
        let current = match kept.take() {
            Some(current) => current,
            None => load::<A>(store, stream).await?.into(),
        };
        let events = match current.state.decide(command.clone(), ctx) {
            Ok(events) => events,
            Err(rule) => {
                *kept = Some(current);
                return Err(Refused::Rule(rule));
            }
        };
        if events.is_empty() {
            *kept = Some(current);
            return Ok(Executed {
                events,
                position: None,
            });
        }
        let new_events = events
            .iter()
            .map(|event| NewEvent::from_domain(new_event_id(), event, metadata.clone()))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let expected = current
            .version
            .map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
        match store.append(stream, expected, new_events).await {
            Ok(written) => {
                let mut state = current.state;
                for event in &events {
                    state.apply(event);
                }
                *kept = Some(Kept {
                    state,
                    version: Some(written.next_expected_version),
                });
                return Ok(Executed {
                    events,
                    position: Some(written.last_position),
                });
            }
            // Another writer was first: decide again on the stream as it is.
            Err(StoreError::WrongExpectedVersion { .. }) => {}
            // Unknown whether it was written: forget the state, the next command reloads.
            Err(other) => return Err(other.into()),
        }
    }
    Err(CommandError::Conflict {
        stream: stream.to_owned(),
    }
    .into())
}

/// If the stream holds events appended under this idempotency key, the result of that append.
fn earlier_result<A: Aggregate>(
    loaded: &Loaded<A>,
    stream: &str,
    key: &str,
) -> Result<Option<Executed<A::Event>>, CommandError> {
    let first = derived_event_id(key, stream, 0);
    let Some(start) = loaded.events.iter().position(|e| e.event_id == first) else {
        return Ok(None);
    };
    let mut events = Vec::new();
    let mut position = None;
    for (i, recorded) in loaded.events.iter().skip(start).enumerate() {
        if recorded.event_id != derived_event_id(key, stream, i) {
            break;
        }
        events.push(recorded.decode::<A::Event>()?);
        position = Some(recorded.position);
    }
    Ok(Some(Executed { events, position }))
}

/// A fresh UUIDv7: time-ordered, so the store's id index stays append-friendly.
#[allow(clippy::disallowed_methods)] // this crate is the edge that makes ids
pub fn new_event_id() -> Uuid {
    Uuid::now_v7()
}

/// The id of the `index`-th event of a command sent with an idempotency key: a UUIDv8 built
/// from SHA-256(key ‖ 0 ‖ stream ‖ 0 ‖ index), so the same command on the same stream always
/// gets the same ids and the store recognises the retry.
pub fn derived_event_id(key: &str, stream: &str, index: usize) -> Uuid {
    let mut hash = Sha256::new();
    hash.update(key.as_bytes());
    hash.update([0]);
    hash.update(stream.as_bytes());
    hash.update([0]);
    hash.update((index as u64).to_be_bytes());
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(digest.get(..16).unwrap_or(&[0; 16]));
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// A short random pause before deciding again, so racing writers do not collide in lockstep.
async fn backoff(attempt: usize) {
    let mut jitter = [0u8; 1];
    let _ = getrandom::fill(&mut jitter);
    let [jitter] = jitter;
    let micros = 200 * attempt as u64 + u64::from(jitter) * 4;
    tokio::time::sleep(std::time::Duration::from_micros(micros)).await;
}

/// Fills `out` from the OS random generator.
pub fn random_bytes(out: &mut [u8]) -> Result<(), CommandError> {
    getrandom::fill(out)
        .map_err(|e| CommandError::Internal(format!("no randomness from the OS: {e}")))
}

impl<E> Executed<E> {
    /// Whether the command changed anything.
    pub fn changed(&self) -> bool {
        !self.events.is_empty()
    }
}
