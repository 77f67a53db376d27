//! frp-compatible server plugins (`docs/server-plugin.md`).
//!
//! Before certain operations frps asks external HTTP services, configured as
//! `[plugin.NAME]` sections (or `[[httpPlugins]]` entries), each for a list of
//! operations. A plugin rejects the operation with a reason, lets it
//! proceed, or lets it proceed with modified content. The plugins for one
//! operation run in configuration order, each seeing the content as the
//! previous one left it.
//!
//! - [`content`]: what each operation sends, with frp's field names;
//! - [`hooks`]: the call sites' helpers, which cost nothing for an
//!   operation no plugin handles;
//! - `client`: one call over HTTP and the reading of its answer.

mod client;

pub use client::MAX_CALLS as MAX_CALLS_AT_ONCE;
pub use client::MAX_IDLE as MAX_IDLE_CONNECTIONS;
pub mod content;
pub mod hooks;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use tracing::{debug, info, warn};

pub use client::{API_VERSION, CallError, MAX_ANSWER, MAX_REDIRECTS};
pub use content::Content;

use client::Verdict;

/// An operation plugins can be asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// A client logged in and asks to register.
    Login,
    /// A client registers its service.
    NewProxy,
    /// A registered client went away (notification; the answer is ignored).
    CloseProxy,
    /// A heartbeat.
    Ping,
    /// A data connection dialed back by a client.
    NewWorkConn,
    /// A public request about to be sent to a client.
    NewUserConn,
}

impl Op {
    /// Whether the operation is asked per public request (`NewUserConn`,
    /// `NewWorkConn`): those calls come in bursts and wait their turn for
    /// one of [`client::MAX_CALLS`]; the control plane's (`Login`,
    /// `NewProxy`, `CloseProxy`, `Ping`) never queue behind them (a `Ping`
    /// that failed waiting would disconnect its box).
    pub fn per_request(self) -> bool {
        matches!(self, Op::NewWorkConn | Op::NewUserConn)
    }

    /// Every operation.
    pub const ALL: [Op; 6] = [
        Op::Login,
        Op::NewProxy,
        Op::CloseProxy,
        Op::Ping,
        Op::NewWorkConn,
        Op::NewUserConn,
    ];

    /// frp's name of the operation.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Login => "Login",
            Op::NewProxy => "NewProxy",
            Op::CloseProxy => "CloseProxy",
            Op::Ping => "Ping",
            Op::NewWorkConn => "NewWorkConn",
            Op::NewUserConn => "NewUserConn",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Op {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Op::ALL
            .into_iter()
            .find(|op| op.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Op::ALL.iter().map(|o| o.as_str()).collect();
                format!("unknown operation `{s}` (known: {})", names.join(", "))
            })
    }
}

/// One configured plugin.
#[derive(Clone, PartialEq, Eq)]
pub struct PluginSpec {
    /// Its name (`[plugin.NAME]`), used in logs and refusals.
    pub name: String,
    /// `host:port` it listens on (without the user name and password an
    /// `addr` may carry).
    pub addr: String,
    /// Path the calls are posted to, starting with `/`.
    pub path: String,
    /// The operations it is asked about.
    pub ops: Vec<Op>,
    /// The `Authorization` header sent with every call: HTTP Basic, from
    /// a `user:password@` in `addr` (as frp's Go client sends it).
    pub authorization: Option<http::HeaderValue>,
    /// What of frp's configuration it carries that frps takes but does
    /// not act on (said at start): an operation frps never calls
    /// ([`UNSENT_OPS`]), `tls_verify`.
    pub unused: Vec<String>,
}

/// Operations frp defines that frps never calls: `CloseUserConn` (frp tells
/// when a TCP user connection ends; a public request is no connection of
/// its own here). Taken in `ops`, so an frp configuration starts, and said.
pub const UNSENT_OPS: &[&str] = &["CloseUserConn"];

impl std::fmt::Debug for PluginSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginSpec")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field("path", &self.path)
            .field("ops", &self.ops)
            .field("authorization", &self.authorization.as_ref().map(|_| "***"))
            .field("unused", &self.unused)
            .finish()
    }
}

