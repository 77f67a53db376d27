//! Public port: an HTTP/1.1 server. Every request, including each one on a
//! keep-alive connection, is authenticated and routed on its own.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::auth::KeyCheck;
use crate::registry::ClientHandle;
use crate::router;
use crate::state::{State, Stats};
use crate::upstream::{self, AcquireError};

/// Body of a public response: streamed from upstream, or generated here.
pub type PublicBody = Either<TrackedBody, Full<Bytes>>;

/// Largest request head (line and headers) accepted, in bytes.
pub const MAX_HEAD: usize = 64 * 1024;

/// Failures of a client before any response byte reached the caller are
/// retried on another client this many times.
pub const RETRIES: usize = 1;

/// Accepts public connections until shutdown, then lets in-flight requests
/// finish (up to `--shutdown-timeout`).
pub async fn run(listener: TcpListener, state: Arc<State>) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(state.config.header_timeout)
        .max_buf_size(MAX_HEAD)
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = state.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!("public accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let st = state.clone();
        let svc = service_fn(move |req| handle(st.clone(), peer, req));
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc));
        state.tasks.spawn(async move {
            if let Err(e) = conn.await {
                debug!(%peer, "public connection ended: {e}");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = state.hard_stop.cancelled() => {}
    }
}

/// Handles one public request.
async fn handle(
    state: Arc<State>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<PublicBody>, Infallible> {
    Stats::inc(&state.stats.requests);
    match state.keys.check_headers(req.headers()).await {
        KeyCheck::Valid => {}
        KeyCheck::Missing => {
            Stats::inc(&state.stats.auth_failures);
            return Ok(error_response(
                StatusCode::UNAUTHORIZED,
                "missing API key: send `Authorization: Bearer <key>`",
                "invalid_request_error",
                "missing_api_key",
            ));
        }
        KeyCheck::Invalid => {
            Stats::inc(&state.stats.auth_failures);
            return Ok(error_response(
                StatusCode::UNAUTHORIZED,
                "invalid API key",
                "invalid_request_error",
                "invalid_api_key",
            ));
        }
        KeyCheck::Unavailable => {
            return Ok(error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "authentication backend unavailable",
                "service_unavailable",
                "auth_unavailable",
            ));
        }
    }
    Ok(forward(&state, peer, req).await)
}

/// Routes an authenticated request to a client and streams the answer back.
async fn forward(
    state: &Arc<State>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<PublicBody> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::AUTHORIZATION);
    parts.headers.remove("x-api-key");
    append_forwarded_for(&mut parts.headers, peer);
    let mut req = Request::from_parts(parts, Either::Right(body));

    let mut excluded: Vec<u64> = Vec::new();
    let mut last_error: Option<AcquireError> = None;
    loop {
        let Some(client) = router::pick(&state.registry, &excluded) else {
            return match last_error {
                None => {
                    Stats::inc(&state.stats.no_client);
                    error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no client is online to serve this request",
                        "service_unavailable",
                        "no_clients_available",
                    )
                }
                Some(e) => upstream_error(state, &e),
            };
        };
        info!("Chose client '{}' for the new connection", client.id);
        let up = match upstream::acquire(state, &client).await {
            Ok(up) => up,
            Err(e) => {
                warn!(client = %client.id, "client failed before responding: {e}");
                excluded.push(client.session);
                let give_up = excluded.len() > RETRIES;
                last_error = Some(e);
                if give_up {
                    return upstream_error(state, last_error.as_ref().expect("set"));
                }
                continue;
            }
        };
        set_host(&mut req, &client);
        let guard = InFlight::new(client.clone());
        let mut sender = up.sender;
        match sender.try_send_request(req).await {
            Ok(resp) => return respond(state, resp, guard, sender),
            Err(mut err) => {
                let Some(back) = err.take_message() else {
                    // Part of the request went out: it cannot be replayed.
                    Stats::inc(&state.stats.upstream_errors);
                    warn!(client = %client.id, "upstream request failed: {}", err.error());
                    return error_response(
                        StatusCode::BAD_GATEWAY,
                        "the client's local service failed while answering",
                        "upstream_error",
                        "upstream_failed",
                    );
                };
                // Not sent at all: a stale pooled connection says nothing
                // about the client; a fresh one failing counts against it.
                req = back;
                if !up.reused {
                    debug!(client = %client.id, "fresh upstream connection failed: {}", err.error());
                    excluded.push(client.session);
                    if excluded.len() > RETRIES {
                        Stats::inc(&state.stats.upstream_errors);
                        return error_response(
                            StatusCode::BAD_GATEWAY,
                            "the client's local service closed the connection",
                            "upstream_error",
                            "upstream_failed",
                        );
                    }
                }
            }
        }
    }
}

