//! Management API (`--api-port`, loopback by default). Every `/api` response
//! uses the seed's envelope `{"success", "data", "message", "timestamp"}`,
//! errors included. With `--admin-token`, every route but `/api/health` (and
//! the static dashboard page, which holds no data) requires
//! `Authorization: Bearer <admin token>`. The OpenAPI document at
//! `/api/openapi.json` is generated from the handlers' types.

mod accounts;
mod clients;
mod page;
mod server;
pub mod types;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State as AxState};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde::Serialize;
use utoipa::OpenApi;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::constant_time_eq;
use crate::listeners::head_clock::{FirstRequest, HeadClock};
use crate::state::State;

/// Wrong admin tokens an address block (one IPv4 address, one IPv6 /64)
/// may present per minute, refilled evenly; past that, every request of
/// that block that carries a token gets 429 until the budget is back.
pub const ADMIN_FAILURES_PER_MINUTE: u32 = 10;

/// Wrong admin tokens presented, counted per address block
/// ([`ADMIN_FAILURES_PER_MINUTE`]). A wrong token repeated (a dashboard tab
/// or a `--monitor --watch` still holding an old token) counts once: the
/// budget is for guesses, and an operator behind the same address (a TLS
/// proxy, an SSH tunnel) must not be locked out by a stale tool.
#[derive(Debug)]
pub struct WrongTokens {
    budget: crate::limits::FailureBudget,
    /// The latest distinct wrong tokens (digests), each with who it was
    /// counted against.
    recent: std::sync::Mutex<std::collections::VecDeque<(std::net::IpAddr, [u8; 32])>>,
}

/// Distinct wrong tokens remembered as already counted. Per caller: a
/// token counted against one address is counted again from another (the
/// guesses of others neither pass as repeats nor, being many, push an
/// operator's stale token out so quickly that it is counted again every
/// round: 64 for all callers took about 640 guesses a minute).
const RECENT_WRONG_TOKENS: usize = 1024;

impl Default for WrongTokens {
    fn default() -> Self {
        Self {
            budget: crate::limits::FailureBudget::new(ADMIN_FAILURES_PER_MINUTE),
            recent: Default::default(),
        }
    }
}

/// Who a wrong token is counted against: its address (IPv6 by /64), but
/// one caller for every loopback address. Any process on the host may
/// connect from any of 127.0.0.0/8 without setting anything up, so counted
/// apart they gave a local user (against whom the short tokens a loopback
/// bind allows are the only lock) 16 million budgets. Loopback requests
/// naming another host (`foreign`: a web page in the operator's browser
/// that rebound its name to 127.0.0.1, or a local proxy passing the
/// public name on) are a second caller: such a page spending its budget
/// does not lock out the operator's own tools, which name this machine.
fn caller(ip: std::net::IpAddr, foreign: bool) -> std::net::IpAddr {
    if ip.to_canonical().is_loopback() {
        if foreign {
            std::net::Ipv4Addr::new(127, 0, 0, 2).into()
        } else {
            std::net::Ipv4Addr::LOCALHOST.into()
        }
    } else {
        ip
    }
}

impl WrongTokens {
    /// `Err(wait)` while `ip`'s block has no guesses left (`foreign`: of a
    /// request naming another host than this machine).
    pub fn check(&self, ip: std::net::IpAddr, foreign: bool) -> Result<(), Duration> {
        self.budget
            .check(caller(ip, foreign), tokio::time::Instant::now())
    }

    /// Counts the wrong token whose SHA-256 is `digest` from `ip` (of a
    /// request naming another host when `foreign`), unless it was counted
    /// lately.
    pub fn fail(&self, ip: std::net::IpAddr, foreign: bool, digest: [u8; 32]) {
        let who = crate::limits::address_block(caller(ip, foreign));
        {
            let mut recent = self.recent.lock().expect("wrong tokens lock");
            if recent.contains(&(who, digest)) {
                return;
            }
            if recent.len() == RECENT_WRONG_TOKENS {
                recent.pop_front();
            }
            recent.push_back((who, digest));
        }
        self.budget
            .fail(caller(ip, foreign), tokio::time::Instant::now());
    }
}

