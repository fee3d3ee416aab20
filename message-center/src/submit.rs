//! `POST /v1/mc/messages`: the NS hands the MC one sealed message for one mailbox.
//!
//! ```text
//! Authorization: Bearer <base64url MC token>
//! {"message_id": "<32 hex>", "expires_at_ms": u64, "priority": "high" | "normal",
//!  "collapse_id": null | "…" (≤ 64 bytes), "envelope": "<base64url>"}
//! ```
//!
//! Answers `202 {"queued": true}` once the message row and its `mc.message_queued` event are
//! committed (the worker gets it at once), `200 {"queued": false}` for a message id already
//! queued with the same envelope (idempotent retries), `401` for an unknown token, `409` for a
//! known message id with another envelope or mailbox, `413` for an envelope over 16 KiB (or a
//! body over [`MAX_BODY_BYTES`]), `422` for malformed input or an expiry already past (or too
//! far ahead), `429` when the mailbox holds [`McLimits::max_outstanding`](crate::McLimits)
//! messages. Every error is `application/problem+json` with a
//! `urn:countersign:problem:mc-…` type; a 500 says nothing internal.
//!
//! The token is looked up by its SHA-256 (no comparison of the secret itself happens); the
//! token, the envelope and the message never reach a log line.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::events::McEvent;
use crate::push::Priority;
use countersign_eventstore::Database;
use tokio::sync::{mpsc, oneshot};

use crate::store::{self, AWAITING, MAILBOX_ONLY, NewMessage};
use crate::worker::Job;
use crate::{MAX_ENVELOPE_BYTES, MessageCenter, record};

/// The largest body accepted: a 16 KiB envelope in base64url and the other fields.
pub const MAX_BODY_BYTES: usize = 24 * 1024;
/// The longest collapse id (APNs' `apns-collapse-id` limit).
pub const MAX_COLLAPSE_ID_BYTES: usize = 64;

/// The submit body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmitRequest {
    /// 16 bytes, lowercase or uppercase hex.
    pub message_id: String,
    /// Milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
    /// `high` or `normal`.
    pub priority: SubmitPriority,
    /// Pushes with the same collapse id replace each other on the device.
    #[serde(default)]
    pub collapse_id: Option<String>,
    /// The sealed envelope, base64url (padding optional).
    pub envelope: String,
}

/// The priority field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubmitPriority {
    /// Deliver now.
    High,
    /// Deliver when convenient.
    Normal,
}

/// The success body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitAnswer {
    /// `true`: newly queued; `false`: this message was queued before.
    pub queued: bool,
}

/// A refused submit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// 401: no, a malformed or an unknown MC token.
    #[error("a valid MC token is required")]
    Unauthorized,
    /// 413: the envelope or the body is too large.
    #[error("{0}")]
    TooLarge(String),
    /// 422: malformed input, or an expiry in the past or too far ahead.
    #[error("{0}")]
    Invalid(String),
    /// 409: this message id was queued with another envelope or for another mailbox.
    #[error("message id already used for another message")]
    Conflict,
    /// 429: the mailbox is full.
    #[error("the mailbox holds too many outstanding messages; retry later")]
    MailboxFull,
    /// 500: logged, never shown.
    #[error("internal error")]
    Internal,
}

impl SubmitError {
    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "mc-unauthorized"),
            Self::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "mc-too-large"),
            Self::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "mc-invalid-message"),
            Self::Conflict => (StatusCode::CONFLICT, "mc-message-id-conflict"),
            Self::MailboxFull => (StatusCode::TOO_MANY_REQUESTS, "mc-mailbox-full"),
            Self::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal-server-error"),
        }
    }
}

impl IntoResponse for SubmitError {
    fn into_response(self) -> Response {
        let (status, slug) = self.parts();
        let body = serde_json::json!({
            "type": format!("urn:countersign:problem:{slug}"),
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": self.to_string(),
        });
        let mut response = (status, axum::Json(body)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        response
    }
}

fn internal(error: &crate::Error) -> SubmitError {
    tracing::error!(%error, "mc submit failed");
    SubmitError::Internal
}

/// base64url with or without padding.
fn base64url(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .ok()
}

/// SHA-256 of the bearer token, if the header holds a well-formed one.
fn token_hash(headers: &HeaderMap) -> Result<[u8; 32], SubmitError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(SubmitError::Unauthorized)?;
    let (scheme, token) = value.split_once(' ').ok_or(SubmitError::Unauthorized)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(SubmitError::Unauthorized);
    }
    let bytes = zeroize::Zeroizing::new(base64url(token.trim()).ok_or(SubmitError::Unauthorized)?);
    if bytes.len() != 32 {
        return Err(SubmitError::Unauthorized);
    }
    Ok(Sha256::digest(bytes.as_slice()).into())
}

