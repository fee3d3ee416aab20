//! The SDK's state as stored: JSON inside the encrypted blob of [`crate::storage`].
//!
//! It holds the app instance id (made once), the servers (parameters, channel key, gateway,
//! pinned fingerprint), the accounts (with their private keys, and whether they have a second
//! factor), the app instance's SFS record (its SFS channel key, made once; the biometric key;
//! what the SFS said is registered) and the history. Fields added after format 1 was first
//! written default when absent, so older blobs still open. Never stored: the PIN. Everything is
//! keyed by id in hex, accounts carry their server's id, so one SDK holds accounts at many
//! servers. Private keys are [`KeyBytes`]: wiped on drop, `Debug` prints nothing, and their
//! JSON text is wiped too. The serialized blob is handed out as `Zeroizing` bytes.
//!
//! Push (docs/message-center.md): the Message Center registration ([`McRecord`]: the MC
//! channel key, the mailbox, the MC token), each account's push key pair ([`PushKeyRecord`])
//! and whether its server was given it, each server's push sender key (from its `Welcome`),
//! and the ids of the push messages already processed ([`ProcessedMessage`]), so that a
//! message runs once even after a restart.
//!
//! Rules: a server record exists only while an account refers to it ([`Persisted::forget_account`]
//! drops orphans); the history keeps the newest [`MAX_HISTORY`] entries; the processed
//! message ids the newest [`MAX_PROCESSED`] (expired ones go first: their expiry refuses
//! them anyway). The MC token and the push secret keys are [`KeyBytes`] too.

use std::collections::BTreeMap;
use std::fmt;

use countersign_protocol::channel::StaticKey;
use countersign_protocol::device::ServerParams;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

use crate::model::{AccountInfo, HistoryEntry, ServerInfo};
use crate::storage::StorageError;

/// The format version written in the blob.
pub(crate) const FORMAT: u32 = 1;
/// Entries kept in the history; older ones are dropped.
pub(crate) const MAX_HISTORY: usize = 500;
/// Processed push message ids kept; expired ones are dropped first, then the oldest.
pub(crate) const MAX_PROCESSED: usize = 1024;

/// A private key as stored: 32 bytes, wiped on drop, invisible to `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct KeyBytes(Zeroizing<[u8; 32]>);

impl KeyBytes {
    pub(crate) fn from_key(key: &StaticKey) -> Self {
        Self(Zeroizing::new(*key.expose()))
    }

    /// Wraps 32 secret bytes (a push key, an MC token).
    pub(crate) fn from_bytes(bytes: &[u8; 32]) -> Self {
        Self(Zeroizing::new(*bytes))
    }

    /// The secret bytes.
    pub(crate) fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    pub(crate) fn to_key(&self) -> Result<StaticKey, StorageError> {
        StaticKey::from_bytes(self.0.as_slice())
            .map_err(|_| StorageError::Malformed("a stored key is not a P-256 key".into()))
    }
}

impl fmt::Debug for KeyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyBytes(..)")
    }
}

impl Serialize for KeyBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = Zeroizing::new(hex::encode(self.0.as_slice()));
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for KeyBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Zeroizing::new(String::deserialize(d)?);
        let mut out = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(text.as_bytes(), out.as_mut_slice())
            .map_err(|_| serde::de::Error::custom("a key must be 64 hex digits"))?;
        Ok(Self(out))
    }
}

/// A server as the device knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ServerRecord {
    pub server_id: String,
    pub name: String,
    pub logo_url: Option<String>,
    pub second_factor: String,
    pub second_factor_cache_secs: u32,
    pub default_ping_time_secs: u32,
    /// SEC1 uncompressed, hex.
    pub public_key: String,
    pub gateway: String,
    /// SHA-256 of the public key, hex.
    pub fingerprint: String,
    /// The server's push sender key (SEC1 uncompressed, hex), as its last `Welcome` said;
    /// `None`: it sends no push.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_key: Option<String>,
}

