//! The IdP's JSON endpoints in OpenAPI form, merged into the server's `/openapi.json` by the
//! composition root: discovery, the JWKS, the token, userinfo, introspection, revocation and
//! CIBA endpoints, with the RFCs' error answers. The browser endpoints (authorization, the
//! login page, logout) answer HTML and redirects and are described in docs/oidc.md instead.
//!
//! Written out rather than derived: the handlers take urlencoded forms and answer RFC 6749
//! error bodies, which the derive macros of the business API (JSON in, problem+json out) do
//! not describe.

use serde_json::{Value, json};

/// The tag of every operation here.
pub const TAG: &str = "oidc-provider";

fn oauth_error(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OAuthError"}}}
    })
}

fn json_object(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

fn too_large() -> Value {
    json!({
        "description": "The body is larger than 16 KiB",
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    })
}

fn server_id() -> Value {
    json!({
        "name": "server_id", "in": "path", "required": true,
        "description": "The virtual server (32 hex digits); the issuer is {public URL}/oidc/{server_id}",
        "schema": {"type": "string"}
    })
}

fn form(properties: Value, required: &[&str]) -> Value {
    json!({
        "required": true,
        "content": {"application/x-www-form-urlencoded": {"schema": {
            "type": "object", "properties": properties, "required": required
        }}}
    })
}

fn client_auth_fields() -> Value {
    json!({
        "client_id": {"type": "string", "description": "client_secret_post and public clients"},
        "client_secret": {"type": "string", "description": "client_secret_post"}
    })
}

fn merged(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// The document fragment (paths, schemas, tag) to merge into the server's OpenAPI document.
#[must_use]
pub fn document() -> Value {
    let metadata = json!({
        "get": {
            "tags": [TAG], "summary": "Provider metadata",
            "parameters": [server_id()],
            "responses": {
                "200": json_object("The metadata", json!({"type": "object", "required": ["issuer"],
                    "properties": {"issuer": {"type": "string"}}})),
                "404": oauth_error("No such server")
            }
        }
    });
    let token_fields = merged(
        json!({
            "grant_type": {"type": "string", "enum": ["authorization_code", "refresh_token", "urn:openid:params:grant-type:ciba"]},
            "code": {"type": "string"},
            "redirect_uri": {"type": "string"},
            "code_verifier": {"type": "string"},
            "refresh_token": {"type": "string"},
            "auth_req_id": {"type": "string"}
        }),
        client_auth_fields(),
    );
    let userinfo_responses = json!({
        "200": json_object("The user's claims by the token's scope", json!({"type": "object",
            "required": ["sub"], "properties": {"sub": {"type": "string"}}})),
        "401": oauth_error("No valid access token (WWW-Authenticate: Bearer error=\"invalid_token\")"),
        "413": too_large()
    });
    let bearer = json!([{"oidc_access_token": []}]);
    json!({
        "paths": {
            "/oidc/{server_id}/.well-known/openid-configuration": metadata,
            "/oidc/{server_id}/.well-known/oauth-authorization-server": metadata,
            "/oidc/{server_id}/jwks": {
                "get": {
                    "tags": [TAG], "summary": "The signing keys (JWK Set)",
                    "parameters": [server_id(), {
                        "name": "min_position", "in": "query", "required": false,
                        "description": "Answer as of at least this log position (a key rotation's answer)",
                        "schema": {"type": "integer", "minimum": 0}
                    }],
                    "responses": {
                        "200": json_object("The keys", json!({"type": "object", "required": ["keys"],
                            "properties": {"keys": {"type": "array", "items": {"type": "object"}}}})),
                        "400": oauth_error("min_position is not a log position, or beyond the log"),
                        "404": oauth_error("No such server"),
                        "503": oauth_error("temporarily_unavailable: the read models are behind min_position")
                    }
                }
            },
            "/oidc/{server_id}/token": {
                "post": {
                    "tags": [TAG], "summary": "Token endpoint: authorization code, refresh token, CIBA",
                    "parameters": [server_id()],
                    "requestBody": form(token_fields, &["grant_type"]),
                    "security": [{"oidc_client": []}, {}],
                    "responses": {
                        "200": json_object("Tokens", json!({"$ref": "#/components/schemas/OidcTokens"})),
                        "400": oauth_error("invalid_request, invalid_grant, unauthorized_client, unsupported_grant_type, invalid_scope, authorization_pending, slow_down, expired_token, access_denied"),
                        "401": oauth_error("invalid_client"),
                        "413": too_large()
                    }
                }
            },
            "/oidc/{server_id}/userinfo": {
                "get": {"tags": [TAG], "summary": "UserInfo", "parameters": [server_id()],
                        "security": bearer, "responses": userinfo_responses},
                "post": {"tags": [TAG], "summary": "UserInfo", "parameters": [server_id()],
                         "security": bearer, "responses": userinfo_responses}
            },
            "/oidc/{server_id}/introspect": {
                "post": {
                    "tags": [TAG], "summary": "Token introspection (RFC 7662)",
                    "parameters": [server_id()],
                    "requestBody": form(merged(json!({"token": {"type": "string"},
                        "token_type_hint": {"type": "string"}}), client_auth_fields()), &["token"]),
                    "security": [{"oidc_client": []}, {}],
                    "responses": {
                        "200": json_object("Whether the token is active, and what it is", json!({"type": "object",
                            "required": ["active"], "properties": {"active": {"type": "boolean"}}})),
                        "400": oauth_error("invalid_request"),
                        "401": oauth_error("invalid_client"),
                        "413": too_large()
                    }
                }
            },
            "/oidc/{server_id}/revoke": {
                "post": {
                    "tags": [TAG], "summary": "Token revocation (RFC 7009)",
                    "parameters": [server_id()],
                    "requestBody": form(merged(json!({"token": {"type": "string"},
                        "token_type_hint": {"type": "string"}}), client_auth_fields()), &["token"]),
                    "security": [{"oidc_client": []}, {}],
                    "responses": {
                        "200": {"description": "Revoked, or not a token of this client"},
                        "400": oauth_error("invalid_request"),
                        "401": oauth_error("invalid_client"),
                        "413": too_large()
                    }
                }
            },
            "/oidc/{server_id}/bc-authorize": {
                "post": {
                    "tags": [TAG], "summary": "CIBA backchannel authentication request",
                    "parameters": [server_id()],
                    "requestBody": form(merged(json!({
                        "scope": {"type": "string"},
                        "login_hint": {"type": "string", "description": "The userid"},
                        "binding_message": {"type": "string", "maxLength": 100},
                        "client_notification_token": {"type": "string"},
                        "requested_expiry": {"type": "string"}
                    }), client_auth_fields()), &["scope", "login_hint"]),
                    "security": [{"oidc_client": []}, {}],
                    "responses": {
                        "200": json_object("Accepted: poll the token endpoint (or wait for the ping)", json!({
                            "type": "object", "required": ["auth_req_id", "expires_in"],
                            "properties": {"auth_req_id": {"type": "string"},
                                "expires_in": {"type": "integer"}, "interval": {"type": "integer"}}})),
                        "400": oauth_error("invalid_request, invalid_scope, unknown_user_id, unauthorized_client, invalid_binding_message"),
                        "401": oauth_error("invalid_client"),
                        "403": oauth_error("access_denied: too many push logins for the user"),
                        "413": too_large()
                    }
                }
            }
        },
        "components": {
            "schemas": {
                "OAuthError": {"type": "object", "required": ["error"], "properties": {
                    "error": {"type": "string"}, "error_description": {"type": "string"}}},
                "OidcTokens": {"type": "object", "required": ["access_token", "token_type", "expires_in"],
                    "properties": {
                        "access_token": {"type": "string"}, "token_type": {"type": "string"},
                        "expires_in": {"type": "integer"}, "id_token": {"type": "string"},
                        "refresh_token": {"type": "string"}, "scope": {"type": "string"}}}
            },
            "securitySchemes": {
                "oidc_client": {"type": "http", "scheme": "basic",
                    "description": "client_secret_basic: the client id and secret"},
                "oidc_access_token": {"type": "http", "scheme": "bearer",
                    "description": "An access token from the server's token endpoint"}
            }
        },
        "tags": [{"name": TAG, "description": "The server's OpenID Provider (JSON endpoints); see docs/oidc.md"}]
    })
}
