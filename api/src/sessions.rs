//! Per-server login sessions, addressed by the caller's nonce (the nextAuth getQrLogin /
//! getSession pair). The nonce is checked (≥ 128 bits) and turned into the session's hsid at
//! once; it is never stored or logged. Session reads are the hottest path of the API: one
//! primary-key lookup in the sessions read model, plus the user's row once logged in.
//!
//! The nonce is the session's bearer secret, so it belongs in a header, never in a URL:
//! reverse proxies, load balancers and access logs record paths (OWASP ASVS 3.1.1). Every
//! session call therefore has two forms, answering alike:
//! - `…/session` with the nonce in `X-Nonce` ([`NonceHeader`]): the form to use;
//! - `…/sessions/{nonce}`, the first form, kept working for existing callers and marked
//!   deprecated in the OpenAPI document.

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use countersign_commands::session::SessionOptions;
use countersign_domain::session::SessionEvent;
use countersign_domain::{SessionRef, Timestamp};
use countersign_projections::SessionRow;
use countersign_protocol::qr::{QrKind, QrPayload};
use futures::Stream;

use crate::auth::Tenant;
use crate::error::{ApiError, Json, Path, Problem, Query};
use crate::idempotency::{IdempotencyKey, canonical_json};
use crate::servers::written;
use crate::state::AppState;
use crate::users::{bind_tenant_key, open_user, tenant_metadata, user_ref};
use crate::views::{
    PutSessionRequest, QrFormat, QrParams, QrView, ReadParams, SessionOpenedView, SessionView,
};

fn image_error(error: crate::qr::QrImageError) -> ApiError {
    match error {
        crate::qr::QrImageError::Internal(cause) => ApiError::Internal(cause),
        other => ApiError::Invalid(other.to_string()),
    }
}

/// Serves a QR payload in the requested form.
pub(crate) fn qr_answer(
    payload: &QrPayload,
    format: QrFormat,
    size: Option<u32>,
    status: StatusCode,
    position: Option<u64>,
) -> Result<Response, ApiError> {
    let size = size.unwrap_or(256);
    let (content_type, body): (&'static str, Vec<u8>) = match format {
        QrFormat::Json => {
            let view = QrView {
                base64url: payload.to_base64url(),
                deep_link: payload.deep_link(),
            };
            return Ok(written(status, position, view));
        }
        QrFormat::Raw => ("application/cbor", payload.encode()),
        QrFormat::Base64url => (
            "text/plain; charset=utf-8",
            payload.to_base64url().into_bytes(),
        ),
        QrFormat::Link => (
            "text/plain; charset=utf-8",
            payload.deep_link().into_bytes(),
        ),
        QrFormat::Png => (
            "image/png",
            crate::qr::png(&payload.encode(), size).map_err(image_error)?,
        ),
        QrFormat::Svg => (
            "image/svg+xml",
            crate::qr::svg(&payload.encode(), size)
                .map_err(image_error)?
                .into_bytes(),
        ),
    };
    let mut response = (status, body).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(position) = position
        && let Ok(value) = position.to_string().parse()
    {
        response.headers_mut().insert(crate::POSITION_HEADER, value);
    }
    Ok(response)
}

/// The header that carries the session nonce in the header form of the session calls.
pub const NONCE_HEADER: HeaderName = HeaderName::from_static("x-nonce");

/// The session nonce from the `X-Nonce` header (400 when there is none). Whether it is strong
/// enough is checked with the path form's rules when it is turned into the session's id.
pub struct NonceHeader(pub String);

impl std::fmt::Debug for NonceHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NonceHeader(..)")
    }
}

impl<S: Send + Sync> FromRequestParts<S> for NonceHeader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let mut values = parts.headers.get_all(NONCE_HEADER).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return Err(ApiError::BadRequest(
                "the session nonce goes in exactly one X-Nonce header".into(),
            ));
        };
        let nonce = value
            .to_str()
            .map_err(|_| ApiError::BadRequest("X-Nonce must be visible ASCII".into()))?;
        Ok(Self(nonce.trim().to_owned()))
    }
}

/// The session a nonce names on the tenant's server.
pub(crate) async fn session_ref(
    state: &AppState,
    tenant: &Tenant,
    nonce: &str,
) -> Result<SessionRef, ApiError> {
    Ok(state
        .commands()
        .sessions
        .session_ref(tenant.server, nonce)
        .await?)
}

