//! The device channel: Noise `IK` over P-256 with AES-GCM and SHA-256 (`snow`), framed for a
//! WebSocket that carries nothing readable.
//!
//! - The device (initiator) knows the server's static key before it connects: it pinned the
//!   key's SHA-256 from the QR code or link, fetched the key and checked it. Its own static key
//!   is the account's channel key (or, for a guest, the key that becomes one at enrolment), so
//!   the first message authenticates the device to the server and the second the server to
//!   the device.
//! - The prologue binds the handshake to the protocol and the server id, so a handshake made
//!   for one virtual server cannot be replayed to another.
//! - Each WebSocket binary message is one Noise message (≤ 65,535 bytes). An application
//!   message longer than one frame is split: each frame's plaintext starts with `0x01` ("more
//!   follows") or `0x00` ("last"); reassembly stops at [`crate::device::MAX_MESSAGE_BYTES`].
//!   Noise's own counters reject a frame replayed, dropped or reordered.
//!
//! The one exception to this crate's "no RNG" rule: `snow` draws the Noise ephemeral keys
//! from the operating system's generator, as Noise requires.

use std::fmt;

use p256::elliptic_curve::sec1::ToSec1Point;
use sha2::{Digest, Sha256};
use snow::{HandshakeState, TransportState};
use zeroize::Zeroizing;

use crate::device::MAX_MESSAGE_BYTES;

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_IK_P256_AESGCM_SHA256";
/// Largest Noise message, hence largest WebSocket frame.
pub const MAX_FRAME: usize = 65_535;
const TAG: usize = 16;
/// Most a handshake message adds to its payload: two P-256 keys and two tags.
const HANDSHAKE_OVERHEAD: usize = 2 * 65 + 2 * TAG;
const CHUNK: usize = MAX_FRAME - TAG - 1;
const MORE: u8 = 0x01;
const LAST: u8 = 0x00;

/// Why a handshake or frame failed. Messages never include key or payload bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// A key is not a valid P-256 key of the expected form.
    #[error("invalid key: {0}")]
    Key(&'static str),
    /// The handshake or a frame did not decrypt or authenticate (wrong key, tampering,
    /// replay, reordering).
    #[error("noise: {0}")]
    Noise(String),
    /// A frame is empty, too large, or has an unknown chunk marker.
    #[error("malformed frame: {0}")]
    Frame(&'static str),
    /// Reassembly passed the message size limit.
    #[error("message longer than {MAX_MESSAGE_BYTES} bytes")]
    TooLong,
}

impl From<snow::Error> for ChannelError {
    fn from(e: snow::Error) -> Self {
        Self::Noise(e.to_string())
    }
}

/// A P-256 static private key (a scalar); wiped on drop, `Debug` prints nothing.
#[derive(Clone)]
pub struct StaticKey(Zeroizing<[u8; 32]>);

impl StaticKey {
    /// From a 32-byte scalar; refuses zero and values not below the group order.
    ///
    /// # Errors
    /// [`ChannelError::Key`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ChannelError> {
        let secret = p256::SecretKey::from_slice(bytes)
            .map_err(|_| ChannelError::Key("not a P-256 private key"))?;
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(&secret.to_bytes());
        Ok(Self(out))
    }

    /// The 32 scalar bytes, for storage.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// The public key, SEC1 uncompressed (65 bytes), as Noise sends it.
    ///
    /// # Errors
    /// Never for a key made by [`from_bytes`](Self::from_bytes).
    pub fn public_key(&self) -> Result<Vec<u8>, ChannelError> {
        let secret = p256::SecretKey::from_slice(self.0.as_slice())
            .map_err(|_| ChannelError::Key("not a P-256 private key"))?;
        Ok(secret
            .public_key()
            .as_affine()
            .to_sec1_point(false)
            .as_bytes()
            .to_vec())
    }
}

impl fmt::Debug for StaticKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StaticKey(..)")
    }
}

/// SHA-256 of a SEC1 uncompressed public key: what QR codes pin.
pub fn fingerprint(public_key: &[u8]) -> [u8; 32] {
    Sha256::digest(public_key).into()
}

