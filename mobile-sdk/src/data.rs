//! The secure channel (behind [`crate::Sdk::send_data`] and [`crate::Sdk::set_device_data`]):
//! app data to the server's Data Service over the account's Noise channel, with no user
//! interaction.
//!
//! Rules enforced here:
//! - a server the device already holds an account at is reached with the key pinned then; the
//!   [`DataServer`]'s fingerprint must be that key's, or nothing is sent
//!   ([`SdkError::FingerprintMismatch`]);
//! - with no account at the server, the first use enrols a headless account: the server key
//!   is fetched and checked against the fingerprint, new channel and signing keys are made,
//!   `enrol_headless` is sent on a guest channel, and the account is stored before any data is
//!   sent. One enrolment at a time, so two first messages make one account;
//! - the data go on the account's kept channel (one handshake for many messages); each message
//!   gets a fresh random request id, which a resend after a lost connection keeps, so the Data
//!   Service can tell a retry from a new message;
//! - app data and answers never reach a log line or an error ([`DataAnswer`]'s `Debug` shows
//!   the length only).

use std::fmt;

use countersign_protocol::channel::fingerprint;
use countersign_protocol::device::{
    Answer, Blob, Bytes, Intent, MAX_APP_DATA_BYTES, Opaque, RequestBody,
};

use crate::client::{self, Target};
use crate::error::SdkError;
use crate::persisted::{AccountRecord, KeyBytes, ServerRecord};
use crate::sdk::{Inner, now_ms};

/// Where a server's secure channel is: what the app was built or configured with, so that a
/// phone with no account there yet can enrol one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataServer {
    /// The device gateway URL (`wss://…/v1/device`).
    pub gateway: String,
    /// The server id, 32 hex digits.
    pub server_id: String,
    /// SHA-256 of the server's public key, 64 hex digits (`key_fingerprint` of the API's
    /// server view): the key is trusted only if it hashes to this.
    pub key_fingerprint: String,
}

/// What the Data Service answered.
#[derive(Clone, PartialEq, Eq)]
pub struct DataAnswer {
    /// Its HTTP status: 2xx, or 4xx when it refused the data.
    pub status: u16,
    /// Its body.
    pub body: Vec<u8>,
}

impl fmt::Debug for DataAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataAnswer")
            .field("status", &self.status)
            .field("body_len", &self.body.len())
            .finish()
    }
}

fn invalid_server(what: &'static str) -> SdkError {
    SdkError::InvalidConfig(what)
}

/// The account the secure channel uses at `server`: the oldest one there, or a new headless
/// one.
async fn account_for(inner: &Inner, server: &DataServer) -> Result<String, SdkError> {
    let server_id: [u8; 16] = parse_hex(&server.server_id)
        .ok_or_else(|| invalid_server("server_id must be 32 hex digits"))?;
    let pinned: [u8; 32] = parse_hex(&server.key_fingerprint)
        .ok_or_else(|| invalid_server("key_fingerprint must be 64 hex digits"))?;
    let server_hex = hex::encode(server_id);
    if let Some(found) = existing(inner, &server_hex, &pinned)? {
        return Ok(found);
    }
    // One enrolment at a time; the second caller finds the first one's account.
    let _one = inner.headless_lock.lock().await;
    if let Some(found) = existing(inner, &server_hex, &pinned)? {
        return Ok(found);
    }
    enrol(inner, server, server_id, &pinned).await
}

/// The oldest account at the server, after checking its pinned key is the expected one.
fn existing(inner: &Inner, server: &str, pinned: &[u8; 32]) -> Result<Option<String>, SdkError> {
    let (record, accounts) =
        inner.read(|s| (s.servers.get(server).cloned(), s.accounts_at(server)))?;
    match (record, accounts.first()) {
        (Some(record), Some(account)) => {
            if !record
                .fingerprint
                .eq_ignore_ascii_case(&hex::encode(pinned))
            {
                tracing::warn!(server_id = %server, "the server's pinned key is not the expected one");
                return Err(SdkError::FingerprintMismatch);
            }
            Ok(Some(account.account_id.clone()))
        }
        _ => Ok(None),
    }
}

