//! The account aggregate: one app instance's registration for one user at one server, with its
//! channel and signing key pairs (the private keys stay on the device).
//!
//! Lifecycle: `NotRegistered --RegisterAccount--> Active --DeleteAccount--> Deleted`
//! (terminal). While active: `LinkUser` gives a headless account its user, `UpgradeAccount`
//! adds a second factor, `RotateKey` replaces a key. A deleted account remembers the channel
//! key it last had, so that the device gateway tells that key, and no other, that it is gone.
//!
//! Rules enforced by [`Account::decide`]:
//! - public keys are valid P-256 SEC1 points, compressed or uncompressed; events store the
//!   uncompressed form, and the signing key's SHA-256 thumbprint, which attestations name;
//! - registering an existing account is [`AccountError::AlreadyExists`] (ids are random, so this
//!   is a replay or a collision, never a retry worth answering);
//! - an account has at most one user: linking the same user again emits nothing, another one
//!   is [`AccountError::UserAlreadyLinked`];
//! - an account has at most one second factor: upgrading with the factor it has emits nothing,
//!   with another one is [`AccountError::AlreadyUpgraded`];
//! - rotating a key to the key it already has emits nothing;
//! - a push registration needs an uncompressed P-256 push key; registering what is
//!   registered already emits nothing, anything else replaces it;
//! - device data: each field at most [`DEVICE_DATA_MAX_CHARS`] characters, no control
//!   characters; the same data again emits nothing;
//! - deleting a deleted account emits nothing (a repeated DELETE); every other command on it is
//!   [`AccountError::Deleted`]; any command but register on an unknown account is
//!   [`AccountError::NotFound`].

mod events;
#[cfg(test)]
mod tests;

pub use events::*;

use crate::aggregate::{Aggregate, Classify, Context, ErrorKind};
use crate::ids::{AccountRef, AppInstanceId, Timestamp, UserDigest};
use crate::second_factor::SecondFactorKind;
use crate::server::into_command;
use crate::validate::{self, ValidationError};

/// Longest device data field (model, OS, app version), in characters.
pub const DEVICE_DATA_MAX_CHARS: usize = 100;

/// Record what the app says about its device (device gateway, secure channel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetDeviceData {
    /// The data.
    pub device_data: DeviceData,
}

/// Register an account (the device gateway, when an app enrols or opens a secure channel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterAccount {
    /// Tenant and account id.
    pub account: AccountRef,
    /// The app installation holding the keys.
    pub app_instance: AppInstanceId,
    /// The user, if known yet.
    pub user: Option<UserDigest>,
    /// SEC1 P-256 channel key, compressed or uncompressed.
    pub channel_public_key: Vec<u8>,
    /// SEC1 P-256 signing key, compressed or uncompressed.
    pub signing_public_key: Vec<u8>,
    /// `None` for a headless account.
    pub second_factor: Option<SecondFactorKind>,
}

/// Give a headless account its user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkUser {
    /// The user.
    pub user: UserDigest,
}

/// Add a second factor to a headless account (the gateway checked the SFS attestation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpgradeAccount {
    /// The factor.
    pub second_factor: SecondFactorKind,
    /// SHA-256 of the attestation that proved it.
    pub attestation_hash: [u8; 32],
}

/// Replace one of the account's public keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotateKey {
    /// Which key.
    pub role: KeyRole,
    /// The new SEC1 P-256 key, compressed or uncompressed.
    pub public_key: Vec<u8>,
}

/// Record that the account proved a second factor for a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordVerification {
    /// Which factor.
    pub factor: SecondFactorKind,
    /// SHA-256 of the attestation.
    pub attestation_hash: [u8; 32],
    /// When the SFS verified it.
    pub verified_at: Timestamp,
}

/// Send the account's push messages through a Message Center mailbox (device gateway; the
/// edge sealed the MC token in the vault under `token_ref`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterPush {
    /// SHA-256 of the MC's channel key.
    pub mc_key_id: [u8; 32],
    /// SEC1 uncompressed P-256 push key.
    pub push_public_key: Vec<u8>,
    /// The vault reference of the sealed MC token.
    pub token_ref: String,
}

