//! The WebSocket and Noise `IK` initiator plumbing the SFS channel ([`crate::sfs_client`]) and
//! the MC channel ([`crate::mc_client`]) share: open the socket at `{base}/channel`, run the
//! handshake with the peer's prologue and hello, then seal a request and open its reply, one
//! at a time.
//!
//! Rules: the responder key is the caller's pinned one; text frames, a close and socket errors
//! end the link with a [`SdkError::Transport`] naming the peer (never a key or a payload);
//! pings, pongs and raw frames are skipped; request ids start at 1 and skip 0 when they wrap.

use std::time::Duration;

use countersign_protocol::channel::{Channel, Initiator, StaticKey};
use futures::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::client::transport;
use crate::error::SdkError;
use crate::sfs_client::ws_base;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Who is at the other end, as error texts name it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer {
    /// Lower case, the prefix of socket and handshake errors (`sfs`, `mc`).
    pub(crate) tag: &'static str,
    /// As prose names it (`SFS`, `MC`).
    pub(crate) name: &'static str,
}

/// What the handshake needs besides the static key.
pub(crate) struct Handshake<'a> {
    /// The peer's base URL (`ws`, `wss`, `http` or `https`); the socket is `{base}/channel`.
    pub(crate) base: &'a str,
    /// The pinned responder key (SEC1).
    pub(crate) responder: &'a [u8],
    /// The Noise prologue of the peer's protocol.
    pub(crate) prologue: &'a [u8],
    /// The encoded hello, the first handshake message's payload.
    pub(crate) hello: &'a [u8],
}

/// An open, encrypted channel to a peer.
pub(crate) struct NoiseLink {
    socket: Socket,
    channel: Channel,
    peer: Peer,
    next_id: u32,
    /// How long one step may take.
    pub(crate) timeout: Duration,
}

impl NoiseLink {
    /// Opens the socket and runs the handshake as `key`; answers the link and the
    /// responder's payload (the peer's welcome, still encoded). No timeout of its own.
    pub(crate) async fn open(
        peer: Peer,
        key: &StaticKey,
        handshake: Handshake<'_>,
        timeout: Duration,
    ) -> Result<(Self, Vec<u8>), SdkError> {
        let tag = peer.tag;
        let url = format!("{}/channel", ws_base(handshake.base)?);
        let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .map_err(|e| transport(format!("{tag} websocket: {e}")))?;
        let (initiator, first) = Initiator::start_with_prologue(
            key,
            handshake.responder,
            handshake.prologue,
            handshake.hello,
        )
        .map_err(|e| transport(format!("{tag} handshake: {e}")))?;
        socket
            .send(Message::binary(first))
            .await
            .map_err(|e| transport(format!("{tag} websocket: {e}")))?;
        let second = next_binary(&mut socket, peer).await?;
        let (channel, payload) = initiator
            .finish(&second)
            .map_err(|e| transport(format!("{tag} handshake: {e}")))?;
        let link = Self {
            socket,
            channel,
            peer,
            next_id: 1,
            timeout,
        };
        Ok((link, payload))
    }

    /// The id for the next request (1, 2, …, never 0).
    pub(crate) fn next_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    /// Seals and sends `message`, then reads frames until one opens to a whole message.
    pub(crate) async fn round_trip(&mut self, message: &[u8]) -> Result<Vec<u8>, SdkError> {
        for frame in self.channel.seal(message).map_err(transport)? {
            self.socket
                .send(Message::binary(frame))
                .await
                .map_err(|e| transport(format!("{} websocket: {e}", self.peer.tag)))?;
        }
        loop {
            let frame = next_binary(&mut self.socket, self.peer).await?;
            if let Some(message) = self.channel.open(&frame).map_err(transport)? {
                return Ok(message);
            }
        }
    }

    /// Closes the socket (best effort).
    pub(crate) async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

async fn next_binary(socket: &mut Socket, peer: Peer) -> Result<Vec<u8>, SdkError> {
    loop {
        match socket.next().await {
            Some(Ok(Message::Binary(frame))) => return Ok(frame.to_vec()),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            Some(Ok(Message::Text(_))) => {
                return Err(transport(format!(
                    "text message on the {} channel",
                    peer.name
                )));
            }
            Some(Err(e)) => return Err(transport(format!("{} websocket: {e}", peer.tag))),
            Some(Ok(Message::Close(_))) | None => {
                return Err(transport(format!(
                    "the {} closed the connection",
                    peer.name
                )));
            }
        }
    }
}

/// A hex P-256 public key (SEC1) from a key document, checked to be a point; `what` names
/// the document in errors.
pub(crate) fn p256_key(hex_text: &str, what: &str) -> Result<Vec<u8>, SdkError> {
    let bytes = hex::decode(hex_text).map_err(|_| transport(format!("{what}: not hex")))?;
    p256::PublicKey::from_sec1_bytes(&bytes)
        .map_err(|_| transport(format!("{what}: not a P-256 key")))?;
    Ok(bytes)
}
