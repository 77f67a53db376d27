//! Simulated frpc clients: many control connections in one process, each
//! speaking the real protocol (`LoginToken`, `Register`, a `Heartbeat`),
//! held open while the server's memory is read. They log in with a client
//! token (the one the bench frpc saved), so no password hashing runs in frps
//! while its memory is measured.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use common::{
    Command, FrameError, FrameReader, MAX_FRAME, PROTOCOL_VERSION, Registration, write_command,
};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::client;
use crate::stats::Memory;

/// Longest wait for any one frame from frps.
const FRAME_WAIT: Duration = Duration::from_secs(10);

/// Unrelated frames skipped while waiting for a heartbeat's answer.
const MAX_SKIPPED: usize = 16;

/// `frpx-bench clients` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// frps control address (`host:port`).
    #[arg(long)]
    pub control: String,
    /// Client token every simulated client logs in with.
    #[arg(long)]
    pub token: String,
    /// Clients to register.
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
    /// Client ids are `<prefix>-<n>`.
    #[arg(long, default_value = "bench-sim")]
    pub prefix: String,
    /// Registrations in progress at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Spread the connections over this many loopback source addresses
    /// (frps caps connections per address); 1 uses the default address.
    #[arg(long, default_value_t = 1)]
    pub sources: usize,
    /// Process (frps) whose memory is read once every client is registered.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,
}

/// How many clients registered, and the server's memory with them online.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// Clients registered and answering heartbeats.
    pub clients: usize,
    /// Memory of `--pid`, when given.
    pub memory: Option<Memory>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "clients={}", self.clients)?;
        if let Some(mem) = self.memory {
            write!(f, " {mem}")?;
        }
        Ok(())
    }
}

/// One registered control connection, kept open by holding it.
pub struct SimClient {
    reader: FrameReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl SimClient {
    /// Opens a control connection to `control`, from `source` when given.
    async fn connect(control: &str, source: Option<IpAddr>) -> anyhow::Result<SimClient> {
        let stream = client::tcp(control, source)
            .await
            .context("cannot reach the control port")?;
        let (rd, writer) = stream.into_split();
        Ok(SimClient {
            reader: FrameReader::new(rd, MAX_FRAME),
            writer,
        })
    }

    /// Logs in with `token`, registers as `id` and completes one heartbeat,
    /// connecting from `source` when given.
    pub async fn register(
        control: &str,
        source: Option<IpAddr>,
        token: &str,
        id: &str,
    ) -> anyhow::Result<SimClient> {
        let mut client = SimClient::connect(control, source).await?;
        client
            .send(Command::LoginToken {
                token: token.to_owned(),
            })
            .await?;
        match client.recv().await? {
            Command::LoginResult { ok: true, .. } => {}
            other => anyhow::bail!("login refused: {other:?}"),
        }
        client
            .send(Command::Register(Registration {
                client_id: id.to_owned(),
                machine_id: format!("machine-{id}"),
                hostname: id.to_owned(),
                os: std::env::consts::OS.to_owned(),
                arch: std::env::consts::ARCH.to_owned(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                protocol_version: PROTOCOL_VERSION,
                local_host: "127.0.0.1:9".to_owned(),
                ..Default::default()
            }))
            .await?;
        match client.recv().await? {
            Command::Registered { .. } => {}
            other => anyhow::bail!("registration of {id} refused: {other:?}"),
        }
        client.send(Command::Heartbeat { seq: 1 }).await?;
        // frps may send other commands first; a few are skipped.
        for _ in 0..MAX_SKIPPED {
            if let Command::HeartbeatAck { seq: 1 } = client.recv().await? {
                return Ok(client);
            }
        }
        anyhow::bail!("no HeartbeatAck for {id} within {MAX_SKIPPED} frames")
    }

    /// Closes the connection and waits until frps has closed its side too,
    /// which it does once the client is out of its registry.
    pub async fn leave(mut self) -> anyhow::Result<()> {
        self.writer.shutdown().await?;
        loop {
            match self.reader.read_command_within(FRAME_WAIT).await {
                Ok(Some(_)) => continue,
                Ok(None) | Err(FrameError::Io(_) | FrameError::Truncated) => return Ok(()),
                Err(e) => return Err(e).context("frps did not close a simulated client"),
            }
        }
    }

    async fn send(&mut self, cmd: Command) -> anyhow::Result<()> {
        Ok(write_command(&mut self.writer, &cmd).await?)
    }

    async fn recv(&mut self) -> anyhow::Result<Command> {
        self.reader
            .read_command_within(FRAME_WAIT)
            .await?
            .context("frps closed the control connection")
    }
}

/// Registers `args.count` clients, then reads the server's memory.
pub async fn run(args: Args) -> anyhow::Result<Report> {
    let limit = Duration::from_secs(args.timeout_secs);
    let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut registering = JoinSet::new();
    for n in 0..args.count {
        let permits = permits.clone();
        let (control, token) = (args.control.clone(), args.token.clone());
        let id = format!("{}-{n}", args.prefix);
        let source = client::loopback_source(n, args.sources);
        registering.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            SimClient::register(&control, source, &token, &id).await
        });
    }
    let collect = async {
        let mut clients = Vec::with_capacity(args.count);
        while let Some(done) = registering.join_next().await {
            clients.push(done??);
        }
        Ok::<_, anyhow::Error>(clients)
    };
    let clients = tokio::time::timeout(limit, collect)
        .await
        .with_context(|| format!("{} clients did not register within {limit:?}", args.count))??;
    let memory = args.pid.map(Memory::of_pid).transpose()?;
    let registered = clients.len();
    // Leave only once frps has let every client go, so that nothing routes
    // to them after this process is gone.
    let mut leaving: JoinSet<_> = clients.into_iter().map(SimClient::leave).collect();
    let drain = async {
        while let Some(done) = leaving.join_next().await {
            done??;
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(limit, drain)
        .await
        .with_context(|| format!("frps did not let {registered} clients go within {limit:?}"))??;
    Ok(Report {
        clients: registered,
        memory,
    })
}