impl ServerRecord {
    pub(crate) fn new(params: &ServerParams, public_key: &[u8], gateway: &str) -> Self {
        Self {
            server_id: hex::encode(params.server_id.0),
            name: params.name.clone(),
            logo_url: params.logo_url.clone(),
            second_factor: params.second_factor.clone(),
            second_factor_cache_secs: params.second_factor_cache_secs,
            default_ping_time_secs: params.default_ping_time_secs,
            public_key: hex::encode(public_key),
            gateway: gateway.to_owned(),
            fingerprint: hex::encode(countersign_protocol::channel::fingerprint(public_key)),
            push_key: params.push_key.as_ref().map(|k| hex::encode(&k.0)),
        }
    }

    /// Takes the parameters a gateway sent in its `Welcome`; key and gateway stay pinned.
    pub(crate) fn refresh(&mut self, params: &ServerParams) {
        self.name.clone_from(&params.name);
        self.logo_url.clone_from(&params.logo_url);
        self.second_factor.clone_from(&params.second_factor);
        self.second_factor_cache_secs = params.second_factor_cache_secs;
        self.default_ping_time_secs = params.default_ping_time_secs;
        self.push_key = params.push_key.as_ref().map(|k| hex::encode(&k.0));
    }

    /// The server's push sender key, if it published one.
    pub(crate) fn push_key(&self) -> Result<Option<Vec<u8>>, StorageError> {
        self.push_key
            .as_deref()
            .map(|k| {
                hex::decode(k)
                    .map_err(|_| StorageError::Malformed("a server push key is not hex".into()))
            })
            .transpose()
    }

    pub(crate) fn public_key(&self) -> Result<Vec<u8>, StorageError> {
        hex::decode(&self.public_key)
            .map_err(|_| StorageError::Malformed("a server key is not hex".into()))
    }

    pub(crate) fn info(&self) -> ServerInfo {
        ServerInfo {
            server_id: self.server_id.clone(),
            name: self.name.clone(),
            logo_url: self.logo_url.clone(),
            second_factor: self.second_factor.clone(),
            second_factor_cache_secs: self.second_factor_cache_secs,
            default_ping_time_secs: self.default_ping_time_secs,
            gateway: self.gateway.clone(),
            fingerprint: self.fingerprint.clone(),
        }
    }
}

/// An account and its private keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AccountRecord {
    pub account_id: String,
    pub server_id: String,
    pub userid: String,
    /// The Noise static key of this account's channel.
    pub channel_key: KeyBytes,
    /// The key this account signs with (registered at enrolment).
    pub signing_key: KeyBytes,
    pub created_at_ms: i64,
    /// A second factor was added to the account (`upgrade_account`): no longer headless.
    #[serde(default)]
    pub second_factor: bool,
    /// The account's push key pair (made at enrolment, or at the first `register_push`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_key: Option<PushKeyRecord>,
    /// The mailbox (hex) the account's server was given (`register_push`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_registered: Option<String>,
}

/// An account's push key pair: messages for the account are sealed to its public half.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PushKeyRecord {
    /// The P-256 private scalar.
    pub secret: KeyBytes,
    /// SEC1 uncompressed, hex.
    pub public: String,
}

impl PushKeyRecord {
    pub(crate) fn public_key(&self) -> Result<Vec<u8>, StorageError> {
        hex::decode(&self.public)
            .map_err(|_| StorageError::Malformed("a push key is not hex".into()))
    }
}

/// This app instance's Message Center registration (made by `register_push`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct McRecord {
    /// The Noise static key of the MC channel, bound by the MC to the mailbox.
    pub channel_key: KeyBytes,
    /// The MC's channel key (SEC1, hex) the registration was made with: another MC in the
    /// configuration means registering anew.
    pub mc_key: String,
    /// The mailbox id, 32 hex digits.
    pub mailbox: String,
    /// The MC token naming the mailbox (what the servers submit messages with).
    pub mc_token: KeyBytes,
    /// `fcm` or `apns`.
    pub platform: String,
    /// The Android package or APNs topic.
    pub app_id: String,
}

