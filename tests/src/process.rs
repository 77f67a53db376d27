//! frps, frpc and redis-server as real child processes, for the faults a
//! process has to suffer for real: `kill -9`, its own resident memory.
//!
//! The frps and frpc binaries are the workspace's own `main.rs` files, built
//! as this package's `e2e-frps` and `e2e-frpc` binaries (see its
//! `Cargo.toml`), so `cargo test` always builds them, fresh, before the e2e
//! tests run; a test passes their paths (`env!("CARGO_BIN_EXE_e2e-frps")`).
//! Every child is killed when its handle is dropped, a failing test
//! included. Readiness is read from the child's output, never slept on.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::{API_KEY, TEST_EMAIL, TEST_PASSWORD, WAIT};

/// Output lines kept per child (older ones are dropped).
const KEPT_LINES: usize = 400;

/// Environment variables frps and frpc read: cleared so the test's own
/// environment cannot change a child's configuration.
pub fn scrub(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("FRPX_")
            || key.starts_with("FRPC_")
            || matches!(key, "DATABASE_URL" | "REDIS_URL" | "API_KEY" | "RUST_LOG")
        {
            cmd.env_remove(key);
        }
    }
    cmd.env("NO_COLOR", "1");
}

#[derive(Default)]
struct Output {
    lines: VecDeque<String>,
    /// Lines seen in total (the index of the next one).
    total: usize,
    /// Both streams reached their end: the process is gone.
    closed: usize,
}

/// A child process whose stdout and stderr are read line by line.
pub struct Proc {
    name: String,
    child: Child,
    output: Arc<Mutex<Output>>,
    seen: watch::Receiver<usize>,
}

impl Proc {
    /// Starts `cmd` (its output captured), named `name` in messages.
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let output = Arc::new(Mutex::new(Output::default()));
        let (tx, seen) = watch::channel(0);
        let tx = Arc::new(tx);
        let echo = std::env::var_os("FRPX_TEST_LOG").is_some();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        tokio::spawn(pump(
            stdout,
            output.clone(),
            tx.clone(),
            name.to_owned(),
            echo,
        ));
        tokio::spawn(pump(stderr, output.clone(), tx, name.to_owned(), echo));
        Proc {
            name: name.to_owned(),
            child,
            output,
            seen,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the process is running")
    }

    /// Waits for an output line containing `needle` (from the first line on)
    /// and returns it; fails after [`WAIT`] or when the process ends first.
    pub async fn wait_for_line(&self, needle: &str) -> String {
        match tokio::time::timeout(WAIT, self.line(needle)).await {
            Ok(Ok(line)) => line,
            Ok(Err(why)) => panic!(
                "{} printed no line with {needle:?}: {why}. Its output:\n{}",
                self.name,
                self.tail()
            ),
            Err(_) => panic!(
                "{} printed no line with {needle:?} within {WAIT:?}. Its output:\n{}",
                self.name,
                self.tail()
            ),
        }
    }

