//! The decide/apply contract every aggregate follows, and how its errors are classified.
//!
//! Rules:
//! - `decide` holds every business rule. It reads the current state and the command, never
//!   mutates, and returns the events to append (possibly none: an idempotent no-op) or an error.
//! - `apply` only assigns: it must accept any event `decide` ever emitted, in any stored
//!   version (after upcasting), without checking rules, because history is a fact.
//! - Time and randomness are inputs: `decide` reads the clock only as [`Context::now`] and gets
//!   random nonces only through [`Context::sealer`].

use crate::event::DomainEvent;
use crate::ids::Timestamp;
use crate::seal::Sealer;

/// An event-sourced aggregate: state rebuilt by folding `apply` over its stream.
pub trait Aggregate: Default {
    /// What callers ask for.
    type Command;
    /// What happened.
    type Event: DomainEvent;
    /// Why a command was refused.
    type Error: std::error::Error + Classify;

    /// Checks `command` against the current state and returns the events it causes.
    ///
    /// # Errors
    /// `Self::Error` when a rule refuses the command; no event is then appended.
    fn decide(
        &self,
        command: Self::Command,
        ctx: &mut Context<'_>,
    ) -> Result<Vec<Self::Event>, Self::Error>;

    /// Folds one event into the state.
    fn apply(&mut self, event: &Self::Event);

    /// Rebuilds the state from a whole stream.
    fn from_events<'e>(events: impl IntoIterator<Item = &'e Self::Event>) -> Self
    where
        Self::Event: 'e,
    {
        let mut state = Self::default();
        for event in events {
            state.apply(event);
        }
        state
    }
}

/// What `decide` may know about the world besides the state and the command.
pub struct Context<'a> {
    /// The time the command is decided at, read once at the edge.
    pub now: Timestamp,
    /// Seals personal data for events; `None` for aggregates that hold none (server), in which
    /// case an aggregate that needs one answers an internal error.
    pub sealer: Option<&'a mut (dyn Sealer + Send)>,
}

impl<'a> Context<'a> {
    /// A context without a sealer.
    #[must_use]
    pub fn new(now: Timestamp) -> Self {
        Self { now, sealer: None }
    }

    /// A context whose personal data is sealed by `sealer`.
    #[must_use]
    pub fn with_sealer(now: Timestamp, sealer: &'a mut (dyn Sealer + Send)) -> Self {
        Self {
            now,
            sealer: Some(sealer),
        }
    }
}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("now", &self.now)
            .field("sealer", &self.sealer.is_some())
            .finish()
    }
}

/// The class of a refusal, which the API maps to an HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller's input breaks a rule: 422 (400 for malformed syntax at the edge).
    Invalid,
    /// The state conflicts with the request (exists already, limit reached): 409.
    Conflict,
    /// The thing addressed does not exist: 404.
    NotFound,
    /// The thing addressed existed and was deleted: 410.
    Gone,
    /// Something broke that the caller cannot fix: 500, logged, never shown.
    Internal,
}

/// Errors that know their [`ErrorKind`].
pub trait Classify {
    /// The class of this error.
    fn kind(&self) -> ErrorKind;
}