/// The `Authorization` header for the `user[:password]` of an `addr`
/// (each percent-decoded, as in a URL), marked sensitive.
fn basic_authorization(userinfo: &str) -> Result<http::HeaderValue, SpecError> {
    use base64::Engine as _;
    let decode = |part: &str| {
        percent_encoding::percent_decode_str(part)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| {
                spec_error(
                    "addr",
                    "the user name or password is not UTF-8 once decoded",
                )
            })
    };
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let credentials = format!("{}:{}", decode(user)?, decode(password)?);
    let header = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(credentials)
    );
    let mut value = http::HeaderValue::from_str(&header).expect("base64 is a valid header value");
    value.set_sensitive(true);
    Ok(value)
}

/// A plugin setting that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}`: {message}")]
pub struct SpecError {
    /// The setting (`name`, `addr`, `path` or `ops`).
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

fn spec_error(field: &'static str, message: impl Into<String>) -> SpecError {
    SpecError {
        field,
        message: message.into(),
    }
}

impl PluginSpec {
    /// Checks and normalises a plugin's settings: `addr` may carry an
    /// `http://` prefix (not `https://`: frps speaks plain HTTP to plugins);
    /// `path` defaults to `/`; `ops` must name at least one operation.
    pub fn new(name: &str, addr: &str, path: &str, ops: &[&str]) -> Result<Self, SpecError> {
        let name = name.trim();
        if name.is_empty() {
            return Err(spec_error("name", "a plugin needs a name"));
        }
        let addr = addr.trim();
        if addr.starts_with("https://") {
            return Err(spec_error(
                "addr",
                "frps calls plugins over plain HTTP; https is not supported",
            ));
        }
        let addr = addr
            .strip_prefix("http://")
            .unwrap_or(addr)
            .trim_end_matches('/');
        // `user:password@host:port`: sent as HTTP Basic, as frp does.
        let (authorization, addr) = match addr.rsplit_once('@') {
            Some((userinfo, host)) => (Some(basic_authorization(userinfo)?), host),
            None => (None, addr),
        };
        if addr.is_empty() {
            return Err(spec_error("addr", "required (e.g. 127.0.0.1:9000)"));
        }
        let authority: http::uri::Authority = addr
            .parse()
            .map_err(|_| spec_error("addr", format!("`{addr}` is not host:port")))?;
        if authority.port_u16().is_none() {
            return Err(spec_error(
                "addr",
                format!("`{addr}` needs a port (e.g. {addr}:9000)"),
            ));
        }
        let path = path.trim();
        let path = match path {
            "" => "/".to_owned(),
            p if p.starts_with('/') => p.to_owned(),
            p => format!("/{p}"),
        };
        if path.contains(['?', '#']) || path.parse::<http::uri::PathAndQuery>().is_err() {
            return Err(spec_error(
                "path",
                format!("`{path}` is not a plain URL path"),
            ));
        }
        let mut parsed: Vec<Op> = Vec::new();
        let mut unused = Vec::new();
        for op in ops.iter().map(|o| o.trim()).filter(|o| !o.is_empty()) {
            if UNSENT_OPS.contains(&op) {
                let said = format!("the operation {op} (frps never makes that call)");
                if !unused.contains(&said) {
                    unused.push(said);
                }
                continue;
            }
            let op = op.parse::<Op>().map_err(|e| spec_error("ops", e))?;
            if !parsed.contains(&op) {
                parsed.push(op);
            }
        }
        if parsed.is_empty() && unused.is_empty() {
            return Err(spec_error(
                "ops",
                "must name at least one operation (e.g. Login, NewProxy)",
            ));
        }
        Ok(Self {
            name: name.to_owned(),
            addr: addr.to_owned(),
            path,
            ops: parsed,
            authorization,
            unused,
        })
    }
}

/// Why an operation may not proceed.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// A plugin rejected it; the reason is the plugin's own.
    #[error("{reason}")]
    Rejected {
        /// The plugin's name.
        plugin: String,
        /// Its reason (a default one when it gave none).
        reason: String,
    },
    /// A plugin could not decide: unreachable, too slow, non-200, garbage.
    #[error("server plugin '{plugin}' failed on {op}: {cause}")]
    Failed {
        /// The plugin's name.
        plugin: String,
        /// The operation.
        op: Op,
        /// What went wrong.
        cause: CallError,
    },
}

