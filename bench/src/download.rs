//! One timed download, the stand-in for curl when curl is not installed.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::client::{self, Target};

/// `frpx-bench download` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// URL to download.
    #[arg(long)]
    pub url: String,
    /// API key, sent as `Authorization: Bearer <key>`.
    #[arg(long)]
    pub key: Option<String>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
}

/// Size and duration of the download (connection set-up included, as curl's
/// `time_total`).
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// Body bytes received.
    pub bytes: u64,
    /// Seconds from connecting to the last byte.
    pub secs: f64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "status=200 bytes={} secs={:.6} gbit_per_s={:.3}",
            self.bytes,
            self.secs,
            self.bytes as f64 * 8.0 / self.secs / 1e9
        )
    }
}

/// Downloads `args.url`, discarding the body.
pub async fn run(args: Args) -> anyhow::Result<Report> {
    let target = Target::parse(&args.url)?;
    let limit = Duration::from_secs(args.timeout_secs);
    let started = Instant::now();
    let fetch = async {
        let mut sender = client::connect(&target.addr).await?;
        sender.ready().await?;
        let resp = sender
            .send_request(target.get(args.key.as_deref(), true)?)
            .await?;
        anyhow::ensure!(
            resp.status().is_success(),
            "GET {} answered {}",
            target.path,
            resp.status()
        );
        client::drain(resp).await
    };
    let bytes = tokio::time::timeout(limit, fetch)
        .await
        .with_context(|| format!("download did not finish within {limit:?}"))??;
    Ok(Report {
        bytes,
        secs: started.elapsed().as_secs_f64(),
    })
}
