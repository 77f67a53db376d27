//! A minimal HTTP/1.1 client: one TCP connection per [`connect`], requests
//! built from a parsed `http://` URL, bodies drained frame by frame.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::Context;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONNECTION, HOST};
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};

/// Sender half of one client connection.
pub type Sender = SendRequest<Empty<Bytes>>;

/// Where requests go: a parsed `http://host:port/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port` to connect to.
    pub addr: String,
    /// Value of the `Host` header.
    pub authority: String,
    /// Path and query of every request.
    pub path: String,
}

impl Target {
    /// Parses an `http://` URL (no TLS: the benchmark runs on loopback).
    pub fn parse(url: &str) -> anyhow::Result<Target> {
        let uri: Uri = url.parse().with_context(|| format!("bad URL {url:?}"))?;
        anyhow::ensure!(
            uri.scheme_str() == Some("http"),
            "only http:// URLs are supported, got {url:?}"
        );
        let authority = uri
            .authority()
            .with_context(|| format!("URL {url:?} has no host"))?;
        let port = authority.port_u16().unwrap_or(80);
        Ok(Target {
            addr: format!("{}:{port}", authority.host()),
            authority: authority.as_str().to_owned(),
            path: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
        })
    }

    /// A GET for this target, with `Authorization: Bearer <key>` when a key
    /// is given and `Connection: close` when `close`.
    pub fn get(&self, key: Option<&str>, close: bool) -> anyhow::Result<Request<Empty<Bytes>>> {
        let mut req = Request::get(self.path.as_str()).header(HOST, self.authority.as_str());
        if let Some(key) = key {
            req = req.header(AUTHORIZATION, format!("Bearer {key}"));
        }
        if close {
            req = req.header(CONNECTION, "close");
        }
        Ok(req.body(Empty::new())?)
    }
}

/// Opens a connection to `addr` (with `TCP_NODELAY`) and completes the
/// HTTP/1.1 handshake. The connection task ends when the sender is dropped
/// or the peer closes.
pub async fn connect(addr: &str) -> anyhow::Result<Sender> {
    connect_from(addr, None).await
}

/// Like [`connect`], from the local address `source` when given.
pub async fn connect_from(addr: &str, source: Option<IpAddr>) -> anyhow::Result<Sender> {
    let stream = tcp(addr, source).await?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Opens a TCP connection to `addr` with `TCP_NODELAY`, from the local
/// address `source` when given.
pub async fn tcp(addr: &str, source: Option<IpAddr>) -> anyhow::Result<TcpStream> {
    let stream = match source {
        None => TcpStream::connect(addr).await,
        Some(ip) => {
            let peer = tokio::net::lookup_host(addr)
                .await?
                .find(|a| a.is_ipv4() == ip.is_ipv4())
                .with_context(|| format!("{addr} has no address of {ip}'s family"))?;
            let socket = if ip.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(peer).await
        }
    }
    .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The source address of connection `n` when connections are spread over
/// `count` loopback addresses (127.1.0.1, 127.1.0.2, ...), as many distinct
/// callers would be; `None` (the default address) when `count` is 0 or 1.
pub fn loopback_source(n: usize, count: usize) -> Option<IpAddr> {
    if count <= 1 {
        return None;
    }
    let k = n % count;
    let [hi, lo] = [(k / 250 % 256) as u8, (k % 250 + 1) as u8];
    Some(Ipv4Addr::new(127, 1, hi, lo).into())
}

/// Reads a response body to its end without keeping it; returns its length.
pub async fn drain(resp: Response<Incoming>) -> anyhow::Result<u64> {
    let mut body = resp.into_body();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            len += data.len() as u64;
        }
    }
    Ok(len)
}

/// Sends one request on `sender` and reads the whole answer; returns the
/// status and the body.
pub async fn fetch(
    sender: &mut Sender,
    req: Request<Empty<Bytes>>,
) -> anyhow::Result<(u16, Bytes)> {
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed() {
        let t = Target::parse("http://127.0.0.1:8080/sse?events=5").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080");
        assert_eq!(t.authority, "127.0.0.1:8080");
        assert_eq!(t.path, "/sse?events=5");
        let t = Target::parse("http://localhost").unwrap();
        assert_eq!((t.addr.as_str(), t.path.as_str()), ("localhost:80", "/"));
        assert!(Target::parse("https://x/").is_err());
        assert!(Target::parse("/no-host").is_err());
    }

    #[test]
    fn sources_cycle_over_loopback_addresses() {
        assert_eq!(loopback_source(7, 1), None);
        assert_eq!(loopback_source(0, 3), Some([127, 1, 0, 1].into()));
        assert_eq!(loopback_source(5, 3), Some([127, 1, 0, 3].into()));
        assert_eq!(loopback_source(250, 1000), Some([127, 1, 1, 1].into()));
    }

    #[tokio::test]
    async fn connections_leave_from_the_given_source() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let source = loopback_source(1, 2).unwrap();
        let _stream = tcp(&addr, Some(source)).await.unwrap();
        let (_, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), source);
    }

    #[test]
    fn requests_carry_host_key_and_close() {
        let t = Target::parse("http://127.0.0.1:1/a").unwrap();
        let req = t.get(Some("k"), true).unwrap();
        assert_eq!(req.headers()[HOST], "127.0.0.1:1");
        assert_eq!(req.headers()[AUTHORIZATION], "Bearer k");
        assert_eq!(req.headers()[CONNECTION], "close");
        let req = t.get(None, false).unwrap();
        assert!(!req.headers().contains_key(AUTHORIZATION));
        assert!(!req.headers().contains_key(CONNECTION));
    }
}
