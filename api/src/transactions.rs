//! Per-server transactions to sign: a business system creates one for a user (optionally for
//! one of their accounts), shows its QR code or lets the app find it, follows its status, and
//! fetches the evidence bundle once it is signed.
//!
//! Rules:
//! - the user and the named account are checked against their own streams (the write model),
//!   so a transaction can be created the moment its user or account exists;
//! - input that breaks a rule (bad base64, oversize, bad timeout) is refused before anything
//!   is written;
//! - with an `Idempotency-Key` the id comes from the key, so a retry of the same request lands
//!   on the same transaction and writes nothing; another request under the key is refused
//!   (422, [`crate::idempotency`]) before anything is looked up;
//! - a transaction is always looked up under the caller's own server: another tenant's id
//!   answers 404, exactly as one that does not exist;
//! - a read never shows an open transaction past its deadline: it records the expiry first.

use std::convert::Infallible;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use countersign_commands::load;
use countersign_domain::account::Account;
use countersign_domain::second_factor::SecondFactorKind;
use countersign_domain::transaction::{
    ANNOUNCE_MAX_CHARS, DEFAULT_TIMEOUT_SECS, MAX_DATA_BYTES, MAX_TEXT_BYTES, TransactionCreated,
    TransactionEvent, TransactionOrigin, TransactionRequest, TransactionStatus,
};
use countersign_domain::user::User;
use countersign_domain::{AccountId, AccountRef, TransactionId, TransactionRef, UserRef};
use countersign_projections::TransactionRow;
use countersign_protocol::qr::{QrKind, QrPayload};
use futures::Stream;

use crate::auth::Tenant;
use crate::error::{ApiError, Json, Path, Problem, Query};
use crate::idempotency::{IdempotencyKey, KeyedJson};
use crate::servers::written;
use crate::sessions::qr_answer;
use crate::state::AppState;
use crate::users::{bind_tenant_key, open_user, tenant_metadata, user_ref};
use crate::views::{
    CreateTransactionRequest, EvidenceFormat, EvidenceParams, QrParams, QrView, ReadParams,
    TransactionView,
};

/// The largest creation body: the data at its longest in base64, the text at its longest
/// with every byte escaped in JSON (`\u00XX` is six bytes), and room for the rest. Above the
/// API's general body limit, which would otherwise refuse data the domain allows.
pub const BODY_LIMIT: usize =
    MAX_DATA_BYTES.div_ceil(3) * 4 + MAX_TEXT_BYTES * 6 + ANNOUNCE_MAX_CHARS * 6 + 4096;

/// A transaction id from the path; one that does not parse names nothing here.
fn transaction_ref(tenant: &Tenant, id: &str) -> Result<TransactionRef, ApiError> {
    let id: TransactionId = id
        .parse()
        .map_err(|_| ApiError::NotFound("no such transaction".into()))?;
    Ok(TransactionRef::new(tenant.server, id))
}

/// The data as sent: standard base64 of at most [`MAX_DATA_BYTES`] bytes.
fn decode_data(text: &str) -> Result<Vec<u8>, ApiError> {
    // Checked before decoding, so an oversized body is refused without decoding it.
    if text.len() > MAX_DATA_BYTES.div_ceil(3) * 4 {
        return Err(ApiError::Invalid(format!(
            "data must decode to at most {MAX_DATA_BYTES} bytes"
        )));
    }
    STANDARD
        .decode(text)
        .map_err(|_| ApiError::Invalid("data must be standard base64".into()))
}

/// The user, who must be registered and not deleted.
async fn active_user(state: &AppState, user: &UserRef) -> Result<(), ApiError> {
    let loaded = load::<User>(state.store(), &user.stream()).await?;
    match loaded.state {
        User::Active(_) => Ok(()),
        _ => Err(ApiError::NotFound("no such user".into())),
    }
}

