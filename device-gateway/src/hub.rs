//! Who is connected, and what they wait to hear about.
//!
//! Each connection registers here with the account it authenticated as (if any) and the
//! sessions it took part in. [`Hub::follow`] tails the event log and turns the events a device
//! must hear of into notices: a session ended (by the business system's DELETE, a missed
//! ping, an expiry), an account deleted by the server, a transaction the business system
//! created for the account's user (to the named account only, when it named one). Tailing the log, rather than being
//! called by the API, means a DELETE handled by any process reaches the device, and nothing
//! is told before it is committed.
//!
//! The lock is a plain mutex held only to copy senders out, never across an await. A
//! connection whose queue is full misses a notice rather than slowing the others down; the
//! device then learns the state from its next request's answer.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use countersign_domain::DomainEvent as _;
use countersign_domain::transaction::{TransactionCreated, TransactionEvent, TransactionOrigin};
use countersign_domain::{AccountId, Hsid, ServerId, UserDigest};
use countersign_eventstore::{RecordedEvent, SharedStore, StoreError};
use countersign_protocol::device::{Bytes, Notice, PendingTransaction, SessionEnd};
use tokio::sync::mpsc;

/// Notices a connection may have queued before new ones are dropped.
const QUEUE: usize = 64;
/// Events read from the log per round.
const BATCH: usize = 1_000;

/// A connection's id within this process.
pub type ConnectionId = u64;

#[derive(Default)]
struct Registry {
    next: ConnectionId,
    senders: HashMap<ConnectionId, mpsc::Sender<Notice>>,
    sessions: HashMap<(ServerId, Hsid), HashSet<ConnectionId>>,
    accounts: HashMap<(ServerId, AccountId), HashSet<ConnectionId>>,
    watched: HashMap<ConnectionId, Vec<(ServerId, Hsid)>>,
    account_of: HashMap<ConnectionId, (ServerId, AccountId)>,
    users: HashMap<(ServerId, UserDigest), HashSet<ConnectionId>>,
    user_of: HashMap<ConnectionId, (ServerId, UserDigest)>,
}

/// The registry of connections of this process. Cheap to clone.
#[derive(Clone, Default)]
pub struct Hub(Arc<Mutex<Registry>>);

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hub(..)")
    }
}

impl Hub {
    fn with<T>(&self, f: impl FnOnce(&mut Registry) -> T) -> Option<T> {
        self.0.lock().ok().map(|mut registry| f(&mut registry))
    }

    /// Registers a connection; answers its id and where its notices arrive.
    pub fn register(
        &self,
        account: Option<(ServerId, AccountId)>,
    ) -> (ConnectionId, mpsc::Receiver<Notice>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let id = self
            .with(|r| {
                r.next += 1;
                let id = r.next;
                r.senders.insert(id, tx);
                if let Some(key) = account {
                    r.accounts.entry(key).or_default().insert(id);
                    r.account_of.insert(id, key);
                }
                id
            })
            .unwrap_or_default();
        (id, rx)
    }

    /// The connection takes part in a session: tell it when the session ends. Answers whether
    /// it was not watching the session yet.
    ///
    /// Call it before the step that loads the session and appends to it, never after: an end
    /// committed after the step's load is then told to the connection, and one committed before
    /// it is in what the step loaded. Registered after the append, an end committed (and told)
    /// in between reached nobody on this connection.
    pub fn watch_session(&self, connection: ConnectionId, server: ServerId, hsid: Hsid) -> bool {
        self.with(|r| {
            let added = r
                .sessions
                .entry((server, hsid))
                .or_default()
                .insert(connection);
            if added {
                r.watched
                    .entry(connection)
                    .or_default()
                    .push((server, hsid));
            }
            added
        })
        .unwrap_or_default()
    }

    /// The connection no longer takes part in the session (the step it watched it for failed).
    pub fn unwatch_session(&self, connection: ConnectionId, server: ServerId, hsid: Hsid) {
        self.with(|r| {
            let key = (server, hsid);
            if let Some(set) = r.sessions.get_mut(&key) {
                set.remove(&connection);
                if set.is_empty() {
                    r.sessions.remove(&key);
                }
            }
            if let Some(list) = r.watched.get_mut(&connection) {
                list.retain(|watched| *watched != key);
                if list.is_empty() {
                    r.watched.remove(&connection);
                }
            }
        });
    }

    /// The connection's account belongs to `user`: tell it of the user's new transactions.
    pub fn watch_user(&self, connection: ConnectionId, server: ServerId, user: UserDigest) {
        self.with(|r| {
            r.users
                .entry((server, user))
                .or_default()
                .insert(connection);
            r.user_of.insert(connection, (server, user));
        });
    }

