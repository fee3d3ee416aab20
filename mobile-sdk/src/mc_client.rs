//! The SDK's I/O with its Message Center (docs/message-center.md, "The channel"): fetch the
//! MC key for a trust-on-first-use setup, open the WebSocket, run the Noise IK handshake with
//! the MC prologue and an [`McHello`] (naming the mailbox, or none to register one), read the
//! [`McWelcome`], then ask and read answers one at a time: register, update the push token,
//! pull, acknowledge.
//!
//! Rules enforced here (as for the SFS channel, `sfs_client`):
//! - the responder key is the pinned MC key of [`McConfig`], never a fetched one (only
//!   [`fetch_key`], which the app calls once and pins, fetches);
//! - the initiator key is the mailbox's channel key, made for the registration and bound by
//!   the MC to the mailbox;
//! - one request at a time (`&mut self`), a reply with another id closes the channel, every
//!   step waits at most the request timeout.
//!
//! Log lines carry no key, MC token or push token.

use std::fmt;
use std::time::Duration;

use countersign_protocol::channel::{MC_PROLOGUE, StaticKey};
use countersign_protocol::device::{Bytes, Secret};
use countersign_protocol::mc::{
    self, McAnswer, McHello, McMessage, McOutcome, McRequest, McRequestBody, McServerMessage,
    McWelcome, Platform,
};
use serde::Deserialize;

use crate::client::{get_json, http_form, transport};
use crate::error::SdkError;
use crate::noise_link::{self, Handshake, NoiseLink, Peer};
use crate::push::McConfig;
use crate::sfs_client::ws_base;

/// How errors name the Message Center.
const MC: Peer = Peer {
    tag: "mc",
    name: "MC",
};

#[derive(Deserialize)]
struct KeyDocument {
    channel_public_key: String,
}

/// `GET {http base}/key`: the MC's channel key (SEC1, checked to be a P-256 point). Trust on
/// first use: whoever answers this request is believed.
pub(crate) async fn fetch_key(
    http: &reqwest::Client,
    base: &str,
    timeout: Duration,
) -> Result<Vec<u8>, SdkError> {
    let url = format!("{}/key", http_form(&ws_base(base)?)?);
    let document: KeyDocument = get_json(http, &url, "MC key", timeout).await?;
    noise_link::p256_key(&document.channel_public_key, "MC key")
}

/// An open MC channel.
pub(crate) struct McConnection {
    link: NoiseLink,
}

impl fmt::Debug for McConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("McConnection").finish_non_exhaustive()
    }
}

/// Opens the MC channel with `key`, for `mailbox` (`None`: to register one).
///
/// # Errors
/// [`SdkError::McRefused`] when the MC refuses the hello; [`SdkError::Transport`] or
/// [`SdkError::Timeout`] otherwise.
pub(crate) async fn connect(
    config: &McConfig,
    key: &StaticKey,
    mailbox: Option<[u8; 16]>,
    timeout: Duration,
) -> Result<McConnection, SdkError> {
    let link = tokio::time::timeout(timeout, handshake(config, key, mailbox, timeout))
        .await
        .map_err(|_| SdkError::Timeout)??;
    tracing::debug!(registered = mailbox.is_some(), "mc channel open");
    Ok(McConnection { link })
}

async fn handshake(
    config: &McConfig,
    key: &StaticKey,
    mailbox: Option<[u8; 16]>,
    timeout: Duration,
) -> Result<NoiseLink, SdkError> {
    let hello = mc::encode(&McHello {
        version: mc::VERSION,
        mailbox: mailbox.map(Bytes),
    })
    .map_err(transport)?;
    let handshake = Handshake {
        base: &config.url,
        responder: &config.channel_public_key,
        prologue: MC_PROLOGUE,
        hello: &hello,
    };
    let (link, payload) = NoiseLink::open(MC, key, handshake, timeout).await?;
    match mc::decode::<McWelcome>(&payload).map_err(transport)? {
        McWelcome::Refused { reason } => {
            tracing::info!(?reason, "the MC refused the channel");
            Err(SdkError::McRefused(reason))
        }
        McWelcome::Accepted {} => Ok(link),
    }
}

fn unexpected(request: &str) -> SdkError {
    SdkError::Transport(format!("unexpected answer to mc {request}"))
}

impl McConnection {
    /// Sends one request and waits for its answer.
    ///
    /// # Errors
    /// [`SdkError::Mc`] for a refusal, [`SdkError::Timeout`], [`SdkError::Transport`].
    async fn request(&mut self, body: McRequestBody) -> Result<McAnswer, SdkError> {
        let id = self.link.next_id();
        let timeout = self.link.timeout;
        let reply = tokio::time::timeout(timeout, self.exchange(id, body))
            .await
            .map_err(|_| SdkError::Timeout)??;
        match reply {
            McOutcome::Ok(answer) => Ok(answer),
            McOutcome::Err(error) => Err(SdkError::Mc(error)),
        }
    }

    async fn exchange(&mut self, id: u32, body: McRequestBody) -> Result<McOutcome, SdkError> {
        let bytes = mc::encode(&McRequest { id, body }).map_err(transport)?;
        let message = self.link.round_trip(&bytes).await?;
        let reply: McServerMessage = mc::decode(&message).map_err(transport)?;
        reply.validate().map_err(transport)?;
        let McServerMessage::Reply {
            id: answered,
            outcome,
        } = reply;
        if answered != id {
            return Err(transport("the MC answered another request"));
        }
        Ok(outcome)
    }

    /// `register`: a new mailbox and its MC token (the channel must have named no mailbox).
    pub(crate) async fn register(
        &mut self,
        platform: Platform,
        push_token: &str,
        app_id: &str,
    ) -> Result<([u8; 16], Secret<32>), SdkError> {
        match self
            .request(McRequestBody::Register {
                platform,
                push_token: push_token.to_owned(),
                app_id: app_id.to_owned(),
            })
            .await?
        {
            McAnswer::Registered { mailbox, mc_token } => Ok((mailbox.0, mc_token)),
            _ => Err(unexpected("register")),
        }
    }

    /// `update_push_token`.
    pub(crate) async fn update_push_token(&mut self, push_token: &str) -> Result<(), SdkError> {
        match self
            .request(McRequestBody::UpdatePushToken {
                push_token: push_token.to_owned(),
            })
            .await?
        {
            McAnswer::Done => Ok(()),
            _ => Err(unexpected("update_push_token")),
        }
    }

    /// `pull`: up to `limit` outstanding messages, oldest first, and whether more wait.
    pub(crate) async fn pull(&mut self, limit: u16) -> Result<(Vec<McMessage>, bool), SdkError> {
        match self.request(McRequestBody::Pull { limit }).await? {
            McAnswer::Messages { messages, more } => Ok((messages, more)),
            _ => Err(unexpected("pull")),
        }
    }

    /// `ack`, in batches of at most 100 ids.
    pub(crate) async fn ack(&mut self, message_ids: Vec<Bytes<16>>) -> Result<(), SdkError> {
        for batch in message_ids.chunks(100) {
            match self
                .request(McRequestBody::Ack {
                    message_ids: batch.to_vec(),
                })
                .await?
            {
                McAnswer::Done => {}
                _ => return Err(unexpected("ack")),
            }
        }
        Ok(())
    }

    /// Closes the channel (best effort).
    pub(crate) async fn close(self) {
        self.link.close().await;
    }
}
