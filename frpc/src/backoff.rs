//! Reconnect delays: exponential with jitter, so a fleet does not reconnect
//! in lockstep after a server restart.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff from `min` doubling to `max`, each delay jittered by ±20 %.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// A backoff starting at `min`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            current: min,
        }
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let delay = jittered(base);
        // Clipped at the cap, half the delays there would be the cap
        // itself: a fleet retrying at the cap in lockstep.
        if delay > self.max {
            at_most(self.max)
        } else {
            delay
        }
    }

    /// Starts over from `min` (after a successful registration).
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

/// `delay` jittered by ±20 %: clients that lost their connections at once
/// (a frps restart) do not all come back in the same instant.
pub fn jittered(delay: Duration) -> Duration {
    delay.mul_f64(rand::rng().random_range(0.8..=1.2))
}

/// A delay between all of `least` and 20 % more, spread evenly: clients
/// told the same wait (frps's `retry_after_ms`) do not all come back in
/// the same instant to be refused together again.
pub fn at_least(least: Duration) -> Duration {
    least.mul_f64(rand::rng().random_range(1.0..=1.2))
}

/// A delay between 80 % and all of `max`, spread evenly.
pub fn at_most(max: Duration) -> Duration {
    max.mul_f64(rand::rng().random_range(0.8..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let delays: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        let within = |d: Duration, base: f64| {
            let s = d.as_secs_f64();
            s >= base * 0.8 - 1e-9 && s <= (base * 1.2).min(30.0) + 1e-9
        };
        for (d, base) in delays
            .iter()
            .zip([1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0])
        {
            assert!(within(*d, base), "{d:?} not around {base}");
        }
        b.reset();
        assert!(within(b.next_delay(), 1.0));
    }

    #[test]
    fn waits_frps_asks_for_are_kept_and_spread_above() {
        let least = Duration::from_secs(1);
        let waits: Vec<Duration> = (0..200).map(|_| at_least(least)).collect();
        assert!(
            waits
                .iter()
                .all(|w| *w >= least && *w <= least.mul_f64(1.2))
        );
        let spread = waits
            .iter()
            .max()
            .unwrap()
            .saturating_sub(*waits.iter().min().unwrap());
        assert!(spread > Duration::from_millis(100), "{spread:?}");
    }

    #[test]
    fn delays_at_the_cap_are_spread_below_it() {
        let max = Duration::from_secs(30);
        let mut b = Backoff::new(Duration::from_secs(1), max);
        for _ in 0..6 {
            b.next_delay();
        }
        let delays: Vec<_> = (0..1000).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= max && *d >= max.mul_f64(0.8)));
        let at_cap = delays.iter().filter(|d| **d == max).count();
        assert!(at_cap < 50, "{at_cap} of 1000 at the cap itself");
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(distinct.len() > 900);
    }

    #[test]
    fn jitter_spreads_a_fleet() {
        let delays: std::collections::HashSet<_> = (0..20)
            .map(|_| Backoff::new(Duration::from_secs(1), Duration::from_secs(30)).next_delay())
            .collect();
        assert!(delays.len() > 10);
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        let base = Duration::from_secs(10);
        let delays: Vec<_> = (0..200).map(|_| jittered(base)).collect();
        assert!(
            delays
                .iter()
                .all(|d| (Duration::from_secs(8)..=Duration::from_secs(12)).contains(d))
        );
        // Spread, not one value.
        let (min, max) = (delays.iter().min().unwrap(), delays.iter().max().unwrap());
        assert!(*max - *min > Duration::from_secs(1), "{min:?}..{max:?}");
    }
}
