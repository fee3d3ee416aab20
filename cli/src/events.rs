//! `countersign events`: the log as JSON lines, for people and for `jq` (the domain's events
//! and the Message Center's `mc.*` ones).

use std::io::Write as _;

use countersign_domain::{AnyEvent, DomainEvent as _};
use countersign_eventstore::{Direction, RecordedEvent, Subscription};
use countersign_message_center::events::McEvent;
use serde_json::{Value, json};

use crate::Settings;

#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// Only this stream (default: `$all`).
    #[arg(long)]
    pub stream: Option<String>,
    /// First position (for `$all`) or version (for a stream).
    #[arg(long, default_value_t = 0)]
    pub from: u64,
    /// Stop after this many events.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Keep waiting for new events (`$all` only).
    #[arg(long)]
    pub follow: bool,
}

/// The JSON rendering of one stored event, its payload decoded when the type is known.
pub fn to_json(event: &RecordedEvent) -> Value {
    let decoded = if event.event_type.starts_with("mc.") {
        McEvent::decode(event)
            .map(|e| mc_json(&e))
            .map_err(|e| e.to_string())
    } else {
        AnyEvent::decode(&event.event_type, event.schema_version, &event.payload)
            .map(|e| e.to_json())
            .map_err(|e| e.to_string())
    };
    let payload = match decoded {
        Ok(payload) => payload,
        Err(error) => json!({ "undecodable": error, "cbor_hex": hex::encode(&event.payload) }),
    };
    json!({
        "position": event.position,
        "stream": event.stream,
        "version": event.version,
        "event_id": event.event_id,
        "type": event.event_type,
        "schema_version": event.schema_version,
        "recorded_at": event.recorded_at,
        "metadata": event.metadata,
        "payload": payload,
    })
}

/// A Message Center event's payload (`mc.*`, written by the message-center crate): ids and
/// digests in hex.
fn mc_json(event: &McEvent) -> Value {
    let ids = |ids: &[[u8; 16]]| ids.iter().map(hex::encode).collect::<Vec<_>>();
    match event {
        McEvent::MailboxRegistered {
            platform,
            app_id,
            token_digest,
            channel_key_digest,
            push,
        } => json!({
            "platform": platform,
            "app_id": app_id,
            "token_digest": hex::encode(token_digest),
            "channel_key_digest": hex::encode(channel_key_digest),
            "push": push,
        }),
        McEvent::PushTokenUpdated { push_token_digest } => {
            json!({ "push_token_digest": hex::encode(push_token_digest) })
        }
        McEvent::MessageQueued {
            message_id,
            envelope_digest,
            size,
            expires_at_ms,
            priority,
        } => json!({
            "message_id": hex::encode(message_id),
            "envelope_digest": hex::encode(envelope_digest),
            "size": size,
            "expires_at_ms": expires_at_ms,
            "priority": priority,
        }),
        McEvent::DeliveryAttempted {
            message_id,
            attempt,
            outcome,
            reason,
            next_attempt_at_ms,
        } => json!({
            "message_id": hex::encode(message_id),
            "attempt": attempt,
            "outcome": outcome.label(),
            "reason": reason,
            "next_attempt_at_ms": next_attempt_at_ms,
        }),
        McEvent::MessageDelivered {
            message_id,
            latency_ms,
        } => json!({ "message_id": hex::encode(message_id), "latency_ms": latency_ms }),
        McEvent::PushTokenDropped { reason } => json!({ "reason": reason }),
        McEvent::MessageExpired { message_id } => json!({ "message_id": hex::encode(message_id) }),
        McEvent::MessagePulled { message_ids } => json!({ "message_ids": ids(message_ids) }),
        McEvent::MessageAcknowledged { message_ids } => {
            json!({ "message_ids": ids(message_ids) })
        }
    }
}

pub async fn run(settings: &Settings, args: EventsArgs) -> anyhow::Result<()> {
    let store = crate::connect(settings).await?.events;
    let limit = args.limit.unwrap_or(usize::MAX);
    let mut out = std::io::stdout().lock();
    let mut printed = 0usize;
    if let Some(stream) = args.stream {
        if args.follow {
            anyhow::bail!("--follow works on $all only; drop --stream or --follow");
        }
        let mut from = args.from;
        while printed < limit {
            let page = store
                .read_stream(
                    &stream,
                    Some(from),
                    Direction::Forwards,
                    1_000.min(limit - printed),
                )
                .await?;
            let Some(last) = page.last() else { break };
            from = last.version + 1;
            for event in &page {
                writeln!(out, "{}", to_json(event))?;
                printed += 1;
            }
        }
        return Ok(());
    }
    if args.follow {
        drop(out);
        let mut subscription = Subscription::new(store, args.from);
        while printed < limit {
            let event = subscription.next().await?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", to_json(&event))?;
            out.flush()?;
            printed += 1;
        }
        return Ok(());
    }
    let mut from = args.from;
    while printed < limit {
        let page = store.read_all(from, 1_000.min(limit - printed)).await?;
        let Some(last) = page.last() else { break };
        from = last.position + 1;
        for event in &page {
            writeln!(out, "{}", to_json(event))?;
            printed += 1;
        }
    }
    Ok(())
}
