//! The second factor on the app's side (docs/second-factor.md): what the app configures
//! ([`SfsConfig`], [`Argon2Params`], a [`BiometricPrompt`]), the PIN type ([`Pin`]), and the
//! flows that turn the user's PIN or biometric into an SFS attestation for the gateway.
//!
//! Flows (each on a fresh SFS channel, closed after it):
//! - attest: PIN → OPAQUE `login_start` / `login_finish` with the NS challenge and the
//!   account key thumbprint; biometric → the prompt releases the key, `biometric_start` →
//!   sign `"countersign/sfs/biometric/v1" 0x00 ‖ nonce ‖ challenge ‖ thumbprint` →
//!   `biometric_finish`. Both answer the attestation. When the app instance has no PIN at the
//!   SFS yet and the flow gives an account its second factor (an enrolment, an upgrade), the
//!   PIN is registered first on the same channel: that is "the first enrolment asks for a PIN"
//!   of seed 004. A login never registers a PIN.
//! - change PIN: a PIN login with the old PIN, then a registration with the new one.
//! - register a biometric key: a PIN login, then `register_biometric` with a fresh P-256 key.
//!
//! A wrong PIN is found by the client first (the OPAQUE envelope does not open). The SFS
//! counted the attempt at `login_start` already, so the client still finishes the login with
//! a finalization that cannot verify: the SFS then answers `wrong_pin` with the attempts left
//! (or `locked` / `revoked`), which the user must hear of.
//!
//! Rules: the PIN lives only in [`Pin`] (wiped on drop, `Debug` prints nothing, not
//! `Serialize`) and is never logged, stored or put in an error; the SFS keys used are the
//! pinned ones of [`SfsConfig`]; PIN logins made only to prove the PIN to the SFS (change
//! PIN, register biometric) attest a random challenge that no countersign server issued, so
//! their attestation is worthless and is dropped.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use countersign_protocol::channel::{StaticKey, fingerprint};
use countersign_protocol::device::{Answer, Blob, Bytes, ChallengePurpose, RequestBody};
use countersign_protocol::sfs::{FactorState, SfsAnswer, SfsBody, SfsCode};
use futures::future::BoxFuture;
use zeroize::Zeroizing;

use crate::client::Connection;
use crate::error::SdkError;
use crate::machine::SecondFactorEvent;
use crate::model::SecondFactor;
use crate::persisted::{KeyBytes, SfsRecord};
use crate::sdk::Inner;
use crate::sfs_client::{self, SfsConnection};

/// The app PIN: wiped on drop; `Debug` prints nothing; neither `Display` nor `Serialize`.
#[derive(Clone)]
pub struct Pin(Zeroizing<String>);

impl Pin {
    /// Wraps the PIN the user typed.
    #[must_use]
    pub fn new(pin: impl Into<String>) -> Self {
        Self(Zeroizing::new(pin.into()))
    }

    /// The bytes OPAQUE takes.
    pub(crate) fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl From<&str> for Pin {
    fn from(pin: &str) -> Self {
        Self::new(pin)
    }
}

impl From<String> for Pin {
    fn from(pin: String) -> Self {
        Self::new(pin)
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(..)")
    }
}

/// The one SFS this app is bound to, with the keys it pins (seed 002): the Noise responder
/// key of its channel and the key its attestations are signed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SfsConfig {
    /// The SFS base, for example `ws://127.0.0.1:8080/v1/sfs` (the channel is
    /// `{url}/channel`, the key document `{http base}/key`).
    pub url: String,
    /// The SFS channel key, SEC1 P-256.
    pub channel_public_key: Vec<u8>,
    /// The SFS attestation key, SEC1 P-256 (what the countersign server trusts).
    pub attestation_public_key: Vec<u8>,
}

