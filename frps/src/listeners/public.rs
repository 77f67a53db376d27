//! Public port: an HTTP/1.1 server. Every request, including each one on a
//! keep-alive connection, is authenticated and routed on its own.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use common::mux::StreamReset;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulConnection, GracefulShutdown};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::auth::KeyCheck;
use crate::config::Config;
use crate::dispatch::{self, Refusal};
use crate::limits::{ConnLimiter, Over};
use crate::pending::PairError;
use crate::plugins;
use crate::registry::{self, ClientHandle};
use crate::router::{self, Want};
use crate::state::{State, Stats};
use crate::upstream::{self, AcquireError};

use super::head_clock::{FirstRequest, HeadClock};
use super::models;

/// Body of a public response: streamed from upstream, or generated here.
pub type PublicBody = Either<TrackedBody, Full<Bytes>>;

/// Smallest head buffer hyper accepts.
const MIN_HEAD: usize = 8192;

/// Accepts public connections until shutdown, then lets in-flight requests
/// finish (up to `--shutdown-timeout`). `has_nodelay`: the sockets
/// `listener` accepts have `TCP_NODELAY` from it
/// ([`common::stream::listen_with_nodelay`]), else each gets it here.
pub async fn run(listener: TcpListener, has_nodelay: bool, state: Arc<State>) {
    // However this ends, client sessions then wind down.
    let _drained = state.drained.clone().drop_guard();
    let builder = http_builder(&state.config);
    let graceful = GracefulShutdown::new();
    let limiter = ConnLimiter::public(
        state.config.max_connections,
        state.config.max_connections_per_ip,
    );
    let refusing = Arc::new(tokio::sync::Semaphore::new(MAX_REFUSALS));
    let mut failures = super::AcceptFailures::default();
    loop {
        let (stream, peer) = tokio::select! {
            _ = state.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    failures.failed("public", &e).await;
                    continue;
                }
            },
        };
        let guard = match limiter.try_acquire(peer.ip()) {
            Ok(g) => g,
            Err(over) => {
                // Answered while few others are; in a flood beyond that,
                // closed at once (each answer may hold a TLS handshake
                // and up to REFUSAL_TIME).
                if let Ok(permit) = refusing.clone().try_acquire_owned() {
                    state
                        .tasks
                        .spawn(refuse(state.clone(), stream, over, permit, has_nodelay));
                }
                continue;
            }
        };
        let (watcher, builder) = (graceful.watcher(), builder.clone());
        let st = state.clone();
        st.stats.public_connection_opened();
        let accepted = tokio::time::Instant::now();
        let socket = raw_socket(&stream);
        state.tasks.spawn(async move {
            // The TLS handshake (when `--public-tls-cert` is set) runs here,
            // off the accept loop, within the head deadline.
            match st
                .tls
                .accept_public(stream, st.config.header_timeout, has_nodelay)
                .await
            {
                Ok(stream) => {
                    let conn = connection(&builder, st.clone(), stream, peer, socket, accepted);
                    // After the drain deadline the connection is dropped,
                    // even if its caller stopped reading a response.
                    tokio::select! {
                        ended = watcher.watch(conn) => if let Err(e) = ended {
                            debug!(%peer, "public connection ended: {e}");
                        },
                        _ = st.hard_stop.cancelled() => {
                            debug!(%peer, "public connection closed at the shutdown deadline");
                        }
                    }
                }
                Err(e) => debug!(%peer, "public connection dropped: {e}"),
            }
            st.stats.public_connections.fetch_sub(1, Ordering::Relaxed);
            drop(guard);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = state.hard_stop.cancelled() => {}
    }
}

/// The HTTP/1.1 settings of every public connection: keep-alive, with the
/// next request head due within `--keepalive-timeout` of the previous
/// response's end ([`HeadClock`] holds the first one to `--header-timeout`
/// from the accept), and a size cap on heads.
fn http_builder(config: &Config) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.keepalive_timeout)
        .max_buf_size(config.max_head_bytes.max(MIN_HEAD))
        // A caller's EOF ends its connection, also while its request
        // waits in a queue or for the answer: the request is cancelled
        // (capacity slot, queue place and key lease go back, the GPU stops).
        // A caller cannot half-close and still wait for the answer (as with
        // nginx, which takes the EOF for an abort too): a closed and a
        // half-closed caller look the same until something is written.
        .half_close(false)
        .keep_alive(true);
    builder
}

/// One public connection over `io` from `peer`, accepted at `accepted`:
/// its first head held to `--header-timeout` from then ([`HeadClock`]),
/// each request authenticated and routed. `socket` is `io`'s TCP socket,
/// watched for the caller's close while a request with a streamed body
/// waits ([`CallerGone`]).
fn connection<I>(
    builder: &http1::Builder,
    state: Arc<State>,
    io: I,
    peer: SocketAddr,
    socket: Option<RawSocket>,
    accepted: tokio::time::Instant,
) -> impl GracefulConnection<Error = hyper::Error>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let first = Arc::new(FirstRequest::default());
    let caller = Caller::new(peer, state.tls.public.is_some(), socket);
    let io = HeadClock::new(
        io,
        first.clone(),
        accepted,
        state.config.header_timeout,
        state.config.keepalive_timeout,
    );
    builder.serve_connection(TokioIo::new(io), service(state, caller, first))
}

/// Who is at the other end of a public connection.
#[derive(Clone)]
struct Caller {
    addr: SocketAddr,
    /// The connection's TCP socket (valid while its requests are handled:
    /// the connection owns it and ends their futures before closing it).
    socket: Option<RawSocket>,
    /// `addr`'s entry for `X-Forwarded-For` (and all of `X-Real-IP`).
    forwarded_for: HeaderValue,
    /// `X-Forwarded-Proto`: how the caller reached frps.
    proto: HeaderValue,
}

impl Caller {
    fn new(addr: SocketAddr, https: bool, socket: Option<RawSocket>) -> Self {
        Caller {
            addr,
            socket,
            forwarded_for: forwarded_for_entry(addr),
            proto: HeaderValue::from_static(if https { "https" } else { "http" }),
        }
    }
}

/// The request handler of one public connection from `caller`; tells
/// `first` when a request arrives.
fn service(
    state: Arc<State>,
    caller: Caller,
    first: Arc<FirstRequest>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<PublicBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<PublicBody>, Infallible>> + Send,
> + Clone {
    service_fn(move |req| {
        first.arrived_with(req.headers());
        // Boxed per request: hyper keeps room for one request's future in
        // every connection for as long as it is open, and this one is over
        // 4 KiB; a box is 8 bytes (10,000 idle keep-alive connections:
        // 43 MiB less).
        Box::pin(handle(state.clone(), caller.clone(), req))
    })
}

/// Serves one public connection over `io` exactly as the listener does
/// (same HTTP settings, authentication, routing and header rewriting),
/// minus TLS, the connection caps and graceful shutdown. For the
/// `http_head` fuzz target, which feeds it arbitrary bytes in memory.
#[doc(hidden)]
pub async fn serve_connection<I>(state: Arc<State>, io: I, peer: SocketAddr) -> hyper::Result<()>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let builder = http_builder(&state.config);
    connection(&builder, state, io, peer, None, tokio::time::Instant::now()).await
}

/// A public connection's socket, by its descriptor.
#[cfg(unix)]
type RawSocket = std::os::fd::RawFd;
#[cfg(not(unix))]
type RawSocket = ();

#[cfg(unix)]
fn raw_socket(stream: &tokio::net::TcpStream) -> Option<RawSocket> {
    use std::os::fd::AsRawFd;
    Some(stream.as_raw_fd())
}

#[cfg(not(unix))]
fn raw_socket(_: &tokio::net::TcpStream) -> Option<RawSocket> {
    None
}

/// Notices a caller closing its connection while frps waits on its behalf
/// (in a queue, for a dial-back) with a streamed body: hyper reads such a
/// body no further than the one piece it buffers until the body is sent,
/// so the close would otherwise be seen only once the request had taken a
/// slot and gone out to a box. Watches its own copy of the socket's
/// descriptor for the peer's close (`EPOLLRDHUP`), dropped with it.
struct CallerGone {
    #[cfg(unix)]
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl CallerGone {
    /// A watch on `socket`, if it can be had (else the wait goes unwatched,
    /// as before).
    #[cfg(unix)]
    fn new(socket: Option<RawSocket>) -> Option<Self> {
        // SAFETY: the descriptor is the caller's connection's, which stays
        // open while its request is handled (see `Caller::socket`); it is
        // only borrowed to be duplicated.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(socket?) };
        let own = borrowed.try_clone_to_owned().ok()?;
        // SAFETY: an `OwnedFd` stays open, on the same descriptor, until
        // it is dropped with the `AsyncFd`.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(own, tokio::io::Interest::READABLE)
        }
        .ok()?;
        Some(Self { fd })
    }

    #[cfg(not(unix))]
    fn new(_: Option<RawSocket>) -> Option<Self> {
        None
    }

    /// Resolves once the caller closed (or reset) its connection; more of
    /// its body arriving meanwhile is left for hyper to read.
    async fn closed(&self) {
        #[cfg(unix)]
        loop {
            let Ok(mut ready) = self.fd.readable().await else {
                return std::future::pending().await;
            };
            if ready.ready().is_read_closed() || ready.ready().is_error() {
                return;
            }
            ready.clear_ready();
        }
        #[cfg(not(unix))]
        std::future::pending().await
    }
}

/// `wait`'s output, or `None` when the caller `gone` watches (if any) left
/// first.
async fn unless_gone<F: Future>(gone: Option<&CallerGone>, wait: F) -> Option<F::Output> {
    match gone {
        None => Some(wait.await),
        // Boxed: only requests with a body still to come take this path,
        // and the others' futures stay as small as without it.
        Some(gone) => {
            Box::pin(async move {
                tokio::select! {
                    biased;
                    out = wait => Some(out),
                    _ = gone.closed() => None,
                }
            })
            .await
        }
    }
}

/// The answer to a request whose caller left while it waited (nobody reads
/// it; counted as 499).
fn caller_left() -> Response<PublicBody> {
    error_response(
        StatusCode::from_u16(CLIENT_CLOSED_REQUEST).expect("499 is a status code"),
        "the caller closed its connection",
        "invalid_request_error",
        "client_closed_request",
    )
}

/// Connections over the caps answered at once at most; more are closed.
const MAX_REFUSALS: usize = 256;

/// Longest an over-the-cap connection is kept for its answer.
const REFUSAL_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Answers a connection over the caps with 503 `too_many_connections`, in
/// TLS on a TLS port (plaintext would reach an HTTPS caller as a handshake
/// error), then reads what the caller sent until it closes: closing with
/// its request unread would reset the connection, and could destroy the
/// answer before it is read.
async fn refuse(
    state: Arc<State>,
    stream: tokio::net::TcpStream,
    over: Over,
    _permit: tokio::sync::OwnedSemaphorePermit,
    has_nodelay: bool,
) {
    use tokio::io::AsyncWriteExt;
    let body = serde_json::json!({
        "error": {"message": over.reason(), "type": "service_unavailable", "code": "too_many_connections"}
    })
    .to_string();
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = async {
        let Ok(mut stream) = state
            .tls
            .accept_public(stream, REFUSAL_TIME, has_nodelay)
            .await
        else {
            return Ok(());
        };
        stream.write_all(resp.as_bytes()).await?;
        stream.shutdown().await?;
        common::stream::drain(&mut stream).await
    };
    let _ = tokio::time::timeout(REFUSAL_TIME, answer).await;
}

/// Handles one public request.
async fn handle(
    state: Arc<State>,
    caller: Caller,
    req: Request<Incoming>,
) -> Result<Response<PublicBody>, Infallible> {
    let started = Instant::now();
    let mut unanswered = Unanswered {
        state: &state,
        started,
        armed: true,
    };
    let resp = authenticate_and_forward(&state, &caller, req, started).await;
    unanswered.armed = false;
    if let Either::Right(_) = resp.body() {
        // Generated here; streamed responses are counted when their body ends.
        state
            .metrics
            .finished(resp.status().as_u16(), "", "", started.elapsed());
    }
    Ok(resp)
}

/// Counts a request whose caller left before it was answered (its
/// handler dropped while queued, waiting for a dial-back or for the
/// service's response head) as status 499, nginx's "client closed
/// request": otherwise exactly the requests overload abandons would be
/// missing from the request count and the duration histogram.
struct Unanswered<'a> {
    state: &'a State,
    started: Instant,
    armed: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.state
                .metrics
                .finished(CLIENT_CLOSED_REQUEST, "", "", self.started.elapsed());
        }
    }
}

/// The status recorded for a request its caller abandoned unanswered.
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

