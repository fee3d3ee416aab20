//! Who may make the SFS write, and how much an anonymous client may ask of it.
//!
//! Nothing reaches the log for an app instance until its first PIN registration, and that
//! one needs an enrolment a countersign server authorised: [`Enrolments`] answers whether an
//! account of the app instance was enrolled (in `countersign serve`, the accounts read model
//! of the deployment's NS). A hello, a refused registration, a login of an unknown app
//! instance: none of them appends anything.
//!
//! What stays anonymous (a hello of an app instance with no PIN registered, and every request
//! on such a channel) still costs a stream read, Noise and OPAQUE work, and an enrolment
//! query; [`Limiter`] bounds it with token buckets, one per client address (IPv6 by /64) and
//! one for everyone, in bounded memory: at most [`AnonymousLimits::max_addresses`] buckets,
//! full ones evicted first, the rest sharing one overflow bucket. A registered app instance
//! is never limited here (its lockout policy counts its attempts).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Mutex;

use countersign_domain::AppInstanceId;
use futures::future::BoxFuture;

/// The enrolment check failed (the NS's store did not answer). Internal: the request answers
/// `internal` and writes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("enrolment check: {0}")]
pub struct EnrolmentError(pub String);

/// Whether a countersign server enrolled an account of an app instance: the authorisation a
/// first PIN registration needs.
pub trait Enrolments: Send + Sync + fmt::Debug {
    /// `true` when an account of `app` was enrolled (an enrolment code the business system
    /// created was redeemed by this app instance). Must see enrolments acknowledged before
    /// the call (read your writes): the app registers its PIN right after enrolling.
    fn enrolled(&self, app: AppInstanceId) -> BoxFuture<'_, Result<bool, EnrolmentError>>;
}

/// No enrolment is known: an SFS with this check registers no new app instance (it still
/// serves those registered already).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoEnrolments;

impl Enrolments for NoEnrolments {
    fn enrolled(&self, _: AppInstanceId) -> BoxFuture<'_, Result<bool, EnrolmentError>> {
        Box::pin(async { Ok(false) })
    }
}

/// A token bucket's size and refill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Tokens when full (the burst).
    pub burst: u32,
    /// Tokens added per second.
    pub per_second: u32,
}

/// The budget of anonymous work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnonymousLimits {
    /// Per client address (IPv6: per /64).
    pub per_address: Rate,
    /// For all anonymous clients together.
    pub global: Rate,
    /// At most this many per-address buckets are kept.
    pub max_addresses: usize,
}

