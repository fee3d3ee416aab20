//! How much anonymous work (a hello without a mailbox, then `register`) the Message Center
//! does: token buckets, one per client address (IPv6 by /64) and one for everyone, in bounded
//! memory (at most [`AnonymousLimits::max_addresses`] buckets; full ones are forgotten first,
//! strangers beyond the bound share one overflow bucket). The same shape as the SFS's
//! admission limiter, kept separate so the MC depends on nothing of the SFS. Registered
//! mailboxes are never limited here.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// A token bucket's size and refill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Tokens when full (the burst).
    pub burst: u32,
    /// Tokens added per second.
    pub per_second: u32,
}

/// The budget of anonymous channels.
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
    /// 10 then 1 per second per address; 500 then 100 per second in all; 10,000 addresses.
    /// An app registers once.
    fn default() -> Self {
        Self {
            per_address: Rate {
                burst: 10,
                per_second: 1,
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
        self.milli = self
            .milli
            .saturating_add(elapsed.saturating_mul(u64::from(rate.per_second)))
            .min(u64::from(rate.burst) * 1000);
        self.at_ms = self.at_ms.max(now_ms);
    }

    fn is_full(&self, rate: Rate) -> bool {
        self.milli >= u64::from(rate.burst) * 1000
    }
}

#[derive(Debug)]
struct Buckets {
    global: Bucket,
    overflow: Bucket,
    addresses: HashMap<IpAddr, Bucket>,
}

/// Token buckets for anonymous work.
#[derive(Debug)]
pub(crate) struct Limiter {
    limits: AnonymousLimits,
    buckets: Mutex<Option<Buckets>>,
}

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

    /// Takes one token for anonymous work by `peer` (`None`: unknown address, counted in the
    /// overflow bucket). `false`: refuse it.
    pub(crate) fn take(&self, peer: Option<IpAddr>, now_ms: i64) -> bool {
        let limits = self.limits;
        // A poisoned lock only means another thread panicked while counting.
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
        if buckets.global.milli < 1000 {
            return false;
        }
        let key = peer.map(key_of);
        if let Some(key) = key
            && !buckets.addresses.contains_key(&key)
            && buckets.addresses.len() >= limits.max_addresses
        {
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
        if bucket.milli < 1000 {
            return false;
        }
        bucket.milli -= 1000;
        buckets.global.milli -= 1000;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: AnonymousLimits = AnonymousLimits {
        per_address: Rate {
            burst: 2,
            per_second: 1,
        },
        global: Rate {
            burst: 3,
            per_second: 1,
        },
        max_addresses: 2,
    };

    fn ip(n: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 0, n]))
    }

    #[test]
    fn per_address_then_global() {
        let limiter = Limiter::new(LIMITS);
        assert!(limiter.take(ip(1), 0));
        assert!(limiter.take(ip(1), 0));
        assert!(!limiter.take(ip(1), 0));
        assert!(limiter.take(ip(2), 0));
        // The global bucket (3) is empty now, whoever asks.
        assert!(!limiter.take(ip(3), 0));
        assert!(limiter.take(ip(3), 1_000));
        assert!(limiter.take(ip(1), 2_000));
    }
}
