//! Command-line flags (each also readable from the environment).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use common::{parse_duration, parse_positive_duration};

/// frpc: exposes a local model server through frps.
#[derive(Clone, Parser)]
#[command(
    name = "frpc",
    version,
    about = "frpx client: exposes a local model server (Ollama, vLLM, llama.cpp) through frps"
)]
pub struct Config {
    /// Unique id of this client. Default: the machine id (from `mid`), or a
    /// UUID persisted next to the token file when no machine id can be read.
    #[arg(short = 'c', long, env = "FRPC_CLIENT_ID", value_parser = parse_client_id)]
    pub client_id: Option<String>,

    /// Address of the frps server: a host name or an IP address, without a
    /// port (`--control-port` and `--proxy-port` give the ports).
    #[arg(
        short = 's',
        long,
        env = "FRPC_SERVER_ADDR",
        default_value = "127.0.0.1",
        value_parser = parse_server_addr
    )]
    pub server_addr: String,

    /// frps control port.
    #[arg(long, env = "FRPC_CONTROL_PORT", default_value_t = 17000, value_parser = clap::value_parser!(u16).range(1..))]
    pub control_port: u16,

    /// frps proxy (dial-back) port.
    #[arg(long, env = "FRPC_PROXY_PORT", default_value_t = 17001, value_parser = clap::value_parser!(u16).range(1..))]
    pub proxy_port: u16,

    /// Address of the local service to expose (a host name or address,
    /// without a port or scheme).
    #[arg(long, env = "FRPC_LOCAL_ADDR", default_value = "127.0.0.1", value_parser = parse_local_addr)]
    pub local_addr: String,

    /// Port of the local service to expose (Ollama's by default).
    #[arg(long, env = "FRPC_LOCAL_PORT", default_value_t = 11434, value_parser = clap::value_parser!(u16).range(1..))]
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
    #[arg(long, env = "FRPC_RECONNECT_MIN", default_value = "1s", value_parser = parse_positive_duration)]
    pub reconnect_min: Duration,

    /// Longest reconnect delay.
    #[arg(long, env = "FRPC_RECONNECT_MAX", default_value = "30s", value_parser = parse_positive_duration)]
    pub reconnect_max: Duration,

    /// Deadline for connecting to frps or to the local service.
    #[arg(long, env = "FRPC_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_positive_duration)]
    pub connect_timeout: Duration,

    /// On SIGINT or SIGTERM: how long connections still carrying a request
    /// may finish (frps stops sending new ones at once); `0` closes them at
    /// once. A second signal exits without waiting.
    #[arg(long, env = "FRPC_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Most requests this box serves at once (default: unlimited); frps
    /// queues the rest instead of piling them onto the box.
    #[arg(long, env = "FRPC_MAX_CONCURRENCY", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrency: Option<u32>,

    /// Most dial-back data connections this frpc holds at once (opening,
    /// pooled by frps, or carrying a request); an `OpenConnection` past it
    /// is answered `OpenFailed` without dialing. frps keeps far fewer (by
    /// default at most 256 idle and 512 being opened per client, plus
    /// those in use: keep this above frps's --max-idle-per-client and
    /// --max-pending-per-client together): the cap is against a
    /// misbehaving frps.
    #[arg(long, env = "FRPC_MAX_DATA_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_data_connections: u32,

    /// How often system metrics and the model list are reported (at least
    /// 1s; also the deadline for reading the metrics).
    #[arg(long, env = "FRPC_METRICS_INTERVAL", default_value = "10s", value_parser = parse_metrics_interval)]
    pub metrics_interval: Duration,

    /// Log filter (e.g. `info`, `frpc=debug`); `RUST_LOG` takes precedence.
    #[arg(long, env = "FRPX_LOG", default_value = "info", value_parser = common::telemetry::parse_filter)]
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

    /// Use TLS on the control and data connections to frps (implied by
    /// `--tls-ca`, `--tls-server-name` and `--tls-fingerprint`).
    #[arg(long, env = "FRPC_TLS")]
    pub tls: bool,

    /// CA certificates (PEM bundle) that frps's certificate must chain to.
    /// Default: the public web roots (webpki-roots).
    #[arg(
        long,
        env = "FRPC_TLS_CA",
        value_name = "FILE",
        conflicts_with = "tls_fingerprint"
    )]
    pub tls_ca: Option<PathBuf>,

    /// Name frps's certificate must be valid for (default: `--server-addr`;
    /// implies `--tls`).
    #[arg(long, env = "FRPC_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,

    /// Accept exactly the frps certificate with this SHA-256 fingerprint (64
    /// hex digits, colons allowed), as `frps --tls-self-signed` logs it; no CA
    /// or name is checked, the handshake signature still is.
    #[arg(long, env = "FRPC_TLS_FINGERPRINT", value_name = "SHA256HEX", value_parser = parse_fingerprint)]
    pub tls_fingerprint: Option<[u8; 32]>,

    /// Allow sending the account password, or a saved token issued over
    /// TLS, over a plaintext connection (only on a network you trust;
    /// prefer `--tls`).
    #[arg(long, env = "FRPC_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,

    /// Configuration file in frp's INI form (`frpc.ini`): `[common]` with
    /// `server_addr`, `server_port`, `user`, `meta_*` (and these flags in
    /// snake_case), and one proxy section. Flags and the environment override it.
    #[arg(long = "config", env = "FRPC_CONFIG", value_name = "FILE")]
    pub config_file: Option<PathBuf>,
}

