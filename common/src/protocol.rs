//! Every message frpc and frps exchange, in one place.
//!
//! Messages travel as frames (see [`crate::codec`]): a 4-byte big-endian
//! length followed by the JSON encoding of one [`Command`]. The JSON is
//! internally tagged: `{"type": "Heartbeat", "seq": 7}`.
//!
//! Two kinds of connection carry commands:
//! - the **control connection** (frpc → frps control port): login, registration,
//!   heartbeats, reports, and the server's requests to open data connections;
//! - a **data connection** (frpc → frps proxy port): exactly one
//!   [`Command::DataHello`] from frpc, answered only on failure by
//!   [`Command::DataRejected`]; after the hello the connection carries raw
//!   HTTP/1.1 bytes between frps and the local service;
//! - the **tunnel connection** (frpc → frps proxy port, one per session when
//!   frps offers it): [`Command::MuxHello`], answered by
//!   [`Command::MuxAccepted`]; then [`crate::mux`] frames carry many
//!   streams, each of which is what a data connection would be.
//!
//! `docs/protocol.md` describes the conversation in prose.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Version of this protocol. Bumped on any incompatible change; frps refuses
/// a registration whose version it does not speak.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest client id frps accepts.
pub const MAX_CLIENT_ID: usize = 128;

/// Whether `id` may name a client: 1 to [`MAX_CLIENT_ID`] letters, digits
/// and `-_.:@` (safe in logs, URLs and headers). frps refuses any other for
/// good; frpc checks it at start.
pub fn is_client_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_CLIENT_ID
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:@".contains(c))
}

/// The `Disconnect` reason of a session another connection with the same
/// client id replaced (frpc then waits its longest backoff, so two frpc
/// sharing an id do not take it from each other every second).
pub const REPLACED: &str = "replaced by a newer connection with the same client id";

/// How an `OpenFailed` reason starts when frpc refused the connection for
/// want of room (its `--max-data-connections`), not because its service is
/// unreachable: frps then takes the box as busy, not failing.
pub const OPEN_BUSY: &str = "busy: ";

/// What a refusal says past [`OPEN_BUSY`], when it starts with it (frpc
/// refused for want of room); `None` for any other refusal.
pub fn busy_refusal(reason: &str) -> Option<&str> {
    reason.strip_prefix(OPEN_BUSY)
}

/// The `Disconnect` reason of a session whose login token was revoked or
/// expired (frpc then passes over that token and logs in with its password).
pub const TOKEN_ENDED: &str = "the login token was revoked or has expired; log in again";

