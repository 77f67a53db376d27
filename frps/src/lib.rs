//! frps: the frpx server.
//!
//! Four listeners share one [`state::State`]:
//! - control ([`listeners::control`]): clients log in, register, heartbeat;
//! - proxy ([`listeners::proxy`]): clients dial back data connections;
//! - public ([`listeners::public`]): API consumers' HTTP requests, each
//!   authenticated and routed on its own;
//! - management API ([`api`]).
//!
//! Server plugins ([`plugins`]) are asked before logins, registrations,
//! heartbeats, data connections and public requests.

pub mod admin;
pub mod api;
pub mod auth;
pub mod config;
pub mod config_file;
pub mod dispatch;
pub mod limits;
pub mod listeners;
pub mod metrics;
pub mod monitor;
pub mod paths;
pub mod pending;
pub mod periodic;
pub mod plugins;
pub mod ratelimit;
pub mod registry;
pub mod router;
pub mod server;
pub mod state;
pub mod store;
pub mod tls;
pub mod upstream;

pub use config::Config;
pub use server::{BoundAddrs, Server};

use clap::Parser;

/// The command line: server flags, optionally an admin command.
#[derive(Debug, Parser)]
#[command(
    name = "frps",
    version,
    about = "frpx server: one authenticated, load-balanced endpoint for GPU boxes behind NAT",
    after_help = "Without a command, frps runs the server. Admin commands use the same --database-url and --redis-url."
)]
pub struct Cli {
    /// Server configuration.
    #[command(flatten)]
    pub config: Config,
    /// Admin command to run instead of the server.
    #[command(subcommand)]
    pub command: Option<admin::Admin>,
}

/// Runs frps with `config` until SIGINT or SIGTERM, then shuts down
/// gracefully.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let server = Server::bind(config).await?;
    // One signal starts the drain; more are ignored (a supervisor that
    // signals twice must not cut it short: --shutdown-timeout bounds it).
    let shutdown = server.state().shutdown.clone();
    tokio::spawn(async move {
        common::process::wait_for_signal().await;
        shutdown.cancel();
    });
    server.run().await
}
