//! Command-line flags (each also readable from the environment).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use common::{parse_duration, parse_positive_duration};

use crate::plugins::PluginSpec;

/// frps: the frpx server.
#[derive(Clone, Parser)]
#[command(
    name = "frps",
    version,
    about = "frpx server: one authenticated, load-balanced endpoint for GPU boxes behind NAT"
)]
pub struct Config {
    /// Port for client control connections (0 picks a free port).
    #[arg(long, env = "FRPX_CONTROL_PORT", default_value_t = 17000)]
    pub control_port: u16,

    /// Port clients dial back for data connections (0 picks a free port).
    #[arg(long, env = "FRPX_PROXY_PORT", default_value_t = 17001)]
    pub proxy_port: u16,

    /// Port for public API consumers (0 picks a free port).
    #[arg(long, env = "FRPX_PUBLIC_PORT", default_value_t = 18080)]
    pub public_port: u16,

    /// Port for the management API (0 picks a free port).
    #[arg(long, env = "FRPX_API_PORT", default_value_t = 18081)]
    pub api_port: u16,

    /// Address the control, proxy and public listeners bind to.
    #[arg(long, env = "FRPX_BIND_ADDR", default_value = "0.0.0.0")]
    pub bind_addr: IpAddr,

    /// Address the management API binds to (loopback by default).
    #[arg(long, env = "FRPX_API_BIND", default_value = "127.0.0.1")]
    pub api_bind: IpAddr,

    /// Token every management API route but `/api/health` and the
    /// dashboard page requires (`Authorization: Bearer <token>`). Required,
    /// of at least 32 characters, when `--api-bind` is not a loopback
    /// address. Ten wrong tokens a minute from one address (a repeated one
    /// counts once; every loopback address is one address, and loopback
    /// requests naming another host in Host or Origin a second one), then
    /// 429 (a token of 32 characters or more still passes).
    #[arg(long, env = "FRPX_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Print the fleet (from a running frps's API) and exit.
    #[arg(long)]
    pub monitor: bool,

    /// With `--monitor`: redraw every 2 s until Ctrl-C.
    #[arg(long, requires = "monitor")]
    pub watch: bool,

    /// With `--monitor`: the API to read (default
    /// http://<api-bind>:<api-port>, loopback when bound to 0.0.0.0 or ::).
    #[arg(long, env = "FRPX_API_URL")]
    pub api_url: Option<String>,

