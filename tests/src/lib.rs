//! End-to-end harness: frps, frpc and small HTTP backends in one process, on
//! port 0, with helpers to talk to them. Logs stay silent unless
//! `FRPX_TEST_LOG` is set (e.g. `FRPX_TEST_LOG=debug`).

pub mod backend;
pub mod fake;
pub mod http;
pub mod plugin;
pub mod process;
pub mod services;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use frps::state::State;
use frps::{BoundAddrs, Config, Server};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use backend::Backend;

/// The static consumer key every test frps accepts.
pub const API_KEY: &str = "test-consumer-key";
/// The provider account every test frps has.
pub const TEST_EMAIL: &str = "gpu-owner@example.com";
/// Its password.
pub const TEST_PASSWORD: &str = "correct horse battery staple";
/// Longest a test waits for anything.
pub const WAIT: Duration = Duration::from_secs(15);

/// Enables logs when `FRPX_TEST_LOG` is set.
pub fn init_logs() {
    if let Ok(filter) = std::env::var("FRPX_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

/// `body` whole, failing after [`WAIT`]: a body that stalls fails its
/// test instead of hanging the run.
pub async fn whole<B: hyper::body::Body>(body: B) -> Result<bytes::Bytes, B::Error> {
    use http_body_util::BodyExt;
    tokio::time::timeout(WAIT, body.collect())
        .await
        .expect("the body ended in time")
        .map(|b| b.to_bytes())
}

/// Polls `cond` until it holds (for state with no change signal), failing
/// after [`WAIT`].
pub async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let poll = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(WAIT, poll)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}

/// Like [`eventually`], for conditions that need `.await`.
pub async fn eventually_async<F, Fut>(what: &str, cond: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let poll = async {
        while !cond().await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(WAIT, poll)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}

/// Waits until `machine`'s `gpu_assets` row has `status` (and, when given,
/// the client name `name`).
pub async fn wait_for_asset(
    store: &frps::store::Store,
    machine: &str,
    status: &str,
    name: Option<&str>,
) {
    eventually_async(&format!("the asset is {status}"), || async {
        store.gpu_asset(machine).await.unwrap().is_some_and(|r| {
            r.status.as_deref() == Some(status) && name.is_none_or(|n| r.name.as_deref() == Some(n))
        })
    })
    .await;
}

/// A fresh embedded database URL in a temporary directory.
pub fn temp_sqlite_url() -> String {
    let dir = std::env::temp_dir().join("frpx-tests");
    std::fs::create_dir_all(&dir).expect("temp dir");
    format!("sqlite://{}/{}.db", dir.display(), uuid::Uuid::new_v4())
}

/// A test frps configuration: loopback, port 0, short timeouts, its own
/// SQLite database, no Redis.
pub fn frps_config() -> Config {
    let mut cfg = Config::ephemeral(API_KEY, &temp_sqlite_url());
    cfg.heartbeat_interval = Duration::from_millis(500);
    cfg.connect_timeout = Duration::from_secs(3);
    cfg.shutdown_timeout = Duration::from_secs(5);
    // The test backend's routes (/hold, /echo, ...) are no model API; the
    // default list has its own tests.
    cfg.forward_paths = vec![frps::paths::PathRule::All];
    cfg
}

/// A running frps.
pub struct Frps {
    /// Bound addresses.
    pub addrs: BoundAddrs,
    /// Shared state, for waiting on and inspecting the registry.
    pub state: Arc<State>,
    /// Id of the [`TEST_EMAIL`] account.
    pub user_id: i64,
    join: JoinHandle<anyhow::Result<()>>,
}

static TEST_PASSWORD_HASH: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| frps::auth::accounts::hash_password(TEST_PASSWORD));

impl Frps {
    /// Starts frps with `config`.
    pub async fn start(config: Config) -> Frps {
        init_logs();
        let server = Server::bind(config).await.expect("frps binds");
        let addrs = server.addrs();
        let state = server.state();
        let user_id = match state
            .store
            .find_user(TEST_EMAIL)
            .await
            .expect("user lookup")
        {
            Some(user) => user.id,
            None => {
                let hash = TEST_PASSWORD_HASH.clone();
                state
                    .store
                    .create_user(TEST_EMAIL, &hash)
                    .await
                    .expect("test user")
                    .id
            }
        };
        let join = tokio::spawn(server.run());
        Frps {
            addrs,
            state,
            user_id,
            join,
        }
    }

    /// Issues a client token for the test account, as a login would.
    pub async fn client_token(&self) -> String {
        self.client_token_of(self.user_id).await
    }

    /// Issues a client token for account `user_id`.
    pub async fn client_token_of(&self, user_id: i64) -> String {
        let s = frps::auth::secret::generate("frpxc");
        self.state
            .store
            .insert_client_token(&s.id, &s.hash_hex, &s.prefix, user_id, None, None)
            .await
            .expect("token");
        s.plaintext
    }

    /// Creates a second provider account, `email`, and issues it a client
    /// token.
    pub async fn other_account_token(&self, email: &str) -> String {
        let other = self
            .state
            .store
            .create_user(email, "not-a-real-hash")
            .await
            .expect("account");
        self.client_token_of(other.id).await
    }

    /// Starts frps with [`frps_config`].
    pub async fn start_default() -> Frps {
        Frps::start(frps_config()).await
    }

    /// The machine id client `id` registered with (it must be online).
    pub fn machine_id(&self, id: &str) -> String {
        let client = self.state.registry.get(id);
        let client = client.unwrap_or_else(|| panic!("client '{id}' is not online"));
        client.registration.machine_id.clone()
    }

    /// Public base URL.
    pub fn public(&self) -> SocketAddr {
        self.addrs.public
    }

    /// Waits until `pred` holds for the registry (checked on every change).
    pub async fn wait_until(&self, what: &str, pred: impl Fn(&State) -> bool) {
        let mut changes = self.state.registry.subscribe();
        let wait = async {
            loop {
                if pred(&self.state) {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }

    /// Waits until exactly `ids` are registered.
    pub async fn wait_for_clients(&self, ids: &[&str]) {
        let mut want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        want.sort();
        self.wait_until(&format!("clients {want:?}"), |s| {
            let mut have: Vec<String> = s.registry.all().iter().map(|c| c.id.clone()).collect();
            have.sort();
            have == want
        })
        .await;
    }

    /// Shuts frps down gracefully and waits for it.
    pub async fn stop(self) {
        self.state.shutdown.cancel();
        tokio::time::timeout(WAIT, self.join)
            .await
            .expect("frps stops in time")
            .expect("frps task")
            .expect("frps run");
        assert!(self.state.store.is_closed(), "frps closed its database");
    }
}

/// A running frpc.
pub struct Frpc {
    /// Its client id.
    pub id: String,
    shutdown: CancellationToken,
    join: JoinHandle<anyhow::Result<()>>,
}

/// A frpc configuration pointing at `frps` and exposing `backend`.
pub fn frpc_config(id: &str, frps: &BoundAddrs, backend: SocketAddr) -> frpc::Config {
    use clap::Parser;
    let mut cfg = frpc::Config::parse_from(["frpc"]);
    cfg.client_id = Some(id.to_owned());
    cfg.server_addr = frps.control.ip().to_string();
    cfg.control_port = frps.control.port();
    cfg.proxy_port = frps.proxy.port();
    cfg.local_addr = backend.ip().to_string();
    cfg.local_port = backend.port();
    cfg.email = Some(TEST_EMAIL.to_owned());
    cfg.password = Some(TEST_PASSWORD.to_owned());
    cfg.no_prompt = true;
    // The harness talks to frps over loopback; TLS tests turn TLS on.
    cfg.insecure_plaintext = true;
    cfg.metrics_interval = Duration::from_secs(1);
    cfg.reconnect_min = Duration::from_millis(50);
    cfg.reconnect_max = Duration::from_millis(400);
    cfg.connect_timeout = Duration::from_secs(2);
    // `Frpc::kill` closes everything at once, as a killed process would;
    // the drain tests set their own.
    cfg.shutdown_timeout = Duration::ZERO;
    cfg.token_file = std::env::temp_dir()
        .join(format!("frpx-test-{}", uuid::Uuid::new_v4()))
        .join("token.json");
    cfg
}

impl Frpc {
    /// Starts frpc with `config`.
    pub fn start(config: frpc::Config) -> Frpc {
        let id = config.client_id.clone().expect("tests set a client id");
        let shutdown = CancellationToken::new();
        let join = tokio::spawn(frpc::run(config, shutdown.clone()));
        Frpc { id, shutdown, join }
    }

    /// Starts frpc `id` exposing `backend` through `frps`.
    pub fn connect(id: &str, frps: &Frps, backend: &Backend) -> Frpc {
        Frpc::start(frpc_config(id, &frps.addrs, backend.addr))
    }

    /// Stops frpc at once, closing its control and data connections (as a
    /// killed process would).
    pub async fn kill(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(WAIT, self.join)
            .await
            .expect("frpc stops in time");
    }

    /// Asks frpc to stop (as SIGTERM does) without waiting for it.
    pub fn signal(&self) {
        self.shutdown.cancel();
    }

    /// Whether the frpc task has ended.
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }

    /// Waits for frpc to exit by itself and returns its result.
    pub async fn exit(self) -> anyhow::Result<()> {
        tokio::time::timeout(WAIT, self.join)
            .await
            .expect("frpc exits in time")
            .expect("frpc task")
    }
}

/// frps, `n` backends and `n` frpc (`client-0`, `client-1`, ...), all registered.
pub struct Fleet {
    /// The server.
    pub frps: Frps,
    /// The backends, one per client.
    pub backends: Vec<Backend>,
    /// The clients.
    pub clients: Vec<Frpc>,
}

impl Fleet {
    /// Starts a fleet of `n` with the default frps configuration.
    pub async fn start(n: usize) -> Fleet {
        Fleet::start_with(n, frps_config()).await
    }

    /// Starts a fleet of `n` with `config`.
    pub async fn start_with(n: usize, config: Config) -> Fleet {
        let frps = Frps::start(config).await;
        let mut backends = Vec::new();
        let mut clients = Vec::new();
        for i in 0..n {
            let name = format!("client-{i}");
            let backend = Backend::start(&name).await;
            clients.push(Frpc::connect(&name, &frps, &backend));
            backends.push(backend);
        }
        let ids: Vec<String> = clients.iter().map(|c| c.id.clone()).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        frps.wait_for_clients(&ids).await;
        // Each frpc dials its tunnel connection right after registering;
        // waiting for them makes every request of a test take that path
        // (tests of dial-backs turn `tunnel_mux` off).
        if frps.state.config.tunnel_mux {
            eventually("every client's tunnel connection is up", || {
                ids.iter().all(|id| {
                    frps.state
                        .registry
                        .get(id)
                        .is_some_and(|c| c.tunnel().is_some())
                })
            })
            .await;
        }
        Fleet {
            frps,
            backends,
            clients,
        }
    }
}

/// A body of about `len` bytes in which every 9-byte line is its own
/// number (`00000000\n`, `00000001\n`, ...): a byte lost, repeated or
/// moved shows, as it would not in a body of one repeated byte.
pub fn numbered(len: usize) -> String {
    (0..len.div_ceil(9)).map(|i| format!("{i:08}\n")).collect()
}
