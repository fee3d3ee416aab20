//! The REST API business systems integrate with: virtual servers and their API keys (admin
//! key), users and accounts, enrolments, login sessions and transactions to sign with their QR
//! codes and evidence (per-server API keys), under `/v1`, described by `/openapi.json`.
//!
//! Every handler is three steps: extract, call a command (writes) or a read model (reads), map
//! the result. Writes answer the log position they reached; reads accept `min_position` and
//! wait, bounded, until their read model has processed it (read-your-writes without sleeping).
//! Errors are RFC 9457 problem+json (see [`error`]). The caller's session nonce belongs in the
//! `X-Nonce` header ([`sessions`]); its older path form still works, so request logs name the
//! matched route, never the path.

pub mod audit;
pub mod auth;
pub mod error;
pub mod expiry;
pub mod feed;
mod follow;
pub mod idempotency;
pub mod metrics;
pub mod oidc_clients;
pub mod openapi;
pub mod provoke;
pub mod qr;
pub mod servers;
pub mod sessions;
pub mod state;
pub mod streams;
pub mod transactions;
pub mod users;
pub mod views;

use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, StatusCode};
use axum::routing::{get, put};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;

pub use state::{ApiConfig, AppState};

/// The header carrying a request's id (taken from the caller or made here).
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The header every write answer carries: the log position it reached.
pub const POSITION_HEADER: HeaderName = HeaderName::from_static("x-countersign-position");

/// The whole API as a router, ready to serve or to drive with `oneshot` in tests.
pub fn router(state: AppState) -> Router {
    let config = state.config();
    let transaction_body_limit = config.body_limit.max(transactions::BODY_LIMIT);
    let v1 = Router::new()
        .route(
            "/servers",
            get(servers::list_servers).post(servers::create_server),
        )
        .route(
            "/servers/{server_id}",
            get(servers::get_server)
                .patch(servers::update_server)
                .delete(servers::delete_server),
        )
        .route(
            "/servers/{server_id}/api-keys",
            get(servers::list_api_keys).post(servers::issue_api_key),
        )
        .route(
            "/servers/{server_id}/api-keys/{key_id}",
            axum::routing::delete(servers::revoke_api_key),
        )
        .route(
            "/servers/{server_id}/sfs-keys",
            axum::routing::post(servers::trust_sfs_key),
        )
        .route(
            "/servers/{server_id}/sfs-keys/{key_id}",
            axum::routing::delete(servers::distrust_sfs_key),
        )
        .route(
            "/servers/{server_id}/oidc/clients",
            get(oidc_clients::list_clients).post(oidc_clients::register_client),
        )
        .route(
            "/servers/{server_id}/oidc/clients/{client_id}",
            get(oidc_clients::get_client)
                .patch(oidc_clients::update_client)
                .delete(oidc_clients::remove_client),
        )
        .route(
            "/servers/{server_id}/oidc/clients/{client_id}/secret",
            axum::routing::post(oidc_clients::rotate_client_secret),
        )
        .route(
            "/servers/{server_id}/oidc/keys",
            get(oidc_clients::list_keys).post(oidc_clients::rotate_key),
        )
        .route("/servers/{server_id}/users", get(users::list_users))
        .route(
            "/servers/{server_id}/users/{userid}",
            put(users::put_user)
                .get(users::get_user)
                .delete(users::delete_user),
        )
        .route(
            "/servers/{server_id}/users/{userid}/accounts",
            get(users::list_accounts),
        )
        .route(
            "/servers/{server_id}/users/{userid}/accounts/{account_id}",
            axum::routing::delete(users::delete_account),
        )
        .route(
            "/servers/{server_id}/enrolments",
            axum::routing::post(users::create_enrolment),
        )
        .route(
            "/servers/{server_id}/enrolments/{enrolment_id}",
            get(users::get_enrolment),
        )
        .route(
            "/servers/{server_id}/session",
            put(sessions::put_session_by_header)
                .get(sessions::get_session_by_header)
                .delete(sessions::delete_session_by_header),
        )
        .route(
            "/servers/{server_id}/session/provoke",
            axum::routing::post(provoke::provoke_session),
        )
        .route(
            "/servers/{server_id}/users/{userid}/provoke",
            axum::routing::post(provoke::provoke_user),
        )
        .route(
            "/servers/{server_id}/users/{userid}/accounts/{account_id}/provoke",
            axum::routing::post(provoke::provoke_account),
        )
        .route(
            "/servers/{server_id}/session/qr",
            get(sessions::session_qr_by_header),
        )
        .route(
            "/servers/{server_id}/session/events",
            get(sessions::session_events_by_header),
        )
        .route(
            "/servers/{server_id}/sessions/{nonce}",
            put(sessions::put_session)
                .get(sessions::get_session)
                .delete(sessions::delete_session),
        )
        .route(
            "/servers/{server_id}/sessions/{nonce}/qr",
            get(sessions::session_qr),
        )
        .route(
            "/servers/{server_id}/sessions/{nonce}/events",
            get(sessions::session_events),
        )
        .route(
            "/servers/{server_id}/transactions/{transaction_id}",
            get(transactions::get_transaction),
        )
        .route(
            "/servers/{server_id}/transactions/{transaction_id}/qr",
            get(transactions::transaction_qr),
        )
        .route(
            "/servers/{server_id}/transactions/{transaction_id}/events",
            get(transactions::transaction_events),
        )
        .route(
            "/servers/{server_id}/transactions/{transaction_id}/evidence",
            get(transactions::transaction_evidence),
        )
        .route("/audit/checkpoint", get(audit::checkpoint))
        .route("/audit/key", get(audit::key))
        .route("/audit/proofs/inclusion", get(audit::inclusion))
        .route("/audit/proofs/consistency", get(audit::consistency))
        .route(
            "/servers/{server_id}/audit/leaves/{position}",
            get(audit::leaf),
        )
        .route("/servers/{server_id}/events", get(feed::events))
        .route(
            "/servers/{server_id}/events/stream",
            get(feed::event_stream),
        )
        // The routes above take the default body limit and refuse a longer declared
        // Content-Length at once (a layer wraps only the routes added before it); the
        // transaction creation below takes its own, larger, limit the same way.
        .layer(DefaultBodyLimit::max(config.body_limit))
        .layer(axum::middleware::from_fn_with_state(
            config.body_limit,
            error::refuse_oversize_body,
        ))
        .route(
            "/servers/{server_id}/transactions",
            axum::routing::post(transactions::create_transaction)
                .layer(DefaultBodyLimit::max(transaction_body_limit))
                .layer(axum::middleware::from_fn_with_state(
                    transaction_body_limit,
                    error::refuse_oversize_body,
                )),
        );
    Router::new()
        .nest("/v1", v1)
        .route("/openapi.json", get(openapi::document))
        .route("/healthz", get(state::healthz))
        .route("/readyz", get(state::readyz))
        .route("/metrics", get(metrics::scrape))
        .fallback(error::not_found)
        .layer(DefaultBodyLimit::max(config.body_limit))
        .layer(axum::middleware::from_fn(error::refuse_oversize_head))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            config.request_timeout,
        ))
        // Outside the timeout, so that its 408 is problem+json too.
        .layer(axum::middleware::from_fn(error::problem_layer))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(state)
}

/// How long a read waits for `min_position` unless configured otherwise.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(5);