/// Shortest `--metrics-interval`: it is also the deadline for reading the
/// metrics, which takes a system call per disk and a driver call per GPU,
/// and each report is a frame frps handles.
pub const MIN_METRICS_INTERVAL: Duration = Duration::from_secs(1);

/// Reads `--metrics-interval`: a duration of at least
/// [`MIN_METRICS_INTERVAL`].
pub fn parse_metrics_interval(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d < MIN_METRICS_INTERVAL => Err(format!(
            "`{}` is below 1s: --metrics-interval takes 1s or more (examples: 1s, 10s, 1m)",
            s.trim()
        )),
        d => Ok(d),
    }
}

/// Reads `--client-id`: what frps takes ([`common::protocol::is_client_id`]);
/// any other was found out only after a whole login (a password login
/// issuing a token, maybe), when frps refused the registration for good.
pub fn parse_client_id(s: &str) -> Result<String, String> {
    if common::protocol::is_client_id(s) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "`{s}` is not a client id frps takes: 1-{} characters of letters, digits and -_.:@",
            common::protocol::MAX_CLIENT_ID
        ))
    }
}

/// Reads `--server-addr`: a host name or an IP address (IPv6 bare or in
/// brackets), refusing one with a port, which frpc would otherwise dial as
/// a host name for ever (or refuse as a TLS server name).
pub fn parse_server_addr(s: &str) -> Result<String, String> {
    host_only(
        s,
        "--server-addr",
        "frps.example.com",
        "--control-port (`server_port` in frpc.ini)",
    )
}

/// Reads `--local-addr`: as [`parse_server_addr`], a host without a port
/// or scheme (`OLLAMA_HOST`'s `http://127.0.0.1:11434` was taken for a
/// host name, and every probe and connection failed to resolve it).
pub fn parse_local_addr(s: &str) -> Result<String, String> {
    host_only(
        s,
        "--local-addr",
        "127.0.0.1",
        "--local-port (`local_port` in frpc.ini)",
    )
}

/// `s` when it is a host name or address without a port or scheme, else
/// why not, for `flag` (whose port is given with `port_flag`).
fn host_only(s: &str, flag: &str, example: &str, port_flag: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err(format!(
            "{flag} is empty: give a host name or address (e.g. {example})"
        ));
    }
    let bracketed = s.strip_prefix('[').and_then(|r| r.strip_suffix(']'));
    let is_ip =
        s.parse::<IpAddr>().is_ok() || bracketed.is_some_and(|r| r.parse::<Ipv6Addr>().is_ok());
    if s.contains("://") {
        return Err(format!(
            "`{s}` is a URL: {flag} takes a host name or address (e.g. {example}); give the port with {port_flag}"
        ));
    }
    if !is_ip
        && let Some((_, port)) = s.rsplit_once(':')
        && port.parse::<u16>().is_ok()
    {
        return Err(format!(
            "`{s}` includes a port: {flag} takes a host name or address without one; give the port with {port_flag}"
        ));
    }
    Ok(s.to_owned())
}

/// Reads `KEY=VALUE` (the key non-empty, the value possibly empty).
pub fn parse_meta(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

/// Reads a SHA-256 fingerprint: 64 hex digits, optionally separated by colons.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], String> {
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    common::hex::decode_array(&hex)
        .ok_or_else(|| format!("`{s}` is not a SHA-256 fingerprint (64 hex digits)"))
}

/// Metadata pairs as a map; a later entry for a key wins.
pub fn meta_map(pairs: &[(String, String)]) -> BTreeMap<String, String> {
    pairs.iter().cloned().collect()
}

