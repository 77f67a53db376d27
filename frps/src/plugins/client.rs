//! One plugin call: `POST http://ADDR/PATH?version=0.1.0&op=OP` over an
//! HTTP/1.1 connection kept for the plugin's next calls, and the reading of
//! the plugin's answer.

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, USER_AGENT};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Deserializer};
use tokio::net::TcpStream;

/// Version of frp's plugin protocol, sent in the query and the body.
pub const API_VERSION: &str = "0.1.0";

/// Largest answer read from a plugin, in bytes.
pub const MAX_ANSWER: usize = 64 * 1024;

/// Why a call produced no usable answer. None of these carry the plugin's
/// address, so they may be shown to clients.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No TCP connection to the plugin.
    #[error("unreachable: {0}")]
    Connect(std::io::Error),
    /// No complete answer within the plugin timeout.
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The HTTP exchange failed.
    #[error("HTTP exchange failed: {0}")]
    Http(String),
    /// The plugin answered with a status other than 200.
    #[error("answered HTTP {0}")]
    Status(StatusCode),
    /// The answer was longer than [`MAX_ANSWER`].
    #[error("answer longer than {MAX_ANSWER} bytes")]
    TooLarge,
    /// The answer is not one the protocol allows.
    #[error("invalid answer: {0}")]
    Invalid(String),
    /// A redirect frps does not follow (see [`MAX_REDIRECTS`]).
    #[error(
        "answered HTTP {0}, to {1}, which frps does not follow (only 307 and 308 to the plugin's own address, at most {MAX_REDIRECTS} in a row)"
    )]
    Redirect(StatusCode, String),
}

/// Most redirects (307 or 308, to the plugin's own address) one call
/// follows. frp's Go client follows them, sending the call again (a Flask
/// plugin at `/handler/` answers `path = /handler` with a 308); frps keeps
/// to the address configured, so a plugin cannot send it elsewhere.
pub const MAX_REDIRECTS: usize = 5;

/// What a plugin decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Refuse the operation for this reason.
    Reject(String),
    /// Proceed with the content as sent.
    Unchanged,
    /// Proceed with this content instead.
    Replaced(serde_json::Value),
}

/// Most idle connections kept per plugin address.
pub const MAX_IDLE: usize = 32;

/// Most per-request calls (`NewUserConn`, `NewWorkConn`) under way at once
/// to one plugin address; more wait for one to end (within their own
/// timeout). As many as are kept idle: a burst (a thousand requests at
/// once) opened a connection per call and frps closed all but [`MAX_IDLE`]
/// after it, each closed one a socket in TIME_WAIT on frps's side (the
/// port exhaustion the pool is there to prevent), and the plugin got the
/// burst at once. The control plane's calls (a heartbeat's `Ping`, a
/// login) are not held back by them.
pub const MAX_CALLS: usize = MAX_IDLE;

/// Most control-plane calls (`Login`, `NewProxy`, `Ping`, `CloseProxy`)
/// under way at once to one plugin address, apart from the per-request
/// ones' [`MAX_CALLS`]. A fleet reconnecting at once (frps restarted, a
/// network blip) made a `CloseProxy`, a `Login` and a `NewProxy` per box,
/// each on a connection of its own, all but [`MAX_IDLE`] then closed: a
/// socket in TIME_WAIT each, and the plugin got the whole fleet at once.
/// Many more than the per-request turns: a login waiting behind thousands
/// of others fails at its timeout and its box tries again later.
pub const MAX_CONTROL_CALLS: usize = 256;

/// How long an idle connection to a plugin is kept for the next call: under
/// the idle timeouts of common HTTP servers (gunicorn 2 s, Node and uvicorn
/// 5 s, nginx 75 s, Go none), so a call rarely races the plugin closing the
/// connection it goes on; the call rates that exhaust ports reuse it well
/// within this.
pub const IDLE_FOR: Duration = Duration::from_secs(1);

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// The idle HTTP/1.1 connections to one plugin address. A new connection
/// per call left one socket in TIME_WAIT on frps's side for a minute each
/// (frps closed first): a `NewUserConn` plugin on another host, asked on
/// every public request, ran frps out of local ports at a few hundred
/// requests a second.
pub struct Connections {
    idle: std::sync::Mutex<Vec<(Sender, tokio::time::Instant)>>,
    addresses: Addresses,
    /// [`MAX_CALLS`] permits.
    calls: tokio::sync::Semaphore,
    /// [`MAX_CONTROL_CALLS`] permits.
    control_calls: tokio::sync::Semaphore,
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            idle: Default::default(),
            addresses: Default::default(),
            calls: tokio::sync::Semaphore::new(MAX_CALLS),
            control_calls: tokio::sync::Semaphore::new(MAX_CONTROL_CALLS),
        }
    }
}

