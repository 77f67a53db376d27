//! Caps on concurrent connections, in total and per source address, so one
//! peer (or a flood) cannot starve everyone else. Over the cap a connection
//! is answered and closed at once rather than accepted and left waiting.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The block of addresses one peer is counted as: an IPv4 address (also
/// when it arrives IPv4-mapped over IPv6) is itself; an IPv6 address counts
/// as its /64, which one host or home usually holds whole (else a single
/// host could take a new address per connection).
pub fn address_block(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut bits = v6.octets();
            bits[8..].fill(0);
            IpAddr::V6(std::net::Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// Counts open connections of one listener.
#[derive(Debug)]
pub struct ConnLimiter {
    total_max: usize,
    per_ip_max: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// The listener has `--max-connections` open.
    Total,
    /// This address has `--max-connections-per-ip` open.
    PerIp,
}

impl Over {
    /// An English explanation.
    pub fn reason(self) -> &'static str {
        match self {
            Over::Total => "the server has too many open connections; retry shortly",
            Over::PerIp => "too many open connections from your address; close some and retry",
        }
    }
}

/// One open connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnGuard {
    limiter: Arc<ConnLimiter>,
    ip: IpAddr,
}

impl ConnLimiter {
    /// A limiter allowing `total_max` connections, `per_ip_max` per address.
    pub fn new(total_max: usize, per_ip_max: usize) -> Arc<Self> {
        Arc::new(Self {
            total_max,
            per_ip_max,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    /// Takes a place for a connection from `ip` (counted with the rest of
    /// its [`address_block`]).
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnGuard, Over> {
        let ip = address_block(ip);
        let mut open = self.open.lock().expect("limiter lock");
        if open.0 >= self.total_max {
            return Err(Over::Total);
        }
        let n = open.1.entry(ip).or_insert(0);
        if *n >= self.per_ip_max {
            return Err(Over::PerIp);
        }
        *n += 1;
        open.0 += 1;
        Ok(ConnGuard {
            limiter: self.clone(),
            ip,
        })
    }

    /// Open connections.
    pub fn open(&self) -> usize {
        self.open.lock().expect("limiter lock").0
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut open = self.limiter.open.lock().expect("limiter lock");
        open.0 -= 1;
        if let Some(n) = open.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.ip);
            }
        }
    }
}

/// Addresses a [`FailureBudget`] tracks at most; past that, an address not
/// yet tracked is not limited (memory stays bounded under a flood from many
/// addresses, which the connection caps still bound).
pub const MAX_TRACKED_ADDRESSES: usize = 100_000;

/// A budget of failed API-key lookups per address block, refilled evenly
/// over a minute (a token bucket holding a minute's worth): an unknown key
/// costs frps a Redis and a database query, which a caller guessing keys
/// must not be able to ask for at the speed of its connection. A lookup
/// takes one before asking and gives it back when the key is valid (or the
/// database could not be asked); an address whose budget is spent is
/// refused before anything is asked until one refills. Keys frps already
/// knows (cached) never touch it.
#[derive(Debug)]
pub struct FailureBudget {
    per_minute: u32,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Lookups left at `at`.
    left: f64,
    at: tokio::time::Instant,
}

impl FailureBudget {
    /// A budget of `per_minute` failed lookups per address block (at least 1).
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute: per_minute.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn refilled(&self, bucket: Bucket, now: tokio::time::Instant) -> f64 {
        let rate = f64::from(self.per_minute) / 60.0;
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        (bucket.left + elapsed * rate).min(f64::from(self.per_minute))
    }

    /// Takes one lookup for `ip`'s block, or says how long until one is
    /// free again.
    pub fn take(&self, ip: IpAddr, now: tokio::time::Instant) -> Result<(), Duration> {
        let ip = address_block(ip);
        let mut buckets = self.buckets.lock().expect("failure budget lock");
        let left = match buckets.get(&ip) {
            Some(&bucket) => self.refilled(bucket, now),
            None => {
                if buckets.len() >= MAX_TRACKED_ADDRESSES {
                    // Forget the blocks whose budget is whole again.
                    let full = f64::from(self.per_minute);
                    buckets.retain(|_, b| self.refilled(*b, now) < full);
                    if buckets.len() >= MAX_TRACKED_ADDRESSES {
                        return Ok(());
                    }
                }
                f64::from(self.per_minute)
            }
        };
        if left < 1.0 {
            let rate = f64::from(self.per_minute) / 60.0;
            return Err(Duration::from_secs_f64((1.0 - left) / rate));
        }
        buckets.insert(
            ip,
            Bucket {
                left: left - 1.0,
                at: now,
            },
        );
        Ok(())
    }

