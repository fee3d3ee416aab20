//! What the FCM ([`crate::fcm`]) and APNs ([`crate::apns`]) senders share beyond the HTTP
//! plumbing in [`crate::push`]: the cached credential (FCM's access token, APNs's provider
//! token) and the send loop with its one credential refresh.
//!
//! Rules:
//! - A credential is used until its `use_until` (Unix seconds, on the sender's [`WallClock`]);
//!   one refresh runs at a time and senders waiting for it reuse its result (single flight).
//! - Every credential has a generation (1, 2, …): a refusal names the generation it refused, so
//!   a refusal replaces the credential only if no other send replaced it already.
//! - [`send_with_one_refresh`]: a refused credential is replaced once and the send tried again;
//!   a second refusal is [`SendOutcome::AuthFailed`] (what the services' documentation asks).
//! - The credential is a secret: it is kept in [`Zeroizing`] and never logged.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Mutex, RwLock};
use zeroize::Zeroizing;

use crate::push::{Answer, OutgoingPush, Platform, SendOutcome, WallClock};

/// A credential just made, for [`CachedCredential::get`] to keep.
pub(crate) struct Fresh {
    /// The secret (a bearer token or a JWT).
    pub(crate) secret: Zeroizing<String>,
    /// Unix seconds from which it is no longer used.
    pub(crate) use_until: u64,
    /// Its generation, from [`CachedCredential::next_generation`].
    pub(crate) generation: u64,
}

/// The current credential of a sender, made anew when it is too old or refused.
#[derive(Default)]
pub(crate) struct CachedCredential {
    current: RwLock<Option<Fresh>>,
    refresh: Mutex<()>,
    generations: AtomicU64,
}

impl CachedCredential {
    /// How many generations were handed out so far (tests, metrics).
    pub(crate) fn made(&self) -> u64 {
        self.generations.load(Ordering::Relaxed)
    }

    /// The next generation; the maker takes it once it is about to use a new credential.
    pub(crate) fn next_generation(&self) -> u64 {
        self.generations.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The current credential and its generation, or a new one from `make` when it is too old
    /// or is the one a service just `refused` (unless another send replaced it already).
    pub(crate) async fn get<E, Fut>(
        &self,
        clock: &dyn WallClock,
        refused: Option<u64>,
        make: impl FnOnce() -> Fut,
    ) -> Result<(Zeroizing<String>, u64), E>
    where
        Fut: Future<Output = Result<Fresh, E>>,
    {
        if let Some(found) = self.usable(clock, refused).await {
            return Ok(found);
        }
        let _single_flight = self.refresh.lock().await;
        if let Some(found) = self.usable(clock, refused).await {
            return Ok(found);
        }
        let fresh = make().await?;
        let found = (fresh.secret.clone(), fresh.generation);
        *self.current.write().await = Some(fresh);
        Ok(found)
    }

    async fn usable(
        &self,
        clock: &dyn WallClock,
        refused: Option<u64>,
    ) -> Option<(Zeroizing<String>, u64)> {
        let now = clock.now_unix_secs();
        let current = self.current.read().await;
        current
            .as_ref()
            .filter(|c| now < c.use_until && refused != Some(c.generation))
            .map(|c| (c.secret.clone(), c.generation))
    }
}

/// What a push service's answer means to the send loop.
pub(crate) enum Verdict {
    /// The send came to this.
    Outcome(SendOutcome),
    /// The credential was refused (FCM 401/403, APNs 403): the reason.
    Auth(String),
}

/// The send loop both senders run: get the credential (`credential`, `Err` is the outcome),
/// make the attempt with it (`attempt`, `Err` is the outcome), read the answer (`verdict`);
/// a refused credential is replaced once, a second refusal is [`SendOutcome::AuthFailed`].
/// `service` names the push service in the logs.
pub(crate) async fn send_with_one_refresh<CredFut, AttemptFut>(
    service: &'static str,
    credential: impl Fn(Option<u64>) -> CredFut,
    attempt: impl Fn(Zeroizing<String>) -> AttemptFut,
    verdict: fn(&Answer) -> Verdict,
) -> SendOutcome
where
    CredFut: Future<Output = Result<(Zeroizing<String>, u64), SendOutcome>>,
    AttemptFut: Future<Output = Result<Answer, SendOutcome>>,
{
    let mut refused: Option<u64> = None;
    loop {
        let (secret, generation) = match credential(refused).await {
            Ok(found) => found,
            Err(outcome) => return outcome,
        };
        let answer = match attempt(secret).await {
            Ok(answer) => answer,
            Err(outcome) => return outcome,
        };
        match verdict(&answer) {
            Verdict::Outcome(outcome) => return outcome,
            Verdict::Auth(reason) if refused.is_some() => {
                tracing::warn!(service, %reason, "the push service refused a fresh credential");
                return SendOutcome::AuthFailed { reason };
            }
            Verdict::Auth(reason) => {
                tracing::info!(
                    service,
                    %reason,
                    "the push service refused the credential; making a new one once"
                );
                refused = Some(generation);
            }
        }
    }
}

/// A transport failure: retried later, without a `Retry-After`.
pub(crate) fn transport_failure(reason: String) -> SendOutcome {
    SendOutcome::Retry {
        after: None,
        reason,
    }
}

/// [`SendOutcome::Failed`] when `push` is for another platform than the sender's (`name`).
pub(crate) fn other_platform(
    push: &OutgoingPush,
    platform: Platform,
    name: &str,
) -> Option<SendOutcome> {
    (push.platform != platform).then(|| SendOutcome::Failed {
        reason: format!("not an {name} token"),
    })
}

/// [`SendOutcome::Failed`] (`expired`) when `push` expired by `clock`: it is never sent.
pub(crate) fn expired(push: &OutgoingPush, clock: &dyn WallClock) -> Option<SendOutcome> {
    (push.expires_at_ms <= clock.now_unix_secs().saturating_mul(1000)).then(|| {
        SendOutcome::Failed {
            reason: "expired".to_owned(),
        }
    })
}