/// A push message already processed (run, or refused as expired), kept so a replay or a
/// second copy (pushed and pulled) is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ProcessedMessage {
    /// The message id, 32 hex digits.
    pub id: String,
    /// Its expiry, milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
}

/// The app instance at its second-factor server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SfsRecord {
    /// The Noise static key of the SFS channel; the SFS binds it to the app instance id.
    pub instance_key: KeyBytes,
    /// The SFS said a PIN is registered (as of the last channel).
    #[serde(default)]
    pub pin_registered: bool,
    /// The SFS said a biometric key is registered (as of the last channel).
    #[serde(default)]
    pub biometric_registered: bool,
    /// The biometric key (on a phone it lives in the platform keystore instead).
    #[serde(default)]
    pub biometric_key: Option<KeyBytes>,
}

impl SfsRecord {
    pub(crate) fn new(instance_key: KeyBytes) -> Self {
        Self {
            instance_key,
            pin_registered: false,
            biometric_registered: false,
            biometric_key: None,
        }
    }
}

/// Everything the SDK remembers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Persisted {
    pub format: u32,
    /// This app installation, 32 hex digits.
    pub app_instance: String,
    /// By server id.
    pub servers: BTreeMap<String, ServerRecord>,
    /// By account id.
    pub accounts: BTreeMap<String, AccountRecord>,
    /// Oldest first.
    pub history: Vec<HistoryEntry>,
    /// Made at the first use of the SFS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sfs: Option<SfsRecord>,
    /// Made by `register_push`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mc: Option<McRecord>,
    /// Push messages processed, oldest first (at most [`MAX_PROCESSED`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processed: Vec<ProcessedMessage>,
}