impl PluginError {
    /// Whether a plugin decided against the operation (as opposed to failing
    /// to decide, which a retry may fix).
    pub fn is_rejection(&self) -> bool {
        matches!(self, PluginError::Rejected { .. })
    }
}

/// The configured plugins, grouped by operation in configuration order.
#[derive(Debug)]
pub struct Plugins {
    chains: [Vec<PluginSpec>; 6],
    timeout: Duration,
    /// Idle connections by plugin address.
    pools: std::collections::HashMap<String, client::Connections>,
    /// Paces each operation's failure and rejection lines (`NewUserConn`
    /// and `NewWorkConn` are asked per request): one a second at warn and
    /// info, the rest at debug.
    lines: [[common::pace::SharedPace; 2]; 6],
}

/// No plugins.
impl Default for Plugins {
    fn default() -> Self {
        Plugins::new(&[], Duration::ZERO, Duration::ZERO)
    }
}

/// Most characters of a plugin's text (a rejection's reason, an answer's
/// fault) frps passes on: it goes into frames to frpc (64 KiB at most) and
/// into frps's log.
pub const MAX_PLUGIN_TEXT: usize = 1024;

/// A plugin's `text` as frps passes it on: control characters (which
/// would forge log lines) as spaces, cut to [`MAX_PLUGIN_TEXT`].
pub fn tame(text: &str) -> String {
    common::text::tame(text, MAX_PLUGIN_TEXT)
}

#[derive(Serialize)]
struct Call<'a, C> {
    version: &'static str,
    op: &'static str,
    content: &'a C,
}

impl Plugins {
    /// Plugins from `specs`, each call limited to `timeout`; a request
    /// waits `connect_timeout` for its data connection, `NewWorkConn`
    /// included.
    pub fn new(specs: &[PluginSpec], timeout: Duration, connect_timeout: Duration) -> Self {
        let mut chains: [Vec<PluginSpec>; 6] = Default::default();
        for spec in specs {
            for op in &spec.ops {
                chains[op.index()].push(spec.clone());
            }
        }
        for spec in specs {
            for what in &spec.unused {
                tracing::warn!(
                    "server plugin '{}': {what} is taken from frp's configuration but has no effect",
                    spec.name
                );
            }
        }
        for op in Op::ALL {
            let names: Vec<&str> = chains[op.index()].iter().map(|p| p.name.as_str()).collect();
            if !names.is_empty() {
                info!("server plugins for {op}: {}", names.join(" → "));
            }
        }
        let work = chains[Op::NewWorkConn.index()].len();
        if work > 0 && timeout * work as u32 >= connect_timeout {
            tracing::warn!(
                "{work} server plugin(s) for NewWorkConn at --plugin-timeout {timeout:?} each may take longer than --connect-timeout {connect_timeout:?}, which a request waits for its data connection: a slow plugin then fails requests (503 plugin_unavailable); raise --connect-timeout or lower --plugin-timeout"
            );
        }
        let pools = specs
            .iter()
            .map(|spec| (spec.addr.clone(), client::Connections::default()))
            .collect();
        Self {
            chains,
            timeout,
            pools,
            lines: std::array::from_fn(|_| {
                std::array::from_fn(|_| common::pace::SharedPace::new(Duration::from_secs(1)))
            }),
        }
    }

    /// Idle connections kept to the plugin at `addr` (for tests and
    /// diagnostics).
    pub fn idle_connections(&self, addr: &str) -> usize {
        self.pools.get(addr).map_or(0, client::Connections::idle)
    }

    /// Whether any plugin handles `op`. Call sites check this before
    /// building any content, so an operation without plugins costs nothing.
    #[inline]
    pub fn handles(&self, op: Op) -> bool {
        !self.chains[op.index()].is_empty()
    }

    /// Runs `content` through the plugins for its operation, in order, and
    /// returns the content as the last one left it.
    pub async fn call<C: Content>(&self, mut content: C) -> Result<C, PluginError> {
        for plugin in &self.chains[C::OP.index()] {
            content = self.one(plugin, content).await?;
        }
        Ok(content)
    }

