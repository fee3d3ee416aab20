//! The API's one error type and its RFC 9457 `application/problem+json` answers.
//!
//! Rules:
//! - every error answer, including the framework's own (unknown route, wrong method, body too
//!   large, timeout), is problem+json: [`problem_layer`] rewrites any other error body;
//! - the caller's mistakes (400/413/415/422), missing rights (401), absence (404 — also for
//!   another tenant's objects, so ids cannot be probed), conflicts (409), gone (410) and "not
//!   yet" (503 with `Retry-After`) are kept apart;
//! - 5xx bodies say nothing internal; the cause goes to the log with the request id; only
//!   they log at ERROR, a caller's mistake never does;
//! - a number the store cannot hold (a log position above [`MAX_POSITION`]) is the caller's
//!   mistake (400), refused before it reaches a query;
//! - a request is refused before its body is read when its head is too large
//!   ([`refuse_oversize_head`]: 414, 431) or its `Content-Length` exceeds the route's body
//!   limit ([`refuse_oversize_body`]: 413);
//! - no message ever repeats a secret (tokens, nonces) or personal data from the request.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use countersign_commands::CommandError;
use countersign_domain::ErrorKind;
use countersign_eventstore::StoreError;
use countersign_projections::ProjectionError;
use countersign_projections::evidence::EvidenceAssemblyError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

/// The media type of every error answer.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An RFC 9457 problem document.
#[derive(Debug, Clone, Serialize, serde::Deserialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem, e.g. `urn:countersign:problem:not-found`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the kind.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
}

/// Everything a handler can answer instead of success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed syntax: bad JSON, a bad query string (400).
    #[error("{0}")]
    BadRequest(String),
    /// Well-formed input that breaks a rule (422).
    #[error("{0}")]
    Invalid(String),
    /// No or a wrong credential (401).
    #[error("a valid bearer token is required")]
    Unauthorized,
    /// Nothing here for this caller (404).
    #[error("{0}")]
    NotFound(String),
    /// The state conflicts with the request (409).
    #[error("{0}")]
    Conflict(String),
    /// It existed and was deleted or has ended (410).
    #[error("{0}")]
    Gone(String),
    /// The body is larger than allowed (413).
    #[error("the request body is too large")]
    TooLarge,
    /// The body is not JSON (415).
    #[error("expected a body of type application/json")]
    UnsupportedMediaType,
    /// The read model has not reached the requested position in time (503, retry).
    #[error("the read model has not reached position {0} yet; retry")]
    NotReady(u64),
    /// The store refuses writes for now (503, retry).
    #[error("the service is temporarily unavailable; retry")]
    Unavailable,
    /// What was asked for exists but cannot be answered yet (503, retry after a second).
    #[error("{0}")]
    NotYet(String),
    /// The caller holds as many event streams as it may (429, retry after a second, or close
    /// one first).
    #[error("{0}")]
    TooManyStreams(String),
    /// Our failure (500). The cause is logged, never shown.
    #[error("internal error")]
    Internal(String),
    /// The `Idempotency-Key` was used before for another request (422, type
    /// [`IDEMPOTENCY_KEY_REUSED`]); nothing was written. Not retryable: use a new key.
    #[error(
        "this Idempotency-Key was already used for a different request; a new request needs a new key"
    )]
    IdempotencyKeyReused,
    /// A push login cannot be sent: the session had no login, or no account of the user can
    /// receive push (409, type [`NOT_PROVOKABLE`]); nothing was written.
    #[error("{0}")]
    NotProvokable(String),
    /// The user has as many push logins outstanding as they may (429, type
    /// [`PROVOKE_LIMITED`], retry after the window); nothing was written.
    #[error("{0}")]
    ProvokeLimited(String),
}

/// The problem type of [`ApiError::NotProvokable`].
pub const NOT_PROVOKABLE: &str = "urn:countersign:problem:not-provokable";
/// The problem type of [`ApiError::ProvokeLimited`].
pub const PROVOKE_LIMITED: &str = "urn:countersign:problem:provoke-limited";

