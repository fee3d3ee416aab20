//! Per-server endpoints for users, their accounts, and enrolments. Personal data (userids,
//! attribute values) is sealed in events and read models; it is opened here, per request,
//! with the user's data key, and is gone for good once the user is deleted.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use countersign_commands::idempotency::Scope;
use countersign_domain::user::attribute_field;
use countersign_domain::{AccountId, AccountRef, EnrolmentId, Sealed, UserRef};
use countersign_eventstore::Metadata;
use countersign_projections::UserRow;
use countersign_protocol::qr::{QrKind, QrPayload};

use crate::auth::Tenant;
use crate::error::{ApiError, Json, Path, Problem, Query};
use crate::idempotency::{IdempotencyKey, KeyedJson};
use crate::servers::{page_limit, written};
use crate::sessions::qr_answer;
use crate::state::AppState;
use crate::views::{
    AccountList, AccountView, CreateEnrolmentRequest, EnrolmentCreated, EnrolmentView, PageParams,
    PutUserRequest, QrFormat, QrParams, QrView, ReadParams, UserList, UserView, UserWritten,
    Written,
};

/// Who makes a tenant's request: its API key (in event metadata and idempotency fingerprints).
pub(crate) fn tenant_actor(tenant: &Tenant) -> String {
    format!("api-key:{}", tenant.key_id)
}

pub(crate) fn tenant_metadata(tenant: &Tenant) -> Metadata {
    Metadata {
        actor: Some(tenant_actor(tenant)),
        ..Metadata::default()
    }
}

/// Binds the request's idempotency key (if any) within the tenant; see [`crate::idempotency`].
pub(crate) async fn bind_tenant_key<'k>(
    state: &AppState,
    tenant: &Tenant,
    key: &'k IdempotencyKey,
    named: &[u8],
    body: &[u8],
) -> Result<Option<&'k str>, ApiError> {
    key.bind(
        state,
        Scope::Server(tenant.server),
        &tenant_actor(tenant),
        named,
        body,
    )
    .await
}

/// The user's stream reference: the userid checked and normalised (422), digested under the
/// server's user digest key (cached by the commands after the first request).
pub(crate) async fn user_ref(
    state: &AppState,
    tenant: &Tenant,
    userid: &str,
) -> Result<UserRef, ApiError> {
    Ok(state
        .commands()
        .users
        .user_ref(tenant.server, userid)
        .await?)
}

/// Opens a user row: its userid and attributes (the IdP's userinfo uses it too).
pub async fn open_user(state: &AppState, row: &UserRow) -> Result<UserView, ApiError> {
    let user = UserRef {
        server_id: row.server_id,
        digest: row.user_digest,
    };
    let stream = user.stream();
    let names: Vec<String> = row
        .attributes
        .iter()
        .map(|(name, _)| attribute_field(name))
        .collect();
    let mut fields: Vec<(&str, &Sealed)> = vec![("userid", &row.userid_sealed)];
    fields.extend(
        names
            .iter()
            .zip(&row.attributes)
            .map(|(field, (_, sealed))| (field.as_str(), sealed)),
    );
    let opened = state
        .commands()
        .users
        .open_all(&stream, &fields)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such user".into()))?;
    let mut values = opened.into_iter();
    let userid = values.next().unwrap_or_default();
    let attributes = row
        .attributes
        .iter()
        .map(|(name, _)| name.clone())
        .zip(values)
        .collect();
    Ok(UserView { userid, attributes })
}

/// Creates the user if needed and sets their attributes (replacing the previous set).
#[utoipa::path(put, path = "/v1/servers/{server_id}/users/{userid}", tag = "users",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("userid" = String, Path, description = "1..=256 bytes, URL-encoded"),
           ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe: the same key and request write no second event; another request under the key is 422")),
    request_body = PutUserRequest,
    responses(
        (status = 200, description = "Updated", body = UserWritten),
        (status = 201, description = "Created", body = UserWritten),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not this key's server", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A conflict (retry)", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The user was deleted", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid (also more than 64 attributes), or the Idempotency-Key was used for another request (type urn:countersign:problem:idempotency-key-reused)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn put_user(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(path): Path<(String, String)>,
    key: IdempotencyKey,
    body: KeyedJson<PutUserRequest>,
) -> Result<Response, ApiError> {
    let (_, userid) = path;
    let request = body.value;
    user_ref(&state, &tenant, &userid).await?;
    let key = bind_tenant_key(&state, &tenant, &key, b"", &body.canonical).await?;
    let (_, done) = state
        .commands()
        .users
        .put(
            tenant.server,
            &userid,
            request.attributes.clone(),
            &tenant_metadata(&tenant),
            key,
        )
        .await?;
    let created = done
        .events
        .iter()
        .any(|e| matches!(e, countersign_domain::user::UserEvent::Registered(_)));
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(written(
        status,
        done.position,
        UserWritten {
            user: UserView {
                userid,
                attributes: request.attributes,
            },
            position: done.position,
        },
    ))
}