/// The named account, which must be an active account of `user`.
async fn users_account(state: &AppState, user: &UserRef, id: &str) -> Result<AccountId, ApiError> {
    let not_theirs =
        || ApiError::Invalid("account_id is not an active account of this user".into());
    let id: AccountId = id.parse().map_err(|_| not_theirs())?;
    let loaded =
        load::<Account>(state.store(), &AccountRef::new(user.server_id, id).stream()).await?;
    match loaded.state {
        Account::Active(_) if loaded.state.user() == Some(user.digest) => Ok(id),
        _ => Err(not_theirs()),
    }
}

/// A fresh random id, for a creation without an idempotency key.
fn random_id() -> Result<TransactionId, ApiError> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(ApiError::internal)?;
    Ok(TransactionId::from_bytes(id))
}

/// The row a `transaction.created` event makes, for answering a creation without waiting for
/// the read model.
fn created_row(created: &TransactionCreated, position: u64) -> TransactionRow {
    TransactionRow {
        server_id: created.transaction.server_id,
        transaction_id: created.transaction.transaction_id,
        user: created.user,
        account_id: created.account_id,
        origin: created.origin,
        status: TransactionStatus::Pending,
        content_type: created.content_type.clone(),
        data: created.data.clone(),
        text: created.text.clone(),
        announce_info: created.announce_info.clone(),
        created_at: created.created_at,
        expires_at: created.expires_at,
        presented_by: None,
        signed_by: None,
        factor: None,
        signed_at: None,
        rejected_by: None,
        rejected_at: None,
        expired_at: None,
        position,
    }
}

fn view(row: &TransactionRow, userid: Option<String>) -> TransactionView {
    TransactionView {
        transaction_id: row.transaction_id.to_string(),
        status: row.status.as_str().to_owned(),
        userid,
        account_id: row.account_id.map(|a| a.to_string()),
        content_type: row.content_type.clone(),
        data: STANDARD.encode(&row.data),
        text: row.text.clone(),
        announce_info: row.announce_info.clone(),
        origin: match row.origin {
            TransactionOrigin::Api => "api",
            TransactionOrigin::Device => "device",
        }
        .to_owned(),
        created_at: row.created_at.as_millis(),
        expires_at: row.expires_at.as_millis(),
        signed_by: row.signed_by.map(|a| a.to_string()),
        factor: row.factor.map(|f| {
            match f {
                SecondFactorKind::Pin => "pin",
                SecondFactorKind::Biometric => "biometric",
            }
            .to_owned()
        }),
        signed_at: row.signed_at.map(|t| t.as_millis()),
        rejected_at: row.rejected_at.map(|t| t.as_millis()),
        expired_at: row.expired_at.map(|t| t.as_millis()),
        position: row.position,
    }
}

/// The userid of the transaction's user; `None` once the user was deleted.
async fn userid_of(state: &AppState, row: &TransactionRow) -> Result<Option<String>, ApiError> {
    let Some(user) = state.reads().user(row.server_id, row.user).await? else {
        return Ok(None);
    };
    match open_user(state, &user).await {
        Ok(opened) => Ok(Some(opened.userid)),
        Err(ApiError::NotFound(_)) => Ok(None),
        Err(other) => Err(other),
    }
}

fn location(transaction: TransactionRef) -> Option<HeaderValue> {
    format!(
        "/v1/servers/{}/transactions/{}",
        transaction.server_id, transaction.transaction_id
    )
    .parse()
    .ok()
}