/// The problem type of [`ApiError::IdempotencyKeyReused`].
pub const IDEMPOTENCY_KEY_REUSED: &str = "urn:countersign:problem:idempotency-key-reused";

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Gone(_) => StatusCode::GONE,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::NotReady(_) | Self::Unavailable | Self::NotYet(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::TooManyStreams(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::NotProvokable(_) => StatusCode::CONFLICT,
            Self::ProvokeLimited(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The error for an internal failure, logged here with its cause.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        Self::Internal(cause.to_string())
    }
}

/// A problem document for `status` with `detail`.
pub fn problem(status: StatusCode, detail: String) -> Response {
    let title = status.canonical_reason().unwrap_or("Error");
    let slug = title.to_ascii_lowercase().replace([' ', '\''], "-");
    typed_problem(
        status,
        &format!("urn:countersign:problem:{slug}"),
        title,
        detail,
    )
}

/// A problem document of a type of its own, more precise than the status.
pub fn typed_problem(status: StatusCode, kind: &str, title: &str, detail: String) -> Response {
    let body = Problem {
        kind: kind.to_owned(),
        title: title.to_owned(),
        status: status.as_u16(),
        detail,
    };
    let mut response = (status, axum::Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let Self::Internal(cause) = &self {
            tracing::error!(%cause, "request failed");
        }
        let mut response = match self {
            Self::IdempotencyKeyReused => typed_problem(
                status,
                IDEMPOTENCY_KEY_REUSED,
                "Idempotency key reused",
                self.to_string(),
            ),
            Self::NotProvokable(_) => {
                typed_problem(status, NOT_PROVOKABLE, "Not provokable", self.to_string())
            }
            Self::ProvokeLimited(_) => typed_problem(
                status,
                PROVOKE_LIMITED,
                "Too many push logins",
                self.to_string(),
            ),
            _ => problem(status, self.to_string()),
        };
        let headers = response.headers_mut();
        match self {
            Self::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::NotReady(_) | Self::Unavailable | Self::NotYet(_) | Self::TooManyStreams(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Self::ProvokeLimited(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
            }
            _ => {}
        }
        response
    }
}

impl From<CommandError> for ApiError {
    fn from(error: CommandError) -> Self {
        match error {
            CommandError::Rejected { kind, message } => match kind {
                ErrorKind::Invalid => Self::Invalid(message),
                ErrorKind::Conflict => Self::Conflict(message),
                ErrorKind::NotFound => Self::NotFound(message),
                ErrorKind::Gone => Self::Gone(message),
                ErrorKind::Internal => Self::Internal(message),
            },
            CommandError::Conflict { .. } => {
                Self::Conflict("the resource kept changing; retry".into())
            }
            CommandError::Store(store) => store.into(),
            CommandError::Internal(cause) => Self::Internal(cause),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::WrongExpectedVersion { .. } => {
                Self::Conflict("the resource changed meanwhile; retry".into())
            }
            StoreError::DuplicateEventId { .. } => Self::Conflict(
                "this idempotency key was already used for a different request".into(),
            ),
            StoreError::Unavailable(cause) => {
                tracing::warn!(%cause, "store unavailable");
                Self::Unavailable
            }
            other => Self::internal(other),
        }
    }
}

impl From<ProjectionError> for ApiError {
    fn from(error: ProjectionError) -> Self {
        Self::internal(error)
    }
}

impl From<EvidenceAssemblyError> for ApiError {
    fn from(error: EvidenceAssemblyError) -> Self {
        match error {
            EvidenceAssemblyError::NotFound => Self::NotFound("no such transaction".into()),
            EvidenceAssemblyError::NotSigned(_) => Self::Conflict(error.to_string()),
            EvidenceAssemblyError::NotYetCheckpointed => Self::NotYet(error.to_string()),
            EvidenceAssemblyError::Store(store) => store.into(),
            EvidenceAssemblyError::EnrolmentMissing | EvidenceAssemblyError::Audit(_) => {
                Self::internal(error)
            }
        }
    }
}

/// `axum::Json` whose rejections answer problem+json: 400 for bad syntax, 422 for JSON of
/// the wrong shape (unknown or missing fields), 413, 415.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(match rejection {
                JsonRejection::JsonDataError(e) => Self::Rejection::Invalid(e.body_text()),
                JsonRejection::JsonSyntaxError(e) => Self::Rejection::BadRequest(e.body_text()),
                JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType,
                JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                    ApiError::TooLarge
                }
                other => ApiError::BadRequest(other.body_text()),
            }),
        }
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Query` answering problem+json (400) when the query string is wrong.
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| Self(value))
            .map_err(|e: QueryRejection| ApiError::BadRequest(e.body_text()))
    }
}

/// `axum::extract::Path` answering problem+json (400) when a segment does not parse.
#[derive(Debug, Clone, Copy, Default)]
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| Self(value))
            .map_err(|e: PathRejection| ApiError::BadRequest(e.body_text()))
    }
}

/// Rewrites any error answer that is not problem+json yet (the router's 404 and 405, the
/// body limit's 413, the timeout's 408) into one, so callers parse a single error format.
pub async fn problem_layer(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(PROBLEM_JSON.as_bytes()));
    if is_problem {
        return response;
    }
    let detail = match status {
        StatusCode::NOT_FOUND => "no such resource".to_owned(),
        StatusCode::METHOD_NOT_ALLOWED => "this method is not allowed here".to_owned(),
        StatusCode::PAYLOAD_TOO_LARGE => "the request body is too large".to_owned(),
        StatusCode::REQUEST_TIMEOUT => "the request took too long".to_owned(),
        _ => status
            .canonical_reason()
            .unwrap_or("the request failed")
            .to_owned(),
    };
    let mut rewritten = problem(status, detail);
    for name in [header::ALLOW, header::RETRY_AFTER, header::WWW_AUTHENTICATE] {
        if let Some(value) = response.headers().get(&name) {
            rewritten.headers_mut().insert(name, value.clone());
        }
    }
    rewritten
}

/// A 404 for a route nobody serves.
pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such resource".into())
}

/// The largest log position or tree size a caller may name: the store keeps positions as
/// `i64`. A larger one names nothing that can exist and is refused as malformed (400) rather
/// than passed down to fail as a query (500).
pub const MAX_POSITION: u64 = i64::MAX as u64;

/// `value` if it is a log position or tree size the store can hold, else 400 naming `what`.
pub fn position(what: &str, value: u64) -> Result<u64, ApiError> {
    at_most(what, value, MAX_POSITION)
}

/// `value` if events can follow it: an `after` position, read on from `value + 1`.
pub fn position_after(what: &str, value: u64) -> Result<u64, ApiError> {
    at_most(what, value, MAX_POSITION - 1)
}

fn at_most(what: &str, value: u64, max: u64) -> Result<u64, ApiError> {
    if value <= max {
        Ok(value)
    } else {
        Err(ApiError::BadRequest(format!(
            "{what} must be at most {max}"
        )))
    }
}

/// Deserializers for positions in query strings, as
/// `#[serde(default, deserialize_with = "crate::error::positions::optional")]`: an
/// out-of-range number fails the extraction (400) like any other malformed parameter.
pub mod positions {
    use super::{Deserialize, Deserializer, MAX_POSITION};

