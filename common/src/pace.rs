//! Letting an event through at most once per interval: log lines and
//! commands a peer can send without pause.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Lets through one event per `every` (tokio's clock, so tests can pause
/// it).
#[derive(Debug)]
pub struct Pace {
    every: Duration,
    last: Option<Instant>,
}

impl Pace {
    /// A pace letting the first event through.
    pub const fn new(every: Duration) -> Self {
        Self { every, last: None }
    }

    /// Whether an event now is let through (and counted as the last).
    pub fn admit(&mut self) -> bool {
        let now = Instant::now();
        if self.last.is_some_and(|at| now - at < self.every) {
            return false;
        }
        self.last = Some(now);
        true
    }
}

/// A [`Pace`] that threads share (a lock around it).
#[derive(Debug)]
pub struct SharedPace(Mutex<Pace>);

impl SharedPace {
    /// A shared pace letting the first event through.
    pub const fn new(every: Duration) -> Self {
        Self(Mutex::new(Pace::new(every)))
    }

    /// Whether an event now is let through (and counted as the last).
    pub fn admit(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_event_per_interval_is_let_through() {
        let every = Duration::from_secs(1);
        let mut pace = Pace::new(every);
        assert!(pace.admit());
        assert!(!pace.admit());
        tokio::time::advance(every - Duration::from_millis(1)).await;
        assert!(!pace.admit());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(pace.admit());
        assert!(!pace.admit());
    }
}