    /// A static API key accepted on the public port besides the database's
    /// keys. No default (the prototype's `abc123` is just a wrong key).
    #[arg(long, env = "API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Database holding accounts, client tokens, API keys and GPU assets:
    /// `postgres://...` for PostgreSQL, `sqlite://FILE` (created on first
    /// start) for the embedded database.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://frpx.db",
        hide_env_values = true,
        global = true
    )]
    pub database_url: String,

    /// Redis shared by every frps for the key cache and revocations; `none`
    /// to run without it.
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = DEFAULT_REDIS_URL,
        hide_env_values = true,
        global = true
    )]
    pub redis_url: String,

    /// Prefix of every Redis key and channel frps uses.
    #[arg(
        long,
        env = "FRPX_REDIS_PREFIX",
        default_value = "frpx:",
        global = true
    )]
    pub redis_prefix: String,

    /// Lifetime of client tokens issued at login (`0` for no expiry; at
    /// most 100 years).
    #[arg(long, env = "FRPX_TOKEN_TTL", default_value = "30d", value_parser = parse_token_ttl)]
    pub token_ttl: Duration,

    /// How long a requested data connection may take to arrive before the
    /// request fails over (e.g. `10s`, `500ms`).
    #[arg(long, env = "FRPX_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub connect_timeout: Duration,

    /// Heartbeat interval asked of clients (100ms to 1h); a client silent
    /// for three intervals is evicted.
    #[arg(long, env = "FRPX_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = parse_heartbeat_interval)]
    pub heartbeat_interval: Duration,

    /// Deadline for each step of a connection's handshake: the TLS
    /// handshake, the login, the registration and a data hello.
    #[arg(long, env = "FRPX_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = parse_positive_duration)]
    pub handshake_timeout: Duration,

    /// Deadline for a public connection's TLS handshake and first request
    /// head, from the accept (slowloris guard); on the management API port,
    /// for every request head (an idle keep-alive connection closes after
    /// it).
    #[arg(long, env = "FRPX_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub header_timeout: Duration,

    /// After a response, a keep-alive public connection is closed unless
    /// the next request head has arrived within this (idle or mid-head);
    /// a request body that stops arriving for this long is cut (408); and a
    /// caller that makes frps wait to write its response and takes less
    /// than 16 KiB of it within this long has its connection closed (the
    /// request is cancelled).
    #[arg(long, env = "FRPX_KEEPALIVE_TIMEOUT", default_value = "60s", value_parser = parse_positive_duration)]
    pub keepalive_timeout: Duration,

    /// How long in-flight requests may run on after SIGINT/SIGTERM.
    #[arg(long, env = "FRPX_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// How to choose among eligible clients.
    #[arg(long, env = "FRPX_BALANCE", value_enum, default_value = "least-conn")]
    pub balance: crate::router::Balance,

    /// Requests that may wait per queue when every eligible client is at
    /// capacity: a model's, each pinned client's, and a model's retries'.
    #[arg(long, env = "FRPX_QUEUE_MAX", default_value_t = 100, value_parser = parse_count)]
    pub queue_max: usize,

    /// Longest a request waits for capacity before 429.
    #[arg(long, env = "FRPX_QUEUE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub queue_timeout: Duration,

    /// Length of the sliding window an API key's `rpm` limit counts over.
    /// Keep `1m` so `rpm` means requests per minute; shorter windows are for
    /// tests. Every frps sharing a Redis must use the same value.
    #[arg(long, env = "FRPX_RATE_LIMIT_WINDOW", default_value = "1m", value_parser = parse_positive_duration)]
    pub rate_limit_window: Duration,

    /// Other clients tried when one fails before any response byte was sent.
    #[arg(long, env = "FRPX_MAX_RETRIES", default_value_t = 2, value_parser = parse_count)]
    pub max_retries: usize,

    /// Largest request body read to find the model (bytes); larger bodies get 413.
    #[arg(long, env = "FRPX_MAX_BODY", default_value_t = 10 * 1024 * 1024)]
    pub max_body: usize,

    /// Most bytes of request bodies frps holds in memory at once, over all
    /// callers (bodies it reads whole: to route on the model, and small ones
    /// it can retry); past that a request gets 503 `server_busy` rather than
    /// frps running out of memory.
    #[arg(long, env = "FRPX_MAX_BUFFERED_BODIES", default_value_t = 256 * 1024 * 1024, value_parser = parse_body_budget)]
    pub max_buffered_bodies: usize,

    /// Longest a body frps reads whole may take to arrive, in all (each piece
    /// is also due within `--keepalive-timeout`); 408 after it.
    #[arg(long, env = "FRPX_BODY_TIMEOUT", default_value = "60s", value_parser = parse_positive_duration)]
    pub body_timeout: Duration,

    /// Longest a body frps streams to the service instead of reading it
    /// whole (over 64 KiB or of unknown length, on a path that is not a
    /// model path: uploads) may keep frps waiting for the caller's pieces,
    /// added up (each piece is also due within `--keepalive-timeout`; the
    /// service's time taking them does not count); 408 before the answer,
    /// the response cut after. It bounds how long a trickling upload holds
    /// the box's capacity and a data connection.
    #[arg(long, env = "FRPX_UPLOAD_TIMEOUT", default_value = "10m", value_parser = parse_positive_duration)]
    pub upload_timeout: Duration,

    /// Longest silence from a client's service, waiting for response headers
    /// (from the end of the request body) or between body chunks, before
    /// the request is failed.
    #[arg(long, env = "FRPX_UPSTREAM_IDLE_TIMEOUT", default_value = "10m", value_parser = parse_positive_duration)]
    pub upstream_idle_timeout: Duration,

    /// Certificate chain (PEM) for TLS on the control and proxy ports.
    #[arg(long, env = "FRPX_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of `--tls-cert`.
    #[arg(long, env = "FRPX_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// TLS on the control and proxy ports with a self-signed certificate,
    /// generated on first start and reused; its SHA-256 fingerprint is logged
    /// at start for frpc's `--tls-fingerprint`. Cannot be used with
    /// `--tls-cert` (checked at start, not by clap, which would count
    /// `FRPX_TLS_SELF_SIGNED=false` as the flag given).
    #[arg(long, env = "FRPX_TLS_SELF_SIGNED")]
    pub tls_self_signed: bool,

    /// Directory of the self-signed certificate (`frps-tls.pem`,
    /// `frps-tls.key`). Default: beside the SQLite database, else the
    /// working directory.
    #[arg(long, env = "FRPX_TLS_DIR", value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,

    /// Certificate chain (PEM) for TLS on the public port (when no reverse
    /// proxy terminates TLS in front of frps).
    #[arg(long, env = "FRPX_PUBLIC_TLS_CERT", requires = "public_tls_key")]
    pub public_tls_cert: Option<PathBuf>,

    /// Private key (PEM) of `--public-tls-cert`.
    #[arg(long, env = "FRPX_PUBLIC_TLS_KEY", requires = "public_tls_cert")]
    pub public_tls_key: Option<PathBuf>,

    /// Most open connections per listener (public, control, proxy,
    /// management API); more are answered 503 (public) or closed at once.
    /// On the proxy port a connection counts until its hello is accepted
    /// (a paired dial-back is then held by its client's own caps).
    #[arg(long, env = "FRPX_MAX_CONNECTIONS", default_value_t = 20_000, value_parser = parse_at_least_one)]
    pub max_connections: usize,

    /// Most client ids one account may hold (each is bound to it at its
    /// first registration, for good: `frps client release` frees one); a
    /// registration of a further one is refused.
    #[arg(long, env = "FRPX_MAX_CLIENT_IDS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=MAX_COUNT as i64))]
    pub max_client_ids: u32,

    /// Most open connections per listener from one source address.
    #[arg(long, env = "FRPX_MAX_CONNECTIONS_PER_IP", default_value_t = 512, value_parser = parse_at_least_one)]
    pub max_connections_per_ip: usize,

    /// Key lookups that find no valid key allowed per caller address (an
    /// IPv6 /64 counts as one) per minute, refilled evenly; past that, keys
    /// frps has not cached (valid ones too) are refused (429
    /// `too_many_invalid_keys`) without asking Redis or the database until
    /// the budget refills. Valid keys are not counted.
    #[arg(long, env = "FRPX_KEY_FAILURES_PER_MINUTE", default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=MAX_COUNT as i64))]
    pub key_failures_per_minute: u32,

    /// Key lookups (of keys frps has not cached) one caller address (an
    /// IPv6 /64) may have under way at once; further ones wait their turn,
    /// up to 5 s, then get 503 `auth_unavailable`. Bounds the database
    /// connections one address can hold while the database is slow.
    #[arg(long, env = "FRPX_KEY_LOOKUPS_PER_IP", default_value_t = crate::limits::LOOKUPS_PER_ADDRESS, value_parser = parse_at_least_one)]
    pub key_lookups_per_ip: usize,

    /// Most dial-backs one client may have outstanding; more fail over at once.
    #[arg(long, env = "FRPX_MAX_PENDING_PER_CLIENT", default_value_t = 512, value_parser = parse_at_least_one)]
    pub max_pending_per_client: usize,

    /// Largest public request head (request line and headers), bytes.
    #[arg(long, env = "FRPX_MAX_HEAD_BYTES", default_value_t = 64 * 1024)]
    pub max_head_bytes: usize,

    /// Most idle upstream connections kept per client for reuse. The pool
    /// holds what recent load needed (connections used at once), up to this.
    #[arg(long, env = "FRPX_MAX_IDLE_PER_CLIENT", default_value_t = 256, value_parser = parse_count)]
    pub max_idle_per_client: usize,

    /// An idle upstream connection unused this long is closed, so the pool
    /// shrinks back after a burst.
    #[arg(long, env = "FRPX_POOL_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub pool_idle_timeout: Duration,

    /// Idle upstream connections each client keeps once a burst of load has
    /// ended (frps's open public connections fell to half their peak): the
    /// surplus is closed at once and its memory handed back; the rest wait
    /// for `--pool-idle-timeout`.
    #[arg(long, env = "FRPX_POOL_IDLE_AFTER_BURST", default_value_t = 4, value_parser = parse_count)]
    pub pool_idle_after_burst: usize,

    /// Offer each client one multiplexed tunnel connection (frpc dials it
    /// once after registering) and open upstream connections as streams on
    /// it, where otherwise each one is a dial-back of its own (a command, a
    /// new TCP connection, a round trip). Off by default: on loopback it
    /// did not beat dial-backs (bench/README.md). Clients that do not take
    /// the offer are served with dial-backs either way.
    #[arg(long, env = "FRPX_TUNNEL_MUX", default_value_t = false, action = clap::ArgAction::Set)]
    pub tunnel_mux: bool,

    /// Request paths the public port forwards to clients' services
    /// (comma-separated): `/exact/path`, `/prefix/*`, or `*` for every
    /// path. The default lets callers use the models (OpenAI's `/v1/*`,
    /// Ollama's inference and read-only calls) but not manage the boxes
    /// (Ollama's /api/delete, /api/pull, /api/create...): those get 403
    /// `path_not_allowed`.
    #[arg(long, env = "FRPX_FORWARD_PATHS", value_delimiter = ',', default_value = crate::paths::DEFAULT_FORWARD_PATHS, value_parser = crate::paths::PathRule::parse)]
    pub forward_paths: Vec<crate::paths::PathRule>,

    /// Deadline for each call to a server plugin; a plugin that does not
    /// answer in time fails the operation (`docs/server-plugin.md`).
    #[arg(long, env = "FRPX_PLUGIN_TIMEOUT", default_value = "3s", value_parser = parse_positive_duration)]
    pub plugin_timeout: Duration,

    /// Log filter (e.g. `info`, `frps=debug`); `RUST_LOG` takes precedence.
    #[arg(long, env = "FRPX_LOG", default_value = "info", value_parser = common::telemetry::parse_filter)]
    pub log: String,

    /// Configuration file: frp's INI form (`frps.ini`: `[common]` with these
    /// settings in snake_case, `[plugin.NAME]` sections) or its TOML form
    /// (`*.toml`, with `[[httpPlugins]]`). Flags and the environment override it.
    #[arg(
        short = 'c',
        long = "config",
        env = "FRPX_CONFIG",
        value_name = "FILE",
        global = true
    )]
    pub config_file: Option<PathBuf>,

    /// Server plugins, from the configuration file, in its order.
    #[arg(skip)]
    pub plugins: Vec<PluginSpec>,
}

