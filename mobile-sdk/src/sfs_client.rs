//! The SDK's I/O with its second-factor server (docs/second-factor.md, "The channel"): fetch
//! the SFS keys for a trust-on-first-use setup, open the WebSocket, run the Noise IK handshake
//! with the SFS prologue and an [`SfsHello`], read the [`SfsWelcome`], then ask and read
//! answers one at a time.
//!
//! Rules enforced here:
//! - the responder key is the pinned SFS channel key of [`SfsConfig`], never a fetched one
//!   (only [`fetch_keys`], which the app calls once and pins, fetches);
//! - the initiator key is the app instance's SFS key, made once and bound by the SFS to the
//!   app instance id at the first connection;
//! - the SFS answers in order, so one connection carries one request at a time (`&mut self`)
//!   and a reply with another id closes it; every step waits at most the request timeout;
//! - a refusal the user must hear of (wrong PIN, locked, revoked, not registered) becomes
//!   [`SdkError::SecondFactor`]; any other one [`SdkError::Sfs`].
//!
//! Log lines carry no key, PIN, nonce, challenge or attestation.

use std::fmt;
use std::time::Duration;

use countersign_protocol::channel::{Channel, Initiator, SFS_PROLOGUE, StaticKey};
use countersign_protocol::device::Bytes;
use countersign_protocol::sfs::{
    self, FactorState, SfsAnswer, SfsBody, SfsCode, SfsError, SfsHello, SfsOutcome, SfsReply,
    SfsRequest, SfsWelcome, VERSION,
};
use futures::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::error::SdkError;
use crate::machine::SecondFactorEvent;
use crate::second_factor::SfsConfig;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

use crate::client::{get_json, http_form, transport};

/// The SFS base as a WebSocket URL (`ws://…` or `wss://…`), no trailing slash; `http` and
/// `https` bases are turned into their WebSocket forms.
pub(crate) fn ws_base(base: &str) -> Result<String, SdkError> {
    let url = url::Url::parse(base).map_err(|_| transport("the SFS URL is malformed"))?;
    let scheme = match url.scheme() {
        "ws" | "http" => "ws",
        "wss" | "https" => "wss",
        _ => {
            return Err(transport(
                "the SFS URL is not ws://, wss://, http:// or https://",
            ));
        }
    };
    let rest = base
        .trim_end_matches('/')
        .split_once("://")
        .map(|(_, rest)| rest)
        .ok_or_else(|| transport("the SFS URL is malformed"))?;
    Ok(format!("{scheme}://{rest}"))
}

/// `{http base}/key`: the SFS base with ws → http, wss → https.
fn key_url(base: &str) -> Result<String, SdkError> {
    Ok(format!("{}/key", http_form(&ws_base(base)?)?))
}

#[derive(Deserialize)]
struct KeyDocument {
    channel_public_key: String,
    attestation_public_key: String,
}

/// `GET {http base}/key`: the SFS's channel and attestation keys (SEC1, checked to be P-256
/// points). Trust on first use: whoever answers this request is believed.
pub(crate) async fn fetch_keys(
    http: &reqwest::Client,
    base: &str,
    timeout: Duration,
) -> Result<(Vec<u8>, Vec<u8>), SdkError> {
    let url = key_url(base)?;
    let document: KeyDocument = get_json(http, &url, "SFS keys", timeout).await?;
    let key = |hex_text: &str| {
        let bytes = hex::decode(hex_text).map_err(|_| transport("SFS keys: not hex"))?;
        p256::PublicKey::from_sec1_bytes(&bytes)
            .map_err(|_| transport("SFS keys: not a P-256 key"))?;
        Ok::<_, SdkError>(bytes)
    };
    Ok((
        key(&document.channel_public_key)?,
        key(&document.attestation_public_key)?,
    ))
}

/// What the SFS said about this app instance when the channel opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Welcomed {
    pub pin_registered: bool,
    pub biometric_registered: bool,
    pub state: FactorState,
}

/// An open SFS channel.
pub(crate) struct SfsConnection {
    socket: Socket,
    channel: Channel,
    next_id: u32,
    timeout: Duration,
    pub(crate) welcome: Welcomed,
}

impl fmt::Debug for SfsConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SfsConnection")
            .field("welcome", &self.welcome)
            .finish_non_exhaustive()
    }
}

/// Opens the SFS channel as `app_instance`, with `key` as the Noise static key.
///
/// # Errors
/// [`SdkError::SfsRefused`] when the SFS refuses the `SfsHello`; [`SdkError::Transport`] or
/// [`SdkError::Timeout`] otherwise.
#[tracing::instrument(skip_all, fields(app_instance = %hex::encode(app_instance)))]
pub(crate) async fn connect(
    config: &SfsConfig,
    key: &StaticKey,
    app_instance: [u8; 16],
    timeout: Duration,
) -> Result<SfsConnection, SdkError> {
    let (socket, channel, welcome) =
        tokio::time::timeout(timeout, handshake(config, key, app_instance))
            .await
            .map_err(|_| SdkError::Timeout)??;
    tracing::debug!("sfs channel open");
    Ok(SfsConnection {
        socket,
        channel,
        next_id: 1,
        timeout,
        welcome,
    })
}