fn set_host(req: &mut Request<upstream::UpBody>, client: &ClientHandle) {
    let local = &client.registration.local_host;
    if local.is_empty() {
        return;
    }
    if let Ok(v) = HeaderValue::from_str(local) {
        let headers = req.headers_mut();
        if let Some(orig) = headers.insert(header::HOST, v) {
            headers.insert("x-forwarded-host", orig);
        }
    }
}

fn respond(
    state: &Arc<State>,
    resp: Response<Incoming>,
    guard: InFlight,
    sender: upstream::Sender,
) -> Response<PublicBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let body = TrackedBody {
        inner: body,
        state: state.clone(),
        guard,
        sender: Some(sender),
        finished: false,
    };
    Response::from_parts(parts, Either::Left(body))
}

fn upstream_error(state: &State, e: &AcquireError) -> Response<PublicBody> {
    Stats::inc(&state.stats.upstream_errors);
    if e.is_timeout() {
        error_response(
            StatusCode::GATEWAY_TIMEOUT,
            &format!("no client answered in time: {e}"),
            "gateway_timeout",
            "client_timeout",
        )
    } else {
        error_response(
            StatusCode::BAD_GATEWAY,
            &format!("could not reach a client's service: {e}"),
            "upstream_error",
            "upstream_unavailable",
        )
    }
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "code"}}`.
pub fn error_response(
    status: StatusCode,
    message: &str,
    kind: &str,
    code: &str,
) -> Response<PublicBody> {
    let body = serde_json::json!({
        "error": { "message": message, "type": kind, "code": code }
    });
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body.to_string()))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those the
/// `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

fn append_forwarded_for(headers: &mut HeaderMap, peer: SocketAddr) {
    let ip = peer.ip().to_string();
    let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert("x-forwarded-for", v);
    }
}

/// Counts a request as in flight on its client until dropped.
pub struct InFlight {
    client: Arc<ClientHandle>,
}

impl InFlight {
    fn new(client: Arc<ClientHandle>) -> Self {
        client.in_flight.fetch_add(1, Ordering::Relaxed);
        client.requests.fetch_add(1, Ordering::Relaxed);
        Self { client }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.client.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The upstream response body, streamed frame by frame (no buffering, so
/// server-sent events pass one by one), counting bytes and holding the
/// request's in-flight slot until the body ends or the caller goes away.
/// When the body was read to its end, the upstream connection goes back to
/// the client's idle pool; when the caller left early it is dropped, which
/// closes it and cancels the upstream request.
pub struct TrackedBody {
    inner: Incoming,
    state: Arc<State>,
    guard: InFlight,
    sender: Option<upstream::Sender>,
    finished: bool,
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.state
                        .stats
                        .bytes_out
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
            Poll::Ready(None) => self.finished = true,
            Poll::Ready(Some(Err(_))) => self.sender = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take() {
            let reusable = self.finished || self.inner.is_end_stream();
            if reusable && !self.guard.client.kick.is_cancelled() {
                self.guard
                    .client
                    .idle
                    .put(sender, self.state.config.max_idle_per_client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_end_to_end_ones_stay() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "10.0.0.1:5".parse().unwrap());
        append_forwarded_for(&mut h, "10.0.0.2:5".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2");
    }

    #[test]
    fn errors_have_openai_shape() {
        let resp = error_response(
            StatusCode::UNAUTHORIZED,
            "invalid API key",
            "invalid_request_error",
            "invalid_api_key",
        );
        assert_eq!(resp.status(), 401);
        assert_eq!(resp.headers()["content-type"], "application/json");
    }
}
