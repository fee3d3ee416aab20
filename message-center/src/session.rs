//! One channel's requests, after the handshake.
//!
//! ```text
//! hello without a mailbox (anonymous, rate-limited) → register → the channel is the mailbox's
//! hello with a mailbox (static key checked)         → update_push_token | pull | ack
//! ```
//!
//! - `register` binds the channel's Noise static key to a new mailbox and answers a fresh
//!   random 32-byte MC token (only its SHA-256 is stored) and the mailbox id. One mailbox per
//!   static key: registering again is `conflict`. The mailbox row is written before its
//!   `mc.mailbox_registered` event; a row a crash left without its event is replaced by the
//!   next registration of that key.
//! - `update_push_token` replaces the push token (and clears a drop): later messages are
//!   pushed again.
//! - `pull` answers unexpired, unacknowledged messages, oldest first, at most `limit` (1–100)
//!   and at most [`PULL_BYTES`] of envelopes, with `more` when some were left; it records
//!   `mc.message_pulled`.
//! - `ack` (1–100 ids) records `mc.message_acknowledged` for those of this mailbox and removes
//!   them; ids of other mailboxes or unknown ones are ignored.
//!
//! Refusals are [`McError`]s; internal failures are logged with the mailbox id and answered
//! `internal` without detail. Tokens (MC and push) never reach a log line or an event.

use sha2::{Digest, Sha256};

use countersign_protocol::device::{Blob, Bytes, Secret};

use crate::events::McEvent;
use crate::store::{self, AWAITING, Mailbox};
use crate::{Error, MessageCenter, random, record};
use countersign_protocol::mc::{
    McAnswer, McError, McErrorCode, McMessage, McRequestBody, Platform,
};

pub use countersign_protocol::mc::{
    MAX_APP_ID_BYTES, MAX_BATCH, MAX_PULL_ENVELOPE_BYTES as PULL_BYTES, MAX_PUSH_TOKEN_BYTES,
};

type Answer = Result<McAnswer, McError>;

/// One connection's state.
#[derive(Debug)]
pub struct Session {
    mc: MessageCenter,
    /// SHA-256 of the channel's Noise static key.
    key_digest: [u8; 32],
    /// The channel's mailbox: named at the hello, or registered on this channel.
    mailbox: Option<Mailbox>,
    /// The hello named the mailbox (such a channel may not `register`).
    opened_with_mailbox: bool,
}

/// The refusal of a second mailbox for one static key.
fn has_a_mailbox() -> McError {
    McError::new(McErrorCode::Conflict, "this key has a mailbox already")
}

fn invalid(message: &str) -> McError {
    McError::new(McErrorCode::Invalid, message)
}

impl Session {
    pub(crate) fn new(mc: MessageCenter, key_digest: [u8; 32], mailbox: Option<Mailbox>) -> Self {
        Self {
            mc,
            key_digest,
            opened_with_mailbox: mailbox.is_some(),
            mailbox,
        }
    }

    /// The channel's mailbox id, once there is one.
    #[must_use]
    pub fn mailbox(&self) -> Option<[u8; 16]> {
        self.mailbox.as_ref().map(|m| m.id)
    }

    /// Answers one request.
    pub async fn handle(&mut self, body: McRequestBody) -> Answer {
        let result = match body {
            McRequestBody::Register {
                platform,
                push_token,
                app_id,
            } => self.register(platform, &push_token, &app_id).await,
            McRequestBody::UpdatePushToken { push_token } => {
                self.update_push_token(&push_token).await
            }
            McRequestBody::Pull { limit } => self.pull(limit).await,
            McRequestBody::Ack { message_ids } => self.ack(&message_ids).await,
        };
        result.unwrap_or_else(|error| Err(self.internal(&error)))
    }

    fn internal(&self, error: &Error) -> McError {
        let mailbox = self.mailbox().map(hex::encode).unwrap_or_default();
        tracing::error!(%mailbox, %error, "mc request failed");
        McError::new(McErrorCode::Internal, "internal error; try again later")
    }

    fn registered(&self) -> Result<&Mailbox, McError> {
        self.mailbox.as_ref().ok_or_else(|| {
            McError::new(
                McErrorCode::NotAllowed,
                "register first, or open the channel with the mailbox",
            )
        })
    }

