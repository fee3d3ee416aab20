//! The request the NS sends to a server's Data Service (DS), signed with HTTP Message
//! Signatures (RFC 9421) under the virtual server's P-256 key, its body bound by
//! `Content-Digest` (RFC 9530). The contract a DS implements is `docs/data-service.md`; this
//! module is its one Rust implementation, pure: times and nonces are inputs.
//!
//! - The request is `POST {ds url}`, body = the app data, `Content-Type:
//!   application/octet-stream`, and the headers of [`DsMessage::header_fields`]: ids in
//!   lowercase hex, the userid as a structured-field byte sequence (`:base64(UTF-8):`, so any
//!   userid survives HTTP's header rules), `Countersign-Headless` a structured-field boolean.
//! - One signature, label [`LABEL`], covers [`COVERED`] in that order (`countersign-user` only
//!   when the account has a user), with parameters `created`, `nonce` (16 random bytes, hex,
//!   fresh per attempt), `keyid` (the server id, hex) and `alg` = [`ALG`]. ES256 signatures are
//!   `r ‖ s` (RFC 9421 §3.3.4), deterministic (RFC 6979), low-S.
//! - [`verify_request`] is what a DS does: the label's signature must cover every component
//!   the request carries (and `countersign-user` when the header is there), `alg` must be
//!   [`ALG`], `keyid` must name the server of `Countersign-Server`, `created` must be within
//!   the window of `now`, the signature must verify, and `Content-Digest`'s `sha-256` must be
//!   the body's. It does not remember anything: refusing a second use of a nonce (replay) and
//!   answering a repeated request id from memory (idempotency) are the DS's state, see the doc.
//!   Signature bytes are never a replay key: ECDSA is malleable (`(r, n−s)` verifies too), the
//!   nonce is not.
//! - [`verify_signature`] is the generic RFC 9421 verifier underneath (any covered components
//!   without parameters, `ecdsa-p256-sha256`), which is how RFC 9421's own ECDSA example,
//!   Appendix B.2.4, runs through this code.
//! - Every decoder answers with a typed [`DsVerifyError`] naming what failed, never a value.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use p256::ecdsa::{SigningKey, VerifyingKey};
use sha2::{Digest as _, Sha256};

use crate::cose::{sign_es256, verify_es256};

/// The signature's label in `Signature-Input` and `Signature`.
pub const LABEL: &str = "sig1";
/// The RFC 9421 algorithm name: ECDSA P-256 with SHA-256.
pub const ALG: &str = "ecdsa-p256-sha256";
/// The body's media type.
pub const CONTENT_TYPE: &str = "application/octet-stream";
/// The `created` window recommended to a DS: a request older or newer than this is refused.
pub const DEFAULT_WINDOW_SECS: u64 = 300;

/// `Countersign-Server`: the virtual server's id, 32 lowercase hex digits.
pub const HEADER_SERVER: &str = "countersign-server";
/// `Countersign-Account`: the account's id, 32 lowercase hex digits.
pub const HEADER_ACCOUNT: &str = "countersign-account";
/// `Countersign-User`: the userid, `:base64(UTF-8):`; absent for a headless account.
pub const HEADER_USER: &str = "countersign-user";
/// `Countersign-Headless`: `?1` or `?0`.
pub const HEADER_HEADLESS: &str = "countersign-headless";
/// `Countersign-App-Instance`: the app installation's id, 32 lowercase hex digits.
pub const HEADER_APP_INSTANCE: &str = "countersign-app-instance";
/// `Countersign-Request-Id`: chosen by the app, the same on a retry; 32 lowercase hex digits.
pub const HEADER_REQUEST_ID: &str = "countersign-request-id";

/// The covered components, in signing order. `countersign-user` is left out when the request
/// has no user.
pub const COVERED: [&str; 10] = [
    "@method",
    "@target-uri",
    "content-type",
    "content-digest",
    HEADER_SERVER,
    HEADER_ACCOUNT,
    HEADER_USER,
    HEADER_HEADLESS,
    HEADER_APP_INSTANCE,
    HEADER_REQUEST_ID,
];

/// Longest `Signature-Input` or `Signature` value [`verify_request`] parses.
pub const MAX_SIGNATURE_FIELD_BYTES: usize = 4096;

/// What one Data Service request says. The body is the app data.
#[derive(Clone, Copy)]
pub struct DsMessage<'a> {
    /// The DS URL exactly as sent (`@target-uri`).
    pub target_uri: &'a str,
    /// The virtual server (also the signature's `keyid`).
    pub server_id: [u8; 16],
    /// The account the data comes from.
    pub account_id: [u8; 16],
    /// The account's user, when it has one.
    pub userid: Option<&'a str>,
    /// Whether the account is headless.
    pub headless: bool,
    /// The app installation.
    pub app_instance: [u8; 16],
    /// The app's request id, the same on a retry.
    pub request_id: [u8; 16],
    /// Unix seconds: the signature's `created`.
    pub created: u64,
    /// Fresh random bytes per attempt: the signature's `nonce` (not a secret).
    pub nonce: [u8; 16],
    /// The app data.
    pub body: &'a [u8],
}

impl std::fmt::Debug for DsMessage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DsMessage")
            .field("server_id", &hex::encode(self.server_id))
            .field("account_id", &hex::encode(self.account_id))
            .field("request_id", &hex::encode(self.request_id))
            .field("created", &self.created)
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

