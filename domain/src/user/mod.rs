//! The user aggregate: a caller-chosen userid at one server, plus attributes.
//!
//! Lifecycle: `NotRegistered --RegisterUser--> Active --DeleteUser--> Deleted` (terminal: a
//! deleted user's data key is destroyed, and re-registering the same userid would need a
//! fresh key for the same stream, which the key vault does not version yet).
//!
//! Rules enforced by [`User::decide`]:
//! - the userid is NFC, 1..=256 bytes, without control, format or unassigned characters
//!   ([`Userid`]);
//! - the stream is named by a keyed digest the edge computed ([`UserRef::new`] under the
//!   server's [`UserDigestKey`](crate::ids::UserDigestKey)); commands carry that [`UserRef`],
//!   since `decide` is not given the key;
//! - attribute names are 1..=64 characters of `[a-z0-9_.-]`; values at most 4096 bytes of
//!   UTF-8; at most [`MAX_ATTRIBUTES`] attributes;
//! - the userid and values are sealed through [`Context::sealer`] with associated data
//!   `stream ‖ 0 ‖ field`, so `decide` never needs (or gets) the key to open them. As a
//!   consequence the state cannot tell whether a value is unchanged, and setting an attribute to
//!   its current value is recorded again (harmless, and it leaks nothing about the value);
//! - removing an absent attribute emits nothing (idempotent, like an HTTP `DELETE` repeated);
//! - [`PutUser`] replaces the whole user in one decision: `user.registered` if the user does
//!   not exist yet, then `user.attribute_set` for every given attribute, then
//!   `user.attribute_removed` for every attribute not given. It validates every attribute
//!   before emitting anything, so a bad one leaves the user as it was; its `user` must be the
//!   stream it is decided on;
//! - a deleted user refuses every command with [`UserError::Deleted`].
//!
//! Whether the server exists is not this aggregate's knowledge: `commands` checks it first.

mod events;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

pub use events::*;

use crate::aggregate::{Aggregate, Classify, Context, ErrorKind};
use crate::ids::{UserRef, Userid};
use crate::seal::{SealError, Sealed, aad};
use crate::server::into_command;
use crate::validate::ValidationError;

/// Most attributes one user may have.
pub const MAX_ATTRIBUTES: usize = 64;
/// Longest attribute name, in characters.
pub const ATTRIBUTE_NAME_MAX_CHARS: usize = 64;
/// Longest attribute value, in UTF-8 bytes.
pub const ATTRIBUTE_VALUE_MAX_BYTES: usize = 4096;

/// Register a userid at a server. The stream is `user.stream()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterUser {
    /// The tenant and the userid's digest, `UserRef::new(server, &key, &userid)`, computed by
    /// the edge with the server's user digest key.
    pub user: UserRef,
    /// The caller's userid (its `Debug` hides it).
    pub userid: Userid,
}

/// Set an attribute to a value.
#[derive(Clone, PartialEq, Eq)]
pub struct SetAttribute {
    /// The attribute name.
    pub name: String,
    /// The value; personal data, hidden from `Debug`.
    pub value: String,
}

impl std::fmt::Debug for SetAttribute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetAttribute")
            .field("name", &self.name)
            .field("value", &"..")
            .finish()
    }
}

/// Remove an attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoveAttribute {
    /// The attribute name.
    pub name: String,
}

/// Create the user if needed and make its attributes exactly `attributes` (an HTTP PUT of the
/// whole user). The stream is `user.stream()`.
#[derive(Clone, PartialEq, Eq)]
pub struct PutUser {
    /// The tenant and the userid's digest, computed by the edge as for [`RegisterUser`].
    pub user: UserRef,
    /// The caller's userid (its `Debug` hides it).
    pub userid: Userid,
    /// Every attribute the user is to have, by name; values are personal data, hidden from
    /// `Debug`.
    pub attributes: BTreeMap<String, String>,
}