/// Binds the `Idempotency-Key` to `session` and the request's canonical body.
pub(crate) async fn bind_session_key<'k>(
    state: &AppState,
    tenant: &Tenant,
    key: &'k IdempotencyKey,
    session: SessionRef,
    body: &[u8],
) -> Result<Option<&'k str>, ApiError> {
    bind_tenant_key(
        state,
        tenant,
        key,
        session.hsid.as_bytes(),
        &canonical_json(body),
    )
    .await
}

/// When the session a command opened expires, if it opened one.
pub(crate) fn opened_until(events: &[SessionEvent]) -> Option<Timestamp> {
    events.iter().find_map(|e| match e {
        SessionEvent::Opened(o) => Some(o.expires_at),
        _ => None,
    })
}

fn login_qr(state: &AppState, tenant: &Tenant, session: SessionRef) -> QrPayload {
    QrPayload {
        kind: QrKind::Login,
        server_id: *session.server_id.as_bytes(),
        token: *session.hsid.as_bytes(),
        gateway: state.config().gateway_url.clone(),
        server_key_fingerprint: tenant.server_fingerprint,
    }
}

/// An optional JSON body: empty means all defaults.
pub(crate) fn optional_json<T: serde::de::DeserializeOwned + Default>(
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<T, ApiError> {
    if body.is_empty() {
        return Ok(T::default());
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| {
            let mime = mime.trim();
            mime == "application/json" || mime.ends_with("+json")
        });
    if !is_json {
        return Err(ApiError::UnsupportedMediaType);
    }
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::Invalid(e.to_string()),
        _ => ApiError::BadRequest(e.to_string()),
    })
}

/// The path form of [`put_session_by_header`] (deprecated: the nonce ends up in access logs).
#[utoipa::path(put, path = "/v1/servers/{server_id}/sessions/{nonce}", tag = "sessions",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("nonce" = String, Path, description = "The caller's secret session nonce: hex or base64 carrying ≥ 128 bits"),
           QrParams,
           ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe; another request under the key is 422")),
    request_body(content = Option<PutSessionRequest>, description = "May be empty"),
    responses(
        (status = 200, description = "Already open with these options", content((SessionOpenedView = "application/json"), (String = "image/png"), (String = "image/svg+xml"), (String = "application/cbor"), (String = "text/plain; charset=utf-8"))),
        (status = 201, description = "Opened", content((SessionOpenedView = "application/json"), (String = "image/png"), (String = "image/svg+xml"), (String = "application/cbor"), (String = "text/plain; charset=utf-8"))),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not this key's server", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Open with other options", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The session has ended", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Weak nonce, invalid options, or the Idempotency-Key was used for another request (type urn:countersign:problem:idempotency-key-reused)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn put_session(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(path): Path<(String, String)>,
    Query(params): Query<QrParams>,
    key: IdempotencyKey,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (_, nonce) = path;
    open_session(&state, &tenant, &nonce, params, &key, &headers, &body).await
}