/// The prologue of the second-factor channel (`docs/second-factor.md`): no server id, since
/// an SFS serves app instances, not tenants.
pub const SFS_PROLOGUE: &[u8] = b"countersign/sfs/v1\0";

/// The prologue of the Message Center channel (`docs/message-center.md`): no server id, since
/// a Message Center serves app installations, not tenants.
pub const MC_PROLOGUE: &[u8] = b"countersign/mc/v1\0";

/// The prologue of the device channel to the virtual server `server_id`.
#[must_use]
pub fn device_prologue(server_id: &[u8; 16]) -> Vec<u8> {
    let mut p = b"countersign/device/v1\0".to_vec();
    p.extend_from_slice(server_id);
    p
}

fn params() -> Result<snow::params::NoiseParams, ChannelError> {
    NOISE_PARAMS
        .parse()
        .map_err(|e: snow::Error| ChannelError::Noise(e.to_string()))
}

fn uncompressed(public_key: &[u8]) -> Result<Vec<u8>, ChannelError> {
    let key = p256::PublicKey::from_sec1_bytes(public_key)
        .map_err(|_| ChannelError::Key("not a P-256 public key"))?;
    Ok(key.as_affine().to_sec1_point(false).as_bytes().to_vec())
}

/// The device's side of a handshake in progress.
pub struct Initiator {
    state: HandshakeState,
}

impl fmt::Debug for Initiator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Initiator(..)")
    }
}

impl Initiator {
    /// Starts a handshake to `server_public_key` (SEC1) of `server_id` with `hello` as the
    /// first message's payload; answers the first frame to send.
    ///
    /// # Errors
    /// [`ChannelError::Key`] for a bad server key, [`ChannelError::Noise`] otherwise.
    pub fn start(
        local: &StaticKey,
        server_public_key: &[u8],
        server_id: &[u8; 16],
        hello: &[u8],
    ) -> Result<(Self, Vec<u8>), ChannelError> {
        Self::start_with_prologue(local, server_public_key, &device_prologue(server_id), hello)
    }

    /// As [`start`](Self::start), for a channel with another prologue (the SFS channel:
    /// [`SFS_PROLOGUE`]).
    ///
    /// # Errors
    /// As [`start`](Self::start).
    pub fn start_with_prologue(
        local: &StaticKey,
        server_public_key: &[u8],
        prologue: &[u8],
        hello: &[u8],
    ) -> Result<(Self, Vec<u8>), ChannelError> {
        if hello.len() > CHUNK {
            return Err(ChannelError::TooLong);
        }
        let remote = uncompressed(server_public_key)?;
        let mut state = snow::Builder::new(params()?)
            .local_private_key(local.expose())?
            .remote_public_key(&remote)?
            .prologue(prologue)?
            .build_initiator()?;
        let mut frame = vec![0u8; hello.len() + HANDSHAKE_OVERHEAD];
        let n = state.write_message(hello, &mut frame)?;
        frame.truncate(n);
        Ok((Self { state }, frame))
    }

    /// Reads the server's answer; answers the open channel and the answer's payload.
    ///
    /// # Errors
    /// [`ChannelError::Noise`] when the answer is not from the pinned server key.
    pub fn finish(mut self, frame: &[u8]) -> Result<(Channel, Vec<u8>), ChannelError> {
        if frame.len() > MAX_FRAME {
            return Err(ChannelError::Frame("longer than a Noise message"));
        }
        // A payload is never longer than the frame that carries it; sizing the buffer by the
        // frame keeps a 64 KiB allocation from outliving every handshake.
        let mut payload = vec![0u8; frame.len()];
        let n = self.state.read_message(frame, &mut payload)?;
        payload.truncate(n);
        Ok((Channel::new(self.state.into_transport_mode()?), payload))
    }
}

/// The gateway's side of a handshake: the first message read, the answer not yet written.
pub struct Responder {
    state: HandshakeState,
    remote_static: Vec<u8>,
}

impl fmt::Debug for Responder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Responder(..)")
    }
}