impl Default for AnonymousLimits {
    /// 20 then 2 per second per address; 500 then 100 per second in all; 10,000 addresses.
    /// An app's onboarding takes about four (two hellos, the two registration steps).
    fn default() -> Self {
        Self {
            per_address: Rate {
                burst: 20,
                per_second: 2,
            },
            global: Rate {
                burst: 500,
                per_second: 100,
            },
            max_addresses: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Thousandths of a token.
    milli: u64,
    at_ms: i64,
}

impl Bucket {
    fn full(rate: Rate, now_ms: i64) -> Self {
        Self {
            milli: u64::from(rate.burst) * 1000,
            at_ms: now_ms,
        }
    }

    fn refill(&mut self, rate: Rate, now_ms: i64) {
        let elapsed = u64::try_from(now_ms.saturating_sub(self.at_ms)).unwrap_or(0);
        let cap = u64::from(rate.burst) * 1000;
        self.milli = self
            .milli
            .saturating_add(elapsed.saturating_mul(u64::from(rate.per_second)))
            .min(cap);
        self.at_ms = self.at_ms.max(now_ms);
    }

    fn is_full(&self, rate: Rate) -> bool {
        self.milli >= u64::from(rate.burst) * 1000
    }

    fn has_token(&self) -> bool {
        self.milli >= 1000
    }
}

struct Buckets {
    global: Bucket,
    overflow: Bucket,
    addresses: HashMap<IpAddr, Bucket>,
}

/// Token buckets for anonymous work (see the module's documentation).
pub(crate) struct Limiter {
    limits: AnonymousLimits,
    buckets: Mutex<Option<Buckets>>,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// The bucket key of an address: IPv6 addresses by their /64, which one host usually holds.
fn key_of(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

impl Limiter {
    pub(crate) fn new(limits: AnonymousLimits) -> Self {
        Self {
            limits,
            buckets: Mutex::new(None),
        }
    }

    /// Takes one token for anonymous work by `peer` (`None`: the address is not known, and
    /// the work counts against the overflow bucket). `false`: refuse it.
    pub(crate) fn take(&self, peer: Option<IpAddr>, now_ms: i64) -> bool {
        let limits = self.limits;
        // A poisoned lock only means another thread panicked while counting; the counts
        // are still counts.
        let mut guard = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let buckets = guard.get_or_insert_with(|| Buckets {
            global: Bucket::full(limits.global, now_ms),
            overflow: Bucket::full(limits.per_address, now_ms),
            addresses: HashMap::new(),
        });
        buckets.global.refill(limits.global, now_ms);
        if !buckets.global.has_token() {
            return false;
        }
        let key = peer.map(key_of);
        if let Some(key) = key
            && !buckets.addresses.contains_key(&key)
            && buckets.addresses.len() >= limits.max_addresses
        {
            // Full buckets say nothing an absent one does not: forget them first.
            buckets.addresses.retain(|_, bucket| {
                bucket.refill(limits.per_address, now_ms);
                !bucket.is_full(limits.per_address)
            });
        }
        let bucket = match key {
            Some(key)
                if buckets.addresses.contains_key(&key)
                    || buckets.addresses.len() < limits.max_addresses =>
            {
                buckets
                    .addresses
                    .entry(key)
                    .or_insert_with(|| Bucket::full(limits.per_address, now_ms))
            }
            _ => &mut buckets.overflow,
        };
        bucket.refill(limits.per_address, now_ms);
        if !bucket.has_token() {
            return false;
        }
        bucket.milli -= 1000;
        buckets.global.milli -= 1000;
        true
    }

    /// How many per-address buckets are kept (for tests of the memory bound).
    #[cfg(test)]
    pub(crate) fn addresses(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map_or(0, |b| b.addresses.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: AnonymousLimits = AnonymousLimits {
        per_address: Rate {
            burst: 3,
            per_second: 1,
        },
        global: Rate {
            burst: 5,
            per_second: 2,
        },
        max_addresses: 4,
    };

    fn ip(n: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 0, n]))
    }

    #[test]
    fn an_address_gets_its_burst_then_its_rate() {
        let limiter = Limiter::new(LIMITS);
        assert_eq!((0..4).filter(|_| limiter.take(ip(1), 0)).count(), 3);
        assert!(!limiter.take(ip(1), 999));
        assert!(limiter.take(ip(1), 1_000));
        assert!(!limiter.take(ip(1), 1_000));
        // Another address has its own bucket, within the global one.
        assert!(limiter.take(ip(2), 1_000));
    }

    #[test]
    fn the_global_bucket_bounds_all_addresses_together() {
        let limiter = Limiter::new(LIMITS);
        let taken = (1..=4)
            .flat_map(|n| [n, n, n])
            .filter(|&n| limiter.take(ip(n), 0))
            .count();
        assert_eq!(taken, 5);
        assert!(!limiter.take(ip(9), 0));
        assert!(limiter.take(ip(9), 500));
    }

    #[test]
    fn memory_stays_bounded_and_ipv6_counts_by_prefix() {
        let limiter = Limiter::new(AnonymousLimits {
            global: Rate {
                burst: 10_000,
                per_second: 10_000,
            },
            ..LIMITS
        });
        for n in 0..=255 {
            limiter.take(ip(n), 0);
        }
        assert!(limiter.addresses() <= 4);
        // Beyond the bound, strangers share the overflow bucket (its burst is 3).
        assert_eq!((0..10).filter(|_| limiter.take(ip(200), 0)).count(), 0);
        // Once their buckets refill, known addresses are forgotten and room is made.
        assert!(limiter.take(ip(200), 10_000));
        assert!(limiter.addresses() <= 4);

        let limiter = Limiter::new(LIMITS);
        let host = |low: u16| Some(IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, low]));
        assert_eq!((0..6).filter(|n| limiter.take(host(*n), 0)).count(), 3);
        assert_eq!(limiter.addresses(), 1);
    }
}
