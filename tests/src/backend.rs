//! A small HTTP backend standing in for Ollama: echoes requests, lists a
//! model, streams server-sent events on cue, and records every request head.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

type BackendBody = Either<Full<Bytes>, Channel<Bytes>>;

/// What the backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The request target as it arrived (origin or absolute form).
    pub target: String,
    /// Request path.
    pub path: String,
    /// Query string.
    pub query: Option<String>,
    /// Request headers.
    pub headers: HeaderMap,
}

#[derive(Default)]
struct Shared {
    name: String,
    models: Mutex<Vec<String>>,
    seen: Mutex<Vec<Seen>>,
    /// Released by the test to let `/sse` send its last event.
    sse_release: Notify,
    /// Set by the test to let every `/hold` stream finish.
    hold_release: tokio::sync::watch::Sender<bool>,
    /// `/hold` streams whose caller went away before the end.
    cancelled: std::sync::atomic::AtomicUsize,
    /// `/hold` streams in progress.
    holding: std::sync::atomic::AtomicUsize,
    /// Answer 404 on the model-list endpoints, like a plain HTTP server.
    no_model_list: std::sync::atomic::AtomicBool,
    /// The status every request but the model list gets (0: none, each
    /// path answers as it does).
    failing: std::sync::atomic::AtomicU16,
}

/// A running backend.
pub struct Backend {
    /// Its address.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Backend {
    /// Starts a backend that answers as `name`.
    pub async fn start(name: &str) -> Backend {
        Self::start_on(name, "127.0.0.1:0".parse().unwrap()).await
    }