/// An account's push registration, as the write model keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushRegistration {
    /// SHA-256 of the MC's channel key.
    pub mc_key_id: [u8; 32],
    /// SEC1 uncompressed P-256 push key.
    pub push_public_key: Vec<u8>,
    /// The vault reference of the sealed MC token.
    pub token_ref: String,
}

/// Delete the account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeleteAccount {
    /// Who.
    pub by: DeletedBy,
}

/// Commands of the account aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountCommand {
    /// See [`RegisterAccount`].
    Register(RegisterAccount),
    /// See [`LinkUser`].
    LinkUser(LinkUser),
    /// See [`UpgradeAccount`].
    Upgrade(UpgradeAccount),
    /// See [`RotateKey`].
    RotateKey(RotateKey),
    /// See [`DeleteAccount`].
    Delete(DeleteAccount),
    /// See [`RecordVerification`].
    RecordVerification(RecordVerification),
    /// See [`RegisterPush`].
    RegisterPush(RegisterPush),
    /// See [`SetDeviceData`].
    SetDeviceData(SetDeviceData),
}

into_command!(AccountCommand {
    Register(RegisterAccount),
    LinkUser(LinkUser),
    Upgrade(UpgradeAccount),
    RotateKey(RotateKey),
    Delete(DeleteAccount),
    RecordVerification(RecordVerification),
    RegisterPush(RegisterPush),
    SetDeviceData(SetDeviceData),
});

/// Why an account command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// The input breaks a rule. HTTP 422.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// An account with this id exists. HTTP 409.
    #[error("account already exists")]
    AlreadyExists,
    /// No account with this id. HTTP 404.
    #[error("account not found")]
    NotFound,
    /// The account was deleted. HTTP 410.
    #[error("account was deleted")]
    Deleted,
    /// The account belongs to another user. HTTP 409.
    #[error("account is linked to another user")]
    UserAlreadyLinked,
    /// The account has another second factor. HTTP 409.
    #[error("account already has a second factor")]
    AlreadyUpgraded,
}

impl Classify for AccountError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Invalid(_) => ErrorKind::Invalid,
            Self::AlreadyExists | Self::UserAlreadyLinked | Self::AlreadyUpgraded => {
                ErrorKind::Conflict
            }
            Self::NotFound => ErrorKind::NotFound,
            Self::Deleted => ErrorKind::Gone,
        }
    }
}

/// A live account's write model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveAccount {
    /// Tenant and account id.
    pub account: AccountRef,
    /// The app installation holding the keys.
    pub app_instance: AppInstanceId,
    /// The user, once known.
    pub user: Option<UserDigest>,
    /// SEC1 uncompressed channel key.
    pub channel_public_key: Vec<u8>,
    /// SEC1 uncompressed signing key.
    pub signing_public_key: Vec<u8>,
    /// SHA-256 of `signing_public_key`.
    pub signing_key_thumbprint: [u8; 32],
    /// `None` while headless.
    pub second_factor: Option<SecondFactorKind>,
    /// The last second factor proven for a login: (factor, attestation hash, when the SFS
    /// verified it).
    pub last_verification: Option<(SecondFactorKind, [u8; 32], Timestamp)>,
    /// Where its push messages go, once the app registered for push.
    pub push: Option<PushRegistration>,
    /// What the app last said about its device.
    pub device_data: Option<DeviceData>,
}

impl ActiveAccount {
    /// Whether a second factor was proven at most `window_secs` before `now` (never, for a
    /// window of 0).
    #[must_use]
    pub fn verified_within(&self, window_secs: u32, now: Timestamp) -> bool {
        window_secs > 0
            && self.last_verification.is_some_and(|(_, _, at)| {
                at.as_millis() <= now.as_millis()
                    && now.as_millis() - at.as_millis() <= i64::from(window_secs) * 1000
            })
    }
}

/// The account aggregate's state.
// Loaded once per command and dropped: the live variant's size costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Account {
    /// Nothing in the stream yet.
    #[default]
    NotRegistered,
    /// Registered and not deleted.
    Active(ActiveAccount),
    /// Deleted: terminal.
    Deleted {
        /// Tenant and account id.
        account: AccountRef,
        /// The user it belonged to, if it had one.
        user: Option<UserDigest>,
        /// The channel key it had when it was deleted (SEC1 uncompressed): only that key is
        /// told the account was deleted; any other key claiming the id learns nothing.
        channel_public_key: Vec<u8>,
    },
}

