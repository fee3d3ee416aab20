//! Push (docs/message-center.md): the app's Message Center, its registration, and the push
//! messages the servers send through it — decrypted, checked, and turned into what they ask
//! (a login, the end of a session, an account's deletion, a transaction to approve).
//!
//! - [`McConfig`]: the MC this app is bound to, with its pinned channel key (like the SFS).
//! - `register`: registers the app instance at the MC once (a mailbox and an MC token; later
//!   calls update the push token), then gives each account's server the MC token and the
//!   account's push public key (`register_push` over the gateway). An account enrolled while
//!   push is registered gets it at enrolment.
//! - `process`: a push payload (the `cs` value of an FCM data message or an APNs payload,
//!   the whole data map as JSON, or the raw envelope; a `cs_wake` wake-up pulls instead).
//! - `pull`: the mailbox's outstanding messages, each processed, then acknowledged.
//!
//! Rules enforced here:
//! - a message is opened with the push secret of the account whose key id it names and the
//!   push sender key of that account's server, for that server and account (the AAD): a
//!   message sealed for another account or server, or by anyone else, does not open;
//! - it is refused once expired by the device's clock, and refused when its id was processed
//!   before; its id is recorded (persisted) **before** it is acted upon, and only once it
//!   opened, so a forged message cannot fill the record and a message pushed and pulled runs
//!   once, even across a restart;
//! - refusals are typed ([`PushRefusal`]) and carry nothing of the content; log lines carry
//!   no hsid, token, key or payload;
//! - the MC token and the push secrets live in the persisted state's wiped key type.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use countersign_protocol::device::{Answer, Blob, Refusal, RequestBody, Secret};
use countersign_protocol::push::{self, Envelope, PushBody, PushMessage, PushTarget};
use zeroize::Zeroizing;

use crate::callbacks::Callbacks;
use crate::error::{PushRefusal, SdkError};
use crate::mc_client::{self, McConnection};
use crate::model::{AccountInfo, PendingTransaction};
use crate::persisted::{KeyBytes, McRecord, PushKeyRecord};
use crate::sdk::{Inner, parse_id};
use crate::session::{self, SessionHandle};

pub use countersign_protocol::mc::Platform;

/// Messages asked for per `pull` request (the MC's maximum).
const PULL_LIMIT: u16 = 100;
/// Pull rounds per [`crate::Sdk::pull_messages`] call, so a mailbox that keeps answering
/// `more` cannot keep the app busy forever.
const MAX_PULL_ROUNDS: usize = 100;

/// The Message Center this app is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McConfig {
    /// The MC base, for example `ws://127.0.0.1:8080/v1/mc` (the channel is `{url}/channel`,
    /// the key document `{http base}/key`).
    pub url: String,
    /// The MC channel key, SEC1 P-256 (pinned; it is also what the servers are told names
    /// this MC).
    pub channel_public_key: Vec<u8>,
}

impl McConfig {
    /// **Trust on first use**: reads `GET {http base}/key` and believes whoever answers; for
    /// development, tests and a virtual device (an app ships with the key). `base_url` may be
    /// the WebSocket or the HTTP form; the answer's `url` is the WebSocket form.
    ///
    /// # Errors
    /// [`SdkError::Transport`] (unreachable, not a key document, not a P-256 key) or
    /// [`SdkError::Timeout`] after 10 s.
    pub async fn fetch(base_url: &str) -> Result<Self, SdkError> {
        let http = reqwest::Client::builder()
            .build()
            .map_err(|e| SdkError::Transport(e.to_string()))?;
        let channel_public_key =
            mc_client::fetch_key(&http, base_url, Duration::from_secs(10)).await?;
        Ok(Self {
            url: crate::sfs_client::ws_base(base_url)?,
            channel_public_key,
        })
    }
}

/// What [`crate::Sdk::register_push`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushRegistration {
    /// The mailbox at the MC, 32 hex digits.
    pub mailbox: String,
    /// Whether this call registered the mailbox (false: it existed, its push token was
    /// updated).
    pub new_mailbox: bool,
    /// Accounts whose server was given the mailbox and the account's push key by this call.
    pub registered: Vec<String>,
    /// Accounts whose server had them already.
    pub already: Vec<String>,
    /// Accounts whose server could not be told, and why (the next call tries again).
    pub failed: Vec<(String, SdkError)>,
}