    /// Tells every plugin for `content`'s operation, each the content as
    /// frps made it, whatever the others answered (frp's way with
    /// `CloseProxy`: one plugin down, or rejecting, must not keep the
    /// others from hearing of it). Failures are logged.
    pub async fn notify<C: Content + Clone>(&self, content: C) {
        for plugin in &self.chains[C::OP.index()] {
            let _ = self.one(plugin, content.clone()).await;
        }
    }

    /// Whether a line of `op`'s `kind` (0 failures, 1 rejections) is
    /// logged at its own level now, rather than at debug.
    fn may_log(&self, op: Op, kind: usize) -> bool {
        self.lines[op.index()][kind].admit()
    }

    /// `content` through one plugin.
    async fn one<C: Content>(&self, plugin: &PluginSpec, content: C) -> Result<C, PluginError> {
        let fail = |cause: CallError| {
            // A fault may quote the plugin's answer (serde's errors quote
            // the value): bounded and without control characters.
            let cause = match cause {
                CallError::Invalid(text) => CallError::Invalid(tame(&text)),
                CallError::Http(text) => CallError::Http(tame(&text)),
                CallError::Redirect(status, to) => CallError::Redirect(status, tame(&to)),
                cause => cause,
            };
            if self.may_log(C::OP, 0) {
                warn!(plugin = %plugin.name, addr = %plugin.addr, op = %C::OP, "server plugin failed: {cause}");
            } else {
                debug!(plugin = %plugin.name, addr = %plugin.addr, op = %C::OP, "server plugin failed: {cause}");
            }
            PluginError::Failed {
                plugin: plugin.name.clone(),
                op: C::OP,
                cause,
            }
        };
        match self.ask(plugin, &content).await.map_err(fail)? {
            Verdict::Unchanged => Ok(content),
            Verdict::Replaced(mut value) => {
                if let Ok(sent) = serde_json::to_value(&content) {
                    content::go_names(&mut value, &sent);
                }
                serde_json::from_value(value).map_err(|e| {
                    fail(CallError::Invalid(format!(
                        "modified content does not fit {}: {e}",
                        C::OP
                    )))
                })
            }
            Verdict::Reject(reason) => {
                let reason = if reason.trim().is_empty() {
                    format!("rejected by server plugin '{}'", plugin.name)
                } else {
                    tame(&reason)
                };
                if self.may_log(C::OP, 1) {
                    info!(plugin = %plugin.name, op = %C::OP, "server plugin rejected the operation: {reason}");
                } else {
                    debug!(plugin = %plugin.name, op = %C::OP, "server plugin rejected the operation: {reason}");
                }
                Err(PluginError::Rejected {
                    plugin: plugin.name.clone(),
                    reason,
                })
            }
        }
    }

