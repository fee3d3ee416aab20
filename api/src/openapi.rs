//! The OpenAPI document served at `/openapi.json`: every endpoint, its parameters, bodies and
//! error answers, generated from the handlers' annotations so it cannot drift from the code.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::error::Json;
use crate::{
    audit, error, feed, metrics, oidc_clients, provoke, servers, sessions, state, transactions,
    users, views,
};

struct BearerSchemes;

impl Modify for BearerSchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, what) in [
            (
                "admin",
                "The admin key from the configuration: manages servers.",
            ),
            (
                "api_key",
                "A server's API key (`cs_…`): everything inside that server.",
            ),
        ] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(what))
                        .build(),
                ),
            );
        }
    }
}

/// Marks the session calls that carry the nonce in the path deprecated: the nonce is the
/// session's bearer secret and paths end up in proxy and access logs (OWASP ASVS 3.1.1); the
/// same calls under `…/session` take it in `X-Nonce`.
struct NonceInPathDeprecated;

impl Modify for NonceInPathDeprecated {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            if !path.contains("{nonce}") {
                continue;
            }
            for operation in [
                &mut item.get,
                &mut item.put,
                &mut item.delete,
                &mut item.post,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                operation.deprecated = Some(utoipa::openapi::Deprecated::True);
                let note = "Deprecated: the nonce is a bearer secret and paths are logged by \
                    proxies; send it in `X-Nonce` to the same call under `…/session` instead.";
                operation.description = Some(match operation.description.take() {
                    Some(text) => format!("{note}\n\n{text}"),
                    None => note.to_owned(),
                });
            }
        }
    }
}

/// The API description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "countersign",
        description = "Strong authentication and provable transaction signing: the business API. \
            Errors are RFC 9457 problem+json. Writes answer the log `position` they reached \
            (also in the `x-countersign-position` header); reads accept `min_position` and wait \
            until their read model has processed it."
    ),
    paths(
        servers::create_server, servers::list_servers, servers::get_server,
        servers::update_server, servers::delete_server, servers::issue_api_key,
        servers::list_api_keys, servers::revoke_api_key,
        servers::trust_sfs_key, servers::distrust_sfs_key,
        oidc_clients::register_client, oidc_clients::list_clients, oidc_clients::get_client,
        oidc_clients::update_client, oidc_clients::remove_client,
        oidc_clients::rotate_client_secret, oidc_clients::rotate_key, oidc_clients::list_keys,
        users::put_user, users::get_user, users::list_users, users::delete_user,
        users::list_accounts, users::delete_account, users::create_enrolment,
        users::get_enrolment,
        sessions::put_session_by_header, sessions::get_session_by_header,
        sessions::delete_session_by_header, sessions::session_qr_by_header,
        sessions::session_events_by_header,
        sessions::put_session, sessions::get_session, sessions::delete_session,
        sessions::session_qr, sessions::session_events,
        provoke::provoke_session, provoke::provoke_user, provoke::provoke_account,
        transactions::create_transaction, transactions::get_transaction,
        transactions::transaction_qr, transactions::transaction_events,
        transactions::transaction_evidence,
        audit::checkpoint, audit::key, audit::inclusion, audit::consistency, audit::leaf,
        feed::events, feed::event_stream,
        state::healthz, state::readyz, metrics::scrape,
    ),
    components(schemas(error::Problem, views::QrFormat, views::EvidenceFormat)),
    modifiers(&BearerSchemes, &NonceInPathDeprecated),
    tags(
        (name = "servers", description = "Virtual servers (tenants) and their API keys; admin key"),
        (name = "users", description = "Users and their accounts; API key"),
        (name = "oidc", description = "The server's OpenID Provider: OIDC clients and signing keys; API key"),
        (name = "enrolments", description = "Enrolment QR codes; API key"),
        (name = "sessions", description = "Login sessions by nonce, sent in the X-Nonce header; API key"),
        (name = "transactions", description = "Transactions to sign, their QR codes, status and evidence bundles; API key"),
        (name = "audit", description = "Signed checkpoints and Merkle proofs; any valid credential, leaves for their own tenant only"),
        (name = "events", description = "A tenant's own events from the log, paged or streamed; API key"),
        (name = "operations", description = "Health, readiness, metrics"),
    )
)]
#[derive(Debug)]
pub struct ApiDoc;

/// `GET /openapi.json`: the API's document, with the configured extension merged in.
pub async fn document(
    axum::extract::State(state): axum::extract::State<crate::AppState>,
) -> Json<serde_json::Value> {
    let mut document = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    if let Some(extension) = &state.config().openapi_extension {
        merge(&mut document, extension);
    }
    Json(document)
}

/// Adds `extension`'s paths, component schemas and security schemes (objects, by key) and
/// tags (a list) to `document`; what `document` already has is kept.
fn merge(document: &mut serde_json::Value, extension: &serde_json::Value) {
    for pointer in [
        "/paths",
        "/components/schemas",
        "/components/securitySchemes",
    ] {
        let Some(extra) = extension.pointer(pointer).and_then(|v| v.as_object()) else {
            continue;
        };
        let mut at = &mut *document;
        for key in pointer.trim_start_matches('/').split('/') {
            let Some(object) = at.as_object_mut() else {
                return;
            };
            at = object
                .entry(key.to_owned())
                .or_insert_with(|| serde_json::json!({}));
        }
        if let Some(target) = at.as_object_mut() {
            for (key, value) in extra {
                target.entry(key.clone()).or_insert_with(|| value.clone());
            }
        }
    }
    if let (Some(tags), Some(extra)) = (
        document.get_mut("tags").and_then(|t| t.as_array_mut()),
        extension.get("tags").and_then(|t| t.as_array()),
    ) {
        tags.extend(extra.iter().cloned());
    }
}
