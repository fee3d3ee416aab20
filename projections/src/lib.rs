//! Everything built from the event log rather than written directly: today the Merkle audit
//! tree (`audit`). Projections keep their checkpoint in the same transaction as their rows,
//! so a restart resumes exactly where the last commit left off, and rebuilding from position
//! 0 gives the same result as incremental processing.

pub mod audit;