/// Longest a management API request may take, body included.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(60);

/// Largest request head the management API reads (hyper's smallest read
/// buffer; the API's requests carry a few short headers).
const MAX_HEAD: usize = 16 * 1024;

/// Largest request body the management API reads (413 above). No route
/// takes a body: this only spares a client that sends a stray small one,
/// while a caller without the admin token (the body is read before the
/// token is checked) can make frps hold little per connection.
const MAX_BODY: usize = 1024;

/// Serves the management API on one accepted connection (HTTP/1.1; the
/// accept loop caps connections in all and per address): each request head
/// is due within `--header-timeout` (an idle keep-alive connection is closed
/// after it) and may be at most 16 KiB; its body, at most 1 KiB, is read
/// before the handler runs and is due within `--header-timeout` of the
/// head (408 after), and the request must be answered within
/// [`REQUEST_DEADLINE`] (503 for an answer frps did not have ready); a
/// caller must take at least 16 KiB of answers within `--header-timeout`
/// of a write having to wait ([`HeadClock`]). Once the public port has drained at
/// shutdown, the connection finishes the request it is on, then closes.
pub async fn serve_conn(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
    app: Router,
) {
    let _ = stream.set_nodelay(true);
    let header_timeout = state.config.header_timeout;
    // hyper runs no clock while an answer waits for the caller to take it
    // (pipelined requests never read would hold the connection until the
    // hard stop): a write that waits fails once the caller took less than
    // 16 KiB in --header-timeout, as on the public port.
    let first = Arc::new(FirstRequest::default());
    let stream = HeadClock::new(
        stream,
        first.clone(),
        tokio::time::Instant::now(),
        header_timeout,
        header_timeout,
    );
    let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        first.arrived_with(req.headers());
        req.extensions_mut().insert(ConnectInfo(peer));
        let app = app.clone();
        async move {
            let started = tokio::time::Instant::now();
            let deadline = started + REQUEST_DEADLINE;
            // No route takes a body: a stray one is due as soon as a head
            // is, so a caller without the token cannot hold a connection
            // for the whole deadline by dripping one.
            let body_due = started + header_timeout.min(REQUEST_DEADLINE);
            let (parts, body) = req.into_parts();
            let too_large = || {
                let message = format!("request bodies are limited to {MAX_BODY} bytes");
                Ok(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, message).into_response())
            };
            // An announced length over the limit is refused before reading.
            if hyper::body::Body::size_hint(&body).lower() > MAX_BODY as u64 {
                return too_large();
            }
            let read =
                http_body_util::BodyExt::collect(http_body_util::Limited::new(body, MAX_BODY));
            let body = match tokio::time::timeout_at(body_due, read).await {
                Ok(Ok(body)) => body.to_bytes(),
                Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
                Ok(Err(e)) => {
                    let message = format!("the request body could not be read: {e}");
                    return Ok(ApiError::new(StatusCode::BAD_REQUEST, message).into_response());
                }
                Err(_) => {
                    let message = format!(
                        "the request body was not complete within {:?}",
                        body_due - started
                    );
                    return Ok(ApiError::new(StatusCode::REQUEST_TIMEOUT, message).into_response());
                }
            };
            let req = Request::from_parts(parts, axum::body::Body::from(body));
            let answer = tower::ServiceExt::oneshot(app, req);
            match tokio::time::timeout_at(deadline, answer).await {
                Ok(resp) => resp,
                Err(_) => Ok(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("no answer within {REQUEST_DEADLINE:?}"),
                )
                .into_response()),
            }
        }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(state.config.header_timeout)
        .max_buf_size(MAX_HEAD);
    let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        _ = state.drained.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, "management API connection ended: {e}");
    }
}
/// Shared handler state.
pub type ApiState = AxState<Arc<State>>;

/// The seed's response envelope.
#[derive(Debug, Serialize, ToSchema)]
pub struct Envelope<T> {
    /// Whether the call succeeded.
    pub success: bool,
    /// The payload (null on errors).
    pub data: Option<T>,
    /// What happened, in English.
    pub message: String,
    /// RFC 3339 time of the response.
    pub timestamp: String,
}

