//! frpc: runs on a GPU box, registers with frps and carries requests to the
//! local model service.
//!
//! - [`control`]: the control session and its reconnect loop;
//! - [`tunnel`]: data connections dialed back on request;
//! - [`local`]: probing the local service for its models;
//! - [`login`]: the saved token and email/password credentials;
//! - [`tls`]: dialing frps, with TLS when configured;
//! - [`metrics`]: system and GPU metrics;
//! - [`identity`]: client id and machine facts;
//! - [`state_file`]: the token and client-id files, written atomically;
//! - [`config_file`]: `--config frpc.ini` (frp's INI form);
//! - [`backoff`]: reconnect delays.

pub mod backoff;
pub mod config;
pub mod config_file;
pub mod control;
pub mod identity;
pub mod local;
pub mod login;
pub mod metrics;
pub mod state_file;
pub mod tls;
pub mod tunnel;

pub use config::Config;
pub use control::Client;

use tokio_util::sync::CancellationToken;

/// Runs frpc with `config` until `shutdown` is cancelled (or the server
/// refuses it for good).
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    Client::new(config, shutdown)?.run().await
}