/// How long a plugin host name's addresses are used before it is looked up
/// again; a failed lookup is kept for [`UNRESOLVED_FOR`].
pub const RESOLVED_FOR: Duration = Duration::from_secs(30);

/// How long a failed lookup of a plugin's host name is the answer.
pub const UNRESOLVED_FOR: Duration = Duration::from_secs(1);

/// Longest a lookup of a plugin's host name is waited for (glibc gives up
/// within about 30 s; a hung name service module may never): after it, the
/// lookup failed, and the next call starts another.
pub const LOOKUP_LIMIT: Duration = Duration::from_secs(60);

/// A lookup's outcome, shared by the calls that wait for it.
type Lookup = Result<Vec<std::net::SocketAddr>, String>;

/// How a host name is looked up (the system's resolver; a test's own).
type Resolve = std::sync::Arc<
    dyn Fn(
            String,
        )
            -> futures_util::future::BoxFuture<'static, std::io::Result<Vec<std::net::SocketAddr>>>
        + Send
        + Sync,
>;

/// The addresses of one plugin `addr` given by host name. The system's
/// resolver blocks a thread of tokio's blocking pool (which Argon2 also
/// uses) for as long as a dead DNS server makes it wait, and a call's
/// timeout cannot cancel it: one lookup at a time runs, in a task of its
/// own, and every call waiting meanwhile takes its answer, kept for
/// [`RESOLVED_FOR`] ([`UNRESOLVED_FOR`] when it failed).
struct Addresses {
    state: std::sync::Arc<std::sync::Mutex<Resolution>>,
    resolve: Resolve,
    /// The address that last took a connection: tried first while a
    /// lookup lists it (see [`ATTEMPT_LIMIT`]).
    preferred: std::sync::Mutex<Option<std::net::SocketAddr>>,
}

#[derive(Default)]
enum Resolution {
    #[default]
    Unknown,
    Known(Lookup, tokio::time::Instant),
    Asking(tokio::sync::watch::Receiver<Option<Lookup>>),
}

impl Default for Addresses {
    fn default() -> Self {
        Addresses::resolved_by(std::sync::Arc::new(|host: String| {
            Box::pin(async move { Ok(tokio::net::lookup_host(host).await?.collect()) })
        }))
    }
}

impl Addresses {
    fn resolved_by(resolve: Resolve) -> Self {
        Addresses {
            state: std::sync::Arc::default(),
            resolve,
            preferred: std::sync::Mutex::default(),
        }
    }

    /// The addresses to dial for `addr` (`host:port`, or an IP address
    /// and port, which needs no lookup).
    async fn of(&self, addr: &str) -> Result<Vec<std::net::SocketAddr>, CallError> {
        let mut addrs = self.looked_up(addr).await?;
        let preferred = *self.preferred.lock().expect("plugin address lock");
        if let Some(at) = addrs.iter().position(|a| Some(*a) == preferred) {
            addrs[..=at].rotate_right(1);
        }
        Ok(addrs)
    }

    /// The addresses of `addr` in the order its lookup gave them.
    async fn looked_up(&self, addr: &str) -> Result<Vec<std::net::SocketAddr>, CallError> {
        if let Ok(ip) = addr.parse::<std::net::SocketAddr>() {
            return Ok(vec![ip]);
        }
        let mut answer = {
            let mut state = self.state.lock().expect("plugin address lock");
            match &*state {
                Resolution::Known(lookup, at) if at.elapsed() < kept_for(lookup) => {
                    return lookup.clone().map_err(unresolved);
                }
                // (A lookup task that ended without answering, at a
                // runtime's shutdown, leaves a closed channel: asked again.)
                Resolution::Asking(answer) if answer.has_changed().is_ok() => answer.clone(),
                _ => {
                    let (tell, answer) = tokio::sync::watch::channel(None);
                    *state = Resolution::Asking(answer.clone());
                    let (lookup, shared, host) =
                        (self.resolve.clone(), self.state.clone(), addr.to_owned());
                    tokio::spawn(async move {
                        let found = match tokio::time::timeout(LOOKUP_LIMIT, lookup(host)).await {
                            Ok(Ok(addrs)) if addrs.is_empty() => Err("no addresses".to_owned()),
                            Ok(Ok(addrs)) => Ok(addrs),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => Err(format!("no answer within {LOOKUP_LIMIT:?}")),
                        };
                        *shared.lock().expect("plugin address lock") =
                            Resolution::Known(found.clone(), tokio::time::Instant::now());
                        let _ = tell.send(Some(found));
                    });
                    answer
                }
            }
        };
        let found = answer
            .wait_for(Option::is_some)
            .await
            .map_err(|_| unresolved("the lookup ended without an answer".into()))?;
        found.clone().expect("waited for").map_err(unresolved)
    }