async fn authenticate_and_forward(
    state: &Arc<State>,
    caller: &Caller,
    mut req: Request<Incoming>,
    started: Instant,
) -> Response<PublicBody> {
    Stats::inc(&state.stats.requests);
    // RFC 9112 §3.2: an HTTP/1.1 request names its `Host` exactly once (an
    // HTTP/1.0 one may leave it out). hyper does not check it.
    let hosts = req.headers().get_all(header::HOST).iter().count();
    if hosts > 1 || (hosts == 0 && req.version() != hyper::Version::HTTP_10) {
        return error_response(
            StatusCode::BAD_REQUEST,
            "a request needs exactly one Host header",
            "invalid_request_error",
            "bad_host",
        );
    }
    target_names_the_host(&mut req);
    let grant = match state
        .keys
        .check_headers(req.headers(), caller.addr.ip())
        .await
    {
        KeyCheck::Valid(grant) => grant,
        KeyCheck::Missing => {
            Stats::inc(&state.stats.auth_failures);
            return unauthorized(
                "missing API key: send `Authorization: Bearer <key>`",
                "missing_api_key",
            );
        }
        KeyCheck::Invalid => {
            Stats::inc(&state.stats.auth_failures);
            return unauthorized("invalid API key", "invalid_api_key");
        }
        KeyCheck::Throttled(wait) => {
            Stats::inc(&state.stats.auth_failures);
            return too_many_invalid_keys(wait);
        }
        KeyCheck::Unavailable => {
            Stats::inc(&state.stats.auth_unavailable);
            return retry_soon(error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "authentication backend unavailable",
                "service_unavailable",
                "auth_unavailable",
            ));
        }
    };
    if !framed_by_chunks_alone(req.headers()) {
        // hyper decodes only the chunking of `gzip, chunked`, and the
        // encoding goes with the hop-by-hop header: the service would get
        // gzip bytes as a plain body (RFC 9112 §6.1: 501). Checked once
        // the key is: a caller without one hears 401 first, as for any
        // other request.
        return error_response(
            StatusCode::NOT_IMPLEMENTED,
            "the only transfer coding accepted on requests is `chunked` alone; send other codings as Content-Encoding",
            "invalid_request_error",
            "unsupported_transfer_coding",
        );
    }
    let lease = match state.rate_limits.admit(&grant).await {
        Ok(lease) => lease,
        Err(limited) => return crate::ratelimit::refuse(state, limited),
    };
    let mut resp = forward(
        state,
        (caller, caller_tag(&grant.id, caller.addr)),
        req,
        started,
    )
    .await;
    // A streamed body holds the key's concurrency slot until it ends.
    if let (Some(lease), Either::Left(body)) = (lease, resp.body_mut()) {
        body.lease = Some(lease);
    }
    resp
}