impl SfsConfig {
    /// **Trust on first use**: reads `GET {http base}/key` and believes whoever answers. An
    /// app should ship with the SFS keys (or fetch them once over a channel it trusts) and
    /// pin them; this is for development, tests and a virtual device. `base_url` may be the
    /// WebSocket form (`ws://host/v1/sfs`) or the HTTP one (`http://host/v1/sfs`); the
    /// answer's `url` is the WebSocket form.
    ///
    /// # Errors
    /// [`SdkError::Transport`] (unreachable, not a key document, not P-256 keys) or
    /// [`SdkError::Timeout`] after 10 s.
    pub async fn fetch(base_url: &str) -> Result<Self, SdkError> {
        let http = reqwest::Client::builder()
            .build()
            .map_err(|e| SdkError::Transport(e.to_string()))?;
        let (channel_public_key, attestation_public_key) =
            sfs_client::fetch_keys(&http, base_url, Duration::from_secs(10)).await?;
        Ok(Self {
            url: sfs_client::ws_base(base_url)?,
            channel_public_key,
            attestation_public_key,
        })
    }
}

/// Argon2id parameters of the PIN's key stretching, on this device only (the SFS never sees
/// them, but a PIN registered with some parameters only logs in with the same ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Params {
    /// Memory, KiB.
    pub m_kib: u32,
    /// Iterations.
    pub t: u32,
    /// Parallelism.
    pub p: u32,
}

impl Default for Argon2Params {
    /// m = 19 MiB, t = 2, p = 1 (docs/second-factor.md).
    fn default() -> Self {
        Self {
            m_kib: 19 * 1024,
            t: 2,
            p: 1,
        }
    }
}

/// The platform's biometric check, which the app implements: the SDK calls it when it needs
/// the biometric key, and uses the key only if it answers `true`. On a phone this shows the
/// system prompt and the key lives in the platform keystore; the SDK keeps the key in its
/// encrypted state and this hook stands for the keystore's gate.
pub trait BiometricPrompt: Send + Sync {
    /// Shows the biometric check; answers whether the user passed it.
    fn release(&self) -> BoxFuture<'_, bool>;
}

/// A [`BiometricPrompt`] for a virtual device and tests: answers a flag the caller sets.
#[derive(Debug)]
pub struct SimulatedBiometric(AtomicBool);

impl SimulatedBiometric {
    /// A prompt that passes (`true`) or fails.
    #[must_use]
    pub fn new(pass: bool) -> Self {
        Self(AtomicBool::new(pass))
    }

    /// Whether the next checks pass.
    pub fn set(&self, pass: bool) {
        self.0.store(pass, Ordering::SeqCst);
    }
}

impl BiometricPrompt for SimulatedBiometric {
    fn release(&self) -> BoxFuture<'_, bool> {
        let pass = self.0.load(Ordering::SeqCst);
        Box::pin(async move { pass })
    }
}

/// What the SFS says about this app instance's second factor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecondFactorStatus {
    /// A PIN is registered.
    pub pin_registered: bool,
    /// A biometric key is registered.
    pub biometric_registered: bool,
    /// Whether it may be used now.
    pub state: FactorState,
}

fn unexpected(request: &str) -> SdkError {
    SdkError::Transport(format!("unexpected answer to {request}"))
}

/// The app instance id and its SFS key, made (and stored) at the first use.
fn sfs_identity(inner: &Inner) -> Result<([u8; 16], StaticKey), SdkError> {
    let app_instance = inner.read(|s| s.app_instance())??;
    if let Some(key) = inner.read(|s| s.sfs.as_ref().map(|r| r.instance_key.clone()))? {
        return Ok((app_instance, key.to_key()?));
    }
    let fresh = crate::random::p256_key()?;
    let key = inner.write(|s| {
        s.sfs
            .get_or_insert_with(|| SfsRecord::new(KeyBytes::from_key(&fresh)))
            .instance_key
            .clone()
    })?;
    Ok((app_instance, key.to_key()?))
}

/// Opens the SFS channel; records what the SFS says is registered.
async fn open(inner: &Inner) -> Result<SfsConnection, SdkError> {
    let config = inner
        .config
        .sfs
        .as_ref()
        .ok_or(SdkError::SecondFactorUnavailable)?;
    let (app_instance, key) = sfs_identity(inner)?;
    let sfs = sfs_client::connect(config, &key, app_instance, inner.config.request_timeout).await?;
    let welcome = sfs.welcome;
    inner.write(|s| {
        if let Some(record) = s.sfs.as_mut() {
            record.pin_registered = welcome.pin_registered;
            record.biometric_registered = welcome.biometric_registered;
        }
    })?;
    Ok(sfs)
}