/// What a push message did ([`crate::Sdk::process_push`]).
#[derive(Debug, Clone)]
pub enum PushAction {
    /// A login was asked for: its session, started as a scanned login code's would be, with
    /// the one account the message was for (waiting for the user, or already over).
    Login(SessionHandle),
    /// The server ended a login: another account took it (`withdrawn`) or the session was
    /// logged out. The session that was running for it, if any, is over (Aborted before
    /// login, LoggedOut once Active); the callbacks that session was started with heard of
    /// it (`on_state`, `on_history`).
    SessionEnded {
        /// The local session id of the session ended, if one was running.
        session_id: Option<String>,
        /// Logged out (true) or withdrawn (false).
        logged_out: bool,
    },
    /// The server said the account is deleted. The SDK checked with the gateway: `account`
    /// is what it forgot (the app was told, [`Callbacks::on_account_deleted`]), `None` when
    /// the gateway still accepts the account (it is kept).
    AccountDeleted {
        /// The account forgotten.
        account: Option<AccountInfo>,
    },
    /// A transaction waits for the account's approval: `pending` as the gateway lists it
    /// (and told to [`Callbacks::on_transaction_pending`]), `None` when it is no longer
    /// pending.
    Transaction {
        /// The account, 32 hex digits.
        account_id: String,
        /// The transaction, 32 hex digits.
        transaction_id: String,
        /// As listed by the gateway.
        pending: Option<PendingTransaction>,
    },
    /// A wake-up: the mailbox was pulled.
    Pulled(PullReport),
}

/// What [`crate::Sdk::pull_messages`] did. Every message pulled is acknowledged.
#[derive(Debug, Clone, Default)]
pub struct PullReport {
    /// Messages that ran (their actions are in `actions`, or their failure in `failed`).
    pub processed: usize,
    /// Messages that had run already (pushed before, or pulled twice): ignored.
    pub duplicates: usize,
    /// Messages expired by the device's clock: ignored.
    pub expired: usize,
    /// What the messages that ran did, in order.
    pub actions: Vec<PushAction>,
    /// Messages refused for another reason, or whose action failed: (message id as the MC
    /// named it, 32 hex digits; why).
    pub failed: Vec<(String, SdkError)>,
}

/// A fresh push key pair.
pub(crate) fn new_push_key() -> Result<PushKeyRecord, SdkError> {
    let random = Zeroizing::new(crate::random::bytes::<32>()?);
    let (secret, public) = push::generate_push_key(*random);
    let secret = Zeroizing::new(secret);
    Ok(PushKeyRecord {
        secret: KeyBytes::from_bytes(&secret),
        public: hex::encode(public),
    })
}

/// The account's push public key, made (and stored) now if it has none.
fn ensure_push_key(inner: &Inner, account_id: &str) -> Result<Vec<u8>, SdkError> {
    let existing = inner.read(|s| s.accounts.get(account_id).map(|a| a.push_key.clone()))?;
    let record = match existing {
        None => return Err(SdkError::UnknownAccount),
        Some(Some(record)) => record,
        Some(None) => {
            let fresh = new_push_key()?;
            inner
                .write(|s| {
                    s.accounts
                        .get_mut(account_id)
                        .map(|a| a.push_key.get_or_insert_with(|| fresh.clone()).clone())
                })?
                .ok_or(SdkError::UnknownAccount)?
        }
    };
    Ok(record.public_key()?)
}

/// The MC configuration, or [`SdkError::PushUnavailable`].
fn config(inner: &Inner) -> Result<&crate::push::McConfig, SdkError> {
    inner.config.mc.as_ref().ok_or(SdkError::PushUnavailable)
}

/// The registration made with the configured MC, if any.
fn registration(inner: &Inner) -> Result<Option<McRecord>, SdkError> {
    let mc_key = hex::encode(&config(inner)?.channel_public_key);
    inner.read(|s| s.mc.clone().filter(|r| r.mc_key == mc_key))
}

/// Opens the MC channel of `record`'s mailbox.
async fn connect_mailbox(inner: &Inner, record: &McRecord) -> Result<McConnection, SdkError> {
    let key = record.channel_key.to_key()?;
    let mailbox = parse_id::<16>(&record.mailbox)?;
    mc_client::connect(
        config(inner)?,
        &key,
        Some(mailbox),
        inner.config.request_timeout,
    )
    .await
}

