//! The Message Center's metrics (prometheus-client), registered by
//! [`MessageCenter::register_metrics`](crate::MessageCenter::register_metrics):
//!
//! - `countersign_mc_push_attempts_total{platform,outcome}`: every send to FCM or APNs, by
//!   outcome (`delivered`, `retry`, `failed`, `token_dropped`, `auth_failed`);
//! - `countersign_mc_queue_depth`: messages awaiting a push in this process's view (queued or
//!   waiting for a retry; set from the table at start, then counted);
//! - `countersign_mc_delivery_latency_seconds`: from queued to accepted by the provider.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of the attempts counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct AttemptLabels {
    pub(crate) platform: &'static str,
    pub(crate) outcome: &'static str,
}

/// The metrics, cheap to clone (the prometheus types share their values).
#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    pub(crate) attempts: Family<AttemptLabels, Counter>,
    pub(crate) queue_depth: Gauge,
    pub(crate) latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            attempts: Family::default(),
            queue_depth: Gauge::default(),
            latency: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
        }
    }
}

impl Metrics {
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "countersign_mc_push_attempts",
            "Pushes sent to FCM or APNs, by platform and outcome",
            self.attempts.clone(),
        );
        registry.register(
            "countersign_mc_queue_depth",
            "Messages awaiting a push (queued or waiting for a retry)",
            self.queue_depth.clone(),
        );
        registry.register(
            "countersign_mc_delivery_latency_seconds",
            "Time from a message queued to its push accepted by the provider",
            self.latency.clone(),
        );
    }

    pub(crate) fn attempt(&self, platform: &'static str, outcome: &'static str) {
        self.attempts
            .get_or_create(&AttemptLabels { platform, outcome })
            .inc();
    }
}
