//! Simulated frpc clients: many control connections in one process, each
//! speaking the real protocol (`LoginToken`, `Register`, a `Heartbeat`),
//! held open while the server's memory is read.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use common::{Command, FrameReader, MAX_FRAME, PROTOCOL_VERSION, Registration, write_command};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::stats::Memory;

/// Longest wait for any one frame from frps.
const FRAME_WAIT: Duration = Duration::from_secs(10);

/// `frpx-bench clients` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// frps control address (`host:port`).
    #[arg(long)]
    pub control: String,
    /// Provider secret (frps `--client-secret`).
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
    /// Logs in with `token`, registers as `id` and completes one heartbeat.
    pub async fn register(control: &str, token: &str, id: &str) -> anyhow::Result<SimClient> {
        let stream = TcpStream::connect(control)
            .await
            .with_context(|| format!("cannot connect to the control port {control}"))?;
        stream.set_nodelay(true)?;
        let (rd, writer) = stream.into_split();
        let mut client = SimClient {
            reader: FrameReader::new(rd, MAX_FRAME),
            writer,
        };
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
        match client.recv().await? {
            Command::HeartbeatAck { seq: 1 } => Ok(client),
            other => anyhow::bail!("expected HeartbeatAck for {id}, got {other:?}"),
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
        registering.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            SimClient::register(&control, &token, &id).await
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
    Ok(Report {
        clients: clients.len(),
        memory,
    })
}