/// The envelope's time: now, in the prototype's form (RFC 3339, UTC,
/// microseconds, `Z`: `2025-06-01T17:55:48.826362Z`).
fn timestamp() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// A successful envelope.
pub fn ok<T: Serialize>(data: T, message: &str) -> Json<Envelope<T>> {
    Json(Envelope {
        success: true,
        data: Some(data),
        message: message.to_owned(),
        timestamp: timestamp(),
    })
}

/// An error rendered as the envelope with `success: false`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// An error with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// 404 for an unknown client.
    pub fn no_client(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            format!("client '{id}' is not online"),
        )
    }

    /// 503 when the database failed; the cause is logged, not shown.
    pub fn database(e: crate::store::StoreError) -> Self {
        tracing::warn!("management API: database error: {e}");
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
    }

    /// `query`'s answer within the database deadline ([`DB_TIMEOUT`], as
    /// for key lookups and logins), else 503: the pool's acquire timeout
    /// covers only getting a connection, and a query waiting on a lock or
    /// a dead path would hold one of the shared connections as long as the
    /// request deadline.
    ///
    /// [`DB_TIMEOUT`]: crate::auth::keys::DB_TIMEOUT
    pub async fn within_deadline<T>(
        query: impl std::future::Future<Output = Result<T, crate::store::StoreError>>,
    ) -> Result<T, ApiError> {
        use crate::auth::keys::LookupError;
        match crate::auth::keys::within_deadline(query).await {
            Ok(answer) => Ok(answer),
            Err(LookupError::Failed(e)) => Err(ApiError::database(e)),
            Err(e @ LookupError::TimedOut) => {
                tracing::warn!("management API: database: {e}");
                Err(Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("database unavailable: {e}"),
                ))
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Envelope::<()> {
            success: false,
            data: None,
            message: self.message,
            timestamp: timestamp(),
        };
        (self.status, Json(body)).into_response()
    }
}

/// Result of a handler.
pub type ApiResult<T> = Result<Json<Envelope<T>>, ApiError>;

#[derive(OpenApi)]
#[openapi(info(
    title = "frpx management API",
    description = "Fleet, statistics and accounts of one frps. Every response is wrapped in {success, data, message, timestamp}."
))]
struct ApiDoc;

/// Every documented route with its OpenAPI document, as this frps answers:
/// `tokened` when it has an admin token.
pub fn documented(tokened: bool) -> (Router<Arc<State>>, utoipa::openapi::OpenApi) {
    let (routes, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(server::health))
        .routes(routes!(server::stats))
        .routes(routes!(server::connections))
        .routes(routes!(server::pending))
        .routes(routes!(server::config))
        .routes(routes!(server::ports_handler))
        .routes(routes!(clients::list))
        .routes(routes!(clients::get, clients::disconnect))
        .routes(routes!(clients::status))
        .routes(routes!(clients::heartbeat))
        .routes(routes!(clients::monitoring))
        .routes(routes!(clients::monitoring_one))
        .routes(routes!(clients::models))
        .routes(routes!(accounts::users))
        .routes(routes!(accounts::active_tokens))
        .split_for_parts();
    (routes, add_shared_answers(doc, tokened))
}