/// 401 `code`, closing the connection: a caller without a key that works
/// holds none of the public connections open (a request without a key
/// every minute kept one for as long as it liked, the first head's short
/// deadline being behind it: a few addresses held every connection frps
/// allows, for free).
fn unauthorized(message: &str, code: &str) -> Response<PublicBody> {
    let mut resp = error_response(
        StatusCode::UNAUTHORIZED,
        message,
        "invalid_request_error",
        code,
    );
    resp.headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// 429 for a caller whose address has spent its failed key lookups; the
/// connection closes after it, so guessing also pays for a new connection.
fn too_many_invalid_keys(wait: std::time::Duration) -> Response<PublicBody> {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut resp = error_response(
        StatusCode::TOO_MANY_REQUESTS,
        &format!("too many invalid API keys from your address; retry in {secs} s"),
        "rate_limit_error",
        "too_many_invalid_keys",
    );
    let headers = resp.headers_mut();
    headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    headers.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Largest body of announced length frps reads whole before forwarding it
/// on a path it does not route by model (larger ones stream through).
pub const SMALL_BODY: u64 = 64 * 1024;

/// How soon after a request went out on a pooled connection its closing
/// (with no answer) is taken for the keep-alive race, the service having
/// closed the connection as idle while the request was on its way, and the
/// request sent once more: the close then follows within a round trip. Later
/// it is the service failing on the request (a crash mid-generation), which
/// is not run twice on the same box.
pub const RACE_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

/// Paths whose JSON body names the model to route on.
pub const MODEL_PATHS: [&str; 18] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    // OpenAI's Responses API (vLLM serves it too).
    "/v1/responses",
    // vLLM's and llama.cpp's other JSON calls naming a model (the root
    // paths reach a box only with --forward-paths allowing them): sent to
    // a box without the model, they were answered 404 there, never tried
    // on one that has it.
    "/v1/rerank",
    "/v2/rerank",
    "/rerank",
    "/v1/score",
    "/score",
    "/tokenize",
    "/detokenize",
    "/pooling",
    "/classify",
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    // A model's details (Open WebUI reads its context length here): only a
    // box that has the model can answer.
    "/api/show",
];

/// The request body across attempts: buffered (replayable) or streamed
/// (sent at most once).
enum Payload {
    Buffered(Bytes),
    Stream(Option<CountedBody>),
}

impl Payload {
    fn take(&mut self) -> Option<upstream::UpBody> {
        match self {
            Payload::Buffered(b) => Some(Either::Left(Full::new(b.clone()))),
            Payload::Stream(s) => s.take().map(Either::Right),
        }
    }

    fn put_back(&mut self, body: upstream::UpBody) {
        if let (Payload::Stream(slot), Either::Right(b)) = (self, body) {
            *slot = Some(b);
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, Payload::Buffered(_))
    }

    /// A streamed body already handed to an attempt that failed.
    fn is_spent(&self) -> bool {
        matches!(self, Payload::Stream(None))
    }
}

/// 403 for a path `--forward-paths` does not list, naming those it does.
#[cold]
fn path_not_allowed(rules: &[crate::paths::PathRule], path: &str) -> Response<PublicBody> {
    let listed: Vec<String> = rules.iter().map(ToString::to_string).collect();
    let shown: String = path.chars().take(200).collect();
    error_response(
        StatusCode::FORBIDDEN,
        &format!(
            "frps does not forward {shown}; it forwards {}",
            if listed.is_empty() {
                "no path".to_owned()
            } else {
                listed.join(", ")
            }
        ),
        "invalid_request_error",
        "path_not_allowed",
    )
}

/// Routes an authenticated request to a client and streams the answer back.
async fn forward(
    state: &Arc<State>,
    (caller, key_tag): (&Caller, u64),
    mut req: Request<Incoming>,
    started: Instant,
) -> Response<PublicBody> {
    // Tunnelling is not what the public port is for, nor echoing requests
    // (TRACE: a service would send back the forwarding headers, and any
    // cookie, to whatever script made the call).
    if req.method() == Method::CONNECT || req.method() == Method::TRACE {
        let mut resp = error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{} is not supported", req.method()),
            "invalid_request_error",
            "method_not_allowed",
        );
        resp.headers_mut().insert(
            hyper::header::ALLOW,
            HeaderValue::from_static(ALLOWED_METHODS),
        );
        return resp;
    }
    if req.method() == Method::OPTIONS && !forwards_options(req.headers_mut()) {
        return options_answered_here();
    }
    let path = req.uri().path();
    // The path the service will see: Ollama and vLLM decode escapes before
    // they route, so `/v1/chat/%63ompletions` is their chat path too.
    let decoded = crate::paths::decoded(path);
    // frps answers these itself (the fleet's models), whatever reaches the
    // boxes; on the path as the service would see it (an escaped
    // `/v1/%6dodels/x` went to one box, which knows only its own models),
    // and to a HEAD as to a GET (hyper sends no body for it).
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        if decoded == "/v1/models" || decoded == "/api/tags" {
            return models::list(state, decoded == "/api/tags");
        }
        if let Some(model) = decoded.strip_prefix("/v1/models/") {
            return models::one(state, model);
        }
    }
    // The rules are matched against the path as sent: an escape never
    // widens what they allow.
    if !crate::paths::allowed(&state.config.forward_paths, path) {
        return path_not_allowed(&state.config.forward_paths, path);
    }
    let routed = req.method() == Method::POST && MODEL_PATHS.contains(&&*decoded);
    // hyper sends a GET's or HEAD's body only with a length: one of
    // unknown length (chunked) is read whole, or it would be dropped unsent
    // while the service's answer waited for its end.
    let lengthless = matches!(*req.method(), Method::GET | Method::HEAD);
    let by_name = decoded == "/api/show";
    let (mut parts, body) = req.into_parts();
    let pinned = match parts
        .headers
        .remove(X_FRPX_CLIENT)
        .map(|v| v.to_str().map(str::to_owned))
    {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "X-Frpx-Client must be a client id in visible ASCII characters",
                "invalid_request_error",
                "bad_client_id",
            );
        }
    };
    // How far a streamed body's upload has got (made for those only: most
    // requests are buffered or bodiless, and this is their hot path).
    let mut upload: Option<Arc<UploadClock>> = None;
    // A body read whole holds its share of `--max-buffered-bodies` until
    // the request is done with it.
    let mut _buffered: Option<tokio::sync::OwnedSemaphorePermit> = None;
    // A small body of announced length is read whole too: it can then go
    // out again (on another box, after a keep-alive race) and on a pooled
    // connection, as a streamed one cannot.
    let small = body
        .size_hint()
        .exact()
        .is_some_and(|n| n <= SMALL_BODY.min(state.config.max_body as u64));
    let lengthless = lengthless && body.size_hint().exact().is_none();
    let (mut payload, model) = if routed || ((small || lengthless) && !body.is_end_stream()) {
        match read_body(state, body).await {
            Ok(ReadBody { bytes, _held: held }) => {
                _buffered = held;
                let model = if routed {
                    match model_of(&bytes, by_name) {
                        Ok(model) => model,
                        Err(Ambiguous) => {
                            return error_response(
                                StatusCode::BAD_REQUEST,
                                "the body names its model more than once",
                                "invalid_request_error",
                                "ambiguous_model",
                            );
                        }
                    }
                } else {
                    None
                };
                (Payload::Buffered(bytes), model)
            }
            Err(resp) => return resp,
        }
    } else if body.is_end_stream() {
        // No body (a GET, say): as replayable as a buffered one.
        (Payload::Buffered(Bytes::new()), None)
    } else {
        let clock = Arc::new(UploadClock::default());
        upload = Some(clock.clone());
        let body = CountedBody {
            inner: body,
            state: state.clone(),
            waits: CallerWaits::new(state.config.keepalive_timeout, state.config.upload_timeout),
            timer: None,
            upload: clock,
        };
        (Payload::Stream(Some(body)), None)
    };
    // A name no box could list (over its 256 bytes, or with control
    // characters) is refused here: compared with every model of every box
    // under the registry's lock, a 10 MiB name held routing up for all.
    if let Some(m) = model.as_deref()
        && !common::protocol::model_name_kept(m.trim())
    {
        return refused(state, Refusal::NoModel, Some(m), pinned.as_deref(), None);
    }
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::AUTHORIZATION);
    parts.headers.remove(crate::auth::X_API_KEY);
    set_forwarding(&mut parts.headers, caller);
    // Time spent waiting on others (a queue, a dial-back, the upstream's
    // answer), which the gateway-overhead measure leaves out.
    let mut waited = std::time::Duration::ZERO;
    let mut excluded: Vec<u64> = Vec::new();
    // Of those, clients skipped as busy (every dial-back outstanding): they
    // did not fail, so they use none of `--max-retries`.
    let mut busy = 0;
    let mut last_error: Option<AcquireError> = None;
    // Whether the request already went out on a pooled connection that the
    // service closed under it (the keep-alive race): it may have been
    // processed, so it is sent once more at most, on a new connection.
    let mut raced = false;
    // The client (and its capacity slot) to send the request to again, on
    // another connection, when the one it went out on proved stale or
    // closed under it: nothing to blame the client for, and its slot is
    // not given up to the queue in between.
    let mut again: Option<(Arc<ClientHandle>, InFlight)> = None;
    // Only a body still to come keeps hyper from seeing its caller leave
    // (a request without one, the most common, costs no watch).
    // Whether running the request twice changes nothing: an idempotent
    // method (RFC 9110 §9.2.2), or a request for a model's answer (the
    // paths routed by model produce a result and change nothing). Only
    // such a request goes to another box once a service may have got it.
    let safe_twice = routed || parts.method.is_idempotent();
    let gone = match &payload {
        Payload::Stream(Some(body)) if !body.is_end_stream() => CallerGone::new(caller.socket),
        _ => None,
    };
    loop {
        let (client, guard) = match again.take() {
            Some(kept) => kept,
            // Sent once more on its box after the keep-alive race, and
            // failed there too before going out (the box left during the
            // dial-back, was busy, refused it...): a request unsafe to run
            // twice may have reached the service the first time, and goes
            // to no other box.
            None if raced && !safe_twice => {
                let e = last_error.insert(AcquireError::Service(
                    "the client's connection closed under the request, which it may have received; it is not sent to another client".into(),
                ));
                return upstream_error(state, e);
            }
            None => {
                let want = Want {
                    model: model.as_deref(),
                    pinned: pinned.as_deref(),
                    exclude: &excluded,
                };
                let picking = Instant::now();
                let body = match &payload {
                    Payload::Buffered(bytes) => bytes.len(),
                    Payload::Stream(_) => 0,
                };
                let Some(dispatched) =
                    unless_gone(gone.as_ref(), dispatch::acquire_holding(state, want, body)).await
                else {
                    return caller_left();
                };
                let client = match dispatched {
                    Ok(d) => {
                        if d.queued {
                            waited += picking.elapsed();
                        }
                        d.client
                    }
                    Err(refusal) => {
                        return refused(
                            state,
                            refusal,
                            model.as_deref(),
                            pinned.as_deref(),
                            last_error.as_ref(),
                        );
                    }
                };
                let guard = InFlight::reserved(state.clone(), client.clone());
                // The prototype's line, at debug: written per request at
                // info it cost frps ~5 % of its CPU under load (issue 7's
                // profile).
                debug!("Chose client '{}' for the new connection", client.id);
                let asked = plugins::hooks::new_user_conn(&state.plugins, &client, caller.addr);
                // A caller gone while a slow plugin decides frees the
                // client's slot now, not at the plugin timeout.
                let Some(asked) = unless_gone(gone.as_ref(), asked).await else {
                    return caller_left();
                };
                if let Err(e) = asked {
                    return plugins::hooks::refusal(&e);
                }
                (client, guard)
            }
        };
        let acquiring = Instant::now();
        // A body that cannot be sent twice is not sent where a connection
        // closed as idle could take part of it.
        let reuse = if raced || !payload.replayable() {
            upstream::Reuse::NotPooled
        } else {
            upstream::Reuse::Any
        };
        let Some(acquired) =
            unless_gone(gone.as_ref(), upstream::acquire(state, &client, reuse)).await
        else {
            return caller_left();
        };
        let mut up = match acquired {
            Ok(up) => {
                if !up.reused {
                    waited += acquiring.elapsed();
                }
                up
            }
            // Too many dial-backs already outstanding to this client, or
            // frpc holding all the data connections it may: a burst, not a
            // failing box. Another client is tried, without cooling this
            // one down and without using a retry; when none is left,
            // dispatch refuses and the caller hears why. (The refusal is
            // the box's own word: past SHEDS_BEFORE_FAILURE in a row with no
            // response head between, a failure.)
            Err(AcquireError::Pair(PairError::Failed(reason)))
                if common::protocol::busy_refusal(&reason).is_some() && !client.record_shed() =>
            {
                waited += acquiring.elapsed();
                let reason = common::protocol::busy_refusal(&reason)
                    .unwrap_or(&reason)
                    .to_owned();
                log_busy(&client, "the client refused another connection", &reason);
                excluded.push(client.session);
                busy += 1;
                last_error.get_or_insert(AcquireError::Busy(reason));
                continue;
            }
            // A server plugin refused the box's data connection (or could
            // not be asked): the operator's word, not the box failing, so
            // the box is not cooled down. It uses a retry (a plugin down or
            // slow refuses every box alike: a request must not try each);
            // when none is left, the caller hears a 503 without the
            // plugin's text.
            Err(e @ AcquireError::Pair(PairError::Refused(_))) => {
                waited += acquiring.elapsed();
                debug!(client = %client.id, "not using the client: {e}");
                excluded.push(client.session);
                let e = last_error.insert(e);
                if excluded.len() > state.config.max_retries + busy {
                    return upstream_error(state, e);
                }
                continue;
            }
            Err(e @ AcquireError::Pair(PairError::TooMany(_))) => {
                waited += acquiring.elapsed();
                debug!(client = %client.id, "not asking for another connection: {e}");
                excluded.push(client.session);
                busy += 1;
                last_error.get_or_insert(e);
                continue;
            }
            // The session ended while its connection was being opened
            // (the box reconnected, an operator disconnected it, its token
            // was revoked, its control connection was lost): the request
            // went nowhere, and the box's service did not fail, so the
            // health its next session starts from is left alone. Another
            // client (or that next session) is tried without using a
            // retry; with none left, the caller hears that its client left
            // unless another's failure stands.
            Err(e) if session_ended_under(&client) => {
                waited += acquiring.elapsed();
                debug!(client = %client.id, "the client left before a connection to it opened: {e}");
                excluded.push(client.session);
                busy += 1;
                last_error.get_or_insert(AcquireError::ClientGone);
                continue;
            }
            Err(e) => {
                waited += acquiring.elapsed();
                let retries = state.config.max_retries + busy;
                if let Some(resp) = blame(
                    state,
                    (&client, acquiring),
                    e,
                    &mut excluded,
                    &mut last_error,
                    retries,
                ) {
                    return resp;
                }
                continue;
            }
        };
        let Some(body) = payload.take() else {
            Stats::inc(&state.stats.upstream_errors);
            return bad_gateway("the request body was already sent to a client that failed");
        };
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = origin_form(&parts.uri);
        // frps's own version (RFC 9110 §6.2), whatever the caller spoke: an
        // HTTP/1.0 request would make the service close the connection
        // after its answer (lost for the pool) and frame it by the close.
        *req.version_mut() = hyper::Version::HTTP_11;
        *req.headers_mut() = parts.headers.clone();
        set_host(&mut req, &client);
        if let Some(upload) = &upload {
            upload.goes_out_on(&up.conn.cut);
        }
        // A connection that does not go on to carry the answer is closed
        // when this attempt ends (`up` dropped).
        let sending = Instant::now();
        let answer = response_head(
            up.conn.sender.try_send_request(req),
            state.config.upstream_idle_timeout,
            upload.as_deref(),
        );
        // A box evicted for silence will not answer: its request fails over
        // now (below), not at `--upstream-idle-timeout`.
        let sent = tokio::select! {
            sent = answer => Some(sent),
            _ = client.silent.cancelled() => None,
        };
        let took = sending.elapsed();
        waited += took;
        let racing = took < RACE_WINDOW;
        let failure = match sent {
            None => AcquireError::Service(
                "the client stopped answering (evicted for silence) before its service answered"
                    .into(),
            ),
            // A switch of protocols frps never asked for (it forwards no
            // `Upgrade`): relayed, the caller would get a 101 without an
            // `Upgrade`, then nothing. Not sent again; the box's health is
            // left as it is (it answered, with nonsense).
            Some(Ok(Ok(resp))) if resp.status().is_informational() => {
                Stats::inc(&state.stats.upstream_errors);
                warn!(client = %client.id, "upstream response refused: {} without a protocol switch asked for", resp.status());
                return bad_gateway(
                    "the client's local service answered with a protocol switch frps did not ask for",
                );
            }
            Some(Ok(Ok(resp)))
                if has_body(&parts.method, resp.status())
                    && !decoded_by_framing(resp.headers()) =>
            {
                // As on requests: hyper undoes only the chunking of
                // `gzip, chunked`, and the coding would leave with the
                // hop-by-hop header: the caller would get gzip bytes as a
                // plain body. The service answered, so it is no failure of
                // the box (an answer, as below); the request is not sent
                // again.
                answered(state, (&client, sending, key_tag), resp.status());
                Stats::inc(&state.stats.upstream_errors);
                warn!(client = %client.id, "upstream response refused: Transfer-Encoding other than chunked alone");
                return error_response(
                    StatusCode::BAD_GATEWAY,
                    "the client's local service answered with a transfer coding other than `chunked` alone, which frps does not relay",
                    "upstream_error",
                    "unsupported_transfer_coding",
                );
            }
            Some(Ok(Ok(resp))) => {
                answered(state, (&client, sending, key_tag), resp.status());
                // Served: counted once, whatever attempts came before.
                client.requests.fetch_add(1, Ordering::Relaxed);
                state
                    .metrics
                    .overhead(started.elapsed().saturating_sub(waited));
                return respond(
                    state,
                    resp,
                    guard,
                    up.conn,
                    started,
                    // The served model's name as its box lists it, not the
                    // caller's spelling of it (" llama3" and
                    // "llama3:latest" are one series; vLLM's "mistral"
                    // stays "mistral").
                    model
                        .as_deref()
                        .map(|m| served_name(&client, m))
                        .unwrap_or_default(),
                    upload,
                );
            }
            Some(Ok(Err(mut err))) => {
                let unsent = err.take_message();
                let error = err.into_error();
                // frpc reset the tunnel stream before any answer: it could
                // not reach its service (the reason says why), as a
                // dial-back it could not open.
                if let Some(reset) = StreamReset::find(&error) {
                    // frps's own shed, of the box's answer arriving faster
                    // than the tunnel connection's slowest readers took
                    // theirs: the box has done the work, so the request is
                    // not sent again (the caller may retry it).
                    if reset.here && reset.is_shed() && unsent.is_none() {
                        log_busy(
                            &client,
                            "the answer's tunnel stream was shed",
                            &reset.reason,
                        );
                        let e = AcquireError::Busy(reset.reason.to_string());
                        return upstream_error(state, &e);
                    }
                    if let Some(back) = unsent {
                        payload.put_back(back.into_body());
                    }
                    // Shed for the tunnel connection's receive budget (the
                    // readers of its other streams are slow), or refused
                    // for frpc's --max-data-connections. Busy, like a
                    // client with every dial-back outstanding: another is
                    // tried without cooling this one down or using a
                    // retry, and with no other (or a body gone with it)
                    // the caller is asked to retry shortly. (Past
                    // SHEDS_BEFORE_FAILURE in a row, a failure.)
                    if reset.is_busy() && !client.record_shed() {
                        let reason = &*reset.reason;
                        let reason = common::protocol::busy_refusal(reason).unwrap_or(reason);
                        log_busy(&client, "tunnel stream shed under the request", reason);
                        let e = AcquireError::Busy(reason.to_owned());
                        if payload.is_spent() {
                            return upstream_error(state, &e);
                        }
                        excluded.push(client.session);
                        busy += 1;
                        // An earlier client's failure stays the answer.
                        last_error.get_or_insert(e);
                        continue;
                    }
                    // On a pooled stream: the service closed the connection
                    // behind it as idle (a keep-alive race), nothing to
                    // blame the client for. Not a shed past
                    // SHEDS_BEFORE_FAILURE: that is the box failing.
                    if up.reused && racing && !payload.is_spent() && !raced && !reset.is_busy() {
                        debug!(client = %client.id, "pooled stream reset under the request: {reset}");
                        raced = true;
                        again = still_online(client, guard, &mut last_error);
                        continue;
                    }
                    AcquireError::Pair(PairError::Failed(reset.reason.to_string()))
                } else {
                    let reason = error.to_string();
                    match unsent {
                        // Never written: a stale pooled connection says nothing
                        // about the client; a fresh one failing does (its
                        // service never got the request: unreachable, not
                        // failed).
                        Some(back) => {
                            payload.put_back(back.into_body());
                            if up.reused {
                                debug!(client = %client.id, "stale pooled connection: {reason}");
                                again = still_online(client, guard, &mut last_error);
                                continue;
                            }
                            AcquireError::Pair(PairError::Failed(reason))
                        }
                        // Written, then the connection closed without a byte of
                        // answer: on a pooled connection, the service closing it
                        // as idle while the request was on its way (a
                        // keep-alive race, within RACE_WINDOW), which says
                        // nothing about the client either. The body is
                        // replayable; try again, once, on a new connection (a
                        // service that closes every connection on this request
                        // is not sent it over and over).
                        None if up.reused
                            && racing
                            && !raced
                            && payload.replayable()
                            && error.is_incomplete_message() =>
                        {
                            debug!(client = %client.id, "pooled connection closed under the request: {reason}");
                            raced = true;
                            again = still_online(client, guard, &mut last_error);
                            // Its box gone meanwhile, it would go to another:
                            // only a request safe to run twice does (this one
                            // may have reached the service).
                            if again.is_none() && !safe_twice {
                                let gone = last_error.get_or_insert(AcquireError::ClientGone);
                                return upstream_error(state, gone);
                            }
                            continue;
                        }
                        // A head too large to read (over the read buffer, over
                        // 100 headers, an absurd Content-Length) is an answer
                        // frps will not relay, not a failing client: no failover.
                        None if error.is_parse_too_large() => {
                            Stats::inc(&state.stats.upstream_errors);
                            warn!(client = %client.id, "upstream response refused: {reason}");
                            return bad_gateway(&format!(
                                "the client's local service sent a response head too large to relay (over {} KiB or over 100 headers)",
                                crate::upstream::UPSTREAM_READ_BUFFER / 1024
                            ));
                        }
                        None if payload.replayable() => AcquireError::Service(reason),
                        None => {
                            // Part of a streamed body went out: it cannot be
                            // replayed. The caller's body failing is not the
                            // client's fault.
                            match caller_body_error(&error) {
                                Some(CallerBodyError::Stalled(gap)) => return body_stalled(*gap),
                                Some(CallerBodyError::TooSlow(limit)) => {
                                    return body_too_slow(*limit, "--upload-timeout");
                                }
                                Some(CallerBodyError::Read(_)) => {
                                    debug!(client = %client.id, "the caller's body failed: {reason}");
                                    return bad_body(&reason);
                                }
                                None => {}
                            }
                            Stats::inc(&state.stats.upstream_errors);
                            warn!(client = %client.id, "upstream request failed: {reason}");
                            return bad_gateway(
                                "the client's local service failed while answering",
                            );
                        }
                    }
                }
            }
            Some(Err(_)) => AcquireError::HeadTimeout(state.config.upstream_idle_timeout),
        };
        // A streamed body went with the failed attempt: nothing to retry
        // with; nor is a request sent elsewhere that may have been acted on.
        let retries = if payload.is_spent() || !may_fail_over(&failure, safe_twice) {
            0
        } else {
            state.config.max_retries + busy
        };
        if let Some(resp) = blame(
            state,
            (&client, acquiring),
            failure,
            &mut excluded,
            &mut last_error,
            retries,
        ) {
            return resp;
        }
    }
}

/// Whether a request that failed on a box with `failure` goes to another
/// (within `--max-retries`). One its service got, and failed on or kept
/// without answering, goes again only when running it twice changes
/// nothing (`safe_twice`); a `POST` outside the model paths (Ollama's
/// `/api/pull`, `/v1/files`) or a `PATCH` may have been carried out, and
/// is answered 502 (before 2026-12-05 it was sent to up to
/// `--max-retries` more boxes). No request goes again after
/// `--upstream-idle-timeout` with no answer: the caller waited that long
/// already (an SDK has given up by then), and two more boxes tripled it.
fn may_fail_over(failure: &AcquireError, safe_twice: bool) -> bool {
    match failure {
        AcquireError::HeadTimeout(_) => false,
        AcquireError::Service(_) => safe_twice,
        _ => true,
    }
}

