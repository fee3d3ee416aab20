//! One app connection: handshake, then requests until either side closes.
//!
//! Built like the device gateway's connection: the socket logic is generic over a stream of
//! incoming frames and a sink of outgoing ones ([`serve_frames`]), so it runs over axum's
//! WebSocket in production and over channels in tests. The first frame must arrive within the
//! handshake timeout; requests are answered one at a time in arrival order.
//!
//! The handshake writes nothing: it checks the Noise static key against the one the app
//! instance's stream bound (another is refused `key_mismatch`, an unknown version
//! `unsupported_version`). An app instance with no PIN registered is anonymous: its hello
//! takes a token from the [`admission`](crate::admission) limiter, and without one the
//! connection is closed before the welcome. The key is bound on first use by the first PIN
//! registration, in the same append (`second_factor.key_bound`, then `pin_registered`).

use axum::extract::ws::{Message, WebSocket};
use std::net::IpAddr;

use countersign_domain::AppInstanceId;
use countersign_domain::second_factor::SecondFactor;
use countersign_protocol::channel::{self, Channel, Responder, SFS_PROLOGUE};
use countersign_protocol::sfs::{
    self, SfsCode, SfsError, SfsHello, SfsOutcome, SfsRefusal, SfsReply, SfsRequest, SfsWelcome,
    VERSION,
};
use futures::{Sink, SinkExt, Stream, StreamExt};

use crate::session::{Session, factor_state};
use crate::{Error, Sfs};

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
    Message(#[from] sfs::MessageError),
    /// The socket failed.
    #[error("socket: {0}")]
    Socket(String),
    /// The handshake was refused.
    #[error("refused: {0:?}")]
    Refused(SfsRefusal),
    /// An anonymous hello found no token left: closed before the welcome.
    #[error("too many anonymous connections; closed")]
    Busy,
    /// The SFS failed.
    #[error(transparent)]
    Sfs(#[from] Error),
}

/// Serves an upgraded WebSocket from `peer`.
pub(crate) async fn serve_socket(sfs: Sfs, peer: Option<IpAddr>, socket: WebSocket) {
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
    if let Err(reason) = serve_frames_from(sfs, peer, frames, sink).await {
        tracing::debug!(%reason, "sfs connection closed");
    }
}

/// Checks the hello and the channel key; answers the session or why not. Writes nothing.
async fn admit(
    sfs: &Sfs,
    peer: Option<IpAddr>,
    hello: &SfsHello,
    remote_static: &[u8],
) -> Result<Result<(Session, SfsWelcome), SfsRefusal>, Closed> {
    if hello.version != VERSION {
        return Ok(Err(SfsRefusal::UnsupportedVersion));
    }
    let app = AppInstanceId::from_bytes(hello.app_instance.0);
    let key_thumbprint = channel::fingerprint(remote_static);
    let loaded = countersign_commands::load::<SecondFactor>(&sfs.0.store, &app.stream())
        .await
        .map_err(Error::from)?;
    let state = &loaded.state;
    if state
        .key_thumbprint()
        .is_some_and(|bound| *bound != key_thumbprint)
    {
        return Ok(Err(SfsRefusal::KeyMismatch));
    }
    let now = sfs.0.clock.now();
    if state.pin_record_digest().is_none() && !sfs.0.limiter.take(peer, now.as_millis()) {
        return Err(Closed::Busy);
    }
    let welcome = SfsWelcome::Accepted {
        pin_registered: state.pin_record_digest().is_some(),
        biometric_registered: state.biometric_key().is_some(),
        state: factor_state(state.status(now)),
    };
    let session = Session::new(sfs.clone(), app, key_thumbprint, peer);
    Ok(Ok((session, welcome)))
}

/// Runs one connection over frames from an unknown address; answers why it ended.
///
/// # Errors
/// [`Closed`] says why the connection ended early.
pub async fn serve_frames<In, Out>(sfs: Sfs, incoming: In, outgoing: Out) -> Result<(), Closed>
where
    In: Stream<Item = Result<Vec<u8>, String>> + Unpin,
    Out: Sink<Vec<u8>> + Unpin,
    Out::Error: std::fmt::Display,
{
    serve_frames_from(sfs, None, incoming, outgoing).await
}

/// Runs one connection over frames from `peer` (its address counts its anonymous work);
/// answers why it ended.
///
/// # Errors
/// [`Closed`] says why the connection ended early.
pub async fn serve_frames_from<In, Out>(
    sfs: Sfs,
    peer: Option<IpAddr>,
    mut incoming: In,
    mut outgoing: Out,
) -> Result<(), Closed>
where
    In: Stream<Item = Result<Vec<u8>, String>> + Unpin,
    Out: Sink<Vec<u8>> + Unpin,
    Out::Error: std::fmt::Display,
{
    let first = tokio::time::timeout(sfs.0.handshake_timeout, incoming.next())
        .await
        .map_err(|_| Closed::HandshakeTimeout)?
        .ok_or(Closed::ByApp)?
        .map_err(Closed::Socket)?;
    let (responder, hello) =
        Responder::read_with_prologue(&sfs.0.keys.channel, SFS_PROLOGUE, &first)?;
    let hello: SfsHello = sfs::decode(&hello)?;
    let (mut session, welcome) = match admit(&sfs, peer, &hello, responder.remote_static()).await? {
        Ok(admitted) => admitted,
        Err(reason) => {
            refuse(responder, &mut outgoing, reason).await?;
            return Err(Closed::Refused(reason));
        }
    };
    let (mut channel, frame) = responder.accept(&sfs::encode(&welcome)?)?;
    send(&mut outgoing, frame).await?;
    tracing::debug!(app_instance = %AppInstanceId::from_bytes(hello.app_instance.0), "sfs channel open");
    let idle = sfs.0.idle_timeout;
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
    reason: SfsRefusal,
) -> Result<(), Closed>
where
    Out: Sink<Vec<u8>> + Unpin,
    Out::Error: std::fmt::Display,
{
    let welcome = sfs::encode(&SfsWelcome::Refused { reason })?;
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
        let reply = match sfs::decode::<SfsRequest>(&message) {
            Ok(request) => SfsReply {
                id: request.id,
                outcome: match session.handle(request.body).await {
                    Ok(answer) => SfsOutcome::Ok(answer),
                    Err(error) => SfsOutcome::Err(error),
                },
            },
            Err(error) => SfsReply {
                id: 0,
                outcome: SfsOutcome::Err(SfsError::new(SfsCode::Invalid, error.to_string())),
            },
        };
        for frame in channel.seal(&sfs::encode(&reply)?)? {
            send(outgoing, frame).await?;
        }
    }
}
