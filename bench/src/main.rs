use clap::{Parser, Subcommand};
use frpx_bench::{backend, clients, download, histogram, idle, load, probe, sse};

/// frpx-bench: helpers for bench/run.sh.
#[derive(Debug, Parser)]
#[command(
    name = "frpx-bench",
    version,
    about = "frpx benchmark helpers (see bench/README.md)"
)]
struct Cli {
    /// Runtime worker threads (0: one per core).
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the Rust backend (small response, /big.bin, /sse, /whoami).
    Backend(backend::Args),
    /// Measure SSE write-to-read latency.
    Sse(sse::Args),
    /// Generate closed-loop HTTP load (wrk's stand-in).
    Load(load::Args),
    /// Time one download (curl's stand-in).
    Download(download::Args),
    /// Register simulated clients and read frps's memory.
    Clients(clients::Args),
    /// Hold idle public keep-alive connections and read frps's memory.
    Idle(idle::Args),
    /// Read a histogram from frps's /metrics (case f).
    Histogram(histogram::Args),
    /// Poll a URL until it answers 200.
    Wait(probe::WaitArgs),
    /// Print a free port on 127.0.0.1.
    FreePort,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if cli.threads > 0 {
        runtime.worker_threads(cli.threads);
    }
    let runtime = runtime.enable_all().build()?;
    runtime.block_on(async {
        match cli.command {
            Cmd::Backend(args) => backend::run(args).await?,
            Cmd::Sse(args) => println!("{}", sse::run(args).await?),
            Cmd::Load(args) => println!("{}", load::run(args).await?),
            Cmd::Download(args) => println!("{}", download::run(args).await?),
            Cmd::Clients(args) => println!("{}", clients::run(args).await?),
            Cmd::Idle(args) => println!("{}", idle::run(args).await?),
            Cmd::Histogram(args) => println!("{}", histogram::run(args).await?),
            Cmd::Wait(args) => println!("ready_ms={}", probe::wait(args).await?.as_millis()),
            Cmd::FreePort => println!("{}", probe::free_port()?),
        }
        Ok(())
    })
}
