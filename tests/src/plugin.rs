//! A real server plugin over HTTP (axum, in-process, port 0): it records
//! every call and answers as the test's handler decides.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use frps::plugins::PluginSpec;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::WAIT;

/// The path every test plugin is configured with.
pub const PLUGIN_PATH: &str = "/handler";

/// One call as the plugin received it.
#[derive(Debug, Clone)]
pub struct PluginCall {
    /// Request path.
    pub path: String,
    /// Raw query string.
    pub query: String,
    /// `X-Frp-Reqid`.
    pub reqid: String,
    /// `Content-Type`.
    pub content_type: String,
    /// `Authorization` (empty without one).
    pub authorization: String,
    /// The JSON body.
    pub body: Value,
}

impl PluginCall {
    /// The body's `op`.
    pub fn op(&self) -> &str {
        self.body["op"].as_str().unwrap_or_default()
    }

    /// The body's `content`.
    pub fn content(&self) -> &Value {
        &self.body["content"]
    }
}

/// How the plugin answers a call.
#[derive(Debug, Clone)]
pub enum Reply {
    /// `{"reject": false, "unchange": true}`.
    Allow,
    /// `{"reject": true, "reject_reason": R}`.
    Reject(String),
    /// `{"unchange": "false", "content": C}` (the string form of the seed).
    Replace(Value),
    /// This JSON, with status 200.
    Json(Value),
    /// An empty answer with this status.
    Status(u16),
    /// This text with this status.
    StatusWith(u16, String),
    /// This body as it is, with status 200.
    Raw(String),
    /// This status (a redirect) with this `Location`.
    Redirect(u16, String),
    /// Never answers.
    Hang,
    /// Allows, after this long.
    AllowAfter(std::time::Duration),
    /// Allows, with an `x-pad` header of this many bytes.
    AllowPadded(usize),
}

type Handler = Arc<dyn Fn(&PluginCall) -> Reply + Send + Sync>;

struct Shared {
    handler: Handler,
    calls: Mutex<Vec<PluginCall>>,
    count: watch::Sender<usize>,
    /// Calls being answered now, and the most there ever were at once.
    answering: Mutex<(usize, usize)>,
}

/// Counts a call as being answered while it lives.
struct Answering(Arc<Shared>);

impl Answering {
    fn new(sh: Arc<Shared>) -> Self {
        {
            let mut n = sh.answering.lock().unwrap();
            n.0 += 1;
            n.1 = n.1.max(n.0);
        }
        Answering(sh)
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.answering.lock().unwrap().0 -= 1;
    }
}

/// A running plugin.
pub struct PluginServer {
    /// Its address.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl PluginServer {
    /// Starts a plugin answering with `handler`.
    pub async fn start(handler: impl Fn(&PluginCall) -> Reply + Send + Sync + 'static) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("plugin binds");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            handler: Arc::new(handler),
            calls: Mutex::new(Vec::new()),
            count: watch::Sender::new(0),
            answering: Mutex::new((0, 0)),
        });
        let sh = shared.clone();
        let app = Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
            let sh = sh.clone();
            async move { answer(sh, uri, headers, body).await }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        PluginServer { addr, shared, task }
    }

    /// The most calls it was answering at once so far (a call counts from
    /// its arrival until its answer is ready, or the caller gave up).
    pub fn most_at_once(&self) -> usize {
        self.shared.answering.lock().unwrap().1
    }

    /// A plugin that allows everything.
    pub async fn allow_all() -> Self {
        Self::start(|_| Reply::Allow).await
    }

    /// This plugin's configuration for `ops`, named `name`.
    pub fn spec(&self, name: &str, ops: &[&str]) -> PluginSpec {
        PluginSpec::new(name, &self.addr.to_string(), PLUGIN_PATH, ops).expect("valid plugin")
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<PluginCall> {
        self.shared.calls.lock().unwrap().clone()
    }

    /// The calls for `op` so far.
    pub fn calls_for(&self, op: &str) -> Vec<PluginCall> {
        self.calls().into_iter().filter(|c| c.op() == op).collect()
    }

    /// Waits until `op` was called at least once; returns its first call.
    pub async fn wait_for(&self, op: &str) -> PluginCall {
        let mut count = self.shared.count.subscribe();
        let wait = async {
            loop {
                if let Some(call) = self.calls_for(op).into_iter().next() {
                    return call;
                }
                count.changed().await.expect("plugin alive");
            }
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .unwrap_or_else(|_| panic!("the plugin was never asked about {op}"))
    }
}

impl Drop for PluginServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(sh: Arc<Shared>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let call = PluginCall {
        path: uri.path().to_owned(),
        query: uri.query().unwrap_or_default().to_owned(),
        reqid: header("x-frp-reqid"),
        content_type: header("content-type"),
        authorization: header("authorization"),
        body: serde_json::from_slice(&body).unwrap_or_else(
            |e| json!({"unparsable": format!("{e}: {}", String::from_utf8_lossy(&body))}),
        ),
    };
    let _answering = Answering::new(sh.clone());
    let reply = (sh.handler)(&call);
    sh.calls.lock().unwrap().push(call);
    sh.count.send_modify(|n| *n += 1);
    let json = |v: Value| (StatusCode::OK, axum::Json(v)).into_response();
    match reply {
        Reply::Allow => json(json!({"reject": false, "unchange": true})),
        Reply::Reject(reason) => json(json!({"reject": true, "reject_reason": reason})),
        Reply::Replace(content) => json(json!({"unchange": "false", "content": content})),
        Reply::Json(v) => json(v),
        Reply::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
        Reply::StatusWith(code, text) => {
            (StatusCode::from_u16(code).unwrap(), text).into_response()
        }
        Reply::Raw(text) => (StatusCode::OK, text).into_response(),
        Reply::Redirect(code, location) => (
            StatusCode::from_u16(code).unwrap(),
            [(axum::http::header::LOCATION, location)],
        )
            .into_response(),
        Reply::Hang => std::future::pending().await,
        Reply::AllowPadded(n) => (
            [("x-pad", "p".repeat(n))],
            axum::Json(json!({"reject": false, "unchange": true})),
        )
            .into_response(),
        Reply::AllowAfter(delay) => {
            tokio::time::sleep(delay).await;
            json(json!({"reject": false, "unchange": true}))
        }
    }
}