/// A validated submit.
struct Checked {
    message_id: [u8; 16],
    expires_at_ms: i64,
    priority: Priority,
    collapse_id: Option<String>,
    envelope: Vec<u8>,
}

fn check(body: &[u8], now_ms: i64, max_ttl_ms: i64) -> Result<Checked, SubmitError> {
    let request: SubmitRequest = serde_json::from_slice(body)
        .map_err(|e| SubmitError::Invalid(format!("the body is not a submit: {e}")))?;
    let message_id = hex::decode(&request.message_id)
        .ok()
        .and_then(|bytes| <[u8; 16]>::try_from(bytes).ok())
        .ok_or_else(|| SubmitError::Invalid("message_id must be 32 hex digits".into()))?;
    let envelope = base64url(&request.envelope)
        .ok_or_else(|| SubmitError::Invalid("envelope must be base64url".into()))?;
    if envelope.len() > MAX_ENVELOPE_BYTES {
        return Err(SubmitError::TooLarge(format!(
            "the envelope is {} bytes, at most {MAX_ENVELOPE_BYTES} allowed",
            envelope.len()
        )));
    }
    // The MC cannot open an envelope, but it checks its form, and that it names this message
    // and this expiry: what the MC acts on is what the phone will check.
    let sealed = countersign_protocol::push::decode_envelope(&envelope)
        .map_err(|e| SubmitError::Invalid(format!("the envelope is not a push envelope: {e}")))?;
    if sealed.message_id != message_id || sealed.expires_at_ms != request.expires_at_ms {
        return Err(SubmitError::Invalid(
            "the envelope's message id and expiry must be the submit's".into(),
        ));
    }
    let expires_at_ms = i64::try_from(request.expires_at_ms)
        .map_err(|_| SubmitError::Invalid("expires_at_ms is out of range".into()))?;
    if expires_at_ms <= now_ms {
        return Err(SubmitError::Invalid(
            "the message has expired already".into(),
        ));
    }
    if expires_at_ms > now_ms.saturating_add(max_ttl_ms) {
        return Err(SubmitError::Invalid(
            "expires_at_ms is too far ahead".into(),
        ));
    }
    if let Some(collapse) = &request.collapse_id
        && (collapse.len() > MAX_COLLAPSE_ID_BYTES || collapse.is_empty())
    {
        return Err(SubmitError::Invalid(format!(
            "collapse_id must be 1 to {MAX_COLLAPSE_ID_BYTES} bytes"
        )));
    }
    Ok(Checked {
        message_id,
        expires_at_ms,
        priority: match request.priority {
            SubmitPriority::High => Priority::High,
            SubmitPriority::Normal => Priority::Normal,
        },
        collapse_id: request.collapse_id,
        envelope,
    })
}

fn priority_name(priority: Priority) -> &'static str {
    match priority {
        Priority::High => "high",
        Priority::Normal => "normal",
    }
}

/// The queued event of a message.
pub(crate) fn queued_event(
    message_id: [u8; 16],
    envelope_digest: [u8; 32],
    size: usize,
    expires_at_ms: i64,
    priority: Priority,
) -> McEvent {
    McEvent::MessageQueued {
        message_id,
        envelope_digest,
        size: size as u64,
        expires_at_ms: u64::try_from(expires_at_ms).unwrap_or(0),
        priority: priority_name(priority).to_owned(),
    }
}

/// The handler.
pub(crate) async fn submit(
    State(mc): State<MessageCenter>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, axum::Json<SubmitAnswer>), SubmitError> {
    let token_hash = token_hash(&headers)?;
    let too_large =
        || SubmitError::TooLarge(format!("the body is larger than {MAX_BODY_BYTES} bytes"));
    if headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|length| length > MAX_BODY_BYTES)
    {
        return Err(too_large());
    }
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| too_large())?;
    let now_ms = mc.now_ms();
    let max_ttl_ms = i64::try_from(mc.0.limits.max_ttl.as_millis()).unwrap_or(i64::MAX);
    let checked = check(&body, now_ms, max_ttl_ms)?;
    let queued = accept(&mc, token_hash, checked, now_ms).await?;
    let status = if queued {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(SubmitAnswer { queued })))
}

/// A checked submit for the inserter: the MC token's hash and the message.
pub(crate) struct Pending {
    token_hash: [u8; 32],
    message: Checked,
    now_ms: i64,
}

