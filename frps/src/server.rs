//! Binding the four listeners, running them, shutting down gracefully.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::api;
use crate::config::Config;
use crate::listeners::{self, control, proxy, public};
use crate::state::State;

/// The addresses the listeners actually bound (a port of 0 becomes a real one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundAddrs {
    /// Control port.
    pub control: SocketAddr,
    /// Proxy (dial-back) port.
    pub proxy: SocketAddr,
    /// Public port.
    pub public: SocketAddr,
    /// Management API port.
    pub api: SocketAddr,
}

/// A bound, not yet running, server.
pub struct Server {
    state: Arc<State>,
    control: TcpListener,
    proxy: TcpListener,
    public: TcpListener,
    /// Whether sockets `public` accepts have `TCP_NODELAY` from it.
    public_nodelay: bool,
    api: TcpListener,
    addrs: BoundAddrs,
}

/// Whether an `Authorization: Bearer` header can carry `token` as the API
/// reads it (trimmed): visible ASCII, with spaces and tabs only inside.
fn presentable(token: &str) -> bool {
    token.trim() == token
        && token
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
}

async fn bind(what: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind the {what} port on {addr}"))
}

impl Server {
    /// Binds every listener from `config`.
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
        if let Some(key) = config.api_key.as_deref().filter(|k| !k.is_empty())
            && !presentable(key)
        {
            anyhow::bail!(
                "the static API key (--api-key or API_KEY) begins or ends with a space, or holds a control character (a line end left from the file it came from?) or a non-ASCII character: a request cannot present it. Use visible ASCII (`openssl rand -hex 32`)"
            );
        }
        match config.admin_token() {
            // A header carries visible ASCII, spaces and tabs only, and
            // frps trims what it is sent: such a token (one read with the
            // `\r` of a CRLF env file, say) could never be presented.
            Some(token) if !presentable(token) => anyhow::bail!(
                "the admin token begins or ends with a space, or holds a control character (a line end left from the file it came from?) or a non-ASCII character: a request cannot present it. Use visible ASCII (`openssl rand -hex 32`)"
            ),
            None if !config.api_bind.is_loopback() => anyhow::bail!(
                "refusing to expose the management API on {} without an admin token: it lists the fleet and can disconnect clients. Set --admin-token (or FRPX_ADMIN_TOKEN), or keep --api-bind on 127.0.0.1",
                config.api_bind
            ),
            Some(token)
                if !config.api_bind.is_loopback()
                    && token.chars().count() < crate::api::STRONG_ADMIN_TOKEN =>
            {
                anyhow::bail!(
                    "refusing to expose the management API on {} with an admin token of under {} characters: from many addresses it could be guessed. Use a long random one (`openssl rand -hex 32`), or keep --api-bind on 127.0.0.1",
                    config.api_bind,
                    crate::api::STRONG_ADMIN_TOKEN
                )
            }
            None => tracing::warn!(
                "the management API has no admin token: any process on this machine can use it (list the fleet, disconnect clients); set --admin-token (FRPX_ADMIN_TOKEN) where others share the machine, and before putting a reverse proxy in front of it"
            ),
            Some(token) if token.chars().count() < crate::api::STRONG_ADMIN_TOKEN => {
                tracing::warn!(
                    "the admin token has under {} characters: fine for this machine's own tools, but behind a reverse proxy every caller shares the proxy's address and its budget of guesses, and the right token is refused with them while that budget is spent. Use a long random one (`openssl rand -hex 32`) before exposing the API",
                    crate::api::STRONG_ADMIN_TOKEN
                )
            }
            Some(_) => {}
        }
        if config.tls_self_signed && config.tls_cert.is_some() {
            anyhow::bail!(
                "--tls-self-signed and --tls-cert both ask for TLS on the control and proxy ports: choose one"
            );
        }
        if config.max_buffered_bodies < config.max_body {
            anyhow::bail!(
                "--max-buffered-bodies ({}) is below --max-body ({}): a body of the largest allowed size could never be read",
                config.max_buffered_bodies,
                config.max_body
            );
        }
        let control = bind("control", (config.bind_addr, config.control_port).into()).await?;
        let proxy = bind("proxy", (config.bind_addr, config.proxy_port).into()).await?;
        let public_addr: SocketAddr = (config.bind_addr, config.public_port).into();
        // Every public connection wants TCP_NODELAY: taken from the listener.
        let (public, public_nodelay) = common::stream::listen_with_nodelay(public_addr)
            .with_context(|| format!("cannot bind the public port on {public_addr}"))?;
        let api = bind("API", (config.api_bind, config.api_port).into()).await?;
        let addrs = BoundAddrs {
            control: control.local_addr()?,
            proxy: proxy.local_addr()?,
            public: public.local_addr()?,
            api: api.local_addr()?,
        };
        Ok(Self {
            state: Arc::new(State::new(config, addrs).await?),
            control,
            proxy,
            public,
            public_nodelay,
            api,
            addrs,
        })
    }

    /// The bound addresses.
    pub fn addrs(&self) -> BoundAddrs {
        self.addrs
    }

    /// The shared state (for embedding and tests).
    pub fn state(&self) -> Arc<State> {
        self.state.clone()
    }

    /// Serves until `state().shutdown` is cancelled, then drains in-flight
    /// requests for at most `--shutdown-timeout` and returns (past that
    /// deadline, after at most `GOODBYE` (1 s) for client sessions to end and
    /// `HARD_STOP_GRACE` (5 s) for every other task).
    pub async fn run(self) -> anyhow::Result<()> {
        let Server {
            state,
            control,
            proxy,
            public,
            public_nodelay,
            api,
            addrs,
        } = self;
        // Should this future be dropped before its end (an embedding
        // program's `select!`, an aborted task), everything it started
        // stops all the same rather than serve on with nobody to stop it.
        let _stop_on_drop = (
            state.shutdown.clone().drop_guard(),
            state.drained.clone().drop_guard(),
            state.hard_stop.clone().drop_guard(),
        );
        info!(
            "frps listening: control {}, proxy {}, public {}, api {}",
            addrs.control, addrs.proxy, addrs.public, addrs.api
        );
        state.tls.log_at_start();
        state.tasks.spawn(crate::tls::watch_dates(
            state.tls.dates.clone(),
            state.shutdown.clone(),
        ));
        // New clients are turned away once shutdown starts; dial-backs are
        // taken until the public port has drained.
        state.tasks.spawn(listeners::accept_loop(
            "control",
            control,
            state.shutdown.clone(),
            state.clone(),
            control::handle,
        ));
        state.tasks.spawn(listeners::accept_loop(
            "proxy",
            proxy,
            state.drained.clone(),
            state.clone(),
            proxy::handle,
        ));
        state
            .tasks
            .spawn(public::run(public, public_nodelay, state.clone()));
        state.tasks.spawn(trim_after_bursts(state.clone()));
        state.tasks.spawn(purge_dead_tokens(state.clone()));
        state.tasks.spawn(prune_request_series(state.clone()));
        state
            .tasks
            .spawn(crate::upstream::expire_idle(state.clone()));
        let app = api::router(state.clone());
        // Open while the public port drains: /api/health says
        // `shutting_down`, and /metrics shows the drain.
        state.tasks.spawn(listeners::accept_loop(
            "API",
            api,
            state.drained.clone(),
            state.clone(),
            move |stream, peer, state| api::serve_conn(stream, peer, state, app.clone()),
        ));

        state.shutdown.cancelled().await;
        info!(
            "shutting down: draining in-flight requests (up to {:?})",
            state.config.shutdown_timeout
        );
        state.tasks.close();
        if tokio::time::timeout(state.config.shutdown_timeout, state.tasks.wait())
            .await
            .is_err()
        {
            warn!("shutdown deadline passed; closing remaining connections");
            // Clients hear why, and their sessions clean up (marking their
            // machines offline), before every connection closes.
            state.drained.cancel();
            state.sessions.close();
            let _ = tokio::time::timeout(GOODBYE, state.sessions.wait()).await;
        }
        state.hard_stop.cancel();
        for client in state.registry.all() {
            client.idle.close();
        }
        // Everything watches `hard_stop`; should anything still not end,
        // frps stops anyway rather than hang.
        if tokio::time::timeout(HARD_STOP_GRACE, state.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                "{} tasks still running {HARD_STOP_GRACE:?} after the shutdown deadline; stopping anyway",
                state.tasks.len()
            );
        }
        // Its connections end cleanly (PostgreSQL logs no lost client;
        // SQLite checkpoints its log); one still held by a task that did
        // not end is not waited for.
        if tokio::time::timeout(HARD_STOP_GRACE, state.store.close())
            .await
            .is_err()
        {
            warn!("the database pool did not close within {HARD_STOP_GRACE:?}; stopping anyway");
        }
        info!("frps stopped");
        Ok(())
    }
}