/// Shortest `--heartbeat-interval`: frpc never heartbeats more often, and
/// shorter intervals would evict clients that are merely busy.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
/// Longest `--heartbeat-interval`: a dead client is noticed within three.
pub const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3600);
/// Longest `--token-ttl` (100 years; `0` means no expiry).
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(100 * 365 * 86400);

/// `--heartbeat-interval`: a duration from [`MIN_HEARTBEAT_INTERVAL`] to
/// [`MAX_HEARTBEAT_INTERVAL`].
fn parse_heartbeat_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if (MIN_HEARTBEAT_INTERVAL..=MAX_HEARTBEAT_INTERVAL).contains(&d) {
        Ok(d)
    } else {
        Err(format!(
            "--heartbeat-interval must be from 100ms to 1h (got `{}`)",
            s.trim()
        ))
    }
}

/// Where frps looks for Redis unless told otherwise.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// Most a count setting may be: far past any real need, and far below
/// what a semaphore takes or what adding a few to it would overflow.
pub const MAX_COUNT: usize = 1 << 30;

/// A count of one or more (zero would refuse everything it counts).
fn parse_at_least_one(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_COUNT).contains(&n) => Ok(n),
        _ => Err(format!(
            "must be a whole number from 1 to {MAX_COUNT} (got `{}`)",
            s.trim()
        )),
    }
}