/// Opens a login session for the nonce in `X-Nonce` (or finds it open with the same options)
/// and answers its login QR code.
#[utoipa::path(put, path = "/v1/servers/{server_id}/session", tag = "sessions",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("X-Nonce" = String, Header, description = "The caller's secret session nonce: hex or base64 carrying ≥ 128 bits"),
           QrParams,
           ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe; another request under the key is 422")),
    request_body(content = Option<PutSessionRequest>, description = "May be empty"),
    responses(
        (status = 200, description = "Already open with these options", content((SessionOpenedView = "application/json"), (String = "image/png"), (String = "image/svg+xml"), (String = "application/cbor"), (String = "text/plain; charset=utf-8"))),
        (status = 201, description = "Opened", content((SessionOpenedView = "application/json"), (String = "image/png"), (String = "image/svg+xml"), (String = "application/cbor"), (String = "text/plain; charset=utf-8"))),
        (status = 400, description = "Malformed, or no X-Nonce (header form)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not this key's server", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Open with other options", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The session has ended", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Weak nonce, invalid options, or the Idempotency-Key was used for another request (type urn:countersign:problem:idempotency-key-reused)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn put_session_by_header(
    State(state): State<AppState>,
    tenant: Tenant,
    NonceHeader(nonce): NonceHeader,
    Query(params): Query<QrParams>,
    key: IdempotencyKey,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    open_session(&state, &tenant, &nonce, params, &key, &headers, &body).await
}

async fn open_session(
    state: &AppState,
    tenant: &Tenant,
    nonce: &str,
    params: QrParams,
    key: &IdempotencyKey,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let request: PutSessionRequest = optional_json(headers, body)?;
    let session = session_ref(state, tenant, nonce).await?;
    let user = match request.userid.as_deref() {
        Some(userid) => Some(user_ref(state, tenant, userid).await?.digest),
        None => None,
    };
    let key = bind_session_key(state, tenant, key, session, body).await?;
    let options = SessionOptions {
        ping_time_secs: request.ping_time_secs,
        announce_info: request.announce_info,
        session_info: request.session_info,
        user,
    };
    let done = state
        .commands()
        .sessions
        .open(session, options, &tenant_metadata(tenant), key)
        .await?;
    let opened = opened_until(&done.events);
    let status = if opened.is_some() {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let payload = login_qr(state, tenant, session);
    let format = params.format.unwrap_or_default();
    if format != QrFormat::Json {
        return qr_answer(&payload, format, params.size, status, done.position);
    }
    let (state_name, expires_at) = match opened {
        Some(at) => ("pending".to_owned(), at.as_millis()),
        None => {
            state.wait_for(done.position).await?;
            let row = state
                .reads()
                .session_state(session.server_id, session.hsid)
                .await?
                .ok_or_else(|| ApiError::internal("an open session has no read model row"))?;
            (row.state.clone(), row.expires_at.as_millis())
        }
    };
    Ok(written(
        status,
        done.position,
        SessionOpenedView {
            state: state_name,
            expires_at,
            qr: QrView {
                base64url: payload.to_base64url(),
                deep_link: payload.deep_link(),
            },
            position: done.position,
        },
    ))
}

fn is_waiting(row: &SessionRow) -> bool {
    matches!(row.state.as_str(), "pending" | "scanned")
}

fn is_final(row: &SessionRow) -> bool {
    matches!(
        row.state.as_str(),
        "logged_out" | "aborted" | "expired" | "failed"
    ) || (row.state == "logged_in" && row.ping_time_secs == 0)
}

async fn session_view(state: &AppState, row: &SessionRow) -> Result<SessionView, ApiError> {
    let mut view = SessionView {
        state: row.state.clone(),
        kind: if row.app_login { "app_login" } else { "login" }.to_owned(),
        userid: None,
        account_id: row.account_id.map(|a| a.to_string()),
        attributes: None,
        can_provoke: false,
        continuous: row.ping_time_secs > 0,
        expires_at: row.expires_at.as_millis(),
        position: row.last_position,
    };
    if let Some(digest) = row.user_digest.or(row.intended_user) {
        let accounts = state.reads().accounts(row.server_id, digest).await?;
        view.can_provoke = row.can_provoke() && !accounts.is_empty();
        if row.user_digest.is_some()
            && let Some(user) = state.reads().user(row.server_id, digest).await?
        {
            let opened = open_user(state, &user).await?;
            view.userid = Some(opened.userid);
            view.attributes = Some(opened.attributes);
        }
    }
    Ok(view)
}

/// The session's row, after recording its expiry if its deadline has passed and the sweeper
/// has not got to it yet (so a caller never sees a pending session past its deadline).
async fn current_row(
    state: &AppState,
    tenant: &Tenant,
    session: SessionRef,
) -> Result<SessionRow, ApiError> {
    let mut row = state
        .reads()
        .session_state(session.server_id, session.hsid)
        .await?;
    // An AppLogin is written by the app, not by the caller: its backend learns of it from the
    // app, perhaps before the read model saw the session or its login. A session absent, or an
    // AppLogin not logged in yet, is read again once the read model holds everything
    // committed before this request; a session still absent then does not exist.
    if row.as_ref().is_none_or(|r| r.app_login && is_waiting(r)) {
        if let Some(head) = state.store().last_position().await? {
            state.wait_for(Some(head)).await?;
        }
        row = state
            .reads()
            .session_state(session.server_id, session.hsid)
            .await?;
    }
    let row = row.ok_or_else(|| ApiError::NotFound("no such session".into()))?;
    let now = state.clock().now();
    let due = (is_waiting(&row) && row.expires_at <= now)
        || (row.state == "logged_in" && row.ping_deadline.is_some_and(|d| d <= now));
    if !due {
        return Ok(row);
    }
    let done = state
        .commands()
        .sessions
        .expire(session, &tenant_metadata(tenant))
        .await?;
    state.wait_for(done.position).await?;
    state
        .reads()
        .session_state(session.server_id, session.hsid)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such session".into()))
}

/// The path form of [`get_session_by_header`] (deprecated: the nonce ends up in access logs).
#[utoipa::path(get, path = "/v1/servers/{server_id}/sessions/{nonce}", tag = "sessions",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("nonce" = String, Path, description = "The caller's secret session nonce"), ReadParams),
    responses(
        (status = 200, description = "The session", body = SessionView),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Weak nonce", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind min_position", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn get_session(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(path): Path<(String, String)>,
    Query(read): Query<ReadParams>,
) -> Result<Json<SessionView>, ApiError> {
    let (_, nonce) = path;
    read_session(state, tenant, &nonce, read).await
}

/// The session named by `X-Nonce`: who logged in with which account, and whether a login can be
/// pushed.
#[utoipa::path(get, path = "/v1/servers/{server_id}/session", tag = "sessions",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("X-Nonce" = String, Header, description = "The caller's secret session nonce"), ReadParams),
    responses(
        (status = 200, description = "The session", body = SessionView),
        (status = 400, description = "Malformed, or no X-Nonce", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Weak nonce", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind min_position", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn get_session_by_header(
    State(state): State<AppState>,
    tenant: Tenant,
    NonceHeader(nonce): NonceHeader,
    Query(read): Query<ReadParams>,
) -> Result<Json<SessionView>, ApiError> {
    read_session(state, tenant, &nonce, read).await
}

async fn read_session(
    state: AppState,
    tenant: Tenant,
    nonce: &str,
    read: ReadParams,
) -> Result<Json<SessionView>, ApiError> {
    let session = session_ref(&state, &tenant, nonce).await?;
    state.wait_for(read.min_position).await?;
    let row = current_row(&state, &tenant, session).await?;
    Ok(Json(session_view(&state, &row).await?))
}

/// The path form of [`delete_session_by_header`] (deprecated: the nonce ends up in access logs).
#[utoipa::path(delete, path = "/v1/servers/{server_id}/sessions/{nonce}", tag = "sessions",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("nonce" = String, Path, description = "The caller's secret session nonce")),
    responses(
        (status = 200, description = "Ended", body = SessionView),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Weak nonce", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn delete_session(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(path): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (_, nonce) = path;
    end_session(state, tenant, &nonce).await
}

/// Ends the session named by `X-Nonce`: logs it out, or aborts it before login. Ending an ended
/// session changes nothing.
#[utoipa::path(delete, path = "/v1/servers/{server_id}/session", tag = "sessions",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("X-Nonce" = String, Header, description = "The caller's secret session nonce")),
    responses(
        (status = 200, description = "Ended", body = SessionView),
        (status = 400, description = "No X-Nonce", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Weak nonce", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn delete_session_by_header(
    State(state): State<AppState>,
    tenant: Tenant,
    NonceHeader(nonce): NonceHeader,
) -> Result<Response, ApiError> {
    end_session(state, tenant, &nonce).await
}

async fn end_session(state: AppState, tenant: Tenant, nonce: &str) -> Result<Response, ApiError> {
    let session = session_ref(&state, &tenant, nonce).await?;
    let done = state
        .commands()
        .sessions
        .end_by_server(session, &tenant_metadata(&tenant))
        .await?;
    state.wait_for(done.position).await?;
    let row = state
        .reads()
        .session_state(session.server_id, session.hsid)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such session".into()))?;
    let view = session_view(&state, &row).await?;
    Ok(written(StatusCode::OK, done.position, view))
}

/// The path form of [`session_qr_by_header`] (deprecated: the nonce ends up in access logs).
#[utoipa::path(get, path = "/v1/servers/{server_id}/sessions/{nonce}/qr", tag = "sessions",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("nonce" = String, Path, description = "The caller's secret session nonce"), QrParams),
    responses(
        (status = 200, description = "The QR code", content((QrView = "application/json"), (String = "image/png"), (String = "image/svg+xml"), (String = "application/cbor"), (String = "text/plain; charset=utf-8"))),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Weak nonce or bad size", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn session_qr(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(path): Path<(String, String)>,
    Query(params): Query<QrParams>,
) -> Result<Response, ApiError> {
    let (_, nonce) = path;
    qr_of_session(state, tenant, &nonce, params).await
}

/// The login QR code of the session named by `X-Nonce` as JSON text forms, raw CBOR, base64url,
/// deep link, PNG or SVG.
#[utoipa::path(get, path = "/v1/servers/{server_id}/session/qr", tag = "sessions",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("X-Nonce" = String, Header, description = "The caller's secret session nonce"), QrParams),
    responses(
        (status = 200, description = "The QR code", content((QrView = "application/json"), (String = "image/png"), (String = "image/svg+xml"), (String = "application/cbor"), (String = "text/plain; charset=utf-8"))),
        (status = 400, description = "Malformed, or no X-Nonce", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Weak nonce or bad size", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn session_qr_by_header(
    State(state): State<AppState>,
    tenant: Tenant,
    NonceHeader(nonce): NonceHeader,
    Query(params): Query<QrParams>,
) -> Result<Response, ApiError> {
    qr_of_session(state, tenant, &nonce, params).await
}

async fn qr_of_session(
    state: AppState,
    tenant: Tenant,
    nonce: &str,
    params: QrParams,
) -> Result<Response, ApiError> {
    let session = session_ref(&state, &tenant, nonce).await?;
    state.wait_for(params.min_position).await?;
    state
        .reads()
        .session_state(session.server_id, session.hsid)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such session".into()))?;
    let payload = login_qr(&state, &tenant, session);
    qr_answer(
        &payload,
        params.format.unwrap_or_default(),
        params.size,
        StatusCode::OK,
        None,
    )
}

/// The path form of [`session_events_by_header`] (deprecated: the nonce ends up in access logs).
#[utoipa::path(get, path = "/v1/servers/{server_id}/sessions/{nonce}/events", tag = "sessions",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("nonce" = String, Path, description = "The caller's secret session nonce"), ReadParams),
    responses(
        (status = 200, description = "An event stream", content_type = "text/event-stream", body = crate::views::SseEvent),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Weak nonce, or min_position beyond the log", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind min_position", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn session_events(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(path): Path<(String, String)>,
    Query(read): Query<ReadParams>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let (_, nonce) = path;
    follow_session(state, tenant, nonce, read).await
}

/// Server-sent events of the session named by `X-Nonce`: its current state at once, then every
/// change (`event: state`, data `{"state": …, "position": …}`); the stream ends after a final
/// state.
#[utoipa::path(get, path = "/v1/servers/{server_id}/session/events", tag = "sessions",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("X-Nonce" = String, Header, description = "The caller's secret session nonce"), ReadParams),
    responses(
        (status = 200, description = "An event stream", content_type = "text/event-stream", body = crate::views::SseEvent),
        (status = 400, description = "Malformed, or no X-Nonce", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Weak nonce, or min_position beyond the log", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind min_position", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn session_events_by_header(
    State(state): State<AppState>,
    tenant: Tenant,
    NonceHeader(nonce): NonceHeader,
    Query(read): Query<ReadParams>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    follow_session(state, tenant, nonce, read).await
}

async fn follow_session(
    state: AppState,
    tenant: Tenant,
    nonce: String,
    read: ReadParams,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let session = session_ref(&state, &tenant, &nonce).await?;
    state.wait_for(read.min_position).await?;
    let first = state
        .reads()
        .session_state(session.server_id, session.hsid)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such session".into()))?;
    let read = move |state: AppState| async move {
        state
            .reads()
            .session_state(session.server_id, session.hsid)
            .await
            .ok()
            .flatten()
    };
    let row = crate::follow::Row {
        stream: session.stream(),
        first,
        read,
        step: |row| crate::follow::Step {
            value: row.state.clone(),
            position: row.last_position,
            last: is_final(row),
        },
    };
    crate::follow::follow(state, tenant, "state", row)
}
