//! The NS side of push: tails the event log and, for every event an app must hear of while
//! it is closed, seals a push message to each account concerned and submits it to that
//! account's Message Center (`docs/message-center.md`).
//!
//! What is pushed, and to whom:
//! - `session.opened` of a push login (provoke on a user or an account) → `login` to each
//!   account asked; `session.provoked` (provoke on a session) → `login` to the account that
//!   last logged in; both expire with the session's login deadline;
//! - `session.logged_in` of a push login that asked several accounts → `withdrawn` to the
//!   others (one of the user's phones took it);
//! - `session.logged_out` by the business system → `logged_out` to the account;
//! - `account.deleted` by the business system → `account_deleted` to the account;
//! - `transaction.created` by the business API → `transaction` to the user's accounts (the
//!   named one only, when the creator named one), expiring with the transaction.
//!
//! Rules: an account without a push registration gets nothing (its app hears on its next
//! connection); the message id is derived from the event id and the account (SHA-256, first
//! 16 bytes), so a restart that pushes an event again submits the same id, which the MC takes
//! once and the SDK runs once; the position reached is kept in `ns_push_checkpoint` only after
//! every message of the events before it was taken by its MC, so nothing is lost on a crash.
//! Each account's registration and MC token are read once (its stream, the vault) and kept
//! in memory; the follower drops the entry when it reads the account's next
//! `account.push_registered`, so a message is never sealed to a replaced key.
//!
//! The follower reads on while earlier messages are being submitted ([`IN_FLIGHT`] at once,
//! up to [`QUEUED`] worked out ahead), so a slow submission delays only itself; the checkpoint
//! moves only past events whose messages are all finished. An MC that cannot be reached (or
//! answers 5xx/429) is retried with backoff while the message lasts, holding its slot: with
//! every slot held, the follower waits there. An MC that refuses a message for good (unknown
//! token, bad input) is logged, and the follower moves on.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use countersign_commands::{Clock, Commands};
use countersign_domain::account::{AccountEvent, DeletedBy};
use countersign_domain::session::{LogoutReason, Session, SessionEvent};
use countersign_domain::transaction::{TransactionEvent, TransactionOrigin};
use countersign_domain::{AccountId, AccountRef, Hsid, ServerId, SessionRef};
use countersign_eventstore::follow::{AbortOnDrop, Progress, lock, scoped};
use countersign_eventstore::vault::KeyVault;
use countersign_eventstore::{Database, Direction, RecordedEvent, SharedStore, with_pool};
use countersign_projections::read_models::ReadModels;
use countersign_protocol::device::Bytes;
use countersign_protocol::push::{self, PushBody, PushMessage, PushTarget};
use sha2::{Digest as _, Sha256};

use crate::TrustedMc;

/// Events read from the log per round.
const BATCH: usize = 500;
/// Submissions in flight at once.
const IN_FLIGHT: usize = 64;
/// Messages worked out and waiting for a submission slot; the follower reads on while
/// earlier messages are in flight, up to this many ahead.
const QUEUED: usize = 4 * BATCH;
/// How long a logout or deletion notice stays worth delivering.
const NOTICE_TTL_MS: i64 = 24 * 3600 * 1000;
/// The checkpoint row's name.
const CHECKPOINT: &str = "push";