/// A count of zero or more (zero has a meaning: no retry, no queue).
fn parse_count(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n <= MAX_COUNT => Ok(n),
        _ => Err(format!(
            "must be a whole number from 0 to {MAX_COUNT} (got `{}`)",
            s.trim()
        )),
    }
}

/// `--max-buffered-bodies`: bytes, from one to 4 GiB − 1 (a body's share
/// of it is taken in pieces of up to that).
fn parse_body_budget(s: &str) -> Result<usize, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if n > 0 => Ok(n as usize),
        _ => Err(format!(
            "--max-buffered-bodies must be a number of bytes from 1 to 4294967295 (got `{}`)",
            s.trim()
        )),
    }
}

/// Shortest `--token-ttl` but `0`: a session's token is checked four
/// times per lifetime at most every 100 ms (`token_check_period`), and a
/// lifetime shorter than a login takes would end every session at once.
pub const MIN_TOKEN_TTL: Duration = Duration::from_secs(1);

/// `--token-ttl`: `0` (no expiry) or a duration from [`MIN_TOKEN_TTL`] up
/// to [`MAX_TOKEN_TTL`].
fn parse_token_ttl(s: &str) -> Result<Duration, String> {
    match common::parse_duration_checked(s) {
        Ok(d) if d > Duration::ZERO && d < MIN_TOKEN_TTL => Err(format!(
            "--token-ttl must be at least 1s, or 0 for no expiry (got `{}`)",
            s.trim()
        )),
        Ok(d) if d <= MAX_TOKEN_TTL => Ok(d),
        // Not a duration at all: that error says why.
        Err(common::duration::Refused::Invalid(e)) => Err(e),
        // Too long for a token (or for any duration, which stops at the
        // same 100 years).
        _ => Err(format!(
            "--token-ttl must be at most 100 years, e.g. 36500d, or 0 for no expiry (got `{}`)",
            s.trim()
        )),
    }
}