impl DsMessage<'_> {
    /// The HTTP fields the signature covers, lowercase names, in [`COVERED`] order:
    /// `content-type`, `content-digest` and the `countersign-*` fields.
    #[must_use]
    pub fn header_fields(&self) -> Vec<(&'static str, String)> {
        let mut fields = vec![
            ("content-type", CONTENT_TYPE.to_owned()),
            ("content-digest", content_digest(self.body)),
            (HEADER_SERVER, hex::encode(self.server_id)),
            (HEADER_ACCOUNT, hex::encode(self.account_id)),
        ];
        if let Some(userid) = self.userid {
            fields.push((HEADER_USER, format!(":{}:", B64.encode(userid.as_bytes()))));
        }
        fields.push((HEADER_HEADLESS, sf_boolean(self.headless).to_owned()));
        fields.push((HEADER_APP_INSTANCE, hex::encode(self.app_instance)));
        fields.push((HEADER_REQUEST_ID, hex::encode(self.request_id)));
        fields
    }

    /// The `@signature-params` value (also what `Signature-Input` carries after `sig1=`).
    #[must_use]
    pub fn signature_params(&self) -> String {
        let covered: Vec<&str> = COVERED
            .iter()
            .copied()
            .filter(|c| *c != HEADER_USER || self.userid.is_some())
            .collect();
        let params = [
            (
                "created",
                Item::Integer(i64::try_from(self.created).unwrap_or(i64::MAX)),
            ),
            ("nonce", Item::String(hex::encode(self.nonce))),
            ("keyid", Item::String(hex::encode(self.server_id))),
            ("alg", Item::String(ALG.to_owned())),
        ];
        serialize_inner_list(&covered, &params)
    }

    /// The RFC 9421 signature base: one line per covered component, then `@signature-params`.
    #[must_use]
    pub fn signature_base(&self) -> String {
        let mut components: Vec<(&str, String)> = vec![
            ("@method", "POST".to_owned()),
            ("@target-uri", self.target_uri.to_owned()),
        ];
        components.extend(self.header_fields());
        let components: Vec<(&str, &str)> =
            components.iter().map(|(n, v)| (*n, v.as_str())).collect();
        signature_base(&components, &self.signature_params())
    }

    /// Every header of the request: [`DsMessage::header_fields`], then `signature-input` and
    /// `signature`, signed with `key`.
    #[must_use]
    pub fn sign(&self, key: &SigningKey) -> Vec<(&'static str, String)> {
        let signature = sign_es256(key, self.signature_base().as_bytes());
        let mut fields = self.header_fields();
        fields.push((
            "signature-input",
            format!("{LABEL}={}", self.signature_params()),
        ));
        fields.push(("signature", format!("{LABEL}=:{}:", B64.encode(signature))));
        fields
    }
}

/// `sha-256=:<base64 of SHA-256(body)>:` (RFC 9530 `Content-Digest`).
#[must_use]
pub fn content_digest(body: &[u8]) -> String {
    format!("sha-256=:{}:", B64.encode(Sha256::digest(body)))
}

/// An RFC 9421 signature base (§2.5): `"name": value` per component, each line ending in LF,
/// then `"@signature-params": params` with no LF after it.
#[must_use]
pub fn signature_base(components: &[(&str, &str)], signature_params: &str) -> String {
    let mut base = String::new();
    for (name, value) in components {
        base.push('"');
        base.push_str(name);
        base.push_str("\": ");
        base.push_str(value);
        base.push('\n');
    }
    base.push_str("\"@signature-params\": ");
    base.push_str(signature_params);
    base
}

/// Why a request or a signature did not verify. Messages name the check, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DsVerifyError {
    /// A header the request must carry is absent (or not visible ASCII).
    #[error("missing header {0}")]
    Missing(&'static str),
    /// A header is not of its documented form.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// `Signature-Input` or `Signature` has no member of the expected label.
    #[error("no signature labelled {0}")]
    NoSignature(String),
    /// The signature does not cover a component the request carries.
    #[error("the signature does not cover {0}")]
    NotCovered(&'static str),
    /// A covered component this verifier cannot compute (a derived component other than
    /// `@method`, `@target-uri`, `@authority`, `@scheme`, `@path`, `@query`, `@status`, or a
    /// component with parameters).
    #[error("unsupported covered component")]
    UnsupportedComponent,
    /// The signature covers an HTTP field the message does not carry.
    #[error("a covered field is absent")]
    CoveredFieldAbsent,
    /// `alg` is absent or not [`ALG`].
    #[error("unsupported or missing alg")]
    Alg,
    /// `keyid` is absent or does not name the server of `Countersign-Server`.
    #[error("keyid does not name the signing server")]
    KeyId,
    /// `created` is absent, or outside the window around now; or `expires` is past.
    #[error("the signature is too old or too new")]
    Stale,
    /// `nonce` is absent or not 32 hex digits.
    #[error("missing or malformed nonce")]
    Nonce,
    /// The signature is not 64 bytes or does not verify under the key.
    #[error("the signature does not verify")]
    BadSignature,
    /// `Content-Digest`'s `sha-256` is absent or not the body's.
    #[error("content-digest does not match the body")]
    Digest,
    /// The method is not `POST`.
    #[error("the method is not POST")]
    Method,
}

/// The parameters of a verified signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureParams {
    /// The covered components, in signing order.
    pub covered: Vec<String>,
    /// `created`, when present.
    pub created: Option<i64>,
    /// `expires`, when present.
    pub expires: Option<i64>,
    /// `keyid`, when present.
    pub keyid: Option<String>,
    /// `alg`, when present.
    pub alg: Option<String>,
    /// `nonce`, when present.
    pub nonce: Option<String>,
}

