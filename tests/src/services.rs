//! Real PostgreSQL and Redis for tests, from `FRPX_TEST_DATABASE_URL` and
//! `FRPX_TEST_REDIS_URL`. A missing service skips the test, unless
//! `FRPX_REQUIRE_SERVICES=1`, which makes it fail. Each test gets its own
//! database and its own Redis key prefix, so tests run in parallel.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sqlx::Connection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// Whether `FRPX_REQUIRE_SERVICES=1`: missing services fail tests instead of
/// skipping them.
pub fn required() -> bool {
    std::env::var("FRPX_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

fn service_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if required() => panic!("{var} is not set and FRPX_REQUIRE_SERVICES=1"),
        _ => {
            eprintln!("skipping: {var} is not set");
            None
        }
    }
}

/// A fresh PostgreSQL database, dropped by [`TestPg::drop_db`].
pub struct TestPg {
    /// URL of the fresh database.
    pub url: String,
    admin_url: String,
    name: String,
}

impl TestPg {
    /// Creates a database, or `None` (skip) when PostgreSQL is not configured.
    pub async fn create() -> Option<TestPg> {
        let admin_url = service_url("FRPX_TEST_DATABASE_URL")?;
        let name = format!("frpx_t_{}", uuid::Uuid::new_v4().simple());
        let mut conn = match sqlx::PgConnection::connect(&admin_url).await {
            Ok(c) => c,
            Err(e) if !required() => {
                eprintln!("skipping: PostgreSQL unreachable: {e}");
                return None;
            }
            Err(e) => panic!("PostgreSQL unreachable at FRPX_TEST_DATABASE_URL: {e}"),
        };
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let url = replace_db(&admin_url, &name);
        Some(TestPg {
            url,
            admin_url,
            name,
        })
    }

    /// The URL of this database reached through `proxy` instead.
    pub fn url_via(&self, proxy: SocketAddr) -> String {
        let url = url::Url::parse(&self.url).expect("database URL");
        let mut url = url;
        url.set_host(Some(&proxy.ip().to_string())).unwrap();
        url.set_port(Some(proxy.port())).unwrap();
        url.to_string()
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        addr_of(&self.url, 5432)
    }

    /// Drops the database.
    pub async fn drop_db(mut self) {
        drop_database(&self.admin_url, &self.name).await;
        self.name.clear();
    }
}

/// A test that failed before [`TestPg::drop_db`] (a panic unwinding past
/// it) still leaves no database behind: dropped from a thread of its own,
/// as the test's runtime may be the one unwinding.
impl Drop for TestPg {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        let (admin_url, name) = (self.admin_url.clone(), std::mem::take(&mut self.name));
        let dropping = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime to drop the test database");
            runtime.block_on(drop_database(&admin_url, &name));
        });
        let _ = dropping.join();
    }
}

/// Drops database `name`, giving up after 10 s (a stopped server leaves it).
async fn drop_database(admin_url: &str, name: &str) {
    let dropping = async {
        if let Ok(mut conn) = sqlx::PgConnection::connect(admin_url).await {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut conn)
                .await;
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), dropping).await;
}

fn replace_db(url: &str, name: &str) -> String {
    let mut u = url::Url::parse(url).expect("database URL");
    u.set_path(&format!("/{name}"));
    u.to_string()
}

fn addr_of(url: &str, default_port: u16) -> SocketAddr {
    let u = url::Url::parse(url).expect("URL");
    let host = u.host_str().unwrap_or("127.0.0.1");
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    format!("{host}:{}", u.port().unwrap_or(default_port))
        .parse()
        .expect("service address")
}

/// The test Redis URL, or `None` (skip).
pub fn redis_url() -> Option<String> {
    service_url("FRPX_TEST_REDIS_URL")
}

/// A unique Redis key prefix for one test.
pub fn redis_prefix() -> String {
    format!("frpx-test-{}:", uuid::Uuid::new_v4().simple())
}

/// The address of a Redis URL.
pub fn redis_addr(url: &str) -> SocketAddr {
    addr_of(url, 6379)
}