/// Adds what every route shares to `doc`: the answers the connection guard
/// ([`serve_conn`]) gives before or instead of any handler, and those of
/// the token check ([`require_admin`]) as configured. With an admin token
/// (`tokened`), every route but the public ones requires it as a bearer
/// token (401, and 429 after too many wrong ones); without one, no route
/// does, and a request whose Host or Origin is not this machine gets 403.
/// An answer a handler documents itself (a 503 for the database, a 400 for
/// its query) is kept as it is.
fn add_shared_answers(
    mut doc: utoipa::openapi::OpenApi,
    tokened: bool,
) -> utoipa::openapi::OpenApi {
    use utoipa::openapi::security::{
        HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
    };
    use utoipa::openapi::{
        ContentBuilder, HeaderBuilder, Object, Ref, RefOr, Response as Answer, ResponseBuilder,
        Type,
    };
    // The handlers' own error answers register it under this name.
    let envelope = ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("Envelope_String")))
        .build();
    let answer = |why: &str| -> RefOr<Answer> {
        ResponseBuilder::new()
            .description(why)
            .content("application/json", envelope.clone())
            .build()
            .into()
    };
    let body_limit = format!("Request body over {MAX_BODY} bytes");
    let head_limit = format!("Request head over {MAX_HEAD} bytes (no body)");
    let timeout = "The request body was not complete within --header-timeout".to_owned();
    let no_answer =
        format!("No answer within {REQUEST_DEADLINE:?}, or the database is unavailable");
    let mut everywhere: Vec<(&str, RefOr<Answer>)> = vec![
        (
            "400",
            answer(
                "The request body could not be read (a head that is not HTTP gets a bare 400 without this envelope)",
            ),
        ),
        ("408", answer(&timeout)),
        ("413", answer(&body_limit)),
        (
            "431",
            ResponseBuilder::new()
                .description(&head_limit)
                .build()
                .into(),
        ),
        ("503", answer(&no_answer)),
    ];
    if !tokened {
        everywhere.push((
            "403",
            answer(
                "The request's Host or Origin is not this machine, or a proxy relayed it: without an admin token only this machine's own tools are answered",
            ),
        ));
    }
    let retry_after = HeaderBuilder::new()
        .schema(Object::with_type(Type::Integer))
        .description(Some("Seconds until a token may be tried again"))
        .build();
    let www_authenticate = HeaderBuilder::new()
        .schema(Object::with_type(Type::String))
        .description(Some(
            "`Bearer` when no token was sent; `Bearer error=\"invalid_token\"` for a wrong one",
        ))
        .build();
    let guarded: Vec<(&str, RefOr<Answer>)> = vec![
        (
            "401",
            ResponseBuilder::new()
                .description("No `Authorization: Bearer <admin token>`, or a wrong one")
                .content("application/json", envelope.clone())
                .header("WWW-Authenticate", www_authenticate)
                .build()
                .into(),
        ),
        (
            "429",
            ResponseBuilder::new()
                .description(format!(
                    "Over {ADMIN_FAILURES_PER_MINUTE} wrong admin tokens a minute from this address: every request with a token is refused until Retry-After"
                ))
                .content("application/json", envelope.clone())
                .header("Retry-After", retry_after)
                .build()
                .into(),
        ),
    ];
    let scheme = "admin_token";
    if tokened {
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                scheme,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some("The admin token (--admin-token)"))
                        .build(),
                ),
            );
        doc.security = Some(vec![SecurityRequirement::new(scheme, Vec::<String>::new())]);
    }
    for (path, item) in doc.paths.paths.iter_mut() {
        let guard = tokened && !PUBLIC_PATHS.contains(&path.as_str());
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ]
        .into_iter()
        .flatten()
        {
            let shared = everywhere
                .iter()
                .chain(if guard { &guarded[..] } else { &[][..] });
            for (status, answer) in shared {
                op.responses
                    .responses
                    .entry(status.to_string())
                    .or_insert_with(|| answer.clone());
            }
            if tokened && !guard {
                // A public route: no token needed.
                op.security = Some(vec![SecurityRequirement::default()]);
            }
        }
    }
    doc
}

/// The API's routes.
pub fn router(state: Arc<State>) -> Router {
    let (api, openapi) = documented(state.config.admin_token().is_some());
    // Kept as its JSON text: the document's structure took three times the
    // memory, for the life of the process.
    let doc =
        bytes::Bytes::from(serde_json::to_vec(&openapi).expect("the API document serializes"));
    drop(openapi);
    api.route(
        "/api/openapi.json",
        get(move || {
            let doc = doc.clone();
            async move { ([(header::CONTENT_TYPE, "application/json")], doc) }
        }),
    )
    .route("/metrics", get(metrics))
    .route("/", get(dashboard))
    .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
    .layer(middleware::from_fn_with_state(state.clone(), require_admin))
    .layer(middleware::map_response(enveloped))
    .layer(middleware::map_response(kept_private))
    .with_state(state)
}