    async fn register(
        &mut self,
        platform: Platform,
        push_token: &str,
        app_id: &str,
    ) -> Result<Answer, Error> {
        if self.opened_with_mailbox {
            return Ok(Err(McError::new(
                McErrorCode::NotAllowed,
                "a channel opened with a mailbox may not register",
            )));
        }
        if self.mailbox.is_some() {
            return Ok(Err(has_a_mailbox()));
        }
        if push_token.len() > MAX_PUSH_TOKEN_BYTES {
            return Ok(Err(invalid("push_token is longer than 4096 bytes")));
        }
        if app_id.is_empty() || app_id.len() > MAX_APP_ID_BYTES {
            return Ok(Err(invalid("app_id must be 1 to 255 bytes")));
        }
        let id: [u8; 16] = random()?;
        let token = zeroize::Zeroizing::new(random::<32>()?);
        let token_hash: [u8; 32] = Sha256::digest(token.as_slice()).into();
        let db = &self.mc.0.database;
        let now = self.mc.now_ms();
        let key_digest = self.key_digest;
        let insert = || {
            store::insert_mailbox(
                db,
                &id,
                &token_hash,
                &key_digest,
                platform,
                app_id,
                push_token,
                now,
            )
        };
        let mut inserted = insert().await?;
        if !inserted && let Some(existing) = store::mailbox_by_key(db, &self.key_digest).await? {
            // A row no event names is a registration a crash cut short: its token never
            // reached the app, so it may go.
            let named = self
                .mc
                .0
                .store
                .read_stream(
                    &crate::events::stream(&existing.id),
                    None,
                    countersign_eventstore::Direction::Forwards,
                    1,
                )
                .await?;
            if !named.is_empty() {
                return Ok(Err(has_a_mailbox()));
            }
            store::delete_mailbox(db, &existing.id).await?;
            inserted = insert().await?;
        }
        if !inserted {
            return Ok(Err(has_a_mailbox()));
        }
        let event = McEvent::MailboxRegistered {
            platform: store::platform_name(platform).to_owned(),
            app_id: app_id.to_owned(),
            token_digest: token_hash,
            channel_key_digest: self.key_digest,
            push: !push_token.is_empty(),
        };
        let new = event.to_new(random()?)?;
        self.mc
            .0
            .store
            .append(
                &crate::events::stream(&id),
                countersign_eventstore::ExpectedVersion::NoStream,
                vec![new],
            )
            .await?;
        self.mailbox = Some(Mailbox {
            id,
            platform,
            app_id: app_id.to_owned(),
            push_token: push_token.to_owned(),
            push_dropped: false,
            channel_key_digest: self.key_digest,
        });
        tracing::debug!(mailbox = %hex::encode(id), "mc mailbox registered");
        Ok(Ok(McAnswer::Registered {
            mailbox: Bytes(id),
            mc_token: Secret::new(*token),
        }))
    }

    async fn update_push_token(&mut self, push_token: &str) -> Result<Answer, Error> {
        let id = match self.registered() {
            Ok(mailbox) => mailbox.id,
            Err(refused) => return Ok(Err(refused)),
        };
        if push_token.len() > MAX_PUSH_TOKEN_BYTES {
            return Ok(Err(invalid("push_token is longer than 4096 bytes")));
        }
        store::update_push_token(&self.mc.0.database, &id, push_token).await?;
        record(
            &self.mc,
            &id,
            &McEvent::PushTokenUpdated {
                push_token_digest: Sha256::digest(push_token.as_bytes()).into(),
            },
        )
        .await?;
        if let Some(mailbox) = &mut self.mailbox {
            push_token.clone_into(&mut mailbox.push_token);
            mailbox.push_dropped = false;
        }
        Ok(Ok(McAnswer::Done))
    }

    async fn pull(&mut self, limit: u16) -> Result<Answer, Error> {
        let id = match self.registered() {
            Ok(mailbox) => mailbox.id,
            Err(refused) => return Ok(Err(refused)),
        };
        let limit = usize::from(limit);
        if limit == 0 || limit > MAX_BATCH {
            return Ok(Err(invalid("limit must be 1 to 100")));
        }
        let now = self.mc.now_ms();
        let rows = store::pull(
            &self.mc.0.database,
            &id,
            now,
            i64::try_from(limit + 1).unwrap_or(1),
        )
        .await?;
        let mut more = rows.len() > limit;
        let mut bytes = 0usize;
        let mut messages = Vec::with_capacity(rows.len().min(limit));
        for (message_id, expires_at_ms, envelope) in rows.into_iter().take(limit) {
            bytes += envelope.len();
            if bytes > PULL_BYTES && !messages.is_empty() {
                more = true;
                break;
            }
            messages.push(McMessage {
                message_id: Bytes(message_id),
                expires_at_ms: u64::try_from(expires_at_ms).unwrap_or(0),
                envelope: Blob(envelope),
            });
        }
        if !messages.is_empty() {
            record(
                &self.mc,
                &id,
                &McEvent::MessagePulled {
                    message_ids: messages.iter().map(|m| m.message_id.0).collect(),
                },
            )
            .await?;
        }
        Ok(Ok(McAnswer::Messages { messages, more }))
    }

    async fn ack(&mut self, message_ids: &[Bytes<16>]) -> Result<Answer, Error> {
        let id = match self.registered() {
            Ok(mailbox) => mailbox.id,
            Err(refused) => return Ok(Err(refused)),
        };
        if message_ids.is_empty() || message_ids.len() > MAX_BATCH {
            return Ok(Err(invalid("ack 1 to 100 message ids")));
        }
        let mut ids: Vec<[u8; 16]> = message_ids.iter().map(|b| b.0).collect();
        ids.sort_unstable();
        ids.dedup();
        let db = &self.mc.0.database;
        let owned: Vec<[u8; 16]> = store::owned(db, &id, &ids)
            .await?
            .into_iter()
            .map(|(message, _)| message)
            .collect();
        if owned.is_empty() {
            return Ok(Ok(McAnswer::Done));
        }
        // The event first: a crash before the delete leaves the messages to be pulled and
        // acknowledged again, never gone without a record.
        record(
            &self.mc,
            &id,
            &McEvent::MessageAcknowledged {
                message_ids: owned.clone(),
            },
        )
        .await?;
        let gone = store::delete_messages(db, &owned).await?;
        let awaiting = gone.iter().filter(|(_, state)| *state == AWAITING).count();
        self.mc
            .0
            .metrics
            .queue_depth
            .dec_by(i64::try_from(awaiting).unwrap_or(0));
        Ok(Ok(McAnswer::Done))
    }
}
