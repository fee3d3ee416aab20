//! Events of the user aggregate (stream `user-{server id}-{digest}`).
//!
//! The userid and attribute values are personal data and appear only [`Sealed`] under the
//! user's data key; attribute names are schema, not personal data, and stay readable.

use serde::{Deserialize, Serialize};

use crate::ids::UserRef;
use crate::seal::Sealed;

/// `user.registered` v1: a userid exists at a server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRegistered {
    /// Tenant and digest, i.e. the stream's identity.
    pub user: UserRef,
    /// The userid, sealed with associated data `aad(stream, "userid")`.
    pub userid: Sealed,
}

/// `user.attribute_set` v1: an attribute was set (created or overwritten).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserAttributeSet {
    /// The attribute name (`[a-z0-9_.-]{1,64}`).
    pub name: String,
    /// The value, sealed with associated data `aad(stream, "attribute/{name}")`.
    pub value: Sealed,
}

/// `user.attribute_removed` v1: an attribute no longer exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserAttributeRemoved {
    /// The attribute name.
    pub name: String,
}

/// `user.deleted` v1: the user is gone. The edge destroys the data key right after this event
/// is committed, which makes every sealed value in the stream unreadable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserDeleted {
    /// When.
    pub deleted_at: crate::ids::Timestamp,
}

crate::domain_events! {
    /// Everything that happens to a user.
    pub enum UserEvent {
        Registered(UserRegistered) = ("user.registered", 1),
        AttributeSet(UserAttributeSet) = ("user.attribute_set", 1),
        AttributeRemoved(UserAttributeRemoved) = ("user.attribute_removed", 1),
        Deleted(UserDeleted) = ("user.deleted", 1),
    }
}
