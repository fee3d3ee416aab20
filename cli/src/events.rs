//! `countersign events`: the log as JSON lines, for people and for `jq`.

use std::io::Write as _;

use countersign_domain::{AnyEvent, DomainEvent as _};
use countersign_eventstore::{Direction, RecordedEvent, Subscription};
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
    let payload = match AnyEvent::decode(&event.event_type, event.schema_version, &event.payload) {
        Ok(decoded) => decoded.to_json(),
        Err(error) => {
            json!({ "undecodable": error.to_string(), "cbor_hex": hex::encode(&event.payload) })
        }
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