/// Verifies the RFC 9421 signature labelled `label` with `ecdsa-p256-sha256` under `key`.
/// `component` gives a covered component's value: a derived one by its name (`@method`), an
/// HTTP field by its lowercase name (its values trimmed and joined with `, `), `None` when
/// the message has none. The `@signature-params` line is the canonical serialization of the
/// parsed member (RFC 8941 §4.1). Time, `keyid` and `alg` are left to the caller.
///
/// # Errors
/// [`DsVerifyError`]: a field malformed, the label absent, a component the message lacks or
/// this code cannot compute, a signature that does not verify.
pub fn verify_signature(
    label: &str,
    signature_input: &str,
    signature: &str,
    component: &dyn Fn(&str) -> Option<String>,
    key: &VerifyingKey,
) -> Result<SignatureParams, DsVerifyError> {
    let inputs =
        parse_dictionary(signature_input).ok_or(DsVerifyError::Malformed("signature-input"))?;
    let signatures = parse_dictionary(signature).ok_or(DsVerifyError::Malformed("signature"))?;
    let Some(Member::InnerList(covered, params)) = find(&inputs, label) else {
        return Err(DsVerifyError::NoSignature(label.to_owned()));
    };
    let Some(Member::Item(Item::Bytes(sig), _)) = find(&signatures, label) else {
        return Err(DsVerifyError::NoSignature(label.to_owned()));
    };
    let mut names = Vec::with_capacity(covered.len());
    let mut lines = Vec::with_capacity(covered.len());
    for (item, item_params) in covered {
        let Item::String(name) = item else {
            return Err(DsVerifyError::Malformed("signature-input"));
        };
        if !item_params.is_empty() || names.contains(name) {
            return Err(DsVerifyError::UnsupportedComponent);
        }
        if name.starts_with('@') && !DERIVED.contains(&name.as_str()) {
            return Err(DsVerifyError::UnsupportedComponent);
        }
        let value = component(name).ok_or(if name.starts_with('@') {
            DsVerifyError::UnsupportedComponent
        } else {
            DsVerifyError::CoveredFieldAbsent
        })?;
        names.push(name.clone());
        lines.push(value);
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let base_components: Vec<(&str, &str)> = refs
        .iter()
        .copied()
        .zip(lines.iter().map(String::as_str))
        .collect();
    let base = signature_base(&base_components, &serialize_inner_list(&refs, params));
    verify_es256(key, base.as_bytes(), sig).map_err(|_| DsVerifyError::BadSignature)?;
    let int = |k: &str| match find_param(params, k) {
        Some(Item::Integer(n)) => Ok(Some(*n)),
        None => Ok(None),
        Some(_) => Err(DsVerifyError::Malformed("signature-input")),
    };
    let string = |k: &str| match find_param(params, k) {
        Some(Item::String(s)) => Ok(Some(s.clone())),
        None => Ok(None),
        Some(_) => Err(DsVerifyError::Malformed("signature-input")),
    };
    Ok(SignatureParams {
        covered: names,
        created: int("created")?,
        expires: int("expires")?,
        keyid: string("keyid")?,
        alg: string("alg")?,
        nonce: string("nonce")?,
    })
}

const DERIVED: [&str; 7] = [
    "@method",
    "@target-uri",
    "@authority",
    "@scheme",
    "@path",
    "@query",
    "@status",
];

/// A request as a DS received it.
#[derive(Clone, Copy)]
pub struct IncomingRequest<'a> {
    /// The HTTP method.
    pub method: &'a str,
    /// The URL the NS sent it to, as the DS knows itself (see the doc: its configured URL,
    /// or `http(s)://` + `Host` + the request target when no proxy rewrites them).
    pub target_uri: &'a str,
    /// Every header field, names in any case; a name given twice has its values joined.
    pub headers: &'a [(&'a str, &'a str)],
    /// The body.
    pub body: &'a [u8],
}

impl std::fmt::Debug for IncomingRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingRequest")
            .field("method", &self.method)
            .field("headers", &self.headers.len())
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// What a verified request says.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifiedRequest {
    /// The virtual server.
    pub server_id: [u8; 16],
    /// The account the data comes from.
    pub account_id: [u8; 16],
    /// The account's user, when it has one.
    pub userid: Option<String>,
    /// Whether the account is headless.
    pub headless: bool,
    /// The app installation.
    pub app_instance: [u8; 16],
    /// The app's request id (the idempotency key).
    pub request_id: [u8; 16],
    /// The signature's `created`.
    pub created: u64,
    /// The signature's `nonce` (the replay key).
    pub nonce: [u8; 16],
}

impl std::fmt::Debug for VerifiedRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedRequest")
            .field("server_id", &hex::encode(self.server_id))
            .field("account_id", &hex::encode(self.account_id))
            .field("headless", &self.headless)
            .field("request_id", &hex::encode(self.request_id))
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

