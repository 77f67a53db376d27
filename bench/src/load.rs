//! A simple closed-loop load generator, the stand-in for wrk when wrk is
//! not installed (smoke mode only): each connection sends a request, reads
//! the whole answer, and sends the next, until the duration is over.

use std::fmt;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::client::{self, Sender, Target};
use crate::stats::Summary;

/// `frpx-bench load` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// URL to GET.
    #[arg(long)]
    pub url: String,
    /// API key, sent as `Authorization: Bearer <key>`.
    #[arg(long)]
    pub key: Option<String>,
    /// Concurrent connections.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// How long to send requests, in seconds.
    #[arg(long, default_value_t = 1.0)]
    pub duration_secs: f64,
    /// Send `Connection: close` and open a new connection per request.
    #[arg(long)]
    pub close: bool,
}

/// Throughput and latency of one run.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// Successful (2xx) responses per second.
    pub rps: f64,
    /// Latency of successful requests, microseconds.
    pub latency: Summary,
    /// Requests that failed or answered something other than 2xx.
    pub errors: u64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "requests={} rps={:.1} p50_us={} p99_us={} errors={}",
            self.latency.count, self.rps, self.latency.p50, self.latency.p99, self.errors
        )
    }
}

/// Runs the load and summarises it.
pub async fn run(args: Args) -> anyhow::Result<Report> {
    let target = Target::parse(&args.url)?;
    let duration = Duration::from_secs_f64(args.duration_secs);
    let started = Instant::now();
    let deadline = started + duration;
    let mut workers = JoinSet::new();
    for _ in 0..args.connections.max(1) {
        workers.spawn(worker(
            target.clone(),
            args.key.clone(),
            args.close,
            deadline,
        ));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    while let Some(done) = workers.join_next().await {
        let (l, e) = done?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rps = latencies.len() as f64 / elapsed;
    let Some(latency) = Summary::of(&mut latencies) else {
        anyhow::bail!("no request succeeded ({errors} errors)");
    };
    Ok(Report {
        rps,
        latency,
        errors,
    })
}

/// One connection's loop; returns its latencies (µs) and error count.
async fn worker(
    target: Target,
    key: Option<String>,
    close: bool,
    deadline: Instant,
) -> (Vec<u64>, u64) {
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut conn: Option<Sender> = None;
    while Instant::now() < deadline {
        // Bounded even if the server stops answering mid-request.
        let limit = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(2);
        let attempt = tokio::time::timeout(limit, async {
            let mut sender = match conn.take() {
                Some(s) if !s.is_closed() => s,
                _ => client::connect(&target.addr).await?,
            };
            let start = Instant::now();
            let (status, _) =
                client::fetch(&mut sender, target.get(key.as_deref(), close)?).await?;
            Ok::<_, anyhow::Error>((status, start.elapsed(), sender))
        })
        .await;
        match attempt {
            Ok(Ok((status, took, sender))) if (200..300).contains(&status) => {
                latencies.push(took.as_micros() as u64);
                if !close {
                    conn = Some(sender);
                }
            }
            _ => errors += 1,
        }
    }
    (latencies, errors)
}
