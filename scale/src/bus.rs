//! Redis between instances: the projector announces how far the read models are, and the
//! instances that serve reads without projecting wake the requests and event streams waiting
//! for a position (`min_position`, a session's or transaction's SSE) when the announcement
//! arrives, instead of polling the database.
//!
//! Redis is an accelerator, never the truth: an announcement is a position read from the
//! projector's committed checkpoints, and a lost one is superseded by the next. While Redis
//! cannot be reached, followers fall back to reading the checkpoints from PostgreSQL every
//! 200 ms (reads stay correct, a little slower) and go back to announcements when it
//! returns; the projector keeps projecting and announces again once it can.
//!
//! (The log's own head travels between instances by PostgreSQL `NOTIFY`, in the transaction
//! that commits the events: that is how a device gateway on one instance hears of a session
//! ended or a transaction created through another.)

use std::time::Duration;

use countersign_projections::ReadModels;
use futures::StreamExt as _;
use redis::AsyncCommands as _;
use tokio::sync::watch;

/// How often a follower reads the checkpoints itself while Redis is away.
const FALLBACK_POLL: Duration = Duration::from_millis(200);
/// How often it tries Redis again meanwhile.
const RECONNECT: Duration = Duration::from_secs(1);

/// A Redis URL that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("bad Redis URL: {0}")]
pub struct BadRedisUrl(String);

/// The notification bus of one deployment.
#[derive(Debug, Clone)]
pub struct Bus {
    client: redis::Client,
    channel: String,
}

impl Bus {
    /// A bus on the Redis at `url`; `namespace` separates deployments sharing one Redis.
    pub fn new(url: &str, namespace: &str) -> Result<Self, BadRedisUrl> {
        let client = redis::Client::open(url).map_err(|e| BadRedisUrl(e.to_string()))?;
        Ok(Self {
            client,
            channel: format!("{namespace}:projected"),
        })
    }

    /// Whether Redis answers now (readiness).
    pub async fn ping(&self) -> bool {
        match self.client.get_multiplexed_async_connection().await {
            Ok(mut connection) => redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
                .is_ok(),
            Err(_) => false,
        }
    }

    /// Announces every new value of `processed` (the read models' committed position) until
    /// the watch closes. Values that pile up while one is being sent collapse into the newest.
    pub async fn announce(&self, mut processed: watch::Receiver<u64>) {
        let mut connection = None;
        let mut failing = false;
        loop {
            let position = *processed.borrow_and_update();
            if connection.is_none() {
                connection = self.client.get_multiplexed_async_connection().await.ok();
            }
            let sent = match connection.as_mut() {
                Some(c) => c
                    .publish::<_, _, i64>(&self.channel, position.to_string())
                    .await
                    .is_ok(),
                None => false,
            };
            if sent {
                if failing {
                    tracing::info!("Redis is back: announcing read-model progress again");
                }
                failing = false;
            } else {
                if !failing {
                    tracing::warn!(
                        "Redis unreachable: other instances fall back to polling the read models"
                    );
                }
                failing = true;
                connection = None;
                // Retry the same (or a newer) position after a pause.
                tokio::time::sleep(RECONNECT).await;
                continue;
            }
            if processed.changed().await.is_err() {
                return;
            }
        }
    }

    /// Feeds announcements into `reads` for as long as the process runs, polling the
    /// checkpoints while Redis is unreachable.
    pub async fn follow(&self, reads: ReadModels) {
        let mut warned = false;
        loop {
            if let Ok(mut pubsub) = self.client.get_async_pubsub().await
                && pubsub.subscribe(&self.channel).await.is_ok()
            {
                if warned {
                    tracing::info!("Redis is back: following read-model announcements");
                    warned = false;
                }
                // What was announced while not subscribed.
                if let Err(error) = reads.refresh_processed().await {
                    tracing::warn!(%error, "cannot read the read models' checkpoints");
                }
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    match message
                        .get_payload::<String>()
                        .ok()
                        .and_then(|p| p.parse().ok())
                    {
                        Some(position) => reads.observe_processed(position),
                        None => tracing::debug!("ignoring a malformed announcement"),
                    }
                }
            }
            if !warned {
                tracing::warn!("Redis unreachable: polling the read models' checkpoints instead");
                warned = true;
            }
            let retry = tokio::time::Instant::now() + RECONNECT;
            while tokio::time::Instant::now() < retry {
                if let Err(error) = reads.refresh_processed().await {
                    tracing::warn!(%error, "cannot read the read models' checkpoints");
                }
                tokio::time::sleep(FALLBACK_POLL).await;
            }
        }
    }
}