    fn bounded<'de, D: Deserializer<'de>>(
        deserializer: D,
        max: u64,
    ) -> Result<Option<u64>, D::Error> {
        match Option::<u64>::deserialize(deserializer)? {
            Some(value) if value > max => Err(serde::de::Error::custom(format!(
                "{value} is out of range: a log position is at most {max}"
            ))),
            other => Ok(other),
        }
    }

    /// A log position or tree size, at most [`MAX_POSITION`].
    pub fn optional<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
        bounded(deserializer, MAX_POSITION)
    }

    /// An `after` position, at most [`MAX_POSITION`] − 1 (reading resumes after it).
    pub fn optional_after<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<u64>, D::Error> {
        bounded(deserializer, MAX_POSITION - 1)
    }
}

/// Longest request target served (scheme, authority, path and query): 8 KiB; longer is 414.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Most header bytes a request may carry, counted as sent (`name: value` and CRLF per
/// field): 16 KiB; more is 431.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Refuses a request whose target or headers are too large (414, 431) before anything else
/// looks at it.
pub async fn refuse_oversize_head(request: Request, next: Next) -> Response {
    let uri = request.uri();
    let uri_bytes = uri.scheme_str().map_or(0, |s| s.len() + "://".len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len());
    if uri_bytes > MAX_URI_BYTES {
        return problem(
            StatusCode::URI_TOO_LONG,
            format!("the request target is longer than {MAX_URI_BYTES} bytes"),
        );
    }
    let header_bytes: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + ": ".len() + value.len() + "\r\n".len())
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return problem(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("the request headers are larger than {MAX_HEADER_BYTES} bytes"),
        );
    }
    next.run(request).await
}

/// Answers 413 at once when the declared `Content-Length` is larger than `max` (the body
/// limit of the routes it wraps, given to axum's `DefaultBodyLimit` beside it), so an absurd
/// length is refused without waiting for a body that may never come.
pub async fn refuse_oversize_body(
    State(max): State<usize>,
    request: Request,
    next: Next,
) -> Response {
    let max = u64::try_from(max).unwrap_or(u64::MAX);
    // Digits too many for a u64 are a length too large as well.
    let too_large = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .is_some_and(|v| v.parse::<u64>().map_or(true, |length| length > max));
    if too_large {
        return ApiError::TooLarge.into_response();
    }
    next.run(request).await
}
