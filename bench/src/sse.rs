//! The SSE caller: opens concurrent streams to `/sse` (directly or through
//! frps) and measures, for every event, the time from the backend's write
//! (the stamp inside the event) to this process reading it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::backend::unix_nanos;
use crate::client::{self, Target};
use crate::stats::Summary;

/// `frpx-bench sse` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Base URL of the SSE endpoint, e.g. `http://127.0.0.1:PORT/sse`.
    #[arg(long)]
    pub url: String,
    /// API key, sent as `Authorization: Bearer <key>`.
    #[arg(long)]
    pub key: Option<String>,
    /// Concurrent streams.
    #[arg(long, default_value_t = 100)]
    pub streams: usize,
    /// Events per stream.
    #[arg(long, default_value_t = 200)]
    pub events: u64,
    /// Milliseconds between two events of a stream.
    #[arg(long, default_value_t = 10)]
    pub interval_ms: u64,
    /// Streams being opened at once (each until its response head arrives):
    /// the measure is event latency on open streams, not a burst of opens.
    #[arg(long, default_value_t = 16)]
    pub open_concurrency: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,
}

/// Write-to-read latency over every event of every stream.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// Streams completed.
    pub streams: usize,
    /// Latency in nanoseconds, over all events.
    pub latency: Summary,
    /// Events that arrived one interval or more after they were written
    /// (held back, or the machine stalled).
    pub late: usize,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = |ns: u64| ns as f64 / 1000.0;
        write!(
            f,
            "streams={} events={} p50_us={:.1} p99_us={:.1} max_us={:.1} late={}",
            self.streams,
            self.latency.count,
            us(self.latency.p50),
            us(self.latency.p99),
            us(self.latency.max),
            self.late
        )
    }
}

/// Runs every stream to its end and summarises the latencies.
pub async fn run(args: Args) -> anyhow::Result<Report> {
    let mut target = Target::parse(&args.url)?;
    target.path = format!(
        "{}?events={}&interval_ms={}",
        target.path, args.events, args.interval_ms
    );
    let opening = Arc::new(Semaphore::new(args.open_concurrency.max(1)));
    let mut streams = JoinSet::new();
    for _ in 0..args.streams {
        let permit = opening.clone().acquire_owned();
        let (target, key) = (target.clone(), args.key.clone());
        streams.spawn(async move { stream(target, key, args.events, permit.await?).await });
    }
    let collect = async {
        let mut all = Vec::with_capacity(args.streams * args.events as usize);
        while let Some(done) = streams.join_next().await {
            all.extend(done??);
        }
        Ok::<_, anyhow::Error>(all)
    };
    let limit = Duration::from_secs(args.timeout_secs);
    let mut latencies = tokio::time::timeout(limit, collect)
        .await
        .with_context(|| format!("SSE streams did not finish within {limit:?}"))??;
    let late_ns = args.interval_ms * 1_000_000;
    let late = latencies.iter().filter(|&&ns| ns >= late_ns).count();
    let latency = Summary::of(&mut latencies).context("no SSE event received")?;
    Ok(Report {
        streams: args.streams,
        latency,
        late,
    })
}

/// Reads one stream; returns each event's latency in nanoseconds. `opening`
/// is released once the response head has arrived.
async fn stream(
    target: Target,
    key: Option<String>,
    events: u64,
    opening: OwnedSemaphorePermit,
) -> anyhow::Result<Vec<u64>> {
    let mut sender = client::connect(&target.addr).await?;
    sender.ready().await?;
    let resp = sender
        .send_request(target.get(key.as_deref(), false)?)
        .await?;
    drop(opening);
    anyhow::ensure!(
        resp.status().is_success(),
        "GET {} answered {}",
        target.path,
        resp.status()
    );
    let mut body = resp.into_body();
    let mut pending = String::new();
    let mut latencies = Vec::with_capacity(events as usize);
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        let read_at = unix_nanos();
        pending.push_str(std::str::from_utf8(&data).context("SSE body is not UTF-8")?);
        while let Some(end) = pending.find("\n\n") {
            let (seq, written_at) = parse_event(&pending[..end])?;
            anyhow::ensure!(
                seq == latencies.len() as u64,
                "event {seq} arrived out of order (expected {})",
                latencies.len()
            );
            latencies.push(read_at.saturating_sub(written_at) as u64);
            pending.drain(..end + 2);
        }
    }
    anyhow::ensure!(
        latencies.len() as u64 == events,
        "stream ended after {} of {events} events",
        latencies.len()
    );
    Ok(latencies)
}

/// Parses `data: <seq> <unix-nanos>` into its two numbers.
fn parse_event(event: &str) -> anyhow::Result<(u64, u128)> {
    let parse = || {
        let (seq, nanos) = event.strip_prefix("data: ")?.split_once(' ')?;
        Some((seq.parse().ok()?, nanos.trim().parse().ok()?))
    };
    parse().with_context(|| format!("malformed SSE event {event:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_parsed() {
        assert_eq!(
            parse_event("data: 3 1700000000000000000").unwrap(),
            (3, 1_700_000_000_000_000_000)
        );
        assert!(parse_event("data: x 1").is_err());
        assert!(parse_event("event: 1 2").is_err());
    }
}
