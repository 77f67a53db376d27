//! The Rust backend, used for server-sent events and in place of nginx when
//! nginx is absent. It serves the same paths the nginx configuration does:
//! - `/big.bin`: `--big-bytes` zero bytes, with a `Content-Length`;
//! - `/sse?events=N&interval_ms=M`: `N` events, one every `M` ms, each
//!   `data: <seq> <unix-nanoseconds at write>`;
//! - `/whoami`: [`IDENTITY`], to tell this backend from nginx;
//! - anything else: [`SMALL_BODY`].

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::channel::Channel;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::time::MissedTickBehavior;

/// Body of the small response (the same bytes nginx returns).
pub const SMALL_BODY: &str = "frpx bench\n";

/// Body of `/whoami`.
pub const IDENTITY: &str = "frpx-bench backend\n";

/// Largest chunk of `/big.bin` handed to hyper at once.
const CHUNK: usize = 256 * 1024;

static ZEROS: [u8; CHUNK] = [0; CHUNK];

/// `frpx-bench backend` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Port on 127.0.0.1 (0 picks a free one). The bound address is printed
    /// as `listening 127.0.0.1:PORT`.
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Size of `/big.bin` in bytes.
    #[arg(long, default_value_t = 1 << 30)]
    pub big_bytes: u64,
}

type BackendBody = BoxBody<Bytes, Infallible>;

/// Binds, prints the bound address, and serves until the process is killed.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", args.port)).await?;
    println!("listening {}", listener.local_addr()?);
    serve(listener, args.big_bytes).await
}

/// Serves HTTP/1.1 with keep-alive on `listener`.
pub async fn serve(listener: TcpListener, big_bytes: u64) -> anyhow::Result<()> {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors or an aborted handshake: keep serving.
                eprintln!("backend accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = service_fn(move |req| respond(req, big_bytes));
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn respond(
    req: Request<Incoming>,
    big_bytes: u64,
) -> Result<Response<BackendBody>, Infallible> {
    let text = |body: &'static str| {
        Response::builder()
            .header(CONTENT_TYPE, "text/plain")
            .body(Full::new(Bytes::from_static(body.as_bytes())).boxed())
    };
    let resp = match req.uri().path() {
        "/big.bin" => Response::builder()
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(
                Zeros {
                    remaining: big_bytes,
                }
                .boxed(),
            ),
        "/sse" => {
            let (events, interval) = sse_params(req.uri().query().unwrap_or(""));
            Response::builder()
                .header(CONTENT_TYPE, "text/event-stream")
                .header(CACHE_CONTROL, "no-cache")
                .body(sse_stream(events, interval).boxed())
        }
        "/whoami" => text(IDENTITY),
        _ => text(SMALL_BODY),
    };
    Ok(resp.expect("static response parts are valid"))
}

/// `events` and `interval_ms` from a query string (defaults: 200 and 10 ms).
fn sse_params(query: &str) -> (u64, Duration) {
    let mut events = 200;
    let mut interval_ms = 10;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("events", v)) => events = v.parse().unwrap_or(events),
            Some(("interval_ms", v)) => interval_ms = v.parse().unwrap_or(interval_ms),
            _ => {}
        }
    }
    (events, Duration::from_millis(interval_ms.max(1)))
}

/// Nanoseconds since the Unix epoch: one clock shared by every process on
/// the machine, so a stamp written here can be compared with a read time
/// taken in the SSE caller.
pub fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// A body that emits `events` server-sent events, one per `interval`, each
/// stamped just before it is handed to hyper.
fn sse_stream(events: u64, interval: Duration) -> Channel<Bytes> {
    let (mut tx, body) = Channel::<Bytes>::new(1);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        for seq in 0..events {
            tick.tick().await;
            let event = format!("data: {seq} {}\n\n", unix_nanos());
            if tx.send_data(Bytes::from(event)).await.is_err() {
                return;
            }
        }
    });
    body
}

/// `remaining` zero bytes, in chunks borrowed from one static buffer.
struct Zeros {
    remaining: u64,
}

impl Body for Zeros {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(CHUNK as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&ZEROS[..n])))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_query_is_parsed_with_defaults() {
        assert_eq!(sse_params(""), (200, Duration::from_millis(10)));
        assert_eq!(
            sse_params("events=5&interval_ms=2"),
            (5, Duration::from_millis(2))
        );
        assert_eq!(
            sse_params("events=x&interval_ms=0&other=1"),
            (200, Duration::from_millis(1))
        );
    }

    #[tokio::test]
    async fn zeros_body_has_exact_length() {
        let body = Zeros {
            remaining: CHUNK as u64 + 10,
        };
        assert_eq!(body.size_hint().exact(), Some(CHUNK as u64 + 10));
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes.len(), CHUNK + 10);
        assert!(bytes.iter().all(|&b| b == 0));
    }
}