    /// The connection closed.
    pub fn unregister(&self, connection: ConnectionId) {
        self.with(|r| {
            r.senders.remove(&connection);
            for key in r.watched.remove(&connection).unwrap_or_default() {
                if let Some(set) = r.sessions.get_mut(&key) {
                    set.remove(&connection);
                    if set.is_empty() {
                        r.sessions.remove(&key);
                    }
                }
            }
            if let Some(key) = r.account_of.remove(&connection)
                && let Some(set) = r.accounts.get_mut(&key)
            {
                set.remove(&connection);
                if set.is_empty() {
                    r.accounts.remove(&key);
                }
            }
            if let Some(key) = r.user_of.remove(&connection)
                && let Some(set) = r.users.get_mut(&key)
            {
                set.remove(&connection);
                if set.is_empty() {
                    r.users.remove(&key);
                }
            }
        });
    }

    /// How many connections are open.
    pub fn connections(&self) -> usize {
        self.with(|r| r.senders.len()).unwrap_or_default()
    }

    fn send(&self, to: Vec<mpsc::Sender<Notice>>, notice: &Notice) {
        for sender in to {
            if sender.try_send(notice.clone()).is_err() {
                tracing::debug!("a device connection missed a notice (queue full or closed)");
            }
        }
    }

    /// Tells everyone watching the session that it ended.
    pub fn session_ended(&self, server: ServerId, hsid: Hsid, how: SessionEnd) {
        let to = self
            .with(|r| {
                r.sessions
                    .remove(&(server, hsid))
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|c| r.senders.get(c).cloned())
                    .collect()
            })
            .unwrap_or_default();
        let notice = Notice::SessionEnded {
            hsid: Bytes(*hsid.as_bytes()),
            how,
        };
        self.send(to, &notice);
    }

    /// Tells the account's connections that it was deleted.
    pub fn account_deleted(&self, server: ServerId, account: AccountId) {
        let to = self
            .with(|r| {
                r.accounts
                    .get(&(server, account))
                    .map(|set| {
                        set.iter()
                            .filter_map(|c| r.senders.get(c).cloned())
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        let notice = Notice::AccountDeleted {
            account_id: Bytes(*account.as_bytes()),
        };
        self.send(to, &notice);
    }

    /// Tells the connections of the user's accounts on the server (only the named account's,
    /// when the creator named one) that a transaction waits for them.
    pub fn transaction_pending(&self, created: &TransactionCreated) {
        let server = created.transaction.server_id;
        let to = self
            .with(|r| {
                r.users
                    .get(&(server, created.user))
                    .map(|set| {
                        set.iter()
                            .filter(|c| {
                                created.account_id.is_none_or(|named| {
                                    r.account_of.get(c) == Some(&(server, named))
                                })
                            })
                            .filter_map(|c| r.senders.get(c).cloned())
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        let notice = Notice::TransactionPending(PendingTransaction {
            transaction_id: Bytes(*created.transaction.transaction_id.as_bytes()),
            announce_info: created.announce_info.clone(),
            expires_at_ms: created.expires_at.as_millis(),
        });
        self.send(to, &notice);
    }

    /// Turns one committed event into notices, if it is one a device must hear of.
    pub fn dispatch(&self, event: &RecordedEvent) {
        let how = match event.event_type.as_str() {
            "session.logged_out" => Some(SessionEnd::LoggedOut),
            "session.aborted" => Some(SessionEnd::Aborted),
            "session.expired" => Some(SessionEnd::Expired),
            "session.failed" => Some(SessionEnd::Failed),
            _ => None,
        };
        if let Some(how) = how {
            if let Some((server, hsid)) = scoped(&event.stream, "session-")
                .and_then(|(s, h)| Some((ServerId::parse_hex(s).ok()?, Hsid::parse_hex(h).ok()?)))
            {
                self.session_ended(server, hsid, how);
            }
        } else if event.event_type == "account.deleted"
            && let Some((server, account)) = scoped(&event.stream, "account-").and_then(|(s, a)| {
                Some((ServerId::parse_hex(s).ok()?, AccountId::parse_hex(a).ok()?))
            })
        {
            self.account_deleted(server, account);
        } else if event.event_type == "transaction.created" {
            match TransactionEvent::decode(&event.event_type, event.schema_version, &event.payload)
            {
                // The app's own transactions are signed as they are stored: nothing waits.
                Ok(TransactionEvent::Created(created))
                    if created.origin == TransactionOrigin::Api =>
                {
                    self.transaction_pending(&created);
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "a transaction.created event did not decode"),
            }
        }
    }

    /// Tails the log from `next` (from its current end when `None`), dispatching every event
    /// and moving `next` past it, until the store fails.
    ///
    /// # Errors
    /// The store's error; the caller restarts the follower with the same `next`, so events
    /// committed meanwhile are read then, not lost.
    pub async fn follow(
        &self,
        store: SharedStore,
        next: &mut Option<u64>,
        mut woken: tokio::sync::watch::Receiver<u64>,
    ) -> Result<(), StoreError> {
        let mut head = store.head();
        head.borrow_and_update();
        let next = match next {
            Some(next) => next,
            None => next.insert(store.last_position().await?.map_or(0, |p| p + 1)),
        };
        loop {
            head.borrow_and_update();
            let events = store.read_all(*next, BATCH).await?;
            if events.is_empty() {
                // Woken by this process's commits, by the read models' progress (commits of
                // other instances, announced through Redis in scaled mode), and every
                // [`POLL`] for writers neither reaches.
                woken.borrow_and_update();
                tokio::select! {
                    changed = head.changed() => {
                        if changed.is_err() {
                            return Ok(());
                        }
                    }
                    Ok(()) = woken.changed() => {}
                    () = tokio::time::sleep(POLL) => {}
                }
                continue;
            }
            for event in &events {
                *next = event.position + 1;
                self.dispatch(event);
            }
        }
    }
}

/// How often the follower looks at the log when it heard of no commit.
pub const POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// `{prefix}{server hex}-{id hex}` → the two hex parts.
fn scoped<'a>(stream: &'a str, prefix: &str) -> Option<(&'a str, &'a str)> {
    stream.strip_prefix(prefix)?.split_once('-')
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn notices_reach_watchers_only_and_unregistering_forgets() {
        let hub = Hub::default();
        let server = ServerId::from_bytes([1; 16]);
        let account = AccountId::from_bytes([2; 16]);
        let hsid = Hsid::from_bytes([3; 32]);
        let (a, mut rx_a) = hub.register(Some((server, account)));
        let (b, mut rx_b) = hub.register(None);
        hub.watch_session(a, server, hsid);
        hub.session_ended(server, hsid, SessionEnd::LoggedOut);
        assert_eq!(
            rx_a.try_recv().unwrap(),
            Notice::SessionEnded {
                hsid: Bytes([3; 32]),
                how: SessionEnd::LoggedOut
            }
        );
        assert!(rx_b.try_recv().is_err());
        hub.account_deleted(server, account);
        assert!(matches!(
            rx_a.try_recv().unwrap(),
            Notice::AccountDeleted { .. }
        ));
        hub.unregister(a);
        hub.unregister(b);
        assert_eq!(hub.connections(), 0);
        hub.account_deleted(server, account);
        assert!(rx_a.try_recv().is_err());
    }

    fn created(user: UserDigest, account_id: Option<AccountId>) -> TransactionCreated {
        use countersign_domain::{Timestamp, TransactionId, TransactionRef};
        TransactionCreated {
            transaction: TransactionRef::new(
                ServerId::from_bytes([1; 16]),
                TransactionId::from_bytes([9; 16]),
            ),
            user,
            account_id,
            data: b"{}".to_vec(),
            data_hash: [0; 32],
            content_type: "application/json".into(),
            text: "Pay 10 EUR".into(),
            text_hash: [0; 32],
            announce_info: Some("Payment".into()),
            created_at: Timestamp::from_millis(1_000),
            expires_at: Timestamp::from_millis(301_000),
            origin: TransactionOrigin::Api,
        }
    }

    #[test]
    fn transaction_notices_reach_the_users_accounts_only() {
        let hub = Hub::default();
        let server = ServerId::from_bytes([1; 16]);
        let (alice, bob) = (
            UserDigest::from_bytes([5; 16]),
            UserDigest::from_bytes([6; 16]),
        );
        let (phone, tablet, other) = (
            AccountId::from_bytes([2; 16]),
            AccountId::from_bytes([3; 16]),
            AccountId::from_bytes([4; 16]),
        );
        let (a, mut rx_a) = hub.register(Some((server, phone)));
        hub.watch_user(a, server, alice);
        let (b, mut rx_b) = hub.register(Some((server, tablet)));
        hub.watch_user(b, server, alice);
        let (c, mut rx_c) = hub.register(Some((server, other)));
        hub.watch_user(c, server, bob);

        hub.transaction_pending(&created(alice, None));
        let expected = Notice::TransactionPending(PendingTransaction {
            transaction_id: Bytes([9; 16]),
            announce_info: Some("Payment".into()),
            expires_at_ms: 301_000,
        });
        assert_eq!(rx_a.try_recv().unwrap(), expected);
        assert_eq!(rx_b.try_recv().unwrap(), expected);
        assert!(
            rx_c.try_recv().is_err(),
            "another user's account hears nothing"
        );

        hub.transaction_pending(&created(alice, Some(tablet)));
        assert!(rx_a.try_recv().is_err(), "only the named account hears");
        assert_eq!(rx_b.try_recv().unwrap(), expected);

        hub.unregister(b);
        hub.transaction_pending(&created(alice, Some(tablet)));
        assert!(rx_b.try_recv().is_err());
        hub.unregister(a);
        hub.unregister(c);
        assert_eq!(hub.connections(), 0);
    }

    #[test]
    fn stream_names_parse() {
        assert_eq!(scoped("session-ab-cd", "session-"), Some(("ab", "cd")));
        assert_eq!(scoped("account-ab-cd", "session-"), None);
    }
}