/// One message of the frpc ↔ frps conversation. Its `Debug` shows the
/// fields as the frame carries them, secrets (passwords, tokens, session
/// keys) left out.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Command {
    /// frpc → frps (control, first frame): log in with an account's email and
    /// password. Answered by [`Command::LoginResult`].
    Login {
        /// Account email.
        email: String,
        /// Account password, in clear inside the (TLS-protected) channel.
        password: String,
    },
    /// frpc → frps (control, first frame): log in with a token saved from an
    /// earlier [`Command::LoginResult`]. Answered by [`Command::LoginResult`].
    LoginToken {
        /// The token.
        token: String,
    },
    /// frps → frpc: outcome of [`Command::Login`] or [`Command::LoginToken`].
    LoginResult {
        /// Whether the connection is now authenticated.
        ok: bool,
        /// A new token to save, when the login used email and password.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// RFC 3339 expiry of `token`, if it expires.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<String>,
        /// Why the login failed, in English, for the operator.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// Machine-readable failure: `invalid_credentials`, `token_invalid`,
        /// `token_expired` (log in again with a password), `throttled`,
        /// `unavailable` (retry later), `protocol_error`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<String>,
        /// With `throttled`: how long to wait before trying again, in
        /// milliseconds (an attempt sooner is refused the same way).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    /// frpc → frps (control, after a successful login): announce this client
    /// and the service it exposes. Answered by [`Command::Registered`] or
    /// [`Command::RegisterRefused`].
    Register(Registration),
    /// frps → frpc: the registration was accepted.
    Registered {
        /// The client id frps uses for this client (normally the one asked for).
        client_id: String,
        /// Secret proving, on data connections, that a dial-back comes from
        /// this registered client. Valid for this control session only.
        session_key: String,
        /// How often frpc must send [`Command::Heartbeat`], in milliseconds.
        /// frps evicts a client that stays silent for three intervals.
        heartbeat_interval_ms: u64,
        /// Whether frps takes a multiplexed tunnel connection
        /// ([`Command::MuxHello`]). Absent (false) from an frps that
        /// does not: frpc then only answers [`Command::OpenConnection`].
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        mux: bool,
    },
    /// frps → frpc: the registration was refused; the control connection
    /// closes after this frame.
    RegisterRefused {
        /// Why, in English.
        reason: String,
        /// Whether trying again later can succeed (false for bad credentials
        /// or an unsupported protocol version).
        retry: bool,
    },
    /// frpc → frps: liveness signal, sent every heartbeat interval.
    Heartbeat {
        /// Sequence number, echoed in the ack.
        seq: u64,
    },
    /// frps → frpc: answer to a [`Command::Heartbeat`].
    HeartbeatAck {
        /// The heartbeat's sequence number.
        seq: u64,
    },
    /// frpc → frps: periodic system metrics of the GPU box.
    SystemInfo(SystemInfo),
    /// frpc → frps: the local service's model list changed (or its health did).
    ModelsUpdate {
        /// Models the local service currently serves.
        models: Vec<ModelInfo>,
        /// Whether the local service answered its last probe.
        service_up: bool,
    },
    /// frps → frpc (control): dial the proxy port, send [`Command::DataHello`]
    /// with this id, and join the connection to the local service.
    OpenConnection {
        /// Pairing id, fresh for every requested connection.
        conn_id: Uuid,
    },
    /// frpc → frps (control): a requested data connection cannot be made
    /// (e.g. the local service refused it). Lets frps fail over at once
    /// instead of waiting for its connect timeout.
    OpenFailed {
        /// The pairing id from [`Command::OpenConnection`].
        conn_id: Uuid,
        /// What went wrong, in English.
        reason: String,
    },
    /// frpc → frps (data connection, only frame): this connection answers
    /// [`Command::OpenConnection`] `conn_id`.
    DataHello {
        /// The pairing id.
        conn_id: Uuid,
        /// The registered client id.
        client_id: String,
        /// The `session_key` from [`Command::Registered`].
        session_key: String,
    },
    /// frpc → frps (proxy port, first frame): this connection is the
    /// session's multiplexed tunnel connection (see [`crate::mux`]); sent
    /// only when [`Command::Registered`] said `mux`. Answered by
    /// [`Command::MuxAccepted`] (then [`crate::mux`] frames both ways) or
    /// [`Command::DataRejected`] with a nil `conn_id`.
    MuxHello {
        /// The registered client id.
        client_id: String,
        /// The `session_key` from [`Command::Registered`].
        session_key: String,
    },
    /// frps → frpc (the tunnel connection, only frame): the hello was
    /// accepted; multiplexed frames follow.
    MuxAccepted,
    /// frps → frpc (data connection): the hello was not accepted (unknown or
    /// expired pairing, wrong proof); the connection closes after this frame.
    DataRejected {
        /// The pairing id from the hello.
        conn_id: Uuid,
        /// Why, in English.
        reason: String,
    },
    /// frps → frpc (control, registered): a new login token for this
    /// account, to save in place of the one the session logged in with,
    /// which has less than half its lifetime left (it stays valid until the
    /// new one's first login, or until it expires). An frpc that does not
    /// know this command ignores it.
    TokenRenewed {
        /// The new token.
        token: String,
        /// RFC 3339 expiry of `token`, if it expires.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<String>,
    },
    /// frpc → frps (control, registered): renewal `token` (from
    /// `TokenRenewed`, or a token login's `LoginResult`) is saved in the
    /// token file: frps takes it as used, as at its first login, so the
    /// token it was renewed from, and copies of it, stop working now (a
    /// copy logging in meanwhile could otherwise have it renewed again,
    /// revoking this one). A frps that does not know this command ignores
    /// it.
    TokenSaved {
        /// The renewal saved.
        token: String,
    },
    /// frps → frpc (control): the server is dropping this client (operator
    /// request, shutdown, replaced by a newer connection). The control
    /// connection closes after this frame; frpc may reconnect after backoff.
    Disconnect {
        /// Why, in English.
        reason: String,
    },
    /// Either direction: a message could not be handled. The connection
    /// stays open unless the sender closes it.
    Error {
        /// What went wrong, in English.
        message: String,
    },
    /// A message of a type this build does not know (from a newer peer):
    /// read and ignored, so an older frpc or frps keeps its session instead
    /// of reconnecting over it. Never sent.
    #[serde(other)]
    Unknown,
}

