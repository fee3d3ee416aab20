//! One app connection on `GET /v1/mc/channel`: the Noise `IK` handshake with the MC prologue,
//! then requests until either side closes.
//!
//! Built like the SFS's connection: the socket logic is generic over a stream of incoming
//! frames and a sink of outgoing ones ([`serve_frames_from`]), so it runs over axum's
//! WebSocket in production and over channels in tests. The first frame must arrive within
//! the handshake timeout, each later one within the idle timeout; requests are answered one
//! at a time in arrival order.
//!
//! The handshake writes nothing. A hello naming a mailbox is accepted only from the static
//! key that registered it; an unknown mailbox and another key get the same refusal
//! (`unknown_mailbox`), so a stranger learns nothing of which mailboxes exist. A hello without
//! a mailbox takes a token from the anonymous [`limiter`](crate::limiter); with none left it
//! is refused `busy`.

use std::net::IpAddr;

use crate::session::Session;
use crate::{Error, MessageCenter, store};
use axum::extract::ws::{Message, WebSocket};
use axum::extract::{State, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use countersign_protocol::channel::{self, Channel, MC_PROLOGUE, Responder};
use countersign_protocol::mc::{
    self, McError, McErrorCode, McHello, McOutcome, McRefusal, McRequest, McServerMessage,
    McWelcome, VERSION,
};
use futures::{Sink, SinkExt, Stream, StreamExt};

/// Why a connection ended. Logged at debug level: apps disconnect all the time.
#[derive(Debug, thiserror::Error)]
pub enum Closed {
    /// No first frame within the handshake timeout.
    #[error("the app sent no handshake in time")]
    HandshakeTimeout,
    /// No frame from the app for the idle timeout after the handshake.
    #[error("the app sent nothing for too long")]
    IdleTimeout,
    /// The app closed the connection.
    #[error("the app closed the connection")]
    ByApp,
    /// A frame did not authenticate or parse.
    #[error("channel: {0}")]
    Channel(#[from] channel::ChannelError),
    /// A handshake payload was not a message.
    #[error("bad message: {0}")]
    Message(#[from] mc::MessageError),
    /// The socket failed.
    #[error("socket: {0}")]
    Socket(String),
    /// The handshake was refused.
    #[error("refused: {0:?}")]
    Refused(McRefusal),
    /// The MC failed.
    #[error(transparent)]
    Mc(#[from] Error),
}

/// `GET /v1/mc/channel`.
pub(crate) async fn channel(
    State(mc): State<MessageCenter>,
    extensions: axum::http::Extensions,
    upgrade: WebSocketUpgrade,
) -> Response {
    // The client's address, when the listener recorded it: anonymous work is limited per
    // address.
    let peer = extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip());
    upgrade
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_frame_size(channel::MAX_FRAME)
        .max_message_size(channel::MAX_FRAME)
        .on_upgrade(move |socket| serve_socket(mc, peer, socket))
        .into_response()
}

async fn serve_socket(mc: MessageCenter, peer: Option<IpAddr>, socket: WebSocket) {
    let (sink, stream) = socket.split();
    let frames = Box::pin(stream.filter_map(|message| async move {
        match message {
            Ok(Message::Binary(bytes)) => Some(Ok(bytes.to_vec())),
            Ok(Message::Ping(_) | Message::Pong(_)) => None,
            Ok(Message::Text(_)) => Some(Err("a text message on a binary channel".to_owned())),
            Ok(Message::Close(_)) => Some(Err("closed".to_owned())),
            Err(error) => Some(Err(error.to_string())),
        }
    }));
    let sink =
        Box::pin(sink.with(|frame: Vec<u8>| async move {
            Ok::<_, axum::Error>(Message::Binary(frame.into()))
        }));
    if let Err(reason) = serve_frames_from(mc, peer, frames, sink).await {
        tracing::debug!(%reason, "mc connection closed");
    }
}

/// Checks the hello and the channel key; answers the session or why not. Writes nothing.
async fn admit(
    mc: &MessageCenter,
    peer: Option<IpAddr>,
    hello: &McHello,
    remote_static: &[u8],
) -> Result<Result<Session, McRefusal>, Closed> {
    if hello.version != VERSION {
        return Ok(Err(McRefusal::UnsupportedVersion));
    }
    let key_digest = channel::fingerprint(remote_static);
    match &hello.mailbox {
        None => {
            if !mc.0.limiter.take(peer, mc.now_ms()) {
                return Ok(Err(McRefusal::Busy));
            }
            Ok(Ok(Session::new(mc.clone(), key_digest, None)))
        }
        Some(id) => {
            let mailbox = store::mailbox_by_id(&mc.0.database, &id.0)
                .await
                .map_err(Error::from)?;
            match mailbox {
                Some(mailbox) if mailbox.channel_key_digest == key_digest => {
                    Ok(Ok(Session::new(mc.clone(), key_digest, Some(mailbox))))
                }
                _ => Ok(Err(McRefusal::UnknownMailbox)),
            }
        }
    }
}

/// Runs one connection over frames from `peer` (its address counts its anonymous work);
/// answers why it ended.
///
/// # Errors
/// [`Closed`] says why the connection ended early.
pub async fn serve_frames_from<In, Out>(
    mc: MessageCenter,
    peer: Option<IpAddr>,
    mut incoming: In,
    mut outgoing: Out,
) -> Result<(), Closed>
where
    In: Stream<Item = Result<Vec<u8>, String>> + Unpin,
    Out: Sink<Vec<u8>> + Unpin,
    Out::Error: std::fmt::Display,
{
    let first = tokio::time::timeout(mc.0.limits.handshake_timeout, incoming.next())
        .await
        .map_err(|_| Closed::HandshakeTimeout)?
        .ok_or(Closed::ByApp)?
        .map_err(Closed::Socket)?;
    let (responder, hello) =
        Responder::read_with_prologue(&mc.0.keys.channel, MC_PROLOGUE, &first)?;
    let hello: McHello = mc::decode(&hello)?;
    let mut session = match admit(&mc, peer, &hello, responder.remote_static()).await? {
        Ok(session) => session,
        Err(reason) => {
            refuse(responder, &mut outgoing, reason).await?;
            return Err(Closed::Refused(reason));
        }
    };
    let (mut channel, frame) = responder.accept(&mc::encode(&McWelcome::Accepted {})?)?;
    send(&mut outgoing, frame).await?;
    let idle = mc.0.limits.idle_timeout;
    run(
        &mut session,
        &mut channel,
        &mut incoming,
        &mut outgoing,
        idle,
    )
    .await
}

async fn refuse<Out>(
    responder: Responder,
    outgoing: &mut Out,
    reason: McRefusal,
) -> Result<(), Closed>
where
    Out: Sink<Vec<u8>> + Unpin,
    Out::Error: std::fmt::Display,
{
    let welcome = mc::encode(&McWelcome::Refused { reason })?;
    let (_, frame) = responder.accept(&welcome)?;
    send(outgoing, frame).await
}

async fn send<Out>(outgoing: &mut Out, frame: Vec<u8>) -> Result<(), Closed>
where
    Out: Sink<Vec<u8>> + Unpin,
    Out::Error: std::fmt::Display,
{
    outgoing
        .send(frame)
        .await
        .map_err(|e| Closed::Socket(e.to_string()))
}

async fn run<In, Out>(
    session: &mut Session,
    channel: &mut Channel,
    incoming: &mut In,
    outgoing: &mut Out,
    idle: std::time::Duration,
) -> Result<(), Closed>
where
    In: Stream<Item = Result<Vec<u8>, String>> + Unpin,
    Out: Sink<Vec<u8>> + Unpin,
    Out::Error: std::fmt::Display,
{
    loop {
        let next = tokio::time::timeout(idle, incoming.next())
            .await
            .map_err(|_| Closed::IdleTimeout)?;
        let frame = match next {
            None => return Err(Closed::ByApp),
            Some(Err(reason)) => return Err(Closed::Socket(reason)),
            Some(Ok(frame)) => frame,
        };
        let Some(message) = channel.open(&frame)? else {
            continue;
        };
        let reply = match mc::decode::<McRequest>(&message) {
            Ok(request) => McServerMessage::Reply {
                id: request.id,
                outcome: match request.validate() {
                    Err(error) => McOutcome::Err(error),
                    Ok(()) => match session.handle(request.body).await {
                        Ok(answer) => McOutcome::Ok(answer),
                        Err(error) => McOutcome::Err(error),
                    },
                },
            },
            Err(error) => McServerMessage::Reply {
                id: 0,
                outcome: McOutcome::Err(McError::new(McErrorCode::Invalid, error.to_string())),
            },
        };
        for frame in channel.seal(&mc::encode(&reply)?)? {
            send(outgoing, frame).await?;
        }
    }
}
