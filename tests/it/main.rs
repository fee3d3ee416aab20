//! countersign's integration tests: one binary whose modules drive whole flows across the
//! crates and processes, against the real PostgreSQL and SQLite.

mod binary;
mod crash;