/// What the inserter did with a submit.
pub(crate) enum Stored {
    /// No mailbox has this MC token.
    UnknownToken,
    /// Newly stored, for this mailbox, awaiting a push or not.
    Inserted(store::Mailbox, NewMessage),
    /// Not stored: its id is known already, or the mailbox is full.
    NotInserted(store::Mailbox),
}

/// A submit for the inserter, and where to say what became of it.
pub(crate) type Insert = (Pending, oneshot::Sender<Result<Stored, ()>>);

/// What the inserter needs to know of the MC.
pub(crate) struct InserterConfig {
    pub(crate) database: Database,
    pub(crate) capacity: u32,
    pub(crate) senders: crate::Senders,
    pub(crate) lease: std::time::Duration,
}

/// The inserter: concurrent submits share one mailbox lookup (by token hash) and one insert
/// statement (as concurrent appends share one transaction in the store), so a burst of
/// submits costs two statements, not two each.
pub(crate) fn spawn_inserter(config: InserterConfig) -> mpsc::Sender<Insert> {
    let (sender, mut receiver) = mpsc::channel::<Insert>(4 * store::INSERT_BATCH);
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(store::INSERT_BATCH);
        while receiver.recv_many(&mut batch, store::INSERT_BATCH).await > 0 {
            let answers = store_batch(&config, batch.iter().map(|(pending, _)| pending)).await;
            match answers {
                Ok(answers) => {
                    for ((_, reply), answer) in batch.drain(..).zip(answers) {
                        let _ = reply.send(Ok(answer));
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "mc: storing messages failed");
                    for (_, reply) in batch.drain(..) {
                        let _ = reply.send(Err(()));
                    }
                }
            }
        }
    });
    sender
}

/// Looks the batch's mailboxes up and inserts its messages; answers each submit's fate, in
/// order.
async fn store_batch<'a>(
    config: &InserterConfig,
    batch: impl Iterator<Item = &'a Pending> + Clone,
) -> Result<Vec<Stored>, sqlx::Error> {
    let mut hashes: Vec<[u8; 32]> = batch.clone().map(|p| p.token_hash).collect();
    hashes.sort_unstable();
    hashes.dedup();
    let mailboxes: std::collections::HashMap<[u8; 32], store::Mailbox> =
        store::mailboxes_by_tokens(&config.database, &hashes)
            .await?
            .into_iter()
            .collect();
    let lease_ms = i64::try_from(config.lease.as_millis()).unwrap_or(i64::MAX);
    let rows: Vec<Option<NewMessage>> = batch
        .clone()
        .map(|pending| {
            let mailbox = mailboxes.get(&pending.token_hash)?;
            let m = &pending.message;
            let push =
                mailbox.pushable() && config.senders.for_platform(mailbox.platform).is_some();
            Some(NewMessage {
                message_id: m.message_id,
                mailbox_id: mailbox.id,
                envelope: m.envelope.clone(),
                envelope_digest: Sha256::digest(&m.envelope).into(),
                expires_at_ms: m.expires_at_ms,
                priority: m.priority,
                collapse_id: m.collapse_id.clone(),
                queued_at_ms: pending.now_ms,
                push_state: if push { AWAITING } else { MAILBOX_ONLY },
                // The fast path holds the lease; the scan takes over if it is not recorded in
                // time.
                next_attempt_at_ms: pending.now_ms.saturating_add(lease_ms),
            })
        })
        .collect();
    let insertable: Vec<NewMessage> = rows.iter().flatten().cloned().collect();
    let inserted =
        store::insert_messages(&config.database, &insertable, i64::from(config.capacity)).await?;
    Ok(batch
        .zip(rows)
        .map(
            |(pending, row)| match (mailboxes.get(&pending.token_hash), row) {
                (Some(mailbox), Some(row)) if inserted.contains(&row.message_id) => {
                    Stored::Inserted(mailbox.clone(), row)
                }
                (Some(mailbox), _) => Stored::NotInserted(mailbox.clone()),
                (None, _) => Stored::UnknownToken,
            },
        )
        .collect())
}

