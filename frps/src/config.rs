//! Command-line flags (each also readable from the environment).

use std::net::IpAddr;
use std::time::Duration;

use clap::Parser;
use common::parse_duration;

/// frps: the frpx server.
#[derive(Debug, Clone, Parser)]
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

    /// Static API key accepted on the public port. No default: without it
    /// (and, later, without database keys) every public request is refused.
    #[arg(long, env = "API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Shared provider secret frpc presents (`frpc --token`) to register a
    /// GPU box. Without it no client can register.
    #[arg(long, env = "FRPX_CLIENT_SECRET", hide_env_values = true)]
    pub client_secret: Option<String>,

    /// How long a requested data connection may take to arrive before the
    /// request fails over (e.g. `10s`, `500ms`).
    #[arg(long, env = "FRPX_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Heartbeat interval asked of clients; a client silent for three
    /// intervals is evicted.
    #[arg(long, env = "FRPX_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// Deadline for a connection's first frame (login, data hello).
    #[arg(long, env = "FRPX_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Deadline for the head of a public HTTP request (slowloris guard).
    #[arg(long, env = "FRPX_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// How long in-flight requests may run on after SIGINT/SIGTERM.
    #[arg(long, env = "FRPX_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Idle upstream connections kept per client for reuse.
    #[arg(long, env = "FRPX_MAX_IDLE_PER_CLIENT", default_value_t = 32)]
    pub max_idle_per_client: usize,

    /// Log filter (e.g. `info`, `frps=debug`); `RUST_LOG` takes precedence.
    #[arg(long, env = "FRPX_LOG", default_value = "info")]
    pub log: String,
}

impl Config {
    /// A configuration for tests and embedding: every port 0 on loopback,
    /// the given secrets, defaults elsewhere.
    pub fn ephemeral(api_key: &str, client_secret: &str) -> Self {
        let mut cfg = Config::parse_from(["frps"]);
        let lo: IpAddr = [127, 0, 0, 1].into();
        cfg.bind_addr = lo;
        cfg.api_bind = lo;
        cfg.control_port = 0;
        cfg.proxy_port = 0;
        cfg.public_port = 0;
        cfg.api_port = 0;
        cfg.api_key = Some(api_key.to_owned());
        cfg.client_secret = Some(client_secret.to_owned());
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_seed_and_have_no_static_key() {
        let cfg = Config::parse_from(["frps"]);
        assert_eq!(
            (
                cfg.control_port,
                cfg.proxy_port,
                cfg.public_port,
                cfg.api_port
            ),
            (17000, 17001, 18080, 18081)
        );
        // The seed defaulted to `abc123`; frpx has no default key.
        if std::env::var_os("API_KEY").is_none() {
            assert_eq!(cfg.api_key, None);
        }
        assert_eq!(cfg.api_bind.to_string(), "127.0.0.1");
        assert_eq!(cfg.connect_timeout, Duration::from_secs(10));
    }
}
