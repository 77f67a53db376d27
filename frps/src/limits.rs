//! Caps on concurrent connections, in total and per source address, so one
//! peer (or a flood) cannot starve everyone else. Over the cap a connection
//! is answered and closed at once rather than accepted and left waiting.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

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
}
