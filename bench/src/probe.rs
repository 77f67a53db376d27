//! Readiness polling and free-port picking, so the script never sleeps a
//! fixed time waiting for a server.

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::client::{self, Target};

/// Pause between two readiness attempts.
const POLL: Duration = Duration::from_millis(20);

/// `frpx-bench wait` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// URL to GET until it answers 200.
    #[arg(long)]
    pub url: String,
    /// API key, sent as `Authorization: Bearer <key>`.
    #[arg(long)]
    pub key: Option<String>,
    /// Also require the body to contain this text.
    #[arg(long)]
    pub contains: Option<String>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
}

/// Polls `args.url` until it answers 200 (with the wanted body); returns
/// how long that took.
pub async fn wait(args: WaitArgs) -> anyhow::Result<Duration> {
    let target = Target::parse(&args.url)?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let mut last = String::from("no attempt made");
    while Instant::now() < deadline {
        let attempt = tokio::time::timeout(Duration::from_secs(2), async {
            let mut sender = client::connect(&target.addr).await?;
            client::fetch(&mut sender, target.get(args.key.as_deref(), true)?).await
        })
        .await;
        match attempt {
            Ok(Ok((200, body))) => {
                let wanted = args.contains.as_deref().unwrap_or("");
                if String::from_utf8_lossy(&body).contains(wanted) {
                    return Ok(started.elapsed());
                }
                last = format!("200 without {wanted:?} in the body");
            }
            Ok(Ok((status, _))) => last = format!("status {status}"),
            Ok(Err(e)) => last = format!("{e:#}"),
            Err(_) => last = "no answer within 2s".into(),
        }
        tokio::time::sleep(POLL).await;
    }
    Err(anyhow::anyhow!("last attempt: {last}"))
        .with_context(|| format!("{} not ready within {}s", args.url, args.timeout_secs))
}

/// A port on 127.0.0.1 that was free a moment ago (for servers, like nginx,
/// that cannot bind port 0 and report it).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