/// Reads a user.
#[utoipa::path(get, path = "/v1/servers/{server_id}/users/{userid}", tag = "users",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("userid" = String, Path, description = "URL-encoded"), ReadParams),
    responses(
        (status = 200, description = "The user", body = UserView),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such user", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid userid", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind min_position", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn get_user(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(path): Path<(String, String)>,
    Query(read): Query<ReadParams>,
) -> Result<Json<UserView>, ApiError> {
    let (_, userid) = path;
    let user = user_ref(&state, &tenant, &userid).await?;
    state.wait_for(read.min_position).await?;
    let row = state
        .reads()
        .user(tenant.server, user.digest)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such user".into()))?;
    Ok(Json(open_user(&state, &row).await?))
}

/// Lists users in registration order.
#[utoipa::path(get, path = "/v1/servers/{server_id}/users", tag = "users",
    params(("server_id" = String, Path, description = "32 hex digits"), PageParams),
    responses(
        (status = 200, description = "A page", body = UserList),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not this key's server", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid input, or min_position beyond the log", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind min_position", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn list_users(
    State(state): State<AppState>,
    tenant: Tenant,
    Query(page): Query<PageParams>,
) -> Result<Json<UserList>, ApiError> {
    state.wait_for(page.min_position).await?;
    let after = match page.after.as_deref() {
        Some(text) => Some(
            text.parse::<u64>()
                .map_err(|_| ApiError::BadRequest("after must be a number".into()))
                .and_then(|p| crate::error::position("after", p))?,
        ),
        None => None,
    };
    let limit = page_limit(page.limit)?;
    let rows = state.reads().users(tenant.server, after, limit + 1).await?;
    let more = rows.len() > limit as usize;
    let mut users = Vec::with_capacity(rows.len());
    let mut next = None;
    for row in rows.iter().take(limit as usize) {
        // A user deleted meanwhile has no key any more: skip it rather than fail the page.
        match open_user(&state, row).await {
            Ok(user) => users.push(user),
            Err(ApiError::NotFound(_)) => {}
            Err(other) => return Err(other),
        }
        next = Some(row.registered_position);
    }
    Ok(Json(UserList {
        users,
        next: if more { next } else { None },
    }))
}