/// Why the pusher stopped a round (it restarts after a pause).
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Store(#[from] countersign_eventstore::StoreError),
    #[error(transparent)]
    Command(#[from] countersign_commands::CommandError),
    #[error(transparent)]
    Projection(#[from] countersign_projections::ProjectionError),
    #[error("ns_push_checkpoint: {0}")]
    Checkpoint(#[from] sqlx::Error),
}

/// One message to seal and submit.
#[derive(Debug, Clone)]
struct Outgoing {
    account: AccountRef,
    message_id: [u8; 16],
    expires_at_ms: i64,
    body: PushBody,
}

/// An account's push registration, as its stream says.
#[derive(Debug, Clone)]
struct Registration {
    mc_key_id: [u8; 32],
    push_public_key: Vec<u8>,
    token_ref: String,
}

/// An account's registration and its MC token, as the pusher keeps them between messages.
struct Cached {
    registration: Registration,
    token: zeroize::Zeroizing<Vec<u8>>,
}

/// Accounts whose registration is kept; beyond, the cache starts again empty.
const CACHED_ACCOUNTS: usize = 100_000;

/// How a submission ended.
enum Submitted {
    /// The MC took it (or had it already).
    Taken,
    /// The MC refused it for good.
    Refused,
    /// Try again later.
    Again,
}

/// The log follower that sends push messages. Cheap to clone.
#[derive(Clone)]
pub struct Pusher(Arc<Inner>);

struct Inner {
    commands: Commands,
    reads: ReadModels,
    store: SharedStore,
    vault: KeyVault,
    database: Database,
    clock: Arc<dyn Clock>,
    centers: Vec<TrustedMc>,
    http: reqwest::Client,
    registrations: std::sync::Mutex<std::collections::HashMap<AccountRef, Arc<Cached>>>,
}

impl std::fmt::Debug for Pusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pusher")
            .field("centers", &self.0.centers.len())
            .finish_non_exhaustive()
    }
}

impl Pusher {
    pub fn new(
        commands: Commands,
        reads: ReadModels,
        store: SharedStore,
        vault: KeyVault,
        database: Database,
        clock: Arc<dyn Clock>,
        centers: Vec<TrustedMc>,
    ) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(IN_FLIGHT)
            .build()
            .unwrap_or_default();
        Self(Arc::new(Inner {
            commands,
            reads,
            store,
            vault,
            database,
            clock,
            centers,
            http,
            registrations: std::sync::Mutex::default(),
        }))
    }

    /// Follows the log from the checkpoint (from the log's end on the very first start: there
    /// is nothing to push for what happened before push was configured), forever; restarts
    /// after a failure.
    pub async fn run(&self) {
        loop {
            if let Err(error) = self.follow().await {
                tracing::error!(%error, "push follower failed; restarting");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }

    async fn follow(&self) -> Result<(), PushError> {
        let store = &self.0.store;
        let mut next = match self.checkpoint().await? {
            Some(next) => next,
            None => {
                let next = store.last_position().await?.map_or(0, |p| p + 1);
                self.save_checkpoint(next).await?;
                next
            }
        };
        let progress = Arc::new(std::sync::Mutex::new(Progress::new(next)));
        let (queue, queued) = tokio::sync::mpsc::channel::<(u64, Outgoing)>(QUEUED);
        // Aborted with this round: a restart submits again from the checkpoint.
        let submitter = AbortOnDrop(tokio::spawn(
            self.clone().submit_all(queued, Arc::clone(&progress)),
        ));
        let mut saved = next;
        let mut head = store.head();
        let mut woken = self.0.reads.processed();
        loop {
            head.borrow_and_update();
            let events = store.read_all(next, BATCH).await?;
            let Some(last) = events.last() else {
                saved = self.save_progress(&progress, saved).await?;
                woken.borrow_and_update();
                tokio::select! {
                    changed = head.changed() => {
                        if changed.is_err() {
                            return Ok(());
                        }
                    }
                    Ok(()) = woken.changed() => {}
                    () = tokio::time::sleep(crate::hub::POLL) => {}
                }
                continue;
            };
            let reached = last.position + 1;
            for event in &events {
                if event.event_type == "account.push_registered" {
                    self.forget_registration(event);
                }
                let messages = self.messages_for(event).await?;
                lock(&progress).expect(event.position, messages.len());
                for message in messages {
                    if queue.send((event.position, message)).await.is_err() {
                        return Ok(());
                    }
                }
            }
            lock(&progress).read_to(reached);
            if submitter.0.is_finished() {
                return Ok(());
            }
            saved = self.save_progress(&progress, saved).await?;
            next = reached;
        }
    }

    /// Saves the checkpoint if the messages before a later position were all taken since
    /// `saved`; answers the checkpoint now saved.
    async fn save_progress(
        &self,
        progress: &std::sync::Mutex<Progress>,
        saved: u64,
    ) -> Result<u64, PushError> {
        let done = lock(progress).done_before();
        if done > saved {
            self.save_checkpoint(done).await?;
            return Ok(done);
        }
        Ok(saved)
    }

    /// Submits the queued messages, [`IN_FLIGHT`] at once, each until its MC takes it, refuses
    /// it for good, or it expires; marks each done in `progress`.
    async fn submit_all(
        self,
        queued: tokio::sync::mpsc::Receiver<(u64, Outgoing)>,
        progress: Arc<std::sync::Mutex<Progress>>,
    ) {
        use futures::StreamExt as _;
        let mut queued = queued;
        futures::stream::poll_fn(move |cx| queued.poll_recv(cx))
            .map(|(position, message)| {
                let pusher = self.clone();
                async move {
                    pusher.submit_until_done(&message).await;
                    position
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .for_each(|position| {
                lock(&progress).finished(position);
                async {}
            })
            .await;
    }

    /// Submits one message, retrying with backoff while its MC is unavailable and the message
    /// has not expired.
    async fn submit_until_done(&self, message: &Outgoing) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.submit(message).await {
                Submitted::Again if message.expires_at_ms > self.0.clock.now().as_millis() => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                _ => return,
            }
        }
    }

    /// The messages one event calls for.
    async fn messages_for(&self, event: &RecordedEvent) -> Result<Vec<Outgoing>, PushError> {
        let now = self.0.clock.now().as_millis();
        let id = |account: AccountId| message_id(event, account);
        if let Some((server, hsid)) = scoped(&event.stream, "session-")
            .and_then(|(s, h)| Some((ServerId::parse_hex(s).ok()?, Hsid::parse_hex(h).ok()?)))
        {
            let session = SessionRef::new(server, hsid);
            let hsid_bytes = Bytes(*hsid.as_bytes());
            let to = |accounts: &[AccountId], body: PushBody, expires_at_ms: i64| {
                accounts
                    .iter()
                    .map(|account| Outgoing {
                        account: AccountRef::new(server, *account),
                        message_id: id(*account),
                        expires_at_ms,
                        body: body.clone(),
                    })
                    .collect::<Vec<_>>()
            };
            let interesting = matches!(
                event.event_type.as_str(),
                "session.opened" | "session.provoked" | "session.logged_in" | "session.logged_out"
            );
            if !interesting {
                return Ok(Vec::new());
            }
            let decoded = event.decode::<SessionEvent>()?;
            return Ok(match decoded {
                SessionEvent::Opened(opened) if !opened.push_to.is_empty() => to(
                    &opened.push_to,
                    PushBody::Login { hsid: hsid_bytes },
                    opened.expires_at.as_millis(),
                ),
                SessionEvent::Provoked(provoked) => to(
                    &[provoked.account_id],
                    PushBody::Login { hsid: hsid_bytes },
                    provoked.expires_at.as_millis(),
                ),
                SessionEvent::LoggedIn(logged_in) => {
                    let loaded = self.0.commands.sessions.load(session).await?;
                    let others: Vec<AccountId> = loaded
                        .state
                        .opened()
                        .map(|o| o.push_to.clone())
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|a| *a != logged_in.account_id)
                        .collect();
                    to(
                        &others,
                        PushBody::Withdrawn { hsid: hsid_bytes },
                        now + NOTICE_TTL_MS,
                    )
                }
                SessionEvent::LoggedOut(out) if out.reason == LogoutReason::Server => {
                    let loaded = self.0.commands.sessions.load(session).await?;
                    match loaded.state {
                        Session::LoggedOut { account_id, .. } => to(
                            &[account_id],
                            PushBody::LoggedOut { hsid: hsid_bytes },
                            now + NOTICE_TTL_MS,
                        ),
                        _ => Vec::new(),
                    }
                }
                _ => Vec::new(),
            });
        }
        if event.event_type == "account.deleted"
            && let Some((server, account)) = scoped(&event.stream, "account-").and_then(|(s, a)| {
                Some((ServerId::parse_hex(s).ok()?, AccountId::parse_hex(a).ok()?))
            })
        {
            if let AccountEvent::Deleted(deleted) = event.decode::<AccountEvent>()?
                && deleted.by == DeletedBy::Server
            {
                return Ok(vec![Outgoing {
                    account: AccountRef::new(server, account),
                    message_id: id(account),
                    expires_at_ms: now + NOTICE_TTL_MS,
                    body: PushBody::AccountDeleted,
                }]);
            }
            return Ok(Vec::new());
        }
        if event.event_type == "transaction.created"
            && let TransactionEvent::Created(created) = event.decode::<TransactionEvent>()?
            && created.origin == TransactionOrigin::Api
        {
            let server = created.transaction.server_id;
            let accounts: Vec<AccountId> = match created.account_id {
                Some(named) => vec![named],
                None => self
                    .0
                    .reads
                    .accounts(server, created.user)
                    .await?
                    .into_iter()
                    .map(|a| a.account_id)
                    .collect(),
            };
            let body = PushBody::Transaction {
                transaction_id: Bytes(*created.transaction.transaction_id.as_bytes()),
            };
            return Ok(accounts
                .into_iter()
                .map(|account| Outgoing {
                    account: AccountRef::new(server, account),
                    message_id: id(account),
                    expires_at_ms: created.expires_at.as_millis(),
                    body: body.clone(),
                })
                .collect());
        }
        Ok(Vec::new())
    }

    /// Drops the kept registration of the account a `account.push_registered` event is of.
    fn forget_registration(&self, event: &RecordedEvent) {
        if let Some((server, account)) = scoped(&event.stream, "account-")
            .and_then(|(s, a)| Some((ServerId::parse_hex(s).ok()?, AccountId::parse_hex(a).ok()?)))
            && let Ok(mut kept) = self.0.registrations.lock()
        {
            kept.remove(&AccountRef::new(server, account));
        }
    }

    /// The account's registration and MC token: kept, or read and kept.
    async fn cached(&self, account: AccountRef) -> Result<Option<Arc<Cached>>, PushError> {
        if let Some(kept) = self
            .0
            .registrations
            .lock()
            .ok()
            .and_then(|kept| kept.get(&account).cloned())
        {
            return Ok(Some(kept));
        }
        let Some(registration) = self.registration(account).await? else {
            return Ok(None);
        };
        let Some(token) = self.0.vault.get(&registration.token_ref).await? else {
            return Ok(None);
        };
        let cached = Arc::new(Cached {
            registration,
            token,
        });
        if let Ok(mut kept) = self.0.registrations.lock() {
            if kept.len() >= CACHED_ACCOUNTS {
                kept.clear();
            }
            kept.insert(account, Arc::clone(&cached));
        }
        Ok(Some(cached))
    }

    /// The account's current push registration, read from its stream (a deleted account's
    /// last one: its app is told of the deletion).
    async fn registration(&self, account: AccountRef) -> Result<Option<Registration>, PushError> {
        let mut found = None;
        let mut from = 0;
        loop {
            let page = self
                .0
                .store
                .read_stream(&account.stream(), Some(from), Direction::Forwards, 1_000)
                .await?;
            let Some(last) = page.last() else { break };
            from = last.version + 1;
            for recorded in &page {
                if recorded.event_type == "account.push_registered"
                    && let AccountEvent::PushRegistered(e) = recorded.decode::<AccountEvent>()?
                {
                    found = Some(Registration {
                        mc_key_id: e.mc_key_id,
                        push_public_key: e.push_public_key,
                        token_ref: e.token_ref,
                    });
                }
            }
        }
        Ok(found)
    }

    /// Seals one message and submits it to the account's MC.
    async fn submit(&self, message: &Outgoing) -> Submitted {
        match self.try_submit(message).await {
            Ok(outcome) => outcome,
            Err(error) => {
                tracing::warn!(%error, "push not submitted; trying again");
                Submitted::Again
            }
        }
    }

    async fn try_submit(&self, message: &Outgoing) -> Result<Submitted, PushError> {
        let Some(cached) = self.cached(message.account).await? else {
            return Ok(Submitted::Refused);
        };
        let (registration, token) = (&cached.registration, &cached.token);
        let Some(center) = self
            .0
            .centers
            .iter()
            .find(|mc| mc.key_id() == registration.mc_key_id)
        else {
            tracing::warn!("an account's Message Center is no longer trusted; push dropped");
            return Ok(Submitted::Refused);
        };
        let server = message.account.server_id;
        let sender = self.0.commands.secrets.push_sender_key(server).await?;
        let mut random = [0u8; 32];
        countersign_commands::random_bytes(&mut random)?;
        let expires_at_ms = u64::try_from(message.expires_at_ms).unwrap_or_default();
        let target = PushTarget {
            server_id: *server.as_bytes(),
            account_id: *message.account.account_id.as_bytes(),
        };
        let plaintext = PushMessage {
            body: message.body.clone(),
            sent_at_ms: u64::try_from(self.0.clock.now().as_millis()).unwrap_or_default(),
        };
        let envelope = match push::seal(
            &sender,
            &registration.push_public_key,
            &target,
            message.message_id,
            expires_at_ms,
            &plaintext,
            random,
        ) {
            Ok(envelope) => envelope,
            Err(error) => {
                tracing::warn!(%error, "push not sealed");
                return Ok(Submitted::Refused);
            }
        };
        let high = matches!(
            message.body,
            PushBody::Login { .. } | PushBody::Transaction { .. }
        );
        let body = serde_json::json!({
            "message_id": hex::encode(message.message_id),
            "expires_at_ms": expires_at_ms,
            "priority": if high { "high" } else { "normal" },
            "collapse_id": serde_json::Value::Null,
            "envelope": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&envelope),
        });
        let bearer = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.as_slice());
        let answer = self
            .0
            .http
            .post(format!(
                "{}/v1/mc/messages",
                center.url.trim_end_matches('/')
            ))
            .bearer_auth(bearer)
            .json(&body)
            .send()
            .await;
        let status = match answer {
            Ok(answer) => answer.status(),
            Err(error) => {
                tracing::warn!(error = %error.without_url(), "Message Center unreachable");
                return Ok(Submitted::Again);
            }
        };
        Ok(if status.is_success() {
            Submitted::Taken
        } else if status.is_server_error() || status.as_u16() == 429 {
            Submitted::Again
        } else {
            tracing::warn!(%status, "the Message Center refused a push message");
            Submitted::Refused
        })
    }

    async fn checkpoint(&self) -> Result<Option<u64>, PushError> {
        let row: Option<(i64,)> = with_pool!(&self.0.database, pool => {
            sqlx::query_as("SELECT position FROM ns_push_checkpoint WHERE name = $1")
                .bind(CHECKPOINT)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.and_then(|(p,)| u64::try_from(p).ok()))
    }

    async fn save_checkpoint(&self, next: u64) -> Result<(), PushError> {
        let next = i64::try_from(next).unwrap_or(i64::MAX);
        with_pool!(&self.0.database, pool => {
            sqlx::query(
                "INSERT INTO ns_push_checkpoint (name, position) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position",
            )
            .bind(CHECKPOINT)
            .bind(next)
            .execute(pool)
            .await
            .map(|_| ())?
        });
        Ok(())
    }
}

/// `SHA-256("countersign-push-id" ‖ event id ‖ account id)`, first 16 bytes.
fn message_id(event: &RecordedEvent, account: AccountId) -> [u8; 16] {
    let mut hash = Sha256::new();
    hash.update(b"countersign-push-id");
    hash.update(event.event_id.as_bytes());
    hash.update(account.as_bytes());
    let digest = hash.finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(digest.get(..16).unwrap_or(&[0; 16]));
    id
}