/// The `Allow` of a 405: the methods frps forwards (any but `CONNECT` and
/// `TRACE`; these are the standard ones).
const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// The client and slot of a request to send again to the same client
/// (after a stale pooled connection or the keep-alive race), unless the
/// client went offline meanwhile: then the slot is given up, the request
/// is routed again, and, with no other client to take it, the caller hears
/// that its client left (502), not that none was ever there.
fn still_online(
    client: Arc<ClientHandle>,
    guard: InFlight,
    last_error: &mut Option<AcquireError>,
) -> Option<(Arc<ClientHandle>, InFlight)> {
    if client.kick.is_cancelled() {
        last_error.get_or_insert(AcquireError::ClientGone);
        return None;
    }
    Some((client, guard))
}

/// Whether `client`'s session ended for something other than its silence
/// (replaced by a newer session of the box, disconnected by an operator,
/// its token revoked, its control connection lost). A box evicted for
/// silence (frozen) is failing.
fn session_ended_under(client: &ClientHandle) -> bool {
    client.kick.is_cancelled() && !client.silent.is_cancelled()
}

/// Counts `client` as failing for `error` before it answered (no connection
/// to its service, or its service failed or stayed silent before a response
/// head) and leaves it out of the next attempt; once more than `retries`
/// clients failed, the 502/504 for `error`. Kept as the request's last
/// error: if no other client can be tried, the caller is told why the last
/// one failed, not that none is left.
fn blame(
    state: &Arc<State>,
    (client, sent): (&ClientHandle, Instant),
    error: AcquireError,
    excluded: &mut Vec<u64>,
    last_error: &mut Option<AcquireError>,
    retries: usize,
) -> Option<Response<PublicBody>> {
    warn!(client = %client.id, "client failed before responding: {error}");
    dispatch::record_failure_of(state, client, sent);
    excluded.push(client.session);
    let error = last_error.insert(error);
    (excluded.len() > retries).then(|| upstream_error(state, error))
}

/// Who made a request, as the boxes' health tells callers apart
/// ([`answered`]): its key and its network (an IPv4 address, an IPv6 /48:
/// a home's /56 is one caller, not 256), so callers sharing the static
/// `--api-key` or one stored key from several places are several.
fn caller_tag(key: &[u8; 32], addr: SocketAddr) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let network = crate::limits::network_of(addr.ip())
        .unwrap_or_else(|| crate::limits::address_block(addr.ip()));
    // Within one process only: a fixed hasher is enough.
    let mut h =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .build_hasher();
    key.hash(&mut h);
    network.hash(&mut h);
    h.finish()
}

/// Notes that `client`'s service answered with `status` a request of the
/// caller tagged `key` ([`caller_tag`]) sent at `sent`. An answer that may say the
/// box is failing ([`registry::counts_against_the_box`]: 500, 502) is
/// relayed as it is and forgets nothing (a box whose model cannot load must
/// not have its connection failures forgotten at every answer); one alone
/// proves nothing (it may be the request's own fault), but past
/// [`registry::SERVER_ERRORS_BEFORE_FAILURE`] in a row, once they answered
/// more than one caller, each counts as a failure: a box failing everything
/// at once is cooled down instead of drawing most requests (least-conn
/// sends them where none are in flight). A 503 or 504 counts neither way
/// (busy, or one long request timed out on the box). Any other answer
/// forgets its failures, sheds and server errors.
fn answered(
    state: &Arc<State>,
    (client, sent, key): (&ClientHandle, Instant, u64),
    status: StatusCode,
) {
    if registry::counts_against_the_box(status.as_u16()) {
        let Some((in_a_row, first)) = client.record_server_error(key) else {
            return;
        };
        if first {
            warn!(
                client = %client.id,
                "client '{}' answered {in_a_row} server errors in a row to several callers (the last {status}): counted as failures until it answers otherwise",
                client.id,
            );
        }
        dispatch::record_failure_of(state, client, sent);
    } else if matches!(status.as_u16(), 503 | 504) {
        // Busy, or one request's own long wait: neither way.
    } else if client.record_success() {
        // Its cool-down ended early: requests queued meanwhile may go to
        // it now.
        state.queues.wake_all();
    }
}

/// Logs why `client` took no more requests (its own reason, which the
/// caller is not told): at info one a second per client, the rest at debug.
fn log_busy(client: &ClientHandle, what: &str, reason: &str) {
    if client.may_log_busy() {
        info!(client = %client.id, "{what}: {reason}");
    } else {
        debug!(client = %client.id, "{what}: {reason}");
    }
}

fn bad_gateway(message: &str) -> Response<PublicBody> {
    error_response(
        StatusCode::BAD_GATEWAY,
        message,
        "upstream_error",
        "upstream_failed",
    )
}

/// A body read whole, with its share of `--max-buffered-bodies` (given
/// back when dropped: keep it while the bytes may still be sent).
struct ReadBody {
    bytes: Bytes,
    _held: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// The first room a body in pieces is joined in (most are smaller: one
/// allocation).
const JOIN_START: usize = 64 << 10;

/// A body read whole: one piece (the usual case) is kept as it came; more
/// are joined.
#[derive(Default)]
struct Pieces {
    first: Option<Bytes>,
    joined: bytes::BytesMut,
}

impl Pieces {
    /// Adds `data`; `rest` is what the body still announces (its
    /// `Content-Length` left), `limit` the most it may hold.
    ///
    /// The joining buffer grows to twice what arrived (at least
    /// [`JOIN_START`]), never past the announced whole, which it ends at
    /// exactly: room for a whole announced body reserved at its second
    /// piece let a caller hold `--max-buffered-bodies` with a few bytes per
    /// connection (each announcing 10 MiB), and growing by plain doubling
    /// took up to 16 MiB for a 10 MiB body.
    fn push(&mut self, data: Bytes, rest: Option<u64>, limit: usize) {
        let earlier = match self.first.take() {
            None if self.joined.is_empty() => {
                self.first = Some(data);
                return;
            }
            earlier => earlier,
        };
        let held = self.joined.len() + earlier.as_ref().map_or(0, Bytes::len) + data.len();
        if held > self.joined.capacity() {
            let whole = match rest {
                Some(rest) => (held as u64).saturating_add(rest).min(limit as u64) as usize,
                None => limit,
            };
            let room = held.saturating_mul(2).max(JOIN_START).min(whole).max(held);
            let mut grown = bytes::BytesMut::with_capacity(room);
            grown.extend_from_slice(&self.joined);
            self.joined = grown;
        }
        if let Some(earlier) = earlier {
            self.joined.extend_from_slice(&earlier);
        }
        self.joined.extend_from_slice(&data);
    }

    /// Bytes held: the one piece, or the joining buffer's capacity.
    fn holding(&self) -> usize {
        match &self.first {
            Some(first) => first.len(),
            None => self.joined.capacity(),
        }
    }

    fn finish(self) -> Bytes {
        self.first.unwrap_or_else(|| self.joined.freeze())
    }
}

/// Reads a body to route on, at most `--max-body` bytes, each piece due
/// within `--keepalive-timeout` of the previous one and the whole within
/// `--body-timeout`, while all bodies held stay under
/// `--max-buffered-bodies`.
async fn read_body(state: &State, mut body: Incoming) -> Result<ReadBody, Response<PublicBody>> {
    let limit = state.config.max_body;
    let gap = state.config.keepalive_timeout;
    // An announced length over the limit is refused before reading a byte.
    if body.size_hint().lower() > limit as u64 {
        return Err(body_too_large(limit));
    }
    let deadline = tokio::time::Instant::now() + state.config.body_timeout;
    let mut pieces = Pieces::default();
    let mut len = 0usize;
    let mut charged = 0usize;
    let mut held: Option<tokio::sync::OwnedSemaphorePermit> = None;
    loop {
        let due = (tokio::time::Instant::now() + gap).min(deadline);
        let frame = match tokio::time::timeout_at(due, body.frame()).await {
            Err(_) if due == deadline => {
                return Err(body_too_slow(state.config.body_timeout, "--body-timeout"));
            }
            Err(_) => return Err(body_stalled(gap)),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(bad_body(&e));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        len += data.len();
        if len > limit {
            return Err(body_too_large(limit));
        }
        pieces.push(data, body.size_hint().exact(), limit);
        // What frps holds counts against the budget: the piece as it came,
        // or the buffer the pieces are joined in, room reserved for the
        // announced rest included (freed pieces, once copied, count once).
        let holding = pieces.holding();
        let more = holding.saturating_sub(charged);
        if more > 0 {
            let Some(share) = u32::try_from(more)
                .ok()
                .and_then(|n| state.body_budget.clone().try_acquire_many_owned(n).ok())
            else {
                return Err(bodies_over_budget());
            };
            match held.as_mut() {
                Some(h) => h.merge(share),
                None => held = Some(share),
            }
            charged = holding;
        }
    }
    let bytes = pieces.finish();
    state
        .stats
        .bytes_in
        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    Ok(ReadBody { bytes, _held: held })
}

/// 408 for a request body not all there within `limit`, which the
/// setting `flag` sets (`--body-timeout` for a body read whole first,
/// `--upload-timeout` for one streamed to the box).
fn body_too_slow(limit: std::time::Duration, flag: &str) -> Response<PublicBody> {
    error_response(
        StatusCode::REQUEST_TIMEOUT,
        &format!("the request body did not arrive within {limit:?} ({flag})"),
        "invalid_request_error",
        "request_timeout",
    )
}

fn bodies_over_budget() -> Response<PublicBody> {
    retry_soon(error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "frps holds as many request bodies as it may (--max-buffered-bodies); retry shortly",
        "service_unavailable",
        "server_busy",
    ))
}

/// The caller's body failure behind an upstream error, if that is what it was.
fn caller_body_error(error: &hyper::Error) -> Option<&CallerBodyError> {
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(found) = e.downcast_ref::<CallerBodyError>() {
            return Some(found);
        }
        source = e.source();
    }
    None
}

/// 400 for a request body that could not be read.
fn bad_body(e: &dyn std::fmt::Display) -> Response<PublicBody> {
    error_response(
        StatusCode::BAD_REQUEST,
        &format!("could not read the request body: {e}"),
        "invalid_request_error",
        "bad_body",
    )
}

/// 408 for a request body that stopped arriving.
fn body_stalled(gap: std::time::Duration) -> Response<PublicBody> {
    error_response(
        StatusCode::REQUEST_TIMEOUT,
        &format!("the request body stalled: nothing arrived for {gap:?}"),
        "invalid_request_error",
        "request_timeout",
    )
}

fn body_too_large(limit: usize) -> Response<PublicBody> {
    error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("request body larger than {limit} bytes"),
        "invalid_request_error",
        "body_too_large",
    )
}

/// The `model` field of a JSON body, if it has one; with `or_name`, its
/// `name` field otherwise (what Ollama's `/api/show` took before `model`).
///
/// Read as the services behind frps read it, so that frps routes on the
/// model they serve: only the body's first JSON value counts (Go's
/// `json.Decoder`, as Ollama uses it, ignores what follows), and a field
/// name matches whatever its case (`"Model"` is Go's `model` too). A body
/// that names its model twice, in any case, is [`Ambiguous`]: frps would
/// route on one name and the service might serve the other. Values of other
/// fields, and a `model` or `name` that is not a string, are skipped without
/// being kept (a body of up to `--max-body` costs no more memory than
/// itself).
pub fn model_of(body: &[u8], or_name: bool) -> Result<Option<String>, Ambiguous> {
    use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};

    /// Which naming field a key is, if any.
    enum Key {
        Model,
        Name,
        Other,
    }
    impl<'de> serde::Deserialize<'de> for Key {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
            struct KeyVisitor;
            impl Visitor<'_> for KeyVisitor {
                type Value = Key;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a field name")
                }
                fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Key, E> {
                    Ok(if key.eq_ignore_ascii_case("model") {
                        Key::Model
                    } else if key.eq_ignore_ascii_case("name") {
                        Key::Name
                    } else {
                        Key::Other
                    })
                }
            }
            d.deserialize_str(KeyVisitor)
        }
    }

    /// A string value, or `None` for any other (skipped, not kept).
    struct Text(Option<String>);
    impl<'de> serde::Deserialize<'de> for Text {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Text, D::Error> {
            struct TextVisitor;
            impl<'de> Visitor<'de> for TextVisitor {
                type Value = Text;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("any JSON value")
                }
                fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Text, E> {
                    Ok(Text(Some(v.to_owned())))
                }
                fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Text, E> {
                    Ok(Text(Some(v)))
                }
                fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Text, E> {
                    Ok(Text(None))
                }
                fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Text, E> {
                    Ok(Text(None))
                }
                fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Text, E> {
                    Ok(Text(None))
                }
                fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Text, E> {
                    Ok(Text(None))
                }
                fn visit_unit<E: serde::de::Error>(self) -> Result<Text, E> {
                    Ok(Text(None))
                }
                fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Text, A::Error> {
                    IgnoredAny.visit_seq(seq).map(|_| Text(None))
                }
                fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Text, A::Error> {
                    IgnoredAny.visit_map(map).map(|_| Text(None))
                }
            }
            d.deserialize_any(TextVisitor)
        }
    }

    /// What the top-level object names: each field's value (`Some` once
    /// seen), and whether one was seen twice.
    #[derive(Default)]
    struct Namings {
        model: Option<Option<String>>,
        name: Option<Option<String>>,
        twice: bool,
    }
    struct Top {
        or_name: bool,
    }
    impl<'de> DeserializeSeed<'de> for Top {
        type Value = Namings;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Namings, D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de> Visitor<'de> for Top {
        type Value = Namings;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Namings, A::Error> {
            let mut found = Namings::default();
            while let Some(key) = map.next_key::<Key>()? {
                // `name` is read (and may be ambiguous) only where it
                // names the model.
                let slot = match key {
                    Key::Model => &mut found.model,
                    Key::Name if self.or_name => &mut found.name,
                    Key::Name | Key::Other => {
                        map.next_value::<IgnoredAny>()?;
                        continue;
                    }
                };
                found.twice |= slot.is_some();
                *slot = Some(map.next_value::<Text>()?.0);
            }
            Ok(found)
        }
    }

    let mut json = serde_json::Deserializer::from_slice(body);
    let Ok(found) = Top { or_name }.deserialize(&mut json) else {
        return Ok(None);
    };
    if found.twice {
        return Err(Ambiguous);
    }
    let named = |field: Option<Option<String>>| field.flatten().filter(|m| !m.trim().is_empty());
    Ok(named(found.model).or_else(|| named(found.name)))
}