/// `host:port`, an IPv6 address in brackets (`[::1]:11434`): the form a
/// `Host` header takes, and one a dial reads unambiguously.
fn host_port(host: &str, port: u16) -> String {
    if host.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Shown without the password, and with the metas' names only (a value
/// may be a secret the operator passes to a plugin): a debug print must
/// never put them in a log.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = |metas: &[(String, String)]| -> Vec<String> {
            metas.iter().map(|(k, _)| format!("{k}=***")).collect()
        };
        // Every field named (no `..`): a new one must be placed here,
        // shown or hidden, or this does not compile.
        let Config {
            client_id,
            server_addr,
            control_port,
            proxy_port,
            local_addr,
            local_port,
            email,
            password,
            no_prompt,
            token_file,
            reconnect_min,
            reconnect_max,
            connect_timeout,
            shutdown_timeout,
            max_concurrency,
            max_data_connections,
            metrics_interval,
            log,
            user,
            metas,
            proxy_metas,
            tls,
            tls_ca,
            tls_server_name,
            tls_fingerprint,
            insecure_plaintext,
            config_file,
        } = self;
        f.debug_struct("Config")
            .field("client_id", client_id)
            .field("server_addr", server_addr)
            .field("control_port", control_port)
            .field("proxy_port", proxy_port)
            .field("local_addr", local_addr)
            .field("local_port", local_port)
            .field("email", email)
            .field("password", &password.as_ref().map(|_| "***"))
            .field("no_prompt", no_prompt)
            .field("token_file", token_file)
            .field("reconnect_min", reconnect_min)
            .field("reconnect_max", reconnect_max)
            .field("connect_timeout", connect_timeout)
            .field("shutdown_timeout", shutdown_timeout)
            .field("max_concurrency", max_concurrency)
            .field("max_data_connections", max_data_connections)
            .field("metrics_interval", metrics_interval)
            .field("log", log)
            .field("user", user)
            .field("metas", &names(metas))
            .field("proxy_metas", &names(proxy_metas))
            .field("tls", tls)
            .field("tls_ca", tls_ca)
            .field("tls_server_name", tls_server_name)
            .field("tls_fingerprint", tls_fingerprint)
            .field("insecure_plaintext", insecure_plaintext)
            .field("config_file", config_file)
            .finish()
    }
}

impl Config {
    /// `host:port` of the local service (also the `Host` its requests
    /// carry).
    pub fn local_host(&self) -> String {
        host_port(&self.local_addr, self.local_port)
    }

    /// `host:port` of the control port.
    pub fn control_addr(&self) -> String {
        host_port(&self.server_addr, self.control_port)
    }

    /// Whether connections to frps use TLS: asked for, or implied by a
    /// setting only TLS uses (a name for frps's certificate given alone
    /// left the token to cross in clear).
    pub fn uses_tls(&self) -> bool {
        self.tls
            || self.tls_ca.is_some()
            || self.tls_server_name.is_some()
            || self.tls_fingerprint.is_some()
    }

