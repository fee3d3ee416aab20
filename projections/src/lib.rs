//! Everything built from the event log rather than written directly: the read models of the
//! business API (`read_models`) and the Merkle audit tree (`audit`). Projections keep their
//! checkpoint in the same transaction as their rows, so a restart resumes exactly where the
//! last commit left off, and rebuilding from position 0 gives the same result as incremental
//! processing.

pub mod audit;
pub mod evidence;
pub mod read_models;

pub use read_models::{
    AccountRow, ApiKeyRow, EnrolmentRow, EventFeed, HistoryRow, OidcClientRow, OidcKeyRow,
    PageSender, ProjectionError, ReadModels, ServerRow, SessionRow, SessionState, TransactionRow,
    UserRow, store_feed,
};