/// See [`crate::Sdk::register_push`].
pub(crate) async fn register(
    inner: &Inner,
    platform: Platform,
    push_token: &str,
    app_id: &str,
) -> Result<PushRegistration, SdkError> {
    let config = config(inner)?;
    let _one_at_a_time = inner.mc_lock.lock().await;
    let platform_name = platform_name(platform);
    let existing =
        registration(inner)?.filter(|r| r.platform == platform_name && r.app_id == app_id);
    let mut new_mailbox = false;
    let record = match existing {
        Some(record) => match connect_mailbox(inner, &record).await {
            Ok(mut mc) => {
                mc.update_push_token(push_token).await?;
                mc.close().await;
                record
            }
            // The MC lost the mailbox (or no longer knows this key): register anew.
            Err(SdkError::McRefused(countersign_protocol::mc::McRefusal::UnknownMailbox)) => {
                tracing::info!("the MC no longer knows the mailbox; registering anew");
                new_mailbox = true;
                register_mailbox(inner, config, platform, push_token, app_id).await?
            }
            Err(e) => return Err(e),
        },
        None => {
            new_mailbox = true;
            register_mailbox(inner, config, platform, push_token, app_id).await?
        }
    };
    let mut report = PushRegistration {
        mailbox: record.mailbox.clone(),
        new_mailbox,
        registered: Vec::new(),
        already: Vec::new(),
        failed: Vec::new(),
    };
    let accounts = inner.read(|s| {
        s.accounts
            .values()
            .map(|a| (a.account_id.clone(), a.push_registered.clone()))
            .collect::<Vec<_>>()
    })?;
    for (account_id, registered) in accounts {
        if registered.as_deref() == Some(record.mailbox.as_str()) {
            report.already.push(account_id);
            continue;
        }
        match register_account(inner, &account_id, &record).await {
            Ok(()) => report.registered.push(account_id),
            Err(e) => {
                tracing::info!(account_id, error = %e, "push not registered at the account's server");
                report.failed.push((account_id, e));
            }
        }
    }
    Ok(report)
}

fn platform_name(platform: Platform) -> String {
    platform.as_str().to_owned()
}

/// Registers a new mailbox with a fresh channel key; stores it with the answer (an answer
/// lost leaves an unused mailbox at the MC, never a key bound to a mailbox the device forgot
/// and cannot register again).
async fn register_mailbox(
    inner: &Inner,
    config: &McConfig,
    platform: Platform,
    push_token: &str,
    app_id: &str,
) -> Result<McRecord, SdkError> {
    let key = crate::random::p256_key()?;
    let mut mc = mc_client::connect(config, &key, None, inner.config.request_timeout).await?;
    let (mailbox, mc_token) = mc.register(platform, push_token, app_id).await?;
    mc.close().await;
    let record = McRecord {
        channel_key: KeyBytes::from_key(&key),
        mc_key: hex::encode(&config.channel_public_key),
        mailbox: hex::encode(mailbox),
        mc_token: KeyBytes::from_bytes(mc_token.expose()),
        platform: platform_name(platform),
        app_id: app_id.to_owned(),
    };
    inner.write(|s| s.mc = Some(record.clone()))?;
    tracing::info!(mailbox = %record.mailbox, "registered at the message center");
    Ok(record)
}

/// Gives the account's server the mailbox's MC token and the account's push key.
async fn register_account(
    inner: &Inner,
    account_id: &str,
    record: &McRecord,
) -> Result<(), SdkError> {
    let push_public_key = ensure_push_key(inner, account_id)?;
    let mc_key = hex::decode(&record.mc_key).map_err(|_| {
        SdkError::Storage(crate::storage::StorageError::Malformed(
            "the MC key is not hex".into(),
        ))
    })?;
    let body = RequestBody::RegisterPush {
        mc_key: Blob(mc_key),
        mc_token: Secret::new(*record.mc_token.expose()),
        push_public_key: Blob(push_public_key),
    };
    match inner.account_request(account_id, body).await? {
        Answer::Done => {}
        _ => {
            return Err(SdkError::Transport(
                "unexpected answer to register_push".into(),
            ));
        }
    }
    inner.write(|s| {
        if let Some(account) = s.accounts.get_mut(account_id) {
            account.push_registered = Some(record.mailbox.clone());
        }
    })?;
    tracing::info!(account_id, "push registered at the account's server");
    Ok(())
}