/// Creates a transaction for a user to sign and answers it.
#[utoipa::path(post, path = "/v1/servers/{server_id}/transactions", tag = "transactions",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe: the same key and request answer the same transaction; another request under the key is 422")),
    request_body = CreateTransactionRequest,
    responses(
        (status = 201, description = "Created (or created earlier under this idempotency key with this body)", body = TransactionView,
            headers(("Location" = String, description = "The transaction's URL"))),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such user, or not this key's server", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid: bad base64, too long, bad timeout, or not an account of this user; or the Idempotency-Key was used for another request (type urn:countersign:problem:idempotency-key-reused)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The store refuses writes for now", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn create_transaction(
    State(state): State<AppState>,
    tenant: Tenant,
    key: IdempotencyKey,
    body: KeyedJson<CreateTransactionRequest>,
) -> Result<Response, ApiError> {
    let request = body.value;
    let data = decode_data(&request.data)?;
    let user = user_ref(&state, &tenant, &request.userid).await?;
    let key = bind_tenant_key(&state, &tenant, &key, b"", &body.canonical).await?;
    active_user(&state, &user).await?;
    let account_id = match request.account_id.as_deref() {
        Some(id) => Some(users_account(&state, &user, id).await?),
        None => None,
    };
    let id = match key {
        Some(key) => {
            state
                .commands()
                .transactions
                .id_for_key(tenant.server, key)
                .await?
        }
        None => random_id()?,
    };
    let transaction = TransactionRef::new(tenant.server, id);
    let done = state
        .commands()
        .transactions
        .create(
            TransactionRequest {
                transaction,
                user: user.digest,
                account_id,
                data,
                content_type: request.content_type,
                text: request.text,
                announce_info: request.announce_info,
                timeout_secs: request.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS),
            },
            &tenant_metadata(&tenant),
        )
        .await?;
    let created = done.events.iter().find_map(|e| match e {
        TransactionEvent::Created(c) => Some(c),
        _ => None,
    });
    let row = match (created, done.position) {
        (Some(created), Some(position)) => created_row(created, position),
        // A retry whose creation was answered before: read what it is now.
        _ => {
            state.wait_for(done.position).await?;
            state
                .reads()
                .transaction(tenant.server, id)
                .await?
                .ok_or_else(|| ApiError::internal("a created transaction has no read model row"))?
        }
    };
    let mut response = written(
        StatusCode::CREATED,
        done.position,
        view(&row, Some(request.userid)),
    );
    if let Some(location) = location(transaction) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// The transaction's row, after recording its expiry if its deadline has passed and the
/// sweeper has not got to it yet (so a caller never sees an open transaction past it).
async fn current_row(
    state: &AppState,
    tenant: &Tenant,
    transaction: TransactionRef,
) -> Result<TransactionRow, ApiError> {
    let read = || async move {
        state
            .reads()
            .transaction(transaction.server_id, transaction.transaction_id)
            .await?
            .ok_or_else(|| ApiError::NotFound("no such transaction".into()))
    };
    let row = read().await?;
    if row.status.is_ended() || row.expires_at > state.clock().now() {
        return Ok(row);
    }
    let done = state
        .commands()
        .transactions
        .expire(transaction, &tenant_metadata(tenant))
        .await?;
    state.wait_for(done.position).await?;
    read().await
}