/// What the dashboard page may do: its own inline script and style, calls
/// to this origin only, and no framing (clickjacking) or form posting.
const DASHBOARD_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// Every answer is kept out of caches (the fleet's names and addresses,
/// account emails: a browser's disk cache kept them) and read as the type
/// it says; the dashboard page is not framed and calls only this origin.
async fn kept_private(mut resp: Response) -> Response {
    let headers = resp.headers_mut();
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    let html = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/html"));
    if html {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(DASHBOARD_POLICY),
        );
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
    }
    resp
}

/// Longest error text of axum's own (an extractor's rejection) that
/// [`enveloped`] reads; theirs are a line or two.
const REJECTION_TEXT: usize = 4096;

/// Error answers axum gives itself, not in the envelope (an extractor's
/// rejection: a path parameter that is not UTF-8, a body that is not the
/// JSON asked for; a known path with a method it has no route for) are
/// put in it, with their text as the message (or the status's name): every
/// `/api` answer has one shape. Their headers (`Allow`) are kept.
async fn enveloped(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = match http_body_util::Limited::new(body, REJECTION_TEXT)
        .collect()
        .await
    {
        Ok(collected) => String::from_utf8_lossy(&collected.to_bytes())
            .trim()
            .to_owned(),
        Err(_) => String::new(),
    };
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase()
    } else {
        text
    };
    let fresh = ApiError::new(status, message).into_response();
    let (fresh_parts, body) = fresh.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    for (name, value) in &fresh_parts.headers {
        parts.headers.insert(name, value.clone());
    }
    Response::from_parts(parts, body)
}

/// Paths reachable without the admin token.
const PUBLIC_PATHS: [&str; 2] = ["/api/health", "/"];

/// Fewest characters of an admin token that no rate of guessing can find
/// (32 random hex digits are 128 bits). frps exposes its API beyond
/// loopback only with such a token; with one, the right token is let
/// through even from an address out of its budget for wrong ones (behind a
/// reverse proxy every caller has the proxy's address, and anyone reaching
/// it could otherwise lock the operator out).
pub const STRONG_ADMIN_TOKEN: usize = crate::auth::STRONG_SECRET;

async fn require_admin(AxState(state): ApiState, req: Request, next: Next) -> Response {
    let Some(expected) = state.config.admin_token() else {
        // No token: only a loopback address can reach the API, but a web
        // page in the operator's browser could still, by rebinding its own
        // name to 127.0.0.1 (then its requests name that name as their
        // host) or by posting across origins. Both are refused.
        if let Some(why) = foreign_request(&req) {
            return ApiError::new(StatusCode::FORBIDDEN, why).into_response();
        }
        return next.run(req).await;
    };
    if PUBLIC_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    // Served connections always carry the peer; a router called directly
    // (in tests) has none and is not throttled.
    let from = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let foreign = foreign_request(&req).is_some();
    let presented = crate::auth::bearer(req.headers());
    // Compared as SHA-256 digests: the time taken tells neither where the
    // tokens differ nor how long the right one is.
    let digest = presented.map(crate::auth::secret::hash);
    let right = digest
        .as_ref()
        .is_some_and(|d| constant_time_eq(d, &crate::auth::secret::hash(expected)));
    // A short token stays out of reach while the address is out of budget
    // (or a guess that would be right would tell); a strong one cannot be
    // guessed, and the budget only spares frps the work.
    let strong = expected.chars().count() >= STRONG_ADMIN_TOKEN;
    if presented.is_some()
        && !(right && strong)
        && let Some(ip) = from
        && let Err(wait) = state.admin_failures.check(ip, foreign)
    {
        let mut resp = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too many wrong admin tokens from this address: wait before trying again",
        )
        .into_response();
        // Rounded up: a client waiting as told is let in.
        let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return resp;
    }
    match digest {
        Some(_) if right => next.run(req).await,
        Some(d) => {
            if let Some(ip) = from {
                state.admin_failures.fail(ip, foreign, d);
            }
            let mut resp =
                ApiError::new(StatusCode::UNAUTHORIZED, "invalid admin token").into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
            resp
        }
        None => {
            let mut resp = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "admin token required: send `Authorization: Bearer <admin token>`",
            )
            .into_response();
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            resp
        }
    }
}