impl Account {
    /// The account's user, if it has one (a deleted account keeps naming it).
    #[must_use]
    pub fn user(&self) -> Option<UserDigest> {
        match self {
            Self::NotRegistered => None,
            Self::Active(a) => a.user,
            Self::Deleted { user, .. } => *user,
        }
    }

    /// Whether the account was deleted.
    #[must_use]
    pub fn is_deleted(&self) -> bool {
        matches!(self, Self::Deleted { .. })
    }

    /// The live account, if it is one.
    #[must_use]
    pub fn active(&self) -> Option<&ActiveAccount> {
        match self {
            Self::Active(a) => Some(a),
            Self::NotRegistered | Self::Deleted { .. } => None,
        }
    }

    fn live(&self) -> Result<&ActiveAccount, AccountError> {
        match self {
            Self::NotRegistered => Err(AccountError::NotFound),
            Self::Active(a) => Ok(a),
            Self::Deleted { .. } => Err(AccountError::Deleted),
        }
    }
}

fn public_key(field: &'static str, sec1: &[u8]) -> Result<(Vec<u8>, [u8; 32]), ValidationError> {
    validate::p256_public_key(sec1).ok_or(ValidationError::InvalidKey { field })
}

fn decide_register(cmd: RegisterAccount) -> Result<Vec<AccountEvent>, AccountError> {
    let (channel_public_key, _) = public_key("channel_public_key", &cmd.channel_public_key)?;
    let (signing_public_key, signing_key_thumbprint) =
        public_key("signing_public_key", &cmd.signing_public_key)?;
    Ok(vec![AccountEvent::Registered(AccountRegistered {
        account: cmd.account,
        app_instance: cmd.app_instance,
        user: cmd.user,
        channel_public_key,
        signing_public_key,
        signing_key_thumbprint,
        second_factor: cmd.second_factor,
    })])
}

fn decide_rotate(
    account: &ActiveAccount,
    cmd: RotateKey,
) -> Result<Vec<AccountEvent>, AccountError> {
    let (public_key, key_thumbprint) = public_key("public_key", &cmd.public_key)?;
    let current = match cmd.role {
        KeyRole::Channel => &account.channel_public_key,
        KeyRole::Signing => &account.signing_public_key,
    };
    if *current == public_key {
        return Ok(Vec::new());
    }
    Ok(vec![AccountEvent::KeyRotated(AccountKeyRotated {
        role: cmd.role,
        public_key,
        key_thumbprint,
    })])
}

impl Aggregate for Account {
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = AccountError;