impl Command {
    /// The variant's name, for logs and error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Login { .. } => "Login",
            Command::LoginToken { .. } => "LoginToken",
            Command::LoginResult { .. } => "LoginResult",
            Command::Register(_) => "Register",
            Command::Registered { .. } => "Registered",
            Command::RegisterRefused { .. } => "RegisterRefused",
            Command::Heartbeat { .. } => "Heartbeat",
            Command::HeartbeatAck { .. } => "HeartbeatAck",
            Command::SystemInfo(_) => "SystemInfo",
            Command::ModelsUpdate { .. } => "ModelsUpdate",
            Command::OpenConnection { .. } => "OpenConnection",
            Command::OpenFailed { .. } => "OpenFailed",
            Command::DataHello { .. } => "DataHello",
            Command::DataRejected { .. } => "DataRejected",
            Command::MuxHello { .. } => "MuxHello",
            Command::MuxAccepted => "MuxAccepted",
            Command::TokenRenewed { .. } => "TokenRenewed",
            Command::TokenSaved { .. } => "TokenSaved",
            Command::Disconnect { .. } => "Disconnect",
            Command::Error { .. } => "Error",
            Command::Unknown => "command unknown to this version",
        }
    }
}

/// What a client announces about itself in [`Command::Register`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    /// Requested client id (unique in the fleet; a reconnect with the same id
    /// replaces the stale connection).
    pub client_id: String,
    /// Hardware machine id (from `mid`), or the persisted fallback UUID.
    pub machine_id: String,
    /// Host name of the GPU box.
    pub hostname: String,
    /// Operating system (e.g. `linux`).
    pub os: String,
    /// CPU architecture (e.g. `x86_64`).
    pub arch: String,
    /// frpc version.
    pub version: String,
    /// [`PROTOCOL_VERSION`] the client speaks.
    pub protocol_version: u32,
    /// Free-form metadata (`--meta KEY=VALUE`); server plugins see it as
    /// frp's client metas.
    #[serde(default)]
    pub metas: BTreeMap<String, String>,
    /// frp's `user` (`--user`): who runs this client, as server plugins see
    /// it. Empty when not given.
    #[serde(default)]
    pub user: String,
    /// Metadata of the exposed service (`--proxy-meta KEY=VALUE`); server
    /// plugins see it as frp's proxy metas (`NewProxy` only).
    #[serde(default)]
    pub proxy_metas: BTreeMap<String, String>,
    /// Models the local service serves at registration time.
    #[serde(default)]
    pub models: Vec<ModelInfo>,
    /// `host:port` of the local service, used as the `Host` header of
    /// forwarded requests (Ollama refuses foreign Host headers).
    #[serde(default)]
    pub local_host: String,
    /// Whether the local service answered the model probe at registration.
    #[serde(default = "yes")]
    pub service_up: bool,
    /// Most requests the box accepts at once; `None` for unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
}

fn yes() -> bool {
    true
}

impl Default for Registration {
    fn default() -> Self {
        Self {
            client_id: String::new(),
            machine_id: String::new(),
            hostname: String::new(),
            os: String::new(),
            arch: String::new(),
            version: String::new(),
            protocol_version: PROTOCOL_VERSION,
            metas: BTreeMap::new(),
            user: String::new(),
            proxy_metas: BTreeMap::new(),
            models: Vec::new(),
            local_host: String::new(),
            service_up: true,
            max_concurrency: None,
        }
    }
}

/// Most models frps keeps for one client; frpc announces no more (the
/// first by name). A longer list makes every routed request and
/// `/v1/models` scan it.
pub const MAX_MODELS: usize = 1024;

/// Longest model name frps keeps, in bytes.
pub const MAX_MODEL_NAME: usize = 256;

/// Whether frps keeps a model of this name: 1 to [`MAX_MODEL_NAME`] bytes
/// without control characters.
pub fn model_name_kept(name: &str) -> bool {
    (1..=MAX_MODEL_NAME).contains(&name.len()) && !name.contains(char::is_control)
}