/// Verifies a Data Service request as `docs/data-service.md` says a DS must, with the server's
/// public key `key`, at `now` (Unix seconds), allowing `window_secs` either side of `created`.
///
/// # Errors
/// The first check that failed, as a [`DsVerifyError`].
pub fn verify_request(
    request: &IncomingRequest<'_>,
    key: &VerifyingKey,
    now: u64,
    window_secs: u64,
) -> Result<VerifiedRequest, DsVerifyError> {
    if request.method != "POST" {
        return Err(DsVerifyError::Method);
    }
    let field = |name: &str| header(request.headers, name);
    let required = |name: &'static str| field(name).ok_or(DsVerifyError::Missing(name));
    let input = required("signature-input")?;
    let signature = required("signature")?;
    if input.len() > MAX_SIGNATURE_FIELD_BYTES || signature.len() > MAX_SIGNATURE_FIELD_BYTES {
        return Err(DsVerifyError::Malformed("signature"));
    }
    let component = |name: &str| match name {
        "@method" => Some(request.method.to_owned()),
        "@target-uri" => Some(request.target_uri.to_owned()),
        n if n.starts_with('@') => None,
        n => field(n),
    };
    let params = verify_signature(LABEL, &input, &signature, &component, key)?;
    for name in COVERED {
        let present = name.starts_with('@') || field(name).is_some();
        if name != HEADER_USER && !present {
            return Err(DsVerifyError::Missing(name));
        }
        if present && !params.covered.iter().any(|c| c == name) {
            return Err(DsVerifyError::NotCovered(name));
        }
    }
    if params.alg.as_deref() != Some(ALG) {
        return Err(DsVerifyError::Alg);
    }
    let server_hex = required(HEADER_SERVER)?;
    let server_id = hex16(&server_hex).ok_or(DsVerifyError::Malformed(HEADER_SERVER))?;
    if params.keyid.as_deref() != Some(hex::encode(server_id).as_str()) {
        return Err(DsVerifyError::KeyId);
    }
    let created = params
        .created
        .and_then(|c| u64::try_from(c).ok())
        .ok_or(DsVerifyError::Stale)?;
    if created.abs_diff(now) > window_secs {
        return Err(DsVerifyError::Stale);
    }
    if let Some(expires) = params.expires
        && u64::try_from(expires).map_or(true, |e| e < now)
    {
        return Err(DsVerifyError::Stale);
    }
    let nonce = params
        .nonce
        .as_deref()
        .and_then(hex16)
        .ok_or(DsVerifyError::Nonce)?;
    let digests = parse_dictionary(&required("content-digest")?)
        .ok_or(DsVerifyError::Malformed("content-digest"))?;
    match find(&digests, "sha-256") {
        Some(Member::Item(Item::Bytes(d), _))
            if d.as_slice() == Sha256::digest(request.body).as_slice() => {}
        _ => return Err(DsVerifyError::Digest),
    }
    if required("content-type")? != CONTENT_TYPE {
        return Err(DsVerifyError::Malformed("content-type"));
    }
    let id = |name: &'static str| {
        required(name).and_then(|v| hex16(&v).ok_or(DsVerifyError::Malformed(name)))
    };
    let userid = match field(HEADER_USER) {
        None => None,
        Some(v) => {
            let bytes = match parse_item(&v) {
                Some(Item::Bytes(b)) => b,
                _ => return Err(DsVerifyError::Malformed(HEADER_USER)),
            };
            Some(String::from_utf8(bytes).map_err(|_| DsVerifyError::Malformed(HEADER_USER))?)
        }
    };
    let headless = match parse_item(&required(HEADER_HEADLESS)?) {
        Some(Item::Boolean(b)) => b,
        _ => return Err(DsVerifyError::Malformed(HEADER_HEADLESS)),
    };
    Ok(VerifiedRequest {
        server_id,
        account_id: id(HEADER_ACCOUNT)?,
        userid,
        headless,
        app_instance: id(HEADER_APP_INSTANCE)?,
        request_id: id(HEADER_REQUEST_ID)?,
        created,
        nonce,
    })
}

/// A field's value as RFC 9421 §2.1 covers it: each instance trimmed, joined with `, `.
fn header(headers: &[(&str, &str)], name: &str) -> Option<String> {
    let values: Vec<&str> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim_matches([' ', '\t']))
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

/// 32 lowercase hex digits → 16 bytes.
fn hex16(text: &str) -> Option<[u8; 16]> {
    if text.len() != 32 || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 16];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

fn sf_boolean(b: bool) -> &'static str {
    if b { "?1" } else { "?0" }
}

// --- A strict subset of RFC 8941 structured fields: what the signature fields,
// `Content-Digest` and the `countersign-*` fields use. Decimals are refused.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    Integer(i64),
    String(String),
    Token(String),
    Bytes(Vec<u8>),
    Boolean(bool),
}

type Params = Vec<(String, Item)>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Member {
    Item(Item, Params),
    InnerList(Vec<(Item, Params)>, Params),
}

fn find<'m>(dictionary: &'m [(String, Member)], key: &str) -> Option<&'m Member> {
    // RFC 8941: a repeated key's last value wins.
    dictionary
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, m)| m)
}

fn find_param<'p>(params: &'p [(String, Item)], key: &str) -> Option<&'p Item> {
    params.iter().rev().find(|(k, _)| k == key).map(|(_, i)| i)
}

