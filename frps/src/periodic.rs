//! Background chores that run on a fixed period until shutdown.

use std::future::Future;
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// Runs `chore` every `period` (the first time at once) until `stop` is
/// cancelled. A round that overruns the period delays the next one
/// instead of starting a catch-up burst; a round in progress when `stop`
/// fires is dropped where it waits (every chore is a single statement or
/// a look at memory: nothing is left half done), so a database that hangs
/// during shutdown does not hold it up to its deadline.
pub async fn every<F, Fut>(period: Duration, stop: &CancellationToken, mut chore: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = chore() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn runs_at_once_then_every_period_until_stopped() {
        let stop = CancellationToken::new();
        let rounds = Arc::new(AtomicU32::new(0));
        let task = tokio::spawn({
            let (stop, rounds) = (stop.clone(), rounds.clone());
            async move {
                every(Duration::from_secs(10), &stop, || {
                    rounds.fetch_add(1, Ordering::SeqCst);
                    async {}
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(rounds.load(Ordering::SeqCst), 1, "first round at once");
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert_eq!(rounds.load(Ordering::SeqCst), 3, "at 0, 10 and 20 s");
        stop.cancel();
        task.await.unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(rounds.load(Ordering::SeqCst), 3, "none after the stop");
    }

    /// A round that hangs (a database call during shutdown) ends with the
    /// stop, not when it would have.
    #[tokio::test(start_paused = true)]
    async fn a_hanging_round_ends_at_the_stop() {
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                every(Duration::from_secs(10), &stop, || {
                    std::future::pending::<()>()
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let stopped = tokio::time::Instant::now();
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("ended at the stop")
            .unwrap();
        assert_eq!(stopped.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_round_delays_the_next_without_a_catch_up_burst() {
        let stop = CancellationToken::new();
        let starts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let origin = tokio::time::Instant::now();
        let task = tokio::spawn({
            let (stop, starts) = (stop.clone(), starts.clone());
            async move {
                every(Duration::from_secs(10), &stop, || {
                    let starts = starts.clone();
                    async move {
                        let round = {
                            let mut s = starts.lock().unwrap();
                            s.push(origin.elapsed().as_secs());
                            s.len()
                        };
                        if round == 1 {
                            // Overruns two and a half periods.
                            tokio::time::sleep(Duration::from_secs(25)).await;
                        }
                    }
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_secs(45)).await;
        stop.cancel();
        task.await.unwrap();
        // 0, then at 25 the missed ticks are skipped: one round at once,
        // then back on the 10 s grid (30, 40).
        assert_eq!(*starts.lock().unwrap(), vec![0, 25, 30, 40]);
    }
}