/// How long revoked and expired client tokens stay listed before they are
/// deleted.
pub const DEAD_TOKENS_KEPT: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// At start and then daily, deletes client tokens revoked or expired more
/// than [`DEAD_TOKENS_KEPT`] ago (every password login adds one, so the
/// table would otherwise only grow).
async fn purge_dead_tokens(state: Arc<State>) {
    let period = std::time::Duration::from_secs(24 * 3600);
    crate::periodic::every(period, &state.shutdown, || async {
        let keep = chrono::Duration::from_std(DEAD_TOKENS_KEPT).expect("30 days");
        let cutoff = chrono::Utc::now().naive_utc() - keep;
        match state.store.purge_client_tokens(cutoff).await {
            Ok(0) => {}
            Ok(n) => info!("deleted {n} client tokens revoked or expired over 30 days ago"),
            Err(e) => warn!("cannot delete old client tokens: {e}"),
        }
    })
    .await;
}

/// Every [`crate::metrics::PRUNE_EVERY`], removes the request series of
/// clients gone for [`crate::metrics::GONE_SERIES_KEPT`].
async fn prune_request_series(state: Arc<State>) {
    crate::periodic::every(crate::metrics::PRUNE_EVERY, &state.shutdown, || async {
        state.metrics.prune(|id| state.registry.get(id).is_some());
    })
    .await;
}