    /// [`Backend::start`] on `addr` (a stopped backend's, to bring it back).
    pub async fn start_on(name: &str, addr: SocketAddr) -> Backend {
        let listener = TcpListener::bind(addr).await.expect("backend binds");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            models: Mutex::new(vec![format!("model-of-{name}")]),
            ..Default::default()
        });
        let sh = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let sh = sh.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| serve(sh.clone(), req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend { addr, shared, task }
    }

    /// Every request head seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// The request heads seen, in order, but frpc's model-list probes.
    pub fn requests(&self) -> Vec<Seen> {
        let mut seen = self.seen();
        seen.retain(|s| s.path != "/api/tags");
        seen
    }

    /// Paths of [`Backend::requests`].
    pub fn paths(&self) -> Vec<String> {
        self.requests().into_iter().map(|s| s.path).collect()
    }

    /// Number of [`Backend::requests`].
    pub fn hits(&self) -> usize {
        self.requests().len()
    }

    /// Replaces the models `/api/tags` reports.
    pub fn set_models(&self, models: &[&str]) {
        *self.shared.models.lock().unwrap() = models.iter().map(|m| m.to_string()).collect();
    }

    /// Lets a waiting `/sse` stream send its last event.
    pub fn release_sse(&self) {
        self.shared.sse_release.notify_one();
    }

    /// Makes the model-list endpoints answer 404, like a plain HTTP server.
    pub fn without_model_list(&self) {
        self.shared
            .no_model_list
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Answers every request but the model list with `status` (a service
    /// whose model cannot load); 0 answers as before.
    pub fn fail_with(&self, status: u16) {
        self.shared
            .failing
            .store(status, std::sync::atomic::Ordering::SeqCst);
    }

    /// Lets every `/hold` stream (current and future) finish.
    pub fn release_holds(&self) {
        self.shared.hold_release.send_replace(true);
    }

    /// `/hold` streams in progress.
    pub fn holding(&self) -> usize {
        self.shared
            .holding
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `/hold` streams abandoned by their caller.
    pub fn cancelled(&self) -> usize {
        self.shared
            .cancelled
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops accepting (existing connections keep running).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The request's `ms=N` query parameter, 50 when absent.
fn query_ms<B>(req: &Request<B>) -> u64 {
    req.uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ms=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}

async fn serve(
    sh: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<BackendBody>, Infallible> {
    let path = req.uri().path().to_owned();
    sh.seen.lock().unwrap().push(Seen {
        target: req.uri().to_string(),
        path: path.clone(),
        query: req.uri().query().map(str::to_owned),
        headers: req.headers().clone(),
    });
    let full = |status: u16, ct: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", ct)
            .body(Either::Left(Full::new(Bytes::from(body))))
            .unwrap()
    };
    let no_list = sh.no_model_list.load(std::sync::atomic::Ordering::SeqCst);
    let failing = sh.failing.load(std::sync::atomic::Ordering::SeqCst);
    let resp = match path.as_str() {
        "/api/tags" | "/v1/models" if no_list => full(404, "text/plain", "not found".into()),
        "/api/tags" => full(200, "application/json", {
            let models: Vec<_> = sh
                .models
                .lock()
                .unwrap()
                .iter()
                .map(|m| serde_json::json!({"name": m, "size": 1}))
                .collect();
            serde_json::json!({ "models": models }).to_string()
        }),
        // A service that lists its models but fails every request (one
        // whose model cannot load).
        _ if failing != 0 => full(
            failing,
            "application/json",
            serde_json::json!({"error": format!("{} cannot load its model", sh.name)}).to_string(),
        ),
        "/sse" => {
            let (mut tx, body) = Channel::<Bytes>::new(4);
            let sh = sh.clone();
            tokio::spawn(async move {
                let _ = tx.send_data(Bytes::from("data: first\n\n")).await;
                sh.sse_release.notified().await;
                let _ = tx.send_data(Bytes::from("data: last\n\n")).await;
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Either::Right(body))
                .unwrap()
        }
        "/hold" => {
            // Streams "started", then a ping every 20 ms until released,
            // then "done"; notices when the caller goes away.
            let (mut tx, body) = Channel::<Bytes>::new(4);
            let sh = sh.clone();
            sh.holding.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut released = sh.hold_release.subscribe();
                let mut alive = tx
                    .send_data(Bytes::from(format!("started {}\n", sh.name)))
                    .await
                    .is_ok();
                while alive && !*released.borrow() {
                    tokio::select! {
                        _ = released.changed() => {}
                        _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {
                            alive = tx.send_data(Bytes::from_static(b": ping\n")).await.is_ok();
                        }
                    }
                }
                if alive {
                    let _ = tx.send_data(Bytes::from_static(b"done\n")).await;
                } else {
                    sh.cancelled
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                sh.holding.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            });
            Response::builder()
                .header("content-type", "text/plain")
                .body(Either::Right(body))
                .unwrap()
        }
        "/sleep" => {
            let ms = query_ms(&req);
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            full(
                200,
                "application/json",
                serde_json::json!({"backend": sh.name, "path": path, "query": req.uri().query()})
                    .to_string(),
            )
        }
        "/early" => {
            // Answers at once and reads the body after (keeping the
            // connection for the next request once it has all of it).
            tokio::spawn(req.into_body().collect());
            full(200, "application/json", r#"{"early":true}"#.into())
        }
        "/early-deaf" => {
            // Answers at once and never reads the body, keeping the
            // connection open (the body is held, unread, for a minute).
            let body = req.into_body();
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                drop(body);
            });
            full(200, "application/json", r#"{"early":true}"#.into())
        }
        "/big-head" => {
            // A response head with a header of `bytes=N` bytes.
            let n: usize = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("bytes="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            Response::builder()
                .header("x-filler", "f".repeat(n))
                .body(Either::Left(Full::new(Bytes::from_static(b"big head"))))
                .unwrap()
        }
        "/status" => {
            // Answers with the status its query names (`?code=500`).
            let code = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("code=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or(200);
            full(
                code,
                "application/json",
                serde_json::json!({"backend": sh.name, "status": code}).to_string(),
            )
        }
        "/slow-read" => {
            // Takes the body slowly, `ms=N` after each 16 KiB (a service
            // that reads uploads slowly), and answers its length.
            let ms = query_ms(&req);
            let mut body = req.into_body();
            let mut len = 0usize;
            while let Some(Ok(frame)) = body.frame().await {
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                len += data.len();
                let pause = ms * data.len() as u64 / (16 * 1024);
                tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
            }
            full(
                200,
                "application/json",
                serde_json::json!({"backend": sh.name, "read": len}).to_string(),
            )
        }
        "/echo" => {
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Response::builder()
                .header("x-backend", sh.name.as_str())
                .body(Either::Left(Full::new(body)))
                .unwrap()
        }
        _ => {
            // A small body with its length announced (an inference
            // request) is read and sent back as `body`, so a test sees what
            // reached the box; any other body is left unread.
            let small = req
                .headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
                .is_some_and(|n| n > 0 && n <= 64 * 1024);
            let body = if small {
                let bytes = req.into_body().collect().await.map(|b| b.to_bytes());
                bytes.ok().map(|b| String::from_utf8_lossy(&b).into_owned())
            } else {
                None
            };
            full(
                200,
                "application/json",
                serde_json::json!({"backend": sh.name, "path": path, "body": body}).to_string(),
            )
        }
    };
    Ok(resp)
}