/// Enrols a headless account at `server` and stores it.
#[tracing::instrument(skip_all, fields(server_id = %hex::encode(server_id)))]
async fn enrol(
    inner: &Inner,
    server: &DataServer,
    server_id: [u8; 16],
    pinned: &[u8; 32],
) -> Result<String, SdkError> {
    let timeout = inner.config.request_timeout;
    let public_key =
        client::fetch_server_key(&inner.http, &server.gateway, &server_id, pinned, timeout).await?;
    if fingerprint(&public_key) != *pinned {
        return Err(SdkError::FingerprintMismatch);
    }
    let target = Target {
        server_id,
        gateway: server.gateway.clone(),
        public_key: public_key.clone(),
    };
    let channel_key = crate::random::p256_key()?;
    let signing_key = crate::random::p256_key()?;
    let signing_public_key = signing_key
        .public_key()
        .map_err(|e| SdkError::Transport(e.to_string()))?;
    let app_instance = inner.read(|s| s.app_instance())??;
    let (guest, _notices) = client::connect(&target, &channel_key, Intent::Guest, timeout).await?;
    let params = guest.params().clone();
    let answer = guest
        .request(RequestBody::EnrolHeadless {
            signing_public_key: Blob(signing_public_key),
            app_instance: Bytes(app_instance),
        })
        .await?;
    drop(guest);
    let Answer::HeadlessEnrolled { account_id } = answer else {
        return Err(SdkError::Transport(
            "unexpected answer to enrol_headless".into(),
        ));
    };
    let account_hex = hex::encode(account_id.0);
    let record = ServerRecord::new(&params, &public_key, &server.gateway);
    let account = AccountRecord {
        account_id: account_hex.clone(),
        server_id: hex::encode(server_id),
        userid: String::new(),
        channel_key: KeyBytes::from_key(&channel_key),
        signing_key: KeyBytes::from_key(&signing_key),
        created_at_ms: now_ms(),
        second_factor: false,
        push_key: Some(crate::push::new_push_key()?),
        push_registered: None,
    };
    inner.write(|s| {
        s.servers
            .entry(record.server_id.clone())
            .and_modify(|r| r.refresh(&params))
            .or_insert_with(|| record.clone());
        s.accounts.insert(account.account_id.clone(), account);
    })?;
    tracing::info!(account_id = %account_hex, "headless account enrolled");
    // A device registered for push tells the new account's server too (as an enrolment
    // does); a failure leaves it to the next `register_push`.
    if let Err(e) = crate::push::register_account_if_registered(inner, &account_hex).await {
        tracing::warn!(error = %e, "push not registered for the headless account");
    }
    Ok(account_hex)
}

fn parse_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// [`crate::Sdk::send_data`].
pub(crate) async fn send(
    inner: &Inner,
    server: &DataServer,
    data: &[u8],
) -> Result<(String, DataAnswer), SdkError> {
    if data.len() > MAX_APP_DATA_BYTES {
        return Err(SdkError::InvalidConfig("app data may be at most 64 KiB"));
    }
    let account_id = account_for(inner, server).await?;
    let request_id = crate::random::bytes::<16>()?;
    let answer = inner
        .account_request(
            &account_id,
            RequestBody::SendData {
                request_id: Bytes(request_id),
                data: Opaque(data.to_vec()),
            },
        )
        .await?;
    match answer {
        Answer::Data { status, body } => Ok((
            account_id,
            DataAnswer {
                status,
                body: body.0,
            },
        )),
        _ => Err(SdkError::Transport("unexpected answer to send_data".into())),
    }
}

/// [`crate::Sdk::set_device_data`].
pub(crate) async fn set_device_data(
    inner: &Inner,
    server: &DataServer,
    model: &str,
    os: &str,
    app_version: &str,
) -> Result<String, SdkError> {
    let account_id = account_for(inner, server).await?;
    let answer = inner
        .account_request(
            &account_id,
            RequestBody::SetDeviceData {
                model: model.to_owned(),
                os: os.to_owned(),
                app_version: app_version.to_owned(),
            },
        )
        .await?;
    match answer {
        Answer::Done => Ok(account_id),
        _ => Err(SdkError::Transport(
            "unexpected answer to set_device_data".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn an_answer_never_prints_its_body() {
        let answer = DataAnswer {
            status: 200,
            body: b"account balance 1234".to_vec(),
        };
        let printed = format!("{answer:?}");
        assert!(printed.contains("body_len: 20"), "{printed}");
        assert!(!printed.contains("balance"), "{printed}");
    }

    #[test]
    fn ids_parse_at_their_length_only() {
        assert_eq!(parse_hex::<2>("abcd"), Some([0xab, 0xcd]));
        assert_eq!(parse_hex::<2>("abc"), None);
        assert_eq!(parse_hex::<2>("abcdef"), None);
        assert_eq!(parse_hex::<2>("zzzz"), None);
    }
}
