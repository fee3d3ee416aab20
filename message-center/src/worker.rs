//! The delivery worker: pushes queued messages through their platform's sender, retries, and
//! records what happened.
//!
//! Two ways in: the **fast path** (a submit hands its message over at once, holding the
//! message's lease) and the **recovery scan** (every [`McLimits::scan_interval`](crate::McLimits::scan_interval), or when
//! woken): it claims messages awaiting a push whose due time came — the lease of a send that
//! was never recorded (a crash, a full hand-over queue, a restart: everything outstanding is
//! due again after its lease), or a retry's time — and removes expired messages
//! (`mc.message_expired`; an expired message is never sent). At most
//! [`McLimits::max_in_flight`](crate::McLimits::max_in_flight) sends run at once.
//!
//! Per outcome of a send:
//!
//! ```text
//! Delivered     → mc.message_delivered {latency}; row pushed (batched update)
//! Retry{after}  → mc.delivery_attempted {retry, next}; due again after `after` (capped at
//!                 max_backoff) or 1 s·2^(n−1) capped at max_backoff
//! AuthFailed    → as Retry (backoff), plus a warning in the log: our credentials are refused
//! Failed        → mc.delivery_attempted {failed}; the message waits for pull
//! TokenDropped  → mc.delivery_attempted {token_dropped}; mc.push_token_dropped (once per
//!                 token); the token is forgotten and the mailbox's messages wait for pull
//!                 until the app gives a new token
//! ```
//!
//! Every send is counted in `countersign_mc_push_attempts_total{platform,outcome}`. A send that
//! takes longer than half the lease counts as a retry. Events of a message are appended
//! before its row changes, so the log never misses a push the table shows (a crash in between
//! only repeats the push; the SDK drops duplicates).

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::events::{AttemptOutcome, McEvent};
use crate::push::{OutgoingPush, PushPayload, SendOutcome};
use crate::store::{self, AWAITING, Due, MAILBOX_ONLY, Mailbox};
use crate::{Error, MessageCenter, PUSH_INLINE_LIMIT, record};

/// One message to push.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) due: Due,
    /// Known on the fast path; looked up otherwise.
    pub(crate) mailbox: Option<Mailbox>,
    /// Claimed by the recovery scan (its queued event may be missing).
    pub(crate) recovered: bool,
}

/// Rows claimed per scan at most.
const SCAN_BATCH: usize = 1000;
/// Delivered rows marked per statement at most.
const MARK_BATCH: usize = 1000;

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// The wait before attempt `failed + 1`, `failed` attempts having failed: 1 s·2^(failed−1),
/// capped.
#[must_use]
pub fn backoff(failed: u32, cap: Duration) -> Duration {
    let exponent = failed.saturating_sub(1).min(30);
    Duration::from_secs(1u64 << exponent).min(cap)
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    // A dropped sender stops the worker too.
    let _ = stop.wait_for(|stop| *stop).await;
}