    /// The first kept line containing `needle`, once there is one; an error
    /// when the process ends without printing it.
    async fn line(&self, needle: &str) -> Result<String, &'static str> {
        let mut seen = self.seen.clone();
        loop {
            {
                let out = self.output.lock().unwrap();
                if let Some(line) = out.lines.iter().find(|l| l.contains(needle)) {
                    return Ok(line.clone());
                }
                if out.closed == 2 {
                    return Err("it exited");
                }
            }
            if seen.changed().await.is_err() {
                return Err("its output closed");
            }
        }
    }

    /// The output lines still kept, joined.
    pub fn tail(&self) -> String {
        let out = self.output.lock().unwrap();
        out.lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Kept output lines containing `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        let out = self.output.lock().unwrap();
        out.lines
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// Sends SIGKILL (`kill -9`) and reaps the process.
    pub async fn kill_9(&mut self) {
        self.child.start_kill().expect("SIGKILL");
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("a killed process is reaped in time")
            .expect("wait");
        assert!(!status.success(), "{} survived SIGKILL", self.name);
    }

    /// Whether the process has exited.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Resident memory (`VmRSS` of `/proc/<pid>/status`), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }
}

async fn pump(
    stream: impl AsyncRead + Unpin,
    output: Arc<Mutex<Output>>,
    tx: Arc<watch::Sender<usize>>,
    name: String,
    echo: bool,
) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let line = strip_ansi(&line);
        if echo {
            eprintln!("[{name}] {line}");
        }
        let total = {
            let mut out = output.lock().unwrap();
            if out.lines.len() == KEPT_LINES {
                out.lines.pop_front();
            }
            out.lines.push_back(line);
            out.total += 1;
            out.total
        };
        tx.send_replace(total);
    }
    output.lock().unwrap().closed += 1;
    tx.send_modify(|_| {});
}

/// `line` without terminal colour codes.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The four addresses an frps process reports at start.
#[derive(Debug, Clone, Copy)]
pub struct FrpsAddrs {
    /// Control port.
    pub control: SocketAddr,
    /// Proxy (dial-back) port.
    pub proxy: SocketAddr,
    /// Public port.
    pub public: SocketAddr,
    /// Management API.
    pub api: SocketAddr,
}

impl FrpsAddrs {
    /// Reads `frps listening: control A, proxy B, public C, api D`.
    pub fn parse(line: &str) -> Option<FrpsAddrs> {
        let rest = line.split("frps listening:").nth(1)?;
        let mut found = std::collections::HashMap::new();
        for part in rest.split(',') {
            let (what, addr) = part.trim().split_once(' ')?;
            found.insert(what.to_owned(), addr.trim().parse::<SocketAddr>().ok()?);
        }
        Some(FrpsAddrs {
            control: *found.get("control")?,
            proxy: *found.get("proxy")?,
            public: *found.get("public")?,
            api: *found.get("api")?,
        })
    }
}

/// An frps process on loopback, every port 0, accepting [`API_KEY`].
pub struct FrpsProcess {
    /// The process.
    pub proc: Proc,
    /// Its bound addresses, from its start-up line.
    pub addrs: FrpsAddrs,
}

impl FrpsProcess {
    /// Starts `bin` with `database_url`, Redis `redis_url` (or `none`) and
    /// `extra` flags, and waits for its listening line.
    pub async fn start(bin: &str, database_url: &str, redis_url: &str, extra: &[&str]) -> Self {
        let mut cmd = Command::new(bin);
        scrub(&mut cmd);
        cmd.args(["--bind-addr", "127.0.0.1", "--api-bind", "127.0.0.1"])
            .args(["--control-port", "0", "--proxy-port", "0"])
            .args(["--public-port", "0", "--api-port", "0"])
            .args(["--database-url", database_url, "--redis-url", redis_url])
            .args(["--log", "info"])
            // As `frps_config`: the test backend's routes are no model API.
            .args(["--forward-paths", "*"])
            .args(extra)
            .env("API_KEY", API_KEY);
        let proc = Proc::spawn("frps", cmd);
        let line = proc.wait_for_line("frps listening:").await;
        let addrs = FrpsAddrs::parse(&line)
            .unwrap_or_else(|| panic!("cannot read frps's addresses from {line:?}"));
        FrpsProcess { proc, addrs }
    }
}

/// Creates the [`TEST_EMAIL`] account in `store` (if missing) and a client
/// token for it saved at `token_file`, so frpc starts without a password.
pub async fn provision_token(store: &frps::store::Store, token_file: &Path) {
    let user = match store.find_user(TEST_EMAIL).await.expect("user lookup") {
        Some(user) => user,
        None => store
            .create_user(
                TEST_EMAIL,
                &frps::auth::accounts::hash_password(TEST_PASSWORD),
            )
            .await
            .expect("test user"),
    };
    let s = frps::auth::secret::generate("frpxc");
    store
        .insert_client_token(&s.id, &s.hash_hex, &s.prefix, user.id, None, None)
        .await
        .expect("client token");
    let saved = frpc::login::SavedToken {
        token: s.plaintext,
        expires_at: None,
        server: String::new(),
        email: TEST_EMAIL.into(),
        tls: false,
    };
    frpc::login::save(token_file, &saved).expect("token file");
}

/// How an frpc process is started (kept so it can be started again).
#[derive(Debug, Clone)]
pub struct FrpcSpec {
    /// The frpc binary.
    pub bin: String,
    /// Client id.
    pub id: String,
    /// frps control address.
    pub control: SocketAddr,
    /// frps proxy address.
    pub proxy: SocketAddr,
    /// The local service.
    pub service: SocketAddr,
    /// Token file (with a saved token, or written at the first login).
    pub token_file: PathBuf,
}

impl FrpcSpec {
    /// An frpc `id` exposing `service` through frps at `control`/`proxy`,
    /// with a token file of its own in a fresh temporary directory.
    pub fn new(
        bin: &str,
        id: &str,
        control: SocketAddr,
        proxy: SocketAddr,
        service: SocketAddr,
    ) -> Self {
        let token_file = std::env::temp_dir()
            .join(format!("frpx-test-{}", uuid::Uuid::new_v4()))
            .join("token.json");
        FrpcSpec {
            bin: bin.to_owned(),
            id: id.to_owned(),
            control,
            proxy,
            service,
            token_file,
        }
    }

    /// Starts the process and waits until it says it registered.
    pub async fn start(&self) -> Proc {
        let mut cmd = Command::new(&self.bin);
        scrub(&mut cmd);
        let port = |a: SocketAddr| a.port().to_string();
        cmd.args(["--client-id", &self.id])
            .args(["--server-addr", &self.control.ip().to_string()])
            .args(["--control-port", &port(self.control)])
            .args(["--proxy-port", &port(self.proxy)])
            .args(["--local-addr", &self.service.ip().to_string()])
            .args(["--local-port", &port(self.service)])
            .args(["--email", TEST_EMAIL, "--no-prompt", "--insecure-plaintext"])
            .arg("--token-file")
            .arg(&self.token_file)
            .args(["--reconnect-min", "50ms", "--reconnect-max", "400ms"])
            .args(["--metrics-interval", "1s", "--log", "info"])
            .env("FRPC_PASSWORD", TEST_PASSWORD);
        let proc = Proc::spawn(&format!("frpc {}", self.id), cmd);
        proc.wait_for_line("registered with frps").await;
        proc
    }
}

/// A private redis-server (no persistence) that a test may kill and start
/// again on the same port.
pub struct RedisProcess {
    /// The process.
    pub proc: Proc,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl RedisProcess {
    /// Starts redis-server on a free port, or `None` (skip) when it is not
    /// installed and `FRPX_REQUIRE_SERVICES` is not `1`.
    pub async fn start() -> Option<RedisProcess> {
        if which("redis-server").is_none() {
            if crate::services::required() {
                panic!("redis-server is not installed and FRPX_REQUIRE_SERVICES=1");
            }
            eprintln!("skipping: redis-server is not installed");
            return None;
        }
        // redis-server cannot report a port it picked: pick one, and pick
        // again in the rare case someone takes it in between.
        for _ in 0..5 {
            let port = free_port();
            if let Some(redis) = RedisProcess::start_on(port).await {
                return Some(redis);
            }
        }
        panic!("redis-server could not bind any of 5 free ports");
    }

    /// Starts redis-server on `port`; `None` if it could not bind.
    pub async fn start_on(port: u16) -> Option<RedisProcess> {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--loglevel", "notice"]);
        let proc = Proc::spawn(&format!("redis-server :{port}"), cmd);
        match tokio::time::timeout(WAIT, proc.line("Ready to accept")).await {
            Ok(Ok(_)) => Some(RedisProcess { proc, port }),
            Ok(Err(_)) if proc.tail().contains("in use") => None,
            Ok(Err(why)) => panic!("redis-server failed to start ({why}):\n{}", proc.tail()),
            Err(_) => panic!("redis-server not ready in time:\n{}", proc.tail()),
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `kill -9`: Redis crashes.
    pub async fn kill_9(&mut self) {
        self.proc.kill_9().await;
    }

    /// Starts redis-server again on the same port after [`Self::kill_9`]
    /// (empty: it keeps nothing on disk).
    pub async fn restart(&mut self) {
        let again = RedisProcess::start_on(self.port)
            .await
            .unwrap_or_else(|| panic!("port {} was taken while Redis was down", self.port));
        *self = again;
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}