/// Shown without its secrets (the admin token, the static key, a
/// password in the database, Redis or API address): `State`'s `Debug`
/// holds it, and a debug print must never put them in a log.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Every field named (no `..`): a new one must be placed here,
        // shown or hidden, or this does not compile.
        let Config {
            control_port,
            proxy_port,
            public_port,
            api_port,
            bind_addr,
            api_bind,
            admin_token,
            monitor,
            watch,
            api_url,
            api_key,
            database_url,
            redis_url,
            redis_prefix,
            token_ttl,
            connect_timeout,
            heartbeat_interval,
            handshake_timeout,
            header_timeout,
            keepalive_timeout,
            shutdown_timeout,
            balance,
            queue_max,
            queue_timeout,
            rate_limit_window,
            max_retries,
            max_body,
            max_buffered_bodies,
            body_timeout,
            upload_timeout,
            upstream_idle_timeout,
            tls_cert,
            tls_key,
            tls_self_signed,
            tls_dir,
            public_tls_cert,
            public_tls_key,
            max_connections,
            max_client_ids,
            max_connections_per_ip,
            key_failures_per_minute,
            key_lookups_per_ip,
            max_pending_per_client,
            max_head_bytes,
            max_idle_per_client,
            pool_idle_timeout,
            pool_idle_after_burst,
            tunnel_mux,
            forward_paths,
            plugin_timeout,
            log,
            config_file,
            plugins,
        } = self;
        f.debug_struct("Config")
            .field("control_port", control_port)
            .field("proxy_port", proxy_port)
            .field("public_port", public_port)
            .field("api_port", api_port)
            .field("bind_addr", bind_addr)
            .field("api_bind", api_bind)
            .field("admin_token", &admin_token.as_ref().map(|_| "***"))
            .field("monitor", monitor)
            .field("watch", watch)
            .field("api_url", &api_url.as_deref().map(crate::store::redact))
            .field("api_key", &api_key.as_ref().map(|_| "***"))
            .field("database_url", &crate::store::redact(database_url))
            .field("redis_url", &crate::store::redact(redis_url))
            .field("redis_prefix", redis_prefix)
            .field("token_ttl", token_ttl)
            .field("connect_timeout", connect_timeout)
            .field("heartbeat_interval", heartbeat_interval)
            .field("handshake_timeout", handshake_timeout)
            .field("header_timeout", header_timeout)
            .field("keepalive_timeout", keepalive_timeout)
            .field("shutdown_timeout", shutdown_timeout)
            .field("balance", balance)
            .field("queue_max", queue_max)
            .field("queue_timeout", queue_timeout)
            .field("rate_limit_window", rate_limit_window)
            .field("max_retries", max_retries)
            .field("max_body", max_body)
            .field("max_buffered_bodies", max_buffered_bodies)
            .field("body_timeout", body_timeout)
            .field("upload_timeout", upload_timeout)
            .field("upstream_idle_timeout", upstream_idle_timeout)
            .field("tls_cert", tls_cert)
            .field("tls_key", tls_key)
            .field("tls_self_signed", tls_self_signed)
            .field("tls_dir", tls_dir)
            .field("public_tls_cert", public_tls_cert)
            .field("public_tls_key", public_tls_key)
            .field("max_connections", max_connections)
            .field("max_client_ids", max_client_ids)
            .field("max_connections_per_ip", max_connections_per_ip)
            .field("key_failures_per_minute", key_failures_per_minute)
            .field("key_lookups_per_ip", key_lookups_per_ip)
            .field("max_pending_per_client", max_pending_per_client)
            .field("max_head_bytes", max_head_bytes)
            .field("max_idle_per_client", max_idle_per_client)
            .field("pool_idle_timeout", pool_idle_timeout)
            .field("pool_idle_after_burst", pool_idle_after_burst)
            .field("tunnel_mux", tunnel_mux)
            .field("forward_paths", forward_paths)
            .field("plugin_timeout", plugin_timeout)
            .field("log", log)
            .field("config_file", config_file)
            .field("plugins", plugins)
            .finish()
    }
}