/// A JSON body with its `model` (or `name`) field more than once.
#[derive(Debug, PartialEq, Eq)]
pub struct Ambiguous;

fn refused(
    state: &State,
    refusal: Refusal,
    model: Option<&str>,
    pinned: Option<&str>,
    last_error: Option<&AcquireError>,
) -> Response<PublicBody> {
    match (refusal, last_error) {
        // A client was tried and failed, and none is left to try (the
        // failed one may even have gone offline since): why it failed.
        (Refusal::NoModel | Refusal::NoneOnline | Refusal::Unavailable, Some(e)) => {
            upstream_error(state, e)
        }
        (Refusal::NoneOnline, _) if pinned.is_some() => error_response(
            StatusCode::NOT_FOUND,
            &format!("client '{}' is not online", pinned.unwrap_or_default()),
            "invalid_request_error",
            "client_not_found",
        ),
        (Refusal::NoModel, _) => error_response(
            StatusCode::NOT_FOUND,
            &match pinned {
                // Other boxes may serve it: the pin is what stands in the way.
                Some(client) => format!(
                    "The model `{}` is not served by client '{}'",
                    shorten(model.unwrap_or_default(), 200),
                    shorten(client, 200)
                ),
                None => format!(
                    "The model `{}` does not exist on any online client",
                    shorten(model.unwrap_or_default(), 200)
                ),
            },
            "invalid_request_error",
            "model_not_found",
        ),
        (Refusal::QueueFull | Refusal::QueueTimeout | Refusal::QueuedBodies, _) => {
            Stats::inc(&state.stats.queue_rejections);
            let why = match refusal {
                Refusal::QueueFull => {
                    "every client serving this model is busy and the queue is full"
                }
                Refusal::QueuedBodies => {
                    "every client serving this model is busy, and the requests waiting hold half of what frps may buffer (--max-buffered-bodies)"
                }
                _ => "every client serving this model stayed busy; gave up waiting",
            };
            let resp = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                why,
                "rate_limit_error",
                "capacity_exceeded",
            );
            retry_after(resp, dispatch::retry_after(state.config.queue_timeout))
        }
        (Refusal::Unavailable, None) => {
            Stats::inc(&state.stats.no_client);
            let resp = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "every client that could serve this request is unhealthy; retry shortly",
                "service_unavailable",
                "no_healthy_clients",
            );
            // Every box cooling down: the first back says when (SDKs wait
            // that long before their retry, instead of spending their
            // retries in the first second of a cool-down of up to 60 s).
            let want = router::Want {
                model,
                pinned,
                exclude: &[],
            };
            let secs = router::next_routable(&state.registry, want)
                .map_or(1, |left| left.as_secs_f64().ceil() as u64)
                .clamp(1, 60);
            retry_after(resp, secs)
        }
        (Refusal::NoneOnline, None) => {
            Stats::inc(&state.stats.no_client);
            retry_soon(error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "no client is online to serve this request",
                "service_unavailable",
                "no_clients_available",
            ))
        }
    }
}

/// The name under which `client` lists the model a request for `model`
/// reached (the normalised name if, listing changed meanwhile, none
/// matches now).
fn served_name(client: &ClientHandle, model: &str) -> String {
    router::listed_name(client, model)
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|| router::normalize(model).into_owned())
}

/// `resp` with `Retry-After: 1`: a 503 that may pass at once (a box back
/// from its cool-down or reconnecting, the database or a plugin back). The
/// OpenAI SDKs retry a 503 on their own; the header sets their first wait.
pub(crate) fn retry_soon(resp: Response<PublicBody>) -> Response<PublicBody> {
    retry_after(resp, 1)
}

/// `resp` with `Retry-After: secs`.
fn retry_after(mut resp: Response<PublicBody>, secs: u64) -> Response<PublicBody> {
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

/// The path and query of `uri`: a caller's absolute-form target
/// (`GET http://other-host/…`) must not reach the box as one, or a server
/// that follows RFC 9112 would take the host from it and not from `Host`.
fn origin_form(uri: &http::Uri) -> http::Uri {
    match uri.path_and_query() {
        Some(_) if uri.scheme().is_none() && uri.authority().is_none() => uri.clone(),
        Some(pq) => http::Uri::from(pq.clone()),
        None => http::Uri::from_static("/"),
    }
}

/// RFC 9110 §7.6.2: an `OPTIONS` request whose `Max-Forwards` is 0 is
/// not forwarded (false: frps answers it as its final recipient); a larger
/// one goes on with one less. A value that is no number is left as it came.
fn forwards_options(headers: &mut http::HeaderMap) -> bool {
    let mut values = headers.get_all(header::MAX_FORWARDS).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return true;
    };
    let digits = value.as_bytes();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return true;
    }
    // All digits: only too many of them fail to parse (as good as no limit).
    let Ok(left) = std::str::from_utf8(digits).unwrap_or("").parse::<u64>() else {
        return true;
    };
    if left == 0 {
        return false;
    }
    headers.insert(header::MAX_FORWARDS, HeaderValue::from(left - 1));
    true
}

/// The answer to an `OPTIONS` request frps does not forward: what the
/// public port takes.
#[cold]
fn options_answered_here() -> Response<PublicBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
    resp
}

/// RFC 9112 §3.2.2: the host of an absolute-form target (`GET
/// http://api.example/v1/models`) is the request's host, whatever its `Host`
/// says; a gateway passes that one on (as the service's `Host`, or in
/// `X-Forwarded-Host` where `set_host` names the service's own address).
fn target_names_the_host<B>(req: &mut Request<B>) {
    let Some(authority) = req.uri().authority() else {
        return;
    };
    // Without any user information the target carried.
    let host = match authority.port() {
        Some(port) => format!("{}:{port}", authority.host()),
        None => authority.host().to_owned(),
    };
    if let Ok(host) = HeaderValue::from_str(&host) {
        req.headers_mut().insert(header::HOST, host);
    }
}

pub(crate) use common::text::shorten;

fn set_host(req: &mut Request<upstream::UpBody>, client: &ClientHandle) {
    let local = &client.registration.local_host;
    let headers = req.headers_mut();
    match HeaderValue::from_str(local) {
        Ok(v) if !local.is_empty() => {
            if let Some(orig) = headers.insert(header::HOST, v) {
                headers.insert(X_FORWARDED_HOST, orig);
            }
        }
        // A client that did not say its service's address: the caller's
        // Host stays. An HTTP/1.0 caller may have sent none, and the
        // request goes out as HTTP/1.1, which must name one.
        _ => {
            headers
                .entry(header::HOST)
                .or_insert(HeaderValue::from_static("localhost"));
        }
    }
}

fn respond(
    state: &Arc<State>,
    resp: Response<Incoming>,
    guard: InFlight,
    conn: upstream::Conn,
    started: Instant,
    model: String,
    upload: Option<Arc<UploadClock>>,
) -> Response<PublicBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let idle = state.config.upstream_idle_timeout;
    let body = TrackedBody {
        inner: body,
        state: state.clone(),
        guard,
        conn: Some(conn),
        finished: false,
        started,
        status: parts.status.as_u16(),
        model,
        idle,
        idle_timer: None,
        last_frame: tokio::time::Instant::now(),
        evicted: None,
        after_eviction: false,
        lease: None,
        upload,
    };
    Response::from_parts(parts, Either::Left(body))
}

fn upstream_error(state: &State, e: &AcquireError) -> Response<PublicBody> {
    if e.is_timeout() {
        Stats::inc(&state.stats.dial_timeouts);
        error_response(
            StatusCode::GATEWAY_TIMEOUT,
            &format!("no client answered in time: {}", e.for_caller()),
            "gateway_timeout",
            "client_timeout",
        )
    } else if let AcquireError::Pair(PairError::TooMany(_)) | AcquireError::Busy(_) = e {
        Stats::inc(&state.stats.no_client);
        retry_soon(error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "every client that could serve this request is busy; retry shortly",
            "service_unavailable",
            "client_busy",
        ))
    } else if let AcquireError::Pair(PairError::Refused(_)) = e {
        // The cause is in frps's log (the plugin call's line).
        Stats::inc(&state.stats.no_client);
        retry_soon(error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server could not connect a client for this request; retry later",
            "service_unavailable",
            "plugin_unavailable",
        ))
    } else if let AcquireError::HeadTimeout(_) = e {
        Stats::inc(&state.stats.upstream_errors);
        error_response(
            StatusCode::GATEWAY_TIMEOUT,
            &format!(
                "the client's local service did not answer: {}",
                e.for_caller()
            ),
            "gateway_timeout",
            "upstream_timeout",
        )
    } else if let AcquireError::Service(_) = e {
        Stats::inc(&state.stats.upstream_errors);
        error_response(
            StatusCode::BAD_GATEWAY,
            &format!(
                "the client's local service failed before answering: {}",
                e.for_caller()
            ),
            "upstream_error",
            "upstream_failed",
        )
    } else {
        Stats::inc(&state.stats.upstream_errors);
        error_response(
            StatusCode::BAD_GATEWAY,
            &format!("could not reach a client's service: {}", e.for_caller()),
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

/// Whether a request's `Transfer-Encoding` (if any) names `chunked` and
/// nothing else: the one coding frps undoes and the service gets undone.
fn framed_by_chunks_alone(headers: &HeaderMap) -> bool {
    let mut codings = transfer_codings(headers);
    match codings.next() {
        None => true,
        Some(first) => first.eq_ignore_ascii_case(b"chunked") && codings.next().is_none(),
    }
}

/// Whether an answer with `status` to a `method` request carries a body
/// (RFC 9110 §6.4.1: not to HEAD, nor a 1xx, 204 or 304), whatever its
/// framing headers say.
fn has_body(method: &Method, status: StatusCode) -> bool {
    *method != Method::HEAD
        && !status.is_informational()
        && status != StatusCode::NO_CONTENT
        && status != StatusCode::NOT_MODIFIED
}

/// Whether an answer's `Transfer-Encoding` (if any) leaves nothing coded
/// once its framing is undone: `identity` (the old name for none) only,
/// then at most `chunked`, last, as hyper reads it. With `chunked`
/// anywhere but last hyper reads the body to the close, chunk lines and
/// all.
fn decoded_by_framing(headers: &HeaderMap) -> bool {
    let mut last: Option<&[u8]> = None;
    for coding in transfer_codings(headers) {
        if last.is_some_and(|before| !before.eq_ignore_ascii_case(b"identity")) {
            return false;
        }
        last = Some(coding);
    }
    last.is_none_or(|c| c.eq_ignore_ascii_case(b"chunked") || c.eq_ignore_ascii_case(b"identity"))
}

/// The codings a message's `Transfer-Encoding` headers list, in order.
fn transfer_codings(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty())
}

/// Names outside `http`'s table of standard headers, parsed once: a
/// lookup by `&str` parses the name on every call.
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
/// The header that pins a request to one client.
const X_FRPX_CLIENT: HeaderName = HeaderName::from_static("x-frpx-client");

/// Whether `name` is hop-by-hop whatever `Connection` says.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    [
        header::CONNECTION,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        KEEP_ALIVE,
        PROXY_CONNECTION,
    ]
    .contains(name)
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those the
/// `Connection` header names.
///
/// One pass over the names present decides what goes: a removal per
/// possible name (each hashing it, and parsing the non-standard ones) was
/// ~10 % of frps's instructions per request (issue 7's callgrind profile).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // A message framed by Transfer-Encoding ignores any Content-Length; it
    // goes with the encoding (RFC 9112 §6.3), or the decoded body would be
    // resent under a length it does not have.
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    // Options `Connection` lists: header names, except the two tokens that
    // are not (`close`) or are removed anyway (`keep-alive`). Each token is
    // one hashed removal (no allocation), so a value of many thousands of
    // names costs time in proportion to its length, not to its length times
    // the number of headers present.
    let listed: Vec<HeaderValue> = headers
        .get_all(header::CONNECTION)
        .iter()
        .cloned()
        .collect();
    for token in listed
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive"))
    {
        headers.remove(token);
    }
    remove_where(headers, is_hop_by_hop);
}

/// Removes every header whose name `doomed` picks, looking at each name
/// present once (no hashed removal per possible name).
fn remove_where(headers: &mut HeaderMap, doomed: impl Fn(&HeaderName) -> bool) {
    let names: Vec<HeaderName> = headers.keys().filter(|n| doomed(n)).cloned().collect();
    for name in names {
        headers.remove(name);
    }
}

/// The caller's address as an `X-Forwarded-For` entry (made once per
/// connection: formatting an address costs more than the rest of the
/// header rewriting).
fn forwarded_for_entry(peer: SocketAddr) -> HeaderValue {
    // An IPv4 caller of a dual-stack listener is itself, not ::ffff:a.b.c.d.
    HeaderValue::from_str(&peer.ip().to_canonical().to_string())
        .expect("an IP address is a valid header value")
}