/// Headers a proxy adds about the caller it relays (nginx, Caddy, Traefik,
/// HAProxy, Apache, Envoy, as configured for it or by default), besides any
/// `X-Forwarded-*` ([`relayed`]).
const RELAYED: [&str; 4] = ["forwarded", "x-real-ip", "via", "x-envoy-external-address"];

/// Whether `req` carries a header a proxy adds about the caller it relays:
/// one of [`RELAYED`] or any `X-Forwarded-*` (`-For`, `-Host`, `-Proto`,
/// and the `-Port`, `-Server` or `-Ssl` some proxies add alone).
fn relayed(req: &Request) -> bool {
    RELAYED.iter().any(|name| req.headers().contains_key(*name))
        || req
            .headers()
            .keys()
            .any(|name| name.as_str().starts_with("x-forwarded-"))
}

/// Why a request to a token-less API did not come from this machine's own
/// tools: a `Host` that is not a loopback name or address (DNS rebinding),
/// or an `Origin` of another host (a page posting across origins).
fn foreign_request(req: &Request) -> Option<&'static str> {
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    // HTTP/1.1 requires Host; HTTP/2 carries it in the URI, as does an
    // absolute-form target (`GET http://host/api/…`), whose host wins over
    // the header's (RFC 9112 §3.2.2): both must be this machine.
    // A Host that is no text, or two of them, names no loopback host.
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (None, _) => None,
        (Some(host), None) => Some(host.to_str().unwrap_or("")),
        (Some(_), Some(_)) => Some(""),
    };
    let authority = req.uri().authority().map(|a| a.host());
    let named = host.is_some() || authority.is_some();
    if !named || !host.is_none_or(is_loopback_host) || !authority.is_none_or(is_loopback_host) {
        return Some(
            "without --admin-token the API answers only requests for localhost or a loopback address (Host header, and the target's host if it names one)",
        );
    }
    // A reverse proxy on this machine reaches the API from loopback, and
    // many rewrite Host to the address they pass to (nginx's default): what
    // gives it away is what it adds about the caller it relays.
    if relayed(req) {
        return Some(
            "without --admin-token the API answers no requests relayed by a proxy (Forwarded, X-Forwarded-*, X-Real-IP or Via header): set --admin-token before putting it behind one",
        );
    }
    // nginx's `proxy_pass` adds none of those by default, but speaks
    // HTTP/1.0 to the API (this machine's tools speak HTTP/1.1).
    if req.version() < http::Version::HTTP_11 {
        return Some(
            "without --admin-token the API answers no HTTP/1.0 requests, which a proxy relaying them sends (nginx's proxy_pass by default): set --admin-token before putting it behind one, or use HTTP/1.1",
        );
    }
    if let Some(origin) = header(header::ORIGIN) {
        let host = origin.split_once("://").map(|(_, rest)| rest);
        if !host.is_some_and(is_loopback_host) {
            return Some(
                "without --admin-token the API answers no requests from web pages of other hosts (Origin header)",
            );
        }
    }
    None
}