/// The transaction: what is to be signed, where it stands, and who signed it with which
/// factor.
#[utoipa::path(get, path = "/v1/servers/{server_id}/transactions/{transaction_id}", tag = "transactions",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("transaction_id" = String, Path, description = "32 hex digits"), ReadParams),
    responses(
        (status = 200, description = "The transaction", body = TransactionView),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such transaction", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "min_position beyond the log", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind min_position", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn get_transaction(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(path): Path<(String, String)>,
    Query(read): Query<ReadParams>,
) -> Result<Json<TransactionView>, ApiError> {
    let (_, id) = path;
    let transaction = transaction_ref(&tenant, &id)?;
    state.wait_for(read.min_position).await?;
    let row = current_row(&state, &tenant, transaction).await?;
    let userid = userid_of(&state, &row).await?;
    Ok(Json(view(&row, userid)))
}

/// The transaction's QR code (the app fetches the transaction itself with it) as JSON text
/// forms, raw CBOR, base64url, deep link, PNG or SVG.
#[utoipa::path(get, path = "/v1/servers/{server_id}/transactions/{transaction_id}/qr", tag = "transactions",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("transaction_id" = String, Path, description = "32 hex digits"), QrParams),
    responses(
        (status = 200, description = "The QR code", content((QrView = "application/json"), (String = "image/png"), (String = "image/svg+xml"), (String = "application/cbor"), (String = "text/plain; charset=utf-8"))),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such transaction", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Bad size, or min_position beyond the log", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind min_position", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn transaction_qr(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(path): Path<(String, String)>,
    Query(params): Query<QrParams>,
) -> Result<Response, ApiError> {
    let (_, id) = path;
    let transaction = transaction_ref(&tenant, &id)?;
    state.wait_for(params.min_position).await?;
    state
        .reads()
        .transaction(transaction.server_id, transaction.transaction_id)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such transaction".into()))?;
    let payload = QrPayload {
        kind: QrKind::Transaction,
        server_id: *tenant.server.as_bytes(),
        token: QrPayload::transaction_token(*transaction.transaction_id.as_bytes()),
        gateway: state.config().gateway_url.clone(),
        server_key_fingerprint: tenant.server_fingerprint,
    };
    qr_answer(
        &payload,
        params.format.unwrap_or_default(),
        params.size,
        StatusCode::OK,
        None,
    )
}

/// Server-sent events: the transaction's current status at once, then every change (`event:
/// status`, data `{"status": …, "position": …}`); the stream ends once it is signed, rejected
/// or expired.
#[utoipa::path(get, path = "/v1/servers/{server_id}/transactions/{transaction_id}/events", tag = "transactions",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("transaction_id" = String, Path, description = "32 hex digits"), ReadParams),
    responses(
        (status = 200, description = "An event stream", content_type = "text/event-stream", body = crate::views::SseEvent),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such transaction", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "min_position beyond the log", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind min_position", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn transaction_events(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(path): Path<(String, String)>,
    Query(read): Query<ReadParams>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let (_, id) = path;
    let transaction = transaction_ref(&tenant, &id)?;
    state.wait_for(read.min_position).await?;
    let first = state
        .reads()
        .transaction(transaction.server_id, transaction.transaction_id)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such transaction".into()))?;
    let read = move |state: AppState| async move {
        state
            .reads()
            .transaction(transaction.server_id, transaction.transaction_id)
            .await
            .ok()
            .flatten()
    };
    let row = crate::follow::Row {
        stream: transaction.stream(),
        first,
        read,
        step: |row| crate::follow::Step {
            value: row.status.as_str().to_owned(),
            position: row.position,
            last: row.status.is_ended(),
        },
    };
    crate::follow::follow(state, tenant, "status", row)
}

/// The evidence bundle of a signed transaction (`docs/evidence.md`): everything a third party
/// needs to verify, offline, that this account's device signed this data and text with a
/// fresh second factor, and that the log recorded it. Canonical CBOR, or JSON to read.
#[utoipa::path(get, path = "/v1/servers/{server_id}/transactions/{transaction_id}/evidence", tag = "transactions",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("transaction_id" = String, Path, description = "32 hex digits"), EvidenceParams),
    responses(
        (status = 200, description = "The bundle", content((String = "application/cbor"), (Object = "application/json"))),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such transaction", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not signed (the detail names its status): there is no evidence", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Not yet in a signed checkpoint; retry after Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn transaction_evidence(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(path): Path<(String, String)>,
    Query(params): Query<EvidenceParams>,
) -> Result<Response, ApiError> {
    let (_, id) = path;
    let transaction = transaction_ref(&tenant, &id)?;
    let evidence =
        countersign_projections::evidence::assemble(state.store(), state.audit(), transaction)
            .await?;
    match params.format.unwrap_or_default() {
        EvidenceFormat::Json => Ok(Json(evidence.to_json()).into_response()),
        EvidenceFormat::Cbor => {
            let bytes = evidence.to_cbor().map_err(ApiError::internal)?;
            let mut response = (StatusCode::OK, bytes).into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/cbor"),
            );
            Ok(response)
        }
    }
}
