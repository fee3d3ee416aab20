//! One device connection: handshake, then requests and notices until either side closes.
//!
//! The socket logic is generic over a stream of incoming frames and a sink of outgoing ones
//! ([`serve_frames`]), so it runs over axum's WebSocket in production and over channels in
//! tests. Requests are handled one at a time in arrival order (a device has at most a few in
//! flight); notices are interleaved between them.

use axum::extract::ws::{Message, WebSocket};
use countersign_domain::account::{Account, ActiveAccount};
use countersign_domain::server::ServerSettings;
use countersign_domain::{AccountId, AccountRef, ServerId};
use countersign_protocol::channel::{Channel, Responder, StaticKey};
use countersign_protocol::device::{
    self, Blob, Bytes, DeviceError, ErrorCode, Hello, Intent, Notice, Outcome, Refusal, Request,
    ServerMessage, ServerParams, VERSION, Welcome,
};
use futures::{Sink, SinkExt, Stream, StreamExt};

use crate::flows::{self, Identity};
use crate::{Gateway, GatewayError};

/// Why a connection ended early. Logged at debug level: devices disconnect all the time.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Closed {
    #[error("the device sent no handshake in time")]
    HandshakeTimeout,
    #[error("a guest channel was idle or open too long")]
    GuestTimeout,
    #[error("the device closed the connection")]
    ByDevice,
    #[error("channel: {0}")]
    Channel(#[from] countersign_protocol::channel::ChannelError),
    #[error("bad message: {0}")]
    Message(#[from] device::MessageError),
    #[error("socket: {0}")]
    Socket(String),
    #[error("refused: {0:?}")]
    Refused(Refusal),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
}

/// Serves an upgraded WebSocket.
pub(crate) async fn serve_socket(
    gateway: Gateway,
    server: ServerId,
    key: StaticKey,
    socket: WebSocket,
) {
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
    if let Err(reason) = serve_frames(gateway, server, key, frames, sink).await {
        tracing::debug!(%server, %reason, "device connection closed");
    }
}

/// The device's view of the server's settings.
fn params(server: ServerId, settings: &ServerSettings, push_key: Option<Vec<u8>>) -> ServerParams {
    let policy = &settings.second_factor;
    let second_factor = match (
        policy.require_for_login,
        policy.pin_allowed,
        policy.biometric_allowed,
    ) {
        (false, _, _) => "none",
        (true, true, false) => "pin",
        (true, false, true) => "biometric",
        (true, _, _) => "pin_or_biometric",
    };
    ServerParams {
        server_id: Bytes(*server.as_bytes()),
        name: settings.name.clone(),
        logo_url: settings.logo_url.clone(),
        second_factor: second_factor.to_owned(),
        second_factor_cache_secs: policy.login_reuse_window_secs,
        default_ping_time_secs: settings.default_ping_time_secs,
        push_key: push_key.map(Blob),
    }
}

/// Who the first message says the device is, checked against the account's stream.
async fn identify(
    gateway: &Gateway,
    server: ServerId,
    hello: &Hello,
    remote_static: &[u8],
) -> Result<Result<Identity, Refusal>, GatewayError> {
    if hello.version != VERSION {
        return Ok(Err(Refusal::UnsupportedVersion));
    }
    match &hello.intent {
        Intent::Guest => Ok(Ok(Identity::Guest {
            channel_key: remote_static.to_vec(),
        })),
        Intent::Account { account_id } => {
            let account = AccountRef::new(server, AccountId::from_bytes(account_id.0));
            let loaded = gateway.0.commands.accounts.load(account).await?;
            Ok(match loaded.state {
                Account::Active(active) if active.channel_public_key == remote_static => {
                    Ok(Identity::Account(Box::new(active)))
                }
                // Only the device that held the account is told it was deleted (and forgets
                // it).
                Account::Deleted {
                    channel_public_key, ..
                } if channel_public_key == remote_static => Err(Refusal::AccountDeleted),
                // One refusal for the rest: anyone can claim an id with a key of their own,
                // and must not learn from the answer whether the account exists or existed.
                Account::Active(ActiveAccount { .. })
                | Account::Deleted { .. }
                | Account::NotRegistered => Err(Refusal::UnknownAccount),
            })
        }
    }
}

/// Runs one connection over frames; answers why it ended.
pub(crate) async fn serve_frames<In, Out>(
    gateway: Gateway,
    server: ServerId,
    key: StaticKey,
    mut incoming: In,
    mut outgoing: Out,
) -> Result<(), Closed>
where
    In: Stream<Item = Result<Vec<u8>, String>> + Unpin,
    Out: Sink<Vec<u8>> + Unpin,
    Out::Error: std::fmt::Display,
{
    let first = tokio::time::timeout(gateway.0.config.handshake_timeout, incoming.next())
        .await
        .map_err(|_| Closed::HandshakeTimeout)?
        .ok_or(Closed::ByDevice)?
        .map_err(Closed::Socket)?;
    let (responder, hello) = Responder::read(&key, server.as_bytes(), &first)?;
    drop(first);
    let hello: Hello = device::decode(&hello)?;
    let settings = gateway.active_server(server).await?.map(|s| s.settings);
    let checked = match &settings {
        None => Err(Refusal::ServerGone),
        Some(_) => identify(&gateway, server, &hello, responder.remote_static()).await?,
    };
    let (identity, settings) = match (checked, settings) {
        (Ok(identity), Some(settings)) => (identity, settings),
        (checked, _) => {
            let reason = checked.err().unwrap_or(Refusal::ServerGone);
            let welcome = device::encode(&Welcome::Refused { reason })?;
            let (_, frame) = responder.accept(&welcome)?;
            send(&mut outgoing, frame).await?;
            return Err(Closed::Refused(reason));
        }
    };
    // Registered before the device hears the welcome: anything committed after the device
    // connected (a transaction for its user, say) finds it listening.
    let account = match &identity {
        Identity::Account(active) => Some((server, active.account.account_id)),
        Identity::Guest { .. } => None,
    };
    let (connection, mut notices) = gateway.0.hub.register(account);
    if let Identity::Account(active) = &identity
        && let Some(user) = active.user
    {
        gateway.0.hub.watch_user(connection, server, user);
    }
    let push_key = match gateway.push_key(server).await {
        Ok(key) => key,
        Err(error) => {
            // Push is an addition: a device still gets its channel without the key.
            tracing::error!(%error, "no push sender key for the welcome");
            None
        }
    };
    let welcomed = async {
        let welcome = device::encode(&Welcome::Accepted {
            server: params(server, &settings, push_key),
        })?;
        let (channel, frame) = responder.accept(&welcome)?;
        send(&mut outgoing, frame).await?;
        Ok(channel)
    }
    .await;
    let mut channel = match welcomed {
        Ok(channel) => channel,
        Err(error) => {
            gateway.0.hub.unregister(connection);
            return Err(error);
        }
    };
    let mut conn = flows::Connection {
        gateway: gateway.clone(),
        server,
        settings,
        identity,
        id: connection,
        scanned: Default::default(),
        close_after_reply: false,
    };
    tracing::debug!(%server, account = ?account.map(|(_, a)| a), "device connected");
    let result = run(
        &mut conn,
        &mut channel,
        &mut incoming,
        &mut outgoing,
        &mut notices,
    )
    .await;
    gateway.0.hub.unregister(connection);
    result
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

async fn send_message<Out>(
    channel: &mut Channel,
    outgoing: &mut Out,
    message: &ServerMessage,
) -> Result<(), Closed>
where
    Out: Sink<Vec<u8>> + Unpin,
    Out::Error: std::fmt::Display,
{
    let bytes = device::encode(message)?;
    for frame in channel.seal(&bytes)? {
        send(outgoing, frame).await?;
    }
    Ok(())
}

async fn run<In, Out>(
    conn: &mut flows::Connection,
    channel: &mut Channel,
    incoming: &mut In,
    outgoing: &mut Out,
    notices: &mut tokio::sync::mpsc::Receiver<Notice>,
) -> Result<(), Closed>
where
    In: Stream<Item = Result<Vec<u8>, String>> + Unpin,
    Out: Sink<Vec<u8>> + Unpin,
    Out::Error: std::fmt::Display,
{
    // Guests (keys anyone can make up) get bounded time; accounts keep their channel.
    let guest = matches!(conn.identity, Identity::Guest { .. });
    let config = &conn.gateway.0.config;
    let (idle, lifetime) = (config.guest_idle, config.guest_lifetime);
    let ends = tokio::time::Instant::now() + lifetime;
    let mut idle_until = tokio::time::Instant::now() + idle;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(idle_until.min(ends)), if guest => {
                return Err(Closed::GuestTimeout);
            }
            frame = incoming.next() => {
                let frame = match frame {
                    None => return Err(Closed::ByDevice),
                    Some(Err(reason)) => return Err(Closed::Socket(reason)),
                    Some(Ok(frame)) => frame,
                };
                let Some(message) = channel.open(&frame)? else { continue };
                idle_until = tokio::time::Instant::now() + idle;
                let reply = match device::decode::<Request>(&message) {
                    Ok(request) => {
                        let outcome = match request.validate() {
                            Ok(()) => match flows::handle(conn, request.body).await {
                                Ok(answer) => Outcome::Ok(answer),
                                Err(error) => Outcome::Err(error),
                            },
                            Err(error) => Outcome::Err(error),
                        };
                        ServerMessage::Reply { id: request.id, outcome }
                    }
                    Err(error) => ServerMessage::Reply {
                        id: 0,
                        outcome: Outcome::Err(DeviceError::new(ErrorCode::Invalid, error.to_string())),
                    },
                };
                send_message(channel, outgoing, &reply).await?;
                if conn.close_after_reply {
                    return Ok(());
                }
            }
            notice = notices.recv() => {
                let Some(notice) = notice else { return Ok(()) };
                let deleted = matches!(notice, Notice::AccountDeleted { .. });
                send_message(channel, outgoing, &ServerMessage::Notice(notice)).await?;
                if deleted {
                    return Ok(());
                }
            }
        }
    }
}