    /// One call to one plugin, within the timeout.
    async fn ask<C: Content>(
        &self,
        plugin: &PluginSpec,
        content: &C,
    ) -> Result<Verdict, CallError> {
        let body = serde_json::to_vec(&Call {
            version: API_VERSION,
            op: C::OP.as_str(),
            content,
        })
        .map_err(|e| CallError::Invalid(format!("cannot encode the content: {e}")))?;
        let reqid = uuid::Uuid::new_v4().simple().to_string();
        let target = format!("{}?version={API_VERSION}&op={}", plugin.path, C::OP);
        debug!(plugin = %plugin.name, op = %C::OP, %reqid, "calling server plugin");
        let pool = self
            .pools
            .get(&plugin.addr)
            .expect("every plugin's address has a pool");
        // One deadline for the whole call: a wait for a turn leaves the
        // connection attempts less time, and they share what is left (each
        // address but the last held to its share), not the full timeout
        // that would outlast the call, leaving the next address untried.
        let deadline = tokio::time::Instant::now() + self.timeout;
        let answer = tokio::time::timeout_at(deadline, async {
            // Per-request calls take turns; logins and proxies take turns
            // of their own, never waiting for them. A heartbeat's `Ping`
            // waits for no turn (each box makes one at a time): one failing
            // at its timeout behind a fleet's reconnections would
            // disconnect a healthy box, adding to them.
            let _turn = match C::OP {
                op if op.per_request() => Some(pool.turn().await),
                Op::Ping => None,
                _ => Some(pool.control_turn().await),
            };
            client::post(
                pool,
                &plugin.addr,
                &target,
                &reqid,
                plugin.authorization.as_ref(),
                body,
                deadline,
            )
            .await
        })
        .await
        .map_err(|_| CallError::Timeout(self.timeout))??;
        client::verdict(&answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_names_round_trip_and_unknown_ones_are_listed() {
        for op in Op::ALL {
            assert_eq!(op.as_str().parse::<Op>().unwrap(), op);
        }
        let err = "login".parse::<Op>().unwrap_err();
        assert!(err.contains("Login, NewProxy, CloseProxy, Ping, NewWorkConn, NewUserConn"));
    }

    #[test]
    fn specs_are_checked_and_normalised() {
        let p = PluginSpec::new(
            " m ",
            "http://127.0.0.1:9000/",
            "handler",
            &["Login", " Ping", "Login"],
        )
        .unwrap();
        assert_eq!(p.name, "m");
        assert_eq!(p.addr, "127.0.0.1:9000");
        assert_eq!(p.path, "/handler");
        assert_eq!(p.ops, [Op::Login, Op::Ping]);
        assert_eq!(p.authorization, None);
        let guarded = PluginSpec::new("g", "user:pw@h:1", "/", &["Ping"]).unwrap();
        assert_eq!(guarded.addr, "h:1");
        // base64("user:pw")
        assert_eq!(
            guarded.authorization.as_ref().unwrap(),
            "Basic dXNlcjpwdw=="
        );
        assert!(!format!("{guarded:?}").contains("dXNlcjpwdw"));
        assert_eq!(
            PluginSpec::new("g", "user@h:1", "/", &["Ping"])
                .unwrap()
                .authorization
                .unwrap(),
            "Basic dXNlcjo=",
            "a user without a password"
        );
        assert_eq!(
            PluginSpec::new("m", "h:1", "", &["Ping"]).unwrap().path,
            "/"
        );
        for (addr, path, ops) in [
            ("https://h:1", "/", &["Login"][..]),
            ("", "/", &["Login"]),
            ("127.0.0.1", "/", &["Login"]),
            ("h:1", "/a?b", &["Login"]),
            ("h:1", "/", &[]),
            ("h:1", "/", &["Nope"]),
            ("user:pw@", "/", &["Login"]),
            ("user:%ff@h:1", "/", &["Login"]),
        ] {
            assert!(
                PluginSpec::new("m", addr, path, ops).is_err(),
                "{addr} {path} {ops:?}"
            );
        }
    }

    #[test]
    fn an_operation_frps_never_calls_is_taken_and_said() {
        let spec = PluginSpec::new(
            "m",
            "h:1",
            "/",
            &["NewUserConn", "CloseUserConn", "CloseUserConn"],
        )
        .unwrap();
        assert_eq!(spec.ops, [Op::NewUserConn]);
        assert_eq!(
            spec.unused,
            ["the operation CloseUserConn (frps never makes that call)"]
        );
        // A plugin for it alone (an audit log's) starts too, and is never
        // asked.
        let spec = PluginSpec::new("m", "h:1", "/", &["CloseUserConn"]).unwrap();
        assert!(spec.ops.is_empty());
        assert_eq!(spec.unused.len(), 1);
    }

    /// `NewWorkConn` plugins that together may outlast the wait for a data
    /// connection are said at start.
    #[test]
    fn work_conn_plugins_slower_than_the_connect_timeout_are_warned_of() {
        let spec =
            |name: &str| PluginSpec::new(name, "127.0.0.1:1", "/", &["NewWorkConn"]).unwrap();
        let (_, quiet) = common::testing::logged(|| {
            Plugins::new(
                &[spec("a")],
                Duration::from_secs(3),
                Duration::from_secs(10),
            )
        });
        assert!(!quiet.contains("WARN"), "{quiet}");
        let (_, warned) = common::testing::logged(|| {
            Plugins::new(
                &[spec("a"), spec("b"), spec("c"), spec("d")],
                Duration::from_secs(3),
                Duration::from_secs(10),
            )
        });
        assert!(
            warned.contains("4 server plugin(s) for NewWorkConn")
                && warned.contains("raise --connect-timeout"),
            "{warned}"
        );
    }

    /// A burst of control-plane calls (a fleet reconnecting) has at most
    /// MAX_CONTROL_CALLS under way at once; every call is made. Pings are
    /// not held back.
    #[tokio::test]
    async fn a_burst_of_control_calls_takes_turns() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let now = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        // When set, each call is held until that many are under way (5 s
        // at most); else for 200 ms.
        let gather = Arc::new(AtomicUsize::new(0));
        let (n, m, g) = (now.clone(), most.clone(), gather.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (now, most, gather) = (n.clone(), m.clone(), g.clone());
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        // One request: its head, then its announced body.
                        let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => got.extend_from_slice(&buf[..k]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .split("content-length:")
                            .nth(1)
                            .and_then(|r| r.lines().next()?.trim().parse().ok())
                            .unwrap_or(0);
                        while got.len() < end + 4 + len {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => got.extend_from_slice(&buf[..k]),
                            }
                        }
                        got.drain(..end + 4 + len);
                        let at_once = now.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(at_once, Ordering::SeqCst);
                        match gather.load(Ordering::SeqCst) {
                            0 => tokio::time::sleep(Duration::from_millis(200)).await,
                            all => {
                                let until = tokio::time::Instant::now() + Duration::from_secs(5);
                                while most.load(Ordering::SeqCst) < all
                                    && tokio::time::Instant::now() < until
                                {
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                }
                            }
                        }
                        now.fetch_sub(1, Ordering::SeqCst);
                        let body = r#"{"reject":false,"unchange":true}"#;
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let spec =
            PluginSpec::new("manager", &addr.to_string(), "/", &["CloseProxy", "Ping"]).unwrap();
        let plugins = Arc::new(Plugins::new(
            &[spec],
            Duration::from_secs(30),
            Duration::from_secs(60),
        ));
        let burst = client::MAX_CONTROL_CALLS + 44;
        let calls = (0..burst).map(|_| {
            let plugins = plugins.clone();
            tokio::spawn(async move {
                plugins
                    .call(content::CloseProxyContent::default())
                    .await
                    .map(drop)
            })
        });
        for call in futures_util::future::join_all(calls).await {
            assert!(call.unwrap().is_ok());
        }
        let at_once = most.swap(0, Ordering::SeqCst);
        assert!(
            at_once <= client::MAX_CONTROL_CALLS && at_once > client::MAX_CALLS,
            "{at_once} at once"
        );
        // Heartbeats' pings wait for no turn (each box makes one at a time).
        gather.store(burst, Ordering::SeqCst);
        let calls = (0..burst).map(|_| {
            let plugins = plugins.clone();
            tokio::spawn(async move {
                plugins
                    .call(content::PingContent::default())
                    .await
                    .map(drop)
            })
        });
        for call in futures_util::future::join_all(calls).await {
            assert!(call.unwrap().is_ok());
        }
        assert_eq!(most.load(Ordering::SeqCst), burst, "every ping at once");
    }

    #[test]
    fn per_request_failures_are_logged_once_a_second() {
        // Nothing listens there: every call fails at once.
        let spec = PluginSpec::new("down", "127.0.0.1:1", "/", &["Ping"]).unwrap();
        let plugins = Plugins::new(&[spec], Duration::from_secs(3), Duration::from_secs(10));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (failed, logged) = common::testing::logged(|| {
            runtime.block_on(async {
                let mut failed = 0;
                for _ in 0..50 {
                    let content = content::PingContent::default();
                    failed += usize::from(plugins.call(content).await.is_err());
                }
                failed
            })
        });
        assert_eq!(failed, 50);
        assert_eq!(
            logged.matches("server plugin failed").count(),
            1,
            "{logged}"
        );
    }

    #[test]
    fn chains_follow_configuration_order() {
        let a = PluginSpec::new("a", "h:1", "/", &["Login", "Ping"]).unwrap();
        let b = PluginSpec::new("b", "h:2", "/", &["Login"]).unwrap();
        let plugins = Plugins::new(&[a, b], Duration::from_secs(3), Duration::from_secs(10));
        let names: Vec<&str> = plugins.chains[Op::Login.index()]
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert!(plugins.handles(Op::Ping));
        assert!(!plugins.handles(Op::NewUserConn));
        assert!(!Plugins::default().handles(Op::Login));
    }
}