/// Leaves in `models` those whose names frps keeps ([`model_name_kept`]),
/// each name once (the first said, with its size); returns how many were
/// left out for their names, and how many as repeats. frpc announces, and
/// frps keeps, what this leaves.
pub fn keep_named_models(models: &mut Vec<ModelInfo>) -> (usize, usize) {
    let mut seen = std::collections::HashSet::new();
    let (mut unkept, mut repeated) = (0, 0);
    models.retain(|m| {
        if !model_name_kept(&m.name) {
            unkept += 1;
            return false;
        }
        let new = seen.insert(m.name.clone());
        repeated += usize::from(!new);
        new
    });
    (unkept, repeated)
}

/// One model served by a client's local service.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ModelInfo {
    /// Model name as the service reports it (e.g. `qwen2.5:1.5b`).
    pub name: String,
    /// Size in bytes, when the service reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// System metrics of a GPU box, sent in [`Command::SystemInfo`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SystemInfo {
    /// Host name.
    pub hostname: String,
    /// Operating system name and version.
    pub os: String,
    /// CPU architecture.
    pub arch: String,
    /// Overall CPU usage, percent (0–100).
    #[serde(deserialize_with = "finite_f32")]
    pub cpu_usage: f32,
    /// Number of logical CPUs.
    pub cpu_count: u32,
    /// Memory in use, bytes.
    pub memory_used: u64,
    /// Total memory, bytes.
    pub memory_total: u64,
    /// Disks (relevant mounts).
    #[serde(default)]
    pub disks: Vec<DiskInfo>,
    /// 1, 5 and 15 minute load averages.
    #[serde(default)]
    pub load_average: [f64; 3],
    /// Seconds since boot.
    pub uptime_secs: u64,
    /// GPUs, where the machine has a management library to ask.
    #[serde(default)]
    pub gpus: Vec<GpuInfo>,
}

/// One mounted disk.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DiskInfo {
    /// Mount point.
    pub mount: String,
    /// Bytes in use.
    pub used: u64,
    /// Capacity in bytes.
    pub total: u64,
}

/// One GPU.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GpuInfo {
    /// The device's index in the management library (NVML), which stays
    /// the card's own when another card cannot be read. Older frpc leave
    /// it out (frps then numbers the list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    /// Product name.
    pub name: String,
    /// Utilisation, percent.
    #[serde(deserialize_with = "finite_f32")]
    pub utilization: f32,
    /// Memory in use, bytes.
    pub memory_used: u64,
    /// Total memory, bytes.
    pub memory_total: u64,
    /// Temperature, °C.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "finite_f32_opt"
    )]
    pub temperature: Option<f32>,
}

/// An `f32` that fits: JSON numbers beyond `f32`'s range would otherwise
/// become infinite, which serialises as `null` and never parses back.
fn finite_f32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    let v = f32::deserialize(d)?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(serde::de::Error::custom(format!(
            "number out of range for a 32-bit float ({v})"
        )))
    }
}