fn serialize_inner_list(covered: &[&str], params: &[(impl AsRef<str>, Item)]) -> String {
    let mut out = String::from("(");
    for (i, name) in covered.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        serialize_string(&mut out, name);
    }
    out.push(')');
    for (key, item) in params {
        out.push(';');
        out.push_str(key.as_ref());
        match item {
            Item::Boolean(true) => {}
            other => {
                out.push('=');
                serialize_item(&mut out, other);
            }
        }
    }
    out
}

fn serialize_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

fn serialize_item(out: &mut String, item: &Item) {
    match item {
        Item::Integer(n) => out.push_str(&n.to_string()),
        Item::String(s) => serialize_string(out, s),
        Item::Token(t) => out.push_str(t),
        Item::Bytes(b) => {
            out.push(':');
            out.push_str(&B64.encode(b));
            out.push(':');
        }
        Item::Boolean(b) => out.push_str(sf_boolean(*b)),
    }
}

struct Parser<'a> {
    rest: &'a [u8],
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    fn bump(&mut self) -> Option<u8> {
        let (first, rest) = self.rest.split_first()?;
        self.rest = rest;
        Some(*first)
    }

    fn eat(&mut self, byte: u8) -> bool {
        if self.peek() == Some(byte) {
            self.rest = self.rest.get(1..).unwrap_or_default();
            true
        } else {
            false
        }
    }

    fn skip_sp(&mut self) {
        while self.eat(b' ') {}
    }

    fn skip_ows(&mut self) {
        while self.eat(b' ') || self.eat(b'\t') {}
    }

    fn key(&mut self) -> Option<String> {
        let first = self.peek()?;
        if !(first.is_ascii_lowercase() || first == b'*') {
            return None;
        }
        let mut key = String::new();
        while let Some(b) = self.peek() {
            if b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(b, b'_' | b'-' | b'.' | b'*')
            {
                key.push(char::from(b));
                self.bump();
            } else {
                break;
            }
        }
        Some(key)
    }

    fn params(&mut self) -> Option<Params> {
        let mut params = Vec::new();
        while self.eat(b';') {
            self.skip_sp();
            let key = self.key()?;
            let value = if self.eat(b'=') {
                self.bare_item()?
            } else {
                Item::Boolean(true)
            };
            params.push((key, value));
        }
        Some(params)
    }

    fn bare_item(&mut self) -> Option<Item> {
        match self.peek()? {
            b'-' | b'0'..=b'9' => self.integer(),
            b'"' => self.string(),
            b':' => self.bytes(),
            b'?' => {
                self.bump();
                match self.bump()? {
                    b'0' => Some(Item::Boolean(false)),
                    b'1' => Some(Item::Boolean(true)),
                    _ => None,
                }
            }
            b if b.is_ascii_alphabetic() || b == b'*' => {
                let mut token = String::new();
                while let Some(b) = self.peek() {
                    if b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&b) {
                        token.push(char::from(b));
                        self.bump();
                    } else {
                        break;
                    }
                }
                Some(Item::Token(token))
            }
            _ => None,
        }
    }

    fn integer(&mut self) -> Option<Item> {
        let negative = self.eat(b'-');
        let mut value: i64 = 0;
        let mut digits = 0;
        while let Some(b @ b'0'..=b'9') = self.peek() {
            digits += 1;
            if digits > 15 {
                return None;
            }
            value = value * 10 + i64::from(b - b'0');
            self.bump();
        }
        if digits == 0 || self.peek() == Some(b'.') {
            return None;
        }
        Some(Item::Integer(if negative { -value } else { value }))
    }

    fn string(&mut self) -> Option<Item> {
        self.bump();
        let mut s = String::new();
        loop {
            match self.bump()? {
                b'\\' => match self.bump()? {
                    c @ (b'"' | b'\\') => s.push(char::from(c)),
                    _ => return None,
                },
                b'"' => return Some(Item::String(s)),
                c @ 0x20..=0x7e => s.push(char::from(c)),
                _ => return None,
            }
        }
    }

    fn bytes(&mut self) -> Option<Item> {
        self.bump();
        let end = self.rest.iter().position(|b| *b == b':')?;
        let (encoded, rest) = self.rest.split_at(end);
        if !encoded
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
        {
            return None;
        }
        let decoded = B64.decode(encoded).ok()?;
        self.rest = rest.get(1..).unwrap_or_default();
        Some(Item::Bytes(decoded))
    }

    fn item_or_inner_list(&mut self) -> Option<Member> {
        if self.eat(b'(') {
            let mut items = Vec::new();
            loop {
                self.skip_sp();
                if self.eat(b')') {
                    return Some(Member::InnerList(items, self.params()?));
                }
                let item = self.bare_item()?;
                items.push((item, self.params()?));
                match self.peek()? {
                    b' ' | b')' => {}
                    _ => return None,
                }
            }
        }
        let item = self.bare_item()?;
        Some(Member::Item(item, self.params()?))
    }
}

/// An RFC 8941 dictionary; `None` when the text is not one (or uses what this subset refuses).
fn parse_dictionary(text: &str) -> Option<Vec<(String, Member)>> {
    let mut p = Parser {
        rest: text.trim_matches(' ').as_bytes(),
    };
    let mut members = Vec::new();
    while p.peek().is_some() {
        let key = p.key()?;
        let member = if p.eat(b'=') {
            p.item_or_inner_list()?
        } else {
            Member::Item(Item::Boolean(true), p.params()?)
        };
        members.push((key, member));
        p.skip_ows();
        if p.peek().is_none() {
            break;
        }
        if !p.eat(b',') {
            return None;
        }
        p.skip_ows();
        p.peek()?;
    }
    (!members.is_empty()).then_some(members)
}

