//! Fleet simulation: N simulated GPU boxes, each serving one request at a
//! time (further requests wait inside the box, as in Ollama), with service
//! times drawn from an exponential distribution, under Poisson arrivals at
//! several fractions of fleet capacity, through real frps and frpc on
//! loopback. For each `--balance` strategy it reports end-to-end p50/p99 and
//! throughput, next to an ideal central FIFO queue (M/M/c) simulated with the
//! same arrival and service samples.
//!
//! `cargo run --release -p frpx-bench --bin fleet_sim -- --help`

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rand::Rng;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(about = "Fleet simulation: routing strategies under Poisson load")]
struct Args {
    /// Simulated boxes.
    #[arg(long, default_value_t = 4)]
    boxes: usize,
    /// Mean service time, milliseconds.
    #[arg(long, default_value_t = 20.0)]
    service_ms: f64,
    /// Requests per (strategy, load) run.
    #[arg(long, default_value_t = 1500)]
    requests: usize,
    /// Loads as fractions of fleet capacity.
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.8,0.95")]
    loads: Vec<f64>,
    /// Where to write the markdown table.
    #[arg(long, default_value = "bench/results/fleet.md")]
    out: String,
    /// Seed of the random samples (same samples for every strategy).
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

const API_KEY: &str = "fleet-sim-key";
const EMAIL: &str = "sim@example.com";
const PASSWORD: &str = "fleet-sim-password";

/// A box: one request at a time, the rest wait in its own queue.
async fn start_box(name: String) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let gpu = Arc::new(Semaphore::new(1));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let (gpu, name) = (gpu.clone(), name.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (gpu, name) = (gpu.clone(), name.clone());
                    async move {
                        if req.uri().path() == "/api/tags" {
                            let body = r#"{"models":[{"name":"sim:latest"}]}"#;
                            return Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
                                body,
                            ))));
                        }
                        let ms: f64 = req
                            .headers()
                            .get("x-service-ms")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0.0);
                        let _ = req.into_body().collect().await;
                        let _slot = gpu.acquire().await.expect("semaphore open");
                        tokio::time::sleep(Duration::from_secs_f64(ms / 1000.0)).await;
                        Ok(Response::new(Full::new(Bytes::from(name.clone()))))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

struct Fleet {
    public: SocketAddr,
    stop: CancellationToken,
    frps: tokio::task::JoinHandle<anyhow::Result<()>>,
    state: Arc<frps::state::State>,
}

