//! countersign's integration tests: one binary whose modules drive whole flows across the
//! crates and processes, against the real PostgreSQL and SQLite.

// All of this binary is test code: failing loudly is what it is for.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod anonymous;
mod api;
mod app_login;
mod binary;
mod client_errors;
mod commands;
mod crash;
mod data_service;
mod device;
mod device_cli;
mod evidence;
mod feed;
mod idempotency;
mod leaks;
mod limits;
mod oidc_ciba;
mod oidc_clients;
mod oidc_login;
mod oidc_logout;
mod oidc_rp;
mod oidc_tokens;
mod push;
mod scale;
mod second_factor;
mod secure_channel;
mod session_nonce;
mod transactions_api;
mod transactions_device;
mod user_digest;