/// Deletes a user: every personal value in the log becomes unreadable.
#[utoipa::path(delete, path = "/v1/servers/{server_id}/users/{userid}", tag = "users",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("userid" = String, Path, description = "URL-encoded")),
    responses(
        (status = 200, description = "Deleted", body = Written),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such user", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "Already deleted", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid userid", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn delete_user(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(path): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (_, userid) = path;
    let user = user_ref(&state, &tenant, &userid).await?;
    let done = state
        .commands()
        .users
        .delete(&user, &tenant_metadata(&tenant))
        .await?;
    Ok(written(
        StatusCode::OK,
        done.position,
        Written {
            position: done.position,
        },
    ))
}

fn account_view(row: &countersign_projections::AccountRow) -> AccountView {
    AccountView {
        account_id: row.account_id.to_string(),
        app_instance: row.app_instance.to_string(),
        second_factor: row.second_factor.clone(),
        signing_key_fingerprint: hex::encode(row.signing_key_thumbprint),
        registered_at: row.registered_at.as_millis(),
        device_data: row
            .device_data
            .as_ref()
            .map(|(data, at)| crate::views::DeviceDataView {
                model: data.model.clone(),
                os: data.os.clone(),
                app_version: data.app_version.clone(),
                changed_at: at.as_millis(),
            }),
    }
}

/// Lists a user's accounts.
#[utoipa::path(get, path = "/v1/servers/{server_id}/users/{userid}/accounts", tag = "users",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("userid" = String, Path, description = "URL-encoded"), ReadParams),
    responses(
        (status = 200, description = "The accounts", body = AccountList),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such user", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid userid", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind min_position", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn list_accounts(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(path): Path<(String, String)>,
    Query(read): Query<ReadParams>,
) -> Result<Json<AccountList>, ApiError> {
    let (_, userid) = path;
    let user = user_ref(&state, &tenant, &userid).await?;
    state.wait_for(read.min_position).await?;
    if state
        .reads()
        .user(tenant.server, user.digest)
        .await?
        .is_none()
    {
        return Err(ApiError::NotFound("no such user".into()));
    }
    let accounts = state
        .reads()
        .accounts(tenant.server, user.digest)
        .await?
        .iter()
        .map(account_view)
        .collect();
    Ok(Json(AccountList { accounts }))
}

/// Deletes one of a user's accounts (the app is told when it next connects).
#[utoipa::path(delete, path = "/v1/servers/{server_id}/users/{userid}/accounts/{account_id}", tag = "users",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("userid" = String, Path, description = "URL-encoded"),
           ("account_id" = String, Path, description = "32 hex digits")),
    responses(
        (status = 200, description = "Deleted", body = Written),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such account for this user", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid userid", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn delete_account(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(path): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let (_, userid, account_id) = path;
    let user = user_ref(&state, &tenant, &userid).await?;
    let account_id: AccountId = account_id
        .parse()
        .map_err(|_| ApiError::NotFound("no such account".into()))?;
    let row = state.reads().account(tenant.server, account_id).await?;
    if row.is_none_or(|a| a.user_digest != Some(user.digest)) {
        return Err(ApiError::NotFound("no such account".into()));
    }
    let done = state
        .commands()
        .accounts
        .delete_by_server(
            AccountRef::new(tenant.server, account_id),
            &tenant_metadata(&tenant),
        )
        .await?;
    Ok(written(
        StatusCode::OK,
        done.position,
        Written {
            position: done.position,
        },
    ))
}

/// Starts an enrolment for a registered user and answers its QR code (JSON with the text
/// forms, or the image/bytes with `format`). The token in the QR code is shown only here;
/// resend with the same `Idempotency-Key` to get the same code again.
#[utoipa::path(post, path = "/v1/servers/{server_id}/enrolments", tag = "enrolments",
    params(("server_id" = String, Path, description = "32 hex digits"), QrParams,
           ("Idempotency-Key" = Option<String>, Header, description = "Retry-safe: the same key and request answer the same QR code; another request under the key is 422")),
    request_body = CreateEnrolmentRequest,
    responses(
        (status = 201, description = "Started", content((EnrolmentCreated = "application/json"), (String = "image/png"), (String = "image/svg+xml"), (String = "application/cbor"), (String = "text/plain; charset=utf-8"))),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such user", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Conflict", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid, or the Idempotency-Key was used for another request (type urn:countersign:problem:idempotency-key-reused)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn create_enrolment(
    State(state): State<AppState>,
    tenant: Tenant,
    Query(params): Query<QrParams>,
    key: IdempotencyKey,
    body: KeyedJson<CreateEnrolmentRequest>,
) -> Result<Response, ApiError> {
    let request = body.value;
    user_ref(&state, &tenant, &request.userid).await?;
    let key = bind_tenant_key(&state, &tenant, &key, b"", &body.canonical).await?;
    let (enrolment, token, done) = state
        .commands()
        .enrolments
        .start(
            tenant.server,
            &request.userid,
            request.ttl_secs,
            &tenant_metadata(&tenant),
            key,
        )
        .await?;
    let expires_at = done.events.iter().find_map(|e| match e {
        countersign_domain::enrolment::EnrolmentEvent::Started(s) => Some(s.expires_at),
        _ => None,
    });
    let payload = QrPayload {
        kind: QrKind::Enrolment,
        server_id: *tenant.server.as_bytes(),
        token: *token.expose(),
        gateway: state.config().gateway_url.clone(),
        server_key_fingerprint: tenant.server_fingerprint,
    };
    let format = params.format.unwrap_or_default();
    if format != QrFormat::Json {
        return qr_answer(
            &payload,
            format,
            params.size,
            StatusCode::CREATED,
            done.position,
        );
    }
    let expires_at = match expires_at {
        Some(at) => at.as_millis(),
        // An idempotent retry whose events were already answered: read the model.
        None => {
            state.wait_for(done.position).await?;
            state
                .reads()
                .enrolment(tenant.server, enrolment.enrolment_id)
                .await?
                .map(|e| e.expires_at.as_millis())
                .unwrap_or_default()
        }
    };
    Ok(written(
        StatusCode::CREATED,
        done.position,
        EnrolmentCreated {
            enrolment_id: enrolment.enrolment_id.to_string(),
            state: "pending".into(),
            expires_at,
            qr: QrView {
                base64url: payload.to_base64url(),
                deep_link: payload.deep_link(),
            },
            position: done.position,
        },
    ))
}

/// Reads an enrolment's state.
#[utoipa::path(get, path = "/v1/servers/{server_id}/enrolments/{enrolment_id}", tag = "enrolments",
    params(("server_id" = String, Path, description = "32 hex digits"),
           ("enrolment_id" = String, Path, description = "32 hex digits"), ReadParams),
    responses(
        (status = 200, description = "The enrolment", body = EnrolmentView),
        (status = 400, description = "Malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such enrolment", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid input, or min_position beyond the log", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Read model behind min_position", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = [])))]
pub async fn get_enrolment(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(path): Path<(String, String)>,
    Query(read): Query<ReadParams>,
) -> Result<Json<EnrolmentView>, ApiError> {
    let (_, enrolment_id) = path;
    let id: EnrolmentId = enrolment_id
        .parse()
        .map_err(|_| ApiError::NotFound("no such enrolment".into()))?;
    state.wait_for(read.min_position).await?;
    let row = state
        .reads()
        .enrolment(tenant.server, id)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such enrolment".into()))?;
    Ok(Json(EnrolmentView {
        enrolment_id: row.enrolment_id.to_string(),
        state: row.state.clone(),
        expires_at: row.expires_at.as_millis(),
        account_id: row.account_id.map(|a| a.to_string()),
    }))
}