    /// `addrs[at]` took a connection: it is tried first from now on, also
    /// in later lookups that list it, so one address that drops packets
    /// costs one call an attempt (see [`ATTEMPT_LIMIT`]), not every call.
    fn worked(&self, addrs: &[std::net::SocketAddr], at: usize) {
        *self.preferred.lock().expect("plugin address lock") = addrs.get(at).copied();
    }

    /// None of `addrs` took a connection: unless a later lookup replaced
    /// them, they are forgotten, so the next call looks the name up again
    /// (a plugin moved to another address). `addrs` may be in another
    /// order than the lookup's ([`Addresses::of`] puts the preferred
    /// first): the same addresses are the same lookup.
    fn failed(&self, addrs: &[std::net::SocketAddr]) {
        let mut state = self.state.lock().expect("plugin address lock");
        let same = |known: &[std::net::SocketAddr]| {
            known.len() == addrs.len() && known.iter().all(|a| addrs.contains(a))
        };
        if matches!(&*state, Resolution::Known(Ok(known), _) if same(known)) {
            *state = Resolution::Unknown;
        }
    }
}

/// How long `lookup` is the answer.
fn kept_for(lookup: &Lookup) -> Duration {
    if lookup.is_ok() {
        RESOLVED_FOR
    } else {
        UNRESOLVED_FOR
    }
}

fn unresolved(why: String) -> CallError {
    CallError::Connect(std::io::Error::other(format!(
        "cannot resolve the host name: {why}"
    )))
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("idle", &self.idle())
            .finish()
    }
}

impl Connections {
    /// Waits for a turn among the [`MAX_CALLS`] per-request calls to this
    /// address; the call holds the permit. The caller bounds the wait (a
    /// call's plugin timeout covers its turn).
    pub async fn turn(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.calls
            .acquire()
            .await
            .expect("the semaphore is never closed")
    }

    /// Waits for a turn among the [`MAX_CONTROL_CALLS`] control-plane calls
    /// to this address (never behind the per-request ones).
    pub async fn control_turn(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.control_calls
            .acquire()
            .await
            .expect("the semaphore is never closed")
    }

    /// Idle connections kept now.
    pub fn idle(&self) -> usize {
        self.idle.lock().expect("plugin pool lock").len()
    }

    /// The most recently used idle connection still open and not too old;
    /// older ones are dropped on the way (which closes them).
    fn take(&self) -> Option<Sender> {
        self.pruned().pop().map(|(sender, _)| sender)
    }

    fn put(&self, sender: Sender) {
        let mut idle = self.pruned();
        if idle.len() < MAX_IDLE && !sender.is_closed() {
            idle.push((sender, tokio::time::Instant::now()));
        }
    }

    /// The idle list, without connections closed or idle past [`IDLE_FOR`]
    /// (dropped, which closes them).
    fn pruned(&self) -> std::sync::MutexGuard<'_, Vec<(Sender, tokio::time::Instant)>> {
        let now = tokio::time::Instant::now();
        let mut idle = self.idle.lock().expect("plugin pool lock");
        idle.retain(|(sender, since)| !sender.is_closed() && now - *since < IDLE_FOR);
        idle
    }
}

/// Longest wait for one of a host name's addresses to take a connection
/// while others are left to try (less when the call's timeout, shared
/// among the addresses, leaves less): an address that drops packets (an
/// IPv6 one on a host without an IPv6 route, typically listed first) would
/// otherwise take the call's whole timeout, every call, and the next
/// address never be tried. The last address has what is left of the call's
/// timeout.
pub const ATTEMPT_LIMIT: Duration = Duration::from_secs(1);