/// How long tasks get to end after the shutdown deadline has closed every
/// connection.
const HARD_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// How long client sessions get, after the drain deadline, to send their
/// `Disconnect` and clean up before every connection is closed.
const GOODBYE: std::time::Duration = std::time::Duration::from_secs(1);

/// Four times a second, looks at the open public connections (and their
/// peak since the last look), the registered clients and the traffic, and
/// gives memory back as `common::memory::Watch` says: when a burst of
/// public connections has ended, closes the idle upstream connections each
/// client holds beyond `--pool-idle-after-burst`, then trims the heap
/// (`common::memory::trim`, on a blocking thread) a look later; when a
/// burst of clients has left or enough traffic has stopped, trims at once.
async fn trim_after_bursts(state: Arc<State>) {
    let mut watch = common::memory::Watch::default();
    let period = std::time::Duration::from_millis(250);
    crate::periodic::every(period, &state.shutdown, || {
        let stats = &state.stats;
        let public = stats.public_connections.load(Ordering::Relaxed);
        // The peak starts again from what is open now.
        let public_peak = stats
            .public_connections_peak
            .swap(public, Ordering::Relaxed);
        let load = |n: &std::sync::atomic::AtomicU64| n.load(Ordering::Relaxed);
        let verdict = watch.observe(common::memory::Sample {
            public,
            public_peak,
            clients: state.registry.len() as u64,
            requests: load(&stats.requests),
            bytes: load(&stats.bytes_in).wrapping_add(load(&stats.bytes_out)),
        });
        if verdict.shrink_pools {
            let keep = state.config.pool_idle_after_burst;
            let closed: usize = state
                .registry
                .all()
                .iter()
                .map(|c| c.idle.shrink(keep))
                .sum();
            debug!(
                public,
                closed, "burst ended: closed the surplus idle upstream connections"
            );
        }
        async move {
            if verdict.trim {
                let _ = tokio::task::spawn_blocking(common::memory::trim).await;
            }
        }
    })
    .await;
}