/// Stores, records and hands over one checked message. `false`: it was queued before.
async fn accept(
    mc: &MessageCenter,
    token_hash: [u8; 32],
    m: Checked,
    now_ms: i64,
) -> Result<bool, SubmitError> {
    let digest: [u8; 32] = Sha256::digest(&m.envelope).into();
    let (message_id, size, priority) = (m.message_id, m.envelope.len(), m.priority);
    let (reply, answer) = oneshot::channel();
    let pending = Pending {
        token_hash,
        message: m,
        now_ms,
    };
    if mc.0.inserts.send((pending, reply)).await.is_err() {
        tracing::error!("mc: the inserter is gone");
        return Err(SubmitError::Internal);
    }
    let stored = match answer.await {
        Ok(Ok(stored)) => stored,
        _ => return Err(SubmitError::Internal),
    };
    let db = &mc.0.database;
    let (mailbox, row) = match stored {
        Stored::UnknownToken => return Err(SubmitError::Unauthorized),
        Stored::Inserted(mailbox, row) => (mailbox, row),
        Stored::NotInserted(mailbox) => {
            return match store::message_digest(db, &message_id)
                .await
                .map_err(|e| internal(&e.into()))?
            {
                Some((owner, stored, expires)) if owner == mailbox.id && stored == digest => {
                    // A retry: make sure the first attempt's event is there (it may not be, if
                    // that attempt failed after the insert); its id makes this a no-op
                    // otherwise.
                    let event = queued_event(message_id, digest, size, expires, priority);
                    record(mc, &mailbox.id, &event)
                        .await
                        .map_err(|e| internal(&e))?;
                    Ok(false)
                }
                Some(_) => Err(SubmitError::Conflict),
                None => Err(SubmitError::MailboxFull),
            };
        }
    };
    let event = queued_event(message_id, digest, size, row.expires_at_ms, priority);
    record(mc, &mailbox.id, &event)
        .await
        .map_err(|e| internal(&e))?;
    if row.push_state == AWAITING {
        mc.0.metrics.queue_depth.inc();
        let job = Job {
            due: store::Due {
                message_id,
                mailbox_id: mailbox.id,
                envelope: row.envelope,
                envelope_digest: digest,
                expires_at_ms: row.expires_at_ms,
                priority,
                collapse_id: row.collapse_id,
                queued_at_ms: now_ms,
                attempts: 0,
            },
            mailbox: Some(mailbox),
            recovered: false,
        };
        // A full hand-over queue only delays the push: the scan finds it after the lease.
        if mc.0.jobs.try_send(job).is_err() {
            tracing::debug!("mc fast path full; the recovery scan will push");
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(message_id: [u8; 16], expires_at_ms: u64) -> String {
        let envelope = countersign_protocol::push::Envelope {
            message_id,
            expires_at_ms,
            key_id: [1; 8],
            enc: vec![4; 65],
            ciphertext: vec![9; 20],
        };
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(envelope.encode())
    }

    #[test]
    fn checks_refuse_what_they_should() {
        let now = 1_000_000;
        let ok = |body: serde_json::Value| check(body.to_string().as_bytes(), now, 10_000);
        let id = [0x5c; 16];
        let at = |exp: i64| {
            serde_json::json!({
                "message_id": hex::encode(id),
                "expires_at_ms": exp,
                "priority": "high",
                "collapse_id": null,
                "envelope": sealed(id, u64::try_from(exp).unwrap()),
            })
        };
        let good = at(now + 5_000);
        let checked = ok(good.clone()).unwrap();
        assert_eq!(checked.message_id, id);
        assert!(matches!(ok(at(now)), Err(SubmitError::Invalid(_))));
        assert!(matches!(ok(at(now + 10_001)), Err(SubmitError::Invalid(_))));
        // The envelope must name the submit's message and expiry.
        let mut other_expiry = good.clone();
        other_expiry["expires_at_ms"] = serde_json::json!(now + 5_001);
        assert!(matches!(ok(other_expiry), Err(SubmitError::Invalid(_))));
        let mut other_id = good.clone();
        other_id["envelope"] = serde_json::json!(sealed([1; 16], 1_005_000));
        assert!(matches!(ok(other_id), Err(SubmitError::Invalid(_))));
        let mut not_an_envelope = good.clone();
        not_an_envelope["envelope"] = serde_json::json!("AAEC");
        assert!(matches!(ok(not_an_envelope), Err(SubmitError::Invalid(_))));
        let mut short_id = good.clone();
        short_id["message_id"] = serde_json::json!("0011");
        assert!(matches!(ok(short_id), Err(SubmitError::Invalid(_))));
        let mut big = good.clone();
        big["envelope"] = serde_json::json!(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(vec![7u8; MAX_ENVELOPE_BYTES + 1])
        );
        assert!(matches!(ok(big), Err(SubmitError::TooLarge(_))));
        let mut collapse = good;
        collapse["collapse_id"] = serde_json::json!("x".repeat(65));
        assert!(matches!(ok(collapse), Err(SubmitError::Invalid(_))));
    }
}