/// A connection to the first of `addrs` that takes one, and its index; each
/// but the last tried for at most [`ATTEMPT_LIMIT`] or its share of
/// `budget` (the call's timeout), whichever is less.
async fn connect_any(
    addrs: &[std::net::SocketAddr],
    budget: Duration,
) -> std::io::Result<(TcpStream, usize)> {
    let share = budget / u32::try_from(addrs.len().max(1)).unwrap_or(u32::MAX);
    let limit = ATTEMPT_LIMIT.min(share);
    let mut last = None;
    for (at, addr) in addrs.iter().enumerate() {
        let attempt = TcpStream::connect(addr);
        let result = if at + 1 < addrs.len() {
            tokio::time::timeout(limit, attempt)
                .await
                .unwrap_or_else(|_| {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("{addr}: no connection within {limit:?}"),
                    ))
                })
        } else {
            attempt.await
        };
        match result {
            Ok(stream) => return Ok((stream, at)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no addresses to connect to")))
}

/// A new connection to `addr`, its driver spawned (it ends when the
/// connection closes, or once the sender is dropped and nothing is under
/// way).
async fn dial(
    addresses: &Addresses,
    addr: &str,
    deadline: tokio::time::Instant,
) -> Result<Sender, CallError> {
    let addrs = addresses.of(addr).await?;
    // What the lookup (and any redirect before) left of the call's time.
    let budget = deadline.saturating_duration_since(tokio::time::Instant::now());
    let stream = match connect_any(&addrs, budget).await {
        Ok((stream, at)) => {
            addresses.worked(&addrs, at);
            stream
        }
        Err(e) => {
            addresses.failed(&addrs);
            return Err(CallError::Connect(e));
        }
    };
    let _ = stream.set_nodelay(true);
    // The answer's head is held to MAX_ANSWER too (hyper's own limit is
    // some 400 KiB), and to 64 headers.
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_header_size(MAX_ANSWER)
        .max_headers(64)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| CallError::Http(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Sends `body` to `path_and_query` at `addr` and returns the answer body of
/// a 200 response, on an idle connection from `pool` when there is one (a
/// request it could not send, the plugin having closed it meanwhile, goes
/// on a new one; one it sent is never sent twice). The connection goes
/// back to `pool` once the answer was read whole. Connections are shared
/// out of what is left until `deadline` (the call's, set before it waited
/// for a turn).
pub async fn post(
    pool: &Connections,
    addr: &str,
    path_and_query: &str,
    reqid: &str,
    authorization: Option<&http::HeaderValue>,
    body: Vec<u8>,
    deadline: tokio::time::Instant,
) -> Result<Bytes, CallError> {
    let body = Bytes::from(body);
    let mut uri: Uri = path_and_query
        .parse()
        .map_err(|e| CallError::Http(format!("bad request path: {e}")))?;
    let mut hops = 0;
    loop {
        match exchange(
            pool,
            addr,
            uri,
            reqid,
            authorization,
            body.clone(),
            deadline,
        )
        .await?
        {
            Exchanged::Answer(answer) => return Ok(answer),
            Exchanged::Redirect(status, location) => {
                let next = (hops < MAX_REDIRECTS)
                    .then(|| same_address(&location, addr))
                    .flatten();
                let Some(next) = next else {
                    return Err(CallError::Redirect(status, location));
                };
                uri = next;
                hops += 1;
            }
        }
    }
}

/// What one exchange brought.
enum Exchanged {
    /// A 200 answer's body.
    Answer(Bytes),
    /// A 307 or 308 and its `Location`.
    Redirect(StatusCode, String),
}

/// The path and query `location` (a redirect's) names on `addr`: an
/// absolute path (`/handler/`), or an `http://` URL of that same address;
/// `None` for anything else.
fn same_address(location: &str, addr: &str) -> Option<Uri> {
    let uri: Uri = location.parse().ok()?;
    let ours: http::uri::Authority = addr.parse().ok()?;
    match (uri.scheme_str(), uri.authority()) {
        (None, None) if location.starts_with('/') && !location.starts_with("//") => {}
        // The port may be left out where it is http's 80.
        (Some("http"), Some(theirs))
            if !theirs.as_str().contains('@')
                && theirs.host().eq_ignore_ascii_case(ours.host())
                && theirs.port_u16().unwrap_or(80) == ours.port_u16().unwrap_or(80) => {}
        _ => return None,
    }
    let path = uri.path_and_query()?.as_str();
    path.parse().ok()
}

/// One request of a call on a pooled or new connection.
async fn exchange(
    pool: &Connections,
    addr: &str,
    uri: Uri,
    reqid: &str,
    authorization: Option<&http::HeaderValue>,
    body: Bytes,
    deadline: tokio::time::Instant,
) -> Result<Exchanged, CallError> {
    let mut request = Request::post(uri)
        .header(HOST, addr)
        .header(CONTENT_TYPE, "application/json")
        .header(USER_AGENT, concat!("frps/", env!("CARGO_PKG_VERSION")))
        .header("X-Frp-Reqid", reqid)
        .body(Full::new(body))
        .map_err(|e| CallError::Http(e.to_string()))?;
    if let Some(value) = authorization {
        request
            .headers_mut()
            .insert(http::header::AUTHORIZATION, value.clone());
    }
    let (sender, resp) = loop {
        let (mut sender, reused) = match pool.take() {
            // Ready once its last exchange has wound down; closed meanwhile:
            // the next one.
            Some(mut sender) => match sender.ready().await {
                Ok(()) => (sender, true),
                Err(_) => continue,
            },
            None => (dial(&pool.addresses, addr, deadline).await?, false),
        };
        match sender.try_send_request(request).await {
            Ok(resp) => break (sender, resp),
            Err(mut e) => match e.take_message() {
                Some(unsent) if reused => request = unsent,
                _ => return Err(CallError::Http(e.into_error().to_string())),
            },
        }
    };
    let status = resp.status();
    let location = resp
        .headers()
        .get(http::header::LOCATION)
        .map(|l| String::from_utf8_lossy(l.as_bytes()).into_owned());
    let body = Limited::new(resp.into_body(), MAX_ANSWER).collect().await;
    // Read whole: the connection can carry the next call (unless the
    // plugin asked to close it: hyper then closes it, and it is skipped),
    // also after a refusal by status (a plugin refusing every call at a
    // high rate must not cost a connection each).
    if body.is_ok() {
        pool.put(sender);
    }
    if let (true, Some(location)) = (status.is_redirection(), location) {
        return match status {
            StatusCode::TEMPORARY_REDIRECT | StatusCode::PERMANENT_REDIRECT => {
                Ok(Exchanged::Redirect(status, location))
            }
            // Go turns a POST into a GET for these: no plugin call.
            _ => Err(CallError::Redirect(status, location)),
        };
    }
    if status != StatusCode::OK {
        return Err(CallError::Status(status));
    }
    let body = body.map_err(|e| {
        if e.is::<http_body_util::LengthLimitError>() {
            CallError::TooLarge
        } else {
            CallError::Http(e.to_string())
        }
    })?;
    Ok(Exchanged::Answer(body.to_bytes()))
}

/// A boolean, or its string form (`"true"`, `"false"`) as frp's documentation
/// shows for `unchange`; `null` counts as absent.
fn flexible_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Flag {
        Bool(bool),
        Text(String),
    }
    match Option::<Flag>::deserialize(d)? {
        None => Ok(None),
        Some(Flag::Bool(b)) => Ok(Some(b)),
        Some(Flag::Text(t)) => match t.trim().to_ascii_lowercase().as_str() {
            "true" => Ok(Some(true)),
            "false" => Ok(Some(false)),
            _ => Err(serde::de::Error::custom(format!(
                "`{t}` is neither true nor false"
            ))),
        },
    }
}

#[derive(Debug, Deserialize)]
struct Answer {
    #[serde(default, deserialize_with = "flexible_bool")]
    reject: Option<bool>,
    #[serde(default)]
    reject_reason: Option<String>,
    #[serde(default, deserialize_with = "flexible_bool")]
    unchange: Option<bool>,
    #[serde(default)]
    content: Option<serde_json::Value>,
}

/// A name as Go's `encoding/json` compares a key with a field's name when
/// they differ (frp reads answers with it): `Reject`, `REJECT` and `reject`
/// are one field (and `ſ`, `K` the Kelvin sign, fold as Go folds them).
pub fn go_fold(name: &str) -> String {
    // Go maps one rune to one rune (simple case mapping): a rune whose full
    // mapping has several (`ß` → `SS`) stays as it is.
    fn one(mut mapped: impl Iterator<Item = char>, c: char) -> char {
        match (mapped.next(), mapped.next()) {
            (Some(m), None) => m,
            _ => c,
        }
    }
    name.chars()
        .map(|c| one(c.to_uppercase(), c))
        .map(|c| one(c.to_lowercase(), c))
        .collect()
}

/// A JSON object's members in the order written (serde_json's maps sort
/// them): where two keys name one field, Go keeps the last.
struct Members(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, serde_json::Value>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// The fields of an answer, by their names in frp's `Response`.
const ANSWER_FIELDS: [&str; 4] = ["reject", "reject_reason", "unchange", "content"];

/// Reads a plugin's answer. `unchange` may be a boolean or a string; when it
/// is absent, a `content` object replaces the content (as in frp) and no
/// content means unchanged. Keys name fields as frp's Go reads them: in
/// any case (`{"Reject": true}` from a Go plugin whose struct has no JSON
/// tags rejects, as under frp), the last of two for one field winning.
pub fn verdict(body: &[u8]) -> Result<Verdict, CallError> {
    let Members(members) = serde_json::from_slice(body).map_err(|e| {
        CallError::Invalid(match e.classify() {
            serde_json::error::Category::Data => "not a JSON object".into(),
            _ => format!("not JSON ({e})"),
        })
    })?;
    let mut fields = serde_json::Map::new();
    for (key, value) in members {
        let folded = go_fold(&key);
        if let Some(field) = ANSWER_FIELDS.iter().find(|f| **f == folded) {
            fields.insert((*field).to_owned(), value);
        }
    }
    let answer: Answer = serde_json::from_value(serde_json::Value::Object(fields))
        .map_err(|e| CallError::Invalid(e.to_string()))?;
    if answer.reject == Some(true) {
        let reason = answer.reject_reason.unwrap_or_default();
        return Ok(Verdict::Reject(reason));
    }
    let content = answer.content.filter(|c| !c.is_null());
    match (answer.unchange, content) {
        (Some(true), _) | (None, None) => Ok(Verdict::Unchanged),
        (_, Some(c)) if c.is_object() => Ok(Verdict::Replaced(c)),
        (_, Some(_)) => Err(CallError::Invalid("`content` is not an object".into())),
        (Some(false), None) => Err(CallError::Invalid(
            "`unchange` is false but there is no `content`".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_address_that_drops_packets_is_passed_over_and_then_tried_last() {
        // A listener whose accept queue is full drops further SYNs, as a
        // firewall (or a host without an IPv6 route) does.
        let hole = tokio::net::TcpSocket::new_v4().unwrap();
        hole.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let hole = hole.listen(0).unwrap();
        let hole_addr = hole.local_addr().unwrap();
        let _queued = std::net::TcpStream::connect(hole_addr).unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(hole_addr))
                .await
                .is_err(),
            "the full queue drops connections"
        );
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = live.accept().await {
                held.push(s);
            }
        });
        let resolve: Resolve = std::sync::Arc::new(move |_host: String| {
            Box::pin(async move { Ok(vec![hole_addr, live_addr]) })
        });
        let addresses = Addresses::resolved_by(resolve);
        let started = std::time::Instant::now();
        dial(&addresses, "plugin.internal:9000", in_secs(3))
            .await
            .unwrap();
        let took = started.elapsed();
        assert!(
            took >= ATTEMPT_LIMIT && took < ATTEMPT_LIMIT * 3,
            "the next address after {ATTEMPT_LIMIT:?}: {took:?}"
        );
        // The address that took it is tried first from now on.
        assert_eq!(
            addresses.of("plugin.internal:9000").await.unwrap(),
            [live_addr, hole_addr]
        );
        // A call timeout shorter than the attempt limit is shared among
        // the addresses: the next one is still tried within it.
        let resolve: Resolve = std::sync::Arc::new(move |_host: String| {
            Box::pin(async move { Ok(vec![hole_addr, live_addr]) })
        });
        let fresh = Addresses::resolved_by(resolve);
        let short = Duration::from_millis(600);
        let deadline = tokio::time::Instant::now() + short;
        tokio::time::timeout(short, dial(&fresh, "plugin.internal:9000", deadline))
            .await
            .expect("the next address within the call's timeout")
            .unwrap();
        // What is shared is what a slow lookup left of the call's time.
        let resolve: Resolve = std::sync::Arc::new(move |_host: String| {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok(vec![hole_addr, live_addr])
            })
        });
        let slow = Addresses::resolved_by(resolve);
        // 900 ms left, under ATTEMPT_LIMIT: unshared, the first address
        // would take all of it; shared, the second has about 450 ms (room
        // for a loaded machine).
        let budget = Duration::from_millis(1200);
        let deadline = tokio::time::Instant::now() + budget;
        tokio::time::timeout(budget, dial(&slow, "plugin.internal:9000", deadline))
            .await
            .expect("the next address within what the lookup left")
            .unwrap();
        let started = std::time::Instant::now();
        dial(&addresses, "plugin.internal:9000", in_secs(3))
            .await
            .unwrap();
        assert!(
            started.elapsed() < ATTEMPT_LIMIT / 2,
            "{:?}",
            started.elapsed()
        );
    }

    fn in_secs(secs: u64) -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(secs)
    }

    /// A resolver counting its lookups, each taking `slow` and answering
    /// `found` (an error when `None`).
    fn counted(
        slow: Duration,
        found: Option<&'static str>,
    ) -> (Addresses, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = asked.clone();
        let resolve: Resolve = std::sync::Arc::new(move |host: String| {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move {
                assert_eq!(host, "plugin.internal:9000");
                tokio::time::sleep(slow).await;
                match found {
                    Some(ip) => Ok(vec![ip.parse().unwrap()]),
                    None => Err(std::io::Error::other("no DNS server answered")),
                }
            })
        });
        (Addresses::resolved_by(resolve), asked)
    }

    #[tokio::test(start_paused = true)]
    async fn a_host_name_is_looked_up_once_for_every_call_waiting_and_kept_a_while() {
        use std::sync::atomic::Ordering::SeqCst;
        const HOST: &str = "plugin.internal:9000";
        let (addresses, asked) = counted(Duration::from_secs(5), Some("127.0.0.1:9000"));
        // Calls that give up (their timeout) while a slow lookup runs do not
        // start another each.
        for _ in 0..50 {
            let gave_up = tokio::time::timeout(Duration::from_millis(50), addresses.of(HOST)).await;
            assert!(gave_up.is_err());
        }
        assert_eq!(asked.load(SeqCst), 1);
        // Calls waiting together all take its answer.
        let answers = futures_util::future::join_all((0..20).map(|_| addresses.of(HOST))).await;
        let ip: std::net::SocketAddr = "127.0.0.1:9000".parse().unwrap();
        for answer in answers {
            assert_eq!(answer.unwrap(), [ip]);
        }
        assert_eq!(asked.load(SeqCst), 1);
        // Kept for RESOLVED_FOR, then asked again.
        tokio::time::advance(RESOLVED_FOR - Duration::from_millis(10)).await;
        assert_eq!(addresses.of(HOST).await.unwrap(), [ip]);
        assert_eq!(asked.load(SeqCst), 1);
        tokio::time::advance(Duration::from_millis(10)).await;
        assert_eq!(addresses.of(HOST).await.unwrap(), [ip]);
        assert_eq!(asked.load(SeqCst), 2);
        // An address given as an IP is never looked up.
        let given: std::net::SocketAddr = "[::1]:9001".parse().unwrap();
        assert_eq!(addresses.of("[::1]:9001").await.unwrap(), [given]);
        assert_eq!(asked.load(SeqCst), 2);

        // A failed lookup is the answer for UNRESOLVED_FOR.
        let (addresses, asked) = counted(Duration::from_secs(5), None);
        for _ in 0..3 {
            let Err(CallError::Connect(e)) = addresses.of(HOST).await else {
                panic!("resolved");
            };
            assert!(
                e.to_string()
                    .contains("cannot resolve the host name: no DNS server answered"),
                "{e}"
            );
        }
        assert_eq!(asked.load(SeqCst), 1);
        tokio::time::advance(UNRESOLVED_FOR).await;
        assert!(addresses.of(HOST).await.is_err());
        assert_eq!(asked.load(SeqCst), 2);

        // A lookup that never ends fails at LOOKUP_LIMIT, and the next call
        // asks again.
        let (addresses, asked) = counted(Duration::MAX, Some("127.0.0.1:9000"));
        let Err(CallError::Connect(e)) = addresses.of(HOST).await else {
            panic!("resolved");
        };
        assert!(e.to_string().contains("no answer within 60s"), "{e}");
        tokio::time::advance(UNRESOLVED_FOR).await;
        let again = tokio::time::timeout(Duration::from_secs(1), addresses.of(HOST)).await;
        assert!(again.is_err(), "waits on a new lookup");
        assert_eq!(asked.load(SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn addresses_that_took_no_connection_are_looked_up_again() {
        use std::sync::atomic::Ordering::SeqCst;
        const HOST: &str = "plugin.internal:9000";
        let (addresses, asked) = counted(Duration::ZERO, Some("127.0.0.1:9000"));
        let ip: std::net::SocketAddr = "127.0.0.1:9000".parse().unwrap();
        assert_eq!(addresses.of(HOST).await.unwrap(), [ip]);
        // Others than the ones known (an older lookup's) change nothing.
        addresses.failed(&["127.0.0.2:9000".parse().unwrap()]);
        assert_eq!(addresses.of(HOST).await.unwrap(), [ip]);
        assert_eq!(asked.load(SeqCst), 1);
        addresses.failed(&[ip]);
        assert_eq!(addresses.of(HOST).await.unwrap(), [ip]);
        assert_eq!(asked.load(SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn addresses_first_the_one_that_worked_are_looked_up_again_when_none_works() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        const HOST: &str = "plugin.internal:9000";
        let (a, b): (std::net::SocketAddr, std::net::SocketAddr) = (
            "127.0.0.1:9000".parse().unwrap(),
            "127.0.0.2:9000".parse().unwrap(),
        );
        let asked = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = asked.clone();
        let addresses = Addresses::resolved_by(std::sync::Arc::new(move |_host: String| {
            counter.fetch_add(1, SeqCst);
            Box::pin(async move { Ok(vec![a, b]) })
        }));
        let addrs = addresses.of(HOST).await.unwrap();
        assert_eq!(addrs, [a, b]);
        addresses.worked(&addrs, 1);
        let addrs = addresses.of(HOST).await.unwrap();
        assert_eq!(addrs, [b, a], "the one that worked first");
        assert_eq!(asked.load(SeqCst), 1);
        addresses.failed(&addrs);
        assert_eq!(addresses.of(HOST).await.unwrap(), [b, a]);
        assert_eq!(asked.load(SeqCst), 2, "none worked: looked up again");
    }

    #[tokio::test]
    async fn the_systems_resolver_is_the_default() {
        let found = Addresses::default().of("localhost:9").await.unwrap();
        assert!(!found.is_empty());
        assert!(
            found.iter().all(|a| a.ip().is_loopback() && a.port() == 9),
            "{found:?}"
        );
    }
    use serde_json::json;

    fn v(body: serde_json::Value) -> Result<Verdict, CallError> {
        verdict(body.to_string().as_bytes())
    }

    #[test]
    fn the_three_documented_answers() {
        assert_eq!(
            v(json!({"reject": true, "reject_reason": "invalid user"})).unwrap(),
            Verdict::Reject("invalid user".into())
        );
        assert_eq!(
            v(json!({"reject": false, "unchange": true})).unwrap(),
            Verdict::Unchanged
        );
        // The seed's example writes `unchange` as a string.
        assert_eq!(
            v(json!({"unchange": "false", "content": {"user": "x"}})).unwrap(),
            Verdict::Replaced(json!({"user": "x"}))
        );
        assert_eq!(
            v(json!({"reject": "false", "unchange": "true"})).unwrap(),
            Verdict::Unchanged
        );
    }

    #[test]
    fn absent_fields_follow_frp() {
        assert_eq!(v(json!({})).unwrap(), Verdict::Unchanged);
        assert_eq!(
            v(json!({"content": {"a": 1}})).unwrap(),
            Verdict::Replaced(json!({"a": 1}))
        );
        assert_eq!(
            v(json!({"unchange": true, "content": {"a": 1}})).unwrap(),
            Verdict::Unchanged
        );
        assert_eq!(
            v(json!({"reject": true})).unwrap(),
            Verdict::Reject(String::new())
        );
    }

    #[test]
    fn only_redirects_to_the_plugins_own_address_are_followed() {
        let to = |l: &str| same_address(l, "Plugin.internal:9000").map(|u| u.to_string());
        assert_eq!(
            to("/handler/?op=Login").as_deref(),
            Some("/handler/?op=Login")
        );
        assert_eq!(
            to("http://plugin.INTERNAL:9000/h?x=1").as_deref(),
            Some("/h?x=1")
        );
        for elsewhere in [
            "//evil.example/h",
            "http://evil.example:9000/h",
            "http://plugin.internal:9001/h",
            "https://plugin.internal:9000/h",
            "handler/",
            "",
            "http://plugin.internal:9000@evil.example/h",
            "http://plugin.internal/h",
        ] {
            assert_eq!(to(elsewhere), None, "{elsewhere}");
        }
    }

    #[test]
    fn a_redirect_may_leave_out_http_default_port() {
        let to = |l: &str, addr: &str| same_address(l, addr).map(|u| u.to_string());
        assert_eq!(to("http://plugin/x", "plugin:80").as_deref(), Some("/x"));
        assert_eq!(to("http://plugin:80/x", "PLUGIN:80").as_deref(), Some("/x"));
        assert_eq!(
            to("http://127.0.0.1:9000/handler/", "127.0.0.1:9000").as_deref(),
            Some("/handler/")
        );
        assert_eq!(to("http://plugin/x", "plugin:8080"), None);
    }

    #[test]
    fn go_folds_one_rune_to_one() {
        assert_eq!(go_fold("Reject_Reason"), "reject_reason");
        assert_eq!(go_fold("reject_rea\u{17f}on"), "reject_reason");
        assert_eq!(go_fold("\u{212a}ey"), "key");
        // Not Go's: a full mapping to several letters.
        assert_eq!(go_fold("client_addre\u{df}"), "client_addre\u{df}");
    }

    #[test]
    fn keys_name_fields_in_any_case_as_go_reads_them() {
        // A Go plugin answering with a struct that has no JSON tags.
        assert_eq!(
            v(json!({"Reject": true, "RejectReason": "no"})).unwrap(),
            Verdict::Reject(String::new())
        );
        assert_eq!(
            v(json!({"REJECT": true, "Reject_Reason": "no"})).unwrap(),
            Verdict::Reject("no".into())
        );
        assert_eq!(
            v(json!({"Unchange": false, "Content": {"user": "x"}})).unwrap(),
            Verdict::Replaced(json!({"user": "x"}))
        );
        // Go's folding: `ſ` is an `s`.
        assert_eq!(
            verdict("{\"reject\": true, \"reject_rea\u{17f}on\": \"long s\"}".as_bytes()).unwrap(),
            Verdict::Reject("long s".into())
        );
        // Two keys for one field: the last written wins, as in Go (the
        // map serde_json reads into would sort `Reject` before `reject`).
        assert_eq!(
            verdict(br#"{"reject": false, "Reject": true}"#).unwrap(),
            Verdict::Reject(String::new())
        );
        assert_eq!(
            verdict(br#"{"Reject": true, "reject": false}"#).unwrap(),
            Verdict::Unchanged
        );
        // Other keys are ignored, in any case.
        assert_eq!(v(json!({"Rejected": true})).unwrap(), Verdict::Unchanged);
    }

    #[test]
    fn garbage_is_an_error() {
        for body in [
            &b"not json"[..],
            b"[true]",
            b"\"ok\"",
            br#"{"unchange": "maybe"}"#,
            br#"{"reject": 1}"#,
            br#"{"unchange": false}"#,
            br#"{"unchange": false, "content": [1]}"#,
            br#"{"reject_reason": 5}"#,
        ] {
            let res = verdict(body);
            assert!(
                matches!(res, Err(CallError::Invalid(_))),
                "{}: {res:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