impl Config {
    /// A configuration for tests and embedding: every port 0 on loopback,
    /// the given static key, the given database, no Redis.
    pub fn ephemeral(api_key: &str, database_url: &str) -> Self {
        let mut cfg = Config::parse_from(["frps"]);
        let lo: IpAddr = [127, 0, 0, 1].into();
        cfg.bind_addr = lo;
        cfg.api_bind = lo;
        cfg.control_port = 0;
        cfg.proxy_port = 0;
        cfg.public_port = 0;
        cfg.api_port = 0;
        cfg.api_key = Some(api_key.to_owned());
        cfg.database_url = database_url.to_owned();
        cfg.redis_url = "none".into();
        cfg
    }

    /// The Redis URL, unless Redis is disabled (`none`). A blank one (a
    /// `REDIS_URL=` left empty by a compose file) is the default, as for
    /// every other blank variable: Redis is turned off by `none` alone.
    pub fn redis(&self) -> Option<&str> {
        match self.redis_url.trim() {
            "none" => None,
            "" => Some(DEFAULT_REDIS_URL),
            url => Some(url),
        }
    }

    /// The admin token, unless empty.
    pub fn admin_token(&self) -> Option<&str> {
        self.admin_token.as_deref().filter(|t| !t.is_empty())
    }

