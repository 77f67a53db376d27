use tokio_util::sync::CancellationToken;

// One thread: frpc's work is moving bytes between sockets, which one core
// does at many Gbit/s; a second worker only added cross-thread wakeups (SSE
// events came later) and a second malloc arena (benchmark case d and e).
// Blocking work (metrics, the password prompt) runs on spawn_blocking.
common::define_pow!();

fn main() -> anyhow::Result<()> {
    let result = common::memory::run(tokio::runtime::Builder::new_current_thread(), serve());
    // Ended (by a signal, say) while a password prompt had echo off.
    common::process::restore_terminal();
    result?
}

async fn serve() -> anyhow::Result<()> {
    let config = frpc::config_file::load().unwrap_or_else(|e| e.exit());
    let _log = common::telemetry::init(&config.log);
    if let Some(limit) = common::process::raise_fd_limit() {
        tracing::info!("open-file limit: {limit}");
    }
    let shutdown = CancellationToken::new();
    common::process::on_signals(shutdown.clone());
    frpc::run(config, shutdown).await
}