    /// Gives back a lookup [`take`](Self::take) took (the key was valid).
    pub fn give_back(&self, ip: IpAddr, now: tokio::time::Instant) {
        let ip = address_block(ip);
        let mut buckets = self.buckets.lock().expect("failure budget lock");
        let full = f64::from(self.per_minute);
        let Some(&bucket) = buckets.get(&ip) else {
            return;
        };
        let left = self.refilled(bucket, now) + 1.0;
        if left >= full {
            buckets.remove(&ip);
        } else {
            buckets.insert(ip, Bucket { left, at: now });
        }
    }

    /// Address blocks tracked now (for tests and diagnostics).
    pub fn tracked(&self) -> usize {
        self.buckets.lock().expect("failure budget lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_in_total_and_per_address() {
        let l = ConnLimiter::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let g1 = l.try_acquire(a).unwrap();
        let _g2 = l.try_acquire(a).unwrap();
        assert_eq!(l.try_acquire(a).unwrap_err(), Over::PerIp);
        let _g3 = l.try_acquire(b).unwrap();
        assert_eq!(l.try_acquire(b).unwrap_err(), Over::Total);
        drop(g1);
        assert_eq!(l.open(), 2);
        assert!(l.try_acquire(a).is_ok());
    }

    #[test]
    fn an_ipv6_slash_64_is_one_peer_and_a_mapped_ipv4_is_its_ipv4() {
        let l = ConnLimiter::new(100, 2);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let _g1 = l.try_acquire(ip("2001:db8:1:2::1")).unwrap();
        let _g2 = l.try_acquire(ip("2001:db8:1:2:ffff::9")).unwrap();
        assert_eq!(
            l.try_acquire(ip("2001:db8:1:2:abcd:1:2:3")).unwrap_err(),
            Over::PerIp
        );
        assert!(l.try_acquire(ip("2001:db8:1:3::1")).is_ok(), "another /64");
        let _g3 = l.try_acquire(ip("192.0.2.1")).unwrap();
        let _g4 = l.try_acquire(ip("::ffff:192.0.2.1")).unwrap();
        assert_eq!(l.try_acquire(ip("192.0.2.1")).unwrap_err(), Over::PerIp);
        assert_eq!(address_block(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(address_block(ip("2001:db8::1:2:3:4")), ip("2001:db8::"));
    }

    #[test]
    fn the_failure_budget_refills_over_a_minute_and_valid_keys_cost_nothing() {
        let budget = FailureBudget::new(3);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a = ip("192.0.2.1");
        let t0 = tokio::time::Instant::now();
        for _ in 0..3 {
            budget.take(a, t0).unwrap();
        }
        // One refills every 20 s.
        let wait = budget.take(a, t0).unwrap_err();
        assert_eq!(wait.as_secs(), 20, "{wait:?}");
        let wait = budget.take(a, t0 + Duration::from_secs(15)).unwrap_err();
        assert_eq!(wait.as_secs(), 5, "{wait:?}");
        budget.take(a, t0 + Duration::from_secs(20)).unwrap();
        assert!(budget.take(a, t0 + Duration::from_secs(20)).is_err());
        // Another block has its own budget; the same /64 shares one.
        budget.take(ip("192.0.2.2"), t0).unwrap();
        let v6 = ip("2001:db8::1");
        for _ in 0..3 {
            budget.take(v6, t0).unwrap();
        }
        assert!(budget.take(ip("2001:db8::ffff:2"), t0).is_err());
        // Valid keys give theirs back: a budget is spent only by failures.
        let b = ip("198.51.100.7");
        for _ in 0..10 {
            budget.take(b, t0).unwrap();
            budget.give_back(b, t0);
        }
        assert_eq!(budget.tracked(), 3, "a whole budget is not kept");
        // A minute after its last failure an address's budget is whole.
        let later = t0 + Duration::from_secs(80);
        for _ in 0..3 {
            budget.take(a, later).unwrap();
        }
    }

    #[test]
    fn the_failure_budget_tracks_a_bounded_number_of_addresses() {
        let budget = FailureBudget::new(2);
        let t0 = tokio::time::Instant::now();
        for i in 0..MAX_TRACKED_ADDRESSES as u32 {
            budget.take(IpAddr::from(i.to_be_bytes()), t0).unwrap();
        }
        assert_eq!(budget.tracked(), MAX_TRACKED_ADDRESSES);
        // Full: an untracked address is let through, not remembered.
        let new = IpAddr::from([203, 0, 113, 9]);
        for _ in 0..5 {
            budget.take(new, t0).unwrap();
        }
        assert_eq!(budget.tracked(), MAX_TRACKED_ADDRESSES);
        // Once the old ones are whole again they make room.
        let later = t0 + Duration::from_secs(60);
        budget.take(new, later).unwrap();
        assert_eq!(budget.tracked(), 1);
    }
}
