//! The SDK's I/O with the device gateway (docs/device-protocol.md): fetch and pin the server
//! key over HTTP, open the WebSocket, run the Noise IK handshake with a `Hello`, read the
//! `Welcome`, then hand the channel to a background task.
//!
//! Rules enforced here:
//! - a server key is used only if its SHA-256 equals the pinned fingerprint
//!   ([`fetch_server_key`]); the Noise handshake then proves the gateway holds it;
//! - a refused `Welcome` is [`SdkError::Refused`] and the connection is dropped;
//! - one task per connection owns the socket and the Noise state, numbers the requests,
//!   routes each reply to its caller and forwards notices; a frame that does not decrypt, a
//!   text message or a malformed message closes the connection, and every caller still
//!   waiting then sees [`SdkError::Transport`];
//! - every request waits at most the configured request timeout ([`SdkError::Timeout`]).
//!
//! Log lines carry server and account ids only; keys, tokens and hsids never.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use countersign_protocol::channel::{Channel, Initiator, StaticKey, fingerprint};
use countersign_protocol::device::{
    self, Answer, Hello, Intent, Notice, Outcome, Request, RequestBody, ServerMessage,
    ServerParams, VERSION, Welcome,
};
use futures::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::error::SdkError;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Reply = oneshot::Sender<Result<Outcome, SdkError>>;

/// Where and to whom a connection goes.
#[derive(Clone)]
pub(crate) struct Target {
    pub server_id: [u8; 16],
    /// The gateway URL (`ws://…` or `wss://…`), as the QR code or the enrolment gave it.
    pub gateway: String,
    /// The server's channel key, SEC1, already checked against its pinned fingerprint.
    pub public_key: Vec<u8>,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("server_id", &hex::encode(self.server_id))
            .field("gateway", &self.gateway)
            .finish_non_exhaustive()
    }
}

pub(crate) fn transport(what: impl fmt::Display) -> SdkError {
    SdkError::Transport(what.to_string())
}

/// Checks that `gateway` is a ws:// or wss:// URL and answers it without a trailing slash.
fn gateway_base(gateway: &str) -> Result<&str, SdkError> {
    let url = url::Url::parse(gateway).map_err(|_| transport("the gateway URL is malformed"))?;
    if !matches!(url.scheme(), "ws" | "wss") {
        return Err(transport("the gateway URL is not ws:// or wss://"));
    }
    Ok(gateway.trim_end_matches('/'))
}

/// `{http base}/servers/{id}`: the gateway URL with ws → http, wss → https.
fn key_url(gateway: &str, server_id: &[u8; 16]) -> Result<String, SdkError> {
    Ok(format!(
        "{}/servers/{}",
        http_form(gateway_base(gateway)?)?,
        hex::encode(server_id)
    ))
}

/// A `ws://` or `wss://` URL's HTTP form (`http://`, `https://`); the scheme was checked by
/// the caller's URL parser, case-insensitively.
pub(crate) fn http_form(ws_url: &str) -> Result<String, SdkError> {
    let (scheme, rest) = ws_url
        .split_once("://")
        .ok_or_else(|| transport("the URL is malformed"))?;
    let scheme = if scheme.eq_ignore_ascii_case("wss") {
        "https"
    } else {
        "http"
    };
    Ok(format!("{scheme}://{rest}"))
}

