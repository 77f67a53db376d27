//! Idle public keep-alive connections: each sends one authenticated request,
//! reads the answer, and stays open while the server's memory is read.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::client::{self, Sender, Target};
use crate::stats::Memory;

/// `frpx-bench idle` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// URL of a cheap path on the public port.
    #[arg(long)]
    pub url: String,
    /// API key, sent as `Authorization: Bearer <key>`.
    #[arg(long)]
    pub key: Option<String>,
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    pub count: usize,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Spread the connections over this many loopback source addresses
    /// (frps caps connections per address); 1 uses the default address.
    #[arg(long, default_value_t = 1)]
    pub sources: usize,
    /// Process (frps) whose memory is read once every connection is idle.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
}

/// How many connections were opened and are still open, and the server's
/// memory with them.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// Connections that got a 2xx answer.
    pub connections: usize,
    /// Of those, still open when the memory was read.
    pub open: usize,
    /// Memory of `--pid`, when given.
    pub memory: Option<Memory>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "connections={} open={}", self.connections, self.open)?;
        if let Some(mem) = self.memory {
            write!(f, " {mem}")?;
        }
        Ok(())
    }
}

/// Opens `args.count` connections, one request each, then reads the
/// server's memory while they are all idle.
pub async fn run(args: Args) -> anyhow::Result<Report> {
    let target = Target::parse(&args.url)?;
    let limit = Duration::from_secs(args.timeout_secs);
    let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut opening = JoinSet::new();
    for n in 0..args.count {
        let (permits, target, key) = (permits.clone(), target.clone(), args.key.clone());
        let source = client::loopback_source(n, args.sources);
        opening.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            open_one(&target, key.as_deref(), source).await
        });
    }
    let collect = async {
        let mut conns = Vec::with_capacity(args.count);
        while let Some(done) = opening.join_next().await {
            conns.push(done??);
        }
        Ok::<_, anyhow::Error>(conns)
    };
    let conns = tokio::time::timeout(limit, collect)
        .await
        .with_context(|| {
            format!(
                "{} connections were not set up within {limit:?}",
                args.count
            )
        })??;
    let memory = args.pid.map(Memory::of_pid).transpose()?;
    Ok(Report {
        connections: conns.len(),
        open: conns.iter().filter(|c| !c.is_closed()).count(),
        memory,
    })
}

async fn open_one(
    target: &Target,
    key: Option<&str>,
    source: Option<IpAddr>,
) -> anyhow::Result<Sender> {
    let mut sender = client::connect_from(&target.addr, source).await?;
    let (status, _) = client::fetch(&mut sender, target.get(key, false)?).await?;
    anyhow::ensure!(
        (200..300).contains(&status),
        "GET {} answered {status}",
        target.path
    );
    Ok(sender)
}