/// Whether only frps may set `name` on a request to a service: it speaks
/// for the caller's address or the public side, which a caller could forge.
fn is_edge_header(name: &HeaderName) -> bool {
    [
        header::FORWARDED,
        X_REAL_IP,
        X_FORWARDED_PROTO,
        X_FORWARDED_HOST,
    ]
    .contains(name)
}

/// Tells the service who called and how: the caller's address is appended
/// to `X-Forwarded-For` (a chain the caller sent is kept, as proxies do: its
/// entries are the caller's word, the last one is frps's) and is all of
/// `X-Real-IP`; `X-Forwarded-Proto` says `http` or `https`. A caller's own
/// `Forwarded`, `X-Real-IP`, `X-Forwarded-Proto` and `X-Forwarded-Host` are
/// dropped (`set_host` adds `X-Forwarded-Host` when it rewrites `Host`).
fn set_forwarding(headers: &mut HeaderMap, caller: &Caller) {
    remove_where(headers, is_edge_header);
    append_forwarded_for(headers, &caller.forwarded_for);
    headers.insert(X_REAL_IP, caller.forwarded_for.clone());
    headers.insert(X_FORWARDED_PROTO, caller.proto.clone());
}

/// Appends `entry` (from [`forwarded_for_entry`]) to `X-Forwarded-For`.
fn append_forwarded_for(headers: &mut HeaderMap, entry: &HeaderValue) {
    let joined = match headers.get(X_FORWARDED_FOR) {
        None => entry.clone(),
        Some(prev) => {
            let mut value = Vec::with_capacity(prev.len() + 2 + entry.len());
            value.extend_from_slice(prev.as_bytes());
            value.extend_from_slice(b", ");
            value.extend_from_slice(entry.as_bytes());
            match HeaderValue::from_bytes(&value) {
                Ok(v) => v,
                // Not reachable (both parts were valid values); keep the
                // caller's header rather than lose the request.
                Err(_) => return,
            }
        }
    };
    headers.insert(X_FORWARDED_FOR, joined);
}

/// A capacity slot reserved on a client for one request; dropping it frees
/// the slot and wakes the first request waiting for one.
pub struct InFlight {
    state: Arc<State>,
    client: Arc<ClientHandle>,
    /// Whether this one holds the slot (not handed on by [`InFlight::take`]).
    armed: bool,
}

impl InFlight {
    fn reserved(state: Arc<State>, client: Arc<ClientHandle>) -> Self {
        Self {
            state,
            client,
            armed: true,
        }
    }

    /// The slot, leaving this one holding nothing.
    fn take(&mut self) -> InFlight {
        let armed = std::mem::replace(&mut self.armed, false);
        InFlight {
            state: self.state.clone(),
            client: self.client.clone(),
            armed,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.client.release_slot();
        if self.state.queues.is_empty() {
            return;
        }
        // The slot is shared with the client's newer session, if it
        // reconnected meanwhile: wake the queues for what that one serves
        // (its model list may have changed).
        let live = self.state.registry.get(&self.client.id).filter(|c| {
            c.session != self.client.session && Arc::ptr_eq(&c.in_flight, &self.client.in_flight)
        });
        self.state
            .queues
            .slot_freed(live.as_deref().unwrap_or(&self.client));
    }
}

/// The upstream response body, streamed frame by frame (no buffering, so
/// server-sent events pass one by one), counting bytes and holding the
/// request's slot until the body ends or the caller goes away. A service
/// silent for `--upstream-idle-timeout` fails the stream. When the body was
/// read to its end, the upstream connection goes back to the client's idle
/// pool; when the caller left early it is dropped, which closes it and
/// cancels the upstream request, so the GPU stops working for nobody.
pub struct TrackedBody {
    inner: Incoming,
    state: Arc<State>,
    guard: InFlight,
    /// The upstream connection, pooled or closed when the body is done.
    conn: Option<upstream::Conn>,
    finished: bool,
    started: Instant,
    status: u16,
    model: String,
    idle: std::time::Duration,
    idle_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    last_frame: tokio::time::Instant,
    /// Ends when the box is evicted for silence; made on the first wait.
    evicted: Option<Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
    /// The box was evicted for silence: `idle` is down to a heartbeat
    /// interval.
    after_eviction: bool,
    /// The API key's concurrency slot, released with the body.
    lease: Option<crate::ratelimit::Lease>,
    /// A streamed request body's upload (`None` for buffered and bodiless
    /// ones). A service that answered before the upload ended still has the
    /// rest of it coming on that connection: it is not pooled, and the
    /// box's slot and the key's lease stay taken until the upload ends
    /// ([`UploadClock::hold`]).
    upload: Option<Arc<UploadClock>>,
}

/// Error of a streamed response body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.state
                        .stats
                        .bytes_out
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                // The timer itself is re-armed lazily, when it fires: a
                // reset per frame would touch the timer wheel per frame.
                self.last_frame = tokio::time::Instant::now();
            }
            Poll::Ready(None) => self.finished = true,
            Poll::Ready(Some(Err(_))) => self.let_go(),
            Poll::Pending => {
                let this = &mut *self;
                // A box evicted for silence (no heartbeat for three
                // intervals) may be frozen with its connections left open,
                // or only its control connection may have stalled: from
                // then its stream may wait one heartbeat interval for its
                // next bytes, not `--upstream-idle-timeout` (its caller,
                // the capacity slot and the key's lease were held that
                // long by a frozen box).
                if let Some(evicted) = &mut this.evicted
                    && evicted.as_mut().poll(cx).is_ready()
                {
                    this.evicted = None;
                    this.after_eviction = true;
                    // Counted from the eviction at the earliest.
                    this.last_frame = tokio::time::Instant::now();
                    this.idle = this.idle.min(this.state.config.heartbeat_interval);
                    if let Some(timer) = &mut this.idle_timer {
                        timer.as_mut().reset(this.last_frame + this.idle);
                    }
                }
                let deadline = this.last_frame + this.idle;
                // Made on the first wait: most small answers never wait.
                let timer = this
                    .idle_timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                while timer.as_mut().poll(cx).is_ready() {
                    let deadline = this.last_frame + this.idle;
                    if deadline > tokio::time::Instant::now() {
                        timer.as_mut().reset(deadline);
                        continue;
                    }
                    this.let_go();
                    let why = if this.after_eviction {
                        format!(
                            "upstream silent for {:?} after its client was evicted for silence",
                            this.idle
                        )
                    } else {
                        format!("upstream silent for {:?}", this.idle)
                    };
                    warn!(client = %this.guard.client.id, "{why}; closing the stream");
                    return Poll::Ready(Some(Err(why.into())));
                }
                if !this.after_eviction && this.evicted.is_none() {
                    let mut evicted = Box::pin(this.guard.client.silent.clone().cancelled_owned());
                    if evicted.as_mut().poll(cx).is_ready() {
                        // Evicted already: look again at once.
                        cx.waker().wake_by_ref();
                    }
                    this.evicted = Some(evicted);
                }
            }
        }
        polled.map(|o| o.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl TrackedBody {
    /// Whether nothing of the request is still going out (its streamed
    /// body's upload, if any, ended).
    fn uploaded(&self) -> bool {
        self.upload.as_ref().is_none_or(|u| u.finished().is_some())
    }

    /// Gives up the upstream connection, which will carry nothing more:
    /// closed (dropped), unless an upload still going out on it holds it
    /// (the upload's watch closes it, [`UploadClock`]).
    fn let_go(&mut self) {
        if let Some(conn) = self.conn.take()
            && !self.uploaded()
        {
            conn.keep_open();
        }
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        self.state.metrics.finished(
            self.status,
            &self.guard.client.id,
            &self.model,
            self.started.elapsed(),
        );
        let reusable = (self.finished || self.inner.is_end_stream()) && self.uploaded();
        if reusable && let Some(conn) = self.conn.take() {
            // A pool whose client is gone, or full, closes it
            // (`IdlePool::put`).
            self.guard
                .client
                .idle
                .put(conn, self.state.config.max_idle_per_client);
        }
        self.let_go();
        if let Some(upload) = &self.upload {
            let held = Held {
                _slot: self.guard.take(),
                _lease: self.lease.take(),
            };
            upload.hold(held, self.state.config.upstream_idle_timeout);
        }
    }
}

/// What a request holds while the box works on it: its slot on the box,
/// its API key's concurrency lease.
struct Held {
    _slot: InFlight,
    _lease: Option<crate::ratelimit::Lease>,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("client", &self._slot.client.id)
            .finish()
    }
}

/// Where a streamed request body's upload stands, shared by the body,
/// which records it, and the wait for the response head, which does not
/// count the caller's time against the service; and what the request holds
/// past its answer while the upload goes on.
#[derive(Debug, Default)]
struct UploadClock {
    clock: std::sync::Mutex<Clock>,
    /// Told when what was held is given back by the upload's end, so the
    /// watch over it ends too.
    given_back: Arc<tokio::sync::Notify>,
}

#[derive(Debug, Default)]
struct Clock {
    at: Upload,
    /// Held for an answer that ended before the upload (a [`Held`]).
    held: Option<Box<dyn std::fmt::Debug + Send>>,
    /// The body went away (its connection ended) without finishing.
    gone: bool,
    /// Closes the connection the upload goes out on.
    cut: Option<tokio_util::sync::CancellationToken>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Upload {
    /// The next piece is wanted and the caller has not sent it yet (also
    /// before the first is asked for): the caller's time.
    #[default]
    Waiting,
    /// A piece was handed on at this time and no other asked for since:
    /// the connection to the service has taken nothing more (its buffers
    /// are full), the service's time.
    Handed(tokio::time::Instant),
    /// The last piece was handed on at this time.
    Finished(tokio::time::Instant),
}

impl UploadClock {
    fn lock(&self) -> std::sync::MutexGuard<'_, Clock> {
        self.clock.lock().expect("upload clock lock")
    }

    /// Gives back what `held` is (taken under the lock), telling the watch.
    fn give_back(&self, held: Option<Box<dyn std::fmt::Debug + Send>>) {
        if held.is_some() {
            drop(held);
            self.given_back.notify_one();
        }
    }

    fn set(&self, to: Upload) {
        let mut clock = self.lock();
        if !matches!(clock.at, Upload::Finished(_)) {
            clock.at = to;
        }
    }

    /// The last piece went out: what the request held is given back.
    fn finish(&self) {
        let held = {
            let mut clock = self.lock();
            if !matches!(clock.at, Upload::Finished(_)) {
                clock.at = Upload::Finished(tokio::time::Instant::now());
            }
            clock.held.take()
        };
        self.give_back(held);
    }

    /// The body is gone, finished or not: what the request held is given
    /// back.
    fn end(&self) {
        let held = {
            let mut clock = self.lock();
            clock.gone = true;
            clock.held.take()
        };
        self.give_back(held);
    }

    /// Keeps `held` (the answer has ended) until the upload finishes or its
    /// body goes away, or the service takes none of it for `idle` (the
    /// connection may be stuck for good: the box's slot must not be). Given
    /// back at once if the upload is over already.
    fn hold(
        self: &Arc<Self>,
        held: impl std::fmt::Debug + Send + 'static,
        idle: std::time::Duration,
    ) {
        // Nothing to watch it with, it is given back (frps runs on tokio:
        // not seen).
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        {
            let mut clock = self.lock();
            if matches!(clock.at, Upload::Finished(_)) || clock.gone {
                drop(clock);
                drop(held);
                return;
            }
            clock.held = Some(Box::new(held));
        }
        let clock = Arc::downgrade(self);
        let given_back = self.given_back.clone();
        runtime.spawn(async move {
            let mut due = tokio::time::Instant::now() + idle;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    // Looked at below: the held thing may be gone.
                    _ = given_back.notified() => {}
                }
                let Some(clock) = clock.upgrade() else { return };
                let mut state = clock.lock();
                if state.held.is_none() {
                    return;
                }
                match state.at {
                    // Taken lately, or the caller's turn (its waits are held
                    // to --keepalive-timeout by the body itself).
                    Upload::Handed(at) if at + idle > tokio::time::Instant::now() => due = at + idle,
                    Upload::Waiting => due = tokio::time::Instant::now() + idle,
                    _ => {
                        let held = state.held.take();
                        let cut = state.cut.take();
                        drop(state);
                        debug!(?held, "the service took none of an upload for {idle:?} after answering; its connection is closed and its slot given back");
                        // Closed, the connection drops the body, which
                        // drops the caller's side of it.
                        if let Some(cut) = cut {
                            cut.cancel();
                        }
                        return;
                    }
                }
            }
        });
    }

    fn state(&self) -> Upload {
        self.lock().at
    }

    /// The upload goes out on the connection `cut` closes.
    fn goes_out_on(&self, cut: &tokio_util::sync::CancellationToken) {
        self.lock().cut = Some(cut.clone());
    }

    fn finished(&self) -> Option<tokio::time::Instant> {
        match self.state() {
            Upload::Finished(at) => Some(at),
            _ => None,
        }
    }
}