impl Persisted {
    /// A new installation.
    pub(crate) fn new(app_instance: [u8; 16]) -> Self {
        Self {
            format: FORMAT,
            app_instance: hex::encode(app_instance),
            servers: BTreeMap::new(),
            accounts: BTreeMap::new(),
            history: Vec::new(),
            sfs: None,
            mc: None,
            processed: Vec::new(),
        }
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, StorageError> {
        let state: Self = serde_json::from_slice(bytes).map_err(|e| {
            StorageError::Malformed(format!("line {}, column {}", e.line(), e.column()))
        })?;
        if state.format != FORMAT {
            return Err(StorageError::Malformed(format!(
                "unknown format {}",
                state.format
            )));
        }
        Ok(state)
    }

    pub(crate) fn encode(&self) -> Result<Zeroizing<Vec<u8>>, StorageError> {
        serde_json::to_vec(self)
            .map(Zeroizing::new)
            .map_err(|e| StorageError::Malformed(e.to_string()))
    }

    pub(crate) fn app_instance(&self) -> Result<[u8; 16], StorageError> {
        let mut out = [0u8; 16];
        hex::decode_to_slice(&self.app_instance, &mut out)
            .map_err(|_| StorageError::Malformed("app instance".into()))?;
        Ok(out)
    }

    pub(crate) fn account_info(&self, account: &AccountRecord) -> AccountInfo {
        AccountInfo {
            account_id: account.account_id.clone(),
            server_id: account.server_id.clone(),
            server_name: self
                .servers
                .get(&account.server_id)
                .map(|s| s.name.clone())
                .unwrap_or_default(),
            userid: account.userid.clone(),
            headless: !account.second_factor,
            created_at_ms: account.created_at_ms,
        }
    }

    /// The accounts at `server_id`, oldest first.
    pub(crate) fn accounts_at(&self, server_id: &str) -> Vec<AccountRecord> {
        let mut accounts: Vec<AccountRecord> = self
            .accounts
            .values()
            .filter(|a| a.server_id == server_id)
            .cloned()
            .collect();
        accounts.sort_by(|a, b| {
            (a.created_at_ms, &a.account_id).cmp(&(b.created_at_ms, &b.account_id))
        });
        accounts
    }

    /// Removes an account, and its server if no account refers to it any more. Answers what
    /// the account was, if it existed.
    pub(crate) fn forget_account(&mut self, account_id: &str) -> Option<AccountInfo> {
        let info = self
            .accounts
            .get(account_id)
            .map(|a| self.account_info(a))?;
        self.accounts.remove(account_id);
        if !self
            .accounts
            .values()
            .any(|a| a.server_id == info.server_id)
        {
            self.servers.remove(&info.server_id);
        }
        Some(info)
    }

    /// Records push message `id` as processed; answers false (and changes nothing) when it
    /// already was. Keeps at most [`MAX_PROCESSED`] ids: those expired at `now_ms` go first,
    /// then the oldest.
    pub(crate) fn mark_processed(
        &mut self,
        id: &[u8; 16],
        expires_at_ms: u64,
        now_ms: u64,
    ) -> bool {
        let id = hex::encode(id);
        if self.processed.iter().any(|p| p.id == id) {
            return false;
        }
        self.processed.push(ProcessedMessage { id, expires_at_ms });
        if self.processed.len() > MAX_PROCESSED {
            self.processed.retain(|p| p.expires_at_ms > now_ms);
            let excess = self.processed.len().saturating_sub(MAX_PROCESSED);
            self.processed.drain(..excess);
        }
        true
    }

    /// Creates or updates the entry of `entry.session_id`, and keeps the history bounded.
    pub(crate) fn record(&mut self, entry: HistoryEntry) {
        if let Some(existing) = self
            .history
            .iter_mut()
            .find(|e| e.session_id == entry.session_id)
        {
            *existing = entry;
        } else {
            self.history.push(entry);
        }
        let excess = self.history.len().saturating_sub(MAX_HISTORY);
        self.history.drain(..excess);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::machine::{HistoryStatus, SessionKind};

    fn account(id: u8, server: u8, key: u8) -> AccountRecord {
        AccountRecord {
            account_id: hex::encode([id; 16]),
            server_id: hex::encode([server; 16]),
            userid: format!("user{id}"),
            channel_key: KeyBytes::from_key(&StaticKey::from_bytes(&[key; 32]).unwrap()),
            signing_key: KeyBytes::from_key(&StaticKey::from_bytes(&[key + 1; 32]).unwrap()),
            created_at_ms: i64::from(id),
            second_factor: false,
            push_key: None,
            push_registered: None,
        }
    }

    fn server(id: u8) -> ServerRecord {
        let params = ServerParams {
            server_id: countersign_protocol::device::Bytes([id; 16]),
            name: format!("server{id}"),
            logo_url: None,
            second_factor: "none".into(),
            second_factor_cache_secs: 0,
            default_ping_time_secs: 0,
            push_key: None,
        };
        ServerRecord::new(&params, &[4; 65], "ws://gw")
    }

    #[test]
    fn debug_of_secrets_prints_nothing() {
        let a = account(1, 2, 0x5a);
        let text = format!("{a:?} {:?}", a.channel_key);
        assert!(!text.contains("5a5a"), "{text}");
        assert!(!text.contains("90, 90"), "{text}");
        assert!(text.contains("KeyBytes(..)"));
        let mut state = Persisted::new([7; 16]);
        state.accounts.insert(a.account_id.clone(), a);
        assert!(!format!("{state:?}").contains("5a5a"));
    }

    #[test]
    fn round_trips_through_json_with_keys_as_hex() {
        let mut state = Persisted::new([7; 16]);
        state.servers.insert(hex::encode([2; 16]), server(2));
        let a = account(1, 2, 0x5a);
        state.accounts.insert(a.account_id.clone(), a.clone());
        let bytes = state.encode().unwrap();
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.contains(&"5a".repeat(32)), "stored as hex");
        let back = Persisted::decode(&bytes).unwrap();
        assert_eq!(back, state);
        assert_eq!(
            back.accounts[&a.account_id]
                .channel_key
                .to_key()
                .unwrap()
                .expose(),
            &[0x5a; 32]
        );
        assert_eq!(back.app_instance().unwrap(), [7; 16]);
    }

    #[test]
    fn malformed_and_future_states_are_refused() {
        assert!(matches!(
            Persisted::decode(b"{"),
            Err(StorageError::Malformed(_))
        ));
        let mut state = Persisted::new([7; 16]);
        state.format = 9;
        let bytes = serde_json::to_vec(&state).unwrap();
        assert!(matches!(
            Persisted::decode(&bytes),
            Err(StorageError::Malformed(_))
        ));
    }

    #[test]
    fn forgetting_the_last_account_of_a_server_forgets_the_server() {
        let mut state = Persisted::new([7; 16]);
        state.servers.insert(hex::encode([2; 16]), server(2));
        for a in [account(1, 2, 9), account(3, 2, 11)] {
            state.accounts.insert(a.account_id.clone(), a);
        }
        assert_eq!(state.accounts_at(&hex::encode([2; 16])).len(), 2);
        let gone = state.forget_account(&hex::encode([1; 16])).unwrap();
        assert_eq!(
            (gone.userid.as_str(), gone.server_name.as_str()),
            ("user1", "server2")
        );
        assert_eq!(state.servers.len(), 1);
        state.forget_account(&hex::encode([3; 16])).unwrap();
        assert!(state.servers.is_empty());
        assert_eq!(state.forget_account(&hex::encode([3; 16])), None);
    }

    #[test]
    fn history_updates_by_session_and_stays_bounded() {
        let mut state = Persisted::new([7; 16]);
        let entry = |n: usize, status| HistoryEntry {
            session_id: format!("{n}"),
            server_id: "s".into(),
            account_id: None,
            kind: SessionKind::Login,
            status,
            announce_info: None,
            at_ms: 0,
        };
        state.record(entry(1, HistoryStatus::LoggedIn));
        state.record(entry(1, HistoryStatus::LoggedOut));
        assert_eq!(state.history.len(), 1);
        assert_eq!(state.history[0].status, HistoryStatus::LoggedOut);
        for n in 2..=MAX_HISTORY + 1 {
            state.record(entry(n, HistoryStatus::Aborted));
        }
        assert_eq!(state.history.len(), MAX_HISTORY);
        assert_eq!(state.history[0].session_id, "2", "the oldest went first");
    }

    #[test]
    fn a_blob_without_second_factor_fields_opens_and_they_round_trip() {
        let mut state = Persisted::new([7; 16]);
        let a = account(1, 2, 0x5a);
        state.accounts.insert(a.account_id.clone(), a.clone());
        // As written before the second factor existed.
        let mut old: serde_json::Value = serde_json::from_slice(&state.encode().unwrap()).unwrap();
        old["accounts"][&a.account_id]
            .as_object_mut()
            .unwrap()
            .remove("second_factor");
        assert!(old.get("sfs").is_none());
        let back = Persisted::decode(&serde_json::to_vec(&old).unwrap()).unwrap();
        assert_eq!(back, state);
        assert!(back.account_info(&back.accounts[&a.account_id]).headless);

        let mut record = SfsRecord::new(KeyBytes::from_key(
            &StaticKey::from_bytes(&[0x33; 32]).unwrap(),
        ));
        record.pin_registered = true;
        record.biometric_key = Some(KeyBytes::from_key(
            &StaticKey::from_bytes(&[0x44; 32]).unwrap(),
        ));
        state.sfs = Some(record);
        state.accounts.get_mut(&a.account_id).unwrap().second_factor = true;
        let bytes = state.encode().unwrap();
        assert_eq!(Persisted::decode(&bytes).unwrap(), state);
        assert!(!state.account_info(&state.accounts[&a.account_id]).headless);
        assert!(
            !format!("{state:?}").contains("3333"),
            "keys stay out of Debug"
        );
    }

    #[test]
    fn processed_ids_refuse_a_second_run_and_stay_bounded_dropping_expired_first() {
        let mut state = Persisted::new([7; 16]);
        assert!(state.mark_processed(&[1; 16], 100, 0));
        assert!(
            !state.mark_processed(&[1; 16], 100, 0),
            "a second run is refused"
        );
        assert_eq!(state.processed.len(), 1);
        // Fill up with unexpired ids; one more drops the expired [1; 16] first.
        for n in 0..MAX_PROCESSED - 1 {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&(n as u64 + 10).to_be_bytes());
            assert!(state.mark_processed(&id, 10_000, 50));
        }
        assert_eq!(state.processed.len(), MAX_PROCESSED);
        assert!(state.mark_processed(&[2; 16], 10_000, 200));
        assert_eq!(state.processed.len(), MAX_PROCESSED);
        assert!(
            !state.processed.iter().any(|p| p.id == hex::encode([1; 16])),
            "the expired id went"
        );
        let second = state.processed[0].id.clone();
        // Nothing expired: the oldest goes.
        assert!(state.mark_processed(&[3; 16], 10_000, 200));
        assert_eq!(state.processed.len(), MAX_PROCESSED);
        assert_ne!(state.processed[0].id, second, "the oldest went");
        assert!(!state.mark_processed(&[2; 16], 10_000, 200), "still known");
    }