/// After an enrolment: when push is registered (with the configured MC), the new account's
/// server gets it too.
pub(crate) async fn register_account_if_registered(
    inner: &Inner,
    account_id: &str,
) -> Result<(), SdkError> {
    if inner.config.mc.is_none() {
        return Ok(());
    }
    match registration(inner)? {
        Some(record) => register_account(inner, account_id, &record).await,
        None => Ok(()),
    }
}

/// See [`crate::Sdk::update_push_token`].
pub(crate) async fn update_push_token(inner: &Inner, push_token: &str) -> Result<(), SdkError> {
    let _one_at_a_time = inner.mc_lock.lock().await;
    let record = registration(inner)?.ok_or(SdkError::PushNotRegistered)?;
    let mut mc = connect_mailbox(inner, &record).await?;
    mc.update_push_token(push_token).await?;
    mc.close().await;
    Ok(())
}

/// What a push payload holds.
#[derive(Debug, PartialEq, Eq)]
enum Payload {
    Envelope(Vec<u8>),
    WakeUp,
}

const MALFORMED: SdkError = SdkError::Push(PushRefusal::Malformed);

/// Reads a payload: raw envelope bytes, its base64url text (the `cs` value), a `cs_wake`
/// value (a message id, 32 hex digits), or a JSON object with a `cs` or `cs_wake` member
/// (an FCM data map, an APNs payload; FCM's message form with `data` inside too).
fn parse_payload(payload: &[u8]) -> Result<Payload, SdkError> {
    // An envelope is a CBOR map, whose first byte is never valid UTF-8: binary is binary.
    let Ok(text) = std::str::from_utf8(payload) else {
        return Ok(Payload::Envelope(payload.to_vec()));
    };
    let text = text.trim();
    if text.starts_with('{') {
        let json: serde_json::Value = serde_json::from_str(text).map_err(|_| MALFORMED)?;
        let object = json
            .get("message")
            .and_then(|m| m.get("data"))
            .or_else(|| json.get("data"))
            .filter(|d| d.is_object())
            .unwrap_or(&json);
        if let Some(cs) = object.get("cs").and_then(serde_json::Value::as_str) {
            return envelope_text(cs);
        }
        if let Some(wake) = object.get("cs_wake").and_then(serde_json::Value::as_str) {
            return wake_up(wake);
        }
        return Err(MALFORMED);
    }
    if text.len() == 32 {
        return wake_up(text);
    }
    envelope_text(text)
}

fn wake_up(text: &str) -> Result<Payload, SdkError> {
    let mut id = [0u8; 16];
    hex::decode_to_slice(text.trim(), &mut id).map_err(|_| MALFORMED)?;
    Ok(Payload::WakeUp)
}

fn envelope_text(text: &str) -> Result<Payload, SdkError> {
    let text = text.trim().trim_end_matches('=');
    if text.len() > push::MAX_ENVELOPE_BYTES.div_ceil(3) * 4 {
        return Err(MALFORMED);
    }
    URL_SAFE_NO_PAD
        .decode(text)
        .map(Payload::Envelope)
        .map_err(|_| MALFORMED)
}

/// See [`crate::Sdk::process_push`].
pub(crate) async fn process(
    inner: &Arc<Inner>,
    payload: &[u8],
    callbacks: Arc<dyn Callbacks>,
) -> Result<PushAction, SdkError> {
    match parse_payload(payload)? {
        Payload::WakeUp => pull(inner, callbacks).await.map(PushAction::Pulled),
        Payload::Envelope(bytes) => process_envelope(inner, &bytes, callbacks).await,
    }
}

/// An envelope that opened: for which account, and what it says.
struct Opened {
    account_id: String,
    message: PushMessage,
}