async fn start_fleet(
    args: &Args,
    balance: frps::router::Balance,
    capacity: Option<u32>,
    dir: &std::path::Path,
) -> anyhow::Result<Fleet> {
    let db = format!("sqlite://{}/sim-{balance:?}-{capacity:?}.db", dir.display());
    let mut cfg = frps::Config::ephemeral(API_KEY, &db);
    cfg.balance = balance;
    cfg.queue_max = usize::MAX;
    cfg.queue_timeout = Duration::from_secs(600);
    cfg.log = "warn".into();
    let server = frps::Server::bind(cfg).await?;
    let state = server.state();
    let addrs = server.addrs();
    if state.store.find_user(EMAIL).await?.is_none() {
        state
            .store
            .create_user(EMAIL, &frps::auth::accounts::hash_password(PASSWORD))
            .await?;
    }
    let frps = tokio::spawn(server.run());
    let stop = CancellationToken::new();
    for i in 0..args.boxes {
        let name = format!("box-{i}");
        let backend = start_box(name.clone()).await?;
        let mut c = <frpc::Config as clap::Parser>::parse_from(["frpc"]);
        c.client_id = Some(name.clone());
        c.server_addr = "127.0.0.1".into();
        c.control_port = addrs.control.port();
        c.proxy_port = addrs.proxy.port();
        c.local_port = backend.port();
        c.email = Some(EMAIL.into());
        c.password = Some(PASSWORD.into());
        c.no_prompt = true;
        // Loopback only: no TLS between the simulated boxes and frps.
        c.insecure_plaintext = true;
        c.max_concurrency = capacity;
        c.token_file = dir.join(format!("{balance:?}-{capacity:?}-{name}.json"));
        tokio::spawn(frpc::run(c, stop.clone()));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while state.registry.len() < args.boxes {
        anyhow::ensure!(Instant::now() < deadline, "clients did not register");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Fleet {
        public: addrs.public,
        stop,
        frps,
        state,
    })
}

/// Exponential sample with the given mean.
fn exp(rng: &mut impl Rng, mean: f64) -> f64 {
    -mean * (1.0 - rng.random::<f64>()).ln()
}

/// (arrival offset ms, service ms) per request.
fn samples(args: &Args, load: f64, seed: u64) -> Vec<(f64, f64)> {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let rate_per_ms = load * args.boxes as f64 / args.service_ms;
    let mut t = 0.0;
    (0..args.requests)
        .map(|_| {
            t += exp(&mut rng, 1.0 / rate_per_ms);
            (t, exp(&mut rng, args.service_ms))
        })
        .collect()
}

/// Latencies of an ideal central FIFO queue with `c` servers (ms).
fn ideal(samples: &[(f64, f64)], c: usize) -> Vec<f64> {
    let mut free_at = vec![0.0f64; c];
    samples
        .iter()
        .map(|&(arrival, service)| {
            let (i, &t) = free_at
                .iter()
                .enumerate()
                .min_by(|a, b| a.1.total_cmp(b.1))
                .expect("servers");
            let start = arrival.max(t);
            free_at[i] = start + service;
            start + service - arrival
        })
        .collect()
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn one_request(public: SocketAddr, service_ms: f64) -> anyhow::Result<()> {
    let stream = TcpStream::connect(public).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::post("/v1/chat/completions")
        .header("host", "sim")
        .header("authorization", format!("Bearer {API_KEY}"))
        .header("x-service-ms", format!("{service_ms:.3}"))
        .body(Full::new(Bytes::from_static(br#"{"model":"sim"}"#)))?;
    let resp = sender.send_request(req).await?;
    anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
    resp.into_body().collect().await?;
    Ok(())
}

/// Runs the arrivals against the fleet; returns latencies (ms) and seconds taken.
async fn run_load(
    public: SocketAddr,
    samples: &[(f64, f64)],
) -> anyhow::Result<(Vec<f64>, f64, usize)> {
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(samples.len());
    for &(arrival, service) in samples {
        let at = start + Duration::from_secs_f64(arrival / 1000.0);
        tokio::time::sleep_until(at.into()).await;
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let r =
                tokio::time::timeout(Duration::from_secs(60), one_request(public, service)).await;
            (
                sent.elapsed().as_secs_f64() * 1000.0,
                matches!(r, Ok(Ok(()))),
            )
        }));
    }
    let mut lat = Vec::with_capacity(tasks.len());
    let mut errors = 0;
    for t in tasks {
        let (ms, ok) = t.await?;
        if ok {
            lat.push(ms);
        } else {
            errors += 1;
        }
    }
    Ok((lat, start.elapsed().as_secs_f64(), errors))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("frpx-fleet-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // Without a capacity the boxes queue internally (as Ollama does); with
    // `--max-concurrency 1` frps holds the queue (a central FIFO queue).
    let strategies = [
        (frps::router::Balance::Random, None),
        (frps::router::Balance::LeastConn, None),
        (frps::router::Balance::P2c, None),
        (frps::router::Balance::LeastConn, Some(1)),
    ];
    let mut rows = Vec::new();
    let mut summary = Vec::new();
    for (li, &load) in args.loads.iter().enumerate() {
        let s = samples(&args, load, args.seed + li as u64);
        let mut ideal_lat = ideal(&s, args.boxes);
        ideal_lat.sort_by(f64::total_cmp);
        let ideal_p99 = quantile(&ideal_lat, 0.99);
        rows.push(format!(
            "| ideal central queue | {:.0}% | - | {:.1} | {:.1} | 1.00 |",
            load * 100.0,
            quantile(&ideal_lat, 0.5),
            ideal_p99
        ));
        let mut p99s = std::collections::HashMap::new();
        for (balance, capacity) in strategies {
            let label = match capacity {
                Some(n) => format!("{balance:?} + max-concurrency {n}"),
                None => format!("{balance:?}"),
            };
            let fleet = start_fleet(&args, balance, capacity, &dir).await?;
            let (mut lat, secs, errors) = run_load(fleet.public, &s).await?;
            lat.sort_by(f64::total_cmp);
            let p99 = quantile(&lat, 0.99);
            p99s.insert(label.clone(), p99);
            rows.push(format!(
                "| {label} | {:.0}% | {:.1} | {:.1} | {:.1} | {:.2} |{}",
                load * 100.0,
                lat.len() as f64 / secs,
                quantile(&lat, 0.5),
                p99,
                p99 / ideal_p99,
                if errors > 0 {
                    format!(" {errors} errors")
                } else {
                    String::new()
                }
            ));
            fleet.stop.cancel();
            fleet.state.shutdown.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(10), fleet.frps).await;
        }
        if (load - 0.8).abs() < 1e-9 {
            let rnd = p99s["Random"];
            for label in ["LeastConn", "LeastConn + max-concurrency 1"] {
                let lc = p99s[label];
                summary.push(format!(
                    "At 80% load, {label}: p99 = {:.2}x ideal (target <= 1.5x); random p99 / its p99 = {:.2} (target >= 3).",
                    lc / ideal_p99,
                    rnd / lc
                ));
            }
        }
    }
    let mut table = format!(
        "Fleet simulation: {} boxes, exponential service time mean {} ms, Poisson arrivals, {} requests per run.\n\n\
         | strategy | load | throughput (req/s) | p50 (ms) | p99 (ms) | p99 / ideal p99 |\n|---|---|---|---|---|---|\n",
        args.boxes, args.service_ms, args.requests
    );
    for r in rows {
        table.push_str(&r);
        table.push('\n');
    }
    for s in summary {
        table.push('\n');
        table.push_str(&s);
        table.push('\n');
    }
    println!("{table}");
    if let Some(parent) = std::path::Path::new(&args.out).parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, &table).with_context(|| format!("cannot write {}", args.out))?;
    eprintln!("written to {}", args.out);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