async fn register_pin(inner: &Inner, sfs: &mut SfsConnection, pin: &Pin) -> Result<(), SdkError> {
    let (state, request) = crate::opaque::register_start(pin)?;
    let SfsAnswer::Registration { response } = sfs
        .request(SfsBody::RegisterPinStart {
            request: Blob(request),
        })
        .await?
    else {
        return Err(unexpected("register_pin_start"));
    };
    let upload =
        crate::opaque::register_finish(state, pin, response.0, inner.config.argon2_params).await?;
    match sfs
        .request(SfsBody::RegisterPinFinish {
            upload: Blob(upload),
        })
        .await?
    {
        SfsAnswer::Done => {}
        _ => return Err(unexpected("register_pin_finish")),
    }
    inner.write(|s| {
        if let Some(record) = s.sfs.as_mut() {
            record.pin_registered = true;
        }
    })?;
    tracing::info!("pin registered at the SFS");
    Ok(())
}

/// A PIN login on `sfs`; answers the attestation of `challenge` for `thumbprint`.
async fn pin_login(
    inner: &Inner,
    sfs: &mut SfsConnection,
    pin: &Pin,
    challenge: [u8; 32],
    thumbprint: [u8; 32],
) -> Result<Vec<u8>, SdkError> {
    let (state, request) = crate::opaque::login_start(pin)?;
    let SfsAnswer::Credential { response } = sfs
        .request(SfsBody::LoginStart {
            request: Blob(request),
        })
        .await?
    else {
        return Err(unexpected("login_start"));
    };
    let finalization =
        match crate::opaque::login_finish(state, pin, response.0, inner.config.argon2_params)
            .await?
        {
            Some(finalization) => finalization,
            // A wrong PIN: finish with bytes that cannot verify, so the SFS tells how many
            // attempts are left (it counted this one already).
            None => crate::random::bytes::<64>()?.to_vec(),
        };
    match sfs
        .request(SfsBody::LoginFinish {
            finalization: Blob(finalization),
            challenge: Bytes(challenge),
            account_key_thumbprint: Bytes(thumbprint),
        })
        .await?
    {
        SfsAnswer::Attestation { cose } => Ok(cose.0),
        _ => Err(unexpected("login_finish")),
    }
}

async fn biometric_login(
    inner: &Inner,
    sfs: &mut SfsConnection,
    challenge: [u8; 32],
    thumbprint: [u8; 32],
) -> Result<Vec<u8>, SdkError> {
    let key = inner.read(|s| s.sfs.as_ref().and_then(|r| r.biometric_key.clone()))?;
    let Some(key) = key.filter(|_| sfs.welcome.biometric_registered) else {
        return Err(SdkError::SecondFactor(SecondFactorEvent::NotRegistered));
    };
    let prompt = inner
        .biometric_prompt()?
        .ok_or(SdkError::BiometricUnavailable)?;
    if !prompt.release().await {
        return Err(SdkError::SecondFactor(SecondFactorEvent::BiometricFailed));
    }
    let SfsAnswer::BiometricChallenge { nonce } = sfs.request(SfsBody::BiometricStart).await?
    else {
        return Err(unexpected("biometric_start"));
    };
    let signing = p256::ecdsa::SigningKey::from_slice(key.to_key()?.expose())
        .map_err(|_| SdkError::Transport("the biometric key is not a P-256 key".into()))?;
    let message = countersign_protocol::sfs::biometric_message(&nonce.0, &challenge, &thumbprint);
    let signature = countersign_protocol::cose::sign_es256(&signing, &message);
    match sfs
        .request(SfsBody::BiometricFinish {
            signature: Bytes(signature),
            challenge: Bytes(challenge),
            account_key_thumbprint: Bytes(thumbprint),
        })
        .await
    {
        Ok(SfsAnswer::Attestation { cose }) => Ok(cose.0),
        Ok(_) => Err(unexpected("biometric_finish")),
        // The SFS holds another key than ours (registered from elsewhere since).
        Err(SdkError::Sfs(e)) if e.code == SfsCode::Invalid => {
            Err(SdkError::SecondFactor(SecondFactorEvent::BiometricFailed))
        }
        Err(e) => Err(e),
    }
}