async fn handshake(
    config: &SfsConfig,
    key: &StaticKey,
    app_instance: [u8; 16],
) -> Result<(Socket, Channel, Welcomed), SdkError> {
    let url = format!("{}/channel", ws_base(&config.url)?);
    let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .map_err(|e| transport(format!("sfs websocket: {e}")))?;
    let hello = sfs::encode(&SfsHello {
        version: VERSION,
        app_instance: Bytes(app_instance),
    })
    .map_err(transport)?;
    let (initiator, first) =
        Initiator::start_with_prologue(key, &config.channel_public_key, SFS_PROLOGUE, &hello)
            .map_err(|e| transport(format!("sfs handshake: {e}")))?;
    socket
        .send(Message::binary(first))
        .await
        .map_err(|e| transport(format!("sfs websocket: {e}")))?;
    let second = next_binary(&mut socket).await?;
    let (channel, payload) = initiator
        .finish(&second)
        .map_err(|e| transport(format!("sfs handshake: {e}")))?;
    match sfs::decode::<SfsWelcome>(&payload).map_err(transport)? {
        SfsWelcome::Refused { reason } => {
            tracing::info!(?reason, "the SFS refused the channel");
            Err(SdkError::SfsRefused(reason))
        }
        SfsWelcome::Accepted {
            pin_registered,
            biometric_registered,
            state,
        } => Ok((
            socket,
            channel,
            Welcomed {
                pin_registered,
                biometric_registered,
                state,
            },
        )),
    }
}

async fn next_binary(socket: &mut Socket) -> Result<Vec<u8>, SdkError> {
    loop {
        match socket.next().await {
            Some(Ok(Message::Binary(frame))) => return Ok(frame.to_vec()),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            Some(Ok(Message::Text(_))) => return Err(transport("text message on the SFS channel")),
            Some(Err(e)) => return Err(transport(format!("sfs websocket: {e}"))),
            Some(Ok(Message::Close(_))) | None => {
                return Err(transport("the SFS closed the connection"));
            }
        }
    }
}

impl SfsConnection {
    /// Sends one request and waits for its answer.
    ///
    /// # Errors
    /// [`SdkError::SecondFactor`] for a refusal the user must hear of, [`SdkError::Sfs`] for
    /// another refusal, [`SdkError::Timeout`], [`SdkError::Transport`].
    pub(crate) async fn request(&mut self, body: SfsBody) -> Result<SfsAnswer, SdkError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let timeout = self.timeout;
        let reply = tokio::time::timeout(timeout, self.exchange(id, body))
            .await
            .map_err(|_| SdkError::Timeout)??;
        match reply.outcome {
            SfsOutcome::Ok(answer) => Ok(answer),
            SfsOutcome::Err(error) => Err(refusal(error)),
        }
    }

    async fn exchange(&mut self, id: u32, body: SfsBody) -> Result<SfsReply, SdkError> {
        let bytes = sfs::encode(&SfsRequest { id, body }).map_err(transport)?;
        for frame in self.channel.seal(&bytes).map_err(transport)? {
            self.socket
                .send(Message::binary(frame))
                .await
                .map_err(|e| transport(format!("sfs websocket: {e}")))?;
        }
        let message = loop {
            let frame = next_binary(&mut self.socket).await?;
            if let Some(message) = self.channel.open(&frame).map_err(transport)? {
                break message;
            }
        };
        let reply: SfsReply = sfs::decode(&message).map_err(transport)?;
        if reply.id != id {
            return Err(transport("the SFS answered another request"));
        }
        Ok(reply)
    }

    /// Closes the channel (best effort).
    pub(crate) async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

/// The event a refusal means for the user, if it is one they must hear of.
pub(crate) fn event_of(code: SfsCode) -> Option<SecondFactorEvent> {
    match code {
        SfsCode::WrongPin { attempts_left } => Some(SecondFactorEvent::WrongPin { attempts_left }),
        SfsCode::Locked { until_ms } => Some(SecondFactorEvent::Locked { until_ms }),
        SfsCode::Revoked => Some(SecondFactorEvent::Revoked),
        SfsCode::NotRegistered => Some(SecondFactorEvent::NotRegistered),
        SfsCode::Invalid | SfsCode::AlreadyRegistered | SfsCode::NotAllowed | SfsCode::Internal => {
            None
        }
    }
}

fn refusal(error: SfsError) -> SdkError {
    event_of(error.code).map_or(SdkError::Sfs(error), SdkError::SecondFactor)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn urls_follow_the_sfs_base() {
        assert_eq!(
            key_url("ws://127.0.0.1:8080/v1/sfs").unwrap(),
            "http://127.0.0.1:8080/v1/sfs/key"
        );
        assert_eq!(
            key_url("wss://sfs.example.com/v1/sfs/").unwrap(),
            "https://sfs.example.com/v1/sfs/key"
        );
        assert_eq!(
            ws_base("https://sfs.example.com/v1/sfs").unwrap(),
            "wss://sfs.example.com/v1/sfs"
        );
        assert_eq!(
            ws_base("http://127.0.0.1:1/v1/sfs/").unwrap(),
            "ws://127.0.0.1:1/v1/sfs"
        );
        assert!(ws_base("ftp://x").is_err());
        assert!(key_url("not a url").is_err());
    }

    #[test]
    fn refusals_the_user_must_hear_of_are_events() {
        let wrong = SfsError::new(SfsCode::WrongPin { attempts_left: 2 }, "wrong PIN");
        assert_eq!(
            refusal(wrong),
            SdkError::SecondFactor(SecondFactorEvent::WrongPin { attempts_left: 2 })
        );
        assert_eq!(
            refusal(SfsError::new(SfsCode::Locked { until_ms: 9 }, "x")),
            SdkError::SecondFactor(SecondFactorEvent::Locked { until_ms: 9 })
        );
        assert!(matches!(
            refusal(SfsError::new(SfsCode::Internal, "x")),
            SdkError::Sfs(_)
        ));
    }
}
