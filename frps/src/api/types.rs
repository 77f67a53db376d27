//! What the management API returns (inside the envelope's `data`).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use common::{ModelInfo, SystemInfo};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::registry::ClientHandle;

/// `/api/health`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok` or `shutting_down`.
    pub status: String,
    /// frps version.
    pub version: String,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Registered clients.
    pub clients_online: usize,
    /// Dial-backs requested and not yet arrived.
    pub pending_connections: usize,
    /// `postgres` or `sqlite`.
    pub database: String,
    /// Whether Redis is configured and reachable (null when not configured).
    pub redis: Option<bool>,
}

/// One client, as listed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClientSummary {
    /// Client id.
    pub id: String,
    /// `online`; `unhealthy` when its local service does not answer;
    /// `cooling_down` while frps skips it after failed requests.
    pub status: String,
    /// Seconds left of its cool-down after failed requests (null: none).
    pub cooling_down_secs: Option<f64>,
    /// Requests that failed on it since its last success.
    pub failures: u32,
    /// Machine id.
    pub machine_id: String,
    /// Host name.
    pub hostname: String,
    /// Operating system.
    pub os: String,
    /// CPU architecture.
    pub arch: String,
    /// frpc version.
    pub version: String,
    /// Address of its control connection.
    pub remote_addr: String,
    /// Account that logged it in.
    pub owner: String,
    /// Registration time (RFC 3339).
    pub connected_at: String,
    /// Seconds since it was last heard from.
    pub last_heartbeat_secs_ago: f64,
    /// Requests being served.
    pub in_flight: usize,
    /// Requests served since registration.
    pub requests: u64,
    /// Models its service reports.
    pub models: Vec<String>,
    /// Metadata it announced; values of keys that look secret (holding, in
    /// any letter case, `token`, `secret`, `pass`, `pwd`, `key`, `auth`,
    /// `credential`, `cookie` or `private`), and values carrying a URL's
    /// user information, read `***`.
    pub metas: BTreeMap<String, String>,
}

impl ClientSummary {
    /// Summarises a live client.
    pub fn of(c: &ClientHandle) -> Self {
        Self {
            id: c.id.clone(),
            status: status(c).into(),
            cooling_down_secs: cooling_down_secs(c),
            failures: c.failures(),
            machine_id: c.registration.machine_id.clone(),
            hostname: c.registration.hostname.clone(),
            os: c.registration.os.clone(),
            arch: c.registration.arch.clone(),
            version: c.registration.version.clone(),
            remote_addr: c.remote_addr.to_string(),
            owner: c.owner.email.clone(),
            connected_at: c.connected_at.to_rfc3339(),
            last_heartbeat_secs_ago: c.last_seen().elapsed().as_secs_f64(),
            in_flight: c.in_flight.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            models: c.models().into_iter().map(|m| m.name).collect(),
            metas: masked_metas(&c.registration.metas),
        }
    }
}

/// Parts of a meta's key that mark its value as secret (e.g. frp's
/// `meta_token`, which server plugins check).
const SECRET_META_WORDS: [&str; 9] = [
    "token",
    "secret",
    // password, passwd, passphrase, db_pass (a harmless word masked too,
    // `bypass`, is the lesser harm).
    "pass",
    "pwd",
    "key",
    "auth",
    "credential",
    "cookie",
    "private",
];

/// `metas` for the API: the value of each key holding one of
/// [`SECRET_META_WORDS`] (in any letter case), and each value that carries
/// a URL's user information (`postgres://user:pw@host/db`), is `***`.
/// Server plugins get the real values from the registration, never from
/// here.
pub fn masked_metas(metas: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    metas
        .iter()
        .map(|(k, v)| {
            let key = k.to_ascii_lowercase();
            let secret = SECRET_META_WORDS.iter().any(|w| key.contains(w)) || has_user_info(v);
            let v = if secret { "***".to_owned() } else { v.clone() };
            (k.clone(), v)
        })
        .collect()
}

/// Whether `value` holds a URL with user information (`scheme://…@host`).
/// The authority is taken up to the first `/` only: a password may hold a
/// `?` or `#` that libpq and others read as part of it
/// (`postgres://app:p?ss@db/app`), and masking one URL too many is the
/// safe mistake.
fn has_user_info(value: &str) -> bool {
    value.split("://").skip(1).any(|rest| {
        let authority = rest.split('/').next().unwrap_or("");
        authority.contains('@')
    })
}

/// `online`; `unhealthy` when its local service does not answer;
/// `cooling_down` when requests failed on it and frps skips it for a
/// while (its service answering the probes all the same: before
/// 2026-12-05 such a box showed `online` while every request to it got
/// 503 `no_healthy_clients`).
pub fn status(c: &ClientHandle) -> &'static str {
    if !c.is_healthy() {
        "unhealthy"
    } else if c.is_cooling_down() {
        "cooling_down"
    } else {
        "online"
    }
}

/// Seconds left of `c`'s cool-down, if it is in one.
pub fn cooling_down_secs(c: &ClientHandle) -> Option<f64> {
    c.cooling_left(std::time::Instant::now())
        .map(|d| d.as_secs_f64())
}

