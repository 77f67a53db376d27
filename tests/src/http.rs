//! HTTP helpers for talking to the public port.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::WAIT;

/// A response, fully read.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: StatusCode,
    /// Headers.
    pub headers: http::HeaderMap,
    /// Body as text.
    pub body: String,
}

impl Reply {
    /// The body parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One keep-alive HTTP/1.1 connection.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    addr: SocketAddr,
}

impl Conn {
    /// Connects to `addr`.
    pub async fn open(addr: SocketAddr) -> Conn {
        let (sender, conn) = tokio::time::timeout(WAIT, async {
            let stream = TcpStream::connect(addr).await.expect("connect");
            http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake")
        })
        .await
        .expect("connect and handshake within WAIT");
        tokio::spawn(conn);
        Conn { sender, addr }
    }

    /// Connects to `addr` from the loopback address `from` (127.x.y.z on
    /// Linux), as another caller would.
    pub async fn open_from(addr: SocketAddr, from: std::net::IpAddr) -> Conn {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::new(from, 0)).expect("bind source");
        let (sender, conn) = tokio::time::timeout(WAIT, async {
            let stream = socket.connect(addr).await.expect("connect");
            http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake")
        })
        .await
        .expect("connect and handshake within WAIT");
        tokio::spawn(conn);
        Conn { sender, addr }
    }

    /// Sends a request built by the caller, returning the streaming response.
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> hyper::Result<Response<Incoming>> {
        tokio::time::timeout(WAIT, async {
            self.sender.ready().await?;
            self.sender.send_request(req).await
        })
        .await
        .expect("response in time")
    }

    /// GET `path` with an optional bearer key; reads the whole body.
    pub async fn get(&mut self, path: &str, key: Option<&str>) -> Reply {
        let req = request("GET", self.addr, path, key, Bytes::new());
        read(self.send(req).await.expect("request")).await
    }

    /// POST `body` to `path` with an optional bearer key; reads the whole body.
    pub async fn post(&mut self, path: &str, key: Option<&str>, body: impl Into<Bytes>) -> Reply {
        let req = request("POST", self.addr, path, key, body.into());
        read(self.send(req).await.expect("request")).await
    }
}

/// Builds a request with an optional bearer key.
pub fn request(
    method: &str,
    addr: SocketAddr,
    path: &str,
    key: Option<&str>,
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    if let Some(key) = key {
        b = b.header("authorization", format!("Bearer {key}"));
    }
    b.body(Full::new(body)).unwrap()
}

/// Reads a whole response.
pub async fn read(resp: Response<Incoming>) -> Reply {
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(WAIT, body.collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// GET on a fresh connection.
pub async fn get(addr: SocketAddr, path: &str, key: Option<&str>) -> Reply {
    Conn::open(addr).await.get(path, key).await
}

/// Starts `/hold` on a fresh connection to `public` and reads its first
/// chunk: the response headers are sent and the body is streaming.
pub async fn start_hold(public: SocketAddr, key: &str) -> (Conn, Response<Incoming>) {
    let mut conn = Conn::open(public).await;
    let req = request("GET", public, "/hold", Some(key), Bytes::new());
    let mut resp = conn.send(req).await.expect("hold request");
    assert_eq!(resp.status(), 200);
    let first = tokio::time::timeout(WAIT, resp.body_mut().frame())
        .await
        .expect("first chunk in time")
        .expect("a chunk")
        .expect("chunk");
    assert!(first.data_ref().is_some_and(|d| d.starts_with(b"started")));
    (conn, resp)
}

/// What one read of `from` brings within [`WAIT`] (the start of an answer
/// sent on a raw connection), as text; panics with `expect` when nothing
/// comes in time.
pub async fn first_read<R: tokio::io::AsyncRead + Unpin>(from: &mut R, expect: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, from.read(&mut answer))
        .await
        .expect(expect)
        .expect("read");
    String::from_utf8_lossy(&answer[..n]).into_owned()
}
