//! Case f: frps's own gateway-overhead histogram, read from `/metrics`.
//!
//! `frpx-bench histogram --url <api>/metrics --save before.txt` keeps the
//! cumulative buckets of one histogram; a later call with `--since
//! before.txt` subtracts them, so the quantiles cover only the requests in
//! between. Quantiles are interpolated linearly inside a bucket, as
//! Prometheus' `histogram_quantile` does.

use std::fmt;
use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::client::{self, Target};

/// `frpx-bench histogram` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// URL of frps's `/metrics`.
    #[arg(long)]
    pub url: String,
    /// Histogram to read.
    #[arg(long, default_value = "frpx_gateway_overhead_seconds")]
    pub name: String,
    /// Write the buckets read to this file.
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// Subtract the buckets saved in this file first.
    #[arg(long)]
    pub since: Option<PathBuf>,
}

/// Cumulative bucket counts by upper bound (seconds), ascending; the last is
/// `+Inf`.
#[derive(Debug, Clone, PartialEq)]
pub struct Buckets(pub Vec<(f64, u64)>);

impl Buckets {
    /// The buckets of histogram `name` in a Prometheus text exposition.
    pub fn parse(text: &str, name: &str) -> anyhow::Result<Buckets> {
        let prefix = format!("{name}_bucket{{");
        let mut out = Vec::new();
        for line in text.lines().filter(|l| l.starts_with(&prefix)) {
            let (labels, count) = line[prefix.len()..]
                .split_once("} ")
                .with_context(|| format!("malformed bucket line: {line}"))?;
            let le = labels
                .split(',')
                .find_map(|l| l.trim().strip_prefix("le=\""))
                .and_then(|l| l.strip_suffix('"'))
                .with_context(|| format!("bucket without le: {line}"))?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().with_context(|| format!("bad le in: {line}"))?
            };
            let count = count
                .trim()
                .parse()
                .with_context(|| format!("bad count in: {line}"))?;
            out.push((bound, count));
        }
        if out.is_empty() {
            bail!("no histogram named {name} in the exposition");
        }
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(Buckets(out))
    }

    /// These counts minus an earlier reading of the same histogram.
    pub fn minus(&self, earlier: &Buckets) -> anyhow::Result<Buckets> {
        if self.0.len() != earlier.0.len() {
            bail!("the two readings have different buckets");
        }
        let diff = self
            .0
            .iter()
            .zip(&earlier.0)
            .map(|(&(b, now), &(b0, then))| {
                if b != b0 && !(b.is_infinite() && b0.is_infinite()) {
                    bail!("the two readings have different buckets");
                }
                Ok((b, now.saturating_sub(then)))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Buckets(diff))
    }

    /// Observations counted.
    pub fn count(&self) -> u64 {
        self.0.last().map_or(0, |&(_, c)| c)
    }

    /// The `q` quantile (0..=1) in seconds, or `None` without observations.
    /// Past the last finite bucket it answers that bucket's bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let (mut lower, mut below) = (0.0, 0u64);
        for &(bound, count) in &self.0 {
            if count as f64 >= rank {
                if bound.is_infinite() {
                    return Some(lower);
                }
                let inside = (count - below) as f64;
                let frac = if inside > 0.0 {
                    (rank - below as f64) / inside
                } else {
                    1.0
                };
                return Some(lower + (bound - lower) * frac);
            }
            (lower, below) = (bound, count);
        }
        Some(lower)
    }

    /// One `bound count` line per bucket.
    pub fn to_text(&self) -> String {
        self.0.iter().map(|(b, c)| format!("{b} {c}\n")).collect()
    }

    /// Reads [`Buckets::to_text`]'s output.
    pub fn from_text(text: &str) -> anyhow::Result<Buckets> {
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (b, c) = line
                .split_once(' ')
                .with_context(|| format!("bad saved bucket: {line}"))?;
            let bound = if b == "inf" {
                f64::INFINITY
            } else {
                b.parse()?
            };
            out.push((bound, c.parse()?));
        }
        Ok(Buckets(out))
    }
}