/// Has the SFS attest `factor` for `challenge` and the account key `thumbprint`; registers
/// the PIN first when `may_register_pin` and the SFS has none for this app instance.
pub(crate) async fn attest(
    inner: &Inner,
    factor: &SecondFactor,
    challenge: [u8; 32],
    thumbprint: [u8; 32],
    may_register_pin: bool,
) -> Result<Vec<u8>, SdkError> {
    let mut sfs = open(inner).await?;
    let attested = attest_on(
        inner,
        &mut sfs,
        factor,
        challenge,
        thumbprint,
        may_register_pin,
    )
    .await;
    sfs.close().await;
    attested
}

/// As [`attest`] on a channel kept open between calls, for transaction approvals, which come
/// one after another (an officer approving a batch): one handshake for many proofs. A kept
/// channel that has closed meanwhile is replaced and the proof run again on a new one (a PIN
/// login the SFS never answered counts as a failure there, which the successful retry
/// resets). Logins keep opening a channel per proof.
pub(crate) async fn attest_kept(
    inner: &Inner,
    factor: &SecondFactor,
    challenge: [u8; 32],
    thumbprint: [u8; 32],
) -> Result<Vec<u8>, SdkError> {
    let mut kept = inner.sfs_channel.lock().await;
    if let Some(mut sfs) = kept.take() {
        match attest_on(inner, &mut sfs, factor, challenge, thumbprint, false).await {
            Err(SdkError::Transport(_) | SdkError::Timeout) => sfs.close().await,
            result => {
                *kept = Some(sfs);
                return result;
            }
        }
    }
    let mut sfs = open(inner).await?;
    let attested = attest_on(inner, &mut sfs, factor, challenge, thumbprint, false).await;
    match &attested {
        // A channel that failed may be out of step: never keep it.
        Err(SdkError::Transport(_) | SdkError::Timeout) => sfs.close().await,
        _ => *kept = Some(sfs),
    }
    attested
}

/// Closes the kept SFS channel: what it was told at its welcome is about to change.
async fn forget_kept_channel(inner: &Inner) {
    if let Some(sfs) = inner.sfs_channel.lock().await.take() {
        sfs.close().await;
    }
}

async fn attest_on(
    inner: &Inner,
    sfs: &mut SfsConnection,
    factor: &SecondFactor,
    challenge: [u8; 32],
    thumbprint: [u8; 32],
    may_register_pin: bool,
) -> Result<Vec<u8>, SdkError> {
    match factor {
        SecondFactor::Pin(pin) => {
            if may_register_pin && !sfs.welcome.pin_registered {
                register_pin(inner, sfs, pin).await?;
                sfs.welcome.pin_registered = true;
            }
            pin_login(inner, sfs, pin, challenge, thumbprint).await
        }
        SecondFactor::Biometric => biometric_login(inner, sfs, challenge, thumbprint).await,
    }
}

/// Proves the PIN to the SFS on `sfs` with a challenge no countersign server issued.
async fn prove_pin(inner: &Inner, sfs: &mut SfsConnection, pin: &Pin) -> Result<(), SdkError> {
    let nobody = crate::random::bytes::<32>()?;
    let attestation = pin_login(inner, sfs, pin, nobody, nobody).await?;
    drop(attestation);
    Ok(())
}

/// Replaces the PIN at the SFS (the old one must verify first).
pub(crate) async fn change_pin(inner: &Inner, old: &Pin, new: &Pin) -> Result<(), SdkError> {
    forget_kept_channel(inner).await;
    let mut sfs = open(inner).await?;
    let changed = async {
        prove_pin(inner, &mut sfs, old).await?;
        register_pin(inner, &mut sfs, new).await
    }
    .await;
    sfs.close().await;
    changed
}

/// Makes a biometric key and registers it at the SFS (the PIN must verify first).
pub(crate) async fn register_biometric(inner: &Inner, pin: &Pin) -> Result<(), SdkError> {
    // The kept channel's welcome would still say "no biometric key".
    forget_kept_channel(inner).await;
    let mut sfs = open(inner).await?;
    let registered = async {
        prove_pin(inner, &mut sfs, pin).await?;
        let key = crate::random::p256_key()?;
        let public: [u8; 65] = key
            .public_key()
            .map_err(|e| SdkError::Transport(e.to_string()))?
            .try_into()
            .map_err(|_| SdkError::Transport("a P-256 key is not 65 bytes".into()))?;
        match sfs
            .request(SfsBody::RegisterBiometric {
                public_key: Bytes(public),
            })
            .await?
        {
            SfsAnswer::Done => {}
            _ => return Err(unexpected("register_biometric")),
        }
        inner.write(|s| {
            if let Some(record) = s.sfs.as_mut() {
                record.biometric_key = Some(KeyBytes::from_key(&key));
                record.biometric_registered = true;
            }
        })?;
        tracing::info!("biometric key registered at the SFS");
        Ok(())
    }
    .await;
    sfs.close().await;
    registered
}

