//! The three frame/HTTP listeners clients and consumers talk to. The
//! management API lives in [`crate::api`].

pub mod control;
pub mod head_clock;
pub mod models;
pub mod proxy;
pub mod public;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::limits::ConnLimiter;
use crate::state::State;

/// Accepts connections until `until` is cancelled, serving each with
/// `handler` on the state's task tracker; connections over
/// `--max-connections` (in total or per address) are closed at once.
pub async fn accept_loop<F, Fut>(
    name: &'static str,
    listener: TcpListener,
    until: CancellationToken,
    state: Arc<State>,
    handler: F,
) where
    F: Fn(TcpStream, SocketAddr, Arc<State>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let limiter = ConnLimiter::new(
        state.config.max_connections,
        state.config.max_connections_per_ip,
    );
    let mut failures = AcceptFailures::default();
    loop {
        tokio::select! {
            _ = until.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let guard = match limiter.try_acquire(peer.ip()) {
                        Ok(g) => g,
                        Err(over) => {
                            debug!(%peer, "{name} connection refused: {}", over.reason());
                            drop(stream);
                            continue;
                        }
                    };
                    let hard_stop = state.hard_stop.clone();
                    let conn = handler(stream, peer, state.clone());
                    state.tasks.spawn(async move {
                        tokio::select! {
                            _ = conn => {}
                            _ = hard_stop.cancelled() => {}
                        }
                        drop(guard);
                    });
                }
                Err(e) => failures.failed(name, &e).await,
            },
        }
    }
}

/// How often a listener says its accepts fail.
const ACCEPT_FAILURE_LINE: Duration = Duration::from_secs(10);

/// Failed accepts of one listener (EMFILE and friends: out of file
/// descriptors, they fail at once, again and again, until connections
/// close): each is followed by a pause instead of a spin, and said in a
/// line at most every [`ACCEPT_FAILURE_LINE`], with how many failed since,
/// rather than twenty lines a second.
#[derive(Debug)]
pub struct AcceptFailures {
    pace: common::pace::Pace,
    unsaid: u64,
}

impl Default for AcceptFailures {
    fn default() -> Self {
        AcceptFailures {
            pace: common::pace::Pace::new(ACCEPT_FAILURE_LINE),
            unsaid: 0,
        }
    }
}

impl AcceptFailures {
    /// Counts one failure; the number to say (this one and those not said
    /// yet) when a line is due.
    fn note(&mut self) -> Option<u64> {
        self.unsaid += 1;
        self.pace.admit().then(|| std::mem::take(&mut self.unsaid))
    }

    /// Notes `e` from the listener `name`, and pauses.
    pub async fn failed(&mut self, name: &str, e: &std::io::Error) {
        if let Some(n) = self.note() {
            warn!(
                "{name} accept failed: {e} ({n} failed accepts since the last such line; retrying every 50 ms)"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn failed_accepts_are_said_every_ten_seconds_with_their_count() {
        let mut failures = AcceptFailures::default();
        // The first is said at once.
        assert_eq!(failures.note(), Some(1));
        // 50 ms apart, as the loop retries: 199 more in the next 10 s.
        let mut said = Vec::new();
        for _ in 0..400 {
            tokio::time::advance(Duration::from_millis(50)).await;
            if let Some(n) = failures.note() {
                said.push(n);
            }
        }
        assert_eq!(said, [200, 200]);
    }
}