    #[test]
    fn push_state_round_trips_and_keeps_secrets_out_of_debug() {
        let mut state = Persisted::new([7; 16]);
        let mut params_server = server(2);
        assert_eq!(params_server.push_key, None);
        let params = ServerParams {
            server_id: countersign_protocol::device::Bytes([2; 16]),
            name: "renamed".into(),
            logo_url: None,
            second_factor: "none".into(),
            second_factor_cache_secs: 0,
            default_ping_time_secs: 0,
            push_key: Some(countersign_protocol::device::Blob(vec![4; 65])),
        };
        params_server.refresh(&params);
        assert_eq!(
            params_server.push_key().unwrap(),
            Some(vec![4; 65]),
            "refreshed"
        );
        state.servers.insert(hex::encode([2; 16]), params_server);
        let mut a = account(1, 2, 0x5a);
        a.push_key = Some(PushKeyRecord {
            secret: KeyBytes::from_bytes(&[0x6b; 32]),
            public: hex::encode([4; 65]),
        });
        a.push_registered = Some(hex::encode([8; 16]));
        state.accounts.insert(a.account_id.clone(), a);
        state.mc = Some(McRecord {
            channel_key: KeyBytes::from_bytes(&[0x7c; 32]),
            mc_key: hex::encode([4; 65]),
            mailbox: hex::encode([8; 16]),
            mc_token: KeyBytes::from_bytes(&[0x8d; 32]),
            platform: "fcm".into(),
            app_id: "com.example".into(),
        });
        state.mark_processed(&[5; 16], 9, 0);
        let bytes = state.encode().unwrap();
        assert_eq!(Persisted::decode(&bytes).unwrap(), state);
        let debug = format!("{state:?}");
        for secret in ["6b6b", "7c7c", "8d8d"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        // A blob from before push opens, with nothing registered.
        let mut old: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let object = old.as_object_mut().unwrap();
        object.remove("mc");
        object.remove("processed");
        let back = Persisted::decode(&serde_json::to_vec(&old).unwrap()).unwrap();
        assert_eq!((back.mc, back.processed.len()), (None, 0));
    }
}