/// Whether `host` (`name[:port]`, `[v6][:port]`) is `localhost`, a name
/// under it, or a loopback address.
fn is_loopback_host(host: &str) -> bool {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((v6, port)) if port.is_empty() || port.starts_with(':') => v6,
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

async fn metrics(AxState(state): ApiState) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(&state),
    )
        .into_response()
}

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_loopback_address_is_one_caller_for_wrong_tokens() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        for local in ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.5"] {
            assert_eq!(caller(ip(local), false), ip("127.0.0.1"), "{local}");
            // Naming another host: one other caller.
            assert_eq!(caller(ip(local), true), ip("127.0.0.2"), "{local}");
        }
        for remote in ["10.0.0.1", "2001:db8::1", "::ffff:192.0.2.1"] {
            for foreign in [false, true] {
                assert_eq!(caller(ip(remote), foreign), ip(remote), "{remote}");
            }
        }
    }

    /// Every operation of `doc` as (path, method, operation).
    fn operations(doc: &serde_json::Value) -> Vec<(String, String, serde_json::Value)> {
        let mut all = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                all.push((path.clone(), method.clone(), op.clone()));
            }
        }
        assert!(all.len() >= 15, "{}", all.len());
        all
    }

    #[test]
    fn with_a_token_every_route_but_health_documents_it_and_its_refusals() {
        let doc = serde_json::to_value(documented(true).1).unwrap();
        assert_eq!(
            doc["components"]["securitySchemes"]["admin_token"]["scheme"],
            "bearer"
        );
        assert_eq!(doc["security"][0]["admin_token"], serde_json::json!([]));
        for (path, method, op) in operations(&doc) {
            let answers = op["responses"].as_object().unwrap();
            for status in ["400", "408", "413", "431", "503"] {
                assert!(answers.contains_key(status), "{method} {path}: {status}");
                assert!(
                    !answers[status]["description"].as_str().unwrap().is_empty(),
                    "{method} {path}: {status}"
                );
            }
            assert!(!answers.contains_key("403"), "only without a token");
            if path == "/api/health" {
                assert!(!answers.contains_key("401"), "health needs no token");
                assert!(!answers.contains_key("429"));
                assert_eq!(op["security"], serde_json::json!([{}]));
            } else {
                assert!(
                    answers["401"]["headers"]["WWW-Authenticate"].is_object(),
                    "{method} {path}"
                );
                assert!(
                    answers["429"]["headers"]["Retry-After"].is_object(),
                    "{method} {path}"
                );
                assert!(op.get("security").is_none(), "the document's applies");
            }
        }
        // A handler's own answer stays its own.
        assert_eq!(
            doc["paths"]["/api/users"]["get"]["responses"]["503"]["description"],
            "The database is unavailable"
        );
        assert_eq!(
            doc["paths"]["/api/clients/{id}"]["get"]["responses"]["404"]["content"]["application/json"]
                ["schema"],
            doc["paths"]["/api/clients/{id}"]["get"]["responses"]["413"]["content"]["application/json"]
                ["schema"],
            "one envelope for every error"
        );
        assert!(doc["components"]["schemas"]["Envelope_String"].is_object());
    }

    #[test]
    fn without_a_token_no_route_asks_for_one_and_foreign_pages_get_403() {
        let doc = serde_json::to_value(documented(false).1).unwrap();
        assert!(doc.get("security").is_none());
        assert!(
            doc["components"]
                .get("securitySchemes")
                .is_none_or(|s| s.get("admin_token").is_none())
        );
        for (path, method, op) in operations(&doc) {
            let answers = op["responses"].as_object().unwrap();
            for status in ["400", "403", "408", "413", "431", "503"] {
                assert!(answers.contains_key(status), "{method} {path}: {status}");
            }
            assert!(!answers.contains_key("401"), "{method} {path}");
            assert!(!answers.contains_key("429"), "{method} {path}");
            assert!(op.get("security").is_none(), "{method} {path}");
        }
    }

    #[test]
    fn a_token_less_api_answers_requests_naming_this_machine_only() {
        let request = |target: &str, host: Option<&str>| {
            let mut req = Request::builder().uri(target);
            if let Some(host) = host {
                req = req.header(header::HOST, host);
            }
            foreign_request(&req.body(axum::body::Body::empty()).unwrap())
        };
        assert_eq!(request("/api/clients", Some("localhost:18081")), None);
        assert_eq!(request("http://127.0.0.1:18081/api/clients", None), None);
        assert_eq!(request("http://[::1]/api/clients", Some("localhost")), None);
        assert!(request("/api/clients", Some("evil.example")).is_some());
        assert!(request("/api/clients", None).is_some());
        // An absolute-form target's host wins over the header's: both must
        // be loopback.
        assert!(request("http://evil.example/api/clients", Some("localhost")).is_some());
        assert!(request("http://localhost/api/clients", Some("evil.example")).is_some());
        // A Host that is no text names nothing, not "no Host".
        let mut req = Request::builder()
            .uri("http://localhost/api/clients")
            .body(axum::body::Body::empty())
            .unwrap();
        req.headers_mut().insert(
            header::HOST,
            HeaderValue::from_bytes(b"localhost\xff").unwrap(),
        );
        assert!(foreign_request(&req).is_some());
        // Nor do two.
        req.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("localhost"));
        req.headers_mut()
            .append(header::HOST, HeaderValue::from_static("localhost"));
        assert!(foreign_request(&req).is_some());
        // A request a proxy on this machine relays names a loopback host
        // when the proxy rewrote Host (nginx's default), and is refused by
        // what the proxy says of its caller.
        for (name, value) in [
            ("x-forwarded-for", "203.0.113.9"),
            ("X-Real-IP", "203.0.113.9"),
            ("forwarded", "for=203.0.113.9"),
            ("via", "1.1 caddy"),
            ("x-forwarded-proto", "https"),
            ("X-Forwarded-Port", "443"),
            ("x-envoy-external-address", "203.0.113.9"),
        ] {
            let mut req = Request::builder()
                .uri("/api/clients")
                .header(header::HOST, "127.0.0.1:18081")
                .header(name, value)
                .body(axum::body::Body::empty())
                .unwrap();
            let why = foreign_request(&req).unwrap_or_default();
            assert!(why.contains("relayed by a proxy"), "{name}: {why}");
            req.headers_mut().remove(name);
            assert_eq!(foreign_request(&req), None);
        }
        // nginx's proxy_pass adds none of them by default, and speaks
        // HTTP/1.0.
        let mut req = Request::builder()
            .uri("/api/clients")
            .header(header::HOST, "127.0.0.1:18081")
            .version(http::Version::HTTP_10)
            .body(axum::body::Body::empty())
            .unwrap();
        let why = foreign_request(&req).unwrap_or_default();
        assert!(why.contains("HTTP/1.0"), "{why}");
        *req.version_mut() = http::Version::HTTP_11;
        assert_eq!(foreign_request(&req), None);
    }

    /// A wrong token repeated counts once per caller: another address
    /// presenting it is counted, and others' guesses do not push an
    /// operator's stale token out of the repeats.
    #[tokio::test(start_paused = true)]
    async fn a_wrong_token_repeated_counts_once_per_caller() {
        let wrong = WrongTokens::default();
        let here: std::net::IpAddr = "203.0.113.1".parse().unwrap();
        let there: std::net::IpAddr = "203.0.113.2".parse().unwrap();
        let stale = [7u8; 32];
        // A stale tool presents its token every round; between rounds,
        // others guess (more than 64, the old shared memory of repeats).
        for round in 0..ADMIN_FAILURES_PER_MINUTE * 2 {
            wrong.fail(here, false, stale);
            for i in 0..200u32 {
                let mut guess = [0u8; 32];
                guess[..4].copy_from_slice(&(round * 1000 + i).to_be_bytes());
                let other = std::net::IpAddr::from([198, 51, 100, (i % 250) as u8]);
                wrong.fail(other, false, guess);
            }
        }
        assert!(wrong.check(here, false).is_ok(), "counted once");
        // The same token from another address is that address's guess.
        for i in 1..ADMIN_FAILURES_PER_MINUTE {
            let mut guess = stale;
            guess[0] = 100 + i as u8;
            wrong.fail(there, false, guess);
        }
        assert!(wrong.check(there, false).is_ok(), "one guess left");
        wrong.fail(there, false, stale);
        assert!(wrong.check(there, false).is_err(), "counted against it");
    }

    #[test]
    fn loopback_hosts() {
        for ok in [
            "localhost",
            "LOCALHOST:18081",
            "localhost.",
            "dash.localhost:80",
            "127.0.0.1",
            "127.0.0.1:18081",
            "127.3.4.5:1",
            "[::1]",
            "[::1]:18081",
            "[::ffff:127.0.0.1]:9",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:18081",
            "localhost.evil.example",
            "10.0.0.1:18081",
            "[::2]:18081",
            "[::1",
            "[::1]x",
            "127.0.0.1.nip.io",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }
}