/// An RFC 8941 item with no parameters.
fn parse_item(text: &str) -> Option<Item> {
    let mut p = Parser {
        rest: text.trim_matches(' ').as_bytes(),
    };
    let item = p.bare_item()?;
    p.rest.is_empty().then_some(item)
}

#[cfg(test)]
mod tests {
    use p256::elliptic_curve::sec1::ToSec1Point as _;

    use super::*;

    fn b64url(s: &str) -> Vec<u8> {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .unwrap()
    }

    /// RFC 9421 Appendix B.1.3, `test-key-ecc-p256` (its JWK coordinates).
    fn rfc_key() -> (SigningKey, VerifyingKey) {
        let d = b64url("UpuF81l-kOxbjf7T4mNSv0r5tN67Gim7rnf6EFpcYDs");
        let mut point = vec![4u8];
        point.extend(b64url("qIVYZVLCrPZHGHjP17CTW0_-D9Lfw0EkjqF7xB4FivA"));
        point.extend(b64url("Mc4nN9LTDOBhfoUeg8Ye9WedFRhnZXZJA12Qp0zZ6F0"));
        let signing = SigningKey::from_slice(&d).unwrap();
        let verifying = VerifyingKey::from_sec1_bytes(&point).unwrap();
        assert_eq!(
            signing
                .verifying_key()
                .as_affine()
                .to_sec1_point(false)
                .as_bytes(),
            point.as_slice(),
            "the B.1.3 private key is the B.1.3 public key's"
        );
        (signing, verifying)
    }

    const B24_INPUT: &str = "sig-b24=(\"@status\" \"content-type\" \"content-digest\" \
        \"content-length\");created=1618884473;keyid=\"test-key-ecc-p256\"";
    const B24_SIGNATURE: &str = "sig-b24=:wNmSUAhwb5LxtOtOpNa6W5xj067m5hFrj0XQ4fvpaCLx0NK\
        ocgPquLgyahnzDnDAUy5eCdlYUEkLIj+32oiasw==:";
    const B24_DIGEST: &str = "sha-512=:mEWXIS7MaLRuGgxOBdODa3xqM1XdEvxoYhvlCFJ41QJgJc4GTsPp29l5\
        oGX69wWdXymyU0rjJuahq4l5aGgfLQ==:";

    fn b24_component(name: &str) -> Option<String> {
        match name {
            "@status" => Some("200".into()),
            "content-type" => Some("application/json".into()),
            "content-digest" => Some(B24_DIGEST.into()),
            "content-length" => Some("23".into()),
            _ => None,
        }
    }

    #[test]
    fn rfc_9421_b_2_4_ecdsa_example_verifies() {
        let (_, key) = rfc_key();
        let params =
            verify_signature("sig-b24", B24_INPUT, B24_SIGNATURE, &b24_component, &key).unwrap();
        assert_eq!(params.created, Some(1_618_884_473));
        assert_eq!(params.keyid.as_deref(), Some("test-key-ecc-p256"));
        assert_eq!(
            params.covered,
            [
                "@status",
                "content-type",
                "content-digest",
                "content-length"
            ]
        );
    }

    #[test]
    fn rfc_9421_b_2_4_signature_base_is_the_rfcs() {
        let base = signature_base(
            &[
                ("@status", "200"),
                ("content-type", "application/json"),
                ("content-digest", B24_DIGEST),
                ("content-length", "23"),
            ],
            "(\"@status\" \"content-type\" \"content-digest\" \"content-length\");created=1618884473;keyid=\"test-key-ecc-p256\"",
        );
        let expected = "\"@status\": 200\n\"content-type\": application/json\n\
            \"content-digest\": sha-512=:mEWXIS7MaLRuGgxOBdODa3xqM1XdEvxoYhvlCFJ41QJgJc4GTsPp29l5\
            oGX69wWdXymyU0rjJuahq4l5aGgfLQ==:\n\"content-length\": 23\n\"@signature-params\": \
            (\"@status\" \"content-type\" \"content-digest\" \"content-length\");\
            created=1618884473;keyid=\"test-key-ecc-p256\"";
        assert_eq!(base, expected);
    }

    #[test]
    fn rfc_9421_b_2_4_fails_when_anything_changes() {
        let (_, key) = rfc_key();
        let other_status = |n: &str| {
            if n == "@status" {
                Some("201".into())
            } else {
                b24_component(n)
            }
        };
        assert_eq!(
            verify_signature("sig-b24", B24_INPUT, B24_SIGNATURE, &other_status, &key),
            Err(DsVerifyError::BadSignature)
        );
        let later = B24_INPUT.replace("1618884473", "1618884474");
        assert_eq!(
            verify_signature("sig-b24", &later, B24_SIGNATURE, &b24_component, &key),
            Err(DsVerifyError::BadSignature)
        );
        assert_eq!(
            verify_signature("sig1", B24_INPUT, B24_SIGNATURE, &b24_component, &key),
            Err(DsVerifyError::NoSignature("sig1".into()))
        );
        let other = SigningKey::from_slice(&[7; 32]).unwrap();
        assert_eq!(
            verify_signature(
                "sig-b24",
                B24_INPUT,
                B24_SIGNATURE,
                &b24_component,
                other.verifying_key()
            ),
            Err(DsVerifyError::BadSignature)
        );
    }