/// Opens `envelope` with the account whose push key it names (several only if their key ids
/// collide) and that account's server's sender key.
fn open(inner: &Inner, envelope: &Envelope) -> Result<Opened, SdkError> {
    let candidates = inner.read(|s| {
        s.accounts
            .values()
            .filter_map(|a| {
                let key = a.push_key.as_ref()?;
                let public = key.public_key().ok()?;
                (push::key_id(&public) == envelope.key_id).then(|| {
                    let sender = s.servers.get(&a.server_id).map(|r| r.push_key());
                    (
                        a.account_id.clone(),
                        a.server_id.clone(),
                        key.secret.clone(),
                        sender,
                    )
                })
            })
            .collect::<Vec<_>>()
    })?;
    if candidates.is_empty() {
        return Err(SdkError::Push(PushRefusal::UnknownKey));
    }
    let mut refusal = PushRefusal::Undecryptable;
    for (account_id, server_id, secret, sender) in candidates {
        let Some(sender) = sender.transpose()?.flatten() else {
            refusal = PushRefusal::NoSenderKey;
            continue;
        };
        let target = PushTarget {
            server_id: parse_id(&server_id)?,
            account_id: parse_id(&account_id)?,
        };
        if let Ok(message) = push::open(secret.expose(), &sender, &target, envelope) {
            return Ok(Opened {
                account_id,
                message,
            });
        }
        refusal = PushRefusal::Undecryptable;
    }
    Err(SdkError::Push(refusal))
}

/// Opens, checks and runs one envelope.
async fn process_envelope(
    inner: &Arc<Inner>,
    bytes: &[u8],
    callbacks: Arc<dyn Callbacks>,
) -> Result<PushAction, SdkError> {
    let envelope = push::decode_envelope(bytes).map_err(|_| MALFORMED)?;
    let opened = open(inner, &envelope)?;
    let now = u64::try_from(inner.device_time_ms()?).unwrap_or(0);
    if envelope.is_expired(now) {
        tracing::info!(message_id = %hex::encode(envelope.message_id), "push message expired");
        return Err(SdkError::Push(PushRefusal::Expired));
    }
    let fresh =
        inner.write(|s| s.mark_processed(&envelope.message_id, envelope.expires_at_ms, now))?;
    if !fresh {
        tracing::info!(message_id = %hex::encode(envelope.message_id), "push message already processed");
        return Err(SdkError::Push(PushRefusal::AlreadyProcessed));
    }
    tracing::info!(
        message_id = %hex::encode(envelope.message_id),
        account_id = %opened.account_id,
        kind = kind_name(&opened.message.body),
        "push message"
    );
    act(inner, &opened.account_id, opened.message.body, callbacks).await
}

const fn kind_name(body: &PushBody) -> &'static str {
    match body {
        PushBody::Login { .. } => "login",
        PushBody::Withdrawn { .. } => "withdrawn",
        PushBody::LoggedOut { .. } => "logged_out",
        PushBody::AccountDeleted => "account_deleted",
        PushBody::Transaction { .. } => "transaction",
    }
}

/// Does what a message asks.
async fn act(
    inner: &Arc<Inner>,
    account_id: &str,
    body: PushBody,
    callbacks: Arc<dyn Callbacks>,
) -> Result<PushAction, SdkError> {
    match body {
        PushBody::Login { hsid } => {
            session::start_pushed(Arc::clone(inner), account_id, hsid.0, callbacks)
                .await
                .map(PushAction::Login)
        }
        PushBody::Withdrawn { hsid } => Ok(PushAction::SessionEnded {
            session_id: session::ended_by_server(inner, &hsid.0).await?,
            logged_out: false,
        }),
        PushBody::LoggedOut { hsid } => Ok(PushAction::SessionEnded {
            session_id: session::ended_by_server(inner, &hsid.0).await?,
            logged_out: true,
        }),
        PushBody::AccountDeleted => {
            let info = inner
                .read(|s| s.accounts.get(account_id).map(|a| s.account_info(a)))?
                .ok_or(SdkError::UnknownAccount)?;
            // Confirmed by the gateway: it refuses a deleted account's channel, and
            // `connect_account` then forgets the account and tells the callbacks.
            match inner
                .connect_account(account_id, None, callbacks.as_ref())
                .await
            {
                Err(SdkError::Refused(Refusal::AccountDeleted)) => Ok(PushAction::AccountDeleted {
                    account: Some(info),
                }),
                Ok(_) => {
                    tracing::warn!(
                        account_id,
                        "a push said the account is deleted, the gateway does not; kept"
                    );
                    Ok(PushAction::AccountDeleted { account: None })
                }
                Err(e) => Err(e),
            }
        }
        PushBody::Transaction { transaction_id } => {
            let transaction_id = hex::encode(transaction_id.0);
            let pending = crate::transaction::pending(inner, account_id)
                .await?
                .into_iter()
                .find(|p| p.transaction_id == transaction_id);
            if let Some(pending) = &pending {
                let info = inner.read(|s| s.accounts.get(account_id).map(|a| s.account_info(a)))?;
                if let Some(info) = info {
                    callbacks.on_transaction_pending(&info, pending);
                }
            }
            Ok(PushAction::Transaction {
                account_id: account_id.to_owned(),
                transaction_id,
                pending,
            })
        }
    }
}