impl Responder {
    /// Reads a device's first frame with the server's static key; answers the handshake and
    /// the frame's payload (a [`crate::device::Hello`]).
    ///
    /// # Errors
    /// [`ChannelError::Noise`] when the frame was not made for this server's key and id.
    pub fn read(
        local: &StaticKey,
        server_id: &[u8; 16],
        frame: &[u8],
    ) -> Result<(Self, Vec<u8>), ChannelError> {
        Self::read_with_prologue(local, &device_prologue(server_id), frame)
    }

    /// As [`read`](Self::read), for a channel with another prologue (the SFS channel:
    /// [`SFS_PROLOGUE`]).
    ///
    /// # Errors
    /// As [`read`](Self::read).
    pub fn read_with_prologue(
        local: &StaticKey,
        prologue: &[u8],
        frame: &[u8],
    ) -> Result<(Self, Vec<u8>), ChannelError> {
        if frame.len() > MAX_FRAME {
            return Err(ChannelError::Frame("longer than a Noise message"));
        }
        let mut state = snow::Builder::new(params()?)
            .local_private_key(local.expose())?
            .prologue(prologue)?
            .build_responder()?;
        // A payload is never longer than the frame that carries it; sizing the buffer by the
        // frame keeps a 64 KiB allocation from outliving every handshake.
        let mut payload = vec![0u8; frame.len()];
        let n = state.read_message(frame, &mut payload)?;
        payload.truncate(n);
        let remote_static = state
            .get_remote_static()
            .map(<[u8]>::to_vec)
            .ok_or(ChannelError::Frame("no static key in the first message"))?;
        Ok((
            Self {
                state,
                remote_static,
            },
            payload,
        ))
    }

    /// The device's static key (SEC1 uncompressed), authenticated by the first message.
    pub fn remote_static(&self) -> &[u8] {
        &self.remote_static
    }

    /// Writes the answer with `welcome` as payload; answers the open channel and the frame.
    ///
    /// # Errors
    /// [`ChannelError::Noise`].
    pub fn accept(mut self, welcome: &[u8]) -> Result<(Channel, Vec<u8>), ChannelError> {
        if welcome.len() > CHUNK {
            return Err(ChannelError::TooLong);
        }
        let mut frame = vec![0u8; welcome.len() + HANDSHAKE_OVERHEAD];
        let n = self.state.write_message(welcome, &mut frame)?;
        frame.truncate(n);
        Ok((Channel::new(self.state.into_transport_mode()?), frame))
    }
}

/// An open channel: seals messages into frames and opens frames into messages.
pub struct Channel {
    transport: TransportState,
    partial: Vec<u8>,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Channel(..)")
    }
}

impl Channel {
    fn new(transport: TransportState) -> Self {
        Self {
            transport,
            partial: Vec::new(),
        }
    }

    /// Encrypts one message into the frames to send, in order.
    ///
    /// # Errors
    /// [`ChannelError::TooLong`] past the message limit, [`ChannelError::Noise`] otherwise.
    pub fn seal(&mut self, message: &[u8]) -> Result<Vec<Vec<u8>>, ChannelError> {
        if message.len() > MAX_MESSAGE_BYTES {
            return Err(ChannelError::TooLong);
        }
        let chunks: Vec<&[u8]> = if message.is_empty() {
            vec![&[]]
        } else {
            message.chunks(CHUNK).collect()
        };
        let last = chunks.len().saturating_sub(1);
        let mut frames = Vec::with_capacity(chunks.len());
        let mut plain = Vec::with_capacity(CHUNK + 1);
        for (i, chunk) in chunks.into_iter().enumerate() {
            plain.clear();
            plain.push(if i == last { LAST } else { MORE });
            plain.extend_from_slice(chunk);
            let mut frame = vec![0u8; plain.len() + TAG];
            let n = self.transport.write_message(&plain, &mut frame)?;
            frame.truncate(n);
            frames.push(frame);
        }
        Ok(frames)
    }

