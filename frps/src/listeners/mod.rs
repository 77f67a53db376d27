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
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!("{name} accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}
