//! How the IdP says no.
//!
//! OAuth and OpenID endpoints answer RFC 6749 §5.2 JSON, `{"error": …, "error_description":
//! …}`, never problem+json: OAuth client libraries parse exactly that. Status codes follow the
//! RFCs: 400 for a request the client got wrong, 401 with `WWW-Authenticate` for
//! `invalid_client` (RFC 6749 §5.2) and `invalid_token` (RFC 6750 §3), 404 for an issuer
//! that does not exist, 500 `server_error` whose cause goes to the log only. Every answer
//! carries `Cache-Control: no-store`.
//!
//! Browser endpoints answer a small HTML page instead (`login_page::error_page`): a browser
//! cannot do anything with JSON, and an error at the authorization endpoint must never
//! redirect to a URI that was not checked.
//!
//! Descriptions are fixed texts: never a code, a token, a secret or anything the client sent.

use std::borrow::Cow;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// An OAuth error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthError {
    status: StatusCode,
    code: &'static str,
    description: Cow<'static, str>,
    www_authenticate: Option<String>,
}

impl OAuthError {
    /// An error with `status`, the RFC's `code` and a description for the developer.
    pub fn new(status: StatusCode, code: &'static str, description: impl Into<String>) -> Self {
        Self {
            status,
            code,
            description: Cow::Owned(description.into()),
            www_authenticate: None,
        }
    }

    /// 400 `invalid_request`.
    pub fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    /// 400 `invalid_grant`: the code, refresh token or `auth_req_id` is invalid, expired,
    /// revoked, used, or not this client's (the same answer for each).
    pub fn invalid_grant(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_grant", description)
    }

    /// 400 `invalid_scope`.
    pub fn invalid_scope(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_scope", description)
    }

    /// 400 `unauthorized_client`.
    pub fn unauthorized_client(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "unauthorized_client", description)
    }

    /// 400 `unsupported_grant_type`.
    pub fn unsupported_grant_type(description: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            description,
        )
    }

    /// 401 `invalid_client` with `WWW-Authenticate: Basic`: an unknown client, a wrong secret
    /// and a missing one answer exactly this, so nothing tells them apart.
    pub fn invalid_client() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: "invalid_client",
            description: Cow::Borrowed("client authentication failed"),
            www_authenticate: Some("Basic realm=\"countersign\"".to_owned()),
        }
    }

    /// 401 `invalid_token` with `WWW-Authenticate: Bearer error="invalid_token"` (RFC 6750).
    pub fn invalid_token(description: impl Into<String>) -> Self {
        let description = description.into();
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: "invalid_token",
            www_authenticate: Some(format!(
                "Bearer error=\"invalid_token\", error_description=\"{}\"",
                description.replace(['"', '\\'], "")
            )),
            description: Cow::Owned(description),
        }
    }

    /// 404 for an issuer (server) that does not exist or was deleted.
    pub fn no_such_issuer() -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request", "no such issuer")
    }

    /// 500 `server_error`; `cause` goes to the log, never to the client.
    pub fn server_error(what: &str, cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(%cause, "idp: {what}");
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "server_error",
            description: Cow::Borrowed("the request could not be completed"),
            www_authenticate: None,
        }
    }

    /// The RFC's error code.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The description sent.
    pub fn description(&self) -> &str {
        &self.description
    }
}

impl std::fmt::Display for OAuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.description)
    }
}

impl std::error::Error for OAuthError {}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": self.code,
            "error_description": self.description,
        })
        .to_string();
        let mut response = (
            self.status,
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
                (header::PRAGMA, "no-cache"),
            ],
            body,
        )
            .into_response();
        if let Some(challenge) = self.www_authenticate
            && let Ok(value) = HeaderValue::from_str(&challenge)
        {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
        response
    }
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_client_is_401_with_a_challenge() {
        let response = OAuthError::invalid_client().into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
    }

    #[test]
    fn invalid_token_names_the_error_in_the_challenge() {
        let response = OAuthError::invalid_token("expired \"x\"").into_response();
        let challenge = response.headers()[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap();
        assert!(
            challenge.starts_with("Bearer error=\"invalid_token\""),
            "{challenge}"
        );
        assert!(!challenge.contains("\"x\""));
    }

    #[test]
    fn pages_escape() {
        assert_eq!(
            html_escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