    /// Token lifetime, `None` for no expiry.
    pub fn token_lifetime(&self) -> Option<Duration> {
        (!self.token_ttl.is_zero()).then_some(self.token_ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_no_secret() {
        let cfg = Config::parse_from([
            "frps",
            "--admin-token",
            "admin-secret-0123456789",
            "--api-key",
            "static-key-secret",
            "--database-url",
            "postgres://frpx:db-secret@db.example/frpx",
            "--redis-url",
            "redis://:redis-secret@cache.example:6379",
            "--api-url",
            "http://ops:api-secret@127.0.0.1:18081",
        ]);
        let shown = format!("{cfg:?}");
        for secret in [
            "admin-secret",
            "static-key-secret",
            "db-secret",
            "redis-secret",
            "api-secret",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        // What is not secret is still there to read.
        assert!(
            shown.contains("postgres://frpx:***@db.example/frpx"),
            "{shown}"
        );
        assert!(shown.contains("admin_token: Some(\"***\")"), "{shown}");
        assert!(shown.contains("heartbeat_interval: 10s"), "{shown}");
    }

    #[test]
    fn defaults_match_the_seed_and_have_no_static_key() {
        // Read off the flags' definitions, not a parse: the environment
        // of whoever runs the tests (API_KEY, DATABASE_URL, FRPX_*) must
        // not decide what this test sees.
        use clap::CommandFactory;
        let command = Config::command();
        let default = |id: &str| -> Option<String> {
            let arg = command
                .get_arguments()
                .find(|a| a.get_id() == id)
                .unwrap_or_else(|| panic!("no flag {id}"));
            let values = arg.get_default_values();
            (!values.is_empty()).then(|| values[0].to_string_lossy().into_owned())
        };
        for (id, port) in [
            ("control_port", "17000"),
            ("proxy_port", "17001"),
            ("public_port", "18080"),
            ("api_port", "18081"),
        ] {
            assert_eq!(default(id).as_deref(), Some(port), "{id}");
        }
        // The seed defaulted to `abc123`; frpx has no default key.
        assert_eq!(default("api_key"), None);
        assert_eq!(default("api_bind").as_deref(), Some("127.0.0.1"));
        assert_eq!(default("connect_timeout").as_deref(), Some("10s"));
        assert_eq!(default("database_url").as_deref(), Some("sqlite://frpx.db"));
        assert_eq!(default("token_ttl").as_deref(), Some("30d"));
        // And they parse to what they say.
        let cfg = Config::parse_from(["frps", "--token-ttl", "30d"]);
        assert_eq!(cfg.token_lifetime(), Some(Duration::from_secs(30 * 86400)));
    }

    fn parse_error(flags: &[&str]) -> String {
        let args = ["frps"].iter().chain(flags);
        match Config::try_parse_from(args) {
            Ok(_) => panic!("{flags:?} accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn deadlines_of_zero_are_refused() {
        // Each would fail every connection, request or call at once.
        for flag in [
            "--connect-timeout",
            "--handshake-timeout",
            "--header-timeout",
            "--keepalive-timeout",
            "--rate-limit-window",
            "--upstream-idle-timeout",
            "--plugin-timeout",
            "--body-timeout",
            "--upload-timeout",
        ] {
            let e = parse_error(&[flag, "0s"]);
            assert!(e.contains("is zero"), "{flag}: {e}");
        }
        for flag in [
            "--max-pending-per-client",
            "--max-connections",
            "--max-connections-per-ip",
            "--key-lookups-per-ip",
        ] {
            let e = parse_error(&[flag, "0"]);
            assert!(e.contains("from 1 to"), "{flag}: {e}");
        }
        // Zero is meaningful here: no drain at shutdown, no queueing.
        let cfg =
            Config::try_parse_from(["frps", "--shutdown-timeout", "0", "--queue-timeout", "0"])
                .unwrap();
        assert!(cfg.shutdown_timeout.is_zero() && cfg.queue_timeout.is_zero());
    }

    #[test]
    fn a_log_filter_that_is_none_is_refused_at_start() {
        let e = parse_error(&["--log", "frps=loud"]);
        assert!(e.contains("not a log filter"), "{e}");
        let cfg = Config::try_parse_from(["frps", "--log", "frps=debug,hyper=warn"]).unwrap();
        assert_eq!(cfg.log, "frps=debug,hyper=warn");
    }

    #[test]
    fn only_none_turns_redis_off() {
        let with = |url: &str| Config::try_parse_from(["frps", "--redis-url", url]).unwrap();
        assert_eq!(with("none").redis(), None);
        assert_eq!(with(" none ").redis(), None);
        assert_eq!(with("").redis(), Some(DEFAULT_REDIS_URL));
        assert_eq!(with("  ").redis(), Some(DEFAULT_REDIS_URL));
        assert_eq!(with("redis://r:6380").redis(), Some("redis://r:6380"));
    }

    #[test]
    fn counts_past_any_use_are_refused() {
        // A semaphore of that many permits panics (under its lock, so
        // every later key lookup would too); a retry count that large
        // overflows when the busy clients skipped are added to it.
        let huge = "4611686018427387904";
        for flag in [
            "--max-pending-per-client",
            "--max-connections",
            "--max-connections-per-ip",
            "--key-lookups-per-ip",
            "--max-retries",
            "--queue-max",
            "--max-idle-per-client",
            "--pool-idle-after-burst",
        ] {
            let e = parse_error(&[flag, huge]);
            assert!(e.contains(&format!("to {MAX_COUNT}")), "{flag}: {e}");
        }
        let cfg = Config::try_parse_from(["frps", "--key-lookups-per-ip", "1073741824"]).unwrap();
        assert_eq!(cfg.key_lookups_per_ip, MAX_COUNT);
        let cfg = Config::try_parse_from(["frps", "--max-retries", "0"]).unwrap();
        assert_eq!(cfg.max_retries, 0);
        // The two counts kept in 32 bits: the same cap, said as clap says it.
        for flag in ["--max-client-ids", "--key-failures-per-minute"] {
            let e = parse_error(&[flag, "1073741825"]);
            assert!(e.contains("1073741825"), "{flag}: {e}");
            let ok = Config::try_parse_from(["frps", flag, "1073741824"]);
            assert!(ok.is_ok(), "{flag}");
        }
    }

    #[test]
    fn heartbeat_intervals_out_of_range_are_refused() {
        for bad in ["0", "99ms", "3601s", "2h", "36500d"] {
            let e = parse_error(&["--heartbeat-interval", bad]);
            assert!(
                e.contains("--heartbeat-interval must be from 100ms to 1h"),
                "{bad}: {e}"
            );
        }
        // Past any duration's 100 years: refused as too long.
        let e = parse_error(&["--heartbeat-interval", "100000000d"]);
        assert!(e.contains("too long"), "{e}");
        for (good, want) in [("100ms", 100), ("10s", 10_000), ("1h", 3_600_000)] {
            let cfg = Config::try_parse_from(["frps", "--heartbeat-interval", good]).unwrap();
            assert_eq!(
                cfg.heartbeat_interval,
                Duration::from_millis(want),
                "{good}"
            );
        }
    }

    #[test]
    fn token_lifetimes_beyond_100_years_are_refused() {
        for bad in ["36501d", "1000000000d", "18446744073709551615"] {
            let e = parse_error(&["--token-ttl", bad]);
            assert!(
                e.contains("--token-ttl must be at most 100 years"),
                "{bad}: {e}"
            );
        }
        // Not a duration: said so, whatever the text reads like.
        for bad in ["too long", "30x"] {
            let e = parse_error(&["--token-ttl", bad]);
            assert!(!e.contains("at most 100 years"), "{bad}: {e}");
        }
        let cfg = Config::try_parse_from(["frps", "--token-ttl", "36500d"]).unwrap();
        assert_eq!(cfg.token_lifetime(), Some(MAX_TOKEN_TTL));
        let cfg = Config::try_parse_from(["frps", "--token-ttl", "0"]).unwrap();
        assert_eq!(cfg.token_lifetime(), None, "0 is no expiry");
        // Under a second a session could not renew its token in time.
        for bad in ["999ms", "1ms", "500ms"] {
            let e = parse_error(&["--token-ttl", bad]);
            assert!(e.contains("--token-ttl must be at least 1s"), "{bad}: {e}");
        }
        let cfg = Config::try_parse_from(["frps", "--token-ttl", "1s"]).unwrap();
        assert_eq!(cfg.token_lifetime(), Some(MIN_TOKEN_TTL));
    }
}
