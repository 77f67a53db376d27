//! The one shared state every listener and handler works on.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{KeyValidator, ProviderAuth};
use crate::config::Config;
use crate::pending::Pending;
use crate::registry::Registry;

/// Shared server state, behind one `Arc`.
#[derive(Debug)]
pub struct State {
    /// Effective configuration.
    pub config: Config,
    /// Live clients.
    pub registry: Registry,
    /// Data connections requested and not yet dialed back.
    pub pending: Arc<Pending>,
    /// Consumer API keys (public port).
    pub keys: KeyValidator,
    /// Provider credentials (control port).
    pub providers: ProviderAuth,
    /// Counters.
    pub stats: Stats,
    /// When the server started.
    pub started_at: Instant,
    /// Cancelled when shutdown begins: listeners stop accepting.
    pub shutdown: CancellationToken,
    /// Cancelled when the drain deadline passes: everything stops.
    pub hard_stop: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tasks: TaskTracker,
}

impl State {
    /// Builds the state for `config`.
    pub fn new(config: Config) -> Self {
        Self {
            keys: KeyValidator::new(config.api_key.clone()),
            providers: ProviderAuth::new(config.client_secret.clone()),
            config,
            registry: Registry::default(),
            pending: Arc::default(),
            stats: Stats::default(),
            started_at: Instant::now(),
            shutdown: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }
}

/// Server-wide counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Public requests received.
    pub requests: AtomicU64,
    /// Public requests refused for a missing or invalid key.
    pub auth_failures: AtomicU64,
    /// Public requests that found no client online.
    pub no_client: AtomicU64,
    /// Public requests that failed reaching a client.
    pub upstream_errors: AtomicU64,
    /// Bytes received from callers (request bodies).
    pub bytes_in: AtomicU64,
    /// Bytes sent to callers (response bodies).
    pub bytes_out: AtomicU64,
}

impl Stats {
    /// Adds one to `counter`.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