pub(crate) async fn run(mc: MessageCenter, mut stop: watch::Receiver<bool>) -> Result<(), Error> {
    let taken =
        mc.0.jobs_rx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    let Some(mut jobs) = taken else {
        return Ok(());
    };
    let awaiting = store::count_awaiting(&mc.0.database).await?;
    mc.0.metrics.queue_depth.set(awaiting);
    let permits = Arc::new(Semaphore::new(mc.0.limits.max_in_flight.max(1)));
    let (pushed, pushed_rx) = mpsc::unbounded_channel();
    let marker = tokio::spawn(mark_pushed(mc.clone(), pushed_rx));
    let mut tasks = JoinSet::new();
    let mut scan = tokio::time::interval(mc.0.limits.scan_interval);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stopped(&mut stop) => break,
            Some(job) = jobs.recv() => {
                let permit = tokio::select! {
                    permit = permits.clone().acquire_owned() => permit,
                    () = stopped(&mut stop) => break,
                };
                let Ok(permit) = permit else { break };
                tasks.spawn(deliver(mc.clone(), job, permit, pushed.clone()));
            }
            _ = scan.tick() => {
                scan_once(&mc, &permits, &mut tasks, &pushed).await;
            }
            () = mc.0.wake.notified() => {
                scan_once(&mc, &permits, &mut tasks, &pushed).await;
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    drop(pushed);
    let _ = marker.await;
    // A later `run` (a worker restarted in this process) takes the hand-over queue again.
    *mc.0
        .jobs_rx
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(jobs);
    Ok(())
}

/// Marks delivered messages pushed, many per statement.
async fn mark_pushed(mc: MessageCenter, mut ids: mpsc::UnboundedReceiver<[u8; 16]>) {
    let mut batch = Vec::with_capacity(MARK_BATCH);
    while ids.recv_many(&mut batch, MARK_BATCH).await > 0 {
        match store::set_state_many(&mc.0.database, &batch, store::PUSHED).await {
            Ok(moved) => {
                mc.0.metrics.queue_depth.dec_by(clamp(moved));
                let done = batch.len() as u64;
                mc.0.marked.send_modify(|marked| *marked += done);
            }
            // The rows stay due: they are pushed again after their lease.
            Err(error) => tracing::warn!(%error, "mc: marking delivered messages failed"),
        }
        batch.clear();
    }
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Expires what expired, then claims due messages for as many sends as may start. When it
/// claimed as many as it had room for, more may be due: it wakes itself to scan again at
/// once (a backlog after an outage drains at the senders' pace, not one batch per interval).
async fn scan_once(
    mc: &MessageCenter,
    permits: &Arc<Semaphore>,
    tasks: &mut JoinSet<()>,
    pushed: &mpsc::UnboundedSender<[u8; 16]>,
) {
    if let Err(error) = expire(mc).await {
        tracing::warn!(%error, "mc: expiry sweep failed");
    }
    // Wait for room for at least one send: a full worker would claim nothing.
    let Ok(first) = permits.clone().acquire_owned().await else {
        return;
    };
    drop(first);
    let room = permits.available_permits().clamp(1, SCAN_BATCH);
    let now = mc.now_ms();
    let lease = millis(mc.0.limits.lease);
    let claimed = match store::claim_due(
        &mc.0.database,
        now,
        now.saturating_add(lease),
        i64::try_from(room).unwrap_or(0),
    )
    .await
    {
        Ok(claimed) => claimed,
        Err(error) => {
            tracing::warn!(%error, "mc: recovery scan failed");
            return;
        }
    };
    if claimed.is_empty() {
        return;
    }
    if claimed.len() >= room {
        mc.0.wake.notify_one();
    }
    let mut ids: Vec<[u8; 16]> = claimed.iter().map(|due| due.mailbox_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let mailboxes = match store::mailboxes(&mc.0.database, &ids).await {
        Ok(found) => found,
        Err(error) => {
            tracing::warn!(%error, "mc: recovery scan failed");
            return;
        }
    };
    for due in claimed {
        let mailbox = mailboxes.iter().find(|m| m.id == due.mailbox_id).cloned();
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let job = Job {
            due,
            mailbox,
            recovered: true,
        };
        tasks.spawn(deliver(mc.clone(), job, permit, pushed.clone()));
    }
}

/// Records and removes expired messages.
async fn expire(mc: &MessageCenter) -> Result<(), Error> {
    let now = mc.now_ms();
    let expired =
        store::expired(&mc.0.database, now, i64::try_from(SCAN_BATCH).unwrap_or(0)).await?;
    if expired.is_empty() {
        return Ok(());
    }
    let recorded = join_all(expired.iter().map(|(message_id, mailbox)| async move {
        record(
            mc,
            mailbox,
            &McEvent::MessageExpired {
                message_id: *message_id,
            },
        )
        .await
        .map(|()| *message_id)
    }))
    .await;
    let ids: Vec<[u8; 16]> = recorded.into_iter().filter_map(Result::ok).collect();
    let gone = store::delete_messages(&mc.0.database, &ids).await?;
    let awaiting = gone.iter().filter(|(_, state)| *state == AWAITING).count();
    mc.0.metrics.queue_depth.dec_by(clamp(awaiting as u64));
    Ok(())
}

/// Pushes one message and records the outcome. Failures are logged: the message stays due
/// and is pushed again after its lease.
async fn deliver(
    mc: MessageCenter,
    job: Job,
    _permit: OwnedSemaphorePermit,
    pushed: mpsc::UnboundedSender<[u8; 16]>,
) {
    let id = job.due.message_id;
    if let Err(error) = try_deliver(&mc, job, &pushed).await {
        tracing::warn!(message_id = %hex::encode(id), %error, "mc: delivery failed; retried after the lease");
    }
}

async fn try_deliver(
    mc: &MessageCenter,
    job: Job,
    pushed: &mpsc::UnboundedSender<[u8; 16]>,
) -> Result<(), Error> {
    let due = job.due;
    let db = &mc.0.database;
    let now = mc.now_ms();
    if due.expires_at_ms <= now {
        record(
            mc,
            &due.mailbox_id,
            &McEvent::MessageExpired {
                message_id: due.message_id,
            },
        )
        .await?;
        let gone = store::delete_messages(db, &[due.message_id]).await?;
        let awaiting = gone.iter().filter(|(_, state)| *state == AWAITING).count();
        mc.0.metrics.queue_depth.dec_by(clamp(awaiting as u64));
        return Ok(());
    }
    let mailbox = match job.mailbox {
        Some(mailbox) => Some(mailbox),
        None => store::mailbox_by_id(db, &due.mailbox_id).await?,
    };
    let sender = mailbox.as_ref().filter(|m| m.pushable()).and_then(|m| {
        mc.0.senders
            .for_platform(m.platform)
            .map(|s| (m, s.clone()))
    });
    let Some((mailbox, sender)) = sender else {
        let moved = store::set_state_many(db, &[due.message_id], MAILBOX_ONLY).await?;
        mc.0.metrics.queue_depth.dec_by(clamp(moved));
        return Ok(());
    };
    if job.recovered && due.attempts == 0 {
        // The submit that stored this row may have failed before its event: append it (a
        // no-op when it is there, the event id being the message's).
        let event = crate::submit::queued_event(
            due.message_id,
            due.envelope_digest,
            due.envelope.len(),
            due.expires_at_ms,
            due.priority,
        );
        record(mc, &due.mailbox_id, &event).await?;
    }
    let platform = store::platform_name(mailbox.platform);
    let push = OutgoingPush {
        platform: mailbox.platform,
        push_token: mailbox.push_token.clone(),
        app_id: mailbox.app_id.clone(),
        message_id: due.message_id,
        expires_at_ms: u64::try_from(due.expires_at_ms).unwrap_or(0),
        priority: due.priority,
        collapse_id: due.collapse_id.clone(),
        payload: if due.envelope.len() > PUSH_INLINE_LIMIT {
            PushPayload::WakeUp
        } else {
            PushPayload::Envelope(due.envelope.clone())
        },
    };
    let outcome = match tokio::time::timeout(mc.0.limits.lease / 2, sender.send(&push)).await {
        Ok(outcome) => outcome,
        Err(_) => SendOutcome::Retry {
            after: None,
            reason: "the provider did not answer in time".to_owned(),
        },
    };
    let now = mc.now_ms();
    let failed = due.attempts.saturating_add(1);
    let attempted =
        |outcome: AttemptOutcome, reason: &str, next: Option<i64>| McEvent::DeliveryAttempted {
            message_id: due.message_id,
            attempt: failed,
            outcome,
            reason: reason.to_owned(),
            next_attempt_at_ms: next.and_then(|n| u64::try_from(n).ok()),
        };
    match outcome {
        SendOutcome::Delivered => {
            mc.0.metrics.attempt(platform, "delivered");
            let latency_ms = u64::try_from(now.saturating_sub(due.queued_at_ms)).unwrap_or(0);
            #[allow(clippy::cast_precision_loss)]
            mc.0.metrics.latency.observe(latency_ms as f64 / 1000.0);
            record(
                mc,
                &due.mailbox_id,
                &McEvent::MessageDelivered {
                    message_id: due.message_id,
                    latency_ms,
                },
            )
            .await?;
            // The marker task outlives every delivery; if it is gone the worker is stopping
            // and the row is simply pushed again later.
            let _ = pushed.send(due.message_id);
        }
        SendOutcome::Retry { after, reason } => {
            mc.0.metrics
                .attempt(platform, AttemptOutcome::Retry.label());
            let wait = after.map_or_else(
                || backoff(failed, mc.0.limits.max_backoff),
                |after| after.min(mc.0.limits.max_backoff),
            );
            let next = now.saturating_add(millis(wait));
            record(
                mc,
                &due.mailbox_id,
                &attempted(AttemptOutcome::Retry, &reason, Some(next)),
            )
            .await?;
            store::set_retry(db, &due.message_id, failed, next).await?;
        }
        SendOutcome::AuthFailed { reason } => {
            mc.0.metrics
                .attempt(platform, AttemptOutcome::AuthFailed.label());
            tracing::warn!(platform, %reason, "mc: the push provider refused our credentials; retrying later");
            let next = now.saturating_add(millis(backoff(failed, mc.0.limits.max_backoff)));
            record(
                mc,
                &due.mailbox_id,
                &attempted(AttemptOutcome::AuthFailed, &reason, Some(next)),
            )
            .await?;
            store::set_retry(db, &due.message_id, failed, next).await?;
        }
        SendOutcome::Failed { reason } => {
            mc.0.metrics
                .attempt(platform, AttemptOutcome::Failed.label());
            record(
                mc,
                &due.mailbox_id,
                &attempted(AttemptOutcome::Failed, &reason, None),
            )
            .await?;
            let moved = store::set_state_many(db, &[due.message_id], MAILBOX_ONLY).await?;
            mc.0.metrics.queue_depth.dec_by(clamp(moved));
        }
        SendOutcome::TokenDropped { reason } => {
            mc.0.metrics
                .attempt(platform, AttemptOutcome::TokenDropped.label());
            record(
                mc,
                &due.mailbox_id,
                &attempted(AttemptOutcome::TokenDropped, &reason, None),
            )
            .await?;
            let (dropped_now, moved) =
                store::drop_push_token(db, &due.mailbox_id, &mailbox.push_token).await?;
            mc.0.metrics.queue_depth.dec_by(clamp(moved));
            if dropped_now {
                record(mc, &due.mailbox_id, &McEvent::PushTokenDropped { reason }).await?;
            }
            let moved = store::set_state_many(db, &[due.message_id], MAILBOX_ONLY).await?;
            mc.0.metrics.queue_depth.dec_by(clamp(moved));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_and_is_capped() {
        let cap = Duration::from_secs(300);
        assert_eq!(backoff(1, cap), Duration::from_secs(1));
        assert_eq!(backoff(2, cap), Duration::from_secs(2));
        assert_eq!(backoff(5, cap), Duration::from_secs(16));
        assert_eq!(backoff(9, cap), Duration::from_secs(256));
        assert_eq!(backoff(10, cap), cap);
        assert_eq!(backoff(u32::MAX, cap), cap);
    }
}