/// One client in detail.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ClientDetail {
    /// The summary.
    #[serde(flatten)]
    pub summary: ClientSummary,
    /// `host:port` of its local service.
    pub local_host: String,
    /// Idle upstream connections kept for it.
    pub idle_connections: usize,
    /// Most concurrent requests it accepts (null: unlimited).
    pub max_concurrency: Option<u32>,
    /// Its models with sizes.
    pub model_details: Vec<ModelInfo>,
    /// Its latest system metrics (null until the first report).
    pub system: Option<SystemInfo>,
    /// Seconds since those metrics came (null until the first report):
    /// frpc sends them every `--metrics-interval`, and none while reading
    /// them hangs.
    pub system_secs_ago: Option<f64>,
}

/// `/api/clients/{id}/status`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ClientStatus {
    /// Client id.
    pub id: String,
    /// `online`, `unhealthy` or `cooling_down` (as in the client list).
    pub status: String,
    /// Whether its local service answers.
    pub healthy: bool,
    /// Seconds left of its cool-down after failed requests (null: none).
    pub cooling_down_secs: Option<f64>,
    /// Requests that failed on it since its last success.
    pub failures: u32,
    /// Seconds since it was last heard from.
    pub last_heartbeat_secs_ago: f64,
    /// Requests being served.
    pub in_flight: usize,
}

/// `/api/clients/{id}/heartbeat`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatStatus {
    /// Client id.
    pub id: String,
    /// Interval asked of clients, milliseconds.
    pub interval_ms: u64,
    /// Silence after which the client is evicted, milliseconds.
    pub evict_after_ms: u64,
    /// Seconds since it was last heard from.
    pub last_heartbeat_secs_ago: f64,
    /// Heartbeats received in this session.
    pub heartbeats: u64,
}

/// One entry of `/api/monitoring`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Monitoring {
    /// Client id.
    pub id: String,
    /// `online` or `unhealthy`.
    pub status: String,
    /// Latest system metrics (null until the first report).
    pub system: Option<SystemInfo>,
    /// Seconds since those metrics came (null until the first report):
    /// frpc sends them every `--metrics-interval`, and none while reading
    /// them hangs.
    pub system_secs_ago: Option<f64>,
}

/// Errors by kind, in `/api/stats`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorCounts {
    /// Missing or invalid API keys (401).
    pub auth_failures: u64,
    /// Key validation unavailable (503).
    pub auth_unavailable: u64,
    /// No client online, or every one tried busy (503).
    pub no_client: u64,
    /// Client did not dial back in time (504).
    pub dial_timeouts: u64,
    /// Client unreachable or failed (502).
    pub upstream_errors: u64,
    /// Fleet at capacity: queue full or wait too long (429).
    pub queue_rejections: u64,
    /// Over an API key's requests per minute (429, `rate_limit_exceeded`).
    #[serde(default)]
    pub rate_limited_rpm: u64,
    /// Over an API key's concurrent requests (429, `concurrency_limit_exceeded`).
    #[serde(default)]
    pub rate_limited_concurrency: u64,
}

/// `/api/stats`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Stats {
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Public requests received.
    pub requests_total: u64,
    /// Requests served per live client.
    pub requests_per_client: BTreeMap<String, u64>,
    /// Registered clients.
    pub clients_online: usize,
    /// Open public connections.
    pub active_connections: u64,
    /// Requests being served.
    pub in_flight: usize,
    /// Dial-backs requested and not yet arrived.
    pub pending_connections: usize,
    /// Upstream connections opened by a dial-back, since start.
    #[serde(default)]
    pub upstream_dial_backs: u64,
    /// Upstream connections opened as streams of a tunnel connection,
    /// since start.
    #[serde(default)]
    pub upstream_streams: u64,
    /// Requests waiting for capacity, per model (`*`: requests naming none).
    pub queue_depth: BTreeMap<String, usize>,
    /// Request body bytes received from callers.
    pub bytes_in: u64,
    /// Response body bytes sent to callers.
    pub bytes_out: u64,
    /// Errors by kind.
    pub errors: ErrorCounts,
}

/// Per-client line of `/api/connections`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ClientConnections {
    /// Client id.
    pub id: String,
    /// Address of its control connection.
    pub remote_addr: String,
    /// Requests being served.
    pub in_flight: usize,
    /// Idle upstream connections kept for it.
    pub idle: usize,
    /// Whether its tunnel connection is up (upstream connections are then
    /// streams on it), or frps asks it for dial-backs.
    #[serde(default)]
    pub tunnel: bool,
}

/// `/api/connections`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Connections {
    /// Open public connections.
    pub public_connections: u64,
    /// Dial-backs requested and not yet arrived.
    pub pending: usize,
    /// Per client: the page asked for (`?limit=&after=`, as
    /// `/api/clients`; a `Link` header names the next).
    pub clients: Vec<ClientConnections>,
}

