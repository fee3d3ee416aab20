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

use countersign_protocol::channel::{SFS_PROLOGUE, StaticKey};
use countersign_protocol::device::Bytes;
use countersign_protocol::sfs::{
    self, FactorState, SfsAnswer, SfsBody, SfsCode, SfsError, SfsHello, SfsOutcome, SfsReply,
    SfsRequest, SfsWelcome, VERSION,
};
use serde::Deserialize;

use crate::client::{get_json, http_form, transport};
use crate::error::SdkError;
use crate::machine::SecondFactorEvent;
use crate::noise_link::{self, Handshake, NoiseLink, Peer};
use crate::second_factor::SfsConfig;

/// How errors name the second-factor server.
const SFS: Peer = Peer {
    tag: "sfs",
    name: "SFS",
};

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
    Ok((
        noise_link::p256_key(&document.channel_public_key, "SFS keys")?,
        noise_link::p256_key(&document.attestation_public_key, "SFS keys")?,
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
    link: NoiseLink,
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
    let (link, welcome) =
        tokio::time::timeout(timeout, handshake(config, key, app_instance, timeout))
            .await
            .map_err(|_| SdkError::Timeout)??;
    tracing::debug!("sfs channel open");
    Ok(SfsConnection { link, welcome })
}

async fn handshake(
    config: &SfsConfig,
    key: &StaticKey,
    app_instance: [u8; 16],
    timeout: Duration,
) -> Result<(NoiseLink, Welcomed), SdkError> {
    let hello = sfs::encode(&SfsHello {
        version: VERSION,
        app_instance: Bytes(app_instance),
    })
    .map_err(transport)?;
    let handshake = Handshake {
        base: &config.url,
        responder: &config.channel_public_key,
        prologue: SFS_PROLOGUE,
        hello: &hello,
    };
    let (link, payload) = NoiseLink::open(SFS, key, handshake, timeout).await?;
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
            link,
            Welcomed {
                pin_registered,
                biometric_registered,
                state,
            },
        )),
    }
}

impl SfsConnection {
    /// Sends one request and waits for its answer.
    ///
    /// # Errors
    /// [`SdkError::SecondFactor`] for a refusal the user must hear of, [`SdkError::Sfs`] for
    /// another refusal, [`SdkError::Timeout`], [`SdkError::Transport`].
    pub(crate) async fn request(&mut self, body: SfsBody) -> Result<SfsAnswer, SdkError> {
        let id = self.link.next_id();
        let timeout = self.link.timeout;
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
        let message = self.link.round_trip(&bytes).await?;
        let reply: SfsReply = sfs::decode(&message).map_err(transport)?;
        if reply.id != id {
            return Err(transport("the SFS answered another request"));
        }
        Ok(reply)
    }

    /// Closes the channel (best effort).
    pub(crate) async fn close(self) {
        self.link.close().await;
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