    /// `host:port` of the proxy port.
    pub fn proxy_addr(&self) -> String {
        host_port(&self.server_addr, self.proxy_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_no_secret() {
        let cfg = Config::try_parse_from([
            "frpc",
            "--email",
            "owner@example.com",
            "--password",
            "password-secret",
            "--meta",
            "plugin_token=meta-secret",
        ])
        .unwrap();
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("password-secret"), "{shown}");
        assert!(!shown.contains("meta-secret"), "{shown}");
        assert!(shown.contains("password: Some(\"***\")"), "{shown}");
        assert!(shown.contains("plugin_token=***"), "{shown}");
        assert!(shown.contains("owner@example.com"), "{shown}");
    }

    #[test]
    fn every_setting_only_tls_uses_turns_tls_on() {
        assert!(!Config::try_parse_from(["frpc"]).unwrap().uses_tls());
        for args in [
            &["--tls"][..],
            &["--tls-ca", "/etc/frpc/ca.pem"],
            &["--tls-server-name", "frps.example.com"],
            &["--tls-fingerprint", &"ab".repeat(32)],
        ] {
            let cfg = Config::try_parse_from(std::iter::once("frpc").chain(args.iter().copied()));
            assert!(cfg.unwrap().uses_tls(), "{args:?}");
        }
    }

    #[test]
    fn ipv6_addresses_are_bracketed_in_host_and_port() {
        let cfg = Config::try_parse_from([
            "frpc",
            "--local-addr",
            "::1",
            "--local-port",
            "11434",
            "--server-addr",
            "2001:db8::7",
        ])
        .unwrap();
        assert_eq!(cfg.local_host(), "[::1]:11434");
        assert!(cfg.control_addr().starts_with("[2001:db8::7]:"));
        assert!(cfg.proxy_addr().starts_with("[2001:db8::7]:"));
        let cfg =
            Config::try_parse_from(["frpc", "--local-addr", "[::1]", "--local-port", "8"]).unwrap();
        assert_eq!(cfg.local_host(), "[::1]:8");
        let cfg = Config::try_parse_from(["frpc", "--local-addr", "gpu.lan", "--local-port", "8"])
            .unwrap();
        assert_eq!(cfg.local_host(), "gpu.lan:8");
    }

    #[test]
    fn zero_delays_and_deadlines_are_refused_and_zero_drain_is_not() {
        for flag in ["--reconnect-min", "--reconnect-max", "--connect-timeout"] {
            let err = Config::try_parse_from(["frpc", flag, "0s"]).unwrap_err();
            assert!(err.to_string().contains("is zero"), "{flag}: {err}");
        }
        // A box that serves nothing at once would only queue requests.
        assert!(Config::try_parse_from(["frpc", "--max-concurrency", "0"]).is_err());
        let cfg = Config::try_parse_from(["frpc", "--max-concurrency", "1"]).unwrap();
        assert_eq!(cfg.max_concurrency, Some(1));
        let cfg = Config::try_parse_from(["frpc", "--shutdown-timeout", "0"]).unwrap();
        assert!(cfg.shutdown_timeout.is_zero());
        let cfg = Config::try_parse_from(["frpc"]).unwrap();
        assert_eq!(cfg.shutdown_timeout, Duration::from_secs(30));
    }

    #[test]
    fn a_metrics_interval_below_a_second_is_refused() {
        for short in ["0s", "1ms", "999ms"] {
            let err = Config::try_parse_from(["frpc", "--metrics-interval", short]).unwrap_err();
            let err = err.to_string();
            assert!(
                err.contains("below 1s") && err.contains("--metrics-interval"),
                "{short}: {err}"
            );
        }
        let cfg = Config::try_parse_from(["frpc", "--metrics-interval", "1000ms"]).unwrap();
        assert_eq!(cfg.metrics_interval, MIN_METRICS_INTERVAL);
        let cfg = Config::try_parse_from(["frpc"]).unwrap();
        assert_eq!(cfg.metrics_interval, Duration::from_secs(10));
    }

    #[test]
    fn a_server_addr_with_a_port_is_refused_and_ipv6_is_not() {
        for with_port in [
            "frps.example:17000",
            "203.0.113.7:17000",
            "[::1]:17000",
            "::1:17000",
        ] {
            let err = Config::try_parse_from(["frpc", "--server-addr", with_port]).unwrap_err();
            let err = err.to_string();
            assert!(
                err.contains("includes a port") && err.contains("--control-port"),
                "{with_port}: {err}"
            );
        }
        let err = Config::try_parse_from(["frpc", "-s", "https://frps.example"]).unwrap_err();
        assert!(err.to_string().contains("is a URL"), "{err}");
        // The local service's address likewise (OLLAMA_HOST's form).
        for local in ["http://127.0.0.1:11434", "127.0.0.1:8000"] {
            let err = Config::try_parse_from(["frpc", "--local-addr", local]).unwrap_err();
            let err = err.to_string();
            assert!(err.contains("--local-port"), "{local}: {err}");
        }
        let cfg = Config::try_parse_from(["frpc", "--local-addr", "::1"]).unwrap();
        assert_eq!(cfg.local_addr, "::1");
        // Nothing at all (retried as "cannot reach frps at :17000" for
        // ever before).
        for flag in ["--server-addr", "--local-addr"] {
            let err = Config::try_parse_from(["frpc", flag, " "]).unwrap_err();
            assert!(err.to_string().contains("is empty"), "{flag}: {err}");
        }
        // A port 0 reaches nothing.
        for flag in ["--local-port", "--control-port", "--proxy-port"] {
            assert!(
                Config::try_parse_from(["frpc", flag, "0"]).is_err(),
                "{flag}"
            );
        }
        for (addr, control) in [
            ("frps.example", "frps.example:17000"),
            ("203.0.113.7", "203.0.113.7:17000"),
            ("[::1]", "[::1]:17000"),
            ("::1", "[::1]:17000"),
            ("fe80::1:8000", "[fe80::1:8000]:17000"),
        ] {
            let cfg = Config::try_parse_from(["frpc", "--server-addr", addr]).unwrap();
            assert_eq!(cfg.control_addr(), control);
        }
    }

    #[test]
    fn a_client_id_frps_would_refuse_is_refused_at_start() {
        for bad in ["", "gpu 1", "gpu/1", "ünïcode", &"x".repeat(129)] {
            let err = Config::try_parse_from(["frpc", "--client-id", bad]).unwrap_err();
            assert!(
                err.to_string().contains("not a client id"),
                "{bad:?}: {err}"
            );
        }
        for good in ["gpu-1", "box_2.lab:a@home", &"x".repeat(128)] {
            let cfg = Config::try_parse_from(["frpc", "-c", good]).unwrap();
            assert_eq!(cfg.client_id.as_deref(), Some(good));
        }
    }
}
