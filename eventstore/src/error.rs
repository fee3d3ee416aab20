//! The store's one error type. Each variant says how an API maps it.

/// Why the store refused or failed an operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The stream is not at the expected version (HTTP 409, retryable after re-reading).
    #[error(
        "wrong expected version on stream {stream}: expected {expected}, stream is at {actual}"
    )]
    WrongExpectedVersion {
        stream: String,
        expected: String,
        actual: String,
    },
    /// Some of the event ids were already used differently (HTTP 409, not retryable).
    #[error("event id {event_id} was already appended elsewhere")]
    DuplicateEventId { event_id: uuid::Uuid },
    /// The caller asked for something the store never does (HTTP 400/422).
    #[error("invalid append: {reason}")]
    InvalidAppend { reason: String },
    /// A stored event could not be decoded (HTTP 500; the log keeps the bytes untouched).
    #[error("event at position {position} ({event_type}) does not decode: {reason}")]
    Decode {
        position: u64,
        event_type: String,
        reason: String,
    },
    /// The stored log breaks an invariant (a gap, a negative position): the database was
    /// changed behind the store's back (HTTP 500; `countersign audit verify` finds where).
    #[error("the event log is damaged: {0}")]
    Corrupt(String),
    /// The database URL or options are wrong (a startup error).
    #[error("{0}")]
    Config(String),
    /// The store is shutting down or its writer stopped (HTTP 503).
    #[error("the event store is not accepting writes: {0}")]
    Unavailable(String),
    /// The database failed (HTTP 500, logged, never shown to callers).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Applying the schema failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// Whether retrying the same call may succeed (conflicts, transient database failures).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::WrongExpectedVersion { .. } | Self::Unavailable(_) | Self::Database(_)
        )
    }
}