/// [`finite_f32`] for an optional field.
fn finite_f32_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f32>, D::Error> {
    #[derive(Deserialize)]
    struct Finite(#[serde(deserialize_with = "finite_f32")] f32);
    Ok(Option::<Finite>::deserialize(d)?.map(|Finite(v)| v))
}

/// Fields of [`Command`]s whose values are secrets.
const SECRET_FIELDS: [&str; 3] = ["password", "token", "session_key"];

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut value = match serde_json::to_value(self) {
            Ok(value) => value,
            Err(_) => return f.write_str(self.name()),
        };
        if let Some(fields) = value.as_object_mut() {
            for name in SECRET_FIELDS {
                if let Some(v) = fields.get_mut(name)
                    && !v.is_null()
                {
                    *v = serde_json::Value::from("<redacted>");
                }
            }
        }
        write!(f, "{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command printed (a log line, a failed assertion) shows no secret.
    #[test]
    fn secrets_never_show_in_debug_output() {
        let cases = [
            Command::Login {
                email: "me@example.com".into(),
                password: "hunter2-secret".into(),
            },
            Command::LoginToken {
                token: "frpxc_secret".into(),
            },
            Command::LoginResult {
                ok: true,
                token: Some("frpxc_secret".into()),
                expires_at: None,
                reason: None,
                code: None,
                retry_after_ms: None,
            },
            Command::TokenRenewed {
                token: "frpxc_secret".into(),
                expires_at: None,
            },
            Command::TokenSaved {
                token: "frpxc_secret".into(),
            },
            Command::MuxHello {
                client_id: "gpu-01".into(),
                session_key: "secret-session-key".into(),
            },
        ];
        for cmd in cases {
            let shown = format!("{cmd:?}");
            assert!(!shown.contains("secret"), "{shown}");
            assert!(shown.contains(cmd.name()), "{shown}");
        }
        let shown = format!(
            "{:?}",
            Command::Disconnect {
                reason: "bye".into()
            }
        );
        assert_eq!(shown, r#"{"reason":"bye","type":"Disconnect"}"#);
    }

    #[test]
    fn commands_are_internally_tagged() {
        let json = serde_json::to_value(Command::Heartbeat { seq: 7 }).unwrap();
        assert_eq!(json, serde_json::json!({"type": "Heartbeat", "seq": 7}));
        let reg = Command::Register(Registration {
            client_id: "a".into(),
            ..Default::default()
        });
        let json = serde_json::to_value(&reg).unwrap();
        assert_eq!(json["type"], "Register");
        assert_eq!(json["client_id"], "a");
    }

    #[test]
    fn an_unknown_type_is_unknown_and_a_missing_one_an_error() {
        let cmd = serde_json::from_str::<Command>(r#"{"type":"Nope","x":[1]}"#);
        assert_eq!(cmd.unwrap(), Command::Unknown);
        assert!(serde_json::from_str::<Command>(r#"{"seq":1}"#).is_err());
        assert!(serde_json::from_str::<Command>(r#"{"type":7}"#).is_err());
    }

    #[test]
    fn optional_fields_may_be_absent() {
        let cmd: Command = serde_json::from_str(r#"{"type":"LoginResult","ok":true}"#).unwrap();
        assert_eq!(
            cmd,
            Command::LoginResult {
                ok: true,
                token: None,
                expires_at: None,
                reason: None,
                code: None,
                retry_after_ms: None,
            }
        );
    }

    /// An frps from before the tunnel connection says nothing of it: frpc
    /// reads that as no; the offer goes out only when made.
    #[test]
    fn the_tunnel_offer_defaults_to_no() {
        let old =
            r#"{"type":"Registered","client_id":"a","session_key":"k","heartbeat_interval_ms":5}"#;
        let cmd: Command = serde_json::from_str(old).unwrap();
        assert!(matches!(cmd, Command::Registered { mux: false, .. }));
        let offer = Command::Registered {
            client_id: "a".into(),
            session_key: "k".into(),
            heartbeat_interval_ms: 5,
            mux: true,
        };
        let json = serde_json::to_value(&offer).unwrap();
        assert_eq!(json["mux"], true);
        let back: Command = serde_json::from_value(json).unwrap();
        assert_eq!(back, offer);
        let json = serde_json::to_value(Command::MuxAccepted).unwrap();
        assert_eq!(json, serde_json::json!({"type": "MuxAccepted"}));
    }

    /// A float too large for `f32` used to parse as infinity, which
    /// re-encodes as `null` and no longer parses (caught by the
    /// round-trip property of the `command_parser` fuzz target).
    #[test]
    fn out_of_range_floats_are_refused_not_made_infinite() {
        let info = r#"{"type":"SystemInfo","hostname":"h","os":"linux","arch":"x86_64","cpu_usage":1e39,"cpu_count":1,"memory_used":1,"memory_total":2,"uptime_secs":1}"#;
        assert!(serde_json::from_str::<Command>(info).is_err());
        let gpu = r#"{"type":"SystemInfo","hostname":"h","os":"linux","arch":"x86_64","cpu_usage":1,"cpu_count":1,"memory_used":1,"memory_total":2,"uptime_secs":1,"gpus":[{"name":"g","utilization":-1e300,"memory_used":1,"memory_total":2,"temperature":4e38}]}"#;
        assert!(serde_json::from_str::<Command>(gpu).is_err());
        let fine = gpu.replace("-1e300", "99.5").replace("4e38", "70");
        let cmd: Command = serde_json::from_str(&fine).unwrap();
        let again: Command = serde_json::from_str(&serde_json::to_string(&cmd).unwrap()).unwrap();
        assert_eq!(again, cmd);
    }
}