/// GETs a JSON document within `timeout`; `what` names it in errors.
pub(crate) async fn get_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
    what: &str,
    timeout: Duration,
) -> Result<T, SdkError> {
    let fetch = async {
        let response = http
            .get(url)
            .send()
            .await
            .map_err(|e| transport(e.without_url()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(transport(format!("{what}: HTTP {}", status.as_u16())));
        }
        response
            .json::<T>()
            .await
            .map_err(|_| transport(format!("{what}: malformed answer")))
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| SdkError::Timeout)?
}

fn channel_url(gateway: &str, server_id: &[u8; 16]) -> Result<String, SdkError> {
    Ok(format!(
        "{}/servers/{}/channel",
        gateway_base(gateway)?,
        hex::encode(server_id)
    ))
}

#[derive(Deserialize)]
struct KeyDocument {
    server_id: String,
    public_key: String,
}

/// Fetches a server's channel key and checks it against the pinned `fingerprint`.
///
/// # Errors
/// [`SdkError::FingerprintMismatch`] when the key (or the id it is served for) is not the
/// pinned one; [`SdkError::Transport`] or [`SdkError::Timeout`] for the network.
#[tracing::instrument(skip_all, fields(server_id = %hex::encode(server_id)))]
pub(crate) async fn fetch_server_key(
    http: &reqwest::Client,
    gateway: &str,
    server_id: &[u8; 16],
    pinned: &[u8; 32],
    timeout: Duration,
) -> Result<Vec<u8>, SdkError> {
    let url = key_url(gateway, server_id)?;
    let document: KeyDocument = get_json(http, &url, "server key", timeout).await?;
    let public_key =
        hex::decode(&document.public_key).map_err(|_| transport("server key: not hex"))?;
    if fingerprint(&public_key) != *pinned
        || !document
            .server_id
            .eq_ignore_ascii_case(&hex::encode(server_id))
    {
        tracing::warn!("server key does not match the pinned fingerprint");
        return Err(SdkError::FingerprintMismatch);
    }
    Ok(public_key)
}

/// An open channel: send requests, await their answers. Cheap to clone; the connection
/// closes when the last clone is dropped.
#[derive(Clone)]
pub(crate) struct Connection {
    requests: mpsc::Sender<(RequestBody, Reply)>,
    params: ServerParams,
    timeout: Duration,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("server_id", &self.params.server_id)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// The server parameters of the `Welcome`.
    pub(crate) fn params(&self) -> &ServerParams {
        &self.params
    }

    /// Sends one request and waits for its answer.
    ///
    /// # Errors
    /// [`SdkError::Server`] for a refusal, [`SdkError::Timeout`], [`SdkError::Transport`]
    /// when the connection is gone.
    pub(crate) async fn request(&self, body: RequestBody) -> Result<Answer, SdkError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send((body, reply))
            .await
            .map_err(|_| transport("the connection is closed"))?;
        match tokio::time::timeout(self.timeout, answer).await {
            Err(_) => Err(SdkError::Timeout),
            Ok(Err(_)) => Err(transport("the connection closed before the answer")),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Ok(Ok(Outcome::Ok(answer)))) => Ok(answer),
            Ok(Ok(Ok(Outcome::Err(e)))) => Err(SdkError::Server(e)),
        }
    }
}

/// Opens a channel to `target` as `intent`, with `key` as the Noise static key. Answers
/// the connection and the notices the gateway will send on it (the receiver ends when the
/// connection closes).
///
/// # Errors
/// [`SdkError::Refused`] when the gateway refuses the `Hello`; [`SdkError::Transport`] or
/// [`SdkError::Timeout`] otherwise.
#[tracing::instrument(skip_all, fields(server_id = %hex::encode(target.server_id), account_id = ?account_of(&intent)))]
pub(crate) async fn connect(
    target: &Target,
    key: &StaticKey,
    intent: Intent,
    timeout: Duration,
) -> Result<(Connection, mpsc::UnboundedReceiver<Notice>), SdkError> {
    let (socket, channel, params) = tokio::time::timeout(timeout, handshake(target, key, intent))
        .await
        .map_err(|_| SdkError::Timeout)??;
    let (requests, requests_rx) = mpsc::channel(16);
    let (notices, notices_rx) = mpsc::unbounded_channel();
    tokio::spawn(run(socket, channel, requests_rx, notices));
    tracing::debug!("channel open");
    Ok((
        Connection {
            requests,
            params,
            timeout,
        },
        notices_rx,
    ))
}

fn account_of(intent: &Intent) -> Option<String> {
    match intent {
        Intent::Account { account_id } => Some(hex::encode(account_id.0)),
        Intent::Guest => None,
    }
}