/// Awaits `send` (the response head) while the service is given `idle` to
/// answer from the end of the request: a streamed upload (`upload`) still
/// arriving from the caller is the caller's time (its gaps are held to
/// `--keepalive-timeout` by [`CountedBody`]), not the service's; a piece of
/// it that the service has not taken for `idle` is the service's. `Err`
/// when the service stayed silent, or took nothing, that long.
async fn response_head<F: Future>(
    send: F,
    idle: std::time::Duration,
    upload: Option<&UploadClock>,
) -> Result<F::Output, ()> {
    tokio::pin!(send);
    let mut deadline = tokio::time::Instant::now() + idle;
    loop {
        tokio::select! {
            out = &mut send => return Ok(out),
            _ = tokio::time::sleep_until(deadline) => {
                let now = tokio::time::Instant::now();
                deadline = match upload.map(UploadClock::state) {
                    Some(Upload::Waiting) => now + idle,
                    Some(Upload::Handed(at) | Upload::Finished(at)) if at + idle > now => {
                        at + idle
                    }
                    _ => return Err(()),
                };
            }
        }
    }
}

/// A caller's request body on its way upstream, counting its bytes.
pub struct CountedBody {
    inner: Incoming,
    state: Arc<State>,
    /// The caller's time: each wait and all of them together.
    waits: CallerWaits,
    /// Armed while a piece is awaited.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Told when the last piece went out.
    upload: Arc<UploadClock>,
}

/// A streamed request body's failure: the caller's connection, or its
/// silence past `--keepalive-timeout`.
#[derive(Debug, thiserror::Error)]
pub enum CallerBodyError {
    /// Reading from the caller failed.
    #[error("reading the request body failed: {0}")]
    Read(#[from] hyper::Error),
    /// Nothing arrived for the whole gap.
    #[error("the request body stalled: nothing arrived for {0:?}")]
    Stalled(std::time::Duration),
    /// The caller's waits added up to `--upload-timeout`.
    #[error("the request body did not arrive within {0:?}")]
    TooSlow(std::time::Duration),
}

/// A streamed body's waits for the caller: each is held to `gap`
/// (`--keepalive-timeout`) and all together to `limit`
/// (`--upload-timeout`). Only the time a piece is wanted and the caller
/// has not sent it counts: not the time before frps asks for the body (a
/// queue, a dial-back) nor while the service takes what it was handed.
#[derive(Debug)]
struct CallerWaits {
    gap: std::time::Duration,
    limit: std::time::Duration,
    /// The caller's time in the waits that ended.
    spent: std::time::Duration,
    /// When the current wait began.
    since: Option<tokio::time::Instant>,
}

impl CallerWaits {
    fn new(gap: std::time::Duration, limit: std::time::Duration) -> Self {
        Self {
            gap,
            limit,
            spent: std::time::Duration::ZERO,
            since: None,
        }
    }

    /// A piece is wanted and has not come: `Some(due)` when a wait begins
    /// now (the time it fails at), `None` while one goes on.
    fn waiting(&mut self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        if self.since.is_some() {
            return None;
        }
        self.since = Some(now);
        Some(now + self.gap.min(self.limit.saturating_sub(self.spent)))
    }

    /// Whether a wait is under way.
    fn is_waiting(&self) -> bool {
        self.since.is_some()
    }

    /// A piece (or the end) came: the wait, if any, is over.
    fn arrived(&mut self, now: tokio::time::Instant) {
        if let Some(since) = self.since.take() {
            self.spent += now - since;
        }
    }

    /// Why the wait that began at `since` and failed at its due failed.
    fn expired(&self) -> CallerBodyError {
        if self.limit.saturating_sub(self.spent) <= self.gap {
            CallerBodyError::TooSlow(self.limit)
        } else {
            CallerBodyError::Stalled(self.gap)
        }
    }
}

impl Drop for CountedBody {
    fn drop(&mut self) {
        self.upload.end();
    }
}

impl Body for CountedBody {
    type Data = Bytes;
    type Error = CallerBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, CallerBodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(polled) => {
                if this.waits.is_waiting() {
                    this.waits.arrived(tokio::time::Instant::now());
                }
                if let Some(Ok(frame)) = &polled
                    && let Some(data) = frame.data_ref()
                {
                    this.state
                        .stats
                        .bytes_in
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    this.upload.set(Upload::Handed(tokio::time::Instant::now()));
                }
                // The end, whether read (`None`), known from the length
                // (hyper does not poll past a body's announced end) or
                // from trailers (always last: hyper stops there too).
                let trailers = matches!(&polled, Some(Ok(frame)) if frame.is_trailers());
                if polled.is_none() || trailers || this.inner.is_end_stream() {
                    this.upload.finish();
                }
                Poll::Ready(polled.map(|r| r.map_err(CallerBodyError::from)))
            }
            Poll::Pending => {
                this.upload.set(Upload::Waiting);
                if let Some(due) = this.waits.waiting(tokio::time::Instant::now()) {
                    match &mut this.timer {
                        Some(timer) => timer.as_mut().reset(due),
                        None => this.timer = Some(Box::pin(tokio::time::sleep_until(due))),
                    }
                }
                let timer = this.timer.as_mut().expect("armed while waiting");
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(this.waits.expired()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_go_on_while_max_forwards_allows() {
        let forwards = |values: &[&'static str]| {
            let mut h = http::HeaderMap::new();
            for v in values {
                h.append(header::MAX_FORWARDS, HeaderValue::from_static(v));
            }
            let on = forwards_options(&mut h);
            let left: Vec<_> = h
                .get_all(header::MAX_FORWARDS)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect();
            (on, left)
        };
        assert_eq!(forwards(&[]), (true, vec![]));
        assert_eq!(forwards(&["0"]), (false, vec!["0".to_owned()]));
        assert_eq!(forwards(&["1"]), (true, vec!["0".to_owned()]));
        assert_eq!(forwards(&["10"]), (true, vec!["9".to_owned()]));
        // Not a number, or two: left as they came.
        assert_eq!(forwards(&["x"]), (true, vec!["x".to_owned()]));
        assert_eq!(forwards(&["-1"]), (true, vec!["-1".to_owned()]));
        assert!(forwards(&["0", "0"]).0);
        assert_eq!(
            forwards(&["99999999999999999999999"]),
            (true, vec!["99999999999999999999999".to_owned()])
        );
    }

    #[test]
    fn an_absolute_targets_host_is_the_requests() {
        let request = |target: &str, host: Option<&'static str>| {
            let mut req = Request::builder().uri(target).body(()).unwrap();
            if let Some(host) = host {
                req.headers_mut()
                    .insert(header::HOST, HeaderValue::from_static(host));
            }
            target_names_the_host(&mut req);
            req.headers()
                .get(header::HOST)
                .map(|h| h.to_str().unwrap().to_owned())
        };
        let host = |target, host| request(target, Some(host));
        assert_eq!(
            host("http://api.example/v1/models", "x").unwrap(),
            "api.example"
        );
        assert_eq!(
            host("http://u:p@api.example:8/", "x").unwrap(),
            "api.example:8"
        );
        assert_eq!(host("http://[::1]:9/a", "x").unwrap(), "[::1]:9");
        assert_eq!(request("http://api.example/", None).unwrap(), "api.example");
        // An origin-form target leaves Host as it came.
        assert_eq!(host("/v1/models", "x").unwrap(), "x");
        assert_eq!(request("/v1/models", None), None);
    }

    #[test]
    fn a_request_upstream_always_names_a_host() {
        use crate::registry::{Registry, testing};
        let reg = Registry::default();
        let request = |host: Option<&'static str>| {
            let mut req = Request::new(Either::Left(Full::new(Bytes::new())));
            if let Some(host) = host {
                req.headers_mut()
                    .insert(header::HOST, HeaderValue::from_static(host));
            }
            req
        };
        // A client that said its service's address: that is the Host, the
        // caller's goes in X-Forwarded-Host.
        let (mut new, _rx) = testing::new_client("addressed", &[], None);
        new.registration.local_host = "127.0.0.1:11434".into();
        let addressed = reg.insert(new).unwrap();
        let mut req = request(Some("api.example"));
        set_host(&mut req, &addressed);
        assert_eq!(req.headers()[header::HOST], "127.0.0.1:11434");
        assert_eq!(req.headers()[X_FORWARDED_HOST], "api.example");
        // One that did not: the caller's stays...
        let blank = testing::add(&reg, "blank", &[], None);
        let mut req = request(Some("api.example"));
        set_host(&mut req, &blank);
        assert_eq!(req.headers()[header::HOST], "api.example");
        assert!(!req.headers().contains_key(X_FORWARDED_HOST));
        // ...and an HTTP/1.0 caller without one still sends the service
        // (over HTTP/1.1) a Host.
        let mut req = request(None);
        set_host(&mut req, &blank);
        assert_eq!(req.headers()[header::HOST], "localhost");
    }

    #[test]
    fn a_body_in_pieces_is_joined_in_one_buffer_of_its_announced_size() {
        let piece = |n: usize| Bytes::from(vec![b'x'; n]);
        // 10,000 bytes announced, in pieces of 1,000: one allocation.
        let mut p = Pieces::default();
        p.push(piece(1_000), Some(9_000), 1 << 20);
        assert!(p.joined.is_empty(), "one piece is kept as it came");
        for left in (0..9).rev() {
            p.push(piece(1_000), Some(left * 1_000), 1 << 20);
            assert_eq!(p.joined.capacity(), 10_000);
        }
        assert_eq!(p.holding(), 10_000);
        assert_eq!(p.finish().len(), 10_000);
        // Never more room than the limit, whatever is announced.
        let mut p = Pieces::default();
        p.push(piece(10), Some(u64::MAX), 100);
        p.push(piece(10), Some(u64::MAX), 100);
        assert!(p.joined.capacity() <= 128, "{}", p.joined.capacity());
        // A large announced body trickling in holds about what arrived,
        // and ends in a buffer of its announced size.
        let whole = 10 << 20;
        let mut p = Pieces::default();
        let mut arrived = 0;
        for n in [1, 1, 1000, 100_000, 1_000_000, 4_000_000, whole - 5_101_002] {
            arrived += n;
            p.push(piece(n), Some((whole - arrived) as u64), 16 << 20);
            let most = (2 * arrived).max(JOIN_START);
            assert!(p.holding() <= most, "{} for {arrived}", p.holding());
        }
        assert_eq!(p.joined.capacity(), whole);
        assert_eq!(p.finish().len(), whole);
        // Of unknown length (chunked): grown by doubling, up to the limit.
        let mut p = Pieces::default();
        for _ in 0..66 {
            p.push(piece(1_000), None, 70_000);
        }
        assert_eq!(p.joined.capacity(), 70_000);
        assert_eq!(p.finish().len(), 66_000);
        // One piece: as it came.
        let mut p = Pieces::default();
        p.push(Bytes::from_static(b"whole"), Some(0), 100);
        assert_eq!(p.finish(), Bytes::from_static(b"whole"));
    }

    #[test]
    fn only_the_callers_waits_count_against_the_upload_timeout() {
        use std::time::Duration;
        let s = Duration::from_secs;
        let t0 = tokio::time::Instant::now();
        let mut waits = CallerWaits::new(s(60), s(100));
        // Queued and dialed for minutes before the first poll: not counted.
        let first = t0 + s(600);
        assert_eq!(waits.waiting(first), Some(first + s(60)));
        assert_eq!(waits.waiting(first + s(1)), None, "the same wait");
        waits.arrived(first + s(50));
        // The service takes its time with that piece: not counted either.
        let second = first + s(500);
        assert_eq!(waits.waiting(second), Some(second + s(50)), "50 s left");
        assert!(matches!(waits.expired(), CallerBodyError::TooSlow(l) if l == s(100)));
        waits.arrived(second + s(10));
        // 60 s spent: the next wait may take the gap, 40 s, the rest.
        let third = second + s(20);
        assert_eq!(waits.waiting(third), Some(third + s(40)));
        waits.arrived(third + s(1));
        // A wait with more left than the gap stalls at the gap.
        let mut roomy = CallerWaits::new(s(60), s(600));
        assert_eq!(roomy.waiting(t0), Some(t0 + s(60)));
        assert!(matches!(roomy.expired(), CallerBodyError::Stalled(g) if g == s(60)));
        // Arriving with no wait under way changes nothing.
        roomy.arrived(t0 + s(1));
        roomy.arrived(t0 + s(500));
        assert_eq!(roomy.spent, s(1));
    }

    #[test]
    fn only_an_answer_left_uncoded_by_its_framing_is_relayed() {
        let with = |te: &[&str]| {
            let mut h = HeaderMap::new();
            for v in te {
                h.append(header::TRANSFER_ENCODING, HeaderValue::from_str(v).unwrap());
            }
            decoded_by_framing(&h)
        };
        assert!(with(&[]));
        assert!(with(&["chunked"]));
        assert!(with(&["Chunked"]));
        assert!(with(&["identity"]));
        assert!(with(&["identity, chunked"]));
        assert!(with(&["identity", "chunked"]));
        assert!(!with(&["gzip, chunked"]));
        assert!(!with(&["gzip"]));
        assert!(!with(&["chunked, identity, gzip"]));
        assert!(!with(&["chunked, identity"]));
        // Read to the close by hyper, chunk lines and all.
        assert!(!with(&["chunked, chunked"]));
        assert!(!with(&["chunked", "gzip"]));
    }

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

        // Every hop-by-hop name, without a Connection header to list them.
        let mut h = HeaderMap::new();
        for name in [
            "proxy-authorization",
            "proxy-authenticate",
            "te",
            "trailer",
            "upgrade",
            "keep-alive",
            "proxy-connection",
            "content-length",
        ] {
            h.insert(HeaderName::from_static(name), HeaderValue::from_static("x"));
        }
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["content-length"]);