/// One pending dial-back.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PendingConnection {
    /// Pairing id.
    pub conn_id: String,
    /// Client asked to dial back.
    pub client_id: String,
    /// Milliseconds waited so far.
    pub waiting_ms: u64,
}

/// `/api/connections/pending`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Pending {
    /// How many.
    pub count: usize,
    /// Which.
    pub pending: Vec<PendingConnection>,
}

/// `/api/ports`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Ports {
    /// Control port.
    pub control: u16,
    /// Proxy (dial-back) port.
    pub proxy: u16,
    /// Public port.
    pub public: u16,
    /// Management API port.
    pub api: u16,
}

/// `/api/config`: the effective configuration, without secrets.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConfigView {
    /// Bound ports.
    pub ports: Ports,
    /// Address of control, proxy and public listeners.
    pub bind_addr: String,
    /// Address of the management API.
    pub api_bind: String,
    /// `postgres` or `sqlite`.
    pub database: String,
    /// Whether Redis is configured.
    pub redis_configured: bool,
    /// Whether a static API key is configured (never the key).
    pub static_api_key: bool,
    /// Whether an admin token is configured (never the token).
    pub admin_token: bool,
    /// Dial-back deadline, milliseconds.
    pub connect_timeout_ms: u64,
    /// Heartbeat interval, milliseconds.
    pub heartbeat_interval_ms: u64,
    /// Handshake deadline, milliseconds.
    pub handshake_timeout_ms: u64,
    /// Public request head deadline, milliseconds.
    pub header_timeout_ms: u64,
    /// Next request head due within this of a response's end, milliseconds.
    pub keepalive_timeout_ms: u64,
    /// Drain deadline at shutdown, milliseconds.
    pub shutdown_timeout_ms: u64,
    /// Most idle upstream connections kept per client.
    pub max_idle_per_client: usize,
    /// An idle upstream connection unused this long is closed, milliseconds.
    pub pool_idle_timeout_ms: u64,
    /// Idle upstream connections kept per client once a burst has ended.
    pub pool_idle_after_burst: usize,
    /// Whether clients are offered a multiplexed tunnel connection.
    pub tunnel_mux: bool,
    /// Request paths the public port forwards (`--forward-paths`).
    pub forward_paths: Vec<String>,
    /// Client token lifetime, seconds (null: no expiry).
    pub token_ttl_secs: Option<u64>,
}

/// `/api/users` entry (never the password hash).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct User {
    /// User id.
    pub id: i64,
    /// Email.
    pub email: String,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Clients of this account online now.
    pub clients_online: usize,
}

/// `/api/tokens/active` entry (masked).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Token {
    /// Token id.
    pub id: String,
    /// Visible start of the token, then `…`.
    pub token: String,
    /// Owner's email.
    pub email: String,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Expiry (RFC 3339; null: none).
    pub expires_at: Option<String>,
    /// Last login with it (RFC 3339).
    pub last_used_at: Option<String>,
}

/// `/api/models` entry.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FleetModel {
    /// Model name.
    pub name: String,
    /// Clients serving it.
    pub clients: Vec<String>,
    /// Size in bytes, when reported.
    pub size: Option<u64>,
}

/// Paging of `/api/users`, `/api/tokens/active`, `/api/clients`,
/// `/api/monitoring` and `/api/models`: `?limit=&after=`.
/// When more rows follow, the response carries
/// `Link: <…?limit=L&after=C>; rel="next"`; `C` is an opaque cursor naming
/// the page's last row, and the next page starts just after it, however
/// many rows were added or removed meanwhile.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct Page {
    /// Most entries returned, 1 to 1000 (default 1000).
    pub limit: Option<u64>,
    /// Cursor from a `Link` header: start after that entry (default: from
    /// the first).
    pub after: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_looking_metas_are_masked() {
        let metas: BTreeMap<String, String> = [
            ("token", "plugin-secret"),
            ("Meta_API_KEY", "k1"),
            ("db_password", "pw"),
            ("clientSecret", "s"),
            ("smtp_passwd", "p"),
            ("db_pass", "p"),
            ("gpg_passphrase", "p"),
            ("Authorization", "Basic eDp5"),
            ("session_cookie", "c"),
            ("db_url", "postgres://frpx:hunter2@db:5432/frpx"),
            ("replica", "postgres://frpx:p?ss#word@db2/frpx"),
            ("mirror", "see https://user@example.com/x"),
            ("homepage", "https://example.com/team@work"),
            ("version", "1.0.0"),
            ("region", "eu"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let masked = masked_metas(&metas);
        assert_eq!(masked.len(), metas.len());
        for k in [
            "token",
            "Meta_API_KEY",
            "db_password",
            "clientSecret",
            "smtp_passwd",
            "db_pass",
            "gpg_passphrase",
            "Authorization",
            "session_cookie",
            "db_url",
            "replica",
            "mirror",
        ] {
            assert_eq!(masked[k], "***", "{k}");
        }
        // An @ in a URL's path is not user information.
        assert_eq!(masked["homepage"], "https://example.com/team@work");
        assert_eq!(masked["version"], "1.0.0");
        assert_eq!(masked["region"], "eu");
    }
}