    #[test]
    fn rfc_9530_content_digest_example() {
        // RFC 9530 §2 example: `{"hello": "world"}`.
        assert_eq!(
            content_digest(b"{\"hello\": \"world\"}"),
            "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"
        );
    }

    const SERVER: [u8; 16] = [0x5e; 16];

    fn message<'a>(userid: Option<&'a str>, body: &'a [u8]) -> DsMessage<'a> {
        DsMessage {
            target_uri: "http://127.0.0.1:8099/ds",
            server_id: SERVER,
            account_id: [0xac; 16],
            userid,
            headless: userid.is_none(),
            app_instance: [0xa1; 16],
            request_id: [0x1d; 16],
            created: 1_700_000_000,
            nonce: [0x0e; 16],
            body,
        }
    }

    #[test]
    fn the_signature_base_is_the_documented_one() {
        let m = message(Some("alice@example.com"), b"hello");
        let expected = "\"@method\": POST\n\
\"@target-uri\": http://127.0.0.1:8099/ds\n\
\"content-type\": application/octet-stream\n\
\"content-digest\": sha-256=:LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=:\n\
\"countersign-server\": 5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e\n\
\"countersign-account\": acacacacacacacacacacacacacacacac\n\
\"countersign-user\": :YWxpY2VAZXhhbXBsZS5jb20=:\n\
\"countersign-headless\": ?0\n\
\"countersign-app-instance\": a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1\n\
\"countersign-request-id\": 1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d\n\
\"@signature-params\": (\"@method\" \"@target-uri\" \"content-type\" \"content-digest\" \
\"countersign-server\" \"countersign-account\" \"countersign-user\" \"countersign-headless\" \
\"countersign-app-instance\" \"countersign-request-id\");created=1700000000;\
nonce=\"0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e\";keyid=\"5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e\";\
alg=\"ecdsa-p256-sha256\"";
        assert_eq!(m.signature_base(), expected);
        let headless = message(None, b"hello").signature_base();
        assert!(!headless.contains("countersign-user"));
        assert!(headless.contains("\"countersign-headless\": ?1\n"));
    }

    fn verify_signed(
        m: &DsMessage<'_>,
        fields: &[(&str, String)],
        body: &[u8],
        key: &VerifyingKey,
        now: u64,
    ) -> Result<VerifiedRequest, DsVerifyError> {
        let headers: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
        verify_request(
            &IncomingRequest {
                method: "POST",
                target_uri: m.target_uri,
                headers: &headers,
                body,
            },
            key,
            now,
            DEFAULT_WINDOW_SECS,
        )
    }

    #[test]
    fn a_signed_request_verifies_and_says_who_sent_it() {
        let key = SigningKey::from_slice(&[3; 32]).unwrap();
        for userid in [Some("jos\u{e9} "), None] {
            let m = message(userid, b"app data");
            let fields = m.sign(&key);
            let v = verify_signed(
                &m,
                &fields,
                b"app data",
                key.verifying_key(),
                m.created + 10,
            )
            .unwrap();
            assert_eq!(v.server_id, SERVER);
            assert_eq!(v.account_id, [0xac; 16]);
            assert_eq!(v.userid.as_deref(), userid);
            assert_eq!(v.headless, userid.is_none());
            assert_eq!(v.request_id, [0x1d; 16]);
            assert_eq!(v.nonce, [0x0e; 16]);
        }
    }

    #[test]
    fn tampering_anything_is_refused() {
        let key = SigningKey::from_slice(&[3; 32]).unwrap();
        let m = message(Some("alice"), b"app data");
        let fields = m.sign(&key);
        let vk = key.verifying_key();
        let now = m.created;
        assert_eq!(
            verify_signed(&m, &fields, b"app datb", vk, now),
            Err(DsVerifyError::Digest)
        );
        for (i, (name, _)) in fields.iter().enumerate() {
            if name.starts_with("signature") {
                continue;
            }
            let mut changed = fields.clone();
            if let Some(field) = changed.get_mut(i) {
                field.1 = match *name {
                    "countersign-headless" => "?1".into(),
                    "countersign-user" => ":Ym9i:".into(),
                    "content-digest" => content_digest(b"other"),
                    _ => field.1.replace(['a', '5', '1'], "b"),
                };
            }
            assert_eq!(
                verify_signed(&m, &changed, b"app data", vk, now),
                Err(DsVerifyError::BadSignature),
                "{name}"
            );
        }
        let mut dropped_user: Vec<_> = fields.clone();
        dropped_user.retain(|(n, _)| *n != HEADER_USER);
        assert_eq!(
            verify_signed(&m, &dropped_user, b"app data", vk, now),
            Err(DsVerifyError::CoveredFieldAbsent)
        );
        let moved = DsMessage {
            target_uri: "http://127.0.0.1:8099/other",
            ..m
        };
        assert_eq!(
            verify_signed(&moved, &fields, b"app data", vk, now),
            Err(DsVerifyError::BadSignature)
        );
        let other = SigningKey::from_slice(&[4; 32]).unwrap();
        assert_eq!(
            verify_signed(&m, &fields, b"app data", other.verifying_key(), now),
            Err(DsVerifyError::BadSignature)
        );
    }