/// A TCP forwarder in front of a service that a test can cut (every
/// connection dropped, new ones refused) and restore: the service "stops"
/// and "starts again" for whoever goes through it, and for no one else.
/// It can also hold the service's answers back (the service still gets and
/// carries out every command): a caller can be made to leave after its
/// command ran and before it read the answer.
pub struct Cutter {
    /// Address to connect to instead of the service.
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    held: Arc<tokio::sync::watch::Sender<bool>>,
    conns: Arc<Mutex<CancellationToken>>,
    /// Cancelled to stall the connections open now.
    stalls: Arc<std::sync::Mutex<CancellationToken>>,
    accepts: Arc<std::sync::Mutex<Vec<std::time::Instant>>>,
    sent: Sent,
}

/// The first [`SENT_RECORDED`] bytes callers sent through a [`Cutter`].
type Sent = Arc<std::sync::Mutex<Vec<u8>>>;

/// How much of what callers send a [`Cutter`] keeps for [`Cutter::sent`].
const SENT_RECORDED: usize = 4 << 20;

impl Cutter {
    /// Starts forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Cutter {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(CancellationToken::new()));
        let accepts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let held = Arc::new(tokio::sync::watch::Sender::new(false));
        let sent = Sent::default();
        let stalls = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let (d, c, a, h) = (down.clone(), conns.clone(), accepts.clone(), held.clone());
        let (s, st) = (sent.clone(), stalls.clone());
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                a.lock().unwrap().push(std::time::Instant::now());
                if d.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let cut = c.lock().await.clone();
                // `cut` sets the flag before it takes the lock: looked at
                // again under it, a connection accepted as the cut began is
                // refused too, never handed the fresh token that outlives it.
                if d.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let held = h.subscribe();
                let sent = s.clone();
                let stall = st.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = forward(inbound, outbound, held, sent, stall) => {}
                        _ = cut.cancelled() => {}
                    }
                });
            }
        });
        Cutter {
            addr,
            down,
            held,
            conns,
            stalls,
            accepts,
            sent,
        }
    }

    /// Stops carrying anything either way on the connections open now,
    /// keeping them open (a path gone dead without a reset: no error, no
    /// answer); connections made afterwards work.
    pub fn stall_open(&self) {
        let mut stalls = self.stalls.lock().unwrap();
        stalls.cancel();
        *stalls = CancellationToken::new();
    }

    /// What callers sent the service so far, over every connection (the
    /// first 4 MiB).
    pub fn sent(&self) -> Vec<u8> {
        self.sent.lock().unwrap().clone()
    }

    /// Holds back what the service sends from now on (it still reads and
    /// carries out commands).
    pub fn hold_answers(&self) {
        self.held.send_replace(true);
    }

    /// Passes the held answers on, and what follows.
    pub fn release_answers(&self) {
        self.held.send_replace(false);
    }

    /// When each connection so far arrived (connections cut or refused
    /// included).
    pub fn accepted(&self) -> Vec<std::time::Instant> {
        self.accepts.lock().unwrap().clone()
    }

    /// Drops every connection and refuses new ones.
    pub async fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        let mut conns = self.conns.lock().await;
        conns.cancel();
        *conns = CancellationToken::new();
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

/// Copies both ways between a caller and the service, holding the
/// service's bytes while `held` is true and recording the caller's in
/// `sent`; each side's end is passed on. Once `stall` is cancelled nothing
/// more moves, and both connections stay open.
async fn forward(
    inbound: TcpStream,
    outbound: TcpStream,
    mut held: tokio::sync::watch::Receiver<bool>,
    sent: Sent,
    stall: CancellationToken,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut from_caller, mut to_caller) = inbound.into_split();
    let (mut from_service, mut to_service) = outbound.into_split();
    let up = async {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = from_caller.read(&mut buf).await?;
            if n == 0 {
                return to_service.shutdown().await;
            }
            {
                let mut sent = sent.lock().unwrap();
                let room = SENT_RECORDED.saturating_sub(sent.len());
                sent.extend_from_slice(&buf[..n.min(room)]);
            }
            to_service.write_all(&buf[..n]).await?;
        }
    };
    let down = async {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = from_service.read(&mut buf).await?;
            if n == 0 {
                return to_caller.shutdown().await;
            }
            if held.wait_for(|held| !held).await.is_err() {
                return Ok(());
            }
            to_caller.write_all(&buf[..n]).await?;
        }
    };
    tokio::select! {
        _ = async { tokio::try_join!(up, down) } => {}
        _ = stall.cancelled() => {
            // The copies stop; the sockets stay open with them, unread.
            std::future::pending::<()>().await;
        }
    }
}