impl std::fmt::Debug for PutUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PutUser")
            .field("user", &self.user)
            .field("userid", &self.userid)
            .field("attributes", &self.attributes.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Delete the user (the edge then destroys the data key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteUser;

/// Commands of the user aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserCommand {
    /// See [`RegisterUser`].
    Register(RegisterUser),
    /// See [`PutUser`].
    Put(PutUser),
    /// See [`SetAttribute`].
    SetAttribute(SetAttribute),
    /// See [`RemoveAttribute`].
    RemoveAttribute(RemoveAttribute),
    /// See [`DeleteUser`].
    Delete(DeleteUser),
}

into_command!(UserCommand {
    Register(RegisterUser),
    Put(PutUser),
    SetAttribute(SetAttribute),
    RemoveAttribute(RemoveAttribute),
    Delete(DeleteUser),
});

/// Why a user command was refused. Messages never contain the userid or a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    /// The input breaks a rule. HTTP 422.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The userid is already registered at this server. HTTP 409.
    #[error("user already exists")]
    AlreadyExists,
    /// No such user. HTTP 404.
    #[error("user not found")]
    NotFound,
    /// The user was deleted. HTTP 410.
    #[error("user was deleted")]
    Deleted,
    /// The command's user names another user than the stream it was decided on: a wiring
    /// bug at the caller. HTTP 422.
    #[error("the userid does not name this user")]
    UserMismatch,
    /// The user would have more than [`MAX_ATTRIBUTES`] attributes: a rule of the input, as
    /// a too long value is. HTTP 422.
    #[error("at most {max} attributes per user")]
    TooManyAttributes {
        /// The limit.
        max: usize,
    },
    /// The caller gave no sealer: a wiring bug. HTTP 500.
    #[error("internal error: no sealer for personal data")]
    SealerMissing,
    /// Sealing failed. HTTP 500.
    #[error("internal error: {0}")]
    Seal(#[from] SealError),
}

impl Classify for UserError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Invalid(_) | Self::UserMismatch | Self::TooManyAttributes { .. } => {
                ErrorKind::Invalid
            }
            Self::AlreadyExists => ErrorKind::Conflict,
            Self::NotFound => ErrorKind::NotFound,
            Self::Deleted => ErrorKind::Gone,
            Self::SealerMissing | Self::Seal(_) => ErrorKind::Internal,
        }
    }
}

/// A registered user's write model: names only, never values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveUser {
    /// The stream identity.
    pub user: UserRef,
    /// Names of the attributes that are set.
    pub attributes: BTreeSet<String>,
}

/// The user aggregate's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum User {
    /// Nothing in the stream yet.
    #[default]
    NotRegistered,
    /// Registered and not deleted.
    Active(ActiveUser),
    /// Deleted: terminal.
    Deleted {
        /// The stream identity.
        user: UserRef,
    },
}

impl User {
    fn active(&self) -> Result<&ActiveUser, UserError> {
        match self {
            Self::NotRegistered => Err(UserError::NotFound),
            Self::Active(active) => Ok(active),
            Self::Deleted { .. } => Err(UserError::Deleted),
        }
    }
}

/// The associated-data field name of an attribute value.
#[must_use]
pub fn attribute_field(name: &str) -> String {
    format!("attribute/{name}")
}

fn validate_attribute_name(name: &str) -> Result<(), ValidationError> {
    const FIELD: &str = "attribute name";
    if name.is_empty() {
        return Err(ValidationError::Empty { field: FIELD });
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(ValidationError::Charset {
            field: FIELD,
            allowed: "a-z 0-9 _ . -",
        });
    }
    // All-ASCII by now, so bytes are characters.
    if name.len() > ATTRIBUTE_NAME_MAX_CHARS {
        return Err(ValidationError::TooLong {
            field: FIELD,
            max: ATTRIBUTE_NAME_MAX_CHARS,
            actual: name.len(),
            unit: "characters",
        });
    }
    Ok(())
}

fn validate_attribute_value(value: &str) -> Result<(), ValidationError> {
    if value.len() > ATTRIBUTE_VALUE_MAX_BYTES {
        return Err(ValidationError::TooLong {
            field: "attribute value",
            max: ATTRIBUTE_VALUE_MAX_BYTES,
            actual: value.len(),
            unit: "bytes",
        });
    }
    Ok(())
}

fn seal(
    ctx: &mut Context<'_>,
    user: &UserRef,
    field: &str,
    plaintext: &[u8],
) -> Result<Sealed, UserError> {
    let sealer = ctx.sealer.as_deref_mut().ok_or(UserError::SealerMissing)?;
    Ok(sealer.seal(&aad(&user.stream(), field), plaintext)?)
}

