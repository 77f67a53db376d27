//! The one shared state every listener and handler works on.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use anyhow::Context;
use tracing::info;

use crate::auth::redis::RedisCache;
use crate::auth::{Accounts, KeyValidator};
use crate::config::Config;
use crate::dispatch::Queues;
use crate::metrics::Metrics;
use crate::pending::Pending;
use crate::plugins::Plugins;
use crate::ratelimit::RateLimiter;
use crate::registry::Registry;
use crate::server::BoundAddrs;
use crate::store::{Store, redact};

/// Shared server state, behind one `Arc`.
#[derive(Debug)]
pub struct State {
    /// Effective configuration.
    pub config: Config,
    /// The addresses the listeners bound.
    pub addrs: BoundAddrs,
    /// Live clients.
    pub registry: Registry,
    /// Data connections requested and not yet dialed back.
    pub pending: Arc<Pending>,
    /// The database.
    pub store: Store,
    /// Redis, when configured (it may be unreachable at any moment).
    pub redis: Option<Arc<RedisCache>>,
    /// Consumer API keys (public port).
    pub keys: Arc<KeyValidator>,
    /// Per-key rate limits (public port).
    pub rate_limits: Arc<RateLimiter>,
    /// Provider accounts and client tokens (control port).
    pub accounts: Accounts,
    /// Server plugins, by operation.
    pub plugins: Plugins,
    /// Counters.
    pub stats: Stats,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Requests waiting for capacity.
    pub queues: Queues,
    /// Bytes of request bodies frps may still hold in memory
    /// (`--max-buffered-bodies`): one permit per byte.
    pub body_budget: Arc<tokio::sync::Semaphore>,
    /// When the server started.
    pub started_at: Instant,
    /// Cancelled when shutdown begins: the public and control ports stop
    /// accepting (the proxy port stays open until [`State::drained`]).
    pub shutdown: CancellationToken,
    /// Cancelled once the public port has drained (every public connection
    /// ended) or the drain deadline passed: client sessions end and the
    /// proxy port closes. Until then, requests still in line can be served.
    pub drained: CancellationToken,
    /// Cancelled when the drain deadline passes: everything stops.
    pub hard_stop: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Control connections, up to the end of their clean-up (the
    /// `gpu_assets` offline write, the `CloseProxy` plugin call), so the
    /// drain deadline can let them finish it.
    pub sessions: TaskTracker,
    /// TLS of the control, proxy and public ports.
    pub tls: crate::tls::Tls,
    /// Wrong admin tokens each address block may present
    /// ([`crate::api::ADMIN_FAILURES_PER_MINUTE`]).
    pub admin_failures: crate::api::WrongTokens,
}

/// A state dropped without [`crate::server::Server::run`] ending (a server
/// bound and never run, an embedding program's) still stops the tasks
/// that last until shutdown (the Redis connection and its subscription) or
/// the hard stop (the rate limiter's lease refreshing).
impl Drop for State {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.hard_stop.cancel();
    }
}

impl State {
    /// Connects the database (running migrations) and starts the Redis
    /// layer for `config`.
    pub async fn new(config: Config, addrs: BoundAddrs) -> anyhow::Result<Self> {
        let tls = crate::tls::Tls::from_config(&config).context("cannot set up TLS")?;
        let store = Store::connect(&config.database_url)
            .await
            .with_context(|| {
                format!("cannot open the database {}", redact(&config.database_url))
            })?;
        info!(
            "database: {} ({})",
            store.backend(),
            redact(&config.database_url)
        );
        let shutdown = CancellationToken::new();
        let (revoked_tx, mut revoked_rx) = tokio::sync::mpsc::unbounded_channel();
        let redis = match config.redis() {
            Some(url) => {
                let on_revoke = Arc::new(move |hash| {
                    let _ = revoked_tx.send(hash);
                });
                let seal = crate::auth::redis::Seal::load(&store)
                    .await
                    .context("cannot read the Redis entry secret from the database")?;
                let redis = RedisCache::start(
                    url,
                    &config.redis_prefix,
                    seal,
                    on_revoke,
                    crate::auth::redis::Keepalive::default(),
                    shutdown.clone(),
                )
                .with_context(|| format!("invalid Redis URL {}", redact(url)))?;
                Some(redis)
            }
            None => {
                info!(
                    "Redis: none (--redis-url none): keys are cached in this process only, and revocations and rate limits are not shared with other frps"
                );
                None
            }
        };
        let mut keys =
            KeyValidator::new(config.api_key.clone(), Some(store.clone()), redis.clone());
        keys.set_failure_budget(config.key_failures_per_minute);
        keys.set_lookups_per_address(config.key_lookups_per_ip);
        let keys = Arc::new(keys);
        let forget = keys.clone();
        tokio::spawn(async move {
            while let Some(hash) = revoked_rx.recv().await {
                forget.forget(hash);
            }
        });
        let tasks = TaskTracker::new();
        let rate_limits = RateLimiter::new(config.rate_limit_window, redis.clone(), tasks.clone());
        let hard_stop = CancellationToken::new();
        tokio::spawn(rate_limits.clone().maintain(hard_stop.clone()));
        let body_budget = Arc::new(tokio::sync::Semaphore::new(config.max_buffered_bodies));
        Ok(Self {
            rate_limits,
            accounts: Accounts::new(Some(store.clone()), config.token_lifetime()),
            plugins: Plugins::new(
                &config.plugins,
                config.plugin_timeout,
                config.connect_timeout,
            ),
            keys,
            redis,
            store,
            config,
            addrs,
            registry: Registry::default(),
            pending: Arc::default(),
            stats: Stats::default(),
            metrics: Metrics::default(),
            queues: Queues::default(),
            body_budget,
            started_at: Instant::now(),
            shutdown,
            drained: CancellationToken::new(),
            hard_stop,
            tasks,
            sessions: TaskTracker::new(),
            tls,
            admin_failures: crate::api::WrongTokens::default(),
        })
    }
}

/// Server-wide counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Public requests received.
    pub requests: AtomicU64,
    /// Public requests refused for a missing or invalid key.
    pub auth_failures: AtomicU64,
    /// Public requests refused because key validation was unavailable.
    pub auth_unavailable: AtomicU64,
    /// Public requests that found no client online.
    pub no_client: AtomicU64,
    /// Public requests whose client did not dial back in time.
    pub dial_timeouts: AtomicU64,
    /// Public requests that failed reaching or talking to a client.
    pub upstream_errors: AtomicU64,
    /// Public requests refused because the fleet stayed at capacity (429).
    pub queue_rejections: AtomicU64,
    /// Public requests refused over their key's requests per minute (429).
    pub rate_limited_rpm: AtomicU64,
    /// Public requests refused over their key's concurrency limit (429).
    pub rate_limited_concurrency: AtomicU64,
    /// Public connections currently open.
    pub public_connections: AtomicU64,
    /// Most public connections open at once since the burst watcher last
    /// looked (it samples four times a second; a burst can be shorter).
    pub public_connections_peak: AtomicU64,
    /// Upstream connections opened by a dial-back.
    pub upstream_dial_backs: AtomicU64,
    /// Upstream connections opened as streams of a tunnel connection.
    pub upstream_streams: AtomicU64,
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

    /// Counts a public connection opened (and the peak with it).
    pub fn public_connection_opened(&self) {
        let open = self.public_connections.fetch_add(1, Ordering::Relaxed) + 1;
        self.public_connections_peak
            .fetch_max(open, Ordering::Relaxed);
    }
}