/// See [`crate::Sdk::pull_messages`].
pub(crate) async fn pull(
    inner: &Arc<Inner>,
    callbacks: Arc<dyn Callbacks>,
) -> Result<PullReport, SdkError> {
    let record = registration(inner)?.ok_or(SdkError::PushNotRegistered)?;
    let mut mc = connect_mailbox(inner, &record).await?;
    let mut report = PullReport::default();
    for _ in 0..MAX_PULL_ROUNDS {
        let (messages, more) = mc.pull(PULL_LIMIT).await?;
        if messages.is_empty() {
            break;
        }
        let mut acknowledged = Vec::with_capacity(messages.len());
        for message in messages {
            acknowledged.push(message.message_id);
            let id = hex::encode(message.message_id.0);
            match process_envelope(inner, &message.envelope.0, Arc::clone(&callbacks)).await {
                Ok(action) => {
                    report.processed += 1;
                    report.actions.push(action);
                }
                Err(SdkError::Push(PushRefusal::AlreadyProcessed)) => report.duplicates += 1,
                Err(SdkError::Push(PushRefusal::Expired)) => report.expired += 1,
                Err(e @ SdkError::Push(_)) => report.failed.push((id, e)),
                Err(e) => {
                    // It ran (its id is recorded); what it asked failed.
                    report.processed += 1;
                    report.failed.push((id, e));
                }
            }
        }
        mc.ack(acknowledged).await?;
        if !more {
            break;
        }
    }
    mc.close().await;
    tracing::info!(
        processed = report.processed,
        duplicates = report.duplicates,
        expired = report.expired,
        failed = report.failed.len(),
        "mailbox pulled"
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn payloads_in_every_form_are_read() {
        let envelope = vec![0xa6, 1, 2, 3];
        let text = URL_SAFE_NO_PAD.encode(&envelope);
        assert_eq!(
            parse_payload(&envelope).unwrap(),
            Payload::Envelope(envelope.clone())
        );
        assert_eq!(
            parse_payload(text.as_bytes()).unwrap(),
            Payload::Envelope(envelope.clone())
        );
        assert_eq!(
            parse_payload(format!(" {text}==\n").as_bytes()).unwrap(),
            Payload::Envelope(envelope.clone())
        );
        for json in [
            format!(r#"{{"cs":"{text}"}}"#),
            format!(r#"{{"data":{{"cs":"{text}"}}}}"#),
            format!(r#"{{"message":{{"token":"t","data":{{"cs":"{text}"}}}}}}"#),
            format!(r#"{{"aps":{{"alert":{{"loc-key":"COUNTERSIGN_MESSAGE"}}}},"cs":"{text}"}}"#),
        ] {
            assert_eq!(
                parse_payload(json.as_bytes()).unwrap(),
                Payload::Envelope(envelope.clone()),
                "{json}"
            );
        }
        let id = hex::encode([5u8; 16]);
        assert_eq!(parse_payload(id.as_bytes()).unwrap(), Payload::WakeUp);
        assert_eq!(
            parse_payload(format!(r#"{{"cs_wake":"{id}"}}"#).as_bytes()).unwrap(),
            Payload::WakeUp
        );
        for bad in [
            &b"{not json"[..],
            br#"{"other":"x"}"#,
            br#"{"cs_wake":"zz"}"#,
            b"not base64!",
        ] {
            assert_eq!(parse_payload(bad), Err(MALFORMED), "{bad:?}");
        }
        let huge = "A".repeat(push::MAX_ENVELOPE_BYTES * 2);
        assert_eq!(parse_payload(huge.as_bytes()), Err(MALFORMED));
    }
}
