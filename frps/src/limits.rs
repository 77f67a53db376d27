//! Caps on concurrent connections, in total and per source address, so one
//! peer (or a flood) cannot starve everyone else. Over the cap a connection
//! is answered and closed at once rather than accepted and left waiting.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

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

    /// Takes a place for a connection from `ip`.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnGuard, Over> {
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
}