impl User {
    fn decide_put(&self, cmd: PutUser, ctx: &mut Context<'_>) -> Result<Vec<UserEvent>, UserError> {
        let user = cmd.user;
        let existing = match self {
            Self::NotRegistered => None,
            Self::Active(active) if active.user == user => Some(&active.attributes),
            Self::Active(_) => return Err(UserError::UserMismatch),
            Self::Deleted { .. } => return Err(UserError::Deleted),
        };
        for (name, value) in &cmd.attributes {
            validate_attribute_name(name)?;
            validate_attribute_value(value)?;
        }
        // After the PUT the user has exactly the given attributes, so only their number counts.
        if cmd.attributes.len() > MAX_ATTRIBUTES {
            return Err(UserError::TooManyAttributes {
                max: MAX_ATTRIBUTES,
            });
        }
        let mut events = Vec::with_capacity(cmd.attributes.len() + 1);
        if existing.is_none() {
            let userid = seal(ctx, &user, "userid", cmd.userid.as_str().as_bytes())?;
            events.push(UserEvent::Registered(UserRegistered { user, userid }));
        }
        let removed: Vec<UserEvent> = existing
            .into_iter()
            .flatten()
            .filter(|name| !cmd.attributes.contains_key(*name))
            .map(|name| UserEvent::AttributeRemoved(UserAttributeRemoved { name: name.clone() }))
            .collect();
        for (name, value) in cmd.attributes {
            let value = seal(ctx, &user, &attribute_field(&name), value.as_bytes())?;
            events.push(UserEvent::AttributeSet(UserAttributeSet { name, value }));
        }
        events.extend(removed);
        Ok(events)
    }
}

impl Aggregate for User {
    type Command = UserCommand;
    type Event = UserEvent;
    type Error = UserError;

    fn decide(
        &self,
        command: UserCommand,
        ctx: &mut Context<'_>,
    ) -> Result<Vec<UserEvent>, UserError> {
        match command {
            UserCommand::Register(cmd) => {
                match self {
                    Self::NotRegistered => {}
                    Self::Active(_) => return Err(UserError::AlreadyExists),
                    Self::Deleted { .. } => return Err(UserError::Deleted),
                }
                let user = cmd.user;
                let userid = seal(ctx, &user, "userid", cmd.userid.as_str().as_bytes())?;
                Ok(vec![UserEvent::Registered(UserRegistered { user, userid })])
            }
            UserCommand::Put(cmd) => self.decide_put(cmd, ctx),
            UserCommand::SetAttribute(cmd) => {
                let active = self.active()?;
                validate_attribute_name(&cmd.name)?;
                validate_attribute_value(&cmd.value)?;
                if !active.attributes.contains(&cmd.name)
                    && active.attributes.len() >= MAX_ATTRIBUTES
                {
                    return Err(UserError::TooManyAttributes {
                        max: MAX_ATTRIBUTES,
                    });
                }
                let value = seal(
                    ctx,
                    &active.user,
                    &attribute_field(&cmd.name),
                    cmd.value.as_bytes(),
                )?;
                Ok(vec![UserEvent::AttributeSet(UserAttributeSet {
                    name: cmd.name,
                    value,
                })])
            }
            UserCommand::RemoveAttribute(cmd) => {
                let active = self.active()?;
                validate_attribute_name(&cmd.name)?;
                if !active.attributes.contains(&cmd.name) {
                    return Ok(Vec::new());
                }
                Ok(vec![UserEvent::AttributeRemoved(UserAttributeRemoved {
                    name: cmd.name,
                })])
            }
            UserCommand::Delete(DeleteUser) => {
                self.active()?;
                Ok(vec![UserEvent::Deleted(UserDeleted {
                    deleted_at: ctx.now,
                })])
            }
        }
    }

    fn apply(&mut self, event: &UserEvent) {
        match (event, &mut *self) {
            (UserEvent::Registered(e), _) => {
                *self = Self::Active(ActiveUser {
                    user: e.user,
                    attributes: BTreeSet::new(),
                });
            }
            (UserEvent::AttributeSet(e), Self::Active(u)) => {
                u.attributes.insert(e.name.clone());
            }
            (UserEvent::AttributeRemoved(e), Self::Active(u)) => {
                u.attributes.remove(&e.name);
            }
            (UserEvent::Deleted(_), Self::Active(u)) => *self = Self::Deleted { user: u.user },
            // An event that cannot follow the current state changes nothing (see `server`).
            _ => {}
        }
    }
}
