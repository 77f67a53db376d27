//! Command-line flags (each also readable from the environment).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use common::parse_duration;

/// frpc: exposes a local model server through frps.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "frpc",
    version,
    about = "frpx client: exposes a local model server (Ollama, vLLM, llama.cpp) through frps"
)]
pub struct Config {
    /// Unique id of this client. Default: the machine id (from `mid`), or a
    /// UUID persisted next to the token file when no machine id can be read.
    #[arg(short = 'c', long, env = "FRPC_CLIENT_ID")]
    pub client_id: Option<String>,

    /// Address of the frps server.
    #[arg(
        short = 's',
        long,
        env = "FRPC_SERVER_ADDR",
        default_value = "127.0.0.1"
    )]
    pub server_addr: String,

    /// frps control port.
    #[arg(long, env = "FRPC_CONTROL_PORT", default_value_t = 17000)]
    pub control_port: u16,

    /// frps proxy (dial-back) port.
    #[arg(long, env = "FRPC_PROXY_PORT", default_value_t = 17001)]
    pub proxy_port: u16,

    /// Address of the local service to expose.
    #[arg(long, env = "FRPC_LOCAL_ADDR", default_value = "127.0.0.1")]
    pub local_addr: String,

    /// Port of the local service to expose (Ollama's by default).
    #[arg(long, env = "FRPC_LOCAL_PORT", default_value_t = 11434)]
    pub local_port: u16,

    /// Account email, for the first login (afterwards the saved token is used).
    #[arg(long, env = "FRPC_EMAIL")]
    pub email: Option<String>,

    /// Account password, for the first login. Prefer the interactive prompt
    /// or the environment over the command line, which other users can see.
    #[arg(long, env = "FRPC_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,

    /// Never prompt for credentials, even on a terminal (for scripts).
    #[arg(long, env = "FRPC_NO_PROMPT")]
    pub no_prompt: bool,

    /// Where the login token is saved; the fallback client id is kept beside it.
    #[arg(long, env = "FRPC_TOKEN_FILE", default_value = "token.json")]
    pub token_file: PathBuf,

    /// First reconnect delay; doubles (with jitter) up to `--reconnect-max`.
    #[arg(long, env = "FRPC_RECONNECT_MIN", default_value = "1s", value_parser = parse_duration)]
    pub reconnect_min: Duration,

    /// Longest reconnect delay.
    #[arg(long, env = "FRPC_RECONNECT_MAX", default_value = "30s", value_parser = parse_duration)]
    pub reconnect_max: Duration,

    /// Deadline for connecting to frps or to the local service.
    #[arg(long, env = "FRPC_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Most requests this box serves at once (default: unlimited); frps
    /// queues the rest instead of piling them onto the box.
    #[arg(long, env = "FRPC_MAX_CONCURRENCY")]
    pub max_concurrency: Option<u32>,

    /// How often system metrics and the model list are reported.
    #[arg(long, env = "FRPC_METRICS_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub metrics_interval: Duration,

    /// Log filter (e.g. `info`, `frpc=debug`); `RUST_LOG` takes precedence.
    #[arg(long, env = "FRPX_LOG", default_value = "info")]
    pub log: String,

    /// frp's `user`: who runs this client, as frps's server plugins see it.
    #[arg(long, env = "FRPC_USER", default_value = "")]
    pub user: String,

    /// Client metadata for frps's server plugins (repeatable; frp's `meta_*`
    /// under `[common]`).
    #[arg(long = "meta", value_name = "KEY=VALUE", env = "FRPC_META", value_parser = parse_meta)]
    pub metas: Vec<(String, String)>,

    /// Metadata of the exposed service for frps's server plugins, sent in
    /// `NewProxy` only (repeatable; frp's `meta_*` in a proxy section).
    #[arg(long = "proxy-meta", value_name = "KEY=VALUE", env = "FRPC_PROXY_META", value_parser = parse_meta)]
    pub proxy_metas: Vec<(String, String)>,

    /// Configuration file in frp's INI form (`frpc.ini`): `[common]` with
    /// `server_addr`, `server_port`, `user`, `meta_*` (and these flags in
    /// snake_case), and one proxy section. Flags and the environment override it.
    #[arg(long = "config", env = "FRPC_CONFIG", value_name = "FILE")]
    pub config_file: Option<PathBuf>,
}

/// Reads `KEY=VALUE` (the key non-empty, the value possibly empty).
pub fn parse_meta(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

/// Metadata pairs as a map; a later entry for a key wins.
pub fn meta_map(pairs: &[(String, String)]) -> BTreeMap<String, String> {
    pairs.iter().cloned().collect()
}

impl Config {
    /// `host:port` of the local service.
    pub fn local_host(&self) -> String {
        format!("{}:{}", self.local_addr, self.local_port)
    }

    /// `host:port` of the control port.
    pub fn control_addr(&self) -> String {
        format!("{}:{}", self.server_addr, self.control_port)
    }

    /// `host:port` of the proxy port.
    pub fn proxy_addr(&self) -> String {
        format!("{}:{}", self.server_addr, self.proxy_port)
    }
}