    fn decide(
        &self,
        command: AccountCommand,
        ctx: &mut Context<'_>,
    ) -> Result<Vec<AccountEvent>, AccountError> {
        match command {
            AccountCommand::Register(cmd) => match self {
                Self::NotRegistered => decide_register(cmd),
                Self::Active(_) => Err(AccountError::AlreadyExists),
                Self::Deleted { .. } => Err(AccountError::Deleted),
            },
            AccountCommand::LinkUser(cmd) => match self.live()?.user {
                None => Ok(vec![AccountEvent::UserLinked(AccountUserLinked {
                    user: cmd.user,
                })]),
                Some(user) if user == cmd.user => Ok(Vec::new()),
                Some(_) => Err(AccountError::UserAlreadyLinked),
            },
            AccountCommand::Upgrade(cmd) => match self.live()?.second_factor {
                None => Ok(vec![AccountEvent::Upgraded(AccountUpgraded {
                    second_factor: cmd.second_factor,
                    attestation_hash: cmd.attestation_hash,
                })]),
                Some(factor) if factor == cmd.second_factor => Ok(Vec::new()),
                Some(_) => Err(AccountError::AlreadyUpgraded),
            },
            AccountCommand::RotateKey(cmd) => decide_rotate(self.live()?, cmd),
            AccountCommand::RecordVerification(cmd) => {
                self.live()?;
                Ok(vec![AccountEvent::SecondFactorVerified(
                    AccountSecondFactorVerified {
                        factor: cmd.factor,
                        attestation_hash: cmd.attestation_hash,
                        verified_at: cmd.verified_at,
                    },
                )])
            }
            AccountCommand::RegisterPush(cmd) => {
                let account = self.live()?;
                let uncompressed = cmd.push_public_key.len() == 65
                    && validate::p256_public_key(&cmd.push_public_key)
                        .is_some_and(|(key, _)| key == cmd.push_public_key);
                if !uncompressed {
                    return Err(ValidationError::InvalidKey {
                        field: "push_public_key",
                    }
                    .into());
                }
                let same = account.push.as_ref().is_some_and(|p| {
                    p.mc_key_id == cmd.mc_key_id
                        && p.push_public_key == cmd.push_public_key
                        && p.token_ref == cmd.token_ref
                });
                if same {
                    return Ok(Vec::new());
                }
                Ok(vec![AccountEvent::PushRegistered(AccountPushRegistered {
                    mc_key_id: cmd.mc_key_id,
                    push_public_key: cmd.push_public_key,
                    token_ref: cmd.token_ref,
                    registered_at: ctx.now,
                })])
            }
            AccountCommand::SetDeviceData(cmd) => {
                let account = self.live()?;
                let data = &cmd.device_data;
                for (field, text) in [
                    ("device_data.model", &data.model),
                    ("device_data.os", &data.os),
                    ("device_data.app_version", &data.app_version),
                ] {
                    validate::single_line_text(field, text, DEVICE_DATA_MAX_CHARS)?;
                }
                if account.device_data.as_ref() == Some(data) {
                    return Ok(Vec::new());
                }
                Ok(vec![AccountEvent::DeviceDataChanged(
                    AccountDeviceDataChanged {
                        device_data: cmd.device_data,
                        changed_at: ctx.now,
                    },
                )])
            }
            AccountCommand::Delete(cmd) => match self {
                Self::NotRegistered => Err(AccountError::NotFound),
                Self::Active(_) => Ok(vec![AccountEvent::Deleted(AccountDeleted {
                    by: cmd.by,
                    deleted_at: ctx.now,
                })]),
                Self::Deleted { .. } => Ok(Vec::new()),
            },
        }
    }

    fn apply(&mut self, event: &AccountEvent) {
        match (event, &mut *self) {
            (AccountEvent::Registered(e), Self::NotRegistered) => {
                *self = Self::Active(ActiveAccount {
                    account: e.account,
                    app_instance: e.app_instance,
                    user: e.user,
                    channel_public_key: e.channel_public_key.clone(),
                    signing_public_key: e.signing_public_key.clone(),
                    signing_key_thumbprint: e.signing_key_thumbprint,
                    second_factor: e.second_factor,
                    last_verification: None,
                    push: None,
                    device_data: None,
                });
            }
            (AccountEvent::SecondFactorVerified(e), Self::Active(a)) => {
                a.last_verification = Some((e.factor, e.attestation_hash, e.verified_at));
            }
            (AccountEvent::UserLinked(e), Self::Active(a)) => a.user = Some(e.user),
            (AccountEvent::Upgraded(e), Self::Active(a)) => {
                a.second_factor = Some(e.second_factor);
            }
            (AccountEvent::KeyRotated(e), Self::Active(a)) => match e.role {
                KeyRole::Channel => a.channel_public_key = e.public_key.clone(),
                KeyRole::Signing => {
                    a.signing_public_key = e.public_key.clone();
                    a.signing_key_thumbprint = e.key_thumbprint;
                }
            },
            (AccountEvent::PushRegistered(e), Self::Active(a)) => {
                a.push = Some(PushRegistration {
                    mc_key_id: e.mc_key_id,
                    push_public_key: e.push_public_key.clone(),
                    token_ref: e.token_ref.clone(),
                });
            }
            (AccountEvent::DeviceDataChanged(e), Self::Active(a)) => {
                a.device_data = Some(e.device_data.clone());
            }
            (AccountEvent::Deleted(_), Self::Active(a)) => {
                *self = Self::Deleted {
                    account: a.account,
                    user: a.user,
                    channel_public_key: std::mem::take(&mut a.channel_public_key),
                };
            }
            // An event that cannot follow the current state changes nothing (see `server`).
            _ => {}
        }
    }
}