    #[test]
    fn a_signature_that_leaves_a_field_uncovered_is_refused() {
        let key = SigningKey::from_slice(&[3; 32]).unwrap();
        let m = message(Some("alice"), b"x");
        // Signed without the user, then the user header added: the signature verifies over
        // what it covers, yet the request carries an unsigned claim.
        let headless = DsMessage { userid: None, ..m };
        let mut fields = headless.sign(&key);
        fields.push((HEADER_USER, ":YWxpY2U=:".into()));
        assert_eq!(
            verify_signed(&m, &fields, b"x", key.verifying_key(), m.created),
            Err(DsVerifyError::NotCovered(HEADER_USER))
        );
    }

    #[test]
    fn created_outside_the_window_is_stale() {
        let key = SigningKey::from_slice(&[3; 32]).unwrap();
        let m = message(None, b"x");
        let fields = m.sign(&key);
        let vk = key.verifying_key();
        assert!(verify_signed(&m, &fields, b"x", vk, m.created + 300).is_ok());
        assert!(verify_signed(&m, &fields, b"x", vk, m.created - 300).is_ok());
        assert_eq!(
            verify_signed(&m, &fields, b"x", vk, m.created + 301),
            Err(DsVerifyError::Stale)
        );
        assert_eq!(
            verify_signed(&m, &fields, b"x", vk, m.created - 301),
            Err(DsVerifyError::Stale)
        );
    }

    #[test]
    fn the_signature_is_r_s_and_low_s() {
        let key = SigningKey::from_slice(&[3; 32]).unwrap();
        let fields = message(None, b"x").sign(&key);
        let sig = fields.iter().find(|(n, _)| *n == "signature").unwrap();
        let b64 = sig
            .1
            .strip_prefix("sig1=:")
            .unwrap()
            .strip_suffix(':')
            .unwrap();
        let bytes = B64.decode(b64).unwrap();
        assert_eq!(bytes.len(), 64);
        let parsed = p256::ecdsa::Signature::from_slice(&bytes).unwrap();
        assert!(parsed.normalize_s() == parsed, "low-S");
    }

    /// The worked example of `docs/data-service.md`, "A complete example": the RFC 9421 test
    /// key, these ids, this body. RFC 6979 makes the signature reproducible; the doc's bytes
    /// were computed independently (Python `cryptography`, deterministic ECDSA, low-S).
    #[test]
    fn the_documented_example_is_what_the_ns_sends() {
        let (key, public) = rfc_key();
        let hex16 = |s: &str| -> [u8; 16] { hex::decode(s).unwrap().try_into().unwrap() };
        let m = DsMessage {
            target_uri: "https://ds.example.com/countersign",
            server_id: hex16("2b7e151628aed2a6abf7158809cf4f3c"),
            account_id: hex16("3243f6a8885a308d313198a2e0370734"),
            userid: Some("alice@example.com"),
            headless: false,
            app_instance: hex16("a4093822299f31d0082efa98ec4e6c89"),
            request_id: hex16("452821e638d01377be5466cf34e90c6c"),
            created: 1_767_225_600,
            nonce: hex16("c0ac29b7c97c50dd3f84d5b5b5470917"),
            body: b"{\"op\":\"balance\"}",
        };
        let fields = m.sign(&key);
        let get = |name: &str| fields.iter().find(|(n, _)| *n == name).unwrap().1.as_str();
        assert_eq!(
            get("content-digest"),
            "sha-256=:5WuXfmHKn+DS67ALX6Q/oy+To+QIf8TlMGq0ZLr4pdQ=:"
        );
        assert_eq!(get("countersign-user"), ":YWxpY2VAZXhhbXBsZS5jb20=:");
        assert_eq!(
            get("signature-input"),
            "sig1=(\"@method\" \"@target-uri\" \"content-type\" \"content-digest\" \
             \"countersign-server\" \"countersign-account\" \"countersign-user\" \
             \"countersign-headless\" \"countersign-app-instance\" \"countersign-request-id\");\
             created=1767225600;nonce=\"c0ac29b7c97c50dd3f84d5b5b5470917\";\
             keyid=\"2b7e151628aed2a6abf7158809cf4f3c\";alg=\"ecdsa-p256-sha256\""
        );
        assert_eq!(
            get("signature"),
            "sig1=:s1sf07ORqLp1tACVkLUN/tmnwOI317ri9067fVrljbIzrAWOUrIMqCVIplBR87ZHJ73LAjemWgnFgBVxq8Kh0g==:"
        );
        let headers: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let verified = verify_request(
            &IncomingRequest {
                method: "POST",
                target_uri: m.target_uri,
                headers: &headers,
                body: m.body,
            },
            &public,
            1_767_225_600,
            DEFAULT_WINDOW_SECS,
        )
        .unwrap();
        assert_eq!(verified.userid.as_deref(), Some("alice@example.com"));
    }

    #[test]
    fn structured_fields_are_parsed_strictly() {
        assert!(parse_dictionary("a=1, b=(\"x\" \"y\");p=?0;q, c").is_some());
        for bad in [
            "",
            "A=1",
            "a=1,",
            "a=1.5",
            "a=(\"x\"\"y\")",
            "a=:not base64!:",
            "a=\"\u{e9}\"",
            "a=\"x",
            "a=1234567890123456",
        ] {
            assert_eq!(parse_dictionary(bad), None, "{bad:?}");
        }
        assert_eq!(parse_item("?1"), Some(Item::Boolean(true)));
        assert_eq!(parse_item("?2"), None);
        assert_eq!(parse_item(":YQ==: x"), None);
    }
}