    /// Decrypts one frame; answers the message once its last frame arrived.
    ///
    /// # Errors
    /// [`ChannelError::Noise`] for a frame that does not authenticate (the channel is then
    /// unusable: close it), [`ChannelError::Frame`] or [`ChannelError::TooLong`] otherwise.
    pub fn open(&mut self, frame: &[u8]) -> Result<Option<Vec<u8>>, ChannelError> {
        if frame.len() > MAX_FRAME {
            return Err(ChannelError::Frame("longer than a Noise message"));
        }
        if frame.len() <= TAG {
            return Err(ChannelError::Frame("shorter than an authentication tag"));
        }
        let mut plain = vec![0u8; frame.len()];
        let n = self.transport.read_message(frame, &mut plain)?;
        plain.truncate(n);
        let Some((&marker, body)) = plain.split_first() else {
            return Err(ChannelError::Frame("empty frame"));
        };
        if self.partial.len() + body.len() > MAX_MESSAGE_BYTES {
            self.partial.clear();
            return Err(ChannelError::TooLong);
        }
        self.partial.extend_from_slice(body);
        match marker {
            LAST => Ok(Some(std::mem::take(&mut self.partial))),
            MORE => Ok(None),
            _ => Err(ChannelError::Frame("unknown chunk marker")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> StaticKey {
        StaticKey::from_bytes(&[byte; 32]).unwrap()
    }

    fn open_pair() -> (Channel, Channel) {
        let (device, server) = (key(1), key(2));
        let id = [5u8; 16];
        let (initiator, first) =
            Initiator::start(&device, &server.public_key().unwrap(), &id, b"hello").unwrap();
        assert!(
            !first.windows(5).any(|w| w == b"hello"),
            "payload is encrypted"
        );
        let (responder, hello) = Responder::read(&server, &id, &first).unwrap();
        assert_eq!(hello, b"hello");
        assert_eq!(responder.remote_static(), device.public_key().unwrap());
        let (server_channel, second) = responder.accept(b"welcome").unwrap();
        let (device_channel, welcome) = initiator.finish(&second).unwrap();
        assert_eq!(welcome, b"welcome");
        (device_channel, server_channel)
    }

    #[test]
    fn handshake_authenticates_both_sides_and_messages_flow() {
        let (mut device, mut server) = open_pair();
        for message in [&b"ping"[..], b"", &[7u8; 1000]] {
            let frames = device.seal(message).unwrap();
            assert_eq!(frames.len(), 1);
            assert_eq!(server.open(&frames[0]).unwrap().as_deref(), Some(message));
        }
        let frames = server.seal(b"pong").unwrap();
        assert_eq!(device.open(&frames[0]).unwrap().unwrap(), b"pong");
    }

    #[test]
    fn long_messages_span_frames_and_are_bounded() {
        let (mut device, mut server) = open_pair();
        let message: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let frames = device.seal(&message).unwrap();
        assert_eq!(frames.len(), 4);
        assert!(frames.iter().all(|f| f.len() <= MAX_FRAME));
        let mut got = None;
        for frame in &frames {
            got = server.open(frame).unwrap();
        }
        assert_eq!(got.unwrap(), message);
        assert_eq!(
            device.seal(&vec![0; MAX_MESSAGE_BYTES + 1]),
            Err(ChannelError::TooLong)
        );
    }

    #[test]
    fn a_handshake_for_another_server_key_or_id_fails() {
        let (device, server, other) = (key(1), key(2), key(3));
        let id = [5u8; 16];
        let (_, first) =
            Initiator::start(&device, &other.public_key().unwrap(), &id, b"hi").unwrap();
        assert!(matches!(
            Responder::read(&server, &id, &first),
            Err(ChannelError::Noise(_))
        ));
        let (_, first) =
            Initiator::start(&device, &server.public_key().unwrap(), &[6; 16], b"hi").unwrap();
        assert!(matches!(
            Responder::read(&server, &id, &first),
            Err(ChannelError::Noise(_))
        ));
    }

    #[test]
    fn an_answer_from_an_impostor_fails() {
        let (device, server, impostor) = (key(1), key(2), key(3));
        let id = [5u8; 16];
        let (initiator, first) =
            Initiator::start(&device, &server.public_key().unwrap(), &id, b"hi").unwrap();
        // The impostor cannot read the first message, so it answers a handshake of its own.
        let (_, own_first) =
            Initiator::start(&device, &impostor.public_key().unwrap(), &id, b"hi").unwrap();
        let (responder, _) = Responder::read(&impostor, &id, &own_first).unwrap();
        let (_, second) = responder.accept(b"welcome").unwrap();
        assert!(Responder::read(&impostor, &id, &first).is_err());
        assert!(matches!(
            initiator.finish(&second),
            Err(ChannelError::Noise(_))
        ));
    }

    #[test]
    fn tampered_replayed_and_garbage_frames_are_errors() {
        let (mut device, mut server) = open_pair();
        let mut frame = device.seal(b"hello").unwrap().remove(0);
        let last = frame.len() - 1;
        frame[last] ^= 1;
        assert!(matches!(server.open(&frame), Err(ChannelError::Noise(_))));

        let (mut device, mut server) = open_pair();
        let frame = device.seal(b"hello").unwrap().remove(0);
        assert!(server.open(&frame).unwrap().is_some());
        assert!(server.open(&frame).is_err(), "a replayed frame");
        assert!(matches!(server.open(&[0; 3]), Err(ChannelError::Frame(_))));
        assert!(server.open(&vec![0; MAX_FRAME + 1]).is_err());
        assert!(Responder::read(&key(2), &[0; 16], b"garbage").is_err());
        assert!(matches!(
            StaticKey::from_bytes(&[0; 32]),
            Err(ChannelError::Key(_))
        ));
        assert!(matches!(
            Initiator::start(&key(1), &[4; 65], &[0; 16], b""),
            Err(ChannelError::Key(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_frames_never_panic(
            frame in proptest::collection::vec(proptest::num::u8::ANY, 0..400),
        ) {
            let _ = Responder::read(&key(2), &[5; 16], &frame);
            let (mut device, mut server) = open_pair();
            proptest::prop_assert!(server.open(&frame).is_err());
            let _ = device.open(&frame);
        }
    }

    #[test]
    fn the_sfs_prologue_separates_the_sfs_channel_from_the_device_channel() {
        let (app, sfs) = (key(1), key(2));
        let (initiator, first) = Initiator::start_with_prologue(
            &app,
            &sfs.public_key().unwrap(),
            SFS_PROLOGUE,
            b"hello",
        )
        .unwrap();
        // A device-channel responder (any server id) cannot read an SFS handshake.
        assert!(Responder::read(&sfs, &[0; 16], &first).is_err());
        let (responder, hello) = Responder::read_with_prologue(&sfs, SFS_PROLOGUE, &first).unwrap();
        assert_eq!(hello, b"hello");
        let (mut server, second) = responder.accept(b"welcome").unwrap();
        let (mut client, welcome) = initiator.finish(&second).unwrap();
        assert_eq!(welcome, b"welcome");
        let frame = client.seal(b"ping").unwrap().remove(0);
        assert_eq!(server.open(&frame).unwrap().unwrap(), b"ping");
        // And a device handshake is not an SFS one.
        let (_, first) =
            Initiator::start(&app, &sfs.public_key().unwrap(), &[0; 16], b"hi").unwrap();
        assert!(Responder::read_with_prologue(&sfs, SFS_PROLOGUE, &first).is_err());
    }

    #[test]
    fn the_mc_prologue_separates_the_mc_channel_from_the_others() {
        let (app, mc) = (key(1), key(2));
        let (_, first) =
            Initiator::start_with_prologue(&app, &mc.public_key().unwrap(), MC_PROLOGUE, b"hello")
                .unwrap();
        assert!(Responder::read(&mc, &[0; 16], &first).is_err());
        assert!(Responder::read_with_prologue(&mc, SFS_PROLOGUE, &first).is_err());
        let (_, hello) = Responder::read_with_prologue(&mc, MC_PROLOGUE, &first).unwrap();
        assert_eq!(hello, b"hello");
    }

    #[test]
    fn debug_never_prints_keys() {
        let k = key(0xab);
        assert_eq!(format!("{k:?}"), "StaticKey(..)");
    }
}