async fn handshake(
    target: &Target,
    key: &StaticKey,
    intent: Intent,
) -> Result<(Socket, Channel, ServerParams), SdkError> {
    let url = channel_url(&target.gateway, &target.server_id)?;
    let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .map_err(|e| transport(format!("websocket: {e}")))?;
    let hello = device::encode(&Hello {
        version: VERSION,
        intent,
    })
    .map_err(transport)?;
    let (initiator, first) = Initiator::start(key, &target.public_key, &target.server_id, &hello)
        .map_err(|e| transport(format!("handshake: {e}")))?;
    socket
        .send(Message::binary(first))
        .await
        .map_err(|e| transport(format!("websocket: {e}")))?;
    let second = loop {
        match socket.next().await {
            Some(Ok(Message::Binary(frame))) => break frame,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Err(e)) => return Err(transport(format!("websocket: {e}"))),
            _ => return Err(transport("the gateway closed during the handshake")),
        }
    };
    let (channel, payload) = initiator
        .finish(&second)
        .map_err(|e| transport(format!("handshake: {e}")))?;
    match device::decode::<Welcome>(&payload).map_err(transport)? {
        Welcome::Refused { reason } => {
            tracing::info!(?reason, "the gateway refused the channel");
            Err(SdkError::Refused(reason))
        }
        Welcome::Accepted { server } if server.server_id.0 == target.server_id => {
            Ok((socket, channel, server))
        }
        Welcome::Accepted { .. } => Err(transport("the gateway answered for another server")),
    }
}

/// Owns the socket and the Noise state until either side ends the connection.
async fn run(
    mut socket: Socket,
    mut channel: Channel,
    mut requests: mpsc::Receiver<(RequestBody, Reply)>,
    notices: mpsc::UnboundedSender<Notice>,
) {
    let mut pending: HashMap<u32, Reply> = HashMap::new();
    let mut next_id: u32 = 1;
    loop {
        tokio::select! {
            request = requests.recv() => {
                let Some((body, reply)) = request else { break };
                // Callers that gave up (timeout) leave their slot; free them here.
                pending.retain(|_, waiting| !waiting.is_closed());
                let id = next_id;
                next_id = next_id.wrapping_add(1).max(1);
                let frames = device::encode(&Request { id, body })
                    .map_err(transport)
                    .and_then(|bytes| channel.seal(&bytes).map_err(transport));
                let frames = match frames {
                    Ok(frames) => frames,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        continue;
                    }
                };
                pending.insert(id, reply);
                let mut sent = Ok(());
                for frame in frames {
                    sent = socket.send(Message::binary(frame)).await;
                    if sent.is_err() {
                        break;
                    }
                }
                if let Err(e) = sent {
                    tracing::debug!(error = %e, "send failed; closing");
                    break;
                }
            }
            frame = socket.next() => {
                let data = match frame {
                    Some(Ok(Message::Binary(data))) => data,
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Ok(Message::Text(_))) => {
                        tracing::warn!("text message on the channel; closing");
                        break;
                    }
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "websocket failed");
                        break;
                    }
                };
                let message = match channel.open(&data) {
                    Ok(Some(message)) => message,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "undecryptable frame; closing");
                        break;
                    }
                };
                match device::decode::<ServerMessage>(&message) {
                    Ok(ServerMessage::Reply { id, outcome }) => {
                        if let Some(waiting) = pending.remove(&id) {
                            let _ = waiting.send(Ok(outcome));
                        }
                    }
                    Ok(ServerMessage::Notice(notice)) => {
                        let _ = notices.send(notice);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "malformed message; closing");
                        break;
                    }
                }
            }
        }
    }
    let _ = socket.close(None).await;
    tracing::debug!("channel closed");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn urls_follow_the_gateway() {
        let id = [0xab; 16];
        let hex_id = "ab".repeat(16);
        assert_eq!(
            key_url("ws://127.0.0.1:8080/v1/device", &id).unwrap(),
            format!("http://127.0.0.1:8080/v1/device/servers/{hex_id}")
        );
        assert_eq!(
            key_url("wss://gw.example.com/v1/device/", &id).unwrap(),
            format!("https://gw.example.com/v1/device/servers/{hex_id}")
        );
        assert_eq!(
            channel_url("wss://gw.example.com/v1/device", &id).unwrap(),
            format!("wss://gw.example.com/v1/device/servers/{hex_id}/channel")
        );
        assert!(key_url("https://gw.example.com", &id).is_err());
        assert!(channel_url("not a url", &id).is_err());
    }
}