        // Listed names go in any case and spacing; `close` is no header.
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("Close"));
        h.append("connection", HeaderValue::from_static(" X-Hop ,x-other"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("x-other", HeaderValue::from_static("1"));
        h.insert(
            "close",
            HeaderValue::from_static("kept: not an option name"),
        );
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["accept", "close"]);

        // A value listing thousands of names (repeated, unknown, invalid,
        // empty) removes exactly the listed headers present.
        let mut h = HeaderMap::new();
        let mut listed = String::new();
        for i in 0..20_000 {
            listed.push_str(["x-hop-7,", "x-absent,", "not a name,", ",", "X-HOP-99,"][i % 5]);
        }
        h.insert("connection", HeaderValue::from_str(&listed).unwrap());
        for i in 0..100 {
            h.insert(
                HeaderName::from_bytes(format!("x-hop-{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("1"),
            );
        }
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 98);
        assert!(!h.contains_key("x-hop-7") && !h.contains_key("x-hop-99"));
        assert!(h.contains_key("x-hop-8") && !h.contains_key("connection"));

        // A stale Content-Length beside Transfer-Encoding goes with it.
        let mut h = HeaderMap::new();
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("content-length", HeaderValue::from_static("5"));
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["content-type"]);

        // Nothing hop-by-hop: nothing changes.
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer k"));
        h.insert("host", HeaderValue::from_static("a"));
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }

    #[tokio::test(start_paused = true)]
    async fn what_an_early_answer_held_goes_back_when_its_upload_ends() {
        use std::time::Duration;
        use tokio::time::{Instant, sleep};
        #[derive(Debug)]
        struct Token(#[allow(dead_code)] Arc<()>);
        let idle = Duration::from_secs(10);
        let token = Arc::new(());
        let held = || Token(token.clone());
        let holding = || Arc::strong_count(&token) - 1;

        let watches = || {
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
        };

        // The upload finishes (or its body goes away) later: held till
        // then, and watched no longer.
        let upload = Arc::new(UploadClock::default());
        upload.hold(held(), idle);
        assert_eq!((holding(), watches()), (1, 1));
        tokio::task::yield_now().await;
        let connection = tokio_util::sync::CancellationToken::new();
        upload.goes_out_on(&connection);
        upload.set(Upload::Handed(Instant::now()));
        upload.finish();
        assert_eq!(holding(), 0);
        assert!(
            !connection.is_cancelled(),
            "a finished upload's connection is kept"
        );
        let gone = Arc::new(UploadClock::default());
        gone.hold(held(), idle);
        gone.end();
        assert_eq!(holding(), 0);
        tokio::task::yield_now().await;
        assert_eq!(watches(), 0, "the watches ended with their uploads");
        // Over already: given back at once.
        upload.hold(held(), idle);
        gone.hold(held(), idle);
        assert_eq!(holding(), 0);

        // The caller slow to send: its own deadlines end the body, not this.
        let slow = Arc::new(UploadClock::default());
        slow.goes_out_on(&connection);
        slow.hold(held(), idle);
        sleep(idle * 5).await;
        assert_eq!(holding(), 1);
        // Taken piece by piece within `idle` each: kept.
        for _ in 0..5 {
            slow.set(Upload::Handed(Instant::now()));
            sleep(idle - Duration::from_secs(1)).await;
            assert_eq!(holding(), 1);
        }
        // A piece the service has not taken for `idle`: given back, and its
        // connection closed.
        assert!(!connection.is_cancelled());
        sleep(Duration::from_secs(1)).await;
        tokio::task::yield_now().await;
        assert_eq!(holding(), 0);
        assert!(connection.is_cancelled());
        drop(slow);
    }

    #[tokio::test(start_paused = true)]
    async fn the_service_is_given_its_time_from_the_end_of_the_upload() {
        use std::time::Duration;
        use tokio::time::{Instant, sleep};
        let idle = Duration::from_secs(10);
        let never = std::future::pending::<()>;

        // A request that was out at once: the service has `idle`.
        let started = Instant::now();
        assert!(response_head(never(), idle, None).await.is_err());
        assert_eq!(started.elapsed(), idle);

        // An upload that runs 25 s: the service has `idle` from its end.
        let upload = Arc::new(UploadClock::default());
        let uploader = tokio::spawn({
            let upload = upload.clone();
            async move {
                sleep(Duration::from_secs(25)).await;
                upload.finish();
            }
        });
        let started = Instant::now();
        assert!(response_head(never(), idle, Some(&upload)).await.is_err());
        assert_eq!(started.elapsed(), Duration::from_secs(35));
        uploader.await.unwrap();

        // A piece handed on and never taken further (the service reads no
        // more of the body): the service has `idle` from then.
        let stuck = Arc::new(UploadClock::default());
        stuck.set(Upload::Handed(Instant::now()));
        let started = Instant::now();
        assert!(response_head(never(), idle, Some(&stuck)).await.is_err());
        assert_eq!(started.elapsed(), idle);
        // Taken piece by piece, each within `idle`, then finished: from the
        // end.
        let taken = Arc::new(UploadClock::default());
        let feeder = tokio::spawn({
            let taken = taken.clone();
            async move {
                for _ in 0..4 {
                    taken.set(Upload::Handed(Instant::now()));
                    sleep(Duration::from_secs(8)).await;
                }
                taken.finish();
            }
        });
        let started = Instant::now();
        assert!(response_head(never(), idle, Some(&taken)).await.is_err());
        assert_eq!(started.elapsed(), Duration::from_secs(42));
        feeder.await.unwrap();

        // An answer in time is passed on.
        let answer = async {
            sleep(Duration::from_secs(3)).await;
            42
        };
        assert_eq!(response_head(answer, idle, Some(&upload)).await, Ok(42));
    }

    #[test]
    fn the_model_comes_from_the_body() {
        assert_eq!(
            model_of(br#"{"model":"llama3","messages":[]}"#, false)
                .unwrap()
                .as_deref(),
            Some("llama3")
        );
        assert_eq!(model_of(br#"{"model":"  "}"#, false), Ok(None));
        assert_eq!(model_of(b"not json", false), Ok(None));
        // `name` counts only where asked (Ollama's /api/show), and `model`
        // wins over it.
        assert_eq!(model_of(br#"{"name":"qwen2"}"#, false), Ok(None));
        assert_eq!(
            model_of(br#"{"name":"qwen2"}"#, true).unwrap().as_deref(),
            Some("qwen2")
        );
        assert_eq!(
            model_of(br#"{"model":"a","name":"b"}"#, true)
                .unwrap()
                .as_deref(),
            Some("a")
        );
        // A `name` of another type does not spoil the `model`.
        assert_eq!(
            model_of(br#"{"model":"a","name":{"x":1}}"#, true)
                .unwrap()
                .as_deref(),
            Some("a")
        );
        assert_eq!(model_of(br#"{"name":7}"#, true), Ok(None));
        // Named twice: frps would route on one, the service serve the other.
        for body in [
            &br#"{"model":"a","model":"b"}"#[..],
            br#"{"model":"a","messages":[],"model":"a"}"#,
            br#"{"name":"a","name":"b"}"#,
        ] {
            assert_eq!(model_of(body, true), Err(Ambiguous));
        }
        // `name` twice matters only where it names the model.
        assert_eq!(
            model_of(br#"{"model":"m","name":"a","name":"b"}"#, false)
                .unwrap()
                .as_deref(),
            Some("m")
        );
        // Nested objects may have their own `model`.
        assert_eq!(
            model_of(br#"{"model":"a","tools":[{"model":"b"}]}"#, false)
                .unwrap()
                .as_deref(),
            Some("a")
        );
    }

    /// Go's `encoding/json` (Ollama) matches field names whatever their
    /// case and reads only a body's first value: frps reads the body so.
    #[test]
    fn the_model_is_read_as_go_services_read_it() {
        // Another case of the same name is the same field: named twice.
        for body in [
            &br#"{"model":"a","MODEL":"b"}"#[..],
            br#"{"Model":"a","model":"a"}"#,
            br#"{"mod\u0065l":"a","model":"b"}"#,
        ] {
            assert_eq!(model_of(body, false), Err(Ambiguous), "{body:?}");
        }
        assert_eq!(
            model_of(br#"{"name":"a","NAME":"b"}"#, true),
            Err(Ambiguous)
        );
        // Named once, in any case.
        assert_eq!(
            model_of(br#"{"Model":"a"}"#, false).unwrap().as_deref(),
            Some("a")
        );
        assert_eq!(
            model_of(br#"{"Name":"q"}"#, true).unwrap().as_deref(),
            Some("q")
        );
        // What follows the first value is not read.
        for body in [
            &br#"{"model":"a"}{}"#[..],
            br#"{"model":"a"} {"model":"b"}"#,
        ] {
            assert_eq!(model_of(body, false).unwrap().as_deref(), Some("a"));
        }
        // A `model` that is not a string names none.
        for body in [
            &br#"{"model":7}"#[..],
            br#"{"model":null}"#,
            br#"{"model":["a"]}"#,
            br#"{"model":{"a":1}}"#,
        ] {
            assert_eq!(model_of(body, false), Ok(None), "{body:?}");
        }
        // Not an object.
        assert_eq!(model_of(br#"["model","a"]"#, false), Ok(None));
    }

    /// Counts the bytes allocated by this thread while it is set.
    mod counting {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        thread_local! {
            pub static COUNTING: Cell<bool> = const { Cell::new(false) };
            pub static ALLOCATED: Cell<usize> = const { Cell::new(0) };
        }

        pub struct Counting;

        unsafe impl GlobalAlloc for Counting {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                // `try_with`: a thread being torn down has no locals left.
                let _ = COUNTING.try_with(|on| {
                    if on.get() {
                        let _ = ALLOCATED.try_with(|n| n.set(n.get() + layout.size()));
                    }
                });
                unsafe { System.alloc(layout) }
            }
            unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
                unsafe { System.dealloc(ptr, layout) }
            }
        }
    }

    #[global_allocator]
    static ALLOC: counting::Counting = counting::Counting;

    /// Bytes `f` allocates on this thread.
    fn allocated_by<T>(f: impl FnOnce() -> T) -> (T, usize) {
        counting::ALLOCATED.with(|n| n.set(0));
        counting::COUNTING.with(|on| on.set(true));
        let out = f();
        counting::COUNTING.with(|on| on.set(false));
        (out, counting::ALLOCATED.with(|n| n.get()))
    }

    /// Values that name no model are skipped, not kept: a body full of
    /// numbers where `/api/show` looks for a name costs next to nothing
    /// (kept as a JSON tree, 32 bytes a number: 25 times the body).
    #[test]
    fn reading_the_model_keeps_nothing_it_does_not_use() {
        let mut body = String::from(r#"{"model":"m","name":["#);
        body.push_str(&"0,".repeat(500_000));
        body.push_str(r#"0],"options":{"x":[1,2,3]}}"#);
        for or_name in [true, false] {
            let (model, bytes) = allocated_by(|| model_of(body.as_bytes(), or_name));
            assert_eq!(model.unwrap().as_deref(), Some("m"));
            assert!(
                bytes < 1024,
                "{bytes} bytes allocated reading {}",
                body.len()
            );
        }
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, &forwarded_for_entry("10.0.0.1:5".parse().unwrap()));
        append_forwarded_for(
            &mut h,
            &forwarded_for_entry("[2001:db8::1]:5".parse().unwrap()),
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 2001:db8::1");
        let mapped = forwarded_for_entry("[::ffff:192.0.2.7]:5".parse().unwrap());
        assert_eq!(
            mapped, "192.0.2.7",
            "an IPv4 caller of a dual-stack listener"
        );
    }

    #[test]
    fn a_caller_cannot_forge_what_frps_says_about_it() {
        let caller = Caller::new("203.0.113.7:40000".parse().unwrap(), false, None);
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("x-real-ip", "10.9.9.9"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=10.9.9.9;proto=https"),
            ("x-forwarded-host", "admin.internal"),
            ("x-forwarded-for", "10.9.9.9"),
            ("accept", "*/*"),
        ] {
            h.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        set_forwarding(&mut h, &caller);
        assert_eq!(h["x-real-ip"], "203.0.113.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert!(!h.contains_key("forwarded"), "{h:?}");
        assert!(!h.contains_key("x-forwarded-host"), "{h:?}");
        // The caller's chain is kept; frps's entry is the last one.
        assert_eq!(h["x-forwarded-for"], "10.9.9.9, 203.0.113.7");
        assert_eq!(h["accept"], "*/*");
        assert_eq!(h.len(), 4);

        let mut h = HeaderMap::new();
        set_forwarding(
            &mut h,
            &Caller::new("[2001:db8::1]:5".parse().unwrap(), true, None),
        );
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-real-ip"], "2001:db8::1");
        assert_eq!(h["x-forwarded-for"], "2001:db8::1");
    }

    #[test]
    fn targets_reach_the_box_in_origin_form() {
        for (target, sent) in [
            ("/v1/chat?x=1", "/v1/chat?x=1"),
            ("http://admin.internal/secret?x=1", "/secret?x=1"),
            ("https://h:8443/a/b", "/a/b"),
            ("*", "*"),
        ] {
            let uri: http::Uri = target.parse().unwrap();
            assert_eq!(origin_form(&uri), sent, "{target}");
        }
        let authority: http::Uri = "h:443".parse().unwrap();
        assert_eq!(origin_form(&authority), "/");
    }

    #[test]
    fn echoed_input_is_shortened() {
        assert_eq!(shorten("abc", 3), "abc");
        assert_eq!(shorten("abcd", 3), "abc…");
        assert_eq!(shorten("ééé", 2), "éé…");
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