/// What `frpx-bench histogram` prints.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// Observations in the window.
    pub count: u64,
    /// Median, µs.
    pub p50_us: Option<f64>,
    /// 99th percentile, µs.
    pub p99_us: Option<f64>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = |v: Option<f64>| v.map_or("none".to_owned(), |v| format!("{v:.1}"));
        write!(
            f,
            "count={} p50_us={} p99_us={}",
            self.count,
            us(self.p50_us),
            us(self.p99_us)
        )
    }
}

/// Reads the histogram, saves and/or subtracts as asked.
pub async fn run(args: Args) -> anyhow::Result<Report> {
    let target = Target::parse(&args.url)?;
    let mut sender = client::connect(&target.addr).await?;
    let (status, body) = client::fetch(&mut sender, target.get(None, true)?).await?;
    if status != 200 {
        bail!("{} answered {status}", args.url);
    }
    let text = std::str::from_utf8(&body).context("metrics are not UTF-8")?;
    let now = Buckets::parse(text, &args.name)?;
    if let Some(path) = &args.save {
        std::fs::write(path, now.to_text())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let window = match &args.since {
        Some(path) => {
            let saved = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            now.minus(&Buckets::from_text(&saved)?)?
        }
        None => now,
    };
    let us = |q| window.quantile(q).map(|s| s * 1e6);
    Ok(Report {
        count: window.count(),
        p50_us: us(0.5),
        p99_us: us(0.99),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE frpx_x_seconds histogram\n\
        frpx_x_seconds_sum 1.0\n\
        frpx_x_seconds_count 100\n\
        frpx_x_seconds_bucket{le=\"0.00001\"} 10\n\
        frpx_x_seconds_bucket{le=\"0.00002\"} 90\n\
        frpx_x_seconds_bucket{le=\"0.00004\"} 99\n\
        frpx_x_seconds_bucket{le=\"+Inf\"} 100\n\
        frpx_other_bucket{le=\"1\"} 5\n";

    #[test]
    fn buckets_are_read_and_interpolated() {
        let b = Buckets::parse(TEXT, "frpx_x_seconds").unwrap();
        assert_eq!(b.0.len(), 4);
        assert_eq!(b.count(), 100);
        // Rank 50 lies half way through the (10 µs, 20 µs] bucket.
        let p50 = b.quantile(0.5).unwrap();
        assert!((p50 - 15e-6).abs() < 1e-9, "{p50}");
        // Rank 99 is the top of the (20 µs, 40 µs] bucket.
        let p99 = b.quantile(0.99).unwrap();
        assert!((p99 - 40e-6).abs() < 1e-9, "{p99}");
        // Past the last finite bound: that bound.
        assert_eq!(b.quantile(1.0), Some(40e-6));
    }

    #[test]
    fn an_earlier_reading_is_subtracted() {
        let now = Buckets::parse(TEXT, "frpx_x_seconds").unwrap();
        let saved = Buckets::from_text(&now.to_text()).unwrap();
        assert_eq!(saved, now);
        let window = now.minus(&saved).unwrap();
        assert_eq!(window.count(), 0);
        assert_eq!(window.quantile(0.5), None);
        let earlier = Buckets(vec![
            (1e-5, 10),
            (2e-5, 10),
            (4e-5, 10),
            (f64::INFINITY, 10),
        ]);
        let window = now.minus(&earlier).unwrap();
        assert_eq!(window.count(), 90);
        // All 80 new observations in (10, 20] µs and 9 in (20, 40]: the
        // median is inside the first.
        let p50 = window.quantile(0.5).unwrap();
        assert!(p50 > 1e-5 && p50 < 2e-5, "{p50}");
    }

    #[test]
    fn a_missing_histogram_is_an_error() {
        assert!(Buckets::parse(TEXT, "frpx_missing").is_err());
        let other = Buckets(vec![(1.0, 1), (f64::INFINITY, 1)]);
        let now = Buckets::parse(TEXT, "frpx_x_seconds").unwrap();
        assert!(now.minus(&other).is_err());
    }
}