/// What the SFS says about this app instance.
pub(crate) async fn status(inner: &Inner) -> Result<SecondFactorStatus, SdkError> {
    let sfs = open(inner).await?;
    let welcome = sfs.welcome;
    sfs.close().await;
    Ok(SecondFactorStatus {
        pin_registered: welcome.pin_registered,
        biometric_registered: welcome.biometric_registered,
        state: welcome.state,
    })
}

/// SHA-256 of the account's signing public key (SEC1 uncompressed): what attestations bind.
pub(crate) fn account_thumbprint(inner: &Inner, account_id: &str) -> Result<[u8; 32], SdkError> {
    let key = inner
        .read(|s| s.accounts.get(account_id).map(|a| a.signing_key.clone()))?
        .ok_or(SdkError::UnknownAccount)?;
    let public = key
        .to_key()?
        .public_key()
        .map_err(|e| SdkError::Transport(e.to_string()))?;
    Ok(fingerprint(&public))
}

async fn challenge(
    connection: &Connection,
    purpose: ChallengePurpose,
) -> Result<[u8; 32], SdkError> {
    match connection
        .request(RequestBody::Challenge { purpose })
        .await?
    {
        Answer::Challenge { challenge } => Ok(challenge.0),
        _ => Err(unexpected("challenge")),
    }
}

/// A login's second factor: `challenge {login}` → the SFS → `verify_second_factor`.
pub(crate) async fn verify_login(
    inner: &Inner,
    connection: &Connection,
    account_id: &str,
    hsid: Bytes<32>,
    factor: &SecondFactor,
) -> Result<(), SdkError> {
    let thumbprint = account_thumbprint(inner, account_id)?;
    let challenge = challenge(connection, ChallengePurpose::Login { hsid }).await?;
    let attestation = attest(inner, factor, challenge, thumbprint, false).await?;
    match connection
        .request(RequestBody::VerifySecondFactor {
            hsid,
            attestation: Blob(attestation),
        })
        .await?
    {
        Answer::Done => Ok(()),
        _ => Err(unexpected("verify_second_factor")),
    }
}

/// Gives a headless account its second factor: `challenge {upgrade}` → the SFS (registering
/// the PIN if the app instance has none yet) → `upgrade_account`; the account is then stored
/// as no longer headless.
pub(crate) async fn upgrade(
    inner: &Inner,
    connection: &Connection,
    account_id: &str,
    factor: &SecondFactor,
) -> Result<(), SdkError> {
    let thumbprint = account_thumbprint(inner, account_id)?;
    let challenge = challenge(connection, ChallengePurpose::Upgrade).await?;
    let attestation = attest(inner, factor, challenge, thumbprint, true).await?;
    match connection
        .request(RequestBody::UpgradeAccount {
            attestation: Blob(attestation),
        })
        .await?
    {
        Answer::Done => {}
        _ => return Err(unexpected("upgrade_account")),
    }
    inner.write(|s| {
        if let Some(account) = s.accounts.get_mut(account_id) {
            account.second_factor = true;
        }
    })?;
    tracing::info!(account_id, "account upgraded with a second factor");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_a_pin_prints_nothing() {
        let pin = Pin::from("604218");
        assert_eq!(format!("{pin:?}"), "Pin(..)");
        let factor = SecondFactor::Pin(pin);
        assert!(!format!("{factor:?}").contains("604218"));
    }

    #[test]
    fn default_argon2_parameters_are_those_of_the_spec() {
        assert_eq!(
            Argon2Params::default(),
            Argon2Params {
                m_kib: 19_456,
                t: 2,
                p: 1
            }
        );
    }

    #[tokio::test]
    async fn the_simulated_prompt_answers_its_flag() {
        let prompt = SimulatedBiometric::new(false);
        assert!(!prompt.release().await);
        prompt.set(true);
        assert!(prompt.release().await);
    }
}
